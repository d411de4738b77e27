"""Parity of the `tiled` backend (both engines) with the reference and math backends.

Legend: B batch, Hq query heads, Hkv key/value heads, G = Hq // Hkv, Lq/Lk lengths, D head dim,
Dv value dim, (BQ, BK) tile size.

The rule is DESIGN.md's error ratio: the float64 oracle is `qkv.reference` for
outputs, LSE and weights and `math` in float64 for gradients; `math` in the
call's dtype is the baseline. Every test runs both engines of `tiled`:

- "auto": torch's fused CPU flash kernel per run of key tiles (CPU, no score_mod, D == Dv),
- "generic": plain torch ops (any device, score_mod with gradients, Dv != D),

and tile sizes that do not divide the lengths (drawn at random, seeded) as well as
the usual ones, so FULL, PARTIAL and EMPTY tiles, ragged last tiles and rows with
no allowed key all occur.
"""

from __future__ import annotations

import contextlib
import resource
import sys

import pytest
import torch

import qkv
from qkv import masks as M
from qkv import scores as S
from qkv.backends.tiled import make_plan
from qkv.masks import EMPTY
from conftest import assert_error_ratio, max_err, rand_qkv
from core.test_attention import COMBOS, DTYPES, HEADS, MASK_NAMES, check_forward, mask_cases, mask_combo

ENGINES = ["auto", "generic"]
BLOCKS = [(7, 5), (16, 32), (128, 128), (64, 16)]
GRID_D = [1, 8, 40, 59, 64, 80, 128, 256]
GRID_L = [1, 17, 97, 1025]
GRAD_MASKS = ["none", "causal", "document_causal", "padding", "longformer", "block_sparse",
              "callable_per_head", "dense"]


@contextlib.contextmanager
def tiled_as(engine: str, block: tuple[int, int]):
    """Run the `tiled` backend with this engine and tile size inside the block, then restore both."""
    be = qkv.backends.get("tiled")
    saved = {name: be.__dict__[name] for name in ("engine", "block") if name in be.__dict__}
    be.engine, be.block = engine, tuple(block)
    try:
        yield be
    finally:
        for name in ("engine", "block"):
            if name in saved:
                setattr(be, name, saved[name])
            else:
                be.__dict__.pop(name, None)  # back to the class default


def random_block(seed: int, high: int = 48) -> tuple[int, int]:
    """A seeded random tile size (BQ, BK) in [1, high]^2, usually not dividing the lengths."""
    g = torch.Generator().manual_seed(1000 + seed)
    bq, bk = torch.randint(1, high + 1, (2,), generator=g).tolist()
    return bq, bk


def make_call(q, k, v, **kw):
    """A validated Call as `qkv.attention` builds it (for backend selection and tile plans)."""
    args = dict(mask=None, causal=False, score_mod=None, scale=None, dropout_p=0.0, return_lse=False,
                return_weights=False, q_offset=None)
    args.update(kw)
    return qkv.backends.make_call(q, k, v, **args)


