"""Sliding and exponentially decayed sums over publish intervals (numpy only, no I/O)."""

from __future__ import annotations

from collections import deque

import numpy as np


class SlidingSum:
    """The sum of the last ``intervals`` arrays added (all of one shape)."""

    def __init__(self, shape: tuple[int, ...], intervals: int):
        if intervals < 1:
            raise ValueError(f"intervals must be >= 1, got {intervals}")
        self.shape = tuple(shape)
        self._items: deque[np.ndarray] = deque()
        self._sum = np.zeros(self.shape, dtype=np.float64)
        self._max = intervals

    @property
    def intervals(self) -> int:
        """The configured length."""
        return self._max

    def __len__(self) -> int:
        return len(self._items)

    def add(self, value: np.ndarray) -> None:
        v = np.asarray(value, dtype=np.float64)
        if v.shape != self.shape:
            raise ValueError(f"shape {v.shape} does not match the window's {self.shape}")
        self._items.append(v.copy())
        self._sum += v
        self._trim()

    def resize(self, intervals: int) -> None:
        """Change the length, keeping the newest entries."""
        if intervals < 1:
            raise ValueError(f"intervals must be >= 1, got {intervals}")
        self._max = intervals
        self._trim()

    def _trim(self) -> None:
        dropped = False
        while len(self._items) > self._max:
            self._items.popleft()
            dropped = True
        if dropped:  # recompute rather than subtract, so float error never accumulates
            self._sum = np.sum(self._items, axis=0) if self._items else np.zeros(self.shape)

    def sum(self) -> np.ndarray:
        return self._sum.copy()

    def mean(self) -> np.ndarray:
        """The mean entry; zeros when empty."""
        return self._sum / len(self._items) if self._items else np.zeros(self.shape)

    def clear(self) -> None:
        self._items.clear()
        self._sum = np.zeros(self.shape)


class DecayedSum:
    """sum_i value_i * 0.5 ** ((t - t_i) / half_life): a load with a long, fading memory."""

    def __init__(self, shape: tuple[int, ...], half_life_s: float):
        self.shape = tuple(shape)
        self.half_life_s = half_life_s
        self._value = np.zeros(self.shape, dtype=np.float64)
        self._t: float | None = None

    @property
    def half_life_s(self) -> float:
        return self._half_life

    @half_life_s.setter
    def half_life_s(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f"half life must be > 0, got {value}")
        self._half_life = float(value)

    def add(self, value: np.ndarray, t: float) -> None:
        """Decay to time ``t`` (seconds) and add; an out-of-order ``t`` adds without decaying."""
        v = np.asarray(value, dtype=np.float64)
        if v.shape != self.shape:
            raise ValueError(f"shape {v.shape} does not match the window's {self.shape}")
        if self._t is not None and t > self._t:
            self._value *= 0.5 ** ((t - self._t) / self._half_life)
        self._t = t if self._t is None else max(self._t, t)
        self._value += v

    def value(self) -> np.ndarray:
        """The sum as of the latest ``add``."""
        return self._value.copy()

    def clear(self) -> None:
        self._value = np.zeros(self.shape)
        self._t = None


class LoadWindow:
    """Per-layer expert load [L, E] over the last ``intervals`` intervals, and decayed."""

    def __init__(self, layers: int, experts: int, intervals: int, half_life_s: float):
        self.sliding = SlidingSum((layers, experts), intervals)
        self.decayed = DecayedSum((layers, experts), half_life_s)
        self.added = 0  # intervals ever added since the last reset

    def add(self, counts: np.ndarray, t: float) -> None:
        self.sliding.add(counts)
        self.decayed.add(counts, t)
        self.added += 1

    def configure(self, intervals: int, half_life_s: float) -> None:
        self.sliding.resize(intervals)
        self.decayed.half_life_s = half_life_s

    def __len__(self) -> int:
        return len(self.sliding)

    def reset(self) -> None:
        self.sliding.clear()
        self.decayed.clear()
        self.added = 0
