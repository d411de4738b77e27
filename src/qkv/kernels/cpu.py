"""The numba code of `qkv.kernels`: every compiled kernel, at module level.

Imported by `qkv.kernels` on first use only (importing this module imports numba and sets
its threading layer, so `import qkv` never does); nothing else should import it. Each
function is compiled on its first call, for the types it gets, and cached on disk next to
this file where the directory is writable (numba's `cache=True`).

- `skinny` (through `skinny_ptr`, tensors by address): y = x @ W^T for a few rows of x;
- `paged`: one query per sequence against its own blocks of a paged KV cache;
- `norm_rows`, `exp_rows`, `activate`, `rotate`: the row-wise steps of a block;
- `block` (through `block_ptr` and `blocks_ptr`, one launch for all layers): one pre-norm
  decoder block for one new token per sequence.

The kernels are module-level functions, not closures, on purpose: numba's cache key hashes
the values a closure captures, and a captured dispatcher pickles differently in every
process, so closures over other kernels missed the disk cache and were compiled again (and
cached again) in every process.

`KERNELS` names the entry points `qkv.kernels.launch` runs; `set_threads` sets the size of
numba's thread pool. The wrappers in `qkv.kernels` document the layouts; the comments here
say how each loop reads memory and why.
"""

from __future__ import annotations

import math
import sys

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

__all__ = ["KERNELS", "SIGNATURES", "DECODE", "load", "cache_index", "set_threads", "skinny_ptr", "skinny", "paged", "norm_rows", "exp_rows", "activate",
           "rotate", "block", "block_ptr", "blocks_ptr", "f32ptr", "i64ptr", "pointer_to"]

# prefer the OpenMP pool (torch's own runtime is OpenMP; its idle threads
# then wait the same way); numba falls back to what is installed. Set before any compile.
numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
jit = numba.njit(parallel=True, fastmath={"reassoc", "contract"}, boundscheck=False, cache=True, nogil=True)


def pointer_to(item):
    @intrinsic
    def cast(typingctx, addr):                  # pragma: no cover - compiled
        sig = types.CPointer(item)(types.int64)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(sig.return_type))
        return sig, codegen
    return cast


f32ptr, i64ptr = pointer_to(types.float32), pointer_to(types.int64)     # an address -> a typed pointer


@numba.njit(cache=True, nogil=True)
def skinny_ptr(xp, wp, bp, has_bias, outp, M, K, N):   # pragma: no cover - compiled
    # tensors by address: no per-call array conversions (they cost more than a small product)
    x, w = numba.carray(f32ptr(xp), (M, K)), numba.carray(f32ptr(wp), (N, K))
    bias, out = numba.carray(f32ptr(bp), (N if has_bias else 1,)), numba.carray(f32ptr(outp), (M, N))
    skinny(x, w, bias, has_bias, out)


