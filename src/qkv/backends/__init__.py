"""The backend registry: every way qkv can compute attention, with its capabilities as data.

Legend: B batch, Hq query heads, Hkv key/value heads, G = Hq // Hkv, L length, D head dim.

A backend declares once what it supports (`Capabilities`); the dispatcher
checks a call against that declaration and, when a named backend cannot serve
the call, says why and names one that can. `auto` walks the preference order
and takes the first backend that fits. Nothing here reads environment variables.

    >>> import qkv
    >>> print(qkv.backends.list())          # the capability table
    >>> with qkv.use_backend("math"):       # force a backend in a block
    ...     out = qkv.attention(q, k, v)
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, fields
from typing import Iterator

import torch

__all__ = ["Capabilities", "Call", "Backend", "register", "get", "names", "list", "select",
           "use_backend", "BackendError", "MemoryNeedError"]


class BackendError(ValueError):
    """A backend cannot serve a call (a ValueError, so callers can catch either)."""


class MemoryNeedError(ValueError, MemoryError):
    """Refused before allocating: the result would need more memory than the device has available.

    Both a ValueError (a request qkv refuses) and a MemoryError (what it is about)."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do. Devices and dtypes are sets; the rest are yes/no."""

    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    masks: bool            # arbitrary boolean masks (mask_mod, dense, BlockMask-driven)
    score_mod: bool        # arbitrary score_mod callables
    dropout: bool
    gqa: bool              # Hkv < Hq without repeating K/V
    backward: bool         # autograd through q, k, v (and score_mod tensors)
    return_lse: bool
    return_weights: bool
    exact: bool            # computes softmax attention exactly (up to rounding)
    auto: bool             # eligible for backend="auto"
    notes: str = ""


_FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Call:
    """One validated attention call, as the dispatcher hands it to a backend."""

    q: torch.Tensor            # (B, Hq, Lq, D)
    k: torch.Tensor            # (B, Hkv, Lk, D)
    v: torch.Tensor            # (B, Hkv, Lk, Dv)
    mask: object | None        # qkv.masks.Mask or None (causal=True is already folded in)
    score_mod: object | None
    scale: float
    dropout_p: float
    q_offset: int              # absolute position of query row 0
    return_lse: bool
    return_weights: bool

    @property
    def B(self):
        return self.q.shape[0]

    @property
    def Hq(self):
        return self.q.shape[1]

    @property
    def Hkv(self):
        return self.k.shape[1]

    @property
    def G(self):
        return self.Hq // self.Hkv if self.Hkv else 1  # Hq = Hkv = 0 (no heads) is a valid, empty call

    @property
    def Lq(self):
        return self.q.shape[2]

    @property
    def Lk(self):
        return self.k.shape[2]

    @property
    def D(self):
        return self.q.shape[3]

    @property
    def Dv(self):
        return self.v.shape[3]

    @property
    def device(self):
        return self.q.device

    @property
    def dtype(self):
        return self.q.dtype

    @property
    def stat_dtype(self):
        """Softmax statistics are float32, or float64 for float64 inputs."""
        return torch.float64 if self.q.dtype == torch.float64 else torch.float32

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in (self.q, self.k, self.v))


class Backend:
    """Base class: a name, capabilities, a `forward(call) -> (out, lse, weights)`."""

    name: str = ""
    capabilities: Capabilities

    def refusal(self, call: Call) -> str | None:
        """Why this backend cannot serve `call`, or None if it can."""
        caps = self.capabilities
        if "any" not in caps.devices and call.device.type not in caps.devices:
            return f"it runs on {', '.join(caps.devices)}, not {call.device.type}"
        if call.dtype not in caps.dtypes:
            return f"it does not support dtype {call.dtype}"
        if call.mask is not None and not caps.masks:
            return "it does not support masks"
        if call.score_mod is not None and not caps.score_mod:
            return "it does not support score_mod"
        if call.dropout_p > 0 and not caps.dropout:
            return "it does not support dropout"
        if call.G > 1 and not caps.gqa:
            return "it does not support GQA/MQA (Hkv < Hq)"
        if call.needs_grad and not caps.backward:
            return "it has no backward (inputs require grad)"
        if call.return_lse and not caps.return_lse:
            return "it does not return the log-sum-exp (return_lse=True)"
        if call.return_weights and not caps.return_weights:
            return "it does not return attention weights (return_weights=True)"
        return self.extra_refusal(call)

    def extra_refusal(self, call: Call) -> str | None:
        return None

    def auto_refusal(self, call: Call) -> str | None:
        """Why `auto` should pass this call on to a later backend although this one could serve it."""
        return None

    def forward(self, call: Call):  # pragma: no cover - abstract
        raise NotImplementedError


