"""Context parallelism on gloo: 2 and 4 CPU processes against one process on the whole sequence.

Legend: N ranks, L whole length, Lr = L / N rows per rank.

Each run starts N `cp_worker.py` processes (one thread each) that run many cases in one go; the rows
they return are put back in sequence order and judged by DESIGN.md's error-ratio rule against the
float64 oracle, with float32 `math` on the whole sequence as the baseline: outputs and LSE 2x,
gradients (q, k, v, sinks) 3x. The messages each rank sent are the algorithm's numbers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_error_ratio

import qkv
from qkv.distributed import choose_strategy, order, pieces, positions, ring_attention, shard, unshard
from qkv.distributed.ring import plan_steps

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("cp_worker", HERE / "cp_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

MASKS = ("causal", "window", "document", "prefix", "callable", "none")


def _cases(world: int) -> list[dict]:
    cases = []
    for layout in ("zigzag", "contiguous", "striped"):
        for m in MASKS:
            if world == 4 and layout != "zigzag" and m not in ("causal", "document"):
                continue
            cases.append({"name": f"{layout}-{m}", "layout": layout, "mask": m, "seed": len(cases)})
    more = [
        {"name": "gqa", "mask": "causal", "Hq": 4, "Hkv": 2},
        {"name": "mqa-window", "mask": "window", "Hq": 4, "Hkv": 1, "layout": "striped"},
        {"name": "alibi", "mask": "causal", "alibi": True},
        {"name": "alibi-contiguous", "mask": "none", "alibi": True, "layout": "contiguous"},
        {"name": "sinks", "mask": "window", "sinks": True},
        {"name": "sinks-out-only", "mask": "causal", "sinks": True, "lse_grad": False},
        {"name": "out-only", "mask": "causal", "lse_grad": False},
        {"name": "ulysses-causal", "mask": "causal", "strategy": "ulysses"},
        {"name": "ulysses-document-gqa", "mask": "document", "strategy": "ulysses", "Hq": 8, "Hkv": 4,
         "layout": "contiguous"},
        {"name": "ulysses-alibi-sinks", "mask": "callable", "strategy": "ulysses", "alibi": True, "sinks": True,
         "layout": "striped"},
    ]
    for i, c in enumerate(more):
        c.setdefault("seed", 100 + i)
    return cases + more


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, cases: list[dict], out: Path, timeout: float = 300, env_extra=None):
    """Run the cases on `world` worker processes; returns their (returncode, stderr) after all exit."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "cases.json").write_text(json.dumps(cases))
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    names = ",".join(c["name"] for c in cases)
    procs = [subprocess.Popen([sys.executable, str(HERE / "cp_worker.py"), str(r), str(world), str(port), str(out),
                               names], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    results = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise AssertionError(f"a rank still runs after {timeout} s: a hang") from None
        results.append((p.returncode, err))
    return results


def gathered(out: Path, name: str, world: int, layout: str) -> dict:
    parts = [torch.load(out / f"{name}-{r}.pt") for r in range(world)]
    whole = {key: order(torch.cat([p[key] for p in parts], dim=2), layout, world) for key in ("out", "lse", "dq",
                                                                                              "dk", "dv")}
    if "dsinks" in parts[0]:
        whole["dsinks"] = sum(p["dsinks"] for p in parts)       # each rank's share of a replicated tensor
    whole["traffic"] = [p["traffic"] for p in parts]
    return whole


def whole_sequence(case: dict, L: int, dtype, backend: str) -> dict:
    """out, lse and gradients of one process on the whole sequence."""
    t, extra = worker.inputs(case, L)
    x = {n: t[n].to(dtype).requires_grad_() for n in ("q", "k", "v")}
    extra = worker.cast(extra, dtype)
    out, lse = qkv.attention(x["q"], x["k"], x["v"], q_offset=0, return_lse=True, backend=backend, **extra)
    loss = (out * t["w_out"].to(dtype)).sum()
    if case.get("lse_grad", True):
        loss = loss + (lse * t["w_lse"].to(lse.dtype)).sum()
    loss.backward()
    got = {"out": out.detach(), "lse": lse.detach(), "dq": x["q"].grad, "dk": x["k"].grad, "dv": x["v"].grad}
    if "sinks" in extra:
        got["dsinks"] = extra["sinks"].grad
    return got


def judge(case: dict, got: dict, L: int) -> None:
    oracle = whole_sequence(case, L, torch.float64, "math")
    base = whole_sequence(case, L, torch.float32, "math")
    for key in oracle:
        assert_error_ratio(got[key], base[key], oracle[key], ratio=2.0 if key in ("out", "lse") else 3.0,
                           what=f"{case['name']} {key}")


def expected_messages(case: dict, world: int) -> dict:
    """The algorithm's numbers per rank: forward N - 1 sends, backward (N - 1) + N; all-to-all
    4 exchanges each way, plus one for the LSE."""
    if case.get("strategy") == "ulysses":
        return {"collectives": {"forward": 5, "backward": 5 if case.get("lse_grad", True) else 4}}
    return {"sent": {"forward": world - 1, "backward": 2 * world - 1},
            "received": {"forward": world - 1, "backward": 2 * world - 1}}


@pytest.fixture(scope="module", params=[2, 4], ids=["2-ranks", "4-ranks"])
def run(request, tmp_path_factory):
    world = request.param
    cases = _cases(world)
    out = tmp_path_factory.mktemp(f"cp{world}")
    results = launch(world, cases, out)
    for rank, (code, err) in enumerate(results):
        assert code == 0, f"rank {rank} exited with {code}:\n{err[-3000:]}"
    return world, cases, out


def test_every_case_equals_one_process(run):
    world, cases, out = run
    L = 96
    for case in cases:
        got = gathered(out, case["name"], world, case.get("layout", "zigzag"))
        judge(case, got, L)


def test_messages_are_the_algorithms(run):
    world, cases, out = run
    for case in cases:
        got = gathered(out, case["name"], world, case.get("layout", "zigzag"))
        want = expected_messages(case, world)
        for rank, traffic in enumerate(got["traffic"]):
            for table, counts in want.items():
                assert traffic[table] == counts, f"{case['name']} rank {rank} {table}: {traffic[table]} != {counts}"


def test_a_failing_rank_stops_every_rank(tmp_path):
    """Rank 1 raises before it attends; rank 0, waiting in the ring, exits with an error naming the ring."""
    cases = [{"name": "fail", "mask": "causal"}]
    results = launch(2, cases, tmp_path, timeout=120, env_extra={"QKV_CP_TIMEOUT": "20"})
    (code0, err0), (code1, err1) = results
    assert code1 != 0 and "rank 1 stops here on purpose" in err1
    assert code0 != 0
    assert "context parallel, rank 0" in err0, err0[-2000:]


# -- in one process ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_and_order_are_inverse(layout, world):
    L = 24 * world
    x = torch.randn(2, 3, L, 5)
    rows = [shard(x, layout, rank=r, size=world) for r in range(world)]
    assert all(r.shape == (2, 3, L // world, 5) for r in rows)
    assert torch.equal(order(torch.cat(rows, dim=2), layout, world), x)
    held = torch.cat([positions(layout, L, r, world) for r in range(world)])
    assert torch.equal(held.sort().values, torch.arange(L))            # every position once
    ids = torch.arange(L)
    assert torch.equal(shard(ids, layout, rank=world - 1, size=world, dim=-1), positions(layout, L, world - 1, world))


def test_zigzag_balances_causal_work():
    """Allowed query-key pairs per rank under a causal mask: zigzag equal, contiguous 1 : 3 on 2 ranks."""
    L, N = 64, 2
    for layout, balanced in (("zigzag", True), ("contiguous", False)):
        work = []
        for r in range(N):
            pos = positions(layout, L, r, N)
            work.append(int((pos + 1).sum()))
        assert (work[0] == work[1]) is balanced, (layout, work)


def test_empty_pieces_are_not_computed():
    """Contiguous causal on 4 ranks: rank 0 computes only its own shard; rank 3 every shard; a window
    of 10 never reaches two shards back."""
    L, N = 64, 4
    counts = [sum(len(s) for s in plan_steps(qkv.masks.causal(), "contiguous", L, r, N, 1, 1)) for r in range(N)]
    assert counts == [1, 2, 3, 4]
    steps = plan_steps(qkv.masks.sliding_window(10), "contiguous", L, 3, N, 1, 1)
    assert [len(s) for s in steps] == [1, 1, 0, 0]
    assert [t.partial for t in steps[0] + steps[1]] == [True, True]
    full = plan_steps(qkv.masks.causal(), "contiguous", L, 3, N, 1, 1)
    assert [t.partial for s in full for t in s] == [True, False, False, False]   # off-diagonal: no mask at all


def test_one_process_is_the_whole_sequence():
    q, k, v = (torch.randn(1, 2, 40, 8, dtype=torch.float64) for _ in range(3))
    got = ring_attention(q, k, v, causal=True, layout="contiguous")
    assert torch.allclose(got, qkv.attention(q, k, v, causal=True, q_offset=0), atol=1e-12)
    assert torch.equal(unshard(got, "contiguous"), got)


def test_strategy_rule():
    assert choose_strategy(8, 8, 2) == "ring"          # a tie: the ring overlaps
    assert choose_strategy(8, 8, 4) == "ulysses"
    assert choose_strategy(8, 2, 4) == "ring"          # GQA: K/V are small, the ring sends less
    assert choose_strategy(8, 2, 8) == "ring"          # 8 does not divide Hkv = 2
    assert choose_strategy(6, 6, 4) == "ring"          # 4 does not divide 6


def test_bad_input_is_refused_clearly():
    q = torch.randn(1, 2, 9, 8)
    with pytest.raises(ValueError, match="zigzag layout over 1 ranks splits a sequence into 2 equal parts"):
        ring_attention(q, q, q, layout="zigzag")
    q = torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match="layout must be one of"):
        ring_attention(q, q, q, layout="spiral")
    with pytest.raises(ValueError, match="self-attention over one sharded sequence"):
        ring_attention(q, torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8), layout="contiguous")
    with pytest.raises(ValueError, match="not divisible by 3"):
        pieces("contiguous", 10, 0, 3)


@pytest.mark.parametrize("layout", ["zigzag", "striped"])
@pytest.mark.parametrize("mask", ["causal", "document", "callable"])
def test_triton_pieces_under_the_interpreter(layout, mask):
    """The ring's pieces on the triton backend (Triton's interpreter on CPU tensors): its backward takes the
    merged rows' out, LSE and their gradients (the LSE's too), one launch per piece. One process holds
    both ranks' pieces of a 2-rank layout (`ring_attention` in one process runs every piece), judged
    against the whole sequence."""
    pytest.importorskip("triton")
    case = {"name": "t", "mask": mask, "Hq": 4, "Hkv": 2, "sinks": mask == "causal"}
    L = 48
    t, extra = worker.inputs(case, L)
    extra = worker.cast(extra, torch.float32)
    x = {n: t[n].float().requires_grad_() for n in ("q", "k", "v")}
    out, lse = ring_attention(x["q"], x["k"], x["v"], layout=layout, return_lse=True, backend="triton", **extra)
    ((out * t["w_out"].float()).sum() + (lse * t["w_lse"].float()).sum()).backward()
    got = {"out": out.detach(), "lse": lse.detach(), "dq": x["q"].grad, "dk": x["k"].grad, "dv": x["v"].grad}
    if "sinks" in extra:
        got["dsinks"] = extra["sinks"].grad
    judge(case, got, L)
