"""The `triton` backend: its Triton kernels against the float64 oracle, forward and backward.

Legend: B batch, Hq query heads, Hkv key/value heads, Lq/Lk lengths, D head dim.

Without a GPU (CI) the kernels run on CPU tensors in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before any kernel is defined); with one, on CUDA. Every call is checked by the
error-ratio rule: the candidate's error against the math backend in float64 at most 2x (outputs,
LSE) or 3x (gradients) the math backend's own error in the same dtype, plus a few ulps.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qkv
from conftest import assert_error_ratio
from qkv import masks as M
from qkv import scores as S
from qkv.backends import BackendError, triton_backend

pytest.importorskip("triton")

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IDS = torch.tensor([0] * 30 + [1] * 20 + [2] * 47)                         # 97 positions in runs
IDS_BACK = torch.tensor(([0] * 10 + [1] * 7 + [2] * 5) * 4 + [3] * 9)      # ids that come back: 97


def _inputs(B, Hq, Hkv, Lq, Lk, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64)
    do = torch.randn(B, Hq, Lq, D, generator=g, dtype=torch.float64)
    dl = torch.randn(B, Hq, Lq, generator=g, dtype=torch.float64)
    return [t.to(DEV) for t in (q, k, v, do, dl)]


def _run(backend, q, k, v, do, dl, dtype, grad, **kw):
    """out, lse and (with grad) dq, dk, dv of sum(out * do) + sum(lse * dl) (the LSE's gradient too)."""
    ts = [t.to(dtype).requires_grad_(grad) for t in (q, k, v)]
    out, lse = qkv.attention(*ts, backend=backend, return_lse=True, **kw)
    res = [out, lse]
    if grad:
        finite = torch.isfinite(lse)
        loss = (out.double() * do).sum() + (torch.where(finite, lse, 0).double() * dl).sum()
        res += list(torch.autograd.grad(loss, ts))
    return res


def check(B, Hq, Hkv, Lq, Lk, D, *, dtype=torch.float32, grad=True, seed=0, what="", **kw):
    """The triton backend against the math backend (same dtype) and the float64 oracle."""
    q, k, v, do, dl = _inputs(B, Hq, Hkv, Lq, Lk, D, dtype, seed)
    cand = _run("triton", q, k, v, do, dl, dtype, grad, **kw)
    base = _run("math", q, k, v, do, dl, dtype, grad, **kw)
    ref = _run("math", q, k, v, do, dl, torch.float64, grad, **kw)
    empty = torch.isneginf(ref[1])
    assert torch.equal(torch.isneginf(cand[1]), empty), f"{what}: rows with no key differ"
    assert not cand[0][empty.unsqueeze(-1).expand_as(cand[0])].any(), f"{what}: a row with no key is not 0"
    for i, name in enumerate(("out", "lse", "dq", "dk", "dv")[:len(cand)]):
        c, b, r = cand[i], base[i], ref[i]
        if name == "lse":
            c, b, r = (torch.where(empty, 0, t.float()) for t in (c, b, r))
            r = r.double()
        assert_error_ratio(c, b, r, ratio=2.0 if name in ("out", "lse") else 3.0, what=f"{what} {name}")
    return cand


MASKS = {
    "none": lambda B: None,
    "causal": lambda B: M.causal(),
    "window": lambda B: M.sliding_window(7),
    "window_both": lambda B: M.sliding_window(9, causal=False),
    "prefix": lambda B: M.prefix_lm(20),
    "padding": lambda B: M.padding([97, 40][:B]),
    "causal_padding": lambda B: M.causal() & M.padding([60, 97][:B]),
    "document": lambda B: M.document(IDS),
    "document_causal": lambda B: M.document(IDS) & M.causal(),
    "document_window": lambda B: M.causal() & M.sliding_window(16) & M.document(IDS),
    "ids_back": lambda B: M.document(IDS_BACK),                       # ids compared in the kernel
    "ids_back_causal": lambda B: M.document(IDS_BACK) & M.causal(),
    "causal_or_prefix": lambda B: M.causal() | M.prefix_lm(10),      # the rest: a bitmask per tile
    "not_window": lambda B: ~M.sliding_window(30),
    "dilated": lambda B: M.dilated(6, 3),
    "global_window": lambda B: M.longformer(8, global_tokens=[0, 50]),
    "callable": lambda B: (lambda b, h, q, kv: (q + 2 * kv) % 5 != 0),
    "dense": lambda B: torch.rand(B, 1, 97, 97, generator=torch.Generator().manual_seed(4)).to(DEV) > 0.6,
}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_every_mask_forward_and_backward(name):
    check(2, 4, 2, 97, 97, 40, mask=MASKS[name](2), what=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["none", "causal", "document_window", "causal_or_prefix"])
def test_half_precision(name, dtype):
    check(1, 4, 2, 97, 97, 64, dtype=dtype, mask=MASKS[name](1), what=f"{name} {dtype}")


@pytest.mark.parametrize("D", [16, 40, 64, 80, 128])
def test_head_dims(D):
    check(1, 2, 1, 97, 97, D, mask=M.causal(), seed=D, what=f"D={D}")


@pytest.mark.parametrize("Lq,Lk", [(1, 1), (1, 97), (17, 17), (17, 97), (97, 17), (1, 300)])
def test_lengths_and_alignment(Lq, Lk):
    # Lq != Lk aligns bottom-right: Lq > Lk leaves the first Lq - Lk rows with no key under causal
    check(1, 2, 2, Lq, Lk, 64, mask=M.causal(), seed=Lq + Lk, what=f"{Lq}x{Lk}")


@pytest.mark.parametrize("q_offset", [0, 40, 120])
def test_q_offset(q_offset):
    check(1, 2, 1, 33, 97, 16, mask=M.sliding_window(20), q_offset=q_offset, what=f"q_offset={q_offset}")


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (4, 1), (6, 2), (6, 3)])
def test_mha_gqa_mqa(Hq, Hkv):
    check(1, Hq, Hkv, 97, 97, 16, mask=M.document(IDS) & M.causal(), what=f"{Hq}/{Hkv}")


