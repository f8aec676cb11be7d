"""The console's plan lines from a recorded daemon's status, and with a back-off after failed plans."""

from __future__ import annotations

from balancerd.tui.model import fmt_dur, last_plan_lines
from tests.tui.recorded import RecordedDaemon


def test_plan_lines_say_when_automatic_plans_back_off() -> None:
    job = next(iter(RecordedDaemon().state["jobs"].values()))
    assert job["last_plan"] is not None
    assert not any("backing off" in line for line in last_plan_lines(job, None))
    job["plan_backoff"] = {"failed_plans": 2, "left_s": 61.0}
    backoff = [line for line in last_plan_lines(job, None) if line.startswith("backing off")]
    wait = fmt_dur(61.0)
    assert backoff == [f"backing off: 2 failed in a row; next automatic plan in {wait} at the earliest"]
