"""A real daemon process fed by a real telemetry writer, and helpers to drive the console with a pilot."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from textual.pilot import Pilot

from tests.integration.test_daemon_process import DaemonProcess, wait_until
from tests.telemetry_writer import TelemetryProcess, WriterSpec

WAIT_S = 15.0
NO_AUTO_PLANS = 50.0  # detection threshold no layer reaches: only the console's actions publish plans


class Live:
    """The daemon (paused, as configured) and the writer of job ``fake`` (4 ranks, zipf load)."""

    def __init__(self, daemon: DaemonProcess, writer: TelemetryProcess):
        self.daemon, self.writer = daemon, writer

    def job(self) -> dict:
        """The job as the daemon reports it now (through its API, not through the console)."""
        job = self.daemon.job()
        assert job is not None, "the daemon does not report job fake"
        return job


@pytest.fixture
def live(tmp_path):
    daemon = DaemonProcess(tmp_path, threshold=NO_AUTO_PLANS)
    writer = TelemetryProcess(daemon.run_dir, WriterSpec(load={"kind": "zipf", "s": 1.5}))
    writer.start()
    try:
        daemon.start()
        wait_until(lambda: (daemon.job() or {}).get("window", {}).get("intervals", 0) >= 4,
                   what="four intervals in the daemon's window")
        yield Live(daemon, writer)
    finally:
        daemon.kill()
        writer.stop()


async def until(pilot: Pilot, predicate: Callable[[], object], what: str, timeout: float = WAIT_S) -> None:
    """Let the app run until ``predicate()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await pilot.pause(0.05)
