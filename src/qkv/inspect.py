"""See what attention does: capture the weights of chosen layers, heads and query rows.

Legend: B batch, Hq query heads of a layer, Hkv its key/value heads, G = Hq // Hkv,
nh captured heads, R captured query rows, Lq / Lk query / key length of one attention
call, D head dim, T real tokens of a packed Encoder batch, L its padded length; for
images (a vision transformer, `qkv.models.ViT`): C x H x W images, p patch, gh x gw patch
grid, P = gh * gw patches, N = P + 1 tokens with CLS (N = P without), d model width.

    import qkv
    from qkv.inspect import attention_maps, capture

    with capture(model, layers=[0, -1], heads=[0, 1], rows=[-1]) as cap:
        logits = model(tokens)                    # runs as usual, on any backend; same output
    maps = cap.maps                               # AttentionMaps
    maps.names                                    # ["layers.0.self_attn", "layers.3.self_attn"]
    maps["layers.0.self_attn"]                    # (B, nh=2, R=1, Lk) float32 weights
    maps.stats()["layers.0.self_attn"]["entropy"] # (nh,) mean row entropy in nats
    maps.to_numpy()                               # {name: (nh, R, Lk) array of batch row 0}

    maps = attention_maps(model, tokens, rows=range(0, 100_000, 4096))   # one call does both
    [name for name, _ in qkv.inspect.attention_modules(model)]           # what `layers=` indexes

    # a vision transformer: where the CLS token (or a patch) looks, and the attention rollout
    ia = qkv.inspect.image_attention(vit, images, query=0)   # images (B, C, H, W)
    ia.maps                                       # (B, layers, heads, gh, gw): CLS column dropped
    ia.rollout                                    # (B, gh, gw): the query's row of rollout(...)
    qkv.inspect.rollout(ia.weights)               # (B, N, N) from per-layer (B, H, N, N) weights

How. Fast backends (sdpa, tiled) never materialise the weights, so capturing does not
ask them to: `MultiHeadAttention.forward` (and `qkv.nn.MultiheadAttention.forward`)
hand a hook the inputs of their attention call (q and k after RoPE, mask, causal,
score_mod with ALiBi, scale) and then run the call unchanged, so outputs are
bit-identical with and without a capture. The hook recomputes
softmax(mask(score_mod(q k^T * scale))) for the requested rows and heads only, a
bounded block of rows x Lk scores at a time (the row log-sum-exp is taken over the
whole row of each block), so the rows of a 100k-token sequence cost their own
R x Lk weights and a fixed working set, never Lq x Lk. When no capture is active the
hook is one context-variable lookup per attention call.

What is captured, per call of a selected attention module:

- weights (B, nh, R, Lk) in the statistics dtype (float32; float64 for a float64
  model), on the model's device, before dropout; query head h reads key/value head
  h // G (GQA); rows with no allowed key are all zeros.
- heads (nh,) and rows (R,): the query heads and query rows of the call, negative
  requests resolved (rows=[-1] is Lq - 1); positions (R,): the rows' absolute
  positions q_offset + row (bottom-right alignment, as `qkv.attention`), which the
  mean attended distance uses.

Entries are named by module path ("layers.0.self_attn"; a bare attention module by
its class name) and kept in call order. A module called several times inside one capture (shared weights, a model run twice)
gives one entry per call: "name", "name#1", "name#2", ... An `Encoder` that packs a
padded batch (packed=None/True) runs attention on one (1, T) sequence; its maps are
scattered back to the padded (B, .., L) layout (padded query rows are zeros, as the
packed run never computes them). A call that reads a KV cache (`cache=`) cannot be
captured: its keys live in the cache; run the model without the cache.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from qkv._util.checks import check_int
from qkv.backends import Call, make_call
from qkv.backends.math import safe_softmax
from qkv.hooks import ATTENTION_FINDERS, ATTENTION_HOOK
from qkv.layers import MultiHeadAttention
from qkv.masks import check_bool
from qkv.nn import MultiheadAttention

__all__ = ["capture", "attention_maps", "attention_modules", "head_stats", "AttentionMaps", "Capture",
           "rollout", "image_attention", "ImageAttention",
           "DEFAULT_MAX_CELLS"]

#: rows=None captures every query row only while Lq * Lk stays within this many weights
#: (per batch row and head); longer calls ask for `rows=`.
DEFAULT_MAX_CELLS = 4096 * 4096

# Scores computed at once while recomputing weights: B * heads * rows * Lk <= this
# (at least one row of one head): 16 MiB of float32 scores, whatever the sequence length.
_STEP_CELLS = 1 << 22



# -----------------------------------------------------------------------------
# Finding attention modules


def _attention_types() -> tuple[type, ...]:
    return (MultiHeadAttention, MultiheadAttention)


_FOUND_HEADS: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()  # layers found by finders


def _n_heads(module: nn.Module) -> int:
    if module in _FOUND_HEADS:
        return _FOUND_HEADS[module]
    return module.n_heads if hasattr(module, "n_heads") else module.num_heads


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The qkv attention modules of `model`, in `named_modules` order: [(name, module)].

    Names are module paths ("layers.0.self_attn"); a bare attention module is named
    after its class. Raises TypeError / ValueError when `model` holds none.
    """
    if not isinstance(model, nn.Module):
        hint = ("; for a qkv.embed.SentenceEncoder pass its .model" if isinstance(getattr(model, "model", None),
                                                                                  nn.Module) else "")
        raise TypeError(f"model must be a torch.nn.Module built from qkv attention layers, got "
                        f"{type(model).__name__}{hint}")
    types = _attention_types()
    found = [(name or type(m).__name__, m) for name, m in model.named_modules() if isinstance(m, types)]
    for finder in ATTENTION_FINDERS:            # other libraries' layers that call the hook
        for name, m, heads in finder(model):
            _FOUND_HEADS[m] = heads
            found.append((name, m))
    if not found:
        raise ValueError(f"{type(model).__name__} holds no qkv attention module (qkv.layers.MultiHeadAttention or "
                         f"qkv.nn.MultiheadAttention), so there is nothing to capture; build the model from "
                         f"qkv.layers / qkv.models (a Hugging Face decoder loads with qkv.models.hf.load)")
    return found


