"""Synthetic sequence-to-sequence tasks that need attention, and tiny tokenizers.

Legend: B batch, Ls source length (longest in the batch), Lt target length + 1 (BOS or EOS);
recall: L sequence length (longest in the batch), P max_pairs.

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

Associative recall (`RecallTask`, decoder-style: one sequence in, one answer out)::

    PAD = 0, BOS = 1 as above, QUERY = 3 (the "?" marker)
    keys     4 .. 4 + n_keys - 1                      labels "k0" .. "k{n_keys-1}"
    values   4 + n_keys .. 4 + n_keys + n_values - 1  labels "v0" .. "v{n_values-1}"
    vocab_size = 4 + n_keys + n_values

    position  0    1    2    3    4   ..  2n-1  2n   2n+1  2n+2
    token     BOS  k_1  v_1  k_2  v_2 ..  k_n   v_n  ?     k_q       (n pairs, length 2n + 3)
    answer    the value beside k_q (q = 1..n), predicted at the last position 2n + 2

The n keys of a sequence are distinct, values are drawn with replacement, q is
uniform. A `RecallBatch` pads rows on the right (PAD), which a causal model
never sees from the earlier positions: ids (B, L), lengths (B,), answer (B,),
and the positions of the matching key and value (B,) for measuring attention.

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

The package, by concept: `qkv.data.tasks` (the synthetic tasks, recall and the special ids)
and `qkv.data.text` (tokenizers, corpora, `TextData`); every name is re-exported here.
"""

from __future__ import annotations

from qkv.data.tasks import (BOS, EOS, EVAL_SEED, N_SPECIAL, PAD, QUERY, TASKS, Batch, RecallBatch, RecallTask, Task,
                            batch, make_task)
from qkv.data.text import (BPE_VOCAB, DEFAULT_CORPUS_BYTES, ByteTokenizer, CharTokenizer, FileTokenizer, TextData,
                           bpe_vocab, default_corpus, load_corpus, make_tokenizer, train_bpe, unigram_entropy_bits)

__all__ = ["PAD", "BOS", "EOS", "N_SPECIAL", "TASKS", "EVAL_SEED", "Task", "Batch", "make_task", "batch",
           "ByteTokenizer", "CharTokenizer", "FileTokenizer", "DEFAULT_CORPUS_BYTES", "load_corpus",
           "default_corpus", "make_tokenizer", "train_bpe", "bpe_vocab", "BPE_VOCAB", "TextData", "unigram_entropy_bits",
           "QUERY", "RecallBatch", "RecallTask"]

