"""Publishing a rank's counters into its shared-memory telemetry ring, without stalling the forward.

At a publish step, on every rank at the same step:

1. the counters are copied non-blocking into pinned host memory (two copies: the int32 and int64
   flat buffers of `Counters`);
2. routed [L, E] and the spare words after it (the agreed publish interval and any control words the
   caller rides on it, see ``extra``) are all-reduced in place over the EP group: NCCL enqueues it on
   the stream, nothing waits on the host; with ``global_view=False`` only the spare words are;
3. the reduced words are copied to pinned memory and the counters are reset (stream-ordered);
4. at a later step, once the copies have completed (an event query, never a wait), the snapshot is
   handed to a background thread that writes the record into the ring. Handing over from the step
   call means the thread runs while the GPU has the next step's work, and it makes no CUDA calls
   while steps come; after IDLE_HAND_OVER_S without a step it hands over itself, so an idle engine's
   last interval still reaches the ring.

Publishing is every ``interval_steps`` steps, or with ``interval_ms`` about every T ms: rank 0 then
proposes the number of steps from its measured step time at each publish, the proposal rides on the
all-reduce, and every rank adopts it at the following publish, so all ranks keep publishing at the
same steps without any extra collective.

The ring is lossy and never waited on, so a missing or dead daemon costs nothing; at most
``max_pending`` snapshots are in flight or queued and further ones are discarded (counted) if the
writer thread falls behind, so nothing piles up.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from balancerd.protocol import RingShape, TelemetryWriter, new_generation, runtime_dir
from moe_runtime.counters import Counters, CounterSnapshot
from moe_runtime.group import EPGroup

INTERVAL_WORD = 0  # the spare word carrying rank 0's proposed publish interval; the caller's words follow
IDLE_HAND_OVER_S = 1.0  # with no step() for this long, the writer thread hands completed snapshots over
# Where records are written. "thread" (default): the background thread, which runs while the engine's
# thread waits on the GPU. "step": inside the next step() once the copies are done (~20-60 us, once an
# interval), with no second Python thread wanting the GIL while a launch-bound eager loop issues ops.
# Either way the thread writes what an idle engine leaves behind.
WRITE_FROM = ("thread", "step")


@dataclass(frozen=True)
class TelemetryConfig:
    """Where and how often a rank publishes."""

    job: str = "default"
    interval_steps: int = 16
    interval_ms: float | None = None   # publish about this often instead; the step count is re-agreed
    max_interval_steps: int = 4096     # bound on the steps between publishes with interval_ms
    ring_capacity: int = 64
    global_view: bool = True       # all-reduce routed counts so every daemon sees the global load
    timing_every: int = 16         # time the phases of one step in this many (means need no more)
    write_from: str = "thread"     # "step": write records inside step() instead (see WRITE_FROM)
    max_pending: int = 4
    directory: str | None = None   # None: balancerd.protocol.runtime_dir()

    def __post_init__(self) -> None:
        if self.interval_steps < 1:
            raise ValueError(f"TelemetryConfig.interval_steps must be >= 1, got {self.interval_steps}")
        if self.interval_ms is not None and not self.interval_ms > 0:
            raise ValueError(f"TelemetryConfig.interval_ms must be > 0, got {self.interval_ms}")
        if self.max_interval_steps < 1:
            raise ValueError(f"TelemetryConfig.max_interval_steps must be >= 1, "
                             f"got {self.max_interval_steps}")
        if self.ring_capacity < 2:
            raise ValueError(f"TelemetryConfig.ring_capacity must be >= 2, got {self.ring_capacity}")
        if self.max_pending < 1:
            raise ValueError(f"TelemetryConfig.max_pending must be >= 1, got {self.max_pending}")
        if self.write_from not in WRITE_FROM:
            raise ValueError(f"TelemetryConfig.write_from must be one of {WRITE_FROM}, "
                             f"got {self.write_from!r}")
        if self.timing_every < 1:
            raise ValueError(f"TelemetryConfig.timing_every must be >= 1, got {self.timing_every}")


class _Done:
    """Completion handle on CPU, where the copies are synchronous."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


