"""The daemon loop: ingest -> windows -> detect -> (leader) plan -> decide -> publish, and its state.

One :class:`Daemon` follows every job in the runtime directory. Only the daemon that reads a job's
rank 0 ring (the leader) plans for it and writes its control block; the others observe. Everything
shared with the API thread is guarded by one lock; :meth:`Daemon.snapshot` is the state the API,
``balancerd status``, metrics and the TUI read.
"""

from __future__ import annotations

import dataclasses
import math
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from balancerd import planner
from balancerd.api import ApiServer, Peer, RequestError
from balancerd.config import (
    POLICY_KINDS,
    DaemonConfig,
    PolicyConfig,
    resolve_runtime_dir,
    resolve_socket,
    resolve_state_dir,
)
from balancerd.detect import (
    Detection,
    DetectorState,
    Straggler,
    WindowView,
    attribute_stragglers,
    cross_check,
    detect,
    layer_loads,
    note_plan,
)
from balancerd.ingest import STALE_AFTER_S, Ingest, Interval, JobFeed
from balancerd.log import Log
from balancerd.metrics import Metrics
from balancerd.placement import PlacementError, Topology, replica_counts, validate_placement
from balancerd.policy import capacity_factor_for, control_policy, decide_push, moe_share, token_bias
from balancerd.protocol import (
    ControlPlan,
    ControlReader,
    ControlWriter,
    Mode,
    PlanResult,
    SegmentError,
    control_path,
)
from balancerd.state import JobState, StateError, StateStore
from balancerd.window import LoadWindow

PLAN_STATES_FINAL = ("applied", "rejected", "superseded")
RATIO_HISTORY = 32        # intervals of per-layer max/min kept for the status API
DIFF_LIMIT = 256          # placement diff entries in a plan answer; the rest are counted
EXPERT_LOAD_LAYERS = 64   # layers in one expert_load answer at most


@dataclass
class PlanRecord:
    """A published plan and what the ranks said about it."""

    version: int
    generation: int
    policy: str
    source: str                  # "auto" or "api uid=N"
    published_s: float
    reason: str
    summary: dict
    state: str = "pending"       # pending | applied | rejected | unacknowledged | superseded
    acks: dict[int, str] = field(default_factory=dict)
    rejection: dict | None = None
    realised: dict | None = None  # {"mean", "worst"} over the first full window served at this version

    def to_dict(self, now: float) -> dict:
        return {"version": self.version, "generation": f"{self.generation:x}", "policy": self.policy,
                "source": self.source, "published": self.published_s,
                "age_s": round(max(0.0, now - self.published_s), 3), "reason": self.reason,
                "state": self.state, "acks": {str(r): a for r, a in sorted(self.acks.items())},
                "rejection": self.rejection, "realised_balancedness": self.realised, **self.summary}


@dataclass
class Realising:
    """An applied plan waiting for a sliding window made only of intervals served at its version:
    those that start at or after ``start_step``, a step the ranks had reached once serving it."""

    plan: PlanRecord
    start_step: int
    intervals: int = 0


