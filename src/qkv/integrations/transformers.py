"""`attn_implementation="qkv"`: every attention layer of a Hugging Face model through `qkv.attention`.

    import qkv.integrations.transformers                      # registers "qkv"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="qkv")
    model.set_attn_implementation("qkv")                      # or switch a loaded model

Legend: B batch, Hq query heads, Hkv key/value heads, Lq query length, Lk key length.

Two functions are registered under the same name, as transformers expects of an attention
that brings its own masks:

- the *mask function* (`AttentionMaskInterface`) receives what transformers would turn into a
  dense (B, 1, Lq, Lk) tensor: its mask function (a tree of small closures: causal, sliding
  window, bidirectional, packed sequences found from `position_ids` resets), the 2-D padding
  mask and the cache's offsets. It returns an `HFMask`: the same rule as a `qkv.masks` mask
  (`causal() & document(ids) & from_dense(key padding)`), so the tiled backend skips the
  tiles it rules out and nothing Lq x Lk is ever built. A closure it does not recognise is
  kept as a mask_mod, evaluated per element (as FlexAttention does) on the tiles it touches.
- the *attention function* (`AttentionInterface`) runs `qkv.attention` with that mask and
  what the layer passes: `scaling`, `dropout`, `softcap` (Gemma 2), `s_aux` sinks (GPT-OSS),
  T5's `position_bias`, `cu_seq_lens_*` (packed batches), `is_causal`. K/V are never
  repeated (qkv serves GQA natively); the output is (B, Lq, Hq, Dv) as transformers expects.
  With `output_attentions=True` the weights come from qkv's backends too (eager's are the
  only ones transformers itself returns). A keyword it cannot honour raises TypeError
  naming it: nothing is dropped silently.

A layer that gets no mask (`attention_mask=None`: ViT, some cross-attention) is causal
exactly when transformers' own sdpa path would make it so (`is_causal`, else the module's
`is_causal`, for Lq > 1; bottom-right when Lq != Lk).
"""

from __future__ import annotations

import functools
import inspect as _inspect
from dataclasses import dataclass

import torch

from qkv import hooks, masks, scores
from qkv.attention import attention

__all__ = ["register", "HFMask", "attention_forward", "mask_function", "attention_modules", "IGNORED_KWARGS"]

#: keywords transformers hands every attention call that say nothing attention must act on:
#: outputs other layers record, cache bookkeeping, or packing that the mask already holds
#: (`position_ids` resets are found by transformers' own mask code; `max_length_*` size FA2's
#: varlen buffers).
IGNORED_KWARGS = frozenset({
    "output_hidden_states", "output_router_logits", "num_items_in_batch", "use_cache", "cache_position",
    "position_ids", "max_length_q", "max_length_k", "return_dict", "deterministic", "layer_idx",
    "position_embeddings", "cache", "past_key_values", "past_key_value", "output_cross_attentions",
    "sliding_window",  # the mask function already applied the layer's window (see attention_forward)
})

_registered: dict[str, str] = {}   # name -> backend


@dataclass(frozen=True)
class HFMask:
    """What qkv's mask function hands an attention layer: a qkv mask (None: every key) and where the queries sit.

    `q_offset` is the absolute position of the first query among the layer's keys (qkv's
    convention: keys are positions 0..Lk-1 of the call); `kv_length` is the key count the
    mask was built for, checked against the keys that arrive.
    """

    mask: object | None
    q_offset: int
    kv_length: int
    batch_size: int

    #: transformers tells a prepared mask from a 2-D padding mask by `ndim` (generate builds the mask
    #: of a static cache's step ahead and hands it back to the model, which asks qkv's mask function again)
    ndim = 4

    @property
    def shape(self):  # the logical shape (batch, 1, queries, keys); the query count is the call's
        return (self.batch_size, 1, None, self.kv_length)

    def __repr__(self):
        return f"HFMask({self.mask!r}, q_offset={self.q_offset}, kv_length={self.kv_length})"


# -----------------------------------------------------------------------------
# transformers' mask closures -> qkv masks


def _closure(fn) -> dict:
    cells = fn.__closure__ or ()
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in cells)))


