"""Tiny helpers that let mask and score functions run on torch *or* NumPy arrays.

The float64 oracle (`qkv.reference`) evaluates the very same mask and score
functions as the torch backends, but on NumPy index grids, so that the oracle
never calls a torch kernel. Built-in masks and scores therefore only use
operators and the few functions below, which pick the right library from the
array they are given.
"""

from __future__ import annotations

import numpy as np
import torch


def is_numpy(x) -> bool:
    return isinstance(x, np.ndarray) or isinstance(x, np.generic)


def xp(x):
    """The array namespace of `x`: `numpy` for NumPy arrays, else `torch`."""
    return np if is_numpy(x) else torch


def like(data, ref):
    """`data` (a tensor or array the mask/score holds) as the same kind of array as `ref`.

    NumPy `ref` -> a NumPy array (detached); torch `ref` -> a tensor on `ref`'s device.
    """
    if is_numpy(ref):
        if isinstance(data, torch.Tensor):
            return data.detach().cpu().numpy()
        return np.asarray(data)
    if isinstance(data, torch.Tensor):
        return data if data.device == ref.device else data.to(ref.device)
    return torch.as_tensor(np.asarray(data), device=ref.device)


def to_float(x, ref_float=None):
    """Cast an integer index array to floating point (float64 for NumPy, else `ref_float`'s dtype)."""
    if is_numpy(x):
        return np.asarray(x, dtype=np.float64)
    return x.to(ref_float.dtype if ref_float is not None else torch.float32)


def to_long(x):
    if is_numpy(x):
        return np.asarray(x).astype(np.int64)
    return x.long()
