"""`segments`: packed documents as a padded batch, through torch's fused kernel.

Legend: B batch, H heads (Hq queries, Hkv keys/values), L packed length, n documents,
Lmax the longest document, E head dim (D for q and k, Dv for v).

A `document(ids)` mask (optionally `& causal()`) over one sequence of contiguous
documents, with nothing else asked of the call (no score_mod, LSE or weights), is
exactly a batch of independent attentions, one per document. Run as such, the work is
sum(len^2) plus the padding to the longest document, without the cost of classifying
and masking tiles that cut across documents.

A hidden backend (`qkv.backends.registry`): auto tries it first; it is not listed,
not suggested and not nameable, so `use_backend(...)` skips it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qkv.backends.base import FLOATS, Backend, Call, Capabilities
from qkv.masks import documents

__all__ = ["SegmentsBackend", "document_runs", "PADDING_LIMIT"]

#: the padded batch is used only while its work (n * Lmax^2) is at most this multiple of the
#: documents' own (sum of len^2); past it the tiled backend, which skips what the mask rules out, wins
PADDING_LIMIT = 1.25


def document_runs(call: Call):
    """(starts, lengths, causal) when `call`'s mask is packed documents that are contiguous runs, else None.

    starts and lengths are (n,) int64 tensors on the call's device (n >= 2 documents);
    causal says whether the mask is `document(ids) & causal()`."""
    found = documents(call.mask)
    if found is None:
        return None
    ids, causal = found
    L = call.Lk
    if call.Lq != L or call.q_offset != 0 or ids.shape[0] != 1 or ids.shape[1] != L or L < 2:
        return None
    ids = ids[0].to(call.q.device)
    change = (ids[1:] != ids[:-1]).nonzero().squeeze(1) + 1                       # (n - 1,) run starts
    n = change.numel() + 1
    if n < 2 or torch.unique(ids).numel() != n:                                   # one document, or not runs
        return None
    starts = torch.cat([change.new_zeros(1), change])                             # (n,)
    lengths = torch.diff(torch.cat([starts, change.new_tensor([L])]))             # (n,)
    return starts, lengths, causal


def by_segments(call: Call, starts: torch.Tensor, lengths: torch.Tensor, causal: bool) -> torch.Tensor:
    """The documents of a packed sequence as a padded batch (B * n, H, Lmax, E), then back to (B, H, L, Dv)."""
    q, k, v = call.q, call.k, call.v
    B, L, n = call.B, call.Lk, starts.numel()
    Lmax = int(lengths.max())
    offs = torch.arange(Lmax, device=q.device)
    gather = (starts[:, None] + offs).clamp(max=L - 1).reshape(-1)               # (n * Lmax,) positions

    def pack(t):                                                                  # (B, H, L, E) -> (B*n, H, Lmax, E)
        H, E = t.shape[1], t.shape[3]
        return t[:, :, gather].view(B, H, n, Lmax, E).transpose(1, 2).reshape(B * n, H, Lmax, E)

    keys_ok = None
    if not causal:                                                                # causal never reaches the padding
        keys_ok = (offs[None] < lengths[:, None]).repeat(B, 1)[:, None, None, :]  # (B*n, 1, 1, Lmax)
    q_docs, scale = pack(q), call.scale
    if causal and scale < 0:
        # torch's CPU kernel returns NaN rows for is_causal=True with a negative scale (torch 2.13):
        # q k^T * scale = (-q) k^T * |scale| exactly
        q_docs, scale = -q_docs, -scale
    out = F.scaled_dot_product_attention(
        q_docs, pack(k), pack(v), attn_mask=keys_ok, is_causal=causal, scale=scale,
        dropout_p=call.dropout_p, enable_gqa=call.Hq != call.Hkv)                 # (B*n, Hq, Lmax, Dv)
    doc = torch.repeat_interleave(torch.arange(n, device=q.device), lengths)     # (L,) document of each position
    back = doc * Lmax + torch.arange(L, device=q.device) - starts[doc]           # (L,) its row in the padded batch
    Dv = out.shape[-1]
    return out.view(B, n, call.Hq, Lmax, Dv).transpose(1, 2).reshape(B, call.Hq, n * Lmax, Dv)[:, :, back]


class SegmentsBackend(Backend):
    name = "segments"
    capabilities = Capabilities(
        devices=("any",), dtypes=FLOATS, masks=True, score_mod=False, dropout=True, gqa=True,
        backward=True, return_lse=False, return_weights=False, exact=True, auto=True,
        notes="packed documents (document(ids), optionally & causal()) as a padded batch through torch's kernel",
    )

    def extra_refusal(self, call: Call) -> str | None:
        runs = document_runs(call)
        if runs is None:
            return "the mask is not contiguous packed documents"
        _, lengths, _ = runs
        padded, real = lengths.numel() * int(lengths.max()) ** 2, int((lengths.double() ** 2).sum())
        if padded > PADDING_LIMIT * real:
            # uneven documents: padding each to the longest did 4.8x the work for 8 documents at 16k
            # (2.38 s vs tiled's 0.72 s a layer forward; 8.8 s vs 2.3 s with backward), while equal
            # documents cost the same on either route (0.35 s)
            return (f"padding {lengths.numel()} documents to the longest ({int(lengths.max())}) would do "
                    f"{padded / real:.1f}x the work of the documents themselves")
        return None

    def auto_refusal(self, call: Call) -> str | None:
        # tiled's row runs read each document as a FULL block and a causal triangle, no padding:
        # 8 equal documents at 16k (H 8, D 64, fp32, 2 cores) 0.30-0.32 s forward against 0.32-0.36 s
        # here, 1.04-1.10 s against 1.14-1.17 s with the backward
        from qkv.backends import registry, tiled

        if call.dropout_p == 0 and call.scale >= 0 and tiled.fused_applies(call) \
                and registry.get("tiled").run_rows and registry.get("tiled").refusal(call) is None:
            return "tiled's row runs compute the documents without padding"
        return None

    def forward(self, call: Call):
        return by_segments(call, *document_runs(call)), None, None
