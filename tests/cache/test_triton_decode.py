"""The Triton decode kernel (`qkv.kernels.gpu.decode.paged_decode`), run by Triton's interpreter on CPU.

Legend: B batch (sequences), Hq query heads, Hkv key/value heads, n new query rows per sequence,
L tokens of a sequence (the new rows' own included), D head dim, bs block size, S pool slots.

Every output is checked by the error-ratio rule against the float64 oracle (`qkv.reference`), the
baseline `qkv.attention(..., backend="math")` in the same dtype, one sequence at a time with the
mask causal() or sliding_window(w) and q_offset = L - n; and invariances: paged == contiguous (the
same bits), splits 1 == several (within rounding), the kernel on real caches == the full forward.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"   # before anything imports triton: Triton reads it when kernels are defined

import pytest
import torch

pytest.importorskip("triton")

import qkv
from qkv import masks, reference
from qkv.cache import BlockPool, ContiguousCache, PagedCache, RingCache
from qkv.kernels.gpu import decode
from qkv.testing import EPS
from tests.conftest import assert_error_ratio

# float32 outputs: ratio 3, not 2. Under the interpreter the scores are numpy's sgemm of each tile,
# whose rounding on these shapes is about twice that of torch's CPU kernels (measured: D=16, 300 keys,
# 5.4e-7 with the tiles' sgemm, 2.6e-7 with exact-row dot products, 1.5e-7 for the math backend), so a
# correct kernel lands between 2x and 4x the baseline's error now and then (2 of the full grid's 720
# output checks did at ratio 2).
FP32_RATIO = 3.0
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HEADS = {"mha": (4, 4), "gqa": (8, 2), "mqa": (4, 1)}


def _data(lengths, Hq, Hkv, n, D, dtype, seed):
    """q (B, Hq, n, D) and each sequence's keys and values [(Hkv, L_b, D)], drawn in float64 then cast."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(len(lengths), Hq, n, D, generator=g, dtype=torch.float64).to(dtype)
    ks = [torch.randn(Hkv, L, D, generator=g, dtype=torch.float64).to(dtype) for L in lengths]
    vs = [torch.randn(Hkv, L, D, generator=g, dtype=torch.float64).to(dtype) for L in lengths]
    return q, ks, vs


def _contiguous(ks, vs, spare=5):
    """(B, Hkv, S, D) buffers (junk past each length), (B, 1) zero tables, block_size = S."""
    B, (Hkv, _, D) = len(ks), ks[0].shape
    S = max(k.shape[1] for k in ks) + spare
    kbuf = torch.full((B, Hkv, S, D), 1e3, dtype=ks[0].dtype)   # junk a masking bug would show
    vbuf = torch.full((B, Hkv, S, D), -1e3, dtype=ks[0].dtype)
    for b, (k, v) in enumerate(zip(ks, vs)):
        kbuf[b, :, :k.shape[1]], vbuf[b, :, :v.shape[1]] = k, v
    return kbuf, vbuf, torch.zeros(B, 1, dtype=torch.long), S


