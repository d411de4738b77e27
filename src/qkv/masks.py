"""Attention masks as composable functions, and the BlockMask that lets kernels skip work.

Legend: B batch, H query heads, Lq query length, Lk key length, q/kv absolute positions.

A *mask* answers "may query position `q` attend to key position `kv`?"::

    mask(b, h, q_idx, kv_idx) -> bool        # True = may attend

Two kinds of callable answer it, and qkv calls them differently:

- **Your own function** (a plain callable, as `torch.nn.attention.flex_attention` takes) has
  FlexAttention's contract: it is evaluated as if once per element, every argument a 0-d
  tensor (`qkv._util.mods` nests `torch.vmap` over the four axes, as FlexAttention does).
  So it may index a captured tensor one index at a time (`doc_ids[b][q_idx]`) and must
  use torch operations: no Python `if`/`and`/`or`/`in` on an index, no `.item()`, no
  NumPy. A function that cannot run so raises `ModError` (a ValueError) naming it and why.
  A FlexAttention `BlockMask` is accepted too (`as_mask`, `from_flex`), and any qkv mask
  becomes one without an Lq x Lk evaluation (`Mask.to_flex`).
- **qkv's masks** (the built-ins below, their `&`, `|`, `~`, and `Mask` subclasses of your
  own) are called once on broadcast index arrays, `b` of shape (B,1,1,1), `h` (1,H,1,1),
  `q_idx` (1,1,Lq,1), `kv_idx` (1,1,1,Lk) (or a tile of them), torch or NumPy.

Positions are absolute: when Lq != Lk the queries are the *last* Lq positions of the keys
(bottom-right alignment), so one decode step with a cache of 6 keys sees::

    causal, Lq = Lk = 4          causal, Lq = 2, Lk = 6 (q_pos = 4, 5)
        kv 0 1 2 3                   kv 0 1 2 3 4 5
    q 0    x . . .               q 4    x x x x x .
    q 1    x x . .               q 5    x x x x x x
    q 2    x x x .
    q 3    x x x x

Built-ins are small classes that also know, without looking at a single
element, which (BQ x BK) tiles of the Lq x Lk matrix are EMPTY (nothing may
attend: skipped), FULL (everything may attend: no mask applied) or PARTIAL
(the mask is applied). Combine masks with `&`, `|` and `~`; an arbitrary
callable is classified by evaluating it one row of tiles at a time, so no
path ever holds an Lq x Lk array except `to_dense` itself.

Built-in masks evaluate on torch tensors and on NumPy arrays alike (the
float64 oracle in `qkv.reference` uses NumPy; it evaluates your functions in torch).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from qkv._util import flex
from qkv._util.array import is_numpy, like, xp
from qkv._util.budget import require_memory
from qkv._util.mods import ModError, describe
from qkv._util.mods import evaluate as evaluate_per_element

__all__ = [
    "Mask", "BlockMask", "EMPTY", "PARTIAL", "FULL",
    "causal", "sliding_window", "prefix_lm", "document", "padding", "global_tokens",
    "dilated", "block_sparse", "from_dense", "from_flex", "as_mask", "evaluate", "ModError",
    "longformer", "bigbird", "dilated_window",
    "is_causal", "documents", "pick", "check_bool", "broadcast_indices",
]

EMPTY, PARTIAL, FULL = 0, 1, 2
_BLOCK_CACHE_SIZE = 16
_CHUNK_ELEMENTS = 1 << 24  # bound on elements evaluated at once when classifying callables
BLOCK_MASK_BYTES_PER_TILE = 24  # measured peak of block_mask for causal / sliding windows: 18-20 bytes a tile


# ----------------------------------------------------------------------------
# Tile geometry
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class TileGrid:
    """The tiles of one call: absolute query positions [q_offset, q_offset + Lq), keys [0, Lk).

    `qs`/`qe` (shape (nQ, 1)) and `ks`/`ke` (shape (1, nK)) are each tile's first
    position and one past its last, clipped to the sequence.
    """

    B: int
    H: int
    Lq: int
    Lk: int
    q_offset: int
    block_q: int
    block_k: int
    device: torch.device

    @property
    def n_q(self) -> int:
        return -(-self.Lq // self.block_q)

    @property
    def n_k(self) -> int:
        return -(-self.Lk // self.block_k)

    def q_tiles(self):
        start = self.q_offset + torch.arange(0, self.Lq, self.block_q, device=self.device)
        end = torch.clamp(start + self.block_q, max=self.q_offset + self.Lq)
        return start[:, None], end[:, None]  # (nQ, 1)

    def k_tiles(self):
        start = torch.arange(0, self.Lk, self.block_k, device=self.device)
        end = torch.clamp(start + self.block_k, max=self.Lk)
        return start[None, :], end[None, :]  # (1, nK)


def broadcast_indices(B, H, q_pos, Lk, like_arr):
    """Broadcast index arrays (b, h, q_idx, kv_idx) in torch or NumPy."""
    if is_numpy(like_arr):
        b = np.arange(B).reshape(B, 1, 1, 1)
        h = np.arange(H).reshape(1, H, 1, 1)
        q = np.asarray(q_pos).reshape(1, 1, -1, 1)
        kv = np.arange(Lk).reshape(1, 1, 1, Lk)
        return b, h, q, kv
    dev = like_arr.device
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    h = torch.arange(H, device=dev).view(1, H, 1, 1)
    q = q_pos.to(dev).view(1, 1, -1, 1)
    kv = torch.arange(Lk, device=dev).view(1, 1, 1, Lk)
    return b, h, q, kv


def evaluate(mask, B: int, H: int, Lq: int, Lk: int, *, q_offset: int | None = None,
             device=None, numpy: bool = False):
    """Evaluate `mask` on every (b, h, q, kv) of a call; returns a bool array broadcastable to (B, H, Lq, Lk).

    The result keeps size-1 dimensions where the mask does not depend on them
    (a causal mask is (1, 1, Lq, Lk)), so it costs Lq*Lk bytes, not B*H*Lq*Lk.
    """
    q_offset = Lk - Lq if q_offset is None else q_offset
    if numpy:
        q_pos = q_offset + np.arange(Lq)
        return check_bool(mask(*broadcast_indices(B, H, q_pos, Lk, q_pos)), mask, q_pos)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(mask, _FromDense) and mask.aligned(Lq, Lk, q_offset) and mask.t.device == dev:
        return mask.t                         # the tensor already is the answer (size-1 dims broadcast)
    q_pos = q_offset + torch.arange(Lq, device=dev)
    rows = max(1, _CHUNK_ELEMENTS // max(1, Lk))
    if Lq <= rows:
        return check_bool(mask(*broadcast_indices(B, H, q_pos, Lk, q_pos)), mask, q_pos)
    # Long sequences: evaluate a band of rows at a time into the bool result, so the
    # temporaries (int64 differences, comparisons) never reach Lq x Lk.
    out = None
    for r0 in range(0, Lq, rows):
        part = q_pos[r0:r0 + rows]
        m = check_bool(mask(*broadcast_indices(B, H, part, Lk, part)), mask, part)
        while m.dim() < 4:
            m = m.unsqueeze(0)
        if out is None:

            require_memory(dev, m.shape[0] * m.shape[1] * Lq * Lk, f"the dense mask ({Lq} x {Lk} booleans)",
                           "; qkv.attention never needs it (its tiled backend skips masked tiles)")
            out = torch.empty(m.shape[0], m.shape[1], Lq, Lk, dtype=torch.bool, device=dev)
        out[:, :, r0:r0 + len(part)] = m
    return out


def check_bool(out, mask, ref):
    if is_numpy(ref):
        out = np.asarray(out)
        if out.dtype != np.bool_:
            raise TypeError(f"mask {mask!r} returned dtype {out.dtype}; a mask must return booleans "
                            "(True = may attend). For additive biases use score_mod instead.")
        return out
    if not isinstance(out, torch.Tensor):
        out = torch.as_tensor(out, device=ref.device)
    if out.dtype != torch.bool:
        raise TypeError(f"mask {mask!r} returned dtype {out.dtype}; a mask must return booleans "
                        "(True = may attend). For additive biases use score_mod instead.")
    return out


# ----------------------------------------------------------------------------
# The Mask base class and combinators
# ----------------------------------------------------------------------------

class Mask:
    """A mask function with tile knowledge. Subclasses implement `__call__` on broadcast index
    arrays and, when they can, `tile_bounds`; combine with `&`, `|`, `~`."""

    #: called once on broadcast index arrays, not per element (`qkv._util.mods.broadcasts`)
    BROADCAST = True
    #: True when tile_bounds answers without evaluating elements (built-ins and their combinations)
    analytic = False

    def __call__(self, b, h, q_idx, kv_idx):  # pragma: no cover - abstract
        raise NotImplementedError

    # -- tile classification -------------------------------------------------
    def tile_bounds(self, grid: TileGrid):
        """Return (can, must): bool tensors broadcastable to (B, H, nQ, nK).

        `can[t]` is False only if no element of tile t may attend (EMPTY);
        `must[t]` is True only if every element may attend (FULL). Returning
        None means "unknown": the tiles are then found by chunked evaluation.
        """
        return None

    def row_ranges(self, q, Lk: int):
        """(lo, hi): for masks that allow each query row one interval of keys, `lo <= kv < hi`
        whatever the head, the bounds for the query positions `q` (an int64 (Lq,) tensor) as
        int64 (B' in {1, B}, Lq) tensors, clamped to [0, Lk] (hi <= lo: no key). None for every
        other mask. Lets the tiled backend cut rows into runs whose keys are a FULL block between
        at most two triangles (see `qkv.backends.tiled.range_runs`)."""
        return None

    def validate(self, B: int, H: int, Lq: int, Lk: int, q_offset: int) -> None:
        """Raise ValueError if this mask cannot describe a call of this shape."""

    @property
    def batch_hint(self) -> int | None:
        return None

    @property
    def head_hint(self) -> int | None:
        return None

    # -- combinators --------------------------------------------------------
    def __and__(self, other):
        return _And(self, as_mask(other))

    def __rand__(self, other):
        return _And(as_mask(other), self)

    def __or__(self, other):
        return _Or(self, as_mask(other))

    def __ror__(self, other):
        return _Or(as_mask(other), self)

    def __invert__(self):
        return _Not(self)

    # -- dense and block views ---------------------------------------------
    def to_dense(self, Lq: int, Lk: int, *, B: int | None = None, H: int | None = None,
                 q_offset: int | None = None, device=None) -> torch.Tensor:
        """The mask as a bool tensor of shape (B, H, Lq, Lk) (a broadcast view).

        B and H default to what the mask holds (e.g. `padding`'s batch size), else 1.
        An array that would not fit in memory is refused before it is allocated
        (`qkv.backends.MemoryNeedError`, stating the bytes it needs).
        """
        Lq, Lk = _check_int("Lq", Lq, 0), _check_int("Lk", Lk, 0)
        B = B if B is not None else (self.batch_hint or 1)
        H = H if H is not None else (self.head_hint or 1)
        q_offset = Lk - Lq if q_offset is None else q_offset
        self.validate(B, H, Lq, Lk, q_offset)
        dense = evaluate(self, B, H, Lq, Lk, q_offset=q_offset, device=device)
        return dense.expand(B, H, Lq, Lk)

    def block_mask(self, Lq: int, Lk: int, *, block: int | tuple[int, int] = 128, B: int | None = None,
                   H: int | None = None, q_offset: int | None = None, device=None) -> "BlockMask":
        """Classify every (block_q x block_k) tile as EMPTY / PARTIAL / FULL. Cached per shape."""
        Lq, Lk = _check_int("Lq", Lq, 0), _check_int("Lk", Lk, 0)
        if isinstance(block, (int, np.integer)) and not isinstance(block, bool):
            bq, bk = block, block
        elif isinstance(block, (tuple, list)) and len(block) == 2:
            bq, bk = block
        else:
            raise TypeError(f"block must be an int or a pair (block_q, block_k) of ints, got {block!r}")
        for name, b in (("block_q", bq), ("block_k", bk)):
            if isinstance(b, bool) or not isinstance(b, (int, np.integer)):
                raise TypeError(f"block sizes must be ints, got {name}={b!r}")
        if bq < 1 or bk < 1:
            raise ValueError(f"block sizes must be positive, got {(bq, bk)}")
        B = B if B is not None else (self.batch_hint or 1)
        H = H if H is not None else (self.head_hint or 1)
        q_offset = Lk - Lq if q_offset is None else q_offset
        dev = torch.device(device) if device is not None else torch.device("cpu")
        key = (B, H, Lq, Lk, bq, bk, q_offset, str(dev))
        cache = self.__dict__.setdefault("_block_cache", OrderedDict())
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        self.validate(B, H, Lq, Lk, q_offset)

        tiles = -(-Lq // bq) * -(-Lk // bk) * (self.batch_hint or 1) * (self.head_hint or 1)
        require_memory(dev, tiles * BLOCK_MASK_BYTES_PER_TILE, f"classifying {tiles} tiles",
                       "; larger blocks need fewer tiles")
        grid = TileGrid(B, H, Lq, Lk, q_offset, bq, bk, dev)
        can, must = bounds(self, grid)
        kind = torch.where(must, FULL, torch.where(can, PARTIAL, EMPTY)).to(torch.int8)
        kind = kind.expand(*kind.shape[:-2], grid.n_q, grid.n_k).contiguous()
        while kind.dim() < 4:
            kind = kind.unsqueeze(0)
        bm = BlockMask(kind, self, Lq, Lk, bq, bk, q_offset, B, H)
        cache[key] = bm
        if len(cache) > _BLOCK_CACHE_SIZE:
            cache.popitem(last=False)
        return bm

    def to_flex(self, B: int | None, H: int | None, Lq: int, Lk: int, *, block: int | tuple[int, int] = 128,
                q_offset: int | None = None, device=None):
        """This mask as a FlexAttention BlockMask for calls (B, H, Lq, Lk), as `create_block_mask` makes one.

        Its block tables are this mask's own tile kinds (`block_mask`: analytic for the built-ins,
        so nothing is evaluated per element), its mask_mod evaluates this mask. Flex numbers
        query rows from 0; they sit at `q_offset` (default `Lk - Lq`, qkv's bottom-right), so
        `flex_attention(q, k, v, block_mask=m.to_flex(B, H, Lq, Lk))` computes what
        `qkv.attention(q, k, v, mask=m)` does. B or H None: as `block_mask` (what the mask holds, else 1).
        """
        bm = self.block_mask(Lq, Lk, block=block, B=B, H=H, q_offset=q_offset, device=device)
        mask, offset = self, bm.q_offset

        def mask_mod(b, h, q_idx, kv_idx):
            return mask(b, h, q_idx + offset, kv_idx)

        mask_mod.__qualname__ = f"to_flex({self!r})"
        return flex.block_mask(bm.kind == PARTIAL, bm.kind == FULL, (bm.block_q, bm.block_k), (Lq, Lk), mask_mod)


def bounds(mask: Mask, grid: TileGrid):
    """(can, must) for `mask` on `grid`: analytic when the mask knows, else chunked evaluation."""
    if not isinstance(mask, Mask):
        mask = as_mask(mask)
    got = mask.tile_bounds(grid)
    if got is None:
        got = _chunked_bounds(mask, grid)
    return got


def _chunked_bounds(mask: Mask, grid: TileGrid):
    """Classify tiles of an arbitrary callable by evaluating a few rows of tiles at a time.

    Memory is O(rows * Lk) per chunk, never O(Lq * Lk).
    """
    nq, nk, bq, bk = grid.n_q, grid.n_k, grid.block_q, grid.block_k
    if nq == 0 or nk == 0:
        empty = torch.zeros(1, 1, nq, nk, dtype=torch.bool, device=grid.device)
        return empty, empty
    pad = nk * bk - grid.Lk
    tiles_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, grid.B * grid.H * bq * nk * bk))
    cans, musts = [], []
    for i0 in range(0, nq, tiles_per_chunk):
        i1 = min(nq, i0 + tiles_per_chunk)
        r0, r1 = i0 * bq, min(grid.Lq, i1 * bq)
        q_pos = grid.q_offset + torch.arange(r0, r1, device=grid.device)
        grids = broadcast_indices(grid.B, grid.H, q_pos, grid.Lk, q_pos)
        m = check_bool(mask(*grids), mask, q_pos)
        m = m.expand(*m.shape[:-2], r1 - r0, grid.Lk)
        while m.dim() < 4:
            m = m.unsqueeze(0)
        # Pad rows and columns to whole tiles: padding never makes a tile non-empty or non-full.
        rpad = (i1 - i0) * bq - (r1 - r0)
        m_can = F.pad(m, (0, pad, 0, rpad), value=False)
        m_must = F.pad(m, (0, pad, 0, rpad), value=True)
        # (B', H', rows, Lk) -> (B', H', tiles_q, bq, nK, bk): one entry per element of each tile
        shape = (*m.shape[:2], i1 - i0, bq, nk, bk)
        cans.append(m_can.reshape(shape).any(dim=5).any(dim=3))
        musts.append(m_must.reshape(shape).all(dim=5).all(dim=3))
    return torch.cat(cans, dim=2), torch.cat(musts, dim=2)


def pick(i, n):
    """Index array `i` reduced modulo a data dimension of size `n` (size 1 stays broadcastable)."""
    if n > 1:
        return i % n
    flat = i.reshape(-1)
    if flat.shape[0] == 0:       # an empty batch or head axis (B = 0, H = 0): keep it empty
        return i * 0
    return flat[:1].reshape((1,) * i.ndim) * 0


def _merge_hint(a, b):
    vals = [x for x in (a, b) if x is not None and x != 1]
    return max(vals) if vals else (a or b)


class _And(Mask):
    def __init__(self, a: Mask, b: Mask):
        self.a, self.b = a, b

    def __call__(self, b, h, q, kv):
        return self.a(b, h, q, kv) & self.b(b, h, q, kv)

    def tile_bounds(self, grid):
        ca, ma = bounds(self.a, grid)
        cb, mb = bounds(self.b, grid)
        # "can" is an upper bound (both must be non-empty); "must" is exact.
        return ca & cb, ma & mb

    def validate(self, *args):
        self.a.validate(*args)
        self.b.validate(*args)

    def row_ranges(self, q, Lk):
        if type(self) is not _And:               # _Or: a union of intervals is not one
            return None
        ra = self.a.row_ranges(q, Lk)
        rb = None if ra is None else self.b.row_ranges(q, Lk)
        if rb is None:
            return None
        return torch.maximum(ra[0], rb[0]), torch.minimum(ra[1], rb[1])

    analytic = property(lambda self: self.a.analytic and self.b.analytic)
    batch_hint = property(lambda self: _merge_hint(self.a.batch_hint, self.b.batch_hint))
    head_hint = property(lambda self: _merge_hint(self.a.head_hint, self.b.head_hint))

    def __repr__(self):
        return f"({self.a!r} & {self.b!r})"


class _Or(_And):
    def __call__(self, b, h, q, kv):
        return self.a(b, h, q, kv) | self.b(b, h, q, kv)

    def tile_bounds(self, grid):
        ca, ma = bounds(self.a, grid)
        cb, mb = bounds(self.b, grid)
        # "can" is exact; "must" is a lower bound (a tile may be full only jointly).
        return ca | cb, ma | mb

    def __repr__(self):
        return f"({self.a!r} | {self.b!r})"


class _Not(Mask):
    def __init__(self, a: Mask):
        self.a = a

    def __call__(self, b, h, q, kv):
        return ~self.a(b, h, q, kv)

    def tile_bounds(self, grid):
        ca, ma = bounds(self.a, grid)
        return ~ma, ~ca

    def validate(self, *args):
        self.a.validate(*args)

    analytic = property(lambda self: self.a.analytic)
    batch_hint = property(lambda self: self.a.batch_hint)
    head_hint = property(lambda self: self.a.head_hint)

    def __repr__(self):
        return f"~{self.a!r}"


class _Callable(Mask):
    """Wraps a user function `(b, h, q_idx, kv_idx) -> bool`, evaluated per element as FlexAttention
    evaluates a mask_mod (`qkv._util.mods`); tiles found by chunked evaluation."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, b, h, q, kv):
        return evaluate_per_element(self.fn, "mask_mod", (), (b, h, q, kv))

    def __repr__(self):
        return f"mask_mod({describe(self.fn)})"


def as_mask(obj) -> Mask:
    """A Mask from a Mask, a callable `(b, h, q_idx, kv_idx) -> bool` (FlexAttention's mask_mod, evaluated
    per element), a FlexAttention BlockMask (`from_flex`), or a bool tensor (`from_dense`)."""
    if isinstance(obj, Mask):
        return obj
    if isinstance(obj, torch.Tensor):
        return from_dense(obj)
    if flex.is_block_mask(obj):
        return from_flex(obj)
    if callable(obj):
        return _Callable(obj)
    raise TypeError(f"expected a qkv mask, a callable (b, h, q_idx, kv_idx) -> bool, a FlexAttention BlockMask "
                    f"or a bool tensor; got {type(obj).__name__}")


# ----------------------------------------------------------------------------
# Built-in masks
# ----------------------------------------------------------------------------

def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class _Causal(Mask):
    analytic = True

    def __call__(self, b, h, q, kv):
        return kv <= q

    def row_ranges(self, q, Lk):
        return _ranges(torch.zeros_like(q), q + 1, Lk)

    def tile_bounds(self, g):
        qs, qe = g.q_tiles()
        ks, ke = g.k_tiles()
        return ks <= qe - 1, ke - 1 <= qs

    def __repr__(self):
        return "causal()"


def _ranges(lo, hi, Lk: int):
    """(lo, hi) as (B', Lq) int64, clamped to [0, Lk]."""
    lo, hi = torch.broadcast_tensors(lo.long(), hi.long())
    if lo.dim() == 1:
        lo, hi = lo[None], hi[None]
    return lo.clamp(0, Lk), hi.clamp(0, Lk)


def causal() -> Mask:
    """Each query attends to its own position and earlier ones: `kv <= q`."""
    return _Causal()


def _distance_range(g):
    """Smallest and largest q - kv over each tile: (nQ, nK) tensors."""
    qs, qe = g.q_tiles()
    ks, ke = g.k_tiles()
    return qs - (ke - 1), (qe - 1) - ks


class _SlidingWindow(Mask):
    analytic = True

    def __init__(self, window: int, causal: bool):
        self.window, self.causal = window, causal

    def __call__(self, b, h, q, kv):
        d = q - kv
        if self.causal:
            return (d >= 0) & (d < self.window)
        return xp(d).abs(d) < self.window

    def row_ranges(self, q, Lk):
        return _ranges(q - self.window + 1, q + 1 if self.causal else q + self.window, Lk)

    def tile_bounds(self, g):
        dmin, dmax = _distance_range(g)
        lo, hi = (0 if self.causal else 1 - self.window), self.window - 1
        return (dmax >= lo) & (dmin <= hi), (dmin >= lo) & (dmax <= hi)

    def __repr__(self):
        return f"sliding_window({self.window}, causal={self.causal})"


def sliding_window(window: int, causal: bool = True) -> Mask:
    """Local attention over `window` keys.

    causal=True: `0 <= q - kv < window` (the query and the window-1 keys before it,
    as Mistral's sliding window). causal=False: `|q - kv| < window` (symmetric, 2*window-1 keys).
    """
    return _SlidingWindow(_check_int("window", window, 1), bool(causal))


class _Dilated(Mask):
    analytic = True

    def __init__(self, window: int, dilation: int, causal: bool):
        self.window, self.dilation, self.causal = window, dilation, causal

    def _allowed(self, d):
        span = (self.window - 1) * self.dilation
        return (d >= 0) & (d <= span) & (d % self.dilation == 0)

    def __call__(self, b, h, q, kv):
        d = q - kv
        return self._allowed(d) if self.causal else self._allowed(xp(d).abs(d))

    def _can(self, a, b):
        # some multiple of `dilation` lies in [a, b] intersected with [0, span]
        span = (self.window - 1) * self.dilation
        lo, hi = torch.clamp(a, min=0), torch.clamp(b, max=span)
        return (lo <= hi) & (torch.div(hi, self.dilation, rounding_mode="floor") * self.dilation >= lo)

    def tile_bounds(self, g):
        dmin, dmax = _distance_range(g)
        if self.causal:
            can = self._can(dmin, dmax)
            single = self._allowed(dmin)
            window_full = (dmin >= 0) & (dmax <= self.window - 1)
        else:
            can = self._can(dmin, dmax) | self._can(-dmax, -dmin)
            single = self._allowed(dmin.abs())
            window_full = (dmin >= 1 - self.window) & (dmax <= self.window - 1)
        if self.dilation == 1:
            return can, window_full
        return can, (dmin == dmax) & single

    def __repr__(self):
        return f"dilated({self.window}, {self.dilation}, causal={self.causal})"


def dilated(window: int, dilation: int, causal: bool = True) -> Mask:
    """A dilated window: `window` keys spaced `dilation` apart.

    causal=True: q - kv in {0, d, 2d, ..., (window-1)d}; causal=False: |q - kv| in that set.
    """
    return _Dilated(_check_int("window", window, 1), _check_int("dilation", dilation, 1), bool(causal))


class _PrefixLM(Mask):
    analytic = True

    def __init__(self, n: int):
        self.n = n

    def __call__(self, b, h, q, kv):
        return (kv < self.n) | (kv <= q)

    def row_ranges(self, q, Lk):
        return _ranges(torch.zeros_like(q), torch.clamp(q + 1, min=self.n), Lk)

    def tile_bounds(self, g):
        qs, qe = g.q_tiles()
        ks, ke = g.k_tiles()
        return (ks < self.n) | (ks <= qe - 1), (ke - 1 < self.n) | (ke - 1 <= qs)

    def __repr__(self):
        return f"prefix_lm({self.n})"


def prefix_lm(n: int) -> Mask:
    """Bidirectional over the first `n` positions (the prefix), causal after: `kv < n or kv <= q`."""
    return _PrefixLM(_check_int("n", n, 0))


def _as_index_tensor(name, data, ndim_allowed):
    t = torch.as_tensor(data)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must hold integers, got dtype {t.dtype}")
    if t.dim() not in ndim_allowed:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndim_allowed))} dimensions, got shape {tuple(t.shape)}")
    return t.long()


