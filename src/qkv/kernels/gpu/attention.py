"""Exact attention in Triton, driven by a tile plan: forward, and a backward without atomics.

Legend: B batch, Hq query heads, Hkv key/value heads, G = Hq // Hkv, Lq/Lk lengths, D head dim,
Dv value dim, BM x BN a tile (query positions x keys), nQ/nK tiles per axis, NP partial tiles.

The kernels know nothing of qkv's mask classes: the `triton` backend (`qkv.backends.triton_backend`)
turns a call into a `Plan`, plain tensors on the device:

- the tile lists of its BlockMask: for each (batch, head, query tile) the count and indices of
  its FULL key tiles and of its PARTIAL ones (and, for the dk/dv kernel, the same per key tile
  over query tiles). EMPTY tiles are never visited; FULL ones run with no mask arithmetic;
- for PARTIAL tiles, the mask in one of three forms: each row's allowed interval of keys
  (`lo <= kv < hi`: causal with any alignment, sliding windows, prefix-LM, padding, documents in
  runs, and their `&`), document ids compared in the kernel (ids that come back), or, for any
  other mask, a bitmask of each partial tile (BM rows x BN/32 int32 words, found through a
  (.., nQ, nK) slot table);
- score mods as kernel variants, in natural units on the scaled score s = q.k * scale:
  s += slope[h] * (kv - q) (ALiBi; -slope[h] * |q - kv| symmetric), s += rel[h, kv - q + off]
  (a relative-position table resolved per distance), s += bias[b, h, q, kv] (a tensor, broadcast
  by zero strides), then s = cap * tanh(s / cap) (softcap).

Forward: one program per (query tile, batch x head program). With GQA and a mask that does not
depend on the head, the G query heads of a group share a program: its BM rows are BM / G
positions x G heads (row r = position r // G, head r % G), so each K/V tile is loaded once for
the group. Online softmax in base 2 (statistics fp32), rows with no allowed key give zeros and
LSE -inf. Backward: delta = rowsum(dO * O) - dLSE (so the gradient of the returned LSE is
exact too); dk/dv per (key tile, kv head) summing over the G heads of its group and the query
tiles that see it, dq per (query tile, head): every sum is in a fixed order, no atomics.

Triton's interpreter multiplies bfloat16 dot operands as raw bits (Triton 3.9), so under it
(UPCAST) the operands of every dot are upcast to float32 after rounding to the input dtype,
as the GPU rounds them. fp32 dots use input_precision="ieee" (not TF32).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from qkv.kernels.gpu import interpreting

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

MASK_NONE, MASK_RANGES, MASK_IDS, MASK_BITS = 0, 1, 2, 4
ALIBI_NONE, ALIBI_CAUSAL, ALIBI_SYMMETRIC = 0, 1, 2
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(LN2)


@dataclass
class Plan:
    """What the kernels read besides q, k, v: tile lists, the mask of partial tiles, score mods.

    Tile-list tensors are (B', H', nQ[, nK]) int32 with B' in {1, B}, H' in {1, Hq}; the `t*`
    ones are the same lists per key tile over query tiles ((B', H', nK[, nQ])), for dk/dv."""

    block_q: int                      # query positions per tile
    block_k: int
    full_cnt: torch.Tensor
    full_idx: torch.Tensor
    part_cnt: torch.Tensor
    part_idx: torch.Tensor
    slot: torch.Tensor | None = None          # (B', H', nQ, nK) int32: partial tile -> row of `bits`, -1 else
    t_full_cnt: torch.Tensor | None = None
    t_full_idx: torch.Tensor | None = None
    t_part_cnt: torch.Tensor | None = None
    t_part_idx: torch.Tensor | None = None
    mask_kind: int = MASK_NONE
    lo: torch.Tensor | None = None            # (B', Lq) int32
    hi: torch.Tensor | None = None
    ids: torch.Tensor | None = None           # (B', L) int32
    bits: torch.Tensor | None = None          # (NP, block_q, block_k // 32) int32
    mods: dict = field(default_factory=dict)  # alibi: (slopes, kind); rel: (table (Hq, ND), off); bias: (t, row0); softcap: cap

    @property
    def per_head(self) -> bool:
        return self.full_cnt.shape[1] > 1


def _dummy(device):
    return torch.zeros(1, dtype=torch.int32, device=device)


def _stride(t: torch.Tensor, dim: int) -> int:
    return t.stride(dim) if t.shape[dim] > 1 else 0


# ----------------------------------------------------------------------------------------------
# The device code
# ----------------------------------------------------------------------------------------------

@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _tanh(x):
    # accurate to ~1 ulp in float32 everywhere: an odd series near 0, (1 - e^-2|x|) / (1 + e^-2|x|) beyond
    ax = tl.abs(x)
    x2 = x * x
    poly = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * (0.021869488536155203 + x2 * -0.008863235529902197)))))
    t = tl.exp2(ax * -2.8853900817779268)                  # e^(-2|x|)
    far = (1.0 - t) / (1.0 + t)
    far = tl.where(x < 0, -far, far)
    return tl.where(ax < 0.25, poly, far)




@triton.jit
def _scores(qk, b, h, qpos, kv, sm_scale,
            SLOPES, REL, rel_nd, rel_off, BIAS, bsb, bsh, bsm, bsn, bias_row0, cap,
            ALIBI: tl.constexpr, HAS_REL: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr):
    """The scaled, modified scores of a tile (natural units) and, with softcap, tanh(s / cap)."""
    s = qk * sm_scale
    if ALIBI != 0:
        slope = tl.load(SLOPES + h)                                   # (BM,)
        dist = (kv[None, :] - qpos[:, None]).to(tl.float32)
        if ALIBI == 2:
            dist = -tl.abs(dist)
        s = s + slope[:, None] * dist
    if HAS_REL:
        d = kv[None, :] - qpos[:, None] + rel_off
        d = tl.minimum(tl.maximum(d, 0), rel_nd - 1)
        s = s + tl.load(REL + h[:, None] * rel_nd + d).to(tl.float32)
    if HAS_BIAS:
        row = tl.maximum(qpos - bias_row0, 0)
        ptr = BIAS + b * bsb + h[:, None] * bsh + row[:, None] * bsm + kv[None, :] * bsn
        s = s + tl.load(ptr).to(tl.float32)
    th = s
    if SOFTCAP:
        th = _tanh(s / cap)
        s = cap * th
    return s, th


@triton.jit
def _allowed(b, m, qpos, kv, kt, tile_base, LO, HI, r_sb, IDS, id_sb, BITS, SLOT,
             pos_local, BQ: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr):
    """Which elements of a PARTIAL tile may attend: (BM, BN) bool."""
    ok = kv[None, :] >= 0
    if MASK & 1:
        lo = tl.load(LO + b * r_sb + m, mask=m >= 0, other=0)
        hi = tl.load(HI + b * r_sb + m, mask=m >= 0, other=0)
        ok = ok & (kv[None, :] >= lo[:, None]) & (kv[None, :] < hi[:, None])
    if MASK & 2:
        iq = tl.load(IDS + b * id_sb + qpos)
        ik = tl.load(IDS + b * id_sb + kv)
        ok = ok & (iq[:, None] == ik[None, :])
    if MASK & 4:
        slot = tl.maximum(tl.load(SLOT + tile_base + kt), 0)        # >= 0 for every partial tile
        kl = kv - kt * BN
        words = tl.load(BITS + (slot * BQ + pos_local[:, None]) * (BN // 32) + (kl[None, :] >> 5),
                        mask=(pos_local[:, None] < BQ) & (kl[None, :] >= 0), other=0)
        ok = ok & (((words >> (kl[None, :] & 31)) & 1) != 0)
    return ok


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, kt, b, h, m, qpos, pos_local, kbase, vbase, skn, svn, Lk, sm_scale, idx_base,
              LO, HI, r_sb, IDS, id_sb, BITS, SLOT,
              SLOPES, REL, rel_nd, rel_off, BIAS, bsb, bsh, bsm, bsn, bias_row0, cap,
              P: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr,
              BDV: tl.constexpr, MASK: tl.constexpr, ALIBI: tl.constexpr, HAS_REL: tl.constexpr,
              HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
              PARTIAL: tl.constexpr):
    """One key tile of the online softmax: (acc, m_i, l_i) updated."""
    d = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    kv = kt * BN + tl.arange(0, BN)
    k_ok = kv < Lk
    kv_c = tl.where(k_ok, kv, 0)
    k = tl.load(kbase + kv_c[:, None] * skn + d[None, :], mask=k_ok[:, None] & (d[None, :] < D), other=0.0)
    qk = _dot(q, tl.trans(k), UPCAST)
    s, th = _scores(qk, b, h, qpos, kv_c, sm_scale, SLOPES, REL, rel_nd, rel_off, BIAS, bsb, bsh, bsm,
                    bsn, bias_row0, cap, ALIBI, HAS_REL, HAS_BIAS, SOFTCAP)
    s = s * LOG2E_C
    if not EVEN_K:
        s = tl.where(k_ok[None, :], s, float("-inf"))
    if PARTIAL:
        ok = _allowed(b, m, qpos, kv_c, kt, idx_base, LO, HI, r_sb, IDS, id_sb, BITS, SLOT, pos_local, P, BN, MASK)
        s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(vbase + kv_c[:, None] * svn + dv[None, :], mask=k_ok[:, None] & (dv[None, :] < DV), other=0.0)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                Lq, Lk, q_offset, sm_scale,
                FCNT, FIDX, PCNT, PIDX, SLOT, c_sb, c_sh, c_sm, i_sb, i_sh, i_sm,
                LO, HI, r_sb, IDS, id_sb, BITS,
                SLOPES, REL, rel_nd, rel_off, BIAS, bsb, bsh, bsm, bsn, bias_row0, cap,
                NHP, G: tl.constexpr, GP: tl.constexpr, P: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                BD: tl.constexpr, BDV: tl.constexpr, MASK: tl.constexpr, ALIBI: tl.constexpr,
                HAS_REL: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                EVEN_K: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // NHP
    hp = pid_bh % NHP                                   # a kv head (GP == G) or a query head (GP == 1)
    r = tl.arange(0, BM)
    pos_local = r // GP
    m = pid_m * P + pos_local                           # query row of each tile row
    row_ok = (pos_local < P) & (m < Lq)
    m = tl.where(row_ok, m, 0)
    if GP == 1:
        h = tl.zeros([BM], dtype=tl.int32) + hp
        kvh = hp // G
    else:
        h = hp * G + r % GP
        kvh = hp
    qpos = q_offset + m
    d = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    q = tl.load(Q + b * sqb + h[:, None] * sqh + m[:, None] * sqm + d[None, :],
                mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    kbase = K + b * skb + kvh * skh
    vbase = V + b * svb + kvh * svh

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BDV], dtype=tl.float32)
    cnt_base = b * c_sb + hp * c_sh + pid_m * c_sm
    idx_base = b * i_sb + hp * i_sh + pid_m * i_sm     # the slot table has the index lists' layout
    for j in range(0, tl.load(FCNT + cnt_base)):
        kt = tl.load(FIDX + idx_base + j)
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, kt, b, h, m, qpos, pos_local, kbase, vbase, skn, svn, Lk,
                                  sm_scale, idx_base, LO, HI, r_sb, IDS, id_sb, BITS, SLOT,
                                  SLOPES, REL, rel_nd, rel_off, BIAS, bsb, bsh, bsm, bsn, bias_row0, cap,
                                  P, BN, D, DV, BD, BDV, MASK, ALIBI, HAS_REL, HAS_BIAS, SOFTCAP, EVEN_K, UPCAST,
                                  False)
    for j in range(0, tl.load(PCNT + cnt_base)):
        kt = tl.load(PIDX + idx_base + j)
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, kt, b, h, m, qpos, pos_local, kbase, vbase, skn, svn, Lk,
                                  sm_scale, idx_base, LO, HI, r_sb, IDS, id_sb, BITS, SLOT,
                                  SLOPES, REL, rel_nd, rel_off, BIAS, bsb, bsh, bsm, bsn, bias_row0, cap,
                                  P, BN, D, DV, BD, BDV, MASK, ALIBI, HAS_REL, HAS_BIAS, SOFTCAP, EVEN_K, UPCAST,
                                  True)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * LN2_C)
    tl.store(O + b * sob + h[:, None] * soh + m[:, None] * som + dv[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (dv[None, :] < DV))
    tl.store(LSE + (b * (NHP * GP) + h) * Lq + m, lse, mask=row_ok)


@triton.jit
def _bwd_p(q, k, b, h, m, qpos, kv_c, k_ok, lse2, tile_base, kt, pos_local, sm_scale,
           LO, HI, r_sb, IDS, id_sb, BITS, SLOT,
           SLOPES, REL, rel_nd, rel_off, BIAS, bsb, bsh, bsm, bsn, bias_row0, cap,
           BM: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr, ALIBI: tl.constexpr, HAS_REL: tl.constexpr,
           HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
           PARTIAL: tl.constexpr):
    """A tile's probabilities p = exp(s - lse) (BM, BN) and ds/ds_raw (softcap's 1 - tanh^2, else 1)."""
    qk = _dot(q, tl.trans(k), UPCAST)
    s, th = _scores(qk, b, h, qpos, kv_c, sm_scale, SLOPES, REL, rel_nd, rel_off, BIAS, bsb, bsh, bsm,
                    bsn, bias_row0, cap, ALIBI, HAS_REL, HAS_BIAS, SOFTCAP)
    s = s * LOG2E_C
    if not EVEN_K:
        s = tl.where(k_ok[None, :], s, float("-inf"))
    if PARTIAL:
        ok = _allowed(b, m, qpos, kv_c, kt, tile_base, LO, HI, r_sb, IDS, id_sb, BITS, SLOT, pos_local, BM, BN, MASK)
        s = tl.where(ok, s, float("-inf"))
    p = tl.exp2(s - lse2[:, None])
    dmod = 1.0 - th * th if SOFTCAP else 1.0
    return p, dmod


@triton.jit
def _bwd_rows(Q, DO, LSE, DELTA, b, h, qt, Lq, q_offset, sqb, sqh, sqm, sdb, sdh, sdm, Hq,
              BM: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
    """A query tile's rows for the backward: q, dO, LSE (base 2; +inf where no key), delta."""
    d = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    m = qt * BM + tl.arange(0, BM)
    row_ok = m < Lq
    m = tl.where(row_ok, m, 0)
    q = tl.load(Q + b * sqb + h * sqh + m[:, None] * sqm + d[None, :], mask=row_ok[:, None] & (d[None, :] < D),
                other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + m[:, None] * sdm + dv[None, :],
                 mask=row_ok[:, None] & (dv[None, :] < DV), other=0.0)
    lse = tl.load(LSE + (b * Hq + h) * Lq + m, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E_C)
    delta = tl.load(DELTA + (b * Hq + h) * Lq + m, mask=row_ok, other=0.0)
    return q, do, lse2, delta, m, row_ok, q_offset + m


