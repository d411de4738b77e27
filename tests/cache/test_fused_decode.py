"""The fused decode step (`Decoder._fused_layers` and `Block._fused_decode` ->
`qkv.kernels.blocks_step`).

One launch per token for all layers (or per layer and token, block by block)
must compute what the module path computes:
both are checked against a float64 full forward by the error-ratio rule, over
GPT-2, Llama (GQA, scaled RoPE) and Mistral (window on a contiguous cache)
shapes, every activation it takes, ragged batches; the cache it leaves must
match the module path's; and everything it does not cover falls back.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_error_ratio
from qkv import inspect as qkv_inspect, kernels
from qkv.fused import DecodeSession
from qkv.layers import Block
from qkv.models import Decoder, DecoderConfig

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is not installed")

CASES = {
    "gpt2": (DecoderConfig.gpt2, {}),
    "gpt2-gelu": (DecoderConfig.gpt2, {"activation": "gelu"}),
    "gpt2-relu": (DecoderConfig.gpt2, {"activation": "relu"}),
    "gpt2-geglu": (DecoderConfig.gpt2, {"activation": "geglu"}),
    "llama": (DecoderConfig.llama, {"n_kv_heads": 2, "rope_scaling": {"type": "linear", "factor": 2.0}}),
    "mistral": (DecoderConfig.mistral, {"n_kv_heads": 1, "sliding_window": 6}),
}


def _models(name):
    make, extra = CASES[name]
    cfg = make(n_layers=2, d_model=32, n_heads=4, vocab_size=61, max_positions=64, **extra)
    torch.manual_seed(0)
    model = Decoder(cfg).eval()
    model64 = Decoder(cfg, dtype=torch.float64).eval()
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    return model, model64


def _launches(monkeypatch):
    launched = []
    real = kernels.launch
    monkeypatch.setattr(kernels, "launch", lambda name, *args: (launched.append(name), real(name, *args)))
    return launched


def _decode(model, prompts, steps, *, kind, path, monkeypatch):
    """path: "stack" (all layers in one launch), "block" (a launch per layer) or "module" (no fusion)."""
    if path == "module":
        monkeypatch.setattr(Block, "fused_layout", lambda self, *a: None)
    elif path == "block":
        monkeypatch.setattr(Decoder, "_fused_layers", lambda self, *a: None)
    extra = {"ring": False} if kind == "contiguous" else {"block_size": 4}
    cache = model.new_cache(len(prompts), kind=kind, max_len=32, **extra)
    with torch.no_grad():
        for b, p in enumerate(prompts):
            model(p[None], cache=cache.row(b))
        out = torch.cat([model(steps[:, i:i + 1], cache=cache) for i in range(steps.shape[1])], 1)
    monkeypatch.undo()
    return out, cache


def _stored(layer, b, n):
    """Sequence b's first n keys and values, in position order, from either cache kind."""
    if hasattr(layer, "pool"):
        slots = layer.slots(layer.seqs[b], 0, n)
        return layer.k[:, slots], layer.v[:, slots]
    return layer.k[b, :, :n], layer.v[b, :, :n]


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
@pytest.mark.parametrize("name", list(CASES))
def test_fused_block_matches_module_path(name, kind, monkeypatch):
    model, model64 = _models(name)
    prompts = [torch.randint(0, 61, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 11, 7)]
    steps = torch.randint(0, 61, (3, 8), generator=torch.Generator().manual_seed(1))
    launched = _launches(monkeypatch)
    baseline, cache_b = _decode(model, prompts, steps, kind=kind, path="module", monkeypatch=monkeypatch)
    assert "block" not in launched
    with torch.no_grad():
        oracle = torch.cat([model64(torch.cat([p, steps[b]])[None])[:, len(p):] for b, p in enumerate(prompts)])
    for path, launches in (("stack", 1), ("block", 2)):           # per step: all layers at once, or each layer
        launched = _launches(monkeypatch)
        candidate, cache_c = _decode(model, prompts, steps, kind=kind, path=path, monkeypatch=monkeypatch)
        assert launched.count("block") == launches * steps.shape[1]
        assert_error_ratio(candidate, baseline, oracle, what=f"{name} {kind} fused decode ({path})")
        assert torch.equal(cache_c.lengths, cache_b.lengths)
        for lc, lb in zip(cache_c.layers, cache_b.layers):         # the same keys and values stored
            for b in range(3):
                n = int(cache_b.lengths[b])
                (kc, vc), (kb, vb) = _stored(lc, b, n), _stored(lb, b, n)
                assert torch.allclose(kc, kb, rtol=1e-5, atol=1e-6) and torch.allclose(vc, vb, rtol=1e-5, atol=1e-6)


def _one_step_launches(model, monkeypatch, cache=None, grad=False):
    cache = model.new_cache(1) if cache is None else cache
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
    launched = _launches(monkeypatch)
    with torch.set_grad_enabled(grad):
        model(torch.tensor([[4]]), cache=cache)
    monkeypatch.undo()
    return launched


