"""The one-launch CPU decode step: every pre-norm decoder block of one new token per sequence in
one kernel launch (`qkv.kernels.blocks_step`), in one place.

Legend: B batch (sequences, one new token each), rd rotated dims of RoPE, Hq / Hkv heads.

What lives here, and who calls it:

- `plan(...)`: a block's parameter addresses, sizes and kinds for the kernel (`qkv.layers.Block`
  hands it its parts and its norm kind after checking the module types; no tensor is kept);
- `joinable` / `joint_linear`: several `Linear` layers whose weights lie back to back
  (`qkv._util.hugepages.pack_parameters`) run as one matrix (q/k/v, gate/up);
- `with_rope` / `claim`: a block's layout made ready for one step: RoPE's cos/sin at each
  sequence's position, then the new token's cache slot claimed through the cache's public
  `claim_decode_slot()`;
- `block_step` (one block, `Block`) and `step` (all blocks of a `Decoder`), and
  `DecodeSession`: what a decoding loop that runs no other code between its steps
  (`qkv.generate`) keeps from its first step, so later steps skip the per-block checks;
- `hooked` / `hooked_call`: a forward hook would miss a module the fused step does not run,
  so the step steps aside when one is registered.

The module path (`qkv.layers`, `qkv.attention`) is the definition; the fused step computes the
same function, and tests/test_fused_decode.py holds the two together. Imports the kernels and
torch only: no qkv module class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.modules import module as _torch_module

from qkv import kernels
from qkv._util import hugepages

__all__ = ["ACTIVATIONS", "NORM_LAYER", "NORM_RMS", "DecodeSession", "plan", "joinable", "joint_linear",
           "with_rope", "claim", "block_step", "step", "hooked", "hooked_call"]

#: the FFN activations the kernel computes, by code
ACTIVATIONS = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "swiglu": 3, "geglu": 0}
#: norm kinds: LayerNorm with weight and bias, RMSNorm with weight
NORM_LAYER, NORM_RMS = 0, 1


@dataclass
class DecodeSession:
    """What a decoding loop keeps across its steps: the blocks' step-independent layouts, worked
    out (and checked) on the first step. Valid for one run of one loop that hands control to no
    other code between steps (nothing can change the model inside it)."""

    statics: list | None = None


def hooked(modules) -> bool:
    """Whether a forward hook (or pre-hook) would see one of these modules run: the fused
    decode step runs no module's forward, so it steps aside when one is registered."""
    return bool(_torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks or any(
        m._forward_hooks or m._forward_pre_hooks for m in modules))


def hooked_call(module) -> bool:
    """`hooked` for a whole model's call, backward hooks included."""
    return hooked((module,)) or bool(module._backward_hooks or module._backward_pre_hooks)


def joinable(layers) -> bool:
    """Whether these `Linear` layers' weights lie back to back in one storage (`qkv._util.hugepages.joined`),
    and their biases too, or they have none."""
    biases = [layer.bias for layer in layers]
    return hugepages.joined(*(layer.weight for layer in layers)) is not None and (
        all(b is None for b in biases) or hugepages.joined(*biases) is not None)


def joint_linear(x: Tensor, layers) -> tuple[Tensor, ...] | None:
    """x through several `Linear` layers in one kernel launch, when their weights (and
    biases) lie back to back in memory (`qkv._util.hugepages.pack_parameters`) and the decode
    kernel applies; the outputs are views of one (..., sum of widths) result. None otherwise."""
    weights = [layer.weight for layer in layers]
    biases = [layer.bias for layer in layers]
    key = tuple((t.data_ptr(), t.shape) if t is not None else None for t in weights + biases)
    seen = layers[0].__dict__.get("_qkv_joint")            # (key, joinable): the layout check once, not per step
    if seen is None or seen[0] != key:
        seen = layers[0].__dict__["_qkv_joint"] = (key, joinable(layers))    # no tensors kept: nothing pinned
    if not seen[1]:
        return None
    weight = hugepages.joined(*weights, trusted=True)
    bias = None if biases[0] is None else hugepages.joined(*biases, trusted=True)
    if not kernels.applies(x, weight, bias):
        return None
    return kernels.linear(x, weight, bias, checked=True).split([w.shape[0] for w in weights], dim=-1)


