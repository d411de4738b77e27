"""Training: a teacher-forced loop, learning-rate schedules, exact-match evaluation, task recipes.

Legend: B batch, Lt target length, T context (tokens per training window), V vocabulary.

    fit(model, next_batch, steps=...)          AdamW + warmup then cosine / inverse-sqrt / constant,
                                               cross-entropy over non-PAD targets, gradient clipping
    evaluate_exact(model, (srcs, tgts))        greedy generation, fraction of outputs equal to the target
    train_task("reverse") / train_reversal()   a synthetic task from qkv.data end to end
    train_lm(data, out=..., steps=...)         a decoder language model on text (teacher forcing,
                                               causal mask), validation bits per character,
                                               atomic checkpoints (qkv.checkpoint) and exact resume

`fit` knows a model only through `loss_fn(model, batch) -> (mean loss, tokens)`
(default `seq2seq_loss`: a `qkv.data.Batch` through `model(src, src_lengths,
tgt_in)`), so other models plug in with their own loss function.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv import data as _data
from qkv._util.checks import check_int, check_number

__all__ = ["History", "TrainResult", "SCHEDULES", "lr_schedule", "seq2seq_loss", "fit", "evaluate_exact",
           "train_task", "train_reversal", "RECIPE", "PRESETS", "decoder_config", "estimate_memory",
           "available_memory", "lm_loss", "evaluate_lm", "LMHistory", "LMResult", "train_lm"]

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
    from qkv.models.seq2seq import Seq2Seq, Seq2SeqConfig

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


# -----------------------------------------------------------------------------
# Decoder language models on text

# GPT-2 style decoders (learned positions, LayerNorm, gelu_tanh MLP, tied head), so a
# checkpoint is a Hugging Face GPT-2 directory; max_positions is the training context.
PRESETS = {
    "tiny": {"d_model": 64, "n_layers": 2, "n_heads": 4},
    "mini": {"d_model": 128, "n_layers": 4, "n_heads": 4},      # the default: ~5 minutes on 2 CPU cores
    "small": {"d_model": 384, "n_layers": 6, "n_heads": 6},
    "base": {"d_model": 768, "n_layers": 12, "n_heads": 12},
}


def decoder_config(preset: str | None = "tiny", *, vocab_size: int, context: int, config=None):
    """The `DecoderConfig` to train: a preset name (PRESETS) or `config`, a dict or a
    JSON file of DecoderConfig fields (vocab_size defaults to the tokenizer's,
    max_positions to `context`). Checked before anything is allocated: heads divide
    d_model (or head_dim is set), kv heads divide heads, the vocabulary covers the
    tokenizer, the context fits, and the model can be saved as a Hugging Face checkpoint."""
    from pathlib import Path

    from qkv._util.files import read_json
    from qkv.models import DecoderConfig
    from qkv.models.hf import config_to_hf

    _check_int("vocab_size", vocab_size, 1)
    _check_int("context", context, 1)
    if config is not None:
        source = "config"
        if isinstance(config, (str, Path)):
            source = str(config)
            if not Path(config).exists():
                raise FileNotFoundError(f"config file {source} does not exist")
            config = read_json(config, "a JSON object of DecoderConfig fields")   # ValueError naming the file
        if not isinstance(config, dict):
            raise ValueError(f"{source} must hold a JSON object of DecoderConfig fields, got {type(config).__name__}")
        fields = dict(config)
    else:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(map(repr, PRESETS))} (or pass a config file), "
                             f"got {preset!r}")
        source = f"preset {preset!r}"
        fields = {**PRESETS[preset], "arch": "gpt2"}
    fields.setdefault("vocab_size", vocab_size)
    fields.setdefault("max_positions", context)
    d, h = fields.get("d_model"), fields.get("n_heads")
    kv = fields.get("n_kv_heads") or h
    if isinstance(d, int) and isinstance(h, int) and h > 0 and fields.get("head_dim") is None and d % h:
        raise ValueError(f"{source}: d_model={d} is not divisible by n_heads={h}; pick heads that divide the width")
    if isinstance(h, int) and isinstance(kv, int) and kv > 0 and h % kv:
        raise ValueError(f"{source}: n_kv_heads={kv} must divide n_heads={h}")
    if isinstance(fields["vocab_size"], int) and fields["vocab_size"] < vocab_size:
        raise ValueError(f"{source}: vocab_size={fields['vocab_size']} is smaller than the tokenizer's {vocab_size}")
    if isinstance(fields["max_positions"], int) and fields["max_positions"] < context:
        raise ValueError(f"{source}: max_positions={fields['max_positions']} is shorter than the context {context}; "
                         f"lower --context or raise max_positions")
    try:
        cfg = DecoderConfig.from_dict(fields)
        config_to_hf(cfg)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: {exc}") from None
    return cfg


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    from qkv import backends

    return backends.available_bytes(torch.device("cpu"))


def estimate_memory(config, batch_size: int, context: int) -> dict[str, int]:
    """A rough upper estimate, in bytes, of training `config` in float32 on
    (batch_size, context) windows: weights + gradients + AdamW's two moments
    (16 bytes a parameter), activations kept for backward (per layer and token
    ~16 d_model + 2 ffn_hidden floats plus 3 n_heads x context attention scores) and
    the logits with their gradient (3 x V floats a token). Counts parameters on the
    meta device: nothing is allocated."""
    from qkv.models import Decoder

    _check_int("batch_size", batch_size, 1)
    _check_int("context", context, 1)

    params = sum(p.numel() for p in Decoder(config, device="meta").parameters())
    tokens = batch_size * context
    act = 4 * tokens * config.n_layers * (16 * config.d_model + 2 * config.ffn_hidden + 3 * config.n_heads * context)
    logits = 4 * tokens * 3 * config.vocab_size
    out = {"params": params, "states": 16 * params, "activations": act + logits}
    out["total"] = out["states"] + out["activations"]
    return out


def _check_memory(config, batch_size: int, context: int, limit: int | None) -> None:
    est = estimate_memory(config, batch_size, context)
    if limit is not None and est["total"] > limit:
        g = 2.0 ** 30
        raise ValueError(f"training this model needs about {est['total'] / g:.1f} GiB ({est['params'] / 1e6:.1f}M "
                         f"parameters: {est['states'] / g:.1f} GiB of weights, gradients and AdamW state; "
                         f"{est['activations'] / g:.1f} GiB of activations for batch {batch_size} x context "
                         f"{context}) but only {limit / g:.1f} GiB is available (MemAvailable); use a smaller "
                         f"preset, batch size or context (accumulate with --accum instead)")


def lm_loss(model: nn.Module, tokens: Tensor) -> tuple[Tensor, int]:
    """Mean next-token cross-entropy (nats) of windows tokens (B, T + 1): the model
    reads tokens[:, :-1] with the causal mask and predicts tokens[:, 1:]."""
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be (B, T + 1) ids with T >= 1, got "
                         f"{tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__}")
    logits = model(tokens[:, :-1])                                          # (B, T, V)
    target = tokens[:, 1:]                                                  # (B, T)
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten()), target.numel()


@torch.no_grad()
def evaluate_lm(model: nn.Module, batches: list[Tensor], *, bf16: bool = False) -> float:
    """Mean next-token loss (nats per token) over windows (b, T + 1); restores the
    model's training mode."""
    if isinstance(batches, Tensor) or len(batches) == 0:
        raise ValueError(f"batches must be a non-empty list of (b, T + 1) token windows, got "
                         f"{'a tensor' if isinstance(batches, Tensor) else 'an empty list'}; "
                         f"e.g. TextData.val_batches(batch_size, context)")
    total, n = _lm_sums(model, batches, bf16=bf16)
    return total / n


