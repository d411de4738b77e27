"""Benchmark: qkv's Triton kernels against torch SDPA's CUDA backends, compiled FlexAttention and flash-attn.

Legend: B batch, H heads, L sequence length, D head dim; TFLOP/s 10^12 FLOP a second.

    python benchmarks/bench_gpu.py [--quick] [--out runs/bench] [--budget SECONDS] [--no-flex] [--no-first-call]

Needs a CUDA GPU (without one it says so on one line and exits with status 2). bf16, B x L = 16384
tokens, H x D = 2048. Prefill TFLOP/s (forward, forward+backward, backward) of qkv's `triton` backend,
SDPA's FLASH / CUDNN / EFFICIENT backends, compiled FlexAttention and flash-attn on dense, causal,
sliding_window(1024), packed documents & causal, prefix_lm(L/4), ALiBi & causal and softcap(30) &
causal at 16k (D 128), and dense/causal over L in 1k..32k, D 128 and 64; FLOPs counted from each
mask's allowed pairs. Paged and contiguous decode (Hq 32 / Hkv 8, D 128, cache 1k..128k) as a share
of the HBM bandwidth measured in the same run, with SDPA as the baseline. The first call (JIT
included) in a fresh process with cold and then warm Triton/inductor caches, qkv against Flex.
Prints the tables and the goals (met / not met), writes runs/bench/gpu.json and gpu.md. The whole
run keeps to --budget (default 450 s, --quick 60 s) and lists what it left out. `qkv bench gpu`
runs the same code (`qkv.tools.bench.gpu.run`). Timings are for reading, never for pass/fail.
"""

from __future__ import annotations

import sys

from qkv.tools.bench import gpu

if __name__ == "__main__":
    sys.exit(gpu.main())