# -----------------------------------------------------------------------------
# Argument parsing


def _int_list(name: str, spec) -> list[int]:
    """An int, or an iterable / 1-D integer tensor of ints, as a list of Python ints."""
    if isinstance(spec, Tensor):
        if spec.dtype == torch.bool or spec.is_floating_point() or spec.is_complex() or spec.dim() > 1:
            raise TypeError(f"{name} must be an int or a 1-D sequence of ints, got a {spec.dtype} tensor of "
                            f"shape {tuple(spec.shape)}")
        return [int(x) for x in spec.reshape(-1).tolist()]
    items = [spec] if isinstance(spec, (int, np.integer)) else spec
    try:
        items = list(items)
    except TypeError:
        raise TypeError(f"{name} must be None, an int or a sequence of ints, got {type(spec).__name__}") from None
    for x in items:
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
            raise TypeError(f"{name} must hold ints, got {x!r} ({type(x).__name__})")
    return [int(x) for x in items]


def _resolve(name: str, idx: list[int], n: int, where: str) -> Tensor:
    """Indices in [-n, n) as a (len,) long tensor in [0, n)."""
    bad = [i for i in idx if not -n <= i < n]
    if bad:
        valid = f"0..{n - 1} (or -{n}..-1 from the end)" if n else "none (it is empty)"
        raise ValueError(f"{name} {bad[0]} is out of range for {where}; valid {name}s are {valid}")
    return torch.tensor([i % n for i in idx], dtype=torch.long)


def _select_layers(found: list[tuple[str, nn.Module]], layers) -> list[tuple[str, nn.Module]]:
    if layers is None:
        return found
    items = [layers] if isinstance(layers, (int, str, np.integer)) else layers
    try:
        items = list(items)
    except TypeError:
        raise TypeError(f"layers must be None, an int index, a name, or a list of them, got "
                        f"{type(layers).__name__}") from None
    names = [n for n, _ in found]
    listing = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    chosen: list[tuple[str, nn.Module]] = []
    for it in items:
        if isinstance(it, str):
            if it not in names:
                raise ValueError(f"no attention module named {it!r}; the model has {listing}")
            pick = found[names.index(it)]
        elif isinstance(it, (int, np.integer)) and not isinstance(it, (bool, np.bool_)):
            n = len(found)
            if not -n <= it < n:
                raise ValueError(f"layer index {int(it)} is out of range: the model has {n} attention module(s), "
                                 f"valid indices are 0..{n - 1} (or -{n}..-1): {listing}")
            pick = found[int(it)]
        else:
            raise TypeError(f"layers must hold int indices or module names, got {it!r} ({type(it).__name__})")
        if all(pick[1] is not m for _, m in chosen):
            chosen.append(pick)
    return chosen


