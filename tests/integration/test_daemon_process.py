"""`balancerd run` and `balancerd status` as real processes: signals, reload, crash and restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest

from balancerd.api import ApiClient, DaemonUnavailable
from tests import polling
from tests.telemetry_writer import TelemetryProcess, WriterSpec

pytestmark = pytest.mark.slow

WAIT_S = 15.0
wait_until = partial(polling.wait_until, timeout=WAIT_S)

CONFIG = """
state_dir = "{state}"
poll_interval_s = 0.05
log_level = "debug"

[detect]
threshold = {threshold}
min_tokens = 1000

[window]
intervals = 4

[policy]
mode = "paused"
expert_bytes = 1024
"""


class DaemonProcess:
    """`python -m balancerd.cli run` in a temp runtime dir, with its log in a file."""

    def __init__(self, tmp_path: Path, threshold: float = 3.0):
        self.tmp = tmp_path
        self.run_dir = tmp_path / "run"
        self.run_dir.mkdir(exist_ok=True)
        self.config = tmp_path / "balancerd.toml"
        self.write_config(threshold)
        self.log_path = tmp_path / "daemon.log"
        self.socket = self.run_dir / "balancerd.sock"
        self.client = ApiClient(self.socket, timeout=5.0)
        self.proc: subprocess.Popen | None = None

    def write_config(self, threshold: float, extra: str = "") -> None:
        self.config.write_text(CONFIG.format(state=self.tmp / "state", threshold=threshold) + extra)

    def start(self, env: dict | None = None) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "balancerd.cli", "run", "--config", str(self.config),
                 "--runtime-dir", str(self.run_dir)],
                stdout=log, stderr=log, env={**os.environ, **(env or {})})
        wait_until(lambda: self.status() is not None, what="the daemon to answer")

    def status(self) -> dict | None:
        """The snapshot, or None while nothing answers."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {self.proc.returncode}: {self.log()[-2000:]}")
        try:
            return self.client.request({"op": "status"})["state"]
        except (DaemonUnavailable, ConnectionError):
            return None

    def job(self) -> dict | None:
        state = self.status()
        return None if state is None else state["jobs"].get("fake")

    def log(self) -> str:
        return self.log_path.read_text()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def daemon(tmp_path):
    d = DaemonProcess(tmp_path)
    yield d
    d.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_within_2_s(daemon, sig):
    daemon.start()
    start = time.monotonic()
    daemon.proc.send_signal(sig)
    assert daemon.proc.wait(timeout=2.0) == 0
    assert time.monotonic() - start < 2.0
    assert not daemon.socket.exists()
    assert "balancerd stopped" in daemon.log() and "Traceback" not in daemon.log()


def test_malformed_config_exits_2_naming_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[detect]\nsustain = 'three'\n")
    r = subprocess.run([sys.executable, "-m", "balancerd.cli", "run", "--config", str(bad),
                        "--runtime-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "detect.sustain" in r.stderr and "Traceback" not in r.stderr


def test_sighup_reloads_config_and_keeps_state(daemon):
    with TelemetryProcess(daemon.run_dir, WriterSpec(load={"kind": "zipf", "s": 1.5})):
        daemon.start()
        wait_until(lambda: (daemon.job() or {}).get("window", {}).get("intervals", 0) >= 4)
        assert daemon.client.request({"op": "set_policy", "policy": "token"})["ok"]
        before = daemon.status()
        assert before["daemon"]["config"]["detect"]["threshold"] == 3.0
        daemon.write_config(threshold=4.5)
        daemon.proc.send_signal(signal.SIGHUP)
        after = wait_until(lambda: (s := daemon.status())["daemon"]["config"]["detect"]["threshold"] == 4.5
                           and s, what="the reload")
        j0, j1 = before["jobs"]["fake"], after["jobs"]["fake"]
        assert after["daemon"]["pid"] == before["daemon"]["pid"]
        assert j1["generation"] == j0["generation"] and j1["window"]["added"] >= j0["window"]["added"]
        assert j1["policy"]["kind"] == "token"  # the API override survives the reload
        # a broken file on reload: logged, the running configuration stays
        daemon.config.write_text("[window]\nintervals = 0\n")
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload failed" in daemon.log(), what="the failed reload to be logged")
        assert "window.intervals" in daemon.log()
        assert daemon.status()["daemon"]["config"]["detect"]["threshold"] == 4.5
        assert daemon.proc.poll() is None


def test_kill_9_and_restart_keeps_versions_growing_and_reattaches(daemon):
    with TelemetryProcess(daemon.run_dir, WriterSpec(load={"kind": "zipf", "s": 1.5})) as writer:
        versions = []
        for round_ in range(3):
            daemon.start()
            wait_until(lambda: (daemon.job() or {}).get("window", {}).get("intervals", 0) >= 1)
            r = daemon.client.request({"op": "plan", "dry_run": False})
            assert r["ok"], r
            versions.append(r["published_version"])
            v = versions[-1]
            writer.wait_for(lambda rep, v=v: rep["type"] == "plan" and rep["version"] == v, WAIT_S)
            daemon.kill()  # SIGKILL: no cleanup, the socket file stays behind
            assert daemon.socket.exists()
            if round_ == 1:  # lose the state file too: the control block still holds the last version
                (daemon.tmp / "state" / "state.json").unlink()
        assert versions == [1, 2, 3]
        assert [p["result"] for p in writer.matching(lambda rep: rep["type"] == "plan")] == ["applied"] * 3
    log = daemon.log()
    assert "control block created" in log
    assert "control block reattached job=fake version=1" in log
    assert "control block reattached job=fake version=2" in log


def test_status_command_reads_the_daemon_and_reports_when_it_is_down(daemon):
    cli = [sys.executable, "-m", "balancerd.cli", "status", "--socket", str(daemon.socket)]
    down = subprocess.run(cli, capture_output=True, text=True, timeout=30)
    assert down.returncode == 1 and "not running" in down.stdout
    with TelemetryProcess(daemon.run_dir, WriterSpec(load={"kind": "zipf", "s": 1.5})):
        daemon.start(env={"JOURNAL_STREAM": "8:12345"})
        wait_until(lambda: (daemon.job() or {}).get("per_layer"))
        text = subprocess.run(cli, capture_output=True, text=True, timeout=30)
        as_json = subprocess.run(cli + ["--json"], capture_output=True, text=True, timeout=30)
    assert text.returncode == 0, text.stderr
    assert "job fake" in text.stdout and "layer" in text.stdout and "last plan: none" in text.stdout
    state = json.loads(as_json.stdout)
    assert state["daemon"]["pid"] == daemon.proc.pid and len(state["jobs"]["fake"]["ranks"]) == 4
    # started with JOURNAL_STREAM set: journald priority prefixes instead of timestamps
    assert "<6>balancerd started" in daemon.log() and "<7>" in daemon.log()
