"""The `triton` backend: exact attention on the GPU in Triton kernels driven by qkv's BlockMask.

Legend: B batch, Hq query heads, Hkv key/value heads, G = Hq // Hkv, Lq/Lk lengths, D head dim,
nQ/nK tiles per axis, B'/H' a mask's batch/head extent (1 or B / Hq).

Any qkv mask, one compile per kernel variant: the kernels (`qkv.kernels.gpu.attention`) take a
`Plan` of plain tensors that this module builds from the call, once per BlockMask (cached with it):

- the BlockMask's tiles as lists per query tile (and per key tile, for dk/dv): FULL tiles are
  computed with no mask arithmetic, PARTIAL ones with the mask applied, EMPTY ones never read;
- the mask of the PARTIAL tiles: each row's key interval where the mask has one
  (`Mask.row_ranges`: causal at any alignment, sliding windows, prefix-LM, padding, documents in
  runs, and their `&`); document ids compared in the kernel where ids come back (`masks.documents`,
  with or without causal); for every other mask (`|`, `~`, dilated, global tokens, BigBird, a
  dense tensor, a FlexAttention BlockMask, your own function) a bitmask of the partial tiles,
  evaluated once on the device one band of query tiles at a time (never an Lq x Lk tensor);
- qkv's built-in score mods as kernel variants (`scores.kernel_terms`): ALiBi, a relative-position
  table (resolved per distance here, so the kernel gathers one value), an additive bias tensor,
  softcap last. Any other score_mod is refused, naming `tiled` (whose generic engine runs it
  on the GPU too); so are mod tensors that require grad.

Attention sinks are the front door's (`qkv.attention`): this backend returns the LSE, with its
gradient. `auto` prefers it on CUDA; on the CPU it runs only under Triton's interpreter
(TRITON_INTERPRET=1, the test suite) and only when named.
"""

from __future__ import annotations

import weakref
from dataclasses import replace

import torch

from qkv import masks as _masks
from qkv import scores as _scores
from qkv.backends.base import Backend, Call, Capabilities
from qkv.kernels import gpu as _gpu

__all__ = ["TritonBackend", "plan", "MAX_HEAD_DIM", "piece_forward", "piece_backward", "registry_refusal"]

MAX_HEAD_DIM = 256
_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # BlockMask -> {key: Plan}
_UNMASKED: dict = {}                                               # (shape, tiles, device) -> Plan of a call without a mask
_UNMASKED_SIZE = 16
_BITS_ELEMENTS = 1 << 24                                           # mask elements evaluated at once


def _kernels():
    from qkv.kernels.gpu import attention   # imports Triton: only when a kernel first runs

    return attention


