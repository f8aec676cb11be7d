"""Damaged segment files: rejected with the right SegmentError, or dropped and counted; never a crash."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancerd.protocol import (
    ControlPlan,
    ControlReader,
    ControlWriter,
    PlanResult,
    RingShape,
    SegmentError,
    StatusReader,
    StatusRecord,
    StatusWriter,
    TelemetryReader,
    TelemetryWriter,
)
from balancerd.segment import _HEAD_OFFSET, _STARTED_OFFSET, HEADER_BYTES, HEADER_DTYPE, checksum64

pytestmark = pytest.mark.timeout(120)  # "never a hang": a hung read fails the test instead of the run

JOB, RANK, WORLD, GEN = "corrupt", 1, 2, 77
SHAPE = RingShape(layers=2, experts=4, slots_per_rank=3)
L, E, S = SHAPE.layers, SHAPE.experts, SHAPE.slots_per_rank * WORLD
CAPACITY = 4
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MAGIC_BYTES = range(HEADER_DTYPE.fields["magic"][1], HEADER_DTYPE.fields["magic"][1] + 8)
VERSION_BYTES = range(HEADER_DTYPE.fields["layout_version"][1], HEADER_DTYPE.fields["layout_version"][1] + 4)


def ring_values(seq: int) -> dict:
    return dict(first_step=seq, last_step=seq + 1, tokens=seq * 5, placement_version=seq, step_us=seq / 4,
                routed=np.full((L, E), seq, np.int32) + np.arange(E, dtype=np.int32),
                received=np.full((L, SHAPE.slots_per_rank), 2 * seq, np.int32),
                dispatch_us=np.full(L, seq, np.float32), combine_us=np.full(L, seq, np.float32),
                expert_us=np.full(L, seq, np.float32), global_routed=np.full((L, E), 3 * seq, np.int32))


def control_plan(version: int) -> ControlPlan:
    return ControlPlan(version=version, generation=GEN,
                       phys_to_log=((np.arange(L * S) + version) % E).astype(np.int32).reshape(L, S),
                       selection_bias=np.full((L, E), version / 8, np.float32), created_ns=version)


def status(step: int) -> StatusRecord:
    return StatusRecord(generation=GEN, rank=RANK, world=WORLD, step=step, applied_version=step,
                        result=PlanResult.APPLIED, phys_to_log=control_plan(step).phys_to_log,
                        heartbeat_ns=step)


def _ring(d: Path) -> Path:
    w = TelemetryWriter.create(d, JOB, RANK, WORLD, GEN, SHAPE, capacity=CAPACITY)
    for seq in range(CAPACITY):
        w.write(**ring_values(seq))
    w.close()
    return w.path


def _control(d: Path) -> Path:
    w = ControlWriter.create(d, JOB, L, E, S, WORLD, GEN)
    w.publish(control_plan(1))
    w.publish(control_plan(2))
    w.close()
    return w.path


def _status(d: Path) -> Path:
    w = StatusWriter.create(d, JOB, RANK, WORLD, GEN, L, E, S)
    w.write(status(1))
    w.write(status(2))
    w.close()
    return w.path


OPENERS: dict[str, Callable] = {
    "ring": TelemetryReader.open, "status": StatusReader.open,
    "control": lambda p: ControlReader.open(p, L, E, S),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The bytes of one healthy segment of each kind: a full ring, and blocks holding two records."""
    d = tmp_path_factory.mktemp("pristine")
    return {kind: make(d).read_bytes() for kind, make in (("ring", _ring), ("control", _control),
                                                          ("status", _status))}


@contextmanager
def damaged(data: bytes, flips: list[tuple[int, int]] = ()) -> Iterator[Path]:
    """A segment file holding ``data`` with byte ``offset`` XORed by ``mask`` for each flip."""
    buf = bytearray(data)
    for offset, mask in flips:
        buf[offset] ^= mask
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "seg"
        path.write_bytes(bytes(buf))
        os.chmod(path, 0o660)
        yield path


def record_bytes(data: bytes, capacity: int) -> int:
    return (len(data) - HEADER_BYTES) // capacity


def flips_in(lo: int, hi: int, max_size: int = 4) -> st.SearchStrategy[list[tuple[int, int]]]:
    """1..max_size byte flips at distinct offsets in [lo, hi), each with a nonzero XOR mask."""
    return st.lists(st.tuples(st.integers(lo, hi - 1), st.integers(1, 255)), min_size=1, max_size=max_size,
                    unique_by=lambda f: f[0])


