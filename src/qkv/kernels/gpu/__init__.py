"""GPU attention kernels in Triton: the `triton` backend's forward and backward, and cached decoding.

Legend: B batch, Hq query heads, Hkv key/value heads, G = Hq // Hkv, Lq/Lk lengths, D head dim.

Two modules, imported only when a kernel first runs (so `import qkv` never imports Triton):

- `attention`: the exact forward (online softmax over the live key tiles a tile plan lists for
  each query tile, FULL tiles with no mask arithmetic, PARTIAL ones with the mask applied in the
  kernel) and its backward (dk/dv per key tile over the query tiles that see it, dq per query
  tile; no atomics, so the gradients are the same bits on every run).
- `decode`: one or a few new query rows per sequence against a contiguous or paged KV cache,
  read through the block tables, the keys split into chunks merged by log-sum-exp.

Triton compiles each kernel variant once and keeps it in its own disk cache (~/.triton/cache, or
TRITON_CACHE_DIR), so a later process loads it. Where no GPU is present, Triton's interpreter
(TRITON_INTERPRET=1, read by Triton when the kernels are defined) runs the same kernels on CPU
tensors with NumPy: that is how the test suite checks them on a machine without a GPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["installed", "interpreting", "applies", "why_not"]


def installed() -> bool:
    """Whether Triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (TRITON_INTERPRET=1): on CPU tensors, for tests."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def applies(device) -> bool:
    """Whether the kernels can run on tensors on `device`: CUDA with Triton installed, or the CPU
    under Triton's interpreter."""
    return why_not(device) is None


def why_not(device) -> str | None:
    """Why the kernels cannot run on `device` (None when they can)."""
    device = torch.device(device)
    if not installed():
        return "Triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    return (f"its kernels run on CUDA devices (on the CPU only under Triton's interpreter, "
            f"TRITON_INTERPRET=1), not {device.type}")
