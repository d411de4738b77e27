"""Differential self-test: random attention calls, every backend against the float64 oracle.

Legend: B batch, Hq query heads, Hkv key/value heads, G = Hq // Hkv, Lq/Lk lengths,
D head dim, Dv value dim, M kernel features, W sliding window.

A *case* is drawn from (seed, index) alone, so any case can be replayed::

    python -m qkv selftest --seed 123 --case 4567

Three kinds of case:

- `attention`: one `qkv.attention` call (random shape, dtype, mask tree, score_mod,
  alignment, LSE / weights, gradients) run on every exact backend that accepts it
  (and `auto`). The forward oracle is the NumPy float64 `reference` backend, the
  gradient oracle `math` in float64. A backend that refuses the call (BackendError)
  is skipped; any other exception is a failure.
- `approx`: the `linear` and `performer` backends (and the recurrent
  `LinearStateCache`) against float64 evaluations of their own definitions.
- `cache`: a KV cache (contiguous, paged, ring) filled by prefill and decode
  steps, against one attention call over the whole history.

Every comparison follows DESIGN.md's error-ratio rule (`ratio_check`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch

import qkv
from qkv import masks as M
from qkv import scores as S
from qkv._util.array import to_float
from qkv.backends import BackendError
from qkv.testing import EPS, Verdict, max_err, ratio_check

__all__ = ["EPS", "KNOWN", "max_err", "ratio_check", "Case", "make_case", "CaseResult", "run_case", "run",
           "replay", "reproducer", "summary_text", "exact_backends", "mask_definition"]

F64 = torch.float64
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HEAD_DIMS = (1, 8, 40, 59, 64, 80, 128, 256)          # DESIGN.md's awkward head dims
LENGTHS = (1, 2, 17, 97, 127, 128, 129, 255, 256, 257, 1025)  # off and on tile borders
MAX_LK = 2048
# One case stays well under a second: the score matrix B*Hq*Lq*Lk and the matmul work
# B*Hq*Lq*Lk*(D+Dv) are capped (batch and heads shrink first, then queries).
MAX_SCORES = 1 << 19
MAX_WORK = 1 << 25


# -----------------------------------------------------------------------------
# The error-ratio rule (DESIGN.md, Testing rules) is qkv.testing's, shared with tests/conftest.py;
# what follows is the self-test's own use of it

# float64 results whose baseline *is* the oracle (gradients: the oracle is `math` in float64)
# have no independent error to compare against. A float64 path that is exact to rounding
# agrees with it to ~1e-14 relative; a wrong formula is off by O(1) and a path that
# silently computes in float32 by ~1e-7, so this bound catches both.
F64_SELF_TOL = 1e-10

# Limitations of code qkv does not own. A failed check they explain is reported as KNOWN (with
# its reproducer) and is not a mismatch, but only while its error stays within what the
# limitation accounts for (`KNOWN_RATIO` x the baseline's error, plus the floor, plus
# `KNOWN_REL` at the oracle's scale): anything larger is a mismatch like any other.
KNOWN = {
    "torch-flash": "torch's CPU flash-attention kernel (sdpa, tiled's fused engine and the packed-document path) "
                   "computes exp with an "
                   "approximation of about 20 correct bits: float32 outputs and gradients up to 2^4 = 16x "
                   "further from the oracle than math's",
}
KNOWN_RATIO = 32.0
KNOWN_REL = 2.0 ** -16     # ... or 16 of the approximation's 2^-20 relative errors at the oracle's scale
# DESIGN.md's loosest allowance, for float32 `tiled` on its fused engine (torch's kernel, above)
TILED_FP32_RATIO = 10.0


# -----------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    """Everything a case draws, as plain data (JSON-able); tensors are rebuilt from seeds."""

    seed: int
    index: int
    kind: str                    # "attention", "approx" or "cache"
    params: dict

    def describe(self) -> str:
        lines = [f"case {self.index} of seed {self.seed}: {self.kind}"]
        for key, val in self.params.items():
            if key in ("mask", "score_mod"):
                val = spec_str(val)
            lines.append(f"  {key} = {val}")
        return "\n".join(lines)


def reproducer(seed: int, index: int) -> str:
    return f"python -m qkv selftest --seed {seed} --case {index}"


def _rng(seed: int, index: int) -> random.Random:
    # a str seed is hashed with SHA-512: the same stream on every machine and run
    return random.Random(f"qkv-selftest:{seed}:{index}")


def make_case(seed: int, index: int) -> Case:
    """The case number `index` of `seed` (a pure function of the two)."""
    rng = _rng(seed, index)
    r = rng.random()
    if r < 0.74:
        return Case(seed, index, "attention", _draw_attention(rng))
    if r < 0.87:
        return Case(seed, index, "approx", _draw_approx(rng))
    return Case(seed, index, "cache", _draw_cache(rng))


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    """An int in [lo, hi], uniform in log(1 + x): small values common, large ones rare."""
    return min(hi, max(lo, int(math.exp(rng.uniform(math.log(lo + 1), math.log(hi + 1)))) - 1))


def _draw_length(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.03:
        return 0
    if r < 0.18:
        return rng.choice(LENGTHS)
    if r < 0.23:
        return _log_uniform(rng, 256, MAX_LK)          # rare long sequences
    return _log_uniform(rng, 1, 200)


def _draw_head_dim(rng: random.Random) -> int:
    return rng.choice(HEAD_DIMS) if rng.random() < 0.6 else _log_uniform(rng, 1, 256)


def _draw_heads(rng: random.Random) -> tuple[int, int]:
    """(Hq, Hkv): MHA, GQA or MQA."""
    if rng.random() < 0.01:
        return 0, 0
    shape = rng.choice(("mha", "gqa", "mqa"))
    if shape == "mha":
        h = rng.randint(1, 4)
        return h, h
    if shape == "mqa":
        return rng.randint(1, 6), 1
    hkv = rng.randint(1, 3)
    return hkv * rng.randint(2, 4), hkv


def _draw_dtype(rng: random.Random, weights=(0.25, 0.35, 0.2, 0.2)) -> str:
    return rng.choices(list(DTYPES), weights=weights)[0]


def _draw_attention(rng: random.Random) -> dict:
    B = rng.choice((0, 1, 1, 1, 2, 2, 3, 4)) if rng.random() < 0.97 else 0
    Hq, Hkv = _draw_heads(rng)
    Lk = _draw_length(rng)
    r = rng.random()
    if r < 0.45:
        Lq = Lk
    elif r < 0.7:
        Lq = _log_uniform(rng, 1, max(1, Lk))
    elif r < 0.8:
        Lq = 1
    elif r < 0.9:
        Lq = Lk + rng.randint(1, 8)                  # more queries than keys: the first ones see nothing
    else:
        Lq = _draw_length(rng)
    D = _draw_head_dim(rng)
    Dv = D if rng.random() < 0.8 else _draw_head_dim(rng)
    B, Hq, Hkv, Lq = _fit(B, Hq, Hkv, Lq, Lk, D, Dv)
    q_offset = None
    if rng.random() < 0.15:
        q_offset = rng.choice((0, 0, rng.randint(-Lq - 3, max(0, Lk) + 3)))
    dtype = _draw_dtype(rng)
    p = dict(B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=Dv, dtype=dtype, q_offset=q_offset)
    p["scale"] = None if rng.random() < 0.8 else rng.choice((rng.uniform(0.01, 1.5), -rng.uniform(0.05, 0.5)))
    # the typical size of a score (its standard deviation): 0.5 is nearly uniform attention,
    # 6 nearly one-hot; q and k are scaled to give it whatever D and scale are (`_magnitude`)
    p["temperature"] = rng.choice((0.5, 1.0, 1.0, 2.0, 4.0, 6.0))
    ctx = _Ctx(B, Hq, Lq, Lk, Lk - Lq if q_offset is None else q_offset)
    p["causal"] = rng.random() < 0.1
    p["mask"] = _draw_top_mask(rng, ctx)
    p["score_mod"] = _draw_score_mod(rng, ctx) if rng.random() < 0.3 and Hq > 0 else None
    p["return_lse"] = rng.random() < 0.2
    p["return_weights"] = rng.random() < 0.1
    p["grad"] = rng.random() < 0.5
    p["data_seed"] = rng.getrandbits(31)
    return p


def _fit(B, Hq, Hkv, Lq, Lk, D, Dv):
    """Shrink batch, heads, then queries until the case fits MAX_SCORES and MAX_WORK."""
    def big():
        n = B * Hq * Lq * Lk
        return n > MAX_SCORES or n * (D + Dv) > MAX_WORK
    while big() and B > 1:
        B -= 1
    while big() and Hq > Hkv:
        Hq -= Hkv                                      # stays a multiple of Hkv
    while big() and Hkv > 1:
        Hkv -= 1
        Hq = Hkv
    while big() and Lq > 1:
        Lq = max(1, Lq // 2)
    return B, Hq, Hkv, Lq


@dataclass
class _Ctx:
    """The shape a mask or score_mod is drawn for; `start` is the first query's position."""

    B: int
    Hq: int
    Lq: int
    Lk: int
    start: int

    @property
    def span(self) -> int:
        """Positions [0, span) that some query or key occupies."""
        return max(self.Lk, self.start + self.Lq, 0)


# -- masks --------------------------------------------------------------------
#
# A mask spec is a nested list: ["causal"], ["and", A, B], ["not", A], ... `build_mask`
# turns it into the object; `spec_str` prints it.


def _draw_top_mask(rng: random.Random, ctx: _Ctx):
    r = rng.random()
    if r < 0.2:
        return None
    if r < 0.3:
        return ["tensor", _dense_shape(rng, ctx), round(rng.uniform(0.1, 0.95), 2), rng.getrandbits(31)]
    if r < 0.35:
        return ["function", *_pattern(rng)]            # a plain function, not a qkv mask
    return _draw_mask(rng, ctx, depth=0)


def _draw_mask(rng: random.Random, ctx: _Ctx, depth: int):
    r = rng.random()
    if depth < 3 and r < 0.3:
        return [rng.choice(("and", "or")), _draw_mask(rng, ctx, depth + 1), _draw_mask(rng, ctx, depth + 1)]
    if depth < 3 and r < 0.38:
        return ["not", _draw_mask(rng, ctx, depth + 1)]
    return _draw_leaf(rng, ctx)


