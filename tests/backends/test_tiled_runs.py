"""The tiled backend's row runs: masks that allow each query row one interval of keys
(`Mask.row_ranges`), cut into runs of a FULL block between at most two triangles
(`tiled.range_runs`), computed by torch's fused kernel with its causal flag.

Three things are held: the intervals are the mask (against the dense mask), the runs cover
exactly those intervals (rebuilt row by row), and the results meet the error-ratio rule
against float64 with the tile engine as the baseline, forward and gradients."""

from __future__ import annotations

import pytest
import torch

import qkv
from conftest import assert_error_ratio, rand_qkv
from qkv import masks as M
from qkv.backends import get, tiled

IDS = torch.tensor([0] * 50 + [1] * 70 + [2] * 30 + [3] * 150)           # 300 positions, uneven documents

INTERVAL_MASKS = {
    "causal": lambda: M.causal(),
    "window": lambda: M.sliding_window(37),
    "window_both": lambda: M.sliding_window(37, causal=False),
    "prefix": lambda: M.prefix_lm(40),
    "document": lambda: M.document(IDS),
    "document_causal": lambda: M.document(IDS) & M.causal(),
    "document_window": lambda: M.causal() & M.sliding_window(100) & M.document(IDS),
    "narrow_window": lambda: M.sliding_window(2),
}


def _allowed(lo, hi, Lk):
    kv = torch.arange(Lk)
    return (kv >= lo[..., None]) & (kv < hi[..., None])                  # (B', Lq, Lk)


@pytest.mark.parametrize("name", sorted(INTERVAL_MASKS))
@pytest.mark.parametrize("Lq,Lk,q_offset", [(300, 300, 0), (100, 300, 200), (1, 300, 299)])
def test_row_ranges_are_the_mask(name, Lq, Lk, q_offset):
    mask = INTERVAL_MASKS[name]()
    q = q_offset + torch.arange(Lq)
    lo, hi = mask.row_ranges(q, Lk)
    dense = mask.to_dense(Lq, Lk, B=1, H=1, q_offset=q_offset).reshape(-1, Lq, Lk)
    assert torch.equal(_allowed(lo, hi, Lk), dense)


def test_row_ranges_per_batch_and_none_where_rows_are_not_intervals():
    mask = M.causal() & M.padding([250, 120])
    lo, hi = mask.row_ranges(torch.arange(300), 300)
    assert lo.shape == (2, 300)
    assert torch.equal(_allowed(lo, hi, 300), mask.to_dense(300, 300, B=2, H=1).reshape(2, 300, 300))
    ids2 = torch.stack([IDS, IDS.flip(0)])
    lo, hi = (M.document(ids2) & M.causal()).row_ranges(torch.arange(300), 300)
    assert torch.equal(_allowed(lo, hi, 300), (M.document(ids2) & M.causal()).to_dense(300, 300, B=2, H=1)
                       .reshape(2, 300, 300))
    q = torch.arange(8)
    assert M.document(torch.tensor([0, 0, 1, 1, 0, 0, 2, 2])).row_ranges(q, 8) is None   # an id comes back
    assert (M.causal() | M.prefix_lm(3)).row_ranges(q, 8) is None
    assert M.as_mask(lambda b, h, qi, kv: kv <= qi).row_ranges(q, 8) is None
    assert M.global_tokens([0]).row_ranges(q, 8) is None


def _rebuilt(runs, Lq, Lk):
    """Which keys each row reads, from the runs' segments; and how often each row appears."""
    got = torch.zeros(Lq, Lk, dtype=torch.bool)
    seen = torch.zeros(Lq, dtype=torch.long)
    for run in runs:
        n = run.r1 - run.r0
        seen[run.r0:run.r1] += 1
        for kind, k0, k1 in run.segments:
            assert 0 <= k0 < k1 <= Lk
            block = torch.ones(n, k1 - k0, dtype=torch.bool)
            if kind != "full":
                assert k1 - k0 == n, "a triangle is square"
                block = torch.tril(block)
                if kind == "flipped":
                    block = block.flip(0).flip(1)
            assert not (got[run.r0:run.r1, k0:k1] & block).any(), "segments overlap"
            got[run.r0:run.r1, k0:k1] |= block
    return got, seen


@pytest.mark.parametrize("name", sorted(INTERVAL_MASKS))
@pytest.mark.parametrize("rows", [2048, 64, 7, 1])
def test_runs_cover_each_rows_keys_exactly_once(name, rows):
    Lq = Lk = 300
    lo, hi = INTERVAL_MASKS[name]().row_ranges(torch.arange(Lq), Lk)
    runs = tiled.range_runs(lo[0], hi[0], rows)
    got, seen = _rebuilt(runs, Lq, Lk)
    allowed = _allowed(lo, hi, Lk)[0]
    assert torch.equal(got, allowed)
    assert torch.equal(seen, allowed.any(dim=1).long())                 # every live row once, no empty row
    assert all(run.r1 - run.r0 <= rows for run in runs)


