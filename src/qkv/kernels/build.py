"""Compile qkv's CPU decode kernels into numba's disk cache, then write the stamp that tells
every later process they are there: `python -m qkv.kernels.build`.

`qkv.kernels.ready()` starts this in a detached background process the first time a decode
could use kernels that are not built yet, and goes on on torch's path meanwhile; `make install`
runs it ahead. One build runs at a time per machine and source: a second one finds the lock
taken and exits at once (the first one's stamp serves both). It runs at low priority, so a
foreground process on the same cores is slowed as little as the machine allows.
"""

from __future__ import annotations

import os
import sys
import time


def _locked(path: str):
    """An exclusive lock on `path` (held while the returned file is open), or None when another
    process holds it. Where fcntl does not exist, no lock is taken."""
    try:
        import fcntl
    except ImportError:                     # pragma: no cover - not POSIX
        return open(path, "a")
    f = open(path, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


def main(argv: list[str] | None = None) -> int:
    from qkv import kernels

    if not kernels.available():
        print("qkv.kernels.build: numba is not installed, or QKV_NUMBA=0: nothing to build (torch's path runs)",
              file=sys.stderr)
        return 0
    stamp = kernels.stamp_path()
    os.makedirs(os.path.dirname(stamp), exist_ok=True)
    lock = _locked(stamp[:-len(".json")] + ".lock")
    if lock is None:
        print("qkv.kernels.build: another process is building these kernels; its stamp will serve", flush=True)
        return 0
    with lock:
        if kernels._stamp() is not None:
            print(f"qkv.kernels.build: already built ({stamp})", flush=True)
            return 0
        if hasattr(os, "nice"):
            try:
                os.nice(10)                 # behind whatever runs in the foreground
            except OSError:
                pass
        t0 = time.perf_counter()
        cpu = kernels._load()
        compiled = cpu.load(tuple(cpu.SIGNATURES))
        seconds = time.perf_counter() - t0
        kernels.write_stamp(build_s=round(seconds, 2), compiled=compiled)
        print(f"qkv.kernels.build: {compiled} kernels compiled, {len(cpu.SIGNATURES) - compiled} loaded from "
              f"numba's cache, in {seconds:.1f} s; stamp {stamp}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
