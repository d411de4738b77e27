"""Tests for qkv.layers: MultiHeadAttention, FeedForward, RMSNorm, Block.

Legend: B batch, Lq/Lk lengths, Hq query heads, Hkv key/value heads, D head dim, E d_model.

Expected values come from the NumPy float64 oracle (`qkv.reference`) or from
plain float64 formulas written out here, never from the module under test.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import qkv
from qkv import reference as R
from qkv.layers import Block, FeedForward, MultiHeadAttention, RMSNorm
from qkv.positional import RotaryEmbedding
from conftest import assert_error_ratio, max_err

TOL64 = 1e-10


def randn(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def make_mha(*args, seed=0, dtype=torch.float64, **kw):
    """A module with random (never zero) weights and biases."""
    torch.manual_seed(seed)
    m = MultiHeadAttention(*args, dtype=dtype, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return m


def oracle_mha(m: MultiHeadAttention, x, context=None, **kw):
    """qkv.reference.multi_head_attention with the module's weights."""
    b = (lambda lin: None if lin.bias is None else lin.bias)
    return R.multi_head_attention(
        x, m.q_proj.weight, m.k_proj.weight, m.v_proj.weight, m.o_proj.weight,
        n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, context=context,
        b_q=b(m.q_proj), b_k=b(m.k_proj), b_v=b(m.v_proj), b_o=b(m.o_proj), **kw)


def as64(t) -> torch.Tensor:
    """A detached float64 tensor from a tensor or NumPy array."""
    return t.detach().double() if isinstance(t, torch.Tensor) else torch.as_tensor(np.asarray(t, dtype=np.float64))


def err(actual, expected) -> float:
    return max_err(as64(actual), as64(expected))


def close64(actual, expected, tol=TOL64):
    assert actual.shape == as64(expected).shape, (actual.shape, as64(expected).shape)
    e = err(actual, expected)
    assert e < tol, f"max error {e:.3e} >= {tol}"


def np_rope(x, positions, base=10000.0):
    """Half-split RoPE by hand: channel i pairs with i + D/2, angle = pos * base^(-2i/D).

    x (B, H, L, D) NumPy float64, positions (B, L)."""
    D = x.shape[-1]
    half = D // 2
    inv = base ** (-np.arange(half) * 2.0 / D)                      # (D/2,)
    ang = positions[:, None, :, None].astype(np.float64) * inv       # (B, 1, L, D/2)
    c, s = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


# -----------------------------------------------------------------------------
# MultiHeadAttention vs the float64 oracle

MASKS = {
    "none": (None, False),
    "causal": (None, True),
    "window_padding": (qkv.masks.sliding_window(3, causal=False) & qkv.masks.padding([6, 4]), False),
    "window_causal": (qkv.masks.sliding_window(2), True),
}


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_mha_self_attention_matches_oracle(n_kv_heads, bias, mask_name):
    mask, causal = MASKS[mask_name]
    m = make_mha(24, 4, n_kv_heads=n_kv_heads, bias=bias, backend="math")
    assert (m.q_proj.bias is None) == (not bias) and (m.o_proj.bias is None) == (not bias)
    x = randn(2, 6, 24, seed=1)
    out, w = m(x, mask=mask, causal=causal, return_weights=True)
    ref_out, ref_w = oracle_mha(m, x, mask=mask, causal=causal, return_weights=True)
    assert out.dtype == torch.float64 and w.shape == (2, 4, 6, 6)
    close64(out, ref_out)
    close64(w, ref_w)
    # without return_weights the plain output comes back, on the auto backend too
    m.backend = "auto"
    close64(m(x, mask=mask, causal=causal), ref_out)


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("causal", [False, True])
def test_mha_cross_attention_matches_oracle(n_kv_heads, causal):
    m = make_mha(24, 4, n_kv_heads=n_kv_heads, kv_dim=10, out_bias=False, backend="math")
    assert m.k_proj.weight.shape == (m.n_kv_heads * 6, 10) and m.o_proj.bias is None
    x, ctx = randn(2, 3, 24, seed=2), randn(2, 7, 10, seed=3)
    mask = qkv.masks.padding([7, 5])
    out, w = m(x, ctx, mask=mask, causal=causal, return_weights=True)
    ref_out, ref_w = oracle_mha(m, x, ctx, mask=mask, causal=causal, return_weights=True)
    assert out.shape == (2, 3, 24) and w.shape == (2, 4, 3, 7)
    close64(out, ref_out)
    close64(w, ref_w)


