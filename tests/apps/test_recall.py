"""Tests for associative recall: the task (qkv.data.RecallTask), the attention-only model
(qkv.models.AttentionOnly) and training / measuring the lookup head (qkv.train.train_recall).

Legend: B batch, L tokens, V vocabulary, H heads, D head dim, d d_model, P pairs.

The layout is checked against plain-Python readings of each sequence, the model's logits
against a float64 forward written out here from its weights (not through qkv.layers),
and the attention measurement against a stub model whose weights are known.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qkv import data
from qkv.data import BOS, EVAL_SEED, PAD, QUERY, RecallBatch, RecallTask
from qkv.models import AttentionOnly
from qkv.train import RECALL_RECIPE, evaluate_recall, recall_attention, recall_loss, train_recall
from conftest import assert_error_ratio

F64 = torch.float64


def rows(b: RecallBatch) -> list[list[int]]:
    """Each sequence cut to its length, as lists."""
    return [b.ids[i, :int(b.lengths[i])].tolist() for i in range(b.ids.shape[0])]


# -----------------------------------------------------------------------------
# The task


def test_layout_matches_a_plain_reading():
    t = RecallTask()
    assert (t.first_key, t.first_value, t.vocab_size, t.max_len) == (4, 36, 68, 35)
    b = t.batch(400, seed=3)
    assert b.ids.dtype == torch.int64 and b.ids.shape == (400, int(b.lengths.max()))
    for i, seq in enumerate(rows(b)):
        n = (len(seq) - 3) // 2
        assert len(seq) == 2 * n + 3 and 8 <= n <= 16
        assert seq[0] == BOS and seq[-2] == QUERY
        keys, values = seq[1:2 * n + 1:2], seq[2:2 * n + 2:2]
        assert all(4 <= k < 36 for k in keys) and all(36 <= v < 68 for v in values)
        assert len(set(keys)) == n                                       # distinct within a sequence
        q = keys.index(seq[-1])                                          # the query is one of them
        assert int(b.answer[i]) == values[q] == t.answer_of(seq)
        assert int(b.key_pos[i]) == 1 + 2 * q and int(b.value_pos[i]) == 2 + 2 * q
        assert b.ids[i, len(seq):].eq(PAD).all()


def test_draws_cover_every_choice():
    t = RecallTask()
    b = t.batch(3000, seed=4)
    pairs = ((b.lengths - 3) // 2).tolist()
    assert set(pairs) == set(range(8, 17))
    keys = b.ids[:, 1::2][b.ids[:, 1::2] >= t.first_key]
    assert set(keys.tolist()) >= set(range(4, 36))
    assert set(b.answer.tolist()) == set(range(36, 68))
    assert set(((b.key_pos - 1) // 2).tolist()) == set(range(16))      # every pair gets queried
    # the query is uniform over the pairs: the last pair is asked about ~1/n of the time
    last = (b.key_pos == b.lengths - 4).float().mean().item()
    expected = float(np.mean([1 / n for n in pairs]))
    assert abs(last - expected) < 0.03


def test_labels():
    t = RecallTask(n_keys=10, n_values=5, min_pairs=1, max_pairs=3)
    assert t.labels([BOS, 4, 14, 5, 18, QUERY, 4]) == ["BOS", "k0", "v0", "k1", "v4", "?", "k0"]
    assert t.label(PAD) == "PAD" and t.label(13) == "k9"
    with pytest.raises(ValueError, match="outside"):
        t.label(19)


def test_deterministic_and_held_out_is_another_stream():
    t = RecallTask()
    a, b = t.batch(50, seed=7), t.batch(50, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(t.batch(50, seed=8).ids[:, :19], a.ids[:, :19])
    s1, s2 = t.stream(32, seed=1), t.stream(32, seed=1)
    for _ in range(3):
        assert torch.equal(s1(0).ids, s2(0).ids)                       # reproducible from the seed
    assert not torch.equal(s1(0).ids, s1(0).ids)                       # fresh batches per call
    held = t.held_out(500)
    assert torch.equal(held.ids, t.batch(500, seed=EVAL_SEED).ids)
    train = t.stream(100, seed=0)
    seen = {tuple(r) for _ in range(50) for r in rows(train(0))}
    assert not seen & {tuple(r) for r in rows(held)}                   # no held-out sequence was trained on


def test_device_argument_and_types():
    b = RecallTask().batch(3, seed=0, device="cpu")
    assert isinstance(b, RecallBatch) and all(x.dtype == torch.int64 for x in b)
    assert b.lengths.shape == b.answer.shape == b.key_pos.shape == (3,)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"max_pairs": 40}, ValueError, "distinct"),
    ({"min_pairs": 9, "max_pairs": 8}, ValueError, "min_pairs"),
    ({"n_keys": 0}, ValueError, "n_keys"),
    ({"n_values": 1}, ValueError, "n_values"),
    ({"min_pairs": 0}, ValueError, "min_pairs"),
    ({"n_keys": 2.5}, TypeError, "n_keys"),
    ({"max_pairs": True}, TypeError, "max_pairs"),
])
def test_bad_task_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        RecallTask(**kwargs)


def test_bad_batch_calls():
    t = RecallTask()
    with pytest.raises(ValueError, match=">= 1"):
        t.batch(0, seed=0)
    with pytest.raises(ValueError, match="exactly one"):
        t.batch(4)
    with pytest.raises(ValueError, match="held-out seed"):
        t.stream(4, seed=EVAL_SEED)
    with pytest.raises(ValueError, match="not a recall sequence"):
        t.answer_of([BOS, 4, 40, QUERY])
    with pytest.raises(ValueError, match="not among"):
        t.answer_of([BOS, 4, 40, 5, 41, QUERY, 6])
    with pytest.raises(ValueError, match="RecallTask"):
        data.make_task("recall")


# -----------------------------------------------------------------------------
# The model


def ref_forward(model: AttentionOnly, ids: torch.Tensor, dtype) -> torch.Tensor:
    """The model's forward written out: embed [+ positions], per layer pre-LayerNorm causal
    softmax attention [RoPE half-split | ALiBi], final LayerNorm, unembedding. (B, L, V)."""
    p = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    B, L = ids.shape
    H, d = model.n_heads, model.d_model
    D = d // H
    x = p["embed.weight"][ids]                                                        # (B, L, d)
    if model.positions == "learned":
        x = x + p["pos_embed.weight"][:L]
    pos = torch.arange(L, dtype=dtype)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    for i in range(model.n_layers):
        h = F.layer_norm(x, (d,), p[f"norms.{i}.weight"], p[f"norms.{i}.bias"], 1e-5)

        def heads(name):
            return (h @ p[f"layers.{i}.{name}.weight"].T).view(B, L, H, D).transpose(1, 2)  # (B, H, L, D)
        q, k, v = heads("q_proj"), heads("k_proj"), heads("v_proj")
        if model.positions == "rope":
            inv = 10000.0 ** (-torch.arange(0, D, 2, dtype=dtype) / D)                    # (D/2,)
            ang = pos[:, None] * inv                                                      # (L, D/2)
            cos, sin = ang.cos(), ang.sin()

            def rot(t):
                a, b = t[..., :D // 2], t[..., D // 2:]
                return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)
            q, k = rot(q), rot(k)
        s = q @ k.transpose(-1, -2) / math.sqrt(D)                                        # (B, H, L, L)
        if model.positions == "alibi":
            slopes = torch.tensor([2.0 ** (-8 * (j + 1) / H) for j in range(H)], dtype=dtype)
            s = s - slopes[:, None, None] * (pos[:, None] - pos[None, :]).clamp(min=0)
        w = s.masked_fill(~causal, float("-inf")).softmax(-1)
        o = (w @ v).transpose(1, 2).reshape(B, L, d)
        x = x + o @ p[f"layers.{i}.o_proj.weight"].T
    x = F.layer_norm(x, (d,), p["norm.weight"], p["norm.bias"], 1e-5)
    return x @ p["unembed.weight"].T


@pytest.mark.parametrize("positions", ["rope", "learned", "alibi"])
def test_logits_match_a_float64_forward(positions):
    torch.manual_seed(0)
    t = RecallTask()
    model = AttentionOnly(t.vocab_size, d_model=32, n_heads=4, max_positions=t.max_len, positions=positions)
    with torch.no_grad():
        for name, prm in model.named_parameters():                  # random norms and biases too
            if prm.dim() == 1:
                prm.add_(0.3 * torch.randn_like(prm))
    b = t.batch(6, seed=1)
    with torch.no_grad():
        got = model(b.ids)
    assert got.shape == (6, b.ids.shape[1], t.vocab_size) and got.dtype == torch.float32
    assert_error_ratio(got, ref_forward(model, b.ids, torch.float32), ref_forward(model, b.ids, F64),
                       what=f"AttentionOnly logits ({positions})")


@pytest.mark.parametrize("positions", ["rope", "learned", "alibi"])
def test_weights_and_causality(positions):
    torch.manual_seed(1)
    t = RecallTask(min_pairs=4, max_pairs=4)
    model = AttentionOnly(t.vocab_size, n_layers=2, n_heads=3, max_positions=t.max_len, positions=positions).eval()
    ids = t.batch(5, seed=2).ids                                       # (5, 11)
    L = ids.shape[1]
    with torch.no_grad():
        logits, weights = model(ids, return_weights=True)
        assert torch.allclose(logits, model(ids), atol=1e-5)         # weights may take another backend
        assert len(weights) == 2 and all(w.shape == (5, 3, L, L) for w in weights)
        for w in weights:
            assert torch.allclose(w.sum(-1), torch.ones(5, 3, L), atol=1e-5)
            assert w.triu(1).abs().max() == 0                          # no weight on a later token
        changed = ids.clone()
        changed[:, 6:] = torch.randint(t.first_key, t.vocab_size, (5, L - 6))
        other = model(changed)
    assert torch.allclose(logits[:, :6], other[:, :6], atol=1e-6)     # the future does not reach the past
    assert not torch.allclose(logits[:, 6:], other[:, 6:])


def test_no_feed_forward_and_parameter_names():
    model = AttentionOnly(20, d_model=16, n_heads=2, n_layers=2, positions="learned")
    names = {n for n, _ in model.named_parameters()}
    assert not any("ffn" in n or "fc" in n or "mlp" in n for n in names)
    assert {"embed.weight", "pos_embed.weight", "unembed.weight", "norm.weight", "layers.1.q_proj.weight",
            "norms.0.weight"} <= names
    assert "pos_embed.weight" not in {n for n, _ in AttentionOnly(20, d_model=16, n_heads=2).named_parameters()}
    plain = AttentionOnly(20, d_model=16, n_heads=2, norm=None)
    assert not any("norm" in n for n, _ in plain.named_parameters())
    assert plain(torch.tensor([[1, 5, 7]])).shape == (1, 3, 20)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"positions": "sinusoidal"}, ValueError, "positions"),
    ({"norm": "batch"}, ValueError, "norm"),
    ({"d_model": 30, "n_heads": 4}, ValueError, "divide"),
    ({"n_layers": 0}, ValueError, "n_layers"),
    ({"d_model": 15, "n_heads": 5}, ValueError, "even"),
])
def test_bad_model_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        AttentionOnly(20, **kwargs)


def test_bad_model_inputs():
    model = AttentionOnly(20, d_model=16, n_heads=2, max_positions=8, positions="learned")
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[1, 20]]))
    with pytest.raises(ValueError, match="max_positions"):
        model(torch.zeros(1, 9, dtype=torch.long))


# -----------------------------------------------------------------------------
# Loss and measurement


def test_loss_reads_the_answer_position_only():
    torch.manual_seed(2)
    t = RecallTask()
    model = AttentionOnly(t.vocab_size, d_model=16, n_heads=2, max_positions=t.max_len)
    b = t.batch(8, seed=5)
    loss, n = recall_loss(model, b)
    logits = model(b.ids)
    expected = F.cross_entropy(torch.stack([logits[i, int(b.lengths[i]) - 1] for i in range(8)]), b.answer)
    assert n == 8 and torch.allclose(loss, expected)
    # right padding changes nothing: a row alone gives the same answer logits as in the batch
    i = int(b.lengths.argmin())
    alone = model(b.ids[i:i + 1, :int(b.lengths[i])])[0, -1]
    assert torch.allclose(alone, logits[i, int(b.lengths[i]) - 1], atol=1e-5)
    with pytest.raises(TypeError, match="RecallBatch"):
        recall_loss(model, b.ids)


class _Lookup(torch.nn.Module):
    """A stub: answers correctly on `right` rows; layer 0 head 0 puts all its weight on the
    matching value, head 1 splits it 1/4 key, 1/4 value, 1/2 BOS; layer 1 is uniform."""

    def __init__(self, batch: RecallBatch, right: torch.Tensor, vocab: int):
        super().__init__()
        self.batch, self.right, self.vocab = batch, right, vocab
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, ids, return_weights=False):
        B, L = ids.shape
        start = next(i for i in range(self.batch.ids.shape[0] - B + 1) if torch.equal(self.batch.ids[i:i + B], ids))
        b = RecallBatch(*(x[start:start + B] for x in self.batch))
        r = torch.arange(B)
        answer = torch.where(self.right[start:start + B], b.answer, b.answer.new_full((B,), 4))
        logits = torch.zeros(B, L, self.vocab)
        logits[r, b.lengths - 1, answer] = 1.0
        w0 = torch.zeros(B, 2, L, L)
        w0[r, 0, b.lengths - 1, b.value_pos] = 1.0
        w0[r, 1, b.lengths - 1, b.key_pos] = 0.25
        w0[r, 1, b.lengths - 1, b.value_pos] = 0.25
        w0[r, 1, b.lengths - 1, 0] = 0.5
        w1 = torch.ones(B, 2, L, L).tril() / torch.arange(1, L + 1)[:, None]
        return (logits, [w0, w1]) if return_weights else logits


def test_measurement_on_known_weights():
    t = RecallTask()
    b = t.batch(40, seed=6)
    right = torch.arange(40) % 4 != 0                                  # 30 of 40 correct
    ev = evaluate_recall(_Lookup(b, right, t.vocab_size), b, batch_size=7)
    assert ev.accuracy == 0.75
    assert ev.key_mass.shape == ev.value_mass.shape == (2, 2)
    np.testing.assert_allclose(ev.key_mass[0], [0.0, 0.25], atol=1e-12)
    np.testing.assert_allclose(ev.value_mass[0], [1.0, 0.25], atol=1e-12)
    uniform = float(np.mean(1.0 / b.lengths.double().numpy()))       # 1/L of each row on one token
    np.testing.assert_allclose(ev.pair_mass[1], [2 * uniform] * 2, rtol=1e-6)


def test_recall_attention_of_one_sequence():
    torch.manual_seed(3)
    t = RecallTask()
    model = AttentionOnly(t.vocab_size, max_positions=t.max_len)
    b = t.batch(2, seed=9)
    ids = b.ids[0, :int(b.lengths[0])]
    w, labels = recall_attention(model, t, ids, layer=1, head=2)
    assert isinstance(w, np.ndarray) and w.shape == (len(ids), len(ids)) and w.dtype == np.float32
    assert labels[0] == "BOS" and labels[-2] == "?" and labels[1].startswith("k") and labels[2].startswith("v")
    with torch.no_grad():
        expected = model(ids[None], return_weights=True)[1][1][0, 2]
    np.testing.assert_array_equal(w, expected.numpy())
    with pytest.raises(ValueError, match="out of range"):
        recall_attention(model, t, ids, layer=2, head=0)
    if int(b.lengths[1]) < b.ids.shape[1]:
        with pytest.raises(ValueError, match="PAD"):
            recall_attention(model, t, b.ids[1], layer=0, head=0)


def test_train_recall_refuses_bad_arguments():
    with pytest.raises(ValueError, match="unknown hyper-parameters"):
        train_recall(lr_max=1.0)
    with pytest.raises(ValueError, match="eval_seed"):
        train_recall(seed=EVAL_SEED)
    with pytest.raises(ValueError, match="train_min_pairs"):
        train_recall(train_min_pairs=9)
    with pytest.raises(ValueError, match="distinct"):
        train_recall(n_keys=8)


@pytest.mark.slow
def test_train_recall_finds_the_lookup_head():
    """The default recipe (RECALL_RECIPE, ~1 minute on one thread): >= 99% held-out accuracy and
    a head whose query puts >= 0.9 of its attention on the matching pair."""
    r = train_recall(seed=0)
    assert r.history.steps == RECALL_RECIPE["steps"]
    assert r.accuracy >= 0.99, r.table()
    assert r.best_mass >= 0.9, r.table()
    assert r.key_mass.shape == (2, 3) and r.pair_mass[r.best_layer, r.best_head] == r.best_mass
    assert r.best_mass == r.pair_mass.max()
    w, labels = r.example(0)
    L = int(r.held_out.lengths[0])
    assert w.shape == (L, L) and len(labels) == L and labels[-2] == "?"
    # on this sequence too, the query's weight on the matching pair is most of it
    kp, vp = int(r.held_out.key_pos[0]), int(r.held_out.value_pos[0])
    assert w[-1, kp] + w[-1, vp] > 0.5
    assert "<- best" in r.table()