def _draw_leaf(rng: random.Random, ctx: _Ctx):
    kinds = ["causal", "window", "prefix_lm", "padding", "global_tokens", "dilated", "dilated_window",
             "longformer", "from_dense", "callable"]
    if ctx.start >= 0 or ctx.Lq == 0:                 # these describe positions >= 0 only
        kinds += ["document", "block_sparse", "bigbird"]
    kind = rng.choice(kinds)
    span = ctx.span
    if kind == "causal":
        return ["causal"]
    if kind == "window":
        return ["window", _log_uniform(rng, 1, 300), rng.random() < 0.7]
    if kind == "prefix_lm":
        return ["prefix_lm", rng.randint(0, span + 2)]
    if kind == "padding":
        return ["padding", [rng.randint(0, ctx.Lk) for _ in range(ctx.B)]]
    if kind == "global_tokens":
        return ["global_tokens", [rng.randrange(max(1, span)) for _ in range(rng.randint(1, 3))]]
    if kind in ("dilated", "dilated_window"):
        return [kind, rng.randint(1, 6), rng.randint(1, 4), rng.random() < 0.6]
    if kind == "longformer":
        return ["longformer", rng.randint(1, 16), [rng.randrange(max(1, span)) for _ in range(rng.randint(0, 2))]]
    if kind == "from_dense":
        shape = _dense_shape(rng, ctx)
        # a tensor broadcast over keys must say where its rows sit (its default offset needs Lk columns)
        q_offset = ctx.start if shape[-1] != ctx.Lk and shape[-2] > 1 else None
        return ["from_dense", shape, round(rng.uniform(0.2, 0.95), 2), rng.getrandbits(31), q_offset]
    if kind == "callable":
        return ["callable", *_pattern(rng)]
    if kind == "document":
        return _draw_document(rng, ctx)
    if kind == "block_sparse":
        return _draw_block_sparse(rng, ctx)
    return _draw_bigbird(rng, ctx)


def _dense_shape(rng: random.Random, ctx: _Ctx) -> list[int]:
    """A bool tensor shape that broadcasts to (B, Hq, Lq, Lk)."""
    rows = ctx.Lq if rng.random() < 0.85 else 1
    cols = ctx.Lk if rng.random() < 0.95 else 1
    lead = rng.choice(([], [1], [ctx.B, 1], [1, ctx.Hq], [ctx.B, ctx.Hq]))
    return [*lead, rows, cols]


def _pattern(rng: random.Random) -> list[int]:
    """Parameters (a, c, e, m, r) of the mask (a q + c kv + e h + b) % m != r."""
    return [rng.randint(-2, 3), rng.randint(-2, 3), rng.randint(0, 2), rng.randint(2, 5), rng.randint(0, 1)]


def _draw_document(rng: random.Random, ctx: _Ctx):
    n = max(1, ctx.span)
    batched = ctx.B > 1 and rng.random() < 0.3
    rows = ctx.B if batched else 1
    sort = rng.random() < 0.85                        # unsorted ids are classified by evaluation
    return ["document", rows, n, rng.randint(1, 5), sort, rng.getrandbits(31)]


