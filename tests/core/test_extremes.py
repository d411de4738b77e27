"""Numerical extremes: huge logits, fully masked rows, one key, empty shapes, NaN/Inf, memory walls.

Legend: B batch, Hq query heads, Hkv key/value heads, Lq/Lk lengths, D head dim, Dv value dim.

What qkv guarantees at each extreme is stated in `qkv.attention`'s docstring
("Edge cases", "NaN and Inf"); these tests hold every backend to it. Exact
backends: reference, math, sdpa, tiled (torch's fused CPU kernel per tile) and
tiled-generic (the pure-torch tile engine, which also serves score mods and GPUs).
Numerics follow DESIGN.md's error-ratio rule against a float64 oracle.

Memory-wall tests build their huge inputs as expanded views of one element
(`torch.zeros(1, 1, 1, 1).expand(...)`), so nothing of size L is ever allocated,
and use lengths whose needs are TiB: if a refusal ever regressed, the
allocation would fail at once instead of filling the machine.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import qkv
import qkv._util.budget
from qkv import masks as M
from qkv import scores as S
from qkv.backends import BackendError, MemoryNeedError
from conftest import EPS, assert_error_ratio, max_err, rand_qkv

EXACT = ("reference", "math", "sdpa", "tiled", "tiled-generic")
GRAD = ("math", "sdpa", "tiled", "tiled-generic")          # exact backends with a backward
APPROX = ("linear", "performer")
NAN, INF = float("nan"), float("inf")


@contextlib.contextmanager
def _engine(backend: str):
    """`tiled-generic` is the tiled backend with its generic engine; other names pass through."""
    if backend != "tiled-generic":
        yield backend
        return
    tiled = qkv.backends.get("tiled")
    old = tiled.engine
    tiled.engine = "generic"
    try:
        yield "tiled"
    finally:
        tiled.engine = old


def attend(backend, q, k, v, **kw):
    with _engine(backend) as name:
        return qkv.attention(q, k, v, backend=name, **kw)


def oracle(q, k, v, **kw):
    """The float64 reference on the (already rounded) inputs."""
    return qkv.attention(q.detach().double(), k.detach().double(), v.detach().double(), backend="reference", **kw)


def grads(backend, q, k, v, dout, **kw):
    """(out, dq, dk, dv) of one backend for the loss sum(out * dout)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attend(backend, q, k, v, **kw)
    (out * dout.to(out.dtype)).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def grads64(q, k, v, dout, **kw):
    """Gradient oracle: math in float64 on the (already rounded) inputs."""
    return grads("math", q.double(), k.double(), v.double(), dout.double(), **kw)


# -----------------------------------------------------------------------------
# Logits of 1e4 and more in fp16 / bf16


def big_logits(dtype, logit, *, B=1, Hq=2, Hkv=2, Lq=17, Lk=23, D=8, Dv=None, seed=0):
    """Inputs whose largest |q.k * scale| is `logit` (q and k scaled alike), cast to `dtype`."""
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, D, Dv, dtype=torch.float64, seed=seed)
    raw = torch.matmul(q.view(B, Hkv, -1, D), k.transpose(-1, -2)).abs().max() / math.sqrt(D)
    c = math.sqrt(logit / float(raw))
    return tuple(t.to(dtype) for t in (q * c, k * c, v))


MODS = {"none": None, "alibi": S.alibi(2), "softcap": S.softcap(50.0)}
# (backend, score mod) pairs: sdpa takes no score_mod (it refuses one)
WITH_MODS = [(b, m) for b in EXACT for m in MODS if b != "sdpa" or m == "none"]
GRAD_WITH_MODS = [(b, m) for b, m in WITH_MODS if b in GRAD]


@pytest.mark.parametrize("dtype, logit", [(torch.float16, 1e4), (torch.float16, 6e4), (torch.bfloat16, 1e4),
                                          (torch.bfloat16, 6e4), (torch.float16, 1e6), (torch.bfloat16, 1e30)],
                         ids=["fp16-1e4", "fp16-6e4", "bf16-1e4", "bf16-6e4", "fp16-1e6", "bf16-1e30"])
@pytest.mark.parametrize("backend, mod", WITH_MODS)
def test_huge_logits_forward(backend, mod, dtype, logit):
    """Logits of 1e4 up to float32's range: finite, and within the error ratio of the same-dtype math run."""
    q, k, v = big_logits(dtype, logit)
    kw = dict(score_mod=MODS[mod], causal=True)
    out = attend(backend, q, k, v, **kw)
    assert torch.isfinite(out).all()
    assert_error_ratio(out, attend("math", q, k, v, **kw), oracle(q, k, v, **kw), what=f"{backend} {mod}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend, mod", GRAD_WITH_MODS)
