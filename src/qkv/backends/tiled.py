"""The `tiled` backend: exact attention one query tile at a time, skipping what the mask rules out.

Legend: B batch, Hq query heads, Hkv key/value heads, G = Hq // Hkv, Lq/Lk lengths,
D head dim, Dv value dim, BQ/BK tile sizes, n keys a query tile attends to.

The L x L matrix is never built. The BlockMask says, for each (BQ x BK) tile,
whether it is EMPTY (skipped), FULL (computed without a mask) or PARTIAL (the
mask is evaluated on that tile only). For each query tile the non-empty key
tiles are gathered (a slice when they are contiguous, as for causal or sliding
windows), their scores computed in one matmul, the mask applied to the columns
of partial tiles, and the row softmax taken over those keys alone::

    query tile i:   keys  [ FULL FULL FULL PARTIAL . . . . ]   -> S_i (BQ x n), n << Lk
                    out_i = softmax(S_i) V_sel,  lse_i = logsumexp(S_i)

The backward recomputes each tile's scores and softmax from q and k
(FlashAttention's trick), so autograd stores q, k and v only: O(L) memory
instead of O(L^2). A tile holds every key its rows read, so its softmax is
whole, and the softmax's row term is summed over it (sum_j p_ij dp_ij) rather
than taken as dout . out, which cancels where a row's weight sits on one or
two keys. Tensors held by a score_mod (a learned relative bias, ALiBi slopes)
receive gradients too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from qkv.backends import registry
from qkv.backends.base import FLOATS, Backend, Call, Capabilities, memory_refusal
from qkv.masks import BLOCK_MASK_BYTES_PER_TILE, EMPTY, FULL, PARTIAL
from qkv.scores import unfound_grad_tensors

DEFAULT_BLOCK = (256, 256)  # measured: on 2 CPU cores 256-row tiles beat 128 by 1.3-1.5x at 16k
# Below this many query rows a call with sinks, which sdpa cannot serve, goes to `math` under auto
# (where it fits): a cached decode step with sinks (B = 8, 12 heads, 576 keys, ragged lengths, 2 CPU
# cores) took 5.5 ms here against math's 1.4 ms, the tile plan costing more than the scores.
SINK_DECODE_ROWS = 64


# ----------------------------------------------------------------------------
# The plan: which keys each query tile reads, and which of them need the mask
# ----------------------------------------------------------------------------

@dataclass
class TilePlan:
    """The work for one query tile (and one batch group)."""

    r0: int                         # query rows [r0, r1) of the call
    r1: int
    keys: slice | torch.Tensor      # key positions read: a slice if contiguous, else an index tensor
    n: int                          # how many keys
    partial: torch.Tensor | None    # local columns (into the gathered keys) that need the mask
    segments: list                  # [(k0, k1, is_partial)]: maximal runs of FULL or of PARTIAL tiles


def make_plan(call: Call, block=DEFAULT_BLOCK, tiles=None):
    """Plans per batch group: a list of (batch indices or None for all, {query tile: TilePlan}).

    `tiles` limits the plan to some query tiles (default: all)."""
    bq, bk = block
    Lq, Lk = call.Lq, call.Lk
    n_q, n_k = -(-Lq // bq), -(-Lk // bk)
    if call.mask is None:
        kind = torch.full((1, 1, n_q, n_k), FULL, dtype=torch.int8)
        bm = None
    else:
        bm = call.mask.block_mask(Lq, Lk, block=(bq, bk), B=call.B, H=call.Hq, q_offset=call.q_offset,
                                  device=torch.device("cpu"))
        kind = bm.kind
    # Heads are processed together: a tile is skipped only if it is empty for every head,
    # and unmasked only if it is full for every head.
    if kind.shape[1] > 1:
        all_empty = (kind == EMPTY).all(dim=1, keepdim=True)
        all_full = (kind == FULL).all(dim=1, keepdim=True)
        kind = torch.where(all_full, FULL, torch.where(all_empty, EMPTY, PARTIAL)).to(torch.int8)
    groups = []
    for g in range(kind.shape[0]):
        batches = None if kind.shape[0] == 1 else torch.tensor([g])
        wanted = range(n_q) if tiles is None else tiles
        groups.append((batches, {i: _row_plan(kind[g, 0, i], i, bq, bk, Lq, Lk) for i in wanted}))
    return groups, bm


def _row_plan(row: torch.Tensor, i: int, bq: int, bk: int, Lq: int, Lk: int) -> TilePlan:
    r0, r1 = i * bq, min(Lq, (i + 1) * bq)
    live = torch.nonzero(row != EMPTY).flatten()
    if live.numel() == 0:
        return TilePlan(r0, r1, slice(0, 0), 0, None, [])
    segments = []
    for j in live.tolist():
        k0, k1, part = j * bk, min(Lk, (j + 1) * bk), bool(row[j] == PARTIAL)
        if segments and segments[-1][1] == k0 and segments[-1][2] == part:
            segments[-1] = (segments[-1][0], k1, part)
        else:
            segments.append((k0, k1, part))
    j0, j1 = int(live[0]), int(live[-1]) + 1
    if live.numel() == j1 - j0:  # contiguous run of tiles: a slice, no copy
        k0, k1 = j0 * bk, min(Lk, j1 * bk)
        keys, n = slice(k0, k1), k1 - k0
        starts = (torch.arange(j0, j1) * bk - k0)
        partial_tiles = row[j0:j1] == PARTIAL
    else:
        ranges = [torch.arange(int(j) * bk, min(Lk, (int(j) + 1) * bk)) for j in live]
        keys = torch.cat(ranges)
        n = keys.numel()
        lengths = torch.tensor([len(r) for r in ranges])
        starts = torch.cumsum(lengths, 0) - lengths
        partial_tiles = row[live] == PARTIAL
    partial = None
    if bool(partial_tiles.any()):
        cols = [torch.arange(int(s), min(n, int(s) + bk)) for s, p in zip(starts, partial_tiles) if p]
        partial = torch.cat(cols)
    return TilePlan(r0, r1, keys, n, partial, segments)


# ----------------------------------------------------------------------------
# One tile's scores
# ----------------------------------------------------------------------------

def _select_keys(t: torch.Tensor, keys) -> torch.Tensor:
    """Rows of k or v (B, Hkv, Lk, *) at the plan's key positions."""
    if isinstance(keys, slice):
        return t[:, :, keys]
    return t.index_select(2, keys.to(t.device))


def _key_positions(keys, n: int, device) -> torch.Tensor:
    if isinstance(keys, slice):
        return torch.arange(keys.start, keys.stop, device=device)
    return keys.to(device)


