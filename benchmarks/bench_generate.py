"""Benchmark: qkv's generation loop and KV caches against Hugging Face transformers' `generate`.

Legend: B batch (prompts), L prompt length, N new tokens, Hq query heads, Hkv key/value heads, D head dim.

    python benchmarks/bench_generate.py [--quick] [--out runs/bench] [--seed 0]

A GPT-2-small-shaped model (12 layers, d=768, 12 heads, V=50257; random seeded
weights, fp32) is built with transformers (attention "sdpa"), saved, and loaded
into qkv with `qkv.models.hf.load`, so both sides run the same weights in one
process. Greedy, L=512, N=64, every core. Measured side by side: tokens/s at
batch 1 and batch 8 (decode and end-to-end; qkv with a contiguous and a paged
cache), with the generated tokens checked identical; the decode step time against
the weight-and-cache streaming floor (bytes per step / memory bandwidth measured
in the same run); a cached decode step against recomputing the 1024-token prefix;
paged against contiguous throughput, and the unused fraction of each cache on a
mixed-length batch; the cache bytes of GQA (8 KV heads) against MHA (32) in a
Llama-style model. In fresh processes timed from start to exit: the cold start of
`qkv generate` on a `qkv train --preset tiny` checkpoint (first run ever with an empty
kernel cache, the run right after it, QKV_NUMBA=0), and `qkv generate` (kernels cached,
and QKV_NUMBA=0) against a transformers `generate` script on the GPT-2-small shape, with
the new tokens checked identical. --quick: a tiny model, under a minute. Prints the tables and the goals
(met / not met), writes runs/bench/generate.json and generate.md. `qkv bench
generate` runs the same code (`qkv.tools.bench.generate.run`). Timings are for reading,
never for pass/fail.
"""

from __future__ import annotations

import sys

from qkv.tools.bench import generate

if __name__ == "__main__":
    sys.exit(generate.main())
