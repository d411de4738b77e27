"""Tests for decoder language-model training on text: qkv.data corpora, qkv.train.train_lm, `qkv train`.

Legend: B batch, T context.

Models are tiny (one or two layers, width 32) and runs a few dozen steps, so each test takes seconds.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from qkv import cli, data, train
from qkv.models import hf

TINY = {"d_model": 32, "n_layers": 1, "n_heads": 2, "arch": "gpt2"}


def make_text(n_sentences: int = 400, seed: int = 0) -> str:
    """Sentences from a small grammar: far more predictable than its letter frequencies say."""
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "my friend", "the old man", "her sister"]
    verbs = ["sees", "likes", "finds", "draws", "follows"]
    objects = ["the red ball", "a small house", "the river", "an apple", "the garden"]
    return "".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}.\n"
                   for _ in range(n_sentences))


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and threads that wait on each other on a busy
    machine cost far more than they give."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def text_file(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text(make_text())
    return f


def run(text_file, out, **kw):
    args = dict(out=out, tokenizer="char", config=TINY, steps=12, batch_size=4, context=24, lr=3e-3, warmup=2,
                plot=False)
    return train.train_lm(text_file, **{**args, **kw})


# -- corpora ---------------------------------------------------------------------


def test_load_corpus_file_and_folder_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first\n")
    (tmp_path / ".hidden").write_text("never")
    assert data.load_corpus(tmp_path) == "first\nsecond\n"
    assert data.load_corpus(tmp_path / "a.txt") == "first\n"


def test_default_corpus_is_the_stdlib_capped_and_deterministic():
    a = data.load_corpus(None, max_bytes=300_000)
    assert 100_000 < len(a.encode()) <= 300_000
    assert "def " in a and "import " in a
    assert a == data.load_corpus(None, max_bytes=300_000)
    assert data.DEFAULT_CORPUS_BYTES == 8 * 2**20


@pytest.mark.parametrize("make, exc, message", [
    (lambda p: p / "missing.txt", FileNotFoundError, "does not exist"),
    (lambda p: (p / "e.txt").write_text(" \n") and p / "e.txt", ValueError, "holds no text"),
    (lambda p: (p / "d").mkdir() or p / "d", ValueError, "holds no files"),
    (lambda p: (p / "x.bin").write_bytes(b"ab\0cd") and p, ValueError, "binary file"),
    (lambda p: (p / "l1.txt").write_bytes("caf\xe9".encode("latin-1")) and p / "l1.txt", ValueError, "not UTF-8"),
])
def test_bad_data_paths_are_refused_clearly(tmp_path, make, exc, message):
    with pytest.raises(exc, match=message):
        data.load_corpus(make(tmp_path))


def test_text_batches_are_a_pure_function_of_seed_and_step():
    ds = data.TextData.build(make_text(), "char", val_fraction=0.05)
    x = ds.batch(7, 4, 16, seed=3, micro=1)                                   # (B, T+1)
    assert x.shape == (4, 17) and x.dtype == torch.int64
    assert torch.equal(x, ds.batch(7, 4, 16, seed=3, micro=1))
    assert not torch.equal(x, ds.batch(8, 4, 16, seed=3, micro=1))
    assert not torch.equal(x, ds.batch(7, 4, 16, seed=3, micro=0))
    # every row is a contiguous slice of the training ids
    text = ds.tokenizer.decode(ds.train.tolist())
    for row in x:
        assert ds.tokenizer.decode(row.tolist()) in text
    assert ds.tokens_per_char == 1.0                                          # char tokenizer
    b = data.TextData.build("héllo wörld " * 50, "byte")
    assert b.tokens_per_char > 1.0                                            # two bytes for é, ö


def test_file_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(["the", "cat", "a", "dog", "."])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    ds = data.TextData.build("the cat . a dog . " * 40, str(tmp_path / "tokenizer.json"))
    assert ds.tokenizer.vocab_size == 6 and set(ds.train.tolist()) <= set(range(6))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.make_tokenizer(str(tmp_path / "none.json"))
    with pytest.raises(ValueError, match="'byte', 'char', 'bpe'"):
        data.make_tokenizer("words")


def test_bpe_is_trained_on_the_training_split_and_round_trips():
    text = make_text(600)
    ds = data.TextData.build(text, "bpe:300", val_fraction=0.1)
    tok = ds.tokenizer
    assert tok.vocab_size == 300 and ds.tokens_per_char < 0.6                 # merges: fewer tokens than chars
    cut = len(text) - int(len(text) * 0.1)
    assert tok.decode(ds.val.tolist()) == text[cut:] and tok.decode(ds.train.tolist()) == text[:cut]
    assert tok.encode("\u2603 unseen \t") and tok.decode(tok.encode("\u2603 unseen \t")) == "\u2603 unseen \t"
    assert tok.tokenizer.token_to_id("<|qkv:pad|>") == data.PAD and tok.tokenizer.token_to_id("<|qkv:eos|>") == data.EOS
    again = data.train_bpe(text[:cut], 300)
    assert again.to_json() == tok.to_json()                                  # deterministic
    # merges learnt from the training split only: the validation text's frequent 'qq' is never merged
    tail = "qqqqqqqq " * 100
    held = data.TextData.build(text + tail, "bpe:300", val_fraction=len(tail) / len(text + tail) * 0.999)
    assert not any("qq" in t for t in held.tokenizer.tokenizer.get_vocab())
    assert any("qq" in t for t in data.train_bpe(text + tail, 300).tokenizer.get_vocab())
    for spec, message in (("bpe:100", "must exceed 259"), ("bpe:x", "must be an integer")):
        with pytest.raises(ValueError, match=message):
            data.make_tokenizer(spec, text)


# -- training ---------------------------------------------------------------------


def test_loss_falls_well_below_the_unigram_entropy(text_file, tmp_path):
    r = run(text_file, tmp_path / "run", steps=80, batch_size=8, context=32, lr=1e-2, eval_every=40, plot=True)
    h0 = data.unigram_entropy_bits(r.data.train)                              # bits per char
    assert r.val_bpc == pytest.approx(r.val_loss / math.log(2))               # char: tokens per char = 1
    assert r.val_bpc < 0.6 * h0, (r.val_bpc, h0)
    assert r.history.loss[0] > r.history.loss[-1] + 1.0
    assert [v[0] for v in r.history.val] == [40, 80]
    png = (tmp_path / "run" / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_resume_reproduces_the_uninterrupted_losses_exactly(text_file, tmp_path):
    kw = dict(steps=10, accum_steps=2, ckpt_every=3)
    full = run(text_file, tmp_path / "full", **kw)
    part = run(text_file, tmp_path / "part", stop_after=5, **kw)
    assert part.checkpoint.name == "step-000005" and len(part.history.loss) == 5
    rest = run(text_file, tmp_path / "part", resume=True, **kw)
    assert rest.resumed_from.name == "step-000005"
    assert rest.history.loss == full.history.loss                             # bitwise, step for step
    assert rest.history.lr == full.history.lr
    for (name, a), (_, b) in zip(full.model.state_dict().items(), rest.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_resume_with_bpe_reuses_the_checkpoint_tokenizer(text_file, tmp_path):
    kw = dict(steps=6, ckpt_every=3, tokenizer="bpe:280")
    full = run(text_file, tmp_path / "full", **kw)
    run(text_file, tmp_path / "part", stop_after=3, **kw)
    rest = run(text_file, tmp_path / "part", resume=True, **kw)
    assert rest.history.loss == full.history.loss
    assert rest.data.tokenizer.path is not None and rest.data.tokenizer.path.parent.name == "step-000003"


def test_resume_refuses_changed_arguments_and_existing_runs(text_file, tmp_path):
    run(text_file, tmp_path / "r", steps=4)
    with pytest.raises(ValueError, match="already holds checkpoints; pass --resume"):
        run(text_file, tmp_path / "r", steps=4)
    with pytest.raises(ValueError, match="lr: checkpoint 0.003, now 0.001"):
        run(text_file, tmp_path / "r", steps=4, lr=1e-3, resume=True)
    with pytest.raises(ValueError, match="nothing to resume"):
        run(text_file, tmp_path / "empty", resume=True)


def test_bf16_autocast_trains(text_file, tmp_path):
    r = run(text_file, tmp_path / "bf", steps=6, bf16=True)
    assert all(math.isfinite(v) for v in r.history.loss)
    assert next(r.model.parameters()).dtype == torch.float32


def test_checkpoint_loads_as_a_model_and_generates(text_file, tmp_path, capsys):
    r = run(text_file, tmp_path / "g", steps=4)
    m = hf.load(r.checkpoint)
    for (name, a), (_, b) in zip(r.model.state_dict().items(), m.state_dict().items()):
        assert torch.equal(a, b), name
    capsys.readouterr()
    code = cli.main(["generate", "--checkpoint", str(r.checkpoint), "--ids", "--prompt", "5 6 7",
                     "--max-new-tokens", "4"])
    out = capsys.readouterr().out.split()
    assert code == 0 and len(out) == 4 and all(0 <= int(t) < r.data.tokenizer.vocab_size for t in out)


@pytest.mark.parametrize("tokenizer", ["byte", "char"])
def test_checkpoint_tokenizer_json_gives_text_generation(text_file, tmp_path, capsys, tokenizer):
    from tokenizers import Tokenizer

    r = run(text_file, tmp_path / tokenizer, steps=2, tokenizer=tokenizer)
    exported = Tokenizer.from_file(str(r.checkpoint / "tokenizer.json"))
    sample = r.data.tokenizer.decode(r.data.train[:200].tolist())
    assert exported.encode(sample, add_special_tokens=False).ids == r.data.tokenizer.encode(sample)
    assert exported.decode(r.data.tokenizer.encode(sample, bos=True, eos=True)) == sample
    assert exported.get_vocab_size(with_added_tokens=True) == r.data.tokenizer.vocab_size
    capsys.readouterr()
    code = cli.main(["generate", "--checkpoint", str(r.checkpoint), "--prompt", sample[:5], "--max-new-tokens", "6"])
    assert code == 0 and capsys.readouterr().out.startswith(sample[:5])
    if tokenizer == "char":                          # a character the corpus never had: a clear refusal
        code = cli.main(["generate", "--checkpoint", str(r.checkpoint), "--prompt", "\u2603", "--max-new-tokens", "1"])
        assert code == 2 and "cannot be encoded" in capsys.readouterr().err


# -- configs ---------------------------------------------------------------------


def test_presets_and_config_files(tmp_path):
    c = train.decoder_config("small", vocab_size=259, context=256)
    assert (c.n_layers, c.d_model, c.n_heads, c.max_positions, c.vocab_size) == (6, 384, 6, 256, 259)
    f = tmp_path / "c.json"
    f.write_text(json.dumps(TINY))
    assert train.decoder_config(None, vocab_size=40, context=16, config=f).d_model == 32


@pytest.mark.parametrize("config, message", [
    ({"d_model": 30, "n_layers": 1, "n_heads": 4}, "not divisible by n_heads=4"),
    ({"d_model": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 3}, "n_kv_heads=3 must divide n_heads=4"),
    ({**TINY, "vocab_size": 10}, "smaller than the tokenizer's 259"),
    ({**TINY, "max_positions": 8}, "shorter than the context 16"),
    ({**TINY, "depth": 3}, "unknown DecoderConfig field"),
    ({**TINY, "norm": "rms"}, "no Hugging Face equivalent"),
])
def test_inconsistent_configs_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        train.decoder_config(None, vocab_size=259, context=16, config=config)


def test_too_large_config_refused_before_allocating(text_file, tmp_path):
    c = train.decoder_config("base", vocab_size=259, context=1024)
    est = train.estimate_memory(c, 64, 1024)
    assert 80e6 < est["params"] < 90e6 and est["total"] > est["states"] == 16 * est["params"]
    with pytest.raises(ValueError, match=r"needs about .* GiB .* only 1\.0 GiB is available"):
        run(text_file, tmp_path / "big", preset="base", config=None, memory_limit=2**30, context=64)
    assert not (tmp_path / "big").exists()


# -- CLI -------------------------------------------------------------------------


def test_cli_train_prints_progress_and_bpc(text_file, tmp_path, capsys):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "cli"
    code = cli.main(["train", str(text_file), "--tokenizer", "char", "--config", str(cfg), "--steps", "6",
                     "--batch-size", "4", "--context", "16", "--out", str(out), "--ckpt-every", "3"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "step 6/6" in captured.err and "tok/s" in captured.err and "ETA" in captured.err
    assert "bits per character" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["loss.png", "step-000003", "step-000006"]


@pytest.mark.parametrize("argv, message", [
    (["train", "/no/such/file.txt"], "does not exist"),
    (["train", "--preset", "huge"], "preset must be one of"),
    (["train", "--steps", "0"], "steps must be >= 1"),
    (["train", "--tokenizer", "words"], "'byte', 'char', 'bpe'"),
])
def test_cli_train_bad_inputs_are_one_line_errors(capsys, tmp_path, argv, message):
    code = cli.main(argv + ["--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.startswith("qkv train: error:") and err.count("\n") == 1
