"""The registry and the one dispatcher: which backend serves a call.

`register` adds a backend (with `auto_rank`, to auto's preference order); `select` returns the
named backend, or auto's first fit, and when none can serve the call says why and names one
that can; `use_backend(...)` sets auto's choice for a block. `list()` is the capability table.

A backend registered with `hidden=True` is an internal route of the dispatcher, not a choice for
users: `list()`, `names()`, `get()` and the suggestions in refusals never show it, and
`use_backend(...)` skips it because it is never named. `segments` (packed documents as a padded
batch) is one, at auto's rank 0; `careful` (the non-finite repair of `qkv.attention`) another,
reached through `internal(name)`. Nothing here reads environment variables.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch

from qkv.backends.base import Backend, BackendError, Call

__all__ = ["register", "get", "internal", "names", "list", "CapabilityTable", "select", "use_backend", "preferred"]


_REGISTRY: dict[str, Backend] = {}     # what users can name
_HIDDEN: dict[str, Backend] = {}       # the dispatcher's own routes (see the module docstring)
_AUTO_ORDER: tuple[str, ...] = ("sdpa", "tiled", "math")
_PREFERRED: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar("qkv_backend", default=None)


def register(backend: Backend, *, auto_rank: int | None = None, hidden: bool = False) -> Backend:
    """Add a backend to the registry (and, with `auto_rank`, to auto's preference order).

    hidden: an internal route that users never see or name (see the module docstring)."""
    global _AUTO_ORDER
    if not backend.name:
        raise ValueError("a backend needs a name")
    (_HIDDEN if hidden else _REGISTRY)[backend.name] = backend
    if auto_rank is not None and backend.name not in _AUTO_ORDER:
        order = [n for n in _AUTO_ORDER]
        order.insert(auto_rank, backend.name)
        _AUTO_ORDER = tuple(order)
    return backend


def get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(['auto', *_REGISTRY])}")
    return _REGISTRY[name]


def internal(name: str) -> Backend:
    """A hidden backend by name (the dispatcher's own routes, e.g. "careful")."""
    return _HIDDEN[name]


def preferred() -> tuple[str, ...] | None:
    """The backends `use_backend(...)` set for this context, or None outside such a block."""
    return _PREFERRED.get()


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


class CapabilityTable(tuple):
    """A tuple of (name, Capabilities) rows that prints as a table."""

    _COLUMNS = ("devices", "dtypes", "masks", "score_mod", "dropout", "gqa", "backward",
                "return_lse", "return_weights", "exact", "auto", "sinks")

    def rows(self) -> list[list[str]]:
        out = []
        for name, caps in self:
            row = [name]
            for col in self._COLUMNS:
                val = getattr(caps, col)
                if col == "devices":
                    val = ",".join(val)
                elif col == "dtypes":
                    val = ",".join(_DTYPE_SHORT[d] for d in val)
                else:
                    val = "yes" if val else "-"
                row.append(val)
            out.append(row)
        return out

    def markdown(self) -> str:
        header = ["backend", *self._COLUMNS]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows()]
        return "\n".join(lines)

    def __str__(self) -> str:
        header = ["backend", *self._COLUMNS]
        rows = [header, *self.rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        notes = [f"{name}: {caps.notes}" for name, caps in self if caps.notes]
        return "\n".join(lines + ([""] + notes if notes else []))

    __repr__ = __str__


_DTYPE_SHORT = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def list() -> CapabilityTable:  # noqa: A001 - the public name is qkv.backends.list()
    """The registered backends and their capabilities (prints as a table)."""
    return CapabilityTable((name, be.capabilities) for name, be in _REGISTRY.items())


def select(call: Call, backend: str = "auto") -> Backend:
    """The backend that will run `call`: the named one, or auto's first fit."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string name, got {type(backend).__name__}")
    if backend != "auto":
        return _checked(get(backend), call)
    preferred = _PREFERRED.get()
    if preferred is not None:
        reasons = []
        for name in preferred:
            be = get(name)
            why = be.refusal(call)
            if why is None:
                return be
            reasons.append(f"{name}: {why}")
        raise BackendError(f"no backend in use_backend({', '.join(map(repr, preferred))}) can serve this call "
                           f"({'; '.join(reasons)}); {_who_can(call)}")
    for name in _AUTO_ORDER:
        be = _REGISTRY.get(name) or _HIDDEN.get(name)
        if be is not None and be.capabilities.auto and be.refusal(call) is None and be.auto_refusal(call) is None:
            return be
    for name in _AUTO_ORDER:  # every backend had a preference against it: take the first that can
        be = _REGISTRY.get(name) or _HIDDEN.get(name)
        if be is not None and be.capabilities.auto and be.refusal(call) is None:
            return be
    reasons = [f"{name}: {_REGISTRY[name].refusal(call)}" for name in _AUTO_ORDER
               if name in _REGISTRY and _REGISTRY[name].capabilities.auto]
    raise BackendError(f"no backend can serve this call ({'; '.join(reasons)}); {_who_can(call)}")


def _checked(be: Backend, call: Call) -> Backend:
    why = be.refusal(call)
    if why is not None:
        raise BackendError(f"backend {be.name!r} cannot serve this call: {why}; {_who_can(call)}")
    return be


def _who_can(call: Call) -> str:
    # suggest auto's backends first (in its order), then the rest (e.g. the oracle)
    order = [n for n in _AUTO_ORDER if n in _REGISTRY] + [n for n in _REGISTRY if n not in _AUTO_ORDER]
    # approximate backends compute something else: never suggested in place of an exact one
    able = [name for name in order if _REGISTRY[name].capabilities.exact and _REGISTRY[name].refusal(call) is None]
    # only backends whose table lists the call's device (triton serves the CPU only to its tests, in Triton's interpreter)
    able = [name for name in able if {"any", call.device.type} & set(_REGISTRY[name].capabilities.devices)]
    if able:
        return f"use backend={able[0]!r}" + (f" (or {', '.join(map(repr, able[1:]))})" if able[1:] else "")
    return "no registered backend supports this combination"


@contextlib.contextmanager
def use_backend(*names: str) -> Iterator[None]:
    """Within the block, `backend="auto"` calls use these backends (first that fits).

    `use_backend("math")` forces one; `use_backend("sdpa", "math")` gives an order.
    Restores the previous choice on exit, even on error.
    """
    if len(names) == 1 and isinstance(names[0], (tuple, type([]))):
        names = tuple(names[0])
    if not names:
        raise ValueError("use_backend needs at least one backend name")
    for n in names:
        if n == "auto":
            raise ValueError("use_backend('auto') is the default; name concrete backends instead")
        get(n)
    token = _PREFERRED.set(tuple(names))
    try:
        yield
    finally:
        _PREFERRED.reset(token)
