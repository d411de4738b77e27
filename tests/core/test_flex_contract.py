"""FlexAttention's contract: a plain mask_mod or score_mod is evaluated as if once per element.

Legend: B batch, Hq query heads, Hkv key/value heads, L length, D head dim, E a captured vector's length.

Each mod below is written the way FlexAttention users write them (one index at a time, reductions
over captured vectors, per-head and per-batch tensors, learnable biases, document ids). Each is
compared with torch's own `flex_attention` (eager, on the CPU) and with a float64 evaluation of its
definition written densely in torch (independent of qkv), forward on every backend that takes mods:
in float32 by DESIGN.md's error-ratio rule with FlexAttention's float32 output as the baseline, in
float64 to 1e-12 (FlexAttention and the definition agree to rounding there). Backward (FlexAttention
has none on the CPU) is checked against the dense definition, its float32 autograd the baseline.
Then the interop both ways (a Flex BlockMask as `mask=`, `Mask.to_flex`), the errors a mod that
cannot run per element gets, and the built-ins' broadcast fast path.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch

import qkv
from qkv import masks as M
from qkv import reference as R
from qkv import scores as S
from qkv.backends import registry

from conftest import assert_error_ratio, max_err, rand_qkv

fa = pytest.importorskip("torch.nn.attention.flex_attention")

B, Hq, Hkv, L, D, E = 2, 4, 2, 37, 16, 8
F64, F32 = torch.float64, torch.float32


def flex(q, k, v, **kw):
    """torch's FlexAttention, eager (it warns that it is not compiled)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fa.flex_attention(q.detach(), k.detach(), v.detach(), enable_gqa=True, **kw)


@contextlib.contextmanager
def _tiled_attribute(name, value):
    """`tiled` with one attribute set for the block, and its own value (or the class's) after."""
    be = registry.get("tiled")
    saved = be.__dict__.get(name)
    setattr(be, name, value)
    try:
        yield
    finally:
        if saved is None:
            delattr(be, name)
        else:
            setattr(be, name, saved)


def small_tiles(block=(16, 8)):
    """`tiled` with tiles smaller than the call, so mods are evaluated tile by tile."""
    return _tiled_attribute("block", block)


def _engine(engine):
    """`tiled` with this engine ("auto": torch's fused kernel per tile run where it applies; "generic")."""
    return _tiled_attribute("engine", engine)


def backends(kind: str):
    """Backends that take `kind` ("score_mod" or "masks"), by their capabilities (`segments` serves
    packed-document masks only: test_segments; `triton` qkv's built-in score mods only, on CUDA or in
    Triton's interpreter: tests/backends/test_triton.py)."""
    return [n for n in registry.names() if getattr(registry.get(n).capabilities, kind)
            and n not in ("segments", "triton")]


# ----------------------------------------------------------------------------
# The mods, each with its dense definition
# ----------------------------------------------------------------------------

LEARNABLE = ("bias", "qr", "head", "temp", "rel")


def _captured(dtype, grad: bool):
    """Captured tensors, drawn in float64 then cast, the learnable ones requiring grad."""
    g = torch.Generator().manual_seed(7)
    t = {
        "bias": torch.randn(B, L, generator=g, dtype=F64),                 # per batch and key
        "qr": torch.randn(B, Hq, L, E, generator=g, dtype=F64) * 0.5,       # per query vectors
        "kr": torch.randn(B, 1, L, E, generator=g, dtype=F64) * 0.5,        # per key vectors
        "head": torch.randn(Hq, generator=g, dtype=F64),                    # per head
        "temp": torch.rand(B, generator=g, dtype=F64) + 0.5,                # per batch
        "rel": torch.randn(Hq, 2 * L - 1, generator=g, dtype=F64),          # learnable relative bias
    }
    t = {name: x.to(dtype) for name, x in t.items()}
    for name in LEARNABLE:
        t[name].requires_grad_(grad)
    return t


def _grids():
    b, h = torch.arange(B).view(B, 1, 1, 1), torch.arange(Hq).view(1, Hq, 1, 1)
    q, kv = torch.arange(L).view(1, 1, L, 1), torch.arange(L).view(1, 1, 1, L)
    return b, h, q, kv