def _tile_indices(call: Call, plan: TilePlan, batches, device):
    """Broadcast (b, h, q_idx) index tensors of one query tile, for masks and score mods."""
    b = torch.arange(call.B, device=device) if batches is None else batches.to(device)
    h = torch.arange(call.Hq, device=device)
    q = call.q_offset + torch.arange(plan.r0, plan.r1, device=device)
    return b.view(-1, 1, 1, 1), h.view(1, -1, 1, 1), q.view(1, 1, -1, 1)


class _Tile:
    """Everything one (batch group, query tile) step needs, shared by forward and backward."""

    def __init__(self, call: Call, plan: TilePlan, batches, q, k, v, cdt):
        B, Hkv, G = q.shape[0], call.Hkv, call.G
        self.plan, self.batches, self.G = plan, batches, G
        rows = slice(plan.r0, plan.r1)
        self.bq = plan.r1 - plan.r0
        qt = q[:, :, rows]                                                   # (Bs, Hq, bq, D)
        self.q_rows = qt.reshape(B, Hkv, G * self.bq, qt.shape[-1]).to(cdt)  # (Bs, Hkv, G*bq, D)
        self.k = _select_keys(k, plan.keys).to(cdt)                          # (Bs, Hkv, n, D)
        self.v = _select_keys(v, plan.keys).to(cdt)                          # (Bs, Hkv, n, Dv)
        self.b_idx, self.h_idx, self.q_idx = _tile_indices(call, plan, batches, q.device)
        self.kv_idx = _key_positions(plan.keys, plan.n, q.device).view(1, 1, 1, -1)

    def raw_scores(self, call: Call) -> torch.Tensor:
        """q k^T * scale for the tile, (Bs, Hq, bq, n), formed in the statistics dtype (a
        half-precision product overflows fp16 past 65504 and rounds bf16 logits by whole units)."""
        sdt = call.stat_dtype
        s = torch.matmul(self.q_rows.to(sdt), self.k.to(sdt).transpose(-1, -2))  # (Bs, Hkv, G*bq, n)
        s = s.view(s.shape[0], call.Hq, self.bq, self.plan.n)                # (Bs, Hq, bq, n)
        return s * call.scale

    def modded(self, call: Call, s: torch.Tensor) -> torch.Tensor:
        if call.score_mod is None:
            return s
        out = call.score_mod(s, self.b_idx, self.h_idx, self.q_idx, self.kv_idx)
        if not isinstance(out, torch.Tensor) or out.shape != s.shape:
            raise ValueError(f"score_mod must return a tensor of the score's shape {tuple(s.shape)}")
        return out

    def masked(self, call: Call, s: torch.Tensor) -> torch.Tensor:
        """-inf where the mask forbids, evaluated on the partial tiles' columns only."""
        cols = self.plan.partial
        if cols is None:
            return s
        cols = cols.to(s.device)
        allowed = call.mask(self.b_idx, self.h_idx, self.q_idx, self.kv_idx[..., cols])
        if not isinstance(allowed, torch.Tensor):
            allowed = torch.as_tensor(allowed, device=s.device)
        sub = s.index_select(-1, cols).masked_fill(~allowed, float("-inf"))
        return s.index_copy(-1, cols, sub)

    def allowed(self, call: Call, shape) -> torch.Tensor:
        """(Bs, Hq, bq, n) bool: which of the tile's keys each query row may attend."""
        allowed = torch.ones(shape, dtype=torch.bool, device=self.q_rows.device)
        cols = self.plan.partial
        if cols is not None:
            cols = cols.to(allowed.device)
            part = call.mask(self.b_idx, self.h_idx, self.q_idx, self.kv_idx[..., cols])
            if not isinstance(part, torch.Tensor):
                part = torch.as_tensor(part, device=allowed.device)
            allowed[..., cols] = part.expand(*shape[:-1], cols.numel())
        return allowed

    def fold(self, t: torch.Tensor) -> torch.Tensor:
        """(Bs, Hq, bq, X) -> (Bs, Hkv, G*bq, X): rows of the G query heads sharing a kv head."""
        return t.reshape(t.shape[0], -1, self.G * self.bq, t.shape[-1])

    def unfold(self, t: torch.Tensor, Hq: int) -> torch.Tensor:
        """(Bs, Hkv, G*bq, X) -> (Bs, Hq, bq, X)."""
        return t.reshape(t.shape[0], Hq, self.bq, t.shape[-1])


def _batch_view(t: torch.Tensor, batches):
    return t if batches is None else t.index_select(0, batches.to(t.device))


def _compute_dtype(call: Call):
    # On the CPU half-precision matmuls are emulated and slow: compute tiles in float32.
    return call.stat_dtype if call.device.type == "cpu" else call.dtype


def tiled_forward(call: Call, q, k, v, groups, careful: bool = False):
    """out (B, Hq, Lq, Dv) in q's dtype and lse (B, Hq, Lq) in the statistics dtype.

    `careful` (for inputs holding NaN or Inf, see `careful_forward`): a key a row may
    not attend never reaches it, not even as 0 * NaN, and a row whose query is not
    finite is NaN (zeros if it has no allowed key)."""
    out = q.new_zeros(call.B, call.Hq, call.Lq, call.Dv)
    lse = torch.full((call.B, call.Hq, call.Lq), float("-inf"), dtype=call.stat_dtype, device=q.device)
    cdt = _compute_dtype(call)
    for batches, plans in groups:
        qb, kb, vb = (_batch_view(t, batches) for t in (q, k, v))
        for plan in plans.values():
            if plan.n == 0:
                continue  # every key of this tile row is masked: zeros, lse -inf
            tile = _Tile(call, plan, batches, qb, kb, vb, cdt)
            s = tile.modded(call, tile.raw_scores(call))                      # (Bs, Hq, bq, n)
            if careful:
                q_bad = ~torch.isfinite(qb[:, :, plan.r0:plan.r1]).all(-1, keepdim=True)   # (Bs, Hq, bq, 1)
                s = s.masked_fill(q_bad, float("nan"))
            s = tile.masked(call, s)
            m = s.amax(dim=-1, keepdim=True)
            m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
            p = torch.exp(s - m)
            l = p.sum(dim=-1, keepdim=True)                                   # (Bs, Hq, bq, 1)
            if careful:
                allowed = tile.fold(tile.allowed(call, s.shape))              # (Bs, Hkv, G*bq, n)
                o = allowed_product(tile.fold(p.to(cdt)), allowed, tile.v)    # (Bs, Hkv, G*bq, Dv)
            else:
                o = torch.matmul(tile.fold(p.to(cdt)), tile.v)                # (Bs, Hkv, G*bq, Dv)
            o = tile.unfold(o, call.Hq) / torch.where(l == 0, torch.ones_like(l), l).to(cdt)
            rows = slice(plan.r0, plan.r1)
            row_lse = (m + torch.log(l)).squeeze(-1)
            if batches is None:
                out[:, :, rows] = o.to(out.dtype)
                lse[:, :, rows] = row_lse
            else:
                out[batches, :, rows] = o.to(out.dtype)
                lse[batches, :, rows] = row_lse
    return out, lse


