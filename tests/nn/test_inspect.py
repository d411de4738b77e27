"""Tests for qkv.inspect: capturing attention weights from qkv models on every backend.

Legend: B batch, Hq query heads, Hkv key/value heads, L sequence length, Lq/Lk query/key
lengths, nh captured heads, R captured rows, T real tokens of a packed batch.

Oracles are float64 runs of the same modules through the `math` backend (the library's
own materialised weights), or explicit float64 formulas written out here; baselines are
the float32 `math` weights; candidates are the captures taken while sdpa / tiled / auto
run the model. The rule is conftest.assert_error_ratio.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import qkv
from qkv import inspect as qi
from qkv.layers import Block, MultiHeadAttention
from qkv.models import Decoder, DecoderConfig, Encoder, EncoderConfig
from qkv.positional import RotaryEmbedding
from conftest import assert_error_ratio


def make_mha(d_model=32, n_heads=4, *, seed=0, **kw) -> MultiHeadAttention:
    """A float32 attention module with random (never zero) weights."""
    torch.manual_seed(seed)
    m = MultiHeadAttention(d_model, n_heads, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return m.eval()


def randn(*shape, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).float()


def math_weights(m: torch.nn.Module, *args, **kw) -> torch.Tensor:
    """The library's materialised weights (B, Hq, Lq, Lk) through the `math` backend."""
    with torch.no_grad(), qkv.use_backend("math"):
        return m(*args, return_weights=True, **kw)[1]


def oracle_weights(m: torch.nn.Module, *args, **kw) -> torch.Tensor:
    """The same module and inputs in float64, through `math`."""
    m64 = copy.deepcopy(m).double()
    args = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    return math_weights(m64, *args, **kw)


# -----------------------------------------------------------------------------
# Every backend, every mask: captured weights against the float64 oracle


L, B = 24, 2
DENSE = torch.rand(B, 1, L, L, generator=torch.Generator().manual_seed(3)) < 0.4
DENSE[1, 0, 5] = False                                     # one query row with no allowed key

MASKS = {
    "none": {},
    "causal": {"causal": True},
    "sliding_window": {"mask": qkv.masks.sliding_window(5)},
    "padding": {"mask": qkv.masks.padding([L, 13])},
    "document": {"mask": qkv.masks.document(torch.tensor([0] * 7 + [1] * 10 + [2] * 7)), "causal": True},
    "prefix_lm": {"mask": qkv.masks.prefix_lm(6)},
    "callable": {"mask": lambda b, h, q, kv: ((q + kv + h) % 3 != 0) | (kv == q)},
    "dense": {"mask": DENSE},
}


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("backend", ["sdpa", "tiled", "auto"])
@pytest.mark.parametrize("case", list(MASKS))
def test_capture_matches_math_weights_on_every_backend(case, backend, n_kv_heads):
    m = make_mha(32, 4, n_kv_heads=n_kv_heads)
    x = randn(B, L, 32)
    kw = MASKS[case]
    oracle, baseline = oracle_weights(m, x, **kw), math_weights(m, x, **kw)
    m.backend = backend
    with torch.no_grad():
        plain = m(x, **kw)
        with qi.capture(m) as cap:
            out = m(x, **kw)
    assert torch.equal(out, plain), "capturing changed the output"
    assert cap.maps.names == ["MultiHeadAttention"]
    got = cap.maps["MultiHeadAttention"]
    assert got.shape == (B, 4, L, L) and got.dtype == torch.float32
    assert_error_ratio(got, baseline, oracle, what=f"{case} {backend} Hkv={n_kv_heads}")
    # weights are what they claim: rows with an allowed key sum to 1, the others are all zero
    sums = got.double().sum(-1)
    live = oracle.sum(-1) > 0
    assert torch.allclose(sums[live], torch.ones_like(sums[live]), atol=1e-5)
    assert torch.equal(got[~live], torch.zeros_like(got[~live]))
    if case == "dense":
        assert not bool(live[1, :, 5].any())


