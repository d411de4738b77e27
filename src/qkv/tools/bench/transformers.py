"""`qkv bench transformers`: `attn_implementation="qkv"` inside a Hugging Face model, against sdpa, eager and flex.

Legend: B batch (1), L sequence length, V vocabulary, h model width, Hq query heads, Hkv
key/value heads, D head dim (h / Hq), W eager's attention weights of one layer
(B x Hq x L x L float32); ms milliseconds; GiB 2^30 bytes; fp32, CPU.

The model: a Llama-style transformers decoder with random weights from its config (seeded,
the same weights for every implementation): 4 layers, h=512, Hq=8, Hkv=2 (D=64), MLP 1376,
V=8192 (a small subword vocabulary; the LM head is untied), L=16,384. Two cases:

- packed: `LlamaForCausalLM`, one row of L tokens holding 8 documents of seeded random
  lengths, `position_ids` restarting at each document. transformers finds the documents from
  the resets and builds its packed-sequence mask; qkv's mask function turns that into
  `qkv.masks.document(...) & causal()` (the mask each qkv layer got is recorded, with the
  backend qkv's `auto` picked). Labels at document starts are -100 (no loss across documents).
- window: `MistralForCausalLM` with `sliding_window=1024` (each token sees itself and the
  1,023 before it), the same sizes, plain positions.

For each case and each implementation ("qkv", "sdpa", "eager", "flex_attention"):
forward (`model.eval()`, `torch.no_grad()`, all L logits, no labels) and a training step
(`model.train()`, forward with labels, the loss, backward, AdamW step, grads set to None).
FlexAttention has no backward on the CPU in torch 2.13: its training step is tried and the
error recorded. transformers' flex path compiles `flex_attention` (and builds a BlockMask)
itself.

Every (implementation, case) runs in a fresh process (`python -m qkv.tools.bench.transformers
--child SPEC`) with a fresh, empty TORCHINDUCTOR_CACHE_DIR, so its first forward is what a
user meets in a new program: for flex, compilation; for qkv, the mask translation and tile
classification (no numba: qkv's numba kernels serve decoding only). The first call is
recorded for every implementation; "steady" is the median of the timed calls after it:
a second call is a warm-up when it takes under `long_s` (15 s) and is the first timed call
otherwise (a call that long has nothing left to warm); more timed calls follow up to `runs`
(3) while their sum stays within the cell's budget (60 s forward, 120 s training step).
A first call that alone takes the budget or more is the cell's only figure ("first call
only"), except flex's, which compiles. The repeats of every cell are in the output.

Memory: before each process starts, the bytes each of its passes needs are estimated
(`estimate_bytes`: weights, activations, logits, and what each implementation adds: eager's
2 W per layer in a forward and W per layer kept for backward, sdpa's dense L x L mask in
bool and its float copy per layer, which its backward keeps) and set against what the
machine has (`MemAvailable` less a margin of max(1.5 GiB, 8% of memory)). A pass that does
not fit is refused ("refused: needs X GiB, have Y GiB") and never started. As a safety net
the child caps its own address space (RLIMIT_AS) to what it was allowed, so a short estimate
turns into a clean allocation error, and the parent stops the child should MemAvailable
fall below 0.5 GiB while it runs (other work on the machine): no case is ever OOM-killed.

Goals (ratios of medians; nothing here fails a test): qkv >= 2x sdpa on both cases' forward
and training step; qkv >= 1.2x flex_attention's steady-state forward; qkv's first call >= 10x
faster than flex_attention's; the training step that eager cannot fit is refused or runs
(never an OOM kill). Also recorded: the time spent inside the attention function of each
forward (sum over layers, steady state), so the model's other work (the same for all) can be
told apart; peak RSS per pass against its estimate; agreement of the logits and losses
between implementations; the load average before and after; the machine.

`--quick`: 2 layers, h=64, 4 / 2 heads, V=512, L=512 (4 documents, window 64); seconds per
process. Writes transformers.json and transformers.md under the output directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from qkv.tools.harness import (bench_main, format_machine, format_table, machine_info, ratio, reset_peak,
                               rounded, status_bytes, usable_cores, write_results)

__all__ = ["run", "main", "Sizes", "FULL", "QUICK", "IMPLS", "CASES", "MODES", "GOALS", "estimate_bytes",
           "memory_have", "refusal", "evaluate_goals", "render"]

IMPLS = ("qkv", "sdpa", "eager", "flex_attention")
CASES = ("packed", "window")
MODES = ("fwd", "train")
GiB = 1 << 30
RUNTIME_BYTES = int(0.75 * GiB)      # interpreter + torch + transformers + qkv, resident before the model
MARGIN_BYTES = int(1.5 * GiB)        # at least this much of MemAvailable is left to the rest of the machine
MARGIN_FRACTION = 0.08               # ... or this share of the machine's memory, whichever is more
STOP_BELOW_BYTES = GiB // 2          # the parent stops a child when MemAvailable falls below this
VIRTUAL_SLACK_BYTES = GiB            # address space a child reserves beyond what it touches (stacks, arenas)
PROGRESS = "[progress] "             # a child's progress lines on stderr start with this


@dataclass(frozen=True)
class Sizes:
    """Every size the benchmark uses (FULL, or QUICK for --quick)."""

    length: int                 # L
    documents: int              # packed case
    window: int                 # sliding window (tokens each query sees, itself included)
    layers: int
    hidden: int                 # h
    heads: int                  # Hq
    kv_heads: int               # Hkv
    intermediate: int
    vocab: int                  # V
    runs: int                   # most timed calls per cell
    fwd_budget_s: float         # timed calls of a forward cell stay within this (their sum)
    train_budget_s: float
    long_s: float               # a second call this long is timed, not a warm-up
    child_timeout_s: float


FULL = Sizes(length=16384, documents=8, window=1024, layers=4, hidden=512, heads=8, kv_heads=2, intermediate=1376,
             vocab=8192, runs=3, fwd_budget_s=60.0, train_budget_s=120.0, long_s=15.0, child_timeout_s=2400.0)
QUICK = Sizes(length=512, documents=4, window=64, layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128,
              vocab=512, runs=2, fwd_budget_s=5.0, train_budget_s=5.0, long_s=15.0, child_timeout_s=600.0)

#: (name, case, mode or "first", against, target): qkv's speed-up over `against`
GOALS = (
    ("packed forward: qkv vs sdpa", "packed", "fwd", "sdpa", 2.0),
    ("packed training step: qkv vs sdpa", "packed", "train", "sdpa", 2.0),
    ("window forward: qkv vs sdpa", "window", "fwd", "sdpa", 2.0),
    ("window training step: qkv vs sdpa", "window", "train", "sdpa", 2.0),
    ("packed forward: qkv vs flex_attention (steady state)", "packed", "fwd", "flex_attention", 1.2),
    ("window forward: qkv vs flex_attention (steady state)", "window", "fwd", "flex_attention", 1.2),
    ("packed first call: flex_attention's / qkv's", "packed", "first", "flex_attention", 10.0),
    ("window first call: flex_attention's / qkv's", "window", "first", "flex_attention", 10.0),
)


# ----------------------------------------------------------------------------
# Memory: estimates, what the machine has, refusals
# ----------------------------------------------------------------------------

def parameters(s: Sizes) -> int:
    """The model's parameter count (untied LM head)."""
    d = s.hidden // s.heads
    per_layer = 2 * s.hidden * s.hidden + 2 * s.hidden * s.kv_heads * d + 3 * s.hidden * s.intermediate \
        + 2 * s.hidden
    return s.layers * per_layer + 2 * s.vocab * s.hidden + s.hidden


