"""Tests for qkv.models: DecoderConfig (validation, presets, dict round trip) and Decoder (parameters, forward).

Legend: B batch, L tokens, V vocabulary, d d_model, Hq query heads, Hkv key/value heads, D head dim,
W sliding window.

Cached decoding is tested in test_cache.py; here the full forward's own properties: causality,
windows, positions, last_only, and the float32 model against a float64 copy.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import qkv
from qkv.models import Decoder, DecoderConfig
from conftest import assert_error_ratio

F64 = torch.float64
TOL = 1e-10
V = 53


def tiny(arch: str, **kw) -> DecoderConfig:
    base = dict(vocab_size=V, d_model=24, n_layers=2, n_heads=4, ffn_hidden=40, max_positions=32)
    preset = {"gpt2": DecoderConfig.gpt2, "llama": DecoderConfig.llama, "mistral": DecoderConfig.mistral}[arch]
    extra = {} if arch == "gpt2" else {"n_kv_heads": 2, "rope_base": 100.0}
    if arch == "mistral":
        extra["sliding_window"] = 3
    return preset(**{**base, **extra, **kw})


def make_model(config, *, seed=0, dtype=F64) -> Decoder:
    """Random weights big enough that every part of the model shows in the logits."""
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


def diff(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


# -----------------------------------------------------------------------------
# DecoderConfig: validation


def test_config_defaults_fill_in():
    c = DecoderConfig(vocab_size=10, d_model=12, n_layers=1, n_heads=3)
    assert (c.n_kv_heads, c.head_dim, c.ffn_hidden) == (3, 4, 48)
    assert c.windows() == [None]
    c = DecoderConfig(vocab_size=10, d_model=10, n_layers=1, n_heads=4, head_dim=6, positions="rope")
    assert c.head_dim == 6


BAD_CONFIGS = [
    (dict(vocab_size=0), ValueError, "vocab_size"),
    (dict(d_model=-4), ValueError, "d_model"),
    (dict(n_layers=0), ValueError, "n_layers"),
    (dict(n_heads=2.0), TypeError, "n_heads"),
    (dict(n_layers=True), TypeError, "n_layers"),
    (dict(max_positions=0), ValueError, "max_positions"),
    (dict(n_kv_heads=3), ValueError, "must divide n_heads"),
    (dict(n_kv_heads=0), ValueError, "n_kv_heads"),
    (dict(d_model=10), ValueError, "set head_dim"),
    (dict(head_dim=0), ValueError, "head_dim"),
    (dict(ffn_hidden=0), ValueError, "ffn_hidden"),
    (dict(activation="tanh"), ValueError, "activation"),
    (dict(norm="batch"), ValueError, "norm"),
    (dict(positions="alibi"), ValueError, "positions"),
    (dict(positions="rope", head_dim=3), ValueError, "head_dim must be even"),
    (dict(positions="rope", rope_scaling={"type": "yarn", "factor": 2.0}), ValueError, "rope_scaling"),
    (dict(positions="rope", rope_scaling=2.0), ValueError, "rope_scaling"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), ValueError, "positions is not 'rope'"),
    (dict(sliding_window=0), ValueError, "sliding_window"),
    (dict(sliding_window=2.5), TypeError, "sliding_window"),
    (dict(layer_windows=[4]), ValueError, "layer_windows has 1 entries"),
    (dict(layer_windows=[4, 0]), ValueError, "layer_windows entry"),
]


@pytest.mark.parametrize("overrides,exc,match", BAD_CONFIGS, ids=[str(i) for i in range(len(BAD_CONFIGS))])
def test_config_rejects_bad_fields(overrides, exc, match):
    base = dict(vocab_size=10, d_model=16, n_layers=2, n_heads=4)
    with pytest.raises(exc, match=match):
        DecoderConfig(**{**base, **overrides})


def test_config_rejects_incomplete_llama3_scaling():
    with pytest.raises(ValueError, match="original_max_positions"):
        cfg = tiny("llama", rope_scaling={"type": "llama3", "factor": 8.0})
        Decoder(cfg)


def test_windows():
    assert tiny("mistral").windows() == [3, 3]
    assert tiny("llama").windows() == [None, None]
    mixed = tiny("mistral", sliding_window=None, layer_windows=(2, None))
    assert mixed.layer_windows == [2, None] and mixed.windows() == [2, None]
    # layer_windows wins over sliding_window
    assert tiny("mistral", layer_windows=[None, 5]).windows() == [None, 5]
    ws = mixed.windows()
    ws[0] = 99
    assert mixed.windows() == [2, None]                               # a copy


# -----------------------------------------------------------------------------
# presets and serialisation


def test_presets():
    g = DecoderConfig.gpt2()
    assert (g.vocab_size, g.d_model, g.n_layers, g.n_heads, g.n_kv_heads, g.head_dim, g.ffn_hidden) == \
        (50257, 768, 12, 12, 12, 64, 3072)
    assert (g.activation, g.norm, g.bias, g.positions, g.max_positions, g.tie_embeddings, g.arch) == \
        ("gelu_tanh", "layer", True, "learned", 1024, True, "gpt2")
    assert g.windows() == [None] * 12
    ll = DecoderConfig.llama()
    assert (ll.activation, ll.norm, ll.bias, ll.positions, ll.tie_embeddings, ll.arch) == \
        ("swiglu", "rms", False, "rope", False, "llama")
    assert ll.n_heads % ll.n_kv_heads == 0 and ll.n_kv_heads < ll.n_heads
    assert ll.sliding_window is None and ll.rope_scaling is None
    m = DecoderConfig.mistral()
    assert m.arch == "mistral" and m.positions == "rope" and m.sliding_window is not None
    assert m.windows() == [m.sliding_window] * m.n_layers and m.n_kv_heads < m.n_heads
    # overrides win over the preset, and are validated
    small = DecoderConfig.gpt2(n_layers=2, d_model=64, n_heads=4)
    assert (small.n_layers, small.head_dim, small.arch, small.positions) == (2, 16, "gpt2", "learned")
    assert DecoderConfig.llama(n_kv_heads=1).n_kv_heads == 1
    with pytest.raises(ValueError):
        DecoderConfig.llama(n_kv_heads=3)


@pytest.mark.parametrize("config", [
    DecoderConfig.gpt2(n_layers=2),
    DecoderConfig.llama(rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_positions": 512}),
    DecoderConfig.mistral(n_layers=3, layer_windows=[16, None, 8], head_dim=32),
], ids=["gpt2", "llama", "mistral"])
def test_config_dict_round_trip(config):
    d = config.to_dict()
    assert DecoderConfig.from_dict(d) == config
    assert DecoderConfig.from_dict(json.loads(json.dumps(d))) == config       # JSON-safe
    assert set(d) == {f for f in DecoderConfig.__dataclass_fields__}
    # the dict is a copy: editing it leaves the config alone
    if d["rope_scaling"] is not None:
        d["rope_scaling"]["factor"] = 99.0
        assert config.rope_scaling["factor"] != 99.0
    if d["layer_windows"] is not None:
        d["layer_windows"][0] = 1
        assert config.layer_windows[0] != 1


def test_from_dict_unknown_and_invalid_fields():
    d = DecoderConfig.gpt2(n_layers=1).to_dict()
    with pytest.raises(ValueError, match=r"unknown DecoderConfig field\(s\) \['n_embd'\]"):
        DecoderConfig.from_dict({**d, "n_embd": 768})
    with pytest.raises(ValueError, match="n_kv_heads"):
        DecoderConfig.from_dict({**d, "n_kv_heads": 5})
    with pytest.raises(TypeError):
        DecoderConfig.from_dict({k: v for k, v in d.items() if k != "vocab_size"})


# -----------------------------------------------------------------------------
# Decoder: parameters


def names_of(model):
    return {k: tuple(p.shape) for k, p in model.named_parameters()}


def test_gpt2_parameter_names_and_shapes():
    c = tiny("gpt2")
    model = Decoder(c)
    d, F, P = c.d_model, c.ffn_hidden, c.max_positions
    expected = {"embed.weight": (V, d), "pos_embed.weight": (P, d), "norm.weight": (d,), "norm.bias": (d,)}
    for i in range(c.n_layers):
        pre = f"layers.{i}."
        for n in ("norm1", "norm2"):
            expected[pre + n + ".weight"] = expected[pre + n + ".bias"] = (d,)
        for proj in "qkvo":
            expected[f"{pre}self_attn.{proj}_proj.weight"] = (d, d)
            expected[f"{pre}self_attn.{proj}_proj.bias"] = (d,)
        expected.update({pre + "ffn.fc1.weight": (F, d), pre + "ffn.fc1.bias": (F,),
                         pre + "ffn.fc2.weight": (d, F), pre + "ffn.fc2.bias": (d,)})
    assert names_of(model) == expected
    assert model.lm_head is None and model.head_weight is model.embed.weight
    assert isinstance(model.norm, torch.nn.LayerNorm) and model.rope is None


def test_llama_parameter_names_and_shapes():
    c = tiny("llama")
    model = Decoder(c)
    d, F, D = c.d_model, c.ffn_hidden, c.head_dim
    expected = {"embed.weight": (V, d), "norm.weight": (d,), "lm_head.weight": (V, d)}
    for i in range(c.n_layers):
        pre = f"layers.{i}."
        expected.update({pre + "norm1.weight": (d,), pre + "norm2.weight": (d,),
                         pre + "self_attn.q_proj.weight": (4 * D, d), pre + "self_attn.k_proj.weight": (2 * D, d),
                         pre + "self_attn.v_proj.weight": (2 * D, d), pre + "self_attn.o_proj.weight": (d, 4 * D),
                         pre + "ffn.gate_proj.weight": (F, d), pre + "ffn.up_proj.weight": (F, d),
                         pre + "ffn.down_proj.weight": (d, F)})
    assert names_of(model) == expected
    assert model.pos_embed is None and model.head_weight is model.lm_head.weight
    assert model.rope is not None and all(b.self_attn.rope is model.rope for b in model.layers)
    # no persistent buffers: a state dict holds the parameters only
    assert set(model.state_dict()) == set(expected)


def test_tied_and_untied_heads():
    tied = Decoder(tiny("llama", tie_embeddings=True))
    assert "lm_head.weight" not in names_of(tied) and tied.head_weight is tied.embed.weight
    untied = Decoder(tiny("gpt2", tie_embeddings=False))
    assert names_of(untied)["lm_head.weight"] == (V, 24) and untied.head_weight is untied.lm_head.weight
    assert untied.lm_head.bias is None
    # tying really shares: the logits move with the embedding
    model = make_model(tiny("gpt2"))
    toks = tokens(1, 4)
    with torch.no_grad():
        before = model(toks)
        model.embed.weight[toks[0, -1]] += 1.0
        assert diff(model(toks), before) > 1e-3


def test_custom_head_dim_and_bias_switch():
    c = DecoderConfig(vocab_size=V, d_model=20, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=6, positions="rope",
                      norm="rms", activation="swiglu", bias=True, tie_embeddings=False)
    names = names_of(Decoder(c))
    assert names["layers.0.self_attn.q_proj.weight"] == (24, 20)
    assert names["layers.0.self_attn.k_proj.bias"] == (12,)
    assert names["layers.0.self_attn.o_proj.weight"] == (20, 24)
    assert names["layers.0.ffn.gate_proj.bias"] == (80,)
    assert "layers.0.norm1.bias" not in names                        # rms norm has no bias


def test_reset_parameters_gpt2_init():
    torch.manual_seed(0)
    c = DecoderConfig.gpt2(vocab_size=500, d_model=64, n_layers=4, n_heads=4, max_positions=64)
    model = Decoder(c)
    p = {k: t.detach() for k, t in model.named_parameters()}
    assert all(torch.equal(t, torch.ones_like(t)) for k, t in p.items() if "norm" in k and k.endswith("weight"))
    assert all(torch.equal(t, torch.zeros_like(t)) for k, t in p.items() if k.endswith("bias"))
    assert abs(float(p["embed.weight"].std()) - 0.02) < 0.002
    resid = float(p["layers.0.self_attn.o_proj.weight"].std())
    assert abs(resid - 0.02 / (2 * 4) ** 0.5) < 0.002
    assert abs(float(p["layers.0.ffn.fc2.weight"].std()) - 0.02 / 8 ** 0.5) < 0.001


def test_constructor_arguments():
    with pytest.raises(TypeError, match="DecoderConfig"):
        Decoder(tiny("gpt2").to_dict())
    m = Decoder(tiny("mistral"), dtype=F64)
    assert all(p.dtype == F64 for p in m.parameters())
    assert m.new_cache(1, max_len=4).layers[0].k.dtype == F64
    assert m.new_cache(1, kind="paged", max_len=4).layers[0].k.dtype == F64
    assert m.windows == [3, 3]
    assert "arch='mistral'" in repr(m)


# -----------------------------------------------------------------------------
# Decoder: forward


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mistral"])
def test_forward_shapes_and_last_only(arch):
    model = make_model(tiny(arch))
    toks = tokens(3, 9, seed=1)
    with torch.no_grad():
        full = model(toks)
        last = model(toks, last_only=True)
        h = model.hidden(toks)
    assert full.shape == (3, 9, V) and full.dtype == F64 and last.shape == (3, 1, V)
    assert torch.equal(last[:, 0], full[:, -1]) or diff(last[:, 0], full[:, -1]) < 1e-13
    assert h.shape == (3, 9, 24)
    assert diff(full, h @ model.head_weight.T) < 1e-12
    assert torch.isfinite(full).all()
    # int32 tokens give the same logits
    with torch.no_grad():
        assert torch.equal(model(toks.to(torch.int32)), full)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mistral"])
def test_forward_is_causal_and_batch_independent(arch):
    model = make_model(tiny(arch))
    toks = tokens(2, 10, seed=2)
    changed = toks.clone()
    changed[:, 6] = (changed[:, 6] + 1) % V
    with torch.no_grad():
        a, b = model(toks), model(changed)
        one = model(toks[1:])
    assert diff(a[:, :6], b[:, :6]) < TOL and diff(a[:, 6:], b[:, 6:]) > 1e-3
    assert diff(a[1:], one) < 1e-12


def test_sliding_window_changes_only_positions_beyond_it():
    """Mistral with window W equals Llama with the same weights up to position W - 1, and differs after."""
    mistral = make_model(tiny("mistral"), seed=3)
    llama = Decoder(tiny("llama"), dtype=F64).eval()
    llama.load_state_dict(mistral.state_dict())
    toks = tokens(1, 12, seed=3)
    with torch.no_grad():
        a, b = mistral(toks), llama(toks)
    W = 3
    assert diff(a[:, :W], b[:, :W]) < TOL and diff(a[:, W:], b[:, W:]) > 1e-3
    # a window at least the sequence length is no window at all
    wide = Decoder(tiny("mistral", sliding_window=12), dtype=F64).eval()
    wide.load_state_dict(mistral.state_dict())
    with torch.no_grad():
        assert diff(wide(toks), b) < TOL
    # a per-layer mix: only the windowed layer differs from llama
    mixed = Decoder(tiny("mistral", sliding_window=None, layer_windows=[None, 3]), dtype=F64).eval()
    mixed.load_state_dict(mistral.state_dict())
    with torch.no_grad():
        m = mixed(toks)
    assert diff(m[:, :W], b[:, :W]) < TOL and diff(m[:, W:], b[:, W:]) > 1e-4 and diff(m[:, W:], a[:, W:]) > 1e-4


def test_sliding_window_forward_matches_explicit_masks():
    model = make_model(tiny("mistral", sliding_window=None, layer_windows=[2, None]), seed=4)
    toks = tokens(2, 9, seed=4)
    pos = torch.arange(9)
    with torch.no_grad():
        h = model.embed(toks)
        h = model.layers[0](h, mask=qkv.masks.sliding_window(2), positions=pos)
        h = model.layers[1](h, mask=qkv.masks.causal(), positions=pos)
        expected = model.norm(h) @ model.lm_head.weight.T
        assert diff(model(toks), expected) < 1e-12


def test_positions_argument():
    for arch in ("gpt2", "llama"):
        model = make_model(tiny(arch), seed=5)
        toks = tokens(2, 6, seed=5)
        with torch.no_grad():
            base = model(toks)
            assert diff(model(toks, positions=torch.arange(6)), base) < 1e-13
            assert diff(model(toks, positions=torch.arange(6).expand(2, 6)), base) < 1e-13
            shifted = model(toks, positions=torch.arange(6) + 5)
        if arch == "gpt2":                            # learned positions: the table row matters
            assert diff(shifted, base) > 1e-3
        else:                                         # RoPE: only relative positions matter
            assert diff(shifted, base) < 1e-10
    # per-row positions: row 1 shifted by 3 equals row 1 computed alone with that shift
    model = make_model(tiny("gpt2"), seed=5)
    toks = tokens(2, 6, seed=6)
    pos = torch.stack([torch.arange(6), torch.arange(6) + 3])
    with torch.no_grad():
        both = model(toks, positions=pos)
        alone = model(toks[1:], positions=torch.arange(6) + 3)
    assert diff(both[1:], alone) < 1e-12


def test_llama3_rope_scaling_is_wired():
    scaling = {"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_positions": 8}
    scaled = make_model(tiny("llama", head_dim=8, d_model=32, rope_scaling=scaling), seed=6)
    assert scaled.rope.scaling == "llama3" and scaled.rope.factor == 4.0
    plain = Decoder(tiny("llama", head_dim=8, d_model=32), dtype=F64).eval()
    plain.load_state_dict(scaled.state_dict())
    assert plain.rope.scaling is None
    toks = tokens(1, 16, seed=6)
    with torch.no_grad():
        assert diff(scaled(toks), plain(toks)) > 1e-4
    lin = Decoder(tiny("llama", rope_scaling={"type": "linear", "factor": 2.0}))
    assert lin.rope.scaling == "linear" and lin.rope.factor == 2.0


def test_forward_input_errors():
    model = make_model(tiny("gpt2"))
    with torch.no_grad():
        for bad in (torch.zeros(4, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long),
                    torch.zeros(1, 3), [[1, 2]]):
            with pytest.raises(ValueError, match=r"integer tensor \(B, L\)"):
                model(bad)
        with pytest.raises(ValueError, match=r"\[0, vocab_size=53\)"):
            model(torch.tensor([[1, V]]))
        with pytest.raises(ValueError, match="vocab_size"):
            model(torch.tensor([[-1, 2]]))
        with pytest.raises(ValueError, match="position 32 is beyond the model's context of 32"):
            model(tokens(1, 33))
        with pytest.raises(ValueError, match="beyond"):
            model(tokens(1, 2), positions=torch.tensor([30, 32]))
        assert model(tokens(1, 32)).shape == (1, 32, V)                    # exactly the context fits
    rope = make_model(tiny("llama"))
    with torch.no_grad(), pytest.raises(ValueError, match="beyond"):
        rope(tokens(1, 33))


# -----------------------------------------------------------------------------
# float32 model: the cached decode as accurate as the float32 full forward


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mistral"])
def test_fp32_against_float64_copy(arch):
    model64 = make_model(tiny(arch), seed=7)
    model32 = copy.deepcopy(model64).float()
    assert all(p.dtype == torch.float32 for p in model32.parameters())
    toks = tokens(2, 12, seed=7)
    with torch.no_grad():
        oracle = model64(toks)
        full32 = model32(toks)
        assert_error_ratio(full32, full32, oracle, what="full forward vs itself")       # sanity: floor holds
        assert diff(full32, oracle) < 1e-4                                               # float32 is close
        for kind in ("contiguous", "paged"):
            cache = model32.new_cache(2, kind=kind, max_len=16, block_size=4)
            outs = [model32(toks[:, :5], cache=cache)] + [model32(toks[:, t:t + 1], cache=cache)
                                                             for t in range(5, 12)]
            got = torch.cat(outs, dim=1)
            assert got.dtype == torch.float32
            assert_error_ratio(got, full32, oracle, what=f"{arch} {kind} cached decode")
            last = model32(toks[:, :1], cache=model32.new_cache(2, kind=kind, max_len=4), last_only=True)
            assert_error_ratio(last, full32[:, :1], oracle[:, :1], what="last_only")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_greedy_sample_is_torch_argmax_ties_and_nan_included(dtype):
    from qkv.generate import sample

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1000, generator=g).to(dtype)
    logits[1, [10, 500]] = 50.0                                     # a tie: the first index wins
    logits[2, [7, 900]] = float("nan")                              # NaN: the first NaN wins, as in torch
    logits[3] = 0.0
    logits[4, -1] = float("inf")
    for rows in (logits, logits[:, ::2], logits[3:4]):              # strided and single-row views too
        got = sample(rows)
        assert got.dtype == torch.int64 and torch.equal(got, rows.argmax(-1))
