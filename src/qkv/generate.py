"""Text generation with a KV cache: prefill the prompt, then decode one token per step.

Legend: B batch (prompts), V vocabulary, L prompt length.

    prompt (L tokens) --prefill: one forward, K/V of every prompt token into the cache--> logits of token L
    repeat: pick a token (greedy / temperature, top-k, top-p) -> one-token forward over the cache -> logits

    generate(model, [1, 2, 3], max_new_tokens=8)                  -> [new token ids]
    generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=8)        -> one list per prompt (a ragged batch)
    for tok in stream(model, [1, 2, 3], temperature=0.8, seed=0): # one id at a time, as produced
        ...

A ragged batch: each prompt is prefilled alone at its own length (no padding),
straight into its row of the cache; the decode steps then run the whole batch at
once, each sequence at its own position. With `cache="paged"` a sequence holds
only the blocks its tokens need, identical prompts are prefilled once and share
their blocks, and finished sequences leave the batch and free their blocks.
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from qkv import fused, kernels
from qkv.models.config import DecoderConfig

__all__ = ["generate", "stream", "sample", "SamplingError"]


class SamplingError(ValueError):
    """Bad sampling arguments."""


def sample(logits: Tensor, *, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """Pick one token per row of logits (B, V) -> (B,) int64.

    temperature 0 is greedy (argmax). Otherwise the logits are divided by the
    temperature, cut to the top_k most likely tokens and then to the smallest set
    whose probability reaches top_p (the most likely token always survives), and
    a token is drawn from what is left with `generator`.
    """
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        desc = f"{logits.dtype} {tuple(logits.shape)}" if isinstance(logits, Tensor) else type(logits).__name__
        raise SamplingError(f"logits must be a float tensor (B, V), got {desc}; for one row pass logits[None]")
    _check_sample_args(temperature, top_k, top_p)
    if temperature == 0:
        if logits.device.type == "cpu" and not logits.requires_grad and logits.dtype in (torch.float32, torch.float64):
            # numpy's argmax: the same first-maximum (and first-NaN) rule, 4-8x faster than
            # torch's over a vocabulary-long row (a greedy decode step does one per token)
            return torch.from_numpy(np.argmax(logits.numpy(), axis=-1).astype(np.int64, copy=False))
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature                                       # (B, V)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]                  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)      # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs                            # mass of the tokens ranked above
        drop_sorted = before >= top_p                                           # rank 0 has before = 0: kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _check_sample_args(temperature, top_k, top_p) -> None:
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not 0 <= temperature < float("inf")):
        raise SamplingError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise SamplingError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise SamplingError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def _check_sampling(temperature, top_k, top_p, max_new_tokens, stop_tokens, seed=None, vocab_size=None):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise SamplingError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    _check_sample_args(temperature, top_k, top_p)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise SamplingError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}")
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise SamplingError("top_k/top_p only apply when sampling: pass temperature > 0 (0 means greedy)")
    try:
        stops = list(stop_tokens)
    except TypeError:
        raise SamplingError(f"stop_tokens must be an iterable of token ids, got {stop_tokens!r}") from None
    ids = set()
    for t in stops:
        try:
            if isinstance(t, bool) or isinstance(stop_tokens, (str, bytes)):
                raise TypeError
            t = operator.index(t)                    # ints, numpy ints, integer 0-d tensors; never a float
        except TypeError:
            raise SamplingError(f"stop_tokens must be an iterable of int token ids, got {stop_tokens!r}") from None
        if vocab_size is not None and not 0 <= t < vocab_size:
            raise SamplingError(f"stop token {t} is outside [0, vocab_size={vocab_size}), so it could never be "
                                f"generated; pass ids of the model's vocabulary")
        ids.add(t)
    return ids


def _as_prompts(prompts, vocab_size: int) -> tuple[list[list[int]], bool]:
    """-> (list of prompts as int lists, single?)."""
    if isinstance(prompts, Tensor):
        if prompts.dim() == 1:
            prompts, single = [prompts.tolist()], True
        elif prompts.dim() == 2:
            prompts, single = prompts.tolist(), False
        else:
            raise ValueError(f"a prompt tensor must be (L,) or (B, L), got shape {tuple(prompts.shape)}")
    elif isinstance(prompts, Sequence) and not isinstance(prompts, (str, bytes)):
        if len(prompts) == 0:
            raise ValueError("no prompts given; pass a list of token ids (or a list of such lists)")
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
            prompts, single = [list(prompts)], True
        else:
            prompts = [p.tolist() if isinstance(p, Tensor) else p for p in prompts]
            single = False
    else:
        raise TypeError(f"prompts must be a list of token ids, a list of such lists, or a tensor; "
                        f"got {type(prompts).__name__} (tokenize text first)")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
            raise TypeError(f"prompt {i} must be a list of token ids, got {type(p).__name__}")
        p = list(p)
        if not p:
            raise ValueError(f"prompt {i} is empty; a prompt needs at least one token")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise TypeError(f"prompt {i} must hold int token ids")
        if min(p) < 0 or max(p) >= vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, vocab_size={vocab_size}): "
                             f"{min(p)}..{max(p)}")
        out.append(p)
    return out, single


def stream(model, prompts, *, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, seed: int | None = None, stop_tokens=(), cache: str = "contiguous",
           block_size: int = 16, stats: dict | None = None, _own_loop: bool = False) -> Iterator:
    """Generate token by token: yields an int per step for one prompt, or a list
    (one entry per prompt, None once that prompt has stopped) for a batch.

    Arguments as in `generate`. Stopping: a sequence stops after emitting a stop
    token (which is yielded) or max_new_tokens tokens. (`_own_loop`: `generate`'s
    own consumer, which runs no other code between steps: the decode steps may then
    reuse what the first step checked, `Decoder.decode_step`.)
    """
    if not (isinstance(getattr(model, "config", None), DecoderConfig) and callable(getattr(model, "new_cache", None))):
        raise TypeError(f"model must be a qkv.models.Decoder (a causal language model with a KV cache), got "
                        f"{type(model).__name__}")
    if stats is not None and not isinstance(stats, dict):
        raise TypeError(f"stats must be a dict to fill (or None), got {type(stats).__name__}")
    c = model.config
    stops = _check_sampling(temperature, top_k, top_p, max_new_tokens, stop_tokens, seed, c.vocab_size)
    batch, single = _as_prompts(prompts, c.vocab_size)
    longest = max(len(p) for p in batch)
    if longest + max_new_tokens > c.max_positions:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's context "
                         f"of {c.max_positions} tokens; shorten the prompt or generate fewer tokens")
    if cache not in ("contiguous", "paged"):
        raise ValueError(f"cache must be 'contiguous' or 'paged', got {cache!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    generator = None
    if temperature > 0:
        generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    return _run(model, batch, single, max_new_tokens, temperature, top_k, top_p, generator, stops, cache,
                block_size, stats, _own_loop)


def _prefill(model, batch, max_new_tokens, cache_kind, block_size):
    """The prompts through the model: (cache, paged sequence ids or None, each prompt's last logits)."""
    device, B = model.embed.weight.device, len(batch)
    if cache_kind == "contiguous":
        kv = model.new_cache(B, kind="contiguous", max_len=max(len(p) for p in batch) + max_new_tokens)
        rows = [kv.row(b) for b in range(B)]
        last = [model(torch.tensor([p], device=device), cache=rows[b], last_only=True)[0, -1]
                for b, p in enumerate(batch)]                               # B x (V,)
        sids = None
    else:
        blocks = sum(-(-(len(p) + max_new_tokens) // block_size) for p in batch)
        kv = model.new_cache(0, kind="paged", num_blocks=blocks, block_size=block_size)
        sids, last, seen = [], [], {}
        for p in batch:
            key = tuple(p)
            if key in seen:                         # same prompt: share its blocks, reuse its logits
                j = seen[key]
                sids.append(kv.view([sids[j]]).fork(0))
                last.append(last[j])
                continue
            sid = kv.pool.new_sequence()
            last.append(model(torch.tensor([p], device=device), cache=kv.view([sid]), last_only=True)[0, -1])
            seen[key] = len(sids)
            sids.append(sid)
    return kv, sids, last


def _run(model, batch, single, max_new_tokens, temperature, top_k, top_p, generator, stops, cache_kind,
         block_size, stats, own_loop):
    device = model.embed.weight.device
    B = len(batch)
    pick = lambda logits: sample(logits, temperature=temperature, top_k=top_k, top_p=top_p,  # noqa: E731
                                 generator=generator).cpu()
    if stats is not None:
        stats.update(prefill_s=0.0, decode_s=0.0, new_tokens=0, steps=0)
    if max_new_tokens == 0:
        return
    was_training = model.training
    model.eval()
    # the CPU decode kernels are held back (torch's path runs) until the steps left would pay for
    # loading them: `kernels.pays`, from the torch path's own step time (the fastest step so far)
    step_s, released = math.inf, False
    hold = kernels.available() and not (kernels.loaded() or kernels.WAIT)
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            with kernels.held(hold):
                kv, sids, last = _prefill(model, batch, max_new_tokens, cache_kind, block_size)
            token = pick(torch.stack(last))                                                 # (B,)
            if stats is not None:
                stats["prefill_s"] = time.perf_counter() - t0
            session = fused.DecodeSession() if own_loop and callable(getattr(model, "decode_step", None)) else None
            active = list(range(B))                           # prompts still generating, by index
            done = [False] * B
            for step in range(max_new_tokens):
                out: list[int | None] = [None] * B
                for b in active:
                    out[b] = int(token[b])
                    if out[b] in stops or step == max_new_tokens - 1:
                        done[b] = True
                if stats is not None:
                    stats["new_tokens"] += len(active)
                    stats["steps"] = step + 1
                yield out[0] if single else out
                still = [b for b in active if not done[b]]
                if not still:
                    break
                t1 = time.perf_counter()
                if sids is not None and len(still) < len(active):       # paged: finished sequences leave
                    for b in active:
                        if done[b]:
                            kv.free(sids[b])
                active = still
                if sids is not None:
                    step_cache = kv.view([sids[b] for b in active])
                    inputs = token[active][:, None]                      # (B', 1)
                else:
                    step_cache, inputs = kv, token[:, None]              # contiguous: every row steps
                left = max_new_tokens - 1 - step
                held = hold and not kernels.loaded() and (step_s == math.inf or not kernels.pays(left, step_s))
                released = released or not held
                with kernels.held(held), kernels.horizon(None if held else left * step_s):
                    if session is not None:
                        logits = model.decode_step(inputs.to(device), step_cache, session)[:, -1]
                    else:
                        logits = model(inputs.to(device), cache=step_cache, last_only=True)[:, -1]   # (B' or B, V)
                if held:
                    step_s = min(step_s, time.perf_counter() - t1)
                nxt = pick(logits)
                if sids is not None:
                    token = token.clone()
                    token[active] = nxt
                else:
                    token = nxt
                if stats is not None:
                    stats["decode_s"] += time.perf_counter() - t1
                    stats["kernels"] = "loaded" if kernels.loaded() else kernels.status() if released else "held"
    finally:
        model.train(was_training)


def generate(model, prompts, *, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, stop_tokens=(), cache: str = "contiguous",
             block_size: int = 16, stats: dict | None = None):
    """Generate up to max_new_tokens tokens after each prompt; returns the new token ids.

    Args:
        model: a `qkv.models.Decoder`.
        prompts: token ids (a list of ints or a 1-D tensor) -> returns list[int];
            or several prompts of any lengths -> returns one list per prompt.
        temperature: 0 = greedy; > 0 samples (with top_k / top_p if given).
        seed: seeds the sampler; the same seed gives the same tokens.
        stop_tokens: ids that end a sequence (the stop token is included in its output).
        cache: "contiguous" (one preallocated row per prompt) or "paged" (blocks of block_size tokens).
        stats: a dict to fill with prefill_s, decode_s, new_tokens, steps.
    """
    tokens = stream(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p, seed=seed, stop_tokens=stop_tokens, cache=cache, block_size=block_size,
                    stats=stats, _own_loop=True)
    batch, single = _as_prompts(prompts, model.config.vocab_size)
    outs: list[list[int]] = [[] for _ in batch]
    for step in tokens:
        for b, t in enumerate([step] if single else step):
            if t is not None:
                outs[b].append(t)
    return outs[0] if single else outs
