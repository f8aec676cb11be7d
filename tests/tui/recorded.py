"""Clients for the console that need no daemon: a recorded daemon, and a daemon that is not there."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from balancerd.api import DaemonUnavailable

FIXTURE = Path(__file__).with_name("recorded_state.json")
READ_ONLY = "this is a recording: it changes nothing"
DAEMON_OPS = ("status", "pause", "resume", "set_policy", "plan")  # what today's daemon serves


class RecordedDaemon:
    """Answers like the daemon recorded by ``record_state.py``: ``status``, ``expert_load`` and a
    dry-run ``plan`` give what was recorded; the actions change nothing. ``proposed=False`` drops
    what today's daemon does not serve (``expert_load`` answers "unknown op")."""

    def __init__(self, proposed: bool = True, fixture: Path = FIXTURE):
        doc = json.loads(fixture.read_text())
        self.state: dict = doc["state"]
        self.expert_load: dict | None = doc["expert_load"]
        self.dry_run: dict = doc["plan_dry_run"]
        if not proposed:
            for job in self.state["jobs"].values():
                job.pop("gpu_load")
                for layer in job["per_layer"]:
                    layer.pop("max_min_history")
            self.expert_load = None
            self.dry_run.pop("diff")
        self.path = Path(self.state["daemon"]["socket"])

    def request(self, request: dict) -> dict:
        op = request["op"]
        if op == "status":
            return {"ok": True, "state": copy.deepcopy(self.state)}
        if op == "expert_load" and self.expert_load is not None:
            first, count = request["first"], request["count"]
            return {"ok": True, **self.expert_load, "first": first,
                    "load": self.expert_load["load"][first:first + count],
                    "replicas": self.expert_load["replicas"][first:first + count]}
        if op == "plan" and request.get("dry_run", True):
            return copy.deepcopy(self.dry_run)
        if op in DAEMON_OPS:
            return {"ok": False, "error": READ_ONLY}
        return {"ok": False, "error": f"unknown op {op!r}; expected one of {', '.join(DAEMON_OPS)}"}


class NoDaemon:
    """A socket nobody listens on."""

    def __init__(self, path: Path = Path("/run/balancerd/balancerd.sock")):
        self.path = path

    def request(self, request: dict) -> dict:
        raise DaemonUnavailable(f"no balancerd on {self.path}: No such file or directory")
