"""What an attention layer hands a capture (floor 0: imports nothing of qkv).

`ATTENTION_FINDERS` lists functions model -> [(name, module, query heads)] that name attention
layers of other libraries' models which call the hook (`qkv.integrations.transformers` adds one),
so `qkv.inspect.capture` finds them too.

`ATTENTION_HOOK` holds, while `qkv.inspect.capture` is active, the function attention layers
call with the inputs of their attention call: hook(module, q, k, *, mask, causal, score_mod,
scale, q_offset, cached=False), and sinks= (Hq,) from a layer that has them. None (the
default) when nothing is being captured, so a layer pays one context-variable lookup per call.
`qkv.layers`, `qkv.nn` and `qkv.inspect` share it.
"""

from __future__ import annotations

import contextvars
from typing import Callable

__all__ = ["ATTENTION_HOOK", "ATTENTION_FINDERS"]

ATTENTION_HOOK: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("qkv_attention_hook",
                                                                                  default=None)

ATTENTION_FINDERS: list[Callable] = []
