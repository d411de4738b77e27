"""The `qkv` command: explain attention on a sentence, list backends, run the tour or the benchmark,
generate text, embed sentences, draw attention maps.

    qkv explain "the dog fetches the stick" [--dim 8] [--seed 0] [--causal] [--png FILE]
    qkv backends
    qkv demo [--out runs/demo] [--quick]
    qkv bench [--out runs/bench] [--quick]
    qkv bench attention [--quick] [--lengths L ...] [--out runs/bench] [--no-flex] [--no-memory]
    qkv bench generate [--quick] [--out runs/bench]
    qkv bench embed [--quick] [--out runs/bench]
    qkv bench train [--quick] [--out runs/bench]
    qkv bench approx [--quick] [--out runs/bench]
    qkv bench transformers [--quick] [--out runs/bench]
    qkv bench context [--quick] [--lengths L ...] [--out runs/bench]
    qkv generate --checkpoint DIR --prompt "text or token ids" [--max-new-tokens N] [--temperature T]
                 [--top-k K] [--top-p P] [--seed S] [--stop ID ...] [--cache contiguous|paged]
    qkv embed "a sentence" "another" [--model DIR] [--batch-size N] [--no-pack]
    qkv viz "a sentence" (--checkpoint DIR | --pretrained minilm) [--layer N] [--head N] [--focus WORD] [--out DIR]
    qkv viz --image FILE --checkpoint DIR [--query cls|N|ROW,COL] [--layer N] [--head N] [--out DIR]
    qkv train [DATA] [--tokenizer byte|char|bpe[:N]|PATH] [--preset tiny|mini|small|base] [--config FILE] [--steps N]
              [--batch-size B] [--context T] [--lr LR] [--warmup W] [--accum K] [--bf16] [--eval-every N]
              [--ckpt-every N] [--keep N] [--out runs/train] [--resume] [--seed S]
              [--context-parallel N] [--data-parallel M]   (under torchrun; WORLD_SIZE = N x M)
    qkv selftest [--minutes N] [--seed S] [--case I] [--max-cases N] [--json PATH]
    qkv --version

`main(argv)` returns the exit status instead of exiting, so tests can call it
in-process; the console script (and `python -m qkv`) pass it to `sys.exit`.
Usage errors print one line on stderr and return 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import qkv

__all__ = ["main", "build_parser"]


class UsageError(Exception):
    """Bad arguments: `main` prints the message on one line and returns 2 (no traceback)."""


class _Parser(argparse.ArgumentParser):
    """argparse that names the subcommand in its error line and shows a usage hint."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _tool(name: str):
    """The engine of a command, `qkv.tools.<name>`, imported when the command runs."""
    return importlib.import_module(f"qkv.tools.{name}")


def _cmd_explain(args) -> int:
    explain = _tool("explain")
    try:
        trace = explain.explain_sentence(args.sentence, dim=args.dim, seed=args.seed, causal=args.causal)
    except ValueError as exc:  # empty or too long sentence, bad --dim / --seed
        raise UsageError(str(exc)) from exc
    print("single-head self-attention, step by step:  softmax(Q K^T / sqrt(d_k)) V\n")
    print(explain.render_trace(trace, dim=args.dim, seed=args.seed, causal=args.causal))
    if args.png:
        from qkv import viz

        try:
            path = viz.trace_picture(trace, args.png, title=f"qkv explain \"{args.sentence}\"")
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from exc
        print(f"\npicture of the trace: {path}")
    return 0


def _cmd_backends(args) -> int:
    print(qkv.backends.list())
    return 0


def _cmd_demo(args) -> int:
    _tool("demo").run(args.out, quick=args.quick)
    return 0


