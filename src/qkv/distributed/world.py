"""Data-parallel helpers on torch.distributed: the launcher's environment, the
process group's lifetime, a rank's share of a global batch.

Legend: B global batch, b = B / W rows per rank, W world size, T context.

`torchrun --nproc_per_node=W -m qkv train ...` sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; `qkv.train.train_lm` reads them through `process_group`.
Every rank draws the same global batch (the data stream is a pure function of
(seed, step, micro)) and keeps its own contiguous rows; with equal token counts per
rank, DistributedDataParallel's gradient average equals the one-process gradient
of the global batch.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["World", "env_world", "process_group", "shard_rows", "check_divisible", "all_sum", "barrier", "is_main"]


_generation = itertools.count()     # groups this process has created (the same sequence on every rank)


@dataclass(frozen=True)
class World:
    """This process's place: rank in 0..size-1, local_rank on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints, plots and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer (set by torchrun)") from None


def env_world() -> World:
    """This process's World: the initialised group's, else the one the launcher describes in
    RANK / WORLD_SIZE / LOCAL_RANK (one process without them)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", dist.get_rank()))
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if size < 1 or not 0 <= rank < size or local < 0:
        raise ValueError(f"inconsistent launcher environment: RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local}")
    return World(rank, size, local)


def is_main() -> bool:
    """True on rank 0 (or without a launcher): for printing once per job."""
    return env_world().rank == 0


@contextlib.contextmanager
def process_group(device: str | torch.device = "cpu") -> Iterator[World]:
    """The World of this process, with torch.distributed initialised for its duration.

    With WORLD_SIZE > 1 and no group yet, initialise one from the environment
    (gloo for a CPU `device`, nccl for CUDA) and destroy it on exit, also on error.
    A group the caller already initialised is used as is and left alone.
    """
    already = dist.is_available() and dist.is_initialized()
    world = env_world()
    if already or not world.distributed:
        yield world
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world.size} but {', '.join(missing)} is not set; launch with torchrun "
                         f"--nproc_per_node={world.size} -m qkv train ...")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    # A fresh key prefix per group: the launcher's store outlives a destroyed group, and a second group
    # in the same processes must not read the first one's rendezvous keys.
    store, _, _ = next(dist.rendezvous("env://", rank=world.rank, world_size=world.size))
    store = dist.PrefixStore(f"qkv-group-{next(_generation)}", store)
    dist.init_process_group(backend, store=store, rank=world.rank, world_size=world.size)
    try:
        yield world
        # every rank done before any tears the group down (hardening only: the rank that aborted
        # at exit under load was cured by train_lm releasing its DDP wrapper first)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def check_divisible(batch_size: int, world: World) -> int:
    """Rows per rank, b = B / W; a clear error when W does not divide B."""
    if batch_size % world.size:
        lo = batch_size // world.size * world.size
        hint = f"{lo} or {lo + world.size}" if lo else f"{world.size}"
        raise ValueError(f"batch_size (--batch-size) {batch_size} is the global batch and must be divisible by the "
                         f"{world.size} processes (WORLD_SIZE); use {hint}, or another --nproc_per_node")
    return batch_size // world.size


def shard_rows(x: Tensor, world: World) -> Tensor:
    """This rank's contiguous rows of a global batch: x (B, ...) -> (B / W, ...)."""
    b = check_divisible(x.shape[0], world)
    return x[world.rank * b:(world.rank + 1) * b]


def all_sum(values: list[float], world: World) -> list[float]:
    """Element-wise sum of `values` over all ranks, in float64 (identity in one process)."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def barrier(world: World) -> None:
    """Wait for every rank (no-op in one process)."""
    if world.distributed:
        dist.barrier()
