"""`qkv bench generate`: qkv's generation loop and KV caches against Hugging Face `generate`.

Legend: B batch (prompts), L prompt length, N new tokens per prompt, V vocabulary,
Hq query heads, Hkv key/value heads, D head dim, d model width; fp32 throughout.

One process, the same weights on both sides. A GPT-2-small-shaped model (12 layers,
d=768, 12 heads, V=50257, 1024 positions; random weights, seeded) is built with
transformers (`GPT2LMHeadModel`, attention "sdpa", HF's default), saved with
`save_pretrained` and read back with `qkv.models.hf.load`. Greedy decoding, L=512,
N=64; torch uses every usable core. The config sets no end-of-sequence token, so
both sides always generate exactly N tokens. What is measured:

1. batch 1: `qkv.generate.generate` against HF `model.generate` (one short warm-up
   generate each, then a few alternating timed runs; medians). End-to-end tokens/s
   (new tokens / wall time of the whole call) and decode tokens/s (tokens made by
   the one-token steps / their time: qkv's `stats`, HF's from a streamer that
   clocks every `put`; the second put is the first new token, the end of prefill).
   The generated tokens must be identical (a loud warning otherwise).
2. the streaming floor of a decode step: every parameter is read once per step (the
   LM head reads the whole tied embedding, counted once; of the learned position
   table only one row) plus the K/V cache at the mean decode context
   (2 * layers * Hkv * D * 4 bytes * tokens). floor = bytes / read bandwidth. The
   bandwidth is read (median of three `x.sum()` over a 1 GiB fp32 buffer on huge
   pages, as the weights and caches are, `qkv._util.hugepages`) just before and just after
   each timed batch-1 qkv run, and the higher of the two sets that run's floor: a
   shared machine's bandwidth drifts by tens of percent within seconds, so a reading
   a minute away describes another machine. Goal: the median over the runs of qkv's
   decode step time / floor <= 1.2; HF's step is set against the median floor. The
   run-wide figure (the higher of a reading at the start and at the end of the
   benchmark, copy bandwidth beside it) is reported with the ratios it gives.
3. batch 8: 8 prompts of L tokens; qkv with a contiguous and with a paged cache
   against HF on the (8, L) batch; decode and end-to-end tokens/s, tokens checked
   identical. Goal: qkv (contiguous) decode tokens/s >= 3x HF's.
4. KV cache against recomputing: at 1024 tokens of context, one cached decode step
   (prefill 1016 tokens, then 8 timed steps at contexts 1017..1024, median) against
   a full forward over 1024 tokens (last_only=True, no cache). Goal >= 10x.
5. paged against contiguous: the decode throughput ratio at batch 8 (from 3; goal
   >= 0.9x); and 8 prompts of mixed lengths (60..512, seeded) generating N tokens
   by hand through both caches: unused allocated bytes / allocated bytes from
   `cache.memory()` at the end (paged goal < 4%; contiguous shown beside it).
6. GQA: a Llama-style model (2 layers, d=2048, Hq=32, D=64) with Hkv=8 against the
   same with Hkv=32 (MHA), caches filled with the same 512-token prompt:
   cache bytes (nbytes and used_bytes) ratio; goal exactly 1/4.
7. cold start, in fresh processes (`qkv.tools.bench.coldstart`, as is 8): `python -m qkv
   generate --prompt "def " --max-new-tokens 32` on a `qkv train --preset tiny` checkpoint
   (60 steps; decode speed does not depend on what the weights learned), timed by this
   process from the child's start to its exit: the first run ever (QKV_NUMBA=1, numba's
   cache and qkv's stamp in a new empty directory), a second run right after it (whether a
   background build's log, lock and stamp exist is recorded) and QKV_NUMBA=0; 3 interleaved
   rounds, medians of wall time and of the decode tokens/s the CLI prints. Goals: second
   run wall <= 1.1x QKV_NUMBA=0's and its decode tokens/s >= QKV_NUMBA=0's; first run wall
   <= 1.5x QKV_NUMBA=0's.
8. end to end against transformers, fresh processes: the GPT-2-small shape with random
   weights written by `qkv.models.hf.save`, 32 prompt ids, 64 new tokens, greedy: `python -m
   qkv generate --ids` with the kernels built first (`python -m qkv.kernels.build`, same
   environment) and with QKV_NUMBA=0, against a `python -c` that loads
   `GPT2LMHeadModel.from_pretrained` (sdpa, fp32) and calls `generate`; 3 interleaved rounds
   after one untimed, medians, the new tokens checked identical. Goal: transformers wall /
   qkv wall >= 2x.

`--quick`: a tiny GPT-2 (2 layers, d=128, 4 heads, V=1000), L=32, N=8, batch 2,
context 128, a 64 MiB bandwidth buffer; the cold start on a 10-step checkpoint and the
end to end on the tiny shape (64 new tokens), one round each; under a minute. Writes generate.json and
generate.md under the output directory. Timings are for reading; the goals
say met / not met but nothing here fails a test.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from qkv._util import hugepages
from qkv.cache import cache_bytes
from qkv.tools.bench import coldstart
from qkv.tools.harness import (bench_main, format_machine, format_table, machine_info, median_ms,
                               quiet_transformers, ratio, rounded, usable_cores, write_results)

__all__ = ["run", "main", "Sizes", "FULL", "QUICK", "memory_bandwidth", "render"]


@dataclass(frozen=True)
class Sizes:
    """Every size the benchmark uses (FULL, or QUICK for --quick)."""

    n_layers: int
    d_model: int
    n_heads: int
    vocab: int
    max_positions: int
    prompt: int                 # L
    new_tokens: int             # N
    batch: int                  # the batched case
    repeats_1: int              # timed runs at batch 1, per side
    repeats_b: int              # timed runs at the batch size, per contender
    context: int                # KV cache vs recompute
    cached_steps: int
    mixed_min: int              # mixed-length prompt lengths, uniform in [mixed_min, prompt]
    block_size: int
    gqa_layers: int
    gqa_d_model: int
    gqa_heads: int
    gqa_kv_heads: int
    gqa_head_dim: int
    gqa_ffn: int
    gqa_prompt: int
    bandwidth_bytes: int
    bandwidth_runs: int


FULL = Sizes(n_layers=12, d_model=768, n_heads=12, vocab=50257, max_positions=1024, prompt=512, new_tokens=64,
             batch=8, repeats_1=5, repeats_b=3, context=1024, cached_steps=8, mixed_min=60, block_size=16,
             gqa_layers=2, gqa_d_model=2048, gqa_heads=32, gqa_kv_heads=8, gqa_head_dim=64, gqa_ffn=5632,
             gqa_prompt=512, bandwidth_bytes=1 << 30, bandwidth_runs=5)
QUICK = Sizes(n_layers=2, d_model=128, n_heads=4, vocab=1000, max_positions=256, prompt=32, new_tokens=8,
              batch=2, repeats_1=1, repeats_b=1, context=128, cached_steps=8, mixed_min=8, block_size=16,
              gqa_layers=1, gqa_d_model=128, gqa_heads=8, gqa_kv_heads=2, gqa_head_dim=16, gqa_ffn=256,
              gqa_prompt=32, bandwidth_bytes=64 << 20, bandwidth_runs=3)


# ----------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------

def _first_mismatch(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> dict | None:
    """None when the token lists are equal, else where they first differ (row, index)."""
    if len(a) != len(b):
        return {"row": None, "index": None, "why": f"{len(a)} rows against {len(b)}"}
    for row, (x, y) in enumerate(zip(a, b)):
        for i in range(max(len(x), len(y))):
            if i >= len(x) or i >= len(y) or x[i] != y[i]:
                return {"row": row, "index": i,
                        "a": x[i] if i < len(x) else None, "b": y[i] if i < len(y) else None}
    return None


def memory_bandwidth(nbytes: int = 1 << 30, runs: int = 5) -> dict:
    """Memory bandwidth in GB/s (1e9 bytes): reading an fp32 buffer of `nbytes` (`x.sum()`, median of
    `runs`) and copying it (`y.copy_(x)`, read + write bytes counted). The buffers sit on huge pages,
    as qkv's weights and caches do (`qkv._util.hugepages`): the floor is the fastest reading of the machine."""
    n = nbytes // 4
    x = hugepages.empty((n,)).fill_(1.0)                   # written once: every page is touched
    y = hugepages.empty((n,))
    y.copy_(x)
    read_ms, _ = median_ms(x.sum, warmup=1, min_runs=runs, max_runs=runs, budget_s=0.0)
    copy_ms, _ = median_ms(lambda: y.copy_(x), warmup=1, min_runs=runs, max_runs=runs, budget_s=0.0)
    del x, y
    gc.collect()
    return {"buffer_bytes": n * 4, "runs": runs, "read_ms": rounded(read_ms), "copy_ms": rounded(copy_ms),
            "read_gbs": rounded(n * 4 / (read_ms / 1e3) / 1e9, 2),
            "copy_gbs": rounded(2 * n * 4 / (copy_ms / 1e3) / 1e9, 2)}


