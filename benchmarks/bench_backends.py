"""Benchmark: qkv's materialised `math` backend vs torch SDPA (`sdpa`), side by side in one process.

Legend: B batch, H heads, L sequence length, D head dim.

    python benchmarks/bench_backends.py [--quick] [--out runs/bench]

Grid: fp32, B=1, H=8, D=64, L in {512, 1024, 2048, 4096} (--quick: {256, 512}),
masks none / causal / sliding_window(256), forward and forward+backward. For
each cell both backends run on the same inputs; the table shows the median ms
of each, their ratio (math / sdpa: > 1 means sdpa is faster) and the largest
difference between their outputs (and gradients). Writes runs/bench/backends.json
(atomically) with the machine it ran on. `qkv bench` runs the same code
(`qkv.tools.bench.backends.run`). Timings are for reading, never for pass/fail.
"""

from __future__ import annotations

import sys

from qkv.tools.bench import backends

if __name__ == "__main__":
    sys.exit(backends.main())
