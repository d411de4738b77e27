"""Tests for qkv.data: synthetic tasks, padded batches, seeds, tokenizers.

Legend: B batch, Ls source length, Lt target length + 1.

Targets are checked against plain-Python definitions written out here.
"""

from __future__ import annotations

import pytest
import torch

from qkv import data
from qkv.data import BOS, EOS, EVAL_SEED, PAD, Batch, ByteTokenizer, CharTokenizer, Task, make_task


def py_target(name: str, src: list[int], offset: int) -> list[int]:
    if name == "reverse":
        return src[::-1]
    if name == "sort":
        return sorted(src)
    n = len(src)
    return [src[(i + offset) % n] for i in range(n)]


def test_special_ids_and_vocab():
    assert (PAD, BOS, EOS) == (0, 1, 2) and data.N_SPECIAL == 3
    t = make_task("reverse", vocab=20)
    assert t.vocab_size == 23
    src, _ = t.sample(500, seed=0)
    toks = torch.cat(src)
    assert int(toks.min()) == 3 and int(toks.max()) == 22          # the whole content range, nothing else


@pytest.mark.parametrize("name", data.TASKS)
@pytest.mark.parametrize("offset", [0, 3, 7])
def test_targets_match_definitions(name, offset):
    t = make_task(name, vocab=6, min_len=1, max_len=9, offset=offset)
    src, tgt = t.sample(300, seed=1)
    for s, y in zip(src, tgt):
        assert s.dtype == y.dtype == torch.int64 and s.dim() == y.dim() == 1
        assert y.tolist() == py_target(name, s.tolist(), offset)


def test_copy_offset_worked_example():
    t = make_task("copy_offset", offset=2)
    s = torch.tensor([3, 7, 5, 4])
    assert t.target(s).tolist() == [5, 4, 3, 7]
    assert make_task("copy_offset", offset=6).target(s).tolist() == [5, 4, 3, 7]    # offset wraps mod n
    assert make_task("copy_offset", offset=0).target(s).tolist() == [3, 7, 5, 4]
    assert make_task("sort").target(torch.tensor([5, 3, 5, 4])).tolist() == [3, 4, 5, 5]
    assert make_task("reverse").target(s).tolist() == [4, 5, 7, 3]


def test_lengths_cover_the_range():
    t = make_task("reverse", min_len=8, max_len=16)
    src, tgt = t.sample(1000, seed=2)
    lengths = [len(s) for s in src]
    assert set(lengths) == set(range(8, 17))
    assert [len(y) for y in tgt] == lengths


def test_batch_layout():
    src = [torch.tensor([3, 4, 5]), torch.tensor([6]), torch.tensor([7, 8])]
    tgt = [torch.tensor([5, 4, 3]), torch.tensor([6]), torch.tensor([8, 7])]
    b = data.batch(src, tgt)
    assert isinstance(b, Batch)
    assert b.src.tolist() == [[3, 4, 5], [6, 0, 0], [7, 8, 0]]
    assert b.src_lengths.tolist() == [3, 1, 2]
    assert b.tgt_in.tolist() == [[1, 5, 4, 3], [1, 6, 0, 0], [1, 8, 7, 0]]
    assert b.tgt_out.tolist() == [[5, 4, 3, 2], [6, 2, 0, 0], [8, 7, 2, 0]]
    assert b.n_target_tokens == 4 + 2 + 3
    assert all(x.dtype == torch.int64 for x in b)


def test_task_batch_invariants():
    t = make_task("sort", vocab=9, min_len=2, max_len=7)
    b = t.batch(64, seed=3)
    B, Ls = b.src.shape
    assert B == 64 and Ls == int(b.src_lengths.max()) and b.tgt_in.shape == b.tgt_out.shape
    for i in range(B):
        n = int(b.src_lengths[i])
        assert (b.src[i, :n] >= 3).all() and (b.src[i, n:] == PAD).all()
        assert b.tgt_in[i, 0] == BOS and b.tgt_out[i, n] == EOS
        assert (b.tgt_in[i, 1:n + 1] == b.tgt_out[i, :n]).all()                 # shifted by one
        assert (b.tgt_in[i, n + 1:] == PAD).all() and (b.tgt_out[i, n + 1:] == PAD).all()
        assert b.tgt_out[i, :n].tolist() == sorted(b.src[i, :n].tolist())


