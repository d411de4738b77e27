"""A user's mask_mod or score_mod evaluated per element, as FlexAttention evaluates it.

Legend: B batch, H query heads, Lq/Lk lengths; b, h, q_idx, kv_idx index arrays, `score` the scores.

FlexAttention calls `mask_mod(b, h, q_idx, kv_idx)` and `score_mod(score, b, h, q_idx, kv_idx)` as
if once per element: every argument is a 0-d tensor (it nests `torch.vmap` over the four axes).
A mod written for that contract may index a captured tensor one index at a time (`bias[b][q_idx]`),
reduce over a captured vector (`(qr[b, h, q_idx] * kr[b, 0, kv_idx]).sum()`, `torch.dot`), or
return `score` plus anything per element; called once on broadcast index arrays it would raise
or, worse, compute something else. `evaluate` gives a plain callable exactly that per-element
meaning on the broadcast index arrays a backend holds::

    b (B', 1, 1, 1), h (1, H', 1, 1), q_idx (1, 1, R, 1), kv_idx (1, 1, 1, C)   (the usual form)
    -> fn vmapped over kv, then q, then h, then b: result (B', H', R, C)

A mask's result keeps size 1 where it does not depend on an axis (`kv <= q` is (1, 1, R, C)), as
a broadcast call would give; a score mod's result has the full shape. Index arrays of any other
broadcastable shapes are broadcast, flattened and mapped at once. NumPy arguments (the float64
oracle's) are evaluated in torch and returned as NumPy arrays. The work is done a band of rows at
a time (`ELEMENTS` elements per band), so a mod that reduces over vectors of D values holds about
ELEMENTS * D of them, never R * C * D. A mod that cannot run per element (Python `if`/`and`/`or`/
`in` on an index, `.item()`, NumPy calls) raises `ModError`, naming the mod and what to change.

qkv's own masks and score mods are written for broadcast index arrays (they also run on NumPy)
and are called once: their classes carry `BROADCAST = True` (`broadcasts(fn)`), and `per_element`
leaves such a callable as it is.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from qkv._util.array import is_numpy

__all__ = ["ModError", "ELEMENTS", "broadcasts", "describe", "evaluate", "PerElement", "per_element"]

ELEMENTS = 1 << 20  # elements evaluated at once (one band of rows)


class ModError(ValueError):
    """A mask_mod or score_mod that cannot be evaluated per element (FlexAttention's contract)."""


def broadcasts(fn) -> bool:
    """Whether `fn` is called once on broadcast index arrays (qkv's masks and score mods), not per element."""
    return getattr(fn, "BROADCAST", False) is True


def describe(fn) -> str:
    """`name (file:line)` of a function, else its repr: how an error names the mod."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return repr(fn)
    return f"{getattr(fn, '__qualname__', code.co_name)} ({code.co_filename.rsplit('/', 1)[-1]}:{code.co_firstlineno})"


class _TensorIndexing(TorchFunctionMode):
    """`x[i, j]` with 0-d tensor indices as `aten.index` (FlexAttention does the same): a plain
    `__getitem__` turns a 0-d index into a Python int, which vmap cannot do on older torch."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__ and isinstance(args[0], torch.Tensor):
            x, index = args[0], args[1]
            parts = index if isinstance(index, tuple) else (index,)
            ints = all(isinstance(p, torch.Tensor) or (isinstance(p, int) and not isinstance(p, bool)) for p in parts)
            if parts and ints and any(isinstance(p, torch.Tensor) for p in parts):
                return torch.ops.aten.index(x, [p if isinstance(p, torch.Tensor)
                                                else torch.tensor(p, device=x.device) for p in parts])
        return func(*args, **(kwargs or {}))


def _hint(err: Exception) -> str:
    text = str(err)
    if "data-dependent control flow" in text:
        return ("a Python `if`, `and`, `or`, `not`, `in` or bool() met an index; write the condition with "
                "torch ops (&, |, ~, torch.where)")
    if ".item()" in text:
        return "`.item()`, int() or float() met an index; keep it a tensor"
    if "must only return Tensors" in text:
        return "return a tensor (a comparison of the indices, or score plus a tensor)"
    if isinstance(err, IndexError):
        return "a captured tensor is indexed outside its size: is it as large as the call (B, H, Lq, Lk)?"
    if "numpy" in text.lower() or "doesn't have storage" in text:
        return "use torch operations, not NumPy (the indices are tensors)"
    return "use torch operations on the indices, as for torch.nn.attention.flex_attention"


def _fail(fn, kind: str, err: Exception) -> ModError:
    args = "score, b, h, q_idx, kv_idx" if kind == "score_mod" else "b, h, q_idx, kv_idx"
    return ModError(f"{kind} {describe(fn)} failed when evaluated per element, as FlexAttention evaluates it "
                    f"({args} are 0-d tensors): {type(err).__name__}: {str(err).rstrip('. ')}. Fix: {_hint(err)}")


def _indexing(fn):
    """fn run with tensor indices as `aten.index` (`_TensorIndexing`)."""
    def inner(*args):
        with _TensorIndexing():
            return fn(*args)
    return inner


def _mapped(fn, n_values: int, mapped: tuple[bool, ...]):
    """fn with every argument mapped over the axes marked in `mapped`, the last innermost (FlexAttention's
    order); an unmapped axis is one element, passed as it is (the index 0-d, the values without that axis)."""
    f = _indexing(fn)
    for axis in reversed(range(len(mapped))):
        if mapped[axis]:
            f = torch.vmap(f, in_dims=(0,) * n_values + tuple(0 if a == axis else None for a in range(len(mapped))))
    return f


def _canonical(indices) -> bool:
    """b, h, q_idx, kv_idx each 4-D and longer than 1 on its own axis only (how backends pass them)."""
    return all(isinstance(t, torch.Tensor) and t.dim() == 4
               and all(n == 1 for a, n in enumerate(t.shape) if a != axis) for axis, t in enumerate(indices))


def _compact(t: torch.Tensor) -> torch.Tensor:
    """Size 1 on the axes a vmapped result does not depend on (vmap expands them with stride 0)."""
    for axis in range(t.dim()):
        if t.shape[axis] > 1 and t.stride(axis) == 0:
            t = t.narrow(axis, 0, 1)
    return t


def _by_axes(fn, kind, values, indices, shape):
    """The usual form: vmap over each index's own axis, a band of query rows at a time."""
    vecs = [t.reshape(-1).expand(n) for t, n in zip(indices, shape)]          # (B,), (H,), (R,), (C,)
    values = [v.expand(shape) for v in values]                                 # (B, H, R, C)
    # one vmap level per axis longer than 1 (each level costs ~50 us a call); the rows are always
    # mapped, so that every band calls the same function
    mapped = (shape[0] > 1, shape[1] > 1, True, shape[3] > 1)
    f = _mapped(fn, len(values), mapped)
    keep = tuple(slice(None) if m else 0 for m in mapped)                      # values without the lone axes
    rows = max(1, ELEMENTS // max(1, shape[0] * shape[1] * shape[3]))
    parts, r0 = [], 0
    while r0 < shape[2]:
        band = slice(r0, r0 + rows)
        idx = [vec if m else vec[0] for vec, m in zip((vecs[0], vecs[1], vecs[2][band], vecs[3]), mapped)]
        out = f(*(v[:, :, band][keep] for v in values), *idx)
        if out.dim() != sum(mapped):
            raise ModError(f"{kind} {describe(fn)} returned shape {tuple(out.shape[sum(mapped):])} per element; it "
                           f"must return one value (a 0-d tensor) per element, as FlexAttention requires")
        for axis in (0, 1, 3):                                                 # back to (B', H', rows, C')
            if not mapped[axis]:
                out = out.unsqueeze(axis)
        if r0 == 0:  # the work is over the axes the result depends on (vmap broadcasts the others): size by them
            used = _compact(out).shape
            rows = max(rows, ELEMENTS // max(1, used[0] * used[1] * used[3]))
        r0 += out.shape[2]
        parts.append(_compact(out) if kind == "mask_mod" else out)
    if len(parts) == 1:
        return parts[0]
    common = _broadcast(*((*p.shape[:2], 1, p.shape[3]) for p in parts))
    return torch.cat([p.expand(*common[:2], p.shape[2], common[3]) for p in parts], dim=2)


def _flat(fn, kind, values, indices):
    """Any other broadcastable shapes: broadcast, flatten, one vmap over the elements (in bands)."""
    arrays = torch.broadcast_tensors(*values, *indices)
    shape = arrays[0].shape
    flat = [a.reshape(-1) for a in arrays]
    f = torch.vmap(_indexing(fn))                                              # every argument on dim 0
    parts = []
    for e0 in range(0, flat[0].numel(), ELEMENTS):
        out = f(*(a[e0:e0 + ELEMENTS] for a in flat))
        if out.dim() != 1:
            raise ModError(f"{kind} {describe(fn)} returned shape {tuple(out.shape[1:])} per element; it must "
                           f"return one value (a 0-d tensor) per element, as FlexAttention requires")
        parts.append(out)
    return torch.cat(parts).reshape(shape)


def _as_torch(x, device):
    if isinstance(x, torch.Tensor):
        return x
    if is_numpy(x):
        return torch.from_numpy(np.ascontiguousarray(x))
    return torch.as_tensor(x, device=device)


def _broadcast(*shapes) -> tuple[int, ...]:
    """The broadcast of shapes (torch.broadcast_shapes, without its ~60 us a call)."""
    n = max(len(s) for s in shapes)
    out = [1] * n
    for s in shapes:
        for i, size in enumerate(s, n - len(s)):
            if size != 1:
                if out[i] not in (1, size):
                    raise ValueError(f"index arrays of shapes {[tuple(x) for x in shapes]} do not broadcast")
                out[i] = size
    return tuple(out)


def _empty(kind, values, indices, shape):
    if kind == "mask_mod":
        return torch.zeros(shape, dtype=torch.bool, device=indices[0].device)
    return values[0].expand(shape) * 1


def evaluate(fn, kind: str, values: tuple, indices: tuple):
    """`fn(*values, *indices)` with FlexAttention's per-element meaning, on broadcast arrays.

    `kind` is "mask_mod" (values = ()) or "score_mod" (values = (score,)); `indices` are
    (b, h, q_idx, kv_idx), torch tensors or NumPy arrays (then the result is NumPy too).
    Returns the result over the broadcast shape (see the module docstring).
    """
    numpy = any(is_numpy(x) for x in (*values, *indices))
    ref = next((x for x in (*values, *indices) if isinstance(x, torch.Tensor)), None)
    device = ref.device if ref is not None else None
    values = tuple(_as_torch(x, device) for x in values)
    indices = tuple(_as_torch(x, device) for x in indices)
    try:
        if all(t.dim() == 0 for t in (*values, *indices)):
            # already one element: called by FlexAttention itself (Mask.to_flex), which maps and indexes
            # as here (and traces this with dynamo, which refuses a mode entered inside)
            out = fn(*values, *indices)
        elif 0 in (shape := _broadcast(*(t.shape for t in (*values, *indices)))):
            out = _empty(kind, values, indices, shape)
        elif _canonical(indices) and all(v.dim() == 4 for v in values):
            out = _by_axes(fn, kind, values, indices, shape)
        else:
            out = _flat(fn, kind, values, indices)
    except ModError:
        raise
    except Exception as err:  # the user's code failed under vmap: say which mod and why
        raise _fail(fn, kind, err) from err
    if numpy:
        return out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
    return out


class PerElement:
    """A plain callable given FlexAttention's per-element meaning on broadcast index arrays."""

    BROADCAST = True

    def __init__(self, fn, kind: str):
        self.fn, self.kind = fn, kind

    def __call__(self, *args):
        n = 1 if self.kind == "score_mod" else 0
        return evaluate(self.fn, self.kind, args[:n], args[n:])

    def __repr__(self):
        return f"{self.kind}({describe(self.fn)})"


def per_element(fn, kind: str):
    """`fn` itself when it takes broadcast arrays (qkv's own mods), else `PerElement(fn, kind)`."""
    return fn if broadcasts(fn) else PerElement(fn, kind)
