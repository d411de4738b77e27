"""The self-test's cases: each drawn from (seed, index) alone, as plain data, and rebuilt into calls.

Legend: B batch, Hq query heads, Hkv key/value heads, Lq/Lk lengths, D head dim, Dv value dim,
M kernel features, W sliding window.

`make_case(seed, index)` draws one `Case` of three kinds: "attention" (shape, dtype, a mask
tree, a score_mod, alignment, LSE / weights, gradients), "approx" (the `linear` and
`performer` backends, chunking, the recurrent state) or "cache" (a KV cache filled by
prefill and decode steps). A mask or score_mod is a nested-list spec (`build_mask`,
`build_score_mod`, `spec_str`); `mask_definition` evaluates a mask spec from the
definitions in the docstrings, independently of the mask classes.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from qkv import masks as M
from qkv import scores as S
from qkv._util.array import to_float

__all__ = ["F64", "DTYPES", "MAX_WORK", "MAX_SCORES", "Case", "Ctx", "make_case", "reproducer", "build_mask",
           "mask_definition", "spec_str", "build_score_mod", "ModPattern", "AffineScore"]

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


#: `qkv selftest --backend NAME`: the one backend the attention cases run (None: every exact one)
ONLY_BACKEND: list = [None]


def reproducer(seed: int, index: int) -> str:
    only = ONLY_BACKEND[0]
    return f"python -m qkv selftest --seed {seed} --case {index}" + (f" --backend {only}" if only else "")


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
    ctx = Ctx(B, Hq, Lq, Lk, Lk - Lq if q_offset is None else q_offset)
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
class Ctx:
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


def _draw_top_mask(rng: random.Random, ctx: Ctx):
    r = rng.random()
    if r < 0.2:
        return None
    if r < 0.3:
        return ["tensor", _dense_shape(rng, ctx), round(rng.uniform(0.1, 0.95), 2), rng.getrandbits(31)]
    if r < 0.35:
        return ["function", *_pattern(rng)]            # a plain function, not a qkv mask
    return _draw_mask(rng, ctx, depth=0)


def _draw_mask(rng: random.Random, ctx: Ctx, depth: int):
    r = rng.random()
    if depth < 3 and r < 0.3:
        return [rng.choice(("and", "or")), _draw_mask(rng, ctx, depth + 1), _draw_mask(rng, ctx, depth + 1)]
    if depth < 3 and r < 0.38:
        return ["not", _draw_mask(rng, ctx, depth + 1)]
    return _draw_leaf(rng, ctx)


def _draw_leaf(rng: random.Random, ctx: Ctx):
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


def _dense_shape(rng: random.Random, ctx: Ctx) -> list[int]:
    """A bool tensor shape that broadcasts to (B, Hq, Lq, Lk)."""
    rows = ctx.Lq if rng.random() < 0.85 else 1
    cols = ctx.Lk if rng.random() < 0.95 else 1
    lead = rng.choice(([], [1], [ctx.B, 1], [1, ctx.Hq], [ctx.B, ctx.Hq]))
    return [*lead, rows, cols]


def _pattern(rng: random.Random) -> list[int]:
    """Parameters (a, c, e, m, r) of the mask (a q + c kv + e h + b) % m != r."""
    return [rng.randint(-2, 3), rng.randint(-2, 3), rng.randint(0, 2), rng.randint(2, 5), rng.randint(0, 1)]


def _draw_document(rng: random.Random, ctx: Ctx):
    n = max(1, ctx.span)
    batched = ctx.B > 1 and rng.random() < 0.3
    rows = ctx.B if batched else 1
    sort = rng.random() < 0.85                        # unsorted ids are classified by evaluation
    return ["document", rows, n, rng.randint(1, 5), sort, rng.getrandbits(31)]


def _draw_block_sparse(rng: random.Random, ctx: Ctx):
    bq, bk = rng.choice((1, 2, 3, 8, 16, 64, 128)), rng.choice((1, 2, 5, 8, 16, 64, 128))
    nqb = -(-max(ctx.start + ctx.Lq, 0) // bq) + rng.randint(0, 1)
    nkb = -(-ctx.Lk // bk) + rng.randint(0, 1)
    lead = rng.choice(([], [ctx.Hq], [1, ctx.Hq], [ctx.B, ctx.Hq], [ctx.B, 1]))
    return ["block_sparse", [*lead, nqb, nkb], bq, bk, round(rng.uniform(0.2, 0.9), 2), rng.getrandbits(31)]


def _draw_bigbird(rng: random.Random, ctx: Ctx):
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


def mask_definition(spec, ctx: "Ctx"):
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


def _draw_score_mod(rng: random.Random, ctx: Ctx, depth: int = 0):
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


# -- approximate-attention cases ----------------------------------------------


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


# -- KV-cache cases --------------------------------------------------------------


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
