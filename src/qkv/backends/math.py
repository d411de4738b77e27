"""The `math` backend: attention with the score matrix materialised, step by step.

Legend: B batch, Hq query heads, Hkv key/value heads, G = Hq // Hkv, Lq/Lk lengths,
D head dim, Dv value dim.

This is the readable backend: it follows the textbook formula line by line,
supports everything (any mask, any score_mod, dropout, GQA, weights, LSE,
autograd) and is the same-dtype baseline of the error-ratio tests. It costs
O(B * Hq * Lq * Lk) memory, which it checks before allocating.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qkv.backends.base import FLOATS, Backend, Call, Capabilities, memory_refusal
from qkv.masks import broadcast_indices, evaluate


def index_grids(call: Call):
    """Broadcast (b, h, q_idx, kv_idx) index tensors for mask and score functions."""
    q_pos = call.q_offset + torch.arange(call.Lq, device=call.device)
    return broadcast_indices(call.B, call.Hq, q_pos, call.Lk, q_pos)


def safe_softmax(scores: torch.Tensor):
    """Row softmax that gives all-zero weights (and LSE = -inf) for rows with no finite score.

    Returns (weights, lse). The row max is detached: softmax does not depend on it.
    """
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    p = torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    weights = p / torch.where(denom == 0, torch.ones_like(denom), denom)
    lse = (row_max + torch.log(denom)).squeeze(-1)  # log(0) = -inf for empty rows
    return weights, lse


def scores_bytes(call: Call) -> int:
    """Bytes the materialised path holds at its peak: scores, weights and the mask."""
    elems = call.B * call.Hq * call.Lq * call.Lk
    stat = 8 if call.stat_dtype == torch.float64 else 4
    return elems * (3 * stat + 1)


class MathBackend(Backend):
    name = "math"
    capabilities = Capabilities(
        devices=("any",), dtypes=FLOATS, masks=True, score_mod=True, dropout=True, gqa=True,
        backward=True, return_lse=True, return_weights=True, exact=True, auto=True, sinks=True,
        notes="materialises the (B, Hq, Lq, Lk) scores; refuses calls that would not fit in memory",
    )

    def extra_refusal(self, call: Call) -> str | None:
        return memory_refusal(call, scores_bytes(call), "its score matrix")

    def forward(self, call: Call):
        q, k, v = call.q, call.k, call.v
        B, Hq, Hkv, G, Lq, Lk, D, Dv = call.B, call.Hq, call.Hkv, call.G, call.Lq, call.Lk, call.D, call.Dv

        # 1. raw scores Q K^T, formed in the statistics dtype (float32, or float64 for
        #    float64 inputs): a half-precision product would overflow fp16 (|q.k| > 65504)
        #    or round a large bf16 logit by whole units. GQA without repeating K/V: the G
        #    query heads sharing a key/value head are stacked along the row axis.
        sdt = call.stat_dtype
        q_rows = q.reshape(B, Hkv, G * Lq, D).to(sdt)                  # (B, Hkv, G*Lq, D)
        raw = torch.matmul(q_rows, k.to(sdt).transpose(-1, -2))         # (B, Hkv, G*Lq, Lk)
        raw = raw.view(B, Hq, Lq, Lk)                                   # (B, Hq, Lq, Lk)

        # 2. scale
        scores = raw * call.scale

        grids = index_grids(call) if (call.score_mod is not None or call.mask is not None) else None
        if call.score_mod is not None:
            scores = call.score_mod(scores, *grids)
            if not isinstance(scores, torch.Tensor) or scores.shape != (B, Hq, Lq, Lk):
                got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
                raise ValueError(f"score_mod must return a tensor of the score's shape {(B, Hq, Lq, Lk)}, got {got}")

        # 3. mask: disallowed pairs get -inf, so softmax gives them weight 0
        if call.mask is not None:
            allowed = evaluate(call.mask, B, Hq, Lq, Lk, q_offset=call.q_offset, device=call.device)
            scores = scores.masked_fill(~allowed, float("-inf"))

        # 4. softmax over keys (zeros for rows where nothing may be attended)
        weights, lse = safe_softmax(scores)
        if call.dropout_p > 0:
            weights = F.dropout(weights, p=call.dropout_p, training=True)

        # 5. weighted sum of values, back in the input dtype
        w_rows = weights.to(v.dtype).view(B, Hkv, G * Lq, Lk)           # (B, Hkv, G*Lq, Lk)
        out = torch.matmul(w_rows, v).view(B, Hq, Lq, Dv)               # (B, Hq, Lq, Dv)
        return out, lse, weights
