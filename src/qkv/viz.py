"""Pictures of attention: PNG heatmaps, mask/tile pictures and a self-contained HTML viewer.

Legend: H heads, Lq query length, Lk key length, nQ/nK tiles along the queries/keys,
bq/bk tile height/width; for images: B batch, C channels, H x W image pixels, p patch,
gh x gw patch grid, P = gh * gw patches, N = P + 1 tokens with CLS, d model width.

Everything here takes plain arrays (NumPy arrays or torch tensors, on any device),
however the weights were captured::

    import qkv
    from qkv import viz

    q = k = v = torch.randn(1, 4, 6, 16)
    out, w = qkv.attention(q, k, v, causal=True, return_weights=True)   # w (1, 4, 6, 6)
    tokens = ["the", "dog", "fetches", "the", "stick", "."]

    viz.heatmap(w[0, 0], "head0.png", x_labels=tokens, y_labels=tokens, title="layer 0, head 0")
    viz.grid({"layer 0": w[0]}, "heads.png", labels=tokens)           # layers x heads small maps
    viz.mask_picture(qkv.masks.sliding_window(16), 64, 64, "window.png", tile=(16, 16))
    viz.html({"layer 0": w[0]}, tokens, "attention.html")             # open it in any browser

    # a vision transformer (qkv.models.ViT): attention over the patches, drawn over the image
    ia = qkv.inspect.image_attention(vit, images)                     # images (B, C, H, W)
    viz.image_grid(images[0], ia.maps[0], "heads.png")                # layers x heads over the image
    viz.rollout_picture(images[:4], ia.rollout[:4], "rollout.png")    # a few images and their rollout
    viz.image_report(vit, "digit.png", "runs/viz")                    # a PNG/JPEG: PNGs + the image view

PNGs are drawn with matplotlib's Agg canvas (no window, no global pyplot state).
The HTML file holds its data, script and style inline and loads nothing, so it
works from a file:// URL with no network. Every file is written atomically
(a temporary file in the same directory, then `os.replace`).
"""

from __future__ import annotations

import functools
import html as _html
import json
import math
import os
import re
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from qkv import masks as M
from qkv._util.checks import check_int
from qkv._util.files import write_atomic
from qkv.reference import Trace

__all__ = ["heatmap", "grid", "mask_picture", "html", "trace_picture", "attention_report", "format_focus",
           "token_label", "find_token", "heatmap_figsize", "grid_figsize",
           "image_grid", "rollout_picture", "image_html", "image_report", "read_image", "overlay",
           "image_grid_figsize", "rollout_figsize",
           "MAX_DENSE", "MAX_HTML_WEIGHTS", "MAX_HTML_TOKENS"]

MAX_DENSE = 1 << 22            # mask_picture: largest Lq * Lk drawn element by element (2048 x 2048)
MAX_TILES = 1 << 18            # mask_picture: largest nQ * nK
MAX_HTML_WEIGHTS = 2_000_000   # html: layers x heads x Lq x Lk
MAX_HTML_TOKENS = 512          # html: tokens per side
MAX_GRID_SIDE = 64             # grid: layers, heads
HTML_SCALE = 10_000            # html stores round(weight * HTML_SCALE): 4 decimals

_TICKS = 48                    # heatmap: at most this many labels per axis
_LABEL_CHARS = 16              # longer labels are cut with an ellipsis

# mask_picture colours
_ALLOWED, _MASKED = "#1f3b73", "#ffffff"
_EMPTY_C, _PARTIAL_C, _FULL_C = "#cfcfcf", "#f0a202", "#2a9d6f"


# ----------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------

def _as_array(name: str, x, ndim: int, hint: str = "") -> np.ndarray:
    """`x` (NumPy array, torch tensor or nested list) as a finite float32 array with `ndim` dims."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.is_complex():
            raise TypeError(f"{name} must be real, got a tensor of dtype {x.dtype}")
        x = x.to("cpu", torch.float32).numpy()
    elif isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name} must be an array or tensor, got {type(x).__name__}")
    a = np.asarray(x)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_) \
            or np.issubdtype(a.dtype, np.complexfloating):
        raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(a.shape)}"
                         + (f"; {hint}" if hint else ""))
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {tuple(a.shape)}); there is nothing to draw")
    a = a.astype(np.float32, copy=False)
    bad = ~np.isfinite(a)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} holds {int(bad.sum())} NaN/inf values (first at index {first}); attention "
                         "weights must be finite (a row whose keys are all masked gives NaN: fix the mask)")
    return a


def _labels(name: str, labels, n: int) -> list[str] | None:
    """`labels` as a list of `n` strings (numbers are allowed and printed), or None."""
    if labels is None:
        return None
    if isinstance(labels, (str, bytes)):
        raise TypeError(f"{name} must be a list of strings, not one string; split it into tokens first")
    try:
        labels = list(labels)
    except TypeError:
        raise TypeError(f"{name} must be a list of strings, got {type(labels).__name__}") from None
    out = []
    for i, t in enumerate(labels):
        if isinstance(t, torch.Tensor) and t.dim() == 0:
            t = t.item()
        if isinstance(t, np.generic):
            t = t.item()
        if isinstance(t, bool) or not isinstance(t, (str, int, float)):
            raise TypeError(f"{name}[{i}] must be a string (or a number), got {type(t).__name__} {t!r}")
        out.append(str(t))
    if len(out) != n:
        raise ValueError(f"{name} has {len(out)} entries but the weights have {n} positions on that axis")
    return out


def _path(path, suffixes: tuple[str, ...]) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise ValueError(f"path {str(p)!r} must end in {' or '.join(suffixes)}")
    return p


def _layers(maps, what: str = "maps") -> list[tuple[str, np.ndarray]]:
    """maps -> [(name, (H, Lq, Lk) float32)], all with the same Lq and Lk.

    Accepts {name: (H, Lq, Lk)}, a sequence of (H, Lq, Lk) arrays, or one (layers, H, Lq, Lk) array.
    """
    if isinstance(maps, Mapping):
        items = [(str(k), v) for k, v in maps.items()]
    elif isinstance(maps, (torch.Tensor, np.ndarray)):
        if maps.ndim != 4:
            raise ValueError(f"{what} as one array must be (layers, H, Lq, Lk), got shape {tuple(maps.shape)}; "
                             "or pass {layer_name: (H, Lq, Lk)}")
        items = [(f"layer {i}", maps[i]) for i in range(maps.shape[0])]
    elif isinstance(maps, Sequence) and not isinstance(maps, (str, bytes)):
        items = [(f"layer {i}", v) for i, v in enumerate(maps)]
    else:
        raise TypeError(f"{what} must be a dict {{layer_name: (H, Lq, Lk) array}}, a list of (H, Lq, Lk) arrays "
                        f"or one (layers, H, Lq, Lk) array; got {type(maps).__name__}")
    if not items:
        raise ValueError(f"{what} is empty: give at least one layer of weights (H, Lq, Lk)")
    out = []
    for name, v in items:
        a = _as_array(f"{what}[{name!r}]", v, 3, "each layer is (H, Lq, Lk): add a head axis with w[None], "
                      "or pick one batch row with w[0]")
        if out and a.shape[1:] != out[0][1].shape[1:]:
            raise ValueError(f"{what}[{name!r}] is (H, Lq, Lk) = {tuple(a.shape)} but {what}[{out[0][0]!r}] is "
                             f"{tuple(out[0][1].shape)}; every layer must have the same Lq and Lk")
        out.append((name, a))
    return out


def _short(s: str, n: int = _LABEL_CHARS) -> str:
    s = s if len(s) <= n else s[: n - 1] + "\u2026"
    # matplotlib reads text between two '$' as mathtext; a token is plain text
    return s.replace("$", r"\$")


def _thin(n: int, most: int) -> list[int]:
    """Tick positions: every position, or every step-th when there are more than `most`."""
    step = max(1, math.ceil(n / most))
    return list(range(0, n, step))


def _figure(w_in: float, h_in: float, dpi: int):
    # matplotlib (heavy) loads on the first picture, not on `import qkv.viz`
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w_in, h_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: Path, dpi: int) -> Path:
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


# ----------------------------------------------------------------------------
# Heatmaps
# ----------------------------------------------------------------------------

def _side(n: int) -> float:
    """Inches for one axis of a heatmap with n cells: ~0.3 in per cell, between 2.5 and 10."""
    return min(10.0, max(2.5, 0.3 * n))


def heatmap_figsize(Lq: int, Lk: int, *, labels: bool = True) -> tuple[float, float]:
    """(width, height) in inches of `heatmap`'s figure; the PNG is round(width * dpi) x round(height * dpi)."""
    margin = 1.6 if labels else 0.6
    return _side(Lk) + margin + 1.2, _side(Lq) + margin + 0.6