def test_huge_logits_gradients(backend, mod, dtype):
    q, k, v = big_logits(dtype, 6e4, Lq=9, Lk=9)
    dout = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=torch.Generator().manual_seed(1)).to(dtype)
    kw = dict(score_mod=MODS[mod], causal=True)
    got = grads(backend, q, k, v, dout, **kw)
    base = grads("math", q, k, v, dout, **kw)
    ref = grads64(q, k, v, dout, **kw)
    for name, c, b, r in zip(("out", "dq", "dk", "dv"), got, base, ref):
        assert torch.isfinite(c).all(), name
        assert_error_ratio(c, b, r, ratio=2.0 if name == "out" else 3.0, what=f"{backend} {mod} {name}")


@pytest.mark.parametrize("backend", APPROX)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_huge_logits_approximate_backends_stay_finite(backend, dtype, causal):
    """linear's elu+1 features never overflow; performer's estimate underflows at such logits,
    and rows left without an estimate give zeros (like a row with no key), never NaN, also in
    the backward."""
    for logit in (1e4, 6e4, 1e6):
        q, k, v = (t.requires_grad_() for t in big_logits(dtype, logit, Lq=12, Lk=12))
        out = attend(backend, q, k, v, causal=causal)
        out.float().pow(2).sum().backward()
        assert torch.isfinite(out).all()
        for t in (q, k, v):
            assert torch.isfinite(t.grad).all()
        if backend == "linear":  # exact to its own formula: compare with the float64 evaluation
            ref = attend("linear", q.detach().double(), k.detach().double(), v.detach().double(), causal=causal)
            assert max_err(out.detach(), ref) <= 2 * EPS[dtype] * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("mod", ["none", "alibi"])
def test_regression_fp16_math_scores_overflow(mod):
    """math formed q k^T in fp16: past 65504 the product was inf and the row NaN (with ALiBi too)."""
    q, k, v = big_logits(torch.float16, 6e4)
    raw = torch.matmul(q.float(), k.float().transpose(-1, -2)).abs().max()
    assert raw > torch.finfo(torch.float16).max        # the fp16 product itself does not fit
    out = qkv.attention(q, k, v, backend="math", score_mod=MODS[mod])
    assert torch.isfinite(out).all()
    assert max_err(out, oracle(q, k, v, score_mod=MODS[mod])) <= EPS[torch.float16] * 4


@pytest.mark.parametrize("backend", EXACT)
def test_regression_bf16_math_scores_rounded(backend):
    """math formed q k^T in bf16, which spaces values near 1e4 by 64: logits 10000 and 9970 both
    became 9984 and the key 30 logits behind got half the weight."""
    q = torch.tensor([[[[100.0, 1.0]]]], dtype=torch.bfloat16)             # bf16-exact inputs
    k = torch.tensor([[[[100.0, 0.0], [99.5, 20.0]]]], dtype=torch.bfloat16)  # q.k = 10000 and 9970
    v = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]], dtype=torch.bfloat16)
    out = attend(backend, q, k, v, scale=1.0)
    assert torch.allclose(out.float(), v[:, :, :1].float(), rtol=0, atol=1e-6)   # e^-30 on the second key


def test_regression_performer_large_logit_nan_gradients():
    """performer's denominator underflowed to a subnormal at logits ~1e4: num / den^2 overflowed
    and the backward returned NaN."""
    q, k, v = (t.requires_grad_() for t in big_logits(torch.float16, 1e4, Lq=16, Lk=16))
    qkv.attention(q, k, v, backend="performer").float().pow(2).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# -----------------------------------------------------------------------------
# Fully masked rows: zeros, zero gradients, lse -inf, weights 0