def test_a_mask_that_differs_by_head_with_gqa():
    dense = torch.rand(1, 4, 97, 97, generator=torch.Generator().manual_seed(7)).to(DEV) > 0.5
    check(1, 4, 2, 97, 97, 16, mask=dense, what="per-head mask")


def test_fully_masked_rows_and_tiles():
    # batch row 1 has no real key: every row empty; windows leave EMPTY tiles
    check(2, 2, 1, 97, 97, 16, mask=M.padding([97, 0]) & M.sliding_window(5), what="empty rows")
    check(1, 2, 2, 97, 97, 16, mask=~M.causal() & M.causal(), what="nothing allowed")


MODS = {
    "alibi": lambda H: S.alibi(H),
    "alibi_symmetric": lambda H: S.alibi(H, symmetric=True),
    "softcap": lambda H: S.softcap(2.0),
    "relative": lambda H: S.relative_bias(torch.randn(32, H, generator=torch.Generator().manual_seed(5)).to(DEV)),
    "bias": lambda H: S.bias(torch.randn(1, H, 97, 97, generator=torch.Generator().manual_seed(6)).to(DEV)),
    "bias_cols": lambda H: S.bias(torch.randn(97, generator=torch.Generator().manual_seed(8)).to(DEV)[None]),
    "chain": lambda H: S.chain(S.alibi(H), S.softcap(3.0)),
}


@pytest.mark.parametrize("name", sorted(MODS))
def test_score_mod_variants(name):
    check(1, 4, 2, 97, 97, 16, mask=M.causal(), score_mod=MODS[name](4), what=name)


def test_sinks_and_their_gradient():
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], device=DEV)
    check(1, 4, 2, 97, 97, 16, mask=M.sliding_window(9), sinks=sinks, what="sinks")


def test_negative_scale_and_non_contiguous_inputs():
    check(1, 2, 2, 40, 40, 16, mask=M.causal(), scale=-0.4, what="negative scale")
    q, k, v = (torch.randn(1, 40, 2, 16, device=DEV).transpose(1, 2) for _ in range(3))   # (B, H, L, D) views
    out = qkv.attention(q, k, v, mask=M.causal(), backend="triton")
    ref = qkv.attention(q.double(), k.double(), v.double(), mask=M.causal(), backend="math")
    assert_error_ratio(out, qkv.attention(q, k, v, mask=M.causal(), backend="math"), ref)


