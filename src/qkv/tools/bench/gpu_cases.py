"""The GPU benchmark's cases and the work each does: shapes, masks as qkv and Flex spell them, FLOPs.

Legend: B batch, H heads (Hq query, Hkv key/value heads in decode), L sequence length (Lq = Lk = L in
prefill), D head dim, Lk_live the average number of keys a query row may attend.

`plan` lists the cases of `qkv bench gpu` (`qkv.tools.bench.gpu`, which runs them) in the order they
run; `qkv_kwargs` / `flex_mods` spell one case for `qkv.attention` and for FlexAttention;
`allowed_pairs` counts the (b, q, kv) pairs a mask lets attend, exactly, and `attention_flops` turns
them into FLOPs (4 * B * H * Lq * Lk_live * D forward, 2.5x that backward).
"""

from __future__ import annotations

import torch

import qkv
from qkv.tools.harness import ratio
from qkv.tools.bench.attention import allowed_pairs as banded_pairs
from qkv.tools.bench.attention import document_ids

__all__ = ["plan", "qkv_kwargs", "mask_of", "flex_mods", "allowed_pairs", "lk_live", "attention_flops", "tflops",
           "attn_row", "decode_row", "MASKS", "PASSES", "LABELS"]

DTYPE = torch.bfloat16
TOKENS = 16384                       # B x L of every prefill case
D_MODEL = 2048                       # H x D
LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
HEAD_DIMS = (128, 64)
GOAL_L, GOAL_D = 16384, 128
MASKS = ("dense", "causal", "sliding_window", "document", "prefix_lm", "alibi", "softcap")
WINDOW = 1024
N_DOCS = 16
PREFIX_DIV = 4                       # prefix_lm(L // PREFIX_DIV)
SOFTCAP = 30.0
DECODE_LENGTHS = (1024, 4096, 16384, 65536, 131072)
DECODE_LONG = 65536                  # batch 1 from here on, DECODE_BATCH below
DECODE_BATCH = 8
HQ, HKV, DEC_D = 32, 8, 128
PAGE = 16                            # paged cache block size (qkv.cache's default)
FIRST_L, FIRST_B, FIRST_H, FIRST_D = 4096, 4, 16, 128
COPY_BYTES = 2 << 30                 # the HBM copy: 2 GiB read, 2 GiB written
BWD_FACTOR = 2.5
PASSES = ("fwd", "fwd+bwd", "bwd")
LABELS = {"dense": "dense", "causal": "causal", "sliding_window": f"sliding_window({WINDOW})",
          "document": f"document({N_DOCS} docs) & causal", "prefix_lm": "prefix_lm(L/4)",
          "alibi": "alibi & causal", "softcap": f"softcap({SOFTCAP:g}) & causal"}



# ----------------------------------------------------------------------------
# The cases
# ----------------------------------------------------------------------------

