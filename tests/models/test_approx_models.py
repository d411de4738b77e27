"""Whole models with approximate attention: DecoderConfig(attention=...), Block(attention=...), Decoder.

Legend: B batch, L tokens, V vocabulary, d d_model, D head dim.

A Decoder with attention="linear" or "performer" must be a causal language model
like the exact one: causal, trainable, decodable from its constant-size
`LinearStateCache` with the same logits as the full forward, and refused where it
has no meaning (HF export, sliding windows, paged caches, masks).
"""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.backends.linear import Performer
from qkv.cache import LinearStateCache
from qkv.generate import generate
from qkv.layers import Block
from qkv.models import Decoder, DecoderConfig
from qkv.models import hf
from qkv.train import fit, lm_loss

F64 = torch.float64
V = 41
APPROX = ("linear", "performer")


def tiny(attention: str, positions: str = "learned", **kw) -> DecoderConfig:
    base = dict(vocab_size=V, d_model=24, n_layers=2, n_heads=4, ffn_hidden=40, max_positions=48, attention=attention)
    if positions == "rope":
        return DecoderConfig.llama(**{**base, "n_kv_heads": 2, "rope_base": 100.0, **kw})
    return DecoderConfig.gpt2(**{**base, **kw})


def make_model(config, *, seed=0, dtype=F64) -> Decoder:
    """Random weights large enough that attention shows in the logits."""
    model = Decoder(config, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=F64)
            p.copy_(1 + 0.1 * noise if (p.dim() == 1 and "norm" in name and name.endswith("weight"))
                    else 0.25 * noise)
    return model.eval()


def tokens(B, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, L), generator=g)


