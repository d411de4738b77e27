"""`qkv bench train`: training throughput of qkv's decoder against Hugging Face GPT-2, and data parallelism.

Legend: B global batch (sequences per step), Br batch per process, L context (tokens per
sequence), V vocabulary, d model width, H heads; a step trains on B * L tokens; fp32, CPU.

A step is what a training loop does once: a teacher-forced causal forward over
tokens[:, :-1] (B, L), the mean cross-entropy of the logits (B, L, V) against
tokens[:, 1:], backward, gradient clipping to a global norm of 1.0, and an AdamW
step (lr 6e-4 constant, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices
and embeddings, none on biases and norm weights). Both sides run the same code
around their model; only the model differs.

The model: GPT-2 style, 6 layers, d=384, 6 heads, MLP 4d, learned positions,
tied LM head, L=256, B=16, V=8192 (the size of a small subword vocabulary: the LM
head is then about a fifth of the step's matrix work, as in a real small GPT; the
tokens are seeded uniform random ids, since throughput does not depend on their
values). No dropout on either side.

1. qkv vs transformers: `qkv.models.Decoder` (`DecoderConfig.gpt2`) with seeded
   weights, written with `qkv.models.hf.save` and read by `GPT2LMHeadModel.from_pretrained`
   with a `GPT2Config` of the same sizes (dropout 0, HF's default attention, "sdpa"),
   so both start from identical weights; HF is called with use_cache=False, as
   training needs no cache. First both compute the loss of the first batch (no
   gradient): the difference is reported. Then a few warm-up steps each and
   rounds of timed blocks, the order alternating every round (qkv, HF; HF, qkv;
   ...) so that a busy spell of the machine hits both sides alike; tokens/s is
   the median of the per-block rates. Both sides train on the same batches in
   the same order, so their loss curves must agree step for step (reported: the
   largest difference). Goal: qkv tokens/s >= 1.1x HF's.
2. data parallel on the CPU: 2 processes (fresh interpreters, 1 torch thread
   each, gloo over loopback, rendezvous and commands through a TCPStore on a port
   the OS picks) each run `DistributedDataParallel` around the qkv decoder on
   Br = B / 2 of every global batch, against 1 process
   at 2 threads and 1 process at 1 thread on the whole batch. The three start
   from the same weights and take the same batches; blocks rotate as above. Global
   tokens/s of each and the scaling ratios; the 2-process losses (the mean of the
   two halves' losses, which is the whole batch's mean: the halves hold equally
   many tokens) must equal the 1-process ones up to float rounding.

Beside wall-clock tokens/s each block records the process's CPU time (all threads;
all ranks of the data-parallel group): tokens per CPU-second is less distorted
than wall time when other work shares the cores.

`--quick`: a tiny model (2 layers, d=64, 4 heads, V=256), L=32, B=4, a few steps;
seconds. `--profile`: one more step per side under `torch.profiler`, and a table of
the operators that take the time. Writes train.json and train.md under the output
directory. Timings are for reading: another process on the machine slows whichever
block it overlaps; the goals say met / not met but nothing here fails a test.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv._util.checks import check_int
from qkv.tools import harness
from qkv.tools.harness import (bench_main, format_machine, format_table, machine_info, quiet_transformers, ratio,
                               rounded, usable_cores, write_results)

__all__ = ["run", "main", "Sizes", "FULL", "QUICK", "HYPER", "LOSS_RTOL", "render", "make_batch", "make_optimizer",
           "train_step", "build_models", "loss_agreement", "compare_hf", "data_parallel", "profile_step"]


@dataclass(frozen=True)
class Sizes:
    """Every size the benchmark uses (FULL, or QUICK for --quick)."""

    n_layers: int
    d_model: int
    n_heads: int
    vocab: int                  # V
    context: int                # L
    batch: int                  # B, global
    warmup: int                 # untimed steps per side before the timed blocks
    rounds: int                 # timed blocks per side
    block_steps: int            # steps per timed block
    ddp_warmup: int
    ddp_rounds: int
    ddp_block_steps: int
    processes: int              # data-parallel processes (1 thread each)


FULL = Sizes(n_layers=6, d_model=384, n_heads=6, vocab=8192, context=256, batch=16, warmup=2, rounds=6,
             block_steps=1, ddp_warmup=1, ddp_rounds=5, ddp_block_steps=1, processes=2)
QUICK = Sizes(n_layers=2, d_model=64, n_heads=4, vocab=256, context=32, batch=4, warmup=1, rounds=3,
              block_steps=2, ddp_warmup=1, ddp_rounds=2, ddp_block_steps=2, processes=2)

# AdamW and clipping, the same on every side.
HYPER = {"lr": 6e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "clip": 1.0}

# Two float32 loss computations of the same batch and weights agree to rounding: a
# relative difference above this is reported as a disagreement.
LOSS_RTOL = 1e-4


# ----------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------

def _max_abs_diff(a: Sequence[float], b: Sequence[float]) -> float | None:
    n = min(len(a), len(b))
    return max(abs(x - y) for x, y in zip(a[:n], b[:n])) if n else None


def _agree(diff: float | None, scale: float) -> bool | None:
    return None if diff is None else diff <= LOSS_RTOL * max(1.0, abs(scale))


# ----------------------------------------------------------------------------
# Batches, models, one training step
# ----------------------------------------------------------------------------

def make_batch(step: int, s: Sizes, seed: int) -> Tensor:
    """The tokens of global step `step`: (B, L + 1) ids, seeded uniform in [0, V)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * step + 1)
    return torch.randint(0, s.vocab, (s.batch, s.context + 1), generator=g)


