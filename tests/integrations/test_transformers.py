"""`attn_implementation="qkv"` against transformers' eager attention, family by family.

Small configs with random weights in float32 (nothing is downloaded). For each family:
logits (relative error <= 1e-4 on every real token of a padded batch), attention weights
(output_attentions) equal to eager's on real rows, 32 greedy tokens identical with
transformers' `generate`, and the gradients of one training step.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import qkv.integrations.transformers as qi  # noqa: E402  (registers "qkv")
from qkv import inspect as qinspect  # noqa: E402

from .hf_models import FAMILIES  # noqa: E402

REL = 1e-4
PAD = 6


def _inputs(name: str, kind: str):
    """Model inputs and a (B, L) bool of the rows whose outputs are compared (real tokens)."""
    g = torch.Generator().manual_seed(1)
    if kind == "image":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}, None
    ids = torch.randint(3, 97, (2, 24), generator=g)
    am = torch.ones(2, 24, dtype=torch.long)
    if kind == "causal":
        am[1, :PAD] = 0                      # left padding, as for generation
    else:
        am[1, -PAD:] = 0                     # right padding
    if name == "whisper":
        return {"input_features": torch.randn(2, 16, 64, generator=g), "decoder_input_ids": ids[:, :10]}, None
    if kind == "seq2seq":
        return {"input_ids": ids, "attention_mask": am, "decoder_input_ids": ids[:, :10]}, None
    return {"input_ids": ids, "attention_mask": am}, am.bool()


def _model(name: str):
    torch.manual_seed(0)
    return FAMILIES[name][0]().eval()


def _main(out):
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _run(model, impl, x, **kw):
    model.set_attn_implementation(impl)
    return model(**x, **kw)


def _rel(a, b, rows=None):
    if rows is not None:
        a, b = a[rows], b[rows]
    return float((a - b).abs().max() / a.abs().max())


ATTN_KEYS = ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_and_weights_match_eager(name):
    kind = FAMILIES[name][1]
    model = _model(name)
    x, rows = _inputs(name, kind)
    with torch.no_grad():
        ref = _run(model, "eager", x, output_attentions=True)
        got = _run(model, "qkv", x, output_attentions=True)
    assert _rel(_main(ref), _main(got), rows) <= REL
    compared = 0
    for key in ATTN_KEYS:
        for w_ref, w_got in zip(getattr(ref, key, None) or (), getattr(got, key, None) or (), strict=True):
            assert w_got is not None and w_got.shape == w_ref.shape, key
            if rows is not None and w_ref.shape[-2] == rows.shape[1]:
                keep = rows[:, None, :, None].expand_as(w_ref)   # padded query rows: eager spreads them evenly
                w_ref, w_got = w_ref[keep], w_got[keep]
            torch.testing.assert_close(w_got, w_ref, atol=1e-5, rtol=1e-4)
            compared += 1
    assert compared >= 2


@pytest.mark.parametrize("name", [n for n, (_, kind) in FAMILIES.items() if kind in ("causal", "seq2seq")])
def test_greedy_generation_matches_eager(name):
    kind = FAMILIES[name][1]
    model = _model(name)
    x, _ = _inputs(name, kind)
    x = {k: v for k, v in x.items() if k != "decoder_input_ids"}
    args = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
    tokens = {}
    for impl in ("eager", "qkv"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            tokens[impl] = model.generate(**x, **args)
    assert tokens["qkv"].shape[1] >= 32
    assert torch.equal(tokens["qkv"], tokens["eager"])


def _loss(model, kind, x, rows):
    """A loss whose gradient reaches every weight: outputs against a fixed random direction
    (a mean of squares would vanish behind BERT's final LayerNorm)."""
    main = _main(model(**x))
    direction = torch.randn(main.shape, generator=torch.Generator().manual_seed(5))
    if rows is not None:
        direction = direction * rows[..., None]
    return (main.float() * direction).sum()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_training_step_gradients_match_eager(name):
    kind = FAMILIES[name][1]
    model = _model(name)
    x, rows = _inputs(name, kind)
    grads = {}
    for impl in ("eager", "qkv"):
        model.set_attn_implementation(impl)
        model.zero_grad(set_to_none=True)
        _loss(model, kind, x, rows).backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["qkv"].keys() == grads["eager"].keys() and grads["eager"]
    # a key bias shifts a whole row of scores, which softmax ignores: its gradient is zero up to
    # rounding, so parameters whose gradient is below 1e-6 of the largest are compared absolutely
    top = max(float(g.abs().max()) for g in grads["eager"].values())
    worst = max(float((grads["eager"][n] - grads["qkv"][n]).abs().max())
                / max(float(grads["eager"][n].abs().max()), 1e-6 * top) for n in grads["eager"])
    assert worst <= 1e-3, worst


def test_training_with_dropout_runs_through_qkv():
    model = _model("llama")
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    model.train().set_attn_implementation("qkv")
    x, _ = _inputs("llama", "causal")
    torch.manual_seed(3)
    a = model(**x).logits
    torch.manual_seed(4)
    b = model(**x).logits
    assert not torch.allclose(a, b)             # dropout acted on the weights
    (a.float() ** 2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _packed(L=48, starts=(0, 10, 29)):
    pos = torch.cat([torch.arange(e - s) for s, e in zip(starts, (*starts[1:], L))])[None]
    return pos


def test_packed_sequences_by_position_ids_become_a_document_mask():
    model = _model("llama")
    ids = torch.randint(3, 97, (1, 48), generator=torch.Generator().manual_seed(2))
    pos = _packed()
    seen = []
    real = qi.mask_function

    def spy(*a, **kw):
        out = real(*a, **kw)
        seen.append(out)
        return out

    from transformers.masking_utils import AttentionMaskInterface
    with torch.no_grad():
        ref = _run(model, "eager", {"input_ids": ids, "position_ids": pos, "use_cache": False}).logits
        AttentionMaskInterface.register("qkv", spy)
        try:
            got = _run(model, "qkv", {"input_ids": ids, "position_ids": pos, "use_cache": False}).logits
        finally:
            AttentionMaskInterface.register("qkv", real)
    assert _rel(ref, got) <= REL
    assert seen and "document(" in repr(seen[0].mask) and "causal" in repr(seen[0].mask)
    # each document alone gives the same logits: nothing leaks across the boundaries
    with torch.no_grad():
        alone = _run(model, "qkv", {"input_ids": ids[:, 10:29]}).logits
    assert _rel(alone, got[:, 10:29]) <= REL


def test_sliding_window_layers_get_a_window_mask():
    masks_seen = []

    def spy(module, q, k, **kw):
        masks_seen.append(repr(kw["mask"]))

    model = _model("mistral")
    x, _ = _inputs("mistral", "causal")
    from qkv.hooks import ATTENTION_HOOK
    token = ATTENTION_HOOK.set(spy)
    try:
        with torch.no_grad():
            _run(model, "qkv", x)
    finally:
        ATTENTION_HOOK.reset(token)
    assert masks_seen and all("sliding_window(7, causal=True)" in m for m in masks_seen)


def test_capture_on_a_transformers_model_equals_eager_weights():
    model = _model("llama")
    x, _ = _inputs("llama", "causal")
    model.set_attn_implementation("qkv")
    names = [n for n, _ in qinspect.attention_modules(model)]
    assert names == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    with qinspect.capture(model, layers=[-1], heads=[1], rows=[-1]) as cap, torch.no_grad():
        model(**x)
    with torch.no_grad():
        ref = _run(model, "eager", x, output_attentions=True).attentions[-1]
    got = cap.maps[names[-1]]
    w = got.weights if hasattr(got, "weights") else got
    torch.testing.assert_close(w.reshape(2, -1), ref[:, 1, -1].reshape(2, -1), atol=1e-5, rtol=1e-4)


def test_an_attention_keyword_qkv_cannot_honour_is_refused_by_name():
    model = _model("llama")
    model.set_attn_implementation("qkv")
    q = torch.randn(1, 4, 5, 16)
    k = torch.randn(1, 2, 5, 16)
    with pytest.raises(TypeError, match="'alibi_slopes'"):
        qi.attention_forward(model.model.layers[0].self_attn, q, k, k, None, alibi_slopes=torch.ones(4))


def test_register_refuses_transformers_own_names_and_unknown_backends():
    with pytest.raises(ValueError, match="sdpa"):
        qi.register("sdpa")
    with pytest.raises(ValueError):
        qi.register("qkv_x", backend="no-such-backend")


def test_a_registered_backend_serves_every_call():
    name = qi.register("qkv_math", backend="math")
    model = _model("llama")
    x, rows = _inputs("llama", "causal")
    with torch.no_grad():
        ref = _run(model, "eager", x).logits
        got = _run(model, name, x).logits
    assert _rel(ref, got, rows) <= REL


def test_from_config_and_from_pretrained_take_the_name(tmp_path):
    from transformers import AutoModelForCausalLM
    model = _model("qwen2")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="qkv")
    assert loaded.config._attn_implementation == "qkv"
    built = AutoModelForCausalLM.from_config(model.config, attn_implementation="qkv")
    assert built.config._attn_implementation == "qkv"
    x, rows = _inputs("qwen2", "causal")
    calls = []
    from qkv.hooks import ATTENTION_HOOK
    token = ATTENTION_HOOK.set(lambda module, q, k, **kw: calls.append(type(module).__name__))
    try:
        with torch.no_grad():
            got = loaded.eval()(**x).logits
    finally:
        ATTENTION_HOOK.reset(token)
    assert calls == ["Qwen2Attention"] * 2                     # every layer went through qkv
    with torch.no_grad():
        ref = _run(model, "eager", x).logits
    assert _rel(ref, got, rows) <= REL


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_generation_with_a_static_cache_matches_eager(name):
    # generate builds each step's mask ahead for a static cache and hands it back to the model
    model = _model(name)
    x, _ = _inputs(name, "causal")
    tokens = {}
    for impl in ("eager", "qkv"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            tokens[impl] = model.generate(**x, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                          cache_implementation="static")
    assert torch.equal(tokens["qkv"], tokens["eager"])
