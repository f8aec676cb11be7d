"""Imbalance detection and straggler attribution: pure functions over numpy arrays, no I/O.

The detector flags a layer when the load on its busiest GPU stays above ``threshold`` times the load
on its idlest GPU for ``sustain`` consecutive windows that carried enough traffic to be trusted, and
clears it only once the ratio falls below ``clear_threshold`` (hysteresis, so a layer hovering near
the threshold does not flap). After a plan, a cooldown keeps it from asking for another while the
new placement settles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from balancerd.config import DetectConfig
from balancerd.placement import Topology, balancedness, gpu_loads, imbalance_ratio

__all__ = [
    "Detection", "DetectorState", "Straggler", "WindowView", "attribute_stragglers", "cross_check",
    "detect", "layer_loads", "note_plan", "ratios",
]


def layer_loads(global_counts: np.ndarray, phys_to_log: np.ndarray, topo: Topology) -> np.ndarray:
    """[L, G] load on each GPU: logical counts [L, E] spread over the placement [L, S], a replica
    carrying its expert's count divided by the expert's replica count."""
    counts = np.asarray(global_counts, dtype=np.float64)
    p2l = np.asarray(phys_to_log)
    if counts.ndim != 2 or p2l.ndim != 2 or counts.shape[0] != p2l.shape[0]:
        raise ValueError(f"counts {counts.shape} and placement {p2l.shape} are not [L, E] and [L, S]")
    return gpu_loads(counts, p2l, topo)


def ratios(gpu_load: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([L] max/min, [L] max/mean) of per-GPU loads. An idle GPU beside a busy one reads as a very
    large finite ratio (1e9) and an all-idle layer as 1.0; neither raises nor warns."""
    return imbalance_ratio(gpu_load), balancedness(gpu_load)


def cross_check(gpu_loads_from_counts: np.ndarray, received_by_gpu: np.ndarray) -> np.ndarray:
    """[L] disagreement in [0, 1] between the GPU loads predicted from the routers' counts through the
    placement and the loads the ranks report they received: the total variation distance between the
    two load shares (0: same split; 1: disjoint). Shares rather than counts, so assignments dropped by
    the capacity policy or an interval one rank missed do not read as a mismatch; a large value means
    ranks serve another placement than the daemon believes. An all-zero side reads 0 against an
    all-zero side and 1 against anything else."""
    pred = np.asarray(gpu_loads_from_counts, dtype=np.float64)
    recv = np.asarray(received_by_gpu, dtype=np.float64)
    if pred.shape != recv.shape or pred.ndim != 2:
        raise ValueError(f"predicted {pred.shape} and received {recv.shape} must both be [L, G]")
    pred_total = pred.sum(axis=1, keepdims=True)
    recv_total = recv.sum(axis=1, keepdims=True)
    p = np.divide(pred, pred_total, out=np.zeros_like(pred), where=pred_total > 0)
    r = np.divide(recv, recv_total, out=np.zeros_like(recv), where=recv_total > 0)
    distance = 0.5 * np.abs(p - r).sum(axis=1)
    one_empty = (pred_total[:, 0] > 0) != (recv_total[:, 0] > 0)
    return np.where(one_empty, 1.0, distance)


@dataclass(frozen=True)
class WindowView:
    """What the detector sees of one window: global logical counts summed over its intervals, the
    number of (token, expert) assignments they hold, and the placement served meanwhile."""

    counts: np.ndarray        # [L, E]
    assignments: int
    phys_to_log: np.ndarray   # [L, S]
    topo: Topology


@dataclass(frozen=True)
class DetectorState:
    """Per-layer streaks of counted windows above threshold, the flagged layers, the last plan time.
    Immutable: :func:`detect` and :func:`note_plan` return a new one."""

    streak: tuple[int, ...] = ()
    flagged: frozenset[int] = frozenset()
    last_plan_s: float | None = None


@dataclass(frozen=True)
class Detection:
    """The verdict on one window. ``reason`` says in words why a plan is or is not asked for."""

    max_min: np.ndarray         # [L] GPU max/min load
    balancedness: np.ndarray    # [L] GPU max/mean load
    flagged: tuple[int, ...]    # imbalanced layers, ascending
    counted: bool               # the window held at least min_tokens assignments
    cooldown_left_s: float
    should_plan: bool
    reason: str
    newly_flagged: tuple[int, ...] = ()
    cleared: tuple[int, ...] = ()


