"""Local expert compute: SwiGLU per slot over the rows a rank received (one swappable entry point)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.permute import slot_order


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate) * up), with gate_up [2I, H] holding the gate rows first, down [H, I]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def run_experts(x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, w_gate_up: torch.Tensor,
                w_down: torch.Tensor, slot_sizes: list[int] | None = None) -> torch.Tensor:
    """[R, H] in x's dtype: each row's weighted sum of its local slots' SwiGLU outputs.

    x [R, H]; slots [R, k] local slot ids (-1 unused); weights [R, k]; w_gate_up [K, 2I, H];
    w_down [K, H, I]. With `slot_sizes` (assignments per slot, known on the host) each slot runs on
    exactly its rows. Without (capacity mode, no host sync) each slot runs on every row and
    unassigned rows get weight 0: K times the work, until a grouped kernel replaces this.
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
