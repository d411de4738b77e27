"""`qkv bench attention`: qkv's tiled executor against torch SDPA and FlexAttention on long masked sequences.

Legend: B batch, H heads, L sequence length (Lq = Lk = L), D head dim; fp32 throughout.

Side by side in one process, on the same q, k, v (B=1, H=8, D=64), for each case,
length L (4k, 16k, 32k; --quick: 1k, 4k) and pass (forward; forward+backward):

    case                            qkv mask                          Flex mask_mod (b, h, q, kv)
    causal                          causal=True                       q >= kv
    sliding_window(1024) & causal   causal() & sliding_window(1024)   (q >= kv) & (q < kv + 1024)
    document & causal               causal() & document(ids)          (ids[q] == ids[kv]) & (q >= kv)
    prefix_lm(1024)                 prefix_lm(1024)                   (kv < 1024) | (kv <= q)

(`ids`: 8 packed sequences of random lengths, seeded.) The contenders:

- tiled: `qkv.attention(..., backend="tiled")`, the BlockMask-driven executor;
- auto:  `qkv.attention(..., backend="auto")`, whatever qkv picks for the call;
- sdpa:  torch's `scaled_dot_product_attention`, `is_causal=True` for the plain causal
  case, else a dense bool mask `mask.to_dense(L, L)[0, 0]` built once per (case, L);
  building it is timed apart ("mask ms") and not included in sdpa's time;
- flex:  `torch.compile(flex_attention)` with `create_block_mask(mask_mod)`. Its first
  call after `torch._dynamo.reset()` (block mask creation + compilation + run, with a
  cold inductor cache) and its steady state are reported. A failed compile, or one
  longer than `flex_timeout_s`, is recorded and flex shows 'n/a' from then on; so is a
  backward Flex cannot run on this device.

Also: qkv's first call with a fresh mask object (its BlockMask cache is empty, so the
tile classification is included) against Flex's first call; agreement of every contender
with sdpa at L = 4096; and the memory case (L = 131072, causal, forward+backward, tiled)
in a fresh subprocess, whose peak RSS (VmHWM on Linux: see `_memory_child`) is compared
with the bytes of q, k, v, out and their gradients.

Efficiency: useful FLOP/s over the machine's real limit, a square fp32 GEMM.

- GEMM rate (`gemm_rate`): GFLOP/s of `torch.mm` on (2048, 2048) x (2048, 2048) fp32
  (2 n^3 FLOPs, n = 2048) at the current torch thread count, measured at the start and
  at the end of the same run; the mean of the two is the rate every ratio divides by
  (both are reported, so drift shows).
- allowed pairs (`allowed_pairs`): the (b, h, q, kv) elements the mask lets attend,
  counted exactly by evaluating the mask in bands of query rows (never L x L at once),
  once per (case, L) and kept in both of its rows. Not the executed tiles: the masked
  elements inside PARTIAL tiles do not count.
- useful FLOPs: allowed pairs x 4 x D for the forward (QK^T and PV, 2 FLOPs each per
  pair and head dim); the backward counts 2.5x the forward, so forward+backward is
  3.5x. The same count for every contender: work a contender does on masked elements
  (sdpa's dense mask, tiles' masked corners) is not useful.
- "X/gemm" (`X_vs_gemm`, X in tiled, auto, sdpa, flex): X's useful FLOP/s (useful FLOPs
  / X ms) divided by the GEMM rate, per pass. "tiled/gemm" is the efficiency figure
  the goals judge (>= 75% at L = 16384 for every case, forward and forward+backward).
- "tiles/bmm" (`tiled_vs_bmm`, forward only): the former "eff". Tiled's FLOP/s of the
  tiles it executes (4 * D * (q, kv) pairs of FULL and PARTIAL tiles, `live_pairs`)
  over the rate of an attention-shaped fp32 bmm, (8, 2048, 64) x (8, 64, 2048)
  (`matmul_rate`, mean of start and end). That bmm is memory-bound, well below the
  machine's limit, so this ratio can exceed 100%; it says how tiled's tiles compare
  with one head-batched QK^T, not how close tiled is to the machine.

The columns of the main table (one row per case, L and pass):

    tiled ms, auto ms, sdpa ms, flex ms   median wall time of the pass (flex 'no bwd': Flex
                                          has no backward on this device; 'n/a': not run)
    mask ms        building sdpa's dense mask ('-' for plain causal); not in sdpa ms
    vs flex, vs sdpa   flex ms / tiled ms, sdpa ms / tiled ms (> 1: tiled faster)
    auto vs sdpa   sdpa ms / auto ms
    qkv 1st ms, flex 1st ms, 1st ratio   (forward rows) first calls, BlockMask (and
                   Flex's block mask + compile) included; 1st ratio = flex 1st / qkv 1st
    tiled/gemm     tiled's useful FLOP/s / the GEMM rate (the efficiency figure)

and of the efficiency table (same rows):

    allowed        allowed (q, kv) pairs as a share of all L x L
    useful GFLOP   useful FLOPs of the pass, over batch and heads, in 10^9
    tiled GFLOP/s  tiled's useful FLOP/s
    tiled/gemm, auto/gemm, sdpa/gemm, flex/gemm   each contender's useful FLOP/s / GEMM rate
    tiles/bmm      (forward rows) tiled's executed-tile FLOP/s / the attention-shaped bmm rate

Timings are for reading; nothing here passes or fails a test.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

import qkv
from qkv.masks import EMPTY, FULL, PARTIAL
from qkv.tools.harness import (bench_main, format_machine, format_table, machine_info, median_ms, ratio,
                               reset_peak, rounded, ru_maxrss_bytes, status_bytes, write_results)

__all__ = ["run", "main", "CASES", "make_case", "document_ids", "live_pairs", "allowed_pairs", "useful_flops",
           "measure", "matmul_rate", "gemm_flops", "gemm_rate", "memory_case", "render", "evaluate_goals"]

B, H, D = 1, 8, 64
DTYPE = torch.float32
CASES = ("causal", "sliding_window", "document", "prefix_lm")
LENGTHS = (4096, 16384, 32768)
QUICK_LENGTHS = (1024, 4096)
WINDOW = 1024            # sliding_window(WINDOW) & causal
PREFIX = 1024            # prefix_lm(PREFIX)
N_DOCS = 8               # packed sequences in the document case
GOAL_LENGTH = 16384      # the length the goals are judged at (else the longest measured)
AGREE_LENGTH = 4096      # the length agreement is checked at (else the shortest measured)
MEMORY_LENGTH = 131072
PASSES = ("fwd", "fwd+bwd")
IMPLS = ("tiled", "auto", "sdpa", "flex")
GEMM_N = 2048            # the square GEMM of the machine's rate: (n, n) x (n, n) fp32
BWD_FACTOR = 2.5         # useful backward FLOPs per forward FLOP: fwd+bwd counts 3.5x the forward
EFFICIENCY_GOAL = 0.75   # tiled's useful FLOP/s over the square GEMM rate, every case, both passes
PAIR_CHUNK = 1 << 22     # mask elements evaluated at once when counting allowed pairs


# ----------------------------------------------------------------------------
# The cases: one mask, spelled for qkv and for Flex
# ----------------------------------------------------------------------------

def document_ids(L: int, n_docs: int = N_DOCS, seed: int = 0) -> torch.Tensor:
    """(L,) sorted document ids of `n_docs` packed sequences of random lengths (each >= 1)."""
    if L < n_docs:
        raise ValueError(f"L must be at least n_docs={n_docs} to pack {n_docs} sequences, got L={L}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.zeros(L, dtype=torch.long)
    starts[torch.randperm(L - 1, generator=g)[: n_docs - 1] + 1] = 1   # n_docs - 1 distinct boundaries
    return torch.cumsum(starts, 0)


@dataclass(frozen=True)
class Case:
    """One benchmark case at one length. `qkv_mask()` returns a *fresh* mask object each
    time (an empty BlockMask cache), `flex_mask_mod` is the same mask in Flex's contract."""

    name: str
    label: str
    plain_causal: bool
    qkv_mask: Callable[[], qkv.masks.Mask]
    flex_mask_mod: Callable
    info: dict

    def qkv_kwargs(self, mask) -> dict:
        """Keyword arguments of qkv.attention: `causal=True` for the plain case, as users write it."""
        return {"causal": True} if self.plain_causal else {"mask": mask}