class _Document(Mask):
    analytic = True

    def __init__(self, ids: torch.Tensor):
        self.ids = ids if ids.dim() == 2 else ids[None]  # (B' in {1, B}, L)

    @property
    def batch_hint(self):
        return self.ids.shape[0] if self.ids.shape[0] > 1 else None

    def validate(self, B, H, Lq, Lk, q_offset):
        nb, L = self.ids.shape
        if nb not in (1, B):
            raise ValueError(f"document ids have batch size {nb} but the call has B={B}")
        hi = max(Lk, q_offset + Lq)
        if (Lq and q_offset < 0) or hi > L:
            raise ValueError(f"document ids cover positions [0, {L}) but the call needs "
                             f"[{min(0, q_offset)}, {hi}); pass one id per key position")

    def __call__(self, b, h, q, kv):
        ids = like(self.ids, q)
        bi = pick(b, ids.shape[0])
        return ids[bi, q] == ids[bi, kv]

    def row_ranges(self, q, Lk):
        # one interval per row only where every id is one run of positions
        ids = self.ids.to(q.device)
        if not len(q):
            return None
        if int(q.max()) >= ids.shape[1] or Lk > ids.shape[1]:
            return None
        ids = ids[:, :Lk]
        new = torch.ones_like(ids, dtype=torch.bool)
        new[:, 1:] = ids[:, 1:] != ids[:, :-1]                       # a run starts here
        for row, starts in zip(ids, new):
            if int(starts.sum()) != int(torch.unique(row).numel()):
                return None                                          # an id that comes back
        pos = torch.arange(Lk, device=q.device).expand_as(ids)
        start = torch.cummax(torch.where(new, pos, torch.zeros_like(pos)), dim=1).values
        end_new = torch.ones_like(new)
        end_new[:, :-1] = new[:, 1:]                                 # a run ends after here
        end = torch.flip(torch.cummin(torch.flip(torch.where(end_new, pos + 1, torch.full_like(pos, Lk)), [1]),
                                      dim=1).values, [1])
        return _ranges(start[:, q], end[:, q], Lk)

    def tile_bounds(self, g):
        ids = self.ids.to(g.device)
        if ids.shape[1] > 1 and not bool((ids[:, 1:] >= ids[:, :-1]).all()):
            return None  # unsorted ids: classify by evaluation
        qs, qe = g.q_tiles()
        ks, ke = g.k_tiles()
        # Sorted ids: a tile's ids span [ids[start], ids[end-1]] and every id in between that
        # occurs at all occurs inside the tile, so interval overlap is exact.
        qmin, qmax = ids[:, qs[:, 0]], ids[:, qe[:, 0] - 1]  # (B', nQ)
        kmin, kmax = ids[:, ks[0]], ids[:, ke[0] - 1]        # (B', nK)
        qmin, qmax = qmin[:, None, :, None], qmax[:, None, :, None]
        kmin, kmax = kmin[:, None, None, :], kmax[:, None, None, :]
        can = torch.maximum(qmin, kmin) <= torch.minimum(qmax, kmax)
        must = (qmin == qmax) & (kmin == kmax) & (qmin == kmin)
        return can, must

    def __repr__(self):
        return f"document(ids of shape {tuple(self.ids.shape)})"


