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
Verification reads only inside the folder: the names in training_state.json must
be plain file names (no "..", no "/", no absolute path), symbolic links are
refused, and every file `load` reads must carry a recorded sha256, so a flipped
byte anywhere (header or tensor data) is caught. Nothing is unpickled: the
weights go through `qkv.models.hf.load`, the training state is JSON and
safetensors. Every problem is a CheckpointError (a ValueError) naming the file.

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

from qkv._util.files import read_json
from qkv._util.safetensors import read_header
from qkv.models import hf

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


def _plain_name(name) -> bool:
    """A file name that stays inside its folder: no separators, no "..", no NUL, not absolute."""
    return (isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name
            and not any(c in name for c in "/\\\0"))


# The files `load` reads: each must be listed (with its sha256) in training_state.json.
_READ_BY_LOAD = ("config.json", "model.safetensors")
_READ_IF_PRESENT = (STATE_TENSORS, "tokenizer.json")


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

    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0 (the optimizer steps done), got {step!r}")
    own = (STATE_JSON, STATE_TENSORS, *_READ_BY_LOAD)
    bad = [n for n in (extra_files or {}) if not _plain_name(n) or n in own]
    if bad:
        raise ValueError(f"extra_files names must be plain file names other than the checkpoint's own, got {bad}")
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    for stale in [*run.glob(".tmp-step-*"), *run.glob(".tmp-old-step-*")]:   # left by a writer that died mid-way
        shutil.rmtree(stale, ignore_errors=True)
    name = step_dir_name(step)
    tmp = run / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    try:   # everything is written inside the temporary folder, which is renamed into place as a whole
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
    except BaseException:                           # a failed write leaves no trace; earlier checkpoints stand
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = run / name
    old = None
    if final.exists():                              # a corrupt or stale folder of the same step
        old = run / f".tmp-old-{name}-{os.getpid()}"
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        if old is not None:
            os.rename(old, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    if not file.exists():
        raise CheckpointError(f"{p} has no {STATE_JSON} (an incomplete write)")
    # JSON only (NaN allowed: a diverged run's losses); CheckpointError naming the file otherwise
    state = read_json(file, "a training state (JSON)", error=CheckpointError, finite=False)
    if not isinstance(state, dict) or not isinstance(state.get("files"), dict):
        raise CheckpointError(f"{file} is not a training state (no file hashes)")
    if state.get("self_sha256") != hashlib.sha256(_canonical(state)).hexdigest():
        raise CheckpointError(f"{file} was modified after it was written (its own hash does not match)")
    listed = state["files"]
    outside = [n for n in listed if not _plain_name(n) or n == STATE_JSON]
    if outside:   # never hash (read) a file outside the folder
        raise CheckpointError(f"{file} lists {outside[:3]}: a checkpoint's files are plain names inside {p}")
    unlisted = [n for n in _READ_BY_LOAD if n not in listed]
    unlisted += [n for n in _READ_IF_PRESENT if n not in listed and os.path.lexists(p / n)]
    if unlisted:
        raise CheckpointError(f"{file} records no sha256 for {unlisted}, which loading reads; not a checkpoint "
                              f"qkv wrote")
    for name, digest in listed.items():
        f = p / name
        if f.is_symlink():
            raise CheckpointError(f"{f} is a symbolic link; qkv writes only regular files into a checkpoint")
        if not f.is_file():
            raise CheckpointError(f"{f} is missing" if not f.exists() else f"{f} is not a regular file")
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


def load(path, *, expect=None) -> Checkpoint:
    """Verify and read checkpoint folder `path`. A corrupt or truncated one raises
    CheckpointError naming the newest valid checkpoint before it (if any). `expect`: a model
    class (e.g. `qkv.models.ViT`) or a tuple of them; a checkpoint of another model kind is a
    CheckpointError saying which kind it holds (see `qkv.models.hf.load`)."""
    from safetensors.torch import load_file



    p = Path(path)
    try:
        state = verify(p)
    except CheckpointError as exc:
        prev = _previous_valid(p)
        hint = (f"the previous valid checkpoint is {prev}; resume from it (delete {p} or pass it instead)"
                if prev is not None else "no earlier valid checkpoint exists in that run directory")
        raise CheckpointError(f"cannot load checkpoint {p}: {exc}; {hint}") from None
    try:   # verified bytes, still read through the validating loaders (no pickle; clean errors)
        model = hf.load(p, expect=expect).train()
        tensors = {}
        if (p / STATE_TENSORS).is_file():
            read_header(p / STATE_TENSORS)
            try:
                tensors = load_file(str(p / STATE_TENSORS))
            except Exception as exc:   # the library's own SafetensorError
                raise ValueError(f"{p / STATE_TENSORS}: cannot read the safetensors file ({exc})") from None
    except ValueError as exc:
        raise CheckpointError(f"cannot load checkpoint {p}: {exc}") from None
    return Checkpoint(p, model, tensors, state)
