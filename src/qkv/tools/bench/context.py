"""`qkv bench context`: context parallelism (ring attention) on this machine, and a model of it on paper.

Legend: B batch, Hq / Hkv query / key-value heads, L the whole sequence, N ranks, Lr = L / N
rows per rank, D head dim, s bytes per element of K and V, g bytes per element of a gradient in
flight (4: the ring sends gradients in float32), p allowed (q, kv) pairs, F FLOPs, R achieved
attention FLOP/s of one device, BW bytes/s of one direction of a link, T wall time, W time a
rank spends blocked on messages.

One sequence (B=1, Hq=Hkv=8, D=64, fp32) under two masks, causal and `sliding_window(1024)`
(causal, 1024 keys), at L = 16k, 32k, 64k (--quick: 8k, causal). Each (mask, L) runs five
setups, every one in fresh processes (`python -c`, one torch thread per rank unless said):

    single x1         one process, 1 thread: `qkv.attention(q, k, v, q_offset=0, ...)`, whole sequence
    single x2         the same at 2 threads
    ring zigzag       2 ranks x 1 thread, `ring_attention(..., layout="zigzag")`
    ring contiguous   2 ranks x 1 thread, layout "contiguous" (under a causal mask the last rank
                      has 3x the first one's pairs: the imbalance zigzag removes)
    ulysses           2 ranks x 1 thread, `ulysses_attention` (all-to-all over heads)

The ranks meet through a TCPStore on a port the OS picks and talk gloo over loopback. Each pass
(forward; forward+backward: the forward, then `torch.autograd.grad` of the output against a
seeded dout) is timed after a warm-up: one call of each pass at L = min(L, 4096) (thread pool,
kernels, gloo's connections). Then timed calls at the full length, each after a barrier: up to
3 (--quick: 2), one only when a call takes over 30 s (--quick: 2 s), no more once the next one
would pass 60 s (--quick: 10 s) for the pass; the "reps" column says how many. A call's time is
the slowest rank's; the pass's time is the best call. The inputs require grad in both passes,
as in training.

Efficiency, with one core as one "device" (the analogue of ring-flash-attention's per-GPU figure):

    device efficiency    (T_single_x1 / cores) / T          cores = ranks x threads; goal >= 85%
                                                            for ring zigzag forward+backward
    machine efficiency   T_single_x2 / T                    the same two cores used another way

Memory: each process's peak resident set (VmHWM, reset just before the pass; ru_maxrss where
that is unavailable) minus its resident set at that moment, after imports, the warm-up, the
inputs (its shards, for a rank) and `malloc_trim`: what the pass itself needs. "mem vs single":
the largest rank's over single x1's. CPU share: a process's CPU time over its wall time not
blocked on messages, per thread (well below 100%: something else had its core). Traffic: what
`qkv.distributed.count()` records on rank 0 during the first timed call (messages and bytes
sent, forward and backward apart). W: every wait on a ring message (`Ring.shift(...).wait()`)
and every all-to-all, timed in the worker by wrapping them. BW: 64 MiB exchanged by the two
ranks at once (`Ring.shift`), best of 3, in each 2-rank run. R: a rank's useful FLOPs (4 D per
allowed pair forward, 3.5x that forward+backward) over its computing time T - W.

The model on paper (`min_shard_rows`, `predicted_waits`): at each ring step a rank computes its
queries against one visiting K/V shard while the next shard is in flight. Full attention: a step
computes p = Lr^2 pairs, F = 4 B Hq Lr^2 D, and sends 2 B Hkv Lr D s bytes; the transfer hides
when 2 B Hkv Lr D s / BW <= 4 B Hq Lr^2 D / R, i.e. Lr >= (s / 2)(Hkv / Hq)(R / BW). The backward
computes 2.5x as much per step and sends K/V again with their gradient (g bytes):
Lr >= ((s + g) / 5)(Hkv / Hq)(R / BW). Causal zigzag computes half the pairs at every step, so Lr
must be twice as long. B and D cancel. For the runs here the model predicts each rank's W from
its own steps' pairs, the measured R and BW (plus the one transfer nothing hides: the last
gradient going home), to set beside the measured W. Then the same formulas for H100s under
stated assumptions (`GPU`): predictions on paper, never measurements.

Writes context.json and context.md. Timings are for reading: the goals say met / not met, and
nothing here fails a test. Another process on the machine slows whichever setup it overlaps.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable, Sequence

import torch

import qkv
from qkv.distributed import pieces, ring_attention, shard, ulysses_attention
from qkv.distributed.transport import Ring, count
from qkv.distributed.views import PieceMask
from qkv.tools.harness import (bench_main, format_machine, format_table, machine_info, ratio, reset_peak, rounded,
                               ru_maxrss_bytes, status_bytes, write_results)

__all__ = ["run", "main", "SETUPS", "MASKS", "LENGTHS", "GPU", "min_shard_rows", "predicted_waits", "step_pairs",
           "piece_pairs", "useful_flops", "gpu_model", "render"]

B, HQ, HKV, D = 1, 8, 8, 64
ITEMSIZE = 4                      # fp32 inputs: s
GRAD_ITEMSIZE = 4                 # gradients travel in float32: g
WINDOW = 1024
MASKS = ("causal", "sliding_window")
LENGTHS = (16384, 32768, 65536)
QUICK_LENGTHS = (8192,)
QUICK_MASKS = ("causal",)
PASSES = ("fwd", "fwd+bwd")
BWD_FACTOR = 2.5                  # useful backward FLOPs per forward FLOP
WARMUP_LENGTH = 4096
RANKS = 2
BW_BYTES = 64 * 2 ** 20           # the bandwidth probe's message
EFFICIENCY_GOAL = 0.85            # ring zigzag, forward+backward, device efficiency

# name: (kind, ranks, threads per rank, layout)
SETUPS = {
    "single x1": ("single", 1, 1, None),
    "single x2": ("single", 1, 2, None),
    "ring zigzag": ("ring", RANKS, 1, "zigzag"),
    "ring contiguous": ("ring", RANKS, 1, "contiguous"),
    "ulysses": ("ulysses", RANKS, 1, "zigzag"),
}

# how many timed calls a pass gets (see the module's docstring)
RULES = {"max_reps": 3, "one_rep_s": 30.0, "budget_s": 60.0}
QUICK_RULES = {"max_reps": 2, "one_rep_s": 2.0, "budget_s": 10.0}

# The assumptions of the GPU predictions.
GPU = {
    "device": "H100 SXM",
    "rate_flops": 400e12,
    "rate_note": "achieved attention FLOP/s of one ring step, forward and backward alike: an assumption. "
                 "FlashAttention-3 (Shah et al., 2024) reports up to ~740 TFLOP/s FP16 forward on H100 SXM5 "
                 "(75% of the 989 TFLOP/s dense peak); 400 is ~55% of that, assumed for forward+backward end "
                 "to end",
    "nvlink_bps": 450e9,
    "nvlink_note": "NVLink 4 within a node: 900 GB/s bidirectional per GPU = 450 GB/s per direction (peak; "
                   "achieved is lower, so the lengths below are lower bounds)",
    "ib_bps": 50e9,
    "ib_note": "InfiniBand NDR between nodes: 400 Gb/s = 50 GB/s per GPU per direction (one NIC per GPU)",
    "itemsize": 2, "grad_itemsize": 4, "head_dim": 128, "hq": 32, "hkv": (32, 8),
    "nodes_gpus": 8, "ranks": (8, 16, 32, 64),
}


# ----------------------------------------------------------------------------
# Masks, pairs and FLOPs
# ----------------------------------------------------------------------------

def mask_of(name: str):
    """The whole sequence's mask of a case, as a qkv mask object."""
    if name == "causal":
        return qkv.masks.causal()
    if name == "sliding_window":
        return qkv.masks.sliding_window(WINDOW)
    raise ValueError(f"unknown mask {name!r}; choose from {', '.join(MASKS)}")


