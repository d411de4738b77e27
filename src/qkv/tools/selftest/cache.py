"""The self-test's KV-cache cases: prefill and decode steps against one call over the whole history.

Legend: B batch (rows), Hq query heads, Hkv key/value heads, D head dim, W sliding window.

A contiguous, paged or ring cache is filled by prompts (row by row when ragged) and
batched steps; each row's outputs are compared with one float64 reference call over its
whole history, against the worse of `math` and the flash formulas as the baseline.
"""

from __future__ import annotations

import torch

import qkv
from qkv import masks as M
from qkv import scores as S
from qkv.backends import BackendError
from qkv.testing import EPS, ratio_check
from qkv.tools.selftest.attention import flash_form, score_noise
from qkv.tools.selftest.cases import DTYPES, F64
from qkv.tools.selftest.results import CaseResult, Check, self_check, worse

__all__ = ["run_cache"]


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


def run_cache(p: dict, result: CaseResult) -> None:
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
    # the attention call the cache stands for, in the terms `flash_form` and `score_noise` take
    call = dict(score_mod=["alibi_heads", Hq] if p["alibi"] else None, q_offset=None, scale=None, causal=False,
                return_lse=False, grad=False)
    for b in range(B):
        q, k, v = hist[b]
        got = torch.cat(outs[b], dim=2)
        q64, k64, v64 = (t.double() for t in (q, k, v))
        ref, w = qkv.attention(q64, k64, v64, mask=mask, score_mod=score_mod, backend="reference",
                               return_weights=True)
        if dtype == F64:
            result.checks.append(self_check(label, f"row {b}", got, ref))
            continue
        math_out = qkv.attention(q, k, v, mask=mask, score_mod=score_mod, backend="math")
        base = worse(math_out, flash_form(call, (q, k, v), dtype, mask, False)[0], ref)
        noise = EPS[torch.float32] * score_noise(call, q64, k64, v64, ref, w)["out"]
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
