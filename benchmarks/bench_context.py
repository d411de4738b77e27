"""Benchmark: context parallelism (ring attention) over 2 CPU processes against one process, and a model on paper.

Legend: L sequence length, N ranks, Lr = L / N rows per rank, R achieved FLOP/s, BW link bytes/s.

    python benchmarks/bench_context.py [--quick] [--lengths L ...] [--masks causal sliding_window]
                                       [--no-ulysses] [--out runs/bench] [--seed 0]

One sequence (B=1, 8 heads, D=64, fp32) under a causal mask and a causal sliding window of
1024, at L = 16k, 32k, 64k, forward and forward+backward, each setup in fresh processes: one
process at 1 and at 2 threads (`qkv.attention`), and 2 ranks x 1 thread over gloo on loopback
running `qkv.distributed.ring_attention` (zigzag and contiguous layouts) and
`ulysses_attention`. Reports times, device efficiency ((1-thread time / cores) / time; the goal
is >= 85% for ring zigzag forward+backward), machine efficiency (2-thread time / time), peak
resident memory per process, messages and bytes per rank, the time ranks spend waiting, and a
model on paper: when the ring's transfers hide behind its computation (Lr >= (s/2)(Hkv/Hq)(R/BW)
forward, twice that under a causal mask), checked against the runs with this machine's measured
R and BW, then predicted for H100s under stated assumptions. --quick: L = 8192, causal only,
under a minute. Writes runs/bench/context.json and context.md. `qkv bench context` runs the
same code (`qkv.tools.bench.context.run`). Timings are for reading, never for pass/fail.
"""

from __future__ import annotations

import sys

from qkv.tools.bench import context

if __name__ == "__main__":
    sys.exit(context.main())
