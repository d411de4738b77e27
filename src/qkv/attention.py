"""`qkv.attention`: validate a call, pick a backend, run it.

Legend: B batch, Hq query heads, Hkv key/value heads, G = Hq // Hkv,
Lq query length, Lk key length, D head dim, Dv value dim.
"""

from __future__ import annotations

import math
import numbers

import torch

from qkv import backends as _backends
from qkv.backends import Call, zeros_output
from qkv import masks as _masks
from qkv.masks import Mask, as_mask, causal as _causal_mask, from_dense

__all__ = ["attention", "attention_weights"]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask=None, causal: bool = False,
              score_mod=None, scale: float | None = None, dropout_p: float = 0.0, backend: str = "auto",
              return_lse: bool = False, return_weights: bool = False, q_offset: int | None = None):
    """Scaled dot-product attention, `softmax(mask(score_mod(q k^T * scale))) v`.

    Args:
        q: queries (B, Hq, Lq, D).
        k: keys (B, Hkv, Lk, D); Hkv must divide Hq (GQA/MQA: query head h
            reads key/value head h // (Hq // Hkv); K/V are never repeated in memory).
        v: values (B, Hkv, Lk, Dv).
        mask: who may attend to whom (True = may attend): a `qkv.masks` mask, a
            callable (b, h, q_idx, kv_idx) -> bool, or a bool tensor broadcastable
            to (B, Hq, Lq, Lk).
        causal: shorthand for `mask=qkv.masks.causal()` (combined with `mask` by `&`).
        score_mod: callable (score, b, h, q_idx, kv_idx) -> score, applied to the
            scaled scores before masking (see `qkv.scores`).
        scale: multiplies q k^T; default 1 / sqrt(D).
        dropout_p: dropout on the attention weights (applied whenever > 0; layers
            pass 0 in eval mode).
        backend: "auto" (the fastest backend that can serve the call), or a name
            from `qkv.backends.list()`.
        return_lse: also return the log-sum-exp of each row's scores, (B, Hq, Lq),
            float32 (float64 for float64 inputs); -inf for rows with no allowed key.
        return_weights: also return the attention weights (B, Hq, Lq, Lk), in the
            same statistics dtype (after dropout, i.e. the weights that multiplied v).
        q_offset: absolute position of the first query. Default `Lk - Lq`: the
            queries are the *last* Lq positions of the keys (bottom-right alignment)::

                Lq = 2, Lk = 5, causal     q_offset = Lk - Lq = 3
                          kv: 0 1 2 3 4
                   q_pos 3:   x x x x .
                   q_pos 4:   x x x x x

            as in every KV-cache decode step. Pass q_offset=0 for top-left alignment.

    Returns:
        out (B, Hq, Lq, Dv) in q's dtype; with return_lse and/or return_weights, a
        tuple (out, lse, weights) holding only the requested extras, in that order.

    A query row with no allowed key outputs zeros (and gets zero gradients), never NaN.
    """
    call = _make_call(q, k, v, mask=mask, causal=causal, score_mod=score_mod, scale=scale,
                      dropout_p=dropout_p, return_lse=return_lse, return_weights=return_weights,
                      q_offset=q_offset)
    if call.Lk == 0 or q.numel() == 0 or v.shape[-1] == 0:
        out, lse, weights = _degenerate(call)
    elif backend == "auto" and (segments := _document_segments(call)) is not None:
        return _by_segments(call, *segments)
    else:
        out, lse, weights = _backends.select(call, backend).forward(call)
    extras = ((lse,) if return_lse else ()) + ((weights,) if return_weights else ())
    return (out, *extras) if extras else out


# -----------------------------------------------------------------------------
# Packed sequences: a document mask whose documents are contiguous runs


