"""The `performer` backend: FAVOR+ positive orthogonal random features.

Legend: B batch, Hq query heads, Hkv key/value heads, Lq/Lk lengths, D head dim,
m random features.

The float64 oracle is written from the definition with the feature map's own
projection W (m x D): phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m) with x' = sqrt(scale) x,
A[i, j] = phi(q_i)^T phi(k_j) materialised (zero where causality forbids),
out_i = sum_j A[i, j] v_j / sum_j A[i, j].
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import qkv
from qkv.backends import BackendError
from qkv.backends.linear import Performer, implied_weights
from qkv.cache import LinearStateCache
from qkv.layers import MultiHeadAttention

from conftest import assert_error_ratio, rand_qkv


def _phi(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.exp(x @ w.T - 0.5 * (x * x).sum(-1, keepdims=True)) / math.sqrt(w.shape[0])


def oracle(fm: Performer, q, k, v, *, causal, scale=None):
    q, k, v = (t.detach().double().numpy() for t in (q, k, v))
    D = q.shape[-1]
    s = math.sqrt(1 / math.sqrt(D) if scale is None else scale)
    w = fm.projection(D).numpy()
    G = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    a = _phi(q * s, w) @ np.swapaxes(_phi(k * s, w), -1, -2)          # (B, Hq, Lq, Lk)
    if causal:
        Lq, Lk = q.shape[2], k.shape[2]
        a = a * (np.arange(Lk)[None, :] <= (Lk - Lq + np.arange(Lq))[:, None])
    den = a.sum(-1, keepdims=True)
    return torch.from_numpy((a @ v) / np.where(den == 0, 1.0, den))


def materialised(fm: Performer, q, k, v, *, causal):
    """The definition in the inputs' dtype (float32), with the stabilising maxima: the same-dtype baseline."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    a = implied_weights(q, k, feature_map=fm, causal=causal)          # rows already normalised
    return a @ v


SHAPES = [  # (B, Hq, Hkv, Lq, Lk, D)
    (2, 2, 2, 33, 33, 8),
    (1, 4, 2, 130, 130, 16),      # GQA, several chunks
    (1, 4, 1, 1, 80, 8),          # decode step
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_performer_matches_its_definition_by_error_ratio(shape, causal):
    B, Hq, Hkv, Lq, Lk, D = shape
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, D, seed=1)
    fm = Performer(64, seed=3)
    with fm.use():
        got = qkv.attention(q, k, v, causal=causal, backend="performer")
    assert got.shape == (B, Hq, Lq, D) and got.dtype == torch.float32
    assert_error_ratio(got, materialised(fm, q, k, v, causal=causal), oracle(fm, q, k, v, causal=causal),
                       what=f"performer causal={causal} {shape}")


def test_the_scale_is_honoured_and_a_negative_one_refused():
    q, k, v = rand_qkv(1, 2, 2, 20, 20, 8, dtype=torch.float64, seed=2)
    fm = Performer(32, seed=1)
    with fm.use():
        got = qkv.attention(q, k, v, scale=0.2, backend="performer")
        torch.testing.assert_close(got, oracle(fm, q, k, v, causal=False, scale=0.2), rtol=1e-10, atol=1e-10)
        with pytest.raises(BackendError, match="negative"):
            qkv.attention(q, k, v, scale=-0.2, backend="performer")


def test_default_feature_map_lives_in_the_backend():
    q, k, v = rand_qkv(1, 2, 2, 20, 20, 8, dtype=torch.float64, seed=2)
    backend = qkv.backends.get("performer")
    assert isinstance(backend.feature_map, Performer) and backend.feature_map.n_features == 256
    got = qkv.attention(q, k, v, backend="performer")
    torch.testing.assert_close(got, oracle(backend.feature_map, q, k, v, causal=False), rtol=1e-10, atol=1e-10)
    with Performer(16, seed=5).use():
        other = qkv.attention(q, k, v, backend="performer")
    assert not torch.allclose(got, other)