def resealed(data: bytes, **fields) -> bytes:
    """``data`` with header fields replaced and the header checksum recomputed, so only they are wrong."""
    h = np.frombuffer(data[: HEADER_DTYPE.itemsize], dtype=HEADER_DTYPE).copy()
    for name, value in fields.items():
        h[name] = value
    h["checksum"] = checksum64(h.view(np.uint8)[:-8].view(np.uint64))
    return h.tobytes() + data[HEADER_DTYPE.itemsize :]


def expect_refused(path: Path, opener: Callable, reason: str) -> SegmentError:
    with pytest.raises(SegmentError) as err:
        opener(path)
    assert err.value.path == str(path)
    assert err.value.reason.startswith(reason), err.value.reason
    assert str(err.value) == f"{path}: {err.value.reason}"
    return err.value


# ---------------------------------------------------------------------------------------------------
# Header


@FAST
@given(kind=st.sampled_from(sorted(OPENERS)), flips=flips_in(0, HEADER_DTYPE.itemsize))
def test_any_header_flip_is_refused_with_its_reason(pristine: dict[str, bytes], kind: str,
                                                    flips: list[tuple[int, int]]) -> None:
    touched = {offset for offset, _ in flips}
    if touched & set(MAGIC_BYTES):
        reason = "not a balancerd"
    elif touched & set(VERSION_BYTES):
        reason = "layout version"
    else:
        reason = "header checksum mismatch"
    with damaged(pristine[kind], flips) as path:
        expect_refused(path, OPENERS[kind], reason)


@pytest.mark.parametrize("kind", sorted(OPENERS))
def test_every_kind_refuses_the_others_magic(pristine: dict[str, bytes], kind: str) -> None:
    for other in OPENERS:
        if other != kind:
            with damaged(pristine[other]) as path:
                expect_refused(path, OPENERS[kind], "not a balancerd")
    with damaged(resealed(pristine[kind], magic=b"NOTMINE!")) as path:
        assert "NOTMINE!" in expect_refused(path, OPENERS[kind], "not a balancerd").reason


@pytest.mark.parametrize("version", [0, 2, 0xFFFFFFFF])
def test_other_layout_version_is_refused(pristine: dict[str, bytes], version: int) -> None:
    with damaged(resealed(pristine["ring"], layout_version=version)) as path:
        err = expect_refused(path, OPENERS["ring"], f"layout version {version}")
        assert "this build reads 1" in err.reason


@pytest.mark.parametrize("fields, reason", [
    ({"header_bytes": 8192}, "header size 8192"),
    ({"capacity": 0}, "implausible capacity 0"),
    ({"capacity": (1 << 20) + 1}, "implausible capacity"),
    ({"layers": 5000}, "implausible shape"),
    ({"experts": 1 << 17}, "implausible shape"),
    ({"record_bytes": 8}, "record size 8 does not match its shape"),
    ({"experts": E + 1}, "record size"),
    ({"capacity": CAPACITY + 1}, "truncated or padded"),
    ({"job": b"\xff\xfe"}, "job id is not UTF-8"),
])
def test_header_that_checks_out_but_lies_is_refused(pristine: dict[str, bytes], fields: dict,
                                                     reason: str) -> None:
    with damaged(resealed(pristine["ring"], **fields)) as path:
        expect_refused(path, OPENERS["ring"], reason)


@FAST
@given(kind=st.sampled_from(sorted(OPENERS)), data=st.data())
def test_truncated_or_padded_file_is_refused(pristine: dict[str, bytes], kind: str,
                                             data: st.DataObject) -> None:
    full = len(pristine[kind])
    size = data.draw(st.integers(0, full - 1) | st.integers(full + 1, full + 3 * HEADER_BYTES))
    with damaged((pristine[kind] + bytes(size))[:size]) as path:
        if size < HEADER_BYTES:
            expect_refused(path, OPENERS[kind], f"truncated: {size} bytes, smaller than the header")
        else:
            expect_refused(path, OPENERS[kind], f"truncated or padded: {size} bytes, expected {full}")


