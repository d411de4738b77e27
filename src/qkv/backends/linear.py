"""Kernelised attention: the `linear` and `performer` backends, approximate and O(L).

Legend: B batch, Hq query heads, Hkv key/value heads, G = Hq // Hkv, Lq/Lk lengths,
D head dim, Dv value dim, M features per token (D for `linear`, n_features for
`performer`), C chunk length, nC chunks.

Softmax attention weighs key j for query i by exp(q_i . k_j * scale). Replace
that by a product of feature maps, sim(q, k) = phi(q)^T phi(k) >= 0, and the sum
over keys factorises::

    out_i = sum_j phi(q_i)^T phi(k_j) v_j / sum_j phi(q_i)^T phi(k_j)
          = phi(q_i)^T S / phi(q_i)^T z,     S = sum_j phi(k_j) v_j^T (M x Dv),  z = sum_j phi(k_j) (M)

S and z are computed once, so the cost is O(L * M * Dv) instead of O(L^2 * D),
and no Lq x Lk matrix ever exists. Two feature maps:

- `linear` (Katharopoulos et al. 2020): phi(x) = elu(x) + 1, M = D. A different
  similarity from softmax, not an estimate of it. It has no temperature: the
  call's `scale` is not used, so the backend refuses a scale other than the
  default 1/sqrt(D) rather than ignore it (fold a temperature into q instead).
- `performer` (FAVOR+, Choromanski et al. 2021): positive orthogonal random
  features with E[phi(q)^T phi(k)] = exp(q . k * scale): an unbiased estimate of
  the softmax kernel, so the output approximates softmax attention, better with
  more features. `scale` is honoured: features are taken of sqrt(scale) * q and
  sqrt(scale) * k (with the default scale, q * D^-1/4 and k * D^-1/4).

Causal attention is a prefix sum, S_i = sum_{j <= i} phi(k_j) v_j^T, computed in
chunks of C positions so that memory stays O(L * C + L * M * Dv / C): within a
chunk the masked quadratic form, across chunks the running state::

    keys   | chunk 0 | chunk 1 | chunk 2 |        out_i (i in chunk c) =
    S_ex     0         S(0)      S(0)+S(1)          phi(q_i)^T (S_ex[c] + sum_{j in c, j <= i} phi(k_j) v_j^T) / (same with z)

Queries are bottom-right aligned when Lq != Lk (query row r sits at position
q_offset + r, default Lk - Lq), as in `qkv.attention`. The same state, carried
from one call to the next, is a recurrent cache: `qkv.cache.LinearStateCache`
makes a decode step O(1) in the context length.

Neither backend can express an arbitrary mask (the sums run over all keys or a
causal prefix), return weights or a log-sum-exp, or add a score_mod; they say so
and name an exact backend. `backend="auto"` never picks them: only an explicit
`backend="linear"` / `"performer"` or a layer's `attention=` option does.

Which random features `backend="performer"` uses: the feature map made current
by `with feature_map.use():` (what `MultiHeadAttention(attention=Performer(...))`
does around each call), else the backend's default `Performer(256, seed=0)`
(`qkv.backends.get("performer").feature_map`, replaceable). A `Performer` draws its
projection per head dim D, lazily, and keeps a converted copy per (D, device, dtype).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import replace
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from qkv._util.checks import check_int
from qkv.backends.base import FLOATS, Backend, Call, Capabilities
from qkv.masks import is_causal

__all__ = ["elu_features", "Performer", "kernel_attention", "implied_weights", "use_feature_map",
           "current_feature_map", "LinearBackend", "PerformerBackend", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 64


# ----------------------------------------------------------------------------
# Feature maps
# ----------------------------------------------------------------------------

def elu_features(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 (> 0 everywhere): the `linear` backend's feature map, (..., D) -> (..., D)."""
    return F.elu(x) + 1


_ACTIVE: contextvars.ContextVar["Performer | None"] = contextvars.ContextVar("qkv_feature_map", default=None)


