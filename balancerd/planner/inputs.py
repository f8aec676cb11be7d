"""Argument checks for ``plan``: loads and options, with messages that say what is wrong."""

from __future__ import annotations

import numpy as np

from balancerd.placement import PlacementError, Topology


def checked_loads(loads: np.ndarray, topo: Topology) -> np.ndarray:
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


def check_options(experts: int, max_moves: int | None, groups: int, tolerance: float) -> None:
    if max_moves is not None and (
        isinstance(max_moves, bool) or not isinstance(max_moves, (int, np.integer)) or max_moves < 0
    ):
        raise PlacementError(f"max_moves must be None or an int >= 0, got {max_moves!r}")
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or not 1 <= groups <= experts:
        raise PlacementError(f"expert_groups must be an int in [1, {experts}], got {groups!r}")
    numeric = isinstance(tolerance, (int, float, np.integer, np.floating)) and not isinstance(tolerance, bool)
    if not numeric or not np.isfinite(tolerance) or tolerance < 0:
        raise PlacementError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
