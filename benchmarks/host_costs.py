"""Host microseconds of the telemetry's pieces on a GPU: what an eager, launch-bound step pays for them.

Two ranks, so the publish all-reduce is a real NCCL call. Each figure is the mean host time of a loop
of calls (after 50 warm-up calls; the device synchronized before and after the loop), printed by rank 0:

    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node 2 benchmarks/host_costs.py
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_runtime.counters import PHASES, Counters  # noqa: E402


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("host_costs.py measures CUDA host calls: run it on a GPU machine")
    dist.init_process_group("nccl")
    rank = dist.get_rank()
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)

    def report(label: str, fn: Callable[[], object], calls: int = 3000) -> None:
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        dist.barrier(device_ids=[rank])
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        took = time.perf_counter() - start
        torch.cuda.synchronize()
        if rank == 0:
            print(f"{label:45s} {took / calls * 1e6:8.2f} us")

    x = torch.zeros(1024, device=device)
    counters = Counters(2, 128, 34, device)
    event = torch.cuda.Event(enable_timing=True)
    stream = torch.cuda.current_stream()
    words = torch.zeros(2 * 128 + 4, dtype=torch.int32, device=device)
    host = torch.zeros(words.shape, dtype=torch.int32, pin_memory=True)

    def timed_phase() -> None:
        with counters.timed("dispatch", 0):
            pass

    report("one small torch op (x.add_(1))", lambda: x.add_(1))
    report("Event.record(stream)", lambda: event.record(stream))
    report("Event.record() (builds the stream object)", lambda: event.record())
    report("torch.cuda.is_current_stream_capturing()", torch.cuda.is_current_stream_capturing)
    counters.set_timing(False)
    report("a phase, timing off", timed_phase)
    counters.set_timing(True)
    report("a timed phase, fresh events", timed_phase, calls=200)
    counters.drain_timings()

    def collect_six() -> float:
        for phase in PHASES * 2:
            with counters.timed(phase, 0):
                x.add_(1)
        torch.cuda.synchronize()
        start = time.perf_counter()
        counters.set_timing(True)  # collects the completed timers
        return time.perf_counter() - start

    took = statistics.median(collect_six() for _ in range(200))
    if rank == 0:
        print(f"{'reading 6 completed event pairs':45s} {took * 1e6:8.2f} us")
    report("dist.all_reduce of 260 int32", lambda: dist.all_reduce(words), calls=500)
    report("pinned non-blocking copy of them", lambda: host.copy_(words, non_blocking=True))
    report("zero_() of the counters", counters.reset)
    report("fill_ of one word", lambda: words[3].fill_(7))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
