"""The daemon loop: ingest -> windows -> detect -> (leader) plan -> decide -> publish, and its state.

One :class:`Daemon` follows every job in the runtime directory. Only the daemon that reads a job's
rank 0 ring (the leader) plans for it and writes its control block; the others observe. Everything
shared with the API thread is guarded by one lock; :meth:`Daemon.snapshot` is the state the API,
``balancerd status``, metrics and the TUI read.
"""

from __future__ import annotations

import dataclasses
import os
import select
import threading
import time
from collections.abc import Callable

import numpy as np

from balancerd import api_handlers
from balancerd.api import ApiServer, Peer
from balancerd.api_handlers import EXPERT_LOAD_LAYERS
from balancerd.config import (
    DaemonConfig,
    PolicyConfig,
    resolve_runtime_dir,
    resolve_socket,
    resolve_state_dir,
)
from balancerd.detect import (
    WindowView,
    attribute_stragglers,
    cross_check,
    detect,
    layer_loads,
    note_plan,
)
from balancerd.ingest import STALE_AFTER_S, Ingest, Interval, JobFeed
from balancerd.jobrun import RATIO_HISTORY, JobRun
from balancerd.log import Log
from balancerd.metrics import Metrics
from balancerd.numbers import assignments, fmt, per_gpu
from balancerd.placement import PlacementError, Topology
from balancerd.plans import (
    DIFF_LIMIT,
    PLAN_STATES_FINAL,
    PlanRecord,
    Proposal,
    Realising,
    check_plan,
    read_acks,
    unresolved_plan,
)
from balancerd.policy import control_policy
from balancerd.proposals import propose
from balancerd.protocol import (
    ControlPlan,
    ControlReader,
    ControlWriter,
    Mode,
    SegmentError,
    control_path,
)
from balancerd.snapshot import daemon_snapshot, job_snapshot
from balancerd.state import JobState, StateError, StateStore

__all__ = ["DIFF_LIMIT", "EXPERT_LOAD_LAYERS", "PLAN_STATES_FINAL", "RATIO_HISTORY", "Daemon", "JobRun",
           "PlanRecord", "Proposal"]