def test_fused_block_falls_back_where_it_does_not_apply(monkeypatch):
    model, _ = _models("gpt2")
    assert "block" in _one_step_launches(model, monkeypatch)
    assert "block" not in _one_step_launches(model, monkeypatch, grad=True)         # autograd records
    assert "block" in _one_step_launches(model, monkeypatch, cache=model.new_cache(1, kind="paged"))
    model.train()
    assert "block" not in _one_step_launches(model, monkeypatch)                    # training mode
    model.eval()
    cache = model.new_cache(1)
    with torch.no_grad():
        model(torch.tensor([[1, 2]]), cache=cache)
        with qkv_inspect.capture(model), pytest.raises(ValueError, match="KV cache"):
            model(torch.tensor([[3]]), cache=cache)               # the hook still sees the step and refuses it
    assert int(cache.layers[0].length[0]) == 2
    attn = model.layers[0].self_attn
    attn.k_proj.weight = torch.nn.Parameter(attn.k_proj.weight.detach().clone())    # q/k/v no longer adjacent
    launched = _one_step_launches(model, monkeypatch)
    assert launched.count("block") == 1                                             # layer 1 only
    mistral, _ = _models("mistral")
    assert "block" not in _one_step_launches(mistral, monkeypatch)                  # ring buffer cache


def test_fused_step_leaves_hooked_modules_to_the_module_path(monkeypatch):
    """A forward hook sees its module run: a hook on a block stops the one-launch stack (the
    blocks then fuse one by one); a hook inside a block sends that block down the module path."""
    model, _ = _models("gpt2")
    plain = _one_step_launches(model, monkeypatch)
    assert plain.count("block") == 1                                                # both layers, one launch
    seen = []
    handle = model.layers[0].register_forward_hook(lambda *a: seen.append("block 0"))
    assert _one_step_launches(model, monkeypatch).count("block") == 2
    assert seen == ["block 0"] * 2                                                  # prefill and the step
    handle.remove()
    handle = model.layers[1].ffn.fc1.register_forward_pre_hook(lambda *a: seen.append("fc1"))
    assert _one_step_launches(model, monkeypatch).count("block") == 1
    assert seen[2:] == ["fc1"] * 2
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: seen.append("any"))
    try:
        assert "block" not in _one_step_launches(model, monkeypatch) and "any" in seen
    finally:
        handle.remove()
    assert _one_step_launches(model, monkeypatch).count("block") == 1


def test_fused_block_full_cache_raises_and_changes_nothing():
    model, _ = _models("gpt2")
    cache = model.new_cache(1, max_len=4)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4]]), cache=cache)
        k0 = cache.layers[0].k.clone()
        with pytest.raises(ValueError, match="full"):
            model(torch.tensor([[5]]), cache=cache)
    assert int(cache.layers[0].length[0]) == 4 and torch.equal(cache.layers[0].k, k0)
    paged = model.new_cache(1, kind="paged", block_size=2, num_blocks=2)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4]]), cache=paged)
        k0, free = paged.layers[0].k.clone(), len(paged.pool._free)
        with pytest.raises(ValueError, match="full"):
            model(torch.tensor([[5]]), cache=paged)
    assert paged.lengths.tolist() == [4] and torch.equal(paged.layers[0].k, k0) and len(paged.pool._free) == free


@pytest.mark.parametrize("kind,ref", [(1, lambda x: torch.nn.functional.gelu(x, approximate="tanh")),
                                      (3, torch.nn.functional.silu), (0, torch.nn.functional.gelu),
                                      (2, torch.relu)])
