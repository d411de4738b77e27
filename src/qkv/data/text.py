"""Text for language models: tokenizers (`ByteTokenizer`, `CharTokenizer`, `FileTokenizer`,
`train_bpe`, `make_tokenizer`), corpora (`load_corpus`, `default_corpus`) and `TextData`
(a tokenized corpus split into training and validation ids).

The ids and the batch layout are in the `qkv.data` package docstring.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from qkv._util.checks import check_int
from qkv.data.tasks import BOS, EOS, N_SPECIAL, PAD, _check_ids, _check_int


# -----------------------------------------------------------------------------
# Tokenizers: text <-> ids with the same three specials in front.


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

    def to_json(self) -> str:
        """This tokenizer as a `tokenizers` tokenizer.json (same ids both ways): a
        byte-level BPE with no merges whose 256 byte symbols are ids 3..258."""
        from tokenizers import decoders, models, pre_tokenizers

        symbols = pre_tokenizers.ByteLevel.alphabet()                  # the 256 printable byte stand-ins
        by_byte = _byte_symbols()
        if sorted(symbols) != sorted(by_byte.values()):
            raise RuntimeError("the tokenizers library's byte alphabet changed; cannot export the byte tokenizer")
        vocab = {**_SPECIAL_NAMES, **{by_byte[b]: b + N_SPECIAL for b in range(256)}}
        return _export(models.BPE(vocab=vocab, merges=[]),
                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False), decoders.ByteLevel())


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

    def to_json(self) -> str:
        """This tokenizer as a `tokenizers` tokenizer.json (same ids both ways): one
        word per character; a character outside the alphabet fails to encode."""
        from tokenizers import Regex, decoders, models, pre_tokenizers

        vocab = {**_SPECIAL_NAMES, **self._ids}
        return _export(models.WordLevel(vocab=vocab, unk_token="<|qkv:unknown|>"),
                       pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated"), decoders.Fuse())

    def __repr__(self) -> str:
        return f"CharTokenizer({self.alphabet!r})"


# The specials' names in an exported tokenizer.json: unlikely in text, since a
# `tokenizers` tokenizer matches added tokens' names in its input.
_SPECIAL_NAMES = {"<|qkv:pad|>": PAD, "<|qkv:bos|>": BOS, "<|qkv:eos|>": EOS}


def _byte_symbols() -> dict[int, str]:
    """GPT-2's byte -> printable character map (bytes that print stand for
    themselves; the others take the characters from U+0100 on, in byte order)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


def _export(model, pre_tokenizer, decoder) -> str:
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer(model)
    tok.pre_tokenizer, tok.decoder = pre_tokenizer, decoder
    tok.add_special_tokens([AddedToken(name, special=True) for name in _SPECIAL_NAMES])  # ids 0..2, in the vocab
    return tok.to_str(pretty=True)


class FileTokenizer:
    """A `tokenizers` tokenizer.json (e.g. a trained BPE) behind the same encode/decode/vocab_size."""

    def __init__(self, path):
        from tokenizers import Tokenizer

        file = Path(path)
        if not file.exists():
            raise FileNotFoundError(f"tokenizer file {file} does not exist; pass 'byte', 'char' or a tokenizer.json")
        if not file.is_file():
            raise ValueError(f"tokenizer file {file} is {'a directory' if file.is_dir() else 'not a regular file'}; "
                             f"pass a tokenizer.json")
        try:
            self.tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:  # the library raises its own exception type for a bad file
            raise ValueError(f"{file} is not a tokenizers tokenizer.json: {exc}") from None
        self.path, self.name = file, str(file)
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if bos or eos:
            raise ValueError("a tokenizer.json adds its own special tokens; bos/eos are not supported here")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(_check_ids(ids))

    @classmethod
    def from_tokenizer(cls, tokenizer, name: str = "tokenizer") -> "FileTokenizer":
        """Wrap a `tokenizers.Tokenizer` object (e.g. from `train_bpe`); `path` is None."""
        self = cls.__new__(cls)
        self.tokenizer, self.path, self.name = tokenizer, None, name
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        return self

    def to_json(self) -> str:
        """The tokenizer.json text (the file's own bytes when it came from a file)."""
        if self.path is not None:
            return Path(self.path).read_text(encoding="utf-8")
        return self.tokenizer.to_str(pretty=True)


BPE_VOCAB = 2048          # "bpe": the vocabulary of the byte-level BPE trained on the training text