def allowed_product(p: torch.Tensor, allowed: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """p @ v summed over the allowed keys only: p (..., R, n) >= 0 weights, allowed (..., R, n) bool, v (..., n, Dv).

    A plain matmul turns a NaN or Inf in v at a key a row may not attend into
    0 * NaN = NaN for that row. Here the finite part of v goes through the matmul
    and the non-finite entries are accounted for by counting, over allowed keys only,
    as IEEE arithmetic would: a NaN, or an Inf met with weight 0, gives NaN; +Inf and
    -Inf with positive weight give +Inf / -Inf (NaN when both meet)."""
    finite = torch.isfinite(v)
    if bool(finite.all()):
        return torch.matmul(p, v)
    out = torch.matmul(p, torch.where(finite, v, torch.zeros((), dtype=v.dtype, device=v.device)))
    a = allowed.to(p.dtype)
    pos = (p > 0).to(p.dtype)                          # p = NaN counts as zero weight: its row is NaN anyway
    n_nan = torch.matmul(a, torch.isnan(v).to(p.dtype)) + torch.matmul(a - pos, torch.isinf(v).to(p.dtype))
    n_pinf = torch.matmul(pos, (v == float("inf")).to(p.dtype))
    n_ninf = torch.matmul(pos, (v == float("-inf")).to(p.dtype))
    out = torch.where(n_pinf > 0, torch.full_like(out, float("inf")), out)
    out = torch.where(n_ninf > 0, torch.full_like(out, float("-inf")), out)
    return torch.where((n_nan > 0) | ((n_pinf > 0) & (n_ninf > 0)), torch.full_like(out, float("nan")), out)


def careful_forward(call: Call):
    """(out, lse, weights or None) of a call whose inputs hold NaN or Inf, forward only.

    The arithmetic is IEEE's over the keys each row may attend, and nothing else:
    a key the mask rules out for a row never reaches that row, whatever k and v hold
    there (a fused kernel adds the mask as -inf, and NaN - inf is NaN; any matmul
    multiplies the masked weight 0 by v's NaN). A row whose query is not finite is
    NaN, unless it has no allowed key (zeros). Runs the generic tiled engine."""
    groups, _ = make_plan(call, DEFAULT_BLOCK)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (call.q, call.k, call.v))
    with torch.no_grad():
        out, lse = tiled_forward(call, q, k, v, groups, careful=True)
        weights = weights_for_rows(call, lse, block=DEFAULT_BLOCK) if call.return_weights else None
    return out, lse, weights


def tiled_backward(call: Call, q, k, v, dout, groups, params, dlse=None):
    """Gradients of q, k, v (and of the score_mod's tensors), recomputing each tile.

    `dlse` is the gradient reaching the returned LSE (d lse_i / d s_ij = p_ij), if any.
    """
    cdt = _compute_dtype(call)
    dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
    dk = torch.zeros(k.shape, dtype=cdt, device=q.device)
    dv = torch.zeros(v.shape, dtype=cdt, device=q.device)
    # The score_mod's tensors (a learned bias table) gather gradient from every score of the
    # call; qkv's built-ins gather them in float64 below float64 scores (`scores._at_score`),
    # and the tiles' shares are summed here in float64 too.
    wide = bool(params) and call.stat_dtype != torch.float64
    dparams = [torch.zeros_like(p, dtype=torch.float64 if wide else p.dtype) for p in params]
    for batches, plans in groups:
        qb, kb, vb = (_batch_view(t, batches) for t in (q, k, v))
        for plan in plans.values():
            if plan.n == 0:
                continue
            tile = _Tile(call, plan, batches, qb, kb, vb, cdt)
            rows = slice(plan.r0, plan.r1)
            sel = (slice(None) if batches is None else batches, slice(None), rows)
            do = dout[sel].to(cdt)                                            # (Bs, Hq, bq, Dv)
            raw = tile.raw_scores(call)  # backward runs without grad recording
            s = raw
            if call.score_mod is not None:
                # re-run the score_mod on a leaf to get d(score)/d(raw) and d(score)/d(its tensors)
                raw = raw.requires_grad_()
                with torch.enable_grad():
                    s = tile.modded(call, raw)
            s_masked = tile.masked(call, s.detach())
            # P recomputed by torch's softmax over the tile's keys, not as exp(S - lse): the LSE
            # is rounded to the statistics dtype, and its weights sum to 1 only within
            # eps * |lse| per row. A tile holds every key its rows read, so the softmax is whole;
            # with torch's softmax and its backward kernel below, ds carries the rounding of
            # `math`'s autograd (in peaked float32 rows, other roundings of P and of the row
            # term were measured at 3-10x math's gradient error).
            p = torch.softmax(s_masked, dim=-1)                               # (Bs, Hq, bq, n)
            empty = torch.isneginf(s_masked.amax(dim=-1, keepdim=True))       # rows with no allowed key
            p = p.masked_fill(empty, 0.0)                                     # (softmax gives NaN there)
            do_rows = tile.fold(do)                                           # (Bs, Hkv, G*bq, Dv)
            p_rows = tile.fold(p.to(cdt))                                     # (Bs, Hkv, G*bq, n)
            dv_sel = torch.matmul(p_rows.transpose(-1, -2), do_rows)          # (Bs, Hkv, n, Dv)
            dp = tile.unfold(torch.matmul(do_rows, tile.v.transpose(-1, -2)), call.Hq)  # (Bs, Hq, bq, n)
            # ds = p (dp - delta) with the row term delta_i = sum_j p_ij dp_ij over this tile's
            # keys (every key the row reads), not dout . out: that form cancels catastrophically
            # where a row's weight sits on one or two keys (ds ~ 0 came out as eps * |dout . v|).
            dp = dp.to(p.dtype)
            ds = torch._softmax_backward_data(dp, p, -1, p.dtype)           # dL/d(modded score)
            if dlse is not None:
                ds = ds + p * dlse[sel].to(p.dtype).unsqueeze(-1)             # d lse_i / d s_ij = p_ij
            if call.score_mod is not None:
                wrt = [raw] + [prm for prm in params]
                grads = torch.autograd.grad(s, wrt, ds, allow_unused=True)
                ds = grads[0]
                for acc, g in zip(dparams, grads[1:]):
                    if g is not None:
                        acc += g
            ds_rows = tile.fold((ds * call.scale).to(cdt))                    # (Bs, Hkv, G*bq, n)
            dq_rows = torch.matmul(ds_rows, tile.k)                           # (Bs, Hkv, G*bq, D)
            dk_sel = torch.matmul(ds_rows.transpose(-1, -2), tile.q_rows)     # (Bs, Hkv, n, D)
            dq_t = tile.unfold(dq_rows, call.Hq)                              # (Bs, Hq, bq, D)
            if batches is None:
                dq[:, :, rows] += dq_t
                _scatter_add(dk, plan.keys, dk_sel)
                _scatter_add(dv, plan.keys, dv_sel)
            else:
                dq[batches, :, rows] += dq_t
                _scatter_add(dk, plan.keys, dk_sel, batches)
                _scatter_add(dv, plan.keys, dv_sel, batches)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), [d.to(prm.dtype) for d, prm in zip(dparams, params)]


