"""`qkv bench gpu` without a GPU: its refusal, its cases, its arithmetic, its report and its worker machinery.

Legend: B batch, H heads, L sequence length (Lq = Lk), D head dim, Lk_live average allowed keys per row.

Nothing here times anything for pass/fail: the numbers in the synthetic results are made up, and
the CPU runs only check that the machinery (worker process, rows, tables) holds together.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import qkv
from qkv import cli
from qkv.tools.bench import gpu
from qkv.tools.bench import gpu_cases as cases


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ----------------------------------------------------------------------------
# No GPU: one line, a nonzero status
# ----------------------------------------------------------------------------

def test_without_cuda_the_command_says_so_on_one_line(no_cuda, tmp_path, capsys):
    code = cli.main(["bench", "gpu", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and "needs a CUDA GPU" in err[0] and "TRITON_INTERPRET=1" in err[0]
    assert err[0].startswith("qkv bench: error: ")
    assert not list(tmp_path.iterdir())                                   # nothing measured, nothing written


def test_without_cuda_the_script_is_a_usage_error(no_cuda, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu.main(["--quick", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert gpu.NO_GPU in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without CUDA")
def test_without_cuda_a_fresh_process_exits_nonzero_without_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "qkv", "bench", "gpu"], capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and len(lines) == 1 and "needs a CUDA GPU" in lines[0]


# ----------------------------------------------------------------------------
# The cases
# ----------------------------------------------------------------------------

def test_the_full_plan_runs_the_goal_cases_first_and_covers_the_sweep():
    specs = gpu.plan()
    keys = [s["key"] for s in specs]
    assert len(keys) == len(set(keys))
    assert keys[0] == "hbm/start" and keys[-1] == "hbm/end"
    assert keys[1:3] == ["attn/dense/L16384/D128", "attn/causal/L16384/D128"]
    attn = [s for s in specs if s["kind"] == "attn"]
    goal = {s["mask"] for s in attn if s["goal"]}
    assert goal == set(gpu.MASKS)
    assert all(s["flex"] and s["L"] == 16384 and s["D"] == 128 for s in attn if s["goal"])
    assert not any(s["flex"] for s in attn if not s["goal"])             # Flex compiles per case: goals only
    for s in attn:
        assert s["H"] * s["D"] == 2048
        assert s["B"] * s["L"] == (16384 if s["L"] <= 16384 else s["L"])
    shapes = {(s["mask"], s["L"], s["D"]) for s in attn}
    assert shapes >= {(m, L, D) for m in ("dense", "causal") for L in cases.LENGTHS for D in cases.HEAD_DIMS}
    decode = [s for s in specs if s["kind"] == "decode"]
    assert [(s["L"], s["B"]) for s in decode] == [(1024, 8), (4096, 8), (16384, 8), (65536, 1), (131072, 1)]
    assert all((s["Hq"], s["Hkv"], s["D"]) == (32, 8, 128) for s in decode)
    first = [s for s in specs if s["kind"] == "first"]
    assert len(first) == 1 and first[0]["flex"] and first[0]["L"] == 4096
    # every goal case comes before every sweep case
    last_goal = max(i for i, s in enumerate(specs) if s.get("goal"))
    assert all(i > last_goal for i, s in enumerate(specs) if s["kind"] == "attn" and not s["goal"])


def test_quick_and_the_switches_shrink_the_plan():
    quick = gpu.plan(quick=True)
    assert len(quick) < 15
    assert all(s["L"] <= 4096 for s in quick if s["kind"] in ("attn", "decode"))
    assert [s["mask"] for s in quick if s.get("flex")] == ["causal"]
    assert [s["flex"] for s in quick if s["kind"] == "first"] == [False]
    assert not any(s.get("flex") for s in gpu.plan(flex=False))
    assert not any(s["kind"] == "first" for s in gpu.plan(first_call=False))


# ----------------------------------------------------------------------------
# Allowed pairs, Lk_live, FLOPs
# ----------------------------------------------------------------------------

def _brute(mask, L: int, batch: int) -> int:
    if mask is None:
        return batch * L * L
    dense = mask.to_dense(L, L, B=batch)                                   # (B' , H', L, L), broadcast view
    return int(dense.expand(batch, dense.shape[1], L, L)[:, 0].sum())


def test_lk_live_of_causal_is_l_plus_one_over_two():
    L = 8
    pairs = gpu.allowed_pairs(qkv.masks.causal(), L, L)
    assert pairs == L * (L + 1) // 2
    assert gpu.lk_live(pairs, 1, L) == (L + 1) / 2


@pytest.mark.parametrize("name", cases.MASKS)
def test_allowed_pairs_match_a_brute_force_count(name):
    L, B, H = 64, 3, 4
    kwargs = gpu.qkv_kwargs(name, L, H, window=5, n_docs=4)
    mask = gpu.mask_of(kwargs)
    assert gpu.allowed_pairs(mask, L, L, batch=B) == _brute(mask, L, B)


def test_sliding_window_and_document_counts_are_exact():
    L, w = 64, 5
    pairs = gpu.allowed_pairs(qkv.masks.sliding_window(w), L, L)
    assert pairs == sum(min(q + 1, w) for q in range(L))                   # row q sees min(q + 1, w) keys
    ids = torch.tensor([0] * 10 + [1] * 30 + [2] * 24)
    doc = qkv.masks.document(ids) & qkv.masks.causal()
    assert gpu.allowed_pairs(doc, L, L, batch=2) == 2 * sum(n * (n + 1) // 2 for n in (10, 30, 24))


def test_masks_without_row_ranges_are_counted_by_evaluation():
    L = 48
    mask = qkv.masks.sliding_window(4) | qkv.masks.prefix_lm(6)            # a union: no single interval per row
    assert mask.row_ranges(torch.arange(L), L) is None
    assert gpu.allowed_pairs(mask, L, L, batch=2) == _brute(mask, L, 2)


def test_flops_and_tflops_arithmetic():
    B, H, L, D = 2, 16, 1024, 128
    pairs = gpu.allowed_pairs(qkv.masks.causal(), L, L, batch=B)
    live = gpu.lk_live(pairs, B, L)
    fwd = gpu.attention_flops(pairs, H, D, "fwd")
    assert fwd == pytest.approx(4 * B * H * L * live * D)
    assert gpu.attention_flops(pairs, H, D, "bwd") == pytest.approx(2.5 * fwd)
    assert gpu.attention_flops(pairs, H, D, "fwd+bwd") == pytest.approx(3.5 * fwd)
    with pytest.raises(ValueError, match="unknown pass"):
        gpu.attention_flops(pairs, H, D, "backward")
    assert gpu.tflops(2e12, 1000.0) == pytest.approx(2.0)                  # 2e12 FLOP in 1 s
    assert gpu.tflops(1e12, 0.0) is None and gpu.tflops(None, 1.0) is None
    row = gpu.attn_row(cases._attn_spec("causal", L, D, goal=False, flex=False, tokens=B * L))
    assert (row["B"], row["H"]) == (B, H) and row["pairs"] == pairs and row["lk_live"] == pytest.approx((L + 1) / 2)
    assert row["flops"]["fwd"] == pytest.approx(fwd)


def test_decode_bytes_are_k_and_v_in_bf16():
    row = gpu.decode_row({"kind": "decode", "key": "d", "L": 4096, "B": 8, "Hq": 32, "Hkv": 8, "D": 128, "page": 16})
    assert row["kv_bytes"] == 2 * 8 * 8 * 4096 * 128 * 2


@pytest.mark.parametrize("name", cases.MASKS)
def test_flex_spells_the_same_problem(name):
    L, H = 40, 4
    kwargs = gpu.qkv_kwargs(name, L, H, window=5, n_docs=4)
    mask_mod, score_mod = gpu.flex_mods(name, L, H, window=5, n_docs=4)
    b, h = torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.arange(H).view(1, H, 1, 1)
    q, kv = torch.arange(L).view(1, 1, L, 1), torch.arange(L).view(1, 1, 1, L)
    mask = gpu.mask_of(kwargs)
    if mask is None:
        assert mask_mod is None
    else:
        assert torch.equal(mask_mod(b, h, q, kv).expand(1, 1, L, L), mask.to_dense(L, L)[:1, :1].expand(1, 1, L, L))
    theirs = kwargs.get("score_mod")
    assert (score_mod is None) == (theirs is None)
    if theirs is not None:
        score = torch.randn(1, H, L, L) * 40
        assert torch.allclose(score_mod(score, b, h, q, kv), theirs(score, b, h, q, kv), atol=1e-5)


# ----------------------------------------------------------------------------
# The report: derived numbers, goals (met / not met), tables, files
# ----------------------------------------------------------------------------

def _cell(fwd_ms, both_ms):
    return {"via": "x", "fwd": {"ms": fwd_ms, "runs": 5, "first_ms": 1.0},
            "fwd+bwd": {"ms": both_ms, "runs": 5, "first_ms": 2.0}}


def _attn(mask, qkv_ms, flex_ms=None):
    row = gpu.attn_row(cases._attn_spec(mask, 256, 128, goal=True, flex=True, tokens=256))
    row["cells"] = {name: {"na": "takes no mask but causal"} for name in gpu.CONTENDERS}
    row["cells"]["qkv"] = _cell(*qkv_ms)
    if flex_ms is not None:
        row["cells"]["flex"] = _cell(*flex_ms)
    row["cells"]["sdpa_cudnn"] = {"error": "RuntimeError: no kernel"}
    return row


def _synthetic(*, fast: bool) -> dict:
    """Rows as the workers write them, fast (every goal met) or slow (every goal missed)."""
    k = 1.0 if fast else 1e3                                              # slow: 1000x the times
    rows = [{"kind": "hbm", "key": "hbm/start", "bytes": 1, "gbps": 3000.0},
            {"kind": "hbm", "key": "hbm/end", "bytes": 1, "gbps": 2800.0}]
    flops = {m: gpu.attn_row(cases._attn_spec(m, 256, 128, goal=True, flex=True, tokens=256))["flops"]
             for m in gpu.MASKS}
    for m in gpu.MASKS:
        fwd_ms = flops[m]["fwd"] / 500e12 * 1e3 * k                        # 500 TFLOP/s when fast
        both_ms = fwd_ms + flops[m]["bwd"] / 300e12 * 1e3 * k              # backward at 300 TFLOP/s
        if m == "sliding_window":
            speedup = 10 if fast else 1                                    # over causal's times
            fwd_ms, both_ms = (t / speedup for t in (flops["causal"]["fwd"] / 500e12 * 1e3 * k,
                                                    flops["causal"]["fwd+bwd"] / 400e12 * 1e3 * k))
        flex = (fwd_ms * 2, both_ms * 2) if fast else (fwd_ms / 2e3, both_ms / 2e3)
        rows.append(_attn(m, (fwd_ms, both_ms), flex))
    for L in (1024, 4096):
        r = gpu.decode_row({"kind": "decode", "key": f"decode/L{L}", "L": L, "B": 8, "Hq": 32, "Hkv": 8, "D": 128,
                            "page": 16})
        full = r["kv_bytes"] / 2900e6                                     # ms at 2900 GB/s
        r["cells"] = {"paged": {"ms": full if fast else full * 3}, "contiguous": {"ms": full},
                      "sdpa": {"ms": full * 2}}
        rows.append(r)
    first = [{"impl": "qkv", "cache": "cold", "first_s": 3.0 if fast else 30.0},
             {"impl": "qkv", "cache": "warm", "first_s": 0.5},
             {"impl": "flex", "cache": "cold", "first_s": 40.0},
             {"impl": "flex", "cache": "warm", "error": "exit status 1: boom"}]
    rows.append({"kind": "first", "key": "first", "runs": first})
    rows.append({**cases._attn_spec("causal", 32768, 64, goal=False, flex=False), "skipped": "budget spent"})
    info = {"cpu": "test", "cpu_count": 1, "usable_cores": 1, "torch_threads": 1, "torch": "t", "numpy": "n",
            "numba": "-", "python": "p", "qkv": "q"}
    return gpu.assemble(rows, {"device": "cuda:0"}, info, quick=False, budget_s=100.0, seconds=12.0)


def test_derived_numbers():
    result = _synthetic(fast=True)
    assert result["hbm"]["gbps"] == pytest.approx(2900.0)
    dense = next(r for r in result["attention"] if r["mask"] == "dense")
    qkv_cell = dense["cells"]["qkv"]
    assert qkv_cell["fwd"]["tflops"] == pytest.approx(500.0, rel=1e-3)
    assert qkv_cell["bwd"]["ms"] == pytest.approx(qkv_cell["fwd+bwd"]["ms"] - qkv_cell["fwd"]["ms"], abs=1e-3)
    assert qkv_cell["bwd"]["tflops"] == pytest.approx(300.0, rel=1e-2)
    assert dense["vs_flex"]["fwd"] == pytest.approx(2.0, rel=1e-2)
    dec = result["decode"][-1]
    assert dec["cells"]["paged"]["hbm_frac"] == pytest.approx(1.0, rel=1e-2)
    assert dec["paged_vs_contiguous"] == pytest.approx(1.0) and dec["paged_vs_sdpa"] == pytest.approx(2.0)
    assert result["skipped"] == ["attn/causal/L32768/D64"]


@pytest.mark.parametrize("fast", [True, False])
def test_goals_follow_the_measurements(fast):
    result = _synthetic(fast=fast)
    goals = result["goals"]
    names = {g["goal"] for g in goals}
    assert {"forward >= 400 TFLOP/s, non-causal", "forward >= 350 TFLOP/s, causal", "backward >= 250 TFLOP/s",
            "first call (JIT included) < 10 s", "paged decode >= 70% of HBM bandwidth"} <= names
    flex_goals = [g for g in goals if "FlexAttention" in g["goal"]]
    assert {g["case"] for g in flex_goals} == set(gpu.MASKS) and len(flex_goals) == 2 * len(gpu.MASKS)
    decode_goals = [g for g in goals if g["case"].startswith("decode")]
    assert {g["case"] for g in decode_goals} == {"decode L=4096"}            # judged at L >= 4k only
    assert [g["met"] for g in goals] == [fast] * len(goals)
    text = gpu.render(result, markdown=True)
    assert text.count("| NOT met |") == (0 if fast else len(goals))
    assert text.count("| met |") == (len(goals) if fast else 0)


def test_the_tables_name_errors_and_skips(tmp_path):
    result = _synthetic(fast=True)
    text = gpu.render(result, markdown=True)
    plain = gpu.render(result)
    assert "err[" in text and "RuntimeError: no kernel" in text          # the error cell and its note
    assert "n/a[" in text and "takes no mask but causal" in text
    assert "exit status 1: boom" in text                                  # the first call's failed run
    assert "skipped for the budget" in text and "attn/causal/L32768/D64" in text
    assert "| dense | 256 |" in text and "prefill (TFLOP/s):" in plain
    json_path, md_path = gpu.write_results(result, tmp_path, "gpu", gpu.render, lambda s: None)
    assert json.loads(json_path.read_text())["goals"] == result["goals"]
    assert md_path.read_text().startswith("# qkv GPU benchmark")


# ----------------------------------------------------------------------------
# The machinery: timing, workers, a whole run on the CPU
# ----------------------------------------------------------------------------

def test_time_call_reports_the_median_of_bounded_runs():
    calls = []
    out, ms, runs, first_ms = gpu.time_call(lambda: calls.append(time.sleep(0.002)) or len(calls), "cpu",
                                            max_s=0.05, min_runs=3, max_runs=8, warmup=1)
    assert out == 1                                                       # the first call's result
    assert 3 <= runs <= 8 and len(calls) == 1 + 1 + runs
    assert 1.5 <= ms < 50 and first_ms >= 1.5


_FAKE_WORKER = textwrap.dedent("""
    import json, sys
    job = json.load(open(sys.argv[1]))
    with open(job["rows"], "a") as out:
        out.write(json.dumps({"key": "machine", "kind": "machine", "device": "fake"}) + "\\n")
        for spec in job["specs"]:
            if spec["key"] == "crash" and not spec.get("seen"):
                sys.exit(7)                                     # dies inside the case, no row
            out.write(json.dumps({**spec, "done": True, "lost": spec["key"] == "lost"}) + "\\n")
            out.flush()
            if spec["key"] == "lost":
                sys.exit(3)                                     # a lost context: its row was written