def _attn_spec(mask: str, L: int, D: int, *, goal: bool, flex: bool, tokens: int = TOKENS) -> dict:
    return {"kind": "attn", "key": f"attn/{mask}/L{L}/D{D}", "mask": mask, "L": L, "D": D,
            "B": max(1, tokens // L), "H": D_MODEL // D, "goal": goal, "flex": flex}


def _decode_spec(L: int, B: int) -> dict:
    return {"kind": "decode", "key": f"decode/L{L}", "L": L, "B": B, "Hq": HQ, "Hkv": HKV, "D": DEC_D, "page": PAGE}


def plan(quick: bool = False, *, flex: bool = True, first_call: bool = True) -> list[dict]:
    """The cases in the order they run, the goals' first (what a short budget leaves out comes last).

    Full: the HBM copy; dense and causal at 16k, D 128; decode; the first call; the other masks at
    16k, D 128; the sweep of dense and causal over L and D; the HBM copy again. --quick: causal
    (with Flex), dense and documents at L 2048 (B 2), decode at 1k and 4k (B 2), qkv's first call
    (no Flex), the other masks; about a minute."""
    hbm = lambda at: {"kind": "hbm", "key": f"hbm/{at}", "bytes": COPY_BYTES}  # noqa: E731
    first = lambda with_flex: {"kind": "first", "key": "first", "L": FIRST_L, "B": FIRST_B,  # noqa: E731
                               "H": FIRST_H, "D": FIRST_D, "flex": with_flex}
    if quick:
        q = lambda m, fx=False: _attn_spec(m, 2048, 128, goal=True, flex=fx, tokens=4096)  # noqa: E731
        specs = [hbm("start"), q("causal", flex), q("dense"), q("document")]
        specs += [dict(_decode_spec(L, 2)) for L in (1024, 4096)]
        specs += [first(False)] if first_call else []
        specs += [q(m) for m in ("sliding_window", "prefix_lm", "alibi", "softcap")]
        return specs + [hbm("end")]
    goal = lambda m: _attn_spec(m, GOAL_L, GOAL_D, goal=True, flex=flex)  # noqa: E731
    specs = [hbm("start"), goal("dense"), goal("causal")]
    specs += [_decode_spec(L, DECODE_BATCH if L < DECODE_LONG else 1) for L in DECODE_LENGTHS]
    specs += [first(flex)] if first_call else []
    specs += [goal(m) for m in MASKS if m not in ("dense", "causal")]
    specs += [_attn_spec(m, L, D, goal=False, flex=False) for D in HEAD_DIMS for m in ("dense", "causal")
              for L in LENGTHS if (L, D) != (GOAL_L, GOAL_D)]
    return specs + [hbm("end")]


def qkv_kwargs(name: str, L: int, H: int, *, device="cpu", window: int = WINDOW, n_docs: int = N_DOCS,
               seed: int = 0) -> dict:
    """The keyword arguments of `qkv.attention` for case `name` at length L with H heads."""
    M, S = qkv.masks, qkv.scores
    if name == "dense":
        return {}
    if name == "causal":
        return {"causal": True}
    if name == "sliding_window":
        return {"mask": M.sliding_window(window)}
    if name == "document":
        return {"mask": M.document(document_ids(L, n_docs, seed).to(device)) & M.causal()}
    if name == "prefix_lm":
        return {"mask": M.prefix_lm(L // PREFIX_DIV)}
    if name == "alibi":
        return {"causal": True, "score_mod": S.alibi(H)}
    if name == "softcap":
        return {"causal": True, "score_mod": S.softcap(SOFTCAP)}
    raise ValueError(f"unknown case {name!r}; choose from {', '.join(MASKS)}")


def mask_of(kwargs: dict):
    """The one qkv mask the keyword arguments describe (`causal=True` folded in), None for none."""
    m = kwargs.get("mask")
    if kwargs.get("causal"):
        m = qkv.masks.causal() if m is None else m & qkv.masks.causal()
    return m


def flex_mods(name: str, L: int, H: int, *, device="cpu", window: int = WINDOW, n_docs: int = N_DOCS,
              seed: int = 0):
    """(mask_mod or None, score_mod or None): case `name` written out in Flex's contract, as Flex users
    write it (the mask_mod is create_block_mask's fallback; the score_mod is always Flex's)."""
    def causal(b, h, q, kv):
        return q >= kv
    if name == "dense":
        return None, None
    if name == "causal":
        return causal, None
    if name == "sliding_window":
        return (lambda b, h, q, kv: (q >= kv) & (q - kv < window)), None
    if name == "document":
        ids = document_ids(L, n_docs, seed).to(device)
        return (lambda b, h, q, kv: (ids[q] == ids[kv]) & (q >= kv)), None
    if name == "prefix_lm":
        n = L // PREFIX_DIV
        return (lambda b, h, q, kv: (kv < n) | (kv <= q)), None
    if name == "alibi":
        slopes = qkv.positional.alibi_slopes(H).to(device=device, dtype=torch.float32)
        return causal, (lambda score, b, h, q, kv: score + slopes[h] * (kv - q))
    if name == "softcap":
        return causal, (lambda score, b, h, q, kv: SOFTCAP * torch.tanh(score / SOFTCAP))
    raise ValueError(f"unknown case {name!r}; choose from {', '.join(MASKS)}")


# ----------------------------------------------------------------------------
# Work: allowed pairs, Lk_live, FLOPs
# ----------------------------------------------------------------------------

def allowed_pairs(mask, Lq: int, Lk: int, *, batch: int = 1) -> int:
    """(b, q, kv) pairs `mask` lets attend in a (batch, Lq, Lk) call (queries the last Lq positions, as
    qkv aligns them), summed over the batch, for one head (these masks do not depend on the head).
    Exact: each row's key interval from `Mask.row_ranges`, else the mask evaluated in bands of rows."""
    if mask is None:
        return batch * Lq * Lk
    q = torch.arange(Lq) + (Lk - Lq)
    got = mask.row_ranges(q, Lk)
    if got is not None:
        lo, hi = got                                                      # (B' in {1, batch}, Lq) each
        return int((hi - lo).clamp(min=0).sum()) * (batch // lo.shape[0])
    if Lq != Lk:
        raise ValueError(f"counting by evaluation needs Lq == Lk, got {Lq} and {Lk}")
    return banded_pairs(mask, Lk, batch=batch, heads=1)


def lk_live(pairs: int, B: int, Lq: int) -> float:
    """The average allowed keys per query row."""
    return pairs / (B * Lq)


def attention_flops(pairs: int, H: int, D: int, pass_: str) -> float:
    """4 * B * H * Lq * Lk_live * D = 4 * H * D * pairs forward; x 2.5 backward, x 3.5 forward+backward."""
    fwd = 4 * H * D * pairs
    factors = {"fwd": 1.0, "bwd": BWD_FACTOR, "fwd+bwd": 1.0 + BWD_FACTOR}
    if pass_ not in factors:
        raise ValueError(f"unknown pass {pass_!r}; choose from {', '.join(PASSES)}")
    return fwd * factors[pass_]


def tflops(flops: float | None, ms: float | None) -> float | None:
    """FLOPs over milliseconds as TFLOP/s (None when either is missing or ms is not positive)."""
    r = ratio(flops, ms)
    return None if r is None else r / 1e9


def attn_row(spec: dict) -> dict:
    """A prefill case's row before timing: its label and the work it does (counted on the CPU)."""
    L, B, H, D = spec["L"], spec["B"], spec["H"], spec["D"]
    pairs = allowed_pairs(mask_of(qkv_kwargs(spec["mask"], L, H)), L, L, batch=B)
    return {**spec, "label": LABELS[spec["mask"]], "pairs": pairs, "lk_live": lk_live(pairs, B, L),
            "density": pairs / (B * L * L), "flops": {p: attention_flops(pairs, H, D, p) for p in PASSES},
            "cells": {}}


def decode_row(spec: dict) -> dict:
    """A decode case's row before timing: the bytes of K and V one call reads (bf16)."""
    kv_bytes = 2 * spec["B"] * spec["Hkv"] * spec["L"] * spec["D"] * torch.finfo(DTYPE).bits // 8
    return {**spec, "kv_bytes": kv_bytes, "cells": {}}
