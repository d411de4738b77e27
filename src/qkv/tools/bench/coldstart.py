"""`qkv bench generate`'s fresh-process sections: what a user waits for, process start to exit.

Every process here is started by the benchmark (`subprocess`, stdin closed, a timeout) and
timed by the parent around the whole process: interpreter start, imports, model load,
generation, exit. Every child gets the benchmark's torch thread count (OMP_NUM_THREADS and
MKL_NUM_THREADS; the transformers child also calls `torch.set_num_threads`).

1. Cold start (`cold_start`): a `qkv train --preset tiny` checkpoint (a few steps: decode speed
   depends on the shapes, not on what the weights learned), then `python -m qkv generate
   --checkpoint CK --prompt "def " --max-new-tokens 32` three ways, interleaved, R times:
   "first run ever" (QKV_NUMBA=1, NUMBA_CACHE_DIR and QKV_KERNEL_CACHE a new empty directory
   for each repetition: a machine that has never built the kernels), "second run" (the same
   environment, started as soon as the first has exited; whether a background build's log,
   lock and stamp exist in that directory just before and just after it is recorded) and
   "QKV_NUMBA=0" (torch's path). A background build the two started is waited for (its stamp,
   at most `build_wait_s`) before the next run, so it does not slow runs that did not start it.
   Medians of the wall seconds and of the decode tokens/s that `qkv generate` prints on
   stderr, and the path it names. Goals: second-run wall <= 1.1x the QKV_NUMBA=0 wall, its
   decode tokens/s >= the QKV_NUMBA=0 run's, first-run wall <= 1.5x the QKV_NUMBA=0 wall.
2. End to end (`end_to_end`): a GPT-2-small-shaped model with random weights written once with
   `qkv.models.hf.save`, 32 seeded prompt ids, 64 new tokens, greedy, batch 1: `python -m qkv
   generate --ids` with the kernels built beforehand for that environment (`python -m
   qkv.kernels.build` is run first, same environment: "kernels cached"), the same with
   QKV_NUMBA=0, and a `python -c` that imports torch and transformers, loads
   `GPT2LMHeadModel.from_pretrained(DIR)` (sdpa, eval, fp32) and runs `generate(ids,
   max_new_tokens=64, min_new_tokens=64, do_sample=False)`; R interleaved rounds (one untimed
   warm-up round first in the full run, for the OS's file cache), medians. The new tokens of
   qkv and transformers must be identical. Goal: transformers wall / qkv wall >= 2x.
"""

from __future__ import annotations

import glob
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch

from qkv.tools.harness import format_table, ratio, rounded

__all__ = ["ColdSizes", "COLD_FULL", "COLD_QUICK", "COLD_NAMES", "E2E_NAMES", "parse_generate_line", "summarize", "cold_start", "end_to_end",
           "goals", "render_tables", "notes", "agreement", "TRANSFORMERS_CHILD"]


@dataclass(frozen=True)
class ColdSizes:
    """The fresh-process sections' settings (the model shape of `end_to_end` comes from generate.Sizes)."""

    train_steps: int            # steps of `qkv train --preset tiny`
    repeats: int                # R: rounds of each section
    cold_new_tokens: int        # --max-new-tokens of the cold-start runs
    e2e_prompt: int             # prompt ids of the end-to-end runs
    e2e_new_tokens: int
    e2e_warmup: int             # untimed rounds before the timed ones
    train_timeout_s: float
    generate_timeout_s: float   # one cold-start `qkv generate`
    build_timeout_s: float      # `python -m qkv.kernels.build`
    e2e_timeout_s: float        # one end-to-end process
    build_wait_s: float         # longest wait for a background build the cold-start runs started


COLD_FULL = ColdSizes(train_steps=60, repeats=3, cold_new_tokens=32, e2e_prompt=32, e2e_new_tokens=64, e2e_warmup=1,
                      train_timeout_s=900, generate_timeout_s=180, build_timeout_s=600, e2e_timeout_s=600,
                      build_wait_s=240)
COLD_QUICK = ColdSizes(train_steps=10, repeats=1, cold_new_tokens=32, e2e_prompt=32, e2e_new_tokens=64, e2e_warmup=0,
                       train_timeout_s=300, generate_timeout_s=120, build_timeout_s=300, e2e_timeout_s=300,
                       build_wait_s=120)