def heatmap(weights, path, *, x_labels: Sequence[str] | None = None, y_labels: Sequence[str] | None = None,
            title: str | None = None, dpi: int = 120, cmap: str = "viridis") -> Path:
    """Draw one head's weights (Lq, Lk) as a PNG: rows = queries (y_labels), columns = keys (x_labels).

    Labels are thinned to at most 48 per axis and cut at 16 characters. The colour
    scale runs from min(0, weights) to max(weights), with a colorbar. Returns the path.
    """
    w = _as_array("weights", weights, 2, "pass one head, e.g. weights[b, h] of a (B, H, Lq, Lk) tensor")
    Lq, Lk = w.shape
    xl, yl = _labels("x_labels", x_labels, Lk), _labels("y_labels", y_labels, Lq)
    dpi = check_int("dpi", dpi, 20)
    p = _path(path, (".png",))

    fig = _figure(*heatmap_figsize(Lq, Lk, labels=xl is not None or yl is not None), dpi)
    fig.set_layout_engine("constrained")
    ax = fig.add_subplot()
    lo, hi = min(0.0, float(w.min())), float(w.max())
    im = ax.imshow(w, cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1.0, interpolation="nearest", aspect="auto")
    fs = 9 if max(Lq, Lk) <= 32 else 7
    for labels, n, set_ticks, set_text in ((xl, Lk, ax.set_xticks, ax.set_xticklabels),
                                           (yl, Lq, ax.set_yticks, ax.set_yticklabels)):
        ticks = _thin(n, _TICKS)
        set_ticks(ticks)
        if labels is not None:
            set_text([_short(labels[i]) for i in ticks], fontsize=fs)
    if xl is not None:
        ax.tick_params(axis="x", labelrotation=90)
    ax.set_xlabel("key", fontsize=9)
    ax.set_ylabel("query", fontsize=9)
    if title:
        ax.set_title(_short(str(title), 80), fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.9, label="weight")
    return _save_png(fig, p, dpi)


MAX_TRACE_TOKENS = 24           # trace_picture: longest sentence drawn (values are written in the cells up to 12)


def trace_picture(trace, path, *, title: str | None = None, dpi: int = 110) -> Path:
    """Draw a `qkv.reference.Trace` (single-head attention, step by step) as one PNG.

    Top row: Q, K, V and the output (L x d, one row per token); bottom row: the
    raw scores Q K^T, the scaled scores, the masked scores (disallowed pairs
    hatched) and the softmax weights (L x L, rows = queries, columns = keys).
    Cells carry their values when L <= 12. Returns the path.
    """
    if not isinstance(trace, Trace):
        raise TypeError(f"trace must be a qkv.reference.Trace (from qkv.reference.explain), got {type(trace).__name__}")
    L = len(trace.tokens)
    if not 1 <= L <= MAX_TRACE_TOKENS:
        raise ValueError(f"a trace picture holds 1 to {MAX_TRACE_TOKENS} tokens, got {L}; "
                         f"use heatmap(trace.weights, ...) for longer sequences")
    dpi = check_int("dpi", dpi, 20)
    p = _path(path, (".png",))
    toks = [_short(t, 10) for t in trace.tokens]
    d_k = trace.Q.shape[1]
    top = [("Q = x W_q", trace.Q), ("K = x W_k", trace.K), ("V = x W_v", trace.V), ("output = weights V", trace.output)]
    bottom = [("raw scores Q K^T", trace.raw_scores), (f"scaled: / sqrt({d_k})", trace.scaled_scores),
              ("masked", np.where(trace.allowed, trace.masked_scores, np.nan)), ("softmax weights", trace.weights)]
    cell = 0.42 if L <= 12 else 0.26
    w_in = 4 * (max(L, d_k) * cell + 1.4) + 0.4
    h_in = 2 * (L * cell + 1.3) + 0.6
    fig = _figure(w_in, h_in, dpi)
    fig.set_layout_engine("constrained")
    axes = fig.subplots(2, 4)
    for row, panels in enumerate((top, bottom)):
        for col, (name, m) in enumerate(panels):
            ax = axes[row, col]
            m = np.asarray(m, dtype=np.float64)
            finite = m[np.isfinite(m)]
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            if name == "softmax weights":
                lo, hi = 0.0, max(hi, 1e-9)
            cmap = "viridis" if name == "softmax weights" else "coolwarm"
            if cmap == "coolwarm":                          # symmetric about zero
                lo, hi = -max(abs(lo), abs(hi), 1e-9), max(abs(lo), abs(hi), 1e-9)
            ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest", aspect="auto")
            if name in ("masked", "softmax weights") and not trace.allowed.all():
                for i, j in zip(*np.nonzero(~trace.allowed)):
                    ax.add_patch(_hatch(j, i))
            if L <= 12 and m.shape[1] <= 12:
                for i in range(m.shape[0]):
                    for j in range(m.shape[1]):
                        if np.isfinite(m[i, j]):
                            dark = name == "softmax weights" and m[i, j] < 0.6 * hi
                            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                                    color="white" if dark else "black")
            ax.set_title(name, fontsize=9)
            ax.set_yticks(range(L))
            ax.set_yticklabels(toks, fontsize=7)
            if row == 1:
                ax.set_xticks(range(L))
                ax.set_xticklabels(toks, fontsize=7, rotation=90)
            else:
                ax.set_xticks(range(m.shape[1]))
                ax.set_xticklabels([f"d{j}" for j in range(m.shape[1])], fontsize=6)
    if title:
        fig.suptitle(_short(str(title), 100), fontsize=11)
    return _save_png(fig, p, dpi)