def _scatter_add(acc: torch.Tensor, keys, val: torch.Tensor, batches=None) -> None:
    if batches is not None:
        b = int(batches[0])
        acc = acc[b:b + 1]
    if isinstance(keys, slice):
        acc[:, :, keys] += val
    else:
        acc.index_add_(2, keys.to(acc.device), val)


# ----------------------------------------------------------------------------
# The fused engine: torch's CPU flash kernel as the tile kernel
# ----------------------------------------------------------------------------
#
# On the CPU, torch ships a fused flash-attention kernel that also returns the
# LSE (and a backward that takes out and lse). qkv uses it as its inner kernel
# for each (query tile, run of key tiles): FULL runs go in without a mask,
# PARTIAL runs with a small additive mask for that block only, and the runs of
# one query tile are merged by their LSE. Because the backward kernel forms
# P = exp(S - lse) from the lse it is given, passing the *merged* out and lse
# gives each run its exact share of the gradient.

_FUSED_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FUSED_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def fused_applies(call: Call) -> bool:
    """The fused engine serves CPU calls without score_mod whose value dim equals the head dim,
    except calls that ask for the LSE or the weights below float64. Below float64 torch's CPU
    flash kernel computes exp with an approximation (about 20 correct bits; found by qkv
    selftest): the output, normalised by a sum of the same exps, stays within DESIGN.md's
    error rule, but the LSE carries the error (float32 up to ~3x further from the float64
    oracle than math's, bf16/fp16 inputs ~5e-5 off, 30x; the weights are recomputed from it).

    Float32 gradients keep the kernel, and with it the same approximation: its backward
    recomputes P = exp(S - lse), so in rare peaked rows they land up to ~18x further from
    the oracle than math's (about 1e-6 relative; RELIABILITY.md, known limitations). The
    generic engine (`qkv.backends.get("tiled").engine = "generic"`) meets the 3x rule there,
    at 1.6-3.5x the training time.
    """
    if _FUSED_FWD is None or call.device.type != "cpu" or call.score_mod is not None:
        return False
    if call.D != call.Dv or call.D == 0:
        return False
    if call.dtype == torch.float64:
        return True
    return not (call.return_lse or call.return_weights)


class _Rows:
    """A query tile's inputs laid out for the fused kernel (GQA heads folded into rows)."""

    def __init__(self, call: Call, plan: TilePlan, batches, q):
        self.G, self.bq = call.G, plan.r1 - plan.r0
        qt = q[:, :, plan.r0:plan.r1]                                            # (Bs, Hq, bq, D)
        self.q = qt.reshape(qt.shape[0], call.Hkv, self.G * self.bq, call.D)    # (Bs, Hkv, G*bq, D)
        self.b_idx, self.h_idx, self.q_idx = _tile_indices(call, plan, batches, q.device)

    def fold(self, t: torch.Tensor) -> torch.Tensor:
        """(Bs, Hq, bq, ...) -> (Bs, Hkv, G*bq, ...)."""
        return t.reshape(t.shape[0], -1, self.G * self.bq, *t.shape[3:])

    def bias(self, call: Call, k0: int, k1: int):
        """Additive mask (0 / -inf) for keys [k0, k1), folded like q, and the rows with no allowed key."""
        kv = torch.arange(k0, k1, device=self.q.device).view(1, 1, 1, -1)
        allowed = call.mask(self.b_idx, self.h_idx, self.q_idx, kv)
        if not isinstance(allowed, torch.Tensor):
            allowed = torch.as_tensor(allowed, device=self.q.device)
        while allowed.dim() < 4:
            allowed = allowed.unsqueeze(0)
        allowed = allowed.expand(allowed.shape[0], allowed.shape[1], self.bq, k1 - k0)
        if allowed.shape[1] == 1:
            allowed = allowed.repeat(1, 1, self.G, 1)                            # (b, 1, G*bq, n)
        else:
            allowed = self.fold(allowed)                                         # (b, Hkv, G*bq, n)
        bias = torch.zeros(allowed.shape, dtype=self.q.dtype, device=self.q.device)
        bias.masked_fill_(~allowed, float("-inf"))
        return bias, ~allowed.any(dim=-1)                                         # (b, H', G*bq)


def _merge(acc, o, lse):
    """Combine two partial softmax results over disjoint keys by their log-sum-exp."""
    if acc is None:
        return o, lse
    o0, lse0 = acc
    new = torch.logaddexp(lse0, lse)
    finite = torch.isfinite(new)
    w0 = torch.where(finite, torch.exp(lse0 - new), torch.zeros_like(new)).unsqueeze(-1)
    w1 = torch.where(finite, torch.exp(lse - new), torch.zeros_like(new)).unsqueeze(-1)
    return o0 * w0 + o * w1, new


def fused_forward(call: Call, q, k, v, groups):
    out = q.new_zeros(call.B, call.Hq, call.Lq, call.Dv)
    lse = torch.full((call.B, call.Hq, call.Lq), float("-inf"), dtype=call.stat_dtype, device=q.device)
    for batches, plans in groups:
        qb, kb, vb = (_batch_view(t, batches) for t in (q, k, v))
        b0 = 0 if batches is None else int(batches[0])
        out_b = out if batches is None else out[b0:b0 + 1]
        lse_b = lse if batches is None else lse[b0:b0 + 1]
        for plan in plans.values():
            if not plan.segments:
                continue
            rows = _Rows(call, plan, batches, qb)
            acc = None
            for k0, k1, partial in plan.segments:
                bias = empty = None
                if partial:
                    bias, empty = rows.bias(call, k0, k1)
                o, l = _FUSED_FWD(rows.q, kb[:, :, k0:k1], vb[:, :, k0:k1], 0.0, False,
                                  attn_mask=bias, scale=call.scale)              # (Bs, Hkv, G*bq, D), (Bs, Hkv, G*bq)
                l = l.to(call.stat_dtype)
                if empty is not None:  # the kernel reports lse 0 for rows it could not attend
                    l = l.masked_fill(empty.expand_as(l), float("-inf"))
                acc = _merge(acc, o.to(call.stat_dtype) if len(plan.segments) > 1 else o, l)
            o, l = acc
            Bs = o.shape[0]
            out_b[:, :, plan.r0:plan.r1] = o.reshape(Bs, call.Hq, rows.bq, call.Dv).to(out.dtype)
            lse_b[:, :, plan.r0:plan.r1] = l.reshape(Bs, call.Hq, rows.bq)
    return out, lse


