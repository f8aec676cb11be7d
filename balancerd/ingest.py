"""Follow every job's rings and status blocks in the runtime directory and turn records into intervals.

Ranks appear, disappear and restart (a new ring file with a new generation). A job's generation is
that of its newest ring (by creation time); records of any other generation are ignored, and a
change of generation is reported so the caller resets what it accumulated.

The load of one publish interval is counted once: a record carrying ``global_routed`` (all-reduced
over the EP group, so the same on every rank) is used once per (generation, step range); without it
the ``routed`` counts of the local ranks are summed for the same step range.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from balancerd.log import Log
from balancerd.placement import PlacementError, Topology, initial_placement, validate_placement
from balancerd.protocol import (
    RingShape,
    SegmentError,
    StatusReader,
    StatusRecord,
    TelemetryReader,
    TelemetryRecord,
    discover,
)
from balancerd.window import SlidingSum

STALE_AFTER_S = 5.0  # a rank with no record for this long is reported as stale
_MAX_PENDING = 64    # step ranges waiting for the other local ranks (without global_routed)

R = TypeVar("R", TelemetryReader, StatusReader)


@dataclass
class Interval:
    """The load of one publish interval [L, E]; ``ranks`` are the contributors of a local sum."""

    generation: int
    first_step: int
    last_step: int
    wall_s: float
    counts: np.ndarray
    is_global: bool
    ranks: tuple[int, ...] = ()


@dataclass
class JobUpdate:
    """What one poll found for a job."""

    intervals: list[Interval] = field(default_factory=list)
    restarted_from: int | None = None  # the previous generation, when the runtime restarted


class RankFeed:
    """One rank's ring: the reader, its validation counters and windowed per-rank measurements."""

    def __init__(self, reader: TelemetryReader, now: float, intervals: int):
        self.reader = reader
        info = reader.info
        self.rank, self.world, self.generation = info.rank, info.world, info.generation
        self.created_ns = info.created_ns
        self.shape = reader.shape
        self.attached_s = now
        self.last_wall_s: float | None = None
        self.last: TelemetryRecord | None = None
        self.rejected = 0
        L = self.shape.layers
        self.times = SlidingSum((3 * L + 1,), intervals)  # dispatch | combine | expert | step, per record
        self.received = SlidingSum((L, self.shape.slots_per_rank), intervals)
        self.routed = SlidingSum((L, self.shape.experts), intervals)
        self.rerouted = SlidingSum((L,), intervals)
        self.dropped = SlidingSum((L,), intervals)

    def age(self, now: float) -> float:
        """Seconds since the newest accepted record was written (since attaching, if none yet)."""
        return max(0.0, now - (self.last_wall_s if self.last_wall_s is not None else self.attached_s))

    def accept(self, rec: TelemetryRecord) -> None:
        self.last = rec
        self.last_wall_s = rec.wall_ns / 1e9
        self.times.add(np.concatenate([rec.dispatch_us, rec.combine_us, rec.expert_us, [rec.step_us]]))
        self.received.add(rec.received)
        self.routed.add(rec.routed)
        self.rerouted.add(rec.bias_changed)
        self.dropped.add(rec.dropped)

    def mean_times(self) -> dict[str, np.ndarray | float]:
        """Windowed per-layer means (us per step) of dispatch, combine and expert, and the step time."""
        m = self.times.mean()
        L = self.shape.layers
        return {"dispatch_us": m[:L], "combine_us": m[L:2 * L], "expert_us": m[2 * L:3 * L],
                "step_us": float(m[-1])}

    def resize(self, intervals: int) -> None:
        for w in (self.times, self.received, self.routed, self.rerouted, self.dropped):
            w.resize(intervals)

    def close(self) -> None:
        self.reader.close()


class StatusFeed:
    """One rank's status block and the newest record read from it."""

    def __init__(self, reader: StatusReader):
        self.reader = reader
        self.rank = reader.info.rank
        self.latest: StatusRecord | None = None

    def close(self) -> None:
        self.reader.close()