def _hatch(j: int, i: int):
    from matplotlib.patches import Rectangle

    return Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="#999999", linewidth=0)


def grid_figsize(n_layers: int, n_heads: int, *, labels: bool = False) -> tuple[float, float]:
    """(width, height) in inches of `grid`'s figure."""
    cell = min(1.3, max(0.55, 9.0 / max(n_layers, n_heads)))
    extra = 0.7 if labels else 0.0
    return 1.1 + extra + n_heads * cell + 0.9, 0.8 + n_layers * cell + extra + 0.2


def grid(maps, path, *, labels: Sequence[str] | None = None, query_labels: Sequence[str] | None = None,
         title: str | None = None, dpi: int = 100, cmap: str = "viridis") -> Path:
    """A layers x heads grid of small maps (one shared colour scale), as a PNG.

    `maps`: {layer_name: (H, Lq, Lk)}, a list of (H, Lq, Lk) arrays, or one (layers, H, Lq, Lk)
    array; layers may have different head counts but share Lq and Lk. `labels` are the key
    tokens (and the query tokens unless `query_labels` is given); they are written along the
    left column and the bottom row, thinned to at most 8. Returns the path.
    """
    layers = _layers(maps)
    Lq, Lk = layers[0][1].shape[1:]
    kl = _labels("labels", labels, Lk)
    if query_labels is None and kl is not None and Lq != Lk:
        raise ValueError(f"labels has {Lk} key tokens but the maps have Lq = {Lq} queries: "
                         "pass query_labels for cross-attention")
    ql = _labels("query_labels", query_labels, Lq) if query_labels is not None else kl
    n_layers, n_heads = len(layers), max(a.shape[0] for _, a in layers)
    if n_layers > MAX_GRID_SIDE or n_heads > MAX_GRID_SIDE:
        raise ValueError(f"grid draws at most {MAX_GRID_SIDE} layers x {MAX_GRID_SIDE} heads, got {n_layers} x "
                         f"{n_heads}; pass a subset (e.g. every other layer) or one layer at a time")
    dpi = check_int("dpi", dpi, 20)
    p = _path(path, (".png",))

    has_labels = ql is not None or kl is not None
    w_in, h_in = grid_figsize(n_layers, n_heads, labels=has_labels)
    fig = _figure(w_in, h_in, dpi)
    extra = 0.7 if has_labels else 0.0
    left, right = (1.1 + extra) / w_in, 1.0 - 0.9 / w_in
    bottom, top = (0.2 + extra) / h_in, 1.0 - 0.8 / h_in
    gs = fig.add_gridspec(n_layers, n_heads, left=left, right=right, bottom=bottom, top=top,
                          wspace=0.08, hspace=0.08)
    hi = max(float(a.max()) for _, a in layers)
    lo = min(0.0, min(float(a.min()) for _, a in layers))
    im = None
    fs = 6
    for r, (name, a) in enumerate(layers):
        for h in range(n_heads):
            ax = fig.add_subplot(gs[r, h])
            ax.set_xticks([])
            ax.set_yticks([])
            if h >= a.shape[0]:
                ax.set_axis_off()
                continue
            im = ax.imshow(a[h], cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1.0,
                           interpolation="nearest", aspect="auto")
            if r == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(_short(name, 14), fontsize=8)
                if ql is not None:
                    ticks = _thin(Lq, 8)
                    ax.set_yticks(ticks, [_short(ql[i], 10) for i in ticks], fontsize=fs)
            if r == n_layers - 1 and kl is not None:
                ticks = _thin(Lk, 8)
                ax.set_xticks(ticks, [_short(kl[i], 10) for i in ticks], fontsize=fs, rotation=90)
    cax = fig.add_axes((right + 0.15 / w_in, bottom, 0.15 / w_in, top - bottom))
    fig.colorbar(im, cax=cax, label="weight")
    fig.suptitle(_short(str(title), 100) if title else f"{n_layers} layers x {n_heads} heads, "
                 f"Lq = {Lq}, Lk = {Lk} (rows: queries, columns: keys)", fontsize=10)
    return _save_png(fig, p, dpi)


# ----------------------------------------------------------------------------
# Masks and their tiles
# ----------------------------------------------------------------------------

