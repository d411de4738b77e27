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

Compilation takes seconds on first use (2 cores: 2.6 s for `linear`'s kernel,
13 s more for `blocks_step`'s), cached on disk where the package directory is
writable, from which a later process loads them (0.5 s and 0.04 s). Only reassociation and contraction are
allowed to the compiler (no fast-math NaN/inf assumptions). When numba is not
installed, or QKV_NUMBA=0 (read at import), `linear` is `F.linear` and
`applies` and `paged_decode_applies` are False, so callers take their torch path.
"""

from __future__ import annotations

import math
import os
import threading

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_ROWS = 16                       # above this torch's GEMM is the faster path
ENABLED = os.environ.get("QKV_NUMBA", "1") != "0"

_cpu = None                         # qkv.kernels.cpu once imported, or False when numba is unavailable
_lock = threading.Lock()            # one launch at a time: numba's thread pools refuse nested launches
_threads = 0                        # numba's thread count as last set


def _load():
    """Import `qkv.kernels.cpu` (and so numba) once; False when numba or numpy cannot be imported."""
    global _cpu
    try:
        from qkv.kernels import cpu
    except ImportError as error:
        if (error.name or "").startswith("qkv"):
            raise
        cpu = False
    _cpu = cpu
    return _cpu


def available() -> bool:
    """True when the kernels can run here (numba importable and not disabled by QKV_NUMBA=0)."""
    if not ENABLED:
        return False
    return (_cpu if _cpu is not None else _load()) is not False


def _require():
    if not available():
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
    contiguous (N, K) weight, at most MAX_ROWS rows of x, autograd not recording."""
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
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad)))


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, checked: bool = False) -> Tensor:
    """`F.linear(x, weight, bias)`, through the skinny kernel when it applies (`checked=True`: the
    caller has just seen `applies` and `available` hold)."""
    if not checked and (not applies(x, weight, bias) or not available()):
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
    """Whether `paged_decode` can serve these tensors (fp32 CPU, no autograd, numba present)."""
    if not ENABLED or _cpu is False:
        return False
    if q.device.type != "cpu" or kpool.device.type != "cpu" or q.dtype != torch.float32 \
            or kpool.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or kpool.requires_grad):
        return False
    return available()


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
    """
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
