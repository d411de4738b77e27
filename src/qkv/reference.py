"""The float64 oracle: attention in NumPy, one formula per line, no torch (but for your own mods).

Legend: B batch, Hq query heads, Hkv key/value heads, G = Hq // Hkv, Lq/Lk lengths,
D head dim, Dv value dim, d_model model width.

    Attention(Q, K, V) = softmax(mask(score_mod(Q K^T / sqrt(d_k)))) V

Every other path in qkv is tested against these functions. They compute in
float64 with plain NumPy, repeat K/V for GQA explicitly and materialise
everything: clear before fast. Masks and score mods are the same objects the
torch backends use (`qkv.masks`, `qkv.scores`), evaluated here on NumPy index
arrays, or dense boolean arrays; a plain callable is FlexAttention's mask_mod or
score_mod, evaluated per element in torch (float64 scores) as everywhere in qkv.

`explain(...)` keeps every intermediate of one computation (the trace of the
seeds' four steps) and prints it as tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qkv._util.mods import per_element

__all__ = [
    "softmax", "mask_array", "attention", "split_heads", "merge_heads", "linear",
    "multi_head_attention", "explain", "Trace",
]


def _f64(x) -> np.ndarray:
    """A float64 NumPy copy of an array-like (torch tensors are detached and moved to the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def softmax(x: np.ndarray, axis: int = -1):
    """Softmax along `axis`; rows with no finite entry (all -inf) give all-zero weights.

    Returns (weights, lse), where lse = log(sum(exp(x))) is -inf for such rows.
    """
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isneginf(m), 0.0, m)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        p = np.exp(x - m)
        s = np.sum(p, axis=axis, keepdims=True)
        w = p / np.where(s == 0, 1.0, s)
        lse = np.squeeze(m + np.log(s), axis=axis)
    return w, lse


def _grids(B: int, H: int, Lq: int, Lk: int, q_offset: int):
    """Broadcast index arrays (b, h, q_idx, kv_idx); queries sit at q_offset + row."""
    return (np.arange(B).reshape(B, 1, 1, 1), np.arange(H).reshape(1, H, 1, 1),
            (q_offset + np.arange(Lq)).reshape(1, 1, Lq, 1), np.arange(Lk).reshape(1, 1, 1, Lk))


def mask_array(mask, B: int, H: int, Lq: int, Lk: int, q_offset: int | None = None) -> np.ndarray:
    """Evaluate a mask on NumPy index grids: bool array of shape (B, H, Lq, Lk).

    `mask` is a `qkv.masks` mask (called on the NumPy grids), any other callable
    (b, h, q_idx, kv_idx) -> bool (FlexAttention's mask_mod: evaluated per element, in torch),
    or an array broadcastable to (B, H, Lq, Lk).
    """
    q_offset = Lk - Lq if q_offset is None else q_offset
    if callable(mask):
        out = np.asarray(per_element(mask, "mask_mod")(*_grids(B, H, Lq, Lk, q_offset)))
    else:
        out = np.asarray(_f64(mask) != 0 if hasattr(mask, "detach") else mask)
    if out.dtype != np.bool_:
        raise TypeError(f"a mask must give booleans (True = may attend), got {out.dtype}")
    return np.broadcast_to(out, (B, H, Lq, Lk))