def fused_backward(call: Call, q, k, v, out, lse, dout, groups):
    acc = call.stat_dtype  # sums over tiles in float32 even for half-precision inputs
    dq, dk, dv = (torch.zeros(t.shape, dtype=acc, device=t.device) for t in (q, k, v))
    # rows with no allowed key: lse = +inf makes the kernel's exp(S - lse) exactly 0
    lse_bw = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    for batches, plans in groups:
        qb, kb, vb = (_batch_view(t, batches) for t in (q, k, v))
        b0 = 0 if batches is None else int(batches[0])
        sl = slice(None) if batches is None else slice(b0, b0 + 1)
        for plan in plans.values():
            if not plan.segments:
                continue
            rows = _Rows(call, plan, batches, qb)
            r = slice(plan.r0, plan.r1)
            o_rows = rows.fold(out[sl, :, r]).contiguous()                         # (Bs, Hkv, G*bq, Dv)
            do_rows = rows.fold(dout[sl, :, r]).contiguous()
            l_rows = rows.fold(lse_bw[sl, :, r]).contiguous()                      # (Bs, Hkv, G*bq)
            dq_rows = torch.zeros(rows.q.shape, dtype=acc, device=q.device)
            for k0, k1, partial in plan.segments:
                bias = rows.bias(call, k0, k1)[0] if partial else None
                gq, gk, gv = _FUSED_BWD(do_rows, rows.q, kb[:, :, k0:k1], vb[:, :, k0:k1], o_rows, l_rows,
                                        0.0, False, attn_mask=bias, scale=call.scale)
                dq_rows += gq
                dk[sl, :, k0:k1] += gk
                dv[sl, :, k0:k1] += gv
            dq[sl, :, r] = dq_rows.reshape(dq_rows.shape[0], call.Hq, rows.bq, call.D)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ----------------------------------------------------------------------------
# Row runs: masks that allow each row one interval of keys
# ----------------------------------------------------------------------------
#
# Causal, sliding windows, documents, prefix-LM, padding and their `&` allow row r the keys
# lo(r) <= kv < hi(r) (`Mask.row_ranges`). Where lo and hi each step by 0 or 1 from row to
# row, a run of rows reads a FULL block of keys between at most two triangles, and torch's
# fused kernel computes each triangle with its own causal flag (it skips the blocks above the
# diagonal) -- on the rows and keys reversed for a window's lower edge:
#
#     rows a..b:  keys [ flipped triangle | FULL (no mask) | causal triangle ]
#                      (lo steps by 1)                       (hi steps by 1)
#
# so no mask is built or applied, no masked key is computed beyond the kernel's own blocks, and
# a run is many tiles tall (torch's kernel then takes 256-row query blocks). Measured, causal at
# 16k (H 8, D 64, fp32, 2 cores): runs of 2048 rows 0.96x the time of torch's own causal call,
# 1024 1.05x, 256 1.31x.

RUN_ROWS = 2048


@dataclass
class Run:
    """Rows [r0, r1) of one batch group and the key segments they read: (kind, k0, k1) with kind
    "full" (every row reads every key), "causal" (k1 - k0 == r1 - r0; row i reads keys up to
    k0 + i) or "flipped" (k1 - k0 == r1 - r0; row i reads keys from k0 + i)."""

    r0: int
    r1: int
    segments: list


def _segments(lo, hi, c0: int, c1: int, slope_lo: int, slope_hi: int):
    """The segments of rows [c0, c1) whose bounds step by slope_lo / slope_hi a row; [] when every
    row is empty, None when the rows do not split into triangles and a FULL block."""
    n = c1 - c0
    if n == 1:
        slope_lo = slope_hi = 0
    first, last = hi[c0] - lo[c0], hi[c1 - 1] - lo[c1 - 1]
    if first <= 0 and last <= 0:
        return []
    if first <= 0 or last <= 0:
        return None
    full0 = lo[c0] + n if slope_lo else lo[c0]
    full1 = hi[c0] - 1 if slope_hi else hi[c0]
    if full0 > full1:
        return None
    segments = [("flipped", lo[c0], lo[c0] + n)] if slope_lo else []
    if full1 > full0:
        segments.append(("full", full0, full1))
    if slope_hi:
        segments.append(("causal", hi[c0] - 1, hi[c0] - 1 + n))
    return segments


def _split(lo, hi, c0, c1, slope_lo, slope_hi, runs):
    segments = _segments(lo, hi, c0, c1, slope_lo, slope_hi)
    if segments is None:                                  # halve until it splits (one row always does)
        mid = (c0 + c1) // 2
        _split(lo, hi, c0, mid, slope_lo, slope_hi, runs)
        _split(lo, hi, mid, c1, slope_lo, slope_hi, runs)
    elif segments:
        runs.append(Run(c0, c1, segments))


