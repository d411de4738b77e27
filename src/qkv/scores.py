"""Score modifiers: functions that change a scaled score before the softmax.

Legend: B batch, H query heads, Lq query length, Lk key length; q/kv are absolute positions.

A score_mod maps a score to a new score::

    score_mod(score, b, h, q_idx, kv_idx) -> new score

`score` is the scaled score q.k * scale (float32, or float64 for float64 inputs). `h` is the
*query* head (with GQA the key/value head is h // G). Two kinds of callable, called differently:

- **Your own function** has FlexAttention's contract: it is evaluated as if once per element,
  `score` and the indices all 0-d tensors (`qkv._util.mods` nests `torch.vmap` over the four
  axes, as FlexAttention does). So `score + bias[b][q_idx]`, `score + (qr[b, h, q_idx] *
  kr[b, 0, kv_idx]).sum()` or `torch.dot(...)` mean what they mean in FlexAttention, and
  tensors it captures that require grad get gradients on every backend. It must use torch
  operations (no Python `if` on an index, no `.item()`, no NumPy) and return one value per
  element; one that cannot run so raises `qkv.masks.ModError` naming it and why.
  `as_score_mod` makes the wrapper (`qkv.attention` and `chain` apply it).
- **qkv's score mods** (the built-ins below, `chain` of them, and `ScoreMod` subclasses of
  your own) are called once on the whole (B, H, Lq, Lk) score tensor, or a tile of it, with
  broadcast index arrays as for masks. Built-ins work on torch tensors and NumPy arrays,
  so the float64 oracle applies the same function.

Masks (booleans) and score mods (additive changes) are kept apart: a score_mod
may return -inf, but "may not attend" belongs in `mask`, where kernels can skip it.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from qkv._util.array import is_numpy, like, to_float, xp
from qkv._util.mods import describe, evaluate
from qkv.masks import pick

__all__ = ["ScoreMod", "as_score_mod", "unfound_grad_tensors", "alibi", "softcap", "relative_bias", "t5_bucket", "bias", "chain",
           "kernel_terms"]


class ScoreMod:
    """Base class of qkv's score mods, called once on broadcast arrays (a plain callable with the
    same signature works too, evaluated per element: `as_score_mod`)."""

    #: called once on broadcast index arrays, not per element (`qkv._util.mods.broadcasts`)
    BROADCAST = True

    def __call__(self, score, b, h, q_idx, kv_idx):  # pragma: no cover - abstract
        raise NotImplementedError

    def validate(self, B: int, H: int, Lq: int, Lk: int, q_offset: int) -> None:
        """Raise ValueError if this score mod cannot serve a call of this shape (H = query heads)."""


class _PerElement(ScoreMod):
    """A user's score_mod, evaluated per element as FlexAttention evaluates it (`qkv._util.mods`)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, score, b, h, q, kv):
        return evaluate(self.fn, "score_mod", (score,), (b, h, q, kv))

    def __repr__(self):
        return f"score_mod({describe(self.fn)})"


def as_score_mod(fn) -> ScoreMod:
    """A ScoreMod from a ScoreMod (itself) or a callable `(score, b, h, q_idx, kv_idx) -> score`
    (FlexAttention's score_mod, evaluated per element)."""
    if isinstance(fn, ScoreMod):
        return fn
    if not callable(fn):
        raise TypeError(f"a score_mod must be a callable (score, b, h, q_idx, kv_idx) -> score, got {type(fn).__name__}")
    return _PerElement(fn)


