"""The paged layout: a `BlockPool` of fixed-size blocks shared by every layer, and each layer's
`PagedCache` (K/V pools (Hkv, num_blocks * bs, D), one block table per sequence).

Legend: B batch (sequences), Hkv key/value heads, n new tokens, D head dim, bs block size,
N pool slots.
"""

from __future__ import annotations

import heapq

import torch
from torch import Tensor

from qkv import decode
from qkv._util import hugepages
from qkv._util.checks import check_int as _check_int
from qkv.cache.base import CacheFull, LayerCache, UnknownSequence

__all__ = ["BlockPool", "PagedCache"]


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

    def check_seq(self, sid: int) -> None:
        if sid not in self.tables:
            raise UnknownSequence(f"no sequence {sid} in this pool (freed, or never added); live: "
                                  f"{sorted(self.tables)}; pass the id of a live sequence")

    def blocks_needed(self, totals: dict[int, int]) -> int:
        """New blocks that `reserve_all(totals)` would allocate."""
        need = 0
        for sid, total in totals.items():
            self.check_seq(sid)
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
        self.check_seq(sid)
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
        self.check_seq(sid)
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
        self.check_seq(sid)
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

    def slots(self, sid: int, start: int, n: int) -> Tensor:
        """(n,) slot numbers of sequence `sid`'s tokens start..start+n-1."""
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
        n = self.check_new(k, v)
        flat = self._place(n)
        self.k[:, flat] = k.permute(1, 0, 2, 3).reshape(self.n_kv_heads, -1, self.head_dim)  # (Hkv, B*n, D)
        self.v[:, flat] = v.permute(1, 0, 2, 3).reshape(self.n_kv_heads, -1, self.head_dim)

    def fused_ready(self):
        return self.k.dtype == torch.float32 and self.k.is_cpu and self.k.is_contiguous() and self.v.is_contiguous()

    def claim_decode_slot(self):
        slots = self._place(1)                         # blocks, positions and lengths claimed; K/V come from the kernel
        tables, lengths = self.block_tables()
        return dict(kpool=self.k[None], vpool=self.v[None], slots=slots, tables=tables, lengths=lengths,
                    advance=False, block_size=self.pool.block_size)

    def _place(self, n: int) -> Tensor:
        """Reserve and claim the slots of n new tokens per sequence (blocks, positions, lengths);
        returns them (B*n,) in (sequence, token) order, for the caller to write K and V into."""
        starts = tuple(self.lengths_by_seq.get(sid, 0) for sid in self.seqs)
        # all or nothing; a no-op for every layer after the first
        self.pool.reserve_all({sid: start + n for sid, start in zip(self.seqs, starts)})

        def make():
            slots = torch.cat([self.slots(sid, s, n) for sid, s in zip(self.seqs, starts)])   # (B*n,)
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

    def attention(self, q, k, v, *, scale=None, score_mod=None, backend="auto", sinks=None):
        """Append, then attend (`qkv.decode.paged_step`)."""
        return decode.paged_step(self, q, k, v, scale=scale, score_mod=score_mod, backend=backend, sinks=sinks)

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    def block_tables(self):
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
