"""Tests for qkv.positional.

Every expected value here is built independently in float64 with plain Python
math or numpy (direct 2x2 rotations, explicit loops), never by calling the
helper under test.  Tensors are laid out B H L D.
"""

import math

import numpy as np
import pytest
import torch

from qkv.positional import (
    LearnedPositions,
    RotaryEmbedding,
    SinusoidalPositions,
    alibi_slopes,
    apply_rope,
    rope_cos_sin,
    rope_frequencies,
    sinusoidal,
)


# -----------------------------------------------------------------------------
# Plain float64 references


def ref_sinusoidal(length, dim, base=10000.0, offset=0):
    table = np.zeros((length, dim))
    for row in range(length):
        pos = offset + row
        for j in range(dim):
            i = j // 2
            angle = pos / base ** (2 * i / dim)
            table[row, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return table


def ref_inv_freq(rotary_dim, base):
    return np.array([base ** (-2.0 * i / rotary_dim) for i in range(rotary_dim // 2)])


def ref_rope_vector(vec, pos, inv_freq, interleaved):
    """Rotate one D-vector at (possibly fractional) position pos, pair by pair.

    Channels beyond 2 * len(inv_freq) are copied through.
    """
    vec = np.asarray(vec, dtype=np.float64)
    out = vec.copy()
    half = len(inv_freq)
    for i, w in enumerate(inv_freq):
        a = pos * w
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        pair = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
        out[list(pair)] = rot @ vec[list(pair)]
    return out


def ref_rope(x, positions, inv_freq, interleaved):
    """x: numpy (B, H, L, D); positions: (L,) sequence of numbers."""
    out = np.empty_like(x, dtype=np.float64)
    B, H, L, _ = x.shape
    for b in range(B):
        for h in range(H):
            for t in range(L):
                out[b, h, t] = ref_rope_vector(x[b, h, t], positions[t], inv_freq, interleaved)
    return out


def rope64(x, positions, rotary_dim, interleaved, base=10000.0, **scaling):
    """The library path in float64, for property tests."""
    inv = rope_frequencies(rotary_dim, base=base, **scaling)
    cos, sin = rope_cos_sin(torch.as_tensor(positions), inv, interleaved=interleaved, dtype=torch.float64)
    return apply_rope(x, cos, sin, interleaved=interleaved)


# -----------------------------------------------------------------------------
# Sinusoidal


@pytest.mark.parametrize("dim", [8, 7, 1])
def test_sinusoidal_matches_formula(dim):
    got = sinusoidal(6, dim, dtype=torch.float64)
    assert got.shape == (6, dim)
    np.testing.assert_allclose(got.numpy(), ref_sinusoidal(6, dim), rtol=0, atol=1e-14)


def test_sinusoidal_odd_dim_last_column_is_sin():
    got = sinusoidal(5, 5, base=100.0, dtype=torch.float64).numpy()
    pos = np.arange(5.0)
    np.testing.assert_allclose(got[:, 4], np.sin(pos / 100.0 ** (4 / 5)), rtol=0, atol=1e-14)


def test_sinusoidal_offset_shifts_rows():
    full = sinusoidal(10, 6, dtype=torch.float64)
    tail = sinusoidal(4, 6, offset=6, dtype=torch.float64)
    torch.testing.assert_close(tail, full[6:], rtol=0, atol=1e-15)
    np.testing.assert_allclose(tail.numpy(), ref_sinusoidal(4, 6, offset=6), rtol=0, atol=1e-14)


def test_sinusoidal_dtype_and_errors():
    assert sinusoidal(3, 4).dtype == torch.float32
    assert sinusoidal(3, 4, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dim"):
        sinusoidal(3, 0)
    with pytest.raises(TypeError, match="length"):
        sinusoidal(3.0, 4)
    with pytest.raises(ValueError, match="base"):
        sinusoidal(3, 4, base=-1.0)


def test_sinusoidal_module_adds_table_with_offset():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    mod = SinusoidalPositions(6)
    out = mod(x, offset=3)
    expected = x.numpy() + ref_sinusoidal(5, 6, offset=3)[None]
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-14)
    assert mod(x.float()).dtype == torch.float32
    with pytest.raises(ValueError, match="dim"):
        mod(torch.zeros(2, 5, 7))


# -----------------------------------------------------------------------------
# Learned


def test_learned_positions_adds_rows_and_checks_max_len():
    torch.manual_seed(0)
    mod = LearnedPositions(16, 4)
    assert mod.weight.shape == (16, 4)
    x = torch.randn(3, 5, 4)
    out = mod(x, offset=2)
    torch.testing.assert_close(out - x, mod.weight.detach()[2:7].expand(3, 5, 4))
    mod(torch.zeros(1, 16, 4))  # exactly max_len is fine
    with pytest.raises(ValueError, match="max_len"):
        mod(torch.zeros(1, 17, 4))
    with pytest.raises(ValueError, match="max_len"):
        mod(torch.zeros(1, 4, 4), offset=13)


def test_learned_positions_init_std():
    torch.manual_seed(0)
    w = LearnedPositions(512, 64).weight.detach()
    assert abs(w.std().item() - 0.02) < 0.002
    assert abs(w.mean().item()) < 0.002


# -----------------------------------------------------------------------------
# RoPE: frequencies


def test_rope_frequencies_plain():
    got = rope_frequencies(16, base=500.0)
    assert got.dtype == torch.float64 and got.shape == (8,)
    np.testing.assert_allclose(got.numpy(), ref_inv_freq(16, 500.0), rtol=1e-15, atol=0)


def test_rope_frequencies_ntk_changes_base():
    rd, base, f = 32, 10000.0, 4.0
    got = rope_frequencies(rd, base=base, scaling="ntk", factor=f).numpy()
    new_base = base * f ** (rd / (rd - 2))
    np.testing.assert_allclose(got, ref_inv_freq(rd, new_base), rtol=1e-13, atol=0)
    plain = ref_inv_freq(rd, base)
    # the fastest frequency is kept, the slowest is slowed by exactly `factor`
    assert got[0] == pytest.approx(plain[0], rel=1e-15)
    assert got[-1] == pytest.approx(plain[-1] / f, rel=1e-12)


def test_rope_frequencies_errors():
    with pytest.raises(ValueError, match="rotary_dim"):
        rope_frequencies(7)
    with pytest.raises(ValueError, match="rotary_dim"):
        rope_frequencies(0)
    with pytest.raises(ValueError, match="scaling"):
        rope_frequencies(8, scaling="yarn", factor=2.0)
    with pytest.raises(ValueError, match="factor"):
        rope_frequencies(8, scaling="linear", factor=0.0)
    with pytest.raises(ValueError, match="factor"):
        rope_frequencies(8, factor=2.0)  # factor without scaling is a mistake


# -----------------------------------------------------------------------------
# RoPE: definition


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [8, 4])
def test_apply_rope_matches_pairwise_rotation(interleaved, rotary_dim):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5, 8))
    positions = [0, 1, 7, 100, 4096]
    got = rope64(torch.from_numpy(x), positions, rotary_dim, interleaved, base=10000.0)
    expected = ref_rope(x, positions, ref_inv_freq(rotary_dim, 10000.0), interleaved)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)