def score_cases(t):
    """name -> (score_mod as a Flex user writes it, its dense definition on (B, Hq, L, L) scores)."""
    bias, qr, kr, head, temp, rel = (t[n] for n in ("bias", "qr", "kr", "head", "temp", "rel"))
    _, h, q, kv = _grids()
    return {
        "two_step_index": (lambda s, b, h, q_idx, kv_idx: s + bias[b][kv_idx],
                           lambda s: s + bias[:, None, None, :]),
        "sum_over_captured_vectors": (lambda s, b, h, q_idx, kv_idx: s + (qr[b, h, q_idx] * kr[b, 0, kv_idx]).sum(),
                                      lambda s: s + qr @ kr.transpose(-1, -2)),
        "torch_dot": (lambda s, b, h, q_idx, kv_idx: s + torch.dot(qr[b, h, q_idx], kr[b, 0, kv_idx]),
                      lambda s: s + qr @ kr.transpose(-1, -2)),
        "per_head_and_batch": (lambda s, b, h, q_idx, kv_idx: s * temp[b] + head[h] * kv_idx / L,
                               lambda s: s * temp.view(B, 1, 1, 1) + head.view(1, Hq, 1, 1) * kv / L),
        "learnable_relative_bias": (lambda s, b, h, q_idx, kv_idx: s + rel[h][kv_idx - q_idx + L - 1],
                                    lambda s: s + rel[h, kv - q + L - 1]),
        "where_softcap": (lambda s, b, h, q_idx, kv_idx: torch.where(kv_idx <= q_idx, 5 * torch.tanh(s / 5), s - 1),
                          lambda s: torch.where(kv <= q, 5 * torch.tanh(s / 5), s - 1)),
    }


def mask_cases():
    """name -> (mask_mod as a Flex user writes it, its dense definition (B or 1, Hq or 1, L, L))."""
    g = torch.Generator().manual_seed(3)
    doc = torch.randint(0, 4, (B, L), generator=g).sort(dim=-1).values      # packed documents per batch row
    win = torch.tensor([1, 3, 8, 40])                                       # a window per head
    table = torch.rand(B, L, L, generator=g) < 0.6
    table |= torch.eye(L, dtype=torch.bool)                                 # every row keeps one key
    _, _, q, kv = _grids()
    return {
        "document_ids": (lambda b, h, q_idx, kv_idx: doc[b][q_idx] == doc[b][kv_idx],
                         doc[:, None, :, None] == doc[:, None, None, :]),
        "document_causal": (lambda b, h, q_idx, kv_idx: (doc[b, q_idx] == doc[b, kv_idx]) & (kv_idx <= q_idx),
                            (doc[:, None, :, None] == doc[:, None, None, :]) & (kv <= q)),
        "per_head_window": (lambda b, h, q_idx, kv_idx: (q_idx - kv_idx >= 0) & (q_idx - kv_idx < win[h]),
                            (q - kv >= 0) & (q - kv < win.view(1, Hq, 1, 1))),
        "three_step_table": (lambda b, h, q_idx, kv_idx: table[b][q_idx][kv_idx], table[:, None]),
    }


