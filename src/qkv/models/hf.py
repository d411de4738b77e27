"""Hugging Face checkpoints: load a GPT-2, Llama or Mistral directory into a `qkv.models.Decoder`,
a BERT directory (BertModel) into a `qkv.models.Encoder`, and a ViT directory (ViTModel,
ViTForImageClassification) into a `qkv.models.ViT` (its table and config: `qkv.models.hf_vit`).

Legend: d model width (n_embd / hidden_size), Hq query heads, Hkv key/value heads,
D head dim, F MLP hidden width, V vocabulary, P learned positions (n_positions),
S segment (token type) vocabulary.

Usage::

    import qkv.models.hf as hf
    model = hf.load("path/to/checkpoint")                 # config.json + *.safetensors
    encoder = hf.load("path/to/bert")                     # model_type "bert": an Encoder
    vit = hf.load("path/to/vit", expect=ViT)              # model_type "vit"; anything else: ValueError
    model = hf.load("path", dtype=torch.float32, device="cuda")
    config = hf.config_from_hf(json.load(open("path/config.json")))   # just the DecoderConfig
    state = hf.state_dict_from_hf(hf_model.state_dict(), config)      # in-memory tensors
    hf.save(model, "out/")                                # and back: a directory transformers can load

A checkpoint directory holds `config.json` and the weights as safetensors: one
`model.safetensors`, or shards listed in `model.safetensors.index.json`
(its "weight_map" names the shard of every tensor). Only safetensors are read:
`pytorch_model.bin` and other pickle files can run code when unpickled, so they
are refused with a note on how to convert them.

Untrusted files. Nothing is ever unpickled. Each safetensors header is validated
before any tensor is read (`qkv._util.safetensors.read_header`): the 8-byte length must fit the file
(a corrupt length is refused before anything is allocated), the JSON must parse,
and every tensor's dtype, shape and offsets must agree and tile the data exactly.
Shard names in the index must be plain file names in the directory (no "..", no
"/", no absolute path); a symlink in the directory is followed (the Hugging Face
cache links snapshot files to its blobs) but only to a regular file. Weights must
be float64/32/16 or bfloat16 (the model takes the checkpoint's dtype when all
weights share one, else float32, or `dtype=`); integer, bool, complex and float8
tensors are refused. The sizes config.json claims are compared with the headers
before any model is built, so an oversized config costs nothing. safetensors has
no checksum: a flipped bit inside tensor data cannot be detected here (training
checkpoints, `qkv.checkpoint`, record a sha256 of every file and do catch it).
Every problem is a ValueError naming the file.

Loading is all-or-nothing. The config is translated first (`config_from_hf`;
options qkv does not model are refused), then the checkpoint's names, shapes and
dtypes are checked against the model that config describes, using the file
headers only: every missing, unexpected or mis-shaped tensor is reported before
any data is read. Only then are the tensors read, renamed, transposed or split
(`state_dict_from_hf`) and loaded with `load_state_dict(strict=True)`.

The renaming is data: `GPT2_KEYS`, `LLAMA_KEYS` (Mistral shares Llama's) and
`BERT_KEYS` map each Hugging Face name to its qkv name(s) and say how the tensor
changes on the way. "{i}" stands for a layer index.

BERT: only the bare encoder (architecture BertModel) is imported. Its names are
accepted with or without the "bert." prefix that the BertFor* wrappers write. The
pooler (pooler.dense.*, a tanh layer over [CLS] used by the next-sentence head) is
not modelled and is skipped, as is the embeddings.position_ids buffer; task heads
(cls.*, classifier.*, qa_outputs.*) are refused.

ViT: `VIT_KEYS` (qkv.models.hf_vit), names with or without the "vit." prefix of the ViTFor*
wrappers. A ViTModel checkpoint holding the pooler (pooler.dense.*) loads as a ViT with
config.pooler=True, whose forward returns HF's pooler_output; without it, forward returns the
[CLS] state (HF's last_hidden_state[:, 0]). ViTForImageClassification: forward returns the logits.
A qkv ViT HF cannot express (mean pooling, sincos positions) is written as model_type "qkv_vit".
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from qkv._util.files import read_json, write_atomic, write_text_atomic
from qkv._util.meta import meta_model, uninitialised
from qkv._util.safetensors import PICKLE_RECIPE, PICKLE_SUFFIXES, Memory, Safetensors, Source
from qkv.models.config import DecoderConfig
from qkv.models.decoder import Decoder
from qkv.models.encoder import Encoder, EncoderConfig
from qkv.models.hf_vit import (QKV_VIT, VIT_IGNORED, VIT_KEYS, vit_config_from_hf, vit_config_to_hf,
                               with_checkpoint_pooler)
from qkv.models.vit import ViT, ViTConfig

__all__ = ["load", "save", "read_config", "config_from_hf", "config_to_hf", "state_dict_from_hf", "state_dict_to_hf",
           "GPT2_KEYS", "LLAMA_KEYS", "BERT_KEYS", "VIT_KEYS", "SUPPORTED_MODEL_TYPES", "SUPPORTED_ARCHITECTURES",
           "SUPPORTED_ROPE_TYPES"]

# -----------------------------------------------------------------------------
# The mappings.
#
# Each entry: Hugging Face name -> (qkv name, or several for a fused tensor; conversion).
# Conversions (all exact: only copies, transposes and slices):
#   "copy"      the same tensor.
#   "t"         GPT-2's Conv1D stores its weight (in, out), the transpose of a Linear's
#               (out, in): transposed.
#   "t_split"   GPT-2's fused c_attn Conv1D weight (d, 3d) holds q | k | v side by side:
#               transposed to (3d, d), then cut into three (d, d) row blocks.
#   "split"     c_attn's bias (3d,): cut into the q, k, v biases.
# An entry applies when every qkv name it produces exists in the model (a bias only
# when config.bias, pos_embed only with learned positions, lm_head only untied).

GPT2_KEYS: dict[str, tuple] = {
    # names without the optional "transformer." prefix (GPT2LMHeadModel has it, GPT2Model not)
    "wte.weight": ("embed.weight", "copy"),                                  # (V, d)
    "wpe.weight": ("pos_embed.weight", "copy"),                              # (P, d)
    "h.{i}.ln_1.weight": ("layers.{i}.norm1.weight", "copy"),
    "h.{i}.ln_1.bias": ("layers.{i}.norm1.bias", "copy"),
    "h.{i}.attn.c_attn.weight": (("layers.{i}.self_attn.q_proj.weight",      # (d, 3d) -> 3 x (d, d)
                                  "layers.{i}.self_attn.k_proj.weight",
                                  "layers.{i}.self_attn.v_proj.weight"), "t_split"),
    "h.{i}.attn.c_attn.bias": (("layers.{i}.self_attn.q_proj.bias",          # (3d,) -> 3 x (d,)
                                "layers.{i}.self_attn.k_proj.bias",
                                "layers.{i}.self_attn.v_proj.bias"), "split"),
    "h.{i}.attn.c_proj.weight": ("layers.{i}.self_attn.o_proj.weight", "t"),  # (d, d)
    "h.{i}.attn.c_proj.bias": ("layers.{i}.self_attn.o_proj.bias", "copy"),
    "h.{i}.ln_2.weight": ("layers.{i}.norm2.weight", "copy"),
    "h.{i}.ln_2.bias": ("layers.{i}.norm2.bias", "copy"),
    "h.{i}.mlp.c_fc.weight": ("layers.{i}.ffn.fc1.weight", "t"),             # (d, F) -> (F, d)
    "h.{i}.mlp.c_fc.bias": ("layers.{i}.ffn.fc1.bias", "copy"),
    "h.{i}.mlp.c_proj.weight": ("layers.{i}.ffn.fc2.weight", "t"),           # (F, d) -> (d, F)
    "h.{i}.mlp.c_proj.bias": ("layers.{i}.ffn.fc2.bias", "copy"),
    "ln_f.weight": ("norm.weight", "copy"),
    "ln_f.bias": ("norm.bias", "copy"),
    "lm_head.weight": ("lm_head.weight", "copy"),                            # untied only (V, d)
}
# buffers some GPT-2 checkpoints carry: the causal mask and its fill value; not weights
GPT2_IGNORED = ("h.{i}.attn.bias", "h.{i}.attn.masked_bias")

LLAMA_KEYS: dict[str, tuple] = {
    "model.embed_tokens.weight": ("embed.weight", "copy"),                   # (V, d)
    "model.layers.{i}.input_layernorm.weight": ("layers.{i}.norm1.weight", "copy"),
    "model.layers.{i}.self_attn.q_proj.weight": ("layers.{i}.self_attn.q_proj.weight", "copy"),  # (Hq*D, d)
    "model.layers.{i}.self_attn.k_proj.weight": ("layers.{i}.self_attn.k_proj.weight", "copy"),  # (Hkv*D, d)
    "model.layers.{i}.self_attn.v_proj.weight": ("layers.{i}.self_attn.v_proj.weight", "copy"),  # (Hkv*D, d)
    "model.layers.{i}.self_attn.o_proj.weight": ("layers.{i}.self_attn.o_proj.weight", "copy"),  # (d, Hq*D)
    "model.layers.{i}.self_attn.q_proj.bias": ("layers.{i}.self_attn.q_proj.bias", "copy"),
    "model.layers.{i}.self_attn.k_proj.bias": ("layers.{i}.self_attn.k_proj.bias", "copy"),
    "model.layers.{i}.self_attn.v_proj.bias": ("layers.{i}.self_attn.v_proj.bias", "copy"),
    "model.layers.{i}.self_attn.o_proj.bias": ("layers.{i}.self_attn.o_proj.bias", "copy"),
    "model.layers.{i}.post_attention_layernorm.weight": ("layers.{i}.norm2.weight", "copy"),
    "model.layers.{i}.mlp.gate_proj.weight": ("layers.{i}.ffn.gate_proj.weight", "copy"),       # (F, d)
    "model.layers.{i}.mlp.up_proj.weight": ("layers.{i}.ffn.up_proj.weight", "copy"),           # (F, d)
    "model.layers.{i}.mlp.down_proj.weight": ("layers.{i}.ffn.down_proj.weight", "copy"),       # (d, F)
    "model.layers.{i}.mlp.gate_proj.bias": ("layers.{i}.ffn.gate_proj.bias", "copy"),
    "model.layers.{i}.mlp.up_proj.bias": ("layers.{i}.ffn.up_proj.bias", "copy"),
    "model.layers.{i}.mlp.down_proj.bias": ("layers.{i}.ffn.down_proj.bias", "copy"),
    "model.norm.weight": ("norm.weight", "copy"),
    "lm_head.weight": ("lm_head.weight", "copy"),                            # untied only (V, d)
}
# RoPE frequency buffers older checkpoints saved; derived from the config, not weights
LLAMA_IGNORED = ("model.layers.{i}.self_attn.rotary_emb.inv_freq", "model.rotary_emb.inv_freq")

BERT_KEYS: dict[str, tuple] = {
    # names without the optional "bert." prefix (BertFor* wrappers have it, BertModel not)
    "embeddings.word_embeddings.weight": ("embed.weight", "copy"),                           # (V, d)
    "embeddings.position_embeddings.weight": ("pos_embed.weight", "copy"),                   # (P, d)
    "embeddings.token_type_embeddings.weight": ("type_embed.weight", "copy"),                # (S, d)
    "embeddings.LayerNorm.weight": ("embed_norm.weight", "copy"),
    "embeddings.LayerNorm.bias": ("embed_norm.bias", "copy"),
    "encoder.layer.{i}.attention.self.query.weight": ("layers.{i}.self_attn.q_proj.weight", "copy"),  # (d, d)
    "encoder.layer.{i}.attention.self.query.bias": ("layers.{i}.self_attn.q_proj.bias", "copy"),
    "encoder.layer.{i}.attention.self.key.weight": ("layers.{i}.self_attn.k_proj.weight", "copy"),
    "encoder.layer.{i}.attention.self.key.bias": ("layers.{i}.self_attn.k_proj.bias", "copy"),
    "encoder.layer.{i}.attention.self.value.weight": ("layers.{i}.self_attn.v_proj.weight", "copy"),
    "encoder.layer.{i}.attention.self.value.bias": ("layers.{i}.self_attn.v_proj.bias", "copy"),
    "encoder.layer.{i}.attention.output.dense.weight": ("layers.{i}.self_attn.o_proj.weight", "copy"),
    "encoder.layer.{i}.attention.output.dense.bias": ("layers.{i}.self_attn.o_proj.bias", "copy"),
    "encoder.layer.{i}.attention.output.LayerNorm.weight": ("layers.{i}.norm1.weight", "copy"),  # post-norm
    "encoder.layer.{i}.attention.output.LayerNorm.bias": ("layers.{i}.norm1.bias", "copy"),
    "encoder.layer.{i}.intermediate.dense.weight": ("layers.{i}.ffn.fc1.weight", "copy"),       # (F, d)
    "encoder.layer.{i}.intermediate.dense.bias": ("layers.{i}.ffn.fc1.bias", "copy"),
    "encoder.layer.{i}.output.dense.weight": ("layers.{i}.ffn.fc2.weight", "copy"),             # (d, F)
    "encoder.layer.{i}.output.dense.bias": ("layers.{i}.ffn.fc2.bias", "copy"),
    "encoder.layer.{i}.output.LayerNorm.weight": ("layers.{i}.norm2.weight", "copy"),
    "encoder.layer.{i}.output.LayerNorm.bias": ("layers.{i}.norm2.bias", "copy"),
}
# the position-id and token-type-id buffers some checkpoints carry, and the pooler (not modelled)
BERT_IGNORED = ("embeddings.position_ids", "embeddings.token_type_ids", "pooler.dense.weight", "pooler.dense.bias")
# prefixes of the task heads of the BertFor* models, refused with a hint
_BERT_HEADS = ("cls.", "classifier.", "qa_outputs.")

_TABLES = {"gpt2": (GPT2_KEYS, GPT2_IGNORED, "wte.weight"),
           "llama": (LLAMA_KEYS, LLAMA_IGNORED, "model.embed_tokens.weight"),
           "mistral": (LLAMA_KEYS, LLAMA_IGNORED, "model.embed_tokens.weight"),
           "bert": (BERT_KEYS, BERT_IGNORED, "embeddings.word_embeddings.weight"),
           "vit": (VIT_KEYS, VIT_IGNORED, "embeddings.patch_embeddings.projection.weight")}
# the optional prefix of each family's names (GPT2LMHeadModel vs GPT2Model, BertFor* vs BertModel, ViTFor*)
_PREFIXES = {"gpt2": "transformer.", "bert": "bert.", "vit": "vit."}

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "bert", "vit", QKV_VIT)
SUPPORTED_ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "GPT2Model": "gpt2", "LlamaForCausalLM": "llama",
                           "MistralForCausalLM": "mistral", "BertModel": "bert", "ViTModel": "vit",
                           "ViTForImageClassification": "vit"}
_MODEL_CLASSES = ((ViTConfig, ViT), (EncoderConfig, Encoder), (DecoderConfig, Decoder))
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# Hugging Face activation names -> qkv's (GPT-2 and BERT families; Llama/Mistral must be "silu" = swiglu)
_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
_BERT_ACTIVATIONS = _GPT2_ACTIVATIONS



# -----------------------------------------------------------------------------
# config.json -> DecoderConfig / EncoderConfig


def config_from_hf(hf: Mapping) -> DecoderConfig | EncoderConfig:
    """Translate a Hugging Face `config.json` (as a dict) into a `DecoderConfig` (or an
    `EncoderConfig` for BERT).

    GPT-2: n_embd, n_layer, n_head, vocab_size, n_positions, n_inner (None: 4 n_embd),
    layer_norm_epsilon, activation_function ("gelu_new"/"gelu_pytorch_tanh" -> gelu_tanh,
    "gelu", "relu"), tie_word_embeddings. Refused: scale_attn_weights=false,
    scale_attn_by_inverse_layer_idx=true, add_cross_attention=true.

    Llama / Mistral: hidden_size, intermediate_size, num_hidden_layers,
    num_attention_heads, num_key_value_heads, head_dim (absent or null:
    hidden_size / heads), rms_norm_eps, max_position_embeddings, hidden_act ("silu"
    only: the gated swiglu MLP), attention_bias and mlp_bias (equal), tie_word_embeddings,
    sliding_window (Mistral; null = none), and RoPE as transformers 5 writes it
    (`rope_parameters` {"rope_type", "rope_theta", "factor", ...}) or as older versions
    did (`rope_theta` + `rope_scaling` {"type" or "rope_type", "factor", ...}).
    RoPE types: default, linear, llama3; others (dynamic, yarn, longrope, ...) are refused.

    BERT (model_type "bert", architecture BertModel): hidden_size, num_hidden_layers,
    num_attention_heads, intermediate_size, vocab_size, max_position_embeddings,
    type_vocab_size, layer_norm_eps, hidden_act ("gelu" exact; "gelu_new" /
    "gelu_pytorch_tanh" -> gelu_tanh; "relu"), hidden_dropout_prob (qkv's one dropout
    rate, also used on the attention weights; it matters in training mode only),
    pad_token_id. Refused: position_embedding_type other than "absolute",
    is_decoder=true, add_cross_attention=true, and the BertFor* task heads.

    Missing optional fields take transformers' defaults for that model type.
    """
    if not isinstance(hf, Mapping):
        raise TypeError(f"config_from_hf takes the parsed config.json (a dict), got {type(hf).__name__}")
    arch = _model_type(hf)
    try:
        if arch == "gpt2":
            return _gpt2_config(hf)
        if arch == "bert":
            return _bert_config(hf)
        if arch in ("vit", QKV_VIT):
            return vit_config_from_hf(hf)
        return _llama_config(hf, arch)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ValueError) and str(exc).startswith("config.json"):
            raise
        raise ValueError(f"config.json describes a model qkv cannot build: {exc}") from exc


def _model_type(hf: Mapping) -> str:
    supported = (f"supported: model_type {', '.join(map(repr, SUPPORTED_MODEL_TYPES))} "
                 f"(architectures {', '.join(SUPPORTED_ARCHITECTURES)})")
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    if model_type is None:
        known = [SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES]
        if not known:
            raise ValueError(f"config.json has no model_type and architectures {list(archs)} are not known; "
                             f"{supported}")
        model_type = known[0]
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"config.json: model_type {model_type!r} is not supported; {supported}")
    for a in archs:
        if SUPPORTED_ARCHITECTURES.get(a) != model_type:
            if model_type == "bert":
                raise ValueError(
                    f"config.json: architecture {a!r} (model_type 'bert') is not supported: qkv imports the bare "
                    f"BERT encoder (BertModel), not task heads. To use this checkpoint's encoder, re-save it "
                    f"once with transformers: BertModel.from_pretrained(dir).save_pretrained(out, "
                    f"safe_serialization=True); {supported}")
            raise ValueError(f"config.json: architecture {a!r} (model_type {model_type!r}) is not supported: "
                             f"qkv imports decoder language models, the bare BERT encoder and ViT (ViTModel, "
                             f"ViTForImageClassification) only; {supported}")
    return model_type


def _req(hf: Mapping, *names: str):
    """The first of `names` present and not null in the config (aliases), else an error."""
    for n in names:
        if hf.get(n) is not None:
            return hf[n]
    raise ValueError(f"config.json lacks {names[0]!r}, which qkv needs to size the model")


def _int(hf: Mapping, name: str, value) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"config.json: {name} must be an integer, got {value!r}")
    return value


def _num(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"config.json: {name} must be a finite number, got {value!r}")
    return float(value)


def _gpt2_config(hf: Mapping) -> DecoderConfig:
    if hf.get("scale_attn_weights", True) is not True:
        raise ValueError("config.json: scale_attn_weights=false (attention scores not divided by sqrt(head_dim)) "
                         "is not supported by qkv")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError("config.json: scale_attn_by_inverse_layer_idx=true (scores scaled by 1/(layer+1)) is not "
                         "supported by qkv")
    if hf.get("add_cross_attention", False):
        raise ValueError("config.json: add_cross_attention=true (an encoder-decoder GPT-2) is not supported by qkv")
    # reorder_and_upcast_attn only changes how the scores are rounded: ignored
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTIVATIONS:
        raise ValueError(f"config.json: activation_function {act!r} is not supported; supported: "
                         f"{', '.join(map(repr, _GPT2_ACTIVATIONS))}")
    d = _int(hf, "n_embd", _req(hf, "n_embd", "hidden_size"))
    n_inner = hf.get("n_inner")
    return DecoderConfig.gpt2(
        vocab_size=_int(hf, "vocab_size", _req(hf, "vocab_size")),
        d_model=d,
        n_layers=_int(hf, "n_layer", _req(hf, "n_layer", "num_hidden_layers")),
        n_heads=_int(hf, "n_head", _req(hf, "n_head", "num_attention_heads")),
        ffn_hidden=4 * d if n_inner is None else _int(hf, "n_inner", n_inner),
        activation=_GPT2_ACTIVATIONS[act],
        norm_eps=_num("layer_norm_epsilon", hf.get("layer_norm_epsilon", 1e-5)),
        max_positions=_int(hf, "n_positions", hf.get("n_positions", hf.get("n_ctx", 1024))),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def _bert_config(hf: Mapping) -> EncoderConfig:
    kind = hf.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise ValueError(f"config.json: position_embedding_type {kind!r} is not supported; qkv's encoder has "
                         f"learned absolute positions only ('absolute')")
    if hf.get("is_decoder", False):
        raise ValueError("config.json: is_decoder=true (BERT as a causal decoder) is not supported; qkv imports "
                         "BERT as a bidirectional encoder")
    if hf.get("add_cross_attention", False):
        raise ValueError("config.json: add_cross_attention=true (BERT with cross-attention) is not supported")
    act = hf.get("hidden_act", "gelu")
    if act not in _BERT_ACTIVATIONS:
        raise ValueError(f"config.json: hidden_act {act!r} is not supported for bert; supported: "
                         f"{', '.join(map(repr, _BERT_ACTIVATIONS))}")
    pad = hf.get("pad_token_id", 0)
    return EncoderConfig(
        vocab_size=_int(hf, "vocab_size", _req(hf, "vocab_size")),
        d_model=_int(hf, "hidden_size", _req(hf, "hidden_size")),
        n_layers=_int(hf, "num_hidden_layers", _req(hf, "num_hidden_layers")),
        n_heads=_int(hf, "num_attention_heads", _req(hf, "num_attention_heads")),
        ffn_hidden=_int(hf, "intermediate_size", _req(hf, "intermediate_size")),
        max_positions=_int(hf, "max_position_embeddings", hf.get("max_position_embeddings", 512)),
        type_vocab_size=_int(hf, "type_vocab_size", hf.get("type_vocab_size", 2)),
        norm_eps=_num("layer_norm_eps", hf.get("layer_norm_eps", 1e-12)),
        activation=_BERT_ACTIVATIONS[act],
        dropout=_num("hidden_dropout_prob", hf.get("hidden_dropout_prob", 0.1)),
        pad_token_id=None if pad is None else _int(hf, "pad_token_id", pad),
    )


def _llama_config(hf: Mapping, arch: str) -> DecoderConfig:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json: hidden_act {act!r} is not supported for {arch}; qkv's gated MLP is "
                         f"swiglu, i.e. hidden_act 'silu'")
    attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attn_bias != mlp_bias:
        raise ValueError(f"config.json: attention_bias={attn_bias} but mlp_bias={mlp_bias}; qkv has one bias "
                         f"switch for every projection, so they must be equal")
    heads = _int(hf, "num_attention_heads", _req(hf, "num_attention_heads"))
    d = _int(hf, "hidden_size", _req(hf, "hidden_size"))
    kv_heads = hf.get("num_key_value_heads")
    head_dim = hf.get("head_dim")
    max_pos = _int(hf, "max_position_embeddings",
                   hf.get("max_position_embeddings", 2048 if arch == "llama" else 4096 * 32))
    base, scaling = _rope_from_hf(hf, max_pos)
    window = None
    if arch == "mistral":
        window = hf.get("sliding_window", 4096)   # MistralConfig's default when the key is absent
        window = None if window is None else _int(hf, "sliding_window", window)
    preset = DecoderConfig.llama if arch == "llama" else DecoderConfig.mistral
    return preset(
        vocab_size=_int(hf, "vocab_size", _req(hf, "vocab_size")),
        d_model=d,
        n_layers=_int(hf, "num_hidden_layers", _req(hf, "num_hidden_layers")),
        n_heads=heads,
        n_kv_heads=heads if kv_heads is None else _int(hf, "num_key_value_heads", kv_heads),
        head_dim=None if head_dim is None else _int(hf, "head_dim", head_dim),
        ffn_hidden=_int(hf, "intermediate_size", _req(hf, "intermediate_size")),
        norm_eps=_num("rms_norm_eps", hf.get("rms_norm_eps", 1e-6)),
        bias=attn_bias,
        max_positions=max_pos,
        rope_base=base,
        rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=window,
    )


def _rope_from_hf(hf: Mapping, max_pos: int) -> tuple[float, dict | None]:
    """(rope_base, DecoderConfig.rope_scaling) from either transformers layout."""
    params = hf.get("rope_parameters")
    if params is None:                          # transformers < 5: rope_theta + rope_scaling
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    if not isinstance(params, Mapping):
        raise ValueError(f"config.json: rope_parameters must be a dict, got {params!r}")
    if params and all(isinstance(v, Mapping) for v in params.values()):
        raise ValueError(f"config.json: per-layer-type RoPE parameters ({sorted(params)}) are not supported")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"config.json: RoPE type {kind!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_ROPE_TYPES)} (qkv has no dynamic, yarn or longrope scaling)")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        raise ValueError(f"config.json: partial_rotary_factor={partial} is not supported (qkv rotates whole heads)")
    theta = params.get("rope_theta")
    theta = hf.get("rope_theta") if theta is None else theta
    base = _num("rope_theta", 10000.0 if theta is None else theta)
    if kind == "default":
        return base, None
    if params.get("factor") is None:
        raise ValueError(f"config.json: RoPE type {kind!r} needs a 'factor'")
    scaling = {"type": kind, "factor": _num("rope factor", params["factor"])}
    if kind == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if params.get(key) is None:
                raise ValueError(f"config.json: RoPE type 'llama3' needs {key!r}")
            scaling[key] = _num(key, params[key])
        original = params.get("original_max_position_embeddings",
                              hf.get("original_max_position_embeddings", max_pos))
        scaling["original_max_positions"] = _int(hf, "original_max_position_embeddings", original)
    return base, scaling


def config_to_hf(config: DecoderConfig | EncoderConfig) -> dict:
    """The `config.json` dict transformers needs to rebuild `config` (the inverse of `config_from_hf`).

    An EncoderConfig becomes a BertModel. For a DecoderConfig the family is read from
    the structure: learned positions -> GPT-2; RoPE without windows -> Llama; RoPE with
    one window on every layer -> Mistral. Configs outside those shapes (e.g. ntk RoPE
    scaling, per-layer windows, GQA in GPT-2, approximate attention) are refused.
    """
    c = config
    if isinstance(c, EncoderConfig):
        return _bert_config_to_hf(c)
    if isinstance(c, ViTConfig):
        return vit_config_to_hf(c)
    if not isinstance(c, DecoderConfig):
        raise TypeError(f"config must be a DecoderConfig or EncoderConfig, got {type(c).__name__}")

    def refuse(why):
        raise ValueError(f"this DecoderConfig has no Hugging Face equivalent: {why}")

    if c.attention != "exact":
        refuse(f"attention={c.attention!r} is approximate, and transformers would load the weights into softmax "
               f"attention and silently compute something else; keep such a model as qkv state "
               f"(torch.save(model.state_dict()) with config.to_dict()), or train it with attention='exact'")
    if c.positions == "learned":
        acts = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
        if c.norm != "layer" or not c.bias or c.activation not in acts:
            refuse("GPT-2 (learned positions) needs norm='layer', bias=True and a gelu_tanh/gelu/relu MLP")
        if c.n_kv_heads != c.n_heads or c.head_dim * c.n_heads != c.d_model or any(c.windows()):
            refuse("GPT-2 has no GQA, no separate head_dim and no sliding window")
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
                "n_embd": c.d_model, "n_layer": c.n_layers, "n_head": c.n_heads, "n_positions": c.max_positions,
                "n_inner": c.ffn_hidden, "activation_function": acts[c.activation],
                "layer_norm_epsilon": c.norm_eps, "tie_word_embeddings": c.tie_embeddings,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "bos_token_id": None, "eos_token_id": None}
    if c.norm != "rms" or c.activation != "swiglu":
        refuse("Llama/Mistral (RoPE) need norm='rms' and a swiglu MLP")
    windows = c.windows()
    if any(w is not None for w in windows) and len(set(windows)) != 1:
        refuse(f"per-layer windows {windows} (Mistral uses one window on every layer)")
    rope = {"rope_type": "default", "rope_theta": c.rope_base}
    if c.rope_scaling is not None:
        kind = c.rope_scaling["type"]
        if kind not in ("linear", "llama3"):
            refuse(f"RoPE scaling {kind!r}")
        rope.update(rope_type=kind, factor=c.rope_scaling["factor"])
        if kind == "llama3":
            rope.update(low_freq_factor=c.rope_scaling.get("low_freq_factor", 1.0),
                        high_freq_factor=c.rope_scaling.get("high_freq_factor", 4.0),
                        original_max_position_embeddings=c.rope_scaling["original_max_positions"])
    out = {"vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": c.ffn_hidden,
           "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
           "head_dim": c.head_dim, "hidden_act": "silu", "rms_norm_eps": c.norm_eps,
           "max_position_embeddings": c.max_positions, "tie_word_embeddings": c.tie_embeddings,
           "rope_parameters": rope, "bos_token_id": None, "eos_token_id": None}
    if windows[0] is None:
        out.update(architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=c.bias, mlp_bias=c.bias)
    else:
        if c.bias:
            refuse("Mistral has no biases")
        out.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=windows[0])
    return out


def _bert_config_to_hf(c: EncoderConfig) -> dict:
    acts = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
    return {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": c.vocab_size,
            "hidden_size": c.d_model, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
            "intermediate_size": c.ffn_hidden, "hidden_act": acts[c.activation],
            "hidden_dropout_prob": c.dropout, "attention_probs_dropout_prob": c.dropout,
            "max_position_embeddings": c.max_positions, "type_vocab_size": c.type_vocab_size,
            "layer_norm_eps": c.norm_eps, "pad_token_id": c.pad_token_id, "position_embedding_type": "absolute",
            "is_decoder": False, "add_cross_attention": False}


def _weight_files(directory: Path) -> tuple[list[Path], dict | None]:
    """The safetensors files of a checkpoint directory (and the index's weight_map, if sharded)."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    for f in (single, index):
        if f.exists() and not f.is_file():
            raise ValueError(f"{f} is {'a directory' if f.is_dir() else 'not a regular file'}; expected a file")
    if single.is_file():
        return [single], None
    if index.is_file():
        need = "JSON with a 'weight_map' of tensor name -> shard file"
        raw = read_json(index, f"a sharded checkpoint's index ({need})")
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: not a valid index: need {need}")
        shards = sorted(set(weight_map.values()))
        for s in shards:   # a plain name: no "..", no "/", no absolute path can lead outside the directory
            if Path(s).name != s or s in (".", "..") or "\\" in s or "\0" in s or not s.endswith(".safetensors"):
                raise ValueError(f"{index}: shard {s!r} must be a .safetensors file name inside {directory}")
        absent = [s for s in shards if not (directory / s).is_file()]
        if absent:
            raise ValueError(f"{index} lists shard(s) {absent} that are not in {directory} as regular files")
        return [directory / s for s in shards], weight_map
    files = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    if files:
        return files, None
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{directory} holds only pickle-format weights ({', '.join(pickles[:3])}); "
                         f"{PICKLE_RECIPE}")
    raise ValueError(f"{directory} has no weights: expected model.safetensors or model.safetensors.index.json "
                     f"with its shards")


