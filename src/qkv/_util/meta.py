"""Models built without running their initialisers: on the meta device for their shapes alone
(`meta_model`), or for real with parameters that a checkpoint is about to overwrite
(`uninitialised`).

Initialising a meta tensor does nothing, yet torch routes `normal_` on meta through its Python
reference implementations, whose first call imports torch._dynamo: 1.2 s of a fresh process, in
every `qkv generate` and `qkv.models.hf.load`, for values that do not exist. And drawing random
weights that `load_state_dict` then replaces costs GPT-2 small 0.7 s. `shapes_only()` is a
TorchFunctionMode (thread-local, so other threads are untouched) under which the in-place
initialisers return their target as it is when it is a meta tensor, or (`parameters=True`) an
`nn.Parameter`; buffers and every other tensor are computed as usual.
"""

from __future__ import annotations

import threading

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["shapes_only", "meta_model", "uninitialised", "values_undefined"]

_state = threading.local()


def values_undefined() -> bool:
    """True inside `uninitialised` (this thread): parameters being built hold no values yet, so
    code that moves them (`qkv._util.hugepages.pack_parameters`) need not copy them."""
    return getattr(_state, "depth", 0) > 0

_INITIALISERS = frozenset({"normal_", "uniform_", "fill_", "zero_", "copy_", "kaiming_uniform_", "kaiming_normal_",
                           "xavier_uniform_", "xavier_normal_", "trunc_normal_", "ones_", "zeros_", "constant_"})


class shapes_only(TorchFunctionMode):
    """Within: initialising a meta tensor (tensor methods or `torch.nn.init`) is skipped, and
    with `parameters=True` initialising an `nn.Parameter` too."""

    def __init__(self, parameters: bool = False):
        super().__init__()
        self.parameters = parameters

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        if (isinstance(target, torch.Tensor) and (target.is_meta or self.parameters and isinstance(
                target, torch.nn.Parameter)) and getattr(func, "__name__", "") in _INITIALISERS):
            return target
        return func(*args, **kwargs)


def meta_model(cls, *args, **kwargs):
    """`cls(*args, device="meta", **kwargs)` with its initialisers skipped (see `shapes_only`)."""
    with shapes_only():
        return cls(*args, device="meta", **kwargs)


def uninitialised(cls, *args, **kwargs):
    """`cls(*args, **kwargs)` with its parameters left as allocated (their values undefined): for
    a model whose every parameter `load_state_dict(..., strict=True)` fills next."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        with shapes_only(parameters=True):
            return cls(*args, **kwargs)
    finally:
        _state.depth -= 1
