"""A model forward whose sequence is split across a group: `with sharded(cp): model(tokens_shard)`.

Inside `sharded`, qkv's attention layers attend across the group (`context_attention` with the
group, layout and strategy of the active `ContextParallel`) instead of within the rank's rows,
and the decoder numbers its tokens with the rank's absolute positions (`ContextParallel.positions`);
everything else in a Transformer acts per token and needs no change.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor

from .layout import check_layout, positions, shard

__all__ = ["ContextParallel", "sharded", "active", "new_groups"]


@dataclass(frozen=True)
class ContextParallel:
    """A context-parallel group: its process group (None: the whole world), this rank's place in
    it, how sequences are laid out, and the strategy ("auto", "ring", "ulysses")."""

    group: object = None
    rank: int = 0
    size: int = 1
    layout: str = "zigzag"
    strategy: str = "ring"

    def __post_init__(self):
        check_layout(self.layout)

    def positions(self, rows: int, device=None) -> Tensor:
        """This rank's absolute positions (rows,) when it holds `rows` positions of a sequence."""
        return positions(self.layout, rows * self.size, self.rank, self.size, device=device)

    def shard(self, x: Tensor, dim: int = -1) -> Tensor:
        """This rank's rows of a whole sequence `x` along `dim` (token ids: the last dim)."""
        return shard(x, self.layout, dim=dim, rank=self.rank, size=self.size)


_ACTIVE: contextvars.ContextVar[ContextParallel | None] = contextvars.ContextVar("qkv_context_parallel",
                                                                                 default=None)


def active() -> ContextParallel | None:
    """The ContextParallel of the enclosing `sharded`, else None."""
    return _ACTIVE.get()


@contextlib.contextmanager
def sharded(cp: ContextParallel) -> Iterator[ContextParallel]:
    """Run model forwards (and their backwards, which follow the same group) with `cp` active."""
    if not isinstance(cp, ContextParallel):
        raise TypeError(f"sharded() takes a qkv.distributed.ContextParallel, got {type(cp).__name__}")
    token = _ACTIVE.set(cp)
    try:
        yield cp
    finally:
        _ACTIVE.reset(token)


def new_groups(size: int, world_size: int, rank: int, *, layout: str = "zigzag", strategy: str = "ring"):
    """Split a world of `world_size` ranks into context-parallel groups of `size` consecutive ranks
    (world = size x data-parallel groups); returns (this rank's ContextParallel, its data-parallel
    index). Every rank must call it (it creates every group, in the same order)."""
    if size < 1 or world_size % size:
        raise ValueError(f"--context-parallel {size} must divide the {world_size} processes (WORLD_SIZE); "
                         f"the world is context-parallel x data-parallel ranks")
    if size == 1:
        return None, rank
    group = None
    if size < world_size:
        for d in range(world_size // size):                 # all ranks create all groups
            ranks = list(range(d * size, (d + 1) * size))
            g = dist.new_group(ranks=ranks)
            if rank in ranks:
                group = g
    return ContextParallel(group, rank % size, size, layout, strategy), rank // size
