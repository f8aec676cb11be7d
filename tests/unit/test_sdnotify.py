"""sd_notify against a real Unix datagram socket, and when the watchdog pings (balancerd.watchdog)."""

from __future__ import annotations

import io
import os
import socket
import uuid

import pytest

from balancerd.log import Log
from balancerd.sdnotify import Notifier, watchdog_interval
from balancerd.watchdog import IngestHealth, Watchdog


class Listener:
    """The service manager's end: a datagram socket bound to a path or an abstract name."""

    def __init__(self, address: str):
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(2.0)

    def receive(self) -> str:
        return self.sock.recv(4096).decode()

    def pending(self) -> list[str]:
        """Every datagram already queued, without waiting."""
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            return out
        finally:
            self.sock.settimeout(2.0)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def listener(request, tmp_path):
    address = str(tmp_path / "notify") if request.param == "path" else f"@balancerd-test-{uuid.uuid4().hex}"
    lst = Listener(address)
    yield lst
    lst.close()


def test_ready_watchdog_stopping_arrive_in_order(listener):
    n = Notifier.from_environment({"NOTIFY_SOCKET": listener.address})
    assert n.enabled
    assert n.notify(READY=1, STATUS="running")
    assert n.notify(WATCHDOG=1)
    assert n.notify(STOPPING=1)
    assert [listener.receive() for _ in range(3)] == ["READY=1\nSTATUS=running\n", "WATCHDOG=1\n",
                                                      "STOPPING=1\n"]
    n.close()


def test_a_value_cannot_inject_another_assignment(listener):
    n = Notifier(listener.address)
    n.notify(STATUS="stalled\nREADY=1")
    assert listener.receive() == "STATUS=stalled READY=1\n"
    n.close()


def test_without_notify_socket_nothing_is_sent():
    n = Notifier.from_environment({})
    assert not n.enabled
    assert not n.notify(READY=1)


def test_a_relative_address_is_refused():
    with pytest.raises(ValueError, match="neither an absolute path nor an abstract name"):
        Notifier.from_environment({"NOTIFY_SOCKET": "run/notify"})


def test_a_gone_listener_is_not_an_error(tmp_path):
    lst = Listener(str(tmp_path / "notify"))
    n = Notifier(lst.address)
    assert n.notify(READY=1)
    lst.close()
    os.unlink(lst.address)
    assert not n.notify(WATCHDOG=1)
    n.close()


def test_a_full_listener_queue_drops_instead_of_blocking(tmp_path):
    lst = Listener(str(tmp_path / "notify"))
    n = Notifier(lst.address)
    sent = [n.notify(WATCHDOG=1) for _ in range(5000)]  # far beyond the socket's queue, never read
    assert sent[0] and not sent[-1]
    n.close()
    lst.close()


@pytest.mark.parametrize(("env", "expected"), [
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "4242"}, 0.5),
    ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "4243"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval(env, expected):
    assert watchdog_interval(env, pid=4242) == expected