COLD_PROMPT = "def "
COLD_KINDS = ("first_run", "second_run", "numba_off")
E2E_KINDS = ("qkv", "qkv_off", "hf")
COLD_NAMES = {"first_run": "first run ever (empty kernel cache)", "second_run": "second run (right after the first)",
               "numba_off": "QKV_NUMBA=0 (torch path)"}
E2E_NAMES = {"qkv": "qkv generate (kernels cached)", "qkv_off": "qkv generate (QKV_NUMBA=0)",
              "hf": "transformers generate"}

#: the stderr line of `qkv generate`, e.g. "[32 tokens; prefill 2 tokens in 0.00 s; decode 1186.1 tokens/s;
#: contiguous cache; torch path: ...]"
_LINE = re.compile(r"\[(?P<tokens>\d+) tokens; prefill (?P<prefill>\d+) tokens in (?P<prefill_s>[0-9.]+) s; "
                   r"decode (?P<tps>[0-9.]+|nan|inf) tokens/s; (?P<cache>\w+) cache; (?P<path>[^\]]*)\]")

#: the transformers side of `end_to_end`: argv = checkpoint dir, torch threads, prompt ids, new tokens
TRANSFORMERS_CHILD = """\
import sys
import torch
torch.set_num_threads(int(sys.argv[2]))
import transformers
from transformers import GPT2LMHeadModel
kw = {"dtype": torch.float32} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": torch.float32}
model = GPT2LMHeadModel.from_pretrained(sys.argv[1], attn_implementation="sdpa", **kw).eval()
assert next(model.parameters()).dtype == torch.float32
ids = torch.tensor([[int(t) for t in sys.argv[3].split()]])
n = int(sys.argv[4])
with torch.no_grad():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)
print(" ".join(str(t) for t in out[0, ids.shape[1]:].tolist()))
"""


# ----------------------------------------------------------------------------
# Running and reading one process
# ----------------------------------------------------------------------------

def parse_generate_line(stderr: str) -> dict | None:
    """The last `[N tokens; prefill ...; decode X tokens/s; ... cache; PATH]` line of `qkv generate`'s
    stderr as numbers (decode_tok_s a float, nan where the CLI printed nan) and the path text; None
    when there is none."""
    found = list(_LINE.finditer(stderr or ""))
    if not found:
        return None
    m = found[-1]
    return {"new_tokens": int(m["tokens"]), "prompt_tokens": int(m["prefill"]), "prefill_s": float(m["prefill_s"]),
            "decode_tok_s": float(m["tps"]), "cache": m["cache"], "path": m["path"].strip(), "line": m.group(0)}


