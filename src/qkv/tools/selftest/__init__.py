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

Every comparison follows DESIGN.md's error-ratio rule (`qkv.testing.ratio_check`).

The package: `cases` draws and rebuilds the cases, `attention`, `approx` and `cache` run
the three kinds, `results` holds what they found; this module is the driver (`run`,
`run_case`, `replay`, `summary_text`).
"""

from __future__ import annotations

import json
import os
import sys
import time

import qkv
from qkv.testing import EPS, max_err, ratio_check
from qkv.tools.selftest.approx import run_approx
from qkv.tools.selftest.attention import exact_backends, run_attention
from qkv.tools.selftest.cache import run_cache
from qkv.tools.selftest.cases import (MAX_WORK, ONLY_BACKEND, Case, build_mask, make_case, mask_definition,
                                     reproducer)
from qkv.tools.selftest.results import KNOWN, KNOWN_RATIO, KNOWN_REL, CaseResult, exception_text

__all__ = ["EPS", "KNOWN", "KNOWN_RATIO", "KNOWN_REL", "MAX_WORK", "max_err", "ratio_check", "Case", "make_case",
           "CaseResult", "run_case", "run", "replay", "reproducer", "summary_text", "exact_backends",
           "mask_definition", "build_mask"]


def run_case(seed: int, index: int) -> CaseResult:
    """Draw case `index` of `seed`, run every backend that can serve it, compare."""
    t0 = time.perf_counter()
    case = make_case(seed, index)
    result = CaseResult(seed, index, case.kind, case.describe())
    runner = {"attention": run_attention, "approx": run_approx, "cache": run_cache}[case.kind]
    try:
        runner(case.params, result)
    except Exception as exc:  # a failure of the case as a whole (the oracle, the inputs)
        result.errors.append(exception_text(f"{case.kind} case", exc))
    result.seconds = time.perf_counter() - t0
    return result


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


def only(backend: str | None) -> None:
    """Run the attention cases on `backend` alone (None: every exact backend and auto); the
    other kinds of case (cache, approx) are skipped then. Mismatch lines replay with it."""
    if backend is not None:
        caps = qkv.backends.get(backend).capabilities          # an unknown name: ValueError listing them
        if not caps.exact or backend == "reference":
            raise ValueError(f"--backend takes an exact backend other than the oracle, not {backend!r}; "
                             f"the approximate ones are tested by the approx cases")
    ONLY_BACKEND[0] = backend


def run(minutes: float | None = None, seed: int | None = None, max_cases: int | None = None,
        progress: bool = True, json_path=None, start: int = 0, stream=None, backend: str | None = None) -> dict:
    """Run cases start, start + 1, ... of `seed` until `minutes` pass or `max_cases` ran
    (with `backend`, its attention cases only: `only`).

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
    only(backend)
    while (max_cases is None or summary["cases"] < max_cases) and (deadline is None or time.monotonic() < deadline):
        if backend is not None and make_case(seed, index).kind != "attention":
            index += 1
            continue
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


def replay(seed: int, index: int, stream=None, backend: str | None = None) -> CaseResult:
    """Run one case (with `backend`, on that backend alone) and print its full description and every comparison."""
    only(backend)
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