def document(ids) -> Mask:
    """Packed sequences: a query attends only to keys of its own document, `ids[q] == ids[kv]`.

    `ids` is (L,) or (B, L), one document id per position (sorted ids give exact
    analytic tiles; unsorted ids are classified by evaluation). Combine with
    `causal()` for packed decoder training.
    """
    return _Document(_as_index_tensor("ids", ids, (1, 2)))


class _Padding(Mask):
    analytic = True

    def __init__(self, lengths: torch.Tensor):
        self.lengths = lengths

    @property
    def batch_hint(self):
        return self.lengths.shape[0]

    def validate(self, B, H, Lq, Lk, q_offset):
        if self.lengths.shape[0] != B:
            raise ValueError(f"padding lengths has {self.lengths.shape[0]} entries but the call has B={B}")

    def __call__(self, b, h, q, kv):
        return kv < like(self.lengths, q)[b]

    def row_ranges(self, q, Lk):
        n = self.lengths.to(q.device).view(-1, 1)
        return _ranges(torch.zeros_like(q)[None], n.expand(-1, q.shape[0]), Lk)

    def tile_bounds(self, g):
        ks, ke = g.k_tiles()
        n = self.lengths.to(g.device).view(-1, 1, 1, 1)
        return ks < n, ke - 1 < n

    def __repr__(self):
        return f"padding({self.lengths.tolist()})"