# -----------------------------------------------------------------------------
# Recomputing weights for chosen rows


def _row_weights(call: Call, rows: Tensor, heads: Tensor, step_cells: int | None = None) -> Tensor:
    """softmax(mask(score_mod(q k^T * scale))) of query rows `rows` (R,) and query heads `heads` (nh,).

    Returns (B, nh, R, Lk) in the statistics dtype. Works a block of rows of the query
    heads that share one key/value head at a time, at most `step_cells` scores per block.
    With the call's sinks, the softmax takes the sink column too and keeps the Lk key
    columns, as `qkv.attention` defines its weights.
    """
    step_cells = _STEP_CELLS if step_cells is None else step_cells
    B, Lk, sd, dev = call.B, call.Lk, call.stat_dtype, call.device
    out = torch.zeros(B, len(heads), len(rows), Lk, dtype=sd, device=dev)        # (B, nh, R, Lk)
    if out.numel() == 0:
        return out
    rows_d = rows.to(dev)
    b_idx = torch.arange(B, device=dev).view(B, 1, 1, 1)
    kv_idx = torch.arange(Lk, device=dev).view(1, 1, 1, Lk)
    kv_heads = heads // call.G                                                   # (nh,) kv head of each
    with torch.no_grad():
        for j in torch.unique(kv_heads).tolist():
            sel = torch.nonzero(kv_heads == j).flatten()                         # (n,) captured heads reading j
            hs = heads[sel].to(dev)                                              # (n,) their query heads
            kt = call.k[:, j:j + 1].detach().to(sd).transpose(-1, -2)            # (B, 1, D, Lk)
            h_idx = hs.view(1, -1, 1, 1)
            step = max(1, step_cells // (B * len(hs) * Lk))
            for r0 in range(0, len(rows), step):
                r = rows_d[r0:r0 + step]                                         # (r,)
                qr = call.q.detach()[:, hs[:, None], r[None, :]].to(sd)          # (B, n, r, D)
                s = torch.matmul(qr, kt) * call.scale                            # (B, n, r, Lk)
                q_idx = (call.q_offset + r).view(1, 1, -1, 1)
                if call.score_mod is not None:
                    modded = call.score_mod(s, b_idx, h_idx, q_idx, kv_idx)
                    if not isinstance(modded, Tensor) or modded.shape != s.shape:
                        got = tuple(modded.shape) if isinstance(modded, Tensor) else type(modded).__name__
                        raise ValueError(f"score_mod must return a tensor of the score's shape {tuple(s.shape)}, "
                                         f"got {got}")
                    s = modded
                if call.mask is not None:
                    allowed = check_bool(call.mask(b_idx, h_idx, q_idx, kv_idx), call.mask, q_idx)
                    s = s.masked_fill(~allowed, float("-inf"))
                if call.sinks is not None:                                       # the sink column: no value
                    sink = call.sinks.detach()[hs].to(sd).view(1, -1, 1, 1).expand(B, -1, len(r), 1)
                    s = torch.cat([s, sink], dim=-1)                             # (B, n, r, Lk + 1)
                out[:, sel.to(dev), r0:r0 + len(r)] = safe_softmax(s)[0][..., :Lk]
    return out


# -----------------------------------------------------------------------------
# Statistics


def head_stats(weights: Tensor, positions: Tensor | None = None) -> dict[str, Tensor]:
    """Per-head statistics of captured weights (B, nh, R, Lk); `positions` (R,) of the rows.

    Returns {"entropy", "distance", "first_token"}, each (nh,) float64, averaged over
    the batch and the rows that attend to at least one key (NaN for a head without any):

    - entropy: -sum_j w_ij log w_ij, in nats (0 for one-hot rows, log n for uniform over n keys);
    - distance: sum_j w_ij |pos_i - j|, the mean distance attended (positions default 0..R-1);
    - first_token: w_i0, the weight on key 0 (attention sinks, BOS heads).
    """
    if not isinstance(weights, Tensor) or weights.dim() != 4:
        got = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"weights must be a (B, heads, rows, Lk) tensor, got {got}")
    B, nh, R, Lk = weights.shape
    pos = torch.arange(R) if positions is None else torch.as_tensor(positions)
    if pos.shape != (R,):
        raise ValueError(f"positions must be ({R},), one per row of weights, got {tuple(pos.shape)}")
    w = weights.detach().double()
    live = (w.sum(-1) > 0).double()                                              # (B, nh, R)
    dist = (pos.to(w.device).double()[:, None] - torch.arange(Lk, device=w.device).double()).abs()  # (R, Lk)
    per_row = {
        "entropy": -torch.xlogy(w, w).sum(-1),                                   # (B, nh, R)
        "distance": (w * dist).sum(-1),
        "first_token": w[..., 0] if Lk else w.new_zeros(B, nh, R),
    }
    count = live.sum(dim=(0, 2))                                                 # (nh,)
    return {k: (v * live).sum(dim=(0, 2)) / count for k, v in per_row.items()}   # 0/0 = NaN: no live row