def unfound_grad_tensors(score_mod, found, *, q_pos: int, dtype: torch.dtype, device) -> list[torch.Tensor]:
    """Leaf tensors requiring grad that `score_mod` reads (tried at one element, b = h = kv = 0, q = q_pos)
    but that are neither in `found` nor behind one of them: gradients a backend that hands `found`
    to its own backward would not give. Empty when grad mode is off."""
    if not torch.is_grad_enabled():
        return []
    b = torch.zeros((1, 1, 1, 1), dtype=torch.long, device=device)
    out = score_mod(torch.zeros((1, 1, 1, 1), dtype=dtype, device=device), b, b, b + q_pos, b)
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        return []
    known = {id(t) for t in found}
    stops = {t.grad_fn for t in found if t.grad_fn is not None}
    missing, seen, todo = [], set(), [out.grad_fn]
    while todo:                                                   # walk the probe's autograd graph
        node = todo.pop()
        if node is None or node in seen or node in stops:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)                    # AccumulateGrad: a leaf tensor
        if leaf is not None:
            if id(leaf) not in known:
                missing.append(leaf)
            continue
        todo.extend(nxt for nxt, _ in node.next_functions)
    return missing


class _Alibi(ScoreMod):
    def __init__(self, slopes: torch.Tensor, symmetric: bool):
        self.slopes, self.symmetric = slopes, symmetric

    def __call__(self, score, b, h, q, kv):
        slopes = _as_score(_at_score(self.slopes, score)[h], score)
        dist = to_float(kv - q, score)
        if self.symmetric:
            dist = -xp(dist).abs(dist)
        return score + slopes * dist

    def validate(self, B, H, Lq, Lk, q_offset):
        if len(self.slopes) != H:
            raise ValueError(f"alibi has {len(self.slopes)} slopes but the call has Hq={H} query heads; "
                             f"build it with alibi({H}) or one slope per query head")

    def __repr__(self):
        return f"alibi({len(self.slopes)} heads, symmetric={self.symmetric})"


def _at_score(data, score):
    """A tensor a score mod holds (a table it gathers from), as `score`'s kind of array; for
    torch, in the scores' dtype, or in float64 when it takes gradients below float64 scores.
    Each of its entries then collects its gradient from every score it reached (up to
    L^2 terms) in float64: torch's CPU index backward adds them in a thread-dependent order,
    and in float32 that sum varied from run to run by ~1e-4. Pass what is gathered through
    `_as_score` (exact: the values are the table's own)."""
    out = like(data, score)
    if isinstance(out, torch.Tensor) and out.is_floating_point():
        wide = out.requires_grad and score.dtype != torch.float64
        out = out.to(torch.float64 if wide else score.dtype)
    return out


def _as_score(gathered, score):
    return gathered.to(score.dtype) if isinstance(gathered, torch.Tensor) else gathered


def alibi(slopes, symmetric: bool = False) -> ScoreMod:
    """ALiBi (Press et al., 2022): add `slope[h] * (kv - q)`, a penalty linear in distance.

    `slopes` is a tensor of one slope per query head, or an int number of heads
    (the paper's geometric slopes, `qkv.positional.alibi_slopes`). With
    symmetric=True the bias is `-slope[h] * |q - kv|`, for bidirectional encoders.
    """
    if isinstance(slopes, int) and not isinstance(slopes, bool):
        from qkv.positional import alibi_slopes   # here, not at the top: `import qkv` stays without positional

        slopes = alibi_slopes(slopes)
    try:
        t = torch.as_tensor(slopes)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"alibi slopes must be an int number of heads or a 1-D float tensor (one slope per query "
                        f"head), got {type(slopes).__name__}; e.g. alibi(8)") from None
    if t.dim() != 1 or not t.is_floating_point():
        raise ValueError(f"alibi slopes must be a 1-D float tensor (one per query head), got {tuple(t.shape)} {t.dtype}")
    return _Alibi(t, bool(symmetric))


class _Softcap(ScoreMod):
    def __init__(self, cap: float):
        self.cap = cap

    def __call__(self, score, b, h, q, kv):
        return self.cap * xp(score).tanh(score / self.cap)

    def __repr__(self):
        return f"softcap({self.cap})"


