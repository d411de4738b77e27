"""Property-based tests (hypothesis): random shapes and masks, every backend against the oracle.

Legend: B batch, Hq query heads, Hkv key/value heads, G = Hq // Hkv, Lq/Lk lengths, D head dim.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qkv
from qkv import masks as M
from conftest import assert_error_ratio, max_err, rand_qkv


@st.composite
def masks_for(draw, B, Hq, Lq, Lk):
    """A random built-in mask, or a random combination of two or three."""
    def leaf():
        kind = draw(st.sampled_from(["causal", "window", "window_sym", "prefix", "document", "padding",
                                     "global", "dilated", "block", "dense", "callable"]))
        if kind == "causal":
            return M.causal()
        if kind == "window":
            return M.sliding_window(draw(st.integers(1, 12)))
        if kind == "window_sym":
            return M.sliding_window(draw(st.integers(1, 12)), causal=False)
        if kind == "prefix":
            return M.prefix_lm(draw(st.integers(0, Lk)))
        if kind == "document":
            ids = sorted(draw(st.lists(st.integers(0, 3), min_size=Lk, max_size=Lk)))
            return M.document(torch.tensor(ids))
        if kind == "padding":
            return M.padding(draw(st.lists(st.integers(0, Lk), min_size=B, max_size=B)))
        if kind == "global":
            return M.global_tokens(draw(st.lists(st.integers(0, Lk - 1), min_size=1, max_size=3)))
        if kind == "dilated":
            return M.dilated(draw(st.integers(1, 4)), draw(st.integers(1, 3)), causal=draw(st.booleans()))
        if kind == "block":
            bs = draw(st.integers(1, 8))
            seed = draw(st.integers(0, 1000))
            layout = torch.rand(Hq, -(-max(Lk, 1) // bs), -(-Lk // bs), generator=torch.Generator().manual_seed(seed)) < 0.6
            return M.block_sparse(layout, bs)
        if kind == "dense":
            seed = draw(st.integers(0, 1000))
            return torch.rand(B, 1, Lq, Lk, generator=torch.Generator().manual_seed(seed)) < 0.6
        mod = draw(st.integers(2, 4))
        return lambda b, h, q, kv: (q + 2 * kv + h) % mod != 0

    m = leaf()
    for _ in range(draw(st.integers(0, 2))):
        other = leaf()
        if isinstance(m, torch.Tensor) or isinstance(other, torch.Tensor):
            break
        op = draw(st.sampled_from(["and", "or", "not"]))
        m = M.as_mask(m)
        m = m & other if op == "and" else m | other if op == "or" else ~m
    return m


@st.composite
def calls(draw):
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 3))
    Hq = Hkv * draw(st.integers(1, 3))
    Lk = draw(st.integers(1, 48))
    Lq = draw(st.integers(1, Lk))
    D = draw(st.integers(1, 24))
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
    mask = draw(st.one_of(st.none(), masks_for(B, Hq, Lq, Lk)))
    seed = draw(st.integers(0, 2**16))
    return B, Hq, Hkv, Lq, Lk, D, dtype, mask, seed


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(calls())
def test_backends_agree_with_the_oracle_on_random_calls(c):
    B, Hq, Hkv, Lq, Lk, D, dtype, mask, seed = c
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=dtype, seed=seed)
    ref = qkv.attention(q.double(), k.double(), v.double(), mask=mask, backend="reference")
    base = qkv.attention(q, k, v, mask=mask, backend="math")
    if dtype == torch.float64:
        assert max_err(base, ref) < 1e-10
    for be in ("sdpa", "auto"):
        out = qkv.attention(q, k, v, mask=mask, backend=be)
        assert_error_ratio(out, base, ref, what=f"{be} {c}")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(calls())
def test_gradients_agree_on_random_calls(c):
    B, Hq, Hkv, Lq, Lk, D, dtype, mask, seed = c
    if dtype == torch.bfloat16:
        dtype = torch.float32
    q0, k0, v0 = rand_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=torch.float64, seed=seed)

    def grads(backend, dt):
        q, k, v = (t.detach().to(dt).requires_grad_() for t in (q0, k0, v0))
        (qkv.attention(q, k, v, mask=mask, backend=backend) ** 2).sum().backward()
        return q.grad, k.grad, v.grad

    oracle = grads("math", torch.float64)
    grad_scale = max(float(g.abs().max()) for g in oracle)
    base = grads("math", dtype)
    for c_, b_, o_ in zip(grads("sdpa", dtype), base, oracle):
        if dtype == torch.float64:
            assert max_err(c_, o_) < 1e-10
        else:
            assert_error_ratio(c_, b_, o_, ratio=3.0, what=str(c), scale=grad_scale)
