"""Contiguous layouts: `ContiguousCache` (one (B, Hkv, max_len, D) buffer per layer) and
`RingCache` (the last `window` tokens of a sliding-window layer, written at position % window).

Legend: B batch (sequences), Hkv key/value heads, n new tokens, L tokens stored, W window, D head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qkv import decode
from qkv._util import hugepages
from qkv._util.checks import check_int as _check_int
from qkv.cache.base import CacheFull, LayerCache

__all__ = ["ContiguousCache", "RingCache"]


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
        self.write(k, v, self.check_new(k, v))

    def write(self, k: Tensor, v: Tensor, n: int) -> None:
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

    kernel_decode = True

    @property
    def block_size(self) -> int:
        """Slots of one block: a contiguous cache is one block of max_len slots per sequence."""
        return self.max_len

    def block_tables(self) -> tuple[Tensor, Tensor]:
        """((B, 1) zeros, (B,) lengths): the block tables of one block per sequence, and the lengths
        (this cache's own tensor, which the decode kernels advance in place)."""
        return self._one_block_table(), self._lengths

    def _one_block_table(self) -> Tensor:
        tables = self.__dict__.get("_one_block")
        if tables is None or tables.shape[0] != self.batch:
            tables = self._one_block = torch.zeros(self.batch, 1, dtype=torch.long)
        return tables

    def fused_ready(self):
        return (self.k.dtype == torch.float32 and self.k.is_cpu and self.k.is_contiguous()
                and self.v.is_contiguous() and self._lengths.is_contiguous())

    def claim_decode_slot(self):
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
        n = self.check_new(k, v)
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

    def time_ordered(self, b: int):
        """Sequence b's stored tokens oldest first: (Hkv, min(length, W), D) x2."""
        L, W = int(self._lengths[b]), self.window
        if L <= W:
            return self.k[b, :, :L], self.v[b, :, :L]
        order = (torch.arange(L - W, L) % W).to(self.k.device)
        return self.k[b][:, order], self.v[b][:, order]

    def attention(self, q, k, v, *, scale=None, score_mod=None, backend="auto", sinks=None):
        """Append, then attend (`qkv.decode.ring_step`)."""
        return decode.ring_step(self, q, k, v, scale=scale, score_mod=score_mod, backend=backend, sinks=sinks)

    @property
    def block_size(self) -> int:
        return self.window

    def block_tables(self) -> tuple[Tensor, Tensor]:
        """((B, 1) zeros, (B,) filled slots): the ring as one block of `window` slots per sequence, every
        stored key within the window (storage order does not matter to softmax)."""
        return torch.zeros(self.batch, 1, dtype=torch.long), torch.clamp(self._lengths, max=self.window)

    @property
    def used_bytes(self) -> int:
        return int(torch.clamp(self._lengths, max=self.window).sum()) * self.bytes_per_token
