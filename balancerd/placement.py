"""Placement data: topology, validation and load metrics (numpy only).

A placement is ``phys_to_log[L, S]``: the logical expert held by each physical slot of each
layer. Slots are numbered GPU by GPU; the first ``S % G`` GPUs carry one extra slot. A replica
carries its expert's load divided by the expert's replica count.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

# Relative floor for the minimum in imbalance_ratio: a GPU with no load reads as 1e9x.
_RATIO_FLOOR = 1e-9


class PlacementError(ValueError):
    """A placement (or a request to build one) that cannot be used; the message says why."""


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


@dataclass(frozen=True)
class Topology:
    """GPUs, physical expert slots (per layer) and nodes; GPUs are grouped into nodes contiguously."""

    gpus: int
    slots: int
    nodes: int = 1

    def __post_init__(self) -> None:
        for name in ("gpus", "slots", "nodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise PlacementError(f"Topology.{name} must be an int, got {value!r}")
        if self.gpus < 1:
            raise PlacementError(f"Topology.gpus must be >= 1, got {self.gpus}")
        if self.slots < 1:
            raise PlacementError(f"Topology.slots must be >= 1, got {self.slots}")
        if self.nodes < 1 or self.gpus % self.nodes:
            raise PlacementError(
                f"Topology.nodes must be >= 1 and divide gpus={self.gpus}, got {self.nodes}"
            )

    @cached_property
    def slots_per_gpu(self) -> np.ndarray:
        """[G] slot count of each GPU: S // G, plus one on the first S % G GPUs."""
        base, extra = divmod(self.slots, self.gpus)
        return _frozen(base + (np.arange(self.gpus) < extra).astype(np.int64))

    @cached_property
    def first_slot(self) -> np.ndarray:
        """[G] index of each GPU's first slot."""
        return _frozen(np.concatenate(([0], np.cumsum(self.slots_per_gpu)[:-1])))

    @cached_property
    def gpu_of_slot(self) -> np.ndarray:
        """[S] the GPU holding each slot."""
        return _frozen(np.repeat(np.arange(self.gpus), self.slots_per_gpu))

    @cached_property
    def node_of_gpu(self) -> np.ndarray:
        """[G] the node holding each GPU."""
        return _frozen(np.arange(self.gpus) // (self.gpus // self.nodes))


def validate_placement(
    phys_to_log: np.ndarray, experts: int, topo: Topology, layers: int | None = None
) -> None:
    """Raise PlacementError unless ``phys_to_log`` is an [L, S] integer placement in which every
    one of ``experts`` logical experts has at least one replica in every layer."""
    p = np.asarray(phys_to_log)
    if p.ndim != 2 or p.shape[1] != topo.slots:
        raise PlacementError(f"placement shape {p.shape} is not [layers, {topo.slots} slots]")
    if layers is not None and p.shape[0] != layers:
        raise PlacementError(f"placement has {p.shape[0]} layers, expected {layers}")
    if not np.issubdtype(p.dtype, np.integer):
        raise PlacementError(f"placement dtype {p.dtype} is not integral")
    if experts < 1:
        raise PlacementError(f"experts must be >= 1, got {experts}")
    bad = (p < 0) | (p >= experts)
    if bad.any():
        layer, slot = np.argwhere(bad)[0]
        raise PlacementError(
            f"layer {layer} slot {slot} holds expert {p[layer, slot]}, outside [0, {experts})"
        )
    missing = replica_counts(p, experts) == 0
    if missing.any():
        layer, expert = np.argwhere(missing)[0]
        raise PlacementError(f"layer {layer}: expert {expert} has no replica")


def replica_counts(phys_to_log: np.ndarray, experts: int) -> np.ndarray:
    """[L, E] number of slots holding each expert."""
    p = np.asarray(phys_to_log, dtype=np.int64)
    layers = p.shape[0]
    flat = (np.arange(layers)[:, None] * experts + p).ravel()
    return np.bincount(flat, minlength=layers * experts).reshape(layers, experts)


def slot_loads(loads: np.ndarray, phys_to_log: np.ndarray) -> np.ndarray:
    """[L, S] load carried by each slot: its expert's load over the expert's replica count."""
    w = np.asarray(loads, dtype=np.float64)
    p = np.asarray(phys_to_log)
    counts = replica_counts(p, w.shape[1])
    return np.take_along_axis(w, p, axis=1) / np.take_along_axis(counts, p, axis=1)


def sum_per_gpu(per_slot: np.ndarray, topo: Topology) -> np.ndarray:
    """[L, G] sums of an [L, S] per-slot quantity over each GPU's slots."""
    out = np.zeros((per_slot.shape[0], topo.gpus), dtype=np.result_type(per_slot, np.float64))
    filled = topo.slots_per_gpu > 0
    out[:, filled] = np.add.reduceat(per_slot, topo.first_slot[filled], axis=1)
    return out


def gpu_loads(loads: np.ndarray, phys_to_log: np.ndarray, topo: Topology) -> np.ndarray:
    """[L, G] load on each GPU under a placement."""
    return sum_per_gpu(slot_loads(loads, phys_to_log), topo)


def contiguous_gpu_loads(loads: np.ndarray, gpus: int) -> np.ndarray:
    """[L, G] GPU loads with expert e alone on GPU e * G // E (the usual static EP layout)."""
    w = np.asarray(loads, dtype=np.float64)
    experts = w.shape[1]
    owner = np.zeros((experts, gpus))
    owner[np.arange(experts), np.arange(experts) * gpus // experts] = 1.0
    return w @ owner


def balancedness(gpu_load: np.ndarray) -> np.ndarray:
    """[L] max GPU load over mean GPU load (1.0 is perfect; an all-zero layer reads 1.0)."""
    g = np.asarray(gpu_load, dtype=np.float64)
    mean = g.mean(axis=1)
    top = g.max(axis=1)
    return np.divide(top, mean, out=np.ones_like(mean), where=mean > 0)


def imbalance_ratio(gpu_load: np.ndarray) -> np.ndarray:
    """[L] max GPU load over min GPU load; an idle GPU reads 1e9 and an all-zero layer 1.0."""
    g = np.asarray(gpu_load, dtype=np.float64)
    top = g.max(axis=1)
    low = np.maximum(g.min(axis=1), top * _RATIO_FLOOR)  # top * floor underflows for subnormal loads
    out = np.where(top > 0, 1 / _RATIO_FLOOR, 1.0)
    return np.divide(top, low, out=out, where=low > 0)


def count_moves(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """[L] number of slots whose expert differs between two placements of the same shape."""
    a, b = np.asarray(old), np.asarray(new)
    if a.shape != b.shape:
        raise PlacementError(f"cannot compare placements of shapes {a.shape} and {b.shape}")
    return (a != b).sum(axis=1)


def initial_placement(layers: int, experts: int, topo: Topology) -> np.ndarray:
    """[L, S] int32 static placement: experts in order, E/G to a GPU (expert e on about GPU
    e * G // E), each GPU's remaining slots holding extra replicas spread evenly over the
    experts. An extra replica sits on another GPU than its expert's first copy wherever the
    slot counts allow it."""
    if experts < 1 or topo.slots < experts:
        raise PlacementError(f"{topo.slots} slots cannot hold {experts} experts (need 1 <= E <= S)")
    return np.tile(_initial_row(experts, topo), (layers, 1)).astype(np.int32)


def _initial_row(experts: int, topo: Topology) -> np.ndarray:
    caps = topo.slots_per_gpu
    bounds = np.concatenate(([0], np.cumsum(caps))) * experts // topo.slots
    firsts = np.diff(bounds)  # first copies on each GPU, proportional to its slots
    extra_slots = np.concatenate(
        [topo.first_slot[g] + np.arange(firsts[g], caps[g]) for g in range(topo.gpus)]
    )
    n_extra = topo.slots - experts
    row = np.empty(topo.slots, dtype=np.int64)
    is_first = np.ones(topo.slots, dtype=bool)
    is_first[extra_slots] = False
    row[is_first] = np.arange(experts)
    if n_extra:
        picks = np.arange(n_extra) % experts if n_extra > experts else np.arange(n_extra) * experts // n_extra
        # Half a turn round the GPUs keeps an extra replica off its expert's first GPU.
        row[extra_slots] = np.roll(np.sort(picks), n_extra // 2)
        separate_copies(row, topo, experts)
    return row


def separate_copies(row: np.ndarray, topo: Topology, experts: int, carry: np.ndarray | None = None) -> None:
    """Swap slots of one layer's placement ``row`` [S], in place, until no GPU holds two copies
    of an expert, as far as swaps that reduce the repeats can get. ``carry`` [S] (for example
    slot loads) is swapped alongside, and among equally good swaps the one that changes it
    least is taken."""
    gpus, gos = topo.gpus, topo.gpu_of_slot
    for _ in range(topo.slots):
        count = np.bincount(gos * experts + row, minlength=gpus * experts).reshape(gpus, experts)
        repeated = np.flatnonzero(count[gos, row] > 1)
        if not repeated.size:
            return
        s = repeated[0]
        g, e = gos[s], row[s]
        # Net change in repeated copies if slots s and t trade experts.
        change = (count[g, row] > 0).astype(int) + (count[gos, e] > 0) - 1 - (count[gos, row] > 1)
        change[(gos == g) | (row == e)] = 1
        if change.min() >= 0:
            return
        ok = np.flatnonzero(change == change.min())
        t = ok[0] if carry is None else ok[np.argmin(np.abs(carry[ok] - carry[s]))]
        row[[s, t]] = row[[t, s]]
        if carry is not None:
            carry[[s, t]] = carry[[t, s]]
