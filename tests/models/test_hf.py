"""Hugging Face checkpoint import (`qkv.models.hf`): parity with `transformers`, and bad inputs.

Legend: B batch, L tokens, V vocabulary.

Each case builds a tiny transformers model with random weights (scaled up from the
default 0.02 init so that attention, norms and positions all shape the logits),
saves it with `save_pretrained` (safetensors; one case sharded) and loads it with
`qkv.models.hf.load`. Logits follow the error-ratio rule: the float64 oracle is
the transformers model in float64, the baseline the transformers model in float32.
transformers' Llama/Mistral code keeps three steps in float32 even in a float64
model: RoPE angles, the RMSNorm statistic and the eager-attention softmax. The
oracle upgrades them (`_float64_oracle`): float64 RoPE (its frequencies checked
against transformers' own to float32 rounding), float64 RMSNorm, sdpa attention.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import EPS, max_err  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import qkv  # noqa: E402
import qkv.generate  # noqa: E402
from qkv.models import Decoder, DecoderConfig  # noqa: E402
from qkv.models import hf as hf_import  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: extra threads only add synchronisation (and, on a busy
    machine, make every small matmul wait for a core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


NO_SPECIAL = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  attn_implementation="eager", **NO_SPECIAL)
    return cfg, transformers.GPT2LMHeadModel


def _llama_linear():
    # biases on (attention_bias = mlp_bias = true), linear RoPE scaling, GQA 4 / 2
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rms_norm_eps=1e-5, attention_bias=True, mlp_bias=True,
                                   rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
                                   attn_implementation="eager", **NO_SPECIAL)
    return cfg, transformers.LlamaForCausalLM


def _llama3_tied():
    # llama3 RoPE whose three frequency bands are all populated at head_dim 12
    # (wavelengths 6.3 < 32/4, 29 between, 136+ > 32/1), tied embeddings, saved sharded
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True,
                                   rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
                                                    "rope_theta": 10000.0},
                                   attn_implementation="eager", **NO_SPECIAL)
    return cfg, transformers.LlamaForCausalLM


def _mistral():
    # MQA (1 kv head), head_dim 16 != hidden / heads = 8, window 8 < the 40-token test sequence
    cfg = transformers.MistralConfig(vocab_size=113, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=8,
                                     max_position_embeddings=128, attn_implementation="eager", **NO_SPECIAL)
    return cfg, transformers.MistralForCausalLM


CASES = {"gpt2": _gpt2, "llama-linear-bias": _llama_linear, "llama3-tied-sharded": _llama3_tied,
         "mistral-window": _mistral}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """O(1) logits and non-uniform attention: matrices N(0, 0.3^2) (embeddings 0.5),
    norm weights 1 + N(0, 0.2^2), biases N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if p.dim() >= 2:
                std = 0.5 if ("wte" in name or "wpe" in name or "embed" in name) else 0.3
                p.copy_(std * r)
            elif "ln" in name or "norm" in name:
                p.copy_(1.0 + 0.2 * r) if name.endswith("weight") else p.copy_(0.1 * r)
            else:
                p.copy_(0.1 * r)


def _hf_inv_freq64(cfg) -> torch.Tensor:
    """transformers' RoPE frequencies (default / linear / llama3), computed in float64."""
    rp = cfg.rope_parameters
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    inv = 1.0 / rp["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    kind = rp["rope_type"]
    if kind == "linear":
        inv = inv / rp["factor"]
    elif kind == "llama3":
        f, lo, hi, old = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"], \
            rp["original_max_position_embeddings"]
        wl = 2 * math.pi / inv
        smooth = (old / wl - lo) / (hi - lo)
        blended = (1 - smooth) * inv / f + smooth * inv
        inv = torch.where(wl > old / lo, inv / f, torch.where(wl < old / hi, inv, blended))
    else:
        assert kind == "default"
    return inv


def _exact_rope(hf64) -> None:
    """Make a float64 transformers Llama/Mistral compute its RoPE angles in float64."""
    rot = hf64.model.rotary_emb
    inv64 = _hf_inv_freq64(hf64.config)
    # the formula above is transformers' own: it agrees with its float32 buffer to rounding
    torch.testing.assert_close(inv64.float(), rot.inv_freq.float(), rtol=1e-6, atol=0)

    def forward(x, position_ids):
        freqs = position_ids[..., None].to(torch.float64) * inv64        # (B, L, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)                            # (B, L, D)
        return (emb.cos() * rot.attention_scaling).to(x.dtype), (emb.sin() * rot.attention_scaling).to(x.dtype)

    rot.forward = forward


def _rms_norm64(norm) -> None:
    def forward(x):
        return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))

    norm.forward = forward


