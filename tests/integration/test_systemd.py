"""balancerd as a systemd service: the unit files checked by systemd's own tools, sd_notify through the
real `balancerd run` process, and the runtime directory that sysusers.d and tmpfiles.d make.

SIGTERM within 2 s and SIGHUP keeping state are tested in test_daemon_process.py; here the same
process is watched from the service manager's side of NOTIFY_SOCKET.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from balancerd.protocol import (
    ControlReader,
    ControlWriter,
    RingShape,
    SegmentError,
    TelemetryReader,
    TelemetryWriter,
    new_generation,
    ring_path,
)
from tests.integration.test_daemon_process import DaemonProcess, wait_until
from tests.telemetry_writer import TelemetryProcess, WriterSpec

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "systemd"
OPERATIONS = ROOT / "docs" / "operations.md"
INSTALLED = Path(sys.executable).parent / "balancerd"  # this environment's console script
UNITS = {"balancerd.service": "balancerd.service", "balancerd@.service": "balancerd@deepseek.service"}
# What the template may change, and only by naming the instance.
PER_INSTANCE = {"Description", "ExecStart", "RuntimeDirectory", "StateDirectory", "SyslogIdentifier",
                "Environment=BALANCERD_RUNTIME_DIR"}
WATCHDOG_S = 1.0

needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed")


# -- the files --------------------------------------------------------------------------------------


def settings(path: Path) -> dict[str, list[str]]:
    """``Key`` -> values of a unit-like file; ``Environment`` is split into ``Environment=NAME`` keys."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if not line or line[0] in "#;[":
            continue
        key, value = line.split("=", 1)
        if key == "Environment":
            for assignment in value.split():
                name, val = assignment.split("=", 1)
                out.setdefault(f"Environment={name}", []).append(val)
        else:
            out.setdefault(key, []).append(value)
    return out


def installed_copy(tmp_path: Path, unit: str, exec_start: Path = INSTALLED) -> Path:
    """The unit with ExecStart at ``exec_start``, named as systemd would load it (the template as an
    instance)."""
    text = (SYSTEMD / unit).read_text()
    assert "/opt/balancerd/bin/balancerd " in text
    path = tmp_path / UNITS[unit]
    path.write_text(text.replace("/opt/balancerd/bin/balancerd", str(exec_start)))
    return path


def analyze(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", *map(str, args)], capture_output=True, text=True, timeout=60)


@needs_systemd
@pytest.mark.parametrize("unit", UNITS)
def test_units_pass_systemd_analyze_verify(tmp_path, unit):
    r = analyze("verify", "--man=no", installed_copy(tmp_path, unit))
    assert (r.returncode, r.stdout + r.stderr) == (0, "")
    # the check bites: a misspelt key and an ExecStart that is not there are both reported
    broken = installed_copy(tmp_path, unit, exec_start=tmp_path / "missing" / "balancerd")
    broken.write_text(broken.read_text().replace("WatchdogSec=", "WatchdogSecs="))
    r = analyze("verify", "--man=no", broken)
    assert r.returncode != 0 and "WatchdogSecs" in r.stderr and "missing/balancerd" in r.stderr


@needs_systemd
def test_security_exposure_is_the_one_recorded_in_operations_md(tmp_path):
    recorded = re.search(r"overall exposure level of (\d+\.\d+)", OPERATIONS.read_text())
    assert recorded, "docs/operations.md must record the systemd-analyze security score"
    for unit in UNITS:
        r = analyze("security", "--offline=yes", installed_copy(tmp_path, unit))
        assert r.returncode == 0, r.stderr
        measured = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)[1]
        assert measured == recorded[1], f"{unit}: exposure {measured}, docs say {recorded[1]}"


def test_template_is_the_unit_with_instance_paths():
    plain, template = settings(SYSTEMD / "balancerd.service"), settings(SYSTEMD / "balancerd@.service")
    assert plain.keys() == template.keys()
    differ = {k for k in plain if plain[k] != template[k]}
    assert differ == PER_INSTANCE
    assert all("%i" in v for k in differ for v in template[k])