class JobFeed:
    """Everything ingested for one job."""

    def __init__(self, job: str):
        self.job = job
        self.generation = 0
        self.world = 0
        self.shape: RingShape | None = None
        self.ranks: dict[int, RankFeed] = {}
        self.statuses: dict[int, StatusFeed] = {}
        self.hi_step = -1  # last step of the newest interval counted in this generation
        self.pending: dict[tuple[int, int], dict[int, TelemetryRecord]] = {}
        self.incomplete = 0  # local intervals counted without every attached rank's share

    @property
    def slots(self) -> int:
        return self.world * self.shape.slots_per_rank if self.shape else 0

    @property
    def leader(self) -> bool:
        """This daemon reads rank 0's ring, so it plans for the job."""
        feed = self.ranks.get(0)
        return feed is not None and feed.generation == self.generation

    def current_ranks(self) -> dict[int, RankFeed]:
        return {r: f for r, f in self.ranks.items() if f.generation == self.generation}

    def live_ranks(self, now: float, stale_after_s: float) -> list[int]:
        return sorted(r for r, f in self.current_ranks().items() if f.age(now) <= stale_after_s)

    def current_statuses(self) -> dict[int, StatusRecord]:
        return {r: f.latest for r, f in self.statuses.items()
                if f.latest is not None and f.latest.generation == self.generation}

    def served_placement(self, log: Log) -> tuple[int, np.ndarray]:
        """(version, phys_to_log) the job serves: rank 0's status, else the newest any rank reports,
        else version 0, the initial placement."""
        topo = Topology(gpus=self.world, slots=self.slots)
        statuses = self.current_statuses()
        choice = statuses.get(0) or max(statuses.values(), key=lambda s: s.applied_version, default=None)
        if choice is not None and choice.phys_to_log is not None:
            try:
                validate_placement(choice.phys_to_log, self.shape.experts, topo, self.shape.layers)
                return choice.applied_version, np.array(choice.phys_to_log, dtype=np.int32)
            except PlacementError as exc:
                log.once(f"served:{self.job}:{choice.rank}:{choice.applied_version}", "warning",
                         "status block reports an invalid placement; assuming the initial one",
                         job=self.job, rank=choice.rank, version=choice.applied_version, reason=exc)
        return 0, initial_placement(self.shape.layers, self.shape.experts, topo)

    def reset(self, generation: int, world: int, shape: RingShape) -> None:
        self.generation, self.world, self.shape = generation, world, shape
        self.hi_step = -1
        self.pending.clear()
        self.incomplete = 0

    def close(self) -> None:
        for f in [*self.ranks.values(), *self.statuses.values()]:
            f.close()
        self.ranks.clear()
        self.statuses.clear()