def test_layouts_differ_and_are_channel_permutations():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((1, 1, 4, 8)))
    half = rope64(x, [3, 4, 5, 6], 8, interleaved=False)
    inter = rope64(x, [3, 4, 5, 6], 8, interleaved=True)
    assert not torch.allclose(half, inter)
    # permuting channels to interleaved order, rotating, and permuting back = half-split
    perm = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])  # half-split pair (i, i+4) -> slots (2i, 2i+1)
    inv = torch.argsort(perm)
    via_inter = rope64(x[..., perm], [3, 4, 5, 6], 8, interleaved=True)[..., inv]
    torch.testing.assert_close(via_inter, half, rtol=0, atol=1e-13)


def test_rope_cos_sin_layouts_and_batched_positions():
    inv = torch.tensor([1.0, 0.5], dtype=torch.float64)
    pos = torch.tensor([[0, 2], [1, 3]])  # (B, L)
    cos, sin = rope_cos_sin(pos, inv, dtype=torch.float64)
    assert cos.shape == (2, 2, 4)
    assert cos[1, 1].tolist() == pytest.approx([math.cos(3), math.cos(1.5), math.cos(3), math.cos(1.5)])
    cos_i, sin_i = rope_cos_sin(pos, inv, interleaved=True, dtype=torch.float64)
    assert sin_i[1, 1].tolist() == pytest.approx([math.sin(3), math.sin(3), math.sin(1.5), math.sin(1.5)])


