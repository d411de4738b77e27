"""The recurrent state of kernelised attention (the `linear` and `performer` backends): running
sums instead of keys and values, constant size however long the sequence.

Legend: B batch, Hq query heads, Hkv key/value heads, n new tokens, D head dim, Dv value dim,
M features.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qkv._util.checks import check_int as _check_int
from qkv.backends.linear import Performer, apply_state, current_feature_map, elu_features, kernel_attention
from qkv.cache.base import LayerCache

__all__ = ["LinearStateCache"]


class LinearStateCache(LayerCache):
    """A kernelised-attention layer's decode state: constant size, O(1) per step in the context length.

    Causal kernelised attention needs from the past only the running sums
    (M features: D for "linear", n_features for a Performer; Dv value dim)::

        S (B, Hkv, M, Dv) = sum_j phi(k_j) v_j^T        z (B, Hkv, M) = sum_j phi(k_j)
        out_i = phi(q_i)^T (S + new keys up to i) / phi(q_i)^T (z + same)

    so no key or value is stored. `attention(q, k, v, backend=...)` adds the new
    tokens (n >= 1: a prompt is processed in chunks, as the backend does) and
    returns their outputs; `append(k, v)` adds without attending. Sequences of a
    batch may hold different lengths (tracked in `length`): the state does not
    depend on positions (RoPE, if any, is applied to q and k before).

    Args:
        feature_map: "linear" (elu + 1) or the layer's `qkv.backends.linear.Performer`
            (the same object: its random features define the state; a redraw makes the
            state stale, which the next step refuses).
        scale: the layer's scale (None: 1/sqrt(head_dim)); a Performer's features use it.
        value_dim: Dv (default head_dim).

    A Performer state keeps a running max `offset` (B, Hkv) of the keys' exponents:
    the sums are stored divided by exp(offset), rescaled when a larger one
    arrives, which cancels in the output as the backend's constant does.
    """

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, *, feature_map="linear",
                 scale: float | None = None, value_dim: int | None = None, dtype: torch.dtype = torch.float32,
                 device=None, _views=None):
        self.n_kv_heads, self.head_dim = _check_int("n_kv_heads", n_kv_heads, 1), _check_int("head_dim", head_dim, 1)
        self.value_dim = head_dim if value_dim is None else _check_int("value_dim", value_dim, 1)
        if isinstance(feature_map, Performer):
            self.kind, self.feature_map, M = "performer", feature_map, feature_map.n_features
            self._draw = (feature_map.seed, feature_map.draws)
        elif feature_map == "linear":
            self.kind, self.feature_map, M = "linear", None, head_dim
        else:
            raise ValueError(f"feature_map must be 'linear' or a qkv.backends.linear.Performer, got {feature_map!r}")
        self.scale = (1.0 / head_dim ** 0.5) if scale is None else float(scale)
        self.n_features = M
        if _views is not None:
            self.S, self.z, self.offset, self._lengths = _views
            return
        _check_int("batch", batch, 1)
        sdt = torch.float64 if dtype == torch.float64 else torch.float32     # sums over many tokens: >= fp32
        self.S = torch.zeros(batch, n_kv_heads, M, self.value_dim, dtype=sdt, device=device)  # (B, Hkv, M, Dv)
        self.z = torch.zeros(batch, n_kv_heads, M, dtype=sdt, device=device)                  # (B, Hkv, M)
        self.offset = (torch.full((batch, n_kv_heads), float("-inf"), dtype=sdt, device=device)
                       if self.kind == "performer" else None)                                  # (B, Hkv)
        self._lengths = torch.zeros(batch, dtype=torch.long)

    @property
    def nbytes(self) -> int:
        """Bytes of the state: the same after 10 tokens or 10 million."""
        return sum(t.numel() * t.element_size() for t in (self.S, self.z, self.offset) if t is not None)

    @property
    def bytes_per_token(self) -> int:
        return 0

    @property
    def used_bytes(self) -> int:
        return self.nbytes

    def check_room(self, n: int) -> None:
        return None                                   # a running sum never fills

    def row(self, b: int) -> "LinearStateCache":
        """Sequence b alone (B = 1), sharing this state."""
        fm = self.feature_map if self.kind == "performer" else "linear"
        view = LinearStateCache(1, self.n_kv_heads, self.head_dim, feature_map=fm, scale=self.scale,
                                value_dim=self.value_dim,
                                _views=(self.S[b:b + 1], self.z[b:b + 1],
                                        None if self.offset is None else self.offset[b:b + 1],
                                        self._lengths[b:b + 1]))
        if self.kind == "performer":
            view._draw = self._draw
        return view

    def read(self):
        raise ValueError("a LinearStateCache keeps running sums, not keys and values: there is nothing to read; "
                         "attend with cache.attention(q, k, v, backend=...) (or use a ContiguousCache for keys)")

    def _check_kv(self, k: Tensor, v: Tensor) -> int:
        for name, t, d in (("k", k, self.head_dim), ("v", v, self.value_dim)):
            if (not isinstance(t, Tensor) or t.dim() != 4 or t.shape[0] != self.batch
                    or t.shape[1] != self.n_kv_heads or t.shape[3] != d):
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name} must be (B={self.batch}, Hkv={self.n_kv_heads}, n, {d}) for this cache, "
                                 f"got {shape}")
        if k.shape[2] != v.shape[2]:
            raise ValueError(f"k and v must hold the same tokens, got {k.shape[2]} and {v.shape[2]}")
        return k.shape[2]

    def _check_map(self) -> None:
        if self.kind != "performer":
            return
        active = current_feature_map()
        if active is not None and active is not self.feature_map:
            raise ValueError("this cache was built for another Performer than the one in use; build it with the "
                             "layer's feature map (layer.feature_map)")
        if (self.feature_map.seed, self.feature_map.draws) != self._draw:
            raise ValueError("the Performer's features were redrawn after this state was built, so the state is "
                             "stale; start a new cache after redraw()")

    def _key_features(self, k: Tensor):
        """phi(k) (B, Hkv, n, M) and the factor (B, Hkv) that brings the stored sums to the same offset."""
        cdt = self.S.dtype
        if self.kind == "linear":
            return elu_features(k.to(cdt)), None, None
        e = self.feature_map.exponent(k.to(cdt), self.scale)                    # (B, Hkv, n, M)
        new = torch.maximum(self.offset, e.amax(dim=(-1, -2)).detach())         # (B, Hkv) running max
        fk = torch.exp(e - new[..., None, None]) / self.n_features ** 0.5
        return fk, torch.exp(self.offset - new), new                            # exp(-inf) = 0 for an empty state

    def _update(self, fk: Tensor, v: Tensor, rescale, new_offset, q: Tensor | None):
        S0, z0 = self.S, self.z
        if rescale is not None:
            S0, z0 = S0 * rescale[..., None, None], z0 * rescale[..., None]
        out = None
        if q is None:
            S = S0 + torch.matmul(fk.transpose(-1, -2), v)
            z = z0 + fk.sum(2)
        else:
            B, Hq, n, D = q.shape
            cdt = self.S.dtype
            if self.kind == "linear":
                fq = elu_features(q.to(cdt))
            else:
                fq = self.feature_map.query_features(q.to(cdt), self.scale)
            fq = fq.view(B, self.n_kv_heads, Hq // self.n_kv_heads, n, fq.shape[-1])
            if n == 1:                    # a decode step: add the token to the sums, read them once
                S = S0 + fk.transpose(-1, -2) @ v                                  # (B, Hkv, M, Dv)
                z = z0 + fk[:, :, 0]                                               # (B, Hkv, M)
                out = apply_state(fq, S, z)
            else:
                out, (S, z) = kernel_attention(fq, fk, v, causal=True, q_offset=0, state=(S0, z0),
                                               return_state=True)
            out = out.reshape(B, Hq, n, v.shape[-1]).to(q.dtype)
        self.S[...] = S
        self.z[...] = z
        if new_offset is not None:
            self.offset[...] = new_offset
        return out

    def append(self, k: Tensor, v: Tensor) -> None:
        """Add n tokens' keys and values (B, Hkv, n, D / Dv) to the sums."""
        n = self._check_kv(k, v)
        self._check_map()
        if n:
            fk, rescale, new = self._key_features(k)
            self._update(fk, v.to(self.S.dtype), rescale, new, None)
        self._lengths += n

    def attention(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, score_mod=None,
                  backend: str = "auto", sinks: Tensor | None = None) -> Tensor:
        """Add k, v (B, Hkv, n, D), then return the n new queries' outputs (B, Hq, n, Dv).

        Query i sees every earlier token and the new ones up to itself (causal).
        `backend` must name this cache's kind ("linear" or "performer"), as a layer
        with `attention=` does: an exact layer cannot decode from a kernel state.
        """
        n = self._check_kv(k, v)
        if backend != self.kind:
            raise ValueError(f"this cache holds a {self.kind!r} attention state and cannot serve backend={backend!r}; "
                             f"use it with a layer built with attention={self.kind!r} (or a ContiguousCache for "
                             f"exact attention)")
        if score_mod is not None:
            raise ValueError("kernelised attention cannot add a score_mod (the scores are never formed)")
        if sinks is not None:
            raise ValueError("kernelised attention has no softmax denominator for attention sinks to join; "
                             "use a ContiguousCache with an exact layer for sinks=")
        if scale is not None and abs(float(scale) - self.scale) > 1e-12 * max(1.0, abs(self.scale)):
            raise ValueError(f"this cache was built for scale={self.scale}, got scale={scale}; build it with the "
                             f"layer's scale")
        if (not isinstance(q, Tensor) or q.dim() != 4 or q.shape[0] != self.batch or q.shape[2] != n
                or q.shape[3] != self.head_dim or q.shape[1] % self.n_kv_heads):
            shape = tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__
            raise ValueError(f"q must be (B={self.batch}, Hq (a multiple of {self.n_kv_heads}), n={n}, "
                             f"D={self.head_dim}), got {shape}")
        self._check_map()
        if n == 0:
            return q.new_zeros(q.shape[0], q.shape[1], 0, self.value_dim)
        fk, rescale, new = self._key_features(k)
        out = self._update(fk, v.to(self.S.dtype), rescale, new, q)
        self._lengths += n
        return out
