"""Every model's configuration as data, side by side: `DecoderConfig` (GPT-2, Llama and Mistral style
decoders), `EncoderConfig` (BERT-style encoders), `Seq2SeqConfig` (encoder-decoders) and `ViTConfig`
(Vision Transformers).

The three families differ in a handful of switches:

    family    positions       norm    FFN         heads          head      window
    GPT-2     learned table   layer   gelu_tanh   MHA            tied      -
    Llama     RoPE (+scaling) rms     swiglu      GQA            untied    -
    Mistral   RoPE            rms     swiglu      GQA            untied    per layer

`DecoderConfig.gpt2()`, `.llama()` and `.mistral()` give the family defaults at a
small size; every field can be overridden. Every config round-trips through dicts
(`to_dict` / `from_dict`) so checkpoints can carry them as JSON.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from qkv._util.checks import check_int
from qkv.backends.linear import ATTENTION_KINDS
from qkv.layers import ACTIVATIONS, NORMS

__all__ = ["DecoderConfig", "EncoderConfig", "Seq2SeqConfig", "ViTConfig", "VIT_POOLS", "VIT_POSITIONS", "ROPE_SCALINGS", "ATTENTION_KINDS", "ENCODER_ACTIVATIONS"]

ROPE_SCALINGS = ("linear", "ntk", "llama3")


class _AsDict:
    """What every config shares: `to_dict()` and `from_dict(d)`, which refuses unknown keys."""

    _UNKNOWN = "field(s)"          # how the refusal names them

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} {cls._UNKNOWN} {unknown}; known: {sorted(names)}")
        return cls(**d)


@dataclass
class DecoderConfig(_AsDict):
    """A decoder-only Transformer.

    Attributes:
        vocab_size, d_model, n_layers, n_heads: the sizes.
        n_kv_heads: key/value heads (default n_heads; fewer is GQA, 1 is MQA).
        head_dim: default d_model // n_heads.
        ffn_hidden: hidden width of the MLP (default 4 * d_model).
        activation: one of qkv.layers.ACTIVATIONS ("gelu_tanh" GPT-2, "swiglu" Llama).
        norm: "layer" (with bias) or "rms"; norm_eps its epsilon.
        bias: biases on the attention and MLP projections.
        positions: "learned" (a max_positions x d_model table) or "rope".
        max_positions: the context length; prompts plus new tokens must fit.
        rope_base: RoPE's theta. rope_scaling: None or a dict with "type" in
            ROPE_SCALINGS and "factor" (llama3 also: "low_freq_factor",
            "high_freq_factor", "original_max_positions").
        tie_embeddings: the LM head reuses the token embedding matrix.
        sliding_window: the attention window of windowed layers (Mistral), or None.
        layer_windows: per-layer windows (None entries attend to everything);
            default: every layer uses `sliding_window`.
        arch: the family name, informational ("gpt2", "llama", "mistral", "custom").
        attention: the self-attention of every layer: "exact" (softmax), or O(L)
            kernelised attention, "linear" (elu+1 features) or "performer" (FAVOR+,
            256 random features, layer i drawn with seed i). Approximate attention
            takes no sliding window, decodes from a constant-size
            `qkv.cache.LinearStateCache`, and has no Hugging Face equivalent.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    ffn_hidden: int | None = None
    activation: str = "gelu_tanh"
    norm: str = "layer"
    norm_eps: float = 1e-5
    bias: bool = True
    positions: str = "learned"
    max_positions: int = 1024
    rope_base: float = 10000.0
    rope_scaling: dict | None = None
    tie_embeddings: bool = True
    sliding_window: int | None = None
    layer_windows: list | None = None
    arch: str = "custom"
    attention: str = "exact"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_positions"):
            _positive_int(name, getattr(self, name))
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        _positive_int("n_kv_heads", self.n_kv_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"n_heads={self.n_heads} does not divide d_model={self.d_model}; set head_dim")
            self.head_dim = self.d_model // self.n_heads
        _positive_int("head_dim", self.head_dim)
        if self.ffn_hidden is None:
            self.ffn_hidden = 4 * self.d_model
        _positive_int("ffn_hidden", self.ffn_hidden)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.positions not in ("learned", "rope"):
            raise ValueError(f"positions must be 'learned' or 'rope', got {self.positions!r}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE rotates channel pairs: head_dim must be even, got {self.head_dim}")
        for name in ("bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        eps = self.norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
            raise ValueError(f"norm_eps must be a finite number >= 0 (the norms' epsilon), got {eps!r}; e.g. 1e-5")
        base = self.rope_base
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not 0 < base < float("inf"):
            raise ValueError(f"rope_base must be a finite number > 0 (RoPE's theta), got {base!r}; e.g. 10000.0")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict) or self.rope_scaling.get("type") not in ROPE_SCALINGS:
                raise ValueError(f"rope_scaling must be None or a dict with 'type' in {ROPE_SCALINGS} and "
                                 f"'factor', got {self.rope_scaling!r}")
            if self.positions != "rope":
                raise ValueError("rope_scaling given but positions is not 'rope'; set positions='rope' or "
                                 "rope_scaling=None")
            _check_rope_scaling(self.rope_scaling)
        if self.sliding_window is not None:
            _positive_int("sliding_window", self.sliding_window)
        if self.layer_windows is not None:
            self.layer_windows = list(self.layer_windows)
            if len(self.layer_windows) != self.n_layers:
                raise ValueError(f"layer_windows has {len(self.layer_windows)} entries for n_layers={self.n_layers}; "
                                 f"give one window (or None) per layer")
            for w in self.layer_windows:
                if w is not None:
                    _positive_int("layer_windows entry", w)
        if not isinstance(self.attention, str) or self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {', '.join(map(repr, ATTENTION_KINDS))}, "
                             f"got {self.attention!r}")
        if self.attention != "exact" and any(w is not None for w in self.windows()):
            raise ValueError(f"attention={self.attention!r} sums over the whole causal prefix and cannot apply a "
                             f"sliding window; set sliding_window=None and layer_windows=None, or use "
                             f"attention='exact'")

    def windows(self) -> list[int | None]:
        """The attention window of each layer (None = the whole causal prefix)."""
        if self.layer_windows is not None:
            return list(self.layer_windows)
        return [self.sliding_window] * self.n_layers

    # -- presets ---------------------------------------------------------------

    @classmethod
    def gpt2(cls, **overrides) -> "DecoderConfig":
        """GPT-2 style; the defaults are GPT-2 small (124M): 12 layers, 768 wide, 12 heads."""
        base = dict(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, activation="gelu_tanh", norm="layer",
                    norm_eps=1e-5, bias=True, positions="learned", max_positions=1024, tie_embeddings=True,
                    arch="gpt2")
        return cls(**{**base, **overrides})

    @classmethod
    def llama(cls, **overrides) -> "DecoderConfig":
        """Llama style at a small default size (GQA 8 query / 2 kv heads)."""
        base = dict(vocab_size=32000, d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, ffn_hidden=1376,
                    activation="swiglu", norm="rms", norm_eps=1e-5, bias=False, positions="rope",
                    max_positions=4096, rope_base=10000.0, tie_embeddings=False, arch="llama")
        return cls(**{**base, **overrides})

    @classmethod
    def mistral(cls, **overrides) -> "DecoderConfig":
        """Mistral style: Llama plus a sliding window on every layer."""
        base = dict(vocab_size=32000, d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, ffn_hidden=1376,
                    activation="swiglu", norm="rms", norm_eps=1e-5, bias=False, positions="rope",
                    max_positions=8192, rope_base=10000.0, tie_embeddings=False, sliding_window=4096,
                    arch="mistral")
        return cls(**{**base, **overrides})

    # -- serialisation ---------------------------------------------------------