def test_apply_rope_batched_positions_broadcast_over_heads():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 4, 6))
    positions = [[0, 1, 2, 3], [10, 11, 12, 13]]
    got = rope64(torch.from_numpy(x), positions, 6, interleaved=False)
    inv = ref_inv_freq(6, 10000.0)
    for b in range(2):
        expected = ref_rope(x[b : b + 1], positions[b], inv, interleaved=False)
        np.testing.assert_allclose(got[b : b + 1].numpy(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("interleaved", [False, True])
def test_partial_rotary_tail_is_bit_identical(interleaved):
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = torch.randn(2, 2, 5, 10).to(dtype)
        inv = rope_frequencies(4)
        cos, sin = rope_cos_sin(torch.arange(5) + 3, inv, interleaved=interleaved)
        out = apply_rope(x, cos, sin, interleaved=interleaved)
        assert torch.equal(out[..., 4:], x[..., 4:])
        assert not torch.equal(out[..., :4], x[..., :4])


@pytest.mark.parametrize("interleaved", [False, True])
def test_linear_scaling_equals_fractional_positions(interleaved):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 2, 4, 8))
    factor = 4.0
    positions = [0, 3, 10, 8191]
    got = rope64(torch.from_numpy(x), positions, 8, interleaved, scaling="linear", factor=factor)
    # unscaled RoPE evaluated directly at the interpolated positions p / factor
    expected = ref_rope(x, [p / factor for p in positions], ref_inv_freq(8, 10000.0), interleaved)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("interleaved", [False, True])
def test_ntk_scaling_rotates_with_new_base(interleaved):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 1, 3, 8))
    positions = [1, 50, 2000]
    got = rope64(torch.from_numpy(x), positions, 8, interleaved, scaling="ntk", factor=8.0)
    new_base = 10000.0 * 8.0 ** (8 / 6)
    expected = ref_rope(x, positions, ref_inv_freq(8, new_base), interleaved)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)


# -----------------------------------------------------------------------------
# RoPE: relative-position property


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [16, 10])
def test_rope_scores_depend_only_on_relative_position(interleaved, rotary_dim):
    torch.manual_seed(0)
    D = 16
    q = torch.randn(1, 1, 1, D, dtype=torch.float64)
    k = torch.randn(1, 1, 1, D, dtype=torch.float64)

    def score(m, n):
        qm = rope64(q, [m], rotary_dim, interleaved)
        kn = rope64(k, [n], rotary_dim, interleaved)
        return (qm * kn).sum().item()

    for delta in (0, 3, -5, 17):
        pairs = [(m, m - delta) for m in (20, 57, 300, 1000)]
        scores = [score(m, n) for m, n in pairs]
        for s in scores[1:]:
            assert s == pytest.approx(scores[0], abs=1e-10)
    # different relative offsets give genuinely different scores
    distinct = [score(40, 40 - d) for d in (0, 1, 2, 7)]
    for i in range(len(distinct)):
        for j in range(i + 1, len(distinct)):
            assert abs(distinct[i] - distinct[j]) > 1e-6
    # and delta = 0 gives the plain (unrotated) dot product
    assert score(123, 123) == pytest.approx((q * k).sum().item(), abs=1e-12)