# -----------------------------------------------------------------------------
# Renaming and checking


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _listing(keys, n: int = 5) -> str:
    keys = sorted(keys, key=_natural)
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"\d+") + "$")


def _expected(table: dict, n_layers: int, shapes: dict[str, torch.Size]) -> dict[str, tuple]:
    """{HF name: (qkv names, conversion, the HF tensor's expected shape)} for one model."""
    out = {}
    for hf_t, (qkv_t, how) in table.items():
        for i in (range(n_layers) if "{i}" in hf_t else [None]):
            names = (qkv_t,) if isinstance(qkv_t, str) else qkv_t
            names = tuple(n.replace("{i}", str(i)) for n in names)
            if not all(n in shapes for n in names):
                continue
            tgt = [tuple(shapes[n]) for n in names]
            if how == "copy":
                src = tgt[0]
            elif how == "t":
                src = tgt[0][::-1]
            elif how == "t_split":   # (out_q + out_k + out_v, in) transposed
                src = (tgt[0][1], sum(s[0] for s in tgt))
            else:                    # "split"
                src = (sum(s[0] for s in tgt),)
            out[hf_t.replace("{i}", str(i))] = (names, how, src)
    return out


def _convert(x: Tensor, how: str, shapes: list[tuple], views: bool = False) -> list[Tensor]:
    """x in qkv's layout: as is, transposed, and/or split; `views`: strided views of x (for a
    caller that copies them into place anyway), else contiguous tensors."""
    if how == "copy":
        return [x]
    parts = [x.t()] if how == "t" else x.t().split([s[0] for s in shapes], dim=0) if how == "t_split" else \
        x.split([s[0] for s in shapes], dim=0)
    return list(parts) if views else [p.contiguous() for p in parts]


