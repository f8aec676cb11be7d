"""Record the fixture the snapshot tests show: `python -m tests.tui.record_state [OUT.json]`.

A real daemon (serving its API) follows a real writer process through three phases: a skewed load
it rebalances on its own (plan v1, applied), a harder skew whose plan the job rejects (v2), then a
pause through the API while the skew stays. The last state is kept, with a dry-run plan made then.

The daemon's API does not serve everything the console can show yet. The fields it lacks are
computed here from the daemon's own window and placement (the ratio history from the first state
the API returned in each of the last 20 intervals), as the API would report them, and named in
``proposed``; the replaying client strips them to stand for the daemon as it is today.
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from balancerd.api import ApiClient
from balancerd.config import parse_config
from balancerd.daemon import Daemon
from balancerd.detect import layer_loads
from balancerd.log import Log
from balancerd.placement import Topology, replica_counts
from tests.telemetry_writer import TelemetryProcess, WriterSpec

FIXTURE = Path(__file__).with_name("recorded_state.json")
KEPT_STATES = 20
PROPOSED = {
    "status": ["jobs.*.gpu_load", "jobs.*.per_layer[].max_min_history"],
    "expert_load": ["the whole op"],
    "plan": ["diff"],
}


def wait_for(predicate, timeout: float = 60.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def gpu_load(daemon: Daemon, job: str) -> list[list[float]]:
    """[L][G] tokens per GPU in the sliding window, on the placement the ranks serve."""
    with daemon._lock:
        run, feed = daemon.runs[job], daemon.ingest.jobs[job]
        _, served = feed.served_placement(daemon.log)
        loads = layer_loads(run.window.sliding.sum(), served, Topology(gpus=feed.world, slots=feed.slots))
    return np.round(loads, 1).tolist()


def expert_load(daemon: Daemon, job: str) -> dict:
    """The proposed ``expert_load`` answer for every layer: window tokens and replicas per expert."""
    with daemon._lock:
        run, feed = daemon.runs[job], daemon.ingest.jobs[job]
        _, served = feed.served_placement(daemon.log)
        counts = run.window.sliding.sum()
        replicas = replica_counts(served, feed.shape.experts)
    return {"job": job, "first": 0, "layers": int(counts.shape[0]), "experts": int(counts.shape[1]),
            "load": np.round(counts, 1).tolist(), "replicas": replicas.astype(int).tolist()}


def plan_diff(daemon: Daemon, job: str) -> list[dict]:
    """The proposed ``diff`` of a dry run: every slot whose expert the plan changes."""
    with daemon._lock:
        run, feed = daemon.runs[job], daemon.ingest.jobs[job]
        _, served = feed.served_placement(daemon.log)
        new = daemon.propose(job, run, feed).phys_to_log
    spr = feed.shape.slots_per_rank
    return [{"layer": int(layer), "slot": int(slot), "gpu": int(slot) // spr,
             "from": int(served[layer, slot]), "to": int(new[layer, slot])}
            for layer, slot in zip(*np.nonzero(new != served), strict=True)]


def with_history(states: list[dict], job: str) -> dict:
    """The last state, each layer with the proposed ``max_min_history`` over ``states``, oldest first."""
    last = states[-1]
    for i, layer in enumerate(last["jobs"][job]["per_layer"]):
        layer["max_min_history"] = [s["jobs"][job]["per_layer"][i]["max_min"] for s in states]
    return last


def record(out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="balancerd-rec-") as tmp:
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        cfg = parse_config({
            "runtime_dir": str(run_dir), "state_dir": f"{tmp}/state", "poll_interval_s": 0.05,
            "detect": {"min_tokens": 1000, "sustain": 2, "cooldown_s": 1.0, "straggler_threshold": 1.25},
            "window": {"intervals": 4},
            "policy": {"mode": "automatic", "expert_bytes": 1024, "ack_timeout_s": 5.0},
            "api": {"socket": f"{tmp}/balancerd.sock"},
        })
        daemon = Daemon(cfg, Log("info", io.StringIO(), journal=False))
        loop = threading.Thread(target=daemon.run_forever)
        spec = WriterSpec(job="llm", layers=12, experts=32, world=4, slots_per_rank=9, tokens=2048,
                          interval_s=0.1, load={"kind": "zipf", "s": 1.2}, seed=7)
        writer = TelemetryProcess(run_dir, spec)
        writer.start()
        loop.start()
        client = ApiClient(daemon.socket_path)
        wait_for(daemon.socket_path.exists, what="the API socket")

        states: list[dict] = []

        def job() -> dict:
            """Poll the API, keeping the first state seen of each new interval."""
            state = client.request({"op": "status"})["state"]
            j = state["jobs"].get("llm")
            if j is None:
                return {}
            if not states or states[-1]["jobs"]["llm"]["window"]["added"] != j["window"]["added"]:
                j["gpu_load"] = gpu_load(daemon, "llm")
                states.append(state)
            return j

        try:
            wait_for(lambda: (job().get("last_plan") or {}).get("state") == "applied", what="plan 1 applied")
            settled = len(states) + 6
            wait_for(lambda: job() and len(states) >= settled, what="the balanced load to settle")
            writer.command({"event": "plans", "action": "reject"})
            writer.command({"event": "load", "load": {"kind": "zipf", "s": 2.2}})
            wait_for(lambda: (job().get("last_plan") or {}).get("state") == "rejected",
                     what="plan 2 rejected")
            assert client.request({"op": "pause", "job": "llm"})["ok"]
            settled = len(states) + 6
            wait_for(lambda: job() and len(states) >= settled, what="the paused job to settle")
            dry = client.request({"op": "plan", "job": "llm", "dry_run": True})
            dry["diff"] = plan_diff(daemon, "llm")
            doc = {"proposed": PROPOSED, "state": with_history(states[-KEPT_STATES:], "llm"),
                   "expert_load": expert_load(daemon, "llm"), "plan_dry_run": dry}
        finally:
            daemon.stop()
            loop.join(10)
            daemon.close()
            writer.stop()
    out.write_text(json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    record(Path(sys.argv[1]) if len(sys.argv) > 1 else FIXTURE)
