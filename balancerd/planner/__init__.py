"""Expert placement planner: choose replica counts and slots so that GPU loads even out.

Everything is vectorised over layers; Python loops run over packing rounds, swap rounds and
(rare) repairs only. ``plan`` builds a placement from scratch (``scratch``) or improves the
current one within a tolerance and a move budget (``incremental``), then, with several nodes,
keeps expert groups on their home nodes where that costs no balance (``locality``).

Modules: ``inputs`` checks arguments; ``replicas`` sizes replicas and bounds the peak GPU load;
``packing`` puts sized replicas on GPUs; ``swaps`` levels heavy and light GPUs; ``scratch``
composes those; ``incremental`` repairs a current placement with ``extra_replicas`` (copies of
replicas too big to fit), swaps and, for layers that need it, a from-scratch plan relabelled by
``align`` to keep what it can; ``locality`` handles nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from balancerd.placement import (
    Topology,
    balancedness,
    contiguous_gpu_loads,
    count_moves,
    gpu_loads,
    validate_placement,
)
from balancerd.planner.incremental import from_current
from balancerd.planner.inputs import check_options, checked_loads
from balancerd.planner.locality import group_node_span, prefer_home_nodes
from balancerd.planner.replicas import peak_floor
from balancerd.planner.scratch import from_scratch

__all__ = ["DEFAULT_TOLERANCE", "PlanResult", "group_node_span", "plan"]

# Relative slack on a layer's peak GPU load before incremental planning moves anything; about
# the window-to-window sampling noise of a 64-GPU layer fed 65k assignments.
DEFAULT_TOLERANCE = 0.05


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
    w = checked_loads(loads, topo)
    check_options(w.shape[1], max_moves, expert_groups, tolerance)
    floor = peak_floor(w, topo)
    if current is None:
        before = contiguous_gpu_loads(w, topo.gpus)
        placement = from_scratch(w, topo, floor)
        free = np.ones(placement.shape, dtype=bool)
    else:
        cur = np.asarray(current)
        validate_placement(cur, w.shape[1], topo, layers=w.shape[0])
        cur = cur.astype(np.int64)
        before = gpu_loads(w, cur, topo)
        placement = from_current(w, topo, cur, before, floor, max_moves, tolerance)
        free = placement != cur
    if expert_groups > 1 and topo.nodes > 1:
        placement = prefer_home_nodes(w, placement, topo, free)
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