def _document_segments(call: Call):
    """(starts, lengths, causal) when `call` is packed documents that run as a padded batch, else None.

    A `document(ids)` mask (optionally `& causal()`) over one sequence of
    contiguous documents, with nothing else asked of the call (no score_mod,
    LSE or weights), is exactly a batch of independent attentions, one per
    document. Run as such, the work is sum(len^2) plus the padding to the
    longest document, without the cost of classifying and masking tiles that
    cut across documents. Skipped under `qkv.backends.use_backend(...)`.
    """
    mask = call.mask
    causal = False
    if isinstance(mask, _masks._And):
        parts = {type(mask.a), type(mask.b)}
        if parts != {_masks._Document, _masks._Causal}:
            return None
        mask, causal = (mask.a if isinstance(mask.a, _masks._Document) else mask.b), True
    if (not isinstance(mask, _masks._Document) or call.score_mod is not None or call.return_lse
            or call.return_weights or _backends._PREFERRED.get() is not None):
        return None
    L = call.Lk
    if call.Lq != L or call.q_offset != 0 or mask.ids.shape[0] != 1 or mask.ids.shape[1] != L or L < 2:
        return None
    ids = mask.ids[0].to(call.q.device)
    change = (ids[1:] != ids[:-1]).nonzero().squeeze(1) + 1                       # (n - 1,) run starts
    n = change.numel() + 1
    if n < 2 or torch.unique(ids).numel() != n:                                   # one document, or not runs
        return None
    starts = torch.cat([change.new_zeros(1), change])                             # (n,)
    lengths = torch.diff(torch.cat([starts, change.new_tensor([L])]))             # (n,)
    return starts, lengths, causal


def _by_segments(call: Call, starts: torch.Tensor, lengths: torch.Tensor, causal: bool) -> torch.Tensor:
    """The documents of a packed sequence as a padded batch (B * n, H, Lmax, D), then back to (B, H, L, D)."""
    q, k, v = call.q, call.k, call.v
    B, L, n = call.B, call.Lk, starts.numel()
    Lmax = int(lengths.max())
    offs = torch.arange(Lmax, device=q.device)
    gather = (starts[:, None] + offs).clamp(max=L - 1).reshape(-1)               # (n * Lmax,) positions

    def pack(t):                                                                  # (B, H, L, E) -> (B*n, H, Lmax, E)
        H, E = t.shape[1], t.shape[3]
        return t[:, :, gather].view(B, H, n, Lmax, E).transpose(1, 2).reshape(B * n, H, Lmax, E)

    keys_ok = None
    if not causal:                                                                # causal never reaches the padding
        keys_ok = (offs[None] < lengths[:, None]).repeat(B, 1)[:, None, None, :]  # (B*n, 1, 1, Lmax)
    out = torch.nn.functional.scaled_dot_product_attention(
        pack(q), pack(k), pack(v), attn_mask=keys_ok, is_causal=causal, scale=call.scale,
        dropout_p=call.dropout_p, enable_gqa=call.Hq != call.Hkv)                 # (B*n, Hq, Lmax, Dv)
    doc = torch.repeat_interleave(torch.arange(n, device=q.device), lengths)     # (L,) document of each position
    back = doc * Lmax + torch.arange(L, device=q.device) - starts[doc]           # (L,) its row in the padded batch
    Dv = out.shape[-1]
    return out.view(B, n, call.Hq, Lmax, Dv).transpose(1, 2).reshape(B, call.Hq, n * Lmax, Dv)[:, :, back]


def attention_weights(q: torch.Tensor, k: torch.Tensor, *, rows=None, heads=None, mask=None, causal: bool = False,
                      score_mod=None, scale: float | None = None, q_offset: int | None = None) -> torch.Tensor:
    """The attention weights of chosen query rows (and heads), without the full matrix.

    Recomputes softmax(q k^T * scale) for the query tiles that hold `rows` only,
    so the weights of a few rows of a 100k-token sequence cost a few tiles of
    work and (B, Hq, len(rows), Lk) memory. Arguments as in `qkv.attention`;
    `rows` (default all) and `heads` (default all) are index lists or tensors.

    Returns (B, len(heads), len(rows), Lk) in float32 (float64 for float64 inputs).
    """
    from qkv.backends.tiled import weights_for_rows

    call = _make_call(q, k, k, mask=mask, causal=causal, score_mod=score_mod, scale=scale, dropout_p=0.0,
                      return_lse=False, return_weights=True, q_offset=q_offset)
    rows_t = torch.arange(call.Lq) if rows is None else torch.as_tensor(rows).long().flatten().cpu()
    if rows_t.numel() and (int(rows_t.min()) < 0 or int(rows_t.max()) >= call.Lq):
        raise ValueError(f"rows must lie in [0, Lq={call.Lq}), got {rows_t.min().item()}..{rows_t.max().item()}")
    heads_t = None if heads is None else torch.as_tensor(heads).long().flatten()
    if heads_t is not None and heads_t.numel() and (int(heads_t.min()) < 0 or int(heads_t.max()) >= call.Hq):
        raise ValueError(f"heads must lie in [0, Hq={call.Hq})")
    with torch.no_grad():
        w = weights_for_rows(call, None, rows_t)
    return w if heads_t is None else w.index_select(1, heads_t.to(w.device))


