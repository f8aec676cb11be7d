"""TelemetryPublisher on real gloo ranks: records at the agreed steps, counts summed over ranks, the
caller's words delivered to every rank, a time-based interval agreed without extra collectives, and a
slow writer costing discarded records, never a wait.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from distributed import run_world

from balancerd.protocol import TelemetryReader, ring_path
from moe_runtime import Counters, ep_group
from moe_runtime.telemetry import IDLE_HAND_OVER_S, WRITE_FROM, TelemetryConfig, TelemetryPublisher

pytestmark = pytest.mark.slow

L, E, K = 2, 6, 4


def _count_step(counters: Counters, rank: int, step: int) -> None:
    """What a forward would add: rank r routes (r + 1) assignments to expert step % E of each layer."""
    counters.routed[:, step % E] += rank + 1
    counters.received[:, step % K] += 1


def _records(directory: str, world: int) -> list[list]:
    out = []
    for rank in range(world):
        reader = TelemetryReader.open(ring_path(Path(directory), "pub", rank))
        out.append(reader.poll())
    return out


def _fixed_interval(rank: int, world: int, directory: str, write_from: str) -> list[int]:
    group = ep_group()
    counters = Counters(L, E, K)
    config = TelemetryConfig(job="pub", interval_steps=4, directory=directory, write_from=write_from)
    publisher = TelemetryPublisher(counters, group, config, extra_words=2)
    delivered = []
    pending = None
    for step in range(12):
        _count_step(counters, rank, step)
        extra = (rank + 1, 7) if step == 3 else ()
        words = publisher.step(step, tokens=5, placement_version=0, extra=extra)
        if pending is not None and words is not None:
            delivered.append(pending.tolist())
        if words is not None:
            pending = words
    publisher.close()
    return delivered


@pytest.mark.parametrize("write_from", WRITE_FROM)
def test_fixed_interval_records_sums_and_words(tmp_path: Path, write_from: str) -> None:
    world = 2
    delivered = run_world(_fixed_interval, world, str(tmp_path), write_from, timeout=60)
    # words published at step 3 (rank 0: (1, 7), rank 1: (2, 7)) arrive summed on every rank
    assert delivered == [[[3, 14], [0, 0]]] * world
    records = _records(str(tmp_path), world)
    for rank, recs in enumerate(records):
        assert [(r.first_step, r.last_step) for r in recs] == [(0, 3), (4, 7), (8, 11)]
        assert all(r.tokens == 20 for r in recs)
        for r in recs:
            steps = range(r.first_step, r.last_step + 1)
            want = np.zeros((L, E), np.int64)
            for s in steps:
                want[:, s % E] += rank + 1
            assert np.array_equal(r.routed, want)
            assert np.array_equal(r.global_routed, want * 3 // (rank + 1))  # ranks add 1 and 2 each
            assert r.received.sum() == L * 4


def _time_interval(rank: int, world: int, directory: str, step_s: list[float]) -> tuple[list[int], list[int]]:
    group = ep_group()
    counters = Counters(L, E, K)
    config = TelemetryConfig(job="pub", interval_steps=2, interval_ms=40.0, directory=directory)
    publisher = TelemetryPublisher(counters, group, config)
    published, intervals = [], []
    for step in range(60):
        time.sleep(step_s[rank])  # rank 0 sets the pace of the proposal; the others only follow it
        _count_step(counters, rank, step)
        if publisher.step(step, tokens=1, placement_version=0) is not None:
            published.append(step)
            intervals.append(publisher.interval)
    publisher.close()
    return published, intervals


def test_time_based_interval_is_agreed_by_every_rank(tmp_path: Path) -> None:
    results = run_world(_time_interval, 2, str(tmp_path), [0.005, 0.001], timeout=60)
    (steps0, intervals0), (steps1, intervals1) = results
    assert steps0 == steps1, "every rank publishes at the same steps"
    assert intervals0 == intervals1
    assert steps0[:2] == [1, 3]  # interval_steps until the first agreement
    # rank 0 takes about 5 ms a step (plus the collectives), so about 40 / 5 = 8 steps a publish
    assert 4 <= intervals0[-1] <= 9, intervals0
    assert min(b - a for a, b in zip(steps0[3:], steps0[4:], strict=False)) >= 4


def test_slow_writer_discards_instead_of_waiting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        counters = Counters(L, E, K)
        config = TelemetryConfig(job="pub", interval_steps=1, max_pending=2, directory=str(tmp_path))
        publisher = TelemetryPublisher(counters, ep_group(), config)
        real_write = publisher.writer.write
        monkeypatch.setattr(publisher.writer, "write", lambda **kw: (time.sleep(0.2), real_write(**kw)))
        start = time.perf_counter()
        for step in range(20):
            counters.routed[0, 0] += 1
            publisher.step(step, tokens=1, placement_version=0)
        elapsed = time.perf_counter() - start
        assert elapsed < 0.2, f"20 publish steps took {elapsed:.3f} s: the step waited on the writer"
        assert publisher.discarded >= 15
        assert int(counters.routed.sum()) == 0  # every publish still reset the counters
        publisher.close()
    finally:
        dist.destroy_process_group()
    records = TelemetryReader.open(ring_path(tmp_path, "pub", 0)).poll()
    assert 1 <= len(records) == 20 - publisher.discarded
    assert all(int(r.routed.sum()) == 1 for r in records)


@pytest.fixture
def single_rank(tmp_path: Path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield ep_group()
    dist.destroy_process_group()


@pytest.mark.parametrize("write_from", WRITE_FROM)
def test_an_idle_engines_last_interval_still_reaches_the_ring(tmp_path: Path, single_rank,
                                                              write_from: str) -> None:
    counters = Counters(L, E, K)
    config = TelemetryConfig(job="pub", interval_steps=2, directory=str(tmp_path), write_from=write_from)
    publisher = TelemetryPublisher(counters, single_rank, config)
    reader = TelemetryReader.open(ring_path(tmp_path, "pub", 0))
    for step in range(2):
        _count_step(counters, 0, step)
        publisher.step(step, tokens=1, placement_version=0)
    records: list = []  # no further step() comes: the writer thread hands the snapshot over itself
    deadline = time.monotonic() + 5 * IDLE_HAND_OVER_S
    while not records and time.monotonic() < deadline:
        records += reader.poll()
        time.sleep(0.05)
    assert [(r.first_step, r.last_step) for r in records] == [(0, 1)]
    publisher.close()


@pytest.mark.parametrize("write_from, writer", [("thread", "balancerd-telemetry"), ("step", "MainThread")])
def test_records_are_written_where_configured(tmp_path: Path, single_rank, write_from: str,
                                              writer: str) -> None:
    config = TelemetryConfig(job="pub", interval_steps=2, directory=str(tmp_path), write_from=write_from)
    publisher = TelemetryPublisher(Counters(L, E, K), single_rank, config)
    written_by = []
    write = publisher.writer.write

    def traced(**record):
        written_by.append(threading.current_thread().name)
        return write(**record)

    publisher.writer.write = traced
    for step in range(7):  # publishes at steps 1, 3, 5; each handed over at the following step()
        publisher.step(step, tokens=1, placement_version=0)
    deadline = time.monotonic() + 5
    while len(written_by) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert written_by == [writer] * 3
    publisher.close()