@triton.jit
def _dkdv_tile(dk, dv_acc, k, v, qt, kt, b, h, kv_c, k_ok, Q, DO, LSE, DELTA, Lq, q_offset,
               sqb, sqh, sqm, sdb, sdh, sdm, Hq, sm_scale, tile_base,
               LO, HI, r_sb, IDS, id_sb, BITS, SLOT,
               SLOPES, REL, rel_nd, rel_off, BIAS, bsb, bsh, bsm, bsn, bias_row0, cap,
               BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr,
               BDV: tl.constexpr, MASK: tl.constexpr, ALIBI: tl.constexpr, HAS_REL: tl.constexpr,
               HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
               PARTIAL: tl.constexpr):
    q, do, lse2, delta, m, row_ok, qpos = _bwd_rows(Q, DO, LSE, DELTA, b, h, qt, Lq, q_offset, sqb, sqh, sqm,
                                                    sdb, sdh, sdm, Hq, BM, D, DV, BD, BDV)
    hv = tl.zeros([BM], dtype=tl.int32) + h
    p, dmod = _bwd_p(q, k, b, hv, m, qpos, kv_c, k_ok, lse2, tile_base, kt, tl.arange(0, BM), sm_scale,
                     LO, HI, r_sb, IDS, id_sb, BITS, SLOT, SLOPES, REL, rel_nd, rel_off, BIAS, bsb, bsh, bsm, bsn,
                     bias_row0, cap, BM, BN, MASK, ALIBI, HAS_REL, HAS_BIAS, SOFTCAP, EVEN_K, UPCAST, PARTIAL)
    dv_acc += _dot(tl.trans(p.to(do.dtype)), do, UPCAST)
    dp = _dot(do, tl.trans(v), UPCAST)
    ds = p * (dp - delta[:, None]) * dmod
    dk += _dot(tl.trans(ds.to(q.dtype)), q, UPCAST)
    return dk, dv_acc


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                     sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm,
                     skgb, skgh, skgn, svgb, svgh, svgn,
                     Lq, Lk, q_offset, sm_scale, Hq, Hkv,
                     TFCNT, TFIDX, TPCNT, TPIDX, tc_sb, tc_sh, tc_sn, ti_sb, ti_sh, ti_sn,
                     SLOT, si_sb, si_sh, si_sm,
                     LO, HI, r_sb, IDS, id_sb, BITS,
                     SLOPES, REL, rel_nd, rel_off, BIAS, bsb, bsh, bsm, bsn, bias_row0, cap,
                     G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, DV_: tl.constexpr,
                     BD: tl.constexpr, BDV: tl.constexpr, MASK: tl.constexpr, ALIBI: tl.constexpr,
                     HAS_REL: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, EVEN_K: tl.constexpr,
                     UPCAST: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    kvh = pid_bh % Hkv
    d = tl.arange(0, BD)
    dvr = tl.arange(0, BDV)
    kv = pid_n * BN + tl.arange(0, BN)
    k_ok = kv < Lk
    kv_c = tl.where(k_ok, kv, 0)
    k = tl.load(K + b * skb + kvh * skh + kv_c[:, None] * skn + d[None, :], mask=k_ok[:, None] & (d[None, :] < D),
                other=0.0)
    v = tl.load(V + b * svb + kvh * svh + kv_c[:, None] * svn + dvr[None, :],
                mask=k_ok[:, None] & (dvr[None, :] < DV_), other=0.0)
    dk = tl.zeros([BN, BD], dtype=tl.float32)
    dv_acc = tl.zeros([BN, BDV], dtype=tl.float32)
    for g in range(0, G):                                 # the query heads of this kv head, in order
        h = kvh * G + g
        cnt_base = b * tc_sb + h * tc_sh + pid_n * tc_sn
        idx_base = b * ti_sb + h * ti_sh + pid_n * ti_sn
        for j in range(0, tl.load(TFCNT + cnt_base)):
            qt = tl.load(TFIDX + idx_base + j)
            dk, dv_acc = _dkdv_tile(dk, dv_acc, k, v, qt, pid_n, b, h, kv_c, k_ok, Q, DO, LSE, DELTA, Lq, q_offset,
                                    sqb, sqh, sqm, sdb, sdh, sdm, Hq, sm_scale, b * si_sb + h * si_sh + qt * si_sm,
                                    LO, HI, r_sb, IDS, id_sb, BITS, SLOT,
                                    SLOPES, REL, rel_nd, rel_off, BIAS, bsb, bsh, bsm, bsn, bias_row0, cap,
                                    BM, BN, D, DV_, BD, BDV, MASK, ALIBI, HAS_REL, HAS_BIAS, SOFTCAP, EVEN_K, UPCAST,
                                    False)
        for j in range(0, tl.load(TPCNT + cnt_base)):
            qt = tl.load(TPIDX + idx_base + j)
            dk, dv_acc = _dkdv_tile(dk, dv_acc, k, v, qt, pid_n, b, h, kv_c, k_ok, Q, DO, LSE, DELTA, Lq, q_offset,
                                    sqb, sqh, sqm, sdb, sdh, sdm, Hq, sm_scale, b * si_sb + h * si_sh + qt * si_sm,
                                    LO, HI, r_sb, IDS, id_sb, BITS, SLOT,
                                    SLOPES, REL, rel_nd, rel_off, BIAS, bsb, bsh, bsm, bsn, bias_row0, cap,
                                    BM, BN, D, DV_, BD, BDV, MASK, ALIBI, HAS_REL, HAS_BIAS, SOFTCAP, EVEN_K, UPCAST,
                                    True)
    tl.store(DK + b * skgb + kvh * skgh + kv_c[:, None] * skgn + d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=k_ok[:, None] & (d[None, :] < D))
    tl.store(DV + b * svgb + kvh * svgh + kv_c[:, None] * svgn + dvr[None, :], dv_acc.to(DV.dtype.element_ty),
             mask=k_ok[:, None] & (dvr[None, :] < DV_))


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, m, qpos, kt, b, h, kbase, vbase, skn, svn, Lk, sm_scale, tile_base,
             LO, HI, r_sb, IDS, id_sb, BITS, SLOT,
             SLOPES, REL, rel_nd, rel_off, BIAS, bsb, bsh, bsm, bsn, bias_row0, cap,
             BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr,
             BDV: tl.constexpr, MASK: tl.constexpr, ALIBI: tl.constexpr, HAS_REL: tl.constexpr,
             HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
             PARTIAL: tl.constexpr):
    d = tl.arange(0, BD)
    dvr = tl.arange(0, BDV)
    kv = kt * BN + tl.arange(0, BN)
    k_ok = kv < Lk
    kv_c = tl.where(k_ok, kv, 0)
    k = tl.load(kbase + kv_c[:, None] * skn + d[None, :], mask=k_ok[:, None] & (d[None, :] < D), other=0.0)
    v = tl.load(vbase + kv_c[:, None] * svn + dvr[None, :], mask=k_ok[:, None] & (dvr[None, :] < DV), other=0.0)
    hv = tl.zeros([BM], dtype=tl.int32) + h
    p, dmod = _bwd_p(q, k, b, hv, m, qpos, kv_c, k_ok, lse2, tile_base, kt, tl.arange(0, BM), sm_scale,
                     LO, HI, r_sb, IDS, id_sb, BITS, SLOT, SLOPES, REL, rel_nd, rel_off, BIAS, bsb, bsh, bsm, bsn,
                     bias_row0, cap, BM, BN, MASK, ALIBI, HAS_REL, HAS_BIAS, SOFTCAP, EVEN_K, UPCAST, PARTIAL)
    dp = _dot(do, tl.trans(v), UPCAST)
    ds = p * (dp - delta[:, None]) * dmod
    dq += _dot(ds.to(k.dtype), k, UPCAST)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm, sgb, sgh, sgm,
                   Lq, Lk, q_offset, sm_scale, Hq,
                   FCNT, FIDX, PCNT, PIDX, SLOT, c_sb, c_sh, c_sm, i_sb, i_sh, i_sm,
                   LO, HI, r_sb, IDS, id_sb, BITS,
                   SLOPES, REL, rel_nd, rel_off, BIAS, bsb, bsh, bsm, bsn, bias_row0, cap,
                   G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                   BD: tl.constexpr, BDV: tl.constexpr, MASK: tl.constexpr, ALIBI: tl.constexpr,
                   HAS_REL: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, EVEN_K: tl.constexpr,
                   UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    kvh = h // G
    q, do, lse2, delta, m, row_ok, qpos = _bwd_rows(Q, DO, LSE, DELTA, b, h, pid_m, Lq, q_offset, sqb, sqh, sqm,
                                                    sdb, sdh, sdm, Hq, BM, D, DV, BD, BDV)
    kbase = K + b * skb + kvh * skh
    vbase = V + b * svb + kvh * svh
    dq = tl.zeros([BM, BD], dtype=tl.float32)
    cnt_base = b * c_sb + h * c_sh + pid_m * c_sm
    idx_base = b * i_sb + h * i_sh + pid_m * i_sm
    for j in range(0, tl.load(FCNT + cnt_base)):
        kt = tl.load(FIDX + idx_base + j)
        dq = _dq_tile(dq, q, do, lse2, delta, m, qpos, kt, b, h, kbase, vbase, skn, svn, Lk, sm_scale, idx_base,
                      LO, HI, r_sb, IDS, id_sb, BITS, SLOT,
                      SLOPES, REL, rel_nd, rel_off, BIAS, bsb, bsh, bsm, bsn, bias_row0, cap,
                      BM, BN, D, DV, BD, BDV, MASK, ALIBI, HAS_REL, HAS_BIAS, SOFTCAP, EVEN_K, UPCAST, False)
    for j in range(0, tl.load(PCNT + cnt_base)):
        kt = tl.load(PIDX + idx_base + j)
        dq = _dq_tile(dq, q, do, lse2, delta, m, qpos, kt, b, h, kbase, vbase, skn, svn, Lk, sm_scale, idx_base,
                      LO, HI, r_sb, IDS, id_sb, BITS, SLOT,
                      SLOPES, REL, rel_nd, rel_off, BIAS, bsb, bsh, bsm, bsn, bias_row0, cap,
                      BM, BN, D, DV, BD, BDV, MASK, ALIBI, HAS_REL, HAS_BIAS, SOFTCAP, EVEN_K, UPCAST, True)
    d = tl.arange(0, BD)
    tl.store(DQ + b * sgb + h * sgh + m[:, None] * sgm + d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (d[None, :] < D))


