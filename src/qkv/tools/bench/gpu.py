"""`qkv bench gpu`: qkv's Triton kernels against torch SDPA's CUDA backends, FlexAttention and flash-attn.

Legend: B batch, H heads (Hq query, Hkv key/value heads in decode), L sequence length (Lq = Lk = L
in prefill), D head dim, Lk_live the average number of keys a query row may attend (exact, from
the mask); bf16 throughout; ms milliseconds, us microseconds; TFLOP/s 10^12 FLOP a second.

One run on one CUDA GPU, every contender side by side on the same q, k, v. (The cases and the
work each does, FLOPs and pairs: `qkv.tools.bench.gpu_cases`.)

Prefill (B x L = 16384 tokens, H x D = 2048: H 16 at D 128, H 32 at D 64):

    case             qkv call (backend="triton")              Flex (torch.compile(flex_attention))
    dense            no mask                                  no block mask
    causal           causal=True                              causal().to_flex(B, H, L, L)
    sliding_window   mask=sliding_window(1024)                mask.to_flex(...)
    document         mask=document(ids) & causal()            mask.to_flex(...)   (16 random lengths)
    prefix_lm        mask=prefix_lm(L // 4)                   mask.to_flex(...)
    alibi            causal=True, score_mod=alibi(H)          causal; score + slope[h] * (kv - q)
    softcap          causal=True, score_mod=softcap(30.0)     causal; 30 * tanh(score / 30)

Every case at L = 16384, D = 128 (the shape the goals are judged at), then dense and causal at
L in 1k, 2k, 4k, 8k, 16k, 32k and D in 128, 64 (32k: B = 1). A failed `to_flex` falls back to
`create_block_mask` on the same mask written as a mask_mod. The contenders: qkv (`triton`);
torch SDPA under `sdpa_kernel` with each CUDA backend, FLASH_ATTENTION and CUDNN_ATTENTION on
dense and causal only (they take no other mask), EFFICIENT_ATTENTION also with a dense additive
bf16 bias of the mask (and ALiBi) where it fits in 4 GiB; Flex on the 16k goal cases; flash-attn's
`flash_attn_func` (causal, window_size, alibi_slopes, softcap; `flash_attn_varlen_func` for
documents; no prefix-LM) when it imports. A contender that does not apply shows 'n/a[k]', one
that failed 'err[k]', note k saying why.

FLOPs: 4 * B * H * Lq * Lk_live * D forward, x 2.5 backward, x 3.5 forward+backward, Lk_live counted
exactly from the mask (`gpu_cases.allowed_pairs`), the same for every contender. The rows per case:
fwd (no grad), fwd+bwd (forward, then torch.autograd.grad of q, k, v), bwd = fwd+bwd ms - fwd ms.

Decode: one query per sequence, Hq 32 / Hkv 8, D 128, cache lengths 1k, 4k, 16k (B 8) and 64k,
128k (B 1), through `qkv.kernels.gpu.decode.paged_decode` on a paged cache (block size 16, the
blocks of each sequence scattered over the pool in random order) and on contiguous (B, Hkv, L, D)
buffers, with SDPA on the contiguous cache (enable_gqa) as the baseline. Achieved bandwidth = bytes
of K and V read / time, as a share of the HBM bandwidth measured in the same run: a 2 GiB bf16
`dst.copy_(src)`, bytes read + written / time, at the start and at the end (their mean).

First call: in a fresh process with empty TRITON_CACHE_DIR and TORCHINDUCTOR_CACHE_DIR, the wall
time of the first causal 4k bf16 forward+backward (B 4, H 16, D 128) with qkv's triton backend,
JIT compilation included, and the same with compiled FlexAttention (create_block_mask and
compilation included); then a second fresh process with the cache now warm.

Timing: after a first call (compilation) and 2 warm-ups, 3..20 calls within about 0.5 s, a pair
of CUDA events around each, the median reported. Decode calls see a cold L2 (a 256 MiB buffer
written before each). Robustness: the cases run in a worker process that writes each case's row
as it finishes; every contender of every case is in try/except (the error text goes in the
table); a worker that dies (a lost CUDA context) is restarted after the case it died in. The
budget (--budget, default 450 s; --quick 60 s) is checked before every case and every contender;
what it leaves out is listed as skipped. Timings are for reading; nothing here passes or fails a
test.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

import qkv
from qkv.tools.bench.attention import document_ids
from qkv.tools.bench.gpu_cases import (
    D_MODEL, DTYPE, GOAL_D, GOAL_L, HKV, HQ, MASKS, N_DOCS, PAGE, PASSES, SOFTCAP, TOKENS, WINDOW,
    allowed_pairs, attention_flops, attn_row, decode_row, flex_mods, lk_live, mask_of, plan, qkv_kwargs, tflops,
)
from qkv.tools.harness import bench_main, format_machine, format_table, machine_info, ratio, rounded, write_results

__all__ = ["run", "main", "plan", "MASKS", "CONTENDERS", "GPUUnavailable", "NO_GPU", "qkv_kwargs", "mask_of",
           "flex_mods", "allowed_pairs", "lk_live", "attention_flops", "tflops", "attn_row", "decode_row",
           "time_call", "drive", "assemble", "evaluate_goals", "render"]

FLUSH_BYTES = 256 << 20              # written before each decode call: a cold L2
BIAS_LIMIT = 4 << 30                 # the largest dense bias SDPA's EFFICIENT backend is given
CONTENDERS = ("qkv", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex", "flash_attn")
REFERENCES = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex", "flash_attn")
DECODERS = ("paged", "contiguous", "sdpa")
BUDGET_S, QUICK_BUDGET_S = 450.0, 60.0
GRACE_S = 60.0                       # past the budget before the worker is killed
FLEX_NEED_S = 30.0                   # Flex is not started with less budget left (it compiles)
FIRST_TIMEOUT_S = 240.0
NO_GPU = ("qkv bench gpu needs a CUDA GPU (torch.cuda.is_available() is False); the Triton kernels are tested on "
          "the CPU under TRITON_INTERPRET=1 by the test suite")


class GPUUnavailable(OSError):
    """No CUDA device. An environment error: `qkv bench gpu` reports it on one line (the command line
    prints an OSError as `qkv bench: error: ...` and returns 1) instead of failing inside torch."""


class ContextLost(RuntimeError):
    """The CUDA context no longer works (e.g. an illegal memory access): the worker must end."""


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------

def time_call(fn: Callable[[], object], device, *, max_s: float = 0.5, min_runs: int = 3, max_runs: int = 20,
              warmup: int = 2, flush: torch.Tensor | None = None) -> tuple[object, float, int, float]:
    """(first result, median ms, runs, first call ms). A first call (compilation included), `warmup`
    more, then min_runs..max_runs calls within about max_s, timed by a pair of CUDA events each (the
    GPU's time; wall clock on a CPU). `flush`, when given, is written before each timed call."""
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync()
    each = (time.perf_counter() - t0) / warmup if warmup else first_s
    n = int(min(max_runs, max(min_runs, max_s / max(each, 1e-6))))
    times = []
    if cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            if flush is not None:
                flush.zero_()
            start.record()
            fn()
            end.record()
        sync()
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(n):
            if flush is not None:
                flush.zero_()
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return out, statistics.median(times), n, first_s * 1e3


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _recover(device, exc: BaseException) -> str:
    """The error's text, after checking the CUDA context still works (ContextLost if not) and freeing
    the allocator's cache (after an out-of-memory error the next case needs it)."""
    text = _short(exc)
    if torch.device(device).type == "cuda":
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except Exception as lost:  # noqa: BLE001 - whatever it is, this process can use the GPU no more
            raise ContextLost(f"{text} (then: {_short(lost, 120)})") from exc
    return text


@contextlib.contextmanager
def _alarm(seconds: float):
    """TimeoutError in the block after `seconds` (main thread on Unix; elsewhere no limit). Stops a
    compilation that would outlast the budget; a kernel that never returns is the parent's to kill."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"stopped after {seconds:.0f} s: the budget is spent")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _timing(ms: float, runs: int, first_ms: float) -> dict:
    return {"ms": round(ms, 4), "runs": runs, "first_ms": round(first_ms, 1)}


def _first_working(tries, make_fn, device, **timing) -> tuple[dict, object, object]:
    """(cell, attn, first result) of the first of `tries`, (via, thunk building attn), whose timed call
    works; the cell says which (and what failed before it), or the errors of all."""
    failed = []
    for via, thunk in tries:
        try:
            attn = thunk()
            out, ms, runs, first_ms = time_call(make_fn(attn), device, **timing)
        except ContextLost:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded in the table
            failed.append(f"{via}: {_recover(device, exc)}")
            continue
        cell = {"via": via, **_timing(ms, runs, first_ms)}
        if failed:
            cell["fallback_from"] = "; ".join(failed)
        return cell, attn, out
    return {"error": "; ".join(failed) or "nothing to try"}, None, None


# ----------------------------------------------------------------------------
# Prefill: the contenders
# ----------------------------------------------------------------------------

def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _sdpa_call(backend, ctx, *, is_causal: bool = False, bias=None):
    def attn(q, k, v):
        with ctx(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=is_causal)
    return attn


def _dense_bias(spec: dict, kwargs: dict, device, backend, ctx):
    """SDPA EFFICIENT with the mask (and ALiBi) as an additive bf16 bias (1, 1 or H, L, L), or why not."""
    L, H, name = spec["L"], spec["H"], spec["mask"]
    if name == "softcap":
        return "softcap is not an additive bias"
    heads = H if name == "alibi" else 1
    size = heads * L * L * 2
    if size > BIAS_LIMIT:
        return f"a dense ({heads}, {L}, {L}) bf16 bias is {size / 2**30:.1f} GiB, over the {BIAS_LIMIT >> 30} GiB limit"

    def thunk():
        allowed = mask_of(kwargs).to_dense(L, L, device=device)[0, 0]              # (L, L) bool
        bias = torch.zeros(heads, L, L, dtype=DTYPE, device=device)               # (H' , L, L)
        if name == "alibi":
            pos = torch.arange(L, device=device)
            slopes = qkv.positional.alibi_slopes(H).to(device)
            bias += (slopes.view(-1, 1, 1) * (pos[None, :] - pos[:, None])).to(DTYPE)
        bias.masked_fill_(~allowed, float("-inf"))
        return _sdpa_call(backend, ctx, bias=bias[None])
    return [("dense bias", thunk)]


def _sdpa_contenders(spec: dict, kwargs: dict, device) -> dict:
    names = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION"}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as exc:
        return {c: f"torch.nn.attention.sdpa_kernel unavailable: {_short(exc)}" for c in names}
    out = {}
    for contender, attr in names.items():
        backend = getattr(SDPBackend, attr, None)
        if backend is None:
            out[contender] = f"SDPBackend.{attr} is not in torch {torch.__version__}"
        elif spec["mask"] in ("dense", "causal"):
            out[contender] = [(f"sdpa_kernel({attr})", lambda b=backend: _sdpa_call(
                b, sdpa_kernel, is_causal=spec["mask"] == "causal"))]
        elif contender == "sdpa_efficient":
            out[contender] = _dense_bias(spec, kwargs, device, backend, sdpa_kernel)
        else:
            out[contender] = "takes no mask but causal"
    return out


def _flex_contender(spec: dict, kwargs: dict, device):
    """Flex's tries: the qkv mask's `to_flex`, then `create_block_mask` of the written-out mask_mod."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        return f"FlexAttention unavailable in torch {torch.__version__}: {_short(exc)}"
    L, H = spec["L"], spec["H"]
    mask = mask_of(kwargs)
    mask_mod, score_mod = flex_mods(spec["mask"], L, H, device=device)

    def compiled(block_mask):
        torch._dynamo.reset()                     # each case compiles afresh, as a new program would
        fn = torch.compile(flex_attention, dynamic=False)
        return lambda q, k, v: fn(q, k, v, score_mod=score_mod, block_mask=block_mask)
    if mask is None:
        return [("no block mask", lambda: compiled(None))]
    return [("to_flex", lambda: compiled(mask.to_flex(None, None, L, L, device=device))),
            ("create_block_mask", lambda: compiled(create_block_mask(mask_mod, None, None, L, L, device=device)))]


def _flash_attn_contender(spec: dict, device):
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except Exception as exc:  # noqa: BLE001 - ImportError, or a build that does not match this torch
        return f"flash-attn does not import: {_short(exc, 160)}"
    name, H = spec["mask"], spec["H"]
    if name == "prefix_lm":
        return "flash-attn has no prefix-LM mask"
    if name == "document":
        return [("flash_attn_varlen_func", lambda: _varlen(spec, device, flash_attn_varlen_func))]
    extra = {"dense": {}, "causal": {"causal": True}, "alibi": {"causal": True},
             "sliding_window": {"causal": True, "window_size": (WINDOW - 1, 0)},     # keys q - 1023 .. q
             "softcap": {"causal": True, "softcap": SOFTCAP}}[name]

    def thunk():
        kw = dict(extra)
        if name == "alibi":
            kw["alibi_slopes"] = qkv.positional.alibi_slopes(H).to(device=device, dtype=torch.float32)
        return lambda q, k, v: _first(flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), **kw)).transpose(1, 2)
    return [("flash_attn_func", thunk)]