def make_case(name: str, L: int, seed: int = 0) -> Case:
    M = qkv.masks
    if name == "causal":
        return Case(name, "causal", True, M.causal, lambda b, h, q, kv: q >= kv, {})
    if name == "sliding_window":
        W = WINDOW
        # `q < kv + W` rather than `q - kv < W`: Flex's create_block_mask evaluates the whole
        # L x L grid, and this spelling keeps every L x L intermediate boolean
        return Case(name, f"sliding_window({W}) & causal", False, lambda: M.causal() & M.sliding_window(W),
                    lambda b, h, q, kv: (q >= kv) & (q < kv + W), {"window": W})
    if name == "document":
        ids = document_ids(L, N_DOCS, seed)
        lengths = torch.bincount(ids).tolist()
        return Case(name, "document & causal", False, lambda: M.causal() & M.document(ids),
                    lambda b, h, q, kv: (ids[q] == ids[kv]) & (q >= kv), {"doc_lengths": lengths, "seed": seed})
    if name == "prefix_lm":
        n = PREFIX
        return Case(name, f"prefix_lm({n})", False, lambda: M.prefix_lm(n),
                    lambda b, h, q, kv: (kv < n) | (kv <= q), {"prefix": n})
    raise ValueError(f"unknown case {name!r}; choose from {', '.join(CASES)}")


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------

def measure(fn: Callable[[], object], budget_s: float, *, max_runs: int = 7) -> tuple[object, float, int, float]:
    """(result of the first call, median ms, runs, first call ms).

    The first call is a warm-up. When it alone takes half the budget or more (a
    32k dense backward takes a minute on 2 cores) it is the measurement (runs = 1);
    otherwise the median of 3..max_runs further calls within the budget.
    """
    t0 = time.perf_counter()
    result = fn()
    first_s = time.perf_counter() - t0
    if first_s >= budget_s / 2:
        return result, first_s * 1e3, 1, first_s * 1e3
    ms, runs = median_ms(fn, warmup=0, min_runs=3, max_runs=max_runs, budget_s=budget_s - first_s,
                         first_s=first_s)
    return result, ms, runs, first_s * 1e3


def _pass_fn(attn: Callable, q, k, v, dout, pass_: str) -> Callable[[], tuple]:
    """A no-argument callable running `attn(q, k, v)` for one pass; returns (out,) or (out, dq, dk, dv)."""
    if pass_ == "fwd":
        def fn():
            with torch.no_grad():
                return (attn(q, k, v),)
    else:
        def fn():
            qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
            out = attn(qg, kg, vg)
            return (out.detach(), *torch.autograd.grad(out, (qg, kg, vg), dout))
    return fn


def matmul_rate(budget_s: float = 2.0) -> dict:
    """GFLOP/s of a (8, 2048, 64) x (8, 64, 2048) fp32 bmm: the shape of one head-batched QK^T."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 2048, 64, generator=g)                                 # (H, L, D)
    b = torch.randn(8, 64, 2048, generator=g)                                 # (H, D, L)
    flops = 2 * 8 * 2048 * 2048 * 64
    torch.bmm(a, b)
    _, ms, runs, _ = measure(lambda: torch.bmm(a, b), budget_s, max_runs=15)
    return {"shape": "(8, 2048, 64) x (8, 64, 2048)", "dtype": "float32", "ms": round(ms, 3), "runs": runs,
            "gflops": round(flops / (ms / 1e3) / 1e9, 2)}


def gemm_flops(n: int) -> int:
    """FLOPs of one (n, n) x (n, n) matrix product: n^2 outputs of n multiply-adds, 2 n^3."""
    return 2 * n ** 3


def gemm_rate(budget_s: float = 2.0, n: int = GEMM_N) -> dict:
    """GFLOP/s of a square fp32 `torch.mm`, (n, n) x (n, n), at the current torch thread count:
    the machine's compute limit that useful FLOP/s are divided by. Warmed once, then `measure`."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g)                                         # (n, n)
    b = torch.randn(n, n, generator=g)                                         # (n, n)
    flops = gemm_flops(n)
    torch.mm(a, b)
    _, ms, runs, _ = measure(lambda: torch.mm(a, b), budget_s, max_runs=15)
    return {"shape": f"({n}, {n}) x ({n}, {n})", "n": n, "dtype": "float32", "op": "torch.mm",
            "threads": torch.get_num_threads(), "flops": flops, "ms": round(ms, 3), "runs": runs,
            "gflops": round(flops / (ms / 1e3) / 1e9, 2)}