def _cmd_bench(args) -> int:
    if (args.what not in ("attention", "context") and args.lengths) or \
            (args.what != "attention" and (args.no_flex or args.no_memory)):
        raise UsageError("--lengths, --no-flex and --no-memory belong to `qkv bench attention` (--lengths also to "
                         "`qkv bench context`)")
    bench = _tool(f"bench.{args.what}")              # qkv.tools.bench.backends, .attention, .generate, ...
    if args.what not in ("attention", "context"):
        bench.run(args.out, quick=args.quick)
        return 0
    extra = {} if args.what == "context" else {"flex": not args.no_flex, "memory": not args.no_memory}
    try:
        bench.run(args.out, quick=args.quick, lengths=args.lengths, **extra)
    except ValueError as exc:  # e.g. --lengths 4
        raise UsageError(str(exc)) from exc
    return 0


def _read_prompt(args, tokenizer) -> list[int]:
    text = args.prompt
    if tokenizer is None or args.ids:
        try:
            ids = [int(t) for t in text.replace(",", " ").split()]
        except ValueError:
            why = "--ids was given" if args.ids else f"{args.checkpoint} has no tokenizer.json"
            raise UsageError(f"{why}: the prompt must be token ids separated by spaces, e.g. --prompt \"464 3290\"; "
                             f"got {text!r}") from None
        if not ids:
            raise UsageError("the prompt is empty; give at least one token id")
        return ids
    try:
        ids = tokenizer.encode(text).ids
    except Exception as exc:  # the tokenizers library raises its own type, e.g. for a character it cannot map
        raise UsageError(f"the prompt cannot be encoded by {args.checkpoint}/tokenizer.json ({exc}); a character-level "
                         f"checkpoint knows only its training text's characters") from None
    if not ids:
        raise UsageError(f"the prompt {text!r} encodes to no tokens")
    return ids


def _cmd_generate(args) -> int:
    from qkv.generate import stream
    from qkv.models import hf

    from qkv import kernels
    from qkv.models import Decoder

    try:
        # the CPU kernels load beside the weights (a thread) when the decode ahead pays for them
        config = hf.config_from_hf(hf.read_config(args.checkpoint))
        weight_bytes = 4 * hf.parameter_count(config)
        if kernels.pays(args.max_new_tokens, kernels.torch_step_s(weight_bytes)):
            kernels.prefetch()
    except (ValueError, FileNotFoundError, TypeError):
        pass                                   # hf.load below says what is wrong
    try:
        model = hf.load(args.checkpoint)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from exc
    if not isinstance(model, Decoder):
        raise UsageError(f"{args.checkpoint} holds an encoder ({type(model).__name__}); qkv generate needs a "
                         f"decoder (GPT-2, Llama, Mistral); for sentence embeddings use `qkv embed --model DIR`")
    tokenizer = None
    tok_path = os.path.join(args.checkpoint, "tokenizer.json")
    if os.path.exists(tok_path) and not args.ids:
        from qkv.data import FileTokenizer

        try:  # a corrupt tokenizer.json (or a folder of that name) is refused, naming the file
            tokenizer = FileTokenizer(tok_path).tokenizer
        except (ValueError, FileNotFoundError) as exc:
            raise UsageError(f"{exc}; or pass --ids to give and get token ids") from None
    ids = _read_prompt(args, tokenizer)
    stats: dict = {}
    try:
        tokens = stream(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_tokens=args.stop,
                        cache=args.cache, stats=stats)
    except ValueError as exc:  # prompt too long for the context, bad sampling arguments
        raise UsageError(str(exc)) from exc
    new: list[int] = []
    shown = ""
    if tokenizer is not None:
        shown = tokenizer.decode(ids)
        print(shown, end="", flush=True)
    for t in tokens:
        new.append(t)
        if tokenizer is None:
            print(t if len(new) == 1 else f" {t}", end="", flush=True)
            continue
        # decode prompt + everything so far and print what is new: spacing between words and
        # characters spread over several tokens come out right (a partial one decodes to U+FFFD)
        text = tokenizer.decode(ids + new)
        if text.startswith(shown) and not text.endswith("\ufffd"):
            print(text[len(shown):], end="", flush=True)
            shown = text
    if tokenizer is not None:
        text = tokenizer.decode(ids + new)
        print(text[len(shown):] if text.startswith(shown) else "\n" + text, end="")
    print()
    if stats.get("steps"):
        decode_tps = (stats["new_tokens"] - 1) / stats["decode_s"] if stats["decode_s"] > 0 else float("nan")
        path = {"loaded": "CPU kernels", "held": "torch path: the CPU kernels would not pay for their load here",
                "building": "torch path: CPU kernels compiling in the background",
                "at exit": "torch path: CPU kernels compile in the background after this run, for later runs"}.get(
                    stats.get("kernels"), "torch path")
        print(f"[{len(new)} tokens; prefill {len(ids)} tokens in {stats['prefill_s']:.2f} s; "
              f"decode {decode_tps:.1f} tokens/s; {args.cache} cache; {path}]", file=sys.stderr)
    return 0


