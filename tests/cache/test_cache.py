"""Tests for qkv.cache: contiguous, ring and paged KV caches, the block pool, and cached decoding.

Legend: B batch (sequences), Hq query heads, Hkv key/value heads, L tokens, n new tokens per call,
D head dim, W sliding window, bs block size, V vocabulary.

The oracle for a cached decode is the same model's full forward over the whole sequence
(teacher forcing, no cache), in float64, where both must agree to rounding. Layer-level tests
compare against `qkv.attention` over the full history with the matching mask.
"""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.cache import (BlockPool, Cache, CacheFull, ContiguousCache, PagedCache, RingCache, cache_bytes)
from qkv.models import Decoder, DecoderConfig
from conftest import assert_error_ratio

F64 = torch.float64
TOL = 1e-10          # cached vs full forward, float64 (different summation orders)
EXACT = 1e-12        # paged vs contiguous, batch vs one-by-one, float64
V = 61


# -----------------------------------------------------------------------------
# helpers


def tiny(arch: str, **kw) -> DecoderConfig:
    """Tiny configs of each family: 32 wide, 4 query heads of 8 channels."""
    base = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, ffn_hidden=48, max_positions=64)
    if arch == "gpt2":
        return DecoderConfig.gpt2(**{**base, **kw})
    if arch == "llama":      # GQA 4/2 and llama3 RoPE scaling that changes the low frequencies
        scaling = {"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_positions": 8}
        return DecoderConfig.llama(**{**base, "n_kv_heads": 2, "rope_base": 100.0, "rope_scaling": scaling, **kw})
    if arch == "mistral":    # every layer windowed, window well below the sequence length
        return DecoderConfig.mistral(**{**base, "n_kv_heads": 2, "rope_base": 100.0, "sliding_window": 4, **kw})
    if arch == "mixed":      # windowed and full layers in one model
        return DecoderConfig.mistral(**{**base, "n_layers": 3, "n_kv_heads": 2, "rope_base": 100.0,
                                        "sliding_window": None, "layer_windows": [3, None, 5], **kw})
    if arch == "mqa":
        return DecoderConfig.llama(**{**base, "n_kv_heads": 1, **kw})
    raise AssertionError(arch)


def make_model(config: DecoderConfig, *, seed: int = 0, dtype=F64) -> Decoder:
    """A model with random weights large enough that attention is far from uniform."""
    torch.manual_seed(seed)
    model = Decoder(config, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=F64)
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.25 * noise)
    return model.eval()


_MODELS: dict = {}
_SEEDS = {"gpt2": 0, "llama": 1, "mistral": 2, "mixed": 3, "mqa": 4}


def model_for(arch: str) -> Decoder:
    """One model per family, shared by the tests (read-only: a cached decode never changes weights)."""
    if arch not in _MODELS:
        _MODELS[arch] = make_model(tiny(arch), seed=_SEEDS[arch])
    return _MODELS[arch]


def tokens(B: int, L: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, L), generator=g)