def _rows_mask(Lq, Lk, empty_rows, seed=0):
    """A random (1, 1, Lq, Lk) mask whose `empty_rows` have no allowed key (the others at least one)."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(1, 1, Lq, Lk, generator=g) < 0.5
    dense[..., torch.arange(Lq), torch.arange(Lq) % Lk] = True
    dense[..., empty_rows, :] = False
    return dense


@pytest.mark.parametrize("backend", EXACT)
def test_fully_masked_rows(backend):
    q, k, v = rand_qkv(2, 4, 2, 9, 11, 8, 5, seed=3)
    empty = [0, 4, 8]
    mask = _rows_mask(9, 11, empty)
    if backend == "sdpa":                                                 # no LSE or weights from sdpa
        out, lse, w = attend(backend, q, k, v, mask=mask), None, None
    else:
        out, lse, w = attend(backend, q, k, v, mask=mask, return_lse=True, return_weights=True)
    assert (out[:, :, empty] == 0).all()
    assert_error_ratio(out, attend("math", q, k, v, mask=mask), oracle(q, k, v, mask=mask), what=backend)
    if lse is not None:
        assert torch.isneginf(lse[:, :, empty]).all() and torch.isfinite(lse[:, :, [1, 2, 3]]).all()
        assert (w[:, :, empty] == 0).all()
        assert torch.allclose(w.sum(-1)[:, :, [1, 2, 3]], torch.ones(()), atol=1e-5)
    if backend == "reference":
        return
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    got = grads(backend, q, k, v, dout, mask=mask)
    base, ref64 = grads("math", q, k, v, dout, mask=mask), grads64(q, k, v, dout, mask=mask)
    assert (got[1][:, :, empty] == 0).all()                               # dq of the empty rows
    for name, c, b, r in zip(("dq", "dk", "dv"), got[1:], base[1:], ref64[1:]):
        assert_error_ratio(c, b, r, ratio=3.0, what=f"{backend} {name}")


@pytest.mark.parametrize("backend", EXACT)
def test_padding_of_an_empty_sequence(backend):
    """padding(lengths) with a length-0 sequence: its rows are all fully masked."""
    q, k, v = (t.requires_grad_(backend != "reference") for t in rand_qkv(2, 2, 2, 6, 6, 4, seed=5))
    out = attend(backend, q, k, v, mask=M.padding([6, 0]))
    assert (out[1] == 0).all() and torch.isfinite(out).all()
    if backend != "reference":
        out.sum().backward()
        assert (q.grad[1] == 0).all() and (k.grad[1] == 0).all() and (v.grad[1] == 0).all()


@pytest.mark.parametrize("backend", APPROX)
def test_approximate_rows_before_every_key_are_zero(backend):
    """Causal with Lq > Lk: the first Lq - Lk queries sit before every key (no key): zeros, zero dq."""
    q, k, v = (t.requires_grad_() for t in rand_qkv(1, 2, 2, 7, 4, 8, seed=6))
    out = attend(backend, q, k, v, causal=True)
    assert (out[:, :, :3] == 0).all() and torch.isfinite(out).all()
    out.pow(2).sum().backward()
    assert (q.grad[:, :, :3] == 0).all() and torch.isfinite(k.grad).all()


def test_layer_padding_mask_with_an_empty_sequence():
    """MultiHeadAttention with a padding mask: a sequence with no real token outputs o_proj's bias
    and sends no gradient into its input."""
    torch.manual_seed(0)
    layer = qkv.layers.MultiHeadAttention(16, 4, n_kv_heads=2)
    x = torch.randn(2, 5, 16, requires_grad=True)
    out = layer(x, mask=M.padding([3, 0]))
    assert torch.allclose(out[1], layer.o_proj.bias.expand(5, 16))
    out.pow(2).sum().backward()
    assert (x.grad[1] == 0).all() and torch.isfinite(x.grad).all() and (x.grad[0] != 0).any()
    out_w, w = layer(x, mask=M.padding([3, 0]), return_weights=True)
    assert (w[1] == 0).all() and torch.allclose(w[0].sum(-1), torch.ones(()))


# -----------------------------------------------------------------------------
# One allowed key; L = 1; D = 1; Dv != D


@pytest.mark.parametrize("backend", EXACT)
def test_single_allowed_key(backend):
    """Each row may attend exactly one key: the output is that key's value (weight exactly 1),
    dq and dk are 0 (softmax over one key has no slope) and dv sums the rows' output gradients."""
    Lq, Lk = 6, 5
    pick = torch.tensor([3, 0, 4, 4, 1, 2])                              # the key of each row
    mask = torch.zeros(1, 1, Lq, Lk, dtype=torch.bool)
    mask[0, 0, torch.arange(Lq), pick] = True
    q, k, v = rand_qkv(1, 2, 1, Lq, Lk, 4, 3, seed=7)
    out = attend(backend, q, k, v, mask=mask)
    assert torch.allclose(out, v[:, :, pick].expand_as(out), rtol=0, atol=2 * EPS[torch.float32])
    if backend == "reference":
        return
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(8))
    _, dq, dk, dv = grads(backend, q, k, v, dout, mask=mask)
    scale = float(dout.abs().max() * v.abs().max() * k.abs().max())
    assert dq.abs().max() <= 8 * EPS[torch.float32] * scale and dk.abs().max() <= 8 * EPS[torch.float32] * scale
    want = torch.zeros_like(v).index_add_(2, pick, dout.sum(1, keepdim=True))
    assert torch.allclose(dv, want, atol=1e-5)


@pytest.mark.parametrize("backend", APPROX)
def test_single_key_approximate(backend):
    """Causal, first row: one key, so kernelised attention returns exactly that value too."""
    q, k, v = rand_qkv(1, 1, 1, 4, 4, 8, seed=9)
    out = attend(backend, q, k, v, causal=True)
    assert torch.allclose(out[:, :, 0], v[:, :, 0], atol=1e-5)


