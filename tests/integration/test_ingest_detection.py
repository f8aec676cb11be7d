"""Detection driven by a real writer process into real rings, with the daemon stepped in this process."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest

from balancerd.config import parse_config
from balancerd.daemon import Daemon
from balancerd.log import Log
from balancerd.protocol import ControlReader, RingShape, TelemetryWriter, control_path
from tests.telemetry_writer import TelemetryProcess, WriterSpec

pytestmark = pytest.mark.slow

WAIT_S = 15.0  # bounds a broken run only


def make_daemon(tmp_path: Path, stale_after_s: float = 5.0, **sections) -> tuple[Daemon, io.StringIO]:
    doc = {"runtime_dir": str(tmp_path / "run"), "state_dir": str(tmp_path / "state"),
           "detect": {"threshold": 3.0, "clear_threshold": 2.5, "sustain": 3, "min_tokens": 1000,
                      "cooldown_s": 0.0},
           "window": {"intervals": 4},
           # small experts and a long horizon: any real improvement is worth its migration
           "policy": {"expert_bytes": 1024, "ack_timeout_s": 2.0}}
    for key, value in sections.items():
        doc.setdefault(key, {}).update(value)
    (tmp_path / "run").mkdir(exist_ok=True)
    out = io.StringIO()
    return Daemon(parse_config(doc), Log("debug", out, journal=False), serve_api=False,
                  stale_after_s=stale_after_s), out


def step_until(daemon: Daemon, predicate, timeout: float = WAIT_S, every=None):
    """Step the daemon (as its loop would) until ``predicate(snapshot)`` holds; returns that snapshot."""
    deadline = time.monotonic() + timeout
    while True:
        daemon.step(time.time())
        snap = daemon.snapshot(time.time())
        if every is not None:
            every(snap)
        if predicate(snap):
            return snap
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not reached in {timeout} s; last snapshot: "
                               f"{json.dumps(snap)[:2000]}")
        time.sleep(0.02)  # pacing like the daemon's poll interval; the predicate is what we wait for


def job_of(snap: dict) -> dict | None:
    return snap["jobs"].get("fake")


def errors_in(log: io.StringIO) -> list[str]:
    return [line for line in log.getvalue().splitlines() if " error " in line]


def test_sustained_imbalance_is_flagged_after_sustain_windows_and_fixed(tmp_path):
    daemon, log = make_daemon(tmp_path)
    flagged_at = []

    def watch(snap):
        j = job_of(snap)
        if j and j["flagged"] and not flagged_at:
            flagged_at.append(j["window"]["added"])

    spec = WriterSpec(load={"kind": "zipf", "s": 1.5})
    with TelemetryProcess(tmp_path / "run", spec) as writer:
        try:
            snap = step_until(daemon, lambda s: job_of(s) and job_of(s)["last_plan"] and
                              job_of(s)["last_plan"]["state"] == "applied", every=watch)
        finally:
            daemon.close()
        j = job_of(snap)
        assert flagged_at and flagged_at[0] >= 3, "a layer was flagged before `sustain` windows"
        plan = j["last_plan"]
        assert plan["version"] == 1 and plan["policy"] == "placement" and plan["source"] == "auto"
        assert plan["moves"] > 0
        assert plan["balancedness_after"]["worst"] < plan["balancedness_before"]["worst"]
        assert j["served_version"] == 1 and j["leader"]
        assert j["window"]["last_interval"]["source"] == "global_routed"
        assert set(plan["acks"].values()) == {"applied"} and set(plan["acks"]) == {"0", "1", "2", "3"}
        applied = writer.wait_for(lambda r: r["type"] == "plan", 1.0)
        assert applied["result"] == "applied" and applied["generation"] == writer.matching(
            lambda r: r["type"] == "ready")[0]["generation"]
        assert j["history"][-1]["version"] == 1 and j["history"][-1]["state"] == "applied"
    assert errors_in(log) == []
    assert "layers imbalanced job=fake" in log.getvalue()


def test_transient_spike_is_not_flagged(tmp_path):
    # a one-interval window, so the spike itself crosses the threshold: only `sustain` keeps it out
    daemon, log = make_daemon(tmp_path, window={"intervals": 1})
    peak = []
    spec = WriterSpec(load={"kind": "uniform"}, events=[
        {"at": 6, "event": "load", "load": {"kind": "zipf", "s": 2.0}},
        {"at": 8, "event": "load", "load": {"kind": "uniform"}},
    ])

    def watch(snap):
        j = job_of(snap)
        if j and j["per_layer"]:
            peak.append(max(x["max_min"] for x in j["per_layer"]))
        assert not (j and j["flagged"]), "a two-interval spike was flagged"

    with TelemetryProcess(tmp_path / "run", spec):
        try:
            snap = step_until(daemon, lambda s: job_of(s) and job_of(s)["window"]["added"] >= 16, every=watch)
        finally:
            daemon.close()
    assert max(peak) > 3.0, "the spike never showed: the test did not test anything"
    assert job_of(snap)["last_plan"] is None and job_of(snap)["last_version"] == 0
    assert errors_in(log) == []


def test_restart_resets_windows_and_never_publishes_for_the_old_generation(tmp_path):
    daemon, log = make_daemon(tmp_path)
    spec = WriterSpec(load={"kind": "zipf", "s": 1.5})
    with TelemetryProcess(tmp_path / "run", spec) as writer:
        try:
            first = step_until(daemon, lambda s: job_of(s) and job_of(s)["last_plan"] and
                               job_of(s)["last_plan"]["state"] == "applied")
            old_gen = job_of(first)["generation"]
            added_before = job_of(first)["window"]["added"]
            writer.command({"event": "restart"})
            new_gen = f"{writer.wait_for(lambda r: r['type'] == 'restarted', 5)['generation']:x}"
            after = step_until(daemon, lambda s: job_of(s)["generation"] == new_gen)
            j = job_of(after)
            written = max(r["n"] for r in writer.matching(
                lambda r: r["type"] == "interval" and f"{r['generation']:x}" == new_gen))
            # only intervals of the new generation are in the window: it was reset
            assert added_before >= 3 and j["window"]["added"] <= written
            assert j["served_version"] == 0  # the restarted runtime serves its initial placement
            second = step_until(daemon, lambda s: job_of(s)["last_plan"]["version"] >= 2 and
                                job_of(s)["last_plan"]["state"] == "applied")
        finally:
            daemon.close()
        published = job_of(second)["history"]
        assert [h["generation"] for h in published if h["version"] >= 2] == [new_gen] * (len(published) - 1)
        assert published[0]["generation"] == old_gen
        plans = writer.matching(lambda r: r["type"] == "plan")
        # the old plan, still in the control block, is rejected by the new runtime; nothing newer is old
        assert all(f"{p['generation']:x}" == new_gen for p in plans if p["version"] >= 2)
        assert all(p["result"] == "applied" for p in plans if p["version"] >= 2)
        block = ControlReader.open(control_path(tmp_path / "run", "fake"), 4, 16, 20)
        try:
            assert f"{block.read().generation:x}" == new_gen
        finally:
            block.close()
    assert "runtime restarted" in log.getvalue() and errors_in(log) == []


def test_dead_rank_ages_and_is_reported(tmp_path):
    daemon, log = make_daemon(tmp_path, stale_after_s=0.5)
    spec = WriterSpec(global_routed=False, events=[{"at": 5, "event": "stop_rank", "rank": 2}])
    with TelemetryProcess(tmp_path / "run", spec):
        try:
            snap = step_until(daemon, lambda s: job_of(s) and job_of(s)["ranks"][2]["stale"])
            added = job_of(snap)["window"]["added"]
            ages = [job_of(snap)["ranks"][2]["age_s"]]
            snap = step_until(daemon, lambda s: job_of(s)["window"]["added"] >= added + 5)
            ages.append(job_of(snap)["ranks"][2]["age_s"])
        finally:
            daemon.close()
    ranks = job_of(snap)["ranks"]
    assert ages[1] > ages[0] > 0.5
    assert [r["stale"] for r in ranks] == [False, False, True, False]
    assert all(r["age_s"] < 0.5 for r in ranks if r["rank"] != 2)
    window = job_of(snap)["window"]
    assert window["last_interval"]["source"] == "sum of local ranks"
    assert window["last_interval"]["ranks"] == [0, 1, 3]
    assert window["incomplete_intervals"] > 0  # those rank 2 never sent, counted once it went stale
    assert "rank stopped publishing job=fake rank=2" in log.getvalue()
    assert log.getvalue().count("rank stopped publishing") == 1  # logged once, not every step


def test_rank_with_zero_load_reads_as_a_huge_ratio_without_crashing(tmp_path):
    daemon, log = make_daemon(tmp_path, policy={"mode": "paused"})
    spec = WriterSpec(load={"kind": "uniform", "zero_rank": 1})
    with TelemetryProcess(tmp_path / "run", spec):
        try:
            snap = step_until(daemon, lambda s: job_of(s) and len(job_of(s)["flagged"]) == 4)
        finally:
            daemon.close()
    j = job_of(snap)
    assert all(x["max_min"] > 1e6 for x in j["per_layer"])
    json.dumps(snap, allow_nan=False)  # the snapshot stays valid JSON
    assert j["last_plan"] is None  # paused: flagged, never pushed
    assert errors_in(log) == []


def test_bad_segments_and_records_are_counted_and_logged_once(tmp_path):
    daemon, log = make_daemon(tmp_path)
    run = tmp_path / "run"
    (run / "fake.rank7.ring").write_bytes(b"\0" * 8192)  # not a ring at all
    liar = TelemetryWriter.create(run, "other", 0, 2, 99, RingShape(2, 4, 2))
    L, E, K = 2, 4, 2
    for i in range(3):  # checksummed, but the counts are negative: must be rejected, not used
        liar.write(first_step=i, last_step=i, tokens=1, placement_version=0,
                   routed=np.full((L, E), -5, np.int32), received=np.zeros((L, K), np.int32),
                   dispatch_us=np.zeros(L, np.float32), combine_us=np.zeros(L, np.float32),
                   expert_us=np.zeros(L, np.float32), step_us=1.0)
    try:
        with TelemetryProcess(run, WriterSpec()):
            snap = step_until(daemon, lambda s: job_of(s) and job_of(s)["window"]["added"] >= 6)
    finally:
        liar.close()
        daemon.close()
    assert snap["daemon"]["bad_segments"] >= 1
    other = snap["jobs"]["other"]
    assert other["ranks"][0]["rejected"] == 3 and other["window"]["added"] == 0
    text = log.getvalue()
    assert len([line for line in text.splitlines() if "fake.rank7.ring" in line]) == 1
    assert text.count("dropping invalid telemetry record") == 1
    assert errors_in(log) == []


@pytest.mark.parametrize("action, state, line", [
    ("ignore", "unacknowledged", "plan not acknowledged in time job=fake version=1"),
    ("reject", "rejected", "plan rejected job=fake version=1"),
])
def test_unacknowledged_and_rejected_plans_are_reported(tmp_path, action, state, line):
    daemon, log = make_daemon(tmp_path, policy={"ack_timeout_s": 0.5})
    spec = WriterSpec(load={"kind": "zipf", "s": 1.5}, plans=action)
    with TelemetryProcess(tmp_path / "run", spec):
        try:
            snap = step_until(daemon, lambda s: job_of(s) and job_of(s)["last_plan"] and
                              job_of(s)["last_plan"]["state"] == state)
            # a failed plan holds the next automatic one for the ack timeout: no re-publishing every poll
            assert job_of(snap)["plan_backoff"]["failed_plans"] == 1
            assert 0 < job_of(snap)["plan_backoff"]["left_s"] <= 0.5
            version = job_of(snap)["last_plan"]["version"]
            held_until = time.monotonic() + 0.3
            while time.monotonic() < held_until:
                daemon.step(time.time())
                assert job_of(daemon.snapshot(time.time()))["last_plan"]["version"] == version
                time.sleep(0.02)
        finally:
            daemon.close()
    plan = job_of(snap)["last_plan"]
    assert job_of(snap)["history"][-1]["state"] == state
    if action == "reject":
        assert plan["rejection"] == {"rank": 0, "result": "rejected", "reason": "values",
                                     "detail": "rejected by the fake job"}
        assert set(plan["acks"].values()) == {"rejected"}
    else:
        assert plan["acks"] == {} and plan["rejection"] is None
    assert line in log.getvalue()


@pytest.mark.parametrize("kind", ["token", "drop"])
def test_token_and_drop_policies_publish_their_parameters(tmp_path, kind):
    daemon, log = make_daemon(tmp_path, policy={"kind": kind})
    spec = WriterSpec(load={"kind": "zipf", "s": 1.5})
    with TelemetryProcess(tmp_path / "run", spec) as writer:
        try:
            step_until(daemon, lambda s: job_of(s) and job_of(s)["last_plan"] and
                       job_of(s)["last_plan"]["state"] == "applied")
        finally:
            daemon.close()
        seen = writer.matching(lambda r: r["type"] == "plan")[0]
    assert seen["policy"] == kind and seen["result"] == "applied"
    if kind == "token":
        assert seen["bias_max"] > 0 and seen["capacity_factor"] == 0.0
    else:
        assert seen["bias_max"] == 0 and seen["capacity_factor"] == pytest.approx(1.25)


def test_daemon_without_rank_0_observes_and_never_plans(tmp_path):
    daemon, log = make_daemon(tmp_path)
    spec = WriterSpec(load={"kind": "zipf", "s": 1.5}, ranks=[2, 3], leader=False)
    with TelemetryProcess(tmp_path / "run", spec):
        try:
            snap = step_until(daemon, lambda s: job_of(s) and job_of(s)["window"]["added"] >= 12)
        finally:
            daemon.close()
    j = job_of(snap)
    assert not j["leader"] and j["control"] is None and j["last_plan"] is None
    assert j["flagged"], "the global load (global_routed) shows the imbalance to an observer too"
    assert [r["rank"] for r in j["ranks"]] == [2, 3]
    assert not control_path(tmp_path / "run", "fake").exists()