@dataclass
class Proposal:
    """A plan made from the current window, not yet published."""

    job: str
    generation: int
    policy: str
    phys_to_log: np.ndarray
    push: bool
    reason: str
    summary: dict
    selection_bias: np.ndarray | None = None
    capacity_factor: float = 0.0


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
        self.ratio_history: deque[np.ndarray] = deque(maxlen=RATIO_HISTORY)  # [L] max/min, oldest first

    def same_model(self, feed: JobFeed) -> bool:
        return (feed.world, feed.shape) == (self.world, self.shape)

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
            self.control = None


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
            view = WindowView(counts=counts, assignments=_assignments(counts), phys_to_log=served, topo=topo)
            run.detector, run.detection = detect(run.detector, view, now, self.config.detect)
            d = run.detection
            run.ratio_history.append(d.max_min)
            self._measure_realised(job, run, iv, version)
            if d.newly_flagged:
                worst = max(d.newly_flagged, key=lambda i: d.max_min[i])
                self.log.info("layers imbalanced", job=job, layers=_layer_list(d.newly_flagged),
                              worst=worst, max_min=_fmt(d.max_min[worst]))
            if d.cleared:
                self.log.info("layers balanced again", job=job, layers=_layer_list(d.cleared))
        self._measure_ranks(job, run, feed, counts, served, topo)
        pcfg = self.policy_config(job)
        if (feed.leader and pcfg.mode == "automatic" and run.detection.should_plan
                and (run.last_plan is None or run.last_plan.state != "pending")):
            try:
                proposal = self._propose(job, run, feed)
                if proposal.push:
                    self._publish(job, run, feed, proposal, now, "auto")
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
            fresh.last_plan = _unresolved_plan(saved)
        if saved.generation != feed.generation:
            saved.generation = feed.generation
            self._save()
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
        statuses = feed.current_statuses()
        for rank, st in statuses.items():
            if st.applied_version > plan.version:
                self._resolve(job, plan, "superseded", f"rank {rank} serves version {st.applied_version}")
                return
            if st.applied_version == plan.version:
                plan.acks[rank] = "applied"
            elif st.result_version == plan.version and st.result is not PlanResult.NONE:
                plan.acks[rank] = st.result.name.lower()
                if st.result in (PlanResult.REJECTED, PlanResult.ROLLED_BACK) and plan.rejection is None:
                    plan.rejection = {"rank": rank, "result": st.result.name.lower(),
                                      "reason": st.reason.name.lower(), "detail": st.detail}
            elif st.pending_version == plan.version:
                plan.acks[rank] = "pending"
        if plan.rejection is not None:
            r = plan.rejection
            why = f"rank {r['rank']} {r['result']}: {r['reason']} {r['detail']}"
            self._resolve(job, plan, "rejected", why)
        elif statuses and all(plan.acks.get(r) == "applied" for r in statuses):
            self._resolve(job, plan, "applied", f"applied by ranks {sorted(statuses)}")
            run.realising = Realising(plan, max(st.step for st in statuses.values()))
        elif plan.state == "pending" and now - plan.published_s > self.policy_config(job).ack_timeout_s:
            plan.state = "unacknowledged"
            self.log.warning("plan not acknowledged in time", job=job, version=plan.version,
                             timeout_s=self.policy_config(job).ack_timeout_s,
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
        self._save()

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
        r.plan.realised = {"mean": _fmt(bal.mean()), "worst": _fmt(bal.max())}
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
                          late_us=_fmt(s.late_us), waiting=",".join(map(str, s.waiting_ranks)))
        for rank in feed.ranks:
            if rank not in {s.rank for s in run.stragglers}:
                self.log.forget(f"straggler:{job}:{rank}")
        if set(ranks) == set(range(feed.world)):
            received = np.concatenate([ranks[r].received.sum() for r in sorted(ranks)], axis=1)
            run.mismatch = cross_check(layer_loads(counts, served, topo),
                                       _per_gpu(received, feed.shape.slots_per_rank))
        else:
            run.mismatch = None

    def _timing(self, feed: JobFeed) -> tuple[float, float]:
        """(mean step us, MoE share of the step) over the ranks with records in the window."""
        means = [f.mean_times() for f in feed.current_ranks().values() if len(f.times)]
        if not means:
            return 0.0, 0.0
        step = np.array([m["step_us"] for m in means])
        phases = (np.stack([m[k] for m in means]) for k in ("dispatch_us", "combine_us", "expert_us"))
        share = moe_share(*phases, step)
        return float(step.mean()), share

    # -- planning and publishing --------------------------------------------------------------------

    def policy_config(self, job: str) -> PolicyConfig:
        """The configured policy with the job's API overrides applied."""
        saved = self.saved.get(job)
        pcfg = self.config.policy
        if saved is None:
            return pcfg
        return dataclasses.replace(pcfg, kind=saved.policy or pcfg.kind, mode=saved.mode or pcfg.mode)

    def _propose(self, job: str, run: JobRun, feed: JobFeed) -> Proposal:
        """What the job's policy would publish now; ``push`` says whether it would on its own."""
        pcfg = self.policy_config(job)
        version, served = feed.served_placement(self.log)
        if pcfg.kind == "placement":
            return self._propose_placement(job, run, feed, served, pcfg)
        if pcfg.kind == "token":
            proposal = self._propose_token(job, run, feed, served, pcfg)
        else:
            factor = capacity_factor_for(pcfg)
            changed = factor != run.capacity_factor
            reason = f"capacity factor {factor:g}" if changed else "capacity factor already published"
            proposal = Proposal(job, feed.generation, "drop", served, changed, reason,
                                {"capacity_factor": factor}, capacity_factor=factor)
        proposal.summary["served_version"] = version
        if pcfg.mode == "paused" and proposal.push:
            proposal.push, proposal.reason = False, "mode is paused"
        return proposal

    def _propose_token(self, job: str, run: JobRun, feed: JobFeed, served: np.ndarray,
                       pcfg: PolicyConfig) -> Proposal:
        ranks = list(feed.current_ranks().values())
        routed = sum((f.routed.sum().sum(axis=1) for f in ranks), np.zeros(feed.shape.layers))
        rerouted = sum((f.rerouted.sum() for f in ranks), np.zeros(feed.shape.layers))
        measured = np.divide(rerouted, routed, out=np.zeros_like(routed), where=routed > 0)
        # the counts measured while the current bias was applied, as token_bias expects
        bias = token_bias(run.window.sliding.sum(), run.bias, measured, pcfg.max_reroute_fraction,
                          pcfg.bias_step, pcfg.bias_limit)
        changed = not np.array_equal(bias, run.bias)
        summary = {"bias_min": float(bias.min()), "biased_experts": int((bias < 0).sum()),
                   "measured_reroute_fraction": float(measured.max(initial=0.0))}
        return Proposal(job, feed.generation, "token", served, changed,
                        "bias updated" if changed else "bias unchanged", summary, selection_bias=bias)

    def _propose_placement(self, job: str, run: JobRun, feed: JobFeed, served: np.ndarray,
                           pcfg: PolicyConfig) -> Proposal:
        c = self.config.planner
        topo = Topology(gpus=feed.world, slots=feed.slots, nodes=c.nodes)
        loads = run.window.decayed.value()
        result = planner.plan(loads, topo, current=served, max_moves=c.max_moves_per_layer,
                              expert_groups=c.expert_groups, tolerance=c.tolerance)
        moves = result.moves
        step_us, share = self._timing(feed)
        decision = decide_push(result.balancedness_before, result.balancedness_after, int(moves.sum()),
                               step_us, share, pcfg)
        before, after = result.balancedness_before, result.balancedness_after
        summary = {
            "moves": int(moves.sum()), "layers_changed": int((moves > 0).sum()),
            "balancedness_before": {"mean": _fmt(before.mean()), "worst": _fmt(before.max())},
            "balancedness_after": {"mean": _fmt(after.mean()), "worst": _fmt(after.max())},
            "predicted_gain_s": _fmt(decision.predicted_gain_s),
            "migration_cost_s": _fmt(decision.migration_cost_s),
            "worst_layers": [{"layer": int(i), "before": _fmt(before[i]), "after": _fmt(after[i]),
                              "moves": int(moves[i])} for i in np.argsort(-before, kind="stable")[:8]],
        }
        return Proposal(job, feed.generation, "placement", result.phys_to_log.astype(np.int32), decision.push,
                        decision.reason, summary)

    def _publish(self, job: str, run: JobRun, feed: JobFeed, proposal: Proposal, now: float,
                 source: str) -> int:
        if proposal.generation != feed.generation or run.generation != feed.generation:
            raise PlacementError(f"the plan was made for generation {proposal.generation:x}, the runtime "
                                 f"is now at {feed.generation:x}; not published")
        _check_plan(proposal, feed)
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
        self._save()
        self.log.info("plan published", job=job, version=version, policy=proposal.policy, source=source,
                      reason=proposal.reason)
        return version

    def _save(self) -> None:
        try:
            self.store.save(self.saved)
        except OSError as exc:
            self.log.once(f"save:{exc.errno}", "error", "cannot save state", path=self.store.path,
                          reason=exc.strerror)

    # -- the state API ------------------------------------------------------------------------------

    def handle(self, request: dict, peer: Peer) -> dict:
        """Serve one API request (called from the API threads)."""
        op = request["op"]
        handlers = {"status": self._api_status, "pause": self._api_mode, "resume": self._api_mode,
                    "set_policy": self._api_set_policy, "plan": self._api_plan,
                    "expert_load": self._api_expert_load}
        if op not in handlers:
            raise RequestError(f"unknown op {op!r}; expected one of {', '.join(handlers)}")
        with self._lock:
            return handlers[op](request, peer)

    def _api_status(self, request: dict, peer: Peer) -> dict:
        self.log.debug("api: status", uid=peer.uid)
        return {"state": self.snapshot(time.time())}

    def _jobs_named(self, request: dict) -> list[str]:
        job = request.get("job")
        if job is None:
            if not self.runs:
                raise RequestError("no job is running")
            return sorted(self.runs)
        if not isinstance(job, str) or job not in self.runs:
            raise RequestError(f"no running job {job!r}; running: {', '.join(sorted(self.runs)) or 'none'}")
        return [job]

    def _api_mode(self, request: dict, peer: Peer) -> dict:
        mode = "paused" if request["op"] == "pause" else "automatic"
        jobs = self._jobs_named(request)
        for job in jobs:
            self.saved.setdefault(job, JobState()).mode = mode
            self.log.info(f"api: {request['op']}", uid=peer.uid, job=job)
        self._save()
        return {"jobs": jobs, "mode": mode}

    def _api_set_policy(self, request: dict, peer: Peer) -> dict:
        kind = request.get("policy")
        if kind not in POLICY_KINDS:
            raise RequestError(f"policy must be one of {', '.join(POLICY_KINDS)}, got {kind!r}")
        jobs = self._jobs_named(request)
        for job in jobs:
            self.saved.setdefault(job, JobState()).policy = kind
            self.log.info("api: set_policy", uid=peer.uid, job=job, policy=kind)
        self._save()
        return {"jobs": jobs, "policy": kind}

    def _one_job(self, request: dict) -> str:
        jobs = self._jobs_named(request)
        if len(jobs) != 1:
            raise RequestError(f"several jobs are running ({', '.join(jobs)}); name one with 'job'")
        return jobs[0]

    def _api_plan(self, request: dict, peer: Peer) -> dict:
        dry_run = request.get("dry_run", True)
        if not isinstance(dry_run, bool):
            raise RequestError(f"dry_run must be true or false, got {dry_run!r}")
        job = self._one_job(request)
        run, feed = self.runs[job], self.ingest.jobs[job]
        if len(run.window) == 0:
            raise RequestError(f"job {job}: no load measured yet")
        if not dry_run and not feed.leader:
            raise RequestError(f"job {job}: this daemon does not see rank 0, so it does not plan for the job")
        self.log.info("api: plan", uid=peer.uid, job=job, dry_run=dry_run)
        try:
            _, served = feed.served_placement(self.log)
            proposal = self._propose(job, run, feed)
            would_push, reason = proposal.push, proposal.reason
            if not dry_run and not proposal.push:
                proposal.reason = f"requested through the API (the policy alone would not: {reason})"
            version = None if dry_run else self._publish(job, run, feed, proposal, time.time(),
                                                         f"api uid={peer.uid}")
        except PlacementError as exc:
            raise RequestError(f"job {job}: {exc}") from None
        topo = Topology(gpus=feed.world, slots=feed.slots)
        diff, truncated = _placement_diff(served, proposal.phys_to_log, topo)
        return {"job": job, "dry_run": dry_run, "policy": proposal.policy, "would_push": would_push,
                "reason": reason, "published_version": version, **proposal.summary,
                "diff": diff, "diff_truncated": truncated}

    def _api_expert_load(self, request: dict, peer: Peer) -> dict:
        """Window tokens and served replicas per expert for layers ``first`` .. ``first + count - 1``
        (``count`` cut to the layers there are and to EXPERT_LOAD_LAYERS)."""
        job = self._one_job(request)
        run, feed = self.runs[job], self.ingest.jobs[job]
        layers, experts = feed.shape.layers, feed.shape.experts
        first, count = request.get("first", 0), request.get("count", EXPERT_LOAD_LAYERS)
        if not _is_int(first) or not 0 <= first < layers:
            raise RequestError(f"first must be a layer in [0, {layers}), got {first!r}")
        if not _is_int(count) or count < 1:
            raise RequestError(f"count must be an integer >= 1, got {count!r}")
        self.log.debug("api: expert_load", uid=peer.uid, job=job, first=first, count=count)
        rows = slice(first, first + min(count, EXPERT_LOAD_LAYERS))
        _, served = feed.served_placement(self.log)
        return {"job": job, "first": first, "layers": layers, "experts": experts,
                "load": run.window.sliding.sum()[rows].astype(np.int64).tolist(),
                "replicas": replica_counts(served[rows], experts).tolist()}

    # -- the state snapshot -------------------------------------------------------------------------

    def snapshot(self, now: float) -> dict:
        """Everything the daemon knows, as JSON-ready data: ``{"daemon": {...}, "jobs": {job: {...}}}``."""
        with self._lock:
            c = self.config
            sections = {k: dataclasses.asdict(getattr(c, k))
                        for k in ("detect", "window", "planner", "policy")}
            return {
                "daemon": {
                    "pid": os.getpid(), "started": self.started_s,
                    "uptime_s": round(now - self.started_s, 3), "steps": self.steps,
                    "runtime_dir": str(self.runtime_dir), "state_dir": str(self.state_dir),
                    "socket": str(self.socket_path), "bad_segments": self.ingest.bad_segments,
                    "config": {"poll_interval_s": c.poll_interval_s, "log_level": c.log_level, "job": c.job,
                               **sections},
                },
                "jobs": {job: self._job_snapshot(job, run, self.ingest.jobs[job], now)
                         for job, run in sorted(self.runs.items())},
            }

    def _job_snapshot(self, job: str, run: JobRun, feed: JobFeed, now: float) -> dict:
        saved = self.saved.get(job, JobState())
        pcfg = self.policy_config(job)
        version, served = feed.served_placement(self.log)
        d = run.detection
        counts = run.window.sliding.sum()
        gpu_load = layer_loads(counts, served, Topology(gpus=feed.world, slots=feed.slots))
        return {
            "generation": f"{feed.generation:x}", "world": feed.world, "layers": feed.shape.layers,
            "experts": feed.shape.experts, "slots": feed.slots, "slots_per_rank": feed.shape.slots_per_rank,
            "leader": feed.leader, "served_version": version,
            "control": None if run.control is None else str(run.control.path),
            "policy": {"kind": pcfg.kind, "mode": pcfg.mode, "overrides": {"kind": saved.policy,
                                                                            "mode": saved.mode},
                       "capacity_factor": run.capacity_factor, "bias_min": float(run.bias.min())},
            "window": {"intervals": len(run.window), "capacity": run.window.sliding.intervals,
                       "added": run.window.added, "assignments": _assignments(counts),
                       "decay_half_life_s": run.window.decayed.half_life_s,
                       "incomplete_intervals": feed.incomplete,
                       "last_interval": _interval_info(run.last_interval)},
            "ranks": [_rank_snapshot(feed, r, now, self.ingest.stale_after_s) for r in sorted(feed.ranks)],
            "per_layer": [] if d is None else [
                {"layer": i, "max_min": _fmt(d.max_min[i]), "balancedness": _fmt(d.balancedness[i]),
                 "flagged": i in d.flagged,
                 "mismatch": None if run.mismatch is None else _fmt(run.mismatch[i]),
                 "max_min_history": [_fmt(h[i]) for h in run.ratio_history]}
                for i in range(len(d.max_min))],
            "gpu_load": [[_fmt(x) for x in row] for row in gpu_load],
            "flagged": [] if d is None else list(d.flagged),
            "detection": None if d is None else {
                "counted": d.counted, "should_plan": d.should_plan, "reason": d.reason,
                "cooldown_left_s": _fmt(d.cooldown_left_s)},
            "stragglers": [
                {"rank": s.rank, "late_us": _fmt(s.late_us), "waiting_ranks": list(s.waiting_ranks),
                 "expert_excess_us": _fmt(s.expert_excess_us)} for s in run.stragglers],
            "last_plan": None if run.last_plan is None else run.last_plan.to_dict(now),
            "last_version": saved.last_version,
            "history": saved.history,
        }


