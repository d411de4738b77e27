"""`qkv generate`: streams tokens for a local checkpoint, as ids or as text (tokenizer.json)."""

from __future__ import annotations

import json

import pytest
import torch

from qkv.cli import main
from qkv.generate import generate
from qkv.models import Decoder, DecoderConfig, hf

WORDS = ["the", "dog", "cat", "sat", "on", "mat", "and", "ran", "to", "a", "big", "red", "ball", "home", "."]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny GPT-2 checkpoint (random weights) with a word-level tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    torch.manual_seed(0)
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    config = DecoderConfig.gpt2(vocab_size=len(vocab), d_model=32, n_layers=2, n_heads=4, max_positions=64)
    model = Decoder(config).eval()
    with torch.no_grad():
        for p in model.parameters():      # larger weights: varied, non-repeating greedy continuations
            p.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("ckpt")
    hf.save(model, path)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")    # joins words with spaces
    tok.save(str(path / "tokenizer.json"))
    ids_only = tmp_path_factory.mktemp("ckpt_ids")
    hf.save(model, ids_only)
    return path, ids_only, model, tok


def test_ids_in_ids_out(checkpoint, capsys):
    _, ids_only, model, _ = checkpoint
    assert main(["generate", "--checkpoint", str(ids_only), "--prompt", "1 2 3", "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    expected = generate(model, [1, 2, 3], max_new_tokens=6)
    assert [int(t) for t in out.split()] == expected
    assert "tokens/s" in err


def test_text_in_text_out(checkpoint, capsys):
    path, _, model, tok = checkpoint
    prompt = "the dog sat on the"
    assert main(["generate", "--checkpoint", str(path), "--prompt", prompt, "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out.strip()
    new = generate(model, tok.encode(prompt).ids, max_new_tokens=5)
    assert out == tok.decode(tok.encode(prompt).ids + new)
    assert out.startswith(prompt + " ") and len(out.split()) == len(prompt.split()) + 5


def test_ids_flag_with_a_tokenizer_and_sampling_is_seeded(checkpoint, capsys):
    path, _, _, _ = checkpoint
    argv = ["generate", "--checkpoint", str(path), "--prompt", "4 5", "--ids", "--temperature", "1.0",
            "--top-k", "5", "--seed", "7", "--max-new-tokens", "8", "--cache", "paged"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first and len(first.split()) == 8


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "1 2"], "config.json"),                                   # checkpoint dir missing
    (["--prompt", "hello there"], "token ids"),                            # text but no tokenizer.json
    (["--prompt", " ".join(["1"] * 60), "--max-new-tokens", "10"], "context"),   # 60 + 10 > 64 positions
    (["--prompt", "1 2", "--temperature", "-1"], "temperature"),
    (["--prompt", "1 99"], "vocab"),                                        # id outside the vocabulary
])
def test_bad_input_is_a_one_line_error(checkpoint, capsys, tmp_path, argv, message):
    _, ids_only, _, _ = checkpoint
    directory = tmp_path / "missing" if message == "config.json" else ids_only
    assert main(["generate", "--checkpoint", str(directory), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bin_checkpoint_is_refused_without_unpickling(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle you would want to load")
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "1"]) == 2
    assert "safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "viz"])
def test_corrupt_tokenizer_json_is_a_one_line_error_naming_it(checkpoint, tmp_path, capsys, command):
    """A checkpoint whose tokenizer.json is cut short: exit status 2 and a message naming the file
    and the way out (--ids), never the tokenizers library's traceback."""
    _, ids_only, _, _ = checkpoint
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ids_only.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "tokenizer.json").write_text('{"model": ', encoding="utf-8")
    argv = (["generate", "--checkpoint", str(broken), "--prompt", "the dog"] if command == "generate"
            else ["viz", "the dog", "--checkpoint", str(broken), "--out", str(tmp_path / "viz")])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "tokenizer.json is not a tokenizers tokenizer.json" in err and "--ids" in err
    assert "Traceback" not in err
