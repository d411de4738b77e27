"""The teacher-forced training loop and the synthetic-task recipes.

Legend: B batch, Lt target length, V vocabulary.

    lr_schedule(kind, lr=, warmup=, steps=)    warmup, then cosine / inverse-sqrt / constant
    fit(model, next_batch, steps=...)          AdamW, cross-entropy over non-PAD targets, clipping
    evaluate_exact(model, (srcs, tgts))        greedy generation, fraction equal to the target
    train_task("reverse") / train_reversal()   a synthetic task from qkv.data end to end
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv import data as _data
from qkv._util.checks import check_int, check_number
from qkv.models import Seq2Seq, Seq2SeqConfig

SCHEDULES = ("cosine", "inverse_sqrt", "constant")


_check_int, _check_number = check_int, check_number


def lr_schedule(kind: str, *, lr: float, warmup: int, steps: int, min_lr: float = 0.0) -> Callable[[int], float]:
    """The learning rate of step s = 0..steps-1.

    All kinds warm up linearly, lr * (s + 1) / warmup for s < warmup, then:
    "cosine": from lr down to min_lr at the last step; "inverse_sqrt" (the
    paper's): lr * sqrt(warmup / (s + 1)); "constant": lr.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(map(repr, SCHEDULES))}; got {kind!r}")
    _check_number("lr", lr, lo_open=True)
    _check_number("min_lr", min_lr)
    _check_int("warmup", warmup, 0)
    _check_int("steps", steps, 1)

    def at(s: int) -> float:
        if s < warmup:
            return lr * (s + 1) / warmup
        if kind == "constant":
            return lr
        if kind == "inverse_sqrt":
            return lr * math.sqrt(max(warmup, 1) / (s + 1))
        span = max(steps - 1 - warmup, 1)
        progress = min((s - warmup) / span, 1.0)
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return at


def seq2seq_loss(model: nn.Module, batch: _data.Batch, *, label_smoothing: float = 0.0,
                 pad_id: int = _data.PAD) -> tuple[Tensor, int]:
    """Mean cross-entropy of model(src, src_lengths, tgt_in) against tgt_out, PAD ignored.

    Returns (loss, number of target tokens it averages over)."""
    if not isinstance(batch, _data.Batch):
        raise TypeError(f"seq2seq_loss needs a qkv.data.Batch, got {type(batch).__name__}; "
                        f"pass loss_fn= for other batch types")
    logits = model(batch.src, batch.src_lengths, batch.tgt_in)                     # (B, Lt, V)
    target = batch.tgt_out                                                          # (B, Lt)
    n = int((target != pad_id).sum())
    if n == 0:
        raise ValueError("the batch has no target tokens (tgt_out is all PAD)")
    loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=pad_id,
                           label_smoothing=label_smoothing)
    return loss, n


