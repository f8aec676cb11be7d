"""What the console reads beyond the basic state, served by a real `balancerd run` process fed by a real
writer: per-GPU loads, the ratio history, the ``expert_load`` op, a plan's placement diff and the
balancedness a plan realised."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from balancerd.daemon import DIFF_LIMIT, RATIO_HISTORY
from balancerd.detect import layer_loads
from balancerd.placement import Topology, initial_placement, replica_counts
from balancerd.protocol import ControlReader, control_path
from tests.integration.test_daemon_process import DaemonProcess, wait_until
from tests.telemetry_writer import TelemetryProcess, WriterSpec

pytestmark = pytest.mark.slow

NO_AUTO_PLANS = 50.0  # a detection threshold no layer reaches: only the tests publish plans
SPEC = WriterSpec(load={"kind": "zipf", "s": 1.5})  # 4 layers, 16 experts, 4 GPUs x 5 slots
TOPO = Topology(gpus=SPEC.world, slots=SPEC.world * SPEC.slots_per_rank)
INITIAL = initial_placement(SPEC.layers, SPEC.experts, TOPO)
WINDOW = 4  # window.intervals in DaemonProcess's configuration


@contextmanager
def serve(tmp_path, spec: WriterSpec) -> Iterator[tuple[DaemonProcess, TelemetryProcess]]:
    daemon = DaemonProcess(tmp_path, threshold=NO_AUTO_PLANS)
    writer = TelemetryProcess(daemon.run_dir, spec)
    writer.start()
    try:
        daemon.start()
        wait_until(lambda: (daemon.job() or {}).get("window", {}).get("intervals", 0) >= WINDOW,
                   what="a full window")
        yield daemon, writer
    finally:
        daemon.kill()
        writer.stop()


@pytest.fixture
def served(tmp_path):
    with serve(tmp_path, SPEC) as pair:
        yield pair


def job(daemon: DaemonProcess) -> dict:
    j = daemon.job()
    assert j is not None, "the daemon does not report job fake"
    return j


def job_after(daemon: DaemonProcess, added: int) -> dict:
    """The job's state once the daemon has added ``added`` intervals to its window since it started."""
    return wait_until(lambda: (j := job(daemon))["window"]["added"] >= added and j,
                      what=f"{added} intervals in the window")


def ask(daemon: DaemonProcess, request: dict) -> dict:
    return daemon.client.request({"job": "fake", **request})


def same_window(daemon: DaemonProcess, request: dict) -> tuple[dict, dict]:
    """The job's state and the answer to ``request``, both from one window (retried until the
    daemon added no interval between the two)."""
    for _ in range(50):
        before = job(daemon)
        answer = ask(daemon, request)
        if job(daemon)["window"]["added"] == before["window"]["added"]:
            return before, answer
    raise AssertionError("the window moved on during every attempt")


def test_gpu_load_is_the_windows_load_per_gpu_on_the_served_placement(served):
    daemon, _ = served
    j, answer = same_window(daemon, {"op": "expert_load", "first": 0, "count": SPEC.layers})
    load = np.array(j["gpu_load"])
    assert load.shape == (SPEC.layers, SPEC.world) and j["served_version"] == 0
    # every layer of the fake job routes the same number of assignments per interval
    assert load.sum(axis=1) == pytest.approx([j["window"]["assignments"]] * SPEC.layers, rel=1e-3)
    assert load == pytest.approx(layer_loads(np.array(answer["load"]), INITIAL, TOPO), rel=1e-3)
    ratios = [x["max_min"] for x in j["per_layer"]]
    assert ratios == pytest.approx(list(load.max(axis=1) / load.min(axis=1)), rel=2e-3)
    assert max(ratios) > 1.5  # zipf: the placement is visibly unbalanced