def test_projection_is_orthogonal_blocks_with_chi_norms_seeded_and_redrawn():
    fm = Performer(20, seed=7)
    w = fm.projection(8)
    assert w.shape == (20, 8) and w.dtype == torch.float64
    unit = w / w.norm(dim=1, keepdim=True)
    for b in (slice(0, 8), slice(8, 16)):                           # each block of D rows is orthogonal
        torch.testing.assert_close(unit[b] @ unit[b].T, torch.eye(8, dtype=torch.float64), atol=1e-12, rtol=0)
    assert float(w.norm(dim=1).std()) > 0.1                        # rescaled by random (chi) norms
    assert torch.equal(Performer(20, seed=7).projection(8), w)     # reproducible
    assert not torch.equal(Performer(20, seed=8).projection(8), w)
    fm.redraw()
    assert fm.draws == 1 and not torch.equal(fm.projection(8), w)
    assert fm.projection(8, dtype=torch.float32).dtype == torch.float32


def test_features_estimate_the_softmax_kernel():
    """phi(x)^T phi(y) estimates exp(x . y / sqrt(D)) (checked with many features on small vectors)."""
    g = torch.Generator().manual_seed(0)
    D = 8
    x, y = (0.5 * torch.randn(6, D, generator=g, dtype=torch.float64) for _ in range(2))
    fm = Performer(8192, seed=0)
    s = 1 / math.sqrt(D)
    est = torch.exp(fm.exponent(x, s)) @ torch.exp(fm.exponent(y, s)).T / fm.n_features     # (6, 6)
    exact = torch.exp(x @ y.T * s)
    rel = ((est - exact) / exact).abs()          # relative std about 0.02 per entry at these norms
    assert float(rel.mean()) < 0.03 and float(rel.max()) < 0.1


def test_error_against_softmax_falls_as_features_grow():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 32, 8, generator=g, dtype=torch.float64) for _ in range(3))
    q, k = 0.5 * q, 0.5 * k
    for causal in (False, True):
        exact = qkv.attention(q, k, v, causal=causal, backend="math")
        means = []
        for m in (16, 64, 256, 1024):
            errs = []
            for seed in range(6):
                with Performer(m, seed=seed).use():
                    got = qkv.attention(q, k, v, causal=causal, backend="performer")
                errs.append(float((got - exact).abs().max()))
            means.append(sum(errs) / len(errs))
        assert means[0] > means[1] > means[2] > means[3], f"causal={causal}: mean errors {means}"


def test_stabilised_for_large_inputs():
    q, k, v = rand_qkv(1, 2, 2, 64, 64, 16, seed=4)
    with Performer(64, seed=0).use():
        for causal in (False, True):
            out = qkv.attention(10 * q, 10 * k, v, causal=causal, backend="performer")
            assert torch.isfinite(out).all()
            assert float(out.abs().max()) <= float(v.abs().max()) + 1e-4   # a convex combination of values


def test_chunked_prefix_sum_equals_materialised_and_recurrent_decode():
    B, Hq, Hkv, L, D = 2, 4, 2, 80, 8
    q, k, v = rand_qkv(B, Hq, Hkv, L, L, D, dtype=torch.float64, seed=5)
    fm = Performer(24, seed=2)
    with fm.use():
        chunked = qkv.attention(q, k, v, causal=True, backend="performer")
    matrix = implied_weights(q, k, feature_map=fm, causal=True) @ v.repeat_interleave(Hq // Hkv, 1)
    torch.testing.assert_close(chunked, matrix, rtol=1e-11, atol=1e-11)

    cache = LinearStateCache(B, Hkv, D, feature_map=fm, dtype=torch.float64)
    assert cache.S.shape == (B, Hkv, 24, D) and cache.z.shape == (B, Hkv, 24)
    first = cache.attention(q[:, :, :30], k[:, :, :30], v[:, :, :30], backend="performer")
    # later keys twice as large: the running max moves and the stored sums are rescaled
    steps = [cache.attention(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], backend="performer")
             for i in range(30, L)]
    torch.testing.assert_close(torch.cat([first, *steps], 2), chunked, rtol=1e-11, atol=1e-11)
    assert cache.length.tolist() == [L, L]


