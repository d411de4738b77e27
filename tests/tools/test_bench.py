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
    # fwd and fwd+bwd, in the main table and in the efficiency table
    assert sum(line.startswith("| causal | 256 | fwd") for line in md.splitlines()) == 4


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
            assert 0 < r["tiled_vs_bmm"] and r["tiled_live_gflops"] > 0
            assert r["live_tile_flops"] == 4 * bench.D * r["live_pairs"]
    assert result["matmul"]["gflops"] > 0


def test_tiny_run_efficiency_is_useful_flops_over_the_gemm_rate(tiny):
    _, result = tiny
    gemm = result["gemm"]
    assert gemm["n"] == bench.GEMM_N and gemm["flops"] == 2 * bench.GEMM_N ** 3 and gemm["op"] == "torch.mm"
    assert gemm["threads"] == torch.get_num_threads() and gemm["dtype"] == "float32"
    assert gemm["start"]["gflops"] > 0 and gemm["end"]["gflops"] > 0
    assert gemm["gflops"] == round((gemm["start"]["gflops"] + gemm["end"]["gflops"]) / 2, 2)
    L = 256
    for r in result["rows"]:
        # the allowed pairs of the case's mask, over batch and heads, the same in both passes
        dense = bench.make_case(r["case"], L).qkv_mask().to_dense(L, L)[0, 0]          # (L, L)
        assert r["allowed_pairs"] == int(dense.sum()) * bench.B * bench.H
        assert r["density"] == round(r["allowed_pairs"] / (bench.B * bench.H * L * L), 6)
        fwd_flops = 4 * bench.D * r["allowed_pairs"]
        assert r["useful_flops"] == (fwd_flops if r["pass"] == "fwd" else fwd_flops * 7 // 2)
        for name in bench.IMPLS:
            ms = r[f"{name}_ms"]
            if ms is None:  # flex is off here
                assert r[f"{name}_useful_gflops"] is None and r[f"{name}_vs_gemm"] is None
                continue
            gflops = r[f"{name}_useful_gflops"]
            assert gflops == round(r["useful_flops"] / (ms / 1e3) / 1e9, 2) and gflops > 0
            assert r[f"{name}_vs_gemm"] == round(gflops / gemm["gflops"], 3), (r["case"], r["pass"], name)
        if r["pass"] == "fwd":  # the old ratio: executed tiles over the attention-shaped bmm
            assert r["tiled_vs_bmm"] == round(r["tiled_live_gflops"] / result["matmul"]["gflops"], 3)
            assert r["live_pairs"] >= r["allowed_pairs"]
        else:
            assert "tiled_vs_bmm" not in r
    eff_goals = [g for g in result["goals"] if g["goal"].startswith("efficiency")]
    assert {(g["case"], g["pass"]) for g in eff_goals} == {(c, p) for c in ("causal", "document")
                                                           for p in bench.PASSES}
    for g in eff_goals:
        assert g["target"] == 0.75 and "square GEMM" in g["goal"]
        row = next(r for r in result["rows"] if (r["case"], r["pass"]) == (g["case"], g["pass"]))
        assert g["measured"] == row["tiled_vs_gemm"]

    for markdown in (False, True):
        text = bench.render(result, markdown=markdown)
        for column in ("tiled/gemm", "auto/gemm", "sdpa/gemm", "flex/gemm", "tiles/bmm", "allowed",
                       "useful GFLOP", "tiled GFLOP/s"):
            assert column in text, (markdown, column)
        assert f"GEMM rate (every 'X/gemm' divides by it): {gemm['gflops']:.1f} GFLOP/s" in text
        assert f"torch.mm ({bench.GEMM_N}, {bench.GEMM_N}) x ({bench.GEMM_N}, {bench.GEMM_N}) fp32" in text
        assert f"{gemm['threads']} torch threads" in text
        assert f"start {gemm['start']['gflops']:.1f} and end {gemm['end']['gflops']:.1f}" in text


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


def test_live_pairs_are_executed_tiles_not_allowed_pairs():
    # causal at L=256, 128x128 tiles: 3 live tiles of 128 x 128, of which L (L + 1) / 2 pairs may attend
    live, _ = bench.live_pairs(qkv.masks.causal(), 256, (128, 128))
    allowed = bench.allowed_pairs(qkv.masks.causal(), 256)
    assert allowed == 256 * 257 // 2 * bench.B * bench.H < live


@pytest.mark.parametrize("L", [300, 1024])
@pytest.mark.parametrize("name", bench.CASES)
def test_allowed_pairs_match_a_brute_force_count(name, L):
    mask = bench.make_case(name, L).qkv_mask()
    brute = int(mask.to_dense(L, L, B=bench.B, H=bench.H).sum())          # every (b, h, q, kv) element
    assert bench.allowed_pairs(mask, L) == brute
    # in bands of a few rows (the last one short), and with other batch and head counts
    assert bench.allowed_pairs(mask, L, chunk=7 * L) == brute
    assert bench.allowed_pairs(mask, L, batch=2, heads=3, chunk=5 * L + 1) == brute // (bench.B * bench.H) * 6


def test_allowed_pairs_count_masks_that_depend_on_batch_and_heads():
    valid = torch.tensor([300, 170])                                      # (2,) valid keys per batch
    mask = qkv.masks.padding(valid) & qkv.masks.causal()
    L = 300
    assert bench.allowed_pairs(mask, L, batch=2, heads=3, chunk=64 * L) == int(
        mask.to_dense(L, L, B=2, H=3).sum())


def test_useful_flops_count_two_matmuls_forward_and_3_5x_with_the_backward():
    assert bench.useful_flops(10, "fwd") == 4 * bench.D * 10
    assert bench.useful_flops(10, "fwd+bwd") == 14 * bench.D * 10
    assert bench.useful_flops(3, "fwd", d=32) == 3 * 4 * 32
    with pytest.raises(ValueError, match="unknown pass"):
        bench.useful_flops(10, "bwd")


def test_gemm_rate_is_a_square_matmul_of_2n3_flops():
    assert bench.gemm_flops(2048) == 2 * 2048 ** 3 and bench.gemm_flops(3) == 54
    rate = bench.gemm_rate(0.05, n=128)
    assert rate["flops"] == 2 * 128 ** 3 and rate["shape"] == "(128, 128) x (128, 128)"
    assert rate["gflops"] > 0 and rate["ms"] > 0 and rate["runs"] >= 1
    assert rate["threads"] == torch.get_num_threads() and rate["op"] == "torch.mm"


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
