"""The `qkv` command and the demo tour: called in-process through `qkv.cli.main`, plus the installed script.

Timings are never checked for speed here, only that they were measured and written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qkv
from qkv import cli
from qkv._util.files import write_text_atomic
from qkv.tools import demo, explain
from qkv.tools.bench import backends

SENTENCE = "the dog fetches the stick"
TOKENS = SENTENCE.split()


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def parse_table(text: str, title_prefix: str) -> list[tuple[str, list[float]]]:
    """Rows (label, values) of the first printed table whose title starts with `title_prefix`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title_prefix))
    sep = next(i for i in range(start, len(lines)) if lines[i].startswith("---"))
    rows = []
    for line in lines[sep + 1:]:
        if not line.strip():
            break
        label, cells = line.split(" | ")
        rows.append((label.strip(), [float(c) for c in cells.split()]))
    return rows


def qkv_command() -> list[str]:
    """The installed console script next to this interpreter, else on PATH, else `python -m qkv`."""
    here = Path(sys.executable).with_name("qkv")
    if here.exists():
        return [str(here)]
    found = shutil.which("qkv")
    return [found] if found else [sys.executable, "-m", "qkv"]


# ----------------------------------------------------------------------------
# qkv explain
# ----------------------------------------------------------------------------

def test_explain_prints_every_step_and_who_attends_to_whom(capsys):
    code, out, err = run_cli(capsys, "explain", SENTENCE)
    assert code == 0, err
    for title in ("x: token embeddings", "Q = x W_q", "K = x W_k", "V = x W_v", "step 1: raw scores",
                  "step 2: scaled scores", "step 3: softmax weights", "step 4: output"):
        assert title in out, title
    assert out.count("  shows: ") == 8 and out.count("  why:   ") == 8  # one explanation per table
    assert "masked scores" not in out  # nothing is masked without --causal
    for i, tok in enumerate(TOKENS):
        assert f"[{i}] {tok!r} attends to most: [" in out, tok
    # the printed score tables have a row and a column per token
    scores = parse_table(out, "step 1: raw scores")
    assert [label for label, _ in scores] == TOKENS
    assert all(len(vals) == len(TOKENS) for _, vals in scores)


def test_explain_matches_the_reference_trace(capsys):
    _, out, _ = run_cli(capsys, "explain", SENTENCE, "--dim", "6", "--seed", "3")
    trace = explain.explain_sentence(SENTENCE, dim=6, seed=3)
    printed = np.array([vals for _, vals in parse_table(out, "step 3: softmax weights")])
    np.testing.assert_allclose(printed, trace.weights, atol=5e-4)
    out_rows = np.array([vals for _, vals in parse_table(out, "step 4: output")])
    assert out_rows.shape == (5, 6)
    np.testing.assert_allclose(out_rows, trace.weights @ trace.V, atol=5e-4)


def test_explain_is_deterministic_and_the_seed_matters(capsys):
    first = run_cli(capsys, "explain", SENTENCE)
    second = run_cli(capsys, "explain", SENTENCE)
    assert first == second
    other_seed = run_cli(capsys, "explain", SENTENCE, "--seed", "1")
    assert other_seed[0] == 0 and other_seed[1] != first[1]


def test_explain_weight_rows_sum_to_one(capsys):
    _, out, _ = run_cli(capsys, "explain", SENTENCE)
    rows = parse_table(out, "step 3: softmax weights")
    assert [label for label, _ in rows] == TOKENS
    for label, vals in rows:
        assert all(0.0 <= v <= 1.0 for v in vals), label
        # each printed value is rounded to 3 decimals: the sum is 1 up to half a unit per cell
        assert abs(sum(vals) - 1.0) <= len(vals) * 0.0005 + 1e-9, (label, vals)


def test_explain_causal_masks_the_future(capsys):
    code, out, _ = run_cli(capsys, "explain", SENTENCE, "--causal")
    assert code == 0
    masked = parse_table(out, "step 2b: masked scores")
    for i, (_, vals) in enumerate(masked):
        assert all(np.isneginf(v) for v in vals[i + 1:]) and all(np.isfinite(v) for v in vals[: i + 1])
    weights = parse_table(out, "step 3: softmax weights")
    for i, (_, vals) in enumerate(weights):
        assert all(v == 0.0 for v in vals[i + 1:])
    assert weights[0][1][0] == 1.0  # the first token can only see itself
    assert "[0] 'the' attends to most: [0] 'the' (weight 1.00)" in out


def test_toy_embeddings_are_stable_and_stems_are_related():
    dog = explain.toy_embedding("dog", 256)
    np.testing.assert_array_equal(dog, explain.toy_embedding("dog", 256))
    np.testing.assert_array_equal(dog, explain.toy_embedding("Dog", 256))  # case does not matter

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    # sharing a stem means sharing 0.8^2 = 64% of the variance; unrelated words are ~orthogonal
    assert cos(dog, explain.toy_embedding("dogs", 256)) > 0.45
    assert cos(explain.toy_embedding("fetch", 256), explain.toy_embedding("fetches", 256)) > 0.45
    assert abs(cos(dog, explain.toy_embedding("stick", 256))) < 0.25


