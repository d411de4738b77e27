"""Models built on the meta device for their shapes alone, without running their initialisers.

Initialising a meta tensor does nothing, yet torch routes `normal_` on meta through its Python
reference implementations, whose first call imports torch._dynamo: 1.2 s of a fresh process, in
every `qkv generate` and `qkv.models.hf.load`, for values that do not exist. `shapes_only()` is a
TorchFunctionMode (thread-local, so other threads are untouched) under which the in-place
initialisers return meta tensors as they are; on any other device they run as usual.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["shapes_only", "meta_model"]

_INITIALISERS = frozenset({"normal_", "uniform_", "fill_", "zero_", "copy_", "kaiming_uniform_", "kaiming_normal_",
                           "xavier_uniform_", "xavier_normal_", "trunc_normal_", "ones_", "zeros_", "constant_"})


class shapes_only(TorchFunctionMode):
    """Within: initialising a meta tensor (tensor methods or `torch.nn.init`) is skipped."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        if isinstance(target, torch.Tensor) and target.is_meta and getattr(func, "__name__", "") in _INITIALISERS:
            return target
        return func(*args, **kwargs)


def meta_model(cls, *args, **kwargs):
    """`cls(*args, device="meta", **kwargs)` with its initialisers skipped (see `shapes_only`)."""
    with shapes_only():
        return cls(*args, device="meta", **kwargs)
