"""Reading and writing files safely: the one atomic writer and the one JSON reader.

Every file qkv writes goes through `write_atomic`: the content is written to a
temporary file in the target's directory, fsynced, and moved over the target with
one `os.replace`, so a reader (or a crash) sees the old file or the new one, never
half of one; a failure on the way removes the temporary file and leaves the old
file as it was. `tests/test_file_safety.py` scans the package for writes that
bypass it.

Every JSON file qkv reads (config.json, model.safetensors.index.json,
training_state.json, sentence-transformers configs, `qkv train --config`) goes
through `read_json`, which only ever parses JSON (nothing is unpickled or
evaluated) and turns every way a file can be wrong into one exception naming it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["write_atomic", "write_text_atomic", "read_json", "MAX_JSON_BYTES"]

# Larger JSON files are refused before they are read (a config is a few KiB; a long
# run's training_state.json a few MiB).
MAX_JSON_BYTES = 256 * 2**20


def write_atomic(path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp)` on a temporary file next to `path`, fsync it, then move it into
    place (one `os.replace`): readers see the old file or the new one, never half of one.
    If `write` (or anything after it) fails, the temporary file is removed and `path`
    is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            os.fchmod(fd, 0o644)  # mkstemp creates 0600; results are meant to be read by others
        finally:
            os.close(fd)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):     # make the rename itself durable (not every filesystem allows it)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def write_text_atomic(path, text: str) -> Path:
    """`write_atomic` for UTF-8 text."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value (write numbers as finite decimals)")


def read_json(file, what: str = "a JSON file", *, error: type[Exception] = ValueError,
              finite: bool = True, max_bytes: int = MAX_JSON_BYTES):
    """The parsed contents of JSON file `file` (`what` says what it should be).

    Raises `error` (a ValueError subclass by default) naming the file when it is
    missing, a directory or another non-regular file, larger than `max_bytes`
    (refused before reading), not UTF-8, not valid JSON, or nested too deeply to
    parse; with `finite=True` also when it holds NaN or Infinity, which JSON does
    not have (Python's json module accepts them by default)."""
    file = Path(file)
    if not file.exists():
        raise error(f"{file} does not exist; expected {what}")
    if not file.is_file():
        kind = "a directory" if file.is_dir() else "not a regular file"
        raise error(f"{file} is {kind}; expected {what}")
    size = file.stat().st_size
    if size > max_bytes:
        raise error(f"{file} is {size} bytes, more than the {max_bytes} accepted for {what}; is it the right file?")
    try:
        text = file.read_bytes().decode("utf-8")
        return json.loads(text, parse_constant=_no_constant) if finite else json.loads(text)
    except OSError as exc:
        raise error(f"{file}: cannot read {what} ({exc.strerror or exc})") from None
    except RecursionError:
        raise error(f"{file} is not {what}: its JSON is nested too deeply to parse") from None
    except ValueError as exc:   # JSONDecodeError, UnicodeDecodeError, too many digits, NaN/Infinity
        raise error(f"{file} is truncated or not JSON ({exc}); expected {what}") from None