SHAPES = {  # (B, Hq, Hkv, Lq, Lk, D, Dv)
    "L1-D1": (1, 1, 1, 1, 1, 1, 1),
    "L1-D1-Dv3-gqa": (2, 2, 1, 1, 5, 1, 3),
    "Lk1-Dv7": (1, 2, 2, 3, 1, 4, 7),
    "D1-Dv2-L17": (1, 2, 1, 17, 17, 1, 2),
    "Dv1-D9": (1, 1, 1, 4, 6, 9, 1),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", EXACT)
def test_tiny_shapes(backend, shape):
    B, Hq, Hkv, Lq, Lk, D, Dv = SHAPES[shape]
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, D, Dv, seed=10)
    for kw in ({}, {"causal": True}):
        out = attend(backend, q, k, v, **kw)
        assert out.shape == (B, Hq, Lq, Dv)
        assert_error_ratio(out, attend("math", q, k, v, **kw), oracle(q, k, v, **kw), what=f"{backend} {kw}")
        if backend == "reference":
            continue
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(11))
        for name, c, b, r in zip(("dq", "dk", "dv"), grads(backend, q, k, v, dout, **kw)[1:],
                                 grads("math", q, k, v, dout, **kw)[1:], grads64(q, k, v, dout, **kw)[1:]):
            assert_error_ratio(c, b, r, ratio=3.0, what=f"{backend} {kw} {name}")


# -----------------------------------------------------------------------------
# Empty batches, heads, queries, keys, value dims; D = 0

EMPTY = {  # (B, Hq, Hkv, Lq, Lk, D, Dv)
    "B=0": (0, 2, 2, 3, 4, 5, 5),
    "H=0": (1, 0, 0, 3, 4, 5, 5),
    "Lq=0": (1, 2, 1, 0, 4, 5, 5),
    "Lk=0": (1, 2, 2, 3, 0, 5, 6),
    "Dv=0": (1, 2, 2, 3, 4, 5, 0),
}


@pytest.mark.parametrize("shape", EMPTY)
@pytest.mark.parametrize("backend", ("auto",) + EXACT + APPROX)
def test_empty_inputs(backend, shape):
    """Empty output of the right shape (zeros when Lk = 0), gradients of the inputs' shapes (zeros)."""
    B, Hq, Hkv, Lq, Lk, D, Dv = EMPTY[shape]
    grad = backend != "reference"
    q, k, v = (t.requires_grad_(grad) for t in rand_qkv(B, Hq, Hkv, Lq, Lk, D, Dv, seed=12))
    masked = () if backend in APPROX or B == 0 else ({"mask": M.padding([2] * B)},)
    for kw in ({}, {"causal": True}, *masked):
        out = attend(backend, q, k, v, **kw)
        assert out.shape == (B, Hq, Lq, Dv) and out.dtype == q.dtype
        assert (out == 0).all()                                          # Lk = 0: no key, zeros
        if grad:
            out.sum().backward()
            for t in (q, k, v):
                assert t.grad.shape == t.shape and (t.grad == 0).all()
                t.grad = None
    if backend in ("math", "tiled", "tiled-generic", "reference", "auto"):
        out, lse, w = attend(backend, q, k, v, return_lse=True, return_weights=True)
        assert lse.shape == (B, Hq, Lq) and torch.isneginf(lse).all() and lse.dtype == torch.float32
        assert w.shape == (B, Hq, Lq, Lk) and (w == 0).all()
    w_rows = qkv.attention_weights(q.detach(), k.detach(), causal=True)   # (values are k: Dv = D)
    assert w_rows.shape == (B, Hq, Lq, Lk) and (Dv == 0 or (w_rows == 0).all())


@pytest.mark.parametrize("backend", EXACT)
def test_head_dim_zero_averages_the_allowed_values(backend):
    """D = 0: every score is the empty dot product 0, so each row averages its allowed values."""
    q, k, v = (t.requires_grad_(backend != "reference") for t in rand_qkv(1, 2, 1, 4, 5, 0, 3, seed=13))
    out = attend(backend, q, k, v, causal=True)
    counts = torch.arange(2, 6, dtype=torch.float32)[:, None]           # row i sees keys 0..i+1
    want = v.detach().cumsum(2)[:, :, 1:] / counts
    assert torch.allclose(out, want.expand_as(out), atol=1e-6)
    if backend != "reference":
        out.sum().backward()
        assert q.grad.shape == q.shape and k.grad.shape == k.shape and torch.isfinite(v.grad).all()


