"""Dispatch token rows to the ranks holding their experts, and combine the results back.

Each token goes once to each destination rank, with the local slot ids and weights it needs
there, in one all-to-all (the metadata rides at the end of each row); that rank returns one
weighted-sum vector per row. Exact mode exchanges counts first and reads the split sizes on the
host (the forward path's one sync); capacity mode sends fixed, padded splits and never syncs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kernels.permute import combine as combine_rows
from kernels.permute import drop_overflow, pack, route_rows, unpack
from moe_runtime.config import DispatchConfig
from moe_runtime.group import EPGroup


class Received(NamedTuple):
    x: torch.Tensor                # [R, H] rows for this rank's slots (a view into the received buffer)
    slots: torch.Tensor            # [R, k] int32 local slot ids, -1 unused
    weights: torch.Tensor          # [R, k] float32
    slot_sizes: list[int] | None   # exact mode: assignments per local slot, on the host
    dropped: torch.Tensor | None   # 0-d int64 assignments dropped at the source; None where none can be


class ReturnPath(NamedTuple):
    result: torch.Tensor           # [W, T] int32 sent row whose result comes back to each token, -1 none
    send_splits: list[int] | None  # rows sent to each rank (exact mode)
    recv_splits: list[int] | None  # rows received from each rank (exact mode)


def dispatch(x: torch.Tensor, phys: torch.Tensor, weights: torch.Tensor, group: EPGroup, slots_per_rank: int,
             config: DispatchConfig) -> tuple[Received, ReturnPath]:
    """Send x [T, H] to the physical slots phys [T, k] chosen for its assignments (weights [T, k])."""
    world, k = group.world, slots_per_rank
    tokens, top_k = phys.shape
    dest, local = phys // k, phys % k
    if config.mode == "capacity":
        capacity = config.capacity(tokens, top_k, world * k)
        dropped = None  # a slot never receives more than `tokens` assignments
        if capacity < tokens:
            keep, dropped = drop_overflow(phys, weights, capacity)
            dest = torch.where(keep, dest, -1)
        routes = route_rows(dest, world, padded=True)
        buf = pack(x, dest, local, weights, routes.send, world * tokens)
        rx, slots, w = unpack(group.all_to_all(buf), x.shape[1], top_k)
        return (Received(rx, slots, w, None, dropped),
                ReturnPath(routes.result, None, None))

    routes = route_rows(dest, world, padded=False)
    per_slot = torch.zeros(world * k, dtype=torch.int64, device=x.device)
    per_slot.index_add_(0, phys.reshape(-1), torch.ones(phys.numel(), dtype=torch.int64, device=x.device))
    counts = torch.cat([routes.per_rank.unsqueeze(1), per_slot.view(world, k)], 1)  # [W, 1 + K]
    recv_counts = group.all_to_all(counts)
    host = torch.cat([counts[:, 0], recv_counts.reshape(-1)]).cpu()  # the one host sync
    send_splits = host[:world].tolist()
    recv_host = host[world:].view(world, 1 + k)
    recv_splits = recv_host[:, 0].tolist()
    buf = pack(x, dest, local, weights, routes.send, sum(send_splits))
    rx, slots, w = unpack(group.all_to_all(buf, recv_splits, send_splits), x.shape[1], top_k)
    slot_sizes = recv_host[:, 1:].sum(0).tolist()  # host tensor from the sync above: no second sync
    return (Received(rx, slots, w, slot_sizes, None),
            ReturnPath(routes.result, send_splits, recv_splits))


def combine(y: torch.Tensor, path: ReturnPath, group: EPGroup, tokens: int) -> torch.Tensor:
    """Return the rows' results y [R, H] to their source ranks and sum them per token: [tokens, H] float32."""
    if path.result.shape[1] != tokens:
        raise ValueError(f"the return path is for {path.result.shape[1]} tokens, not {tokens}")
    back = group.all_to_all(y, path.send_splits, path.recv_splits)
    return combine_rows(back, path.result)
