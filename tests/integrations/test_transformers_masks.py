"""qkv's mask function against transformers' own dense masks, case by case.

Every mask closure transformers builds (causal, sliding window, bidirectional window, packed
sequences, padding, cache offsets) and one it cannot know (a user's and_mask_function) must
allow exactly what `transformers.masking_utils.sdpa_mask` allows.
"""

from __future__ import annotations

import pytest
import torch

mu = pytest.importorskip("transformers.masking_utils")

import qkv.integrations.transformers as qi  # noqa: E402
from qkv import masks  # noqa: E402


def _dense(hf: qi.HFMask, B: int, Lq: int, Lk: int) -> torch.Tensor:
    if hf.mask is None:
        return torch.ones(B, 1, Lq, Lk, dtype=torch.bool)
    return masks.evaluate(hf.mask, B, 1, Lq, Lk, q_offset=hf.q_offset).expand(B, 1, Lq, Lk)


def _reference(**kw) -> torch.Tensor:
    out = mu.sdpa_mask(allow_is_causal_skip=False, allow_is_bidirectional_skip=False, use_vmap=True, **kw)
    return out.expand(kw["batch_size"], 1, kw["q_length"], kw["kv_length"])


def _padding(B, n, left=3):
    am = torch.ones(B, n, dtype=torch.bool)
    am[-1, :left] = False
    return am


def _user_rule(b, h, q_idx, kv_idx):           # not one of transformers' closures: kept per element
    return (kv_idx % 3) != 1


CASES = {
    "causal": dict(mask_function=mu.causal_mask_function),
    "causal, padded": dict(mask_function=mu.causal_mask_function, attention_mask=_padding(2, 12)),
    "bidirectional, padded": dict(mask_function=mu.bidirectional_mask_function, attention_mask=_padding(2, 12)),
    "sliding window 4": dict(mask_function=mu.sliding_window_causal_mask_function(4)),
    "bidirectional window 2": dict(mask_function=mu.sliding_window_bidirectional_mask_function(2)),
    "window overlay alone": dict(mask_function=mu.sliding_window_overlay(3)),
    "user and_mask": dict(mask_function=mu.and_masks(mu.causal_mask_function, _user_rule)),
    "user or_mask": dict(mask_function=mu.or_masks(mu.causal_mask_function, _user_rule)),
    "chunked": dict(mask_function=mu.chunked_causal_mask_function(4, torch.tensor([0, 2]))),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("q_length, kv_length, q_offset, kv_offset", [(12, 12, 0, 0), (1, 12, 11, 0), (3, 8, 9, 4)])
def test_mask_function_allows_what_transformers_allows(case, q_length, kv_length, q_offset, kv_offset):
    kw = dict(CASES[case])
    if "attention_mask" in kw:
        kw["attention_mask"] = _padding(2, kv_offset + kv_length)
    hf = qi.mask_function(batch_size=2, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                          kv_offset=kv_offset, **kw)
    ref = _reference(batch_size=2, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     **kw)
    assert torch.equal(_dense(hf, 2, q_length, kv_length), ref)


def test_packed_sequences_become_documents_and_match():
    pos = torch.cat([torch.arange(5), torch.arange(4), torch.arange(7)])[None].expand(2, -1)
    packed = mu.find_packed_sequence_indices(pos)
    fn = mu.and_masks(mu.remap_positions_for_packed_sequence(mu.sliding_window_causal_mask_function(3), pos),
                      mu.packed_sequence_mask_function(packed))
    hf = qi.mask_function(batch_size=2, q_length=16, kv_length=16, mask_function=fn)
    assert "document(" in repr(hf.mask) and "sliding_window(3" in repr(hf.mask)
    ref = _reference(batch_size=2, q_length=16, kv_length=16, mask_function=fn)
    assert torch.equal(_dense(hf, 2, 16, 16), ref)


def test_recognised_masks_keep_analytic_tiles():
    hf = qi.mask_function(batch_size=1, q_length=4096, kv_length=4096, mask_function=mu.causal_mask_function)
    bm = hf.mask.block_mask(4096, 4096, block=128)
    assert bm.sparsity > 0.45            # the tiled backend skips the upper triangle


def test_a_padding_mask_of_the_wrong_rank_is_refused():
    with pytest.raises(ValueError, match="2-D padding mask"):
        qi.mask_function(batch_size=1, q_length=4, kv_length=4, mask_function=mu.causal_mask_function,
                         attention_mask=torch.ones(1, 1, 4, 4, dtype=torch.bool))
