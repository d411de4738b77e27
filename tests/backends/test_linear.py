"""The `linear` backend (elu+1 kernelised attention) and its recurrent decode state.

Legend: B batch, Hq query heads, Hkv key/value heads, G = Hq // Hkv, Lq/Lk lengths,
D head dim, Dv value dim.

The float64 oracle below is written from the definition, materialising the Lq x Lk
kernel matrix A[i, j] = phi(q_i)^T phi(k_j) (zero where causality forbids):
out_i = sum_j A[i, j] v_j / sum_j A[i, j].
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qkv
from qkv.backends import BackendError
from qkv.backends.linear import LinearBackend, implied_weights, kernel_attention
from qkv.cache import LinearStateCache
from qkv.layers import MultiHeadAttention

from conftest import assert_error_ratio, rand_qkv


def _phi(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x + 1.0, np.exp(x))                   # elu(x) + 1


def oracle(q, k, v, *, causal, q_offset=None):
    """float64 NumPy, straight from the definition (GQA by explicit repetition)."""
    q, k, v = (t.detach().double().numpy() for t in (q, k, v))
    G = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    a = _phi(q) @ np.swapaxes(_phi(k), -1, -2)                   # (B, Hq, Lq, Lk)
    Lq, Lk = q.shape[2], k.shape[2]
    if causal:
        off = Lk - Lq if q_offset is None else q_offset
        allowed = np.arange(Lk)[None, :] <= (off + np.arange(Lq))[:, None]
        a = a * allowed
    den = a.sum(-1, keepdims=True)
    return torch.from_numpy((a @ v) / np.where(den == 0, 1.0, den))


def materialised(q, k, v, *, causal, q_offset=None):
    """The same definition in the inputs' dtype with torch (the same-dtype baseline)."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    a = (torch.nn.functional.elu(q) + 1) @ (torch.nn.functional.elu(k) + 1).transpose(-1, -2)
    if causal:
        Lq, Lk = q.shape[2], k.shape[2]
        off = Lk - Lq if q_offset is None else q_offset
        a = a * (torch.arange(Lk)[None, :] <= (off + torch.arange(Lq))[:, None])
    den = a.sum(-1, keepdim=True)
    return (a @ v) / torch.where(den == 0, torch.ones_like(den), den)


SHAPES = [  # (B, Hq, Hkv, Lq, Lk, D, Dv)
    (2, 4, 4, 37, 37, 8, 8),        # MHA, one partial chunk
    (1, 6, 2, 150, 150, 16, 8),     # GQA, several chunks, Dv != D
    (2, 4, 1, 1, 97, 8, 8),         # MQA decode step: bottom-right aligned
    (1, 2, 2, 70, 200, 8, 4),       # Lq < Lk spanning chunk borders
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_linear_matches_its_definition_by_error_ratio(shape, causal):
    B, Hq, Hkv, Lq, Lk, D, Dv = shape
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, D, Dv, seed=1)
    got = qkv.attention(q, k, v, causal=causal, backend="linear")
    assert got.shape == (B, Hq, Lq, Dv) and got.dtype == torch.float32
    assert_error_ratio(got, materialised(q, k, v, causal=causal), oracle(q, k, v, causal=causal),
                       what=f"linear causal={causal} {shape}")


@pytest.mark.parametrize("q_offset", [0, 30, -5, 120])
def test_explicit_query_offsets(q_offset):
    """Top-left alignment, rows before the first key (zeros) and rows past the last key (all keys)."""
    q, k, v = rand_qkv(1, 2, 1, 20, 100, 8, seed=2)
    got = qkv.attention(q, k, v, causal=True, backend="linear", q_offset=q_offset)
    assert_error_ratio(got, materialised(q, k, v, causal=True, q_offset=q_offset),
                       oracle(q, k, v, causal=True, q_offset=q_offset), what=f"q_offset={q_offset}")
    if q_offset < 0:
        assert float(got[:, :, :-q_offset].abs().max()) == 0.0


def test_float64_and_half_inputs():
    q, k, v = rand_qkv(1, 2, 2, 40, 40, 8, dtype=torch.float64, seed=3)
    got = qkv.attention(q, k, v, causal=True, backend="linear")
    torch.testing.assert_close(got, oracle(q, k, v, causal=True), rtol=1e-12, atol=1e-12)
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    got = qkv.attention(qb, kb, vb, causal=True, backend="linear")
    assert got.dtype == torch.bfloat16
    assert_error_ratio(got, materialised(qb, kb, vb, causal=True), oracle(qb, kb, vb, causal=True), what="bf16")


