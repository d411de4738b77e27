"""Decoder language models on text: `train_lm` (teacher forcing, the causal mask, validation
bits per character, atomic checkpoints and exact resume), its presets and memory estimate.

Legend: B batch, T context (tokens per training window), V vocabulary, W processes.

`train_lm` runs as named steps: `_check_args` (every argument, before anything is read),
`_open_run` (the checkpoint to resume from, or a refusal), `_load_data` (corpus and tokenizer),
`_restore` (weights, optimizer, RNGs and history of a resumed run), then `_train_loop`, whose
steps are `_train_step` (one optimizer step over the accumulated micro-batches),
`_validate` and `_save` (one checkpoint).
"""

from __future__ import annotations

import contextlib
import gc
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv import checkpoint as _ckpt
from qkv import data as _data
from qkv import distributed as _dist
from qkv._util import budget as _budget
from qkv._util.checks import check_int as _check_int
from qkv._util.checks import check_number as _check_number
from qkv._util.files import read_json, write_atomic
from qkv._util.meta import meta_model
from qkv.models import Decoder, DecoderConfig
from qkv.models.hf import config_to_hf
from qkv.train.loop import _param_groups, lr_schedule
from qkv.train.state import _load_optimizer, _optimizer_state, _rng_state, _set_rng_state


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
    return _budget.available_bytes(torch.device("cpu"))


def estimate_memory(config, batch_size: int, context: int) -> dict[str, int]:
    """A rough upper estimate, in bytes, of training `config` in float32 on
    (batch_size, context) windows: weights + gradients + AdamW's two moments
    (16 bytes a parameter), activations kept for backward (per layer and token
    ~16 d_model + 2 ffn_hidden floats plus 3 n_heads x context attention scores) and
    the logits with their gradient (3 x V floats a token). Counts parameters on the
    meta device: nothing is allocated."""
    _check_int("batch_size", batch_size, 1)
    _check_int("context", context, 1)

    params = sum(p.numel() for p in meta_model(Decoder, config).parameters())
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