@functools.lru_cache(maxsize=None)
def _codes():
    """The code objects of transformers' mask builders, to recognise the closures they return."""
    import transformers.masking_utils as mu

    f, ids = mu.causal_mask_function, torch.zeros(1, 1, dtype=torch.long)
    return {
        mu.causal_mask_function.__code__: "causal",
        mu.bidirectional_mask_function.__code__: "all",
        mu.and_masks(f).__code__: "and",
        mu.or_masks(f).__code__: "or",
        mu.sliding_window_overlay(1).__code__: "window",
        mu.sliding_window_bidirectional_overlay(1).__code__: "window_bidirectional",
        mu.packed_sequence_mask_function(ids).__code__: "packed",
        mu.remap_positions_for_packed_sequence(f, ids).__code__: "remap",
        mu.padding_mask_function(ids.bool()).__code__: "padding",
        mu.add_offsets_to_mask_function(f, 0, 0).__code__: "offsets",
    }


_ALL = object()  # every key allowed (transformers' bidirectional mask)


def _documents(position_ids: torch.Tensor) -> torch.Tensor:
    """Document ids (B, L) from position ids that restart: a new document wherever the step is not +1."""
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    return (step != 1).cumsum(-1)


def _combine(op, parts):
    parts = [p for p in parts if p is not _ALL] if op == "and" else parts
    if op == "or" and any(p is _ALL for p in parts):
        return _ALL
    if not parts:
        return _ALL
    out = parts[0]
    for p in parts[1:]:
        out = (out & p) if op == "and" else (out | p)
    return out


def _translate(fn, shift: int, codes: dict):
    """A qkv mask (or _ALL) equal to transformers' mask closure `fn` on keys 0..Lk-1 of the call.

    `shift` is transformers' kv_offset: its positions are qkv's plus `shift`. Causal, window
    and bidirectional rules depend on q - kv only, so they need no shift; anything not
    recognised is kept as a per-element mask_mod with the shift applied.
    """
    kind = codes.get(getattr(fn, "__code__", None))
    env = _closure(fn) if kind else {}
    if kind == "causal":
        return masks.causal()
    if kind == "all":
        return _ALL
    if kind in ("and", "or"):
        fns = env["mask_functions"]
        kinds = sorted(codes.get(getattr(f, "__code__", None)) or "" for f in fns)
        if kind == "and" and kinds == ["causal", "window"]:    # transformers' sliding-window causal mask
            window = next(_closure(f)["sliding_window"] for f in fns if codes.get(f.__code__) == "window")
            return masks.sliding_window(int(window), causal=True)
        if kind == "and" and kinds == ["packed", "remap"] and shift == 0:
            # transformers' packed batch: its rule on per-document positions, and same-document.
            # Inside one document positions advance with the sequence, so a rule of q - kv alone
            # reads the same on either, and the pair is `document(ids) & rule`, recognisable
            # by the backends (document & causal is served as a batch of documents).
            by_kind = {codes.get(f.__code__): f for f in fns}
            inner = _closure(by_kind["remap"])["mask_function"]
            if _shift_free(inner, codes):
                ids = _closure(by_kind["packed"])["packed_sequence_mask"]
                return _combine("and", [masks.document(ids), _translate(inner, 0, codes)])
        return _combine(kind, [_translate(f, shift, codes) for f in fns])
    if kind == "window":   # `kv > q - window` alone: no limit on keys ahead
        return ~masks.causal() | masks.sliding_window(int(env["sliding_window"]), causal=True)
    if kind == "window_bidirectional":
        return masks.sliding_window(int(env["sliding_window"]) + 1, causal=False)
    if kind == "packed" and shift == 0:
        return masks.document(env["packed_sequence_mask"])
    if kind == "remap" and shift == 0:
        inner = _translate(env["mask_function"], 0, codes)
        if _shift_free(env["mask_function"], codes):
            # within one document positions advance by one with the sequence, so a rule of q - kv
            # reads the same on either; transformers always ands this with the packed mask
            return _combine("and", [inner, masks.document(_documents(env["position_ids"]))])
    if kind == "offsets":
        return _translate(env["mask_function"], shift + int(env["kv_offset"]), codes) \
            if int(env["q_offset"]) == int(env["kv_offset"]) else _as_mod(fn, shift)
    return _as_mod(fn, shift)


def _shift_free(fn, codes) -> bool:
    """Whether transformers' closure `fn` depends on q - kv only (causal, windows, all, and & | of them)."""
    kind = codes.get(getattr(fn, "__code__", None))
    if kind in ("and", "or"):
        return all(_shift_free(f, codes) for f in _closure(fn)["mask_functions"])
    return kind in ("causal", "all", "window", "window_bidirectional")


def _as_mod(fn, shift: int):
    if shift == 0:
        return masks.as_mask(fn)

    def shifted(b, h, q_idx, kv_idx):
        return fn(b, h, q_idx + shift, kv_idx + shift)

    shifted.__name__ = getattr(fn, "__name__", "mask_function")
    return masks.as_mask(shifted)