def _varlen(spec: dict, device, fn):
    """flash-attn's packed documents: the B x L tokens as one varlen batch, the documents its sequences."""
    L, B = spec["L"], spec["B"]
    lengths = torch.bincount(document_ids(L, N_DOCS, 0)).repeat(B)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)]).to(device=device, dtype=torch.int32)
    longest = int(lengths.max())

    def attn(q, k, v):
        b, h, n, d = q.shape
        flat = [t.transpose(1, 2).reshape(b * n, h, d) for t in (q, k, v)]          # (B L, H, D) each
        out = _first(fn(*flat, cu, cu, longest, longest, causal=True))
        return out.reshape(b, n, h, d).transpose(1, 2)
    return attn


def _contenders(spec: dict, kwargs: dict, device) -> dict:
    """contender -> [(via, thunk building attn(q, k, v) -> out)], or a string saying why it does not apply."""
    out = {"qkv": [("backend='triton'", lambda: lambda q, k, v: qkv.attention(q, k, v, backend="triton", **kwargs))]}
    out.update(_sdpa_contenders(spec, kwargs, device))
    out["flex"] = (_flex_contender(spec, kwargs, device) if spec["flex"]
                   else "not run for this case (Flex compiles per case: the goal cases only)")
    out["flash_attn"] = _flash_attn_contender(spec, device)
    return out


