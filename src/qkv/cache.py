"""KV caches: the keys and values of earlier tokens, kept so a decode step need not recompute them.

Legend: B batch (sequences), Hq query heads, Hkv key/value heads, G = Hq // Hkv,
n new tokens this step, L tokens stored, D head dim, bs block size, N pool slots.

A decoder step appends the new tokens' keys and values to every layer's cache and
attends from the new queries to everything stored. Three layouts, one interface::

    layer.length               (B,) tokens stored per sequence (tracked explicitly)
    layer.append(k, v)         k, v (B, Hkv, n, D): n new tokens for every sequence
    layer.read()               -> (k, v, allowed): what a query may attend to
    layer.attention(q, k, v)   append, then qkv.attention over the cache (what layers call)

- `ContiguousCache`: one preallocated (B, Hkv, max_len, D) buffer per layer for K
  and for V. A step writes n columns in place; nothing is concatenated or copied.
  Sequences of different lengths waste the tail of their rows.
- `PagedCache`: one pool of fixed-size blocks per layer (bs tokens each) and, per
  sequence, a block table listing its blocks. Blocks come from a free list, are
  reference-counted so sequences can share a prompt prefix, and go back when the
  last user frees them; waste is at most bs - 1 tokens per sequence. A decode
  step attends from all B queries to the pool's live slots in one call, with a
  mask that keeps each query on its own sequence's slots: the pool is read once
  and no block is gathered into a contiguous copy.
- `RingCache`: for a sliding-window layer (window W), a (B, Hkv, W, D) buffer
  written at position % W: memory stays bounded however long the sequence grows.

Keys are stored after RoPE, so a decode query needs no key positions: softmax
over a set of keys does not depend on their order, which is what lets the paged
and ring layouts hand the keys over in storage order.

GQA: caches hold the Hkv key/value heads only, G times smaller than the Hq query
heads; `qkv.attention` shares each kv head between its G query heads.

`Cache` bundles one layer cache per decoder layer; `Decoder.new_cache()` builds
the right kind per layer (a ring for sliding-window layers of a contiguous cache).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch
from torch import Tensor

import qkv
from qkv import kernels
from qkv._util import hugepages
from qkv._util.checks import check_int

__all__ = ["LayerCache", "ContiguousCache", "RingCache", "PagedCache", "BlockPool", "Cache", "CacheFull",
           "UnknownSequence", "RowOutOfRange", "cache_bytes", "split_kv_attention", "split_kv_rule", "LinearStateCache"]


class CacheFull(ValueError):
    """An append needs more room than the cache was built with."""


class UnknownSequence(KeyError, ValueError):
    """A sequence id that a paged cache's pool does not hold (freed, or never added).

    A KeyError (the pool is a mapping of sequence ids) and a ValueError (a bad argument)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RowOutOfRange(IndexError, ValueError):
    """A batch row index outside 0..B-1 (an IndexError and a ValueError)."""


_check_int = check_int


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# -----------------------------------------------------------------------------
# The interface


class LayerCache:
    """One layer's cache for a batch of B sequences. Subclasses store; this class attends."""

    n_kv_heads: int
    head_dim: int
    window: int | None = None      # a sliding-window layer attends to the last `window` keys only

    @property
    def length(self) -> Tensor:
        """(B,) int64: tokens stored per sequence."""
        return self._lengths

    @property
    def batch(self) -> int:
        return self._lengths.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the K and V storage this layer holds."""
        return self.k.numel() * self.k.element_size() * 2

    @property
    def bytes_per_token(self) -> int:
        """K and V bytes one token takes: 2 * Hkv * D * element size."""
        return 2 * self.n_kv_heads * self.head_dim * self.k.element_size()

    def append(self, k: Tensor, v: Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_room(self, n: int) -> None:
        """Raise CacheFull if appending n tokens to every sequence would not fit (changes nothing)."""

    def read(self):  # pragma: no cover - abstract
        """(k (B', Hkv, L, D), v, allowed (B, L) bool or None (all allowed))."""
        raise NotImplementedError

    def _check_new(self, k: Tensor, v: Tensor) -> int:
        expected = (self.batch, self.n_kv_heads, None, self.head_dim)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, Tensor) or t.dim() != 4 or t.shape[0] != self.batch or t.shape[1] != self.n_kv_heads \
                    or t.shape[3] != self.head_dim:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name} must be (B={expected[0]}, Hkv={expected[1]}, n, D={expected[3]}) "
                                 f"for this cache, got {shape}")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        for name, t in (("k", k), ("v", v)):        # stored as given: a silent cast would change the values
            if t.dtype != self.k.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but this cache stores {self.k.dtype}; cast it with "
                                f"{name}.to({self.k.dtype}) or build the cache with dtype={t.dtype}")
            if t.device != self.k.device:
                raise ValueError(f"{name} is on {t.device} but this cache is on {self.k.device}; move it with "
                                 f"{name}.to({str(self.k.device)!r})")
        return k.shape[2]

    def _check_query(self, q: Tensor, n: int, scale, backend) -> None:
        """The rest of an attention call, checked before the append changes the cache."""
        if (not isinstance(q, Tensor) or q.dim() != 4 or q.shape[0] != self.batch or q.shape[1] == 0
                or q.shape[1] % self.n_kv_heads or q.shape[2] != n or q.shape[3] != self.head_dim):
            shape = tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__
            raise ValueError(f"q must be (B={self.batch}, Hq (a multiple of Hkv={self.n_kv_heads}), n={n}, "
                             f"D={self.head_dim}), one query per new key, got {shape}")
        if q.dtype != self.k.dtype:
            raise TypeError(f"q has dtype {q.dtype} but this cache stores {self.k.dtype}; cast it with "
                            f"q.to({self.k.dtype})")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not math.isfinite(scale)):
            raise ValueError(f"scale must be a finite number or None (1/sqrt(D)), got {scale!r}")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string name, got {type(backend).__name__}")
        if backend != "auto":
            qkv.backends.get(backend)                  # an unknown name: ValueError listing the registered ones

    def attention(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, score_mod=None,
                  backend: str = "auto") -> Tensor:
        """Append k, v (B, Hkv, n, D), then attend from q (B, Hq, n, D) to the whole cache.

        Query i of sequence b sits at position length[b] + i (its own token's
        position): it sees every stored key up to itself (causal), and with a
        window W only the last W of them. Returns (B, Hq, n, D).
        """
        n = self._check_new(k, v)
        self._check_query(q, n, scale, backend)
        if n == 1 and score_mod is None and backend == "auto" and self._fast_decode_applies(q):
            self._append(k, v, n)                                        # checked above
            return self._fast_decode(q, scale)
        before = self._lengths.clone()
        if score_mod is not None and not bool((before == before[0]).all()):
            raise ValueError("a score_mod needs key positions, which this cache only has for a batch of equal "
                             "lengths in a contiguous layout; use a ContiguousCache and equal lengths")
        self.append(k, v)
        keys, values, allowed = self.read()                              # (B, Hkv, L, D) x2, (B, L)
        mask = _new_token_mask(before, n, keys.shape[2], self.window, allowed)
        chunks = self._decode_chunks(q, keys.shape[2]) if n == 1 and score_mod is None else 1
        if chunks > 1:
            return split_kv_attention(q, keys, values, mask, chunks, scale=scale, backend=backend)
        return qkv.attention(q, keys, values, mask=mask, scale=scale, score_mod=score_mod, backend=backend)

    split_kv: int | str = "auto"

    def _fast_decode_applies(self, q: Tensor) -> bool:
        """Whether `_fast_decode` serves a one-token step with this query (decided before the append)."""
        return False

    def _fast_decode(self, q: Tensor, scale) -> Tensor:
        """A decode step through qkv's CPU decode kernel, the new token already appended."""
        raise NotImplementedError

    def _append(self, k: Tensor, v: Tensor, n: int) -> None:
        """`append` after `_check_new` has passed (n new tokens)."""
        self.append(k, v)

    def _fused_ready(self) -> bool:
        """Whether the fused decode block (`qkv.layers.Block`) can write and read this cache:
        fp32 CPU storage in a layout `qkv.kernels.blocks_step` takes. No side effects."""
        return False

    def _claim_fused_slot(self) -> dict:
        """For a fused one-token step, after `check_room(1)`: claim each sequence's slot for
        the new token and say where the kernel writes it and what it reads (`blocks_step`'s
        kpool, vpool, slots, tables, lengths, advance, block_size)."""
        raise NotImplementedError

    def _decode_chunks(self, q: Tensor, L: int) -> int:
        """How many key chunks a decode step splits into (`split_kv`: an int, or "auto")."""
        if self.split_kv != "auto":
            return max(1, min(int(self.split_kv), L))
        return split_kv_rule(q.shape[0] * q.shape[1], L, q.device)


