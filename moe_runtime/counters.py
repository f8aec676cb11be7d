"""Per-layer counters and phase timers, accumulated on the device with no host sync.

routed[L, E] (assignments this rank's router made), received[L, K] (assignments this rank's slots
processed), dropped[L] and bias_changed[L]. Counting happens only while the `record` flag is non-zero
(a device tensor, so flipping it needs no recompile or graph re-capture); the timers run whenever
counters are attached. Timers are CUDA events on GPU, read only once complete; on CPU,
perf_counter around the (synchronous) phase.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

PHASES = ("dispatch", "expert", "combine")


@dataclass
class CounterSnapshot:
    """Host copies of the counters (pinned when the counters live on a GPU)."""

    routed: torch.Tensor
    received: torch.Tensor
    dropped: torch.Tensor
    bias_changed: torch.Tensor


class _Done:
    """Completion handle for a CPU snapshot: the copies were synchronous."""

    def query(self) -> bool:
        return True


class Counters:
    """Device-side counters and timers for the L layers of one rank."""

    def __init__(self, layers: int, experts: int, slots_per_rank: int, device: torch.device | str = "cpu"):
        device = torch.device(device)
        self.layers, self.device = layers, device
        self.routed = torch.zeros((layers, experts), dtype=torch.int32, device=device)
        self.received = torch.zeros((layers, slots_per_rank), dtype=torch.int32, device=device)
        self.dropped = torch.zeros(layers, dtype=torch.int64, device=device)
        self.bias_changed = torch.zeros(layers, dtype=torch.int64, device=device)
        self.record = torch.ones((), dtype=torch.int32, device=device)
        self.timing = True  # whether this step's phases are timed (see set_timing)
        self._us = {phase: np.zeros(layers) for phase in PHASES}
        self._samples = {phase: np.zeros(layers, np.int64) for phase in PHASES}
        self._pending: deque[tuple[str, int, torch.cuda.Event, torch.cuda.Event]] = deque()
        self._free_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def host_buffers(self) -> CounterSnapshot:
        """Host tensors shaped like the counters, for `snapshot_into`."""
        pin = self.device.type == "cuda"
        return CounterSnapshot(*(torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
                                 for t in (self.routed, self.received, self.dropped, self.bias_changed)))

    def snapshot_into(self, host: CounterSnapshot, non_blocking: bool = True):
        """Copy the counters into `host`; returns a handle whose query() says when the copy is done."""
        for name in ("routed", "received", "dropped", "bias_changed"):
            getattr(host, name).copy_(getattr(self, name), non_blocking=non_blocking)
        if self.device.type != "cuda":
            return _Done()
        done = torch.cuda.Event()
        done.record()
        return done

    def reset(self) -> None:
        """Zero the counters (stream-ordered: a snapshot taken before still reads the old values)."""
        for t in (self.routed, self.received, self.dropped, self.bias_changed):
            t.zero_()

    def set_recording(self, on: bool) -> None:
        self.record.fill_(int(on))

    def set_timing(self, on: bool) -> None:
        """Time the phases of the coming step or not. Timing every step costs a few event records per
        layer; the telemetry publisher samples one step in `timing_every`, which is enough for means."""
        self.timing = on

    @contextmanager
    def timed(self, phase: str, layer: int):
        """Time the enclosed phase of `layer` on timed steps (never while a CUDA graph is captured)."""
        if not self.timing:
            yield
            return
        if self.device.type != "cuda":
            start = time.perf_counter()
            yield
            self._us[phase][layer] += (time.perf_counter() - start) * 1e6
            self._samples[phase][layer] += 1
            return
        if torch.cuda.is_current_stream_capturing():
            yield
            return
        start, end = self._free_events.pop() if self._free_events else (
            torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        start.record()
        yield
        end.record()
        self._pending.append((phase, layer, start, end))
        self._collect()  # keeps the queue as short as the GPU's lag behind the host

    def _collect(self) -> None:
        while self._pending and self._pending[0][3].query():
            phase, layer, start, end = self._pending.popleft()
            self._us[phase][layer] += start.elapsed_time(end) * 1e3
            self._samples[phase][layer] += 1
            self._free_events.append((start, end))

    def drain_timings(self, mean: bool = False) -> dict[str, np.ndarray]:
        """Microseconds per phase and layer completed since the last drain (never waits on the GPU):
        summed over the timed steps, or with ``mean`` averaged over them (0 where none completed)."""
        self._collect()
        out = {}
        for phase, us in self._us.items():
            n = self._samples[phase]
            out[phase] = np.divide(us, n, out=np.zeros_like(us), where=n > 0) if mean else us.copy()
            us.fill(0.0)
            n.fill(0)
        return out
