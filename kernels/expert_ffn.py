"""Grouped SwiGLU over the local slots, and the choice of how to run it on a GPU.

Input: received rows x [R, H] and their assignments sorted by local slot (`kernels.permute.SlotGroups`:
segment offsets on the device). Output ys: one row per assignment in that order (rows past
offsets[-1] unspecified); `kernels.permute.unpermute` then forms each row's weighted sum.

Backends on a GPU: "triton" (kernels/expert_ffn_triton.py), "grouped_mm" (torch._grouped_mm on the
slot-major copy of x from `gather_rows`; bf16 on sm90+ only, where it runs without a host sync), and
"loop" (moe_runtime.experts' per-slot torch loop, which needs the slot sizes on the host to avoid
K-fold work). `select_backend` picks one by dtype and rows per slot; CPU tensors always take the loop.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from kernels.permute import SlotGroups, gather_rows

if TYPE_CHECKING:
    from kernels.expert_ffn_triton import TritonGateUp

BACKENDS = ("loop", "triton", "grouped_mm")
BACKEND_ENV = "BALANCERD_EXPERT_BACKEND"  # forces one backend on CUDA tensors (benchmarks, bisecting)

# bf16: the backend by rows per local slot (assignments / slots); the first bound >= the rows wins.
# From benchmarks/dispatch_gpu.py's FFN table; see docs/kernels.md.
BF16_BY_ROWS: tuple[tuple[float, str], ...] = ((64, "triton"), (math.inf, "grouped_mm"))


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate) * up), with gate_up [2I, H] holding the gate rows first, down [H, I]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def grouped_swiglu_reference(x: torch.Tensor, groups: SlotGroups, w_gate_up: torch.Tensor,
                             w_down: torch.Tensor) -> torch.Tensor:
    """Per-slot torch loop over the segments (reads the offsets on the host: a reference, not a fast path)."""
    ys = x.new_zeros((groups.rows.shape[0], x.shape[1]))
    bounds = groups.offsets.tolist()
    for s, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False)):
        if hi > lo:
            ys[lo:hi] = swiglu(x[groups.rows[lo:hi].long()], w_gate_up[s], w_down[s])
    return ys


def grouped_mm_available(x: torch.Tensor, hidden: int, inter: int) -> bool:
    """torch._grouped_mm exists and takes this without a fallback: bf16, 16-byte rows, sm90+ (or CPU)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != torch.bfloat16 or hidden % 8 or inter % 8:
        return False
    return not x.is_cuda or torch.cuda.get_device_capability(x.device) >= (9, 0)


def silu_mul(h: torch.Tensor, used: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU's activation silu(gate) * up of h = [gate | up] [R, 2I]: one Triton pass on CUDA (for the
    large batches of the grouped_mm backend; eager small batches keep torch's cheaper launches), which
    skips the rows from `used` (a 1-element device tensor: capacity mode's unused tail) on."""
    if h.is_cuda:
        from kernels.expert_ffn_triton import silu_mul_triton

        return silu_mul_triton(h, used)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def select_backend(x: torch.Tensor, slots: int, inter: int, assignments: int, host_sizes: bool) -> str:
    """The backend for `assignments` (a host bound) over `slots` local slots of intermediate size `inter`.

    CPU: "loop". BALANCERD_EXPERT_BACKEND overrides on CUDA. float32 takes the exact cuBLAS loop when
    the sizes are on the host and Triton (IEEE fp32 dots) otherwise; other non-bf16 dtypes take Triton;
    bf16 follows BF16_BY_ROWS, with Triton standing in where torch._grouped_mm is unavailable.
    """
    if not x.is_cuda:
        return "loop"
    forced = os.environ.get(BACKEND_ENV)
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={forced!r}: expected one of {BACKENDS}")
        if forced == "grouped_mm" and not grouped_mm_available(x, x.shape[1], inter):
            raise ValueError(f"{BACKEND_ENV}=grouped_mm: torch._grouped_mm cannot take {x.dtype} here")
        return forced
    if x.dtype == torch.float32 and host_sizes:
        return "loop"
    if x.dtype != torch.bfloat16:
        return "triton"
    rows = assignments / slots
    choice = next(backend for bound, backend in BF16_BY_ROWS if rows <= bound)
    return "triton" if choice == "grouped_mm" and not grouped_mm_available(x, x.shape[1], inter) else choice


class GateUp(NamedTuple):
    """The first half of grouped SwiGLU (`grouped_gate_up`), which `grouped_down` finishes."""

    h: torch.Tensor                  # [>= offsets[-1], I] silu(gate) * up of each sorted assignment
    triton: TritonGateUp | None      # the Triton backend's launch state (None: torch._grouped_mm)


def grouped_gate_up(x: torch.Tensor, groups: SlotGroups, w_gate_up: torch.Tensor, backend: str,
                    assignments: int | None = None) -> GateUp:
    """The gate and up projections with the activation: the first of `grouped_swiglu`'s two GEMMs, for a
    caller that issues other work between them (EPMoEStack's interleaved ranges)."""
    if backend == "triton":
        from kernels.expert_ffn_triton import gate_up_triton

        t = gate_up_triton(x, groups, w_gate_up, assignments)
        return GateUp(t.h, t)
    if backend != "grouped_mm":
        raise ValueError(f"grouped_swiglu backend must be 'triton' or 'grouped_mm', got {backend!r}")
    xs = gather_rows(x, groups, assignments)
    if xs.shape[0] == 0:
        return GateUp(xs.new_empty((0, w_gate_up.shape[1] // 2)), None)
    ends = groups.offsets[1:]
    h = torch._grouped_mm(xs, w_gate_up.transpose(1, 2), offs=ends)
    return GateUp(silu_mul(h, used=ends[-1:]), None)


def grouped_down(a: GateUp, groups: SlotGroups, w_down: torch.Tensor) -> torch.Tensor:
    """The down projection of `grouped_gate_up`'s result: ys, one row per sorted assignment."""
    if a.triton is not None:
        from kernels.expert_ffn_triton import down_triton

        return down_triton(a.triton, groups, w_down)
    if a.h.shape[0] == 0:
        return a.h.new_empty((0, w_down.shape[1]))
    return torch._grouped_mm(a.h, w_down.transpose(1, 2), offs=groups.offsets[1:])


def grouped_swiglu(x: torch.Tensor, groups: SlotGroups, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                   backend: str, assignments: int | None = None) -> torch.Tensor:
    """ys [>= offsets[-1], H]: swiglu of each sorted assignment's row with its slot's weights.

    backend "triton" or "grouped_mm" (the loop works on whole rows: moe_runtime.experts);
    `assignments`, a host bound on offsets[-1] (default R * k), sizes the grid and the buffers.
    """
    return grouped_down(grouped_gate_up(x, groups, w_gate_up, backend, assignments), groups, w_down)
