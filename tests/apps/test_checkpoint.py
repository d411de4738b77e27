"""Tests for qkv.checkpoint: atomic writes, pruning, verification, and a training run killed mid-write.

The fault test is deterministic: QKV_CHECKPOINT_STALL="STEP:FILE" makes the writer of
step STEP create FILE halfway through the write and sleep, and the test SIGKILLs it then.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from qkv import checkpoint, train
from qkv.models import hf

TINY = {"d_model": 32, "n_layers": 1, "n_heads": 2, "arch": "gpt2"}
TEXT = "".join(f"line {i % 17} says {'abc'[i % 3]} and {i % 5}.\n" for i in range(600))
ARGS = dict(tokenizer="char", steps=8, batch_size=4, context=16, lr=3e-3, warmup=2, accum_steps=2, ckpt_every=3)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def corpus(tmp_path):
    f = tmp_path / "text.txt"
    f.write_text(TEXT)
    return f


def train_run(corpus, out, **kw):
    return train.train_lm(corpus, out=out, config=TINY, plot=False, **{**ARGS, **kw})


def test_save_is_complete_and_keeps_the_newest(corpus, tmp_path):
    out = tmp_path / "run"
    train_run(corpus, out, steps=12, keep=2)               # checkpoints at 3, 6, 9, 12
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-000009", "step-000012"]
    assert checkpoint.latest(out).name == "step-000012"
    state = checkpoint.verify(out / "step-000012")
    assert state["step"] == 12 and state["data_position"] == {"seed": 0, "step": 12}
    assert set(state["files"]) == {"config.json", "model.safetensors", "training_state.safetensors", "tokenizer.json"}
    assert len(state["history"]["loss"]) == 12
    assert not list(out.glob(".tmp-*"))


def test_corrupt_or_truncated_checkpoint_is_refused_naming_the_previous(corpus, tmp_path):
    out = tmp_path / "run"
    train_run(corpus, out, steps=6)
    new, old = out / "step-000006", out / "step-000003"
    weights = new / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])        # truncated
    with pytest.raises(checkpoint.CheckpointError, match=r"corrupt or truncated.*previous valid checkpoint is .*"
                                                         r"step-000003"):
        checkpoint.load(new)
    assert checkpoint.latest(out) == old
    assert checkpoint.load(old).step == 3
    state_file = old / "training_state.json"
    state = json.loads(state_file.read_text())
    state["step"] = 4                                        # edited after writing
    state_file.write_text(json.dumps(state))
    with pytest.raises(checkpoint.CheckpointError, match="modified after it was written.*no earlier valid"):
        checkpoint.load(old)
    assert checkpoint.latest(out) is None
    (new / "training_state.json").write_text('{"step": ')   # truncated JSON
    with pytest.raises(checkpoint.CheckpointError, match="truncated or not JSON"):
        checkpoint.verify(new)


def test_resume_skips_an_invalid_newest_checkpoint(corpus, tmp_path, capsys):
    full = train_run(corpus, tmp_path / "full")
    out = tmp_path / "part"
    train_run(corpus, out, stop_after=6)
    (out / "step-000006" / "model.safetensors").write_bytes(b"garbage")
    rest = train_run(corpus, out, resume=True)
    assert "skipping" in capsys.readouterr().err
    assert rest.resumed_from.name == "step-000003"
    assert rest.history.loss == full.history.loss
    assert checkpoint.verify(out / "step-000006")["step"] == 6          # rewritten, valid again


def _cli(corpus, out, cfg, steps=8):
    return [sys.executable, "-m", "qkv", "train", str(corpus), "--tokenizer", "char", "--config", str(cfg),
            "--steps", str(steps), "--batch-size", "4", "--context", "16", "--lr", "0.003", "--warmup", "2",
            "--accum", "2", "--ckpt-every", "3", "--out", str(out)]


def test_sigkill_while_writing_a_checkpoint_loses_nothing(corpus, tmp_path):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "run"
    signal_file = tmp_path / "writing"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QKV_CHECKPOINT_STALL": f"6:{signal_file}"}
    proc = subprocess.Popen(_cli(corpus, out, cfg), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not signal_file.exists():
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the run never reached the step-6 checkpoint"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # killed halfway through step 6: its weights are in a temporary folder, never in place
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-000003"]
    assert [p.name for p in out.glob(".tmp-step-000006-*")]
    ck = checkpoint.load(out / "step-000003")
    assert ck.step == 3 and checkpoint.latest(out) == out / "step-000003"
    hf.load(out / "step-000003")

    env.pop("QKV_CHECKPOINT_STALL")
    done = subprocess.run(_cli(corpus, out, cfg) + ["--resume"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "bits per character" in done.stdout
    assert not list(out.glob(".tmp-*"))
    resumed = checkpoint.verify(out / "step-000008")["history"]["loss"]
    # the uninterrupted run, in this process with the same single thread
    full = train_run(corpus, tmp_path / "full")
    assert resumed == full.history.loss


def test_bad_keep_and_not_a_checkpoint(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint folder"):
        checkpoint.load(tmp_path / "nothing")
    (tmp_path / "step-000001").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="no training_state.json"):
        checkpoint.verify(tmp_path / "step-000001")
    assert checkpoint.latest(tmp_path) is None
    with pytest.raises(ValueError, match="keep must be an int >= 1"):
        checkpoint.save(tmp_path, 2, None, {}, {}, keep=0)
