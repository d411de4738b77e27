"""Parity of qkv.nn.MultiheadAttention with torch.nn.MultiheadAttention.

Legend: N batch, H heads, L query length, S key length, E embed dim, D = E // H,
S' = S + add_bias_kv + add_zero_attn. Inputs use torch's layouts: (L, N, E), or
(N, L, E) with batch_first, or unbatched (L, E).

Both modules are built with the same constructor arguments and share one
state_dict (random, non-zero biases so every parameter matters); outputs,
weights and gradients are compared in float64 (tolerance 1e-10), and float32 by
DESIGN.md's error-ratio rule against the float64 torch module.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

import qkv
from qkv.nn import MultiheadAttention

from conftest import assert_error_ratio

E, H, N, L, S = 16, 4, 3, 5, 7
KDIM, VDIM = 12, 20
L_SELF = 6
TOL = 1e-10


@pytest.fixture(autouse=True)
def _one_thread():
    # The tensors here are tiny: extra intra-op threads only spin (badly, on a busy 2-core box).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -----------------------------------------------------------------------------
# Builders


def make_pair(dtype=torch.float64, seed=0, **cfg):
    """A torch module with random parameters and a qkv module loaded from its state_dict."""
    ref = torch.nn.MultiheadAttention(E, H, dtype=dtype, **cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype))
    mod = MultiheadAttention(E, H, dtype=dtype, **cfg)
    mod.load_state_dict(ref.state_dict())
    return ref, mod


def layout(x_nle, batch_first):
    """(N, L, E) -> the module's batched layout."""
    return x_nle if batch_first else x_nle.transpose(0, 1).contiguous()


def make_inputs(kind, cfg, dtype=torch.float64, seed=1, n=N):
    """query, key, value and (Lq, Sk) for kind 'self' (L == S; one tensor when the dims allow),
    'cross' (L != S, three tensors) or 'unbatched' (L != S; key is value when the dims allow,
    as in encoder-decoder attention), so every projection path of the module is exercised."""
    g = torch.Generator().manual_seed(seed)
    kdim, vdim = cfg.get("kdim") or E, cfg.get("vdim") or E
    bf = cfg.get("batch_first", False)
    Lq, Sk = (L_SELF, L_SELF) if kind == "self" else (L, S)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    if kind == "unbatched":
        k = rnd(Sk, kdim)
        return (rnd(Lq, E), k, k if kdim == vdim else rnd(Sk, vdim)), (Lq, Sk)
    if kind == "self" and kdim == vdim == E:
        x = layout(rnd(n, Lq, E), bf)
        return (x, x, x), (Lq, Sk)
    return (layout(rnd(n, Lq, E), bf), layout(rnd(n, Sk, kdim), bf), layout(rnd(n, Sk, vdim), bf)), (Lq, Sk)


def key_padding(n, Sk, batched):
    """bool (N, S) / (S,) with True = padding; batch b pads its last b % 3 + 1 keys (key 0 never)."""
    pad = torch.zeros(n, Sk, dtype=torch.bool)
    for b in range(n):
        pad[b, Sk - (b % 3 + 1):] = True
    return pad if batched else pad[1]


def make_masks(name, n, Lq, Sk, batched, dtype, seed=2):
    """Call kwargs for a mask scenario, in torch's convention. Key 0 is open to every
    query, so no row is fully masked (torch would give NaN there)."""
    g = torch.Generator().manual_seed(seed)
    heads = n * H if batched else H
    kw = {}
    for part in name.split("+"):
        if part == "kpm_bool":
            kw["key_padding_mask"] = key_padding(n, Sk, batched)
        elif part == "kpm_float":
            kpm = torch.randn(n, Sk, generator=g, dtype=torch.float64).to(dtype)
            kpm[0, -1] = float("-inf")
            kw["key_padding_mask"] = kpm if batched else kpm[0]
        elif part.startswith("attn"):
            shape = (Lq, Sk) if part.startswith("attn2d") else (heads, Lq, Sk)
            if part.endswith("bool"):
                m = torch.rand(shape, generator=g) < 0.35
                m[..., 0] = False
            else:
                m = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
            kw["attn_mask"] = m
        elif part in ("causal", "causal_float"):
            blocked = torch.ones(Lq, Sk, dtype=torch.bool).triu(1)       # top-left causal, as torch's hint
            if part == "causal":
                kw["attn_mask"] = blocked
            else:
                kw["attn_mask"] = torch.zeros(Lq, Sk, dtype=dtype).masked_fill(blocked, float("-inf"))
            kw["is_causal"] = True
        elif part != "none":
            raise AssertionError(part)
    return kw