@jit
def skinny(x, w, bias, has_bias, out):          # pragma: no cover - compiled; tested through linear()
    # W as four sequential streams: rows r, r + Q, r + 2Q, r + 3Q (Q = N // 4) together, so
    # each core's share of W is four long runs of consecutive rows that the hardware
    # prefetcher follows; against four rows of x at a time (16 accumulators), then two,
    # then one. The last N % 4 rows of W one at a time.
    M, K = x.shape
    N = w.shape[0]
    Q = N // 4
    for r in numba.prange(Q + N - 4 * Q):
        if r >= Q:
            n = 4 * Q + (r - Q)
            for m in range(M):
                acc = np.float32(0.0)
                for k in range(K):
                    acc += x[m, k] * w[n, k]
                out[m, n] = acc + bias[n] if has_bias else acc
            continue
        n0 = r
        n1 = r + Q
        n2 = r + 2 * Q
        n3 = r + 3 * Q
        m = 0
        while m + 4 <= M:
            a0 = np.float32(0.0); a1 = np.float32(0.0); a2 = np.float32(0.0); a3 = np.float32(0.0)
            b0 = np.float32(0.0); b1 = np.float32(0.0); b2 = np.float32(0.0); b3 = np.float32(0.0)
            c0 = np.float32(0.0); c1 = np.float32(0.0); c2 = np.float32(0.0); c3 = np.float32(0.0)
            d0 = np.float32(0.0); d1 = np.float32(0.0); d2 = np.float32(0.0); d3 = np.float32(0.0)
            for k in range(K):
                w0 = w[n0, k]; w1 = w[n1, k]; w2 = w[n2, k]; w3 = w[n3, k]
                xa = x[m, k]; xb = x[m + 1, k]; xc = x[m + 2, k]; xd = x[m + 3, k]
                a0 += xa * w0; a1 += xa * w1; a2 += xa * w2; a3 += xa * w3
                b0 += xb * w0; b1 += xb * w1; b2 += xb * w2; b3 += xb * w3
                c0 += xc * w0; c1 += xc * w1; c2 += xc * w2; c3 += xc * w3
                d0 += xd * w0; d1 += xd * w1; d2 += xd * w2; d3 += xd * w3
            out[m, n0] = a0; out[m, n1] = a1; out[m, n2] = a2; out[m, n3] = a3
            out[m + 1, n0] = b0; out[m + 1, n1] = b1; out[m + 1, n2] = b2; out[m + 1, n3] = b3
            out[m + 2, n0] = c0; out[m + 2, n1] = c1; out[m + 2, n2] = c2; out[m + 2, n3] = c3
            out[m + 3, n0] = d0; out[m + 3, n1] = d1; out[m + 3, n2] = d2; out[m + 3, n3] = d3
            m += 4
        while m + 2 <= M:
            a0 = np.float32(0.0); a1 = np.float32(0.0); a2 = np.float32(0.0); a3 = np.float32(0.0)
            b0 = np.float32(0.0); b1 = np.float32(0.0); b2 = np.float32(0.0); b3 = np.float32(0.0)
            for k in range(K):
                w0 = w[n0, k]; w1 = w[n1, k]; w2 = w[n2, k]; w3 = w[n3, k]
                xa = x[m, k]; xb = x[m + 1, k]
                a0 += xa * w0; a1 += xa * w1; a2 += xa * w2; a3 += xa * w3
                b0 += xb * w0; b1 += xb * w1; b2 += xb * w2; b3 += xb * w3
            out[m, n0] = a0; out[m, n1] = a1; out[m, n2] = a2; out[m, n3] = a3
            out[m + 1, n0] = b0; out[m + 1, n1] = b1; out[m + 1, n2] = b2; out[m + 1, n3] = b3
            m += 2
        if m < M:
            a0 = np.float32(0.0); a1 = np.float32(0.0); a2 = np.float32(0.0); a3 = np.float32(0.0)
            for k in range(K):
                xa = x[m, k]
                a0 += xa * w[n0, k]; a1 += xa * w[n1, k]; a2 += xa * w[n2, k]; a3 += xa * w[n3, k]
            out[m, n0] = a0; out[m, n1] = a1; out[m, n2] = a2; out[m, n3] = a3
        if has_bias:
            for m in range(M):
                out[m, n0] += bias[n0]; out[m, n1] += bias[n1]; out[m, n2] += bias[n2]; out[m, n3] += bias[n3]