def softcap(cap: float) -> ScoreMod:
    """Logit soft-capping (Gemma 2, Grok): `cap * tanh(score / cap)` keeps scores in (-cap, cap)."""
    if isinstance(cap, bool) or not isinstance(cap, (int, float)):
        raise TypeError(f"softcap needs a finite cap > 0 (a number), got {type(cap).__name__}; e.g. softcap(30.0)")
    cap = float(cap)
    if not math.isfinite(cap) or cap <= 0:
        raise ValueError(f"softcap needs a finite cap > 0, got {cap}")
    return _Softcap(cap)


def t5_bucket(relative_position, *, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128):
    """T5's relative-position buckets (Raffel et al., 2020) for `relative_position = kv - q`.

    Half the buckets (per direction when bidirectional) hold exact small distances;
    the rest grow logarithmically up to `max_distance`, beyond which all share the last bucket.
    """
    X = xp(relative_position)
    rel = relative_position
    bucket = rel * 0
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (rel > 0) * num_buckets
        dist = X.abs(rel)
    else:
        dist = -X.minimum(rel, rel * 0)
    exact = num_buckets // 2
    is_small = dist < exact
    # log-spaced buckets for distances in [exact, max_distance), in float32 in both libraries
    # (as T5 does), so the oracle and the torch backends pick the same bucket.
    dist_f = dist.astype("float32") if is_numpy(dist) else dist.float()
    dist_f = X.maximum(dist_f, dist_f * 0 + 1)
    large = exact + X.log(dist_f / exact) / math.log(max_distance / exact) * (num_buckets - exact)
    large = X.floor(large)
    large = large.astype("int64") if is_numpy(large) else large.long()
    large = X.minimum(large, large * 0 + (num_buckets - 1))
    return bucket + X.where(is_small, dist, large)


class _RelativeBias(ScoreMod):
    def __init__(self, table, bidirectional, max_distance):
        self.table, self.bidirectional, self.max_distance = table, bidirectional, max_distance

    def __call__(self, score, b, h, q, kv):
        table = _at_score(self.table, score)
        bucket = t5_bucket(kv - q, bidirectional=self.bidirectional, num_buckets=table.shape[0],
                           max_distance=self.max_distance)
        return score + _as_score(table[bucket, h], score)

    def validate(self, B, H, Lq, Lk, q_offset):
        if self.table.shape[1] != H:
            raise ValueError(f"relative_bias table {tuple(self.table.shape)} has {self.table.shape[1]} head columns "
                             f"but the call has Hq={H} query heads; build it with a (num_buckets, {H}) table")

    def __repr__(self):
        return f"relative_bias({tuple(self.table.shape)}, bidirectional={self.bidirectional})"