def _float64_oracle(hf32):
    hf64 = copy.deepcopy(hf32).double()
    if isinstance(hf32, transformers.GPT2LMHeadModel):
        return hf64                                   # GPT-2's eager path is float64 throughout
    hf64.set_attn_implementation("sdpa")              # eager's softmax is float32; sdpa keeps float64
    _exact_rope(hf64)
    norms = [m for m in hf64.modules() if type(m).__name__.endswith("RMSNorm")]
    assert len(norms) == 2 * hf32.config.num_hidden_layers + 1
    for m in norms:
        _rms_norm64(m)
    return hf64


_BUILT: dict[str, SimpleNamespace] = {}


def _build(name, tmp_path_factory) -> SimpleNamespace:
    """One case, built once: the float32 and float64 transformers models, the saved
    directory and the qkv model loaded from it."""
    if name not in _BUILT:
        _BUILT[name] = _make_case(name, tmp_path_factory)
    return _BUILT[name]


def _make_case(name, tmp_path_factory):
    torch.manual_seed(0)
    cfg, cls = CASES[name]()
    hf32 = cls(cfg).eval()
    _randomize(hf32, seed=len(name))
    directory = tmp_path_factory.mktemp(name)
    hf32.save_pretrained(directory, **({"max_shard_size": "30KB"} if "sharded" in name else {}))
    hf64 = _float64_oracle(hf32)
    return SimpleNamespace(name=name, dir=directory, hf32=hf32, hf64=hf64, model=hf_import.load(directory),
                           vocab=cfg.vocab_size)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    return _build(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def gpt2_case(tmp_path_factory):
    return _build("gpt2", tmp_path_factory)


@pytest.fixture(scope="module")
def mistral_case(tmp_path_factory):
    return _build("mistral-window", tmp_path_factory)


@pytest.fixture(scope="module")
def sharded_case(tmp_path_factory):
    return _build("llama3-tied-sharded", tmp_path_factory)


def _assert_parity(cand, base, oracle, what):
    """qkv's error <= 2 x transformers' float32 error + 1 ulp at the logits' scale,
    or (fallback) a max error <= 1e-4 relative to the largest logit."""
    err_c, err_b = max_err(cand, oracle), max_err(base, oracle)
    scale = max(1.0, float(oracle.abs().max()))
    assert err_c <= 2.0 * err_b + EPS[torch.float32] * scale or err_c <= 1e-4 * scale, (
        f"{what}: qkv error {err_c:.3e} vs transformers float32 {err_b:.3e} (max |logit| {scale:.2f})")


def _tokens(vocab, *shape, seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# Parity


def test_config_and_files(case):
    c = case.model.config
    hc = case.hf32.config
    assert isinstance(case.model, Decoder) and not case.model.training
    assert c.vocab_size == case.vocab and c.n_layers == 2
    assert case.model.embed.weight.dtype == torch.float32
    if case.name == "gpt2":
        assert (c.arch, c.positions, c.activation, c.tie_embeddings) == ("gpt2", "learned", "gelu_tanh", True)
    else:
        assert (c.positions, c.activation, c.n_kv_heads) == ("rope", "swiglu", hc.num_key_value_heads)
        assert c.head_dim == hc.head_dim
    if case.name == "llama-linear-bias":
        assert c.bias and c.rope_scaling == {"type": "linear", "factor": 2.0} and c.rope_base == 500.0
    if case.name == "llama3-tied-sharded":
        assert c.tie_embeddings and case.model.lm_head is None
        assert c.rope_scaling == {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_positions": 32}
        shards = sorted(case.dir.glob("model-*.safetensors"))
        assert len(shards) > 1 and (case.dir / "model.safetensors.index.json").is_file()
        assert not (case.dir / "model.safetensors").exists()
    if case.name == "mistral-window":
        assert c.sliding_window == 8 and case.model.windows == [8, 8] and c.head_dim == 16


def test_logits_match(case):
    tokens = _tokens(case.vocab, 3, 40, seed=1)                             # (B, L)
    with torch.no_grad():
        cand = case.model(tokens)                                           # (B, L, V)
        base = case.hf32(tokens).logits
        oracle = case.hf64(tokens).logits
    assert cand.shape == (3, 40, case.vocab)
    _assert_parity(cand, base, oracle, f"{case.name} logits")


def test_load_in_float64_matches_oracle(case):
    model = hf_import.load(case.dir, dtype=torch.float64)
    assert model.embed.weight.dtype == torch.float64
    tokens = _tokens(case.vocab, 2, 24, seed=2)
    with torch.no_grad():
        got, want = model(tokens), case.hf64(tokens).logits
    # both float64: only float64 rounding separates them
    assert max_err(got, want) <= 1e-10 * max(1.0, float(want.abs().max()))


def test_ragged_prefill_and_decode(case):
    """Prompts of different lengths, each prefilled into its own cache row, then one
    batched decode step, against transformers run on each prompt alone."""
    lengths = [40, 23, 11]
    prompts = [_tokens(case.vocab, n, seed=10 + n) for n in lengths]
    nxt = _tokens(case.vocab, len(lengths), 1, seed=3)                      # (B, 1)
    cache = case.model.new_cache(len(lengths), max_len=64)
    with torch.no_grad():
        for b, p in enumerate(prompts):
            cand = case.model(p[None], cache=cache.row(b))                  # (1, L_b, V)
            full = torch.cat([p, nxt[b]])[None]
            base, oracle = case.hf32(full).logits, case.hf64(full).logits   # (1, L_b + 1, V)
            _assert_parity(cand, base[:, :-1], oracle[:, :-1], f"{case.name} ragged prefill row {b}")
        step = case.model(nxt, cache=cache)                                 # (B, 1, V)
        for b, p in enumerate(prompts):
            full = torch.cat([p, nxt[b]])[None]
            base, oracle = case.hf32(full).logits[:, -1:], case.hf64(full).logits[:, -1:]
            _assert_parity(step[b:b + 1], base, oracle, f"{case.name} ragged decode row {b}")


def _hf_greedy(hf_model, prompt, n):
    ids = torch.tensor([prompt])
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, eos_token_id=None, pad_token_id=0)
    new = out[0, len(prompt):].tolist()
    assert len(new) == n, "transformers stopped early"
    return new


def test_greedy_generation_matches(case):
    prompt = _tokens(case.vocab, 12, seed=4).tolist()        # 12 + 32 tokens: past Mistral's window of 8
    want = _hf_greedy(case.hf32, prompt, 32)
    got = qkv.generate.generate(case.model, prompt, max_new_tokens=32)
    assert got == want
    assert len(set(want)) > 3, "degenerate continuation: the test would not notice a wrong model"


@pytest.mark.parametrize("cache", ["contiguous", "paged"])
def test_greedy_generation_ragged_batch(case, cache):
    prompts = [_tokens(case.vocab, n, seed=20 + n).tolist() for n in (12, 5, 9)]
    want = [_hf_greedy(case.hf32, p, 32) for p in prompts]
    got = qkv.generate.generate(case.model, prompts, max_new_tokens=32, cache=cache)
    assert got == want


def test_sliding_window_is_exercised(mistral_case):
    """The Mistral window changes the logits of a 40-token sequence (so parity above tests it)."""
    case = mistral_case
    cfg = copy.deepcopy(case.hf32.config)
    cfg.sliding_window = None
    unwindowed = type(case.hf32)(cfg).eval()
    unwindowed.load_state_dict(case.hf32.state_dict())
    tokens = _tokens(case.vocab, 1, 40, seed=5)
    with torch.no_grad():
        a, b = case.hf32(tokens).logits, unwindowed(tokens).logits
    torch.testing.assert_close(a[:, :8], b[:, :8])                        # within the window: identical
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-2                         # beyond it: different


def test_sdpa_attention_agrees(case):
    """transformers' sdpa path gives the same logits as its eager path used above."""
    cfg = copy.deepcopy(case.hf32.config)
    cfg._attn_implementation = "sdpa"
    sdpa = type(case.hf32)(cfg).eval()
    sdpa.load_state_dict(case.hf32.state_dict())
    tokens = _tokens(case.vocab, 2, 40, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(sdpa(tokens).logits, case.hf32(tokens).logits, rtol=1e-5, atol=1e-5)


def test_state_dict_from_hf_in_memory(case):
    state = hf_import.state_dict_from_hf(case.hf32.state_dict(), case.model.config)
    ours = case.model.state_dict()
    assert set(state) == set(ours)
    for k in ours:
        assert torch.equal(state[k], ours[k]), k


def test_gpt2_key_variants(gpt2_case, tmp_path):
    """GPT-2 keys without the "transformer." prefix, with the attn.bias / masked_bias
    buffers old checkpoints carry, and with an lm_head.weight equal to wte."""
    case = gpt2_case
    tensors = load_file(str(case.dir / "model.safetensors"))
    assert all(k.startswith("transformer.") for k in tensors)
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    for i in range(2):
        bare[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        bare[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    bare["lm_head.weight"] = bare["wte.weight"].clone()
    shutil.copy(case.dir / "config.json", tmp_path / "config.json")
    save_file(bare, str(tmp_path / "model.safetensors"))
    model = hf_import.load(tmp_path)
    for k, v in case.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    # the fused c_attn really is split and transposed: q_proj is its first d columns, transposed
    w = tensors["transformer.h.1.attn.c_attn.weight"]                      # (d, 3d)
    torch.testing.assert_close(model.layers[1].self_attn.q_proj.weight, w[:, :32].t(), rtol=0, atol=0)
    torch.testing.assert_close(model.layers[1].self_attn.v_proj.weight, w[:, 64:].t(), rtol=0, atol=0)


def test_dtype_follows_checkpoint(gpt2_case, tmp_path):
    case = gpt2_case
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(str(case.dir / "model.safetensors")).items()}
    shutil.copy(case.dir / "config.json", tmp_path / "config.json")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert hf_import.load(tmp_path).embed.weight.dtype == torch.bfloat16
    assert hf_import.load(tmp_path, dtype="float32").embed.weight.dtype == torch.float32
    mixed = dict(tensors, **{"transformer.wte.weight": tensors["transformer.wte.weight"].half()})
    save_file(mixed, str(tmp_path / "model.safetensors"))
    assert hf_import.load(tmp_path).embed.weight.dtype == torch.float32     # mixed dtypes -> float32


# -----------------------------------------------------------------------------
# Config translation


LLAMA_BASE = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "rms_norm_eps": 1e-6, "max_position_embeddings": 256, "hidden_act": "silu"}


def test_config_rope_layouts_agree():
    """transformers 5 (rope_parameters) and older (rope_theta + rope_scaling) layouts give the same config."""
    new = dict(LLAMA_BASE, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 64})
    old = dict(LLAMA_BASE, rope_theta=5e5, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 64})
    a, b = hf_import.config_from_hf(new), hf_import.config_from_hf(old)
    assert a == b and a.rope_base == 5e5 and a.rope_scaling["original_max_positions"] == 64
    lin = hf_import.config_from_hf(dict(LLAMA_BASE, rope_theta=1e4, rope_scaling={"type": "linear", "factor": 4}))
    assert lin.rope_scaling == {"type": "linear", "factor": 4.0}
    plain = hf_import.config_from_hf(dict(LLAMA_BASE, rope_theta=1e4, rope_scaling=None))
    assert plain.rope_scaling is None and plain.head_dim == 8 and plain.n_kv_heads == 2 and not plain.tie_embeddings


def test_config_defaults_and_mistral_window():
    m = hf_import.config_from_hf(dict(LLAMA_BASE, model_type="mistral", architectures=["MistralForCausalLM"],
                                      sliding_window=None))
    assert m.arch == "mistral" and m.windows() == [None, None]
    g = hf_import.config_from_hf({"model_type": "gpt2", "vocab_size": 50, "n_embd": 16, "n_layer": 1, "n_head": 2,
                                  "n_inner": None, "activation_function": "gelu"})
    assert (g.ffn_hidden, g.activation, g.max_positions, g.tie_embeddings) == (64, "gelu", 1024, True)
    # architectures alone identify the family
    assert hf_import.config_from_hf({k: v for k, v in LLAMA_BASE.items() if k != "model_type"}).arch == "llama"


# -----------------------------------------------------------------------------
# save(): back to transformers


@pytest.mark.parametrize("preset", ["gpt2", "llama", "mistral"])
def test_save_roundtrip(preset, tmp_path):
    overrides = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_positions=64)
    if preset != "gpt2":
        overrides.update(n_kv_heads=2, ffn_hidden=48)
    if preset == "llama":
        overrides.update(rope_scaling={"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_positions": 16})
    if preset == "mistral":
        overrides.update(sliding_window=6)
    torch.manual_seed(0)
    model = Decoder(getattr(DecoderConfig, preset)(**overrides)).eval()
    _randomize(model, seed=3)
    hf_import.save(model, tmp_path)
    again = hf_import.load(tmp_path)
    assert again.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    tokens = _tokens(61, 2, 20, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, model(tokens), rtol=1e-4, atol=1e-4)