@dataclass
class History:
    """What `fit` saw, one entry per step: loss, learning rate, gradient norm (before
    clipping), target tokens; plus the wall time of the loop."""

    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.loss)

    @property
    def tokens_per_s(self) -> float:
        """Target (loss) tokens per second of training."""
        return sum(self.tokens) / self.seconds if self.seconds > 0 else 0.0


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (and embeddings), none on biases and norm weights."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fit(model: nn.Module, next_batch: Callable[[int], object], *, steps: int, lr: float = 1e-3,
        warmup: int = 100, schedule: str = "cosine", min_lr: float = 0.0, weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-9, clip: float | None = 1.0,
        label_smoothing: float = 0.0, seed: int = 0, log_every: int = 0,
        progress: bool | Callable[[int, dict], None] = False,
        loss_fn: Callable[[nn.Module, object], tuple[Tensor, int]] | None = None) -> History:
    """Train `model` for `steps` AdamW steps on batches `next_batch(step)`.

    Args:
        next_batch: step -> batch (e.g. `qkv.data.Task.stream(batch_size, seed=...)`).
        lr, warmup, schedule, min_lr: see `lr_schedule`.
        weight_decay: AdamW decay on matrices and embeddings; betas/eps: AdamW's
            (the paper's (0.9, 0.98), 1e-9 by default).
        clip: clip the global gradient norm to this value (None: no clipping).
        label_smoothing: for the default loss (the paper used 0.1).
        seed: seeds torch's global RNG (dropout): with a deterministic next_batch,
            the same seed gives the same loss curve.
        log_every, progress: every log_every steps (default steps // 20) and at the
            last, call progress(step, record) or, with progress=True, print a line.
        loss_fn: (model, batch) -> (mean loss, tokens); default `seq2seq_loss`.

    Returns a `History`. The model is left in training mode.
    """
    _check_int("steps", steps, 1)
    _check_int("log_every", log_every, 0)
    _check_int("seed", seed, 0)
    _check_number("weight_decay", weight_decay)
    _check_number("label_smoothing", label_smoothing, hi=1.0)
    if clip is not None:
        _check_number("clip", clip, lo_open=True)
    if not callable(next_batch):
        raise TypeError(f"next_batch must be a callable step -> batch, got {type(next_batch).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable (model, batch) -> (loss, tokens) or None, got "
                        f"{type(loss_fn).__name__}")
    if not (isinstance(progress, bool) or callable(progress)):
        raise TypeError(f"progress must be True, False or a callable (step, record), got {type(progress).__name__}")
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b < 1 for b in betas)):
        raise ValueError(f"betas must be a pair of numbers in [0, 1) (AdamW's moment decays), got {betas!r}; "
                         f"e.g. (0.9, 0.98)")
    _check_number("eps", eps)
    lr_at = lr_schedule(schedule, lr=lr, warmup=warmup, steps=steps, min_lr=min_lr)
    if loss_fn is None:
        def loss_fn(m, b):
            return seq2seq_loss(m, b, label_smoothing=label_smoothing)
    elif label_smoothing:
        raise ValueError("label_smoothing applies to the default loss only; build it into your loss_fn")
    report = progress if callable(progress) else (_print_progress if progress else None)
    if report is not None and not log_every:
        log_every = max(1, steps // 20)

    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr_at(0), betas=betas, eps=eps)
    history = History()
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        rate = lr_at(step)
        for g in opt.param_groups:
            g["lr"] = rate
        batch = next_batch(step)
        loss, n = loss_fn(model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {float(loss.detach())} at step {step}; lower lr (now {rate:.3g}) or "
                                     f"raise warmup")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else float("inf"))
        opt.step()
        history.loss.append(float(loss.detach()))
        history.lr.append(rate)
        history.grad_norm.append(float(norm))
        history.tokens.append(int(n))
        history.seconds = time.perf_counter() - t0
        if report is not None and log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            window = history.loss[-log_every:]
            report(step + 1, {"loss": sum(window) / len(window), "lr": rate, "grad_norm": float(norm),
                              "tokens_per_s": history.tokens_per_s, "seconds": history.seconds, "steps": steps})
    return history


def _print_progress(step: int, r: dict) -> None:
    print(f"step {step:>6}/{r['steps']}  loss {r['loss']:.4f}  lr {r['lr']:.2e}  "
          f"|g| {r['grad_norm']:.2f}  {r['tokens_per_s']:,.0f} tok/s  {r['seconds']:.1f}s", flush=True)


@torch.no_grad()
def evaluate_exact(model: nn.Module, data: tuple[list[Tensor], list[Tensor]], *, batch_size: int = 500,
                   max_new_tokens: int | None = None, cache: bool = True) -> float:
    """Exact-sequence accuracy: the fraction of sources whose greedy output (up to
    EOS) equals the target token for token.

    `data` is (sources, targets), lists of 1-D int tensors (e.g. `Task.held_out(n)`);
    max_new_tokens defaults to the longest target + 1 (room for EOS).
    """
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError("data must be a (sources, targets) pair of lists of 1-D token tensors, "
                        "e.g. task.held_out(1000)")
    srcs, tgts = data
    if len(srcs) != len(tgts):
        raise ValueError(f"{len(srcs)} sources but {len(tgts)} targets")
    if not srcs:
        raise ValueError("the evaluation set is empty")
    _check_int("batch_size", batch_size, 1)
    if max_new_tokens is None:
        max_new_tokens = max(t.numel() for t in tgts) + 1
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(srcs), batch_size):
        b = _data.batch(srcs[i:i + batch_size], tgts[i:i + batch_size], device=device)
        outs = model.generate(b.src, b.src_lengths, max_new_tokens=max_new_tokens, cache=cache)
        correct += sum(out == t.tolist() for out, t in zip(outs, tgts[i:i + batch_size]))
    return correct / len(srcs)


