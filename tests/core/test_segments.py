"""Packed documents run as a padded batch (the hidden `segments` backend auto takes for `document` masks).

Legend: B batch, Hq/Hkv heads, L packed length, D head dim.
"""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.backends import segments as _segments
from conftest import assert_error_ratio, rand_qkv


def _ids(lengths):
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


@pytest.mark.parametrize("lengths", [[5, 17, 1, 40], [1, 1, 1], [64, 3], [2] * 20])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (3, 1)])
def test_segments_match_oracle_with_grads(lengths, causal, Hq, Hkv, monkeypatch):
    L = sum(lengths)
    mask = qkv.masks.document(_ids(lengths))
    if causal:
        mask = mask & qkv.masks.causal()
    used = []
    real = _segments.by_segments
    monkeypatch.setattr(_segments, "by_segments", lambda *a: used.append(1) or real(*a))
    monkeypatch.setattr(_segments, "PADDING_LIMIT", float("inf"))   # the route itself, even for uneven lengths
    monkeypatch.setattr(qkv.backends.get("tiled"), "run_rows", 0)     # ... and where tiled's row runs would win
    q, k, v = rand_qkv(2, Hq, Hkv, L, L, 16, Dv=8, requires_grad=True, seed=L)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    qm, km, vm = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = qkv.attention(q, k, v, mask=mask)
    assert used, "the segment path was not taken"
    oracle = qkv.attention(q64, k64, v64, mask=mask, backend="math")
    base = qkv.attention(qm, km, vm, mask=mask, backend="math")
    assert_error_ratio(out, base, oracle, what="segments out")
    g = torch.randn_like(out)
    out.backward(g)
    oracle.backward(g.double())
    base.backward(g)
    for name, a, b, o in (("dq", q, qm, q64), ("dk", k, km, k64), ("dv", v, vm, v64)):
        assert_error_ratio(a.grad, b.grad, o.grad, ratio=3.0, what=f"segments {name}")


@pytest.mark.parametrize("case", ["unsorted_runs", "repeated_id", "one_document", "named_backend", "use_backend",
                                  "batched_ids", "lse"])
def test_segment_path_only_where_exact(case, monkeypatch):
    used = []
    real = _segments.by_segments
    monkeypatch.setattr(_segments, "by_segments", lambda *a: used.append(1) or real(*a))
    monkeypatch.setattr(_segments, "PADDING_LIMIT", float("inf"))   # the route itself, even for uneven lengths
    monkeypatch.setattr(qkv.backends.get("tiled"), "run_rows", 0)     # ... and where tiled's row runs would win
    q, k, v = rand_qkv(2, 2, 2, 12, 12, 8)
    ids, kwargs = _ids([3, 4, 5]), {}
    if case == "unsorted_runs":
        ids = torch.tensor([2] * 3 + [0] * 4 + [1] * 5)             # contiguous runs, not sorted: still taken
    elif case == "repeated_id":
        ids = torch.tensor([0] * 3 + [1] * 4 + [0] * 5)             # document 0 in two pieces: not a batch
    elif case == "one_document":
        ids = torch.zeros(12, dtype=torch.long)
    elif case == "named_backend":
        kwargs = {"backend": "tiled"}
    elif case == "batched_ids":
        ids = torch.stack([_ids([3, 4, 5]), _ids([6, 6])])
    elif case == "lse":
        kwargs = {"return_lse": True}
    mask = qkv.masks.document(ids)
    if case == "use_backend":
        with qkv.backends.use_backend("math"):
            out = qkv.attention(q, k, v, mask=mask)
    else:
        out = qkv.attention(q, k, v, mask=mask, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    ref = qkv.attention(q.double(), k.double(), v.double(), mask=mask, backend="reference")
    assert_error_ratio(out, qkv.attention(q, k, v, mask=mask, backend="math"), ref, what=case)
    assert bool(used) == (case == "unsorted_runs")


def test_auto_leaves_documents_to_tiled_but_with_dropout():
    # padding 8 uneven documents to the longest would do ~4.8x their own work
    from qkv.backends import registry
    from qkv.backends.base import make_call
    from qkv.backends.segments import PADDING_LIMIT
    lens = torch.tensor([6, 34, 63, 9, 36, 4, 2, 8])
    ids = torch.repeat_interleave(torch.arange(8), lens)[None]
    L = int(lens.sum())
    q, k = torch.randn(1, 2, L, 8), torch.randn(1, 2, L, 8)
    uneven = make_call(q, k, k, mask=qkv.masks.document(ids) & qkv.masks.causal(), causal=False, score_mod=None,
                       scale=None, dropout_p=0.0, return_lse=False, return_weights=False, q_offset=None)
    assert 8 * 63 ** 2 > PADDING_LIMIT * int((lens ** 2).sum())
    assert registry.select(uneven, "auto").name == "tiled"
    even = torch.repeat_interleave(torch.arange(4), 40)[None]
    q, k = torch.randn(1, 2, 160, 8), torch.randn(1, 2, 160, 8)
    call = make_call(q, k, k, mask=qkv.masks.document(even) & qkv.masks.causal(), causal=False, score_mod=None,
                     scale=None, dropout_p=0.0, return_lse=False, return_weights=False, q_offset=None)
    assert registry.select(call, "auto").name == "tiled"           # row runs: no padding at all
    tiled = qkv.backends.get("tiled")
    before, tiled.run_rows = tiled.run_rows, 0
    try:
        assert registry.select(call, "auto").name == "segments"      # against the tile engine, the padded batch
    finally:
        tiled.run_rows = before
    dropout = make_call(q, k, k, mask=qkv.masks.document(even) & qkv.masks.causal(), causal=False, score_mod=None,
                        scale=None, dropout_p=0.1, return_lse=False, return_weights=False, q_offset=None)
    assert registry.select(dropout, "auto").name == "segments"       # tiled has no dropout
