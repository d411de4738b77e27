"""Hugging Face ViT checkpoints <-> `qkv.models.ViT`: the key table and the config translation
that `qkv.models.hf` uses (load, save, config_from_hf, config_to_hf, state_dict_from_hf).

Legend: B batch, C channels, p = (ph, pw) patch, P patches, N = P + 1 tokens with [CLS],
d model width (hidden_size), F MLP hidden width (intermediate_size), K classes (num_labels).

What is imported: model_type "vit" with architecture ViTModel (with or without its pooler,
which `hf.load` detects from the checkpoint's pooler.dense.* tensors: the ViT then returns HF's
pooler_output, tanh(dense(CLS state)), from forward) or ViTForImageClassification (the
classifier over the [CLS] state: forward returns HF's logits). Names are accepted with or
without the "vit." prefix the ViTFor* wrappers write. HF's ViT always has a [CLS] token and
learned positions (pool="cls", positions="learned").

A qkv ViT that HF cannot express (pool="mean" or positions="sincos") is saved with model_type
"qkv_vit": config.json holds {"model_type": "qkv_vit", "qkv_config": ViTConfig.to_dict()} and
the weights keep the HF names below (without cls_token / position_embeddings where the model has
none). transformers refuses that model_type instead of silently building a different network;
`qkv.models.hf.load` (and so `qkv.checkpoint.load`) reads it back exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from qkv.models.config import ViTConfig

__all__ = ["VIT_KEYS", "VIT_IGNORED", "VIT_ARCHITECTURES", "QKV_VIT", "vit_config_from_hf", "vit_config_to_hf",
           "with_checkpoint_pooler", "hf_expressible"]

QKV_VIT = "qkv_vit"        # model_type of a qkv ViT with no Hugging Face equivalent
VIT_ARCHITECTURES = ("ViTModel", "ViTForImageClassification")

# Hugging Face name (without the optional "vit." prefix) -> (qkv name, conversion); all are copies:
# HF's Conv2d patch projection, (1, 1, d) token and (1, N, d) table have qkv's layouts.
VIT_KEYS: dict[str, tuple] = {
    "embeddings.cls_token": ("cls_token", "copy"),                                           # (1, 1, d)
    "embeddings.position_embeddings": ("pos_embed", "copy"),                                 # (1, N, d)
    "embeddings.patch_embeddings.projection.weight": ("patch_embed.weight", "copy"),         # (d, C, ph, pw)
    "embeddings.patch_embeddings.projection.bias": ("patch_embed.bias", "copy"),             # (d,)
    "encoder.layer.{i}.layernorm_before.weight": ("layers.{i}.norm1.weight", "copy"),        # pre-norm
    "encoder.layer.{i}.layernorm_before.bias": ("layers.{i}.norm1.bias", "copy"),
    "encoder.layer.{i}.attention.attention.query.weight": ("layers.{i}.self_attn.q_proj.weight", "copy"),  # (d, d)
    "encoder.layer.{i}.attention.attention.query.bias": ("layers.{i}.self_attn.q_proj.bias", "copy"),  # qkv_bias
    "encoder.layer.{i}.attention.attention.key.weight": ("layers.{i}.self_attn.k_proj.weight", "copy"),
    "encoder.layer.{i}.attention.attention.key.bias": ("layers.{i}.self_attn.k_proj.bias", "copy"),
    "encoder.layer.{i}.attention.attention.value.weight": ("layers.{i}.self_attn.v_proj.weight", "copy"),
    "encoder.layer.{i}.attention.attention.value.bias": ("layers.{i}.self_attn.v_proj.bias", "copy"),
    "encoder.layer.{i}.attention.output.dense.weight": ("layers.{i}.self_attn.o_proj.weight", "copy"),
    "encoder.layer.{i}.attention.output.dense.bias": ("layers.{i}.self_attn.o_proj.bias", "copy"),
    "encoder.layer.{i}.layernorm_after.weight": ("layers.{i}.norm2.weight", "copy"),
    "encoder.layer.{i}.layernorm_after.bias": ("layers.{i}.norm2.bias", "copy"),
    "encoder.layer.{i}.intermediate.dense.weight": ("layers.{i}.ffn.fc1.weight", "copy"),   # (F, d)
    "encoder.layer.{i}.intermediate.dense.bias": ("layers.{i}.ffn.fc1.bias", "copy"),
    "encoder.layer.{i}.output.dense.weight": ("layers.{i}.ffn.fc2.weight", "copy"),         # (d, F)
    "encoder.layer.{i}.output.dense.bias": ("layers.{i}.ffn.fc2.bias", "copy"),
    "layernorm.weight": ("norm.weight", "copy"),
    "layernorm.bias": ("norm.bias", "copy"),
    "pooler.dense.weight": ("pooler.weight", "copy"),                                        # ViTModel's pooler
    "pooler.dense.bias": ("pooler.bias", "copy"),
    "classifier.weight": ("head.weight", "copy"),                                            # (K, d)
    "classifier.bias": ("head.bias", "copy"),
}
VIT_IGNORED: tuple[str, ...] = ()
# Hugging Face hidden_act -> qkv activation, and back
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


def _int(name: str, value) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"config.json: {name} must be an integer, got {value!r}")
    return value


def _size(name: str, value):
    """image_size / patch_size: an int or an [h, w] list."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"config.json: {name} must be an int or [height, width], got {value!r}")
        return (_int(name, value[0]), _int(name, value[1]))
    return _int(name, value)