# -----------------------------------------------------------------------------
# The result


class AttentionMaps(Mapping):
    """Captured attention weights: a mapping entry name -> weights (B, nh, R, Lk).

    Entries are in call order; `names` lists them. For each entry, `heads[name]` (nh,)
    are the query heads, `rows[name]` (R,) the query rows of the call and
    `positions[name]` (R,) their absolute positions.
    """

    def __init__(self):
        self.weights: dict[str, Tensor] = {}
        self.heads: dict[str, Tensor] = {}
        self.rows: dict[str, Tensor] = {}
        self.positions: dict[str, Tensor] = {}

    def _add(self, name: str, weights: Tensor, heads: Tensor, rows: Tensor, positions: Tensor) -> None:
        self.weights[name], self.heads[name] = weights, heads
        self.rows[name], self.positions[name] = rows, positions

    @property
    def names(self) -> list[str]:
        return list(self.weights)

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.weights:
            raise KeyError(f"no captured attention named {name!r}; captured: {', '.join(self.weights) or 'none'}")
        return self.weights[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)

    def stats(self) -> dict[str, dict[str, Tensor]]:
        """{name: head_stats(weights, positions)}: entropy, distance, first_token, each (nh,).

        Every captured row with an allowed key counts, padded query rows of a padded
        batch included (they attend to their row's real keys); pass `rows=` to leave them out.
        """
        return {n: head_stats(w, self.positions[n]) for n, w in self.weights.items()}

    def to_numpy(self, batch: int = 0) -> dict[str, np.ndarray]:
        """{name: float32 array (nh, R, Lk)}: the weights of one batch row, on the CPU."""
        out = {}
        for n, w in self.weights.items():
            B = w.shape[0]
            if isinstance(batch, bool) or not isinstance(batch, int) or not -B <= batch < B:
                raise ValueError(f"batch must be an int in 0..{B - 1} (the captured batch has {B} rows), "
                                 f"got {batch!r}")
            out[n] = w[batch].detach().float().cpu().numpy()
        return out

    def __repr__(self) -> str:
        items = ", ".join(f"{n}: {tuple(w.shape)}" for n, w in self.weights.items())
        return f"AttentionMaps({items})"


# -----------------------------------------------------------------------------
# Capturing


