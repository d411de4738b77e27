"""CPU kernels for token-by-token decoding, compiled by numba on first use.

This package is in two files. This one is the public surface: whether a kernel applies
(`applies`, `paged_decode_applies`, `available`), the wrappers that take torch tensors
(`linear`, `paged_decode`, `blocks_step`), `launch` (one launch at a time, numba's thread
count following torch's) and `compiled` (a kernel's numba function itself). It imports
neither numba nor numpy: `qkv.kernels.cpu`, which holds all the numba code, is imported on
the first call that needs it, so `import qkv` never imports numba.

The first two are memory-bound streams that torch's CPU kernels read at a fraction of
the memory bandwidth, because those are tuned for large problems:

- `linear`: y (M, N) = x (M, K) @ W (N, K)^T for M <= 16 rows (batch x one
  token). torch's BLAS packs W for a GEMM, which costs more than the product
  when M is 1 to 8. This kernel reads W once, from where `nn.Linear` keeps it,
  four rows at a time a quarter of W apart (r, r + N/4, r + N/2, r + 3N/4), so
  each core's share is four long runs of consecutive rows, which the hardware
  prefetcher streams; blocks of four adjacent rows break W into 3 KiB pieces
  it never gets ahead of. Measured on GPT-2-small's matrices (an Intel Xeon, 2
  cores, weights on huge pages): one row of x 22.5 against 26.6 ms per step's
  worth of W for one row at a time (22.0 GB/s, the speed of `x.sum()` over
  1 GiB), eight rows 30.5 against 38.3 ms for four adjacent rows. Each block
  of four W rows meets four rows of x at a time (16 accumulators), then two,
  then one.
- `paged_decode`: one new query per sequence against that sequence's own
  blocks of a paged KV cache, through its block table: no gather, no work on
  other sequences' slots. All of a row's scores are kept (4 bytes a key), so
  softmax takes one max and one exponential per key; keys and values are read
  as four interleaved quarters of the row (0.91x the time of one run per row
  at batch 8, 544 keys, GPT-2-small's heads, measured), four keys per pass
  sharing each load of q (0.85x the time of one key per pass at batch 1, 0.9x
  at batch 8, an AMD EPYC), each loaded once for the G query heads of a GQA group.

- `blocks_step`: the pre-norm decoder blocks of one new token per sequence in
  one launch (norm, joint q/k/v, RoPE, cache write, `paged_decode`'s attention,
  output projection, norm, FFN, residuals; products through `linear`'s kernel),
  for `qkv.fused` (`qkv.layers.Block`, `qkv.models.Decoder`), whose callers check
  that it applies and fall back to their module path where it does not.

No process waits for a compiler. Compiling the decode kernels takes ~20 s on 2 cores; a process
that finds them in numba's disk cache loads them in ~0.7 s (importing numba is most of it). So:

- `ready()` is what callers ask: True once the kernels are loaded in this process. Where they
  are not, it loads them when the disk cache holds them (a stamp file written after a complete
  build says so, checked without importing numba), and otherwise starts `qkv.kernels.build` in
  a detached background process at low priority (one per machine at a time, a lock file) and
  answers False, so the caller runs torch's path; a later call finds the build done and
  switches. QKV_NUMBA=wait restores compile-on-first-use in the calling process (the test
  suite uses it, for the same path in every run); QKV_NUMBA=0 turns the kernels off.
- `held()`: a block in which `ready()` is False without loading or building anything.
  `qkv.generate` holds the kernels while the decode left is too short for them to pay for
  their load (`pays`), e.g. 32 tokens of a 64-wide model (~25 ms of decode on torch's path).
- The cache sits where numba puts it: next to `cpu.py` where that directory is writable, else
  numba's user-wide cache (or NUMBA_CACHE_DIR); the stamp next to it, or in
  ~/.cache/qkv (QKV_KERNEL_CACHE to choose). `make install` builds ahead.

Only reassociation and contraction are allowed to the compiler (no fast-math NaN/inf
assumptions). When numba is not installed, or QKV_NUMBA=0 (read at import), `linear` is
`F.linear` and `applies` and `paged_decode_applies` are False, so callers take their torch path.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_ROWS = 16                       # above this torch's GEMM is the faster path
MODE = os.environ.get("QKV_NUMBA", "1")
ENABLED = MODE != "0"
WAIT = MODE == "wait"               # compile on first use, in the calling process
#: seconds a process pays to start using cached kernels (import numba, load three kernels):
#: 0.7-0.8 s measured on a 2-core AMD EPYC, rounded up
LOAD_S = 1.0
#: the share of a torch-path decode step the kernels save, at least: measured 2.3x-5.5x faster
#: (batch 1 and 8, 64- to 768-wide decoders, 2-core AMD EPYC), so 0.5 is a floor
SAVING = 0.5
BUILD_POLL_S = 0.5                  # how often a process not yet using the kernels looks for a finished build
#: seconds a build takes (19-20 s measured, 2 cores). A build beside a decode on torch's path
#: slows it (on 2 cores torch's threads then share one): a process starts it at once only when
#: it has more than twice that left to run on torch's path, else when it exits
BUILD_S = 20.0
#: a process asking for the kernels (`ready()`) for this long without knowing how long it has
#: left starts the build at once instead of at exit
ASKING_S = 10.0

_cpu = None                         # qkv.kernels.cpu once imported, or False when numba is unavailable
_active = False                     # the decode kernels are loaded in this process
_lock = threading.Lock()            # one launch at a time: numba's thread pools refuse nested launches
_threads = 0                        # numba's thread count as last set
_hold = 0                           # > 0 inside `held()`
_build: subprocess.Popen | None = None     # the background build this process started
_next_look = 0.0                    # time.monotonic() before which ready() does not look at the disk again
_first_ask: float | None = None     # when ready() first found the kernels neither loaded nor built
_at_exit = False                    # a build is to start when this process exits
_horizon: float | None = None       # see horizon()
_key: str | None = None


def _load():
    """Import `qkv.kernels.cpu` (and so numba) once; False when numba or numpy cannot be imported."""
    global _cpu
    if _cpu is not None:
        return _cpu
    try:
        from qkv.kernels import cpu
    except ImportError as error:
        if (error.name or "").startswith("qkv"):
            raise
        cpu = False
    _cpu = cpu
    return _cpu


def available() -> bool:
    """True when the kernels can run here: numba installed and not disabled by QKV_NUMBA=0
    (looked up without importing numba; nothing is compiled or loaded)."""
    if not ENABLED or _cpu is False:
        return False
    return _cpu is not None or (importlib.util.find_spec("numba") is not None
                                and importlib.util.find_spec("numpy") is not None)


def loaded() -> bool:
    """Whether the decode kernels are loaded in this process (using them costs nothing more)."""
    return _active


def status() -> str:
    """"loaded", "cached" (on disk, not loaded here), "building" (a build this process started
    runs), "at exit" (a build starts when this process exits), "held" (inside `held()`), "cold"
    (not built) or "off"."""
    if _active:
        return "loaded"
    if not available():
        return "off"
    if _stamp() is not None:
        return "cached"
    if _build is not None and _build.poll() is None:
        return "building"
    if _at_exit:
        return "at exit"
    return "held" if _hold else "cold"


def pays(steps_left: int, step_s: float) -> bool:
    """Whether loading the kernels pays for `steps_left` decode steps that take `step_s` seconds
    each on torch's path: they save at least SAVING of each step, and cost LOAD_S once (nothing
    when already loaded)."""
    return _active or steps_left * step_s * SAVING > LOAD_S


def torch_step_s(weight_bytes: int, batch: int = 1) -> float:
    """A rough time for one decode step on torch's path, before any step has run: ~0.8 ms of
    Python per step plus the weights read at ~11 GB/s (a 64-wide 2-layer decoder 0.83 ms, GPT-2
    small's 0.5 GB 45 ms, measured on a 2-core AMD EPYC). For `pays` before a model is loaded."""
    return 0.0008 * max(1, batch) ** 0.5 + weight_bytes / 11e9


def prefetch() -> bool:
    """Load the kernels from the disk cache in a background thread (while the caller loads a
    model, say), when they are built and not loaded; True when that started or they are loaded.
    Nothing is built here; a later `ready()` waits for the thread (a lock) instead of loading twice."""
    if _active:
        return True
    if not ENABLED or WAIT or _hold or not available() or _stamp() is None:
        return False
    threading.Thread(target=_activate, name="qkv-kernels-load", daemon=True).start()
    return True


@contextlib.contextmanager
def held(hold: bool = True):
    """Inside: `ready()` is False (so every caller takes torch's path) and nothing is loaded or
    built, when `hold`; a no-op otherwise. For code that knows the kernels would not pay."""
    global _hold
    if not hold:
        yield
        return
    _hold += 1
    try:
        yield
    finally:
        _hold -= 1


@contextlib.contextmanager
def horizon(seconds_left: float | None):
    """Inside: `ready()` calls that do not say how long they have left take `seconds_left`
    (the time the caller expects to run on torch's path; None: unknown)."""
    global _horizon
    before, _horizon = _horizon, seconds_left
    try:
        yield
    finally:
        _horizon = before


def ready(seconds_left: float | None = None) -> bool:
    """Whether the decode kernels can be launched now; loads them from numba's disk cache when
    it holds them, and never compiles in this process unless QKV_NUMBA=wait. Where they are not
    built it answers False and has them built in the background: at once when the caller has
    more than 2 x BUILD_S `seconds_left` to run on torch's path (or has been asking for ASKING_S
    without saying), else when this process exits (see the module docstring)."""
    global _next_look, _first_ask
    if not ENABLED or _cpu is False or _hold:
        return False
    if _active:
        return True
    if WAIT:
        return _activate()
    now = time.monotonic()
    if now < _next_look:
        return False
    _next_look = now + BUILD_POLL_S
    if not available():
        return False
    if _stamp() is not None:
        return _activate()
    if _first_ask is None:
        _first_ask = now
    if seconds_left is None:
        seconds_left = _horizon
    if seconds_left is not None and seconds_left > 2 * BUILD_S or (
            seconds_left is None and now - _first_ask > ASKING_S):
        _start_build()
    else:
        _build_at_exit()
    return False


def _build_at_exit() -> None:
    global _at_exit
    if not _at_exit and _build is None:
        _at_exit = True
        atexit.register(lambda: _build is None and _stamp() is None and _start_build())


def _activate() -> bool:
    """Load the decode kernels in this process (from the disk cache, or compiling them)."""
    global _active
    with _lock:
        if _active:
            return True
        cpu = _load()
        if cpu is False:
            return False
        compiled = cpu.load()
        if compiled or _stamp() is None:
            write_stamp()                  # they are in numba's cache now: later processes load them
        _active = True
    return True


# -- the disk cache's stamp ----------------------------------------------------------------------


def cache_key() -> str:
    """What numba's cached kernels depend on, hashed: cpu.py's size and time (numba's own source
    stamp), numba's and Python's versions, the CPU (numba compiles for the host's features), and
    the NUMBA_ settings that change code or cache place."""
    global _key
    if _key is None:
        from importlib import metadata

        src = os.stat(os.path.join(os.path.dirname(__file__), "cpu.py"))
        try:
            version = metadata.version("numba")
        except metadata.PackageNotFoundError:
            version = "?"
        cpuinfo = ""
        try:
            with open("/proc/cpuinfo") as f:
                lines = [line for line in f.read(65536).splitlines() if line.startswith(("model name", "flags"))]
            cpuinfo = "\n".join(sorted(set(lines)))
        except OSError:
            import platform
            cpuinfo = platform.processor() + platform.machine()
        parts = [src.st_size, src.st_mtime_ns, version, sys.version, cpuinfo,
                 sorted((k, v) for k, v in os.environ.items() if k.startswith("NUMBA_"))]
        _key = hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()
    return _key


def stamp_path() -> str:
    """Where the stamp for `cache_key()` lives: QKV_KERNEL_CACHE, else this package's
    __pycache__ where it is writable, else ~/.cache/qkv (XDG_CACHE_HOME)."""
    folder = os.environ.get("QKV_KERNEL_CACHE")
    if not folder:
        folder = os.path.join(os.path.dirname(__file__), "__pycache__")
        try:
            os.makedirs(folder, exist_ok=True)
            writable = os.access(folder, os.W_OK)
        except OSError:
            writable = False
        if not writable:
            base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
            folder = os.path.join(base, "qkv")
    return os.path.join(folder, f"kernels-{cache_key()[:16]}.json")


def _stamp() -> dict | None:
    """The stamp of a complete build for this machine and source, when every index file it
    lists is still in numba's cache; None otherwise."""
    try:
        with open(stamp_path()) as f:
            stamp = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict) or stamp.get("key") != cache_key():
        return None
    index = stamp.get("index") or []
    if not index or not all(os.path.exists(os.path.join(stamp.get("cache_path", ""), name)) for name in index):
        return None
    return stamp