def _unresolved_plan(saved: JobState) -> PlanRecord | None:
    """The last plan of a previous daemon run that was never resolved, so that a restarted daemon
    follows it to an outcome instead of showing it pending forever."""
    if not saved.history or saved.history[-1].get("state") in PLAN_STATES_FINAL:
        return None
    e = saved.history[-1]
    return PlanRecord(int(e["version"]), int(e["generation"], 16), e["policy"], e["source"],
                      float(e["published"]), e["reason"], {}, state=e["state"])


def _rank_snapshot(feed: JobFeed, rank: int, now: float, stale_after_s: float) -> dict:
    f = feed.ranks[rank]
    age = f.age(now)
    st = feed.statuses.get(rank)
    status = st.latest if st is not None else None
    out = {"rank": rank, "current": f.generation == feed.generation, "generation": f"{f.generation:x}",
           "age_s": round(age, 3), "stale": age > stale_after_s, "accepted": f.reader.stats.accepted,
           "dropped": f.reader.stats.dropped, "invalid": f.reader.stats.invalid, "rejected": f.rejected,
           "records_in_window": len(f.times),
           "placement_version": None if f.last is None else f.last.placement_version, "status": None}
    if len(f.times):
        m = f.mean_times()
        out.update({k: _fmt(float(np.sum(m[k]))) for k in ("dispatch_us", "combine_us", "expert_us")},
                   step_us=_fmt(m["step_us"]))
    if status is not None:
        out["status"] = {"generation": f"{status.generation:x}", "applied_version": status.applied_version,
                         "pending_version": status.pending_version, "result": status.result.name.lower(),
                         "result_version": status.result_version, "reason": status.reason.name.lower(),
                         "detail": status.detail,
                         "heartbeat_age_s": round(max(0.0, now - status.heartbeat_ns / 1e9), 3)}
    return out