class _BandwidthProbe:
    """Read bandwidth in GB/s on demand, from a buffer allocated (on huge pages) and touched once:
    the median of `runs` `x.sum()` over it (a 1 GiB buffer: ~0.1 s a reading)."""

    def __init__(self, nbytes: int, runs: int = 3):
        self.x = hugepages.empty((nbytes // 4,)).fill_(1.0)
        self.runs = runs

    def __call__(self) -> float:
        ms, _ = median_ms(self.x.sum, warmup=1, min_runs=self.runs, max_runs=self.runs, budget_s=0.0)
        return self.x.numel() * 4 / (ms / 1e3) / 1e9


# ----------------------------------------------------------------------------
# The two sides
# ----------------------------------------------------------------------------

def build_models(s: Sizes, seed: int):
    """(HF GPT2LMHeadModel, qkv Decoder) with the same random weights: HF's are saved with
    `save_pretrained` and read back with `qkv.models.hf.load`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from qkv.models import hf as qkv_hf

    config = GPT2Config(vocab_size=s.vocab, n_positions=s.max_positions, n_embd=s.d_model, n_layer=s.n_layers,
                        n_head=s.n_heads, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                        attn_implementation="sdpa")
    torch.manual_seed(seed)
    hf_model = GPT2LMHeadModel(config).eval()
    hf_model.generation_config.eos_token_id = None       # no early stop: both sides make exactly N tokens
    hf_model.generation_config.bos_token_id = None
    with tempfile.TemporaryDirectory(prefix="qkv-bench-gpt2-") as d:
        hf_model.save_pretrained(d)
        model = qkv_hf.load(d)
    return hf_model, model.eval()


class _Clock:
    """A transformers streamer that only notes when each `put` arrives (the prompt first, then
    one put per generated token)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _clock_streamer():
    from transformers.generation.streamers import BaseStreamer

    class Clock(_Clock, BaseStreamer):
        pass

    return Clock()


def _qkv_generate(model, prompts: list[list[int]], new: int, cache: str) -> dict:
    from qkv.generate import generate

    st: dict = {}
    single = len(prompts) == 1
    t0 = time.perf_counter()
    out = generate(model, prompts[0] if single else prompts, max_new_tokens=new, cache=cache, stats=st)
    total = time.perf_counter() - t0
    tokens = [out] if single else out
    return {"tokens": tokens, "total_s": total, "prefill_s": st["prefill_s"], "decode_s": st["decode_s"],
            "new_tokens": st["new_tokens"], "decode_steps": st["steps"] - 1, "batch": len(prompts)}


def _hf_generate(hf_model, prompts: list[list[int]], new: int) -> dict:
    ids = torch.tensor(prompts)                                              # (B, L)
    clock = _clock_streamer()
    t0 = time.perf_counter()
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                            do_sample=False, pad_token_id=0, streamer=clock)
    total = time.perf_counter() - t0
    t = clock.times                                                          # prompt, then one per token
    tokens = out[:, ids.shape[1]:].tolist()
    return {"tokens": tokens, "total_s": total, "prefill_s": t[1] - t0, "decode_s": t[-1] - t[1],
            "new_tokens": sum(map(len, tokens)), "decode_steps": len(t) - 2, "batch": len(prompts)}


def _summary(runs: list[dict]) -> dict:
    """Medians over the timed runs, and the rates they give."""
    total = statistics.median(r["total_s"] for r in runs)
    prefill = statistics.median(r["prefill_s"] for r in runs)
    decode = statistics.median(r["decode_s"] for r in runs)
    r0 = runs[0]
    B, new, steps = r0["batch"], r0["new_tokens"], r0["decode_steps"]
    decode_tokens = new - B                                  # the first token of each row comes from prefill
    return {
        "batch": B, "new_tokens": new, "decode_steps": steps, "runs": len(runs),
        "total_s": rounded(total), "prefill_s": rounded(prefill), "decode_s": rounded(decode),
        "step_ms": rounded(decode / steps * 1e3 if steps else None, 3),
        "decode_tok_s": rounded(decode_tokens / decode if decode > 0 else None, 2),
        "e2e_tok_s": rounded(new / total, 2),
        "each": [{k: rounded(r[k]) if k.endswith("_s") else r[k] for k in (
            "total_s", "prefill_s", "decode_s", "read_gbs_before", "read_gbs_after") if k in r} for r in runs],
    }


def _prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).tolist()


