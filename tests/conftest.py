"""Shared test helpers: the error-ratio rule and random inputs.

Legend: B batch, Hq query heads, Hkv key/value heads, Lq/Lk lengths, D head dim.
"""

from __future__ import annotations

import os

# the CPU decode kernels compile (or load) on first use in the process that uses them, as they
# always did, rather than in the background: every run then takes the same path (the tests of
# the background build, tests/cache/test_kernel_cache.py, set their own QKV_NUMBA)
os.environ.setdefault("QKV_NUMBA", "wait")

import pytest
import torch

# without a GPU, the `triton` backend's kernels run on CPU tensors in Triton's interpreter (read when
# the kernels are defined, on first use), as CI checks them
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hypothesis import settings

import qkv
from qkv import testing
from qkv.testing import EPS  # noqa: F401  (the tests import EPS from here)

# Property tests draw the same examples on every run unless asked otherwise
# (`pytest --hypothesis-profile=explore`), so CI is reproducible.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile("ci")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per worker: the workers already use every core
    torch.set_num_threads(1)


def max_err(x: torch.Tensor, oracle: torch.Tensor) -> float:
    """Largest |x - oracle|; a NaN where the oracle has a number fails (`qkv.testing.max_err`)."""
    return testing.max_err(x, oracle, strict=True)


def assert_error_ratio(candidate, baseline, oracle, *, ratio: float = 2.0, what: str = "",
                       scale: float | None = None) -> None:
    """DESIGN.md's rule (`qkv.testing.ratio_check`): the candidate's error against the float64
    oracle is at most `ratio` x the same-dtype baseline's error, plus a floor of a few ulps of
    the dtype at the oracle's scale (so two exact-to-rounding results never fail on a tie):
    1 ulp for outputs (ratio 2), 4 ulps for gradients (ratio 3), whose sums over keys and
    queries round more; 1 ulp in float64 too. `scale` overrides the oracle's magnitude (a
    gradient that is exactly zero, e.g. dq with one key, is still a sum of rounded terms)."""
    v = testing.ratio_check(candidate, baseline, oracle, ratio=ratio, scale=scale, f64_floor_ulps=1, strict=True)
    assert v.ok, f"{what}: candidate error {v.err:.3e} > {ratio} x baseline error {v.base:.3e} + {v.floor:.1e}"


def rand_qkv(B, Hq, Hkv, Lq, Lk, D, Dv=None, *, dtype=torch.float32, seed=0, requires_grad=False):
    """Fresh random inputs (never zeros), created in float64 then cast, so every dtype sees the same values."""
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    q = torch.randn(B, Hq, Lq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, Lk, Dv, generator=g, dtype=torch.float64)
    out = [t.to(dtype).requires_grad_(requires_grad) for t in (q, k, v)]
    return tuple(out)


@pytest.fixture
def qkv_module():
    return qkv