def _layer_list(layers: tuple[int, ...], limit: int = 16) -> str:
    """"0,3,7" for a log line; long lists end with "... (N in all)"."""
    head = ",".join(map(str, layers[:limit]))
    return head if len(layers) <= limit else f"{head},... ({len(layers)} in all)"


def _interval_info(iv: Interval | None) -> dict | None:
    """Which steps the newest interval covers and where its load came from."""
    if iv is None:
        return None
    return {"first_step": iv.first_step, "last_step": iv.last_step,
            "source": "global_routed" if iv.is_global else "sum of local ranks", "ranks": list(iv.ranks)}


def _check_plan(proposal: Proposal, feed: JobFeed) -> None:
    """The daemon's half of "plans are validated twice": raise PlacementError before writing."""
    validate_placement(proposal.phys_to_log, feed.shape.experts, Topology(gpus=feed.world, slots=feed.slots),
                       feed.shape.layers)
    bias = proposal.selection_bias
    if bias is not None and (not np.isfinite(bias).all() or bias.max(initial=0.0) > 0):
        raise PlacementError("selection bias must be finite and <= 0")
    if proposal.capacity_factor != 0.0 and not proposal.capacity_factor > 1.0:
        raise PlacementError(f"capacity factor {proposal.capacity_factor} must be 0 (off) or > 1")