""")


def test_drive_restarts_a_worker_after_the_case_it_died_in():
    specs = [{"kind": "attn", "key": k} for k in ("a", "crash", "b", "lost", "c")]
    logged = []
    rows, machine = gpu.drive(specs, deadline=time.time() + 60, device="cpu", log=logged.append,
                              command=[sys.executable, "-c", _FAKE_WORKER])
    assert [r["key"] for r in rows] == ["a", "crash", "b", "lost", "c"]
    assert "exit status 7" in rows[1]["error"] and "done" not in rows[1]
    assert all(rows[i].get("done") for i in (0, 2, 3, 4))
    assert machine == {"device": "fake"}
    assert sum("starting a new one" in line for line in logged) == 2


def test_drive_marks_what_the_budget_left_out():
    specs = [{"kind": "attn", "key": "a"}]
    rows, _ = gpu.drive(specs, deadline=time.time() - 1, device="cpu", log=lambda s: None,
                        command=[sys.executable, "-c", _FAKE_WORKER])
    assert rows == [{"kind": "attn", "key": "a", "skipped": "budget spent"}]


def test_a_tiny_run_on_the_cpu_goes_through_the_worker(tmp_path):
    spec = cases._attn_spec("causal", 32, 16, goal=True, flex=False)
    spec.update(B=1, H=2)
    specs = [{"kind": "hbm", "key": "hbm/start", "bytes": 1 << 20}, spec]
    result = gpu.run(tmp_path, device="cpu", specs=specs, budget_s=120, verbose=False)
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["benchmark"] == "gpu" and saved["hbm"]["gbps"] > 0
    row = result["attention"][0]
    assert set(row["cells"]) == set(gpu.CONTENDERS)
    for name, cell in row["cells"].items():
        assert set(cell) & {"fwd", "na", "error", "skipped"}, name       # a number or a reason, never nothing
    assert row["cells"]["flex"].get("na", "").startswith("not run")
    flash = row["cells"]["sdpa_flash"]                                    # torch's CPU flash kernel
    assert "error" in flash or flash["fwd"]["ms"] > 0
    assert "| causal | 32 |" in (tmp_path / "gpu.md").read_text()


def test_the_first_call_runs_in_fresh_processes_cold_then_warm():
    pytest.importorskip("triton")
    spec = {"kind": "first", "key": "first", "L": 32, "B": 1, "H": 2, "D": 16, "flex": False, "device": "cpu"}
    row = gpu._first_case(spec, time.time() + 300, lambda s: None)
    assert [(r["impl"], r["cache"]) for r in row["runs"]] == [("qkv", "cold"), ("qkv", "warm")]
    for r in row["runs"]:                    # the triton backend on the CPU needs TRITON_INTERPRET=1 (conftest)
        assert ("first_s" in r and r["first_s"] > 0 and r["process_s"] >= r["first_s"]) or "error" in r
    assert "first_s" in row["runs"][0] or "TRITON_INTERPRET" not in os.environ