@pytest.mark.parametrize("shape", [(L + 1, E, S), (L, E + 1, S), (L, E, S + WORLD)])
def test_control_block_of_another_model_shape_is_refused(pristine: dict[str, bytes],
                                                         shape: tuple[int, int, int]) -> None:
    with damaged(pristine["control"]) as path:
        err = expect_refused(path, lambda p: ControlReader.open(p, *shape), "shape (layers, experts, slots)")
        assert str((L, E, S)) in err.reason and str(shape) in err.reason


def test_missing_file_and_directory_are_refused(tmp_path: Path) -> None:
    expect_refused(tmp_path / "absent.ring", OPENERS["ring"], "cannot open")
    (tmp_path / "dir.ring").mkdir()
    expect_refused(tmp_path / "dir.ring", OPENERS["ring"], "not a regular file")


# ---------------------------------------------------------------------------------------------------
# Records


@FAST
@given(index=st.integers(0, CAPACITY - 1), data=st.data())
def test_flipped_ring_record_is_dropped_and_counted_never_returned(pristine: dict[str, bytes], index: int,
                                                                   data: st.DataObject) -> None:
    size = record_bytes(pristine["ring"], CAPACITY)
    base = HEADER_BYTES + index * size
    flips = data.draw(flips_in(0, size))
    with damaged(pristine["ring"], [(base + offset, mask) for offset, mask in flips]) as path:
        reader = TelemetryReader.open(path)
        recs = reader.poll()
        assert [r.seq for r in recs] == [seq for seq in range(CAPACITY) if seq != index]
        for r in recs:
            want = ring_values(r.seq)
            for name in ("first_step", "tokens", "step_us"):
                assert getattr(r, name) == want[name], name
            for name in ("routed", "received", "global_routed", "expert_us"):
                np.testing.assert_array_equal(getattr(r, name), want[name])
        assert (reader.stats.accepted, reader.stats.dropped, reader.stats.invalid) == (CAPACITY - 1, 0, 1)
        reader.close()


def _read_block(kind: str, path: Path) -> tuple[ControlPlan | StatusRecord | None, int]:
    """What a fresh reader of a block returns, and its invalid count."""
    reader = OPENERS[kind](path)
    try:
        return reader.read(), reader.invalid
    finally:
        reader.close()


@FAST
@given(kind=st.sampled_from(["control", "status"]), damage=st.sampled_from([[0], [1], [0, 1]]),
       data=st.data())
def test_flipped_block_copy_is_counted_and_the_other_copy_served(
        pristine: dict[str, bytes], kind: str, damage: list[int], data: st.DataObject) -> None:
    size = record_bytes(pristine[kind], 2)
    flips = []
    for copy in damage:
        base = HEADER_BYTES + copy * size
        flips += [(base + offset, mask) for offset, mask in data.draw(flips_in(0, size))]
    with damaged(pristine[kind], flips) as path:
        got, invalid = _read_block(kind, path)
    assert invalid == 1
    # slot 0 holds record 1 (version or step 1), slot 1 holds record 2
    intact = [copy + 1 for copy in (0, 1) if copy not in damage]
    if not intact:
        assert got is None
        return
    want = control_plan(max(intact)) if kind == "control" else status(max(intact))
    assert (got.version if kind == "control" else got.step) == max(intact)
    np.testing.assert_array_equal(got.phys_to_log, want.phys_to_log)


@FAST
@given(kind=st.sampled_from(sorted(OPENERS)), head=st.integers(0, 2**64 - 1),
       started=st.integers(0, 2**64 - 1))
def test_garbage_write_counters_never_crash_or_return_a_wrong_record(pristine: dict[str, bytes], kind: str,
                                                                     head: int, started: int) -> None:
    counters = {_HEAD_OFFSET: head, _STARTED_OFFSET: started}
    data = bytearray(pristine[kind])
    for offset, value in counters.items():
        data[offset : offset + 8] = value.to_bytes(8, "little")
    with damaged(bytes(data)) as path:
        reader = OPENERS[kind](path)
        if kind == "ring":
            for r in reader.poll():
                np.testing.assert_array_equal(r.routed, ring_values(r.seq)["routed"])
                assert r.seq == r.first_step
        else:
            got = reader.read()
            assert got is None or got.phys_to_log.tolist() == control_plan(
                got.version if kind == "control" else got.step).phys_to_log.tolist()
        reader.close()