# ----------------------------------------------------------------------------
# Prefill: one case
# ----------------------------------------------------------------------------

def _pass_fn(attn, tensors, pass_: str):
    q, k, v, dout = tensors
    if pass_ == "fwd":
        def fn():
            with torch.no_grad():
                return _first(attn(q, k, v))
        return fn
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]

    def fn():
        return torch.autograd.grad(_first(attn(*leaves)), leaves, dout)
    return fn


def _measure(value, tensors, device, deadline: float, *, need_s: float = 0.0) -> tuple[dict, object]:
    """One contender's cell ({"via", "fwd": timing, "fwd+bwd": timing}, or {"na"|"error"|"skipped": why})
    and its forward output."""
    if isinstance(value, str):
        return {"na": value}, None
    if time.time() + need_s > deadline:
        return {"skipped": "budget spent"}, None
    with _alarm(deadline + GRACE_S / 2 - time.time()):
        fwd, attn, out = _first_working(value, lambda a: _pass_fn(a, tensors, "fwd"), device)
        if attn is None:
            return fwd, None
        cell = {"via": fwd.pop("via"), "fwd": fwd}
        if "fallback_from" in fwd:
            cell["fallback_from"] = fwd.pop("fallback_from")
        if time.time() > deadline:
            cell["fwd+bwd"] = {"skipped": "budget spent"}
            return cell, out
        try:
            _, ms, runs, first_ms = time_call(_pass_fn(attn, tensors, "fwd+bwd"), device)
            cell["fwd+bwd"] = _timing(ms, runs, first_ms)
        except ContextLost:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded in the table
            cell["fwd+bwd"] = {"error": _recover(device, exc)}
    return cell, out


def _max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def _attn_case(spec: dict, device, deadline: float, log) -> dict:
    row = attn_row(spec)
    L, B, H, D = spec["L"], spec["B"], spec["H"], spec["D"]
    kwargs = qkv_kwargs(spec["mask"], L, H, device=device)
    contenders = _contenders(spec, kwargs, device)
    g = torch.Generator(device=device).manual_seed(L + D)
    tensors = [torch.randn(B, H, L, D, generator=g, device=device, dtype=DTYPE) for _ in range(4)]  # q, k, v, dout
    outs = {}
    for name in CONTENDERS:
        try:
            cell, out = _measure(contenders[name], tensors, device, deadline,
                                 need_s=FLEX_NEED_S if name == "flex" else 0.0)
        except ContextLost as exc:
            row["cells"][name] = {"error": f"the CUDA context was lost: {exc}"}
            row["context_lost"] = True
            return row
        row["cells"][name] = cell
        if out is not None:
            outs[name] = out
        log(f"  {row['key']:<28} {name:<15} {_progress(cell)}")
    ref = next((n for n in REFERENCES if n in outs), None)
    if "qkv" in outs and ref is not None:
        row["check"] = {"reference": ref, "max_diff": _max_diff(outs["qkv"], outs[ref])}
    return row


def _progress(cell: dict) -> str:
    if "fwd" not in cell:
        return next(f"{k}: {v}"[:120] for k, v in cell.items())
    f, fb = cell["fwd"], cell.get("fwd+bwd", {})
    show = lambda c: f"{c['ms']:.3f} ms" if "ms" in c else next(iter(c.values()))[:80]  # noqa: E731
    return f"fwd {show(f)}, fwd+bwd {show(fb) if fb else '-'} ({cell['via']})"


# ----------------------------------------------------------------------------
# Decode, the HBM copy, the first call
# ----------------------------------------------------------------------------