def _num(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"config.json: {name} must be a finite number, got {value!r}")
    return float(value)


def vit_config_from_hf(hf: Mapping) -> ViTConfig:
    """A Hugging Face ViT config.json (model_type "vit", or qkv's own "qkv_vit") as a `ViTConfig`.

    Read: hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, image_size and
    patch_size (ints or [h, w]), num_channels, hidden_act ("gelu" exact, "gelu_new" /
    "gelu_pytorch_tanh" -> gelu_tanh, "relu"), layer_norm_eps, qkv_bias, hidden_dropout_prob (qkv's
    one dropout rate). ViTForImageClassification: num_classes = the number of labels (id2label,
    else num_labels; transformers' default 2). ViTModel: no head (hf.load adds the pooler when the
    checkpoint has one). Defaults are transformers' ViTConfig defaults (ViT-Base/16 at 224).
    """
    if hf.get("model_type") == QKV_VIT:
        qkv = hf.get("qkv_config")
        if not isinstance(qkv, Mapping):
            raise ValueError("config.json: model_type 'qkv_vit' needs 'qkv_config', the ViTConfig as a JSON object")
        return ViTConfig.from_dict(dict(qkv))
    act = hf.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"config.json: hidden_act {act!r} is not supported for vit; supported: "
                         f"{', '.join(map(repr, _ACTIVATIONS))}")
    archs = hf.get("architectures") or []
    num_classes = None
    if "ViTForImageClassification" in archs:
        labels = hf.get("id2label")
        num_classes = len(labels) if isinstance(labels, Mapping) and labels else _int(
            "num_labels", hf.get("num_labels", 2))
    d = _int("hidden_size", hf.get("hidden_size", 768))
    return ViTConfig(
        image_size=_size("image_size", hf.get("image_size", 224)),
        patch_size=_size("patch_size", hf.get("patch_size", 16)),
        channels=_int("num_channels", hf.get("num_channels", 3)),
        d_model=d,
        n_layers=_int("num_hidden_layers", hf.get("num_hidden_layers", 12)),
        n_heads=_int("num_attention_heads", hf.get("num_attention_heads", 12)),
        ffn_hidden=_int("intermediate_size", hf.get("intermediate_size", 3072)),
        num_classes=num_classes,
        norm_eps=_num("layer_norm_eps", hf.get("layer_norm_eps", 1e-12)),
        qkv_bias=bool(hf.get("qkv_bias", True)),
        activation=_ACTIVATIONS[act],
        dropout=_num("hidden_dropout_prob", hf.get("hidden_dropout_prob", 0.0)),
    )


def with_checkpoint_pooler(config: ViTConfig, hf: Mapping, keys) -> ViTConfig:
    """`config` with pooler=True when the checkpoint's tensor names hold ViTModel's pooler
    (HF builds it by a constructor argument, so only the weights tell); its activation must be
    tanh and its width hidden_size."""
    if config.num_classes is not None or config.pooler or not any(
            k in ("pooler.dense.weight", "vit.pooler.dense.weight") for k in keys):
        return config
    act, width = hf.get("pooler_act", "tanh"), hf.get("pooler_output_size")
    if act != "tanh":
        raise ValueError(f"config.json: pooler_act {act!r} is not supported; qkv's ViT pooler is tanh")
    if width is not None and _int("pooler_output_size", width) != config.d_model:
        raise ValueError(f"config.json: pooler_output_size={width} differs from hidden_size={config.d_model}; "
                         f"qkv's ViT pooler is d x d")
    return ViTConfig.from_dict({**config.to_dict(), "pooler": True})


def hf_expressible(c: ViTConfig) -> bool:
    """Whether transformers' ViT computes this model: a [CLS] token and learned positions."""
    return c.pool == "cls" and c.positions == "learned"


def vit_config_to_hf(c: ViTConfig) -> dict:
    """The config.json of `c`: transformers' ViT (ViTForImageClassification with a head, else
    ViTModel), or {"model_type": "qkv_vit", "qkv_config": ...} when HF has no equivalent
    (pool="mean" or positions="sincos")."""
    if not isinstance(c, ViTConfig):
        raise TypeError(f"config must be a ViTConfig, got {type(c).__name__}")
    if not hf_expressible(c):
        return {"model_type": QKV_VIT, "architectures": [], "qkv_config": c.to_dict()}

    def side(pair):
        return pair[0] if pair[0] == pair[1] else list(pair)

    out = {"architectures": ["ViTForImageClassification" if c.num_classes is not None else "ViTModel"],
           "model_type": "vit", "hidden_size": c.d_model, "num_hidden_layers": c.n_layers,
           "num_attention_heads": c.n_heads, "intermediate_size": c.ffn_hidden, "hidden_act": _TO_HF[c.activation],
           "hidden_dropout_prob": c.dropout, "attention_probs_dropout_prob": c.dropout, "layer_norm_eps": c.norm_eps,
           "image_size": side(c.image_size), "patch_size": side(c.patch_size), "num_channels": c.channels,
           "qkv_bias": c.qkv_bias, "pooler_output_size": c.d_model, "pooler_act": "tanh"}
    if c.num_classes is not None:
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(c.num_classes)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(c.num_classes)}
    return out