def compare(model, hf_model, prompts: list[list[int]], new: int, repeats: int, kinds: Sequence[str], log,
            probe=None) -> dict:
    """Timed runs of each contender in turn (qkv cache kinds, then "hf"), `repeats` rounds; medians.
    With `probe` (a `_BandwidthProbe`), the read bandwidth just before and after each qkv run."""
    runs: dict[str, list[dict]] = {k: [] for k in (*kinds, "hf")}
    for i in range(repeats):
        for k in runs:
            if k == "hf":
                r = _hf_generate(hf_model, prompts, new)
            else:
                before = probe() if probe is not None else None
                r = _qkv_generate(model, prompts, new, k)
                if probe is not None:
                    r["read_gbs_before"], r["read_gbs_after"] = rounded(before, 2), rounded(probe(), 2)
            runs[k].append(r)
            log(f"  run {i + 1}/{repeats} {_name(k):<14} {r['total_s']:7.2f} s "
                f"(prefill {r['prefill_s']:.2f} s, decode {r['decode_s']:.2f} s)"
                + (f", read {r['read_gbs_before']:.1f} / {r['read_gbs_after']:.1f} GB/s before / after"
                   if "read_gbs_before" in r else ""))
    out = {k: _summary(v) for k, v in runs.items()}
    hf_tokens = runs["hf"][0]["tokens"]
    for k in kinds:
        out[k]["tokens_identical_to_hf"] = all(_first_mismatch(r["tokens"], hf_tokens) is None for r in runs[k])
        out[k]["first_mismatch"] = _first_mismatch(runs[k][0]["tokens"], hf_tokens)
        out[k]["decode_vs_hf"] = rounded(ratio(out[k]["decode_tok_s"], out["hf"]["decode_tok_s"]), 3)
        out[k]["e2e_vs_hf"] = rounded(ratio(out[k]["e2e_tok_s"], out["hf"]["e2e_tok_s"]), 3)
    out["hf"]["deterministic"] = all(r["tokens"] == hf_tokens for r in runs["hf"])
    out["tokens"] = hf_tokens
    return out


def _name(kind: str) -> str:
    return {"contiguous": "qkv contiguous", "paged": "qkv paged", "hf": "HF transformers"}[kind]


# ----------------------------------------------------------------------------
# The floor, recomputing, paged memory, GQA
# ----------------------------------------------------------------------------

def step_bytes(model, context: float) -> dict:
    """Bytes one decode step must read: every parameter once (tied matrices once; one row of a
    learned position table) plus the K/V cache at `context` tokens."""
    c = model.config
    seen, params = set(), 0
    for name, p in model.named_parameters():          # named_parameters() already yields a tied matrix once
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name == "pos_embed.weight":
            params += p[0].numel() * p.element_size()   # one position row per step
        else:
            params += p.numel() * p.element_size()
    elem = model.embed.weight.element_size()
    kv = 2 * c.n_layers * c.n_kv_heads * c.head_dim * elem * context
    return {"param_bytes": int(params), "kv_bytes": int(round(kv)), "context": context,
            "total_bytes": int(round(params + kv))}