@pytest.mark.parametrize("backend", APPROX)
def test_head_dim_zero_is_refused_by_approximate_backends(backend):
    q, k, v = rand_qkv(1, 1, 1, 3, 3, 0, 2)
    with pytest.raises(BackendError, match="head dim of 0.*exact backend"):
        attend(backend, q, k, v)


def test_regression_head_dim_zero_gave_zeros():
    """A D = 0 call was treated as empty and returned zeros instead of the mean of the values."""
    q, k, v = rand_qkv(1, 1, 1, 2, 3, 0, 4, seed=14)
    assert torch.allclose(qkv.attention(q, k, v), v.mean(2, keepdim=True).expand(1, 1, 2, 4), atol=1e-6)


def test_regression_named_backend_unchecked_on_empty_inputs():
    """Empty calls skipped backend selection: sdpa "returned" an LSE and unknown names passed."""
    q, k, v = rand_qkv(1, 2, 2, 3, 0, 4)
    with pytest.raises(BackendError, match="sdpa.*log-sum-exp"):
        qkv.attention(q, k, v, backend="sdpa", return_lse=True)
    with pytest.raises(ValueError, match="unknown backend 'flash'"):
        qkv.attention(q, k, v, backend="flash")
    with pytest.raises(BackendError, match="reference.*backward"):
        qkv.attention(q.requires_grad_(), k, v, backend="reference")


def test_regression_attention_weights_zero_heads_zero_division():
    """attention_weights with Hq = Hkv = 0 divided by Hkv (ZeroDivisionError) instead of returning (B, 0, Lq, Lk)."""
    q = torch.randn(1, 0, 3, 4)
    assert qkv.attention_weights(q, q).shape == (1, 0, 3, 3)


# -----------------------------------------------------------------------------
# NaN and Inf in the inputs


def _with(t, idx, value):
    t = t.clone()
    t[idx] = value
    return t


LONG = 300  # > one 256-row tile: tiled has empty, partial and full tiles; sdpa's kernel several blocks


@pytest.mark.parametrize("backend, value", [(b, x) for b in EXACT for x in (NAN, INF, -INF)] +
                         [(b, NAN) for b in APPROX], ids=str)
def test_non_finite_query_row_is_nan_and_only_that_row(backend, value):
    """Also for +-Inf, whose scores may all be -inf (a row that would look fully masked).
    (Approximate backends: NaN only; elu(-inf) + 1 = 0 is a feature like any other.)"""
    q, k, v = rand_qkv(1, 4, 2, 5, 6, 8, seed=15)
    q = _with(q, (0, 1, 3, 2), value)                                   # query head 1, row 3
    for kw in ({}, {"causal": True}):
        out = attend(backend, q, k, v, **kw)
        bad = torch.zeros(out.shape[:-1], dtype=torch.bool)
        bad[0, 1, 3] = True
        assert torch.isnan(out[bad]).all() and torch.isfinite(out[~bad]).all(), kw


def test_nan_query_of_a_row_with_no_key_gives_zeros():
    q, k, v = rand_qkv(1, 1, 1, 3, 3, 4, seed=16)
    q = _with(q, (0, 0, 0, 1), NAN)
    mask = _rows_mask(3, 3, [0])
    for backend in EXACT:
        out = attend(backend, q, k, v, mask=mask)
        assert (out[0, 0, 0] == 0).all() and torch.isfinite(out).all(), backend


@pytest.mark.parametrize("backend", EXACT)
@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_non_finite_key_or_value_reaches_exactly_the_rows_that_may_attend_it(backend, where, kind):
    """Causal over LONG positions, the bad entry at key j: rows >= j are affected, rows < j equal
    the oracle of the same call with the entry set to 0 (they cannot see it)."""
    j, col = 200, 1
    q, k, v = rand_qkv(1, 2, 1, LONG, LONG, 4, 3, seed=17)
    value = NAN if kind == "nan" else INF
    bad_k = _with(k, (0, 0, j, col), value) if where == "k" else k
    bad_v = _with(v, (0, 0, j, col), value) if where == "v" else v
    out = attend(backend, q, bad_k, bad_v, causal=True)
    clean = oracle(q, k, v, causal=True)
    assert max_err(out[:, :, :j], clean[:, :, :j]) <= 1e-5                # untouched rows: exact and finite
    after = out[:, :, j:]
    if where == "v":                                                     # only column `col` of later rows
        assert (torch.isnan(after[..., col]) if kind == "nan" else torch.isposinf(after[..., col])).all()
        others = [c for c in range(3) if c != col]
        assert max_err(after[..., others], clean[:, :, j:][..., others]) <= 1e-5
    elif kind == "nan":
        assert torch.isnan(after).all()
    else:  # +inf in k: each later row's score is +inf (row NaN) or -inf (key ignored), by q's sign
        pos = q[0, :, j:, col] > 0                                       # (Hq, rows)
        assert torch.isnan(after[0][pos]).all()
        assert torch.isfinite(after[0][~pos]).all()
        ignored = oracle(q, k, v, mask=M.causal() & (lambda b, h, i, kv: kv != j))[0, :, j:]
        assert max_err(after[0][~pos], ignored[~pos]) <= 1e-5


