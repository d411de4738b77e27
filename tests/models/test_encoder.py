"""The BERT-style `Encoder` and its Hugging Face import: parity with transformers' BertModel,
packed == padded, and bad inputs.

Legend: B batch, L tokens per row, T real tokens, d width, H heads, V vocabulary.

Parity cases build a tiny BertModel with random weights (scaled up from the 0.02
init so that attention, norms and positions all shape the output), save it with
`save_pretrained` (safetensors) and load it with `qkv.models.hf.load`. Hidden states
and attention weights follow the error-ratio rule: the oracle is the transformers
model in float64 (its eager attention stays in float64), the baseline the same
model in float32. Only real (non-padded) positions are compared: padded query rows
hold finite values that mean nothing.
"""

from __future__ import annotations

import copy
import json
import shutil
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import EPS, assert_error_ratio, max_err  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import qkv  # noqa: E402
from qkv.models import Decoder, Encoder, EncoderConfig, EncoderOutput  # noqa: E402
from qkv.models import encoder as encoder_module  # noqa: E402
from qkv.models import hf as hf_import  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

V = 97


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Matrices and embeddings N(0, 0.3^2) / N(0, 0.5^2), norm weights 1 + N(0, 0.2^2), biases N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if p.dim() >= 2:
                p.copy_((0.5 if "embed" in name else 0.3) * r)
            elif ("norm" in name.lower()) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * r)
            else:
                p.copy_(0.1 * r)


def _batch(seed=0, B=4, L=13, lengths=(13, 9, 4, 1), types=3):
    """ids (B, L), right-padded mask (B, L) with mixed lengths, token types (B, L)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, L), generator=g)
    mask = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long()
    tt = torch.randint(0, types, (B, L), generator=g)
    return ids, mask, tt


def _assert_close(cand, base, oracle, what):
    """qkv's error <= 2 x transformers' float32 error + 1 ulp at the oracle's scale, or <= 1e-5."""
    err_c, err_b = max_err(cand, oracle), max_err(base, oracle)
    scale = max(1.0, float(oracle.abs().max()))
    assert err_c <= 2.0 * err_b + EPS[torch.float32] * scale or err_c <= 1e-5, (
        f"{what}: qkv error {err_c:.3e} vs transformers float32 {err_b:.3e}")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny BertModel (3 segment types, exact GELU), saved and loaded, plus its float64 twin."""
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=40, type_vocab_size=3,
                                  hidden_act="gelu", layer_norm_eps=1e-12, attn_implementation="eager")
    torch.manual_seed(0)
    hf32 = transformers.BertModel(cfg).eval()
    _randomize(hf32, seed=1)
    directory = tmp_path_factory.mktemp("bert")
    hf32.save_pretrained(directory, safe_serialization=True)
    hf64 = copy.deepcopy(hf32).double()
    return SimpleNamespace(dir=directory, hf32=hf32, hf64=hf64, model=hf_import.load(directory), cfg=cfg)


def _hf_run(model, ids, mask, tt):
    with torch.no_grad():
        return model(ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True, output_attentions=True)


# -----------------------------------------------------------------------------
# Config


def test_config_preset_and_roundtrip():
    c = EncoderConfig.bert()
    assert (c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.ffn_hidden) == (30522, 768, 12, 12, 3072)
    assert (c.max_positions, c.type_vocab_size, c.norm_eps, c.activation) == (512, 2, 1e-12, "gelu")
    small = EncoderConfig.bert(d_model=64, n_heads=4, ffn_hidden=None, n_layers=1)
    assert small.ffn_hidden == 256 and small.head_dim == 16
    assert EncoderConfig.from_dict(small.to_dict()) == small
    assert json.loads(json.dumps(small.to_dict())) == small.to_dict()
    with pytest.raises(ValueError, match="unknown EncoderConfig field"):
        EncoderConfig.from_dict({**small.to_dict(), "rope": True})


@pytest.mark.parametrize("change, error, fragment", [
    ({"n_heads": 5}, ValueError, "does not divide d_model=64"),
    ({"activation": "swiglu"}, ValueError, "activation must be one of"),
    ({"dropout": 1.0}, ValueError, "dropout"),
    ({"norm_eps": 0}, ValueError, "norm_eps"),
    ({"pad_token_id": 100}, ValueError, "pad_token_id=100"),
    ({"type_vocab_size": 0}, ValueError, "type_vocab_size must be >= 1"),
    ({"d_model": 64.0}, TypeError, "d_model must be an int"),
])
def test_config_validation(change, error, fragment):
    with pytest.raises(error, match=fragment):
        EncoderConfig(**{"vocab_size": 50, "d_model": 64, "n_layers": 1, "n_heads": 4, **change})


def test_exact_gelu_is_erf_gelu():
    """BERT's hidden_act "gelu" is the erf GELU; the tanh approximation differs by ~1e-4 near |x| = 2."""
    act, gated = qkv.layers.ACTIVATIONS["gelu"]
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    exact = 0.5 * x * (1 + torch.erf(x / 2 ** 0.5))
    assert not gated and max_err(act(x), exact) < 1e-15
    assert max_err(qkv.layers.ACTIVATIONS["gelu_tanh"][0](x), exact) > 1e-5