def mask_picture(mask, Lq: int, Lk: int, path, *, tile: int | tuple[int, int] = (16, 16),
                 q_offset: int | None = None, batch: int = 0, head: int = 0, dense: bool = True,
                 title: str | None = None, dpi: int = 110) -> Path:
    """Draw a mask and its BlockMask tiles as a PNG.

    Left: the dense allowed pattern (dark = may attend), with the tile grid. Right (or
    alone with `dense=False`): each (bq x bk) tile as the library classifies it,
    `mask.block_mask(...)`: EMPTY (skipped, grey), PARTIAL (mask applied, amber) or FULL
    (no mask needed, green). `mask` is a qkv mask, a callable (b, h, q_idx, kv_idx) -> bool
    or a bool tensor; `batch`/`head` pick the row and head of masks that depend on them.
    The tiled backend's tiles are `qkv.backends.tiled.DEFAULT_BLOCK`. Returns the path.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    Lq, Lk = check_int("Lq", Lq), check_int("Lk", Lk)
    bq, bk = (tile, tile) if isinstance(tile, int) and not isinstance(tile, bool) else tuple(tile)
    bq, bk = check_int("tile[0]", bq), check_int("tile[1]", bk)
    batch, head = check_int("batch", batch, 0), check_int("head", head, 0)
    dpi = check_int("dpi", dpi, 20)
    p = _path(path, (".png",))
    if dense and Lq * Lk > MAX_DENSE:
        side = int(math.isqrt(MAX_DENSE))
        raise ValueError(f"Lq * Lk = {Lq * Lk:,} is too many pairs to draw one by one (limit {MAX_DENSE:,}); "
                         f"pass dense=False to draw the tiles only, or a smaller size such as Lq = Lk = {side}")
    n_tiles = math.ceil(Lq / bq) * math.ceil(Lk / bk)
    if n_tiles > MAX_TILES:
        raise ValueError(f"{n_tiles:,} tiles of {bq} x {bk} are too many to draw (limit {MAX_TILES:,}); "
                         "pass a larger tile")
    m = M.as_mask(mask)
    q_offset = Lk - Lq if q_offset is None else int(q_offset)
    bm = m.block_mask(Lq, Lk, block=(bq, bk), q_offset=q_offset)
    if batch >= bm.B or head >= bm.H:
        raise ValueError(f"batch={batch}, head={head} is outside the mask's (B, H) = ({bm.B}, {bm.H})")
    kind = bm.kind[batch % bm.kind.shape[0], head % bm.kind.shape[1]].cpu().numpy()   # (nQ, nK) int8
    counts = {name: int((kind == v).sum()) for name, v in (("EMPTY", M.EMPTY), ("PARTIAL", M.PARTIAL),
                                                           ("FULL", M.FULL))}

    panel_w = 4.2
    panel_h = min(8.0, max(1.6, panel_w * Lq / Lk))
    n_panels = 2 if dense else 1
    w_in, h_in = 0.9 + n_panels * (panel_w + 0.7), panel_h + 1.9
    fig = _figure(w_in, h_in, dpi)
    bottom, top = 1.0 / h_in, 1.0 - 0.75 / h_in
    axes = []
    for i in range(n_panels):
        x0 = (0.9 + i * (panel_w + 0.7)) / w_in
        axes.append(fig.add_axes((x0, bottom, panel_w / w_in, top - bottom)))
    # tile edges; position p is drawn over [p - 0.5, p + 0.5] so integer ticks name rows and columns
    qe = q_offset + np.minimum(np.arange(kind.shape[0] + 1) * bq, Lq) - 0.5   # absolute query positions
    ke = np.minimum(np.arange(kind.shape[1] + 1) * bk, Lk) - 0.5
    x_lim, y_lim = (ke[0], ke[-1]), (qe[-1], qe[0])
    lines = kind.shape[0] <= 64 and kind.shape[1] <= 64

    if dense:
        d = m.to_dense(Lq, Lk, q_offset=q_offset)
        d = d[batch % d.shape[0], head % d.shape[1]].cpu().numpy()         # (Lq, Lk) bool
        ax = axes[0]
        ax.imshow(d, cmap=ListedColormap([_MASKED, _ALLOWED]), vmin=0, vmax=1, interpolation="nearest",
                  aspect="auto", extent=(*x_lim, *y_lim))
        if lines:
            ax.vlines(ke[1:-1], *y_lim, colors="#9a9a9a", linewidth=0.6)
            ax.hlines(qe[1:-1], *x_lim, colors="#9a9a9a", linewidth=0.6)
        ax.set_title(f"allowed pairs: {int(d.sum()):,} of {Lq * Lk:,}", fontsize=9)
        ax.set_xlabel("key position", fontsize=8)
        ax.set_ylabel("query position", fontsize=8)

    ax = axes[-1]
    ax.pcolormesh(ke, qe, kind, cmap=ListedColormap([_EMPTY_C, _PARTIAL_C, _FULL_C]), vmin=-0.5, vmax=2.5,
                  edgecolors="white" if lines else "none", linewidth=0.6 if lines else 0.0, antialiased=False)
    ax.set_xlim(*x_lim)
    ax.set_ylim(*y_lim)
    ax.set_title(f"{kind.shape[0]} x {kind.shape[1]} tiles of {bq} x {bk}: {bm.sparsity:.0%} "
                 "skipped", fontsize=9)
    ax.set_xlabel("key position", fontsize=8)
    if not dense:
        ax.set_ylabel("query position", fontsize=8)
    for a in axes:
        a.tick_params(labelsize=7)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.yaxis.set_major_locator(MaxNLocator(integer=True))
    handles = [Patch(facecolor=_EMPTY_C, label=f"EMPTY: skipped ({counts['EMPTY']})"),
               Patch(facecolor=_PARTIAL_C, label=f"PARTIAL: mask applied ({counts['PARTIAL']})"),
               Patch(facecolor=_FULL_C, label=f"FULL: no mask needed ({counts['FULL']})")]
    if dense:
        handles = [Patch(facecolor=_ALLOWED, label="may attend"),
                   Patch(facecolor=_MASKED, edgecolor="#999999", label="masked")] + handles
    fig.legend(handles=handles, loc="lower center", ncol=3 if not dense else 5, fontsize=7, frameon=False)
    fig.suptitle(_short(str(title), 100) if title else f"{_short(repr(m), 70)}   Lq = {Lq}, Lk = {Lk}",
                 fontsize=10)
    return _save_png(fig, p, dpi)


# ----------------------------------------------------------------------------
# HTML viewer
# ----------------------------------------------------------------------------

def _script_json(obj) -> str:
    """JSON safe inside a <script> element: '<', '>' and '&' only ever appear as \\u escapes."""
    text = json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def html(maps, tokens: Sequence[str], path, *, title: str | None = None,
         query_tokens: Sequence[str] | None = None) -> Path:
    """Write a self-contained HTML viewer of attention weights (no network, no external files).

    `maps` is {layer_name: (H, Lq, Lk)} (or a list of (H, Lq, Lk), or one (layers, H, Lq, Lk)
    array) of attention probabilities in [0, 1]; `tokens` are the Lk key tokens and, for
    self-attention, the queries too; for cross-attention pass the Lq `query_tokens`.

    The page has a head view (pick a layer and a head or all heads; queries on the left,
    keys on the right, line opacity = weight; hover a token to see only its lines, click to
    pin it) and a model view (layers x heads thumbnails; click one to open it in the head
    view). Weights are stored to 4 decimals. `window.qkvViewer` exposes select(layer, head),
    focus(side, index), show(view) and state(); the head-view canvas carries data-layer,
    data-head, data-focus and a data-drawn summary of its last drawing. Returns the path.
    """
    layers = _layers(maps)
    Lq, Lk = layers[0][1].shape[1:]
    toks = _labels("tokens", tokens, Lk)
    if toks is None:
        raise TypeError("tokens must be a list of Lk strings, got None")
    if query_tokens is None:
        if Lq != Lk:
            raise ValueError(f"the maps are cross-attention (Lq = {Lq} queries, Lk = {Lk} keys): pass the {Lq} "
                             "query_tokens")
        qtoks = toks
    else:
        qtoks = _labels("query_tokens", query_tokens, Lq)
    if max(Lq, Lk) > MAX_HTML_TOKENS:
        raise ValueError(f"the viewer draws at most {MAX_HTML_TOKENS} tokens per side, got Lq = {Lq}, Lk = {Lk}; "
                         "slice the sequence (e.g. w[..., :256, :256] and tokens[:256])")
    total = sum(a.size for _, a in layers)
    if total > MAX_HTML_WEIGHTS:
        raise ValueError(f"{total:,} weights (layers x heads x Lq x Lk) are too many for one page (limit "
                         f"{MAX_HTML_WEIGHTS:,}); pass fewer layers or heads, or a shorter sequence")
    for name, a in layers:
        lo, hi = float(a.min()), float(a.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"maps[{name!r}] holds values in [{lo:.4g}, {hi:.4g}]; the viewer shows attention "
                             "probabilities in [0, 1] (apply softmax to scores first, or use heatmap for raw scores)")
    title_s = "attention" if title is None else str(title)
    p = _path(path, (".html", ".htm"))

    data = {
        "version": 1,
        "title": title_s,
        "tokens": toks,
        "query_tokens": qtoks,
        "self_attention": query_tokens is None,
        "scale": HTML_SCALE,
        "layers": [{"name": name, "heads": int(a.shape[0]),
                    # (H, Lq, Lk) -> per head a flat row-major list of Lq * Lk ints, weight * scale
                    "weights": [np.rint(np.clip(a[h], 0.0, 1.0) * HTML_SCALE).astype(np.int32).ravel().tolist()
                                for h in range(a.shape[0])]}
                   for name, a in layers],
    }
    kind = "self-attention" if query_tokens is None else "cross-attention"
    meta = f"{len(layers)} layer{'s' * (len(layers) != 1)}, {kind}, {Lq} queries x {Lk} keys"
    parts = {"TITLE": _html.escape(title_s), "META": _html.escape(meta), "STYLE": _asset("style.css"),
             "SCRIPT": _asset("viewer.js"), "DATA": _script_json(data)}
    # one pass, so placeholder-like text inside the title or tokens is never substituted
    page = re.sub(r"%(TITLE|META|STYLE|SCRIPT|DATA)%", lambda m: parts[m.group(1)], _asset("page.html"))

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(page)

    return write_atomic(p, write)


# The viewer's page, style and script are package data (qkv/viz_assets/): page.html with the
# placeholders %TITLE% %META% %STYLE% %SCRIPT% %DATA%, style.css, and viewer.js, the script:
# plain ES5, no libraries. Token text only ever reaches the page through textContent, title
# attributes and canvas text, never as markup.


@functools.cache
def _asset(name: str) -> str:
    """The text of one file of qkv/viz_assets/ (read once per process)."""
    return (resources.files("qkv") / "viz_assets" / name).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------
# One sentence through a model: every picture at once
# ----------------------------------------------------------------------------

def token_label(token: str) -> str:
    """A readable label for a tokenizer's token string: byte-level BPE's 'Ġ' / 'Ċ'
    stand-ins become a space / '\\n', WordPiece's '##' continuation stays."""
    return token.replace("\u0120", " ").replace("\u010a", "\\n").replace("\u0109", "\\t") or "\u2205"