def _lists(kind: torch.Tensor, want: int):
    """(count (.., n), indices (.., n, m)) int32 of the tiles of kind `want` along the last axis, ascending."""
    hit = kind == want
    cnt = hit.sum(-1, dtype=torch.int32)
    idx = torch.sort((~hit).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return cnt.contiguous(), idx.contiguous()


def _row_mask(call: Call, kern):
    """(kind, lo, hi, ids) of the partial tiles' mask, or None where it takes a bitmask."""
    q_pos = call.q_offset + torch.arange(call.Lq, device=call.device)
    ranges = call.mask.row_ranges(q_pos, call.Lk)
    if ranges is not None:
        lo, hi = ranges
        return kern.MASK_RANGES, lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous(), None
    docs = _masks.documents(call.mask)
    if docs is None:
        return None
    ids, causal = docs
    ids = ids.to(device=call.device, dtype=torch.int32).contiguous()
    if not causal:
        return kern.MASK_IDS, None, None, ids
    lo = torch.zeros(1, call.Lq, dtype=torch.int32, device=call.device)
    return kern.MASK_IDS | kern.MASK_RANGES, lo, (q_pos + 1).to(torch.int32)[None].contiguous(), ids


def _bits(call: Call, kind: torch.Tensor, bq: int, bk: int):
    """(slot (B', H', nQ, nK) int32, bits (NP, bq, bk / 32) int32): the mask of each PARTIAL tile,
    bit c of word w of row r = may row r attend key 32 w + c. Evaluated a band of query tiles at a time."""
    Bp, Hp, nQ, nK = kind.shape
    part = kind == _masks.PARTIAL
    n_part = int(part.sum())
    slot = torch.full(part.shape, -1, dtype=torch.int32, device=call.device)
    slot[part] = torch.arange(n_part, dtype=torch.int32, device=call.device)
    bits = torch.zeros(max(n_part, 1), bq, bk // 32, dtype=torch.int32, device=call.device)
    shifts = torch.arange(32, device=call.device, dtype=torch.int64)
    band = max(1, _BITS_ELEMENTS // max(1, Bp * Hp * bq * nK * bk))          # query tiles per band
    for t0 in range(0, nQ, band):
        t1 = min(nQ, t0 + band)
        sel = part[:, :, t0:t1]
        if not bool(sel.any()):
            continue
        rows = call.q_offset + torch.arange(t0 * bq, min(t1 * bq, call.Lq), device=call.device)
        dense = _masks.check_bool(call.mask(*_masks.broadcast_indices(Bp, Hp, rows, call.Lk, rows)), call.mask, rows)
        while dense.dim() < 4:
            dense = dense.unsqueeze(0)
        dense = dense.expand(Bp, Hp, len(rows), call.Lk)
        padded = torch.zeros(Bp, Hp, (t1 - t0) * bq, nK * bk, dtype=torch.bool, device=call.device)
        padded[:, :, :len(rows), :call.Lk] = dense
        tiles = padded.view(Bp, Hp, t1 - t0, bq, nK, bk).permute(0, 1, 2, 4, 3, 5)   # (B', H', t, nK, bq, bk)
        words = tiles[sel].reshape(-1, bq, bk // 32, 32).to(torch.int64) << shifts      # (n, bq, W, 32)
        words = words.sum(-1)
        words = torch.where(words >= 1 << 31, words - (1 << 32), words)               # as int32 bits
        bits[slot[:, :, t0:t1][sel].long()] = words.to(torch.int32)
    return slot, bits


def _mods(call: Call) -> dict:
    """The score mods as the kernels' arguments (see `qkv.kernels.gpu.attention.Plan.mods`)."""
    kern, out = _kernels(), {}
    if call.score_mod is None:
        return out
    for term in _scores.kernel_terms(call.score_mod):
        name = term[0]
        if name == "alibi":
            kind = kern.ALIBI_SYMMETRIC if term[2] else kern.ALIBI_CAUSAL
            out["alibi"] = (term[1].to(device=call.device, dtype=torch.float32).contiguous(), kind)
        elif name == "relative":
            table, bidirectional, max_distance = term[1:]
            dmin, dmax = -(call.q_offset + call.Lq - 1), call.Lk - 1 - call.q_offset
            dist = torch.arange(dmin, dmax + 1, device=call.device)
            bucket = _scores.t5_bucket(dist, bidirectional=bidirectional, num_buckets=table.shape[0],
                                       max_distance=max_distance)
            per_dist = table.detach().to(call.device)[bucket].float().t().contiguous()   # (Hq, ND)
            out["rel"] = (per_dist, -dmin)
        elif name == "bias":
            t, offset = term[1].detach(), term[2]
            while t.dim() < 4:
                t = t[None]
            rows, cols = t.shape[-2:]
            row0 = (cols - rows if offset is None else offset) if rows > 1 else 0
            out["bias"] = (t.to(call.device), row0)
        else:
            out["softcap"] = term[1]
    return out


def _kernel_terms_refusal(call: Call) -> str | None:
    terms = _scores.kernel_terms(call.score_mod)
    if terms is None:
        return ("it applies qkv's built-in score mods (alibi, relative_bias, bias, softcap and chains of them) "
                "as kernel variants, not this score_mod; backend='tiled' runs any score_mod (on the GPU too)")
    names = [t[0] for t in terms]
    if "softcap" in names[:-1] or len(names) != len(set(names)):
        return ("it applies at most one of each built-in score mod, softcap last; backend='tiled' runs "
                "this chain")
    if torch.is_grad_enabled():
        held = [t[1] for t in terms if t[0] != "softcap"]
        if any(isinstance(x, torch.Tensor) and x.requires_grad for x in held):
            return "it has no gradient for score-mod tensors (requires_grad); backend='tiled' has"
    return None


def _whole(call: Call, bq: int, bk: int):
    """The (1, 1, nQ, nK) tile kinds of a call without a mask: every tile FULL."""
    nQ, nK = -(-call.Lq // bq), -(-call.Lk // bk)
    return torch.full((1, 1, nQ, nK), _masks.FULL, dtype=torch.int8, device=call.device)


def plan(call: Call, block_q: int, block_k: int, *, transposed: bool = False):
    """The kernels' `Plan` of `call` on (block_q x block_k) tiles; with `transposed` also the lists
    per key tile, for the backward. Cached with the mask's BlockMask (its mask data and bitmask too)."""
    kern = _kernels()
    if call.mask is None:
        kind, holder = _whole(call, block_q, block_k), None
    else:
        holder = call.mask.block_mask(call.Lq, call.Lk, block=(block_q, block_k), B=call.B, H=call.Hq,
                                      q_offset=call.q_offset, device=call.device)
        kind = holder.kind.to(call.device)
    key = (transposed, call.Lq, call.Lk, call.q_offset)
    if holder is None:                          # no mask: the lists depend on the shape alone
        cached = _UNMASKED.get((key, block_q, block_k, str(call.device)))
    else:
        cached = _PLANS.get(holder, {}).get(key)
    if cached is not None:
        return _with_mods(cached, call)
    full_cnt, full_idx = _lists(kind, _masks.FULL)
    part_cnt, part_idx = _lists(kind, _masks.PARTIAL)
    p = kern.Plan(block_q, block_k, full_cnt, full_idx, part_cnt, part_idx)
    if transposed:
        kt = kind.transpose(-1, -2)
        p.t_full_cnt, p.t_full_idx = _lists(kt, _masks.FULL)
        p.t_part_cnt, p.t_part_idx = _lists(kt, _masks.PARTIAL)
    if call.mask is not None and bool((kind == _masks.PARTIAL).any()):
        rows = _row_mask(call, kern)
        if rows is not None:
            p.mask_kind, p.lo, p.hi, p.ids = rows
        else:
            p.mask_kind = kern.MASK_BITS
            p.slot, p.bits = _bits(call, kind, block_q, block_k)
    if holder is not None:
        _PLANS.setdefault(holder, {})[key] = p
    else:
        if len(_UNMASKED) >= _UNMASKED_SIZE:
            _UNMASKED.pop(next(iter(_UNMASKED)))  # the oldest shape
        _UNMASKED[(key, block_q, block_k, str(call.device))] = p
    return _with_mods(p, call)


def _with_mods(p, call: Call):
    return replace(p, mods=_mods(call))


def _forward(call: Call, q, k, v):
    kern = _kernels()
    fcfg = kern.forward_config(call.D, call.dtype)
    # the G heads of a group share a program (block_m // G positions of each) unless the tiles differ by head
    fplan = plan(call, fcfg.block_m // call.G if call.G <= fcfg.block_m else fcfg.block_m, fcfg.block_n)
    if call.G > 1 and (fplan.per_head or call.G > fcfg.block_m):
        fplan = plan(call, fcfg.block_m, fcfg.block_n)
    return kern.forward(q, k, v, fplan, scale=call.scale, q_offset=call.q_offset, config=fcfg)


def _backward(call: Call, q, k, v, out, lse, dout, dlse):
    kern = _kernels()
    bcfg = kern.backward_config(call.D, call.dtype)
    bplan = plan(call, bcfg.block_m, bcfg.block_n, transposed=True)
    return kern.backward(q, k, v, out, lse, dout, dlse, bplan, scale=call.scale, q_offset=call.q_offset, config=bcfg)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, call):
        out, lse = _forward(call, q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call = call
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(ctx.call, q, k, v, out, lse, dout, dlse)
        return dq, dk, dv, None


# Pieces of longer rows (context parallelism, as `qkv.backends.tiled.piece_forward`): the backward
# kernel takes the merged rows' out, LSE and their gradients, so a piece's share of the gradients is
# one backward launch, with no recomputed forward and any gradient on the LSE.

def piece_forward(call: Call):
    """(out, lse) of one piece of longer rows from the kernels, without autograd; None where this
    backend refuses the call (not on CUDA or the interpreter, a score_mod it has no variant for)."""
    if registry_refusal(call) is not None:
        return None
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (call.q, call.k, call.v))
    with torch.no_grad():
        return _forward(call, q, k, v)


def piece_backward(call: Call, out, lse, dout, dlse=None):
    """(dq, dk, dv): this piece's share of the gradients of rows whose merged output and LSE are `out`
    and `lse`, given their gradients `dout` and `dlse` (None: none). None where `piece_forward` is."""
    if registry_refusal(call) is not None:
        return None
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (call.q, call.k, call.v))
    with torch.no_grad():
        return _backward(call, q, k, v, out.to(q.dtype).contiguous(), lse.float().contiguous(),
                         dout.to(q.dtype).contiguous(), None if dlse is None else dlse.float().contiguous())


def registry_refusal(call: Call) -> str | None:
    """Why this backend would refuse `call` (None: it serves it)."""
    return TritonBackend().refusal(call)


_CAPS = Capabilities(
    devices=("cuda",), dtypes=(torch.float32, torch.bfloat16, torch.float16), masks=True, score_mod=True,
    dropout=False, gqa=True, backward=True, return_lse=True, return_weights=False, exact=True, auto=True,
    sinks=True,
    notes="Triton kernels driven by the BlockMask (any mask, no compile per mask); qkv's built-in score mods; "
          "on the CPU only under Triton's interpreter (TRITON_INTERPRET=1)",
)
_CAPS_INTERPRETED = replace(_CAPS, devices=("cuda", "cpu"))


class TritonBackend(Backend):
    name = "triton"
    capabilities = _CAPS

    def refusal(self, call: Call) -> str | None:
        # the CPU is served only while Triton's interpreter is on (TRITON_INTERPRET=1, read per call);
        # the capability table keeps saying what users get: CUDA
        if call.device.type == "cpu" and _gpu.interpreting():
            return Backend.refusal(_Interpreted(), call)
        return super().refusal(call)

    def extra_refusal(self, call: Call) -> str | None:
        why = _gpu.why_not(call.device)
        if why is not None:
            return why
        if not 1 <= call.D <= MAX_HEAD_DIM or not 1 <= call.Dv <= MAX_HEAD_DIM:
            return f"its kernels take head dims 1 to {MAX_HEAD_DIM}, not D={call.D}, Dv={call.Dv}"
        if call.score_mod is not None:
            return _kernel_terms_refusal(call)
        return None

    def auto_refusal(self, call: Call) -> str | None:
        if call.device.type != "cuda":
            return "on the CPU its kernels run in Triton's interpreter, for tests"
        return None

    def forward(self, call: Call):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (call.q, call.k, call.v))
        out, lse = _Attention.apply(q, k, v, call)
        return out, lse, None


class _Interpreted(TritonBackend):
    """The same backend as the refusal sees it under Triton's interpreter: the CPU among its devices."""

    capabilities = _CAPS_INTERPRETED

    def refusal(self, call: Call) -> str | None:
        return Backend.refusal(self, call)