def _decode_inputs(spec: dict, device) -> dict:
    """q (B, Hq, 1, D); the contiguous cache k, v (B, Hkv, L, D); the same keys and values in a paged
    pool (Hkv, B * L, D) of PAGE-slot blocks, each sequence's blocks scattered in random order."""
    B, L, Hq, Hkv, D, page = (spec[k] for k in ("B", "L", "Hq", "Hkv", "D", "page"))
    g = torch.Generator(device=device).manual_seed(L)
    q = torch.randn(B, Hq, 1, D, generator=g, device=device, dtype=DTYPE)
    k, v = (torch.randn(B, Hkv, L, D, generator=g, device=device, dtype=DTYPE) for _ in range(2))
    nb = -(-L // page)
    tables = torch.randperm(B * nb, generator=torch.Generator().manual_seed(L)).view(B, nb).to(device)  # (B, nb)
    pools = []
    for t in (k, v):
        padded = F.pad(t, (0, 0, 0, nb * page - L))                                   # (B, Hkv, nb * page, D)
        blocks = padded.view(B, Hkv, nb, page, D).permute(1, 0, 2, 3, 4).reshape(Hkv, B * nb, page, D)
        pool = torch.empty_like(blocks)
        pool[:, tables.reshape(-1)] = blocks
        pools.append(pool.view(Hkv, B * nb * page, D))
    lengths = torch.full((B,), L, dtype=torch.long, device=device)
    return {"q": q, "k": k, "v": v, "kpool": pools[0], "vpool": pools[1], "tables": tables,
            "contig_tables": torch.zeros(B, 1, dtype=torch.long, device=device), "lengths": lengths}


def _decoders(spec: dict, x: dict) -> dict:
    """decoder -> [(via, thunk building a no-argument call)], or why it does not apply."""
    out = {}
    try:
        from qkv.kernels.gpu.decode import paged_decode
    except Exception as exc:  # noqa: BLE001 - not written yet, or Triton missing
        why = f"qkv.kernels.gpu.decode.paged_decode does not import: {_short(exc, 200)}"
        out["paged"] = out["contiguous"] = why
    else:
        out["paged"] = [("paged_decode", lambda: lambda: paged_decode(
            x["q"], x["kpool"], x["vpool"], x["tables"], x["lengths"], block_size=spec["page"]))]
        out["contiguous"] = [("paged_decode", lambda: lambda: paged_decode(
            x["q"], x["k"], x["v"], x["contig_tables"], x["lengths"], block_size=spec["L"]))]
    g = spec["Hq"] // spec["Hkv"]
    out["sdpa"] = [("enable_gqa", lambda: lambda: F.scaled_dot_product_attention(x["q"], x["k"], x["v"],
                                                                                enable_gqa=True)),
                   ("K/V repeated to Hq heads", lambda: (lambda kr, vr: lambda: F.scaled_dot_product_attention(
                       x["q"], kr, vr))(x["k"].repeat_interleave(g, 1), x["v"].repeat_interleave(g, 1)))]
    return out


def _decode_case(spec: dict, device, deadline: float, flush, log) -> dict:
    row = decode_row(spec)
    x = _decode_inputs(spec, device)
    outs = {}
    for name, value in _decoders(spec, x).items():
        if isinstance(value, str):
            row["cells"][name] = {"na": value}
            continue
        if time.time() > deadline:
            row["cells"][name] = {"skipped": "budget spent"}
            continue
        try:
            with _alarm(deadline + GRACE_S / 2 - time.time()):
                cell, _, out = _first_working(value, lambda call: call, device, flush=flush)
        except ContextLost as exc:
            row["cells"][name] = {"error": f"the CUDA context was lost: {exc}"}
            row["context_lost"] = True
            return row
        row["cells"][name] = cell
        if out is not None:
            outs[name] = _first(out)
        log(f"  {row['key']:<28} {name:<15} " + (f"{cell['ms'] * 1e3:.1f} us" if "ms" in cell else cell["error"][:120]))
    if "sdpa" in outs:
        row["check"] = {n: _max_diff(outs[n].reshape(outs["sdpa"].shape), outs["sdpa"]) for n in outs if n != "sdpa"}
    return row


def _hbm_case(spec: dict, device) -> dict:
    n = spec["bytes"] // 2
    src = torch.ones(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    _, ms, runs, _ = time_call(lambda: dst.copy_(src), device, max_runs=20)
    moved = 2 * spec["bytes"]
    return {**spec, "bytes_moved": moved, "ms": round(ms, 4), "runs": runs, "gbps": round(moved / ms / 1e6, 1)}


def _first_child(arg: str) -> None:
    """In the fresh process: the first causal forward+backward with qkv (triton) or compiled Flex, timed."""
    cfg = json.loads(arg)
    B, H, L, D, impl = cfg["B"], cfg["H"], cfg["L"], cfg["D"], cfg["impl"]
    dev = torch.device(cfg.get("device", "cuda"))                 # "cpu": the tests, under TRITON_INTERPRET=1
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.zeros(1, device=dev)
    sync()                                                     # the CUDA context is up before the clock starts
    q, k, v, dout = (torch.randn(B, H, L, D, device=dev, dtype=DTYPE) for _ in range(4))
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    if impl == "qkv":
        def call():
            return torch.autograd.grad(qkv.attention(*leaves, causal=True, backend="triton"), leaves, dout)
    else:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def call():
            bm = create_block_mask(lambda b, h, qi, kv: qi >= kv, None, None, L, L, device=dev)
            fn = torch.compile(flex_attention, dynamic=False)
            return torch.autograd.grad(fn(*leaves, block_mask=bm), leaves, dout)
    t0 = time.perf_counter()
    call()
    sync()
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    call()
    sync()
    print(json.dumps({"first_s": round(first_s, 3), "second_ms": round((time.perf_counter() - t0) * 1e3, 2)}))


def _first_case(spec: dict, deadline: float, log) -> dict:
    """Each contender's first call in a fresh process: cold caches, then warm (the same cache dirs)."""
    runs = []
    impls = ("qkv", "flex") if spec["flex"] else ("qkv",)
    with tempfile.TemporaryDirectory(prefix="qkv-bench-gpu-first-") as d:
        for impl in impls:
            env = _child_env(TRITON_CACHE_DIR=os.path.join(d, impl, "triton"),
                             TORCHINDUCTOR_CACHE_DIR=os.path.join(d, impl, "inductor"))
            for cache in ("cold", "warm"):
                run_ = {"impl": impl, "cache": cache}
                left = deadline - time.time()
                if left < 20:
                    runs.append({**run_, "skipped": "budget spent"})
                    continue
                cfg = json.dumps({k: spec[k] for k in ("B", "H", "L", "D")} | {"impl": impl,
                                                                                "device": spec.get("device", "cuda")})
                cmd = [sys.executable, "-m", "qkv.tools.bench.gpu", "--first-child", cfg]
                run_.update(_child(cmd, env, min(FIRST_TIMEOUT_S, left + GRACE_S / 2)))
                runs.append(run_)
                log(f"  first call {impl} ({cache} cache): " + (f"{run_['first_s']:.2f} s" if "first_s" in run_
                                                               else run_.get("error", "?")[:160]))
    return {**spec, "runs": runs}


def _child_env(**extra: str) -> dict:
    """The environment of a measuring subprocess: this one's, with the qkv being run first on PYTHONPATH."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(qkv.__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


def _child(cmd: list[str], env: dict, timeout: float) -> dict:
    """Run a measuring subprocess: its last stdout line as JSON, plus the process's wall time; or the error."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = round(time.perf_counter() - t0, 2)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return {"error": f"exit status {proc.returncode}: {tail[:300]}", "process_s": wall}
    try:
        return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_s": wall}
    except (IndexError, json.JSONDecodeError):
        return {"error": f"unreadable output: {proc.stdout[-200:]!r}", "process_s": wall}


# ----------------------------------------------------------------------------
# The worker process
# ----------------------------------------------------------------------------

def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def device_info(device) -> dict:
    """The accelerator the numbers came from (and the libraries that drive it)."""
    device = torch.device(device)
    info = {"device": str(device), "triton": _version("triton"), "flash_attn": _version("flash-attn")}
    if device.type != "cuda":
        return info
    p = torch.cuda.get_device_properties(device)
    info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version())
    with contextlib.suppress(Exception):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        info["nvidia_smi"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
    return info


def _run_spec(spec: dict, device, deadline: float, flush, log) -> dict:
    """One case's row; whatever goes wrong is recorded in it (a lost CUDA context too)."""
    log(f"{spec['key']} ...")
    try:
        if spec["kind"] == "attn":
            return _attn_case(spec, device, deadline, log)
        if spec["kind"] == "decode":
            return _decode_case(spec, device, deadline, flush, log)
        if spec["kind"] == "hbm":
            return _hbm_case(spec, device)
        if spec["kind"] == "first":
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
            return _first_case(spec, deadline, log)
        return {**spec, "error": f"unknown kind {spec['kind']!r}"}
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory building the inputs
        try:
            return {**spec, "error": _recover(device, exc)}
        except ContextLost as lost:
            return {**spec, "error": f"the CUDA context was lost: {lost}", "context_lost": True}
    finally:
        gc.collect()
        if torch.device(device).type == "cuda":
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()


def _worker(path: str) -> None:
    """The worker process: run the cases of the job file `path`, appending each row to its rows file as
    one JSON line; exit status 3 after a lost CUDA context (the parent starts a new worker)."""
    with open(path, encoding="utf-8") as f:
        job = json.load(f)
    device, deadline = torch.device(job["device"]), job["deadline"]
    log = lambda s: print(s, flush=True)  # noqa: E731
    with open(job["rows"], "a", encoding="utf-8") as out:
        def put(row):
            out.write(json.dumps(row) + "\n")
            out.flush()
        put({"key": "machine", "kind": "machine", **device_info(device)})
        flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device) if device.type == "cuda" else None
        for spec in job["specs"]:
            if time.time() >= deadline:
                put({**spec, "skipped": "budget spent"})
                continue
            row = _run_spec(spec, device, deadline, flush, log)
            put(row)
            if row.get("context_lost"):
                sys.stdout.flush()
                os._exit(3)                                    # no teardown: the context is gone


def _read_rows(path: str) -> list[dict]:
    rows = []
    with contextlib.suppress(FileNotFoundError):
        with open(path, encoding="utf-8") as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):   # a line cut short by a crash
                    rows.append(json.loads(line))
    return rows


