"""Benchmark: a Llama-style Hugging Face model with attn_implementation "qkv" against "sdpa", "eager" and "flex_attention".

Legend: L sequence length, V vocabulary.

    python benchmarks/bench_transformers.py [--quick] [--out runs/bench] [--seed 0] [--threads N]

4 layers, width 512, 8 heads / 2 KV heads, V=8192, random weights, fp32 CPU, L=16,384:
(a) 8 packed documents (position_ids restarting; LlamaForCausalLM), (b) a 1,024-token
sliding window (MistralForCausalLM). Forward and training step (AdamW) per implementation,
each (implementation, case) in a fresh process; FlexAttention forward only (steady state
and first call, compiled). Passes whose estimated memory does not fit are refused, never
started. Prints the tables and the goals (met / not met), writes
runs/bench/transformers.json and transformers.md. `qkv bench transformers` runs the same
code (`qkv.tools.bench.transformers.run`). Timings are for reading, never for pass/fail.
"""

from __future__ import annotations

import sys

from qkv.tools.bench import transformers

if __name__ == "__main__":
    sys.exit(transformers.main())
