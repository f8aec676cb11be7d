"""Packing sized replicas onto GPUs, largest first, in rounds of one replica per GPU."""

from __future__ import annotations

import numpy as np

from balancerd.placement import Topology


def sorted_replicas(
    ranked: np.ndarray, r: np.ndarray, hot_first: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """[R, S] experts and replica loads, largest first, each expert's replicas adjacent, for
    loads ``ranked`` sorted largest first (expert ids ``hot_first``) and replica counts ``r``
    in the same order."""
    rows, experts = r.shape
    size = ranked / r
    at = np.argsort(-size, axis=1, kind="stable").ravel() + np.repeat(np.arange(rows) * experts, experts)
    counts = r.ravel()[at]
    held = np.repeat(hot_first.ravel()[at], counts).reshape(rows, -1)
    return held, np.repeat(size.ravel()[at], counts).reshape(rows, -1)


def pack(
    experts: np.ndarray, sizes: np.ndarray, topo: Topology, level: np.ndarray, n_experts: int
) -> tuple[np.ndarray, np.ndarray]:
    """Assign replicas (sorted largest first) to slots in rounds of one replica per GPU.

    In each round the GPUs still short of ``level`` by more than the average remaining replica
    per free slot take the largest remaining replicas, the most short first; the others take the
    smallest, the fullest GPU the very smallest. This is largest-first packing where a GPU that
    already holds a big replica is topped up with the smallest ones, which is what the fixed
    number of slots per GPU asks for. Returns [R, S] slot experts and slot loads.
    """
    rows, slots = experts.shape
    gpus, caps = topo.gpus, topo.slots_per_gpu
    flat_e, flat_x = experts.ravel(), sizes.ravel()
    total = np.zeros((rows, slots + 1))
    np.cumsum(sizes, axis=1, out=total[:, 1:])
    total = total.ravel()
    row_base = (np.arange(rows) * slots)[:, None]
    sum_base = np.arange(rows) * (slots + 1)
    gpu_base = (np.arange(rows) * gpus)[:, None]
    # has[(row * E + expert) * G + gpu]: the GPU already holds a replica of the expert.
    has = np.zeros(rows * n_experts * gpus, dtype=bool)
    has_base = (np.arange(rows) * n_experts * gpus)[:, None]
    load = np.zeros(rows * gpus)
    slot_e = np.empty(rows * slots, dtype=np.int64)
    slot_x = np.empty(rows * slots)
    lo = np.zeros(rows, dtype=np.int64)
    hi = np.full(rows, slots, dtype=np.int64)
    for t in range(int(caps.max())):
        open_gpus = np.flatnonzero(caps > t)
        n = open_gpus.size
        grid = load.reshape(rows, gpus)
        short = (level[:, None] - (grid if n == gpus else grid[:, open_gpus])) / (caps[open_gpus] - t)
        order = np.argsort(-short, axis=1)
        local = order if n == gpus else open_gpus[order]
        mean_left = (total[sum_base + hi] - total[sum_base + lo]) / (hi - lo)
        hungry = (short >= mean_left[:, None] * (1 - 1e-9)).sum(axis=1)
        i = np.arange(n)
        pick = row_base + np.where(i < hungry[:, None], lo[:, None] + i, hi[:, None] - (n - i))
        at_has = has_base + local
        if t:
            pick = _avoid_repeats(pick, flat_e, has, at_has, gpus)
        e = flat_e[pick]
        has[at_has + e * gpus] = True
        at = row_base + topo.first_slot[local] + t
        slot_e[at] = e
        slot_x[at] = x = flat_x[pick]
        load[local + gpu_base] += x
        lo += hungry
        hi -= n - hungry
    return slot_e.reshape(rows, slots), slot_x.reshape(rows, slots)


def _avoid_repeats(
    pick: np.ndarray, flat_e: np.ndarray, has: np.ndarray, at_has: np.ndarray, gpus: int
) -> np.ndarray:
    """Where a round would hand a GPU a second copy of an expert, swap that pick with a
    neighbouring GPU's pick when neither then repeats. [R, n] picks (flat item indices) in GPU
    order; ``has[at_has + expert * gpus]`` tells whether those GPUs hold the expert."""
    for shift in (1, -1):
        e = flat_e[pick] * gpus
        clash = has[at_has + e]
        if not clash.any():
            break
        other = np.roll(pick, -shift, axis=1)
        fixes = clash & ~has[at_has + flat_e[other] * gpus] & ~has[np.roll(at_has, -shift, axis=1) + e]
        fixes[:, -1 if shift == 1 else 0] = False
        # Each pick takes part in at most one swap: drop a fix whose neighbour also fixes.
        fixes &= ~np.roll(fixes, shift, axis=1)
        partner = np.roll(fixes, shift, axis=1)
        pick = np.where(partner, np.roll(pick, shift, axis=1), np.where(fixes, other, pick))
    return pick
