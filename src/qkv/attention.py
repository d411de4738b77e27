"""`qkv.attention`: validate a call, pick a backend, run it.

Legend: B batch, Hq query heads, Hkv key/value heads, G = Hq // Hkv,
Lq query length, Lk key length, D head dim, Dv value dim.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from qkv._util.budget import require_memory
from qkv.backends import registry, tiled
from qkv.backends.base import Call, index_tensor, make_call, zeros_output

__all__ = ["attention", "attention_weights"]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask=None, causal: bool = False,
              score_mod=None, scale: float | None = None, dropout_p: float = 0.0, backend: str = "auto",
              return_lse: bool = False, return_weights: bool = False, q_offset: int | None = None,
              sinks: torch.Tensor | None = None):
    """Scaled dot-product attention, `softmax(mask(score_mod(q k^T * scale))) v`.

    Args:
        q: queries (B, Hq, Lq, D).
        k: keys (B, Hkv, Lk, D); Hkv must divide Hq (GQA/MQA: query head h
            reads key/value head h // (Hq // Hkv); K/V are never repeated in memory).
        v: values (B, Hkv, Lk, Dv).
        mask: who may attend to whom (True = may attend): a `qkv.masks` mask, a
            callable (b, h, q_idx, kv_idx) -> bool (evaluated per element, as FlexAttention
            evaluates a mask_mod), a FlexAttention `BlockMask`, or a bool tensor
            broadcastable to (B, Hq, Lq, Lk).
        causal: shorthand for `mask=qkv.masks.causal()` (combined with `mask` by `&`).
        score_mod: callable (score, b, h, q_idx, kv_idx) -> score, applied to the
            scaled scores before masking (a plain function is evaluated per element, as
            FlexAttention does; qkv's built-ins in `qkv.scores` broadcast).
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
        sinks: attention sinks (GPT-OSS; learned StreamingLLM sinks), a float (Hq,) tensor on
            q's device: as Hugging Face's GPT-OSS computes them, each row of scores (scaled,
            score_mod'ed, masked) gets one more column, sinks[h], with no value; the softmax
            runs over the Lk + 1 entries and the sink's column is dropped. With lse over the
            allowed keys alone: lse' = logaddexp(lse, sinks[h]) is the LSE returned, and the
            weights and out are scaled by sigmoid(lse - sinks[h]) (rows sum to < 1). Gradients
            reach sinks. Served by the backends with `sinks` in `qkv.backends.list()` (math,
            tiled, reference; auto picks one); sdpa, linear and performer refuse. -inf for a
            head: no sink there. Used in the statistics dtype.

    Returns:
        out (B, Hq, Lq, Dv) in q's dtype; with return_lse and/or return_weights, a
        tuple (out, lse, weights) holding only the requested extras, in that order.

    A query row with no allowed key outputs zeros (and gets zero gradients), never NaN.

    Edge cases (the same on every backend, with gradients of the inputs' shapes):

    - A row with no allowed key (mask, causal, or Lk = 0): zeros, zero gradients,
      lse -inf, weights all 0; with sinks, lse = sinks[h] (the row's only entry).
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
    call = make_call(q, k, v, mask=mask, causal=causal, score_mod=score_mod, scale=scale,
                      dropout_p=dropout_p, return_lse=return_lse, return_weights=return_weights,
                      q_offset=q_offset, sinks=sinks)
    if call.sinks is not None:
        call = replace(call, return_lse=True)  # the sinks are applied through the row's LSE (`_with_sinks`)
    if 0 in (call.B, call.Hq, call.Lq, call.Lk, call.Dv):
        if backend != "auto":
            registry.select(call, backend)  # a named backend refuses what it cannot do, even for empty inputs
        out, lse, weights = _degenerate(call)
    else:
        out, lse, weights, exact = _run(call, backend)
        if exact:
            out, lse, weights = _non_finite(call, backend, out, lse, weights)
    if call.sinks is not None:
        out, lse, weights = _with_sinks(call.sinks, out, lse, weights)
    extras = ((lse,) if return_lse else ()) + ((weights,) if return_weights else ())
    return (out, *extras) if extras else out


def _run(call: Call, backend: str):
    """(out, lse, weights, exact) from the backend that serves `call`."""
    be = registry.select(call, backend)
    return (*be.forward(call), be.capabilities.exact)


def _with_sinks(sinks: torch.Tensor, out, lse, weights):
    """(out, lse, weights) of a call without sinks turned into those with them (see `attention`).

    The sink of head h is one more softmax entry with no value: it adds exp(sinks[h]) to every row's
    denominator, so every key's weight, and the output, shrink by keep = sum_j exp(s_ij) / (that
    + exp(sinks[h])) = sigmoid(lse - sinks[h]), and the LSE becomes logaddexp(lse, sinks[h]). Done
    here, once for every backend that returns the LSE, rather than in each kernel: plain torch ops,
    so autograd gives the gradients of sinks and, through the LSE (which every backend with
    `Capabilities.sinks` differentiates), of q, k and v. The statistics dtype throughout: out is
    rescaled in it and cast back. Rows with no allowed key (lse -inf) never meet -inf - -inf, so
    a sink of -inf (no sink for that head) gives neither NaN values nor NaN gradients."""
    sdt = lse.dtype
    sink = sinks.to(sdt).view(1, -1, 1).expand_as(lse)                       # (B, Hq, Lq)
    empty = torch.isneginf(lse)                                              # rows with no allowed key
    safe = lse.masked_fill(empty, 0.0)
    keep = torch.sigmoid(safe - sink).masked_fill(empty, 0.0)                # (B, Hq, Lq): the keys' share
    lse = torch.where(empty, sink, torch.logaddexp(safe, sink))
    if out is not None:
        out = (out.to(sdt) * keep.unsqueeze(-1)).to(out.dtype)               # (B, Hq, Lq, Dv)
    if weights is not None:
        weights = weights * keep.unsqueeze(-1).to(weights.dtype)             # (B, Hq, Lq, Lk)
    return out, lse, weights


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
    the hidden `careful` backend (`tiled.careful_forward`), which never lets a masked key reach a row. Gradients
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
    # a finite sum means finite entries (NaN and Inf propagate through a sum; an overflow only
    # sends the call to the exact look below): one reduction, not a full-size bool tensor each
    if call.dropout_p > 0 or bool(torch.isfinite(out.sum()) & torch.isfinite(call.q.sum())):
        return out, lse, weights
    if all(bool(torch.isfinite(t).all()) for t in (call.q, call.k, call.v)):
        return out, lse, weights  # finite inputs: a NaN comes from the score_mod, the same on every backend
    out_c, lse_c, weights_c = registry.internal("careful").forward(call)
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


def attention_weights(q: torch.Tensor, k: torch.Tensor, *, rows=None, heads=None, mask=None, causal: bool = False,
                      score_mod=None, scale: float | None = None, q_offset: int | None = None,
                      sinks: torch.Tensor | None = None) -> torch.Tensor:
    """The attention weights of chosen query rows (and heads), without the full matrix.

    Recomputes softmax(q k^T * scale) for the query tiles that hold `rows` only,
    so the weights of a few rows of a 100k-token sequence cost a few tiles of
    work and (B, Hq, len(rows), Lk) memory. Arguments as in `qkv.attention`;
    `rows` (default all) and `heads` (default all) are index lists or tensors.
    With `sinks` (Hq,) the weights are `qkv.attention`'s: the key columns of the
    softmax with the sink column appended (each row sums to less than 1).

    Returns (B, len(heads), len(rows), Lk) in float32 (float64 for float64 inputs).
    Rows whose weights would not fit in memory are refused up front with
    `qkv.backends.MemoryNeedError` (a ValueError and a MemoryError) stating the bytes.
    """
    call = make_call(q, k, k, mask=mask, causal=causal, score_mod=score_mod, scale=scale, dropout_p=0.0,
                      return_lse=False, return_weights=True, q_offset=q_offset, sinks=sinks)
    rows_t = torch.arange(call.Lq) if rows is None else index_tensor("rows", rows).cpu()
    if rows_t.numel() and (int(rows_t.min()) < 0 or int(rows_t.max()) >= call.Lq):
        raise ValueError(f"rows must lie in [0, Lq={call.Lq}), got {rows_t.min().item()}..{rows_t.max().item()}; "
                         f"pass query row indices 0..{call.Lq - 1}")
    heads_t = None if heads is None else index_tensor("heads", heads)
    if heads_t is not None and heads_t.numel() and (int(heads_t.min()) < 0 or int(heads_t.max()) >= call.Hq):
        raise ValueError(f"heads must lie in [0, Hq={call.Hq}), got {heads_t.min().item()}..{heads_t.max().item()}; "
                         f"pass query head indices 0..{call.Hq - 1}")
    stat_bytes = 8 if call.stat_dtype == torch.float64 else 4
    require_memory(call.device, call.B * call.Hq * rows_t.numel() * call.Lk * stat_bytes,
                             f"the weights of {rows_t.numel()} rows", "; ask for fewer rows= (a few rows cost little)")
    with torch.no_grad():
        row_lse = None
        if call.sinks is not None:
            row_lse = torch.full((call.B, call.Hq, rows_t.numel()), float("-inf"), dtype=call.stat_dtype,
                                 device=call.device)
        w = tiled.weights_for_rows(call, None, rows_t, row_lse=row_lse)
        if call.sinks is not None:
            _, _, w = _with_sinks(call.sinks, None, row_lse, w)
    return w if heads_t is None else w.index_select(1, heads_t.to(w.device))


def _degenerate(call: Call):
    """Empty batches, heads, queries or keys: defined results without calling a kernel.

    With no keys every row is fully masked: zeros, LSE -inf.
    """
    lse = torch.full((call.B, call.Hq, call.Lq), float("-inf"), dtype=call.stat_dtype, device=call.device)
    weights = torch.zeros(call.B, call.Hq, call.Lq, call.Lk, dtype=call.stat_dtype, device=call.device)
    return zeros_output(call), lse, weights