@pytest.mark.parametrize("backend", EXACT)
def test_masked_garbage_never_reaches_any_row(backend):
    """NaN and Inf in k and v at keys a mask rules out (padding, a custom mask) change nothing."""
    q, k, v = rand_qkv(2, 2, 2, 7, 9, 4, seed=18)
    lengths = [6, 3]
    bad_k, bad_v = k.clone(), v.clone()
    bad_k[0, :, 6:], bad_v[0, :, 6:] = NAN, INF
    bad_k[1, :, 3:, 0], bad_v[1, :, 3:, 1] = -INF, NAN
    for mask in (M.padding(lengths), M.padding(lengths) & M.causal(),
                 M.from_dense(torch.arange(9)[None, None, None, :] < torch.tensor(lengths)[:, None, None, None])):
        out = attend(backend, q, bad_k, bad_v, mask=mask)
        assert max_err(out, oracle(q, k, v, mask=mask)) <= 1e-5


@pytest.mark.parametrize("backend", GRAD)
def test_masked_garbage_gives_exact_finite_gradients(backend):
    """Padding holding NaN: outputs and gradients equal those of clean padding; dk, dv there are 0."""
    q, k, v = rand_qkv(2, 2, 1, 5, 8, 4, seed=19)
    mask = M.padding([8, 5]) & M.causal()
    bad_k, bad_v = _with(k, (1, slice(None), slice(5, None)), NAN), _with(v, (1, slice(None), slice(5, None)), NAN)
    dout = torch.randn(2, 2, 5, 4, generator=torch.Generator().manual_seed(20))
    got = grads(backend, q, bad_k, bad_v, dout, mask=mask)
    want = grads64(q, k, v, dout, mask=mask)
    for name, c, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(c).all() and max_err(c, w) <= 1e-5, name
    assert (got[2][1, :, 5:] == 0).all() and (got[3][1, :, 5:] == 0).all()


@pytest.mark.parametrize("backend", ["math", "tiled", "tiled-generic", "reference"])
def test_non_finite_score_mod_outputs(backend):
    """score_mod: +inf at an allowed pair makes that row NaN; -inf acts as a mask; NaN at a masked pair
    changes nothing."""
    q, k, v = rand_qkv(1, 1, 1, 4, 4, 4, seed=21)
    out = attend(backend, q, k, v, causal=True, score_mod=lambda s, b, h, i, kv: s + _inf_at(s, i, kv, 2, 1, INF))
    assert torch.isnan(out[0, 0, 2]).all() and torch.isfinite(out[0, 0, [0, 1, 3]]).all()
    out = attend(backend, q, k, v, causal=True, score_mod=lambda s, b, h, i, kv: s + _inf_at(s, i, kv, 2, 1, -INF))
    masked = oracle(q, k, v, mask=M.causal() & (lambda b, h, i, kv: (i != 2) | (kv != 1)))
    assert max_err(out, masked) <= 1e-5
    out = attend(backend, q, k, v, causal=True, score_mod=lambda s, b, h, i, kv: s + _inf_at(s, i, kv, 0, 3, NAN))
    assert max_err(out, oracle(q, k, v, causal=True)) <= 1e-5           # (0, 3) is in the future: masked


def _inf_at(s, i, kv, row, key, value):
    """An additive term that is `value` at (row, key) and 0 elsewhere, for NumPy or torch scores."""
    hit = (i == row) & (kv == key)
    if isinstance(s, torch.Tensor):
        return torch.where(hit, torch.tensor(value, dtype=s.dtype), torch.zeros((), dtype=s.dtype))
    import numpy as np

    return np.where(hit, value, 0.0)


@pytest.mark.parametrize("backend", APPROX)
def test_approximate_backends_never_hide_non_finite_inputs(backend):
    q, k, v = rand_qkv(1, 2, 2, 6, 6, 8, seed=22)
    out = attend(backend, q, _with(k, (0, 0, 2, 1), NAN), v)
    assert torch.isnan(out[0, 0]).all() and torch.isfinite(out[0, 1]).all()   # every row of head 0 sees key 2
    out = attend(backend, q, k, _with(v, (0, 1, 2, 3), NAN))
    assert torch.isnan(out[0, 1, :, 3]).all() and torch.isfinite(out[0, 1, :, [0, 1, 2]]).all()
    out = attend(backend, q, k, _with(v, (0, 1, 2, 3), NAN), causal=True)
    assert torch.isnan(out[0, 1, 2:, 3]).all()                           # rows that may attend key 2