def test_recurrent_state_survives_growing_keys():
    """Keys whose exponents grow along the sequence: the running max keeps the state finite and exact."""
    q, k, v = rand_qkv(1, 1, 1, 40, 40, 8, dtype=torch.float64, seed=6)
    k = k * torch.linspace(0.1, 6.0, 40, dtype=torch.float64)[:, None]
    fm = Performer(16, seed=0)
    cache = LinearStateCache(1, 1, 8, feature_map=fm, dtype=torch.float64)
    steps = torch.cat([cache.attention(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], backend="performer")
                       for i in range(40)], 2)
    torch.testing.assert_close(steps, oracle(fm, q, k, v, causal=True), rtol=1e-9, atol=1e-9)


def test_cache_refuses_another_or_a_redrawn_feature_map():
    fm = Performer(16, seed=0)
    cache = LinearStateCache(1, 2, 8, feature_map=fm)
    q, k, v = rand_qkv(1, 2, 2, 1, 1, 8)
    with Performer(16, seed=1).use():
        with pytest.raises(ValueError, match="another Performer"):
            cache.attention(q, k, v, backend="performer")
    with pytest.raises(ValueError, match="'performer' attention state"):
        cache.attention(q, k, v, backend="linear")
    with pytest.raises(ValueError, match="scale"):
        cache.attention(q, k, v, scale=0.9, backend="performer")
    cache.attention(q, k, v, backend="performer")
    fm.redraw()
    with pytest.raises(ValueError, match="redrawn.*new cache"):
        cache.attention(q, k, v, backend="performer")


def test_bad_feature_counts_and_seeds():
    with pytest.raises(ValueError, match="n_features must be >= 1"):
        Performer(0)
    with pytest.raises(TypeError, match="n_features must be an int"):
        Performer(2.5)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        Performer(8, seed=-1)


def test_refusals():
    q, k, v = rand_qkv(1, 2, 2, 16, 16, 8)
    with pytest.raises(BackendError, match="cannot express the mask"):
        qkv.attention(q, k, v, mask=qkv.masks.padding([10]), backend="performer")
    with pytest.raises(BackendError, match="never forms the Lq x Lk weights"):
        qkv.attention(q, k, v, return_weights=True, backend="performer")
    with pytest.raises(BackendError, match="log-sum-exp"):
        qkv.attention(q, k, v, return_lse=True, backend="performer")


def test_gradcheck_float64():
    fm = Performer(6, seed=0)
    with fm.use():
        for causal, hq, hkv in ((False, 2, 2), (True, 4, 2)):
            q, k, v = rand_qkv(1, hq, hkv, 5, 7, 3, dtype=torch.float64, seed=7, requires_grad=True)
            torch.autograd.gradcheck(lambda a, b, c: qkv.attention(a, b, c, causal=causal, backend="performer"),
                                     (q, k, v), fast_mode=True)


def test_layer_owns_its_feature_map_and_decodes():
    torch.manual_seed(0)
    fm = Performer(32, seed=4)
    layer = MultiHeadAttention(32, 4, n_kv_heads=2, attention=fm, dtype=torch.float64)
    assert layer.feature_map is fm and layer.backend == "performer" and "Performer(n_features=32" in repr(layer)
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    full = layer(x, causal=True)
    cache = LinearStateCache(2, 2, 8, feature_map=fm, dtype=torch.float64)
    steps = torch.cat([layer(x[:, :8], cache=cache)] + [layer(x[:, i:i + 1], cache=cache) for i in range(8, 20)], 1)
    torch.testing.assert_close(steps, full, rtol=1e-10, atol=1e-10)
    # the layer's features, not the backend default's
    q = layer.q_proj(x).view(2, 20, 4, 8).transpose(1, 2)
    k = layer.k_proj(x).view(2, 20, 2, 8).transpose(1, 2)
    v = layer.v_proj(x).view(2, 20, 2, 8).transpose(1, 2)
    with fm.use():
        want = qkv.attention(q, k, v, causal=True, backend="performer")
    torch.testing.assert_close(full, layer.o_proj(want.transpose(1, 2).reshape(2, 20, 32)))
    by_name = MultiHeadAttention(32, 4, attention="performer")
    assert isinstance(by_name.feature_map, Performer) and by_name.feature_map.n_features == 256