def diff(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def run_cached(model, toks, cache, chunks):
    """Feed toks (B, L) through the cache chunk by chunk; (B, L, V) logits, checking lengths on the way."""
    outs, s = [], 0
    for n in chunks:
        outs.append(model(toks[:, s:s + n], cache=cache))
        s += n
        assert cache.lengths.tolist() == [s] * toks.shape[0]
    assert s == toks.shape[1]
    return torch.cat(outs, dim=1)


CACHES = {
    "ring": dict(max_len=32),
    "flat": dict(max_len=32, ring=False),
    "paged1": dict(kind="paged", block_size=1, max_len=32),
    "paged3": dict(kind="paged", block_size=3, max_len=32),
    "paged16": dict(kind="paged", block_size=16, max_len=32),
}

L_SEQ = 13
SCHEDULES = {
    "steps": [1] * L_SEQ,
    "prefill5": [5] + [1] * (L_SEQ - 5),
    "chunked": [4, 3, 2] + [1] * (L_SEQ - 9),
    "two_chunks": [6, 7],
}


# -----------------------------------------------------------------------------
# cached decode == full forward


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("kind", list(CACHES))
@pytest.mark.parametrize("arch", ["gpt2", "llama", "mistral", "mixed"])
def test_cached_decode_equals_full_forward(arch, kind, schedule):
    model = model_for(arch)
    toks = tokens(2, L_SEQ, seed=1)
    with torch.no_grad():
        full = model(toks)                                                   # (2, L, V)
        cache = model.new_cache(2, **CACHES[kind])
        got = run_cached(model, toks, cache, SCHEDULES[schedule])
    assert got.shape == full.shape
    assert diff(got, full) < TOL, f"{arch}/{kind}/{schedule}: {diff(got, full):.2e}"


@pytest.mark.parametrize("arch", ["mistral", "mixed"])
def test_cache_layer_kinds_follow_windows(arch):
    model = model_for(arch)
    ring, flat, paged = model.new_cache(1, max_len=32), model.new_cache(1, max_len=32, ring=False), \
        model.new_cache(1, kind="paged", max_len=32)
    assert ring.kind == flat.kind == "contiguous" and paged.kind == "paged"
    for i, w in enumerate(model.windows):
        assert ring.layers[i].window == flat.layers[i].window == paged.layers[i].window == w
        assert isinstance(ring.layers[i], RingCache if w is not None else ContiguousCache)
        assert type(flat.layers[i]) is ContiguousCache
        assert type(paged.layers[i]) is PagedCache
    if arch == "mistral":
        assert all(isinstance(layer, RingCache) for layer in ring.layers)


@pytest.mark.parametrize("kind", ["ring", "paged3"])
def test_mqa_cached_decode_equals_full_forward(kind):
    model = model_for("mqa")
    toks = tokens(3, 9, seed=2)
    with torch.no_grad():
        full = model(toks)
        got = run_cached(model, toks, model.new_cache(3, **CACHES[kind]), [3, 1, 1, 2, 1, 1])
    assert diff(got, full) < TOL


def test_last_only_with_cache_is_last_row():
    model = model_for("llama")
    toks = tokens(2, 7, seed=3)
    with torch.no_grad():
        full = model(toks)
        c = model.new_cache(2, max_len=16)
        last = model(toks[:, :5], cache=c, last_only=True)
        assert last.shape == (2, 1, V)
        step = model(toks[:, 5:7], cache=c, last_only=True)
    assert diff(last[:, 0], full[:, 4]) < TOL and diff(step[:, 0], full[:, 6]) < TOL


def test_fp32_cached_decode_error_ratio():
    """float32: cached decode is as accurate as the float32 full forward (against a float64 copy)."""
    for arch in ("gpt2", "llama", "mistral"):
        model64 = model_for(arch)
        model32 = Decoder(tiny(arch), dtype=torch.float32).eval()
        model32.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
        toks = tokens(2, 11, seed=4)
        with torch.no_grad():
            oracle = model64(toks)
            base = model32(toks)
            for kind in ("ring", "paged3"):
                got = run_cached(model32, toks, model32.new_cache(2, **CACHES[kind]), [4, 1, 1, 3, 1, 1])
                assert got.dtype == torch.float32
                assert_error_ratio(got, base, oracle, what=f"{arch}/{kind}")


# -----------------------------------------------------------------------------
# ragged batches: rows prefilled separately, then batched decode steps

PROMPT_LENS = [5, 1, 9]


def ragged(model, cache, prompts, steps):
    """Prefill each prompt through cache.row(b), then decode steps (B, T) one column at a time."""
    with torch.no_grad():
        pre = [model(p[None], cache=cache.row(b)) for b, p in enumerate(prompts)]
        assert cache.lengths.tolist() == [len(p) for p in prompts]
        dec = [model(steps[:, t:t + 1], cache=cache) for t in range(steps.shape[1])]
    return pre, torch.cat(dec, dim=1)                                          # list of (1, Lb, V), (B, T, V)


def prompts_and_steps(seed=5, T=6):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, V, (n,), generator=g) for n in PROMPT_LENS]
    steps = torch.randint(0, V, (len(prompts), T), generator=g)
    return prompts, steps


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mistral", "mixed"])
def test_paged_equals_contiguous_on_ragged_batch(arch):
    model = model_for(arch)
    prompts, steps = prompts_and_steps()
    B = len(prompts)
    results = {}
    for name, kw in [("ring", dict(max_len=24)), ("flat", dict(max_len=24, ring=False)),
                     ("paged1", dict(kind="paged", block_size=1, max_len=24)),
                     ("paged3", dict(kind="paged", block_size=3, max_len=24)),
                     ("paged16", dict(kind="paged", block_size=16, max_len=24))]:
        results[name] = ragged(model, model.new_cache(B, **kw), prompts, steps)
    ref_pre, ref_dec = results["flat"]
    for name, (pre, dec) in results.items():
        assert diff(dec, ref_dec) < EXACT, f"{name}: decode differs by {diff(dec, ref_dec):.2e}"
        for b in range(B):
            assert diff(pre[b], ref_pre[b]) < EXACT, name
    # and both equal the full forward of each row's whole sequence
    with torch.no_grad():
        for b, p in enumerate(prompts):
            seq = torch.cat([p, steps[b]])[None]
            full = model(seq)
            assert diff(ref_pre[b], full[:, :len(p)]) < TOL
            assert diff(ref_dec[b], full[0, len(p):]) < TOL


@pytest.mark.parametrize("kind", ["ring", "flat", "paged3"])
@pytest.mark.parametrize("arch", ["llama", "mixed"])
def test_batch_equals_prompts_one_by_one(arch, kind):
    model = model_for(arch)
    prompts, steps = prompts_and_steps(seed=6)
    _, batched = ragged(model, model.new_cache(len(prompts), **CACHES[kind]), prompts, steps)
    for b, p in enumerate(prompts):
        _, alone = ragged(model, model.new_cache(1, **CACHES[kind]), [p], steps[b:b + 1])
        assert diff(batched[b], alone[0]) < EXACT, f"row {b}: {diff(batched[b], alone[0]):.2e}"


@pytest.mark.parametrize("kind", ["ring", "flat", "paged3"])
@pytest.mark.parametrize("arch", ["gpt2", "mistral", "mixed"])
def test_multi_token_chunk_on_ragged_batch(arch, kind):
    """A (B, 3) chunk appended to rows of different lengths, then a decode step."""
    model = model_for(arch)
    prompts, steps = prompts_and_steps(seed=7, T=4)
    cache = model.new_cache(len(prompts), **CACHES[kind])
    with torch.no_grad():
        for b, p in enumerate(prompts):
            model(p[None], cache=cache.row(b))
        chunk = model(steps[:, :3], cache=cache)                                # (B, 3, V)
        step = model(steps[:, 3:], cache=cache)                                 # (B, 1, V)
        assert cache.lengths.tolist() == [n + 4 for n in PROMPT_LENS]
        for b, p in enumerate(prompts):
            full = model(torch.cat([p, steps[b]])[None])[0, len(p):]           # (4, V)
            assert diff(chunk[b], full[:3]) < TOL and diff(step[b], full[3:]) < TOL


