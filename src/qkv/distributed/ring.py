"""Ring attention: exact attention over a sequence split across the ranks of a group.

Legend: N ranks, r this rank, L = N Lr the whole sequence, B batch, Hq/Hkv heads, D head dim.

Each rank holds its rows of q, k, v (B, H, Lr, D) in a `layout` (`qkv.distributed.layout`).
The K/V shards travel round the ring: at step s = 0 .. N-1 rank r holds the shard of rank
(r - s) mod N, attends its queries to it, and meanwhile sends that shard on to rank r + 1 and
receives the next from rank r - 1, so the transfer runs behind the computation. The partial
results merge by their log-sum-exp in float32 (float64 for float64 inputs).

Work is cut into *pieces*: each of this rank's query pieces against each of the visiting
shard's key pieces (`Piece`: zigzag has two per rank). A piece pair the mask rules out entirely
is not computed; one the mask allows entirely runs with no mask; the others run with the whole
sequence's mask seen through `PieceMask` (absolute positions), as does the score_mod.

The backward sends K/V round the ring again, with the gradient of each shard travelling
beside it: every rank adds its share (the flash backward given the merged output and LSE,
`piece_backward` of `qkv.backends.tiled` where torch's fused CPU kernel applies, of
`qkv.backends.triton_backend` on CUDA; else the piece is recomputed under autograd) and passes it on; after N steps it reaches its owner.

Messages per rank (`qkv.distributed.count`): forward N - 1 sends and N - 1 receives; backward
(N - 1) + N sends and as many receives (K/V N - 1 times, the gradients N times: the last one
brings a shard's finished gradient home).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from qkv.attention import attention
from qkv.backends.base import check_sinks, make_call
from qkv.backends import tiled, triton_backend
from qkv.backends.tiled import score_mod_tensors
from qkv.masks import EMPTY, FULL, PARTIAL, as_mask, causal as causal_mask
from qkv.scores import as_score_mod

from .layout import Piece, check_layout, check_length, group_rank, group_size, pieces
from .transport import Ring, pack, unpack
from .views import PieceMask, PieceMod

__all__ = ["ring_attention", "Task", "plan_steps", "piece_kind"]

_KV, _GRAD = 1, 2   # message tags


@dataclass(frozen=True)
class Task:
    """At one step: this rank's query piece `qi` against the visiting shard's key piece `ki`."""

    qi: int
    ki: int
    partial: bool          # False: the mask allows every pair (run without a mask)


def piece_kind(mask, qp: Piece, kp: Piece, L: int, B: int, H: int) -> int:
    """EMPTY, PARTIAL or FULL: what `mask` (of the whole sequence) allows between two pieces."""
    if mask is None:
        return FULL
    view = PieceMask(mask, qp, kp, L)
    ranges = view.row_ranges(torch.arange(qp.length), kp.length)
    if ranges is not None:                               # intervals of keys: exact in O(Lr)
        lo, hi = ranges
        if bool((hi <= lo).all()):
            return EMPTY
        return FULL if bool((lo == 0).all() and (hi == kp.length).all()) else PARTIAL
    if qp.stride == 1 and kp.stride == 1 and qp.length == kp.length and kp.start % kp.length == 0 \
            and qp.start % qp.length == 0:
        kind = mask.block_mask(L, L, block=qp.length, B=B, H=H, q_offset=0).kind   # cached by the mask
        kind = kind[..., qp.start // qp.length, kp.start // kp.length]
        if bool((kind == EMPTY).all()):
            return EMPTY
        return FULL if bool((kind == FULL).all()) else PARTIAL
    return PARTIAL


def plan_steps(mask, layout: str, L: int, rank: int, size: int, B: int, H: int) -> list[list[Task]]:
    """The piece pairs rank `rank` computes at each of the N steps (EMPTY pairs left out)."""
    mine = pieces(layout, L, rank, size)
    steps = []
    for s in range(size):
        theirs = pieces(layout, L, (rank - s) % size, size)
        tasks = []
        for qi, qp in enumerate(mine):
            for ki, kp in enumerate(theirs):
                kind = piece_kind(mask, qp, kp, L, B, H)
                if kind != EMPTY:
                    tasks.append(Task(qi, ki, kind == PARTIAL))
        steps.append(tasks)
    return steps


@dataclass
class _Spec:
    mask: object
    score_mod: object
    scale: float
    layout: str
    group: object
    L: int
    rank: int
    size: int
    backend: str
    steps: list
    n_params: int


def _stat(dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _views(spec: _Spec, task: Task, step: int, q, k, v):
    qp = pieces(spec.layout, spec.L, spec.rank, spec.size)[task.qi]
    kp = pieces(spec.layout, spec.L, (spec.rank - step) % spec.size, spec.size)[task.ki]
    mask = PieceMask(spec.mask, qp, kp, spec.L) if task.partial else None
    mod = PieceMod(spec.score_mod, qp, kp, spec.L) if spec.score_mod is not None else None
    return qp.rows, kp.rows, q[:, :, qp.rows], k[:, :, kp.rows], v[:, :, kp.rows], mask, mod


def _call(spec: _Spec, q, k, v, mask, mod):
    return make_call(q, k, v, mask=mask, causal=False, score_mod=mod, scale=spec.scale, dropout_p=0.0,
                     return_lse=True, return_weights=False, q_offset=0)


def _engine(spec: _Spec, device: torch.device):
    """Where a piece's forward and its backward given the merged rows run without autograd: the
    Triton kernels on CUDA (or when named), torch's fused CPU kernel in `tiled`; None: neither
    (pieces go through `qkv.attention` and autograd)."""
    if spec.backend == "triton" or (spec.backend == "auto" and device.type == "cuda"):
        return triton_backend
    return tiled if spec.backend in ("auto", "tiled") else None


def _forward_piece(spec: _Spec, q, k, v, mask, mod):
    engine = _engine(spec, q.device)
    got = None if engine is None else engine.piece_forward(_call(spec, q, k, v, mask, mod))
    if got is None:
        with torch.no_grad():
            got = attention(q, k, v, mask=mask, score_mod=mod, scale=spec.scale, q_offset=0, return_lse=True,
                            backend=spec.backend)
    return got


def _merge_into(acc_o: Tensor, acc_l: Tensor, rows: slice, o: Tensor, lse: Tensor) -> None:
    """acc[rows] <- the LSE merge of acc[rows] and (o, lse), over disjoint keys."""
    a = acc_l[:, :, rows]
    lse = lse.to(a.dtype)
    new = torch.logaddexp(a, lse)
    wa = torch.exp(a - new).nan_to_num_(0.0).unsqueeze(-1)        # -inf - -inf: no key on either side
    wb = torch.exp(lse - new).nan_to_num_(0.0).unsqueeze(-1)
    acc_o[:, :, rows] = acc_o[:, :, rows] * wa + o.to(acc_o.dtype) * wb
    acc_l[:, :, rows] = new


def ring_forward(spec: _Spec, ring: Ring, q: Tensor, k: Tensor, v: Tensor, sinks: Tensor | None):
    """(out in q's dtype, lse in the statistics dtype) of this rank's rows."""
    stat = _stat(q.dtype)
    B, Hq, Lr, _ = q.shape
    acc_o = torch.zeros(B, Hq, Lr, v.shape[-1], dtype=stat, device=q.device)
    acc_l = torch.full((B, Hq, Lr), -math.inf, dtype=stat, device=q.device)
    like = [(k.shape, k.dtype), (v.shape, v.dtype)]
    kk, vv = k, v
    for s in range(spec.size):
        pending = ring.shift(pack([kk, vv]), "forward", _KV) if s < spec.size - 1 else None
        for task in spec.steps[s]:
            rows, _, qs, ks, vs, mask, mod = _views(spec, task, s, q, kk, vv)
            o, lse = _forward_piece(spec, qs, ks, vs, mask, mod)
            _merge_into(acc_o, acc_l, rows, o, lse)
        if pending is not None:
            kk, vv = unpack(pending.wait(), like)
    if sinks is not None:      # one more entry per row, sinks[h], with no value
        sink = sinks.detach().to(stat).view(1, -1, 1).expand_as(acc_l)
        new = torch.logaddexp(acc_l, sink)
        acc_o *= torch.exp(acc_l - new).nan_to_num_(0.0).unsqueeze(-1)
        acc_l = new
    return acc_o.to(q.dtype), acc_l


def _recomputed(spec: _Spec, q, k, v, mask, mod, out, lse, dout, dlse, params):
    """A piece's share of the gradients by autograd through its recomputed forward: the piece
    gives (o_j, lse_j), merged with weight w_j = exp(lse_j - lse), so d o_j = w_j dout and
    d lse_j = w_j (dout . o_j - dout . out + dlse)."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        o_j, lse_j = attention(*leaves, mask=mask, score_mod=mod, scale=spec.scale, q_offset=0, return_lse=True,
                               backend=spec.backend)
        stat = lse_j.dtype
        w = torch.exp(lse_j.detach() - lse.to(stat)).nan_to_num_(0.0)
        do = dout.to(stat)
        row = (do * o_j.detach().to(stat)).sum(-1) - (do * out.to(stat)).sum(-1)
        if dlse is not None:
            row = row + dlse.to(stat)
        grads = torch.autograd.grad((o_j, lse_j), leaves + list(params), ((w.unsqueeze(-1) * do).to(o_j.dtype), w * row),
                                    allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves + list(params))]
    return grads[:3], grads[3:]


