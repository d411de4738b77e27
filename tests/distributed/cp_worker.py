"""One rank of a context-parallel test: `python cp_worker.py RANK WORLD PORT OUT CASES`.

Every rank builds the same whole-sequence inputs from a seed, keeps its rows (`shard`), runs the
cases and saves its rows of the output, LSE and gradients (and its messages) to OUT/<case>-<rank>.pt;
the test puts the rows back together and judges them against one process on the whole sequence.
A case named "fail" makes rank 1 raise before it attends, to show the others stop too.
"""

from __future__ import annotations

import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from qkv import masks, scores
from qkv.distributed import context_attention, count, shard

B, D = 2, 16


def inputs(case: dict, L: int):
    """Whole-sequence q, k, v, the loss weights, and the mask / score_mod / sinks of a case."""
    g = torch.Generator().manual_seed(case.get("seed", 0))
    Hq, Hkv = case.get("Hq", 4), case.get("Hkv", 4)
    t = {n: torch.randn(B, h, L, D, generator=g, dtype=torch.float64)
         for n, h in (("q", Hq), ("k", Hkv), ("v", Hkv), ("w_out", Hq))}
    t["w_lse"] = torch.randn(B, Hq, L, generator=g, dtype=torch.float64)
    extra = {}
    kind = case["mask"]
    if kind == "causal":
        extra["causal"] = True
    elif kind == "window":
        extra["mask"] = masks.sliding_window(L // 5)
    elif kind == "document":
        ids = torch.cat([torch.full((n,), i) for i, n in enumerate((L // 3 + 1, L // 4, L - L // 3 - 1 - L // 4))])
        extra["mask"] = masks.document(ids) & masks.causal()          # documents cross the shards' edges
    elif kind == "prefix":
        extra["mask"] = masks.prefix_lm(L // 3)
    elif kind == "callable":
        extra["mask"] = lambda b, h, q, kv: (kv <= q) & ((q - kv) % 3 != 1)
    if case.get("alibi"):
        extra["score_mod"] = scores.alibi(torch.linspace(0.5, 0.05, Hq, dtype=torch.float64))
    if case.get("sinks"):
        extra["sinks"] = torch.linspace(-1.0, 1.0, Hq, dtype=torch.float64)
    return t, extra


def cast(extra: dict, dtype) -> dict:
    out = dict(extra)
    if "sinks" in out:
        out["sinks"] = out["sinks"].to(dtype).requires_grad_()
    if "score_mod" in out:
        out["score_mod"] = scores.alibi(out["score_mod"].slopes.to(dtype))
    return out


def run_case(case: dict, rank: int, world: int, out_dir: str) -> None:
    L = case.get("L", 96)
    layout = case.get("layout", "zigzag")
    t, extra = inputs(case, L)
    dtype = torch.float32
    local = {n: shard(x.to(dtype), layout, rank=rank, size=world, dim=2) for n, x in t.items()}
    for n in ("q", "k", "v"):
        local[n].requires_grad_()
    extra = cast(extra, dtype)
    with count() as traffic:
        out, lse = context_attention(local["q"], local["k"], local["v"], strategy=case.get("strategy", "ring"),
                                     layout=layout, return_lse=True, **extra)
        loss = (out * local["w_out"]).sum()
        if case.get("lse_grad", True):
            loss = loss + (lse * local["w_lse"]).sum()
        loss.backward()
    saved = {"out": out.detach(), "lse": lse.detach(), "dq": local["q"].grad, "dk": local["k"].grad,
             "dv": local["v"].grad, "traffic": traffic.__dict__}
    if "sinks" in extra:
        saved["dsinks"] = extra["sinks"].grad
    torch.save(saved, f"{out_dir}/{case['name']}-{rank}.pt")


def main() -> None:
    rank, world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    names = sys.argv[5].split(",")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    import json
    cases = json.loads(open(f"{out_dir}/cases.json").read())
    try:
        for case in cases:
            if case["name"] not in names:
                continue
            if case["name"] == "fail" and rank == 1:
                raise ValueError("rank 1 stops here on purpose")
            run_case(case, rank, world, out_dir)
    finally:
        if not any(c["name"] == "fail" for c in cases if c["name"] in names):
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