def test_watchdog_interval_defaults_to_this_process():
    assert watchdog_interval({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": str(os.getpid())}) == 0.001


# -- the health rule --------------------------------------------------------------------------------


def snap(added: int, accepted: int, generation: str = "a1", rejected: int = 0, job: str = "j") -> dict:
    """The parts of Daemon.snapshot() the rule reads: one job with one current rank."""
    rank = {"current": True, "accepted": accepted, "rejected": rejected}
    old = {"current": False, "accepted": 10_000, "rejected": 0}  # a rank of an older generation
    return {"jobs": {job: {"generation": generation, "window": {"added": added}, "ranks": [rank, old]}}}


def test_records_arriving_without_progress_stall_after_the_limit():
    h = IngestHealth(stall_after_s=10.0)
    assert h.stalled(snap(5, 50), 0.0) == {}
    assert h.stalled(snap(6, 60), 5.0) == {}    # progress
    assert h.stalled(snap(6, 70), 10.0) == {}   # arrivals, no progress: the clock starts at 5
    assert h.stalled(snap(6, 80), 15.0) == {}   # 10 s: not yet beyond the limit
    assert h.stalled(snap(6, 90), 20.0) == {"j": 15.0}
    assert h.stalled(snap(7, 100), 25.0) == {}  # an interval reached the window again


def test_an_idle_engine_never_stalls():
    h = IngestHealth(stall_after_s=10.0)
    for t in range(0, 100, 5):
        assert h.stalled(snap(6, 60), float(t)) == {}


def test_a_pause_in_arrivals_restarts_the_clock():
    h = IngestHealth(stall_after_s=10.0)
    h.stalled(snap(6, 60), 0.0)
    h.stalled(snap(6, 70), 5.0)
    h.stalled(snap(6, 80), 10.0)
    h.stalled(snap(6, 80), 15.0)                # nothing arrived
    assert h.stalled(snap(6, 90), 20.0) == {}
    assert h.stalled(snap(6, 100), 25.0) == {}
    assert h.stalled(snap(6, 110), 30.0) == {"j": 15.0}


def test_rejected_records_do_not_count_as_arriving():
    h = IngestHealth(stall_after_s=10.0)
    for i, t in enumerate(range(0, 60, 5)):
        assert h.stalled(snap(6, 60 + 10 * i, rejected=10 * i), float(t)) == {}


def test_a_new_generation_is_progress():
    h = IngestHealth(stall_after_s=10.0)
    h.stalled(snap(6, 60), 0.0)
    h.stalled(snap(6, 70), 5.0)
    h.stalled(snap(6, 80), 10.0)
    assert h.stalled(snap(6, 90, generation="b2"), 15.0) == {}


def test_a_job_that_leaves_is_forgotten():
    h = IngestHealth(stall_after_s=10.0)
    h.stalled(snap(6, 60), 0.0)
    h.stalled(snap(6, 70), 5.0)
    h.stalled({"jobs": {}}, 10.0)
    assert h.stalled(snap(6, 80), 15.0) == {}  # seen afresh: no stall carried over


# -- pings ------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_watchdog_pings_every_half_timeout_and_withholds_while_stalled(tmp_path):
    lst = Listener(str(tmp_path / "notify"))
    clock, out = Clock(), io.StringIO()
    dog = Watchdog(Notifier(lst.address), timeout_s=10.0, log=Log("info", stream=out, journal=True),
                   clock=clock)
    state = {"added": 1, "accepted": 10}
    calls = []

    def snapshot() -> dict:
        calls.append(clock.now)
        return snap(state["added"], state["accepted"])

    def run_for(seconds: float, stall: bool) -> list[str]:
        end = clock.now + seconds
        while clock.now < end:
            state["accepted"] += 1
            state["added"] += 0 if stall else 1
            dog.tick(snapshot)
            clock.now += 0.5  # the loop's poll interval
        return lst.pending()

    assert run_for(20.0, stall=False) == ["WATCHDOG=1\n"] * 4   # at 100, 105, 110, 115
    assert len(calls) == 4                                      # snapshots only when a ping is due
    during = run_for(20.0, stall=True)
    assert during == ["WATCHDOG=1\n"] * 3 + ["STATUS=ingest stalled: j\n"]  # 120-130: within the limit
    assert out.getvalue().count("<4>ingest stalled") == 1 and "jobs=j" in out.getvalue()
    assert run_for(10.0, stall=False) == ["STATUS=running\n", "WATCHDOG=1\n", "WATCHDOG=1\n"]
    assert "<6>ingest flowing again; watchdog pings resumed" in out.getvalue()
    lst.close()


def test_the_listener_sees_only_whole_datagrams(listener):
    """A notification is one datagram: every line sent together arrives together."""
    n = Notifier(listener.address)
    n.notify(RELOADING=1, MONOTONIC_USEC=123456789)
    n.notify(READY=1)
    assert listener.receive() == "RELOADING=1\nMONOTONIC_USEC=123456789\n"
    assert listener.receive() == "READY=1\n"
    n.close()

