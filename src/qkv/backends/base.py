"""What every backend shares: the validated `Call`, `Capabilities` as data, the `Backend` base class.

Legend: B batch, Hq query heads, Hkv key/value heads, G = Hq // Hkv, Lq query length,
Lk key length, D head dim, Dv value dim.

`make_call` turns `qkv.attention`'s arguments into a `Call` (or a clear error); a backend
declares its `Capabilities` once and refuses what they do not cover (`Backend.refusal`), so
the dispatcher (`qkv.backends.registry`) can say why and name one that can.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from qkv import scores as _scores
from qkv._util.budget import memory_shortfall
from qkv._util.flex import is_block_mask
from qkv.masks import Mask, as_mask, causal as _causal_mask, from_dense, from_flex

__all__ = ["BackendError", "Capabilities", "FLOATS", "Call", "Backend", "zeros_output", "memory_refusal",
           "make_call", "check_sinks", "index_tensor"]


class BackendError(ValueError):
    """A backend cannot serve a call (a ValueError, so callers can catch either)."""


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
    sinks: bool = False    # attention sinks (`qkv.attention(sinks=)`): exact, returns the LSE (with backward: its grad)
    notes: str = ""


FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


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
    sinks: torch.Tensor | None = None   # (Hq,) sink logits; `qkv.attention` applies them to what the backend returns

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
        if call.sinks is not None and not caps.sinks:
            return "it does not support attention sinks (sinks=)"
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


def zeros_output(call: Call) -> torch.Tensor:
    """An all-zero (B, Hq, Lq, Dv) output that is still connected to q, k, v (zero gradients)."""
    out = call.q.new_zeros(call.B, call.Hq, call.Lq, call.Dv)
    if call.needs_grad:
        # an empty slice sums to exactly 0 whatever the inputs hold (even NaN)
        out = out + sum(t.reshape(-1)[:0].sum() for t in (call.q, call.k, call.v))
    return out


def memory_refusal(call: Call, need: int, what: str, hint: str = "") -> str | None:
    """A refusal when `need` bytes (for `what`) exceed the memory available on the call's device."""
    return memory_shortfall(call.device, need, what, hint)


