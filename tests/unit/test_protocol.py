"""Round trips, accounting, discovery, runtime-dir resolution and file safety of balancerd.protocol."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from balancerd import protocol
from balancerd.protocol import (
    ControlPlan,
    ControlReader,
    ControlWriter,
    Mode,
    PlanResult,
    Policy,
    RejectReason,
    RingShape,
    SegmentError,
    StatusReader,
    StatusRecord,
    StatusWriter,
    TelemetryReader,
    TelemetryRecord,
    TelemetryWriter,
    control_path,
    discover,
    new_generation,
    ring_path,
    runtime_dir,
    status_path,
)
from balancerd.segment import Segment

JOB = "job-1"
RANK, WORLD = 2, 4
GEN = 0xABCDEF
SHAPE = RingShape(layers=3, experts=8, slots_per_rank=2)
L, E, K = SHAPE.layers, SHAPE.experts, SHAPE.slots_per_rank
S = K * WORLD


def payload(seq: int, full: bool = True) -> dict:
    """Keyword arguments for TelemetryWriter.write, all derived from ``seq``; optional arrays when full."""
    kw = dict(
        first_step=10 * seq, last_step=10 * seq + 9, tokens=100 + seq, placement_version=seq // 2,
        wall_ns=1_000 + seq, step_us=1.5 * seq,
        routed=np.arange(L * E, dtype=np.int32).reshape(L, E) + seq,
        received=np.arange(L * K, dtype=np.int32).reshape(L, K) * (seq + 1),
        dispatch_us=np.full(L, seq, np.float32), combine_us=np.full(L, seq + 0.5, np.float32),
        expert_us=np.arange(L, dtype=np.float32) + seq,
    )
    if full:
        kw.update(global_routed=kw["routed"] * WORLD, dropped=np.arange(L, dtype=np.int64) + seq,
                  bias_changed=np.arange(L, dtype=np.int64) * seq)
    return kw


def assert_record(rec: TelemetryRecord, seq: int, full: bool = True) -> None:
    want = payload(seq, full)
    assert (rec.seq, rec.job, rec.rank, rec.world, rec.generation) == (seq, JOB, RANK, WORLD, GEN)
    for name in ("first_step", "last_step", "tokens", "placement_version", "wall_ns", "step_us"):
        assert getattr(rec, name) == want[name], name
    for name in ("routed", "received", "dispatch_us", "combine_us", "expert_us"):
        np.testing.assert_array_equal(getattr(rec, name), want[name], err_msg=name)
    if full:
        for name in ("global_routed", "dropped", "bias_changed"):
            np.testing.assert_array_equal(getattr(rec, name), want[name], err_msg=name)
    else:
        assert rec.global_routed is None
        np.testing.assert_array_equal(rec.dropped, np.zeros(L, np.int64))
        np.testing.assert_array_equal(rec.bias_changed, np.zeros(L, np.int64))


def ring(tmp_path: Path, capacity: int = 4, generation: int = GEN) -> TelemetryWriter:
    return TelemetryWriter.create(tmp_path, JOB, RANK, WORLD, generation, SHAPE, capacity=capacity)


def plan(version: int, **kw) -> ControlPlan:
    p2l = (np.arange(S)[None, :] + np.arange(L)[:, None] + version) % E
    bias = np.linspace(-1, 1, L * E, dtype=np.float32).reshape(L, E) * version
    return ControlPlan(version=version, generation=GEN, phys_to_log=p2l.astype(np.int32),
                       selection_bias=bias, **kw)


def control(tmp_path: Path) -> ControlWriter:
    return ControlWriter.create(tmp_path, JOB, L, E, S, WORLD, GEN)


def open_control(tmp_path: Path) -> ControlReader:
    return ControlReader.open(control_path(tmp_path, JOB), L, E, S)


class _TornCopy:
    """Stands in for ``Segment.records`` during one write: the copy stops halfway (payload new, seq,
    checksum and seq_end old) and ``during`` runs there, as a reader on another core would see it."""

    def __init__(self, records: np.ndarray, during: Callable[[], None]):
        self.records, self.during = records, during

    def __setitem__(self, index: int, value: np.void) -> None:
        new = np.asarray(value).reshape(1).view(np.uint8)
        self.records[index : index + 1].view(np.uint8)[8:-16] = new[8:-16]
        self.during()
        self.records[index] = value


@contextmanager
def torn_write(segment: Segment, during: Callable[[], None]) -> Iterator[None]:
    records = segment.records
    segment.records = _TornCopy(records, during)
    try:
        yield
    finally:
        segment.records = records


# ---------------------------------------------------------------------------------------------------
# Telemetry ring


def test_ring_round_trip_returns_every_field(tmp_path: Path) -> None:
    w = ring(tmp_path)
    assert w.write(**payload(0)) == 0
    assert w.write(**payload(1, full=False)) == 1
    r = TelemetryReader.open(w.path)
    recs = r.poll()
    assert [x.seq for x in recs] == [0, 1]
    assert_record(recs[0], 0)
    assert_record(recs[1], 1, full=False)
    assert (r.stats.accepted, r.stats.dropped, r.stats.invalid) == (2, 0, 0)
    assert (r.info.layers, r.info.experts, r.info.slots_per_rank, r.info.slots) == (L, E, K, S)
    assert (r.info.job, r.info.rank, r.info.world, r.info.generation) == (JOB, RANK, WORLD, GEN)


def test_poll_is_incremental_and_honours_max_records(tmp_path: Path) -> None:
    w = ring(tmp_path, capacity=8)
    r = TelemetryReader.open(w.path)
    assert r.poll() == []
    for seq in range(5):
        w.write(**payload(seq))
    assert [x.seq for x in r.poll(max_records=2)] == [0, 1]
    assert [x.seq for x in r.poll()] == [2, 3, 4]
    assert r.poll() == []
    w.write(**payload(5))
    assert [x.seq for x in r.poll()] == [5]
    assert (r.stats.accepted, r.stats.dropped, r.stats.invalid) == (6, 0, 0)


def test_overrun_reader_counts_exact_drops_and_keeps_the_newest(tmp_path: Path) -> None:
    w = ring(tmp_path, capacity=4)
    r = TelemetryReader.open(w.path)
    for seq in range(11):
        w.write(**payload(seq))
    recs = r.poll()
    assert [x.seq for x in recs] == [7, 8, 9, 10]
    for x in recs:
        assert_record(x, x.seq)
    assert (r.stats.accepted, r.stats.dropped, r.stats.invalid) == (4, 7, 0)


def test_reader_opened_late_starts_at_oldest_kept_or_at_head(tmp_path: Path) -> None:
    w = ring(tmp_path, capacity=4)
    for seq in range(6):
        w.write(**payload(seq))
    assert [x.seq for x in TelemetryReader.open(w.path).poll()] == [2, 3, 4, 5]
    late = TelemetryReader.open(w.path, start_at_oldest=False)
    assert late.poll() == []
    w.write(**payload(6))
    assert [x.seq for x in late.poll()] == [6]


def test_record_overwritten_while_being_read_is_a_drop_not_invalid(tmp_path: Path) -> None:
    w = ring(tmp_path, capacity=4)
    r = TelemetryReader.open(w.path)
    for seq in range(4):
        w.write(**payload(seq))
    polled: list[TelemetryRecord] = []
    # seq 4 is being copied over seq 0 when the reader gets there; the head still says 4
    with torn_write(w._seg, lambda: polled.extend(r.poll())):
        w.write(**payload(4))
    assert [x.seq for x in polled] == [1, 2, 3]
    assert (r.stats.accepted, r.stats.dropped, r.stats.invalid) == (3, 1, 0)
    assert [x.seq for x in r.poll()] == [4]


def test_writer_rejects_arrays_of_the_wrong_shape_without_advancing(tmp_path: Path) -> None:
    w = ring(tmp_path)
    bad = payload(0) | {"routed": np.zeros((L, E + 1), np.int32)}
    with pytest.raises(ValueError):
        w.write(**bad)
    assert w.written == 0
    w.write(**payload(0))
    assert_record(TelemetryReader.open(w.path).poll()[0], 0)


# ---------------------------------------------------------------------------------------------------
# Control block


def test_control_round_trip(tmp_path: Path) -> None:
    cw = control(tmp_path)
    cr = open_control(tmp_path)
    assert cr.read() is None
    sent = plan(3, policy=Policy.TOKEN, mode=Mode.PAUSED, max_reroute_fraction=0.25, capacity_factor=1.5,
                created_ns=42)
    cw.publish(sent)
    got = cr.read()
    assert got is not None
    for name in ("version", "generation", "policy", "mode", "max_reroute_fraction", "capacity_factor",
                 "created_ns"):
        assert getattr(got, name) == getattr(sent, name), name
    np.testing.assert_array_equal(got.phys_to_log, sent.phys_to_log)
    np.testing.assert_array_equal(got.selection_bias, sent.selection_bias)
    assert cr.invalid == 0


def test_control_reader_returns_the_newest_plan_and_zero_bias_when_none_sent(tmp_path: Path) -> None:
    cw = control(tmp_path)
    cr = open_control(tmp_path)
    for version in (1, 2, 3):
        cw.publish(plan(version))
    assert cr.read().version == 3
    cw.publish(ControlPlan(version=4, generation=GEN, phys_to_log=plan(4).phys_to_log))
    got = cr.read()
    assert got.version == 4
    np.testing.assert_array_equal(got.selection_bias, np.zeros((L, E), np.float32))


@pytest.mark.parametrize("field, value", [("phys_to_log", np.zeros((L, S + 1), np.int32)),
                                          ("selection_bias", np.zeros((L + 1, E), np.float32))])
def test_control_publish_refuses_wrong_shapes(tmp_path: Path, field: str, value: np.ndarray) -> None:
    cw = control(tmp_path)
    bad = plan(1)
    setattr(bad, field, value)
    with pytest.raises(ValueError, match=field):
        cw.publish(bad)
    assert open_control(tmp_path).read() is None


def test_control_reader_never_goes_backwards_when_the_writer_laps_a_read(tmp_path: Path) -> None:
    cw = control(tmp_path)
    cr = open_control(tmp_path)
    for version in (1, 2, 3, 4):
        cw.publish(plan(version))
    read = cr._seg.read
    copies: list[np.ndarray | None] = []  # every slot copy the reader makes, in order

    def racing_read(seq: int | None, index: int) -> np.ndarray | None:
        if len(copies) == 1:
            # first read(), between its two copies: versions 5 (slot 0) and 6 (slot 1) land
            cw.publish(plan(5))
            cw.publish(plan(6))
        if len(copies) == 3:
            # second read() has copied version 5 from slot 0; the writer puts 7 there and is halfway
            # through writing 8 over 6 when the reader copies slot 1
            cw.publish(plan(7))
            with torn_write(cw._seg, lambda: copies.append(read(seq, index))):
                cw.publish(plan(8))
            return copies[-1]
        copies.append(read(seq, index))
        return copies[-1]

    cr._seg.read = racing_read
    assert cr.read().version == 6
    got = cr.read()
    assert copies[3] is None  # the race happened: the half-written copy did not validate
    assert got is not None and got.version == 8
    assert cr.invalid == 0


def test_control_writer_reattaches_after_a_daemon_restart(tmp_path: Path) -> None:
    cw = control(tmp_path)
    cw.publish(plan(1))
    cw.close()
    cr = open_control(tmp_path)
    again = ControlWriter.open(control_path(tmp_path, JOB))
    again.publish(plan(2))
    assert not cr.replaced()
    assert cr.read().version == 2


def test_unknown_policy_is_rejected_and_counted(tmp_path: Path) -> None:
    cw = control(tmp_path)
    cr = open_control(tmp_path)
    cw.publish(plan(1))
    assert cr.read().version == 1
    cw.publish(plan(2, policy=7))
    assert cr.read() is None
    assert cr.read() is None  # and stays rejected, rather than falling back to the plan read before
    assert cr.invalid == 1


# ---------------------------------------------------------------------------------------------------
# Status block


def status_writer(tmp_path: Path) -> StatusWriter:
    return StatusWriter.create(tmp_path, JOB, RANK, WORLD, GEN, L, E, S)


def test_status_round_trip_including_phys_to_log(tmp_path: Path) -> None:
    sw = status_writer(tmp_path)
    sr = StatusReader.open(status_path(tmp_path, JOB, RANK))
    assert sr.read() is None
    sent = StatusRecord(
        generation=GEN, rank=RANK, world=WORLD, phys_to_log=plan(5).phys_to_log, applied_version=5,
        applied_step=1234, pending_version=6, step=1300, result=PlanResult.REJECTED, result_version=6,
        reason=RejectReason.SLOTS, detail="rank 3 has 41 slots", migration_bytes=1 << 33,
        migration_seconds=2.25, heartbeat_ns=987654321,
    )
    sw.write(sent)
    got = sr.read()
    np.testing.assert_array_equal(got.phys_to_log, sent.phys_to_log)
    got.phys_to_log = sent.phys_to_log  # the same object, so == below compares the other fields
    assert got == sent
    assert (sr.info.rank, sr.info.world, sr.info.slots_per_rank) == (RANK, WORLD, K)


def test_status_defaults_heartbeat_truncates_detail_and_zero_fills_placement(tmp_path: Path) -> None:
    sw = status_writer(tmp_path)
    sr = StatusReader.open(status_path(tmp_path, JOB, RANK))
    sw.write(StatusRecord(generation=GEN, rank=RANK, world=WORLD, detail="x" * 200))
    got = sr.read()
    assert got.heartbeat_ns > 0
    assert got.detail == "x" * 96
    np.testing.assert_array_equal(got.phys_to_log, np.zeros((L, S), np.int32))
    sw.write(StatusRecord(generation=GEN, rank=RANK, world=WORLD, step=2, result=PlanResult.APPLIED))
    assert (sr.read().step, sr.read().result) == (2, PlanResult.APPLIED)


def test_unknown_result_is_rejected_and_counted(tmp_path: Path) -> None:
    sw = status_writer(tmp_path)
    sr = StatusReader.open(status_path(tmp_path, JOB, RANK))
    sw.write(StatusRecord(generation=GEN, rank=RANK, world=WORLD, result=99))
    assert sr.read() is None
    assert sr.invalid == 1


# ---------------------------------------------------------------------------------------------------
# Files: discovery, runtime directory, restarts, names, permissions


def test_discover_lists_every_segment_and_nothing_else(tmp_path: Path) -> None:
    ring(tmp_path)
    TelemetryWriter.create(tmp_path, JOB, 10, 16, GEN, SHAPE)
    status_writer(tmp_path)
    control(tmp_path)
    ControlWriter.create(tmp_path, "other.job", L, E, S, WORLD)
    for stray in ("notes.txt", f"{JOB}.rank1.ring.bak", f"{JOB}.rankX.ring", f".{JOB}.control.77.tmp",
                  f"{JOB}.control\n", f"{'x' * 33}.control"):
        (tmp_path / stray).touch()
    assert discover(tmp_path) == [  # sorted by file name
        ("control", JOB, -1, tmp_path / f"{JOB}.control"),
        ("ring", JOB, 10, tmp_path / f"{JOB}.rank10.ring"),
        ("ring", JOB, RANK, tmp_path / f"{JOB}.rank2.ring"),
        ("status", JOB, RANK, tmp_path / f"{JOB}.rank2.status"),
        ("control", "other.job", -1, tmp_path / "other.job.control"),
    ]
    assert discover(tmp_path / "missing") == []


@pytest.fixture
def fake_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, bool]:
    """No runtime-dir variables, the temp dir under tmp_path, and /run/balancerd writable exactly when
    ``fake_run["writable"]`` is set."""
    monkeypatch.delenv("BALANCERD_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    fake = {"writable": False}
    real_access = os.access
    monkeypatch.setattr(protocol.os, "access", lambda p, mode: (
        fake["writable"] if str(p) == "/run/balancerd" else real_access(p, mode)))
    return fake


def test_runtime_dir_prefers_the_environment_variable(
        fake_run: dict[str, bool], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BALANCERD_RUNTIME_DIR", str(tmp_path / "rt" / "nested"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    fake_run["writable"] = True
    assert runtime_dir() == tmp_path / "rt" / "nested"
    assert (tmp_path / "rt" / "nested").is_dir()


def test_runtime_dir_uses_run_balancerd_when_writable(
        fake_run: dict[str, bool], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BALANCERD_RUNTIME_DIR", "")  # empty counts as unset
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    fake_run["writable"] = True
    assert runtime_dir(create=False) == Path("/run/balancerd")


def test_runtime_dir_falls_back_to_xdg(
        fake_run: dict[str, bool], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert runtime_dir() == tmp_path / "balancerd"
    assert (tmp_path / "balancerd").is_dir()


@pytest.mark.parametrize("xdg", [None, "missing"])
def test_runtime_dir_last_resort_is_per_user_under_tmp(
        fake_run: dict[str, bool], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, xdg: str | None) -> None:
    if xdg:
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / xdg))
    want = tmp_path / "tmp" / f"balancerd-{os.getuid()}"
    assert runtime_dir(create=False) == want
    assert not want.exists()
    assert runtime_dir() == want
    assert want.is_dir()


def test_restarted_writer_is_detected_by_every_reader(tmp_path: Path) -> None:
    w = ring(tmp_path)
    w.write(**payload(0))
    sw = status_writer(tmp_path)
    cw = control(tmp_path)
    readers = [TelemetryReader.open(w.path), StatusReader.open(sw.path), open_control(tmp_path)]
    assert not any(r.replaced() for r in readers)
    old_inode = os.stat(w.path).st_ino
    w2 = ring(tmp_path, generation=GEN + 1)
    StatusWriter.create(tmp_path, JOB, RANK, WORLD, GEN + 1, L, E, S)
    ControlWriter.create(tmp_path, JOB, L, E, S, WORLD, GEN + 1)
    assert all(r.replaced() for r in readers)
    assert [x.seq for x in readers[0].poll()] == [0]  # the old mapping still reads the old file
    fresh = TelemetryReader.open(w.path)
    assert (fresh.info.generation, os.stat(fresh.path).st_ino != old_inode) == (GEN + 1, True)
    assert fresh.poll() == [] and not fresh.replaced()
    w2.write(**payload(0))
    assert [x.generation for x in fresh.poll()] == [GEN + 1]
    for path in (w.path, sw.path, cw.path):
        path.unlink()
    assert fresh.replaced()


@pytest.mark.parametrize("job", ["", "a/b", "../x", "x" * 33, "a b", "caf\u00e9", "j\n", "j\0"])
def test_bad_job_ids_are_refused_before_touching_the_filesystem(tmp_path: Path, job: str) -> None:
    for make in (lambda: ring_path(tmp_path, job, 0), lambda: status_path(tmp_path, job, 0),
                 lambda: control_path(tmp_path, job),
                 lambda: TelemetryWriter.create(tmp_path, job, 0, 1, GEN, SHAPE),
                 lambda: ControlWriter.create(tmp_path, job, L, E, S, WORLD)):
        with pytest.raises(ValueError, match="job id"):
            make()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("job", ["x" * 32, "a", "Job_1.v2-b"])
def test_good_job_ids_round_trip_through_the_header(tmp_path: Path, job: str) -> None:
    TelemetryWriter.create(tmp_path, job, 0, 1, GEN, SHAPE)
    assert TelemetryReader.open(ring_path(tmp_path, job, 0)).info.job == job
    assert discover(tmp_path) == [("ring", job, 0, ring_path(tmp_path, job, 0))]


def test_segments_are_created_0660_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        paths = [ring(tmp_path).path, status_writer(tmp_path).path, control(tmp_path).path]
    finally:
        os.umask(old)
    assert [stat.S_IMODE(os.stat(p).st_mode) for p in paths] == [0o660] * 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


@pytest.mark.parametrize("kind", ["ring", "status", "control"])
def test_world_writable_segment_is_refused(tmp_path: Path, kind: str) -> None:
    make, open_ = {
        "ring": (lambda: ring(tmp_path).path, TelemetryReader.open),
        "status": (lambda: status_writer(tmp_path).path, StatusReader.open),
        "control": (lambda: control(tmp_path).path, lambda p: ControlReader.open(p, L, E, S)),
    }[kind]
    path = make()
    os.chmod(path, 0o666)
    with pytest.raises(SegmentError, match="writable by others") as err:
        open_(path)
    assert err.value.path == str(path)
    assert str(err.value).startswith(f"{path}: ")


def test_new_generation_is_a_nonzero_63_bit_id() -> None:
    ids = {new_generation() for _ in range(64)}
    assert len(ids) == 64
    assert all(0 < g < 1 << 63 for g in ids)
