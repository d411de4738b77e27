"""`qkv bench train` (qkv.tools.bench.train): the quick configuration runs and writes what it promises.

Legend: B global batch, L context, V vocabulary.

Timings and goals are never checked here (the machine may be busy): only that
every figure was measured, is a positive finite number, and was written; that
qkv and transformers compute the same losses from the same weights on the same
batches (and gradients as accurate as transformers', against a float64 oracle);
and that the data-parallel processes reproduce the one-process losses.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from conftest import assert_error_ratio  # noqa: E402
from qkv.tools.bench import train as bench_train  # noqa: E402

S = bench_train.QUICK


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_train")
    threads = torch.get_num_threads()
    # one thread: on a busy machine, threads waiting for each other make a tiny model crawl
    result = bench_train.run(out, quick=True, threads=1, verbose=False)
    assert torch.get_num_threads() == threads          # the benchmark gives the thread setting back
    return out, result


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_writes_json_and_markdown(quick):
    out, result = quick
    assert sorted(p.name for p in out.iterdir()) == ["train.json", "train.md"]        # atomic: no temp files
    written = json.loads((out / "train.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert written["benchmark"] == "train" and written["quick"] is True
    assert written["machine"]["torch"] == torch.__version__ and written["machine"]["torch_threads"] == 1
    c = written["config"]
    assert (c["n_layers"], c["d_model"], c["n_heads"], c["context"], c["batch"]) == (2, 64, 4, 32, 4)
    assert c["tokens_per_step"] == S.batch * S.context and c["hf_attn"] == "sdpa"
    md = (out / "train.md").read_text()
    assert md.startswith("# qkv training benchmark (quick)")
    assert "| qkv Decoder |" in md and "| HF GPT2LMHeadModel (sdpa) |" in md
    assert "| 1 process x 1 thread |" in md and "| 2 processes x 1 thread |" in md
    text = bench_train.render(result)
    assert text.count("NOT met") == sum(g["met"] is False for g in result["goals"])


def test_qkv_and_transformers_losses_agree(quick):
    _, result = quick
    ag = result["agreement"]
    assert ag["agree"] is True and ag["rel_diff"] <= bench_train.LOSS_RTOL, ag
    assert math.isclose(ag["qkv"], math.log(S.vocab), rel_tol=0.05)     # an untrained model: about log V
    losses = result["hf"]["losses"]
    steps = S.warmup + S.rounds * S.block_steps
    assert losses["steps"] == steps and len(losses["qkv"]) == len(losses["hf"]) == steps
    assert losses["agree"] is True and losses["max_abs_diff"] <= 1e-4 * losses["hf"][0], losses
    assert losses["qkv"][0] == pytest.approx(ag["qkv"], abs=1e-5)       # step 0 trains on the checked batch


def test_every_rate_and_ratio_is_a_positive_finite_number(quick):
    _, result = quick
    cmp = result["hf"]
    for side in ("qkv", "hf"):
        r = cmp[side]
        assert r["blocks"] == S.rounds and r["steps"] == S.rounds * S.block_steps
        assert len(r["block_tok_s"]) == S.rounds
        for name in ("tok_s", "tok_s_min", "tok_s_max", "step_ms", "forward_ms", "backward_ms", "optimizer_ms",
                     "cpu_ms_per_step", "tok_per_cpu_s"):
            assert _positive_finite(r[name]), (side, name, r[name])
        assert r["tok_s_min"] <= r["tok_s"] <= r["tok_s_max"]
    assert _positive_finite(cmp["ratio"]) and _positive_finite(cmp["paired_ratio"])
    assert _positive_finite(cmp["cpu_ratio"]) and len(cmp["paired_ratios"]) == S.rounds
    assert cmp["ratio"] == pytest.approx(cmp["qkv"]["tok_s"] / cmp["hf"]["tok_s"], rel=1e-2)
    goals = result["goals"]
    assert len(goals) == 4
    for g in goals:
        assert g["met"] in (True, False) and g["measured"] is not None and math.isfinite(g["measured"]), g
    assert [g["met"] for g in goals[1:]] == [True, True, True]          # the agreement goals


def test_data_parallel_matches_one_process(quick):
    _, result = quick
    dp = result["ddp"]
    assert dp["processes"] == 2 and dp["threads"] == 1
    rows = {r["setup"]: r for r in dp["rows"]}
    assert sorted(rows) == ["1 process x 1 thread", "2 processes x 1 thread"]   # threads=1: one baseline
    one, two = rows["1 process x 1 thread"], rows["2 processes x 1 thread"]
    assert (one["batch_each"], two["batch_each"]) == (S.batch, S.batch // 2)
    assert one["global_batch"] == two["global_batch"] == S.batch
    steps = S.ddp_warmup + S.ddp_rounds * S.ddp_block_steps
    assert dp["steps_compared"] == steps and len(one["losses"]) == len(two["losses"]) == steps
    assert dp["losses_agree"] is True
    for a, b in zip(one["losses"], two["losses"]):
        assert abs(a - b) <= 1e-4 * abs(a), (one["losses"], two["losses"])
    assert one["losses"][0] == pytest.approx(result["agreement"]["qkv"], abs=1e-5)   # the same start and batch
    for r in (one, two):
        assert r["blocks"] == S.ddp_rounds and _positive_finite(r["tok_s"]) and _positive_finite(r["step_ms"])
    assert _positive_finite(dp["vs_1proc_threads"]) and _positive_finite(dp["start_s"])
    assert _positive_finite(dp["paired_vs_1proc_threads"]) and _positive_finite(two["paired_vs_1proc"])
    assert two["cpu_ms_per_step"] > 0 and _positive_finite(two["tok_per_cpu_s"])


def test_gradients_against_a_float64_oracle():
    """One backward of the benchmark's loss: qkv's fp32 gradients are as accurate as transformers'."""
    model, hf_model = bench_train.build_models(S, seed=3)
    oracle = copy.deepcopy(model).double()
    tokens = bench_train.make_batch(0, S, seed=3)
    losses = {}
    for name, m, logits in (("qkv", model, model), ("hf", hf_model, bench_train._hf_logits(hf_model)),
                            ("oracle", oracle, oracle)):
        loss = bench_train._loss(logits, tokens)
        loss.backward()
        losses[name] = loss.detach()
    assert_error_ratio(losses["qkv"], losses["hf"], losses["oracle"], what="loss")
    hf_params = dict(hf_model.named_parameters())
    pairs = {"embed.weight": "transformer.wte.weight", "pos_embed.weight": "transformer.wpe.weight",
             "layers.0.ffn.fc1.weight": "transformer.h.0.mlp.c_fc.weight",
             "layers.1.self_attn.o_proj.weight": "transformer.h.1.attn.c_proj.weight"}
    ours, ref = dict(model.named_parameters()), dict(oracle.named_parameters())
    for name, hf_name in pairs.items():
        g_hf = hf_params[hf_name].grad
        if g_hf.shape != ours[name].grad.shape:                         # HF's Conv1D holds the transpose
            g_hf = g_hf.t()
        assert_error_ratio(ours[name].grad, g_hf, ref[name].grad, ratio=3.0, what=name)