def _placement_diff(old: np.ndarray, new: np.ndarray, topo: Topology) -> tuple[list[dict], int]:
    """The first DIFF_LIMIT slots whose expert changes from ``old`` to ``new`` [L, S] (by layer, then
    slot) as ``{"layer", "slot", "gpu", "from", "to"}``, and how many more there are."""
    changed = np.argwhere(old != new)
    diff = [{"layer": int(layer), "slot": int(slot), "gpu": int(topo.gpu_of_slot[slot]),
             "from": int(old[layer, slot]), "to": int(new[layer, slot])}
            for layer, slot in changed[:DIFF_LIMIT]]
    return diff, len(changed) - len(diff)


def _is_int(x: object) -> bool:
    """A JSON integer (not a bool, which Python counts as one)."""
    return isinstance(x, int) and not isinstance(x, bool)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _assignments(counts: np.ndarray) -> int:
    """(token, expert) assignments per layer in a window of [L, E] counts (mean over layers)."""
    return int(round(float(counts.sum(axis=1).mean()))) if counts.size else 0


def _per_gpu(received: np.ndarray, slots_per_rank: int) -> np.ndarray:
    """[L, G] from [L, S] per-slot received counts."""
    L, S = received.shape
    return received.reshape(L, S // slots_per_rank, slots_per_rank).sum(axis=2)


def _fmt(x: float) -> float:
    """A float for JSON: 4 significant digits, inf as a large number (JSON has no inf)."""
    x = float(x)
    if not math.isfinite(x):
        return 1e300 if x > 0 else -1e300
    return float(f"{x:.4g}")