def dense_attention(q, k, v, score=None, allowed=None):
    """softmax(allowed(score(q k^T / sqrt(D)))) v, written out (GQA by repeating k, v)."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    s = q @ k.transpose(-1, -2) / D ** 0.5                                 # (B, Hq, L, L)
    if score is not None:
        s = score(s)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


# ----------------------------------------------------------------------------
# Forward: FlexAttention's numbers on every backend, float32 and float64
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(score_cases(_captured(F64, False))))
def test_score_mods_give_flexattentions_numbers(name):
    c64, c32 = _captured(F64, False), _captured(F32, False)
    (mod64, def64), (mod32, _) = score_cases(c64)[name], score_cases(c32)[name]
    q, k, v = rand_qkv(B, Hq, Hkv, L, L, D, dtype=F64)
    oracle = dense_attention(q, k, v, score=def64)
    flex64 = flex(q, k, v, score_mod=mod64)
    assert max_err(flex64, oracle) < 1e-12, "the dense definition is not what FlexAttention computes"
    assert max_err(flex64, flex(q, k, v)) > 1e-3, "the mod changed nothing"
    q32, k32, v32 = (t.float() for t in (q, k, v))
    flex32 = flex(q32, k32, v32, score_mod=mod32)
    with small_tiles():
        for be in backends("score_mod"):
            assert max_err(qkv.attention(q, k, v, score_mod=mod64, backend=be), oracle) < 1e-12, f"{name} {be}"
            out32 = qkv.attention(q32, k32, v32, score_mod=mod32, backend=be)
            assert_error_ratio(out32, flex32, oracle, what=f"{name} {be} float32")
    # the float64 oracle takes the plain function too (evaluated per element in torch)
    assert max_err(torch.from_numpy(R.attention(q, k, v, score_mod=mod64)), oracle) < 1e-12


@pytest.mark.parametrize("name", list(mask_cases()))
def test_mask_mods_give_flexattentions_numbers(name):
    fn, dense = mask_cases()[name]
    causal = torch.ones(L, L, dtype=torch.bool).tril()

    def with_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & fn(b, h, q_idx, kv_idx)

    bm = fa.create_block_mask(fn, B, Hq, L, L, device="cpu", BLOCK_SIZE=16)
    forms = [("function", fn, dense, bm), ("Flex BlockMask", bm, dense, bm),
             ("causal() & function", M.causal() & fn, dense & causal,
              fa.create_block_mask(with_causal, B, Hq, L, L, device="cpu", BLOCK_SIZE=16))]
    q, k, v = rand_qkv(B, Hq, Hkv, L, L, D, dtype=F64, seed=1)
    q32, k32, v32 = (t.float() for t in (q, k, v))
    for label, mask, allowed, flex_bm in forms:
        oracle = dense_attention(q, k, v, allowed=allowed)
        flex64, flex32 = flex(q, k, v, block_mask=flex_bm), flex(q32, k32, v32, block_mask=flex_bm)
        assert max_err(flex64, oracle) < 1e-12, "the dense definition is not what FlexAttention computes"
        for engine in ("auto", "generic"):
            with small_tiles(), _engine(engine):
                for be in backends("masks"):
                    what = f"{name} as {label} on {be} ({engine})"
                    assert max_err(qkv.attention(q, k, v, mask=mask, backend=be), oracle) < 1e-12, what
                    ratio = 10 if be == "tiled" else 2       # DESIGN.md: float32 tiled runs torch's fused kernel
                    assert_error_ratio(qkv.attention(q32, k32, v32, mask=mask, backend=be), flex32, oracle,
                                       ratio=ratio, what=what + " float32")
    allowed = R.mask_array(fn, B, Hq, L, L)                  # the NumPy oracle evaluates it per element too
    assert np.array_equal(allowed, np.broadcast_to(dense.numpy(), allowed.shape))


# ----------------------------------------------------------------------------
# Backward: captured tensors that require grad get their gradients
# ----------------------------------------------------------------------------

def _grads(fn, q, k, v, learn, dout):
    """(out, grads of q, k, v and of the learnable tensors; None where one is not used)."""
    out = fn(q, k, v)
    wrt = [q, k, v, *learn]
    return [out, *torch.autograd.grad((out * dout).sum(), wrt, allow_unused=True)]


@pytest.mark.parametrize("name", list(score_cases(_captured(F64, False))))
def test_score_mod_gradients_reach_captured_tensors(name):
    c64, c32 = _captured(F64, True), _captured(F32, True)
    (_, def64), (mod32, def32) = score_cases(c64)[name], score_cases(c32)[name]
    learn64, learn32 = ([c[n] for n in LEARNABLE] for c in (c64, c32))
    q, k, v = rand_qkv(B, Hq, Hkv, L, L, D, dtype=F64, seed=2, requires_grad=True)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    dout = torch.randn(B, Hq, L, D, generator=torch.Generator().manual_seed(5), dtype=F64)
    oracle = _grads(lambda *a: dense_attention(*a, score=def64), q, k, v, learn64, dout)
    base = _grads(lambda *a: dense_attention(*a, score=def32), q32, k32, v32, learn32, dout.float())
    names = ["out", "dq", "dk", "dv"] + [f"d{n}" for n in LEARNABLE]
    used = [i for i, g in enumerate(oracle) if g is not None]
    assert len(used) > 4 or name == "where_softcap", "no learnable tensor in this case"
    with small_tiles():
        for be in (n for n in backends("score_mod") if registry.get(n).capabilities.backward):
            got = _grads(lambda *a, be=be: qkv.attention(*a, score_mod=mod32, backend=be), q32, k32, v32, learn32,
                         dout.float())
            for i in used:
                assert got[i] is not None, f"{name} {be}: no gradient for {names[i]}"
                assert_error_ratio(got[i], base[i], oracle[i], ratio=2 if i == 0 else 3,
                                   what=f"{name} {be} {names[i]}")


@pytest.mark.parametrize("name", ["document_causal", "per_head_window"])
def test_mask_mod_gradients(name):
    fn, dense = mask_cases()[name]
    q, k, v = rand_qkv(B, Hq, Hkv, L, L, D, dtype=F64, seed=4, requires_grad=True)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    dout = torch.randn(B, Hq, L, D, generator=torch.Generator().manual_seed(6), dtype=F64)
    oracle = _grads(lambda *a: dense_attention(*a, allowed=dense), q, k, v, [], dout)
    base = _grads(lambda *a: dense_attention(*a, allowed=dense), q32, k32, v32, [], dout.float())
    for engine in ("auto", "generic"):
        with small_tiles(), _engine(engine):
            for be in (n for n in backends("masks") if registry.get(n).capabilities.backward):
                got = _grads(lambda *a, be=be: qkv.attention(*a, mask=fn, backend=be), q32, k32, v32, [], dout.float())
                for i, what in enumerate(["out", "dq", "dk", "dv"]):
                    ratio = 10 if be == "tiled" else (2 if i == 0 else 3)
                    assert_error_ratio(got[i], base[i], oracle[i], ratio=ratio, what=f"{name} {be} {engine} {what}")


GLOBAL_MODULE = torch.nn.Module()                  # a module a score_mod names from its globals
GLOBAL_MODULE.rel = torch.nn.Parameter(torch.randn(Hq, 2 * L - 1, dtype=F64))
HIDDEN = {"rel": torch.nn.Parameter(torch.randn(Hq, 2 * L - 1, dtype=F64))}   # a dict in the globals


def global_module_mod(s, b, h, q_idx, kv_idx):
    return s + GLOBAL_MODULE.rel[h][kv_idx - q_idx + L - 1]


def hidden_mod(s, b, h, q_idx, kv_idx):
    return s + HIDDEN["rel"][h][kv_idx - q_idx + L - 1]


def test_tiled_finds_the_tensors_a_mod_reads_or_refuses():
    q, k, v = rand_qkv(B, Hq, Hkv, L, L, D, dtype=F64, seed=8, requires_grad=True)
    for mod, table in ((global_module_mod, GLOBAL_MODULE.rel), (hidden_mod, HIDDEN["rel"])):
        want = torch.autograd.grad(qkv.attention(q, k, v, score_mod=mod, backend="math").sum(), [q, table])
        if mod is hidden_mod:                       # out of tiled's sight: refused, never a missing gradient
            with pytest.raises(ValueError, match=r"cannot find tensors requiring grad .*\(4, 73\)"):
                qkv.attention(q, k, v, score_mod=mod, backend="tiled")
            with torch.no_grad():                   # no gradients wanted: tiled serves it
                assert max_err(qkv.attention(q, k, v, score_mod=mod, backend="tiled"),
                               qkv.attention(q, k, v, score_mod=mod, backend="math")) < 1e-12
        for be in (["tiled", "auto"] if mod is global_module_mod else ["auto"]):
            with small_tiles():
                got = torch.autograd.grad(qkv.attention(q, k, v, score_mod=mod, backend=be).sum(), [q, table])
            assert all(max_err(a, b) < 1e-12 for a, b in zip(got, want)), f"{mod.__name__} {be}"


# ----------------------------------------------------------------------------
# Lq != Lk: FlexAttention numbers query rows from 0, qkv positions from q_offset
# ----------------------------------------------------------------------------

def test_unequal_lengths_flex_rows_and_qkv_positions():
    Lq = 9
    c = _captured(F64, False)
    rel = c["rel"]
    mod = lambda s, b, h, q_idx, kv_idx: s + rel[h][kv_idx - q_idx + L - 1]   # noqa: E731
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, L, D, dtype=F64, seed=9)
    bm = fa.create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + 20, B, None, Lq, L, device="cpu",
                              BLOCK_SIZE=8)
    want_mask = flex(q, k, v, block_mask=bm)
    for be in backends("masks"):
        # a BlockMask's rows are the call's query rows, wherever q_offset puts them
        for q_offset in (None, 0, 3):
            assert max_err(qkv.attention(q, k, v, mask=bm, q_offset=q_offset, backend=be), want_mask) < 1e-12
    want = flex(q, k, v, block_mask=bm, score_mod=mod)
    for be in backends("score_mod"):     # a score_mod sees positions: q_offset=0 numbers them as Flex does
        assert max_err(qkv.attention(q, k, v, mask=bm, score_mod=mod, q_offset=0, backend=be), want) < 1e-12
    # the causal qkv mask made for Flex: bottom-right, as qkv.attention puts the queries
    assert max_err(flex(q, k, v, block_mask=M.causal().to_flex(B, Hq, Lq, L, block=8)),
                   qkv.attention(q, k, v, causal=True)) < 1e-12
    m = M.as_mask(bm)                                # made outside a call: rows at Lk - Lq, qkv's default
    assert max_err(qkv.attention(q, k, v, mask=m), want_mask) < 1e-12
    with pytest.raises(ValueError, match="query rows sit at positions 28.. but the call puts its queries at q_offset=0"):
        qkv.attention(q, k, v, mask=m, q_offset=0)
    assert max_err(qkv.attention(q, k, v, mask=M.from_flex(bm, q_offset=0), q_offset=0), want_mask) < 1e-12
    with pytest.raises(ValueError, match=r"made for \(Lq, Lk\) = \(9, 37\) but the call has \(37, 37\)"):
        qkv.attention(*rand_qkv(B, Hq, Hkv, L, L, D), mask=bm)
    with pytest.raises(TypeError, match="from_flex needs"):
        M.from_flex(M.causal())


# ----------------------------------------------------------------------------
# qkv masks for FlexAttention: Mask.to_flex
# ----------------------------------------------------------------------------

def _to_flex_cases():
    g = torch.Generator().manual_seed(12)
    doc = torch.randint(0, 4, (B, L), generator=g).sort(dim=-1).values
    fn = lambda b, h, q_idx, kv_idx: (q_idx + kv_idx + h) % 3 != 1             # noqa: E731
    return {
        "causal": M.causal(), "sliding_window": M.sliding_window(5), "prefix_lm": M.prefix_lm(6),
        "document_causal": M.document(doc) & M.causal(), "padding": M.padding([20, 37]),
        "longformer": M.longformer(3, [0, 5]), "dilated": M.dilated(4, 2) | M.causal(),
        "block_sparse": M.block_sparse(torch.rand(Hq, 5, 5, generator=g) < 0.5, 8) | M.sliding_window(1),
        "from_dense": M.from_dense(torch.rand(L, L, generator=g) < 0.5) | M.causal(),
        "function": M.as_mask(fn) | M.causal(), "causal_and_function": M.causal() & fn,
    }


@pytest.mark.filterwarnings("ignore:There is a performance drop")   # vmap of torch.isin (global tokens)
@pytest.mark.parametrize("name", list(_to_flex_cases()))
def test_to_flex_gives_flexattention_qkvs_numbers(name):
    m = _to_flex_cases()[name]
    q, k, v = rand_qkv(B, Hq, Hkv, L, L, D, dtype=F64, seed=10)
    fb = m.to_flex(B, Hq, L, L, block=8)
    assert max_err(flex(q, k, v, block_mask=fb), qkv.attention(q, k, v, mask=m)) < 1e-12
    kind = m.block_mask(L, L, block=8, B=B, H=Hq).kind
    assert torch.equal(fb.to_dense().bool(), (kind != M.EMPTY).expand(fb.to_dense().shape))  # its block tables
    assert torch.equal(M.as_mask(fb).to_dense(L, L, B=B, H=Hq), m.to_dense(L, L, B=B, H=Hq))   # and back


def test_to_flex_evaluates_no_element_of_an_analytic_mask():
    class Analytic(M.Mask):                          # tiles known, elements never to be asked for
        analytic = True

        def tile_bounds(self, grid):
            return M.causal().tile_bounds(grid)

        def __call__(self, b, h, q, kv):
            raise AssertionError("evaluated")

    n = 1 << 16                                      # an L x L evaluation would take 4 G elements
    fb = Analytic().to_flex(None, None, n, n, block=128)
    assert fb.kv_num_blocks.shape == (1, 1, n // 128) and int(fb.full_kv_num_blocks[0, 0, -1]) == n // 128 - 1


# ----------------------------------------------------------------------------
# A mod that cannot run per element; the built-ins' broadcast path
# ----------------------------------------------------------------------------

def branchy(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx if q_idx > 3 else kv_idx == 0   # Python `if` on an index: FlexAttention rejects it too


def test_a_mod_that_cannot_run_per_element_says_which_and_why():
    q, k, v = rand_qkv(1, 2, 2, 6, 6, 4)
    for be in ("math", "tiled", "sdpa"):
        with pytest.raises(M.ModError, match=r"mask_mod branchy \(test_flex_contract.py:\d+\) failed when evaluated "
                                             r"per element.*Fix: a Python `if`"):
            qkv.attention(q, k, v, mask=branchy, backend=be)
    with pytest.raises(ValueError, match=r"score_mod .*<lambda> \(test_flex_contract.py:\d+\) .*Fix: `\.item\(\)`"):
        qkv.attention(q, k, v, score_mod=lambda s, b, h, q_idx, kv_idx: s + float(q_idx), backend="math")
    with pytest.raises(ValueError, match=r"mask_mod .*<lambda> .*Fix: use torch operations, not NumPy"):
        qkv.attention(q, k, v, mask=lambda b, h, q_idx, kv_idx: np.asarray(q_idx) >= 0, backend="math")


def test_builtins_keep_the_broadcast_path(monkeypatch):
    calls = []
    real_mask, real_score = M.evaluate_per_element, S.evaluate
    monkeypatch.setattr(M, "evaluate_per_element", lambda *a: calls.append(1) or real_mask(*a))
    monkeypatch.setattr(S, "evaluate", lambda *a: calls.append(1) or real_score(*a))
    q, k, v = rand_qkv(B, Hq, Hkv, L, L, D, requires_grad=True)
    table = torch.randn(8, Hq, requires_grad=True)
    builtin_masks = [M.causal() & M.sliding_window(7), M.document(torch.arange(L) // 10) | M.global_tokens([3]),
                     ~M.padding([5, 30]) | M.causal()]
    builtin_mods = [S.alibi(Hq), S.chain(S.softcap(5.0), S.relative_bias(table, max_distance=16))]
    with small_tiles():
        for be in ("math", "tiled", "sdpa"):
            for mask in builtin_masks:
                qkv.attention(q, k, v, mask=mask, backend=be).sum().backward()
        for be in ("math", "tiled"):
            for mod in builtin_mods:
                qkv.attention(q, k, v, mask=builtin_masks[0], score_mod=mod, backend=be).sum().backward()
    assert not calls
    qkv.attention(q, k, v, score_mod=lambda s, b, h, q_idx, kv_idx: s, backend="math")
    assert calls


def test_any_broadcastable_index_shapes_torch_or_numpy():
    w = torch.randn(Hq, requires_grad=True)
    mask = M.as_mask(lambda b, h, q_idx, kv_idx: (q_idx * 3 + kv_idx + h) % 4 != 1)
    mod = S.as_score_mod(lambda s, b, h, q_idx, kv_idx: s * w[h] + torch.dot(w, w) * kv_idx)
    q_idx, kv_idx, h = torch.arange(6)[:, None], torch.arange(7)[None, :], torch.arange(Hq).view(Hq, 1, 1)
    want = (q_idx * 3 + kv_idx + h) % 4 != 1                                 # (Hq, 6, 7): an unusual layout
    assert torch.equal(mask(torch.tensor(0), h, q_idx, kv_idx), want)
    got = mask(np.zeros((1, 1, 1, 1), dtype=np.int64), h.numpy()[None], q_idx.numpy()[None, None],
               kv_idx.numpy()[None, None])
    assert isinstance(got, np.ndarray) and np.array_equal(got, want.numpy()[None])
    s = torch.randn(1, Hq, 6, 7, dtype=F64)
    dense = s * w.detach().double().view(1, Hq, 1, 1) + float(w.detach() @ w.detach()) * kv_idx
    got = mod(s.numpy(), np.zeros((1, 1, 1, 1), dtype=np.int64), h.numpy()[None], q_idx.numpy()[None, None],
              kv_idx.numpy()[None, None])                                    # a tensor requiring grad inside
    assert isinstance(got, np.ndarray) and np.abs(got - dense.numpy()).max() < 1e-6
    assert repr(mask).startswith("mask_mod(test_any_broadcastable") and "test_flex_contract.py:" in repr(mask)