def _backward_step(spec, step, q, kk, vv, out, lse, dout, dlse, params, dq, gk, gv, dparams):
    for task in spec.steps[step]:
        rows, krows, qs, ks, vs, mask, mod = _views(spec, task, step, q, kk, vv)
        o, lr, do = out[:, :, rows], lse[:, :, rows], dout[:, :, rows]
        got, engine = None, _engine(spec, q.device)
        if engine is triton_backend:            # its kernels take the LSE's gradient too
            got = engine.piece_backward(_call(spec, qs, ks, vs, mask, mod), o, lr, do,
                                        None if dlse is None else dlse[:, :, rows])
        elif engine is not None and dlse is None:
            got = engine.piece_backward(_call(spec, qs, ks, vs, mask, mod), o, lr, do)
        if got is None:
            got, gp = _recomputed(spec, qs, ks, vs, mask, mod, o, lr, do, None if dlse is None else dlse[:, :, rows],
                                  params)
            for acc, g in zip(dparams, gp):
                acc += g
        dq[:, :, rows] += got[0]
        gk[:, :, krows] += got[1]
        gv[:, :, krows] += got[2]


def ring_backward(spec: _Spec, ring: Ring, saved, dout: Tensor, dlse: Tensor | None):
    q, k, v, out, lse, sinks, *params = saved
    stat = _stat(q.dtype)
    if dlse is not None and not bool((dlse != 0).any()):
        dlse = None
    dq = torch.zeros(q.shape, dtype=stat, device=q.device)
    dparams = [torch.zeros_like(p) for p in params]
    like_kv = [(k.shape, k.dtype), (v.shape, v.dtype)]
    like_g = [(k.shape, stat), (v.shape, stat)]
    kk, vv, grads = k, v, None
    for s in range(spec.size):
        pending = ring.shift(pack([kk, vv]), "backward", _KV) if s < spec.size - 1 else None
        gk = torch.zeros(k.shape, dtype=stat, device=k.device)
        gv = torch.zeros(v.shape, dtype=stat, device=v.device)
        _backward_step(spec, s, q, kk, vv, out, lse, dout, dlse, params, dq, gk, gv, dparams)
        if grads is not None:                       # the gradient of this shard so far, from rank r - 1
            gk_in, gv_in = unpack(grads.wait(), like_g)
            gk += gk_in
            gv += gv_in
        if spec.size > 1:
            grads = ring.shift(pack([gk, gv]), "backward", _GRAD)
        if pending is not None:
            kk, vv = unpack(pending.wait(), like_kv)
    if spec.size > 1:
        gk, gv = unpack(grads.wait(), like_g)       # this rank's own shard, finished
    dsinks = None
    if sinks is not None:
        # the sink is one more entry with no value: d sinks[h] = sum over rows of w (dlse - dout . out)
        w = torch.exp(sinks.detach().to(stat).view(1, -1, 1) - lse).nan_to_num_(0.0)
        row = -(dout.to(stat) * out.to(stat)).sum(-1) + (dlse.to(stat) if dlse is not None else 0.0)
        dsinks = (w * row).sum(dim=(0, 2)).to(sinks.dtype)
    return dq.to(q.dtype), gk.to(k.dtype), gv.to(v.dtype), dsinks, dparams


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, q, k, v, sinks, *params):
        out, lse = ring_forward(spec, Ring(spec.group), q, k, v, sinks)
        ctx.spec = spec
        ctx.save_for_backward(q, k, v, out, lse, sinks, *params)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        dq, dk, dv, dsinks, dparams = ring_backward(ctx.spec, Ring(ctx.spec.group), ctx.saved_tensors,
                                                    dout.contiguous(), dlse)
        return (None, dq, dk, dv, dsinks, *dparams)