def mask_function(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                  mask_function=None, attention_mask=None, **kwargs) -> HFMask:
    """transformers' mask interface, answered with an `HFMask` (see the module docstring)."""
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    if isinstance(attention_mask, HFMask):              # built for this step already (see HFMask.ndim)
        if attention_mask.kv_length != kv_length:
            raise ValueError(f"a qkv mask built for {attention_mask.kv_length} keys was handed back for a step "
                             f"with {kv_length}; let transformers build each step's mask")
        return attention_mask
    mask = _ALL if mask_function is None else _translate(mask_function, kv_offset, _codes())
    if attention_mask is not None:
        pad = attention_mask.to(torch.bool)
        if pad.dim() != 2:
            raise ValueError(f"qkv's mask function takes transformers' 2-D padding mask (batch, keys), got shape "
                             f"{tuple(pad.shape)}")
        keys = pad[:, kv_offset:kv_offset + kv_length]
        if keys.shape[1] < kv_length:   # transformers pads a short mask with False (a static cache's free slots)
            keys = torch.nn.functional.pad(keys, (0, kv_length - keys.shape[1]), value=False)
        if not bool(keys.all()):
            mask = _combine("and", [mask, masks.from_dense(keys[:, None, None, :])])
    return HFMask(None if mask is _ALL else mask, q_offset - kv_offset, kv_length, batch_size)


# -----------------------------------------------------------------------------
# The attention function


def _keyword_mask(kwargs, B: int, Lk: int):
    """A document mask from FA2-style `cu_seq_lens_q/k` (a packed batch of one row), or None."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        return None
    cu_q = cu_k if cu_q is None else cu_q
    cu_k = cu_q if cu_k is None else cu_k
    if cu_q.shape != cu_k.shape or not torch.equal(cu_q.cpu(), cu_k.cpu()):
        raise ValueError("qkv serves packed batches whose queries and keys are the same sequences "
                         "(cu_seq_lens_q == cu_seq_lens_k); for other layouts pass a 2-D attention_mask")
    if B != 1 or int(cu_k[-1]) != Lk:
        raise ValueError(f"cu_seq_lens_k describes {int(cu_k[-1])} packed tokens in one batch row, but the call has "
                         f"B={B}, Lk={Lk}; pack the sequences into one row of that length")
    ids = torch.bucketize(torch.arange(Lk, device=cu_k.device), cu_k[1:].to(torch.long), right=True)
    return masks.document(ids[None])


def _check_kwargs(kwargs, module) -> None:
    known = IGNORED_KWARGS | {"cu_seq_lens_q", "cu_seq_lens_k", "softcap", "s_aux", "position_bias",
                              "output_attentions", "is_causal"}
    unknown = sorted(k for k, v in kwargs.items() if k not in known and v is not None)
    if unknown:
        raise TypeError(f"qkv's attention for transformers cannot honour {', '.join(map(repr, unknown))} "
                        f"(passed by {type(module).__name__}); use attn_implementation='eager' for this model, "
                        f"or file the keyword with qkv so it is served rather than dropped")


def _plain_mask(attention_mask, query, key, module, is_causal, kwargs):
    """(mask, score_mod) for a layer that got no HFMask: None, or a 4-D tensor built elsewhere."""
    Lq = query.shape[-2]
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if causal and Lq > 1:
            window = kwargs.get("sliding_window")
            return (masks.sliding_window(int(window)) if window else masks.causal()), None
        return None, None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        raise TypeError(f"qkv's attention for transformers takes the mask its own mask function built, None, or a "
                        f"4-D tensor; got {type(attention_mask).__name__}. Was the model switched to 'qkv' with "
                        f"model.set_attn_implementation('qkv') (which installs both functions)?")
    if attention_mask.dtype == torch.bool:
        return masks.from_dense(attention_mask), None
    # an additive float mask: its very negative entries rule keys out, the rest is a bias
    allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    rest = torch.where(allowed, attention_mask, torch.zeros((), dtype=attention_mask.dtype))
    mask = masks.from_dense(allowed)
    return mask, (None if not bool(rest.any()) else scores.bias(rest.to(torch.float32)))


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      is_causal=None, **kwargs):
    """transformers' attention interface: (attn_output (B, Lq, Hq, Dv), attn_weights or None)."""
    _check_kwargs(kwargs, module)
    B, Lk = query.shape[0], key.shape[-2]
    extra_mod = None
    if isinstance(attention_mask, HFMask):
        if attention_mask.kv_length != Lk:
            raise ValueError(f"{type(module).__name__}: the mask was built for {attention_mask.kv_length} keys but "
                             f"the layer has {Lk}; this cache layout is not one qkv's mask function knows")
        mask, q_offset = attention_mask.mask, attention_mask.q_offset
    else:
        mask, extra_mod = _plain_mask(attention_mask, query, key, module, is_causal, kwargs)
        q_offset = None
    packed = _keyword_mask(kwargs, B, Lk)
    if packed is not None:
        mask = packed if mask is None else mask & packed
    mods = [m for m in (None if kwargs.get("softcap") is None else scores.softcap(float(kwargs["softcap"])),
                        None if kwargs.get("position_bias") is None else
                        scores.bias(kwargs["position_bias"], q_offset=q_offset),
                        extra_mod) if m is not None]
    score_mod = None if not mods else mods[0] if len(mods) == 1 else scores.chain(*mods)
    sinks = kwargs.get("s_aux")
    want_weights = _weights_wanted(kwargs)
    hook = hooks.ATTENTION_HOOK.get()
    if hook is not None:
        hook(module, query, key, mask=mask, causal=False, score_mod=score_mod, scale=scaling, q_offset=q_offset,
             **({} if sinks is None else {"sinks": sinks}))
    out = attention(query, key, value, mask=mask, score_mod=score_mod, scale=scaling,
                    dropout_p=float(dropout or 0.0), q_offset=q_offset, return_weights=want_weights,
                    sinks=sinks, backend=_registered.get(_module_name(module), "auto"))
    weights = None
    if want_weights:
        out, weights = out
        weights = weights.to(query.dtype)
    return out.transpose(1, 2).contiguous(), weights


