"""Attention over a KV cache: the arithmetic of a cached step, for every cache layout.

Legend: B batch (sequences), Hq query heads, Hkv key/value heads, G = Hq // Hkv,
n new tokens this step, L tokens stored, D head dim, bs block size, N pool slots.

Caches store (`qkv.cache`); this module computes. A cache's `attention(q, k, v)` checks
the new tokens against its storage, then hands itself to the step of its layout here:

- `contiguous_step`: append, then `qkv.attention` over the stored keys with the new
  tokens' mask (`new_token_mask`), split into key chunks merged by log-sum-exp where
  that pays (`split_kv_rule`, `split_kv_attention`), or one launch of the CPU decode
  kernel (`qkv.kernels.paged_decode`) for a one-token step of a cache that allows it.
- `ring_step`: a sliding-window ring buffer: storage order for a decode step, time order
  for a prefill.
- `paged_step`: a block pool: per-sequence gathers for a prefill; for a decode step the
  CPU kernel through the block tables, or all queries against the pool prefix at once.

The caches are known by their protocol only (`qkv.cache.base.LayerCache`): `check_new`,
`check_query`, `write`, `append`, `read`, `length`, `batch`, `window`, `split_kv`,
`block_tables`, `block_size`, the storage tensors `k` and `v`, and for rings and pools
`time_ordered`, `view`, `slots`, `pool`, `lengths_by_seq`. Every exact computation goes
through `qkv.attention` or the decode kernel; nothing here picks another kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qkv import kernels, masks
from qkv.attention import attention
from qkv.backends.base import check_sinks

__all__ = ["new_token_mask", "SPLIT_MIN_CHUNK", "split_kv_rule", "split_kv_attention", "decode_chunks",
           "contiguous_step", "ring_step", "paged_step"]


def contiguous_step(cache, q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, score_mod=None,
                    backend: str = "auto", sinks: Tensor | None = None) -> Tensor:
    """Append k, v (B, Hkv, n, D), then attend from q (B, Hq, n, D) to the whole cache.

    Query i of sequence b sits at position length[b] + i (its own token's
    position): it sees every stored key up to itself (causal), and with a
    window W only the last W of them. Returns (B, Hq, n, D).

    `sinks` (Hq,), as in `qkv.attention`, is checked before anything is stored. The CPU
    decode kernel has no sinks (it returns no LSE to apply them by), so a step with sinks
    goes through `qkv.attention` (split-KV included: the sink is one more chunk).
    """
    n = cache.check_new(k, v)
    cache.check_query(q, n, scale, backend)
    sinks = check_sinks(sinks, q.shape[1], q.device)
    if (n == 1 and score_mod is None and sinks is None and backend == "auto" and cache.kernel_decode
            and cache.k.is_contiguous() and kernels.paged_decode_applies(q, cache.k)):
        cache.write(k, v, n)                                             # checked above
        tables, lengths = cache.block_tables()
        return kernels.paged_decode(q, cache.k, cache.v, tables, lengths, block_size=cache.block_size,
                                    window=cache.window, scale=scale)
    before = cache.length.clone()
    if score_mod is not None and not bool((before == before[0]).all()):
        raise ValueError("a score_mod needs key positions, which this cache only has for a batch of equal "
                         "lengths in a contiguous layout; use a ContiguousCache and equal lengths")
    cache.append(k, v)
    keys, values, allowed = cache.read()                                 # (B, Hkv, L, D) x2, (B, L)
    mask = new_token_mask(before, n, keys.shape[2], cache.window, allowed)
    chunks = decode_chunks(cache.split_kv, q, keys.shape[2]) if n == 1 and score_mod is None else 1
    if chunks > 1:
        return split_kv_attention(q, keys, values, mask, chunks, scale=scale, backend=backend, sinks=sinks)
    return attention(q, keys, values, mask=mask, scale=scale, score_mod=score_mod, backend=backend, sinks=sinks)


def ring_step(cache, q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, score_mod=None,
              backend: str = "auto", sinks: Tensor | None = None) -> Tensor:
    """`contiguous_step` for a ring buffer of the last W = `cache.window` tokens.

    A decode step (n = 1) attends to the slots in storage order (every stored key is
    within the window, and softmax does not depend on the keys' order); a longer append
    first attends, per sequence, to the ring unrolled into time order plus the new
    tokens, then keeps the last W. `sinks` as in `contiguous_step`."""
    n = cache.check_new(k, v)
    cache.check_query(q, n, scale, backend)
    sinks = check_sinks(sinks, q.shape[1], q.device)
    if score_mod is not None:
        raise ValueError("a score_mod needs key positions, which a RingCache does not keep in order; "
                         "use a ContiguousCache")
    if n == 1:
        cache.append(k, v)
        if (sinks is None and backend == "auto" and cache.k.is_contiguous()
                and kernels.paged_decode_applies(q, cache.k)):
            tables, filled = cache.block_tables()
            return kernels.paged_decode(q, cache.k, cache.v, tables, filled, block_size=cache.block_size,
                                        scale=scale)
        keys, values, allowed = cache.read()                 # every stored key is within the window
        mask = None if allowed is None else allowed[:, None, None, :]
        return attention(q, keys, values, mask=mask, scale=scale, backend=backend, sinks=sinks)
    outs = []
    for b in range(cache.batch):                             # prefill: per sequence, in time order
        old_k, old_v = cache.time_ordered(b)                 # (Hkv, l, D)
        keys = torch.cat([old_k, k[b]], dim=1)[None]         # (1, Hkv, l + n, D)
        values = torch.cat([old_v, v[b]], dim=1)[None]
        outs.append(attention(q[b:b + 1], keys, values, mask=masks.sliding_window(cache.window),
                              scale=scale, backend=backend, sinks=sinks))
    cache.append(k, v)
    return torch.cat(outs)


def paged_step(cache, q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, score_mod=None,
               backend: str = "auto", sinks: Tensor | None = None) -> Tensor:
    """`contiguous_step` for a paged cache: K/V pools (Hkv, N, D) read through block tables.
    `sinks` as in `contiguous_step`."""
    n = cache.check_new(k, v)
    cache.check_query(q, n, scale, backend)
    sinks = check_sinks(sinks, q.shape[1], q.device)
    if score_mod is not None:
        raise ValueError("a score_mod needs key positions in order, which a PagedCache does not give; "
                         "use a ContiguousCache")
    if n == 0:  # no new token: nothing to store, an empty output (as the other caches give)
        return q.new_zeros(q.shape[0], q.shape[1], 0, cache.v.shape[-1])
    if n > 1:
        return _paged_prefill(cache, q, k, v, n, scale=scale, backend=backend, sinks=sinks)
    cache.append(k, v)
    if sinks is None and backend == "auto" and kernels.paged_decode_applies(q, cache.k):
        # decode on the CPU: each query reads only its own blocks, through the block table
        tables, lengths = cache.block_tables()
        return kernels.paged_decode(q, cache.k, cache.v, tables, lengths, block_size=cache.block_size,
                                    window=cache.window, scale=scale)
    # decode elsewhere: all B queries against the pool prefix at once; GQA groups and batch fold into rows
    keys, values, owned = cache.read()                              # (1, Hkv, N, D) x2, (B, N)
    B, Hq, _, D = q.shape
    if sinks is not None:  # a sink per query head: keep the heads, the batch reads the pool as one view
        return attention(q, keys.expand(B, -1, -1, -1), values.expand(B, -1, -1, -1),
                         mask=owned[:, None, None, :], scale=scale, backend=backend, sinks=sinks)  # (B, Hq, 1, D)
    Hkv = cache.n_kv_heads
    G = Hq // Hkv
    rows = q.view(B, Hkv, G, D).permute(1, 2, 0, 3)                 # (Hkv, G, B, D): row = g * B + b
    rows = rows.reshape(1, Hkv, G * B, D)                           # (1, Hkv, G*B, D)
    mask = owned.repeat(G, 1)[None, None]                           # (1, 1, G*B, N)
    out = attention(rows, keys, values, mask=mask, scale=scale, backend=backend)  # (1, Hkv, G*B, D)
    out = out.view(Hkv, G, B, D).permute(2, 0, 1, 3)                # (B, Hkv, G, D)
    return out.reshape(B, Hq, 1, D)


def _paged_prefill(cache, q: Tensor, k: Tensor, v: Tensor, n: int, *, scale, backend, sinks=None) -> Tensor:
    """n > 1 new tokens: each sequence attends to its own tokens, gathered in time order."""
    cache.pool.reserve_all({sid: cache.lengths_by_seq.get(sid, 0) + n for sid in cache.seqs})
    outs = []
    for b, sid in enumerate(cache.seqs):
        start = cache.lengths_by_seq.get(sid, 0)
        cache.view([sid]).append(k[b:b + 1], v[b:b + 1])
        slots = cache.slots(sid, 0, start + n).to(cache.k.device)
        keys, values = cache.k[None][:, :, slots], cache.v[None][:, :, slots]   # (1, Hkv, start+n, D)
        mask = masks.causal() if cache.window is None else masks.sliding_window(cache.window)
        outs.append(attention(q[b:b + 1], keys, values, mask=mask, scale=scale, backend=backend, sinks=sinks))
    return torch.cat(outs)


def decode_chunks(split_kv, q: Tensor, L: int) -> int:
    """How many key chunks a decode step splits into: `split_kv` (a cache's knob) an int, or "auto"
    for `split_kv_rule`."""
    if split_kv != "auto":
        return max(1, min(int(split_kv), L))
    return split_kv_rule(q.shape[0] * q.shape[1], L, q.device)


def new_token_mask(before: Tensor, n: int, L: int, window: int | None, allowed: Tensor | None):
    """Mask (B, 1, n, L) for n new queries per sequence over L chronologically stored keys.

    Sequence b's query i sits at position before[b] + i and stored key j at position j.
    Returns None when the plain bottom-right causal rule of qkv.attention suffices.
    """
    uniform = bool((before == before[0]).all()) and allowed is None
    if uniform and int(before[0]) + n == L:
        if window is not None:
            return masks.sliding_window(window)
        return None if n == 1 else masks.causal()
    device = allowed.device if allowed is not None else before.device
    q_pos = before.to(device)[:, None] + torch.arange(n, device=device)                # (B, n)
    kv = torch.arange(L, device=device)                                               # (L,)
    ok = kv[None, None, :] <= q_pos[:, :, None]                                       # (B, n, L)
    if window is not None:
        ok &= kv[None, None, :] > q_pos[:, :, None] - window
    if allowed is not None:
        ok &= allowed[:, None, :]
    return ok[:, None]                                                                # (B, 1, n, L)


# -----------------------------------------------------------------------------
# Split-KV decode: a long cache in chunks, merged by log-sum-exp


# Keys per chunk below which splitting never pays (a chunk must amortise its call).
SPLIT_MIN_CHUNK = 4096


def split_kv_rule(rows: int, L: int, device: torch.device) -> int:
    """Chunks for a decode step with `rows` = B * Hq query rows over L keys.

    A decode step is one query row per head: a kernel that parallelises over
    (batch, head) leaves processors idle when B * Hq is small, and splitting the
    keys gives it more independent work. On the GPU: enough chunks to give every
    streaming multiprocessor a row, each at least SPLIT_MIN_CHUNK keys. On the CPU
    torch's kernel already splits the rows over the cores and the chunks run one
    after another, so splitting only adds calls (benchmarks/bench_generate.py
    measures it): 1.
    """
    if device.type != "cuda" or L < 2 * SPLIT_MIN_CHUNK:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if rows >= sms:
        return 1
    return max(1, min(-(-sms // rows), L // SPLIT_MIN_CHUNK))


def split_kv_attention(q: Tensor, keys: Tensor, values: Tensor, mask, chunks: int, *, scale=None,
                       backend: str = "auto", sinks: Tensor | None = None) -> Tensor:
    """Decode attention (q (B, Hq, 1, D) over keys (B, Hkv, L, D)) as `chunks` calls merged exactly.

    Each chunk returns its output o_i and the log-sum-exp l_i of its scores; the
    whole-row result is sum_i exp(l_i - l) o_i with l = log sum_i exp(l_i). A
    chunk with no allowed key has l_i = -inf and weight 0. Sinks (Hq,) are one more
    chunk, of output 0 and log-sum-exp sinks[h]: they join l and carry no value.
    """
    B, Hq, n, D = q.shape
    L = keys.shape[2]
    sinks = check_sinks(sinks, Hq, q.device)
    bounds = [round(i * L / chunks) for i in range(chunks + 1)]
    outs, lses = [], []
    for s, e in zip(bounds[:-1], bounds[1:]):
        if isinstance(mask, Tensor):
            part = mask[..., s:e]
        else:
            part = mask                               # a qkv mask: positions shift with q_offset below
        o, lse = attention(q, keys[:, :, s:e], values[:, :, s:e], mask=part, scale=scale, backend=backend,
                               return_lse=True, q_offset=L - n - s)
        outs.append(o.to(lse.dtype))
        lses.append(lse)
    if sinks is not None:                                               # the sink: a chunk with no value
        outs.append(torch.zeros_like(outs[0]))
        lses.append(sinks.to(lses[0].dtype).view(1, -1, 1).expand_as(lses[0]))
    lse = torch.stack(lses)                                             # (chunks, B, Hq, n)
    total = torch.logsumexp(lse, dim=0)                                 # (B, Hq, n)
    weight = torch.exp(lse - total).nan_to_num(0.0)                     # empty rows: -inf - -inf
    out = (weight[..., None] * torch.stack(outs)).sum(0)                # (B, Hq, n, D)
    return out.to(q.dtype)
