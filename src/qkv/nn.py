"""Drop-in replacements for torch.nn attention modules, computed by `qkv.attention`.

Legend: N batch (torch's name for qkv's B), H heads, L query length, S key length,
S' = S + add_bias_kv + add_zero_attn (keys after the extra columns), E embed dim,
D = E // H head dim, Ek / Ev key / value input dims (kdim, vdim).

`MultiheadAttention` keeps torch's parameters, shapes, masks and return values, so
a checkpoint of `torch.nn.MultiheadAttention` loads unchanged (and back). Only the
attention itself is different code: it runs through `qkv.attention`, which means
any qkv backend, qkv's zeros-not-NaN rule for fully masked rows, and weights from
the same place as every other qkv layer.

Mask conventions differ between the two libraries, so they are translated here:

    torch (this module's inputs)            qkv (what qkv.attention receives)
    bool  True  = may NOT attend            mask=  True = may attend   (allowed = ~m)
    float       = added to the score        score_mod=qkv.scores.bias(m)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qkv.attention import attention
from qkv.hooks import ATTENTION_HOOK
from qkv.scores import bias as _bias

__all__ = ["MultiheadAttention"]


class MultiheadAttention(nn.Module):
    """`torch.nn.MultiheadAttention`, with the attention computed by `qkv.attention`.

    Same constructor, parameters (names, shapes, initialisation), attributes,
    forward signature, shape rules and return values as torch 2.x, so
    `mha.load_state_dict(torch_mha.state_dict())` works both ways and the module
    can replace torch's in existing code::

        mha = qkv.nn.MultiheadAttention(512, 8, batch_first=True)
        out, weights = mha(x, x, x, key_padding_mask=pad)   # pad: True = padding (torch's convention)

    Inputs are (L, N, E) / (S, N, Ek) / (S, N, Ev), or (N, L, E) ... with
    batch_first=True, or unbatched (L, E) / (S, Ek) / (S, Ev). Masks follow torch:
    `key_padding_mask` (N, S) or (S,) and `attn_mask` (L, S) or (N*H, L, S); a bool
    True means "may NOT attend" (the opposite of qkv's masks), a float is added to
    the scores. `add_bias_kv` appends the learned `bias_k`/`bias_v` as one more key
    and value, `add_zero_attn` then appends an all-zero key and value; masks are
    padded so every query may attend to those extra keys, as torch does.

    Returns `(attn_output, attn_weights)`: attn_output in the input layout;
    attn_weights (N, L, S') averaged over heads or (N, H, L, S') per head (no N when
    unbatched), in the input dtype, after dropout, or None when need_weights=False.
    With need_weights=False and no float mask the call can run on qkv's `sdpa`
    backend; weights or float masks route it to `math`.

    Differences from torch, on purpose:

    - A query row whose every key is masked gets zero attention (zero weights, and
      attn_output = out_proj.bias for that row) instead of torch's NaN. This is
      qkv's rule everywhere: padded queries of a batch must not poison a loss.
    - Bad arguments raise ValueError / TypeError naming the argument and the fix,
      where torch raises AssertionError / RuntimeError. An `attn_mask` of the wrong
      shape is rejected even when `is_causal=True` would make torch skip it.
    - torch's CPU/GPU inference fast path (`torch._native_multi_head_attention`)
      and NestedTensor inputs are not used: every call goes through qkv.attention.
    - `dropout` must lie in [0, 1) (checked when the module is built).
    - With half-precision inputs the head average of the weights is taken in
      float32 before casting back (torch averages in the input dtype).

    `is_causal` is torch's *hint*, replicated exactly: it requires `attn_mask`
    (ValueError without one); with need_weights=False and no key_padding_mask torch
    ignores `attn_mask` and applies a top-left causal mask over all S' keys (so the
    bias_k / zero-attention keys are masked for rows i < S), and otherwise it uses
    `attn_mask` as given. qkv does the same, so outputs match torch in every case;
    with an honest hint and no extra keys both paths agree anyway.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None, dtype=None):
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("kdim", kdim), ("vdim", vdim)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be greater than 0, got embed_dim={embed_dim} "
                             f"and num_heads={num_heads}")
        for name, value in (("kdim", kdim), ("vdim", vdim)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be greater than 0 (the key/value input width), or None for "
                                 f"embed_dim, got {value}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads} "
                             f"(each head gets embed_dim // num_heads features)")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads

        # Registration order (and so state_dict order) and the order of random draws
        # follow torch, so a given seed initialises both modules identically.
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """torch's scheme: Glorot-uniform projections (q, k, v are initialised as one
        (3E, E) matrix when packed, as torch does), zero biases, Glorot-normal bias_k/v."""
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            nn.init.xavier_normal_(self.bias_v)

    def extra_repr(self) -> str:
        s = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
        if not self._qkv_same_embed_dim:
            s += f", kdim={self.kdim}, vdim={self.vdim}"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bias_k is not None:
            s += ", add_bias_kv=True"
        if self.add_zero_attn:
            s += ", add_zero_attn=True"
        return s + f", batch_first={self.batch_first}"

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        """See the class docstring; arguments and returns are torch's."""
        batched = self._check_inputs(query, key, value)
        need_weights, is_causal = bool(need_weights), bool(is_causal)
        shared = (query is key, key is value)   # self-/encoder-decoder attention: fewer GEMMs below

        # Work batch-first: (N, L, E), (N, S, Ek), (N, S, Ev). Views, no copies.
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        N, L, _ = query.shape
        S = key.shape[1]
        H, D, E = self.num_heads, self.head_dim, self.embed_dim

        kpm = _check_mask(key_padding_mask, "key_padding_mask",
                          (N, S) if batched else (S,),
                          "(N, S)" if batched else "(S,) for unbatched inputs")
        if kpm is not None:
            kpm = kpm.reshape(N, 1, 1, S)                                    # (N, 1, 1, S)
        am = None
        if attn_mask is not None:
            if isinstance(attn_mask, torch.Tensor) and attn_mask.dim() == 3:
                am = _check_mask(attn_mask, "attn_mask", (N * H, L, S),
                                 "(N * num_heads, L, S)" if batched else "(num_heads, L, S) for unbatched inputs")
                am = am.reshape(N, H, L, S)                                   # (N, H, L, S)
            else:
                am = _check_mask(attn_mask, "attn_mask", (L, S), "(L, S) or (N * num_heads, L, S)")
                am = am.reshape(1, 1, L, S)                                   # (1, 1, L, S)
        if is_causal and am is None:
            raise ValueError("is_causal=True is a hint that attn_mask is causal and needs attn_mask as well "
                             "(as in torch); pass attn_mask=torch.nn.Transformer.generate_square_subsequent_mask(L) "
                             "or use qkv.attention(..., causal=True)")

        q, k, v = self._project(query, key, value, *shared)                  # (N, L, E), (N, S, E), (N, S, E)

        # Extra keys torch appends: the learned bias_k / bias_v, then an all-zero key/value.
        extra = 0
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.to(k.dtype).expand(N, 1, E)], dim=1)   # (N, S+1, E)
            v = torch.cat([v, self.bias_v.to(v.dtype).expand(N, 1, E)], dim=1)
            extra += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, 1, E)], dim=1)                     # (N, S', E)
            v = torch.cat([v, v.new_zeros(N, 1, E)], dim=1)
            extra += 1

        q = q.unflatten(-1, (H, D)).transpose(1, 2)                          # (N, H, L, D)
        k = k.unflatten(-1, (H, D)).transpose(1, 2)                          # (N, H, S', D)
        v = v.unflatten(-1, (H, D)).transpose(1, 2)                          # (N, H, S', D)

        kw = {}
        if is_causal and kpm is None and not need_weights:
            # torch's SDPA path: the hint replaces attn_mask by a top-left causal mask over S' keys.
            kw.update(causal=True, q_offset=0)
        else:
            allowed, additive = _merge_masks([kpm, am], extra)
            if allowed is not None:
                kw["mask"] = allowed                                         # broadcasts to (N, H, L, S')
            if additive is not None:
                kw["score_mod"] = _bias(additive)

        dropout_p = float(self.dropout) if self.training else 0.0
        hook = ATTENTION_HOOK.get()
        if hook is not None:  # qkv.inspect.capture records this call's inputs; the call itself is unchanged
            hook(self, q, k, mask=kw.get("mask"), causal=kw.get("causal", False), score_mod=kw.get("score_mod"),
                 scale=None, q_offset=kw.get("q_offset"))
        result = attention(q, k, v, dropout_p=dropout_p, return_weights=need_weights, **kw)
        out, weights = result if need_weights else (result, None)            # out (N, H, L, D)

        out = out.transpose(1, 2).reshape(N, L, E)                           # (N, L, E)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(0)                                             # (L, E)
        elif not self.batch_first:
            out = out.transpose(0, 1)                                        # (L, N, E)

        if weights is not None:                                              # (N, H, L, S')
            if average_attn_weights:
                weights = weights.mean(dim=1)                                # (N, L, S')
            weights = weights.to(query.dtype)
            if not batched:
                weights = weights.squeeze(0)                                 # (L, S') or (H, L, S')
        return out, weights

    def _project(self, query, key, value, q_is_k=False, k_is_v=False):
        """Input projections with torch's weights: (N, L, E), (N, S, E), (N, S, E).

        When the same tensor is passed twice (self-attention, or encoder-decoder
        attention with key is value) the packed weight projects it in one GEMM.
        """
        E = self.embed_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        if self._qkv_same_embed_dim and k_is_v:
            if q_is_k:
                return F.linear(query, w, b).chunk(3, dim=-1)                # 3 x (N, L, E)
            k, v = F.linear(key, w[E:], None if b is None else b[E:]).chunk(2, dim=-1)
            return F.linear(query, w[:E], None if b is None else b[:E]), k, v
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = w.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if b is not None:
            b_q, b_k, b_v = b.chunk(3)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _check_inputs(self, query, key, value) -> bool:
        """Validate query/key/value up front; return whether the inputs are batched."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 3-D ({'(N, L, E)' if self.batch_first else '(L, N, E)'}) or "
                             f"2-D (L, E) for an unbatched input, got shape {tuple(query.shape)}")
        batched = query.dim() == 3
        if key.dim() != query.dim() or value.dim() != query.dim():
            kind = "batched (3-D)" if batched else "unbatched (2-D)"
            raise ValueError(f"for a {kind} query, key and value must be {query.dim()}-D too, got key "
                             f"{tuple(key.shape)} and value {tuple(value.shape)}")
        if not (query.dtype == key.dtype == value.dtype):
            raise TypeError(f"query, key, value must share one dtype, got {query.dtype}, {key.dtype}, "
                            f"{value.dtype}; cast them, e.g. key.to(query.dtype)")
        w = self.in_proj_weight if self._qkv_same_embed_dim else self.q_proj_weight
        if query.dtype != w.dtype and not torch.is_autocast_enabled(query.device.type):
            raise TypeError(f"query, key and value are {query.dtype} but this module's parameters are {w.dtype}; "
                            f"cast the inputs with .to({w.dtype}) or the module with .to({query.dtype})")
        for name, t, want, arg in (("query", query, self.embed_dim, "embed_dim"),
                                   ("key", key, self.kdim, "kdim"), ("value", value, self.vdim, "vdim")):
            if t.shape[-1] != want:
                raise ValueError(f"{name} has {t.shape[-1]} features (last dim) but this module was built with "
                                 f"{arg}={want}; project the input or build the module with {arg}={t.shape[-1]}")
        seq_dim = 1 if (batched and self.batch_first) else 0
        if key.shape[seq_dim] != value.shape[seq_dim]:
            raise ValueError(f"key and value must have the same sequence length S, got key {tuple(key.shape)} "
                             f"and value {tuple(value.shape)}")
        if batched:
            b = 0 if self.batch_first else 1
            layout = "(N, L, E) with batch_first=True" if self.batch_first else "(L, N, E) with batch_first=False"
            if not (query.shape[b] == key.shape[b] == value.shape[b]):
                raise ValueError(f"query, key and value must have the same batch size N (dim {b}, layout {layout}), "
                                 f"got query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}")
        return batched


def _check_mask(m, name, shape, spelled):
    """A torch-convention mask: None, or a bool/float tensor of exactly `shape`."""
    if m is None:
        return None
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(m).__name__}")
    if m.dtype != torch.bool and not m.is_floating_point():
        raise TypeError(f"{name} must be bool (True = may NOT attend, torch's convention) or floating point "
                        f"(added to the scores), got dtype {m.dtype}; use {name}.bool()")
    if tuple(m.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {spelled} = {tuple(shape)} for these inputs, "
                         f"got {tuple(m.shape)}")
    return m


def _merge_masks(masks, extra):
    """Translate torch masks (each broadcastable to (N, H, L, S)) into qkv's two channels.

    Returns (allowed, additive): a bool tensor with True = may attend, and a float
    bias, each broadcastable to (N, H, L, S + extra) or None. The `extra` appended
    keys (bias_k, zero attention) are open to every query, as in torch.
    """
    allowed = additive = None
    for m in masks:
        if m is None:
            continue
        if m.dtype == torch.bool:
            ok = F.pad(~m, (0, extra), value=True)                           # (.., .., .., S')
            allowed = ok if allowed is None else allowed & ok
        else:
            add = F.pad(m, (0, extra), value=0.0)                            # (.., .., .., S')
            additive = add if additive is None else additive + add
    return allowed, additive