def test_units_tmpfiles_and_sysusers_agree():
    unit = settings(SYSTEMD / "balancerd.service")
    (runtime,), (mode,) = unit["RuntimeDirectory"], unit["RuntimeDirectoryMode"]
    assert unit["Environment=BALANCERD_RUNTIME_DIR"] == [f"%t/{runtime}"]
    assert unit["RuntimeDirectoryPreserve"] == ["yes"]  # stopping the daemon keeps the engines' files
    assert unit["Type"] == ["notify"] and unit["RestartPreventExitStatus"] == ["2"]
    tmpfiles = [line.split() for line in (SYSTEMD / "balancerd.tmpfiles").read_text().splitlines()
                if line and not line.startswith("#")]
    assert tmpfiles == [["d", f"/run/{runtime}", mode, *unit["User"], *unit["Group"], "-"]]
    sysusers = [line.split()[:2] for line in (SYSTEMD / "balancerd.sysusers").read_text().splitlines()
                if line and not line.startswith("#")]
    assert sysusers == [["u", *unit["User"]]] and unit["User"] == unit["Group"]  # "u" makes both


# -- the runtime directory's permissions ------------------------------------------------------------

SHAPE = RingShape(layers=2, experts=4, slots_per_rank=4)


def as_user(uid: int, gid: int, groups: list[int], fn: Callable[[], None]) -> None:
    """Run ``fn`` in a forked child with these credentials; raise if it failed there."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            fn()
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"{fn.__name__} failed as uid {uid}"


def write_record(writer: TelemetryWriter, first_step: int) -> None:
    loads = np.full((SHAPE.layers, SHAPE.experts), 100, np.int32)
    times = np.full(SHAPE.layers, 10.0, np.float32)
    writer.write(first_step=first_step, last_step=first_step + 3, tokens=100, placement_version=0,
                 routed=loads, received=loads, dispatch_us=times, combine_us=times, expert_us=times,
                 step_us=100.0, global_routed=loads)


@pytest.fixture
def open_root():
    """An empty directory the unprivileged users of a test can reach (pytest's own is mode 0700)."""
    root = Path(tempfile.mkdtemp(prefix="balancerd-root-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("systemd-sysusers") is None
                    or shutil.which("systemd-tmpfiles") is None, reason="needs root and systemd's tools")
def test_engine_and_daemon_users_share_segments_through_the_group(open_root):
    root = open_root
    (root / "etc").mkdir()
    for command in (["systemd-sysusers", f"--root={root}", str(SYSTEMD / "balancerd.sysusers")],
                    ["systemd-tmpfiles", f"--root={root}", "--create", str(SYSTEMD / "balancerd.tmpfiles")]):
        r = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    user = next(line.split(":") for line in (root / "etc/passwd").read_text().splitlines()
                if line.startswith("balancerd:"))
    uid, gid = int(user[2]), int(user[3])
    run_dir = root / "run" / "balancerd"
    st = run_dir.stat()
    assert (st.st_uid, st.st_gid, oct(st.st_mode & 0o7777)) == (uid, gid, "0o2770")
    engine, outsider = 40001, 40002  # the engine's own primary group is not balancerd's
    ring = ring_path(run_dir, "job", 0)

    def engine_publishes() -> None:
        write_record(TelemetryWriter.create(run_dir, "job", 0, 1, new_generation(), SHAPE), 0)

    def daemon_reads_and_plans() -> None:
        assert len(TelemetryReader.open(ring).poll()) == 1
        ControlWriter.create(run_dir, "job", SHAPE.layers, SHAPE.experts, SHAPE.slots_per_rank, 1)

    def engine_reads_the_control_block() -> None:
        ControlReader.open(run_dir / "job.control", SHAPE.layers, SHAPE.experts, SHAPE.slots_per_rank)

    def outsider_is_kept_out() -> None:
        with pytest.raises((PermissionError, SegmentError)):
            TelemetryReader.open(ring)

    as_user(engine, engine, [gid], engine_publishes)
    st = ring.stat()
    assert (st.st_uid, st.st_gid, oct(st.st_mode & 0o777)) == (engine, gid, "0o660")  # setgid directory
    as_user(uid, gid, [], daemon_reads_and_plans)
    as_user(engine, engine, [gid], engine_reads_the_control_block)
    as_user(outsider, outsider, [], outsider_is_kept_out)


# -- sd_notify through the real process -------------------------------------------------------------


class Notifications:
    """The service manager's end of NOTIFY_SOCKET: collects every datagram with its arrival time."""

    def __init__(self, path: Path):
        self.address = str(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.address)
        self.received: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while True:
            try:
                data = self._sock.recv(4096)
            except OSError:  # closed
                return
            with self._cond:
                self.received.append((time.monotonic(), data.decode()))
                self._cond.notify_all()

    def messages(self, since: float = 0.0) -> list[str]:
        with self._cond:
            return [m for t, m in self.received if t >= since]

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float = 15.0,
                 since: float = 0.0) -> list[str]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(got := [m for t, m in self.received if t >= since]):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out after {timeout} s; received {got[-8:]}")
                self._cond.wait(left)
            return got

    def close(self) -> None:
        self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(5.0)


def pings(messages: list[str]) -> int:
    return messages.count("WATCHDOG=1\n")


@pytest.fixture
def notify(tmp_path):
    n = Notifications(tmp_path / "notify.sock")
    yield n
    n.close()


@pytest.fixture
def daemon(tmp_path):
    d = DaemonProcess(tmp_path)
    yield d
    d.kill()


def notify_env(notify: Notifications) -> dict[str, str]:
    return {"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6))}


@pytest.mark.slow
def test_ready_watchdog_reload_and_stopping_in_order(daemon, notify):
    with TelemetryProcess(daemon.run_dir, WriterSpec(load={"kind": "zipf", "s": 1.5})):
        daemon.start(env=notify_env(notify))
        got = notify.wait_for(lambda m: pings(m) >= 3)
        assert got[0] == "READY=1\nSTATUS=running\n" and set(got[1:]) == {"WATCHDOG=1\n"}
        hup = time.monotonic()
        daemon.proc.send_signal(signal.SIGHUP)
        got = notify.wait_for(lambda m: "READY=1\n" in m, since=hup)
        reloads = [m for m in got if m != "WATCHDOG=1\n"]
        assert len(reloads) == 2 and reloads[1] == "READY=1\n"
        stamp = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)\n", reloads[0])
        assert stamp and hup <= int(stamp[1]) / 1e6 <= time.monotonic()  # CLOCK_MONOTONIC, in us
        assert "configuration reloaded" in daemon.log()
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(timeout=2.0) == 0
    assert notify.wait_for(lambda m: "STOPPING=1\n" in m)[-1] == "STOPPING=1\n"


class Publisher:
    """Rank 0 of a one-GPU job writing a real ring from a thread. ``mode``: "flow" publishes a new
    step range every 50 ms, "replay" the same range again (records arrive, none is new), "idle"
    nothing."""

    def __init__(self, directory: Path):
        self.mode = "flow"
        self.writer = TelemetryWriter.create(directory, "fake", 0, 1, new_generation(), SHAPE)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        step = 0
        while not self._stop.wait(0.05):
            if self.mode == "flow":
                step += 4
            if self.mode != "idle":
                write_record(self.writer, step)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.writer.close()


@pytest.mark.slow
def test_no_watchdog_pings_while_ingest_is_stalled(daemon, notify):
    publisher = Publisher(daemon.run_dir)
    try:
        daemon.start(env=notify_env(notify))
        wait_until(lambda: (daemon.job() or {}).get("window", {}).get("added", 0) >= 2, what="intervals")
        notify.wait_for(lambda m: pings(m) >= 2)

        # an engine that stops publishing is not a stall: pings go on well past the stall limit
        publisher.mode = "idle"
        idle = time.monotonic()
        notify.wait_for(lambda m: pings(m) >= 5, since=idle)
        assert "ingest stalled" not in daemon.log()

        # records keep arriving but none is new: no interval reaches the window
        publisher.mode = "replay"
        wait_until(lambda: "ingest stalled" in daemon.log(), what="the stall to be reported")
        stalled = time.monotonic()
        quiet_until = stalled + 2.5 * WATCHDOG_S  # systemd would have killed it by then
        while time.monotonic() < quiet_until:
            assert pings(notify.messages(since=stalled)) == 0
            assert daemon.proc.poll() is None
            time.sleep(0.05)
        assert "STATUS=ingest stalled: fake\n" in notify.messages()
        assert re.search(r"warning ingest stalled: .* jobs=fake stalled_s=", daemon.log())

        publisher.mode = "flow"
        notify.wait_for(lambda m: pings(m) >= 1, since=quiet_until)
        assert "ingest flowing again" in daemon.log() and "STATUS=running\n" in notify.messages(stalled)
    finally:
        publisher.close()


@pytest.mark.slow
def test_a_bad_notify_socket_is_one_warning_not_a_failure(daemon):
    daemon.start(env={"NOTIFY_SOCKET": "relative/notify.sock", "WATCHDOG_USEC": "1000000"})
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=2.0) == 0
    log = daemon.log()
    assert "warning not notifying the service manager" in log and "Traceback" not in log