class Capture:
    """A context manager that records attention weights while a model runs; see `capture`."""

    def __init__(self, model: nn.Module, layers=None, heads=None, rows=None, max_cells: int = DEFAULT_MAX_CELLS):
        found = attention_modules(model)
        chosen = _select_layers(found, layers)
        self.max_cells = check_int("max_cells", max_cells)
        self._rows = None if rows is None else _int_list("rows", rows)
        head_list = None if heads is None else _int_list("heads", heads)
        self._heads: dict[int, Tensor] = {}
        for name, m in chosen:
            n = _n_heads(m)
            self._heads[id(m)] = (torch.arange(n) if head_list is None
                                  else _resolve("head", head_list, n, f"layer {name!r} with {n} heads"))
        self.layers: list[str] = [n for n, _ in chosen]
        self._selected = {id(m): n for n, m in chosen}
        self._watched = {id(m): n for n, m in found}
        self._model = model
        self._calls: dict[str, int] = {}
        self._layouts: list = []           # packed Encoder runs in progress
        self._handles: list = []
        self._token = None
        self._used = False
        self.maps = AttentionMaps()

    # -- context manager -------------------------------------------------------

    def __enter__(self) -> "Capture":
        if self._used:
            raise RuntimeError("a capture records one block; start a new qkv.inspect.capture(...) for another")
        self._used = True
        outer = ATTENTION_HOOK.get()

        def hook(module, q, k, **kw):
            self._record(module, q, k, **kw)
            if outer is not None:                           # nested captures each see the call
                outer(module, q, k, **kw)

        self._watch_encoders()
        self._token = ATTENTION_HOOK.set(hook)
        return self

    def __exit__(self, *exc) -> None:
        ATTENTION_HOOK.reset(self._token)
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- recording -------------------------------------------------------------

    def _record(self, module, q, k, *, mask=None, causal=False, score_mod=None, scale=None, q_offset=None,
                cached=False, sinks=None) -> None:
        if cached and id(module) in self._watched:
            raise ValueError(f"cannot capture {self._watched[id(module)]!r} while it reads a KV cache (cache=): "
                             f"the cached keys never pass through the layer; run the model without cache= "
                             f"(one full forward over the whole sequence) inside the capture")
        name = self._selected.get(id(module))
        if name is None or cached:
            return
        kind = getattr(module, "attention", "exact")
        if kind != "exact":
            raise ValueError(f"{name!r} runs {kind} attention, which has no softmax weights to capture; "
                             f"qkv.backends.linear.implied_weights(q, k, feature_map=..., causal=...) gives the "
                             f"Lq x Lk weights its kernel implies, or leave this layer out with layers=")
        call = make_call(q, k, k, mask=mask, causal=causal, score_mod=score_mod, scale=scale, dropout_p=0.0,
                          return_lse=False, return_weights=False, q_offset=q_offset, sinks=sinks)
        heads = self._heads[id(module)]
        layout = next((lay for lay in reversed(self._layouts) if id(module) in lay[0]), None)
        if layout is not None and layout[1] is not None:
            _, (B, L, real) = layout
            T = int(real.sum())
            if (call.B, call.Lq) != (B, L) and call.B == 1 and call.Lq == call.Lk == T:
                self._store(name, *self._packed(name, call, heads, B, L, real))
                return
        rows = self._rows_for(name, call.Lq, call.Lk)
        self._store(name, _row_weights(call, rows, heads), heads, rows, call.q_offset + rows)

    def _rows_for(self, name: str, Lq: int, Lk: int) -> Tensor:
        if self._rows is None:
            if Lq * Lk > self.max_cells:
                raise ValueError(
                    f"{name!r}: capturing every query row would keep Lq x Lk = {Lq} x {Lk} = {Lq * Lk:,} weights "
                    f"per batch row and head, above max_cells={self.max_cells:,}; pass rows= to capture chosen "
                    f"query rows (e.g. rows=[-1] for the last token, rows=range(0, {Lq}, {max(1, Lq // 16)})), "
                    f"or raise max_cells")
            return torch.arange(Lq)
        rows = _resolve("row", self._rows, Lq, f"{name!r}, whose call has Lq={Lq} query rows")
        if len(rows) * Lk > self.max_cells:
            raise ValueError(f"{name!r}: {len(rows)} rows x Lk={Lk} keys = {len(rows) * Lk:,} weights per batch row "
                             f"and head is above max_cells={self.max_cells:,}; pass fewer rows or raise max_cells")
        return rows

    def _store(self, name: str, weights: Tensor, heads: Tensor, rows: Tensor, positions: Tensor) -> None:
        n = self._calls.get(name, 0)
        self._calls[name] = n + 1
        self.maps._add(name if n == 0 else f"{name}#{n}", weights, heads, rows.cpu(), positions.cpu())

    # -- packed Encoder batches -------------------------------------------------

    def _watch_encoders(self) -> None:
        """Hooks on every `qkv.models.Encoder` of the model, to map its packed runs back to (B, L)."""
        mod = sys.modules.get("qkv.models.encoder")
        if mod is None:                                     # never imported: the model holds no Encoder
            return
        types = _attention_types()
        for enc in self._model.modules():
            if not isinstance(enc, mod.Encoder):
                continue
            inner = {id(m) for m in enc.modules() if isinstance(m, types)}

            def pre(module, args, kwargs, inner=inner):
                self._layouts.append((inner, _encoder_batch(args, kwargs)))

            def post(module, args, kwargs, output):
                self._layouts.pop()

            self._handles.append(enc.register_forward_pre_hook(pre, with_kwargs=True))
            self._handles.append(enc.register_forward_hook(post, with_kwargs=True, always_call=True))

    def _packed(self, name: str, call: Call, heads: Tensor, B: int, L: int, real: Tensor):
        """Weights of a packed (1, T) Encoder call, scattered back to (B, nh, R, L)."""
        rows = self._rows_for(name, L, L)                                          # (R,) columns
        real = real.to(torch.device("cpu"))
        packed_index = (real.reshape(-1).long().cumsum(0) - 1).view(B, L)          # (B, L) row in 0..T-1
        wanted = real[:, rows]                                                     # (B, R) real queries
        bb, rr = torch.nonzero(wanted, as_tuple=True)                              # (P,) batch row, row slot
        prow = packed_index[bb, rows[rr]]                                          # (P,) packed rows
        wp = _row_weights(call, prow, heads)[0]                                    # (nh, P, T)
        key_col = torch.nonzero(real.reshape(-1)).flatten() % L                    # (T,) column of each key
        starts = torch.cat([torch.zeros(1, dtype=torch.long), real.sum(1).cumsum(0)])  # (B + 1,) packed runs
        out = wp.new_zeros(B, len(heads), len(rows), L)                           # (B, nh, R, L)
        dev = wp.device
        for b in range(B):
            mine = torch.nonzero(bb == b).flatten()                                # this row's captured queries
            if not len(mine):
                continue
            k0, k1 = int(starts[b]), int(starts[b + 1])                            # its keys in the packed run
            cols = key_col[k0:k1].to(dev)
            out[b][:, rr[mine].to(dev)[:, None], cols[None, :]] = wp[:, mine.to(dev), k0:k1]
        return out, heads, rows, rows.clone()