def test_chunked_prefix_sum_equals_materialised_and_recurrent_decode():
    """Three forms of causal linear attention agree: chunked prefix sums, the L x L matrix, step by step."""
    B, Hq, Hkv, L, D = 2, 4, 2, 90, 8
    q, k, v = rand_qkv(B, Hq, Hkv, L, L, D, dtype=torch.float64, seed=4)
    chunked = qkv.attention(q, k, v, causal=True, backend="linear")
    matrix = implied_weights(q, k, causal=True) @ v.repeat_interleave(Hq // Hkv, 1)
    torch.testing.assert_close(chunked, matrix, rtol=1e-12, atol=1e-12)

    cache = LinearStateCache(B, Hkv, D, dtype=torch.float64)
    steps = [cache.attention(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], backend="linear")
             for i in range(L)]
    torch.testing.assert_close(torch.cat(steps, 2), chunked, rtol=1e-12, atol=1e-12)
    assert cache.length.tolist() == [L, L]

    # a prefill of 50 tokens, then single steps: the same outputs
    cache2 = LinearStateCache(B, Hkv, D, dtype=torch.float64)
    first = cache2.attention(q[:, :, :50], k[:, :, :50], v[:, :, :50], backend="linear")
    rest = [cache2.attention(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], backend="linear")
            for i in range(50, L)]
    torch.testing.assert_close(torch.cat([first, *rest], 2), chunked, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunk_size_does_not_change_the_result(chunk, monkeypatch):
    q, k, v = rand_qkv(1, 2, 1, 50, 50, 8, dtype=torch.float64, seed=5)
    expected = oracle(q, k, v, causal=True)
    monkeypatch.setattr(LinearBackend, "chunk", chunk)
    torch.testing.assert_close(qkv.attention(q, k, v, causal=True, backend="linear"), expected,
                               rtol=1e-12, atol=1e-12)


def test_chunked_memory_is_linear_in_length():
    """The chunked form never builds an L x L matrix: its largest intermediate is L x chunk."""
    L, D, C = 512, 4, 16
    fq = torch.rand(1, 1, 1, L, D)
    fk, v = torch.rand(1, 1, L, D), torch.rand(1, 1, L, D)
    biggest = 0

    def spy(*args, **kwargs):
        nonlocal biggest
        out = real(*args, **kwargs)
        biggest = max(biggest, out.numel())
        return out

    real = torch.matmul
    torch.matmul = spy
    try:
        kernel_attention(fq, fk, v, causal=True, chunk=C)
    finally:
        torch.matmul = real
    assert 0 < biggest <= L * C


def test_auto_never_picks_an_approximate_backend():
    q, k, v = rand_qkv(1, 2, 2, 16, 16, 8)
    call = qkv.backends.make_call(q, k, v, mask=None, causal=True, score_mod=None, scale=None,
                                                   dropout_p=0.0, return_lse=False, return_weights=False,
                                                   q_offset=None)
    assert qkv.backends.select(call).capabilities.exact
    for name in ("linear", "performer"):
        caps = qkv.backends.get(name).capabilities
        assert not caps.auto and not caps.exact
        assert qkv.backends.get(name).refusal(call) is None          # it could serve the call, if named
    torch.testing.assert_close(qkv.attention(q, k, v, causal=True), qkv.attention(q, k, v, causal=True,
                                                                                  backend="math"))


def test_refusals_say_why_and_what_to_do():
    q, k, v = rand_qkv(1, 2, 2, 16, 16, 8)
    with pytest.raises(BackendError, match="cannot express the mask sliding_window.*tiled"):
        qkv.attention(q, k, v, mask=qkv.masks.sliding_window(4), backend="linear")
    with pytest.raises(ValueError, match="cannot express"):
        qkv.attention(q, k, v, mask=torch.ones(16, 16, dtype=torch.bool), backend="linear")
    with pytest.raises(BackendError, match="never forms the Lq x Lk weights.*implied_weights"):
        qkv.attention(q, k, v, return_weights=True, backend="linear")
    with pytest.raises(BackendError, match="no log-sum-exp"):
        qkv.attention(q, k, v, return_lse=True, backend="linear")
    with pytest.raises(BackendError, match="score_mod"):
        qkv.attention(q, k, v, score_mod=qkv.scores.softcap(5.0), backend="linear")
    with pytest.raises(BackendError, match="no temperature.*scale=None"):
        qkv.attention(q, k, v, scale=0.5, backend="linear")
    with pytest.raises(BackendError, match="dropout"):
        qkv.attention(q, k, v, dropout_p=0.1, backend="linear")
    # causal=True and an explicit causal() mask are the same thing and are served
    a = qkv.attention(q, k, v, causal=True, mask=qkv.masks.causal(), backend="linear")
    torch.testing.assert_close(a, qkv.attention(q, k, v, causal=True, backend="linear"))
    # an exact backend that refuses never suggests an approximate one instead
    with pytest.raises(BackendError) as info:
        qkv.attention(q, k, v, score_mod=qkv.scores.softcap(5.0), backend="sdpa")
    assert "linear" not in str(info.value) and "performer" not in str(info.value)


def test_gradcheck_float64():
    for causal, hq, hkv in ((False, 2, 2), (True, 4, 2)):
        q, k, v = rand_qkv(1, hq, hkv, 5, 7, 3, dtype=torch.float64, seed=6, requires_grad=True)
        torch.autograd.gradcheck(lambda a, b, c: qkv.attention(a, b, c, causal=causal, backend="linear"),
                                 (q, k, v), fast_mode=True)


def test_gradients_match_the_materialised_form():
    q, k, v = rand_qkv(1, 4, 2, 70, 70, 8, dtype=torch.float64, seed=7, requires_grad=True)
    g_out = torch.randn(1, 4, 70, 8, dtype=torch.float64)
    got = torch.autograd.grad((qkv.attention(q, k, v, causal=True, backend="linear") * g_out).sum(), (q, k, v))
    want = torch.autograd.grad((materialised(q, k, v, causal=True) * g_out).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# -----------------------------------------------------------------------------
# The recurrent state cache


def test_state_is_constant_size_and_rows_are_views():
    cache = LinearStateCache(3, 2, 8, dtype=torch.float32)
    size = cache.nbytes
    assert size == (3 * 2 * 8 * 8 + 3 * 2 * 8) * 4 and cache.bytes_per_token == 0
    q, k, v = rand_qkv(3, 4, 2, 40, 40, 8, seed=8)
    cache.attention(q, k, v, backend="linear")
    for i in range(5):
        cache.attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], backend="linear")
    assert cache.nbytes == size and cache.length.tolist() == [45, 45, 45]
    # one row goes ahead alone: lengths differ, the other rows' states are untouched
    before = cache.S[0].clone()
    cache.row(1).attention(q[1:2, :, :1], k[1:2, :, :1], v[1:2, :, :1], backend="linear")
    assert cache.length.tolist() == [45, 46, 45]
    assert torch.equal(cache.S[0], before) and not torch.equal(cache.S[1], before)
    cache.check_room(10**9)                                             # never full


