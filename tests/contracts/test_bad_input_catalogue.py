"""The bad-input catalogue of every public entry point beyond `qkv.attention` itself.

tests/test_bad_inputs.py holds the first 40 cases (attention, masks, score mods); this
file holds the rest, table-driven: attention_weights, masks and score mods at the call,
positional encodings, layers, `qkv.nn.MultiheadAttention`, KV caches and the block pool,
configs and models, generation, data, training, `qkv.inspect`, `qkv.viz`, `qkv.embed`,
checkpoints and the `qkv` command. Each entry is (name, call, exception type, regex the
message must match): the message names the argument and says what to do about it.

A second table checks that a refused call changes nothing: a cache keeps its lengths and
contents, a block pool its free list and reference counts, a model or layer its
parameters (and its training flag).

Legend: B batch, Hq query heads, Hkv key/value heads, L length, D head dim, V vocabulary.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

import qkv
from qkv import cache as C
from qkv import checkpoint, data, embed, inspect, layers, masks as M, positional as P, scores as S, train, viz
from qkv import nn as qnn
from qkv.cli import main
from qkv.generate import SamplingError, generate, sample, stream
from qkv.models import AttentionOnly, Decoder, DecoderConfig, Encoder, EncoderConfig, Seq2Seq, Seq2SeqConfig, hf

# -----------------------------------------------------------------------------
# Tiny inputs and models (milliseconds to build; every bad call fails before any work)

q4 = torch.randn(1, 2, 3, 4)                     # (B, Hq, L, D)
k4 = torch.randn(1, 2, 3, 4)                     # (B, Hkv, L, D)
x8 = torch.randn(1, 3, 8)                        # (B, L, d_model)
ids3 = torch.tensor([[1, 2, 3]])                 # (B, L) token ids
V = 11


def gpt2(**kw) -> DecoderConfig:
    return DecoderConfig.gpt2(**{**dict(vocab_size=V, d_model=8, n_layers=1, n_heads=2, max_positions=8), **kw})


def llama(**kw) -> DecoderConfig:
    return DecoderConfig.llama(**{**dict(vocab_size=V, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1,
                                          ffn_hidden=16, max_positions=8), **kw})


torch.manual_seed(0)
DEC = Decoder(gpt2()).eval()
ENC = Encoder(EncoderConfig.bert(vocab_size=V, d_model=8, n_layers=1, n_heads=2, ffn_hidden=16, max_positions=8))
S2S = Seq2Seq(Seq2SeqConfig(vocab_size=V, d_model=8, n_heads=2, encoder_layers=1, decoder_layers=1, ffn_hidden=16,
                            max_positions=8))
MHA = layers.MultiHeadAttention(8, 2)
NNMHA = qnn.MultiheadAttention(8, 2)
TASK = data.make_task("reverse", vocab=5, min_len=2, max_len=3)
W33 = np.random.default_rng(0).random((3, 3))    # one head's (Lq, Lk) weights
kv1 = torch.randn(1, 2, 1, 4)                    # one new token's k or v for a (B=1, Hkv=2, D=4) cache


def contiguous(max_len=4, **kw):
    return C.ContiguousCache(1, 2, 4, max_len, **kw)


def pool_with_sequence(num_blocks=2, block_size=2, tokens=0):
    pool = C.BlockPool(num_blocks, block_size)
    sid = pool.new_sequence()
    if tokens:
        pool.reserve(sid, tokens)
    return pool, sid


def paged(num_blocks=2, block_size=2):
    pool, sid = pool_with_sequence(num_blocks, block_size)
    return C.PagedCache(pool, 2, 4, seqs=[sid])


def paged_model_cache():
    return C.Cache.paged([C.CacheSpec(2, 4, None)], 4, block_size=2, batch=1)


def capture_run(model, args, **kw):
    with inspect.capture(model, **kw):
        model(*args)


def capture_cached():
    with inspect.capture(DEC):
        DEC(ids3, cache=DEC.new_cache(1))


A, AW = qkv.attention, qkv.attention_weights

CATALOGUE = [
    # (name, call, exception, message pattern)
    # -- attention_weights, masks and score mods at the call ------------------------------------
    ("attention_weights float rows", lambda: AW(q4, k4, rows=[0.5]),
     TypeError, r"rows must hold integer indices.*rows=\[0, 1\]"),
    ("attention_weights string rows", lambda: AW(q4, k4, rows="a"), TypeError, r"rows must be an int, a list of ints"),
    ("attention_weights row out of range", lambda: AW(q4, k4, rows=[3]),
     ValueError, r"rows must lie in \[0, Lq=3\).*0\.\.2"),
    ("attention_weights head out of range", lambda: AW(q4, k4, heads=[5]),
     ValueError, r"heads must lie in \[0, Hq=2\).*0\.\.1"),
    ("attention_weights bool heads", lambda: AW(q4, k4, heads=torch.tensor([True])),
     TypeError, "heads must hold integer indices"),
    ("alibi with a string", lambda: S.alibi("x"),
     TypeError, r"alibi slopes must be an int number of heads.*alibi\(8\)"),
    ("alibi with 0 heads", lambda: S.alibi(0), ValueError, "n_heads must be >= 1, got 0"),
    ("alibi slopes for other heads", lambda: A(q4, k4, k4, score_mod=S.alibi(5)), ValueError,
     r"alibi has 5 slopes but the call has Hq=2.*alibi\(2\)"),
    ("alibi too few slopes", lambda: A(q4, k4, k4, score_mod=S.alibi(torch.ones(1))), ValueError,
     "alibi has 1 slopes but the call has Hq=2"),
    ("softcap with a string", lambda: S.softcap("x"), TypeError, r"softcap needs a finite cap > 0.*softcap\(30.0\)"),
    ("softcap infinite", lambda: S.softcap(float("inf")), ValueError, "finite cap > 0, got inf"),
    ("relative_bias 1-D table", lambda: S.relative_bias(torch.zeros(3)), ValueError, r"\(num_buckets, H\) tensor"),
    ("relative_bias 2 buckets bidirectional", lambda: S.relative_bias(torch.zeros(2, 2)), ValueError,
     "at least 4 buckets.*bidirectional=False"),
    ("relative_bias max_distance too small", lambda: S.relative_bias(torch.zeros(32, 2), max_distance=8), ValueError,
     r"max_distance must be an int > 8.*max_distance=128"),
    ("relative_bias string max_distance", lambda: S.relative_bias(torch.zeros(32, 2), max_distance="x"), ValueError,
     "max_distance must be an int"),
    ("relative_bias table for other heads", lambda: A(q4, k4, k4, score_mod=S.relative_bias(torch.zeros(32, 3))),
     ValueError, r"3 head columns but the call has Hq=2.*\(num_buckets, 2\)"),
    ("bias of the wrong shape", lambda: A(q4, k4, k4, score_mod=S.bias(torch.zeros(5, 5))), ValueError,
     r"bias of shape \(1, 1, 5, 5\) does not broadcast.*\(\.\.\., 3, 3\)"),
    ("bias for another batch", lambda: A(q4, k4, k4, score_mod=S.bias(torch.zeros(2, 1, 3, 3))), ValueError,
     "does not broadcast to"),
    ("bias in a chain", lambda: A(q4, k4, k4, score_mod=S.chain(S.softcap(2.0), S.bias(torch.zeros(3, 4)))),
     ValueError, r"bias of shape \(1, 1, 3, 4\)"),
    ("integer bias", lambda: S.bias(torch.zeros(3, 3, dtype=torch.long)),
     TypeError, "floating-point tensor; a bool mask goes in mask="),
    ("1-D bias", lambda: S.bias(torch.zeros(3)), ValueError, r"2 to 4 dimensions \(\.\.\., Lq, Lk\)"),
    ("chain of a non-callable", lambda: S.chain(S.softcap(1.0), 3), TypeError, "chain expects callables, got int"),
    # -- attention sinks (qkv.attention, attention_weights, the caches, the layer) ----------------
    ("sinks a list", lambda: A(q4, k4, k4, sinks=[0.0, 0.0]), TypeError,
     r"sinks must be a tensor of shape \(Hq,\) = \(2,\).*sinks=torch.zeros\(2\)"),
    ("integer sinks", lambda: A(q4, k4, k4, sinks=torch.zeros(2, dtype=torch.long)), TypeError,
     r"sinks must be a floating-point tensor.*sinks.float\(\)"),
    ("sinks per kv head", lambda: A(q4, k4[:, :1], k4[:, :1], sinks=torch.zeros(1)), ValueError,
     r"sinks must have shape \(Hq,\) = \(2,\), one logit per query head, got \(1,\)"),
    ("sinks on another device", lambda: A(q4, k4, k4, sinks=torch.zeros(2, device="meta")), ValueError,
     r"sinks is on meta but q is on cpu; move it with sinks.to\(q.device\)"),
    ("attention_weights sinks shape", lambda: AW(q4, k4, sinks=torch.zeros(3)), ValueError,
     r"sinks must have shape \(Hq,\) = \(2,\)"),
    ("ContiguousCache attention with sinks of another shape",
     lambda: contiguous().attention(kv1, kv1, kv1, sinks=torch.zeros(3)), ValueError, r"sinks must have shape \(Hq,\)"),
    ("LinearStateCache with sinks", lambda: C.LinearStateCache(1, 2, 4).attention(
        kv1, kv1, kv1, backend="linear", sinks=torch.zeros(2)), ValueError, "use a ContiguousCache with an exact layer"),
    ("MultiHeadAttention sinks not a bool", lambda: layers.MultiHeadAttention(8, 2, sinks=1), TypeError,
     r"sinks must be True or False"),
    ("MultiHeadAttention sinks with linear attention",
     lambda: layers.MultiHeadAttention(8, 2, sinks=True, attention="linear"), ValueError,
     r"attention='linear' has no softmax denominator.*sinks=False or attention='exact'"),
    ("negative global token", lambda: M.global_tokens([-1]), ValueError, "global token positions must be >= 0"),
    ("float global tokens", lambda: M.global_tokens([0.5]), TypeError, "idx must hold integers"),
    ("3-D document ids", lambda: M.document(torch.zeros(1, 1, 3, dtype=torch.long)),
     ValueError, "ids must have 1 or 2 dimensions"),
    ("1-D dense mask", lambda: M.from_dense(torch.ones(3, dtype=torch.bool)),
     ValueError, r"2 to 4 dimensions \(\.\.\., Lq, Lk\)"),
    ("bigbird even window", lambda: M.bigbird(4, window_blocks=2), ValueError, "window_blocks must be 0 or odd"),
    ("bigbird random blocks without length", lambda: M.bigbird(4, random_blocks=1), ValueError, "pass length="),
    ("bigbird block not dividing length", lambda: M.bigbird(4, length=10),
     ValueError, "block=4 does not divide length=10; pad"),
    ("mask combined with a string", lambda: M.causal() & "causal", TypeError, "expected a qkv mask, a callable"),
    ("mask returning floats", lambda: A(q4, k4, k4, mask=lambda b, h, qi, kv: (qi - kv).float()), TypeError,
     "must return booleans.*use score_mod"),
    ("to_dense string length", lambda: M.causal().to_dense("a", 3), TypeError, "Lq must be an int"),
    ("to_dense negative length", lambda: M.causal().to_dense(3, -1), ValueError, "Lk must be >= 0, got -1"),
    ("block_mask string block", lambda: M.causal().block_mask(4, 4, block="a"), TypeError,
     r"block must be an int or a pair \(block_q, block_k\)"),
    ("block_mask float block", lambda: M.causal().block_mask(4, 4, block=(2.0, 2)),
     TypeError, "block sizes must be ints"),
    ("longformer window 0", lambda: M.longformer(0), ValueError, "window must be >= 1, got 0"),
    # -- positional encodings --------------------------------------------------------------------
    ("sinusoidal negative length", lambda: P.sinusoidal(-1, 4), ValueError, "length must be >= 0, got -1"),
    ("sinusoidal base 0", lambda: P.sinusoidal(3, 4, base=0), ValueError, "base must be a finite number > 0"),
    ("sinusoidal float dim", lambda: P.sinusoidal(3, 4.0), TypeError, "dim must be an int.*pass a whole number"),
    ("SinusoidalPositions 2-D x", lambda: P.SinusoidalPositions(4)(torch.zeros(3, 4)),
     ValueError, "x must have 3 dims"),
    ("SinusoidalPositions wrong width", lambda: P.SinusoidalPositions(4)(torch.zeros(1, 3, 5)), ValueError,
     "x last dim must equal dim=4"),
    ("LearnedPositions past max_len", lambda: P.LearnedPositions(2, 4)(torch.zeros(1, 3, 4)), ValueError,
     "exceed max_len=2; use a shorter input"),
    ("LearnedPositions negative offset", lambda: P.LearnedPositions(4, 4)(torch.zeros(1, 3, 4), offset=-1), ValueError,
     "offset must be >= 0"),
    ("rope_frequencies odd rotary_dim", lambda: P.rope_frequencies(3), ValueError, "rotary_dim must be even"),
    ("rope_frequencies unknown scaling", lambda: P.rope_frequencies(4, scaling="yarn"), ValueError,
     "scaling must be one of .*'yarn'"),
    ("rope_frequencies factor without scaling", lambda: P.rope_frequencies(4, factor=2.0), ValueError,
     "factor=2.0 has no effect without scaling; pass scaling="),
    ("rope_frequencies NaN factor", lambda: P.rope_frequencies(4, scaling="linear", factor=float("nan")), ValueError,
     "factor must be a finite number > 0"),
    ("rope_frequencies llama3 without length", lambda: P.rope_frequencies(4, scaling="llama3", factor=2.0),
     ValueError, "needs original_max_len"),
    ("rope_frequencies ntk on 2 channels", lambda: P.rope_frequencies(2, scaling="ntk", factor=2.0), ValueError,
     "needs rotary_dim >= 4"),
    ("rope_cos_sin list positions", lambda: P.rope_cos_sin([0, 1], torch.ones(2)),
     TypeError, "positions must be a torch.Tensor"),
    ("rope_cos_sin integer inv_freq", lambda: P.rope_cos_sin(torch.arange(2), torch.ones(2, dtype=torch.long)),
     TypeError, r"inv_freq must be a floating-point tensor.*\.float\(\)"),
    ("apply_rope table for other positions", lambda: P.apply_rope(q4, torch.ones(5, 4), torch.ones(5, 4)), ValueError,
     "cover 5 positions but x has L=3; build them for x's positions"),
    ("apply_rope odd table", lambda: P.apply_rope(q4, torch.ones(3, 3), torch.ones(3, 3)), ValueError,
     r"rotary_dim=3\) must be even"),
    ("RotaryEmbedding both rotary sizes", lambda: P.RotaryEmbedding(8, rotary_dim=4, partial_rotary_factor=0.5),
     ValueError, "at most one of rotary_dim and partial_rotary_factor"),
    ("RotaryEmbedding factor above 1", lambda: P.RotaryEmbedding(8, partial_rotary_factor=2.0), ValueError,
     r"partial_rotary_factor must be in \(0, 1\]"),
    ("RotaryEmbedding rotary_dim above head_dim", lambda: P.RotaryEmbedding(4, rotary_dim=8), ValueError,
     "rotary_dim=8 must be <= head_dim=4"),
    ("RotaryEmbedding wrong head dim", lambda: P.RotaryEmbedding(8)(q4, k4),
     ValueError, "x last dim must equal head_dim=8"),
    ("RotaryEmbedding list positions", lambda: P.RotaryEmbedding(4)(q4, k4, [0, 1, 2], [0, 1, 2]), TypeError,
     r"positions must be a torch.Tensor.*torch.arange\(L\)"),
    ("RotaryEmbedding positions of another length",
     lambda: P.RotaryEmbedding(4)(q4, k4, torch.arange(5), torch.arange(5)),
     ValueError, "positions last dim must be L=3"),
    ("alibi_slopes float heads", lambda: P.alibi_slopes(2.0), TypeError, "n_heads must be an int"),
    # -- layers ----------------------------------------------------------------------------------
    ("MultiHeadAttention heads not dividing", lambda: layers.MultiHeadAttention(8, 3), ValueError,
     "n_heads=3 does not divide d_model=8; choose n_heads"),
    ("MultiHeadAttention kv heads not dividing", lambda: layers.MultiHeadAttention(8, 4, n_kv_heads=3), ValueError,
     r"n_kv_heads=3 must divide n_heads=4.*choose one of \[1, 2, 4\]"),
    ("MultiHeadAttention unknown backend", lambda: layers.MultiHeadAttention(8, 2, backend="flash3"), ValueError,
     "unknown backend 'flash3'; choose one of auto"),
    ("MultiHeadAttention rope for another head dim", lambda: layers.MultiHeadAttention(8, 2, rope=P.RotaryEmbedding(8)),
     ValueError, r"rope was built for head_dim=8.*RotaryEmbedding\(4\)"),
    ("MultiHeadAttention alibi slopes shape", lambda: layers.MultiHeadAttention(8, 2, alibi=torch.ones(3)), ValueError,
     r"alibi slopes must be a float tensor of shape \(n_heads,\) = \(2,\)"),
    ("MultiHeadAttention unknown attention", lambda: layers.MultiHeadAttention(8, 2, attention="flash"), ValueError,
     "attention must be one of 'exact'"),
    ("MultiHeadAttention x of the wrong width", lambda: MHA(torch.randn(1, 3, 7)),
     ValueError, r"x must be \(B, L, d_model=8\)"),
    ("MultiHeadAttention integer x", lambda: MHA(torch.ones(1, 3, 8, dtype=torch.long)), TypeError,
     r"x must be a floating-point tensor of the layer's dtype torch.float32.*x.to\(torch.float32\)"),
    ("MultiHeadAttention float64 x", lambda: MHA(x8.double()),
     TypeError, "layer's dtype torch.float32, got torch.float64"),
    ("MultiHeadAttention context batch", lambda: MHA(x8, torch.randn(2, 3, 8)), ValueError,
     "x and context must share the batch size"),
    ("MultiHeadAttention positions without RoPE", lambda: MHA(x8, positions=torch.arange(3)), ValueError,
     r"rope=None; pass rope=RotaryEmbedding\(head_dim\) or drop the positions"),
    ("MultiHeadAttention cache with a mask", lambda: MHA(x8, cache=C.ContiguousCache(1, 2, 4, 8), mask=M.causal()),
     ValueError, "run without cache="),
    ("FeedForward hidden 0", lambda: layers.FeedForward(8, 0), ValueError, "hidden must be >= 1, got 0"),
    ("FeedForward unknown activation", lambda: layers.FeedForward(8, 16, activation="tanh"), ValueError,
     "activation must be one of 'gelu'"),
    ("FeedForward x of the wrong width", lambda: layers.FeedForward(8, 16)(torch.randn(1, 3, 7)), ValueError,
     r"x must be \(\.\.\., d_model=8\), got \(1, 3, 7\)"),
    ("FeedForward integer x", lambda: layers.FeedForward(8, 16)(torch.ones(1, 3, 8, dtype=torch.long)), TypeError,
     "x must be a floating-point tensor of the layer's dtype"),
    ("RMSNorm negative eps", lambda: layers.RMSNorm(8, eps=-1), ValueError, "eps must be a number >= 0"),
    ("RMSNorm x of the wrong width", lambda: layers.RMSNorm(8)(torch.randn(2, 7)),
     ValueError, r"x must be \(\.\.\., dim=8\)"),
    ("RMSNorm without weight, wrong width", lambda: layers.RMSNorm(8, elementwise_affine=False)(torch.randn(2, 7)),
     ValueError, r"x must be \(\.\.\., dim=8\)"),
    ("RMSNorm integer x", lambda: layers.RMSNorm(8)(torch.ones(2, 8, dtype=torch.long)), TypeError,
     r"x must be a floating-point tensor.*x.float\(\)"),
    ("Block unknown norm", lambda: layers.Block(8, 2, norm="batch"), ValueError, "norm must be one of 'layer', 'rms'"),
    ("Block negative eps", lambda: layers.Block(8, 2, eps=-1.0), ValueError, r"eps \(the norms' epsilon\).*eps=1e-5"),
    ("Block float ffn_hidden", lambda: layers.Block(8, 2, ffn_hidden=16.0), TypeError, "ffn_hidden must be an int"),
    ("Block x of the wrong width", lambda: layers.Block(8, 2)(torch.randn(1, 3, 7)),
     ValueError, r"x must be \(B, L, d_model=8\)"),
    ("Block cross-attention without context", lambda: layers.Block(8, 2, cross_attention=True)(x8), ValueError,
     "pass context="),
    ("Block context without cross-attention", lambda: layers.Block(8, 2)(x8, context=x8), ValueError,
     "build it with cross_attention=True"),
    # -- qkv.nn.MultiheadAttention ---------------------------------------------------------------
    ("nn.MultiheadAttention string embed_dim", lambda: qnn.MultiheadAttention("8", 2),
     TypeError, "embed_dim must be an int"),
    ("nn.MultiheadAttention float num_heads", lambda: qnn.MultiheadAttention(8, 2.0),
     TypeError, "num_heads must be an int"),
    ("nn.MultiheadAttention kdim 0", lambda: qnn.MultiheadAttention(8, 2, kdim=0), ValueError,
     "kdim must be greater than 0.*or None"),
    ("nn.MultiheadAttention string dropout", lambda: qnn.MultiheadAttention(8, 2, dropout="a"), ValueError,
     r"dropout must be a probability in \[0, 1\)"),
    ("nn.MultiheadAttention 4-D query", lambda: NNMHA(*[torch.randn(1, 1, 3, 8)] * 3), ValueError, "query must be 3-D"),
    ("nn.MultiheadAttention query width", lambda: NNMHA(*[torch.randn(3, 1, 7)] * 3), ValueError,
     "build the module with embed_dim=7"),
    ("nn.MultiheadAttention float64 inputs", lambda: NNMHA(*[torch.randn(3, 1, 8, dtype=torch.float64)] * 3), TypeError,
     r"parameters are torch.float32; cast the inputs with .to\(torch.float32\)"),
    ("nn.MultiheadAttention key_padding_mask shape", lambda: NNMHA(*[torch.randn(3, 1, 8)] * 3,
                                                                  key_padding_mask=torch.zeros(1, 4, dtype=torch.bool)),
     ValueError, r"key_padding_mask must have shape \(N, S\) = \(1, 3\)"),
    ("nn.MultiheadAttention integer attn_mask", lambda: NNMHA(*[torch.randn(3, 1, 8)] * 3,
                                                             attn_mask=torch.zeros(3, 3, dtype=torch.long)),
     TypeError, r"use attn_mask.bool\(\)"),
    ("nn.MultiheadAttention is_causal alone", lambda: NNMHA(*[torch.randn(3, 1, 8)] * 3, is_causal=True), ValueError,
     "needs attn_mask as well"),
    # -- KV caches and the block pool ------------------------------------------------------------
    ("ContiguousCache max_len 0", lambda: C.ContiguousCache(1, 2, 4, 0), ValueError, "max_len must be >= 1, got 0"),
    ("ContiguousCache append of the wrong head dim",
     lambda: contiguous().append(torch.randn(1, 2, 1, 5), torch.randn(1, 2, 1, 5)),
     ValueError, r"k must be \(B=1, Hkv=2, n, D=4\) for this cache"),
    ("ContiguousCache k and v differ", lambda: contiguous().append(kv1, torch.randn(1, 2, 2, 4)), ValueError,
     "k and v must have the same shape"),
    ("ContiguousCache integer append", lambda: contiguous().append(kv1.long(), kv1.long()), TypeError,
     r"k has dtype torch.int64 but this cache stores torch.float32; cast it with k.to\(torch.float32\)"),
    ("ContiguousCache float64 append", lambda: contiguous().append(kv1.double(), kv1.double()), TypeError,
     "or build the cache with dtype=torch.float64"),
    ("ContiguousCache append from another device", lambda: contiguous().append(kv1.to("meta"), kv1.to("meta")),
     ValueError, r"k is on meta but this cache is on cpu; move it with k.to\('cpu'\)"),
    ("ContiguousCache append past max_len",
     lambda: contiguous(2).append(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)),
     C.CacheFull, "would hold 3 tokens but the cache was built for max_len=2; build it with a larger max_len"),
    ("ContiguousCache attention with the wrong q", lambda: contiguous().attention(torch.randn(1, 3, 1, 4), kv1, kv1),
     ValueError, r"q must be \(B=1, Hq \(a multiple of Hkv=2\), n=1, D=4\)"),
    ("ContiguousCache attention with a NaN scale", lambda: contiguous().attention(kv1, kv1, kv1, scale=float("nan")),
     ValueError, r"scale must be a finite number or None"),
    ("RingCache window 0", lambda: C.RingCache(1, 2, 4, 0), ValueError, "window must be >= 1, got 0"),
    ("RingCache integer append", lambda: C.RingCache(1, 2, 4, 4).append(kv1.long(), kv1.long()), TypeError,
     "but this cache stores torch.float32"),
    ("RingCache score_mod", lambda: C.RingCache(1, 2, 4, 4).attention(kv1, kv1, kv1, score_mod=S.softcap(1.0)),
     ValueError, "use a ContiguousCache"),
    ("RingCache attention with an unknown backend",
     lambda: C.RingCache(1, 2, 4, 4).attention(kv1, kv1, kv1, backend="nope"),
     ValueError, "unknown backend 'nope'"),
    ("BlockPool 0 blocks", lambda: C.BlockPool(0, 2), ValueError, "num_blocks must be >= 1, got 0"),
    ("BlockPool fork of an unknown sequence", lambda: C.BlockPool(2, 2).fork(3), C.UnknownSequence,
     "no sequence 3 in this pool.*pass the id of a live sequence"),
    ("BlockPool freed twice", lambda: (lambda p, s: (p.free(s), p.free(s)))(*pool_with_sequence()), C.UnknownSequence,
     r"no sequence 0 in this pool \(freed, or never added\)"),
    ("BlockPool reserve past capacity", lambda: (lambda p, s: p.reserve(s, 9))(*pool_with_sequence()), C.CacheFull,
     "needs 5 more block.*build the cache with more blocks or free finished sequences"),
    ("BlockPool negative reserve", lambda: (lambda p, s: p.reserve(s, -1))(*pool_with_sequence()), ValueError,
     "total_tokens must be >= 0, got -1"),
    ("BlockPool float reserve", lambda: (lambda p, s: p.reserve(s, 2.5))(*pool_with_sequence()), TypeError,
     "total_tokens must be an int"),
    ("BlockPool float fork length", lambda: (lambda p, s: p.fork(s, 1.5))(*pool_with_sequence(4, 2, 3)), TypeError,
     r"n_tokens must be an int or None \(all tokens\)"),
    ("BlockPool fork past the tokens held",
     lambda: (lambda p, s: p.fork(s, 5))(*pool_with_sequence(4, 2, 3)), ValueError,
     "can fork at most the 3 tokens sequence 0 holds, got 5"),
    ("BlockPool fork with no free block",
     lambda: (lambda p, s: p.fork(s, 1))(*pool_with_sequence(2, 2, 3)), C.CacheFull,
     "no block is free.*build the cache with more blocks or free sequences"),
    ("BlockPool stats with a string", lambda: C.BlockPool(2, 2).stats("x"),
     TypeError, "bytes_per_token must be an int"),
    ("PagedCache on a non-pool", lambda: C.PagedCache("pool", 2, 4), TypeError,
     r"pool must be a qkv.cache.BlockPool.*BlockPool\(num_blocks, block_size\)"),
    ("PagedCache append past capacity", lambda: paged().append(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)),
     C.CacheFull, "3 more block.*are needed but only 2 of 2 are free"),
    ("PagedCache integer append", lambda: paged().append(kv1.long(), kv1.long()),
     TypeError, "but this cache stores torch.float32"),
    ("PagedCache prefill with an unknown backend",
     lambda: paged().attention(*[torch.randn(1, 2, 2, 4)] * 3, backend="nope"),
     ValueError, "unknown backend 'nope'"),
    ("Cache of no layers", lambda: C.Cache([]), ValueError, "a Cache needs at least one layer"),
    ("Cache of non-layers", lambda: C.Cache(["layer"]), TypeError, r"layers\[0\] must be a qkv.cache.LayerCache"),
    ("Cache row out of range", lambda: C.Cache([contiguous()]).row(3), C.RowOutOfRange,
     r"row 3 out of range for a batch of 1; pass 0\.\.0"),
    ("Cache string row", lambda: C.Cache([contiguous()]).row("a"),
     TypeError, "row must be an int index into the batch"),
    ("Cache fork of a row out of range", lambda: paged_model_cache().fork(3), C.RowOutOfRange, "row 3 out of range"),
    ("Cache view of an unknown sequence", lambda: paged_model_cache().view([7]), C.UnknownSequence,
     r"no sequence 7 in this pool.*live: \[0\]"),
    ("Cache fork of a contiguous cache", lambda: C.Cache([contiguous()]).fork(0), ValueError,
     "build the cache with kind='paged'"),
    ("cache_bytes negative tokens", lambda: C.cache_bytes(2, 2, 4, -8), ValueError, "tokens must be >= 0, got -8"),
    ("LinearStateCache unknown feature map", lambda: C.LinearStateCache(1, 2, 4, feature_map="x"), ValueError,
     "feature_map must be 'linear' or a qkv.backends.linear.Performer"),
    ("LinearStateCache exact backend", lambda: C.LinearStateCache(1, 2, 4).attention(kv1, kv1, kv1), ValueError,
     "cannot serve backend='auto'; use it with a layer built with attention='linear'"),
    # -- configs and models ----------------------------------------------------------------------
    ("DecoderConfig vocab_size 0", lambda: gpt2(vocab_size=0), ValueError, "vocab_size must be >= 1, got 0"),
    ("DecoderConfig float d_model", lambda: gpt2(d_model=8.0), TypeError, "d_model must be an int"),
    ("DecoderConfig heads not dividing", lambda: gpt2(n_heads=3),
     ValueError, "n_heads=3 does not divide d_model=8; set head_dim"),
    ("DecoderConfig kv heads not dividing", lambda: llama(n_heads=4, n_kv_heads=3), ValueError,
     "n_kv_heads=3 must divide n_heads=4"),
    ("DecoderConfig RoPE with odd head_dim", lambda: llama(head_dim=3), ValueError, "head_dim must be even, got 3"),
    ("DecoderConfig rope_scaling string", lambda: llama(rope_scaling="linear"), ValueError,
     "rope_scaling must be None or a dict with 'type'"),
    ("DecoderConfig rope_scaling without factor", lambda: llama(rope_scaling={"type": "linear"}), ValueError,
     "needs a finite 'factor' > 0"),
    ("DecoderConfig rope_scaling unknown key", lambda: llama(rope_scaling={"type": "ntk", "factor": 2.0, "beta": 1}),
     ValueError, r"rope_scaling of type 'ntk' takes \['factor', 'type'\]; unknown \['beta'\]"),
    ("DecoderConfig llama3 factors inverted", lambda: llama(rope_scaling={
        "type": "llama3", "factor": 2.0, "original_max_positions": 8, "low_freq_factor": 4.0, "high_freq_factor": 1.0}),
     ValueError, r"rope_scaling\['high_freq_factor'\] must exceed 'low_freq_factor'.*uses 4.0 and 1.0"),
    ("DecoderConfig rope_scaling with learned positions", lambda: gpt2(rope_scaling={"type": "linear", "factor": 2.0}),
     ValueError, "positions is not 'rope'; set positions='rope' or rope_scaling=None"),
    ("DecoderConfig rope_base 0", lambda: llama(rope_base=0),
     ValueError, r"rope_base must be a finite number > 0.*10000"),
    ("DecoderConfig negative norm_eps", lambda: gpt2(norm_eps=-1.0),
     ValueError, "norm_eps must be a finite number >= 0"),
    ("DecoderConfig string bias", lambda: gpt2(bias="no"), TypeError, "bias must be True or False"),
    ("DecoderConfig layer_windows count", lambda: gpt2(layer_windows=[1, 2]), ValueError,
     r"layer_windows has 2 entries for n_layers=1; give one window \(or None\) per layer"),
    ("DecoderConfig linear attention with a window", lambda: gpt2(attention="linear", sliding_window=4), ValueError,
     "set sliding_window=None"),
    ("DecoderConfig unknown field", lambda: DecoderConfig.from_dict({**gpt2().to_dict(), "depth": 3}), ValueError,
     r"unknown DecoderConfig field\(s\) \['depth'\]"),
    ("Decoder from a dict", lambda: Decoder({"vocab_size": V}), TypeError, "config must be a qkv.models.DecoderConfig"),
    ("Decoder unknown backend", lambda: Decoder(gpt2(), backend="nope"), ValueError, "unknown backend 'nope'"),
    ("Decoder out-of-vocabulary ids", lambda: DEC(torch.tensor([[1, 11]])), ValueError,
     r"token ids must lie in \[0, vocab_size=11\), got 1\.\.11"),
    ("Decoder negative ids", lambda: DEC(torch.tensor([[-1, 1]])), ValueError, "token ids must lie in"),
    ("Decoder float ids", lambda: DEC(torch.tensor([[1.0, 2.0]])),
     ValueError, r"tokens must be an integer tensor \(B, L\).*tokens.long\(\)"),
    ("Decoder 1-D ids", lambda: DEC(torch.tensor([1, 2])),
     ValueError, r"tokens must be an integer tensor \(B, L\).*\(2,\); for one sequence pass tokens\[None\]"),
    ("Decoder input past the context", lambda: DEC(torch.ones(1, 9, dtype=torch.long)), ValueError,
     "position 8 is beyond the model's context of 8 tokens; shorten the prompt"),
    ("Decoder positions of another length", lambda: DEC(ids3, positions=torch.arange(5)), ValueError,
     r"positions must be \(L,\) = \(3,\) or \(B, L\) = \(1, 3\)"),
    ("Decoder negative positions", lambda: DEC(ids3, positions=torch.tensor([-1, 0, 1])), ValueError,
     "positions must be >= 0, got -1"),
    ("Decoder float positions", lambda: DEC(ids3, positions=torch.tensor([0.5, 1.0, 2.0])), TypeError,
     r"positions must be an integer tensor.*torch.arange\(L\)"),
    ("Decoder cache of another batch", lambda: DEC(ids3, cache=DEC.new_cache(2)), ValueError,
     r"cache holds 2 sequences but tokens has batch 1; build it with model.new_cache\(1\)"),
    ("Decoder cache of another model", lambda: DEC(ids3, cache=Decoder(gpt2(n_layers=2)).new_cache(1)), ValueError,
     r"cache has 2 layers, the model 1; build it with model.new_cache\(\)"),
    ("Decoder cache that is not a Cache", lambda: DEC(ids3, cache="cache"), TypeError,
     r"cache must be a qkv.cache.Cache from model.new_cache\(\)"),
    ("Decoder cache with positions", lambda: DEC(ids3, cache=DEC.new_cache(1), positions=torch.arange(3)), ValueError,
     "do not pass positions"),
    ("Decoder full cache", lambda: DEC(ids3, cache=DEC.new_cache(1, max_len=2)), C.CacheFull,
     "build it with a larger max_len"),
    ("Decoder new_cache unknown kind", lambda: DEC.new_cache(1, kind="ring"), ValueError,
     "kind must be 'contiguous' or 'paged', got 'ring'"),
    ("Decoder new_cache block_size 0", lambda: DEC.new_cache(1, kind="paged", block_size=0), ValueError,
     "block_size must be >= 1, got 0"),
    ("EncoderConfig norm_eps 0", lambda: EncoderConfig.bert(vocab_size=V, d_model=8, n_layers=1, n_heads=2, norm_eps=0),
     ValueError, "norm_eps must be a finite number > 0"),
    ("EncoderConfig gated activation", lambda: EncoderConfig.bert(vocab_size=V, d_model=8, n_layers=1, n_heads=2,
                                                                  activation="swiglu"),
     ValueError, r"gated MLPs are for decoders"),
    ("Encoder attention_mask shape", lambda: ENC(ids3, torch.ones(1, 4)), ValueError,
     r"attention_mask must be a tensor of input_ids' shape \(1, 3\)"),
    ("Encoder attention_mask values", lambda: ENC(ids3, torch.full((1, 3), 2)),
     ValueError, "attention_mask must hold 0/1"),
    ("Encoder token types out of range", lambda: ENC(ids3, None, torch.full((1, 3), 2)), ValueError,
     r"token_type_ids must lie in \[0, type_vocab_size=2\)"),
    ("Encoder input past max_positions", lambda: ENC(torch.ones(1, 9, dtype=torch.long)), ValueError,
     "truncate it to at most 8 tokens"),
    ("Encoder weights of a packed run", lambda: ENC(ids3, packed=True, return_weights=True),
     ValueError, "pass packed=False"),
    ("Seq2SeqConfig special ids equal", lambda: Seq2SeqConfig(vocab_size=V, pad_id=1), ValueError,
     "pad_id, bos_id and eos_id must be distinct"),
    ("Seq2Seq float source", lambda: S2S(ids3.float(), torch.tensor([3]), ids3), TypeError,
     r"src must be an integer tensor \(B, L\)"),
    ("Seq2Seq source length 0", lambda: S2S(ids3, torch.tensor([0]), ids3),
     ValueError, r"src_lengths must lie in \[1, Ls=3\]"),
    ("Seq2Seq target batch", lambda: S2S(ids3, torch.tensor([3]), torch.ones(2, 3, dtype=torch.long)), ValueError,
     "tgt_in has batch 2 but the source has 1"),
    ("Seq2Seq generate too many tokens", lambda: S2S.generate(ids3, torch.tensor([3]), max_new_tokens=100), ValueError,
     "max_new_tokens=100 exceeds max_positions=8"),
    ("AttentionOnly unknown positions", lambda: AttentionOnly(V, positions="sinus"), ValueError,
     "positions must be one of 'learned', 'rope', 'alibi'"),
    ("AttentionOnly out-of-vocabulary ids", lambda: AttentionOnly(V, d_model=8, n_heads=2)(torch.tensor([[11]])),
     ValueError, r"ids must lie in \[0, vocab_size=11\)"),
    ("hf.save of a non-model", lambda: hf.save(MHA, "ckpt"),
     TypeError, "model must be a qkv.models.Decoder, Encoder or ViT"),
    ("hf.load of a missing directory", lambda: hf.load("no-such-checkpoint"), ValueError,
     r"does not exist; pass a checkpoint directory \(config.json"),
    # -- generation ------------------------------------------------------------------------------
    ("generate negative temperature", lambda: generate(DEC, [1, 2], max_new_tokens=2, temperature=-1), SamplingError,
     r"temperature must be a finite number >= 0 \(0 = greedy\), got -1"),
    ("generate infinite temperature", lambda: generate(DEC, [1, 2], max_new_tokens=2, temperature=float("inf")),
     SamplingError, "temperature must be a finite number >= 0.*got inf"),
    ("generate top_p 0", lambda: generate(DEC, [1, 2], max_new_tokens=2, temperature=1.0, top_p=0), SamplingError,
     r"top_p must be None or a number in \(0, 1\]"),
    ("generate top_p above 1",
     lambda: generate(DEC, [1, 2], max_new_tokens=2, temperature=1.0, top_p=1.5), SamplingError,
     "top_p must be None or a number in"),
    ("generate top_k 0", lambda: generate(DEC, [1, 2], max_new_tokens=2, temperature=1.0, top_k=0), SamplingError,
     "top_k must be None or an int >= 1, got 0"),
    ("generate top_k while greedy", lambda: generate(DEC, [1, 2], max_new_tokens=2, top_k=2), SamplingError,
     "pass temperature > 0"),
    ("generate negative max_new_tokens", lambda: generate(DEC, [1, 2], max_new_tokens=-1), SamplingError,
     "max_new_tokens must be an int >= 0, got -1"),
    ("generate float max_new_tokens", lambda: generate(DEC, [1, 2], max_new_tokens=2.0), SamplingError,
     "max_new_tokens must be an int >= 0, got 2.0"),
    ("generate stop tokens as one int", lambda: generate(DEC, [1, 2], max_new_tokens=2, stop_tokens=3), SamplingError,
     "stop_tokens must be an iterable of token ids"),
    ("generate float stop token", lambda: generate(DEC, [1, 2], max_new_tokens=2, stop_tokens=[1.5]), SamplingError,
     r"stop_tokens must be an iterable of int token ids, got \[1.5\]"),
    ("generate stop token outside the vocabulary", lambda: generate(DEC, [1, 2], max_new_tokens=2, stop_tokens=[99]),
     SamplingError, r"stop token 99 is outside \[0, vocab_size=11\).*pass ids of the model's vocabulary"),
    ("generate no prompts", lambda: generate(DEC, [], max_new_tokens=2),
     ValueError, "no prompts given; pass a list of token ids"),
    ("generate empty prompt in a batch", lambda: generate(DEC, [[1], []], max_new_tokens=2), ValueError,
     "prompt 1 is empty; a prompt needs at least one token"),
    ("generate text prompt", lambda: generate(DEC, "hello", max_new_tokens=2), TypeError, r"\(tokenize text first\)"),
    ("generate prompt outside the vocabulary", lambda: generate(DEC, [1, 11], max_new_tokens=2), ValueError,
     r"prompt 0 has token ids outside \[0, vocab_size=11\)"),
    ("generate float prompt", lambda: generate(DEC, torch.ones(2), max_new_tokens=1), TypeError,
     "prompt 0 must hold int token ids"),
    ("generate prompt too long", lambda: generate(DEC, [1] * 8, max_new_tokens=1), ValueError,
     "prompt of 8 tokens \\+ max_new_tokens=1 exceeds the model's context of 8 tokens; shorten the prompt"),
    ("generate unknown cache", lambda: generate(DEC, [1, 2], max_new_tokens=2, cache="ring"), ValueError,
     "cache must be 'contiguous' or 'paged'"),
    ("generate paged block_size 0", lambda: generate(DEC, [1, 2], max_new_tokens=2, cache="paged", block_size=0),
     ValueError, "block_size must be an int >= 1, got 0"),
    ("generate string seed", lambda: generate(DEC, [1, 2], max_new_tokens=2, temperature=1.0, seed="a"), SamplingError,
     "seed must be an int or None"),
    ("generate with a non-decoder", lambda: generate(torch.nn.Linear(2, 2), [1, 2], max_new_tokens=2), TypeError,
     r"model must be a qkv.models.Decoder.*got Linear"),
    ("generate with an encoder", lambda: generate(ENC, [1, 2], max_new_tokens=2), TypeError,
     r"model must be a qkv.models.Decoder.*got Encoder"),
    ("generate stats that is not a dict", lambda: generate(DEC, [1, 2], max_new_tokens=2, stats=[]), TypeError,
     r"stats must be a dict to fill \(or None\)"),
    ("stream negative temperature", lambda: stream(DEC, [1, 2], temperature=-1), SamplingError, "temperature must be"),
    ("sample 1-D logits", lambda: sample(torch.randn(5)),
     SamplingError, r"logits must be a float tensor \(B, V\).*logits\[None\]"),
    ("sample negative temperature", lambda: sample(torch.randn(1, 5), temperature=-1.0), SamplingError,
     "temperature must be a finite number >= 0"),
    ("sample top_k 0", lambda: sample(torch.randn(1, 5), temperature=1.0, top_k=0),
     SamplingError, "top_k must be None or an int >= 1"),
    # -- data, tokenizers, tasks -----------------------------------------------------------------
    ("make_task unknown", lambda: data.make_task("copy"), ValueError, r"unknown task 'copy'; choose one of 'reverse'"),
    ("make_task min_len above max_len", lambda: data.make_task("reverse", min_len=5, max_len=3), ValueError,
     "min_len=5 must be <= max_len=3"),
    ("Task.sample negative count", lambda: TASK.sample(-1, seed=0), ValueError, "n must be >= 0, got -1"),
    ("Task.sample seed and generator", lambda: TASK.sample(2, seed=0, generator=torch.Generator()), ValueError,
     "pass exactly one of seed="),
    ("Task.sample generator of the wrong type", lambda: TASK.sample(2, generator=1), TypeError,
     "generator must be a torch.Generator"),
    ("Task.stream on the held-out seed", lambda: TASK.stream(2, seed=data.EVAL_SEED), ValueError,
     "is the held-out seed.*train with another one"),
    ("batch of unequal lists", lambda: data.batch([torch.tensor([3])], []), ValueError,
     "src and tgt must hold as many sequences, got 1 and 0"),
    ("batch with a special id", lambda: data.batch([torch.tensor([0])], [torch.tensor([3])]), ValueError,
     r"src\[0\] holds a special id.*BOS/EOS/PAD are added here"),
    ("batch of float tokens", lambda: data.batch([torch.tensor([3.0])], [torch.tensor([3])]), TypeError,
     r"src\[0\] must be a 1-D integer tensor"),
    ("RecallTask more pairs than keys", lambda: data.RecallTask(n_keys=4, max_pairs=8), ValueError,
     "raise n_keys or lower max_pairs"),
    ("RecallTask label outside the vocabulary", lambda: data.RecallTask().label(999), ValueError,
     r"token 999 is outside this task's vocabulary \[0, 68\)"),
    ("ByteTokenizer encode of bytes", lambda: data.ByteTokenizer().encode(b"abc"),
     TypeError, "text must be a str, got bytes"),
    ("ByteTokenizer decode outside the vocabulary", lambda: data.ByteTokenizer().decode([300]), ValueError,
     r"ids outside \[0, 259\): \[300\]"),
    ("CharTokenizer empty alphabet", lambda: data.CharTokenizer(""), ValueError, r"CharTokenizer.from_text\(text\)"),
    ("CharTokenizer unknown character", lambda: data.CharTokenizer("ab").encode("abc"), ValueError,
     r"characters not in the alphabet: \['c'\]; build the tokenizer from text that contains them"),
    ("make_tokenizer unknown", lambda: data.make_tokenizer("wordpiece"), ValueError,
     "tokenizer must be 'byte', 'char', 'bpe'.*got 'wordpiece'"),
    ("make_tokenizer char without text", lambda: data.make_tokenizer("char"), ValueError, "pass its text"),
    ("bpe_vocab not a number", lambda: data.bpe_vocab("bpe:x"), ValueError, "must be an integer, e.g. 'bpe:2048'"),
    ("bpe_vocab too small", lambda: data.bpe_vocab("bpe:100"), ValueError, "must exceed 259"),
    ("TextData empty text", lambda: data.TextData.build(""),
     ValueError, r"text must be a non-empty str \(see load_corpus\)"),
    ("TextData val_fraction", lambda: data.TextData.build("hello world", val_fraction=0.9), ValueError,
     r"val_fraction must be in \(0, 0.5\)"),
    ("TextData.batch context 0", lambda: data.TextData.build("hello world " * 20, "byte").batch(0, 2, 0, seed=0),
     ValueError, "context must be >= 1, got 0"),
    ("TextData.batch batch_size 0", lambda: data.TextData.build("hello world " * 20, "byte").batch(0, 0, 4, seed=0),
     ValueError, "batch_size must be >= 1, got 0"),
    ("TextData.batch context beyond the text",
     lambda: data.TextData.build("hello world", "byte").batch(0, 2, 100, seed=0),
     ValueError, "fewer than context \\+ 1 = 101; use more text or a shorter context"),
    ("unigram_entropy_bits of floats", lambda: data.unigram_entropy_bits(torch.rand(5)), ValueError,
     "ids must be a non-empty integer tensor of token ids"),
    # -- training --------------------------------------------------------------------------------
    ("lr_schedule unknown kind", lambda: train.lr_schedule("step", lr=1e-3, warmup=1, steps=10), ValueError,
     "schedule must be one of 'cosine'"),
    ("lr_schedule lr 0", lambda: train.lr_schedule("cosine", lr=0, warmup=1, steps=10),
     ValueError, "lr must be > 0.0, got 0"),
    ("fit steps 0", lambda: train.fit(DEC, TASK.stream(2), steps=0), ValueError, "steps must be >= 1, got 0"),
    ("fit next_batch not callable", lambda: train.fit(DEC, [1, 2], steps=1),
     TypeError, "next_batch must be a callable"),
    ("fit clip 0", lambda: train.fit(DEC, TASK.stream(2), steps=1, clip=0), ValueError, "clip must be > 0.0"),
    ("fit label_smoothing 1", lambda: train.fit(DEC, TASK.stream(2), steps=1, label_smoothing=1.0), ValueError,
     "label_smoothing must be >= 0.0 and < 1.0"),
    ("fit betas above 1", lambda: train.fit(DEC, TASK.stream(2), steps=1, betas=(1.5, 0.9)), ValueError,
     r"betas must be a pair of numbers in \[0, 1\).*\(0.9, 0.98\)"),
    ("fit negative eps", lambda: train.fit(DEC, TASK.stream(2), steps=1, eps=-1.0), ValueError, "eps must be >= 0.0"),
    ("fit loss_fn not callable", lambda: train.fit(DEC, TASK.stream(2), steps=1, loss_fn=3), TypeError,
     r"loss_fn must be a callable \(model, batch\)"),
    ("fit progress of the wrong type", lambda: train.fit(DEC, TASK.stream(2), steps=1, progress="yes"), TypeError,
     "progress must be True, False or a callable"),
    ("seq2seq_loss of a tuple", lambda: train.seq2seq_loss(S2S, (1, 2)),
     TypeError, "needs a qkv.data.Batch.*pass loss_fn="),
    ("evaluate_exact of a list", lambda: train.evaluate_exact(S2S, [1, 2, 3]), TypeError,
     r"data must be a \(sources, targets\) pair"),
    ("train_task unknown hyper-parameter", lambda: train.train_task("reverse", depth=3), ValueError,
     r"unknown hyper-parameters \['depth'\]"),
    ("train_task seed equals eval_seed", lambda: train.train_task("reverse", seed=5, eval_seed=5), ValueError,
     "pick another seed"),
    ("train_task eval_size 0", lambda: train.train_task("reverse", eval_size=0),
     ValueError, "eval_size must be >= 1, got 0"),
    ("decoder_config unknown preset", lambda: train.decoder_config("huge", vocab_size=V, context=8), ValueError,
     "preset must be one of 'tiny'.*or pass a config file"),
    ("decoder_config vocabulary too small", lambda: train.decoder_config(
        config={"d_model": 8, "n_layers": 1, "n_heads": 2, "vocab_size": 5}, vocab_size=V, context=8), ValueError,
     "vocab_size=5 is smaller than the tokenizer's 11"),
    ("decoder_config context too long", lambda: train.decoder_config(
        config={"d_model": 8, "n_layers": 1, "n_heads": 2, "max_positions": 4}, vocab_size=V, context=8), ValueError,
     "lower --context or raise max_positions"),
    ("lm_loss 1-D tokens", lambda: train.lm_loss(DEC, torch.tensor([1, 2, 3])), ValueError,
     r"tokens must be \(B, T \+ 1\) ids with T >= 1"),
    ("evaluate_lm of no batches", lambda: train.evaluate_lm(DEC, []), ValueError,
     r"batches must be a non-empty list.*val_batches"),
    ("estimate_memory batch_size 0", lambda: train.estimate_memory(gpt2(), 0, 8),
     ValueError, "batch_size must be >= 1"),
    ("train_lm steps 0", lambda: train.train_lm(steps=0, out="run"), ValueError, "steps must be >= 1, got 0"),
    ("train_lm unknown preset", lambda: train.train_lm(preset="huge", out="run"), ValueError, "preset must be one of"),
    ("train_lm float batch_size", lambda: train.train_lm(batch_size=2.5, out="run"),
     TypeError, "batch_size must be an int"),
    ("train_lm unknown tokenizer", lambda: train.train_lm(tokenizer="wordpiece", out="run"), ValueError,
     "tokenizer must be 'byte'"),
    ("recall_loss of a tuple", lambda: train.recall_loss(DEC, (1, 2)), TypeError, "expected a qkv.data.RecallBatch"),
    ("recall_attention negative layer",
     lambda: train.recall_attention(DEC, data.RecallTask(), [1, 4], layer=-1, head=0),
     ValueError, "layer must be >= 0, got -1"),
    ("train_recall train_min_pairs above min_pairs", lambda: train.train_recall(train_min_pairs=20), ValueError,
     "train_min_pairs=20 must be <= min_pairs=8"),
    ("checkpoint.save keep 0", lambda: checkpoint.save("run", 1, DEC, {}, {}, keep=0), ValueError,
     "keep must be an int >= 1, got 0"),
    ("checkpoint.save string step", lambda: checkpoint.save("run", "x", DEC, {}, {}), ValueError,
     r"step must be an int >= 0 \(the optimizer steps done\), got 'x'"),
    # -- inspect -----------------------------------------------------------------------------------
    ("capture layer out of range", lambda: inspect.capture(DEC, layers=[5]), ValueError,
     r"layer index 5 is out of range.*valid indices are 0\.\.0"),
    ("capture unknown layer name", lambda: inspect.capture(DEC, layers=["nope"]), ValueError,
     "no attention module named 'nope'; the model has layers.0.self_attn"),
    ("capture float layer", lambda: inspect.capture(DEC, layers=[0.5]), TypeError,
     "layers must hold int indices or module names"),
    ("capture head out of range", lambda: inspect.capture(DEC, heads=[2]), ValueError,
     r"head 2 is out of range.*valid heads are 0\.\.1"),
    ("capture float heads", lambda: inspect.capture(DEC, heads=torch.tensor([0.5])), TypeError,
     "heads must be an int or a 1-D sequence of ints"),
    ("capture row out of range", lambda: capture_run(DEC, (ids3,), rows=[5]), ValueError,
     r"row 5 is out of range.*valid rows are 0\.\.2"),
    ("capture max_cells 0", lambda: inspect.capture(DEC, max_cells=0), ValueError, "max_cells must be >= 1, got 0"),
    ("capture above max_cells", lambda: capture_run(DEC, (ids3,), max_cells=4), ValueError,
     "above max_cells=4; pass rows= to capture chosen query rows"),
    ("capture a model without qkv attention", lambda: inspect.capture(torch.nn.Linear(2, 2)), ValueError,
     "holds no qkv attention module.*build the model from"),
    ("capture a non-module", lambda: inspect.capture("model"), TypeError, "model must be a torch.nn.Module"),
    ("capture a cached step", capture_cached, ValueError, "while it reads a KV cache.*run the model without cache="),
    ("head_stats 3-D weights", lambda: inspect.head_stats(torch.rand(2, 3, 4)), ValueError,
     r"weights must be a \(B, heads, rows, Lk\) tensor"),
    ("head_stats positions count", lambda: inspect.head_stats(torch.rand(1, 2, 3, 4), torch.arange(5)), ValueError,
     r"positions must be \(3,\), one per row of weights"),
    # -- viz ---------------------------------------------------------------------------------------
    ("heatmap of 3-D weights", lambda: viz.heatmap(np.random.rand(2, 3, 3), "a.png"), ValueError,
     r"weights must have 2 dimensions.*pass one head"),
    ("heatmap of NaN", lambda: viz.heatmap(np.full((3, 3), np.nan), "a.png"),
     ValueError, "NaN/inf values.*fix the mask"),
    ("heatmap label count", lambda: viz.heatmap(W33, "a.png", x_labels=["a", "b"]), ValueError,
     "x_labels has 2 entries but the weights have 3 positions"),
    ("heatmap labels as one string", lambda: viz.heatmap(W33, "a.png", y_labels="abc"), TypeError,
     "split it into tokens first"),
    ("heatmap .jpg path", lambda: viz.heatmap(W33, "a.jpg"), ValueError, r"must end in \.png"),
    ("heatmap dpi 1", lambda: viz.heatmap(W33, "a.png", dpi=1), ValueError, "dpi must be >= 20, got 1"),
    ("heatmap of complex weights", lambda: viz.heatmap(np.ones((3, 3), dtype=complex), "a.png"), TypeError,
     "weights must hold real numbers"),
    ("grid of 3-D maps", lambda: viz.grid(np.random.rand(2, 3, 3), "g.png"), ValueError,
     r"\(layers, H, Lq, Lk\).*or pass \{layer_name: \(H, Lq, Lk\)\}"),
    ("grid of mismatched layers",
     lambda: viz.grid({"a": np.random.rand(2, 3, 3), "b": np.random.rand(2, 4, 4)}, "g.png"),
     ValueError, "every layer must have the same Lq and Lk"),
    ("grid cross-attention labels", lambda: viz.grid({"a": np.random.rand(2, 2, 3)}, "g.png", labels=["a", "b", "c"]),
     ValueError, "pass query_labels for cross-attention"),
    ("html without tokens", lambda: viz.html({"a": np.random.rand(2, 3, 3)}, None, "a.html"), TypeError,
     "tokens must be a list of Lk strings"),
    ("html values outside [0, 1]", lambda: viz.html({"a": np.random.rand(2, 3, 3) * 5}, ["a", "b", "c"], "a.html"),
     ValueError, "apply softmax to scores first"),
    ("mask_picture tile 0", lambda: viz.mask_picture(M.causal(), 4, 4, "m.png", tile=0), ValueError,
     r"tile\[0\] must be >= 1"),
    ("mask_picture too large", lambda: viz.mask_picture(M.causal(), 10000, 10000, "m.png"), ValueError,
     "pass dense=False to draw the tiles only"),
    ("trace_picture of a string", lambda: viz.trace_picture("trace", "t.png"), TypeError,
     r"trace must be a qkv.reference.Trace \(from qkv.reference.explain\)"),
    ("find_token missing", lambda: viz.find_token(["a", "b"], "c"),
     ValueError, r"no token 'c' in the sentence; its tokens are"),
    ("attention_report label count", lambda: viz.attention_report(DEC, [1, 2, 3], ["a"], "report"), ValueError,
     "got 1 labels for 3 tokens"),
    ("attention_report focus out of range", lambda: viz.attention_report(DEC, [1, 2, 3], ["a"] * 3, "report", focus=7),
     ValueError, r"focus must be a token index in 0\.\.2"),
    # -- embed -------------------------------------------------------------------------------------
    ("SentenceEncoder of a non-encoder", lambda: embed.SentenceEncoder(DEC, None), TypeError,
     "model must be a qkv.models.Encoder, got Decoder"),
    ("SentenceEncoder without a tokenizer", lambda: embed.SentenceEncoder(ENC, None, max_seq_length=8), TypeError,
     r"tokenizer must be a tokenizers.Tokenizer.*Tokenizer.from_file"),
    ("SentenceEncoder unknown pooling", lambda: embed.SentenceEncoder(ENC, None, pooling=("sum",)), ValueError,
     "pooling must be one or more of"),
    ("SentenceEncoder max_seq_length beyond the model", lambda: embed.SentenceEncoder(ENC, None), ValueError,
     "max_seq_length=256 exceeds the model's 8 positions"),
    ("SentenceEncoder.load of a missing directory", lambda: embed.SentenceEncoder.load("no-such-model"), ValueError,
     "is not a directory; pass a sentence-transformers checkpoint directory"),
    ("SentenceEncoder.load of an int", lambda: embed.SentenceEncoder.load(3), TypeError,
     r"path must be a str, a Path or None \(the bundled model\)"),
    ("cosine_table rows", lambda: embed.cosine_table(["a", "b"], torch.randn(3, 4)), ValueError,
     r"embeddings must be a tensor \(2, E\), one row per sentence"),
    ("cosine_table width 0", lambda: embed.cosine_table(["a", "b"], torch.randn(2, 4), width=0), ValueError,
     "width must be an int >= 4"),
]

# The exceptions a catalogue entry may raise: ValueError and TypeError, or these documented subclasses.
DOCUMENTED = (C.CacheFull, C.UnknownSequence, C.RowOutOfRange, SamplingError, checkpoint.CheckpointError)


@pytest.mark.parametrize("name,call,exc,pattern", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_raises_a_clear_error(name, call, exc, pattern, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                     # any path a call names lies in a fresh folder
    with pytest.raises(exc, match=pattern) as info:
        call()
    got = type(info.value)
    assert got in (ValueError, TypeError) or got in DOCUMENTED, f"{name}: raised {got.__name__}, not a documented type"
    assert list(tmp_path.iterdir()) == [], f"{name}: a refused call wrote files"


def test_every_error_is_a_value_or_type_error():
    for name, _, exc, _ in CATALOGUE:
        assert issubclass(exc, (ValueError, TypeError)), name
    for exc in DOCUMENTED:
        assert issubclass(exc, (ValueError, TypeError)) and exc.__doc__, exc


def test_catalogue_names_are_distinct():
    names = [c[0] for c in CATALOGUE] + [c[0] for c in CLI]
    assert len(names) == len(set(names))
    assert len({c[0] for c in UNCHANGED}) == len(UNCHANGED)


# -----------------------------------------------------------------------------
# The `qkv` command: a bad argument is exit status 2 and one error line on stderr (no traceback)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny GPT-2 checkpoint without tokenizer.json, and a small text file."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    hf.save(Decoder(gpt2()), root / "ckpt")
    (root / "text.txt").write_text("hello world\n" * 50)
    return {"ckpt": str(root / "ckpt"), "txt": str(root / "text.txt"), "root": str(root)}


def gen(*args):
    return ["generate", "--checkpoint", "{ckpt}", *args]


CLI = [
    # (name, argv ({ckpt}, {txt}, {root} are filled in), pattern of the error line)
    ("cli no command", [], "choose a command: explain, backends"),
    ("cli unknown command", ["frobnicate"], "invalid choice: 'frobnicate'"),
    ("cli generate without --checkpoint", ["generate", "--prompt", "1"], "required: --checkpoint"),
    ("cli generate missing checkpoint", ["generate", "--checkpoint", "{root}/nope", "--prompt", "1 2"],
     r"nope does not exist; pass a checkpoint directory"),
    ("cli generate folder without config.json", ["generate", "--checkpoint", "{root}", "--prompt", "1 2"],
     "has no config.json"),
    ("cli generate text without tokenizer", gen("--prompt", "hello"), "must be token ids separated by spaces"),
    ("cli generate empty prompt", gen("--prompt", ""), "the prompt is empty; give at least one token id"),
    ("cli generate id outside the vocabulary", gen("--prompt", "1 99"), r"outside \[0, vocab_size=11\)"),
    ("cli generate negative temperature", gen("--prompt", "1 2", "--temperature", "-1"), "temperature must be"),
    ("cli generate temperature not a number", gen("--prompt", "1 2", "--temperature", "hot"),
     "argument --temperature: invalid float value: 'hot'"),
    ("cli generate top-p 2", gen("--prompt", "1 2", "--temperature", "1", "--top-p", "2"), "top_p must be None or"),
    ("cli generate top-k without sampling", gen("--prompt", "1 2", "--top-k", "3"), "pass temperature > 0"),
    ("cli generate negative max-new-tokens", gen("--prompt", "1 2", "--max-new-tokens", "-1"),
     "max_new_tokens must be an int >= 0"),
    ("cli generate past the context", gen("--prompt", "1 2", "--max-new-tokens", "100"),
     "exceeds the model's context of 8 tokens"),
    ("cli generate stop id outside the vocabulary", gen("--prompt", "1 2", "--max-new-tokens", "2", "--stop", "99"),
     "stop token 99 is outside"),
    ("cli generate unknown cache", gen("--prompt", "1 2", "--cache", "ring"), "argument --cache: invalid choice"),
    ("cli train steps 0", ["train", "{txt}", "--steps", "0", "--out", "run"], "steps must be >= 1, got 0"),
    ("cli train steps not a number", ["train", "{txt}", "--steps", "x"], "argument --steps: invalid int value: 'x'"),
    ("cli train unknown preset", ["train", "{txt}", "--preset", "huge", "--out", "run"], "preset must be one of"),
    ("cli train unknown tokenizer", ["train", "{txt}", "--tokenizer", "wordpiece", "--out", "run"],
     "tokenizer must be 'byte'"),
    ("cli train lr 0", ["train", "{txt}", "--lr", "0", "--out", "run"], "lr must be > 0.0"),
    ("cli train missing data", ["train", "{root}/missing.txt", "--tokenizer", "byte", "--out", "run"],
     "missing.txt does not exist; pass a text file or a folder"),
    ("cli train missing config", ["train", "{txt}", "--tokenizer", "byte", "--context", "8", "--config",
                                  "{root}/none.json", "--out", "run"], "config file .*none.json does not exist"),
    ("cli train out is a file",
     ["train", "{txt}", "--out", "{txt}"], "is a file; pass a directory for the checkpoints"),
    ("cli train resume with nothing", ["train", "{txt}", "--tokenizer", "byte", "--preset", "tiny", "--context", "8",
                                       "--resume", "--out", "run"], "nothing to resume.*run without --resume"),
    ("cli train context beyond the text", ["train", "{txt}", "--tokenizer", "byte", "--preset", "tiny", "--context",
                                           "4096", "--out", "run"], "use more text or a shorter context"),
    ("cli explain empty sentence", ["explain", ""], "the sentence is empty: pass some words"),
    ("cli explain dim 0", ["explain", "a b", "--dim", "0"], r"dim must be an integer in \[1, 64\]"),
    ("cli explain png of another format", ["explain", "a b", "--png", "x.jpg"], r"must end in \.png"),
    ("cli viz without a model", ["viz", "a b"], "choose the model: --checkpoint DIR"),
    ("cli viz missing checkpoint", ["viz", "a b", "--checkpoint", "{root}/nope"], "does not exist"),
    ("cli viz text without tokenizer",
     ["viz", "a b", "--checkpoint", "{ckpt}"], "must be token ids separated by spaces"),
    ("cli viz id outside the vocabulary", ["viz", "1 99", "--checkpoint", "{ckpt}"], r"token ids must be in 0\.\.10"),
    ("cli viz layer out of range", ["viz", "1 2 3", "--checkpoint", "{ckpt}", "--layer", "7", "--out", "v"],
     r"layer must be in 0\.\.0"),
    ("cli viz focus not in the sentence", ["viz", "1 2 3", "--checkpoint", "{ckpt}", "--focus", "9", "--out", "v"],
     "no token '9' in the sentence"),
    ("cli embed missing model", ["embed", "a", "--model", "{root}/nope"], "is not a directory"),
    ("cli embed without sentences", ["embed"], "the following arguments are required: SENTENCE"),
    ("cli bench unknown", ["bench", "nope"], "argument what: invalid choice: 'nope'"),
    ("cli bench lengths outside attention", ["bench", "--lengths", "4"], "belong to `qkv bench attention`"),
]


@pytest.mark.parametrize("name,argv,pattern", CLI, ids=[c[0] for c in CLI])
def test_bad_command_line_is_status_2_and_one_line(name, argv, pattern, files, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([a.format(**files) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if re.match(r"qkv( \w+)?: error: ", line)]
    assert len(errors) == 1, err                   # argparse adds its usage lines above the error line
    assert re.search(pattern, errors[0]), errors[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "v").exists(), f"{name}: a refused run wrote output"


# -----------------------------------------------------------------------------
# A refused call changes nothing


def module_state(m: torch.nn.Module):
    return {"state": copy.deepcopy(m.state_dict()), "training": m.training}


def cache_state(c):
    """A ContiguousCache's or RingCache's keys, values and lengths."""
    return {"k": c.k.clone(), "v": c.v.clone(), "lengths": c.length.clone()}


def pool_state(p: C.BlockPool):
    return {"free": sorted(p._free), "refcount": list(p.refcount), "tables": copy.deepcopy(p.tables),
            "tokens": dict(p.tokens), "version": p.version, "next": p._next_id}


def paged_state(c: C.PagedCache):
    return {"pool": pool_state(c.pool), "k": c.k.clone(), "v": c.v.clone(), "slot_pos": c.slot_pos.clone(),
            "lengths": dict(c.lengths_by_seq)}


def linear_state_of(c: C.LinearStateCache):
    return {"S": c.S.clone(), "z": c.z.clone(), "lengths": c.length.clone()}


def model_cache_state(model_and_cache):
    model, cache = model_and_cache
    layers = [paged_state(x) if isinstance(x, C.PagedCache) else cache_state(x) for x in cache.layers]
    return {"model": module_state(model), "layers": layers, "lengths": cache.lengths}


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def filled_contiguous():
    cache = contiguous(4)
    cache.append(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))        # 3 of 4 slots used
    return cache


def filled_ring():
    cache = C.RingCache(1, 2, 4, 2)
    cache.append(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))        # wrapped around once
    return cache


def filled_paged():
    cache = paged(3, 2)
    cache.append(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))        # 2 of 3 blocks used
    return cache


def filled_model_cache(model, kind="contiguous", **kw):
    cache = model.new_cache(1, kind=kind, **kw)
    with torch.no_grad():
        model(ids3, cache=cache)
    return model, cache


def linear_state():
    cache = C.LinearStateCache(1, 2, 4)
    cache.attention(torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4), backend="linear")
    return cache


def training(module):
    return module.train()


def captured_step(model_and_cache):
    model, cache = model_and_cache
    with inspect.capture(model):
        model(torch.tensor([[4]]), cache=cache)


UNCHANGED = [
    # (name, make the object, snapshot of what it holds, the refused call on it, exception)
    ("ContiguousCache append past max_len", filled_contiguous, cache_state,
     lambda c: c.append(torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4)), C.CacheFull),
    ("ContiguousCache append of another dtype", filled_contiguous, cache_state,
     lambda c: c.append(kv1.double(), kv1.double()), TypeError),
    ("ContiguousCache attention with a bad q", filled_contiguous, cache_state,
     lambda c: c.attention(torch.randn(1, 3, 1, 4), kv1, kv1), ValueError),
    ("ContiguousCache attention with an unknown backend", filled_contiguous, cache_state,
     lambda c: c.attention(kv1, kv1, kv1, backend="nope"), ValueError),
    ("RingCache append of another dtype",
     filled_ring, cache_state, lambda c: c.append(kv1.long(), kv1.long()), TypeError),
    ("RingCache attention with a bad q", filled_ring, cache_state,
     lambda c: c.attention(torch.randn(1, 2, 1, 3), kv1, kv1), ValueError),
    ("ContiguousCache attention with bad sinks", filled_contiguous, cache_state,
     lambda c: c.attention(kv1, kv1, kv1, sinks=torch.zeros(1)), ValueError),
    ("RingCache attention with bad sinks", filled_ring, cache_state,
     lambda c: c.attention(kv1, kv1, kv1, sinks=torch.zeros(2, dtype=torch.long)), TypeError),
    ("PagedCache decode with bad sinks", filled_paged, paged_state,
     lambda c: c.attention(kv1, kv1, kv1, sinks=torch.zeros(4)), ValueError),
    ("PagedCache append past capacity", filled_paged, paged_state,
     lambda c: c.append(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)), C.CacheFull),
    ("PagedCache prefill with an unknown backend", filled_paged, paged_state,
     lambda c: c.attention(*[torch.randn(1, 2, 2, 4)] * 3, backend="nope"), ValueError),
    ("PagedCache decode with a NaN scale", filled_paged, paged_state,
     lambda c: c.attention(kv1, kv1, kv1, scale=float("nan")), ValueError),
    ("BlockPool reserve past capacity", lambda: pool_with_sequence(3, 2, 3)[0], pool_state,
     lambda p: p.reserve(0, 9), C.CacheFull),
    ("BlockPool fork with no free block", lambda: pool_with_sequence(2, 2, 3)[0], pool_state,
     lambda p: p.fork(0, 1), C.CacheFull),
    ("BlockPool free of an unknown sequence", lambda: pool_with_sequence(3, 2, 3)[0], pool_state,
     lambda p: p.free(5), C.UnknownSequence),
    ("BlockPool fork past the tokens held", lambda: pool_with_sequence(3, 2, 3)[0], pool_state,
     lambda p: p.fork(0, 4), ValueError),
    ("LinearStateCache with the exact backend", linear_state, linear_state_of,
     lambda c: c.attention(kv1, kv1, kv1), ValueError),
    ("Decoder and cache: step past max_len", lambda: filled_model_cache(Decoder(gpt2()).eval(), max_len=4),
     model_cache_state, lambda mc: mc[0](ids3, cache=mc[1]), C.CacheFull),
    ("Decoder and cache: out-of-vocabulary step", lambda: filled_model_cache(Decoder(gpt2()).eval()),
     model_cache_state, lambda mc: mc[0](torch.tensor([[11]]), cache=mc[1]), ValueError),
    ("Decoder and paged cache: step past the blocks",
     lambda: filled_model_cache(Decoder(llama()).eval(), "paged", block_size=2, num_blocks=2),
     model_cache_state, lambda mc: mc[0](torch.tensor([[1, 2]]), cache=mc[1]), C.CacheFull),
    ("Decoder and cache: captured step", lambda: filled_model_cache(Decoder(gpt2()).eval()), model_cache_state,
     captured_step, ValueError),
    ("Decoder forward with float positions", lambda: Decoder(gpt2()), module_state,
     lambda m: m(ids3, positions=torch.tensor([0.0, 1.0, 2.0])), TypeError),
    ("generate refused keeps the training flag", lambda: training(Decoder(gpt2())), module_state,
     lambda m: generate(m, [1, 2], max_new_tokens=2, temperature=-1), SamplingError),
    ("fit refused keeps the weights", lambda: training(Seq2Seq(Seq2SeqConfig(
        vocab_size=TASK.vocab_size, d_model=8, n_heads=2, ffn_hidden=8))), module_state,
     lambda m: train.fit(m, TASK.stream(2), steps=1, betas=(0.9, 1.0)), ValueError),
    ("Seq2Seq generate refused", lambda: training(Seq2Seq(Seq2SeqConfig(vocab_size=V, d_model=8, n_heads=2))),
     module_state, lambda m: m.generate(ids3, torch.tensor([0]), max_new_tokens=2), ValueError),
    ("MultiHeadAttention forward refused", lambda: layers.MultiHeadAttention(8, 2, rope=P.RotaryEmbedding(4)),
     module_state, lambda m: m(x8, positions=[0, 1, 2]), TypeError),
    ("Block forward refused", lambda: layers.Block(8, 2), module_state, lambda m: m(torch.randn(1, 3, 7)), ValueError),
    ("nn.MultiheadAttention forward refused", lambda: qnn.MultiheadAttention(8, 2, add_bias_kv=True), module_state,
     lambda m: m(*[torch.randn(3, 1, 8)] * 3, attn_mask=torch.zeros(3, 4)), ValueError),
    ("Encoder forward refused", lambda: Encoder(EncoderConfig.bert(vocab_size=V, d_model=8, n_layers=1, n_heads=2,
                                                                   ffn_hidden=16, max_positions=8)),
     module_state, lambda m: m(ids3, torch.ones(1, 4)), ValueError),
]


@pytest.mark.parametrize("name,make,snapshot,bad_call,exc", UNCHANGED, ids=[c[0] for c in UNCHANGED])
def test_a_refused_call_changes_nothing(name, make, snapshot, bad_call, exc):
    obj = make()
    before = snapshot(obj)
    with pytest.raises(exc):
        bad_call(obj)
    assert same(before, snapshot(obj)), f"{name}: the refused call changed the object"


# -----------------------------------------------------------------------------
# The figure


def test_catalogue_size():
    """How many distinct bad inputs are catalogued: this file's tables plus tests/test_bad_inputs.py's 40."""
    from contracts.test_bad_inputs import CATALOGUE as FIRST

    here = len(CATALOGUE) + len(CLI)
    assert len(FIRST) == 40
    assert here >= 100, here
    assert here + len(FIRST) >= 140
    print(f"bad-input catalogue: {len(CATALOGUE)} calls + {len(CLI)} command lines = {here} here, "
          f"{here + len(FIRST)} with tests/test_bad_inputs.py; "
          f"{len(UNCHANGED)} refused calls checked to change nothing")