# -----------------------------------------------------------------------------
# Bad inputs: every one a ValueError saying what is wrong


@pytest.fixture
def llama_dir(tmp_path_factory):
    """A fresh copy of a tiny single-file Llama checkpoint, to break."""
    src = tmp_path_factory.getbasetemp() / "llama-src"
    if not src.exists():
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       **NO_SPECIAL)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(cfg).save_pretrained(src)
    dst = tmp_path_factory.mktemp("broken")
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


def _edit_config(directory, **changes):
    file = directory / "config.json"
    cfg = json.loads(file.read_text())
    cfg.update(changes)
    file.write_text(json.dumps(cfg))


def _edit_tensors(directory, fn):
    file = directory / "model.safetensors"
    tensors = load_file(str(file))
    fn(tensors)
    save_file(tensors, str(file))


def _fails(directory, *fragments):
    with pytest.raises(ValueError) as info:
        hf_import.load(directory)
    msg = str(info.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in: {msg}"
    return msg


def test_good_copy_loads(llama_dir):
    assert isinstance(hf_import.load(llama_dir), Decoder)       # so the failures below are the edits' doing


def test_unknown_model_type(llama_dir):
    _edit_config(llama_dir, model_type="bert", architectures=["BertForMaskedLM"])
    _fails(llama_dir, "'bert'", "not supported", "gpt2", "llama", "mistral")


def test_unsupported_architecture(llama_dir):
    _edit_config(llama_dir, architectures=["LlamaForSequenceClassification"])
    _fails(llama_dir, "LlamaForSequenceClassification", "LlamaForCausalLM")


def test_missing_config(llama_dir):
    (llama_dir / "config.json").unlink()
    _fails(llama_dir, "no config.json")


def test_missing_directory(tmp_path):
    _fails(tmp_path / "nowhere", "does not exist")
    _fails(tmp_path, "no config.json")


def test_pickle_only_directory_is_refused(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    # not a loadable pickle at all: the loader must refuse without opening it
    (llama_dir / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    _fails(llama_dir, "pytorch_model.bin", "safetensors", "save_pretrained", "safe_serialization=True")


def test_no_weights(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    _fails(llama_dir, "no weights")


def test_truncated_file(llama_dir):
    file = llama_dir / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-100])                                         # the last tensor loses bytes
    _fails(llama_dir, "model.safetensors", "truncated")
    file.write_bytes(data[:50])                                           # cut inside the header
    _fails(llama_dir, "model.safetensors", "truncated")
    file.write_bytes(data[:4])
    _fails(llama_dir, "model.safetensors", "truncated")


def test_corrupt_header(llama_dir):
    file = llama_dir / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:16] = b"{garbag!"                                              # the JSON header's first bytes
    file.write_bytes(bytes(data))
    _fails(llama_dir, "model.safetensors", "not valid JSON")


def test_header_offsets_beyond_file(llama_dir):
    file = llama_dir / "model.safetensors"
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    key = sorted(k for k in header if k != "__metadata__")[0]
    begin, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [begin + 10**9, end + 10**9]
    raw = json.dumps(header).encode()
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    _fails(llama_dir, "model.safetensors", key)


def test_missing_key(llama_dir):
    _edit_tensors(llama_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    _fails(llama_dir, "lacks 1 tensor", "model.layers.1.mlp.up_proj.weight")


def test_extra_key(llama_dir):
    _edit_tensors(llama_dir, lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.zeros(3)}))
    _fails(llama_dir, "does not account for", "model.layers.0.self_attn.extra.weight")


