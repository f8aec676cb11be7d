"""Moving expert weights between ranks when a new placement is applied, a few layers per step.

The schedule is a pure function of the old and new placement, so every rank computes the same one
without talking. Each step migrates one chunk of layers: a rank packs the experts it must send to
each peer into one buffer per peer, receives into a staging buffer (the only memory beyond the
resident slots, one chunk's worth), and only after every transfer of the chunk has completed copies
the staged experts into their slots and switches those layers to the new placement. A slot that is
a source for another rank in the same chunk is therefore read before it is overwritten.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from moe_runtime.group import EPGroup


@dataclass(frozen=True)
class Move:
    """Expert ``expert`` of ``layer`` goes from rank ``src``'s local slot ``src_slot`` into ``dst``'s
    ``dst_slot``."""

    layer: int
    expert: int
    src: int
    src_slot: int
    dst: int
    dst_slot: int


def schedule(old: np.ndarray, new: np.ndarray, slots_per_rank: int) -> dict[int, list[Move]]:
    """The moves per layer (only layers that change). A rank that already holds the expert copies it
    locally; otherwise the old holder with the fewest sends so far in this layer sends it (ties: lowest
    rank), which spreads the outgoing traffic of a hot expert over its replicas."""
    k = slots_per_rank
    out: dict[int, list[Move]] = {}
    for layer in np.flatnonzero((old != new).any(axis=1)):
        row_old, row_new = old[layer], new[layer]
        holders: dict[int, list[int]] = {}
        for s, e in enumerate(row_old):
            holders.setdefault(int(e), []).append(s)
        sends = np.zeros(len(row_old) // k, dtype=np.int64)
        moves = []
        for s in np.flatnonzero(row_old != row_new):
            e, dst = int(row_new[s]), int(s) // k
            slots = holders[e]
            local = [h for h in slots if h // k == dst]
            src = local[0] if local else min(slots, key=lambda h: (sends[h // k], h))
            if not local:
                sends[src // k] += 1
            moves.append(Move(int(layer), e, src // k, src % k, dst, int(s) % k))
        out[int(layer)] = moves
    return out


def chunk_layers(moves: dict[int, list[Move]], layers_per_step: int) -> list[list[int]]:
    """The changed layers in ascending order, ``layers_per_step`` at a time."""
    layers = sorted(moves)
    return [layers[i:i + layers_per_step] for i in range(0, len(layers), layers_per_step)]


@dataclass
class ChunkResult:
    layers: list[int]
    bytes_sent: int
    bytes_received: int
    seconds: float


def _flat(gate_up: torch.Tensor, down: torch.Tensor, slot: int) -> torch.Tensor:
    return torch.cat([gate_up[slot].reshape(-1), down[slot].reshape(-1)])


def migrate_chunk(stack, moves: dict[int, list[Move]], layers: list[int], group: EPGroup) -> ChunkResult:
    """Move the experts of ``layers`` and refill this rank's slots; every rank calls it at the same step.

    ``stack.layers[l]`` must expose ``w_gate_up`` [K, 2I, H] and ``w_down`` [K, H, I].
    """
    start = time.perf_counter()
    me = group.rank
    outgoing: dict[int, list[Move]] = {}
    incoming: dict[int, list[Move]] = {}
    for layer in layers:
        for m in moves[layer]:
            if m.src == me and m.dst != me:
                outgoing.setdefault(m.dst, []).append(m)
            if m.dst == me:
                incoming.setdefault(m.src, []).append(m)
    ref = stack.layers[layers[0]]
    per_expert = ref.w_gate_up[0].numel() + ref.w_down[0].numel()
    dtype, device = ref.w_gate_up.dtype, ref.w_gate_up.device
    ops, staged, keep_alive = [], {}, []
    for peer, ms in sorted(outgoing.items()):
        buf = torch.stack([_flat(stack.layers[m.layer].w_gate_up, stack.layers[m.layer].w_down, m.src_slot)
                           for m in ms])
        keep_alive.append(buf)
        ops.append(dist.P2POp(dist.isend, buf, dist.get_global_rank(group.group, peer), group.group))
    for peer, ms in sorted(incoming.items()):
        if peer == me:
            staged[peer] = torch.stack([_flat(stack.layers[m.layer].w_gate_up, stack.layers[m.layer].w_down,
                                              m.src_slot) for m in ms])
            continue
        buf = torch.empty((len(ms), per_expert), dtype=dtype, device=device)
        staged[peer] = buf
        ops.append(dist.P2POp(dist.irecv, buf, dist.get_global_rank(group.group, peer), group.group))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    with torch.no_grad():
        for peer, ms in incoming.items():
            for row, m in zip(staged[peer], ms, strict=True):
                layer = stack.layers[m.layer]
                n = layer.w_gate_up[0].numel()
                layer.w_gate_up[m.dst_slot].copy_(row[:n].view_as(layer.w_gate_up[m.dst_slot]))
                layer.w_down[m.dst_slot].copy_(row[n:].view_as(layer.w_down[m.dst_slot]))
    itemsize = torch.empty((), dtype=dtype).element_size()
    sent = sum(len(ms) for ms in outgoing.values()) * per_expert * itemsize
    received = sum(len(ms) for p, ms in incoming.items() if p != me) * per_expert * itemsize
    return ChunkResult(layers, sent, received, time.perf_counter() - start)