def _paged(ks, vs, bs, seed=1):
    """One (Hkv, S, D) pool shared by the batch, each sequence in shuffled, non-consecutive blocks
    (a spare block between any two), tables (B, max_blocks) padded with block 0."""
    B, (Hkv, _, D) = len(ks), ks[0].shape
    need = [-(-k.shape[1] // bs) for k in ks]
    nblocks = 2 * sum(need) + 2
    order = torch.randperm(nblocks, generator=torch.Generator().manual_seed(seed)).tolist()
    kpool = torch.full((Hkv, nblocks * bs, D), 1e3, dtype=ks[0].dtype)
    vpool = torch.full((Hkv, nblocks * bs, D), -1e3, dtype=ks[0].dtype)
    tables = torch.zeros(B, max(need), dtype=torch.long)
    taken = 0
    for b, (k, v) in enumerate(zip(ks, vs)):
        for j in range(need[b]):
            blk = order[2 * taken]                                   # every other block of a shuffle
            taken += 1
            tables[b, j] = blk
            piece = slice(j * bs, min((j + 1) * bs, k.shape[1]))
            width = piece.stop - piece.start
            kpool[:, blk * bs:blk * bs + width], vpool[:, blk * bs:blk * bs + width] = k[:, piece], v[:, piece]
    return kpool, vpool, tables


def _mask(window):
    return masks.causal() if window is None else masks.sliding_window(window)


def _check_oracle(out, lse, q, ks, vs, window, what, scale=None):
    """The batch's rows against the float64 oracle, baseline the math backend in q's dtype, each
    computed one sequence at a time (its own length, q_offset = L - n) and checked as one batch."""
    n = q.shape[2]
    o64, l64, base, base_lse = [], [], [], []
    for b, (k, v) in enumerate(zip(ks, vs)):
        L = k.shape[1]
        o, ls, _ = reference.attention(q[b:b + 1], k[None], v[None], mask=_mask(window), q_offset=L - n,
                                       scale=scale, return_stats=True)
        bo, bl = qkv.attention(q[b:b + 1], k[None], v[None], mask=_mask(window), q_offset=L - n, scale=scale,
                               backend="math", return_lse=True)
        o64.append(torch.from_numpy(o))
        l64.append(torch.from_numpy(ls))
        base.append(bo)
        base_lse.append(bl)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_error_ratio(out, torch.cat(base), torch.cat(o64), what=f"{what} out",
                       ratio=FP32_RATIO if q.dtype == torch.float32 else 2.0)
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
        assert_error_ratio(lse, torch.cat(base_lse), torch.cat(l64), what=f"{what} lse",
                           scale=_score_magnitude(q, ks, scale))


def _score_magnitude(q, ks, scale):
    """The largest sum of |q_d k_d| * |scale| over the rows' keys: the magnitude a score's (and so the
    LSE's) float32 rounding is relative to, where the LSE itself may be much smaller."""
    sc = q.shape[-1] ** -0.5 if scale is None else abs(scale)
    G = q.shape[1] // ks[0].shape[0]
    top = max(float((q[b].abs().double() @ k.abs().double().repeat_interleave(G, 0).transpose(1, 2)).max())
              for b, k in enumerate(ks))
    return top * sc


def _run_case(D, L, n, heads, dtype, window, splits="auto", seed=0):
    """Paged (shuffled blocks) and contiguous against the oracle, ragged lengths; the two the same bits."""
    Hq, Hkv = HEADS[heads]
    lengths = [max(L, n), max(L // 3, n), max(L // 2 + 1, n)]      # ragged within the batch
    q, ks, vs = _data(lengths, Hq, Hkv, n, D, DTYPES[dtype], seed)
    lens = torch.tensor(lengths)
    kbuf, vbuf, zeros, S = _contiguous(ks, vs)
    out_c, lse_c = decode.paged_decode(q, kbuf, vbuf, zeros, lens, block_size=S, window=window, splits=splits,
                                       return_lse=True)
    _check_oracle(out_c, lse_c, q, ks, vs, window, f"contiguous D={D} L={L} n={n} {heads} {dtype} w={window}")
    kpool, vpool, tables = _paged(ks, vs, bs=16 if L > 40 else 4)
    out_p, lse_p = decode.paged_decode(q, kpool, vpool, tables, lens, block_size=16 if L > 40 else 4,
                                       window=window, splits=splits, return_lse=True)
    assert torch.equal(out_p, out_c) and torch.equal(lse_p, lse_c), "paged != contiguous"


# a representative sub-grid: every head dim, length, n, head layout and dtype appears at least once
GRID = [
    (16, 1, 1, "mha", "fp32", None),
    (40, 17, 3, "gqa", "fp16", None),
    (64, 97, 1, "mqa", "bf16", None),
    (80, 300, 3, "mha", "bf16", 50),
    (128, 97, 3, "gqa", "fp32", 20),
    (40, 300, 1, "mqa", "fp16", None),
    (16, 17, 3, "mqa", "bf16", 4),
    (80, 17, 1, "gqa", "fp32", None),
    (128, 1, 1, "mqa", "fp16", None),
    (64, 300, 3, "gqa", "fp16", 100),
]


@pytest.mark.parametrize("D,L,n,heads,dtype,window", GRID)
def test_paged_and_contiguous_match_oracle(D, L, n, heads, dtype, window):
    _run_case(D, L, n, heads, dtype, window)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("L", [1, 17, 97, 300])
@pytest.mark.parametrize("D", [16, 40, 64, 80, 128])
def test_full_grid(D, L, n, heads, dtype):
    _run_case(D, L, n, heads, dtype, None)
    if L > 1:
        _run_case(D, L, n, heads, dtype, max(L // 4, 1), seed=1)


@pytest.mark.parametrize("D", [200, 256])
def test_large_head_dims(D):
    _run_case(D, 97, 3, "gqa", "fp16", None)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_splits_agree(dtype):
    """Splits 1, 3, 7 and 16 (more than the key tiles: empty chunks) give the same rows within rounding,
    and each is right by the rule."""
    q, ks, vs = _data([300, 130, 3], 4, 2, 3, 64, DTYPES[dtype], seed=3)
    kbuf, vbuf, zeros, S = _contiguous(ks, vs)
    lens = torch.tensor([300, 130, 3])
    one, lse1 = decode.paged_decode(q, kbuf, vbuf, zeros, lens, block_size=S, splits=1, return_lse=True)
    for splits in (3, 7, 16):
        many, lse = decode.paged_decode(q, kbuf, vbuf, zeros, lens, block_size=S, splits=splits, return_lse=True)
        _check_oracle(many, lse, q, ks, vs, None, f"splits={splits} {dtype}")
        tol = 2 * EPS[DTYPES[dtype]] * float(one.abs().max().float())
        assert float((many.float() - one.float()).abs().max()) <= tol, f"splits={splits} differs from splits=1"
        assert float((lse - lse1).abs().max()) <= 4 * EPS[torch.float32] * float(lse1.abs().max())
    _check_oracle(one, lse1, q, ks, vs, None, f"splits=1 {dtype}")


def test_auto_splits():
    assert decode.auto_splits("cpu", 8, 10_000) == decode.INTERPRETER_SPLITS
    assert decode.auto_splits("cpu", 8, 0) == 1
    q, ks, vs = _data([97], 2, 2, 1, 32, torch.float32, seed=4)
    kbuf, vbuf, zeros, S = _contiguous(ks, vs)
    out = decode.paged_decode(q, kbuf, vbuf, zeros, torch.tensor([97]), block_size=S)        # auto
    ref = decode.paged_decode(q, kbuf, vbuf, zeros, torch.tensor([97]), block_size=S, splits=1)
    assert float((out - ref).abs().max()) <= 4 * EPS[torch.float32]


def test_scale_and_strided_query():
    """A given scale, and q a non-contiguous view (strides are read, nothing copied)."""
    q, ks, vs = _data([50, 20], 4, 2, 2, 48, torch.float32, seed=5)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)                  # (B, Hq, n, D), other strides
    assert not qt.is_contiguous()
    kbuf, vbuf, zeros, S = _contiguous(ks, vs)
    out, lse = decode.paged_decode(qt, kbuf, vbuf, zeros, torch.tensor([50, 20]), block_size=S, scale=0.3,
                                   window=7, return_lse=True)
    _check_oracle(out, lse, q, ks, vs, 7, "scale 0.3, strided q", scale=0.3)


def test_rows_with_nothing_to_see_are_zero():
    """Lengths 0 and 2 with n = 3 new rows: rows at positions < 0 give zeros and LSE -inf, no NaN."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 2, 3, 16, generator=g)
    kbuf, vbuf = torch.randn(2, 1, 8, 16, generator=g), torch.randn(2, 1, 8, 16, generator=g)
    out, lse = decode.paged_decode(q, kbuf, vbuf, torch.zeros(2, 1, dtype=torch.long), torch.tensor([0, 2]),
                                   block_size=8, splits=2, return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(out[0], torch.zeros_like(out[0])) and bool(torch.isneginf(lse[0]).all())
    assert torch.equal(out[1, :, 0], torch.zeros_like(out[1, :, 0])) and bool(torch.isneginf(lse[1, :, 0]).all())
    # row 1 of sequence 1 sits at position 0, row 2 at position 1: the oracle over the two keys
    o64, l64, _ = reference.attention(q[1:2, :, 1:], kbuf[1:2, :, :2], vbuf[1:2, :, :2], causal=True,
                                      return_stats=True)
    assert float((out[1:2, :, 1:].double() - torch.from_numpy(o64)).abs().max()) < 1e-5
    assert float((lse[1:2, :, 1:].double() - torch.from_numpy(l64)).abs().max()) < 1e-5


def _full_forward_check(cache_out, lse, q_all, k_all, v_all, n, window, what):
    """The kernel's n rows against the full forward's last n rows (the oracle's, the math backend's)."""
    mask = _mask(window)
    for b in range(q_all.shape[0]):
        o64 = torch.from_numpy(reference.attention(q_all[b:b + 1], k_all[b:b + 1], v_all[b:b + 1], mask=mask))
        full = qkv.attention(q_all[b:b + 1], k_all[b:b + 1], v_all[b:b + 1], mask=mask, backend="math")
        assert_error_ratio(cache_out[b:b + 1], full[:, :, -n:], o64[:, :, -n:], what=f"{what}[{b}]")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_real_paged_cache(dtype):
    """A PagedCache filled by interleaved appends (sequences' blocks interleave in the pool) and a fork
    (shared blocks, a copied partial block): its block_tables() feed the kernel, which equals the full
    forward of each sequence."""
    dt = DTYPES[dtype]
    Hq, Hkv, D, n, bs = 4, 2, 40, 3, 8
    pool = BlockPool(32, bs)
    a, b = pool.new_sequence(), pool.new_sequence()
    cache = PagedCache(pool, Hkv, D, seqs=[a, b], dtype=dt)
    g = torch.Generator().manual_seed(7)
    seqk = {a: [], b: []}
    seqv = {a: [], b: []}

    def put(sid, m):
        k = torch.randn(1, Hkv, m, D, generator=g, dtype=torch.float64).to(dt)
        v = torch.randn(1, Hkv, m, D, generator=g, dtype=torch.float64).to(dt)
        cache.view([sid]).append(k, v)
        seqk[sid].append(k)
        seqv[sid].append(v)

    for sid, m in ((a, 11), (b, 5), (a, 9), (b, 20), (a, 7)):
        put(sid, m)
    c = pool.fork(a, 21)                                            # shares a's first 2 blocks, copies a part
    seqk[c], seqv[c] = [torch.cat(seqk[a], 2)[:, :, :21]], [torch.cat(seqv[a], 2)[:, :, :21]]
    cache.lengths_by_seq[c] = 21
    put(c, 6)
    put(b, n)
    put(c, n)
    put(a, n)
    view = cache.view([a, b, c])
    tables, lengths = view.block_tables()
    assert lengths.tolist() == [30, 28, 30]
    assert len(set(tables[0].tolist()) & set(tables[2].tolist())) == 2, "the fork shares two blocks"
    k_all = [torch.cat(seqk[s], 2) for s in (a, b, c)]              # (1, Hkv, L, D) each
    v_all = [torch.cat(seqv[s], 2) for s in (a, b, c)]
    q_all = [torch.randn(1, Hq, k.shape[2], D, generator=g, dtype=torch.float64).to(dt) for k in k_all]
    q = torch.cat([x[:, :, -n:] for x in q_all])                    # (3, Hq, n, D): the new rows
    for window in (None, 10):
        out = decode.paged_decode(q, view.k, view.v, tables, lengths, block_size=view.block_size, window=window)
        for i in range(3):
            _full_forward_check(out[i:i + 1], None, q_all[i], k_all[i], v_all[i], n, window, f"paged {dtype} w={window}")


def test_real_contiguous_and_ring_caches():
    """A ContiguousCache (ragged lengths, n = 2 new rows) and a RingCache (n = 1, the window in storage
    order) through their block_tables(), against the full forward."""
    Hq, Hkv, D, n = 4, 1, 24, 2
    g = torch.Generator().manual_seed(8)
    L = [19, 12]
    k_all = [torch.randn(1, Hkv, m, D, generator=g) for m in L]
    v_all = [torch.randn(1, Hkv, m, D, generator=g) for m in L]
    q_all = [torch.randn(1, Hq, m, D, generator=g) for m in L]
    cache = ContiguousCache(2, Hkv, D, 32, window=6)
    for b in range(2):
        cache.row(b).append(k_all[b], v_all[b])
    tables, lengths = cache.block_tables()
    q = torch.cat([x[:, :, -n:] for x in q_all])
    out = decode.paged_decode(q, cache.k, cache.v, tables, lengths, block_size=cache.block_size, window=cache.window)
    for b in range(2):
        _full_forward_check(out[b:b + 1], None, q_all[b], k_all[b], v_all[b], n, 6, "contiguous cache")

    ring = RingCache(1, Hkv, D, 5)
    for t in range(L[0]):
        ring.append(k_all[0][:, :, t:t + 1], v_all[0][:, :, t:t + 1])
    tables, filled = ring.block_tables()
    out = decode.paged_decode(q_all[0][:, :, -1:], ring.k, ring.v, tables, filled, block_size=ring.block_size)
    _full_forward_check(out, None, q_all[0], k_all[0], v_all[0], 1, 5, "ring cache")


def test_cpu_routing_unchanged():
    """On CPU tensors qkv.kernels keeps its numba path: fp16 and autograd are not its, whatever Triton says."""
    from qkv import kernels
    q = torch.randn(1, 2, 1, 16, dtype=torch.float16)
    assert not kernels.paged_decode_applies(q, torch.randn(2, 8, 16, dtype=torch.float16))
    qg = torch.randn(1, 2, 1, 16, requires_grad=True)
    assert not kernels.paged_decode_applies(qg, torch.randn(2, 8, 16))


def _good():
    g = torch.Generator().manual_seed(9)
    return {"q": torch.randn(2, 4, 1, 16, generator=g), "kpool": torch.randn(2, 32, 16, generator=g),
                "vpool": torch.randn(2, 32, 16, generator=g), "tables": torch.tensor([[0, 1], [2, 3]]),
                "lengths": torch.tensor([10, 16]), "block_size": 8}


BAD = [
    ("q 3-D", {"q": torch.randn(2, 4, 16)}, ValueError, "q must be"),
    ("q int", {"q": torch.ones(2, 4, 1, 16, dtype=torch.int32)}, TypeError, "dtype"),
    ("pool dtype", {"kpool": torch.randn(2, 32, 16, dtype=torch.float16)}, TypeError, "q's dtype"),
    ("k/v shapes", {"vpool": torch.randn(2, 31, 16)}, ValueError, "one shape"),
    ("heads", {"kpool": torch.randn(3, 32, 16), "vpool": torch.randn(3, 32, 16)}, ValueError, "Hkv dividing"),
    ("head dim 8", {"q": torch.randn(2, 4, 1, 8), "kpool": torch.randn(2, 32, 8), "vpool": torch.randn(2, 32, 8)},
     ValueError, "head dims 16..256"),
    ("pool batch", {"kpool": torch.randn(3, 2, 32, 16), "vpool": torch.randn(3, 2, 32, 16)}, ValueError, "B = 2"),
    ("tables float", {"tables": torch.zeros(2, 2)}, ValueError, "tables must be"),
    ("tables batch", {"tables": torch.zeros(3, 2, dtype=torch.long)}, ValueError, "tables must be"),
    ("lengths shape", {"lengths": torch.tensor([10])}, ValueError, "lengths must be"),
    ("length too long", {"lengths": torch.tensor([10, 17])}, ValueError, "within 0..16"),
    ("length < 0", {"lengths": torch.tensor([-1, 3])}, ValueError, "within 0..16"),
    ("block outside", {"tables": torch.tensor([[0, 1], [2, 4]])}, ValueError, "block numbers"),
    ("block_size 0", {"block_size": 0}, ValueError, "block_size"),
    ("window 0", {"window": 0}, ValueError, "window"),
    ("scale nan", {"scale": float("nan")}, ValueError, "scale"),
    ("splits 0", {"splits": 0}, ValueError, "splits"),
    ("splits str", {"splits": "many"}, ValueError, "splits"),
    ("kpool list", {"kpool": [1.0]}, TypeError, "kpool must be a torch.Tensor"),
]


@pytest.mark.parametrize("what,change,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_refused(what, change, exc, match):
    args = {**_good(), **change}
    with pytest.raises(exc, match=match):
        decode.paged_decode(args.pop("q"), args.pop("kpool"), args.pop("vpool"), args.pop("tables"),
                            args.pop("lengths"), **args)


def test_good_inputs_run():
    """The inputs the refusals start from are good: the kernel serves them."""
    args = _good()
    out = decode.paged_decode(args.pop("q"), args.pop("kpool"), args.pop("vpool"), args.pop("tables"),
                              args.pop("lengths"), **args)
    assert out.shape == (2, 4, 1, 16) and bool(torch.isfinite(out).all())


def test_autograd_refused_naming_qkv_attention():
    args = _good()
    q = args.pop("q").requires_grad_(True)
    with pytest.raises(ValueError, match="qkv.attention"):
        decode.paged_decode(q, args["kpool"], args["vpool"], args["tables"], args["lengths"], block_size=8)
    with torch.no_grad():                                           # no graph to build: served
        out = decode.paged_decode(q, args["kpool"], args["vpool"], args["tables"], args["lengths"], block_size=8)
    assert not out.requires_grad


def test_refused_off_the_interpreter(monkeypatch):
    """On CPU tensors without the interpreter the kernel cannot run, and says why."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = _good()
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        decode.paged_decode(args.pop("q"), args.pop("kpool"), args.pop("vpool"), args.pop("tables"),
                            args.pop("lengths"), **args)
