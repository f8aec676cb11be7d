"""Local expert compute: SwiGLU per slot over the rows a rank received (one swappable entry point)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from kernels.expert_ffn import GateUp, grouped_down, grouped_gate_up, select_backend, swiglu
from kernels.permute import SlotCount, SlotGroups, count_slots, group_by_slot, slot_order, unpermute


def run_experts_loop(x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, w_gate_up: torch.Tensor,
                     w_down: torch.Tensor, slot_sizes: list[int] | None = None) -> torch.Tensor:
    """The torch reference (and the CPU path): a loop over the slots.

    With `slot_sizes` each slot runs on exactly its rows. Without (capacity mode, no host sync) each
    slot runs on every row and unassigned rows get weight 0: K times the work.
    """
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    if slot_sizes is None:
        for s in range(w_gate_up.shape[0]):
            w = torch.where(slots == s, weights, 0.0).sum(-1, keepdim=True)
            out.addcmul_(swiglu(x, w_gate_up[s], w_down[s]).float(), w)
        return out.to(x.dtype)
    order = slot_order(slots, w_gate_up.shape[0])[:sum(slot_sizes)]
    row = order // slots.shape[1]
    parts = x[row].split(slot_sizes)
    y = torch.cat([swiglu(part, w_gate_up[s], w_down[s]) for s, part in enumerate(parts)])
    out.index_add_(0, row, y.float() * weights.reshape(-1)[order].unsqueeze(1))
    return out.to(x.dtype)


class ExpertsHalfway(NamedTuple):
    """`start_experts`' result, which `finish_experts` completes."""

    done: torch.Tensor | None        # the loop backend's whole result (it has no halves)
    gate_up: GateUp | None           # the grouped backends' first GEMM and activation
    groups: SlotGroups | None
    weights: torch.Tensor
    w_down: torch.Tensor
    dtype: torch.dtype
    count: SlotCount | None


def start_experts(x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, w_gate_up: torch.Tensor,
                  w_down: torch.Tensor, slot_sizes: list[int] | None = None, backend: str | None = None,
                  count: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> ExpertsHalfway:
    """`run_experts` up to its down projection (the grouped backends: sort, gate and up GEMM, activation),
    so that a caller can issue other work before `finish_experts`. The loop backend does it all here."""
    slots_here, inter = w_gate_up.shape[0], w_down.shape[2]
    assignments = slots.numel() if slot_sizes is None else sum(slot_sizes)
    backend = backend or select_backend(x, slots_here, inter, assignments, slot_sizes is not None)
    if backend == "loop":
        if count is not None:
            count_slots(slots, *count)
        done = run_experts_loop(x, slots, weights, w_gate_up, w_down, slot_sizes)
        return ExpertsHalfway(done, None, None, weights, w_down, x.dtype, None)
    groups = group_by_slot(slots, slots_here)
    gate_up = grouped_gate_up(x, groups, w_gate_up, backend, assignments)
    return ExpertsHalfway(None, gate_up, groups, weights, w_down, x.dtype,
                          None if count is None else SlotCount(slots, *count))


def finish_experts(half: ExpertsHalfway) -> torch.Tensor:
    """The down projection and each row's weighted sum: `run_experts`' result."""
    if half.done is not None:
        return half.done
    ys = grouped_down(half.gate_up, half.groups, half.w_down)
    return unpermute(ys, half.groups.pos, half.weights, half.dtype,
                     force_triton=half.gate_up.triton is not None, count=half.count)


def run_experts(x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, w_gate_up: torch.Tensor,
                w_down: torch.Tensor, slot_sizes: list[int] | None = None,
                backend: str | None = None, count: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                ) -> torch.Tensor:
    """[R, H] in x's dtype: each row's weighted sum of its local slots' SwiGLU outputs.

    x [R, H]; slots [R, k] local slot ids (-1 unused); weights [R, k] float32; w_gate_up [K, 2I, H];
    w_down [K, H, I]; `slot_sizes`: assignments per slot when known on the host (exact mode).
    `backend` ("loop", "triton", "grouped_mm") defaults to `kernels.expert_ffn.select_backend`'s
    choice: the loop on CPU. The grouped backends sort the assignments by slot on the device and never
    sync; "triton" on CPU tensors runs under the Triton interpreter (tests). `count` = (counts [K] int32,
    record flag or None): add the assignments per slot into counts (telemetry), inside the grouped
    backends' last kernel.
    """
    return finish_experts(start_experts(x, slots, weights, w_gate_up, w_down, slot_sizes, backend, count))
