"""Node locality: where an expert group's replicas sit across nodes, and keeping them home."""

from __future__ import annotations

import numpy as np

from balancerd.placement import Topology, replica_counts


def group_node_span(phys_to_log: np.ndarray, experts: int, topo: Topology, groups: int) -> np.ndarray:
    """[L] mean over expert groups (``e * groups // E``) of the number of nodes holding a replica."""
    p = np.asarray(phys_to_log, dtype=np.int64)
    layers = p.shape[0]
    node = topo.node_of_gpu[topo.gpu_of_slot]
    key = (np.arange(layers)[:, None] * groups + p * groups // experts) * topo.nodes + node
    present = np.zeros(layers * groups * topo.nodes, dtype=bool)
    present[key.ravel()] = True
    return present.reshape(layers, groups, topo.nodes).sum(axis=2).mean(axis=1)


def prefer_home_nodes(w: np.ndarray, placement: np.ndarray, topo: Topology, free: np.ndarray) -> np.ndarray:
    """Permute single-replica experts of exactly equal load among the ``free`` slots so that as
    many as possible sit on their home node (expert e's node in the contiguous layout, so an
    expert group's home is the node(s) its experts start on). GPU loads do not change."""
    layers, slots = placement.shape
    experts, nodes = w.shape[1], topo.nodes
    single = np.take_along_axis(replica_counts(placement, experts), placement, axis=1) == 1
    rows, cols = np.nonzero(free & single)
    if not rows.size:
        return placement
    # Experts of equal load share a class: same layer, same rank among the layer's loads.
    by_load = np.argsort(w, axis=1)
    ranked = np.take_along_axis(w, by_load, axis=1)
    rank = np.zeros(w.shape, dtype=np.int64)
    np.cumsum(ranked[:, 1:] != ranked[:, :-1], axis=1, out=rank[:, 1:])
    np.put_along_axis(rank, by_load, rank.copy(), axis=1)
    cls = rows * experts + rank[rows, placement[rows, cols]]
    # Only classes of two or more replicas can trade places; number those densely.
    shared = np.bincount(cls, minlength=layers * experts) > 1
    keep = shared[cls]
    rows, cols, cls = rows[keep], cols[keep], (np.cumsum(shared) - 1)[cls[keep]]
    if not rows.size:
        return placement
    e = placement[rows, cols]
    want = cls * nodes + e * nodes // experts
    have = cls * nodes + topo.node_of_gpu[topo.gpu_of_slot[cols]]
    size = (int(cls.max()) + 1) * nodes
    n_want = np.bincount(want, minlength=size)
    n_have = np.bincount(have, minlength=size)
    item_order, item_rank = _grouped(want)
    slot_order, slot_rank = _grouped(have)
    slot_start = np.cumsum(n_have) - n_have
    matched = item_rank < n_have[want[item_order]]
    target = np.empty(rows.size, dtype=np.int64)
    target[item_order[matched]] = slot_order[slot_start[want[item_order[matched]]] + item_rank[matched]]
    slot_used = slot_rank < n_want[have[slot_order]]
    rest_items = item_order[~matched]
    rest_slots = slot_order[~slot_used]
    target[rest_items[np.argsort(cls[rest_items], kind="stable")]] = rest_slots[
        np.argsort(cls[rest_slots], kind="stable")
    ]
    out = placement.copy()
    out[rows[target], cols[target]] = e
    return out


def _grouped(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stable order of ``key`` and each sorted element's rank within its run of equal keys."""
    order = np.argsort(key, kind="stable")
    k = key[order]
    start = np.ones(k.size, dtype=bool)
    start[1:] = k[1:] != k[:-1]
    first = np.maximum.accumulate(np.where(start, np.arange(k.size), 0))
    return order, np.arange(k.size) - first