def _layer_hint(keys, n_layers: int) -> str:
    idx = {int(m.group(1)) for k in keys if (m := re.search(r"(?:^|\.)(?:h|layers|layer)\.(\d+)\.", k))}
    if idx and (max(idx) >= n_layers):
        return f" (the checkpoint has layer index {max(idx)}, but config.json sets {n_layers} layer(s))"
    return ""


_LAYER_SLACK = 8   # more missing layers than this are refused before the model's shapes are built


def _check_sizes(source: Source, names: dict[str, str], config, arch: str, embed_key: str) -> None:
    """Compare the sizes config.json claims with the checkpoint's headers before any model
    is built: even on the meta device, building allocates RoPE tables of head_dim entries
    and a few milliseconds of Python objects per layer, so a corrupt or hostile config
    (hidden_size 10**9, 10**6 layers) must be refused here, cheaply."""
    if arch == "vit":
        want = {embed_key: (config.d_model, config.channels, *config.patch_size)}
    else:
        want = {embed_key: (config.vocab_size, config.d_model)}
    if arch in ("llama", "mistral"):
        want["model.layers.0.self_attn.q_proj.weight"] = (config.n_heads * config.head_dim, config.d_model)
    wrong = [f"{names[k]}: expected {shape}, got {tuple(source.shape(names[k]))}" for k, shape in want.items()
             if k in names and tuple(source.shape(names[k])) != shape]
    if wrong:
        raise ValueError(f"tensor shapes do not match config.json: {'; '.join(wrong)}")
    held = {int(m.group(1)) for k in names if (m := re.search(r"(?:^|\.)(?:h|layers|layer)\.(\d+)\.", k))}
    if config.n_layers > len(held) + _LAYER_SLACK:
        raise ValueError(f"config.json sets {config.n_layers} layers but the checkpoint holds tensors for "
                         f"{len(held)}; the checkpoint lacks the rest: does config.json match the weights?")


