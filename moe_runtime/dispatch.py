"""Dispatch token rows to the ranks holding their experts, and combine the results back.

Each token goes once to each destination rank, with the local slot ids and weights it needs
there; that rank returns one weighted-sum vector per row. Exact mode exchanges counts first and
reads the split sizes on the host (the forward path's one sync); capacity mode sends fixed,
padded splits and never syncs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kernels.permute import Rows, pack_capacity, pack_exact, rank_mask
from kernels.permute import combine as combine_rows
from moe_runtime.config import DispatchConfig
from moe_runtime.group import EPGroup


class Received(NamedTuple):
    x: torch.Tensor                # [R, H] rows for this rank's slots
    slots: torch.Tensor            # [R, k] int32 local slot ids, -1 unused
    weights: torch.Tensor          # [R, k] float32
    slot_sizes: list[int] | None   # exact mode: assignments per local slot, on the host
    received: torch.Tensor         # [K] int64 assignments per local slot
    dropped: torch.Tensor | None   # capacity mode: 0-d int64 assignments dropped at the source


class ReturnPath(NamedTuple):
    token: torch.Tensor            # [N] source token of each sent row (tokens for padding)
    send_splits: list[int] | None  # rows sent to each rank (exact mode)
    recv_splits: list[int] | None  # rows received from each rank (exact mode)


def _send(rows: Rows, group: EPGroup, out_splits: list[int] | None, in_splits: list[int] | None):
    x = group.all_to_all(rows.x, out_splits, in_splits)
    k = rows.slots.shape[1]
    meta = group.all_to_all(torch.cat([rows.slots, rows.weights.view(torch.int32)], 1), out_splits, in_splits)
    return x, meta[:, :k], meta[:, k:].view(torch.float32)


def dispatch(x: torch.Tensor, phys: torch.Tensor, weights: torch.Tensor, group: EPGroup, slots_per_rank: int,
             config: DispatchConfig) -> tuple[Received, ReturnPath]:
    """Send x [T, H] to the physical slots phys [T, k] chosen for its assignments (weights [T, k])."""
    world, k = group.world, slots_per_rank
    dest, local = phys // k, phys % k
    if config.mode == "capacity":
        capacity = config.capacity(x.shape[0], phys.shape[1], world)
        rows, dropped = pack_capacity(x, dest, local, weights, world, capacity)
        rx, slots, w = _send(rows, group, None, None)
        received = torch.zeros(k + 1, dtype=torch.int64, device=x.device)
        received.index_add_(0, torch.where(slots < 0, k, slots).reshape(-1).long(),
                            torch.ones(slots.numel(), dtype=torch.int64, device=x.device))
        return Received(rx, slots, w, None, received[:k], dropped), ReturnPath(rows.token, None, None)

    mask = rank_mask(dest, world)
    per_slot = torch.zeros(world * k, dtype=torch.int64, device=x.device)
    per_slot.index_add_(0, phys.reshape(-1), torch.ones(phys.numel(), dtype=torch.int64, device=x.device))
    counts = torch.cat([mask.sum(1, keepdim=True), per_slot.view(world, k)], 1)  # [W, 1 + K]
    recv_counts = group.all_to_all(counts)
    host = torch.cat([counts[:, 0], recv_counts.reshape(-1)]).cpu()  # the one host sync
    send_splits = host[:world].tolist()
    recv_host = host[world:].view(world, 1 + k)
    recv_splits = recv_host[:, 0].tolist()
    rows = pack_exact(x, dest, local, weights, mask, sum(send_splits))
    rx, slots, w = _send(rows, group, recv_splits, send_splits)
    received = recv_counts[:, 1:].sum(0)
    return (Received(rx, slots, w, recv_host[:, 1:].sum(0).tolist(), received, None),
            ReturnPath(rows.token, send_splits, recv_splits))


def combine(y: torch.Tensor, path: ReturnPath, group: EPGroup, tokens: int) -> torch.Tensor:
    """Return the rows' results y [R, H] to their source ranks and sum them per token: [tokens, H] float32."""
    back = group.all_to_all(y, path.send_splits, path.recv_splits)
    return combine_rows(back, path.token, tokens)