@pytest.mark.parametrize("argv, message", [
    (["explain", ""], "sentence is empty"),
    (["explain", "   "], "sentence is empty"),
    (["explain", "the dog", "--dim", "0"], "dim must be"),
    (["explain", "the dog", "--dim", "eight"], "invalid int value"),
    (["explain", " ".join(["w"] * 40)], "shorter sentence"),
    (["frobnicate"], "invalid choice"),
    ([], "choose a command"),
])
def test_bad_input_exits_nonzero_with_a_message(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code != 0
    assert message in err
    assert "Traceback" not in err


def test_demo_out_that_is_a_file_is_an_error_not_a_traceback(capsys, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    code, _, err = run_cli(capsys, "demo", "--quick", "--out", str(not_a_dir))
    assert code == 1 and "qkv demo: error:" in err and "Traceback" not in err
    assert not_a_dir.read_text() == "x"


def test_version(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and qkv.__version__ in out


# ----------------------------------------------------------------------------
# qkv backends, qkv demo, qkv bench
# ----------------------------------------------------------------------------

def test_backends_lists_the_capability_table(capsys):
    code, out, _ = run_cli(capsys, "backends")
    assert code == 0
    first_words = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert {"reference", "math", "sdpa"} <= first_words
    assert "return_weights" in out


def test_demo_quick_writes_summaries(capsys, tmp_path):
    out_dir = tmp_path / "demo"
    code, out, err = run_cli(capsys, "demo", "--quick", "--out", str(out_dir))
    assert code == 0, err
    for i in (1, 2, 3):
        assert f"[{i}/{len(demo.STEPS)}]" in out
    assert "attends to most" in out and "sparsity" in out and "math/sdpa" in out

    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["quick"] is True and summary["qkv_version"] == qkv.__version__
    assert {"worked_example", "masks", "backends"} <= set(summary["steps"])
    weights = np.array(summary["steps"]["worked_example"]["weights"])
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-5)
    bm = summary["steps"]["masks"]["block_mask"]
    assert sum(bm["counts"].values()) == (16384 // 128) ** 2 and bm["counts"]["EMPTY"] > 0
    rows = summary["steps"]["backends"]["rows"]
    assert {(r["L"], r["mask"]) for r in rows} == {(256, "none"), (256, "causal"), (512, "none"), (512, "causal")}
    for r in rows:
        assert r["math_ms"] > 0 and r["sdpa_ms"] > 0 and r["ratio"] > 0
        assert r["agree"] and r["max_abs_diff"] < 1e-4
    assert summary["steps"]["backends"]["machine"]["torch"]

    md = (out_dir / "summary.md").read_text()
    assert md.startswith("# qkv demo")
    table_rows = [line for line in md.splitlines() if line.startswith("| 256 |") or line.startswith("| 512 |")]
    assert len(table_rows) == 4
    train = summary["steps"]["training"]
    assert train["final_loss"] < train["first_loss"] and 0 < train["val_bpc"] < 8.0
    assert (out_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["steps"]["seq2seq"]["accuracy_after"] > summary["steps"]["seq2seq"]["accuracy_before"]
    assert (out_dir / "worked_example.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    minilm = summary["steps"]["attention_maps"]["minilm"]
    assert len(minilm["focus"]["per_layer"]) == 6 and minilm["focus"]["token"] == "it"
    assert (out_dir / "minilm" / "attention.html").stat().st_size > 0
    recall = summary["steps"]["attention_maps"]["recall"]
    assert 0.0 <= recall["accuracy"] <= 1.0 and 0.0 <= recall["pair_mass"] <= 1.0 and recall["steps"] == 150
    assert (out_dir / "recall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    hf = summary["steps"]["transformers"]                      # a transformers Llama on attn_implementation="qkv"
    assert hf["logits_match"] is True and len(hf["top"]) == 5 and "qkv.inspect.capture(model" in out
    # atomic writes leave no temporary files behind
    written = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
    assert {"loss.png", "summary.json", "summary.md", "worked_example.png", "minilm/heads.png"} <= set(written)
    assert all(p.rsplit(".", 1)[-1] in ("png", "json", "md", "html") and "/." not in "/" + p for p in written), written


def test_bench_writes_json_with_forward_and_backward(tmp_path, capsys):
    result = backends.run(tmp_path, lengths=[64], masks=("causal", "sliding_window(16)"), passes=("fwd", "fwd+bwd"))
    written = json.loads((tmp_path / "backends.json").read_text())
    assert written["rows"] == json.loads(json.dumps(result["rows"]))
    assert {(r["mask"], r["pass"]) for r in written["rows"]} == {
        ("causal", "fwd"), ("causal", "fwd+bwd"), ("sliding_window(16)", "fwd"), ("sliding_window(16)", "fwd+bwd")}
    assert all(r["agree"] and r["math_ms"] > 0 for r in written["rows"])
    assert written["machine"]["cpu"]
    assert "math/sdpa" in capsys.readouterr().out


def test_write_atomic_replaces_the_file(tmp_path):
    path = tmp_path / "x.json"
    write_text_atomic(path, "old")
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["x.json"]


def test_qkv_demo_is_the_tour_of_the_tools():
    assert qkv.demo is demo and demo.__name__ == "qkv.tools.demo"     # the lazy attribute keeps its name


# ----------------------------------------------------------------------------
# The installed command, in a fresh process
# ----------------------------------------------------------------------------

def test_console_script_backends():
    proc = subprocess.run([*qkv_command(), "backends"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert all(name in proc.stdout for name in ("reference", "math", "sdpa"))


def test_python_m_qkv_explain_is_identical_across_processes(capsys):
    """Token vectors come from sha256, not Python's salted hash(): a different hash seed changes nothing."""
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    proc = subprocess.run([sys.executable, "-m", "qkv", "explain", SENTENCE], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    _, out, _ = run_cli(capsys, "explain", SENTENCE)
    assert proc.stdout == out

    bad = subprocess.run([sys.executable, "-m", "qkv", "explain", ""], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "sentence is empty" in bad.stderr