def plan(attn, ffn, n1, n2, ups, down, linears, norm_kind: int):
    """(parameter addresses, sizes and kinds, (eps1, eps2, scale), RoPE module) of one pre-norm
    block for `blocks_step`, or None when its parameters cannot be fused.

    attn, ffn, n1, n2: the block's attention, FFN and norms (norm_kind NORM_LAYER or NORM_RMS,
    which the block has checked); ups: (gate, up) or (fc1,); down: the FFN's output projection;
    linears: q, k, v, o, *ups, down."""
    projections = linears[:3]
    params = [layer.weight for layer in linears] + [layer.bias for layer in linears] + [
        getattr(n, name, None) for n in (n1, n2) for name in ("weight", "bias")]
    has_bias = linears[0].bias is not None
    ok = (ffn.activation in ACTIVATIONS
          and all(t is None or (t.dtype == torch.float32 and t.is_cpu and t.is_contiguous()) for t in params)
          and all((layer.bias is not None) == has_bias for layer in linears)
          and joinable(projections) and joinable(ups))
    if not ok:
        return None

    def ptr(t):
        return 0 if t is None else t.data_ptr()
    norm_b1, norm_b2 = (n1.bias, n2.bias) if norm_kind == NORM_LAYER else (None, None)
    static = [ptr(n1.weight), ptr(norm_b1), ptr(n2.weight), ptr(norm_b2), ptr(attn.q_proj.weight),
              ptr(attn.q_proj.bias), ptr(attn.o_proj.weight), ptr(attn.o_proj.bias), ptr(ups[0].weight),
              ptr(ups[0].bias), ptr(down.weight), ptr(down.bias)]
    D = attn.head_dim
    dims = [sum(layer.weight.shape[0] for layer in projections), attn.n_heads, attn.n_kv_heads, D,
            down.weight.shape[1], sum(layer.weight.shape[0] for layer in ups), norm_kind,
            ACTIVATIONS[ffn.activation], int(ffn.gated), int(has_bias),
            int(attn.rope.interleaved) if attn.rope is not None else 0]
    scale = attn.scale if attn.scale is not None else 1.0 / math.sqrt(D)
    return static, dims, [float(n1.eps), float(n2.eps), float(scale)], attn.rope


def with_rope(layer: dict, positions: Tensor | None, cache, rope_tables: dict) -> dict:
    """A block's step-independent layout for this step: cos, sin (B, rd) of its RoPE at each
    sequence's new position (None without RoPE; `positions` None: the cache's lengths), memoised
    per RoPE module in `rope_tables`, and the layer's cache."""
    rope, cos, sin = layer["rope"], None, None
    if rope is not None:
        tables = rope_tables.get(id(rope))
        if tables is None:
            if positions is None:
                positions = cache.length[:, None]
            pos = positions.reshape(-1, 1)[:, 0] if positions.dim() == 2 else positions.reshape(-1)
            if pos.numel() == 1:
                pos = pos.expand(cache.batch)
            cos_t, sin_t = rope.table(int(pos.max()) + 1, pos.device, torch.float32)          # (N, rd)
            tables = rope_tables[id(rope)] = (cos_t[pos].contiguous(), sin_t[pos].contiguous())   # (B, rd)
        cos, sin = tables
    return {**layer, "cos": cos, "sin": sin, "cache": cache}


def claim(layer: dict) -> dict:
    """A `with_rope` entry made ready for `blocks_step`: the new token's cache slot claimed."""
    cache = layer["cache"]
    return {**{k: v for k, v in layer.items() if k != "cache"}, **cache.claim_decode_slot()}


def block_step(x: Tensor, layer: dict) -> Tensor:
    """One block's step (x (B, 1, d_model)) from its `with_rope` entry; the caller has passed
    the cache's check_room(1)."""
    return kernels.blocks_step(x, [claim(layer)])


def step(statics: list, x: Tensor, positions: Tensor | None, cache) -> Tensor:
    """All blocks of a model in one launch: x (B, 1, d_model) -> (B, 1, d_model).

    statics: each block's step-independent layout (`Block.fused_layout`), in order; cache: the
    model's `qkv.cache.Cache`, whose check_room(1) has passed, so claiming a slot in every
    layer cannot fail; positions (B, 1) for RoPE, or None without RoPE."""
    rope_tables: dict = {}
    layers = [with_rope(layer, positions, layer_cache, rope_tables)
              for layer, layer_cache in zip(statics, cache.layers)]
    return kernels.blocks_step(x, [claim(layer) for layer in layers])
