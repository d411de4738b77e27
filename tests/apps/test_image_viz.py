"""Pictures of a vision transformer's attention: qkv.viz.overlay, image_grid, rollout_picture,
image_html, read_image and image_report (PNG/JPEG in, PNGs and an offline HTML view out).

Legend: B batch, C channels, H x W pixels, gh x gw patch grid, N tokens (CLS + patches).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from qkv import viz


def _colour_pixels(png: np.ndarray, colour: np.ndarray, tol: int = 3) -> np.ndarray:
    """(y, x) of the pixels of an RGB array within `tol` of `colour` (0..255) in every channel."""
    return np.argwhere((np.abs(png.astype(int) - colour.astype(int)) <= tol).all(-1))


def _peaked(gh=4, gw=4, at=(0, 3), low=(3, 0)):
    m = np.full((gh, gw), 0.05)
    m[at], m[low] = 0.6, 0.0
    return m


def test_overlay_upsamples_each_patch_and_shows_the_image_through():
    m = _peaked()
    red, blue = np.zeros((3, 8, 12)), np.zeros((3, 8, 12))
    red[0], blue[2] = 1.0, 1.0
    red[0, 0, 0] = blue[2, 0, 0] = 0.0                                 # not constant: scaled min..max
    a, b = viz.overlay(red, m, alpha=0.5), viz.overlay(blue, m, alpha=0.5)
    assert a.shape == (8, 12, 3) and 0.0 <= a.min() and a.max() <= 1.0
    assert np.allclose(a[0:2, 9:12], a[1, 10])                          # patch (0, 3) is one colour over 2 x 3 pixels
    assert not np.allclose(a[1, 10], a[7, 1])                           # most- and least-attended patches differ
    assert not np.allclose(a[1, 10], b[1, 10])                          # the image shows through the heat map
    assert np.allclose(viz.overlay(red, m, alpha=0.0)[1, 1], [1, 0, 0])
    with pytest.raises(ValueError, match="alpha"):
        viz.overlay(red, m, alpha=1.5)
    with pytest.raises(ValueError, match="image"):
        viz.overlay(np.zeros((2, 8, 8)) + np.arange(8), m)               # 2 channels


def test_image_grid_writes_a_png_with_the_hot_patch_where_it_belongs(tmp_path):
    image = np.full((1, 16, 16), 0.5)                                   # constant grey: colours come from the map
    maps = np.stack([np.stack([_peaked()] * 3)] * 2)                     # (layers 2, heads 3, 4, 4)
    path = viz.image_grid(image, maps, tmp_path / "heads.png", dpi=80)
    png = np.asarray(Image.open(path).convert("RGB"))
    w, h = viz.image_grid_figsize(2, 3, 16, 16)
    assert png.shape[:2] == (round(h * 80), round(w * 80))
    hot = np.rint(viz.overlay(image, _peaked())[2, 14] * 255)
    cold = np.rint(viz.overlay(image, _peaked())[14, 2] * 255)
    assert np.abs(hot - cold).max() > 60                                # the most- and least-attended colours differ
    hot_px, cold_px = _colour_pixels(png, hot), _colour_pixels(png, cold)
    assert len(hot_px) > 6 * 100 and len(cold_px) > 6 * 100             # one patch per tile, each ~ 25 x 25 px
    # one tile on its own: the hot patch is top right, the cold one bottom left
    one = np.asarray(Image.open(viz.image_grid(image, {"l0": _peaked()[None]}, tmp_path / "one.png")).convert("RGB"))
    hy, hx = _colour_pixels(one, hot).mean(0)
    cy, cx = _colour_pixels(one, cold).mean(0)
    assert hy < cy and hx > cx
    # an outlined query patch adds its cyan frame
    framed = np.asarray(Image.open(viz.image_grid(image, {"l0": _peaked()[None]}, tmp_path / "q.png",
                                                  query=(1, 1))).convert("RGB"))
    assert len(_colour_pixels(framed, np.array([0, 229, 255]), tol=30)) > 20
    assert len(_colour_pixels(one, np.array([0, 229, 255]), tol=30)) == 0


def test_image_grid_and_rollout_picture_refuse_bad_input(tmp_path):
    image = np.random.rand(8, 8)
    with pytest.raises(ValueError, match="png"):
        viz.image_grid(image, np.random.rand(1, 1, 4, 4), tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="outside"):
        viz.image_grid(image, np.random.rand(1, 1, 4, 4), tmp_path / "x.png", query=(4, 0))
    with pytest.raises(ValueError, match="one map per image"):
        viz.rollout_picture(np.random.rand(3, 1, 8, 8), np.random.rand(2, 4, 4), tmp_path / "r.png")
    with pytest.raises(ValueError, match="gh, gw"):
        viz.rollout_picture(np.random.rand(2, 1, 8, 8), np.random.rand(2, 16), tmp_path / "r.png")


def test_rollout_picture_draws_each_image_above_its_rollout(tmp_path):
    g = np.random.default_rng(0)
    images = g.random((3, 3, 8, 8))                                     # RGB
    rolls = np.stack([_peaked(at=(i, i), low=(3, 3 - i) if i != 3 else (0, 0)) for i in range(3)])
    path = viz.rollout_picture(images, rolls, tmp_path / "rollout.png", labels=["pred 1", "pred 2", "pred 3"], dpi=90)
    png = np.asarray(Image.open(path).convert("RGB"))
    w, h = viz.rollout_figsize(3, 8, 8)
    assert png.shape[:2] == (round(h * 90), round(w * 90))
    assert png.std() > 20


# -----------------------------------------------------------------------------
# image_report: a file through a tiny ViT


def _vit(channels=1, pool="cls"):
    from qkv.models import ViT, ViTConfig

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=8, patch_size=2, channels=channels, d_model=16, n_layers=2, n_heads=2,
                    ffn_hidden=32, num_classes=10, pool=pool)
    model = ViT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def _digit_png(path, index=0):
    from sklearn.datasets import load_digits

    d = load_digits().images[index]                                      # (8, 8) in 0..16
    Image.fromarray(np.rint(d * 255 / 16).astype(np.uint8), mode="L").save(path)
    return d


def test_read_image_matches_the_digits_scaling(tmp_path):
    d = _digit_png(tmp_path / "digit.png")
    x = viz.read_image(tmp_path / "digit.png", 1)
    assert x.shape == (1, 1, 8, 8) and x.dtype == torch.float32
    assert np.abs(x[0, 0].numpy() - d / 16).max() <= 0.5 / 255 + 1e-6    # what the training person feeds: x / 16
    rgb = viz.read_image(tmp_path / "digit.png", 3)                      # grey -> RGB: three equal channels
    assert rgb.shape == (1, 3, 8, 8) and torch.equal(rgb[0, 0], rgb[0, 2])
    Image.fromarray(np.full((4, 6), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert torch.allclose(viz.read_image(tmp_path / "deep.png", 1), torch.ones(1, 1, 4, 6))


def test_image_report_writes_everything_and_predicts(tmp_path):
    model = _vit()
    _digit_png(tmp_path / "digit.png", index=3)
    report = viz.image_report(model, tmp_path / "digit.png", tmp_path / "out", query=(1, 2))
    x = viz.read_image(tmp_path / "digit.png", 1)
    with torch.no_grad():
        want = int(model(x).argmax())
    assert report["prediction"] == want and 0 < report["probability"] <= 1
    assert report["grid"] == (4, 4) and report["query"] == 1 + 1 * 4 + 2
    for key in ("heads_png", "rollout_png"):
        with Image.open(report[key]) as im:
            im.verify()                                                  # a valid PNG
        with Image.open(report[key]) as im:
            assert im.format == "PNG" and min(im.size) > 100
    with Image.open(report["heads_png"]) as im:
        w, h = viz.image_grid_figsize(2, 2, 8, 8)
        assert im.size == (round(w * 100), round(h * 100))
    page = open(report["html"], encoding="utf-8").read()
    assert not re.search(r"(src|href)=\"(https?:)?//", page) and "http://" not in page.replace(
        "http://www.w3.org", "")                                          # nothing loaded from the network
    data = json.loads(re.search(r'<script id="qkv-data" type="application/json">(.*?)</script>', page, re.S).group(1))
    assert data["kind"] == "image" and data["grid"] == [4, 4] and data["lead"] == 1
    assert data["start"] == {"layer": 1, "head": "mean", "query": 7}
    assert len(data["layers"]) == 2 and len(data["layers"][0]["weights"][0]) == 17 * 16
    # an RGB JPEG through a 3-channel model, at another size (interpolated positions)
    Image.fromarray((np.random.default_rng(1).random((12, 8, 3)) * 255).astype(np.uint8)).save(tmp_path / "c.jpg")
    r3 = viz.image_report(_vit(3), tmp_path / "c.jpg", tmp_path / "out3", layer=0, head=1)
    assert r3["grid"] == (6, 4) and r3["image_size"] == (12, 8)


def test_image_report_refuses_bad_files(tmp_path):
    model = _vit()
    (tmp_path / "noise.png").write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(ValueError, match="not an image Pillow can read"):
        viz.image_report(model, tmp_path / "noise.png", tmp_path / "out")
    _digit_png(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:60])     # a truncated PNG
    with pytest.raises(ValueError, match="not an image Pillow can read"):
        viz.image_report(model, tmp_path / "cut.png", tmp_path / "out")
    Image.fromarray(np.zeros((7, 8), dtype=np.uint8)).save(tmp_path / "odd.png")
    with pytest.raises(ValueError, match=r"7 x 8 pixels.*patch"):
        viz.image_report(model, tmp_path / "odd.png", tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        viz.image_report(model, tmp_path / "missing.png", tmp_path / "out")
    with pytest.raises(TypeError, match="vision transformer"):
        viz.image_report(torch.nn.Linear(2, 2), tmp_path / "ok.png", tmp_path / "out")
    with pytest.raises(ValueError, match="token index"):
        viz.image_report(model, tmp_path / "ok.png", tmp_path / "out", query=17)
    with pytest.raises(ValueError, match="layer must be in 0..1"):
        viz.image_report(model, tmp_path / "ok.png", tmp_path / "out2", layer=2)
    with pytest.raises(ValueError, match="head must be in 0..1"):
        viz.image_report(model, tmp_path / "ok.png", tmp_path / "out2", head=2)
    assert not (tmp_path / "out" / "heads.png").exists()                 # nothing written before the errors
    assert not (tmp_path / "out2").exists()


def test_image_html_refuses_bad_input(tmp_path):
    w = torch.softmax(torch.randn(2, 17, 17), -1)
    with pytest.raises(ValueError, match="leading tokens"):
        viz.image_html(np.random.rand(8, 8), {"l0": w}, tmp_path / "a.html", grid=(5, 5))
    with pytest.raises(TypeError, match="grid"):
        viz.image_html(np.random.rand(8, 8), {"l0": w}, tmp_path / "a.html", grid=4)
    with pytest.raises(ValueError, match="head"):
        viz.image_html(np.random.rand(8, 8), {"l0": w}, tmp_path / "a.html", grid=(4, 4), head=2)
    with pytest.raises(ValueError, match="too many"):
        viz.image_html(np.random.rand(8, 8), np.full((40, 16, 65, 65), 1 / 65), tmp_path / "a.html", grid=(8, 8))


def test_image_report_falls_back_to_head_means_for_big_pages_and_runs_without_a_head(tmp_path, monkeypatch):
    from qkv.models import ViT, ViTConfig

    _digit_png(tmp_path / "digit.png")
    monkeypatch.setattr(viz, "MAX_HTML_WEIGHTS", 2 * 17 * 16)             # room for one map per layer, not four
    report = viz.image_report(_vit(), tmp_path / "digit.png", tmp_path / "out", head=1)
    assert report["html_heads"] == "mean"
    page = open(report["html"], encoding="utf-8").read()
    data = json.loads(re.search(r'<script id="qkv-data" type="application/json">(.*?)</script>', page, re.S).group(1))
    assert [layer["heads"] for layer in data["layers"]] == [0, 0] and data["start"]["head"] == "mean"
    assert len(data["layers"][0]["weights"]) == 1
    monkeypatch.undo()
    bare = ViT(ViTConfig(image_size=8, patch_size=4, channels=1, d_model=8, n_layers=1, n_heads=2, ffn_hidden=16,
                         num_classes=None)).eval()
    r = viz.image_report(bare, tmp_path / "digit.png", tmp_path / "bare")
    assert "prediction" not in r and r["grid"] == (2, 2) and r["html_heads"] == "all"


def test_image_html_is_the_packaged_image_page_style_and_script(tmp_path):
    from importlib import resources

    asset = lambda name: (resources.files("qkv") / "viz_assets" / name).read_text(encoding="utf-8")  # noqa: E731
    page, style, script = asset("image_page.html"), asset("style.css"), asset("image_viewer.js")
    w = torch.softmax(torch.randn(2, 17, 17), -1)
    text = viz.image_html(np.random.rand(8, 8), {"l0": w}, tmp_path / "a.html", grid=(4, 4), title="%DATA%").read_text(
        encoding="utf-8")
    assert text.startswith(page.split("%TITLE%", 1)[0]) and text.endswith(page.rsplit("%SCRIPT%", 1)[1])
    assert f"<style>{style}</style>" in text and f"<script>{script}</script>" in text
    assert "<title>%DATA%</title>" in text                                 # placeholder-like titles are left alone
