"""The bad-input catalogue: every malformed call raises a clear error that names the problem.

Legend: B batch, Hq query heads, Hkv key/value heads, Lq/Lk lengths, D head dim.
"""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv import masks as M
from qkv import scores as S

q = torch.randn(2, 4, 5, 8)
k = torch.randn(2, 2, 7, 8)
v = torch.randn(2, 2, 7, 8)

A = qkv.attention
CATALOGUE = [
    # (name, call, exception, message pattern)
    ("q not a tensor", lambda: A(q.numpy(), k, v), TypeError, "q must be a torch.Tensor"),
    ("q rank 3", lambda: A(q[0], k, v), ValueError, r"q must be 4-D.*\(B, H, L, D\).*\(4, 5, 8\)"),
    ("k rank 5", lambda: A(q, k[None], v), ValueError, "k must be 4-D"),
    ("integer v", lambda: A(q, k, v.long()), TypeError, "v must be a floating-point tensor"),
    ("mixed dtypes", lambda: A(q, k.double(), v), TypeError, r"share one dtype.*k torch.float64.*k.to\(q.dtype\)"),
    ("mixed devices", lambda: A(q, k.to("meta"), v), ValueError, "one device.*meta"),
    ("batch mismatch", lambda: A(q, k[:1], v[:1]), ValueError, "batch sizes differ: q has B=2, k has 1"),
    ("k/v length mismatch", lambda: A(q, k, v[:, :, :6]), ValueError, "k and v must have the same heads and length"),
    ("k/v heads mismatch", lambda: A(q, k, v[:, :1]), ValueError, "k and v must have the same heads and length"),
    ("head dim mismatch", lambda: A(q, k[..., :4], v), ValueError, "same head dim, got q D=8 and k D=4"),
    ("Hq % Hkv != 0", lambda: A(torch.randn(2, 6, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)),
     ValueError, "Hq=6 must be a multiple of .*Hkv=4"),
    ("mask wrong shape", lambda: A(q, k, v, mask=torch.ones(5, 6, dtype=torch.bool)), ValueError,
     r"mask of shape \(5, 6\) does not broadcast.*Lq=5, Lk=7"),
    ("mask wrong batch", lambda: A(q, k, v, mask=torch.ones(3, 1, 5, 7, dtype=torch.bool)), ValueError,
     r"shape \(3, 1, 5, 7\) does not broadcast"),
    ("float mask", lambda: A(q, k, v, mask=torch.zeros(5, 7)), TypeError, r"must be bool.*qkv.scores.bias"),
    ("mask wrong type", lambda: A(q, k, v, mask="causal"), TypeError, "mask must be a qkv mask"),
    ("negative window", lambda: M.sliding_window(-3), ValueError, "window must be >= 1, got -3"),
    ("zero window", lambda: M.sliding_window(0), ValueError, "window must be >= 1, got 0"),
    ("float window", lambda: M.sliding_window(2.5), TypeError, "window must be an int"),
    ("dilation zero", lambda: M.dilated(4, 0), ValueError, "dilation must be >= 1"),
    ("negative prefix", lambda: M.prefix_lm(-1), ValueError, "n must be >= 0"),
    ("negative padding", lambda: M.padding([3, -1]), ValueError, "lengths must be >= 0"),
    ("float doc ids", lambda: M.document(torch.rand(7)), TypeError, "ids must hold integers"),
    ("doc ids too short", lambda: A(q, k, v, mask=M.document(torch.zeros(6, dtype=torch.long))), ValueError,
     r"cover positions \[0, 6\).*\[0, 7\)"),
    ("padding batch", lambda: A(q, k, v, mask=M.padding([3, 4, 5])), ValueError, "3 entries but the call has B=2"),
    ("block layout small", lambda: A(q, k, v, mask=M.block_sparse(torch.ones(1, 1, dtype=torch.bool), 4)),
     ValueError, "layout covers 4 query and 4 key positions"),
    ("block layout dtype", lambda: M.block_sparse(torch.ones(2, 2), 4), TypeError, "bool tensor"),
    ("NaN scale", lambda: A(q, k, v, scale=float("nan")), ValueError, "scale must be finite, got nan"),
    ("inf scale", lambda: A(q, k, v, scale=float("inf")), ValueError, "scale must be finite"),
    ("string scale", lambda: A(q, k, v, scale="0.1"), TypeError, "scale must be a real number"),
    ("dropout 1", lambda: A(q, k, v, dropout_p=1.0), ValueError, r"dropout_p must be a number in \[0, 1\)"),
    ("dropout negative", lambda: A(q, k, v, dropout_p=-0.1), ValueError, "dropout_p"),
    ("score_mod not callable", lambda: A(q, k, v, score_mod=3), TypeError, "score_mod must be a callable"),
    ("q_offset float", lambda: A(q, k, v, q_offset=1.5), TypeError, "q_offset must be an int"),
    ("causal not bool", lambda: A(q, k, v, causal="yes"), TypeError, "causal must be True or False"),
    ("unknown backend", lambda: A(q, k, v, backend="flash2"), ValueError, "unknown backend 'flash2'"),
    ("backend not a string", lambda: A(q, k, v, backend=None), TypeError, "backend must be a string"),
    ("sdpa + score_mod", lambda: A(q, k, v, score_mod=S.softcap(5.0), backend="sdpa"), ValueError,
     "cannot serve.*score_mod.*use backend='tiled'"),
    ("use_backend unknown", lambda: qkv.use_backend("nope").__enter__(), ValueError, "unknown backend 'nope'"),
    ("softcap zero", lambda: S.softcap(0), ValueError, "finite cap > 0"),
    ("block size zero", lambda: M.causal().block_mask(8, 8, block=0), ValueError, "block sizes must be positive"),
]


@pytest.mark.parametrize("name,call,exc,pattern", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_raises_a_clear_error(name, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_every_error_is_a_value_or_type_error():
    for name, call, exc, _ in CATALOGUE:
        assert issubclass(exc, (ValueError, TypeError)), name
