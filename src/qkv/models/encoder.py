"""`Encoder`: a BERT-style bidirectional Transformer encoder built from `qkv.layers`.

Legend: B batch, L tokens per row, T real (non-padding) tokens of a batch, d d_model,
H heads, V vocabulary, P learned positions (max_positions).

    input_ids (B, L) --embed-----------+
    token_type_ids (B, L) --type_embed-+--> sum --LayerNorm--> (B, L, d)
    positions 0..L-1 --pos_embed-------+
        -> n_layers x Block(bidirectional self-attention, GELU FFN), post-LayerNorm
        -> last_hidden_state (B, L, d)

Padding. `attention_mask` (B, L) marks the real tokens (1/True). Keys at padded
positions are masked: with `qkv.masks.padding(lengths)` when every row is a
right-padded prefix (the usual tokenizer output), with `qkv.masks.from_dense` for
any other pattern. Padded *query* rows still attend to their row's real keys, so
their outputs are finite but meaningless (as in Hugging Face's BertModel).

Packing. A right-padded batch wastes the compute of its padding. With `packed=True`
the real tokens of all rows run as ONE sequence (1, T), each keeping its original
column as its position (so positions restart at 0 for every row) and attending only
within its own row (`qkv.masks.document(row ids)`); the results are scattered back to
(B, L, d) with zeros at the padded positions. The real positions equal the padded
run's up to float rounding. `packed=None` (auto) packs when the batch has more than
one row and padding makes up at least `PACK_MIN_PADDING` of its B * L slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qkv import masks
from qkv.layers import Block
from qkv.models.config import ENCODER_ACTIVATIONS, EncoderConfig

__all__ = ["EncoderConfig", "Encoder", "EncoderOutput", "PACK_MIN_PADDING", "ENCODER_ACTIVATIONS"]

# packed=None packs a batch when at least this share of its B * L slots is padding
# (and B > 1): the linear layers then skip that share of their work, which outweighs
# gathering and scattering the tokens once per call.
PACK_MIN_PADDING = 0.25



@dataclass
class EncoderOutput:
    """What `Encoder.forward` returns.

    last_hidden_state: (B, L, d), the last layer's output.
    hidden_states: with return_hidden_states, n_layers + 1 tensors (B, L, d): the
        embeddings (after their LayerNorm), then every layer's output; else None.
    attentions: with return_weights, n_layers tensors (B, H, L, L) of attention
        weights (float32, float64 for a float64 model); else None.
    """

    last_hidden_state: Tensor
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


class Encoder(nn.Module):
    """A bidirectional Transformer encoder from an `EncoderConfig`.

    Parameters: `embed` (V, d), `pos_embed` (P, d), `type_embed` (type_vocab_size, d),
    `embed_norm`, `layers.{i}.{self_attn.{q,k,v,o}_proj, norm1, ffn.{fc1, fc2}, norm2}`
    (qkv.layers.Block with norm_position="post": norm1 follows attention, norm2 the MLP).
    """

    def __init__(self, config: EncoderConfig, *, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        if not isinstance(config, EncoderConfig):
            raise TypeError(f"config must be a qkv.models.EncoderConfig, got {type(config).__name__}")
        self.config = c = config
        factory = {"device": device, "dtype": dtype}
        self.embed = nn.Embedding(c.vocab_size, c.d_model, padding_idx=c.pad_token_id, **factory)
        self.pos_embed = nn.Embedding(c.max_positions, c.d_model, **factory)
        self.type_embed = nn.Embedding(c.type_vocab_size, c.d_model, **factory)
        self.embed_norm = nn.LayerNorm(c.d_model, eps=c.norm_eps, **factory)
        self.embed_drop = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(
            Block(c.d_model, c.n_heads, ffn_hidden=c.ffn_hidden, activation=c.activation, norm="layer",
                  norm_position="post", eps=c.norm_eps, bias=True, dropout=c.dropout, backend=backend, **factory)
            for _ in range(c.n_layers))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT's initialisation: N(0, 0.02) matrices and embeddings, zero biases, unit LayerNorms."""
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0.0, 0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Embedding):
                    nn.init.normal_(m.weight, 0.0, 0.02)
                    if m.padding_idx is not None:
                        m.weight[m.padding_idx].zero_()
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    # -- forward ---------------------------------------------------------------

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                *, return_hidden_states: bool = False, return_weights: bool = False,
                packed: bool | None = None) -> EncoderOutput:
        """input_ids (B, L) int -> `EncoderOutput` (last_hidden_state (B, L, d), ...).

        attention_mask: (B, L), 1/True at real tokens, 0/False at padding (default: all real).
        token_type_ids: (B, L) segment ids (default: all 0). Positions are the columns 0..L-1.
        packed: True runs the real tokens as one packed sequence (no compute on padding;
            padded positions of every output are zeros); False runs the (B, L) batch;
            None packs when B > 1 and padding is at least PACK_MIN_PADDING of the batch.
            return_weights needs the padded run (packed=False or None).
        """
        input_ids, mask, token_type_ids = self._check_inputs(input_ids, attention_mask, token_type_ids)
        for name, flag in (("return_hidden_states", return_hidden_states), ("return_weights", return_weights)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        if packed is not None and not isinstance(packed, bool):
            raise TypeError(f"packed must be True, False or None (auto), got {packed!r}")
        if packed and return_weights:
            raise ValueError("return_weights=True needs the padded batch: a packed run has one (1, H, T, T) "
                             "attention over every sentence at once; pass packed=False")
        B, L = input_ids.shape
        if packed is None:
            packed = not return_weights and self.should_pack(mask, B, L)

        if packed:
            real = (torch.ones(B * L, dtype=torch.bool, device=input_ids.device) if mask is None
                    else mask.reshape(-1))
            flat = real.nonzero().squeeze(1)                                    # (T,) indices into B * L
            ids = input_ids.reshape(-1)[flat][None]                             # (1, T)
            types = token_type_ids.reshape(-1)[flat][None]                      # (1, T)
            positions = (flat % L)[None]                                        # (1, T) original columns
            attn_mask = masks.document(flat // L)                           # same row <=> same document
        else:
            ids, types = input_ids, token_type_ids
            positions = torch.arange(L, device=input_ids.device)[None]          # (1, L)
            attn_mask = self._padding_mask(mask)

        x = self.embed(ids) + self.type_embed(types)                            # (B', L', d)
        x = x + self.pos_embed(positions)
        x = self.embed_drop(self.embed_norm(x))
        hidden = [x] if return_hidden_states else None
        weights = [] if return_weights else None
        for block in self.layers:
            if return_weights:
                x, w = block(x, mask=attn_mask, return_weights=True)
                weights.append(w["self"])                                       # (B, H, L, L)
            else:
                x = block(x, mask=attn_mask)
            if hidden is not None:
                hidden.append(x)

        if packed:
            def unpack(h: Tensor) -> Tensor:                                   # (1, T, d) -> (B, L, d)
                out = h.new_zeros(B * L, h.shape[-1])
                return out.index_copy(0, flat, h[0]).view(B, L, h.shape[-1])
            x = unpack(x)
            hidden = None if hidden is None else [unpack(h) for h in hidden]
        return EncoderOutput(last_hidden_state=x, hidden_states=None if hidden is None else tuple(hidden),
                             attentions=None if weights is None else tuple(weights))

    @staticmethod
    def should_pack(attention_mask: Tensor | None, B: int | None = None, L: int | None = None) -> bool:
        """The packed=None rule: B > 1 and padding fills >= PACK_MIN_PADDING of the (B, L) batch."""
        if attention_mask is None:
            return False
        B, L = attention_mask.shape if B is None else (B, L)
        if B < 2 or B * L == 0:
            return False
        padding = 1.0 - float(attention_mask.sum()) / (B * L)
        return padding >= PACK_MIN_PADDING

    @staticmethod
    def _padding_mask(mask: Tensor | None):
        """The key mask of a padded run: None (no padding), padding(lengths) (right-padded rows), or dense."""
        if mask is None:
            return None
        B, L = mask.shape
        lengths = mask.sum(1)                                                   # (B,)
        if bool((lengths == L).all()):
            return None
        prefix = torch.arange(L, device=mask.device)[None] < lengths[:, None]  # (B, L)
        if bool((prefix == mask).all()):
            return masks.padding(lengths)
        return masks.from_dense(mask[:, None, None, :])                     # (B, 1, 1, L): keys only

    def _check_inputs(self, input_ids, attention_mask, token_type_ids):
        c = self.config
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64,
                                                                                              torch.int32):
            desc = (f"{input_ids.dtype} {tuple(input_ids.shape)}" if isinstance(input_ids, Tensor)
                    else type(input_ids).__name__)
            raise ValueError(f"input_ids must be an integer tensor (B, L), got {desc}; for one sequence "
                             f"use ids[None]")
        B, L = input_ids.shape
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= c.vocab_size):
            raise ValueError(f"token ids must lie in [0, vocab_size={c.vocab_size}), got "
                             f"{int(input_ids.min())}..{int(input_ids.max())}")
        if L > c.max_positions:
            raise ValueError(f"input of {L} tokens exceeds the model's max_positions={c.max_positions}; "
                             f"truncate it to at most {c.max_positions} tokens")
        device = input_ids.device
        mask = None
        if attention_mask is not None:
            if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (B, L):
                desc = (tuple(attention_mask.shape) if isinstance(attention_mask, Tensor)
                        else type(attention_mask).__name__)
                raise ValueError(f"attention_mask must be a tensor of input_ids' shape {(B, L)}, got {desc}")
            if attention_mask.dtype != torch.bool:
                if attention_mask.is_complex() or not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
                    raise ValueError("attention_mask must hold 0/1 (or False/True): 1 marks a real token, 0 "
                                     "padding; for an additive mask pass (mask == 0) instead")
                attention_mask = attention_mask != 0
            mask = attention_mask.to(device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        else:
            if (not isinstance(token_type_ids, Tensor) or tuple(token_type_ids.shape) != (B, L)
                    or token_type_ids.dtype not in (torch.int64, torch.int32)):
                desc = (f"{token_type_ids.dtype} {tuple(token_type_ids.shape)}" if isinstance(token_type_ids, Tensor)
                        else type(token_type_ids).__name__)
                raise ValueError(f"token_type_ids must be an integer tensor of input_ids' shape {(B, L)}, got {desc}")
            if token_type_ids.numel() and (int(token_type_ids.min()) < 0
                                           or int(token_type_ids.max()) >= c.type_vocab_size):
                raise ValueError(f"token_type_ids must lie in [0, type_vocab_size={c.type_vocab_size}), got "
                                 f"{int(token_type_ids.min())}..{int(token_type_ids.max())}")
            token_type_ids = token_type_ids.to(device)
        return input_ids, mask, token_type_ids

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        return f"params={n / 1e6:.1f}M"