def state_dict_from_hf(tensors, config: DecoderConfig | EncoderConfig, *, dtype: torch.dtype | None = None,
                       device=None, _views: bool = False) -> dict[str, Tensor]:
    """Rename and convert Hugging Face tensors into a `Decoder(config)` (or `Encoder(config)`) state dict.

    `tensors`: a mapping of HF names to tensors (e.g. `hf_model.state_dict()`). Uses
    the table of `config.arch` (GPT2_KEYS, or LLAMA_KEYS for llama and mistral),
    BERT_KEYS for an EncoderConfig, VIT_KEYS for a ViTConfig.
    Checks, before converting anything: no tensor the model needs is missing; none is
    left over (ignoring known buffers such as GPT-2's attn.bias mask); every shape
    matches what config implies; every tensor is floating point. A tied LM head
    present in the checkpoint must equal the embedding. Everything is cast to
    `dtype` (default: the checkpoint's float dtype when all tensors share one, else
    float32) and moved to `device`.
    """
    source = tensors if isinstance(tensors, Source) else Memory(tensors)
    if isinstance(config, EncoderConfig):
        arch, model_cls = "bert", Encoder
    elif isinstance(config, ViTConfig):
        arch, model_cls = "vit", ViT
    elif isinstance(config, DecoderConfig):
        decoders = sorted(a for a in _TABLES if a not in ("bert", "vit"))
        if config.arch not in decoders:
            raise ValueError(f"config.arch must be one of {decoders} to pick a key mapping, got {config.arch!r}")
        arch, model_cls = config.arch, Decoder
    else:
        raise TypeError(f"config must be a DecoderConfig, EncoderConfig or ViTConfig, got {type(config).__name__}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")
    table, ignored, embed_key = _TABLES[arch]

    # checkpoint name -> canonical (table) name; GPT-2's "transformer." and BERT's "bert." prefixes are optional
    prefix = _PREFIXES.get(arch)
    names: dict[str, str] = {}
    for k in source.keys():
        canon = k[len(prefix):] if prefix is not None and k.startswith(prefix) else k
        if canon in names:
            raise ValueError(f"the checkpoint holds both {names[canon]!r} and {k!r}")
        names[canon] = k
    _check_sizes(source, names, config, arch, embed_key)
    shapes = {k: v.shape for k, v in meta_model(model_cls, config).state_dict().items()}
    expected = _expected(table, config.n_layers, shapes)
    ignore = [_pattern(p) for p in ignored]
    present = {c for c in names if not any(p.match(c) for p in ignore)}

    tied_head = None
    if getattr(config, "tie_embeddings", False) and "lm_head.weight" in present:
        present.discard("lm_head.weight")     # checked against the embedding below
        tied_head = names["lm_head.weight"]

    missing = sorted(set(expected) - present, key=_natural)
    unexpected = sorted(present - set(expected), key=_natural)
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensor(s) the {arch} model needs: "
                         f"{_listing(missing)}{_layer_hint(missing, config.n_layers)}; does config.json match "
                         f"the weights?")
    heads = sorted({k.split(".")[0] + ".*" for k in unexpected if k.startswith(_BERT_HEADS)}) if arch == "bert" else []
    if heads:
        raise ValueError(f"the checkpoint holds a task head ({', '.join(heads)}: {_listing(unexpected)}) that qkv's "
                         f"BERT encoder does not model; qkv imports the bare encoder (BertModel). Re-save the "
                         f"encoder once with transformers: BertModel.from_pretrained(dir).save_pretrained(out, "
                         f"safe_serialization=True)")
    if unexpected:
        raise ValueError(f"the checkpoint has {len(unexpected)} tensor(s) config.json does not account for: "
                         f"{_listing(unexpected)}{_layer_hint(unexpected, config.n_layers)}; does config.json "
                         f"match the weights?")
    wrong = [f"{names[c]}: expected {tuple(expected[c][2])}, got {source.shape(names[c])}"
             for c in sorted(expected, key=_natural) if tuple(source.shape(names[c])) != tuple(expected[c][2])]
    if tied_head is not None and tuple(source.shape(tied_head)) != tuple(expected[embed_key][2]):
        wrong.append(f"{tied_head}: expected {tuple(expected[embed_key][2])}, got {source.shape(tied_head)}")
    if wrong:
        more = f" ... ({len(wrong)} in all)" if len(wrong) > 5 else ""
        raise ValueError(f"tensor shapes do not match config.json: {'; '.join(wrong[:5])}{more}")
    dtypes = {source.dtype(names[c]) for c in expected}
    odd = sorted({str(d) for d in dtypes if not isinstance(d, torch.dtype)})
    if odd:
        raise ValueError(f"the checkpoint stores weights as {', '.join(odd)}; qkv loads float64/32/16 and "
                         f"bfloat16 only (quantized checkpoints must be dequantized first)")
    if dtype is None:
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32

    data = source.read([names[c] for c in expected] + ([tied_head] if tied_head else []))
    if tied_head is not None and not torch.equal(data[tied_head], data[names[embed_key]]):
        raise ValueError(f"config.json ties the LM head to the embedding (tie_word_embeddings=true) but the "
                         f"checkpoint's {tied_head} differs from {names[embed_key]}; set tie_word_embeddings to "
                         f"false if the head is separate")
    out: dict[str, Tensor] = {}
    for c, (targets, how, _) in expected.items():
        for t, x in zip(targets, _convert(data[names[c]], how, [tuple(shapes[t]) for t in targets], _views)):
            out[t] = x.to(device=device, dtype=dtype)
    if set(out) != set(shapes):   # the tables cover every parameter; a gap here is a bug in them
        raise RuntimeError(f"internal: the {arch} key table leaves {sorted(set(shapes) - set(out))} unset")
    return out