def call_torch(ref, args, kw):
    with warnings.catch_warnings():
        # torch deprecates mixing a bool key_padding_mask with a float attn_mask; still supported
        warnings.simplefilter("ignore", UserWarning)
        return ref(*args, **kw)


def assert_close(a, b, what, tol=TOL):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != torch's {tuple(b.shape)}"
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != torch's {b.dtype}"
    err = float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0
    assert err <= tol, f"{what}: max error {err:.3e} > {tol:.0e}"


# -----------------------------------------------------------------------------
# The parity grid: module configuration x inputs x masks x weights


MODULE_CONFIGS = [
    pytest.param(dict(batch_first=bf, bias=bias, add_bias_kv=bkv, add_zero_attn=zero,
                      **({"kdim": KDIM, "vdim": VDIM} if kv else {})),
                 id=f"{'bf' if bf else 'seq'}-{'bias' if bias else 'nobias'}"
                    f"{'-biaskv' if bkv else ''}{'-zero' if zero else ''}{'-kvdims' if kv else ''}")
    for bf, bias, bkv, zero, kv in itertools.product([False, True], repeat=5)
]
INPUT_KINDS = ["self", "cross", "unbatched"]
MASKS = ["none", "kpm_bool", "kpm_float", "attn2d_bool", "attn2d_float", "attn3d_bool", "attn3d_float",
         "kpm_bool+attn2d_bool", "kpm_bool+attn3d_float", "kpm_float+attn2d_bool",
         "causal", "causal_float", "causal+kpm_bool"]
WEIGHTS = {"noweights": dict(need_weights=False),
           "avg": dict(need_weights=True, average_attn_weights=True),
           "perhead": dict(need_weights=True, average_attn_weights=False)}


@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("kind", INPUT_KINDS)
@pytest.mark.parametrize("cfg", MODULE_CONFIGS)
def test_forward_parity_grid(cfg, kind, masks):
    ref, mod = make_pair(**cfg)
    args, (Lq, Sk) = make_inputs(kind, cfg)
    kw = make_masks(masks, N, Lq, Sk, kind != "unbatched", torch.float64)
    for wname, wkw in WEIGHTS.items():
        out_t, w_t = call_torch(ref, args, {**kw, **wkw})
        out_q, w_q = mod(*args, **kw, **wkw)
        assert_close(out_q, out_t, f"output [{wname}]")
        if w_t is None:
            assert w_q is None, f"[{wname}] weights should be None"
        else:
            assert_close(w_q, w_t, f"weights [{wname}]")


# -----------------------------------------------------------------------------
# Backward: gradients of every parameter and input (float64)


BACKWARD_CASES = [
    (dict(bias=True, add_bias_kv=True, add_zero_attn=True, kdim=KDIM, vdim=VDIM), "cross",
     "attn3d_float", "avg"),
    (dict(batch_first=True, bias=False), "self", "kpm_bool+attn2d_bool", "perhead"),
    (dict(batch_first=True), "self", "causal", "noweights"),                  # qkv's sdpa path
    (dict(add_bias_kv=True), "self", "causal", "noweights"),                  # torch's is_causal hint path
    (dict(add_zero_attn=True), "unbatched", "kpm_float", "avg"),
    (dict(kdim=KDIM, vdim=VDIM, batch_first=True), "cross", "kpm_bool+attn3d_float", "noweights"),
    (dict(add_bias_kv=True, batch_first=True), "cross", "attn2d_float", "perhead"),
    (dict(), "unbatched", "attn3d_bool", "noweights"),
]