def drive(specs: Sequence[dict], *, deadline: float, device: str = "cuda", log=print,
          command: Sequence[str] | None = None, max_restarts: int = 6) -> tuple[list[dict], dict]:
    """Run `specs` in worker processes (`command` + [job file]; default this module's --worker) until done
    or out of budget. A worker that dies is restarted after the case it died in, that case recorded as
    an error. Returns (one row per spec, in order; the first worker's device facts)."""
    command = list(command or [sys.executable, "-m", "qkv.tools.bench.gpu", "--worker"])
    done: dict[str, dict] = {}
    machine: dict = {}
    remaining, restarts = list(specs), 0
    with tempfile.TemporaryDirectory(prefix="qkv-bench-gpu-") as d:
        rows_path, job_path, err_path = (os.path.join(d, n) for n in ("rows.jsonl", "job.json", "stderr.txt"))
        while remaining and time.time() < deadline and restarts <= max_restarts:
            with open(job_path, "w", encoding="utf-8") as f:
                json.dump({"device": device, "deadline": deadline, "rows": rows_path, "specs": remaining}, f)
            with open(err_path, "w", encoding="utf-8") as err:
                try:
                    rc = subprocess.run(command + [job_path], stderr=err, env=_child_env(),
                                        timeout=max(1.0, deadline - time.time()) + GRACE_S).returncode
                except subprocess.TimeoutExpired:
                    rc = None
            for row in _read_rows(rows_path):
                if row.get("kind") == "machine":
                    machine = machine or row
                else:
                    done.setdefault(row["key"], row)
            remaining = [s for s in remaining if s["key"] not in done]
            if rc in (0, None) or not remaining:
                if rc is None and remaining:
                    log(f"the worker outlasted the budget by {GRACE_S:.0f} s and was stopped")
                break
            restarts += 1
            if rc != 3:                                  # it died inside a case without writing its row
                tail = _tail(err_path)
                bad = remaining.pop(0)
                done[bad["key"]] = {**bad, "error": f"the worker process died (exit status {rc}): {tail}"}
            log(f"worker exited with status {rc}; starting a new one for the {len(remaining)} cases left")
    rows = [done.get(s["key"], {**s, "skipped": "budget spent" if time.time() >= deadline else "worker stopped"})
            for s in specs]
    return rows, {k: v for k, v in machine.items() if k not in ("key", "kind")}