def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


_SCALING_KEYS = {"linear": {"type", "factor"}, "ntk": {"type", "factor"},
                 "llama3": {"type", "factor", "low_freq_factor", "high_freq_factor", "original_max_positions"}}


def _check_rope_scaling(d: dict) -> None:
    kind = d["type"]
    unknown = sorted(set(d) - _SCALING_KEYS[kind])
    if unknown:
        raise ValueError(f"rope_scaling of type {kind!r} takes {sorted(_SCALING_KEYS[kind])}; unknown {unknown}")
    factor = d.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < float("inf"):
        raise ValueError(f"rope_scaling needs a finite 'factor' > 0, got {factor!r}")
    if kind == "llama3":
        value = d.get("original_max_positions")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"rope_scaling of type 'llama3' needs 'original_max_positions' (the training context, "
                             f"an int >= 1), got {value!r}")
        for key in ("low_freq_factor", "high_freq_factor"):
            value = d.get(key, 1.0 if key == "low_freq_factor" else 4.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"rope_scaling[{key!r}] must be a number > 0, got {value!r}")
        low, high = d.get("low_freq_factor", 1.0), d.get("high_freq_factor", 4.0)
        if not high > low:
            raise ValueError(f"rope_scaling['high_freq_factor'] must exceed 'low_freq_factor', got {high} <= {low}; "
                             f"Llama 3.1 uses 4.0 and 1.0")


