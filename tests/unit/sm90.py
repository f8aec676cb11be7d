"""Compile Triton kernels for the H200 (sm_90a) on a machine without a GPU: what the JIT would build there.

Catches what the interpreter cannot: type and layout errors of the real compiler, register spills
(ptxas -v) and shared memory over the limit.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SMEM_LIMIT = 227 * 1024  # bytes of shared memory a block may use on sm_90
PTXAS = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
AVAILABLE = PTXAS.exists()  # the wheel ships the CUDA backend and its ptxas


def compile_sm90(fn, signature: dict[str, str], constexprs: dict, aligned: list[str], num_warps: int,
                 num_stages: int = 3):
    """Compile for sm_90a as the JIT would (`aligned` arguments marked 16-divisible), assemble with ptxas -v.

    `signature` types the runtime arguments ("*bf16", "i32", ...); the rest are `constexprs`.
    Returns the compiled kernel and ptxas's report; fails where the kernel does not fit.
    """
    names = fn.arg_names
    src = ASTSource(fn=fn, signature={name: signature.get(name, "constexpr") for name in names},
                    constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs={(names.index(k),): [["tt.divisibility", 16]] for k in aligned})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx.write_text(kernel.asm["ptx"])
        log = subprocess.run([str(PTXAS), "--gpu-name", "sm_90a", "-v", str(ptx), "-o", str(cubin)],
                             capture_output=True, text=True, check=True).stderr
    assert " 0 bytes spill stores" in log, log
    assert kernel.metadata.shared <= SMEM_LIMIT, f"{kernel.metadata.shared} bytes of shared memory"
    return kernel, log