def padding(lengths) -> Mask:
    """Key padding: in batch row b only the first `lengths[b]` keys are real, `kv < lengths[b]`."""
    t = _as_index_tensor("lengths", lengths, (1,))
    if (t < 0).any():
        raise ValueError(f"padding lengths must be >= 0, got {t.tolist()}")
    return _Padding(t)


class _GlobalTokens(Mask):
    analytic = True

    def __init__(self, idx: torch.Tensor):
        self.idx = idx

    def __call__(self, b, h, q, kv):
        idx = like(self.idx, q)
        isin = xp(q).isin
        return isin(q, idx) | isin(kv, idx)

    def tile_bounds(self, g):
        idx = self.idx.to(g.device)
        qs, qe = g.q_tiles()
        ks, ke = g.k_tiles()
        n_q = ((idx[None, :] >= qs) & (idx[None, :] < qe)).sum(1, keepdim=True)        # (nQ, 1)
        n_k = ((idx[:, None] >= ks) & (idx[:, None] < ke)).sum(0, keepdim=True)        # (1, nK)
        # Exact: if neither every row nor every column is global, some element is masked.
        return (n_q > 0) | (n_k > 0), (n_q == qe - qs) | (n_k == ke - ks)

    def __repr__(self):
        return f"global_tokens({self.idx.tolist()})"


