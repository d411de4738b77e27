"""`qkv bench attention` (qkv.tools.bench.attention): runs in a tiny configuration and writes what it promises.

Legend: B batch, H heads, L sequence length, D head dim.

Timings are never checked for speed here, only that they were measured, are
positive and were written; agreement between the contenders is checked.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

import qkv
from qkv import cli
from qkv.tools.bench import attention as bench
from qkv.tools.bench import backends


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The benchmark at L=256 on two cases, Flex and the memory case skipped."""
    out = tmp_path_factory.mktemp("bench")
    result = bench.run(out, lengths=(256,), cases=("causal", "document"), flex=False, memory=False,
                       budget_s=0.2, verbose=False)
    return out, result


def test_tiny_run_writes_json_and_markdown(tiny):
    out, result = tiny
    assert sorted(p.name for p in out.iterdir()) == ["attention.json", "attention.md"]  # atomic: no temp files
    written = json.loads((out / "attention.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert written["benchmark"] == "attention" and written["machine"]["torch"] == torch.__version__
    assert written["config"]["lengths"] == [256] and written["config"]["goal_length"] == 256
    assert written["flex"]["status"].startswith("skipped") and written["memory"] == {"skipped": "--no-memory"}
    doc_lengths = written["config"]["case_info"]["document"]["256"]["doc_lengths"]
    assert len(doc_lengths) == bench.N_DOCS and sum(doc_lengths) == 256 and min(doc_lengths) >= 1

    md = (out / "attention.md").read_text()
    assert md.startswith("# qkv attention benchmark")
    assert sum(line.startswith("| causal | 256 | fwd") for line in md.splitlines()) == 2  # fwd and fwd+bwd


def test_tiny_run_measures_every_cell(tiny):
    _, result = tiny
    rows = result["rows"]
    assert {(r["case"], r["pass"]) for r in rows} == {(c, p) for c in ("causal", "document") for p in bench.PASSES}
    for r in rows:
        for name in ("tiled", "auto", "sdpa"):
            assert r[f"{name}_ms"] > 0 and r[f"{name}_runs"] >= 1, (r["case"], r["pass"], name)
        assert r["speedup_vs_sdpa"] > 0 and r["auto_vs_sdpa"] > 0
        assert r["flex_ms"] is None and r["speedup_vs_flex"] is None and "skipped" in r["flex_error"]
        # sdpa gets a dense mask only where the mask is not plain causal, and it is timed apart
        assert (r["sdpa_mask_ms"] is None) == (r["case"] == "causal")
        if r["pass"] == "fwd":
            assert r["qkv_first_ms"] > 0 and r["qkv_block_mask_ms"] > 0 and r["first_call_ratio"] is None
            assert 0 < r["efficiency"] and r["tiled_gflops"] > 0
            assert r["tiled_flops"] == 4 * bench.D * r["live_pairs"]
    assert result["matmul"]["gflops"] > 0


def test_tiny_run_agrees_and_states_goals(tiny):
    _, result = tiny
    agreement = result["agreement"]
    assert set(agreement) == {"causal", "document"}
    for case, a in agreement.items():
        assert a["agree"] is True and a["L"] == 256, case
        for key in ("tiled", "auto", "tiled_grads", "auto_grads"):
            assert 0 <= a[key] < 1e-4, (case, key)
        assert a["flex"] is None

    goals = result["goals"]
    assert {g["case"] for g in goals} == {"causal", "document"}
    for g in goals:
        assert g["L"] == 256 and g["met"] in (True, False, None)
        if g["measured"] is not None:
            assert g["measured"] > 0 and g["met"] == (g["measured"] >= g["target"])
    flex_goals = [g for g in goals if "Flex" in g["goal"]]
    assert flex_goals and all(g["met"] is None for g in flex_goals)  # not measured, not judged
    text = bench.render(result)
    assert "goals (judged at L = 256)" in text
    assert text.count("NOT met") == sum(g["met"] is False for g in goals)


def test_live_pairs_counts_the_tiles_tiled_executes():
    # causal at L=256, 128x128 tiles: 2 diagonal (PARTIAL) tiles and 1 FULL tile below them
    pairs, tiles = bench.live_pairs(qkv.masks.causal(), 256, (128, 128))
    assert tiles == {"EMPTY": 1, "PARTIAL": 2, "FULL": 1}
    assert pairs == 3 * 128 * 128 * bench.H * bench.B
    # a length that is not a multiple of the tile: the last row and column of tiles are clipped
    pairs, _ = bench.live_pairs(qkv.masks.causal(), 200, (128, 128))
    assert pairs == (128 * 128 + 72 * 128 + 72 * 72) * bench.H


@pytest.mark.parametrize("name", bench.CASES)
def test_flex_mask_mods_spell_the_same_masks(name):
    L = 2304  # longer than the window and the prefix, so they matter
    case = bench.make_case(name, L)
    pos = torch.arange(L)
    flex_dense = case.flex_mask_mod(0, 0, pos.view(-1, 1), pos.view(1, -1))          # (L, L)
    assert torch.equal(flex_dense, case.qkv_mask().to_dense(L, L)[0, 0])


def test_document_ids_are_sorted_seeded_and_non_empty():
    ids = bench.document_ids(1000, 8, seed=3)
    assert torch.equal(ids, bench.document_ids(1000, 8, seed=3))
    assert ids[0] == 0 and ids[-1] == 7 and bool((ids[1:] - ids[:-1] >= 0).all())
    assert torch.bincount(ids).min() >= 1
    with pytest.raises(ValueError, match="L must be at least"):
        bench.document_ids(4, 8)


def test_measure_takes_one_call_when_it_eats_the_budget():
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.06)
        return "x"

    res, ms, runs, first_ms = bench.measure(slow, budget_s=0.1)
    assert (res, runs, len(calls)) == ("x", 1, 1) and ms == first_ms >= 60
    calls.clear()
    res, ms, runs, _ = bench.measure(lambda: calls.append(1) or "y", budget_s=0.5, max_runs=4)
    assert res == "y" and runs == 4 and len(calls) == 5  # a warm-up, then max_runs timed calls


def test_memory_case_runs_in_a_fresh_process():
    mem = bench.memory_case(512, timeout_s=120)
    assert "error" not in mem, mem
    assert mem["L"] == 512 and mem["fwd_bwd_ms"] > 0
    assert mem["tensor_bytes"] == 8 * bench.B * bench.H * 512 * bench.D * 4
    assert mem["peak_rss_bytes"] >= mem["baseline_rss_bytes"] > 0 and mem["ru_maxrss_bytes"] > 0
    # the peak is this child's own: not ru_maxrss, which a vfork + exec child inherits from its parent
    assert mem["peak_source"].startswith("VmHWM") or not os.path.exists("/proc/self/clear_refs")
    assert mem["extra_ratio"] == round(mem["extra_bytes"] / mem["tensor_bytes"], 3)


def test_cli_bench_attention_calls_the_benchmark(monkeypatch, tmp_path, capsys):
    seen = {}
    monkeypatch.setattr(bench, "run", lambda out, **kw: seen.update(out=out, **kw))
    code = cli.main(["bench", "attention", "--lengths", "256", "512", "--no-flex", "--no-memory",
                     "--out", str(tmp_path)])
    assert code == 0
    assert seen == {"out": str(tmp_path), "quick": False, "lengths": [256, 512], "flex": False, "memory": False}

    # `qkv bench` alone keeps running the math-vs-sdpa benchmark; the attention flags are refused there
    monkeypatch.setattr(backends, "run", lambda out, quick=False: seen.update(backends=(out, quick)))
    assert cli.main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    assert seen["backends"] == (str(tmp_path), True)
    assert cli.main(["bench", "--lengths", "256"]) == 2
    assert "belong to `qkv bench attention`" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["backends", "generate", "embed", "train", "approx"])
def test_cli_bench_runs_the_tool_of_its_target(monkeypatch, tmp_path, what):
    import importlib

    module = importlib.import_module(f"qkv.tools.bench.{what}")
    seen = {}
    monkeypatch.setattr(module, "run", lambda out, quick=False: seen.update(out=out, quick=quick))
    assert cli.main(["bench", what, "--quick", "--out", str(tmp_path)]) == 0
    assert seen == {"out": str(tmp_path), "quick": True}
