"""The state API over its real Unix socket, with a real writer process feeding the daemon."""

from __future__ import annotations

import grp
import io
import json
import os
import pwd
import socket
import stat
import tempfile
import threading
from pathlib import Path

import pytest

from balancerd.api import ApiClient, DaemonUnavailable
from balancerd.commands.status import render
from balancerd.config import parse_config
from balancerd.daemon import Daemon
from balancerd.log import Log
from balancerd.protocol import ControlReader, control_path
from tests.polling import wait_until as wait_until_truthy
from tests.telemetry_writer import TelemetryProcess, WriterSpec

pytestmark = pytest.mark.slow

NOBODY = 65534
WAIT_S = 15.0


def api_group() -> grp.struct_group:
    """A group nobody is not a member of: the API's group in these tests."""
    nobody_gid = pwd.getpwuid(NOBODY).pw_gid
    for g in grp.getgrall():
        if g.gr_gid not in (0, nobody_gid) and not g.gr_mem:
            return g
    pytest.skip("no memberless group to test group access with")


STRANGER_GID = 65533  # neither the API's group nor nobody's primary group


@pytest.fixture
def served(tmp_path):
    """A daemon serving its API (socket in a world-traversable directory) and a fake job it follows."""
    sock_dir = Path(tempfile.mkdtemp(prefix="balancerd-api-"))
    sock_dir.chmod(0o755)  # so that a child that dropped to nobody can reach the socket
    run = tmp_path / "run"
    run.mkdir()
    cfg = parse_config({
        "runtime_dir": str(run), "state_dir": str(tmp_path / "state"), "poll_interval_s": 0.05,
        "detect": {"min_tokens": 1000}, "policy": {"mode": "paused", "expert_bytes": 1024},
        "api": {"socket": str(sock_dir / "balancerd.sock"), "group": api_group().gr_name},
    })
    log = io.StringIO()
    daemon = Daemon(cfg, Log("debug", log, journal=False))
    loop = threading.Thread(target=daemon.run_forever)
    writer = TelemetryProcess(run, WriterSpec(load={"kind": "zipf", "s": 1.5}))
    writer.start()
    loop.start()
    client = ApiClient(daemon.socket_path, timeout=5.0)
    try:
        wait_until(lambda: "fake" in client.request({"op": "status"})["state"]["jobs"] and
                   client.request({"op": "status"})["state"]["jobs"]["fake"]["window"]["intervals"] >= 4)
        yield daemon, client, log, run
    finally:
        daemon.stop()
        loop.join(WAIT_S)
        daemon.close()
        writer.stop()
        for name in os.listdir(sock_dir):
            os.unlink(sock_dir / name)
        sock_dir.rmdir()


def wait_until(predicate, timeout: float = WAIT_S) -> None:
    wait_until_truthy(predicate, timeout, ignore=(DaemonUnavailable,))  # the server may not listen yet


def job(client: ApiClient) -> dict:
    return client.request({"op": "status"})["state"]["jobs"]["fake"]


def test_socket_mode_and_status(served):
    daemon, client, _, _ = served
    st = os.stat(daemon.socket_path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == api_group().gr_gid
    r = client.request({"op": "status"})
    assert r["ok"] and r["state"]["daemon"]["pid"] == os.getpid()
    j = r["state"]["jobs"]["fake"]
    assert j["world"] == 4 and j["layers"] == 4 and len(j["ranks"]) == 4 and len(j["per_layer"]) == 4
    assert j["policy"] == {"kind": "placement", "mode": "paused", "overrides": {"kind": None, "mode": None},
                           "capacity_factor": 0.0, "bias_min": 0.0}
    assert all(r["accepted"] > 0 and r["status"]["applied_version"] == 0 for r in j["ranks"])


def test_pause_resume_set_policy_round_trip_and_persist(served):
    daemon, client, log, _ = served
    assert client.request({"op": "resume"}) == {"ok": True, "jobs": ["fake"], "mode": "automatic"}
    assert job(client)["policy"]["mode"] == "automatic"
    assert client.request({"op": "pause", "job": "fake"})["mode"] == "paused"
    assert job(client)["policy"]["overrides"]["mode"] == "paused"
    assert client.request({"op": "set_policy", "policy": "drop"})["policy"] == "drop"
    assert job(client)["policy"]["kind"] == "drop"
    saved = json.loads((daemon.state_dir / "state.json").read_text())["jobs"]["fake"]
    assert saved["mode"] == "paused" and saved["policy"] == "drop"
    assert "api: pause uid=0 job=fake" in log.getvalue() and "api: set_policy uid=0" in log.getvalue()
    bad = client.request({"op": "set_policy", "policy": "random"})
    assert not bad["ok"] and "placement, token, drop" in bad["error"]
    assert not client.request({"op": "pause", "job": "nope"})["ok"]


def test_plan_dry_run_publishes_nothing_then_a_real_plan_is_published(served):
    daemon, client, _, run = served
    dry = client.request({"op": "plan", "dry_run": True})
    assert dry["ok"] and dry["dry_run"] and dry["published_version"] is None
    assert dry["policy"] == "placement" and dry["moves"] > 0
    assert dry["balancedness_after"]["worst"] < dry["balancedness_before"]["worst"]
    assert dry["predicted_gain_s"] > dry["migration_cost_s"] and dry["would_push"] is False  # paused
    assert job(client)["last_version"] == 0 and _control_version(run) == 0
    real = client.request({"op": "plan", "dry_run": False})
    assert real["ok"] and real["published_version"] == 1
    assert _control_version(run) == 1
    wait_until(lambda: job(client)["last_plan"]["state"] == "applied")
    last = job(client)["last_plan"]
    assert last["source"] == "api uid=0" and last["version"] == 1
    assert not client.request({"op": "plan", "dry_run": "yes"})["ok"]


def _control_version(run: Path) -> int:
    reader = ControlReader.open(control_path(run, "fake"), 4, 16, 20)
    try:
        plan = reader.read()
        return 0 if plan is None else plan.version
    finally:
        reader.close()


def test_bad_requests_get_errors_and_the_server_survives(served):
    _, client, _, _ = served
    for line, match in [(b"{not json\n", "not JSON"), (b"[1, 2]\n", "expected an object"),
                        (b'{"op": 5}\n', "expected an object"), (b'{"op": "explode"}\n', "unknown op"),
                        (b"\xff\xfe\n", "not JSON")]:
        r = client.request_raw(line)
        assert r["ok"] is False and match in r["error"], (line, r)
    # several requests on one connection, one of them bad
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(client.path))
        s.sendall(b'{"op": "status"}\nnope\n{"op": "status"}\n')
        answers = _read_lines(s, 3)
    assert [a["ok"] for a in answers] == [True, False, True]
    assert client.request({"op": "status"})["ok"]


