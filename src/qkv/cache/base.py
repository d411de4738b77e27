"""The layer-cache protocol (`LayerCache`), the errors caches raise, and `CacheSpec`.

Legend: B batch (sequences), Hq query heads, Hkv key/value heads, n new tokens, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from qkv import backends, decode

__all__ = ["LayerCache", "CacheSpec", "CacheFull", "UnknownSequence", "RowOutOfRange", "element_size"]


class CacheFull(ValueError):
    """An append needs more room than the cache was built with."""


class UnknownSequence(KeyError, ValueError):
    """A sequence id that a paged cache's pool does not hold (freed, or never added).

    A KeyError (the pool is a mapping of sequence ids) and a ValueError (a bad argument)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RowOutOfRange(IndexError, ValueError):
    """A batch row index outside 0..B-1 (an IndexError and a ValueError)."""


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class LayerCache:
    """One layer's cache for a batch of B sequences: storage and bookkeeping; the arithmetic of a
    cached step lives in `qkv.decode`.

    The protocol `qkv.decode`, `qkv.fused` and the layers use (a cache of another layout
    implements these):

        length (B,) int64        tokens stored per sequence        batch, window, k, v
        check_new(k, v) -> n     the new tokens' keys and values fit this cache (raises otherwise)
        check_query(q, n, scale, backend)   the rest of an attention call, before anything changes
        write(k, v, n)           append after check_new passed       append(k, v): checked append
        check_room(n)            raise CacheFull, changing nothing, unless n more tokens fit
        read()                   (k, v, allowed): what a query may attend to
        attention(q, k, v, *, scale, score_mod, backend, sinks)   append, then attend (one line into
                                 `qkv.decode`); sinks (Hq,) as in `qkv.attention`
        kernel_decode            whether a one-token step may read the storage through
                                 `qkv.kernels.paged_decode` (with block_tables() and block_size)
        fused_ready()            whether the fused decode block (`qkv.fused`) can write and read it
        claim_decode_slot()      claim the new token's slot for the fused step (after check_room(1))
    """

    n_kv_heads: int
    head_dim: int
    window: int | None = None      # a sliding-window layer attends to the last `window` keys only
    kernel_decode = False          # see the class docstring
    split_kv: int | str = "auto"   # key chunks of a decode step: an int, or "auto" (`qkv.decode.split_kv_rule`)

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

    def check_new(self, k: Tensor, v: Tensor) -> int:
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

    def check_query(self, q: Tensor, n: int, scale, backend) -> None:
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
            backends.get(backend)                  # an unknown name: ValueError listing the registered ones

    def attention(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, score_mod=None,
                  backend: str = "auto", sinks: Tensor | None = None) -> Tensor:
        """Append k, v (B, Hkv, n, D), then attend from q (B, Hq, n, D) to the whole cache
        (`qkv.decode.contiguous_step`), with `sinks` (Hq,) as in `qkv.attention`. Returns (B, Hq, n, D)."""
        return decode.contiguous_step(self, q, k, v, scale=scale, score_mod=score_mod, backend=backend, sinks=sinks)

    def write(self, k: Tensor, v: Tensor, n: int) -> None:
        """`append` after `check_new` has passed (n new tokens)."""
        self.append(k, v)

    def fused_ready(self) -> bool:
        """Whether the fused decode block (`qkv.fused`) can write and read this cache:
        fp32 CPU storage in a layout `qkv.kernels.blocks_step` takes. No side effects."""
        return False

    def claim_decode_slot(self) -> dict:
        """For a fused one-token step, after `check_room(1)`: claim each sequence's slot for
        the new token and say where the kernel writes it and what it reads (`blocks_step`'s
        kpool, vpool, slots, tables, lengths, advance, block_size)."""
        raise NotImplementedError


@dataclass
class CacheSpec:
    """What a model tells `Cache.contiguous` / `Cache.paged` about one layer."""

    n_kv_heads: int
    head_dim: int
    window: int | None