def _weights_wanted(kwargs) -> bool:
    """output_attentions as the layer was told, or as transformers' output recorder asks (GPT-2's
    model forward takes the keyword away, and its recorder then collects whatever layers return)."""
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils import output_capturing
        collected = output_capturing._active_collector.get()
    except (ImportError, AttributeError, LookupError):
        return False
    return bool(collected) and any(k.endswith("attentions") for k in collected)


def _module_name(module) -> str:
    config = getattr(module, "config", None)
    return getattr(config, "_attn_implementation", None) or "qkv"


# -----------------------------------------------------------------------------
# Registration, and the modules qkv.inspect.capture finds


def attention_modules(model) -> list[tuple[str, torch.nn.Module, int]]:
    """The attention layers of a transformers model that call its attention interface: [(name, module, Hq)]."""
    found = []
    for name, m in model.named_modules():
        forward = vars(type(m)).get("forward")
        if forward is None or not type(m).__module__.startswith("transformers."):
            continue
        code = getattr(_inspect.unwrap(forward), "__code__", None)
        if code is None or "ALL_ATTENTION_FUNCTIONS" not in code.co_names:
            continue
        found.append((name or type(m).__name__, m, _heads(m)))
    return found


def _heads(m) -> int:
    for attr in ("num_heads", "num_attention_heads", "n_heads", "n_head"):
        n = getattr(m, attr, None)
        if isinstance(n, int):
            return n
    config = getattr(m, "config", None)
    for attr in ("num_attention_heads", "num_heads", "n_head"):
        n = getattr(config, attr, None)
        if isinstance(n, int):
            return n
    raise ValueError(f"cannot tell how many heads {type(m).__name__} has; pass heads= explicitly")


def register(name: str = "qkv", *, backend: str = "auto") -> str:
    """Register qkv with transformers under `name` (attention and mask function); returns the name.

    `backend` is the qkv backend every call uses ("auto": the fastest that serves each call).
    After this, `from_pretrained(..., attn_implementation=name)`, `from_config(...)` and
    `model.set_attn_implementation(name)` run the model's attention through qkv.
    """
    if not isinstance(name, str) or not name or name in ("eager", "sdpa", "flex_attention") \
            or name.startswith(("flash_attention", "paged")):
        raise ValueError(f"register needs a new name for qkv (e.g. 'qkv'), not {name!r}: that one is "
                         f"transformers' own")
    from qkv.backends import registry
    if backend != "auto":
        registry.get(backend)   # an unknown backend name fails here, with the names that exist
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask_function)
    _registered[name] = backend
    if attention_modules not in hooks.ATTENTION_FINDERS:
        hooks.ATTENTION_FINDERS.append(attention_modules)
    return name


register()
