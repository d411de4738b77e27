"""`qkv bench generate` (qkv.tools.bench.generate): the quick configuration runs and writes what it promises.

Legend: B batch, L prompt length, N new tokens, Hkv key/value heads, D head dim.

Timings and goals are never checked here (the machine may be busy): only that
every figure was measured, is a positive finite number, and was written; that
qkv and transformers generated the same tokens from the same weights; and the
byte counts, which do not depend on timing.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

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
    assert len(goals) == 6
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