def test_fused_activations_match_float64(kind, ref):
    import numpy as np

    activate = kernels.compiled("activate")
    x64 = torch.cat([torch.linspace(-100, 100, 4001, dtype=torch.float64),
                     torch.randn(4000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3])
    f = x64.float()
    n = f.numel()
    g = torch.empty(n)
    activate(f.numpy(), g.numpy(), kind, False, np.empty(n, np.float32), np.empty(n, np.int32),
             np.empty(n, np.float32))
    oracle = ref(f.double())
    err_ours = (g.double() - oracle).abs()
    err_torch = (ref(f).double() - oracle).abs()
    ulp = torch.finfo(torch.float32).eps * oracle.abs().clamp_min(1.0)   # absolute near 0, relative above 1
    assert float((err_ours - 2 * err_torch - 2 * ulp).max()) <= 0, f"activation {kind}: {float(err_ours.max())}"
    assert torch.isfinite(g).all()


def test_fused_gated_activation_multiplies_by_up():
    import numpy as np

    activate = kernels.compiled("activate")
    f = torch.randn(2 * 50, generator=torch.Generator().manual_seed(3))
    g = torch.empty(50)
    activate(f.numpy(), g.numpy(), 3, True, np.empty(50, np.float32), np.empty(50, np.int32), np.empty(50, np.float32))
    expected = torch.nn.functional.silu(f[:50].double()) * f[50:].double()
    assert float((g.double() - expected).abs().max()) <= 4 * torch.finfo(torch.float32).eps * float(expected.abs().max())


@pytest.mark.parametrize("interleaved,rotary_dim", [(True, None), (False, 8), (True, 6)])
def test_fused_block_interleaved_and_partial_rope(interleaved, rotary_dim, monkeypatch):
    """A Block of its own (RoPE pairing and rotary width the decoder configs do not choose)."""
    from qkv._util import hugepages
    from qkv.cache import ContiguousCache
    from qkv.positional import RotaryEmbedding

    torch.manual_seed(0)
    rope = RotaryEmbedding(16, rotary_dim=rotary_dim, interleaved=interleaved)
    block = Block(64, 4, n_kv_heads=2, rope=rope, norm="rms", activation="swiglu", bias=False).eval()
    hugepages.pack_parameters(block)
    block64 = Block(64, 4, n_kv_heads=2, rope=RotaryEmbedding(16, rotary_dim=rotary_dim, interleaved=interleaved),
                    norm="rms", activation="swiglu", bias=False, dtype=torch.float64).eval()
    block64.load_state_dict({k: v.double() for k, v in block.state_dict().items()})
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(5))

    def run(fused):
        if not fused:
            monkeypatch.setattr(Block, "_fused_decode", lambda self, *a: None)
        launched = _launches(monkeypatch)
        cache = ContiguousCache(2, 2, 16, 16)
        with torch.no_grad():
            block(x[:, :6], cache=cache, positions=torch.arange(6))
            out = torch.cat([block(x[:, i:i + 1], cache=cache, positions=torch.tensor([i])) for i in range(6, 9)], 1)
        monkeypatch.undo()
        return out, launched

    candidate, launched = run(True)
    assert launched.count("block") == 3
    baseline, launched = run(False)
    assert "block" not in launched
    with torch.no_grad():
        oracle = block64(x.double(), causal=True, positions=torch.arange(9))[:, 6:]
    assert_error_ratio(candidate, baseline, oracle, what=f"rope interleaved={interleaved} rd={rotary_dim}")


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_generate_reuses_the_first_steps_checks_and_matches_stream(name, kind, monkeypatch):
    """`generate` checks the blocks on its first decode step and reuses the layouts after
    (`Decoder.decode_step`); `stream`, which hands control out between steps, checks every
    step. Same tokens, ragged prompts, sequences stopping early (the paged batch shrinks)."""
    from qkv.generate import generate, stream

    model, _ = _models(name)
    prompts = [[5, 9, 1], [7] * 11, [3, 4, 5, 6, 2, 8, 1]]
    args = dict(max_new_tokens=9, cache=kind, block_size=4, temperature=0.8, top_k=20, seed=3)
    first = [list(step) for step in stream(model, prompts, **args)]
    expected = [[step[b] for step in first if step[b] is not None] for b in range(3)]
    stop = expected[1][2]                                          # ends at least one row early
    first = [list(step) for step in stream(model, prompts, stop_tokens=[stop], **args)]
    expected = [[step[b] for step in first if step[b] is not None] for b in range(3)]
    checks = []
    real = Block.fused_layout
    monkeypatch.setattr(Block, "fused_layout",                     # counts the one-token checks
                        lambda self, x, cache: (checks.extend([1] * (x.shape[1] == 1)), real(self, x, cache))[1])
    launched = _launches(monkeypatch)
    got = generate(model, prompts, stop_tokens=[stop], **args)
    assert got == expected
    assert len(checks) == 2                                         # two blocks, checked on the first step only
    assert launched.count("block") == max(map(len, got)) - 1        # every decode step in one launch
    checks.clear()
    list(stream(model, prompts, stop_tokens=[stop], **args))
    assert len(checks) == 2 * (max(map(len, got)) - 1)              # stream: every step, every block


def test_generate_runs_the_models_hooks_every_step():
    from qkv.generate import generate

    model, _ = _models("gpt2")
    calls = []
    handle = model.register_forward_hook(lambda module, args, out: calls.append(tuple(out.shape)))
    try:
        out = generate(model, [1, 2, 3], max_new_tokens=5)
    finally:
        handle.remove()
    assert len(out) == 5 and len(calls) == 5                        # the prompt, then four decode steps
    assert out == generate(model, [1, 2, 3], max_new_tokens=5)


def test_decode_step_reuses_nothing_outside_its_loops_conditions(monkeypatch):
    """With autograd on, a reused layout would skip the checks that send the step down the
    module path: `decode_step` then takes the plain forward (no kernel, a graph recorded)."""
    model, _ = _models("gpt2")
    cache, session = model.new_cache(1), DecodeSession()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        model.decode_step(torch.tensor([[4]]), cache, session)
    assert session.statics is not None
    launched = _launches(monkeypatch)
    out = model.decode_step(torch.tensor([[5]]), cache, session)
    assert "block" not in launched and out.requires_grad


def test_a_block_whose_ffn_is_another_module_takes_the_module_path(monkeypatch):
    model, _ = _models("gpt2")

    class Doubled(torch.nn.Module):                      # any module in the FFN's place
        def __init__(self, ffn):
            super().__init__()
            self.inner = ffn

        def forward(self, x):
            return 2 * self.inner(x)

    model.layers[1].ffn = Doubled(model.layers[1].ffn)
    launched = _one_step_launches(model, monkeypatch)
    assert launched.count("block") == 1                  # layer 0 fused alone; layer 1 runs its modules