def range_runs(lo: torch.Tensor, hi: torch.Tensor, rows: int = RUN_ROWS) -> list[Run]:
    """The runs of one batch group's rows, from its (Lq,) bounds: maximal stretches where lo and
    hi each step by a constant 0 or 1, cut into at most `rows` rows (a window's into fewer than
    its width, so that its FULL block and triangles do not overlap). Empty rows are left out."""
    Lq = lo.numel()
    if Lq == 0:
        return []
    if Lq > 1:
        dlo, dhi = lo[1:] - lo[:-1], hi[1:] - hi[:-1]
        ok = (dlo >= 0) & (dlo <= 1) & (dhi >= 0) & (dhi <= 1)
        code = torch.where(ok, dlo * 2 + dhi, torch.full_like(dlo, -1))
        change = torch.ones_like(ok)
        change[1:] = code[1:] != code[:-1]
        change |= code < 0
        starts = torch.nonzero(change).flatten().tolist() + [Lq - 1]
        codes = code.tolist()
    else:
        starts, codes = [0], []
    lo_l, hi_l = lo.tolist(), hi.tolist()
    runs: list[Run] = []
    a, s = 0, 0                                           # a: first row of the next run; s: index into starts
    while a < Lq:
        if a == Lq - 1 or codes[a] < 0:
            _split(lo_l, hi_l, a, a + 1, 0, 0, runs)
            a += 1
            continue
        while starts[s + 1] <= a:
            s += 1
        b = min(starts[s + 1] + 1, Lq)                       # the rows its transitions cover
        slope_lo, slope_hi = codes[a] // 2, codes[a] % 2
        size = rows
        if slope_lo and slope_hi:                          # a window: fewer rows than its width
            size = max(1, min(rows, hi_l[a] - lo_l[a] - 1))
        pieces = -(-(b - a) // size)
        size = -(-(b - a) // pieces)
        for c0 in range(a, b, size):
            _split(lo_l, hi_l, c0, min(b, c0 + size), slope_lo, slope_hi, runs)
        a = b
    return runs


def range_plan(call: Call, rows: int = RUN_ROWS):
    """[(batch indices or None for all, runs)] for a call whose mask has `row_ranges` (or no
    mask), else None."""
    q = call.q_offset + torch.arange(call.Lq)
    if call.mask is None:
        bounds = (torch.zeros(1, call.Lq, dtype=torch.long), torch.full((1, call.Lq), call.Lk, dtype=torch.long))
    else:
        bounds = call.mask.row_ranges(q, call.Lk)
        if bounds is None:
            return None
    lo, hi = (t.cpu() for t in bounds)
    if lo.shape[0] == 1:
        return [(None, range_runs(lo[0], hi[0], rows))]
    return [(torch.tensor([g]), range_runs(lo[g], hi[g], rows)) for g in range(lo.shape[0])]


def _merge_all(parts, stat_dtype):
    """One result from partial softmax results over disjoint keys, by their log-sum-exp."""
    if len(parts) == 1:
        o, lse = parts[0]
        return o, lse.to(stat_dtype)
    lses = torch.stack([lse.to(stat_dtype) for _, lse in parts])
    lse = torch.logsumexp(lses, dim=0)
    w = torch.exp(lses - lse).nan_to_num_(0.0).unsqueeze(-1)
    o = parts[0][0].to(stat_dtype) * w[0]
    for i in range(1, len(parts)):
        o += parts[i][0].to(stat_dtype) * w[i]
    return o, lse


class _RunTensors:
    """One run's rows for torch's fused kernel: folded (GQA heads into rows, against K/V as
    they are) for a FULL segment; per query head, against K/V expanded over the group (no
    copy), for a triangle, whose rows must stay in position order."""

    def __init__(self, call: Call, run: Run, Bs: int):
        self.call, self.run, self.Bs, self.n = call, run, Bs, run.r1 - run.r0

    def rows(self, t: torch.Tensor, triangle: bool, flip: bool) -> torch.Tensor:
        """(Bs, Hq, n, *) -> the kernel's layout."""
        c, n = self.call, self.n
        t = t[:, :, self.run.r0:self.run.r1]
        if triangle:
            t = t.reshape(self.Bs * c.Hkv, c.G, n, *t.shape[3:])
            return t.flip(2) if flip else t
        return t.reshape(self.Bs, c.Hkv, c.G * n, *t.shape[3:])

    def keys(self, t: torch.Tensor, k0: int, k1: int, triangle: bool, flip: bool) -> torch.Tensor:
        """(Bs, Hkv, Lk, *) -> keys [k0, k1) in the kernel's layout."""
        c = self.call
        t = t[:, :, k0:k1]
        if triangle:
            t = t.reshape(self.Bs * c.Hkv, 1, k1 - k0, *t.shape[3:])
            t = t.flip(2) if flip else t
            return t.expand(-1, c.G, *t.shape[2:])
        return t

    def back(self, t: torch.Tensor, triangle: bool, flip: bool) -> torch.Tensor:
        """The kernel's rows (out, lse, dq) -> (Bs, Hq, n, *)."""
        if triangle and flip:
            t = t.flip(2)
        return t.reshape(self.Bs, self.call.Hq, self.n, *t.shape[3:])

    def key_grad(self, g: torch.Tensor, triangle: bool, flip: bool) -> torch.Tensor:
        """A dk or dv from the kernel -> (Bs, Hkv, m, *) (a triangle's summed over its group)."""
        if triangle:
            g = g.sum(dim=1).reshape(self.Bs, self.call.Hkv, *g.shape[2:])
            return g.flip(2) if flip else g
        return g


def range_forward(call: Call, q, k, v, groups):
    out = q.new_zeros(call.B, call.Hq, call.Lq, call.Dv)
    lse = torch.full((call.B, call.Hq, call.Lq), float("-inf"), dtype=call.stat_dtype, device=q.device)
    for batches, runs in groups:
        qb, kb, vb = (_batch_view(t, batches) for t in (q, k, v))
        sl = slice(None) if batches is None else slice(int(batches[0]), int(batches[0]) + 1)
        for run in runs:
            rt = _RunTensors(call, run, qb.shape[0])
            parts = []
            for kind, k0, k1 in run.segments:
                tri, flip = kind != "full", kind == "flipped"
                o, l = _FUSED_FWD(rt.rows(qb, tri, flip), rt.keys(kb, k0, k1, tri, flip), rt.keys(vb, k0, k1, tri, flip),
                                  0.0, tri, scale=call.scale)[:2]
                parts.append((rt.back(o, tri, flip), rt.back(l.unsqueeze(-1), tri, flip).squeeze(-1)))
            o, l = _merge_all(parts, call.stat_dtype)
            out[sl, :, run.r0:run.r1] = o.to(out.dtype)
            lse[sl, :, run.r0:run.r1] = l
    return out, lse


def range_backward(call: Call, q, k, v, out, lse, dout, groups):
    acc = call.stat_dtype
    dq, dk, dv = (torch.zeros(t.shape, dtype=acc, device=t.device) for t in (q, k, v))
    for batches, runs in groups:
        qb, kb, vb, ob, db = (_batch_view(t, batches) for t in (q, k, v, out, dout))
        lb = _batch_view(lse, batches).unsqueeze(-1)
        sl = slice(None) if batches is None else slice(int(batches[0]), int(batches[0]) + 1)
        for run in runs:
            rt = _RunTensors(call, run, qb.shape[0])
            dq_rows = torch.zeros(rt.Bs, call.Hq, rt.n, call.D, dtype=acc, device=q.device)
            for kind, k0, k1 in run.segments:
                tri, flip = kind != "full", kind == "flipped"
                gq, gk, gv = _FUSED_BWD(rt.rows(db, tri, flip).contiguous(), rt.rows(qb, tri, flip),
                                        rt.keys(kb, k0, k1, tri, flip), rt.keys(vb, k0, k1, tri, flip),
                                        rt.rows(ob, tri, flip).contiguous(),
                                        rt.rows(lb, tri, flip).squeeze(-1).contiguous(), 0.0, tri, scale=call.scale)
                dq_rows += rt.back(gq, tri, flip)
                dk[sl, :, k0:k1] += rt.key_grad(gk, tri, flip)
                dv[sl, :, k0:k1] += rt.key_grad(gv, tri, flip)
            dq[sl, :, run.r0:run.r1] = dq_rows
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ----------------------------------------------------------------------------
# Pieces: one call's keys are part of longer rows (context parallelism)
# ----------------------------------------------------------------------------
#
# A caller that splits each row's keys into pieces (`qkv.distributed`'s ring: one piece per
# rank's shard) merges the pieces' outputs by their LSE, and differentiates the merged result:
# with P = exp(S - LSE) over the whole row and delta = rowsum(dO * O) of the merged O, a piece's
# share of the gradients is the flash backward of that piece given the merged O and LSE. torch's
# fused kernel takes O and LSE as inputs, so the share costs one backward, no recomputed forward.

def _piece_groups(call: Call):
    if _FUSED_FWD is None or call.device.type != "cpu" or call.score_mod is not None:
        return None, None
    if call.D != call.Dv or call.D == 0 or call.dropout_p:
        return None, None
    runs = TiledBackend.run_rows and call.scale >= 0
    groups = range_plan(call, TiledBackend.run_rows) if runs else None
    if groups is not None:
        return "ranges", groups
    return "fused", make_plan(call, TiledBackend.block)[0]


def piece_forward(call: Call):
    """(out, lse) of one piece of longer rows from torch's fused CPU kernel, without autograd; None
    where the kernel does not serve the call (score_mod, a GPU, Dv != D: run `qkv.attention`).

    The LSE carries the kernel's exp approximation (about 20 correct bits below float64,
    `fused_applies`); a caller uses it to weigh the pieces when it merges them."""
    engine, groups = _piece_groups(call)
    if engine is None:
        return None
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (call.q, call.k, call.v))
    with torch.no_grad():
        return (range_forward if engine == "ranges" else fused_forward)(call, q, k, v, groups)


def piece_backward(call: Call, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor):
    """(dq, dk, dv): this piece's share of the gradients of rows whose *merged* output and LSE
    (over all pieces) are `out` and `lse`, given d(out) = `dout` (and no gradient on the LSE),
    in the inputs' dtype. None where `piece_forward` is None."""
    engine, groups = _piece_groups(call)
    if engine is None:
        return None
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (call.q, call.k, call.v))
    out, dout = out.to(q.dtype).contiguous(), dout.to(q.dtype).contiguous()
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse).to(call.stat_dtype)
    with torch.no_grad():
        if engine == "ranges":
            return range_backward(call, q, k, v, out, lse, dout, groups)
        return fused_backward(call, q, k, v, out, lse, dout, groups)


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call, groups, engine, q, k, v, *params):
        ctx.fused, ctx.ranges = engine in ("fused", "ranges"), engine == "ranges"
        forward = range_forward if ctx.ranges else fused_forward if ctx.fused else tiled_forward
        out, lse = forward(call, q, k, v, groups)
        ctx.call, ctx.groups, ctx.n_params = call, groups, len(params)
        # the fused kernel's backward takes out and lse; the generic engine recomputes its tiles
        ctx.save_for_backward(q, k, v, *params, *((out, lse) if ctx.fused else ()))
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, *rest = ctx.saved_tensors
        params = rest[:ctx.n_params]
        if dlse is not None and bool((dlse != 0).any()):
            # the fused kernel's backward has no LSE input: the generic engine handles this case
            groups = make_plan(ctx.call, registry.get("tiled").block)[0] if ctx.ranges else ctx.groups
            dq, dk, dv, dparams = tiled_backward(ctx.call, q, k, v, dout, groups, params, dlse)
            return (None, None, None, dq, dk, dv, *dparams)
        if ctx.ranges:
            out, lse = rest[ctx.n_params:]
            dq, dk, dv = range_backward(ctx.call, q, k, v, out, lse, dout.contiguous(), ctx.groups)
            return (None, None, None, dq, dk, dv)
        if ctx.fused:
            out, lse = rest[ctx.n_params:]
            dq, dk, dv = fused_backward(ctx.call, q, k, v, out, lse, dout.contiguous(), ctx.groups)
            return (None, None, None, dq, dk, dv)
        dq, dk, dv, dparams = tiled_backward(ctx.call, q, k, v, dout, ctx.groups, params)
        return (None, None, None, dq, dk, dv, *dparams)