def test_runs_are_long_for_causal_and_cut_below_a_windows_width():
    q = torch.arange(16384)
    runs = tiled.range_runs(*(t[0] for t in M.causal().row_ranges(q, 16384)))
    assert len(runs) == 8 and all(r.r1 - r.r0 == 2048 for r in runs)
    assert runs[3].segments == [("full", 0, 6144), ("causal", 6144, 8192)]
    runs = tiled.range_runs(*(t[0] for t in M.sliding_window(1024).row_ranges(q, 16384)))
    assert runs[0].segments == [("causal", 0, 1024)]                   # rows before the window fills: causal
    assert all(r.r1 - r.r0 < 1024 for r in runs[1:])
    assert all([kind for kind, _, _ in r.segments] == ["flipped", "full", "causal"] for r in runs[1:])


def _grads(mask, q, k, v, do, rows, **kw):
    get("tiled").run_rows = rows
    try:
        out = qkv.attention(q, k, v, mask=mask, backend="tiled", **kw)
        return (out, *torch.autograd.grad(out, (q, k, v), do))
    finally:
        get("tiled").run_rows = tiled.RUN_ROWS


CALLS = [
    # name, B, Hq, Hkv, Lq, Lk, D, q_offset
    ("causal", 1, 4, 2, 300, 300, 16, None),
    ("window", 2, 4, 1, 300, 300, 32, None),
    ("window_both", 1, 2, 2, 300, 300, 16, None),
    ("prefix", 1, 4, 4, 300, 300, 16, None),
    ("document_causal", 1, 6, 2, 300, 300, 16, None),
    ("document_window", 1, 4, 2, 300, 300, 16, None),
    ("narrow_window", 1, 2, 2, 300, 300, 16, None),
    ("causal", 1, 4, 2, 100, 300, 16, 200),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,B,Hq,Hkv,Lq,Lk,D,q_offset", CALLS)
def test_runs_meet_the_error_rule(name, B, Hq, Hkv, Lq, Lk, D, q_offset, dtype, monkeypatch):
    used = []
    real = tiled.range_forward
    monkeypatch.setattr(tiled, "range_forward", lambda *a: used.append(1) or real(*a))
    mask = INTERVAL_MASKS[name]()
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=dtype, seed=Lq + D, requires_grad=True)
    do = torch.randn(B, Hq, Lq, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cand = _grads(mask, q, k, v, do.to(dtype), tiled.RUN_ROWS, q_offset=q_offset)
    assert used, "the row runs served the call"
    base = _grads(mask, q, k, v, do.to(dtype), 0, q_offset=q_offset)   # the tile engine
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _grads(mask, q64, k64, v64, do, 0, q_offset=q_offset)
    for what, c, b, r in zip(("out", "dq", "dk", "dv"), cand, base, ref):
        assert_error_ratio(c, b, r, ratio=2.0 if what == "out" else 3.0, what=f"{name} {dtype} {what}")


def test_padding_runs_per_batch_row():
    mask = M.causal() & M.padding([250, 120])
    q, k, v = rand_qkv(2, 4, 2, 300, 300, 16, seed=3, requires_grad=True)
    do = torch.randn(2, 4, 300, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cand = _grads(mask, q, k, v, do.float(), tiled.RUN_ROWS)
    base = _grads(mask, q, k, v, do.float(), 0)
    ref = _grads(mask, *(t.detach().double().requires_grad_() for t in (q, k, v)), do, 0)
    for what, c, b, r in zip(("out", "dq", "dk", "dv"), cand, base, ref):
        assert_error_ratio(c, b, r, ratio=2.0 if what == "out" else 3.0, what=f"padding {what}")


def test_a_negative_scale_stays_on_tiles(monkeypatch):
    # torch's CPU kernel returns NaN rows for is_causal=True with a negative scale: no triangles then
    used = []
    real = tiled.range_forward
    monkeypatch.setattr(tiled, "range_forward", lambda *a: used.append(1) or real(*a))
    q, k, v = rand_qkv(1, 2, 2, 120, 120, 8, seed=5)
    out = qkv.attention(q, k, v, mask=M.sliding_window(9), backend="tiled", scale=-0.3)
    ref = qkv.attention(q.double(), k.double(), v.double(), mask=M.sliding_window(9), backend="reference", scale=-0.3)
    assert not used and torch.isfinite(out).all()
    assert_error_ratio(out, qkv.attention(q, k, v, mask=M.sliding_window(9), backend="math", scale=-0.3), ref)
