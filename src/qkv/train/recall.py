"""Associative recall: the soft dictionary lookup, learned (`train_recall`), and the
measurements of which head does it (`evaluate_recall`, `recall_attention`).

Legend: B sequences, L tokens, H heads, V vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv import data as _data
from qkv._util.checks import check_int as _check_int
from qkv.models import AttentionOnly
from qkv.train.loop import History, fit


# A 2-layer attention-only model (`qkv.models.AttentionOnly`, RoPE, pre-LayerNorm, no MLP) on
# `qkv.data.RecallTask()` (8-16 pairs, 32 keys, 32 values). Loss on the answer position only.
# Training sequences hold 2-16 pairs (`train_min_pairs`): the short ones make the lookup
# easy to discover, and with 8-16 pairs only it appears far later; the held-out set is the
# task's own 8-16 pairs. The model learns the two-layer (induction) solution: a layer-1
# head copies each key into the value position after it, and layer-2 heads attend from the
# query to the value whose copied key matches. 1500 steps of 64 sequences (~75 s on one
# CPU thread): 100% held-out accuracy for seeds 0-4, the best layer-2 head putting
# 0.97-0.99 of the query's attention on the matching value (at 1000 steps, 0.91-0.97).
RECALL_RECIPE = {"d_model": 96, "n_layers": 2, "n_heads": 3, "positions": "rope", "norm": "layer",
                 "train_min_pairs": 2, "batch_size": 64, "steps": 1500, "lr": 3e-3, "warmup": 100,
                 "schedule": "cosine", "min_lr": 0.0, "weight_decay": 0.01, "clip": 1.0}




def _check_recall_batch(batch) -> None:
    if not isinstance(batch, _data.RecallBatch):
        raise TypeError(f"expected a qkv.data.RecallBatch (RecallTask.batch / held_out), got {type(batch).__name__}")


def _answer_logits(model: nn.Module, batch: _data.RecallBatch, *, return_weights: bool = False):
    """Logits at each row's last real position (B, V) [, per-layer weights (B, H, L, L)]."""
    out = model(batch.ids, return_weights=return_weights) if return_weights else model(batch.ids)
    logits, weights = out if return_weights else (out, None)                      # (B, L, V)
    rows = torch.arange(batch.ids.shape[0], device=batch.ids.device)
    last = logits[rows, batch.lengths - 1]                                          # (B, V)
    return (last, weights) if return_weights else last


def recall_loss(model: nn.Module, batch: _data.RecallBatch) -> tuple[Tensor, int]:
    """Cross-entropy of the answer at the last position of each sequence (the `fit` loss_fn
    for recall); the other positions carry no loss. Returns (mean loss, sequences)."""
    _check_recall_batch(batch)
    return F.cross_entropy(_answer_logits(model, batch).float(), batch.answer), int(batch.ids.shape[0])


class RecallEval(NamedTuple):
    """Held-out accuracy and, per (layer, head), the query position's mean attention on the
    matching key and on its value (each (n_layers, n_heads) numpy float64)."""

    accuracy: float
    key_mass: np.ndarray
    value_mass: np.ndarray

    @property
    def pair_mass(self) -> np.ndarray:
        """key_mass + value_mass: the attention on the matching pair, whichever token is read."""
        return self.key_mass + self.value_mass


@torch.no_grad()
def evaluate_recall(model: nn.Module, batch: _data.RecallBatch, *, batch_size: int = 500) -> RecallEval:
    """Greedy accuracy of the answer, and the query's attention on the matching key / value of
    every layer and head, averaged over the sequences of `batch` (e.g. `task.held_out(1000)`).
    The model must accept `return_weights=True` and return per-layer (B, H, L, L) weights."""
    _check_recall_batch(batch)
    _check_int("batch_size", batch_size, 1)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, key_sum, value_sum = 0, None, None
    try:
        for i in range(0, batch.ids.shape[0], batch_size):
            part = _data.RecallBatch(*(t[i:i + batch_size].to(device) for t in batch))
            last, weights = _answer_logits(model, part, return_weights=True)        # (b, V), [(b, H, L, L)]
            correct += int((last.argmax(-1) == part.answer).sum())
            rows = torch.arange(part.ids.shape[0], device=device)
            w = torch.stack([wl[rows, :, part.lengths - 1] for wl in weights], 1)   # (b, layers, H, L): query rows
            k = w[rows, :, :, part.key_pos].double().sum(0)                           # (layers, H)
            v = w[rows, :, :, part.value_pos].double().sum(0)                         # (layers, H)
            key_sum = k if key_sum is None else key_sum + k
            value_sum = v if value_sum is None else value_sum + v
    finally:
        model.train(was_training)
    n = batch.ids.shape[0]
    return RecallEval(correct / n, (key_sum / n).cpu().numpy(), (value_sum / n).cpu().numpy())


@torch.no_grad()
def recall_attention(model: nn.Module, task: _data.RecallTask, ids, *, layer: int, head: int):
    """The attention weights of one head on one sequence and the tokens' labels.

    ids: one unpadded sequence (L,) (a row of a `RecallBatch` cut to its length).
    Returns (weights (L, L) numpy float32, row = query, column = key; labels like
    "BOS", "k7", "v3", "?")."""
    if not isinstance(task, _data.RecallTask):
        raise TypeError(f"task must be a qkv.data.RecallTask, got {type(task).__name__}")
    ids = torch.as_tensor(ids)
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"ids must be one non-empty sequence (L,), got shape {tuple(ids.shape)}")
    _check_int("layer", layer, 0)
    _check_int("head", head, 0)
    labels = task.labels(ids)
    if "PAD" in labels:
        raise ValueError("ids holds PAD: cut the row to its length, ids[:lengths[i]]")
    was_training = model.training
    model.eval()
    try:
        _, weights = model(ids[None].to(next(model.parameters()).device), return_weights=True)
    finally:
        model.train(was_training)
    if layer >= len(weights) or head >= weights[layer].shape[1]:
        raise ValueError(f"layer {layer}, head {head} out of range: the model has {len(weights)} layers of "
                         f"{weights[0].shape[1]} heads")
    return weights[layer][0, head].float().cpu().numpy(), labels


