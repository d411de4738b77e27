"""`qkv viz --image FILE --checkpoint DIR`: a ViT checkpoint's attention drawn on an image, from the command line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qkv import cli
from qkv.models import ViT, ViTConfig, hf


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("viz-image")
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=8, patch_size=2, channels=1, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64,
                          num_classes=10))
    hf.save(model, d / "vit")
    Image.fromarray((np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8)).save(d / "digit.png")
    Image.fromarray(np.zeros((7, 8), dtype=np.uint8)).save(d / "odd.png")
    (d / "broken.png").write_bytes(b"not an image" * 8)
    return d


def test_viz_image_writes_the_pictures(files, capsys):
    out = files / "out"
    assert cli.main(["viz", "--image", str(files / "digit.png"), "--checkpoint", str(files / "vit"), "--out", str(out),
                     "--query", "1,2"]) == 0
    text = capsys.readouterr().out
    assert "4 x 4 patches, 2 layers x 4 heads, predicted class" in text
    for name in ("heads.png", "rollout.png", "attention.html"):
        assert (out / name).stat().st_size > 0
    with Image.open(out / "heads.png") as im:
        assert im.width > 100 and im.height > 100


@pytest.mark.parametrize("args, message", [
    (["--image", "{d}/broken.png", "--checkpoint", "{d}/vit"], "is not an image Pillow can read"),
    (["--image", "{d}/odd.png", "--checkpoint", "{d}/vit"], "7"),
    (["--image", "{d}/digit.png", "--checkpoint", "{d}/vit", "--query", "x,y"], "--query must be cls"),
    (["--image", "{d}/digit.png"], "takes a ViT checkpoint"),
    ([], "give a sentence, or --image FILE"),
])
def test_viz_image_refuses_bad_input(files, capsys, args, message):
    code = cli.main(["viz", *[a.format(d=files) for a in args], "--out", str(files / "bad")])
    assert code == 2
    assert message in capsys.readouterr().err