def score_mod_tensors(score_mod) -> list[torch.Tensor]:
    """Tensors requiring grad that a score_mod holds: attributes of qkv's built-ins
    (recursively through `chain` and the per-element wrapper of a plain function), and
    tensors a plain function captures in its closure or names from its module's globals
    (directly or as a module's parameters). These become inputs of the autograd function
    so that they receive gradients; `extra_refusal` refuses a mod that reads others."""
    found: list[torch.Tensor] = []
    seen: set[int] = set()

    def visit(obj, depth=0):
        if depth > 6 or id(obj) in seen:  # deep enough for a mod in a chain that calls a closure over a module
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.requires_grad:
                found.append(obj)
            return
        if isinstance(obj, (list, tuple)):
            for x in obj:
                visit(x, depth + 1)
            return
        if isinstance(obj, dict):
            for x in obj.values():
                visit(x, depth + 1)
            return
        if isinstance(obj, functools.partial):
            visit(obj.func, depth + 1)
            visit(obj.args, depth + 1)
            visit(obj.keywords, depth + 1)
            return
        if hasattr(obj, "__self__") and hasattr(obj, "__func__"):  # a bound method: its object and function
            visit(obj.__self__, depth + 1)
            visit(obj.__func__, depth + 1)
            return
        if isinstance(obj, torch.nn.Module):
            for prm in obj.parameters():
                visit(prm, depth + 1)
            return
        code = getattr(obj, "__code__", None)
        if code is not None:  # a plain function: tensors and modules it names from its module's globals
            glb = getattr(obj, "__globals__", {})
            for name in code.co_names:
                if isinstance(glb.get(name), (torch.Tensor, torch.nn.Module)):
                    visit(glb[name], depth + 1)
        closure = getattr(obj, "__closure__", None)
        if closure:
            for cell in closure:
                try:
                    visit(cell.cell_contents, depth + 1)
                except ValueError:  # empty cell
                    pass
        if hasattr(obj, "__dict__") and not isinstance(obj, type):
            for x in vars(obj).values():
                visit(x, depth + 1)

    if score_mod is not None:
        visit(score_mod)
    return found


