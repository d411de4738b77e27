"""`qkv bench context` (qkv.tools.bench.context): a tiny run writes what it promises, and the model
on paper follows from its own inputs.

Legend: L sequence length, N ranks, Lr = L / N, s / g bytes per element of K/V / of a gradient,
R FLOP/s, BW bytes/s.

The tests that read the run are marked slow (eight fresh processes, 15-25 s together).
Timings and goals are never judged here (the machine may be busy): only that every figure was
measured, is a positive finite number and was written; that the messages and bytes the ranks
report are the ring's on paper; and that every predicted length and wait is the formula applied
to the inputs the result records.
"""

from __future__ import annotations

import json
import math

import pytest

from qkv import cli
from qkv.tools.bench import context as bench

L = 1024


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_context")
    return out, bench.run(out, quick=True, lengths=[L], masks=("causal",), verbose=False)


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.mark.slow          # the run: 15-25 s (five setups, eight processes)
def test_writes_json_and_markdown(quick):
    out, result = quick
    assert sorted(p.name for p in out.iterdir()) == ["context.json", "context.md"]
    written = json.loads((out / "context.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert written["benchmark"] == "context" and written["quick"] is True
    assert written["config"]["lengths"] == [L] and written["config"]["masks"] == ["causal"]
    md = (out / "context.md").read_text()
    assert md.startswith("# qkv context-parallel benchmark (quick)")
    for heading in ("## Context parallelism on this machine", "## Traffic, waiting and the model", "## Goals",
                    "## Model on paper", "## Predictions on paper for H100s (not measurements)"):
        assert heading in md
    for setup in bench.SETUPS:
        assert f"| causal | {L} | {setup} |" in md
    text = bench.render(result)
    assert text.count("NOT met") == sum(g["met"] is False for g in result["goals"])


@pytest.mark.slow          # the run: 15-25 s (five setups, eight processes)
def test_every_setup_measured_with_positive_finite_figures(quick):
    _, result = quick
    rows = result["rows"]
    assert [r["setup"] for r in rows] == list(bench.SETUPS)
    for r in rows:
        assert "error" not in r, r.get("error")
        assert _positive_finite(r["fwd_ms"]) and _positive_finite(r["fwd_bwd_ms"])
        for p in bench.PASSES:
            s = r["passes"][p]
            assert 1 <= s["reps"] <= bench.QUICK_RULES["max_reps"] and s["ms"] == min(s["call_ms"])
            assert len(s["rank_ms"]) == r["ranks"] and max(s["rank_ms"]) <= s["ms"] + 0.1
            for key in ("device_eff", "machine_eff", "mem_vs_single", "peak_mib"):
                assert _positive_finite(r[key][p]), (r["setup"], key, p, r[key][p])
            assert all(_positive_finite(x) for x in r["rate_gflops_ranks"][p])
            assert all(x >= 0 for x in s["wait_ms"]) and all(x > 0 for x in s["cpu_share_ranks"])
    one = rows[0]
    assert one["device_eff"] == {"fwd": 1.0, "fwd+bwd": 1.0} and one["mem_vs_single"] == {"fwd": 1.0, "fwd+bwd": 1.0}
    assert rows[1]["machine_eff"] == {"fwd": 1.0, "fwd+bwd": 1.0}
    for r in rows:                   # device efficiency: single x1's time over cores, over this setup's time
        for p in bench.PASSES:
            want = one["passes"][p]["ms"] / (r["ranks"] * r["threads"]) / r["passes"][p]["ms"]
            assert r["device_eff"][p] == pytest.approx(want, abs=1e-4)
    assert [g["goal"] for g in result["goals"]] == [f"ring zigzag fwd+bwd device efficiency, causal, L={L}"]


@pytest.mark.slow          # the run: 15-25 s (five setups, eight processes)
def test_messages_and_bytes_are_the_rings_on_paper(quick):
    _, result = quick
    N, Lr = bench.RANKS, L // bench.RANKS
    kv = 2 * bench.B * bench.HKV * Lr * bench.D * bench.ITEMSIZE              # one ring message
    grad = 2 * bench.B * bench.HKV * Lr * bench.D * bench.GRAD_ITEMSIZE
    for r in result["rows"]:
        traffic = r["passes"]["fwd+bwd"]["traffic"]
        if r["kind"] == "ring":
            assert r["message_bytes_on_paper"] == {"kv": kv, "grad": grad}
            assert traffic["fwd"]["messages"] == N - 1 and traffic["fwd"]["bytes_sent"] == (N - 1) * kv
            assert traffic["fwd"]["bytes_per_message"] == kv
            assert traffic["bwd"]["messages"] == (N - 1) + N
            assert traffic["bwd"]["bytes_sent"] == (N - 1) * kv + N * grad
            assert _positive_finite(r["bandwidth_gbs"])
        elif r["kind"] == "ulysses":                 # q, k, v and the output: (N - 1) / N of each
            assert traffic["fwd"]["collectives"] == {"forward": 4}
            assert traffic["fwd"]["bytes_sent"] == 4 * (N - 1) * kv // (2 * N)
        else:
            assert traffic["fwd"]["messages"] == 0 and "bandwidth_gbs" not in r
    zigzag, contiguous = result["rows"][2], result["rows"][3]
    total = L * (L + 1) // 2                                                  # causal pairs of one (b, h)
    assert sum(map(sum, zigzag["pairs_per_step_ranks"])) == total == sum(map(sum, contiguous["pairs_per_step_ranks"]))
    assert contiguous["pairs_per_step_ranks"][0][1] == 0 and contiguous["pairs_per_step_ranks"][1][1] == Lr * Lr
    assert sum(zigzag["pairs_per_step_ranks"][0]) == sum(zigzag["pairs_per_step_ranks"][1])   # balanced


def _min_lr(s, g, hq, hkv, rate, bw, pass_, causal):
    per = s / 2 if pass_ == "fwd" else (s + g) / 5
    return per * (hkv / hq) * (rate / bw) * (2 if causal else 1)


@pytest.mark.slow          # the run: 15-25 s (five setups, eight processes)
def test_the_machine_model_follows_from_its_measured_inputs(quick):
    _, result = quick
    m = result["model"]["machine"]
    for pass_, rate_key in (("fwd", "fwd"), ("bwd", "fwd+bwd")):
        for attention in ("full", "causal"):
            want = _min_lr(4, 4, 8, 8, m["rate_flops"][rate_key], m["bandwidth_bytes_per_s"], pass_,
                           attention == "causal")
            assert m["min_lr"][pass_][attention] == pytest.approx(want, abs=0.06)
    for r in result["rows"]:
        if r["kind"] != "ring":
            continue
        for p in bench.PASSES:
            for rank, pairs in enumerate(r["pairs_per_step_ranks"]):
                rate = r["rate_gflops_ranks"][p][rank] * 1e9
                want = bench.predicted_waits(pairs, r["Lr"], rate, r["bandwidth_bytes_per_s"], p)
                assert r["model"][p]["predicted_wait_ms"][rank] == pytest.approx(want * 1e3, abs=0.006)
            assert 0 <= r["model"][p]["measured_wait_frac"] <= 1


@pytest.mark.slow          # the run: 15-25 s (five setups, eight processes)
def test_the_gpu_predictions_follow_from_their_assumptions(quick):
    _, result = quick
    g = result["model"]["gpu"]
    a = g["assumptions"]
    assert "not measurements" in g["label"]
    links = {"NVLink": a["nvlink_bps"], "InfiniBand": a["ib_bps"]}
    assert len(g["rows"]) == 4
    for row in g["rows"]:
        causal = row["attention"].startswith("causal")
        for link, bw in links.items():
            got = row["min_lr"][link]
            for p in ("fwd", "bwd"):
                want = _min_lr(a["itemsize"], a["grad_itemsize"], a["hq"], row["hkv"], a["rate_flops"], bw, p, causal)
                assert got[p] == math.ceil(round(want, 6))
            assert got["binding"] == max(got["fwd"], got["bwd"])
        for n in a["ranks"]:
            link = "NVLink" if n <= a["nodes_gpus"] else "InfiniBand"
            assert row["min_L"][str(n)] == {"link": link, "L": n * row["min_lr"][link]["binding"]}


def test_min_shard_rows_and_waits_by_hand():
    # H100 assumptions, MHA: R / BW = 400e12 / 450e9 = 888.9 FLOP per byte
    fwd = bench.min_shard_rows(itemsize=2, hq=32, hkv=32, rate=400e12, bandwidth=450e9, pass_="fwd", causal=False)
    assert fwd == pytest.approx(888.89, abs=0.01)
    bwd = bench.min_shard_rows(itemsize=2, hq=32, hkv=8, rate=400e12, bandwidth=50e9, pass_="bwd", causal=True)
    assert bwd == pytest.approx(1.2 * 8000 * 2 / 4)
    # two ranks with nothing to compute: the forward waits for one K/V message, the backward for
    # K/V, then the gradient (beside nothing), then the last gradient home
    kv = bench.shard_bytes(100, bench.ITEMSIZE)
    assert bench.predicted_waits([0, 0], 100, 1e9, 1e6, "fwd") == pytest.approx(kv / 1e6)
    assert bench.predicted_waits([0, 0], 100, 1e9, 1e6, "fwd+bwd") == pytest.approx(4 * kv / 1e6)
    # enough work at every step: only the last gradient is exposed
    assert bench.predicted_waits([10 ** 9] * 2, 100, 1e9, 1e6, "fwd") == 0
    assert bench.predicted_waits([10 ** 9] * 2, 100, 1e9, 1e6, "fwd+bwd") == pytest.approx(kv / 1e6)


def test_bad_arguments_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="divisible by 4"):
        bench.run(tmp_path, lengths=[1022], verbose=False)
    with pytest.raises(ValueError, match="unknown mask"):
        bench.run(tmp_path, masks=["document"], verbose=False)
    assert not any(tmp_path.iterdir())


def test_cli_bench_context_calls_the_benchmark(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(bench, "run", lambda out, **kw: seen.update(out=out, **kw))
    assert cli.main(["bench", "context", "--quick", "--lengths", "2048", "--out", str(tmp_path)]) == 0
    assert seen == {"out": str(tmp_path), "quick": True, "lengths": [2048]}
    assert cli.main(["bench", "context", "--no-flex"]) == 2
