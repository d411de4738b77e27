"""`qkv.models.ViT`: shapes, positions, pooling, backends, Hugging Face parity, checkpoints, bad input.

Legend: B batch, C channels, H x W image, p patch, gh x gw patch grid, P = gh * gw patches,
N tokens (P + 1 with [CLS]), d model width, K classes.

Parity: a tiny transformers ViT with random weights (every parameter redrawn, norms and biases
included, so each mapping shapes the output) is saved with save_pretrained (safetensors) and
loaded with `qkv.models.hf.load`. The logits (and hidden states) follow the error-ratio rule
(candidate qkv fp32, baseline transformers fp32, oracle transformers float64 with sdpa attention,
as its eager path keeps the softmax in float32) and a relative error <= 1e-4.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_error_ratio
from safetensors.torch import load_file, save_file

from qkv import checkpoint
from qkv.models import Decoder, DecoderConfig, ViT, ViTConfig
from qkv.models import hf
from qkv.models.vit import sincos_positions


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def transformers():
    t = pytest.importorskip("transformers")
    t.logging.set_verbosity_error()
    t.utils.logging.disable_progress_bar()
    return t


def small(**kw) -> ViTConfig:
    base = dict(image_size=8, patch_size=2, channels=3, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64,
                num_classes=5)
    return ViTConfig(**{**base, **kw})


def images(B, C, H, W, *, seed=0, dtype=torch.float32):
    return torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def randomise(model, seed=0):
    """Redraw every parameter (norm weights around 1) so that no mapping hides behind a zero or a one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            x = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2
            p.copy_((1 + x) if ("norm" in name.lower() and name.endswith("weight")) else x)
    return model


# -----------------------------------------------------------------------------
# Shapes, config


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("positions", ["learned", "sincos"])
def test_shapes_pools_and_positions(pool, positions):
    model = ViT(small(pool=pool, positions=positions)).eval()
    x = images(3, 3, 8, 8)
    N = 16 + (pool == "cls")
    assert model(x).shape == (3, 5)
    tokens = model.hidden(x)
    assert tokens.shape == (3, N, 32)
    assert model.grid((8, 12)) == (4, 6) and model.grid(6) == (3, 3)
    assert model.hidden(images(2, 3, 6, 12)).shape == (2, 18 + (pool == "cls"), 32)   # another grid runs
    assert model(images(2, 3, 6, 12)).shape == (2, 5)
    pooled = tokens[:, 0] if pool == "cls" else tokens.mean(1)
    torch.testing.assert_close(model.head(pooled), model(x), rtol=0, atol=0)


def test_config_round_trip_and_fields():
    c = small(image_size=(12, 8), patch_size=(4, 2), qkv_bias=False, pool="mean", positions="sincos")
    assert c.image_size == (12, 8) and c.grid == (3, 4) and c.num_tokens == 12
    again = ViTConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c
    model = ViT(c)
    assert model.config is c and model.cls_token is None and model.pos_embed is None
    assert model.layers[0].self_attn.q_proj.bias is None and model.layers[0].self_attn.o_proj.bias is not None


@pytest.mark.parametrize("kw, match", [
    (dict(image_size=10, patch_size=4), "must divide image_size"),
    (dict(d_model=30, n_heads=3, positions="sincos"), "multiple of 4"),
    (dict(pool="max"), "pool must be one of"),
    (dict(positions="rope"), "positions must be one of"),
    (dict(n_heads=5), "does not divide d_model"),
    (dict(num_classes=None, pooler=1), "pooler must be True or False"),
    (dict(pooler=True), "num_classes=None"),
    (dict(patch_size=(2, 2, 2)), "pair"),
])
def test_bad_config(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        small(**kw)


def test_attention_is_captured_per_head():
    import qkv.inspect as inspect

    model = ViT(small()).eval()
    names = [n for n, _ in inspect.attention_modules(model)]
    assert names == ["layers.0.self_attn", "layers.1.self_attn"]
    with inspect.capture(model, rows=[0]) as cap, torch.no_grad():
        model(images(2, 3, 8, 8))
    w = cap.maps["layers.1.self_attn"]
    assert tuple(w.shape) == (2, 4, 1, 17)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 1))


# -----------------------------------------------------------------------------
# Positions