def decoder_config(s: Sizes):
    from qkv.models import DecoderConfig

    return DecoderConfig.gpt2(n_layers=s.n_layers, d_model=s.d_model, n_heads=s.n_heads, vocab_size=s.vocab,
                              max_positions=s.context)


def _qkv_model(s: Sizes, seed: int):
    from qkv.models import Decoder

    torch.manual_seed(seed)
    return Decoder(decoder_config(s)).train()


def _hf_config(s: Sizes):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=s.vocab, n_positions=s.context, n_embd=s.d_model, n_layer=s.n_layers,
                      n_head=s.n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                      eos_token_id=None, pad_token_id=None)


def build_models(s: Sizes, seed: int):
    """(qkv Decoder, HF GPT2LMHeadModel) with the same weights, both in training mode: the qkv
    model's are written with `qkv.models.hf.save` and read with `from_pretrained`."""
    from transformers import GPT2LMHeadModel

    from qkv.models import hf as qkv_hf

    model = _qkv_model(s, seed)
    with tempfile.TemporaryDirectory(prefix="qkv-bench-train-") as d:
        qkv_hf.save(model, d)
        hf_model, info = GPT2LMHeadModel.from_pretrained(d, config=_hf_config(s), output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise RuntimeError(f"the qkv checkpoint did not load cleanly into GPT2LMHeadModel: {problems}")
    return model, hf_model.train()


def _hf_logits(hf_model) -> Callable[[Tensor], Tensor]:
    return lambda x: hf_model(input_ids=x, use_cache=False).logits


def make_optimizer(model: nn.Module) -> torch.optim.AdamW:
    """AdamW with `HYPER`: decay on matrices and embeddings (dim >= 2), none on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]          # a tied matrix once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": HYPER["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=HYPER["lr"], betas=HYPER["betas"], eps=HYPER["eps"])


def _loss(logits_fn: Callable[[Tensor], Tensor], tokens: Tensor) -> Tensor:
    """Mean next-token cross-entropy: tokens (B, L + 1) -> logits of tokens[:, :-1] vs tokens[:, 1:]."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]                      # (B, L) x2
    logits = logits_fn(inputs)                                           # (B, L, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def train_step(logits_fn: Callable[[Tensor], Tensor], params: list[Tensor], opt: torch.optim.Optimizer,
               tokens: Tensor) -> dict:
    """One step: forward + loss, backward, clip, AdamW. Returns the loss and the phases' seconds."""
    t0 = time.perf_counter()
    loss = _loss(logits_fn, tokens)
    t1 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(params, HYPER["clip"])
    opt.step()
    t3 = time.perf_counter()
    return {"loss": float(loss.detach()), "forward_s": t1 - t0, "backward_s": t2 - t1, "optimizer_s": t3 - t2,
            "step_s": t3 - t0}


class _Trainer:
    """One contender: a model, its optimizer, its next step, and what its steps measured."""

    def __init__(self, name: str, logits_fn, model: nn.Module, s: Sizes, seed: int, threads: int | None = None):
        self.name, self.logits_fn, self.s, self.seed, self.threads = name, logits_fn, s, seed, threads
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = make_optimizer(model)
        self.step = 0
        self.losses: list[float] = []
        self.records: list[dict] = []      # timed steps only
        self.blocks: list[dict] = []

    def run(self, n: int, timed: bool) -> float:
        """`n` steps on the next batches; seconds they took."""
        batches = [make_batch(self.step + i, self.s, self.seed) for i in range(n)]     # made before the clock
        with harness.threads(self.threads) if self.threads else contextlib.nullcontext():
            t0, c0 = time.perf_counter(), time.process_time()
            for tokens in batches:
                rec = train_step(self.logits_fn, self.params, self.opt, tokens)
                self.step += 1
                self.losses.append(rec["loss"])
                if timed:
                    self.records.append(rec)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        if timed:
            self.blocks.append(_block(n, seconds, cpu, self.s))
        return seconds


def _block(steps: int, seconds: float, cpu_s: float, s: Sizes) -> dict:
    tokens = steps * s.batch * s.context
    return {"steps": steps, "seconds": seconds, "cpu_s": cpu_s, "tok_s": tokens / seconds,
            "tok_per_cpu_s": tokens / cpu_s if cpu_s > 0 else None}


