"""Positional information for attention: sinusoidal, learned, rotary (RoPE), ALiBi.

Shape legend (used in every comment below):
    B  batch size
    H  number of heads (Hq query heads, Hkv key/value heads)
    L  sequence length (Lq query length, Lk key length)
    D  head dimension (channels per head)
    rd rotary dimension: how many leading channels of each head RoPE rotates
    E  model (embedding) dimension, for the additive schemes that act before
       the heads are split

Attention tensors are laid out B H L D.  Additive embeddings (sinusoidal,
learned) act on token embeddings laid out B L E, before the split into heads.

The core is a set of pure functions (``sinusoidal``, ``rope_frequencies``,
``rope_cos_sin``, ``apply_rope``, ``alibi_slopes``); the ``nn.Module`` classes
are thin wrappers that hold hyper-parameters, parameters or caches.

Numerics: every angle (position times frequency) is computed in float64 and
only the final cos/sin values are cast.  Positions reach the tens of thousands
and frequencies span ~4 decades, so forming the product in float32 loses
several digits of the angle before sin/cos ever sees it; doing it in float64
costs nothing measurable because the tables are tiny next to attention itself.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "sinusoidal",
    "SinusoidalPositions",
    "LearnedPositions",
    "rope_frequencies",
    "rope_cos_sin",
    "apply_rope",
    "RotaryEmbedding",
    "alibi_slopes",
]


# -----------------------------------------------------------------------------
# Argument checks.  Small helpers so that every public function can validate
# its inputs up front and fail with a message naming the argument.


def _check_int(name: str, value, *, minimum: int | None = None) -> int:
    # bool is a subclass of int, but passing True as a length is always a bug
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}; pass a whole number")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def _check_float_tensor(name: str, x, ndim: int | tuple[int, ...]) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if x.dim() not in allowed:
        raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dims, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}; cast it with .float()")
    return x


# -----------------------------------------------------------------------------
# Sinusoidal positions ("Attention Is All You Need", section 3.5)


def sinusoidal(
    length: int,
    dim: int,
    *,
    base: float = 10000.0,
    offset: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """The fixed sin/cos table of the original Transformer, shape (length, dim).

    PE[pos, 2i] = sin(pos / base^(2i/dim)),  PE[pos, 2i+1] = cos(pos / base^(2i/dim))
    with pos = offset + 0..length-1.

    Why this form: each channel pair is a rotation at its own frequency, so
    PE[pos + k] is a fixed linear function of PE[pos] and the model can learn to
    attend by relative offset.  ``offset`` lets an incremental decoder ask for
    the rows of the new tokens only.  An odd ``dim`` simply ends on a sin column
    (its cos partner would be column ``dim``, which does not exist).
    """
    _check_int("length", length, minimum=0)
    _check_int("dim", dim, minimum=1)
    _check_int("offset", offset, minimum=0)
    base = _check_positive_float("base", base)

    pos = torch.arange(offset, offset + length, dtype=torch.float64, device=device)  # (L,)
    # column j uses frequency index i = j // 2, i.e. exponent 2i/dim
    pair_index = torch.arange(dim, device=device) // 2  # (dim,)
    inv_freq = base ** (-(2.0 * pair_index.to(torch.float64)) / dim)  # (dim,)
    angles = pos[:, None] * inv_freq[None, :]  # (L, 1) * (1, dim) -> (L, dim)
    is_even = (torch.arange(dim, device=device) % 2 == 0)  # (dim,), True on sin columns
    table = torch.where(is_even, torch.sin(angles), torch.cos(angles))  # (L, dim)
    return table.to(dtype)


class SinusoidalPositions(nn.Module):
    """Adds the sinusoidal table to token embeddings x of shape (B, L, dim).

    No parameters and no stored table: the table is rebuilt for each call's
    length, dtype and device, which keeps the module valid for any length
    (the table is O(L * dim), negligible next to the embeddings themselves).
    """

    def __init__(self, dim: int, *, base: float = 10000.0):
        super().__init__()
        self.dim = _check_int("dim", dim, minimum=1)
        self.base = _check_positive_float("base", base)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        _check_float_tensor("x", x, 3)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x last dim must equal dim={self.dim}, got shape {tuple(x.shape)}")
        table = sinusoidal(x.shape[1], self.dim, base=self.base, offset=offset, dtype=x.dtype, device=x.device)
        return x + table  # (B, L, dim) + (L, dim) broadcasts over B

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}"


# -----------------------------------------------------------------------------
# Learned absolute positions (GPT-2 style)


class LearnedPositions(nn.Module):
    """A trainable (max_len, dim) table added to token embeddings (B, L, dim).

    Unlike the fixed schemes this cannot extrapolate: row max_len simply does
    not exist, so asking for it is an error rather than a silent wrap-around.
    Initialised N(0, 0.02^2) like GPT-2 so it starts as a small perturbation of
    the token embeddings.
    """

    def __init__(self, max_len: int, dim: int):
        super().__init__()
        self.max_len = _check_int("max_len", max_len, minimum=1)
        self.dim = _check_int("dim", dim, minimum=1)
        self.weight = nn.Parameter(torch.empty(max_len, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=0.02)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        _check_float_tensor("x", x, 3)
        _check_int("offset", offset, minimum=0)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x last dim must equal dim={self.dim}, got shape {tuple(x.shape)}")
        length = x.shape[1]
        if offset + length > self.max_len:
            raise ValueError(
                f"positions {offset}..{offset + length - 1} exceed max_len={self.max_len}; "
                f"use a shorter input/offset or construct LearnedPositions with a larger max_len"
            )
        rows = self.weight[offset : offset + length]  # (L, dim)
        return x + rows.to(x.dtype)  # (B, L, dim) + (L, dim) broadcasts over B

    def extra_repr(self) -> str:
        return f"max_len={self.max_len}, dim={self.dim}"


# -----------------------------------------------------------------------------
# Rotary position embedding (RoFormer, Su et al. 2021)
#
# RoPE rotates channel pairs of q and k by angle pos * inv_freq[i].  A rotation
# by angle a applied to q and by angle b applied to k leaves <q, k> depending
# only on a - b, so the attention score sees only the relative position m - n.
#
# Two conventions exist for *which* channels form a pair:
#   half-split  (GPT-NeoX, Llama, HF):  (x[i], x[i + rd/2])
#   interleaved (GPT-J, RoFormer):      (x[2i], x[2i + 1])
# They are the same maths on a permuted channel order; weights trained with
# one need that same layout at inference.

_ROPE_SCALINGS = (None, "linear", "ntk", "llama3")


def rope_frequencies(
    rotary_dim: int,
    *,
    base: float = 10000.0,
    scaling: str | None = None,
    factor: float = 1.0,
    original_max_len: int | None = None,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Inverse frequencies inv_freq[i] = base^(-2i/rotary_dim), shape (rotary_dim // 2,).

    Context-extension rules (``factor`` = how many times longer the target
    context is than the training context):

    * ``"linear"`` (position interpolation, Chen et al. 2023): positions are
      squeezed by ``factor`` so they stay inside the trained range.  Dividing
      every frequency by ``factor`` is the same thing and needs no change to
      the positions.
    * ``"ntk"`` (NTK-aware scaling): the base becomes
      base * factor^(rd / (rd - 2)).  The highest frequency (i = 0) is
      untouched, so local detail keeps full resolution, while the lowest
      frequency is slowed by exactly ``factor``, i.e. it gets interpolated.

    * ``"llama3"`` (Llama 3.1): frequency-dependent. A pair whose wavelength
      2*pi/inv_freq is longer than original_max_len / low_freq_factor is
      interpolated (divided by ``factor``); one shorter than
      original_max_len / high_freq_factor is kept; in between the two are
      blended linearly in original_max_len / wavelength. Needs ``original_max_len``.

    ``original_max_len`` is accepted (and validated) for configs that carry the
    training context length; only ``"llama3"`` uses it.
    """
    _check_int("rotary_dim", rotary_dim, minimum=2)
    if rotary_dim % 2 != 0:
        raise ValueError(f"rotary_dim must be even (channels are rotated in pairs), got {rotary_dim}")
    base = _check_positive_float("base", base)
    factor = _check_positive_float("factor", factor)
    if scaling not in _ROPE_SCALINGS:
        raise ValueError(f"scaling must be one of {_ROPE_SCALINGS}, got {scaling!r}")
    if scaling is None and factor != 1.0:
        raise ValueError(f"factor={factor} has no effect without scaling; pass scaling='linear' or 'ntk'")
    if original_max_len is not None:
        _check_int("original_max_len", original_max_len, minimum=1)

    if scaling == "ntk":
        if rotary_dim == 2:
            raise ValueError("scaling='ntk' needs rotary_dim >= 4 (its exponent rd/(rd-2) is undefined at 2)")
        base = base * factor ** (rotary_dim / (rotary_dim - 2))

    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim  # (rd/2,) = 2i/rd
    inv_freq = base ** (-exponents)  # (rd/2,)
    if scaling == "linear":
        inv_freq = inv_freq / factor
    elif scaling == "llama3":
        if original_max_len is None:
            raise ValueError("scaling='llama3' needs original_max_len (the training context length)")
        low = _check_positive_float("low_freq_factor", low_freq_factor)
        high = _check_positive_float("high_freq_factor", high_freq_factor)
        if not high > low:
            raise ValueError(f"high_freq_factor must exceed low_freq_factor, got {high} <= {low}")
        wavelength = 2 * math.pi / inv_freq  # (rd/2,)
        blend = (original_max_len / wavelength - low) / (high - low)  # 0 at the long end, 1 at the short end
        blended = (1 - blend) * inv_freq / factor + blend * inv_freq
        inv_freq = torch.where(wavelength > original_max_len / low, inv_freq / factor,
                               torch.where(wavelength < original_max_len / high, inv_freq, blended))
    return inv_freq.to(dtype)


