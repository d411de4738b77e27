"""`qkv demo`: a guided tour of qkv that prints what it does and writes its numbers to disk.

Legend: B batch, H heads, L sequence length (Lq = Lk = L here), D head dim,
d_model the toy model's width.

The tour is a list of steps (`STEPS`); each prints a header saying what it
shows and why it matters, and returns a JSON-able dict plus a Markdown section.
`run()` collects them into `summary.json` and `summary.md`. Capabilities that
land later append their own `Step` to `STEPS`.

This module also holds what the `qkv explain` and `qkv bench` commands use:

- `toy_model` / `explain_sentence` / `render_trace`: a deterministic toy
  single-head attention over a sentence (no downloads, no trained weights);
- `backend_timings`: `math` vs `sdpa` side by side in one process (agreement
  and median times), shared by the demo, `qkv bench` and
  `benchmarks/bench_backends.py`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

import qkv
from qkv.reference import Trace, explain, format_table

__all__ = [
    "run", "Step", "STEPS", "toy_embedding", "toy_model", "tokenize", "explain_sentence", "render_trace",
    "mask_picture", "backend_timings", "timing_table", "bench", "machine_info", "write_atomic",
    "EXAMPLE_SENTENCE",
]

EXAMPLE_SENTENCE = "the dog fetches the stick"


# ----------------------------------------------------------------------------
# Small utilities
# ----------------------------------------------------------------------------

def write_atomic(path, text: str) -> Path:
    """Write `text` to `path` so readers see the old file or the new one, never half of one.

    The text goes to a temporary file in the same directory (same filesystem),
    which then replaces the target in one `os.replace`.
    """
    from qkv._util.files import write_text_atomic

    return write_text_atomic(path, text)


def machine_info() -> dict:
    """Where the numbers came from: CPU model, cores, threads, library versions."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        usable = os.cpu_count()
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "numba": _numba_version(),
        "qkv": qkv.__version__,
    }


def _numba_version() -> str:
    """numba's version, or why qkv's CPU decode kernels are off."""
    from qkv import kernels
    if not kernels.ENABLED:
        return "off (QKV_NUMBA=0)"
    try:
        import numba
    except ImportError:
        return "not installed"
    return numba.__version__


def format_machine(info: dict) -> str:
    return (f"machine: {info['cpu']}; {info['usable_cores']} usable cores of {info['cpu_count']}, "
            f"torch threads {info['torch_threads']}; torch {info['torch']}, numpy {info['numpy']}, "
            f"numba {info.get('numba', '?')}, "
            f"python {info['python']}, qkv {info['qkv']}")


def _peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


# ----------------------------------------------------------------------------
# The worked example: toy single-head attention over a sentence
# ----------------------------------------------------------------------------

_SUFFIXES = ("ing", "es", "ed", "s")


def _stem(word: str) -> str:
    """A crude stem so 'dog'/'dogs' and 'fetch'/'fetches' share most of their toy vector."""
    w = word.lower()
    for suffix in _SUFFIXES:
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            return w[: -len(suffix)]
    return w


def _stable_vector(text: str, dim: int) -> np.ndarray:
    """A standard-normal vector that depends only on `text` (sha256, not Python's salted hash())."""
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(dim)


def toy_embedding(token: str, dim: int = 8) -> np.ndarray:
    """The toy embedding of one token, shape (dim,): the same word always gets the same vector.

    Mostly a vector of the word's stem plus a little of the word itself, so
    case and inflection variants ('The'/'the', 'dog'/'dogs') are close and
    unrelated words are random, nearly orthogonal directions. Entries have
    variance 1 (0.8^2 + 0.6^2 = 1).
    """
    return 0.8 * _stable_vector("stem:" + _stem(token), dim) + 0.6 * _stable_vector("word:" + token.lower(), dim)