@pytest.mark.parametrize("backend", ["sdpa", "tiled"])
def test_rope_and_cross_attention_bottom_right(backend):
    """RoPE'd queries/keys, cross-attention with Lq < Lk and a bottom-right causal mask."""
    m = make_mha(32, 4, n_kv_heads=2, rope=RotaryEmbedding(8))
    x, ctx = randn(B, 6, 32, seed=1), randn(B, 15, 32, seed=2)
    pos, cpos = torch.arange(9, 15), torch.arange(15)
    kw = dict(causal=True, positions=pos, context_positions=cpos)
    oracle, baseline = oracle_weights(m, x, ctx, **kw), math_weights(m, x, ctx, **kw)
    m.backend = backend
    with torch.no_grad():
        plain = m(x, ctx, **kw)
        with qi.capture(m) as cap:
            out = m(x, ctx, **kw)
    assert torch.equal(out, plain)
    got = cap.maps["MultiHeadAttention"]
    assert got.shape == (B, 4, 6, 15)
    assert_error_ratio(got, baseline, oracle, what=f"rope cross {backend}")
    assert cap.maps.positions["MultiHeadAttention"].tolist() == list(range(9, 15))   # q_offset = Lk - Lq
    assert float(got[..., 0, 10:].abs().max()) == 0.0                                 # row 0 is position 9


@pytest.mark.parametrize("backend", ["tiled", "auto"])
@pytest.mark.parametrize("n_kv_heads", [4, 1])
def test_alibi_and_rope(backend, n_kv_heads):
    m = make_mha(32, 4, n_kv_heads=n_kv_heads, alibi=True, rope=RotaryEmbedding(8))
    x = randn(B, L, 32)
    kw = {"mask": qkv.masks.sliding_window(9)}
    oracle, baseline = oracle_weights(m, x, **kw), math_weights(m, x, **kw)
    m.backend = backend
    with torch.no_grad():
        plain = m(x, **kw)
        with qi.capture(m, heads=[3, 0], rows=[-1, 2, 7]) as cap:
            out = m(x, **kw)
    assert torch.equal(out, plain)
    got = cap.maps["MultiHeadAttention"]
    pick = lambda w: w[:, [3, 0]][:, :, [L - 1, 2, 7]]
    assert_error_ratio(got, pick(baseline), pick(oracle), what=f"alibi {backend} Hkv={n_kv_heads}")
    assert cap.maps.heads["MultiHeadAttention"].tolist() == [3, 0]
    assert cap.maps.rows["MultiHeadAttention"].tolist() == [L - 1, 2, 7]


def test_outputs_and_gradients_unchanged_in_training_mode():
    """Autograd through a captured forward gives the same gradients, bit for bit."""
    m = make_mha(32, 4, n_kv_heads=2, rope=RotaryEmbedding(8)).train()
    x = randn(B, L, 32).requires_grad_()
    out = m(x, causal=True)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    with qi.capture(m, rows=[0, -1]):
        out2 = m(x, causal=True)
    (gx2,) = torch.autograd.grad(out2.square().sum(), x)
    assert torch.equal(out, out2) and torch.equal(gx, gx2)
    assert qi.ATTENTION_HOOK.get() is None


def test_torch_style_multihead_attention_is_captured():
    torch.manual_seed(0)
    mha = qkv.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = randn(2, 7, 16)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True                                       # torch convention: True = padding
    ref_out, ref_w = mha(x, x, x, key_padding_mask=pad, average_attn_weights=False)
    with torch.no_grad(), qi.capture(mha) as cap:
        out, _ = mha(x, x, x, key_padding_mask=pad, need_weights=False)
        out_w, _ = mha(x, x, x, key_padding_mask=pad)
    assert torch.equal(out_w, ref_out)
    assert cap.maps.names == ["MultiheadAttention", "MultiheadAttention#1"]
    for name in cap.maps:
        assert torch.allclose(cap.maps[name], ref_w, atol=1e-6)
    assert float(cap.maps["MultiheadAttention"][1, :, :, 5:].abs().max()) == 0.0