@torch.no_grad()
def _lm_sums(model: nn.Module, batches: list[Tensor], *, bf16: bool = False) -> tuple[float, int]:
    """(summed next-token loss in nats, tokens) over windows (b, T + 1)."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        for x in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss, k = lm_loss(model, x)
            total += float(loss) * k
            n += k
    finally:
        model.train(was)
    return total, n


@dataclass
class LMHistory:
    """Per optimizer step: loss (mean over the accumulated micro-batches), lr,
    gradient norm; `val`: (step, validation loss in nats/token, bits per character)."""

    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    val: list[tuple[int, float, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"loss": self.loss, "lr": self.lr, "grad_norm": self.grad_norm, "val": [list(v) for v in self.val]}

    @classmethod
    def from_dict(cls, d: dict) -> "LMHistory":
        return cls(list(d["loss"]), list(d["lr"]), list(d["grad_norm"]), [tuple(v) for v in d["val"]])


@dataclass
class LMResult:
    """What `train_lm` returns. val_bpc: bits per character of the validation text
    (nats per token x tokens per character / ln 2)."""

    model: nn.Module
    data: _data.TextData
    history: LMHistory
    val_loss: float
    val_bpc: float
    out: object
    checkpoint: object
    resumed_from: object
    tokens_per_s: float


# training arguments a resumed run must repeat exactly (they decide the losses)
_RESUME_KEYS = ("data", "tokenizer", "config", "steps", "batch_size", "context", "lr", "warmup", "min_lr",
                "weight_decay", "clip", "accum_steps", "bf16", "seed", "val_fraction", "max_corpus_bytes")


class _Progress:
    """One status line on stderr: rewritten in place on a terminal, a line per
    report otherwise."""

    def __init__(self, steps: int, start: int, every: int):
        import sys

        self.stream, self.steps, self.start, self.every = sys.stderr, steps, start, every
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()
        self.tokens = 0

    def update(self, step: int, loss: float, tokens: int, val: tuple | None) -> None:
        self.tokens += tokens
        if not (self.tty or step % self.every == 0 or step == self.steps):
            return
        dt = time.perf_counter() - self.t0
        done = step - self.start
        eta = dt / done * (self.steps - step) if done else 0.0
        v = f"  val {val[1]:.3f} ({val[2]:.3f} bpc)" if val else ""
        line = (f"step {step}/{self.steps}  loss {loss:.4f}{v}  {self.tokens / max(dt, 1e-9):,.0f} tok/s  "
                f"ETA {int(eta) // 60}m{int(eta) % 60:02d}s")
        self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _plot(path, history: LMHistory) -> None:
    """The loss curve (training loss per step, validation loss) as a PNG, written atomically."""
    import warnings

    from qkv._util.files import write_atomic

    try:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed: no loss-curve PNG (pip install matplotlib)", stacklevel=3)
        return
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    ax.plot(range(1, len(history.loss) + 1), history.loss, lw=0.8, label="train")
    if history.val:
        ax.plot([v[0] for v in history.val], [v[1] for v in history.val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def _optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], list[dict]]:
    sd = opt.state_dict()
    tensors = {f"opt.{i}.{k}": (v if isinstance(v, Tensor) else torch.tensor(v))
               for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, sd["param_groups"]


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], groups: list[dict]) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in groups]
    opt.load_state_dict({"state": state, "param_groups": groups})


def _rng_state() -> tuple[dict[str, Tensor], dict]:
    import random

    import numpy as np

    v, keys, pos, has_gauss, gauss = np.random.get_state()
    py = random.getstate()
    return ({"rng.torch": torch.get_rng_state()},
            {"python": [py[0], list(py[1]), py[2]], "numpy": [v, keys.tolist(), pos, has_gauss, gauss]})


def _set_rng_state(tensors: dict[str, Tensor], state: dict) -> None:
    import random

    import numpy as np

    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    v, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((v, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def train_lm(data=None, *, out="runs/train", tokenizer: str = "bpe", preset: str = "mini", config=None,
             steps: int = 1200, batch_size: int = 16, context: int = 128, lr: float = 3e-3,
             warmup: int | None = None, min_lr: float | None = None, weight_decay: float = 0.1,
             clip: float | None = 1.0, accum_steps: int = 1, bf16: bool = False, eval_every: int | None = None,
             eval_windows: int = 64, ckpt_every: int = 0, keep: int = 3, resume: bool = False, seed: int = 0,
             val_fraction: float = 0.02, max_corpus_bytes: int = _data.DEFAULT_CORPUS_BYTES,
             progress: bool = False, plot: bool = True, stop_after: int | None = None,
             memory_limit: int | None = -1) -> LMResult:
    """Train a decoder language model on text with teacher forcing and the causal mask.

    Args:
        data: a text file or folder (`qkv.data.load_corpus`); None: the Python standard
            library's sources. tokenizer: "byte", "char", "bpe" / "bpe:N" (a byte-level BPE
            trained on the training split, `qkv.data.train_bpe`) or a tokenizer.json path.
            The defaults (bpe, preset "mini", 1200 steps of 16 x 128 tokens, lr 3e-3) are
            the run `qkv train` does with no arguments: about 5 minutes on 2 CPU cores.
        preset / config: the model (`decoder_config`); checked, and its memory estimated
            against `memory_limit` bytes (-1: MemAvailable; None: no check), before allocation.
        steps, batch_size, context, accum_steps: optimizer steps of accum_steps micro-batches
            of (batch_size, context + 1) windows each.
        lr, warmup, min_lr: linear warmup (default min(100, steps // 10)) then cosine to
            min_lr (default lr / 10). weight_decay, clip: AdamW decay, gradient-norm clip.
        bf16: bfloat16 autocast on the CPU (weights and optimizer stay float32).
        eval_every, eval_windows: validation every N steps (None: steps // 10, so the loss
            curve shows ten points; 0: at the end only) on up to
            eval_windows windows of the held-out last `val_fraction` of the text.
        ckpt_every, keep: a checkpoint every N steps (0: at the end only) in out/step-N,
            keeping the newest `keep` (`qkv.checkpoint`). resume: continue from the newest
            valid checkpoint in `out` with the same arguments: the losses continue exactly
            as the uninterrupted run's would. Without resume, an `out` that already holds
            checkpoints is refused.
        progress: a status line (loss, tokens/s, ETA) on stderr. plot: out/loss.png.
        stop_after: end after this step (checkpointing it), as an interruption would.

    Data parallel: under `torchrun --nproc_per_node=W` (WORLD_SIZE > 1) each of the W
    processes trains a DistributedDataParallel copy on its contiguous B / W rows of every
    global batch (batch_size is global: W must divide it), so the run follows the
    one-process run of the same arguments up to float rounding, and can be resumed with
    another W. Validation is shared out and summed; rank 0 alone prints, plots and writes
    checkpoints, and every rank waits for each checkpoint to be written.

    Validation bits per character = loss (nats/token) x tokens per character of the
    validation text / ln 2; for "char" that is loss / ln 2, for "byte" loss / ln 2 per
    byte times bytes per character (1 for ASCII text).
    """
    import sys
    from pathlib import Path

    from qkv import checkpoint as _ckpt
    from qkv import distributed as _dist
    from qkv.models import Decoder

    for name, v in (("steps", steps), ("batch_size", batch_size), ("context", context),
                    ("accum_steps", accum_steps), ("eval_windows", eval_windows), ("keep", keep)):
        _check_int(name, v, 1)
    if eval_every is None:
        eval_every = max(1, steps // 10)
    for name, v in (("eval_every", eval_every), ("ckpt_every", ckpt_every), ("seed", seed)):
        _check_int(name, v, 0)
    warmup = min(100, steps // 10) if warmup is None else _check_int("warmup", warmup, 0)
    _check_number("lr", lr, lo_open=True)
    min_lr = lr / 10 if min_lr is None else _check_number("min_lr", min_lr)
    _check_number("weight_decay", weight_decay)
    if clip is not None:
        _check_number("clip", clip, lo_open=True)
    if stop_after is not None:
        _check_int("stop_after", stop_after, 1)
    if config is None and preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(map(repr, PRESETS))} (or pass a config file), "
                         f"got {preset!r}")
    tok_spec = str(tokenizer)
    if tok_spec not in ("byte", "char") and _data.bpe_vocab(tok_spec) is None:
        _data.make_tokenizer(tok_spec)                          # a bad spec or a missing file, before reading data
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a directory for the checkpoints")
    world = _dist.env_world()
    _dist.check_divisible(batch_size, world)
    with _dist.process_group("cpu") as world:
        start_ckpt = None
        if resume:
            start_ckpt = _ckpt.latest(out)
            if start_ckpt is None:
                raise ValueError(f"nothing to resume: {out} holds no valid checkpoint; run without --resume")
            skipped = [p for p in _ckpt.list_checkpoints(out) if p.name > start_ckpt.name]
            for p in skipped:
                if world.main:
                    print(f"warning: skipping {p}: it does not verify; resuming from {start_ckpt}",
                          file=sys.stderr)
        elif _ckpt.list_checkpoints(out):
            raise ValueError(f"{out} already holds checkpoints; pass --resume to continue that run or choose "
                             f"another --out")

        text = _data.load_corpus(data, max_bytes=max_corpus_bytes)
        tok_source = tok_spec
        if start_ckpt is not None and _data.bpe_vocab(tok_spec) is not None and (start_ckpt / "tokenizer.json").is_file():
            tok_source = _data.FileTokenizer(start_ckpt / "tokenizer.json")     # the run's own merges, not retrained
        ds = _data.TextData.build(text, tok_source, val_fraction=val_fraction)
        ds.check_context(context)
        cfg = decoder_config(preset if config is None else None, vocab_size=ds.tokenizer.vocab_size, context=context,
                             config=config)
        if memory_limit == -1:
            memory_limit = available_memory()
        _check_memory(cfg, batch_size // world.size, context, memory_limit)

        args = {"data": None if data is None else str(Path(data).resolve()), "tokenizer": tok_spec,
                "config": cfg.to_dict(), "steps": steps, "batch_size": batch_size, "context": context, "lr": lr,
                "warmup": warmup, "min_lr": min_lr, "weight_decay": weight_decay, "clip": clip,
                "accum_steps": accum_steps, "bf16": bf16, "seed": seed, "val_fraction": val_fraction,
                "max_corpus_bytes": max_corpus_bytes}
        torch.manual_seed(seed)
        model = Decoder(cfg)
        opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95), eps=1e-8)
        history, start = LMHistory(), 0
        if start_ckpt is not None:
            ck = _ckpt.load(start_ckpt)
            saved = ck.state.get("args", {})
            diff = [f"{k}: checkpoint {saved.get(k)!r}, now {args[k]!r}" for k in _RESUME_KEYS if saved.get(k) != args[k]]
            if diff:
                raise ValueError(f"--resume needs the arguments of the run in {out}; these differ: " + "; ".join(diff))
            if ck.state.get("data_sha256") != ds.sha256:
                raise ValueError(f"the training text changed since {start_ckpt} was written; resume with the same data")
            model.load_state_dict(ck.model.state_dict(), strict=True)
            _load_optimizer(opt, ck.tensors, ck.state["optimizer"]["param_groups"])
            _set_rng_state(ck.tensors, ck.state["rng"])
            history, start = LMHistory.from_dict(ck.state["history"]), ck.step
            del ck
        # every rank starts from the same weights (same seed or checkpoint); DDP also broadcasts rank 0's
        net = model
        if world.distributed:
            net = nn.parallel.DistributedDataParallel(model)
        lr_at = lr_schedule("cosine", lr=lr, warmup=warmup, steps=steps, min_lr=min_lr)
        val_batches = ds.val_batches(batch_size, context, max_windows=eval_windows)

        def validate() -> float:
            # each rank scores every W-th window batch; the sums over ranks give the one-process mean
            total, count = _dist.all_sum(list(_lm_sums(model, val_batches[world.rank::world.size], bf16=bf16)),
                                         world)
            return total / count
        # every checkpoint carries its tokenizer.json, so `qkv generate` takes text prompts
        extra = {"tokenizer.json": ds.tokenizer.to_json()}
        stop = steps if stop_after is None else min(stop_after, steps)
        out.mkdir(parents=True, exist_ok=True)
        _dist.barrier(world)                        # every rank has read `out` before rank 0 writes to it
        bar = _Progress(steps, start, max(1, steps // 20)) if progress and world.main else None
        params = [p for p in model.parameters() if p.requires_grad]
        last_ckpt, t0, tokens = start_ckpt, time.perf_counter(), 0

        def write_checkpoint(step: int):
            opt_tensors, groups = _optimizer_state(opt)
            rng_tensors, rng_json = _rng_state()
            state = {"args": args, "data_sha256": ds.sha256, "data_position": {"seed": seed, "step": step},
                     "optimizer": {"param_groups": groups}, "scheduler": {"kind": "cosine", "step": step},
                     "rng": rng_json, "history": history.to_dict(),
                     "tokenizer": {"spec": tok_spec, "vocab_size": ds.tokenizer.vocab_size,
                                   "alphabet": getattr(ds.tokenizer, "alphabet", None)}}
            return _ckpt.save(out, step, model, {**opt_tensors, **rng_tensors}, state, keep=keep, extra_files=extra)

        model.train()
        try:
            for step in range(start, stop):
                rate = lr_at(step)
                for g in opt.param_groups:
                    g["lr"] = rate
                opt.zero_grad(set_to_none=True)
                total = 0.0
                for k in range(accum_steps):
                    x = ds.batch(step, batch_size, context, seed=seed, micro=k)                 # (B, T+1)
                    x = _dist.shard_rows(x, world)                                              # (B/W, T+1)
                    # gradients are averaged over ranks once, on the last micro-batch
                    sync = not world.distributed or k == accum_steps - 1
                    with contextlib.nullcontext() if sync else net.no_sync():
                        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                            loss, n = lm_loss(net, x)
                        (loss / accum_steps).backward()
                    total += float(loss.detach())
                    tokens += n * world.size
                # equal tokens per rank: the global batch's mean loss is the mean of the ranks' means
                value = _dist.all_sum([total], world)[0] / (accum_steps * world.size)
                if not math.isfinite(value):
                    raise FloatingPointError(f"loss is {value} at step {step}; lower lr (now {rate:.3g}) or raise warmup")
                norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else float("inf"))
                opt.step()
                history.loss.append(value)
                history.lr.append(rate)
                history.grad_norm.append(float(norm))
                done = step + 1
                val = None
                if (eval_every and done % eval_every == 0) or done == stop:
                    vl = validate()
                    val = (done, vl, vl * ds.tokens_per_char / math.log(2))
                    history.val.append(val)
                if bar is not None:
                    bar.update(done, value, n * accum_steps, val)
                if (ckpt_every and done % ckpt_every == 0) or done == stop:
                    # rank 0 writes (all ranks hold the same weights and state); the others wait for it
                    last_ckpt = write_checkpoint(done) if world.main else out / _ckpt.step_dir_name(done)
                    _dist.barrier(world)
                if plot and world.main and (val is not None or done == stop):
                    _plot(out / "loss.png", history)
        finally:
            if bar is not None:
                bar.close()
            if net is not model:
                # the DDP wrapper goes while the process group is alive: its reducer keeps the last
                # gradient all-reduce's work; collected at interpreter exit instead, that can abort
                # a rank after a finished run (gloo, seen under load)
                del net
                gc.collect()
        seconds = time.perf_counter() - t0
        if history.val and history.val[-1][0] == len(history.loss):
            _, vl, bpc = history.val[-1]
        else:
            vl = validate()
            bpc = vl * ds.tokens_per_char / math.log(2)
        return LMResult(model, ds, history, vl, bpc, out, last_ckpt, start_ckpt,
                        tokens / seconds if seconds > 0 else 0.0)


# -----------------------------------------------------------------------------
# Associative recall: the soft dictionary lookup, learned
#
# Legend (this section): B sequences, L tokens, H heads, V vocabulary.

from typing import NamedTuple  # noqa: E402  (this section's own imports)

import numpy as np  # noqa: E402

# A 2-layer attention-only model (`qkv.models.AttentionOnly`, RoPE, pre-LayerNorm, no MLP) on
# `qkv.data.RecallTask()` (8-16 pairs, 32 keys, 32 values). Loss on the answer position only.
# Training sequences hold 2-16 pairs (`train_min_pairs`): the short ones make the lookup
# easy to discover, and with 8-16 pairs only it appears far later; the held-out set is the
# task's own 8-16 pairs. The model learns the two-layer (induction) solution: a layer-1
# head copies each key into the value position after it, and layer-2 heads attend from the
# query to the value whose copied key matches. 1500 steps of 64 sequences (~75 s on one
# CPU thread): 100% held-out accuracy for seeds 0-4, the best layer-2 head putting
# 0.97-0.99 of the query's attention on the matching value (at 1000 steps, 0.91-0.97).
RECALL_RECIPE = {"d_model": 96, "n_layers": 2, "n_heads": 3, "positions": "rope", "norm": "layer",
                 "train_min_pairs": 2, "batch_size": 64, "steps": 1500, "lr": 3e-3, "warmup": 100,
                 "schedule": "cosine", "min_lr": 0.0, "weight_decay": 0.01, "clip": 1.0}

__all__ += ["RECALL_RECIPE", "RecallEval", "RecallResult", "recall_loss", "evaluate_recall", "recall_attention",
            "train_recall"]


def _check_recall_batch(batch) -> None:
    if not isinstance(batch, _data.RecallBatch):
        raise TypeError(f"expected a qkv.data.RecallBatch (RecallTask.batch / held_out), got {type(batch).__name__}")


def _answer_logits(model: nn.Module, batch: _data.RecallBatch, *, return_weights: bool = False):
    """Logits at each row's last real position (B, V) [, per-layer weights (B, H, L, L)]."""
    out = model(batch.ids, return_weights=return_weights) if return_weights else model(batch.ids)
    logits, weights = out if return_weights else (out, None)                      # (B, L, V)
    rows = torch.arange(batch.ids.shape[0], device=batch.ids.device)
    last = logits[rows, batch.lengths - 1]                                          # (B, V)
    return (last, weights) if return_weights else last


def recall_loss(model: nn.Module, batch: _data.RecallBatch) -> tuple[Tensor, int]:
    """Cross-entropy of the answer at the last position of each sequence (the `fit` loss_fn
    for recall); the other positions carry no loss. Returns (mean loss, sequences)."""
    _check_recall_batch(batch)
    return F.cross_entropy(_answer_logits(model, batch).float(), batch.answer), int(batch.ids.shape[0])


class RecallEval(NamedTuple):
    """Held-out accuracy and, per (layer, head), the query position's mean attention on the
    matching key and on its value (each (n_layers, n_heads) numpy float64)."""

    accuracy: float
    key_mass: np.ndarray
    value_mass: np.ndarray

    @property
    def pair_mass(self) -> np.ndarray:
        """key_mass + value_mass: the attention on the matching pair, whichever token is read."""
        return self.key_mass + self.value_mass


@torch.no_grad()
def evaluate_recall(model: nn.Module, batch: _data.RecallBatch, *, batch_size: int = 500) -> RecallEval:
    """Greedy accuracy of the answer, and the query's attention on the matching key / value of
    every layer and head, averaged over the sequences of `batch` (e.g. `task.held_out(1000)`).
    The model must accept `return_weights=True` and return per-layer (B, H, L, L) weights."""
    _check_recall_batch(batch)
    _check_int("batch_size", batch_size, 1)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, key_sum, value_sum = 0, None, None
    try:
        for i in range(0, batch.ids.shape[0], batch_size):
            part = _data.RecallBatch(*(t[i:i + batch_size].to(device) for t in batch))
            last, weights = _answer_logits(model, part, return_weights=True)        # (b, V), [(b, H, L, L)]
            correct += int((last.argmax(-1) == part.answer).sum())
            rows = torch.arange(part.ids.shape[0], device=device)
            w = torch.stack([wl[rows, :, part.lengths - 1] for wl in weights], 1)   # (b, layers, H, L): query rows
            k = w[rows, :, :, part.key_pos].double().sum(0)                           # (layers, H)
            v = w[rows, :, :, part.value_pos].double().sum(0)                         # (layers, H)
            key_sum = k if key_sum is None else key_sum + k
            value_sum = v if value_sum is None else value_sum + v
    finally:
        model.train(was_training)
    n = batch.ids.shape[0]
    return RecallEval(correct / n, (key_sum / n).cpu().numpy(), (value_sum / n).cpu().numpy())


@torch.no_grad()
def recall_attention(model: nn.Module, task: _data.RecallTask, ids, *, layer: int, head: int):
    """The attention weights of one head on one sequence and the tokens' labels.

    ids: one unpadded sequence (L,) (a row of a `RecallBatch` cut to its length).
    Returns (weights (L, L) numpy float32, row = query, column = key; labels like
    "BOS", "k7", "v3", "?")."""
    if not isinstance(task, _data.RecallTask):
        raise TypeError(f"task must be a qkv.data.RecallTask, got {type(task).__name__}")
    ids = torch.as_tensor(ids)
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"ids must be one non-empty sequence (L,), got shape {tuple(ids.shape)}")
    _check_int("layer", layer, 0)
    _check_int("head", head, 0)
    labels = task.labels(ids)
    if "PAD" in labels:
        raise ValueError("ids holds PAD: cut the row to its length, ids[:lengths[i]]")
    was_training = model.training
    model.eval()
    try:
        _, weights = model(ids[None].to(next(model.parameters()).device), return_weights=True)
    finally:
        model.train(was_training)
    if layer >= len(weights) or head >= weights[layer].shape[1]:
        raise ValueError(f"layer {layer}, head {head} out of range: the model has {len(weights)} layers of "
                         f"{weights[0].shape[1]} heads")
    return weights[layer][0, head].float().cpu().numpy(), labels


@dataclass
class RecallResult:
    """A trained recall model and its measurements on the held-out set.

    key_mass, value_mass: (n_layers, n_heads) mean attention of the query position on the
    matching key / value; best_layer, best_head: the head with the largest sum of the two
    (`best_mass`); accuracy: held-out greedy accuracy."""

    model: nn.Module
    task: _data.RecallTask
    held_out: _data.RecallBatch
    history: History
    accuracy: float
    key_mass: np.ndarray
    value_mass: np.ndarray
    best_layer: int
    best_head: int
    best_mass: float
    train_seconds: float
    eval_seconds: float

    @property
    def pair_mass(self) -> np.ndarray:
        return self.key_mass + self.value_mass

    def example(self, index: int = 0, *, layer: int | None = None, head: int | None = None):
        """(weights (L, L) numpy, labels) of held-out sequence `index` for a head (default: the best)."""
        _check_int("index", index, 0)
        if index >= self.held_out.ids.shape[0]:
            raise ValueError(f"index {index} out of range: the held-out set has {self.held_out.ids.shape[0]} sequences")
        ids = self.held_out.ids[index, :int(self.held_out.lengths[index])]
        return recall_attention(self.model, self.task, ids, layer=self.best_layer if layer is None else layer,
                                head=self.best_head if head is None else head)

    def table(self) -> str:
        """The per-head measurements as aligned text."""
        lines = ["layer head    key  value   pair"]
        for layer in range(self.key_mass.shape[0]):
            for head in range(self.key_mass.shape[1]):
                k, v = self.key_mass[layer, head], self.value_mass[layer, head]
                mark = "  <- best" if (layer, head) == (self.best_layer, self.best_head) else ""
                lines.append(f"{layer:>5} {head:>4} {k:6.3f} {v:6.3f} {k + v:6.3f}{mark}")
        return "\n".join(lines)


def train_recall(*, n_keys: int = 32, n_values: int = 32, min_pairs: int = 8, max_pairs: int = 16, seed: int = 0,
                 eval_size: int = 1000, eval_seed: int = _data.EVAL_SEED, threads: int | None = 1,
                 log_every: int = 0, progress: bool | Callable[[int, dict], None] = False,
                 **overrides) -> RecallResult:
    """Train a `qkv.models.AttentionOnly` on associative recall and find the lookup head.

    The task is `RecallTask(n_keys, n_values, min_pairs, max_pairs)`; training batches hold
    `train_min_pairs`..max_pairs pairs (the held-out set is the task itself, drawn with
    `eval_seed`). Hyper-parameters default to `RECALL_RECIPE`; any of its keys can be
    overridden. `seed` seeds the initialisation and the training stream. `threads`:
    torch's intra-op threads for the run (restored afterwards; one is the fast choice
    for a model this small on a shared machine; None leaves the setting alone).

    After training, `evaluate_recall` on `eval_size` held-out sequences gives the accuracy
    and every head's attention on the matching key and value; the best head is the one
    with the most attention on the pair.
    """
    from qkv.models.attention_only import AttentionOnly

    model_keys = {"d_model", "n_layers", "n_heads", "positions", "norm"}
    fit_keys = {"steps", "lr", "warmup", "schedule", "min_lr", "weight_decay", "clip"}
    known = model_keys | fit_keys | {"batch_size", "train_min_pairs"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown hyper-parameters {unknown}; known: {sorted(known)}")
    if seed == eval_seed:
        raise ValueError(f"seed and eval_seed are both {seed}: the held-out set would be drawn like the training "
                         f"batches; pick another seed")
    _check_int("eval_size", eval_size, 1)
    if threads is not None:
        _check_int("threads", threads, 1)
    hp = {**RECALL_RECIPE, **overrides}
    task = _data.RecallTask(n_keys=n_keys, n_values=n_values, min_pairs=min_pairs, max_pairs=max_pairs)
    train_min = _check_int("train_min_pairs", hp["train_min_pairs"], 1)
    if train_min > min_pairs:
        raise ValueError(f"train_min_pairs={train_min} must be <= min_pairs={min_pairs}: training covers the "
                         f"held-out lengths")
    train_task = _data.RecallTask(n_keys=n_keys, n_values=n_values, min_pairs=train_min, max_pairs=max_pairs)
    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        model = AttentionOnly(task.vocab_size, max_positions=task.max_len,
                              **{k: v for k, v in hp.items() if k in model_keys})
        history = fit(model, train_task.stream(hp["batch_size"], seed=seed), seed=seed, log_every=log_every,
                      progress=progress, loss_fn=recall_loss, **{k: v for k, v in hp.items() if k in fit_keys})
        t0 = time.perf_counter()
        held = task.held_out(eval_size, seed=eval_seed)
        ev = evaluate_recall(model, held)
        eval_seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)
    layer, head = np.unravel_index(int(np.argmax(ev.pair_mass)), ev.pair_mass.shape)
    return RecallResult(model, task, held, history, ev.accuracy, ev.key_mass, ev.value_mass, int(layer), int(head),
                        float(ev.pair_mass[layer, head]), history.seconds, eval_seconds)