def child_env(threads: int, **overrides: str | None) -> dict:
    """os.environ with the torch thread count set and `overrides` applied (None: removed)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    for k, v in overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def timed_process(cmd: Sequence[str], env: dict, timeout_s: float) -> dict:
    """Run `cmd` to its end (stdin closed, output captured) and time it from start to exit in this
    process: {"wall_s", "rc", "stdout", "stderr"} and "error" when it failed or ran past `timeout_s`."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(list(cmd), stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:     # subprocess.run kills its own child
        return {"wall_s": rounded(time.perf_counter() - t0), "rc": None, "stdout": _text(exc.stdout),
                "stderr": _text(exc.stderr), "error": f"ran past {timeout_s:g} s"}
    wall = time.perf_counter() - t0
    out = {"wall_s": rounded(wall), "rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or "").strip().splitlines()[-3:])
        out["error"] = f"exit status {proc.returncode}: {tail}"
    return out


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _ids(text: str) -> list[int] | None:
    try:
        return [int(t) for t in text.split()]
    except ValueError:
        return None


def summarize(runs: list[dict]) -> dict:
    """Medians over the runs that succeeded (no "error"): wall_s, decode_tok_s (where the runs
    reported it), the path text most of them named and every one they named."""
    ok = [r for r in runs if "error" not in r]
    walls = [r["wall_s"] for r in ok]
    tps = [r["decode_tok_s"] for r in ok if r.get("decode_tok_s") is not None]
    paths = [r["path"] for r in ok if r.get("path")]
    return {"runs": len(runs), "ok_runs": len(ok), "walls_s": walls,
            "wall_s": rounded(statistics.median(walls)) if walls else None,
            "decode_tok_s": rounded(statistics.median(tps), 2) if tps else None,
            "path": Counter(paths).most_common(1)[0][0] if paths else None, "paths": sorted(set(paths)),
            "errors": [r["error"] for r in runs if "error" in r]}


# ----------------------------------------------------------------------------
# 1. Cold start on a `qkv train --preset tiny` checkpoint
# ----------------------------------------------------------------------------

def train_tiny(out_dir: str, steps: int, threads: int, timeout_s: float) -> dict:
    """`python -m qkv train --preset tiny --steps S --out DIR` in a fresh process: its wall time and
    the checkpoint it wrote (the last DIR/step-*)."""
    cmd = [sys.executable, "-m", "qkv", "train", "--preset", "tiny", "--steps", str(steps), "--out", out_dir]
    r = timed_process(cmd, child_env(threads, QKV_NUMBA="0"), timeout_s)   # training never touches the kernel cache
    found = sorted(glob.glob(os.path.join(out_dir, "step-*")))
    info = {"preset": "tiny", "steps": steps, "train_s": r["wall_s"], "command": " ".join(cmd[1:]),
            "checkpoint": found[-1] if found else None}
    if "error" in r or not found:
        info["error"] = r.get("error", "no checkpoint written")
    return info


def cache_state(folder: str) -> dict:
    """What `qkv.kernels` left in a kernel-cache folder: a background build's log and lock, a stamp
    (the stamp's name depends on the environment's NUMBA_ settings: looked for by pattern)."""
    has = lambda ext: bool(glob.glob(os.path.join(folder, f"kernels-*.{ext}")))  # noqa: E731
    return {"log": has("log"), "lock": has("lock"), "stamp": has("json")}


def _wait_for_build(folder: str, limit_s: float) -> dict:
    """Where a background build was started in `folder` (its log exists) and no stamp is there
    yet: wait for the stamp (or a traceback in the log), at most `limit_s`."""
    t0 = time.perf_counter()
    state = cache_state(folder)
    if not state["log"] or state["stamp"]:
        return {"waited_s": 0.0, "stamp": state["stamp"], "timed_out": False}
    logs = glob.glob(os.path.join(folder, "kernels-*.log"))
    while time.perf_counter() - t0 < limit_s:
        if cache_state(folder)["stamp"]:
            break
        text = ""
        for path in logs:
            try:
                with open(path, errors="replace") as f:
                    text += f.read()
            except OSError:
                pass
        if "Traceback" in text:
            break
        time.sleep(0.5)
    stamp = cache_state(folder)["stamp"]
    return {"waited_s": rounded(time.perf_counter() - t0, 2), "stamp": stamp,
            "timed_out": not stamp and time.perf_counter() - t0 >= limit_s}


def _generate_run(cmd: Sequence[str], env: dict, timeout_s: float) -> dict:
    r = timed_process(cmd, env, timeout_s)
    parsed = parse_generate_line(r["stderr"])
    run = {"wall_s": r["wall_s"], "rc": r["rc"], "decode_tok_s": None, "path": None, "stderr_line": None,
           "new_ids": _ids(r["stdout"])}
    if parsed is not None:
        tps = parsed["decode_tok_s"]
        run.update(decode_tok_s=tps if math.isfinite(tps) else None, path=parsed["path"], stderr_line=parsed["line"],
                   new_tokens=parsed["new_tokens"])
    if "error" in r:
        run["error"] = r["error"]
    elif parsed is None:
        run["error"] = "no [N tokens; ...] line on stderr"
    return run


def cold_start(c: ColdSizes, threads: int, log, *, checkpoint: str | None = None) -> dict:
    """Section 1 (see the module docstring). `checkpoint`: use this one instead of training one."""
    out: dict = {"prompt": COLD_PROMPT, "max_new_tokens": c.cold_new_tokens, "repeats": c.repeats,
                 "threads": threads, "timeout_s": c.generate_timeout_s}
    with tempfile.TemporaryDirectory(prefix="qkv-bench-cold-", ignore_cleanup_errors=True) as tmp:
        if checkpoint is None:
            log(f"cold start: training a tiny checkpoint ({c.train_steps} steps; decode speed does not depend "
                f"on what the weights learned) ...")
            out["train"] = train_tiny(os.path.join(tmp, "train"), c.train_steps, threads, c.train_timeout_s)
            if "error" in out["train"]:
                log(f"  training failed: {out['train']['error']}")
                out["error"] = f"qkv train: {out['train']['error']}"
                return out
            checkpoint = out["train"]["checkpoint"]
            log(f"  {out['train']['train_s']:.1f} s; {checkpoint}")
        out["checkpoint"] = checkpoint
        cmd = [sys.executable, "-m", "qkv", "generate", "--checkpoint", checkpoint, "--prompt", COLD_PROMPT,
               "--max-new-tokens", str(c.cold_new_tokens)]
        out["command"] = f'python -m qkv generate --checkpoint CK --prompt "{COLD_PROMPT}" --max-new-tokens ' \
                         f'{c.cold_new_tokens}'
        runs: dict[str, list[dict]] = {k: [] for k in COLD_KINDS}
        for i in range(c.repeats):
            cache = tempfile.mkdtemp(prefix=f"kernels-{i}-", dir=tmp)        # new and empty
            cold_env = child_env(threads, QKV_NUMBA="1", NUMBA_CACHE_DIR=cache, QKV_KERNEL_CACHE=cache)
            first = _generate_run(cmd, cold_env, c.generate_timeout_s)
            first["cache_after"] = cache_state(cache)
            second = _generate_run(cmd, cold_env, c.generate_timeout_s)       # at once: nothing waited for
            second["cache_before"] = first["cache_after"]
            second["cache_after"] = cache_state(cache)
            second["build_wait"] = _wait_for_build(cache, c.build_wait_s)
            off = _generate_run(cmd, child_env(threads, QKV_NUMBA="0"), c.generate_timeout_s)
            for k, r in zip(COLD_KINDS, (first, second, off)):
                runs[k].append(r)
                log(f"  run {i + 1}/{c.repeats} {COLD_NAMES[k]:<38} {_f(r['wall_s'])} s, decode "
                    f"{_f(r['decode_tok_s'], '{:.1f}')} tokens/s; {r.get('error') or r['path']}")
    out["runs"] = runs
    for k in COLD_KINDS:
        out[k] = summarize(runs[k])
    off = out["numba_off"]
    out["second_vs_off_wall"] = rounded(ratio(out["second_run"]["wall_s"], off["wall_s"]), 3)
    out["second_vs_off_decode"] = rounded(ratio(out["second_run"]["decode_tok_s"], off["decode_tok_s"]), 3)
    out["first_vs_off_wall"] = rounded(ratio(out["first_run"]["wall_s"], off["wall_s"]), 3)
    return out


# ----------------------------------------------------------------------------
# 2. End to end against transformers
# ----------------------------------------------------------------------------

def save_gpt2(directory: str, *, vocab: int, d_model: int, n_layers: int, n_heads: int, max_positions: int,
              seed: int) -> dict:
    """A GPT-2-shaped qkv Decoder with seeded random weights, written with `qkv.models.hf.save`
    (config.json + model.safetensors, which `GPT2LMHeadModel.from_pretrained` loads too)."""
    from qkv.models import Decoder, DecoderConfig, hf

    config = DecoderConfig.gpt2(vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                                max_positions=max_positions)
    torch.manual_seed(seed)
    model = Decoder(config).eval()
    params = sum(p.numel() for p in model.parameters())
    hf.save(model, directory)
    del model
    return {"vocab": vocab, "d_model": d_model, "n_layers": n_layers, "n_heads": n_heads,
            "max_positions": max_positions, "params": params, "seed": seed}


def end_to_end(c: ColdSizes, shape: dict, threads: int, seed: int, log) -> dict:
    """Section 2 (see the module docstring). `shape`: vocab, d_model, n_layers, n_heads, max_positions."""
    out: dict = {"new_tokens": c.e2e_new_tokens, "repeats": c.repeats, "warmup_rounds": c.e2e_warmup,
                 "threads": threads, "timeout_s": c.e2e_timeout_s}
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, shape["vocab"], (c.e2e_prompt,), generator=g).tolist()
    out["prompt_ids"] = prompt
    kernels_env = child_env(threads, QKV_NUMBA="1")       # the normal environment (its own NUMBA_CACHE_DIR, if any)
    with tempfile.TemporaryDirectory(prefix="qkv-bench-e2e-") as tmp:
        model_dir = os.path.join(tmp, "gpt2")
        log(f"end to end: saving a GPT-2-shaped model ({shape['n_layers']} layers, d={shape['d_model']}, "
            f"V={shape['vocab']}) with qkv.models.hf.save ...")
        out["model"] = save_gpt2(model_dir, seed=seed, **shape)
        log("  building the kernels for that environment first: python -m qkv.kernels.build ...")
        b = timed_process([sys.executable, "-m", "qkv.kernels.build"], kernels_env, c.build_timeout_s)
        out["kernel_build"] = {"wall_s": b["wall_s"], "rc": b["rc"], "error": b.get("error"),
                               "output": (b["stdout"] + b["stderr"]).strip().splitlines()[-1:]}
        log(f"  {b['wall_s']:.1f} s: {' '.join(out['kernel_build']['output']) or b.get('error')}")
        ids_text = " ".join(map(str, prompt))
        qkv_cmd = [sys.executable, "-m", "qkv", "generate", "--checkpoint", model_dir, "--ids", "--prompt", ids_text,
                   "--max-new-tokens", str(c.e2e_new_tokens)]
        hf_cmd = [sys.executable, "-c", TRANSFORMERS_CHILD, model_dir, str(threads), ids_text, str(c.e2e_new_tokens)]
        out["commands"] = {"qkv": f'python -m qkv generate --checkpoint DIR --ids --prompt "<ids>" '
                                  f'--max-new-tokens {c.e2e_new_tokens}',
                           "hf": f'python -c "<TRANSFORMERS_CHILD>" DIR {threads} "<ids>" {c.e2e_new_tokens}'}
        plan = (("qkv", qkv_cmd, kernels_env), ("qkv_off", qkv_cmd, child_env(threads, QKV_NUMBA="0")),
                ("hf", hf_cmd, child_env(threads)))
        runs: dict[str, list[dict]] = {k: [] for k in E2E_KINDS}
        for i in range(c.e2e_warmup + c.repeats):
            warm = i < c.e2e_warmup
            for k, cmd, env in plan:
                if k == "hf":
                    r = timed_process(cmd, env, c.e2e_timeout_s)
                    run = {"wall_s": r["wall_s"], "rc": r["rc"], "new_ids": _ids(r["stdout"]), "decode_tok_s": None,
                           "path": "transformers, sdpa"}
                    if "error" in r:
                        run["error"] = r["error"]
                else:
                    run = _generate_run(cmd, env, c.e2e_timeout_s)
                if "error" not in run and (run["new_ids"] is None or len(run["new_ids"]) != c.e2e_new_tokens):
                    run["error"] = f"expected {c.e2e_new_tokens} new ids on stdout"
                label = "warm-up" if warm else f"run {i + 1 - c.e2e_warmup}/{c.repeats}"
                log(f"  {label} {E2E_NAMES[k]:<30} {_f(run['wall_s'])} s"
                    + (f"; {run.get('error') or run['path']}" if k != "hf" or "error" in run else ""))
                if not warm:
                    runs[k].append(run)
    out["runs"] = runs
    for k in E2E_KINDS:
        out[k] = summarize(runs[k])
    hf_ids = next((r["new_ids"] for r in runs["hf"] if "error" not in r), None)
    out["tokens"] = hf_ids
    for k in ("qkv", "qkv_off"):
        mine = [r["new_ids"] for r in runs[k] if "error" not in r]
        same = bool(mine) and hf_ids is not None and all(m == hf_ids for m in mine)
        out[k]["tokens_identical_to_hf"] = same
        out[k]["first_mismatch"] = None if same else _mismatch(mine[0] if mine else None, hf_ids)
    out["hf"]["deterministic"] = len({tuple(r["new_ids"]) for r in runs["hf"] if "error" not in r}) <= 1
    out["hf_vs_qkv"] = rounded(ratio(out["hf"]["wall_s"], out["qkv"]["wall_s"]), 3)
    out["hf_vs_qkv_off"] = rounded(ratio(out["hf"]["wall_s"], out["qkv_off"]["wall_s"]), 3)
    return out