def test_mha_explicit_head_dim_and_scale():
    # head_dim need not be d_model / n_heads (e.g. Gemma); scale is forwarded
    m = make_mha(20, 3, head_dim=8, scale=0.3, backend="math")
    assert m.q_proj.weight.shape == (24, 20) and m.o_proj.weight.shape == (20, 24)
    x = randn(1, 5, 20, seed=4)
    close64(m(x, causal=True), oracle_mha(m, x, causal=True, scale=0.3))


# -----------------------------------------------------------------------------
# Positions: RoPE and ALiBi


def projected_heads(m, x, ctx=None):
    """Project with the module's weights in NumPy float64 and split heads: q, k, v (B, H, L, D)."""
    src = x if ctx is None else ctx
    lin = lambda layer, t: R.linear(t, layer.weight, layer.bias)  # noqa: E731
    q = R.split_heads(lin(m.q_proj, x), m.n_heads)
    k = R.split_heads(lin(m.k_proj, src), m.n_kv_heads)
    v = R.split_heads(lin(m.v_proj, src), m.n_kv_heads)
    return q, k, v


def finish(m, out_heads):
    return R.linear(R.merge_heads(out_heads), m.o_proj.weight, m.o_proj.bias)


@pytest.mark.parametrize("explicit_positions", [False, True])
def test_mha_rope_matches_hand_written(explicit_positions):
    rope = RotaryEmbedding(8)
    m = make_mha(32, 4, n_kv_heads=2, rope=rope, backend="math")
    x = randn(2, 5, 32, seed=5)
    if explicit_positions:  # gaps (RoPE is relative: a uniform shift would not change the result)
        positions = torch.tensor([[0, 1, 2, 3, 4], [7, 9, 10, 14, 20]])
        out = m(x, causal=True, positions=positions)
    else:
        positions = torch.arange(5).expand(2, 5)
        out = m(x, causal=True)
    q, k, v = projected_heads(m, x)
    pos = positions.numpy()
    expected = finish(m, R.attention(np_rope(q, pos), np_rope(k, pos), v, causal=True))
    close64(out, expected)
    # and RoPE changed something: without it the result differs
    m_plain = copy.deepcopy(m)
    m_plain.rope = None
    assert err(m_plain(x, causal=True), expected) > 1e-3


def test_mha_rope_in_cross_attention_only_on_request():
    rope = RotaryEmbedding(6)
    m = make_mha(12, 2, kv_dim=9, rope=rope, backend="math")
    x, ctx = randn(2, 3, 12, seed=6), randn(2, 5, 9, seed=7)
    # default: keys from another sequence are not rotated (and neither are queries)
    close64(m(x, ctx), oracle_mha(m, x, ctx))
    # opt-in with context_positions: q rotated by positions, k by context_positions
    qpos, kpos = torch.tensor([3, 4, 5]), torch.tensor([0, 1, 2, 3, 4])
    out = m(x, ctx, positions=qpos, context_positions=kpos)
    q, k, v = projected_heads(m, x, ctx)
    expected = finish(m, R.attention(np_rope(q, np.tile(qpos.numpy(), (2, 1))),
                                     np_rope(k, np.tile(kpos.numpy(), (2, 1))), v))
    close64(out, expected)