def _viz_source(args):
    """(model, token ids, token labels, description) for `qkv viz`."""
    from qkv import embed, viz
    from qkv.models import hf

    if (args.checkpoint is None) == (args.pretrained is None):
        raise UsageError("choose the model: --checkpoint DIR (a local checkpoint) or --pretrained minilm")
    if args.pretrained is not None:
        try:
            enc = embed.SentenceEncoder.load()
        except embed.PretrainedNotInstalled:
            raise UsageError(f"the packaged MiniLM is not installed: {embed.INSTALL_HINT}") from None
        text = args.sentence.lower() if enc.do_lower_case else args.sentence
        e = enc.tokenizer.encode(text)
        return enc.model, e.ids, [viz.token_label(t) for t in e.tokens], "all-MiniLM-L6-v2"
    try:
        model = hf.load(args.checkpoint)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from exc
    tok_path = os.path.join(args.checkpoint, "tokenizer.json")
    if args.ids or not os.path.exists(tok_path):
        try:
            ids = [int(t) for t in args.sentence.replace(",", " ").split()]
        except ValueError:
            why = "--ids was given" if args.ids else f"{args.checkpoint} has no tokenizer.json"
            raise UsageError(f"{why}: the input must be token ids separated by spaces, got {args.sentence!r}") from None
        labels = [str(i) for i in ids]
    else:
        from qkv.data import FileTokenizer

        try:
            tokenizer = FileTokenizer(tok_path).tokenizer
        except (ValueError, FileNotFoundError) as exc:
            raise UsageError(f"{exc}; or pass --ids to give token ids") from None
        try:
            e = tokenizer.encode(args.sentence)
        except Exception as exc:  # the tokenizers library's own error type
            raise UsageError(f"the sentence cannot be encoded by {tok_path} ({exc})") from None
        ids, labels = e.ids, [viz.token_label(t) for t in e.tokens]
    if not ids:
        raise UsageError("the sentence encodes to no tokens")
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and not all(0 <= i < vocab for i in ids):
        raise UsageError(f"token ids must be in 0..{vocab - 1} for {args.checkpoint}")
    return model, ids, labels, os.path.basename(os.path.normpath(args.checkpoint))


def _cmd_viz_image(args) -> int:
    from qkv import viz
    from qkv.models import ViT, hf

    if args.checkpoint is None or args.pretrained is not None or args.sentence is not None:
        raise UsageError("--image FILE takes a ViT checkpoint and no sentence: qkv viz --image FILE --checkpoint DIR")
    q = args.query.strip().lower()
    try:
        query = 0 if q == "cls" else tuple(int(v) for v in q.split(",")) if "," in q else int(q)
    except ValueError:
        raise UsageError(f"--query must be cls, a token index or ROW,COL, got {args.query!r}") from None
    try:
        model = hf.load(args.checkpoint, expect=ViT)
        report = viz.image_report(model, args.image, args.out, layer=args.layer, head=args.head, query=query)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise UsageError(str(exc).replace("\n", " ")) from exc
    pred = (f", predicted class {report['prediction']} (p = {report['probability']:.2f})"
            if "prediction" in report else "")
    (h, w), (gh, gw) = report["image_size"], report["grid"]
    print(f"{args.image}: {h} x {w} pixels, {gh} x {gw} patches, {len(report['layers'])} layers x "
          f"{report['heads']} heads{pred}")
    print(f"wrote {report['heads_png']} (every layer and head), {report['rollout_png']} (rollout) and "
          f"{report['html']} (open it in a browser: pick a layer and head, click a patch)")
    return 0