# ----------------------------------------------------------------------------
# Work done: live (q, kv) pairs of the tiles tiled executes
# ----------------------------------------------------------------------------

def live_pairs(mask, L: int, block: tuple[int, int]) -> tuple[int, dict]:
    """(q, kv) pairs in the FULL and PARTIAL tiles tiled computes, summed over batch and heads,
    and the tile counts. Heads run together in tiled, so a tile is live if it is for any head.

    These are *executed* pairs: a PARTIAL tile counts whole, its masked elements included.
    The useful work is `allowed_pairs`."""
    bq, bk = block
    bm = mask.block_mask(L, L, block=(bq, bk), B=B, H=H, q_offset=0)
    kind = bm.kind                                                            # (B', H', nQ, nK)
    live = (kind != EMPTY).any(dim=1)                                         # (B', nQ, nK)
    rows = torch.tensor([min(L, (i + 1) * bq) - i * bq for i in range(kind.shape[2])])
    cols = torch.tensor([min(L, (j + 1) * bk) - j * bk for j in range(kind.shape[3])])
    area = (live.long() * rows.view(1, -1, 1) * cols.view(1, 1, -1)).sum()   # pairs per head, summed over B'
    pairs = int(area) * (B // kind.shape[0]) * H
    counts = {"EMPTY": int((kind == EMPTY).sum()), "PARTIAL": int((kind == PARTIAL).sum()),
              "FULL": int((kind == FULL).sum())}
    return pairs, counts


def allowed_pairs(mask, L: int, *, batch: int = B, heads: int = H, chunk: int = PAIR_CHUNK) -> int:
    """(b, h, q, kv) elements `mask` lets attend in an L x L call (q_offset 0), summed over
    `batch` and `heads`: exact, from the mask itself (not its tile classification).

    The mask is evaluated a band of about `chunk // L` query rows at a time, so memory stays
    at one band (L = 16384: 256 rows, 4M booleans) whatever L is. A dimension the mask does
    not depend on comes back with size 1 (`qkv.masks.evaluate`) and is counted by multiplying.
    """
    rows = max(1, chunk // max(1, L))
    total = 0
    for r0 in range(0, L, rows):
        n = min(rows, L - r0)
        m = qkv.masks.evaluate(mask, batch, heads, n, L, q_offset=r0)      # broadcastable to (B, H, n, L)
        while m.dim() < 4:
            m = m.unsqueeze(0)
        m = m.expand(m.shape[0], m.shape[1], n, L)                          # (B' or 1, H' or 1, n, L)
        total += int(m.sum()) * (batch // m.shape[0]) * (heads // m.shape[1])
    return total


def useful_flops(pairs: int, pass_: str, d: int = D) -> int:
    """Useful FLOPs of one pass over `pairs` allowed (q, kv) pairs: 4 * d a pair forward (QK^T and
    PV, 2 FLOPs per multiply-add); forward+backward 3.5x that (the backward counts 2.5x)."""
    fwd = 4 * d * pairs
    if pass_ == "fwd":
        return fwd
    if pass_ == "fwd+bwd":
        return int(fwd * (1 + BWD_FACTOR))
    raise ValueError(f"unknown pass {pass_!r}; choose from {', '.join(PASSES)}")


# ----------------------------------------------------------------------------
# FlexAttention: compiled per (case, L), failures recorded instead of raised
# ----------------------------------------------------------------------------

@contextlib.contextmanager
def _deadline(seconds: float | None):
    """Raise TimeoutError in the block after `seconds` (main thread on Unix; otherwise no limit)."""
    if (seconds is None or not hasattr(signal, "SIGALRM")
            or threading.current_thread() is not threading.main_thread()):
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"took longer than {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


class _Flex:
    """FlexAttention on the CPU. `error` says why it stopped (then every later cell is n/a);
    `bwd_error` why its backward cannot run."""

    def __init__(self, enabled: bool, timeout_s: float):
        self.timeout_s = timeout_s
        self.error: str | None = None if enabled else "skipped (--no-flex)"
        self.bwd_error: str | None = None
        self.compiled_once = False
        self.fn = self.block_mask = None
        if enabled:
            try:
                from torch.nn.attention.flex_attention import create_block_mask, flex_attention
                self._create, self._flex = create_block_mask, flex_attention
            except ImportError as exc:
                self.error = f"unavailable in torch {torch.__version__}: {_short(exc)}"

    @property
    def ok(self) -> bool:
        return self.error is None

    def first_call(self, mask_mod, q, k, v, L: int):
        """(out, first ms incl. block mask + compile, block mask ms), or None (and `error` set)."""
        self.fn = self.block_mask = None
        torch._dynamo.reset()  # every (case, L) compiles afresh, as a new program would
        try:
            with _deadline(self.timeout_s), torch.no_grad():
                t0 = time.perf_counter()
                bm = self._create(mask_mod, None, None, L, L, device=str(q.device))
                t1 = time.perf_counter()
                fn = torch.compile(self._flex, dynamic=False)
                out = fn(q, k, v, block_mask=bm)
                t2 = time.perf_counter()
        except Exception as exc:  # noqa: BLE001 - a compile failure must not end the benchmark
            self.error = f"compile failed: {_short(exc)}"
            return None
        self.compiled_once = True
        self.fn, self.block_mask = fn, bm
        return out, (t2 - t0) * 1e3, (t1 - t0) * 1e3

    def attn(self, q, k, v):
        return self.fn(q, k, v, block_mask=self.block_mask)


@contextlib.contextmanager
def _cold_inductor_cache():
    """Compile into a fresh inductor cache directory, so Flex's first calls include compilation."""
    try:
        from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
    except ImportError:  # an older torch: use whatever cache there is
        yield "default (could not switch)"
        return
    with tempfile.TemporaryDirectory(prefix="qkv-bench-inductor-") as d, temporary_cache_dir(d):
        yield "cold (a fresh TORCHINDUCTOR_CACHE_DIR for this run)"


# ----------------------------------------------------------------------------
# The memory case, in a fresh process
# ----------------------------------------------------------------------------

def _memory_child(L: int) -> dict:
    """Runs in the subprocess: causal forward+backward with tiled at length L; time and memory.

    The peak comes from VmHWM, reset just before q, k, v are allocated: ru_maxrss of a
    process started by vfork + exec (what subprocess does) starts from the *parent's* peak,
    so after a 32k dense-mask case it would report the parent's gigabytes. ru_maxrss is
    recorded too; it is the peak only where VmHWM is unavailable.
    """
    torch.manual_seed(0)
    # one small call first: thread pools and kernels allocate once, and that belongs to the baseline
    small = [torch.randn(B, H, 256, D, requires_grad=True) for _ in range(3)]
    qkv.attention(*small, causal=True, backend="tiled").sum().backward()
    del small
    gc.collect()
    hwm = reset_peak() and status_bytes("VmHWM") is not None
    base = status_bytes("VmRSS") if hwm else ru_maxrss_bytes()
    q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))   # (B, H, L, D) each
    dout = torch.randn(B, H, L, D)
    t0 = time.perf_counter()
    out = qkv.attention(q, k, v, causal=True, backend="tiled")
    t1 = time.perf_counter()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    t2 = time.perf_counter()
    ru_peak = ru_maxrss_bytes()
    peak = status_bytes("VmHWM") if hwm else ru_peak
    tensor_bytes = sum(t.numel() * t.element_size() for t in (q, k, v, out, dout, dq, dk, dv))
    extra = peak - base - tensor_bytes
    return {"L": L, "mask": "causal", "B": B, "H": H, "D": D, "dtype": "float32", "backend": "tiled",
            "fwd_ms": round((t1 - t0) * 1e3, 1), "fwd_bwd_ms": round((t2 - t0) * 1e3, 1),
            "baseline_rss_bytes": base, "peak_rss_bytes": peak, "ru_maxrss_bytes": ru_peak,
            "peak_source": "VmHWM, reset at the baseline" if hwm else "ru_maxrss",
            "tensor_bytes": tensor_bytes, "tensors": "q, k, v, out, dout, dq, dk, dv", "extra_bytes": extra,
            "extra_ratio": round(extra / tensor_bytes, 3)}


def memory_case(L: int = MEMORY_LENGTH, *, timeout_s: float | None = 7200) -> dict:
    """The memory case in a fresh `python -m qkv.tools.bench.attention --memory-child L` process, so that peak
    RSS (which only grows) is not polluted by earlier cases. Errors are returned, not raised."""
    cmd = [sys.executable, "-m", "qkv.tools.bench.attention", "--memory-child", str(L)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"L": L, "error": f"timed out after {timeout_s:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return {"L": L, "error": f"exit status {proc.returncode}: {tail}"}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"L": L, "error": f"unreadable output: {proc.stdout[-300:]!r}"}


# ----------------------------------------------------------------------------
# One (case, L): every contender, both passes
# ----------------------------------------------------------------------------

def _ratio(num, den):
    """num / den to 3 decimals (None when either is missing or den is 0): a speed-up."""
    return rounded(ratio(num, den), 3)


def _max_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> tuple[float, float]:
    """(largest |a - b| over the tensors, largest |b|, at least 1): the error and its scale."""
    diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
    scale = max(1.0, *(float(y.abs().max()) for y in b))
    return diff, scale


def _bench_case(case: Case, L: int, flex: _Flex, *, budget_s: float, check: bool, seed: int,
                log: Callable[[str], None]) -> tuple[list[dict], dict | None]:
    """Every contender on one (case, L), both passes: the rows, and (with `check`) their agreement."""
    q, k, v, dout = _case_inputs(L, seed)
    tiled_block = tuple(qkv.backends.get("tiled").block)
    first = _qkv_first_call(case, L, q, k, v, tiled_block)
    first["pairs"], first["tiles"] = live_pairs(case.qkv_mask(), L, tiled_block)
    t0 = time.perf_counter()
    first["allowed"] = allowed_pairs(case.qkv_mask(), L)   # once per (case, L), kept in both rows
    first["allowed_ms"] = (time.perf_counter() - t0) * 1e3
    attns, dense, mask_ms = _contenders(case, L, budget_s)
    flex_first = _flex_first_call(case, L, flex, q, k, v, log)

    rows, outputs = [], {}
    for p in PASSES:
        row = _pass_row(case, L, p, attns, flex, (q, k, v, dout), budget_s, outputs if check else None, log)
        _row_summary(row, mask_ms, first, flex_first)
        rows.append(row)
        log("  " + _progress(row))

    agreement = _agreement(outputs, flex_first, L) if check else None
    del outputs, attns, dense, flex_first
    flex.fn = flex.block_mask = None
    gc.collect()
    return rows, agreement


def _case_inputs(L: int, seed: int) -> tuple[torch.Tensor, ...]:
    """q, k, v and the output's cotangent dout, (B, H, L, D) each, seeded by (seed, L)."""
    g = torch.Generator().manual_seed(seed + L)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=DTYPE) for _ in range(3))   # (B, H, L, D) each
    dout = torch.randn(B, H, L, D, generator=g, dtype=DTYPE)                         # (B, H, L, D)
    return q, k, v, dout


