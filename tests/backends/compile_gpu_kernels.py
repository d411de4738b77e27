"""Compile the Triton kernels for an NVIDIA GPU without one: `python compile_gpu_kernels.py [arch]`.

Legend: D head dim, BM x BN a tile, G = Hq // Hkv (GP heads sharing a forward program).

Run in a process without TRITON_INTERPRET (the kernels must be defined for the compiler, not the
interpreter). Each variant goes through Triton's whole pipeline (TTIR, TTGIR, LLVM IR, PTX and, with
the bundled ptxas, a cubin) for `GPUTarget("cuda", arch, 32)`: what the interpreter cannot check
(types, layouts, constexpr branches, register and shared-memory limits) fails here. Prints one line
per variant and exits 1 if any failed.
"""

from __future__ import annotations

import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run me without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from qkv.kernels.gpu import attention as A  # noqa: E402
from qkv.kernels.gpu import decode as Dk  # noqa: E402

FLOATS = {"sm_scale", "cap", "c_hi", "c_lo"}
F32_PTRS = {"LSE", "SLOPES", "REL", "DELTA", "LSUM"}
I32_PTRS = {"FCNT", "FIDX", "PCNT", "PIDX", "SLOT", "TFCNT", "TFIDX", "TPCNT", "TPIDX", "LO", "HI", "IDS", "BITS"}
I64_PTRS = {"T", "LENS"}
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}   # bytes a block may use
DATA_PTRS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "BIAS"}


def signature(kernel, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for p in kernel.params:
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
        elif name in DATA_PTRS:
            sig[name] = f"*{dtype}"
        elif name in F32_PTRS:
            sig[name] = "*fp32"
        elif name in I32_PTRS:
            sig[name] = "*i32"
        elif name in I64_PTRS:
            sig[name] = "*i64"
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    missing = [p.name for p in kernel.params if p.is_constexpr and p.name not in constexprs]
    assert not missing, f"constexprs not given: {missing}"
    return sig


def compile_one(kernel, dtype, constexprs, arch, num_warps=4, num_stages=2):
    src = ASTSource(fn=kernel, signature=signature(kernel, dtype, constexprs), constexprs=constexprs)
    out = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                         options={"num_warps": num_warps, "num_stages": num_stages})
    assert out.asm.get("cubin"), "no cubin"
    shared = out.metadata.shared
    assert shared <= SHARED_LIMIT.get(arch, 99 * 1024), f"{shared} bytes of shared memory"
    return out


def _block(n):
    return max(16, triton.next_power_of_2(n))


def variants():
    """(name, kernel, dtype, constexprs, warps, stages) of the attention and decode kernels."""
    mods_none = dict(ALIBI=0, HAS_REL=False, HAS_BIAS=False, SOFTCAP=False)
    mods_all = dict(ALIBI=1, HAS_REL=True, HAS_BIAS=True, SOFTCAP=True)
    out = []
    for dtype, D, mask, G, mods, even in [("bf16", 128, 1, 1, mods_none, True), ("bf16", 64, 1, 4, mods_none, False),
                                          ("fp16", 80, 7, 2, mods_all, False), ("fp32", 40, 4, 1, mods_all, True),
                                          ("bf16", 256, 2, 1, dict(mods_none, ALIBI=2), True)]:
        tdt = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
        import torch

        f = A.forward_config(D, getattr(torch, tdt))
        b = A.backward_config(D, getattr(torch, tdt))
        common = dict(D=D, BD=_block(D), BDV=_block(D), MASK=mask, EVEN_K=even, UPCAST=False, **mods)
        gp = G if G > 1 else 1
        out.append((f"fwd {dtype} D={D} mask={mask} G={G}", A._fwd_kernel, dtype,
                    dict(common, DV=D, G=G, GP=gp, P=f.block_m // gp, BM=f.block_m, BN=f.block_n),
                    f.num_warps, f.num_stages))
        out.append((f"dkdv {dtype} D={D} mask={mask}", A._bwd_dkdv_kernel, dtype,
                    dict(common, DV_=D, G=G, BM=b.block_m, BN=b.block_n), b.num_warps, b.num_stages))
        out.append((f"dq {dtype} D={D} mask={mask}", A._bwd_dq_kernel, dtype,
                    dict(common, DV=D, G=G, BM=b.block_m, BN=b.block_n), b.num_warps, b.num_stages))
    for dtype, D, splits in [("bf16", 128, 4), ("fp16", 64, 1), ("fp32", 80, 2), ("bf16", 256, 1)]:
        bd = _block(D)
        out.append((f"decode {dtype} D={D} splits={splits}", Dk._decode_kernel, dtype,
                    dict(D=D, BLOCK_M=16, BLOCK_N=64, BLOCK_D=bd, SPLITS=splits, UPCAST=False, IEEE=dtype == "fp32",
                         NEGATE=False, ROUND_OUT=False), 4 if bd <= 64 else 8, 2))
    return out


def main(arch: int) -> int:
    failed = 0
    for name, kernel, dtype, constexprs, warps, stages in variants():
        t0 = time.perf_counter()
        try:
            done = compile_one(kernel, dtype, constexprs, arch, warps, stages)
            print(f"ok   sm_{arch} {name}: {done.metadata.shared} bytes shared "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
        except Exception as exc:  # noqa: BLE001 - every failure is reported
            failed += 1
            print(f"FAIL sm_{arch} {name}: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
