"""qkv.viz: PNG heatmaps and grids, mask/tile pictures, the HTML viewer's file, bad inputs.

Legend: H heads, Lq/Lk query/key lengths, nQ/nK tiles.
"""

from __future__ import annotations

import json
import os
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import qkv
from qkv import masks as M
from qkv import viz

TOKENS = ["the", "dog", "<script>", "a&b", '"q"', "$x$", "</script>", "."]


def _png(path) -> np.ndarray:
    """The PNG as an (height, width, 3) uint8 array."""
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _rgb(hex_colour: str) -> np.ndarray:
    return np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])


def _count(img: np.ndarray, hex_colour: str, tol: int = 3) -> int:
    return int((np.abs(img.astype(int) - _rgb(hex_colour)).max(axis=-1) <= tol).sum())


def _softmax_maps(layers=2, H=3, Lq=8, Lk=8, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer {i}": torch.softmax(2 * torch.randn(H, Lq, Lk, generator=g), dim=-1) for i in range(layers)}


# ----------------------------------------------------------------------------
# heatmap / grid
# ----------------------------------------------------------------------------

def test_heatmap_decodes_with_expected_size_and_content(tmp_path):
    w = _softmax_maps(1, 1)["layer 0"][0]                                  # (8, 8)
    path = viz.heatmap(w, tmp_path / "h.png", x_labels=TOKENS, y_labels=TOKENS, title="layer 0, head 0", dpi=80)
    assert path == tmp_path / "h.png"
    img = _png(path)
    w_in, h_in = viz.heatmap_figsize(8, 8)
    assert img.shape[:2] == (round(h_in * 80), round(w_in * 80))
    assert img.std() > 20, "the picture is (nearly) uniform"
    # NumPy and torch (any float dtype) give the very same picture
    viz.heatmap(w.numpy(), tmp_path / "n.png", x_labels=TOKENS, y_labels=TOKENS, title="layer 0, head 0", dpi=80)
    assert np.array_equal(_png(tmp_path / "n.png"), img)
    viz.heatmap(w.to(torch.bfloat16), tmp_path / "b.png", dpi=80)
    bf = _png(tmp_path / "b.png")
    w_nl, h_nl = viz.heatmap_figsize(8, 8, labels=False)
    assert bf.shape[:2] == (round(h_nl * 80), round(w_nl * 80)) and bf.std() > 20


def test_heatmap_colours_follow_the_weights(tmp_path):
    # viridis' top colour marks weight 1: the identity has 8 such cells, a single one has 1
    top = "#fde725"
    viz.heatmap(np.eye(8), tmp_path / "eye.png", dpi=60)
    one = np.zeros((8, 8))
    one[3, 5] = 1.0
    viz.heatmap(one, tmp_path / "one.png", dpi=60)
    n_eye, n_one = _count(_png(tmp_path / "eye.png"), top, 8), _count(_png(tmp_path / "one.png"), top, 8)
    assert n_one > 50
    assert 5.0 < n_eye / n_one < 8.5, (n_eye, n_one)


def test_heatmap_long_sequence_thins_labels_and_caps_size(tmp_path):
    L = 300
    w = torch.softmax(torch.randn(L, L), -1)
    img = _png(viz.heatmap(w, tmp_path / "long.png", x_labels=[f"t{i}" for i in range(L)],
                           y_labels=[f"t{i}" for i in range(L)], dpi=50))
    w_in, h_in = viz.heatmap_figsize(L, L)
    assert img.shape[:2] == (round(h_in * 50), round(w_in * 50))
    assert w_in < 14 and h_in < 14                                      # capped, not 0.3 in per token
    assert viz.heatmap_figsize(20, 20)[0] < w_in                        # but longer is wider up to the cap
    # raw scores (negative too) are drawn as well
    assert _png(viz.heatmap(torch.randn(5, 7), tmp_path / "scores.png", dpi=50)).std() > 20
    ticks = viz._thin(L, viz._TICKS)
    assert ticks[0] == 0 and len(ticks) <= viz._TICKS and len(set(np.diff(ticks))) == 1


def test_grid_sizes_inputs_and_layers(tmp_path):
    maps = _softmax_maps(2, 3)
    path = viz.grid(maps, tmp_path / "g.png", labels=TOKENS, dpi=60)
    img = _png(path)
    w_in, h_in = viz.grid_figsize(2, 3, labels=True)
    assert img.shape[:2] == (round(h_in * 60), round(w_in * 60))
    assert img.std() > 20
    # a dict with default names, a list and one (layers, H, Lq, Lk) array draw the same picture
    as_list = list(maps.values())
    viz.grid(as_list, tmp_path / "l.png", labels=TOKENS, dpi=60)
    viz.grid(torch.stack(as_list), tmp_path / "a.png", labels=TOKENS, dpi=60)
    assert np.array_equal(_png(tmp_path / "l.png"), img)
    assert np.array_equal(_png(tmp_path / "a.png"), img)
    # different data -> a different picture
    viz.grid(_softmax_maps(2, 3, seed=1), tmp_path / "o.png", labels=TOKENS, dpi=60)
    assert not np.array_equal(_png(tmp_path / "o.png"), img)
    # layers with different head counts; cross-attention with query labels
    ragged = {"a": torch.rand(2, 5, 8), "b": torch.rand(4, 5, 8)}
    assert _png(viz.grid(ragged, tmp_path / "r.png", labels=TOKENS, query_labels=list("abcde"))).std() > 10
    with pytest.raises(ValueError, match="query_labels"):
        viz.grid(ragged, tmp_path / "x.png", labels=TOKENS)


def test_png_write_is_atomic(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    target = tmp_path / "h.png"
    target.write_bytes(b"old picture")

    def broken_savefig(self, fname, **kw):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half a pic")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        viz.heatmap(np.eye(4), target)
    assert target.read_bytes() == b"old picture"
    assert os.listdir(tmp_path) == ["h.png"], "a temporary file was left behind"


# ----------------------------------------------------------------------------
# mask_picture
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("name, mask, expect", [
    ("causal", M.causal(), {"EMPTY": 6, "PARTIAL": 4, "FULL": 6}),
    ("window", M.sliding_window(16), {"EMPTY": 9, "PARTIAL": 7, "FULL": 0}),
])
def test_mask_picture_shows_the_library_tiles(tmp_path, name, mask, expect):
    L, t = 64, 16
    assert mask.block_mask(L, L, block=t).counts() == expect             # the library's own classification
    img = _png(viz.mask_picture(mask, L, L, tmp_path / f"{name}.png", tile=(t, t), dpi=80))
    tile_px = {k: _count(img, c) for k, c in (("EMPTY", viz._EMPTY_C), ("PARTIAL", viz._PARTIAL_C),
                                              ("FULL", viz._FULL_C))}
    # every tile has the same area, so pixel counts follow the tile counts (legend swatches are tiny)
    per_tile = tile_px["EMPTY"] / expect["EMPTY"]
    assert per_tile > 500
    for kind, n in expect.items():
        assert tile_px[kind] == pytest.approx(n * per_tile, rel=0.1, abs=0.03 * per_tile), (kind, tile_px)
    # the dense panel: dark pixels in proportion to the allowed pairs
    allowed = int(mask.to_dense(L, L).sum())
    navy = _count(img, viz._ALLOWED)
    assert navy / per_tile == pytest.approx(allowed / (t * t), rel=0.15)


def test_mask_picture_tiles_only_for_long_sequences(tmp_path):
    L = 100_000                                                        # 10^10 pairs: never evaluated densely
    with pytest.raises(ValueError, match="dense=False"):
        viz.mask_picture(M.causal(), L, L, tmp_path / "x.png", tile=4096)
    assert not (tmp_path / "x.png").exists()
    img = _png(viz.mask_picture(M.causal() & M.sliding_window(20_000), L, L, tmp_path / "t.png", tile=4096,
                                dense=False, dpi=60))
    assert _count(img, viz._EMPTY_C) > 1000 and _count(img, viz._PARTIAL_C) > 100 and _count(img, viz._FULL_C) > 100
    assert _count(img, viz._ALLOWED) == 0                               # no dense panel


def test_mask_picture_other_masks(tmp_path):
    # a plain callable (tiles by evaluation), a batch-dependent mask, decode with Lq < Lk
    fn = lambda b, h, q, kv: (q - kv) % 3 == 0                          # noqa: E731
    assert _count(_png(viz.mask_picture(fn, 24, 24, tmp_path / "f.png", tile=8)), viz._PARTIAL_C) > 100
    pad = M.padding([10, 24])
    a = _png(viz.mask_picture(pad, 24, 24, tmp_path / "p0.png", tile=8, batch=0))
    b = _png(viz.mask_picture(pad, 24, 24, tmp_path / "p1.png", tile=8, batch=1))
    # row 1 has all 24 keys: no empty tile, only the legend swatch is grey
    assert _count(a, viz._EMPTY_C) > 10 * max(1, _count(b, viz._EMPTY_C))
    with pytest.raises(ValueError, match="batch=2"):
        viz.mask_picture(pad, 24, 24, tmp_path / "p2.png", tile=8, batch=2)
    img = _png(viz.mask_picture(M.causal(), 4, 40, tmp_path / "dec.png", tile=(4, 8)))
    assert _count(img, viz._FULL_C) > 100 and _count(img, viz._PARTIAL_C) > 10


# ----------------------------------------------------------------------------
# html
# ----------------------------------------------------------------------------

def _data(text: str) -> dict:
    m = re.search(r'<script id="qkv-data" type="application/json">(.*?)</script>', text, re.S)
    assert m, "no embedded JSON"
    return json.loads(m.group(1))


def test_html_is_self_contained_and_holds_the_data(tmp_path):
    maps = _softmax_maps(2, 3)
    path = viz.html(maps, TOKENS, tmp_path / "a.html", title='attn <b>"x"</b> & %DATA%')
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    for ref in ("http://", "https://", "//cdn", "src=", "@import", "url(", "<link rel=\"stylesheet\""):
        assert ref not in text, ref
    # the tokens' markup never reaches the page as markup
    assert text.count("</script>") == 2 and text.count("<script") == 2
    assert "a&b" not in text and "<b>" not in text
    assert "&lt;b&gt;&quot;x&quot;&lt;/b&gt; &amp; %DATA%" in text        # title escaped, placeholder kept
    data = _data(text)
    assert data["tokens"] == TOKENS and data["query_tokens"] == TOKENS and data["self_attention"]
    assert [ly["name"] for ly in data["layers"]] == list(maps)
    for ly, w in zip(data["layers"], maps.values()):
        assert ly["heads"] == 3
        got = np.array(ly["weights"]).reshape(3, 8, 8) / data["scale"]
        assert np.abs(got - w.numpy()).max() <= 0.5 / data["scale"] + 1e-7   # 4 decimals
    assert "window.qkvViewer" in text and "data-drawn" in text


def test_html_cross_attention_and_inputs(tmp_path):
    w = torch.softmax(torch.randn(2, 3, 5), -1)                          # (H, Lq=3, Lk=5)
    with pytest.raises(ValueError, match="query_tokens"):
        viz.html({"cross": w}, list("abcde"), tmp_path / "c.html")
    data = _data(viz.html([w], list("abcde"), tmp_path / "c.html", query_tokens=["x", "y", "z"]).read_text())
    assert data["query_tokens"] == ["x", "y", "z"] and not data["self_attention"]
    assert data["layers"][0]["name"] == "layer 0" and len(data["layers"][0]["weights"][0]) == 15
    # numbers are fine as tokens (printed)
    assert _data(viz.html(np.asarray(w)[None], [1, 2, 3, 4, 5], tmp_path / "n.html",
                          query_tokens=[7, 8, 9]).read_text())["tokens"] == ["1", "2", "3", "4", "5"]


ASSETS = ("page.html", "style.css", "viewer.js")      # qkv/viz_assets/, package data


def _asset(name: str) -> str:
    return (resources.files("qkv") / "viz_assets" / name).read_text(encoding="utf-8")


def test_html_is_the_packaged_page_style_and_script(tmp_path):
    """The page is viz_assets/page.html with the style and the script inlined verbatim and the
    placeholders filled in; pyproject ships every file of viz_assets as package data."""
    page, style, script = (_asset(name) for name in ASSETS)
    for name in ("TITLE", "META", "STYLE", "SCRIPT", "DATA"):
        assert f"%{name}%" in page
    text = viz.html(_softmax_maps(1, 2), TOKENS, tmp_path / "a.html", title="t").read_text(encoding="utf-8")
    head, tail = page.split("%TITLE%", 1)[0], page.rsplit("%SCRIPT%", 1)[1]
    assert text.startswith(head) and text.endswith(tail) and not re.search(r"%(TITLE|META|STYLE|SCRIPT|DATA)%", text)
    assert f"<style>{style}</style>" in text and f"<script>{script}</script>" in text

    import tomllib
    from fnmatch import fnmatch

    root = Path(__file__).resolve().parents[2]
    shipped = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["qkv"]
    files = sorted(f.name for f in (root / "src" / "qkv" / "viz_assets").iterdir() if f.is_file())
    assert files == sorted(ASSETS + ("image_page.html", "image_viewer.js"))    # + the image view (viz.image_html)
    assert all(any(fnmatch(f"viz_assets/{f}", pattern) for pattern in shipped) for f in files), shipped


def test_html_size_limits(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="tokens per side"):
        viz.html({"a": torch.full((1, 600, 600), 1 / 600)}, ["t"] * 600, tmp_path / "x.html")
    monkeypatch.setattr(viz, "MAX_HTML_WEIGHTS", 1000)
    with pytest.raises(ValueError, match="fewer layers or heads"):
        viz.html(_softmax_maps(2, 16), TOKENS, tmp_path / "x.html")
    assert not (tmp_path / "x.html").exists()


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------

def test_bad_inputs(tmp_path):
    p = tmp_path / "x.png"
    h = tmp_path / "x.html"
    nan = torch.eye(4)
    nan[1, 2] = float("nan")
    maps = _softmax_maps(1, 2)
    cases = [
        (ValueError, "2 dimensions", lambda: viz.heatmap(torch.rand(2, 4, 4), p)),
        (ValueError, "NaN", lambda: viz.heatmap(nan, p)),
        (ValueError, "empty", lambda: viz.heatmap(np.zeros((0, 4)), p)),
        (ValueError, "x_labels has 3 entries", lambda: viz.heatmap(torch.eye(4), p, x_labels=["a", "b", "c"])),
        (TypeError, "not one string", lambda: viz.heatmap(torch.eye(4), p, y_labels="abcd")),
        (TypeError, "real", lambda: viz.heatmap(torch.eye(4, dtype=torch.complex64), p)),
        (TypeError, "real numbers", lambda: viz.heatmap(np.array([["a", "b"]]), p)),
        (TypeError, "array or tensor", lambda: viz.heatmap(None, p)),
        (ValueError, "must end in .png", lambda: viz.heatmap(torch.eye(4), tmp_path / "x.jpg")),
        (TypeError, "dpi", lambda: viz.heatmap(torch.eye(4), p, dpi=1.5)),
        (ValueError, "empty", lambda: viz.grid({}, p)),
        (ValueError, "empty", lambda: viz.grid([], p)),
        (ValueError, "3 dimensions", lambda: viz.grid({"a": torch.rand(4, 4)}, p)),
        (ValueError, "same Lq and Lk", lambda: viz.grid({"a": torch.rand(1, 4, 4), "b": torch.rand(1, 4, 5)}, p)),
        (ValueError, "NaN", lambda: viz.grid({"a": nan[None]}, p)),
        (ValueError, "at most 64", lambda: viz.grid({"a": torch.rand(65, 2, 2)}, p)),
        (TypeError, "dict", lambda: viz.grid("maps", p)),
        (ValueError, "labels has 3", lambda: viz.grid(maps, p, labels=["a", "b", "c"])),
        (ValueError, "empty", lambda: viz.html({}, TOKENS, h)),
        (ValueError, "3 dimensions", lambda: viz.html({"a": torch.rand(1, 1, 8, 8)}, TOKENS, h)),
        (ValueError, "NaN", lambda: viz.html({"a": torch.full((1, 4, 4), float("nan"))}, list("abcd"), h)),
        (ValueError, "tokens has 7 entries", lambda: viz.html(maps, TOKENS[:7], h)),
        (TypeError, "not one string", lambda: viz.html(maps, "the dog", h)),
        (TypeError, r"tokens\[1\]", lambda: viz.html(maps, ["a", None] + TOKENS[2:], h)),
        (TypeError, "list of Lk strings", lambda: viz.html(maps, None, h)),
        (ValueError, "query_tokens has 2", lambda: viz.html(maps, TOKENS, h, query_tokens=["a", "b"])),
        (ValueError, r"\[0, 1\]", lambda: viz.html({"scores": 5 * torch.randn(1, 8, 8)}, TOKENS, h)),
        (ValueError, "must end in .html", lambda: viz.html(maps, TOKENS, tmp_path / "x.txt")),
        (ValueError, "Lq must be >= 1", lambda: viz.mask_picture(M.causal(), 0, 4, p)),
        (ValueError, r"tile\[0\] must be >= 1", lambda: viz.mask_picture(M.causal(), 4, 4, p, tile=(0, 4))),
        (TypeError, "expected a qkv mask", lambda: viz.mask_picture("causal", 4, 4, p)),
        (ValueError, "must end in .png", lambda: viz.mask_picture(M.causal(), 4, 4, tmp_path / "x.svg")),
        (ValueError, "larger tile", lambda: viz.mask_picture(M.causal(), 10**6, 10**6, p, tile=1, dense=False)),
    ]
    for exc, msg, call in cases:
        with pytest.raises(exc, match=msg):
            call()
    assert sorted(os.listdir(tmp_path)) == [], "a failed call wrote a file"


def test_attention_weights_end_to_end(tmp_path):
    # weights captured by qkv itself, straight into the viewer and a grid
    q = k = v = torch.randn(1, 2, 6, 8)
    _, w = qkv.attention(q, k, v, causal=True, return_weights=True)     # (1, 2, 6, 6)
    toks = ["a", "b", "c", "d", "e", "f"]
    data = _data(viz.html({"self": w[0]}, toks, tmp_path / "w.html").read_text())
    got = np.array(data["layers"][0]["weights"]).reshape(2, 6, 6)
    assert (got[:, np.triu_indices(6, 1)[0], np.triu_indices(6, 1)[1]] == 0).all()   # causal: nothing above
    assert viz.grid({"self": w[0]}, tmp_path / "w.png", labels=toks).exists()
