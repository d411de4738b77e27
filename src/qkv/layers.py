"""Transformer layers: multi-head attention, feed-forward, RMSNorm, a whole block.

Legend: B batch, Lq query length, Lk key length, Hq query heads, Hkv key/value heads,
G = Hq // Hkv, D head dim, d_model model width, kv_dim width of a cross-attention context.

These modules only hold parameters and hyper-parameters; the attention maths
lives in `qkv.attention` (one place, every backend), so a layer is a few
projections and reshapes around one call::

    x (B, Lq, d_model) --q_proj--> (B, Lq, Hq*D)  --split--> q (B, Hq, Lq, D)  --RoPE--+
    ctx (B, Lk, kv_dim) --k_proj--> (B, Lk, Hkv*D) --split--> k (B, Hkv, Lk, D) --RoPE--+--> qkv.attention
    ctx (B, Lk, kv_dim) --v_proj--> (B, Lk, Hkv*D) --split--> v (B, Hkv, Lk, D) --------+        |
                                                                                              (B, Hq, Lq, D)
    out (B, Lq, d_model) <--o_proj-- (B, Lq, Hq*D) <--merge-------------------------------------+

Parameter names follow the Llama / Hugging Face convention (q_proj, k_proj,
v_proj, o_proj; gate_proj, up_proj, down_proj) so that checkpoints map onto
them with few renames.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv import backends, fused, kernels, masks
from qkv import distributed as _dist
from qkv import scores as _scores
from qkv._util.checks import check_int
from qkv.attention import attention
from qkv.backends import linear as _kernel
from qkv.hooks import ATTENTION_HOOK
from qkv.positional import RotaryEmbedding

__all__ = ["MultiHeadAttention", "Linear", "FeedForward", "RMSNorm", "Block", "ACTIVATIONS", "NORMS"]


_check_positive_int = check_int


def _check_dtype(name: str, x: Tensor, weight: Tensor) -> None:
    """x must match the layer's parameters (or run under autocast, which casts for the layer)."""
    if x.dtype != weight.dtype and not (x.is_floating_point() and torch.is_autocast_enabled(x.device.type)):
        raise TypeError(f"{name} must be a floating-point tensor of the layer's dtype {weight.dtype}, got {x.dtype}; "
                        f"cast it with {name}.to({weight.dtype})")