def _mismatch(a: list[int] | None, b: list[int] | None) -> dict:
    if a is None or b is None:
        return {"index": None, "why": "no tokens from " + ("qkv" if a is None else "transformers")}
    for i in range(max(len(a), len(b))):
        if i >= len(a) or i >= len(b) or a[i] != b[i]:
            return {"index": i, "qkv": a[i] if i < len(a) else None, "hf": b[i] if i < len(b) else None}
    return {"index": None}


# ----------------------------------------------------------------------------
# Goals and rendering (generate.py's render and evaluate_goals call these)
# ----------------------------------------------------------------------------

def goals(result: dict, goal) -> list[dict]:
    """The goal rows of both sections; `goal` is generate.py's `_goal(name, measured, target, direction)`."""
    cs, e2e = result.get("cold_start") or {}, result.get("end_to_end") or {}
    return [
        goal("cold start: second run wall / QKV_NUMBA=0 wall (fresh processes)", cs.get("second_vs_off_wall"),
             1.1, "<="),
        goal("cold start: second run decode tokens/s / QKV_NUMBA=0's", cs.get("second_vs_off_decode"), 1.0, ">="),
        goal("cold start: first run ever wall / QKV_NUMBA=0 wall", cs.get("first_vs_off_wall"), 1.5, "<="),
        goal("end to end: transformers wall / qkv wall (fresh processes, kernels cached)", e2e.get("hf_vs_qkv"),
             2.0, ">="),
    ]


