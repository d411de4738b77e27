"""`qkv bench approx`: sparse masks and kernelised attention measured against exact causal softmax attention.

Legend: B batch, H heads, L sequence length, D head dim, W local window (keys), M random features,
T training context, V vocabulary.

    python benchmarks/bench_approx.py [--quick] [--out runs/bench] [--seed 0] [--threads N]

Six ways for a query to attend to the keys before it:

    variant          keys a query sees                                              cost of a sequence
    exact            all earlier keys, softmax (backend "tiled")                     O(L^2 D)
    sliding_window   the last W keys, softmax (`masks.sliding_window(W)`)           O(L W D)
    longformer       the last W keys + the first W/8 tokens (`masks.longformer`)    O(L W D)
    bigbird          blocks of W/2: its own, the previous, the first, one random    O(L W D)
    linear           all earlier keys through phi(x) = elu(x) + 1, no softmax       O(L D^2)
    performer        all earlier keys, softmax estimated by M = 256 random features O(L M D)

The sparse variants are exact softmax over fewer keys, run by "tiled", which skips
the empty tiles; linear and performer never form scores. Measured, on the same inputs:

(a) error: ||out - exact||_F / ||exact||_F, computed in float64 against exact causal
    attention (backend "math"), on random q, k, v (several seeds: diffuse attention)
    and on the q, k, v of every layer of a byte-level model trained with
    `qkv.train.train_lm` on the default corpus (learned, mostly local attention);
(b) accuracy: the same tiny decoder trained with each variant for the same number of
    steps from the same initial weights, on associative recall (`qkv.data.RecallTask`,
    accuracy on held-out sequences) and on the character-level default corpus
    (validation bits per character). Sparse variants are an exact-attention model given
    the mask (`Decoder.forward(mask=...)`); linear and performer are
    `DecoderConfig(attention=...)` models;
(c) cost: forward time and peak memory at L = 1k, 2k, ..., 64k (B=1, H=8, D=64, fp32,
    causal, no grad) in a separate process, with a time cap per point; and the time
    of one decode step against a context of 1k..64k tokens: exact attention over a
    `ContiguousCache` against `LinearStateCache`, whose state does not grow. Timings
    run in separate processes with OMP_WAIT_POLICY=PASSIVE (unless set): on a busy
    machine, spinning OpenMP threads made small calls over 10x slower. The tiny
    models of (a) and (b) train on one thread.

Peak memory is the process's resident-set high-water mark (Linux VmHWM, reset just
before each point) above the resident size at that moment: all memory the point
touched (q, k, v, the output and every intermediate), torch allocations included.
The measuring process runs with glibc's mmap threshold fixed at 64 KiB, so freed
tensors go back to the system and one point does not hide in the next one's memory.

Timings are for reading; they depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

import qkv
from qkv import masks
from qkv._util.files import write_text_atomic
from qkv.backends.linear import Performer
from qkv.cache import ContiguousCache, LinearStateCache
from qkv.tools import harness
from qkv.tools.harness import (bench_main, format_machine, format_table, machine_info, median_ms, reset_peak, rounded,
                               status_bytes, usable_cores, write_results)

__all__ = ["VARIANTS", "Sizes", "FULL", "QUICK", "describe", "make_mask", "attend", "output_errors", "keys_per_query",
           "capture_qkv", "random_errors", "trained_errors", "recall_accuracy", "char_lm", "forward_point",
           "forward_sweep", "decode_point", "decode_sweep", "crossover", "flatness", "mask_pictures",
           "evaluate_goals", "render", "run", "main"]

VARIANTS = ("exact", "sliding_window", "longformer", "bigbird", "linear", "performer")
SPARSE = ("sliding_window", "longformer", "bigbird")
KERNELISED = ("linear", "performer")
DESCRIPTIONS = {
    "exact": "softmax over every earlier key (tiled)",
    "sliding_window": "softmax over the last W keys",
    "longformer": "last W keys + the first W/8 tokens as global tokens",
    "bigbird": "blocks of W/2: own and previous block, first block, 1 random block",
    "linear": "elu+1 kernel over every earlier key",
    "performer": "FAVOR+ estimate of softmax, 256 random features",
}
B, H, D = 1, 8, 64
FEATURES = 256
GOAL_LENGTH = 65536
GOAL_SPEEDUP = 20.0
GOAL_FLAT = 1.10
DECODE_ROUNDS = 5          # decode: exact, the fastest median of this many rounds; linear/performer, the median over all
# decode: one torch thread, one stream per core. A batch-1 step of kernelised attention is ~0.3 ms of
# small ops: a second thread only adds synchronisation (measured 0.40-0.55 ms with 2 threads against
# 0.30-0.32 with 1, and a spread over lengths set by thread wake-ups, not by the context)
DECODE_THREADS = 1
MMAP_THRESHOLD = 65536


@dataclass(frozen=True)
class Sizes:
    """Every size of one run of the study (FULL, QUICK, or smaller ones in tests)."""

    err_length: int            # (a) random inputs: L, with W = L // 8
    err_heads: int
    err_seeds: int
    corpus_bytes: int          # the default corpus, read once (byte LM and char LM)
    lm_steps: int              # (a) the byte-level model whose q, k, v are compared
    lm_context: int
    lm_batch: int
    recall_steps: int          # (b) associative recall
    recall_batch: int
    recall_pairs: tuple[int, int]
    recall_keys: int
    recall_window: int
    char_steps: int            # (b) character-level LM
    char_context: int
    char_batch: int
    d_model: int               # (b) the tiny decoder
    n_layers: int
    n_heads: int
    lengths: tuple[int, ...]   # (c) forward sweep
    window: int
    budget_s: float
    cap_s: float
    decode_lengths: tuple[int, ...]
    decode_steps: int
    picture_length: int


FULL = Sizes(err_length=1024, err_heads=8, err_seeds=3, corpus_bytes=1 << 20, lm_steps=200, lm_context=256,
             lm_batch=16, recall_steps=300, recall_batch=64, recall_pairs=(2, 6), recall_keys=8, recall_window=4,
             char_steps=250, char_context=128, char_batch=8, d_model=64, n_layers=2, n_heads=4,
             lengths=tuple(1024 * 2 ** i for i in range(7)), window=512, budget_s=1.0, cap_s=240.0,
             decode_lengths=tuple(1024 * 2 ** i for i in range(7)), decode_steps=128, picture_length=2048)
QUICK = Sizes(err_length=256, err_heads=4, err_seeds=2, corpus_bytes=1 << 18, lm_steps=20, lm_context=64,
              lm_batch=8, recall_steps=20, recall_batch=32, recall_pairs=(2, 6), recall_keys=8, recall_window=4,
              char_steps=20, char_context=64, char_batch=8, d_model=32, n_layers=2, n_heads=4,
              lengths=(1024, 2048), window=256, budget_s=0.2, cap_s=20.0, decode_lengths=(1024, 4096),
              decode_steps=16, picture_length=1024)


def _sig(x, digits: int = 3):
    """x rounded to `digits` significant digits (errors span many decades)."""
    return None if x is None else float(f"{float(x):.{digits}g}")


def _load() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


# ----------------------------------------------------------------------------
# The variants
# ----------------------------------------------------------------------------

def describe(variant: str, window: int) -> str:
    """What a variant's query sees, with the numbers of `window`."""
    W = window
    return {"sliding_window": f"softmax over the last {W} keys",
            "longformer": f"the last {W} keys + the first {max(1, W // 8)} tokens as global tokens",
            "bigbird": f"blocks of {max(1, W // 2)}: own and previous block, first block, 1 random block",
            }.get(variant, DESCRIPTIONS[variant])