def _alternate(contenders: Sequence, rounds: int, block_steps: int, log) -> None:
    """`rounds` timed blocks per contender, the order rotating every round."""
    n = len(contenders)
    for r in range(rounds):
        order = [contenders[(r + i) % n] for i in range(n)] if n > 2 else \
            (list(contenders) if r % 2 == 0 else list(contenders)[::-1])
        shown = []
        for c in order:
            seconds = c.run(block_steps, timed=True)
            shown.append(f"{c.name} {c.blocks[-1]['tok_s']:,.0f} tok/s ({seconds:.2f} s)")
        log(f"  round {r + 1}/{rounds}: " + ", ".join(shown))


def _paired(a: Sequence[dict], b: Sequence[dict]) -> float | None:
    """The median over rounds of a's block rate / b's in the same round."""
    ratios = [x["tok_s"] / y["tok_s"] for x, y in zip(a, b)]
    return rounded(statistics.median(ratios), 3) if ratios else None


def _summary(blocks: Sequence[dict], records: Sequence[dict]) -> dict:
    rates = [b["tok_s"] for b in blocks]
    per_cpu = [b["tok_per_cpu_s"] for b in blocks if b["tok_per_cpu_s"]]
    def ms(key: str) -> float | None:                     # a phase the records do not time: None
        values = [r[key] for r in records if key in r]
        return rounded(statistics.median(values) * 1e3, 2) if values else None

    return {"blocks": len(blocks), "steps": sum(b["steps"] for b in blocks),
            "tok_s": rounded(statistics.median(rates), 2),
            "tok_s_min": rounded(min(rates), 2), "tok_s_max": rounded(max(rates), 2),
            "block_tok_s": [rounded(x, 2) for x in rates], "step_ms": ms("step_s"), "forward_ms": ms("forward_s"),
            "backward_ms": ms("backward_s"), "optimizer_ms": ms("optimizer_s"),
            "tok_per_cpu_s": rounded(statistics.median(per_cpu), 2) if per_cpu else None,
            "cpu_ms_per_step": rounded(statistics.median(b["cpu_s"] / b["steps"] for b in blocks) * 1e3, 2)}


# ----------------------------------------------------------------------------
# 1. qkv against transformers
# ----------------------------------------------------------------------------

def loss_agreement(model, hf_model, tokens: Tensor) -> dict:
    """Both models' loss on one batch, no gradient (training mode, no dropout)."""
    with torch.no_grad():
        a = float(_loss(model, tokens))
        b = float(_loss(_hf_logits(hf_model), tokens))
    diff = abs(a - b)
    return {"qkv": a, "hf": b, "abs_diff": diff, "rel_diff": diff / max(abs(b), 1e-30), "agree": _agree(diff, b)}


def compare_hf(model, hf_model, s: Sizes, seed: int, log, profile: bool = False) -> dict:
    """Warm-up, then alternating timed blocks of qkv and HF training steps on the same batches
    (with `profile`, then one profiled step each: `out["profile"]`)."""
    qkv_side = _Trainer("qkv", model, model, s, seed)
    hf_side = _Trainer("HF", _hf_logits(hf_model), hf_model, s, seed)
    log(f"  warm-up: {s.warmup} step(s) each ...")
    for side in (qkv_side, hf_side):
        side.run(s.warmup, timed=False)
    _alternate((qkv_side, hf_side), s.rounds, s.block_steps, log)
    out = {"qkv": _summary(qkv_side.blocks, qkv_side.records), "hf": _summary(hf_side.blocks, hf_side.records)}
    out["ratio"] = rounded(ratio(out["qkv"]["tok_s"], out["hf"]["tok_s"]), 3)
    out["paired_ratio"] = _paired(qkv_side.blocks, hf_side.blocks)     # the same round's blocks, qkv / HF
    out["paired_ratios"] = [rounded(a["tok_s"] / b["tok_s"], 3) for a, b in zip(qkv_side.blocks, hf_side.blocks)]
    out["cpu_ratio"] = rounded(ratio(out["qkv"]["tok_per_cpu_s"], out["hf"]["tok_per_cpu_s"]), 3)
    diff = _max_abs_diff(qkv_side.losses, hf_side.losses)
    out["losses"] = {"qkv": [rounded(x, 6) for x in qkv_side.losses], "hf": [rounded(x, 6) for x in hf_side.losses],
                     "steps": min(len(qkv_side.losses), len(hf_side.losses)), "max_abs_diff": diff,
                     "agree": _agree(diff, hf_side.losses[0])}
    if profile:
        log("  profiling one more step per side ...")
        out["profile"] = profile_step([("qkv", qkv_side), ("HF", hf_side)])
    return out


# ----------------------------------------------------------------------------
# 2. data parallel: 2 processes against 1
# ----------------------------------------------------------------------------