def test_seeds_are_deterministic_and_distinct():
    t = make_task("reverse")
    a, b = t.sample(50, seed=5), t.sample(50, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    g = torch.Generator().manual_seed(5)
    c = t.sample(50, generator=g)
    assert all(torch.equal(x, y) for x, y in zip(a[0], c[0]))
    d = t.sample(50, seed=6)
    assert sum(torch.equal(x, y) for x, y in zip(a[0], d[0])) == 0


def test_held_out_set_is_not_the_training_stream():
    t = make_task("reverse")
    stream = t.stream(256, seed=0)
    batches = [stream(i) for i in range(4)]
    train = {tuple(row[:n].tolist()) for b in batches for row, n in zip(b.src, b.src_lengths)}
    stream = t.stream(256, seed=0)
    first = stream(0)
    assert torch.equal(first.src, t.batch(256, seed=0).src)                      # stream(seed) == sample(seed)
    assert not torch.equal(stream(1).src, first.src)                             # a fresh batch per call
    held = t.held_out(500)
    assert all(torch.equal(x, y) for x, y in zip(held[0], t.sample(500, seed=EVAL_SEED)[0]))
    assert len({tuple(s.tolist()) for s in held[0]} & train) == 0
    with pytest.raises(ValueError, match="held-out seed"):
        t.stream(8, seed=EVAL_SEED)
    s1, s2 = t.stream(8, seed=1), t.stream(8, seed=1)
    assert all(torch.equal(s1(i).src, s2(i).src) for i in range(3))              # reproducible from its seed


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"name": "copy"}, ValueError, "unknown task"),
    ({"name": "reverse", "min_len": 5, "max_len": 4}, ValueError, "min_len"),
    ({"name": "reverse", "vocab": 0}, ValueError, "vocab"),
    ({"name": "reverse", "min_len": 0}, ValueError, "min_len"),
    ({"name": "copy_offset", "offset": -1}, ValueError, "offset"),
    ({"name": "reverse", "vocab": 2.0}, TypeError, "vocab"),
])
def test_task_rejects_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Task(**kwargs)


def test_sample_and_batch_reject_bad_inputs():
    t = make_task("reverse")
    with pytest.raises(ValueError, match="exactly one"):
        t.sample(2)
    with pytest.raises(ValueError, match="exactly one"):
        t.sample(2, seed=0, generator=torch.Generator())
    with pytest.raises(ValueError, match="zero sequences"):
        data.batch([], [])
    with pytest.raises(ValueError, match="as many"):
        data.batch([torch.tensor([3])], [])
    with pytest.raises(TypeError, match="integer"):
        data.batch([torch.tensor([3.0])], [torch.tensor([3])])
    with pytest.raises(ValueError, match="special"):
        data.batch([torch.tensor([1, 3])], [torch.tensor([3])])
    with pytest.raises(ValueError, match="empty"):
        data.batch([torch.tensor([], dtype=torch.long)], [torch.tensor([3])])
    assert t.sample(0, seed=0) == ([], [])


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "héllo, wörld ✓"
    ids = tok.encode(text)
    assert tok.vocab_size == 259 and min(ids) >= 3 and max(ids) < 259
    assert ids[:2] == [ord("h") + 3, 0xC3 + 3]                                   # UTF-8 bytes + 3
    assert tok.decode(ids) == text
    wrapped = tok.encode(text, bos=True, eos=True)
    assert wrapped[0] == BOS and wrapped[-1] == EOS and tok.decode(wrapped + [PAD]) == text
    assert tok.decode(torch.tensor(ids)) == text
    assert tok.decode([0xC3 + 3]) == "\ufffd"                                    # a cut UTF-8 sequence
    with pytest.raises(ValueError, match="outside"):
        tok.decode([259])
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")


def test_char_tokenizer_round_trip():
    tok = CharTokenizer.from_text("abracadabra")
    assert tok.alphabet == "abcdr" and tok.vocab_size == 8
    assert tok.encode("cab") == [5, 3, 4]
    assert tok.encode("bad", bos=True, eos=True) == [BOS, 4, 3, 6, EOS]
    assert tok.decode([BOS, 5, 3, 4, EOS, PAD]) == "cab"
    with pytest.raises(ValueError, match="not in the alphabet"):
        tok.encode("abz")
    with pytest.raises(ValueError, match="repeated"):
        CharTokenizer("aa")
    with pytest.raises(ValueError, match="empty"):
        CharTokenizer("")
    with pytest.raises(ValueError, match="outside"):
        tok.decode([8])
