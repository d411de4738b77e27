"""What every qkv tool that measures shares: the machine, timing, tables, results on disk, threads, memory.

Legend: ms milliseconds; RSS resident set size (VmRSS), its peak VmHWM (Linux).

- `machine_info` / `format_machine`: where the numbers came from (CPU, cores, threads,
  library versions), recorded in every result and printed first;
- `median_ms`: the median wall time of a call after warm-ups, within a time budget;
- `format_table`: plain-text (or Markdown) tables, numbers right-aligned;
- `write_results`: print a result, write `NAME.json` and `NAME.md` atomically (the last
  step of every `qkv bench` benchmark);
- `usable_cores`, `threads`: the cores this process may run on, torch threads for a block;
- `rounded`, `ratio`: None-safe rounding and division for result fields;
- `status_bytes`, `ru_maxrss_bytes`, `reset_peak`, `peak_rss_mib`: memory probes;
- `quiet_transformers`: no progress bars or info chatter from Hugging Face transformers;
- `bench_main`: the command line of a benchmark module (`python -m qkv.tools.bench.NAME`,
  benchmarks/*.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

import qkv
from qkv._util.files import write_text_atomic

__all__ = ["machine_info", "format_machine", "median_ms", "format_table", "write_results", "usable_cores",
           "threads", "rounded", "ratio", "status_bytes", "ru_maxrss_bytes", "reset_peak", "peak_rss_mib",
           "quiet_transformers", "bench_main"]


# ----------------------------------------------------------------------------
# The machine
# ----------------------------------------------------------------------------

def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity; every core where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def machine_info() -> dict:
    """Where the numbers came from: CPU model, cores, threads, library versions."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "numba": _numba_version(),
        "qkv": qkv.__version__,
    }


def _numba_version() -> str:
    """numba's version, or why qkv's CPU decode kernels are off."""
    from qkv import kernels
    if not kernels.ENABLED:
        return "off (QKV_NUMBA=0)"
    try:
        import numba
    except ImportError:
        return "not installed"
    return numba.__version__


def format_machine(info: dict) -> str:
    return (f"machine: {info['cpu']}; {info['usable_cores']} usable cores of {info['cpu_count']}, "
            f"torch threads {info['torch_threads']}; torch {info['torch']}, numpy {info['numpy']}, "
            f"numba {info.get('numba', '?')}, "
            f"python {info['python']}, qkv {info['qkv']}")


@contextlib.contextmanager
def threads(n: int):
    """torch's intra-op threads set to `n` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------
# Timing and numbers
# ----------------------------------------------------------------------------

def median_ms(fn: Callable[[], object], *, warmup: int, min_runs: int, max_runs: int, budget_s: float,
              first_s: float = 0.0) -> tuple[float, int]:
    """Median wall time of `fn` in ms after `warmup` more calls, and how many runs it took.

    At least `min_runs` runs (2 when one call, `first_s`, already exceeds the budget:
    a 4096-long materialised backward takes many seconds), more while within `budget_s`.
    """
    for _ in range(warmup):
        fn()
    need = min_runs if first_s <= budget_s else min(min_runs, 2)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < need or (len(times) < max_runs and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, len(times)


def rounded(x: float | None, nd: int = 4) -> float | None:
    """`x` rounded to `nd` decimals, None staying None."""
    return None if x is None else round(float(x), nd)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is not positive."""
    if a is None or b is None or not b > 0:
        return None
    return a / b


# ----------------------------------------------------------------------------
# Tables and results
# ----------------------------------------------------------------------------

def format_table(header: Sequence[str], body: Sequence[Sequence[str]], *, left: Sequence[int] = (0,),
                 markdown: bool = False) -> str:
    """Plain text (or Markdown): numbers right-aligned, the text columns `left` left-aligned."""
    if markdown:
        rule = "|" + "".join("---|" if i in left else "---:|" for i in range(len(header)))
        return "\n".join(["| " + " | ".join(header) + " |", rule] + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i in left else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, body)])


def write_results(result: dict, out_dir, name: str, render, log, *, title: str | None = None) -> tuple[Path, Path]:
    """Print `render(result)`, write `name`.json and `name`.md (the Markdown render, under `# title` when given)
    atomically into `out_dir`, and say where: the last step of every `qkv bench` benchmark."""
    log("\n" + render(result))
    out = Path(out_dir)
    md = render(result, markdown=True)
    if title is not None:
        md = f"# {title}\n\n{md}\n"
    json_path = write_text_atomic(out / f"{name}.json", json.dumps(result, indent=2) + "\n")
    md_path = write_text_atomic(out / f"{name}.md", md)
    log(f"\nfinished in {result['seconds']:.0f} s; wrote {json_path} and {md_path}")
    return json_path, md_path


# ----------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------

def status_bytes(field: str) -> int | None:
    """A `VmRSS:`-style field of /proc/self/status in bytes (Linux), else None."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
    return None


def ru_maxrss_bytes() -> int:
    """The peak RSS getrusage reports, in bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------
# Running a benchmark
# ----------------------------------------------------------------------------

@contextlib.contextmanager
def quiet_transformers():
    """No progress bars or info chatter from transformers while the benchmark runs."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def bench_main(argv: Sequence[str] | None, *, prog: str | None, description: str,
               add_arguments: Callable[[argparse.ArgumentParser], None], run: Callable[[argparse.Namespace], object],
               children: dict[str, Callable[[str], object]] | None = None,
               errors: tuple[type[BaseException], ...] = (ValueError,)) -> int:
    """The command line of a benchmark module: `argv` (default sys.argv[1:]) parsed by the options
    `add_arguments` declares, then `run(args)`; an exception of a type in `errors` is a usage error
    (one line, exit status 2). `children` maps a first argument such as "--memory-child" to the
    entry point of the benchmark's measuring subprocess, called with the argument after it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    for flag, child in (children or {}).items():
        if argv[:1] == [flag]:
            child(argv[1])
            return 0
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except errors as exc:
        parser.error(str(exc))
    return 0