def _encoder_batch(args, kwargs):
    """(B, L, real (B, L) bool) of an Encoder call, or None when its inputs are not a (B, L) batch."""
    ids = args[0] if args else kwargs.get("input_ids")
    mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        return None
    B, L = ids.shape
    if mask is None:
        return B, L, torch.ones(B, L, dtype=torch.bool)
    if not isinstance(mask, Tensor) or tuple(mask.shape) != (B, L):
        return None                                         # the Encoder itself will refuse it
    return B, L, (mask != 0).cpu()


def capture(model: nn.Module, layers=None, heads=None, rows=None, *, max_cells: int = DEFAULT_MAX_CELLS) -> Capture:
    """A context manager recording the attention weights of `model` while it runs inside the block.

    Args:
        model: any module holding `qkv.layers.MultiHeadAttention` or `qkv.nn.MultiheadAttention`
            modules (a Decoder, Encoder, Seq2Seq, Block, or one attention module).
        layers: None (all), or an int / name / list of them: indices into
            `attention_modules(model)` (negative from the end) or module names.
        heads: None (all) or query head indices (an int or a list; negative from the end).
        rows: None (all) or query row indices of each call (negative from the end).
        max_cells: with rows=None, the largest Lq * Lk captured per batch row and head
            (default 4096 * 4096); longer calls raise ValueError asking for `rows=`.

    The block runs the model unchanged (same backends, bit-identical outputs, gradients
    too). Afterwards `cap.maps` is an `AttentionMaps`. Errors raised while the model runs
    (ValueError): a row out of range for a call, a full-matrix capture above max_cells, any
    attention module of `model` reading a KV cache (`cache=`; raised before the cache changes).
    """
    return Capture(model, layers=layers, heads=heads, rows=rows, max_cells=max_cells)


def attention_maps(model: nn.Module, *args, layers=None, heads=None, rows=None,
                   max_cells: int = DEFAULT_MAX_CELLS, **kwargs) -> AttentionMaps:
    """Run `model(*args, **kwargs)` without autograd under `capture(...)`; return the `AttentionMaps`."""
    with capture(model, layers=layers, heads=heads, rows=rows, max_cells=max_cells) as cap, torch.no_grad():
        model(*args, **kwargs)
    return cap.maps


# -----------------------------------------------------------------------------
# Vision: attention rollout and per-patch maps
#
# Legend for this part: L layers, H heads, N tokens (N = P + 1 with a CLS token, N = P
# without), P = gh * gw patches of a gh x gw patch grid, C x H x W images.


