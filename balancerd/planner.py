"""Expert placement planner: choose replica counts and slots so that GPU loads even out.

Everything is vectorised over layers; Python loops run over packing rounds, swap rounds and
(rare) repairs only.

From scratch, for each of two replica-size targets ``T`` near the mean GPU load, an expert
gets ceil(load / T) replicas and the spare slots replicate the coldest experts, which makes
fine-grained filler. The replicas are packed largest first in rounds of one per GPU: GPUs far
below the mean take the largest replicas left, the others the smallest, so a GPU holding a big
replica is topped up with the smallest ones. Per layer the target with the lowest peak wins,
and a few rounds of swaps between heavy and light GPUs level what is left.

Incrementally, a layer within ``tolerance`` of the lower bound keeps its placement; the others
are improved greedily from the current placement (extra copies for a replica too big to fit,
then swaps between heavy and light GPUs, each swap moving two slots) until they are within
tolerance. Only layers that cannot get there pay for a from-scratch plan, which becomes their
reference instead: greedy moves (now also one more copy of a replica on the heaviest GPU where
swaps stall) may then spend at most what adopting that plan would move, after relabelling its
GPUs to keep as many slots as possible. The plan is adopted where the greedy result stays more
than twice the tolerance above it, or would move as much for no better balance, and
``max_moves`` allows. The result is never worse than the current placement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from balancerd.placement import (
    PlacementError,
    Topology,
    balancedness,
    contiguous_gpu_loads,
    count_moves,
    gpu_loads,
    replica_counts,
    separate_copies,
    slot_loads,
    sum_per_gpu,
    validate_placement,
)

# Relative slack on a layer's peak GPU load before incremental planning moves anything; about
# the window-to-window sampling noise of a 64-GPU layer fed 65k assignments.
DEFAULT_TOLERANCE = 0.05
# Replica-size targets tried from scratch, as fractions of the mean GPU load.
_TARGETS = (0.85, 0.97)
_SCRATCH_SWAP_ROUNDS = 4
_SCRATCH_SWAP_SPAN = 100
_FIRST_PASS_ROUNDS = 6
_INCREMENTAL_ROUNDS = 16
_SPLIT_ROUNDS = 4
# Candidate swaps per layer and round (heavy GPUs x partners x slots^2) stay below this.
_PAIR_BUDGET = 1600
_BISECTION_STEPS = 10


@dataclass(frozen=True, eq=False)
class PlanResult:
    """A placement and how it changes the load.

    ``balancedness_floor`` is a lower bound on max/mean for any placement of these loads (the
    mean, or the smallest possible largest replica). ``group_node_span`` is the mean number of
    nodes over which an expert group's replicas are spread (1.0: every group on one node).
    """

    phys_to_log: np.ndarray
    gpu_loads_before: np.ndarray
    gpu_loads_after: np.ndarray
    balancedness_before: np.ndarray
    balancedness_after: np.ndarray
    balancedness_floor: np.ndarray
    moves: np.ndarray
    group_node_span: np.ndarray

    @property
    def moved_fraction(self) -> float:
        """Share of all (layer, slot) pairs whose expert changed."""
        return float(self.moves.sum()) / self.phys_to_log.size


def plan(
    loads: np.ndarray,
    topo: Topology,
    current: np.ndarray | None = None,
    max_moves: int | None = None,
    expert_groups: int = 1,
    tolerance: float = DEFAULT_TOLERANCE,
) -> PlanResult:
    """Plan ``phys_to_log[L, S]`` for ``loads[L, E]`` (tokens per logical expert per layer).

    With ``current``, start from it and move only what brings a layer within ``tolerance``
    (relative) of the achievable peak, never more than ``max_moves`` slots a layer; the result is
    never worse than ``current``. ``expert_groups`` > 1 with ``topo.nodes`` > 1 keeps experts
    of a group on the group's home nodes where that costs no balance.
    """
    w = _checked_loads(loads, topo)
    _check_options(w.shape[1], max_moves, expert_groups, tolerance)
    floor = _peak_floor(w, topo)
    if current is None:
        before = contiguous_gpu_loads(w, topo.gpus)
        placement = _from_scratch(w, topo, floor)
        free = np.ones(placement.shape, dtype=bool)
    else:
        cur = np.asarray(current)
        validate_placement(cur, w.shape[1], topo, layers=w.shape[0])
        cur = cur.astype(np.int64)
        before = gpu_loads(w, cur, topo)
        placement = _incremental(w, topo, cur, before, floor, max_moves, tolerance)
        free = placement != cur
    if expert_groups > 1 and topo.nodes > 1:
        placement = _prefer_home_nodes(w, placement, topo, free)
    after = gpu_loads(w, placement, topo)
    mean = np.maximum(w.sum(axis=1) / topo.gpus, np.finfo(float).tiny)
    return PlanResult(
        phys_to_log=placement.astype(np.int32),
        gpu_loads_before=before,
        gpu_loads_after=after,
        balancedness_before=balancedness(before),
        balancedness_after=balancedness(after),
        balancedness_floor=np.where(w.sum(axis=1) > 0, floor / mean, 1.0),
        moves=np.zeros(w.shape[0], np.int64) if current is None else count_moves(current, placement),
        group_node_span=group_node_span(placement, w.shape[1], topo, expert_groups),
    )


def group_node_span(phys_to_log: np.ndarray, experts: int, topo: Topology, groups: int) -> np.ndarray:
    """[L] mean over expert groups (``e * groups // E``) of the number of nodes holding a replica."""
    p = np.asarray(phys_to_log, dtype=np.int64)
    layers = p.shape[0]
    node = topo.node_of_gpu[topo.gpu_of_slot]
    key = (np.arange(layers)[:, None] * groups + p * groups // experts) * topo.nodes + node
    present = np.zeros(layers * groups * topo.nodes, dtype=bool)
    present[key.ravel()] = True
    return present.reshape(layers, groups, topo.nodes).sum(axis=2).mean(axis=1)


# --- input checks -------------------------------------------------------------------------


def _checked_loads(loads: np.ndarray, topo: Topology) -> np.ndarray:
    try:
        w = np.asarray(loads, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise PlacementError(f"loads must be a numeric [layers, experts] array: {exc}") from None
    if w.ndim != 2 or 0 in w.shape:
        raise PlacementError(f"loads must be a non-empty [layers, experts] array, got shape {w.shape}")
    bad = ~np.isfinite(w) | (w < 0)
    if bad.any():
        layer, expert = np.argwhere(bad)[0]
        raise PlacementError(
            f"loads must be finite and >= 0: layer {layer} expert {expert} is {w[layer, expert]}"
        )
    if topo.slots < w.shape[1]:
        raise PlacementError(f"{topo.slots} slots cannot hold {w.shape[1]} experts (need S >= E)")
    return w


def _check_options(experts: int, max_moves: int | None, groups: int, tolerance: float) -> None:
    if max_moves is not None and (
        isinstance(max_moves, bool) or not isinstance(max_moves, (int, np.integer)) or max_moves < 0
    ):
        raise PlacementError(f"max_moves must be None or an int >= 0, got {max_moves!r}")
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or not 1 <= groups <= experts:
        raise PlacementError(f"expert_groups must be an int in [1, {experts}], got {groups!r}")
    numeric = isinstance(tolerance, (int, float, np.integer, np.floating)) and not isinstance(tolerance, bool)
    if not numeric or not np.isfinite(tolerance) or tolerance < 0:
        raise PlacementError(f"tolerance must be a finite number >= 0, got {tolerance!r}")


# --- replica counts -----------------------------------------------------------------------


def _max_replicas(topo: Topology, experts: int) -> int:
    """One replica per GPU, unless there are more slots than that allows."""
    return max(topo.gpus, -(-topo.slots // experts))


def _replicas_needed(w: np.ndarray, size: np.ndarray, cap: int) -> np.ndarray:
    """[R, E] replicas needed to keep every replica at most ``size[R]`` (at least 1, at most cap)."""
    r = np.ceil(w / size[:, None])
    return np.clip(r, 1, cap, out=r)


def _smallest_feasible_size(w: np.ndarray, topo: Topology, low: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bracket the smallest largest-replica load that S slots allow: (infeasible, feasible) [R]."""
    cap = _max_replicas(topo, w.shape[1])
    hi = np.maximum(w.max(axis=1), np.finfo(float).tiny)
    lo = np.minimum(low, hi)
    for _ in range(_BISECTION_STEPS):
        mid = np.sqrt(lo * hi)
        ok = _replicas_needed(w, mid, cap).sum(axis=1) <= topo.slots
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid)
    return lo, hi


def _peak_floor(w: np.ndarray, topo: Topology) -> np.ndarray:
    """[L] lower bound on the largest GPU load: the mean over GPUs with slots, or the
    smallest largest replica the slots allow, whichever is larger."""
    floor = w.sum(axis=1) / min(topo.gpus, topo.slots)
    cap = _max_replicas(topo, w.shape[1])
    positive = np.maximum(floor, np.finfo(float).tiny)
    tight = _replicas_needed(w, positive, cap).sum(axis=1) > topo.slots
    if tight.any():
        lo, _ = _smallest_feasible_size(w[tight], topo, positive[tight])
        floor[tight] = lo
    return floor


def _replica_plans(ranked: np.ndarray, topo: Topology) -> np.ndarray:
    """[K * L, E] replica counts, one block of layers per target in _TARGETS, for loads
    ``ranked`` [L, E] sorted largest first in each layer."""
    cap = _max_replicas(topo, ranked.shape[1])
    mean = np.maximum(ranked.sum(axis=1) / min(topo.gpus, topo.slots), np.finfo(float).tiny)
    sizes = np.concatenate([t * mean for t in _TARGETS])
    ww = np.tile(ranked, (len(_TARGETS), 1))
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


# --- packing ------------------------------------------------------------------------------


def _sorted_replicas(
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


def _pack(
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


def _from_scratch(w: np.ndarray, topo: Topology, floor: np.ndarray) -> np.ndarray:
    """[L, S] placement built from nothing; see the module docstring."""
    layers = w.shape[0]
    hot_first = np.argsort(-w, axis=1)
    ranked = np.take_along_axis(w, hot_first, axis=1)
    r = _replica_plans(ranked, topo)
    level = np.tile(w.sum(axis=1) / min(topo.gpus, topo.slots), len(_TARGETS))
    k = len(_TARGETS)
    experts, sizes = _sorted_replicas(np.tile(ranked, (k, 1)), r, np.tile(hot_first, (k, 1)))
    slot_e, slot_x = _pack(experts, sizes, topo, level, w.shape[1])
    peaks = sum_per_gpu(slot_x, topo).max(axis=1).reshape(len(_TARGETS), layers)
    best = np.argmin(peaks, axis=0) * layers + np.arange(layers)
    slot_e, slot_x = slot_e[best], slot_x[best]
    _separate_replicas(slot_e, slot_x, topo, w.shape[1])
    _swap_rounds(slot_e, slot_x, topo, floor * (1 + 1e-6), None, _SCRATCH_SWAP_ROUNDS, _SCRATCH_SWAP_SPAN)
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


# --- swaps --------------------------------------------------------------------------------


def _swap_rounds(
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


# --- incremental --------------------------------------------------------------------------


def _incremental(
    w: np.ndarray,
    topo: Topology,
    cur: np.ndarray,
    before: np.ndarray,
    floor: np.ndarray,
    max_moves: int | None,
    tolerance: float,
) -> np.ndarray:
    """[L, S] placement reached from ``cur``; see the module docstring.

    Layers first aim for the lower bound. Only those that cannot get within tolerance of it
    pay for a from-scratch plan and aim for that instead, spending at most as many moves as
    the plan (relabelled to keep what it can) would. The plan itself is taken where the greedy
    result stays more than twice the tolerance above it, or costs as many moves for no better
    balance.
    """
    out = cur.copy()
    peak = before.max(axis=1)
    goal = floor * (1 + tolerance)
    todo = np.flatnonzero(peak > goal)
    if not todo.size:
        return out
    budget = None if max_moves is None else np.full(todo.size, max_moves, dtype=np.int64)
    out[todo], reached = _improve(w[todo], cur[todo], topo, goal[todo], budget, 0, _FIRST_PASS_ROUNDS)
    hard = todo[~reached]
    if not hard.size:
        return out
    w, cur, peak = w[hard], cur[hard], peak[hard]
    scratch = _from_scratch(w, topo, floor[hard])
    scratch_peak = gpu_loads(w, scratch, topo).max(axis=1)
    work = np.flatnonzero(peak > scratch_peak * (1 + tolerance))
    out[hard] = cur
    if not work.size:
        return out
    w, cur, scratch_peak = w[work], cur[work], scratch_peak[work]
    aligned = _align_to(scratch[work], cur, topo, w.shape[1])
    redo = count_moves(cur, aligned)
    limit = redo if max_moves is None else np.minimum(redo, max_moves)
    goal = scratch_peak * (1 + tolerance)
    greedy, reached = _improve(w, cur, topo, goal, limit, _SPLIT_ROUNDS, _INCREMENTAL_ROUNDS)
    greedy_peak = gpu_loads(w, greedy, topo).max(axis=1)
    allowed = redo <= (redo.max() if max_moves is None else max_moves)
    # Beyond twice the tolerance the gap is more than window-to-window noise explains.
    replan = allowed & ~reached & (
        (greedy_peak > scratch_peak * (1 + 2 * tolerance))
        | ((redo <= count_moves(cur, greedy)) & (scratch_peak <= greedy_peak))
    )
    out[hard[work]] = np.where(replan[:, None], aligned, greedy)
    return out


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
    spent = _add_replicas(w, slot_e, topo, goal, budget)
    slot_x = slot_loads(w, slot_e)
    for _ in range(splits + 1):
        spent += _swap_rounds(slot_e, slot_x, topo, goal, None if budget is None else budget - spent, rounds)
        over = sum_per_gpu(slot_x, topo).max(axis=1) > goal
        if budget is not None:
            over &= spent < budget
        rows = np.flatnonzero(over)
        if not rows.size or not splits:
            break
        split = _split_heaviest(w[rows], slot_e[rows], topo)
        if not split.any():
            break
        rows = rows[split]
        slot_x[rows] = slot_loads(w[rows], slot_e[rows])
        spent[rows] += 1
    peak = gpu_loads(w, slot_e, topo).max(axis=1)
    worse = peak >= gpu_loads(w, cur, topo).max(axis=1)
    slot_e[worse] = cur[worse]
    return slot_e, peak <= goal


def _split_heaviest(w: np.ndarray, slot_e: np.ndarray, topo: Topology) -> np.ndarray:
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
    grow = on_h & (rx < _max_replicas(topo, experts))
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


def _add_replicas(
    w: np.ndarray, slot_e: np.ndarray, topo: Topology, goal: np.ndarray, budget: np.ndarray | None
) -> np.ndarray:
    """While a layer's largest replica alone exceeds ``goal``, give its expert extra copies
    (until it is no longer the largest), each in place of a spare replica of another expert
    (one that stays under ``goal`` with a copy fewer) on a different GPU, the GPUs left
    lightest first; in place. Returns the slots changed per layer."""
    rows_total, slots = slot_e.shape
    experts = w.shape[1]
    cap = _max_replicas(topo, experts)
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


def _align_to(new: np.ndarray, cur: np.ndarray, topo: Topology, experts: int) -> np.ndarray:
    """Relabel the GPUs of ``new`` (among GPUs with equal slot counts) and order each GPU's
    slots so that as many slots as possible keep their current expert."""
    n = new.shape[0]
    gpus, caps, first = topo.gpus, topo.slots_per_gpu, topo.first_slot
    gos = topo.gpu_of_slot
    rows = np.arange(n)[:, None]
    have_new = np.zeros((n, gpus, experts), dtype=np.float32)
    have_cur = np.zeros((n, gpus, experts), dtype=np.float32)
    have_new[rows, gos, new] = 1.0
    have_cur[rows, gos, cur] = 1.0
    overlap = have_new @ have_cur.transpose(0, 2, 1)
    overlap[:, caps[:, None] != caps[None, :]] = -1.0
    target = np.empty((n, gpus), dtype=np.int64)
    ar = np.arange(n)
    for _ in range(gpus):
        i, j = np.divmod(overlap.reshape(n, -1).argmax(axis=1), gpus)
        target[ar, i] = j
        overlap[ar, i, :] = -2.0
        overlap[ar, :, j] = -2.0
    width = int(caps.max())
    c = np.arange(width)
    valid = c < caps[:, None]
    at = np.minimum(first[:, None] + c, topo.slots - 1)
    moved_new = np.empty((n, gpus, width), dtype=np.int64)
    moved_new[rows, target] = new[:, at]
    cur_items = cur[:, at]
    same = _match_occurrences(cur_items, moved_new, valid)
    keep = same.any(axis=-1)
    used = same.any(axis=-2)
    open_slots = np.argsort(keep | ~valid, axis=-1, kind="stable")
    unused = np.argsort(used | ~valid, axis=-1, kind="stable")
    filled = cur_items.copy()
    placed = np.take_along_axis(moved_new, unused, axis=-1)
    spare = np.take_along_axis(~(used | ~valid), unused, axis=-1)
    g_idx = np.broadcast_to(np.arange(gpus)[None, :, None], spare.shape)
    r_idx = np.broadcast_to(np.arange(n)[:, None, None], spare.shape)
    filled[r_idx[spare], g_idx[spare], open_slots[spare]] = placed[spare]
    out = np.empty_like(new)
    out[:, at[valid]] = filled[:, valid]
    return out


def _match_occurrences(a: np.ndarray, b: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """[..., C, C] one-to-one matches between equal experts of a and b along the last axis:
    the k-th copy of an expert in a matches the k-th copy in b."""
    tri = np.tril(np.ones((a.shape[-1], a.shape[-1]), dtype=bool), -1)
    occ_a = ((a[..., :, None] == a[..., None, :]) & tri & valid[..., None, :]).sum(-1)
    occ_b = ((b[..., :, None] == b[..., None, :]) & tri & valid[..., None, :]).sum(-1)
    pair = (a[..., :, None] == b[..., None, :]) & (occ_a[..., :, None] == occ_b[..., None, :])
    return pair & valid[..., :, None] & valid[..., None, :]


# --- node locality ------------------------------------------------------------------------


def _prefer_home_nodes(w: np.ndarray, placement: np.ndarray, topo: Topology, free: np.ndarray) -> np.ndarray:
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
