"""Incremental planning: improve the current placement within a tolerance and a move budget.

A layer within ``tolerance`` of the lower bound keeps its placement. The others are improved
greedily from the current placement (extra copies for a replica too big to fit, then swaps
between heavy and light GPUs, each swap moving two slots) until they are within their tolerance:
``tolerance``, or AIM of it for a layer more than FAR tolerances above the bound. A deviation
that large is a real shift, not window-to-window noise, and once such a layer moves, a few more
moves cost little beside the imbalance they remove. Only layers that cannot get within their
tolerance pay for a from-scratch plan, which becomes their reference instead: greedy moves (now
also one more copy of a replica on the heaviest GPU where swaps stall) may then spend at most
what adopting that plan would move, after relabelling its GPUs to keep as many slots as
possible. The plan is adopted where the greedy result stays more than twice the tolerance above
it, or would move as much for no better balance, and ``max_moves`` allows. The result is never
worse than the current placement.
"""

from __future__ import annotations

import numpy as np

from balancerd.placement import Topology, count_moves, gpu_loads, slot_loads, sum_per_gpu
from balancerd.planner.align import align_to
from balancerd.planner.extra_replicas import add_replicas, split_heaviest
from balancerd.planner.scratch import from_scratch
from balancerd.planner.swaps import swap_rounds

_FIRST_PASS_ROUNDS = 6
_INCREMENTAL_ROUNDS = 16
_SPLIT_ROUNDS = 4
AIM = 0.2  # a layer far off gets this fraction of the tolerance
FAR = 4.0  # far off: more than this many tolerances above the lower bound


def from_current(
    w: np.ndarray,
    topo: Topology,
    cur: np.ndarray,
    before: np.ndarray,
    floor: np.ndarray,
    max_moves: int | None,
    tolerance: float,
) -> np.ndarray:
    """[L, S] placement reached from ``cur``; see the module docstring.

    Layers first aim for the lower bound. Only those that cannot get within their tolerance of it
    pay for a from-scratch plan and aim for that instead, spending at most as many moves as
    the plan (relabelled to keep what it can) would. The plan itself is taken where the greedy
    result stays more than twice the tolerance above it, or costs as many moves for no better
    balance.
    """
    out = cur.copy()
    peak = before.max(axis=1)
    todo = np.flatnonzero(peak > floor * (1 + tolerance))
    if not todo.size:
        return out
    tol = _layer_tolerance(peak[todo], floor[todo], tolerance)
    budget = None if max_moves is None else np.full(todo.size, max_moves, dtype=np.int64)
    out[todo], reached = _improve(w[todo], cur[todo], topo, floor[todo] * (1 + tol), budget, 0,
                                  _FIRST_PASS_ROUNDS)
    hard, tol = todo[~reached], tol[~reached]
    if not hard.size:
        return out
    w, cur, peak = w[hard], cur[hard], peak[hard]
    scratch = from_scratch(w, topo, floor[hard])
    scratch_peak = gpu_loads(w, scratch, topo).max(axis=1)
    work = np.flatnonzero(peak > scratch_peak * (1 + tol))
    out[hard] = cur
    if not work.size:
        return out
    w, cur, scratch_peak, tol = w[work], cur[work], scratch_peak[work], tol[work]
    aligned = align_to(scratch[work], cur, topo, w.shape[1])
    redo = count_moves(cur, aligned)
    limit = redo if max_moves is None else np.minimum(redo, max_moves)
    greedy, reached = _improve(w, cur, topo, scratch_peak * (1 + tol), limit, _SPLIT_ROUNDS,
                               _INCREMENTAL_ROUNDS)
    greedy_peak = gpu_loads(w, greedy, topo).max(axis=1)
    allowed = redo <= (redo.max() if max_moves is None else max_moves)
    # Beyond twice the tolerance the gap is more than window-to-window noise explains.
    replan = allowed & ~reached & (
        (greedy_peak > scratch_peak * (1 + 2 * tol))
        | ((redo <= count_moves(cur, greedy)) & (scratch_peak <= greedy_peak))
    )
    out[hard[work]] = np.where(replan[:, None], aligned, greedy)
    return out


def _layer_tolerance(peak: np.ndarray, floor: np.ndarray, tolerance: float) -> np.ndarray:
    """Each layer's tolerance: AIM of it for a layer more than FAR tolerances above its floor."""
    return np.where(peak > floor * (1 + FAR * tolerance), AIM * tolerance, tolerance)


def _improve(
    w: np.ndarray,
    cur: np.ndarray,
    topo: Topology,
    goal: np.ndarray,
    budget: np.ndarray | None,
    splits: int,
    rounds: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy moves from ``cur`` towards ``goal`` (per layer): extra copies of replicas too big
    to fit anywhere, then up to ``rounds`` rounds of swaps, and where swaps stall (up to
    ``splits`` times) one more copy of a replica on the heaviest GPU, then swaps again. Returns
    the placement (``cur`` where nothing improved) and [L] whether the goal was reached."""
    slot_e = cur.copy()
    spent = add_replicas(w, slot_e, topo, goal, budget)
    slot_x = slot_loads(w, slot_e)
    for _ in range(splits + 1):
        spent += swap_rounds(slot_e, slot_x, topo, goal, None if budget is None else budget - spent, rounds)
        over = sum_per_gpu(slot_x, topo).max(axis=1) > goal
        if budget is not None:
            over &= spent < budget
        rows = np.flatnonzero(over)
        if not rows.size or not splits:
            break
        split = split_heaviest(w[rows], slot_e[rows], topo)
        if not split.any():
            break
        rows = rows[split]
        slot_x[rows] = slot_loads(w[rows], slot_e[rows])
        spent[rows] += 1
    peak = gpu_loads(w, slot_e, topo).max(axis=1)
    worse = peak >= gpu_loads(w, cur, topo).max(axis=1)
    slot_e[worse] = cur[worse]
    return slot_e, peak <= goal