def test_sincos_formula_and_new_grids():
    d, gh, gw = 16, 3, 5
    pe = sincos_positions(gh, gw, d, dtype=torch.float64)
    q = d // 4
    w = 10000.0 ** (-torch.arange(q, dtype=torch.float64) / q)
    for r, c in [(0, 0), (2, 4), (1, 3)]:
        want = torch.cat([torch.sin(r * w), torch.cos(r * w), torch.sin(c * w), torch.cos(c * w)])
        torch.testing.assert_close(pe[r * gw + c], want, rtol=0, atol=1e-15)
    model = ViT(small(positions="sincos", d_model=16, n_heads=2)).double()
    torch.testing.assert_close(model.position_embeddings((gh, gw))[0, 1:], pe, rtol=0, atol=0)
    assert float(model.position_embeddings((gh, gw))[0, 0].abs().max()) == 0.0    # [CLS]: the zero vector
    mean = ViT(small(positions="sincos", pool="mean", d_model=16, n_heads=2)).double()
    torch.testing.assert_close(mean.position_embeddings((gh, gw))[0], pe, rtol=0, atol=0)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_learned_positions_interpolate_bicubically(pool):
    model = ViT(small(pool=pool)).double()
    lead = 1 if pool == "cls" else 0
    same = model.position_embeddings((4, 4))
    assert same is model.pos_embed                                             # the training grid: the table
    new = model.position_embeddings((6, 3))
    assert new.shape == (1, 18 + lead, 32)
    if lead:
        torch.testing.assert_close(new[:, 0], model.pos_embed[:, 0], rtol=0, atol=0)   # [CLS] kept
    grid = model.pos_embed[:, lead:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(6, 3), mode="bicubic", align_corners=False)
    torch.testing.assert_close(new[:, lead:], want.permute(0, 2, 3, 1).reshape(1, 18, 32), rtol=0, atol=1e-15)


# -----------------------------------------------------------------------------
# Backends


@pytest.mark.parametrize("pool, positions", [("cls", "learned"), ("mean", "sincos")])
def test_every_backend_gives_the_same_logits(pool, positions):
    cfg = small(pool=pool, positions=positions)
    ref = randomise(ViT(cfg, backend="math")).eval()
    x = images(2, 3, 8, 8)
    with torch.no_grad():
        oracle = ViT(cfg, backend="math").double().eval()
        oracle.load_state_dict(ref.state_dict())
        want = oracle(x.double())
        base = ref(x)
        for name in ("math", "sdpa", "tiled"):
            model = ViT(cfg, backend=name).eval()
            model.load_state_dict(ref.state_dict())
            got = model(x)
            assert_error_ratio(got, base, want, what=f"ViT logits, backend {name}")
            assert rel(got, want) < 1e-5


# -----------------------------------------------------------------------------
# Hugging Face parity


def _hf_dir(transformers, tmp_path, cls, **kw):
    cfg = transformers.ViTConfig(**{**dict(num_channels=3, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=64, num_labels=5,
                                           attn_implementation="sdpa"), **kw})
    model = randomise(cls(cfg)).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


def _outputs(model, x, **kw):
    out = model(x, **kw)
    main = out.logits if hasattr(out, "logits") else (
        out.pooler_output if out.pooler_output is not None else out.last_hidden_state[:, 0])
    return main, getattr(out, "last_hidden_state", None)


@pytest.mark.parametrize("case", ["classify-square", "classify-12x8", "model-pooler-patch4x2",
                                  "model-nopooler-nobias"])
def test_hf_parity(transformers, tmp_path, case):
    kw = {"classify-square": dict(image_size=8, patch_size=4),
          "classify-12x8": dict(image_size=[12, 8], patch_size=4, hidden_act="gelu_new"),
          "model-pooler-patch4x2": dict(image_size=8, patch_size=[4, 2]),
          "model-nopooler-nobias": dict(image_size=8, patch_size=2, qkv_bias=False)}[case]
    cls = transformers.ViTForImageClassification if case.startswith("classify") else transformers.ViTModel
    extra = {"add_pooling_layer": False} if "nopooler" in case else {}
    cfg = transformers.ViTConfig(num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, num_labels=5, attn_implementation="sdpa", **kw)
    theirs = randomise(cls(cfg, **extra)).eval()
    theirs.save_pretrained(tmp_path, safe_serialization=True)
    ours = hf.load(tmp_path, expect=ViT)
    assert isinstance(ours, ViT) and ours.config.pooler == ("model-pooler" in case)
    assert ours.config.num_classes == (5 if case.startswith("classify") else None)
    H, W = ours.config.image_size
    x = images(3, 3, H, W)
    with torch.no_grad():
        base, base_hidden = _outputs(theirs, x)
        oracle, oracle_hidden = _outputs(theirs.double(), x.double())
        got = ours(x)
        assert rel(got, oracle) <= 1e-4, case
        assert_error_ratio(got, base, oracle, what=f"ViT {case}")
        if base_hidden is not None:
            hidden = ours.hidden(x)
            assert rel(hidden, oracle_hidden) <= 1e-4
            assert_error_ratio(hidden, base_hidden, oracle_hidden, what=f"ViT {case} hidden")


@pytest.mark.parametrize("size", [(12, 12), (12, 6), (4, 10)])
def test_hf_parity_interpolated_positions(transformers, tmp_path, size):
    theirs = _hf_dir(transformers, tmp_path, transformers.ViTForImageClassification, image_size=8, patch_size=2)
    ours = hf.load(tmp_path)
    x = images(2, 3, *size, seed=1)
    with torch.no_grad():
        base = theirs(x, interpolate_pos_encoding=True).logits
        oracle = theirs.double()(x.double(), interpolate_pos_encoding=True).logits
        got = ours(x)
    assert rel(got, oracle) <= 1e-4
    assert_error_ratio(got, base, oracle, what=f"ViT at {size}, interpolated positions")


