"""`Seq2Seq`: the encoder-decoder Transformer of "Attention Is All You Need", built from `qkv.layers`.

Legend: B batch, Ls source length, Lt target length (this call), V vocabulary,
d d_model, H heads, D head dim.

    src (B, Ls) --embed * sqrt(d) + sinusoid--> (B, Ls, d)
        -> encoder_layers x Block(bidirectional self-attention over the real tokens, FFN)  -> memory (B, Ls, d)
    tgt_in (B, Lt) --embed * sqrt(d) + sinusoid--> (B, Lt, d)
        -> decoder_layers x Block(causal self-attention, cross-attention to memory, FFN)
        -> output projection (the target embedding when tied) -> logits (B, Lt, V)

Padding: the source is right-padded; `src_lengths` (B,) gives the real tokens,
and `qkv.masks.padding(src_lengths)` hides the rest from the encoder's
self-attention and from every cross-attention. Target padding needs no mask:
causal attention never looks ahead, and the loss ignores PAD positions.

Norms: "post" (the paper: x = norm(x + sublayer(x))) or "pre" (x = x +
sublayer(norm(x)), plus a final norm after each stack).

Generation (greedy). With `cache=True` the encoder runs once, each decoder
layer projects the memory to its cross-attention keys/values once
(`MultiHeadAttention.project_context`), and the decoder's self-attention keys
and values go to a KV cache, so a step costs one token per layer. With
`cache=False` every step re-runs the whole model on the prefix: slow, simple,
the reference the cached path must match token for token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from qkv import kernels, masks
from qkv.cache import Cache, CacheSpec
from qkv.layers import Block
from qkv.models.config import Seq2SeqConfig
from qkv.positional import sinusoidal

__all__ = ["Seq2SeqConfig", "Seq2Seq"]


def _check_tokens(name: str, t, vocab: int, *, first_dim: int | None = None) -> Tensor:
    if not isinstance(t, Tensor) or t.dim() != 2 or t.dtype not in (torch.int64, torch.int32):
        desc = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise TypeError(f"{name} must be an integer tensor (B, L) of token ids, got {desc}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (B = 0); pass at least one sequence")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has no tokens (L = 0); every sequence needs at least one")
    if first_dim is not None and t.shape[0] != first_dim:
        raise ValueError(f"{name} has batch {t.shape[0]} but the source has {first_dim}")
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"{name} ids must lie in [0, {vocab}), got {lo}..{hi}")
    return t


class Seq2Seq(nn.Module):
    """An encoder-decoder Transformer from a `Seq2SeqConfig`.

    Parameters: `src_embed` (the shared table when the vocabulary is shared),
    `tgt_embed` (separate target vocabulary only), `encoder.{i}` and `decoder.{i}`
    (`qkv.layers.Block`s; the decoder's have `cross_attn`), `encoder_norm` and
    `decoder_norm` (pre-norm only), `lm_head` (untied only).
    """

    def __init__(self, config: Seq2SeqConfig, *, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        if not isinstance(config, Seq2SeqConfig):
            raise TypeError(f"config must be a qkv.models.seq2seq.Seq2SeqConfig, got {type(config).__name__}")
        self.config = c = config
        factory = {"device": device, "dtype": dtype}
        self.src_embed = nn.Embedding(c.vocab_size, c.d_model, **factory)
        self.tgt_embed = (None if c.tgt_vocab_size is None
                          else nn.Embedding(c.tgt_vocab_size, c.d_model, **factory))
        block = {"ffn_hidden": c.ffn_hidden, "activation": c.activation, "norm": "layer",
                 "norm_position": c.norm_position, "eps": c.norm_eps, "dropout": c.dropout, "backend": backend,
                 **factory}
        self.encoder = nn.ModuleList(Block(c.d_model, c.n_heads, **block) for _ in range(c.encoder_layers))
        self.decoder = nn.ModuleList(Block(c.d_model, c.n_heads, cross_attention=True, **block)
                                     for _ in range(c.decoder_layers))
        pre = c.norm_position == "pre"
        self.encoder_norm = nn.LayerNorm(c.d_model, eps=c.norm_eps, **factory) if pre else None
        self.decoder_norm = nn.LayerNorm(c.d_model, eps=c.norm_eps, **factory) if pre else None
        self.lm_head = (None if c.tie_embeddings
                        else nn.Linear(c.d_model, c.target_vocab_size, bias=False, **factory))
        self.drop = nn.Dropout(c.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform matrices, N(0, 1/d) embeddings (unit variance after the sqrt(d)
        scale), zero biases, unit norm weights."""
        d = self.config.d_model
        for name, p in self.named_parameters():
            if name.endswith("embed.weight"):
                nn.init.normal_(p, 0.0, d ** -0.5)
            elif p.dim() >= 2:
                nn.init.xavier_uniform_(p)
            elif "norm" in name and name.endswith("weight"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)

    @property
    def target_embedding(self) -> nn.Embedding:
        return self.src_embed if self.tgt_embed is None else self.tgt_embed

    @property
    def head_weight(self) -> Tensor:
        """(V_tgt, d_model): the output projection (the target embedding when tied)."""
        return self.target_embedding.weight if self.lm_head is None else self.lm_head.weight

    # -- pieces ----------------------------------------------------------------

    def _embed(self, table: nn.Embedding, tokens: Tensor, offset: int = 0) -> Tensor:
        """tokens (B, L) -> (B, L, d): embedding * sqrt(d) + sinusoid at positions offset.., dropout."""
        w = table.weight
        x = table(tokens) * math.sqrt(self.config.d_model)                               # (B, L, d)
        pe = sinusoidal(tokens.shape[1], self.config.d_model, offset=offset, dtype=w.dtype, device=w.device)
        return self.drop(x + pe)                                                          # (L, d) broadcast

    def _check_source(self, src, src_lengths) -> None:
        c = self.config
        _check_tokens("src", src, c.vocab_size)
        B, Ls = src.shape
        if Ls > c.max_positions:
            raise ValueError(f"source of {Ls} tokens is longer than max_positions={c.max_positions}; "
                             f"shorten it or build the model with a larger max_positions")
        if (not isinstance(src_lengths, Tensor) or src_lengths.dim() != 1
                or src_lengths.dtype not in (torch.int64, torch.int32)):
            desc = (f"{src_lengths.dtype} {tuple(src_lengths.shape)}" if isinstance(src_lengths, Tensor)
                    else type(src_lengths).__name__)
            raise TypeError(f"src_lengths must be an integer tensor (B,), got {desc}")
        if src_lengths.shape[0] != B:
            raise ValueError(f"src_lengths has {src_lengths.shape[0]} entries but src has batch {B}")
        lo, hi = int(src_lengths.min()), int(src_lengths.max())
        if lo < 1 or hi > Ls:
            raise ValueError(f"src_lengths must lie in [1, Ls={Ls}] (each source has >= 1 real token), "
                             f"got {lo}..{hi}")

    def encode(self, src: Tensor, src_lengths: Tensor) -> Tensor:
        """src (B, Ls) int, src_lengths (B,) -> memory (B, Ls, d). Rows past a length are padding."""
        self._check_source(src, src_lengths)
        mask = masks.padding(src_lengths)
        x = self._embed(self.src_embed, src)                                              # (B, Ls, d)
        for block in self.encoder:
            x = block(x, mask=mask)
        return x if self.encoder_norm is None else self.encoder_norm(x)

    def decode(self, tgt_in: Tensor, memory: Tensor, src_lengths: Tensor) -> Tensor:
        """Teacher-forced decoder: tgt_in (B, Lt), memory (B, Ls, d) -> logits (B, Lt, V)."""
        c = self.config
        if not isinstance(memory, Tensor) or memory.dim() != 3 or memory.shape[-1] != c.d_model:
            shape = tuple(memory.shape) if isinstance(memory, Tensor) else type(memory).__name__
            raise ValueError(f"memory must be the encoder output (B, Ls, d_model={c.d_model}), got {shape}")
        _check_tokens("tgt_in", tgt_in, c.target_vocab_size, first_dim=memory.shape[0])
        if tgt_in.shape[1] > c.max_positions:
            raise ValueError(f"target of {tgt_in.shape[1]} tokens is longer than max_positions="
                             f"{c.max_positions}; shorten it or build the model with a larger max_positions")
        mask = masks.padding(src_lengths)
        x = self._embed(self.target_embedding, tgt_in)                                    # (B, Lt, d)
        for block in self.decoder:
            x = block(x, causal=True, context=memory, context_mask=mask)
        return self._logits(x)

    def _logits(self, x: Tensor) -> Tensor:
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        return kernels.linear(x, self.head_weight)                                         # (B, Lt, V)

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher forcing: src (B, Ls), src_lengths (B,), tgt_in (B, Lt) -> logits (B, Lt, V)."""
        return self.decode(tgt_in, self.encode(src, src_lengths), src_lengths)

    # -- generation ------------------------------------------------------------

    @torch.no_grad()
    def generate(self, src: Tensor, src_lengths: Tensor, *, max_new_tokens: int, cache: bool = True,
                 include_eos: bool = False) -> list[list[int]]:
        """Greedy decoding: one list of token ids per source row.

        A row stops after it emits EOS (which is left out unless include_eos) or
        after max_new_tokens tokens. Rows that have stopped still step with the
        batch (their outputs are discarded), so every row's KV cache keeps one
        length. Runs in eval mode (no dropout) and restores the training flag.
        """
        c = self.config
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if max_new_tokens > c.max_positions:
            raise ValueError(f"max_new_tokens={max_new_tokens} exceeds max_positions={c.max_positions} "
                             f"(the decoder's inputs are BOS plus all but the last new token)")
        self._check_source(src, src_lengths)
        B = src.shape[0]
        outs: list[list[int]] = [[] for _ in range(B)]
        if max_new_tokens == 0:
            return outs
        was_training = self.training
        self.eval()
        try:
            step = self._cached_steps(src, src_lengths, max_new_tokens) if cache else \
                self._recompute_steps(src, src_lengths)
            token = torch.full((B,), c.bos_id, dtype=torch.long, device=src.device)     # (B,)
            done = torch.zeros(B, dtype=torch.bool)
            for t in range(max_new_tokens):
                token = step(token, t).argmax(-1)                                         # (B, V) -> (B,)
                for b in (~done).nonzero().flatten().tolist():
                    tok = int(token[b])
                    if tok == c.eos_id:
                        done[b] = True
                        if include_eos:
                            outs[b].append(tok)
                    else:
                        outs[b].append(tok)
                if bool(done.all()):
                    break
                token = token.masked_fill(done.to(token.device), c.pad_id)               # stopped rows: PAD
        finally:
            self.train(was_training)
        return outs

    def _cached_steps(self, src, src_lengths, max_new_tokens):
        """step(token (B,), t) -> logits (B, V): one token per layer, caches for everything else."""
        c = self.config
        memory = self.encode(src, src_lengths)                                            # (B, Ls, d), once
        mask = masks.padding(src_lengths)
        context_kv = [block.cross_attn.project_context(memory) for block in self.decoder]  # (B, H, Ls, D) x2 each
        p = self.head_weight
        kv = Cache.contiguous([CacheSpec(c.n_heads, c.head_dim, None)] * c.decoder_layers, src.shape[0],
                              max_new_tokens, dtype=p.dtype, device=p.device)

        def step(token: Tensor, t: int) -> Tensor:
            x = self._embed(self.target_embedding, token[:, None], offset=t)             # (B, 1, d)
            for block, ckv, layer in zip(self.decoder, context_kv, kv.layers):
                x = block(x, context_kv=ckv, context_mask=mask, cache=layer)
            return self._logits(x)[:, -1]                                                 # (B, V)
        return step

    def _recompute_steps(self, src, src_lengths):
        """step(token (B,), t) -> logits (B, V), re-running encoder and decoder on the whole prefix."""
        prefix = []

        def step(token: Tensor, t: int) -> Tensor:
            prefix.append(token)
            return self.forward(src, src_lengths, torch.stack(prefix, dim=1))[:, -1]     # (B, t+1, V) -> (B, V)
        return step

    def extra_repr(self) -> str:
        c = self.config
        n = sum(p.numel() for p in self.parameters())
        return (f"d_model={c.d_model}, layers={c.encoder_layers}+{c.decoder_layers}, "
                f"norm_position={c.norm_position!r}, params={n / 1e6:.2f}M")