def _f(x, fmt: str = "{:.2f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _state(s: dict | None) -> str:
    """"log no, lock no, stamp no" for a `cache_state`."""
    if not s:
        return "-"
    return ", ".join(f"{k} {'yes' if s[k] else 'no'}" for k in ("log", "lock", "stamp"))


COLD_HEADER = ("cold start (tiny checkpoint)", "runs", "wall s", "vs QKV_NUMBA=0", "decode tok/s",
               "build log / lock / stamp after", "path")
E2E_HEADER = ("end to end (fresh process)", "runs", "wall s", "transformers / this", "decode tok/s",
              "tokens = transformers", "path")


def _cold_cells(cs: dict) -> list[list[str]]:
    body = []
    off = (cs.get("numba_off") or {}).get("wall_s")
    for k in COLD_KINDS:
        r = cs.get(k)
        if r is None:
            body.append([COLD_NAMES[k], "0", "n/a", "n/a", "n/a", "-", cs.get("error", "not run")])
            continue
        after = [run.get("cache_after") for run in cs["runs"][k]]
        body.append([COLD_NAMES[k], f"{r['ok_runs']}/{r['runs']}", _f(r["wall_s"]),
                     "-" if k == "numba_off" else _f(ratio(r["wall_s"], off), "{:.2f}x"),
                     _f(r["decode_tok_s"], "{:.1f}"), _state(after[-1]) if after and after[-1] else "-",
                     " / ".join(r["paths"]) or "; ".join(r["errors"]) or "n/a"])
    return body


def _e2e_cells(e2e: dict) -> list[list[str]]:
    body = []
    hf_wall = (e2e.get("hf") or {}).get("wall_s")
    for k in E2E_KINDS:
        r = e2e.get(k)
        if r is None:
            body.append([E2E_NAMES[k], "0", "n/a", "n/a", "n/a", "-", e2e.get("error", "not run")])
            continue
        same = "-" if k == "hf" else ("yes" if r["tokens_identical_to_hf"] else "NO")
        body.append([E2E_NAMES[k], f"{r['ok_runs']}/{r['runs']}", _f(r["wall_s"]),
                     "-" if k == "hf" else _f(ratio(hf_wall, r["wall_s"]), "{:.2f}x"),
                     _f(r["decode_tok_s"], "{:.1f}"), same,
                     " / ".join(r["paths"]) or "; ".join(r["errors"]) or "n/a"])
    return body


def render_tables(result: dict, *, markdown: bool = False) -> tuple[str, str]:
    """(the cold-start table, the end-to-end table)."""
    cold = format_table(COLD_HEADER, _cold_cells(result.get("cold_start") or {}), left=(0, 5, 6), markdown=markdown)
    e2e = format_table(E2E_HEADER, _e2e_cells(result.get("end_to_end") or {}), left=(0, 5, 6), markdown=markdown)
    return cold, e2e


COLD_LEGEND = ("fresh processes, each timed by the benchmark from its start to its exit (interpreter, imports, "
               "model load, generation); medians of the runs; decode tok/s: what `qkv generate` prints on stderr; "
               "'transformers / this': transformers' wall time / this row's (> 1: faster than transformers)")


def notes(result: dict) -> list[str]:
    cs, e2e = result.get("cold_start") or {}, result.get("end_to_end") or {}
    lines = []
    if cs:
        tr = cs.get("train") or {}
        lines.append(
            f"cold start: `{cs.get('command', 'python -m qkv generate ...')}` on a `qkv train --preset tiny` checkpoint "
            f"({tr.get('steps', '?')} steps, {_f(tr.get('train_s'), '{:.1f}')} s; the training does not change "
            f"decode speed, which depends on the shapes only); {cs['repeats']} round(s) of first run ever "
            f"(QKV_NUMBA=1, NUMBA_CACHE_DIR and QKV_KERNEL_CACHE a new empty directory each round), second run "
            f"(started as soon as the first exited), QKV_NUMBA=0; torch threads {cs['threads']}; a background "
            f"build the first two started is waited for before the QKV_NUMBA=0 run"
            + ("; after the second runs: " + "; ".join(
                f"before it {_state(r.get('cache_before'))}, after it {_state(r.get('cache_after'))}, "
                f"waited {r['build_wait']['waited_s']:.1f} s for a build" for r in cs["runs"]["second_run"])
               if cs.get("runs") else "")
            + (f"; ERROR {cs['error']}" if cs.get("error") else ""))
    if e2e:
        m, kb = e2e.get("model") or {}, e2e.get("kernel_build") or {}
        lines.append(
            f"end to end: GPT-2 shape {m.get('n_layers')} layers, d={m.get('d_model')}, {m.get('n_heads')} heads, "
            f"V={m.get('vocab')}, {m.get('max_positions')} positions, {_f(m.get('params', 0) / 1e6, '{:.1f}')}M "
            f"parameters, random weights (seed {m.get('seed')}) written once by qkv.models.hf.save; prompt "
            f"{len(e2e['prompt_ids'])} seeded ids, {e2e['new_tokens']} new tokens, greedy, batch 1, torch threads "
            f"{e2e['threads']}; {e2e['repeats']} interleaved round(s) after {e2e['warmup_rounds']} untimed; the "
            f"kernels-cached row runs after `python -m qkv.kernels.build` in the same environment "
            f"({_f(kb.get('wall_s'), '{:.1f}')} s: {' '.join(kb.get('output') or []) or kb.get('error')}); "
            f"transformers: GPT2LMHeadModel.from_pretrained (sdpa, eval, fp32), generate(max_new_tokens="
            f"{e2e['new_tokens']}, min_new_tokens={e2e['new_tokens']}, do_sample=False); transformers / qkv wall "
            f"{_f(e2e.get('hf_vs_qkv'), '{:.2f}x')} (kernels cached), {_f(e2e.get('hf_vs_qkv_off'), '{:.2f}x')} "
            f"(QKV_NUMBA=0)")
    return lines


def agreement(result: dict) -> list[str]:
    e2e = result.get("end_to_end")
    if not e2e or "qkv" not in e2e:
        return []
    lines = []
    for k, what in (("qkv", "kernels cached"), ("qkv_off", "QKV_NUMBA=0")):
        r = e2e[k]
        lines.append(f"end to end (fresh processes), qkv {what} vs transformers: "
                     + ("identical" if r["tokens_identical_to_hf"] else f"DIFFERENT (first at {r['first_mismatch']})"))
    return lines