def test_hf_save_loads_in_transformers(transformers, tmp_path):
    ours = randomise(ViT(small(image_size=(8, 12), patch_size=(2, 4)))).eval()
    hf.save(ours, tmp_path)
    cfg = hf.config_to_hf(ours.config)
    assert cfg["model_type"] == "vit" and cfg["architectures"] == ["ViTForImageClassification"]
    assert hf.config_from_hf(cfg) == ours.config
    theirs = transformers.ViTForImageClassification.from_pretrained(tmp_path).eval()
    x = images(2, 3, 8, 12)
    with torch.no_grad():
        assert rel(ours(x), theirs(x).logits) <= 1e-5
        assert torch.equal(hf.load(tmp_path)(x), ours(x))


# -----------------------------------------------------------------------------
# Checkpoints


@pytest.mark.parametrize("kw", [dict(), dict(pool="mean", positions="sincos"), dict(num_classes=None)])
def test_checkpoint_round_trip(tmp_path, kw):
    model = randomise(ViT(small(**kw))).eval()
    path = checkpoint.save(tmp_path / "run", 3, model, {}, {"note": "vit"})
    raw = json.loads((path / "config.json").read_text())
    assert raw["model_type"] == ("vit" if not kw.get("pool") else "qkv_vit")
    x = images(2, 3, 8, 8)
    back = checkpoint.load(path, expect=ViT)
    assert isinstance(back.model, ViT) and back.model.config == model.config and back.step == 3
    direct = hf.load(path, expect=ViT)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(back.model.eval()(x), want)
        assert torch.equal(direct(x), want)


# -----------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("x, error, match", [
    (images(2, 1, 8, 8), ValueError, "1 channel"),
    (images(2, 3, 8, 7), ValueError, "W=7 is not a positive multiple"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.int64), TypeError, "floating-point"),
    (images(1, 3, 8, 8)[0], ValueError, r"image\[None\]"),
    (images(2, 3, 8, 8, dtype=torch.float64), TypeError, "cast them"),
    (images(2, 3, 1, 8), ValueError, "H=1"),
    ([[0.0]], TypeError, "torch.Tensor"),
])
def test_bad_images(x, error, match):
    model = ViT(small())
    with pytest.raises(error, match=match):
        model(x)


def test_grid_refuses_bad_sizes():
    model = ViT(small(patch_size=(2, 4)))
    with pytest.raises(ValueError, match="W=6"):
        model.grid((8, 6))
    with pytest.raises(TypeError, match="pair of ints"):
        model.grid((8.0, 8))


def test_another_architecture_where_a_vit_is_expected(tmp_path):
    gpt2 = Decoder(DecoderConfig.gpt2(vocab_size=50, d_model=16, n_layers=1, n_heads=2, max_positions=16))
    hf.save(gpt2, tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"'gpt2' checkpoint, which loads as a qkv Decoder, but a ViT is expected"):
        hf.load(tmp_path / "gpt2", expect=ViT)
    path = checkpoint.save(tmp_path / "run", 1, gpt2, {}, {})
    with pytest.raises(checkpoint.CheckpointError, match="a ViT is expected"):
        checkpoint.load(path, expect=ViT)
    hf.save(ViT(small()), tmp_path / "vit")
    with pytest.raises(ValueError, match="a Decoder is expected"):
        hf.load(tmp_path / "vit", expect=Decoder)


@pytest.mark.parametrize("damage, match", [
    ("drop", r"lacks 1 tensor\(s\) the vit model needs: encoder\.layer\.1\.layernorm_after\.bias"),
    ("shape", r"vit\.embeddings\.position_embeddings: expected \(1, 17, 32\), got \(1, 10, 32\)"),
    ("patch", r"vit\.embeddings\.patch_embeddings\.projection\.weight: expected \(32, 3, 2, 2\)"),
    ("extra", r"1 tensor\(s\) config\.json does not account for: extra"),
])
def test_damaged_vit_checkpoint(tmp_path, damage, match):
    hf.save(ViT(small()), tmp_path)
    file = tmp_path / "model.safetensors"
    state = load_file(file)
    if damage == "drop":
        del state["vit.encoder.layer.1.layernorm_after.bias"]
    elif damage == "shape":
        state["vit.embeddings.position_embeddings"] = torch.zeros(1, 10, 32)
    elif damage == "patch":
        state["vit.embeddings.patch_embeddings.projection.weight"] = torch.zeros(32, 3, 4, 4)
    else:
        state["vit.extra"] = torch.zeros(2)
    save_file(state, file)
    with pytest.raises(ValueError, match=match):
        hf.load(tmp_path)


def test_bad_vit_config_json(tmp_path):
    hf.save(ViT(small()), tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    for change, match in [({"hidden_act": "swish"}, "hidden_act 'swish'"),
                          ({"patch_size": 3}, "must divide image_size"),
                          ({"architectures": ["ViTForMaskedImageModeling"]}, "ViTForMaskedImageModeling")]:
        (tmp_path / "config.json").write_text(json.dumps({**raw, **change}))
        with pytest.raises(ValueError, match=match):
            hf.load(tmp_path)