# -----------------------------------------------------------------------------
# Selection, repeated calls, nesting


def tiny_decoder(**kw) -> Decoder:
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, positions="rope", max_positions=64,
               layer_windows=[None, 5, None])
    return Decoder(DecoderConfig(**{**cfg, **kw})).eval()


def decoder_weights(model: Decoder, tokens: torch.Tensor, dtype) -> list[torch.Tensor]:
    """Each layer's (B, Hq, L, L) weights through `math`, running the blocks as Decoder.hidden does."""
    model = copy.deepcopy(model).to(dtype)
    with torch.no_grad(), qkv.use_backend("math"):
        x = model.embed(tokens)
        pos = torch.arange(tokens.shape[1])
        out = []
        for block, window in zip(model.layers, model.windows):
            mask = qkv.masks.causal() if window is None else qkv.masks.sliding_window(window)
            x, w = block(x, mask=mask, positions=pos, return_weights=True)
            out.append(w["self"])
    return out


def test_decoder_capture_all_layers():
    model = tiny_decoder()
    tokens = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(0))
    oracle, baseline = decoder_weights(model, tokens, torch.float64), decoder_weights(model, tokens, torch.float32)
    with torch.no_grad():
        plain = model(tokens)
        maps = qi.attention_maps(model, tokens)
        with qi.capture(model):
            again = model(tokens)
    assert torch.equal(again, plain)
    assert maps.names == [f"layers.{i}.self_attn" for i in range(3)]
    for i, name in enumerate(maps.names):
        assert_error_ratio(maps[name], baseline[i], oracle[i], what=name)
    assert float(maps["layers.1.self_attn"][:, :, 10, :6].abs().max()) == 0.0   # window 5 at row 10
    arrays = maps.to_numpy(batch=1)
    assert set(arrays) == set(maps.names)
    assert arrays["layers.2.self_attn"].shape == (4, 20, 20) and arrays["layers.2.self_attn"].dtype == np.float32
    np.testing.assert_array_equal(arrays["layers.0.self_attn"], maps["layers.0.self_attn"][1].numpy())


def test_layer_head_row_selection():
    model = tiny_decoder()
    tokens = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(0))
    full = qi.attention_maps(model, tokens)
    maps = qi.attention_maps(model, tokens, layers=[-1, "layers.0.self_attn", 2], heads=[-1, 1], rows=[19, 0, -3])
    assert maps.names == ["layers.0.self_attn", "layers.2.self_attn"]      # call order; a duplicate counts once
    for name in maps.names:
        assert torch.equal(maps.heads[name], torch.tensor([3, 1]))
        assert torch.equal(maps.rows[name], torch.tensor([19, 0, 17]))
        assert torch.equal(maps.positions[name], torch.tensor([19, 0, 17]))
        assert torch.allclose(maps[name], full[name][:, [3, 1]][:, :, [19, 0, 17]], atol=1e-6)
    one = qi.attention_maps(model, tokens, layers=1, heads=2, rows=5)
    assert one.names == ["layers.1.self_attn"] and one["layers.1.self_attn"].shape == (2, 1, 1, 20)
    assert [n for n, _ in qi.attention_modules(model)] == [f"layers.{i}.self_attn" for i in range(3)]


def test_repeated_and_shared_modules_give_one_entry_per_call():
    m = make_mha(16, 2)
    shared = torch.nn.Sequential(m, m)                     # the same module twice: one name
    x = randn(1, 5, 16)
    with torch.no_grad(), qi.capture(shared) as cap:
        y = shared(x)
    assert cap.maps.names == ["0", "0#1"]
    with torch.no_grad():
        assert torch.allclose(cap.maps["0#1"], math_weights(m, m(x)), atol=1e-6)
        assert torch.equal(y, m(m(x)))


