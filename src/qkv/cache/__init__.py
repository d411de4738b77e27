"""KV caches: the keys and values of earlier tokens, kept so a decode step need not recompute them.

Legend: B batch (sequences), Hq query heads, Hkv key/value heads, G = Hq // Hkv,
n new tokens this step, L tokens stored, D head dim, bs block size, N pool slots.

A decoder step appends the new tokens' keys and values to every layer's cache and
attends from the new queries to everything stored. Three layouts, one interface::

    layer.length               (B,) tokens stored per sequence (tracked explicitly)
    layer.append(k, v)         k, v (B, Hkv, n, D): n new tokens for every sequence
    layer.read()               -> (k, v, allowed): what a query may attend to
    layer.attention(q, k, v)   append, then attend over the cache (what layers call;
                               the arithmetic is `qkv.decode`'s)

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

The package: `base` (the `LayerCache` protocol, errors, `CacheSpec`), `contiguous`
(ContiguousCache, RingCache), `paged` (BlockPool, PagedCache), `linear_state`
(LinearStateCache); this module bundles them per model (`Cache`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qkv._util.checks import check_int as _check_int
from qkv.cache.base import CacheFull, CacheSpec, LayerCache, RowOutOfRange, UnknownSequence, element_size
from qkv.cache.contiguous import ContiguousCache, RingCache
from qkv.cache.linear_state import LinearStateCache
from qkv.cache.paged import BlockPool, PagedCache
from qkv.decode import SPLIT_MIN_CHUNK, split_kv_attention, split_kv_rule

__all__ = ["LayerCache", "ContiguousCache", "RingCache", "PagedCache", "BlockPool", "Cache", "CacheFull",
           "UnknownSequence", "RowOutOfRange", "cache_bytes", "split_kv_attention", "split_kv_rule", "LinearStateCache",
           "CacheSpec"]


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
            self.pool.check_seq(sid)
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
    return 2 * n_layers * n_kv_heads * head_dim * tokens * element_size(dtype)