def _rollout_layers(weights) -> list[Tensor]:
    """`weights` (a list of per-layer tensors, an AttentionMaps, or one stacked tensor) as a list."""
    if isinstance(weights, Mapping):
        weights = list(weights.values())
    elif isinstance(weights, Tensor):
        if weights.dim() not in (4, 5):
            raise ValueError(f"weights as one tensor must be stacked per layer, (L, B, H, N, N) or (L, B, N, N), "
                             f"got shape {tuple(weights.shape)}; or pass a list of per-layer tensors")
        weights = list(weights.unbind(0))
    elif isinstance(weights, (list, tuple)):
        weights = list(weights)
    else:
        raise TypeError(f"weights must be a list of per-layer attention weights (B, H, N, N) or (B, N, N), an "
                        f"AttentionMaps, or one stacked tensor; got {type(weights).__name__}")
    if not weights:
        raise ValueError("weights is empty: give the attention weights of at least one layer")
    out = []
    for i, w in enumerate(weights):
        if not isinstance(w, Tensor):
            raise TypeError(f"weights[{i}] must be a torch.Tensor, got {type(w).__name__}")
        if not w.is_floating_point():
            raise TypeError(f"weights[{i}] must be floating point attention probabilities, got {w.dtype}")
        if w.dim() not in (3, 4) or w.shape[-1] != w.shape[-2]:
            raise ValueError(f"weights[{i}] must be (B, H, N, N) or (B, N, N) with every query row of a layer "
                             f"(capture with rows=None), got shape {tuple(w.shape)}")
        if out and (w.shape[0], w.shape[-1]) != (out[0].shape[0], out[0].shape[-1]):
            raise ValueError(f"weights[{i}] is {tuple(w.shape)} but weights[0] is {tuple(out[0].shape)}: every "
                             f"layer needs the same batch B and tokens N")
        out.append(w)
    return out