def _check_dropout(name: str, p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {p!r}")
    return float(p)


# -----------------------------------------------------------------------------
# Multi-head attention (MHA / GQA / MQA, self and cross)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state-dict keys) whose forward takes the
    skinny CPU kernel of `qkv.kernels` for decode-sized inputs: at most 16 rows,
    fp32 on the CPU, no autograd. Everything else is `F.linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return kernels.linear(x, self.weight, self.bias)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate q/k/v/o projections, forwarding to `qkv.attention`.

    Args:
        d_model: width of the input x (and of the output).
        n_heads: query heads Hq.
        n_kv_heads: key/value heads Hkv (default Hq). Hkv = Hq is MHA, 1 < Hkv < Hq
            is GQA, Hkv = 1 is MQA; Hkv must divide Hq. K/V are never repeated.
        head_dim: D (default d_model // n_heads, which must then divide exactly).
        kv_dim: width of the cross-attention context (default d_model).
        bias: bias on q/k/v projections. out_bias: bias on o_proj (default `bias`).
        dropout: dropout on the attention weights, in training mode only.
        scale: multiplies q k^T (default 1 / sqrt(D)).
        rope: a `qkv.positional.RotaryEmbedding` (its head_dim must be D) or None.
        alibi: False; True for the paper's slopes for n_heads; or a (n_heads,) tensor of slopes.
        backend: passed to `qkv.attention` ("auto", "math", "sdpa", ...).
        attention: "exact" (softmax, the default), or kernelised O(L) attention:
            "linear" (elu+1 features) or "performer" (FAVOR+ random features; the
            layer owns a `qkv.backends.linear.Performer(256, seed=0)`, or pass your
            own `Performer(...)` object). Approximate attention takes mask None or
            causal, no dropout, ALiBi or weights; decode with a `qkv.cache.LinearStateCache`.
        sinks: learned attention sinks (GPT-OSS): a parameter `sinks` (n_heads,), one logit per
            query head, initialised to 0, that joins every softmax row's denominator and carries
            no value (`qkv.attention(sinks=)`); every attention call of the layer takes it, the
            cached steps included (so the CPU decode kernel and `qkv.fused`'s one-launch block
            step, which have no sinks, step aside). Exact attention only.

    Positions. RoPE rotates q and k by the absolute positions of their tokens.
    In self-attention both come from `positions` (default arange(Lq)). In
    cross-attention the keys belong to another sequence (an encoder output,
    an image) whose positions are not comparable with the queries', so RoPE is
    *not* applied there unless the caller opts in by passing
    `context_positions` (then q is rotated by `positions`, k by `context_positions`).
    ALiBi is a score_mod: it uses the positions `qkv.attention` gives the
    scores (keys 0..Lk-1, queries the last Lq of them), in self and cross
    attention alike.
    """

    def __init__(self, d_model: int, n_heads: int, *, n_kv_heads: int | None = None,
                 head_dim: int | None = None, kv_dim: int | None = None, bias: bool = True,
                 out_bias: bool | None = None, dropout: float = 0.0, scale: float | None = None,
                 rope: RotaryEmbedding | None = None, alibi: bool | Tensor = False,
                 backend: str = "auto", attention="exact", sinks: bool = False, device=None, dtype=None):
        super().__init__()
        _check_positive_int("d_model", d_model)
        _check_positive_int("n_heads", n_heads)
        if not isinstance(sinks, bool):
            raise TypeError(f"sinks must be True or False (a learned (n_heads,) sink logit per head), got {sinks!r}")
        n_kv_heads = n_heads if n_kv_heads is None else _check_positive_int("n_kv_heads", n_kv_heads)
        if n_heads % n_kv_heads:
            divisors = [d for d in range(1, n_heads + 1) if n_heads % d == 0]
            raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads} (GQA/MQA); "
                             f"choose one of {divisors}")
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"n_heads={n_heads} does not divide d_model={d_model}; choose n_heads "
                                 f"among the divisors of d_model or pass head_dim explicitly")
            head_dim = d_model // n_heads
        _check_positive_int("head_dim", head_dim)
        kv_dim = d_model if kv_dim is None else _check_positive_int("kv_dim", kv_dim)
        out_bias = bias if out_bias is None else out_bias
        if rope is not None:
            if not isinstance(rope, RotaryEmbedding):
                raise TypeError(f"rope must be a qkv.positional.RotaryEmbedding or None, got {type(rope).__name__}")
            if rope.head_dim != head_dim:
                raise ValueError(f"rope was built for head_dim={rope.head_dim} but this layer has "
                                 f"head_dim={head_dim}; build it with RotaryEmbedding({head_dim})")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not math.isfinite(scale)):
            raise ValueError(f"scale must be a finite number or None (1/sqrt(head_dim)), got {scale!r}")

        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.head_dim, self.kv_dim = head_dim, kv_dim
        self.dropout = _check_dropout("dropout", dropout)
        self.scale = None if scale is None else float(scale)
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string name, got {type(backend).__name__}")
        if backend != "auto":
            backends.get(backend)                   # an unknown name: ValueError listing the registered ones
        self.attention, self.feature_map, self.backend = _kernel.layer_choice(
            attention, backend, dropout=self.dropout, alibi=alibi is not False and alibi is not None)
        if sinks and self.attention != "exact":
            raise ValueError(f"attention={self.attention!r} has no softmax denominator for attention sinks to join; "
                             f"use sinks=False or attention='exact'")

        factory = {"device": device, "dtype": dtype}
        self.q_proj = Linear(d_model, n_heads * head_dim, bias=bias, **factory)
        self.k_proj = Linear(kv_dim, n_kv_heads * head_dim, bias=bias, **factory)
        self.v_proj = Linear(kv_dim, n_kv_heads * head_dim, bias=bias, **factory)
        self.o_proj = Linear(n_heads * head_dim, d_model, bias=out_bias, **factory)
        self.rope = rope

        # ALiBi slopes live in a (non-persistent) buffer so they follow .to(device);
        # they are derived from n_heads or given, so checkpoints need not carry them.
        if isinstance(alibi, Tensor):
            if alibi.shape != (n_heads,) or not alibi.is_floating_point():
                raise ValueError(f"alibi slopes must be a float tensor of shape (n_heads,) = ({n_heads},), "
                                 f"got {tuple(alibi.shape)} {alibi.dtype}")
            slopes = alibi.detach().clone().float()
        elif alibi is True:
            slopes = _scores.alibi(n_heads).slopes.float()
        elif alibi is False or alibi is None:
            slopes = None
        else:
            raise TypeError(f"alibi must be True, False or a (n_heads,) tensor of slopes, got {type(alibi).__name__}")
        self.register_buffer("alibi_slopes", None if slopes is None else slopes.to(device=device),
                             persistent=False)  # (Hq,)
        # GPT-OSS's learned sinks: one logit per query head, saved in the state dict as `sinks`
        if sinks:
            self.sinks = nn.Parameter(torch.zeros(n_heads, **factory))                  # (Hq,)
        else:
            self.register_parameter("sinks", None)

    def project_context(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """The keys and values of a cross-attention context: (k, v), each (B, Hkv, Lk, D).

        A decoder attends to the same encoder output at every step: project it
        once and pass the pair as `forward(x, context_kv=(k, v))`, which gives
        the same result as `forward(x, context)` without re-running k_proj/v_proj.
        (No RoPE: like `context=` without `context_positions`.)
        """
        if not isinstance(context, Tensor) or context.dim() != 3 or context.shape[-1] != self.kv_dim:
            shape = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
            raise ValueError(f"context must be (B, Lk, kv_dim={self.kv_dim}), got {shape}")
        B, Lk, _ = context.shape
        k = self.k_proj(context).view(B, Lk, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, Lk, D)
        v = self.v_proj(context).view(B, Lk, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, Lk, D)
        return k, v

    def forward(self, x: Tensor, context: Tensor | None = None, *, mask=None, causal: bool = False,
                score_mod=None, positions: Tensor | None = None, context_positions: Tensor | None = None,
                return_weights: bool = False, cache=None, context_kv: tuple[Tensor, Tensor] | None = None):
        """Attend from x (B, Lq, d_model) to itself, or to `context` (B, Lk, kv_dim).

        `mask`, `causal` and `score_mod` are as in `qkv.attention` (over (B, Hq, Lq, Lk));
        `positions` / `context_positions` are (L,) or (B, L) token positions for RoPE.
        Returns out (B, Lq, d_model), or (out, weights (B, Hq, Lq, Lk)) with return_weights.

        `cache` (a `qkv.cache.LayerCache`, causal self-attention only): x holds the
        *new* tokens; their keys/values are appended to the cache and the queries
        attend to everything cached (with the cache's window, if any). Pass the new
        tokens' `positions` for RoPE (default: the cache lengths onwards).

        `context_kv` (cross-attention): the (k, v) pair of `project_context(context)`,
        given instead of `context`; the result equals `forward(x, context, ...)`.
        """
        self._check_inputs(x, context, positions, context_positions)
        if context_kv is not None:
            self._check_context_kv(x, context, context_positions, cache, context_kv)
        if cache is not None:
            return self._cached(x, cache, positions, score_mod, mask, return_weights, context)
        B, Lq, _ = x.shape
        q = self.q_proj(x).view(B, Lq, self.n_heads, self.head_dim).transpose(1, 2)     # (B, Hq, Lq, D)
        if context_kv is not None:
            k, v = context_kv                                               # (B, Hkv, Lk, D) x2, projected
        else:
            source = x if context is None else context                      # (B, Lk, d_model or kv_dim)
            Lk = source.shape[1]
            k = self.k_proj(source).view(B, Lk, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, Lk, D)
            v = self.v_proj(source).view(B, Lk, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, Lk, D)

        if self.rope is not None and context_kv is None:
            if context is None:
                q, k = self.rope(q, k, positions, positions)                # same tokens, same positions
            elif context_positions is not None:
                q, k = self.rope(q, k, positions, context_positions)        # opt-in cross-attention RoPE

        if self.alibi_slopes is not None:
            alibi = _scores.alibi(self.alibi_slopes)
            score_mod = alibi if score_mod is None else _scores.chain(alibi, score_mod)

        hook = ATTENTION_HOOK.get()
        if hook is not None:  # qkv.inspect.capture records this call's inputs; the call itself is unchanged
            extra = {} if self.sinks is None else {"sinks": self.sinks}
            hook(self, q, k, mask=mask, causal=causal, score_mod=score_mod, scale=self.scale, q_offset=None, **extra)
        cp = _dist.active() if context is None and context_kv is None else None
        if cp is not None:                      # the sequence is split across a group: attend across it
            return self._across(cp, q, k, v, mask, causal, score_mod, return_weights, B, Lq)
        with _kernel.use_feature_map(self.feature_map):                     # a Performer layer's own features
            result = attention(q, k, v, mask=mask, causal=causal, score_mod=score_mod, scale=self.scale,
                                   dropout_p=self.dropout if self.training else 0.0, backend=self.backend,
                                   return_weights=return_weights, sinks=self.sinks)
        out, weights = result if return_weights else (result, None)         # out (B, Hq, Lq, D)
        out = out.transpose(1, 2).reshape(B, Lq, self.n_heads * self.head_dim)  # (B, Lq, Hq*D)
        out = self.o_proj(out)                                              # (B, Lq, d_model)
        return (out, weights) if return_weights else out

    def _across(self, cp, q, k, v, mask, causal, score_mod, return_weights, B, Lq):
        """Self-attention over a sequence split across `cp`'s group (`qkv.distributed.sharded`)."""
        if return_weights or self.feature_map is not None or self.backend in ("linear", "performer"):
            raise ValueError("a context-parallel forward runs exact attention across the ranks: return_weights, "
                             "linear and Performer attention are not available there")
        if self.training and self.dropout:
            raise ValueError(f"attention dropout ({self.dropout}) is not available in a context-parallel forward; "
                             f"set the model's attention dropout to 0")
        out = _dist.context_attention(q, k, v, strategy=cp.strategy, mask=mask, causal=causal, score_mod=score_mod,
                                      scale=self.scale, sinks=self.sinks, group=cp.group, layout=cp.layout,
                                      backend=self.backend)
        out = out.transpose(1, 2).reshape(B, Lq, self.n_heads * self.head_dim)    # (B, Lr, Hq*D)
        return self.o_proj(out)

    def _cached(self, x, cache, positions, score_mod, mask, return_weights, context):
        if context is not None or mask is not None or return_weights:
            raise ValueError("with a KV cache, attention is causal self-attention over the cached tokens: "
                             "context=, mask= and return_weights= are not available; run without cache=")
        hook = ATTENTION_HOOK.get()
        if hook is not None:  # qkv.inspect.capture cannot see the cached keys: it refuses
            hook(self, None, None, cached=True)
        B, n, _ = x.shape
        qkv_ = fused.joint_linear(x, (self.q_proj, self.k_proj, self.v_proj))                 # one launch when packed
        q, k, v = qkv_ if qkv_ is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(B, n, self.n_heads, self.head_dim).transpose(1, 2)                    # (B, Hq, n, D)
        k = k.view(B, n, self.n_kv_heads, self.head_dim).transpose(1, 2)                 # (B, Hkv, n, D)
        v = v.view(B, n, self.n_kv_heads, self.head_dim).transpose(1, 2)                 # (B, Hkv, n, D)
        if self.rope is not None:
            if positions is None:
                positions = cache.length[:, None] + torch.arange(n)                      # (B, n)
            q, k = self.rope(q, k, positions.to(x.device), positions.to(x.device))
        if self.alibi_slopes is not None:
            alibi = _scores.alibi(self.alibi_slopes)
            score_mod = alibi if score_mod is None else _scores.chain(alibi, score_mod)
        extra = {} if self.sinks is None else {"sinks": self.sinks}   # a cache of another layout need not take sinks
        with _kernel.use_feature_map(self.feature_map):
            out = cache.attention(q, k, v, scale=self.scale, score_mod=score_mod, backend=self.backend,
                                  **extra)                                                # (B, Hq, n, D)
        out = out.transpose(1, 2).reshape(B, n, self.n_heads * self.head_dim)            # (B, n, Hq*D)
        return self.o_proj(out)                                                           # (B, n, d_model)

    def _check_context_kv(self, x, context, context_positions, cache, context_kv):
        if context is not None or context_positions is not None or cache is not None:
            raise ValueError("context_kv replaces context (cross-attention): do not also pass context=, "
                             "context_positions= or cache=")
        if not isinstance(context_kv, (tuple, list)) or len(context_kv) != 2:
            raise TypeError(f"context_kv must be the (k, v) pair of project_context(context), "
                            f"got {type(context_kv).__name__}")
        k, v = context_kv
        for name, t in (("k", k), ("v", v)):
            if (not isinstance(t, Tensor) or t.dim() != 4 or t.shape[0] != x.shape[0]
                    or t.shape[1] != self.n_kv_heads or t.shape[3] != self.head_dim):
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"context_kv {name} must be (B={x.shape[0]}, Hkv={self.n_kv_heads}, Lk, "
                                 f"D={self.head_dim}) as project_context(context) returns, got {shape}")
        if k.shape != v.shape:
            raise ValueError(f"context_kv k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")

    def _check_inputs(self, x, context, positions, context_positions):
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be (B, L, d_model={self.d_model}), got {shape}")
        _check_dtype("x", x, self.q_proj.weight)
        if context is not None:
            if not isinstance(context, Tensor) or context.dim() != 3 or context.shape[-1] != self.kv_dim:
                shape = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
                raise ValueError(f"context must be (B, Lk, kv_dim={self.kv_dim}), got {shape}")
            if context.shape[0] != x.shape[0]:
                raise ValueError(f"x and context must share the batch size, got {x.shape[0]} and {context.shape[0]}")
        if (positions is not None or context_positions is not None) and self.rope is None:
            raise ValueError("positions/context_positions are only used by RoPE, and this layer has rope=None; "
                             "pass rope=RotaryEmbedding(head_dim) or drop the positions")
        if context_positions is not None and context is None:
            raise ValueError("context_positions given without context; in self-attention pass positions only")

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, kv_dim={self.kv_dim}, dropout={self.dropout}, "
                f"alibi={self.alibi_slopes is not None}, backend={self.backend!r}"
                + (", sinks=True" if self.sinks is not None else "")
                + ("" if self.attention == "exact" else f", attention={self.feature_map or self.attention!r}"))


# -----------------------------------------------------------------------------
# Feed-forward


def _dropout(drop: nn.Dropout, x: Tensor) -> Tensor:
    """`drop(x)`, without the module call where it is the identity (eval mode, or p = 0):
    a decode step makes three such calls per layer."""
    return drop(x) if drop.training and drop.p > 0 else x


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


# name -> (elementwise activation, gated?)
ACTIVATIONS = {
    "gelu": (F.gelu, False),            # exact (erf) GELU: BERT
    "gelu_tanh": (_gelu_tanh, False),   # tanh approximation: GPT-2's "gelu_new"
    "relu": (F.relu, False),            # the original Transformer
    "swiglu": (F.silu, True),           # Llama, Mistral: silu(gate) * up
    "geglu": (F.gelu, True),            # GLU-variants paper, exact GELU: gelu(gate) * up
}


class FeedForward(nn.Module):
    """The position-wise MLP of a Transformer block.

    Plain: fc2(dropout(act(fc1(x)))). Gated (swiglu, geglu; Shazeer 2020):
    down_proj(dropout(act(gate_proj(x)) * up_proj(x))): the gate lets each
    hidden unit scale another multiplicatively, which trains better per
    parameter; Llama sizes `hidden` ~ 8/3 d_model to keep the cost of its
    three matrices close to a plain 4 d_model MLP. `dropout` acts on the hidden layer.
    """

    def __init__(self, d_model: int, hidden: int, *, activation: str = "gelu", bias: bool = True,
                 dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        _check_positive_int("d_model", d_model)
        _check_positive_int("hidden", hidden)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}; got {activation!r}")
        self.activation = activation
        self._act, self.gated = ACTIVATIONS[activation]
        factory = {"device": device, "dtype": dtype}
        if self.gated:
            self.gate_proj = Linear(d_model, hidden, bias=bias, **factory)
            self.up_proj = Linear(d_model, hidden, bias=bias, **factory)
            self.down_proj = Linear(hidden, d_model, bias=bias, **factory)
        else:
            self.fc1 = Linear(d_model, hidden, bias=bias, **factory)
            self.fc2 = Linear(hidden, d_model, bias=bias, **factory)
        self.drop = nn.Dropout(_check_dropout("dropout", dropout))

    def forward(self, x: Tensor) -> Tensor:
        w = (self.gate_proj if self.gated else self.fc1).weight
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != w.shape[1]:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be (..., d_model={w.shape[1]}), got {shape}")
        _check_dtype("x", x, w)
        if self.gated:
            both = fused.joint_linear(x, (self.gate_proj, self.up_proj))                      # one launch when packed
            gate, up = both if both is not None else (self.gate_proj(x), self.up_proj(x))
            return self.down_proj(_dropout(self.drop, self._act(gate) * up))
        return self.fc2(_dropout(self.drop, self._act(self.fc1(x))))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


# -----------------------------------------------------------------------------
# Normalisation


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), as Llama computes it.

    y = weight * x / sqrt(mean(x^2) + eps): LayerNorm without the mean
    subtraction and bias. The statistic is computed in float32 whatever the
    input dtype (a bf16 sum of squares over thousands of channels loses
    digits), the normalised x is cast back to the input dtype, then scaled by
    the weight; the output keeps the input dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True, device=None, dtype=None):
        super().__init__()
        _check_positive_int("dim", dim)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"eps must be a number >= 0, got {eps!r}")
        self.dim, self.eps = dim, float(eps)
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be (..., dim={self.dim}), got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}; cast it with x.float()")
        h = x.float() if x.dtype != torch.float64 else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = h.to(x.dtype)
        if self.weight is not None:
            h = (self.weight * h).to(x.dtype)
        return h

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, elementwise_affine={self.weight is not None}"


NORMS = ("layer", "rms")


def _make_norm(kind: str, dim: int, eps: float, device, dtype) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps, device=device, dtype=dtype)
    return RMSNorm(dim, eps=eps, device=device, dtype=dtype)


# -----------------------------------------------------------------------------
# Transformer block


class Block(nn.Module):
    """One Transformer layer: self-attention, optional cross-attention, feed-forward.

    norm_position="pre" (GPT-2, Llama; stable deep stacks, a model adds a final norm)::

        x = x + drop(self_attn(norm1(x)))
        x = x + drop(cross_attn(norm_cross(x), context))     # cross_attention=True only
        x = x + drop(ffn(norm2(x)))

    norm_position="post" (the original Transformer, BERT)::

        x = norm1(x + drop(self_attn(x)))
        x = norm_cross(x + drop(cross_attn(x, context)))
        x = norm2(x + drop(ffn(x)))

    `dropout` is used for the attention weights and the residual branches
    (GPT-2's attn_pdrop = resid_pdrop); the FFN has no inner dropout. RoPE and
    ALiBi apply to self-attention only; cross-attention has kv_dim = d_model
    and the same n_kv_heads. LayerNorm always has its bias; `bias` controls
    the linear layers.

    `attention` ("exact", "linear", "performer" or a `qkv.backends.linear.Performer`)
    picks the self-attention's kind (see MultiHeadAttention); cross-attention stays
    exact. Approximate attention forms no weights, so there `dropout` acts on the
    residual branches only, and a cached step needs a `qkv.cache.LinearStateCache`.
    `sinks=True` gives the self-attention learned attention sinks (see MultiHeadAttention).
    """

    def __init__(self, d_model: int, n_heads: int, *, n_kv_heads: int | None = None,
                 ffn_hidden: int | None = None, activation: str = "gelu", norm: str = "layer",
                 norm_position: str = "pre", eps: float = 1e-5, bias: bool = True, dropout: float = 0.0,
                 cross_attention: bool = False, rope: RotaryEmbedding | None = None,
                 alibi: bool | Tensor = False, backend: str = "auto", head_dim: int | None = None,
                 attention="exact", sinks: bool = False, device=None, dtype=None):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(map(repr, NORMS))}; got {norm!r}")
        if norm_position not in ("pre", "post"):
            raise ValueError(f"norm_position must be 'pre' or 'post'; got {norm_position!r}")
        _check_positive_int("d_model", d_model)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
            raise ValueError(f"eps (the norms' epsilon) must be a finite number >= 0, got {eps!r}; e.g. eps=1e-5")
        ffn_hidden = 4 * d_model if ffn_hidden is None else _check_positive_int("ffn_hidden", ffn_hidden)
        self.d_model = d_model
        self.norm_position = norm_position
        self.cross_attention = bool(cross_attention)
        factory = {"device": device, "dtype": dtype}
        attn = {"n_kv_heads": n_kv_heads, "head_dim": head_dim, "bias": bias, "dropout": dropout,
                "backend": backend, **factory}

        self.norm1 = _make_norm(norm, d_model, eps, **factory)
        approximate = not (isinstance(attention, str) and attention == "exact")
        self.self_attn = MultiHeadAttention(d_model, n_heads, rope=rope, alibi=alibi, attention=attention,
                                            sinks=sinks, **{**attn, "dropout": 0.0 if approximate else dropout})
        if self.cross_attention:
            self.norm_cross = _make_norm(norm, d_model, eps, **factory)
            self.cross_attn = MultiHeadAttention(d_model, n_heads, kv_dim=d_model, **attn)
        self.norm2 = _make_norm(norm, d_model, eps, **factory)
        self.ffn = FeedForward(d_model, ffn_hidden, activation=activation, bias=bias, **factory)
        self.drop = nn.Dropout(_check_dropout("dropout", dropout))

    def forward(self, x: Tensor, *, context: Tensor | None = None, mask=None, causal: bool = False,
                context_mask=None, positions: Tensor | None = None, return_weights: bool = False,
                cache=None, context_kv: tuple[Tensor, Tensor] | None = None):
        """x (B, L, d_model) -> (B, L, d_model); with return_weights, (x, {"self": w, "cross": w or None}).

        `mask`/`causal`/`positions` go to self-attention; `context` (B, Lk, d_model)
        and `context_mask` (e.g. `qkv.masks.padding(lengths)`) to cross-attention.
        `context_kv`: instead of `context`, its keys and values precomputed once by
        `self.cross_attn.project_context(context)` (a decoder reuses them every step).
        `cache` (a `qkv.cache.LayerCache`): x is the new tokens of a causal decoder,
        self-attention reads and extends the cache (see MultiHeadAttention).
        """
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be (B, L, d_model={self.d_model}), got {shape}")
        if context is not None and context_kv is not None:
            raise ValueError("pass context= or its projected context_kv=, not both")
        if self.cross_attention and context is None and context_kv is None:
            raise ValueError("this Block has cross_attention=True: pass context=(B, Lk, d_model), e.g. the "
                             "encoder output (or context_kv=block.cross_attn.project_context(context))")
        if not self.cross_attention and (context is not None or context_mask is not None or context_kv is not None):
            raise ValueError("context/context_mask/context_kv given but this Block has no cross-attention; "
                             "build it with cross_attention=True")
        if cache is not None:
            if return_weights or mask is not None:
                raise ValueError("a cached step cannot take mask= or return_weights=; run without cache=")
            fused = self._fused_decode(x, positions, cache)
            if fused is not None:
                return fused
            x, _ = self._sublayer(x, self.norm1, lambda h: self.self_attn(h, positions=positions, cache=cache),
                                  False)
            if self.cross_attention:
                x, _ = self._sublayer(x, self.norm_cross, lambda h: self.cross_attn(
                    h, context, mask=context_mask, context_kv=context_kv), False)
            x, _ = self._sublayer(x, self.norm2, self.ffn, False)
            return x
        weights = {"self": None, "cross": None}
        x, weights["self"] = self._sublayer(x, self.norm1, lambda h: self.self_attn(
            h, mask=mask, causal=causal, positions=positions, return_weights=return_weights), return_weights)
        if self.cross_attention:
            x, weights["cross"] = self._sublayer(x, self.norm_cross, lambda h: self.cross_attn(
                h, context, mask=context_mask, return_weights=return_weights, context_kv=context_kv),
                return_weights)
        x, _ = self._sublayer(x, self.norm2, self.ffn, False)
        return (x, weights) if return_weights else x

    def _fused_decode(self, x: Tensor, positions: Tensor | None, cache) -> Tensor | None:
        """One new token per sequence through the whole block in one kernel launch
        (`qkv.fused.block_step`), or None where it does not apply and the module path runs.

        It applies to inference (autograd off, eval mode) in fp32 on the CPU, pre-norm, no
        cross-attention, exact attention without ALiBi, sinks or an inspection hook, no forward hook
        on the block's parts, a contiguous or paged cache (a ring buffer takes the module
        path), packed weights (q/k/v and gate/up back to back), biases everywhere or nowhere.
        The module path computes the same function; tests hold the two together.
        """
        layer = self.fused_layout(x, cache)
        if layer is None:
            return None
        layer = fused.with_rope(layer, positions, cache, {})
        cache.check_room(1)                                # CacheFull before anything changes
        return fused.block_step(x, layer)

    def fused_layout(self, x: Tensor, cache) -> dict | None:
        """This block's step-independent layout for `qkv.fused` (no positions, no cache slots), or
        None where the fused step does not apply to x (B, 1, d_model) and this layer's cache
        (see `_fused_decode`)."""
        if (torch.is_grad_enabled() or self.training or x.shape[1] != 1 or x.dtype != torch.float32 or not x.is_cpu
                or x.shape[0] != cache.batch or not cache.fused_ready() or ATTENTION_HOOK.get() is not None
                or not kernels.ready()):
            return None
        plan = self._fused_plan()
        if plan is None:
            return None
        static, dims, floats, rope = plan
        return dict(static=static, dims=dims, floats=floats, rope=rope, window=cache.window)

    def _fused_plan(self):
        """`qkv.fused.plan` for this block's parts, or None when this block cannot be fused now. The
        layout is worked out once per set of modules and parameter addresses (no tensor is kept);
        modules and parameters are read from their dicts, and forward hooks are looked for every step."""
        mods = self._modules
        attn, ffn, n1, n2 = mods["self_attn"], mods["ffn"], mods["norm1"], mods["norm2"]
        if type(attn) is not MultiHeadAttention or type(ffn) is not FeedForward:
            return None                                    # a part swapped for another module: its own forward runs
        am, fm = attn._modules, ffn._modules
        gated = ffn.gated
        ups = (fm["gate_proj"], fm["up_proj"]) if gated else (fm["fc1"],)
        down = fm["down_proj"] if gated else fm["fc2"]
        linears = (am["q_proj"], am["k_proj"], am["v_proj"], am["o_proj"], *ups, down)
        if fused.hooked((attn, ffn, n1, n2, *linears)):
            return None
        params = [layer._parameters.get(name) for layer in linears for name in ("weight", "bias")] + [
            n._parameters.get(name) for n in (n1, n2) for name in ("weight", "bias")]
        rope = attn.rope
        key = (id(attn), id(ffn), id(n1), id(n2), id(rope), ffn.activation, attn.scale, n1.eps, n2.eps,
               self.cross_attention, self.norm_position, attn.attention, attn.backend, attn.feature_map,
               attn._buffers.get("alibi_slopes") is None, attn._parameters.get("sinks") is None, *map(id, linears),
               *(None if t is None else (t.data_ptr(), t.dtype, t.is_contiguous()) for t in params))
        cached = self.__dict__.get("_qkv_fused_plan")
        if cached is not None and cached[0] == key:
            return cached[1]
        norm_kind = self._fused_norm_kind(n1, n2)
        if (norm_kind is None or self.cross_attention or self.norm_position != "pre" or attn.alibi_slopes is not None
                or attn.sinks is not None or attn.feature_map is not None or attn.attention != "exact"
                or attn.backend != "auto"):  # the one-launch kernel has no ALiBi, no sinks
            plan = None
        else:
            plan = fused.plan(attn, ffn, n1, n2, ups, down, linears, norm_kind)
        self.__dict__["_qkv_fused_plan"] = (key, plan)
        return plan

    @staticmethod
    def _fused_norm_kind(n1, n2) -> int | None:
        """`qkv.fused.NORM_LAYER` for two LayerNorms with weights and biases, `NORM_RMS` for two
        RMSNorms with weights, None for any other pair (the module path runs)."""
        if type(n1) is nn.LayerNorm and type(n2) is nn.LayerNorm:
            ok = all(t is not None for t in (n1.weight, n1.bias, n2.weight, n2.bias))
            return fused.NORM_LAYER if ok else None
        if type(n1) is RMSNorm and type(n2) is RMSNorm:
            return fused.NORM_RMS if n1.weight is not None and n2.weight is not None else None
        return None

    def _sublayer(self, x: Tensor, norm: nn.Module, fn, returns_weights: bool):
        """One residual sublayer, pre- or post-norm; returns (x, fn's weights or None)."""
        pre = self.norm_position == "pre"
        h = fn(norm(x) if pre else x)                       # (B, L, d_model) [, weights]
        h, w = h if returns_weights else (h, None)
        x = x + _dropout(self.drop, h)
        return (x if pre else norm(x)), w
