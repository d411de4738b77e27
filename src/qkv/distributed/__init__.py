"""Attention and training past one device, on torch.distributed (gloo on CPUs, NCCL on GPUs).

Two kinds of parallelism:

- data parallel (`world`): each rank trains on its rows of a global batch;
- context parallel: each rank holds its rows of one long *sequence* (`layout`: contiguous,
  zigzag, striped; `shard` / `unshard`) and attention runs across the ranks exactly:

  ring_attention       K/V shards travel round a ring behind the computation (any heads)
  ulysses_attention    all-to-all over heads (heads divisible by the group's size)
  context_attention    either, by `choose_strategy`

`sharded(ContextParallel(...))` makes qkv's attention layers and decoder do this inside a model
(`qkv train --context-parallel N`). `count()` records the messages a rank sends (tests assert the algorithm's numbers).
"""

from __future__ import annotations

from qkv.distributed.layout import LAYOUTS, Piece, group_size, order, pieces, positions, shard, unshard
from qkv.distributed.ring import ring_attention
from qkv.distributed.scope import ContextParallel, active, new_groups, sharded
from qkv.distributed.transport import Traffic, count
from qkv.distributed.ulysses import ulysses_attention
from qkv.distributed.world import (World, all_sum, barrier, check_divisible, env_world, is_main, process_group,
                                   shard_rows)

__all__ = ["World", "env_world", "process_group", "shard_rows", "check_divisible", "all_sum", "barrier", "is_main",
           "LAYOUTS", "Piece", "pieces", "positions", "shard", "unshard", "order",
           "ring_attention", "ulysses_attention", "context_attention", "choose_strategy", "bytes_per_rank",
           "count", "Traffic", "STRATEGIES", "ContextParallel", "sharded", "active", "new_groups"]

STRATEGIES = ("auto", "ring", "ulysses")


def bytes_per_rank(strategy: str, *, B: int, Hq: int, Hkv: int, Lr: int, D: int, N: int, itemsize: int) -> int:
    """Bytes one rank sends in one forward: the ring sends N - 1 K/V shards; all-to-all sends
    (N - 1) / N of its q, k, v and output rows."""
    if strategy == "ring":
        return (N - 1) * 2 * B * Hkv * Lr * D * itemsize
    if strategy == "ulysses":
        return (N - 1) * (2 * Hq + 2 * Hkv) * B * Lr * D * itemsize // N
    raise ValueError(f"strategy must be 'ring' or 'ulysses', got {strategy!r}")


def choose_strategy(Hq: int, Hkv: int, N: int) -> str:
    """"ulysses" where both head counts divide by N and it sends fewer bytes than the ring, else
    "ring". Per rank and forward the ring sends 2 Hkv (N - 1) units and all-to-all
    (2 Hq + 2 Hkv)(N - 1) / N, so all-to-all wins when (Hq + Hkv) < N Hkv: from N = 3 on with
    equal heads (MHA), from N = G + 2 with G query heads per K/V head. On a tie (MHA on 2 ranks)
    the ring wins: its transfers hide behind the computation, all-to-all's cannot."""
    if N <= 1 or Hq % N or Hkv % N:
        return "ring"
    return "ulysses" if Hq + Hkv < N * Hkv else "ring"


def context_attention(q, k, v, *, strategy: str = "auto", **kwargs):
    """`ring_attention` or `ulysses_attention` (same arguments and result) by `strategy`
    ("auto": `choose_strategy` for these heads and the group's size)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(map(repr, STRATEGIES))}, got {strategy!r}")
    if strategy == "auto":
        strategy = choose_strategy(q.shape[1], k.shape[1], group_size(kwargs.get("group")))
    return (ring_attention if strategy == "ring" else ulysses_attention)(q, k, v, **kwargs)