def make_call(q, k, v, *, mask, causal, score_mod, scale, dropout_p, return_lse, return_weights,
               q_offset, sinks=None) -> Call:
    """The validated `Call` of `qkv.attention`'s arguments: every argument is checked up front, and a bad
    one gets an error that says what to do. `causal=True` is folded into the mask; `q_offset` defaults to
    `Lk - Lq` (bottom-right alignment) and `scale` to 1 / sqrt(D); `sinks` is checked by `check_sinks`."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D in layout (B, H, L, D), got shape {tuple(t.shape)}; "
                             f"for a single sequence use {name}[None] (and [None] again for one head)")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}; "
                        f"cast them, e.g. k.to(q.dtype)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q on {q.device}, k on {k.device}, "
                         f"v on {v.device}; move them with .to(q.device)")
    B, Hq, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if Bk != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q has B={B}, k has {Bk}, v has {v.shape[0]}")
    if v.shape[1] != Hkv or v.shape[2] != Lk:
        raise ValueError(f"k and v must have the same heads and length, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if Dk != D:
        raise ValueError(f"q and k must have the same head dim, got q D={D} and k D={Dk}")
    if Hkv == 0 and Hq != 0:
        raise ValueError("k and v have 0 heads; GQA needs 1 <= Hkv <= Hq")
    if Hkv and Hq % Hkv:
        raise ValueError(f"query heads Hq={Hq} must be a multiple of key/value heads Hkv={Hkv} "
                         f"(GQA/MQA); choose Hkv among the divisors of {Hq}")

    if q_offset is None:
        q_offset = Lk - Lq
    elif isinstance(q_offset, bool) or not isinstance(q_offset, numbers.Integral):
        raise TypeError(f"q_offset must be an int (position of the first query), got {type(q_offset).__name__}")
    q_offset = int(q_offset)

    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    elif not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale}; leave it None for 1/sqrt(D)")
    scale = float(scale)

    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")

    if score_mod is not None and not callable(score_mod):
        raise TypeError(f"score_mod must be a callable (score, b, h, q_idx, kv_idx) -> score, "
                        f"got {type(score_mod).__name__}")
    score_mod = None if score_mod is None else _scores.as_score_mod(score_mod)   # a plain callable: per element
    for name, flag in (("causal", causal), ("return_lse", return_lse), ("return_weights", return_weights)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")

    mask = _as_call_mask(mask, q, Lq, Lk, q_offset)
    if causal:
        mask = _causal_mask() if mask is None else _causal_mask() & mask
    if mask is not None:
        mask.validate(B, Hq, Lq, Lk, q_offset)
    if isinstance(score_mod, _scores.ScoreMod):
        score_mod.validate(B, Hq, Lq, Lk, q_offset)
    sinks = check_sinks(sinks, Hq, q.device)
    return Call(q, k, v, mask, score_mod, scale, float(dropout_p), q_offset, return_lse, return_weights, sinks)


def check_sinks(sinks, Hq: int, device) -> torch.Tensor | None:
    """`sinks` checked for a call with Hq query heads on `device`: None, or a floating-point (Hq,) tensor
    on that device (any float dtype: it is used in the statistics dtype). A bad one is refused with an
    error that says what to pass."""
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor):
        raise TypeError(f"sinks must be a tensor of shape (Hq,) = ({Hq},), one logit per query head, "
                        f"got {type(sinks).__name__}; e.g. sinks=torch.zeros({Hq})")
    if not sinks.is_floating_point():
        raise TypeError(f"sinks must be a floating-point tensor (one logit per query head), got dtype {sinks.dtype}; "
                        f"cast it with sinks.float()")
    if sinks.shape != (Hq,):
        raise ValueError(f"sinks must have shape (Hq,) = ({Hq},), one logit per query head, got {tuple(sinks.shape)}")
    if sinks.device != device:
        raise ValueError(f"sinks is on {sinks.device} but q is on {device}; move it with sinks.to(q.device)")
    return sinks


def _as_call_mask(mask, q, Lq, Lk, q_offset) -> Mask | None:
    if mask is None or isinstance(mask, Mask):
        return mask
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool:
            raise TypeError(f"a tensor mask must be bool (True = may attend), got dtype {mask.dtype}; "
                            f"for an additive float mask use score_mod=qkv.scores.bias(mask)")
        if mask.device != q.device:
            raise ValueError(f"mask is on {mask.device} but q is on {q.device}; move it with mask.to(q.device)")
        if not 2 <= mask.dim() <= 4 or mask.shape[-2] not in (1, Lq) or mask.shape[-1] not in (1, Lk):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to (B, H, Lq, Lk) "
                             f"with Lq={Lq}, Lk={Lk}")
        return from_dense(mask, q_offset=q_offset)
    if is_block_mask(mask):  # FlexAttention's: its query rows are the call's, wherever q_offset puts them
        return from_flex(mask, q_offset=q_offset)
    if callable(mask):
        return as_mask(mask)
    raise TypeError(f"mask must be a qkv mask, a callable (b, h, q_idx, kv_idx) -> bool, a FlexAttention BlockMask "
                    f"or a bool tensor; got {type(mask).__name__}")


def index_tensor(name: str, idx) -> torch.Tensor:
    """`idx` (an int, a list of ints or an integer tensor) as a flat int64 tensor; floats and bools are refused."""
    try:
        t = torch.as_tensor(idx)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be an int, a list of ints or an integer tensor, "
                        f"got {type(idx).__name__}") from None
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must hold integer indices, got dtype {t.dtype}; pass e.g. {name}=[0, 1]")
    return t.long().flatten()