def detect(state: DetectorState, window: WindowView, now: float,
           cfg: DetectConfig) -> tuple[DetectorState, Detection]:
    """Advance the detector by one window.

    A window with fewer than ``min_tokens`` assignments is not counted: streaks neither grow nor
    reset, flags neither rise nor clear, and no plan is asked for (its ratios are still reported).
    A counted window grows the streak of a layer above ``threshold`` and resets the others; a layer
    is flagged once its streak reaches ``sustain`` and stays flagged until a counted window puts it
    below ``clear_threshold``. A plan is asked for when a counted window leaves any layer flagged
    and the cooldown since :func:`note_plan` has passed. A change in the number of layers (another
    model) starts the streaks and flags afresh.
    """
    max_min, bal = ratios(layer_loads(window.counts, window.phys_to_log, window.topo))
    layers = max_min.shape[0]
    streak = np.array(state.streak if len(state.streak) == layers else (0,) * layers, dtype=np.int64)
    flagged = set(state.flagged) if len(state.streak) == layers else set()
    before = set(flagged)
    counted = window.assignments >= cfg.min_tokens
    if counted:
        above = max_min > cfg.threshold
        streak = np.where(above, streak + 1, 0)
        flagged |= {int(i) for i in np.flatnonzero(streak >= cfg.sustain)}
        flagged -= {int(i) for i in np.flatnonzero(max_min < cfg.clear_threshold)}
    since = math.inf if state.last_plan_s is None else now - state.last_plan_s
    cooldown_left = max(0.0, cfg.cooldown_s - since)

    if not counted:
        should_plan, reason = False, f"window holds {window.assignments} assignments, below {cfg.min_tokens}"
    elif not flagged:
        should_plan, reason = False, "no layer imbalanced"
    elif cooldown_left > 0:
        should_plan, reason = False, f"{len(flagged)} layers imbalanced; cooling down {cooldown_left:.1f} s"
    else:
        worst = max(flagged, key=lambda i: max_min[i])
        should_plan = True
        reason = (f"{len(flagged)} layers imbalanced (worst: layer {worst}, max/min "
                  f"{max_min[worst]:.2f} > {cfg.threshold:g})")
    new_state = DetectorState(streak=tuple(int(s) for s in streak), flagged=frozenset(flagged),
                              last_plan_s=state.last_plan_s)
    return new_state, Detection(
        max_min=max_min, balancedness=bal, flagged=tuple(sorted(flagged)), counted=counted,
        cooldown_left_s=cooldown_left, should_plan=should_plan, reason=reason,
        newly_flagged=tuple(sorted(flagged - before)), cleared=tuple(sorted(before - flagged)),
    )


def note_plan(state: DetectorState, now: float) -> DetectorState:
    """The state after a plan was pushed at ``now``: the cooldown starts; flags stay until the
    measured loads clear them."""
    return DetectorState(streak=state.streak, flagged=state.flagged, last_plan_s=now)


# ---------------------------------------------------------------------------------------------------
# Stragglers


@dataclass(frozen=True)
class Straggler:
    """A rank the others wait for in the all-to-alls.

    ``late_us``: how much longer per step it stays busy outside the all-to-alls than the median of
    the other ranks. ``waiting_ranks``: ranks that spent at least half that long waiting for it.
    ``expert_excess_us``: the part of the lateness its expert compute explains (load imbalance, which
    replication can fix); the rest lies outside the experts (attention, host, a slow GPU).
    """

    rank: int
    late_us: float
    waiting_ranks: tuple[int, ...]
    expert_excess_us: float


def attribute_stragglers(dispatch_us: np.ndarray, combine_us: np.ndarray, expert_us: np.ndarray,
                         step_us: np.ndarray, threshold: float) -> list[Straggler]:
    """Ranks that hold everyone up, latest first, from per-rank timings ([R, L] per layer, [R] step).

    An all-to-all finishes on every rank only once the last rank has joined it, so the time a rank
    measures inside it is its own transfer plus its wait for the last arrival. The late rank waits
    for nobody: it shows the *smallest* all-to-all time, and the others' all-to-all times are
    inflated by its lateness. Ranks in lockstep share one step time, so the time a rank spends
    outside the all-to-alls (step minus dispatch and combine) is its own work: the late rank shows
    the largest. A rank is a straggler when that busy time exceeds ``threshold`` times the median of
    the other ranks' and some rank waited at least half its lateness longer than it did; with two
    slow ranks both are reported, the second one waited on only by the fast ranks.
    """
    d, c, e = (np.asarray(a, dtype=np.float64) for a in (dispatch_us, combine_us, expert_us))
    step = np.asarray(step_us, dtype=np.float64)
    if d.ndim != 2 or c.shape != d.shape or e.shape != d.shape or step.shape != d.shape[:1]:
        raise ValueError(f"timings must be [R, L] x3 and [R]; got {d.shape}, {c.shape}, {e.shape}, "
                         f"{step.shape}")
    if not all(np.isfinite(a).all() for a in (d, c, e, step)):
        raise ValueError("timings must be finite")
    ranks = d.shape[0]
    a2a = (d + c).sum(axis=1)
    busy = step - a2a
    expert = e.sum(axis=1)
    found = []
    for r in range(ranks):
        others = np.arange(ranks) != r
        if not others.any():
            break
        late = busy[r] - float(np.median(busy[others]))
        if late <= 0 or busy[r] <= threshold * float(np.median(busy[others])):
            continue
        waiting = tuple(int(q) for q in np.flatnonzero(others & (a2a - a2a[r] >= 0.5 * late)))
        if waiting:
            excess = expert[r] - float(np.median(expert[others]))
            found.append(Straggler(rank=r, late_us=late, waiting_ranks=waiting,
                                   expert_excess_us=float(np.clip(excess, 0.0, late))))
    return sorted(found, key=lambda s: -s.late_us)