def toy_model(tokens: Sequence[str], dim: int = 8, seed: int = 0):
    """Embeddings and projections of a toy single-head attention (not a trained model).

    Returns x (L, d_model), w_q, w_k, w_v (d_model, d_model), multiplying on the
    right (Q = x W_q). W_q, W_v are random (N(0, 1/dim), so Q, K, V entries keep
    variance ~1); W_k is W_q plus a little noise, which makes q_i . k_j roughly
    x_i A A^T x_j: a similarity kernel. A query therefore matches the keys of
    tokens with similar embeddings (the same word, the same stem). A trained
    model learns W_q, W_k that match other relations (a verb to its subject).
    """
    x = np.stack([toy_embedding(t, dim) for t in tokens])                # (L, d_model)
    g = np.random.default_rng(seed)
    w_q = g.standard_normal((dim, dim)) / np.sqrt(dim)                   # (d_model, d_k)
    w_k = w_q + 0.5 * g.standard_normal((dim, dim)) / np.sqrt(dim)       # (d_model, d_k)
    w_v = g.standard_normal((dim, dim)) / np.sqrt(dim)                   # (d_model, d_v)
    return x, w_q, w_k, w_v


_TOKEN = re.compile(r"\w+(?:'\w+)?|[^\w\s]")
MAX_TOKENS = 32


def tokenize(sentence: str) -> list[str]:
    """Words and punctuation marks, in order ("Dog's ball." -> ["Dog's", "ball", "."])."""
    if not isinstance(sentence, str):
        raise TypeError(f"sentence must be a string, got {type(sentence).__name__}")
    tokens = _TOKEN.findall(sentence)
    if not tokens:
        raise ValueError('the sentence is empty: pass some words, e.g. qkv explain "the dog fetches the stick"')
    if len(tokens) > MAX_TOKENS:
        raise ValueError(f"the sentence has {len(tokens)} tokens; the printed tables stay readable up to "
                         f"{MAX_TOKENS}: pass a shorter sentence")
    return tokens