# -----------------------------------------------------------------------------
# Public entry points


def _directory(path) -> Path:
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    directory = Path(path)
    if not directory.exists():
        raise ValueError(f"{directory} does not exist; pass a checkpoint directory (config.json + *.safetensors)")
    if not directory.is_dir():
        if directory.suffix in PICKLE_SUFFIXES:
            raise ValueError(f"{directory} is a pickle file; {PICKLE_RECIPE}, and pass that directory")
        raise ValueError(f"{directory} is a file; pass the checkpoint directory that holds config.json and the "
                         f"*.safetensors files")
    return directory


def read_config(path) -> dict:
    """The parsed config.json of a checkpoint directory."""
    directory = _directory(path)
    file = directory / "config.json"
    if not file.exists():
        raise ValueError(f"{directory} has no config.json; a Hugging Face checkpoint directory needs config.json "
                         f"(the architecture and sizes) next to its *.safetensors weights")
    hf = read_json(file, "a Hugging Face config (a JSON object)")   # ValueError naming the file and the problem
    if not isinstance(hf, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(hf).__name__}")
    return hf


def _as_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "float": torch.float32, "float64": torch.float64, "double": torch.float64,
             "float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16}
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in names:
        return names[dtype.removeprefix("torch.")]
    raise TypeError(f"dtype must be a torch float dtype or one of {sorted(names)}, got {dtype!r}")


