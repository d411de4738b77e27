"""Synthetic sequence-to-sequence tasks that need attention, and tiny tokenizers.

Legend: B batch, Ls source length (longest in the batch), Lt target length + 1 (BOS or EOS).

Token ids (every task, every tokenizer here)::

    PAD = 0    padding (ignored by the loss, masked out of attention)
    BOS = 1    first decoder input
    EOS = 2    last decoder target: "the answer is complete"
    3 .. vocab + 2   the `vocab` content tokens            vocab_size = vocab + 3

Tasks (a source is `n` content tokens, min_len <= n <= max_len, drawn uniformly;
the target is a function of the source alone)::

    reverse       tgt[i] = src[n - 1 - i]                    3 7 5 4 -> 4 5 7 3
    sort          tgt = src in ascending order (ties kept)   3 7 5 4 -> 3 4 5 7
    copy_offset   tgt[i] = src[(i + offset) % n]             3 7 5 4 -> 5 4 3 7   (offset 2)
                  a left rotation by `offset` positions

Each needs attention: output i depends on a source position that moves with n
(reverse, copy_offset) or on a comparison with every other token (sort).

Batches (`batch`) follow teacher forcing::

    src        (B, Ls)   content tokens, PAD after each row's length
    src_lengths (B,)     tokens per source row
    tgt_in     (B, Lt)   BOS t_1 .. t_m, PAD after        (the decoder's inputs)
    tgt_out    (B, Lt)   t_1 .. t_m EOS, PAD after        (what it must predict)

Text corpora for language models (`load_corpus`, `make_tokenizer`, `TextData`)::

    load_corpus(path)        a UTF-8 text file, or every text file under a folder (sorted)
    load_corpus(None)        the default corpus: the Python standard library's own .py sources
    TextData.build(text, tokenizer="byte" | "char" | "path/to/tokenizer.json")
    data.batch(step, B, T, seed=s, micro=k)   (B, T + 1) windows of the training split

A text batch is a pure function of (seed, step, micro): a resumed run at step s
draws exactly the batches the uninterrupted run drew there.

Everything is deterministic given a seed: `Task.sample(n, seed=s)` and
`Task.stream(seed=s)` draw from `torch.Generator().manual_seed(s)`; a held-out
set (`Task.held_out`) uses its own seed (`EVAL_SEED` by default, different from
any training seed the helpers here pick), so it is not the training stream.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from qkv._checks import check_int

__all__ = ["PAD", "BOS", "EOS", "N_SPECIAL", "TASKS", "EVAL_SEED", "Task", "Batch", "make_task", "batch",
           "ByteTokenizer", "CharTokenizer", "FileTokenizer", "DEFAULT_CORPUS_BYTES", "load_corpus",
           "default_corpus", "make_tokenizer", "TextData", "unigram_entropy_bits"]

PAD, BOS, EOS = 0, 1, 2
N_SPECIAL = 3                 # content tokens start here
EVAL_SEED = 1_000_003         # the default seed of held-out sets; training seeds should differ
TASKS = ("reverse", "sort", "copy_offset")


_check_int = check_int


def _generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator:
    if (seed is None) == (generator is None):
        raise ValueError("pass exactly one of seed= (an int) or generator= (a torch.Generator)")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return generator
    return torch.Generator().manual_seed(_check_int("seed", seed, 0))


class Batch(NamedTuple):
    """A padded teacher-forcing batch (see the module docstring for the layout)."""

    src: Tensor            # (B, Ls) int64
    src_lengths: Tensor    # (B,) int64
    tgt_in: Tensor         # (B, Lt) int64, BOS first
    tgt_out: Tensor        # (B, Lt) int64, EOS last

    @property
    def n_target_tokens(self) -> int:
        """Tokens the loss is computed on (EOS included, PAD excluded)."""
        return int((self.tgt_out != PAD).sum())


def batch(src: Sequence[Tensor], tgt: Sequence[Tensor], *, device=None) -> Batch:
    """Pad lists of 1-D int token tensors into a `Batch` (BOS/EOS added to the target)."""
    if len(src) != len(tgt):
        raise ValueError(f"src and tgt must hold as many sequences, got {len(src)} and {len(tgt)}")
    if len(src) == 0:
        raise ValueError("cannot batch zero sequences; pass at least one (src, tgt) pair")
    for name, seqs in (("src", src), ("tgt", tgt)):
        for i, t in enumerate(seqs):
            if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype not in (torch.int64, torch.int32):
                desc = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise TypeError(f"{name}[{i}] must be a 1-D integer tensor, got {desc}")
            if t.numel() and int(t.min()) < N_SPECIAL:
                raise ValueError(f"{name}[{i}] holds a special id (< {N_SPECIAL}); sequences hold content "
                                 f"tokens only, BOS/EOS/PAD are added here")
    if any(t.numel() == 0 for t in src):
        raise ValueError("a source sequence is empty; every source needs at least one token")
    B = len(src)
    Ls = max(t.numel() for t in src)
    Lt = max(t.numel() for t in tgt) + 1
    s = torch.full((B, Ls), PAD, dtype=torch.long)                         # (B, Ls)
    t_in = torch.full((B, Lt), PAD, dtype=torch.long)                      # (B, Lt)
    t_out = torch.full((B, Lt), PAD, dtype=torch.long)                     # (B, Lt)
    lengths = torch.tensor([t.numel() for t in src], dtype=torch.long)     # (B,)
    for b, (x, y) in enumerate(zip(src, tgt)):
        n, m = x.numel(), y.numel()
        s[b, :n] = x
        t_in[b, 0] = BOS
        t_in[b, 1:m + 1] = y
        t_out[b, :m] = y
        t_out[b, m] = EOS
    out = Batch(s, lengths, t_in, t_out)
    return out if device is None else Batch(*(x.to(device) for x in out))


@dataclass(frozen=True)
class Task:
    """A synthetic task: `name` in TASKS, `vocab` content tokens, source lengths
    min_len..max_len, and (copy_offset only) the rotation `offset`."""

    name: str
    vocab: int = 20
    min_len: int = 8
    max_len: int = 16
    offset: int = 3

    def __post_init__(self):
        if self.name not in TASKS:
            raise ValueError(f"unknown task {self.name!r}; choose one of {', '.join(map(repr, TASKS))}")
        _check_int("vocab", self.vocab, 1)
        _check_int("min_len", self.min_len, 1)
        _check_int("max_len", self.max_len, 1)
        _check_int("offset", self.offset, 0)
        if self.min_len > self.max_len:
            raise ValueError(f"min_len={self.min_len} must be <= max_len={self.max_len}")

    @property
    def vocab_size(self) -> int:
        """Ids in use: the 3 specials plus the content tokens."""
        return self.vocab + N_SPECIAL

    def target(self, src: Tensor) -> Tensor:
        """The target of one source (n,) -> (n,)."""
        if self.name == "reverse":
            return src.flip(0)
        if self.name == "sort":
            return src.sort(stable=True).values
        n = src.numel()
        return src.roll(-(self.offset % n)) if n else src          # tgt[i] = src[(i + offset) % n]

    def sample(self, n: int, *, seed: int | None = None,
               generator: torch.Generator | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """n random (source, target) pairs as two lists of 1-D int64 tensors."""
        _check_int("n", n, 0)
        g = _generator(seed, generator)
        lengths = torch.randint(self.min_len, self.max_len + 1, (n,), generator=g)         # (n,)
        tokens = torch.randint(N_SPECIAL, N_SPECIAL + self.vocab, (n, self.max_len), generator=g)
        src = [tokens[i, :int(lengths[i])].clone() for i in range(n)]
        return src, [self.target(s) for s in src]

    def batch(self, n: int, *, seed: int | None = None, generator: torch.Generator | None = None,
              device=None) -> Batch:
        """n random pairs, padded (`batch`)."""
        return batch(*self.sample(n, seed=seed, generator=generator), device=device)

    def stream(self, batch_size: int, *, seed: int = 0, device=None) -> Callable[[int], Batch]:
        """`next_batch(step) -> Batch` for `qkv.train.fit`: a fresh random batch per call,
        reproducible from `seed` (the step argument is accepted and ignored)."""
        _check_int("batch_size", batch_size, 1)
        if seed == EVAL_SEED:
            raise ValueError(f"seed {EVAL_SEED} is the held-out seed (EVAL_SEED); train with another one")
        g = torch.Generator().manual_seed(_check_int("seed", seed, 0))
        return lambda step=0: self.batch(batch_size, generator=g, device=device)

    def held_out(self, n: int, *, seed: int = EVAL_SEED) -> tuple[list[Tensor], list[Tensor]]:
        """An evaluation set of n pairs drawn with its own seed (never a training stream's)."""
        return self.sample(n, seed=seed)


def make_task(name: str, *, vocab: int = 20, min_len: int = 8, max_len: int = 16, offset: int = 3) -> Task:
    """A `Task` by name: "reverse", "sort" or "copy_offset" (see the module docstring)."""
    return Task(name, vocab=vocab, min_len=min_len, max_len=max_len, offset=offset)


# -----------------------------------------------------------------------------
# Tokenizers: text <-> ids with the same three specials in front.


def _check_ids(ids) -> list[int]:
    if isinstance(ids, Tensor):
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(f"ids must be a list or 1-D tensor of ints, got {type(ids).__name__}")
    ids = list(ids)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TypeError("ids must hold ints")
    return ids


class ByteTokenizer:
    """UTF-8 bytes: byte b is id b + 3; vocab_size 259. Decoding skips the specials
    and replaces invalid UTF-8 with U+FFFD."""

    vocab_size = 256 + N_SPECIAL

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = [b + N_SPECIAL for b in text.encode("utf-8")]
        return ([BOS] if bos else []) + ids + ([EOS] if eos else [])

    def decode(self, ids) -> str:
        ids = _check_ids(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids outside [0, {self.vocab_size}): {bad[:5]}")
        return bytes(i - N_SPECIAL for i in ids if i >= N_SPECIAL).decode("utf-8", errors="replace")


class CharTokenizer:
    """One id per character of a fixed alphabet: alphabet[i] is id i + 3.

    `CharTokenizer.from_text(corpus)` takes the sorted set of the corpus's
    characters. Encoding a character outside the alphabet raises ValueError.
    """

    def __init__(self, alphabet: str | Iterable[str]):
        chars = list(alphabet)
        if not chars:
            raise ValueError("alphabet is empty; give the characters to encode, e.g. CharTokenizer.from_text(text)")
        if not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise TypeError("alphabet must be a string or an iterable of single characters")
        if len(set(chars)) != len(chars):
            raise ValueError("alphabet has repeated characters")
        self.alphabet = "".join(chars)
        self._ids = {c: i + N_SPECIAL for i, c in enumerate(chars)}
        self.vocab_size = len(chars) + N_SPECIAL

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return cls(sorted(set(text)))

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        unknown = sorted(set(text) - self._ids.keys())
        if unknown:
            raise ValueError(f"characters not in the alphabet: {unknown[:10]!r}; build the tokenizer from "
                             f"text that contains them (CharTokenizer.from_text)")
        ids = [self._ids[c] for c in text]
        return ([BOS] if bos else []) + ids + ([EOS] if eos else [])

    def decode(self, ids) -> str:
        ids = _check_ids(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids outside [0, {self.vocab_size}): {bad[:5]}")
        return "".join(self.alphabet[i - N_SPECIAL] for i in ids if i >= N_SPECIAL)

    def __repr__(self) -> str:
        return f"CharTokenizer({self.alphabet!r})"


class FileTokenizer:
    """A `tokenizers` tokenizer.json (e.g. a trained BPE) behind the same encode/decode/vocab_size."""

    def __init__(self, path):
        from tokenizers import Tokenizer

        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer file {file} does not exist; pass 'byte', 'char' or a tokenizer.json")
        try:
            self.tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:  # the library raises its own exception type for a bad file
            raise ValueError(f"{file} is not a tokenizers tokenizer.json: {exc}") from None
        self.path = file
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if bos or eos:
            raise ValueError("a tokenizer.json adds its own special tokens; bos/eos are not supported here")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(_check_ids(ids))


# -----------------------------------------------------------------------------
# Text corpora for language models.

# The default corpus stops adding files at this many UTF-8 bytes (8 MiB).
DEFAULT_CORPUS_BYTES = 8 * 2**20
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def _read_text(file: Path) -> str:
    raw = file.read_bytes()
    if b"\0" in raw[:65536]:
        raise ValueError(f"{file} is a binary file (it holds NUL bytes); train on UTF-8 text files only "
                         f"(remove it or point DATA at a folder of text)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file} is not UTF-8 text ({exc.reason} at byte {exc.start}); convert it to UTF-8 "
                         f"or remove it from the data") from None


def default_corpus(max_bytes: int = DEFAULT_CORPUS_BYTES) -> str:
    """The Python standard library's .py sources (sorted relative paths under
    sysconfig's "stdlib", skipping site-packages, test folders and caches), whole
    files in that order, skipping any that would take the total past `max_bytes`
    UTF-8 bytes. Same Python, same text."""
    check_int("max_bytes", max_bytes, 1)
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if x not in _SKIP_DIRS]
        files += [Path(d, n) for n in names if n.endswith(".py")]
    parts, total = [], 0
    for f in sorted(files, key=lambda f: f.relative_to(root).as_posix()):
        try:
            text = f.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        size = len(text.encode("utf-8")) + 1
        if total + size > max_bytes:
            continue                                  # too big for what is left: try the smaller ones after it
        parts.append(text if text.endswith("\n") else text + "\n")
        total += size
    if not parts:
        raise ValueError(f"found no readable .py files under {root} for the default corpus; pass a data path")
    return "".join(parts)


def load_corpus(path=None, *, max_bytes: int = DEFAULT_CORPUS_BYTES) -> str:
    """The training text: one UTF-8 file, or every non-hidden file under a folder
    (recursively, in sorted path order, each ending with a newline). A binary or
    non-UTF-8 file is refused (ValueError, naming it); a missing path raises
    FileNotFoundError; an empty text ValueError. `path=None`: `default_corpus(max_bytes)`
    (`max_bytes` applies to the default corpus only)."""
    if path is None:
        return default_corpus(max_bytes)
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data path {p} does not exist; pass a text file or a folder of text files")
    if p.is_file():
        text = _read_text(p)
    else:
        files = sorted((f for f in p.rglob("*") if f.is_file()
                        and not any(part.startswith(".") for part in f.relative_to(p).parts)),
                       key=lambda f: f.relative_to(p).as_posix())
        if not files:
            raise ValueError(f"data folder {p} holds no files; put text files in it")
        text = "".join(t if t.endswith("\n") or not t else t + "\n" for t in map(_read_text, files))
    if not text.strip():
        raise ValueError(f"data path {p} holds no text (it is empty or only whitespace)")
    return text


def make_tokenizer(spec: str, text: str | None = None):
    """"byte" (`ByteTokenizer`), "char" (`CharTokenizer.from_text(text)`) or a path to a
    tokenizer.json (`FileTokenizer`)."""
    if not isinstance(spec, (str, Path)):
        raise TypeError(f"tokenizer must be 'byte', 'char' or a path to a tokenizer.json, got {type(spec).__name__}")
    if spec == "byte":
        return ByteTokenizer()
    if spec == "char":
        if text is None:
            raise ValueError("the 'char' tokenizer is built from the corpus: pass its text")
        return CharTokenizer.from_text(text)
    if not str(spec).endswith(".json"):
        raise ValueError(f"tokenizer must be 'byte', 'char' or a path to a tokenizer.json, got {spec!r}")
    return FileTokenizer(spec)


def _encode(tokenizer, text: str) -> Tensor:
    """Token ids (N,) int64; numpy fast paths for the byte and char tokenizers."""
    if isinstance(tokenizer, ByteTokenizer):
        return torch.from_numpy(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) + N_SPECIAL)
    if isinstance(tokenizer, CharTokenizer):
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        alphabet = np.array([ord(c) for c in tokenizer.alphabet], dtype=np.uint32)
        order = np.argsort(alphabet)
        idx = np.clip(np.searchsorted(alphabet[order], codes), 0, len(alphabet) - 1)
        found = alphabet[order][idx] == codes
        if not found.all():
            bad = sorted({chr(c) for c in codes[~found][:1000]})
            raise ValueError(f"characters not in the alphabet: {bad[:10]!r}; build the tokenizer from text "
                             f"that contains them (CharTokenizer.from_text)")
        return torch.from_numpy(order[idx].astype(np.int64) + N_SPECIAL)
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)


