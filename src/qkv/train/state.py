"""Optimizer and RNG state to and from checkpoint tensors and JSON (`train_lm`'s resume).

An AdamW state becomes tensors "opt.<param index>.<name>" plus the JSON param groups; the
RNGs become the tensor "rng.torch" plus JSON for Python's and NumPy's global generators.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import Tensor


def _optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], list[dict]]:
    sd = opt.state_dict()
    tensors = {f"opt.{i}.{k}": (v if isinstance(v, Tensor) else torch.tensor(v))
               for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, sd["param_groups"]


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], groups: list[dict]) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in groups]
    opt.load_state_dict({"state": state, "param_groups": groups})


def _rng_state() -> tuple[dict[str, Tensor], dict]:
    v, keys, pos, has_gauss, gauss = np.random.get_state()
    py = random.getstate()
    return ({"rng.torch": torch.get_rng_state()},
            {"python": [py[0], list(py[1]), py[2]], "numpy": [v, keys.tolist(), pos, has_gauss, gauss]})


def _set_rng_state(tensors: dict[str, Tensor], state: dict) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    v, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((v, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
