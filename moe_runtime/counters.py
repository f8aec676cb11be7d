"""Per-layer counters and phase timers, accumulated on the device with no host sync.

routed[L, E] (assignments this rank's router made), received[L, K] (assignments this rank's slots
processed), dropped[L] and bias_changed[L]. They are views into two flat buffers (int32: routed, then
`spare_words` words a publisher all-reduces together with routed, then received; int64: dropped and
bias_changed), so a snapshot is two copies and a reset two fills. Counting happens only while the
`record` flag is non-zero (a device tensor, so flipping it needs no recompile or graph re-capture);
the timers run whenever counters are attached. Timers are CUDA events on GPU, read only once complete; on CPU,
perf_counter around the (synchronous) phase.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from moe_runtime.streams import current_stream

PHASES = ("dispatch", "expert", "combine")
MAX_PENDING_TIMERS = 256  # timed phases awaiting completion before `timed` collects them itself


@dataclass
class CounterSnapshot:
    """Host copies of the counters (pinned when the counters live on a GPU): views into `words`
    (routed, spare, received) and `wide` (dropped, bias_changed)."""

    words: torch.Tensor
    wide: torch.Tensor
    routed: torch.Tensor
    spare: torch.Tensor
    received: torch.Tensor
    dropped: torch.Tensor
    bias_changed: torch.Tensor


def _layout(layers: int, experts: int, slots: int, spare: int, device: torch.device,
            pin: bool) -> CounterSnapshot:
    words = torch.zeros(layers * (experts + slots) + spare, dtype=torch.int32, device=device, pin_memory=pin)
    wide = torch.zeros(2 * layers, dtype=torch.int64, device=device, pin_memory=pin)
    end = layers * experts
    return CounterSnapshot(words, wide, words[:end].view(layers, experts), words[end:end + spare],
                           words[end + spare:].view(layers, slots), wide[:layers], wide[layers:])


class Counters:
    """Device-side counters and timers for the L layers of one rank."""

    def __init__(self, layers: int, experts: int, slots_per_rank: int, device: torch.device | str = "cpu",
                 spare_words: int = 4):
        device = torch.device(device)
        self.layers, self.experts, self.slots_per_rank, self.device = layers, experts, slots_per_rank, device
        self.spare_words = spare_words
        self._flat = _layout(layers, experts, slots_per_rank, spare_words, device, pin=False)
        self.routed, self.received = self._flat.routed, self._flat.received
        self.dropped, self.bias_changed = self._flat.dropped, self._flat.bias_changed
        self.record = torch.ones((), dtype=torch.int32, device=device)
        self.timing = True  # whether this step's phases are timed (see set_timing)
        self._us = {phase: np.zeros(layers) for phase in PHASES}
        self._samples = {phase: np.zeros(layers, np.int64) for phase in PHASES}
        self._pending: deque[tuple[str, int | slice, torch.cuda.Event, torch.cuda.Event]] = deque()
        self._free_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def routed_and_spare(self) -> torch.Tensor:
        """The flat device view of routed followed by the spare words (one all-reduce covers both)."""
        return self._flat.words[:self.routed.numel() + self.spare_words]

    def host_buffers(self) -> CounterSnapshot:
        """Host tensors laid out like the counters (pinned when they live on a GPU), for `snapshot_into`."""
        return _layout(self.layers, self.experts, self.slots_per_rank, self.spare_words, torch.device("cpu"),
                       pin=self.device.type == "cuda")

    def snapshot_into(self, host: CounterSnapshot, non_blocking: bool = True) -> None:
        """Copy the counters into `host`: two stream-ordered copies (complete once the stream passes them)."""
        host.words.copy_(self._flat.words, non_blocking=non_blocking)
        host.wide.copy_(self._flat.wide, non_blocking=non_blocking)

    def reset(self) -> None:
        """Zero the counters (stream-ordered: a snapshot taken before still reads the old values)."""
        self._flat.words.zero_()
        self._flat.wide.zero_()

    def set_recording(self, on: bool) -> None:
        self.record.fill_(int(on))

    def set_timing(self, on: bool) -> None:
        """Time the phases of the coming step or not, and collect the timers completed so far (once a
        step: each query is a driver call on the launch path). Timing every step costs a few event
        records per layer; the telemetry publisher samples one step in `timing_every`."""
        self.timing = on
        if self._pending:
            self._collect()

    @contextmanager
    def timed(self, phase: str, layer: int | slice):
        """Time the enclosed phase of `layer` on timed steps (never while a CUDA graph is captured); a
        slice of layers shares the time evenly (layers whose work overlaps, as interleaved ranges')."""
        if not self.timing:
            yield
            return
        if self.device.type != "cuda":
            start = time.perf_counter()
            yield
            self._add(phase, layer, (time.perf_counter() - start) * 1e6)
            return
        if torch.cuda.is_current_stream_capturing():
            yield
            return
        start, end = self._free_events.pop() if self._free_events else (
            torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        start.record(self.current_stream())
        yield
        end.record(self.current_stream())
        self._pending.append((phase, layer, start, end))
        if len(self._pending) > MAX_PENDING_TIMERS:  # only without set_timing calls (every step timed)
            self._collect()

    def current_stream(self) -> torch.cuda.Stream:
        """The current CUDA stream of the counters' device (`moe_runtime.streams.current_stream`)."""
        return current_stream(self.device)

    def _collect(self) -> None:
        while self._pending and self._pending[0][3].query():
            phase, layer, start, end = self._pending.popleft()
            self._add(phase, layer, start.elapsed_time(end) * 1e3)
            self._free_events.append((start, end))

    def _add(self, phase: str, layer: int | slice, us: float) -> None:
        shared = len(range(self.layers)[layer]) if isinstance(layer, slice) else 1
        self._us[phase][layer] += us / max(shared, 1)
        self._samples[phase][layer] += 1

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
