"""The embedding benchmark's pieces that need no timing: its sentences and its report."""

from __future__ import annotations

import pytest

from qkv.tools.bench import embed as bench_embed

tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def tokenizer():
    from qkv.embed import SentenceEncoder

    return SentenceEncoder.load().tokenizer


def test_sentences_cover_the_lengths_and_repeat_with_the_seed(tokenizer):
    sents = bench_embed.make_sentences(tokenizer, 40, min_tokens=5, max_tokens=60, seed=3)
    lengths = sorted(len(tokenizer.encode(s).ids) for s in sents)
    assert len(sents) == 40 and all(isinstance(s, str) for s in sents)
    assert lengths[0] <= 7 and lengths[-1] >= 55 and lengths[-1] <= 60    # spread over the range, never above it
    assert bench_embed.make_sentences(tokenizer, 40, min_tokens=5, max_tokens=60, seed=3) == sents
    assert bench_embed.make_sentences(tokenizer, 40, min_tokens=5, max_tokens=60, seed=4) != sents


def _result(qkv_s: float, st_s: float, tr_s: float) -> dict:
    rows = [{"contender": name, "seconds": s, "sentences_per_s": 256 / s, "max_abs_diff": d}
            for name, s, d in (("qkv padded", qkv_s, 1e-7), ("qkv packed", qkv_s, 1e-7),
                               ("qkv auto (default)", qkv_s, 2e-7), ("sentence-transformers", st_s, None),
                               ("transformers (model-card recipe)", tr_s, 1e-7))]
    for r in rows:
        r["vs_reference"], r["vs_transformers"] = st_s / r["seconds"], tr_s / r["seconds"]
    from qkv.tools.harness import machine_info

    result = {"machine": machine_info(), "quick": False,
              "embed": {"sentences": 256, "tokens": {"min": 5, "max": 120, "mean": 60.0, "total": 15360},
                        "batch": 32, "rows": rows, "reference": "sentence-transformers x", "dim": 384}}
    result["goals"] = bench_embed._goals(result)
    return result


@pytest.mark.parametrize("qkv_s,st_s,tr_s,verdicts", [(2.0, 4.0, 4.0, [True, True, True]),
                                                      (2.0, 2.2, 4.0, [False, True, True]),
                                                      (2.0, 2.0, 2.0, [False, False, True])])
def test_goals_follow_the_measurements(qkv_s, st_s, tr_s, verdicts):
    result = _result(qkv_s, st_s, tr_s)
    assert [g["met"] for g in result["goals"]] == verdicts
    text = bench_embed.render(result, markdown=True)
    assert "| qkv auto (default) |" in text and text.count("NOT met") == verdicts.count(False)
