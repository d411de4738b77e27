"""No process waits for numba: the CPU decode kernels are built in the background, found again
by every later process, and loaded only where they pay (`qkv.kernels.ready`, `held`, `pays`).

The fresh-process test runs real processes against an empty cache of its own (NUMBA_CACHE_DIR
and QKV_KERNEL_CACHE in a temporary folder), so it pays one real build (~20 s on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from qkv import kernels
from qkv.generate import generate
from qkv.models import Decoder, DecoderConfig

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is not installed")

PROBE = """
import json, sys, time
t = time.perf_counter()
from qkv import kernels
ready = kernels.ready({hint})
out = {{"ready": ready, "status": kernels.status(), "seconds": time.perf_counter() - t,
        "numba_imported": "numba" in sys.modules}}
if ready:
    out["compiled_here"] = sum(sum(d.stats.cache_misses.values()) for d in kernels._cpu.KERNELS.values())
    import torch
    from qkv.models import Decoder, DecoderConfig
    model = Decoder(DecoderConfig.gpt2(n_layers=2, d_model=32, n_heads=4, vocab_size=61, max_positions=64)).eval()
    launched = []
    real = kernels.launch
    kernels.launch = lambda name, *args: (launched.append(name), real(name, *args))
    cache = model.new_cache(2, max_len=16)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3], [4, 5, 6]]), cache=cache)
        model(torch.tensor([[7], [8]]), cache=cache)
    out["launched"] = sorted(set(launched))
    out["compiled_here"] += sum(sum(d.stats.cache_misses.values()) for d in kernels._cpu.KERNELS.values())
