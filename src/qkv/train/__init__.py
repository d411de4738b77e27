"""Training: a teacher-forced loop, learning-rate schedules, exact-match evaluation, task recipes.

Legend: B batch, Lt target length, T context (tokens per training window), V vocabulary.

    fit(model, next_batch, steps=...)          AdamW + warmup then cosine / inverse-sqrt / constant,
                                               cross-entropy over non-PAD targets, gradient clipping
    evaluate_exact(model, (srcs, tgts))        greedy generation, fraction of outputs equal to the target
    train_task("reverse") / train_reversal()   a synthetic task from qkv.data end to end
    train_lm(data, out=..., steps=...)         a decoder language model on text (teacher forcing,
                                               causal mask), validation bits per character,
                                               atomic checkpoints (qkv.checkpoint) and exact resume
    train_vit(out=...)                         a Vision Transformer on scikit-learn's 8x8 digits (a fixed
                                               stratified held-out split, shift augmentation), held-out
                                               accuracy, checkpoints, exact resume

`fit` knows a model only through `loss_fn(model, batch) -> (mean loss, tokens)`
(default `seq2seq_loss`: a `qkv.data.Batch` through `model(src, src_lengths,
tgt_in)`), so other models plug in with their own loss function.

The package, by concept: `qkv.train.loop` (schedules, `fit`, exact-match evaluation, the
task recipes), `qkv.train.lm` (`train_lm`, presets, memory estimate), `qkv.train.vision`
(`train_vit`, the digits split), `qkv.train.recall` (associative recall) and `qkv.train.state` (optimizer and RNG state in checkpoints); every
public name is re-exported here.
"""

from __future__ import annotations

from qkv.train.loop import (RECIPE, SCHEDULES, History, TrainResult, evaluate_exact, fit, lr_schedule, seq2seq_loss,
                            train_reversal, train_task)
from qkv.train.lm import (PRESETS, LMHistory, LMResult, available_memory, decoder_config, estimate_memory, evaluate_lm,
                          lm_loss, train_lm)
from qkv.train.vision import (DIGITS_CONFIG, VIT_RECIPE, DigitsSplit, VisionHistory, VisionResult, digits_split,
                               evaluate_accuracy, train_vit, vit_config)
from qkv.train.recall import (RECALL_RECIPE, RecallEval, RecallResult, evaluate_recall, recall_attention, recall_loss,
                              train_recall)

__all__ = ["History", "TrainResult", "SCHEDULES", "lr_schedule", "seq2seq_loss", "fit", "evaluate_exact",
           "train_task", "train_reversal", "RECIPE", "PRESETS", "decoder_config", "estimate_memory",
           "available_memory", "lm_loss", "evaluate_lm", "LMHistory", "LMResult", "train_lm",
           "RECALL_RECIPE", "RecallEval", "RecallResult", "recall_loss", "evaluate_recall", "recall_attention",
           "train_recall", "DIGITS_CONFIG", "VIT_RECIPE", "DigitsSplit", "VisionHistory", "VisionResult",
           "digits_split", "evaluate_accuracy", "train_vit", "vit_config"]
