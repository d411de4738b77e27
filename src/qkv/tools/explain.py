"""`qkv explain`: single-head self-attention on a sentence, step by step, with toy vectors.

Legend: L tokens of the sentence, d_model = d_k = d_v the toy model's width.

- `toy_model` / `explain_sentence` / `render_trace`: a deterministic toy single-head
  attention over a sentence (no downloads, no trained weights): every table of
  `qkv.reference.explain` with what it shows and why it matters;
- `mask_picture` / `side_by_side`: masks as pictures of 'x' and '.', for the tour.
"""

from __future__ import annotations

import hashlib
import re
from typing import Sequence

import numpy as np

from qkv.reference import Trace, explain

__all__ = ["EXAMPLE_SENTENCE", "MAX_TOKENS", "toy_embedding", "toy_model", "tokenize", "explain_sentence",
           "most_attended", "render_trace", "mask_picture", "side_by_side"]

EXAMPLE_SENTENCE = "the dog fetches the stick"


# ----------------------------------------------------------------------------
# The worked example: toy single-head attention over a sentence
# ----------------------------------------------------------------------------

_SUFFIXES = ("ing", "es", "ed", "s")


def _stem(word: str) -> str:
    """A crude stem so 'dog'/'dogs' and 'fetch'/'fetches' share most of their toy vector."""
    w = word.lower()
    for suffix in _SUFFIXES:
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            return w[: -len(suffix)]
    return w


def _stable_vector(text: str, dim: int) -> np.ndarray:
    """A standard-normal vector that depends only on `text` (sha256, not Python's salted hash())."""
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(dim)


def toy_embedding(token: str, dim: int = 8) -> np.ndarray:
    """The toy embedding of one token, shape (dim,): the same word always gets the same vector.

    Mostly a vector of the word's stem plus a little of the word itself, so
    case and inflection variants ('The'/'the', 'dog'/'dogs') are close and
    unrelated words are random, nearly orthogonal directions. Entries have
    variance 1 (0.8^2 + 0.6^2 = 1).
    """
    return 0.8 * _stable_vector("stem:" + _stem(token), dim) + 0.6 * _stable_vector("word:" + token.lower(), dim)


def toy_model(tokens: Sequence[str], dim: int = 8, seed: int = 0):
    """Embeddings and projections of a toy single-head attention (not a trained model).

    Returns x (L, d_model), w_q, w_k, w_v (d_model, d_model), multiplying on the
    right (Q = x W_q). W_q, W_v are random (N(0, 1/dim), so Q, K, V entries keep
    variance ~1); W_k is W_q plus a little noise, which makes q_i . k_j roughly
    x_i A A^T x_j: a similarity kernel. A query therefore matches the keys of
    tokens with similar embeddings (the same word, the same stem). A trained
    model learns W_q, W_k that match other relations (a verb to its subject).
    """
    x = np.stack([toy_embedding(t, dim) for t in tokens])                # (L, d_model)
    g = np.random.default_rng(seed)
    w_q = g.standard_normal((dim, dim)) / np.sqrt(dim)                   # (d_model, d_k)
    w_k = w_q + 0.5 * g.standard_normal((dim, dim)) / np.sqrt(dim)       # (d_model, d_k)
    w_v = g.standard_normal((dim, dim)) / np.sqrt(dim)                   # (d_model, d_v)
    return x, w_q, w_k, w_v


_TOKEN = re.compile(r"\w+(?:'\w+)?|[^\w\s]")
MAX_TOKENS = 32


def tokenize(sentence: str) -> list[str]:
    """Words and punctuation marks, in order ("Dog's ball." -> ["Dog's", "ball", "."])."""
    if not isinstance(sentence, str):
        raise TypeError(f"sentence must be a string, got {type(sentence).__name__}")
    tokens = _TOKEN.findall(sentence)
    if not tokens:
        raise ValueError('the sentence is empty: pass some words, e.g. qkv explain "the dog fetches the stick"')
    if len(tokens) > MAX_TOKENS:
        raise ValueError(f"the sentence has {len(tokens)} tokens; the printed tables stay readable up to "
                         f"{MAX_TOKENS}: pass a shorter sentence")
    return tokens