def _qkv_first_call(case: Case, L: int, q, k, v, tiled_block: tuple[int, int]) -> dict:
    """qkv's first call: a fresh mask object, so classifying its tiles is part of the call.
    {"block_mask_ms": classifying alone, "first_ms": the whole first call}."""
    t0 = time.perf_counter()
    case.qkv_mask().block_mask(L, L, block=tiled_block, B=B, H=H, q_offset=0)
    qkv_bm_ms = (time.perf_counter() - t0) * 1e3
    fresh = case.qkv_mask()
    t0 = time.perf_counter()
    with torch.no_grad():
        qkv.attention(q, k, v, backend="tiled", **case.qkv_kwargs(fresh))
    qkv_first_ms = (time.perf_counter() - t0) * 1e3
    del fresh
    return {"block_mask_ms": qkv_bm_ms, "first_ms": qkv_first_ms}


def _contenders(case: Case, L: int, budget_s: float) -> tuple[dict, torch.Tensor | None, float | None]:
    """(attention callables of tiled, auto and sdpa; sdpa's dense mask or None; ms to build it or None)."""
    mask = case.qkv_mask()  # shared by tiled and auto: its BlockMask is built once, as in a training loop
    kwargs = case.qkv_kwargs(mask)

    # sdpa's dense mask, built (and timed) apart from the attention call
    dense, mask_ms = None, None
    if not case.plain_causal:
        dense, mask_ms, _, _ = measure(lambda: case.qkv_mask().to_dense(L, L)[0, 0], budget_s, max_runs=3)  # (L, L)

    attns = {
        "tiled": lambda a, b, c: qkv.attention(a, b, c, backend="tiled", **kwargs),
        "auto": lambda a, b, c: qkv.attention(a, b, c, backend="auto", **kwargs),
        "sdpa": (lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True)) if dense is None
        else (lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=dense)),
    }
    return attns, dense, mask_ms