def _read_lines(s: socket.socket, n: int) -> list[dict]:
    buf = b""
    while buf.count(b"\n") < n:
        chunk = s.recv(1 << 16)
        assert chunk, "connection closed early"
        buf += chunk
    return [json.loads(line) for line in buf.splitlines()[:n]]


def _as_other_user(path: Path, gid: int) -> dict:
    """Fork a child that drops to uid nobody (and ``gid``), then asks for status; its outcome."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only system calls and the client, then _exit
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(NOBODY)
            try:
                result = {"response": ApiClient(path, timeout=5).request({"op": "status"})}
            except PermissionError as exc:
                result = {"connect_error": exc.strerror}
            except Exception as exc:  # reported to the parent, which fails on it
                result = {"child_error": f"{type(exc).__name__}: {exc}"}
            os.write(w, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to setuid() a child to nobody")
def test_peer_of_another_uid_is_refused_unless_in_the_group(served):
    daemon, _, log, _ = served
    # By file mode: nobody without the group cannot even connect to the 0660 socket.
    assert "connect_error" in _as_other_user(daemon.socket_path, gid=STRANGER_GID)
    # By SO_PEERCRED: open the mode up, and the daemon still refuses the stranger ...
    os.chmod(daemon.socket_path, 0o666)
    refused = _as_other_user(daemon.socket_path, gid=STRANGER_GID)["response"]
    assert refused["ok"] is False and "permission denied" in refused["error"]
    assert f"api: refused peer uid={NOBODY}" in log.getvalue()
    # ... but serves a process in the configured group.
    os.chmod(daemon.socket_path, 0o660)
    allowed = _as_other_user(daemon.socket_path, gid=api_group().gr_gid)["response"]
    assert allowed["ok"] is True and "fake" in allowed["state"]["jobs"]


def test_status_text_lists_the_worst_layers_first_and_trims_big_models(served):
    _, client, _, _ = served
    state = client.request({"op": "status"})["state"]
    j = state["jobs"]["fake"]
    j["per_layer"] = [{**j["per_layer"][0], "layer": i, "max_min": float(i % 13), "flagged": i % 13 > 10}
                      for i in range(40)]
    text = render(state)
    assert "worst 10 of 40 layers" in text
    shown = [line.split() for line in text.splitlines() if line.strip().startswith("layer ")]
    assert len(shown) == 10 and [float(x[2]) for x in shown][:3] == [12.0, 12.0, 12.0]
    assert sum("FLAGGED" in line for line in text.splitlines()) == 6  # 11 and 12, three times each
    assert len([line for line in render(state, all_layers=True).splitlines() if "  layer " in line]) == 40


def test_status_text_says_when_automatic_plans_are_backing_off(served):
    _, client, _, _ = served
    state = client.request({"op": "status"})["state"]
    j = state["jobs"]["fake"]
    assert j["plan_backoff"] == {"failed_plans": 0, "left_s": 0.0}
    assert "backing off" not in render(state)
    j["plan_backoff"] = {"failed_plans": 3, "left_s": 118.0}
    assert "backing off: 3 failed plan(s) in a row; next automatic plan in" in render(state)
