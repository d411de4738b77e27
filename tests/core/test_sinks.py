"""Attention sinks (`qkv.attention(..., sinks=)`): a per-head logit in every softmax row, with no value.

Legend: B batch, Hq query heads, Hkv key/value heads, G = Hq // Hkv, Lq/Lk lengths, D head dim, V vocabulary.

The oracle for outputs, LSE and weights is `qkv.reference.attention(sinks=)` (NumPy float64, the sink
appended as one more score column, as Hugging Face's GPT-OSS eager attention does); for gradients, float64
autograd of `textbook`, the same column appended in plain torch. The same-dtype baseline of the
error-ratio rule is `textbook` in the candidate's dtype (scores in the statistics dtype, as `math`
forms them), so the front door's rescaling by the LSE is held to the direct form.
"""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv import masks as M
from qkv import reference
from qkv.backends import BackendError, registry
from qkv.cache import ContiguousCache, PagedCache, RingCache, BlockPool
from qkv.layers import Block, MultiHeadAttention
from conftest import assert_error_ratio, max_err, rand_qkv

B, HQ, HKV, LQ, LK, D = 2, 4, 2, 9, 21, 8     # GQA, Lq != Lk (bottom-right aligned)
EXACT = [name for name, caps in qkv.backends.list() if caps.exact]
# triton (fp16/bf16/fp32, CUDA or Triton's interpreter) has its sinks test in tests/backends/test_triton.py
SINK_BACKENDS = [name for name, caps in qkv.backends.list() if caps.sinks and name != "triton"]


def mask_for(name: str):
    """The masks of the grid; "padding" holds a sequence with no key at all (every row fully masked)."""
    return {
        "none": None,
        "causal": M.causal(),
        "sliding_window": M.sliding_window(5),
        "document": M.document(torch.tensor([[0] * 7 + [1] * 9 + [2] * 5, [0] * 12 + [1] * 9])),
        "padding": M.padding([0, 13]) & M.causal(),
    }[name]


MASKS = ["none", "causal", "sliding_window", "document", "padding"]


def sinks_for(dtype=torch.float64, requires_grad=False, seed=3):
    """Sink logits that matter: on the scale of the row log-sum-exps (about log Lk), each head its own."""
    g = torch.Generator().manual_seed(seed)
    s = 2.0 + 1.5 * torch.randn(HQ, generator=g, dtype=torch.float64)
    return s.to(dtype).requires_grad_(requires_grad)


