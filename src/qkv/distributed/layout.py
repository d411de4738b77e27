"""How one sequence is split across the N ranks of a context-parallel group.

Legend: L the whole sequence, N ranks, r this rank, Lr = L / N rows per rank, c a chunk.

A layout gives each rank Lr of the L positions, as one or two *pieces*: runs of positions
`start, start + stride, ...`. A rank's rows are its pieces one after the other.

    contiguous   rank r holds [r Lr, (r + 1) Lr)                       one piece, stride 1
    zigzag       chunks of c = L / 2N; rank r holds chunks r and 2N-1-r   two pieces, stride 1
    striped      rank r holds r, r + N, r + 2N, ...                       one piece, stride N

    L = 8, N = 2      positions: 0 1 2 3 4 5 6 7
    contiguous        rank:      0 0 0 0 1 1 1 1
    zigzag            rank:      0 0 1 1 1 1 0 0
    striped           rank:      0 1 0 1 0 1 0 1

Under a causal mask the contiguous layout gives the last rank N times the first one's work;
zigzag and striped give every rank the same share (each holds early and late positions).
`shard` cuts a whole tensor into this rank's rows, `unshard` gathers the rows of every rank
back into sequence order; `positions` are this rank's absolute positions (for position ids).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["LAYOUTS", "Piece", "pieces", "positions", "shard", "unshard", "group_rank", "group_size",
           "check_layout"]

LAYOUTS = ("contiguous", "zigzag", "striped")


@dataclass(frozen=True)
class Piece:
    """A run of `length` absolute positions start, start + stride, ...; `row` is where it begins
    among the rank's own rows."""

    start: int
    stride: int
    length: int
    row: int

    def absolute(self, local: Tensor) -> Tensor:
        """Absolute positions of the piece's rows `local` (0-based within the piece)."""
        return self.start + self.stride * local

    @property
    def stop(self) -> int:
        """One past the piece's last absolute position."""
        return self.start + self.stride * (self.length - 1) + 1

    @property
    def rows(self) -> slice:
        return slice(self.row, self.row + self.length)


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    return layout


def _parts(layout: str, size: int) -> int:
    return 2 if layout == "zigzag" else 1


def check_length(L: int, layout: str, size: int) -> None:
    parts = _parts(layout, size) * size
    if L % parts:
        lo = L // parts * parts
        hint = f"{lo} or {lo + parts}" if lo else f"{parts}"
        raise ValueError(f"the {layout} layout over {size} ranks splits a sequence into {parts} equal parts; "
                         f"length {L} is not divisible by {parts}: pad or trim it to {hint}")


def pieces(layout: str, L: int, rank: int, size: int) -> list[Piece]:
    """The pieces rank `rank` of `size` holds of a sequence of length L, in its row order."""
    check_layout(layout)
    check_length(L, layout, size)
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is outside a group of {size}")
    Lr = L // size
    if layout == "contiguous":
        return [Piece(rank * Lr, 1, Lr, 0)]
    if layout == "striped":
        return [Piece(rank, size, Lr, 0)]
    c = L // (2 * size)
    return [Piece(rank * c, 1, c, 0), Piece((2 * size - 1 - rank) * c, 1, c, c)]


def positions(layout: str, L: int, rank: int, size: int, device=None) -> Tensor:
    """This rank's absolute positions (Lr,) int64, in row order: its position ids."""
    out = [p.absolute(torch.arange(p.length, device=device)) for p in pieces(layout, L, rank, size)]
    return torch.cat(out)


def group_rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def group_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def shard(x: Tensor, layout: str = "zigzag", group=None, *, dim: int = 2, rank: int | None = None,
          size: int | None = None) -> Tensor:
    """This rank's rows of a whole sequence `x` (its length along `dim`; 2 for (B, H, L, D)).

    rank / size default to the group's (one process: everything). Use `dim=-1` for position or
    document ids (B, L) or (L,). Returns a new contiguous tensor.
    """
    rank = group_rank(group) if rank is None else rank
    size = group_size(group) if size is None else size
    L = x.shape[dim]
    idx = positions(layout, L, rank, size, device=x.device)
    return x.index_select(dim, idx).contiguous()


def unshard(x: Tensor, layout: str = "zigzag", group=None, *, dim: int = 2) -> Tensor:
    """The whole sequence from every rank's rows `x` (inverse of `shard`): an all_gather, then
    the rows put back in sequence order. Every rank gets the whole tensor (not differentiable)."""
    size = group_size(group)
    if size == 1:
        return x.clone()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return order(torch.cat(parts, dim=dim), layout, size, dim=dim)


def order(gathered: Tensor, layout: str, size: int, *, dim: int = 2) -> Tensor:
    """Rows gathered rank after rank (rank 0's rows, then rank 1's, ...) in sequence order."""
    L = gathered.shape[dim]
    where = torch.cat([positions(layout, L, r, size, device=gathered.device) for r in range(size)])
    inverse = torch.empty_like(where)
    inverse[where] = torch.arange(L, device=gathered.device)
    return gathered.index_select(dim, inverse)