def test_nested_captures_both_record():
    m = make_mha(16, 2)
    x = randn(1, 5, 16)
    with torch.no_grad(), qi.capture(m, heads=0) as outer:
        with qi.capture(m, rows=[-1]) as inner:
            m(x)
        m(x)
    assert outer.maps.names == ["MultiHeadAttention", "MultiHeadAttention#1"]
    assert inner.maps.names == ["MultiHeadAttention"]
    assert torch.allclose(inner.maps["MultiHeadAttention"][:, :1], outer.maps["MultiHeadAttention"][:, :, -1:])
    assert qi.ATTENTION_HOOK.get() is None


def test_block_with_cross_attention_names_both():
    torch.manual_seed(0)
    blk = Block(16, 2, cross_attention=True).eval()
    x, ctx = randn(2, 5, 16), randn(2, 9, 16, seed=2)
    cmask = qkv.masks.padding([9, 4])
    with torch.no_grad():
        ref_x = blk(x, causal=True, context=ctx, context_mask=cmask)
        ref_w = blk(x, causal=True, context=ctx, context_mask=cmask, return_weights=True)[1]
        with qi.capture(blk) as cap:
            out = blk(x, causal=True, context=ctx, context_mask=cmask)
    assert torch.equal(out, ref_x)
    assert cap.maps.names == ["self_attn", "cross_attn"]
    assert torch.allclose(cap.maps["self_attn"], ref_w["self"], atol=1e-6)
    assert torch.allclose(cap.maps["cross_attn"], ref_w["cross"], atol=1e-6)