def _mask_kwargs(name: str) -> dict:
    return {"causal": True} if name == "causal" else {"mask": mask_of(name)}


def piece_pairs(mask, qp, kp, L: int) -> int:
    """Allowed (q, kv) pairs of one (b, h) between query piece `qp` and key piece `kp` of a
    sequence of length L: exact, from the mask's interval of keys per query row."""
    got = PieceMask(mask, qp, kp, L).row_ranges(torch.arange(qp.length), kp.length)
    if got is None:
        raise ValueError(f"{mask!r} does not give an interval of keys per row; the benchmark counts pairs by them")
    lo, hi = got
    return int((hi - lo).clamp(min=0)[0].sum())


def step_pairs(mask_name: str, layout: str, L: int, rank: int, size: int) -> list[int]:
    """The allowed pairs of one (b, h) rank `rank` computes at each of the N ring steps (at step
    s it holds the shard of rank (rank - s) mod N)."""
    m = mask_of(mask_name)
    mine = pieces(layout, L, rank, size)
    return [sum(piece_pairs(m, qp, kp, L) for qp in mine for kp in pieces(layout, L, (rank - s) % size, size))
            for s in range(size)]


def useful_flops(pairs: int, pass_: str, heads: int = HQ, batch: int = B, d: int = D) -> float:
    """4 d FLOPs per allowed pair and head forward (QK^T and PV); forward+backward 3.5x that."""
    fwd = 4.0 * d * pairs * heads * batch
    return fwd if pass_ == "fwd" else fwd * (1 + BWD_FACTOR)


def rank_pairs(setup: str, mask_name: str, L: int, rank: int) -> tuple[list[int], int]:
    """(pairs of one (b, h) per step, heads) of what a rank of `setup` computes: a single process
    has one step over all heads; a Ulysses rank one step over Hq / N heads."""
    kind, ranks, _, layout = SETUPS[setup]
    if kind == "ring":
        return step_pairs(mask_name, layout, L, rank, ranks), HQ
    whole = step_pairs(mask_name, "contiguous", L, 0, 1)
    return whole, HQ // ranks


# ----------------------------------------------------------------------------
# The model on paper
# ----------------------------------------------------------------------------

def min_shard_rows(*, itemsize: float, hq: int, hkv: int, rate: float, bandwidth: float, pass_: str,
                   causal: bool, grad_itemsize: float = GRAD_ITEMSIZE) -> float:
    """The shortest Lr at which one ring step's transfer takes no longer than its computation.

    Forward: Lr >= (s / 2)(Hkv / Hq)(R / BW); backward: ((s + g) / 5)(Hkv / Hq)(R / BW)
    (2.5x the FLOPs, K/V and their gradients); twice as long under a causal mask with zigzag
    (half the pairs at every step).
    """
    per = itemsize / 2 if pass_ == "fwd" else (itemsize + grad_itemsize) / (2 * BWD_FACTOR)
    return per * (hkv / hq) * (rate / bandwidth) * (2 if causal else 1)


def shard_bytes(Lr: int, itemsize: float, hkv: int = HKV, batch: int = B, d: int = D) -> float:
    """Bytes of one rank's K and V shards: 2 B Hkv Lr D s (one ring message)."""
    return 2.0 * batch * hkv * Lr * d * itemsize


def predicted_waits(pairs: Sequence[int], Lr: int, rate: float, bandwidth: float, pass_: str,
                    heads: int = HQ) -> float:
    """Seconds a ring rank should spend blocked on messages, on paper: at each step the bytes in
    flight (K/V; in the backward also the gradient sent after the step before) against that
    step's computation at `rate`; plus, in the backward, the last gradient going home, which
    nothing hides."""
    N = len(pairs)
    kv, grad = shard_bytes(Lr, ITEMSIZE), shard_bytes(Lr, GRAD_ITEMSIZE)
    fwd = [useful_flops(p, "fwd", heads) / rate for p in pairs]             # seconds of each forward step
    wait = sum(max(0.0, kv / bandwidth - fwd[s]) for s in range(N - 1))
    if pass_ == "fwd" or N == 1:
        return wait
    for s in range(N):
        flying = (kv if s < N - 1 else 0.0) + (grad if s > 0 else 0.0)
        wait += max(0.0, flying / bandwidth - BWD_FACTOR * fwd[s])
    return wait + grad / bandwidth


