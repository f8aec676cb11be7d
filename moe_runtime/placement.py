"""Expert placement on the device: phys_to_log, derived log_to_phys and replica counts, replica choice.

Slots are uniform per rank: S = world * slots_per_rank, and slot s lives on rank s // slots_per_rank.
The device tensors are allocated once; `update` copies a new placement into them in place, so a
captured CUDA graph that reads them stays valid across a live switch.
"""

from __future__ import annotations

import numpy as np
import torch

from balancerd.placement import (
    PlacementError,
    Topology,
    initial_placement,
    replica_counts,
    validate_placement,
)


def derive(phys_to_log: np.ndarray, experts: int, max_replicas: int) -> tuple[np.ndarray, np.ndarray]:
    """log_to_phys [L, E, max_replicas] (slots in ascending order, -1 padded) and replicas [L, E]."""
    layers, slots = phys_to_log.shape
    rows = np.arange(layers)[:, None]
    replicas = np.zeros((layers, experts), np.int32)
    np.add.at(replicas, (np.broadcast_to(rows, phys_to_log.shape), phys_to_log), 1)
    if replicas.max(initial=0) > max_replicas:
        raise PlacementError(f"an expert has {replicas.max()} replicas; "
                             f"this runtime's placement holds at most {max_replicas}")
    order = np.argsort(phys_to_log, axis=1, kind="stable")
    owner = np.take_along_axis(phys_to_log, order, axis=1)
    starts = np.cumsum(replicas, axis=1) - replicas
    nth = np.arange(slots)[None, :] - np.take_along_axis(starts, owner, axis=1)
    log_to_phys = np.full((layers, experts, max_replicas), -1, np.int32)
    log_to_phys[np.broadcast_to(rows, order.shape), owner, nth] = order
    return log_to_phys, replicas


def choose_replicas(ids: torch.Tensor, log_to_phys: torch.Tensor, replicas: torch.Tensor,
                    offset: int = 0) -> torch.Tensor:
    """Physical slot [T, k] (int64) for each assignment of one layer, without a host sync.

    The n-th assignment (in token-major order) of an expert with r replicas goes to replica
    (n + offset) % r, so each expert's tokens spread evenly; the runtime passes offset = rank so
    that ranks start on different replicas.
    """
    flat = ids.reshape(-1)
    n = flat.numel()
    # A radix sort makes a pass per key byte: int16 keys take 2 passes where int64 ids take 8.
    keys = flat.to(torch.int16) if log_to_phys.shape[0] <= torch.iinfo(torch.int16).max else flat
    ranked, order = torch.sort(keys, stable=True)
    nth = torch.empty_like(flat)  # an assignment's rank among its expert's: position - its run's start
    nth[order] = torch.arange(n, device=ids.device) - torch.searchsorted(ranked, ranked)
    choice = (nth + offset) % replicas[flat]
    return log_to_phys[flat, choice].long().view(ids.shape)


class RuntimePlacement:
    """The placement the runtime serves: device tensors preallocated, updated in place, versioned."""

    def __init__(self, phys_to_log: np.ndarray, experts: int, slots_per_rank: int,
                 device: torch.device | str = "cpu", version: int = 0, max_replicas: int | None = None):
        if np.ndim(phys_to_log) != 2:
            raise PlacementError(f"phys_to_log must be [layers, slots], got shape {np.shape(phys_to_log)}")
        layers, slots = np.shape(phys_to_log)
        if slots_per_rank < 1 or slots % slots_per_rank:
            raise PlacementError(f"{slots} slots do not divide into ranks of {slots_per_rank} slots")
        self.layers, self.slots, self.experts = layers, slots, experts
        self.slots_per_rank = slots_per_rank
        self.world = slots // slots_per_rank
        self.max_replicas = max_replicas if max_replicas is not None else max(1, slots - experts + 1)
        self.phys_to_log = torch.empty((layers, slots), dtype=torch.int32, device=device)
        self.log_to_phys = torch.empty((layers, experts, self.max_replicas), dtype=torch.int32, device=device)
        self.replicas = torch.empty((layers, experts), dtype=torch.int32, device=device)
        self.update(phys_to_log, version)

    @classmethod
    def initial(cls, layers: int, experts: int, world: int, slots_per_rank: int,
                device: torch.device | str = "cpu") -> RuntimePlacement:
        """The daemon's starting placement for this shape (version 0)."""
        topo = Topology(gpus=world, slots=world * slots_per_rank)
        return cls(initial_placement(layers, experts, topo), experts, slots_per_rank, device)

    def check(self, phys_to_log: np.ndarray) -> np.ndarray:
        """Raise PlacementError unless this runtime can serve `phys_to_log`; returns it as int32."""
        table = np.asarray(phys_to_log)
        if table.shape != (self.layers, self.slots):
            raise PlacementError(f"phys_to_log has shape {table.shape}, this runtime serves {self.layers} "
                                 f"layers x {self.slots} slots ({self.world} ranks x {self.slots_per_rank})")
        if not np.issubdtype(table.dtype, np.integer):
            raise PlacementError(f"phys_to_log must hold integers, got {table.dtype}")
        topo = Topology(gpus=self.world, slots=self.slots)
        validate_placement(table, self.experts, topo, layers=self.layers)
        most = replica_counts(table, self.experts).max()
        if most > self.max_replicas:
            raise PlacementError(f"an expert has {most} replicas; "
                                 f"this runtime holds at most {self.max_replicas}")
        return table.astype(np.int32)

    def update(self, phys_to_log: np.ndarray, version: int) -> None:
        """Validate `phys_to_log` and copy it (and what derives from it) into the device tensors."""
        self._write(self.check(phys_to_log), list(range(self.layers)))
        self.version = version

    def update_layers(self, layers: list[int], rows: np.ndarray) -> None:
        """Switch only `layers` to `rows` ([len(layers), S]), in place; the caller sets the version
        once every layer of a plan has switched."""
        table = self.host.copy()
        table[layers] = rows
        self._write(self.check(table), layers)

    def _write(self, table: np.ndarray, layers: list[int]) -> None:
        log_to_phys, replicas = derive(table[layers], self.experts, self.max_replicas)
        index = torch.tensor(layers, dtype=torch.int64, device=self.phys_to_log.device)
        for dst, src in ((self.phys_to_log, table[layers]), (self.log_to_phys, log_to_phys),
                         (self.replicas, replicas)):
            dst.index_copy_(0, index, torch.from_numpy(src).to(dst.device))
        self.host = table

    def local_experts(self, layer: int, rank: int) -> np.ndarray:
        """Logical expert held by each of `rank`'s slots in `layer`."""
        k = self.slots_per_rank
        return self.host[layer, rank * k:(rank + 1) * k]