@pytest.mark.parametrize("cfg,kind,masks,wname", BACKWARD_CASES,
                         ids=[f"{k}-{m}-{w}-{i}" for i, (_, k, m, w) in enumerate(BACKWARD_CASES)])
def test_backward_parity(cfg, kind, masks, wname):
    ref, mod = make_pair(**cfg)
    args, (Lq, Sk) = make_inputs(kind, cfg)
    kw = {**make_masks(masks, N, Lq, Sk, kind != "unbatched", torch.float64), **WEIGHTS[wname]}
    g = torch.Generator().manual_seed(5)

    results = {}
    for name, module in (("torch", ref), ("qkv", mod)):
        leaves = {}  # one leaf per distinct tensor (self-attention passes one tensor three times)
        call_args = []
        for a in args:
            if id(a) not in leaves:
                leaves[id(a)] = a.detach().clone().requires_grad_(True)
            call_args.append(leaves[id(a)])
        out, w = call_torch(module, call_args, kw) if name == "torch" else module(*call_args, **kw)
        results[name] = (module, list(leaves.values()), out, w)

    g_out = torch.randn(results["torch"][2].shape, generator=g, dtype=torch.float64)
    g_w = None if results["torch"][3] is None else torch.randn(results["torch"][3].shape, generator=g,
                                                              dtype=torch.float64)
    grads = {}
    for name, (module, leaves, out, w) in results.items():
        loss = (out * g_out).sum() + (0 if w is None else (w * g_w).sum())
        params = dict(module.named_parameters())
        got = torch.autograd.grad(loss, [*params.values(), *leaves])
        grads[name] = dict(zip([*params, *[f"input{i}" for i in range(len(leaves))]], got))

    assert grads["qkv"].keys() == grads["torch"].keys()
    for key in grads["torch"]:
        assert_close(grads["qkv"][key], grads["torch"][key], f"grad {key}")


# -----------------------------------------------------------------------------
# float32: error ratio against the float64 torch module


@pytest.mark.parametrize("cfg,kind,masks", [
    (dict(), "self", "kpm_bool"),
    (dict(add_bias_kv=True, add_zero_attn=True, kdim=KDIM, vdim=VDIM), "cross", "attn3d_float"),
    (dict(batch_first=True), "cross", "causal"),
    (dict(), "unbatched", "attn2d_bool"),
])
@pytest.mark.parametrize("wname", list(WEIGHTS))
def test_float32_error_ratio(cfg, kind, masks, wname):
    ref64, _ = make_pair(dtype=torch.float64, **cfg)
    ref32, mod32 = make_pair(dtype=torch.float32, **cfg)
    ref32.load_state_dict({k: v.float() for k, v in ref64.state_dict().items()})
    mod32.load_state_dict(ref32.state_dict())
    args64, (Lq, Sk) = make_inputs(kind, cfg, dtype=torch.float64, n=8)
    args32, _ = make_inputs(kind, cfg, dtype=torch.float32, n=8)
    kw64 = {**make_masks(masks, 8, Lq, Sk, kind != "unbatched", torch.float64), **WEIGHTS[wname]}
    kw32 = {**make_masks(masks, 8, Lq, Sk, kind != "unbatched", torch.float32), **WEIGHTS[wname]}
    with torch.no_grad():
        oracle = call_torch(ref64, args64, kw64)
        baseline = call_torch(ref32, args32, kw32)
        cand = mod32(*args32, **kw32)
    assert cand[0].dtype == torch.float32
    assert_error_ratio(cand[0], baseline[0], oracle[0], what="output")
    if oracle[1] is not None:
        assert cand[1].dtype == torch.float32
        assert_error_ratio(cand[1], baseline[1], oracle[1], what="weights")


# -----------------------------------------------------------------------------
# Parameters: names, shapes, initialisation, state_dict both ways