def explain_sentence(sentence: str = EXAMPLE_SENTENCE, *, dim: int = 8, seed: int = 0,
                     causal: bool = False) -> Trace:
    """The `qkv.reference.explain` trace of the toy model on `sentence`."""
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= 64:
        raise ValueError(f"dim must be an integer in [1, 64] (the width of the printed tables), got {dim!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    tokens = tokenize(sentence)
    x, w_q, w_k, w_v = toy_model(tokens, dim, seed)
    return explain(x, w_q, w_k, w_v, tokens=tokens, causal=causal)


def _step_notes(trace: Trace) -> list[tuple[str, np.ndarray, bool, str, str]]:
    """(title, matrix, rows-and-columns-are-tokens, what it shows, why it matters) per printed table."""
    d_k = trace.Q.shape[-1]
    notes = [
        ("x: token embeddings", trace.x, False,
         "one row per token: the (toy) vector each word starts with",
         "attention only ever sees these numbers, never the words"),
        ("Q = x W_q: queries", trace.Q, False,
         "what each token is looking for",
         "row i is compared with every key to decide where token i looks"),
        ("K = x W_k: keys", trace.K, False,
         "what each token offers to be found by",
         "a query and a key that point the same way give a large dot product"),
        ("V = x W_v: values", trace.V, False,
         "what each token hands over when it is attended to",
         "the output is a mix of these rows, so V decides what information moves"),
        ("step 1: raw scores S = Q K^T", trace.raw_scores, True,
         "row = query token, column = key token, entry = q_i . k_j",
         "bigger means a better match; the numbers are not yet comparable across rows"),
        (f"step 2: scaled scores S / sqrt(d_k) = S / {np.sqrt(d_k):.3f}", trace.scaled_scores, True,
         "the scores divided by sqrt(d_k)",
         "dot products grow like sqrt(d_k); without this the softmax saturates to one-hot and its gradients vanish"),
    ]
    if not trace.allowed.all():
        notes.append(("step 2b: masked scores", trace.masked_scores, True,
                      "pairs a query may not see (here: later tokens) set to -inf",
                      "exp(-inf) = 0, so no information flows from the future: what teacher-forced training needs"))
    notes += [
        ("step 3: softmax weights", trace.weights, True,
         "each row exponentiated and normalised: a probability distribution over the keys (rows sum to 1)",
         "these are the attention weights: how much of each token's value flows into the row's token"),
        ("step 4: output = weights V", trace.output, False,
         "each token's new vector: a weighted average of the value rows",
         "this is what the next layer sees; each token now carries context from the tokens it attended to"),
    ]
    return notes


def most_attended(trace: Trace) -> list[dict]:
    """For each query position: the key position with the largest weight (first one on ties)."""
    out = []
    for i, tok in enumerate(trace.tokens):
        j = int(np.argmax(trace.weights[i]))
        out.append({"i": i, "token": tok, "j": j, "attends_to": trace.tokens[j],
                    "weight": float(trace.weights[i, j])})
    return out


def render_trace(trace: Trace, *, dim: int | None = None, seed: int = 0, causal: bool = False) -> str:
    """The trace as text: tokens, the toy model, every table with what it shows and why, the argmax."""
    dim = trace.x.shape[1] if dim is None else dim
    toks = "  ".join(f"[{i}] {t}" for i, t in enumerate(trace.tokens))
    lines = [
        f"tokens ({len(trace.tokens)}): {toks}",
        f"toy model: d_model = d_k = d_v = {dim}, seed {seed}, {'causal' if causal else 'no'} mask.",
        "  Toy numbers, not a trained model: each word's embedding is derived from a hash of the word",
        "  (words sharing a stem share most of it); W_q, W_v are random, W_k = W_q + noise, so a query",
        "  matches the keys of tokens with similar embeddings (the same word, the same stem).",
        "",
    ]
    for title, matrix, square, shows, why in _step_notes(trace):
        lines += [title, f"  shows: {shows}", f"  why:   {why}", trace.table(matrix, square), ""]
    lines.append("which token each token attends to most (largest weight in its row of step 3):")
    width = max(len(f"[{i}] {t!r}") for i, t in enumerate(trace.tokens))
    for m in most_attended(trace):
        who = f"[{m['i']}] {m['token']!r}".rjust(width)
        lines.append(f"  {who} attends to most: [{m['j']}] {m['attends_to']!r} (weight {m['weight']:.2f})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Masks as pictures
# ----------------------------------------------------------------------------

def mask_picture(mask, L: int = 8) -> list[str]:
    """An L x L mask as rows of 'x' (may attend) and '.' (masked); rows = queries, columns = keys."""
    dense = mask.to_dense(L, L)[0, 0]                                      # (L, L) bool
    return [" ".join("x" if bool(v) else "." for v in row) for row in dense]


def side_by_side(pictures: Sequence[tuple[str, list[str]]], gap: int = 4) -> str:
    """Titled pictures next to each other, each column as wide as its widest line."""
    widths = [max(len(title), *(len(r) for r in rows)) for title, rows in pictures]
    height = max(len(rows) for _, rows in pictures)
    sep = " " * gap
    out = [sep.join(t.ljust(w) for (t, _), w in zip(pictures, widths)).rstrip()]
    for i in range(height):
        out.append(sep.join((rows[i] if i < len(rows) else "").ljust(w)
                            for (_, rows), w in zip(pictures, widths)).rstrip())
    return "\n".join(out)


# ----------------------------------------------------------------------------
# Backend timings: math vs sdpa, side by side in one process
# ----------------------------------------------------------------------------

def _mask_specs(names: Sequence[str]) -> list[tuple[str, dict]]:
    """Mask names -> qkv.attention keyword arguments."""
    specs = []
    for name in names:
        if name == "none":
            specs.append((name, {}))
        elif name == "causal":
            specs.append((name, {"causal": True}))
        elif (m := re.fullmatch(r"sliding_window\((\d+)\)", name)):
            specs.append((name, {"mask": qkv.masks.sliding_window(int(m.group(1)))}))
        else:
            raise ValueError(f"unknown mask {name!r}: use 'none', 'causal' or 'sliding_window(W)'")
    return specs


def _median_ms(fn: Callable[[], object], *, warmup: int, min_runs: int, max_runs: int, budget_s: float,
               first_s: float = 0.0) -> tuple[float, int]:
    """Median wall time of `fn` in ms after `warmup` more calls, and how many runs it took.

    At least `min_runs` runs (2 when one call, `first_s`, already exceeds the budget:
    a 4096-long materialised backward takes many seconds), more while within `budget_s`.
    """
    for _ in range(warmup):
        fn()
    need = min_runs if first_s <= budget_s else min(min_runs, 2)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < need or (len(times) < max_runs and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, len(times)


def backend_timings(lengths: Sequence[int] = (512, 1024, 2048), masks: Sequence[str] = ("none", "causal"),
                    passes: Sequence[str] = ("fwd",), *, B: int = 1, H: int = 8, D: int = 64,
                    dtype: torch.dtype = torch.float32, backends: tuple[str, str] = ("math", "sdpa"),
                    warmup: int = 1, min_runs: int = 3, max_runs: int = 7, budget_s: float = 1.0,
                    seed: int = 0, verbose: bool = True) -> list[dict]:
    """Time two backends on the same inputs, and check they agree.

    For each length L, mask and pass ("fwd" or "fwd+bwd"), both backends run on
    the same q, k, v (B, H, L, D), one after the other in this process. Each
    time is the median of `min_runs`..`max_runs` calls after `warmup` calls
    (only 2 when a single call takes longer than `budget_s`).
    `max_abs_diff` compares the outputs (and, for "fwd+bwd", the gradients of
    q, k, v); `agree` holds when it is within 1e-4 x the largest magnitude
    compared (fp32 kernels that sum in different orders differ by ~1e-6 here).
    Returns one dict per (L, mask, pass) with times in ms and the ratio
    first/second backend (> 1: the second is faster).
    """
    for p in passes:
        if p not in ("fwd", "fwd+bwd"):
            raise ValueError(f"unknown pass {p!r}: use 'fwd' or 'fwd+bwd'")
    first, second = backends
    rows = []
    for L in lengths:
        g = torch.Generator().manual_seed(seed + L)
        q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=dtype) for _ in range(3))  # (B, H, L, D) each
        grad_out = torch.randn(B, H, L, D, generator=g, dtype=dtype)                   # (B, H, L, D)
        for mask_name, kwargs in _mask_specs(masks):
            for p in passes:
                results, times, runs = {}, {}, {}
                for name in backends:
                    if p == "fwd":
                        def fn(name=name):
                            with torch.no_grad():
                                return qkv.attention(q, k, v, backend=name, **kwargs)
                    else:
                        def fn(name=name):
                            qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
                            out = qkv.attention(qg, kg, vg, backend=name, **kwargs)
                            grads = torch.autograd.grad(out, (qg, kg, vg), grad_out)
                            return (out.detach(), *grads)
                    t0 = time.perf_counter()
                    res = fn()  # the first warm-up call; its result is what the backends are compared on
                    first_s = time.perf_counter() - t0
                    results[name] = res if isinstance(res, tuple) else (res,)
                    times[name], runs[name] = _median_ms(fn, warmup=max(warmup - 1, 0), min_runs=min_runs,
                                                         max_runs=max_runs, budget_s=budget_s, first_s=first_s)
                diff = max(float((a - b).abs().max()) for a, b in zip(results[first], results[second]))
                scale = max(1.0, *(float(a.abs().max()) for a in results[first]))
                row = {
                    "L": L, "mask": mask_name, "pass": p, "B": B, "H": H, "D": D, "dtype": str(dtype).replace("torch.", ""),
                    f"{first}_ms": round(times[first], 3), f"{second}_ms": round(times[second], 3),
                    "ratio": round(times[first] / times[second], 3) if times[second] > 0 else None,
                    "max_abs_diff": diff, "agree": diff <= 1e-4 * scale,
                    "runs": runs,
                }
                rows.append(row)
                if verbose:
                    print(f"  L={L:<5} {mask_name:<19} {p:<7} {first} {times[first]:9.2f} ms   "
                          f"{second} {times[second]:9.2f} ms", flush=True)
    return rows


_TABLE_COLUMNS = ("L", "mask", "pass", "{0} ms", "{1} ms", "{0}/{1}", "max|diff|", "agree")


def _table_cells(rows: Sequence[dict], backends: tuple[str, str]) -> tuple[list[str], list[list[str]]]:
    a, b = backends
    header = [c.format(a, b) for c in _TABLE_COLUMNS]
    body = []
    for r in rows:
        ratio = r["ratio"]
        body.append([str(r["L"]), r["mask"], r["pass"], f"{r[f'{a}_ms']:.2f}", f"{r[f'{b}_ms']:.2f}",
                     "-" if ratio is None else f"{ratio:.2f}x", f"{r['max_abs_diff']:.1e}",
                     "yes" if r["agree"] else "NO"])
    return header, body


def timing_table(rows: Sequence[dict], backends: tuple[str, str] = ("math", "sdpa"), *, markdown: bool = False) -> str:
    """The rows of `backend_timings` as a plain-text (or Markdown) table."""
    header, body = _table_cells(rows, backends)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, body)])