def textbook(q, k, v, sinks, mask=None):
    """softmax over [scores, sink] in plain torch, the sink column dropped: (out, lse, weights).

    Scores in the statistics dtype (float32 below float64), weights cast to v's dtype for the product."""
    sdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    Bq, Hq, Lq, Dq = q.shape
    G, Lk = Hq // k.shape[1], k.shape[2]
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)                   # (B, Hq, Lk, D)
    scores = torch.matmul(q.to(sdt), kk.to(sdt).transpose(-1, -2)) / Dq ** 0.5      # (B, Hq, Lq, Lk)
    if mask is not None:
        allowed = M.evaluate(mask, Bq, Hq, Lq, Lk, q_offset=Lk - Lq, device=q.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
    column = sinks.to(sdt).view(1, Hq, 1, 1).expand(Bq, Hq, Lq, 1)
    full = torch.cat([scores, column], dim=-1)                                       # (B, Hq, Lq, Lk + 1)
    weights = torch.softmax(full, dim=-1)[..., :Lk]
    return torch.matmul(weights.to(v.dtype), vv), torch.logsumexp(full, dim=-1), weights


def oracle(q, k, v, sinks, mask=None):
    out, lse, w = reference.attention(q, k, v, mask=mask, sinks=sinks, return_stats=True)
    return torch.from_numpy(out), torch.from_numpy(lse), torch.from_numpy(w)


def test_every_exact_backend_but_sdpa_serves_sinks():
    """Which backends take sinks: the exact ones that return an LSE; sdpa (no LSE) and the approximate ones not."""
    assert set(SINK_BACKENDS) == {"reference", "math", "tiled"}
    assert qkv.backends.get("triton").capabilities.sinks
    for name, caps in qkv.backends.list():
        assert not caps.sinks or (caps.exact and caps.return_lse), name
    assert set(EXACT) - set(SINK_BACKENDS) == {"sdpa", "triton"}


# -- outputs, LSE and weights against the float64 oracle -----------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("backend", SINK_BACKENDS + ["auto"])
def test_forward_out_lse_weights(backend, mask_name, dtype):
    mask = mask_for(mask_name)
    q, k, v = rand_qkv(B, HQ, HKV, LQ, LK, D, dtype=dtype, seed=LQ)
    sinks = sinks_for(dtype)
    ref = oracle(q, k, v, sinks, mask)
    base = textbook(q, k, v, sinks, mask)
    got = qkv.attention(q, k, v, mask=mask, sinks=sinks, backend=backend, return_lse=True, return_weights=True)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    assert got[0].dtype == dtype and got[1].dtype == got[2].dtype == stat
    for what, g, b, r in zip(("out", "lse", "weights"), got, base, ref):
        assert g.shape == r.shape, what
        assert_error_ratio(g, b, r, what=f"{backend} {mask_name} {dtype} {what}")
    assert float(got[2].sum(-1).max()) < 1.0                         # the sink takes its share of every row
    out_only = qkv.attention(q, k, v, mask=mask, sinks=sinks, backend=backend)   # auto may take another backend
    assert_error_ratio(out_only, base[0], ref[0], what=f"{backend} {mask_name} {dtype} out alone")


@pytest.mark.parametrize("mask_name", ["causal", "document"])
def test_attention_weights_of_chosen_rows_include_the_sink(mask_name):
    mask = mask_for(mask_name)
    q, k, v = rand_qkv(B, HQ, HKV, LQ, LK, D, dtype=torch.float32, seed=1)
    sinks = sinks_for(torch.float32)
    ref = oracle(q, k, v, sinks, mask)[2]
    base = textbook(q, k, v, sinks, mask)[2]
    rows, heads = [0, 4, 8], [1, 3]
    got = qkv.attention_weights(q, k, rows=rows, heads=heads, mask=mask, sinks=sinks)
    assert_error_ratio(got, base[:, heads][:, :, rows], ref[:, heads][:, :, rows], what=mask_name)


# -- gradients of q, k, v and sinks ---------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("backend", ["math", "tiled"])
def test_gradients_q_k_v_sinks(backend, mask_name, dtype):
    """d/d(q, k, v, sinks) of a loss on the output and on the LSE (which the sink joins)."""
    mask = mask_for(mask_name)
    g = torch.Generator().manual_seed(7)
    dout = torch.randn(B, HQ, LQ, D, generator=g, dtype=torch.float64)
    dlse = torch.randn(B, HQ, LQ, generator=g, dtype=torch.float64)

    def grads(fn, dt):
        q, k, v = rand_qkv(B, HQ, HKV, LQ, LK, D, dtype=dt, seed=5, requires_grad=True)
        sinks = sinks_for(dt, requires_grad=True)
        out, lse = fn(q, k, v, sinks)
        loss = (out * dout.to(out.dtype)).sum() + (lse * dlse.to(lse.dtype)).sum()
        return torch.autograd.grad(loss, (q, k, v, sinks))

    def plain(q, k, v, sinks):
        return textbook(q, k, v, sinks, mask)[:2]

    def ours(q, k, v, sinks):
        return qkv.attention(q, k, v, mask=mask, sinks=sinks, backend=backend, return_lse=True)

    ref, base, got = grads(plain, torch.float64), grads(plain, dtype), grads(ours, dtype)
    grad_scale = max(float(t.abs().max()) for t in ref)
    for name, c, b, r in zip("q k v sinks".split(), got, base, ref):
        assert c.dtype == dtype and c.shape == r.shape
        if dtype == torch.float64:  # the oracle is the textbook form in float64 itself
            assert max_err(c, r) < 1e-12, f"d{name} {backend} {mask_name}"
            continue
        assert_error_ratio(c, b, r, ratio=3.0, what=f"d{name} {backend} {mask_name} {dtype}", scale=grad_scale)


def test_gradcheck_float64():
    q, k, v = rand_qkv(1, 4, 2, 5, 7, 4, dtype=torch.float64, seed=2, requires_grad=True)
    sinks = sinks_for(requires_grad=True)
    for backend in ("math", "tiled"):
        def f(q, k, v, s):
            return qkv.attention(q, k, v, causal=True, sinks=s, backend=backend, return_lse=True)
        assert torch.autograd.gradcheck(f, (q, k, v, sinks), fast_mode=True), backend


# -- rows with no allowed key, no keys, and a sink of -inf ----------------------------------

@pytest.mark.parametrize("backend", SINK_BACKENDS)
def test_fully_masked_rows_give_zeros_and_the_sink_as_lse(backend):
    """Sequence 0 has no key (padding 0): out 0, weights 0, lse = sinks[h]; d lse'/d sink = 1 there."""
    mask = mask_for("padding")
    q, k, v = rand_qkv(B, HQ, HKV, LQ, LK, D, dtype=torch.float64, seed=4, requires_grad=backend != "reference")
    sinks = sinks_for(requires_grad=True)
    out, lse, w = qkv.attention(q, k, v, mask=mask, sinks=sinks, backend=backend, return_lse=True,
                                return_weights=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(w[0], torch.zeros_like(w[0]))
    assert torch.equal(lse[0], sinks.detach().view(HQ, 1).expand(HQ, LQ))
    lse[0].sum().backward()
    assert torch.equal(sinks.grad, torch.full((HQ,), float(LQ), dtype=torch.float64))
    if q.grad is not None:
        assert torch.equal(q.grad, torch.zeros_like(q.grad))


@pytest.mark.parametrize("shape", [(2, 4, 3, 0, 8), (0, 4, 3, 5, 8), (2, 4, 0, 5, 8)], ids=["Lk0", "B0", "Lq0"])
def test_empty_calls(shape):
    b, hq, lq, lk, d = shape
    q, k, v = torch.randn(b, hq, lq, d), torch.randn(b, 2, lk, d), torch.randn(b, 2, lk, d)
    sinks = torch.randn(hq)
    out, lse, w = qkv.attention(q, k, v, sinks=sinks, return_lse=True, return_weights=True)
    assert out.shape == (b, hq, lq, d) and lse.shape == (b, hq, lq) and w.shape == (b, hq, lq, lk)
    assert not out.any() and not w.any()
    assert torch.equal(lse, sinks.view(1, hq, 1).expand(b, hq, lq))
    with pytest.raises(BackendError, match="sinks.*use backend='tiled'"):
        qkv.attention(q, k, v, sinks=sinks, backend="sdpa")


@pytest.mark.parametrize("backend", ["math", "tiled"])
def test_a_sink_of_minus_inf_is_no_sink(backend):
    """-inf for a head gives that head the call without sinks, with finite gradients, empty rows included."""
    mask = mask_for("padding")
    q, k, v = rand_qkv(B, HQ, HKV, LQ, LK, D, dtype=torch.float64, seed=6, requires_grad=True)
    sinks = torch.tensor([float("-inf"), 0.5, float("-inf"), 2.0], dtype=torch.float64, requires_grad=True)
    out, lse = qkv.attention(q, k, v, mask=mask, sinks=sinks, backend=backend, return_lse=True)
    plain, plain_lse = qkv.attention(q, k, v, mask=mask, backend=backend, return_lse=True)
    for h in (0, 2):
        assert torch.allclose(out[:, h], plain[:, h], rtol=0, atol=1e-14)
        assert torch.equal(lse[:, h], plain_lse[:, h])
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    assert all(bool(torch.isfinite(t.grad).all()) for t in (q, k, v, sinks))
    assert sinks.grad[0] == 0 and sinks.grad[2] == 0


# -- backends that cannot, and bad sinks ----------------------------------------------------

@pytest.mark.parametrize("backend", ["sdpa", "linear", "performer"])
def test_backends_without_sinks_refuse_and_name_one_that_can(backend):
    q, k, v = rand_qkv(1, 4, 2, 5, 5, 8)
    with pytest.raises(BackendError, match=r"cannot serve.*sink.*use backend='tiled'"):
        qkv.attention(q, k, v, causal=True, sinks=torch.zeros(4), backend=backend)


def test_auto_takes_a_backend_with_sinks():
    q, k, v = rand_qkv(1, 4, 2, 5, 5, 8)
    for mask in (None, M.causal(), M.document(torch.tensor([[0, 0, 1, 1, 1]]))):   # sdpa / segments otherwise
        call = qkv.backends.make_call(q, k, v, mask=mask, causal=False, score_mod=None, scale=None, dropout_p=0.0,
                                      return_lse=True, return_weights=False, q_offset=None, sinks=torch.zeros(4))
        assert registry.select(call).name in ("tiled", "math")
    with qkv.use_backend("sdpa", "math"):
        qkv.attention(q, k, v, sinks=torch.zeros(4))                 # sdpa refuses, math serves
    with qkv.use_backend("sdpa"), pytest.raises(BackendError, match="sinks"):
        qkv.attention(q, k, v, sinks=torch.zeros(4))


BAD_SINKS = [
    ("a list", [0.0] * 4, TypeError, r"sinks must be a tensor of shape \(Hq,\) = \(4,\)"),
    ("integer", torch.zeros(4, dtype=torch.long), TypeError, "sinks must be a floating-point tensor"),
    ("one per kv head", torch.zeros(2), ValueError, r"sinks must have shape \(Hq,\) = \(4,\).*got \(2,\)"),
    ("2-D", torch.zeros(1, 4), ValueError, r"shape \(Hq,\).*got \(1, 4\)"),
    ("another device", torch.zeros(4, device="meta"), ValueError, r"sinks is on meta.*sinks.to\(q.device\)"),
]


@pytest.mark.parametrize("name,sinks,exc,pattern", BAD_SINKS, ids=[b[0] for b in BAD_SINKS])
def test_bad_sinks_are_refused(name, sinks, exc, pattern):
    q, k, v = rand_qkv(1, 4, 2, 5, 5, 8)
    with pytest.raises(exc, match=pattern):
        qkv.attention(q, k, v, sinks=sinks)
    with pytest.raises(exc, match=pattern):
        qkv.attention_weights(q, k, sinks=sinks)
    cache = ContiguousCache(1, 2, 8, 8)
    with pytest.raises(exc, match=pattern):
        cache.attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], sinks=sinks)
    assert cache.length.tolist() == [0]                                # refused before anything was stored


