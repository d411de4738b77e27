"""Benchmark: qkv's `tiled` and `auto` against torch SDPA and FlexAttention on long masked sequences.

Legend: B batch, H heads, L sequence length, D head dim.

    python benchmarks/bench_attention.py [--quick] [--lengths L ...] [--cases ...] [--out runs/bench]
                                         [--no-flex] [--no-memory] [--budget SECONDS] [--memory-length L]

B=1, H=8, D=64, fp32; cases causal, sliding_window(1024) & causal, document & causal
(8 packed sequences), prefix_lm(1024); L in {4096, 16384, 32768} (--quick: {1024, 4096});
forward and forward+backward, side by side in one process. FlexAttention is compiled
with torch.compile (first call and steady state reported). Also: the square GEMM rate
(fp32 torch.mm, 2048 x 2048, at the start and the end) and every contender's useful
FLOP/s (allowed pairs x 4 x D, x 3.5 with the backward) over it, agreement at L = 4096,
and the 131072-token causal memory case in a fresh process (not in --quick). Prints the
tables and the goals (met / not met), writes runs/bench/attention.json and attention.md.
`qkv bench attention` runs the same code (`qkv.tools.bench.attention.run`). Timings are
for reading, never for pass/fail.
"""

from __future__ import annotations

import sys

from qkv.tools.bench import attention

if __name__ == "__main__":
    sys.exit(attention.main())
