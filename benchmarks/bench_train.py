"""Benchmark: training throughput of qkv's decoder against Hugging Face GPT-2, and 2 processes against 1.

Legend: B global batch, L context, V vocabulary, d model width.

    python benchmarks/bench_train.py [--quick] [--out runs/bench] [--seed 0] [--threads N] [--no-ddp] [--profile]

A GPT-2-style decoder (6 layers, d=384, 6 heads, V=8192, L=256, B=16; fp32 CPU):
tokens/s of a full training step (teacher-forced forward, cross-entropy, backward,
clip 1.0, AdamW) of `qkv.models.Decoder` against transformers' GPT2LMHeadModel
(its default attention, "sdpa") holding the same weights, in alternating timed
blocks (medians of the per-block rates), with the losses of the two checked
equal on the same batches. Then data parallelism on the CPU: 2 spawned processes
of 1 thread each running DistributedDataParallel (gloo) over halves of the same
global batch, against 1 process at 2 threads and at 1 thread, with the losses
checked equal. --quick: a tiny model, seconds. --profile: one profiled step per
side and a table of the operators that take the time. Prints the tables and the
goals (met / not met), writes runs/bench/train.json and train.md. `qkv bench
train` runs the same code (`qkv.tools.bench.train.run`). Timings are for reading,
never for pass/fail.
"""

from __future__ import annotations

import sys

from qkv.tools.bench import train

if __name__ == "__main__":
    sys.exit(train.main())