def _cmd_viz(args) -> int:
    from qkv import viz

    if args.image is not None:
        return _cmd_viz_image(args)
    if args.sentence is None:
        raise UsageError("give a sentence, or --image FILE with a ViT --checkpoint DIR")
    model, ids, labels, what = _viz_source(args)
    try:
        focus = None if args.focus is None else viz.find_token(labels, args.focus)
        report = viz.attention_report(model, ids, labels, args.out, layer=args.layer, head=args.head, focus=focus,
                                      title=f"{what}: {args.sentence}")
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc).replace("\n", " ")) from exc
    n = len(report["layers"])
    print(f"{what}: {len(ids)} tokens, {n} attention layers x {report['heads'][0]} heads")
    print(f"tokens: {' | '.join(labels)}")
    if "focus" in report:
        print(viz.format_focus(report))
    print(f"wrote {report['grid']} (every layer and head), {report['head']} (one head) and {report['html']} "
          f"(open it in a browser: pick a layer and head, hover a token)")
    return 0


def _cmd_embed(args) -> int:
    from qkv import embed

    try:
        model = embed.SentenceEncoder.load(args.model)
    except embed.PretrainedNotInstalled:
        raise UsageError(f"the default model (all-MiniLM-L6-v2) is not installed: {embed.INSTALL_HINT}, "
                         f"or pass --model DIR (a local sentence-transformers directory)") from None
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from exc
    try:
        vectors = model.encode(args.sentences, batch_size=args.batch_size, packed=False if args.no_pack else None)
    except ValueError as exc:  # e.g. --batch-size 0
        raise UsageError(str(exc)) from exc
    print(embed.cosine_table(args.sentences, vectors))
    return 0


def _cmd_train(args) -> int:
    from qkv import checkpoint, distributed, train

    try:
        result = train.train_lm(args.data, out=args.out, tokenizer=args.tokenizer, preset=args.preset,
                                config=args.config, steps=args.steps, batch_size=args.batch_size,
                                context=args.context, lr=args.lr, warmup=args.warmup, accum_steps=args.accum,
                                bf16=args.bf16, eval_every=args.eval_every, ckpt_every=args.ckpt_every,
                                keep=args.keep, resume=args.resume, seed=args.seed, progress=True,
                                context_parallel=args.context_parallel, data_parallel=args.data_parallel)
    except (ValueError, TypeError, FileNotFoundError, checkpoint.CheckpointError) as exc:
        raise UsageError(str(exc).replace("\n", " ")) from exc
    if distributed.is_main():                      # under torchrun: once, from rank 0
        print(f"validation: loss {result.val_loss:.4f} nats/token, {result.val_bpc:.4f} bits per character")
        print(f"checkpoint: {result.checkpoint}  (qkv generate --checkpoint {result.checkpoint} --prompt 'def ')")
    return 0


def _cmd_selftest(args) -> int:
    if args.backend == "triton":
        import torch

        if not torch.cuda.is_available():   # its kernels on CPU tensors in Triton's interpreter (read when defined)
            os.environ.setdefault("TRITON_INTERPRET", "1")
            print("selftest: no CUDA device; the triton backend's kernels run in Triton's interpreter "
                  "(TRITON_INTERPRET=1) on the CPU", file=sys.stderr)
    selftest = _tool("selftest")
    if args.backend is not None:
        try:
            selftest.only(args.backend)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    if args.case is not None:                       # replay one case: its description and every comparison
        if args.seed is None:
            raise UsageError("--case needs the --seed it was drawn from (the reproducer line gives both)")
        if args.case < 0:
            raise UsageError(f"--case must be >= 0, got {args.case}")
        return 0 if selftest.replay(args.seed, args.case, backend=args.backend).ok else 1
    if args.minutes is not None and not args.minutes > 0:
        raise UsageError(f"--minutes must be > 0, got {args.minutes}")
    if args.max_cases is not None and args.max_cases < 1:
        raise UsageError(f"--max-cases must be >= 1, got {args.max_cases}")
    minutes = 1.0 if args.minutes is None and args.max_cases is None else args.minutes
    summary = selftest.run(minutes=minutes, seed=args.seed, max_cases=args.max_cases, progress=True,
                           json_path=args.json, backend=args.backend)
    print(selftest.summary_text(summary))
    if args.json:
        print(f"summary: {args.json}")
    return 1 if summary["mismatches"] else 0