# -----------------------------------------------------------------------------
# Encoders (BERT) and encoder-decoders

# the plain (not gated) MLP activations of qkv.layers: BERT's "gelu" is the exact erf GELU
ENCODER_ACTIVATIONS = tuple(name for name, (_, gated) in ACTIVATIONS.items() if not gated)


@dataclass
class EncoderConfig(_AsDict):
    """A BERT-style encoder.

    Attributes:
        vocab_size, d_model, n_layers, n_heads: the sizes (n_heads must divide d_model).
        ffn_hidden: hidden width of the MLP (default 4 * d_model).
        max_positions: rows of the learned position table: the longest input.
        type_vocab_size: segment (token_type) ids 0..type_vocab_size-1.
        norm_eps: LayerNorm epsilon (BERT: 1e-12).
        activation: "gelu" (exact erf GELU, BERT's hidden_act "gelu"), "gelu_tanh" or "relu".
        dropout: on the embeddings, the attention weights and the residual branches (training only).
        pad_token_id: the padding token, whose embedding row starts at zero and gets no
            gradient; None for none.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    ffn_hidden: int | None = None
    max_positions: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    activation: str = "gelu"
    dropout: float = 0.0
    pad_token_id: int | None = 0

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_positions", "type_vocab_size"):
            check_int(name, getattr(self, name))
        if self.d_model % self.n_heads:
            divisors = [h for h in range(1, self.d_model + 1) if self.d_model % h == 0 and h <= 64]
            raise ValueError(f"n_heads={self.n_heads} does not divide d_model={self.d_model}; choose one of "
                             f"{divisors}")
        if self.ffn_hidden is None:
            self.ffn_hidden = 4 * self.d_model
        check_int("ffn_hidden", self.ffn_hidden)
        eps = self.norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
            raise ValueError(f"norm_eps must be a finite number > 0, got {eps!r}")
        self.norm_eps = float(eps)
        if self.activation not in ENCODER_ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(map(repr, ENCODER_ACTIVATIONS))} "
                             f"(gated MLPs are for decoders), got {self.activation!r}")
        p = self.dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {p!r}")
        self.dropout = float(p)
        if self.pad_token_id is not None:
            if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int):
                raise TypeError(f"pad_token_id must be an int or None, got {self.pad_token_id!r}")
            if not 0 <= self.pad_token_id < self.vocab_size:
                raise ValueError(f"pad_token_id={self.pad_token_id} must lie in [0, vocab_size={self.vocab_size}) "
                                 f"or be None")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def bert(cls, **overrides) -> "EncoderConfig":
        """BERT style; the defaults are BERT-base (110M): 12 layers, 768 wide, 12 heads, 30522 WordPieces."""
        base = dict(vocab_size=30522, d_model=768, n_layers=12, n_heads=12, ffn_hidden=3072, max_positions=512,
                    type_vocab_size=2, norm_eps=1e-12, activation="gelu", dropout=0.1, pad_token_id=0)
        return cls(**{**base, **overrides})



@dataclass
class Seq2SeqConfig(_AsDict):
    """An encoder-decoder Transformer.

    Attributes:
        vocab_size: source vocabulary (and target vocabulary when shared).
        tgt_vocab_size: None (default): one vocabulary and one embedding table for
            source and target; an int: a separate target vocabulary and table.
        d_model, n_heads: width and heads (n_heads must divide d_model).
        encoder_layers, decoder_layers: stack depths.
        ffn_hidden: FFN hidden width (default 4 * d_model); activation: one of
            qkv.layers.ACTIVATIONS ("relu" in the paper).
        dropout: on embeddings, attention weights and residual branches (training only).
        max_positions: the longest source, and the most target tokens (BOS included).
        norm_position: "post" (the paper) or "pre"; norm_eps: LayerNorm epsilon.
        tie_embeddings: the output projection reuses the target embedding matrix.
        pad_id, bos_id, eos_id: special ids (distinct, inside the vocabularies).
    """

    vocab_size: int
    tgt_vocab_size: int | None = None
    d_model: int = 128
    n_heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    ffn_hidden: int | None = None
    activation: str = "relu"
    dropout: float = 0.1
    max_positions: int = 256
    norm_position: str = "post"
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_heads", "encoder_layers", "decoder_layers", "max_positions"):
            check_int(name, getattr(self, name))
        if self.tgt_vocab_size is not None:
            check_int("tgt_vocab_size", self.tgt_vocab_size)
        if self.d_model % self.n_heads:
            divisors = [h for h in range(1, self.d_model + 1) if self.d_model % h == 0]
            raise ValueError(f"n_heads={self.n_heads} must divide d_model={self.d_model}; choose one of "
                             f"{divisors[:12]}")
        if self.ffn_hidden is None:
            self.ffn_hidden = 4 * self.d_model
        check_int("ffn_hidden", self.ffn_hidden)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}; "
                             f"got {self.activation!r}")
        if (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
                or not 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be a probability in [0, 1), got {self.dropout!r}")
        if self.norm_position not in ("post", "pre"):
            raise ValueError(f"norm_position must be 'post' (the original Transformer) or 'pre', "
                             f"got {self.norm_position!r}")
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) or not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be a number > 0, got {self.norm_eps!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise TypeError(f"tie_embeddings must be True or False, got {self.tie_embeddings!r}")
        ids = {"pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id}
        for name, value in ids.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
            if value >= self.target_vocab_size:
                raise ValueError(f"{name}={value} is outside the target vocabulary of {self.target_vocab_size}")
        if len(set(ids.values())) != 3:
            raise ValueError(f"pad_id, bos_id and eos_id must be distinct, got {ids}")
        if self.pad_id >= self.vocab_size:
            raise ValueError(f"pad_id={self.pad_id} is outside the source vocabulary of {self.vocab_size}")

    @property
    def target_vocab_size(self) -> int:
        return self.vocab_size if self.tgt_vocab_size is None else self.tgt_vocab_size

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    _UNKNOWN = "fields"


# -----------------------------------------------------------------------------
# Vision Transformers

VIT_POOLS = ("cls", "mean")
VIT_POSITIONS = ("learned", "sincos")


def _pair(name: str, value) -> tuple[int, int]:
    """An int or an (h, w) pair of ints >= 1 as an (h, w) tuple (a JSON list is accepted too)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or an (h, w) pair, got {value!r}")
        return (check_int(f"{name}[0]", value[0]), check_int(f"{name}[1]", value[1]))
    v = check_int(name, value)
    return (v, v)


