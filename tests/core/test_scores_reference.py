"""Score mods against their definitions, and the NumPy oracle against plain Python loops.

Legend: B batch, Hq query heads, Hkv key/value heads, Lq/Lk lengths, D head dim.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import qkv
from qkv import reference as R
from qkv import scores as S
from conftest import max_err, rand_qkv


def _loop_attention(q, k, v, allowed, bias, scale):
    """Attention for one head with Python floats: the definition, nothing vectorised."""
    Lq, Lk = len(q), len(k)
    out = []
    for i in range(Lq):
        s = [sum(a * b for a, b in zip(q[i], k[j])) * scale + bias(i, j) if allowed(i, j) else -math.inf
             for j in range(Lk)]
        m = max(s)
        if m == -math.inf:
            out.append([0.0] * len(v[0]))
            continue
        e = [math.exp(x - m) for x in s]
        z = sum(e)
        out.append([sum(e[j] / z * v[j][d] for j in range(Lk)) for d in range(len(v[0]))])
    return np.array(out)


def test_oracle_equals_python_loops_with_gqa_mask_and_bias():
    q, k, v = (t.numpy() for t in rand_qkv(2, 4, 2, 5, 7, 3, dtype=torch.float64))
    slopes = qkv.positional.alibi_slopes(4).double().numpy()
    mask = qkv.masks.causal() & qkv.masks.sliding_window(4)
    out = R.attention(q, k, v, mask=mask, score_mod=S.alibi(torch.tensor(slopes)), scale=0.7)
    off = 7 - 5
    for b in range(2):
        for h in range(4):
            exp = _loop_attention(q[b, h].tolist(), k[b, h // 2].tolist(), v[b, h // 2].tolist(),
                                  lambda i, j: 0 <= (off + i) - j < 4,
                                  lambda i, j: slopes[h] * (j - (off + i)), 0.7)
            assert np.allclose(out[b, h], exp, atol=1e-13)


def test_oracle_hand_example():
    # one query [1, 0]; keys [2, 0] and [0, 0]; values 10 and 20; scale 1:
    # scores (2, 0) -> weights (e^2, 1) / (e^2 + 1)
    out, lse, w = R.attention(np.array([[1.0, 0.0]]), np.array([[2.0, 0.0], [0.0, 0.0]]),
                              np.array([[10.0], [20.0]]), scale=1.0, return_stats=True)
    p = math.exp(2) / (math.exp(2) + 1)
    assert w[0].tolist() == pytest.approx([p, 1 - p], abs=1e-15)
    assert out[0, 0] == pytest.approx(10 * p + 20 * (1 - p), abs=1e-13)
    assert lse[0] == pytest.approx(math.log(math.exp(2) + 1), abs=1e-15)


def test_oracle_softmax_of_empty_row_is_zero():
    w, lse = R.softmax(np.array([[-np.inf, -np.inf], [0.0, 0.0]]))
    assert w.tolist() == [[0.0, 0.0], [0.5, 0.5]] and np.isneginf(lse[0])


def test_oracle_never_imports_torch_kernels():
    """The oracle accepts plain NumPy and returns NumPy."""
    q = np.random.default_rng(0).standard_normal((1, 2, 3, 4))
    out = R.attention(q, q, q, causal=True)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    src = open(R.__file__).read()
    assert "import torch" not in src


def test_split_merge_heads_and_multi_head_equals_per_head_loop():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 8))
    assert np.array_equal(R.merge_heads(R.split_heads(x, 4)), x)
    W = [rng.standard_normal((8, 8)) for _ in range(4)]
    y, w = R.multi_head_attention(x, *W, n_heads=2, causal=True, return_weights=True)
    heads = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        qh, kh, vh = x @ W[0][sl].T, x @ W[1][sl].T, x @ W[2][sl].T   # (B, L, 4) per head
        heads.append(R.attention(qh[:, None], kh[:, None], vh[:, None], causal=True)[:, 0])
    assert np.allclose(y, np.concatenate(heads, -1) @ W[3].T, atol=1e-12)
    assert w.shape == (2, 2, 5, 5) and np.allclose(np.triu(w[0, 0], 1), 0)


def test_explain_trace_is_consistent_and_prints_every_step():
    rng = np.random.default_rng(2)
    tokens = "the dog fetches the stick".split()
    x = rng.standard_normal((5, 6))
    wq, wk, wv = (rng.standard_normal((6, 4)) for _ in range(3))
    tr = R.explain(x, wq, wk, wv, tokens=tokens, causal=True)
    assert np.allclose(tr.raw_scores, tr.Q @ tr.K.T)
    assert np.allclose(tr.scaled_scores, tr.raw_scores / 2.0)
    assert np.isneginf(tr.masked_scores[0, 1:]).all()
    assert np.allclose(tr.weights.sum(-1), 1.0) and np.allclose(tr.output, tr.weights @ tr.V)
    assert tr.most_attended()[0] == ("the", "the", 1.0)
    text = str(tr)
    for title in ("raw scores", "scaled scores", "masked scores", "softmax weights", "output", "attends to most"):
        assert title in text
    assert "fetches" in text and "-inf" in text


# -- score mods ----------------------------------------------------------------------------

def _t5_bucket_scalar(rel, bidirectional, num_buckets, max_distance):
    """T5's bucket rule for one integer, written out with Python floats (float32 rounding aside)."""
    ret = 0
    if bidirectional:
        num_buckets //= 2
        if rel > 0:
            ret += num_buckets
        n = abs(rel)
    else:
        n = -min(rel, 0)
    exact = num_buckets // 2
    if n < exact:
        return ret + n
    val = exact + int(np.float32(np.log(np.float32(n) / exact)) / np.float32(math.log(max_distance / exact))
                      * (num_buckets - exact))
    return ret + min(val, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_buckets_match_the_rule(bidirectional):
    rel = np.arange(-300, 301)
    got_np = S.t5_bucket(rel, bidirectional=bidirectional, num_buckets=32, max_distance=128)
    got_t = S.t5_bucket(torch.arange(-300, 301), bidirectional=bidirectional, num_buckets=32, max_distance=128)
    exp = [_t5_bucket_scalar(int(r), bidirectional, 32, 128) for r in rel]
    assert got_np.tolist() == exp and got_t.tolist() == exp
    assert max(exp) <= 31 and min(exp) >= 0


def _score_mod_cases(Hq):
    g = torch.Generator().manual_seed(0)
    table = torch.randn(32, Hq, generator=g, dtype=torch.float64)
    return {
        "alibi": (S.alibi(Hq), lambda s, b, h, q, kv: s + qkv.positional.alibi_slopes(Hq).double()[h] * (kv - q)),
        "alibi_sym": (S.alibi(Hq, symmetric=True),
                      lambda s, b, h, q, kv: s - qkv.positional.alibi_slopes(Hq).double()[h] * (q - kv).abs()),
        "softcap": (S.softcap(2.0), lambda s, b, h, q, kv: 2.0 * torch.tanh(s / 2.0)),
        "relative_bias": (S.relative_bias(table), None),
        "bias": (S.bias(torch.randn(1, Hq, 6, 9, generator=g, dtype=torch.float64)), None),
        "chain": (S.chain(S.alibi(Hq), S.softcap(3.0)),
                  lambda s, b, h, q, kv: 3.0 * torch.tanh((s + qkv.positional.alibi_slopes(Hq).double()[h]
                                                           * (kv - q)) / 3.0)),
    }


@pytest.mark.parametrize("name", list(_score_mod_cases(4)))
def test_score_mods_match_their_definition_on_every_backend_that_takes_them(name):
    Hq, Hkv, Lq, Lk = 4, 2, 6, 9
    mod, definition = _score_mod_cases(Hq)[name]
    q, k, v = rand_qkv(2, Hq, Hkv, Lq, Lk, 8, dtype=torch.float64)
    ref = qkv.attention(q, k, v, score_mod=mod, causal=True, backend="reference")
    out = qkv.attention(q, k, v, score_mod=mod, causal=True)  # auto -> tiled (sdpa cannot)
    assert max_err(out, ref) < 1e-12
    if definition is not None:  # the same mod written as a plain torch function
        direct = qkv.attention(q, k, v, score_mod=definition, causal=True, backend="math")
        assert max_err(direct, ref) < 1e-12
    for dtype in (torch.float32, torch.bfloat16):
        ql, kl, vl = (t.to(dtype) for t in (q, k, v))
        base = qkv.attention(ql, kl, vl, score_mod=mod, causal=True, backend="math")
        assert max_err(base, ref) < (1e-5 if dtype == torch.float32 else 0.05)


def test_relative_bias_trains_its_table():
    Hq = 2
    table = torch.randn(8, Hq, dtype=torch.float64, requires_grad=True)
    q, k, v = rand_qkv(1, Hq, Hq, 5, 5, 4, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v, t: qkv.attention(q, k, v, score_mod=S.relative_bias(t, max_distance=16))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, table))
    fn(q, k, v, table).sum().backward()
    assert table.grad is not None and table.grad.abs().sum() > 0


