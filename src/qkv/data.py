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

Everything is deterministic given a seed: `Task.sample(n, seed=s)` and
`Task.stream(seed=s)` draw from `torch.Generator().manual_seed(s)`; a held-out
set (`Task.held_out`) uses its own seed (`EVAL_SEED` by default, different from
any training seed the helpers here pick), so it is not the training stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from qkv._checks import check_int

__all__ = ["PAD", "BOS", "EOS", "N_SPECIAL", "TASKS", "EVAL_SEED", "Task", "Batch", "make_task", "batch",
           "ByteTokenizer", "CharTokenizer"]

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