def _degenerate(call: Call):
    """Empty batches, heads, queries or keys: defined results without calling a kernel.

    With no keys every row is fully masked: zeros, LSE -inf.
    """
    lse = torch.full((call.B, call.Hq, call.Lq), float("-inf"), dtype=call.stat_dtype, device=call.device)
    weights = torch.zeros(call.B, call.Hq, call.Lq, call.Lk, dtype=call.stat_dtype, device=call.device)
    return zeros_output(call), lse, weights


def _make_call(q, k, v, *, mask, causal, score_mod, scale, dropout_p, return_lse, return_weights,
               q_offset) -> Call:
    """Check every argument up front and say what to do about a bad one."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D in layout (B, H, L, D), got shape {tuple(t.shape)}; "
                             f"for a single sequence use {name}[None] (and [None] again for one head)")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}; "
                        f"cast them, e.g. k.to(q.dtype)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q on {q.device}, k on {k.device}, "
                         f"v on {v.device}; move them with .to(q.device)")
    B, Hq, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if Bk != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q has B={B}, k has {Bk}, v has {v.shape[0]}")
    if v.shape[1] != Hkv or v.shape[2] != Lk:
        raise ValueError(f"k and v must have the same heads and length, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if Dk != D:
        raise ValueError(f"q and k must have the same head dim, got q D={D} and k D={Dk}")
    if Hkv == 0 and Hq != 0:
        raise ValueError("k and v have 0 heads; GQA needs 1 <= Hkv <= Hq")
    if Hkv and Hq % Hkv:
        raise ValueError(f"query heads Hq={Hq} must be a multiple of key/value heads Hkv={Hkv} "
                         f"(GQA/MQA); choose Hkv among the divisors of {Hq}")

    if q_offset is None:
        q_offset = Lk - Lq
    elif isinstance(q_offset, bool) or not isinstance(q_offset, numbers.Integral):
        raise TypeError(f"q_offset must be an int (position of the first query), got {type(q_offset).__name__}")
    q_offset = int(q_offset)

    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    elif not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale}; leave it None for 1/sqrt(D)")
    scale = float(scale)

    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")

    if score_mod is not None and not callable(score_mod):
        raise TypeError(f"score_mod must be a callable (score, b, h, q_idx, kv_idx) -> score, "
                        f"got {type(score_mod).__name__}")
    for name, flag in (("causal", causal), ("return_lse", return_lse), ("return_weights", return_weights)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")

    mask = _as_call_mask(mask, q, Lq, Lk, q_offset)
    if causal:
        mask = _causal_mask() if mask is None else _causal_mask() & mask
    if mask is not None:
        mask.validate(B, Hq, Lq, Lk, q_offset)
    return Call(q, k, v, mask, score_mod, scale, float(dropout_p), q_offset, return_lse, return_weights)


def _as_call_mask(mask, q, Lq, Lk, q_offset) -> Mask | None:
    if mask is None or isinstance(mask, Mask):
        return mask
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool:
            raise TypeError(f"a tensor mask must be bool (True = may attend), got dtype {mask.dtype}; "
                            f"for an additive float mask use score_mod=qkv.scores.bias(mask)")
        if mask.device != q.device:
            raise ValueError(f"mask is on {mask.device} but q is on {q.device}; move it with mask.to(q.device)")
        if not 2 <= mask.dim() <= 4 or mask.shape[-2] not in (1, Lq) or mask.shape[-1] not in (1, Lk):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to (B, H, Lq, Lk) "
                             f"with Lq={Lq}, Lk={Lk}")
        return from_dense(mask, q_offset=q_offset)
    if callable(mask):
        return as_mask(mask)
    raise TypeError(f"mask must be a qkv mask, a callable (b, h, q_idx, kv_idx) -> bool, or a bool tensor; "
                    f"got {type(mask).__name__}")
