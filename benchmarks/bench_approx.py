"""Benchmark: sparse masks and kernelised attention against exact causal softmax attention.

Legend: B batch, H heads, L sequence length, D head dim, W local window (keys).

    python benchmarks/bench_approx.py [--quick] [--out runs/bench] [--seed 0] [--threads N]

Exact causal attention (tiled), sliding_window, Longformer and BigBird masks (exact
softmax over fewer keys, tiled), `linear` (elu+1 kernel) and `performer` (FAVOR+,
256 random features), on the same inputs: (a) relative output error against exact
causal attention in float64, on random q, k, v and on the q, k, v of a byte-level
model trained with `qkv.train.train_lm`; (b) accuracy of the same tiny decoder
trained with each variant for the same number of steps, on associative recall and
on the character-level default corpus (bits per character); (c) forward time and
peak memory at L = 1k..64k (B=1, H=8, D=64, fp32, causal; a separate process, a
time cap per point) and the time of one decode step after 1k..64k tokens of
context (exact over a ContiguousCache, linear and performer over a LinearStateCache),
with the crossover lengths and the goals (linear >= 20x faster than exact at
L=65,536; linear decode per token flat within 10%). Also draws the sparse masks'
tiles (approx_mask_*.png). --quick: small sizes, well under a minute. Writes
runs/bench/approx.json and approx.md. `qkv bench approx` runs the same code
(`qkv.tools.bench.approx.run`). Timings are for reading, never for pass/fail.
"""

from __future__ import annotations

import sys

from qkv.tools.bench import approx

if __name__ == "__main__":
    sys.exit(approx.main())
