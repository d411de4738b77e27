"""What a fresh `qkv generate` process does not pay for: initialising weights a checkpoint
replaces (`qkv._util.meta`), importing torch._dynamo for meta tensors, copying undefined
values into the huge-page arena, and the interpreter's teardown of torch (`qkv.cli.run`)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import torch

from qkv import kernels
from qkv._util import meta
from qkv.models import Decoder, DecoderConfig, hf


def _config(**kw):
    return DecoderConfig.llama(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=61, max_positions=64, **kw)


def test_uninitialised_model_skips_parameters_only_and_loads_exactly(tmp_path):
    torch.manual_seed(0)
    model = Decoder(_config()).eval()
    hf.save(model, tmp_path / "ck")
    bare = meta.uninitialised(Decoder, _config())
    # buffers are computed as usual (RoPE's frequencies); parameters are only allocated
    for (name, a), (_, b) in zip(model.named_buffers(), bare.named_buffers()):
        assert torch.equal(a, b), name
    loaded = hf.load(tmp_path / "ck")
    ids = torch.tensor([[1, 5, 7, 3, 9]])
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert not meta.values_undefined()                      # the mode ended with the build


def test_initialisers_still_run_outside_and_on_other_threads():
    seen = []

    def other():
        seen.append(torch.nn.init.ones_(torch.nn.Parameter(torch.zeros(3))).sum().item())

    with meta.shapes_only(parameters=True):
        p = torch.nn.Parameter(torch.zeros(3))
        torch.nn.init.ones_(p)
        assert p.sum().item() == 0                           # skipped here
        t = torch.zeros(3)
        torch.nn.init.ones_(t)                               # a plain tensor (a buffer): initialised
        assert t.sum().item() == 3
        th = threading.Thread(target=other)
        th.start()
        th.join()
    assert seen == [3.0]                                     # the mode is this thread's only


def test_loading_a_checkpoint_never_imports_dynamo(tmp_path):
    torch.manual_seed(0)
    hf.save(Decoder(_config()), tmp_path / "ck")
    code = ("import sys; from qkv.models import hf; m = hf.load(sys.argv[1]); "
            "print('torch._dynamo' in sys.modules, hf.parameter_count(m.config) == sum(p.numel() for p in m.parameters()))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ck")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]


def test_qkv_generate_exits_at_once_with_its_output_whole(tmp_path):
    torch.manual_seed(0)
    hf.save(Decoder(_config()), tmp_path / "ck")
    env = dict(os.environ, QKV_NUMBA="0")
    done = subprocess.run([sys.executable, "-m", "qkv", "generate", "--checkpoint", str(tmp_path / "ck"), "--ids",
                           "--prompt", "1 2 3", "--max-new-tokens", "5"], capture_output=True, text=True, env=env,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.split()) == 5 and "[5 tokens;" in done.stderr
    bad = subprocess.run([sys.executable, "-m", "qkv", "generate", "--checkpoint", str(tmp_path / "nothing"),
                          "--prompt", "1"], capture_output=True, text=True, env=env, timeout=120,
                         stdin=subprocess.DEVNULL)
    assert bad.returncode == 2 and "error" in bad.stderr


def test_prefetch_loads_cached_kernels_in_a_thread(monkeypatch):
    done = threading.Event()
    monkeypatch.setattr(kernels, "WAIT", False)
    monkeypatch.setattr(kernels, "_active", False)
    monkeypatch.setattr(kernels, "_stamp", lambda: None)
    assert not kernels.prefetch()                            # not built: nothing to load
    monkeypatch.setattr(kernels, "_stamp", lambda: {"cached": True})
    monkeypatch.setattr(kernels, "_activate", lambda: done.set() or True)
    assert kernels.prefetch()
    assert done.wait(10)
