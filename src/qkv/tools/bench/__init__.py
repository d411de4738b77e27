"""The benchmarks, one module per `qkv bench` target; each has `run(out_dir, quick=...)` and `main(argv)`.

- `backends`: `qkv bench` (math vs sdpa; backends.json);
- `attention`: `qkv bench attention` (tiled, auto, sdpa, FlexAttention; attention.json/.md);
- `generate`: `qkv bench generate` (decoding vs transformers; generate.json/.md);
- `train`: `qkv bench train` (training vs transformers' GPT-2, data parallel; train.json/.md);
- `embed`: `qkv bench embed` (MiniLM embeddings vs sentence-transformers; embed.json/.md);
- `approx`: `qkv bench approx` (sparse masks, linear and Performer attention; approx.json/.md).
- `transformers`: `qkv bench transformers` (attn_implementation "qkv" in a Llama-style transformers model vs
  sdpa, eager and flex_attention; transformers.json/.md).
- `context`: `qkv bench context` (ring attention and all-to-all over 2 processes against one process, and a
  model on paper of when the ring's transfers hide; context.json/.md).

`python -m qkv.tools.bench.NAME` and benchmarks/bench_NAME.py run the same code.
"""