def _new_token_mask(before: Tensor, n: int, L: int, window: int | None, allowed: Tensor | None):
    """Mask (B, 1, n, L) for n new queries per sequence over L chronologically stored keys.

    Sequence b's query i sits at position before[b] + i and stored key j at position j.
    Returns None when the plain bottom-right causal rule of qkv.attention suffices.
    """
    uniform = bool((before == before[0]).all()) and allowed is None
    if uniform and int(before[0]) + n == L:
        if window is not None:
            return qkv.masks.sliding_window(window)
        return None if n == 1 else qkv.masks.causal()
    device = allowed.device if allowed is not None else before.device
    q_pos = before.to(device)[:, None] + torch.arange(n, device=device)                # (B, n)
    kv = torch.arange(L, device=device)                                               # (L,)
    ok = kv[None, None, :] <= q_pos[:, :, None]                                       # (B, n, L)
    if window is not None:
        ok &= kv[None, None, :] > q_pos[:, :, None] - window
    if allowed is not None:
        ok &= allowed[:, None, :]
    return ok[:, None]                                                                # (B, 1, n, L)


# -----------------------------------------------------------------------------
# Split-KV decode: a long cache in chunks, merged by log-sum-exp


# Keys per chunk below which splitting never pays (a chunk must amortise its call).
SPLIT_MIN_CHUNK = 4096