def test_batches_are_seeded_and_in_range():
    a, b = bench_train.make_batch(5, S, seed=1), bench_train.make_batch(5, S, seed=1)
    assert a.shape == (S.batch, S.context + 1) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, bench_train.make_batch(6, S, seed=1))
    assert int(a.min()) >= 0 and int(a.max()) < S.vocab


def test_bad_arguments():
    with pytest.raises(ValueError, match="threads"):
        bench_train.run("unused", quick=True, threads=0, verbose=False)
    with pytest.raises(TypeError, match="threads"):
        bench_train.run("unused", quick=True, threads="2", verbose=False)
    odd = bench_train.Sizes(**{**bench_train.QUICK.__dict__, "batch": 3})
    with pytest.raises(ValueError, match="split evenly"):
        bench_train.data_parallel({}, odd, 0, 1, lambda m: None)


def test_a_failing_process_is_reported_not_waited_for(tmp_path):
    """A data-parallel process that fails (here: weights that do not fit) raises here, with its traceback."""
    one = bench_train.Sizes(**{**bench_train.QUICK.__dict__, "processes": 1})
    with pytest.raises(RuntimeError, match="(?s)data-parallel process 0 stopped.*Unexpected key.*nonsense"):
        bench_train._Group(one, 0, {"nonsense": torch.zeros(1)}, str(tmp_path), timeout_s=120)