def test_max_min_history_keeps_the_last_intervals_oldest_first(served):
    daemon, _ = served
    first = job_after(daemon, RATIO_HISTORY + 2)
    for x in first["per_layer"]:
        assert len(x["max_min_history"]) == RATIO_HISTORY and x["max_min_history"][-1] == x["max_min"]
        assert min(x["max_min_history"]) >= 1.0
    added = first["window"]["added"]
    later = job_after(daemon, added + 1)
    shift = later["window"]["added"] - added
    assert 1 <= shift < RATIO_HISTORY
    for old, new in zip(first["per_layer"], later["per_layer"], strict=True):
        assert new["max_min_history"][:-shift] == old["max_min_history"][shift:]
        assert len(new["max_min_history"]) == RATIO_HISTORY


def test_expert_load_serves_a_range_of_layers(served):
    daemon, _ = served
    j, answer = same_window(daemon, {"op": "expert_load", "first": 1, "count": 2})
    assert answer["ok"] and answer["job"] == "fake" and answer["first"] == 1
    assert (answer["layers"], answer["experts"]) == (SPEC.layers, SPEC.experts)
    load, replicas = np.array(answer["load"]), np.array(answer["replicas"])
    assert load.shape == replicas.shape == (2, SPEC.experts)
    assert load.sum(axis=1).tolist() == [j["window"]["assignments"]] * 2
    assert (replicas == replica_counts(INITIAL, SPEC.experts)[1:3]).all()
    assert np.array(j["gpu_load"])[1:3] == pytest.approx(layer_loads(load, INITIAL[1:3], TOPO), rel=1e-3)
    tail = ask(daemon, {"op": "expert_load", "first": 2, "count": 1000})
    assert tail["ok"] and tail["first"] == 2 and len(tail["load"]) == len(tail["replicas"]) == 2


BAD_RANGES = [(-1, 2, "first"), (SPEC.layers, 1, "first"), ("0", 2, "first"), (True, 2, "first"),
              (None, 2, "first"), (0.5, 2, "first"), (0, 0, "count"), (0, -3, "count"), (0, "2", "count"),
              (0, False, "count"), (0, 1.5, "count")]


def test_expert_load_refuses_bad_ranges_and_keeps_serving(served):
    daemon, _ = served
    for first, count, error in BAD_RANGES:
        answer = ask(daemon, {"op": "expert_load", "first": first, "count": count})
        assert answer["ok"] is False and answer["error"].startswith(f"{error} must be"), answer
    nope = daemon.client.request({"op": "expert_load", "job": "nope", "first": 0, "count": 1})
    assert nope["ok"] is False and "no running job 'nope'" in nope["error"]
    assert "api: request failed" not in daemon.log()
    assert ask(daemon, {"op": "expert_load", "first": 0, "count": 1})["ok"]


def expected_diff(old: np.ndarray, new: np.ndarray) -> list[dict]:
    return [{"layer": int(layer), "slot": int(slot), "gpu": int(slot) // SPEC.slots_per_rank,
             "from": int(old[layer, slot]), "to": int(new[layer, slot])}
            for layer, slot in zip(*np.nonzero(old != new), strict=True)]


def published_placement(daemon: DaemonProcess, spec: WriterSpec = SPEC) -> np.ndarray:
    reader = ControlReader.open(control_path(daemon.run_dir, spec.job), spec.layers, spec.experts,
                                spec.world * spec.slots_per_rank)
    try:
        return np.array(reader.read().phys_to_log)
    finally:
        reader.close()