@pytest.mark.parametrize("slopes", ["paper", "tensor"])
def test_mha_alibi_matches_reference_and_chains_score_mod(slopes):
    n_heads = 6
    alibi = True if slopes == "paper" else torch.tensor([0.5, 0.25, 0.1, 1.0, 2.0, 0.05])
    m = make_mha(24, n_heads, n_kv_heads=3, alibi=alibi, backend="math")
    mod = qkv.scores.alibi(n_heads) if slopes == "paper" else qkv.scores.alibi(alibi.double())
    x = randn(2, 7, 24, seed=8)
    close64(m(x, causal=True), oracle_mha(m, x, causal=True, score_mod=mod))
    cap = qkv.scores.softcap(2.0)
    close64(m(x, causal=True, score_mod=cap),
            oracle_mha(m, x, causal=True, score_mod=qkv.scores.chain(mod, cap)))
    # the slopes are a buffer that follows dtype/device but is not saved
    assert "alibi_slopes" not in m.state_dict() and m.alibi_slopes.shape == (n_heads,)


# -----------------------------------------------------------------------------
# Backends, gradients, dropout


@pytest.mark.parametrize("n_kv_heads,causal", [(None, False), (2, True), (1, True)])
def test_mha_math_vs_sdpa_error_ratio_outputs_and_grads(n_kv_heads, causal):
    m64 = make_mha(64, 4, n_kv_heads=n_kv_heads, seed=9)
    x64 = randn(2, 33, 64, seed=10)

    def run(dtype, backend):
        m = copy.deepcopy(m64).to(dtype)
        m.backend = backend
        x = x64.to(dtype).clone().requires_grad_(True)
        out = m(x, causal=causal)
        out.backward(torch.cos(out.detach().double() * 3).to(dtype))  # a non-trivial upstream gradient
        return out.detach(), x.grad, m.q_proj.weight.grad, m.v_proj.weight.grad

    oracle = run(torch.float64, "math")
    close64(oracle[0], oracle_mha(m64, x64, causal=causal))
    math32, sdpa32 = run(torch.float32, "math"), run(torch.float32, "sdpa")
    assert sdpa32[0].dtype == torch.float32
    assert_error_ratio(sdpa32[0], math32[0], oracle[0], what="output")
    for name, c, b, o in zip(["dx", "dWq", "dWv"], sdpa32[1:], math32[1:], oracle[1:]):
        assert_error_ratio(c, b, o, ratio=3.0, what=name)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_mha_gradients_reach_every_parameter(backend):
    # RoPE makes k_proj.bias matter; see the next test for why it needs it
    m = make_mha(16, 4, n_kv_heads=2, rope=RotaryEmbedding(4), dtype=torch.float32, backend=backend)
    x = randn(2, 6, 16, seed=11, dtype=torch.float32)
    m(x, causal=True).pow(2).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 1e-6, f"{name} got a zero gradient"


def test_key_bias_gradient_vanishes_without_positions():
    # Without RoPE, a key bias adds q.b_k to every score of a query row: softmax
    # ignores a per-row shift, so its gradient is exactly zero in exact arithmetic.
    m = make_mha(16, 4, backend="math")
    x = randn(2, 6, 16, seed=12)
    m(x, causal=True).pow(2).sum().backward()
    assert m.k_proj.bias.grad.abs().max() < 1e-12
    assert m.q_proj.bias.grad.abs().max() > 1e-3


def test_attention_dropout_only_in_training_mode():
    m = make_mha(16, 2, dropout=0.5, backend="math")
    x = randn(2, 8, 16, seed=13)
    m.eval()
    reference = oracle_mha(m, x)
    close64(m(x), reference)
    close64(m(x), reference)  # deterministic
    m.train()
    torch.manual_seed(0)
    a, w = m(x, return_weights=True)
    b = m(x)
    assert err(a, reference) > 1e-3 and err(a, b) > 1e-3
    # the weights returned are after dropout: some are zeroed, the survivors scaled by 1 / (1 - p)
    assert (w == 0).float().mean() > 0.2
    ref_w = as64(oracle_mha(m, x, return_weights=True)[1])
    kept = w != 0
    assert torch.allclose(w[kept], 2 * ref_w[kept], atol=1e-12)


# -----------------------------------------------------------------------------
# FeedForward and RMSNorm


def np_act(name, z):
    if name in ("gelu", "geglu"):
        return 0.5 * z * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    if name == "relu":
        return np.maximum(z, 0)
    if name == "swiglu":
        return z / (1 + np.exp(-z))
    raise AssertionError(name)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "swiglu", "geglu"])