def rope_cos_sin(
    positions: Tensor,
    inv_freq: Tensor,
    *,
    interleaved: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """cos and sin tables for the given positions, each (..., L, rotary_dim).

    ``positions`` is (L,) or (B, L); integer positions are the norm, floating
    ones are accepted too (useful for interpolation experiments).  Angles are
    formed in float64 and only the results are cast to ``dtype``.

    Each angle appears twice in the output (once per channel of its pair), laid
    out to match the pairing convention that ``apply_rope`` will use.
    """
    if not isinstance(positions, Tensor):
        raise TypeError(f"positions must be a torch.Tensor, got {type(positions).__name__}")
    if positions.dim() not in (1, 2):
        raise ValueError(f"positions must be (L,) or (B, L), got shape {tuple(positions.shape)}")
    if positions.dtype == torch.bool or positions.is_complex():
        raise TypeError(f"positions must be an integer (or real) tensor, got {positions.dtype}")
    _check_float_tensor("inv_freq", inv_freq, 1)

    inv_freq = inv_freq.to(device=positions.device, dtype=torch.float64)  # (rd/2,)
    angles = positions.to(torch.float64)[..., None] * inv_freq  # (..., L, 1) * (rd/2,) -> (..., L, rd/2)
    cos, sin = torch.cos(angles), torch.sin(angles)  # (..., L, rd/2) each
    if interleaved:
        # angle i serves channels 2i and 2i+1: [a0, a0, a1, a1, ...]
        cos = cos.repeat_interleave(2, dim=-1)  # (..., L, rd/2) -> (..., L, rd)
        sin = sin.repeat_interleave(2, dim=-1)  # (..., L, rd/2) -> (..., L, rd)
    else:
        # angle i serves channels i and i + rd/2: [a0, a1, ..., a0, a1, ...]
        cos = torch.cat([cos, cos], dim=-1)  # (..., L, rd/2) -> (..., L, rd)
        sin = torch.cat([sin, sin], dim=-1)  # (..., L, rd/2) -> (..., L, rd)
    return cos.to(dtype), sin.to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    """Half-split pairing: (x1, x2) -> (-x2, x1), where x1, x2 are the two halves."""
    x1, x2 = x.chunk(2, dim=-1)  # (..., rd) -> two (..., rd/2)
    return torch.cat([-x2, x1], dim=-1)  # back to (..., rd)


def _rotate_interleaved(x: Tensor) -> Tensor:
    """Interleaved pairing: (x[2i], x[2i+1]) -> (-x[2i+1], x[2i])."""
    pairs = x.unflatten(-1, (-1, 2))  # (..., rd) -> (..., rd/2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]  # (..., rd/2) each
    return torch.stack([-odd, even], dim=-1).flatten(-2)  # (..., rd/2, 2) -> (..., rd)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False) -> Tensor:
    """Rotate the first rotary_dim = cos.shape[-1] channels of x (B, H, L, D).

    The remaining D - rotary_dim channels pass through untouched (partial
    rotary, as in GPT-NeoX and Phi): they carry position-free content.  cos and
    sin are (L, rd) or (B, L, rd) and are broadcast over heads.

    out = x * cos + rotate(x) * sin is exactly the 2x2 rotation
    [[cos, -sin], [sin, cos]] applied to every channel pair.  It is evaluated in
    float32 (float64 for float64 input) and cast back, so half-precision inputs
    lose at most one final rounding instead of one per operation.
    """
    _check_float_tensor("x", x, 4)
    _check_float_tensor("cos", cos, (2, 3))
    _check_float_tensor("sin", sin, (2, 3))
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    batch, _, length, head_dim = x.shape
    rotary_dim = cos.shape[-1]
    if rotary_dim % 2 != 0 or rotary_dim > head_dim or rotary_dim < 2:
        raise ValueError(
            f"cos/sin last dim (rotary_dim={rotary_dim}) must be even, >= 2 and <= head dim D={head_dim}"
        )
    if cos.shape[-2] != length:
        raise ValueError(f"cos/sin cover {cos.shape[-2]} positions but x has L={length}; build them for x's positions")
    if cos.dim() == 3:
        if cos.shape[0] not in (1, batch):
            raise ValueError(f"cos/sin batch dim must be 1 or B={batch}, got {cos.shape[0]}")
        cos = cos.unsqueeze(1)  # (B, L, rd) -> (B, 1, L, rd): broadcast over heads
        sin = sin.unsqueeze(1)  # (B, L, rd) -> (B, 1, L, rd)
    # a 2-D (L, rd) table already broadcasts against (B, H, L, rd)

    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    x_rot = x[..., :rotary_dim].to(compute)  # (B, H, L, rd)
    x_pass = x[..., rotary_dim:]  # (B, H, L, D - rd), returned bit-identical
    rotate = _rotate_interleaved if interleaved else _rotate_half
    out = x_rot * cos.to(compute) + rotate(x_rot) * sin.to(compute)  # (B, H, L, rd)
    return torch.cat([out.to(x.dtype), x_pass], dim=-1)  # (B, H, L, D)


class RotaryEmbedding(nn.Module):
    """RoPE for a pair (q, k) laid out B H L D.

    Holds the frequencies and a cache of the cos/sin table for positions
    0..N-1, so the common "positions = offset + arange(L)" case (prefill and
    KV-cache decode) is a slice rather than a recomputation.  The cache grows
    geometrically so token-by-token decode recomputes it only O(log L) times.

    ``inv_freq`` is a non-persistent float32 buffer (it follows ``.to(device)``
    and is visible for inspection, but is not saved since it is derived from
    the hyper-parameters).  cos/sin are computed from a private float64 copy,
    kept outside the buffers so that ``module.half()`` cannot degrade it.
    """

    def __init__(
        self,
        head_dim: int,
        *,
        base: float = 10000.0,
        rotary_dim: int | None = None,
        partial_rotary_factor: float | None = None,
        scaling: str | None = None,
        factor: float = 1.0,
        interleaved: bool = False,
        original_max_len: int | None = None,
        low_freq_factor: float = 1.0,
        high_freq_factor: float = 4.0,
    ):
        super().__init__()
        _check_int("head_dim", head_dim, minimum=2)
        if rotary_dim is not None and partial_rotary_factor is not None:
            raise ValueError("pass at most one of rotary_dim and partial_rotary_factor, not both")
        if partial_rotary_factor is not None:
            partial_rotary_factor = _check_positive_float("partial_rotary_factor", partial_rotary_factor)
            if partial_rotary_factor > 1.0:
                raise ValueError(f"partial_rotary_factor must be in (0, 1], got {partial_rotary_factor}")
            rotary_dim = int(head_dim * partial_rotary_factor)
            rotary_dim -= rotary_dim % 2  # round down to even: channels rotate in pairs
            if rotary_dim < 2:
                raise ValueError(
                    f"partial_rotary_factor={partial_rotary_factor} leaves fewer than 2 rotary channels "
                    f"of head_dim={head_dim}; use a larger factor"
                )
        if rotary_dim is None:
            rotary_dim = head_dim
        _check_int("rotary_dim", rotary_dim, minimum=2)
        if rotary_dim % 2 != 0:
            raise ValueError(f"rotary_dim must be even (channels are rotated in pairs), got {rotary_dim}")
        if rotary_dim > head_dim:
            raise ValueError(f"rotary_dim={rotary_dim} must be <= head_dim={head_dim}")
        if not isinstance(interleaved, bool):
            raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__}")

        # validates base, scaling and factor too
        inv_freq64 = rope_frequencies(rotary_dim, base=base, scaling=scaling, factor=factor,
                                      original_max_len=original_max_len, low_freq_factor=low_freq_factor,
                                      high_freq_factor=high_freq_factor, dtype=torch.float64)

        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.base = float(base)
        self.scaling = scaling
        self.factor = float(factor)
        self.interleaved = interleaved
        self._inv_freq64 = inv_freq64  # (rd/2,) float64, deliberately not a buffer (see class docstring)
        self.register_buffer("inv_freq", inv_freq64.to(torch.float32), persistent=False)  # (rd/2,)
        self._cache: tuple[int, torch.device, torch.dtype, Tensor, Tensor] | None = None

    # -- cos/sin ---------------------------------------------------------------

    def table(self, needed: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos/sin (N, rd) for positions 0..N-1 with N >= needed, cached."""
        if self._cache is not None:
            length, cached_device, cached_dtype, cos, sin = self._cache
            if length >= needed and cached_device == device and cached_dtype == dtype:
                return cos, sin
            # grow geometrically on the same device/dtype so decode stays amortised O(1)
            if cached_device == device and cached_dtype == dtype:
                needed = max(needed, 2 * length)
        positions = torch.arange(needed, device=device)  # (N,)
        cos, sin = rope_cos_sin(positions, self._inv_freq64, interleaved=self.interleaved, dtype=dtype)  # (N, rd)
        self._cache = (needed, device, dtype, cos, sin)
        return cos, sin

    def cos_sin(
        self,
        length: int,
        *,
        positions: Tensor | None = None,
        offset: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[Tensor, Tensor]:
        """cos/sin (L, rd) for offset + arange(length), or (..., L, rd) for explicit positions.

        ``offset`` only applies when ``positions`` is None; explicit positions
        are used as given.
        """
        device = torch.device(device) if device is not None else self.inv_freq.device
        if positions is not None:
            if not isinstance(positions, Tensor):
                raise TypeError(f"positions must be a torch.Tensor (L,) or (B, L) of token positions, got "
                                f"{type(positions).__name__}; e.g. torch.arange(L)")
            if positions.shape[-1] != length:
                raise ValueError(f"positions last dim must be L={length}, got shape {tuple(positions.shape)}")
            # arbitrary positions (packed sequences, left padding): compute directly, no cache
            return rope_cos_sin(positions.to(device), self._inv_freq64, interleaved=self.interleaved, dtype=dtype)
        _check_int("offset", offset, minimum=0)
        cos, sin = self.table(offset + length, device, dtype)  # (N, rd)
        return cos[offset : offset + length], sin[offset : offset + length]  # (L, rd)

    # -- application -----------------------------------------------------------

    def rotate(self, x: Tensor, positions: Tensor | None = None, *, offset: int = 0) -> Tensor:
        """Rotate one tensor x (B, H, L, D); positions default to offset + arange(L)."""
        _check_float_tensor("x", x, 4)
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"x last dim must equal head_dim={self.head_dim}, got shape {tuple(x.shape)}")
        table_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = self.cos_sin(x.shape[2], positions=positions, offset=offset, device=x.device, dtype=table_dtype)
        return apply_rope(x, cos, sin, interleaved=self.interleaved)

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        q_positions: Tensor | None = None,
        k_positions: Tensor | None = None,
        *,
        offset: int = 0,
    ) -> tuple[Tensor, Tensor]:
        """Return (rotate(q), rotate(k)) for q (B, Hq, Lq, D) and k (B, Hkv, Lk, D).

        Each tensor gets its own positions: by default offset + arange of its
        own length, which is what a KV-cache decode step needs (the new queries
        and the new keys both start at the number of cached tokens).
        """
        return self.rotate(q, q_positions, offset=offset), self.rotate(k, k_positions, offset=offset)

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base}, "
            f"scaling={self.scaling!r}, factor={self.factor}, interleaved={self.interleaved}"
        )


# -----------------------------------------------------------------------------
# ALiBi (Press et al. 2022, "Train Short, Test Long")


def _alibi_power_of_two(n: int) -> list[float]:
    # geometric sequence starting at 2^(-8/n) with that same ratio
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]


def alibi_slopes(n_heads: int) -> Tensor:
    """Per-head ALiBi slopes, shape (n_heads,), float32.

    Head h adds -slope[h] * distance to its scores, so heads with small slopes
    look far and heads with large slopes stay local.  For n a power of two the
    slopes are 2^(-8/n), 2^(-16/n), ..., 2^(-8).  Otherwise, following the
    paper's reference code, take the slopes of the largest power of two m <= n
    and fill the remaining n - m heads with every other slope of 2m, which
    interleaves new values between the existing ones instead of extending the
    range.
    """
    _check_int("n_heads", n_heads, minimum=1)
    m = 1 << (n_heads.bit_length() - 1)  # largest power of two <= n_heads
    slopes = _alibi_power_of_two(m)
    if m != n_heads:
        slopes += _alibi_power_of_two(2 * m)[0::2][: n_heads - m]
    return torch.tensor(slopes, dtype=torch.float64).to(torch.float32)  # (n_heads,)