@dataclass
class RecallResult:
    """A trained recall model and its measurements on the held-out set.

    key_mass, value_mass: (n_layers, n_heads) mean attention of the query position on the
    matching key / value; best_layer, best_head: the head with the largest sum of the two
    (`best_mass`); accuracy: held-out greedy accuracy."""

    model: nn.Module
    task: _data.RecallTask
    held_out: _data.RecallBatch
    history: History
    accuracy: float
    key_mass: np.ndarray
    value_mass: np.ndarray
    best_layer: int
    best_head: int
    best_mass: float
    train_seconds: float
    eval_seconds: float

    @property
    def pair_mass(self) -> np.ndarray:
        return self.key_mass + self.value_mass

    def example(self, index: int = 0, *, layer: int | None = None, head: int | None = None):
        """(weights (L, L) numpy, labels) of held-out sequence `index` for a head (default: the best)."""
        _check_int("index", index, 0)
        if index >= self.held_out.ids.shape[0]:
            raise ValueError(f"index {index} out of range: the held-out set has {self.held_out.ids.shape[0]} sequences")
        ids = self.held_out.ids[index, :int(self.held_out.lengths[index])]
        return recall_attention(self.model, self.task, ids, layer=self.best_layer if layer is None else layer,
                                head=self.best_head if head is None else head)

    def table(self) -> str:
        """The per-head measurements as aligned text."""
        lines = ["layer head    key  value   pair"]
        for layer in range(self.key_mass.shape[0]):
            for head in range(self.key_mass.shape[1]):
                k, v = self.key_mass[layer, head], self.value_mass[layer, head]
                mark = "  <- best" if (layer, head) == (self.best_layer, self.best_head) else ""
                lines.append(f"{layer:>5} {head:>4} {k:6.3f} {v:6.3f} {k + v:6.3f}{mark}")
        return "\n".join(lines)


def train_recall(*, n_keys: int = 32, n_values: int = 32, min_pairs: int = 8, max_pairs: int = 16, seed: int = 0,
                 eval_size: int = 1000, eval_seed: int = _data.EVAL_SEED, threads: int | None = 1,
                 log_every: int = 0, progress: bool | Callable[[int, dict], None] = False,
                 **overrides) -> RecallResult:
    """Train a `qkv.models.AttentionOnly` on associative recall and find the lookup head.

    The task is `RecallTask(n_keys, n_values, min_pairs, max_pairs)`; training batches hold
    `train_min_pairs`..max_pairs pairs (the held-out set is the task itself, drawn with
    `eval_seed`). Hyper-parameters default to `RECALL_RECIPE`; any of its keys can be
    overridden. `seed` seeds the initialisation and the training stream. `threads`:
    torch's intra-op threads for the run (restored afterwards; one is the fast choice
    for a model this small on a shared machine; None leaves the setting alone).

    After training, `evaluate_recall` on `eval_size` held-out sequences gives the accuracy
    and every head's attention on the matching key and value; the best head is the one
    with the most attention on the pair.
    """
    model_keys = {"d_model", "n_layers", "n_heads", "positions", "norm"}
    fit_keys = {"steps", "lr", "warmup", "schedule", "min_lr", "weight_decay", "clip"}
    known = model_keys | fit_keys | {"batch_size", "train_min_pairs"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown hyper-parameters {unknown}; known: {sorted(known)}")
    if seed == eval_seed:
        raise ValueError(f"seed and eval_seed are both {seed}: the held-out set would be drawn like the training "
                         f"batches; pick another seed")
    _check_int("eval_size", eval_size, 1)
    if threads is not None:
        _check_int("threads", threads, 1)
    hp = {**RECALL_RECIPE, **overrides}
    task = _data.RecallTask(n_keys=n_keys, n_values=n_values, min_pairs=min_pairs, max_pairs=max_pairs)
    train_min = _check_int("train_min_pairs", hp["train_min_pairs"], 1)
    if train_min > min_pairs:
        raise ValueError(f"train_min_pairs={train_min} must be <= min_pairs={min_pairs}: training covers the "
                         f"held-out lengths")
    train_task = _data.RecallTask(n_keys=n_keys, n_values=n_values, min_pairs=train_min, max_pairs=max_pairs)
    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        model = AttentionOnly(task.vocab_size, max_positions=task.max_len,
                              **{k: v for k, v in hp.items() if k in model_keys})
        history = fit(model, train_task.stream(hp["batch_size"], seed=seed), seed=seed, log_every=log_every,
                      progress=progress, loss_fn=recall_loss, **{k: v for k, v in hp.items() if k in fit_keys})
        t0 = time.perf_counter()
        held = task.held_out(eval_size, seed=eval_seed)
        ev = evaluate_recall(model, held)
        eval_seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)
    layer, head = np.unravel_index(int(np.argmax(ev.pair_mass)), ev.pair_mass.shape)
    return RecallResult(model, task, held, history, ev.accuracy, ev.key_mass, ev.value_mass, int(layer), int(head),
                        float(ev.pair_mass[layer, head]), history.seconds, eval_seconds)