@pytest.mark.parametrize("bias", [True, False])
def test_feed_forward_matches_formula(activation, bias):
    torch.manual_seed(14)
    f = FeedForward(12, 20, activation=activation, bias=bias, dtype=torch.float64)
    x = randn(2, 5, 12, seed=15) * 2
    lin = lambda layer, t: R.linear(t, layer.weight, layer.bias)  # noqa: E731
    if activation in ("swiglu", "geglu"):
        assert {n for n, _ in f.named_children()} >= {"gate_proj", "up_proj", "down_proj"}
        expected = lin(f.down_proj, np_act(activation, lin(f.gate_proj, x)) * lin(f.up_proj, x))
    else:
        assert {n for n, _ in f.named_children()} >= {"fc1", "fc2"}
        expected = lin(f.fc2, np_act(activation, lin(f.fc1, x)))
    assert all((p is None) == (not bias) for p in (getattr(mod, "bias") for mod in f.modules()
                                                   if isinstance(mod, torch.nn.Linear)))
    close64(f(x), expected, tol=1e-12)


def test_feed_forward_dropout_only_in_training():
    f = FeedForward(8, 32, dropout=0.5, dtype=torch.float64)
    x = randn(3, 8, seed=16)
    f.eval()
    assert torch.equal(f(x), f(x))
    f.train()
    assert not torch.equal(f(x), f(x))


def np_rms(x, w, eps):
    x = np.asarray(x, dtype=np.float64)
    return w * x / np.sqrt((x**2).mean(-1, keepdims=True) + eps)


def test_rms_norm_matches_formula_and_keeps_dtype():
    n = RMSNorm(10, eps=1e-5, dtype=torch.float64)
    with torch.no_grad():
        n.weight.copy_(randn(10, seed=17))
    x = randn(3, 4, 10, seed=18) * 3
    close64(n(x), np_rms(x.numpy(), n.weight.detach().numpy(), 1e-5), tol=1e-12)
    # bf16: statistics in float32, output in bf16, within bf16 rounding of the formula
    n16 = copy.deepcopy(n).to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    yb = n16(xb)
    assert yb.dtype == torch.bfloat16
    expected = np_rms(xb.double().numpy(), n16.weight.double().detach().numpy(), 1e-5)
    assert err(yb, expected) <= 3 * torch.finfo(torch.bfloat16).eps * np.abs(expected).max()
    # a float32 weight with a bf16 input still returns bf16
    assert RMSNorm(10)(xb).dtype == torch.bfloat16
    # without affine there are no parameters and the output has unit RMS
    plain = RMSNorm(10, eps=0.0, elementwise_affine=False)
    assert list(plain.parameters()) == [] and plain.weight is None
    rms = plain(x).pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-12)


# -----------------------------------------------------------------------------
# Block


def randomize(module, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 and p.shape[0] == 16 else 0.0))
    return module


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("norm_position", ["pre", "post"])
@pytest.mark.parametrize("cross", [False, True])
def test_block_equals_hand_written_composition(norm, norm_position, cross):
    blk = Block(16, 4, n_kv_heads=2, ffn_hidden=24, activation="swiglu", norm=norm,
                norm_position=norm_position, cross_attention=cross, dropout=0.3,
                rope=RotaryEmbedding(4), dtype=torch.float64)
    randomize(blk, 19).eval()  # eval: dropout off
    assert isinstance(blk.norm1, torch.nn.LayerNorm if norm == "layer" else RMSNorm)
    x = randn(2, 5, 16, seed=20)
    ctx = randn(2, 7, 16, seed=21) if cross else None
    cmask = qkv.masks.padding([7, 4])

    # the composition, spelled out from the submodules
    sa = lambda h: blk.self_attn(h, causal=True)                          # noqa: E731
    ca = lambda h: blk.cross_attn(h, ctx, mask=cmask)                     # noqa: E731
    if norm_position == "pre":
        h = x + sa(blk.norm1(x))
        if cross:
            h = h + ca(blk.norm_cross(h))
        expected = h + blk.ffn(blk.norm2(h))
    else:
        h = blk.norm1(x + sa(x))
        if cross:
            h = blk.norm_cross(h + ca(h))
        expected = blk.norm2(h + blk.ffn(h))

    kw = {"context": ctx, "context_mask": cmask} if cross else {}
    out, w = blk(x, causal=True, return_weights=True, **kw)
    close64(out, expected, tol=1e-12)
    assert w["self"].shape == (2, 4, 5, 5)
    assert (w["cross"] is None) != cross
    if cross:
        assert w["cross"].shape == (2, 4, 5, 7) and (w["cross"][1, :, :, 4:] == 0).all()
    # in training mode the residual/attention dropout changes the output
    blk.train()
    assert err(blk(x, causal=True, **kw), expected) > 1e-3