def make_mask(variant: str, L: int, window: int, *, seed: int = 0):
    """The (causal) mask of a sparse variant for sequences of up to L tokens; None for the others."""
    W = window
    if variant == "sliding_window":
        return masks.sliding_window(W)
    if variant == "longformer":
        return masks.longformer(W, global_tokens=list(range(max(1, W // 8)))) & masks.causal()
    if variant == "bigbird":
        b = max(1, W // 2)
        return masks.bigbird(b, window_blocks=3, global_blocks=1, random_blocks=1, seed=seed,
                             length=-(-L // b) * b) & masks.causal()
    if variant in ("exact", *KERNELISED):
        return None
    raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")


def attend(variant: str, q: Tensor, k: Tensor, v: Tensor, *, window: int, mask=None,
           feature_map: Performer | None = None, exact_backend: str = "tiled") -> Tensor:
    """Causal attention of q, k, v (B, H, L, D) by one variant -> (B, H, L, D).

    `mask`: the sparse variant's mask (default `make_mask(variant, L, window)`; pass it to
    reuse its tile classification); `feature_map`: performer's (default Performer(256, seed=0)).
    """
    if variant == "exact":
        return qkv.attention(q, k, v, causal=True, backend=exact_backend)
    if variant in SPARSE:
        mask = make_mask(variant, k.shape[2], window) if mask is None else mask
        return qkv.attention(q, k, v, mask=mask, backend="tiled")
    if variant == "linear":
        return qkv.attention(q, k, v, causal=True, backend="linear")
    if variant == "performer":
        with (feature_map or Performer(FEATURES, seed=0)).use():
            return qkv.attention(q, k, v, causal=True, backend="performer")
    raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")


def output_errors(q: Tensor, k: Tensor, v: Tensor, *, window: int, seed: int = 0,
                  variants: Sequence[str] = VARIANTS) -> dict[str, float]:
    """||out - exact||_F / ||exact||_F of each variant on q, k, v (B, H, L, D), all in float64.

    exact = causal softmax attention by the `math` backend; the "exact" variant (tiled)
    therefore shows rounding only (~1e-16). Performer draws its features with `seed`.
    """
    q, k, v = (t.detach().to(torch.float64) for t in (q, k, v))
    with torch.no_grad():
        oracle = qkv.attention(q, k, v, causal=True, backend="math")          # (B, H, L, D)
        norm = oracle.norm()
        fm = Performer(FEATURES, seed=seed)
        return {name: float((attend(name, q, k, v, window=window, feature_map=fm) - oracle).norm() / norm)
                for name in variants}


def keys_per_query(variant: str, L: int, window: int, *, seed: int = 0) -> float:
    """Mean number of keys a query may attend to at length L (exact, linear, performer: (L + 1) / 2)."""
    mask = make_mask(variant, L, window, seed=seed)
    if mask is None:
        return (L + 1) / 2
    return float(mask.to_dense(L, L)[0, 0].sum()) / L


# ----------------------------------------------------------------------------
# (a) Output error: random inputs, and the q, k, v of a trained model
# ----------------------------------------------------------------------------

def _summary(values: Sequence[float]) -> dict:
    return {"mean": _sig(sum(values) / len(values)), "min": _sig(min(values)), "max": _sig(max(values)),
            "all": [_sig(x) for x in values]}


def random_errors(s: Sizes, seed: int = 0) -> dict:
    """Errors on standard-normal q, k, v (1, err_heads, err_length, 64), one draw per seed; W = L // 8."""
    L, W = s.err_length, max(1, s.err_length // 8)
    per = {name: [] for name in VARIANTS}
    for i in range(s.err_seeds):
        g = torch.Generator().manual_seed(seed + i)
        q, k, v = (torch.randn(1, s.err_heads, L, D, generator=g, dtype=torch.float64) for _ in range(3))
        for name, e in output_errors(q, k, v, window=W, seed=seed + i).items():
            per[name].append(e)
    return {"L": L, "H": s.err_heads, "D": D, "window": W, "seeds": s.err_seeds,
            "keys_per_query": {name: rounded(keys_per_query(name, L, W, seed=seed), 1) for name in VARIANTS},
            "errors": {name: _summary(e) for name, e in per.items()}}


@torch.no_grad()
def capture_qkv(model, tokens: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
    """q, k, v (B, H, L, Dh) of every layer's self-attention as `model(tokens)` computes them (after RoPE).

    `model` is a `qkv.models.Decoder` (pre-norm blocks): each layer's input is normed and
    projected, then the block runs as the model runs it.
    """
    Bt, L = tokens.shape
    positions = torch.arange(L)
    x = model.embed(tokens)                                                  # (B, L, d_model)
    if model.pos_embed is not None:
        x = x + model.pos_embed(positions)
    out = []
    for block in model.layers:
        a = block.self_attn
        h = block.norm1(x)
        q = a.q_proj(h).view(Bt, L, a.n_heads, a.head_dim).transpose(1, 2)     # (B, Hq, L, Dh)
        k = a.k_proj(h).view(Bt, L, a.n_kv_heads, a.head_dim).transpose(1, 2)  # (B, Hkv, L, Dh)
        v = a.v_proj(h).view(Bt, L, a.n_kv_heads, a.head_dim).transpose(1, 2)  # (B, Hkv, L, Dh)
        if a.rope is not None:
            q, k = a.rope(q, k, positions, positions)
        out.append((q, k, v))
        x = block(x, mask=masks.causal(), positions=positions if model.rope is not None else None)
    return out


def trained_errors(s: Sizes, corpus: Path, work: Path, seed: int = 0, log=print) -> dict:
    """Train the "tiny" byte-level decoder with `qkv.train.train_lm` on `corpus`, then compare the
    variants on the q, k, v of each layer over validation windows of its context; W = T // 8."""
    from qkv.train import train_lm

    log(f"  training the byte-level model: {s.lm_steps} steps, context {s.lm_context}, batch {s.lm_batch} ...")
    res = train_lm(str(corpus), out=work / "byte-lm", tokenizer="byte", preset="tiny", steps=s.lm_steps,
                   batch_size=s.lm_batch, context=s.lm_context, lr=3e-3, seed=seed, plot=False, eval_windows=8,
                   memory_limit=None, max_corpus_bytes=s.corpus_bytes)
    model = res.model.eval()
    windows = torch.cat(res.data.val_batches(8, s.lm_context, max_windows=8))[:, :-1]   # (b, T)
    W = max(1, s.lm_context // 8)
    layers = []
    for i, (q, k, v) in enumerate(capture_qkv(model, windows)):
        errs = output_errors(q, k, v, window=W, seed=seed)
        layers.append({"layer": i, "errors": {name: _sig(e) for name, e in errs.items()}})
    c = model.config
    return {"steps": s.lm_steps, "context": s.lm_context, "batch": s.lm_batch, "window": W,
            "windows": int(windows.shape[0]), "val_loss": rounded(res.val_loss), "val_bpc": rounded(res.val_bpc),
            "model": {"d_model": c.d_model, "n_layers": c.n_layers, "n_heads": c.n_heads, "head_dim": c.head_dim},
            "keys_per_query": {name: rounded(keys_per_query(name, s.lm_context, W, seed=seed), 1) for name in VARIANTS},
            "layers": layers}


# ----------------------------------------------------------------------------
# (b) Accuracy after the same training budget
# ----------------------------------------------------------------------------

def _variant_model(variant: str, s: Sizes, vocab_size: int, max_positions: int, seed: int, *, recall: bool = False):
    """The tiny decoder for one variant; the same seed gives every variant the same initial weights.

    recall=True: Llama style (RoPE, untied head) with unit-variance embeddings, matrices
    N(0, 1 / fan_in) and a small N(0, 0.02) head, with which the recall circuit forms within
    a few hundred steps (GPT-2's N(0, 0.02) everywhere sits at the plateau far longer).
    """
    from qkv.models import Decoder, DecoderConfig

    kw = dict(vocab_size=vocab_size, d_model=s.d_model, n_layers=s.n_layers, n_heads=s.n_heads,
              max_positions=max_positions, attention=variant if variant in KERNELISED else "exact")
    if recall:
        config = DecoderConfig.llama(**kw, n_kv_heads=s.n_heads, ffn_hidden=4 * s.d_model)
    else:
        config = DecoderConfig.gpt2(**kw)
    torch.manual_seed(seed)
    model = Decoder(config)
    if recall:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith("embed"):
                    p.normal_(0.0, 1.0)
                elif name.startswith("lm_head"):
                    p.normal_(0.0, 0.02)
                elif p.dim() >= 2:
                    p.normal_(0.0, p.shape[1] ** -0.5)
    return model


def recall_accuracy(s: Sizes, seed: int = 0, log=print, variants: Sequence[str] = VARIANTS) -> dict:
    """Each variant's tiny decoder trained `recall_steps` steps on associative recall (loss on the
    answer only), then its accuracy on 1000 held-out sequences. W = recall_window."""
    from qkv.data import RecallTask
    from qkv.train import fit

    lo, hi = s.recall_pairs
    task = RecallTask(n_keys=s.recall_keys, n_values=s.recall_keys, min_pairs=lo, max_pairs=hi)
    L, W = task.max_len, s.recall_window
    held = task.held_out(1000)
    rows_idx = torch.arange(len(held.ids))
    out = {}
    for variant in variants:
        mask = make_mask(variant, L, W, seed=seed)
        model = _variant_model(variant, s, task.vocab_size, L, seed, recall=True)

        def loss_fn(m, b, mask=mask):
            logits = m(b.ids, mask=mask)                                       # (B, L, V)
            last = logits[torch.arange(len(b.ids)), b.lengths - 1]             # (B, V) at the query key
            return F.cross_entropy(last, b.answer), len(b.ids)

        hist = fit(model, task.stream(s.recall_batch, seed=seed + 1), steps=s.recall_steps, lr=3e-3,
                   warmup=max(1, s.recall_steps // 10), weight_decay=0.0, seed=seed, loss_fn=loss_fn)
        model.eval()
        with torch.no_grad():
            logits = model(held.ids, mask=mask)[rows_idx, held.lengths - 1]     # (N, V)
        acc = float((logits.argmax(-1) == held.answer).float().mean())
        if mask is None:
            in_view = 1.0
        else:
            dense = mask.to_dense(L, L)[0, 0]                                   # (L, L) bool
            in_view = float(dense[held.lengths - 1, held.value_pos].float().mean())
        tail = hist.loss[-max(1, len(hist.loss) // 10):]
        out[variant] = {"accuracy": rounded(acc), "final_loss": rounded(sum(tail) / len(tail)),
                        "seconds": rounded(hist.seconds, 1),
                        "value_in_view": rounded(in_view)}
        log(f"  recall {variant:<15} accuracy {acc:.3f}  ({hist.seconds:.0f} s)")
    return {"task": {"n_keys": s.recall_keys, "n_values": s.recall_keys, "pairs": [lo, hi], "max_len": L},
            "window": W, "steps": s.recall_steps, "batch": s.recall_batch, "lr": 3e-3, "held_out": len(held.ids),
            "chance": rounded(1 / s.recall_keys), "model": "Llama-style decoder (RoPE; embeddings N(0, 1), matrices "
            "N(0, 1/fan_in), head N(0, 0.02))", "rows": out}


def char_lm(s: Sizes, text: str, seed: int = 0, log=print, variants: Sequence[str] = VARIANTS) -> dict:
    """Each variant's tiny decoder trained `char_steps` steps on the character-level text, then its
    validation loss and bits per character. W = char_context // 8."""
    from qkv.data import TextData
    from qkv.train import fit

    ds = TextData.build(text, "char", val_fraction=0.05)
    T, W = s.char_context, max(1, s.char_context // 8)
    val = ds.val_batches(s.char_batch, T, max_windows=32)                      # [(b, T + 1)]
    out = {}
    for variant in variants:
        mask = make_mask(variant, T, W, seed=seed)
        model = _variant_model(variant, s, ds.tokenizer.vocab_size, T, seed)

        def loss_fn(m, x, mask=mask):
            logits = m(x[:, :-1], mask=mask)                                   # (B, T, V)
            return F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()), x[:, 1:].numel()

        hist = fit(model, lambda step: ds.batch(step, s.char_batch, T, seed=seed), steps=s.char_steps, lr=3e-3,
                   warmup=max(1, s.char_steps // 10), weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, seed=seed,
                   loss_fn=loss_fn)
        model.eval()
        total, n = 0.0, 0
        with torch.no_grad():
            for x in val:
                loss, k = loss_fn(model, x)
                total, n = total + float(loss) * k, n + k
        vl = total / n
        out[variant] = {"val_loss": rounded(vl), "val_bpc": rounded(vl * ds.tokens_per_char / math.log(2)),
                        "seconds": rounded(hist.seconds, 1)}
        log(f"  char LM {variant:<15} val {vl:.3f} nats, {out[variant]['val_bpc']:.3f} bpc  ({hist.seconds:.0f} s)")
    return {"steps": s.char_steps, "context": T, "batch": s.char_batch, "window": W, "lr": 3e-3,
            "vocab_size": ds.tokenizer.vocab_size, "val_tokens": n, "rows": out}


# ----------------------------------------------------------------------------
# (c) Cost: forward time and peak memory, in a separate process
# ----------------------------------------------------------------------------

def forward_point(variant: str, L: int, *, window: int, budget_s: float, seed: int = 0) -> dict:
    """Time one causal forward of `variant` at length L (B=1, H=8, D=64, fp32, no grad) and its peak memory.

    Peak: VmHWM reset before q, k, v are drawn, minus the resident size then (None where
    /proc cannot do this). The first call includes building the variant's mask tiles or
    features; ms is the median of further calls within `budget_s` (or the first call alone
    when it takes half the budget).
    """
    gc.collect()
    mask = make_mask(variant, L, window, seed=seed)
    fm = Performer(FEATURES, seed=seed)
    hwm = reset_peak() and status_bytes("VmHWM") is not None
    base = status_bytes("VmRSS") if hwm else None
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))        # (B, H, L, D) each

    def fn():
        with torch.no_grad():
            return attend(variant, q, k, v, window=window, mask=mask, feature_map=fm)

    t0 = time.perf_counter()
    out = fn()
    first_s = time.perf_counter() - t0
    peak = status_bytes("VmHWM") if hwm else None
    tensor_bytes = 4 * q.numel() * q.element_size()                           # q, k, v, out
    del out
    if first_s >= budget_s / 2:
        ms, runs = first_s * 1e3, 1
    else:
        ms, runs = median_ms(fn, warmup=0, min_runs=3, max_runs=9, budget_s=budget_s - first_s, first_s=first_s)
    row = {"variant": variant, "L": L, "ms": rounded(ms, 3), "first_ms": rounded(first_s * 1e3, 3), "runs": runs,
           "peak_bytes": None if peak is None else peak - base, "tensor_bytes": tensor_bytes}
    row["work_bytes"] = None if peak is None else row["peak_bytes"] - tensor_bytes
    if mask is not None:
        row["tiles_skipped"] = rounded(mask.block_mask(L, L, block=qkv.backends.get("tiled").block).sparsity, 4)
    return row


def _projected_s(variant: str, last: dict | None, L: int) -> float | None:
    """Seconds the next point should take, from the last one: quadratic for exact, linear otherwise."""
    if not last or last.get("ms") is None:
        return None
    power = 2 if variant == "exact" else 1
    return last["ms"] / 1e3 * (L / last["L"]) ** power


def _forward_child(spec: dict) -> None:
    """The measuring process: one JSON line per point ({"start": ...} before each), lengths ascending."""
    torch.set_num_threads(spec["threads"])
    window, budget_s, cap_s, seed = spec["window"], spec["budget_s"], spec["cap_s"], spec["seed"]
    small = [torch.randn(B, H, 256, D) for _ in range(3)]
    for variant in spec["variants"]:                  # thread pool, kernels, lazy imports: not part of any point
        with torch.no_grad():
            attend(variant, *small, window=min(window, 128))
    del small
    last: dict[str, dict] = {}
    for L in spec["lengths"]:
        for variant in spec["variants"]:
            if [variant, L] in spec.get("skip", []):
                continue
            proj = _projected_s(variant, last.get(variant), L)
            if proj is not None and proj > cap_s:
                print(json.dumps({"variant": variant, "L": L, "skipped": f"projected {proj:.0f} s > cap {cap_s:g} s"}),
                      flush=True)
                last[variant] = {"L": L, "ms": proj * 1e3}
                continue
            print(json.dumps({"start": [variant, L]}), flush=True)
            row = forward_point(variant, L, window=window, budget_s=budget_s, seed=seed)
            last[variant] = row
            print(json.dumps(row), flush=True)


def _child_env() -> dict:
    """The measuring processes' environment: freed tensors go back to the system (honest peaks), and
    idle OpenMP threads sleep instead of spinning (on a busy machine spinning threads made small
    calls over 10x slower); a value the caller set wins."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    src = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _read_lines(proc: subprocess.Popen, q: queue.Queue) -> None:
    for line in proc.stdout:
        q.put(line)
    q.put(None)


def _collect(proc: subprocess.Popen, err, rows: dict, todo: list, remaining: list, first_wait: float,
             wait_point: float, log) -> None:
    """Read one forward-timing process's lines into `rows` until it ends or a point runs past its wait."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc, lines), daemon=True).start()

    def last_error() -> str:
        err.seek(0)
        tail = err.read().strip().splitlines()
        return tail[-1] if tail else f"exit status {proc.returncode}"

    current, wait = None, first_wait                  # the first point also waits for imports and warm-up
    while True:
        try:
            line = lines.get(timeout=wait)
        except queue.Empty:
            proc.kill()
            v, L = current if current else remaining[0]
            rows[(v, L)] = {"variant": v, "L": L, "error": f"timed out (> {wait:g} s); killed"}
            for v2, L2 in todo:                       # the longer ones would too
                if v2 == v and L2 > L and (v2, L2) not in rows:
                    rows[(v2, L2)] = {"variant": v2, "L": L2, "skipped": f"L={L} timed out"}
            log(f"  {v:<15} L={L:>6}: timed out after {wait:g} s")
            return
        if line is None:                              # the process ended
            proc.wait()
            if current is not None:
                v, L = current
                rows[(v, L)] = {"variant": v, "L": L, "error": f"the process died: {last_error()}"[:300]}
                log(f"  {v:<15} L={L:>6}: {rows[(v, L)]['error']}")
            elif proc.returncode != 0:
                raise RuntimeError(f"the forward-timing process failed: {last_error()}")
            return
        msg = json.loads(line)
        if "start" in msg:
            current, wait = tuple(msg["start"]), wait_point
            continue
        key = (msg["variant"], msg["L"])
        rows[key], current = msg, None
        if "ms" in msg:
            mem = "" if msg.get("peak_bytes") is None else f", peak {msg['peak_bytes'] / 2**20:.0f} MiB"
            log(f"  {key[0]:<15} L={key[1]:>6}: {msg['ms']:.1f} ms{mem}")
        else:
            log(f"  {key[0]:<15} L={key[1]:>6}: {msg.get('skipped')}")


def forward_sweep(lengths: Sequence[int], *, window: int, budget_s: float, cap_s: float, threads: int,
                  seed: int = 0, variants: Sequence[str] = VARIANTS, log=print, startup_s: float = 120.0,
                  slack_s: float = 30.0) -> list[dict]:
    """Every (variant, L) point, lengths ascending, in a separate process (restarted after a point is killed).

    A point that runs past `cap_s` (+ `slack_s` for its set-up; the first also waits
    `startup_s` for imports and warm-up) is killed and recorded as timed out; the longer
    lengths of that variant are then skipped. A point the previous length of its variant
    projects past the cap (quadratic growth for exact, linear for the others) is skipped
    without running. Returns one row per (variant, L), in (L, variant) order.
    """
    todo = [(v, L) for L in sorted(lengths) for v in variants]
    rows: dict[tuple, dict] = {}
    env = _child_env()
    while True:
        remaining = [(v, L) for v, L in todo if (v, L) not in rows]
        if not remaining:
            break
        spec = {"variants": list(variants), "lengths": sorted({L for _, L in remaining}), "window": window,
                "budget_s": budget_s, "cap_s": cap_s, "threads": threads, "seed": seed,
                "skip": [[v, L] for (v, L) in todo if (v, L) in rows]}
        with tempfile.TemporaryFile(mode="w+") as err:
            proc = subprocess.Popen([sys.executable, "-m", "qkv.tools.bench.approx", "--forward-child",
                                     json.dumps(spec)], stdout=subprocess.PIPE, stderr=err, text=True, env=env)
            try:
                _collect(proc, err, rows, todo, remaining, cap_s + startup_s, cap_s + slack_s, log)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
        if all((v, L) in rows for v, L in todo):
            break
        if not any((v, L) in rows for v, L in remaining):   # no progress at all: give up rather than loop
            for v, L in remaining:
                rows[(v, L)] = {"variant": v, "L": L, "error": "the timing process stopped"}
    return [rows[p] for p in todo]


# ----------------------------------------------------------------------------
# (c) Decode: one token against a growing context
# ----------------------------------------------------------------------------

def _decode_cache(variant: str, L: int, capacity: int, seed: int, g: torch.Generator):
    """A cache of `variant` holding a random context of L tokens, and the backend that decodes it."""
    if variant == "exact":
        cache, backend = ContiguousCache(B, H, D, capacity), "auto"
    elif variant == "linear":
        cache, backend = LinearStateCache(B, H, D), "linear"
    elif variant == "performer":
        cache, backend = LinearStateCache(B, H, D, feature_map=Performer(FEATURES, seed=seed)), "performer"
    else:
        raise ValueError(f"decode variants are exact, linear and performer, got {variant!r}")
    with torch.no_grad():
        for start in range(0, L, 8192):               # the context, in pieces (a performer state's features)
            n = min(8192, L - start)
            cache.append(torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g))
    return cache, backend


def _timed_step(cache, backend: str, qkv_new: torch.Tensor) -> float:
    t0 = time.perf_counter()
    cache.attention(qkv_new[0], qkv_new[1], qkv_new[2], backend=backend)
    return time.perf_counter() - t0


def _decode_row(variant: str, L: int, times: list, cache) -> dict:
    held = cache.used_bytes if variant == "exact" else cache.nbytes
    return {"variant": variant, "L": L, "ms": rounded(median(times) * 1e3, 4), "min_ms": rounded(min(times) * 1e3, 4),
            "steps": len(times), "bytes": int(held)}


def decode_point(variant: str, L: int, *, steps: int, seed: int = 0, warmup: int = 3) -> dict:
    """Median time of one decode step (1 new token, B=1, H=8, D=64, fp32) after a context of L tokens.

    exact: a `ContiguousCache` (qkv's decode path over all L keys); linear / performer: a
    `LinearStateCache`. Also the bytes each holds for the context (tensor sizes).
    """
    g = torch.Generator().manual_seed(seed)
    cache, backend = _decode_cache(variant, L, L + warmup + steps, seed, g)
    new = torch.randn(warmup + steps, 3, B, H, 1, D, generator=g)              # q, k, v of each step
    with torch.no_grad():
        times = [_timed_step(cache, backend, new[i]) for i in range(warmup + steps)][warmup:]
    return _decode_row(variant, L, times, cache)


def decode_states_interleaved(variant: str, lengths: Sequence[int], *, steps: int, rounds: int,
                              seed: int = 0, warmup: int = 3) -> list[dict]:
    """`decode_point` for a kernelised variant at every length at once: one state per length, stepped
    in turn (the first length of the turn rotating), so a burst of load on a shared machine falls on
    every length alike. The states are a few hundred KB each; their step does not read the context.
    Median over rounds x steps steps per length."""
    if variant not in KERNELISED:
        raise ValueError(f"interleaved decode is for the constant-size states {KERNELISED}, got {variant!r}")
    g = torch.Generator().manual_seed(seed)
    caches = {L: _decode_cache(variant, L, 0, seed, g) for L in lengths}
    n = warmup + rounds * steps
    new = torch.randn(n, 3, B, H, 1, D, generator=g)
    times: dict = {L: [] for L in lengths}
    order = list(lengths)
    with torch.no_grad():
        for i in range(n):
            turn = order[i % len(order):] + order[:i % len(order)]
            for L in turn:
                t = _timed_step(*caches[L], new[i])
                if i >= warmup:
                    times[L].append(t)
    return [_decode_row(variant, L, times[L], caches[L][0]) for L in lengths]


def _decode_child(spec: dict) -> None:
    """The decode-measuring process: one JSON line per (L, variant).

    exact: every length in turn, `rounds` times, each keeping its fastest median (its cache is
    up to 256 MiB, and a step reads all of it: stepping several at once would evict each other's
    from the CPU caches). linear / performer: `decode_states_interleaved`."""
    torch.set_num_threads(spec["threads"])
    for variant in ("exact", *KERNELISED):            # thread pool and kernels (numba's too) warm up first
        decode_point(variant, 64, steps=2, seed=spec["seed"])
    rounds = spec.get("rounds", DECODE_ROUNDS)
    best: dict = {}
    for _ in range(rounds):
        for L in spec["lengths"]:
            gc.collect()
            row = decode_point("exact", L, steps=spec["steps"], seed=spec["seed"])
            best[L] = row if L not in best or row["ms"] < best[L]["ms"] else best[L]
    rows = {("exact", L): {**best[L], "rounds": rounds} for L in spec["lengths"]}
    for variant in KERNELISED:
        gc.collect()
        for row in decode_states_interleaved(variant, spec["lengths"], steps=spec["steps"], rounds=rounds,
                                             seed=spec["seed"]):
            rows[(variant, row["L"])] = {**row, "rounds": rounds}
    for L in spec["lengths"]:
        for variant in ("exact", *KERNELISED):
            print(json.dumps(rows[(variant, L)]), flush=True)


def decode_sweep(lengths: Sequence[int], *, steps: int, threads: int, seed: int = 0, log=print,
                 timeout_s: float = 900.0) -> list[dict]:
    """`decode_point` for exact, linear and performer at every context length, in a separate process
    (the environment of the forward sweep). Returns the rows in (L, variant) order."""
    spec = {"lengths": sorted(lengths), "steps": steps, "threads": threads, "seed": seed}
    try:
        proc = subprocess.run([sys.executable, "-m", "qkv.tools.bench.approx", "--decode-child", json.dumps(spec)],
                              capture_output=True, text=True, env=_child_env(), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the decode-timing process took longer than {timeout_s:g} s") from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise RuntimeError(f"the decode-timing process failed: {tail}")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for r in rows:
        log(f"  decode {r['variant']:<10} L={r['L']:>6}: {r['ms']:.3f} ms/token")
    return rows


# ----------------------------------------------------------------------------
# Summaries: crossover, flatness, goals
# ----------------------------------------------------------------------------

def crossover(exact_ms: dict, other_ms: dict) -> dict:
    """From which length `other` is faster than exact at every longer length measured by both.

    {"L": that length or None (never), "from_first": whether it holds from the first common
    length (the crossover is then at or below it), "lengths": the common lengths}.
    """
    common = sorted(L for L in exact_ms if exact_ms[L] is not None and other_ms.get(L) is not None)
    cross = None
    for L in reversed(common):
        if other_ms[L] < exact_ms[L]:
            cross = L
        else:
            break
    return {"L": cross, "from_first": bool(common) and cross == common[0], "lengths": common}


def flatness(ms_by_L: dict) -> dict:
    """max / min of the per-token times over the lengths measured, and whether it is within GOAL_FLAT."""
    vals = [m for m in ms_by_L.values() if m is not None]
    if len(vals) < 2:
        return {"ratio": None, "flat": None, "lengths": sorted(ms_by_L)}
    ratio = max(vals) / min(vals)
    return {"ratio": rounded(ratio, 3), "flat": ratio <= GOAL_FLAT, "lengths": sorted(ms_by_L)}


def _by_L(rows: Sequence[dict], variant: str) -> dict:
    return {r["L"]: r.get("ms") for r in rows if r["variant"] == variant}


def _goal(goal: str, measured, target: float, direction: str, L=None) -> dict:
    met = None if measured is None else (measured >= target if direction == ">=" else measured <= target)
    return {"goal": goal, "L": L, "measured": rounded(measured, 3), "target": target, "direction": direction,
            "met": met}


def evaluate_goals(result: dict) -> list[dict]:
    fwd = result["forward"]
    L = fwd["goal_length"]
    ex, li = _by_L(fwd["rows"], "exact").get(L), _by_L(fwd["rows"], "linear").get(L)
    speed = ex / li if ex and li else None
    flat = result["decode"]["flatness"]["linear"]
    lengths = result["decode"]["lengths"]
    return [_goal("linear forward speed-up over exact tiled causal", speed, GOAL_SPEEDUP, ">=", L),
            _goal(f"linear decode per token max/min over {lengths[0]}..{lengths[-1]}", flat["ratio"], GOAL_FLAT,
                  "<=")]


# ----------------------------------------------------------------------------
# Mask pictures
# ----------------------------------------------------------------------------

def mask_pictures(out_dir, L: int, window: int, *, seed: int = 0) -> dict[str, str]:
    """approx_mask_{pattern}.png: each sparse pattern at length L and its tiles as `tiled` classifies them."""
    from qkv import viz

    tile = qkv.backends.get("tiled").block
    pictures = {name: (make_mask(name, L, window, seed=seed), describe(name, window)) for name in SPARSE}
    dil = max(1, window // 4)
    pictures["dilated_window"] = (masks.dilated_window(dil, 4), f"{dil} keys spaced 4 apart (Longformer's dilation)")
    out = {}
    for name, (mask, what) in pictures.items():
        path = viz.mask_picture(mask, L, L, Path(out_dir) / f"approx_mask_{name}.png", tile=tile,
                                title=f"{name}: {what}; L = {L}")
        out[name] = str(path)
    return out


# ----------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------

def _e(x) -> str:
    return "n/a" if x is None else f"{x:.1e}"


def _f(x, fmt: str = "{:.3f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _ms(x) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 0.1 else f"{x:.3f}"


def _quality_cells(result: dict) -> list[list[str]]:
    rnd, tr = result["errors"]["random"], result["errors"]["trained"]
    rec, lm = result["accuracy"]["recall"], result["accuracy"]["char_lm"]
    body = []
    for name in VARIANTS:
        body.append([name, _f(rnd["keys_per_query"][name], "{:.0f}"), _e(rnd["errors"][name]["mean"]),
                     *[_e(layer["errors"][name]) for layer in tr["layers"]],
                     _f(rec["rows"][name]["accuracy"]), _f(rec["rows"][name]["value_in_view"], "{:.2f}"),
                     _f(lm["rows"][name]["val_bpc"])])
    return body


def _quality_header(result: dict) -> list[str]:
    rnd, tr = result["errors"]["random"], result["errors"]["trained"]
    return (["variant", f"keys/query (L={rnd['L']})", f"err random (L={rnd['L']})"]
            + [f"err trained L{layer['layer']} (T={tr['context']})" for layer in tr["layers"]]
            + ["recall acc", "value in view", "char bpc"])


def _forward_cells(result: dict) -> tuple[list[str], list[list[str]], list[list[str]]]:
    fwd = result["forward"]
    rows = {(r["variant"], r["L"]): r for r in fwd["rows"]}
    header = ["L", *VARIANTS]
    times, mem = [], []
    for L in fwd["lengths"]:
        ex = rows.get(("exact", L), {}).get("ms")
        t_row, m_row = [str(L)], [str(L)]
        for name in VARIANTS:
            r = rows.get((name, L), {})
            if r.get("ms") is None:
                t_row.append("timeout" if "timed out" in r.get("error", "") else
                             "skipped" if "skipped" in r else "error" if "error" in r else "-")
                m_row.append("-")
                continue
            x = f" ({ex / r['ms']:.1f}x)" if ex and name != "exact" else ""
            t_row.append(_ms(r["ms"]) + x)
            m_row.append("n/a" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**20:.0f}")
        times.append(t_row)
        mem.append(m_row)
    return header, times, mem


def _decode_cells(result: dict) -> list[list[str]]:
    dec = result["decode"]
    rows = {(r["variant"], r["L"]): r for r in dec["rows"]}
    body = []
    for L in dec["lengths"]:
        e, li, p = (rows.get((v, L), {}) for v in ("exact", "linear", "performer"))
        body.append([str(L), _ms(e.get("ms")), _ms(li.get("ms")), _ms(p.get("ms")),
                     _f(e.get("bytes", 0) / 2**20, "{:.1f}"), _f(li.get("bytes", 0) / 2**10, "{:.0f}"),
                     _f(p.get("bytes", 0) / 2**10, "{:.0f}")])
    return body


_DECODE_HEADER = ("context L", "exact ms/token", "linear ms/token", "performer ms/token", "exact K/V MiB",
                  "linear state KiB", "performer state KiB")


def _crossover_text(c: dict) -> str:
    if not c["lengths"]:
        return "n/a (no common lengths)"
    if c["L"] is None:
        return f"never up to L={c['lengths'][-1]}"
    return f"<= {c['L']} (faster at every length measured)" if c["from_first"] else f"L = {c['L']}"


def _goal_cells(goals: Sequence[dict]) -> list[list[str]]:
    body = []
    for g in goals:
        verdict = "n/a" if g["met"] is None else ("met" if g["met"] else "NOT met")
        unit = "x" if g["direction"] == ">=" else ""
        body.append([g["goal"], "-" if g["L"] is None else str(g["L"]), _f(g["measured"], "{:.2f}") + unit,
                     f"{g['direction']} {g['target']:g}{unit}", verdict])
    return body


_GOAL_HEADER = ("goal", "L", "measured", "target", "verdict")


def _notes(result: dict) -> list[str]:
    c, tr, rec, lm = result["config"], result["errors"]["trained"], result["accuracy"]["recall"], \
        result["accuracy"]["char_lm"]
    fwd, dec = result["forward"], result["decode"]
    load = result["load"]
    notes = [
        f"timings: B={B}, H={H}, D={D}, fp32, causal, {c['threads']} torch thread(s); forward ms = median after a "
        f"first call (which builds mask tiles / features), budget {c['budget_s']:g} s a point, cap {c['cap_s']:g} s "
        f"a point; (Nx) = exact ms / variant ms. Load average (1, 5, 15 min) at the start {load['start']}, at the "
        f"end {load['end']}: the machine is shared, so the timings are noisy. Timings run in separate processes "
        f"with OMP_WAIT_POLICY={c['omp_wait_policy']}",
        f"sparse windows: forward W = {c['window']} (longformer globals {max(1, c['window'] // 8)}, bigbird blocks "
        f"of {max(1, c['window'] // 2)}); errors on random inputs W = L/8 = {result['errors']['random']['window']}; "
        f"trained model W = T/8 = {tr['window']}; recall W = {rec['window']}; char LM W = {lm['window']}",
        f"peak memory: {fwd['memory_method']}",
        f"decode: exact = ContiguousCache (qkv's decode path over all L keys), linear/performer = LinearStateCache; "
        f"exact: median of {dec['steps']} steps, the fastest of {DECODE_ROUNDS} rounds over the lengths; "
        f"linear/performer: one state per length stepped in turn, median of {DECODE_ROUNDS} x {dec['steps']} "
        f"steps; {dec.get('threads', DECODE_THREADS)} torch thread(s); K/V and state bytes are tensor sizes",
        f"errors: ||out - exact||_F / ||exact||_F in float64 vs causal softmax by the math backend; random: mean of "
        f"{result['errors']['random']['seeds']} seeds; trained: byte-level 'tiny' decoder ({tr['model']['n_layers']} "
        f"layers, {tr['model']['n_heads']} heads of {tr['model']['head_dim']}) after {tr['steps']} steps of "
        f"qkv.train.train_lm (val {tr['val_bpc']} bits/char), its q, k, v on {tr['windows']} validation windows",
        f"recall: RecallTask(keys = values = {rec['task']['n_keys']}, "
        f"{rec['task']['pairs'][0]}..{rec['task']['pairs'][1]} pairs), {rec['steps']} steps of batch "
        f"{rec['batch']}, {rec['model']}, d={c['d_model']}, "
        f"{c['n_layers']} layers; chance {rec['chance']}; 'value in view' = share of held-out queries whose answer "
        f"token the mask lets the last position see directly",
        f"char LM: {lm['steps']} steps of batch {lm['batch']} x {lm['context']} characters of the corpus "
        f"({c['corpus']}, first {c['corpus_bytes'] // 1024} KiB; also the byte-level model's), bits per character "
        f"on {lm['val_tokens']} validation characters",
    ]
    for name in ("linear", "performer", *SPARSE):
        notes.append(f"forward crossover {name} vs exact: {_crossover_text(fwd['crossover'][name])}")
    for name in KERNELISED:
        notes.append(f"decode crossover {name} vs exact: {_crossover_text(dec['crossover'][name])}; "
                     f"flatness max/min {_f(dec['flatness'][name]['ratio'], '{:.3f}')}")
    if result.get("pictures"):
        notes.append("mask pictures: " + ", ".join(Path(p).name for p in result["pictures"].values()))
    return notes


def render(result: dict, *, markdown: bool = False) -> str:
    """The result as text (or Markdown): quality, forward time and memory, decode, goals, notes."""
    quality = format_table(_quality_header(result), _quality_cells(result), markdown=markdown)
    header, times, mem = _forward_cells(result)
    times_t = format_table(header, times, left=(), markdown=markdown)
    mem_t = format_table(header, mem, left=(), markdown=markdown)
    dec = format_table(_DECODE_HEADER, _decode_cells(result), left=(), markdown=markdown)
    goals = format_table(_GOAL_HEADER, _goal_cells(result["goals"]), left=(0, 4), markdown=markdown)
    notes = _notes(result)
    if markdown:
        return "\n".join([
            f"# qkv approximate attention study{' (quick)' if result['quick'] else ''}", "",
            format_machine(result["machine"]) + ".", "",
            "## Quality: error against exact causal attention, accuracy after the same training", "", quality, "",
            "## Forward ms (speed-up over exact)", "", times_t, "",
            "## Forward peak memory, MiB", "", mem_t, "",
            "## Decode, one token after L tokens of context", "", dec, "",
            "## Goals", "", goals, "",
            *[f"- {n}" for n in notes], "",
        ])
    return "\n".join(["quality (error vs exact causal softmax; accuracy after the same training):", quality, "",
                      "forward ms (speed-up over exact):", times_t, "", "forward peak memory, MiB:", mem_t, "",
                      "decode, one token after L tokens of context:", dec, "", "goals:", goals, "", *notes])


# ----------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------

def run(out_dir="runs/bench", quick: bool = False, *, seed: int = 0, threads: int | None = None,
        sizes: Sizes | None = None, corpus=None, verbose: bool = True) -> dict:
    """Run the study; print the tables; write approx.json, approx.md and approx_mask_*.png into `out_dir`.

    `quick`: small sizes (well under a minute). `threads`: torch threads for the timings
    (default: every usable core); the tiny models train on one thread. `sizes` overrides
    both presets. `corpus`: a text file to train on instead of the default corpus (the
    first `sizes.corpus_bytes` characters). Returns what was written to approx.json.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be None (every usable core) or an int >= 1, got {threads!r}")
    if sizes is not None and not isinstance(sizes, Sizes):
        raise TypeError(f"sizes must be a qkv.tools.bench.approx.Sizes, got {type(sizes).__name__}")
    s = sizes or (QUICK if quick else FULL)
    threads = threads or usable_cores()
    log = (lambda m: print(m, flush=True)) if verbose else (lambda m: None)
    started = time.perf_counter()
    load_start = _load()
    info = machine_info()
    info["torch_threads"] = threads
    log(format_machine(info))
    log(f"approximate attention study{' (quick)' if quick else ''}: {', '.join(VARIANTS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    from qkv import data as _data

    with tempfile.TemporaryDirectory(prefix="qkv-approx-") as tmp, harness.threads(1):
        work = Path(tmp)
        log(f"(a) errors on random inputs, L={s.err_length} ...")
        rnd = random_errors(s, seed)
        if corpus is None:
            log(f"reading the default corpus ({s.corpus_bytes // 1024} KiB) ...")
            text = _data.default_corpus(s.corpus_bytes)
        else:
            text = _data.load_corpus(corpus)[:s.corpus_bytes]
        corpus_file = work / "corpus.txt"
        write_text_atomic(corpus_file, text)
        log("(a) errors on a trained model's q, k, v ...")
        trained = trained_errors(s, corpus_file, work, seed, log)
        log(f"(b) associative recall, {s.recall_steps} steps per variant ...")
        recall = recall_accuracy(s, seed, log)
        log(f"(b) character-level LM, {s.char_steps} steps per variant ...")
        lm = char_lm(s, text, seed, log)
    log(f"(c) forward time and peak memory, L in {list(s.lengths)}, {threads} thread(s) ...")
    rows = forward_sweep(s.lengths, window=s.window, budget_s=s.budget_s, cap_s=s.cap_s, threads=threads, seed=seed,
                         log=log)
    log(f"(c) decode per token, context in {list(s.decode_lengths)}, {DECODE_THREADS} thread(s) ...")
    dec_rows = decode_sweep(s.decode_lengths, steps=s.decode_steps, threads=DECODE_THREADS, seed=seed, log=log)
    pictures = mask_pictures(out, s.picture_length, s.window, seed=seed)

    exact_fwd = _by_L(rows, "exact")
    exact_dec = _by_L(dec_rows, "exact")
    result = {
        "benchmark": "approx", "quick": bool(quick), "machine": info,
        "load": {"start": load_start, "end": _load()},
        "config": {**asdict(s), "seed": seed, "threads": threads,
                   "corpus": "default (Python standard library sources)" if corpus is None else str(corpus),
                   "B": B, "H": H, "D": D, "dtype": "float32", "features": FEATURES, "variants": DESCRIPTIONS,
                   "tiled_block": list(qkv.backends.get("tiled").block),
                   "omp_wait_policy": _child_env()["OMP_WAIT_POLICY"]},
        "errors": {"random": rnd, "trained": trained},
        "accuracy": {"recall": recall, "char_lm": lm},
        "forward": {"lengths": list(s.lengths), "rows": rows,
                    "goal_length": GOAL_LENGTH if GOAL_LENGTH in s.lengths else max(s.lengths),
                    "memory_method": "VmHWM (Linux) reset before each point minus VmRSS then, in a separate process "
                                     f"with MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}; includes q, k, v and the output",
                    "crossover": {name: crossover(exact_fwd, _by_L(rows, name)) for name in VARIANTS[1:]}},
        "decode": {"lengths": list(s.decode_lengths), "steps": s.decode_steps, "threads": DECODE_THREADS,
                   "rows": dec_rows,
                   "flatness": {name: flatness(_by_L(dec_rows, name)) for name in ("exact", *KERNELISED)},
                   "crossover": {name: crossover(exact_dec, _by_L(dec_rows, name)) for name in KERNELISED}},
        "pictures": pictures,
    }
    result["goals"] = evaluate_goals(result)
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_results(result, out, "approx", render, log)
    return result


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="small sizes (well under a minute)")
    parser.add_argument("--out", default=os.path.join("runs", "bench"), help="where approx.json/.md go")
    parser.add_argument("--seed", type=int, default=0, help="seed of inputs, weights and data (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the timings (default: all)")


def main(argv: list[str] | None = None) -> int:
    """`python -m qkv.tools.bench.approx` / benchmarks/bench_approx.py (and the timing processes)."""
    return bench_main(argv, prog="bench_approx", description=__doc__.splitlines()[0], add_arguments=add_arguments,
                      run=lambda args: run(args.out, quick=args.quick, seed=args.seed, threads=args.threads),
                      children={"--forward-child": lambda spec: _forward_child(json.loads(spec)),
                                "--decode-child": lambda spec: _decode_child(json.loads(spec))})


if __name__ == "__main__":
    sys.exit(main())