def lm_loss(model: nn.Module, tokens: Tensor, *, cp=None) -> tuple[Tensor, int]:
    """Mean next-token cross-entropy (nats) of windows tokens (B, T + 1): the model
    reads tokens[:, :-1] with the causal mask and predicts tokens[:, 1:]. With `cp` (a
    `qkv.distributed.ContextParallel`), over this rank's rows of each window only."""
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be (B, T + 1) ids with T >= 1, got "
                         f"{tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__}")
    inputs, target = tokens[:, :-1], tokens[:, 1:]                          # (B, T) each
    if cp is None:
        logits = model(inputs)                                              # (B, T, V)
    else:
        inputs, target = cp.shard(inputs), cp.shard(target)               # (B, T / N) each
        with _dist.sharded(cp):
            logits = model(inputs)
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
def _lm_sums(model: nn.Module, batches: list[Tensor], *, bf16: bool = False, cp=None) -> tuple[float, int]:
    """(summed next-token loss in nats, tokens) over windows (b, T + 1)."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        for x in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss, k = lm_loss(model, x, cp=cp)
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
    try:            # matplotlib stays lazy: a heavy optional import, only for the loss-curve PNG
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        # stacklevel 4: the caller of train_lm (_plot <- _train_loop <- train_lm <- caller)
        warnings.warn("matplotlib is not installed: no loss-curve PNG (pip install matplotlib)", stacklevel=4)
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


def train_lm(data=None, *, out="runs/train", tokenizer: str = "bpe", preset: str = "mini", config=None,
             steps: int = 1200, batch_size: int = 16, context: int = 128, lr: float = 3e-3,
             warmup: int | None = None, min_lr: float | None = None, weight_decay: float = 0.1,
             clip: float | None = 1.0, accum_steps: int = 1, bf16: bool = False, eval_every: int | None = None,
             eval_windows: int = 64, ckpt_every: int = 0, keep: int = 3, resume: bool = False, seed: int = 0,
             val_fraction: float = 0.02, max_corpus_bytes: int = _data.DEFAULT_CORPUS_BYTES,
             progress: bool = False, plot: bool = True, stop_after: int | None = None,
             memory_limit: int | None = -1, context_parallel: int = 1,
             data_parallel: int | None = None) -> LMResult:
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

    Context parallel (`context_parallel` N > 1, under torchrun with WORLD_SIZE = N x M, M =
    `data_parallel`, default WORLD_SIZE / N): consecutive groups of N ranks share each
    sequence, every rank holding its zigzag rows of the context (`qkv.distributed`); the
    decoder's attention runs across the group (ring attention), the rest per token. The M
    groups split the global batch as data parallelism does, and DDP averages over all ranks:
    each holds the same number of tokens, so the gradient is the one-process gradient.
    `context` must be divisible by 2N.

    Validation bits per character = loss (nats/token) x tokens per character of the
    validation text / ln 2; for "char" that is loss / ln 2, for "byte" loss / ln 2 per
    byte times bytes per character (1 for ASCII text).
    """
    eval_every, warmup, min_lr, tok_spec, out = _check_args(
        steps=steps, batch_size=batch_size, context=context, accum_steps=accum_steps, eval_windows=eval_windows,
        keep=keep, eval_every=eval_every, ckpt_every=ckpt_every, seed=seed, warmup=warmup, lr=lr, min_lr=min_lr,
        weight_decay=weight_decay, clip=clip, stop_after=stop_after, preset=preset, config=config,
        tokenizer=tokenizer, out=out)
    world = _dist.env_world()
    dp_size = _check_parallel(world, context_parallel, data_parallel, context, batch_size)
    with _dist.process_group("cpu") as world:
        cp, dp_rank = _dist.new_groups(context_parallel, world.size, world.rank) if world.distributed else (None, 0)
        dp = _dist.World(dp_rank, dp_size)
        start_ckpt = _open_run(out, resume, world)
        ds = _load_data(data, tok_spec, start_ckpt, context=context, val_fraction=val_fraction,
                        max_corpus_bytes=max_corpus_bytes)
        cfg = decoder_config(preset if config is None else None, vocab_size=ds.tokenizer.vocab_size, context=context,
                             config=config)
        if memory_limit == -1:
            memory_limit = available_memory()
        _check_memory(cfg, batch_size // dp_size, context // context_parallel, memory_limit)

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
            history, start = _restore(start_ckpt, model, opt, args, ds, out)
        run = _Run(world=world, cp=cp, dp=dp, out=out, ds=ds, model=model, opt=opt, history=history, args=args, tok_spec=tok_spec,
                   seed=seed, batch_size=batch_size, context=context, accum_steps=accum_steps, bf16=bf16, clip=clip,
                   keep=keep, val_batches=ds.val_batches(batch_size, context, max_windows=eval_windows),
                   # every checkpoint carries its tokenizer.json, so `qkv generate` takes text prompts
                   extra={"tokenizer.json": ds.tokenizer.to_json()})
        lr_at = lr_schedule("cosine", lr=lr, warmup=warmup, steps=steps, min_lr=min_lr)
        stop = steps if stop_after is None else min(stop_after, steps)
        last_ckpt, tokens, seconds = _train_loop(run, start, stop, steps, lr_at, start_ckpt, eval_every=eval_every,
                                                 ckpt_every=ckpt_every, progress=progress, plot=plot)
        if history.val and history.val[-1][0] == len(history.loss):
            _, vl, bpc = history.val[-1]
        else:
            vl = _validate(run)
            bpc = vl * ds.tokens_per_char / math.log(2)
        return LMResult(model, ds, history, vl, bpc, out, last_ckpt, start_ckpt,
                        tokens / seconds if seconds > 0 else 0.0)


def _check_parallel(world, context_parallel: int, data_parallel: int | None, context: int, batch_size: int) -> int:
    """The number M of data-parallel groups, with WORLD_SIZE = N x M checked (N = context_parallel),
    the context split in 2N chunks and the batch in M shares."""
    _check_int("context_parallel", context_parallel, 1)
    N = context_parallel
    if world.size % N:
        raise ValueError(f"--context-parallel {N} must divide the {world.size} processes (WORLD_SIZE); launch "
                         f"torchrun --nproc_per_node={N * max(1, world.size // N)}")
    M = world.size // N
    if data_parallel is not None and data_parallel != M:
        raise ValueError(f"--data-parallel {data_parallel} x --context-parallel {N} must equal the {world.size} "
                         f"processes (WORLD_SIZE); launch torchrun --nproc_per_node={data_parallel * N}")
    if N > 1 and context % (2 * N):
        lo = context // (2 * N) * (2 * N)
        raise ValueError(f"--context {context} must be divisible by 2 x --context-parallel = {2 * N} (each rank "
                         f"holds two equal chunks of every window); use {lo or 2 * N} or {lo + 2 * N}")
    _dist.check_divisible(batch_size, _dist.World(0, M))
    return M


def _check_args(*, steps, batch_size, context, accum_steps, eval_windows, keep, eval_every, ckpt_every, seed, warmup,
                lr, min_lr, weight_decay, clip, stop_after, preset, config, tokenizer, out):
    """`train_lm`'s argument checks, before any data is read; returns the defaults filled in:
    (eval_every, warmup, min_lr, the tokenizer spec as a str, out as a Path)."""
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
    return eval_every, warmup, min_lr, tok_spec, out


def _open_run(out: Path, resume: bool, world) -> Path | None:
    """The checkpoint to resume from (resume: the newest valid one in `out`, warning about newer
    ones that do not verify), or None for a fresh run, which an `out` holding checkpoints refuses."""
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
    return start_ckpt


def _load_data(data, tok_spec: str, start_ckpt: Path | None, *, context: int, val_fraction: float,
               max_corpus_bytes: int) -> _data.TextData:
    """The corpus, tokenized and split; a resumed BPE run reads its own merges from the checkpoint."""
    text = _data.load_corpus(data, max_bytes=max_corpus_bytes)
    tok_source = tok_spec
    if start_ckpt is not None and _data.bpe_vocab(tok_spec) is not None and (start_ckpt / "tokenizer.json").is_file():
        tok_source = _data.FileTokenizer(start_ckpt / "tokenizer.json")     # the run's own merges, not retrained
    ds = _data.TextData.build(text, tok_source, val_fraction=val_fraction)
    ds.check_context(context)
    return ds


def _restore(start_ckpt: Path, model: nn.Module, opt: torch.optim.Optimizer, args: dict, ds: _data.TextData,
             out: Path) -> tuple[LMHistory, int]:
    """Load a resumed run's weights, optimizer and RNG state into `model` and `opt` (refusing other
    arguments or another text); returns its history and the step it ends at."""
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
    return LMHistory.from_dict(ck.state["history"]), ck.step


@dataclass
class _Run:
    """What the steps of one `train_lm` run share (the DDP wrapper is not here: `_train_loop`
    owns it, so that it goes before the process group does)."""

    world: object
    cp: object              # qkv.distributed.ContextParallel of this rank's sequence group, or None
    dp: object              # this rank's data-parallel place: a World over the M groups
    out: Path
    ds: _data.TextData
    model: nn.Module
    opt: torch.optim.Optimizer
    history: LMHistory
    args: dict
    tok_spec: str
    seed: int
    batch_size: int
    context: int
    accum_steps: int
    bf16: bool
    clip: float | None
    keep: int
    val_batches: list[Tensor]
    extra: dict[str, str]


def _train_loop(run: _Run, start: int, stop: int, steps: int, lr_at, start_ckpt, *, eval_every: int,
                ckpt_every: int, progress: bool, plot: bool):
    """Optimizer steps start..stop-1 with validation, checkpoints, progress and the loss curve;
    returns (the last checkpoint, training tokens over all ranks, seconds)."""
    world, model, out, history = run.world, run.model, run.out, run.history
    # every rank starts from the same weights (same seed or checkpoint); DDP also broadcasts rank 0's
    net = model
    if world.distributed:
        net = nn.parallel.DistributedDataParallel(model)
    out.mkdir(parents=True, exist_ok=True)
    _dist.barrier(world)                        # every rank has read `out` before rank 0 writes to it
    bar = _Progress(steps, start, max(1, steps // 20)) if progress and world.main else None
    params = [p for p in model.parameters() if p.requires_grad]
    last_ckpt, t0, tokens = start_ckpt, time.perf_counter(), 0
    model.train()
    try:
        for step in range(start, stop):
            rate = lr_at(step)
            value, norm, n, step_tokens = _train_step(run, net, params, step, rate)
            tokens += step_tokens
            history.loss.append(value)
            history.lr.append(rate)
            history.grad_norm.append(float(norm))
            done = step + 1
            val = None
            if (eval_every and done % eval_every == 0) or done == stop:
                vl = _validate(run)
                val = (done, vl, vl * run.ds.tokens_per_char / math.log(2))
                history.val.append(val)
            if bar is not None:
                bar.update(done, value, n * run.accum_steps, val)
            if (ckpt_every and done % ckpt_every == 0) or done == stop:
                # rank 0 writes (all ranks hold the same weights and state); the others wait for it
                last_ckpt = _save(run, done) if world.main else out / _ckpt.step_dir_name(done)
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
    return last_ckpt, tokens, time.perf_counter() - t0


def _train_step(run: _Run, net: nn.Module, params: list[Tensor], step: int, rate: float):
    """One optimizer step at learning rate `rate` over `accum_steps` micro-batches of this rank's
    rows; returns (the global batch's mean loss, gradient norm, tokens of one micro-batch on this
    rank, tokens over all ranks)."""
    world, opt = run.world, run.opt
    for g in opt.param_groups:
        g["lr"] = rate
    opt.zero_grad(set_to_none=True)
    total, tokens = 0.0, 0
    for k in range(run.accum_steps):
        x = run.ds.batch(step, run.batch_size, run.context, seed=run.seed, micro=k)       # (B, T+1)
        x = _dist.shard_rows(x, run.dp)                                                 # (B/M, T+1)
        # gradients are averaged over ranks once, on the last micro-batch
        sync = not world.distributed or k == run.accum_steps - 1
        with contextlib.nullcontext() if sync else net.no_sync():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=run.bf16):
                loss, n = lm_loss(net, x, cp=run.cp)
            (loss / run.accum_steps).backward()
        total += float(loss.detach())
        tokens += n * world.size
    # equal tokens per rank: the global batch's mean loss is the mean of the ranks' means
    value = _dist.all_sum([total], world)[0] / (run.accum_steps * world.size)
    if not math.isfinite(value):
        raise FloatingPointError(f"loss is {value} at step {step}; lower lr (now {rate:.3g}) or raise warmup")
    norm = torch.nn.utils.clip_grad_norm_(params, run.clip if run.clip is not None else float("inf"))
    opt.step()
    return value, norm, n, tokens


def _validate(run: _Run) -> float:
    """The validation loss (nats per token) of the whole run: each rank scores every W-th window
    batch; the sums over ranks give the one-process mean."""
    world = run.world
    dp = run.dp
    total, count = _dist.all_sum(list(_lm_sums(run.model, run.val_batches[dp.rank::dp.size], bf16=run.bf16, cp=run.cp)),
                                 world)
    return total / count


def _save(run: _Run, step: int):
    """Write the checkpoint of `step` (`qkv.checkpoint.save`: weights, optimizer and RNG state, the
    arguments, the history and the tokenizer.json); returns its directory."""
    opt_tensors, groups = _optimizer_state(run.opt)
    rng_tensors, rng_json = _rng_state()
    tokenizer = run.ds.tokenizer
    state = {"args": run.args, "data_sha256": run.ds.sha256, "data_position": {"seed": run.seed, "step": step},
             "optimizer": {"param_groups": groups}, "scheduler": {"kind": "cosine", "step": step},
             "rng": rng_json, "history": run.history.to_dict(),
             "tokenizer": {"spec": run.tok_spec, "vocab_size": tokenizer.vocab_size,
                           "alphabet": getattr(tokenizer, "alphabet", None)}}
    return _ckpt.save(run.out, step, run.model, {**opt_tensors, **rng_tensors}, state, keep=run.keep,
                      extra_files=run.extra)
