"""Run a function in W real processes joined by a real torch.distributed group (gloo on CPU; with
backend="nccl", rank r on GPU r).

    from distributed import run_world
    results = run_world(fn, 4, arg, timeout=60)   # [fn(0, 4, arg), ..., fn(3, 4, arg)]

`fn` must be importable (a module-level function) and return something picklable (prefer numpy
to tensors). A worker's exception is re-raised here as WorkerError carrying every failed rank's
traceback; the other ranks get a few seconds to finish and are then terminated, so a rank stuck
in a collective never hangs the test. The whole world is bounded by `timeout`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

GRACE_S = 5.0  # how long the other ranks may still finish after one has failed


class WorkerError(RuntimeError):
    """One or more ranks raised; the message holds their tracebacks."""


def _worker(fn: Callable, rank: int, world: int, args: tuple, init: str, backend: str, timeout: float,
            results: mp.Queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout))
        try:
            payload = (rank, True, pickle.dumps(fn(rank, world, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:
        payload = (rank, False, traceback.format_exc())
    results.put(payload)


def _stop(procs: list[mp.Process]) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join()


def run_world(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 60.0,
              backend: str = "gloo") -> list[Any]:
    """fn(rank, world, *args) in `world` spawned processes; the results in rank order."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'store')}"
        procs = [ctx.Process(target=_worker, args=(fn, r, world, args, init, backend, timeout, results),
                             daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        try:
            done, failed = _collect(procs, results, time.monotonic() + timeout)
        finally:
            _stop(procs)
    if failed:
        missing = sorted(set(range(world)) - set(done) - set(failed))
        lines = [f"rank {r} failed:\n{tb}" for r, tb in sorted(failed.items())]
        if missing:
            lines.append(f"ranks {missing} were stopped without finishing")
        raise WorkerError("\n".join(lines))
    missing = sorted(set(range(world)) - set(done))
    if missing:
        raise TimeoutError(f"ranks {missing} of {world} did not finish within {timeout:.0f} s")
    return [pickle.loads(done[r]) for r in range(world)]


def _collect(procs: list[mp.Process], results: mp.Queue, deadline: float) -> tuple[dict, dict]:
    """Gather (rank -> pickled result) and (rank -> traceback) until all report, time runs out, or a
    rank has failed and the others had GRACE_S to finish."""
    done: dict[int, bytes] = {}
    failed: dict[int, str] = {}
    dead_since: dict[int, float] = {}
    while len(done) + len(failed) < len(procs) and time.monotonic() < deadline:
        try:
            rank, ok, value = results.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            (done if ok else failed)[rank] = value
        except queue.Empty:
            # A rank that died without reporting (a crash); give its last message a second to arrive.
            now = time.monotonic()
            for r, p in enumerate(procs):
                if r not in done and r not in failed and p.exitcode is not None:
                    if now - dead_since.setdefault(r, now) > 1.0:
                        failed[r] = f"exited with code {p.exitcode} without reporting\n"
        if failed:
            deadline = min(deadline, time.monotonic() + GRACE_S)
    return done, failed
