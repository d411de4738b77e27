"""Head-parallel attention (the all-to-all strategy of DeepSpeed-Ulysses).

Legend: N ranks, r this rank, L = N Lr, Hq/Hkv heads (both divisible by N), h = H / N.

Each rank holds all heads of its rows. One all-to-all each for q, k and v gives every rank all
L rows of h heads (rank r: heads r h .. (r + 1) h - 1); it runs `qkv.attention` on them with the
whole sequence's mask, as one process would; one more all-to-all brings the output back to the
rows' owners. Four all-to-alls per forward (five with the LSE), the same in the backward: per
rank (N - 1) / N of (2 Hq + 2 Hkv) B Lr D elements each way, where the ring sends
(N - 1) 2 Hkv B Lr D. Nothing overlaps the computation, and nothing is skipped per shard: the
local call skips masked tiles itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qkv.attention import attention
from qkv.backends.base import check_sinks
from qkv.scores import as_score_mod

from .layout import group_rank, group_size, positions
from .ring import check_shards, whole_mask
from .transport import all_to_all
from .views import PieceMask, PieceMod, whole

__all__ = ["ulysses_attention"]


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0 (N equal parts); its adjoint is the same exchange."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_to_all(x, group, "forward")

    @staticmethod
    def backward(ctx, g):
        return all_to_all(g.contiguous(), ctx.group, "backward"), None


def _exchange(x: Tensor, group, size: int) -> Tensor:
    return _AllToAll.apply(x.contiguous(), group) if size > 1 else x


def _rank_major(L: int, layout: str, size: int, device) -> Tensor:
    return torch.cat([positions(layout, L, r, size, device=device) for r in range(size)])


def to_heads(x: Tensor, layout: str, group, size: int) -> Tensor:
    """(B, H, Lr, D) rows of every head -> (B, H / N, L, D): all rows of this rank's heads, in
    sequence order."""
    B, H, Lr, D = x.shape
    parts = x.reshape(B, size, H // size, Lr, D).transpose(0, 1)          # part p goes to rank p
    got = _exchange(parts, group, size)                                    # got[p]: rank p's rows
    seq = got.permute(1, 2, 0, 3, 4).reshape(B, H // size, size * Lr, D)   # rank after rank
    where = _rank_major(size * Lr, layout, size, x.device)
    inverse = torch.empty_like(where)
    inverse[where] = torch.arange(where.numel(), device=x.device)
    return seq.index_select(2, inverse)


def to_rows(y: Tensor, layout: str, group, size: int) -> Tensor:
    """(B, H / N, L, Dv) -> (B, H, Lr, Dv): this rank's rows of every head (inverse of `to_heads`)."""
    B, h, L, Dv = y.shape
    Lr = L // size
    seq = y.index_select(2, _rank_major(L, layout, size, y.device))
    parts = seq.reshape(B, h, size, Lr, Dv).permute(2, 0, 1, 3, 4)         # part p: rank p's rows
    got = _exchange(parts, group, size)                                    # got[p]: heads of rank p
    return got.permute(1, 0, 2, 3, 4).reshape(B, size * h, Lr, Dv)


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, *, mask=None, causal: bool = False, score_mod=None,
                      scale: float | None = None, sinks: Tensor | None = None, group=None, layout: str = "zigzag",
                      return_lse: bool = False, backend: str = "auto"):
    """`ring_attention`'s contract by all-to-all over heads: Hq and Hkv must divide by the group's size."""
    size, rank = group_size(group), group_rank(group)
    L = check_shards(q, k, v, layout, size, "head-parallel attention")
    B, Hq, _, _ = q.shape
    Hkv = k.shape[1]
    if Hq % size or Hkv % size:
        raise ValueError(f"head-parallel attention gives each of the {size} ranks an equal share of the heads; "
                         f"Hq={Hq} and Hkv={Hkv} must both be divisible by {size}: use ring_attention (any heads)")
    h, h0 = Hq // size, rank * (Hq // size)
    m = whole_mask(mask, causal, B, Hq, L)
    if m is not None and h0 and (m.head_hint not in (None, 1) or not m.analytic):
        m = PieceMask(m, whole(L), whole(L), L, head_offset=h0)          # the mask may read the head
    mod = None
    if score_mod is not None:
        base = as_score_mod(score_mod)
        base.validate(B, Hq, L, L, 0)
        mod = PieceMod(base, whole(L), whole(L), L, head_offset=h0, heads=Hq)
    sinks = check_sinks(sinks, Hq, q.device)
    local_sinks = None if sinks is None else sinks[h0:h0 + h]
    Q, K, V = (to_heads(t, layout, group, size) for t in (q, k, v))
    got = attention(Q, K, V, mask=m, score_mod=mod, scale=scale, sinks=local_sinks, q_offset=0,
                    return_lse=return_lse, backend=backend)
    if not return_lse:
        return to_rows(got, layout, group, size)
    out, lse = got
    return to_rows(out, layout, group, size), to_rows(lse.unsqueeze(-1), layout, group, size).squeeze(-1)