def test_state_append_then_attend_equals_attend_all():
    q, k, v = rand_qkv(1, 2, 2, 30, 30, 8, dtype=torch.float64, seed=9)
    cache = LinearStateCache(1, 2, 8, dtype=torch.float64)
    cache.append(k[:, :, :29], v[:, :, :29])
    last = cache.attention(q[:, :, 29:], k[:, :, 29:], v[:, :, 29:], backend="linear")
    full = qkv.attention(q, k, v, causal=True, backend="linear")
    torch.testing.assert_close(last, full[:, :, 29:], rtol=1e-12, atol=1e-12)


def test_state_cache_bad_uses():
    cache = LinearStateCache(1, 2, 8)
    q, k, v = rand_qkv(1, 2, 2, 1, 1, 8)
    with pytest.raises(ValueError, match="'linear' attention state.*backend='auto'.*attention='linear'"):
        cache.attention(q, k, v)                                        # an exact layer's call
    with pytest.raises(ValueError, match="score_mod"):
        cache.attention(q, k, v, score_mod=qkv.scores.softcap(5.0), backend="linear")
    with pytest.raises(ValueError, match="nothing to read"):
        cache.read()
    with pytest.raises(ValueError, match=r"k must be \(B=1, Hkv=2, n, 8\)"):
        cache.attention(q, k[:, :1], v, backend="linear")
    with pytest.raises(ValueError, match="feature_map"):
        LinearStateCache(1, 2, 8, feature_map="softmax")
    assert cache.length.tolist() == [0]


# -----------------------------------------------------------------------------
# The layer option


def test_layer_attention_option_and_decode():
    torch.manual_seed(0)
    layer = MultiHeadAttention(32, 4, n_kv_heads=2, attention="linear", rope=qkv.positional.RotaryEmbedding(8),
                               dtype=torch.float64)
    assert layer.backend == "linear" and "attention='linear'" in repr(layer)
    x = torch.randn(2, 25, 32, dtype=torch.float64)
    full = layer(x, causal=True)
    cache = LinearStateCache(2, 2, 8, dtype=torch.float64)
    pre = layer(x[:, :10], cache=cache)
    steps = [layer(x[:, i:i + 1], cache=cache) for i in range(10, 25)]
    torch.testing.assert_close(torch.cat([pre, *steps], 1), full, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="never forms"):
        layer(x, causal=True, return_weights=True)
    with pytest.raises(ValueError, match="cannot express"):
        layer(x, mask=qkv.masks.sliding_window(4))
    exact = MultiHeadAttention(32, 4)
    assert exact.attention == "exact" and exact.backend == "auto" and exact.feature_map is None


def test_layer_attention_option_refusals():
    with pytest.raises(ValueError, match="attention must be one of 'exact', 'linear', 'performer'"):
        MultiHeadAttention(32, 4, attention="flash")
    with pytest.raises(ValueError, match="runs on the 'linear' backend"):
        MultiHeadAttention(32, 4, attention="linear", backend="math")
    with pytest.raises(ValueError, match="dropout=0"):
        MultiHeadAttention(32, 4, attention="linear", dropout=0.1)
    with pytest.raises(ValueError, match="ALiBi"):
        MultiHeadAttention(32, 4, attention="linear", alibi=True)
