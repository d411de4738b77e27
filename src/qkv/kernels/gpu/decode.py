"""A Triton decode kernel: n >= 1 new query rows per sequence against a contiguous or paged KV cache.

Legend: B batch (sequences), Hq query heads, Hkv key/value heads, G = Hq // Hkv, n new query rows
per sequence, D head dim, BD the next power of two >= D, bs block size, S pool slots, P splits,
BM rows of one program (padded to >= 16 for tl.dot), BN keys of one tile.

`paged_decode(q, kpool, vpool, tables, lengths, block_size=...)` is `qkv.kernels.paged_decode`'s
interface with more rows: q (B, Hq, n, D), row i of sequence b at position lengths[b] - n + i,
seeing the keys at positions <= its own (and with `window` only the last `window` of them).

One program per (sequence, kv head, split, row block). Its rows are the G query heads x n queries of
one GQA group (row r = g * n + i), so each K/V tile is read once for the whole group. Keys are read
through the block table, one tile of BN positions at a time: slot = tables[b, pos // bs] * bs +
pos % bs, a gather by pointer arithmetic. The keys a sequence's rows may see, [lo, lengths[b]), are
cut into P chunks (split-KV) of whole tiles; each chunk writes a float32 partial output and its
log-sum-exp as two numbers (its max and its sum), and the chunks are merged by log-sum-exp here
with torch (`_merge`). With P = 1 the kernel writes
the output in q's dtype directly.

Softmax runs in base 2 (log2(e) folded into the scale), statistics and accumulation in float32. The
running max m is kept in raw-score units and subtracted before scaling, p = exp2((s - m) * scale *
log2(e)), so the rounding of the exponent is relative to s - m (small where the weights are large)
rather than to s, and scale * log2(e) is passed as two float32s (hi + lo), so its rounding does not
bias every weight of the row the same way; a negative scale negates the scores (exactly) and uses |scale|. Rows with no key to
see (m = -inf) give zeros and LSE -inf, never NaN (scale 0 included). fp32 dots ask for IEEE
precision (on the GPU an fp32 tl.dot otherwise rounds its inputs to TF32). Under Triton's
interpreter a tl.dot of bfloat16 operands is wrong (it multiplies the raw bits) and a cast to bfloat16
truncates, so there, for bf16, both operands are cast to float32 first, p rounded to the nearest bf16
value before (as the GPU rounds it), and so is the output before it is stored.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from qkv.kernels import gpu

__all__ = ["MIN_CHUNK", "auto_splits", "paged_decode"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_CHUNK = 256                   # keys: auto splits no sequence's keys into smaller chunks (on CUDA)
INTERPRETER_SPLITS = 2            # auto's split count under the interpreter (small: it is slow)
NO_WINDOW = 1 << 30               # the window the kernel sees when there is none
LOG2E = 1.4426950408889634
_SMS: dict = {}                   # CUDA device index -> multiprocessor count


@triton.jit
def _round_bf16(x):
    """float32 x rounded to the nearest bfloat16 (ties to even), kept in float32: the interpreter's own
    cast to bfloat16 truncates, the GPU's rounds."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _decode_kernel(Q, K, V, T, LENS, O, LSE, LSUM,
                   sqb, sqh, sqn, sqd, skb, skh, sks, skd, svb, svh, svs, svd, stb, stw,
                   sop, sob, soh, son, sod, slp, slb, slh, sln,
                   Hkv, G, n, block_size, window, c_hi, c_lo, sm_scale,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   SPLITS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, NEGATE: tl.constexpr,
                   ROUND_OUT: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // Hkv).to(tl.int64)
    h = pid % Hkv
    r = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)          # (BM,) rows: r = g * n + i
    g = r // n
    i = r % n
    rmask = r < G * n
    head = (h * G + g).to(tl.int64)                                 # (BM,) query heads
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    L = tl.load(LENS + b).to(tl.int32)
    pos = L - n + i                                                 # (BM,) each row's own position
    lo = tl.maximum(L - n - window + 1, 0)                          # the first key any row sees
    span = tl.maximum(L - lo, 0)
    chunk = tl.cdiv(tl.cdiv(span, SPLITS), BLOCK_N) * BLOCK_N       # whole tiles per split
    start = lo + split * chunk
    end = tl.minimum(start + chunk, L)

    q = tl.load(Q + b * sqb + head[:, None] * sqh + i[:, None] * sqn + d[None, :] * sqd,
                mask=rmask[:, None] & dmask[None, :], other=0.0)    # (BM, BD)
    if UPCAST:
        q = q.to(tl.float32)
    kbase = K + b * skb + h * skh
    vbase = V + b * svb + h * svh
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs = start_n + tl.arange(0, BLOCK_N)                      # (BN,) key positions
        kvalid = offs < end
        blk = tl.load(T + b * stb + (offs // block_size) * stw, mask=kvalid, other=0).to(tl.int64)
        slot = blk * block_size + (offs % block_size)              # (BN,) pool slots
        kv_mask = kvalid[:, None] & dmask[None, :]
        k = tl.load(kbase + slot[:, None] * sks + d[None, :] * skd, mask=kv_mask, other=0.0)  # (BN, BD)
        v = tl.load(vbase + slot[:, None] * svs + d[None, :] * svd, mask=kv_mask, other=0.0)  # (BN, BD)
        if UPCAST:
            k = k.to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))                              # (BM, BN) float32
        if NEGATE:
            s = -s                                                  # a negative scale: |scale| below (exact)
        allowed = (offs[None, :] <= pos[:, None]) & (offs[None, :] > pos[:, None] - window) & kvalid[None, :]
        m_new = tl.maximum(m, tl.max(tl.where(allowed, s, float("-inf")), 1))   # raw-score units
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)        # a row with nothing yet: no NaN
        # the max is subtracted before scaling: the exponent's rounding is relative to s - m, not s
        # and scale * log2(e) is c_hi + c_lo (two float32s): no bias of the softmax's temperature
        dm = tl.where(m == float("-inf"), 0.0, m - m_use)
        alpha = tl.where(m == float("-inf"), 0.0, tl.exp2(dm * c_hi + dm * c_lo))
        x = s - m_use[:, None]
        p = tl.where(allowed, tl.exp2(x * c_hi + x * c_lo), 0.0)   # (BM, BN)
        l = l * alpha + tl.sum(p, 1)
        if UPCAST:
            pv = _round_bf16(p)                                     # p as the GPU rounds it to bf16
            v = v.to(tl.float32)
        else:
            pv = p.to(V.dtype.element_ty)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(pv, v)
        m = m_new

    seen = l > 0
    out = acc / tl.where(seen, l, 1.0)[:, None]                     # (BM, BD); zeros where nothing seen
    if ROUND_OUT:
        out = _round_bf16(out)                                      # so the store's truncation is exact
    obase = O + split * sop + b * sob
    tl.store(obase + head[:, None] * soh + i[:, None] * son + d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
    lptr = LSE + split * slp + b * slb + head * slh + i * sln
    if SPLITS == 1:
        lse = tl.where(seen, m * sm_scale + tl.log(tl.where(seen, l, 1.0)), float("-inf"))   # natural units
        tl.store(lptr, lse, mask=rmask)
    else:                                  # a chunk's max (raw units) and sum, for _merge
        tl.store(lptr, m, mask=rmask)
        tl.store(LSUM + split * slp + b * slb + head * slh + i * sln, l, mask=rmask)


def _sms(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def auto_splits(device, programs: int, keys: int) -> int:
    """How many chunks `splits="auto"` cuts each sequence's `keys` keys into, for `programs`
    programs per split: under the interpreter a small fixed number (INTERPRETER_SPLITS); on CUDA
    enough to give the device about twice as many programs as it has multiprocessors, but no
    chunk under MIN_CHUNK keys."""
    device = torch.device(device)
    if device.type != "cuda":
        return max(1, min(INTERPRETER_SPLITS, keys))
    want = -(-2 * _sms(device) // max(programs, 1))
    return max(1, min(want, keys // MIN_CHUNK, 128))


def _merge(o_part: Tensor, m_part: Tensor, s_part: Tensor, scale: float, out: Tensor, lse: Tensor) -> None:
    """The chunks' rows merged into out (B, Hq, n, D) and lse (B, Hq, n), in place: chunk c's share is
    s_c * exp(scale * (m_c - M)) with M the largest max (a log-sum-exp merge that keeps each chunk's
    max and sum apart, so its rounding is relative to m_c - M rather than to the rows' LSE), the
weights in float64."""
    m_part, s_part = m_part.double(), s_part.double()               # small: (P, B, Hq, n)
    M = m_part.amax(0)                                               # (B, Hq, n); -inf where nothing seen
    M = torch.where(torch.isinf(M), 0.0, M)
    f = torch.where(s_part > 0, s_part * torch.exp((m_part - M) * scale), 0.0)   # (P, B, Hq, n)
    F = f.sum(0)                                                     # (B, Hq, n)
    seen = F > 0
    merged = (f[..., None] * o_part).sum(0) / torch.where(seen, F, 1.0)[..., None]   # (B, Hq, n, D)
    out.copy_(merged)
    lse.copy_(torch.where(seen, M * scale + torch.log(torch.where(seen, F, 1.0)), float("-inf")))


def _check(q, kpool, vpool, tables, lengths, block_size, window, scale, splits) -> None:
    """Refuse what the kernel cannot serve, naming the argument."""
    for name, t in (("q", q), ("kpool", kpool), ("vpool", vpool), ("tables", tables), ("lengths", lengths)):
        if not isinstance(t, Tensor):
            raise TypeError(f"paged_decode: {name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4 or q.shape[2] < 1:
        raise ValueError(f"paged_decode: q must be (B, Hq, n, D) with n >= 1 new rows, got {tuple(q.shape)}")
    if q.dtype not in DTYPES:
        raise TypeError(f"paged_decode: q's dtype must be float16, bfloat16 or float32, got {q.dtype}")
    if kpool.dtype != q.dtype or vpool.dtype != q.dtype:
        raise TypeError(f"paged_decode: kpool and vpool must have q's dtype {q.dtype}, got {kpool.dtype} and "
                        f"{vpool.dtype}; cast the query or build the cache in {q.dtype}")
    if kpool.shape != vpool.shape or kpool.dim() not in (3, 4):
        raise ValueError(f"paged_decode: kpool and vpool must be one shape, (Hkv, slots, D) or (B, Hkv, slots, D); "
                         f"got {tuple(kpool.shape)} and {tuple(vpool.shape)}")
    B, Hq, _, D = q.shape
    Hkv = kpool.shape[-3]
    if kpool.shape[-1] != D or Hkv < 1 or Hq % Hkv:
        raise ValueError(f"paged_decode: q {tuple(q.shape)} needs a pool of head dim {D} and Hkv dividing Hq={Hq}; "
                         f"got pool {tuple(kpool.shape)}")
    if kpool.dim() == 4 and kpool.shape[0] not in (1, B):
        raise ValueError(f"paged_decode: a (B, Hkv, slots, D) pool needs B = {B} (or 1), got {kpool.shape[0]}")
    if not 16 <= D <= 256:
        raise ValueError(f"paged_decode: the Triton decode kernel takes head dims 16..256, got {D}; "
                         f"use qkv.attention over the cache's keys for other sizes")
    if q.device != kpool.device or q.device != vpool.device:
        raise ValueError(f"paged_decode: q, kpool and vpool must be on one device, got {q.device}, "
                         f"{kpool.device}, {vpool.device}")
    why = gpu.why_not(q.device)
    if why is not None:
        raise ValueError(f"paged_decode: the Triton decode kernel cannot run here: {why}")
    if torch.is_grad_enabled() and (q.requires_grad or kpool.requires_grad or vpool.requires_grad):
        raise ValueError("paged_decode: the Triton decode kernel has no backward; to differentiate, call "
                         "qkv.attention over the cache's keys (or run this under torch.no_grad())")
    _check_tables(tables, lengths, B, kpool.shape[-2], block_size)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"paged_decode: window must be None or an int >= 1, got {window!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"paged_decode: scale must be None or a finite number, got {scale!r}")
    if splits != "auto" and (isinstance(splits, bool) or not isinstance(splits, int) or splits < 1):
        raise ValueError(f"paged_decode: splits must be 'auto' or an int >= 1, got {splits!r}")


def _check_tables(tables, lengths, B: int, slots: int, block_size) -> None:
    """Tables (B, max_blocks) and lengths (B,) of integers; where they are on the CPU (as the caches
    give them), every length within its table and every block within the pool."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"paged_decode: block_size must be an int >= 1, got {block_size!r}")
    if tables.dim() != 2 or tables.shape[0] != B or tables.shape[1] < 1 or tables.is_floating_point() \
            or tables.dtype == torch.bool:
        raise ValueError(f"paged_decode: tables must be (B={B}, max_blocks >= 1) integers, got "
                         f"{tuple(tables.shape)} {tables.dtype}")
    if lengths.shape != (B,) or lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise ValueError(f"paged_decode: lengths must be (B={B},) integers, got {tuple(lengths.shape)} {lengths.dtype}")
    if block_size > slots:
        raise ValueError(f"paged_decode: block_size {block_size} is larger than the pool's {slots} slots")
    if lengths.device.type == "cpu" and B:
        top = tables.shape[1] * block_size
        if int(lengths.min()) < 0 or int(lengths.max()) > top:
            raise ValueError(f"paged_decode: lengths must be within 0..{top} (max_blocks x block_size), got "
                             f"{lengths.tolist()}")
    if tables.device.type == "cpu" and B and (int(tables.min()) < 0 or int(tables.max()) >= slots // block_size):
        raise ValueError(f"paged_decode: block numbers must be within 0..{slots // block_size - 1} (the pool "
                         f"has {slots} slots of blocks of {block_size}), got {int(tables.min())}.."
                         f"{int(tables.max())}")


def _key_bound(tables: Tensor, lengths: Tensor, block_size: int, n: int, window: int | None) -> int:
    """An upper bound of the keys any sequence's rows see (exact where lengths are on the CPU;
    from the tables' width elsewhere, so no device sync)."""
    top = int(lengths.max()) if lengths.device.type == "cpu" else tables.shape[1] * block_size
    return top if window is None else min(top, window + n - 1)


def paged_decode(q: Tensor, kpool: Tensor, vpool: Tensor, tables: Tensor, lengths: Tensor, *, block_size: int,
                 window: int | None = None, scale: float | None = None, splits="auto", return_lse: bool = False):
    """n new query rows per sequence against its own cache blocks, on CUDA (or Triton's interpreter).

    q (B, Hq, n, D), fp16/bf16/fp32, D in 16..256. kpool, vpool in q's dtype: (Hkv, slots, D), one
    pool shared by the batch, slot = block * block_size + offset; or (B, Hkv, slots, D), one buffer
    per sequence (a contiguous cache: tables (B, 1) zeros, block_size = slots). tables
    (B, max_blocks) integers: each sequence's blocks in position order. lengths (B,): tokens per
    sequence, the new rows' own included: row i sits at position lengths[b] - n + i and sees the keys
    at positions <= its own, with `window` only the last `window` of them. A row with nothing to see
    (a position < 0) gives zeros and LSE -inf. `scale` multiplies q k^T (default 1 / sqrt(D)).
    `splits`: chunks each sequence's keys are cut into, merged by log-sum-exp ("auto": `auto_splits`).

    Returns (B, Hq, n, D) in q's dtype, and with `return_lse` also the float32 (B, Hq, n) log-sum-exp
    of each row's scaled scores. No autograd (a ValueError names qkv.attention for that).
    """
    _check(q, kpool, vpool, tables, lengths, block_size, window, scale, splits)
    B, Hq, n, D = q.shape
    if kpool.dim() == 3:
        kpool, vpool = kpool[None], vpool[None]                     # (1, Hkv, S, D): stride 0 over b below
    Hkv = kpool.shape[1]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    BLOCK_M = max(16, min(triton.next_power_of_2(G * n), 64))
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_N = 64 if BLOCK_D <= 128 else 32
    row_blocks = -(-(G * n) // BLOCK_M)
    if splits == "auto":
        splits = auto_splits(q.device, B * Hkv * row_blocks, _key_bound(tables, lengths, block_size, n, window))
    out = torch.empty(B, Hq, n, D, dtype=q.dtype, device=q.device)   # (B, Hq, n, D)
    lse = torch.empty(B, Hq, n, dtype=torch.float32, device=q.device)  # (B, Hq, n)
    if B == 0:
        return (out, lse) if return_lse else out
    if splits == 1:
        o_part, m_part, s_part = out[None], lse[None], lse[None]    # (1, B, Hq, n, D), (1, B, Hq, n) x2
    else:
        o_part = torch.empty(splits, B, Hq, n, D, dtype=torch.float32, device=q.device)  # (P, B, Hq, n, D)
        m_part = torch.empty(splits, B, Hq, n, dtype=torch.float32, device=q.device)     # (P, B, Hq, n)
        s_part = torch.empty_like(m_part)                                                 # (P, B, Hq, n)
    tables = tables.to(device=q.device, dtype=torch.int64)
    lengths = lengths.to(device=q.device, dtype=torch.int64)
    kb = 0 if kpool.shape[0] == 1 else kpool.stride(0)
    vb = 0 if vpool.shape[0] == 1 else vpool.stride(0)
    grid = (B * Hkv, splits, row_blocks)
    upcast = q.dtype == torch.bfloat16 and gpu.interpreting()      # the interpreter's bf16 dot and cast
    c_hi = float(torch.tensor(abs(scale) * LOG2E, dtype=torch.float32))   # scale * log2(e) = c_hi + c_lo
    c_lo = abs(scale) * LOG2E - c_hi
    _decode_kernel[grid](
        q, kpool, vpool, tables, lengths, o_part, m_part, s_part,
        *q.stride(), kb, *kpool.stride()[1:], vb, *vpool.stride()[1:], *tables.stride(),
        *o_part.stride(), *m_part.stride(),
        Hkv, G, n, int(block_size), NO_WINDOW if window is None else int(window), c_hi, c_lo, abs(scale),
        D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, SPLITS=splits, UPCAST=upcast,
        IEEE=q.dtype == torch.float32, NEGATE=scale < 0, ROUND_OUT=upcast and splits == 1,
        num_warps=4 if BLOCK_D <= 64 else 8)
    if splits > 1:
        _merge(o_part, m_part, s_part, abs(scale), out, lse)
    return (out, lse) if return_lse else out