def train_bpe(text: str, vocab_size: int = BPE_VOCAB) -> FileTokenizer:
    """A byte-level BPE (GPT-2's byte alphabet and word splitting) trained on `text`
    with the `tokenizers` library: ids 0..2 are PAD/BOS/EOS, then the 256 bytes, then
    merges up to `vocab_size`. Every string encodes (no unknown tokens) and decodes
    back exactly. Deterministic for the same text and library version."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    check_int("vocab_size", vocab_size, 256 + N_SPECIAL + 1)
    if not isinstance(text, str) or not text:
        raise ValueError("train_bpe needs a non-empty str of training text")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(_SPECIAL_NAMES),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    step = 1 << 20                     # the trainer reads pieces; a word cut at a piece boundary hardly matters
    tok.train_from_iterator((text[i:i + step] for i in range(0, len(text), step)), trainer, length=len(text) // step + 1)
    return FileTokenizer.from_tokenizer(tok, f"bpe:{vocab_size}")


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


_TOKENIZER_HELP = "'byte', 'char', 'bpe' (or 'bpe:VOCAB', e.g. 'bpe:4096') or a path to a tokenizer.json"


def bpe_vocab(spec) -> int | None:
    """The vocabulary size of a "bpe" / "bpe:N" spec; None for any other spec."""
    if not isinstance(spec, str) or not (spec == "bpe" or spec.startswith("bpe:")):
        return None
    if spec == "bpe":
        return BPE_VOCAB
    try:
        n = int(spec[4:])
    except ValueError:
        raise ValueError(f"tokenizer {spec!r}: the BPE vocabulary must be an integer, e.g. 'bpe:2048'") from None
    if n <= 256 + N_SPECIAL:
        raise ValueError(f"tokenizer {spec!r}: the BPE vocabulary must exceed {256 + N_SPECIAL} (bytes and specials)")
    return n


def make_tokenizer(spec: str, text: str | None = None):
    """"byte" (`ByteTokenizer`), "char" (`CharTokenizer.from_text(text)`), "bpe" /
    "bpe:N" (`train_bpe(text, N)`) or a path to a tokenizer.json (`FileTokenizer`)."""
    if not isinstance(spec, (str, Path)):
        raise TypeError(f"tokenizer must be {_TOKENIZER_HELP}, got {type(spec).__name__}")
    if spec == "byte":
        return ByteTokenizer()
    if spec == "char" or bpe_vocab(spec) is not None:
        if text is None:
            raise ValueError(f"the {spec!r} tokenizer is built from the corpus: pass its text")
        return CharTokenizer.from_text(text) if spec == "char" else train_bpe(text, bpe_vocab(spec))
    if not str(spec).endswith(".json"):
        raise ValueError(f"tokenizer must be {_TOKENIZER_HELP}, got {spec!r}")
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
    if isinstance(tokenizer, FileTokenizer) and len(text) > _PIECE:
        # pieces ending at line ends, encoded in parallel: the concatenated ids decode to the same text
        pieces, i = [], 0
        while i < len(text):
            j = text.find("\n", i + _PIECE)
            j = len(text) if j < 0 else j + 1
            pieces.append(text[i:j])
            i = j
        out = tokenizer.tokenizer.encode_batch(pieces, add_special_tokens=False)
        return torch.tensor([t for e in out for t in e.ids], dtype=torch.long)
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)


_PIECE = 1 << 16          # characters per piece when a long text is encoded by a tokenizer.json


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
        cut = len(text) - max(1, int(len(text) * val_fraction))
        # a BPE learns its merges from the training split only (the validation text stays unseen)
        source = text[:cut] if bpe_vocab(tokenizer) is not None else text
        tok = make_tokenizer(tokenizer, source) if isinstance(tokenizer, (str, Path)) else tokenizer
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
        _check_int("batch_size", batch_size, 1)
        _check_int("context", context, 1)
        self.check_context(context)
        rng = np.random.default_rng([seed, step, micro])
        starts = torch.from_numpy(rng.integers(0, len(self.train) - context, size=batch_size))   # (B,)
        return self.train[starts[:, None] + torch.arange(context + 1)]                          # (B, T+1)

    def val_batches(self, batch_size: int, context: int, *, max_windows: int = 64) -> list[Tensor]:
        """The validation split as consecutive non-overlapping (b, T + 1) windows (at
        most `max_windows`, spread evenly), in batches of at most `batch_size`."""
        _check_int("batch_size", batch_size, 1)
        _check_int("context", context, 1)
        _check_int("max_windows", max_windows, 1)
        self.check_context(context)
        n = (len(self.val) - 1) // context
        picks = np.unique(np.linspace(0, n - 1, min(n, max_windows)).round().astype(np.int64))
        windows = torch.stack([self.val[i * context:i * context + context + 1] for i in picks])   # (W, T+1)
        return list(windows.split(batch_size))


def unigram_entropy_bits(ids: Tensor) -> float:
    """Entropy of the token frequencies of `ids`, in bits per token (a baseline for LM losses)."""
    if (not isinstance(ids, Tensor) or ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex()
            or ids.numel() == 0 or int(ids.min()) < 0):
        desc = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"ids must be a non-empty integer tensor of token ids >= 0, got {desc}; e.g. data.train")
    counts = torch.bincount(ids.flatten()).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())