@jit
def paged(q, kpool, vpool, tables, lengths, window, block_size, scale, out):   # pragma: no cover - compiled
    # q, out (B, Hkv, G, D); kpool, vpool (1 or B, Hkv, slots, D); tables (B, max_blocks); lengths (B,)
    # Per (sequence, kv head): every score of the row first, then the values. Keys and values
    # are read as four interleaved runs (quarters of the row) the prefetcher streams together,
    # four keys per pass: four dot products share each load of q and reduce once each; the
    # values go into four accumulators. Each key and value is loaded once for the G query
    # heads of a GQA group. One max, one exponential per key.
    B, H, G, D = q.shape
    sc = np.float32(scale)
    for item in numba.prange(B * H):
        b = item // H
        h = item - b * H
        bk = b if kpool.shape[0] > 1 else 0
        L = lengths[b]
        first = 0 if window <= 0 else max(0, L - window)        # the query at L-1 sees positions > L-1-window
        n = L - first
        if n <= 0:
            for g in range(G):
                for d in range(D):
                    out[b, h, g, d] = np.float32(0.0)
            continue
        slot = np.empty(n, dtype=np.int64)                       # position first + j -> pool slot
        j = 0
        blk = first // block_size
        off = first - blk * block_size
        while j < n:                                             # block by block: no division per key
            base = tables[b, blk] * block_size + off
            run = min(block_size - off, n - j)
            for i in range(run):
                slot[j + i] = base + i
            j += run
            blk += 1
            off = 0
        quarter = n // 4                                         # four runs of `quarter` keys, then the rest
        qs = np.empty((G, D), dtype=np.float32)
        for g in range(G):
            for d in range(D):
                qs[g, d] = q[b, h, g, d] * sc
        s = np.empty((G, n), dtype=np.float32)
        for i in range(quarter):
            o0, o1, o2, o3 = slot[i], slot[quarter + i], slot[2 * quarter + i], slot[3 * quarter + i]
            for g in range(G):
                a0 = np.float32(0.0); a1 = np.float32(0.0); a2 = np.float32(0.0); a3 = np.float32(0.0)
                for d in range(D):
                    qd = qs[g, d]
                    a0 += qd * kpool[bk, h, o0, d]; a1 += qd * kpool[bk, h, o1, d]
                    a2 += qd * kpool[bk, h, o2, d]; a3 += qd * kpool[bk, h, o3, d]
                s[g, i] = a0; s[g, quarter + i] = a1; s[g, 2 * quarter + i] = a2; s[g, 3 * quarter + i] = a3
        for j in range(4 * quarter, n):
            o = slot[j]
            for g in range(G):
                a0 = np.float32(0.0)
                for d in range(D):
                    a0 += qs[g, d] * kpool[bk, h, o, d]
                s[g, j] = a0
        den = np.zeros(G, dtype=np.float32)
        for g in range(G):
            top = s[g, 0]
            for j in range(1, n):
                top = max(top, s[g, j])
            if top == -np.inf:                                  # every score -inf: weights 0
                for j in range(n):
                    s[g, j] = np.float32(0.0)
                continue
            total = np.float32(0.0)
            for j in range(n):
                p = np.float32(math.exp(s[g, j] - top))
                s[g, j] = p
                total += p
            den[g] = total
        acc = np.zeros((G, 4, D), dtype=np.float32)
        for i in range(quarter):
            o0, o1, o2, o3 = slot[i], slot[quarter + i], slot[2 * quarter + i], slot[3 * quarter + i]
            for g in range(G):
                w0, w1, w2, w3 = s[g, i], s[g, quarter + i], s[g, 2 * quarter + i], s[g, 3 * quarter + i]
                for d in range(D):
                    acc[g, 0, d] += w0 * vpool[bk, h, o0, d]; acc[g, 1, d] += w1 * vpool[bk, h, o1, d]
                    acc[g, 2, d] += w2 * vpool[bk, h, o2, d]; acc[g, 3, d] += w3 * vpool[bk, h, o3, d]
        for j in range(4 * quarter, n):
            o = slot[j]
            for g in range(G):
                w0 = s[g, j]
                for d in range(D):
                    acc[g, 0, d] += w0 * vpool[bk, h, o, d]
        for g in range(G):
            inv = np.float32(1.0) / den[g] if den[g] > 0 else np.float32(0.0)
            for d in range(D):
                out[b, h, g, d] = (acc[g, 0, d] + acc[g, 1, d] + acc[g, 2, d] + acc[g, 3, d]) * inv


@numba.njit(fastmath={"reassoc", "contract"}, boundscheck=False, nogil=True, cache=True)
def norm_rows(x, w, b, kind, eps, out):          # pragma: no cover - compiled
    # kind 0: LayerNorm (mean, biased variance, weight and bias); 1: RMSNorm (weight only)
    B, d = x.shape
    for i in range(B):
        if kind == 0:
            mean = np.float32(0.0)
            for j in range(d):
                mean += x[i, j]
            mean /= np.float32(d)
            var = np.float32(0.0)
            for j in range(d):
                var += (x[i, j] - mean) * (x[i, j] - mean)
            inv = np.float32(1.0) / np.float32(math.sqrt(var / np.float32(d) + np.float32(eps)))
            for j in range(d):
                out[i, j] = (x[i, j] - mean) * inv * w[j] + b[j]
        else:
            ms = np.float32(0.0)
            for j in range(d):
                ms += x[i, j] * x[i, j]
            inv = np.float32(1.0) / np.float32(math.sqrt(ms / np.float32(d) + np.float32(eps)))
            for j in range(d):
                out[i, j] = w[j] * (x[i, j] * inv)