def attention(q, k, v, *, mask=None, causal: bool = False, score_mod=None, scale: float | None = None,
              q_offset: int | None = None, return_stats: bool = False, sinks=None):
    """Scaled dot-product attention in float64.

    q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv); 2-D inputs (L, D) are
    treated as one batch and one head. Queries are the last Lq positions of the
    keys unless `q_offset` says where they start. Rows with no allowed key give
    zeros. With `return_stats` returns (out, lse, weights), else out.

    `sinks` (Hq,): attention sinks, as Hugging Face's GPT-OSS computes them: one more
    score column, sinks[h] in every row of head h, joins the softmax and carries no
    value. The weights returned are the Lk key columns (a row sums to less than 1) and
    lse is the log-sum-exp over the Lk + 1 entries; a row with no allowed key gives
    zeros, weights 0 and lse = sinks[h].
    """
    q, k, v = _f64(q), _f64(k), _f64(v)
    squeeze = q.ndim == 2
    if squeeze:
        q, k, v = q[None, None], k[None, None], v[None, None]
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    G = Hq // Hkv
    q_offset = Lk - Lq if q_offset is None else q_offset
    scale = 1.0 / np.sqrt(D) if scale is None else float(scale)

    # GQA: query head h reads key/value head h // G (the oracle simply repeats them)
    k = np.repeat(k, G, axis=1)                               # (B, Hq, Lk, D)
    v = np.repeat(v, G, axis=1)                               # (B, Hq, Lk, Dv)

    scores = np.einsum("bhqd,bhkd->bhqk", q, k) * scale      # (B, Hq, Lq, Lk)
    if score_mod is not None:
        modded = per_element(score_mod, "score_mod")(scores, *_grids(B, Hq, Lq, Lk, q_offset))
        scores = np.broadcast_to(np.asarray(modded, dtype=np.float64), scores.shape)
    allowed = np.ones((1, 1, Lq, Lk), dtype=bool)
    if mask is not None:
        allowed = allowed & mask_array(mask, B, Hq, Lq, Lk, q_offset)
    if causal:
        allowed = allowed & ((q_offset + np.arange(Lq))[:, None] >= np.arange(Lk)[None, :])
    scores = np.where(allowed, scores, -np.inf)
    if sinks is not None:                                     # the sink column: a logit with no value
        sink = np.broadcast_to(_f64(sinks).reshape(1, Hq, 1, 1), (B, Hq, Lq, 1))
        scores = np.concatenate([scores, sink], axis=-1)      # (B, Hq, Lq, Lk + 1)
    weights, lse = softmax(scores)
    weights = weights[..., :Lk]                               # (B, Hq, Lq, Lk): the keys' columns
    out = np.einsum("bhqk,bhkd->bhqd", weights, v)           # (B, Hq, Lq, Dv)
    if squeeze:
        out, lse, weights = out[0, 0], lse[0, 0], weights[0, 0]
    return (out, lse, weights) if return_stats else out


def split_heads(x: np.ndarray, n_heads: int) -> np.ndarray:
    """(B, L, H*D) -> (B, H, L, D)."""
    B, L, E = x.shape
    if E % n_heads:
        raise ValueError(f"width {E} is not divisible by {n_heads} heads")
    return x.reshape(B, L, n_heads, E // n_heads).transpose(0, 2, 1, 3)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """(B, H, L, D) -> (B, L, H*D): the heads' outputs concatenated."""
    B, H, L, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, L, H * D)


def linear(x, weight, bias=None) -> np.ndarray:
    """y = x W^T + b, with `weight` (out, in) as in torch.nn.Linear."""
    y = _f64(x) @ _f64(weight).T
    return y if bias is None else y + _f64(bias)


def multi_head_attention(x, w_q, w_k, w_v, w_o, *, n_heads: int, n_kv_heads: int | None = None,
                         context=None, b_q=None, b_k=None, b_v=None, b_o=None, mask=None,
                         causal: bool = False, score_mod=None, scale=None, return_weights: bool = False):
    """Multi-head attention: project, split heads, attend per head, concatenate, project out.

    x (B, Lq, d_model); `context` (B, Lk, d_kv) for cross-attention (default: x, self-attention).
    Weights follow torch.nn.Linear's (out, in) layout. With n_kv_heads < n_heads the
    key/value projections have n_kv_heads heads (GQA/MQA).
    """
    x = _f64(x)
    ctx = x if context is None else _f64(context)
    n_kv = n_heads if n_kv_heads is None else n_kv_heads
    q = split_heads(linear(x, w_q, b_q), n_heads)            # (B, Hq, Lq, D)
    k = split_heads(linear(ctx, w_k, b_k), n_kv)             # (B, Hkv, Lk, D)
    v = split_heads(linear(ctx, w_v, b_v), n_kv)             # (B, Hkv, Lk, Dv)
    out, _lse, w = attention(q, k, v, mask=mask, causal=causal, score_mod=score_mod, scale=scale,
                             return_stats=True)
    y = linear(merge_heads(out), w_o, b_o)                   # (B, Lq, d_model)
    return (y, w) if return_weights else y


# ----------------------------------------------------------------------------
# explain(): the whole computation, step by step
# ----------------------------------------------------------------------------

