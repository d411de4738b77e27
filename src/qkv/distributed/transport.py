"""Messages between the ranks of a context-parallel group, on torch.distributed (gloo on CPUs,
NCCL on GPUs), counted.

The ring sends one message to the next rank and receives one from the previous rank at a time
(`Ring.shift`: an isend and an irecv started together, waited on later, so the transfer runs
while the rank computes). Several tensors travel as one message: their bytes packed into one
uint8 buffer (`pack` / `unpack`). Every wait has a deadline (`TIMEOUT_S`, or the environment
variable QKV_CP_TIMEOUT): a rank whose peer has failed raises a RuntimeError that says so,
never waits for ever. `count()` records the messages and bytes of the calls inside it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Traffic", "count", "Ring", "pack", "unpack", "timeout", "TIMEOUT_S", "all_to_all"]

TIMEOUT_S = 300.0


def timeout() -> float:
    raw = os.environ.get("QKV_CP_TIMEOUT")
    if not raw:
        return TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"QKV_CP_TIMEOUT={raw!r} must be a number of seconds") from None
    if value <= 0:
        raise ValueError(f"QKV_CP_TIMEOUT={raw!r} must be positive")
    return value


@dataclass
class Traffic:
    """What this rank sent and received inside `count()`: point-to-point messages by phase
    ("forward", "backward"), collectives, and bytes."""

    sent: dict = field(default_factory=dict)
    received: dict = field(default_factory=dict)
    collectives: dict = field(default_factory=dict)
    bytes_sent: int = 0

    def add(self, phase: str, kind: str, nbytes: int) -> None:
        table = {"send": self.sent, "recv": self.received}.get(kind, self.collectives)
        table[phase] = table.get(phase, 0) + 1
        if kind != "recv":
            self.bytes_sent += nbytes


_LOGS: list[Traffic] = []


@contextlib.contextmanager
def count():
    """Record this rank's messages: `with count() as t: ...; t.sent["forward"]`."""
    log = Traffic()
    _LOGS.append(log)
    try:
        yield log
    finally:
        _LOGS.remove(log)


def _note(phase: str, kind: str, nbytes: int) -> None:
    for log in _LOGS:
        log.add(phase, kind, nbytes)


def pack(tensors: list[Tensor]) -> Tensor:
    """The tensors' bytes, one after the other, as one uint8 tensor."""
    return torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in tensors])


def unpack(buf: Tensor, like: list[tuple]) -> list[Tensor]:
    """Tensors of the (shape, dtype) pairs `like` from a buffer `pack` made."""
    out, at = [], 0
    for shape, dtype in like:
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        out.append(buf[at:at + n].view(dtype).view(shape))
        at += n
    return out


def _failed(what: str, rank: int, peer: int, err: Exception) -> RuntimeError:
    return RuntimeError(f"context parallel, rank {rank}: {what} rank {peer} failed or timed out after "
                        f"{timeout():g} s ({type(err).__name__}: {err}). Another rank has probably stopped "
                        f"with an error: see its output (QKV_CP_TIMEOUT sets the deadline)")


class Ring:
    """This rank's neighbours in `group`: it sends to rank + 1 and receives from rank - 1."""

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.size = dist.get_world_size(group) if dist.is_initialized() else 1
        nxt, prv = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        self.next_rank, self.prev_rank = nxt, prv
        self.next = dist.get_global_rank(group, nxt) if group is not None else nxt
        self.prev = dist.get_global_rank(group, prv) if group is not None else prv

    def shift(self, send: Tensor, phase: str, tag: int = 0):
        """Start sending `send` to the next rank and receiving a tensor like it from the previous
        one; `wait` on the result for the received tensor."""
        recv = torch.empty_like(send)
        ops = [dist.P2POp(dist.isend, send, self.next, self.group, tag),
               dist.P2POp(dist.irecv, recv, self.prev, self.group, tag)]
        works = dist.batch_isend_irecv(ops)
        _note(phase, "send", send.numel() * send.element_size())
        _note(phase, "recv", 0)
        return _Pending(self, send, recv, works)


class _Pending:
    def __init__(self, ring: Ring, send: Tensor, recv: Tensor, works):
        self.ring, self.send, self.recv, self.works = ring, send, recv, works

    def wait(self) -> Tensor:
        deadline = timedelta(seconds=timeout())
        for i, work in enumerate(self.works):
            try:
                ok = work.wait(deadline)
            except Exception as err:      # noqa: BLE001 - gloo and NCCL raise their own types
                what, peer = ("sending to", self.ring.next_rank) if i == 0 else ("receiving from", self.ring.prev_rank)
                raise _failed(what, self.ring.rank, peer, err) from err
            if ok is False:
                raise _failed("waiting for", self.ring.rank, self.ring.prev_rank, TimeoutError("no answer"))
        return self.recv


def all_to_all(x: Tensor, group, phase: str) -> Tensor:
    """dist.all_to_all_single over dim 0 of x (N equal parts), with the deadline."""
    out = torch.empty_like(x)
    work = dist.all_to_all_single(out, x.contiguous(), group=group, async_op=True)
    n = dist.get_world_size(group)
    _note(phase, "all_to_all", x.numel() * x.element_size() * (n - 1) // n)   # its own part stays
    try:
        work.wait(timedelta(seconds=timeout()))
    except Exception as err:              # noqa: BLE001
        rank = dist.get_rank(group)
        raise RuntimeError(f"context parallel, rank {rank}: the all-to-all failed or timed out after "
                           f"{timeout():g} s ({type(err).__name__}: {err}). Another rank has probably stopped "
                           f"with an error: see its output (QKV_CP_TIMEOUT sets the deadline)") from err
    return out
