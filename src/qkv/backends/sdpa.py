"""The `sdpa` backend: torch's fused `scaled_dot_product_attention`, used whenever a call fits it.

Legend: B batch, Hq query heads, Hkv key/value heads, G = Hq // Hkv, Lq/Lk lengths, D head dim.

How a qkv call maps onto torch's kernel:

- no mask, or a mask that allows every pair (e.g. causal at a decode step) -> no mask;
- the built-in causal mask with queries starting at position 0 -> `is_causal=True`
  (torch aligns causal masks top-left, which is our alignment only when q_offset == 0);
- a mask that allows nothing -> zeros without calling torch;
- anything else -> the mask is evaluated to a dense bool tensor (Lq x Lk bytes per
  distinct batch/head) and passed as `attn_mask`.

GQA never repeats K/V: without a mask, the G query heads that share a key/value
head are stacked along the row axis; with a mask, each of the G groups is one call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qkv.backends import registry
from qkv.backends.base import FLOATS, Backend, Call, Capabilities, memory_refusal, zeros_output
from qkv.masks import FULL, EMPTY, TileGrid, bounds, evaluate
from qkv.masks import is_causal as is_causal_mask


def tiled_applies(call: Call) -> bool:
    return "tiled" in registry.names() and registry.get("tiled").refusal(call) is None


def _whole_matrix_kind(call: Call):
    """EMPTY / FULL / None(partial or unknown) for the whole Lq x Lk matrix, without evaluating it."""
    if not getattr(call.mask, "analytic", False):
        return None
    grid = TileGrid(call.B, call.Hq, call.Lq, call.Lk, call.q_offset, max(call.Lq, 1), max(call.Lk, 1), call.device)
    can, must = bounds(call.mask, grid)
    if bool(must.all()):
        return FULL
    if not bool(can.any()):
        return EMPTY
    return None


# `auto` hands a masked call to `tiled` when at most this fraction of (128 x 128) tiles has
# any allowed pair: sdpa then computes every score through a dense mask, tiled only the live
# tiles. benchmarks/bench_attention.py on a 2-core CPU (README): with prefix_lm(1024) at
# L = 16k (53% of tiles live) tiled took 3.4 s and sdpa with its dense mask 6.2 s; sdpa never
# skips a masked score, so tiled wins until nearly every tile is live.
TILED_DENSITY = 0.9
# Below this many query rows (KV-cache decode steps, short chunks) auto keeps sdpa whatever the
# mask: measured on a decode step (B = 8, 12 heads, 576 keys, ragged lengths) tiled took 13.8 ms
# against sdpa's 2.3 ms, and classifying the tiles alone cost more than sdpa's whole call.
TILED_MIN_ROWS = 64


def _needs_dense_mask(call: Call) -> bool:
    if call.mask is None:
        return False
    kind = _whole_matrix_kind(call)
    if kind in (FULL, EMPTY):
        return False
    return not (is_causal_mask(call.mask) and call.q_offset == 0)


class SDPABackend(Backend):
    name = "sdpa"
    capabilities = Capabilities(
        devices=("any",), dtypes=FLOATS, masks=True, score_mod=False, dropout=True, gqa=True,
        backward=True, return_lse=False, return_weights=False, exact=True, auto=True,
        notes="torch.nn.functional.scaled_dot_product_attention; masks other than causal are passed densely",
    )

    def extra_refusal(self, call: Call) -> str | None:
        if _needs_dense_mask(call):  # at most one byte per (b, h, q, kv)
            return memory_refusal(call, call.B * call.Hq * call.Lq * call.Lk, "its dense mask")
        return None

    def auto_refusal(self, call: Call) -> str | None:
        if call.Lq < TILED_MIN_ROWS:
            return None  # a decode-sized call: its dense mask is small and tiling has nothing to amortise
        if _needs_dense_mask(call) and tiled_applies(call):
            bm = call.mask.block_mask(call.Lq, call.Lk, block=128, B=call.B, H=call.Hq, q_offset=call.q_offset)
            density = 1.0 - bm.sparsity
            if density <= TILED_DENSITY:
                return f"only {density:.0%} of the tiles are live: tiled skips the rest"
        return None

    def forward(self, call: Call):
        q, k, v = call.q, call.k, call.v
        B, Hq, Hkv, G, Lq, Lk, D, Dv = call.B, call.Hq, call.Hkv, call.G, call.Lq, call.Lk, call.D, call.Dv
        kw = dict(dropout_p=call.dropout_p, scale=call.scale)

        mask, is_causal = call.mask, False
        if mask is not None:
            kind = _whole_matrix_kind(call)
            if kind == FULL:
                mask = None
            elif kind == EMPTY:
                return zeros_output(call), None, None  # nothing may be attended
            elif is_causal_mask(mask) and call.q_offset == 0:
                mask, is_causal = None, True
        if is_causal and call.scale < 0:
            # torch's CPU kernel returns NaN rows for is_causal=True with a negative scale
            # (torch 2.13); q k^T * scale = (-q) k^T * |scale| exactly, so hand it a positive one
            q, kw["scale"] = -q, -call.scale
        dense = None
        if mask is not None:
            dense = evaluate(mask, B, Hq, Lq, Lk, q_offset=call.q_offset, device=call.device)
            while dense.dim() < 4:
                dense = dense.unsqueeze(0)

        if G == 1:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, is_causal=is_causal, **kw)
        elif dense is None and not is_causal:
            # stack the G query heads of each kv head along rows: one call, no repeated K/V
            q_rows = q.reshape(B, Hkv, G * Lq, D)                           # (B, Hkv, G*Lq, D)
            out = F.scaled_dot_product_attention(q_rows, k, v, **kw)         # (B, Hkv, G*Lq, Dv)
            out = out.view(B, Hq, Lq, Dv)
        else:
            q_groups = q.view(B, Hkv, G, Lq, D)                              # head h = kv * G + g
            per_head = dense is not None and dense.shape[1] > 1
            if per_head:
                groups = dense.expand(-1, -1, Lq, Lk).unflatten(1, (Hkv, G))  # (B', Hkv, G, Lq, Lk)
            outs = []
            for g in range(G):
                m = groups[:, :, g] if per_head else dense
                outs.append(F.scaled_dot_product_attention(q_groups[:, :, g], k, v, attn_mask=m,
                                                           is_causal=is_causal, **kw))  # (B, Hkv, Lq, Dv)
            out = torch.stack(outs, dim=2).view(B, Hq, Lq, Dv)

        # torch's CPU kernel returns a finite row for a query holding NaN: qkv.attention sets
        # such rows to NaN for every backend (a row sum here would overflow fp16 and give NaN
        # for a finite query of large entries)
        if dense is not None:
            # torch's kernels differ across devices for rows with no allowed key; qkv defines them as 0
            empty_rows = ~dense.any(dim=-1, keepdim=True)
            if bool(empty_rows.any()):
                out = out.masked_fill(empty_rows, 0)
        return out, None, None