def _draw_block_sparse(rng: random.Random, ctx: _Ctx):
    bq, bk = rng.choice((1, 2, 3, 8, 16, 64, 128)), rng.choice((1, 2, 5, 8, 16, 64, 128))
    nqb = -(-max(ctx.start + ctx.Lq, 0) // bq) + rng.randint(0, 1)
    nkb = -(-ctx.Lk // bk) + rng.randint(0, 1)
    lead = rng.choice(([], [ctx.Hq], [1, ctx.Hq], [ctx.B, ctx.Hq], [ctx.B, 1]))
    return ["block_sparse", [*lead, nqb, nkb], bq, bk, round(rng.uniform(0.2, 0.9), 2), rng.getrandbits(31)]


def _draw_bigbird(rng: random.Random, ctx: _Ctx):
    block = rng.choice((1, 2, 4, 8, 16, 64))
    window = rng.choice((0, 1, 3, 5))
    glob = rng.randint(0, 2)
    rand_blocks = rng.randint(0, 2)
    length = None
    if rand_blocks or ctx.Lk % block or rng.random() < 0.3:
        length = max(1, -(-ctx.span // block)) * block   # a multiple of block covering every position
    return ["bigbird", block, window, glob, rand_blocks, rng.getrandbits(16), length]


class ModPattern:
    """The mask (a q + c kv + e h + b) % m != r: a plain callable (torch or NumPy indices)."""

    def __init__(self, a, c, e, m, r):
        self.a, self.c, self.e, self.m, self.r = a, c, e, m, r

    def __call__(self, b, h, q, kv):
        return (self.a * q + self.c * kv + self.e * h + b) % self.m != self.r

    def __repr__(self):
        return f"({self.a} q + {self.c} kv + {self.e} h + b) % {self.m} != {self.r}"


def _bool_tensor(shape, density, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) < density


def build_mask(spec):
    """The mask object (or plain function, or bool tensor) a spec describes."""
    if spec is None:
        return None
    kind, args = spec[0], spec[1:]
    if kind in ("and", "or"):
        a, b = M.as_mask(build_mask(args[0])), build_mask(args[1])
        return a & b if kind == "and" else a | b
    if kind == "not":
        return ~M.as_mask(build_mask(args[0]))
    if kind == "causal":
        return M.causal()
    if kind == "window":
        return M.sliding_window(args[0], causal=args[1])
    if kind == "prefix_lm":
        return M.prefix_lm(args[0])
    if kind == "padding":
        return M.padding(torch.tensor(args[0], dtype=torch.long))
    if kind == "global_tokens":
        return M.global_tokens(args[0])
    if kind == "dilated":
        return M.dilated(*args)
    if kind == "dilated_window":
        return M.dilated_window(*args)
    if kind == "longformer":
        return M.longformer(args[0], args[1])
    if kind == "tensor":
        return _bool_tensor(*args)
    if kind == "from_dense":
        return M.from_dense(_bool_tensor(*args[:3]), q_offset=args[3])
    if kind == "function":
        return ModPattern(*args)
    if kind == "callable":
        return M.as_mask(ModPattern(*args))
    if kind == "document":
        return M.document(_document_ids(*args))
    if kind == "block_sparse":
        shape, bq, bk, density, seed = args
        return M.block_sparse(_bool_tensor(shape, density, seed), (bq, bk))
    if kind == "bigbird":
        block, window, glob, rand_blocks, seed, length = args
        return M.bigbird(block, window, glob, rand_blocks, seed, length=length)
    raise ValueError(f"unknown mask spec {spec!r}")


def mask_definition(spec, ctx: "_Ctx"):
    """The mask a spec describes, from the definitions in the docstrings, in NumPy over (B, Hq, Lq, Lk).

    Independent of the mask classes (the float64 oracle evaluates the classes themselves,
    so a class that disagrees with its own documentation agrees with the oracle).
    Returns None for what it does not model (BigBird's random blocks).
    """
    b = np.arange(ctx.B).reshape(-1, 1, 1, 1)
    h = np.arange(ctx.Hq).reshape(1, -1, 1, 1)
    q = (ctx.start + np.arange(ctx.Lq)).reshape(1, 1, -1, 1)
    kv = np.arange(ctx.Lk).reshape(1, 1, 1, -1)
    got = _definition(spec, ctx, b, h, q, kv)
    return None if got is None else np.broadcast_to(got, (ctx.B, ctx.Hq, ctx.Lq, ctx.Lk))


def _definition(spec, ctx, b, h, q, kv):
    kind, args = spec[0], spec[1:]
    if kind in ("and", "or", "not"):
        parts = [_definition(a, ctx, b, h, q, kv) for a in args]
        if any(x is None for x in parts):
            return None
        return ~parts[0] if kind == "not" else (parts[0] & parts[1] if kind == "and" else parts[0] | parts[1])
    d = q - kv
    if kind == "causal":
        return kv <= q
    if kind == "window":
        return (d >= 0) & (d < args[0]) if args[1] else np.abs(d) < args[0]
    if kind == "prefix_lm":
        return (kv < args[0]) | (kv <= q)
    if kind == "padding":
        return kv < np.array(args[0], dtype=np.int64).reshape(-1, 1, 1, 1)
    if kind == "global_tokens":
        return np.isin(q, args[0]) | np.isin(kv, args[0])
    if kind in ("dilated", "dilated_window"):
        w, step, causal = args
        dd = d if causal else np.abs(d)
        return (dd >= 0) & (dd <= (w - 1) * step) & (dd % step == 0)
    if kind == "longformer":
        return (np.abs(d) < args[0]) | np.isin(q, args[1]) | np.isin(kv, args[1])
    if kind in ("function", "callable"):
        a, c, e, m, r = args
        return (a * q + c * kv + e * h + b) % m != r
    if kind in ("tensor", "from_dense"):
        # row r of the tensor is query position offset + r: the call's own offset for a tensor
        # given to qkv.attention, else bottom-right (Lk - Lq of the call), per from_dense's docstring
        t = _bool_tensor(*args[:3]).numpy()
        t = t.reshape((1,) * (4 - t.ndim) + t.shape)
        offset = ctx.start if kind == "tensor" else (ctx.Lk - ctx.Lq if args[3] is None else args[3])
        rows, cols = t.shape[-2:]
        row = q - offset if rows > 1 else q * 0
        ok = (row >= 0) & (row < rows)
        col = kv if cols > 1 else kv * 0
        bi = b % t.shape[0] if t.shape[0] > 1 else b * 0
        hi = h % t.shape[1] if t.shape[1] > 1 else h * 0
        return t[bi, hi, np.clip(row, 0, rows - 1), col] & ok
    if kind == "document":
        ids = _document_ids(*args).numpy()
        bi = b if ids.shape[0] > 1 else b * 0
        return ids[bi, q] == ids[bi, kv]
    if kind == "block_sparse":
        shape, bq, bk, density, seed = args
        lay = _bool_tensor(shape, density, seed).numpy()
        lay = lay.reshape((1,) * (4 - lay.ndim) + lay.shape)
        bi = b if lay.shape[0] > 1 else b * 0
        hi = h if lay.shape[1] > 1 else h * 0
        return lay[bi, hi, q // bq, kv // bk]
    if kind == "bigbird":
        block, window, glob, rand_blocks, _seed, _length = args
        if rand_blocks:
            return None
        qb, kb = q // block, kv // block
        near = (np.abs(qb - kb) <= window // 2) & (window > 0)
        return near | (qb < glob) | (kb < glob)
    raise ValueError(f"unknown mask spec {spec!r}")


def _document_ids(rows, n, docs, sort, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, docs, (rows, n), generator=g)
    return ids.sort(dim=1).values if sort else ids


def spec_str(spec) -> str:
    """A spec as one readable line."""
    if spec is None:
        return "None"
    kind, args = spec[0], spec[1:]
    if kind in ("and", "or"):
        op = "&" if kind == "and" else "|"
        return f"({spec_str(args[0])} {op} {spec_str(args[1])})"
    if kind == "not":
        return f"~{spec_str(args[0])}"
    if kind == "chain":
        return "chain(" + ", ".join(spec_str(a) for a in args) + ")"
    return f"{kind}({', '.join(map(repr, args))})"


# -- score mods ---------------------------------------------------------------


def _draw_score_mod(rng: random.Random, ctx: _Ctx, depth: int = 0):
    kinds = ["alibi_heads", "alibi", "softcap", "relative_bias", "bias", "affine"]
    if depth == 0:
        kinds.append("chain")
    kind = rng.choice(kinds)
    if kind == "alibi_heads":
        return ["alibi_heads", ctx.Hq]
    if kind == "alibi":
        return ["alibi", ctx.Hq, rng.random() < 0.5, rng.getrandbits(31)]
    if kind == "softcap":
        return ["softcap", round(rng.uniform(0.5, 30.0), 3)]
    if kind == "relative_bias":
        buckets, bidirectional = rng.choice((4, 8, 32)), rng.random() < 0.5
        exact = (buckets // 2 if bidirectional else buckets) // 2         # buckets of exact distances
        max_distance = rng.choice((exact + 1, 2 * exact, 128))             # > exact: the log buckets need room
        return ["relative_bias", ctx.Hq, buckets, bidirectional, max_distance, rng.random() < 0.5,
                rng.getrandbits(31)]
    if kind == "bias":
        shape = _dense_shape(rng, ctx)
        # a bias broadcast over keys (..., Lq, 1) cannot infer the call's alignment: it says where its rows sit
        default_fits = shape[-1] == ctx.Lk and ctx.start == ctx.Lk - ctx.Lq
        q_offset = None if default_fits or shape[-2] == 1 else ctx.start
        return ["bias", shape, rng.random() < 0.5, rng.getrandbits(31), q_offset]
    if kind == "affine":
        return ["affine", rng.choice((0.5, 1.0, 2.0)), round(rng.uniform(-0.2, 0.2), 3), rng.choice((0.0, 0.25))]
    return ["chain", _draw_score_mod(rng, ctx, 1), _draw_score_mod(rng, ctx, 1)]


class AffineScore:
    """score * a + (q - kv) * c + h * e: a plain callable score_mod."""

    def __init__(self, a, c, e):
        self.a, self.c, self.e = a, c, e

    def __call__(self, score, b, h, q, kv):
        # indices are integers: cast them to the score's dtype first (torch would make
        # `int_tensor * 0.1` float32 even for a float64 score, NumPy float64)
        return score * self.a + to_float(q - kv, score) * self.c + to_float(h, score) * self.e

    def __repr__(self):
        return f"score * {self.a} + (q - kv) * {self.c} + h * {self.e}"


def build_score_mod(spec, dtype: torch.dtype):
    """(score_mod, [tensors it holds that take gradients]) with its tensors in `dtype`."""
    if spec is None:
        return None, []
    kind, args = spec[0], spec[1:]
    if kind == "alibi_heads":
        return S.alibi(args[0]), []
    if kind == "alibi":
        H, symmetric, seed = args
        slopes = torch.rand(H, generator=torch.Generator().manual_seed(seed), dtype=F64) * 0.5
        return S.alibi(slopes.to(dtype), symmetric=symmetric), []
    if kind == "softcap":
        return S.softcap(args[0]), []
    if kind == "relative_bias":
        H, buckets, bidirectional, max_distance, grad, seed = args
        table = torch.randn(buckets, H, generator=torch.Generator().manual_seed(seed), dtype=F64)
        table = table.to(dtype).requires_grad_(grad)
        return S.relative_bias(table, bidirectional=bidirectional, max_distance=max_distance), [table] * grad
    if kind == "bias":
        shape, grad, seed, q_offset = args
        t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)
        t.requires_grad_(grad)
        return S.bias(t, q_offset=q_offset), [t] * grad
    if kind == "affine":
        return AffineScore(*args), []
    if kind == "chain":
        mods = [build_score_mod(a, dtype) for a in args]
        return S.chain(*(m for m, _ in mods)), [t for _, ts in mods for t in ts]
    raise ValueError(f"unknown score_mod spec {spec!r}")


# -----------------------------------------------------------------------------
# Results


@dataclass
class Check:
    """One comparison: a backend's output (or gradient, LSE, weights) against the oracle."""

    backend: str
    what: str                    # "forward", "grad dq", "lse", "empty rows", ...
    ok: bool
    err: float = 0.0
    base: float = 0.0
    bound: float = 0.0
    note: str = ""
    known: str = ""              # a failure explained by a KNOWN limitation (reported, not a mismatch)

    def line(self) -> str:
        status = "ok  " if self.ok else ("KNOWN" if self.known else "FAIL")
        nums = f"err {self.err:.3e}  baseline {self.base:.3e}  bound {self.bound:.3e}" if self.bound else ""
        return f"  {status} {self.backend:<16} {self.what:<14} {nums} {self.note}".rstrip()


@dataclass
class CaseResult:
    seed: int
    index: int
    kind: str
    description: str
    checks: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)     # backend -> why it refused the call
    errors: list = field(default_factory=list)      # exceptions: "where: Type: message"
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors and all(c.ok or c.known for c in self.checks)

    def known(self) -> list[str]:
        """The failed checks that a KNOWN limitation explains."""
        return [f"{c.backend} {c.what} ({c.known})" for c in self.checks if not c.ok and c.known]

    @property
    def reproducer(self) -> str:
        return reproducer(self.seed, self.index)

    def failures(self) -> list[str]:
        return [f"{c.backend} {c.what}" + (f" ({c.note})" if c.note else "") for c in self.checks
                if not c.ok and not c.known] + list(self.errors)

    def report(self) -> str:
        lines = [self.description]
        lines += [c.line() for c in self.checks]
        lines += [f"  skip {name:<16} {why}" for name, why in self.skipped.items()]
        lines += [f"  ERROR {e}" for e in self.errors]
        for name in sorted({c.known for c in self.checks if not c.ok and c.known}):
            lines.append(f"  KNOWN {name}: {KNOWN[name]}")
        lines.append(f"  {'PASS' if self.ok else 'MISMATCH'} in {self.seconds:.2f} s")
        return "\n".join(lines)


def _exception(where: str, exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" at {os.path.basename(frame.filename)}:{frame.lineno}" if frame else ""
    return f"{where}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{at}"


def exact_backends() -> list[str]:
    """The registry's exact backends other than the oracle itself, then `auto`."""
    names = [n for n in qkv.backends.names()
             if n != "reference" and qkv.backends.get(n).capabilities.exact]
    return names + ["auto"]


def run_case(seed: int, index: int) -> CaseResult:
    """Draw case `index` of `seed`, run every backend that can serve it, compare."""
    t0 = time.perf_counter()
    case = make_case(seed, index)
    result = CaseResult(seed, index, case.kind, case.describe())
    runner = {"attention": _run_attention, "approx": _run_approx, "cache": _run_cache}[case.kind]
    try:
        runner(case.params, result)
    except Exception as exc:  # a failure of the case as a whole (the oracle, the inputs)
        result.errors.append(_exception(f"{case.kind} case", exc))
    result.seconds = time.perf_counter() - t0
    return result


# -----------------------------------------------------------------------------
# Attention cases


def _inputs(p: dict, dtype: torch.dtype):
    """q, k, v and the cotangents of out and lse: drawn in float64, q, k, v rounded to `dtype`
    (the oracle sees the rounded values). Callers copy before changing anything."""
    return _drawn_inputs(p["B"], p["Hq"], p["Hkv"], p["Lq"], p["Lk"], p["D"], p["Dv"], _magnitude(p),
                         p["data_seed"], dtype)


@functools.lru_cache(maxsize=4)
def _drawn_inputs(B, Hq, Hkv, Lq, Lk, D, Dv, mag, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g, dtype=F64) * mag
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=F64) * mag
    v = torch.randn(B, Hkv, Lk, Dv, generator=g, dtype=F64)
    dout = torch.randn(B, Hq, Lq, Dv, generator=g, dtype=F64)
    dlse = torch.randn(B, Hq, Lq, generator=g, dtype=F64)
    return tuple(t.to(dtype) for t in (q, k, v)), dout, dlse


def _magnitude(p: dict) -> float:
    """The standard deviation of q and k's entries.

    Attention cases give it through the scores' size: q.k * scale has standard deviation
    m^2 sqrt(D) |scale|, set to the case's temperature. Without that control a large D
    or an explicit large scale gives scores in the hundreds, a softmax that is an argmax,
    where any two correct float32 dot-product orders differ by more than the error rule's
    statistics can tell apart on a few rows.
    """
    if "temperature" not in p:
        return p.get("magnitude", 1.0)
    D = max(1, p["D"])
    scale = abs(p["scale"]) if p["scale"] is not None else 1.0 / math.sqrt(D)
    return math.sqrt(p["temperature"] / (math.sqrt(D) * scale))


@dataclass
class _Run:
    """What one backend produced for a case: out, lse, weights and the gradients."""

    out: torch.Tensor
    lse: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    grads: list | None = None            # [dq, dk, dv, *d(score_mod tensors)]


def _attend(p: dict, qkv_in, dtype: torch.dtype, mask, backend: str, grad: bool) -> _Run:
    """One qkv.attention call of the case (and its backward when `grad`)."""
    stat = F64 if dtype == F64 else torch.float32      # score_mod tensors live in the statistics dtype
    score_mod, params = build_score_mod(p["score_mod"], stat)
    if not grad:
        params = []
    q, k, v = (t.detach().clone().requires_grad_(grad) for t in qkv_in)
    want_lse, want_w = p["return_lse"], p["return_weights"]
    got = qkv.attention(q, k, v, mask=mask, causal=p["causal"], score_mod=score_mod, scale=p["scale"],
                        backend=backend, return_lse=want_lse, return_weights=want_w, q_offset=p["q_offset"])
    got = got if isinstance(got, tuple) else (got,)
    run = _Run(got[0], got[1] if want_lse else None, got[-1] if want_w else None)
    if grad:
        _, dout, dlse = _inputs(p, dtype)
        loss = (run.out.double() * dout).sum()
        if run.lse is not None:                           # the LSE's own gradient path
            finite = torch.isfinite(run.lse)
            loss = loss + (torch.where(finite, run.lse, torch.zeros_like(run.lse)).double() * dlse).sum()
        leaves = [q, k, v, *params]
        if loss.requires_grad:
            run.grads = list(torch.autograd.grad(loss, leaves, allow_unused=True))
        else:                                             # nothing reached the inputs (e.g. no keys)
            run.grads = [None] * len(leaves)
        run.grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, run.grads)]
    return run


def _tiled_generic_applies(p: dict, dtype) -> bool:
    """`tiled` has two engines on the CPU: the fused-kernel one when it applies, else the generic one."""
    return p["score_mod"] is None and p["D"] == p["Dv"] and p["D"] > 0


class _TiledEngine:
    """Run `tiled` on its generic engine within the block."""

    def __enter__(self):
        self.be = qkv.backends.get("tiled")
        self.old = self.be.engine
        self.be.engine = "generic"

    def __exit__(self, *exc):
        self.be.engine = self.old


def _candidates(p: dict, dtype) -> list[tuple[str, str]]:
    """(label, backend name) pairs to run."""
    out = []
    for name in exact_backends():
        out.append((name, name))
        if name == "tiled" and _tiled_generic_applies(p, dtype):
            out.append(("tiled:generic", "tiled"))
    return out


def _run_attention(p: dict, result: CaseResult) -> None:
    dtype = DTYPES[p["dtype"]]
    qkv_in, _, _ = _inputs(p, dtype)
    mask = build_mask(p["mask"])
    oracle = _oracle(p, qkv_in, mask)
    _check_mask_definition(p, mask, result)
    grad = p["grad"]
    math_run = _attend(p, qkv_in, dtype, mask, "math", grad)
    base = _baseline(p, qkv_in, dtype, mask, math_run, oracle)
    for label, name in _candidates(p, dtype):
        try:
            if label == "tiled:generic":
                with _TiledEngine():
                    cand = _attend(p, qkv_in, dtype, mask, name, grad)
            else:
                cand = math_run if label == "math" else _attend(p, qkv_in, dtype, mask, name, grad)
        except BackendError as exc:
            result.skipped[label] = str(exc).split(";")[0]
            continue
        except Exception as exc:
            result.errors.append(_exception(label, exc))
            continue
        served = _served_by(p, qkv_in, mask, grad, name) if label != "tiled:generic" else label
        _compare_attention(p, dtype, label, cand, base, oracle, result, served)


def _baseline(p: dict, qkv_in, dtype, mask, math_run: "_Run", oracle: "_Oracle") -> "_Run":
    """The same-dtype baseline: the worse of `math` and the flash formulas (`_flash_form`)."""
    grad = p["grad"] and dtype != F64          # float64 gradients: the oracle is math itself
    flash_out, flash_grads = _flash_form(p, qkv_in, dtype, mask, grad)
    base = _Run(_worse(math_run.out, flash_out, oracle.out), math_run.lse, math_run.weights, math_run.grads)
    if flash_grads is not None:
        base.grads = [_worse(a, b, o) for a, b, o in zip(math_run.grads, flash_grads, oracle.grads)]
    return base


def _served_by(p: dict, qkv_in, mask, grad: bool, backend: str) -> str:
    """Which code ran the call: the backend `auto` chose, "segments" (packed documents as a batch
    through torch's kernel), "tiled:fused" (tiled on torch's CPU flash kernel), or the name."""
    from qkv.backends import make_call
    from qkv.backends.tiled import fused_applies

    q, k, v = (t.detach().clone().requires_grad_(grad) for t in qkv_in)
    score_mod, _ = build_score_mod(p["score_mod"], F64 if q.dtype == F64 else torch.float32)
    call = make_call(q, k, v, mask=mask, causal=p["causal"], score_mod=score_mod, scale=p["scale"], dropout_p=0.0,
                      return_lse=p["return_lse"], return_weights=p["return_weights"], q_offset=p["q_offset"])
    if call.Lk == 0 or q.numel() == 0 or v.shape[-1] == 0:
        return "none"
    name = qkv.backends.select(call, backend).name
    if name == "tiled" and qkv.backends.get("tiled").engine == "auto" and fused_applies(call):
        return "tiled:fused"
    return name


def _worse(a: torch.Tensor, b: torch.Tensor, oracle: torch.Tensor) -> torch.Tensor:
    """Whichever of two same-dtype baselines is further from the oracle."""
    return a if max_err(a, oracle) >= max_err(b, oracle) else b


def _call_mask(p: dict, mask, q_offset: int):
    """The mask as qkv.attention combines it: tensors and plain functions wrapped, `causal` folded in."""
    if isinstance(mask, torch.Tensor):
        mask = M.from_dense(mask, q_offset=q_offset)
    elif mask is not None:
        mask = M.as_mask(mask)
    if p["causal"]:
        mask = M.causal() if mask is None else M.causal() & mask
    return mask


def _flash_form(p: dict, qkv_in, dtype: torch.dtype, mask, grad: bool):
    """(out, gradients or None) by FlashAttention's formulas, materialised in the statistics dtype::

        forward:   m = rowmax(S),  l = rowsum(exp(S - m)),  O = exp(S - m) V / l,  lse = m + log(l)
        backward:  P = exp(S - lse),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O) + dlse),
                   dQ = dS K * scale,  dK = dS^T Q * scale

    `math` is the other textbook form (normalise, then multiply; autograd for the backward).
    Both are exact to rounding but round differently, and which of the two a correct backend
    lands nearer is luck: on a few hundred output elements the max errors of two such forms
    differ by more than 2x now and then, and autograd through `math`'s softmax cancels exactly
    where a row has one allowed key (P = 1, so dS = 0 to the last bit) while these formulas
    subtract two different dot products there and keep their rounding. So the baseline is the
    worse of the two forms; neither hides a real defect (a wrong formula is off by O(1), an
    approximate exp or a half-precision intermediate by many times either form's error).
    """
    stat = F64 if dtype == F64 else torch.float32
    score_mod, params = build_score_mod(p["score_mod"], stat)
    params = params if grad else []
    q, k, v = (t.detach().to(stat) for t in qkv_in)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv if Hkv else 1
    kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)          # (B, Hq, Lk, *): plain, not fast
    q_off = Lk - Lq if p["q_offset"] is None else p["q_offset"]
    scale = 1.0 / math.sqrt(D) if p["scale"] is None else p["scale"]
    pre = (torch.matmul(q, kr.transpose(-1, -2)) * scale).requires_grad_(grad and score_mod is not None)
    grids = (torch.arange(B).view(B, 1, 1, 1), torch.arange(Hq).view(1, Hq, 1, 1),
             (q_off + torch.arange(Lq)).view(1, 1, Lq, 1), torch.arange(Lk).view(1, 1, 1, Lk))
    with torch.enable_grad():
        s = score_mod(pre, *grids) if score_mod is not None else pre     # (B, Hq, Lq, Lk)
    call_mask = _call_mask(p, mask, q_off)
    s_m = s.detach()
    if call_mask is not None:
        s_m = s_m.masked_fill(~M.evaluate(call_mask, B, Hq, Lq, Lk, q_offset=q_off), float("-inf"))
    m = s_m.amax(dim=-1, keepdim=True) if Lk else s_m.new_zeros(B, Hq, Lq, 1)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    e = torch.exp(s_m - m)
    l = e.sum(-1, keepdim=True)                                           # (B, Hq, Lq, 1)
    out = (torch.matmul(e, vr) / torch.where(l == 0, torch.ones_like(l), l)).to(dtype)   # as stored
    if not grad:
        return out, None
    lse = m + torch.log(l)
    P = torch.exp(s_m - torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse))
    _, dout, dlse = _inputs(p, dtype)
    dout = dout.to(dtype).to(stat)                                        # autograd hands dO over in O's dtype
    delta = (dout * out.to(stat)).sum(-1, keepdim=True)
    if p["return_lse"]:
        delta = delta - dlse.to(stat).unsqueeze(-1)
    dS = P * (torch.matmul(dout, vr.transpose(-1, -2)) - delta)
    dparams = []
    if score_mod is not None:
        got = torch.autograd.grad(s, [pre, *params], dS, allow_unused=True)
        dS = got[0]
        dparams = [torch.zeros_like(t) if g is None else g for t, g in zip(params, got[1:])]
    dq = torch.matmul(dS, kr) * scale
    dk = (torch.matmul(dS.transpose(-1, -2), q) * scale).view(B, Hkv, G, Lk, D).sum(2)
    dv = torch.matmul(P.transpose(-1, -2), dout).view(B, Hkv, G, Lk, v.shape[-1]).sum(2)
    return out, [g.to(dtype) for g in (dq, dk, dv)] + dparams


def _check_mask_definition(p: dict, mask, result: CaseResult) -> None:
    """The mask the call evaluates against its documented definition (`mask_definition`)."""
    if p["mask"] is None:
        return
    start = p["Lk"] - p["Lq"] if p["q_offset"] is None else p["q_offset"]
    ctx = _Ctx(p["B"], p["Hq"], p["Lq"], p["Lk"], start)
    want = mask_definition(p["mask"], ctx)
    if want is None:
        return
    call_mask = M.from_dense(mask, q_offset=start) if isinstance(mask, torch.Tensor) else M.as_mask(mask)
    got = M.evaluate(call_mask, ctx.B, ctx.Hq, ctx.Lq, ctx.Lk, q_offset=start).expand(want.shape)
    bad = int((got.numpy() != want).sum())
    result.checks.append(Check("masks", "definition", bad == 0,
                               note="" if bad == 0 else f"{bad} of {want.size} pairs differ from the definition"))


@dataclass
class _Oracle:
    out: torch.Tensor
    lse: torch.Tensor
    weights: torch.Tensor | None
    empty: torch.Tensor                   # (B, Hq, Lq) rows with no allowed key
    grads: list | None
    noise: dict                           # what the scores' rounding may move out / lse / weights by, in eps


def _oracle(p: dict, qkv_in, mask) -> _Oracle:
    """The NumPy float64 reference for the forward; `math` in float64 for the gradients."""
    q, k, v = (t.detach().double() for t in qkv_in)
    score_mod, _ = build_score_mod(p["score_mod"], F64)
    out, lse, w = qkv.attention(q, k, v, mask=mask, causal=p["causal"], score_mod=score_mod, scale=p["scale"],
                                backend="reference", return_lse=True, return_weights=True, q_offset=p["q_offset"])
    grads = _attend(p, (q, k, v), F64, mask, "math", True).grads if p["grad"] else None
    noise = _score_noise(p, q, k, v, out, w)
    if p["grad"]:
        noise.update(_weight_noise(p, q, k, v, w))
    return _Oracle(out, lse, w if p["return_weights"] else None, torch.isneginf(lse), grads, noise)


def _score_noise(p: dict, q, k, v, out, w) -> dict:
    """How far the rounding of the scores alone typically moves out, lse and weights, in eps.

    Every backend forms each score s_ij = q_i.k_j * scale with one rounded dot product, in its
    own summation order: an error of typically eps * r_ij, r_ij = |scale| * sqrt(sum_d
    (q_id k_jd)^2) (a random walk over the D products), independent from score to score. It
    moves out_ie by sum_j w_ij * err_ij * (v_je - out_ie), lse_i by sum_j w_ij * err_ij and w_ij
    by up to twice err_ij. Where a few keys carry a row (a peaked softmax) this decides the max
    error, and which order lands nearer the oracle is luck: two correct backends then differ by
    more than 2x on a few rows. The floor adds one standard deviation of that sum (elsewhere
    a fraction of an ulp).
    """
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if B * Hq * Lq * Lk == 0 or v.shape[-1] == 0:
        return {"out": 0.0, "lse": 0.0, "weights": 0.0}
    G = Hq // Hkv
    kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)          # (B, Hq, Lk, *)
    scale = abs(1.0 / math.sqrt(q.shape[-1]) if p["scale"] is None else p["scale"])
    r = scale * torch.sqrt(torch.matmul(q * q, (kr * kr).transpose(-1, -2)))   # (B, Hq, Lq, Lk)
    if p["score_mod"] is not None:
        r = 2 * r                             # the built-in mods scale a score's error by at most 2
    wr = w * r
    s2 = wr * wr
    # sum_j s2_ij (v_je - out_ie)^2, expanded into three products: (B, Hq, Lq, Dv)
    var = torch.matmul(s2, vr * vr) - 2 * out * torch.matmul(s2, vr) + out * out * s2.sum(-1, keepdim=True)
    return {"out": float(var.clamp(min=0).max().sqrt()), "lse": float(s2.sum(-1).max().sqrt()),
            "weights": float(2 * wr.max())}


