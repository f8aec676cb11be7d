"""Incremental moves that give an expert more replicas, each in the slot of another expert's spare."""

from __future__ import annotations

import numpy as np

from balancerd.placement import Topology, replica_counts, sum_per_gpu
from balancerd.planner.replicas import max_replicas


def add_replicas(
    w: np.ndarray, slot_e: np.ndarray, topo: Topology, goal: np.ndarray, budget: np.ndarray | None
) -> np.ndarray:
    """While a layer's largest replica alone exceeds ``goal``, give its expert extra copies
    (until it is no longer the largest), each in place of a spare replica of another expert
    (one that stays under ``goal`` with a copy fewer) on a different GPU, the GPUs left
    lightest first; in place. Returns the slots changed per layer."""
    rows_total, slots = slot_e.shape
    experts = w.shape[1]
    cap = max_replicas(topo, experts)
    caps, first, gos = topo.slots_per_gpu, topo.first_slot, topo.gpu_of_slot
    width = int(caps.max())
    per_gpu = np.minimum(first[:, None] + np.arange(width), slots - 1)
    pad = np.arange(width) >= caps[:, None]
    spent = np.zeros(rows_total, dtype=np.int64)
    live = (w / np.maximum(replica_counts(slot_e, experts), 1)).max(axis=1) > goal
    for _ in range(experts):
        if budget is not None:
            live &= spent < budget
        rows = np.flatnonzero(live)
        if not rows.size:
            break
        e, ww = slot_e[rows], w[rows]
        ar = np.arange(rows.size)
        r = replica_counts(e, experts)
        size = ww / r
        hot = size.argmax(axis=1)
        r_hot, w_hot = r[ar, hot], ww[ar, hot]
        # As many copies as one-at-a-time greedy would add before another replica is larger.
        second = np.partition(size, experts - 2, axis=1)[:, experts - 2] if experts > 1 else goal[rows]
        want = np.ceil(w_hot / np.maximum(second, goal[rows])).astype(np.int64) - r_hot
        if budget is not None:
            want = np.minimum(want, budget[rows] - spent[rows])
        want = np.minimum(want, cap - r_hot)
        r_slot = np.take_along_axis(r, e, axis=1)
        w_slot = np.take_along_axis(ww, e, axis=1)
        holds_hot = sum_per_gpu((e == hot[:, None]).astype(np.float64), topo) > 0
        donor = (r_slot >= 2) & ~holds_hot[:, gos] & (w_slot <= goal[rows, None] * (r_slot - 1))
        load = sum_per_gpu(w_slot / r_slot, topo)[:, gos]
        after = np.where(donor, load - w_slot / r_slot + (w_hot / (r_hot + want.clip(1)))[:, None], np.inf)
        # The best donor slot on each GPU, then the GPUs in order of the load they are left with.
        on_gpu = np.where(pad, np.inf, after[:, per_gpu])
        pick = on_gpu.argmin(axis=2)
        best = np.take_along_axis(on_gpu, pick[..., None], axis=2)[..., 0]
        order = np.argsort(best, axis=1)[:, : max(int(want.max()), 1)]
        slot = per_gpu[order, np.take_along_axis(pick, order, axis=1)]
        ranked = np.take_along_axis(best, order, axis=1)
        ok = (np.arange(order.shape[1]) < want[:, None]) & np.isfinite(ranked)
        # At most one slot from each donor expert per pass keeps that expert within the goal.
        donor_e = np.where(ok, np.take_along_axis(e, slot, axis=1), -1 - np.arange(ok.shape[1]))
        ok &= ~np.tril(donor_e[:, :, None] == donor_e[:, None, :], -1).any(axis=2)
        rr, kk = np.nonzero(ok)
        slot_e[rows[rr], slot[rr, kk]] = hot[rr]
        added = ok.sum(axis=1)
        spent[rows] += added
        live[rows[added == 0]] = False
    return spent


def split_heaviest(w: np.ndarray, slot_e: np.ndarray, topo: Topology) -> np.ndarray:
    """Give one expert on each layer's heaviest GPU one more replica, in the slot of an expert
    with replicas to spare, choosing the pair that leaves the lowest layer peak (estimated
    from above), where that is below the current peak; in place. Returns [L] whether a layer
    moved."""
    layers, slots = slot_e.shape
    experts = w.shape[1]
    caps, first, gos = topo.slots_per_gpu, topo.first_slot, topo.gpu_of_slot
    width = int(caps.max())
    ar = np.arange(layers)
    r = np.take_along_axis(replica_counts(slot_e, experts), slot_e, axis=1)
    ws = np.take_along_axis(w, slot_e, axis=1)
    xs = ws / r
    gl = sum_per_gpu(xs, topo)
    at_gpu = gl[:, gos]
    heavy = gl.argmax(axis=1)
    peak = gl[ar, heavy]
    at_h = np.minimum(first[heavy][:, None] + np.arange(width), slots - 1)
    on_h = np.arange(width) < caps[heavy][:, None]
    ex, rx, wx = slot_e[ar[:, None], at_h], r[ar[:, None], at_h], ws[ar[:, None], at_h]
    grow = on_h & (rx < max_replicas(topo, experts))
    # GPUs holding a candidate expert all get lighter; none of them can take its new replica.
    holds = (slot_e[:, None, :] == ex[:, :, None]).astype(np.float64).reshape(layers * width, slots)
    holds = sum_per_gpu(holds, topo).reshape(layers, width, -1) > 0
    rest_peak = np.where(holds, -np.inf, gl[:, None, :]).max(axis=2)
    holds = holds[:, :, gos]
    # Peak among the other GPUs holding each slot's expert, which each gain a share.
    order = np.argsort(slot_e, axis=1, kind="stable")
    counts = replica_counts(slot_e, experts)
    starts = np.cumsum(counts, axis=1) - counts
    top = np.maximum.reduceat(
        np.take_along_axis(at_gpu, order, axis=1).ravel(), (starts + (ar * slots)[:, None]).ravel()
    ).reshape(layers, experts)
    share = np.take_along_axis(top, slot_e, axis=1) + ws / (r * np.maximum(r - 1, 1))
    donor_peak = np.where(r >= 2, share, np.inf)
    new_piece = wx / (rx + 1)
    others = np.maximum(rest_peak, peak[:, None] - (wx / rx - new_piece))
    donor_after = (at_gpu - xs)[:, None, :] + new_piece[:, :, None]
    after = np.maximum(np.maximum(donor_after, donor_peak[:, None, :]), others[:, :, None])
    # Among moves with the same new peak, prefer the lightest receiving GPU.
    after += 1e-9 * donor_after
    after = np.where(grow[:, :, None] & ~holds, after, np.inf).reshape(layers, -1)
    best = after.argmin(axis=1)
    moved = after[ar, best] < peak
    i, t = np.divmod(best, slots)
    rows = ar[moved]
    slot_e[rows, t[moved]] = ex[rows, i[moved]]
    return moved
