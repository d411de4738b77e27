"""Where large CPU tensors live: transparent huge pages and one arena per model.

A decode step streams every weight and the whole KV cache from memory once.
Read through 4 KiB pages, a stream of hundreds of MiB misses the TLB every
4 KiB; on 2 MiB pages it does not. Linux backs a region with huge pages when
it is advised so (`madvise(MADV_HUGEPAGE)`) before its pages are first
touched, unless the system has them switched off
(/sys/kernel/mm/transparent_hugepage/enabled = never). numpy advises its own
large arrays; torch does not, so the kernels of `qkv.kernels` read a torch
weight more slowly than the same bytes held by numpy (GPT-2-small's tied
LM head, 154 MB, one row of x: 16.4 against 19.6 GB/s, measured).

- `empty(shape, dtype)`: `torch.empty`, with the 2 MiB-aligned interior of a
  CPU buffer advised before anything is written to it (no extra bytes are
  allocated: a buffer smaller than ~4 MiB has no such interior).
- `pack_parameters(module)`: moves a module's floating-point CPU parameters
  into one such buffer per dtype, matrices first in their registration order,
  then the vectors. Values, `Parameter` objects and autograd are unchanged;
  only the storage moves. Matrices registered one after another (a layer's
  q/k/v projections, a gated FFN's gate/up) then lie back to back, and
  `joined` can read them as one matrix.
- `joined(a, b, ...)`: one (sum of rows, ...) view over tensors that lie back
  to back in one storage, else None.

Elsewhere (another OS, no libc, a GPU tensor) advice is skipped and
everything works as plain torch tensors.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch
from torch import Tensor, nn

from qkv._util.meta import values_undefined

__all__ = ["empty", "zeros", "pack_parameters", "joined"]

HUGE = 2 << 20                      # bytes in a transparent huge page (x86-64 and arm64 with 4 KiB pages)
_MADV_HUGEPAGE = 14
_madvise = None                     # libc's madvise, False where there is none


def _libc_madvise():
    global _madvise
    if _madvise is None:
        _madvise = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                fn = libc.madvise
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                fn.restype = ctypes.c_int
                _madvise = fn
            except (OSError, AttributeError):
                pass
    return _madvise


def advise_huge(t: Tensor) -> bool:
    """Advise huge pages for the 2 MiB-aligned interior of a CPU tensor's bytes.

    Only pages not yet touched take effect at once (advise a fresh buffer before
    writing to it). Returns whether any range was advised; never raises."""
    if t.device.type != "cpu" or t.numel() == 0:
        return False
    madvise = _libc_madvise()
    if not madvise:
        return False
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    lo = -(-start // HUGE) * HUGE
    hi = end // HUGE * HUGE
    if hi <= lo:
        return False
    return madvise(lo, hi - lo, _MADV_HUGEPAGE) == 0


def empty(shape, *, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """`torch.empty(shape)` whose pages are advised huge before first use (CPU only)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    advise_huge(t)
    return t


def zeros(shape, *, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """`torch.zeros(shape)` on advised pages (see `empty`)."""
    return empty(shape, dtype=dtype, device=device).zero_()


def pack_parameters(module: nn.Module) -> int:
    """Move `module`'s floating-point CPU parameters into one advised buffer per dtype.

    Order: parameters with two or more dimensions in registration order, then the
    rest, so consecutive matrices are adjacent in memory. Shared parameters (a tied
    embedding) move once. Returns the number of parameters moved."""
    groups: dict[torch.dtype, list[nn.Parameter]] = {}
    seen = set()
    for p in module.parameters():
        if id(p) in seen or p.device.type != "cpu" or not p.is_floating_point():
            continue
        seen.add(id(p))
        groups.setdefault(p.dtype, []).append(p)
    moved = 0
    for dtype, params in groups.items():
        params = [p for p in params if p.dim() >= 2] + [p for p in params if p.dim() < 2]
        arena = empty(sum(p.numel() for p in params), dtype=dtype)
        at = 0
        undefined = values_undefined()          # no values to move (a checkpoint fills them next)
        with torch.no_grad():
            for p in params:
                n = p.numel()
                view = arena[at:at + n].view(p.shape)
                if not undefined:
                    view.copy_(p)
                p.data = view
                at += n
        moved += len(params)
    return moved


def joined(*tensors: Tensor | None, trusted: bool = False) -> Tensor | None:
    """One view (sum of first dims, *rest) over contiguous tensors that follow each other in one
    storage with the same trailing shape, dtype and device; None otherwise (or if any is None).
    `trusted=True` skips the checks (the caller has seen them hold for these very tensors)."""
    if not tensors or any(t is None for t in tensors):
        return None
    first = tensors[0]
    rest = tuple(first.shape[1:])
    if not trusted:
        expected = first.data_ptr()
        storage = first.untyped_storage().data_ptr()
        for t in tensors:
            if (t.dim() != first.dim() or tuple(t.shape[1:]) != rest or t.dtype != first.dtype
                    or t.device != first.device or not t.is_contiguous() or t.data_ptr() != expected
                    or t.untyped_storage().data_ptr() != storage):
                return None
            expected += t.numel() * t.element_size()
    shape = (sum(t.shape[0] for t in tensors), *rest)
    strides, step = [], 1
    for size in reversed(shape):
        strides.insert(0, step)
        step *= size
    return torch.as_strided(first.detach(), shape, strides, first.storage_offset())