@pytest.mark.slow
@pytest.mark.parametrize("D", [16, 40, 64, 80, 128])
@pytest.mark.parametrize("L", [1, 17, 97, 300])
def test_long_grid(D, L):
    for name, mask in (("window", M.sliding_window(33)), ("bits", M.causal() | M.prefix_lm(L // 3))):
        check(1, 4, 2, L, L, D, mask=mask, seed=L * D, what=f"{name} L={L} D={D}")


def test_the_bitmask_is_built_once_per_block_mask(monkeypatch):
    calls = []
    real = triton_backend._bits
    monkeypatch.setattr(triton_backend, "_bits", lambda *a: calls.append(1) or real(*a))
    mask = M.causal() | M.prefix_lm(10)
    q, k, v = (torch.randn(1, 2, 97, 16, device=DEV) for _ in range(3))
    first = qkv.attention(q, k, v, mask=mask, backend="triton")
    again = qkv.attention(q, k, v, mask=mask, backend="triton")
    assert len(calls) == 1 and torch.equal(first, again)
    p = triton_backend.plan(qkv.backends.make_call(q, k, v, mask=mask, causal=False, score_mod=None, scale=None,
                                                   dropout_p=0.0, return_lse=False, return_weights=False,
                                                   q_offset=None), 32, 32)
    partial = int(p.part_cnt.sum())
    assert p.bits.numel() * 4 == partial * 32 * 32 // 8            # bits of the partial tiles, nothing more


def test_one_kernel_variant_for_every_interval_mask(monkeypatch):
    """Windows of any width, documents, prefixes and padding run the same compiled kernel."""
    from qkv.kernels.gpu import attention as kern

    seen = []
    real = kern._fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(tuple(sorted(kw.items())))
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(kern, "_fwd_kernel", Spy())
    q, k, v = (torch.randn(1, 2, 97, 16, device=DEV) for _ in range(3))
    for mask in (M.sliding_window(5), M.sliding_window(40), M.prefix_lm(30), M.document(IDS) & M.causal(),
                 M.causal() & M.padding([50])):
        qkv.attention(q, k, v, mask=mask, backend="triton")
    assert len(seen) == 5 and len(set(seen)) == 1


def test_refusals_name_a_backend_that_can():
    q, k, v = (torch.randn(1, 2, 17, 16, device=DEV) for _ in range(3))
    with pytest.raises(BackendError, match="tiled"):
        qkv.attention(q, k, v, score_mod=lambda s, b, h, qi, kv: s * 2, backend="triton")
    table = torch.zeros(32, 2, device=DEV, requires_grad=True)
    with pytest.raises(BackendError, match="requires_grad"):
        qkv.attention(q, k, v, score_mod=S.relative_bias(table), backend="triton")
    with pytest.raises(BackendError, match="softcap last"):
        qkv.attention(q, k, v, score_mod=S.chain(S.softcap(2.0), S.alibi(2)), backend="triton")
    with pytest.raises(BackendError, match="head dims"):
        qkv.attention(torch.randn(1, 1, 4, 300, device=DEV), torch.randn(1, 1, 4, 300, device=DEV),
                      torch.randn(1, 1, 4, 300, device=DEV), backend="triton")
    with pytest.raises(BackendError, match="dropout"):
        qkv.attention(q, k, v, dropout_p=0.1, backend="triton")


def test_auto_takes_it_on_cuda_only():
    q, k, v = (torch.randn(1, 2, 17, 16, device=DEV) for _ in range(3))
    call = qkv.backends.make_call(q, k, v, mask=M.causal(), causal=False, score_mod=None, scale=None, dropout_p=0.0,
                                  return_lse=False, return_weights=False, q_offset=None)
    chosen = qkv.backends.select(call).name
    assert (chosen == "triton") == (DEV.type == "cuda")
    assert "triton" in qkv.backends.names()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tiled backend's generic engine on CUDA needs a GPU")
def test_tiled_generic_engine_on_cuda():
    mask = M.causal() | M.prefix_lm(10)
    q, k, v, do, dl = _inputs(1, 4, 2, 97, 97, 40, torch.float32, 3)
    for dtype in (torch.float32, torch.bfloat16):
        cand = _run("tiled", q, k, v, do, dl, dtype, True, mask=mask, score_mod=lambda s, b, h, qi, kv: s * 0.5)
        base = _run("math", q, k, v, do, dl, dtype, True, mask=mask, score_mod=lambda s, b, h, qi, kv: s * 0.5)
        ref = _run("math", q, k, v, do, dl, torch.float64, True, mask=mask, score_mod=lambda s, b, h, qi, kv: s * 0.5)
        for i in (0, 2, 3, 4):
            assert_error_ratio(cand[i], base[i], ref[i], ratio=2.0 if i == 0 else 3.0, what=f"tiled cuda {dtype}")


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_an_h100_without_one(tmp_path):
    """The interpreter checks the arithmetic; Triton's compiler (to a cubin for sm_90, with its bundled
    ptxas, no GPU needed) checks what only a GPU build meets: types, layouts, shared memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)                      # a cold cache: every variant compiled here
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(Path(qkv.__file__).parents[1]), env.get("PYTHONPATH", "")])
    script = Path(__file__).with_name("compile_gpu_kernels.py")
    done = subprocess.run([sys.executable, str(script), "90"], env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert len(lines) == 19 and all(line.startswith("ok") for line in lines), done.stdout