# ----------------------------------------------------------------------------------------------
# The launchers
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """Tile sizes and launch shape of one kernel (BN a multiple of 32: the bitmask's words)."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


def forward_config(D: int, dtype: torch.dtype) -> Config:
    """The forward's tiles: 128 x 64 for head dims up to 128 in 16-bit types, smaller where registers
    run out (fp32, D > 128); 32 x 32 under the interpreter, whose cost is per operation."""
    if interpreting():
        return Config(32, 32)
    if D > 128 or dtype == torch.float32:
        return Config(64, 32 if D > 128 else 64, num_warps=4, num_stages=2)
    return Config(128, 64, num_warps=8 if D > 64 else 4, num_stages=3)


def backward_config(D: int, dtype: torch.dtype) -> Config:
    """The backward's tiles (one size for the dk/dv and the dq kernels, so one plan serves both)."""
    if interpreting():
        return Config(32, 32)
    if D > 128 or dtype == torch.float32:
        return Config(32, 32, num_warps=4, num_stages=2)
    return Config(64, 64, num_warps=8 if D > 64 else 4, num_stages=2)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(max(n, 1)))


def _upcast(dtype: torch.dtype) -> bool:
    return interpreting() and dtype == torch.bfloat16


def _list_args(cnt: torch.Tensor, idx: torch.Tensor):
    return (cnt, idx, _stride(cnt, 0), _stride(cnt, 1), _stride(cnt, 2),
            _stride(idx, 0), _stride(idx, 1), _stride(idx, 2))


