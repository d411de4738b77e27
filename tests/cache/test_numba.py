"""qkv's numba CPU decode kernels: the skinny linear and the paged decode step.

Each is checked against a float64 oracle by the error-ratio rule, with torch's
fp32 result as the baseline, and each fallback is checked to be taken.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_error_ratio
from qkv import kernels
from qkv.models import Decoder, DecoderConfig

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is not installed")


def _randn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


# -- linear --------------------------------------------------------------------


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16])
@pytest.mark.parametrize("N,K", [(1, 1), (5, 3), (8, 5), (37, 64), (100, 59), (4, 256), (7, 769), (17, 33)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_oracle(M, N, K, bias):
    x64, w64 = _randn(M, K, seed=M), _randn(N, K, seed=N * K)
    b64 = _randn(N, seed=7) if bias else None
    x, w = x64.float(), w64.float()
    b = None if b64 is None else b64.float()
    with torch.no_grad():
        assert kernels.applies(x, w, b)
        out = kernels.linear(x, w, b)
        assert_error_ratio(out, F.linear(x, w, b), F.linear(x64, w64, b64), what=f"linear M={M} N={N} K={K}")


def test_kernels_leave_torch_threads_alone():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            kernels.linear(_randn(2, 8).float(), _randn(6, 8, seed=1).float())
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_linear_keeps_leading_dims_and_strided_input():
    x = _randn(2, 3, 16).float()[:, :, ::2]                 # (2, 3, 8), not contiguous
    w = _randn(5, 8, seed=1).float()
    with torch.no_grad():
        out = kernels.linear(x, w)
    assert out.shape == (2, 3, 5)
    assert_error_ratio(out, F.linear(x, w), F.linear(x.double(), w.double()), what="strided x")


def test_linear_propagates_nan_and_inf():
    x, w = _randn(2, 8).float(), _randn(6, 8, seed=1).float()
    x[0, 3] = float("nan")
    x[1, 0] = float("inf")
    with torch.no_grad():
        out, ref = kernels.linear(x, w), F.linear(x, w)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))


@pytest.mark.parametrize("case", ["rows", "grad", "float64", "weight_view", "disabled"])
def test_linear_falls_back(case, monkeypatch):
    x, w = _randn(2, 8).float(), _randn(6, 8, seed=1).float()
    grad = False
    if case == "rows":
        x = _randn(kernels.MAX_ROWS + 1, 8).float()
    elif case == "grad":
        w.requires_grad_(True)
        grad = True
    elif case == "float64":
        x, w = x.double(), w.double()
    elif case == "weight_view":
        w = _randn(8, 6, seed=1).float().t()                # (6, 8), not contiguous
    else:
        monkeypatch.setattr(kernels, "ENABLED", False)
    with torch.set_grad_enabled(grad):
        assert not kernels.applies(x, w)
        out = kernels.linear(x, w)
        torch.testing.assert_close(out, F.linear(x, w), rtol=0, atol=0)
    if grad:
        out.sum().backward()                                # autograd still flows on the fallback
        assert w.grad is not None


# -- paged decode ---------------------------------------------------------------


def _oracle_decode(q, kpool, vpool, tables, lengths, block_size, window, scale):
    """float64 attention of each query over its sequence's keys, gathered in position order."""
    B, Hq, _, D = q.shape
    Hkv = kpool.shape[-3]
    outs = []
    for b in range(B):
        L = int(lengths[b])
        pos = torch.arange(L)
        slots = tables[b][pos // block_size] * block_size + pos % block_size
        kp = kpool[b] if kpool.dim() == 4 else kpool
        vp = vpool[b] if vpool.dim() == 4 else vpool
        keys, values = kp[:, slots], vp[:, slots]                         # (Hkv, L, D)
        keep = pos > L - 1 - window if window else torch.ones(L, dtype=torch.bool)
        keys = keys.repeat_interleave(Hq // Hkv, dim=0)                   # (Hq, L, D)
        values = values.repeat_interleave(Hq // Hkv, dim=0)
        s = (keys @ q[b, :, 0, :, None])[..., 0] * scale                  # (Hq, L)
        s = s.masked_fill(~keep, float("-inf"))
        outs.append((torch.softmax(s, -1)[:, None, :] @ values))          # (Hq, 1, D)
    return torch.stack(outs)


def _pool_case(B, Hq, Hkv, D, block_size, lengths, seed):
    """A shuffled pool: each sequence's blocks are scattered, as after many allocations."""
    blocks = [-(-n // block_size) for n in lengths]
    total = sum(blocks) + 3
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(total, generator=g)
    tables = torch.zeros(B, max(blocks), dtype=torch.long)
    at = 0
    for b, nb in enumerate(blocks):
        tables[b, :nb] = order[at:at + nb]
        at += nb
    kpool = _randn(Hkv, total * block_size, D, seed=seed + 1)
    vpool = _randn(Hkv, total * block_size, D, seed=seed + 2)
    q = _randn(B, Hq, 1, D, seed=seed + 3)
    return q, kpool, vpool, tables, torch.tensor(lengths)


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("D", [1, 8, 59, 64])
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("window", [None, 1, 5])
def test_paged_decode_matches_oracle(Hq, Hkv, D, block_size, window):
    lengths = [1, 6, 17, 33]
    q, kp, vp, tables, lens = _pool_case(len(lengths), Hq, Hkv, D, block_size, lengths, seed=D + block_size)
    scale = 1 / math.sqrt(D)
    oracle = _oracle_decode(q, kp, vp, tables, lens, block_size, window, scale)
    baseline = _oracle_decode(q.float(), kp.float(), vp.float(), tables, lens, block_size, window, scale)
    with torch.no_grad():
        assert kernels.paged_decode_applies(q.float(), kp.float())
        out = kernels.paged_decode(q.float(), kp.float(), vp.float(), tables, lens, block_size=block_size,
                                  window=window)
    assert out.shape == (len(lengths), Hq, 1, D)
    assert_error_ratio(out, baseline, oracle, what=f"paged decode Hq={Hq} Hkv={Hkv} D={D} bs={block_size} w={window}")


@pytest.mark.parametrize("window", [None, 3])
def test_paged_decode_per_sequence_buffers(window):
    """The contiguous-cache layout: (B, Hkv, max_len, D), one block of max_len per sequence."""
    B, Hq, Hkv, S, D = 3, 4, 2, 40, 16
    q, kp, vp = _randn(B, Hq, 1, D), _randn(B, Hkv, S, D, seed=1), _randn(B, Hkv, S, D, seed=2)
    lens, tables = torch.tensor([1, 22, 40]), torch.zeros(B, 1, dtype=torch.long)
    scale = 0.3
    oracle = _oracle_decode(q, kp, vp, tables, lens, S, window, scale)
    baseline = _oracle_decode(q.float(), kp.float(), vp.float(), tables, lens, S, window, scale)
    with torch.no_grad():
        out = kernels.paged_decode(q.float(), kp.float(), vp.float(), tables, lens, block_size=S, window=window,
                                  scale=scale)
    assert_error_ratio(out, baseline, oracle, what="per-sequence buffers")


def test_paged_decode_rejects_bad_shapes():
    q, kp = torch.randn(2, 3, 1, 8), torch.randn(2, 10, 8)
    with pytest.raises(ValueError, match="multiple of the pool's Hkv"):
        kernels.paged_decode(q, kp, kp, torch.zeros(2, 1, dtype=torch.long), torch.tensor([1, 2]), block_size=10)
    with pytest.raises(ValueError, match=r"\(B, Hq, 1, D\)"):
        kernels.paged_decode(torch.randn(2, 2, 2, 8), kp, kp, torch.zeros(2, 1, dtype=torch.long),
                            torch.tensor([1, 2]), block_size=10)


# -- through the model ------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "mistral"])
@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_decoder_decode_with_and_without_kernels(arch, kind, monkeypatch):
    """Ragged cached decode through both kernels vs the torch path, both vs a float64 full forward."""
    make = getattr(DecoderConfig, arch)
    extra = {"n_kv_heads": 2, "sliding_window": 6} if arch == "mistral" else {}
    cfg = make(n_layers=2, d_model=32, n_heads=4, vocab_size=61, max_positions=64, **extra)
    torch.manual_seed(0)
    model = Decoder(cfg).eval()
    model64 = Decoder(cfg, dtype=torch.float64).eval()
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    prompts = [torch.randint(0, 61, (n,)) for n in (3, 11, 7)]
    steps = torch.randint(0, 61, (3, 8))

    launched = []
    real_launch = kernels.launch
    monkeypatch.setattr(kernels, "launch", lambda name, *args: (launched.append(name), real_launch(name, *args)))

    def run(enabled):
        monkeypatch.setattr(kernels, "ENABLED", enabled)
        cache = model.new_cache(3, kind=kind, max_len=32, **({"block_size": 4} if kind == "paged" else {}))
        with torch.no_grad():
            for b, p in enumerate(prompts):
                model(p[None], cache=cache.row(b))
            return torch.cat([model(steps[:, i:i + 1], cache=cache) for i in range(steps.shape[1])], 1)

    candidate = run(True)
    # the kernels served the decode steps: a whole block is one fused launch, except over a ring buffer
    ring = arch == "mistral" and kind == "contiguous"
    assert ({"skinny", "paged"} if ring else {"skinny", "block"}) <= set(launched)
    launched.clear()
    baseline = run(False)
    assert not launched
    with torch.no_grad():
        oracle = torch.cat([model64(torch.cat([p, steps[b]])[None])[:, len(p):] for b, p in enumerate(prompts)])
    assert_error_ratio(candidate, baseline, oracle, what=f"{arch} {kind} cached decode")
