"""File safety: what every qkv loader does with a bad file, and how every writer writes.

The loaders:

    hf.load                 Hugging Face directories: GPT-2, Llama (sharded, with
                            model.safetensors.index.json), Mistral, BERT
    SentenceEncoder.load    sentence-transformers directories (modules.json, pooling
                            config, tokenizer.json, the BERT weights)
    checkpoint.load         training checkpoints (weights, training_state.safetensors,
                            training_state.json with a sha256 per file); latest()
    data.FileTokenizer      tokenizer.json (qkv train --tokenizer, resume, generate)
    train.decoder_config    `qkv train --config FILE`

Each table below is one kind of malformed input, run against every loader it
applies to: truncations (inside the 8-byte length, the JSON header, the data),
flipped bytes, wrong dtypes, oversized and lying headers, overlapping offsets,
bad JSON and wrong types in configs, path traversal in the shard index and the
checkpoint manifest, empty files, directories where files belong, pickle files.
Each must raise a ValueError or TypeError (CheckpointError for checkpoints, a
ValueError) that names the file and the problem; a loader returns nothing
half-loaded because it returns nothing at all. The autouse fixture makes every
unpickling entry point fail the test, and the pickle payloads below would leave
a marker file if anything unpickled them anyway.

Decisions recorded here:
- Float weights of another dtype load (the model takes the checkpoint's dtype
  when all share one, else float32, or `dtype=`); integer, bool and float8
  weights are refused.
- safetensors has no checksum: a flipped byte inside tensor data of a Hugging
  Face directory loads (undetectable); a flipped byte in its header is caught.
  Training checkpoints record a sha256 per file and catch both.
- Shard names must be plain file names; a symlink inside a Hugging Face directory
  is followed when it leads to a regular file (the Hub cache is built of such
  links), never to a device or FIFO. Checkpoints refuse symlinks outright.

Writers: every file qkv writes goes through `qkv._util.files.write_atomic` (temporary
file, fsync, os.replace), or, for checkpoints, a temporary folder renamed into
place. The last tests make writes fail half-way and scan the source for writes
that bypass the atomic writer and for anything that unpickles.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import re
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qkv import checkpoint, data, train
from qkv._util import files as _files
from qkv.embed import SentenceEncoder
from qkv.models import Decoder, DecoderConfig, Encoder, EncoderConfig, hf

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "qkv"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
INDEX = "model.safetensors.index.json"
STEP = "step-000001"


# -----------------------------------------------------------------------------
# Fixtures: tiny models of every kind, built once; each test works on a copy


@pytest.fixture(autouse=True)
def _never_unpickle(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a loader tried to unpickle")

    # (pickle.Unpickler stays: torch subclasses it on import; the payloads' marker files catch any use)
    for module, name in [(pickle, "load"), (pickle, "loads"), (torch, "load"), (np, "load")]:
        monkeypatch.setattr(module, name, refuse)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "."])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


def _save_sharded(model, directory: Path) -> None:
    """`model` as two safetensors shards and an index, as transformers writes big checkpoints."""
    hf.save(model, directory)
    tensors = load_file(str(directory / "model.safetensors"))
    (directory / "model.safetensors").unlink()
    names = sorted(tensors)
    half = {SHARDS[0]: names[: len(names) // 2], SHARDS[1]: names[len(names) // 2:]}
    for shard, keys in half.items():
        save_file({k: tensors[k] for k in keys}, str(directory / shard), metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in half.items() for k in keys}
    (directory / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    torch.manual_seed(0)
    small = dict(vocab_size=24, d_model=8, n_heads=2, max_positions=32)
    gpt2 = Decoder(DecoderConfig.gpt2(n_layers=1, **small))
    hf.save(gpt2, root / "gpt2")
    _save_sharded(Decoder(DecoderConfig.llama(n_layers=2, n_kv_heads=1, ffn_hidden=16, **small)), root / "llama")
    hf.save(Decoder(DecoderConfig.mistral(n_layers=1, n_kv_heads=1, ffn_hidden=16, sliding_window=8, **small)),
            root / "mistral")
    hf.save(Encoder(EncoderConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=2, max_positions=16)), root / "bert")
    st = root / "st"
    shutil.copytree(root / "bert", st)
    (st / "tokenizer.json").write_text(_tokenizer_json())
    (st / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (st / "1_Pooling").mkdir()
    (st / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 8,
                                                             "pooling_mode_mean_tokens": True}))
    checkpoint.save(root / "run", 1, gpt2, {"opt.0.exp_avg": torch.randn(3), "opt.0.exp_avg_sq": torch.rand(3)},
                    {"note": "file safety"}, extra_files={"tokenizer.json": _tokenizer_json()})
    return root


def _copy(pristine: Path, name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(pristine / name, dst, symlinks=True)
    return dst


# name: (pristine folder, the folder passed to the loader inside it, loader, the weights file it reads)
TARGETS = {
    "gpt2": ("gpt2", ".", hf.load, "model.safetensors"),
    "llama-sharded": ("llama", ".", hf.load, SHARDS[1]),
    "mistral": ("mistral", ".", hf.load, "model.safetensors"),
    "bert": ("bert", ".", hf.load, "model.safetensors"),
    "sentence-encoder": ("st", ".", SentenceEncoder.load, "model.safetensors"),
    "checkpoint": ("run", STEP, checkpoint.load, "model.safetensors"),
    "checkpoint-state": ("run", STEP, checkpoint.load, checkpoint.STATE_TENSORS),
}
HASHED = re.compile(r"corrupt or truncated|not a regular file|is missing")   # what a checkpoint says instead


def _target(pristine, tmp_path, name) -> tuple[Path, callable, Path]:
    folder, inside, load, weights = TARGETS[name]
    path = _copy(pristine, folder, tmp_path) / inside
    return path, load, path / weights


def _refused(load, path: Path, pattern, error=(ValueError, TypeError)) -> str:
    """`load(path)` raises `error` whose message names `path` and matches `pattern`."""
    with pytest.raises(error) as info:
        load(path)
    msg = str(info.value)
    assert str(path) in msg, f"the message does not name {path}: {msg}"
    assert re.search(pattern, msg), f"{pattern!r} not in: {msg}"
    return msg


def _expect(name: str, pattern: str):
    """(error type, pattern): checkpoints catch every change by its sha256 first."""
    if name.startswith("checkpoint"):
        return checkpoint.CheckpointError, HASHED
    return (ValueError, TypeError), pattern


# -----------------------------------------------------------------------------
# safetensors files: truncated, flipped, lying headers, wrong dtypes


def _n(raw: bytes) -> int:
    return int.from_bytes(raw[:8], "little")


def _raw_header(b: bytes, data: bytes = b"") -> bytes:
    return len(b).to_bytes(8, "little") + b + data


def _pack(header, data: bytes = b"") -> bytes:
    return _raw_header(json.dumps(header).encode(), data)


def _xor(raw: bytes, i: int) -> bytes:
    b = bytearray(raw)
    b[i] ^= 0xFF
    return bytes(b)


def _edit(fn):
    """A corruption that edits the parsed JSON header and writes it back over the same data."""
    def corrupt(raw):
        n = _n(raw)
        header = json.loads(raw[8:8 + n])
        fn(header, sorted(k for k in header if k != "__metadata__"))
        return _pack(header, raw[8 + n:])
    return corrupt


def _set(header, key, field, value):
    header[key][field] = value


def _overlap(header, keys):
    """Point a tensor at the bytes of another tensor of the same size."""
    seen = {}
    for k in keys:
        begin, end = header[k]["data_offsets"]
        if end - begin in seen:
            header[k]["data_offsets"] = list(header[seen[end - begin]]["data_offsets"])
            return
        seen[end - begin] = k
    raise AssertionError("no two tensors of the same size")


class _Marker:
    """Unpickling this creates MARKER: proof that nothing was ever unpickled."""
    path = None

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _payload(marker: Path) -> bytes:
    m = _Marker()
    m.path = str(marker)
    return pickle.dumps({"weight": m})


SAFETENSORS_CASES = {
    "empty file": (lambda r: b"", "only 0 bytes"),
    "cut inside the 8-byte length": (lambda r: r[:5], "truncated"),
    "cut inside the JSON header": (lambda r: r[:8 + _n(r) // 2], "truncated"),
    "cut right after the header": (lambda r: r[:8 + _n(r)], "truncated"),
    "cut inside the data": (lambda r: r[:(8 + _n(r) + len(r)) // 2], "truncated"),
    "last byte cut": (lambda r: r[:-1], "truncated"),
    "flipped byte in the length": (lambda r: _xor(r, 2), "claims"),
    "flipped first header byte": (lambda r: _xor(r, 8), "not valid JSON"),
    "flipped middle header byte": (lambda r: _xor(r, 8 + _n(r) // 2), "not valid JSON"),
    "header is a list": (lambda r: _pack([]), "not a JSON object"),
    "header nested too deeply": (lambda r: _raw_header(b"[" * 50_000 + b"]" * 50_000), "not valid JSON"),
    "malformed tensor entry": (_edit(lambda h, ks: h.__setitem__(ks[0], "F32")), "malformed header entry"),
    "__metadata__ not strings": (_edit(lambda h, ks: h.__setitem__("__metadata__", {"format": 1})),
                                 "__metadata__"),
    "offset changed": (_edit(lambda h, ks: _set(h, ks[0], "data_offsets",
                                                [h[ks[0]]["data_offsets"][0], h[ks[0]]["data_offsets"][1] + 4])),
                       "needs"),
    "shape changed": (_edit(lambda h, ks: _set(h, ks[0], "shape", [h[ks[0]]["shape"][0] + 1,
                                                                   *h[ks[0]]["shape"][1:]])), "needs"),
    "tensor renamed": (_edit(lambda h, ks: h.__setitem__("bogus.weight", h.pop(ks[0]))), "lacks|does not match"),
    "dtype I32 over float32 bytes (integer weights)": (_edit(lambda h, ks: _set(h, ks[0], "dtype", "I32")), "I32"),
    "dtype F16 over float32 bytes": (_edit(lambda h, ks: _set(h, ks[0], "dtype", "F16")), "needs"),
    "length 2**40": (lambda r: (2**40).to_bytes(8, "little") + r[8:], "claims 1099511627776"),
    "length one past the end": (lambda r: (len(r) - 7).to_bytes(8, "little") + r[8:], "claims"),
    "length 2**64 - 1": (lambda r: b"\xff" * 8 + r[8:], "claims"),
    "offsets outside the file": (_edit(lambda h, ks: _set(h, ks[0], "data_offsets",
                                                          [o + 10**9 for o in h[ks[0]]["data_offsets"]])),
                                 "spans bytes"),
    "overlapping offsets": (_edit(_overlap), "overlaps"),
    "trailing bytes": (lambda r: r + bytes(8), "trailing"),
    "a pickle under a .safetensors name": (None, "not a valid safetensors file"),
    "a zip (torch.save) under a .safetensors name": (lambda r: b"PK\x03\x04" + bytes(200), "claims"),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_CASES))
@pytest.mark.parametrize("name", list(TARGETS))
def test_malformed_safetensors_refused(pristine, tmp_path, name, case):
    path, load, file = _target(pristine, tmp_path, name)
    corrupt, pattern = SAFETENSORS_CASES[case]
    marker = tmp_path / "unpickled"
    file.write_bytes(_payload(marker) if corrupt is None else corrupt(file.read_bytes()))
    error, pattern = _expect(name, pattern)
    _refused(load, path, pattern, error)
    assert not marker.exists()


@pytest.mark.parametrize("name", list(TARGETS))
def test_directory_instead_of_weights_file(pristine, tmp_path, name):
    path, load, file = _target(pristine, tmp_path, name)
    file.unlink()
    file.mkdir()
    error, pattern = _expect(name, "is a directory|not in .* as regular files")
    _refused(load, path, pattern, error)


@pytest.mark.parametrize("name", list(TARGETS))
def test_flipped_tensor_data_is_caught_only_where_hashed(pristine, tmp_path, name):
    """safetensors has no checksum: a flipped data byte of a Hugging Face directory is
    undetectable (it loads, with a different weight); checkpoints hash every file."""
    path, load, file = _target(pristine, tmp_path, name)
    raw = file.read_bytes()
    file.write_bytes(_xor(raw, len(raw) - 3))                 # the last tensor's last float
    if name.startswith("checkpoint"):
        _refused(load, path, "corrupt or truncated", checkpoint.CheckpointError)
        return
    changed = load(path)
    original = load(pristine / TARGETS[name][0])
    if isinstance(changed, SentenceEncoder):
        changed, original = changed.model, original.model
    diff = [k for k, v in changed.state_dict().items() if not torch.equal(v, original.state_dict()[k])]
    assert len(diff) == 1, diff


@pytest.mark.parametrize("file", ["config.json", "model.safetensors", checkpoint.STATE_TENSORS, "tokenizer.json",
                                  checkpoint.STATE_JSON])
def test_checkpoint_catches_a_flip_anywhere(pristine, tmp_path, file):
    """A flipped byte at any offset of any checkpoint file (header or data) is refused, and latest() skips it."""
    run = _copy(pristine, "run", tmp_path)
    target = run / STEP / file
    raw = target.read_bytes()
    for i in sorted({0, 1, 7, 8, 9, len(raw) // 3, len(raw) // 2, 2 * len(raw) // 3, len(raw) - 2, len(raw) - 1}):
        target.write_bytes(_xor(raw, i))
        with pytest.raises(checkpoint.CheckpointError, match=re.escape(str(target))):
            checkpoint.load(run / STEP)
        assert checkpoint.latest(run) is None
    target.write_bytes(raw)
    assert checkpoint.latest(run) == run / STEP


def test_oversized_header_is_refused_before_reading(pristine, tmp_path):
    """A length beyond the library's 100 MB limit, or beyond the file, is refused without
    reading or allocating it (a sparse 150 MB file; the peak Python allocation stays tiny)."""
    path = _copy(pristine, "gpt2", tmp_path)
    file = path / "model.safetensors"
    for claimed, size in [(150_000_000, 150_000_100), (2**40, 150_000_100), (2**63, 4096)]:
        with open(file, "wb") as f:
            f.write(claimed.to_bytes(8, "little"))
            f.truncate(size)
        tracemalloc.start()
        try:
            _refused(hf.load, path, f"claims {claimed} bytes")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 4 * 2**20, f"{peak} bytes allocated to refuse a {claimed}-byte header"


# wrong dtypes: float dtypes convert (documented), everything else is refused


def _retype(directory: Path, fn) -> dict:
    file = directory / "model.safetensors"
    tensors = load_file(str(file))
    for k in sorted(tensors):
        tensors[k] = fn(k, tensors[k])
    save_file(tensors, str(file))
    return tensors


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_float_weights_of_another_dtype_load_in_that_dtype(pristine, tmp_path, dtype):
    path = _copy(pristine, "gpt2", tmp_path)
    stored = _retype(path, lambda k, t: t.to(dtype))
    model = hf.load(path)
    assert {p.dtype for p in model.parameters()} == {dtype}
    as32 = hf.load(path, dtype=torch.float32)
    assert {p.dtype for p in as32.parameters()} == {torch.float32}
    back = hf.state_dict_to_hf(as32)
    assert all(torch.equal(back[k], stored[k].float()) for k in stored)       # converted exactly


def test_mixed_float_dtypes_load_as_float32(pristine, tmp_path):
    path = _copy(pristine, "gpt2", tmp_path)
    _retype(path, lambda k, t: t.half() if "bias" in k else t)
    assert {p.dtype for p in hf.load(path).parameters()} == {torch.float32}


@pytest.mark.parametrize("dtype, stored", [(torch.int64, "I64"), (torch.int32, "I32"), (torch.uint8, "U8"),
                                           (torch.bool, "BOOL"), (torch.float8_e4m3fn, "F8_E4M3")])
@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_non_float_weights_refused(pristine, tmp_path, name, dtype, stored):
    path = _copy(pristine, name, tmp_path)
    first = sorted(load_file(str(path / "model.safetensors")))[0]
    _retype(path, lambda k, t: t.to(dtype) if k == first else t)
    _refused(hf.load, path, rf"stores weights as {stored}.*float64/32/16")


# -----------------------------------------------------------------------------
# config.json: not JSON, wrong types, a directory, missing


def _dump(obj) -> bytes:
    return json.dumps(obj).encode()


def _width(c: dict) -> str:
    return "n_embd" if "n_embd" in c else "hidden_size"


def _layers(c: dict) -> str:
    return "n_layer" if "n_layer" in c else "num_hidden_layers"


CONFIG_CASES = {
    "empty file": (lambda c: b"", "truncated or not JSON"),
    "not JSON": (lambda c: b"model_type: gpt2\n", "truncated or not JSON"),
    "truncated": (lambda c: _dump(c)[: len(_dump(c)) // 2], "truncated or not JSON"),
    "not UTF-8": (lambda c: b"\xff\xfe" + _dump(c), "truncated or not JSON"),
    "nested too deeply": (lambda c: b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "a JSON list": (lambda c: b"[]", "JSON object"),
    "NaN": (lambda c: _dump({**c, "initializer_range": float("nan")}), "NaN is not a JSON value"),
    "Infinity": (lambda c: _dump({**c, _width(c): float("inf")}), "Infinity is not a JSON value"),
    "width as a string": (lambda c: _dump({**c, _width(c): str(c[_width(c)])}), "must be an integer"),
    "layers as a bool": (lambda c: _dump({**c, _layers(c): True}), "must be an integer"),
    "layers as a fraction": (lambda c: _dump({**c, _layers(c): 1.5}), "must be an integer"),
    "unknown model type": (lambda c: _dump({**{k: v for k, v in c.items() if k != "architectures"},
                                            "model_type": "gpt9"}), "not supported"),
    "a pickle": (None, "truncated or not JSON"),
}
CONFIG_TARGETS = [t for t in TARGETS if t != "checkpoint-state"]


@pytest.mark.parametrize("case", list(CONFIG_CASES))
@pytest.mark.parametrize("name", CONFIG_TARGETS)
def test_malformed_config_refused(pristine, tmp_path, name, case):
    path, load, _ = _target(pristine, tmp_path, name)
    file = path / "config.json"
    make, pattern = CONFIG_CASES[case]
    marker = tmp_path / "unpickled"
    file.write_bytes(_payload(marker) if make is None else make(json.loads(file.read_text())))
    error, pattern = _expect(name, pattern)
    _refused(load, path, pattern, error)
    assert not marker.exists()


HUGE_CASES = {
    "width 10**9": (lambda c: {_width(c): 10**9, "head_dim": None}, "do not match"),
    "vocabulary 10**9": (lambda c: {"vocab_size": 10**9}, "do not match"),
    "layers 10**6": (lambda c: {_layers(c): 10**6}, "sets 1000000 layers but the checkpoint holds"),
    "head_dim 10**9": (lambda c: {"head_dim": 10**9}, "do not match"),
    "heads 10**6 x head_dim 8": (lambda c: {"num_attention_heads": 10**6, "num_key_value_heads": 10**6,
                                            "head_dim": 8}, "do not match"),
}


@pytest.mark.parametrize("name, case", [(n, c) for n in ["gpt2", "llama-sharded", "mistral", "bert", "sentence-encoder"]
                                         for c in HUGE_CASES
                                         if not c.startswith("head") or n in ("llama-sharded", "mistral")])
def test_oversized_config_refused_before_any_model_is_built(pristine, tmp_path, monkeypatch, name, case):
    """Sizes config.json claims are checked against the headers first: building even a meta-device
    model would allocate RoPE tables of head_dim entries and take milliseconds per layer.
    (GPT-2 and BERT have no head_dim: their head size is the width over the heads.)"""
    def built(*args, **kwargs):
        raise AssertionError("a model was built for an oversized config")
    path, load, _ = _target(pristine, tmp_path, name)
    file = path / "config.json"
    cfg = json.loads(file.read_text())
    change, pattern = HUGE_CASES[case]
    file.write_text(json.dumps({**cfg, **change(cfg)}))
    monkeypatch.setattr(hf, "Decoder", built)
    monkeypatch.setattr(hf, "Encoder", built)
    _refused(load, path, pattern)


@pytest.mark.parametrize("name", CONFIG_TARGETS)
def test_config_directory_or_missing(pristine, tmp_path, name):
    path, load, _ = _target(pristine, tmp_path, name)
    (path / "config.json").unlink()
    error, pattern = _expect(name, "no config.json")
    _refused(load, path, pattern, error)
    (path / "config.json").mkdir()
    error, pattern = _expect(name, "is a directory")
    _refused(load, path, pattern, error)


# -----------------------------------------------------------------------------
# The shard index: path traversal, symlinks, bad JSON


def _index_case(tmp_path, llama: Path, shard_name: str) -> None:
    index = json.loads((llama / INDEX).read_text())
    index["weight_map"] = {k: (shard_name if v == SHARDS[1] else v) for k, v in index["weight_map"].items()}
    (llama / INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize("shard", ["../../etc/passwd", "/etc/passwd", "../outside.safetensors", "ABSOLUTE",
                                   "sub/inner.safetensors", "sub/../" + SHARDS[1], "..", "", "a\\b.safetensors",
                                   "x\0.safetensors", "./" + SHARDS[1]])
def test_index_naming_a_file_outside_the_directory_is_refused(pristine, tmp_path, shard):
    """Even when the named file exists and is a valid copy of the shard."""
    llama = _copy(pristine, "llama", tmp_path)
    (tmp_path / "outside.safetensors").write_bytes((llama / SHARDS[1]).read_bytes())
    (llama / "sub").mkdir()
    (llama / "sub" / "inner.safetensors").write_bytes((llama / SHARDS[1]).read_bytes())
    if shard == "ABSOLUTE":
        shard = str(tmp_path / "outside.safetensors")
    _index_case(tmp_path, llama, shard)
    _refused(hf.load, llama, r"must be a \.safetensors file name inside")


INDEX_CASES = {
    "empty file": (b"", "truncated or not JSON"),
    "not JSON": (b"weight_map", "truncated or not JSON"),
    "nested too deeply": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "no weight_map": (b"{}", "not a valid index"),
    "weight_map a list": (b'{"weight_map": []}', "not a valid index"),
    "shard name not a string": (b'{"weight_map": {"lm_head.weight": 3}}', "not a valid index"),
    "a JSON list": (b"[1, 2]", "not a valid index"),
}


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_malformed_index_refused(pristine, tmp_path, case):
    llama = _copy(pristine, "llama", tmp_path)
    content, pattern = INDEX_CASES[case]
    (llama / INDEX).write_bytes(content)
    _refused(hf.load, llama, pattern)


def test_index_directory_wrong_or_missing_shard(pristine, tmp_path):
    llama = _copy(pristine, "llama", tmp_path)
    index = json.loads((llama / INDEX).read_text())
    key = sorted(k for k, v in index["weight_map"].items() if v == SHARDS[1])[0]
    (llama / INDEX).write_text(json.dumps({"weight_map": {**index["weight_map"], key: SHARDS[0]}}))
    _refused(hf.load, llama, "index does not match")
    (llama / INDEX).write_text(json.dumps(index))
    (llama / SHARDS[1]).unlink()
    _refused(hf.load, llama, "not in .* as regular files")
    (llama / SHARDS[1]).mkdir()
    _refused(hf.load, llama, "not in .* as regular files")
    (llama / SHARDS[1]).rmdir()
    (llama / INDEX).unlink()
    (llama / INDEX).mkdir()
    _refused(hf.load, llama, "is a directory")


@pytest.mark.parametrize("target", ["/dev/zero", "/dev/null", "FIFO", "DIRECTORY"])
def test_shard_symlink_to_a_non_regular_file_is_refused_unopened(pristine, tmp_path, target):
    llama = _copy(pristine, "llama", tmp_path)
    if target == "FIFO":                    # opening a FIFO would block forever
        target = tmp_path / "fifo"
        os.mkfifo(target)
    elif target == "DIRECTORY":
        target = tmp_path
    (llama / SHARDS[1]).unlink()
    os.symlink(target, llama / SHARDS[1])
    _refused(hf.load, llama, "not in .* as regular files")


def test_symlinked_shard_to_a_regular_file_is_followed(pristine, tmp_path):
    """The Hugging Face cache links snapshot files to its blobs (../../blobs/<sha>): a link
    to a regular file is followed and validated like any file; its content never leaks
    into an error message."""
    llama = _copy(pristine, "llama", tmp_path)
    blob = tmp_path / "blobs" / "0123abcd"
    blob.parent.mkdir()
    shutil.move(llama / SHARDS[1], blob)
    os.symlink(os.path.relpath(blob, llama), llama / SHARDS[1])
    assert isinstance(hf.load(llama), Decoder)
    secret = "s3cr3t-do-not-print"
    blob.write_text(f"password = {secret}\n" * 100)
    msg = _refused(hf.load, llama, "not a valid safetensors file")
    assert secret not in msg


# -----------------------------------------------------------------------------
# Checkpoints: the manifest (training_state.json)


def _rewrite_state(step: Path, edit) -> None:
    """Edit training_state.json and recompute its own hash, so only the check under test can object."""
    file = step / checkpoint.STATE_JSON
    state = json.loads(file.read_text())
    edit(state)
    state["self_sha256"] = hashlib.sha256(checkpoint._canonical(state)).hexdigest()
    file.write_text(json.dumps(state))


def _sha(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def _list_outside(name_of):
    def edit(step: Path):
        outside = step.parent.parent / "outside.bin"
        outside.write_bytes(b"not yours")
        _rewrite_state(step, lambda s: s["files"].__setitem__(name_of(step, outside), _sha(outside)))
    return edit


def _drop(name):
    return lambda step: _rewrite_state(step, lambda s: s["files"].pop(name))


def _symlinked(step: Path):
    outside = step.parent.parent / "tokenizer-copy.json"
    shutil.copyfile(step / "tokenizer.json", outside)
    (step / "tokenizer.json").unlink()
    os.symlink(outside, step / "tokenizer.json")


MANIFEST_CASES = {
    "../ path to an existing file with its real sha256": (_list_outside(lambda s, o: "../../outside.bin"),
                                                         "plain names"),
    "absolute path with its real sha256": (_list_outside(lambda s, o: str(o)), "plain names"),
    "sub/../ path": (lambda s: _rewrite_state(s, lambda st: st["files"].__setitem__(
        "sub/../model.safetensors", st["files"]["model.safetensors"])), "plain names"),
    "lists itself": (lambda s: _rewrite_state(s, lambda st: st["files"].__setitem__(
        checkpoint.STATE_JSON, "0" * 64)), "plain names"),
    "weights not hashed": (_drop("model.safetensors"), r"records no sha256 for \['model.safetensors'\]"),
    "config not hashed": (_drop("config.json"), r"records no sha256 for \['config.json'\]"),
    "optimizer state not hashed": (_drop(checkpoint.STATE_TENSORS), "records no sha256"),
    "tokenizer not hashed": (_drop("tokenizer.json"), "records no sha256"),
    "files is a list": (lambda s: _rewrite_state(s, lambda st: st.__setitem__("files", [])), "no file hashes"),
    "a symlink to an identical file outside": (_symlinked, "symbolic link"),
    "edited without rehashing": (lambda s: (s / checkpoint.STATE_JSON).write_text(
        (s / checkpoint.STATE_JSON).read_text().replace('"step": 1', '"step": 2')), "modified after"),
    "empty file": (lambda s: (s / checkpoint.STATE_JSON).write_bytes(b""), "truncated or not JSON"),
    "not UTF-8": (lambda s: (s / checkpoint.STATE_JSON).write_bytes(b"\xff{}"), "truncated or not JSON"),
    "nested too deeply": (lambda s: (s / checkpoint.STATE_JSON).write_bytes(b"[" * 100_000), "nested too deeply"),
    "a JSON list": (lambda s: (s / checkpoint.STATE_JSON).write_bytes(b"[]"), "no file hashes"),
    "a directory": (lambda s: ((s / checkpoint.STATE_JSON).unlink(), (s / checkpoint.STATE_JSON).mkdir()),
                    "is a directory"),
    "missing": (lambda s: (s / checkpoint.STATE_JSON).unlink(), "incomplete write"),
    "a pickle": (lambda s: (s / checkpoint.STATE_JSON).write_bytes(_payload(s / "unpickled")),
                 "truncated or not JSON"),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_malformed_checkpoint_manifest_refused(pristine, tmp_path, case):
    """The newest checkpoint (step 2) is broken: load refuses it naming step 1, latest() skips it."""
    run = _copy(pristine, "run", tmp_path)
    newest = run / "step-000002"
    shutil.copytree(run / STEP, newest, symlinks=True)
    edit, pattern = MANIFEST_CASES[case]
    edit(newest)
    msg = _refused(checkpoint.load, newest, pattern, checkpoint.CheckpointError)
    assert f"previous valid checkpoint is {run / STEP}" in msg
    assert checkpoint.latest(run) == run / STEP
    assert not (newest / "unpickled").exists()


def test_checkpoint_extra_file_names_stay_inside(pristine, tmp_path):
    model = hf.load(pristine / "gpt2")
    for bad in ["../escape.json", "/tmp/abs.json", "sub/x.json", "model.safetensors", checkpoint.STATE_JSON]:
        with pytest.raises(ValueError, match="plain file names"):
            checkpoint.save(tmp_path / "run", 1, model, {}, {}, extra_files={bad: "{}"})
    assert not (tmp_path / "escape.json").exists() and checkpoint.list_checkpoints(tmp_path / "run") == []


# -----------------------------------------------------------------------------
# Pickle files: never opened, refused with the conversion recipe

RECIPE = r"unpickling a file can run arbitrary code.*save_pretrained\(dir, safe_serialization=True\)"


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"])
@pytest.mark.parametrize("name", ["gpt2", "bert", "sentence-encoder"])
def test_pickle_weights_are_never_opened(pristine, tmp_path, name, suffix):
    path, load, file = _target(pristine, tmp_path, name)
    marker = tmp_path / "unpickled"
    file.unlink()
    pickled = path / f"pytorch_model{suffix}"
    pickled.write_bytes(_payload(marker))
    _refused(load, path, RECIPE)
    if name != "sentence-encoder":
        _refused(hf.load, pickled, "is a pickle file; .*" + RECIPE)
    assert not marker.exists()


def test_pickle_where_json_or_a_tokenizer_is_expected(tmp_path):
    marker = tmp_path / "unpickled"
    file = tmp_path / "model.pt"
    file.write_bytes(_payload(marker))
    _refused(data.FileTokenizer, file, "not a tokenizers tokenizer.json")
    _refused(lambda p: train.decoder_config(None, vocab_size=20, context=8, config=p), file, "truncated or not JSON")
    _refused(data.load_corpus, file, "binary file")
    assert not marker.exists()


# -----------------------------------------------------------------------------
# The other JSON files: tokenizer.json, `qkv train --config`, sentence-transformers configs

TOKENIZER_CASES = {
    "empty file": b"",
    "not JSON": b"vocab: [a, b]",
    "truncated": _tokenizer_json().encode()[:100],
    "a JSON object of another kind": b'{"model_type": "gpt2"}',
    "not UTF-8": b"\xff\xfe\x00",
    "nested too deeply": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("case", list(TOKENIZER_CASES))
def test_malformed_tokenizer_json_refused(tmp_path, case):
    file = tmp_path / "tokenizer.json"
    file.write_bytes(TOKENIZER_CASES[case])
    _refused(data.FileTokenizer, file, "not a tokenizers tokenizer.json")


def test_tokenizer_json_directory_or_missing(tmp_path):
    (tmp_path / "tokenizer.json").mkdir()
    _refused(data.FileTokenizer, tmp_path / "tokenizer.json", "is a directory")
    with pytest.raises(FileNotFoundError, match="does not exist"):      # documented: a missing path
        data.FileTokenizer(tmp_path / "none.json")


def _decoder_config(path):
    return train.decoder_config(None, vocab_size=20, context=8, config=path)


TRAIN_CONFIG_CASES = {
    "empty file": (b"", "truncated or not JSON"),
    "not JSON": (b"d_model = 32", "truncated or not JSON"),
    "truncated": (b'{"d_model": 32, "n_la', "truncated or not JSON"),
    "not UTF-8": (b"\xff{}", "truncated or not JSON"),
    "nested too deeply": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "a JSON list": (b"[32, 1, 2]", "must hold a JSON object"),
    "NaN": (b'{"d_model": 32, "n_layers": 1, "n_heads": 2, "norm_eps": NaN}', "NaN is not a JSON value"),
    "d_model a string": (b'{"d_model": "32", "n_layers": 1, "n_heads": 2}', "d_model must be an int"),
    "n_layers a fraction": (b'{"d_model": 32, "n_layers": 1.5, "n_heads": 2}', "n_layers must be an int"),
    "n_heads a bool": (b'{"d_model": 32, "n_layers": 1, "n_heads": true}', "n_heads must be an int"),
    "an unknown field": (b'{"d_model": 32, "n_layers": 1, "n_heads": 2, "__class__": "os.system"}',
                         "unknown DecoderConfig field"),
}


@pytest.mark.parametrize("case", list(TRAIN_CONFIG_CASES))
def test_malformed_train_config_refused(tmp_path, case):
    file = tmp_path / "config.json"
    content, pattern = TRAIN_CONFIG_CASES[case]
    file.write_bytes(content)
    _refused(_decoder_config, file, pattern)


def test_train_config_directory_or_missing(tmp_path):
    (tmp_path / "cfg.json").mkdir()
    _refused(_decoder_config, tmp_path / "cfg.json", "is a directory")
    with pytest.raises(FileNotFoundError, match="does not exist"):      # documented: a missing path
        _decoder_config(tmp_path / "none.json")


def _modules(entries):
    return lambda st: (st / "modules.json").write_text(json.dumps(entries))


SENTENCE_CASES = {
    "modules.json empty": (lambda st: (st / "modules.json").write_bytes(b""), "truncated or not JSON"),
    "modules.json nested too deeply": (lambda st: (st / "modules.json").write_bytes(b"[" * 100_000),
                                       "nested too deeply"),
    "modules.json a directory": (lambda st: ((st / "modules.json").unlink(), (st / "modules.json").mkdir()),
                                 "is a directory"),
    "module path ../": (_modules([{"path": "../..", "type": "sentence_transformers.models.Transformer"},
                                  {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]),
                        "must be a folder inside"),
    "module path absolute": (_modules([{"path": "/etc", "type": "sentence_transformers.models.Transformer"},
                                       {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]),
                             "must be a folder inside"),
    "module entry not an object": (_modules(["Transformer", "Pooling"]), "needs a 'type' string"),
    "pooling_mode a number": (lambda st: (st / "1_Pooling" / "config.json").write_text('{"pooling_mode": 5}'),
                              "pooling_mode must be a string or a list"),
    "pooling config a directory": (lambda st: ((st / "1_Pooling" / "config.json").unlink(),
                                               (st / "1_Pooling" / "config.json").mkdir()), "is a directory"),
    "pooling config NaN": (lambda st: (st / "1_Pooling" / "config.json").write_text(
        '{"word_embedding_dimension": NaN}'), "NaN is not a JSON value"),
    "max_seq_length a string": (lambda st: (st / "sentence_bert_config.json").write_text(
        '{"max_seq_length": "128"}'), "max_seq_length must be an int"),
    "max_seq_length a bool": (lambda st: (st / "sentence_bert_config.json").write_text(
        '{"max_seq_length": true}'), "max_seq_length must be an int"),
    "tokenizer.json empty": (lambda st: (st / "tokenizer.json").write_bytes(b""), "not a valid tokenizers file"),
    "tokenizer.json truncated": (lambda st: (st / "tokenizer.json").write_bytes(_tokenizer_json().encode()[:50]),
                                 "not a valid tokenizers file"),
    "tokenizer.json a directory": (lambda st: ((st / "tokenizer.json").unlink(), (st / "tokenizer.json").mkdir()),
                                   "is a directory"),
    "tokenizer.json a pickle": (lambda st: (st / "tokenizer.json").write_bytes(_payload(st / "unpickled")),
                                "not a valid tokenizers file"),
}


@pytest.mark.parametrize("case", list(SENTENCE_CASES))
def test_malformed_sentence_transformers_files_refused(pristine, tmp_path, case):
    st = _copy(pristine, "st", tmp_path)
    edit, pattern = SENTENCE_CASES[case]
    edit(st)
    _refused(SentenceEncoder.load, st, pattern)
    assert not (st / "unpickled").exists()


def test_pristine_copies_load(pristine, tmp_path):
    """The baselines: every target loads before it is broken, so each refusal above is the edit's doing."""
    for name in TARGETS:
        path, load, _ = _target(pristine, tmp_path / name, name)
        assert load(path) is not None
    assert isinstance(data.FileTokenizer(pristine / "st" / "tokenizer.json"), data.FileTokenizer)