def test_too_few_layers_in_config(llama_dir):
    _edit_config(llama_dir, num_hidden_layers=1)
    _fails(llama_dir, "9 tensor(s)", "model.layers.1.", "config.json sets 1 layer(s)")


def test_too_many_layers_in_config(llama_dir):
    _edit_config(llama_dir, num_hidden_layers=3)
    _fails(llama_dir, "lacks 9 tensor(s)", "model.layers.2.input_layernorm.weight")


def test_wrong_hidden_size(llama_dir):
    _edit_config(llama_dir, hidden_size=64, head_dim=16)
    _fails(llama_dir, "shapes do not match", "model.embed_tokens.weight: expected (64, 64), got (64, 32)")


def test_wrong_tensor_shape(llama_dir):
    _edit_tensors(llama_dir, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(8, 32)}))
    _fails(llama_dir, "model.layers.0.self_attn.k_proj.weight: expected (16, 32), got (8, 32)")


def test_integer_weights_refused(llama_dir):
    _edit_tensors(llama_dir, lambda t: t.update({"model.norm.weight": torch.ones(32, dtype=torch.int8)}))
    _fails(llama_dir, "I8", "dequantized")


@pytest.mark.parametrize("rope", [
    {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
    {"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
    {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
])
def test_unsupported_rope(llama_dir, rope):
    _edit_config(llama_dir, **rope)
    _fails(llama_dir, "not supported", "default, linear, llama3")


def test_unsupported_activation(llama_dir):
    _edit_config(llama_dir, hidden_act="gelu")
    _fails(llama_dir, "'gelu'", "silu")


def test_bias_flags_must_agree(llama_dir):
    _edit_config(llama_dir, attention_bias=True, mlp_bias=False)
    _fails(llama_dir, "attention_bias=True", "mlp_bias=False")


def test_tied_head_must_equal_embedding(llama_dir):
    _edit_config(llama_dir, tie_word_embeddings=True)                     # lm_head.weight is separate
    _fails(llama_dir, "tie_word_embeddings", "lm_head.weight")


def test_missing_shard(sharded_case, tmp_path):
    broken = tmp_path / "missing-shard"
    shutil.copytree(sharded_case.dir, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.unlink()
    _fails(broken, shard.name, "not in")


def test_index_must_match_shards(sharded_case, tmp_path):
    broken = tmp_path / "bad-index"
    shutil.copytree(sharded_case.dir, broken)
    index_file = broken / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    key = "model.norm.weight"
    index["weight_map"][key] = next(s for s in sorted(set(index["weight_map"].values()))
                                    if s != index["weight_map"][key])
    index_file.write_text(json.dumps(index))
    _fails(broken, key, "does not match the shards")
    index["weight_map"][key] = "../elsewhere.safetensors"
    index_file.write_text(json.dumps(index))
    _fails(broken, "../elsewhere.safetensors", "file name inside")


def test_config_that_qkv_cannot_build():
    with pytest.raises(ValueError, match="n_kv_heads=3 must divide n_heads=4"):
        hf_import.config_from_hf(dict(LLAMA_BASE, num_key_value_heads=3))
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        hf_import.config_from_hf(dict(LLAMA_BASE, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                                   "partial_rotary_factor": 0.5}))
    with pytest.raises(TypeError, match="dict"):
        hf_import.config_from_hf("config.json")


def test_save_refuses_what_hf_cannot_express(tmp_path):
    model = Decoder(DecoderConfig.llama(vocab_size=16, d_model=16, n_layers=1, n_heads=2, ffn_hidden=32,
                                        rope_scaling={"type": "ntk", "factor": 2.0}))
    with pytest.raises(ValueError, match="no Hugging Face equivalent.*'ntk'"):
        hf_import.save(model, tmp_path)
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("change, fragments", [
    ({"activation_function": "swish"}, ["'swish'", "gelu_new"]),
    ({"scale_attn_by_inverse_layer_idx": True}, ["scale_attn_by_inverse_layer_idx"]),
    ({"scale_attn_weights": False}, ["scale_attn_weights"]),
    ({"add_cross_attention": True}, ["add_cross_attention"]),
    ({"n_embd": None}, ["lacks 'n_embd'"]),
])
def test_gpt2_options_refused(change, fragments):
    cfg = {"model_type": "gpt2", "vocab_size": 50, "n_embd": 16, "n_layer": 1, "n_head": 2, **change}
    with pytest.raises(ValueError) as info:
        hf_import.config_from_hf(cfg)
    for f in fragments:
        assert f in str(info.value)


def test_bad_dtype_argument(llama_dir):
    with pytest.raises(TypeError, match="dtype"):
        hf_import.load(llama_dir, dtype=torch.int32)
    with pytest.raises(TypeError, match="dtype"):
        hf_import.load(llama_dir, dtype="int8")