@pytest.mark.parametrize("engine", ["auto", "generic"])
def test_regression_tiled_fused_hid_nan_query(engine):
    """tiled's fused CPU engine returned a finite row for a query holding NaN."""
    q, k, v = rand_qkv(1, 1, 1, 4, 4, 8, seed=23)
    out = attend("tiled" if engine == "auto" else "tiled-generic", _with(q, (0, 0, 1, 0), NAN), k, v)
    assert torch.isnan(out[0, 0, 1]).all() and torch.isfinite(out[0, 0, [0, 2, 3]]).all()


def test_regression_sdpa_fp16_query_row_sum_overflow():
    """sdpa flagged NaN queries with q.sum(-1) * 0, which is NaN for a finite fp16 row summing past 65504."""
    q = torch.full((1, 1, 2, 64), 1100.0, dtype=torch.float16)
    _, k, v = rand_qkv(1, 1, 1, 2, 3, 64, dtype=torch.float16, seed=24)
    out = qkv.attention(q, k, v, backend="sdpa")
    assert torch.isfinite(out).all()
    assert max_err(out, oracle(q, k, v)) <= 2 * EPS[torch.float16] * float(v.abs().max())


@pytest.mark.parametrize("backend", ["sdpa", "tiled"])
def test_regression_masked_nan_key_leaked_through_additive_mask(backend):
    """sdpa's dense mask and tiled's fused engine add the mask as -inf: NaN - inf = NaN reached rows
    the mask kept away from the NaN key."""
    q, k, v = rand_qkv(1, 1, 1, 6, 6, 4, seed=25)
    k = _with(k, (0, 0, 4, 0), NAN)
    out = attend(backend, q, k, v, causal=True, q_offset=0)               # rows 0..3 cannot see key 4
    assert torch.isfinite(out[0, 0, :4]).all() and torch.isnan(out[0, 0, 4:]).all()
    out = attend(backend, q, k, v, mask=M.padding([4]))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", EXACT)
def test_regression_masked_nan_value_leaked(backend):
    """Every backend multiplied the masked weight 0 by a NaN value: 0 * NaN = NaN in every row."""
    q, k, v = rand_qkv(1, 1, 1, 5, 5, 4, seed=26)
    out = attend(backend, q, k, _with(v, (0, 0, 4, 2), NAN), mask=M.padding([4]))
    assert torch.isfinite(out).all()
    assert max_err(out, oracle(q, k, v, mask=M.padding([4]))) <= 1e-5


# -----------------------------------------------------------------------------
# Memory walls: refused up front, with the bytes needed


def huge(L, *, B=1, H=1, D=1):
    """A (B, H, L, D) view of a single element: no memory behind it."""
    return torch.zeros(1, 1, 1, 1).expand(B, H, L, D)


@pytest.fixture
def eight_gib_free(monkeypatch):
    """As if the machine had 8 GiB available, whatever it has: refusals do not depend on the runner."""
    monkeypatch.setattr(qkv._util.budget, "available_bytes", lambda device: 8 * 2**30)


def _needs(exc_info) -> int:
    """The byte count a refusal message states, `(... bytes)`."""
    import re

    m = re.search(r"\((\d+) bytes\)", str(exc_info.value))
    assert m, str(exc_info.value)
    return int(m.group(1))


@pytest.mark.parametrize("backend, kw, what", [
    ("math", dict(causal=True), "score matrix"),
    ("reference", dict(causal=True), "float64 score matrix"),
    ("sdpa", dict(mask=M.padding([2**21])), "dense mask"),
    ("sdpa", dict(mask=lambda b, h, i, kv: (i - kv) % 3 == 0), "dense mask"),
    ("tiled", dict(causal=True, return_weights=True), "weights you asked for"),
], ids=["math", "reference", "sdpa-padding", "sdpa-callable", "tiled-weights"])
def test_huge_calls_are_refused_with_the_bytes_needed(backend, kw, what, eight_gib_free):
    L = 2**22
    with pytest.raises(BackendError, match=f"{what} would need .*TiB") as e:
        qkv.attention(huge(L), huge(L), huge(L), backend=backend, **kw)
    assert _needs(e) >= L * L


def test_huge_weights_from_auto_name_every_reason(eight_gib_free):
    L = 2**22
    with pytest.raises(BackendError) as e:
        qkv.attention(huge(L), huge(L), huge(L), causal=True, return_weights=True)
    msg = str(e.value)
    assert "tiled: the weights you asked for would need" in msg and "math: its score matrix would need" in msg


