"""Masks: `to_dense` against a direct element-by-element definition, and BlockMask tile classes.

Legend: B batch, H heads, Lq/Lk lengths; positions are absolute (queries start at q_offset).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qkv
from qkv import masks as M


# Each case: a builder (rng, B, H, Lk, span) -> (mask, predicate(b, h, q, kv) -> bool written as plain Python).
def _ids(rng, B, L, sorted_=True):
    if sorted_:
        return np.sort(rng.integers(0, 4, size=(B, L)), axis=1)
    return rng.integers(0, 3, size=(B, L))


def case_causal(rng, B, H, span):
    return M.causal(), lambda b, h, q, kv: kv <= q


def case_window(rng, B, H, span):
    w = int(rng.integers(1, 9))
    return M.sliding_window(w), lambda b, h, q, kv: 0 <= q - kv < w


def case_window_sym(rng, B, H, span):
    w = int(rng.integers(1, 9))
    return M.sliding_window(w, causal=False), lambda b, h, q, kv: abs(q - kv) < w


def case_prefix(rng, B, H, span):
    n = int(rng.integers(0, span + 1))
    return M.prefix_lm(n), lambda b, h, q, kv: kv < n or kv <= q


def case_document(rng, B, H, span):
    ids = _ids(rng, B, span)
    return M.document(torch.tensor(ids)), lambda b, h, q, kv: ids[b, q] == ids[b, kv]


def case_document_unsorted(rng, B, H, span):
    ids = _ids(rng, B, span, sorted_=False)
    return M.document(torch.tensor(ids)), lambda b, h, q, kv: ids[b, q] == ids[b, kv]


def case_document_1d(rng, B, H, span):
    ids = np.sort(rng.integers(0, 5, size=span))
    return M.document(torch.tensor(ids)), lambda b, h, q, kv: ids[q] == ids[kv]


def case_padding(rng, B, H, span):
    lengths = rng.integers(0, span + 2, size=B)
    return M.padding(torch.tensor(lengths)), lambda b, h, q, kv: kv < lengths[b]


def case_global(rng, B, H, span):
    idx = sorted(set(rng.integers(0, span, size=3).tolist()))
    return M.global_tokens(idx), lambda b, h, q, kv: q in idx or kv in idx


def case_dilated(rng, B, H, span):
    w, d = int(rng.integers(1, 5)), int(rng.integers(1, 4))
    return M.dilated(w, d), lambda b, h, q, kv: 0 <= q - kv <= (w - 1) * d and (q - kv) % d == 0


def case_dilated_sym(rng, B, H, span):
    w, d = int(rng.integers(1, 5)), int(rng.integers(1, 4))
    return (M.dilated(w, d, causal=False),
            lambda b, h, q, kv: abs(q - kv) <= (w - 1) * d and abs(q - kv) % d == 0)


def case_block_sparse(rng, B, H, span):
    bq, bk = int(rng.integers(1, 6)), int(rng.integers(1, 6))
    layout = rng.random((H, -(-span // bq), -(-span // bk))) < 0.5
    return (M.block_sparse(torch.tensor(layout), (bq, bk)),
            lambda b, h, q, kv: bool(layout[h, q // bq, kv // bk]))


def case_callable(rng, B, H, span):
    return M.as_mask(lambda b, h, q, kv: (q * 3 + kv + h) % 4 != 1), lambda b, h, q, kv: (q * 3 + kv + h) % 4 != 1


def case_and(rng, B, H, span):
    (m1, p1), (m2, p2) = case_window_sym(rng, B, H, span), case_document(rng, B, H, span)
    return m1 & m2, lambda *a: p1(*a) and p2(*a)


def case_or(rng, B, H, span):
    (m1, p1), (m2, p2) = case_causal(rng, B, H, span), case_global(rng, B, H, span)
    return m1 | m2, lambda *a: p1(*a) or p2(*a)


def case_not(rng, B, H, span):
    m1, p1 = case_prefix(rng, B, H, span)
    return ~m1, lambda *a: not p1(*a)


def case_nested(rng, B, H, span):
    (m1, p1), (m2, p2), (m3, p3) = (case_dilated(rng, B, H, span), case_padding(rng, B, H, span),
                                    case_callable(rng, B, H, span))
    return (m1 | ~m3) & m2, lambda *a: (p1(*a) or not p3(*a)) and p2(*a)


CASES = {f.__name__[5:]: f for f in [
    case_causal, case_window, case_window_sym, case_prefix, case_document, case_document_unsorted,
    case_document_1d, case_padding, case_global, case_dilated, case_dilated_sym, case_block_sparse,
    case_callable, case_and, case_or, case_not, case_nested]}


def _dense_by_loops(pred, B, H, Lq, Lk, q_offset):
    out = np.zeros((B, H, Lq, Lk), dtype=bool)
    for b in range(B):
        for h in range(H):
            for r in range(Lq):
                for kv in range(Lk):
                    out[b, h, r, kv] = pred(b, h, q_offset + r, kv)
    return out


def _check_block_mask(mask, B, H, Lq, Lk, q_offset, bq, bk, dense):
    bm = mask.block_mask(Lq, Lk, block=(bq, bk), B=B, H=H, q_offset=q_offset)
    kind = bm.kind.expand(B, H, -1, -1)
    assert kind.shape[-2:] == (-(-Lq // bq), -(-Lk // bk))
    for i in range(kind.shape[2]):
        for j in range(kind.shape[3]):
            tile = dense[:, :, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            for b in range(B):
                for h in range(H):
                    kd, t = int(kind[b, h, i, j]), tile[b, h]
                    assert kd != M.FULL or t.all(), f"FULL tile ({i},{j}) has a masked element"
                    assert kd != M.EMPTY or not t.any(), f"EMPTY tile ({i},{j}) has an allowed element"
    assert np.array_equal(bm.to_dense().expand(B, H, Lq, Lk).numpy(), dense)
    return bm


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("seed", range(4))
def test_to_dense_equals_elementwise_definition_and_tiles_are_consistent(name, seed):
    rng = np.random.default_rng(seed)
    B, H = 2, 3
    Lk = int(rng.integers(1, 24))
    Lq = int(rng.integers(1, Lk + 1))
    q_offset = Lk - Lq if seed % 2 == 0 else int(rng.integers(0, Lk - Lq + 1))
    mask, pred = CASES[name](rng, B, H, Lk)
    expected = _dense_by_loops(pred, B, H, Lq, Lk, q_offset)
    got = mask.to_dense(Lq, Lk, B=B, H=H, q_offset=q_offset)
    assert got.shape == (B, H, Lq, Lk) and got.dtype == torch.bool
    assert np.array_equal(got.numpy(), expected)
    # the NumPy evaluation used by the oracle agrees too
    assert np.array_equal(qkv.reference.mask_array(mask, B, H, Lq, Lk, q_offset), expected)
    bq, bk = int(rng.integers(1, 9)), int(rng.integers(1, 9))
    _check_block_mask(mask, B, H, Lq, Lk, q_offset, bq, bk, expected)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(CASES)), seed=st.integers(0, 10_000), Lk=st.integers(1, 40),
       frac=st.floats(0.0, 1.0), bq=st.integers(1, 12), bk=st.integers(1, 12))
def test_block_mask_consistency_property(name, seed, Lk, frac, bq, bk):
    rng = np.random.default_rng(seed)
    Lq = max(1, int(round(frac * Lk)))
    B, H = 2, 2
    mask, pred = CASES[name](rng, B, H, Lk)
    expected = _dense_by_loops(pred, B, H, Lq, Lk, Lk - Lq)
    assert np.array_equal(mask.to_dense(Lq, Lk, B=B, H=H).numpy(), expected)
    _check_block_mask(mask, B, H, Lq, Lk, Lk - Lq, bq, bk, expected)


@pytest.mark.parametrize("mask,L,exact_counts", [
    # 8 x 8 tiles of 128: the diagonal is partial, below it full, above it empty
    (M.causal(), 1024, {"EMPTY": 28, "PARTIAL": 8, "FULL": 28}),
    # q - kv spans [1, 255] one tile below the diagonal (all inside the window: full, 7 tiles),
    # [129, 383] two below (partial, 6), and the diagonal is partial (8): the other 43 are empty
    (M.sliding_window(256), 1024, {"EMPTY": 43, "PARTIAL": 14, "FULL": 7}),
])
def test_analytic_tile_counts(mask, L, exact_counts):
    assert mask.block_mask(L, L, block=128).counts() == exact_counts


def test_built_in_tiles_are_analytic_and_never_materialise():
    """A 64k-token mask's BlockMask is computed from tile bounds: no element is evaluated."""
    calls = []

    class Spy(M._SlidingWindow):
        def __call__(self, *a):
            calls.append(1)
            return super().__call__(*a)

    mask = M.causal() & Spy(1024, True) & M.document(torch.arange(65536) // 8192)
    bm = mask.block_mask(65536, 65536, block=128)
    assert not calls
    assert bm.kind.shape == (1, 1, 512, 512)
    assert bm.sparsity > 0.97
    assert bm.counts()["FULL"] > 0 and bm.counts()["PARTIAL"] > 0


def test_callable_masks_are_classified_in_chunks(monkeypatch):
    monkeypatch.setattr(M, "_CHUNK_ELEMENTS", 4096)
    seen = []

    class Spy(M.Mask):  # a Mask subclass is called on broadcast index arrays: it sees each chunk's shape
        def __call__(self, b, h, q, kv):
            seen.append(q.shape[2] * kv.shape[3])
            return (q // 100) == (kv // 100)

    L = 1000
    bm = Spy().block_mask(L, L, block=50)
    assert max(seen) <= 50 * L  # at most one row of tiles at a time, never L x L
    assert bm.counts() == {"EMPTY": 400 - 40, "PARTIAL": 0, "FULL": 40}


def test_block_mask_is_cached_per_shape():
    mask = M.causal() & M.sliding_window(64)
    a = mask.block_mask(512, 512, block=64)
    assert mask.block_mask(512, 512, block=64) is a
    assert mask.block_mask(512, 512, block=32) is not a


def test_block_mask_repr_and_picture():
    bm = M.causal().block_mask(256, 256, block=64)
    assert bm.picture() == "+...\n#+..\n##+.\n###+"
    assert "sparsity=37.5%" in repr(bm)


def test_from_dense_rows_follow_bottom_right_alignment():
    t = torch.rand(3, 5) < 0.5
    m = M.from_dense(t)
    assert torch.equal(m.to_dense(3, 5)[0, 0], t)
    # a (B, 1, 1, Lk) key-padding style tensor broadcasts over queries
    kp = torch.tensor([[True, True, False]])[:, None, None, :]
    assert torch.equal(M.from_dense(kp).to_dense(4, 3)[0, 0], kp[0, 0].expand(4, 3))


def test_mask_returning_non_bool_is_refused():
    with pytest.raises(TypeError, match="must return booleans"):
        M.as_mask(lambda b, h, q, kv: (q - kv).float()).to_dense(4, 4)


@pytest.mark.parametrize("name", ["causal", "document", "padding", "block_sparse", "callable", "nested"])
def test_long_masks_are_evaluated_in_row_bands(monkeypatch, name):
    """Above a size threshold `evaluate` fills the bool result band by band; same answer."""
    rng = np.random.default_rng(5)
    mask, _ = CASES[name](rng, 2, 3, 40)
    whole = M.evaluate(mask, 2, 3, 33, 40).expand(2, 3, 33, 40)
    monkeypatch.setattr(M, "_CHUNK_ELEMENTS", 100)  # bands of 2 rows
    banded = M.evaluate(mask, 2, 3, 33, 40)
    assert banded.dtype == torch.bool and torch.equal(banded.expand(2, 3, 33, 40), whole)