def streaming_floor(nbytes: dict, batch1: dict, run_wide_gbs: float) -> dict:
    """Decode step time / streaming floor at batch 1. Each qkv run is set against the floor at
    the higher of the bandwidth readings just before and after it; the verdict is the median
    of those ratios. HF's step is set against the median of those floors. The same ratios
    against the run-wide bandwidth (`run_wide_gbs`) are reported beside them."""
    total = nbytes["total_bytes"]
    q, hf = batch1["contiguous"], batch1["hf"]
    steps = q["decode_steps"]
    per_run = []
    for r in q["each"]:
        gbs = max(r["read_gbs_before"], r["read_gbs_after"])
        floor_ms = total / (gbs * 1e9) * 1e3
        step_ms = r["decode_s"] / steps * 1e3
        per_run.append({"read_gbs": rounded(gbs, 2), "floor_ms": rounded(floor_ms, 5), "step_ms": rounded(step_ms, 5),
                        "ratio": rounded(step_ms / floor_ms, 3)})
    floor_ms = statistics.median(r["floor_ms"] for r in per_run)
    run_floor_ms = total / (run_wide_gbs * 1e9) * 1e3
    return {"bytes": nbytes, "read_gbs": rounded(statistics.median(r["read_gbs"] for r in per_run), 2),
            "floor_ms": rounded(floor_ms, 5), "qkv_step_ms": q["step_ms"], "hf_step_ms": hf["step_ms"],
            "qkv_ratio": rounded(statistics.median(r["ratio"] for r in per_run), 3),
            "hf_ratio": rounded(ratio(hf["step_ms"], floor_ms), 3), "per_run": per_run,
            "run_wide": {"read_gbs": run_wide_gbs, "floor_ms": rounded(run_floor_ms, 5),
                         "qkv_ratio": rounded(ratio(q["step_ms"], run_floor_ms), 3),
                         "hf_ratio": rounded(ratio(hf["step_ms"], run_floor_ms), 3)}}


def kv_vs_recompute(model, context: int, steps: int, seed: int) -> dict:
    """A cached decode step at ~`context` tokens against a full no-cache forward over `context` tokens."""
    tokens = torch.tensor(_prompts(1, context, model.config.vocab_size, seed))     # (1, context)
    prefill = context - steps
    times = []
    with torch.no_grad():
        cache = model.new_cache(1, max_len=context)
        logits = model(tokens[:, :prefill], cache=cache, last_only=True)          # (1, 1, V)
        tok = logits[:, -1].argmax(-1, keepdim=True)                               # (1, 1)
        for _ in range(steps):
            t0 = time.perf_counter()
            tok = model(tok, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t0)
        full = lambda: model(tokens, last_only=True)[:, -1].argmax(-1)             # noqa: E731
        t0 = time.perf_counter()
        full()
        first = time.perf_counter() - t0
        recompute_ms, runs = median_ms(full, warmup=0, min_runs=2, max_runs=5, budget_s=3 * first,
                                       first_s=first)
    step_ms = statistics.median(times) * 1e3
    return {"context": context, "prefill": prefill, "cached_steps": steps,
            "step_contexts": [prefill + 1, context], "cached_step_ms": rounded(step_ms, 3),
            "recompute_ms": rounded(recompute_ms, 3), "recompute_runs": runs,
            "speedup": rounded(recompute_ms / step_ms, 2)}


