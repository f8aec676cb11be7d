"""Replica counts: how many copies each expert gets, and the lower bound on the peak GPU load."""

from __future__ import annotations

import numpy as np

from balancerd.placement import Topology

# Replica-size targets tried from scratch, as fractions of the mean GPU load.
REPLICA_SIZE_TARGETS = (0.85, 0.97)
_BISECTION_STEPS = 10


def max_replicas(topo: Topology, experts: int) -> int:
    """One replica per GPU, unless there are more slots than that allows."""
    return max(topo.gpus, -(-topo.slots // experts))


def _replicas_needed(w: np.ndarray, size: np.ndarray, cap: int) -> np.ndarray:
    """[R, E] replicas needed to keep every replica at most ``size[R]`` (at least 1, at most cap)."""
    r = np.ceil(w / size[:, None])
    return np.clip(r, 1, cap, out=r)


def _smallest_feasible_size(w: np.ndarray, topo: Topology, low: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bracket the smallest largest-replica load that S slots allow: (infeasible, feasible) [R]."""
    cap = max_replicas(topo, w.shape[1])
    hi = np.maximum(w.max(axis=1), np.finfo(float).tiny)
    lo = np.minimum(low, hi)
    for _ in range(_BISECTION_STEPS):
        mid = np.sqrt(lo * hi)
        ok = _replicas_needed(w, mid, cap).sum(axis=1) <= topo.slots
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid)
    return lo, hi


def peak_floor(w: np.ndarray, topo: Topology) -> np.ndarray:
    """[L] lower bound on the largest GPU load: the mean over GPUs with slots, or the
    smallest largest replica the slots allow, whichever is larger."""
    floor = w.sum(axis=1) / min(topo.gpus, topo.slots)
    cap = max_replicas(topo, w.shape[1])
    positive = np.maximum(floor, np.finfo(float).tiny)
    tight = _replicas_needed(w, positive, cap).sum(axis=1) > topo.slots
    if tight.any():
        lo, _ = _smallest_feasible_size(w[tight], topo, positive[tight])
        floor[tight] = lo
    return floor


def replica_plans(ranked: np.ndarray, topo: Topology) -> np.ndarray:
    """[K * L, E] replica counts, one block of layers per target in REPLICA_SIZE_TARGETS, for loads
    ``ranked`` [L, E] sorted largest first in each layer."""
    cap = max_replicas(topo, ranked.shape[1])
    mean = np.maximum(ranked.sum(axis=1) / min(topo.gpus, topo.slots), np.finfo(float).tiny)
    sizes = np.concatenate([t * mean for t in REPLICA_SIZE_TARGETS])
    ww = np.tile(ranked, (len(REPLICA_SIZE_TARGETS), 1))
    r = _replicas_needed(ww, sizes, cap)
    over = r.sum(axis=1) > topo.slots
    if over.any():
        _, feasible = _smallest_feasible_size(ww[over], topo, sizes[over])
        r[over] = _replicas_needed(ww[over], feasible, cap)
    return _spend_spare_slots(ww, r.astype(np.int64), topo.slots, cap)


def _spend_spare_slots(ranked: np.ndarray, r: np.ndarray, slots: int, cap: int) -> np.ndarray:
    """Give the spare slots to the coldest experts (one more copy each, coldest first): the
    smallest replicas make fine-grained filler. ``ranked`` is sorted largest first, so the
    coldest experts are the last columns."""
    spare = slots - r.sum(axis=1)
    while spare.any():
        room = r < cap
        from_cold = np.cumsum(room[:, ::-1], axis=1)[:, ::-1]
        r += room & (from_cold <= spare[:, None])
        spare = slots - r.sum(axis=1)
    return r