# -----------------------------------------------------------------------------
# RoPE: dtypes and precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_keeps_dtype_and_is_accurate(dtype, interleaved):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 64, 32).to(dtype)
    positions = torch.arange(64) * 97  # up to ~6000: large angles
    inv = rope_frequencies(32)
    cos, sin = rope_cos_sin(positions, inv, interleaved=interleaved)  # float32 tables
    out = apply_rope(x, cos, sin, interleaved=interleaved)
    assert out.dtype == dtype

    # exact float64 reference on the same (already rounded) input
    x64 = x.double().numpy()
    inv64 = ref_inv_freq(32, 10000.0)
    half = 16
    ang = positions.double().numpy()[:, None] * inv64[None, :]  # (L, 16)
    c, s = np.cos(ang), np.sin(ang)
    if interleaved:
        a, b = x64[..., 0::2], x64[..., 1::2]
    else:
        a, b = x64[..., :half], x64[..., half:]
    ra, rb = a * c - b * s, a * s + b * c
    ref = np.empty_like(x64)
    if interleaved:
        ref[..., 0::2], ref[..., 1::2] = ra, rb
    else:
        ref[..., :half], ref[..., half:] = ra, rb

    # Allowed error: one final rounding to `dtype` (half an ulp of the exact
    # value), plus a few float32 ulps of the pair's magnitude for the float32
    # arithmetic inside.  Native half-precision arithmetic misses this by
    # orders of magnitude wherever the two products nearly cancel.
    finfo = torch.finfo(dtype)
    binade = np.exp2(np.floor(np.log2(np.maximum(np.abs(ref), finfo.tiny))))
    half_ulp = 0.5 * finfo.eps * binade
    pair_mag = np.abs(a) + np.abs(b)  # each output mixes one channel pair
    scale = np.repeat(pair_mag, 2, -1) if interleaved else np.concatenate([pair_mag, pair_mag], -1)
    eps32 = torch.finfo(torch.float32).eps
    err = np.abs(out.double().numpy() - ref)
    assert np.all(err <= half_ulp + 4 * eps32 * scale)
    # and the result is genuinely in `dtype`, i.e. not more accurate than one rounding
    if dtype != torch.float32:
        assert err.max() > 0


def test_rope_float64_input_uses_float64_math():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    rope = RotaryEmbedding(8)
    out = rope.rotate(x, offset=100000)
    expected = ref_rope(x.numpy(), list(range(100000, 100008)), ref_inv_freq(8, 10000.0), False)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-11)


# -----------------------------------------------------------------------------
# RotaryEmbedding module


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_embedding_matches_reference_and_offsets(interleaved):
    torch.manual_seed(0)
    rope = RotaryEmbedding(8, base=1000.0, interleaved=interleaved)
    q = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    k = torch.randn(2, 2, 7, 8, dtype=torch.float64)
    q_rot, k_rot = rope(q, k, offset=3)
    inv = ref_inv_freq(8, 1000.0)
    np.testing.assert_allclose(q_rot.numpy(), ref_rope(q.numpy(), range(3, 8), inv, interleaved), atol=1e-12)
    np.testing.assert_allclose(k_rot.numpy(), ref_rope(k.numpy(), range(3, 10), inv, interleaved), atol=1e-12)
    # explicit positions agree with the cached offset path
    q_exp, k_exp = rope(q, k, torch.arange(3, 8), torch.arange(3, 10))
    torch.testing.assert_close(q_exp, q_rot, rtol=0, atol=1e-13)
    torch.testing.assert_close(k_exp, k_rot, rtol=0, atol=1e-13)


def test_rotary_embedding_decode_steps_match_prefill():
    torch.manual_seed(0)
    rope = RotaryEmbedding(16, rotary_dim=8)
    x = torch.randn(1, 2, 12, 16)
    full = rope.rotate(x)
    steps = torch.cat([rope.rotate(x[:, :, t : t + 1], offset=t) for t in range(12)], dim=2)
    torch.testing.assert_close(steps, full, rtol=0, atol=0)
    assert torch.equal(full[..., 8:], x[..., 8:])


