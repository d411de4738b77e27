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
from qkv import scores as _scores
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

    Edge cases (the same on every backend, with gradients of the inputs' shapes):

    - A row with no allowed key (mask, causal, or Lk = 0): zeros, zero gradients,
      lse -inf, weights all 0.
    - B = 0, Hq = Hkv = 0, Lq = 0 or Dv = 0: an empty output (B, Hq, Lq, Dv) (lse
      (B, Hq, Lq), weights (B, Hq, Lq, Lk)). Lk = 0: zeros, lse -inf, as above.
      A named backend still refuses what it cannot do (e.g. sdpa with return_lse).
    - D = 0: every score is the empty dot product 0, so each row averages the
      values of its allowed keys (uniform weights); approximate backends refuse it.
    - fp16 / bf16 inputs: the scores q k^T * scale are formed in float32, so logits
      past fp16's 65504 neither overflow nor lose whole units in bf16: the output is
      finite and accurate for any logits float32 holds (|q.k * scale| < 3.4e38;
      past that, outside every guarantee, backends differ).
    - Calls too large for the device's memory are refused with the bytes they need
      before anything is allocated (`qkv.backends.BackendError`; `MemoryNeedError`,
      a ValueError and a MemoryError, for `attention_weights` and `Mask.to_dense`).

    NaN and Inf in q, k, v (exact backends, dropout_p = 0) are never hidden:

    - a row whose query is not finite is NaN (zeros if it has no allowed key);
    - otherwise IEEE arithmetic over the keys the row may attend: a NaN or +inf
      score (from k, or returned by score_mod) makes the row NaN, a -inf score
      gives that key weight 0 (as a mask does); a NaN in v at an allowed key makes
      that column NaN, an Inf makes it +-Inf (NaN with weight 0 or both signs);
    - a key the mask rules out for a row never reaches that row, whatever k and v
      hold there (padding may hold garbage): with a mask, gradients are those of the
      call with the non-finite entries replaced by 0, exact for the rows that cannot
      see them. Approximate backends propagate NaN too, to any row they touch.
    """
    call = _make_call(q, k, v, mask=mask, causal=causal, score_mod=score_mod, scale=scale,
                      dropout_p=dropout_p, return_lse=return_lse, return_weights=return_weights,
                      q_offset=q_offset)
    if 0 in (call.B, call.Hq, call.Lq, call.Lk, call.Dv):
        if backend != "auto":
            _backends.select(call, backend)  # a named backend refuses what it cannot do, even for empty inputs
        out, lse, weights = _degenerate(call)
    else:
        out, lse, weights, exact = _run(call, backend)
        if exact:
            out, lse, weights = _non_finite(call, backend, out, lse, weights)
    extras = ((lse,) if return_lse else ()) + ((weights,) if return_weights else ())
    return (out, *extras) if extras else out


def _run(call: Call, backend: str):
    """(out, lse, weights, exact) from the backend that serves `call` (packed documents as a batch)."""
    if backend == "auto" and (segments := _document_segments(call)) is not None:
        return _by_segments(call, *segments), None, None, True
    be = _backends.select(call, backend)
    return (*be.forward(call), be.capabilities.exact)


# -----------------------------------------------------------------------------
# Inputs holding NaN or Inf


def _non_finite(call: Call, backend: str, out, lse, weights):
    """Make every exact backend agree on inputs that hold NaN or Inf (see `attention`'s docstring).

    Without a mask every row may attend every key, so IEEE arithmetic already gives
    the defined result, except that torch's fused CPU kernels return a finite row for
    a query holding NaN: such rows are set to NaN here, without a host sync. With a
    mask, a non-finite value at a key a row may not attend can reach that row through
    the kernels' arithmetic (NaN - inf, 0 * NaN); whenever the output or q is not
    finite and an input holds NaN or Inf, the call is recomputed by
    `tiled.careful_forward`, which never lets a masked key reach a row. Gradients
    then come from the same call with every non-finite input entry replaced by 0.
    """
    if call.device.type == "meta":
        return out, lse, weights  # shapes only
    if call.mask is None:
        bad_q = ~torch.isfinite(call.q).all(dim=-1, keepdim=True)                    # (B, Hq, Lq, 1)
        out = out.masked_fill(bad_q, float("nan"))
        if lse is not None:
            lse = lse.masked_fill(bad_q.squeeze(-1), float("nan"))
        if weights is not None:
            weights = weights.masked_fill(bad_q, float("nan"))
        return out, lse, weights
    if call.dropout_p > 0 or bool(torch.isfinite(out).all() & torch.isfinite(call.q).all()):
        return out, lse, weights
    if all(bool(torch.isfinite(t).all()) for t in (call.q, call.k, call.v)):
        return out, lse, weights  # finite inputs: a NaN comes from the score_mod, the same on every backend
    from dataclasses import replace

    from qkv.backends.tiled import careful_forward

    out_c, lse_c, weights_c = careful_forward(call)
    if not call.needs_grad:
        return out_c, (lse_c if call.return_lse else None), weights_c
    zero = torch.zeros((), dtype=call.dtype, device=call.device)
    clean = replace(call, **{n: torch.where(torch.isfinite(t), t, zero)
                             for n, t in (("q", call.q), ("k", call.k), ("v", call.v))})
    out_s, lse_s, weights_s, _ = _run(clean, backend)

    def graft(s, c):  # the careful value, with the gradient of the cleaned call where that is finite
        if s is None or c is None:
            return c
        c = c.to(s.dtype)
        return torch.where(torch.isfinite(s), s + (c - s).detach(), c)

    return graft(out_s, out_c), graft(lse_s, lse_c) if call.return_lse else None, graft(weights_s, weights_c)


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
    if type(mask) is _masks._And:           # not isinstance: `|` (_Or) subclasses _And
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
    q_docs, scale = pack(q), call.scale
    if causal and scale < 0:
        # torch's CPU kernel returns NaN rows for is_causal=True with a negative scale (torch 2.13):
        # q k^T * scale = (-q) k^T * |scale| exactly
        q_docs, scale = -q_docs, -scale
    out = torch.nn.functional.scaled_dot_product_attention(
        q_docs, pack(k), pack(v), attn_mask=keys_ok, is_causal=causal, scale=scale,
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
    Rows whose weights would not fit in memory are refused up front with
    `qkv.backends.MemoryNeedError` (a ValueError and a MemoryError) stating the bytes.
    """
    from qkv.backends.tiled import weights_for_rows

    call = _make_call(q, k, k, mask=mask, causal=causal, score_mod=score_mod, scale=scale, dropout_p=0.0,
                      return_lse=False, return_weights=True, q_offset=q_offset)
    rows_t = torch.arange(call.Lq) if rows is None else _index_tensor("rows", rows).cpu()
    if rows_t.numel() and (int(rows_t.min()) < 0 or int(rows_t.max()) >= call.Lq):
        raise ValueError(f"rows must lie in [0, Lq={call.Lq}), got {rows_t.min().item()}..{rows_t.max().item()}; "
                         f"pass query row indices 0..{call.Lq - 1}")
    heads_t = None if heads is None else _index_tensor("heads", heads)
    if heads_t is not None and heads_t.numel() and (int(heads_t.min()) < 0 or int(heads_t.max()) >= call.Hq):
        raise ValueError(f"heads must lie in [0, Hq={call.Hq}), got {heads_t.min().item()}..{heads_t.max().item()}; "
                         f"pass query head indices 0..{call.Hq - 1}")
    stat_bytes = 8 if call.stat_dtype == torch.float64 else 4
    _backends.require_memory(call.device, call.B * call.Hq * rows_t.numel() * call.Lk * stat_bytes,
                             f"the weights of {rows_t.numel()} rows", "; ask for fewer rows= (a few rows cost little)")
    with torch.no_grad():
        w = weights_for_rows(call, None, rows_t)
    return w if heads_t is None else w.index_select(1, heads_t.to(w.device))


def _index_tensor(name: str, idx) -> torch.Tensor:
    """`idx` (an int, a list of ints or an integer tensor) as a flat int64 tensor; floats and bools are refused."""
    try:
        t = torch.as_tensor(idx)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be an int, a list of ints or an integer tensor, "
                        f"got {type(idx).__name__}") from None
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must hold integer indices, got dtype {t.dtype}; pass e.g. {name}=[0, 1]")
    return t.long().flatten()


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
    if isinstance(score_mod, _scores.ScoreMod):
        score_mod.validate(B, Hq, Lq, Lk, q_offset)
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