def _weight_noise(p: dict, q, k, v, w) -> dict:
    """How far the rounding of the softmax weights alone typically moves dq and dk, in eps.

    Every backward forms ds_ij = p_ij (dp_ij - delta_i), delta_i = sum_l p_il dp_il, from
    weights p rounded to the statistics dtype. A relative error e_ij of one weight moves ds
    through both factors, and dq_i = scale sum_j ds_ij k_j by

        scale sum_j e_ij p_ij (k_j (dp_ij - delta_i) - (P k)_i dp_ij)

    Where one key carries a row, p ~ 1 and dp - delta ~ 0 cancel: ds of that key is a
    difference of two rounded numbers of size |dp|, and one ulp of that weight moves dq_i
    by about eps |scale dp_ij k_j|, far more than an ulp of dq itself (seed 67, case 37420:
    dq 0.07 carried by a key with |k| = 7.5; the two textbook forms and tiled ended 3e-7,
    4e-7 and 2.5e-6 from the oracle, and over 200 draws of that case's inputs each form
    was the worst of the three in turn, by up to 12x). With e_ij independent and of the
    size of one unit roundoff (eps / 2), one standard deviation of that sum is added to
    the gradients' floor, as `_score_noise` does for the forward; dk likewise
    (dk_j = scale sum_i ds_ij q_i, where e_il moves ds_ij through delta_i). A wrong formula, a half-precision intermediate or an
    approximate exp is still many times over it.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if B * Hq * Lq * Lk == 0 or v.shape[-1] == 0 or D == 0:
        return {"dq": 0.0, "dk": 0.0}
    G = Hq // Hkv
    kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)          # (B, Hq, Lk, *)
    scale = abs(1.0 / math.sqrt(D) if p["scale"] is None else p["scale"])
    if p["score_mod"] is not None:
        scale = 2 * scale                     # the built-in mods scale a score's gradient by at most 2
    _, dout, dlse = _inputs(p, DTYPES[p["dtype"]])                        # float64 cotangents, drawn once
    dp = torch.matmul(dout, vr.transpose(-1, -2))                          # (B, Hq, Lq, Lk)
    delta = (w * dp).sum(-1, keepdim=True)
    if p["return_lse"]:
        delta = delta - dlse.unsqueeze(-1)
    a = w * (dp - delta)                                                   # ds
    b = w * dp
    pk = torch.matmul(w, kr)                                               # (B, Hq, Lq, D)
    # sum_j (a_ij k_jd - pk_id b_ij)^2, expanded into three products
    var_q = (torch.matmul(a * a, kr * kr) - 2 * pk * torch.matmul(a * b, kr)
             + pk * pk * (b * b).sum(-1, keepdim=True))
    # sum_i q_id^2 p_ij^2 ((dp_ij - delta_i)^2 + sum_l p_il^2 dp_il^2), per kv head: summed over its G query heads
    c = a * a + (w * w) * (b * b).sum(-1, keepdim=True)                    # (B, Hq, Lq, Lk)
    var_k = torch.matmul(c.transpose(-1, -2), q * q).view(B, Hkv, G, Lk, D).sum(2)
    u = 0.5                                   # the unit roundoff, in eps: each weight's relative error
    return {"dq": u * scale * float(var_q.clamp(min=0).max().sqrt()),
            "dk": u * scale * float(var_k.clamp(min=0).max().sqrt())}


def _compare_attention(p, dtype, label, cand: _Run, base: _Run, oracle: _Oracle, result: CaseResult,
                       served: str) -> None:
    shape = (p["B"], p["Hq"], p["Lq"], p["Dv"])
    if tuple(cand.out.shape) != shape or cand.out.dtype != dtype:
        result.checks.append(Check(label, "forward", False, note=f"got {tuple(cand.out.shape)} {cand.out.dtype}, "
                                                                 f"expected {shape} {dtype}"))
        return
    stat_eps = EPS[F64 if dtype == F64 else torch.float32]
    result.checks.append(_forward_check(label, dtype, cand.out, base.out, oracle.out, served,
                                        stat_eps * oracle.noise["out"]))
    if bool(oracle.empty.any()):
        zero = bool((cand.out[oracle.empty] == 0).all())
        result.checks.append(Check(label, "empty rows", zero, note="" if zero else "a row with no allowed key "
                                                                                  "is not all zeros"))
    if p["return_lse"] and cand.lse is not None:
        result.checks.append(_stat_check(label, "lse", cand.lse, base.lse, oracle.lse,
                                         stat_eps * oracle.noise["lse"]))
    if p["return_weights"] and cand.weights is not None:
        result.checks.append(_stat_check(label, "weights", cand.weights, base.weights, oracle.weights,
                                         stat_eps * oracle.noise["weights"]))
    if p["grad"]:
        _grad_checks(label, dtype, cand.grads, base.grads, oracle, result, served)


def _forward_check(label, dtype, out, base_out, oracle_out, served: str, noise: float) -> Check:
    if label == "math":
        # math is the baseline: against itself the rule is empty; in float64 it must match the NumPy oracle
        if dtype != F64:
            return Check(label, "forward", max_err(out, oracle_out) < math.inf, note="finite (the baseline)")
        return _self_check(label, "forward", out, oracle_out)
    # DESIGN.md: "10x for fp32 tiled is the loosest allowed": tiled's fused engine runs torch's
    # CPU flash kernel, whose approximate exp (KNOWN["torch-flash"]) leaves float32 outputs up to
    # several times further from the oracle than math's when a few keys share a row's weight
    ratio = TILED_FP32_RATIO if served == "tiled:fused" and dtype == torch.float32 else 2.0
    v = ratio_check(out, base_out, oracle_out, ratio=ratio, floor_ulps=1, extra_floor=noise)
    check = Check(label, "forward", v.ok, v.err, v.base, v.bound, _auto_note(label, served))
    _mark_known(check, v, served, dtype, out, ratio)
    return check


def _auto_note(label: str, served: str) -> str:
    return f"auto ran {served}" if label == "auto" and served not in ("auto", "none") else ""


def _mark_known(check: Check, v: Verdict, served: str, dtype, t: torch.Tensor, ratio: float) -> None:
    """Label a failure that torch's CPU flash kernel explains (KNOWN), while within KNOWN_RATIO."""
    torch_flash = (served in ("sdpa", "segments", "tiled:fused") and dtype == torch.float32
                   and t.device.type == "cpu")
    floor = v.bound - ratio * v.base
    scale = v.floor_scale
    if not v.ok and torch_flash and v.err <= KNOWN_RATIO * v.base + floor + KNOWN_REL * scale:
        check.known = "torch-flash"


