"""Publishing a rank's counters into its shared-memory telemetry ring, without stalling the forward.

Every ``interval_steps`` steps, on every rank at the same step:

1. the routed counts [L, E] (plus any control words the caller rides on it, see ``extra``) are
   all-reduced over the EP group: NCCL enqueues it on the stream, nothing waits on the host; with
   ``global_view=False`` only the control words are;
2. the reduced buffer and the other counters are copied non-blocking into pinned host memory and the
   device counters are reset (stream-ordered, so the copy still sees the old values);
3. a background thread waits for that copy's event and writes the record into the ring.

The ring is lossy and never waited on, so a missing or dead daemon costs nothing; at most
``max_pending`` snapshots are queued and older ones are discarded (counted) if the writer thread
falls behind, so nothing piles up.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from balancerd.protocol import RingShape, TelemetryWriter, new_generation, runtime_dir
from moe_runtime.counters import Counters
from moe_runtime.group import EPGroup


@dataclass(frozen=True)
class TelemetryConfig:
    """Where and how often a rank publishes."""

    job: str = "default"
    interval_steps: int = 16
    ring_capacity: int = 64
    global_view: bool = True       # all-reduce routed counts so every daemon sees the global load
    timing_every: int = 4          # time the phases of one step in this many (means need no more)
    max_pending: int = 4
    directory: str | None = None   # None: balancerd.protocol.runtime_dir()

    def __post_init__(self) -> None:
        if self.interval_steps < 1:
            raise ValueError(f"TelemetryConfig.interval_steps must be >= 1, got {self.interval_steps}")
        if self.ring_capacity < 2:
            raise ValueError(f"TelemetryConfig.ring_capacity must be >= 2, got {self.ring_capacity}")
        if self.max_pending < 1:
            raise ValueError(f"TelemetryConfig.max_pending must be >= 1, got {self.max_pending}")
        if self.timing_every < 1:
            raise ValueError(f"TelemetryConfig.timing_every must be >= 1, got {self.timing_every}")


@dataclass
class _Snapshot:
    first_step: int
    last_step: int
    tokens: int
    placement_version: int
    reduced: torch.Tensor          # host: routed summed over ranks, then the extra words
    routed: torch.Tensor
    received: torch.Tensor
    dropped: torch.Tensor
    bias_changed: torch.Tensor
    done: object                   # .query() / .synchronize() on GPU; immediate on CPU
    step_mark: object              # a CUDA event at the end of the interval, or a perf_counter time
    timings: dict[str, np.ndarray]


def shared_generation(group: EPGroup) -> int:
    """A fresh generation id drawn by rank 0 and broadcast, so every rank of one runtime start shares it.

    A collective: every rank of the group calls it once, at start-up.
    """
    value = torch.tensor([new_generation()], dtype=torch.int64, device=group.device)
    if group.world > 1:
        dist.broadcast(value, dist.get_global_rank(group.group, 0), group=group.group)
    return int(value.item())


class TelemetryPublisher:
    """Owns the rank's ring and the background writer. Call :meth:`step` once per forward step and
    :meth:`close` at shutdown. Without ``generation``, construction is a collective
    (:func:`shared_generation`)."""

    def __init__(self, counters: Counters, group: EPGroup, config: TelemetryConfig = TelemetryConfig(),
                 *, generation: int | None = None, extra_words: int = 0):
        self.counters, self.group, self.config = counters, group, config
        self.generation = generation or shared_generation(group)
        self.extra_words = extra_words
        directory = Path(config.directory) if config.directory else runtime_dir()
        shape = RingShape(counters.layers, counters.routed.shape[1], counters.received.shape[1])
        self.writer = TelemetryWriter.create(directory, config.job, group.rank, group.world, self.generation,
                                             shape, capacity=config.ring_capacity)
        self.discarded = 0
        self._first_step = 0
        self._tokens = 0
        self._queue: queue.Queue[_Snapshot | None] = queue.Queue()
        self._last_mark = self._mark()
        numel = counters.routed.numel() + extra_words
        self._reduce_buf = torch.zeros(numel, dtype=torch.int32, device=counters.device)
        # Pinned buffers are allocated once and rotated: with at most max_pending queued and one being
        # written, the next buffer in the rotation is always free.
        pin = counters.device.type == "cuda"
        self._host = [(counters.host_buffers(), torch.empty(numel, dtype=torch.int32, pin_memory=pin))
                      for _ in range(config.max_pending + 2)]
        self._next_host = 0
        self._last_done = None
        self._thread = threading.Thread(target=self._drain, name="balancerd-telemetry", daemon=True)
        self._thread.start()

    def is_publish_step(self, step: int) -> bool:
        return (step + 1) % self.config.interval_steps == 0

    def step(self, step: int, tokens: int, placement_version: int,
             extra: torch.Tensor | None = None) -> torch.Tensor | None:
        """Account one finished step; on a publish step, publish and return the host buffer of the
        reduced ``extra`` words (valid once :meth:`last_done` completes), else None."""
        self._tokens += tokens
        self.counters.set_timing((step + 1) % self.config.timing_every == 0)
        if not self.is_publish_step(step):
            return None
        c = self.counters
        buf = self._reduce_buf
        L_E = c.routed.numel()
        buf[:L_E].copy_(c.routed.view(-1))
        if self.extra_words:
            buf[L_E:].copy_(extra)
        if self.group.world > 1:
            if self.config.global_view:
                dist.all_reduce(buf, group=self.group.group)
            elif self.extra_words:  # the caller's words (plan announcements) must reach every rank
                dist.all_reduce(buf[L_E:], group=self.group.group)
        full = self._queue.qsize() >= self.config.max_pending
        host, reduced = self._host[self._next_host]
        if not full:
            self._next_host = (self._next_host + 1) % len(self._host)
        reduced.copy_(buf, non_blocking=True)
        done = c.snapshot_into(host, non_blocking=True)
        c.reset()
        self._last_done = done
        if full:
            self.discarded += 1
            c.drain_timings(mean=True)
        else:
            self._queue.put(_Snapshot(self._first_step, step, self._tokens, placement_version, reduced,
                                      host.routed, host.received, host.dropped, host.bias_changed, done,
                                      self._mark(), c.drain_timings(mean=True)))
        self._first_step, self._tokens = step + 1, 0
        return reduced[L_E:]

    def last_done(self):
        """Completion handle of the latest publish's host copy."""
        return self._last_done

    def _mark(self):
        if self.counters.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _elapsed_us(self, start, end) -> float:
        if isinstance(start, float):
            return (end - start) * 1e6
        return start.elapsed_time(end) * 1e3

    def _drain(self) -> None:
        while True:
            snap = self._queue.get()
            if snap is None:
                return
            if hasattr(snap.done, "synchronize"):
                snap.done.synchronize()
            if hasattr(snap.step_mark, "synchronize"):
                snap.step_mark.synchronize()
            steps = max(1, snap.last_step - snap.first_step + 1)
            step_us = self._elapsed_us(self._last_mark, snap.step_mark) / steps
            self._last_mark = snap.step_mark
            L, E = snap.routed.shape
            global_routed = snap.reduced[: L * E].view(L, E).numpy() if self.config.global_view else None
            self.writer.write(
                first_step=snap.first_step, last_step=snap.last_step, tokens=snap.tokens,
                placement_version=snap.placement_version, routed=snap.routed.numpy(),
                global_routed=global_routed, received=snap.received.numpy(),
                dispatch_us=snap.timings["dispatch"], combine_us=snap.timings["combine"],
                expert_us=snap.timings["expert"], step_us=step_us, dropped=snap.dropped.numpy(),
                bias_changed=snap.bias_changed.numpy(),
            )

    def close(self) -> None:
        """Flush queued records, stop the writer thread and close the ring (the file stays)."""
        self._queue.put(None)
        self._thread.join(timeout=10)
        self.writer.close()