def _model_class(config):
    for config_cls, model_cls in _MODEL_CLASSES:
        if isinstance(config, config_cls):
            return model_cls
    raise TypeError(f"config must be a DecoderConfig, EncoderConfig or ViTConfig, got {type(config).__name__}")


def parameter_count(config: DecoderConfig | EncoderConfig | ViTConfig) -> int:
    """How many parameters a model of `config` holds (built on the meta device: no memory)."""
    return sum(p.numel() for p in meta_model(_model_class(config), config).parameters())


def _check_expect(expect, config, raw: dict, directory: Path) -> None:
    """ValueError unless the model `config` builds is one of the classes in `expect`."""
    if expect is None:
        return
    wanted = expect if isinstance(expect, tuple) else (expect,)
    if not wanted or not all(isinstance(w, type) for w in wanted):
        raise TypeError(f"expect must be a model class (e.g. qkv.models.ViT) or a tuple of them, got {expect!r}")
    got = _model_class(config)
    if not issubclass(got, wanted):
        names = " or ".join(w.__name__ for w in wanted)
        kind = raw.get("model_type") or "/".join(raw.get("architectures") or []) or "unknown"
        hint = (" (config.json model_type 'vit': ViTModel / ViTForImageClassification, or a qkv ViT checkpoint)"
                if ViT in wanted else "")
        raise ValueError(f"{directory} holds a {kind!r} checkpoint, which loads as a qkv {got.__name__}, but a "
                         f"{names} is expected here; pass a {names} checkpoint directory{hint}")