def test_seq2seq_cross_attention_rows():
    from qkv.models import Seq2Seq, Seq2SeqConfig

    torch.manual_seed(0)
    model = Seq2Seq(Seq2SeqConfig(vocab_size=30, d_model=16, n_heads=2, encoder_layers=1, decoder_layers=1,
                                  dropout=0.0, max_positions=32)).eval()
    src = torch.randint(3, 30, (2, 9), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([9, 4])
    tgt = torch.randint(3, 30, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(src, lengths, tgt)
        with qi.capture(model, rows=[-1]) as cap:
            out = model(src, lengths, tgt)
    assert torch.equal(out, plain)
    names = [n for n, _ in qi.attention_modules(model)]
    assert len(names) == 3 and cap.maps.names == names     # encoder self, decoder self, decoder cross
    cross = cap.maps[names[2]]                             # (B, H, 1, Ls): last target row over the source
    assert cross.shape == (2, 2, 1, 9)
    assert float(cross[1, :, 0, 4:].abs().max()) == 0.0    # the source padding of row 1
    assert torch.allclose(cross.sum(-1), torch.ones(2, 2, 1))


# -----------------------------------------------------------------------------
# Encoder: padded and auto-packed batches


def tiny_encoder() -> Encoder:
    torch.manual_seed(0)
    return Encoder(EncoderConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_positions=32)).eval()


def test_encoder_packed_batch_is_mapped_back_to_padded_layout():
    model = tiny_encoder()
    ids = torch.randint(3, 50, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(3, 12, dtype=torch.long)
    for b, n in enumerate([12, 5, 8]):
        mask[b, :n] = 1
    assert Encoder.should_pack(mask.bool())                 # packed=None packs this batch
    real = mask.bool()
    with torch.no_grad():
        plain = model(ids, mask).last_hidden_state
        oracle = copy.deepcopy(model).double()(ids, mask, return_weights=True).attentions
        with qkv.use_backend("math"):
            baseline = model(ids, mask, return_weights=True).attentions
        with qi.capture(model) as cap:
            out = model(ids, mask).last_hidden_state
        with qi.capture(model, layers=-1, heads=[2], rows=[0, -1, 4]) as some:
            model(ids, mask)
        unpacked = qi.attention_maps(model, ids, mask, packed=False)
    assert torch.equal(out, plain)
    assert cap.maps.names == ["layers.0.self_attn", "layers.1.self_attn"]
    for i, name in enumerate(cap.maps.names):
        got = cap.maps[name]
        assert got.shape == (3, 4, 12, 12)
        rows = real[:, None, :, None].expand_as(got)        # real query rows: the padded run's weights
        assert_error_ratio(got[rows], baseline[i][rows], oracle[i][rows], what=f"packed {name}")
        assert float(got[~rows].abs().max()) == 0.0         # padded query rows: not computed, zeros
        assert_error_ratio(unpacked[name], baseline[i], oracle[i], what=f"padded {name}")
    w = some.maps["layers.1.self_attn"]
    assert w.shape == (3, 1, 3, 12)
    assert torch.allclose(w, cap.maps["layers.1.self_attn"][:, [2]][:, :, [0, 11, 4]], atol=1e-6)
    assert float(w[1, 0, 2].sum()) == pytest.approx(1.0, abs=1e-5)   # row 4 of the 5-token sentence is real
    assert float(w[1, 0, 1].abs().max()) == 0.0             # row 11 of a 5-token sentence is padding


# -----------------------------------------------------------------------------
# Long sequences: a few rows in bounded memory


def test_long_cross_attention_rows_against_float64():
    """64 queries over 30k keys, RoPE + ALiBi + bottom-right causal: three rows, on tiled."""
    Lq, Lk = 64, 30_000
    m = make_mha(16, 2, alibi=True, rope=RotaryEmbedding(8))
    x, ctx = randn(1, Lq, 16, seed=1), randn(1, Lk, 16, seed=2)
    kw = dict(causal=True, positions=torch.arange(Lk - Lq, Lk), context_positions=torch.arange(Lk))
    rows = [0, 17, -1]
    pick = lambda w: w[:, :, [0, 17, Lq - 1]]
    oracle, baseline = pick(oracle_weights(m, x, ctx, **kw)), pick(math_weights(m, x, ctx, **kw))
    m.backend = "tiled"
    with torch.no_grad():
        plain = m(x, ctx, **kw)
        with qi.capture(m, rows=rows) as cap:
            out = m(x, ctx, **kw)
    assert torch.equal(out, plain)
    got = cap.maps["MultiHeadAttention"]
    assert got.shape == (1, 2, 3, Lk)
    assert_error_ratio(got, baseline, oracle, what="30k keys")
    assert float(got[0, :, 0, Lk - Lq + 1:].abs().max()) == 0.0     # row 0 is position Lk - Lq


def test_long_self_attention_rows_bounded_memory(monkeypatch):
    """20k packed tokens (causal documents of 500) + RoPE + GQA on auto; four rows against a float64 formula.

    The recomputation never holds more than _STEP_CELLS scores (or one row of one kv group) at once."""
    n, doc = 20_000, 500
    m = make_mha(16, 4, n_kv_heads=2, rope=RotaryEmbedding(4))
    x = randn(1, n, 16)
    ids = torch.arange(n) // doc
    mask = qkv.masks.document(ids) & qkv.masks.causal()
    rows = [0, 499, 12_345, -1]
    seen = []
    real_softmax = qi.safe_softmax
    monkeypatch.setattr(qi, "safe_softmax", lambda s: (seen.append(s.numel()), real_softmax(s))[1])
    monkeypatch.setattr(qi, "_STEP_CELLS", 3 * n)           # blocks of one row of the two heads of a kv group
    with torch.no_grad():
        plain = m(x, mask=mask)
        with qi.capture(m, rows=rows) as cap:
            out = m(x, mask=mask)
        with pytest.raises(ValueError, match=r"Lq x Lk = 20000 x 20000.*rows="):
            with qi.capture(m):                             # the full matrix: refused, pointing at rows=
                m(x, mask=mask)
    assert torch.equal(out, plain)
    assert seen and max(seen) <= 2 * n
    got = cap.maps["MultiHeadAttention"]                    # (1, 4, 4, n)
    assert got.shape == (1, 4, 4, n)

    def projected(dtype):
        mm = copy.deepcopy(m).to(dtype)
        with torch.no_grad():
            xx = x.to(dtype)
            q = mm.q_proj(xx).view(1, n, 4, 4).transpose(1, 2)
            k = mm.k_proj(xx).view(1, n, 2, 4).transpose(1, 2)
            return mm.rope(q, k)

    q64, k64 = projected(torch.float64)
    idx = torch.tensor([0, 499, 12_345, n - 1])
    j = torch.arange(n)
    ok = (ids[idx][:, None] == ids[None]) & (j[None] <= idx[:, None])        # (4, n)
    oracle = torch.zeros(1, 4, 4, n, dtype=torch.float64)
    for h in range(4):
        s = q64[0, h, idx] @ k64[0, h // 2].T / math.sqrt(4)                # (4, n)
        oracle[0, h] = torch.softmax(s.masked_fill(~ok, -math.inf), dim=-1)
    q32, k32 = projected(torch.float32)
    baseline = qkv.attention_weights(q32, k32, rows=idx, mask=mask)
    assert_error_ratio(got, baseline, oracle, what="20k rows")
    assert float(got[0, :, 2, :12_000].abs().max()) == 0.0 and float(got[0, :, 2, 12_346:].abs().max()) == 0.0
    assert float(got[0, :, 0, 0].min()) == 1.0             # the first token sees only itself


# -----------------------------------------------------------------------------
# Statistics


def test_head_stats_against_hand_computed_values():
    w = torch.zeros(1, 3, 2, 4)
    w[0, 0, 0] = torch.tensor([1.0, 0, 0, 0])
    w[0, 0, 1] = torch.tensor([0.25, 0.25, 0.25, 0.25])
    w[0, 1, 0] = torch.tensor([0.5, 0.5, 0, 0])             # head 1, row 1: fully masked (all zero)
    positions = torch.tensor([1, 3])
    s = qi.head_stats(w, positions)
    assert set(s) == {"entropy", "distance", "first_token"}
    assert s["entropy"][:2].tolist() == pytest.approx([math.log(4) / 2, math.log(2)])
    # head 0: row at 1 attends key 0 (distance 1); row at 3 spreads over 3, 2, 1, 0 -> 1.5
    assert s["distance"][:2].tolist() == pytest.approx([(1 + 1.5) / 2, 0.5 * 1 + 0.5 * 0])
    assert s["first_token"][:2].tolist() == pytest.approx([(1 + 0.25) / 2, 0.5])
    assert all(math.isnan(float(v[2])) for v in s.values())  # head 2 has no row with an allowed key


def test_maps_stats_use_positions():
    m = make_mha(16, 2)
    x = randn(2, 9, 16)
    with torch.no_grad():
        maps = qi.attention_maps(m, x, causal=True, rows=[0, -1])
    stats = maps.stats()["MultiHeadAttention"]
    w = maps["MultiHeadAttention"]
    assert torch.allclose(stats["first_token"], w[..., 0].double().mean(dim=(0, 2)))
    # row 0 (position 0) can only attend to itself: entropy 0, distance 0
    expect_d = (w[:, :, 1].double() * (8 - torch.arange(9)).double()).sum(-1).mean(0) / 2
    assert torch.allclose(stats["distance"], expect_d)
    assert float(w[:, :, 0, 0].min()) == 1.0
    ent1 = -torch.xlogy(w[:, :, 1].double(), w[:, :, 1].double()).sum(-1).mean(0) / 2
    assert torch.allclose(stats["entropy"], ent1)


# -----------------------------------------------------------------------------
# Bad inputs: each a clear error saying what to do


def test_bad_layers_heads_rows():
    model = tiny_decoder()
    tokens = torch.randint(0, 50, (1, 10))
    with pytest.raises(ValueError, match=r"layer index 3 is out of range.*3 attention module.*0\.\.2"):
        qi.capture(model, layers=3)
    with pytest.raises(ValueError, match=r"layer index -4 is out of range"):
        qi.capture(model, layers=[0, -4])
    with pytest.raises(ValueError, match=r"no attention module named 'layers.9.self_attn'.*layers.0.self_attn"):
        qi.capture(model, layers="layers.9.self_attn")
    with pytest.raises(TypeError, match="layers must hold int indices or module names"):
        qi.capture(model, layers=[1.5])
    with pytest.raises(ValueError, match=r"head 4 is out of range.*4 heads.*0\.\.3"):
        qi.capture(model, heads=[0, 4])
    with pytest.raises(TypeError, match="heads must hold ints"):
        qi.capture(model, heads=[True])
    with pytest.raises(TypeError, match="rows must hold ints"):
        qi.capture(model, rows=[0.5])
    with pytest.raises(ValueError, match="max_cells must be >= 1"):
        qi.capture(model, max_cells=0)
    with pytest.raises(ValueError, match=r"row 10 is out of range.*Lq=10.*0\.\.9"):
        qi.attention_maps(model, tokens, rows=[10])
    with pytest.raises(ValueError, match=r"Lq x Lk = 10 x 10 = 100.*max_cells=99.*rows="):
        qi.attention_maps(model, tokens, max_cells=99)
    with pytest.raises(ValueError, match=r"3 rows x Lk=10 keys.*max_cells=20"):
        qi.attention_maps(model, tokens, rows=[0, 1, 2], max_cells=20)
    assert qi.ATTENTION_HOOK.get() is None                  # an error inside the block leaves no hook behind
    cap = qi.capture(model)
    with cap:
        pass
    with pytest.raises(RuntimeError, match="new qkv.inspect.capture"):
        with cap:
            pass
    maps = qi.attention_maps(model, tokens, layers=0)
    with pytest.raises(ValueError, match=r"batch must be an int in 0\.\.0"):
        maps.to_numpy(batch=1)
    with pytest.raises(KeyError, match="layers.0.self_attn"):
        maps["nope"]


def test_not_a_qkv_model():
    with pytest.raises(ValueError, match="holds no qkv attention module"):
        qi.capture(torch.nn.Linear(4, 4))
    layer = torch.nn.TransformerEncoderLayer(16, 2, batch_first=True)   # torch's own attention
    with pytest.raises(ValueError, match=r"TransformerEncoderLayer holds no qkv attention module.*qkv.models"):
        qi.capture(layer)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        qi.capture("gpt2")

    class Wrapper:                                          # e.g. a SentenceEncoder: the module is .model
        model = tiny_encoder()

    with pytest.raises(TypeError, match=r"pass its \.model"):
        qi.capture(Wrapper())


def test_kv_cache_is_refused_before_the_cache_changes():
    model = tiny_decoder()
    cache = model.new_cache(1)
    tokens = torch.randint(0, 50, (1, 6))
    with pytest.raises(ValueError, match=r"KV cache.*run the model without cache="):
        with torch.no_grad(), qi.capture(model, layers=-1):
            model(tokens, cache=cache)
    assert int(cache.lengths.max()) == 0
    with torch.no_grad():
        model(tokens, cache=cache)                          # outside a capture the cache works as before
    assert int(cache.lengths.max()) == 6


def test_bad_mask_is_reported_like_attention_does():
    m = make_mha(16, 2)
    x = randn(1, 5, 16)
    with pytest.raises(TypeError, match="must be bool"):
        with torch.no_grad(), qi.capture(m):
            m(x, mask=torch.ones(5, 5))


def test_an_approximate_attention_layer_is_refused_with_what_to_use_instead():
    from qkv.layers import MultiHeadAttention

    layer = MultiHeadAttention(16, 2, attention="linear")
    x = torch.randn(1, 5, 16)
    with pytest.raises(ValueError, match="no softmax weights.*implied_weights"):
        qi.attention_maps(layer, x, causal=True)
