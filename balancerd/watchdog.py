"""systemd's watchdog: ping it from the daemon's main loop, and only while ingest is healthy.

Pings are sent from the callback the main loop runs after every completed step, never from a timer
thread: a step that hangs (a deadlock, a blocked read) sends none, and systemd restarts the daemon
once ``WatchdogSec`` passes without one.

Ingest is *healthy* when no job the daemon follows is stalled, judged from
:meth:`balancerd.daemon.Daemon.snapshot` at every health check (twice per watchdog timeout):

* records **arrive** for a job when the count of records its current-generation ranks passed
  (``accepted`` minus ``rejected``) changed since the previous check;
* the job **progresses** when its generation or the count of intervals its window has taken in
  (``window.added``) changed since the previous check;
* it is **stalled** once records have kept arriving, check after check, without progress for longer
  than ``stall_after_s`` (the watchdog timeout): the daemon reads records and none reaches the
  detector.

A check at which nothing arrived restarts the clock, so an idle, paused or dead engine never
withholds pings: restarting the daemon cannot make an engine publish, and the stale-rank warning and
alerts report it. Records that fail validation are not counted as arriving either; the daemon counts
those and keeps running.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from balancerd.log import Log
from balancerd.sdnotify import Notifier


@dataclass
class _Seen:
    progress: tuple[str, int]  # (generation, intervals added to the window)
    passed: int                # records of the current generation that passed validation
    since: float               # start of the current run of checks with arrivals and no progress


class IngestHealth:
    """Tracks each job across snapshots; see the module docstring for the rule."""

    def __init__(self, stall_after_s: float):
        self.stall_after_s = stall_after_s
        self._jobs: dict[str, _Seen] = {}

    def stalled(self, snapshot: dict, now: float) -> dict[str, float]:
        """The stalled jobs of ``snapshot``, each with the seconds it has been stalling; ``now`` is a
        monotonic time."""
        out = {}
        jobs = snapshot["jobs"]
        for job in [j for j in self._jobs if j not in jobs]:
            del self._jobs[job]
        for job, state in jobs.items():
            progress = (state["generation"], state["window"]["added"])
            passed = sum(r["accepted"] - r["rejected"] for r in state["ranks"] if r["current"])
            seen = self._jobs.get(job)
            if seen is None or seen.progress != progress or seen.passed == passed:
                self._jobs[job] = _Seen(progress, passed, now)
                continue
            seen.passed = passed
            if now - seen.since > self.stall_after_s:
                out[job] = now - seen.since
        return out


class Watchdog:
    """Sends ``WATCHDOG=1`` every half timeout while ingest is healthy; call :meth:`tick` from the loop."""

    def __init__(self, notifier: Notifier, timeout_s: float, log: Log,
                 clock: Callable[[], float] = time.monotonic):
        self.notifier, self.log, self.clock = notifier, log, clock
        self.period_s = timeout_s / 2  # as sd_watchdog_enabled(3) advises
        self.health = IngestHealth(stall_after_s=timeout_s)
        self.stalled: dict[str, float] = {}
        self._next = clock()

    def tick(self, snapshot: Callable[[], dict]) -> bool:
        """Check health and ping when a ping is due; returns whether one was sent. ``snapshot`` is
        called only then, so its cost is paid twice per timeout, not every step."""
        now = self.clock()
        if now < self._next:
            return False
        self._next = now + self.period_s
        stalled = self.health.stalled(snapshot(), now)
        if stalled and not self.stalled:
            self.log.warning("ingest stalled: records arrive but none reach the window; watchdog pings "
                             "withheld", jobs=",".join(sorted(stalled)),
                             stalled_s=round(max(stalled.values()), 1))
            self.notifier.notify(STATUS=f"ingest stalled: {', '.join(sorted(stalled))}")
        elif self.stalled and not stalled:
            self.log.info("ingest flowing again; watchdog pings resumed")
            self.notifier.notify(STATUS="running")
        self.stalled = stalled
        return not stalled and self.notifier.notify(WATCHDOG=1)