def _add_explain(sub) -> None:
    p = sub.add_parser("explain", help="attention on a sentence, step by step (toy vectors, no download)",
                       description="Print every step of single-head self-attention on a sentence, using "
                                   "deterministic toy embeddings and random projections (not a trained model).")
    p.add_argument("sentence", help='the words to attend over, e.g. "the dog fetches the stick"')
    p.add_argument("--dim", type=int, default=8, help="width of the toy embeddings and projections (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random projections W_q, W_k, W_v (default 0)")
    p.add_argument("--causal", action="store_true", help="each token may only attend to itself and earlier tokens")
    p.add_argument("--png", default=None, metavar="FILE", help="also draw the trace (Q, K, V, scores, weights, "
                   "output) into this PNG")
    p.set_defaults(func=_cmd_explain)


def _add_backends(sub) -> None:
    p = sub.add_parser("backends", help="the registered backends and what each supports")
    p.set_defaults(func=_cmd_backends)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the tour: worked example, masks, backend check and timings")
    p.add_argument("--out", default=os.path.join("runs", "demo"), help="where summary.json/.md go (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="shorter sequences (a few seconds)")
    p.set_defaults(func=_cmd_demo)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="time math vs sdpa (forward, forward+backward); writes backends.json",
                       description="`qkv bench`: math vs sdpa (backends.json). `qkv bench attention`: tiled, auto, "
                                   "sdpa and FlexAttention on long masked sequences (attention.json, attention.md). "
                                   "`qkv bench generate`: decoding vs transformers (generate.json, generate.md). "
                                   "`qkv bench embed`: MiniLM embeddings vs sentence-transformers and encoder-decoder "
                                   "training throughput (embed.json, embed.md). `qkv bench train`: decoder training vs "
                                   "transformers' GPT-2 and 2 processes vs 1 (train.json, train.md). `qkv bench "
                                   "approx`: sparse masks, linear and Performer attention against exact attention: "
                                   "error, accuracy, time, memory (approx.json, approx.md). `qkv bench "
                                   "transformers`: a Llama-style transformers model with attn_implementation qkv vs "
                                   "sdpa, eager and flex_attention on packed documents and a sliding window "
                                   "(transformers.json, transformers.md). `qkv bench gpu` (needs a CUDA GPU): qkv's "
                                   "Triton kernels vs torch SDPA's CUDA backends, compiled FlexAttention and "
                                   "flash-attn: TFLOP/s on masks, paged decode bandwidth, first-call JIT time "
                                   "(gpu.json, gpu.md). `qkv bench context`: ring attention over 2 processes "
                                   "(zigzag, contiguous) and all-to-all against one process at 1 and 2 threads, "
                                   "with a model on paper of when transfers hide (context.json, context.md).")
    p.add_argument("what", nargs="?", choices=("backends", "attention", "generate", "embed", "train", "approx",
                                                 "transformers", "gpu", "context"),
                   default="backends",
                   help="which benchmark (default backends)")
    p.add_argument("--out", default=os.path.join("runs", "bench"), help="where the results go (default runs/bench)")
    p.add_argument("--quick", action="store_true", help="backends: L in {256, 512}; attention: L in {1024, 4096}; "
                   "gpu: a few small cases, about a minute")
    p.add_argument("--lengths", type=int, nargs="+", metavar="L", help="attention: sequence lengths "
                   "(default 4096 16384 32768); context: (default 16384 32768 65536)")
    p.add_argument("--no-flex", action="store_true", help="attention: skip FlexAttention (no compilation)")
    p.add_argument("--no-memory", action="store_true", help="attention: skip the 131072-token memory case")
    p.set_defaults(func=_cmd_bench)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="stream tokens from a local Hugging Face checkpoint (GPT-2, Llama, Mistral)",
                       description="Load config.json + *.safetensors from a directory and generate with a KV cache. "
                                   "The prompt is text when the directory has tokenizer.json, else token ids.")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a local checkpoint directory (no download)")
    p.add_argument("--prompt", required=True, help="text, or token ids separated by spaces")
    p.add_argument("--ids", action="store_true", help="read --prompt as token ids and print ids")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample among the smallest set with probability >= p")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (same seed, same tokens)")
    p.add_argument("--stop", type=int, nargs="*", default=(), metavar="ID", help="token ids that end generation")
    p.add_argument("--cache", choices=("contiguous", "paged"), default="contiguous", help="KV cache layout")
    p.set_defaults(func=_cmd_generate)