def load(path, *, dtype=None, device=None, backend: str = "auto", expect=None) -> Decoder | Encoder | ViT:
    """Load a Hugging Face GPT-2 / Llama / Mistral checkpoint directory as a `Decoder`, a
    BERT one (model_type "bert", BertModel) as an `Encoder`, a ViT one (model_type "vit",
    ViTModel / ViTForImageClassification, or qkv's "qkv_vit") as a `ViT` (in eval mode).

    `path`: a directory with config.json and model.safetensors (or shards listed in
    model.safetensors.index.json). `dtype`: the parameters' dtype (default: the
    checkpoint's, when all its weights share one float dtype, else float32).
    `device`, `backend`: as for `Decoder` / `Encoder` / `ViT`. `expect`: a model class
    (e.g. `qkv.models.ViT`) or a tuple of them: a checkpoint of another kind is refused
    (ValueError naming both) before any weights are read.

    Every problem is a ValueError naming what to fix: a missing config.json, an
    unsupported model type or option, pickle-only weights, a corrupt or truncated
    file, tensors missing, left over or of the wrong shape. Nothing is returned
    half-loaded: all checks pass before the model is filled.
    """
    directory = _directory(path)
    raw = read_config(directory)
    files, weight_map = _weight_files(directory)      # pickle-only weights are refused before the config is parsed
    try:
        config = config_from_hf(raw)
        _check_expect(expect, config, raw, directory)
        source = Safetensors(files, weight_map)
        if isinstance(config, ViTConfig):         # ViTModel's pooler is a constructor argument: the weights tell
            config = with_checkpoint_pooler(config, raw, source.keys())
        # views, not copies: load_state_dict below copies each into the model's own buffer
        state = state_dict_from_hf(source, config, dtype=_as_dtype(dtype), device=device,
                                   _views=True)
    except ValueError as exc:                         # say which checkpoint, once
        if str(directory) in str(exc):
            raise
        raise ValueError(f"{directory}: {exc}") from exc
    model_cls = _model_class(config)
    # every parameter comes from `state` (strict): drawing random ones first would be wasted
    model = uninitialised(model_cls, config, backend=backend, device=device, dtype=next(iter(state.values())).dtype)
    model.load_state_dict(state, strict=True)
    return model.eval()


