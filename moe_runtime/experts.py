"""Local expert compute: SwiGLU per slot over the rows a rank received (one swappable entry point)."""

from __future__ import annotations

import torch

from kernels.expert_ffn import grouped_swiglu, select_backend, swiglu
from kernels.permute import SlotCount, count_slots, group_by_slot, slot_order, unpermute


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
    slots_here, inter = w_gate_up.shape[0], w_down.shape[2]
    assignments = slots.numel() if slot_sizes is None else sum(slot_sizes)
    backend = backend or select_backend(x, slots_here, inter, assignments, slot_sizes is not None)
    if backend == "loop":
        if count is not None:
            count_slots(slots, *count)
        return run_experts_loop(x, slots, weights, w_gate_up, w_down, slot_sizes)
    groups = group_by_slot(slots, slots_here)
    ys = grouped_swiglu(x, groups, w_gate_up, w_down, backend, assignments)
    return unpermute(ys, groups.pos, weights, x.dtype, force_triton=backend == "triton",
                     count=None if count is None else SlotCount(slots, *count))