def _self_check(label: str, what: str, got, oracle, scale: float | None = None) -> Check:
    err = max_err(got, oracle)
    if scale is None:
        scale = float(oracle.detach().double().abs().max()) if oracle.numel() else 1.0
    bound = F64_SELF_TOL * max(1.0, scale)
    return Check(label, what, err <= bound, err, 0.0, bound, "float64 vs float64 oracle")


def _stat_check(label: str, what: str, got, base, oracle, noise: float) -> Check:
    """LSE or weights: -inf (LSE of an empty row) exactly where the oracle has it, the rest by ratio."""
    got, base, oracle = got.detach(), base.detach(), oracle.detach()
    if got.shape != oracle.shape:
        return Check(label, what, False, note=f"shape {tuple(got.shape)}, expected {tuple(oracle.shape)}")
    inf = torch.isinf(oracle)
    if not bool((got[inf] == oracle[inf].to(got.dtype)).all()):
        return Check(label, what, False, note="infinities differ from the oracle's")
    fin = ~inf
    v = ratio_check(got[fin], base[fin], oracle[fin], eps=EPS[got.dtype], extra_floor=noise)
    return Check(label, what, v.ok, v.err, v.base, v.bound)


GRAD_NAMES = ("dq", "dk", "dv")


def _grad_checks(label, dtype, grads, base_grads, oracle: _Oracle, result: CaseResult, served: str) -> None:
    scale = max([float(g.abs().max()) for g in oracle.grads if g.numel()] + [1.0])
    for i, (g, b, o) in enumerate(zip(grads, base_grads, oracle.grads)):
        name = "grad " + (GRAD_NAMES[i] if i < 3 else "d(score_mod)")
        if tuple(g.shape) != tuple(o.shape):
            result.checks.append(Check(label, name, False, note=f"shape {tuple(g.shape)}, expected {tuple(o.shape)}"))
            continue
        if dtype == F64:
            if label != "math":
                result.checks.append(_self_check(label, name, g, o, scale))
            continue
        if label == "math":
            result.checks.append(Check(label, name, max_err(g, o) < math.inf, note="finite (the baseline)"))
            continue
        noise = EPS[torch.float32] * oracle.noise.get(GRAD_NAMES[i] if i < 3 else "", 0.0)
        v = ratio_check(g, b, o, ratio=3.0, scale=scale, extra_floor=noise)
        check = Check(label, name, v.ok, v.err, v.base, v.bound, _auto_note(label, served))
        _mark_known(check, v, served, dtype, g, 3.0)
        result.checks.append(check)
    dq = grads[0]
    if bool(oracle.empty.any()) and dq.numel():
        zero = bool((dq[oracle.empty] == 0).all())
        result.checks.append(Check(label, "grad empty", zero, note="" if zero else "dq of a row with no allowed "
                                                                                 "key is not zero"))