def gpu_model(gpu: dict = GPU) -> dict:
    """Minimum Lr (and L = N Lr) for the transfer to hide, for `gpu`'s assumptions: MHA and GQA,
    full and causal (zigzag) attention, NVLink within a node and InfiniBand across nodes."""
    links = {"NVLink": gpu["nvlink_bps"], "InfiniBand": gpu["ib_bps"]}
    rows = []
    for hkv in gpu["hkv"]:
        for causal in (False, True):
            row = {"hq": gpu["hq"], "hkv": hkv, "attention": "causal (zigzag)" if causal else "full", "min_lr": {}}
            for link, bw in links.items():
                got = {p: min_shard_rows(itemsize=gpu["itemsize"], grad_itemsize=gpu["grad_itemsize"], hq=gpu["hq"],
                                         hkv=hkv, rate=gpu["rate_flops"], bandwidth=bw, pass_=p, causal=causal)
                       for p in ("fwd", "bwd")}
                got["binding"] = max(got.values())
                row["min_lr"][link] = {k: math.ceil(round(v, 6)) for k, v in got.items()}   # no float fuzz
            row["min_L"] = {}
            for n in gpu["ranks"]:
                link = "NVLink" if n <= gpu["nodes_gpus"] else "InfiniBand"
                row["min_L"][str(n)] = {"link": link, "L": n * row["min_lr"][link]["binding"]}
            rows.append(row)
    return {"assumptions": dict(gpu, hkv=list(gpu["hkv"]), ranks=list(gpu["ranks"])), "rows": rows,
            "label": "predictions on paper from the formulas above and the stated assumptions; not measurements"}


# ----------------------------------------------------------------------------
# The worker: one process of one setup (run by `python -c`)
# ----------------------------------------------------------------------------