log2e, ln2_hi, ln2_lo = np.float32(1.4426950408889634), np.float32(0.693359375), np.float32(-2.12194440e-4)
# exp(r) = 1 + r + r^2 P(r) on |r| <= ln2 / 2: Cephes' expf coefficients (~1 ulp)
p0, p1, p2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
p3, p4, p5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)


@numba.njit(fastmath={"reassoc", "contract"}, boundscheck=False, nogil=True, cache=True)
def exp_rows(t, bits, out):                      # pragma: no cover - compiled
    # out = exp(t) elementwise for t (n,) in loops the compiler vectorises (no libm call):
    # t clamped to [-87, 88], t = k ln2 + r, exp(t) = 2^k exp(r), 2^k built in bits (int32)
    n = t.shape[0]
    for i in range(n):
        v = min(max(t[i], np.float32(-87.0)), np.float32(88.0))
        k = np.floor(v * log2e + np.float32(0.5))
        r = v - k * ln2_hi - k * ln2_lo
        poly = ((((p0 * r + p1) * r + p2) * r + p3) * r + p4) * r + p5
        out[i] = poly * r * r + r + np.float32(1.0)
        bits[i] = (np.int32(k) + np.int32(127)) << np.int32(23)
    scale = bits.view(np.float32)
    for i in range(n):
        out[i] *= scale[i]


@numba.njit(fastmath={"reassoc", "contract"}, boundscheck=False, nogil=True, cache=True)
def activate(f, g, kind, gated, t, bits, e):      # pragma: no cover - compiled
    # g = act(f[:F]) (* f[F:] when gated), F = g.shape[0]; kind 0 gelu (erf), 1 gelu (tanh),
    # 2 relu, 3 silu. t, bits, e: (F,) scratch
    n = g.shape[0]
    if kind == 0:
        for i in range(n):
            v = f[i]
            g[i] = np.float32(0.5) * v * (np.float32(1.0) + np.float32(math.erf(v * np.float32(0.7071067811865476))))
    elif kind == 2:
        for i in range(n):
            g[i] = f[i] if f[i] > 0 else np.float32(0.0)
    elif kind == 1:
        for i in range(n):                       # (1 + tanh(z)) / 2 = e / (e + 1), e = exp(2z): no cancellation
            v = f[i]
            t[i] = np.float32(1.5957691216057308) * (v + np.float32(0.044715) * v * v * v)
        exp_rows(t, bits, e)
        for i in range(n):
            e[i] = e[i] / (e[i] + np.float32(1.0))    # in its own loop: never reassociated into f * e
        for i in range(n):
            g[i] = f[i] * e[i]
    else:
        for i in range(n):
            t[i] = -f[i]
        exp_rows(t, bits, e)
        for i in range(n):
            g[i] = f[i] / (np.float32(1.0) + e[i])
    if gated:
        for i in range(n):
            g[i] *= f[n + i]


@numba.njit(fastmath={"reassoc", "contract"}, boundscheck=False, nogil=True, cache=True)
def rotate(x, cos, sin, rd, interleaved, out):   # pragma: no cover - compiled
    # x, out (D,); cos, sin (rd,): out = x * cos + rotate(x) * sin on the first rd channels
    half = rd // 2
    for j in range(rd):
        if interleaved:
            other = -x[j + 1] if j % 2 == 0 else x[j - 1]
        else:
            other = -x[j + half] if j < half else x[j - half]
        out[j] = x[j] * cos[j] + other * sin[j]
    for j in range(rd, x.shape[0]):
        out[j] = x[j]