def rollout(weights, *, residual: bool = True) -> Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): how much each token draws on each input token.

    `weights` is a list of per-layer attention probabilities, first layer first, each
    (B, H, N, N) (heads are averaged) or (B, N, N); an `AttentionMaps` captured with
    rows=None, or one stacked (L, B, H, N, N) tensor, also do. Per layer the head mean A
    becomes A' = (A + I) / 2 with every row renormalised to sum 1 (`residual=True`, which
    accounts for the residual stream; with `residual=False`, A' = A, rows renormalised
    where their sum is not zero), and the result is R = A'_L ... A'_1, accumulated in
    float64. Row q of R (B, N, N) is query token q's share of every input token; its rows
    sum to 1. Returned in the dtype of weights[0], on its device.
    """
    layers = _rollout_layers(weights)
    B, N = layers[0].shape[0], layers[0].shape[-1]
    eye = torch.eye(N, dtype=torch.float64, device=layers[0].device)
    R = eye.expand(B, N, N)
    for w in layers:
        a = w.detach().to(eye.device, torch.float64)
        if not torch.isfinite(a).all():
            raise ValueError("weights hold NaN/inf values; rollout needs finite attention probabilities")
        a = a.mean(dim=1) if a.dim() == 4 else a                                  # (B, N, N)
        if residual:
            a = (a + eye) / 2
        s = a.sum(-1, keepdim=True)
        a = torch.where(s > 0, a / torch.where(s > 0, s, torch.ones_like(s)), a)
        R = a @ R                                                                 # A'_l (A'_{l-1} ... A'_1)
    return R.to(layers[0].dtype)


class ImageAttention:
    """What `image_attention` returns (see there for the shapes).

    maps (B, layers, heads, gh, gw): the query's weights on each patch; cls (B, layers, heads):
    its weight on the tokens before the patches (the CLS token; zeros without one); rollout
    (B, gh, gw); weights: per layer of the model, (B, H, N, N), every head and query row;
    layers (names), heads, query (a token index), grid (gh, gw), n_lead (tokens before the
    patches), logits (the model's output).
    """

    def __init__(self, maps, cls, rollout, weights, layers, heads, query, grid, n_lead, logits):
        self.maps, self.cls, self.rollout, self.weights = maps, cls, rollout, weights
        self.layers, self.heads, self.query, self.grid = layers, heads, query, grid
        self.n_lead, self.logits = n_lead, logits

    def __repr__(self) -> str:
        return (f"ImageAttention(maps={tuple(self.maps.shape)}, rollout={tuple(self.rollout.shape)}, "
                f"query={self.query}, grid={self.grid}, layers={len(self.layers)})")


def _image_query(query, n_lead: int, grid: tuple[int, int]) -> int:
    """`query` (a token index, negative from the end, or a (row, col) patch) as a token index."""
    gh, gw = grid
    N = n_lead + gh * gw
    if isinstance(query, tuple):
        if len(query) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in query):
            raise TypeError(f"query as a patch must be (row, col) ints, got {query!r}")
        r, c = query
        if not (0 <= r < gh and 0 <= c < gw):
            raise ValueError(f"query patch {query} is outside the {gh} x {gw} patch grid")
        return n_lead + r * gw + c
    if isinstance(query, bool) or not isinstance(query, int):
        raise TypeError(f"query must be a token index (0 = CLS) or a (row, col) patch, got {query!r}")
    if not -N <= query < N:
        raise ValueError(f"query must be a token index in 0..{N - 1} ({n_lead} leading token(s), then the "
                         f"{gh} x {gw} patches row by row), got {query}")
    return query % N


def image_attention(model: nn.Module, images: Tensor, *, layers=None, heads=None, query=0) -> ImageAttention:
    """Where one query token of a vision transformer looks, per layer and head, and its rollout.

    `model` is a `qkv.models.ViT` (anything with `.grid((H, W))` and qkv attention whose
    tokens are `n_lead` leading tokens, the CLS token, then the P patches row by row);
    `images` (B, C, H, W) as the model takes them. `query` is a token index (0 = the CLS
    token with pool="cls"; token n_lead + r * gw + c is patch (r, c)) or a (row, col) patch.
    `layers` / `heads` pick the maps as in `capture`.

    One forward pass without autograd under `capture(model)` (every layer, head and query
    row: the rollout needs them all); the maps are its rows `query` of the chosen layers
    and heads. Returns an `ImageAttention`: maps (B, layers, heads, gh, gw), the query's
    weights on the patches with the CLS column dropped and NOT renormalised (each map sums
    to 1 - cls, the query's weight on the leading tokens, kept in .cls); rollout (B, gh, gw),
    the query's row of `rollout(weights)` over the patches, also not renormalised (divide
    by its sum for a distribution over the patches).
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, C, H, W) tensor, got {got}; add a batch axis with x[None]")
    if not callable(getattr(model, "grid", None)):
        raise TypeError(f"model must be a vision transformer with .grid((H, W)) (qkv.models.ViT), got "
                        f"{type(model).__name__}")
    gh, gw = (int(v) for v in model.grid(tuple(images.shape[-2:])))
    chosen = _select_layers(attention_modules(model), layers)
    head_list = None if heads is None else _int_list("heads", heads)
    with capture(model) as every, torch.no_grad():
        logits = model(images)
    weights = [every.maps[n] for n in every.maps.names]                          # (B, H, N, N) each
    N = weights[0].shape[-1]
    n_lead = N - gh * gw
    if n_lead < 0 or any(w.shape[-2:] != (N, N) for w in weights):
        raise ValueError(f"the model's attention runs over {N} tokens, which is not the {gh} x {gw} patch grid "
                         f"plus leading tokens; image_attention needs a ViT-like model (CLS, then patches)")
    q = _image_query(query, n_lead, (gh, gw))
    picked, head_ids, per_layer = [], None, []
    for name, m in chosen:
        n = _n_heads(m)
        hs = torch.arange(n) if head_list is None else _resolve("head", head_list, n, f"layer {name!r} with {n} heads")
        if head_ids is not None and not torch.equal(hs, head_ids):
            raise ValueError("the chosen layers have different numbers of heads; pass heads= explicitly")
        head_ids = hs
        picked.append(name)
        per_layer.append(every.maps[name][:, hs.to(weights[0].device), q, :])     # (B, nh, N)
    rows = torch.stack(per_layer, dim=1)                                          # (B, layers, nh, N)
    B = rows.shape[0]
    maps = rows[..., n_lead:].reshape(B, len(picked), len(head_ids), gh, gw)
    roll = rollout(weights)[:, q, n_lead:].reshape(B, gh, gw)
    return ImageAttention(maps, rows[..., :n_lead].sum(-1), roll, weights, picked, head_ids.tolist(), q,
                          (gh, gw), n_lead, logits)