_REGISTRY: dict[str, Backend] = {}
_AUTO_ORDER: tuple[str, ...] = ("sdpa", "tiled", "math")
_PREFERRED: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar("qkv_backend", default=None)


def register(backend: Backend, *, auto_rank: int | None = None) -> Backend:
    """Add a backend to the registry (and, with `auto_rank`, to auto's preference order)."""
    global _AUTO_ORDER
    if not backend.name:
        raise ValueError("a backend needs a name")
    _REGISTRY[backend.name] = backend
    if auto_rank is not None and backend.name not in _AUTO_ORDER:
        order = [n for n in _AUTO_ORDER]
        order.insert(auto_rank, backend.name)
        _AUTO_ORDER = tuple(order)
    return backend


def get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(['auto', *_REGISTRY])}")
    return _REGISTRY[name]


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


class CapabilityTable(tuple):
    """A tuple of (name, Capabilities) rows that prints as a table."""

    _COLUMNS = ("devices", "dtypes", "masks", "score_mod", "dropout", "gqa", "backward",
                "return_lse", "return_weights", "exact", "auto")

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
        be = _REGISTRY.get(name)
        if be is not None and be.capabilities.auto and be.refusal(call) is None and be.auto_refusal(call) is None:
            return be
    for name in _AUTO_ORDER:  # every backend had a preference against it: take the first that can
        be = _REGISTRY.get(name)
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


def zeros_output(call: Call) -> torch.Tensor:
    """An all-zero (B, Hq, Lq, Dv) output that is still connected to q, k, v (zero gradients)."""
    out = call.q.new_zeros(call.B, call.Hq, call.Lq, call.Dv)
    if call.needs_grad:
        # an empty slice sums to exactly 0 whatever the inputs hold (even NaN)
        out = out + sum(t.reshape(-1)[:0].sum() for t in (call.q, call.k, call.v))
    return out


_SMALL_ALLOCATION = 64 * 2**20


def memory_refusal(call: Call, need: int, what: str, hint: str = "") -> str | None:
    """A refusal when `need` bytes (for `what`) exceed the memory available on the call's device."""
    return memory_shortfall(call.device, need, what, hint)


def memory_shortfall(device, need: int, what: str, hint: str = "") -> str | None:
    """Why `need` bytes (for `what`) cannot be allocated on `device`, or None if they can (or it is unknown)."""
    if need <= _SMALL_ALLOCATION:  # asking the system costs more than such an allocation could risk
        return None
    device = torch.device(device)
    free = available_bytes(device)
    if free is None or need <= free:
        return None
    return (f"{what} would need {format_bytes(need)} ({need} bytes) and only {format_bytes(free)} is available "
            f"on {device}{hint}")


def require_memory(device, need: int, what: str, hint: str = "") -> None:
    """Raise MemoryNeedError, before anything is allocated, if `need` bytes will not fit on `device`."""
    why = memory_shortfall(device, need, what, hint)
    if why is not None:
        raise MemoryNeedError(why)


def available_bytes(device: torch.device) -> int | None:
    """Memory a new allocation could use on `device`, or None if unknown."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


# Register the built-in backends (imports at the end: they subclass Backend above).
from qkv.backends import math as _math  # noqa: E402
from qkv.backends import reference as _reference  # noqa: E402
from qkv.backends import sdpa as _sdpa  # noqa: E402
from qkv.backends import tiled as _tiled  # noqa: E402
from qkv.backends import linear as _linear  # noqa: E402

register(_reference.ReferenceBackend())
register(_math.MathBackend())
register(_sdpa.SDPABackend())
register(_tiled.TiledBackend())
register(_linear.LinearBackend())      # approximate: explicit backend= or a layer's attention= only, never auto
register(_linear.PerformerBackend())