def weights_for_rows(call: Call, lse: torch.Tensor | None, rows: torch.Tensor | None = None,
                     block=DEFAULT_BLOCK, row_lse: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax weights (B, Hq, len(rows), Lk) recomputed tile by tile.

    Only the query tiles holding the requested rows are computed, so asking for a
    few rows of a very long sequence costs a few tiles' work and rows x Lk memory.
    A tile row holds every live key of its rows, so each row is normalised by its own
    sum, as `math` does. `lse` (the forward's) is not needed: exp(S - lse) would carry
    the LSE's rounding, eps * |lse|, into every weight (up to ~4x further from the
    float64 oracle than math's weights, found by qkv selftest).

    `row_lse` (B, Hq, len(rows)), if given, receives each row's log-sum-exp (-inf for a row
    with no allowed key): what `qkv.attention_weights` needs to apply sinks.
    """
    rows = torch.arange(call.Lq) if rows is None else torch.as_tensor(rows).cpu().long()
    out = torch.zeros(call.B, call.Hq, len(rows), call.Lk, dtype=call.stat_dtype, device=call.device)
    wanted = sorted(set((rows // block[0]).tolist()))
    groups, _ = make_plan(call, block, tiles=wanted)
    cdt = _compute_dtype(call)
    with torch.no_grad():
        for batches, plans in groups:
            qb, kb, vb = (_batch_view(t, batches) for t in (call.q, call.k, call.v))
            b0 = 0 if batches is None else int(batches[0])
            out_b = out if batches is None else out[b0:b0 + 1]                       # a view
            for i in wanted:
                plan = plans[i]
                if plan.n == 0:
                    continue  # fully masked rows keep weight 0
                tile = _Tile(call, plan, batches, qb, kb, vb, cdt)
                s = tile.masked(call, tile.modded(call, tile.raw_scores(call)))    # (Bs, Hq, bq, n)
                m = s.amax(dim=-1, keepdim=True)
                m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
                p = torch.exp(s - m)
                l = p.sum(dim=-1, keepdim=True)
                p = p / torch.where(l == 0, torch.ones_like(l), l)                 # rows with no allowed key: 0
                local = torch.nonzero((rows >= plan.r0) & (rows < plan.r1)).flatten().to(call.device)
                at = rows.to(call.device)[local] - plan.r0                         # (r,) rows within the tile
                picked = p.index_select(2, at)                                     # (Bs, Hq, r, n)
                if row_lse is not None:
                    lse_b = row_lse if batches is None else row_lse[b0:b0 + 1]     # a view
                    lse_b[:, :, local] = (m + torch.log(l)).squeeze(-1).index_select(2, at)
                full = picked.new_zeros(*picked.shape[:3], call.Lk)
                full.index_copy_(-1, _key_positions(plan.keys, plan.n, call.device), picked)
                out_b[:, :, local] = full
    return out


class TiledBackend(Backend):
    name = "tiled"
    capabilities = Capabilities(
        devices=("any",), dtypes=FLOATS, masks=True, score_mod=True, dropout=False, gqa=True,
        backward=True, return_lse=True, return_weights=True, exact=True, auto=True, sinks=True,
        notes="BlockMask-driven: skips EMPTY tiles, FULL tiles unmasked; O(L) memory, backward recomputes tiles",
    )
    block = DEFAULT_BLOCK
    #: "auto": torch's fused CPU kernel per tile run where it applies, else the generic engine;
    #: "generic": always the generic engine (pure torch ops; any device, score_mod, Dv != D)
    engine = "auto"
    #: rows per run where the fused kernel applies and the mask allows each row one interval of
    #: keys (`range_runs`); 0: tiles for every mask
    run_rows = RUN_ROWS

    def extra_refusal(self, call: Call) -> str | None:
        # the tile plan: one entry per (query tile, key tile), per batch / head when the mask
        # differs across them; classifying a mask's tiles peaks near 20 bytes a tile
        bq, bk = self.block
        tiles = -(-call.Lq // bq) * -(-call.Lk // bk)
        need = tiles  # without a mask: one int8 per tile
        if call.mask is not None:
            need = tiles * (call.mask.batch_hint or 1) * (call.mask.head_hint or 1) * BLOCK_MASK_BYTES_PER_TILE
        why = memory_refusal(call, need, "its tile plan",
                             "; larger tiles need less (qkv.backends.get('tiled').block = (1024, 1024))")
        if why is not None:
            return why
        if call.score_mod is not None and call.B * call.Hq * call.Lq * call.Lk > 0:
            # a tensor the score_mod takes gradients through but score_mod_tensors cannot find would
            # get none from the backward below: refuse (auto moves on to math, whose autograd sees all)
            unfound = unfound_grad_tensors(call.score_mod, score_mod_tensors(call.score_mod), q_pos=call.q_offset,
                                           dtype=call.stat_dtype, device=call.device)
            if unfound:
                return (f"its backward cannot find tensors requiring grad that the score_mod reads (shapes "
                        f"{', '.join(str(tuple(t.shape)) for t in unfound)}); capture them in the mod's closure, "
                        f"a functools.partial, an attribute or a module's parameters")
        if call.return_weights:
            need = call.B * call.Hq * call.Lq * call.Lk * (8 if call.stat_dtype == torch.float64 else 4)
            return memory_refusal(call, need, "the weights you asked for",
                                  "; ask for chosen rows with qkv.attention_weights(..., rows=...)")
        return None

    def auto_refusal(self, call: Call) -> str | None:
        if call.return_weights and registry.get("math").refusal(call) is None:
            return "the weights are materialised anyway: math computes them in one pass"
        if call.sinks is not None and call.Lq < SINK_DECODE_ROWS and registry.get("math").refusal(call) is None:
            return "a decode-sized call with sinks (sdpa has none): math's one pass costs less than a tile plan"
        return None

    def forward(self, call: Call):
        params = score_mod_tensors(call.score_mod)
        if self.engine not in ("auto", "generic"):
            raise ValueError(f"tiled engine must be 'auto' or 'generic', got {self.engine!r}")
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (call.q, call.k, call.v))
        # chosen here, not inside the autograd Function, where grad mode is off (fused_applies asks)
        engine = "fused" if self.engine == "auto" and fused_applies(call) else "generic"
        # torch's CPU kernel returns NaN rows for is_causal=True with a negative scale (torch 2.13)
        runs = engine == "fused" and self.run_rows and call.scale >= 0
        groups = range_plan(call, self.run_rows) if runs else None
        if groups is not None:
            engine = "ranges"                              # rows in runs: no BlockMask needed
        else:
            groups, _ = make_plan(call, self.block)
        out, lse = _TiledAttention.apply(call, groups, engine, q, k, v, *params)
        weights = weights_for_rows(call, lse.detach(), block=self.block) if call.return_weights else None
        return out, lse, weights


class CarefulBackend(Backend):
    """`careful_forward` as the dispatcher's hidden route for calls whose inputs hold NaN or Inf
    (`qkv.attention` recomputes such a call here; see `careful_forward`). Forward only."""

    name = "careful"
    capabilities = Capabilities(
        devices=("any",), dtypes=FLOATS, masks=True, score_mod=True, dropout=False, gqa=True,
        backward=False, return_lse=True, return_weights=True, exact=True, auto=False, sinks=True,
        notes="the tiled engine that never lets a masked key reach a row (non-finite inputs)",
    )

    def forward(self, call: Call):
        return careful_forward(call)
