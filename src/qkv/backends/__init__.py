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

The parts: `base` (Call, Capabilities, Backend, make_call), `registry` (register, select,
use_backend), one module per backend. Adding one: subclass `Backend` with a name and its
`Capabilities`, implement `forward(call) -> (out, lse or None, weights or None)` (and
`extra_refusal` / `auto_refusal` where the capabilities do not say it all), then `register` it.
"""

from __future__ import annotations

from qkv._util.budget import MemoryNeedError, available_bytes, format_bytes, memory_shortfall, require_memory
from qkv.backends.base import (FLOATS, Backend, BackendError, Call, Capabilities, index_tensor, make_call,
                               memory_refusal, zeros_output)
from qkv.backends.registry import (CapabilityTable, get, internal, list, names, preferred, register, select,
                                   use_backend)
from qkv.backends import linear, math, reference, sdpa, segments, tiled, triton_backend

__all__ = ["Capabilities", "Call", "Backend", "register", "get", "names", "list", "select",
           "use_backend", "BackendError", "MemoryNeedError"]

register(reference.ReferenceBackend())
register(math.MathBackend())
register(sdpa.SDPABackend())
register(tiled.TiledBackend())
register(linear.LinearBackend())      # approximate: explicit backend= or a layer's attention= only, never auto
register(linear.PerformerBackend())
register(segments.SegmentsBackend(), auto_rank=0, hidden=True)   # packed documents, before every other
register(triton_backend.TritonBackend(), auto_rank=0)   # auto's first on CUDA; the CPU only under the interpreter
register(tiled.CarefulBackend(), hidden=True)                      # qkv.attention's repair of non-finite inputs