# ----------------------------------------------------------------------------
# The benchmark (`qkv bench` and benchmarks/bench_backends.py)
# ----------------------------------------------------------------------------

BENCH_LENGTHS = (512, 1024, 2048, 4096)
BENCH_QUICK_LENGTHS = (256, 512)
BENCH_MASKS = ("none", "causal", "sliding_window(256)")
BENCH_PASSES = ("fwd", "fwd+bwd")


def bench(out_dir="runs/bench", quick: bool = False, *, lengths: Sequence[int] | None = None,
          masks: Sequence[str] = BENCH_MASKS, passes: Sequence[str] = BENCH_PASSES) -> dict:
    """math vs sdpa, forward and forward+backward, fp32, B=1, H=8, D=64; writes `backends.json`.

    Prints the machine and a table (ms and ratios); returns what it wrote.
    """
    lengths = tuple(lengths) if lengths is not None else (BENCH_QUICK_LENGTHS if quick else BENCH_LENGTHS)
    info = machine_info()
    print(format_machine(info))
    print(f"math vs sdpa, fp32, B=1, H=8, D=64; L in {list(lengths)}; masks {list(masks)}; passes {list(passes)}")
    print("(median of several runs after a warm-up; ratio > 1: sdpa is faster)\n", flush=True)
    t0 = time.perf_counter()
    rows = backend_timings(lengths, masks, passes, min_runs=3, max_runs=7 if not quick else 5,
                           budget_s=1.0 if quick else 3.0)
    table = timing_table(rows)
    print("\n" + table)
    result = {
        "benchmark": "backends", "machine": info, "seconds": round(time.perf_counter() - t0, 2),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        "grid": {"lengths": list(lengths), "masks": list(masks), "passes": list(passes),
                 "B": 1, "H": 8, "D": 64, "dtype": "float32"},
        "rows": rows,
    }
    path = write_atomic(Path(out_dir) / "backends.json", json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")
    return result


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
    Step("seq2seq", "encoder-decoder: learning to reverse",
         "an encoder-decoder trained teacher-forced on sequence reversal: held-out accuracy before and after",
         "reversing needs each output position to find one far-away input: cross-attention learns exactly that "
         "lookup, which a fixed-window model cannot do", _seq2seq),
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
    json_path = write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    md_path = write_atomic(out / "summary.md", "\n".join(md) + "\n")
    print(f"\ndemo finished in {summary['seconds']:.1f} s; wrote {json_path} and {md_path}")
    return summary
