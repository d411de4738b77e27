"""qkv._util.hugepages: huge-page buffers, the parameter arena and joined views.

Packing moves storage only: values, Parameter objects, gradients, state dicts
and checkpoints are unchanged, and the decode path's joint q/k/v (gate/up)
launch gives what the separate projections give.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_error_ratio
from qkv import kernels
from qkv._util import hugepages
from qkv.models import Decoder, DecoderConfig


def _tiny(arch="gpt2", **kw):
    base = {"gpt2": DecoderConfig.gpt2, "llama": DecoderConfig.llama}[arch]
    cfg = base(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_positions=64, **kw)
    torch.manual_seed(0)
    return Decoder(cfg).eval()


def test_joined_spans_adjacent_rows_only():
    buf = torch.arange(24.0)
    a, b, c = buf[:6].view(2, 3), buf[6:15].view(3, 3), buf[15:24].view(3, 3)
    j = hugepages.joined(a, b, c)
    assert j.shape == (8, 3) and torch.equal(j, buf.view(8, 3))
    assert j.data_ptr() == a.data_ptr()
    assert hugepages.joined(a, c) is None                             # a gap between them
    assert hugepages.joined(b, a) is None                             # wrong order
    assert hugepages.joined(a, buf[6:14].view(2, 4)) is None          # another width
    assert hugepages.joined(a, torch.arange(6.0, 15.0).view(3, 3)) is None  # another storage
    assert hugepages.joined(a, None) is None
    assert hugepages.joined(buf.view(4, 6)[:, :3], buf.view(4, 6)[:, 3:]) is None  # not contiguous
    vec = hugepages.joined(buf[:4], buf[4:10])
    assert vec.shape == (10,) and torch.equal(vec, buf[:10])


def test_pack_parameters_moves_storage_not_values():
    m = _tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    params = list(m.parameters())
    assert hugepages.pack_parameters(m) == len(params)                # again: a second arena, same values
    assert list(m.parameters()) == params                           # same Parameter objects
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    storages = {p.untyped_storage().data_ptr() for p in m.parameters()}
    assert len(storages) == 1                                        # one arena (one dtype)
    assert m.embed.weight.data_ptr() == m.head_weight.data_ptr()    # the tie survives
    attn = m.layers[0].self_attn
    assert hugepages.joined(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight) is not None
    assert hugepages.joined(attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias) is not None


def test_packed_model_still_trains_and_saves(tmp_path):
    from safetensors.torch import load_file, save_file

    m = _tiny().train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    w0 = m.layers[1].ffn.fc2.weight.detach().clone()
    for _ in range(2):
        logits = m(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 97), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(m.layers[1].ffn.fc2.weight, w0)          # the update landed in the arena
    storages = {p.untyped_storage().data_ptr() for p in m.parameters()}
    assert len(storages) == 1
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "m.safetensors"))
    back = load_file(str(tmp_path / "m.safetensors"))
    for k, v in m.state_dict().items():
        assert torch.equal(back[k], v), k


@pytest.mark.skipif(not kernels.available(), reason="numba is not installed")
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_joint_projection_matches_separate_ones(arch, monkeypatch):
    from qkv import fused

    m = _tiny(arch)
    calls = []
    real = fused.joint_linear
    monkeypatch.setattr(fused, "joint_linear", lambda x, ls: calls.append(len(ls)) or real(x, ls))
    x = torch.randn(3, 1, 32, generator=torch.Generator().manual_seed(2))
    block = m.layers[0]
    with torch.no_grad():
        joint = real(x, (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj))
        assert joint is not None and len(joint) == 3
        for out, proj in zip(joint, (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj)):
            w64 = proj.weight.double()
            b64 = None if proj.bias is None else proj.bias.double()
            assert_error_ratio(out, F.linear(x, proj.weight, proj.bias), F.linear(x.double(), w64, b64),
                               what=f"{arch} joint projection")
        cache = m.new_cache(3)
        m(torch.randint(0, 97, (3, 5)), cache=cache)
        m(torch.randint(0, 97, (3, 1)), cache=cache)                 # a decode step takes the joint path
    assert 3 in calls
    if arch == "llama":
        assert 2 in calls                                            # gate/up together


def test_joint_projection_declines_unpacked_or_recording():
    from qkv import fused

    q, k, v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)     # separate allocations
    x = torch.randn(1, 8)
    with torch.no_grad():
        assert fused.joint_linear(x, (q, k, v)) is None
    m = _tiny()
    attn = m.layers[0].self_attn
    x = torch.randn(1, 1, 32, requires_grad=True)
    assert fused.joint_linear(x, (attn.q_proj, attn.k_proj, attn.v_proj)) is None   # autograd records


@pytest.mark.skipif(not sys.platform.startswith("linux")
                    or not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"),
                    reason="transparent huge pages are a Linux feature")
def test_large_buffers_are_advised_small_ones_untouched():
    assert hugepages.advise_huge(torch.empty(4 << 20)) is True        # 16 MiB: a 2 MiB-aligned interior
    assert hugepages.advise_huge(torch.empty(1000)) is False           # no whole huge page inside
    z = hugepages.zeros((3, 1 << 20))
    assert z.shape == (3, 1 << 20) and not z.any()


def test_advice_skips_other_devices_and_empty():
    assert hugepages.advise_huge(torch.empty(0)) is False
    assert hugepages.advise_huge(torch.empty(1 << 22, device="meta")) is False
    assert hugepages.empty((2, 3), dtype=torch.float64).dtype == torch.float64