def rel(a, b) -> float:
    """max |a - b| / max |b|."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# -----------------------------------------------------------------------------
# Config and layers


def test_config_default_round_trip_and_refusals():
    assert tiny("exact").attention == "exact"
    assert DecoderConfig(vocab_size=5, d_model=8, n_layers=1, n_heads=2).attention == "exact"
    for kind in APPROX:
        c = tiny(kind, positions="rope")
        d = c.to_dict()
        assert d["attention"] == kind
        assert DecoderConfig.from_dict(d) == c
    for bad in ("flash", "Linear", "", None, 1):
        with pytest.raises(ValueError, match="attention must be one of 'exact', 'linear', 'performer'"):
            tiny(bad)
    with pytest.raises(ValueError, match="cannot apply a sliding window"):
        tiny("linear", positions="rope", sliding_window=8)
    with pytest.raises(ValueError, match="cannot apply a sliding window"):
        tiny("performer", layer_windows=[None, 4])
    tiny("exact", layer_windows=[None, 4])                     # exact attention keeps its windows


def test_block_passes_the_choice_to_self_attention_only():
    b = Block(16, 2, attention="linear", dropout=0.25)
    assert b.self_attn.attention == "linear" and b.self_attn.backend == "linear"
    assert b.self_attn.dropout == 0.0 and b.drop.p == 0.25    # no weights to drop; residual dropout stays
    fm = Performer(32, seed=3)
    b = Block(16, 2, attention=fm, cross_attention=True)
    assert b.self_attn.feature_map is fm and b.cross_attn.attention == "exact"
    assert Block(16, 2, dropout=0.25).self_attn.dropout == 0.25
    x = torch.randn(1, 5, 16)
    assert b(x, context=torch.randn(1, 3, 16), causal=True).shape == (1, 5, 16)
    with pytest.raises(ValueError, match="attention must be one of"):
        Block(16, 2, attention="sparse")
    with pytest.raises(ValueError, match="alibi=False"):
        Block(16, 2, attention="linear", alibi=True)


def test_decoder_builds_its_layers_with_the_choice():
    m = Decoder(tiny("performer"))
    fms = [blk.self_attn.feature_map for blk in m.layers]
    assert all(isinstance(f, Performer) for f in fms) and [f.seed for f in fms] == [0, 1]
    assert all(blk.self_attn.attention == "linear" for blk in Decoder(tiny("linear")).layers)
    assert all(blk.self_attn.attention == "exact" for blk in Decoder(tiny("exact")).layers)
    with pytest.raises(ValueError, match="backend='auto'"):
        Decoder(tiny("linear"), backend="sdpa")


# -----------------------------------------------------------------------------
# Forward: runs, differs from exact, causal


@pytest.mark.parametrize("kind", APPROX)
@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_forward_is_causal_and_not_softmax(kind, positions):
    model = make_model(tiny(kind, positions))
    exact = make_model(tiny("exact", positions))                # the same weights (same seed, same names)
    toks = tokens(2, 12, seed=1)
    changed = toks.clone()
    changed[:, 7] = (changed[:, 7] + 1) % V
    with torch.no_grad():
        a, b = model(toks), model(changed)
        e = exact(toks)
    assert a.shape == (2, 12, V) and torch.isfinite(a).all()
    assert rel(a[:, :7], b[:, :7]) < 1e-12                      # earlier positions never see token 7
    assert rel(a[:, 7:], b[:, 7:]) > 1e-3
    assert rel(a, e) > 1e-3                                     # really another attention
    assert rel(a[:, :1], e[:, :1]) < 1e-12                      # ... except at position 0 (one key: weight 1)


# -----------------------------------------------------------------------------
# Cached decoding: a constant-size state, the same logits as the full forward


@pytest.mark.parametrize("kind", APPROX)
@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_cached_decode_equals_full_forward_at_every_step(kind, positions):
    model = make_model(tiny(kind, positions), seed=2)
    toks = tokens(2, 20, seed=3)
    with torch.no_grad():
        full = model(toks)                                      # (B, L, V)
        cache = model.new_cache(2)
        assert all(isinstance(layer, LinearStateCache) for layer in cache.layers)
        assert [layer.S.dtype for layer in cache.layers] == [F64, F64]
        nbytes = cache.nbytes
        prefill = model(toks[:, :6], cache=cache)               # a prompt of 6 in one call
        assert rel(prefill, full[:, :6]) < 1e-12
        for i in range(6, 20):                                  # then one token per step
            step = model(toks[:, i:i + 1], cache=cache)
            assert rel(step[:, 0], full[:, i]) < 1e-12, f"step {i}"
        assert cache.nbytes == nbytes                           # the state did not grow
        assert cache.lengths.tolist() == [20, 20]


@pytest.mark.parametrize("kind", APPROX)
def test_ragged_rows_decode_independently(kind):
    model = make_model(tiny(kind), seed=4)
    a, b = tokens(1, 9, seed=5), tokens(1, 4, seed=6)
    with torch.no_grad():
        cache = model.new_cache(2)
        model(a, cache=cache.row(0))
        model(b, cache=cache.row(1))
        nxt = torch.tensor([[3], [5]])
        step = model(nxt, cache=cache)[:, 0]                    # row 0 at position 9, row 1 at 4
        ref0 = model(torch.cat([a, nxt[:1]], 1))[:, -1]
        ref1 = model(torch.cat([b, nxt[1:]], 1))[:, -1]
    assert rel(step[0], ref0[0]) < 1e-12 and rel(step[1], ref1[0]) < 1e-12


@pytest.mark.parametrize("kind", APPROX)
def test_generate_decodes_from_the_state(kind):
    model = make_model(tiny(kind, "rope"), seed=7, dtype=torch.float32)
    prompt = [1, 2, 3, 4]
    out = generate(model, prompt, max_new_tokens=6)
    # greedy reference without a cache: a full forward per new token
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(prompt):]
    batch = generate(model, [[1, 2, 3], [4, 5, 6, 7, 8]], max_new_tokens=3, temperature=0.8, seed=0)
    assert [len(x) for x in batch] == [3, 3]
    with pytest.raises(ValueError, match="kind='contiguous'"):
        generate(model, prompt, max_new_tokens=2, cache="paged")


def test_new_cache_for_exact_models_is_unchanged():
    cache = make_model(tiny("exact")).new_cache(1, max_len=16)
    assert not any(isinstance(layer, LinearStateCache) for layer in cache.layers)


# -----------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("kind", APPROX)
def test_training_reduces_the_loss(kind):
    torch.manual_seed(0)
    model = Decoder(tiny(kind))
    g = torch.Generator().manual_seed(0)
    period = torch.randint(0, V, (8,), generator=g)             # a repeating pattern: learnable in context

    def next_batch(step):
        start = torch.randint(0, 8, (4,), generator=g)
        idx = (start[:, None] + torch.arange(25)) % 8           # (B, T + 1)
        return period[idx]

    hist = fit(model, next_batch, steps=25, lr=1e-2, warmup=3, loss_fn=lm_loss)
    first, last = sum(hist.loss[:3]) / 3, sum(hist.loss[-3:]) / 3
    assert last < 0.7 * first, (first, last)


# -----------------------------------------------------------------------------
# Sparse masks through forward(mask=), and what approximate models refuse


def test_forward_mask_is_anded_with_causal():
    model = make_model(tiny("exact"), seed=8)
    toks = tokens(1, 16, seed=9)
    changed = toks.clone()
    changed[:, 10] = (changed[:, 10] + 1) % V
    with torch.no_grad():
        plain = model(toks)
        assert rel(model(toks, mask=qkv.masks.causal()), plain) < 1e-14
        lf = qkv.masks.longformer(3, global_tokens=[0])          # symmetric: would see the future alone
        a, b = model(toks, mask=lf), model(changed, mask=lf)
        assert rel(a[:, :10], b[:, :10]) < 1e-12 and rel(a[:, 10:], b[:, 10:]) > 1e-3
        assert rel(a, plain) > 1e-3
        # a window as a mask equals the model with that window in its config
        windowed = make_model(tiny("exact", positions="rope", sliding_window=4), seed=8)
        rope = make_model(tiny("exact", positions="rope"), seed=8)
        assert rel(rope(toks, mask=qkv.masks.sliding_window(4)), windowed(toks)) < 1e-12
        bb = model(toks, mask=qkv.masks.bigbird(4, window_blocks=1, global_blocks=1))
        assert torch.isfinite(bb).all() and rel(bb, plain) > 1e-3


def test_masks_and_export_are_refused_for_approximate_models(tmp_path):
    model = make_model(tiny("linear"))
    toks = tokens(1, 8)
    with pytest.raises(ValueError, match="attention='exact' for sparse masks"):
        model(toks, mask=qkv.masks.longformer(3))
    exact = make_model(tiny("exact"))
    with pytest.raises(ValueError, match="run without cache="):
        exact(toks, cache=exact.new_cache(1, max_len=16), mask=qkv.masks.causal())
    for kind in APPROX:
        with pytest.raises(ValueError, match="no Hugging Face equivalent: attention='%s' is approximate" % kind):
            hf.config_to_hf(tiny(kind))
    with pytest.raises(ValueError, match="silently compute something else"):
        hf.save(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()                   # refused before anything is written
    assert hf.config_to_hf(tiny("exact"))["model_type"] == "gpt2"