def explain_sentence(sentence: str = EXAMPLE_SENTENCE, *, dim: int = 8, seed: int = 0,
                     causal: bool = False) -> Trace:
    """The `qkv.reference.explain` trace of the toy model on `sentence`."""
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= 64:
        raise ValueError(f"dim must be an integer in [1, 64] (the width of the printed tables), got {dim!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    tokens = tokenize(sentence)
    x, w_q, w_k, w_v = toy_model(tokens, dim, seed)
    return explain(x, w_q, w_k, w_v, tokens=tokens, causal=causal)


def _step_notes(trace: Trace) -> list[tuple[str, np.ndarray, bool, str, str]]:
    """(title, matrix, rows-and-columns-are-tokens, what it shows, why it matters) per printed table."""
    d_k = trace.Q.shape[-1]
    notes = [
        ("x: token embeddings", trace.x, False,
         "one row per token: the (toy) vector each word starts with",
         "attention only ever sees these numbers, never the words"),
        ("Q = x W_q: queries", trace.Q, False,
         "what each token is looking for",
         "row i is compared with every key to decide where token i looks"),
        ("K = x W_k: keys", trace.K, False,
         "what each token offers to be found by",
         "a query and a key that point the same way give a large dot product"),
        ("V = x W_v: values", trace.V, False,
         "what each token hands over when it is attended to",
         "the output is a mix of these rows, so V decides what information moves"),
        ("step 1: raw scores S = Q K^T", trace.raw_scores, True,
         "row = query token, column = key token, entry = q_i . k_j",
         "bigger means a better match; the numbers are not yet comparable across rows"),
        (f"step 2: scaled scores S / sqrt(d_k) = S / {np.sqrt(d_k):.3f}", trace.scaled_scores, True,
         "the scores divided by sqrt(d_k)",
         "dot products grow like sqrt(d_k); without this the softmax saturates to one-hot and its gradients vanish"),
    ]
    if not trace.allowed.all():
        notes.append(("step 2b: masked scores", trace.masked_scores, True,
                      "pairs a query may not see (here: later tokens) set to -inf",
                      "exp(-inf) = 0, so no information flows from the future: what teacher-forced training needs"))
    notes += [
        ("step 3: softmax weights", trace.weights, True,
         "each row exponentiated and normalised: a probability distribution over the keys (rows sum to 1)",
         "these are the attention weights: how much of each token's value flows into the row's token"),
        ("step 4: output = weights V", trace.output, False,
         "each token's new vector: a weighted average of the value rows",
         "this is what the next layer sees; each token now carries context from the tokens it attended to"),
    ]
    return notes


def most_attended(trace: Trace) -> list[dict]:
    """For each query position: the key position with the largest weight (first one on ties)."""
    out = []
    for i, tok in enumerate(trace.tokens):
        j = int(np.argmax(trace.weights[i]))
        out.append({"i": i, "token": tok, "j": j, "attends_to": trace.tokens[j],
                    "weight": float(trace.weights[i, j])})
    return out


def render_trace(trace: Trace, *, dim: int | None = None, seed: int = 0, causal: bool = False) -> str:
    """The trace as text: tokens, the toy model, every table with what it shows and why, the argmax."""
    dim = trace.x.shape[1] if dim is None else dim
    toks = "  ".join(f"[{i}] {t}" for i, t in enumerate(trace.tokens))
    lines = [
        f"tokens ({len(trace.tokens)}): {toks}",
        f"toy model: d_model = d_k = d_v = {dim}, seed {seed}, {'causal' if causal else 'no'} mask.",
        "  Toy numbers, not a trained model: each word's embedding is derived from a hash of the word",
        "  (words sharing a stem share most of it); W_q, W_v are random, W_k = W_q + noise, so a query",
        "  matches the keys of tokens with similar embeddings (the same word, the same stem).",
        "",
    ]
    for title, matrix, square, shows, why in _step_notes(trace):
        lines += [title, f"  shows: {shows}", f"  why:   {why}", trace.table(matrix, square), ""]
    lines.append("which token each token attends to most (largest weight in its row of step 3):")
    width = max(len(f"[{i}] {t!r}") for i, t in enumerate(trace.tokens))
    for m in most_attended(trace):
        who = f"[{m['i']}] {m['token']!r}".rjust(width)
        lines.append(f"  {who} attends to most: [{m['j']}] {m['attends_to']!r} (weight {m['weight']:.2f})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Masks as pictures
# ----------------------------------------------------------------------------

def mask_picture(mask, L: int = 8) -> list[str]:
    """An L x L mask as rows of 'x' (may attend) and '.' (masked); rows = queries, columns = keys."""
    dense = mask.to_dense(L, L)[0, 0]                                      # (L, L) bool
    return [" ".join("x" if bool(v) else "." for v in row) for row in dense]


def side_by_side(pictures: Sequence[tuple[str, list[str]]], gap: int = 4) -> str:
    """Titled pictures next to each other, each column as wide as its widest line."""
    widths = [max(len(title), *(len(r) for r in rows)) for title, rows in pictures]
    height = max(len(rows) for _, rows in pictures)
    sep = " " * gap
    out = [sep.join(t.ljust(w) for (t, _), w in zip(pictures, widths)).rstrip()]
    for i in range(height):
        out.append(sep.join((rows[i] if i < len(rows) else "").ljust(w)
                            for (_, rows), w in zip(pictures, widths)).rstrip())
    return "\n".join(out)
