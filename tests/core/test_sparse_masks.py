"""Sparse attention patterns (Longformer, BigBird, dilated windows) as masks on the exact `tiled` backend.

Legend: L sequence length, bs BigBird block size, nb = L // bs blocks, q/kv positions.

Each pattern is compared with a bool matrix built by hand, element by element;
`tiled` on it is compared with `math` by the error-ratio rule against the float64
oracle; and its tiles are checked to be classified (EMPTY tiles skipped).
"""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv import masks as M
from qkv.backends.tiled import make_plan
from qkv.masks import EMPTY, FULL

from conftest import assert_error_ratio, rand_qkv


def hand_longformer(L, window, glob):
    d = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        for kv in range(L):
            d[q, kv] = abs(q - kv) < window or q in glob or kv in glob
    return d


def hand_dilated(L, window, dilation, causal):
    d = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        for kv in range(L):
            dist = q - kv if causal else abs(q - kv)
            d[q, kv] = 0 <= dist <= (window - 1) * dilation and dist % dilation == 0
    return d


def hand_bigbird(L, bs, window_blocks, global_blocks, random_layout=None):
    d = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        for kv in range(L):
            qb, kb = q // bs, kv // bs
            near = window_blocks > 0 and abs(qb - kb) <= window_blocks // 2
            glob = qb < global_blocks or kb < global_blocks
            rnd = random_layout is not None and bool(random_layout[qb, kb])
            d[q, kv] = near or glob or rnd
    return d


def test_longformer_equals_its_definition():
    for L, window, glob in ((40, 3, [0, 17]), (33, 1, [5]), (24, 6, [])):
        got = M.longformer(window, glob).to_dense(L, L)[0, 0]
        assert torch.equal(got, hand_longformer(L, window, glob)), (L, window, glob)
    # symmetric, and composable with causal
    d = M.longformer(4, [3]).to_dense(30, 30)[0, 0]
    assert torch.equal(d, d.T)
    causal = (M.longformer(4, [3]) & M.causal()).to_dense(30, 30)[0, 0]
    assert torch.equal(causal, hand_longformer(30, 4, [3]) & torch.ones(30, 30, dtype=torch.bool).tril())


def test_dilated_window_equals_its_definition():
    for window, dilation, causal in ((4, 3, True), (3, 2, False), (5, 1, True)):
        got = M.dilated_window(window, dilation, causal).to_dense(37, 37)[0, 0]
        assert torch.equal(got, hand_dilated(37, window, dilation, causal)), (window, dilation, causal)


def test_bigbird_window_and_global_blocks_equal_their_definition():
    for bs, w, g in ((4, 3, 1), (8, 1, 0), (4, 0, 2), (4, 5, 1)):
        got = M.bigbird(bs, w, g).to_dense(32, 32)[0, 0]
        assert torch.equal(got, hand_bigbird(32, bs, w, g)), (bs, w, g)


def test_bigbird_random_blocks_are_seeded_and_outside_what_rows_already_see():
    L, bs, r = 64, 8, 2
    m = M.bigbird(bs, 3, 1, r, seed=3, length=L)
    layout = m.random                                                  # (nb, nb) the random key blocks
    assert torch.equal(m.to_dense(L, L)[0, 0], hand_bigbird(L, bs, 3, 1, layout))
    structured = hand_bigbird(L, bs, 3, 1)[::bs, ::bs]                 # one element per block
    assert not (layout & structured).any()                             # never a block the row already sees
    assert layout[0].sum() == 0                                        # a global row sees everything already
    assert (layout[1:].sum(1) == r).all()                              # each other row: exactly r random blocks
    assert torch.equal(M.bigbird(bs, 3, 1, r, seed=3, length=L).random, layout)
    assert not torch.equal(M.bigbird(bs, 3, 1, r, seed=4, length=L).random, layout)


def test_bigbird_decode_prefix_of_its_layout():
    """With `length` the layout is fixed, so a decode step (Lq = 1, Lk < length) sees its row's prefix."""
    m = M.bigbird(4, 3, 1, 1, seed=0, length=32) & M.causal()
    full = m.to_dense(32, 32)[0, 0]
    step = m.to_dense(1, 21)[0, 0]                                     # query at position 20, keys 0..20
    assert torch.equal(step[0], full[20, :21])


