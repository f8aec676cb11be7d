"""The daemon's answers to API requests: one function per op, each given the daemon it serves.

The daemon's lock is held around every call (see :meth:`balancerd.daemon.Daemon.handle`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from balancerd.api import Peer, RequestError
from balancerd.config import POLICY_KINDS
from balancerd.placement import PlacementError, Topology, replica_counts
from balancerd.plans import placement_diff
from balancerd.state import JobState

if TYPE_CHECKING:
    from balancerd.daemon import Daemon

EXPERT_LOAD_LAYERS = 64   # layers in one expert_load answer at most

Handler = Callable[["Daemon", dict, Peer], dict]


def status(daemon: Daemon, request: dict, peer: Peer) -> dict:
    daemon.log.debug("api: status", uid=peer.uid)
    return {"state": daemon.snapshot(time.time())}


def set_mode(daemon: Daemon, request: dict, peer: Peer) -> dict:
    mode = "paused" if request["op"] == "pause" else "automatic"
    jobs = jobs_named(daemon, request)
    for job in jobs:
        daemon.saved.setdefault(job, JobState()).mode = mode
        daemon.log.info(f"api: {request['op']}", uid=peer.uid, job=job)
    daemon.save()
    return {"jobs": jobs, "mode": mode}


def set_policy(daemon: Daemon, request: dict, peer: Peer) -> dict:
    kind = request.get("policy")
    if kind not in POLICY_KINDS:
        raise RequestError(f"policy must be one of {', '.join(POLICY_KINDS)}, got {kind!r}")
    jobs = jobs_named(daemon, request)
    for job in jobs:
        daemon.saved.setdefault(job, JobState()).policy = kind
        daemon.log.info("api: set_policy", uid=peer.uid, job=job, policy=kind)
    daemon.save()
    return {"jobs": jobs, "policy": kind}


def plan(daemon: Daemon, request: dict, peer: Peer) -> dict:
    dry_run = request.get("dry_run", True)
    if not isinstance(dry_run, bool):
        raise RequestError(f"dry_run must be true or false, got {dry_run!r}")
    job = one_job(daemon, request)
    run, feed = daemon.runs[job], daemon.ingest.jobs[job]
    if len(run.window) == 0:
        raise RequestError(f"job {job}: no load measured yet")
    if not dry_run and not feed.leader:
        raise RequestError(f"job {job}: this daemon does not see rank 0, so it does not plan for the job")
    daemon.log.info("api: plan", uid=peer.uid, job=job, dry_run=dry_run)
    try:
        _, served = feed.served_placement(daemon.log)
        proposal = daemon.propose(job, run, feed)
        would_push, reason = proposal.push, proposal.reason
        if not dry_run and not proposal.push:
            proposal.reason = f"requested through the API (the policy alone would not: {reason})"
        version = None if dry_run else daemon.publish(job, run, feed, proposal, time.time(),
                                                      f"api uid={peer.uid}")
    except PlacementError as exc:
        raise RequestError(f"job {job}: {exc}") from None
    topo = Topology(gpus=feed.world, slots=feed.slots)
    diff, truncated = placement_diff(served, proposal.phys_to_log, topo)
    return {"job": job, "dry_run": dry_run, "policy": proposal.policy, "would_push": would_push,
            "reason": reason, "published_version": version, **proposal.summary,
            "diff": diff, "diff_truncated": truncated}


def expert_load(daemon: Daemon, request: dict, peer: Peer) -> dict:
    """Window tokens and served replicas per expert for layers ``first`` .. ``first + count - 1``
    (``count`` cut to the layers there are and to EXPERT_LOAD_LAYERS)."""
    job = one_job(daemon, request)
    run, feed = daemon.runs[job], daemon.ingest.jobs[job]
    layers, experts = feed.shape.layers, feed.shape.experts
    first, count = request.get("first", 0), request.get("count", EXPERT_LOAD_LAYERS)
    if not is_int(first) or not 0 <= first < layers:
        raise RequestError(f"first must be a layer in [0, {layers}), got {first!r}")
    if not is_int(count) or count < 1:
        raise RequestError(f"count must be an integer >= 1, got {count!r}")
    daemon.log.debug("api: expert_load", uid=peer.uid, job=job, first=first, count=count)
    rows = slice(first, first + min(count, EXPERT_LOAD_LAYERS))
    _, served = feed.served_placement(daemon.log)
    return {"job": job, "first": first, "layers": layers, "experts": experts,
            "load": run.window.sliding.sum()[rows].astype(np.int64).tolist(),
            "replicas": replica_counts(served[rows], experts).tolist()}


HANDLERS: dict[str, Handler] = {"status": status, "pause": set_mode, "resume": set_mode,
                                "set_policy": set_policy, "plan": plan, "expert_load": expert_load}


def handler_for(op: str) -> Handler:
    """The function serving ``op``; RequestError for an unknown one."""
    if op not in HANDLERS:
        raise RequestError(f"unknown op {op!r}; expected one of {', '.join(HANDLERS)}")
    return HANDLERS[op]


def jobs_named(daemon: Daemon, request: dict) -> list[str]:
    """The request's ``job``, checked to be running, or every running job when it names none."""
    job = request.get("job")
    if job is None:
        if not daemon.runs:
            raise RequestError("no job is running")
        return sorted(daemon.runs)
    if not isinstance(job, str) or job not in daemon.runs:
        raise RequestError(f"no running job {job!r}; running: {', '.join(sorted(daemon.runs)) or 'none'}")
    return [job]


def one_job(daemon: Daemon, request: dict) -> str:
    jobs = jobs_named(daemon, request)
    if len(jobs) != 1:
        raise RequestError(f"several jobs are running ({', '.join(jobs)}); name one with 'job'")
    return jobs[0]


def is_int(x: object) -> bool:
    """A JSON integer (not a bool, which Python counts as one)."""
    return isinstance(x, int) and not isinstance(x, bool)