# -----------------------------------------------------------------------------
# layer-level: step-by-step appends against qkv.attention over the full history

Hq, Hkv, D = 4, 2, 8


def rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64)


def layer_cache(kind, B, window, *, max_len=40, bs=3):
    if kind == "ring":
        return RingCache(B, Hkv, D, window, dtype=F64)
    if kind == "flat":
        return ContiguousCache(B, Hkv, D, max_len, window=window, dtype=F64)
    pool = BlockPool(B * -(-max_len // bs), bs)
    return PagedCache(pool, Hkv, D, seqs=[pool.new_sequence() for _ in range(B)], window=window, dtype=F64)


def history_oracle(q, k, v, window):
    """The NumPy float64 oracle over the whole history with the layer's mask."""
    mask = qkv.masks.causal() if window is None else qkv.masks.sliding_window(window)
    return qkv.attention(q, k, v, mask=mask, backend="reference")


@pytest.mark.parametrize("chunks", [[1] * 16, [1, 1, 2, 5, 1, 1, 4, 1], [7, 9]])
@pytest.mark.parametrize("kind,window", [("ring", 3), ("ring", 1), ("flat", 3), ("flat", None),
                                         ("paged", 3), ("paged", None)])
def test_layer_cache_equals_attention_over_history(kind, window, chunks):
    B, L = 2, sum(chunks)
    q, k, v = rand(B, Hq, L, D, seed=1), rand(B, Hkv, L, D, seed=2), rand(B, Hkv, L, D, seed=3)
    expected = history_oracle(q, k, v, window)
    cache = layer_cache(kind, B, window)
    outs, s = [], 0
    for n in chunks:
        outs.append(cache.attention(q[:, :, s:s + n], k[:, :, s:s + n], v[:, :, s:s + n]))
        s += n
        assert cache.length.tolist() == [s, s]
    assert diff(torch.cat(outs, dim=2), expected) < EXACT


@pytest.mark.parametrize("kind,window", [("ring", 3), ("flat", 3), ("flat", None), ("paged", 3), ("paged", None)])
def test_layer_cache_ragged_rows(kind, window):
    """Rows filled separately through row(b), then batched single-token steps."""
    lens, T = [6, 2], 5
    caches = layer_cache(kind, 2, window)
    hist = [(rand(1, Hq, n + T, D, seed=10 + b), rand(1, Hkv, n + T, D, seed=20 + b),
             rand(1, Hkv, n + T, D, seed=30 + b)) for b, n in enumerate(lens)]
    for b, n in enumerate(lens):
        q, k, v = hist[b]
        caches.row(b).attention(q[:, :, :n], k[:, :, :n], v[:, :, :n])
    assert caches.length.tolist() == lens
    outs = []
    for t in range(T):
        q = torch.cat([h[0][:, :, lens[b] + t:lens[b] + t + 1] for b, h in enumerate(hist)])
        k = torch.cat([h[1][:, :, lens[b] + t:lens[b] + t + 1] for b, h in enumerate(hist)])
        v = torch.cat([h[2][:, :, lens[b] + t:lens[b] + t + 1] for b, h in enumerate(hist)])
        outs.append(caches.attention(q, k, v))
    got = torch.cat(outs, dim=2)                                                 # (2, Hq, T, D)
    for b, n in enumerate(lens):
        expected = history_oracle(*hist[b], window)[:, :, n:]
        assert diff(got[b:b + 1], expected) < EXACT


def test_ring_append_longer_than_window_keeps_last_window():
    W = 3
    ring = RingCache(1, Hkv, D, W, dtype=F64)
    k, v = rand(1, Hkv, 8, D, seed=4), rand(1, Hkv, 8, D, seed=5)
    ring.append(k, v)
    assert ring.length.tolist() == [8]
    slots = [p % W for p in range(5, 8)]
    assert torch.equal(ring.k[0][:, slots], k[0, :, 5:8]) and torch.equal(ring.v[0][:, slots], v[0, :, 5:8])
    kt, vt = ring.time_ordered(0)
    assert torch.equal(kt, k[0, :, 5:]) and torch.equal(vt, v[0, :, 5:])


# -----------------------------------------------------------------------------
# ring buffer == sliding-window mask, bounded memory


def test_ring_decode_equals_sliding_window_mask_and_contiguous_window():
    model = model_for("mistral")
    w = model.config.sliding_window
    toks = tokens(2, 15, seed=8)
    with torch.no_grad():
        ring = run_cached(model, toks, model.new_cache(2, max_len=32), [3] + [1] * 12)
        flat = run_cached(model, toks, model.new_cache(2, max_len=32, ring=False), [3] + [1] * 12)
        # the full forward with an explicit sliding-window mask, block by block
        h = model.embed(toks)
        pos = torch.arange(15)
        for block in model.layers:
            h = block(h, mask=qkv.masks.sliding_window(w), positions=pos)
        masked = torch.nn.functional.linear(model.norm(h), model.head_weight)
    assert diff(ring, masked) < TOL and diff(ring, flat) < EXACT
    # the window matters here: a full causal mask gives different logits late in the sequence
    with torch.no_grad():
        h = model.embed(toks)
        for block in model.layers:
            h = block(h, mask=qkv.masks.causal(), positions=pos)
        causal = torch.nn.functional.linear(model.norm(h), model.head_weight)
    assert diff(ring[:, :w], causal[:, :w]) < TOL and diff(ring[:, w:], causal[:, w:]) > 1e-3


def test_ring_memory_is_bounded():
    model = model_for("mistral")
    W, L = model.config.sliding_window, model.config.n_layers
    small, big = model.new_cache(2, max_len=16), model.new_cache(2, max_len=64)
    per_token = Hkv * D * 8 * 2                                                   # K and V, float64
    assert small.nbytes == big.nbytes == L * 2 * W * per_token
    for layer in big.layers:
        assert tuple(layer.k.shape) == (2, Hkv, W, D)
    flat16, flat64 = model.new_cache(2, max_len=16, ring=False), model.new_cache(2, max_len=64, ring=False)
    assert flat64.nbytes == 4 * flat16.nbytes
    before = big.nbytes
    with torch.no_grad():
        for n in (1, 2, 5, 30):
            model(tokens(2, n, seed=n), cache=big)
            assert big.nbytes == before
            assert big.used_bytes == L * 2 * min(int(big.lengths[0]), W) * per_token
    assert big.lengths.tolist() == [38, 38]


def test_ring_shorter_than_window_never_drops_in_window_tokens():
    """max_len below the window: past max_len the cache must either raise CacheFull or stay exact."""
    model = make_model(tiny("mistral", sliding_window=16), seed=3)
    toks = tokens(1, 12, seed=9)
    cache = model.new_cache(1, max_len=8)
    with torch.no_grad():
        full = model(toks)
        outs = []
        try:
            for i in range(12):
                outs.append(model(toks[:, i:i + 1], cache=cache))
        except CacheFull:
            assert len(outs) == 8 and cache.lengths.tolist() == [8]
            return
    assert diff(torch.cat(outs, 1), full) < TOL


# -----------------------------------------------------------------------------
# GQA: caches hold the Hkv heads only


def test_gqa_cache_stores_kv_heads_only():
    gqa = make_model(tiny("llama", rope_scaling=None))                       # Hq=4, Hkv=2
    mha = make_model(tiny("llama", rope_scaling=None, n_kv_heads=4))
    mqa = make_model(tiny("llama", rope_scaling=None, n_kv_heads=1))
    B, M = 3, 20
    caches = {m: m.new_cache(B, max_len=M) for m in (gqa, mha, mqa)}
    for m, c in caches.items():
        for layer in c.layers:
            assert tuple(layer.k.shape) == tuple(layer.v.shape) == (B, m.config.n_kv_heads, M, D)
        assert c.nbytes == cache_bytes(m.config.n_layers, m.config.n_kv_heads, D, B * M, F64)
    assert caches[mha].nbytes == 2 * caches[gqa].nbytes == 4 * caches[mqa].nbytes
    paged = {m: m.new_cache(B, kind="paged", max_len=M, block_size=4) for m in (gqa, mha)}
    for m, c in paged.items():
        for layer in c.layers:
            assert tuple(layer.k.shape) == (m.config.n_kv_heads, 5 * B * 4, D)
    kv_bytes = {m: sum(l.k.numel() + l.v.numel() for l in c.layers) for m, c in paged.items()}
    assert kv_bytes[mha] == 2 * kv_bytes[gqa]
    assert paged[mha].nbytes > paged[gqa].nbytes


def test_cache_bytes_formula():
    assert cache_bytes(2, 3, 8, 10) == 2 * 2 * 3 * 8 * 10 * 4
    assert cache_bytes(2, 3, 8, 10, dtype=torch.bfloat16) == 2 * 2 * 3 * 8 * 10 * 2


# -----------------------------------------------------------------------------
# BlockPool bookkeeping


def test_pool_lowest_free_first_and_refcounts():
    pool = BlockPool(6, 4)
    a, b = pool.new_sequence(), pool.new_sequence()
    assert (a, b) == (0, 1) and pool.blocks_in_use == 0 and pool.high_water == 0
    pool.reserve(a, 5)                                    # 2 blocks
    pool.reserve(b, 4)                                    # 1 block
    assert pool.tables == {a: [0, 1], b: [2]} and pool.tokens == {a: 5, b: 4}
    pool.reserve(a, 8)                                    # still fits in 2 blocks: no-op
    assert pool.tables[a] == [0, 1] and pool.tokens[a] == 8
    pool.reserve(a, 3)                                    # never shrinks
    assert pool.tables[a] == [0, 1] and pool.tokens[a] == 8
    assert pool.refcount == [1, 1, 1, 0, 0, 0] and pool.blocks_in_use == 3 and pool.high_water == 3
    pool.free(a)
    assert pool.blocks_in_use == 1 and pool.high_water == 3 and pool.refcount[:3] == [0, 0, 1]
    c = pool.new_sequence()
    assert c == 2                                          # ids are never reused
    pool.reserve(c, 9)                                     # 3 blocks: lowest free first
    assert pool.tables[c] == [0, 1, 3]
    pool.free(b)
    assert pool.high_water == 4
    pool.free(c)
    assert pool.blocks_in_use == 0 and pool.high_water == 0 and pool.refcount == [0] * 6
    assert pool.tables == {} and pool.tokens == {}


def test_pool_fork_shares_whole_blocks_and_copies_partial():
    pool = BlockPool(8, 3)
    p = pool.new_sequence()
    pool.reserve(p, 7)                                    # blocks 0, 1, 2 (2 holds one token)
    v0 = pool.version
    child = pool.fork(p, 5)                               # 1 full block shared, 2 tokens copied
    assert pool.version > v0
    assert pool.tables[child][:1] == [0] and pool.tables[child][1] == 3
    assert pool.refcount[:4] == [2, 1, 1, 1] and pool.tokens[child] == 5
    whole = pool.fork(p)                                   # default: all 7 tokens, 2 shared + 1 copied
    assert pool.tables[whole] == [0, 1, 4] and pool.refcount[:5] == [3, 2, 1, 1, 1]
    edge = pool.fork(p, 6)                                 # a block boundary: nothing copied
    assert pool.tables[edge] == [0, 1] and pool.refcount[:2] == [4, 3] and pool.blocks_in_use == 5
    empty = pool.fork(p, 0)
    assert pool.tables[empty] == [] and pool.tokens[empty] == 0
    # free returns a block only when its last user lets go
    pool.free(p)
    assert pool.refcount[:5] == [3, 2, 0, 1, 1] and pool.blocks_in_use == 4
    for sid in (child, whole):
        pool.free(sid)
    assert pool.refcount[:5] == [1, 1, 0, 0, 0] and pool.blocks_in_use == 2
    pool.free(edge)
    assert pool.blocks_in_use == 0


def test_pool_stats_waste_below_a_block_per_sequence():
    bs = 4
    pool = BlockPool(16, bs)
    lens = [1, 4, 5, 11, 0]
    for n in lens:
        pool.reserve(pool.new_sequence(), n)
    s = pool.stats(bytes_per_token=10)
    assert s["blocks_total"] == 16 and s["blocks_in_use"] == sum(-(-n // bs) for n in lens) == 7
    assert s["allocated_bytes"] == 7 * bs * 10 and s["used_bytes"] == sum(lens) * 10
    assert s["unused_bytes"] == s["allocated_bytes"] - s["used_bytes"]
    assert s["unused_bytes"] < len(lens) * bs * 10
    assert s["waste"] == pytest.approx(s["unused_bytes"] / s["allocated_bytes"])
    # a shared prefix counts once
    pool2 = BlockPool(8, bs)
    p = pool2.new_sequence()
    pool2.reserve(p, 8)
    pool2.fork(p)
    s2 = pool2.stats()
    assert s2["blocks_in_use"] == 2 and s2["used_bytes"] == 8 and s2["unused_bytes"] == 0
    assert BlockPool(2, 2).stats()["waste"] == 0.0


def test_pool_errors():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0, 4)
    with pytest.raises(ValueError, match="block_size"):
        BlockPool(4, 0)
    with pytest.raises(TypeError, match="block_size"):
        BlockPool(4, 2.0)
    pool = BlockPool(2, 4)
    s = pool.new_sequence()
    with pytest.raises(CacheFull, match="more blocks"):
        pool.reserve(s, 9)
    assert pool.tables[s] == [] and pool.blocks_in_use == 0 and pool.tokens[s] == 0
    pool.reserve(s, 3)
    with pytest.raises(ValueError, match="fork at most"):
        pool.fork(s, 4)
    with pytest.raises(ValueError, match="fork at most"):
        pool.fork(s, -1)
    with pytest.raises(KeyError, match="no sequence 7"):
        pool.fork(7)
    pool.free(s)
    with pytest.raises(KeyError, match="no sequence"):
        pool.free(s)
    with pytest.raises(KeyError):
        pool.reserve(s, 1)
    assert issubclass(CacheFull, ValueError)


# -----------------------------------------------------------------------------
# fork at model level: parent and child diverge correctly


@pytest.mark.parametrize("arch", ["llama", "mixed"])
@pytest.mark.parametrize("n_fork", [None, 5, 6, 0])
def test_fork_then_diverge_equals_fresh_sequences(arch, n_fork):
    model = model_for(arch)
    g = torch.Generator().manual_seed(11)
    prompt = torch.randint(0, V, (7,), generator=g)
    parent_next, child_next = torch.randint(0, V, (2, 4), generator=g)
    cache = model.new_cache(1, kind="paged", block_size=3, num_blocks=12)
    parent = cache.seqs[0]
    with torch.no_grad():
        model(prompt[None], cache=cache)
        child = cache.fork(0, n_fork)
        n = 7 if n_fork is None else n_fork
        assert cache.pool.tables[child][:n // 3] == cache.pool.tables[parent][:n // 3]
        if n % 3:
            assert cache.pool.tables[child][n // 3] != cache.pool.tables[parent][n // 3]
        both = cache.view([parent, child])
        assert both.lengths.tolist() == [7, n]
        steps = torch.stack([parent_next, child_next])                          # (2, 4)
        got = torch.cat([model(steps[:, t:t + 1], cache=both) for t in range(4)], dim=1)
        ref_parent = model(torch.cat([prompt, parent_next])[None])[0, 7:]
        ref_child = model(torch.cat([prompt[:n], child_next])[None])[0, n:]
    assert diff(got[0], ref_parent) < TOL and diff(got[1], ref_child) < TOL


def test_fork_survives_parent_free_and_block_reuse():
    model = model_for("llama")
    g = torch.Generator().manual_seed(12)
    prompt, other = torch.randint(0, V, (8,), generator=g), torch.randint(0, V, (6,), generator=g)
    nxt = torch.randint(0, V, (5,), generator=g)
    cache = model.new_cache(1, kind="paged", block_size=3, num_blocks=12)
    pool = cache.pool
    with torch.no_grad():
        model(prompt[None], cache=cache)
        parent = cache.seqs[0]
        child = cache.fork(0)                                      # 2 shared blocks + a copy of the third
        shared = pool.tables[child][:2]
        cache.free(parent)
        assert all(pool.refcount[blk] == 1 for blk in shared) and pool.blocks_in_use == 3
        # a new sequence reuses the parent's freed block and must not disturb the child
        newcomer = pool.new_sequence()
        model(other[None], cache=cache.view([newcomer]))
        assert pool.tables[newcomer][0] == 2
        both = cache.view([child, newcomer])
        steps = torch.stack([nxt, nxt.flip(0)])
        got = torch.cat([model(steps[:, t:t + 1], cache=both) for t in range(5)], dim=1)
        ref_child = model(torch.cat([prompt, nxt])[None])[0, 8:]
        ref_new = model(torch.cat([other, nxt.flip(0)])[None])[0, 6:]
    assert diff(got[0], ref_child) < TOL and diff(got[1], ref_new) < TOL
    with pytest.raises(KeyError, match="no sequence"):
        model(nxt[None, :1], cache=cache.view([parent]))


# -----------------------------------------------------------------------------
# memory accounting


def test_memory_contiguous_vs_paged_on_mixed_lengths():
    model = model_for("llama")
    lens, M, bs = [1, 7, 12], 16, 4
    g = torch.Generator().manual_seed(13)
    prompts = [torch.randint(0, V, (n,), generator=g) for n in lens]
    flat = model.new_cache(3, max_len=M)
    paged = model.new_cache(3, kind="paged", max_len=M, block_size=bs)
    with torch.no_grad():
        for c in (flat, paged):
            for b, p in enumerate(prompts):
                model(p[None], cache=c.row(b))
    per_token = model.config.n_layers * 2 * Hkv * D * 8
    mf, mp = flat.memory(), paged.memory()
    assert mf["allocated_bytes"] == flat.nbytes == 3 * M * per_token
    assert mf["used_bytes"] == mp["used_bytes"] == flat.used_bytes == paged.used_bytes == sum(lens) * per_token
    assert mf["unused_bytes"] == mf["allocated_bytes"] - mf["used_bytes"]
    blocks = sum(-(-n // bs) for n in lens)
    assert mp["blocks_in_use"] == blocks and mp["allocated_bytes"] == blocks * bs * per_token
    assert mp["unused_bytes"] < len(lens) * bs * per_token
    assert mp["waste"] < mf["waste"]
    assert mf["waste"] == pytest.approx(1 - sum(lens) / (3 * M))
    # a paged cache's nbytes is its whole pool (with the slot-position table), whatever is in use
    assert paged.nbytes == sum(l.k.numel() * 8 * 2 + l.slot_pos.numel() * 8 for l in paged.layers)


def test_default_paged_pool_fits_batch_of_max_len():
    model = model_for("gpt2")
    c = model.new_cache(2, kind="paged", max_len=10, block_size=4)
    assert c.pool.num_blocks == 2 * 3 and c.pool.block_size == 4 and c.batch == 2 and c.seqs == [0, 1]
    with torch.no_grad():
        model(tokens(2, 10), cache=c)
    assert c.pool.blocks_in_use == 6
    default = model.new_cache(1, max_len=None)
    assert default.layers[0].max_len == model.config.max_positions


# -----------------------------------------------------------------------------
# errors


def test_contiguous_cache_full_leaves_state_unchanged():
    model = model_for("llama")
    toks = tokens(2, 8, seed=14)
    cache = model.new_cache(2, max_len=6)
    with torch.no_grad():
        model(toks[:, :5], cache=cache)
        snapshot = [(l.k.clone(), l.v.clone()) for l in cache.layers]
        with pytest.raises(CacheFull, match="max_len=6"):
            model(toks[:, 5:7], cache=cache)
        assert cache.lengths.tolist() == [5, 5]
        assert all(l.length.tolist() == [5, 5] for l in cache.layers)
        for l, (k, v) in zip(cache.layers, snapshot):
            assert torch.equal(l.k, k) and torch.equal(l.v, v)
        # the cache still works: one more token fits and is exact
        last = model(toks[:, 5:6], cache=cache)
        assert diff(last[:, 0], model(toks[:, :6])[:, 5]) < TOL
        with pytest.raises(CacheFull):
            model(toks[:, 6:7], cache=cache)
    assert cache.lengths.tolist() == [6, 6]


def test_contiguous_layer_cache_full_and_ragged():
    c = ContiguousCache(2, Hkv, D, 4, dtype=F64)
    c.row(0).append(rand(1, Hkv, 3, D, seed=1), rand(1, Hkv, 3, D, seed=2))
    with pytest.raises(CacheFull):
        c.append(rand(2, Hkv, 2, D, seed=3), rand(2, Hkv, 2, D, seed=4))     # row 0 would hold 5
    assert c.length.tolist() == [3, 0]
    c.append(rand(2, Hkv, 1, D, seed=5), rand(2, Hkv, 1, D, seed=6))
    assert c.length.tolist() == [4, 1]


def test_mixed_ring_and_contiguous_cache_full_leaves_state_unchanged():
    model = model_for("mixed")                                # layer_windows [3, None, 5]
    cache = model.new_cache(1, max_len=4)
    with torch.no_grad():
        model(tokens(1, 4), cache=cache)
        with pytest.raises(CacheFull):
            model(tokens(1, 1, seed=1), cache=cache)
    assert [l.length.tolist() for l in cache.layers] == [[4], [4], [4]]


def test_paged_out_of_blocks_single_sequence():
    model = model_for("llama")
    cache = model.new_cache(1, kind="paged", block_size=4, num_blocks=2)
    with torch.no_grad():
        model(tokens(1, 8), cache=cache)
        with pytest.raises(CacheFull, match="paged KV cache full"):
            model(tokens(1, 1, seed=1), cache=cache)
    assert cache.lengths.tolist() == [8] and cache.pool.blocks_in_use == 2
    assert all(l.length.tolist() == [8] for l in cache.layers)


def test_paged_out_of_blocks_in_batched_decode_then_recovers():
    model = model_for("llama")
    g = torch.Generator().manual_seed(15)
    a, b, c = (torch.randint(0, V, (n,), generator=g) for n in (4, 4, 7))
    nxt = torch.randint(0, V, (2, 2), generator=g)
    cache = model.new_cache(3, kind="paged", block_size=4, num_blocks=5)
    with torch.no_grad():
        for i, p in enumerate((a, b, c)):
            model(p[None], cache=cache.row(i))
        assert cache.pool.blocks_in_use == 4
        pair = cache.view(cache.seqs[:2])                   # both rows need a new block; one is free
        with pytest.raises(CacheFull):
            model(nxt[:, :1], cache=pair)
        assert pair.lengths.tolist() == [4, 4]
        assert all(l.length.tolist() == [4, 4] for l in pair.layers)
        cache.free(cache.seqs[2])                           # make room, retry the same step
        got = torch.cat([model(nxt[:, t:t + 1], cache=pair) for t in range(2)], dim=1)
        for i, p in enumerate((a, b)):
            ref = model(torch.cat([p, nxt[i]])[None])[0, 4:]
            assert diff(got[i], ref) < TOL


def test_paged_batched_prefill_out_of_blocks_leaves_state_unchanged():
    model = model_for("llama")
    cache = model.new_cache(2, kind="paged", block_size=4, num_blocks=3)
    with torch.no_grad():
        with pytest.raises(CacheFull):
            model(tokens(2, 8), cache=cache)                # row 0 fits (2 blocks), row 1 does not
    assert [l.length.tolist() for l in cache.layers] == [[0, 0], [0, 0]]
    assert cache.pool.blocks_in_use == 0


def test_fork_out_of_blocks_leaves_pool_unchanged():
    model = model_for("llama")
    cache = model.new_cache(1, kind="paged", block_size=4, num_blocks=2)
    with torch.no_grad():
        model(tokens(1, 6), cache=cache)                    # a full block and a partial one: the pool is full
    pool = cache.pool
    tables, refcount = {k: list(t) for k, t in pool.tables.items()}, list(pool.refcount)
    with pytest.raises(CacheFull):
        cache.fork(0)
    assert pool.tables == tables and pool.refcount == refcount


@pytest.mark.parametrize("kind", ["ring", "flat", "paged"])
def test_layer_cache_rejects_bad_shapes(kind):
    c = layer_cache(kind, 2, 3)
    good = rand(2, Hkv, 1, D, seed=1)
    bad = {
        "batch": rand(3, Hkv, 1, D, seed=2),
        "heads": rand(2, Hq, 1, D, seed=2),
        "dim": rand(2, Hkv, 1, D + 1, seed=2),
        "rank": rand(2, Hkv, D, seed=2),
    }
    for name, t in bad.items():
        with pytest.raises(ValueError, match=r"\(B=2, Hkv=2, n, D=8\)"):
            c.append(t, t)
        with pytest.raises(ValueError):
            c.attention(rand(2, Hq, 1, D, seed=0), t, t)
    with pytest.raises(ValueError, match="same shape"):
        c.append(good, rand(2, Hkv, 2, D, seed=3))
    with pytest.raises(ValueError, match="must be"):
        c.append(good.numpy(), good)
    assert c.length.tolist() == [0, 0]


def test_layer_cache_constructor_errors():
    with pytest.raises(ValueError, match="max_len"):
        ContiguousCache(1, 2, 4, 0)
    with pytest.raises(ValueError, match="batch"):
        ContiguousCache(0, 2, 4, 8)
    with pytest.raises(TypeError, match="n_kv_heads"):
        ContiguousCache(1, 2.0, 4, 8)
    with pytest.raises(ValueError, match="window"):
        RingCache(1, 2, 4, 0)
    with pytest.raises(ValueError, match="window"):
        ContiguousCache(1, 2, 4, 8, window=0)
    with pytest.raises(ValueError, match="at least one layer"):
        Cache([])


def test_score_mod_needs_positions():
    # depends on absolute positions; `+ s * 0` keeps the bias in the scores' dtype (torch would make
    # 0.05 * an int64 tensor float32)
    mod = lambda s, b, h, q, kv: s + (q * kv + s * 0) * 0.05
    B, L = 2, 6
    q, k, v = rand(B, Hq, L, D, seed=1), rand(B, Hkv, L, D, seed=2), rand(B, Hkv, L, D, seed=3)
    # contiguous, equal lengths: supported, and the positions are the absolute ones
    flat = ContiguousCache(B, Hkv, D, 8, dtype=F64)
    out = [flat.attention(q[:, :, :4], k[:, :, :4], v[:, :, :4], score_mod=mod)]
    out += [flat.attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], score_mod=mod) for t in (4, 5)]
    expected = qkv.attention(q, k, v, causal=True, score_mod=mod, backend="reference")
    assert diff(torch.cat(out, dim=2), expected) < EXACT
    # ring and paged caches refuse, before touching their contents
    for kind in ("ring", "paged"):
        c = layer_cache(kind, B, 3)
        with pytest.raises(ValueError, match="score_mod"):
            c.attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], score_mod=mod)
        assert c.length.tolist() == [0, 0]
    ragged_cache = ContiguousCache(B, Hkv, D, 8, dtype=F64)
    ragged_cache.row(0).append(k[:1, :, :2], v[:1, :, :2])
    with pytest.raises(ValueError, match="score_mod"):
        ragged_cache.attention(q[:, :, 2:3], k[:, :, 2:3], v[:, :, 2:3], score_mod=mod)


def test_refused_score_mod_leaves_contiguous_cache_unchanged():
    c = ContiguousCache(2, Hkv, D, 8, dtype=F64)
    c.row(0).append(rand(1, Hkv, 2, D, seed=1), rand(1, Hkv, 2, D, seed=2))
    t = rand(2, Hkv, 1, D, seed=3)
    with pytest.raises(ValueError, match="score_mod"):
        c.attention(rand(2, Hq, 1, D, seed=4), t, t, score_mod=lambda s, b, h, q, kv: s)
    assert c.length.tolist() == [2, 0]


def test_model_rejects_mismatched_cache_and_inputs():
    llama, gpt2 = model_for("llama"), model_for("gpt2")
    mixed = model_for("mixed")
    toks = tokens(2, 3)
    with torch.no_grad():
        with pytest.raises(ValueError, match="cache has 3 layers, the model 2"):
            llama(toks, cache=mixed.new_cache(2, max_len=8))
        with pytest.raises(ValueError, match="Hkv=4"):          # same layer count, other head layout
            llama(toks, cache=gpt2.new_cache(2, max_len=8))
        cache = llama.new_cache(2, max_len=8)
        with pytest.raises(ValueError, match="cache holds 2 sequences but tokens has batch 3"):
            llama(tokens(3, 1), cache=cache)
        with pytest.raises(ValueError, match="do not pass positions"):
            llama(toks, cache=cache, positions=torch.arange(3))
        with pytest.raises(ValueError, match="vocab_size"):
            llama(torch.full((2, 1), V), cache=cache)
        with pytest.raises(ValueError, match="vocab_size"):
            llama(torch.full((2, 1), -1), cache=cache)
        assert cache.lengths.tolist() == [0, 0]
        paged = llama.new_cache(2, kind="paged", max_len=8)
        with pytest.raises(ValueError, match="2 sequences but tokens has batch 1"):
            llama(tokens(1, 1), cache=paged)


@pytest.mark.parametrize("kind", ["ring", "paged3"])
def test_position_beyond_context_with_cache(kind):
    model = make_model(tiny("mistral", max_positions=8), seed=4)
    cache = model.new_cache(1, **CACHES[kind])
    with torch.no_grad():
        model(tokens(1, 6), cache=cache)
        with pytest.raises(ValueError, match="beyond the model's context of 8"):
            model(tokens(1, 3), cache=cache)
        assert cache.lengths.tolist() == [6]
        model(tokens(1, 2), cache=cache)
        with pytest.raises(ValueError, match="position 8"):
            model(tokens(1, 1), cache=cache)
    assert cache.lengths.tolist() == [8]


def test_cache_api_errors():
    model = model_for("llama")
    flat = model.new_cache(2, max_len=8)
    for call in (lambda: flat.view([0]), lambda: flat.fork(0), lambda: flat.free(0), lambda: flat.seqs):
        with pytest.raises(ValueError):
            call()
    with pytest.raises(IndexError, match="row 2 out of range"):
        flat.row(2)
    with pytest.raises(IndexError):
        flat.row(-1)
    with pytest.raises(ValueError, match="kind must be"):
        model.new_cache(1, kind="ring")


def test_row_views_share_storage():
    model = model_for("mixed")
    for c in (model.new_cache(2, max_len=8), model.new_cache(2, kind="paged", max_len=8, block_size=2)):
        r = c.row(1)
        assert r.batch == 1
        with torch.no_grad():
            model(tokens(1, 3), cache=r)
        assert c.lengths.tolist() == [0, 3] and r.lengths.tolist() == [3]
        assert c.used_bytes == r.used_bytes > 0