# -----------------------------------------------------------------------------
# Atomic writes: a failure half-way leaves the previous file and no temporary file


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _half_then_fail(real, target: int):
    """A writer that writes half of what `real` would (to its argument number `target`), then fails."""
    def writer(*args, **kwargs):
        real(*args, **kwargs)
        with open(args[target], "r+b") as f:
            f.truncate(max(os.path.getsize(args[target]) // 2, 1))
        raise OSError(28, "No space left on device")
    return writer


def _failing_replace(monkeypatch):
    def replace(src, dst, **kwargs):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("failure", ["serializer", "replace"])
def test_hf_save_failure_keeps_the_previous_files(pristine, tmp_path, monkeypatch, failure):
    import safetensors.torch

    out = _copy(pristine, "gpt2", tmp_path)
    before = {n: (out / n).read_bytes() for n in _entries(out)}
    other = Decoder(DecoderConfig.gpt2(vocab_size=24, d_model=8, n_layers=1, n_heads=2, max_positions=32))
    if failure == "serializer":
        monkeypatch.setattr(safetensors.torch, "save_file", _half_then_fail(safetensors.torch.save_file, 1))
    else:
        _failing_replace(monkeypatch)
    with pytest.raises(OSError):
        hf.save(other, out)
    monkeypatch.undo()
    assert {n: (out / n).read_bytes() for n in _entries(out)} == before     # same files, same bytes, no temp
    assert isinstance(hf.load(out), Decoder)


@pytest.mark.parametrize("failure", ["serializer", "tokenizer copy", "rename"])
def test_checkpoint_save_failure_keeps_the_previous_checkpoints(pristine, tmp_path, monkeypatch, failure):
    import safetensors.torch

    run = _copy(pristine, "run", tmp_path)
    model = hf.load(pristine / "gpt2")
    before = {n: (run / STEP / n).read_bytes() for n in _entries(run / STEP)}
    step = 2
    if failure == "serializer":
        monkeypatch.setattr(safetensors.torch, "save_file", _half_then_fail(safetensors.torch.save_file, 1))
    elif failure == "tokenizer copy":
        monkeypatch.setattr(shutil, "copyfile", _half_then_fail(shutil.copyfile, 1))
    else:                                             # rewriting the same step: the rename of the new folder fails
        step, real = 1, os.rename

        def rename(src, dst):
            if Path(src).name.startswith(".tmp-step-"):
                raise OSError(5, "Input/output error")
            return real(src, dst)
        monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError):
        checkpoint.save(run, step, model, {}, {}, extra_files={"tokenizer.json": pristine / "run" / STEP /
                                                               "tokenizer.json"})
    monkeypatch.undo()
    assert _entries(run) == [STEP]                                          # no temporary folder left
    assert {n: (run / STEP / n).read_bytes() for n in _entries(run / STEP)} == before
    assert checkpoint.latest(run) == run / STEP


def _viz_writers():
    from qkv import viz

    w = torch.softmax(torch.randn(2, 4, 4), -1)
    return {"heatmap.png": lambda p: viz.heatmap(w[0], p),
            "grid.png": lambda p: viz.grid({"layer 0": w}, p),
            "attention.html": lambda p: viz.html({"layer 0": w}, ["a", "b", "c", "d"], p)}


@pytest.mark.parametrize("name", ["heatmap.png", "grid.png", "attention.html"])
@pytest.mark.parametrize("failure", ["serializer", "replace"])
def test_viz_write_failure_keeps_the_previous_file(tmp_path, monkeypatch, name, failure):
    from matplotlib.figure import Figure

    from qkv import viz

    write = _viz_writers()[name]
    path = tmp_path / name
    write(path)
    before = path.read_bytes()

    def savefig(self, target, *args, **kwargs):
        Path(target).write_bytes(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    def html_open(file, mode="r", *args, **kwargs):     # the HTML page is half written, then the disk is full
        with open(file, "wb") as f:
            f.write(b"<!DOCTYPE html><html><head>")
        raise OSError(28, "No space left on device")

    if failure == "replace":
        _failing_replace(monkeypatch)
    elif name.endswith(".png"):
        monkeypatch.setattr(Figure, "savefig", savefig)
    else:
        monkeypatch.setattr(viz, "open", html_open, raising=False)
    with pytest.raises(OSError):
        write(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and _entries(tmp_path) == [name]


@pytest.mark.parametrize("failure", ["serializer", "replace"])
def test_bench_results_failure_keeps_the_previous_files(tmp_path, monkeypatch, failure):
    from qkv.tools import harness

    def render(result, markdown=False):
        return f"| n | {result['n']} |"

    harness.write_results({"n": 1, "seconds": 1.0}, tmp_path, "attention", render, lambda *a: None)
    before = {n: (tmp_path / n).read_bytes() for n in _entries(tmp_path)}
    if failure == "replace":
        _failing_replace(monkeypatch)
    else:
        monkeypatch.setattr(Path, "write_text", _half_then_fail(Path.write_text, 0))
    with pytest.raises(OSError):
        harness.write_results({"n": 2, "seconds": 1.0}, tmp_path, "attention", render, lambda *a: None)
    monkeypatch.undo()
    assert {n: (tmp_path / n).read_bytes() for n in _entries(tmp_path)} == before


def test_loss_curve_failure_keeps_the_previous_png(tmp_path, monkeypatch):
    from qkv.train import lm          # _plot lives in train/lm.py

    history = train.LMHistory()
    history.loss.extend([3.0, 2.5, 2.0])
    path = tmp_path / "loss.png"
    lm._plot(path, history)
    before = path.read_bytes()
    _failing_replace(monkeypatch)
    with pytest.raises(OSError):
        lm._plot(path, history)
    monkeypatch.undo()
    assert path.read_bytes() == before and _entries(tmp_path) == ["loss.png"]


def test_write_atomic_interrupted_leaves_nothing(tmp_path):
    path = tmp_path / "summary.json"
    _files.write_atomic(path, lambda tmp: Path(tmp).write_text("old"))

    def interrupted(tmp):
        Path(tmp).write_text("half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        _files.write_atomic(path, interrupted)
    assert path.read_text() == "old" and _entries(tmp_path) == ["summary.json"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


# -----------------------------------------------------------------------------
# Source scans: nothing unpickles, nothing writes around the atomic writer

SOURCES = sorted([*SRC.rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")])
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_nothing_unpickles():
    """No pickle-family import; torch.load only with weights_only=True; np.load never with
    allow_pickle=True; no torch.jit.load, no pandas read_pickle."""
    found = []
    for file in SOURCES:
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            where = f"{file.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
                found.append(f"{where} from {node.module} import")
            elif isinstance(node, ast.Call):
                name = _dotted(node.func)
                last = name.rsplit(".", 1)[-1]
                if name.endswith("torch.load") and not _is_true(_kw(node, "weights_only")):
                    found.append(f"{where} {name} without weights_only=True")
                elif name.split(".")[0] in ("np", "numpy") and last == "load" and _is_true(_kw(node, "allow_pickle")):
                    found.append(f"{where} {name}(allow_pickle=True)")
                elif name.endswith("jit.load") or last in ("read_pickle", "Unpickler"):
                    found.append(f"{where} {name}")
    assert not found, "unpickling in the source:\n" + "\n".join(found)


WRITE_CALLS = {"write_text", "write_bytes", "savefig", "save_file", "copyfile", "tofile", "to_csv", "write_html",
               "write_image"}
WRITE_DOTTED = {"np.save", "np.savez", "np.savez_compressed", "numpy.save", "json.dump", "pickle.dump",
                "os.rename", "shutil.copy", "shutil.copy2", "shutil.copytree", "shutil.move"}
WRITERS = {"write_atomic", "_write_atomic"}
# qkv's own writers, atomic themselves: every other `.save(...)` (torch.save, Tokenizer.save, ...) counts as a write
ATOMIC_SAVES = {"hf.save", "_hf.save", "qkv_hf.save", "_ckpt.save", "checkpoint.save"}

# (file under src/qkv, function): why a plain write is right there
ALLOWED_WRITES = {
    ("checkpoint.py", "save"): "every file is written inside a temporary folder that is fsynced and renamed into "
                               "place as a whole (and removed on failure): the checkpoint's own atomic scheme",
    ("checkpoint.py", "_stall"): "test hook: the signal file a test waits for before killing the writer",
    ("tools/harness.py", "reset_peak"): "writes the kernel control file /proc/self/clear_refs, not a data file",
    ("tools/bench/train.py", "_Group.__init__"): "scratch files in a private temporary directory, read by the "
                                           "benchmark's own worker processes (rank logs, the initial weights, "
                                           "read back with torch.load(weights_only=True))",
    ("cli.py", "main"): "opens os.devnull to silence native libraries' output",
    ("tools/bench/gpu.py", "_worker"): "appends result rows to a scratch file in the benchmark's private temporary "
                                       "directory, read back by its parent process (a cut line is skipped)",
    ("tools/bench/gpu.py", "drive"): "the worker's job file and stderr in the same private temporary directory",
    ("kernels/__init__.py", "_start_build"): "the background kernel build's log, appended to: a record of its "
                                             "output for a person, never read back",
    ("kernels/build.py", "_locked"): "a lock file opened for flock: it holds no data",
    ("kernels/__init__.py", "write_stamp"): "its own temporary file and os.replace (qkv.kernels shares floor 0 "
                                            "with qkv._util and may not import its writer); a lost stamp only "
                                            "means one more build",
}


def _write_mode(call: ast.Call) -> bool:
    mode = _kw(call, "mode") or (call.args[1] if len(call.args) > 1 else None)
    if isinstance(mode, ast.Constant) and isinstance(mode.value, str):
        return any(c in mode.value for c in "wax+")
    return mode is not None                           # a mode computed at run time: flag it


def _os_open_writes(call: ast.Call) -> bool:
    flags = {n.attr for n in ast.walk(call) if isinstance(n, ast.Attribute)}
    return bool(flags & {"O_WRONLY", "O_RDWR", "O_CREAT", "O_APPEND", "O_TRUNC"})


def _is_write(call: ast.Call) -> bool:
    name = _dotted(call.func)
    last = name.rsplit(".", 1)[-1]
    if name == "open" or (isinstance(call.func, ast.Attribute) and last == "open" and name != "os.open"):
        return _write_mode(call)
    if name == "os.open":
        return _os_open_writes(call)
    if last == "save":
        return name not in ATOMIC_SAVES
    return last in WRITE_CALLS or name in WRITE_DOTTED


def _inside_atomic_writer(node, parents) -> bool:
    """True when `node` is inside a callback handed to write_atomic: a lambda argument,
    or a nested function passed by name in the same scope."""
    child, cur = node, parents.get(node)
    while cur is not None:
        if isinstance(child, ast.Lambda) and isinstance(cur, ast.Call) and _dotted(cur.func).rsplit(".", 1)[-1] \
                in WRITERS and child in cur.args:
            return True
        if isinstance(child, ast.FunctionDef):
            for call in ast.walk(cur):
                if (isinstance(call, ast.Call) and _dotted(call.func).rsplit(".", 1)[-1] in WRITERS
                        and any(isinstance(a, ast.Name) and a.id == child.name for a in call.args)):
                    return True
        child, cur = cur, parents.get(cur)
    return False


def _qualname(node, parents) -> str:
    names = []
    cur = parents.get(node)
    while cur is not None:
        if isinstance(cur, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(cur.name)
        cur = parents.get(cur)
    return ".".join(reversed(names))


def test_every_write_goes_through_the_atomic_writer():
    found, used = [], set()
    for file in sorted(SRC.rglob("*.py")):
        rel = file.relative_to(SRC).as_posix()
        if rel == "_files.py":
            continue                                  # the atomic writer itself
        tree = ast.parse(file.read_text(), str(file))
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and _is_write(node)) or _inside_atomic_writer(node, parents):
                continue
            key = (rel, _qualname(node, parents))
            if key in ALLOWED_WRITES:
                used.add(key)
            else:
                found.append(f"src/qkv/{rel}:{node.lineno} in {key[1] or '<module>'}: {ast.unparse(node)[:80]}")
    assert not found, "writes that bypass qkv._util.files.write_atomic:\n" + "\n".join(found)
    assert used == set(ALLOWED_WRITES), f"stale allow-list entries: {set(ALLOWED_WRITES) - used}"


def test_the_scanners_see_what_they_look_for():
    """The scans above would catch the calls they exist for."""
    bad = ast.parse("def f(p):\n    open(p, 'w').write('x')\n    Path(p).write_text('x')\n    fig.savefig(p)\n"
                    "    torch.save(x, p)\n    os.open(p, os.O_WRONLY | os.O_CREAT)\n")
    good = ast.parse("def f(p):\n    write_atomic(p, lambda tmp: Path(tmp).write_text('x'))\n"
                     "    def w(tmp):\n        open(tmp, 'w')\n    _write_atomic(p, w)\n    open(p)\n"
                     "    open(p, 'rb')\n")
    for tree, expect in [(bad, 5), (good, 0)]:
        parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
        writes = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _is_write(n)
                  and not _inside_atomic_writer(n, parents)]
        assert len(writes) == expect, [ast.unparse(w) for w in writes]