@numba.njit(boundscheck=False, nogil=True, cache=True)
def block(x, n1w, n1b, n2w, n2b, norm_kind, eps1, eps2, wqkv, bqkv, wo, bo, w1, b1, w2, b2, has_bias,
          act_kind, gated, cos, sin, rd, interleaved, kc, vc, slots, tables, lengths, advance, window,
          block_size, scale, Hq, h, qkv, q4, att, f, g, y):   # pragma: no cover - compiled
    # One pre-norm Transformer block for one new token per sequence, in place on x (B, d):
    # x += o_proj(attention(norm1(x))); x += ffn(norm2(x)). The new key/value of sequence b
    # go into slot slots[b] of the pools kc, vc (1 or B, Hkv, slots, D) (pool b, or the one
    # shared pool); attention then reads each sequence's blocks through tables (B, W) up to
    # lengths[b] tokens (with `advance`, lengths is the count before this token and is
    # advanced here first: a contiguous cache, whose slots are its lengths).
    B, d = x.shape
    Hkv, D = kc.shape[1], kc.shape[3]
    G = Hq // Hkv
    norm_rows(x, n1w, n1b, norm_kind, eps1, h)
    skinny(h, wqkv, bqkv, has_bias, qkv)                                   # (B, (Hq + 2 Hkv) D)
    kq = Hq * D
    for b in range(B):
        t = slots[b]
        pb = b if kc.shape[0] > 1 else 0
        for hq in range(Hq):
            src = qkv[b, hq * D:(hq + 1) * D]
            dst = q4[b, hq // G, hq % G]
            if rd > 0:
                rotate(src, cos[b], sin[b], rd, interleaved, dst)
            else:
                dst[:] = src
        for hk in range(Hkv):
            ksrc = qkv[b, kq + hk * D:kq + (hk + 1) * D]
            if rd > 0:
                rotate(ksrc, cos[b], sin[b], rd, interleaved, kc[pb, hk, t])
            else:
                kc[pb, hk, t, :] = ksrc
            vc[pb, hk, t, :] = qkv[b, kq + (Hkv + hk) * D:kq + (Hkv + hk + 1) * D]
        if advance:
            lengths[b] += 1
    paged(q4, kc, vc, tables, lengths, window, block_size, scale, att.reshape((B, Hkv, G, D)))
    skinny(att.reshape((B, Hq * D)), wo, bo, has_bias, y)
    for b in range(B):
        for j in range(d):
            x[b, j] += y[b, j]
    norm_rows(x, n2w, n2b, norm_kind, eps2, h)
    skinny(h, w1, b1, has_bias, f)
    F_ = g.shape[1]
    t_ = np.empty(F_, dtype=np.float32)
    e_ = np.empty(F_, dtype=np.float32)
    bits = np.empty(F_, dtype=np.int32)
    for b in range(B):
        activate(f[b], g[b], act_kind, gated, t_, bits, e_)
    skinny(g, w2, b2, has_bias, y)
    for b in range(B):
        for j in range(d):
            x[b, j] += y[b, j]


@numba.njit(boundscheck=False, nogil=True, cache=True)
def block_ptr(p, n, fl):                         # pragma: no cover - compiled
    # `block` on tensors given by address (see blocks_step for the layout of p, n, fl)
    B, d, nqkv, Hq, Hkv, D, max_len, F, n1 = n[0], n[1], n[2], n[3], n[4], n[5], n[6], n[7], n[8]
    rd, B_cos = n[9], (n[0] if n[9] > 0 else 1)
    x = numba.carray(f32ptr(p[0]), (B, d))
    n1w, n2w = numba.carray(f32ptr(p[1]), (d,)), numba.carray(f32ptr(p[3]), (d,))
    n1b = numba.carray(f32ptr(p[2]), (d if n[10] == 0 else 1,))
    n2b = numba.carray(f32ptr(p[4]), (d if n[10] == 0 else 1,))
    wqkv, wo = numba.carray(f32ptr(p[5]), (nqkv, d)), numba.carray(f32ptr(p[7]), (d, Hq * D))
    w1, w2 = numba.carray(f32ptr(p[9]), (n1, d)), numba.carray(f32ptr(p[11]), (d, F))
    bqkv = numba.carray(f32ptr(p[6]), (nqkv if n[13] else 1,))
    bo = numba.carray(f32ptr(p[8]), (d if n[13] else 1,))
    b1 = numba.carray(f32ptr(p[10]), (n1 if n[13] else 1,))
    b2 = numba.carray(f32ptr(p[12]), (d if n[13] else 1,))
    cos = numba.carray(f32ptr(p[13]), (B_cos, max(rd, 1)))
    sin = numba.carray(f32ptr(p[14]), (B_cos, max(rd, 1)))
    pools, W = n[16], n[17]
    kc = numba.carray(f32ptr(p[15]), (pools, Hkv, max_len, D))
    vc = numba.carray(f32ptr(p[16]), (pools, Hkv, max_len, D))
    lengths = numba.carray(i64ptr(p[17]), (B,))
    scratch = numba.carray(f32ptr(p[18]), (B * (2 * d + nqkv + 2 * Hq * D + n1 + F),))
    slots = numba.carray(i64ptr(p[19]), (B,))
    tables = numba.carray(i64ptr(p[20]), (B, W))
    at = 0
    h = scratch[at:at + B * d].reshape((B, d))
    at += B * d
    qkv = scratch[at:at + B * nqkv].reshape((B, nqkv))
    at += B * nqkv
    q4 = scratch[at:at + B * Hq * D].reshape((B, Hkv, Hq // Hkv, D))
    at += B * Hq * D
    att = scratch[at:at + B * Hq * D].reshape((B, Hq * D))
    at += B * Hq * D
    f = scratch[at:at + B * n1].reshape((B, n1))
    at += B * n1
    g = scratch[at:at + B * F].reshape((B, F))
    at += B * F
    y = scratch[at:at + B * d].reshape((B, d))
    block(x, n1w, n1b, n2w, n2b, n[10], fl[0], fl[1], wqkv, bqkv, wo, bo, w1, b1, w2, b2, n[13] != 0,
          n[11], n[12] != 0, cos, sin, rd, n[14] != 0, kc, vc, slots, tables, lengths, n[19] != 0, n[15],
          n[18], fl[2], Hq, h, qkv, q4, att, f, g, y)


@numba.njit(boundscheck=False, nogil=True, cache=True)
def blocks_ptr(P, N, FL):                        # pragma: no cover - compiled
    # block after block on one x: row l of P, N, FL is layer l (see blocks_step)
    for layer in range(P.shape[0]):
        block_ptr(P[layer], N[layer], FL[layer])


#: the entry points `qkv.kernels.launch` runs, by launch name
KERNELS = {"skinny": skinny_ptr, "paged": paged, "block": blocks_ptr, "activate": activate}


def _c(dtype, ndim):
    return types.Array(dtype, ndim, "C")


_f32, _i64 = types.float32, types.int64
#: the argument types each launch name is called with by the wrappers in `qkv.kernels` (Python
#: ints and floats arrive as int64 and float64, tensors' `.numpy()` as C-contiguous arrays), so
#: that `load` and `build` compile exactly the overloads a decode step then finds
SIGNATURES = {
    "skinny": (_i64, _i64, _i64, types.boolean, _i64, _i64, _i64, _i64),
    "paged": (_c(_f32, 4), _c(_f32, 4), _c(_f32, 4), _c(_i64, 2), _c(_i64, 1), _i64, _i64, types.float64,
              _c(_f32, 4)),
    "block": (_c(_i64, 2), _c(_i64, 2), _c(types.float64, 2)),
    "activate": (_c(_f32, 1), _c(_f32, 1), _i64, types.boolean, _c(_f32, 1), _c(types.int32, 1), _c(_f32, 1)),
}
#: what a decode step launches (`activate` on its own is for tests)
DECODE = ("skinny", "paged", "block")


def load(names=DECODE) -> int:
    """Give each kernel of `names` its overload for SIGNATURES, from numba's disk cache where it
    holds one (milliseconds), else by compiling it (seconds). Returns how many were compiled."""
    compiled = 0
    for name in names:
        dispatcher = KERNELS[name]
        before = sum(dispatcher.stats.cache_misses.values())
        dispatcher.compile(SIGNATURES[name])
        compiled += sum(dispatcher.stats.cache_misses.values()) - before
    return compiled


def cache_index(names=DECODE) -> tuple[str, list[str]]:
    """(numba's cache directory for this file, the index files of `names` in it), after `load`."""
    path = KERNELS[names[0]].stats.cache_path
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}"
    funcs = [KERNELS[n].py_func for n in names]
    return path, [f"cpu.{f.__qualname__}-{f.__code__.co_firstlineno}.{tag}.nbi" for f in funcs]


def set_threads(threads: int) -> None:
    """Size numba's thread pool: `threads`, within 1 and the most numba was started with."""
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