# -----------------------------------------------------------------------------
# Parity with transformers' BertModel


def test_loaded_config(bert):
    m = bert.model
    assert isinstance(m, Encoder) and not m.training
    c = m.config
    assert (c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.ffn_hidden) == (V, 32, 2, 4, 64)
    assert (c.max_positions, c.type_vocab_size, c.activation, c.pad_token_id) == (40, 3, "gelu", 0)
    assert hf_import.config_from_hf(bert.cfg.to_dict()) == c


def test_hidden_states_and_attentions_match(bert):
    ids, mask, tt = _batch()
    o32, o64 = _hf_run(bert.hf32, ids, mask, tt), _hf_run(bert.hf64, ids, mask, tt)
    with torch.no_grad():
        out = bert.model(ids, mask, tt, return_hidden_states=True, return_weights=True, packed=False)
    assert isinstance(out, EncoderOutput)
    real = mask.bool()
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2
    assert torch.equal(out.last_hidden_state, out.hidden_states[-1])
    for i, (ours, base, oracle) in enumerate(zip(out.hidden_states, o32.hidden_states, o64.hidden_states)):
        assert ours.shape == (4, 13, 32) and ours.dtype == torch.float32
        assert torch.isfinite(ours).all()                               # padded rows too
        _assert_close(ours[real], base[real], oracle[real], f"hidden state {i}")
    for i, (ours, base, oracle) in enumerate(zip(out.attentions, o32.attentions, o64.attentions)):
        assert ours.shape == (4, 4, 13, 13)
        rows = real[:, :, None].expand(4, 13, 4)                      # (B, L, H): real query rows
        pick = lambda w: w.transpose(1, 2)[rows]                       # noqa: E731  (rows, L)
        _assert_close(pick(ours), pick(base), pick(oracle), f"attention {i}")
        assert float(ours[2, :, :4, 4:].abs().max()) == 0.0           # padded keys get exactly zero weight


def test_packed_matches_transformers(bert):
    ids, mask, tt = _batch(seed=3)
    o32, o64 = _hf_run(bert.hf32, ids, mask, tt), _hf_run(bert.hf64, ids, mask, tt)
    with torch.no_grad():
        out = bert.model(ids, mask, tt, return_hidden_states=True, packed=True)
    real = mask.bool()
    for i, (ours, base, oracle) in enumerate(zip(out.hidden_states, o32.hidden_states, o64.hidden_states)):
        _assert_close(ours[real], base[real], oracle[real], f"packed hidden state {i}")
        assert float(ours[~real].abs().max()) == 0.0                  # zeros at padding