STATE_CONFIGS = [dict(bias=b, add_bias_kv=bkv, **({"kdim": KDIM, "vdim": VDIM} if kv else {}))
                 for b, bkv, kv in itertools.product([True, False], repeat=3)]


@pytest.mark.parametrize("cfg", STATE_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_state_dict_round_trip(cfg):
    ref, mod = make_pair(**cfg)
    assert list(mod.state_dict()) == list(ref.state_dict())
    for (kq, vq), (kt, vt) in zip(mod.state_dict().items(), ref.state_dict().items()):
        assert vq.shape == vt.shape, kq
    for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                 "bias_k", "bias_v"):
        assert (getattr(mod, name) is None) == (getattr(ref, name) is None), name
    for attr in ("embed_dim", "kdim", "vdim", "num_heads", "dropout", "batch_first", "head_dim",
                 "_qkv_same_embed_dim", "add_zero_attn"):
        assert getattr(mod, attr) == getattr(ref, attr), attr

    args, (Lq, Sk) = make_inputs("cross", cfg)
    # torch -> qkv was done by make_pair; now a fresh qkv module -> a fresh torch module
    fresh_t = torch.nn.MultiheadAttention(E, H, dtype=torch.float64, **cfg)
    fresh_q = MultiheadAttention(E, H, dtype=torch.float64, **cfg)
    fresh_q.load_state_dict(ref.state_dict())
    fresh_t.load_state_dict(fresh_q.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(fresh_t.state_dict()[k], v), k
    assert_close(mod(*args)[0], ref(*args)[0], "torch -> qkv output")
    assert_close(fresh_t(*args)[0], ref(*args)[0], "qkv -> torch output")


@pytest.mark.parametrize("cfg", STATE_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_initialisation_matches_torch(cfg):
    """Same scheme and the same random draws in the same order: one seed, equal parameters."""
    torch.manual_seed(123)
    ref = torch.nn.MultiheadAttention(E, H, **cfg)
    torch.manual_seed(123)
    mod = MultiheadAttention(E, H, **cfg)
    for (k, vt), vq in zip(ref.state_dict().items(), mod.state_dict().values()):
        assert torch.equal(vq, vt), k
    if mod.in_proj_bias is not None:
        assert not mod.in_proj_bias.any() and not mod.out_proj.bias.any()
    if mod.bias_k is not None:
        assert mod.bias_k.shape == (1, 1, E) and mod.bias_k.abs().sum() > 0


def test_dtype_and_device_kwargs():
    mod = MultiheadAttention(E, H, kdim=KDIM, vdim=VDIM, add_bias_kv=True, dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in mod.parameters())
    assert mod.in_proj_weight is None and mod.k_proj_weight.shape == (E, KDIM)
    assert mod.v_proj_weight.shape == (E, VDIM) and mod.out_proj.weight.shape == (E, E)


# -----------------------------------------------------------------------------
# Dropout


@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_eval_is_deterministic_and_matches_torch(need_weights):
    cfg = dict(dropout=0.5, batch_first=True)
    ref, mod = make_pair(**cfg)
    ref.eval(), mod.eval()
    args, _ = make_inputs("cross", cfg)
    with torch.no_grad():
        a = mod(*args, need_weights=need_weights)
        b = mod(*args, need_weights=need_weights)
        t = ref(*args, need_weights=need_weights)
    assert torch.equal(a[0], b[0])
    assert_close(a[0], t[0], "eval output")
    if need_weights:
        assert_close(a[1], t[1], "eval weights")


@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_train_is_random_and_unbiased(need_weights):
    """Dropout on the weights is unbiased (kept weights are scaled by 1/(1-p)), and the
    output is linear in the weights, so the mean over many samples is the eval output."""
    cfg = dict(dropout=0.5, batch_first=True)
    _, mod = make_pair(**cfg)
    one, _ = make_inputs("cross", cfg, n=1)
    reps = 4000
    args = [a.expand(reps, *a.shape[1:]) for a in one]       # (reps, L, E): one sequence, many samples
    torch.manual_seed(0)
    with torch.no_grad():
        mod.train()
        first = mod(*one, need_weights=need_weights)[0]
        second = mod(*one, need_weights=need_weights)[0]
        samples = mod(*args, need_weights=need_weights)[0]
        mod.eval()
        expected = mod(*one, need_weights=need_weights)[0][0]
    assert not torch.allclose(first, second), "training-mode dropout should change the output"
    assert not torch.allclose(first[0], expected)
    mean = samples.mean(dim=0)
    stderr = samples.std(dim=0) / reps ** 0.5
    assert float(((mean - expected).abs() / stderr).max()) < 6.0
    assert float((mean - expected).abs().max()) < 0.1


# -----------------------------------------------------------------------------
# Documented difference: fully masked rows give zero attention, not NaN


@pytest.mark.parametrize("need_weights", [True, False])
def test_fully_masked_rows_give_zeros_not_nan(need_weights):
    ref, mod = make_pair(batch_first=True)
    args, _ = make_inputs("cross", dict(batch_first=True))
    args = [a.detach().clone().requires_grad_(True) for a in args]
    kpm = key_padding(N, S, True)
    kpm[1] = True                                            # batch element 1: every key is padding
    out, w = mod(*args, key_padding_mask=kpm, need_weights=need_weights)
    assert not torch.isnan(out).any()
    # zero attention -> the output projection sees zeros -> its bias
    assert_close(out[1], mod.out_proj.bias.detach().expand(L, E), "fully masked row output")
    out_t, w_t = ref(*args, key_padding_mask=kpm, need_weights=need_weights)
    for b in (0, 2):
        assert_close(out[b], out_t[b], f"batch {b}")
    if need_weights:
        assert torch.isnan(out_t[1]).all(), "torch gives NaN here (the documented difference)"
        assert not w[1].any() and not torch.isnan(w).any()
        assert_close(w[[0, 2]], w_t[[0, 2]], "weights of the other rows")
    out.sum().backward()
    for t in args:
        assert torch.isfinite(t.grad).all()
    for p in mod.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


# -----------------------------------------------------------------------------
# Backends: without weights and float masks the call fits qkv's sdpa backend


@pytest.mark.parametrize("masks", ["none", "kpm_bool+attn3d_bool", "causal"])
def test_no_weights_bool_masks_run_on_sdpa(masks):
    ref, mod = make_pair(add_zero_attn=True)
    args, (Lq, Sk) = make_inputs("self", {})
    kw = make_masks(masks, N, Lq, Sk, True, torch.float64)
    with qkv.use_backend("sdpa"):                            # raises if the call needed math
        out, w = mod(*args, need_weights=False, **kw)
    assert w is None
    assert_close(out, call_torch(ref, args, {**kw, "need_weights": False})[0], "sdpa output")


def test_weights_or_float_masks_need_math():
    _, mod = make_pair()
    args, (Lq, Sk) = make_inputs("self", {})
    with qkv.use_backend("sdpa"):
        with pytest.raises(ValueError, match="score_mod"):
            mod(*args, need_weights=False, attn_mask=torch.zeros(Lq, Sk, dtype=torch.float64))
        with pytest.raises(ValueError, match="weights"):
            mod(*args, need_weights=True)


def test_is_causal_hint_follows_torch_paths():
    """torch trusts is_causal only on its SDPA path (no weights, no key_padding_mask), where
    it masks the appended bias_k key too; qkv reproduces both paths."""
    ref, mod = make_pair(add_bias_kv=True)
    args, (Lq, Sk) = make_inputs("self", {})
    kw = make_masks("causal", N, Lq, Sk, True, torch.float64)
    fast_t = call_torch(ref, args, {**kw, "need_weights": False})[0]
    slow_t = call_torch(ref, args, {**kw, "need_weights": True})[0]
    assert float((fast_t - slow_t).detach().abs().max()) > 1e-3      # the two torch paths really differ here
    assert_close(mod(*args, **kw, need_weights=False)[0], fast_t, "hint path")
    assert_close(mod(*args, **kw, need_weights=True)[0], slow_t, "mask path")


# -----------------------------------------------------------------------------
# Errors: ValueError / TypeError with a message that says what is wrong


def _err_inputs():
    ref, mod = make_pair()
    args, _ = make_inputs("cross", {})
    return ref, mod, args


BAD_CALLS = {
    "query embed dim": (lambda q, k, v: ((q[..., :10], k, v), {}), ValueError,
                        r"query has 10 features .* embed_dim=16"),
    "key/value batch": (lambda q, k, v: ((q, k, v[:, :2]), {}), ValueError,
                        r"same batch size N"),
    "query/key batch": (lambda q, k, v: ((q[:, :2], k, v), {}), ValueError, r"same batch size N"),
    "key/value length": (lambda q, k, v: ((q, k, v[:4]), {}), ValueError, r"same sequence length S"),
    "key dims": (lambda q, k, v: ((q, k, v.unsqueeze(0)), {}), ValueError, r"must be 3-D too"),
    "query dims": (lambda q, k, v: ((q[None], k, v), {}), ValueError, r"query must be 3-D .* or 2-D"),
    "attn_mask 2-D shape": (lambda q, k, v: ((q, k, v), {"attn_mask": torch.zeros(L, S + 1, dtype=torch.bool)}),
                            ValueError, r"attn_mask must have shape \(L, S\) .*\(5, 7\).*got \(5, 8\)"),
    "attn_mask 3-D shape": (lambda q, k, v: ((q, k, v), {"attn_mask": torch.zeros(H, L, S, dtype=torch.bool)}),
                            ValueError, r"attn_mask must have shape \(N \* num_heads, L, S\) = \(12, 5, 7\)"),
    "attn_mask 4-D": (lambda q, k, v: ((q, k, v), {"attn_mask": torch.zeros(N, H, L, S, dtype=torch.bool)}),
                      ValueError, r"attn_mask must have shape"),
    "key_padding_mask shape": (lambda q, k, v: ((q, k, v), {"key_padding_mask": torch.zeros(N, S - 1).bool()}),
                               ValueError, r"key_padding_mask must have shape \(N, S\) = \(3, 7\)"),
    "mask dtype": (lambda q, k, v: ((q, k, v), {"key_padding_mask": torch.zeros(N, S, dtype=torch.int64)}),
                   TypeError, r"key_padding_mask must be bool .* or floating point"),
    "is_causal without mask": (lambda q, k, v: ((q, k, v), {"is_causal": True, "need_weights": False}),
                               ValueError, r"is_causal=True .* needs attn_mask"),
    "input dtype": (lambda q, k, v: ((q, k.float(), v), {}), TypeError, r"share one dtype"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_calls_raise_clear_errors(case):
    build, exc, pattern = BAD_CALLS[case]
    ref, mod, (q, k, v) = _err_inputs()
    args, kw = build(q, k, v)
    with pytest.raises(exc, match=pattern):
        mod(*args, **kw)
    with pytest.raises((AssertionError, RuntimeError)):    # torch rejects the same call too
        call_torch(ref, args, kw)


def test_unbatched_mask_shapes_are_checked():
    _, mod = make_pair()
    (q, k, v), _ = make_inputs("unbatched", {})
    with pytest.raises(ValueError, match=r"\(num_heads, L, S\) for unbatched inputs = \(4, 5, 7\)"):
        mod(q, k, v, attn_mask=torch.zeros(N * H, L, S, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(S,\) for unbatched inputs"):
        mod(q, k, v, key_padding_mask=torch.zeros(1, S, dtype=torch.bool))


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(embed_dim=18, num_heads=4), "divisible by num_heads"),
    (dict(embed_dim=0, num_heads=4), "greater than 0"),
    (dict(embed_dim=16, num_heads=4, dropout=1.0), "dropout"),
])
def test_bad_constructor_args(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        MultiheadAttention(**kwargs)