# -----------------------------------------------------------------------------
# Approximate backends: linear (elu + 1) and performer (FAVOR+), against their definitions


def _draw_approx(rng: random.Random) -> dict:
    B = rng.choice((0, 1, 1, 2, 3)) if rng.random() < 0.97 else 0
    Hq, Hkv = _draw_heads(rng)
    Lk = _draw_length(rng)
    r = rng.random()
    Lq = Lk if r < 0.5 else (1 if r < 0.65 else _log_uniform(rng, 1, max(1, Lk)))
    D = _draw_head_dim(rng)
    Dv = D if rng.random() < 0.8 else _draw_head_dim(rng)
    backend = rng.choice(("linear", "performer"))
    features = rng.choice((1, 16, 64, 256)) if backend == "performer" else None
    causal = rng.random() < 0.6
    B, Hq, Hkv, Lq, Lk = _fit_approx(B, Hq, Hkv, Lq, Lk, D, Dv, features or D, causal)
    p = dict(backend=backend, B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=Dv,
             dtype=_draw_dtype(rng), causal=causal)
    p["q_offset"] = rng.choice((0, rng.randint(-Lq - 2, Lk + 2))) if p["causal"] and rng.random() < 0.2 else None
    p["scale"] = round(rng.uniform(0.05, 1.0), 3) if backend == "performer" and rng.random() < 0.3 else None
    if backend == "performer":
        # FAVOR+ estimates exp(q.k * scale): keep those logits in a realistic range (at logits
        # in the hundreds its features underflow and the backend gives such rows zeros, by design)
        p["temperature"] = rng.choice((0.5, 1.0, 2.0, 4.0))
    else:
        p["magnitude"] = rng.choice((0.5, 1.0, 1.0, 2.0))     # elu + 1 features have no exponent to blow up
    p["features"] = features
    p["chunk"] = rng.choice((1, 7, 64, 64, 1000))
    # decode through the recurrent state: a prompt, then one token at a time
    p["state_cache"] = p["causal"] and p["q_offset"] is None and Lq == Lk and Lk > 0 and B > 0 \
        and Hq > 0 and rng.random() < 0.3
    if p["state_cache"]:
        p["prompt"] = rng.randint(0, Lk)
    # with one random feature phi(q) is a scalar that cancels between numerator and denominator:
    # dq is 0 in exact arithmetic and pure rounding noise of cancelling terms larger than the
    # gradients themselves, which the error rule's floor (at the gradients' scale) cannot judge
    p["grad"] = not p["state_cache"] and features != 1 and rng.random() < 0.4
    p["data_seed"] = rng.getrandbits(31)
    p["feature_seed"] = rng.getrandbits(16)
    return p


MAX_PREFIX_STATE = 1 << 22      # elements of the causal factorised baseline's prefix sums (B, Hkv, Lk, M, Dv)


def _fit_approx(B, Hq, Hkv, Lq, Lk, D, Dv, M, causal):
    """`_fit`, then (causal) shrink batch, heads and lengths until the prefix sums fit MAX_PREFIX_STATE."""
    B, Hq, Hkv, Lq = _fit(B, Hq, Hkv, Lq, Lk, D, Dv)
    while causal and B * Hkv * Lk * M * Dv > MAX_PREFIX_STATE:
        if B > 1:
            B -= 1
        elif Hkv > 1:
            Hkv -= 1
            Hq = Hkv
        else:
            Lk = max(1, Lk // 2)
            Lq = min(Lq, Lk)
    return B, Hq, Hkv, Lq, Lk


def _approx_features(p: dict, q: torch.Tensor, k: torch.Tensor, fm):
    """phi(q), phi(k) of the definition, in q's dtype (torch; float64 for the oracle)."""
    if p["backend"] == "linear":
        return torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    D = q.shape[-1]
    s = math.sqrt(1 / math.sqrt(D) if p["scale"] is None else p["scale"])
    w = fm.projection(D, dtype=q.dtype)                                      # (M, D)

    def phi(x, stable_dims):
        x = x * s
        e = x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)                   # (..., M) exponents
        # a constant per row (queries) or per (batch, head) (keys) cancels in the ratio
        if e.numel() == 0:
            return torch.exp(e)
        return torch.exp(e - e.amax(dim=stable_dims, keepdim=True)) / math.sqrt(w.shape[0])

    return phi(q, (-1,)), phi(k, (-2, -1))


