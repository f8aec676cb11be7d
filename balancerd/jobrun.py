"""The daemon's working state for one job and generation."""

from __future__ import annotations

from collections import deque

import numpy as np

from balancerd.config import DaemonConfig
from balancerd.detect import Detection, DetectorState, Straggler
from balancerd.ingest import Interval, JobFeed
from balancerd.plans import PlanRecord, Realising, retry_wait_s
from balancerd.protocol import ControlWriter
from balancerd.window import LoadWindow

RATIO_HISTORY = 32        # intervals of per-layer max/min kept for the status API


class JobRun:
    """The daemon's working state for one job and generation."""

    def __init__(self, feed: JobFeed, cfg: DaemonConfig):
        self.generation = feed.generation
        self.world, self.shape = feed.world, feed.shape
        L, E = feed.shape.layers, feed.shape.experts
        self.window = LoadWindow(L, E, cfg.window.intervals, cfg.window.decay_half_life_s)
        self.detector = DetectorState()
        self.detection: Detection | None = None
        self.stragglers: list[Straggler] = []
        self.mismatch: np.ndarray | None = None  # [L] cross-check of counts against received loads
        self.bias = np.zeros((L, E), np.float32)
        self.capacity_factor = 0.0               # the one last published
        self.control: ControlWriter | None = None
        self.control_version = 0                 # newest version found in the block when attaching
        self.last_plan: PlanRecord | None = None
        self.last_interval: Interval | None = None
        self.realising: Realising | None = None
        self.failed_plans = 0                    # rejected or unacknowledged in a row
        self.publish_after = 0.0                 # no automatic plan before this time (after failures)
        self.ratio_history: deque[np.ndarray] = deque(maxlen=RATIO_HISTORY)  # [L] max/min, oldest first

    def note_outcome(self, state: str, now: float, ack_timeout_s: float) -> None:
        """Back off automatic plans after failed ones (plans.retry_wait_s); an applied plan clears it.
        Without this a plan the ranks refuse would be re-published every poll."""
        if state == "applied":
            self.failed_plans, self.publish_after = 0, 0.0
        elif state in ("rejected", "unacknowledged"):
            self.failed_plans += 1
            self.publish_after = now + retry_wait_s(self.failed_plans, ack_timeout_s)

    def same_model(self, feed: JobFeed) -> bool:
        return (feed.world, feed.shape) == (self.world, self.shape)

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
            self.control = None