def test_float64_load_matches_oracle(bert):
    model64 = hf_import.load(bert.dir, dtype=torch.float64)
    ids, mask, tt = _batch(seed=5)
    o64 = _hf_run(bert.hf64, ids, mask, tt)
    with torch.no_grad():
        ours = model64(ids, mask, tt).last_hidden_state
    real = mask.bool()
    assert max_err(ours[real], o64.last_hidden_state[real]) < 1e-12


def test_no_mask_and_default_token_types(bert):
    ids = _batch(seed=6)[0]
    o64 = _hf_run(bert.hf64, ids, None, None)
    o32 = _hf_run(bert.hf32, ids, None, None)
    with torch.no_grad():
        ours = bert.model(ids).last_hidden_state
    _assert_close(ours, o32.last_hidden_state, o64.last_hidden_state, "no mask")


def test_prefixed_names_and_pooler(bert, tmp_path):
    """BertFor* wrappers save "bert."-prefixed names; the pooler and position_ids are skipped."""
    tensors = load_file(str(bert.dir / "model.safetensors"))
    assert any(k.startswith("pooler.") for k in tensors)
    tensors = {"bert." + k: v for k, v in tensors.items()}
    tensors["bert.embeddings.position_ids"] = torch.arange(40)[None]
    shutil.copy(bert.dir / "config.json", tmp_path / "config.json")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    again = hf_import.load(tmp_path)
    for k, v in bert.model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_state_dict_from_hf_in_memory(bert):
    state = hf_import.state_dict_from_hf(bert.hf32.state_dict(), bert.model.config)
    for k, v in bert.model.state_dict().items():
        assert torch.equal(state[k], v), k


