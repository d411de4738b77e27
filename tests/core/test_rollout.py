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


# -----------------------------------------------------------------------------
# image_attention on a tiny ViT with float64 weights


def _tiny_vit(pool="cls", backend="math"):
    from qkv.models import ViT, ViTConfig

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=8, patch_size=2, channels=1, d_model=16, n_layers=3, n_heads=2, ffn_hidden=32,
                    num_classes=10, pool=pool)
    model = ViT(cfg, backend=backend, dtype=torch.float64).eval()
    with torch.no_grad():                        # HF's 0.02 init gives near-uniform maps: make them peaked
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def _by_hand(model, images, layer):
    """The (B, H, N, N) weights of one layer, recomputed from its input with qkv.attention (math, return_weights)."""
    import qkv

    seen = {}
    handle = model.layers[layer].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(images)
    handle.remove()
    block = model.layers[layer]
    att = block.self_attn
    x = block.norm1(seen["x"]).detach()                                          # pre-norm
    B, N, d = x.shape
    H = model.config.n_heads
    split = lambda t: t.view(B, N, H, d // H).transpose(1, 2)                    # noqa: E731
    with torch.no_grad():
        q, k, v = split(att.q_proj(x)), split(att.k_proj(x)), split(att.v_proj(x))
    _, w = qkv.attention(q, k, v, backend="math", return_weights=True)
    plain = torch.softmax(q @ k.transpose(-1, -2) / (d // H) ** 0.5, dim=-1)    # and once more without qkv
    assert torch.allclose(w, plain, atol=1e-12)
    return w


def test_image_attention_maps_are_the_weights_by_hand():
    from qkv.inspect import image_attention

    model = _tiny_vit()
    images = torch.rand(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for query in (0, 6, (2, 1)):
        ia = image_attention(model, images, layers=[1], heads=[1, 0], query=query)
        q = query if isinstance(query, int) else 1 + query[0] * 4 + query[1]
        assert ia.query == q and ia.grid == (4, 4) and ia.n_lead == 1 and ia.heads == [1, 0]
        w = _by_hand(model, images, 1)                                           # (B, H, N, N)
        want = w[:, [1, 0], q, 1:].reshape(2, 1, 2, 4, 4)                         # CLS column dropped
        assert ia.maps.dtype == torch.float64 and ia.maps.shape == (2, 1, 2, 4, 4)
        assert torch.allclose(ia.maps, want, atol=1e-12, rtol=0)
        assert torch.allclose(ia.cls, w[:, [1, 0], q, 0][:, None], atol=1e-12)   # not renormalised: the rest
        assert torch.allclose(ia.maps.sum((-2, -1)) + ia.cls, torch.ones(2, 1, 2, dtype=torch.float64))
        full = [_by_hand(model, images, i) for i in range(3)]
        R = torch.as_tensor(_oracle(full))
        assert torch.allclose(ia.rollout, R[:, q, 1:].reshape(2, 4, 4), atol=1e-12)
    assert not torch.allclose(ia.maps[0, 0, 0], ia.maps[0, 0, 1])                 # heads differ: a real check


def test_image_attention_other_sizes_mean_pool_and_errors():
    from qkv.inspect import image_attention

    model = _tiny_vit(pool="mean", backend="auto")
    images = torch.rand(1, 1, 12, 8, dtype=torch.float64)                        # interpolated positions
    ia = image_attention(model, images, query=-1)
    assert ia.n_lead == 0 and ia.grid == (6, 4) and ia.maps.shape == (1, 3, 2, 6, 4) and ia.query == 23
    assert torch.allclose(ia.maps.sum((-2, -1)), torch.ones(1, 3, 2, dtype=torch.float64))
    assert torch.allclose(ia.rollout.sum((-2, -1)), torch.ones(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="token index"):
        image_attention(model, images, query=24)
    with pytest.raises(ValueError, match="outside"):
        image_attention(model, images, query=(6, 0))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        image_attention(model, images[0])
    with pytest.raises(ValueError, match="patch"):
        image_attention(model, torch.rand(1, 1, 7, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="grid"):
        image_attention(torch.nn.Linear(2, 2), images)