def _add_viz(sub) -> None:
    p = sub.add_parser("viz", help="attention maps of a sentence: PNG pictures and an offline HTML viewer",
                       description="Run a sentence through a local checkpoint (--checkpoint DIR, with its "
                                   "tokenizer.json) or the packaged all-MiniLM-L6-v2 (--pretrained minilm), capture "
                                   "every layer's attention weights and write OUT/heads.png (layers x heads), "
                                   "OUT/head.png (one head, token labels) and OUT/attention.html (an offline viewer).")
    p.add_argument("sentence", nargs="?", default=None, help="the text (or token ids with --ids); not with --image")
    p.add_argument("--image", default=None, metavar="FILE",
                   help="a PNG/JPEG through a ViT checkpoint (--checkpoint DIR): writes OUT/heads.png (layers x heads "
                        "over the image), OUT/rollout.png and OUT/attention.html (pick layer, head, query patch)")
    p.add_argument("--query", default="cls", metavar="cls|N|ROW,COL",
                   help="with --image: the query token: cls (default), a token index, or a patch row,col")
    p.add_argument("--checkpoint", default=None, metavar="DIR", help="a local checkpoint directory")
    p.add_argument("--pretrained", default=None, choices=("minilm",), help="the packaged all-MiniLM-L6-v2")
    p.add_argument("--ids", action="store_true", help="the sentence is token ids separated by spaces")
    p.add_argument("--layer", type=int, default=None, help="layer of head.png (default: the last)")
    p.add_argument("--head", type=int, default=None, help="head of head.png (default 0)")
    p.add_argument("--focus", default=None, metavar="WORD", help="also print where this token attends in every layer")
    p.add_argument("--out", default=os.path.join("runs", "viz"), help="output folder (default runs/viz)")
    p.set_defaults(func=_cmd_viz)