def test_plan_diff_is_the_plan_against_the_served_placement(served):
    daemon, _ = served
    dry = ask(daemon, {"op": "plan", "dry_run": True})
    assert dry["ok"] and dry["diff_truncated"] == 0 and len(dry["diff"]) == dry["moves"] > 0
    for d in dry["diff"]:
        assert d["from"] == INITIAL[d["layer"], d["slot"]] != d["to"]
        assert d["gpu"] == d["slot"] // SPEC.slots_per_rank
    per_layer = {w["layer"]: w["moves"] for w in dry["worst_layers"]}
    assert per_layer == {i: sum(d["layer"] == i for d in dry["diff"]) for i in range(SPEC.layers)}

    real = ask(daemon, {"op": "plan", "dry_run": False})
    assert real["ok"] and real["published_version"] == 1
    plan = published_placement(daemon)
    assert real["diff"] == expected_diff(INITIAL, plan) and real["diff_truncated"] == 0

    wait_until(lambda: job(daemon)["served_version"] == 1, what="the plan to be served")
    again = ask(daemon, {"op": "plan", "dry_run": True})
    assert all(d["from"] == plan[d["layer"], d["slot"]] for d in again["diff"])
    assert len(again["diff"]) == again["moves"]


def test_plan_diff_of_a_large_plan_is_bounded(tmp_path):
    spec = WriterSpec(layers=32, experts=64, slots_per_rank=20, load={"kind": "zipf", "s": 1.5})
    with serve(tmp_path, spec) as (daemon, _):
        dry = ask(daemon, {"op": "plan", "dry_run": True})
        assert dry["ok"] and dry["moves"] > DIFF_LIMIT
        assert len(dry["diff"]) == DIFF_LIMIT and dry["diff_truncated"] == dry["moves"] - DIFF_LIMIT
        keys = [(d["layer"], d["slot"]) for d in dry["diff"]]
        assert keys == sorted(keys) and len(set(keys)) == DIFF_LIMIT


def measuring_starts_at(writer: TelemetryProcess, version: int) -> int:
    """The first step the writer served at ``version``: it applies a plan right after an interval."""
    reports = writer.matching(lambda r: r["type"] == "interval" or (r["type"] == "plan" and
                                                                    r["version"] == version))
    applied = next(i for i, r in enumerate(reports) if r["type"] == "plan")
    assert reports[applied]["result"] == "applied"
    return reports[applied - 1]["n"] * SPEC.steps


def test_realised_balancedness_after_the_first_window_served_at_the_plan(served):
    daemon, writer = served
    writer.command({"event": "plans", "action": "ignore"})
    published = ask(daemon, {"op": "plan", "dry_run": False})
    assert published["ok"] and published["published_version"] == 1
    added = job(daemon)["window"]["added"]
    j = job_after(daemon, added + WINDOW + 1)
    assert j["last_plan"]["state"] == "pending" and j["last_plan"]["realised_balancedness"] is None
    assert j["history"][-1]["realised_balancedness"] is None

    writer.command({"event": "plans", "action": "apply"})
    seen: list[dict] = []

    def measured() -> dict | None:
        seen.append(job(daemon))
        return seen[-1]["last_plan"]["realised_balancedness"]

    realised = wait_until(measured, what="the realised balancedness")
    start = measuring_starts_at(writer, 1)
    for s in seen:  # never measured before a whole window was served at the plan's version
        if s["last_plan"]["realised_balancedness"] is not None:
            assert s["window"]["last_interval"]["first_step"] >= start + (WINDOW - 1) * SPEC.steps
    j = seen[-1]
    assert j["last_plan"]["state"] == "applied" and j["history"][-1]["realised_balancedness"] == realised
    assert 1.0 <= realised["mean"] <= realised["worst"]
    assert realised["mean"] < j["last_plan"]["balancedness_before"]["mean"]
    measured_now = np.mean([x["balancedness"] for x in j["per_layer"]])
    assert realised["mean"] == pytest.approx(measured_now, abs=0.05)

    saved = json.loads((daemon.tmp / "state" / "state.json").read_text())["jobs"]["fake"]["history"]
    assert saved[-1]["version"] == 1 and saved[-1]["realised_balancedness"] == realised
    later = job_after(daemon, j["window"]["added"] + WINDOW)
    assert later["last_plan"]["realised_balancedness"] == realised  # measured once, then kept
