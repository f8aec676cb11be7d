"""Placement from scratch.

For each of two replica-size targets ``T`` near the mean GPU load, an expert gets
ceil(load / T) replicas and the spare slots replicate the coldest experts, which makes
fine-grained filler. The replicas are packed largest first in rounds of one per GPU: GPUs far
below the mean take the largest replicas left, the others the smallest, so a GPU holding a big
replica is topped up with the smallest ones. Per layer the target with the lowest peak wins,
and a few rounds of swaps between heavy and light GPUs level what is left.
"""

from __future__ import annotations

import numpy as np

from balancerd.placement import Topology, separate_copies, sum_per_gpu
from balancerd.planner.packing import pack, sorted_replicas
from balancerd.planner.replicas import REPLICA_SIZE_TARGETS, replica_plans
from balancerd.planner.swaps import swap_rounds

_SWAP_ROUNDS = 4
_SWAP_SPAN = 100


def from_scratch(w: np.ndarray, topo: Topology, floor: np.ndarray) -> np.ndarray:
    """[L, S] placement built from nothing; see the module docstring."""
    layers = w.shape[0]
    hot_first = np.argsort(-w, axis=1)
    ranked = np.take_along_axis(w, hot_first, axis=1)
    r = replica_plans(ranked, topo)
    level = np.tile(w.sum(axis=1) / min(topo.gpus, topo.slots), len(REPLICA_SIZE_TARGETS))
    k = len(REPLICA_SIZE_TARGETS)
    experts, sizes = sorted_replicas(np.tile(ranked, (k, 1)), r, np.tile(hot_first, (k, 1)))
    slot_e, slot_x = pack(experts, sizes, topo, level, w.shape[1])
    peaks = sum_per_gpu(slot_x, topo).max(axis=1).reshape(len(REPLICA_SIZE_TARGETS), layers)
    best = np.argmin(peaks, axis=0) * layers + np.arange(layers)
    slot_e, slot_x = slot_e[best], slot_x[best]
    _separate_replicas(slot_e, slot_x, topo, w.shape[1])
    swap_rounds(slot_e, slot_x, topo, floor * (1 + 1e-6), None, _SWAP_ROUNDS, _SWAP_SPAN)
    return slot_e


def _separate_replicas(slot_e: np.ndarray, slot_x: np.ndarray, topo: Topology, experts: int) -> None:
    """Move second copies of experts off GPUs, in place. Packing leaves them only where too few
    GPUs had room for all of an expert's replicas, so this handles a few layers one by one."""
    for layer in _layers_with_repeats(slot_e, topo):
        separate_copies(slot_e[layer], topo, experts, carry=slot_x[layer])


def _layers_with_repeats(slot_e: np.ndarray, topo: Topology) -> np.ndarray:
    """Layers in which some GPU holds two copies of one expert."""
    caps, first = topo.slots_per_gpu, topo.first_slot
    width = int(caps.max())
    at = np.minimum(first[:, None] + np.arange(width), topo.slots - 1)
    held = np.where(np.arange(width) < caps[:, None], slot_e[:, at], -1 - np.arange(width))
    held.sort(axis=2)
    return np.flatnonzero((held[..., 1:] == held[..., :-1]).any(axis=(1, 2)))
