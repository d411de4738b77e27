"""`qkv bench transformers` (qkv.tools.bench.transformers): the quick configuration runs and writes what it promises.

Legend: L sequence length, W eager's attention weights of one layer (Hq x L x L float32).

Timings and goals are never checked here (the machine may be busy): only that every cell was
measured in its own process (or refused, or its error recorded), that the JSON and Markdown
are written with the promised structure, that qkv's layers got `document & causal` for the
packed batch and a sliding window for Mistral, that every implementation computes the same
logits, and that a pass whose memory estimate does not fit is refused without being started.
"""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("transformers")

from qkv.tools.bench import transformers as bench  # noqa: E402

S = bench.QUICK
GiB = 1 << 30


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_transformers")
    # one thread: on a busy machine, threads waiting for each other make a tiny model crawl
    return out, bench.run(out, quick=True, threads=1, verbose=False)


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_writes_json_and_markdown(quick):
    out, result = quick
    assert sorted(p.name for p in out.iterdir()) == ["transformers.json", "transformers.md"]
    written = json.loads((out / "transformers.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert written["benchmark"] == "transformers" and written["quick"] is True
    assert written["machine"]["torch_threads"] == 1 and written["machine"]["cpu"]
    c = written["config"]
    assert (c["length"], c["layers"], c["hidden"], c["heads"], c["kv_heads"]) == (512, 2, 64, 4, 2)
    assert len(c["doc_lengths"]) == S.documents and sum(c["doc_lengths"]) == S.length
    assert len(written["load_start"]) == len(written["load_end"]) == 3
    md = (out / "transformers.md").read_text()
    assert md.startswith("# qkv inside transformers (quick)")
    for label in ("packed (4 docs) 512: forward", "sliding window 512: training step",
                  "packed (4 docs) 512: first call (fresh process), forward"):
        assert f"| {label} |" in md
    assert "| qkv ms | sdpa ms | eager ms | flex ms | qkv vs sdpa | qkv vs flex | qkv vs eager | goal | verdict |" in md
    text = bench.render(result)
    assert text.count("NOT met") == sum(g["met"] is False for g in result["goals"])


def test_every_implementation_ran_each_case_in_its_own_process(quick):
    _, result = quick
    rows = result["rows"]
    assert sorted((r["impl"], r["case"]) for r in rows) == sorted((i, c) for i in bench.IMPLS for c in bench.CASES)
    for r in rows:
        assert "error" not in r, r.get("error")
        f = r["fwd"]
        assert _positive_finite(f["first_ms"]) and _positive_finite(f["ms"]) and _positive_finite(f["attn_ms"])
        assert f["attn_calls_per_forward"] == S.layers
        assert f["runs"] == len(f["times_ms"]) >= 1 and not f["first_only"]
        assert _positive_finite(f["peak_rss_bytes"])
        t = r["train"]
        if r["impl"] == "flex_attention":   # FlexAttention has no backward on the CPU (torch 2.13)
            assert "error" in t and "backward" in t["error"]
            continue
        assert _positive_finite(t["ms"]) and t["runs"] == len(t["times_ms"]) >= 1
        assert len(t["losses"]) == 1 + t["warmup"] + t["runs"]
        assert all(math.isfinite(x) for x in t["losses"])


def test_qkv_layers_got_qkv_masks_and_the_tiled_backward(quick):
    _, result = quick
    rows = {(r["impl"], r["case"]): r for r in result["rows"]}
    packed, window = rows["qkv", "packed"], rows["qkv", "window"]
    assert packed["mask"]["type"] == "HFMask" and packed["mask"]["document_and_causal"] is True
    assert packed["mask"]["documents"] == S.documents
    assert "document(" in packed["mask"]["repr"] and "causal()" in packed["mask"]["repr"]
    assert f"sliding_window({S.window}, causal=True)" in window["mask"]["repr"]
    assert "tiled" in window["backends_fwd"]
    assert any("Tiled" in n for n in window["train"]["backward_nodes"])     # backward through qkv's tiled
    assert rows["sdpa", "packed"]["mask"]["repr"].startswith(f"dense tensor (1, 1, {S.length}, {S.length}) bool")


def test_implementations_agree(quick):
    _, result = quick
    for key, entry in result["agreement"].items():
        assert entry["logits_max_abs_diff"] < 1e-4, key
        assert entry["loss_abs_diff"] < 1e-4, key
        if "first_step_loss_abs_diff" in entry:
            assert entry["first_step_loss_abs_diff"] < 1e-4, key


def test_goals_are_ratios_with_verdicts(quick):
    _, result = quick
    goals = result["goals"]
    assert [g["goal"] for g in goals[:len(bench.GOALS)]] == [g[0] for g in bench.GOALS]
    for g in goals[:len(bench.GOALS)]:
        assert _positive_finite(g["measured"]) and g["met"] in (True, False)
    assert goals[-2]["met"] is True and goals[-1]["met"] is True        # nothing OOM-killed, eager refused or ran


def test_a_pass_that_does_not_fit_is_refused_and_never_started(tmp_path):
    result = bench.run(tmp_path, quick=True, threads=1, memory_bytes=GiB // 4, verbose=False)
    for r in result["rows"]:
        assert set(r) == {"impl", "case", "plan"}                       # no process was started
        for mode in bench.MODES:
            p = r["plan"][mode]
            assert p["refused"] == f"refused: needs {p['need_bytes'] / GiB:.1f} GiB, have {0.25:.1f} GiB"
    md = (tmp_path / "transformers.md").read_text()
    assert "| refused | refused | refused | refused |" in md
    assert all(g["met"] is None for g in result["goals"][:len(bench.GOALS)])
    assert result["goals"][-2]["met"] is True


def test_estimates_refuse_eager_training_at_16k_on_a_small_machine():
    full = bench.FULL
    W = full.heads * full.length ** 2 * 4                                  # 8 GiB per layer
    eager_train = bench.estimate_bytes("eager", "train", full)["total"]
    assert eager_train >= full.layers * W
    assert bench.refusal(eager_train, 24 * GiB).startswith("refused: needs ")
    for impl in ("qkv", "flex_attention"):
        assert bench.estimate_bytes(impl, "train", full)["total"] < 8 * GiB
    assert bench.estimate_bytes("sdpa", "train", full)["attention"] > full.layers * 4 * full.length ** 2
    assert bench.estimate_bytes("eager", "fwd", full)["attention"] >= 2 * W
    assert bench.refusal(GiB, 2 * GiB) is None and bench.refusal(GiB, None) is None
    with pytest.raises(ValueError):
        bench.estimate_bytes("flash", "fwd", full)


def test_bad_arguments_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="impls"):
        bench.run(tmp_path, quick=True, impls=("flash",), verbose=False)
    with pytest.raises(ValueError, match="threads"):
        bench.run(tmp_path, quick=True, threads=0, verbose=False)


def test_cli_bench_transformers_runs_this_benchmark(monkeypatch, tmp_path):
    from qkv import cli

    seen = {}
    monkeypatch.setattr(bench, "run", lambda out, quick=False: seen.update(out=out, quick=quick))
    assert cli.main(["bench", "transformers", "--quick", "--out", str(tmp_path)]) == 0
    assert seen == {"out": str(tmp_path), "quick": True}