def _malloc_trim() -> None:
    """Give freed heap memory back to the system (glibc), so the resident set is what is live."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _inputs(spec: dict, L: int):
    """q, k, v (this process's rows; requiring grad) and dout, from the seed: every rank draws the
    whole sequence and keeps its shard."""
    g = torch.Generator().manual_seed(spec["seed"])
    whole = [torch.randn(B, h, L, D, generator=g) for h in (HQ, HKV, HKV, HQ)]       # q, k, v, dout
    if spec["kind"] != "single":
        whole = [shard(t, spec["layout"], rank=spec["rank"], size=spec["world"]) for t in whole]
    q, k, v, dout = whole
    return [t.requires_grad_() for t in (q, k, v)], dout


def _attend(spec: dict) -> Callable:
    kw = _mask_kwargs(spec["mask"])
    if spec["kind"] == "single":
        return lambda q, k, v: qkv.attention(q, k, v, q_offset=0, **kw)
    fn = ring_attention if spec["kind"] == "ring" else ulysses_attention
    return lambda q, k, v: fn(q, k, v, layout=spec["layout"], **kw)


def _traffic(t) -> dict:
    messages = sum(t.sent.values()) + sum(t.collectives.values())
    return {"messages": messages, "sent": dict(t.sent), "collectives": dict(t.collectives),
            "bytes_sent": t.bytes_sent, "bytes_per_message": t.bytes_sent / messages if messages else None}


def _call(attend: Callable, x, dout, pass_: str, traffic: dict | None = None) -> None:
    """One pass; with `traffic`, what count() recorded in its forward and backward."""
    counting = count if traffic is not None else contextlib.nullcontext
    with counting() as tf:
        out = attend(*x)
    if pass_ == "fwd+bwd":
        with counting() as tb:
            torch.autograd.grad(out, x, dout)
    if traffic is not None:
        traffic["fwd"] = _traffic(tf)
        if pass_ == "fwd+bwd":
            traffic["bwd"] = _traffic(tb)


class _Waits:
    """Seconds spent blocked on messages, by phase: `Ring.shift(...).wait()` and Ulysses's
    all-to-alls, wrapped while `installed()`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    @contextlib.contextmanager
    def installed(self):
        ulysses = importlib.import_module("qkv.distributed.ulysses")
        shift, all_to_all, waits = Ring.shift, ulysses.all_to_all, self

        class Timed:
            def __init__(self, pending, phase):
                self.pending, self.phase = pending, phase

            def wait(self):
                t0 = time.perf_counter()
                got = self.pending.wait()
                waits.add(self.phase, time.perf_counter() - t0)
                return got

        def timed_shift(ring, send, phase, tag=0):
            return Timed(shift(ring, send, phase, tag), phase)

        def timed_all_to_all(x, group, phase):
            t0 = time.perf_counter()
            got = all_to_all(x, group, phase)
            waits.add(phase, time.perf_counter() - t0)
            return got

        Ring.shift, ulysses.all_to_all = timed_shift, timed_all_to_all
        try:
            yield self
        finally:
            Ring.shift, ulysses.all_to_all = shift, all_to_all


def _slowest(seconds: float, distributed: bool) -> float:
    if not distributed:
        return seconds
    import torch.distributed as dist

    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _timed(attend, x, dout, pass_: str, rules: dict, waits: _Waits, distributed: bool) -> tuple[list, dict]:
    """The timed calls of one pass (every rank makes the same number: the rule reads the slowest
    rank's time): [{"s", "slowest_s", "wait_s"}], and the first call's traffic."""
    import torch.distributed as dist

    reps, traffic, spent = [], {}, 0.0
    while True:
        if distributed:
            dist.barrier()
        waits.seconds = {}
        t0, c0 = time.perf_counter(), time.process_time()
        _call(attend, x, dout, pass_, traffic if not reps else None)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        slowest = _slowest(seconds, distributed)
        reps.append({"s": seconds, "cpu_s": cpu, "slowest_s": slowest, "wait_s": dict(waits.seconds)})
        spent += slowest
        if len(reps) >= rules["max_reps"] or (len(reps) == 1 and slowest > rules["one_rep_s"]) \
                or (len(reps) >= 2 and spent + slowest > rules["budget_s"]):
            return reps, traffic


def _measured_pass(attend, x, dout, pass_: str, rules: dict, waits: _Waits, distributed: bool) -> dict:
    gc.collect()
    _malloc_trim()
    hwm = reset_peak() and status_bytes("VmHWM") is not None
    base = status_bytes("VmRSS") if hwm else ru_maxrss_bytes()
    reps, traffic = _timed(attend, x, dout, pass_, rules, waits, distributed)
    peak = status_bytes("VmHWM") if hwm else ru_maxrss_bytes()
    return {"reps": reps, "traffic": traffic, "baseline_bytes": base, "peak_bytes": peak,
            "peak_source": "VmHWM, reset at the baseline" if hwm else "ru_maxrss"}


def _bandwidth(reps: int = 3) -> dict:
    """Both ranks send BW_BYTES to the next and receive as much from the previous at once (a ring
    step's traffic): bytes / the best time, per direction."""
    import torch.distributed as dist

    ring, buf, best = Ring(), torch.ones(BW_BYTES, dtype=torch.uint8), math.inf
    ring.shift(buf[:1024], "bandwidth").wait()                            # connect
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        ring.shift(buf, "bandwidth").wait()
        best = min(best, time.perf_counter() - t0)
    return {"bytes": BW_BYTES, "best_s": best, "bytes_per_s": BW_BYTES / best}


def _worker(spec: dict) -> dict:
    import torch.distributed as dist

    torch.set_num_threads(spec["threads"])
    distributed = spec["world"] > 1
    if distributed:
        store = dist.TCPStore("127.0.0.1", spec["port"], None, False, timeout=timedelta(seconds=spec["timeout_s"]))
        dist.init_process_group("gloo", store=dist.PrefixStore("pg/", store), rank=spec["rank"],
                                world_size=spec["world"], timeout=timedelta(seconds=spec["timeout_s"]))
    try:
        attend, L = _attend(spec), spec["L"]
        xw, dw = _inputs(spec, min(L, WARMUP_LENGTH))
        for p in PASSES:
            _call(attend, xw, dw, p)
        del xw, dw
        bandwidth = _bandwidth() if distributed else None
        x, dout = _inputs(spec, L)
        waits = _Waits()
        with waits.installed():
            passes = {p: _measured_pass(attend, x, dout, p, spec["rules"], waits, distributed) for p in PASSES}
        if distributed:
            dist.barrier()
    finally:
        if distributed:
            dist.destroy_process_group()
    return {"rank": spec["rank"], "threads": torch.get_num_threads(), "passes": passes, "bandwidth": bandwidth,
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def worker_main() -> None:
    """Entry point of a measuring process: argv[1] is its spec (JSON); prints its result (JSON)."""
    print(json.dumps(_worker(json.loads(sys.argv[1]))), flush=True)


# ----------------------------------------------------------------------------
# The launcher
# ----------------------------------------------------------------------------

def _env(threads: int) -> dict:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[3])          # the directory holding qkv/
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")                     # gloo over loopback
    return env


def _tail(f) -> str:
    f.seek(0)
    return f.read().decode(errors="replace").strip()[-2000:]


def launch(spec: dict, timeout_s: float) -> list[dict]:
    """Run the processes of one setup (a TCPStore on a port the OS picks joins the ranks) and
    return each rank's result; a failed or stuck process stops the others and raises."""
    import torch.distributed as dist

    world = spec["world"]
    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=timedelta(seconds=timeout_s),
                          wait_for_workers=False) if world > 1 else None
    code = "from qkv.tools.bench.context import worker_main; worker_main()"
    outs = [tempfile.TemporaryFile() for _ in range(world)]
    errs = [tempfile.TemporaryFile() for _ in range(world)]
    procs = [subprocess.Popen([sys.executable, "-c", code,
                               json.dumps({**spec, "rank": r, "port": store.port if store else 0,
                                           "timeout_s": timeout_s})],
                              env=_env(spec["threads"]), stdin=subprocess.DEVNULL, stdout=outs[r], stderr=errs[r])
             for r in range(world)]
    deadline = time.perf_counter() + timeout_s
    try:
        while any(p.poll() is None for p in procs):
            failed = [r for r, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed or time.perf_counter() > deadline:
                why = (f"rank {failed[0]} stopped (exit status {procs[failed[0]].returncode}): {_tail(errs[failed[0]])}"
                       if failed else f"no answer in {timeout_s:.0f} s")
                raise RuntimeError(f"{spec['setup']}, {spec['mask']}, L={spec['L']}: {why}")
            time.sleep(0.05)
        bad = [r for r, p in enumerate(procs) if p.returncode != 0]
        if bad:
            raise RuntimeError(f"{spec['setup']}, {spec['mask']}, L={spec['L']}: rank {bad[0]} stopped (exit status "
                               f"{procs[bad[0]].returncode}): {_tail(errs[bad[0]])}")
        return [json.loads(_tail(f).splitlines()[-1]) for f in outs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in outs + errs:
            f.close()
        del store


# ----------------------------------------------------------------------------
# Rows: one (mask, L, setup)
# ----------------------------------------------------------------------------

def _cpu_share(rep: dict, threads: int) -> float:
    """CPU seconds over (wall seconds not blocked on messages x threads)."""
    busy = rep["s"] - sum(rep["wait_s"].values())
    return rep["cpu_s"] / (busy * threads) if busy > 0 else 0.0


def _pass_summary(results: list[dict], pass_: str, threads: int) -> dict:
    """The best call (the slowest rank's time, least over calls) and each rank's figures in it."""
    per = [r["passes"][pass_] for r in results]
    slowest = [rep["slowest_s"] for rep in per[0]["reps"]]
    best = min(range(len(slowest)), key=slowest.__getitem__)
    return {"ms": round(slowest[best] * 1e3, 1), "reps": len(slowest), "call_ms": [round(s * 1e3, 1) for s in slowest],
            "rank_ms": [round(p["reps"][best]["s"] * 1e3, 1) for p in per],
            "cpu_share_ranks": [round(_cpu_share(p["reps"][best], threads), 3) for p in per],
            "wait_ms": [round(sum(p["reps"][best]["wait_s"].values()) * 1e3, 2) for p in per],
            "wait_ms_by_phase": [{k: round(v * 1e3, 2) for k, v in p["reps"][best]["wait_s"].items()} for p in per],
            "peak_mib_ranks": [round((p["peak_bytes"] - p["baseline_bytes"]) / 2 ** 20, 1) for p in per],
            "baseline_mib_ranks": [round(p["baseline_bytes"] / 2 ** 20, 1) for p in per],
            "peak_source": per[0]["peak_source"], "traffic": per[0]["traffic"] or None}


def _rates(row: dict, pairs_by_rank: list[list[int]], heads: int) -> None:
    """Useful FLOPs of each rank and its achieved rate over its computing time (T - W)."""
    row["useful_gflop_ranks"], row["rate_gflops_ranks"] = {}, {}
    for p in PASSES:
        s = row["passes"][p]
        flops = [useful_flops(sum(pairs), p, heads) for pairs in pairs_by_rank]
        busy = [(t - w) / 1e3 for t, w in zip(s["rank_ms"], s["wait_ms"])]
        row["useful_gflop_ranks"][p] = [round(f / 1e9, 3) for f in flops]
        row["rate_gflops_ranks"][p] = [rounded(ratio(f, b) / 1e9, 2) if ratio(f, b) else None
                                       for f, b in zip(flops, busy)]


def _model_row(row: dict, pairs_by_rank: list[list[int]], heads: int) -> None:
    """Into a 2-rank row: the waits the model predicts from the measured R and BW, beside the measured."""
    bw = row["bandwidth_bytes_per_s"]
    row["model"] = {}
    for p in PASSES:
        s = row["passes"][p]
        rates = [(x or 0) * 1e9 for x in row["rate_gflops_ranks"][p]]
        if row["kind"] == "ring":
            pred = [predicted_waits(pairs, row["Lr"], r, bw, p, heads) if r > 0 else None
                    for pairs, r in zip(pairs_by_rank, rates)]
        else:                                   # all-to-all: nothing overlaps, every byte waits
            traffic = s["traffic"] or {}
            sent = sum(traffic.get(k, {}).get("bytes_sent", 0) for k in ("fwd", "bwd"))
            pred = [sent / bw] * len(pairs_by_rank)
        meas = [w / t for w, t in zip(s["wait_ms"], s["rank_ms"])]
        row["model"][p] = {"predicted_wait_ms": [rounded(x * 1e3, 2) if x is not None else None for x in pred],
                           "predicted_wait_frac": rounded(max((x * 1e3 / t for x, t in zip(pred, s["rank_ms"])
                                                               if x is not None), default=None), 4),
                           "measured_wait_frac": rounded(max(meas), 4)}


def make_row(setup: str, mask_name: str, L: int, results: list[dict]) -> dict:
    kind, ranks, threads, layout = SETUPS[setup]
    row = {"mask": mask_name, "L": L, "setup": setup, "kind": kind, "ranks": ranks, "threads": threads,
           "layout": layout, "Lr": L // ranks, "passes": {p: _pass_summary(results, p, threads) for p in PASSES},
           "loadavg_ranks": [r.get("loadavg") for r in results]}
    row["fwd_ms"], row["fwd_bwd_ms"] = row["passes"]["fwd"]["ms"], row["passes"]["fwd+bwd"]["ms"]
    pairs_heads = [rank_pairs(setup, mask_name, L, r) for r in range(ranks)]
    pairs_by_rank, heads = [p for p, _ in pairs_heads], pairs_heads[0][1]
    row["pairs_per_step_ranks"] = pairs_by_rank
    _rates(row, pairs_by_rank, heads)
    if ranks > 1:
        bws = [r["bandwidth"]["bytes_per_s"] for r in results]
        row["bandwidth_bytes_per_s"] = min(bws)
        row["bandwidth_gbs"] = round(min(bws) / 1e9, 3)
        row["message_bytes_on_paper"] = {"kv": shard_bytes(row["Lr"], ITEMSIZE),
                                         "grad": shard_bytes(row["Lr"], GRAD_ITEMSIZE)}
        _model_row(row, pairs_by_rank, heads)
    return row


def add_efficiencies(rows: list[dict]) -> None:
    """Device and machine efficiency and memory against single x1 / x2 of the same (mask, L)."""
    at = {(r["mask"], r["L"], r["setup"]): r for r in rows if "error" not in r}
    for r in rows:
        if "error" in r:
            continue
        one, two = at.get((r["mask"], r["L"], "single x1")), at.get((r["mask"], r["L"], "single x2"))
        cores = r["ranks"] * r["threads"]
        r["device_eff"], r["machine_eff"], r["mem_vs_single"], r["peak_mib"] = {}, {}, {}, {}
        for p in PASSES:
            t = r["passes"][p]["ms"]
            r["peak_mib"][p] = max(r["passes"][p]["peak_mib_ranks"])
            r["device_eff"][p] = rounded(ratio(one["passes"][p]["ms"] / cores, t), 4) if one else None
            r["machine_eff"][p] = rounded(ratio(two["passes"][p]["ms"], t), 4) if two else None
            r["mem_vs_single"][p] = rounded(ratio(r["peak_mib"][p], max(one["passes"][p]["peak_mib_ranks"])), 3) \
                if one else None


def machine_model(rows: list[dict]) -> dict:
    """The formulas with this machine's measured R (per rank, 1 thread, ring zigzag) and BW."""
    ring = [r for r in rows if "error" not in r and r["setup"] == "ring zigzag"]
    bws = [r["bandwidth_bytes_per_s"] for r in rows if "error" not in r and "bandwidth_bytes_per_s" in r]
    if not ring or not bws:
        return {}
    bw = statistics.median(bws)
    out = {"bandwidth_bytes_per_s": bw, "itemsize": ITEMSIZE, "grad_itemsize": GRAD_ITEMSIZE, "hq": HQ, "hkv": HKV,
           "rate_flops": {}, "min_lr": {}, "shard_rows": sorted({r["Lr"] for r in ring})}
    for p in PASSES:
        rates = [x * 1e9 for r in ring if r["mask"] == "causal" for x in r["rate_gflops_ranks"][p] if x]
        rates = rates or [x * 1e9 for r in ring for x in r["rate_gflops_ranks"][p] if x]
        out["rate_flops"][p] = statistics.median(rates)
    for p, key in (("fwd", "fwd"), ("bwd", "fwd+bwd")):
        out["min_lr"][p] = {a: round(min_shard_rows(itemsize=ITEMSIZE, hq=HQ, hkv=HKV, rate=out["rate_flops"][key],
                                                    bandwidth=bw, pass_=p, causal=a == "causal"), 1)
                            for a in ("full", "causal")}
    return out


# ----------------------------------------------------------------------------
# Goals and rendering
# ----------------------------------------------------------------------------

def evaluate_goals(rows: Sequence[dict]) -> list[dict]:
    goals = []
    for r in rows:
        if r["setup"] == "ring zigzag":
            got = None if "error" in r else r["device_eff"]["fwd+bwd"]
            goals.append({"goal": f"ring zigzag fwd+bwd device efficiency, {r['mask']}, L={r['L']}",
                          "measured": got, "target": EFFICIENCY_GOAL, "direction": ">=",
                          "met": None if got is None else got >= EFFICIENCY_GOAL})
    return goals


def _ms(x) -> str:
    return "n/a" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _pct1(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _mib(x) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def _label(mask: str) -> str:
    return "causal" if mask == "causal" else f"sliding_window({WINDOW})"


_MAIN_HEADER = ("mask", "L", "setup", "reps", "fwd ms", "fwd+bwd ms", "device eff fwd", "device eff fwd+bwd",
                "machine eff fwd", "machine eff fwd+bwd", "peak MiB fwd+bwd", "mem vs single", "CPU share")


def _main_cells(rows: Sequence[dict]) -> list[list[str]]:
    body = []
    for r in rows:
        head = [_label(r["mask"]), str(r["L"]), r["setup"]]
        if "error" in r:
            body.append(head + ["error"] + ["n/a"] * (len(_MAIN_HEADER) - 4))
            continue
        reps = "/".join(str(r["passes"][p]["reps"]) for p in PASSES)
        body.append(head + [reps, _ms(r["fwd_ms"]), _ms(r["fwd_bwd_ms"]), _pct(r["device_eff"]["fwd"]),
                            _pct(r["device_eff"]["fwd+bwd"]), _pct(r["machine_eff"]["fwd"]),
                            _pct(r["machine_eff"]["fwd+bwd"]), _mib(r["peak_mib"]["fwd+bwd"]),
                            f"{r['mem_vs_single']['fwd+bwd']:.2f}x" if r["mem_vs_single"]["fwd+bwd"] else "n/a",
                            _pct(min(r["passes"]["fwd+bwd"]["cpu_share_ranks"]))])
    return body


_TRAFFIC_HEADER = ("mask", "L", "setup", "rank ms fwd+bwd", "msgs fwd/bwd", "MiB sent fwd/bwd", "MiB/msg fwd",
                   "BW GB/s", "R GFLOP/s fwd", "R GFLOP/s fwd+bwd", "wait fwd meas/model", "wait fwd+bwd meas/model")


def _traffic_cells(rows: Sequence[dict]) -> list[list[str]]:
    body = []
    for r in rows:
        if "error" in r or r["ranks"] == 1:
            continue
        tr = r["passes"]["fwd+bwd"]["traffic"] or {}
        fwd, bwd = tr.get("fwd", {}), tr.get("bwd", {})
        per_msg = fwd.get("bytes_per_message")
        rates = [" / ".join(f"{x:.1f}" if x else "n/a" for x in r["rate_gflops_ranks"][p]) for p in PASSES]
        waits = [f"{_pct1(r['model'][p]['measured_wait_frac'])} / {_pct1(r['model'][p]['predicted_wait_frac'])}"
                 for p in PASSES]
        body.append([_label(r["mask"]), str(r["L"]), r["setup"],
                     " / ".join(_ms(x) for x in r["passes"]["fwd+bwd"]["rank_ms"]),
                     f"{fwd.get('messages', 0)}/{bwd.get('messages', 0)}",
                     f"{fwd.get('bytes_sent', 0) / 2 ** 20:,.0f}/{bwd.get('bytes_sent', 0) / 2 ** 20:,.0f}",
                     "n/a" if per_msg is None else f"{per_msg / 2 ** 20:,.1f}", f"{r['bandwidth_gbs']:.2f}",
                     *rates, *waits])
    return body


def _machine_model_lines(m: dict) -> list[str]:
    if not m:
        return ["no ring zigzag run: nothing to put into the formulas"]
    lr = m["min_lr"]
    need = max(lr["fwd"]["causal"], lr["bwd"]["causal"])
    short = min(m["shard_rows"])
    verdict = (f"the shortest run's Lr = {short} is {short / need:.0f}x the largest of these minima: the model "
               "predicts the transfers hide" if short >= need else
               f"the shortest run's Lr = {short} is below {need:.0f}: the model predicts exposed transfers")
    return [f"measured on this machine: BW = {m['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s per direction (gloo, "
            f"loopback, median of the runs); R = {m['rate_flops']['fwd'] / 1e9:.1f} GFLOP/s forward, "
            f"{m['rate_flops']['fwd+bwd'] / 1e9:.1f} GFLOP/s forward+backward per rank (1 thread, ring zigzag, "
            f"median); fp32 (s = g = 4), Hq = Hkv = {HQ}",
            f"so the transfer hides for Lr >= {lr['fwd']['full']:.0f} (full) / {lr['fwd']['causal']:.0f} "
            f"(causal) forward and Lr >= {lr['bwd']['full']:.0f} / {lr['bwd']['causal']:.0f} backward; the runs "
            f"have Lr = {', '.join(str(x) for x in m['shard_rows'])}; {verdict} (column 'wait ... model', which "
            "adds the backward's last gradient going home, never hidden)",
            "waiting a rank measures beyond the model's share is not transfer time: it is imbalance (a rank "
            "waiting for its peer to finish computing what it sends next: the backward's gradients, an "
            "all-to-all); gloo's copies, which run on the same two cores, show as slower computation (lower R), "
            "not as waiting"]


_GPU_LR_HEADER = ("Hq/Hkv", "attention", "link", "min Lr fwd", "min Lr bwd", "min Lr")


def _gpu_cells(g: dict) -> tuple[list[list[str]], list[str], list[list[str]]]:
    lr_body, l_body = [], []
    ranks = g["assumptions"]["ranks"]
    for r in g["rows"]:
        heads = f"{r['hq']}/{r['hkv']}"
        for link, v in r["min_lr"].items():
            lr_body.append([heads, r["attention"], link, f"{v['fwd']:,}", f"{v['bwd']:,}", f"{v['binding']:,}"])
        l_body.append([heads, r["attention"], *(f"{r['min_L'][str(n)]['L']:,}" for n in ranks)])
    header = ["Hq/Hkv", "attention",
              *(f"N={n} ({'NVLink' if n <= g['assumptions']['nodes_gpus'] else 'IB'})" for n in ranks)]
    return lr_body, header, l_body


def _gpu_notes(g: dict) -> list[str]:
    a = g["assumptions"]
    return [f"R = {a['rate_flops'] / 1e12:.0f} TFLOP/s: {a['rate_note']}", a["nvlink_note"], a["ib_note"],
            f"bf16 K/V (s = {a['itemsize']}), gradients sent in fp32 (g = {a['grad_itemsize']}) as this library "
            f"does, head dim {a['head_dim']} (it cancels, as does the batch), Hq = {a['hq']}: MHA (Hkv = {a['hq']}) "
            f"and GQA (Hkv = 8)",
            f"N <= {a['nodes_gpus']}: one node, every hop NVLink; beyond, the ring crosses nodes and every step "
            "waits for the InfiniBand hop, so L = N x the InfiniBand Lr; 'min Lr' is the larger of forward and "
            "backward",
            "ignored: latency (each message is megabytes), the SMs NCCL takes from the computation, kernels "
            "slowing down on short pieces, and the backward's last gradient going home (one transfer per "
            "backward, never hidden); a sliding window much shorter than Lr leaves the steps past the "
            "neighbouring shard with nothing to compute, so their transfers cannot hide"]


_LEGEND = ("setups: single x1 / x2 = one process at 1 / 2 threads on the whole sequence; ring zigzag, ring "
           "contiguous, ulysses = 2 ranks x 1 thread (gloo, loopback); reps: timed calls forward / "
           "forward+backward (best shown; a call = the slowest rank); device eff = (single x1 ms / cores) / ms; "
           "machine eff = single x2 ms / ms; peak MiB: the largest process's peak resident set during the pass "
           "over its resident set before it; mem vs single: that over single x1's; CPU share: the process's CPU "
           "seconds (every thread) / (wall seconds not waiting x its torch threads) in the best forward+backward, "
           "the lowest rank's: well under 100% means it did not have its cores (another process ran)")

_TRAFFIC_LEGEND = ("rank ms: each rank's time in the best call; msgs, MiB sent: rank 0 in the first timed "
                   "forward+backward (count()); MiB/msg fwd: one forward message (a ring step: K and V of a "
                   "shard); BW: 64 MiB both ways at once; R: useful FLOP/s of each rank over its time not "
                   "waiting; wait meas/model: the largest rank's share of its time blocked on messages, measured "
                   "and predicted from R and BW")


def _sections(result: dict, markdown: bool) -> list[tuple[str, list[str]]]:
    t = lambda h, b, left: format_table(h, b, left=left, markdown=markdown)  # noqa: E731
    rows, g = result["rows"], result["model"]["gpu"]
    lr_body, l_header, l_body = _gpu_cells(g)
    goals = [[x["goal"], _pct(x["measured"]), f">= {x['target']:.0%}",
              "n/a" if x["met"] is None else "met" if x["met"] else "NOT met"] for x in result["goals"]]
    return [
        ("Context parallelism on this machine", [t(_MAIN_HEADER, _main_cells(rows), (0, 2, 3)), "", _LEGEND + "."]),
        ("Traffic, waiting and the model", [t(_TRAFFIC_HEADER, _traffic_cells(rows), (0, 2, 3, 4, 5, 8, 9, 10, 11)),
                                            "", _TRAFFIC_LEGEND + "."]),
        ("Goals", [t(("goal", "measured", "target", "verdict"), goals, (0, 3))]),
        ("Model on paper", [
            "Per ring step a rank computes its queries against one visiting K/V shard while the next is in "
            "flight. Full attention: F = 4 B Hq Lr^2 D FLOPs against 2 B Hkv Lr D s bytes, hidden when "
            "Lr >= (s/2)(Hkv/Hq)(R/BW); backward (2.5x F; K/V and their gradients, s + g bytes): "
            "Lr >= ((s+g)/5)(Hkv/Hq)(R/BW); causal zigzag computes half the pairs per step: twice those.", "",
            *[f"- {x}" if markdown else x for x in _machine_model_lines(result["model"]["machine"])]]),
        ("Predictions on paper for H100s (not measurements)", [
            t(_GPU_LR_HEADER, lr_body, (0, 1, 2)), "", "Minimum sequence length L = N x min Lr:", "",
            t(l_header, l_body, (0, 1)), "", *[f"- {x}" if markdown else x for x in _gpu_notes(g)]]),
    ]


def render(result: dict, *, markdown: bool = False) -> str:
    """The result as text (or Markdown): the main table, traffic and waiting, goals, the model."""
    notes = [f"B={B}, Hq=Hkv={HQ}, D={D}, fp32; masks {', '.join(_label(m) for m in result['config']['masks'])}; "
             f"warm-up at L = min(L, {WARMUP_LENGTH}); timed calls: {result['config']['rules']}",
             f"load average at the start {result['loadavg_start']}, at the end {result['loadavg_end']} "
             "(another process on 2 cores slows whichever setup it overlaps)"]
    sections = _sections(result, markdown)
    if markdown:
        parts = [f"# qkv context-parallel benchmark{' (quick)' if result['quick'] else ''}", "",
                 format_machine(result["machine"]) + ".", ""]
        for title, body in sections:
            parts += [f"## {title}", "", *body, ""]
        parts += ["## Notes", "", *[f"- {n}" for n in notes], "", f"Finished in {result['seconds']:.0f} s.", ""]
        return "\n".join(parts)
    parts = [format_machine(result["machine"]), ""]
    for title, body in sections:
        parts += [f"{title}:", *body, ""]
    return "\n".join(parts + notes)


# ----------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------

def _check(lengths, masks) -> None:
    for L in lengths:
        if isinstance(L, bool) or not isinstance(L, int) or L < 4 * RANKS or L % (2 * RANKS):
            raise ValueError(f"lengths must be integers >= {4 * RANKS} divisible by {2 * RANKS} (zigzag over "
                             f"{RANKS} ranks), got {L!r}")
    for m in masks:
        if m not in MASKS:
            raise ValueError(f"unknown mask {m!r}; choose from {', '.join(MASKS)}")


def _progress(r: dict) -> str:
    if "error" in r:
        return f"  {r['setup']:<16} error: {r['error']}"
    s = f"  {r['setup']:<16} fwd {_ms(r['fwd_ms'])} ms, fwd+bwd {_ms(r['fwd_bwd_ms'])} ms"
    if r["ranks"] > 1:
        s += (f" (ranks {' / '.join(_ms(x) for x in r['passes']['fwd+bwd']['rank_ms'])}; waits "
              f"{' / '.join(_ms(x) for x in r['passes']['fwd+bwd']['wait_ms'])} ms; BW {r['bandwidth_gbs']:.2f} GB/s)")
    return s


def run(out_dir="runs/bench", quick: bool = False, lengths: Sequence[int] | None = None, *,
        masks: Sequence[str] | None = None, ulysses: bool = True, seed: int = 0, timeout_s: float | None = None,
        verbose: bool = True) -> dict:
    """Run the context-parallel benchmark; print the tables; write context.json and context.md.

    `quick`: L = 8192, causal only, at most 2 timed calls per pass (under a minute). `lengths`,
    `masks` replace the defaults of either mode; `ulysses=False` skips the all-to-all setup.
    Returns what was written to context.json.
    """
    lengths = tuple(lengths) if lengths else (QUICK_LENGTHS if quick else LENGTHS)
    masks = tuple(masks) if masks else (QUICK_MASKS if quick else MASKS)
    _check(lengths, masks)
    rules = QUICK_RULES if quick else RULES
    timeout_s = timeout_s or (600.0 if quick else 3600.0)
    setups = [s for s in SETUPS if ulysses or SETUPS[s][0] != "ulysses"]
    log = (lambda m: print(m, flush=True)) if verbose else (lambda m: None)
    started, load0 = time.perf_counter(), _loadavg()
    info = machine_info()
    log(format_machine(info))
    log(f"context-parallel benchmark{' (quick)' if quick else ''}: B={B}, H={HQ}, D={D}, fp32; L in {list(lengths)}; "
        f"masks {list(masks)}; setups {setups}; load average {load0}")
    rows = []
    for mask_name in masks:
        for L in lengths:
            log(f"{_label(mask_name)}, L={L}:")
            for setup in setups:
                kind, ranks, threads, layout = SETUPS[setup]
                spec = {"setup": setup, "kind": kind, "world": ranks, "threads": threads, "layout": layout,
                        "mask": mask_name, "L": L, "seed": seed, "rules": rules}
                try:
                    row = make_row(setup, mask_name, L, launch(spec, timeout_s))
                except RuntimeError as exc:
                    row = {"mask": mask_name, "L": L, "setup": setup, "kind": kind, "ranks": ranks, "error": str(exc)}
                rows.append(row)
                log(_progress(row))
    add_efficiencies(rows)
    result = {
        "benchmark": "context", "quick": bool(quick), "machine": info,
        "config": {"B": B, "Hq": HQ, "Hkv": HKV, "D": D, "dtype": "float32", "itemsize": ITEMSIZE,
                   "grad_itemsize": GRAD_ITEMSIZE, "lengths": list(lengths), "masks": list(masks), "window": WINDOW,
                   "setups": {s: dict(zip(("kind", "ranks", "threads", "layout"), SETUPS[s])) for s in setups},
                   "rules": rules, "warmup_length": WARMUP_LENGTH, "seed": seed, "bandwidth_probe_bytes": BW_BYTES,
                   "bwd_factor": BWD_FACTOR, "efficiency_goal": EFFICIENCY_GOAL},
        "rows": rows, "model": {"machine": machine_model(rows), "gpu": gpu_model()},
        "loadavg_start": load0, "loadavg_end": _loadavg(),
    }
    result["goals"] = evaluate_goals(rows)
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_results(result, out_dir, "context", render, log)
    return result


def _loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="L = 8192, causal only (under a minute)")
    parser.add_argument("--lengths", type=int, nargs="+", metavar="L", help="sequence lengths (default 16384 32768 "
                        "65536; quick 8192)")
    parser.add_argument("--masks", nargs="+", choices=MASKS, default=None, help="which masks (default both; quick "
                        "causal)")
    parser.add_argument("--no-ulysses", action="store_true", help="skip the all-to-all setup")
    parser.add_argument("--out", default=os.path.join("runs", "bench"), help="where context.json/.md go")
    parser.add_argument("--seed", type=int, default=0, help="seed of q, k, v and dout (default 0)")


def _run_from(args) -> None:
    run(args.out, quick=args.quick, lengths=args.lengths, masks=args.masks, ulysses=not args.no_ulysses,
        seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    """`python -m qkv.tools.bench.context` / benchmarks/bench_context.py."""
    return bench_main(argv, prog="bench_context", description=__doc__.splitlines()[0], add_arguments=add_arguments,
                      run=_run_from)


if __name__ == "__main__":
    sys.exit(main())