@dataclass
class Trace:
    """Every intermediate of single-head attention for one input sequence.

    Shapes: x (L, d_model); Q, K (L, d_k); V (L, d_v); the score and weight
    matrices (L, L), rows = queries, columns = keys; output (L, d_v).
    """

    tokens: list[str]
    x: np.ndarray
    Q: np.ndarray
    K: np.ndarray
    V: np.ndarray
    raw_scores: np.ndarray
    scale: float
    scaled_scores: np.ndarray
    masked_scores: np.ndarray
    weights: np.ndarray
    output: np.ndarray
    allowed: np.ndarray = field(repr=False)

    def most_attended(self) -> list[tuple[str, str, float]]:
        """For each token: (token, the token it attends to most, that weight)."""
        out = []
        for i, tok in enumerate(self.tokens):
            j = int(np.argmax(self.weights[i]))
            out.append((tok, self.tokens[j], float(self.weights[i, j])))
        return out

    def steps(self) -> list[tuple[str, str, np.ndarray, bool]]:
        """(title, why it matters, matrix, rows-and-columns-are-tokens) for each step."""
        d_k = self.Q.shape[-1]
        return [
            ("Q = x W_q", "what each token is looking for", self.Q, False),
            ("K = x W_k", "what each token offers to be found by", self.K, False),
            ("V = x W_v", "what each token hands over when attended to", self.V, False),
            ("step 1: raw scores Q K^T", "how well each query (row) matches each key (column)", self.raw_scores, True),
            (f"step 2: scaled scores / sqrt(d_k) = / {np.sqrt(d_k):.3f}",
             "keeps the softmax out of saturation as d_k grows", self.scaled_scores, True),
            ("masked scores", "disallowed pairs set to -inf", self.masked_scores, True),
            ("step 3: softmax weights", "each row is a probability distribution over keys", self.weights, True),
            ("step 4: output = weights V", "each token's new vector, a weighted mix of values", self.output, False),
        ]

    def table(self, matrix: np.ndarray, square: bool, digits: int = 3) -> str:
        cols = self.tokens if square else [f"d{j}" for j in range(matrix.shape[1])]
        return format_table(matrix, self.tokens, cols, digits)

    def __str__(self) -> str:
        parts = []
        for title, why, m, square in self.steps():
            if title == "masked scores" and self.allowed.all():
                continue
            parts.append(f"{title}  ({why})\n{self.table(m, square)}")
        lines = [f"  {t!r:>12} -> {u!r} ({w:.2f})" for t, u, w in self.most_attended()]
        parts.append("which token each token attends to most:\n" + "\n".join(lines))
        return "\n\n".join(parts)


def format_table(matrix: np.ndarray, rows: list[str], cols: list[str], digits: int = 3) -> str:
    """A plain-text table with row and column labels."""
    cells = [[("-inf" if np.isneginf(v) else f"{v:.{digits}f}") for v in row] for row in matrix]
    width = max([len(c) for c in cols] + [len(c) for r in cells for c in r] + [1])
    label_w = max(len(r) for r in rows) if rows else 0
    head = " " * label_w + " | " + " ".join(c.rjust(width) for c in cols)
    lines = [head, "-" * len(head)]
    for r, row in zip(rows, cells):
        lines.append(r.rjust(label_w) + " | " + " ".join(c.rjust(width) for c in row))
    return "\n".join(lines)


def explain(x, w_q, w_k, w_v, *, tokens: list[str] | None = None, mask=None, causal: bool = False,
            scale: float | None = None) -> Trace:
    """Single-head self-attention on one sequence, keeping every step.

    x (L, d_model); w_q, w_k (d_model, d_k) and w_v (d_model, d_v) multiply on the
    right (Q = x W_q), as the formula is usually written. `mask` is a bool (L, L)
    array or a qkv mask; `causal=True` adds the causal mask.
    """
    x = _f64(x)
    L = x.shape[0]
    tokens = list(tokens) if tokens is not None else [f"t{i}" for i in range(L)]
    if len(tokens) != L:
        raise ValueError(f"got {len(tokens)} tokens for {L} rows of x")
    Q, K, V = x @ _f64(w_q), x @ _f64(w_k), x @ _f64(w_v)
    scale = 1.0 / np.sqrt(Q.shape[-1]) if scale is None else float(scale)
    raw = Q @ K.T
    scaled = raw * scale
    allowed = np.ones((L, L), dtype=bool)
    if mask is not None:
        allowed &= mask_array(mask, 1, 1, L, L)[0, 0]
    if causal:
        allowed &= np.tril(np.ones((L, L), dtype=bool))
    masked = np.where(allowed, scaled, -np.inf)
    weights, _ = softmax(masked)
    return Trace(tokens, x, Q, K, V, raw, scale, scaled, masked, weights, weights @ V, allowed)