def _mask_args(plan: Plan, device):
    dummy = _dummy(device)
    lo = plan.lo if plan.lo is not None else dummy
    hi = plan.hi if plan.hi is not None else dummy
    ids = plan.ids if plan.ids is not None else dummy
    bits = plan.bits if plan.bits is not None else dummy
    return (lo, hi, _stride(lo, 0) if plan.lo is not None else 0, ids,
            _stride(ids, 0) if plan.ids is not None else 0, bits)


def _mod_args(plan: Plan, device):
    """The score-mod pointers and numbers, and the constexpr flags (ALIBI, HAS_REL, HAS_BIAS, SOFTCAP)."""
    dummy = torch.zeros(1, dtype=torch.float32, device=device)
    mods = plan.mods
    slopes, alibi = mods.get("alibi", (dummy, ALIBI_NONE))
    rel, rel_off = mods.get("rel", (dummy, 0))
    bias, row0 = mods.get("bias", (None, 0))
    if bias is None:
        bias_args = (dummy, 0, 0, 0, 0)
    else:
        bias_args = (bias, *(_stride(bias, i) for i in range(4)))
    cap = float(mods.get("softcap", 1.0))
    args = (slopes, rel, rel.shape[-1] if "rel" in mods else 1, rel_off, *bias_args, row0, cap)
    flags = dict(ALIBI=alibi, HAS_REL="rel" in mods, HAS_BIAS=bias is not None, SOFTCAP="softcap" in mods)
    return args, flags


