"""Benchmark: qkv's materialised `math` backend vs torch SDPA (`sdpa`), side by side in one process.

Legend: B batch, H heads, L sequence length (Lq = Lk = L), D head dim.

`backend_timings` runs two backends side by side in one process on the same q, k, v
(agreement and median times); the tour (`qkv demo`), `qkv bench` (`qkv bench backends`)
and benchmarks/bench_backends.py share it. `run` is the benchmark: fp32, B=1, H=8, D=64,
L in {512, 1024, 2048, 4096} (--quick: {256, 512}), masks none / causal /
sliding_window(256), forward and forward+backward, both backends on the same inputs;
it prints the machine and a table (median ms of each, their ratio math / sdpa: > 1
means sdpa is faster, and the largest difference of outputs and gradients) and writes
backends.json (atomically). Timings are for reading, never for pass/fail.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

import qkv
from qkv._util.files import write_text_atomic
from qkv.tools.harness import bench_main, format_machine, format_table, machine_info, median_ms, peak_rss_mib

__all__ = ["backend_timings", "timing_table", "run", "main", "BENCH_LENGTHS", "BENCH_QUICK_LENGTHS", "BENCH_MASKS",
           "BENCH_PASSES"]


# ----------------------------------------------------------------------------
# Backend timings: math vs sdpa, side by side in one process
# ----------------------------------------------------------------------------

def _mask_specs(names: Sequence[str]) -> list[tuple[str, dict]]:
    """Mask names -> qkv.attention keyword arguments."""
    specs = []
    for name in names:
        if name == "none":
            specs.append((name, {}))
        elif name == "causal":
            specs.append((name, {"causal": True}))
        elif (m := re.fullmatch(r"sliding_window\((\d+)\)", name)):
            specs.append((name, {"mask": qkv.masks.sliding_window(int(m.group(1)))}))
        else:
            raise ValueError(f"unknown mask {name!r}: use 'none', 'causal' or 'sliding_window(W)'")
    return specs


def backend_timings(lengths: Sequence[int] = (512, 1024, 2048), masks: Sequence[str] = ("none", "causal"),
                    passes: Sequence[str] = ("fwd",), *, B: int = 1, H: int = 8, D: int = 64,
                    dtype: torch.dtype = torch.float32, backends: tuple[str, str] = ("math", "sdpa"),
                    warmup: int = 1, min_runs: int = 3, max_runs: int = 7, budget_s: float = 1.0,
                    seed: int = 0, verbose: bool = True) -> list[dict]:
    """Time two backends on the same inputs, and check they agree.

    For each length L, mask and pass ("fwd" or "fwd+bwd"), both backends run on
    the same q, k, v (B, H, L, D), one after the other in this process. Each
    time is the median of `min_runs`..`max_runs` calls after `warmup` calls
    (only 2 when a single call takes longer than `budget_s`).
    `max_abs_diff` compares the outputs (and, for "fwd+bwd", the gradients of
    q, k, v); `agree` holds when it is within 1e-4 x the largest magnitude
    compared (fp32 kernels that sum in different orders differ by ~1e-6 here).
    Returns one dict per (L, mask, pass) with times in ms and the ratio
    first/second backend (> 1: the second is faster).
    """
    for p in passes:
        if p not in ("fwd", "fwd+bwd"):
            raise ValueError(f"unknown pass {p!r}: use 'fwd' or 'fwd+bwd'")
    first, second = backends
    rows = []
    for L in lengths:
        g = torch.Generator().manual_seed(seed + L)
        q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=dtype) for _ in range(3))  # (B, H, L, D) each
        grad_out = torch.randn(B, H, L, D, generator=g, dtype=dtype)                   # (B, H, L, D)
        for mask_name, kwargs in _mask_specs(masks):
            for p in passes:
                results, times, runs = {}, {}, {}
                for name in backends:
                    if p == "fwd":
                        def fn(name=name):
                            with torch.no_grad():
                                return qkv.attention(q, k, v, backend=name, **kwargs)
                    else:
                        def fn(name=name):
                            qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
                            out = qkv.attention(qg, kg, vg, backend=name, **kwargs)
                            grads = torch.autograd.grad(out, (qg, kg, vg), grad_out)
                            return (out.detach(), *grads)
                    t0 = time.perf_counter()
                    res = fn()  # the first warm-up call; its result is what the backends are compared on
                    first_s = time.perf_counter() - t0
                    results[name] = res if isinstance(res, tuple) else (res,)
                    times[name], runs[name] = median_ms(fn, warmup=max(warmup - 1, 0), min_runs=min_runs,
                                                        max_runs=max_runs, budget_s=budget_s, first_s=first_s)
                diff = max(float((a - b).abs().max()) for a, b in zip(results[first], results[second]))
                scale = max(1.0, *(float(a.abs().max()) for a in results[first]))
                row = {
                    "L": L, "mask": mask_name, "pass": p, "B": B, "H": H, "D": D, "dtype": str(dtype).replace("torch.", ""),
                    f"{first}_ms": round(times[first], 3), f"{second}_ms": round(times[second], 3),
                    "ratio": round(times[first] / times[second], 3) if times[second] > 0 else None,
                    "max_abs_diff": diff, "agree": diff <= 1e-4 * scale,
                    "runs": runs,
                }
                rows.append(row)
                if verbose:
                    print(f"  L={L:<5} {mask_name:<19} {p:<7} {first} {times[first]:9.2f} ms   "
                          f"{second} {times[second]:9.2f} ms", flush=True)
    return rows


_TABLE_COLUMNS = ("L", "mask", "pass", "{0} ms", "{1} ms", "{0}/{1}", "max|diff|", "agree")


def _table_cells(rows: Sequence[dict], backends: tuple[str, str]) -> tuple[list[str], list[list[str]]]:
    a, b = backends
    header = [c.format(a, b) for c in _TABLE_COLUMNS]
    body = []
    for r in rows:
        ratio = r["ratio"]
        body.append([str(r["L"]), r["mask"], r["pass"], f"{r[f'{a}_ms']:.2f}", f"{r[f'{b}_ms']:.2f}",
                     "-" if ratio is None else f"{ratio:.2f}x", f"{r['max_abs_diff']:.1e}",
                     "yes" if r["agree"] else "NO"])
    return header, body


def timing_table(rows: Sequence[dict], backends: tuple[str, str] = ("math", "sdpa"), *, markdown: bool = False) -> str:
    """The rows of `backend_timings` as a plain-text (or Markdown) table, every column right-aligned."""
    header, body = _table_cells(rows, backends)
    return format_table(header, body, left=(), markdown=markdown)


# ----------------------------------------------------------------------------
# The benchmark (`qkv bench` and benchmarks/bench_backends.py)
# ----------------------------------------------------------------------------

BENCH_LENGTHS = (512, 1024, 2048, 4096)
BENCH_QUICK_LENGTHS = (256, 512)
BENCH_MASKS = ("none", "causal", "sliding_window(256)")
BENCH_PASSES = ("fwd", "fwd+bwd")


def run(out_dir="runs/bench", quick: bool = False, *, lengths: Sequence[int] | None = None,
        masks: Sequence[str] = BENCH_MASKS, passes: Sequence[str] = BENCH_PASSES) -> dict:
    """math vs sdpa, forward and forward+backward, fp32, B=1, H=8, D=64; writes `backends.json`.

    Prints the machine and a table (ms and ratios); returns what it wrote.
    """
    lengths = tuple(lengths) if lengths is not None else (BENCH_QUICK_LENGTHS if quick else BENCH_LENGTHS)
    info = machine_info()
    print(format_machine(info))
    print(f"math vs sdpa, fp32, B=1, H=8, D=64; L in {list(lengths)}; masks {list(masks)}; passes {list(passes)}")
    print("(median of several runs after a warm-up; ratio > 1: sdpa is faster)\n", flush=True)
    t0 = time.perf_counter()
    rows = backend_timings(lengths, masks, passes, min_runs=3, max_runs=7 if not quick else 5,
                           budget_s=1.0 if quick else 3.0)
    table = timing_table(rows)
    print("\n" + table)
    result = {
        "benchmark": "backends", "machine": info, "seconds": round(time.perf_counter() - t0, 2),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "grid": {"lengths": list(lengths), "masks": list(masks), "passes": list(passes),
                 "B": 1, "H": 8, "D": 64, "dtype": "float32"},
        "rows": rows,
    }
    path = write_text_atomic(Path(out_dir) / "backends.json", json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")
    return result


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="L in {256, 512} only (a smoke run)")
    parser.add_argument("--out", default="runs/bench", help="directory for backends.json (default runs/bench)")


def main(argv: list[str] | None = None) -> int:
    """`python -m qkv.tools.bench.backends` / benchmarks/bench_backends.py."""
    return bench_main(argv, prog=None, description=__doc__.splitlines()[0],
                      add_arguments=add_arguments, run=lambda args: run(args.out, quick=args.quick), errors=())


if __name__ == "__main__":
    sys.exit(main())