def _tail(path: str, lines: int = 1) -> str:
    """The last `lines` non-blank lines of a worker's stderr (its error, usually)."""
    with contextlib.suppress(OSError), open(path, encoding="utf-8", errors="replace") as f:
        return " | ".join([ln for ln in f.read().splitlines() if ln.strip()][-lines:])[-400:] or "(no error output)"
    return "(no error output)"


# ----------------------------------------------------------------------------
# The result: derived numbers and goals
# ----------------------------------------------------------------------------

def _finish_attn(row: dict) -> None:
    """Each contender's bwd (fwd+bwd ms - fwd ms), TFLOP/s of every pass, and qkv's speed against Flex."""
    for cell in row.get("cells", {}).values():
        f, fb = cell.get("fwd"), cell.get("fwd+bwd")
        if f is None:
            continue
        if fb is not None and "ms" in f and "ms" in fb:
            cell["bwd"] = {"ms": round(fb["ms"] - f["ms"], 4), "derived": "fwd+bwd ms - fwd ms"}
        for p in PASSES:
            if p in cell and "ms" in cell[p]:
                cell[p]["tflops"] = rounded(tflops(row["flops"][p], cell[p]["ms"]), 2)
    row["vs_flex"] = {p: rounded(ratio(_ms(row, "flex", p), _ms(row, "qkv", p)), 3) for p in PASSES}


def _ms(row: dict, contender: str, pass_: str | None = None) -> float | None:
    cell = row.get("cells", {}).get(contender) or {}
    got = cell.get(pass_) if pass_ is not None else cell
    return (got or {}).get("ms")


def _finish_decode(row: dict, hbm_gbps: float | None) -> None:
    for cell in row.get("cells", {}).values():
        if "ms" in cell:
            cell["gbps"] = round(row["kv_bytes"] / cell["ms"] / 1e6, 1)
            cell["hbm_frac"] = rounded(ratio(cell["gbps"], hbm_gbps), 4)
    row["paged_vs_contiguous"] = rounded(ratio(_ms(row, "contiguous"), _ms(row, "paged")), 3)
    row["paged_vs_sdpa"] = rounded(ratio(_ms(row, "sdpa"), _ms(row, "paged")), 3)