def test_regression_auto_refusal_hid_reasons_and_suggested_reference(eight_gib_free):
    """auto said only "no backend can serve this call; use backend='reference'", and the reference
    backend then tried to allocate 528 TiB of float64 scores."""
    L = 2**22
    with pytest.raises(BackendError) as e:
        qkv.attention(huge(L), huge(L), huge(L), causal=True, return_weights=True)
    assert "use backend='reference'" not in str(e.value) and "would need" in str(e.value)


def test_regression_reference_backend_had_no_memory_refusal(eight_gib_free):
    L = 2**20
    with pytest.raises(BackendError, match="reference.*would need"):
        qkv.attention(huge(L), huge(L), huge(L), backend="reference")


def test_regression_tiled_plan_memory_unchecked(eight_gib_free):
    """tiled classified (L/256)^2 tiles at ~20 bytes each without asking: ~100 GB at L = 2^24 (here 2^26)."""
    L = 2**26
    with pytest.raises(BackendError, match="tiled.*tile plan would need") as e:
        qkv.attention(huge(L), huge(L), huge(L), backend="tiled", causal=True)
    assert _needs(e) >= (L // 256) ** 2


def test_regression_attention_weights_huge_allocated_before_refusing(eight_gib_free):
    """attention_weights(rows=None) on a long sequence asked the allocator for 64 TiB."""
    L = 2**22
    with pytest.raises(MemoryNeedError, match="weights of 4194304 rows would need .*fewer rows") as e:
        qkv.attention_weights(huge(L), huge(L), causal=True)
    assert isinstance(e.value, ValueError) and isinstance(e.value, MemoryError)
    assert _needs(e) == L * L * 4


def test_attention_weights_of_a_few_rows_of_a_long_sequence():
    L = 2**16
    q, k = huge(L), huge(L)
    w = qkv.attention_weights(q, k, causal=True, rows=[0, L - 1])
    assert w.shape == (1, 1, 2, L)
    assert w[0, 0, 0, 0] == 1 and torch.allclose(w[0, 0, 1], torch.full((L,), 1 / L))


@pytest.mark.parametrize("mask", [M.causal(), M.padding([2**21, 5]), M.sliding_window(64)],
                         ids=["causal", "padding", "sliding"])
def test_regression_to_dense_huge_allocated_before_refusing(mask, eight_gib_free):
    """Mask.to_dense(2^22, 2^22) asked the allocator for 16 TiB (a RuntimeError, or on a smaller
    overcommitted request an out-of-memory kill) instead of refusing."""
    L = 2**22
    with pytest.raises(MemoryNeedError, match="dense mask .* would need .*TiB") as e:
        mask.to_dense(L, L)
    assert _needs(e) >= L * L


def test_regression_block_mask_huge_unchecked(eight_gib_free):
    """Mask.block_mask classified (L / 128)^2 tiles with ~20 bytes of temporaries each without asking:
    at L = 2^22 that is 20 GiB (here L = 2^24, whose first allocation alone could never succeed)."""
    with pytest.raises(MemoryNeedError, match=f"classifying {2**34} tiles would need .*larger blocks"):
        M.sliding_window(16).block_mask(2**24, 2**24)
    assert M.sliding_window(16).block_mask(2**22, 2**22, block=2**16).shape == (1, 1, 64, 64)


def test_to_dense_refusal_uses_the_available_memory(monkeypatch):
    """At 2^14 x 2^14 (256 MiB) to_dense refuses exactly when less than that is available."""
    L = 2**14
    monkeypatch.setattr(qkv._util.budget, "available_bytes", lambda device: 2**20)
    with pytest.raises(MemoryNeedError, match=r"\(268435456 bytes\) and only 1.0 MiB"):
        M.causal().to_dense(L, L)
    monkeypatch.setattr(qkv._util.budget, "available_bytes", lambda device: 2**30)
    assert M.causal().to_dense(2**13, 2**13).shape == (1, 1, 2**13, 2**13)   # 64 MiB: never refused


def test_layer_with_huge_padding_and_weights_is_refused(eight_gib_free):
    L = 2**20
    layer = qkv.layers.MultiHeadAttention(4, 1)
    x = torch.zeros(1, 1, 4).expand(1, L, 4)
    with pytest.raises(BackendError, match="would need"):
        with torch.no_grad():
            layer(x, mask=M.padding([L // 2]), return_weights=True)


def test_meta_tensors_never_allocate():
    """On the meta device nothing is allocated and nothing is refused: shapes only."""
    L = 2**22
    q = torch.empty(1, 2, L, 1, device="meta")
    out = qkv.attention(q, q, q, backend="math")
    assert out.shape == (1, 2, L, 1) and out.device.type == "meta"