def write_stamp(**extra) -> str:
    """Record that the decode kernels are in numba's disk cache (after `cpu.load()`); atomic."""
    cpu = _load()
    cache_path, index = cpu.cache_index()
    path = stamp_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"            # a reader sees the old stamp or the new one, never half
    try:
        with open(tmp, "w") as f:
            json.dump({"key": cache_key(), "cache_path": cache_path, "index": index, **extra}, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _start_build() -> None:
    """Start `python -m qkv.kernels.build` in the background, once per process (it exits at
    once where another process's build holds the lock; this one then waits for its stamp)."""
    global _build
    if _build is not None:
        _build.poll()                      # reaps it when done; its stamp (or its log) tells the rest
        return
    log_path = stamp_path()[:-len(".json")] + ".log"
    try:
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        log = open(log_path, "ab")
    except OSError:
        log = subprocess.DEVNULL
    env = dict(os.environ, QKV_NUMBA="wait")
    try:
        _build = subprocess.Popen([sys.executable, "-m", "qkv.kernels.build"], stdin=subprocess.DEVNULL,
                                  stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                  close_fds=True)
    except OSError:                        # cannot start a process here: compile on first use
        globals()["WAIT"] = True
    finally:
        if log is not subprocess.DEVNULL:
            log.close()


def _require():
    if not available() or _load() is False:
        raise RuntimeError("qkv's CPU decode kernels need numba (pip install numba) and QKV_NUMBA unset or 1")
    return _cpu


def compiled(name: str):
    """The numba function behind launch name `name` ("skinny", "paged", "block", or "activate",
    the FFN activation of `blocks_step` on its own: activate(f, g, kind, gated, t, bits, e) on numpy
    arrays), compiled on its first call. Calling it directly skips `launch`'s lock and thread
    setting. RuntimeError where the kernels are unavailable (`available()` is False)."""
    return _require().KERNELS[name]


def launch(name: str, *args) -> None:
    """Run kernel `name` (a key of `qkv.kernels.cpu.KERNELS`) on args, one launch at a time, with
    numba's thread count following `torch.get_num_threads()`. The wrappers below launch through
    this function only (looked up at call time, so a test can wrap it to see the launches)."""
    global _threads
    cpu = _require()
    with _lock:
        threads = torch.get_num_threads()
        if threads != _threads:                    # follow torch.set_num_threads
            cpu.set_threads(threads)
            _threads = threads
        cpu.KERNELS[name](*args)
        if torch.get_num_threads() != threads:
            # numba starting its OpenMP pool (first launch) resets the count of the OpenMP
            # runtime torch also reads: give torch its own setting back
            torch.set_num_threads(threads)


def applies(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    """Whether `linear(x, weight, bias)` takes the kernel path: fp32 CPU tensors, a
    contiguous (N, K) weight, at most MAX_ROWS rows of x, autograd not recording, and the
    kernels `ready()` (checked last: only a call that could use them loads or builds them)."""
    if not ENABLED or _cpu is False:
        return False
    if x.dtype is not torch.float32 or weight.dtype is not torch.float32 or not x.is_cpu or not weight.is_cpu:
        return False
    if weight.dim() != 2 or x.dim() == 0 or not weight.is_contiguous():
        return False
    N, K = weight.shape
    if x.shape[-1] != K or K == 0 or N == 0 or not 0 < x.numel() // K <= MAX_ROWS:
        return False
    if bias is not None and (bias.dtype is not torch.float32 or not bias.is_cpu or bias.shape != (N,)
                             or not bias.is_contiguous()):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    return ready()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, checked: bool = False) -> Tensor:
    """`F.linear(x, weight, bias)`, through the skinny kernel when it applies (`checked=True`: the
    caller has just seen `applies` hold)."""
    if not checked and not applies(x, weight, bias):
        return F.linear(x, weight, bias)
    N, K = weight.shape
    x2 = x.reshape(-1, K)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], N, dtype=torch.float32)
    b = 0 if bias is None else bias.data_ptr()
    # the kernel reads x, weight and bias by address while they are alive here
    launch("skinny", x2.data_ptr(), weight.data_ptr(), b, bias is not None, out.data_ptr(), x2.shape[0], K, N)
    return out.view(*x.shape[:-1], N)


