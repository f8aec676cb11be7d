"""The daemon's state as JSON-ready data, for the API, ``balancerd status``, metrics and the TUI."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from balancerd.config import DaemonConfig, PolicyConfig
from balancerd.detect import layer_loads
from balancerd.ingest import Interval, JobFeed
from balancerd.jobrun import JobRun
from balancerd.log import Log
from balancerd.numbers import assignments, fmt
from balancerd.placement import Topology
from balancerd.state import JobState


def daemon_snapshot(config: DaemonConfig, started_s: float, steps: int, runtime_dir: Path, state_dir: Path,
                    socket_path: Path, bad_segments: object, now: float) -> dict:
    """The ``"daemon"`` section: the process, its directories and its configuration."""
    c = config
    sections = {k: dataclasses.asdict(getattr(c, k))
                for k in ("detect", "window", "planner", "policy")}
    return {
        "pid": os.getpid(), "started": started_s,
        "uptime_s": round(now - started_s, 3), "steps": steps,
        "runtime_dir": str(runtime_dir), "state_dir": str(state_dir),
        "socket": str(socket_path), "bad_segments": bad_segments,
        "config": {"poll_interval_s": c.poll_interval_s, "log_level": c.log_level, "job": c.job,
                   **sections},
    }


def job_snapshot(run: JobRun, feed: JobFeed, saved: JobState, pcfg: PolicyConfig, log: Log, now: float,
                 stale_after_s: float) -> dict:
    """One job's section: model, policy, window, ranks, per-layer balance, stragglers and plans."""
    version, served = feed.served_placement(log)
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
                   "added": run.window.added, "assignments": assignments(counts),
                   "decay_half_life_s": run.window.decayed.half_life_s,
                   "incomplete_intervals": feed.incomplete,
                   "last_interval": interval_info(run.last_interval)},
        "ranks": [rank_snapshot(feed, r, now, stale_after_s) for r in sorted(feed.ranks)],
        "per_layer": [] if d is None else [
            {"layer": i, "max_min": fmt(d.max_min[i]), "balancedness": fmt(d.balancedness[i]),
             "flagged": i in d.flagged,
             "mismatch": None if run.mismatch is None else fmt(run.mismatch[i]),
             "max_min_history": [fmt(h[i]) for h in run.ratio_history]}
            for i in range(len(d.max_min))],
        "gpu_load": [[fmt(x) for x in row] for row in gpu_load],
        "flagged": [] if d is None else list(d.flagged),
        "detection": None if d is None else {
            "counted": d.counted, "should_plan": d.should_plan, "reason": d.reason,
            "cooldown_left_s": fmt(d.cooldown_left_s)},
        "stragglers": [
            {"rank": s.rank, "late_us": fmt(s.late_us), "waiting_ranks": list(s.waiting_ranks),
             "expert_excess_us": fmt(s.expert_excess_us)} for s in run.stragglers],
        "last_plan": None if run.last_plan is None else run.last_plan.to_dict(now),
        "plan_backoff": {"failed_plans": run.failed_plans,
                         "left_s": fmt(max(0.0, run.publish_after - now))},
        "last_version": saved.last_version,
        "history": saved.history,
    }


def rank_snapshot(feed: JobFeed, rank: int, now: float, stale_after_s: float) -> dict:
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
        out.update({k: fmt(float(np.sum(m[k]))) for k in ("dispatch_us", "combine_us", "expert_us")},
                   step_us=fmt(m["step_us"]))
    if status is not None:
        out["status"] = {"generation": f"{status.generation:x}", "applied_version": status.applied_version,
                         "pending_version": status.pending_version, "result": status.result.name.lower(),
                         "result_version": status.result_version, "reason": status.reason.name.lower(),
                         "detail": status.detail,
                         "heartbeat_age_s": round(max(0.0, now - status.heartbeat_ns / 1e9), 3)}
    return out


def interval_info(iv: Interval | None) -> dict | None:
    """Which steps the newest interval covers and where its load came from."""
    if iv is None:
        return None
    return {"first_step": iv.first_step, "last_step": iv.last_step,
            "source": "global_routed" if iv.is_global else "sum of local ranks", "ranks": list(iv.ranks)}