print(json.dumps(out))
"""


def _probe(env, hint="") -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE.format(hint=hint)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_fresh_process_never_compiles_and_every_later_one_loads_the_build(tmp_path):
    env = dict(os.environ, QKV_NUMBA="1", NUMBA_CACHE_DIR=str(tmp_path / "numba"), QKV_KERNEL_CACHE=str(tmp_path))
    # the first process ever, with a short run ahead: torch's path now, the build when it exits
    first = _probe(env)
    assert first == {"ready": False, "status": "at exit", "seconds": first["seconds"], "numba_imported": False}
    assert first["seconds"] < 10, "asking for the kernels must not wait for a compiler"
    deadline = time.monotonic() + 240
    stamp = None
    while time.monotonic() < deadline:
        stamps = [p for p in tmp_path.glob("kernels-*.json")]
        if stamps:
            stamp = json.loads(stamps[0].read_text())
            break
        time.sleep(0.5)
    logs = "".join(p.read_text() for p in tmp_path.glob("kernels-*.log"))
    assert stamp is not None, f"the background build wrote no stamp; its log: {logs}"
    assert stamp["compiled"] >= 3 and len(stamp["index"]) == 3, stamp
    assert all((tmp_path / "numba").glob("**/" + name) for name in stamp["index"])
    # every later process loads them from the disk cache: nothing compiled in it, the kernels run
    for _ in range(2):
        later = _probe(env)
        assert later["ready"] and later["status"] == "loaded"
        assert later["compiled_here"] == 0, "a later process compiled again: the disk cache missed"
        assert {"skinny", "block"} <= set(later["launched"])


@pytest.fixture
def default_mode(monkeypatch):
    """qkv.kernels as a user's process sees it (not the suite's QKV_NUMBA=wait), with nothing
    loaded, no disk look-up throttled, and the build and stamp replaced by recorders."""
    calls = []
    monkeypatch.setattr(kernels, "WAIT", False)
    monkeypatch.setattr(kernels, "_active", False)
    monkeypatch.setattr(kernels, "BUILD_POLL_S", 0.0)
    monkeypatch.setattr(kernels, "_next_look", 0.0)
    monkeypatch.setattr(kernels, "_first_ask", None)
    monkeypatch.setattr(kernels, "_at_exit", False)
    monkeypatch.setattr(kernels, "_build", None)
    monkeypatch.setattr(kernels, "_start_build", lambda: calls.append("now"))
    monkeypatch.setattr(kernels, "_build_at_exit", lambda: calls.append("at exit"))
    return calls


def test_a_build_starts_at_once_only_for_long_work(default_mode, monkeypatch):
    monkeypatch.setattr(kernels, "_stamp", lambda: None)
    assert not kernels.ready(seconds_left=kernels.BUILD_S)            # short: when the process exits
    assert not kernels.ready(seconds_left=3 * kernels.BUILD_S)        # long enough to switch: now
    with kernels.horizon(10 * kernels.BUILD_S):                       # the same, told by a caller up the stack
        assert not kernels.ready()
    assert default_mode == ["at exit", "now", "now"]
    default_mode.clear()
    monkeypatch.setattr(kernels, "_first_ask", time.monotonic() - kernels.ASKING_S - 1)
    assert not kernels.ready()                                        # asking for a while, no horizon: now
    assert default_mode == ["now"]


def test_held_kernels_neither_load_nor_build(default_mode, monkeypatch):
    monkeypatch.setattr(kernels, "_stamp", lambda: {"cached": True})
    loads = []
    monkeypatch.setattr(kernels, "_activate", lambda: loads.append(1) or True)
    x, w = torch.randn(2, 8), torch.randn(6, 8)
    with kernels.held():
        assert not kernels.ready() and not kernels.applies(x, w)
        assert kernels.status() == "cached"
    assert loads == [] and default_mode == []
    assert kernels.ready() and loads == [1]                           # cached: loaded on the first ask


def test_pays_weighs_the_steps_left_against_the_load(monkeypatch):
    monkeypatch.setattr(kernels, "_active", False)
    step = 0.001
    assert not kernels.pays(10, step)                                 # 10 ms of decode left: not worth 1 s
    needed = int(kernels.LOAD_S / (kernels.SAVING * step)) + 1
    assert kernels.pays(needed, step) and not kernels.pays(needed - 2, step)
    monkeypatch.setattr(kernels, "_active", True)
    assert kernels.pays(1, step)                                      # loaded already: nothing to pay


def test_the_torch_step_estimate_grows_with_the_weights():
    tiny, gpt2 = kernels.torch_step_s(4 * 120_000), kernels.torch_step_s(4 * 124_000_000)
    assert tiny < 0.002 < 0.03 < gpt2 < 0.1
    assert not kernels.pays(32, tiny) or kernels.loaded()             # 32 tokens of a tiny model: never worth it


def test_stamp_is_refused_when_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("QKV_KERNEL_CACHE", str(tmp_path))
    (tmp_path / "numba").mkdir()
    (tmp_path / "numba" / "a.nbi").write_text("")
    path = kernels.stamp_path()
    good = {"key": kernels.cache_key(), "cache_path": str(tmp_path / "numba"), "index": ["a.nbi"]}
    for stamp, usable in [(good, True), ({**good, "key": "0" * 64}, False), ({**good, "index": ["a.nbi", "b.nbi"]}, False),
                          ({**good, "index": []}, False)]:
        with open(path, "w") as f:
            json.dump(stamp, f)
        assert (kernels._stamp() is not None) == usable, stamp
    with open(path, "w") as f:
        f.write("{not json")
    assert kernels._stamp() is None


def _tiny_model():
    torch.manual_seed(0)
    return Decoder(DecoderConfig.gpt2(n_layers=2, d_model=32, n_heads=4, vocab_size=61, max_positions=256)).eval()


def test_generate_holds_the_kernels_where_they_would_not_pay(default_mode, monkeypatch):
    monkeypatch.setattr(kernels, "_stamp", lambda: {"cached": True})
    loads = []
    real = kernels._activate
    monkeypatch.setattr(kernels, "_activate", lambda: loads.append(1) or real())
    model = _tiny_model()
    stats: dict = {}
    held = generate(model, [1, 2, 3], max_new_tokens=12, stats=stats)
    assert loads == [] and stats["kernels"] == "held"                 # 11 steps of ~1 ms: not worth the load
    monkeypatch.setattr(kernels, "LOAD_S", 0.0)                       # a load that costs nothing pays at once
    used = generate(model, [1, 2, 3], max_new_tokens=12, stats=stats)
    assert loads and stats["kernels"] == "loaded"
    assert used[:2] == held[:2]                                       # the first steps ran on torch in both
