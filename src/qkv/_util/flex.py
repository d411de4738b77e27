"""FlexAttention's BlockMask tables and block selections, both ways.

Legend: B' in {1, B}, H' in {1, H}, nQ/nK query/key blocks of a (BLOCK_Q x BLOCK_K) grid.

`torch.nn.attention.flex_attention.BlockMask` lists, per (batch, head, query block), the key
blocks to compute: `kv_num_blocks` (B', H', nQ) and `kv_indices` (B', H', nQ, nK) for the blocks
whose mask_mod is applied, `full_kv_*` for those computed unmasked; any other block is skipped.
qkv's tiles say the same with a kind per tile (EMPTY, PARTIAL, FULL). These helpers turn a pair of
bool selections (partial, full), each (B', H', nQ, nK), into a BlockMask and back; `qkv.masks`
builds on them (`as_mask(block_mask)`, `Mask.to_flex`). torch's flex_attention module is imported
only when a BlockMask is made or met.
"""

from __future__ import annotations

import sys

import torch

__all__ = ["FLEX_MODULE", "is_block_mask", "block_mask", "selections"]

FLEX_MODULE = "torch.nn.attention.flex_attention"


def is_block_mask(obj) -> bool:
    """Whether `obj` is a FlexAttention BlockMask (without importing FlexAttention when it is not loaded)."""
    module = sys.modules.get(FLEX_MODULE)
    return module is not None and isinstance(obj, module.BlockMask)


def _tables(sel: torch.Tensor):
    """(num, indices) int32: how many blocks each row selects and which, first (ascending)."""
    num = sel.sum(dim=-1, dtype=torch.int32)                                        # (B', H', nQ)
    order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)              # selected blocks first
    return num, order.to(torch.int32)                                               # (B', H', nQ, nK)


def block_mask(partial: torch.Tensor, full: torch.Tensor, block: tuple[int, int], seq_lengths: tuple[int, int],
               mask_mod):
    """A FlexAttention BlockMask from bool selections (B', H', nQ, nK) of partial and full blocks."""
    import torch.nn.attention.flex_attention as fa  # here: qkv never imports FlexAttention unasked

    num, idx = _tables(partial)
    full_num, full_idx = _tables(full)
    return fa.BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=tuple(block), mask_mod=mask_mod,
                                       seq_lengths=tuple(seq_lengths))


def _selection(num: torch.Tensor, idx: torch.Tensor, n_k: int) -> torch.Tensor:
    """(B', H', nQ, n_k) bool from (num, indices) tables (entries past num are undefined, and ignored)."""
    valid = torch.arange(idx.shape[-1], device=idx.device) < num[..., None].long()   # (B', H', nQ, cols)
    cols = torch.where(valid, idx.long().clamp(0, n_k), torch.full_like(idx.long(), n_k))
    out = torch.zeros(*idx.shape[:-1], n_k + 1, dtype=torch.bool, device=idx.device)
    out.scatter_(-1, cols, True)
    return out[..., :n_k]                                                            # column n_k took the padding


def selections(bm) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """(partial, full, (BLOCK_Q, BLOCK_K)) of a FlexAttention BlockMask: bool (B', H', nQ, nK) each.

    Without full tables every listed block is partial (the mask_mod is applied to it)."""
    block = bm.BLOCK_SIZE if isinstance(bm.BLOCK_SIZE, tuple) else (bm.BLOCK_SIZE, bm.BLOCK_SIZE)
    bq, bk = (int(b) for b in block)
    n_k = max(-(-int(bm.seq_lengths[1]) // bk), 1)
    partial = _selection(bm.kv_num_blocks, bm.kv_indices, n_k)
    if bm.full_kv_num_blocks is None:
        full = torch.zeros_like(partial)
    else:
        full = _selection(bm.full_kv_num_blocks, bm.full_kv_indices, n_k)
    return partial, full, (bq, bk)
