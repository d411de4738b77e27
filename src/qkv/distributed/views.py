"""A whole sequence's mask and score_mod, seen from one piece of queries and one piece of keys.

A rank attends its query piece to a key piece with local indices 0, 1, ...; the mask and the
score_mod were written for the whole sequence of length L. `PieceMask` and `PieceMod` map the
local indices to absolute positions (`Piece.absolute`) and heads to the whole set of heads
(`head_offset`, for the head-parallel strategy) before they ask the original, so every qkv
mask (built-in, combined, callable, Flex) and score mod keeps its meaning. The built-in masks
keep their tile knowledge: intervals of keys (`row_ranges`) shift with the piece, and tile
bounds are the whole sequence's when the key piece starts on a tile boundary.
"""

from __future__ import annotations

import torch

from qkv.masks import Mask, TileGrid, as_mask, bounds
from qkv.scores import ScoreMod, as_score_mod

from .layout import Piece

__all__ = ["PieceMask", "PieceMod", "whole"]


def whole(L: int) -> Piece:
    """The piece that is the whole sequence."""
    return Piece(0, 1, L, 0)


def _ceil_div(x: torch.Tensor, d: int) -> torch.Tensor:
    return -torch.div(-x, d, rounding_mode="floor")


class PieceMask(Mask):
    """`mask` of a sequence of length L, for queries `qp` and keys `kp` in local indices (call
    the attention with q_offset=0)."""

    def __init__(self, mask, qp: Piece, kp: Piece, L: int, head_offset: int = 0):
        self.mask, self.qp, self.kp, self.L, self.head_offset = as_mask(mask), qp, kp, L, head_offset
        self.analytic = self.mask.analytic

    def __call__(self, b, h, q_idx, kv_idx):
        h = h + self.head_offset if self.head_offset else h
        return self.mask(b, h, self.qp.absolute(q_idx), self.kp.absolute(kv_idx))

    def tile_bounds(self, grid: TileGrid):
        qp, kp = self.qp, self.kp
        if not self.mask.analytic or self.head_offset or qp.stride != 1 or kp.stride != 1:
            return None                      # evaluated tile by tile (`qkv.masks.bounds`)
        if kp.start % grid.block_k:
            return None
        outer = TileGrid(grid.B, grid.H, grid.Lq, self.L, qp.start + grid.q_offset, grid.block_q, grid.block_k,
                         grid.device)
        # the piece's tiles are whole-sequence tiles (its last one may be shorter: a bigger tile's
        # EMPTY and FULL still hold for it)
        j0 = kp.start // grid.block_k
        can, must = bounds(self.mask, outer)
        cut = [t if t.shape[-1] == 1 else t[..., j0:j0 + grid.n_k] for t in (can, must)]
        return cut[0], cut[1]

    def row_ranges(self, q, Lk: int):
        if self.head_offset and self.mask.head_hint not in (None, 1):
            return None
        got = self.mask.row_ranges(self.qp.absolute(q), self.L)
        if got is None:
            return None
        lo, hi = got
        k0, s = self.kp.start, self.kp.stride
        lo, hi = _ceil_div(lo - k0, s), _ceil_div(hi - k0, s)
        return lo.clamp(0, Lk), hi.clamp(0, Lk)

    def validate(self, B: int, H: int, Lq: int, Lk: int, q_offset: int) -> None:
        self.mask.validate(B, H + self.head_offset, self.L, self.L, 0)

    @property
    def batch_hint(self):
        return self.mask.batch_hint

    @property
    def head_hint(self):
        return None if self.head_offset else self.mask.head_hint   # a subset of the heads: no hint

    def __repr__(self):
        return f"{self.mask!r} at queries {self.qp.start}::{self.qp.stride}, keys {self.kp.start}::{self.kp.stride}"


class PieceMod(ScoreMod):
    """`score_mod` of a sequence of length L, for queries `qp`, keys `kp` (local indices) and
    heads from `head_offset` on."""

    def __init__(self, score_mod, qp: Piece, kp: Piece, L: int, head_offset: int = 0, heads: int | None = None):
        self.mod, self.qp, self.kp, self.L = as_score_mod(score_mod), qp, kp, L
        self.head_offset, self.heads = head_offset, heads

    def __call__(self, score, b, h, q_idx, kv_idx):
        h = h + self.head_offset if self.head_offset else h
        return self.mod(score, b, h, self.qp.absolute(q_idx), self.kp.absolute(kv_idx))

    def validate(self, B: int, H: int, Lq: int, Lk: int, q_offset: int) -> None:
        self.mod.validate(B, self.heads or H, self.L, self.L, 0)

    def __repr__(self):
        return f"{self.mod!r} at queries {self.qp.start}::{self.qp.stride}, keys {self.kp.start}::{self.kp.stride}"