# -- the sandbox, from the daemon's side ------------------------------------------------------------


def syscall_sets() -> dict[str, set[str]]:
    """systemd's named system call sets, nested sets expanded."""
    raw: dict[str, list[str]] = {}
    name = None
    for line in analyze("syscall-filter").stdout.splitlines():
        item = line.split("#")[0].strip()
        if item.startswith("@") and not line.startswith(" "):
            name = item
            raw[name] = []
        elif item and name:
            raw[name].append(item)

    def expand(members: list[str]) -> set[str]:
        return set().union(*(expand(raw[m]) if m.startswith("@") else {m} for m in members))

    return {k: expand(v) for k, v in raw.items()}


def can_trace() -> bool:
    return shutil.which("strace") is not None and subprocess.run(
        ["strace", "-qq", "-o", os.devnull, "true"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.slow
@needs_systemd
@pytest.mark.skipif(not can_trace(), reason="strace is not installed or may not trace here")
def test_the_daemon_stays_inside_the_units_sandbox(daemon, notify, tmp_path):
    """Every system call, socket family and memory protection the daemon uses, traced through start,
    telemetry, a plan, a metrics scrape, a reload and a stop, is one the unit's filters allow:
    SystemCallFilter, RestrictAddressFamilies and MemoryDenyWriteExecute would not break it."""
    unit = settings(SYSTEMD / "balancerd.service")
    sets = syscall_sets()
    allowed = set().union(*(sets[s] if s.startswith("@") else {s}
                            for v in unit["SystemCallFilter"] for s in v.split()))
    families = set(unit["RestrictAddressFamilies"][0].split())
    assert unit["MemoryDenyWriteExecute"] == ["yes"]
    trace = tmp_path / "trace"
    with socket.socket() as probe:  # a free port, so the metrics endpoint is served and scraped too
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    daemon.write_config(3.0, extra=f'\n[metrics]\nprometheus_address = "{address}"\n')
    with TelemetryProcess(daemon.run_dir, WriterSpec(load={"kind": "zipf", "s": 1.5})):
        with open(daemon.log_path, "ab") as log:
            daemon.proc = subprocess.Popen(
                ["strace", "-f", "-qq", "-o", str(trace), sys.executable, "-m", "balancerd.cli", "run",
                 "--config", str(daemon.config), "--runtime-dir", str(daemon.run_dir)],
                stdout=log, stderr=log, env={**os.environ, **notify_env(notify)})
        state = wait_until(lambda: (daemon.job() or {}).get("per_layer") and daemon.status(), timeout=60,
                           what="the traced daemon to follow the job")
        assert daemon.client.request({"op": "plan", "dry_run": False})["ok"]
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as scrape:
            assert b"balancerd_daemon_heartbeat_seconds" in scrape.read()
        pid = state["daemon"]["pid"]
        os.kill(pid, signal.SIGHUP)
        wait_until(lambda: "configuration reloaded" in daemon.log(), timeout=30, what="the reload")
        os.kill(pid, signal.SIGTERM)
        assert daemon.proc.wait(timeout=30) == 0
    lines = trace.read_text().splitlines()
    called = {m[1] for line in lines if (m := re.match(r"\d+\s+([a-z0-9_]+)\(", line))}
    assert "execve" in called and "sendto" in called  # the trace covers the process and sd_notify
    assert called - allowed == set()
    used_families = {m[1] for line in lines if (m := re.match(r"\d+\s+socket\((AF_\w+)", line))}
    assert used_families and used_families <= families
    wx = [line for line in lines if re.match(r"\d+\s+(mmap|mprotect|pkey_mprotect)\(", line)
          and "PROT_EXEC" in line and ("PROT_WRITE" in line or "mprotect" in line)]
    assert wx == []