def current_feature_map() -> "Performer | None":
    """The feature map made current by `use_feature_map` / `Performer.use()`, or None."""
    return _ACTIVE.get()


@contextlib.contextmanager
def use_feature_map(feature_map: "Performer | None") -> Iterator[None]:
    """Within the block, `backend="performer"` uses `feature_map` (None: no change)."""
    if feature_map is None:
        yield
        return
    if not isinstance(feature_map, Performer):
        raise TypeError(f"feature_map must be a qkv.backends.linear.Performer, got {type(feature_map).__name__}")
    token = _ACTIVE.set(feature_map)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


class Performer:
    """FAVOR+ positive orthogonal random features (Choromanski et al. 2021).

    phi(x) = exp(W x - |x|^2 / 2) / sqrt(m), W (m x D): rows drawn in blocks of D
    mutually orthogonal directions (QR of a Gaussian matrix), each row rescaled by
    an independent chi(D)-distributed norm, so every row is marginally N(0, I) and
    E[phi(x)^T phi(y)] = exp(x . y). The attention backend applies it to
    sqrt(scale) * q and sqrt(scale) * k, estimating exp(q . k * scale).

    For stability a constant is subtracted from the exponent before exp, as the
    paper's implementations do: per query row its own max (it cancels between
    numerator and denominator of that row), for the keys one max over all keys
    and features of a (batch, head) (it cancels in every sum over keys, causal
    prefixes included). The recurrent cache keeps a running max instead.

    Args:
        n_features: m >= 1; the estimate's variance falls as 1/m.
        seed: the draw is a function of (seed, number of redraws, D): reproducible.

    `redraw()` replaces the projection by a fresh, independent one (the paper
    redraws periodically during training); `draws` counts them.
    """

    def __init__(self, n_features: int = 256, *, seed: int = 0):
        self.n_features = check_int("n_features", n_features, 1)
        self.seed = check_int("seed", seed, 0)
        self.draws = 0
        self._drawn: dict[int, torch.Tensor] = {}           # D -> (m, D) float64 on the CPU
        self._converted: dict[tuple, torch.Tensor] = {}     # (D, device, dtype) -> (m, D)

    def redraw(self, seed: int | None = None) -> "Performer":
        """Draw new random features (from a new seed if given); returns self."""
        if seed is not None:
            self.seed = check_int("seed", seed, 0)
        self.draws += 1
        self._drawn.clear()
        self._converted.clear()
        return self

    def use(self):
        """Context manager: `backend="performer"` calls inside the block use this feature map."""
        return use_feature_map(self)

    def projection(self, D: int, device=None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The (n_features, D) matrix W for head dim D (drawn on first use, then cached)."""
        D = check_int("D", D, 1)
        if D not in self._drawn:
            self._drawn[D] = self._draw(D)
        key = (D, str(torch.device(device) if device is not None else torch.device("cpu")), dtype)
        if key not in self._converted:
            self._converted[key] = self._drawn[D].to(device=device, dtype=dtype)
        return self._converted[key]

    def _draw(self, D: int) -> torch.Tensor:
        state = np.random.SeedSequence([self.seed, self.draws, D]).generate_state(2)
        g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        m = self.n_features
        a = torch.randn(-(-m // D), D, D, generator=g, dtype=torch.float64)   # one Gaussian matrix per block
        qm, r = torch.linalg.qr(a)
        sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
        qm = qm * torch.where(sign == 0, torch.ones_like(sign), sign)[:, None, :]   # Haar-distributed
        w = qm.transpose(-1, -2).reshape(-1, D)[:m]                          # (m, D): blocks of D orthonormal rows
        norms = torch.randn(m, D, generator=g, dtype=torch.float64).norm(dim=1, keepdim=True)  # chi(D)
        return w * norms

    def exponent(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """log(phi * sqrt(m)) of sqrt(scale) * x: W x' - |x'|^2 / 2, (..., D) -> (..., m)."""
        xs = x * math.sqrt(scale)
        w = self.projection(x.shape[-1], x.device, x.dtype)
        return torch.matmul(xs, w.T) - 0.5 * (xs * xs).sum(-1, keepdim=True)

    def query_features(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        """phi(sqrt(scale) q), each row divided by a constant of its own (cancels in the output).

        The row max is not detached: the output does not depend on it, and letting autograd
        subtract its path per feature cancels the -|q|^2 / 2 term's gradient exactly. Detached,
        that term's gradient is weighted by a sum that is 0 only in exact arithmetic, and float32
        dq came out ~75x further from the oracle than the textbook form's (qkv selftest)."""
        e = self.exponent(q, scale)
        return torch.exp(e - e.amax(dim=-1, keepdim=True)) / math.sqrt(self.n_features)

    def key_features(self, k: torch.Tensor, scale: float) -> torch.Tensor:
        """phi(sqrt(scale) k) for k (B, H, L, D), divided by one constant per (B, H).

        Not detached either, for the same reason as the query row max: where a (batch, head)
        has a single key, its path cancels the -|k|^2 / 2 term's gradient exactly (detached,
        float32 dk of one key came out ~45x further from the oracle than the textbook forms')."""
        e = self.exponent(k, scale)
        return torch.exp(e - e.amax(dim=(-1, -2), keepdim=True)) / math.sqrt(self.n_features)

    def __repr__(self):
        return f"Performer(n_features={self.n_features}, seed={self.seed}, draws={self.draws})"


# ----------------------------------------------------------------------------
# The computation, shared by both backends and the recurrent cache
# ----------------------------------------------------------------------------

class _Ratio(torch.autograd.Function):
    """out = num / den per row, with the backward written through `out`:
    d num = dout / den, d den = -(dout . out) / den. Autograd's own form, num / den^2,
    overflows once den^2 underflows, which FAVOR+ denominators reach (~1e-20) long
    before the ratio stops being meaningful."""

    @staticmethod
    def forward(ctx, num, den):
        # Rows with no key (den == 0), or whose denominator fell below ~1e-31 in float32
        # (tiny ** 0.8: 1 / den then stays within range for the backward's products),
        # give zeros and zero gradients. Dividing them by +inf does it in the division's
        # own pass (a NaN in num still shows).
        small = den < torch.finfo(den.dtype).tiny ** 0.8
        safe = torch.where(small, torch.full_like(den, float("inf")), den)
        out = num / safe.unsqueeze(-1)
        ctx.save_for_backward(out, safe)
        return out

    @staticmethod
    def backward(ctx, dout):
        out, safe = ctx.saved_tensors
        dnum = dout / safe.unsqueeze(-1)
        dden = -(dout * out).sum(-1) / safe
        return dnum, dden


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num (..., Dv) / den (...); rows with no key (den == 0 or below ~tiny ** 0.8) give zeros
    (`_Ratio`). So do rows whose denominator underflowed: FAVOR+ features of far-apart
    queries and keys at logits of ~1e2 and more."""
    return _Ratio.apply(num, den)


def apply_state(fq: torch.Tensor, S: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """fq (B, Hkv, G, n, M) against one state S (B, Hkv, M, Dv), z (B, Hkv, M): (B, Hkv, G, n, Dv)."""
    B, Hkv, G, n, M = fq.shape
    rows = fq.reshape(B, Hkv, G * n, M)
    num = torch.matmul(rows, S)                                              # (B, Hkv, G*n, Dv)
    den = torch.matmul(rows, z.unsqueeze(-1)).squeeze(-1)                    # (B, Hkv, G*n)
    return _ratio(num, den).view(B, Hkv, G, n, S.shape[-1])


def kernel_attention(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, *, causal: bool, q_offset: int = 0,
                     chunk: int = DEFAULT_CHUNK, state=None, return_state: bool = False):
    """Kernelised attention from features: fq (B, Hkv, G, Lq, M), fk (B, Hkv, Lk, M), v (B, Hkv, Lk, Dv).

    Returns out (B, Hkv, G, Lq, Dv), and with `return_state` also (S, z): the sums over
    every key (plus `state`). `state` = (S0 (B, Hkv, M, Dv), z0 (B, Hkv, M)) holds keys
    seen before this call, visible to every query (recurrent decoding).
    Causal: query row r (position q_offset + r) sees keys 0..q_offset + r.
    """
    B, Hkv, G, Lq, M = fq.shape
    Lk, Dv = fk.shape[2], v.shape[-1]
    S0, z0 = state if state is not None else (None, None)
    if not causal:
        S = torch.matmul(fk.transpose(-1, -2), v)                            # (B, Hkv, M, Dv)
        z = fk.sum(2)                                                        # (B, Hkv, M)
        if S0 is not None:
            S, z = S + S0, z + z0
        out = apply_state(fq, S, z)
        return (out, (S, z)) if return_state else out

    C = max(1, min(int(chunk), Lk))               # a short call needs no padding to a whole chunk
    nC = -(-Lk // C)
    pad = nC * C - Lk
    fk_c = F.pad(fk, (0, 0, 0, pad)).view(B, Hkv, nC, C, M)                 # zero features: no contribution
    v_c = F.pad(v, (0, 0, 0, pad)).view(B, Hkv, nC, C, Dv)
    kv = torch.matmul(fk_c.transpose(-1, -2), v_c)                           # (B, Hkv, nC, M, Dv) per chunk
    zc = fk_c.sum(3)                                                         # (B, Hkv, nC, M)
    S_in, z_in = kv.cumsum(2), zc.cumsum(2)                                  # inclusive prefix over chunks
    S_ex = torch.cat([torch.zeros_like(kv[:, :, :1]), S_in[:, :, :-1]], 2)  # exclusive: keys before chunk c
    z_ex = torch.cat([torch.zeros_like(zc[:, :, :1]), z_in[:, :, :-1]], 2)
    S_tot = S_in[:, :, -1] if nC else kv.new_zeros(B, Hkv, M, Dv)
    z_tot = z_in[:, :, -1] if nC else zc.new_zeros(B, Hkv, M)
    if S0 is not None:
        S_ex, z_ex = S_ex + S0[:, :, None], z_ex + z0[:, :, None]
        S_tot, z_tot = S_tot + S0, z_tot + z0

    lo = min(Lq, max(0, -q_offset))               # rows [0, lo): position < 0, no key of this call
    hi = min(Lq, max(lo, Lk - q_offset))          # rows [lo, hi): 0 <= position < Lk; [hi, Lq): every key
    parts = []
    if lo:
        parts.append(apply_state(fq[:, :, :, :lo], S0, z0) if S0 is not None
                     else fq.new_zeros(B, Hkv, G, lo, Dv))
    if hi > lo:
        s, e = q_offset + lo, q_offset + hi       # positions of the middle rows
        cs, ce = s // C, (e - 1) // C + 1         # the chunks they fall in
        nc = ce - cs
        rows = F.pad(fq[:, :, :, lo:hi], (0, 0, s - cs * C, ce * C - e))     # (B, Hkv, G, nc*C, M) on the chunk grid
        rows = rows.view(B, Hkv, G, nc, C, M).permute(0, 1, 3, 2, 4, 5).reshape(B, Hkv, nc, G * C, M)
        num = torch.matmul(rows, S_ex[:, :, cs:ce])                          # (B, Hkv, nc, G*C, Dv) earlier chunks
        den = torch.matmul(rows, z_ex[:, :, cs:ce].unsqueeze(-1)).squeeze(-1)  # (B, Hkv, nc, G*C)
        a = torch.matmul(rows, fk_c[:, :, cs:ce].transpose(-1, -2))          # (B, Hkv, nc, G*C, C) within the chunk
        tril = torch.ones(C, C, dtype=torch.bool, device=fq.device).tril().repeat(G, 1)   # (G*C, C): key <= query
        a = a.masked_fill(~tril, 0.0)
        num = num + torch.matmul(a, v_c[:, :, cs:ce])
        den = den + a.sum(-1)
        mid = _ratio(num, den).view(B, Hkv, nc, G, C, Dv).permute(0, 1, 3, 2, 4, 5)
        mid = mid.reshape(B, Hkv, G, nc * C, Dv)[:, :, :, s - cs * C: e - cs * C]
        parts.append(mid)
    if Lq > hi:
        parts.append(apply_state(fq[:, :, :, hi:], S_tot, z_tot))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=3)
    return (out, (S_tot, z_tot)) if return_state else out


def implied_weights(q: torch.Tensor, k: torch.Tensor, *, feature_map="linear", causal: bool = False,
                    scale: float | None = None, q_offset: int | None = None) -> torch.Tensor:
    """The (B, Hq, Lq, Lk) weights kernelised attention implies: phi(q_i)^T phi(k_j) / sum_j' (same).

    For inspection of small inputs: this materialises the Lq x Lk matrix the
    backends avoid. `feature_map` is "linear" or a `Performer`; returned in
    float32 (float64 for float64 inputs).
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc = q.to(cdt), k.to(cdt)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if isinstance(feature_map, Performer):
        fq, fk = feature_map.query_features(qc, scale), feature_map.key_features(kc, scale)
    elif feature_map == "linear":
        fq, fk = elu_features(qc), elu_features(kc)
    else:
        raise ValueError(f"feature_map must be 'linear' or a Performer, got {feature_map!r}")
    fk = fk.repeat_interleave(Hq // Hkv, dim=1)                             # (B, Hq, Lk, M)
    a = torch.matmul(fq, fk.transpose(-1, -2))                              # (B, Hq, Lq, Lk)
    if causal:
        off = Lk - Lq if q_offset is None else q_offset
        pos = off + torch.arange(Lq, device=q.device)
        a = a.masked_fill(torch.arange(Lk, device=q.device)[None, :] > pos[:, None], 0.0)
    den = a.sum(-1, keepdim=True)
    return a / torch.where(den == 0, torch.ones_like(den), den)


# ----------------------------------------------------------------------------
# The backends
# ----------------------------------------------------------------------------

class _KernelBackend(Backend):
    """What `linear` and `performer` share: the refusals and the chunked computation."""

    chunk = DEFAULT_CHUNK

    def refusal(self, call: Call) -> str | None:
        if call.D == 0:
            return ("a head dim of 0 leaves kernelised attention no features (its weights would be 0 / 0); "
                    "softmax attention defines it (uniform weights): use an exact backend")
        if call.mask is not None and not is_causal(call.mask, nested=True):
            return (f"kernelised attention sums over every key or over a causal prefix, so it cannot express "
                    f"the mask {call.mask!r}; pass mask=None or causal=True, or use an exact backend "
                    f"(backend='tiled' skips the masked tiles)")
        if call.return_weights:
            return ("kernelised attention never forms the Lq x Lk weights (that is what makes it linear); "
                    "for the weights it implies use qkv.backends.linear.implied_weights(q, k, ...) (O(L^2)), "
                    "for softmax weights an exact backend")
        if call.sinks is not None:
            return ("kernelised attention has no softmax denominator for a sink to join (sinks=); "
                    "use an exact backend")
        if call.return_lse:
            return "kernelised attention has no softmax, so no log-sum-exp; use an exact backend for return_lse"
        if call.score_mod is not None:
            return "kernelised attention cannot add a score_mod (the scores are never formed); use an exact backend"
        return super().refusal(replace(call, mask=None))

    def features(self, call: Call, cdt: torch.dtype):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, call: Call):
        cdt = call.stat_dtype                                                # float32 for half inputs
        fq, fk = self.features(call, cdt)                                    # (B, Hq, Lq, M), (B, Hkv, Lk, M)
        fq = fq.view(call.B, call.Hkv, call.G, call.Lq, fq.shape[-1])        # GQA: query heads of one kv head
        out = kernel_attention(fq, fk, call.v.to(cdt), causal=call.mask is not None, q_offset=call.q_offset,
                               chunk=self.chunk)                             # (B, Hkv, G, Lq, Dv)
        return out.reshape(call.B, call.Hq, call.Lq, call.Dv).to(call.dtype), None, None


class LinearBackend(_KernelBackend):
    name = "linear"
    capabilities = Capabilities(
        devices=("any",), dtypes=FLOATS, masks=False, score_mod=False, dropout=False, gqa=True,
        backward=True, return_lse=False, return_weights=False, exact=False, auto=False,
        notes="approximate: elu+1 feature map, O(L); mask None or causal only; scale not used (default only)",
    )

    def extra_refusal(self, call: Call) -> str | None:
        default = 1.0 / math.sqrt(call.D) if call.D > 0 else 1.0
        if not math.isclose(call.scale, default, rel_tol=1e-12):
            return (f"linear attention phi(q)^T phi(k) has no temperature, so scale={call.scale} would be "
                    f"ignored; leave scale=None (or multiply q by it yourself)")
        return None

    def features(self, call: Call, cdt):
        return elu_features(call.q.to(cdt)), elu_features(call.k.to(cdt))


class PerformerBackend(_KernelBackend):
    name = "performer"
    capabilities = Capabilities(
        devices=("any",), dtypes=FLOATS, masks=False, score_mod=False, dropout=False, gqa=True,
        backward=True, return_lse=False, return_weights=False, exact=False, auto=False,
        notes="approximate: FAVOR+ random features estimate softmax, O(L); mask None or causal only",
    )

    def __init__(self):
        self.feature_map = Performer(256, seed=0)   # used unless a feature map is made current

    def extra_refusal(self, call: Call) -> str | None:
        if call.scale < 0:
            return f"random features estimate exp(scale * q.k) through sqrt(scale); scale={call.scale} is negative"
        return None

    def active(self) -> Performer:
        return current_feature_map() or self.feature_map

    def features(self, call: Call, cdt):
        fm = self.active()
        return fm.query_features(call.q.to(cdt), call.scale), fm.key_features(call.k.to(cdt), call.scale)


# ----------------------------------------------------------------------------
# The layer option
# ----------------------------------------------------------------------------

ATTENTION_KINDS = ("exact", "linear", "performer")


def layer_choice(attention, backend: str, *, dropout: float, alibi: bool):
    """(kind, feature map or None, backend) for `MultiHeadAttention(attention=..., backend=...)`.

    "exact" keeps the backend as given; "linear" and "performer" (or a `Performer`
    object, which the layer then owns; the string gives a new Performer(256, seed=0))
    select their backend and refuse what it cannot do.
    """
    if isinstance(attention, Performer):
        kind, fm = "performer", attention
    elif isinstance(attention, str) and attention in ATTENTION_KINDS:
        kind = attention
        fm = Performer() if kind == "performer" else None
    else:
        raise ValueError(f"attention must be one of {', '.join(map(repr, ATTENTION_KINDS))} or a "
                         f"qkv.backends.linear.Performer, got {attention!r}")
    if kind == "exact":
        return kind, None, backend
    if backend not in ("auto", kind):
        raise ValueError(f"attention={kind!r} runs on the {kind!r} backend; leave backend='auto' "
                         f"(got backend={backend!r})")
    if dropout:
        raise ValueError(f"attention={kind!r} forms no attention weights to drop out; use dropout=0")
    if alibi:
        raise ValueError(f"attention={kind!r} cannot add ALiBi's score bias (the scores are never formed); "
                         f"use alibi=False (RoPE works: it rotates q and k)")
    return kind, fm, kind