@dataclass
class TextData:
    """A tokenized corpus split into training and validation ids.

    train, val: (N,) int64 ids; val_chars: characters of the validation text, so
    `tokens_per_char = len(val) / val_chars` converts a per-token loss into bits per
    character; sha256: of the corpus text (a resumed run checks it is unchanged).
    """

    tokenizer: object
    train: Tensor
    val: Tensor
    val_chars: int
    sha256: str

    @classmethod
    def build(cls, text: str, tokenizer="byte", *, val_fraction: float = 0.02) -> "TextData":
        """Tokenize `text`; the last `val_fraction` of its characters (cut at a
        character boundary) are the validation split."""
        if not isinstance(text, str) or not text:
            raise ValueError("text must be a non-empty str (see load_corpus)")
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
                or not 0 < val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction!r}")
        tok = make_tokenizer(tokenizer, text) if isinstance(tokenizer, (str, Path)) else tokenizer
        cut = len(text) - max(1, int(len(text) * val_fraction))
        train, val = _encode(tok, text[:cut]), _encode(tok, text[cut:])
        return cls(tok, train, val, len(text) - cut, hashlib.sha256(text.encode("utf-8")).hexdigest())

    @property
    def tokens_per_char(self) -> float:
        return len(self.val) / self.val_chars

    def check_context(self, context: int) -> None:
        """Both splits must hold at least one window of context + 1 tokens."""
        for name, ids in (("training", self.train), ("validation", self.val)):
            if len(ids) < context + 1:
                raise ValueError(f"the {name} split has {len(ids)} tokens, fewer than context + 1 = {context + 1}; "
                                 f"use more text or a shorter context")

    def batch(self, step: int, batch_size: int, context: int, *, seed: int, micro: int = 0) -> Tensor:
        """(B, T + 1) windows of the training split at uniformly drawn offsets; a pure
        function of (seed, step, micro), so training resumes on the same batches."""
        self.check_context(context)
        rng = np.random.default_rng([seed, step, micro])
        starts = torch.from_numpy(rng.integers(0, len(self.train) - context, size=batch_size))   # (B,)
        return self.train[starts[:, None] + torch.arange(context + 1)]                          # (B, T+1)

    def val_batches(self, batch_size: int, context: int, *, max_windows: int = 64) -> list[Tensor]:
        """The validation split as consecutive non-overlapping (b, T + 1) windows (at
        most `max_windows`, spread evenly), in batches of at most `batch_size`."""
        self.check_context(context)
        n = (len(self.val) - 1) // context
        picks = np.unique(np.linspace(0, n - 1, min(n, max_windows)).round().astype(np.int64))
        windows = torch.stack([self.val[i * context:i * context + context + 1] for i in picks])   # (W, T+1)
        return list(windows.split(batch_size))


def unigram_entropy_bits(ids: Tensor) -> float:
    """Entropy of the token frequencies of `ids`, in bits per token (a baseline for LM losses)."""
    counts = torch.bincount(ids.flatten()).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())