def find_token(labels: Sequence[str], word: str) -> int:
    """Index of the first label equal to `word` (case-insensitive, surrounding spaces
    and a leading '##' ignored); ValueError listing the labels if there is none."""
    key = word.strip().lower()
    for i, t in enumerate(labels):
        if t.strip().lower().removeprefix("##") == key:
            return i
    raise ValueError(f"no token {word!r} in the sentence; its tokens are {list(labels)}")


def attention_report(model, input_ids, labels: Sequence[str], out, *, layer: int | None = None,
                     head: int | None = None, focus: int | None = None, top: int = 3, title: str | None = None,
                     **model_kwargs) -> dict:
    """Capture every attention map of `model(input_ids, **model_kwargs)` (one sequence,
    `qkv.inspect`) and write under the folder `out`: heads.png (layers x heads grid),
    head.png (one head with token labels: `layer`, `head`, default the last layer's
    head 0), attention.html (the offline viewer). With `focus` (a token index), also
    the `top` tokens it attends to most in each layer (mean over heads) and the head
    that puts most weight on its favourite token. Returns the figures and paths.
    """
    # lazy: qkv.inspect brings the layers and models (torch.nn), which the pictures above never need
    from qkv import inspect as _inspect

    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"input_ids must be one sequence (L,) or (1, L), got {tuple(ids.shape)}")
    L = ids.shape[1]
    if len(labels) != L:
        raise ValueError(f"got {len(labels)} labels for {L} tokens")
    if L > MAX_HTML_TOKENS:
        raise ValueError(f"{L} tokens is too long for full-matrix pictures (at most {MAX_HTML_TOKENS}); shorten the "
                         f"text, or capture chosen rows with qkv.inspect.attention_maps(model, ids, rows=[...]) "
                         f"and draw them with viz.heatmap")
    if focus is not None and not (isinstance(focus, int) and 0 <= focus < L):
        raise ValueError(f"focus must be a token index in 0..{L - 1}, got {focus!r}")
    maps = _inspect.attention_maps(model, ids, **model_kwargs).to_numpy()          # {name: (H, L, L)}
    names = [n for n in maps if maps[n].shape[-2:] == (L, L)]                        # self-attention only
    if not names:
        raise ValueError("the model ran no self-attention over the sequence; nothing to draw")
    layer = len(names) - 1 if layer is None else layer
    if not isinstance(layer, int) or not -len(names) <= layer < len(names):
        raise ValueError(f"layer must be in 0..{len(names) - 1} (the model has {len(names)} attention layers), "
                         f"got {layer!r}")
    name = names[layer]
    n_heads = maps[name].shape[0]
    head = 0 if head is None else head
    if not isinstance(head, int) or not -n_heads <= head < n_heads:
        raise ValueError(f"head must be in 0..{n_heads - 1} (layer {layer} has {n_heads} heads), got {head!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shown = {f"layer {i}": maps[n] for i, n in enumerate(names)}       # short row titles; report["layers"] has the paths
    report: dict = {"tokens": list(labels), "layers": names, "heads": [int(maps[n].shape[0]) for n in names]}
    report["grid"] = str(grid(shown, out / "heads.png", labels=labels, title=title))
    report["head"] = str(heatmap(maps[name][head], out / "head.png", x_labels=labels, y_labels=labels,
                                 title=f"{name}, head {head % n_heads}"))
    report["html"] = str(html(shown, labels, out / "attention.html", title=title))
    if focus is not None:
        per_layer = []
        for i, n in enumerate(names):
            row = maps[n][:, focus, :]                                                # (H, L)
            mean = row.mean(axis=0)
            order = np.argsort(-mean, kind="stable")[:top]
            best_h = int(np.argmax(row.max(axis=1)))
            j = int(np.argmax(row[best_h]))
            per_layer.append({"layer": i, "name": n,
                              "top": [{"token": labels[k], "index": int(k), "weight": float(mean[k])} for k in order],
                              "strongest_head": {"head": best_h, "token": labels[j], "index": j,
                                                 "weight": float(row[best_h, j])}})
        report["focus"] = {"token": labels[focus], "index": focus, "per_layer": per_layer}
    return report


def format_focus(report: dict) -> str:
    """The focus part of `attention_report` as lines of text."""
    f = report["focus"]
    lines = [f"where {f['token']!r} (token {f['index']}) attends, per layer (mean over heads; strongest single head):"]
    for r in f["per_layer"]:
        tops = ", ".join(f"{t['token']!r} {t['weight']:.2f}" for t in r["top"])
        s = r["strongest_head"]
        lines.append(f"  layer {r['layer']}: {tops}   | head {s['head']}: {s['token']!r} {s['weight']:.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Images: attention over the patches of a vision transformer
# (legend: C channels, H x W image pixels, gh x gw patch grid, P = gh * gw, N tokens)
# ----------------------------------------------------------------------------

MAX_IMAGE_PIXELS = 1024 * 1024  # image pictures and the image viewer: largest H * W
MAX_IMAGES = 32                 # rollout_picture: images side by side


def _image_rgb(name: str, image) -> np.ndarray:
    """One image, (C, H, W), (H, W, C) with C in {1, 3}, or (H, W), as (H, W, 3) float in [0, 1]
    (scaled from its own min..max, so normalised inputs display too)."""
    a = _as_array(name, image, np.ndim(image) if not isinstance(image, torch.Tensor) else image.dim(),
                  "an image is (C, H, W), (H, W, C) or (H, W)")
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = np.moveaxis(a, 0, -1)                                       # channels first (as torch) wins a tie
    elif a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise ValueError(f"{name} must be one image (C, H, W), (H, W, C) with 1 or 3 channels, or (H, W); got "
                         f"shape {tuple(np.shape(image))} (pick one image of a batch with x[0])")
    if a.shape[0] * a.shape[1] > MAX_IMAGE_PIXELS:
        raise ValueError(f"{name} has {a.shape[0]} x {a.shape[1]} pixels, above the {MAX_IMAGE_PIXELS:,} drawn; "
                         "pass a smaller image")
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) / (hi - lo) if hi > lo else np.full_like(a, 0.5)
    return np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a


def _patch_map(name: str, amap) -> np.ndarray:
    return _as_array(name, amap, 2, "a map is one (gh, gw) patch grid: pick a layer and head, maps[b, l, h]")


def _upsample(m: np.ndarray, H: int, W: int) -> np.ndarray:
    """A (gh, gw) map spread over H x W pixels: each pixel takes the value of the patch it lies in."""
    gh, gw = m.shape
    return m[(np.arange(H) * gh) // H][:, (np.arange(W) * gw) // W]


def overlay(image, amap, *, alpha: float = 0.6, cmap: str = "inferno", vmin: float | None = None,
            vmax: float | None = None) -> np.ndarray:
    """The image (see `image_grid`) under a translucent heat map of `amap` (gh, gw), upsampled
    to the image's pixels: (H, W, 3) float in [0, 1], (1 - alpha) * image + alpha * cmap(t) with
    t = (amap - vmin) / (vmax - vmin) clipped to [0, 1] (default: the map's own min and max)."""
    from matplotlib import colormaps

    img = _image_rgb("image", image)
    m = _patch_map("amap", amap)
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    lo = float(m.min()) if vmin is None else float(vmin)
    hi = float(m.max()) if vmax is None else float(vmax)
    norm = np.clip((m - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(m)
    heat = colormaps[cmap](_upsample(norm, *img.shape[:2]))[..., :3]
    return (1.0 - alpha) * img + alpha * heat


def _query_patch(query, grid: tuple[int, int]):
    """`query` as a (row, col) patch to outline, or None (None, or the CLS token)."""
    if query is None:
        return None
    r, c = query
    if not (0 <= r < grid[0] and 0 <= c < grid[1]):
        raise ValueError(f"query patch {query} is outside the {grid[0]} x {grid[1]} patch grid")
    return int(r), int(c)


def _outline(ax, rc, grid, H, W) -> None:
    from matplotlib.patches import Rectangle

    r, c = rc
    ph, pw = H / grid[0], W / grid[1]
    ax.add_patch(Rectangle((c * pw - 0.5, r * ph - 0.5), pw, ph, fill=False, edgecolor="#00e5ff", linewidth=1.5))


def image_grid_figsize(n_layers: int, n_heads: int, H: int, W: int) -> tuple[float, float]:
    """(width, height) in inches of `image_grid`'s figure."""
    cell = min(1.6, max(0.6, 10.0 / max(n_layers, n_heads)))
    return 1.0 + n_heads * cell + 0.2, 0.8 + n_layers * cell * min(2.0, H / W) + 0.2


def image_grid(image, maps, path, *, query=None, alpha: float = 0.6, cmap: str = "inferno",
               shared: bool = False, title: str | None = None, dpi: int = 100) -> Path:
    """A layers x heads grid of one image under each head's attention map, as a PNG.

    `image`: (C, H, W) (C = 1 gray or 3 colour), (H, W, C) or (H, W), any range (drawn
    from its min..max). `maps`: {layer_name: (heads, gh, gw)}, a list of them, or one
    (layers, heads, gh, gw) array, e.g. `qkv.inspect.image_attention(...).maps[b]`. Each map
    is upsampled to the image's pixels (each pixel takes its patch's value) and drawn over
    the image (`overlay`), scaled from its own min to its max (`shared=True`: one scale for all).
    `query` (row, col) outlines the query patch. Returns the path.
    """
    img = _image_rgb("image", image)
    H, W = img.shape[:2]
    layers = _layers(maps)
    n_layers, n_heads = len(layers), max(a.shape[0] for _, a in layers)
    if n_layers > MAX_GRID_SIDE or n_heads > MAX_GRID_SIDE:
        raise ValueError(f"image_grid draws at most {MAX_GRID_SIDE} layers x {MAX_GRID_SIDE} heads, got "
                         f"{n_layers} x {n_heads}; pass a subset")
    grid_hw = layers[0][1].shape[1:]
    rc = _query_patch(query, grid_hw)
    dpi = check_int("dpi", dpi, 20)
    p = _path(path, (".png",))
    lo_all = min(float(a.min()) for _, a in layers) if shared else None
    hi_all = max(float(a.max()) for _, a in layers) if shared else None
    w_in, h_in = image_grid_figsize(n_layers, n_heads, H, W)
    fig = _figure(w_in, h_in, dpi)
    cell_w = (w_in - 1.2) / n_heads
    cell_h = (h_in - 1.0) / n_layers
    for r, (name, a) in enumerate(layers):
        for h in range(a.shape[0]):
            x0, y0 = (1.0 + h * cell_w) / w_in, 1.0 - (0.8 + (r + 1) * cell_h) / h_in
            ax = fig.add_axes((x0, y0, 0.94 * cell_w / w_in, 0.94 * cell_h / h_in))
            ax.imshow(overlay(img, a[h], alpha=alpha, cmap=cmap, vmin=lo_all, vmax=hi_all), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if rc is not None:
                _outline(ax, rc, grid_hw, H, W)
            if r == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(_short(name, 14), fontsize=8)
    scale = "one colour scale" if shared else "each map from its min to its max"
    fig.suptitle(_short(str(title), 100) if title else f"{n_layers} layers x {n_heads} heads over "
                 f"{grid_hw[0]} x {grid_hw[1]} patches ({scale})", fontsize=10)
    return _save_png(fig, p, dpi)


def rollout_figsize(n_images: int, H: int, W: int) -> tuple[float, float]:
    """(width, height) in inches of `rollout_picture`'s figure."""
    cell = min(1.8, max(0.9, 12.0 / n_images))
    return max(3.6, 0.3 + n_images * cell), 0.7 + 2 * cell * min(2.0, H / W) + 0.3


def rollout_picture(images, rollouts, path, *, labels: Sequence[str] | None = None, alpha: float = 0.6,
                    cmap: str = "inferno", title: str | None = None, dpi: int = 100) -> Path:
    """A few images side by side (top row) above their attention rollout (bottom row), as a PNG.

    `images` (B, C, H, W) (or a list of single images, see `image_grid`); `rollouts`
    (B, gh, gw), e.g. `qkv.inspect.image_attention(model, images).rollout`: each drawn over
    its image, scaled from its own min to its max. `labels` (B strings, e.g. "pred 3 (true 3)") title
    the columns. Returns the path.
    """
    imgs = [_image_rgb(f"images[{i}]", x) for i, x in enumerate(images)]
    rolls = _as_array("rollouts", rollouts, 3, "rollouts is (B, gh, gw), one map per image")
    if not imgs:
        raise ValueError("images is empty: give at least one image")
    if len(imgs) != rolls.shape[0]:
        raise ValueError(f"got {len(imgs)} images but {rolls.shape[0]} rollout maps; give one map per image")
    if len(imgs) > MAX_IMAGES:
        raise ValueError(f"rollout_picture draws at most {MAX_IMAGES} images side by side, got {len(imgs)}")
    names = _labels("labels", labels, len(imgs))
    dpi = check_int("dpi", dpi, 20)
    p = _path(path, (".png",))
    H, W = imgs[0].shape[:2]
    w_in, h_in = rollout_figsize(len(imgs), H, W)
    fig = _figure(w_in, h_in, dpi)
    cell = min(1.8, max(0.9, 12.0 / len(imgs)))
    cell_w, cell_h = cell, (h_in - 1.0) / 2
    x_start = (w_in - len(imgs) * cell) / 2
    for i, img in enumerate(imgs):
        for row, picture in enumerate((img, overlay(img, rolls[i], alpha=alpha, cmap=cmap))):
            x0, y0 = (x_start + i * cell_w) / w_in, 1.0 - (0.7 + (row + 1) * cell_h) / h_in
            ax = fig.add_axes((x0, y0, 0.94 * cell_w / w_in, 0.94 * cell_h / h_in))
            ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0 and names is not None:
                ax.set_title(_short(names[i], 20), fontsize=8)
    fig.suptitle(_short(str(title), 100) if title else "attention rollout (bottom) of each image (top)",
                 fontsize=10)
    return _save_png(fig, p, dpi)


def image_html(image, weights, path, *, grid: tuple[int, int], title: str | None = None, layer=0,
               head: int | None = None, query: int = 0, alpha: float = 0.6, cmap: str = "inferno",
               mean_heads: bool = False) -> Path:
    """Write the viewer's image view: one image under a vision transformer's attention (offline HTML).

    `image` as in `image_grid`; `weights` {layer_name: (heads, N, N)} (or a list, or one (layers,
    heads, N, N) array) of one image, every query row, e.g. `[w[b] for w in
    qkv.inspect.image_attention(...).weights]`; `grid` (gh, gw): the last gh * gw tokens are
    the patches (row by row), the N - P before them (the CLS token) lead. The page picks a
    layer (or the rollout over all layers, `qkv.inspect.rollout`), a head or the mean of
    the heads, and the query token (click a patch; a button for CLS) and draws the query's
    weights over the image. `layer`/`head`/`query` choose the first drawing (layer="rollout"
    too). `mean_heads=True` stores each layer's mean over its heads only (a page H times
    smaller; the head choice is then the mean). `window.qkvViewer` has select(layer, head), query(token or [row, col]), map(),
    weight(l, h, q, patch) and state(); #image-canvas carries data-layer, data-head,
    data-query and data-drawn. Returns the path.
    """
    from matplotlib import colormaps

    from qkv import inspect as _inspect              # lazy, as in attention_report

    img = _image_rgb("image", image)
    layers = _layers(weights, "weights")
    N = layers[0][1].shape[-1]
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise TypeError(f"grid must be the (gh, gw) patch grid, got {grid!r}")
    gh, gw = check_int("grid[0]", grid[0]), check_int("grid[1]", grid[1])
    lead = N - gh * gw
    if layers[0][1].shape[1] != N or lead < 0:
        raise ValueError(f"weights must be (heads, N, N) with N = leading tokens + gh * gw patches, got "
                         f"{tuple(layers[0][1].shape)} for the grid {tuple(grid)}")
    total = (len(layers) if mean_heads else sum(a.shape[0] for _, a in layers)) * N * gh * gw
    if total > MAX_HTML_WEIGHTS:
        raise ValueError(f"{total:,} weights (layers x heads x N x patches) are too many for one page (limit "
                         f"{MAX_HTML_WEIGHTS:,}); pass fewer layers, mean_heads=True, or a smaller image")
    if layer != "rollout":
        layer = check_int("layer", layer, -len(layers))
        if layer >= len(layers):
            raise ValueError(f"layer must be in 0..{len(layers) - 1} or 'rollout' ({len(layers)} layers), got {layer}")
        layer %= len(layers)
    if head is not None and not mean_heads:
        head = check_int("head", head, 0)
        if layer != "rollout" and head >= layers[layer][1].shape[0]:
            raise ValueError(f"head must be in 0..{layers[layer][1].shape[0] - 1}, got {head}")
    query = check_int("query", query, 0)
    if query >= N:
        raise ValueError(f"query must be a token index in 0..{N - 1}, got {query}")
    p = _path(path, (".html", ".htm"))
    roll = _inspect.rollout([torch.from_numpy(a[None].astype(np.float64)) for _, a in layers])[0].numpy()
    ints = lambda a: np.rint(np.clip(a[:, lead:], 0.0, 1.0) * HTML_SCALE).astype(np.int32).ravel().tolist()  # noqa: E731
    lut = np.rint(colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).astype(int).ravel().tolist()
    title_s = "attention over an image" if title is None else str(title)
    data = {"version": 1, "kind": "image", "title": title_s, "height": img.shape[0], "width": img.shape[1],
            "pixels": np.rint(img * 255).astype(int).ravel().tolist(), "grid": [gh, gw], "lead": lead,
            "scale": HTML_SCALE, "cmap": lut, "alpha": float(alpha),
            "layers": [{"name": n, "heads": 0, "weights": [ints(a.mean(0))]} if mean_heads else
                       {"name": n, "heads": int(a.shape[0]), "weights": [ints(a[h]) for h in range(a.shape[0])]}
                       for n, a in layers],
            "rollout": ints(roll), "start": {"layer": layer, "head": "mean" if head is None or mean_heads else head,
                                             "query": query}}
    meta = (f"{len(layers)} layer{'s' * (len(layers) != 1)}, {img.shape[0]} x {img.shape[1]} pixels, "
            f"{gh} x {gw} patches" + (f" + {lead} leading token{'s' * (lead != 1)}" if lead else ""))
    parts = {"TITLE": _html.escape(title_s), "META": _html.escape(meta), "STYLE": _asset("style.css"),
             "SCRIPT": _asset("image_viewer.js"), "DATA": _script_json(data)}
    page = re.sub(r"%(TITLE|META|STYLE|SCRIPT|DATA)%", lambda m: parts[m.group(1)], _asset("image_page.html"))
    return write_atomic(p, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))


def read_image(path, channels: int) -> torch.Tensor:
    """A PNG/JPEG (anything Pillow reads) as a float32 (1, C, H, W) tensor in [0, 1]: mode "L" for
    channels=1, "RGB" for 3, 8-bit pixels / 255 (a 16-bit grey PNG / 65535); its size unchanged.
    ValueError for a file Pillow cannot read (corrupt, truncated, not an image)."""
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise ValueError(f"images are read as grey (channels=1) or RGB (channels=3), not {channels} channels")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no image file {str(p)!r}")
    try:
        with Image.open(p) as im:
            im.load()
            if channels == 1 and im.mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.asarray(im, dtype=np.float64) / 65535.0
            else:
                a = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float64) / 255.0
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{str(p)!r} is not an image Pillow can read ({type(exc).__name__}: {exc}); pass a "
                         f"PNG or JPEG file") from None
    a = a[None] if a.ndim == 2 else np.moveaxis(a, -1, 0)                         # (C, H, W)
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None]


def image_report(model, image_path, out, *, layer: int | None = None, head: int | None = None, query=0,
                 title: str | None = None, mean=None, std=None) -> dict:
    """One image through a vision transformer (`qkv.models.ViT`): every picture at once.

    Reads `image_path` with `read_image` (grey or RGB as the model's channels, pixels / 255,
    so a digits model trained on sklearn's 0..16 / 16 sees the same range), optionally
    normalises ((x - mean) / std, per channel: Hugging Face checkpoints use 0.5 / 0.5), and
    runs `qkv.inspect.image_attention` for `query` (0 = CLS, a token index, or a (row, col)
    patch). The size must fit the model's patch (ValueError otherwise: nothing is resized);
    other sizes than the training size use interpolated positions. Writes under `out`:
    heads.png (layers x heads over the image), rollout.png (the rollout), attention.html
    (the image view; `layer`/`head` pick its first drawing; a model too large for every head on one
    page, e.g. ViT-B at 224 x 224, stores each layer's head mean). Returns the paths, the grid,
    and with a classifier head the predicted class and its probability.
    """
    from qkv import inspect as _inspect

    cfg = getattr(model, "config", None)
    channels = getattr(cfg, "channels", None)
    if channels not in (1, 3) or not callable(getattr(model, "grid", None)):
        raise TypeError(f"model must be a vision transformer (qkv.models.ViT) over 1 or 3 channels, got "
                        f"{type(model).__name__}")
    x = read_image(image_path, channels)
    try:
        model.grid(tuple(x.shape[-2:]))
    except ValueError as exc:
        raise ValueError(f"{str(image_path)!r} is {x.shape[-2]} x {x.shape[-1]} pixels, which the model cannot "
                         f"cut into patches: {exc} (the model was trained on {tuple(cfg.image_size)})") from None
    for name, v in (("mean", mean), ("std", std)):
        if v is not None:
            t = torch.as_tensor(v, dtype=torch.float32).reshape(-1, 1, 1)
            if t.shape[0] not in (1, channels) or (name == "std" and not (t > 0).all()):
                raise ValueError(f"{name} must be one number or {channels} (one per channel){', all > 0' * (name == 'std')}")
            x = x - t if name == "mean" else x / t
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        ia = _inspect.image_attention(model, x.to(param.device, param.dtype), query=query)
    finally:
        model.train(was_training)
    n_layers, n_heads = len(ia.weights), ia.weights[-1].shape[1]
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or not -n_layers <= layer < n_layers):
        raise ValueError(f"layer must be in 0..{n_layers - 1} (the model has {n_layers} layers), got {layer!r}")
    if head is not None and (isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < n_heads):
        raise ValueError(f"head must be in 0..{n_heads - 1} (the model has {n_heads} heads), got {head!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gh, gw = ia.grid
    rc = None if ia.query < ia.n_lead else divmod(ia.query - ia.n_lead, gw)
    shown = {f"layer {i}": ia.maps[0, i] for i in range(len(ia.layers))}
    report: dict = {"grid": (gh, gw), "layers": ia.layers, "heads": len(ia.heads), "query": ia.query,
                    "image_size": tuple(x.shape[-2:])}
    if cfg.num_classes is not None:
        probs = torch.softmax(ia.logits[0].double(), -1)
        report["prediction"], report["probability"] = int(probs.argmax()), float(probs.max())
    what = f"{Path(image_path).name}" + (f": predicted {report['prediction']}" if "prediction" in report else "")
    report["heads_png"] = str(image_grid(x[0], shown, out / "heads.png", query=rc, title=title or
                                         f"{what}; where {'CLS' if rc is None else f'patch {rc}'} looks"))
    report["rollout_png"] = str(rollout_picture(x, ia.rollout, out / "rollout.png", labels=[what[:20]],
                                                title=f"rollout of {'CLS' if rc is None else f'patch {rc}'}"))
    first = len(ia.layers) - 1 if layer is None else layer
    n_weights = sum(w.shape[1] for w in ia.weights) * ia.weights[0].shape[-1] * gh * gw
    report["html_heads"] = "mean" if n_weights > MAX_HTML_WEIGHTS else "all"
    report["html"] = str(image_html(x[0], [w[0] for w in ia.weights], out / "attention.html", grid=(gh, gw),
                                    title=title or what, layer=first, head=head, query=ia.query,
                                    mean_heads=report["html_heads"] == "mean"))
    return report