@dataclass
class ViTConfig(_AsDict):
    """A Vision Transformer (Dosovitskiy et al. 2021): patches -> pre-norm encoder -> pooled token -> head.

    Attributes:
        image_size, patch_size: ints or (h, w) pairs (stored as (h, w) tuples); the patch must
            divide the image: the grid is (h // ph, w // pw). Other image sizes divisible by the
            patch run too (learned positions are interpolated, sincos ones recomputed).
        channels: C, the input channels (3 for RGB, 1 for grey).
        d_model, n_layers, n_heads: the sizes (n_heads must divide d_model).
        ffn_hidden: the MLP's hidden width (default 4 * d_model).
        num_classes: the classifier head's outputs; None: no head, and the model returns the
            pooled (B, d) features.
        pool: "cls" (a learned [CLS] token in front of the patches; its final state is pooled,
            as in the paper and Hugging Face) or "mean" (no [CLS] token: the mean of the patch tokens).
        positions: "learned" (a table over the training grid) or "sincos" (fixed 2-D sinusoids;
            d_model must then be a multiple of 4).
        norm_eps: LayerNorm epsilon (Hugging Face ViT: 1e-12).
        qkv_bias: biases on the query/key/value projections (the other projections always have one).
        activation: the MLP's: "gelu" (exact erf, HF's hidden_act "gelu"), "gelu_tanh" or "relu".
        dropout: on the embeddings, the attention weights and the residual branches (training only).
        pooler: Hugging Face ViTModel's pooler (a d x d linear layer and tanh over the pooled token),
            applied when num_classes is None: forward then returns HF's pooler_output.
    """

    image_size: int | tuple = 224
    patch_size: int | tuple = 16
    channels: int = 3
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    ffn_hidden: int | None = None
    num_classes: int | None = None
    pool: str = "cls"
    positions: str = "learned"
    norm_eps: float = 1e-12
    qkv_bias: bool = True
    activation: str = "gelu"
    dropout: float = 0.0
    pooler: bool = False

    def __post_init__(self):
        self.image_size = _pair("image_size", self.image_size)
        self.patch_size = _pair("patch_size", self.patch_size)
        (h, w), (ph, pw) = self.image_size, self.patch_size
        if h % ph or w % pw:
            raise ValueError(f"patch_size {self.patch_size} must divide image_size {self.image_size} in both "
                             f"directions; pick a patch size among the divisors of the image sides")
        for name in ("channels", "d_model", "n_layers", "n_heads"):
            check_int(name, getattr(self, name))
        if self.d_model % self.n_heads:
            divisors = [n for n in range(1, self.d_model + 1) if self.d_model % n == 0 and n <= 64]
            raise ValueError(f"n_heads={self.n_heads} does not divide d_model={self.d_model}; choose one of "
                             f"{divisors}")
        if self.ffn_hidden is None:
            self.ffn_hidden = 4 * self.d_model
        check_int("ffn_hidden", self.ffn_hidden)
        if self.num_classes is not None:
            check_int("num_classes", self.num_classes)
        if self.pool not in VIT_POOLS:
            raise ValueError(f"pool must be one of {', '.join(map(repr, VIT_POOLS))}, got {self.pool!r}")
        if self.positions not in VIT_POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(map(repr, VIT_POSITIONS))}, "
                             f"got {self.positions!r}")
        if self.positions == "sincos" and self.d_model % 4:
            raise ValueError(f"2-D sincos positions give each axis d_model/2 channels of sin/cos pairs: d_model "
                             f"must be a multiple of 4, got {self.d_model}")
        eps = self.norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
            raise ValueError(f"norm_eps must be a finite number > 0, got {eps!r}; e.g. 1e-12")
        self.norm_eps = float(eps)
        for name in ("qkv_bias", "pooler"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.pooler and self.num_classes is not None:
            raise ValueError("pooler=True is Hugging Face ViTModel's pooler, used without a classifier head; "
                             "set num_classes=None or pooler=False")
        if self.activation not in ENCODER_ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(map(repr, ENCODER_ACTIVATIONS))}, "
                             f"got {self.activation!r}")
        p = self.dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {p!r}")
        self.dropout = float(p)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def grid(self) -> tuple[int, int]:
        """(gh, gw): the patch grid of image_size."""
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @property
    def num_tokens(self) -> int:
        """N: the tokens of an image_size input (P patches, plus one with pool="cls")."""
        gh, gw = self.grid
        return gh * gw + (self.pool == "cls")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["image_size"], d["patch_size"] = list(self.image_size), list(self.patch_size)   # JSON-friendly
        return d