class Ingest:
    """Polls the runtime directory; :meth:`poll` returns the new intervals of every job."""

    def __init__(self, directory: Path, log: Log, intervals: int, stale_after_s: float = STALE_AFTER_S,
                 only_job: str | None = None):
        self.directory = Path(directory)
        self.only_job = only_job
        self.log = log
        self.intervals = intervals
        self.stale_after_s = stale_after_s
        self.jobs: dict[str, JobFeed] = {}
        self.bad_segments = 0  # distinct (file, reason) pairs that could not be used

    def configure(self, intervals: int) -> None:
        self.intervals = intervals
        for job in self.jobs.values():
            for feed in job.ranks.values():
                feed.resize(intervals)

    def poll(self, now: float) -> dict[str, JobUpdate]:
        found = [f for f in discover(self.directory) if self.only_job in (None, f[1])]
        rings = {(job, rank): path for kind, job, rank, path in found if kind == "ring"}
        statuses = {(job, rank): path for kind, job, rank, path in found if kind == "status"}
        for name in {job for job, _ in rings} | {job for job, _ in statuses}:
            self.jobs.setdefault(name, JobFeed(name))
        updates = {}
        for name, job in list(self.jobs.items()):
            self._sync_rings(job, {r: p for (j, r), p in rings.items() if j == name}, now)
            if not job.ranks and not any((j == name) for j, _ in statuses):
                if job.shape is not None:
                    self.log.info("job gone: no rings or status blocks left", job=name)
                job.close()
                del self.jobs[name]
                continue
            update = JobUpdate()
            self._follow_generation(job, update)
            self._sync_statuses(job, {r: p for (j, r), p in statuses.items() if j == name})
            if job.shape is not None:
                update.intervals = self._read_rings(job, now)
                self._note_stale(job, now)
            updates[name] = update
        return updates

    def close(self) -> None:
        for job in self.jobs.values():
            job.close()
        self.jobs.clear()

    # -- segments -----------------------------------------------------------------------------------

    def _open_bad(self, path: Path, problem: SegmentError | str) -> None:
        reason = problem.reason if isinstance(problem, SegmentError) else problem
        if self.log.once(f"bad:{path}:{reason}", "warning", "ignoring segment", path=path, reason=reason):
            self.bad_segments += 1

    def _open_checked(self, path: Path, open_reader: Callable[[Path], R],
                      problem_of: Callable[[R, JobFeed, int], str | None], job: JobFeed,
                      rank: int) -> R | None:
        """``open_reader(path)``, or None (the segment is logged as bad) when it does not open or
        ``problem_of(reader, job, rank)`` finds it does not belong there."""
        try:
            reader = open_reader(path)
        except SegmentError as exc:
            self._open_bad(path, exc)
            return None
        problem = problem_of(reader, job, rank)
        if problem:
            reader.close()
            self._open_bad(path, problem)
            return None
        return reader

    def _sync_rings(self, job: JobFeed, paths: dict[int, Path], now: float) -> None:
        for rank in [r for r in job.ranks if r not in paths]:
            self.log.info("rank ring removed", job=job.job, rank=rank)
            job.ranks.pop(rank).close()
        for rank, path in paths.items():
            feed = job.ranks.get(rank)
            if feed is not None and not feed.reader.replaced():
                continue
            if feed is not None:
                job.ranks.pop(rank).close()
            reader = self._open_checked(path, TelemetryReader.open, _ring_problem, job, rank)
            if reader is None:
                continue
            info = reader.info
            job.ranks[rank] = RankFeed(reader, now, self.intervals)
            self.log.info("rank attached", job=job.job, rank=rank, world=info.world,
                          generation=f"{info.generation:x}")

    def _follow_generation(self, job: JobFeed, update: JobUpdate) -> None:
        if not job.ranks:
            return
        newest = max(job.ranks.values(), key=lambda f: f.created_ns)
        if newest.generation != job.generation or job.shape is None:
            if job.shape is not None:
                update.restarted_from = job.generation
                self.log.info("runtime restarted: new generation, windows reset", job=job.job,
                              old=f"{job.generation:x}", new=f"{newest.generation:x}")
            job.reset(newest.generation, newest.world, newest.shape)
        for rank, feed in list(job.current_ranks().items()):
            if feed.world != job.world or feed.shape != job.shape:
                self._open_bad(feed.reader.path, f"world {feed.world} / shape {feed.shape} differ from "
                                                 f"rank {newest.rank}'s in the same generation")
                job.ranks.pop(rank).close()

    def _sync_statuses(self, job: JobFeed, paths: dict[int, Path]) -> None:
        for rank in [r for r in job.statuses if r not in paths]:
            job.statuses.pop(rank).close()
        for rank, path in paths.items():
            feed = job.statuses.get(rank)
            if feed is not None and feed.reader.replaced():
                job.statuses.pop(rank).close()
                feed = None
            if feed is None:
                reader = self._open_checked(path, StatusReader.open, _status_problem, job, rank)
                if reader is None:
                    continue
                feed = job.statuses[rank] = StatusFeed(reader)
            if job.shape is not None and (feed.reader.info.layers, feed.reader.info.slots) != (
                    job.shape.layers, job.slots):
                continue  # a status block of another generation's model; it will be replaced
            status = feed.reader.read()
            if status is not None:
                feed.latest = status

    # -- records ------------------------------------------------------------------------------------

    def _read_rings(self, job: JobFeed, now: float) -> list[Interval]:
        records = []
        for rank, feed in job.current_ranks().items():
            for rec in feed.reader.poll():
                problem = _check_record(rec, job.job, rank, feed)
                if problem:
                    feed.rejected += 1
                    self.log.once(f"record:{job.job}:{rank}:{feed.generation}", "warning",
                                  "dropping invalid telemetry record", job=job.job, rank=rank, seq=rec.seq,
                                  reason=problem)
                    continue
                feed.accept(rec)
                records.append(rec)
        records.sort(key=lambda r: (r.last_step, r.rank))
        out = []
        for rec in records:
            if rec.last_step <= job.hi_step:
                continue  # this interval was already counted (from another rank)
            if rec.global_routed is not None:
                job.pending.pop((rec.first_step, rec.last_step), None)
                out.append(Interval(job.generation, rec.first_step, rec.last_step, rec.wall_ns / 1e9,
                                    np.array(rec.global_routed, dtype=np.int64), True))
                job.hi_step = rec.last_step
            else:
                job.pending.setdefault((rec.first_step, rec.last_step), {})[rec.rank] = rec
        return out + self._complete_local(job, now)

    def _complete_local(self, job: JobFeed, now: float) -> list[Interval]:
        """Local sums whose live ranks have all reported, or that every live rank has moved past.
        One missing an attached rank's share (stale, or its record lost) counts as incomplete."""
        live = set(job.live_ranks(now, self.stale_after_s))
        attached = set(job.current_ranks())
        latest = {r: f.last.last_step for r, f in job.current_ranks().items() if f.last is not None}
        out = []
        for key in sorted(job.pending):
            parts = job.pending[key]
            done = live <= parts.keys()
            passed = all(latest.get(r, -1) > key[1] for r in live - parts.keys())
            if not (done or passed or len(job.pending) > _MAX_PENDING):
                break  # keep step order: later ranges wait for this one
            del job.pending[key]
            if key[1] <= job.hi_step:
                continue
            if not attached <= parts.keys():
                job.incomplete += 1
            counts = np.sum([p.routed for p in parts.values()], axis=0, dtype=np.int64)
            wall = max(p.wall_ns for p in parts.values()) / 1e9
            out.append(Interval(job.generation, key[0], key[1], wall, counts, False, tuple(sorted(parts))))
            job.hi_step = key[1]
        return out

    def _note_stale(self, job: JobFeed, now: float) -> None:
        for rank, feed in job.current_ranks().items():
            key = f"stale:{job.job}:{rank}"
            age = feed.age(now)
            if age > self.stale_after_s:
                self.log.once(key, "warning", "rank stopped publishing", job=job.job, rank=rank,
                              age_s=round(age, 1))
            elif self.log.forget(key):
                self.log.info("rank publishing again", job=job.job, rank=rank)