def test_block_self_attention_matches_reference_oracle():
    # an independent check of the whole pre-norm path: LayerNorm by hand, attention by the oracle
    blk = randomize(Block(16, 2, ffn_hidden=8, activation="relu", dtype=torch.float64), 22)
    x = randn(1, 4, 16, seed=23)

    def ln(t, mod):
        t = np.asarray(t)
        mu, var = t.mean(-1, keepdims=True), t.var(-1, keepdims=True)
        return (t - mu) / np.sqrt(var + 1e-5) * mod.weight.detach().numpy() + mod.bias.detach().numpy()

    xn = x.numpy()
    h = xn + oracle_mha(blk.self_attn, ln(xn, blk.norm1), causal=True)
    f = blk.ffn
    z = np.maximum(R.linear(ln(h, blk.norm2), f.fc1.weight, f.fc1.bias), 0)
    expected = h + R.linear(z, f.fc2.weight, f.fc2.bias)
    close64(blk(x, causal=True), expected)


def test_block_context_is_required_exactly_with_cross_attention():
    x = randn(1, 3, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="context"):
        Block(8, 2, cross_attention=True)(x)
    with pytest.raises(ValueError, match="cross_attention=True"):
        Block(8, 2)(x, context=x)
    assert Block(8, 2, cross_attention=True)(x, context=randn(1, 6, 8, dtype=torch.float32)).shape == (1, 3, 8)


# -----------------------------------------------------------------------------
# Argument errors


@pytest.mark.parametrize("build,match", [
    (lambda: MultiHeadAttention(10, 4), "n_heads"),
    (lambda: MultiHeadAttention(16, 4, n_kv_heads=3), "n_kv_heads"),
    (lambda: MultiHeadAttention(16, 4, rope=RotaryEmbedding(8)), "head_dim"),
    (lambda: MultiHeadAttention(16, 4, alibi=torch.ones(3)), "alibi"),
    (lambda: MultiHeadAttention(16, 4, dropout=1.0), "dropout"),
    (lambda: FeedForward(8, 16, activation="tanh"), "activation"),
    (lambda: Block(8, 2, norm="batch"), "norm"),
    (lambda: Block(8, 2, norm_position="middle"), "norm_position"),
    (lambda: Block(8, 2, activation="swish"), "activation"),
    (lambda: Block(8, 3), "n_heads"),
])
def test_argument_errors_name_the_argument(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_unknown_activation_lists_the_choices():
    with pytest.raises(ValueError) as e:
        FeedForward(8, 16, activation="tanh")
    for choice in ("gelu", "gelu_tanh", "relu", "swiglu", "geglu"):
        assert repr(choice) in str(e.value)


def test_forward_argument_errors():
    m = MultiHeadAttention(8, 2, kv_dim=5)
    x = randn(1, 3, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="d_model=8"):
        m(randn(1, 3, 7, dtype=torch.float32))
    with pytest.raises(ValueError, match="kv_dim=5"):
        m(x, randn(1, 4, 8, dtype=torch.float32))
    with pytest.raises(ValueError, match="rope"):
        m(x, positions=torch.arange(3))
    with pytest.raises(ValueError, match="context_positions"):
        MultiHeadAttention(8, 2, rope=RotaryEmbedding(4))(x, context_positions=torch.arange(3))
    with pytest.raises(ValueError, match="sdpa"):  # sdpa cannot return weights; the error says so
        MultiHeadAttention(8, 2, backend="sdpa")(x, return_weights=True)
