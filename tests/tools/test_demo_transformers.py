"""The demo's transformers step: a Llama built by transformers, run through attn_implementation="qkv".

It is run on its own (the whole tour is `test_cli.py`'s): what it prints, in order, and that its
logits equal eager attention's; then its failure modes: no tokenizer, no transformers, a mismatch.
"""

from __future__ import annotations

import re
import sys

import pytest

pytest.importorskip("transformers")

from qkv import embed  # noqa: E402
from qkv.tools import demo  # noqa: E402

TOP = re.compile(r"^    (\d\.\d{3})  (.+) \(position (\d+)\)$")


def _top_lines(out: str) -> list[tuple[float, str, int]]:
    return [(float(m[1]), m[2], int(m[3])) for m in map(TOP.match, out.splitlines()) if m]


def test_the_step_is_in_the_tour():
    step = next(s for s in demo.STEPS if s.key == "transformers")
    assert step.fn is demo._transformers and 'attn_implementation="qkv"' in step.title


def test_the_step_prints_logits_against_eager_and_the_last_tokens_top_keys(capsys):
    data, md = demo._transformers(True)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("LlamaForCausalLM from a config, random weights (seed 0, nothing downloaded)")
    assert 'attn_implementation="qkv"' in lines[1]
    assert lines[2].startswith(f"  {len(data['tokens'])} tokens from all-MiniLM-L6-v2's WordPiece tokenizer")
    assert lines[2].endswith(" ".join(data["tokens"]))
    assert data["tokens"][-1] == "tired" and "[CLS]" not in data["tokens"] and "[PAD]" not in data["tokens"]

    # logits: the same model on eager attention, to float32 rounding
    m = re.search(r'"qkv" vs the same model on attn_implementation="eager": max \|diff\| (\S+) '
                  r"\(largest logit (\S+)\): match$", lines[3])
    assert m, lines[3]
    assert data["logits_match"] is True
    assert float(m[1]) == pytest.approx(data["logits_max_abs_diff"], rel=0.1)
    assert data["logits_max_abs_diff"] <= 1e-4 * data["logits_max_abs"]

    # qkv.inspect.capture on the last layer, last row: five keys, heaviest first, as text
    assert "qkv.inspect.capture(model, layers=[-1], rows=[-1]) on model.layers.1.self_attn" in lines[4]
    assert f"the last token 'tired' (position {len(data['tokens']) - 1})" in lines[4]
    top = _top_lines(out)
    assert len(top) == 5 and top == [(round(r["weight"], 3), repr(r["token"]), r["position"]) for r in data["top"]]
    weights = [w for w, _, _ in top]
    assert weights == sorted(weights, reverse=True) and 0 < sum(weights) <= 1.0 + 1e-3
    assert all(repr(data["tokens"][pos]) == tok for _, tok, pos in top)
    assert data["weights_vs_eager_max_abs_diff"] < 1e-5      # the captured weights are eager's
    assert lines[-1].startswith("  (random weights")
    assert md.startswith("```\n") and lines[3] in md


def test_without_minilms_tokenizer_the_words_are_the_tokens(capsys, monkeypatch):
    def missing():
        raise embed.PretrainedNotInstalled("not installed")

    monkeypatch.setattr(embed, "default_model_path", missing)
    data, _ = demo._transformers(True)
    out = capsys.readouterr().out
    assert data["tokens"] == demo.HF_SENTENCE.split() and data["ids"][:2] == [0, 1]
    assert "the words of the sentence, numbered in order" in out and data["logits_match"]
    assert len(_top_lines(out)) == 5


def test_without_transformers_the_step_says_so_and_skips(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)      # `import transformers` raises ImportError
    data, md = demo._transformers(True)
    out = capsys.readouterr().out
    assert out.startswith("skipped: qkv's transformers integration cannot be imported")
    assert data == {"skipped": md}


def test_logits_that_disagree_with_eager_fail_the_step(capsys, monkeypatch):
    monkeypatch.setattr(demo, "HF_LOGITS_REL", -1.0)             # no difference is small enough
    with pytest.raises(RuntimeError, match="away from eager's"):
        demo._transformers(True)
    assert "MISMATCH (bug!)" in capsys.readouterr().out