def state_dict_to_hf(model: Decoder | Encoder | ViT) -> dict[str, Tensor]:
    """The inverse of `state_dict_from_hf`: HF names and layouts (GPT-2 keys get the "transformer." prefix;
    an Encoder's names are BertModel's, without a prefix; a ViT with a head gets ViTForImageClassification's
    "vit." prefix on every name but classifier.*, one without a head ViTModel's plain names)."""
    if not isinstance(model, (Decoder, Encoder, ViT)):
        raise TypeError(f"model must be a qkv.models.Decoder, Encoder or ViT, got {type(model).__name__}")
    hf = config_to_hf(model.config)
    arch = "vit" if isinstance(model, ViT) else hf["model_type"]
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    state = model.state_dict()
    out = {}
    for hf_key, (targets, how, _) in _expected(_TABLES[arch][0], model.config.n_layers, shapes).items():
        parts = [state[t].detach() for t in targets]
        if how == "copy":
            x = parts[0]
        elif how == "t":
            x = parts[0].t()
        elif how == "t_split":
            x = torch.cat(parts, dim=0).t()
        else:
            x = torch.cat(parts, dim=0)
        if arch == "gpt2" and hf_key != "lm_head.weight":
            hf_key = "transformer." + hf_key
        elif arch == "vit" and model.config.num_classes is not None and not hf_key.startswith("classifier."):
            hf_key = "vit." + hf_key
        out[hf_key] = x.contiguous().cpu()
    return out


def save(model: Decoder | Encoder | ViT, path) -> None:
    """Write `model` as a Hugging Face checkpoint directory: config.json + model.safetensors.

    transformers loads it with AutoModelForCausalLM.from_pretrained(path) (an Encoder:
    BertModel.from_pretrained(path), whose pooler, not part of qkv's Encoder, then
    starts untrained; a ViT: ViTForImageClassification / ViTModel.from_pretrained(path), or a
    "qkv_vit" directory that only qkv reads when HF has no equivalent); `load` reads it back.
    The tensors keep the model's dtype.
    """
    from safetensors.torch import save_file

    if not isinstance(model, (Decoder, Encoder, ViT)):
        raise TypeError(f"model must be a qkv.models.Decoder, Encoder or ViT, got {type(model).__name__}")
    hf = config_to_hf(model.config)
    state = state_dict_to_hf(model)
    hf["dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(hf, indent=2, sort_keys=True) + "\n"
    # each file atomically (temporary file, fsync, rename); checkpoint.save makes the pair atomic
    write_atomic(directory / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    write_text_atomic(directory / "config.json", text)
