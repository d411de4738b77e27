"""Tests for data-parallel `qkv train`: 2 gloo processes on the CPU against one process with the same global batch.

Legend: B global batch, W world size, T context.

Each multi-process run is a `python -m torch.distributed.run --nproc_per_node=2` child (one intra-op thread per
worker) on a tiny decoder for a few steps. Measured agreement with one process (6 steps, accum 2): training losses
within 4e-8 relative, gradient norms within 2e-7 relative, the validation loss identical, every weight within
6e-8 absolute except the attention key bias (see `assert_weights_match`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from qkv import checkpoint, cli, distributed, train

TINY = {"d_model": 32, "n_layers": 1, "n_heads": 2, "arch": "gpt2"}
TEXT = "".join(f"line {i % 17} says {'abc'[i % 3]} and {i % 5}.\n" for i in range(600))
ARGS = dict(tokenizer="char", steps=6, batch_size=4, context=16, lr=3e-3, warmup=2, accum_steps=2, ckpt_every=3)
CLI_ARGS = ["--tokenizer", "char", "--steps", "6", "--batch-size", "4", "--context", "16", "--lr", "3e-3",
            "--warmup", "2", "--accum", "2", "--ckpt-every", "3"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    (d / "text.txt").write_text(TEXT)
    (d / "tiny.json").write_text(json.dumps(TINY))
    return d


@pytest.fixture(scope="module")
def one_process(files):
    """The reference: one process, the same global batch."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.train_lm(files / "text.txt", out=files / "one", config=TINY, plot=False, **ARGS)
    finally:
        torch.set_num_threads(before)
    return files / "one"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def state(ckpt) -> dict:
    return json.loads((ckpt / checkpoint.STATE_JSON).read_text())