def check_shards(q: Tensor, k: Tensor, v: Tensor, layout: str, size: int, what: str) -> int:
    """The whole length L = N Lr of q, k, v shards, checked; a clear error otherwise."""
    check_layout(layout)
    make_call(q, k, v, mask=None, causal=False, score_mod=None, scale=None, dropout_p=0.0, return_lse=False,
              return_weights=False, q_offset=0)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{what} is self-attention over one sharded sequence: each rank passes its rows of q, k "
                         f"and v, of one length; got q with {q.shape[2]} rows and k with {k.shape[2]}")
    L = q.shape[2] * size
    check_length(L, layout, size)
    return L


def whole_mask(mask, causal: bool, B: int, H: int, L: int):
    """The call's mask (with causal folded in), validated for the whole sequence."""
    m = None if mask is None else as_mask(mask)
    if causal:
        m = causal_mask() if m is None else causal_mask() & m
    if m is not None:
        m.validate(B, H, L, L, 0)
    return m


def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, mask=None, causal: bool = False, score_mod=None,
                   scale: float | None = None, sinks: Tensor | None = None, group=None, layout: str = "zigzag",
                   return_lse: bool = False, backend: str = "auto"):
    """Exact attention over a sequence split across the ranks of `group` (default: the whole world).

    Every rank calls it with its own rows of the sequence, as `shard(x, layout, group)` gives them:
    q (B, Hq, Lr, D), k and v (B, Hkv, Lr, D/Dv), L = N Lr. It returns this rank's rows of what
    `qkv.attention(Q, K, V, ...)` returns on the whole sequence (q_offset 0): out (B, Hq, Lr, Dv),
    with return_lse also the LSE (B, Hq, Lr). Differentiable: q, k, v, sinks and the tensors a
    score_mod holds get their gradients (those of replicated tensors, sinks and the score_mod's,
    are this rank's share: sum them over the group, as DistributedDataParallel's average does).

    mask, causal, score_mod, scale, sinks: as `qkv.attention`, for the *whole* sequence: indices
    are absolute positions in 0..L-1 (a document mask takes the ids of all L positions).
    layout: "zigzag" (default; balanced under causal masks), "contiguous" or "striped".
    backend: what computes each piece where torch's fused CPU kernel does not ("auto": the
    dispatcher's choice). Without an initialised process group (or with one rank) it runs the
    same pieces in this process.
    """
    size, rank = group_size(group), group_rank(group)
    L = check_shards(q, k, v, layout, size, "ring attention")
    B, Hq = q.shape[:2]
    m = whole_mask(mask, causal, B, Hq, L)
    mod = None
    if score_mod is not None:
        mod = as_score_mod(score_mod)
        mod.validate(B, Hq, L, L, 0)
    sinks = check_sinks(sinks, Hq, q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None and q.shape[-1] else (1.0 if scale is None else scale)
    params = score_mod_tensors(mod) if mod is not None else []
    spec = _Spec(m, mod, float(scale), layout, group, L, rank, size, backend,
                 plan_steps(m, layout, L, rank, size, B, Hq), len(params))
    out, lse = _RingAttention.apply(spec, q, k, v, sinks, *params)
    return (out, lse) if return_lse else out