def _ddp_worker(rank: int, world: int, port: int, state_path: str, sizes: dict, seed: int, timeout_s: float) -> None:
    """One data-parallel process: 1 thread, gloo, DDP around the qkv decoder, rows
    [rank * Br, (rank + 1) * Br) of every global batch. Commands and results travel
    through the parent's TCPStore (127.0.0.1:port): "cmd/{i}" = {"first", "n"} or
    {"stop": true}; it answers "done/{i}/{rank}" = {"seconds", "cpu_s", "losses"}, or
    "error/{rank}" = a traceback."""
    import datetime

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    store = dist.TCPStore("127.0.0.1", port, None, False, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", store=dist.PrefixStore("pg/", store), rank=rank, world_size=world)
        s = Sizes(**sizes)
        model = _qkv_model(s, seed)
        model.load_state_dict(torch.load(state_path, weights_only=True))
        ddp = DistributedDataParallel(model)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(model)
        per = s.batch // world                                             # Br
        store.set(f"ready/{rank}", "1")
        i = 0
        while True:
            cmd = json.loads(store.get(f"cmd/{i}"))
            if cmd.get("stop"):
                break
            first, n = cmd["first"], cmd["n"]
            batches = [make_batch(step, s, seed)[rank * per:(rank + 1) * per] for step in range(first, first + n)]
            losses = []                                                    # batches: n x (Br, L + 1)
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            for tokens in batches:
                losses.append(train_step(ddp, params, opt, tokens)["loss"])
            dist.barrier()
            store.set(f"done/{i}/{rank}", json.dumps({"seconds": time.perf_counter() - t0,
                                                      "cpu_s": time.process_time() - c0, "losses": losses}))
            i += 1
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - the parent must hear of it rather than wait
        store.set(f"error/{rank}", traceback.format_exc())
        raise SystemExit(1)


def _worker_main() -> None:
    """Entry point of a data-parallel process: argv = rank world port state_path sizes_json seed timeout_s."""
    rank, world, port, state_path, sizes, seed, timeout_s = sys.argv[1:8]
    _ddp_worker(int(rank), int(world), int(port), state_path, json.loads(sizes), int(seed), float(timeout_s))


class _Group:
    """The data-parallel processes (fresh interpreters, `python -c`), driven block by block from here."""

    def __init__(self, s: Sizes, seed: int, state: dict, workdir: str, timeout_s: float):
        import datetime
        import subprocess

        import torch.distributed as dist

        self.s, self.timeout_s, self.step, self.i = s, timeout_s, 0, 0
        self.name = f"{s.processes} processes x 1 thread"
        self.threads = None
        self.losses: list[float] = []
        self.records: list[dict] = []
        self.blocks: list[dict] = []
        state_path = os.path.join(workdir, "state.pt")
        torch.save(state, state_path)
        # port 0: the OS picks a free port; only this machine's loopback is used
        self.store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=timeout_s),
                                   wait_for_workers=False)
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[3])          # the directory holding qkv/
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        env["OMP_NUM_THREADS"] = "1"
        if sys.platform.startswith("linux"):
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")                     # gloo over loopback
        code = "from qkv.tools.bench.train import _worker_main; _worker_main()"
        self.logs = [open(os.path.join(workdir, f"rank{r}.log"), "w+b") for r in range(s.processes)]
        t0 = time.perf_counter()
        self.procs = [subprocess.Popen([sys.executable, "-c", code, str(rank), str(s.processes), str(self.store.port),
                                        state_path, json.dumps(asdict(s)), str(seed), str(timeout_s)],
                                       env=env, stdin=subprocess.DEVNULL, stdout=self.logs[rank],
                                       stderr=subprocess.STDOUT)
                      for rank in range(s.processes)]
        self._wait([f"ready/{r}" for r in range(s.processes)])
        self.start_s = time.perf_counter() - t0

    def _wait(self, keys: list[str]) -> list[str]:
        """The values of `keys` once every process has set its own; a failed process raises."""
        deadline = time.perf_counter() + self.timeout_s
        while not self.store.check(keys):
            failed = [r for r, p in enumerate(self.procs) if p.poll() is not None]
            if failed or time.perf_counter() > deadline:
                self.close(kill=True)
                if not failed:
                    raise RuntimeError(f"the data-parallel processes gave no answer in {self.timeout_s:.0f} s")
                r = failed[0]
                why = (self.store.get(f"error/{r}").decode() if self.store.check([f"error/{r}"]) else
                       self._log_tail(r))
                raise RuntimeError(f"data-parallel process {r} stopped (exit code {self.procs[r].returncode}):\n{why}")
            time.sleep(0.02)
        return [self.store.get(k).decode() for k in keys]

    def _log_tail(self, rank: int) -> str:
        f = self.logs[rank]
        f.flush()
        f.seek(0)
        return f.read().decode(errors="replace")[-4000:]

    def run(self, n: int, timed: bool) -> float:
        self.store.set(f"cmd/{self.i}", json.dumps({"first": self.step, "n": n}))
        done = [json.loads(v) for v in self._wait([f"done/{self.i}/{r}" for r in range(len(self.procs))])]
        self.i += 1
        self.step += n
        seconds = max(d["seconds"] for d in done)
        self.losses += [sum(ls) / len(ls) for ls in zip(*(d["losses"] for d in done))]  # equal halves: the mean
        if timed:
            self.records += [{"step_s": seconds / n}] * n
            self.blocks.append(_block(n, seconds, sum(d["cpu_s"] for d in done), self.s))  # CPU time of all ranks
        return seconds

    def close(self, kill: bool = False) -> None:
        """Stop the processes (`kill`: at once, e.g. when one failed and the others wait for it)."""
        with contextlib.suppress(Exception):
            self.store.set(f"cmd/{self.i}", json.dumps({"stop": True}))
        for p in self.procs:
            try:
                if kill and p.poll() is None:
                    p.kill()
                p.wait(timeout=30)
            except Exception:  # noqa: BLE001 - a stuck process is ended
                p.kill()
                p.wait(timeout=10)
        for f in self.logs:
            f.close()


