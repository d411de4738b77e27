"""Safetensors files read safely: the header validated before any tensor is read, nothing unpickled.

`read_header(file)` checks a file's layout (length, JSON, offsets tiling the data exactly) and
returns {name: (dtype, shape)}; `Safetensors(files)` is a checkpoint spread over shards, read
lazily (headers first); `Memory(tensors)` is the same interface over an in-memory dict. Both
are `Source`s: names, shapes and dtypes, and a way to read some of them.
Imports no other qkv module.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["Source", "Memory", "Safetensors", "read_header", "FLOAT_DTYPES", "ITEMSIZE", "MAX_HEADER",
           "PICKLE_SUFFIXES", "PICKLE_RECIPE"]

# safetensors dtype names: float ones qkv loads, and every element size (for the header check)
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
             "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_HEADER = 100_000_000   # safetensors' own limit on the JSON header
PICKLE_RECIPE = ("qkv reads safetensors only, because unpickling a file can run arbitrary code (it never opens "
                  "one). Convert it once, with code you trust: model = "
                  "transformers.AutoModelForCausalLM.from_pretrained(dir) (a BERT encoder: "
                  "transformers.BertModel.from_pretrained(dir)); model.save_pretrained(dir, "
                  "safe_serialization=True) writes model.safetensors")



class Source:
    """Names, shapes and dtypes of a checkpoint's tensors, and a way to read some of them."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple:
        raise NotImplementedError

    def dtype(self, key: str):
        """A torch float dtype, or the stored type's name when qkv cannot load it."""
        raise NotImplementedError

    def read(self, keys) -> dict[str, Tensor]:
        raise NotImplementedError


class Memory(Source):
    def __init__(self, tensors: Mapping):
        for k, v in tensors.items():
            if not isinstance(k, str) or not isinstance(v, Tensor):
                raise TypeError(f"expected a mapping of str -> Tensor, got {type(k).__name__} -> "
                                f"{type(v).__name__} for {k!r}")
        self.tensors = tensors

    def keys(self):
        return list(self.tensors)

    def shape(self, key):
        return tuple(self.tensors[key].shape)

    def dtype(self, key):
        dt = self.tensors[key].dtype
        return dt if dt in FLOAT_DTYPES.values() else str(dt)

    def read(self, keys):
        return {k: self.tensors[k] for k in keys}


class Safetensors(Source):
    """Tensors spread over one or more .safetensors files; only headers are read up front."""

    def __init__(self, files: list[Path], weight_map: dict[str, str] | None = None):
        self.where: dict[str, tuple[Path, str, tuple]] = {}
        for file in files:
            for key, (dt, shape) in read_header(file).items():
                if key in self.where:
                    raise ValueError(f"tensor {key!r} is stored twice, in {self.where[key][0].name} and {file.name}")
                self.where[key] = (file, dt, shape)
        for key, shard in (weight_map or {}).items():
            if key not in self.where or self.where[key][0].name != shard:
                found = self.where[key][0].name if key in self.where else "no shard"
                raise ValueError(f"model.safetensors.index.json puts {key!r} in {shard}, but it is in {found}; "
                                 f"the index does not match the shards")

    def keys(self):
        return list(self.where)

    def shape(self, key):
        return self.where[key][2]

    def dtype(self, key):
        name = self.where[key][1]
        return FLOAT_DTYPES.get(name, name)

    def read(self, keys):
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.where[k][0], []).append(k)
        out = {}
        for file, names in by_file.items():
            try:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    for k in names:
                        out[k] = f.get_tensor(k)
            except Exception as exc:   # the library raises its own SafetensorError (not a ValueError)
                raise ValueError(f"{file}: cannot read the safetensors file ({exc}); it may be corrupt or "
                                 f"truncated: download or save it again") from exc
        return out


def read_header(file: Path) -> dict[str, tuple[str, tuple]]:
    """Validate a safetensors file's header (without reading the data): {name: (dtype, shape)}.

    Layout: 8 bytes little-endian header length N, N bytes of JSON {name: {"dtype",
    "shape", "data_offsets": [begin, end]}}, then the data; offsets are relative to
    the data's start. As the safetensors library requires, the tensors tile the data
    exactly: no overlaps, no gaps, nothing after the last one. The length is checked
    against the file size (and the library's 100 MB limit) before the header is read,
    so a corrupt length never makes qkv allocate or read more than the file holds.
    Every problem is a ValueError naming the file; nothing here unpickles.
    """
    bad = f"{file}: not a valid safetensors file"
    if not file.is_file():
        raise ValueError(f"{bad}: it is {'a directory' if file.is_dir() else 'not a regular file'}")
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{bad}: only {size} bytes (truncated?)")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > MAX_HEADER:
            raise ValueError(f"{bad}: the header claims {n} bytes but the file has {size - 8} after the length "
                             f"field (truncated or corrupt)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:   # JSONDecodeError, UnicodeDecodeError, nesting too deep
        raise ValueError(f"{bad}: its header is not valid JSON ({type(exc).__name__}: {exc}); the file is "
                         f"corrupt") from None
    if not isinstance(header, dict):
        raise ValueError(f"{bad}: its header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(f"{bad}: its __metadata__ must map names to strings")
    data_len = size - 8 - n
    out = {}
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dt, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (isinstance(dt, str) and isinstance(shape, list)
                  and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
                  and all(isinstance(o, int) and not isinstance(o, bool) for o in (begin, end)))
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{bad}: malformed header entry for {key!r}: {info!r}")
        if not 0 <= begin <= end <= data_len:
            raise ValueError(f"{bad}: tensor {key!r} spans bytes {begin}..{end} of the data but the file holds "
                             f"{data_len} (truncated?)")
        if dt in ITEMSIZE and (end - begin) != math.prod(shape) * ITEMSIZE[dt]:
            raise ValueError(f"{bad}: tensor {key!r} ({dt} {shape}) needs {math.prod(shape) * ITEMSIZE[dt]} "
                             f"bytes but its offsets span {end - begin}")
        out[key] = (dt, tuple(shape))
        spans.append((begin, end, key))
    at, prev = 0, None
    for begin, end, key in sorted(spans):
        if begin != at:
            what = f"overlaps {prev!r}" if begin < at else f"leaves bytes {at}..{begin} unused"
            raise ValueError(f"{bad}: tensor {key!r} at bytes {begin}..{end} {what} (corrupt header)")
        at, prev = end, key
    if at != data_len:
        raise ValueError(f"{bad}: the tensors end at byte {at} of the data but the file holds {data_len} "
                         f"(trailing bytes: corrupt or a partial overwrite)")
    return out