def _add_embed(sub) -> None:
    p = sub.add_parser("embed", help="sentence embeddings (all-MiniLM-L6-v2) and their cosine similarities",
                       description="Embed sentences with a sentence-transformers model (default: the bundled "
                                   "all-MiniLM-L6-v2, from the `pretrained` extra) and print their pairwise cosine "
                                   "similarities. Text longer than the model's max_seq_length is truncated, with "
                                   "a warning.")
    p.add_argument("sentences", nargs="+", metavar="SENTENCE", help="the sentences to embed")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="a local sentence-transformers directory (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per forward pass (default 32)")
    p.add_argument("--no-pack", action="store_true",
                   help="always run padded batches (default: pack a batch's tokens when padding is large)")
    p.set_defaults(func=_cmd_embed)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a decoder language model on text, with atomic checkpoints",
                       description="Train a GPT-2 style decoder on a text file or folder (default: the Python "
                                   "standard library's sources), print a progress line and the validation bits "
                                   "per character, and write checkpoints OUT/step-N (loadable by qkv generate) "
                                   "and OUT/loss.png. --resume continues the run exactly.")
    p.add_argument("data", nargs="?", default=None, metavar="DATA",
                   help="a UTF-8 text file or a folder of them (default: the Python standard library sources)")
    p.add_argument("--tokenizer", default="bpe", metavar="byte|char|bpe[:N]|PATH",
                   help="bpe or bpe:N (default: a byte-level BPE of N = 2048 tokens trained on the training "
                        "text), byte, char (the corpus's characters) or a tokenizer.json")
    p.add_argument("--preset", default="mini", help="model size: tiny (2 x 64), mini (default: 4 layers x 128, "
                   "4 heads), small (6 x 384, 6 heads) or base (12 x 768)")
    p.add_argument("--config", default=None, metavar="FILE", help="a JSON file of DecoderConfig fields "
                   "(instead of --preset)")
    p.add_argument("--steps", type=int, default=1200, help="optimizer steps (default 1200)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per micro-batch (default 16)")
    p.add_argument("--context", type=int, default=128, help="tokens per window (default 128)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default min(100, steps / 10))")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (default float32)")
    p.add_argument("--eval-every", type=int, default=None, help="validate every N steps (default: steps / 10; "
                   "0: at the end only)")
    p.add_argument("--ckpt-every", type=int, default=0, help="checkpoint every N steps (default: at the end)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep (default 3)")
    p.add_argument("--out", default=os.path.join("runs", "train"), help="run directory (default runs/train)")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    p.add_argument("--context-parallel", type=int, default=1, metavar="N",
                   help="under torchrun: split each sequence across N ranks (ring attention); default 1")
    p.add_argument("--data-parallel", type=int, default=None, metavar="M",
                   help="under torchrun: M groups share out the batch (WORLD_SIZE = N x M; default WORLD_SIZE / N)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batches (default 0)")
    p.set_defaults(func=_cmd_train)


def _add_selftest(sub) -> None:
    p = sub.add_parser("selftest", help="differential self-test: random calls on every backend against the oracle",
                       description="Draw random attention calls (shapes, dtypes, masks, score mods, alignments, "
                                   "gradients), KV-cache decodes and approximate-attention calls, run every backend "
                                   "that accepts each against the float64 oracle under DESIGN.md's error-ratio "
                                   "rule, and print one line per mismatch that replays it. Exit status 1 on any "
                                   "mismatch.")
    p.add_argument("--minutes", type=float, default=None, help="how long to run (default 1, or until --max-cases)")
    p.add_argument("--seed", type=int, default=None, help="seed of the cases (default: a fresh one, printed)")
    p.add_argument("--case", type=int, default=None, metavar="I", help="replay case I of --seed and print all of it")
    p.add_argument("--max-cases", type=int, default=None, metavar="N", help="stop after N cases")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the summary as JSON (atomically)")
    p.add_argument("--backend", default=None, metavar="NAME", help="run the attention cases on this exact backend "
                   "alone (e.g. triton: without a GPU, in Triton's interpreter on the CPU)")
    p.set_defaults(func=_cmd_selftest)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qkv", description="Self-attention from the textbook formula to fast exact kernels.")
    parser.add_argument("--version", action="version", version=f"qkv {qkv.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in (_add_explain, _add_backends, _add_demo, _add_bench, _add_generate, _add_viz, _add_embed,
                _add_train, _add_selftest):     # the order of `qkv --help`
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `qkv` command with `argv` (default: sys.argv[1:]); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version (0) or a usage error (2, already printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("qkv: error: choose a command: explain, backends, demo, bench, generate, embed, viz, train or selftest "
              "(qkv --help says more)",
              file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"qkv {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `qkv explain ... | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except OSError as exc:  # e.g. --out names a file, or a directory we may not write to
        print(f"qkv {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

#: commands whose process may end without the interpreter's teardown (`run`): they hold no file
#: open when they return, and tearing down torch's modules costs a fresh process ~0.5 s
_QUICK_EXIT = {"generate"}


def run() -> None:
    """The `qkv` console command: `main()`, then exit. After a command of _QUICK_EXIT the exit
    handlers run and the process ends at once (os._exit), skipping the teardown of every module
    object; its output is flushed first."""
    argv = sys.argv[1:]
    code = main(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in _QUICK_EXIT:
        import atexit

        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