def _flex_first_call(case: Case, L: int, flex: _Flex, q, k, v, log):
    """Flex's first call for this (case, L) (`_Flex.first_call`), or None when Flex is off or failed."""
    flex_first = None
    if flex.ok:
        log(f"  compiling FlexAttention for {case.label}, L={L} ...")
        flex_first = flex.first_call(case.flex_mask_mod, q, k, v, L)
        if flex_first is None:
            log(f"  flex: {flex.error}")
    return flex_first


def _pass_row(case: Case, L: int, p: str, attns: dict, flex: _Flex, tensors, budget_s: float,
              outputs: dict | None, log) -> dict:
    """The timings of every contender for one pass; their results go into `outputs` (when given)."""
    q, k, v, dout = tensors
    row = {"case": case.name, "label": case.label, "L": L, "pass": p, "B": B, "H": H, "D": D,
           "dtype": "float32"}
    for name in IMPLS:
        row[f"{name}_ms"] = row[f"{name}_runs"] = None
        if name == "flex":
            got = _flex_cell(flex, row, p, tensors, budget_s, log)
            if got is None:
                continue
            res, ms, runs = got
        else:
            res, ms, runs, _ = measure(_pass_fn(attns[name], q, k, v, dout, p), budget_s)
        row[f"{name}_ms"], row[f"{name}_runs"] = round(ms, 3), runs
        if outputs is not None:
            outputs[(name, p)] = res
        del res
    return row


