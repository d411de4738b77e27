"""`qkv bench generate` (qkv.tools.bench.generate): the quick configuration runs and writes what it promises.

Legend: B batch, L prompt length, N new tokens, Hkv key/value heads, D head dim.

Timings and goals are never checked here (the machine may be busy): only that
every figure was measured, is a positive finite number, and was written; that
qkv and transformers generated the same tokens from the same weights; and the
byte counts, which do not depend on timing. The fresh-process sections (cold start,
end to end; `qkv.tools.bench.coldstart`) run inside the same quick run: their tests check
the structure, that the ratios and goals come from the medians of the runs, that the token
check compares what the processes printed, and the parse of `qkv generate`'s stderr line.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from qkv.tools.bench import coldstart  # noqa: E402
from qkv.tools.bench import generate as bench_generate  # noqa: E402
from qkv.models import Decoder, DecoderConfig  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_generate")
    threads = torch.get_num_threads()
    # one thread: on a busy machine, threads waiting for each other make a tiny model crawl
    result = bench_generate.run(out, quick=True, threads=1, verbose=False)
    assert torch.get_num_threads() == threads          # the benchmark gives the thread setting back
    return out, result


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_writes_json_and_markdown(quick):
    out, result = quick
    assert sorted(p.name for p in out.iterdir()) == ["generate.json", "generate.md"]  # atomic: no temp files
    written = json.loads((out / "generate.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert written["benchmark"] == "generate" and written["quick"] is True
    assert written["machine"]["torch"] == torch.__version__ and written["machine"]["torch_threads"] == 1
    md = (out / "generate.md").read_text()
    assert md.startswith("# qkv generation benchmark (quick)")
    assert "| batch 1 | qkv contiguous |" in md and "| batch 1 | HF transformers |" in md
    text = bench_generate.render(result)
    assert text.count("NOT met") == sum(g["met"] is False for g in result["goals"])


def test_same_tokens_as_transformers(quick):
    _, result = quick
    s = bench_generate.QUICK
    for key, B, kinds in (("batch1", 1, ("contiguous",)), ("batchB", s.batch, ("contiguous", "paged"))):
        block = result[key]
        assert len(block["tokens"]) == B and all(len(t) == s.new_tokens for t in block["tokens"])
        for kind in kinds:
            assert block[kind]["tokens_identical_to_hf"] is True, (key, kind, block[kind]["first_mismatch"])
            assert block[kind]["first_mismatch"] is None
        assert block["hf"]["deterministic"] is True
    assert result["mixed"]["tokens_identical"] is True, result["mixed"]["first_mismatch"]


def test_every_rate_and_ratio_is_a_positive_finite_number(quick):
    _, result = quick
    s = bench_generate.QUICK
    for key, kinds in (("batch1", ("contiguous", "hf")), ("batchB", ("contiguous", "paged", "hf"))):
        for kind in kinds:
            r = result[key][kind]
            B = 1 if key == "batch1" else s.batch
            assert r["batch"] == B and r["new_tokens"] == B * s.new_tokens and r["decode_steps"] == s.new_tokens - 1
            for name in ("total_s", "prefill_s", "decode_s", "step_ms", "decode_tok_s", "e2e_tok_s"):
                assert _positive_finite(r[name]), (key, kind, name, r[name])
            if kind != "hf":
                assert _positive_finite(r["decode_vs_hf"]) and _positive_finite(r["e2e_vs_hf"]), (key, kind)
    fl = result["floor"]
    for name in ("floor_ms", "qkv_ratio", "hf_ratio", "read_gbs"):
        assert _positive_finite(fl[name]), name
    bw = result["bandwidth"]
    assert _positive_finite(bw["read_gbs"]) and _positive_finite(bw["copy_gbs"])
    rc = result["recompute"]
    assert rc["context"] == s.context and rc["prefill"] == s.context - s.cached_steps
    for name in ("cached_step_ms", "recompute_ms", "speedup"):
        assert _positive_finite(rc[name]), name
    assert _positive_finite(result["mixed"]["paged_vs_contiguous_decode"])
    goals = result["goals"]
    assert len(goals) == 10                             # 6 in-process, 3 cold start, 1 end to end
    for g in goals:
        assert g["met"] in (True, False) and _positive_finite(g["measured"]), g


def test_floor_sets_each_run_against_the_bandwidth_read_around_it(quick):
    import statistics

    _, result = quick
    fl, runs = result["floor"], result["batch1"]["contiguous"]["each"]
    assert len(fl["per_run"]) == len(runs) == bench_generate.QUICK.repeats_1
    for r, run in zip(fl["per_run"], runs):
        assert r["read_gbs"] == max(run["read_gbs_before"], run["read_gbs_after"]) > 0
        assert r["floor_ms"] == pytest.approx(fl["bytes"]["total_bytes"] / (r["read_gbs"] * 1e6), rel=1e-3)
        assert r["ratio"] == pytest.approx(r["step_ms"] / r["floor_ms"], rel=1e-3)
    assert fl["qkv_ratio"] == pytest.approx(statistics.median(r["ratio"] for r in fl["per_run"]), rel=1e-3)
    assert result["goals"][0]["measured"] == fl["qkv_ratio"]
    wide = fl["run_wide"]
    assert wide["read_gbs"] == result["bandwidth"]["read_gbs"]
    assert wide["qkv_ratio"] == pytest.approx(fl["qkv_step_ms"] / wide["floor_ms"], rel=1e-3)


def test_step_bytes_are_the_parameters_and_the_cache(quick):
    _, result = quick
    s = bench_generate.QUICK
    c = result["config"]
    b = result["floor"]["bytes"]
    d, V, F, n = s.d_model, s.vocab, 4 * s.d_model, s.n_layers
    per_layer = 4 * d * d + 4 * d + 2 * d * F + F + d + 4 * d       # attention, MLP, two layer norms
    params = V * d + d + n * per_layer + 2 * d                       # tied embedding once, one position row, final norm
    assert c["params"] == V * d + s.max_positions * d + n * per_layer + 2 * d
    assert b["param_bytes"] == 4 * params
    assert b["context"] == s.prompt + s.new_tokens / 2
    assert b["kv_bytes"] == round(2 * n * s.d_model * 4 * b["context"])
    assert b["total_bytes"] == b["param_bytes"] + b["kv_bytes"]


def test_cache_memory_of_the_mixed_batch(quick):
    _, result = quick
    s = bench_generate.QUICK
    mx = result["mixed"]
    lengths = mx["lengths"]
    assert len(lengths) == s.batch and all(s.mixed_min <= n <= s.prompt for n in lengths)
    per_token = 2 * s.n_layers * s.d_model * 4                      # K and V, every layer, fp32
    held = [n + s.new_tokens - 1 for n in lengths]                  # the last new token is never fed back
    bs = s.block_size
    paged, contiguous = mx["paged"], mx["contiguous"]
    assert paged["used_bytes"] == contiguous["used_bytes"] == sum(held) * per_token
    assert paged["allocated_bytes"] == sum(-(-h // bs) * bs for h in held) * per_token
    assert contiguous["allocated_bytes"] == s.batch * (max(lengths) + s.new_tokens) * per_token
    for r in (paged, contiguous):
        assert r["unused_bytes"] == r["allocated_bytes"] - r["used_bytes"]
        assert r["waste"] == pytest.approx(r["unused_bytes"] / r["allocated_bytes"], abs=1e-5)


def test_gqa_cache_is_a_quarter_of_mha(quick):
    _, result = quick
    s = bench_generate.QUICK
    gq = result["gqa"]
    assert gq["gqa"]["n_kv_heads"] == s.gqa_kv_heads and gq["mha"]["n_kv_heads"] == s.gqa_heads
    for name in ("gqa", "mha"):
        assert gq[name]["used_bytes"] == gq[name]["formula_bytes"] == gq[name]["nbytes"]   # max_len = prompt
    assert gq["nbytes_ratio"] == gq["used_ratio"] == s.gqa_kv_heads / s.gqa_heads


def test_step_bytes_counts_a_tied_head_once():
    model = Decoder(DecoderConfig.gpt2(vocab_size=50, d_model=16, n_layers=1, n_heads=2, max_positions=32))
    total = sum(p.numel() for p in model.parameters())
    b = bench_generate.step_bytes(model, context=10)
    assert b["param_bytes"] == 4 * (total - 32 * 16 + 16)
    assert b["kv_bytes"] == 2 * 1 * 2 * 8 * 4 * 10
    untied = Decoder(DecoderConfig.llama(vocab_size=50, d_model=16, n_layers=1, n_heads=4, n_kv_heads=2,
                                         ffn_hidden=32, max_positions=32))
    b = bench_generate.step_bytes(untied, context=3)
    assert b["param_bytes"] == 4 * sum(p.numel() for p in untied.parameters())   # no position table; own head
    assert b["kv_bytes"] == 2 * 1 * 2 * 4 * 4 * 3


def test_first_mismatch():
    assert bench_generate._first_mismatch([[1, 2], [3]], [[1, 2], [3]]) is None
    assert bench_generate._first_mismatch([[1, 2], [3, 4]], [[1, 2], [3, 5]])["row"] == 1
    assert bench_generate._first_mismatch([[1, 2]], [[1, 2, 3]])["index"] == 2


# ----------------------------------------------------------------------------
# The fresh-process sections (qkv.tools.bench.coldstart), from the same quick run
# ----------------------------------------------------------------------------

def _walls(runs):
    import statistics

    return statistics.median(r["wall_s"] for r in runs)


def test_cold_start_runs_three_kinds_of_fresh_process(quick):
    _, result = quick
    c = coldstart.COLD_QUICK
    cs = result["cold_start"]
    assert "error" not in cs, cs.get("error")
    assert cs["train"]["preset"] == "tiny" and cs["train"]["steps"] == c.train_steps
    assert cs["train"]["checkpoint"].rsplit("/", 1)[-1] == f"step-{c.train_steps:06d}"
    assert cs["prompt"] == "def " and cs["max_new_tokens"] == 32 and cs["repeats"] == c.repeats
    assert cs["threads"] == 1                                   # the fixture's thread count reaches the children
    for k in coldstart.COLD_KINDS:
        runs = cs["runs"][k]
        assert len(runs) == c.repeats and cs[k]["runs"] == cs[k]["ok_runs"] == c.repeats, (k, cs[k]["errors"])
        for r in runs:
            assert "error" not in r and r["rc"] == 0, r
            assert _positive_finite(r["wall_s"]) and _positive_finite(r["decode_tok_s"]), r
            assert r["new_tokens"] == 32 and r["stderr_line"].startswith("[32 tokens; ")
            assert r["path"] and r["path"] in r["stderr_line"]
    assert {r["path"] for r in cs["runs"]["numba_off"]} == {"torch path"}     # QKV_NUMBA=0 names no reason
    for first, r in zip(cs["runs"]["first_run"], cs["runs"]["second_run"]):
        assert set(r["cache_before"]) == set(r["cache_after"]) == {"log", "lock", "stamp"}
        assert r["cache_before"] == first["cache_after"]            # the state the first run left
        assert set(r["build_wait"]) == {"waited_s", "stamp", "timed_out"} and r["build_wait"]["timed_out"] is False


def test_fresh_process_ratios_and_goals_come_from_the_medians(quick):
    _, result = quick
    cs, e2e = result["cold_start"], result["end_to_end"]
    for k in coldstart.COLD_KINDS:
        assert cs[k]["wall_s"] == pytest.approx(_walls(cs["runs"][k]), abs=1e-4)
    off = cs["numba_off"]
    assert cs["second_vs_off_wall"] == pytest.approx(cs["second_run"]["wall_s"] / off["wall_s"], abs=2e-3)
    assert cs["first_vs_off_wall"] == pytest.approx(cs["first_run"]["wall_s"] / off["wall_s"], abs=2e-3)
    assert cs["second_vs_off_decode"] == pytest.approx(cs["second_run"]["decode_tok_s"] / off["decode_tok_s"],
                                                       abs=2e-3)
    for k in coldstart.E2E_KINDS:
        assert e2e[k]["wall_s"] == pytest.approx(_walls(e2e["runs"][k]), abs=1e-4)
    assert e2e["hf_vs_qkv"] == pytest.approx(e2e["hf"]["wall_s"] / e2e["qkv"]["wall_s"], abs=2e-3)   # transformers / qkv
    assert e2e["hf_vs_qkv_off"] == pytest.approx(e2e["hf"]["wall_s"] / e2e["qkv_off"]["wall_s"], abs=2e-3)
    rows = {g["goal"]: g for g in result["goals"][6:]}
    expected = [("cold start: second run wall / QKV_NUMBA=0 wall", cs["second_vs_off_wall"], 1.1, "<="),
                ("cold start: second run decode tokens/s / QKV_NUMBA=0's", cs["second_vs_off_decode"], 1.0, ">="),
                ("cold start: first run ever wall / QKV_NUMBA=0 wall", cs["first_vs_off_wall"], 1.5, "<="),
                ("end to end: transformers wall / qkv wall", e2e["hf_vs_qkv"], 2.0, ">=")]
    assert len(rows) == len(expected)
    for (prefix, measured, target, direction), g in zip(expected, rows.values()):
        assert g["goal"].startswith(prefix) and g["measured"] == measured
        assert g["target"] == target and g["direction"] == direction
        assert g["met"] == (measured <= target if direction == "<=" else measured >= target)


def test_end_to_end_compares_the_tokens_the_processes_printed(quick):
    _, result = quick
    c, s = coldstart.COLD_QUICK, bench_generate.QUICK
    e2e = result["end_to_end"]
    assert e2e["model"]["n_layers"] == s.n_layers and e2e["model"]["d_model"] == s.d_model
    assert e2e["model"]["vocab"] == s.vocab and e2e["threads"] == 1
    assert len(e2e["prompt_ids"]) == c.e2e_prompt and all(0 <= t < s.vocab for t in e2e["prompt_ids"])
    assert e2e["kernel_build"]["rc"] == 0 and e2e["kernel_build"]["output"][0].startswith("qkv.kernels.build: ")
    hf_runs = e2e["runs"]["hf"]
    assert len(hf_runs) == c.repeats and e2e["tokens"] == hf_runs[0]["new_ids"]
    assert len(e2e["tokens"]) == c.e2e_new_tokens and all(0 <= t < s.vocab for t in e2e["tokens"])
    for k in ("qkv", "qkv_off"):
        runs = e2e["runs"][k]
        assert len(runs) == c.repeats and all("error" not in r for r in runs), runs
        assert e2e[k]["tokens_identical_to_hf"] == all(r["new_ids"] == e2e["tokens"] for r in runs)
        assert e2e[k]["tokens_identical_to_hf"] is True, e2e[k]["first_mismatch"]
        assert all(len(r["new_ids"]) == c.e2e_new_tokens for r in runs)
    md = bench_generate.render(result, markdown=True)
    assert "## Fresh processes: cold start and end to end" in md
    assert "| first run ever (empty kernel cache) |" in md and "| QKV_NUMBA=0 (torch path) |" in md
    assert "| qkv generate (kernels cached) |" in md and "| transformers generate |" in md
    assert "end to end (fresh processes), qkv kernels cached vs transformers: identical" in md


def test_parse_of_a_real_generate_line(quick):
    _, result = quick
    for k in coldstart.COLD_KINDS:
        for r in result["cold_start"]["runs"][k]:
            parsed = coldstart.parse_generate_line("some warning\n" + r["stderr_line"] + "\n")
            assert parsed["decode_tok_s"] == r["decode_tok_s"] and parsed["path"] == r["path"]
            assert parsed["new_tokens"] == 32 and parsed["cache"] == "contiguous"
    line = ("[32 tokens; prefill 2 tokens in 0.00 s; decode 1186.1 tokens/s; contiguous cache; torch path: the CPU "
            "kernels would not pay for their load here]")
    p = coldstart.parse_generate_line(line)
    assert p["decode_tok_s"] == 1186.1 and p["prompt_tokens"] == 2 and p["new_tokens"] == 32
    assert p["path"] == "torch path: the CPU kernels would not pay for their load here"
    assert coldstart.parse_generate_line("Traceback (most recent call last):") is None


def test_summarize_takes_medians_of_the_runs_that_succeeded():
    runs = [{"wall_s": 3.0, "decode_tok_s": 10.0, "path": "CPU kernels"},
            {"wall_s": 1.0, "decode_tok_s": 30.0, "path": "CPU kernels"},
            {"wall_s": 2.0, "decode_tok_s": 20.0, "path": "torch path"},
            {"wall_s": 0.1, "decode_tok_s": None, "path": None, "error": "exit status 1: boom"}]
    s = coldstart.summarize(runs)
    assert s["wall_s"] == 2.0 and s["decode_tok_s"] == 20.0 and s["runs"] == 4 and s["ok_runs"] == 3
    assert s["path"] == "CPU kernels" and s["paths"] == ["CPU kernels", "torch path"]
    assert s["errors"] == ["exit status 1: boom"]
    assert coldstart.summarize([runs[-1]])["wall_s"] is None


def test_goals_on_made_up_figures():
    result = {"cold_start": {"second_vs_off_wall": 1.05, "second_vs_off_decode": 0.9, "first_vs_off_wall": 2.0},
              "end_to_end": {"hf_vs_qkv": 2.5}}
    met = [g["met"] for g in coldstart.goals(result, bench_generate._goal)]
    assert met == [True, False, False, True]
    assert [g["met"] for g in coldstart.goals({}, bench_generate._goal)] == [None] * 4   # a section that failed


def test_timed_process_closes_stdin_and_stops_at_the_timeout():
    import sys

    r = coldstart.timed_process([sys.executable, "-c", "import sys; print(repr(sys.stdin.read()))"],
                                coldstart.child_env(1), 60)
    assert r["rc"] == 0 and r["stdout"].strip() == "''" and "error" not in r and _positive_finite(r["wall_s"])
    r = coldstart.timed_process([sys.executable, "-c", "import time; time.sleep(30)"], coldstart.child_env(1), 0.5)
    assert r["rc"] is None and r["error"] == "ran past 0.5 s" and r["wall_s"] < 10
