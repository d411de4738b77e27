"""`AttentionOnly`: a causal Transformer with attention layers and no feed-forward blocks.

Legend: B batch, L tokens, V vocabulary, H heads, d_model width.

    ids (B, L) --embed--> (B, L, d_model) [+ learned positions]
        -> n_layers x (x = x + self_attn(norm_i(x)))       causal, [RoPE | ALiBi]
        -> final norm -> unembed -> logits (B, L, V)

Without MLPs everything the model computes is attention moving information
between positions plus linear maps, so what it learns can be read off its
attention weights (see `qkv.train.train_recall`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qkv._util.checks import check_int
from qkv.layers import NORMS, MultiHeadAttention, RMSNorm
from qkv.positional import RotaryEmbedding

__all__ = ["AttentionOnly"]

POSITIONS = ("learned", "rope", "alibi")


def _norm(kind: str | None, dim: int) -> nn.Module:
    if kind is None:
        return nn.Identity()
    return nn.LayerNorm(dim) if kind == "layer" else RMSNorm(dim)


class AttentionOnly(nn.Module):
    """Token embedding, positions, `n_layers` causal `MultiHeadAttention` residual layers, unembedding.

    Args:
        vocab_size: V. d_model, n_heads: width and heads of every layer.
        max_positions: the longest sequence (learned positions only).
        positions: "rope" (rotary q and k in every layer), "learned" (an embedding added to
            the tokens) or "alibi" (ALiBi's distance penalties, no position vectors).
        norm: "layer", "rms" (pre-norm before every layer and before the unembedding) or None.
        bias: bias on the attention projections.
        backend: passed to `qkv.attention` through every layer.

    Parameters: `embed`, `pos_embed` (learned only), `norms.{i}`, `layers.{i}.{q,k,v,o}_proj`,
    `norm`, `unembed`.
    """

    def __init__(self, vocab_size: int, *, d_model: int = 96, n_layers: int = 2, n_heads: int = 3,
                 max_positions: int = 64, positions: str = "rope", norm: str | None = "layer",
                 bias: bool = False, backend: str = "auto"):
        super().__init__()
        check_int("vocab_size", vocab_size)
        check_int("d_model", d_model)
        check_int("n_layers", n_layers)
        check_int("n_heads", n_heads)
        check_int("max_positions", max_positions)
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(map(repr, POSITIONS))}; got {positions!r}")
        if norm is not None and norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(map(repr, NORMS))} or None; got {norm!r}")
        if d_model % n_heads:
            raise ValueError(f"n_heads={n_heads} does not divide d_model={d_model}; pick heads that divide the width")
        if positions == "rope" and (d_model // n_heads) % 2:
            raise ValueError(f"RoPE rotates channel pairs: head dim d_model / n_heads = {d_model // n_heads} must be "
                             f"even; change d_model or n_heads, or use positions='learned'")
        self.vocab_size, self.d_model, self.n_layers, self.n_heads = vocab_size, d_model, n_layers, n_heads
        self.max_positions, self.positions = max_positions, positions
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos_embed = nn.Embedding(max_positions, d_model) if positions == "learned" else None
        self.rope = RotaryEmbedding(d_model // n_heads) if positions == "rope" else None
        self.norms = nn.ModuleList(_norm(norm, d_model) for _ in range(n_layers))
        self.layers = nn.ModuleList(MultiHeadAttention(d_model, n_heads, bias=bias, rope=self.rope,
                                                       alibi=positions == "alibi", backend=backend)
                                    for _ in range(n_layers))
        self.norm = _norm(norm, d_model)
        self.unembed = nn.Linear(d_model, vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Embeddings N(0, 1); attention projections N(0, 1 / fan_in); unembedding N(0, 0.02);
        zero biases, unit norm weights.

        Fan-in scaled projections, not GPT-2's fixed 0.02: a query-key match is a product
        of two matrices, and at 0.02 in a narrow model both start so small that each
        one's gradient (which scales with the other) keeps the lookup from forming for
        thousands of steps."""
        for name, p in self.named_parameters():
            if name.startswith(("embed.", "pos_embed.")):
                nn.init.normal_(p, 0.0, 1.0)
            elif name == "unembed.weight":
                nn.init.normal_(p, 0.0, 0.02)
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, p.shape[1] ** -0.5)
            elif name.endswith("weight"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)

    def forward(self, ids: Tensor, *, return_weights: bool = False):
        """ids (B, L) int -> logits (B, L, V); with return_weights, (logits, [weights (B, H, L, L)
        of each layer]). Position i sees ids[:, :i + 1] only."""
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            desc = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"ids must be a (B, L) integer tensor, got {desc}")
        B, L = ids.shape
        if L == 0:
            raise ValueError("ids has no tokens (L = 0)")
        if self.pos_embed is not None and L > self.max_positions:
            raise ValueError(f"sequence of {L} tokens is longer than max_positions={self.max_positions}; "
                             f"build the model with a larger max_positions")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"ids must lie in [0, vocab_size={self.vocab_size}), got "
                             f"{int(ids.min())}..{int(ids.max())}")
        x = self.embed(ids)                                                       # (B, L, d_model)
        if self.pos_embed is not None:
            x = x + self.pos_embed.weight[:L]                                     # (B, L, d_model)
        weights = []
        for norm, attn in zip(self.norms, self.layers):
            h = attn(norm(x), causal=True, return_weights=return_weights)         # (B, L, d_model) [, w]
            if return_weights:
                h, w = h
                weights.append(w)                                                 # (B, H, L, L)
            x = x + h
        logits = self.unembed(self.norm(x))                                       # (B, L, V)
        return (logits, weights) if return_weights else logits

    def extra_repr(self) -> str:
        return f"positions={self.positions!r}"
