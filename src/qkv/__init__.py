"""qkv: self-attention from the textbook formula to fast exact kernels.

    import qkv
    out = qkv.attention(q, k, v, mask=qkv.masks.causal() & qkv.masks.sliding_window(1024))
    out, lse = qkv.attention(q, k, v, causal=True, return_lse=True)
    out, w = qkv.attention(q, k, v, return_weights=True)
    with qkv.use_backend("math"):
        ...
    print(qkv.backends.list())

Layout everywhere: (B, H, L, D) = batch, heads, sequence, head dim.
"""

from __future__ import annotations

import importlib

from qkv import backends, masks, reference, scores
from qkv.attention import attention, attention_weights
from qkv.backends import use_backend

__version__ = "0.1.0"

__all__ = ["attention", "attention_weights", "use_backend", "backends", "masks", "scores", "reference",
           "positional", "layers", "nn", "cache", "models", "generate", "inspect", "__version__"]

_LAZY = {name: f"qkv.{name}" for name in ("positional", "layers", "nn", "cli", "cache", "models", "generate",
                                           "inspect")}
_LAZY["demo"] = "qkv.tools.demo"          # the tour is a tool (qkv.tools); qkv.demo stays its name


def __getattr__(name):
    # Submodules that pull in more of torch.nn load on first use.
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        globals()[name] = module
        return module
    raise AttributeError(f"module 'qkv' has no attribute {name!r}")
