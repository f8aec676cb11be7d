"""Two real processes on one segment: a writer as fast as it can, a reader racing it.

Every payload is derived from its sequence number (ring) or version (control block), so the reader
checks every value it is handed, and the counts must add up exactly.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from pathlib import Path

import numpy as np
import pytest

from balancerd.protocol import (
    ControlPlan,
    ControlReader,
    ControlWriter,
    Mode,
    Policy,
    RingShape,
    TelemetryReader,
    TelemetryRecord,
    TelemetryWriter,
    control_path,
    ring_path,
)

pytestmark = pytest.mark.slow

JOB = "race"
RANK, WORLD = 1, 4
GENERATION = 0x5EED5EED
SHAPE = RingShape(layers=6, experts=32, slots_per_rank=8)
RING_CAPACITY = 8
RING_SECONDS = 5.5
CONTROL_LAYERS, CONTROL_EXPERTS, CONTROL_SLOTS = 6, 32, 48
CONTROL_SECONDS = 3.0
WAIT_S = 60.0  # only bounds a broken run; normal runs never come near it


def ring_payload(seq: int) -> dict:
    """The keyword arguments of TelemetryWriter.write for record ``seq``; every value depends on seq."""
    L, E, K = SHAPE.layers, SHAPE.experts, SHAPE.slots_per_rank
    per_layer = np.arange(L, dtype=np.float32)
    payload = dict(
        first_step=seq * 4, last_step=seq * 4 + 3, tokens=seq * 3 + 1, placement_version=seq // 10,
        wall_ns=seq + 12345, step_us=float(seq % 4096),
        routed=((seq * 7919 + np.arange(L * E)) % 1_000_003).astype(np.int32).reshape(L, E),
        received=((seq * 31 + np.arange(L * K)) % 65_521).astype(np.int32).reshape(L, K),
        dispatch_us=per_layer + (seq % 1024), combine_us=per_layer * 2 + (seq % 512),
        expert_us=per_layer * 3 + (seq % 256),
    )
    if seq % 2 == 0:
        payload["global_routed"] = payload["routed"] * WORLD
    if seq % 3 == 0:
        payload["dropped"] = np.arange(L, dtype=np.int64) + seq
        payload["bias_changed"] = np.arange(L, dtype=np.int64) * seq
    return payload


def ring_mismatches(rec: TelemetryRecord) -> list[str]:
    """Names of the fields of ``rec`` that differ from what the writer wrote for its seq."""
    want = ring_payload(rec.seq)
    zeros = np.zeros(SHAPE.layers, dtype=np.int64)
    expected = {
        "job": JOB, "rank": RANK, "world": WORLD, "generation": GENERATION,
        **{k: v for k, v in want.items() if k not in ("global_routed", "dropped", "bias_changed")},
        "dropped": want.get("dropped", zeros), "bias_changed": want.get("bias_changed", zeros),
    }
    bad = [name for name, value in expected.items() if not np.array_equal(getattr(rec, name), value)]
    if "global_routed" in want:
        if rec.global_routed is None or not np.array_equal(rec.global_routed, want["global_routed"]):
            bad.append("global_routed")
    elif rec.global_routed is not None:
        bad.append("global_routed (present)")
    return bad


def ring_writer(directory: str, ready, attached, done, results) -> None:
    writer = TelemetryWriter.create(Path(directory), JOB, RANK, WORLD, GENERATION, SHAPE,
                                    capacity=RING_CAPACITY)
    ready.set()
    if not attached.wait(WAIT_S):
        raise RuntimeError("the reader never attached")
    deadline = time.monotonic() + RING_SECONDS
    while time.monotonic() < deadline:
        writer.write(**ring_payload(writer.written))
    results.put(("writer", {"written": writer.written}))
    done.set()
    writer.close()


def ring_reader(directory: str, ready, attached, done, results) -> None:
    if not ready.wait(WAIT_S):
        raise RuntimeError("the writer never created the ring")
    reader = TelemetryReader.open(ring_path(Path(directory), JOB, RANK))
    attached.set()
    start = time.monotonic()
    returned, last_seq, errors = 0, -1, []

    def check(records: list[TelemetryRecord]) -> None:
        nonlocal returned, last_seq
        for rec in records:
            returned += 1
            if rec.seq <= last_seq:
                errors.append(f"seq {rec.seq} after {last_seq}")
            last_seq = rec.seq
            bad = ring_mismatches(rec)
            if bad:
                errors.append(f"seq {rec.seq}: {bad}")

    while not done.is_set():
        check(reader.poll())
    check(reader.poll())  # the writer has stopped: drain what is left
    s = reader.stats
    results.put(("reader", {"accepted": s.accepted, "dropped": s.dropped, "invalid": s.invalid,
                            "returned": returned, "seconds": time.monotonic() - start,
                            "errors": errors[:10]}))
    reader.close()


def control_plan(version: int) -> ControlPlan:
    """A plan every element of which is derived from ``version``."""
    L, E, S = CONTROL_LAYERS, CONTROL_EXPERTS, CONTROL_SLOTS
    p2l = (np.arange(S)[None, :] + np.arange(L)[:, None] * 3 + version) % E
    bias = (version % 1000) * 1e-3 + np.arange(L * E, dtype=np.float32).reshape(L, E) * 1e-5
    return ControlPlan(
        version=version, generation=GENERATION, phys_to_log=p2l.astype(np.int32),
        policy=Policy(version % 3), mode=Mode(version % 2), selection_bias=bias.astype(np.float32),
        max_reroute_fraction=float(np.float32((version % 97) / 1000)),
        capacity_factor=(version % 5) * 0.25, created_ns=version * 1000,
    )


def plan_mismatches(plan: ControlPlan) -> list[str]:
    want = control_plan(plan.version)
    names = ("generation", "phys_to_log", "policy", "mode", "selection_bias", "max_reroute_fraction",
             "capacity_factor", "created_ns")
    return [n for n in names if not np.array_equal(getattr(plan, n), getattr(want, n))]


def control_writer(directory: str, ready, attached, done, results) -> None:
    writer = ControlWriter.create(Path(directory), JOB, CONTROL_LAYERS, CONTROL_EXPERTS, CONTROL_SLOTS, WORLD,
                                  GENERATION)
    ready.set()
    if not attached.wait(WAIT_S):
        raise RuntimeError("the reader never attached")
    version = 0
    deadline = time.monotonic() + CONTROL_SECONDS
    while time.monotonic() < deadline:
        version += 1
        writer.publish(control_plan(version))
    results.put(("writer", {"last_version": version}))
    done.set()
    writer.close()


def control_reader(directory: str, ready, attached, done, results) -> None:
    if not ready.wait(WAIT_S):
        raise RuntimeError("the writer never created the control block")
    reader = ControlReader.open(control_path(Path(directory), JOB), CONTROL_LAYERS, CONTROL_EXPERTS,
                                CONTROL_SLOTS)
    attached.set()
    reads = nones = empty = 0  # empty: None before the first plan was published
    last, seen, errors = 0, set(), []
    while not done.is_set():
        plan = reader.read()
        reads += 1
        if plan is None:
            if last:
                nones += 1
            else:
                empty += 1
            continue
        if plan.version < last:
            errors.append(f"version {plan.version} after {last}")
        last = plan.version
        seen.add(plan.version)
        bad = plan_mismatches(plan)
        if bad:
            errors.append(f"version {plan.version}: {bad}")
    final = reader.read()
    results.put(("reader", {"reads": reads, "nones": nones, "empty": empty, "distinct": len(seen),
                            "invalid": reader.invalid,
                            "final": None if final is None else final.version, "errors": errors[:10]}))
    reader.close()


def run_pair(directory: Path, writer, reader) -> dict[str, dict]:
    """Run writer and reader in two spawned processes; return what each reported."""
    ctx = mp.get_context("spawn")
    ready, attached, done = ctx.Event(), ctx.Event(), ctx.Event()
    results = ctx.Queue()
    procs = [ctx.Process(target=f, args=(str(directory), ready, attached, done, results), daemon=True)
             for f in (writer, reader)]
    for p in procs:
        p.start()
    out: dict[str, dict] = {}
    deadline = time.monotonic() + WAIT_S
    try:
        # a side that crashes never reports (its traceback is in the captured stderr): stop waiting then
        while len(out) < len(procs) and time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in procs):
                break
            try:
                name, report = results.get(timeout=1.0)
            except queue.Empty:
                continue
            out[name] = report
        if len(out) == len(procs):
            for p in procs:
                p.join(max(0.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    assert [p.exitcode for p in procs] == [0, 0], f"exit codes {[p.exitcode for p in procs]}, reports {out}"
    return out


def test_ring_writer_vs_reader_accepts_only_valid_records_and_counts_drops_exactly(tmp_path: Path) -> None:
    out = run_pair(tmp_path, ring_writer, ring_reader)
    written, got = out["writer"]["written"], out["reader"]
    print(f"\nring: written={written} accepted={got['accepted']} dropped={got['dropped']} "
          f"invalid={got['invalid']} over {got['seconds']:.2f} s")
    assert got["errors"] == []
    assert got["seconds"] >= 5.0
    assert got["invalid"] == 0
    assert got["returned"] == got["accepted"]
    assert got["accepted"] + got["dropped"] + got["invalid"] == written
    # capacity 8 against a busy writer: both must happen, or the test did not test the accounting
    assert got["accepted"] > 0 and got["dropped"] > 0


def test_control_reader_racing_a_switching_writer_never_sees_a_mixed_plan(tmp_path: Path) -> None:
    out = run_pair(tmp_path, control_writer, control_reader)
    last, got = out["writer"]["last_version"], out["reader"]
    print(f"\ncontrol: published={last} reads={got['reads']} before-first={got['empty']} "
          f"nones-after={got['nones']} distinct={got['distinct']} invalid={got['invalid']}")
    assert got["errors"] == []
    assert got["final"] == last
    assert got["reads"] > got["empty"] + got["nones"]
    assert got["distinct"] > 1
