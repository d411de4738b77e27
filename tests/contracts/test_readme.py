"""The README's claims that code can check: its tour runs, its capability table is current."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import qkv

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_the_python_tour_runs(capsys):
    code = re.findall(r"```python\n(.*?)```", README, re.S)
    assert code, "README has no python block"
    namespace: dict = {}
    exec(compile(code[0], "README.md", "exec"), namespace)
    assert namespace["out"].shape == (2, 8, 1024, 64)
    assert namespace["w_rows"].shape == (2, 8, 3, 1024)
    assert "tiled" in capsys.readouterr().out


def test_the_generation_tour_runs(capsys):
    code = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(code) >= 2, "README has no generation block"
    namespace: dict = {}
    exec(compile(code[1], "README.md", "exec"), namespace)
    assert len(namespace["new"]) == 8 and len(namespace["sampled"]) == 8
    assert [len(b) for b in namespace["batch"]] == [8, 8]
    assert namespace["logits"].shape == (1, 1, 1000)
    assert namespace["cache"].lengths.tolist() == [4]


def test_the_encoder_tour_runs(capsys):
    code = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(code) >= 3, "README has no encoder block"
    namespace: dict = {}
    exec(compile(code[2], "README.md", "exec"), namespace)
    assert namespace["vectors"].shape == (2, 384)
    assert namespace["h"].shape == (2, 7, 64)
    assert float(namespace["h"][1, 4:].detach().abs().max()) == 0.0   # packed: zeros at the padding
    assert 0.0 <= namespace["result"].accuracy <= 1.0


def test_the_transformers_tour_runs(capsys):
    pytest.importorskip("transformers")
    code = [c for c in re.findall(r"```python\n(.*?)```", README, re.S) if 'attn_implementation="qkv"' in c]
    assert code, "README has no transformers block"
    namespace: dict = {}
    exec(compile(code[0], "README.md", "exec"), namespace)     # a config with random weights: no download
    assert namespace["logits"].shape == (2, 6, 1000) and namespace["new"].shape == (2, 14)
    model, packed, torch = namespace["model"], namespace["packed"], namespace["torch"]
    assert packed.shape == (1, 10, 1000)
    with torch.no_grad():                                       # the second document (tokens 5, 6, 7) alone
        alone = model(torch.tensor([[5, 6, 7]])).logits
    assert float((packed[0, 4:7] - alone[0]).detach().abs().max()) < 1e-4
    assert [w.shape for w in namespace["weights"]] == [(2, 4, 6, 6)] * 2
    assert model.config._attn_implementation == "qkv"
    assert "['model.layers.1.self_attn']" in capsys.readouterr().out


def test_capability_table_is_current():
    assert qkv.backends.list().markdown() in README


def test_two_commands_are_documented():
    assert "make demo" in README and "make test" in README