class Daemon:
    """Follows the runtime directory; see the module docstring. Call :meth:`close` when done."""

    def __init__(self, config: DaemonConfig, log: Log | None = None, serve_api: bool = True,
                 stale_after_s: float = STALE_AFTER_S):
        self.config = config
        self.log = log or Log(config.log_level)
        self.runtime_dir = resolve_runtime_dir(config)
        self.state_dir = resolve_state_dir(config)
        self.socket_path = resolve_socket(config)
        self.store = StateStore(self.state_dir)
        try:
            self.saved: dict[str, JobState] = self.store.load()
        except StateError as exc:
            # Versions stay monotonic anyway: attaching reads the newest one from the control block.
            self.log.error("state file unusable; starting from empty state", reason=exc)
            self.saved = {}
        self.ingest = Ingest(self.runtime_dir, self.log, config.window.intervals, stale_after_s, config.job)
        self.runs: dict[str, JobRun] = {}
        self.started_s = time.time()
        self.steps = 0
        self._lock = threading.RLock()
        self._stopping = False
        # A pipe, not a threading.Event: stop() and wake() must be safe inside a signal handler, which
        # may interrupt the main thread while it holds an Event's lock.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.api = ApiServer(self.socket_path, self.handle, self.log, config.api.group) if serve_api else None
        self.metrics: Metrics | None = None  # started by run_forever; observe() feeds it after each step

    # -- lifecycle ----------------------------------------------------------------------------------

    def run_forever(self, on_tick: Callable[[], None] | None = None) -> None:
        """Step every ``poll_interval_s`` until :meth:`stop`; ``on_tick()`` runs between steps (the
        `run` command handles SIGHUP there)."""
        if self.api is not None:
            self.api.start()
        try:
            self.metrics = Metrics.start(self.config.metrics, self.log, self.saved)
        except ImportError as exc:  # a node without the OpenTelemetry packages still balances
            self.log.error("metrics are off: OpenTelemetry is not installed", reason=exc)
        self.log.info("balancerd started", pid=os.getpid(), runtime_dir=self.runtime_dir,
                      state_dir=self.state_dir, socket=self.socket_path)
        while not self._stopping:
            started = time.monotonic()
            self.step(time.time())
            if on_tick is not None:
                on_tick()
            if self._stopping:
                break
            left = self.config.poll_interval_s - (time.monotonic() - started)
            if left > 0 and select.select([self._wake_r], [], [], left)[0]:
                _drain(self._wake_r)

    def wake(self) -> None:
        """Cut the current wait short (safe from a signal handler and from other threads)."""
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:  # the pipe is full: a wake-up is already pending
            pass

    def stop(self) -> None:
        """Make :meth:`run_forever` return after the current step (safe from a signal handler)."""
        self._stopping = True
        self.wake()

    def close(self) -> None:
        if self.api is not None:
            self.api.stop()
        if self.metrics is not None:
            self.metrics.close()
        with self._lock:
            for run in self.runs.values():
                run.close()
            self.runs.clear()
            self.ingest.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.log.info("balancerd stopped")

    def reload(self, config: DaemonConfig) -> None:
        """Use a new configuration; windows, detector state, plans and overrides are kept."""
        with self._lock:
            old = self.config
            for key in ("runtime_dir", "state_dir", "api", "job", "metrics"):
                if getattr(old, key) != getattr(config, key):
                    self.log.warning("config key changed; it takes effect on restart", key=key)
            config = dataclasses.replace(config, runtime_dir=old.runtime_dir, state_dir=old.state_dir,
                                         api=old.api, job=old.job, metrics=old.metrics)
            self.config = config
            self.log.set_level(config.log_level)
            self.ingest.configure(config.window.intervals)
            for run in self.runs.values():
                run.window.configure(config.window.intervals, config.window.decay_half_life_s)
            self.log.info("configuration reloaded")

    # -- the loop -----------------------------------------------------------------------------------

    def step(self, now: float) -> None:
        """One pass: read every ring and status block, then detect, plan and track acks per job."""
        with self._lock:
            self.steps += 1
            updates = self.ingest.poll(now)
            for job in [j for j in self.runs if j not in updates]:
                self.runs.pop(job).close()
            for job, update in updates.items():
                feed = self.ingest.jobs[job]
                if feed.shape is None:
                    continue
                try:
                    self._step_job(job, feed, update.intervals, now)
                except Exception as exc:  # one job's failure must not stop the others
                    self.log.once(f"job-error:{job}:{type(exc).__name__}", "error", "job step failed",
                                  job=job, error=f"{type(exc).__name__}: {exc}")
            if self.metrics is not None:
                self.metrics.observe(self, now)

    def _step_job(self, job: str, feed: JobFeed, intervals: list, now: float) -> None:
        run = self._run_for(job, feed)
        if feed.leader and run.control is None:
            self._attach_control(job, run, feed)
        self._track_acks(job, run, feed, now)
        if not intervals:
            return
        version, served = feed.served_placement(self.log)
        topo = Topology(gpus=feed.world, slots=feed.slots)
        for iv in intervals:  # the detector advances once per interval, whatever the poll rate
            run.window.add(iv.counts, iv.wall_s)
            run.last_interval = iv
            counts = run.window.sliding.sum()
            view = WindowView(counts=counts, assignments=assignments(counts), phys_to_log=served, topo=topo)
            run.detector, run.detection = detect(run.detector, view, now, self.config.detect)
            d = run.detection
            run.ratio_history.append(d.max_min)
            self._measure_realised(job, run, iv, version)
            if d.newly_flagged:
                worst = max(d.newly_flagged, key=lambda i: d.max_min[i])
                self.log.info("layers imbalanced", job=job, layers=_layer_list(d.newly_flagged),
                              worst=worst, max_min=fmt(d.max_min[worst]))
            if d.cleared:
                self.log.info("layers balanced again", job=job, layers=_layer_list(d.cleared))
        self._measure_ranks(job, run, feed, counts, served, topo)
        pcfg = self.policy_config(job)
        if (feed.leader and pcfg.mode == "automatic" and run.detection.should_plan
                and now >= run.publish_after
                and (run.last_plan is None or run.last_plan.state != "pending")):
            try:
                proposal = self.propose(job, run, feed)
                if proposal.push:
                    self.publish(job, run, feed, proposal, now, "auto")
                    self.log.forget(f"nopush:{job}")
                else:  # logged once per episode: the reason's numbers change every interval
                    self.log.once(f"nopush:{job}", "info", "plan not pushed", job=job, reason=proposal.reason)
                self.log.forget(f"noplan:{job}")
            except PlacementError as exc:
                self.log.once(f"noplan:{job}", "error", "cannot plan", job=job, reason=exc)
        elif not run.detection.flagged:
            self.log.forget(f"nopush:{job}")

    def _run_for(self, job: str, feed: JobFeed) -> JobRun:
        run = self.runs.get(job)
        if run is not None and run.generation == feed.generation:
            return run
        fresh = JobRun(feed, self.config)
        if run is not None:
            if run.same_model(feed):
                fresh.control, fresh.control_version = run.control, run.control_version
            else:
                run.close()
            fresh.last_plan = run.last_plan
            if fresh.last_plan is not None and fresh.last_plan.state not in PLAN_STATES_FINAL:
                self._resolve(job, fresh.last_plan, "superseded", "runtime restarted before it was applied")
        saved = self.saved.setdefault(job, JobState())
        if run is None:
            fresh.last_plan = unresolved_plan(saved)
        if saved.generation != feed.generation:
            saved.generation = feed.generation
            self.save()
        self.runs[job] = fresh
        return fresh

    # -- control block and acknowledgements ---------------------------------------------------------

    def _attach_control(self, job: str, run: JobRun, feed: JobFeed) -> None:
        """Reattach to the job's control block (keeping the file the leader has mapped) or create it."""
        L, E, S = feed.shape.layers, feed.shape.experts, feed.slots
        path = control_path(self.runtime_dir, job)
        if path.exists():
            try:
                reader = ControlReader.open(path, L, E, S)
                try:
                    plan = reader.read()
                finally:
                    reader.close()
                run.control = ControlWriter.open(path)
                run.control_version = plan.version if plan is not None else 0
                self.log.info("control block reattached", job=job, version=run.control_version)
                return
            except SegmentError as exc:
                self.log.warning("control block unusable; creating a new one", job=job, reason=exc.reason)
        run.control = ControlWriter.create(self.runtime_dir, job, L, E, S, feed.world, feed.generation)
        self.log.info("control block created", job=job, path=path)

    def _track_acks(self, job: str, run: JobRun, feed: JobFeed, now: float) -> None:
        plan = run.last_plan
        if plan is None or plan.state in PLAN_STATES_FINAL:
            return
        timeout_s = self.policy_config(job).ack_timeout_s
        outcome = read_acks(plan, feed.current_statuses(), now, timeout_s)
        if outcome is None:
            return
        run.note_outcome(outcome.state, now, timeout_s)
        if outcome.state != "unacknowledged":
            self._resolve(job, plan, outcome.state, outcome.why)
            if outcome.state == "applied":
                run.realising = Realising(plan, outcome.start_step)
            return
        plan.state = "unacknowledged"
        self.log.warning("plan not acknowledged in time", job=job, version=plan.version, timeout_s=timeout_s,
                         acks=",".join(f"{r}:{a}" for r, a in sorted(plan.acks.items())) or "none")
        self._record_outcome(job, plan)

    def _resolve(self, job: str, plan: PlanRecord, state: str, why: str) -> None:
        plan.state = state
        level = "warning" if state == "rejected" else "info"
        self.log.emit(level, f"plan {state}", job=job, version=plan.version, detail=why)
        self._record_outcome(job, plan)

    def _record_outcome(self, job: str, plan: PlanRecord) -> None:
        for entry in self.saved.setdefault(job, JobState()).history:
            if entry["version"] == plan.version:
                entry["state"] = plan.state
                entry["rejection"] = plan.rejection
                entry["realised_balancedness"] = plan.realised
        self.save()

    # -- measurements -------------------------------------------------------------------------------

    def _measure_realised(self, job: str, run: JobRun, iv: Interval, served_version: int) -> None:
        """Count an interval towards the applied plan's first full window; once the window holds only
        such intervals, its balancedness is the plan's realised one. A plan no longer served is dropped."""
        r = run.realising
        if r is None or iv.first_step < r.start_step:
            return
        if served_version != r.plan.version:
            run.realising = None
            return
        r.intervals += 1
        if r.intervals < run.window.sliding.intervals:
            return
        bal = run.detection.balancedness
        r.plan.realised = {"mean": fmt(bal.mean()), "worst": fmt(bal.max())}
        run.realising = None
        self.log.info("plan measured", job=job, version=r.plan.version, mean=r.plan.realised["mean"],
                      worst=r.plan.realised["worst"])
        self._record_outcome(job, r.plan)

    def _measure_ranks(self, job: str, run: JobRun, feed: JobFeed, counts: np.ndarray, served: np.ndarray,
                       topo: Topology) -> None:
        ranks = {r: f for r, f in feed.current_ranks().items() if len(f.times)}
        run.stragglers = []
        if len(ranks) >= 2:
            ids = sorted(ranks)
            means = [ranks[r].mean_times() for r in ids]
            found = attribute_stragglers(*(np.stack([m[k] for m in means]) for k in
                                           ("dispatch_us", "combine_us", "expert_us")),
                                         np.array([m["step_us"] for m in means]),
                                         self.config.detect.straggler_threshold)
            run.stragglers = [dataclasses.replace(s, rank=ids[s.rank],
                                                  waiting_ranks=tuple(ids[w] for w in s.waiting_ranks))
                              for s in found]
        for s in run.stragglers:
            self.log.once(f"straggler:{job}:{s.rank}", "warning", "straggler rank", job=job, rank=s.rank,
                          late_us=fmt(s.late_us), waiting=",".join(map(str, s.waiting_ranks)))
        for rank in feed.ranks:
            if rank not in {s.rank for s in run.stragglers}:
                self.log.forget(f"straggler:{job}:{rank}")
        if set(ranks) == set(range(feed.world)):
            received = np.concatenate([ranks[r].received.sum() for r in sorted(ranks)], axis=1)
            run.mismatch = cross_check(layer_loads(counts, served, topo),
                                       per_gpu(received, feed.shape.slots_per_rank))
        else:
            run.mismatch = None

    # -- planning and publishing --------------------------------------------------------------------

    def policy_config(self, job: str) -> PolicyConfig:
        """The configured policy with the job's API overrides applied."""
        saved = self.saved.get(job)
        pcfg = self.config.policy
        if saved is None:
            return pcfg
        return dataclasses.replace(pcfg, kind=saved.policy or pcfg.kind, mode=saved.mode or pcfg.mode)

    def propose(self, job: str, run: JobRun, feed: JobFeed) -> Proposal:
        """What the job's policy would publish now; ``push`` says whether it would on its own."""
        return propose(job, run, feed, self.policy_config(job), self.config.planner, self.log)

    def publish(self, job: str, run: JobRun, feed: JobFeed, proposal: Proposal, now: float,
                source: str) -> int:
        if proposal.generation != feed.generation or run.generation != feed.generation:
            raise PlacementError(f"the plan was made for generation {proposal.generation:x}, the runtime "
                                 f"is now at {feed.generation:x}; not published")
        check_plan(proposal, feed)
        if run.control is None:
            self._attach_control(job, run, feed)
        saved = self.saved.setdefault(job, JobState())
        seen = [max(st.applied_version, st.pending_version, st.result_version)
                 for st in feed.current_statuses().values()]
        version = max([saved.last_version, run.control_version, *seen]) + 1
        policy, _ = control_policy(dataclasses.replace(self.config.policy, kind=proposal.policy))
        pcfg = self.policy_config(job)
        run.control.publish(ControlPlan(
            version=version, generation=proposal.generation, phys_to_log=proposal.phys_to_log, policy=policy,
            mode=Mode.AUTOMATIC, selection_bias=proposal.selection_bias,
            max_reroute_fraction=pcfg.max_reroute_fraction, capacity_factor=proposal.capacity_factor,
            created_ns=int(now * 1e9)))
        if run.last_plan is not None and run.last_plan.state not in PLAN_STATES_FINAL:
            self._resolve(job, run.last_plan, "superseded", f"version {version} published")
        if proposal.selection_bias is not None:
            run.bias = proposal.selection_bias
        run.capacity_factor = proposal.capacity_factor
        run.last_plan = PlanRecord(version, proposal.generation, proposal.policy, source, now,
                                   proposal.reason, proposal.summary)
        run.detector = note_plan(run.detector, now)
        saved.last_version = version
        saved.record({"version": version, "generation": f"{proposal.generation:x}", "policy": proposal.policy,
                      "source": source, "published": now, "reason": proposal.reason, "state": "pending",
                      "rejection": None, "realised_balancedness": None, **proposal.summary},
                     self.store.history_limit)
        self.save()
        self.log.info("plan published", job=job, version=version, policy=proposal.policy, source=source,
                      reason=proposal.reason)
        return version

    def save(self) -> None:
        try:
            self.store.save(self.saved)
        except OSError as exc:
            self.log.once(f"save:{exc.errno}", "error", "cannot save state", path=self.store.path,
                          reason=exc.strerror)

    # -- the state API ------------------------------------------------------------------------------

    def handle(self, request: dict, peer: Peer) -> dict:
        """Serve one API request (called from the API threads)."""
        handler = api_handlers.handler_for(request["op"])
        with self._lock:
            return handler(self, request, peer)

    # -- the state snapshot -------------------------------------------------------------------------

    def snapshot(self, now: float) -> dict:
        """Everything the daemon knows, as JSON-ready data: ``{"daemon": {...}, "jobs": {job: {...}}}``."""
        with self._lock:
            return {
                "daemon": daemon_snapshot(self.config, self.started_s, self.steps, self.runtime_dir,
                                          self.state_dir, self.socket_path, self.ingest.bad_segments, now),
                "jobs": {job: self._job_snapshot(job, run, self.ingest.jobs[job], now)
                         for job, run in sorted(self.runs.items())},
            }

    def _job_snapshot(self, job: str, run: JobRun, feed: JobFeed, now: float) -> dict:
        saved = self.saved.get(job, JobState())
        pcfg = self.policy_config(job)
        return job_snapshot(run, feed, saved, pcfg, self.log, now, self.ingest.stale_after_s)


def _layer_list(layers: tuple[int, ...], limit: int = 16) -> str:
    """"0,3,7" for a log line; long lists end with "... (N in all)"."""
    head = ",".join(map(str, layers[:limit]))
    return head if len(layers) <= limit else f"{head},... ({len(layers)} in all)"


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
