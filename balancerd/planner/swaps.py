"""Rounds of replica swaps between heavy and light GPUs of each layer."""

from __future__ import annotations

import numpy as np

from balancerd.placement import Topology, sum_per_gpu

# Candidate swaps per layer and round (heavy GPUs x partners x slots^2) stay below this.
_PAIR_BUDGET = 1600


def swap_rounds(
    slot_e: np.ndarray,
    slot_x: np.ndarray,
    topo: Topology,
    goal: np.ndarray,
    budget: np.ndarray | None,
    rounds: int,
    span: int = _PAIR_BUDGET,
) -> np.ndarray:
    """Swap replicas between heavy and light GPUs while a layer's heaviest GPU exceeds
    ``goal`` and a swap helps, in place; returns the slots moved per layer.

    Each round, the i-th heaviest GPU (while above ``goal``) may swap with the light GPUs
    ranked i, i + P, i + 2P, ... (disjoint partner sets, so every GPU is in at most one swap a
    round); it takes the swap that levels it and its partner best. A swap moves two slots;
    swaps beyond ``budget`` are skipped. ``span`` caps the candidate swaps per layer and round.
    """
    layers, slots = slot_e.shape
    gpus, caps, first = topo.gpus, topo.slots_per_gpu, topo.first_slot
    spent = np.zeros(layers, dtype=np.int64)
    if gpus < 2:
        return spent
    width = int(caps.max())
    combos = max(1, span // (width * width))
    pairs = max(1, min(gpus // 2, int(np.sqrt(combos))))
    partners = max(1, min((gpus - pairs) // pairs, combos // pairs))
    c = np.arange(width)
    flat_e, flat_x = slot_e.reshape(-1), slot_x.reshape(-1)
    load = sum_per_gpu(slot_x, topo)
    active = np.flatnonzero(load.max(axis=1) > goal)
    for _ in range(rounds):
        if not active.size:
            break
        n = active.size
        gl = load[active]
        order = np.argsort(gl, axis=1)
        heavy = order[:, : -pairs - 1 : -1]
        light = order[:, : pairs * partners].reshape(n, partners, pairs).transpose(0, 2, 1)
        lh = np.take_along_axis(gl, heavy, axis=1)
        usable = lh > goal[active, None]
        if budget is not None:
            usable &= np.arange(pairs) < ((budget[active] - spent[active]) // 2)[:, None]
        gap = np.where(usable[..., None], lh[..., None] - gl[np.arange(n)[:, None, None], light], 0.0)
        base = (active * slots)[:, None, None]
        at_h = base + np.minimum(first[heavy][..., None] + c, slots - 1)
        at_l = base[..., None] + np.minimum(first[light][..., None] + c, slots - 1)
        in_h = c < caps[heavy][..., None]
        in_l = c < caps[light][..., None]
        eh = np.where(in_h, flat_e[at_h], -1)
        el = np.where(in_l, flat_e[at_l], -2)
        same = eh[:, :, None, :, None] == el[..., None, :]
        # A replica that is padding, or whose expert the other GPU holds, cannot move.
        xh = np.where(same.any(axis=-1) | ~in_h[:, :, None], -np.inf, flat_x[at_h][:, :, None])
        xl = np.where(same.any(axis=-2) | ~in_l, np.inf, flat_x[at_l])
        miss = np.abs(2 * (xh[..., :, None] - xl[..., None, :]) - gap[..., None, None])
        # Relative to the gap, so partners compare by how well they level; below 1 means the
        # swap lowers both loads' maximum. Unusable pairs (gap 0) never qualify.
        open_gap = (gap > 0)[..., None, None]
        miss = np.where(open_gap, miss / np.where(open_gap, gap[..., None, None], 1.0), np.inf)
        miss = miss.reshape(n, pairs, -1)
        best = miss.argmin(axis=-1)
        found = np.take_along_axis(miss, best[..., None], axis=-1)[..., 0] < 1.0
        rr, pp = np.nonzero(found)
        k, rest = np.divmod(best[rr, pp], width * width)
        i, j = np.divmod(rest, width)
        a, b = at_h[rr, pp, i], at_l[rr, pp, k, j]
        ea, eb, xa, xb = flat_e[a], flat_e[b], flat_x[a], flat_x[b]
        flat_e[a], flat_e[b], flat_x[a], flat_x[b] = eb, ea, xb, xa
        rows = active[rr]
        load[rows, heavy[rr, pp]] += xb - xa
        load[rows, light[rr, pp, k]] += xa - xb
        spent[active] += 2 * found.sum(axis=1)
        active = active[found[:, 0] & (load[active].max(axis=1) > goal[active])]
    return spent