def test_the_oracle_appends_a_column():
    """qkv.reference's sinks are one more score column, dropped from the weights (checked by hand)."""
    q, k, v = rand_qkv(1, 1, 1, 2, 3, 4, dtype=torch.float64)
    s = torch.tensor([0.7], dtype=torch.float64)
    scores = (q[0, 0] @ k[0, 0].T) / 2.0                                               # (2, 3)
    e = torch.exp(torch.cat([scores, s.expand(2, 1)], 1))
    w = e[:, :3] / e.sum(1, keepdim=True)
    out, lse, weights = reference.attention(q, k, v, sinks=s, return_stats=True)
    assert torch.allclose(torch.from_numpy(weights[0, 0]), w, rtol=1e-15, atol=0)
    assert torch.allclose(torch.from_numpy(out[0, 0]), w @ v[0, 0], rtol=1e-14, atol=0)
    assert torch.allclose(torch.from_numpy(lse[0, 0]), torch.log(e.sum(1)), rtol=1e-15, atol=0)


# -- the caches' decode path and the layers ------------------------------------------------

def layer(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4, n_kv_heads=2, sinks=True, dtype=dtype, **kw).eval()
    with torch.no_grad():
        mha.sinks.copy_(sinks_for(dtype))
    return mha


def step_through(module, x, cache, chunks, **kw):
    outs, s = [], 0
    for n in chunks:
        outs.append(module(x[:, s:s + n], cache=cache, **kw))
        s += n
    return torch.cat(outs, 1)


