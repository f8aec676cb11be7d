"""Small pure helpers on load counts and on floats for JSON answers."""

from __future__ import annotations

import math

import numpy as np


def fmt(x: float) -> float:
    """A float for JSON: 4 significant digits, inf as a large number (JSON has no inf)."""
    x = float(x)
    if not math.isfinite(x):
        return 1e300 if x > 0 else -1e300
    return float(f"{x:.4g}")


def assignments(counts: np.ndarray) -> int:
    """(token, expert) assignments per layer in a window of [L, E] counts (mean over layers)."""
    return int(round(float(counts.sum(axis=1).mean()))) if counts.size else 0


def per_gpu(received: np.ndarray, slots_per_rank: int) -> np.ndarray:
    """[L, G] from [L, S] per-slot received counts."""
    L, S = received.shape
    return received.reshape(L, S // slots_per_rank, slots_per_rank).sum(axis=2)
