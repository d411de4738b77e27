"""The error-ratio rule: how qkv judges a result against the float64 oracle.

DESIGN.md's testing rule, in one place for the two that apply it: the test suite
(`tests/conftest.py`: `assert_error_ratio`, `max_err`, `EPS`) and the differential
self-test (`qkv.tools.selftest`, `qkv selftest`).

A candidate (a backend's output, gradient, LSE or weights) passes when its error
against the float64 oracle is at most `ratio` x the error of a same-dtype baseline
(the materialised `math` backend, or the worse of two textbook forms), plus a floor
of a few ulps of the dtype at the oracle's scale, so that two results exact to
rounding never fail on a tie: 1 ulp for outputs (ratio 2), 4 ulps for gradients
(ratio 3), whose sums over keys and queries round more.

Floor 0: imports torch and the standard library only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["EPS", "F64_FLOOR_ULPS", "max_err", "Verdict", "ratio_check"]

EPS = {dt: torch.finfo(dt).eps for dt in (torch.float64, torch.float32, torch.bfloat16, torch.float16)}

# In float64 the inputs' rounding, which dominates lower precisions and is shared by every
# backend, is negligible: what is left is each algorithm's own accumulation order. An online
# softmax (sdpa's flash kernel, tiled) rescales its accumulator once per key block and ends a
# few ulps from the oracle where `math`, with one max and one sum, ends at one or two; the
# max over a handful of output elements then differs by more than 2x on luck alone (measured:
# 200 queries x 1000 keys, flash 2.7 ulps median against math 0.9). So float64's floor is 32
# ulps at the oracle's scale, 7e-15 relative: any real defect (a wrong formula, a float32
# intermediate) is off by 1e-7 or more. (The test suite keeps 1 ulp: its float64 cases
# compare like with like.)
F64_FLOOR_ULPS = 32


def max_err(x: torch.Tensor, oracle: torch.Tensor, *, strict: bool = False) -> float:
    """Largest |x - oracle|. A NaN where the oracle has a number counts as an infinite error,
    or, with `strict` (the tests' form), fails an assertion saying so."""
    diff = (x.detach().double() - oracle.detach().double()).abs()
    if diff.numel() == 0:
        return 0.0
    if strict:
        assert not torch.isnan(diff).any(), "NaN where the oracle has a number"
    elif bool(torch.isnan(diff).any()):
        return math.inf
    return float(diff.max())


@dataclass
class Verdict:
    ok: bool
    err: float          # candidate error against the oracle
    base: float         # baseline error against the oracle
    bound: float        # what err had to stay under
    floor_scale: float = 1.0    # the magnitude the floor was taken at
    floor: float = 0.0          # the ulps part of the bound (without extra_floor)


def ratio_check(candidate, baseline, oracle, *, ratio: float = 2.0, scale: float | None = None,
                eps: float | None = None, floor_ulps: int | None = None, extra_floor: float = 0.0,
                f64_floor_ulps: int = F64_FLOOR_ULPS, strict: bool = False) -> Verdict:
    """The candidate's error against the float64 oracle is at most `ratio` x the same-dtype
    baseline's error, plus a floor of a few ulps of the dtype at the oracle's scale (so two
    results exact to rounding never fail on a tie): 1 ulp for outputs (ratio 2), 4 ulps for
    gradients (ratio 3), whose sums over keys and queries round more (`floor_ulps` overrides
    that choice); float64 gets `f64_floor_ulps` (F64_FLOOR_ULPS) times more. `scale` overrides
    the oracle's magnitude (a gradient that is exactly zero is still a sum of rounded terms);
    `extra_floor` adds what the scores' own rounding may move the result by (the self-test's
    noise estimates).

    `strict` is the test suite's form: a NaN error fails an assertion (`max_err(strict=True)`)
    and an infinite baseline error is taken as it is; otherwise a NaN is an infinite error and
    a baseline with an infinite error gives no allowance beyond the floor."""
    err_c = max_err(candidate, oracle, strict=strict)
    err_b = max_err(baseline, oracle, strict=strict)
    if scale is None:
        scale = float(oracle.detach().double().abs().max()) if oracle.numel() else 1.0
    scale = max(1.0, scale)
    eps = EPS[candidate.dtype] if eps is None else eps
    ulps = (1 if ratio <= 2 else 4) if floor_ulps is None else floor_ulps
    floor = ulps * (f64_floor_ulps if eps == EPS[torch.float64] else 1) * eps * scale
    allowance = err_b if strict or math.isfinite(err_b) else 0.0
    bound = ratio * allowance + floor + extra_floor
    return Verdict(err_c <= bound, err_c, err_b, bound, scale, floor)