def paged_decode_applies(q: Tensor, kpool: Tensor) -> bool:
    """Whether `paged_decode` can serve these tensors: fp32 CPU, no autograd, the kernels `ready()`;
    or CUDA tensors (fp16/bf16/fp32, one dtype, head dim 16..256, no autograd) where the Triton
    kernels run (`qkv.kernels.gpu.applies`)."""
    if q.device.type == "cuda" or kpool.device.type == "cuda":
        from qkv.kernels import gpu

        return (q.device == kpool.device and q.dtype == kpool.dtype
                and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and 16 <= q.shape[-1] <= 256
                and not (torch.is_grad_enabled() and (q.requires_grad or kpool.requires_grad))
                and gpu.applies(q.device))
    if not ENABLED or _cpu is False:
        return False
    if q.device.type != "cpu" or kpool.device.type != "cpu" or q.dtype != torch.float32 \
            or kpool.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or kpool.requires_grad):
        return False
    return ready()


def paged_decode(q: Tensor, kpool: Tensor, vpool: Tensor, tables: Tensor, lengths: Tensor, *, block_size: int,
                 window: int | None = None, scale: float | None = None) -> Tensor:
    """One query per sequence against its own cache blocks.

    q (B, Hq, 1, D). kpool, vpool: (Hkv, slots, D), one pool shared by the
    batch, slot = block * block_size + offset; or (B, Hkv, slots, D), one
    buffer per sequence (a contiguous cache: one block of max_len slots).
    tables (B, max_blocks) int64: each sequence's blocks in position order.
    lengths (B,): tokens per sequence, the query's own included (it sits at
    position lengths[b] - 1). With `window` the query sees the last `window`
    positions only. Returns (B, Hq, 1, D).

    CUDA tensors go to the Triton kernel (`qkv.kernels.gpu.decode.paged_decode`, which also takes
    n > 1 new rows, split-KV and the LSE).
    """
    if q.device.type == "cuda":
        from qkv.kernels.gpu import decode as gpu_decode

        return gpu_decode.paged_decode(q, kpool, vpool, tables, lengths, block_size=block_size, window=window,
                                       scale=scale)
    if kpool.dim() == 3:
        kpool, vpool = kpool[None], vpool[None]
    B, Hq, n, D = q.shape
    Hkv = kpool.shape[1]
    if n != 1 or Hq % Hkv or kpool.shape != vpool.shape or kpool.shape[3] != D or kpool.shape[0] not in (1, B):
        raise ValueError(f"paged_decode takes q (B, Hq, 1, D) with Hq a multiple of the pool's Hkv={Hkv} "
                         f"and head dim {kpool.shape[3]}; got q {tuple(q.shape)}, pool {tuple(kpool.shape)}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qg = q.detach().reshape(B, Hkv, Hq // Hkv, D).contiguous()               # (B, Hkv, G, D)
    out = torch.empty_like(qg)
    launch("paged", qg.numpy(), kpool.detach().contiguous().numpy(), vpool.detach().contiguous().numpy(),
            tables.to(torch.int64).contiguous().numpy(), lengths.to(torch.int64).contiguous().numpy(),
            0 if window is None else int(window), int(block_size), float(scale), out.numpy())
    return out.view(B, Hq, 1, D)


def blocks_step(x: Tensor, layers: list[dict]) -> Tensor:
    """Pre-norm Transformer blocks, one after another, for one new token per sequence, in one launch.

    x (B, 1, d) -> (B, 1, d) (a new tensor). Each entry of `layers` describes one block,
    in order: `static`, the addresses of its parameters, `dims`, its sizes and kinds,
    `floats`, (eps1, eps2, scale), as `qkv.fused.plan` lays them out (checked there:
    alive, fp32, contiguous, q/k/v and gate/up back to back); cos, sin (B, rd) for RoPE at
    each sequence's new position, or None; `window` (None: no window); and where its cache
    is (the layer cache's `claim_decode_slot()`): kpool, vpool (1 or B, Hkv, S, D) fp32, the new
    key/value of sequence b go to slot slots[b] (B,) int64 of its pool; attention reads
    tables (B, W) int64 blocks of block_size slots up to lengths[b] tokens. With
    `advance`, lengths holds the counts before this token and is advanced by one in place
    (a contiguous cache: slots is lengths, one block of S slots per sequence).
    """
    import numpy as np

    B, _, d = x.shape
    out = x.detach().reshape(B, d).clone()
    scratch = torch.empty(B * max(2 * d + L["dims"][0] + 2 * L["dims"][1] * L["dims"][3] + L["dims"][5]
                                  + L["dims"][4] for L in layers), dtype=torch.float32)
    p, n, fl = [], [], []
    for L in layers:
        dims, cos, sin, kpool = L["dims"], L["cos"], L["sin"], L["kpool"]
        rd = cos.shape[-1] if cos is not None else 0
        p.append([out.data_ptr(), *L["static"][:12], cos.data_ptr() if rd else 0, sin.data_ptr() if rd else 0,
                  kpool.data_ptr(), L["vpool"].data_ptr(), L["lengths"].data_ptr(), scratch.data_ptr(),
                  L["slots"].data_ptr(), L["tables"].data_ptr()])
        n.append([B, d, dims[0], dims[1], dims[2], dims[3], kpool.shape[2], dims[4], dims[5], rd, *dims[6:11],
                  0 if L["window"] is None else int(L["window"]), kpool.shape[0], L["tables"].shape[1],
                  L["block_size"], int(L["advance"])])
        fl.append(L["floats"])
    # the kernel reads and writes these tensors by address while they are alive here
    launch("block", np.array(p, dtype=np.int64), np.array(n, dtype=np.int64), np.array(fl, dtype=np.float64))
    return out.view(B, 1, d)
