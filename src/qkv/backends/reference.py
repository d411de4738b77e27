"""The `reference` backend: the NumPy float64 oracle behind the common attention API.

Legend: B batch, Hq query heads, Lq/Lk lengths, Dv value dim.

Inputs are copied to float64 NumPy arrays, `qkv.reference.attention` runs, and
the result comes back in the input dtype and device. No autograd, no dropout;
qkv's masks and score mods run on NumPy arrays; plain callables are evaluated per element in
torch (FlexAttention's contract, `qkv._util.mods`).
"""

from __future__ import annotations

import torch

from qkv import reference
from qkv.backends.base import FLOATS, Backend, Call, Capabilities, memory_refusal


class ReferenceBackend(Backend):
    name = "reference"
    capabilities = Capabilities(
        devices=("any",), dtypes=FLOATS, masks=True, score_mod=True, dropout=False, gqa=True,
        backward=False, return_lse=True, return_weights=True, exact=True, auto=False, sinks=True,
        notes="NumPy float64 oracle; plain-callable mods are evaluated per element in torch (float64)",
    )

    def extra_refusal(self, call: Call) -> str | None:
        # float64 arrays: scores, softmax temporaries and weights (B, Hq, Lq, Lk), the mask, and
        # q and the repeated k, v (B, Hq, L, D or Dv)
        elems = call.B * call.Hq * call.Lq * call.Lk
        inputs = call.B * call.Hq * (call.Lq * (call.D + call.Dv) + call.Lk * (call.D + call.Dv))
        return memory_refusal(call, elems * (4 * 8 + 1) + inputs * 8, "its float64 score matrix")

    def forward(self, call: Call):
        out, lse, w = reference.attention(call.q, call.k, call.v, mask=call.mask, score_mod=call.score_mod,
                                          scale=call.scale, q_offset=call.q_offset, return_stats=True)
        dev = call.device
        return (torch.from_numpy(out).to(dev, call.dtype),
                torch.from_numpy(lse).to(dev, call.stat_dtype),
                torch.from_numpy(w).to(dev, call.stat_dtype))