def split_kv_rule(rows: int, L: int, device: torch.device) -> int:
    """Chunks for a decode step with `rows` = B * Hq query rows over L keys.

    A decode step is one query row per head: a kernel that parallelises over
    (batch, head) leaves processors idle when B * Hq is small, and splitting the
    keys gives it more independent work. On the GPU: enough chunks to give every
    streaming multiprocessor a row, each at least SPLIT_MIN_CHUNK keys. On the CPU
    torch's kernel already splits the rows over the cores and the chunks run one
    after another, so splitting only adds calls (benchmarks/bench_generate.py
    measures it): 1.
    """
    if device.type != "cuda" or L < 2 * SPLIT_MIN_CHUNK:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if rows >= sms:
        return 1
    return max(1, min(-(-sms // rows), L // SPLIT_MIN_CHUNK))


def split_kv_attention(q: Tensor, keys: Tensor, values: Tensor, mask, chunks: int, *, scale=None,
                       backend: str = "auto") -> Tensor:
    """Decode attention (q (B, Hq, 1, D) over keys (B, Hkv, L, D)) as `chunks` calls merged exactly.

    Each chunk returns its output o_i and the log-sum-exp l_i of its scores; the
    whole-row result is sum_i exp(l_i - l) o_i with l = log sum_i exp(l_i). A
    chunk with no allowed key has l_i = -inf and weight 0.
    """
    B, Hq, n, D = q.shape
    L = keys.shape[2]
    bounds = [round(i * L / chunks) for i in range(chunks + 1)]
    outs, lses = [], []
    for s, e in zip(bounds[:-1], bounds[1:]):
        if isinstance(mask, Tensor):
            part = mask[..., s:e]
        else:
            part = mask                               # a qkv mask: positions shift with q_offset below
        o, lse = qkv.attention(q, keys[:, :, s:e], values[:, :, s:e], mask=part, scale=scale, backend=backend,
                               return_lse=True, q_offset=L - n - s)
        outs.append(o.to(lse.dtype))
        lses.append(lse)
    lse = torch.stack(lses)                                             # (chunks, B, Hq, n)
    total = torch.logsumexp(lse, dim=0)                                 # (B, Hq, n)
    weight = torch.exp(lse - total).nan_to_num(0.0)                     # empty rows: -inf - -inf
    out = (weight[..., None] * torch.stack(outs)).sum(0)                # (B, Hq, n, D)
    return out.to(q.dtype)


# -----------------------------------------------------------------------------
# Contiguous


class ContiguousCache(LayerCache):
    """Preallocated (B, Hkv, max_len, D) K and V; appends write in place.

    Args:
        batch, n_kv_heads, head_dim, max_len: the buffer shape.
        window: for a sliding-window layer: attention sees the last `window` keys
            (all keys are still stored; a `RingCache` stores only the window).
    """

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, max_len: int, *, window: int | None = None,
                 dtype: torch.dtype = torch.float32, device=None, _views=None):
        self.n_kv_heads, self.head_dim = _check_int("n_kv_heads", n_kv_heads, 1), _check_int("head_dim", head_dim, 1)
        self.max_len = _check_int("max_len", max_len, 1)
        self.window = None if window is None else _check_int("window", window, 1)
        if _views is not None:
            self.k, self.v, self._lengths = _views
            return
        _check_int("batch", batch, 1)
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = hugepages.zeros(shape, dtype=dtype, device=device)               # (B, Hkv, max_len, D), huge pages
        self.v = hugepages.zeros(shape, dtype=dtype, device=device)               # (B, Hkv, max_len, D)
        self._lengths = torch.zeros(batch, dtype=torch.long)

    def check_room(self, n: int) -> None:
        end = int(self._lengths.max()) + n if self.batch else n
        if end > self.max_len:
            raise CacheFull(f"KV cache full: a sequence would hold {end} tokens but the cache was built "
                            f"for max_len={self.max_len}; build it with a larger max_len")

    def row(self, b: int) -> "ContiguousCache":
        """A view of sequence b alone (B = 1) sharing this cache's storage and lengths."""
        return ContiguousCache(1, self.n_kv_heads, self.head_dim, self.max_len, window=self.window,
                               _views=(self.k[b:b + 1], self.v[b:b + 1], self._lengths[b:b + 1]))

    def append(self, k: Tensor, v: Tensor) -> None:
        self._append(k, v, self._check_new(k, v))

    def _append(self, k: Tensor, v: Tensor, n: int) -> None:
        self.check_room(n)
        start = int(self._lengths[0])
        if bool((self._lengths == start).all()):
            self.k[:, :, start:start + n] = k                                    # n columns, in place
            self.v[:, :, start:start + n] = v
        elif n == 1:
            rows = torch.arange(self.batch, device=self.k.device)
            cols = self._lengths.to(self.k.device)
            self.k[rows, :, cols] = k[:, :, 0]                                   # (B, Hkv, D) scattered
            self.v[rows, :, cols] = v[:, :, 0]
        else:
            for b in range(self.batch):
                s = int(self._lengths[b])
                self.k[b, :, s:s + n] = k[b]
                self.v[b, :, s:s + n] = v[b]
        self._lengths += n

    def _fast_decode_applies(self, q):
        return self.k.is_contiguous() and kernels.paged_decode_applies(q, self.k)

    def _fast_decode(self, q, scale):
        return kernels.paged_decode(q, self.k, self.v, self._one_block_table(), self._lengths,
                                   block_size=self.max_len, window=self.window, scale=scale)

    def _one_block_table(self) -> Tensor:
        """(B, 1) zeros: the block table of a cache that is one block of max_len slots per sequence."""
        tables = self.__dict__.get("_one_block")
        if tables is None or tables.shape[0] != self.batch:
            tables = self._one_block = torch.zeros(self.batch, 1, dtype=torch.long)
        return tables

    def _fused_ready(self):
        return (self.k.dtype == torch.float32 and self.k.is_cpu and self.k.is_contiguous()
                and self.v.is_contiguous() and self._lengths.is_contiguous())

    def _claim_fused_slot(self):
        # the slot is the length; the kernel advances the lengths itself after writing
        return dict(kpool=self.k, vpool=self.v, slots=self._lengths, tables=self._one_block_table(),
                    lengths=self._lengths, advance=True, block_size=self.max_len)

    def read(self):
        L = int(self._lengths.max())
        keys, values = self.k[:, :, :L], self.v[:, :, :L]                          # views (B, Hkv, L, D)
        if bool((self._lengths == L).all()):
            return keys, values, None
        allowed = torch.arange(L, device=self.k.device)[None, :] < self._lengths.to(self.k.device)[:, None]
        return keys, values, allowed                                              # (B, L): key j < length[b]

    @property
    def used_bytes(self) -> int:
        return int(self._lengths.sum()) * self.bytes_per_token


# -----------------------------------------------------------------------------
# Ring buffer for sliding-window layers


class RingCache(LayerCache):
    """A sliding-window layer's cache: the last `window` tokens in a (B, Hkv, window, D) ring.

    Token p lives in slot p % window. A decode step (n = 1) attends to the slots
    in storage order; a longer append first attends to the ring's contents
    unrolled into time order plus the new tokens, then keeps the last `window`.
    """

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, window: int, *, dtype=torch.float32,
                 device=None, _views=None):
        self.n_kv_heads, self.head_dim = _check_int("n_kv_heads", n_kv_heads, 1), _check_int("head_dim", head_dim, 1)
        self.window = _check_int("window", window, 1)
        if _views is not None:
            self.k, self.v, self._lengths = _views
            return
        _check_int("batch", batch, 1)
        self.k = hugepages.zeros((batch, n_kv_heads, window, head_dim), dtype=dtype, device=device)  # (B, Hkv, W, D)
        self.v = hugepages.zeros((batch, n_kv_heads, window, head_dim), dtype=dtype, device=device)
        self._lengths = torch.zeros(batch, dtype=torch.long)

    def check_room(self, n: int) -> None:
        return None                                   # a ring never fills: old tokens leave the window

    def row(self, b: int) -> "RingCache":
        return RingCache(1, self.n_kv_heads, self.head_dim, self.window,
                         _views=(self.k[b:b + 1], self.v[b:b + 1], self._lengths[b:b + 1]))

    def append(self, k: Tensor, v: Tensor) -> None:
        n = self._check_new(k, v)
        W = self.window
        keep = min(n, W)                                       # only the last W new tokens survive
        k, v = k[:, :, n - keep:], v[:, :, n - keep:]
        pos = (self._lengths[:, None] + (n - keep) + torch.arange(keep)) % W          # (B, keep) slots
        pos = pos.to(self.k.device)
        rows = torch.arange(self.batch, device=self.k.device)[:, None]
        self.k[rows, :, pos] = k.transpose(1, 2)              # (B, keep, Hkv, D) into slots
        self.v[rows, :, pos] = v.transpose(1, 2)
        self._lengths += n

    def read(self):
        """Keys in storage (not time) order, with the slots that hold a token."""
        filled = torch.clamp(self._lengths, max=self.window)
        if bool((filled == self.window).all()):
            return self.k, self.v, None
        allowed = torch.arange(self.window, device=self.k.device)[None, :] < filled.to(self.k.device)[:, None]
        return self.k, self.v, allowed

    def _time_ordered(self, b: int):
        """Sequence b's stored tokens oldest first: (Hkv, min(length, W), D) x2."""
        L, W = int(self._lengths[b]), self.window
        if L <= W:
            return self.k[b, :, :L], self.v[b, :, :L]
        order = (torch.arange(L - W, L) % W).to(self.k.device)
        return self.k[b][:, order], self.v[b][:, order]

    def attention(self, q, k, v, *, scale=None, score_mod=None, backend="auto"):
        n = self._check_new(k, v)
        self._check_query(q, n, scale, backend)
        if score_mod is not None:
            raise ValueError("a score_mod needs key positions, which a RingCache does not keep in order; "
                             "use a ContiguousCache")
        if n == 1:
            self.append(k, v)
            if backend == "auto" and self.k.is_contiguous() and kernels.paged_decode_applies(q, self.k):
                # every stored key is within the window, and storage order does not matter to softmax
                filled = torch.clamp(self._lengths, max=self.window)
                return kernels.paged_decode(q, self.k, self.v, torch.zeros(self.batch, 1, dtype=torch.long), filled,
                                           block_size=self.window, scale=scale)
            keys, values, allowed = self.read()                # every stored key is within the window
            mask = None if allowed is None else allowed[:, None, None, :]
            return qkv.attention(q, keys, values, mask=mask, scale=scale, backend=backend)
        outs = []
        for b in range(self.batch):                            # prefill: per sequence, in time order
            old_k, old_v = self._time_ordered(b)                # (Hkv, l, D)
            keys = torch.cat([old_k, k[b]], dim=1)[None]        # (1, Hkv, l + n, D)
            values = torch.cat([old_v, v[b]], dim=1)[None]
            outs.append(qkv.attention(q[b:b + 1], keys, values, mask=qkv.masks.sliding_window(self.window),
                                      scale=scale, backend=backend))
        self.append(k, v)
        return torch.cat(outs)

    @property
    def used_bytes(self) -> int:
        return int(torch.clamp(self._lengths, max=self.window).sum()) * self.bytes_per_token


# -----------------------------------------------------------------------------
# Paged: a block pool shared by sequences, one block table each


class BlockPool:
    """Block bookkeeping shared by every layer of a paged cache.

    Blocks are numbered 0..num_blocks-1; the free list hands out the lowest free
    number first, so the blocks in use stay packed at the front of each layer's
    pool and a step reads only `high_water` blocks. A sequence is a list of block
    numbers (its block table); a block may appear in several tables (a shared
    prompt prefix) and returns to the free list when its reference count drops to 0.
    """

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = _check_int("num_blocks", num_blocks, 1)
        self.block_size = _check_int("block_size", block_size, 1)
        self._free = list(range(num_blocks))        # a heap: lowest block number first
        self.refcount = [0] * num_blocks
        self.tables: dict[int, list[int]] = {}       # sequence id -> block numbers
        self.tokens: dict[int, int] = {}             # sequence id -> tokens it reserved room for
        self._next_id = 0
        self.version = 0                             # bumped when any table changes (invalidates masks)
        self.layers: list["PagedCache"] = []         # the per-layer pools, to copy blocks on fork
        self._memo: dict = {}                        # per-step index tensors, shared by the layers
        self._high: int | None = 0                   # high_water, None when it must be recomputed

    def memo(self, key, make):
        """`make()` once per key: every layer of a step asks for the same slots and masks."""
        if key not in self._memo:
            if len(self._memo) > 64:
                self._memo.clear()
            self._memo[key] = make()
        return self._memo[key]

    # -- sequences -------------------------------------------------------------

    def new_sequence(self) -> int:
        sid = self._next_id
        self._next_id += 1
        self.tables[sid], self.tokens[sid] = [], 0
        return sid

    def _check_seq(self, sid: int) -> None:
        if sid not in self.tables:
            raise UnknownSequence(f"no sequence {sid} in this pool (freed, or never added); live: "
                                  f"{sorted(self.tables)}; pass the id of a live sequence")

    def blocks_needed(self, totals: dict[int, int]) -> int:
        """New blocks that `reserve_all(totals)` would allocate."""
        need = 0
        for sid, total in totals.items():
            self._check_seq(sid)
            need += max(-(-total // self.block_size) - len(self.tables[sid]), 0)
        return need

    def reserve_all(self, totals: dict[int, int]) -> None:
        """Room for totals[sid] tokens in each sequence: all of it, or (CacheFull) nothing."""
        need = self.blocks_needed(totals)
        if need > len(self._free):
            raise CacheFull(f"paged KV cache full: {need} more block(s) of {self.block_size} tokens are needed but "
                            f"only {len(self._free)} of {self.num_blocks} are free; build the cache with more "
                            f"blocks or free finished sequences")
        for sid, total in totals.items():
            self.reserve(sid, total)

    def reserve(self, sid: int, total_tokens: int) -> None:
        """Make sure sequence `sid` has blocks for `total_tokens` tokens (allocates if needed)."""
        self._check_seq(sid)
        _check_int("total_tokens", total_tokens, 0)
        table = self.tables[sid]
        need = -(-total_tokens // self.block_size) - len(table)
        if need > len(self._free):
            raise CacheFull(f"paged KV cache full: sequence {sid} needs {need} more block(s) of {self.block_size} "
                            f"tokens but only {len(self._free)} of {self.num_blocks} are free; build the cache with "
                            f"more blocks or free finished sequences")
        for _ in range(max(need, 0)):
            block = heapq.heappop(self._free)
            self.refcount[block] = 1
            if self._high is not None:
                self._high = max(self._high, block + 1)
            table.append(block)
            for layer in self.layers:
                layer._reset_block(block)
        if need > 0:
            self.version += 1
        self.tokens[sid] = max(self.tokens[sid], total_tokens)

    def fork(self, sid: int, n_tokens: int | None = None) -> int:
        """A new sequence starting with the first n_tokens (default all) of `sid`.

        Whole blocks are shared by reference; a partly used last block is copied
        (the two sequences will write different tokens after it).
        """
        self._check_seq(sid)
        if n_tokens is not None and (isinstance(n_tokens, bool) or not isinstance(n_tokens, int)):
            raise TypeError(f"n_tokens must be an int or None (all tokens), got {type(n_tokens).__name__} {n_tokens!r}")
        length = self.tokens[sid] if n_tokens is None else n_tokens
        if not 0 <= length <= self.tokens[sid]:
            raise ValueError(f"can fork at most the {self.tokens[sid]} tokens sequence {sid} holds, got {length}")
        full, rest = divmod(length, self.block_size)
        if rest and not self._free:
            raise CacheFull(f"paged KV cache full: forking copies the partly filled last block and no block is "
                            f"free (of {self.num_blocks}); build the cache with more blocks or free sequences")
        child = self.new_sequence()
        shared = self.tables[sid][:full]
        for block in shared:
            self.refcount[block] += 1
        self.tables[child] = list(shared)
        self.tokens[child] = full * self.block_size
        if rest:
            self.reserve(child, length)
            src, dst = self.tables[sid][full], self.tables[child][full]
            for layer in self.layers:
                layer._copy_block(src, dst, rest)
        self.tokens[child] = length
        self.version += 1
        return child

    def free(self, sid: int) -> None:
        """Release a sequence; its blocks return to the free list when no other sequence uses them."""
        self._check_seq(sid)
        for block in self.tables.pop(sid):
            self.refcount[block] -= 1
            if self.refcount[block] == 0:
                heapq.heappush(self._free, block)
                if block + 1 == self._high:
                    self._high = None                 # recomputed on demand
        del self.tokens[sid]
        self.version += 1

    # -- accounting ------------------------------------------------------------

    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def high_water(self) -> int:
        """1 + the highest block number in use (0 if none): the pool prefix a step reads."""
        if self._high is None:
            self._high = next((b + 1 for b in range(self.num_blocks - 1, -1, -1) if self.refcount[b] > 0), 0)
        return self._high

    def stats(self, bytes_per_token: int = 1) -> dict:
        """Memory accounting: allocated, used (tokens held) and unused-but-allocated, in bytes."""
        _check_int("bytes_per_token", bytes_per_token, 1)
        allocated = self.blocks_in_use * self.block_size
        counted = set()
        used = 0
        for sid, table in self.tables.items():   # a shared block's tokens count once
            tokens = self.tokens[sid]
            for i, block in enumerate(table):
                if block not in counted:
                    counted.add(block)
                    used += min(self.block_size, max(tokens - i * self.block_size, 0))
        return {"blocks_total": self.num_blocks, "blocks_in_use": self.blocks_in_use,
                "allocated_bytes": allocated * bytes_per_token, "used_bytes": used * bytes_per_token,
                "unused_bytes": (allocated - used) * bytes_per_token,
                "waste": (allocated - used) / allocated if allocated else 0.0}


class PagedCache(LayerCache):
    """One layer's view of a paged cache for the sequences `seqs` (B = len(seqs)).

    Storage: K and V pools (Hkv, num_blocks * bs, D), slot = block * bs + offset,
    and the position of the token in each slot (-1 while empty). Build them for a
    whole model with `Cache.paged(...)`.
    """

    def __init__(self, pool: BlockPool, n_kv_heads: int, head_dim: int, *, seqs=(), window: int | None = None,
                 dtype=torch.float32, device=None, _storage=None):
        if not isinstance(pool, BlockPool):
            raise TypeError(f"pool must be a qkv.cache.BlockPool, got {type(pool).__name__}; "
                            f"e.g. BlockPool(num_blocks, block_size)")
        self.pool = pool
        self.n_kv_heads, self.head_dim = _check_int("n_kv_heads", n_kv_heads, 1), _check_int("head_dim", head_dim, 1)
        self.window = None if window is None else _check_int("window", window, 1)
        if _storage is None:
            slots = pool.num_blocks * pool.block_size
            self.k = hugepages.zeros((n_kv_heads, slots, head_dim), dtype=dtype, device=device)  # (Hkv, N, D)
            self.v = hugepages.zeros((n_kv_heads, slots, head_dim), dtype=dtype, device=device)
            self.slot_pos = torch.full((slots,), -1, dtype=torch.long, device=device)       # (N,)
            self.lengths_by_seq: dict[int, int] = {}
            pool.layers.append(self)
        else:
            self.k, self.v, self.slot_pos, self.lengths_by_seq = _storage
        self.seqs = list(seqs)

    def view(self, seqs) -> "PagedCache":
        """The same layer storage, seen by another batch of sequences."""
        return PagedCache(self.pool, self.n_kv_heads, self.head_dim, seqs=seqs, window=self.window,
                          _storage=(self.k, self.v, self.slot_pos, self.lengths_by_seq))

    def row(self, b: int) -> "PagedCache":
        return self.view([self.seqs[b]])

    @property
    def _lengths(self) -> Tensor:
        return torch.tensor([self.lengths_by_seq.get(s, 0) for s in self.seqs], dtype=torch.long)

    @property
    def batch(self) -> int:
        return len(self.seqs)

    def _reset_block(self, block: int) -> None:
        bs = self.pool.block_size
        self.slot_pos[block * bs:(block + 1) * bs] = -1

    def _copy_block(self, src: int, dst: int, n: int) -> None:
        bs = self.pool.block_size
        s, d = slice(src * bs, src * bs + n), slice(dst * bs, dst * bs + n)
        self.k[:, d], self.v[:, d], self.slot_pos[d] = self.k[:, s], self.v[:, s], self.slot_pos[s]

    def _slots(self, sid: int, start: int, n: int) -> Tensor:
        bs, table = self.pool.block_size, self.pool.tables[sid]
        pos = torch.arange(start, start + n)
        blocks = torch.tensor(table, dtype=torch.long)[pos // bs]
        return blocks * bs + pos % bs                                           # (n,) slot numbers

    def check_room(self, n: int) -> None:
        totals = {sid: self.lengths_by_seq.get(sid, 0) + n for sid in self.seqs}
        need = self.pool.blocks_needed(totals)
        if need > len(self.pool._free):
            self.pool.reserve_all(totals)                  # raises CacheFull with the numbers

    def append(self, k: Tensor, v: Tensor) -> None:
        n = self._check_new(k, v)
        flat = self._place(n)
        self.k[:, flat] = k.permute(1, 0, 2, 3).reshape(self.n_kv_heads, -1, self.head_dim)  # (Hkv, B*n, D)
        self.v[:, flat] = v.permute(1, 0, 2, 3).reshape(self.n_kv_heads, -1, self.head_dim)

    def _fused_ready(self):
        return self.k.dtype == torch.float32 and self.k.is_cpu and self.k.is_contiguous() and self.v.is_contiguous()

    def _claim_fused_slot(self):
        slots = self._place(1)                         # blocks, positions and lengths claimed; K/V come from the kernel
        tables, lengths = self._tables()
        return dict(kpool=self.k[None], vpool=self.v[None], slots=slots, tables=tables, lengths=lengths,
                    advance=False, block_size=self.pool.block_size)

    def _place(self, n: int) -> Tensor:
        """Reserve and claim the slots of n new tokens per sequence (blocks, positions, lengths);
        returns them (B*n,) in (sequence, token) order, for the caller to write K and V into."""
        starts = tuple(self.lengths_by_seq.get(sid, 0) for sid in self.seqs)
        # all or nothing; a no-op for every layer after the first
        self.pool.reserve_all({sid: start + n for sid, start in zip(self.seqs, starts)})

        def make():
            slots = torch.cat([self._slots(sid, s, n) for sid, s in zip(self.seqs, starts)])   # (B*n,)
            positions = torch.cat([torch.arange(s, s + n) for s in starts])                   # (B*n,)
            return slots.to(self.k.device), positions.to(self.k.device)

        flat, positions = self.pool.memo(("slots", self.pool.version, tuple(self.seqs), starts, n), make)
        self.slot_pos[flat] = positions
        for sid in self.seqs:
            self.lengths_by_seq[sid] = self.lengths_by_seq.get(sid, 0) + n
        return flat

    def read(self):
        """Every sequence's keys as one pool prefix (1, Hkv, N', D) with a (B, N') ownership mask."""
        N = self.pool.high_water * self.pool.block_size
        return self.k[None, :, :N], self.v[None, :, :N], self._owned(N)

    def _owned(self, N: int) -> Tensor:
        """(B, N) bool: slot s holds a token of sequence b (and, with a window, a recent one)."""
        lengths = tuple(self.lengths_by_seq.get(s, 0) for s in self.seqs)
        key = ("owned", self.pool.version, tuple(self.seqs), lengths, N, self.window)
        return self.pool.memo(key, lambda: self._make_owned(N))

    def _make_owned(self, N: int) -> Tensor:
        bs = self.pool.block_size
        owner = torch.zeros(self.batch, N // bs, dtype=torch.bool)
        for b, sid in enumerate(self.seqs):
            owner[b, self.pool.tables[sid]] = True
        owned = owner.repeat_interleave(bs, dim=1).to(self.k.device)                    # (B, N)
        lengths = self._lengths.to(self.k.device)[:, None]                             # (B, 1)
        pos = self.slot_pos[None, :N]                                                 # (1, N)
        owned &= (pos >= 0) & (pos < lengths)
        if self.window is not None:
            owned &= pos > lengths - 1 - self.window
        return owned

    def attention(self, q, k, v, *, scale=None, score_mod=None, backend="auto"):
        n = self._check_new(k, v)
        self._check_query(q, n, scale, backend)
        if score_mod is not None:
            raise ValueError("a score_mod needs key positions in order, which a PagedCache does not give; "
                             "use a ContiguousCache")
        if n == 0:  # no new token: nothing to store, an empty output (as the other caches give)
            return q.new_zeros(q.shape[0], q.shape[1], 0, self.v.shape[-1])
        if n > 1:
            # prefill: each sequence attends to its own tokens, gathered in time order
            self.pool.reserve_all({sid: self.lengths_by_seq.get(sid, 0) + n for sid in self.seqs})
            outs = []
            for b, sid in enumerate(self.seqs):
                start = self.lengths_by_seq.get(sid, 0)
                self.view([sid]).append(k[b:b + 1], v[b:b + 1])
                slots = self._slots(sid, 0, start + n).to(self.k.device)
                keys, values = self.k[None][:, :, slots], self.v[None][:, :, slots]   # (1, Hkv, start+n, D)
                mask = qkv.masks.causal() if self.window is None else qkv.masks.sliding_window(self.window)
                outs.append(qkv.attention(q[b:b + 1], keys, values, mask=mask, scale=scale, backend=backend))
            return torch.cat(outs)
        self.append(k, v)
        if backend == "auto" and kernels.paged_decode_applies(q, self.k):
            # decode on the CPU: each query reads only its own blocks, through the block table
            tables, lengths = self._tables()
            return kernels.paged_decode(q, self.k, self.v, tables, lengths, block_size=self.pool.block_size,
                                       window=self.window, scale=scale)
        # decode elsewhere: all B queries against the pool prefix at once; GQA groups and batch fold into rows
        keys, values, owned = self.read()                           # (1, Hkv, N, D) x2, (B, N)
        B, Hq, _, D = q.shape
        G = Hq // self.n_kv_heads
        rows = q.view(B, self.n_kv_heads, G, D).permute(1, 2, 0, 3)     # (Hkv, G, B, D): row = g * B + b
        rows = rows.reshape(1, self.n_kv_heads, G * B, D)               # (1, Hkv, G*B, D)
        mask = owned.repeat(G, 1)[None, None]                           # (1, 1, G*B, N)
        out = qkv.attention(rows, keys, values, mask=mask, scale=scale, backend=backend)  # (1, Hkv, G*B, D)
        out = out.view(self.n_kv_heads, G, B, D).permute(2, 0, 1, 3)    # (B, Hkv, G, D)
        return out.reshape(B, Hq, 1, D)

    def _tables(self):
        """(B, max_blocks) int64 block tables (padded with 0) and (B,) lengths, made once per step."""
        lengths = tuple(self.lengths_by_seq.get(s, 0) for s in self.seqs)

        def make():
            width = max([len(self.pool.tables[sid]) for sid in self.seqs] + [1])
            tables = torch.zeros(len(self.seqs), width, dtype=torch.long)
            for b, sid in enumerate(self.seqs):
                tables[b, :len(self.pool.tables[sid])] = torch.tensor(self.pool.tables[sid], dtype=torch.long)
            return tables, torch.tensor(lengths, dtype=torch.long)

        return self.pool.memo(("tables", self.pool.version, tuple(self.seqs), lengths), make)

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.slot_pos.numel() * self.slot_pos.element_size()

    @property
    def used_bytes(self) -> int:
        return sum(self.lengths_by_seq.get(s, 0) for s in self.seqs) * self.bytes_per_token


# -----------------------------------------------------------------------------
# A whole model's cache


@dataclass
class _Spec:
    n_kv_heads: int
    head_dim: int
    window: int | None


class Cache:
    """One layer cache per decoder layer, plus the model-level view: lengths, rows, bytes."""

    def __init__(self, layers: list[LayerCache], pool: BlockPool | None = None):
        if not layers:
            raise ValueError("a Cache needs at least one layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, LayerCache):
                raise TypeError(f"layers[{i}] must be a qkv.cache.LayerCache (ContiguousCache, RingCache, "
                                f"PagedCache, LinearStateCache), got {type(layer).__name__}")
        self.layers = layers
        self.pool = pool

    @classmethod
    def contiguous(cls, specs, batch: int, max_len: int, *, ring: bool = True, dtype=torch.float32,
                   device=None) -> "Cache":
        """Contiguous layers; sliding-window layers get a RingCache when ring=True."""
        layers = []
        for s in specs:
            if s.window is not None and ring and s.window < max_len:
                layers.append(RingCache(batch, s.n_kv_heads, s.head_dim, s.window, dtype=dtype, device=device))
            else:
                layers.append(ContiguousCache(batch, s.n_kv_heads, s.head_dim, max_len, window=s.window,
                                              dtype=dtype, device=device))
        return cls(layers)

    @classmethod
    def paged(cls, specs, num_blocks: int, *, block_size: int = 16, batch: int = 0, dtype=torch.float32,
              device=None) -> "Cache":
        """Paged layers over one BlockPool; `batch` new (empty) sequences are added."""
        pool = BlockPool(num_blocks, block_size)
        layers = [PagedCache(pool, s.n_kv_heads, s.head_dim, window=s.window, dtype=dtype, device=device)
                  for s in specs]
        cache = cls(layers, pool)
        return cache.view([pool.new_sequence() for _ in range(batch)]) if batch else cache

    @property
    def kind(self) -> str:
        return "paged" if self.pool is not None else "contiguous"

    @property
    def lengths(self) -> Tensor:
        """(B,) tokens stored per sequence (the same in every layer); a copy."""
        return self.layers[0].length.clone()

    def check_room(self, n: int) -> None:
        """Raise CacheFull, changing nothing, unless every layer can take n more tokens per sequence."""
        for layer in self.layers:
            layer.check_room(n)

    @property
    def batch(self) -> int:
        return self.layers[0].batch

    @property
    def seqs(self) -> list[int]:
        if self.pool is None:
            raise ValueError("only a paged cache has sequence ids")
        return list(self.layers[0].seqs)

    def row(self, b: int) -> "Cache":
        """Sequence b alone (B = 1), sharing storage: a prefill writes straight into its place."""
        self._check_row(b)
        return Cache([layer.row(b) for layer in self.layers], self.pool)

    def view(self, seqs) -> "Cache":
        """Paged only: the batch of sequences `seqs` (ids from the pool)."""
        if self.pool is None:
            raise ValueError("view(seqs) is for paged caches; a contiguous cache's rows are fixed")
        for sid in seqs:
            self.pool._check_seq(sid)
        return Cache([layer.view(seqs) for layer in self.layers], self.pool)

    def fork(self, b: int, n_tokens: int | None = None) -> int:
        """Paged only: a new sequence sharing the first n_tokens of row b's blocks; returns its id."""
        if self.pool is None:
            raise ValueError("fork() shares blocks between sequences: build the cache with kind='paged'")
        self._check_row(b)
        sid = self.layers[0].seqs[b]
        child = self.pool.fork(sid, n_tokens)
        for layer in self.layers:
            n = self.pool.tokens[child]
            layer.lengths_by_seq[child] = min(layer.lengths_by_seq.get(sid, 0), n)
        return child

    def _check_row(self, b) -> None:
        if isinstance(b, bool) or not isinstance(b, int):
            raise TypeError(f"row must be an int index into the batch, got {type(b).__name__} {b!r}")
        if not 0 <= b < self.batch:
            raise RowOutOfRange(f"row {b} out of range for a batch of {self.batch}; pass 0..{self.batch - 1}")

    def free(self, sid: int) -> None:
        if self.pool is None:
            raise ValueError("free() is for paged caches")
        self.pool.free(sid)
        for layer in self.layers:
            layer.lengths_by_seq.pop(sid, None)

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds in memory (allocated storage, all layers)."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def used_bytes(self) -> int:
        """Bytes of K/V actually holding tokens of this batch."""
        return sum(layer.used_bytes for layer in self.layers)

    def memory(self) -> dict:
        """Allocated vs used K/V bytes for this batch; `waste` = unused / allocated.

        Contiguous: every row reserves max_len. Paged: only blocks in use count as
        allocated (the free ones belong to no sequence), so waste is the unfilled
        tail of each sequence's last block.
        """
        per_token = sum(layer.bytes_per_token for layer in self.layers)
        if self.pool is not None:
            return self.pool.stats(per_token)
        allocated = self.nbytes
        used = self.used_bytes
        return {"allocated_bytes": allocated, "used_bytes": used, "unused_bytes": allocated - used,
                "waste": (allocated - used) / allocated if allocated else 0.0}


def cache_bytes(n_layers: int, n_kv_heads: int, head_dim: int, tokens: int, dtype=torch.float32) -> int:
    """K and V bytes for `tokens` tokens: 2 * layers * Hkv * D * tokens * element size."""
    for name, value in (("n_layers", n_layers), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim),
                        ("tokens", tokens)):
        _check_int(name, value, 0)
    return 2 * n_layers * n_kv_heads * head_dim * tokens * _element_size(dtype)


# -----------------------------------------------------------------------------
# Recurrent state for kernelised attention (the `linear` and `performer` backends)

from qkv.backends.linear import (Performer, _apply_state, current_feature_map, elu_features,  # noqa: E402
                                 kernel_attention)


class LinearStateCache(LayerCache):
    """A kernelised-attention layer's decode state: constant size, O(1) per step in the context length.

    Causal kernelised attention needs from the past only the running sums
    (M features: D for "linear", n_features for a Performer; Dv value dim)::

        S (B, Hkv, M, Dv) = sum_j phi(k_j) v_j^T        z (B, Hkv, M) = sum_j phi(k_j)
        out_i = phi(q_i)^T (S + new keys up to i) / phi(q_i)^T (z + same)

    so no key or value is stored. `attention(q, k, v, backend=...)` adds the new
    tokens (n >= 1: a prompt is processed in chunks, as the backend does) and
    returns their outputs; `append(k, v)` adds without attending. Sequences of a
    batch may hold different lengths (tracked in `length`): the state does not
    depend on positions (RoPE, if any, is applied to q and k before).

    Args:
        feature_map: "linear" (elu + 1) or the layer's `qkv.backends.linear.Performer`
            (the same object: its random features define the state; a redraw makes the
            state stale, which the next step refuses).
        scale: the layer's scale (None: 1/sqrt(head_dim)); a Performer's features use it.
        value_dim: Dv (default head_dim).

    A Performer state keeps a running max `offset` (B, Hkv) of the keys' exponents:
    the sums are stored divided by exp(offset), rescaled when a larger one
    arrives, which cancels in the output as the backend's constant does.
    """

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, *, feature_map="linear",
                 scale: float | None = None, value_dim: int | None = None, dtype: torch.dtype = torch.float32,
                 device=None, _views=None):
        self.n_kv_heads, self.head_dim = _check_int("n_kv_heads", n_kv_heads, 1), _check_int("head_dim", head_dim, 1)
        self.value_dim = head_dim if value_dim is None else _check_int("value_dim", value_dim, 1)
        if isinstance(feature_map, Performer):
            self.kind, self.feature_map, M = "performer", feature_map, feature_map.n_features
            self._draw = (feature_map.seed, feature_map.draws)
        elif feature_map == "linear":
            self.kind, self.feature_map, M = "linear", None, head_dim
        else:
            raise ValueError(f"feature_map must be 'linear' or a qkv.backends.linear.Performer, got {feature_map!r}")
        self.scale = (1.0 / head_dim ** 0.5) if scale is None else float(scale)
        self.n_features = M
        if _views is not None:
            self.S, self.z, self.offset, self._lengths = _views
            return
        _check_int("batch", batch, 1)
        sdt = torch.float64 if dtype == torch.float64 else torch.float32     # sums over many tokens: >= fp32
        self.S = torch.zeros(batch, n_kv_heads, M, self.value_dim, dtype=sdt, device=device)  # (B, Hkv, M, Dv)
        self.z = torch.zeros(batch, n_kv_heads, M, dtype=sdt, device=device)                  # (B, Hkv, M)
        self.offset = (torch.full((batch, n_kv_heads), float("-inf"), dtype=sdt, device=device)
                       if self.kind == "performer" else None)                                  # (B, Hkv)
        self._lengths = torch.zeros(batch, dtype=torch.long)

    @property
    def nbytes(self) -> int:
        """Bytes of the state: the same after 10 tokens or 10 million."""
        return sum(t.numel() * t.element_size() for t in (self.S, self.z, self.offset) if t is not None)

    @property
    def bytes_per_token(self) -> int:
        return 0

    @property
    def used_bytes(self) -> int:
        return self.nbytes

    def check_room(self, n: int) -> None:
        return None                                   # a running sum never fills

    def row(self, b: int) -> "LinearStateCache":
        """Sequence b alone (B = 1), sharing this state."""
        fm = self.feature_map if self.kind == "performer" else "linear"
        view = LinearStateCache(1, self.n_kv_heads, self.head_dim, feature_map=fm, scale=self.scale,
                                value_dim=self.value_dim,
                                _views=(self.S[b:b + 1], self.z[b:b + 1],
                                        None if self.offset is None else self.offset[b:b + 1],
                                        self._lengths[b:b + 1]))
        if self.kind == "performer":
            view._draw = self._draw
        return view

    def read(self):
        raise ValueError("a LinearStateCache keeps running sums, not keys and values: there is nothing to read; "
                         "attend with cache.attention(q, k, v, backend=...) (or use a ContiguousCache for keys)")

    def _check_kv(self, k: Tensor, v: Tensor) -> int:
        for name, t, d in (("k", k, self.head_dim), ("v", v, self.value_dim)):
            if (not isinstance(t, Tensor) or t.dim() != 4 or t.shape[0] != self.batch
                    or t.shape[1] != self.n_kv_heads or t.shape[3] != d):
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name} must be (B={self.batch}, Hkv={self.n_kv_heads}, n, {d}) for this cache, "
                                 f"got {shape}")
        if k.shape[2] != v.shape[2]:
            raise ValueError(f"k and v must hold the same tokens, got {k.shape[2]} and {v.shape[2]}")
        return k.shape[2]

    def _check_map(self) -> None:
        if self.kind != "performer":
            return
        active = current_feature_map()
        if active is not None and active is not self.feature_map:
            raise ValueError("this cache was built for another Performer than the one in use; build it with the "
                             "layer's feature map (layer.feature_map)")
        if (self.feature_map.seed, self.feature_map.draws) != self._draw:
            raise ValueError("the Performer's features were redrawn after this state was built, so the state is "
                             "stale; start a new cache after redraw()")

    def _key_features(self, k: Tensor):
        """phi(k) (B, Hkv, n, M) and the factor (B, Hkv) that brings the stored sums to the same offset."""
        cdt = self.S.dtype
        if self.kind == "linear":
            return elu_features(k.to(cdt)), None, None
        e = self.feature_map.exponent(k.to(cdt), self.scale)                    # (B, Hkv, n, M)
        new = torch.maximum(self.offset, e.amax(dim=(-1, -2)).detach())         # (B, Hkv) running max
        fk = torch.exp(e - new[..., None, None]) / self.n_features ** 0.5
        return fk, torch.exp(self.offset - new), new                            # exp(-inf) = 0 for an empty state

    def _update(self, fk: Tensor, v: Tensor, rescale, new_offset, q: Tensor | None):
        S0, z0 = self.S, self.z
        if rescale is not None:
            S0, z0 = S0 * rescale[..., None, None], z0 * rescale[..., None]
        out = None
        if q is None:
            S = S0 + torch.matmul(fk.transpose(-1, -2), v)
            z = z0 + fk.sum(2)
        else:
            B, Hq, n, D = q.shape
            cdt = self.S.dtype
            if self.kind == "linear":
                fq = elu_features(q.to(cdt))
            else:
                fq = self.feature_map.query_features(q.to(cdt), self.scale)
            fq = fq.view(B, self.n_kv_heads, Hq // self.n_kv_heads, n, fq.shape[-1])
            if n == 1:                    # a decode step: add the token to the sums, read them once
                S = S0 + fk.transpose(-1, -2) @ v                                  # (B, Hkv, M, Dv)
                z = z0 + fk[:, :, 0]                                               # (B, Hkv, M)
                out = _apply_state(fq, S, z)
            else:
                out, (S, z) = kernel_attention(fq, fk, v, causal=True, q_offset=0, state=(S0, z0),
                                               return_state=True)
            out = out.reshape(B, Hq, n, v.shape[-1]).to(q.dtype)
        self.S[...] = S
        self.z[...] = z
        if new_offset is not None:
            self.offset[...] = new_offset
        return out

    def append(self, k: Tensor, v: Tensor) -> None:
        """Add n tokens' keys and values (B, Hkv, n, D / Dv) to the sums."""
        n = self._check_kv(k, v)
        self._check_map()
        if n:
            fk, rescale, new = self._key_features(k)
            self._update(fk, v.to(self.S.dtype), rescale, new, None)
        self._lengths += n

    def attention(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, score_mod=None,
                  backend: str = "auto") -> Tensor:
        """Add k, v (B, Hkv, n, D), then return the n new queries' outputs (B, Hq, n, Dv).

        Query i sees every earlier token and the new ones up to itself (causal).
        `backend` must name this cache's kind ("linear" or "performer"), as a layer
        with `attention=` does: an exact layer cannot decode from a kernel state.
        """
        n = self._check_kv(k, v)
        if backend != self.kind:
            raise ValueError(f"this cache holds a {self.kind!r} attention state and cannot serve backend={backend!r}; "
                             f"use it with a layer built with attention={self.kind!r} (or a ContiguousCache for "
                             f"exact attention)")
        if score_mod is not None:
            raise ValueError("kernelised attention cannot add a score_mod (the scores are never formed)")
        if scale is not None and abs(float(scale) - self.scale) > 1e-12 * max(1.0, abs(self.scale)):
            raise ValueError(f"this cache was built for scale={self.scale}, got scale={scale}; build it with the "
                             f"layer's scale")
        if (not isinstance(q, Tensor) or q.dim() != 4 or q.shape[0] != self.batch or q.shape[2] != n
                or q.shape[3] != self.head_dim or q.shape[1] % self.n_kv_heads):
            shape = tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__
            raise ValueError(f"q must be (B={self.batch}, Hq (a multiple of {self.n_kv_heads}), n={n}, "
                             f"D={self.head_dim}), got {shape}")
        self._check_map()
        if n == 0:
            return q.new_zeros(q.shape[0], q.shape[1], 0, self.value_dim)
        fk, rescale, new = self._key_features(k)
        out = self._update(fk, v.to(self.S.dtype), rescale, new, q)
        self._lengths += n
        return out