def _prefill_decode(model, prompts: list[list[int]], new: int, kind: str, block_size: int) -> tuple[dict, list]:
    """Generate `new` greedy tokens per prompt by hand, as `qkv.generate` does, keeping the cache:
    (timings and cache.memory() at the end, tokens)."""
    B = len(prompts)
    t0 = time.perf_counter()
    with torch.no_grad():
        if kind == "contiguous":
            cache = model.new_cache(B, kind="contiguous", max_len=max(map(len, prompts)) + new)
            last = [model(torch.tensor([p]), cache=cache.row(b), last_only=True)[0, -1]
                    for b, p in enumerate(prompts)]                                   # B x (V,)
            step_cache = cache
        else:
            blocks = sum(-(-(len(p) + new) // block_size) for p in prompts)
            cache = model.new_cache(0, kind="paged", num_blocks=blocks, block_size=block_size)
            sids, last = [], []
            for p in prompts:
                sid = cache.pool.new_sequence()
                last.append(model(torch.tensor([p]), cache=cache.view([sid]), last_only=True)[0, -1])
                sids.append(sid)
            step_cache = cache.view(sids)
        token = torch.stack(last).argmax(-1)                                          # (B,)
        out = [token]
        t1 = time.perf_counter()
        for _ in range(new - 1):
            token = model(token[:, None], cache=step_cache, last_only=True)[:, -1].argmax(-1)
            out.append(token)
        t2 = time.perf_counter()
    mem = step_cache.memory()
    tokens = torch.stack(out, dim=1).tolist()                                         # (B, new)
    decode_s = t2 - t1
    return {"prefill_s": rounded(t1 - t0), "decode_s": rounded(decode_s),
            "decode_tok_s": rounded(B * (new - 1) / decode_s if decode_s > 0 else None, 2),
            "e2e_tok_s": rounded(B * new / (t2 - t0), 2),
            "cache_nbytes": int(cache.nbytes), "allocated_bytes": int(mem["allocated_bytes"]),
            "used_bytes": int(mem["used_bytes"]), "unused_bytes": int(mem["unused_bytes"]),
            "waste": rounded(mem["waste"], 5), "memory": {k: (rounded(v, 5) if isinstance(v, float) else v)
                                                     for k, v in mem.items()}}, tokens


def mixed_lengths(model, s: Sizes, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(s.mixed_min, s.prompt + 1, (s.batch,), generator=g).tolist()
    prompts = [p[:n] for p, n in zip(_prompts(s.batch, s.prompt, s.vocab, seed + 1), lengths)]
    out, tokens = {"lengths": lengths, "new_tokens": s.new_tokens, "block_size": s.block_size}, {}
    for kind in ("contiguous", "paged"):
        out[kind], tokens[kind] = _prefill_decode(model, prompts, s.new_tokens, kind, s.block_size)
    out["first_mismatch"] = _first_mismatch(tokens["paged"], tokens["contiguous"])
    out["tokens_identical"] = out["first_mismatch"] is None
    out["paged_vs_contiguous_decode"] = rounded(ratio(out["paged"]["decode_tok_s"],
                                                      out["contiguous"]["decode_tok_s"]), 3)
    return out


def gqa_cache(s: Sizes, seed: int) -> dict:
    """Cache bytes of a Llama-style model with Hkv < Hq against the same with Hkv = Hq."""
    from qkv.models import Decoder, DecoderConfig

    prompt = torch.tensor(_prompts(1, s.gqa_prompt, 1000, seed))                       # (1, L)
    rows = {}
    for name, kv in (("gqa", s.gqa_kv_heads), ("mha", s.gqa_heads)):
        config = DecoderConfig.llama(vocab_size=1000, d_model=s.gqa_d_model, n_layers=s.gqa_layers,
                                     n_heads=s.gqa_heads, n_kv_heads=kv, head_dim=s.gqa_head_dim,
                                     ffn_hidden=s.gqa_ffn, max_positions=s.gqa_prompt)
        torch.manual_seed(seed)
        model = Decoder(config).eval()
        cache = model.new_cache(1, max_len=s.gqa_prompt)
        t0 = time.perf_counter()
        with torch.no_grad():
            model(prompt, cache=cache, last_only=True)
        rows[name] = {"n_heads": s.gqa_heads, "n_kv_heads": kv, "head_dim": s.gqa_head_dim,
                      "nbytes": int(cache.nbytes), "used_bytes": int(cache.used_bytes),
                      "formula_bytes": cache_bytes(s.gqa_layers, kv, s.gqa_head_dim, s.gqa_prompt),
                      "prefill_s": rounded(time.perf_counter() - t0)}
        del model, cache
        gc.collect()
    return {"layers": s.gqa_layers, "d_model": s.gqa_d_model, "prompt": s.gqa_prompt, **rows,
            "expected_ratio": s.gqa_kv_heads / s.gqa_heads,
            "nbytes_ratio": rows["gqa"]["nbytes"] / rows["mha"]["nbytes"],
            "used_ratio": rows["gqa"]["used_bytes"] / rows["mha"]["used_bytes"]}


# ----------------------------------------------------------------------------
# Goals and rendering
# ----------------------------------------------------------------------------

def _goal(goal: str, measured, target: float, direction: str, shown: str = "x") -> dict:
    if measured is None or not math.isfinite(measured):
        met = None
    elif direction == ">=":
        met = measured >= target
    elif direction == "<=":
        met = measured <= target
    elif direction == "<":
        met = measured < target
    else:  # "=="
        met = abs(measured - target) <= 1e-12 * max(1.0, abs(target))
    return {"goal": goal, "measured": None if measured is None else float(measured), "target": target,
            "direction": direction, "unit": shown, "met": met}


def evaluate_goals(result: dict) -> list[dict]:
    bb, fl, gq = result["batchB"], result["floor"], result["gqa"]
    B = result["config"]["batch"]
    in_process = [
        _goal("batch 1: qkv decode step time / streaming floor", fl["qkv_ratio"], 1.2, "<="),
        _goal(f"batch {B}: qkv decode tokens/s / HF's (judged on decode throughput)",
              bb["contiguous"]["decode_vs_hf"], 3.0, ">="),
        _goal(f"KV cache: recompute ms / cached step ms at {result['recompute']['context']} tokens",
              result["recompute"]["speedup"], 10.0, ">="),
        _goal(f"paged / contiguous decode tokens/s at batch {B}",
              ratio(bb["paged"]["decode_tok_s"], bb["contiguous"]["decode_tok_s"]), 0.9, ">="),
        _goal(f"paged cache: unused / allocated bytes, mixed lengths (batch {B})",
              result["mixed"]["paged"]["waste"], 0.04, "<", "%"),
        _goal(f"GQA cache bytes / MHA cache bytes (Hkv {gq['gqa']['n_kv_heads']} vs {gq['mha']['n_kv_heads']})",
              gq["nbytes_ratio"], gq["expected_ratio"], "=="),
    ]
    return in_process + coldstart.goals(result, _goal)      # the fresh-process sections (7, 8)


def _f(x, fmt: str = "{:.2f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


_MAIN_HEADER = ("case", "contender", "B", "prefill s", "step ms", "decode tok/s", "e2e tok/s", "decode vs HF",
                "e2e vs HF", "step/floor", "tokens = HF")


def _main_cells(result: dict) -> list[list[str]]:
    body = []
    fl = result["floor"]
    for case, key in (("batch 1", "batch1"), (f"batch {result['config']['batch']}", "batchB")):
        block = result[key]
        for kind in ("contiguous", "paged", "hf"):
            if kind not in block:
                continue
            r = block[kind]
            floor = "-"
            if key == "batch1":
                floor = _f(fl["qkv_ratio"] if kind != "hf" else fl["hf_ratio"], "{:.2f}x")
            same = "-" if kind == "hf" else ("yes" if r["tokens_identical_to_hf"] else "NO")
            body.append([case, _name(kind), str(r["batch"]), _f(r["prefill_s"]), _f(r["step_ms"], "{:.1f}"),
                         _f(r["decode_tok_s"], "{:.1f}"), _f(r["e2e_tok_s"], "{:.1f}"),
                         "-" if kind == "hf" else _f(r["decode_vs_hf"], "{:.2f}x"),
                         "-" if kind == "hf" else _f(r["e2e_vs_hf"], "{:.2f}x"), floor, same])
    mx = result["mixed"]
    for kind in ("contiguous", "paged"):
        r = mx[kind]
        same = "-" if kind == "contiguous" else ("= contiguous" if mx["tokens_identical"] else "NO (vs contiguous)")
        body.append(["mixed lengths (by hand)", _name(kind), str(len(mx["lengths"])), _f(r["prefill_s"]),
                     _f(r["decode_s"] / (mx["new_tokens"] - 1) * 1e3 if r["decode_s"] else None, "{:.1f}"),
                     _f(r["decode_tok_s"], "{:.1f}"), _f(r["e2e_tok_s"], "{:.1f}"), "-", "-", "-", same])
    return body


_GOAL_HEADER = ("goal", "measured", "target", "verdict")


def _goal_cells(goals: Sequence[dict]) -> list[list[str]]:
    body = []
    for g in goals:
        m = g["measured"]
        if g["unit"] == "%":
            shown, target = _f(None if m is None else 100 * m, "{:.2f}%"), f"{100 * g['target']:g}%"
        elif g["direction"] == "==":
            shown, target = _f(m, "{:.4f}"), f"{g['target']:g}"
        else:
            shown, target = _f(m, "{:.2f}x"), f"{g['target']:g}x"
        verdict = "n/a" if g["met"] is None else ("met" if g["met"] else "NOT met")
        body.append([g["goal"], shown, f"{g['direction']} {target}", verdict])
    return body


_MEM_HEADER = ("cache (mixed lengths)", "allocated MiB", "used MiB", "unused MiB", "unused / allocated",
               "nbytes MiB")


def _mem_cells(mx: dict) -> list[list[str]]:
    return [[_name(k), _mib(mx[k]["allocated_bytes"]), _mib(mx[k]["used_bytes"]), _mib(mx[k]["unused_bytes"]),
             f"{100 * mx[k]['waste']:.2f}%", _mib(mx[k]["cache_nbytes"])] for k in ("contiguous", "paged")]


def _notes(result: dict) -> list[str]:
    c, bw, fl, rc, gq, mx = (result[k] for k in ("config", "bandwidth", "floor", "recompute", "gqa", "mixed"))
    return [
        f"model: GPT-2 shape, {c['n_layers']} layers, d={c['d_model']}, {c['n_heads']} heads, V={c['vocab']}, "
        f"{c['params'] / 1e6:.1f}M parameters, fp32, random weights (seed {c['seed']}); HF attention "
        f"{c['hf_attn_implementation']!r}; prompt {c['prompt']} tokens, {c['new_tokens']} new, greedy; "
        f"torch threads {result['machine']['torch_threads']}",
        f"memory bandwidth: read {bw['read_gbs']:.1f} GB/s (x.sum() over {bw['buffer_bytes'] / 2**30:g} GiB fp32; "
        f"start {bw['start']['read_gbs']:.1f}, end {bw['end']['read_gbs']:.1f}), copy {bw['copy_gbs']:.1f} GB/s "
        f"(read + write bytes)",
        f"streaming floor: {fl['bytes']['param_bytes'] / 2**20:.1f} MiB parameters + "
        f"{fl['bytes']['kv_bytes'] / 2**20:.1f} MiB K/V at the mean context of {fl['bytes']['context']:g} tokens = "
        f"{fl['bytes']['total_bytes'] / 2**20:.1f} MiB per step; bandwidth read just before and after each "
        f"batch-1 qkv run: " + ", ".join(f"{r['read_gbs']:.1f} GB/s -> {r['step_ms']:.2f} / {r['floor_ms']:.2f} ms "
                                         f"= {r['ratio']:.2f}x" for r in fl["per_run"])
        + f"; median {fl['qkv_ratio']:.2f}x (floor {fl['floor_ms']:.2f} ms; HF step {fl['hf_step_ms']:.2f} ms, "
        f"{fl['hf_ratio']:.2f}x); against the run-wide {fl['run_wide']['read_gbs']:.1f} GB/s (floor "
        f"{fl['run_wide']['floor_ms']:.2f} ms): qkv {fl['run_wide']['qkv_ratio']:.2f}x, HF "
        f"{fl['run_wide']['hf_ratio']:.2f}x",
        f"KV cache vs recompute: prefill {rc['prefill']} tokens, {rc['cached_steps']} cached steps at contexts "
        f"{rc['step_contexts'][0]}..{rc['step_contexts'][1]}: median {rc['cached_step_ms']:.2f} ms; a full forward "
        f"over {rc['context']} tokens (last_only, no cache): {rc['recompute_ms']:.1f} ms -> {rc['speedup']:.1f}x",
        f"mixed lengths: {mx['lengths']} + {mx['new_tokens']} new tokens, block size {mx['block_size']}; paged / "
        f"contiguous decode tokens/s {_f(mx['paged_vs_contiguous_decode'], '{:.2f}x')}",
        f"GQA: Llama style, {gq['layers']} layers, d={gq['d_model']}, Hq={gq['gqa']['n_heads']}, "
        f"D={gq['gqa']['head_dim']}, prompt {gq['prompt']}: Hkv={gq['gqa']['n_kv_heads']} holds "
        f"{gq['gqa']['nbytes'] / 2**20:.1f} MiB (used {gq['gqa']['used_bytes'] / 2**20:.1f}), "
        f"Hkv={gq['mha']['n_kv_heads']} {gq['mha']['nbytes'] / 2**20:.1f} MiB (used "
        f"{gq['mha']['used_bytes'] / 2**20:.1f}): ratio {gq['nbytes_ratio']:.4f} (used {gq['used_ratio']:.4f})",
        *coldstart.notes(result),
    ]


_LEGEND = ("medians of the timed runs after one warm-up each; step ms: one decode step (B tokens); decode tok/s: "
           "tokens from decode steps / their time (each row's first token comes from prefill); e2e tok/s: new "
           "tokens / wall time of the whole generate call; 'vs HF': qkv / HF (> 1: qkv faster); step/floor: "
           "decode step time / (bytes a step must read / read bandwidth measured just before and after each "
           "qkv run), median over the runs")


def _agreement(result: dict) -> list[str]:
    lines = []
    for label, ok, where in [
        ("batch 1, qkv vs HF", result["batch1"]["contiguous"]["tokens_identical_to_hf"],
         result["batch1"]["contiguous"]["first_mismatch"]),
        (f"batch {result['config']['batch']}, qkv contiguous vs HF",
         result["batchB"]["contiguous"]["tokens_identical_to_hf"], result["batchB"]["contiguous"]["first_mismatch"]),
        (f"batch {result['config']['batch']}, qkv paged vs HF",
         result["batchB"]["paged"]["tokens_identical_to_hf"], result["batchB"]["paged"]["first_mismatch"]),
        ("mixed lengths, paged vs contiguous", result["mixed"]["tokens_identical"], result["mixed"]["first_mismatch"]),
    ]:
        lines.append(f"{label}: {'identical' if ok else f'DIFFERENT (first at {where})'}")
    return lines + coldstart.agreement(result)


def render(result: dict, *, markdown: bool = False) -> str:
    main = format_table(_MAIN_HEADER, _main_cells(result), left=(0, 1, 10), markdown=markdown)
    goals = format_table(_GOAL_HEADER, _goal_cells(result["goals"]), left=(0, 3), markdown=markdown)
    mem = format_table(_MEM_HEADER, _mem_cells(result["mixed"]), left=(0,), markdown=markdown)
    cold, e2e = coldstart.render_tables(result, markdown=markdown)
    notes, agree = _notes(result), _agreement(result)
    if markdown:
        return "\n".join([
            f"# qkv generation benchmark{' (quick)' if result['quick'] else ''}", "",
            format_machine(result["machine"]) + ".", "", _LEGEND + ".", "", main, "",
            "## Fresh processes: cold start and end to end", "", coldstart.COLD_LEGEND + ".", "", cold, "", e2e, "",
            "## Goals", "", goals, "", "## KV cache memory (mixed-length batch, end of generation)", "", mem, "",
            "## Generated tokens", "", *[f"- {a}" for a in agree], "", "## Notes", "", *[f"- {n}" for n in notes],
            "", f"Finished in {result['seconds']:.0f} s.", "",
        ])
    return "\n".join([format_machine(result["machine"]), "", main, "", _LEGEND, "",
                      "fresh processes (cold start, end to end):", cold, "", e2e, "", coldstart.COLD_LEGEND, "",
                      "goals:", goals, "",
                      "KV cache memory (mixed-length batch, end of generation):", mem, "",
                      "generated tokens:", *[f"  {a}" for a in agree], "", *notes])


# ----------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------

def run(out_dir="runs/bench", quick: bool = False, *, seed: int = 0, threads: int | None = None,
        verbose: bool = True) -> dict:
    """Run the generation benchmark; print the tables; write generate.json and generate.md.

    `quick`: a tiny model and short prompts (seconds). `threads`: torch threads while it
    runs (default: every usable core; the previous setting is restored afterwards).
    Returns what was written to generate.json.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be None (every usable core) or an int >= 1, got {threads!r}")
    try:
        import transformers
    except ImportError as exc:
        raise ValueError("the generation benchmark compares against Hugging Face transformers: "
                         "pip install transformers (or the project's [dev] extra)") from exc
    s = QUICK if quick else FULL
    log = (lambda m: print(m, flush=True)) if verbose else (lambda m: None)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads or usable_cores())
    try:
        with quiet_transformers():
            return _run(s, out_dir, quick, seed, log, transformers.__version__)
    finally:
        torch.set_num_threads(threads_before)


def _warn(log, what: str, mismatch) -> None:
    bar = "!" * 78
    log(f"{bar}\n!!! WARNING: {what}: generated tokens DIFFER (first at {mismatch})\n{bar}")


def _run(s: Sizes, out_dir, quick: bool, seed: int, log, hf_version: str) -> dict:
    started = time.perf_counter()
    info = machine_info()
    log(format_machine(info))
    log(f"generation benchmark{' (quick)' if quick else ''}: GPT-2 shape {s.n_layers} layers, d={s.d_model}, "
        f"{s.n_heads} heads, V={s.vocab}; prompt {s.prompt}, {s.new_tokens} new tokens, batch 1 and {s.batch}; "
        f"transformers {hf_version}")

    log(f"memory bandwidth ({s.bandwidth_bytes / 2**20:g} MiB buffer) ...")
    bw_start = memory_bandwidth(s.bandwidth_bytes, s.bandwidth_runs)
    log(f"  read {bw_start['read_gbs']:.1f} GB/s, copy {bw_start['copy_gbs']:.1f} GB/s")

    log("building the HF model and loading its checkpoint into qkv ...")
    hf_model, model = build_models(s, seed)
    params = sum(p.numel() for p in model.parameters())

    # warm-up: one short generate each side
    warm = _prompts(1, min(16, s.prompt), s.vocab, seed + 100)
    _qkv_generate(model, warm, 4, "contiguous")
    _qkv_generate(model, warm, 4, "paged")
    _hf_generate(hf_model, warm, 4)

    log(f"batch 1: prompt {s.prompt}, {s.new_tokens} new tokens, {s.repeats_1} timed run(s) per side ...")
    probe = _BandwidthProbe(s.bandwidth_bytes)
    batch1 = compare(model, hf_model, _prompts(1, s.prompt, s.vocab, seed + 1), s.new_tokens, s.repeats_1,
                     ("contiguous",), log, probe=probe)
    del probe
    if not batch1["contiguous"]["tokens_identical_to_hf"]:
        _warn(log, "batch 1, qkv vs HF", batch1["contiguous"]["first_mismatch"])

    log(f"batch {s.batch}: {s.batch} prompts of {s.prompt}, {s.new_tokens} new tokens, {s.repeats_b} timed "
        f"run(s) per contender ...")
    batchB = compare(model, hf_model, _prompts(s.batch, s.prompt, s.vocab, seed + 2), s.new_tokens, s.repeats_b,
                     ("contiguous", "paged"), log)
    for kind in ("contiguous", "paged"):
        if not batchB[kind]["tokens_identical_to_hf"]:
            _warn(log, f"batch {s.batch}, qkv {kind} vs HF", batchB[kind]["first_mismatch"])
    del hf_model
    gc.collect()

    log(f"KV cache vs recompute at {s.context} tokens ...")
    recompute = kv_vs_recompute(model, s.context, s.cached_steps, seed + 3)
    log(f"  cached step {recompute['cached_step_ms']:.2f} ms, recompute {recompute['recompute_ms']:.1f} ms")

    log(f"mixed lengths: {s.batch} prompts of {s.mixed_min}..{s.prompt} tokens, contiguous and paged ...")
    mixed = mixed_lengths(model, s, seed + 4)
    if not mixed["tokens_identical"]:
        _warn(log, "mixed lengths, paged vs contiguous", mixed["first_mismatch"])
    log(f"  waste: paged {100 * mixed['paged']['waste']:.2f}%, contiguous {100 * mixed['contiguous']['waste']:.2f}%")

    log(f"GQA: Hkv {s.gqa_kv_heads} vs {s.gqa_heads}, d={s.gqa_d_model}, {s.gqa_layers} layers ...")
    gqa = gqa_cache(s, seed + 5)

    log("memory bandwidth again ...")
    bw_end = memory_bandwidth(s.bandwidth_bytes, s.bandwidth_runs)
    best = bw_start if bw_start["read_gbs"] >= bw_end["read_gbs"] else bw_end   # noise only slows a machine
    bandwidth = {**best, "start": bw_start, "end": bw_end}

    context = s.prompt + s.new_tokens / 2          # mean context over the decode steps (cache holds L+1 .. L+N-1)
    floor = streaming_floor(step_bytes(model, context), batch1, bandwidth["read_gbs"])
    del model
    gc.collect()

    # fresh processes, timed from start to exit, with the torch thread count this run set (read at its
    # start: loading numba's kernels in this process can reset the OpenMP count torch reports)
    cold = coldstart.COLD_QUICK if quick else coldstart.COLD_FULL
    threads = info["torch_threads"]
    cold_start = coldstart.cold_start(cold, threads, log)
    shape = {"vocab": s.vocab, "d_model": s.d_model, "n_layers": s.n_layers, "n_heads": s.n_heads,
             "max_positions": s.max_positions}
    end_to_end = coldstart.end_to_end(cold, shape, threads, seed + 6, log)
    for k in ("qkv", "qkv_off"):
        if not end_to_end[k]["tokens_identical_to_hf"]:
            _warn(log, f"end to end, {coldstart.E2E_NAMES[k]} vs transformers", end_to_end[k]["first_mismatch"])

    result = {
        "benchmark": "generate", "quick": bool(quick), "machine": info,
        "config": {**asdict(s), "seed": seed, "dtype": "float32", "greedy": True, "params": params,
                   "hf_attn_implementation": "sdpa", "transformers": hf_version},
        "bandwidth": bandwidth, "batch1": batch1, "batchB": batchB, "floor": floor, "recompute": recompute,
        "mixed": mixed, "gqa": gqa, "cold_start": cold_start, "end_to_end": end_to_end,
    }
    result["config"]["cold"] = asdict(cold)
    result["config"]["batch"] = s.batch
    result["goals"] = evaluate_goals(result)
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_results(result, out_dir, "generate", render, log)
    return result


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="a tiny model, short prompts (seconds)")
    parser.add_argument("--out", default=os.path.join("runs", "bench"), help="where generate.json/.md go")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and prompts (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every usable core)")


def main(argv: list[str] | None = None) -> int:
    """`python -m qkv.tools.bench.generate` / benchmarks/bench_generate.py."""
    return bench_main(argv, prog="bench_generate", description=__doc__.splitlines()[0], add_arguments=add_arguments,
                      run=lambda args: run(args.out, quick=args.quick, seed=args.seed, threads=args.threads))


if __name__ == "__main__":
    sys.exit(main())