def grads_of(backend, q0, k0, v0, dout, dtype, extra=(), **kw):
    """(out, dq, dk, dv, *d(extra)) of `qkv.attention` in `dtype` from float64 inputs."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q0, k0, v0))
    out = qkv.attention(q, k, v, backend=backend, **kw)
    got = torch.autograd.grad(out, [q, k, v, *extra], dout.to(dtype), allow_unused=True)
    return (out.detach(), *got)


# -- outputs: the head-dim x length grid ---------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("D", GRID_D)
@pytest.mark.parametrize("L", GRID_L)
def test_grid_head_dims_and_lengths(D, L, engine):
    """Every head dim with every length; Lq != Lk, GQA/MQA, a mask and the tile size vary along the grid."""
    di, li = GRID_D.index(D), GRID_L.index(L)
    i = di + li
    Hq, Hkv = list(HEADS.values())[i % 3]
    Lq, Lk = (L, L) if i % 2 == 0 else (max(1, L // 2), L)  # bottom-right aligned when Lq < Lk
    B = 1 if L == 1025 else 2
    names = ["causal", "none", "document_causal", "sliding_window", "padding", "longformer"]
    name = names[i % len(names)]
    mask = mask_cases(B, Hq, Lq, Lk, seed=i)[name]
    # the fixed tile sizes cycle with the head dim; odd head dims get a random one
    block = BLOCKS[(di + 2 * li) % 4] if di % 2 == 0 else random_block(8 * li + di, high=160)
    dtypes = [torch.float32, torch.bfloat16] if L == 1025 else [torch.float64, torch.float32, torch.float16]
    with tiled_as(engine, block):
        for dtype in dtypes:
            q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=dtype, seed=i)
            check_forward(q, k, v, mask, backends=("tiled",),
                          what=f"D={D} L={L} {dtype} {name} block={block} {engine}")


# -- outputs: every mask x dtype x head layout ----------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mask_name", MASK_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masks_dtypes_heads(mask_name, dtype, engine):
    seed = 4 * MASK_NAMES.index(mask_name) + DTYPES.index(dtype)
    blocks = [random_block(seed), BLOCKS[seed % 4], random_block(seed + 100, high=16)]
    for (hname, (Hq, Hkv)), (Lq, Lk), block in zip(HEADS.items(), [(33, 33), (17, 40), (40, 40)], blocks):
        B = 2
        mask = mask_cases(B, Hq, Lq, Lk, seed=Lq)[mask_name]
        q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, 24, dtype=dtype, seed=Lk)
        with tiled_as(engine, block):
            check_forward(q, k, v, mask, backends=("tiled",),
                          what=f"{mask_name} {hname} Lq={Lq} Lk={Lk} block={block} {engine}")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("combo", COMBOS)
def test_mask_combinations(combo, engine):
    B, Hq, Hkv, Lq, Lk = 2, 4, 2, 30, 45
    mask = mask_combo(combo, B, Hq, Lq, Lk)
    for j, dtype in enumerate(DTYPES):
        block = random_block(50 + 4 * j + COMBOS.index(combo))
        q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, 16, dtype=dtype)
        with tiled_as(engine, block):
            check_forward(q, k, v, mask, backends=("tiled",), what=f"{combo} {dtype} block={block} {engine}")


# -- LSE and weights -----------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mask_name", MASK_NAMES)
def test_lse_and_weights_match_oracle(mask_name, engine):
    """return_lse / return_weights of tiled against the reference, math as baseline; -inf exactly on empty rows."""
    B, Hq, Hkv, Lq, Lk = 2, 4, 2, 21, 37
    mask = mask_cases(B, Hq, Lq, Lk, seed=5)[mask_name]
    for j, dtype in enumerate([torch.float64, torch.float32, torch.bfloat16]):
        block = [random_block(MASK_NAMES.index(mask_name) + 200 * j), (16, 32), (7, 5)][j]
        q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, 16, dtype=dtype, seed=j)
        kw = dict(mask=mask, return_lse=True, return_weights=True)
        _, ref_lse, ref_w = qkv.attention(q.double(), k.double(), v.double(), backend="reference", **kw)
        _, base_lse, base_w = qkv.attention(q, k, v, backend="math", **kw)
        with tiled_as(engine, block):
            out, lse, w = qkv.attention(q, k, v, backend="tiled", **kw)
        stat = torch.float64 if dtype == torch.float64 else torch.float32
        what = f"{mask_name} {dtype} block={block} {engine}"
        assert out.dtype == dtype and lse.dtype == stat and w.dtype == stat, what
        assert lse.shape == (B, Hq, Lq) and w.shape == (B, Hq, Lq, Lk), what
        empty = torch.isneginf(ref_lse)
        assert torch.equal(torch.isneginf(lse), empty), f"{what}: -inf LSE rows differ from the reference"
        assert torch.isfinite(lse[~empty]).all(), what
        assert_error_ratio(lse[~empty], base_lse[~empty], ref_lse[~empty], what=f"lse {what}")
        assert_error_ratio(w, base_w, ref_w, what=f"weights {what}")
        assert (w[empty] == 0).all(), what


# -- gradients -----------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mask_name", GRAD_MASKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_tiled_vs_math(mask_name, dtype, engine):
    seed = 4 * GRAD_MASKS.index(mask_name) + DTYPES.index(dtype)
    blocks = [random_block(seed + 300), BLOCKS[seed % 4], random_block(seed + 400, high=12)]
    for (hname, (Hq, Hkv)), block in zip(HEADS.items(), blocks):
        B, Lq, Lk, D = 2, 19, 27, 16
        mask = mask_cases(B, Hq, Lq, Lk, seed=3)[mask_name]
        q0, k0, v0 = rand_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=torch.float64, seed=Hkv)
        dout = torch.randn(B, Hq, Lq, D, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

        oracle = grads_of("math", q0, k0, v0, dout, torch.float64, mask=mask)[1:]
        grad_scale = max(float(t.abs().max()) for t in oracle)
        base = grads_of("math", q0, k0, v0, dout, dtype, mask=mask)[1:]
        with tiled_as(engine, block):
            cand = grads_of("tiled", q0, k0, v0, dout, dtype, mask=mask)[1:]
        for name, c, b, o in zip("qkv", cand, base, oracle):
            what = f"d{name} {mask_name} {hname} {dtype} block={block} {engine}"
            assert c.dtype == dtype and c.shape == o.shape, what
            if dtype == torch.float64:  # the oracle is math in float64 itself
                assert max_err(c, o) < 1e-12, what
                continue
            assert_error_ratio(c, b, o, ratio=3.0, what=what, scale=grad_scale)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gradients_summed_over_many_query_tiles(dtype, engine):
    """dk and dv are sums over every query tile that reads a key: with 40+ query tiles the
    accumulation must not round more than math's single matmul does."""
    B, Hq, Hkv, L, D = 1, 4, 2, 300, 16
    mask = M.causal() | M.global_tokens([0, 150])
    q0, k0, v0 = rand_qkv(B, Hq, Hkv, L, L, D, dtype=torch.float64, seed=8)
    dout = torch.randn(B, Hq, L, D, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    oracle = grads_of("math", q0, k0, v0, dout, torch.float64, mask=mask)
    grad_scale = max(float(t.abs().max()) for t in oracle[1:])
    base = grads_of("math", q0, k0, v0, dout, dtype, mask=mask)
    for block in [(7, 5), (16, 16)]:
        with tiled_as(engine, block):
            cand = grads_of("tiled", q0, k0, v0, dout, dtype, mask=mask)
        assert_error_ratio(cand[0], base[0], oracle[0], what=f"out {dtype} block={block} {engine}")
        for name, c, b, o in zip("qkv", cand[1:], base[1:], oracle[1:]):
            assert_error_ratio(c, b, o, ratio=3.0, what=f"d{name} {dtype} block={block} {engine}", scale=grad_scale)


# -- score_mod (the generic engine serves it, whatever the engine setting) ------------------

def _score_mods(Hq, B, Lq, Lk):
    """Each built-in score_mod (and a closure) with the tensors that should receive gradients."""
    g = torch.Generator().manual_seed(11)
    slopes = torch.rand(Hq, generator=g, dtype=torch.float64).requires_grad_()
    table = torch.randn(32, Hq, generator=g, dtype=torch.float64).requires_grad_()
    bias_t = torch.randn(B, 1, Lq, Lk, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(Hq, generator=g, dtype=torch.float64).requires_grad_()

    def closure(score, b, h, q_idx, kv_idx):  # captures `w`, a tensor requiring grad
        return score + w[h] * torch.cos((kv_idx - q_idx).to(score.dtype))

    return {
        "alibi": (S.alibi(slopes), [slopes]),
        "alibi_symmetric": (S.alibi(Hq, symmetric=True), []),
        "softcap": (S.softcap(2.5), []),
        "relative_bias": (S.relative_bias(table), [table]),
        "bias": (S.bias(bias_t), [bias_t]),
        "chain": (S.chain(S.softcap(4.0), S.relative_bias(table), S.bias(bias_t)), [table, bias_t]),
        "lambda": (lambda s, b, h, qi, kv: closure(s, b, h, qi, kv) * 0.5, [w]),
    }


SCORE_MODS = list(_score_mods(4, 2, 3, 5))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mod_name", SCORE_MODS)
def test_score_mods_outputs_and_gradients_equal_math(mod_name, engine):
    B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, 21, 29, 8
    masks = [None, M.causal(), M.sliding_window(6) | M.global_tokens([0]), M.padding([0, 17])]
    for j, mask in enumerate(masks):
        mod, tensors = _score_mods(Hq, B, Lq, Lk)[mod_name]
        block = [random_block(j + 500), (7, 5), (16, 32), (128, 128)][j]
        q0, k0, v0 = rand_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=torch.float64, seed=j)
        dout = torch.randn(B, Hq, Lq, D, generator=torch.Generator().manual_seed(j), dtype=torch.float64)
        kw = dict(mask=mask, score_mod=mod)
        expected = grads_of("math", q0, k0, v0, dout, torch.float64, extra=tensors, **kw)
        with tiled_as(engine, block):
            got = grads_of("tiled", q0, k0, v0, dout, torch.float64, extra=tensors, **kw)
        plain = qkv.attention(q0, k0, v0, mask=mask, backend="math")
        assert max_err(plain, expected[0]) > 1e-6, f"{mod_name}: the score_mod changed nothing"
        for name, a, b in zip(["out", "dq", "dk", "dv"] + [f"d{mod_name}[{i}]" for i in range(len(tensors))],
                              got, expected):
            what = f"{name} {mod_name} mask={mask!r} block={block} {engine}"
            assert a is not None and b is not None, f"{what}: no gradient"
            assert max_err(a, b) < 1e-12, what
        for t in got[4:]:
            assert (t != 0).any(), f"{mod_name}: zero gradient to the score_mod's tensor"


class _MethodScorer(torch.nn.Module):
    """A layer whose method is the score_mod: the pattern a model uses for a learned bias."""

    def __init__(self, H):
        super().__init__()
        self.slope = torch.nn.Parameter(torch.linspace(0.5, 1.0, H, dtype=torch.float64))

    def score(self, s, b, h, q_idx, kv_idx):
        return s + self.slope[h] * (kv_idx - q_idx).to(s.dtype) * 0.1


def _scaled_by(w, s, b, h, q_idx, kv_idx):
    return s * w[h]


@pytest.mark.parametrize("kind", ["bound_method", "partial"])
def test_score_mod_tensors_held_by_a_bound_method_or_partial_get_gradients(kind):
    import functools

    Hq = 4
    if kind == "bound_method":
        scorer = _MethodScorer(Hq)
        mod, held = scorer.score, scorer.slope
    else:
        held = torch.linspace(0.5, 2.0, Hq, dtype=torch.float64).requires_grad_()
        mod = functools.partial(_scaled_by, held)
    q0, k0, v0 = rand_qkv(1, Hq, 2, 9, 9, 8, dtype=torch.float64)
    dout = torch.randn(1, Hq, 9, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = grads_of("math", q0, k0, v0, dout, torch.float64, extra=[held], causal=True, score_mod=mod)
    assert expected[4] is not None and (expected[4] != 0).any()
    got = grads_of("tiled", q0, k0, v0, dout, torch.float64, extra=[held], causal=True, score_mod=mod)
    assert got[4] is not None, f"no gradient reaches the tensor a {kind} score_mod holds"
    assert max_err(got[4], expected[4]) < 1e-12


def test_score_mod_with_value_dim_and_return_weights():
    """score_mod with Dv != D and weights from tiled: equal math's in float64."""
    B, Hq, Hkv, Lq, Lk = 1, 4, 1, 13, 30
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, 8, Dv=3, dtype=torch.float64)
    kw = dict(mask=M.causal() & M.sliding_window(9), score_mod=S.chain(S.alibi(Hq), S.softcap(3.0)),
              return_lse=True, return_weights=True)
    expected = qkv.attention(q, k, v, backend="math", **kw)
    for engine in ENGINES:
        with tiled_as(engine, (4, 6)):
            got = qkv.attention(q, k, v, backend="tiled", **kw)
        for name, a, b in zip(("out", "lse", "weights"), got, expected):
            fin = torch.isfinite(b)
            assert torch.equal(fin, torch.isfinite(a)), name
            assert max_err(a[fin], b[fin]) < 1e-12, f"{name} {engine}"


# -- fully masked rows and tiles -----------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows_and_tiles(engine, dtype):
    """Rows with no allowed key give exact zeros, LSE -inf and zero gradients, never NaN;
    tiles emptied by the mask are skipped (a whole query tile row may have no work at all)."""
    B, Hq, Hkv, Lq, Lk, block = 3, 4, 2, 24, 30, (8, 8)
    allowed = torch.rand(B, 1, Lq, Lk, generator=torch.Generator().manual_seed(1)) < 0.6
    allowed[0] = False              # batch row 0: nothing at all
    allowed[1, :, 8:16] = False     # a whole query tile (rows 8..15) of batch 1
    allowed[2, :, 5] = False        # one row inside a partial tile
    allowed[2, :, :, 16:24] = False  # a whole key tile column of batch 2
    cases = {
        "dense": M.from_dense(allowed),
        "padding0_causal": M.padding([0, 17, 30]) & M.causal(),
        "padding0_dense": M.padding([0, 30, 5]) & M.from_dense(allowed),
    }
    grad = dtype != torch.float16  # fp16 gradients are covered by test_gradients_tiled_vs_math
    for name, mask in cases.items():
        q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, 8, dtype=dtype, requires_grad=grad, seed=2)
        with tiled_as(engine, block) as be:
            out, lse = qkv.attention(q, k, v, mask=mask, backend="tiled", return_lse=True)
            groups, bm = make_plan(make_call(q, k, v, mask=mask), be.block)
        # the mask really empties tiles: the whole of batch 0 has no live tile
        assert (bm.kind[0] == EMPTY).all(), name
        assert all(p.n == 0 for p in groups[0][1].values()), name
        empty = ~mask.to_dense(Lq, Lk, B=B, H=Hq).any(-1)                   # (B, Hq, Lq)
        assert empty[0].all() and (~empty).any(), name
        assert not out.isnan().any() and not lse.isnan().any(), name
        assert (out[empty] == 0).all() and torch.isneginf(lse[empty]).all(), name
        assert torch.isfinite(lse[~empty]).all(), name
        ref = qkv.attention(q.detach().double(), k.detach().double(), v.detach().double(), mask=mask,
                            backend="reference")
        base = qkv.attention(q.detach(), k.detach(), v.detach(), mask=mask, backend="math")
        assert_error_ratio(out.detach(), base, ref, what=f"{name} {dtype} {engine}")
        if grad:
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype))
            for t in (q, k, v):
                assert not t.grad.isnan().any(), name
            assert (q.grad[empty] == 0).all(), name
            assert (k.grad[0] == 0).all() and (v.grad[0] == 0).all(), name  # batch 0 attends nothing
            assert (q.grad[~empty] != 0).any(), name