# -----------------------------------------------------------------------------
# Recipes

# Reversal, lengths 8-16, 20 content tokens: >= 99% exact on held-out sequences in
# well under 5 minutes on one CPU thread (see train_task). 0.2M parameters, post-norm,
# 1200 steps of 64 sequences (~1M target tokens).
RECIPE = {"d_model": 64, "n_heads": 4, "encoder_layers": 2, "decoder_layers": 2, "ffn_hidden": 256,
          "dropout": 0.0, "batch_size": 64, "steps": 1200, "lr": 3e-3, "warmup": 150, "schedule": "cosine",
          "weight_decay": 0.01, "clip": 1.0, "label_smoothing": 0.0}


@dataclass
class TrainResult:
    """A trained model with its task, training history, held-out accuracy and timings."""

    model: nn.Module
    task: _data.Task
    history: History
    accuracy: float
    train_seconds: float
    eval_seconds: float


def train_task(name: str = "reverse", *, vocab: int = 20, min_len: int = 8, max_len: int = 16, offset: int = 3,
               seed: int = 0, eval_size: int = 1000, eval_seed: int = _data.EVAL_SEED, log_every: int = 0,
               progress: bool | Callable[[int, dict], None] = False, threads: int | None = None,
               **overrides) -> TrainResult:
    """Train a `Seq2Seq` on a `qkv.data` task and measure held-out exact-sequence accuracy.

    Hyper-parameters default to `RECIPE`; any of its keys can be overridden
    (model: d_model, n_heads, encoder_layers, decoder_layers, ffn_hidden, dropout,
    norm_position; training: batch_size, steps, lr, warmup, schedule, weight_decay,
    clip, label_smoothing). `seed` seeds the model's initialisation, the training
    batches and dropout; the held-out set is drawn with `eval_seed`.

    `threads`: torch's intra-op threads for the run (restored afterwards). These
    models are small: one thread per process is the fast choice on a busy
    machine, where threads that wait on each other at every op lose far more
    than they gain.
    """
    model_keys = {"d_model", "n_heads", "encoder_layers", "decoder_layers", "ffn_hidden", "dropout",
                  "norm_position", "activation", "max_positions"}
    fit_keys = {"steps", "lr", "warmup", "schedule", "min_lr", "weight_decay", "clip", "label_smoothing"}
    unknown = sorted(set(overrides) - model_keys - fit_keys - {"batch_size"})
    if unknown:
        raise ValueError(f"unknown hyper-parameters {unknown}; known: {sorted(model_keys | fit_keys | {'batch_size'})}")
    if seed == eval_seed:
        raise ValueError(f"seed and eval_seed are both {seed}: the held-out set would be drawn like the training "
                         f"batches; pick another seed")
    if threads is not None:
        _check_int("threads", threads, 1)
    _check_int("eval_size", eval_size, 1)          # before training, not after it
    hp = {**RECIPE, **overrides}
    task = _data.make_task(name, vocab=vocab, min_len=min_len, max_len=max_len, offset=offset)
    cfg = {k: v for k, v in hp.items() if k in model_keys}
    cfg.setdefault("max_positions", max_len + 2)
    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        model = Seq2Seq(Seq2SeqConfig(vocab_size=task.vocab_size, **cfg))
        history = fit(model, task.stream(hp["batch_size"], seed=seed), seed=seed, log_every=log_every,
                      progress=progress, **{k: v for k, v in hp.items() if k in fit_keys})
        t0 = time.perf_counter()
        accuracy = evaluate_exact(model, task.held_out(eval_size, seed=eval_seed))
    finally:
        torch.set_num_threads(before)
    return TrainResult(model, task, history, accuracy, history.seconds, time.perf_counter() - t0)


def train_reversal(**kwargs) -> TrainResult:
    """`train_task("reverse", ...)`: lengths 8-16, 20 content tokens, `RECIPE` hyper-parameters."""
    return train_task("reverse", **kwargs)
