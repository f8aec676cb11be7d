"""Telemetry ring cost for the DeepSeek-V3 shape: write per record (inference side), read rate (daemon).

Run pinned to one core, as in docs/benchmarks.md ("Shared-memory protocol"):

    taskset -c 0 env OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/protocol.py

Targets: writing at most 100 us per record (it runs in the inference process), reading at least 2,000
records/s on one core. The write is also split into its parts (zeroing the scratch record, the field
copies, the checksum, the copy into the mapping) so a regression points at its cause.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from balancerd.protocol import RingShape, TelemetryReader, TelemetryWriter
from balancerd.segment import checksum64

LAYERS, EXPERTS, WORLD, SLOTS_PER_RANK = 58, 256, 8, 40
WRITE_BUDGET_US = 100.0
READ_TARGET_PER_S = 2000.0


def _timed_us(fn: Callable[[], object], n: int) -> np.ndarray:
    out = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter_ns()
        fn()
        out[i] = (time.perf_counter_ns() - t0) / 1e3
    return out


def _write_kwargs(rng: np.random.Generator) -> dict:
    L, E, K = LAYERS, EXPERTS, SLOTS_PER_RANK
    routed = rng.integers(0, 4096, (L, E), dtype=np.int32)
    return dict(
        first_step=0, last_step=99, tokens=1 << 20, placement_version=3, step_us=2500.0, routed=routed,
        global_routed=routed * WORLD, received=rng.integers(0, 32768, (L, K), dtype=np.int32),
        dispatch_us=rng.random(L, dtype=np.float32), combine_us=rng.random(L, dtype=np.float32),
        expert_us=rng.random(L, dtype=np.float32), dropped=rng.integers(0, 9, L),
        bias_changed=rng.integers(0, 9, L),
    )


Row = tuple[str, float, float, str]


def run(directory: Path, records: int, warmup: int, capacity: int) -> tuple[list[Row], int]:
    """Rows of (what, median, p99, target) for the write, its parts and the read; the record size."""
    shape = RingShape(LAYERS, EXPERTS, SLOTS_PER_RANK)
    writer = TelemetryWriter.create(directory, "bench", 0, WORLD, 1, shape, capacity=capacity)
    kw = _write_kwargs(np.random.default_rng(0))
    write = lambda: writer.write(**kw)
    _timed_us(write, warmup)
    write_us = _timed_us(write, records)

    reader = TelemetryReader.open(writer.path)
    per_record_us = []
    for _ in range(max(1, records // capacity)):
        reader.poll()  # catch up with the writer; untimed
        for _ in range(capacity):
            write()
        t0 = time.perf_counter_ns()
        got = reader.poll()
        per_record_us.append((time.perf_counter_ns() - t0) / 1e3 / len(got))
    assert (reader.stats.dropped, reader.stats.invalid) == (0, 0)
    read_us = np.asarray(per_record_us)

    # the parts of Segment.write, on the writer's own scratch record and mapping (this clobbers slot 0)
    seg = writer._seg
    scratch, raw = seg._scratch, seg._scratch.view(np.uint8)
    words = raw[:-16].view(np.uint64)
    zero_us = _timed_us(lambda: raw.fill(0), records)
    checksum_us = _timed_us(lambda: checksum64(words), records)
    copy_us = _timed_us(lambda: seg.records.__setitem__(0, scratch[0]), records)
    record_bytes = seg.info.record_bytes
    reader.close()
    writer.close()

    def pct(a: np.ndarray) -> tuple[float, float]:
        return float(np.median(a)), float(np.percentile(a, 99))

    rest_us = np.median(write_us) - np.median(zero_us) - np.median(checksum_us) - np.median(copy_us)
    return [
        ("write, us per record", *pct(write_us), f"<= {WRITE_BUDGET_US:.0f}"),
        ("  zero the scratch record, us", *pct(zero_us), ""),
        ("  field copies and call overhead (median, by difference), us", rest_us, float("nan"), ""),
        ("  checksum64, us", *pct(checksum_us), ""),
        ("  copy into the mapping, us", *pct(copy_us), ""),
        ("read, us per record", *pct(read_us), ""),
        # per-batch rates: median of the rate, and the rate the 99th-percentile slowest batch reached
        ("read, records/s", 1e6 / np.median(read_us), 1e6 / np.percentile(read_us, 99),
         f">= {READ_TARGET_PER_S:,.0f}"),
    ], record_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=3000, help="timed writes (and records read)")
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--capacity", type=int, default=64, help="ring capacity (records per read batch)")
    ap.add_argument("--dir", type=Path, default=None, help="where the ring file goes (default: a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        rows, record_bytes = run(Path(d), args.records, args.warmup, args.capacity)
    print(f"DeepSeek-V3 shape: {LAYERS} layers x {EXPERTS} experts, {WORLD} ranks x {SLOTS_PER_RANK} slots, "
          f"global_routed filled, {record_bytes:,} bytes per record; "
          f"CPU affinity {sorted(os.sched_getaffinity(0))}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, numpy {np.__version__}")
    print()
    print("| measure | median | p99 | target |")
    print("|---|---:|---:|---|")
    for name, med, p99, target in rows:
        p99_text = "" if np.isnan(p99) else f"{p99:,.1f}"
        print(f"| {name} | {med:,.1f} | {p99_text} | {target} |")


if __name__ == "__main__":
    main()
