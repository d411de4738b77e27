"""Training checkpoints that are either complete or absent.

A run directory holds one folder per checkpoint::

    run_dir/step-000123/
        config.json                   \\ written by qkv.models.hf.save: `qkv generate --checkpoint`
        model.safetensors             /  and qkv.models.hf.load read the folder as a model
        training_state.safetensors    optimizer tensors ("opt.{i}.{name}"), torch's RNG state ("rng.torch")
        training_state.json           step, config, train args, optimizer groups, python/numpy RNG states,
                                      data position, history, the sha256 of every other file and of itself
        [tokenizer.json]              copied when the run used one

`save` writes everything into a temporary sibling (".tmp-step-000123-PID"),
fsyncs each file and the folder, renames it into place (atomic on POSIX), fsyncs
the run directory, and only then deletes checkpoints beyond the newest `keep`.
A crash at any moment leaves the previous checkpoints intact; a leftover
temporary folder is never mistaken for a checkpoint and is removed by the next save.

`latest(run_dir)` is the newest checkpoint whose hashes verify; `load(path)`
refuses a corrupt or truncated one, naming the newest valid checkpoint before it.

Test hook: with QKV_CHECKPOINT_STALL="STEP:FILE" in the environment, the writer of
step STEP creates FILE halfway (weights written, training state not yet) and
sleeps, so a test can kill the process mid-write deterministically.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

__all__ = ["CheckpointError", "Checkpoint", "save", "load", "verify", "latest", "list_checkpoints",
           "step_dir_name"]

_NAME = re.compile(r"^step-(\d+)$")
STATE_JSON, STATE_TENSORS = "training_state.json", "training_state.safetensors"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint folder that is incomplete, corrupt or not a checkpoint."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (float32 as saved, in train mode), the optimizer
    tensors by name, and the training_state.json contents."""

    path: Path
    model: nn.Module
    tensors: dict[str, Tensor]
    state: dict

    @property
    def step(self) -> int:
        return int(self.state["step"])


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _canonical(state: dict) -> bytes:
    return json.dumps({k: v for k, v in state.items() if k != "self_sha256"}, sort_keys=True).encode()


def list_checkpoints(run_dir) -> list[Path]:
    """Checkpoint folders of `run_dir` (named step-N), oldest first; not verified."""
    d = Path(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def _stall(step: int) -> None:
    spec = os.environ.get("QKV_CHECKPOINT_STALL")
    if spec:
        at, _, signal_file = spec.partition(":")
        if at.strip() == str(step):
            Path(signal_file).write_text(str(os.getpid()))
            time.sleep(3600)


def save(run_dir, step: int, model: nn.Module, tensors: dict[str, Tensor], state: dict, *, keep: int = 3,
         extra_files: dict[str, Path | str | bytes] | None = None) -> Path:
    """Write checkpoint `run_dir/step-{step:06d}` atomically and keep the newest `keep`.

    tensors: optimizer / RNG tensors (CPU, contiguous) for training_state.safetensors;
    state: JSON-able dict for training_state.json ("step", "format" and the file
    hashes are added); extra_files: name -> a file (Path) copied in, or the
    content (str or bytes) to write (e.g. tokenizer.json).
    """
    from safetensors.torch import save_file

    from qkv.models import hf

    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    for stale in run.glob(".tmp-step-*"):          # left by a writer that died mid-way
        shutil.rmtree(stale, ignore_errors=True)
    name = step_dir_name(step)
    tmp = run / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    hf.save(model, tmp)
    for src_name, src in (extra_files or {}).items():
        if isinstance(src, (str, bytes)):
            (tmp / src_name).write_bytes(src.encode("utf-8") if isinstance(src, str) else src)
        else:
            shutil.copyfile(src, tmp / src_name)
    _stall(step)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / STATE_TENSORS),
              metadata={"format": "pt"})
    files = sorted(p.name for p in tmp.iterdir())
    full = {**state, "format": FORMAT, "step": step, "files": {f: _sha256(tmp / f) for f in files}}
    full["self_sha256"] = hashlib.sha256(_canonical(full)).hexdigest()
    (tmp / STATE_JSON).write_text(json.dumps(full, indent=1, sort_keys=True) + "\n")
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    final = run / name
    old = None
    if final.exists():                              # a corrupt or stale folder of the same step
        old = run / f".tmp-old-{name}-{os.getpid()}"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync(run)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    for p in list_checkpoints(run)[:-keep]:
        if p != final:
            shutil.rmtree(p, ignore_errors=True)
    return final


def verify(path) -> dict:
    """The training_state.json of checkpoint folder `path` after checking every
    file's sha256; CheckpointError saying what is wrong otherwise."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a checkpoint folder")
    file = p / STATE_JSON
    if not file.is_file():
        raise CheckpointError(f"{p} has no {STATE_JSON} (an incomplete write)")
    try:
        state = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file} is truncated or not JSON ({exc})") from None
    if not isinstance(state, dict) or not isinstance(state.get("files"), dict):
        raise CheckpointError(f"{file} is not a training state (no file hashes)")
    if state.get("self_sha256") != hashlib.sha256(_canonical(state)).hexdigest():
        raise CheckpointError(f"{file} was modified after it was written (its own hash does not match)")
    for name, digest in state["files"].items():
        f = p / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"{f} is corrupt or truncated (sha256 differs from the one recorded)")
    return state


def latest(run_dir) -> Path | None:
    """The newest checkpoint folder of `run_dir` that verifies, or None."""
    for p in reversed(list_checkpoints(run_dir)):
        try:
            verify(p)
        except CheckpointError:
            continue
        return p
    return None


def _previous_valid(path: Path) -> Path | None:
    m = _NAME.match(path.name)
    before = [p for p in list_checkpoints(path.parent) if m is None or int(_NAME.match(p.name).group(1))
              < int(m.group(1))]
    for p in reversed(before):
        try:
            verify(p)
        except CheckpointError:
            continue
        return p
    return None


def load(path) -> Checkpoint:
    """Verify and read checkpoint folder `path`. A corrupt or truncated one raises
    CheckpointError naming the newest valid checkpoint before it (if any)."""
    from safetensors.torch import load_file

    from qkv.models import hf

    p = Path(path)
    try:
        state = verify(p)
    except CheckpointError as exc:
        prev = _previous_valid(p)
        hint = (f"the previous valid checkpoint is {prev}; resume from it (delete {p} or pass it instead)"
                if prev is not None else "no earlier valid checkpoint exists in that run directory")
        raise CheckpointError(f"cannot load checkpoint {p}: {exc}; {hint}") from None
    model = hf.load(p).train()
    tensors = load_file(str(p / STATE_TENSORS)) if (p / STATE_TENSORS).is_file() else {}
    return Checkpoint(p, model, tensors, state)