def global_tokens(idx) -> Mask:
    """Global positions attend everywhere and are attended by everyone: `q in idx or kv in idx`.

    Combine with a symmetric sliding window for Longformer-style attention.
    """
    t = _as_index_tensor("idx", idx, (1,))
    if (t < 0).any():
        raise ValueError(f"global token positions must be >= 0, got {t.tolist()}")
    return _GlobalTokens(torch.unique(t))


class _BlockSparse(Mask):
    analytic = True

    def __init__(self, layout: torch.Tensor, bq: int, bk: int):
        while layout.dim() < 4:
            layout = layout[None]
        self.layout, self.bq, self.bk = layout, bq, bk  # (B', H', nQb, nKb)

    batch_hint = property(lambda self: self.layout.shape[0] if self.layout.shape[0] > 1 else None)
    head_hint = property(lambda self: self.layout.shape[1] if self.layout.shape[1] > 1 else None)

    def validate(self, B, H, Lq, Lk, q_offset):
        nb, nh, nqb, nkb = self.layout.shape
        if nb not in (1, B) or nh not in (1, H):
            raise ValueError(f"block_sparse layout has shape {tuple(self.layout.shape)}; its batch and head "
                             f"dimensions must be 1 or the call's (B={B}, H={H})")
        if (Lq and q_offset < 0) or q_offset + Lq > nqb * self.bq or Lk > nkb * self.bk:
            raise ValueError(f"block_sparse layout covers {nqb * self.bq} query and {nkb * self.bk} key positions, "
                             f"but the call needs queries [{q_offset}, {q_offset + Lq}) and {Lk} keys")

    def __call__(self, b, h, q, kv):
        lay = like(self.layout, q)
        return lay[pick(b, lay.shape[0]), pick(h, lay.shape[1]), q // self.bq, kv // self.bk]

    def tile_bounds(self, g):
        lay = self.layout.to(g.device).long()
        # summed-area table: sat[..., i, j] = number of allowed blocks in [0, i) x [0, j)
        sat = F.pad(lay.cumsum(-2).cumsum(-1), (1, 0, 1, 0))
        qs, qe = g.q_tiles()
        ks, ke = g.k_tiles()
        q0, q1 = (qs // self.bq)[:, 0], ((qe - 1) // self.bq)[:, 0] + 1   # block rows [q0, q1) per tile
        k0, k1 = (ks // self.bk)[0], ((ke - 1) // self.bk)[0] + 1
        count = (sat[..., q1[:, None], k1] - sat[..., q0[:, None], k1]
                 - sat[..., q1[:, None], k0] + sat[..., q0[:, None], k0])
        area = (q1 - q0)[:, None] * (k1 - k0)[None, :]
        return count > 0, count == area

    def __repr__(self):
        return f"block_sparse(layout {tuple(self.layout.shape)}, block=({self.bq}, {self.bk}))"


def block_sparse(layout, block: int | tuple[int, int]) -> Mask:
    """A block-level pattern: `layout[..., q // bq, kv // bk]`.

    `layout` is a bool tensor (nQb, nKb), (H, nQb, nKb) or (B, H, nQb, nKb);
    `block` is an int or (bq, bk).
    """
    t = torch.as_tensor(layout)
    if t.dtype != torch.bool:
        raise TypeError(f"block_sparse layout must be a bool tensor, got dtype {t.dtype}")
    if not 2 <= t.dim() <= 4:
        raise ValueError(f"block_sparse layout must have 2 to 4 dimensions, got shape {tuple(t.shape)}")
    bq, bk = (block, block) if isinstance(block, (int, np.integer)) else tuple(block)
    return _BlockSparse(t, _check_int("block", bq, 1), _check_int("block", bk, 1))


# ----------------------------------------------------------------------------
# Sparse attention patterns from the literature, as one-line masks
# ----------------------------------------------------------------------------

_global_tokens = global_tokens  # `longformer` takes a parameter of that name


def longformer(window: int, global_tokens=()) -> Mask:
    """Longformer (Beltagy et al. 2020): a symmetric sliding window plus global tokens.

    Query q may attend to key kv when `|q - kv| < window` (2 * window - 1 keys;
    the paper's window w of w/2 keys each side is `window = w // 2 + 1`), or when
    q or kv is one of `global_tokens` (positions that attend everywhere and are
    attended by everyone). `& causal()` gives the decoder variant. Analytic tiles.
    """
    local = sliding_window(window, causal=False)
    if len(global_tokens) == 0:
        return local
    return local | _global_tokens(global_tokens)


def dilated_window(window: int, dilation: int, causal: bool = True) -> Mask:
    """Longformer's dilated sliding window: `window` keys spaced `dilation` apart (the `dilated` mask).

    causal=True: q - kv in {0, d, ..., (window-1)d}; causal=False: |q - kv| in that set.
    """
    return dilated(window, dilation, causal)


class _BigBird(Mask):
    analytic = True

    def __init__(self, block: int, window_blocks: int, global_blocks: int, random_blocks: int, seed: int,
                 length: int | None):
        self.block, self.window_blocks, self.global_blocks = block, window_blocks, global_blocks
        self.random_blocks, self.seed, self.length = random_blocks, seed, length
        self._layouts: dict[int, _BlockSparse] = {}
        self.random = None                      # (nb, nb) bool: the random blocks (length given only)
        if length is not None:
            nb = length // block
            self.random = self._random(nb, self._structured(torch.arange(nb)[:, None], torch.arange(nb)[None, :]))

    def _structured(self, qb, kb):
        """Window and global blocks, on block indices (torch or NumPy, broadcast)."""
        near = xp(qb).abs(qb - kb) <= self.window_blocks // 2
        if self.window_blocks == 0:
            near = near & False
        return near | (qb < self.global_blocks) | (kb < self.global_blocks)

    def _random(self, nb: int, structured: torch.Tensor) -> torch.Tensor:
        """Each non-global query block row gets `random_blocks` of the key blocks it does not yet see."""
        out = torch.zeros(nb, nb, dtype=torch.bool)
        g = torch.Generator().manual_seed(self.seed)
        for i in range(self.global_blocks, nb):
            free = torch.nonzero(~structured[i]).flatten()
            out[i, free[torch.randperm(free.numel(), generator=g)[:self.random_blocks]]] = True
        return out

    def validate(self, B, H, Lq, Lk, q_offset):
        bs = self.block
        if self.length is None:
            if Lk % bs:
                raise ValueError(f"bigbird block={bs} does not divide the key length {Lk}; pad the sequence to a "
                                 f"multiple of {bs} or choose a block size that divides it")
        elif Lk > self.length or q_offset + Lq > self.length:
            raise ValueError(f"this bigbird layout was built for length={self.length} but the call needs "
                             f"{max(Lk, q_offset + Lq)} positions; build it with a larger length")
        if Lq and q_offset < 0:
            raise ValueError(f"bigbird queries must sit at positions >= 0, got q_offset={q_offset}")

    def __call__(self, b, h, q, kv):
        qb, kb = q // self.block, kv // self.block
        out = self._structured(qb, kb)
        if self.random is not None:
            lay = like(self.random, q)
            nb = lay.shape[0]
            out = out | lay[xp(q).clip(qb, 0, nb - 1), xp(q).clip(kb, 0, nb - 1)]
        return out

    def tile_bounds(self, g):
        if self.length is not None:
            nb = self.length // self.block
        else:
            nb = -(-max(g.Lk, g.q_offset + g.Lq, 1) // self.block)
        if nb not in self._layouts:
            idx = torch.arange(nb)
            layout = self._structured(idx[:, None], idx[None, :])
            if self.random is not None:
                layout = layout | self.random
            self._layouts[nb] = _BlockSparse(layout, self.block, self.block)
        return self._layouts[nb].tile_bounds(g)

    def __repr__(self):
        return (f"bigbird(block={self.block}, window_blocks={self.window_blocks}, global_blocks={self.global_blocks}, "
                f"random_blocks={self.random_blocks}, seed={self.seed}, length={self.length})")


def bigbird(block: int, window_blocks: int = 3, global_blocks: int = 1, random_blocks: int = 0, seed: int = 0, *,
            length: int | None = None) -> Mask:
    """BigBird (Zaheer et al. 2020): block-sparse window + global + random blocks, on blocks of `block` positions.

    With block indices qb = q // block, kb = kv // block, q may attend to kv when
    - window: |qb - kb| <= window_blocks // 2 (window_blocks: 0 or an odd count, centred on qb);
    - global: qb < global_blocks or kb < global_blocks (the first blocks see and are seen by all);
    - random: kb is one of `random_blocks` key blocks drawn, seeded, for row qb among those it
      does not already see (global rows see everything already).

    Random blocks are drawn over a whole layout, so they need `length` (a multiple of
    `block`; calls may use any prefix of it, e.g. decode steps). Without random blocks
    `length` may be left out; then every call's key length must be a multiple of
    `block`. A block size that does not divide the length raises ValueError (here when
    `length` is given, else at the call). Analytic tiles: `tiled` skips the empty ones.
    """
    block = _check_int("block", block, 1)
    window_blocks = _check_int("window_blocks", window_blocks, 0)
    if window_blocks and window_blocks % 2 == 0:
        raise ValueError(f"window_blocks must be 0 or odd (the window is centred on the query's block), "
                         f"got {window_blocks}")
    global_blocks = _check_int("global_blocks", global_blocks, 0)
    random_blocks = _check_int("random_blocks", random_blocks, 0)
    seed = _check_int("seed", seed, 0)
    if length is not None:
        length = _check_int("length", length, 1)
        if length % block:
            raise ValueError(f"bigbird block={block} does not divide length={length}; pad the sequence to a "
                             f"multiple of {block} or choose a block size that divides it")
    elif random_blocks:
        raise ValueError("bigbird random blocks are drawn over the whole sequence: pass length= "
                         "(a multiple of block), or random_blocks=0")
    return _BigBird(block, window_blocks, global_blocks, random_blocks, seed, length)


class _FromDense(Mask):
    def __init__(self, t: torch.Tensor, q_offset: int | None):
        while t.dim() < 4:
            t = t[None]
        self.t, self.q_offset = t, q_offset  # (B', H', rows, cols)

    batch_hint = property(lambda self: self.t.shape[0] if self.t.shape[0] > 1 else None)
    head_hint = property(lambda self: self.t.shape[1] if self.t.shape[1] > 1 else None)

    def _offset(self):
        return self.t.shape[-1] - self.t.shape[-2] if self.q_offset is None else self.q_offset

    def validate(self, B, H, Lq, Lk, q_offset):
        nb, nh, rows, cols = self.t.shape
        if nb not in (1, B) or nh not in (1, H) or rows not in (1, Lq) or cols not in (1, Lk):
            raise ValueError(f"dense mask of shape {tuple(self.t.shape)} does not broadcast to "
                             f"(B, H, Lq, Lk) = ({B}, {H}, {Lq}, {Lk})")
        if self.q_offset is None and rows > 1 and cols != Lk:
            # the default row offset (bottom-right) is cols - rows, which is Lk - Lq only when
            # the tensor spans the keys: a tensor broadcast over keys would misplace its rows
            raise ValueError(f"dense mask of shape {tuple(self.t.shape)} is broadcast over the keys, so it "
                             f"cannot tell where its {rows} rows sit among the positions; pass "
                             f"from_dense(t, q_offset=...) (Lk - Lq = {Lk - Lq} for the last Lq positions)")

    def aligned(self, Lq, Lk, q_offset) -> bool:
        """Row r of the tensor is query row r of a call (Lq, Lk, q_offset): no index arithmetic needed."""
        rows, cols = self.t.shape[-2:]
        return rows in (1, Lq) and cols in (1, Lk) and (rows == 1 or self._offset() == q_offset)

    def tile_bounds(self, g):
        """Straight from the tensor when it lines up with the call; None (evaluate) otherwise."""
        if not self.aligned(g.Lq, g.Lk, g.q_offset):
            return None
        t = self.t.to(g.device).expand(*self.t.shape[:2], g.Lq, g.Lk)            # (B', H', Lq, Lk)
        nq, nk, bq, bk = g.n_q, g.n_k, g.block_q, g.block_k
        counts = F.pad(t.to(torch.int32), (0, nk * bk - g.Lk, 0, nq * bq - g.Lq))  # padding counts as masked
        counts = counts.reshape(*t.shape[:2], nq, bq, nk, bk).sum(dim=(3, 5))     # (B', H', nQ, nK) allowed pairs
        rows = torch.clamp(g.Lq - torch.arange(nq, device=g.device) * bq, max=bq)  # (nQ,) rows in each tile
        cols = torch.clamp(g.Lk - torch.arange(nk, device=g.device) * bk, max=bk)  # (nK,)
        return counts > 0, counts == rows[:, None] * cols[None, :]

    def __call__(self, b, h, q, kv):
        t = like(self.t, q)
        rows, cols = t.shape[-2:]
        row = q - self._offset() if rows > 1 else q * 0
        col = kv if cols > 1 else kv * 0
        ok = (row >= 0) & (row < rows) & (col < cols)
        row, col = xp(q).clip(row, 0, rows - 1), xp(q).clip(col, 0, cols - 1)
        return t[pick(b, t.shape[0]), pick(h, t.shape[1]), row, col] & ok

    def __repr__(self):
        return f"from_dense(shape {tuple(self.t.shape)})"


def from_dense(t, q_offset: int | None = None) -> Mask:
    """A mask from a bool tensor broadcastable to (B, H, Lq, Lk); True = may attend.

    Row r of `t` is query position `q_offset + r` (default: bottom-right, `Lk - Lq`).
    Tiles are classified by evaluation.
    """
    t = torch.as_tensor(t)
    if t.dtype != torch.bool:
        raise TypeError(f"a dense mask must be a bool tensor (True = may attend), got dtype {t.dtype}; "
                        "for an additive float mask use score_mod=qkv.scores.bias(t)")
    if not 2 <= t.dim() <= 4:
        raise ValueError(f"a dense mask must have 2 to 4 dimensions (..., Lq, Lk), got shape {tuple(t.shape)}")
    return _FromDense(t, q_offset)


class _Flex(Mask):
    """A FlexAttention BlockMask: its mask_mod (per element) on the blocks its tables list.

    Element (b, h, row, kv) may attend when its block is listed full, or listed partial and
    mask_mod(b, h, row, kv) is True (what the compiled FlexAttention computes; its eager path
    evaluates mask_mod everywhere, the same for tables made from the mask_mod). Row r is
    query position q_offset + r. Tiles come from the tables: analytic, nothing evaluated."""

    analytic = True

    def __init__(self, bm, q_offset: int | None):
        self.bm, self.fn = bm, bm.mask_mod
        self.Lq, self.Lk = (int(n) for n in bm.seq_lengths)
        self.q_offset = self.Lk - self.Lq if q_offset is None else q_offset
        partial, full, (bq, bk) = flex.selections(bm)                      # (B', H', nQ, nK) each
        self.live, self.full = _BlockSparse(partial | full, bq, bk), _BlockSparse(full, bq, bk)

    batch_hint = property(lambda self: self.live.batch_hint)
    head_hint = property(lambda self: self.live.head_hint)

    def validate(self, B, H, Lq, Lk, q_offset):
        if (Lq, Lk) != (self.Lq, self.Lk):
            raise ValueError(f"this FlexAttention BlockMask was made for (Lq, Lk) = ({self.Lq}, {self.Lk}) but the "
                             f"call has ({Lq}, {Lk}); make it for the call's lengths (create_block_mask(..., "
                             f"Q_LEN={Lq}, KV_LEN={Lk}))")
        if q_offset != self.q_offset:
            raise ValueError(f"this FlexAttention BlockMask's query rows sit at positions {self.q_offset}.. but the "
                             f"call puts its queries at q_offset={q_offset}; pass "
                             f"qkv.masks.from_flex(block_mask, q_offset={q_offset})")
        nb, nh, nqb, nkb = self.live.layout.shape
        if nb not in (1, B) or nh not in (1, H) or nqb * self.live.bq < Lq or nkb * self.live.bk < Lk:
            raise ValueError(f"this FlexAttention BlockMask's tables have shape {(nb, nh, nqb, nkb)}; a call "
                             f"(B, H, Lq, Lk) = ({B}, {H}, {Lq}, {Lk}) needs batch and heads 1 or the call's and "
                             f"every block of the call listed")

    def __call__(self, b, h, q, kv):
        row = q - self.q_offset
        allowed = evaluate_per_element(self.fn, "mask_mod", (), (b, h, row, kv))
        return self.full(b, h, row, kv) | (self.live(b, h, row, kv) & allowed)

    def tile_bounds(self, g):
        rows = replace(g, q_offset=g.q_offset - self.q_offset)   # positions -> Flex's rows
        return self.live.tile_bounds(rows)[0], self.full.tile_bounds(rows)[1]

    def __repr__(self):
        return f"from_flex({describe(self.fn)}, seq_lengths={(self.Lq, self.Lk)}, q_offset={self.q_offset})"


def from_flex(block_mask, q_offset: int | None = None) -> Mask:
    """A mask from a FlexAttention `BlockMask` (torch.nn.attention.flex_attention): the same numbers as
    `flex_attention(..., block_mask=block_mask)`, on qkv's backends.

    Flex numbers query rows from 0; here row r is position `q_offset + r` (default `Lk - Lq`, where
    `qkv.attention` puts the queries by default). A call must have the BlockMask's lengths and q_offset.
    """
    if not flex.is_block_mask(block_mask):
        raise TypeError(f"from_flex needs a torch.nn.attention.flex_attention.BlockMask, got {type(block_mask).__name__}")
    if q_offset is not None:
        q_offset = _check_int("q_offset", q_offset, -(1 << 62))
    return _Flex(block_mask, q_offset)


# ----------------------------------------------------------------------------
# BlockMask
# ----------------------------------------------------------------------------

class BlockMask:
    """Which tiles of the attention matrix to skip, compute unmasked, or mask.

    `kind` is an int8 tensor of shape (B', H', nQ, nK) (B' in {1, B}, H' in {1, H})
    with EMPTY = 0 (skipped), PARTIAL = 1 (mask applied), FULL = 2 (no mask).
    Tile (i, j) covers query rows [i*block_q, (i+1)*block_q) of the call (absolute
    positions q_offset + row) and keys [j*block_k, (j+1)*block_k), clipped to Lq, Lk.

    The dense mask is rebuilt tile by tile::

        dense[b, h, r, c] = False             if kind[b, h, r // block_q, c // block_k] == EMPTY
                            True              if ... == FULL
                            mask(b, h, q_offset + r, c)   if ... == PARTIAL
    """

    def __init__(self, kind, mask, Lq, Lk, block_q, block_k, q_offset, B, H):
        self.kind, self.mask = kind, mask
        self.Lq, self.Lk, self.block_q, self.block_k = Lq, Lk, block_q, block_k
        self.q_offset, self.B, self.H = q_offset, B, H

    @property
    def shape(self):
        return tuple(self.kind.shape)

    def counts(self) -> dict[str, int]:
        return {name: int((self.kind == v).sum()) for name, v in (("EMPTY", EMPTY), ("PARTIAL", PARTIAL), ("FULL", FULL))}

    @property
    def sparsity(self) -> float:
        """Fraction of tiles that are skipped."""
        n = self.kind.numel()
        return float((self.kind == EMPTY).sum()) / n if n else 0.0

    def to_dense(self) -> torch.Tensor:
        """Rebuild the (B', H', Lq, Lk) bool mask from the tiles (evaluates PARTIAL tiles only in effect)."""
        kind = self.kind.repeat_interleave(self.block_q, dim=2)[:, :, : self.Lq]
        kind = kind.repeat_interleave(self.block_k, dim=3)[:, :, :, : self.Lk]
        exact = evaluate(self.mask, self.B, self.H, self.Lq, self.Lk, q_offset=self.q_offset,
                         device=self.kind.device)
        return torch.where(kind == FULL, True, torch.where(kind == EMPTY, False, exact))

    def picture(self, b: int = 0, h: int = 0, max_side: int = 64) -> str:
        """ASCII picture of one (batch, head): '#' FULL, '+' PARTIAL, '.' EMPTY."""
        k = self.kind[b % self.kind.shape[0], h % self.kind.shape[1]]
        step_q = max(1, math.ceil(k.shape[0] / max_side))
        step_k = max(1, math.ceil(k.shape[1] / max_side))
        chars = {EMPTY: ".", PARTIAL: "+", FULL: "#"}
        rows = []
        for i in range(0, k.shape[0], step_q):
            row = k[i: i + step_q]
            cells = []
            for j in range(0, k.shape[1], step_k):
                cell = row[:, j: j + step_k]
                v = FULL if bool((cell == FULL).all()) else EMPTY if bool((cell == EMPTY).all()) else PARTIAL
                cells.append(chars[v])
            rows.append("".join(cells))
        return "\n".join(rows)

    def __repr__(self):
        c = self.counts()
        return (f"BlockMask(Lq={self.Lq}, Lk={self.Lk}, block=({self.block_q}, {self.block_k}), "
                f"tiles={tuple(self.kind.shape)}, empty={c['EMPTY']}, partial={c['PARTIAL']}, "
                f"full={c['FULL']}, sparsity={self.sparsity:.1%}, mask={self.mask!r})")

    def __str__(self):
        return repr(self) + "\n" + self.picture()


# -----------------------------------------------------------------------------
# Recognisers: the only code outside the mask classes that knows them. Backends ask these
# (sdpa: is the mask plain causal? segments: is it packed documents?), so a new mask type
# never silently misses a fast path by failing someone else's isinstance check.


def is_causal(mask, *, nested: bool = False) -> bool:
    """Whether `mask` is `causal()` itself; with nested=True also an `&` or `|` of masks that each
    are (`causal() & causal()` allows exactly what `causal()` does)."""
    if isinstance(mask, _Causal):
        return True
    return nested and isinstance(mask, _And) and is_causal(mask.a, nested=True) and is_causal(mask.b, nested=True)


def documents(mask) -> tuple[torch.Tensor, bool] | None:
    """(ids, causal) when `mask` is `document(ids)` (causal False) or `document(ids) & causal()`
    in either order (causal True); None for every other mask. ids is (B' in {1, B}, L)."""
    causal = False
    if type(mask) is _And:                  # not isinstance: `|` (_Or) subclasses _And
        if {type(mask.a), type(mask.b)} != {_Document, _Causal}:
            return None
        mask, causal = (mask.a if isinstance(mask.a, _Document) else mask.b), True
    if not isinstance(mask, _Document):
        return None
    return mask.ids, causal