def forward(q, k, v, plan: Plan, *, scale: float, q_offset: int, config: Config):
    """out (B, Hq, Lq, Dv) in q's dtype, lse (B, Hq, Lq) float32, for the tiles `plan` lists.

    `plan` was built with block_q = config.block_m // GP positions (GP = G when the G heads of a
    group share a program, i.e. the lists do not depend on the head; else 1)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    GP = 1 if plan.per_head or G == 1 else G
    P = config.block_m // GP
    if plan.block_q != P or plan.block_k != config.block_n:
        raise ValueError(f"the plan's tiles {plan.block_q} x {plan.block_k} are not the kernel's {P} x {config.block_n}")
    out = torch.empty(B, Hq, Lq, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device)
    NHP = Hkv if GP > 1 else Hq
    mod_args, flags = _mod_args(plan, q.device)
    slot = plan.slot if plan.slot is not None else _dummy(q.device)
    cnt, fidx, c_sb, c_sh, c_sm, i_sb, i_sh, i_sm = _list_args(plan.full_cnt, plan.full_idx)
    grid = (triton.cdiv(Lq, P), B * NHP)
    _fwd_kernel[grid](
        q, k, v, out, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        Lq, Lk, q_offset, float(scale),
        cnt, fidx, plan.part_cnt, plan.part_idx, slot, c_sb, c_sh, c_sm, i_sb, i_sh, i_sm,
        *_mask_args(plan, q.device), *mod_args,
        NHP, G=G, GP=GP, P=P, BM=config.block_m, BN=config.block_n, D=D, DV=Dv, BD=_block(D), BDV=_block(Dv),
        MASK=plan.mask_kind, EVEN_K=Lk % config.block_n == 0, UPCAST=_upcast(q.dtype), **flags,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return out, lse


def backward(q, k, v, out, lse, dout, dlse, plan: Plan, *, scale: float, q_offset: int, config: Config):
    """(dq, dk, dv) for `forward`'s output and LSE, given their gradients (dlse may be None).

    `plan` has block_q = config.block_m, block_k = config.block_n and the transposed lists."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    dout = dout.contiguous()
    # delta = rowsum(dO * O) - dLSE (B, Hq, Lq), summed in float64: a row whose weight sits on one key
    # has dP - delta ~ 0, and the kernels' dP is fp32, so delta must not add an error of its own
    delta = (dout.double() * out.double()).sum(-1)
    if dlse is not None:
        delta = delta - torch.where(torch.isfinite(lse), dlse.double(), torch.zeros_like(delta))
    delta = delta.float().contiguous()
    lse = lse.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    mod_args, flags = _mod_args(plan, q.device)
    mask_args = _mask_args(plan, q.device)
    slot = plan.slot if plan.slot is not None else _dummy(q.device)
    consts = dict(G=G, BM=config.block_m, BN=config.block_n, D=D, BD=_block(D), BDV=_block(Dv),
                  MASK=plan.mask_kind, EVEN_K=Lk % config.block_n == 0, UPCAST=_upcast(q.dtype), **flags,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2))
    tcnt, tfidx, tc_sb, tc_sh, tc_sn, ti_sb, ti_sh, ti_sn = _list_args(plan.t_full_cnt, plan.t_full_idx)
    _bwd_dkdv_kernel[(triton.cdiv(Lk, config.block_n), B * Hkv)](
        q, k, v, dout, lse, delta, dk, dv, *strides,
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        Lq, Lk, q_offset, float(scale), Hq, Hkv,
        tcnt, tfidx, plan.t_part_cnt, plan.t_part_idx, tc_sb, tc_sh, tc_sn, ti_sb, ti_sh, ti_sn,
        slot, _stride(slot, 0) if slot.dim() == 4 else 0, _stride(slot, 1) if slot.dim() == 4 else 0,
        _stride(slot, 2) if slot.dim() == 4 else 0,
        *mask_args, *mod_args, DV_=Dv, **consts)
    cnt, fidx, c_sb, c_sh, c_sm, i_sb, i_sh, i_sm = _list_args(plan.full_cnt, plan.full_idx)
    _bwd_dq_kernel[(triton.cdiv(Lq, config.block_m), B * Hq)](
        q, k, v, dout, lse, delta, dq, *strides, dq.stride(0), dq.stride(1), dq.stride(2),
        Lq, Lk, q_offset, float(scale), Hq,
        cnt, fidx, plan.part_cnt, plan.part_idx, slot, c_sb, c_sh, c_sm, i_sb, i_sh, i_sm,
        *mask_args, *mod_args, DV=Dv, **consts)
    return dq, dk, dv
