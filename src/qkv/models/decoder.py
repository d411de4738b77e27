"""`Decoder`: a decoder-only Transformer (GPT-2, Llama, Mistral styles) built from `qkv.layers`.

Legend: B batch, L tokens this call, V vocabulary, d_model width.

    tokens (B, L) --embed--> (B, L, d_model) [+ learned positions]
        -> n_layers x Block(causal self-attention [RoPE] [window], FFN), pre-norm
        -> final norm -> LM head (tied to the embedding, or its own matrix) -> logits (B, L, V)

Without a cache every call sees the whole sequence (teacher forcing, a full
forward). With a cache (`new_cache()`), a call appends its tokens to the cache
and attends to everything before them: prefill with the prompt, then one token
per decode step. `last_only=True` computes logits for the last position only
(all that generation needs; the LM head is the largest matrix of a small model).

`config.attention` = "linear" / "performer" makes every self-attention kernelised,
O(L) (`qkv.backends.linear`); `new_cache()` then holds one `LinearStateCache` per
layer, whose size does not grow with the context. Sparse patterns (Longformer,
BigBird, ...) are masks: `forward(tokens, mask=qkv.masks.longformer(64))` ANDs
the mask with each layer's causal (or window) mask, exact attention only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qkv import distributed as _dist
from qkv import fused, kernels, masks
from qkv._util import hugepages
from qkv._util.checks import check_int as _check_int
from qkv.backends.linear import Performer
from qkv.cache import Cache, CacheSpec, LinearStateCache
from qkv.layers import Block, RMSNorm
from qkv.models.config import DecoderConfig
from qkv.positional import RotaryEmbedding

__all__ = ["Decoder"]


def _check_positions(positions, B: int, L: int) -> None:
    """Explicit positions: an integer tensor (L,) or (B, L) of values >= 0."""
    if not isinstance(positions, Tensor) or positions.dtype not in (torch.int64, torch.int32):
        desc = f"{positions.dtype} tensor" if isinstance(positions, Tensor) else type(positions).__name__
        raise TypeError(f"positions must be an integer tensor (L,) or (B, L), got {desc}; e.g. torch.arange(L)")
    if tuple(positions.shape) not in ((L,), (B, L)):
        raise ValueError(f"positions must be (L,) = ({L},) or (B, L) = ({B}, {L}) like tokens, "
                         f"got {tuple(positions.shape)}")
    if positions.numel() and int(positions.min()) < 0:
        raise ValueError(f"positions must be >= 0, got {int(positions.min())}; positions count from 0")


class Decoder(nn.Module):
    """A causal language model from a `DecoderConfig`.

    Parameters (names follow the Block/MultiHeadAttention ones, which follow Llama's):
    `embed`, `pos_embed` (learned positions only), `layers.{i}.{norm1, self_attn.{q,k,v,o}_proj,
    norm2, ffn.*}`, `norm`, `lm_head` (untied only). On the CPU they share one buffer on
    transparent huge pages (`qkv._util.hugepages.pack_parameters`): a decode step streams them all.
    """

    def __init__(self, config: DecoderConfig, *, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        if not isinstance(config, DecoderConfig):
            raise TypeError(f"config must be a qkv.models.DecoderConfig, got {type(config).__name__}")
        self.config = c = config
        factory = {"device": device, "dtype": dtype}
        self.embed = nn.Embedding(c.vocab_size, c.d_model, **factory)
        self.pos_embed = nn.Embedding(c.max_positions, c.d_model, **factory) if c.positions == "learned" else None
        self.rope = None
        if c.positions == "rope":
            scaling = dict(c.rope_scaling or {})
            kind = scaling.pop("type", None)
            kwargs = {}
            if kind is not None:
                kwargs = {"scaling": kind, "factor": float(scaling.get("factor", 1.0))}
                if kind == "llama3":
                    kwargs.update(original_max_len=int(scaling["original_max_positions"]),
                                  low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
                                  high_freq_factor=float(scaling.get("high_freq_factor", 4.0)))
            self.rope = RotaryEmbedding(c.head_dim, base=c.rope_base, **kwargs)
        self.layers = nn.ModuleList(
            Block(c.d_model, c.n_heads, n_kv_heads=c.n_kv_heads, ffn_hidden=c.ffn_hidden, activation=c.activation,
                  norm=c.norm, norm_position="pre", eps=c.norm_eps, bias=c.bias, rope=self.rope, backend=backend,
                  head_dim=c.head_dim, attention=Performer(256, seed=i) if c.attention == "performer"
                  else c.attention, **factory)
            for i in range(c.n_layers))
        self.windows = c.windows()
        self.norm = (nn.LayerNorm(c.d_model, eps=c.norm_eps, **factory) if c.norm == "layer"
                     else RMSNorm(c.d_model, eps=c.norm_eps, **factory))
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.d_model, c.vocab_size, bias=False, **factory)
        self.reset_parameters()
        # one huge-page arena for the weights a decode step streams, q/k/v (and gate/up) back to back
        hugepages.pack_parameters(self)

    def reset_parameters(self) -> None:
        """GPT-2's initialisation: N(0, 0.02) weights, zero biases, residual projections / sqrt(2 n_layers)."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02
                if name.endswith(("o_proj.weight", "fc2.weight", "down_proj.weight")):
                    std /= (2 * self.config.n_layers) ** 0.5
                nn.init.normal_(p, 0.0, std)
            elif "norm" in name and name.endswith("weight"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)

    @property
    def head_weight(self) -> Tensor:
        """(V, d_model): the LM head's matrix (the embedding when tied)."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    # -- caches ----------------------------------------------------------------

    def cache_specs(self) -> list[CacheSpec]:
        return [CacheSpec(self.config.n_kv_heads, self.config.head_dim, w) for w in self.windows]

    def new_cache(self, batch: int = 1, *, kind: str = "contiguous", max_len: int | None = None,
                  block_size: int = 16, num_blocks: int | None = None, ring: bool = True) -> Cache:
        """An empty KV cache for this model.

        kind="contiguous": (batch, Hkv, max_len, D) per layer (default max_len: the
        context length, at most 4096 -- a 128k-context checkpoint would otherwise
        preallocate its whole context; a longer sequence raises CacheFull, saying so);
        sliding-window layers get a ring of `window` slots (ring=True).
        kind="paged": a pool of `num_blocks` blocks of `block_size` tokens per layer
        (default: enough for `batch` sequences of max_len) and `batch` empty sequences.

        A model with approximate attention ("linear", "performer") keeps no keys: each
        layer gets a `qkv.cache.LinearStateCache` of running sums, constant in size
        (kind must be "contiguous"; max_len, ring and the block arguments do not apply).
        """
        p = self.embed.weight
        if self.config.attention != "exact":
            if kind != "contiguous":
                raise ValueError(f"a model with attention={self.config.attention!r} decodes from a constant-size "
                                 f"state per sequence, which has no pages: use kind='contiguous' (got {kind!r})")
            return Cache([LinearStateCache(batch, self.config.n_kv_heads, self.config.head_dim,
                                           feature_map=block.self_attn.feature_map or "linear",
                                           scale=block.self_attn.scale, dtype=p.dtype, device=p.device)
                          for block in self.layers])
        max_len = min(self.config.max_positions, 4096) if max_len is None else max_len
        if kind == "contiguous":
            return Cache.contiguous(self.cache_specs(), batch, max_len, ring=ring, dtype=p.dtype, device=p.device)
        if kind == "paged":
            _check_int("block_size", block_size, 1)
            if num_blocks is None:
                num_blocks = batch * -(-max_len // block_size)
            return Cache.paged(self.cache_specs(), num_blocks, block_size=block_size, batch=batch, dtype=p.dtype,
                               device=p.device)
        raise ValueError(f"kind must be 'contiguous' or 'paged', got {kind!r}")

    # -- forward ---------------------------------------------------------------

    def forward(self, tokens: Tensor, *, cache: Cache | None = None, positions: Tensor | None = None,
                last_only: bool = False, mask=None) -> Tensor:
        """tokens (B, L) int -> logits (B, L, V), or (B, 1, V) with last_only.

        Without a cache: a full causal forward; `positions` (B, L) or (L,) default
        to 0..L-1. With a cache: the tokens continue each cached sequence; their
        positions are the cache lengths onwards.

        `mask` (no cache, exact attention): a `qkv.masks` mask, e.g. a sparse pattern
        such as `qkv.masks.longformer(64)` or `qkv.masks.bigbird(64)`, ANDed with
        every layer's causal (or window) mask, so no token ever sees a later one.
        """
        h = self.hidden(tokens, cache=cache, positions=positions, mask=mask)  # (B, L, d_model)
        if last_only:
            h = h[:, -1:]                                                   # (B, 1, d_model)
        return kernels.linear(h, self.head_weight)                          # (B, L, V)

    def hidden(self, tokens: Tensor, *, cache: Cache | None = None, positions: Tensor | None = None,
               mask=None) -> Tensor:
        """The final-norm hidden states (B, L, d_model); arguments as in `forward`."""
        return self._hidden(tokens, cache, positions, mask, None)

    def _hidden(self, tokens: Tensor, cache: Cache | None, positions: Tensor | None, mask,
                session: fused.DecodeSession | None) -> Tensor:
        """`hidden`, keeping the blocks' fused layouts in `session` (see `decode_step`) when given."""
        c = self.config
        if mask is not None:
            if cache is not None:
                raise ValueError("mask= applies to a full forward; a cached step attends to the cached tokens "
                                 "(run without cache= to use a mask)")
            if c.attention != "exact":
                raise ValueError(f"attention={c.attention!r} sums over the whole causal prefix and cannot apply "
                                 f"mask={mask!r}; use a model with attention='exact' for sparse masks")
            mask = masks.as_mask(mask)
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            desc = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be an integer tensor (B, L), got {desc}; for one sequence pass "
                             f"tokens[None], for float ids tokens.long()")
        B, L = tokens.shape
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= c.vocab_size):
            raise ValueError(f"token ids must lie in [0, vocab_size={c.vocab_size}), got "
                             f"{int(tokens.min())}..{int(tokens.max())}")
        if cache is not None:
            if not isinstance(cache, Cache):
                raise TypeError(f"cache must be a qkv.cache.Cache from model.new_cache(), got {type(cache).__name__}")
            if len(cache.layers) != c.n_layers:
                raise ValueError(f"cache has {len(cache.layers)} layers, the model {c.n_layers}; "
                                 f"build it with model.new_cache()")
            if cache.batch != B:
                raise ValueError(f"cache holds {cache.batch} sequences but tokens has batch {B}; build it with "
                                 f"model.new_cache({B})")
            if positions is not None:
                raise ValueError("with a cache, positions follow from the cache lengths; do not pass positions")
            cache.check_room(L)                     # all layers or none: a full cache changes nothing
            positions = cache.lengths[:, None] + torch.arange(L)                # (B, L)
        elif positions is None:
            cp = _dist.active()                 # a rank's rows of a sequence split across a group
            positions = torch.arange(L) if cp is None else cp.positions(L)      # (L,)
        else:
            _check_positions(positions, B, L)
        positions = positions.to(tokens.device)
        if L and int(positions.max()) >= c.max_positions:
            raise ValueError(f"position {int(positions.max())} is beyond the model's context of "
                             f"{c.max_positions} tokens; shorten the prompt or max_new_tokens")

        x = self.embed(tokens)                                                 # (B, L, d_model)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)                                  # (B or 1, L, d_model) broadcast
        rope_positions = positions if self.rope is not None else None
        if cache is not None and L == 1:
            h = self._fused_layers(x, rope_positions, cache, session)
            if h is not None:
                return self.norm(h)
        for i, block in enumerate(self.layers):
            if cache is not None:
                x = block(x, positions=rope_positions, cache=cache.layers[i])
            else:
                window = self.windows[i]
                layer_mask = masks.causal() if window is None else masks.sliding_window(window)
                if mask is not None:
                    layer_mask = layer_mask & mask
                x = block(x, mask=layer_mask, positions=rope_positions)
        return self.norm(x)

    def _fused_layers(self, x: Tensor, positions: Tensor | None, cache: Cache,
                      session: fused.DecodeSession | None = None) -> Tensor | None:
        """Every block's one-token step in one kernel launch (`qkv.fused.step`), when each
        block's fused step applies (`Block.fused_layout`) and no forward hook would miss a block
        running; else None, and the blocks run one by one. `session` (see `decode_step`): the
        blocks' step-independent layouts, worked out here when it holds none."""
        statics = None if session is None else session.statics
        if statics is None:
            statics = self._fused_statics(x, cache)
            if statics is None:
                return None
            if session is not None:
                session.statics = statics
        # check_room(1) has passed: claiming a slot in every layer cannot fail
        return fused.step(statics, x, positions, cache)

    def _fused_statics(self, x: Tensor, cache: Cache) -> list | None:
        blocks = list(self.layers)
        if not blocks or any(type(b).forward is not Block.forward or b._forward_hooks or b._forward_pre_hooks
                             for b in blocks):
            return None
        statics = []
        for block, layer_cache in zip(blocks, cache.layers):
            layer = block.fused_layout(x, layer_cache)
            if layer is None:                                 # the blocks run one by one, each checking itself
                return None
            statics.append(layer)
        return statics

    def decode_step(self, tokens: Tensor, cache: Cache, session: fused.DecodeSession) -> Tensor:
        """logits (B, 1, V) of one new token per sequence: `self(tokens, cache=cache, last_only=True)`
        for a decoding loop that runs no other code between its steps (`qkv.generate`), whose
        tokens come from its own sampling (ids in range) and whose cache it built for the whole
        run. The first step checks everything, as `forward` does, and, where the fused step
        applies, keeps the blocks' layouts in `session` (a `qkv.fused.DecodeSession` the loop
        holds); later steps reuse them instead of checking each block again. Nothing changes the
        model inside such a loop; a loop that hands control to other code between steps
        (`qkv.generate.stream`) calls the model instead."""
        if fused.hooked_call(self):                                           # hooks see every call
            return self(tokens, cache=cache, last_only=True)
        if session.statics is None:                                            # the first step: everything checked
            h = self._hidden(tokens, cache, None, None, session)[:, -1:]
            return kernels.linear(h, self.head_weight)                         # (B, 1, V)
        if torch.is_grad_enabled() or tokens.shape[0] != cache.batch:         # not the loop's steps: no reuse
            return self.forward(tokens, cache=cache, last_only=True)
        cache.check_room(1)                                                    # CacheFull: nothing changes
        positions = cache.layers[0].length[:, None]                            # (B, 1)
        x = self.embed(tokens)                                                 # (B, 1, d_model)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        h = self._fused_layers(x, positions if self.rope is not None else None, cache, session)
        return kernels.linear(self.norm(h), self.head_weight)                   # (B, 1, V)

    def extra_repr(self) -> str:
        c = self.config
        n = sum(p.numel() for p in self.parameters())
        return f"arch={c.arch!r}, params={n / 1e6:.1f}M"