@dataclass
class _Slot:
    """Pinned host buffers of one publish, reused in rotation, with numpy views of them: the writer
    thread makes no torch calls, each of which would hand the GIL back and forth with a launching
    main thread."""

    host: CounterSnapshot
    reduced: torch.Tensor          # routed summed over ranks, then the spare words
    done: object                   # a CUDA event recorded after the copies, or _Done
    arrays: dict[str, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:  # at construction; host tensors, so no sync
        h = self.host
        self.arrays = {"routed": h.routed.numpy(), "received": h.received.numpy(),
                       "dropped": h.dropped.numpy(), "bias_changed": h.bias_changed.numpy(),
                       "reduced": self.reduced.numpy()}


@dataclass
class _Snapshot:
    first_step: int
    last_step: int
    tokens: int
    placement_version: int
    slot: _Slot
    step_us: float
    timings: dict


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
        if 1 + extra_words > counters.spare_words:
            raise ValueError(f"{extra_words} extra words need Counters(spare_words >= {1 + extra_words})")
        self.counters, self.group, self.config = counters, group, config
        self.generation = generation or shared_generation(group)
        self.extra_words = extra_words
        directory = Path(config.directory) if config.directory else runtime_dir()
        shape = RingShape(counters.layers, counters.experts, counters.slots_per_rank)
        self.writer = TelemetryWriter.create(directory, config.job, group.rank, group.world, self.generation,
                                             shape, capacity=config.ring_capacity)
        self.discarded = 0
        self.interval = config.interval_steps
        self._next_publish = config.interval_steps - 1
        self._first_step = 0
        self._tokens = 0
        self._last_publish_time = time.perf_counter()
        cuda = counters.device.type == "cuda"
        # With at most max_pending in flight or queued and one being written, the next slot is free.
        self._words = counters.routed_and_spare()  # views made once: each slice is an op on the host path
        self._spare = self._words[counters.routed.numel():]
        words = self._words.numel()
        self._slots = [_Slot(counters.host_buffers(), torch.zeros(words, dtype=torch.int32, pin_memory=cuda),
                             torch.cuda.Event() if cuda else _Done())
                       for _ in range(config.max_pending + 2)]
        self._next_slot = 0
        self._last_slot: _Slot | None = None
        self._in_flight: deque[_Snapshot] = deque()
        self._lock = threading.Lock()  # the writer thread hands over too when no step() comes
        self._write_lock = threading.Lock()  # with write_from="step", both threads may write
        self._queue: queue.Queue[_Snapshot | None] = queue.Queue()
        self._thread = threading.Thread(target=self._drain, name="balancerd-telemetry", daemon=True)
        self._thread.start()

    def is_publish_step(self, step: int) -> bool:
        return step >= self._next_publish

    def step(self, step: int, tokens: int, placement_version: int,
             extra: Sequence[int] = ()) -> torch.Tensor | None:
        """Account one finished step; on a publish step, publish (``extra``: up to ``extra_words``
        non-negative int32 values to sum over the ranks) and return the host view of the reduced extra
        words (valid once :meth:`last_done` completes), else None."""
        self._hand_over(from_step=True)
        self._tokens += tokens
        self.counters.set_timing((step + 1) % self.config.timing_every == 0)
        if not self.is_publish_step(step):
            return None
        if len(extra) > self.extra_words:
            raise ValueError(f"{len(extra)} extra words, the publisher has room for {self.extra_words}")
        self._adopt_interval()
        c = self.counters
        now = time.perf_counter()
        steps = step - self._first_step + 1
        step_us = (now - self._last_publish_time) * 1e6 / steps
        self._last_publish_time = now

        spare = self._spare  # zeroed by the last reset
        proposal = self._proposed_interval(step_us)
        if proposal:
            spare[INTERVAL_WORD].fill_(proposal)
        for i, value in enumerate(extra, start=1):
            if value:
                spare[i].fill_(value)
        full = len(self._in_flight) + self._queue.qsize() >= self.config.max_pending
        slot = self._slots[self._next_slot]
        if not full:
            self._next_slot = (self._next_slot + 1) % len(self._slots)
            c.snapshot_into(slot.host)
        if self.group.world > 1:
            if self.config.global_view:
                dist.all_reduce(self._words, group=self.group.group)
            else:  # the spare words (interval, plan announcements) must reach every rank
                dist.all_reduce(spare, group=self.group.group)
        slot.reduced.copy_(self._words, non_blocking=True)
        c.reset()
        if isinstance(slot.done, torch.cuda.Event):
            slot.done.record(c.current_stream())
        timings = c.drain_timings(mean=True)
        if full:
            self.discarded += 1
        else:
            with self._lock:
                self._in_flight.append(_Snapshot(self._first_step, step, self._tokens, placement_version,
                                                 slot, step_us, timings))
        self._last_slot = slot
        self._first_step, self._tokens = step + 1, 0
        self._next_publish = step + self.interval
        return slot.reduced[c.routed.numel() + 1:c.routed.numel() + 1 + self.extra_words]

    def last_done(self):
        """Completion handle (query(), synchronize()) of the latest publish's host copies."""
        return None if self._last_slot is None else self._last_slot.done

    def _proposed_interval(self, step_us: float) -> int:
        """Rank 0's steps for about interval_ms (0 from the others and without interval_ms)."""
        ms = self.config.interval_ms
        if ms is None or self.group.rank != 0:
            return 0
        return max(1, min(self.config.max_interval_steps, round(ms * 1e3 / max(step_us, 1e-3))))

    def _adopt_interval(self) -> None:
        """Take the interval proposed at the previous publish (its copy was issued an interval ago)."""
        slot = self._last_slot
        if self.config.interval_ms is None or slot is None:
            return
        if not slot.done.query():
            slot.done.synchronize()
        agreed = int(slot.reduced[self.counters.routed.numel() + INTERVAL_WORD])
        if agreed > 0:
            self.interval = agreed

    def _hand_over(self, from_step: bool = False) -> None:
        """Pass on the snapshots whose copies have completed (never waits): to the writer thread, or
        with write_from="step" and called from step(), write them here."""
        with self._lock:
            done = []
            while self._in_flight and self._in_flight[0].slot.done.query():
                done.append(self._in_flight.popleft())
        for snap in done:
            if from_step and self.config.write_from == "step" and self._queue.empty():
                self._write(snap)
            else:
                self._queue.put(snap)

    def _write(self, snap: _Snapshot) -> None:
        a = snap.slot.arrays
        routed = a["routed"]
        reduced = a["reduced"][:routed.size].reshape(routed.shape)
        with self._write_lock:
            self.writer.write(
                first_step=snap.first_step, last_step=snap.last_step, tokens=snap.tokens,
                placement_version=snap.placement_version, routed=routed,
                global_routed=reduced if self.config.global_view else None, received=a["received"],
                dispatch_us=snap.timings["dispatch"], combine_us=snap.timings["combine"],
                expert_us=snap.timings["expert"], step_us=snap.step_us, dropped=a["dropped"],
                bias_changed=a["bias_changed"],
            )

    def _drain(self) -> None:
        while True:
            try:
                snap = self._queue.get(timeout=IDLE_HAND_OVER_S)
            except queue.Empty:  # no step() is handing over (an idle engine): do it here, off any launch
                self._hand_over()
                continue
            if snap is None:
                return
            self._write(snap)

    def close(self) -> None:
        """Flush the records still in flight, stop the writer thread and close the ring (the file stays)."""
        with self._lock:
            left = list(self._in_flight)
            self._in_flight.clear()
        for snap in left:
            snap.slot.done.synchronize()
            self._queue.put(snap)
        self._queue.put(None)
        self._thread.join(timeout=10)
        self.writer.close()