def _flex_cell(flex: _Flex, row: dict, p: str, tensors, budget_s: float, log):
    """(result, ms, runs) of Flex's steady state for pass `p`, or None with `row["flex_error"]` saying why."""
    if not flex.ok or flex.fn is None:
        row["flex_error"] = flex.error or "not compiled"
        return None
    if p == "fwd+bwd" and flex.bwd_error is not None:
        row["flex_error"] = f"backward {flex.bwd_error}"
        return None
    fn = _pass_fn(flex.attn, *tensors, p)
    try:
        if p == "fwd+bwd":  # compiles the backward: an extra call, timed as its first call
            with _deadline(flex.timeout_s):
                t0 = time.perf_counter()
                fn()
                row["flex_bwd_first_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
        res, ms, runs, _ = measure(fn, budget_s)
    except Exception as exc:  # noqa: BLE001 - e.g. no backward on this device
        if p == "fwd+bwd":
            flex.bwd_error = f"unsupported: {_short(exc)}"
            row["flex_error"] = f"backward {flex.bwd_error}"
        else:
            flex.error = f"run failed: {_short(exc)}"
            row["flex_error"] = flex.error
        log(f"  flex {p}: {row['flex_error']}")
        return None
    return res, ms, runs


def _row_summary(row: dict, mask_ms: float | None, first: dict, flex_first) -> None:
    """The row's ratios and every contender's useful FLOP/s; for the forward pass also the first calls,
    the live tiles and tiled's FLOP rate over them. (The rates' ratios come in `_efficiency`.)"""
    row["sdpa_mask_ms"] = None if mask_ms is None else round(mask_ms, 3)
    L = row["L"]
    row["allowed_pairs"] = first["allowed"]
    row["allowed_pairs_ms"] = round(first["allowed_ms"], 1)
    row["density"] = round(first["allowed"] / (B * H * L * L), 6)
    row["useful_flops"] = useful_flops(first["allowed"], row["pass"])
    for name in IMPLS:
        ms = row[f"{name}_ms"]
        row[f"{name}_useful_gflops"] = None if ms is None else round(row["useful_flops"] / (ms / 1e3) / 1e9, 2)
    row["speedup_vs_flex"] = _ratio(row["flex_ms"], row["tiled_ms"])
    row["speedup_vs_sdpa"] = _ratio(row["sdpa_ms"], row["tiled_ms"])
    row["auto_vs_sdpa"] = _ratio(row["sdpa_ms"], row["auto_ms"])
    if row["pass"] == "fwd":
        row["qkv_block_mask_ms"] = round(first["block_mask_ms"], 3)
        row["qkv_first_ms"] = round(first["first_ms"], 3)
        row["flex_first_ms"] = None if flex_first is None else round(flex_first[1], 1)
        row["flex_block_mask_ms"] = None if flex_first is None else round(flex_first[2], 3)
        row["first_call_ratio"] = _ratio(row["flex_first_ms"], row["qkv_first_ms"])
        pairs = first["pairs"]
        flops = 4 * D * pairs
        row["live_pairs"], row["tiles"], row["live_tile_flops"] = pairs, first["tiles"], flops
        row["tiled_live_gflops"] = round(flops / (row["tiled_ms"] / 1e3) / 1e9, 2)


def _efficiency(rows: Sequence[dict], gemm_gflops: float, bmm_gflops: float) -> None:
    """Into every row: each contender's useful FLOP/s over the GEMM rate (`X_vs_gemm`, None where X did
    not run); into forward rows: tiled's executed-tile FLOP/s over the bmm rate (`tiled_vs_bmm`)."""
    for r in rows:
        for name in IMPLS:
            r[f"{name}_vs_gemm"] = _ratio(r[f"{name}_useful_gflops"], gemm_gflops)
        if r["pass"] == "fwd":
            r["tiled_vs_bmm"] = _ratio(r["tiled_live_gflops"], bmm_gflops)


def _agreement(outputs: dict, flex_first, L: int) -> dict:
    """Every contender's outputs (and gradients) against sdpa's: max |diff| and whether all agree."""
    agreement = {"L": L}
    ref_fwd = outputs[("sdpa", "fwd")]
    others = [("tiled", "fwd"), ("auto", "fwd"), ("flex", "fwd"), ("tiled", "fwd+bwd"), ("auto", "fwd+bwd")]
    agree = True
    for name, p in others:
        key = name if p == "fwd" else f"{name}_grads"
        got = outputs.get((name, p))
        if got is None:
            agreement[key] = None
            continue
        diff, scale = _max_diff(got, outputs[("sdpa", p)])
        agreement[key] = diff
        agree = agree and diff <= 1e-4 * scale
    if flex_first is not None:
        diff, scale = _max_diff((flex_first[0],), ref_fwd)
        agreement["flex_first_call"] = diff
        agree = agree and diff <= 1e-4 * scale
    agreement["agree"] = bool(agree)
    agreement["rule"] = "max |x - sdpa| <= 1e-4 x max(1, max |sdpa|), outputs (and dq, dk, dv for *_grads)"
    return agreement


def _fmt_ms(ms) -> str:
    if ms is None:
        return "n/a"
    return f"{ms:.0f}" if ms >= 1000 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _fmt_x(r) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


def _progress(r: dict) -> str:
    return (f"{r['label']:<30} L={r['L']:<6} {r['pass']:<7} tiled {_fmt_ms(r['tiled_ms'])} ms, "
            f"auto {_fmt_ms(r['auto_ms'])} ms, sdpa {_fmt_ms(r['sdpa_ms'])} ms, flex {_fmt_ms(r['flex_ms'])} ms; "
            f"tiled {r['tiled_useful_gflops']:.1f} useful GFLOP/s")


# ----------------------------------------------------------------------------
# Goals and tables
# ----------------------------------------------------------------------------

def _goal(goal, case, L, p, measured, target, direction=">=") -> dict:
    met = None if measured is None else (measured >= target if direction == ">=" else measured <= target)
    return {"goal": goal, "case": case, "L": L, "pass": p, "measured": measured, "target": target,
            "direction": direction, "met": met}


def evaluate_goals(rows: Sequence[dict], memory: dict | None, goal_L: int) -> list[dict]:
    """The issue's goals with their measured ratios, judged at `goal_L`."""
    at = {(r["case"], r["L"], r["pass"]): r for r in rows}
    goals = []
    for case in dict.fromkeys(r["case"] for r in rows):
        fwd, both = at.get((case, goal_L, "fwd")), at.get((case, goal_L, "fwd+bwd"))
        if case == "causal":
            for r in (fwd, both):
                if r is not None:
                    goals.append(_goal("dense causal: tiled >= 0.8x SDPA speed", case, goal_L, r["pass"],
                                       r["speedup_vs_sdpa"], 0.8))
                    goals.append(_goal("dense causal: auto >= 0.95x SDPA speed", case, goal_L, r["pass"],
                                       r["auto_vs_sdpa"], 0.95))
        else:
            if fwd is not None:
                goals.append(_goal("masked fwd: tiled >= 1.2x Flex steady-state speed", case, goal_L, "fwd",
                                   fwd["speedup_vs_flex"], 1.2))
                goals.append(_goal("masked fwd: tiled >= 5x SDPA with dense mask", case, goal_L, "fwd",
                                   fwd["speedup_vs_sdpa"], 5.0))
                goals.append(_goal("masked: qkv first call (BlockMask incl.) >= 20x faster than Flex's",
                                   case, goal_L, "fwd", fwd["first_call_ratio"], 20.0))
            if both is not None:
                goals.append(_goal("masked fwd+bwd: tiled >= 3x SDPA with dense mask", case, goal_L, "fwd+bwd",
                                   both["speedup_vs_sdpa"], 3.0))
        for r in (fwd, both):
            if r is not None:
                goals.append(_goal(f"efficiency: tiled useful FLOP/s >= {EFFICIENCY_GOAL:.0%} of the square "
                                   "GEMM rate", case, goal_L, r["pass"], r.get("tiled_vs_gemm"), EFFICIENCY_GOAL))
    if memory is not None:
        goals.append(_goal("memory: causal fwd+bwd peak extra <= 2x bytes of q,k,v,out,grads", "causal",
                           memory.get("L"), "fwd+bwd", memory.get("extra_ratio"), 2.0, "<="))
    return goals


_MAIN_HEADER = ("case", "L", "pass", "tiled ms", "auto ms", "sdpa ms", "mask ms", "flex ms", "vs flex",
                "vs sdpa", "auto vs sdpa", "qkv 1st ms", "flex 1st ms", "1st ratio", "tiled/gemm")


def _fmt_pct(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _main_cells(rows: Sequence[dict]) -> list[list[str]]:
    body = []
    for r in rows:
        fwd = r["pass"] == "fwd"
        no_bwd = r["flex_ms"] is None and (r.get("flex_error") or "").startswith("backward unsupported")
        body.append([
            r["label"], str(r["L"]), r["pass"], _fmt_ms(r["tiled_ms"]), _fmt_ms(r["auto_ms"]), _fmt_ms(r["sdpa_ms"]),
            "-" if r["sdpa_mask_ms"] is None else _fmt_ms(r["sdpa_mask_ms"]),
            "no bwd" if no_bwd else _fmt_ms(r["flex_ms"]),
            _fmt_x(r["speedup_vs_flex"]), _fmt_x(r["speedup_vs_sdpa"]), _fmt_x(r["auto_vs_sdpa"]),
            _fmt_ms(r["qkv_first_ms"]) if fwd else "-", _fmt_ms(r["flex_first_ms"]) if fwd else "-",
            _fmt_x(r["first_call_ratio"]) if fwd else "-",
            _fmt_pct(r.get("tiled_vs_gemm")),
        ])
    return body


_EFF_HEADER = ("case", "L", "pass", "allowed", "useful GFLOP", "tiled GFLOP/s", "tiled/gemm", "auto/gemm",
               "sdpa/gemm", "flex/gemm", "tiles/bmm")


def _eff_cells(rows: Sequence[dict]) -> list[list[str]]:
    body = []
    for r in rows:
        rate = r["tiled_useful_gflops"]
        body.append([
            r["label"], str(r["L"]), r["pass"], f"{r['density']:.1%}", _fmt_ms(r["useful_flops"] / 1e9),
            "n/a" if rate is None else f"{rate:.1f}",
            *(_fmt_pct(r.get(f"{name}_vs_gemm")) for name in IMPLS),
            _fmt_pct(r.get("tiled_vs_bmm")) if r["pass"] == "fwd" else "-",
        ])
    return body


def _goal_cells(goals: Sequence[dict]) -> list[list[str]]:
    body = []
    for g in goals:
        m = g["measured"]
        shown = "n/a" if m is None else (f"{m:.0%}" if "efficiency" in g["goal"] else f"{m:.2f}x")
        target = f"{g['target']:.0%}" if "efficiency" in g["goal"] else f"{g['target']:g}x"
        verdict = "n/a" if g["met"] is None else ("met" if g["met"] else "NOT met")
        body.append([g["goal"], g["case"], str(g["L"]), g["pass"], shown, f"{g['direction']} {target}", verdict])
    return body


_GOAL_HEADER = ("goal", "case", "L", "pass", "measured", "target", "verdict")


def _agreement_cells(agreement: dict) -> list[list[str]]:
    f = lambda x: "n/a" if x is None else f"{x:.1e}"  # noqa: E731
    return [[case, str(a["L"]), f(a["tiled"]), f(a["auto"]), f(a["flex"]), f(a["tiled_grads"]), f(a["auto_grads"]),
             "yes" if a["agree"] else "NO"] for case, a in agreement.items()]


_AGREE_HEADER = ("case", "L", "tiled", "auto", "flex", "tiled grads", "auto grads", "agree")


def _notes(result: dict) -> list[str]:
    gm = result["gemm"]
    mm = result["matmul"]
    fl = result["flex"]
    notes = [
        (f"GEMM rate (every 'X/gemm' divides by it): {gm['gflops']:.1f} GFLOP/s, the mean of start "
         f"{gm['start']['gflops']:.1f} and end {gm['end']['gflops']:.1f}; {gm['op']} {gm['shape']} fp32, "
         f"2n^3 = {gm['flops'] / 1e9:.1f} GFLOP a call, {gm['threads']} torch threads"),
        (f"attention-shaped bmm rate (only 'tiles/bmm' divides by it): {mm['gflops']:.1f} GFLOP/s, the mean "
         f"of start {mm['start']['gflops']:.1f} and end {mm['end']['gflops']:.1f}; {mm['shape']} fp32 bmm"),
        f"flex: {fl['status']}; backward: {fl['backward']}; compile cache: {fl['cache']}",
    ]
    mem = result["memory"]
    if "skipped" in mem:
        notes.append(f"memory case: skipped ({mem['skipped']})")
    elif "error" in mem:
        notes.append(f"memory case (L={mem['L']}): {mem['error']}")
    else:
        notes.append(f"memory case: L={mem['L']} causal fwd+bwd tiled in {mem['fwd_bwd_ms'] / 1e3:.1f} s "
                     f"(fwd {mem['fwd_ms'] / 1e3:.1f} s); peak RSS {mem['peak_rss_bytes'] / 2**30:.2f} GiB "
                     f"({mem['peak_source']}), "
                     f"extra {mem['extra_bytes'] / 2**30:.2f} GiB = {mem['extra_ratio']:.2f}x the "
                     f"{mem['tensor_bytes'] / 2**30:.2f} GiB of {mem['tensors']}")
    return notes


_LEGEND = ("ms: median of a few calls after a warm-up (one call when it takes half the budget); "
           "flex 'no bwd': FlexAttention has no backward on this device; 'vs X' = X ms / tiled ms (> 1: tiled "
           "faster); 'auto vs sdpa' = sdpa ms / auto ms; mask ms: building sdpa's dense mask, not in sdpa ms; "
           "1st: first call, BlockMask (and Flex's compile) included, '1st ratio' = flex 1st / qkv 1st; "
           "tiled/gemm: tiled's useful FLOP/s / the square GEMM rate (see the efficiency table)")

_EFF_LEGEND = ("useful FLOPs = allowed (q, kv) pairs (counted from the mask, over batch and heads) x 4 x D "
               "forward, x 3.5 forward+backward (the backward counts 2.5x); allowed: those pairs / (B H L^2); "
               "'X/gemm' = X's useful FLOP/s / the square GEMM rate (notes); 'tiles/bmm' (fwd): tiled's FLOP/s "
               "over every pair of the tiles it executes / the attention-shaped bmm rate (memory-bound, so it "
               "can pass 100%)")


def render(result: dict, *, markdown: bool = False) -> str:
    """The result as text (or Markdown): main table, goals, agreement, notes."""
    main = format_table(_MAIN_HEADER, _main_cells(result["rows"]), left=(0, 2), markdown=markdown)
    eff = format_table(_EFF_HEADER, _eff_cells(result["rows"]), left=(0, 2), markdown=markdown)
    goals = format_table(_GOAL_HEADER, _goal_cells(result["goals"]), left=(0, 1, 3, 6), markdown=markdown)
    agree = (format_table(_AGREE_HEADER, _agreement_cells(result["agreement"]), markdown=markdown)
             if result["agreement"] else "(not checked)")
    notes = _notes(result)
    if markdown:
        return "\n".join([
            f"# qkv attention benchmark{' (quick)' if result['quick'] else ''}", "",
            format_machine(result["machine"]) + ".", "",
            "B=1, H=8, D=64, fp32. " + _LEGEND + ".", "", main, "",
            "## Useful FLOP/s over the square GEMM rate", "", _EFF_LEGEND + ".", "", eff, "",
            f"## Goals (judged at L = {result['config']['goal_length']})", "", goals, "",
            "## Agreement with sdpa (max |diff|)", "", agree, "",
            *[f"- {n}" for n in notes], "",
        ])
    return "\n".join([main, "", _LEGEND, "", "useful FLOP/s over the square GEMM rate:", eff, "", _EFF_LEGEND, "",
                      f"goals (judged at L = {result['config']['goal_length']}):", goals, "",
                      "agreement with sdpa (max |diff|):", agree, "", *notes])


# ----------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------

def _flex_status(flex: bool, fx: _Flex) -> tuple[str, str]:
    """(what happened to FlexAttention, what happened to its backward), for the notes."""
    if not flex:
        status = "skipped (--no-flex)"
    elif fx.compiled_once and fx.ok:
        status = "compiled and ran on the CPU"
    elif fx.compiled_once:
        status = f"compiled, then stopped: {fx.error}"
    else:
        status = f"n/a: {fx.error}"
    return status, "not tried" if not fx.compiled_once else fx.bwd_error if fx.bwd_error else "supported"


def run(out_dir="runs/bench", quick: bool = False, *, lengths: Sequence[int] | None = None,
        cases: Sequence[str] = CASES, flex: bool = True, memory: bool = True, budget_s: float | None = None,
        memory_length: int = MEMORY_LENGTH, flex_timeout_s: float = 120.0, seed: int = 0,
        gemm_n: int = GEMM_N, verbose: bool = True) -> dict:
    """Run the attention benchmark; print the tables; write attention.json and attention.md.

    `quick`: L in {1024, 4096}, a shorter budget per measurement, no memory case. The square GEMM
    (n = `gemm_n`, 2048 in both modes) and the bmm rates are measured at the start and the end, with a
    budget of min(2 s, `budget_s`) each. Returns what was written to attention.json.
    """
    lengths = tuple(lengths) if lengths else (QUICK_LENGTHS if quick else LENGTHS)
    for L in lengths:
        if isinstance(L, bool) or not isinstance(L, int) or L < N_DOCS:
            raise ValueError(f"lengths must be integers >= {N_DOCS}, got {L!r}")
    for c in cases:
        if c not in CASES:
            raise ValueError(f"unknown case {c!r}; choose from {', '.join(CASES)}")
    budget_s = budget_s if budget_s is not None else (1.0 if quick else 4.0)
    memory = memory and not quick
    goal_L = GOAL_LENGTH if GOAL_LENGTH in lengths else max(lengths)
    agree_L = AGREE_LENGTH if AGREE_LENGTH in lengths else min(lengths)
    log = (lambda s: print(s, flush=True)) if verbose else (lambda s: None)

    started = time.perf_counter()
    info = machine_info()
    log(format_machine(info))
    log(f"attention benchmark: B={B}, H={H}, D={D}, fp32; L in {list(lengths)}; cases {list(cases)}; "
        f"budget {budget_s:g} s per measurement{'; quick' if quick else ''}")

    # warm up torch's kernels and thread pool so the first measured cell is not charged for it
    w = [torch.randn(B, H, 256, D) for _ in range(4)]
    for be in ("tiled", "auto", "sdpa"):
        _pass_fn(lambda a, b, c: qkv.attention(a, b, c, causal=True, backend=be), *w, "fwd+bwd")()

    rate_budget_s = min(2.0, budget_s)
    gemm_start = gemm_rate(rate_budget_s, gemm_n)
    mm_start = matmul_rate(rate_budget_s)
    log(f"square GEMM rate: {gemm_start['gflops']:.1f} GFLOP/s ({gemm_start['op']} {gemm_start['shape']} fp32, "
        f"{gemm_start['threads']} threads); attention-shaped bmm: {mm_start['gflops']:.1f} GFLOP/s "
        f"({mm_start['shape']})")

    fx = _Flex(flex, flex_timeout_s)
    rows, agreement, case_info = [], {}, {}
    cache_ctx = _cold_inductor_cache() if fx.ok else contextlib.nullcontext("not used")
    with cache_ctx as cache_state:
        for name in cases:
            for L in lengths:
                case = make_case(name, L, seed)
                case_rows, agree = _bench_case(case, L, fx, budget_s=budget_s, check=(L == agree_L), seed=seed,
                                               log=log)
                rows += case_rows
                if agree is not None:
                    agreement[name] = agree
                if case.info:
                    case_info.setdefault(name, {})[str(L)] = case.info
    gemm_end = gemm_rate(rate_budget_s, gemm_n)
    mm_end = matmul_rate(rate_budget_s)
    log(f"square GEMM rate at the end: {gemm_end['gflops']:.1f} GFLOP/s; bmm: {mm_end['gflops']:.1f} GFLOP/s")
    # the rates every ratio divides by: the mean of start and end (both kept, so drift shows)
    gemm = round((gemm_start["gflops"] + gemm_end["gflops"]) / 2, 2)
    rate = round((mm_start["gflops"] + mm_end["gflops"]) / 2, 2)
    _efficiency(rows, gemm, rate)

    if memory:
        log(f"memory case: L={memory_length}, causal, fwd+bwd, tiled, in a fresh process ...")
        mem = memory_case(memory_length)
    else:
        mem = {"skipped": "quick mode" if quick else "--no-memory"}
    goals = evaluate_goals(rows, None if "skipped" in mem else mem, goal_L)

    status, backward = _flex_status(flex, fx)
    result = {
        "benchmark": "attention", "quick": bool(quick), "machine": info,
        "config": {"B": B, "H": H, "D": D, "dtype": "float32", "lengths": list(lengths), "cases": list(cases),
                   "labels": {c: make_case(c, max(lengths), seed).label for c in cases},
                   "window": WINDOW, "prefix": PREFIX, "n_docs": N_DOCS, "case_info": case_info, "seed": seed,
                   "budget_s": budget_s,
                   "goal_length": goal_L, "agree_length": agree_L,
                   "tiled_block": list(qkv.backends.get("tiled").block), "passes": list(PASSES),
                   "useful_flops": f"allowed (q, kv) pairs x 4 x D forward; x {1 + BWD_FACTOR:g} forward+backward",
                   "efficiency_goal": EFFICIENCY_GOAL},
        "gemm": {"shape": gemm_start["shape"], "n": gemm_n, "op": gemm_start["op"], "dtype": "float32",
                 "threads": gemm_start["threads"], "flops": gemm_start["flops"], "gflops": gemm,
                 "rule": "mean of start and end", "start": gemm_start, "end": gemm_end},
        "matmul": {"shape": mm_start["shape"], "dtype": "float32", "gflops": rate, "rule": "mean of start and end",
                   "start": mm_start, "end": mm_end},
        "flex": {"status": status, "compiled": fx.compiled_once, "error": fx.error if flex else None,
                 "backward": backward, "cache": cache_state, "timeout_s": flex_timeout_s},
        "rows": rows, "agreement": agreement, "memory": mem, "goals": goals,
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_results(result, out_dir, "attention", render, log)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="L in {1024, 4096}, short budgets, no memory case")
    parser.add_argument("--lengths", type=int, nargs="+", metavar="L",
                        help="sequence lengths (default 4096 16384 32768)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="which masks (default all)")
    parser.add_argument("--out", default=os.path.join("runs", "bench"), help="where attention.json/.md go")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (no compilation)")
    parser.add_argument("--no-memory", action="store_true", help=f"skip the L={MEMORY_LENGTH} memory case")
    parser.add_argument("--budget", type=float, default=None, help="seconds per measurement (default 4, quick 1)")
    parser.add_argument("--memory-length", type=int, default=MEMORY_LENGTH, metavar="L",
                        help=f"length of the memory case (default {MEMORY_LENGTH})")


def _run_from(args) -> None:
    run(args.out, quick=args.quick, lengths=args.lengths, cases=args.cases, flex=not args.no_flex,
        memory=not args.no_memory, budget_s=args.budget, memory_length=args.memory_length)


def _memory_child_main(length: str) -> None:
    print(json.dumps(_memory_child(int(length))))


def main(argv: list[str] | None = None) -> int:
    """`python -m qkv.tools.bench.attention` / benchmarks/bench_attention.py (and the memory case's subprocess)."""
    return bench_main(argv, prog="bench_attention", description=__doc__.splitlines()[0],
                      add_arguments=add_arguments, run=_run_from, children={"--memory-child": _memory_child_main})


if __name__ == "__main__":
    sys.exit(main())