def assemble(rows: Sequence[dict], gpu: dict, info: dict, *, quick: bool, budget_s: float, seconds: float) -> dict:
    """The result written to gpu.json, from the workers' rows: derived numbers, goals."""
    hbm = [r for r in rows if r.get("kind") == "hbm"]
    rates = [r["gbps"] for r in hbm if "gbps" in r]
    hbm_gbps = round(sum(rates) / len(rates), 1) if rates else None
    attn = [r for r in rows if r.get("kind") == "attn"]
    decode = [r for r in rows if r.get("kind") == "decode"]
    for r in attn:
        if "flops" in r:
            _finish_attn(r)
    for r in decode:
        if "kv_bytes" in r:
            _finish_decode(r, hbm_gbps)
    first = next((r for r in rows if r.get("kind") == "first"), None)
    result = {
        "benchmark": "gpu", "quick": bool(quick), "machine": {**info, "gpu": gpu},
        "config": {"dtype": "bfloat16", "tokens": TOKENS, "d_model": D_MODEL, "window": WINDOW, "n_docs": N_DOCS,
                   "prefix": "L // 4", "softcap": SOFTCAP, "decode_heads": [HQ, HKV], "page": PAGE,
                   "budget_s": budget_s, "goal_shape": {"L": GOAL_L, "D": GOAL_D, "B": TOKENS // GOAL_L},
                   "flops": "4 B H Lq Lk_live D forward; x 2.5 backward; x 3.5 forward+backward",
                   "timing": "CUDA events around each call after a first call and 2 warm-ups; median of 3-20 "
                             "calls within ~0.5 s; decode with a cold L2 (256 MiB written before each call)"},
        "hbm": {"gbps": hbm_gbps, "rule": "mean of start and end; 2 GiB bf16 copy_, bytes read + written / time",
                "runs": hbm},
        "attention": attn, "decode": decode, "first_call": first,
        "skipped": [r["key"] for r in rows if "skipped" in r],
        "seconds": round(seconds, 1),
    }
    result["goals"] = evaluate_goals(result)
    return result


def _goal(goal: str, case: str, pass_: str, measured, target, unit: str, direction: str = ">=") -> dict:
    met = None if measured is None else (measured >= target if direction == ">=" else measured < target)
    return {"goal": goal, "case": case, "pass": pass_, "measured": measured, "target": target, "unit": unit,
            "direction": direction, "met": met}


def _first_s(first: dict | None, impl: str) -> float | None:
    runs = (first or {}).get("runs", [])
    return next((r.get("first_s") for r in runs if r["impl"] == impl and r["cache"] == "cold"), None)


def evaluate_goals(result: dict) -> list[dict]:
    """The goals (H100, bf16, B x L = 16k tokens, D 128), judged on the goal rows (--quick: its own)."""
    at = {r["mask"]: r for r in result["attention"] if r.get("goal")}
    tf = lambda m, p: ((at.get(m, {}).get("cells", {}).get("qkv") or {}).get(p) or {}).get("tflops")  # noqa: E731
    goals = [_goal("forward >= 400 TFLOP/s, non-causal", "dense", "fwd", tf("dense", "fwd"), 400, "TFLOP/s"),
             _goal("forward >= 350 TFLOP/s, causal", "causal", "fwd", tf("causal", "fwd"), 350, "TFLOP/s")]
    goals += [_goal("backward >= 250 TFLOP/s", m, "bwd", tf(m, "bwd"), 250, "TFLOP/s") for m in ("dense", "causal")]
    for p in ("fwd", "fwd+bwd"):
        speed = ratio(_ms(at.get("causal", {}), "qkv", p), _ms(at.get("sliding_window", {}), "qkv", p))
        goals.append(_goal(f"sliding_window({WINDOW}) >= 5x faster than causal", "sliding_window", p,
                           rounded(speed, 3), 5.0, "x"))
    for m, r in at.items():
        for p in ("fwd", "bwd"):
            goals.append(_goal("qkv >= 0.9x compiled FlexAttention's speed", m, p, r.get("vs_flex", {}).get(p),
                               0.9, "x"))
    first = result.get("first_call")
    qkv_s, flex_s = _first_s(first, "qkv"), _first_s(first, "flex")
    goals.append(_goal("first call (JIT included) < 10 s", "causal 4k", "fwd+bwd", qkv_s, 10.0, "s", "<"))
    goals.append(_goal("first call >= 5x faster than Flex's first call", "causal 4k", "fwd+bwd",
                       rounded(ratio(flex_s, qkv_s), 3), 5.0, "x"))
    for r in result["decode"]:
        if r["L"] >= 4096:
            frac = ((r.get("cells", {}).get("paged")) or {}).get("hbm_frac")
            goals.append(_goal("paged decode >= 70% of HBM bandwidth", f"decode L={r['L']}", "decode", frac,
                               0.7, "%"))
            goals.append(_goal("paged / contiguous >= 0.95x", f"decode L={r['L']}", "decode",
                               r.get("paged_vs_contiguous"), 0.95, "x"))
    return goals


# ----------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------

class _Notes:
    """Numbered notes for the cells that cannot hold their text (errors, reasons for n/a)."""

    def __init__(self):
        self.texts: dict[str, int] = {}

    def ref(self, text: str) -> str:
        return f"[{self.texts.setdefault(text, len(self.texts) + 1)}]"

    def lines(self) -> list[str]:
        return [f"[{i}] {t}" for t, i in self.texts.items()]


def _fmt_rate(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.2g}"


def _fmt_ms(ms: float | None) -> str:
    return "n/a" if ms is None else f"{ms:.0f}" if ms >= 100 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def _fmt_x(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _status(cell: dict | None, notes: _Notes, pass_: str | None = None) -> str | None:
    """The cell's text when it has no number: 'n/a[k]', 'err[k]', 'skip', 'lost'; None when it has one."""
    if cell is None:
        return "lost"
    for key, word in (("na", "n/a"), ("error", "err"), ("skipped", "skip")):
        if key in cell:
            return "skip" if key == "skipped" else word + notes.ref(cell[key])
    if pass_ is not None:
        sub = cell.get(pass_)
        if sub is None:
            return "n/a"
        return _status(sub, notes) if "ms" not in sub else None
    return None


_ATTN_HEADER = ("case", "L", "B", "H", "D", "pass", "Lk_live", "qkv ms", "qkv", "sdpa flash", "sdpa cudnn",
                "sdpa eff", "flex", "flash-attn", "vs flex", "max diff")


def _attn_cells(rows: Sequence[dict], notes: _Notes) -> list[list[str]]:
    body = []
    for r in rows:
        head = [r.get("label", r["mask"]), str(r["L"]), str(r["B"]), str(r["H"]), str(r["D"])]
        if "flops" not in r or not r.get("cells"):
            why = r.get("error") or r.get("skipped") or "no result"
            body.append(head + ["-", "-", "-", ("skip" if "skipped" in r else "err" + notes.ref(why))] +
                        ["-"] * (len(_ATTN_HEADER) - 9))
            continue
        for p in PASSES:
            cells = []
            for name in CONTENDERS:
                c = r["cells"].get(name)
                cells.append(_status(c, notes, p) or _fmt_rate(c[p].get("tflops")))
            qkv_ms = _ms(r, "qkv", p)
            check = r.get("check") if p == "fwd" else None
            body.append(head + [p, f"{r['lk_live']:.0f}", _fmt_ms(qkv_ms), *cells, _fmt_x(r["vs_flex"].get(p)),
                                f"{check['max_diff']:.1e} ({check['reference']})" if check else "-"])
    return body


_DECODE_HEADER = ("L", "B", "KV MiB", "paged us", "paged GB/s", "paged/HBM", "contig us", "contig GB/s",
                  "contig/HBM", "paged/contig", "sdpa us", "sdpa GB/s", "paged vs sdpa", "max diff")


def _decode_cells(rows: Sequence[dict], notes: _Notes) -> list[list[str]]:
    body = []
    for r in rows:
        head = [str(r["L"]), str(r["B"])]
        if "kv_bytes" not in r or not r.get("cells"):
            why = r.get("error") or r.get("skipped") or "no result"
            body.append(head + [("skip" if "skipped" in r else "err" + notes.ref(why))] + ["-"] * 11)
            continue
        cells = [f"{r['kv_bytes'] / 2**20:.0f}"]
        for name in DECODERS:
            c = r["cells"].get(name)
            s = _status(c, notes)
            if s is not None:
                cells += [s, "-"] + (["-"] if name != "sdpa" else [])
            else:
                cells += [f"{c['ms'] * 1e3:.1f}", f"{c['gbps']:.0f}"]
                cells += [] if name == "sdpa" else ["n/a" if c.get("hbm_frac") is None else f"{c['hbm_frac']:.0%}"]
            if name == "contiguous":
                cells.append(_fmt_x(r.get("paged_vs_contiguous")))
        check = r.get("check") or {}
        cells += [_fmt_x(r.get("paged_vs_sdpa")), "/".join(f"{check[n]:.1e}" for n in check) or "-"]
        body.append(head + cells)
    return body


_FIRST_HEADER = ("impl", "cache", "first call s", "2nd call ms", "process s", "note")


def _first_cells(first: dict | None, notes: _Notes) -> list[list[str]]:
    if not first or "runs" not in first:
        why = (first or {}).get("error") or (first or {}).get("skipped") or "not run"
        return [["-", "-", "-", "-", "-", why[:100]]]
    body = []
    for r in first["runs"]:
        note = "skip" if "skipped" in r else ("err" + notes.ref(r["error"])) if "error" in r else ""
        body.append([r["impl"], r["cache"], "n/a" if "first_s" not in r else f"{r['first_s']:.2f}",
                     _fmt_ms(r.get("second_ms")), "n/a" if "process_s" not in r else f"{r['process_s']:.1f}", note])
    return body


_GOAL_HEADER = ("goal", "case", "pass", "measured", "target", "verdict")


def _goal_cells(goals: Sequence[dict]) -> list[list[str]]:
    def show(x, unit):
        if x is None:
            return "n/a"
        return {"TFLOP/s": f"{x:.0f} TFLOP/s", "x": f"{x:.2f}x", "s": f"{x:.2f} s", "%": f"{x:.0%}"}[unit]
    return [[g["goal"], g["case"], g["pass"], show(g["measured"], g["unit"]),
             f"{g['direction']} {show(g['target'], g['unit'])}",
             "n/a" if g["met"] is None else "met" if g["met"] else "NOT met"] for g in goals]


def _gpu_line(gpu: dict) -> str:
    if "gpu" not in gpu:
        return f"device: {gpu.get('device', 'unknown')}; triton {gpu.get('triton')}, flash-attn {gpu.get('flash_attn')}"
    return (f"gpu: {gpu['gpu']} (sm {gpu['capability']}, {gpu['sms']} SMs, {gpu['memory_gib']} GiB); CUDA "
            f"{gpu['cuda']}, cuDNN {gpu['cudnn']}, triton {gpu['triton']}, flash-attn {gpu['flash_attn']}; "
            f"nvidia-smi (driver, max SM clock, power limit): {gpu.get('nvidia_smi')}")


_LEGEND = ("TFLOP/s per contender = 4 B H Lq Lk_live D (x 2.5 bwd, x 3.5 fwd+bwd) / median time; Lk_live: the "
           "average allowed keys per query row, counted from the mask; bwd = fwd+bwd ms - fwd ms; 'vs flex' = "
           "flex ms / qkv ms (> 1: qkv faster); max diff: max |qkv - reference| of the forward output; n/a[k], "
           "err[k]: see note k; skip: the budget was spent")
_DECODE_LEGEND = ("one query per sequence, Hq 32 / Hkv 8, D 128, bf16; GB/s = bytes of K and V read / median "
                  "time (cold L2); X/HBM: that over the HBM copy rate; paged/contig = contig time / paged time; "
                  "paged vs sdpa = sdpa time / paged time; max diff: paged/contiguous vs sdpa")


def render(result: dict, *, markdown: bool = False) -> str:
    """The result as text (or Markdown): prefill, decode, first call, goals, notes."""
    notes = _Notes()
    t = lambda h, b, left: format_table(h, b, left=left, markdown=markdown)  # noqa: E731
    attn = t(_ATTN_HEADER, _attn_cells(result["attention"], notes), (0, 5))
    dec = t(_DECODE_HEADER, _decode_cells(result["decode"], notes), ())
    first = t(_FIRST_HEADER, _first_cells(result["first_call"], notes), (0, 1, 5))
    goals = t(_GOAL_HEADER, _goal_cells(result["goals"]), (0, 1, 2, 5))
    hbm = result["hbm"]
    extra = [f"HBM bandwidth: {hbm['gbps']} GB/s ({hbm['rule']}; " +
             ", ".join(f"{r['key']}: {r.get('gbps', r.get('error') or r.get('skipped'))}" for r in hbm["runs"]) + ")"
             if hbm["gbps"] is not None else "HBM bandwidth: not measured"]
    if result["skipped"]:
        extra.append(f"skipped for the budget ({result['config']['budget_s']:g} s): {', '.join(result['skipped'])}")
    extra += notes.lines()
    goal_shape = "L = 2048, D 128 (quick; the goals are set at L = 16384)" if result["quick"] else "L = 16384, D 128"
    machine = format_machine(result["machine"]) + "\n" + _gpu_line(result["machine"].get("gpu", {}))
    if markdown:
        return "\n".join([f"# qkv GPU benchmark{' (quick)' if result['quick'] else ''}", "", machine.replace(
            "\n", ".\n\n") + ".", "", "## Prefill (TFLOP/s)", "", _LEGEND + ".", "", attn, "", "## Decode", "",
            _DECODE_LEGEND + ".", "", dec, "", "## First call (fresh process)", "", first, "",
            f"## Goals (judged at {goal_shape})", "", goals, "", *[f"- {n}" for n in extra], ""])
    return "\n".join([machine, "", "prefill (TFLOP/s):", attn, "", _LEGEND, "", "decode:", dec, "", _DECODE_LEGEND,
                      "", "first call (fresh process):", first, "", f"goals (judged at {goal_shape}):", goals, "",
                      *extra])


# ----------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------

def run(out_dir="runs/bench", quick: bool = False, *, budget_s: float | None = None, flex: bool = True,
        first_call: bool = True, device: str = "cuda", specs: Sequence[dict] | None = None,
        verbose: bool = True) -> dict:
    """Run the GPU benchmark; print the tables; write gpu.json and gpu.md. GPUUnavailable without CUDA.

    `specs` (default `plan(quick, ...)`) and `device` are for tests (a CPU run of the machinery)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise GPUUnavailable(NO_GPU)
    budget_s = float(budget_s if budget_s is not None else (QUICK_BUDGET_S if quick else BUDGET_S))
    if not budget_s > 0:
        raise ValueError(f"--budget must be > 0 seconds, got {budget_s:g}")
    log = (lambda s: print(s, flush=True)) if verbose else (lambda s: None)
    started = time.time()
    specs = list(specs) if specs is not None else plan(quick, flex=flex, first_call=first_call)
    info = machine_info()
    log(format_machine(info))
    log(f"GPU benchmark: {len(specs)} cases, budget {budget_s:g} s{' (quick)' if quick else ''}")
    rows, gpu = drive(specs, deadline=started + budget_s, device=device, log=log)
    result = assemble(rows, gpu, info, quick=quick, budget_s=budget_s, seconds=time.time() - started)
    write_results(result, out_dir, "gpu", render, log)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a few small cases, about a minute")
    parser.add_argument("--out", default=os.path.join("runs", "bench"), help="where gpu.json/.md go")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help=f"total time; the cases it leaves out are listed (default {BUDGET_S:g}, "
                             f"quick {QUICK_BUDGET_S:g})")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (no compilation)")
    parser.add_argument("--no-first-call", action="store_true", help="skip the fresh-process first-call case")


def _run_from(args) -> None:
    run(args.out, quick=args.quick, budget_s=args.budget, flex=not args.no_flex, first_call=not args.no_first_call)


def main(argv: list[str] | None = None) -> int:
    """`python -m qkv.tools.bench.gpu` / benchmarks/bench_gpu.py (and its worker and first-call processes)."""
    return bench_main(argv, prog="bench_gpu", description=__doc__.splitlines()[0], add_arguments=add_arguments,
                      run=_run_from, children={"--worker": _worker, "--first-child": _first_child},
                      errors=(ValueError, GPUUnavailable))


if __name__ == "__main__":
    sys.exit(main())
