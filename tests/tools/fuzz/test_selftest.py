"""The differential self-test harness (qkv.tools.selftest): it draws, replays, passes and catches.

Legend: B batch, Hq query heads, Hkv key/value heads, Lq/Lk lengths, D head dim.

A harness that cannot fail is worthless, so besides "0 mismatches on a fixed budget"
these tests break a backend on purpose and check that the runner reports it, with a
line that replays the case.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qkv
from qkv import cli
from qkv.tools import selftest

SEED = 20240607          # the bounded driver's seed: the same cases on every run
DRIVER_CASES = 400


# -----------------------------------------------------------------------------
# helpers


def first_case(seed: int, want) -> int:
    """The first case index of `seed` whose drawn parameters satisfy `want(case)`."""
    for index in range(5000):
        case = selftest.make_case(seed, index)
        if want(case):
            return index
    raise AssertionError("no such case in the first 5000")


def tiled_fp32_case(case) -> bool:
    p = case.params
    return (case.kind == "attention" and p["dtype"] == "fp32" and p["B"] * p["Hq"] * p["Lq"] > 8
            and p["Lk"] > 8 and p["mask"] is None and p["score_mod"] is None and p["grad"]
            and p["D"] == p["Dv"])


@pytest.fixture
def broken_tiled(monkeypatch):
    """`tiled` returning its output a relative 1e-4 off (a plausible precision bug, far above rounding)."""
    be = qkv.backends.get("tiled")
    forward = type(be).forward

    def off(self, call):
        out, lse, weights = forward(self, call)
        return out * (1 + 1e-4), lse, weights

    monkeypatch.setattr(type(be), "forward", off)


# -----------------------------------------------------------------------------
# drawing and replaying


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(index=st.integers(0, 10**6), seed=st.integers(0, 2**16))
def test_random_cases_pass(index, seed):
    """Cases drawn through the same generator as the driver, by hypothesis (derandomized in CI)."""
    result = selftest.run_case(seed, index)
    assert result.ok, result.report()


def test_bounded_driver_finds_no_mismatch():
    summary = selftest.run(max_cases=DRIVER_CASES, seed=SEED, progress=False)
    assert summary["cases"] == DRIVER_CASES
    assert summary["mismatches"] == [], selftest.summary_text(summary)
    assert set(summary["kinds"]) == {"attention", "approx", "cache"}
    per = summary["backends"]
    for name in ("sdpa", "tiled", "tiled:generic", "auto", "masks"):   # every exact backend really ran
        assert per[name]["forward"] > 0, name
    for name in ("sdpa", "tiled", "auto"):
        assert per[name]["grad"] > 0, name
    assert per["linear"]["forward"] + per["performer"]["forward"] > 0
    assert sum(c["forward"] for n, c in per.items() if n.startswith("cache:")) > 0


def test_a_case_is_a_function_of_seed_and_index():
    a, b = selftest.make_case(11, 42), selftest.make_case(11, 42)
    assert a.describe() == b.describe() and a.params == b.params
    assert selftest.make_case(11, 43).params != a.params
    assert selftest.make_case(12, 42).params != a.params
    first, again = selftest.run_case(11, 42), selftest.run_case(11, 42)
    assert first.description == again.description
    assert [(c.backend, c.what, c.err) for c in first.checks] == [(c.backend, c.what, c.err) for c in again.checks]


def test_the_reproducer_line_replays_the_same_case(capsys):
    index = first_case(5, lambda c: c.kind == "attention")
    line = selftest.reproducer(5, index)
    assert line == f"python -m qkv selftest --seed 5 --case {index}"
    argv = line.split()[3:]                                   # what follows `python -m qkv`
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert selftest.make_case(5, index).describe() in out     # the full description
    assert "PASS" in out and "forward" in out


def test_sizes_stay_bounded():
    """Long sequences are drawn, rarely, and every case fits the work cap."""
    lengths, works = [], []
    for index in range(400):
        p = selftest.make_case(3, index).params
        if "Lk" in p and "Lq" in p:
            lengths.append(p["Lk"])
            works.append(p["B"] * p["Hq"] * p["Lq"] * p["Lk"] * (p["D"] + p["Dv"]))
    assert max(lengths) > 256 and sorted(lengths)[len(lengths) // 2] < 100
    assert max(works) <= selftest.MAX_WORK


# -----------------------------------------------------------------------------
# the harness catches what is wrong


def test_a_perturbed_backend_is_a_mismatch_with_a_reproducer(broken_tiled, capsys):
    index = first_case(SEED, tiled_fp32_case)
    result = selftest.run_case(SEED, index)
    assert not result.ok
    assert any(f.startswith("tiled forward") for f in result.failures()), result.report()
    assert result.reproducer == f"python -m qkv selftest --seed {SEED} --case {index}"

    summary = selftest.run(max_cases=1, seed=SEED, start=index, progress=True)
    err = capsys.readouterr().err
    assert [m["case"] for m in summary["mismatches"]] == [index]
    assert summary["mismatches"][0]["reproducer"] == result.reproducer
    assert f"MISMATCH: {result.reproducer}" in err               # one line that replays it
    assert summary["errors_by_kind"].get("tiled forward") == 1


def test_a_wrong_gradient_is_a_mismatch(monkeypatch):
    from qkv.backends import tiled

    backward = tiled.tiled_backward

    def off(*args, **kw):
        dq, dk, dv, dparams = backward(*args, **kw)
        return dq, dk, dv * (1 + 1e-4), dparams

    monkeypatch.setattr(tiled, "tiled_backward", off)
    # Dv != D: tiled's own engine (whose backward is patched), not torch's fused kernel
    generic = lambda c: (c.kind == "attention" and c.params["dtype"] == "fp32" and c.params["grad"]
                         and c.params["D"] != c.params["Dv"] and c.params["Dv"] > 0
                         and c.params["B"] * c.params["Hq"] * c.params["Lq"] > 8 and c.params["Lk"] > 8)
    result = selftest.run_case(SEED, first_case(SEED, generic))
    assert "tiled grad dv" in result.failures(), result.report()


def test_a_row_with_no_allowed_key_must_be_zeros(monkeypatch):
    be = qkv.backends.get("tiled")
    forward = type(be).forward

    def leaky(self, call):
        out, lse, weights = forward(self, call)
        return out + 1e-30, lse, weights           # numerically nothing, but not the zeros DESIGN.md defines

    monkeypatch.setattr(type(be), "forward", leaky)
    index = first_case(SEED, lambda c: c.kind == "attention" and c.params["mask"] is not None
                       and c.params["mask"][0] == "padding" and 0 in c.params["mask"][1] and c.params["Hq"] > 0
                       and c.params["Lq"] > 0)
    result = selftest.run_case(SEED, index)
    assert any(f.startswith("tiled empty rows") for f in result.failures()), result.report()


def test_an_unexpected_exception_is_a_failure_but_a_refusal_is_not(monkeypatch):
    be = qkv.backends.get("sdpa")

    def crash(self, call):
        raise RuntimeError("boom")

    monkeypatch.setattr(type(be), "forward", crash)
    index = first_case(SEED, lambda c: c.kind == "attention" and c.params["score_mod"] is None
                       and not c.params["return_lse"] and not c.params["return_weights"]
                       and c.params["B"] * c.params["Hq"] * c.params["Lq"] * c.params["Lk"] > 0)
    result = selftest.run_case(SEED, index)
    assert not result.ok and any("sdpa: RuntimeError: boom" in e for e in result.errors), result.report()

    refused = first_case(SEED, lambda c: c.kind == "attention" and c.params["score_mod"] is not None
                         and c.params["B"] * c.params["Hq"] * c.params["Lq"] * c.params["Lk"] > 0)
    result = selftest.run_case(SEED, refused)
    assert "sdpa" in result.skipped and "score_mod" in result.skipped["sdpa"]


def test_a_wrong_mask_is_caught_against_its_definition(monkeypatch):
    from qkv import masks

    monkeypatch.setattr(masks._SlidingWindow, "__call__",
                        lambda self, b, h, q, kv: (q - kv >= 0) & (q - kv <= self.window))   # one key too many
    index = first_case(SEED, lambda c: c.kind == "attention" and c.params["mask"] is not None
                       and c.params["mask"][0] == "window" and c.params["Lq"] * c.params["Lk"] > 0
                       and c.params["mask"][1] < c.params["Lk"] and c.params["mask"][2]
                       and c.params["B"] * c.params["Hq"] > 0)
    result = selftest.run_case(SEED, index)
    assert any(f.startswith("masks definition") for f in result.failures()), result.report()


def test_the_error_rule():
    oracle = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    base = (oracle + torch.tensor([1e-6, 0, 0], dtype=torch.float64)).float()
    assert selftest.ratio_check(base, base, oracle).ok
    assert selftest.ratio_check((oracle + 1.9e-6).float(), base, oracle).ok
    assert not selftest.ratio_check((oracle + 3e-6).float(), base, oracle).ok
    assert selftest.ratio_check((oracle + 2.9e-6).float(), base, oracle, ratio=3.0).ok
    nan = torch.tensor([float("nan"), 0, 0])
    assert not selftest.ratio_check(nan, base, oracle).ok
    exact = oracle.float()                                    # a baseline exact to the last bit: the floor decides
    assert selftest.ratio_check(exact.nextafter(torch.tensor(9.0)), exact, oracle).ok


# -----------------------------------------------------------------------------
# the command


def test_cli_exit_status_and_json(tmp_path, capsys):
    path = tmp_path / "out" / "selftest.json"
    assert cli.main(["selftest", "--seed", "3", "--max-cases", "4", "--json", str(path)]) == 0
    captured = capsys.readouterr()
    assert "selftest seed 3: 4 cases" in captured.err             # the progress line
    assert "4 cases in" in captured.out
    summary = json.loads(path.read_text())
    assert summary["seed"] == 3 and summary["cases"] == 4 and summary["mismatches"] == []
    assert not list(path.parent.glob(".*.tmp"))                  # the temporary file was renamed away


def test_cli_exit_status_is_1_on_a_mismatch(broken_tiled, capsys):
    index = first_case(SEED, tiled_fp32_case)
    assert cli.main(["selftest", "--seed", str(SEED), "--case", str(index)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"FAIL tiled +forward", out) and "MISMATCH" in out


@pytest.mark.parametrize("argv, message", [
    (["selftest", "--case", "3"], "--case needs the --seed"),
    (["selftest", "--seed", "1", "--case", "-1"], "--case must be >= 0"),
    (["selftest", "--minutes", "0"], "--minutes must be > 0"),
    (["selftest", "--max-cases", "0"], "--max-cases must be >= 1"),
])
def test_cli_usage_errors(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


# -----------------------------------------------------------------------------
# qkv selftest --backend triton: its kernels fuzzed (in Triton's interpreter without a GPU)


@pytest.mark.slow
def test_selftest_fuzzes_the_triton_backend_alone(monkeypatch):
    pytest.importorskip("triton")
    try:
        summary = selftest.run(max_cases=12, seed=SEED, progress=False, backend="triton")
    finally:
        selftest.only(None)
    assert summary["kinds"] == {"attention": 12}
    assert set(summary["backends"]) <= {"triton", "masks"}
    assert summary["backends"]["triton"]["forward"] >= 4, summary["backends"]
    assert not summary["mismatches"], summary["mismatches"]


def test_selftest_backend_catches_a_broken_triton_kernel(monkeypatch):
    pytest.importorskip("triton")
    from qkv.backends import triton_backend

    real = triton_backend._Attention.apply
    monkeypatch.setattr(triton_backend._Attention, "apply", lambda *a: tuple(t * 1.01 for t in real(*a)))
    index = first_case(SEED, lambda c: c.kind == "attention" and c.params["dtype"] == "fp32"
                       and c.params["score_mod"] is None and c.params["mask"] is None and not c.params.get("dropout_p")
                       and not c.params.get("return_weights") and c.params["Lq"] * c.params["Lk"] <= 4096
                       and c.params["D"] <= 64 and c.params["Lq"] > 0 and c.params["Lk"] > 0)
    selftest.only("triton")
    try:
        result = selftest.run_case(SEED, index)
        line = result.reproducer
    finally:
        selftest.only(None)
    assert not result.ok and line.endswith("--backend triton")


def test_selftest_backend_refuses_an_approximate_or_unknown_name(capsys):
    assert cli.main(["selftest", "--backend", "linear", "--max-cases", "1"]) == 2
    assert "exact backend" in capsys.readouterr().err
    assert cli.main(["selftest", "--backend", "nope", "--max-cases", "1"]) == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err
    assert selftest.attention.exact_backends()[-1] == "auto"        # nothing left restricted