# -- batch- and head-dependent masks -------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_batch_and_head_dependent_masks(engine):
    """Masks whose tiles differ per batch row or per head: each batch row gets its own plan,
    heads share one (a tile is skipped only if empty for every head)."""
    B, Hq, Hkv, Lq, Lk, D = 3, 4, 2, 50, 70, 8
    g = torch.Generator().manual_seed(7)
    ids = torch.stack([torch.zeros(Lk, dtype=torch.long),
                       (torch.arange(Lk) >= 20).long() + (torch.arange(Lk) >= 45).long(),
                       torch.arange(Lk) // 9])                                # (B, Lk) document ids per row
    head_layout = torch.rand(Hq, 7, 5, generator=g) < 0.4                     # (H, nQb, nKb), blocks of 10 x 16
    head_layout[0, :, 0] = True
    batch_head_layout = torch.rand(B, Hq, 7, 5, generator=g) < 0.5            # (B, H, nQb, nKb)
    cases = {
        "document": M.document(ids),
        "document_causal": M.document(ids) & M.causal(),
        "padding": M.padding([70, 1, 33]),
        "padding_window": M.padding([0, 40, 12]) | M.sliding_window(3),
        "block_sparse_heads": M.block_sparse(head_layout, (10, 16)),
        "block_sparse_batch_heads": M.block_sparse(batch_head_layout, (10, 16)),
        "callable_b_h": lambda b, h, qi, kv: ((qi // (h + 2)) + kv + b) % 4 != 1,
        "callable_h_causal": (lambda b, h, qi, kv: kv >= qi - 5 * (h + 1)) & M.causal(),
    }
    for j, (name, mask) in enumerate(cases.items()):
        dense = qkv.masks.as_mask(mask).to_dense(Lq, Lk, B=B, H=Hq)
        assert not torch.equal(dense[0], dense[1]) or not torch.equal(dense[:, 0], dense[:, 1]), name
        block = [(10, 16), (16, 16), (7, 5), random_block(600 + j)][j % 4]
        q0, k0, v0 = rand_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=torch.float64, seed=j)
        dout = torch.randn(B, Hq, Lq, D, generator=torch.Generator().manual_seed(j), dtype=torch.float64)
        ref = qkv.attention(q0, k0, v0, mask=mask, backend="reference")
        expected = grads_of("math", q0, k0, v0, dout, torch.float64, mask=mask)
        with tiled_as(engine, block):
            got = grads_of("tiled", q0, k0, v0, dout, torch.float64, mask=mask)
            out32 = qkv.attention(q0.float(), k0.float(), v0.float(), mask=mask, backend="tiled")
        assert max_err(got[0], ref) < 1e-12, f"out {name} {engine}"
        for gname, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
            assert max_err(a, b) < 1e-12, f"{gname} {name} block={block} {engine}"
        base32 = qkv.attention(q0.float(), k0.float(), v0.float(), mask=mask, backend="math")
        assert_error_ratio(out32, base32, ref, what=f"fp32 {name} {engine}")


# -- layouts: non-contiguous inputs, Dv != D, explicit q_offset -----------------------------

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("layout", ["transposed", "last_dim_strided", "expanded_kv", "sliced"])
def test_non_contiguous_inputs(layout, engine):
    B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, 19, 30, 8
    mask = M.document(torch.tensor([[0] * 10 + [1] * 20, [0] * 25 + [1] * 5])) & M.causal()
    q0, k0, v0 = rand_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=torch.float64)
    dout = torch.randn(B, Hq, Lq, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def arrange(t):
        """The same values, stored differently; a leaf so that its gradient can be read."""
        if layout == "transposed":      # (B, L, H, D) storage viewed as (B, H, L, D)
            leaf = t.transpose(1, 2).contiguous().requires_grad_()
            return leaf, leaf.transpose(1, 2)
        if layout == "last_dim_strided":  # stride(-1) != 1
            leaf = t.transpose(-1, -2).contiguous().requires_grad_()
            return leaf, leaf.transpose(-1, -2)
        if layout == "expanded_kv":     # one head's storage broadcast to every head (stride 0)
            leaf = t[:, :1].clone().requires_grad_()
            return leaf, leaf.expand(t.shape)
        leaf = torch.cat([t, t], dim=-1).requires_grad_()  # every other element of a wider tensor
        return leaf, leaf[..., ::2]

    def run_layout(backend, dtype):
        leaves, views = zip(*(arrange(t.to(dtype)) for t in (q0, k0, v0)))
        assert all(not x.is_contiguous() for x in views) or layout == "expanded_kv"
        out = qkv.attention(*views, mask=mask, backend=backend)
        return (out.detach(), *torch.autograd.grad(out, leaves, dout.to(dtype)))

    with tiled_as(engine, (7, 5)):
        got = run_layout("tiled", torch.float64)
        got32 = run_layout("tiled", torch.float32)
    expected = run_layout("math", torch.float64)
    base32 = run_layout("math", torch.float32)
    grad_scale = max(float(t.abs().max()) for t in expected[1:])
    for name, a, b, a32, b32 in zip(("out", "dq", "dk", "dv"), got, expected, got32, base32):
        assert max_err(a, b) < 1e-12, f"{name} {layout} {engine}"
        assert_error_ratio(a32, b32, b, ratio=2.0 if name == "out" else 3.0, what=f"fp32 {name} {layout}",
                           scale=None if name == "out" else grad_scale)


@pytest.mark.parametrize("engine", ENGINES)
def test_value_dim_differs_and_explicit_q_offset(engine):
    q, k, v = rand_qkv(2, 4, 2, 9, 25, 8, Dv=5, dtype=torch.float64, requires_grad=True)
    with tiled_as(engine, (4, 6)):
        out = qkv.attention(q, k, v, causal=True, backend="tiled")
        full = qkv.attention(q.detach(), k.detach(), v.detach(), causal=True, q_offset=0, backend="tiled")
        part = qkv.attention(q.detach()[:, :, 2:7], k.detach(), v.detach(), causal=True, q_offset=2,
                             backend="tiled")
    assert max_err(out.detach(), qkv.attention(q.detach(), k.detach(), v.detach(), causal=True,
                                      backend="reference")) < 1e-12
    assert max_err(part, full[:, :, 2:7]) < 1e-12
    assert max_err(full, qkv.attention(q.detach(), k.detach(), v.detach(), causal=True, q_offset=0,
                                       backend="reference")) < 1e-12
    got = torch.autograd.grad(out.sum(), (q, k, v))
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    expected = torch.autograd.grad(qkv.attention(q2, k2, v2, causal=True, backend="math").sum(), (q2, k2, v2))
    for a, b in zip(got, expected):
        assert max_err(a, b) < 1e-12


def test_unknown_engine_is_refused():
    q, k, v = rand_qkv(1, 2, 2, 4, 4, 8)
    with tiled_as("flash", (16, 16)):
        with pytest.raises(ValueError, match="engine"):
            qkv.attention(q, k, v, backend="tiled")
    assert qkv.backends.get("tiled").engine == "auto"  # restored by tiled_as


# -- qkv.attention_weights -----------------------------------------------------------------

def test_attention_weights_rows_and_heads_equal_math():
    B, Hq, Hkv, Lq, Lk = 2, 4, 2, 140, 150  # more than one 128-row tile
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, 8, dtype=torch.float64)
    k_as_v = k  # attention_weights takes no values
    for mask in (None, M.causal(), M.padding([0, 90]), lambda b, h, qi, kv: (qi + kv + h + b) % 3 != 0):
        _, full = qkv.attention(q, k, k_as_v, mask=mask, backend="math", return_weights=True)
        for rows, heads in [([139, 0, 5, 128, 5], [3, 1]), (None, [0]), (torch.tensor([7]), None),
                            (torch.tensor([[130, 2]]), torch.tensor([2, 0, 2]))]:
            got = qkv.attention_weights(q, k, rows=rows, heads=heads, mask=mask)
            r = list(range(Lq)) if rows is None else torch.as_tensor(rows).flatten().tolist()
            h = list(range(Hq)) if heads is None else torch.as_tensor(heads).flatten().tolist()
            expected = full[:, h][:, :, r]
            assert got.shape == expected.shape and got.dtype == torch.float64
            assert max_err(got, expected) < 1e-12, f"rows={r} heads={h} mask={mask!r}"
    with pytest.raises(ValueError, match="rows"):
        qkv.attention_weights(q, k, rows=[Lq])
    with pytest.raises(ValueError, match="rows"):
        qkv.attention_weights(q, k, rows=[-1, 3])
    with pytest.raises(ValueError, match="heads"):
        qkv.attention_weights(q, k, heads=[Hq])


def test_attention_weights_few_rows_of_a_long_sequence():
    """3 rows of L = 32768 (H = 2): an L x L float64 matrix would be 16 GiB; the rows are a few tiles' work."""
    L, H, D = 32768, 2, 16
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, L, D, generator=g, dtype=torch.float64)
    k = torch.randn(1, H, L, D, generator=g, dtype=torch.float64)
    rows = torch.tensor([L - 1, 5, 16000])
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    w = qkv.attention_weights(q, k, rows=rows, causal=True)
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert w.shape == (1, H, 3, L) and w.dtype == torch.float64
    assert torch.allclose(w.sum(-1), torch.ones(1, H, 3, dtype=torch.float64), atol=1e-12)
    # direct float64 computation of the same rows
    s = q[:, :, rows] @ k.transpose(-1, -2) / D ** 0.5                          # (1, H, 3, L)
    s = s.masked_fill(torch.arange(L).view(1, 1, 1, L) > rows.view(1, 1, 3, 1), float("-inf"))
    assert max_err(w, torch.softmax(s, dim=-1)) < 1e-12
    assert (w[:, :, 1, 6:] == 0).all()  # row 5 sees keys 0..5 only
    if sys.platform.startswith("linux"):  # ru_maxrss is in KiB on Linux
        assert (peak_after - peak_before) * 1024 < 2 * 2 ** 30, "attention_weights grew the peak memory by > 2 GiB"


# -- auto routing --------------------------------------------------------------------------

def test_auto_routes_sparse_masks_and_score_mods_to_tiled():
    q, k, v = rand_qkv(1, 2, 2, 4096, 4096, 8)
    sparse = M.causal() & M.sliding_window(256)
    assert qkv.backends.select(make_call(q, k, v, mask=sparse)).name == "tiled"
    assert qkv.backends.select(make_call(q, k, v, mask=M.sliding_window(256), causal=True)).name == "tiled"
    assert qkv.backends.select(make_call(q, k, v)).name == "sdpa"
    assert qkv.backends.select(make_call(q, k, v, causal=True)).name == "sdpa"
    assert qkv.backends.select(make_call(q, k, v, mask=M.causal())).name == "sdpa"
    # a dense-ish mask (most tiles live): sdpa with its dense mask
    assert qkv.backends.select(make_call(q, k, v, mask=M.sliding_window(3000, causal=False))).name == "sdpa"
    assert qkv.backends.select(make_call(q, k, v, score_mod=S.softcap(5.0))).name == "tiled"
    assert qkv.backends.select(make_call(q, k, v, mask=sparse, return_lse=True)).name == "tiled"
    qs, ks, vs = rand_qkv(1, 2, 2, 64, 64, 8)
    assert qkv.backends.select(make_call(qs, ks, vs, return_weights=True)).name == "math"
    assert qkv.backends.select(make_call(qs, ks, vs, mask=M.causal() & M.sliding_window(8),
                                         return_weights=True)).name == "math"
    assert qkv.backends.select(make_call(qs, ks, vs, score_mod=S.alibi(2), return_weights=True)).name == "math"


def test_auto_on_a_sparse_mask_equals_the_oracle():
    """What auto runs for a sparse mask (tiled) is right, not only chosen."""
    B, H, L, D = 1, 2, 600, 16
    q, k, v = rand_qkv(B, H, H, L, L, D, dtype=torch.float32, seed=4)
    mask = M.causal() & M.sliding_window(40)
    assert qkv.backends.select(make_call(q, k, v, mask=mask)).name == "tiled"
    check_forward(q, k, v, mask, backends=("auto",), what="auto sparse")


@pytest.mark.parametrize("engine", ["auto", "generic"])
def test_lse_is_differentiable_like_math(engine):
    """A loss on the returned LSE (d lse / d s = p) gets the same gradients as through math."""
    q0, k0, v0 = rand_qkv(2, 4, 2, 37, 50, 8, dtype=torch.float64, seed=3)
    mask = M.causal() & M.sliding_window(20)
    g = torch.randn(2, 4, 37, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def grads(backend):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        out, lse = qkv.attention(q, k, v, mask=mask, backend=backend, return_lse=True)
        finite = torch.isfinite(lse)
        ((out * g).sum() + (lse[finite] ** 2).sum()).backward()
        return q.grad, k.grad, v.grad

    with tiled_as(engine, (16, 16)):
        got = grads("tiled")
    for a, b in zip(got, grads("math")):
        assert max_err(a, b) < 1e-12