def relative_bias(table, *, bidirectional: bool = True, max_distance: int = 128) -> ScoreMod:
    """T5-style learned relative-position bias: `score + table[bucket(kv - q), h]`.

    `table` is (num_buckets, H), the layout of T5's `relative_attention_bias.weight`,
    and may be an `nn.Parameter`: gradients flow to it through the torch backends.
    """
    if not isinstance(table, torch.Tensor) or table.dim() != 2:
        raise ValueError("relative_bias needs a (num_buckets, H) tensor, e.g. nn.Parameter(torch.zeros(32, H))")
    if table.shape[0] < 2:
        raise ValueError(f"relative_bias needs at least 2 buckets, got {table.shape[0]}")
    # half the buckets of a direction (all of them when one-directional) hold exact distances 0..exact-1;
    # the log-spaced ones need exact >= 1 and max_distance > exact (log(max_distance / exact) divides)
    exact = (table.shape[0] // 2 if bidirectional else table.shape[0]) // 2
    if exact < 1:
        raise ValueError(f"relative_bias with bidirectional=True needs at least 4 buckets (2 per direction), "
                         f"got {table.shape[0]}; use a larger table or bidirectional=False")
    if isinstance(max_distance, bool) or not isinstance(max_distance, int) or max_distance <= exact:
        raise ValueError(f"relative_bias max_distance must be an int > {exact} (the exact-distance buckets of a "
                         f"{table.shape[0]}-bucket table), got {max_distance!r}; e.g. max_distance=128")
    return _RelativeBias(table, bool(bidirectional), max_distance)


class _Bias(ScoreMod):
    def __init__(self, t: torch.Tensor, q_offset):
        while t.dim() < 4:
            t = t[None]
        self.t, self.q_offset = t, q_offset  # (B', H', rows, cols)

    def __call__(self, score, b, h, q, kv):
        t = _at_score(self.t, score)
        rows, cols = t.shape[-2:]
        offset = cols - rows if self.q_offset is None else self.q_offset
        row = q - offset if rows > 1 else q * 0
        col = kv if cols > 1 else kv * 0
        return score + _as_score(t[pick(b, t.shape[0]), pick(h, t.shape[1]), row, col], score)

    def validate(self, B, H, Lq, Lk, q_offset):
        nb, nh, rows, cols = self.t.shape
        offset = cols - rows if self.q_offset is None else self.q_offset
        fits = rows == 1 or (q_offset - offset >= 0 and q_offset + Lq - offset <= rows)
        if nb not in (1, B) or nh not in (1, H) or cols not in (1, Lk) or not fits:
            raise ValueError(f"bias of shape {tuple(self.t.shape)} does not broadcast to (B, H, Lq, Lk) = "
                             f"({B}, {H}, {Lq}, {Lk}); build it with shape (..., Lq, Lk) = (..., {Lq}, {Lk})")

    def __repr__(self):
        return f"bias(shape {tuple(self.t.shape)})"


def bias(t, q_offset: int | None = None) -> ScoreMod:
    """An additive float bias broadcastable to (B, H, Lq, Lk) (row r is query position q_offset + r)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError("bias needs a floating-point tensor; a bool mask goes in mask=")
    if not 2 <= t.dim() <= 4:
        raise ValueError(f"bias must have 2 to 4 dimensions (..., Lq, Lk), got shape {tuple(t.shape)}")
    return _Bias(t, q_offset)


class _Chain(ScoreMod):
    def __init__(self, mods):
        self.mods = mods

    def __call__(self, score, b, h, q, kv):
        for mod in self.mods:
            score = mod(score, b, h, q, kv)
        return score

    def validate(self, *args):
        for mod in self.mods:
            if isinstance(mod, ScoreMod):
                mod.validate(*args)

    def __repr__(self):
        return "chain(" + ", ".join(map(repr, self.mods)) + ")"


def chain(*mods: Callable) -> ScoreMod:
    """Apply several score mods in order (plain callables evaluated per element, as `as_score_mod`)."""
    for m in mods:
        if not callable(m):
            raise TypeError(f"chain expects callables, got {type(m).__name__}")
    return _Chain([as_score_mod(m) for m in mods])


def kernel_terms(score_mod) -> list[tuple] | None:
    """`score_mod` as the built-in terms a kernel applies as variants, in order: ("alibi", slopes,
    symmetric), ("relative", table, bidirectional, max_distance), ("bias", t (B', H', rows, cols),
    q_offset), ("softcap", cap); a `chain` gives its parts. None when any part is not a built-in
    (a user's function, a ScoreMod subclass of one's own), which only a generic engine can apply."""
    mods = score_mod.mods if type(score_mod) is _Chain else [score_mod]
    terms = []
    for mod in mods:
        if type(mod) is _Chain:
            inner = kernel_terms(mod)
            if inner is None:
                return None
            terms += inner
        elif type(mod) is _Alibi:
            terms.append(("alibi", mod.slopes, mod.symmetric))
        elif type(mod) is _RelativeBias:
            terms.append(("relative", mod.table, mod.bidirectional, mod.max_distance))
        elif type(mod) is _Bias:
            terms.append(("bias", mod.t, mod.q_offset))
        elif type(mod) is _Softcap:
            terms.append(("softcap", mod.cap))
        else:
            return None
    return terms