def _approx_materialised(p: dict, q, k, v, fm):
    """(A v, den) with A = phi(q) phi(k)^T materialised (zero where causality forbids) and
    den = sum_j A_ij, 1 where it is 0 (a row with no key): the two materialised forms share them."""
    fq, fk = _approx_features(p, q, k, fm)
    G = max(1, q.shape[1] // max(1, k.shape[1]))
    fk, v = fk.repeat_interleave(G, 1), v.repeat_interleave(G, 1)           # GQA by repetition: clear, not fast
    a = fq @ fk.transpose(-1, -2)                                           # (B, Hq, Lq, Lk)
    if p["causal"]:
        Lq, Lk = q.shape[2], k.shape[2]
        off = Lk - Lq if p["q_offset"] is None else p["q_offset"]
        allowed = torch.arange(Lk)[None, :] <= (off + torch.arange(Lq))[:, None]
        a = a * allowed
    den = a.sum(-1, keepdim=True)
    return a @ v, torch.where(den == 0, torch.ones_like(den), den)


def _approx_definition(p: dict, q, k, v, fm) -> torch.Tensor:
    """out_i = sum_j A_ij v_j / sum_j A_ij with A = phi(q) phi(k)^T materialised (zero where causality forbids)."""
    num, den = _approx_materialised(p, q, k, v, fm)
    return num / den


class _OutputRatio(torch.autograd.Function):
    """num / den whose backward goes through the output: d num = g / den, d den = -(g . out) / den."""

    @staticmethod
    def forward(ctx, num, den):
        out = num / den
        ctx.save_for_backward(out, den)
        return out

    @staticmethod
    def backward(ctx, g):
        out, den = ctx.saved_tensors
        return g / den, -(g * out).sum(-1, keepdim=True) / den


def _approx_row_term(p: dict, q, k, v, fm) -> torch.Tensor:
    """The materialised definition (`_approx_definition`) with the ratio's backward written
    through the output, d den = -(dout . out) / den: the row term of FlashAttention's backward
    (the exact cases' `_flash_form`), and the form an O(L) backend can use without keeping
    A. Its forward is the materialised one; its gradients round differently. Where one key
    carries a row, autograd's num / den^2 form cancels the stabilising max's path almost
    exactly while this one keeps the rounding of out: over 60 draws of seed 73, case 11185's
    inputs the other forms' dk was up to 15x nearer the oracle than a correct backend's on
    one draw, and 2x on the rest."""
    return _OutputRatio.apply(*_approx_materialised(p, q, k, v, fm))


def _approx_factorised(p: dict, q, k, v, fm) -> torch.Tensor:
    """The same definition associated the other way, as the backends do::

        out_i = phi(q_i)^T S_i / phi(q_i)^T z_i,   S_i = sum_{j <= i} phi(k_j) v_j^T,  z_i = sum_{j <= i} phi(k_j)

    (every key when not causal), with plain prefix sums. Summing over keys before features
    rounds differently from the materialised form, whose numerator and denominator share
    the rounding of A and cancel it, so a correct factorised backend can be several times
    further from the oracle than the materialised baseline: the approximate backends'
    baseline is the worst of these textbook forms (with `_approx_chunked`).
    """
    fq, fk = _approx_features(p, q, k, fm)                                  # (B, Hq, Lq, M), (B, Hkv, Lk, M)
    B, Hq, Lq, M = fq.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = max(1, Hq // max(1, Hkv))
    fq = fq.reshape(B, Hkv, G, Lq, M)                                       # query heads of one kv head
    if Lk == 0:                                                             # no keys: every row is zeros
        return (fq.sum(-1, keepdim=True) * 0).expand(B, Hkv, G, Lq, Dv).reshape(B, Hq, Lq, Dv)
    if not p["causal"]:
        S = torch.matmul(fk.transpose(-1, -2), v)                           # (B, Hkv, M, Dv)
        z = fk.sum(2)                                                       # (B, Hkv, M)
        num = torch.matmul(fq, S[:, :, None])                               # (B, Hkv, G, Lq, Dv)
        den = torch.matmul(fq, z[:, :, None, :, None]).squeeze(-1)          # (B, Hkv, G, Lq)
    else:
        S = torch.cumsum(fk[..., :, None] * v[..., None, :], dim=2)        # (B, Hkv, Lk, M, Dv)
        z = torch.cumsum(fk, dim=2)                                         # (B, Hkv, Lk, M)
        off = Lk - Lq if p["q_offset"] is None else p["q_offset"]
        pos = off + torch.arange(Lq)                                        # each query's last visible key
        seen = (pos >= 0) & (Lk > 0)
        idx = pos.clamp(0, max(0, Lk - 1))
        S_i, z_i = S[:, :, idx], z[:, :, idx]                               # (B, Hkv, Lq, M, Dv), (B, Hkv, Lq, M)
        num = torch.einsum("bhgqm,bhqmd->bhgqd", fq, S_i) * seen[:, None].to(fq.dtype)
        den = torch.einsum("bhgqm,bhqm->bhgq", fq, z_i) * seen.to(fq.dtype)
    out = num / torch.where(den == 0, torch.ones_like(den), den).unsqueeze(-1)
    return out.reshape(B, Hq, Lq, Dv)


def _approx_chunked(p: dict, q, k, v, fm) -> torch.Tensor:
    """The causal definition associated as the chunked prefix sum the issue asks for (and the
    backends run), chunk C = the case's `chunk`: a query at position i in chunk c = i // C reads
    the summed states of chunks 0..c-1 and its own chunk's keys up to i directly::

        out_i = (phi(q_i)^T S_<c + sum_{cC <= j <= i} (phi(q_i)^T phi(k_j)) v_j) / (same with z)

    A third rounding of the same definition (each chunk's keys summed, then the chunks): a
    float32 evaluation lands up to ~3x further from the oracle than the two above, measured
    with this independent code and with the backends alike. Non-causal calls sum every key
    at once, as `_approx_factorised` does."""
    if not p["causal"]:
        return _approx_factorised(p, q, k, v, fm)
    fq, fk = _approx_features(p, q, k, fm)                                  # (B, Hq, Lq, M), (B, Hkv, Lk, M)
    B, Hq, Lq, M = fq.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = max(1, Hq // max(1, Hkv))
    if Lk == 0:
        return (fq.sum(-1, keepdim=True) * 0).expand(B, Hq, Lq, Dv)
    fk, v = fk.repeat_interleave(G, 1), v.repeat_interleave(G, 1)           # (B, Hq, Lk, *)
    C = max(1, min(int(p["chunk"]), Lk))
    nC = -(-Lk // C)
    S_c = torch.stack([fk[:, :, c * C:(c + 1) * C].transpose(-1, -2) @ v[:, :, c * C:(c + 1) * C]
                       for c in range(nC)], 2)                              # (B, Hq, nC, M, Dv)
    z_c = torch.stack([fk[:, :, c * C:(c + 1) * C].sum(2) for c in range(nC)], 2)   # (B, Hq, nC, M)
    S_ex = torch.cat([torch.zeros_like(S_c[:, :, :1]), S_c.cumsum(2)[:, :, :-1]], 2)
    z_ex = torch.cat([torch.zeros_like(z_c[:, :, :1]), z_c.cumsum(2)[:, :, :-1]], 2)
    off = Lk - Lq if p["q_offset"] is None else p["q_offset"]
    pos = off + torch.arange(Lq)
    c_of = pos.clamp(0, Lk - 1) // C
    kv = torch.arange(Lk)
    own = (kv[None, :] // C == c_of[:, None]) & (kv[None, :] <= pos[:, None])   # (Lq, Lk) this chunk's keys
    a = (fq @ fk.transpose(-1, -2)) * own                                   # (B, Hq, Lq, Lk)
    num = torch.einsum("bhqm,bhqmd->bhqd", fq, S_ex[:, :, c_of]) + a @ v
    den = torch.einsum("bhqm,bhqm->bhq", fq, z_ex[:, :, c_of]) + a.sum(-1)
    past = (pos >= Lk)[:, None]                                            # beyond every key: the whole state
    if bool(past.any()):
        S_all, z_all = S_c.sum(2), z_c.sum(2)
        num = torch.where(past, torch.einsum("bhqm,bhmd->bhqd", fq, S_all), num)
        den = torch.where(past[:, 0], torch.einsum("bhqm,bhm->bhq", fq, z_all), den)
    seen = (pos >= 0).to(fq.dtype)
    num, den = num * seen[:, None], den * seen
    return num / torch.where(den == 0, torch.ones_like(den), den).unsqueeze(-1)


def _run_approx(p: dict, result: CaseResult) -> None:
    from qkv.backends.linear import Performer

    dtype = DTYPES[p["dtype"]]
    cdt = F64 if dtype == F64 else torch.float32           # the backends compute half inputs in float32
    qkv_in, dout, _ = _inputs(p, dtype)
    fm = Performer(p["features"], seed=p["feature_seed"]) if p["backend"] == "performer" else None
    grad = p["grad"]

    def definition(compute_dtype, want_grad, form=_approx_definition):
        q, k, v = (t.detach().to(compute_dtype).requires_grad_(want_grad) for t in qkv_in)
        out = form(p, q, k, v, fm)
        return out, ((q, k, v) if want_grad else None)

    oracle, o_leaves = definition(F64, grad)
    base, b_leaves = definition(cdt, grad)
    other = definition(cdt, grad, _approx_factorised)
    third = definition(cdt, grad, _approx_chunked)
    fourth = definition(cdt, grad, _approx_row_term) if grad else None
    label = p["backend"]
    try:
        cand, c_leaves = _approx_call(p, qkv_in, fm, grad)
    except BackendError as exc:
        result.skipped[label] = str(exc).split(";")[0]
        return
    base_out = _worse(_worse(base.to(dtype), other[0].to(dtype), oracle), third[0].to(dtype), oracle)
    if dtype == F64:      # the baseline is the oracle itself
        result.checks.append(_self_check(label, "forward", cand, oracle))
    else:
        v = ratio_check(cand, base_out, oracle)
        result.checks.append(Check(label, "forward", v.ok, v.err, v.base, v.bound))
    if grad:
        noise = _ratio_noise(p, qkv_in, dout, fm) if dtype != F64 else {}
        _approx_grads(label, dout, (oracle, o_leaves), [(base, b_leaves), other, third, fourth], (cand, c_leaves),
                      result, noise)
    if p["state_cache"]:
        _approx_state(p, qkv_in, fm, base_out, oracle, result)


def _approx_call(p: dict, qkv_in, fm, grad: bool):
    be = qkv.backends.get(p["backend"])
    old_chunk = be.chunk
    be.chunk = p["chunk"]
    try:
        q, k, v = (t.detach().clone().requires_grad_(grad) for t in qkv_in)
        ctx = fm.use() if fm is not None else contextlib.nullcontext()
        with ctx:
            out = qkv.attention(q, k, v, causal=p["causal"], scale=p["scale"], backend=p["backend"],
                                q_offset=p["q_offset"])
    finally:
        be.chunk = old_chunk
    return out, (q, k, v)


def _ratio_noise(p: dict, qkv_in, dout, fm, draws: int = 4) -> dict:
    """How far float32 rounding in the ratio's backward typically moves dq and dk (absolute).

    Every form's backward meets d a_ij = (dout_i . v_j - dout_i . out_i) / den_i (for the row
    term form; autograd's num / den^2 is the same difference), two dot products of length Dv
    summed in whatever order the BLAS picks. Where one key carries row i, out_i = v_j and the
    difference is nothing but their rounding, which the feature map's Jacobian then turns into
    dq and dk (exactly 0 in exact arithmetic): over 30 draws of seed 83, case 27436's inputs
    (a query seeing one key of three, D = Dv = 189) the backend's dq was 0.15x to 2.9x the
    worst textbook form's (median 0.85x the factorised form's, 2.2x the materialised one's),
    and up to 20x what one rounding per element of out would move it by: the sums' own
    rounding dominates. Recursive summation of n terms errs by about
    u |t| sqrt((n + 1) / 6) (partial sums grow as a random walk), u the unit roundoff; for the
    two sums, sigma_i = u sqrt((Dv + 1) / 3) |dout_i * out_i| / den_i, moving the gradients by
    sigma_i d den_i / d(q, k). That is added to the floor, one standard deviation: dq exactly
    (row i moves q_i alone), dk estimated from `draws` random-sign combinations of the rows.
    A detached stabilising max stays many times over it (tests/fuzz/test_regressions.py).
    """
    if qkv_in[0].numel() == 0 or qkv_in[1].numel() == 0:               # no row, or no key: nothing rounds
        return {"dq": 0.0, "dk": 0.0}
    q, k, v = (t.detach().double().requires_grad_(True) for t in qkv_in)
    num, den = _approx_materialised(p, q, k, v, fm)
    out = (num / den).detach()
    u = EPS[torch.float32] / 2
    sigma = u * math.sqrt((out.shape[-1] + 1) / 3) * (dout * out).norm(dim=-1, keepdim=True) / den.detach()
    dq, = torch.autograd.grad((sigma * den).sum(), q, retain_graph=True)
    g = torch.Generator().manual_seed(p["data_seed"])
    var_k = torch.zeros_like(k)
    for i in range(draws):
        sign = torch.randint(0, 2, den.shape, generator=g).to(F64) * 2 - 1
        dk, = torch.autograd.grad((sign * sigma * den).sum(), k, retain_graph=i < draws - 1)
        var_k += dk * dk
    return {"dq": float(dq.abs().max()), "dk": float((var_k / draws).sqrt().max())}


def _approx_grads(label, dout, oracle, base: list, cand, result: CaseResult, noise: dict) -> None:
    def grads(out, leaves):
        loss = (out.double() * dout).sum()
        if not loss.requires_grad:
            return [torch.zeros_like(t) for t in leaves]
        gs = torch.autograd.grad(loss, leaves, allow_unused=True)
        return [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, gs)]

    go, gc = grads(*oracle), grads(*cand)
    gb = [functools.reduce(lambda x, y: _worse(x, y, o), forms)                   # the worst textbook form
          for *forms, o in zip(*(grads(*b) for b in base), go)]
    scale = max([float(g.abs().max()) for g in go if g.numel()] + [1.0])
    for name, c, b, o in zip(GRAD_NAMES, gc, gb, go):
        if c.dtype == F64:
            result.checks.append(_self_check(label, "grad " + name, c, o, scale))
        else:
            v = ratio_check(c, b.to(c.dtype), o, ratio=3.0, scale=scale, extra_floor=noise.get(name, 0.0))
            result.checks.append(Check(label, "grad " + name, v.ok, v.err, v.base, v.bound))


def _approx_state(p: dict, qkv_in, fm, base_out, oracle, result: CaseResult) -> None:
    """A prompt then single tokens through LinearStateCache: the same numbers as one causal call."""
    from qkv.cache import LinearStateCache

    q, k, v = qkv_in
    label = f"state:{p['backend']}"
    cache = LinearStateCache(p["B"], p["Hkv"], p["D"], feature_map=fm if fm is not None else "linear",
                             scale=p["scale"], value_dim=p["Dv"], dtype=q.dtype)
    outs, n0 = [], p["prompt"]
    ctx = fm.use() if fm is not None else contextlib.nullcontext()
    with ctx, torch.no_grad():
        if n0:
            outs.append(cache.attention(q[:, :, :n0], k[:, :, :n0], v[:, :, :n0], backend=p["backend"]))
        for i in range(n0, p["Lk"]):
            outs.append(cache.attention(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], backend=p["backend"]))
    got = torch.cat(outs, dim=2)
    if got.dtype == F64:
        result.checks.append(_self_check(label, "decode", got, oracle))
        return
    v_ = ratio_check(got, base_out, oracle)
    result.checks.append(Check(label, "decode", v_.ok, v_.err, v_.base, v_.bound))


# -----------------------------------------------------------------------------
# KV caches: prefill and decode against one call over the whole history


def _draw_cache(rng: random.Random) -> dict:
    kind = rng.choice(("contiguous", "paged", "ring"))
    window = rng.randint(1, 12) if kind == "ring" or rng.random() < 0.35 else None
    B = rng.randint(1, 3)
    Hq, Hkv = _draw_heads(rng)
    if Hq == 0:
        Hq, Hkv = 1, 1
    D = rng.choice((1, 8, 16, 40, 64)) if rng.random() < 0.7 else _log_uniform(rng, 1, 128)
    ragged = B > 1 and rng.random() < 0.5
    prompts = [rng.randint(0 if ragged else 1, 24) for _ in range(B)] if ragged else [rng.randint(1, 24)] * B
    steps = [1 if rng.random() < 0.8 else rng.randint(2, 5) for _ in range(rng.randint(1, 12))]
    p = dict(kind=kind, window=window, B=B, Hq=Hq, Hkv=Hkv, D=D, prompts=prompts, steps=steps,
             dtype=_draw_dtype(rng, weights=(0.3, 0.5, 0.1, 0.1)),
             backend=rng.choice(("auto", "auto", "auto", "math", "tiled", "sdpa")),
             block_size=rng.choice((1, 3, 4, 16)), data_seed=rng.getrandbits(31))
    p["alibi"] = kind == "contiguous" and not ragged and rng.random() < 0.15
    return p


def _new_cache(p: dict, dtype, total: int):
    from qkv.cache import BlockPool, ContiguousCache, PagedCache, RingCache

    B, Hkv, D, W = p["B"], p["Hkv"], p["D"], p["window"]
    if p["kind"] == "ring":
        return RingCache(B, Hkv, D, W, dtype=dtype)
    if p["kind"] == "contiguous":
        return ContiguousCache(B, Hkv, D, max(1, total), window=W, dtype=dtype)
    bs = p["block_size"]
    pool = BlockPool(B * -(-max(1, total) // bs), bs)
    return PagedCache(pool, Hkv, D, seqs=[pool.new_sequence() for _ in range(B)], window=W, dtype=dtype)


def _run_cache(p: dict, result: CaseResult) -> None:
    dtype = DTYPES[p["dtype"]]
    B, Hq, Hkv, D = p["B"], p["Hq"], p["Hkv"], p["D"]
    prompts, steps = p["prompts"], p["steps"]
    totals = [n + sum(steps) for n in prompts]
    g = torch.Generator().manual_seed(p["data_seed"])
    hist = [[torch.randn(1, h, L, D, generator=g, dtype=F64).to(dtype) for h in (Hq, Hkv, Hkv)] for L in totals]
    score_mod = S.alibi(Hq) if p["alibi"] else None
    cache = _new_cache(p, dtype, max(totals))
    outs = [[] for _ in range(B)]
    label = f"cache:{p['kind']}"
    try:
        with torch.no_grad():
            _fill_cache(p, cache, hist, outs, score_mod)
    except BackendError as exc:
        result.skipped[label] = str(exc).split(";")[0]
        return
    mask = M.causal() if p["window"] is None else M.sliding_window(p["window"])
    # the attention call the cache stands for, in the terms `_flash_form` and `_score_noise` take
    call = dict(score_mod=["alibi_heads", Hq] if p["alibi"] else None, q_offset=None, scale=None, causal=False,
                return_lse=False, grad=False)
    for b in range(B):
        q, k, v = hist[b]
        got = torch.cat(outs[b], dim=2)
        q64, k64, v64 = (t.double() for t in (q, k, v))
        ref, w = qkv.attention(q64, k64, v64, mask=mask, score_mod=score_mod, backend="reference",
                               return_weights=True)
        if dtype == F64:
            result.checks.append(_self_check(label, f"row {b}", got, ref))
            continue
        math_out = qkv.attention(q, k, v, mask=mask, score_mod=score_mod, backend="math")
        base = _worse(math_out, _flash_form(call, (q, k, v), dtype, mask, False)[0], ref)
        noise = EPS[torch.float32] * _score_noise(call, q64, k64, v64, ref, w)["out"]
        v_ = ratio_check(got, base, ref, extra_floor=noise)
        result.checks.append(Check(label, f"row {b}", v_.ok, v_.err, v_.base, v_.bound))


def _fill_cache(p: dict, cache, hist, outs, score_mod) -> None:
    """Prompts (row by row when ragged, else as one batch), then batched steps of `steps` tokens."""
    B, backend = p["B"], p["backend"]
    prompts = p["prompts"]
    if len(set(prompts)) == 1:
        n = prompts[0]
        q, k, v = (torch.cat([h[i][:, :, :n] for h in hist]) for i in range(3))
        out = cache.attention(q, k, v, score_mod=score_mod, backend=backend)
        for b in range(B):
            outs[b].append(out[b:b + 1])
    else:
        for b, n in enumerate(prompts):
            if n:
                q, k, v = (t[:, :, :n] for t in hist[b])
                outs[b].append(cache.row(b).attention(q, k, v, score_mod=score_mod, backend=backend))
    pos = list(prompts)
    for n in p["steps"]:
        q, k, v = (torch.cat([h[i][:, :, s:s + n] for h, s in zip(hist, pos)]) for i in range(3))
        out = cache.attention(q, k, v, score_mod=score_mod, backend=backend)
        for b in range(B):
            outs[b].append(out[b:b + 1])
        pos = [s + n for s in pos]


# -----------------------------------------------------------------------------
# The driver


def _tally(summary: dict, result: CaseResult) -> None:
    """Count, per backend, the cases whose forward and whose gradients were compared, and the refusals."""
    per = summary["backends"]
    seen = set()
    for c in result.checks:
        what = "grad" if c.what.startswith("grad") else "forward"
        seen.add((c.backend, what))
    for backend, what in seen:
        per.setdefault(backend, {"forward": 0, "grad": 0, "refused": 0})[what] += 1
    for name in result.skipped:
        per.setdefault(name, {"forward": 0, "grad": 0, "refused": 0})["refused"] += 1
    kinds = summary["errors_by_kind"]
    for c in result.checks:
        if not c.ok and not c.known:
            key = f"{c.backend} {'row' if c.what.startswith('row') else c.what}"
            kinds[key] = kinds.get(key, 0) + 1
    for e in result.errors:
        key = ": ".join(e.split(": ")[:2])                  # "where: ExceptionType"
        kinds[key] = kinds.get(key, 0) + 1


def run(minutes: float | None = None, seed: int | None = None, max_cases: int | None = None,
        progress: bool = True, json_path=None, start: int = 0, stream=None) -> dict:
    """Run cases start, start + 1, ... of `seed` until `minutes` pass or `max_cases` ran.

    Returns a summary: cases, wall time, checks per backend (forward and gradient
    comparisons; refusals), mismatches (each with the one line that replays it),
    errors by kind. With `json_path` the summary is also written there (atomically).
    """
    if minutes is None and max_cases is None:
        raise ValueError("give minutes=, max_cases= or both")
    seed = int.from_bytes(os.urandom(3), "little") if seed is None else int(seed)
    stream = sys.stderr if stream is None else stream
    deadline = None if minutes is None else time.monotonic() + 60.0 * minutes
    summary = {"seed": seed, "cases": 0, "passed": 0, "seconds": 0.0, "cases_per_second": 0.0,
               "kinds": {}, "backends": {}, "mismatches": [], "errors_by_kind": {}, "known": []}
    t0 = last = time.monotonic()
    index = start
    while (max_cases is None or summary["cases"] < max_cases) and (deadline is None or time.monotonic() < deadline):
        _record(summary, run_case(seed, index), stream if progress else None)
        index += 1
        now = time.monotonic()
        if progress and now - last >= (0.5 if stream.isatty() else 10.0):
            last = now
            _progress(summary, now - t0, stream)
    summary["seconds"] = round(time.monotonic() - t0, 3)
    summary["cases_per_second"] = round(summary["cases"] / summary["seconds"], 2) if summary["seconds"] else 0.0
    if progress:
        _progress(summary, summary["seconds"], stream)
        if stream.isatty():
            print(file=stream)
    if json_path is not None:
        from qkv._util.files import write_text_atomic as write_atomic   # temp file, fsync, rename

        write_atomic(json_path, json.dumps(summary, indent=2) + "\n")
    return summary


def _record(summary: dict, result: CaseResult, stream) -> None:
    """Add one case to the summary; a mismatch prints its reproducer on `stream` (if any) at once."""
    summary["cases"] += 1
    summary["kinds"][result.kind] = summary["kinds"].get(result.kind, 0) + 1
    _tally(summary, result)
    if result.known():
        summary["known"].append({"case": result.index, "checks": result.known(), "reproducer": result.reproducer})
    if result.ok:
        summary["passed"] += 1
        return
    summary["mismatches"].append({"case": result.index, "kind": result.kind, "failures": result.failures(),
                                  "reproducer": result.reproducer})
    if stream is not None:
        print(("\n" if stream.isatty() else "") + f"MISMATCH: {result.reproducer}   # "
              + "; ".join(result.failures())[:300], file=stream, flush=True)


def _progress(summary: dict, seconds: float, stream) -> None:
    rate = summary["cases"] / seconds if seconds else 0.0
    line = (f"selftest seed {summary['seed']}: {summary['cases']} cases, {rate:.1f} cases/s, "
            f"{len(summary['mismatches'])} mismatches, {len(summary['known'])} known, {seconds:.0f} s")
    print(("\r" + line) if stream.isatty() else line, end="" if stream.isatty() else "\n", file=stream, flush=True)


def replay(seed: int, index: int, stream=None) -> CaseResult:
    """Run one case and print its full description and every comparison."""
    result = run_case(seed, index)
    print(result.report(), file=sys.stdout if stream is None else stream)
    return result


def summary_text(summary: dict) -> str:
    """The summary as a few lines: cases, rate, checks per backend, mismatches."""
    lines = [f"seed {summary['seed']}: {summary['cases']} cases in {summary['seconds']:.1f} s "
             f"({summary['cases_per_second']:.1f} cases/s), {summary['passed']} passed, "
             f"{len(summary['mismatches'])} mismatches",
             "cases by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(summary["kinds"].items())),
             f"{'backend':<20} {'forward':>8} {'grad':>8} {'refused':>8}"]
    for name, c in sorted(summary["backends"].items()):
        lines.append(f"{name:<20} {c['forward']:>8} {c['grad']:>8} {c['refused']:>8}")
    if summary["errors_by_kind"]:
        lines.append("failures by kind: " + ", ".join(f"{k} x{n}" for k, n in summary["errors_by_kind"].items()))
    if summary["known"]:
        lines.append(f"{len(summary['known'])} cases hit a known limitation (not mismatches): "
                     + "; ".join(f"{name}: {why}" for name, why in KNOWN.items()
                                 if any(name in c for k in summary["known"] for c in k["checks"])))
        lines += [f"KNOWN {k['reproducer']}   # {'; '.join(k['checks'])[:200]}" for k in summary["known"][:10]]
    for m in summary["mismatches"]:
        lines.append(f"MISMATCH {m['reproducer']}   # {'; '.join(m['failures'])[:200]}")
    return "\n".join(lines)
