"""Synthetic tasks: reverse / sort / copy_offset (`Task`, `batch`) and associative recall
(`RecallTask`), with the token ids every task and tokenizer shares (PAD, BOS, EOS, QUERY).

The layouts are in the `qkv.data` package docstring. Legend: B batch, Ls source length
(longest in the batch), Lt target length + 1 (BOS or EOS); recall: L sequence length
(longest in the batch), P max_pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from qkv._util.checks import check_int

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
            raise ValueError(f"unknown task {self.name!r}; choose one of {', '.join(map(repr, TASKS))} "
                             f"(associative recall is qkv.data.RecallTask)")
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
# Associative recall: key-value pairs, then a query key; answer its value.

QUERY = 3                     # the "?" marker before the query key (recall task only)


class RecallBatch(NamedTuple):
    """Right-padded recall sequences (see the module docstring for the layout)."""

    ids: Tensor            # (B, L) int64, PAD after each row's length
    lengths: Tensor        # (B,) int64, 2 n + 3
    answer: Tensor         # (B,) int64, the value id to predict at position lengths - 1
    key_pos: Tensor        # (B,) int64, position of the key that matches the query
    value_pos: Tensor      # (B,) int64, key_pos + 1


@dataclass(frozen=True)
class RecallTask:
    """Associative recall: n key-value pairs (min_pairs <= n <= max_pairs), then "?"
    and one of the n keys; the answer is its value. Keys and values come from
    separate token ranges (n_keys and n_values of them)."""

    n_keys: int = 32
    n_values: int = 32
    min_pairs: int = 8
    max_pairs: int = 16

    def __post_init__(self):
        _check_int("n_keys", self.n_keys, 1)
        _check_int("n_values", self.n_values, 2)
        _check_int("min_pairs", self.min_pairs, 1)
        _check_int("max_pairs", self.max_pairs, 1)
        if self.min_pairs > self.max_pairs:
            raise ValueError(f"min_pairs={self.min_pairs} must be <= max_pairs={self.max_pairs}")
        if self.max_pairs > self.n_keys:
            raise ValueError(f"max_pairs={self.max_pairs} exceeds n_keys={self.n_keys}: the keys of a sequence "
                             f"are distinct, so raise n_keys or lower max_pairs")

    @property
    def first_key(self) -> int:
        return QUERY + 1

    @property
    def first_value(self) -> int:
        return QUERY + 1 + self.n_keys

    @property
    def vocab_size(self) -> int:
        """PAD, BOS, EOS (unused), QUERY, then the keys and the values."""
        return self.first_value + self.n_values

    @property
    def max_len(self) -> int:
        """Tokens of the longest sequence: 2 max_pairs + 3."""
        return 2 * self.max_pairs + 3

    def label(self, token: int) -> str:
        """A short name for one id: "k7", "v3", "?", "BOS", "PAD", "EOS"."""
        token = int(token)
        if self.first_key <= token < self.first_value:
            return f"k{token - self.first_key}"
        if self.first_value <= token < self.vocab_size:
            return f"v{token - self.first_value}"
        names = {PAD: "PAD", BOS: "BOS", EOS: "EOS", QUERY: "?"}
        if token not in names:
            raise ValueError(f"token {token} is outside this task's vocabulary [0, {self.vocab_size})")
        return names[token]

    def labels(self, ids) -> list[str]:
        """`label` of every id of one sequence (a 1-D tensor or list)."""
        return [self.label(t) for t in _check_ids(ids)]

    def answer_of(self, ids) -> int:
        """The answer of one unpadded sequence, by reading it (a check on the layout)."""
        ids = _check_ids(ids)
        n = (len(ids) - 3) // 2
        if len(ids) != 2 * n + 3 or n < 1 or ids[0] != BOS or ids[-2] != QUERY:
            raise ValueError("not a recall sequence: expected BOS k v .. k v ? k")
        pairs = dict(zip(ids[1:2 * n + 1:2], ids[2:2 * n + 2:2]))
        if len(pairs) != n or ids[-1] not in pairs:
            raise ValueError("not a recall sequence: keys repeat, or the query key is not among them")
        return pairs[ids[-1]]

    def batch(self, n: int, *, seed: int | None = None, generator: torch.Generator | None = None,
              device=None) -> RecallBatch:
        """n random sequences, right-padded to the longest."""
        _check_int("n", n, 1)
        g = _generator(seed, generator)
        pairs = torch.randint(self.min_pairs, self.max_pairs + 1, (n,), generator=g)              # (B,)
        keys = torch.rand(n, self.n_keys, generator=g).argsort(dim=1)[:, :self.max_pairs]         # (B, P) distinct
        values = torch.randint(0, self.n_values, (n, self.max_pairs), generator=g)                # (B, P)
        which = (torch.rand(n, generator=g) * pairs).long()                                       # (B,) in [0, n)
        lengths = 2 * pairs + 3                                                                   # (B,)
        ids = torch.full((n, self.max_len), PAD, dtype=torch.long)                                # (B, 2P+3)
        rows = torch.arange(n)
        ids[:, 0] = BOS
        ids[:, 1:2 * self.max_pairs + 1:2] = keys + self.first_key
        ids[:, 2:2 * self.max_pairs + 2:2] = values + self.first_value
        ids[torch.arange(self.max_len)[None, :] >= 2 * pairs[:, None] + 1] = PAD                  # past the pairs
        ids = ids[:, :int(lengths.max())].contiguous()                                            # (B, L)
        query_key = keys[rows, which] + self.first_key                                            # (B,)
        ids[rows, lengths - 2] = QUERY
        ids[rows, lengths - 1] = query_key
        answer = values[rows, which] + self.first_value                                           # (B,)
        key_pos = 1 + 2 * which                                                                   # (B,)
        out = RecallBatch(ids, lengths, answer, key_pos, key_pos + 1)
        return out if device is None else RecallBatch(*(x.to(device) for x in out))

    def stream(self, batch_size: int, *, seed: int = 0, device=None) -> Callable[[int], RecallBatch]:
        """`next_batch(step) -> RecallBatch` for `qkv.train.fit`: a fresh batch per call from
        one generator seeded with `seed` (the step argument is accepted and ignored)."""
        _check_int("batch_size", batch_size, 1)
        if seed == EVAL_SEED:
            raise ValueError(f"seed {EVAL_SEED} is the held-out seed (EVAL_SEED); train with another one")
        g = torch.Generator().manual_seed(_check_int("seed", seed, 0))
        return lambda step=0: self.batch(batch_size, generator=g, device=device)

    def held_out(self, n: int, *, seed: int = EVAL_SEED, device=None) -> RecallBatch:
        """An evaluation batch of n sequences drawn with its own seed (never a training stream's)."""
        return self.batch(n, seed=seed, device=device)


# ids as a list of ints: RecallTask.labels / answer_of and the tokenizers' decode (qkv.data.text)
def _check_ids(ids) -> list[int]:
    if isinstance(ids, Tensor):
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(f"ids must be a list or 1-D tensor of ints, got {type(ids).__name__}")
    ids = list(ids)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TypeError("ids must hold ints")
    return ids