def _status_problem(reader: StatusReader, job: JobFeed, rank: int) -> str | None:
    """Why a status block does not belong where its file name puts it, or None."""
    info = reader.info
    if info.job != job.job or info.rank != rank:
        return f"header names job {info.job!r} rank {info.rank}"
    return None


def _ring_problem(reader: TelemetryReader, job: JobFeed, rank: int) -> str | None:
    """Why a ring whose header validated still does not belong where its file name puts it, or None."""
    info = reader.info
    if info.job != job.job:
        return f"header names job {info.job!r}"
    if info.rank != rank:
        return f"header names rank {info.rank}"
    if not 0 <= rank < info.world:
        return f"rank {rank} outside world {info.world}"
    same_generation = info.generation == job.generation and job.shape is not None
    if same_generation and (info.world, reader.shape) != (job.world, job.shape):
        return f"world {info.world} / shape {reader.shape} differ from the job's in the same generation"
    return None


def _check_record(rec: TelemetryRecord, job: str, rank: int, feed: RankFeed) -> str | None:
    """Why a checksummed record still cannot be used, or None."""
    if rec.job != job or rec.rank != rank:
        return f"record names job {rec.job!r} rank {rec.rank}"
    if rec.generation != feed.generation or rec.world != feed.world:
        return f"record generation {rec.generation:x} / world {rec.world} differ from the ring's"
    if rec.last_step < rec.first_step:
        return f"step range {rec.first_step}..{rec.last_step} is reversed"
    counts = [rec.routed, rec.received] + ([rec.global_routed] if rec.global_routed is not None else [])
    if any(c.min(initial=0) < 0 for c in counts):
        return "negative token count"
    times = np.concatenate([rec.dispatch_us, rec.combine_us, rec.expert_us, [rec.step_us]])
    if not np.isfinite(times).all() or times.min(initial=0) < 0:
        return "timing not finite or negative"
    return None