def assert_histories_match(a, b) -> None:
    ha, hb = state(a)["history"], state(b)["history"]
    assert len(ha["loss"]) == len(hb["loss"]) == int(a.name.split("-")[1])
    torch.testing.assert_close(torch.tensor(hb["loss"], dtype=torch.float64),
                               torch.tensor(ha["loss"], dtype=torch.float64), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(hb["grad_norm"], dtype=torch.float64),
                               torch.tensor(ha["grad_norm"], dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert ha["lr"] == hb["lr"]
    va, vb = {v[0]: v[1:] for v in ha["val"]}, {v[0]: v[1:] for v in hb["val"]}
    common = sorted(va)
    assert va.keys() <= vb.keys()                              # a stopped-and-resumed run validates once more
    torch.testing.assert_close(torch.tensor([vb[s] for s in common], dtype=torch.float64),
                               torch.tensor([va[s] for s in common], dtype=torch.float64), rtol=1e-6, atol=1e-7)


def assert_weights_match(a, b) -> None:
    """Weights and AdamW moments allclose (rtol 1e-5, atol 1e-6). One exception: GPT-2's key bias, whose exact
    gradient is zero (a constant added to every score of a query row cancels in the softmax): its gradient is
    rounding noise, different for every summation order, so it is only checked to stay within noise size."""
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    d = TINY["d_model"]
    for k in wa:
        x, y = wa[k], wb[k]
        if k.endswith("attn.c_attn.bias"):                  # (3d,) = q | k | v
            assert (x[d:2 * d] - y[d:2 * d]).abs().max() < 1e-4, k
            x, y = torch.cat([x[:d], x[2 * d:]]), torch.cat([y[:d], y[2 * d:]])
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    sa, sb = (load_file(c / checkpoint.STATE_TENSORS) for c in (a, b))
    assert sa.keys() == sb.keys()
    for k in sa:
        if k.startswith("opt.") and k.endswith("exp_avg_sq"):     # squared gradients: noise-sized terms are tiny
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")


def test_torchrun_two_processes_match_one(files, one_process, tmp_path):
    r = torchrun("-m", "qkv", "train", str(files / "text.txt"), "--config", str(files / "tiny.json"), *CLI_ARGS,
                 "--out", str(tmp_path / "two"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "two"
    assert [p.name for p in checkpoint.list_checkpoints(two)] == ["step-000003", "step-000006"]
    assert not list(two.glob(".tmp-*"))
    assert (two / "loss.png").is_file()
    for name in ("step-000003", "step-000006"):
        checkpoint.verify(two / name)
        assert_histories_match(one_process / name, two / name)
    assert_weights_match(one_process / "step-000006", two / "step-000006")
    # progress from rank 0 only: one line for the last step
    assert r.stderr.count("step 6/6") == 1, r.stderr[-3000:]


WORKER = """
import faulthandler; faulthandler.dump_traceback_later(90, exit=True)  # a hang fails with its stack
import json, os, sys
import torch
torch.set_num_threads(1)
from qkv import checkpoint, train

rank = int(os.environ["RANK"])
log = sys.argv[2]
save = checkpoint.save

def logged_save(run_dir, step, *a, **kw):
    with open(log, "a") as f:
        f.write(json.dumps([rank, step]) + "\\n")
    return save(run_dir, step, *a, **kw)

checkpoint.save = logged_save
kw = json.loads(sys.argv[3])
if sys.argv[4] == "first":
    result = train.train_lm(sys.argv[1], stop_after=3, **kw)
    assert str(result.checkpoint).endswith("step-000003")
else:
    result = train.train_lm(sys.argv[1], resume=True, **kw)
    assert str(result.checkpoint).endswith("step-000006")
assert not torch.distributed.is_initialized()
"""


def test_checkpoints_by_rank_0_once_and_resume_matches(files, one_process, tmp_path):
    """Rank 0 writes each checkpoint exactly once; a run stopped at step 3 and resumed by a second launch
    (every rank loading the same checkpoint) ends where one uninterrupted process does."""
    script, log, out = tmp_path / "worker.py", tmp_path / "saves.jsonl", tmp_path / "run"
    script.write_text(textwrap.dedent(WORKER))
    kw = {**ARGS, "out": str(out), "config": TINY, "plot": False}
    for mode in ("first", "resume"):                      # a stopped run, then a new launch that resumes it
        r = torchrun(str(script), str(files / "text.txt"), str(log), json.dumps(kw), mode, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
    calls = [tuple(json.loads(line)) for line in log.read_text().splitlines()]
    assert calls == [(0, 3), (0, 6)]
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-000003", "step-000006"]
    assert_histories_match(one_process / "step-000006", out / "step-000006")
    assert_weights_match(one_process / "step-000006", out / "step-000006")


def test_batch_not_divisible_by_world_size(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    # refused before the process group would wait for the other rank
    with pytest.raises(ValueError, match=r"batch_size \(--batch-size\) 5 is the global batch and must be divisible "
                                         r"by the 2 processes.*use 4 or 6"):
        train.train_lm(files / "text.txt", out=tmp_path / "a", config=TINY, **{**ARGS, "batch_size": 5})
    assert not torch.distributed.is_initialized()
    assert cli.main(["train", str(files / "text.txt"), "--config", str(files / "tiny.json"), *CLI_ARGS,
                     "--batch-size", "3", "--out", str(tmp_path / "b")]) == 2
    assert "must be divisible by the 2 processes" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_world_from_environment(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.env_world() == distributed.World(0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    w = distributed.env_world()
    assert (w.rank, w.size, w.local_rank, w.main, w.distributed) == (3, 4, 1, False, True)
    x = torch.arange(8 * 3).reshape(8, 3)                                         # (B, T+1)
    assert torch.equal(distributed.shard_rows(x, w), x[6:8])
    assert torch.cat([distributed.shard_rows(x, distributed.World(r, 4)) for r in range(4)]).equal(x)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="inconsistent launcher environment"):
        distributed.env_world()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK='x' must be an integer"):
        distributed.env_world()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR, MASTER_PORT is not set; launch with torchrun"):
        with distributed.process_group():
            pass