def test_score_mod_bad_arguments():
    with pytest.raises(ValueError, match="cap"):
        S.softcap(0.0)
    with pytest.raises(ValueError, match="num_buckets, H"):
        S.relative_bias(torch.zeros(32))
    with pytest.raises(TypeError, match="bool mask goes in mask="):
        S.bias(torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="1-D float"):
        S.alibi(torch.ones(2, 2))
    q, k, v = rand_qkv(1, 2, 2, 3, 3, 4)

    class Summed(S.ScoreMod):  # a ScoreMod is called once on the whole score tensor
        def __call__(self, s, b, h, qi, kv):
            return s.sum()

    with pytest.raises(ValueError, match="score_mod must return a tensor of the score's shape"):
        qkv.attention(q, k, v, score_mod=Summed(), backend="math")
    # a plain function is evaluated per element (FlexAttention's contract): s.sum() is s there, but
    # one element must give one value
    assert max_err(qkv.attention(q, k, v, score_mod=lambda s, b, h, qi, kv: s.sum(), backend="math"),
                   qkv.attention(q, k, v, backend="math")) == 0
    with pytest.raises(ValueError, match=r"returned shape \(2,\) per element"):
        qkv.attention(q, k, v, score_mod=lambda s, b, h, qi, kv: torch.stack([s, s]), backend="math")