def data_parallel(state: dict, s: Sizes, seed: int, threads: int, log, timeout_s: float = 600.0) -> dict:
    """`s.processes` DDP processes of 1 thread against 1 process at `threads` threads and at 1 thread."""
    if s.batch % s.processes:
        raise ValueError(f"the global batch {s.batch} must split evenly over {s.processes} processes")
    one = []
    for n in dict.fromkeys((threads, 1)):                              # (threads, 1), or (1,) alone
        model = _qkv_model(s, seed)
        model.load_state_dict(state)
        one.append(_Trainer(f"1 process x {n} thread{'s' if n > 1 else ''}", model, model, s, seed, threads=n))
    with tempfile.TemporaryDirectory(prefix="qkv-bench-ddp-") as workdir:
        log(f"  starting {s.processes} processes (gloo) ...")
        group = _Group(s, seed, state, workdir, timeout_s)
        try:
            log(f"  started in {group.start_s:.1f} s; warm-up: {s.ddp_warmup} step(s) each ...")
            contenders = [*one, group]
            for c in contenders:
                c.run(s.ddp_warmup, timed=False)
            _alternate(contenders, s.ddp_rounds, s.ddp_block_steps, log)
        finally:
            group.close()
    base, single = one[0], one[-1]
    rows = []
    entries = [(base, 1, threads)] + ([(single, 1, 1)] if single is not base else []) + [(group, s.processes, 1)]
    for c, procs, per_thread in entries:
        row = {"setup": c.name, "processes": procs, "threads_each": per_thread, "global_batch": s.batch,
               "batch_each": s.batch // procs, **_summary(c.blocks, c.records)}
        diff = _max_abs_diff(c.losses, base.losses)
        row["loss_max_abs_diff_vs_1proc"] = diff
        row["losses_agree"] = _agree(diff, base.losses[0])
        row["losses"] = [rounded(x, 6) for x in c.losses]
        row["paired_vs_1proc"] = _paired(c.blocks, base.blocks)
        rows.append(row)
    by = {r["setup"]: r for r in rows}
    dp, b1 = by[group.name], by[base.name]
    s1 = by.get(single.name, b1)
    return {"rows": rows, "start_s": rounded(group.start_s, 2),
            "steps_compared": min(len(base.losses), len(group.losses)),
            "vs_1proc_threads": rounded(ratio(dp["tok_s"], b1["tok_s"]), 3),
            "vs_1proc_1thread": rounded(ratio(dp["tok_s"], s1["tok_s"]), 3),
            "paired_vs_1proc_threads": _paired(group.blocks, base.blocks),
            "paired_vs_1proc_1thread": _paired(group.blocks, single.blocks),
            "threads_scaling": rounded(ratio(b1["tok_s"], s1["tok_s"]), 3),
            "loss_max_abs_diff": dp["loss_max_abs_diff_vs_1proc"], "losses_agree": dp["losses_agree"],
            "threads": threads, "processes": s.processes}


# ----------------------------------------------------------------------------
# --profile: where the time goes
# ----------------------------------------------------------------------------

def profile_step(sides: Sequence[tuple[str, _Trainer]], top: int = 14) -> dict:
    """One more step per side under torch.profiler: self CPU ms per operator, the top ones."""
    from torch.profiler import ProfilerActivity, profile

    per: dict[str, dict[str, float]] = {}
    totals: dict[str, float] = {}
    for name, side in sides:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            side.run(1, timed=False)
        ops = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
        per[name] = ops
        totals[name] = sum(ops.values())
    names = [n for n, _ in sides]
    keys = sorted({k for ops in per.values() for k in ops}, key=lambda k: -max(per[n].get(k, 0.0) for n in names))
    rows = [{"op": k, **{n: rounded(per[n].get(k, 0.0), 1) for n in names}} for k in keys[:top]]
    return {"sides": names, "rows": rows, "total_ms": {n: rounded(t, 1) for n, t in totals.items()}}


# ----------------------------------------------------------------------------
# Goals and rendering
# ----------------------------------------------------------------------------

def _goal(goal: str, measured, target, direction: str, unit: str = "x") -> dict:
    met = None
    if measured is not None:
        met = measured >= target if direction == ">=" else measured <= target
    return {"goal": goal, "measured": measured, "target": target, "direction": direction, "unit": unit, "met": met}


def evaluate_goals(result: dict) -> list[dict]:
    cmp, ag = result["hf"], result["agreement"]
    goals = [
        _goal("qkv training tokens/s / HF's (median of blocks)", cmp["ratio"], 1.1, ">="),
        _goal("loss of the first batch: relative difference qkv vs HF", rounded(ag["rel_diff"], 10), LOSS_RTOL, "<=",
              "rel"),
        _goal(f"loss curves over {cmp['losses']['steps']} steps: largest difference qkv vs HF",
              rounded(cmp["losses"]["max_abs_diff"], 8), rounded(LOSS_RTOL * max(1.0, abs(cmp["losses"]["hf"][0])), 8),
              "<=", "abs"),
    ]
    dp = result.get("ddp")
    if dp and "rows" in dp:
        goals.append(_goal(f"{dp['processes']}-process losses: largest difference from 1 process",
                           rounded(dp["loss_max_abs_diff"], 8),
                           rounded(LOSS_RTOL * max(1.0, abs(dp["rows"][0]["losses"][0])), 8), "<=", "abs"))
    return goals


def _f(x, fmt: str = "{:.2f}") -> str:
    return "n/a" if x is None else fmt.format(x)


_GOAL_HEADER = ("goal", "measured", "target", "verdict")


def _goal_cells(goals: Sequence[dict]) -> list[list[str]]:
    body = []
    for g in goals:
        if g["unit"] == "x":
            shown, target = _f(g["measured"], "{:.2f}x"), f"{g['target']:g}x"
        else:
            shown, target = _f(g["measured"], "{:.2e}"), f"{g['target']:.2e}"
        verdict = "n/a" if g["met"] is None else ("met" if g["met"] else "NOT met")
        body.append([g["goal"], shown, f"{g['direction']} {target}", verdict])
    return body


_MAIN_HEADER = ("contender", "tokens/s", "min..max", "vs HF", "step ms", "forward ms", "backward ms",
                "optimizer ms", "CPU ms/step", "tokens/CPU-s", "vs HF (CPU)", "blocks x steps")


def _main_cells(result: dict) -> list[list[str]]:
    cmp = result["hf"]
    body = []
    for key, label in (("qkv", "qkv Decoder"), ("hf", f"HF GPT2LMHeadModel ({result['config']['hf_attn']})")):
        r = cmp[key]
        vs = "-" if key == "hf" else f"{_f(cmp['ratio'], '{:.2f}x')} (paired {_f(cmp['paired_ratio'], '{:.2f}x')})"
        body.append([label, _f(r["tok_s"], "{:,.0f}"), f"{r['tok_s_min']:,.0f}..{r['tok_s_max']:,.0f}", vs,
                     _f(r["step_ms"], "{:.0f}"), _f(r["forward_ms"], "{:.0f}"), _f(r["backward_ms"], "{:.0f}"),
                     _f(r["optimizer_ms"], "{:.0f}"), _f(r["cpu_ms_per_step"], "{:.0f}"),
                     _f(r["tok_per_cpu_s"], "{:,.0f}"), "-" if key == "hf" else _f(cmp["cpu_ratio"], "{:.2f}x"),
                     f"{r['blocks']} x {r['steps'] // max(r['blocks'], 1)}"])
    return body


_DDP_HEADER = ("setup", "batch each", "tokens/s", "min..max", "vs 1 process", "step ms", "CPU ms/step",
               "losses vs 1 process")


def _ddp_cells(dp: dict) -> list[list[str]]:
    body = []
    base = dp["rows"][0]
    for r in dp["rows"]:
        diff = "-" if r is base else (f"largest diff {r['loss_max_abs_diff_vs_1proc']:.2e} "
                                       f"({'equal' if r['losses_agree'] else 'DIFFERENT'})")
        body.append([r["setup"], str(r["batch_each"]), _f(r["tok_s"], "{:,.0f}"),
                     f"{r['tok_s_min']:,.0f}..{r['tok_s_max']:,.0f}",
                     "-" if r is base else f"{_f(ratio(r['tok_s'], base['tok_s']), '{:.2f}x')} "
                                           f"(paired {_f(r['paired_vs_1proc'], '{:.2f}x')})",
                     _f(r["step_ms"], "{:.0f}"), _f(r["cpu_ms_per_step"], "{:.0f}"), diff])
    return body


_PROFILE_HEADER_PREFIX = ("operator (self CPU ms, one step)",)


def _profile_cells(p: dict) -> tuple[list[str], list[list[str]]]:
    header = [*_PROFILE_HEADER_PREFIX, *p["sides"]]
    body = [[row["op"], *(_f(row[n], "{:.0f}") for n in p["sides"])] for row in p["rows"]]
    body.append(["total", *(_f(p["total_ms"][n], "{:.0f}") for n in p["sides"])])
    return header, body


_LEGEND = ("tokens/s: B x L tokens per step / wall seconds, the median over timed blocks (min..max beside it); "
           "blocks alternate between the contenders round by round; 'paired': the median of qkv / HF within "
           "each round; step, forward (with the loss), backward, optimizer (clip + AdamW) ms: medians per step; "
           "CPU ms/step, tokens/CPU-s: the process's CPU time (every thread; all processes of the data-parallel "
           "group), which a busy machine inflates less than wall time (waiting threads still count)")


def _notes(result: dict) -> list[str]:
    c, ag = result["config"], result["agreement"]
    lines = [
        f"model: GPT-2 style, {c['n_layers']} layers, d={c['d_model']}, {c['n_heads']} heads, MLP {4 * c['d_model']}, "
        f"V={c['vocab']}, tied LM head, {c['params'] / 1e6:.2f}M parameters; L={c['context']}, B={c['batch']} "
        f"({c['tokens_per_step']} tokens per step), fp32, seeded random token ids; transformers {c['transformers']}",
        f"optimizer: AdamW lr {c['hyper']['lr']:g}, betas {tuple(c['hyper']['betas'])}, eps {c['hyper']['eps']:g}, "
        f"weight decay {c['hyper']['weight_decay']:g} (matrices and embeddings), clip {c['hyper']['clip']:g}; "
        f"torch threads {c['threads']}",
        f"loss of the first batch: qkv {ag['qkv']:.6f}, HF {ag['hf']:.6f}, difference {ag['abs_diff']:.2e}; "
        f"over the {result['hf']['losses']['steps']} steps both took on the same batches the losses differ by at "
        f"most {_f(result['hf']['losses']['max_abs_diff'], '{:.2e}')}",
        "timings are noisy when anything else runs on the machine (on 2 cores, another process's work slows "
        "whichever block it overlaps, threads that wait on each other most); alternating blocks and medians damp "
        "that, they do not remove it",
    ]
    dp = result.get("ddp")
    if dp and "rows" in dp:
        t = dp["threads"]
        scaling = (f"{dp['processes']} processes / 1 process x {t} threads: {_f(dp['vs_1proc_threads'], '{:.2f}x')} "
                   f"(paired {_f(dp['paired_vs_1proc_threads'], '{:.2f}x')}); / 1 process x 1 thread: "
                   f"{_f(dp['vs_1proc_1thread'], '{:.2f}x')} (paired {_f(dp['paired_vs_1proc_1thread'], '{:.2f}x')}); "
                   f"{t} threads / 1 thread in "
                   f"one process: {_f(dp['threads_scaling'], '{:.2f}x')}" if t != 1 else
                   f"{dp['processes']} processes / 1 process x 1 thread: {_f(dp['vs_1proc_1thread'], '{:.2f}x')}")
        lines.append(f"data parallel: {dp['processes']} processes x 1 thread, DistributedDataParallel (gloo), batch "
                     f"{c['batch'] // dp['processes']} each, started in {dp['start_s']:.1f} s (not timed); {scaling}; "
                     f"losses over {dp['steps_compared']} steps: largest difference "
                     f"{_f(dp['loss_max_abs_diff'], '{:.2e}')} ({'equal' if dp['losses_agree'] else 'DIFFERENT'} "
                     f"within {LOSS_RTOL:g} x loss)")
    elif dp:
        lines.append(f"data parallel: skipped ({dp['skipped']})")
    return lines


def render(result: dict, *, markdown: bool = False) -> str:
    """The result as text (or Markdown): the main table, the goals, data parallelism, notes."""
    main = format_table(_MAIN_HEADER, _main_cells(result), left=(0, 2, 3), markdown=markdown)
    goals = format_table(_GOAL_HEADER, _goal_cells(result["goals"]), left=(0, 3), markdown=markdown)
    dp = result.get("ddp")
    ddp = format_table(_DDP_HEADER, _ddp_cells(dp), left=(0, 3, 4, 7), markdown=markdown) if dp and "rows" in dp \
        else None
    prof = None
    if result.get("profile"):
        header, body = _profile_cells(result["profile"])
        prof = format_table(header, body, left=(0,), markdown=markdown)
    notes = _notes(result)
    if markdown:
        parts = [f"# qkv training benchmark{' (quick)' if result['quick'] else ''}", "",
                 format_machine(result["machine"]) + ".", "", _LEGEND + ".", "", "## qkv vs transformers", "", main,
                 "", "## Goals", "", goals, ""]
        if ddp:
            parts += ["## Data parallel (qkv decoder, same global batch)", "", ddp, ""]
        if prof:
            parts += ["## Where the time goes (torch.profiler, one step each)", "", prof, ""]
        parts += ["## Notes", "", *[f"- {n}" for n in notes], "", f"Finished in {result['seconds']:.0f} s.", ""]
        return "\n".join(parts)
    parts = [format_machine(result["machine"]), "", main, "", _LEGEND, "", "goals:", goals, ""]
    if ddp:
        parts += ["data parallel (qkv decoder, same global batch):", ddp, ""]
    if prof:
        parts += ["where the time goes (torch.profiler, one step each):", prof, ""]
    return "\n".join(parts + notes)


# ----------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------

def run(out_dir="runs/bench", quick: bool = False, *, seed: int = 0, threads: int | None = None,
        ddp: bool = True, profile: bool = False, verbose: bool = True) -> dict:
    """Run the training benchmark; print the tables; write train.json and train.md.

    `quick`: a tiny model (seconds). `threads`: torch threads of the qkv-vs-HF part
    and of the 1-process data-parallel baseline (default: every usable core; the
    setting is restored afterwards). `ddp`: run the data-parallel part. `profile`:
    add one profiled step per side and a table of the operators that take the time.
    Returns what was written to train.json.
    """
    if threads is not None:
        check_int("threads", threads, 1)
    check_int("seed", seed, 0)
    try:
        import transformers
    except ImportError as exc:
        raise ValueError("the training benchmark compares against Hugging Face transformers: "
                         "pip install transformers (or the project's [dev] extra)") from exc
    s = QUICK if quick else FULL
    log = (lambda m: print(m, flush=True)) if verbose else (lambda m: None)
    n_threads = threads or usable_cores()
    with harness.threads(n_threads), quiet_transformers():
        return _run(s, out_dir, quick, seed, n_threads, ddp, profile, log, transformers.__version__)


def _warn(log, what: str) -> None:
    bar = "!" * 78
    log(f"{bar}\n!!! WARNING: {what}\n{bar}")


def _run(s: Sizes, out_dir, quick: bool, seed: int, threads: int, ddp: bool, profile: bool, log,
         hf_version: str) -> dict:
    started = time.perf_counter()
    info = machine_info()
    log(format_machine(info))
    log(f"training benchmark{' (quick)' if quick else ''}: GPT-2 style {s.n_layers} layers, d={s.d_model}, "
        f"{s.n_heads} heads, V={s.vocab}; L={s.context}, B={s.batch}, fp32, {threads} thread(s); "
        f"transformers {hf_version}")

    log("building the qkv model and loading its weights into GPT2LMHeadModel ...")
    model, hf_model = build_models(s, seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}     # the common start
    params = sum(p.numel() for p in model.parameters())
    hf_attn = getattr(hf_model.config, "_attn_implementation", None) or "default"

    agreement = loss_agreement(model, hf_model, make_batch(0, s, seed))
    log(f"loss of the first batch: qkv {agreement['qkv']:.6f}, HF {agreement['hf']:.6f} "
        f"(difference {agreement['abs_diff']:.2e})")
    if not agreement["agree"]:
        _warn(log, f"qkv and HF losses DIFFER on the same batch and weights: {agreement}")

    log(f"qkv vs HF: {s.rounds} timed block(s) of {s.block_steps} step(s) per side, alternating ...")
    hf = compare_hf(model, hf_model, s, seed, log, profile)
    prof = hf.pop("profile", None)
    if not hf["losses"]["agree"]:
        _warn(log, f"qkv and HF loss curves DIFFER: largest difference {hf['losses']['max_abs_diff']:.3e}")
    log(f"  qkv {hf['qkv']['tok_s']:,.0f} tok/s, HF {hf['hf']['tok_s']:,.0f} tok/s: {hf['ratio']:.2f}x "
        f"(paired {hf['paired_ratio']:.2f}x)")

    del hf_model, model
    gc.collect()

    if ddp:
        log(f"data parallel: {s.processes} processes x 1 thread against 1 process x "
            f"{threads}{' and x 1' if threads != 1 else ''} ...")
        dp = data_parallel(state, s, seed, threads, log)
        log(f"  {s.processes} processes / 1 process x {threads}: {_f(dp['vs_1proc_threads'], '{:.2f}x')}; "
            f"losses: largest difference {_f(dp['loss_max_abs_diff'], '{:.2e}')}")
        if not dp["losses_agree"]:
            _warn(log, f"data-parallel losses DIFFER from one process's: largest difference "
                       f"{dp['loss_max_abs_diff']:.3e}")
    else:
        dp = {"skipped": "ddp=False"}

    result = {
        "benchmark": "train", "quick": bool(quick), "machine": info,
        "config": {**asdict(s), "seed": seed, "dtype": "float32", "params": params, "threads": threads,
                   "tokens_per_step": s.batch * s.context, "hyper": {**HYPER, "betas": list(HYPER["betas"])},
                   "hf_attn": hf_attn, "hf_use_cache": False, "transformers": hf_version,
                   "loss_rtol": LOSS_RTOL},
        "agreement": agreement, "hf": hf, "ddp": dp,
    }
    if prof is not None:
        result["profile"] = prof
    result["goals"] = evaluate_goals(result)
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_results(result, out_dir, "train", render, log)
    return result


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="a tiny model, a few steps (seconds)")
    parser.add_argument("--out", default=os.path.join("runs", "bench"), help="where train.json/.md go")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and batches (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every usable core)")
    parser.add_argument("--no-ddp", action="store_true", help="skip the data-parallel part")
    parser.add_argument("--profile", action="store_true", help="profile one step per side (operator table)")


def _run_from(args) -> None:
    run(args.out, quick=args.quick, seed=args.seed, threads=args.threads, ddp=not args.no_ddp, profile=args.profile)


def main(argv: list[str] | None = None) -> int:
    """`python -m qkv.tools.bench.train` / benchmarks/bench_train.py."""
    return bench_main(argv, prog="bench_train", description=__doc__.splitlines()[0], add_arguments=add_arguments,
                      run=_run_from, errors=(ValueError, TypeError))


if __name__ == "__main__":
    sys.exit(main())