def split_kv(B, L, dtype):
    cache = ContiguousCache(B, 2, 8, L, dtype=dtype)
    cache.split_kv = 3                                 # every decode step in three key chunks
    return cache


def paged(B, L, dtype):
    pool = BlockPool(B * L, 3)
    return PagedCache(pool, 2, 8, seqs=[pool.new_sequence() for _ in range(B)], dtype=dtype)


CACHE_KINDS = {
    "contiguous": lambda B, L, dtype: ContiguousCache(B, 2, 8, L, dtype=dtype),
    "split_kv": split_kv,
    "ring": lambda B, L, dtype: RingCache(B, 2, 8, 4, dtype=dtype),
    "paged": paged,
}


@pytest.mark.parametrize("kind", list(CACHE_KINDS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_mha_decode_equals_full_forward(kind, dtype, monkeypatch):
    """Token by token (after a prefill) through every cache layout == one causal forward; float32 on the
    CPU without autograd is where the decode kernel would run: it steps aside for sinks."""
    from qkv import kernels
    launched = []
    real = kernels.launch
    monkeypatch.setattr(kernels, "launch", lambda name, *a: (launched.append(name), real(name, *a)))
    mha = layer(dtype)
    x = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    mask = M.sliding_window(4) if kind == "ring" else M.causal()
    with torch.no_grad():
        full = mha(x, mask=mask)
        got = step_through(mha, x, CACHE_KINDS[kind](2, 16, dtype), [4, 1, 1, 1, 2, 1, 1])
        if dtype == torch.float64:
            assert float((got - full).abs().max()) < 1e-12, kind
        else:
            oracle = layer(torch.float64)(x.double(), mask=mask)
            assert_error_ratio(got, full, oracle, what=kind)
    assert "paged" not in launched
    no_sinks = MultiHeadAttention(32, 4, n_kv_heads=2, dtype=dtype).eval()
    no_sinks.load_state_dict({k: t for k, t in mha.state_dict().items() if k != "sinks"})
    with torch.no_grad():
        assert float((no_sinks(x, mask=mask) - full).abs().max()) > 1e-3     # the sinks change the result


def test_decoder_with_sinks_decodes_as_its_full_forward(monkeypatch):
    """A whole decoder whose every layer has learned sinks (set after construction, as a GPT-OSS import would):
    cached decode == full forward for contiguous and paged caches, and the fused one-launch step steps aside."""
    from qkv import kernels
    from qkv.models import Decoder, DecoderConfig

    config = DecoderConfig.llama(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                                 max_positions=32)
    torch.manual_seed(0)
    model = Decoder(config).eval()
    for i, block in enumerate(model.layers):
        block.self_attn.sinks = torch.nn.Parameter(sinks_for(torch.float32, seed=i))
    launched = []
    real = kernels.launch
    monkeypatch.setattr(kernels, "launch", lambda name, *a: (launched.append(name), real(name, *a)))
    toks = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(2))
    model64 = Decoder(config, dtype=torch.float64).eval()
    for block in model64.layers:
        block.self_attn.sinks = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    model64.load_state_dict({k: t.double() for k, t in model.state_dict().items()})
    with torch.no_grad():
        full, oracle = model(toks), model64(toks)
        for kind in ("contiguous", "paged"):
            cache = model.new_cache(2, kind=kind, max_len=16, **({"block_size": 4} if kind == "paged" else {}))
            got = step_through(model, toks, cache, [3, 1, 1, 1, 1, 1, 1, 1])
            assert_error_ratio(got, full, oracle, what=kind)
    assert "paged" not in launched and "block" not in launched


def test_mha_sinks_are_learned_and_saved():
    mha = layer(torch.float64)
    assert mha.sinks.shape == (4,) and mha.sinks.requires_grad and "sinks" in dict(mha.named_parameters())
    assert "sinks=True" in repr(mha)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    mha(x, causal=True).square().sum().backward()
    assert mha.sinks.grad is not None and bool((mha.sinks.grad != 0).all())
    other = MultiHeadAttention(32, 4, n_kv_heads=2, sinks=True, dtype=torch.float64)
    other.load_state_dict(mha.state_dict())
    assert torch.equal(other.sinks, mha.sinks)
    with torch.no_grad():
        assert torch.equal(other(x, causal=True), mha(x, causal=True))
    with pytest.raises(RuntimeError, match="sinks"):                     # a checkpoint without them does not fit
        other.load_state_dict(MultiHeadAttention(32, 4, n_kv_heads=2, dtype=torch.float64).state_dict())
    assert MultiHeadAttention(32, 4).sinks is None and "sinks" not in MultiHeadAttention(32, 4).state_dict()
    assert Block(32, 4, sinks=True).self_attn.sinks.shape == (4,)


def test_mha_weights_and_capture_include_the_sink():
    from qkv import inspect

    mha = layer(torch.float64)
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    _, w = mha(x, causal=True, return_weights=True)
    assert float(w.detach().sum(-1).max()) < 1.0
    with inspect.capture(mha) as cap:
        mha(x, causal=True)
    captured = cap.maps[cap.maps.names[0]]
    assert torch.allclose(captured.to(w.dtype), w, rtol=0, atol=1e-14)


@pytest.mark.parametrize("bad,exc,pattern", [
    ("yes", TypeError, "sinks must be True or False"),
    (True, ValueError, "attention='linear' has no softmax denominator"),
], ids=["not a bool", "linear attention"])
def test_mha_bad_sinks(bad, exc, pattern):
    with pytest.raises(exc, match=pattern):
        MultiHeadAttention(32, 4, sinks=bad, attention="linear" if bad is True else "exact")