PATTERNS = {
    "longformer": lambda: M.longformer(5, [0, 70]),
    "longformer_causal": lambda: M.longformer(8, [3]) & M.causal(),
    "bigbird": lambda: M.bigbird(16, 3, 1, 2, seed=1, length=128),
    "bigbird_causal": lambda: M.bigbird(16, 3, 1, 1, seed=2, length=128) & M.causal(),
    "dilated": lambda: M.dilated_window(8, 4),
    "dilated_sym": lambda: M.dilated_window(4, 2, causal=False),
}


@pytest.fixture
def small_tiles():
    """`tiled` with 16 x 16 tiles (so 128 positions make 8 x 8 tiles); restores the class defaults after."""
    be = qkv.backends.get("tiled")
    be.block = (16, 16)
    yield be
    for name in ("block", "engine"):
        be.__dict__.pop(name, None)


@pytest.mark.parametrize("engine", ["auto", "generic"])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_tiled_equals_math_on_sparse_patterns(name, engine, small_tiles):
    small_tiles.engine = engine
    mask = PATTERNS[name]()
    q, k, v = rand_qkv(1, 2, 1, 128, 128, 8, seed=0)
    got = qkv.attention(q, k, v, mask=mask, backend="tiled")
    base = qkv.attention(q, k, v, mask=mask, backend="math")
    oracle = qkv.attention(*(t.double() for t in (q, k, v)), mask=mask, backend="reference")
    assert_error_ratio(got, base, oracle, what=name)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_sparse_patterns_have_analytic_tiles_that_tiled_skips(name):
    mask = PATTERNS[name]()
    assert mask.analytic
    bm = mask.block_mask(128, 128, block=16)
    dense = mask.to_dense(128, 128)[0, 0]
    kind = bm.kind[0, 0]
    assert (kind == EMPTY).sum() > 0, f"{name}: no tile skipped\n{bm.picture()}"
    for i in range(8):
        for j in range(8):
            tile = dense[16 * i:16 * (i + 1), 16 * j:16 * (j + 1)]
            if kind[i, j] == EMPTY:
                assert not tile.any(), (name, i, j)
            if kind[i, j] == FULL:
                assert tile.all(), (name, i, j)
            if not tile.any():                      # the bounds are exact about emptiness for these patterns
                assert kind[i, j] == EMPTY, (name, i, j)
    assert torch.equal(bm.to_dense()[0, 0], dense)
    # and the tiled backend's plan reads only the keys of non-empty tiles
    q, k, v = rand_qkv(1, 1, 1, 128, 128, 4)
    call = qkv.backends.make_call(q, k, v, mask=mask, causal=False, score_mod=None, scale=None,
                                                   dropout_p=0.0, return_lse=False, return_weights=False,
                                                   q_offset=None)
    groups, _ = make_plan(call, (16, 16))
    read = sum((p.r1 - p.r0) * p.n for _, plans in groups for p in plans.values())
    assert read == 256 * int((kind != EMPTY).sum()) < 128 * 128


def test_bigbird_full_blocks_are_recognised():
    bm = M.bigbird(16, 3, 1, 0).block_mask(128, 128, block=16)
    counts = bm.counts()
    assert counts["PARTIAL"] == 0 and counts["FULL"] > 0 and counts["EMPTY"] > 0


def test_bad_sparse_arguments():
    with pytest.raises(ValueError, match="block=6 does not divide length=64"):
        M.bigbird(6, 3, 1, 1, length=64)
    q, k, v = rand_qkv(1, 1, 1, 30, 30, 4)
    with pytest.raises(ValueError, match="block=8 does not divide the key length 30"):
        qkv.attention(q, k, v, mask=M.bigbird(8, 3, 1), backend="tiled")
    with pytest.raises(ValueError, match="pass length="):
        M.bigbird(8, 3, 1, 2)
    with pytest.raises(ValueError, match="window_blocks must be 0 or odd"):
        M.bigbird(8, 2, 1)
    with pytest.raises(ValueError, match="built for length=32"):
        qkv.attention(*rand_qkv(1, 1, 1, 40, 40, 4), mask=M.bigbird(8, 3, 1, 1, length=32), backend="tiled")
    with pytest.raises(ValueError, match="global token positions must be >= 0"):
        M.longformer(4, [-1])
    with pytest.raises(ValueError, match="window must be >= 1"):
        M.longformer(0, [1])
    with pytest.raises(TypeError, match="must hold integers"):
        M.longformer(4, [1.5])
    with pytest.raises(ValueError, match="dilation must be >= 1"):
        M.dilated_window(4, 0)
