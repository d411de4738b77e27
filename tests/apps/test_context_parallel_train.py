"""`qkv train --context-parallel N` under torchrun (gloo, one thread per rank) against one process.

Legend: N context-parallel ranks per sequence, M data-parallel groups, W = N x M, T context.

Every sequence is split across N ranks (zigzag), the decoder's attention runs as ring attention and DDP
averages over all W ranks, so the run follows the one-process run up to float rounding: measured on
this tiny model over 8 steps, losses and gradient norms within 2e-7 relative (1.5e-7 over 20 steps
at T = 1024 on the default-style corpus).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from qkv import train

TINY = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "positions": "rope", "norm": "rms", "activation": "swiglu",
        "arch": "llama"}
TEXT = "".join(f"line {i % 17} says {'abc'[i % 3]} and {i % 5}.\n" for i in range(800))
CLI = ["--tokenizer", "char", "--steps", "8", "--batch-size", "4", "--context", "64", "--lr", "3e-3",
       "--warmup", "2", "--ckpt-every", "4", "--eval-every", "4"]
ARGS = dict(tokenizer="char", steps=8, batch_size=4, context=64, lr=3e-3, warmup=2, ckpt_every=4, eval_every=4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int, *args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "qkv", "train", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def history(ckpt) -> dict:
    return json.loads((ckpt / "training_state.json").read_text())["history"]


def close(a: list, b: list, rel: float = 2e-6) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rel * max(abs(x), abs(y), 1e-12) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cp-train")
    (d / "text.txt").write_text(TEXT)
    (d / "tiny.json").write_text(json.dumps(TINY))
    train.train_lm(d / "text.txt", out=d / "one", config=d / "tiny.json", plot=False, **ARGS)
    return d


@pytest.mark.slow
@pytest.mark.parametrize("n, extra", [(2, ["--context-parallel", "2"]),
                                      (4, ["--context-parallel", "2", "--data-parallel", "2"]),
                                      (4, ["--context-parallel", "4"])], ids=["cp2", "cp2xdp2", "cp4"])
def test_context_parallel_follows_one_process(files, n, extra):
    out = files / f"run-{n}-{'-'.join(extra[1::2])}"
    got = torchrun(n, str(files / "text.txt"), "--config", str(files / "tiny.json"), "--out", str(out), *CLI, *extra,
                   cwd=files)
    assert got.returncode == 0, got.stderr[-3000:]
    one, cp = history(files / "one" / "step-000008"), history(out / "step-000008")
    assert close(one["loss"], cp["loss"]), (one["loss"], cp["loss"])
    assert close(one["grad_norm"], cp["grad_norm"])
    assert close([v[1] for v in one["val"]], [v[1] for v in cp["val"]])


@pytest.mark.slow
def test_resume_with_context_parallel(files):
    """Stopped after step 4 (its checkpoint kept, step 8's removed), resumed under context parallelism:
    the losses continue as the one-process run's."""
    out = files / "resumed"
    got = torchrun(2, str(files / "text.txt"), "--config", str(files / "tiny.json"), "--out", str(out), *CLI,
                   "--context-parallel", "2", cwd=files)
    assert got.returncode == 0, got.stderr[-3000:]
    shutil.rmtree(out / "step-000008")
    got = torchrun(2, str(files / "text.txt"), "--config", str(files / "tiny.json"), "--out", str(out), *CLI,
                   "--context-parallel", "2", "--resume", cwd=files)
    assert got.returncode == 0, got.stderr[-3000:]
    assert close(history(files / "one" / "step-000008")["loss"], history(out / "step-000008")["loss"])


@pytest.mark.parametrize("world, kwargs, message", [
    (2, dict(context=63, context_parallel=2), "must be divisible by 2 x --context-parallel = 4"),
    (3, dict(context_parallel=2), "must divide the 3 processes"),
    (4, dict(context_parallel=2, data_parallel=3), "must equal the 4 processes"),
])
def test_bad_parallel_arguments_are_refused(files, monkeypatch, world, kwargs, message):
    """Refused from the launcher's environment, before any process group or data."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=message):
        train.train_lm(files / "text.txt", out=files / "bad", config=files / "tiny.json", plot=False,
                       **{**ARGS, **kwargs})
