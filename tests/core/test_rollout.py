"""qkv.inspect.rollout and qkv.inspect.image_attention against float64 oracles written another way.

Legend: B batch, L layers, H heads, N tokens (CLS + P patches), gh x gw patch grid.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qkv.inspect import rollout


def _stochastic(B, H, N, *, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(B, H, N, N, generator=g, dtype=torch.float64), dim=-1).to(dtype)


def _oracle(layers, residual=True):
    """Rollout with explicit loops in NumPy float64: per batch row, mean heads, mix in I, renormalise, chain."""
    B, N = layers[0].shape[0], layers[0].shape[-1]
    out = np.zeros((B, N, N))
    for b in range(B):
        R = np.eye(N)
        for w in layers:
            a = np.asarray(w[b].double().numpy(), dtype=np.float64)
            if a.ndim == 3:
                a = sum(a[h] for h in range(a.shape[0])) / a.shape[0]
            a = a.copy()
            for i in range(N):
                if residual:
                    a[i] = a[i] / 2
                    a[i, i] += 0.5
                total = sum(a[i, j] for j in range(N))
                if total > 0:
                    a[i] = a[i] / total
            new = np.zeros((N, N))
            for i in range(N):
                for j in range(N):
                    new[i, j] = sum(a[i, k] * R[k, j] for k in range(N))
            R = new
        out[b] = R
    return out


@pytest.mark.parametrize("residual", [True, False])
def test_rollout_matches_a_loop_oracle(residual):
    layers = [_stochastic(3, 4, 9, seed=s) for s in range(4)]                 # B = 3, L = 4, H = 4, N = 9
    got = rollout(layers, residual=residual)
    assert got.shape == (3, 9, 9) and got.dtype == torch.float32
    want = _oracle(layers, residual)
    err = np.abs(got.double().numpy() - want).max()
    assert err < 4 * np.finfo(np.float32).eps, err                            # float64 accumulate, one rounding
    got64 = rollout([w.double() for w in layers], residual=residual)
    assert np.abs(got64.numpy() - want).max() < 1e-13


def test_rows_sum_to_one_and_one_layer_is_the_mixed_head_mean():
    layers = [_stochastic(2, 3, 7, seed=10 + s, dtype=torch.float64) for s in range(3)]
    R = rollout(layers)
    assert torch.allclose(R.sum(-1), torch.ones(2, 7, dtype=torch.float64), atol=1e-12)
    one = rollout(layers[:1])
    mixed = (layers[0].mean(1) + torch.eye(7, dtype=torch.float64)) / 2
    assert torch.allclose(one, mixed / mixed.sum(-1, keepdim=True), atol=1e-14)
    # (B, N, N) layers (heads already merged), a stacked tensor and a list all agree
    assert torch.allclose(rollout([w.mean(1) for w in layers]), R, atol=1e-14)
    assert torch.allclose(rollout(torch.stack(layers)), R, atol=1e-14)


def test_rollout_renormalises_rows_that_do_not_sum_to_one():
    w = _stochastic(1, 2, 5, seed=3, dtype=torch.float64)
    scaled = w * torch.linspace(0.3, 1.0, 5, dtype=torch.float64)[:, None]    # rows summing to 0.3 .. 1
    R = rollout([scaled, w])
    assert torch.allclose(R.sum(-1), torch.ones(1, 5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(R, torch.as_tensor(_oracle([scaled, w])), atol=1e-13)


def test_rollout_refuses_bad_input():
    with pytest.raises(ValueError, match="empty"):
        rollout([])
    with pytest.raises(ValueError, match=r"\(B, H, N, N\)"):
        rollout([torch.rand(1, 2, 3, 4)])
    with pytest.raises(ValueError, match="same batch"):
        rollout([_stochastic(1, 2, 4, seed=0), _stochastic(2, 2, 4, seed=1)])
    with pytest.raises(TypeError, match="floating point"):
        rollout([torch.ones(1, 4, 4, dtype=torch.long)])
    with pytest.raises(ValueError, match="NaN"):
        rollout([torch.full((1, 3, 3), float("nan"))])
    with pytest.raises(TypeError, match="list"):
        rollout("weights")