def estimate_bytes(impl: str, mode: str, s: Sizes) -> dict:
    """What one pass needs at its peak, in bytes, in parts: {"total", "base", "attention", "how"}.

    base (every implementation): the runtime, the weights (forward) or weights, grads and
    AdamW's two moments (training), the activations a forward keeps (training: ~12 h + 4 x
    MLP floats per token per layer) and the logits (training: logits, their float copy, the
    log-softmax and its gradient). attention: eager materialises W = B Hq L^2 float32 per
    layer (a forward holds two at once: scores and their scaled/masked/softmaxed successor;
    training keeps one per layer for backward, plus two in flight) and a float L x L mask;
    sdpa gets transformers' dense bool L x L mask and makes a float copy per call, which its
    backward keeps (one per layer); qkv and flex build nothing L x L (a few per-token tensors).
    Calibrated against measured peaks (eager forward 8k: 4.96 GiB measured, 5.85 estimated;
    sdpa training step 16k: 9.1 measured, 10.5 estimated): estimates err on the high side.
    """
    if impl not in IMPLS or mode not in MODES:
        raise ValueError(f"unknown implementation/mode {impl!r}/{mode!r}")
    L, V, h, i, n = s.length, s.vocab, s.hidden, s.intermediate, s.layers
    P = parameters(s)
    if mode == "fwd":
        base = RUNTIME_BYTES + 4 * P + 2 * L * V * 4 + L * (6 * h + 3 * i) * 4
    else:
        base = RUNTIME_BYTES + 16 * P + n * L * (12 * h + 4 * i) * 4 + 4 * L * V * 4
    W = 1 * s.heads * L * L * 4
    if impl == "eager":
        attn = (2 * W if mode == "fwd" else (n + 2) * W) + L * L * 4
        how = f"eager: W = {W / GiB:.2f} GiB per layer ({'2 W' if mode == 'fwd' else f'{n + 2} W'} + float mask)"
    elif impl == "sdpa":
        attn = L * L * (1 + 4 * (1 if mode == "fwd" else n))
        how = "sdpa: dense bool L x L mask and its float copy " + ("per call" if mode == "fwd" else "kept per layer")
    else:
        attn = 8 * s.heads * L * (h // s.heads) * 4 * (1 if mode == "fwd" else 2)
        how = f"{impl}: no L x L tensor"
    return {"total": base + attn, "base": base, "attention": attn, "how": how}


def _meminfo() -> dict:
    out = {}
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, rest = line.split(":", 1)
                out[key] = int(rest.split()[0]) * 1024
    return out


def available_bytes() -> int | None:
    """MemAvailable (Linux), else None."""
    return _meminfo().get("MemAvailable")


def memory_have() -> int | None:
    """What a pass may use now: MemAvailable less the margin, or None where unknown."""
    info = _meminfo()
    if "MemAvailable" not in info:
        return None
    margin = max(MARGIN_BYTES, int(MARGIN_FRACTION * info.get("MemTotal", 0)))
    return max(info["MemAvailable"] - margin, 0)


def refusal(need: int, have: int | None) -> str | None:
    """None when `need` bytes fit in `have`, else the refusal recorded for the pass."""
    if have is None or need <= have:
        return None
    return f"refused: needs {need / GiB:.1f} GiB, have {have / GiB:.1f} GiB"


# ----------------------------------------------------------------------------
# The child: one implementation, one case, in a fresh process
# ----------------------------------------------------------------------------

def _short(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def packed_positions(s: Sizes, seed: int) -> tuple[torch.Tensor, list[int]]:
    """(position_ids (1, L) restarting at every document, document lengths), seeded as `qkv bench attention`."""
    from qkv.tools.bench.attention import document_ids

    ids = document_ids(s.length, s.documents, seed)
    lengths = torch.bincount(ids).tolist()
    pos = torch.cat([torch.arange(n) for n in lengths])
    return pos[None], lengths


def build(impl: str, case: str, s: Sizes, seed: int):
    """(model, input_ids (1, L), position_ids or None, labels (1, L)): the same weights for every implementation."""
    import qkv.integrations.transformers  # noqa: F401 - registers attn_implementation="qkv"
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    common = dict(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                  num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                  max_position_embeddings=s.length, attention_dropout=0.0, attn_implementation=impl)
    torch.manual_seed(seed)
    if case == "packed":
        model = LlamaForCausalLM(LlamaConfig(**common))
        pos, lengths = packed_positions(s, seed)
    else:
        model = MistralForCausalLM(MistralConfig(sliding_window=s.window, **common))
        pos, lengths = None, [s.length]
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, s.vocab, (1, s.length), generator=g)
    labels = ids.clone()
    starts = torch.cumsum(torch.tensor([0, *lengths[:-1]]), 0)
    labels[0, starts[1:]] = -100          # the last token of a document does not predict the next one's first
    return model, ids, pos, labels


class _Spy:
    """Inside the child: times every call of the model's attention function, keeps the first mask
    qkv's layers get and counts the backends qkv's auto picks."""

    def __init__(self, impl: str):
        from qkv.backends import registry
        from transformers.modeling_utils import AttentionInterface

        self.seconds = 0.0
        self.calls = 0
        self.first_mask = None
        self.backends: dict[str, int] = {}
        spy = self
        original = AttentionInterface.get_interface

        def get_interface(this, name, default):
            fn = original(this, name, default)

            def timed(module, query, key, value, attention_mask, *args, **kwargs):
                if spy.first_mask is None:
                    spy.first_mask = attention_mask
                t0 = time.perf_counter()
                try:
                    return fn(module, query, key, value, attention_mask, *args, **kwargs)
                finally:
                    spy.seconds += time.perf_counter() - t0
                    spy.calls += 1

            return timed

        AttentionInterface.get_interface = get_interface
        select = registry.select

        def counting(call, backend="auto"):
            be = select(call, backend)
            spy.backends[be.name] = spy.backends.get(be.name, 0) + 1
            return be

        registry.select = counting

    def mask_info(self) -> dict:
        m = self.first_mask
        info: dict = {"type": type(m).__name__}
        if m is None:
            return info
        from qkv.integrations.transformers import HFMask
        from qkv.masks import documents

        if isinstance(m, HFMask):
            info["repr"] = repr(m)
            found = documents(m.mask) if m.mask is not None else None
            if found is not None:
                ids, causal = found
                info["documents"] = int(torch.unique(ids).numel())
                info["document_and_causal"] = bool(causal)
        elif isinstance(m, torch.Tensor):
            info["repr"] = f"dense tensor {tuple(m.shape)} {str(m.dtype).replace('torch.', '')}"
        else:
            info["repr"] = type(m).__name__
        return info


def _graph_nodes(loss: torch.Tensor) -> dict[str, int]:
    """The attention-related nodes of the autograd graph under `loss` (what backward will run)."""
    seen, stack, counts = set(), [loss.grad_fn], {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = node.name()
        if any(w in name.lower() for w in ("attention", "flash", "softmax", "segment", "tiled", "sdpa")):
            counts[name] = counts.get(name, 0) + 1
        stack.extend(n for n, _ in node.next_functions)
    return counts


def _cell(fn, s: Sizes, budget_s: float, log, label: str, *, compiles: bool = False) -> dict:
    """Time `fn` by the rule of the module docstring: first call, warm-up or first timed call, timed calls.
    `compiles`: the first call compiles (flex), so it never stands for the steady state."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    log(f"{label}: first call {first * 1e3:.0f} ms")
    times: list[float] = []
    warmup = 0
    if first < budget_s or compiles:
        t0 = time.perf_counter()
        fn()
        t = time.perf_counter() - t0
        if t < s.long_s:
            warmup = 1
        else:
            times.append(t)
        while len(times) < s.runs and (not times or sum(times) + statistics.median(times) <= budget_s):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    only_first = not times
    ms = first * 1e3 if only_first else statistics.median(times) * 1e3
    log(f"{label}: {'first call only' if only_first else f'median of {len(times)}'} {ms:.0f} ms")
    return {"first_ms": round(first * 1e3, 1), "ms": round(ms, 1), "runs": len(times), "warmup": warmup,
            "first_only": only_first, "times_ms": [round(x * 1e3, 1) for x in times]}


def _limit_address_space(allowed: int | None) -> int | None:
    """Cap this process's address space at what it has mapped now + what it may still use (RLIMIT_AS)."""
    if allowed is None:
        return None
    size, rss = status_bytes("VmSize"), status_bytes("VmRSS")
    if size is None or rss is None:
        return None
    limit = size + max(allowed - rss, 0) + VIRTUAL_SLACK_BYTES
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        return limit
    return None


def _child(spec_json: str) -> None:
    """`--child SPEC`: run one implementation on one case; the result is the last line of stdout (JSON)."""
    spec = json.loads(spec_json)
    impl, case, s, seed = spec["impl"], spec["case"], Sizes(**spec["sizes"]), spec["seed"]
    log = lambda m: print(PROGRESS + m, file=sys.stderr, flush=True)  # noqa: E731
    torch.set_num_threads(spec["threads"])
    result: dict = {"impl": impl, "case": case, "load_start": list(os.getloadavg())}
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    spy = _Spy(impl)
    t0 = time.perf_counter()
    model, ids, pos, labels = build(impl, case, s, seed)
    result["build_s"] = round(time.perf_counter() - t0, 2)
    result["address_space_limit"] = _limit_address_space(spec.get("allowed"))
    for mode in spec["modes"]:
        reset_peak()
        try:
            if mode == "fwd":
                result[mode] = _fwd(model, ids, pos, labels, s, spy, log, compiles=impl == "flex_attention")
            else:
                result[mode] = _train(model, ids, pos, labels, s, log)
        except Exception as exc:  # noqa: BLE001 - recorded: flex's missing CPU backward, an allocation refused
            result[mode] = {"error": _short(exc)}
            log(f"{mode}: {result[mode]['error']}")
        result[mode]["peak_rss_bytes"] = status_bytes("VmHWM")
        if mode == "fwd":
            result["mask"] = spy.mask_info()
            result["backends_fwd"] = dict(spy.backends)
    result["load_end"] = list(os.getloadavg())
    print(json.dumps(result), flush=True)


def _fwd(model, ids, pos, labels, s: Sizes, spy: _Spy, log, *, compiles: bool) -> dict:
    model.eval()
    out: dict = {}

    def call():
        with torch.no_grad():
            out["logits"] = model(input_ids=ids, position_ids=pos, use_cache=False).logits

    attn: list[float] = []

    def timed_call():
        spy.seconds = 0.0
        call()
        attn.append(spy.seconds)

    cell = _cell(timed_call, s, s.fwd_budget_s, log, "forward", compiles=compiles)
    logits = out.pop("logits")
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=-100)
    step = max(s.length // 16, 1)
    timed_attn = attn[1 + cell["warmup"]:] or attn[:1]
    cell.update({"attn_first_ms": round(attn[0] * 1e3, 1), "attn_ms": round(statistics.median(timed_attn) * 1e3, 1),
                 "attn_calls_per_forward": spy.calls // max(len(attn), 1), "loss": float(loss),
                 "logits_sample": [round(float(x), 6) for x in logits[0, ::step, :4].reshape(-1)]})
    return cell


def _train(model, ids, pos, labels, s: Sizes, log) -> dict:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses: list[float] = []
    nodes: dict = {}
    walk = [0.0]

    def step():
        loss = model(input_ids=ids, position_ids=pos, labels=labels, use_cache=False).loss
        if not nodes:
            t0 = time.perf_counter()
            nodes.update(_graph_nodes(loss) or {"(none)": 0})
            walk[0] = time.perf_counter() - t0
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    cell = _cell(step, s, s.train_budget_s, log, "training step")
    cell.update({"losses": [round(x, 6) for x in losses], "backward_nodes": nodes,
                 "graph_walk_ms_in_first_call": round(walk[0] * 1e3, 1)})
    return cell


# ----------------------------------------------------------------------------
# The parent: plan, start children, watch memory
# ----------------------------------------------------------------------------

def _spawn(spec: dict, s: Sizes, log, cache_dir: str) -> dict:
    """Run one child; its JSON, or {"error": ...} (a crash, a timeout, stopped for memory)."""
    cmd = [sys.executable, "-m", "qkv.tools.bench.transformers", "--child", json.dumps(spec)]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out_lines: list[str] = []
    err_tail: list[str] = []

    def pump_out():
        for line in proc.stdout:
            out_lines.append(line)

    def pump_err():
        for line in proc.stderr:
            err_tail.append(line.rstrip())
            del err_tail[:-20]
            if line.startswith(PROGRESS):
                log(f"  [{spec['impl']} {spec['case']}] {line.rstrip()[len(PROGRESS):]}")

    readers = [threading.Thread(target=pump_out, daemon=True), threading.Thread(target=pump_err, daemon=True)]
    for r in readers:
        r.start()
    started, stopped = time.perf_counter(), None
    lowest = available_bytes()
    while proc.poll() is None:
        time.sleep(0.25)
        avail = available_bytes()
        if avail is not None:
            lowest = avail if lowest is None else min(lowest, avail)
            if avail < STOP_BELOW_BYTES:
                stopped = f"stopped: MemAvailable fell to {avail / GiB:.2f} GiB while it ran"
        if time.perf_counter() - started > s.child_timeout_s:
            stopped = f"stopped: took longer than {s.child_timeout_s:.0f} s"
        if stopped:
            proc.kill()        # this benchmark's own child, by its handle
            proc.wait()
            break
    for r in readers:
        r.join(timeout=10)
    base = {"impl": spec["impl"], "case": spec["case"], "lowest_mem_available": lowest,
            "wall_s": round(time.perf_counter() - started, 1)}
    if stopped:
        return {**base, "error": stopped}
    if proc.returncode != 0:
        why = "killed by a signal" if proc.returncode < 0 else "exit status"
        tail = next((ln for ln in reversed(err_tail) if ln.strip()), "")
        return {**base, "error": f"{why} {proc.returncode}: {tail[-300:]}"}
    try:
        return {**base, **json.loads(out_lines[-1])}
    except (IndexError, json.JSONDecodeError):
        return {**base, "error": f"unreadable output: {''.join(out_lines)[-300:]!r}"}


def _plan(impl: str, s: Sizes, memory_bytes: int | None) -> tuple[list[str], dict]:
    """(modes to run, {mode: {"need", "have", "refused"?}}) for one child."""
    have = memory_have() if memory_bytes is None else memory_bytes
    modes, plan = [], {}
    for mode in MODES:
        est = estimate_bytes(impl, mode, s)
        why = refusal(est["total"], have)
        plan[mode] = {"need_bytes": est["total"], "have_bytes": have, "how": est["how"]}
        if why:
            plan[mode]["refused"] = why
        else:
            modes.append(mode)
    return modes, plan


def _run_all(s: Sizes, seed: int, threads: int, memory_bytes: int | None, log, impls: Sequence[str],
             cases: Sequence[str]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="qkv-bench-transformers-") as tmp:
        for case in cases:
            for impl in impls:
                modes, plan = _plan(impl, s, memory_bytes)
                label = f"{impl} / {case}"
                for mode, p in plan.items():
                    if "refused" in p:
                        log(f"{label} {mode}: {p['refused']} ({p['how']})")
                if not modes:
                    rows.append({"impl": impl, "case": case, "plan": plan})
                    continue
                allowed = max(plan[m]["have_bytes"] for m in modes) if plan[modes[0]]["have_bytes"] is not None \
                    else None
                log(f"{label}: fresh process ({', '.join(modes)}), load average {os.getloadavg()[0]:.2f} ...")
                cache = tempfile.mkdtemp(prefix=f"inductor-{impl}-{case}-", dir=tmp)
                spec = {"impl": impl, "case": case, "modes": modes, "sizes": asdict(s), "seed": seed,
                        "threads": threads, "allowed": allowed}
                row = _spawn(spec, s, log, cache)
                row["plan"] = plan
                rows.append(row)
                if "error" in row:
                    log(f"{label}: {row['error']}")
    return rows


# ----------------------------------------------------------------------------
# Results: the cells, the ratios, the goals
# ----------------------------------------------------------------------------

def _row(rows: Sequence[dict], impl: str, case: str) -> dict:
    return next((r for r in rows if r["impl"] == impl and r["case"] == case), {})


def cell_status(row: dict, mode: str) -> tuple[float | None, str]:
    """(ms or None, text): the steady ms of a pass, or why there is none."""
    if mode == "first":
        c = row.get("fwd") or {}
        return (c.get("first_ms"), "") if "first_ms" in c else (None, _why(row, "fwd"))
    c = row.get(mode)
    if c and "ms" in c:
        return c["ms"], ""
    return None, _why(row, mode)


def _why(row: dict, mode: str) -> str:
    p = (row.get("plan") or {}).get(mode) or {}
    if "refused" in p:
        return p["refused"]
    c = row.get(mode) or {}
    if "error" in c:
        return c["error"]
    if "error" in row:
        return row["error"]
    return "not run"


def speedups(rows: Sequence[dict], case: str, mode: str) -> dict:
    """{impl: ms} and {impl: impl ms / qkv ms} for one case and pass."""
    ms = {impl: cell_status(_row(rows, impl, case), mode)[0] for impl in IMPLS}
    return {"ms": ms, "vs": {impl: rounded(ratio(ms[impl], ms["qkv"]), 3) for impl in IMPLS if impl != "qkv"}}


def first_call_overhead(row: dict) -> float | None:
    """What a forward's first call costs beyond the steady state, in ms (None when either is missing)."""
    c = row.get("fwd") or {}
    if "first_ms" not in c or c.get("first_only"):
        return None
    return c["first_ms"] - c["ms"]


def _goal(goal: str, measured, target, direction: str = ">=", unit: str = "x", note: str = "") -> dict:
    met = None
    if measured is not None:
        met = measured >= target if direction == ">=" else measured <= target
    return {"goal": goal, "measured": measured, "target": target, "direction": direction, "unit": unit, "met": met,
            "note": note}


def evaluate_goals(result: dict) -> list[dict]:
    rows = result["rows"]
    goals = []
    for name, case, mode, against, target in GOALS:
        sp = speedups(rows, case, mode)
        note = "" if sp["vs"][against] is not None else \
            cell_status(_row(rows, against if sp["ms"][against] is None else "qkv", case), mode)[1]
        goals.append(_goal(name, sp["vs"][against], target, note=note))
    # the training step eager cannot fit: refused or run, never OOM-killed
    eager = [(case, _row(rows, "eager", case)) for case in CASES]
    text, met = [], True
    for case, r in eager:
        p = (r.get("plan") or {}).get("train") or {}
        c = r.get("train") or {}
        if "refused" in p:
            text.append(f"{case}: {p['refused']}")
        elif "ms" in c:
            text.append(f"{case}: ran")
        else:
            err = c.get("error") or r.get("error") or "not run"
            killed = "killed by a signal" in err
            met = met and not killed
            text.append(f"{case}: {err}")
    goals.append({"goal": f"eager training step at {result['config']['length']}: refused or runs, never OOM-killed",
                  "measured": "; ".join(text), "target": "refused or runs", "direction": "==", "unit": "text",
                  "met": met, "note": ""})
    killed = [f"{r['impl']}/{r['case']}" for r in rows if "killed by a signal" in (r.get("error") or "")]
    goals.append({"goal": "no process of the benchmark was killed (OOM or otherwise)",
                  "measured": "none" if not killed else ", ".join(killed), "target": "none", "direction": "==",
                  "unit": "text", "met": not killed, "note": ""})
    return goals


def agreement(rows: Sequence[dict]) -> dict:
    """Largest |difference| from sdpa's logits sample and losses, per implementation and case."""
    out = {}
    for case in CASES:
        ref = _row(rows, "sdpa", case)
        ref_fwd, ref_train = ref.get("fwd") or {}, ref.get("train") or {}
        for impl in IMPLS:
            if impl == "sdpa":
                continue
            r = _row(rows, impl, case)
            f, t = r.get("fwd") or {}, r.get("train") or {}
            entry = {}
            if "logits_sample" in f and "logits_sample" in ref_fwd:
                pairs = zip(f["logits_sample"], ref_fwd["logits_sample"], strict=True)
                entry["logits_max_abs_diff"] = max(abs(a - b) for a, b in pairs)
                entry["loss_abs_diff"] = abs(f["loss"] - ref_fwd["loss"])
            if t.get("losses") and ref_train.get("losses"):
                entry["first_step_loss_abs_diff"] = abs(t["losses"][0] - ref_train["losses"][0])
            out[f"{impl}/{case}"] = entry
    return out


# ----------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------

def _ms(x) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _x(r) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _short_cell(text: str) -> str:
    if text.startswith("refused"):
        return "refused"
    if "does not support backward on CPU" in text:
        return "no CPU bwd"
    if text.startswith("stopped"):
        return "stopped"
    return "error" if text and text != "not run" else "-"


_TABLE_HEADER = ("case", "qkv ms", "sdpa ms", "eager ms", "flex ms", "qkv vs sdpa", "qkv vs flex", "qkv vs eager",
                 "goal", "verdict")
def _case_label(case: str, config: dict) -> str:
    return f"packed ({config['documents']} docs)" if case == "packed" else "sliding window"


_MODE_LABEL = {"fwd": "forward", "train": "training step", "first": "first call (fresh process), forward"}


def _row_goals(case: str, mode: str, goals: Sequence[dict]) -> tuple[str, str]:
    mine = [(g, GOALS[i]) for i, g in enumerate(goals[:len(GOALS)]) if GOALS[i][1] == case and GOALS[i][2] == mode]
    if not mine:
        return "-", "-"
    short = {"sdpa": "sdpa", "flex_attention": "flex"}
    goal = "; ".join(f"vs {short[spec[3]]} >= {spec[4]:g}x" for _, spec in mine)
    verdicts = []
    for g, spec in mine:
        v = "n/a" if g["met"] is None else ("met" if g["met"] else "missed")
        verdicts.append(v if len(mine) == 1 else f"{short[spec[3]]} {v}")
    return goal, "; ".join(verdicts)


def table_cells(result: dict) -> list[list[str]]:
    rows, goals = result["rows"], result["goals"]
    body = []
    L = result["config"]["length"]
    for mode in ("fwd", "train", "first"):
        for case in CASES:
            cells = []
            for impl in IMPLS:
                ms, why = cell_status(_row(rows, impl, case), mode)
                if ms is not None and mode != "first" and (_row(rows, impl, case).get(mode) or {}).get("first_only"):
                    cells.append(_ms(ms) + "*")
                else:
                    cells.append(_ms(ms) if ms is not None else _short_cell(why))
            sp = speedups(rows, case, mode)
            goal, verdict = _row_goals(case, mode, goals)
            body.append([f"{_case_label(case, result['config'])} {L:,}: {_MODE_LABEL[mode]}", *cells, _x(sp["vs"]["sdpa"]),
                         _x(sp["vs"]["flex_attention"]), _x(sp["vs"]["eager"]), goal, verdict])
    return body


_ATTN_HEADER = ("case", "qkv attention ms", "sdpa attention ms", "eager attention ms", "flex attention ms",
                "qkv rest ms", "flex rest ms", "qkv vs flex (attention alone)", "qkv vs sdpa (attention alone)")


def attention_cells(result: dict) -> list[list[str]]:
    body = []
    for case in CASES:
        f = {impl: (_row(result["rows"], impl, case).get("fwd") or {}) for impl in IMPLS}
        attn = {impl: f[impl].get("attn_ms") for impl in IMPLS}
        rest = {impl: (f[impl]["ms"] - f[impl]["attn_ms"]) if "attn_ms" in f[impl] else None for impl in IMPLS}
        body.append([f"{_case_label(case, result['config'])}: forward", *(_ms(attn[i]) for i in IMPLS), _ms(rest["qkv"]),
                     _ms(rest["flex_attention"]), _x(ratio(attn["flex_attention"], attn["qkv"])),
                     _x(ratio(attn["sdpa"], attn["qkv"]))])
    return body


_MEM_HEADER = ("implementation", "case", "pass", "estimate GiB", "peak RSS GiB", "runs", "load (process start -> end)",
               "status")


def memory_cells(result: dict) -> list[list[str]]:
    body = []
    for r in result["rows"]:
        for mode in MODES:
            p = (r.get("plan") or {}).get(mode) or {}
            c = r.get(mode) or {}
            peak = c.get("peak_rss_bytes")
            if "refused" in p:
                status, runs = p["refused"], "-"
            elif "ms" in c:
                status = "ran"
                runs = "first call only" if c["first_only"] else f"{c['runs']} (+{c['warmup']} warm-up)"
            else:
                status, runs = _why(r, mode), "-"
            load = f"{r['load_start'][0]:.2f} -> {r['load_end'][0]:.2f}" if "load_end" in r else "-"
            body.append([r["impl"], r["case"], mode, f"{p['need_bytes'] / GiB:.1f}" if "need_bytes" in p else "-",
                         "-" if peak is None else f"{peak / GiB:.2f}", runs, load, status])
    return body


def _goal_cells(goals: Sequence[dict]) -> list[list[str]]:
    body = []
    for g in goals:
        if g["unit"] == "x":
            shown, target = _x(g["measured"]), f"{g['direction']} {g['target']:g}x"
        else:
            shown, target = str(g["measured"]), str(g["target"])
        verdict = "n/a" + (f" ({_short_cell(g['note'])})" if g.get("note") else "") if g["met"] is None else \
            ("met" if g["met"] else "NOT met")
        body.append([g["goal"], shown, target, verdict])
    return body


def _notes(result: dict) -> list[str]:
    c, rows = result["config"], result["rows"]
    lines = [f"model: Llama-style, {c['layers']} layers, h={c['hidden']}, {c['heads']} heads / {c['kv_heads']} KV "
             f"heads (D={c['hidden'] // c['heads']}), MLP {c['intermediate']}, vocabulary {c['vocab']:,} (untied "
             f"LM head), {c['params'] / 1e6:.1f}M parameters, random weights (seed {c['seed']}); L={c['length']:,}, "
             f"batch 1, fp32, {c['threads']} torch threads; transformers {c['transformers']}",
             f"packed: LlamaForCausalLM, {c['documents']} documents of lengths {c['doc_lengths']}, position_ids "
             f"restarting at each; window: MistralForCausalLM, sliding_window={c['window']}",
             f"load average (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in result['load_start'])} at the start, "
             f"{', '.join(f'{x:.2f}' for x in result['load_end'])} at the end"]
    for case in CASES:
        q = _row(rows, "qkv", case)
        m = q.get("mask") or {}
        if m.get("repr"):
            extra = ""
            if "documents" in m:
                extra = f" -> qkv.masks.documents: {m['documents']} documents, causal={m['document_and_causal']}"
            lines.append(f"{case}: the mask qkv's layers got: {m['repr']}{extra}; auto picked "
                         f"{q.get('backends_fwd')} (forward, all layers)")
        nodes = (q.get("train") or {}).get("backward_nodes")
        if nodes:
            lines.append(f"{case}: qkv's attention nodes in the training step's autograd graph: {nodes}")
        over = {impl: first_call_overhead(_row(rows, impl, case)) for impl in ("qkv", "flex_attention")}
        if all(v is not None for v in over.values()):
            lines.append(f"{case}: first-call overhead (first call - steady forward): qkv {over['qkv']:,.0f} ms, "
                         f"flex_attention {over['flex_attention']:,.0f} ms")
        s = _row(rows, "sdpa", case).get("mask") or {}
        if s.get("repr"):
            lines.append(f"{case}: sdpa's layers got a {s['repr']} mask")
    runs = []
    for r in rows:
        for mode in MODES:
            cell = r.get(mode) or {}
            if "ms" in cell:
                runs.append(f"{r['impl']}/{r['case']}/{mode} "
                            + ("first call only" if cell["first_only"] else f"{cell['runs']}+{cell['warmup']}w"))
    lines.append("timed calls per cell (+w: warm-up calls after the first): " + ", ".join(runs))
    errors = []
    for r in rows:
        for mode in MODES:
            if "refused" in ((r.get("plan") or {}).get(mode) or {}) or "ms" in (r.get(mode) or {}):
                continue
            why = _why(r, mode)
            errors.append(f"{r['impl']}/{r['case']}/{mode}: {why}")
    if errors:
        lines.append("errors: " + "; ".join(errors))
    ag = result.get("agreement") or {}
    diffs = [f"{k} logits {v['logits_max_abs_diff']:.1e}, loss {v['loss_abs_diff']:.1e}"
             + (f", first-step loss {v['first_step_loss_abs_diff']:.1e}" if "first_step_loss_abs_diff" in v else "")
             for k, v in ag.items() if "logits_max_abs_diff" in v]
    if diffs:
        lines.append("agreement with sdpa (largest |difference|): " + "; ".join(diffs))
    return lines


_LEGEND = ("ms: steady state, the median of the timed calls after the first (and a warm-up when the second call "
           "is short); * the first call is the only figure (it alone took the cell's budget); first call: the "
           "first forward of a fresh process with an empty inductor cache (flex: compilation included); "
           "qkv vs X: X ms / qkv ms (> 1: qkv faster); refused: the memory estimate does not fit what the machine "
           "has (never started); no CPU bwd: FlexAttention has no backward on the CPU")


def render(result: dict, *, markdown: bool = False) -> str:
    """The result as text (or Markdown): the main table, attention alone, goals, memory, notes."""
    main = format_table(_TABLE_HEADER, table_cells(result), left=(0, 8, 9), markdown=markdown)
    attn = format_table(_ATTN_HEADER, attention_cells(result), left=(0,), markdown=markdown)
    goals = format_table(("goal", "measured", "target", "verdict"), _goal_cells(result["goals"]), left=(0, 1, 2, 3),
                         markdown=markdown)
    mem = format_table(_MEM_HEADER, memory_cells(result), left=(0, 1, 2, 5, 6, 7), markdown=markdown)
    notes = _notes(result)
    machine = format_machine(result["machine"]) + f"; transformers {result['config']['transformers']}"
    if markdown:
        return "\n".join([f"# qkv inside transformers{' (quick)' if result['quick'] else ''}", "", machine + ".", "",
                          _LEGEND + ".", "", main, "", "## Attention alone (inside the forward, sum over layers)",
                          "", attn, "", "## Goals", "", goals, "", "## Memory", "", mem, "", "## Notes", "",
                          *[f"- {n}" for n in notes], "", f"Finished in {result['seconds']:.0f} s.", ""])
    return "\n".join([machine, "", main, "", _LEGEND, "", "attention alone (inside the forward, sum over layers):",
                      attn, "", "goals:", goals, "", "memory:", mem, "", *notes])


# ----------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------

def run(out_dir="runs/bench", quick: bool = False, *, seed: int = 0, threads: int | None = None,
        memory_bytes: int | None = None, impls: Sequence[str] = IMPLS, cases: Sequence[str] = CASES,
        verbose: bool = True) -> dict:
    """Run the benchmark; print the tables; write transformers.json and transformers.md into `out_dir`.

    `quick`: the tiny configuration (seconds per process). `threads`: torch threads of every
    child (default: every usable core). `memory_bytes`: what a pass may use (default: the
    machine's MemAvailable less the margin, read before each process); passes that need
    more are refused. `impls`, `cases`: a subset to run (the rest show as not run).
    Returns what was written to transformers.json.
    """
    try:
        import transformers
    except ImportError as exc:
        raise ValueError("this benchmark runs Hugging Face transformers models: pip install transformers "
                         "(or the project's [dev] extra)") from exc
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    for name, given, known in (("impls", impls, IMPLS), ("cases", cases, CASES)):
        unknown = [x for x in given if x not in known]
        if unknown or not given:
            raise ValueError(f"{name} must be a non-empty subset of {', '.join(known)}; got {list(given)}")
    s = QUICK if quick else FULL
    log = (lambda m: print(m, flush=True)) if verbose else (lambda m: None)
    n_threads = threads or usable_cores()
    started = time.perf_counter()
    info = machine_info()
    info["torch_threads"] = n_threads
    info["mem_total_bytes"] = _meminfo().get("MemTotal")
    load_start = list(os.getloadavg())
    log(format_machine(info) + f"; transformers {transformers.__version__}")
    log(f"load average {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}; MemAvailable "
        f"{(available_bytes() or 0) / GiB:.1f} GiB")
    _, lengths = packed_positions(s, seed)
    rows = _run_all(s, seed, n_threads, memory_bytes, log, impls, cases)
    result = {"benchmark": "transformers", "quick": bool(quick), "machine": info,
              "config": {**asdict(s), "seed": seed, "threads": n_threads, "params": parameters(s),
                         "doc_lengths": lengths, "dtype": "float32", "transformers": transformers.__version__,
                         "implementations": list(impls), "cases": list(cases), "memory_bytes": memory_bytes,
                         "margin": {"bytes": MARGIN_BYTES, "fraction": MARGIN_FRACTION},
                         "stop_below_bytes": STOP_BELOW_BYTES},
              "load_start": load_start, "rows": rows}
    result["agreement"] = agreement(rows)
    result["goals"] = evaluate_goals(result)
    result["load_end"] = list(os.getloadavg())
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_results(result, out_dir, "transformers", render, log)
    return result


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="a tiny model (seconds per process)")
    parser.add_argument("--out", default=os.path.join("runs", "bench"), help="where transformers.json/.md go")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, tokens and documents (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every usable core)")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS, help="a subset of the implementations")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES, help="a subset of the cases")


def _run_from(args) -> None:
    run(args.out, quick=args.quick, seed=args.seed, threads=args.threads, impls=args.impls, cases=args.cases)


def main(argv: list[str] | None = None) -> int:
    """`python -m qkv.tools.bench.transformers` / benchmarks/bench_transformers.py."""
    return bench_main(argv, prog="bench_transformers", description=__doc__.splitlines()[0],
                      add_arguments=add_arguments, run=_run_from, children={"--child": _child})


if __name__ == "__main__":
    sys.exit(main())