def test_rotary_embedding_caches_table():
    rope = RotaryEmbedding(8)
    x = torch.randn(1, 1, 6, 8)
    rope.rotate(x)
    cached = rope._cache
    rope.rotate(x[:, :, :4], offset=2)  # within the cached range: no recomputation
    assert rope._cache is cached
    rope.rotate(x.double())  # different dtype: new table
    assert rope._cache is not cached and rope._cache[2] == torch.float64


def test_rotary_embedding_partial_factor_and_buffers():
    rope = RotaryEmbedding(10, partial_rotary_factor=0.5)  # 5 -> rounded down to 4
    assert rope.rotary_dim == 4
    assert rope.inv_freq.dtype == torch.float32 and rope.inv_freq.shape == (2,)
    assert "inv_freq" not in rope.state_dict()
    assert RotaryEmbedding(64, partial_rotary_factor=0.25).rotary_dim == 16


def test_rotary_embedding_argument_errors():
    with pytest.raises(ValueError, match="rotary_dim"):
        RotaryEmbedding(8, rotary_dim=5)
    with pytest.raises(ValueError, match="rotary_dim"):
        RotaryEmbedding(8, rotary_dim=10)
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        RotaryEmbedding(8, rotary_dim=4, partial_rotary_factor=0.5)
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        RotaryEmbedding(8, partial_rotary_factor=0.1)
    with pytest.raises(ValueError, match="head_dim"):
        RotaryEmbedding(8).rotate(torch.zeros(1, 1, 2, 6))
    with pytest.raises(ValueError, match="dims"):
        RotaryEmbedding(8).rotate(torch.zeros(2, 8))


def test_apply_rope_argument_errors():
    x = torch.zeros(1, 1, 3, 8)
    cos, sin = rope_cos_sin(torch.arange(3), rope_frequencies(8))
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rope(torch.zeros(1, 1, 3, 4), cos, sin)
    with pytest.raises(ValueError, match="L=4"):
        apply_rope(torch.zeros(1, 1, 4, 8), cos, sin)
    with pytest.raises(TypeError, match="floating"):
        apply_rope(x.long(), cos, sin)


# -----------------------------------------------------------------------------
# ALiBi


def test_alibi_slopes_power_of_two():
    got = alibi_slopes(8)
    assert got.dtype == torch.float32
    assert got.tolist() == [1 / 2**i for i in range(1, 9)]  # powers of two are exact in float32


def test_alibi_slopes_all_sizes_positive():
    for n in range(1, 65):
        s = alibi_slopes(n)
        assert s.shape == (n,)
        assert bool((s > 0).all()) and bool((s <= 1).all())
        assert len(set(s.tolist())) == n  # every head gets its own slope


def test_alibi_slopes_non_power_of_two():
    # n = 12: the 8 slopes of n=8, then every other slope of n=16, first 4 of them
    eight = [2.0 ** (-8 / 8 * (i + 1)) for i in range(8)]
    sixteen = [2.0 ** (-8 / 16 * (i + 1)) for i in range(16)]
    expected = eight + [sixteen[0], sixteen[2], sixteen[4], sixteen[6]]
    np.testing.assert_allclose(alibi_slopes(12).numpy(), np.float32(expected), rtol=0, atol=0)
    # n = 6: slopes of 4 then the 1st and 3rd slopes of 8
    four = [2.0 ** (-2 * (i + 1)) for i in range(4)]
    expected6 = four + [2.0**-1, 2.0**-3]
    np.testing.assert_allclose(alibi_slopes(6).numpy(), np.float32(expected6), rtol=0, atol=0)


def test_alibi_slopes_errors():
    with pytest.raises(ValueError, match="n_heads"):
        alibi_slopes(0)
    with pytest.raises(TypeError, match="n_heads"):
        alibi_slopes(4.0)
