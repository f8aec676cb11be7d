"""`balancerd record`: record a count trace from the live telemetry rings (no daemon needed).

The rings are read with balancerd.ingest, as the daemon reads them: each publish interval counted once
(the all-reduced counts, else the sum over ranks), generations followed. The ring's history (up to its
capacity) comes first, then new intervals until --seconds pass or Ctrl-C. Each interval keeps the
ranks' timings (dispatch, combine, expert, step; mean over the ranks whose record a second reader of the
rings got) and tokens per step per rank; NaN where no rank's record was read.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from balancerd.commands import UsageError
from balancerd.protocol import SegmentError, TelemetryReader, discover


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, metavar="FILE", help="trace to write (.npz)")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to record (default 60)")
    parser.add_argument("--runtime-dir", metavar="DIR",
                        help="where the rings are (default: $BALANCERD_RUNTIME_DIR, /run/balancerd, ...)")
    parser.add_argument("--job", help="the job to record (needed when several publish)")
    parser.add_argument("--poll", type=float, default=0.1, help="seconds between reads (default 0.1)")
    parser.set_defaults(func=run)


PER_LAYER = ("dispatch_us", "combine_us", "expert_us")
FIELDS = (*PER_LAYER, "step_us", "tokens")


class _Timings:
    """Every record's timings, from a second reader of each ring (the ingest keeps only the counts),
    by (job, generation, last step) and rank."""

    def __init__(self, directory: Path, job: str | None):
        self.directory, self.job = directory, job
        self.readers: dict[Path, TelemetryReader] = {}
        self.by_interval: dict[tuple[str, int, int], dict[int, tuple]] = {}

    def poll(self) -> None:
        for kind, job, _, path in discover(self.directory):
            if kind != "ring" or self.job not in (None, job):
                continue
            reader = self.readers.get(path)
            if reader is None or reader.replaced():
                try:
                    reader = self.readers[path] = TelemetryReader.open(path)
                except SegmentError:
                    continue
            for r in reader.poll():
                per_step = r.tokens / (r.last_step - r.first_step + 1)
                self.by_interval.setdefault((r.job, r.generation, r.last_step), {})[r.rank] = (
                    r.dispatch_us, r.combine_us, r.expert_us, r.step_us, per_step)

    def of(self, job: str, interval) -> dict[str, np.ndarray | float]:
        """Mean over the ranks that reported the interval; NaN where none did."""
        ranks = self.by_interval.get((job, interval.generation, interval.last_step))
        if not ranks:
            layers = interval.counts.shape[0]
            return {k: np.full(layers, np.nan) if k in PER_LAYER else np.nan for k in FIELDS}
        columns = zip(*ranks.values(), strict=True)
        return {k: np.mean(np.asarray(v, np.float64), axis=0) for k, v in zip(FIELDS, columns, strict=True)}

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


class _Job:
    """Intervals of one job as they arrive."""

    def __init__(self, world: int, slots: int):
        self.world, self.slots = world, slots
        self.counts, self.wall, self.first, self.last = [], [], [], []
        self.timings: dict[str, list] = {k: [] for k in FIELDS}

    def add(self, interval, timings: dict) -> None:
        self.counts.append(np.asarray(interval.counts, np.int64))
        self.wall.append(interval.wall_s)
        self.first.append(interval.first_step)
        self.last.append(interval.last_step)
        for key in FIELDS:
            self.timings[key].append(timings[key])


def run(args: argparse.Namespace) -> int:
    from balancerd.ingest import Ingest
    from balancerd.lab.trace import Trace, write_trace
    from balancerd.log import Log
    from balancerd.protocol import runtime_dir

    directory = Path(args.runtime_dir) if args.runtime_dir else runtime_dir(create=False)
    if not directory.is_dir():
        raise UsageError(f"no runtime directory {directory}")
    ingest = Ingest(directory, Log("error"), intervals=1, only_job=args.job)
    timings = _Timings(directory, args.job)
    jobs: dict[str, _Job] = {}
    deadline = time.monotonic() + args.seconds
    try:
        while True:
            updates = ingest.poll(time.time())
            timings.poll()
            for name, update in updates.items():
                feed = ingest.jobs[name]
                if update.restarted_from is not None and name in jobs:
                    print(f"record: job {name} restarted; keeping the new generation only", flush=True)
                    del jobs[name]
                if update.intervals:
                    job = jobs.setdefault(name, _Job(feed.world, feed.slots))
                    for interval in update.intervals:
                        job.add(interval, timings.of(name, interval))
            if time.monotonic() >= deadline:
                break
            time.sleep(args.poll)
    except KeyboardInterrupt:
        pass
    finally:
        ingest.close()
        timings.close()
    if not jobs:
        raise UsageError(f"no telemetry intervals found in {directory}"
                         + (f" for job {args.job}" if args.job else ""))
    if len(jobs) > 1:
        raise UsageError(f"several jobs publish ({', '.join(sorted(jobs))}): choose one with --job")
    name, job = next(iter(jobs.items()))
    first, last = np.asarray(job.first), np.asarray(job.last)
    trace = Trace(np.stack(job.counts), np.asarray(job.wall, np.float64), last - first + 1, gpus=job.world,
                  slots=job.slots, job=name, **{k: np.asarray(v, np.float64) for k, v in job.timings.items()})
    write_trace(args.out, trace)
    print(f"wrote {args.out}: {trace.intervals} intervals of job {name} ({trace.layers} layers x "
          f"{trace.experts} experts, {job.world} ranks, steps {int(first[0])}..{int(last[-1])})")
    return 0