def test_save_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = Encoder(EncoderConfig.bert(vocab_size=V, d_model=32, n_layers=2, n_heads=4, ffn_hidden=48,
                                       max_positions=24, activation="gelu_tanh", dropout=0.0)).eval()
    _randomize(model, seed=2)
    hf_import.save(model, tmp_path)
    again = hf_import.load(tmp_path)
    assert again.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    theirs = transformers.BertModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert theirs.config.hidden_act == "gelu_new"
    ids, mask, tt = _batch(seed=8, L=10, lengths=(10, 6, 3, 8), types=2)
    with torch.no_grad():
        ref = theirs(ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        ours = model(ids, mask, tt).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# Packed == padded


@pytest.fixture(scope="module")
def pair():
    """A random qkv Encoder (fp32) and its float64 copy."""
    torch.manual_seed(0)
    model = Encoder(EncoderConfig.bert(vocab_size=V, d_model=48, n_layers=2, n_heads=4, ffn_hidden=96,
                                       max_positions=64, dropout=0.0)).eval()
    _randomize(model, seed=4)
    return model, copy.deepcopy(model).double()


@pytest.mark.parametrize("lengths", [(40, 3, 17, 1, 29), (5, 5, 5, 5, 2), (1, 1, 1, 1, 40)])
def test_packed_equals_padded(pair, lengths):
    model, model64 = pair
    ids, mask, tt = _batch(seed=sum(lengths), B=5, L=max(lengths), lengths=lengths, types=2)
    real = mask.bool()
    with torch.no_grad():
        oracle = model64(ids, mask, tt, return_hidden_states=True, packed=False)
        padded = model(ids, mask, tt, return_hidden_states=True, packed=False)
        packed = model(ids, mask, tt, return_hidden_states=True, packed=True)
    for i, (p, b, o) in enumerate(zip(packed.hidden_states, padded.hidden_states, oracle.hidden_states)):
        assert_error_ratio(p[real], b[real], o[real], what=f"packed layer {i}, lengths {lengths}")
        assert not p[~real].any()
    assert torch.equal(packed.last_hidden_state, packed.hidden_states[-1])


def test_dense_mask_that_is_not_a_prefix(bert):
    """Left padding and holes: keys masked through from_dense, positions still the columns (as transformers)."""
    ids, _, tt = _batch(seed=11, B=3, L=12, lengths=(12, 12, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :5] = 0                                                   # left padding
    mask[1, 3:6] = 0                                                  # holes
    mask[1, 10] = 0
    assert not isinstance(Encoder._padding_mask(mask.bool()), type(qkv.masks.padding([1])))
    o32, o64 = _hf_run(bert.hf32, ids, mask, tt), _hf_run(bert.hf64, ids, mask, tt)
    real = mask.bool()
    with torch.no_grad():
        for packed in (False, True):
            ours = bert.model(ids, mask, tt, packed=packed).last_hidden_state
            assert torch.isfinite(ours).all()
            _assert_close(ours[real], o32.last_hidden_state[real], o64.last_hidden_state[real],
                          f"dense mask, packed={packed}")


def test_padding_never_leaks(pair):
    """Changing padded tokens changes nothing at real positions (packed and padded)."""
    model, _ = pair
    ids, mask, tt = _batch(seed=12, B=3, L=10, lengths=(10, 4, 7), types=2)
    real = mask.bool()
    ids2 = ids.clone()
    ids2[~real] = (ids2[~real] + 7) % V
    with torch.no_grad():
        for packed in (False, True):
            a = model(ids, mask, tt, packed=packed).last_hidden_state
            b = model(ids2, mask, tt, packed=packed).last_hidden_state
            assert torch.equal(a[real], b[real]), packed


def test_auto_packing_rule(pair, monkeypatch):
    model, _ = pair
    ids, mask, tt = _batch(seed=13, B=4, L=20, lengths=(20, 4, 3, 2), types=2)    # 64% padding
    light = _batch(seed=13, B=4, L=20, lengths=(20, 20, 19, 18), types=2)[1]     # 4% padding
    assert Encoder.should_pack(mask) and not Encoder.should_pack(light)
    assert not Encoder.should_pack(None) and not Encoder.should_pack(mask[:1])
    with torch.no_grad():
        heavy = model(ids, mask, tt).last_hidden_state
        assert float(heavy[~mask.bool()].abs().max()) == 0.0                      # ran packed
        few = model(ids, light, tt).last_hidden_state
        assert float(few[~light.bool()].abs().min()) > 0.0                        # ran padded
        monkeypatch.setattr(encoder_module, "PACK_MIN_PADDING", 0.01)
        few = model(ids, light, tt).last_hidden_state
        assert float(few[~light.bool()].abs().max()) == 0.0                       # the threshold is the constant
        # return_weights needs the padded run: auto does not pack then
        out = model(ids, mask, tt, return_weights=True)
        assert out.attentions[0].shape == (4, 4, 20, 20)


def test_degenerate_masks(pair):
    model, _ = pair
    ids, _, tt = _batch(seed=14, B=3, L=6, lengths=(6, 6, 6), types=2)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1] = False                                                   # a row with no real token
    with torch.no_grad():
        for packed in (False, True):
            out = model(ids, mask, tt, packed=packed).last_hidden_state
            assert torch.isfinite(out).all()
        empty = model(ids, torch.zeros(3, 6, dtype=torch.bool), tt, packed=True).last_hidden_state
        assert empty.shape == (3, 6, 48) and float(empty.abs().max()) == 0.0


def test_training_mode_gradients(pair):
    model, _ = pair
    m = copy.deepcopy(model).train()
    ids, mask, tt = _batch(seed=15, B=3, L=8, lengths=(8, 5, 2), types=2)
    out = m(ids, mask, tt, packed=True).last_hidden_state
    out[mask.bool()].square().mean().backward()
    assert m.layers[0].self_attn.q_proj.weight.grad is not None
    assert torch.isfinite(m.embed.weight.grad).all()


# -----------------------------------------------------------------------------
# Bad inputs to the Encoder


@pytest.mark.parametrize("kwargs, error, fragment", [
    ({"input_ids": torch.zeros(2, 3)}, ValueError, "integer tensor"),
    ({"input_ids": torch.zeros(6, dtype=torch.long)}, ValueError, "ids\\[None\\]"),
    ({"input_ids": torch.full((1, 3), V)}, ValueError, "vocab_size=97"),
    ({"input_ids": torch.zeros(1, 65, dtype=torch.long)}, ValueError, "max_positions=64"),
    ({"attention_mask": torch.ones(2, 4)}, ValueError, "attention_mask must be a tensor"),
    ({"attention_mask": torch.full((2, 3), 2)}, ValueError, "0/1"),
    ({"token_type_ids": torch.full((2, 3), 2)}, ValueError, "type_vocab_size=2"),
    ({"token_type_ids": torch.zeros(2, 3)}, ValueError, "token_type_ids must be an integer"),
    ({"packed": "yes"}, TypeError, "packed must be"),
    ({"return_weights": 1}, TypeError, "return_weights"),
])
def test_bad_encoder_inputs(pair, kwargs, error, fragment):
    model, _ = pair
    args = {"input_ids": torch.zeros(2, 3, dtype=torch.long), **kwargs}
    with pytest.raises(error, match=fragment):
        model(**args)


def test_weights_of_a_packed_run_are_refused(pair):
    model, _ = pair
    ids, mask, tt = _batch(seed=16, B=2, L=5, lengths=(5, 2), types=2)
    with pytest.raises(ValueError, match="packed=False"):
        model(ids, mask, tt, packed=True, return_weights=True)


def test_encoder_refuses_decoder_config():
    from qkv.models import DecoderConfig

    with pytest.raises(TypeError, match="EncoderConfig"):
        Encoder(DecoderConfig.gpt2(n_layers=1, d_model=16, n_heads=2, vocab_size=10))


# -----------------------------------------------------------------------------
# Bad checkpoints: every one a ValueError saying what is wrong


@pytest.fixture
def bert_dir(bert, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(bert.dir, dst)
    return dst


def _edit_config(directory, **changes):
    file = directory / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def _edit_tensors(directory, fn):
    file = directory / "model.safetensors"
    tensors = load_file(str(file))
    fn(tensors)
    save_file(tensors, str(file))


def _fails(directory, *fragments, headers_only=False, monkeypatch=None):
    if headers_only:   # the problem must be found from the file headers, before any tensor is read
        def no_read(self, keys):
            raise AssertionError("tensor data was read before the checks passed")
        monkeypatch.setattr(hf_import.Safetensors, "read", no_read)
    with pytest.raises(ValueError) as info:
        hf_import.load(directory)
    msg = str(info.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in: {msg}"


def test_good_copy_loads(bert_dir):
    assert isinstance(hf_import.load(bert_dir), Encoder)


def test_missing_key(bert_dir, monkeypatch):
    _edit_tensors(bert_dir, lambda t: t.pop("encoder.layer.1.intermediate.dense.bias"))
    _fails(bert_dir, "lacks 1 tensor", "encoder.layer.1.intermediate.dense.bias", "bert model",
           headers_only=True, monkeypatch=monkeypatch)


def test_wrong_shape(bert_dir, monkeypatch):
    _edit_tensors(bert_dir, lambda t: t.update({"embeddings.token_type_embeddings.weight": torch.zeros(2, 32)}))
    _fails(bert_dir, "embeddings.token_type_embeddings.weight: expected (3, 32), got (2, 32)",
           headers_only=True, monkeypatch=monkeypatch)


def test_config_with_more_layers(bert_dir, monkeypatch):
    _edit_config(bert_dir, num_hidden_layers=3)
    _fails(bert_dir, "lacks 16 tensor(s)", "encoder.layer.2.", headers_only=True, monkeypatch=monkeypatch)


def test_config_with_fewer_layers(bert_dir, monkeypatch):
    _edit_config(bert_dir, num_hidden_layers=1)
    _fails(bert_dir, "16 tensor(s)", "encoder.layer.1.", "config.json sets 1 layer(s)",
           headers_only=True, monkeypatch=monkeypatch)


def test_task_head_tensors_refused(bert_dir, monkeypatch):
    _edit_tensors(bert_dir, lambda t: t.update({"cls.predictions.bias": torch.zeros(V),
                                                "cls.predictions.transform.dense.weight": torch.zeros(32, 32)}))
    _fails(bert_dir, "task head", "cls.*", "BertModel.from_pretrained", headers_only=True, monkeypatch=monkeypatch)


def test_head_architecture_refused(bert_dir):
    _edit_config(bert_dir, architectures=["BertForSequenceClassification"])
    _fails(bert_dir, "BertForSequenceClassification", "not supported", "BertModel", "save_pretrained")


def test_both_prefixed_and_plain_names_refused(bert_dir):
    _edit_tensors(bert_dir, lambda t: t.update({"bert.embeddings.LayerNorm.bias": torch.zeros(32)}))
    _fails(bert_dir, "holds both", "embeddings.LayerNorm.bias")


def test_pickle_only_directory_is_refused(bert_dir):
    (bert_dir / "model.safetensors").unlink()
    (bert_dir / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    _fails(bert_dir, "pytorch_model.bin", "safetensors", "BertModel", "safe_serialization=True")


def test_integer_weights_refused(bert_dir):
    _edit_tensors(bert_dir, lambda t: t.update({"embeddings.LayerNorm.weight": torch.ones(32, dtype=torch.int8)}))
    _fails(bert_dir, "I8", "dequantized")


@pytest.mark.parametrize("change, fragments", [
    ({"position_embedding_type": "relative_key"}, ["position_embedding_type", "'relative_key'", "absolute"]),
    ({"is_decoder": True}, ["is_decoder"]),
    ({"add_cross_attention": True}, ["add_cross_attention"]),
    ({"hidden_act": "silu"}, ["'silu'", "gelu"]),
    ({"hidden_size": 30}, ["n_heads=4 does not divide d_model=30"]),
    ({"vocab_size": None}, ["lacks 'vocab_size'"]),
    ({"pad_token_id": 500}, ["pad_token_id=500"]),
])
def test_bert_options_refused(bert_dir, change, fragments):
    _edit_config(bert_dir, **change)
    _fails(bert_dir, *fragments)


def test_bert_config_defaults_and_new_gelu():
    cfg = hf_import.config_from_hf({"model_type": "bert", "vocab_size": 50, "hidden_size": 16,
                                    "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                                    "hidden_act": "gelu_new"})
    assert isinstance(cfg, EncoderConfig)
    assert (cfg.max_positions, cfg.type_vocab_size, cfg.norm_eps, cfg.activation, cfg.pad_token_id) == \
        (512, 2, 1e-12, "gelu_tanh", 0)
    by_arch = hf_import.config_from_hf({"architectures": ["BertModel"], "vocab_size": 50, "hidden_size": 16,
                                        "num_hidden_layers": 1, "num_attention_heads": 2,
                                        "intermediate_size": 32})
    assert isinstance(by_arch, EncoderConfig) and by_arch.activation == "gelu"
    assert hf_import.config_from_hf(hf_import.config_to_hf(cfg)) == cfg


def test_decoder_loading_unchanged(tmp_path):
    """A decoder directory still loads as a Decoder; a DecoderConfig cannot pick the BERT table."""
    from qkv.models import DecoderConfig

    model = Decoder(DecoderConfig.gpt2(vocab_size=20, d_model=16, n_layers=1, n_heads=2, max_positions=8))
    hf_import.save(model, tmp_path)
    assert isinstance(hf_import.load(tmp_path), Decoder)
    with pytest.raises(ValueError, match="config.arch must be one of"):
        hf_import.state_dict_from_hf({}, DecoderConfig.gpt2(vocab_size=20, d_model=16, n_layers=1, n_heads=2,
                                                            arch="bert"))
    with pytest.raises(TypeError, match="DecoderConfig, EncoderConfig or ViTConfig"):
        hf_import.state_dict_from_hf({}, {"model_type": "bert"})
