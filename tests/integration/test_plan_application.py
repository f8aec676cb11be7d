"""Plans applied live on every rank: real gloo ranks, real shared memory, a plan writer in the parent.

The parent process plays the daemon's writing side with a real ControlWriter: it waits for the
ranks' generation in their status blocks, then publishes random valid placements one after the
other (and, in between, broken ones). Every rank checks its output against the dense reference at
every step, so "outputs unchanged before, during and after every migration" is checked literally.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import run_world

from balancerd.protocol import (
    ControlPlan,
    ControlWriter,
    PlanResult,
    RejectReason,
    read_status,
    status_path,
)
from moe_runtime import (
    Counters,
    DispatchConfig,
    EPMoEStack,
    LogicalWeights,
    MoEConfig,
    RuntimePlacement,
    ep_group,
)
from moe_runtime.controller import ControllerConfig, PlanController
from moe_runtime.reference import dense_stack
from moe_runtime.telemetry import TelemetryConfig

pytestmark = pytest.mark.slow

JOB, WORLD, E, K, LAYERS = "loop", 4, 8, 3, 2
CFG = MoEConfig.preset("qwen3-235b-a22b", layers=LAYERS, hidden=16, intermediate=8, experts=E, top_k=2)
STEPS = 260


def random_plan(rng: np.random.Generator) -> np.ndarray:
    rows = []
    for _ in range(LAYERS):
        row = np.concatenate([np.arange(E), rng.integers(0, E, WORLD * K - E)])
        rows.append(rng.permutation(row))
    return np.stack(rows).astype(np.int32)


def serve(rank: int, world: int, directory: str, steps: int) -> dict:
    group = ep_group()
    weights = [LogicalWeights.random(CFG, layer, seed=5) for layer in range(LAYERS)]
    placement = RuntimePlacement.initial(LAYERS, E, world, K)
    counters = Counters(LAYERS, E, K)
    stack = EPMoEStack(CFG, group, placement, dispatch=DispatchConfig(), counters=counters)
    stack.load_weights(weights)
    controller = PlanController(stack, placement, group, counters,
                                telemetry=TelemetryConfig(job=JOB, interval_steps=2, directory=directory),
                                config=ControllerConfig(layers_per_step=1, reopen_steps=1))
    gen = torch.Generator().manual_seed(rank)
    worst, versions, during = 0.0, [], 0
    try:
        for step in range(steps):
            x = torch.randn(6, CFG.hidden, generator=gen)
            with torch.no_grad():
                out, ref = stack(x), dense_stack(x, weights, CFG)
            worst = max(worst, float((out - ref).abs().max()))
            during += controller.migrating
            controller.after_step(step, x.shape[0])
            versions.append(placement.version)
            time.sleep(0.002)  # give the plan writer a chance on a 2-core machine
    finally:
        controller.close()
    return {"worst": worst, "versions": versions, "during": during, "host": placement.host.copy()}


class PlanWriter(threading.Thread):
    """Publishes random plans, each once the previous one was answered, plus a few bad ones."""

    def __init__(self, directory: Path, bad_every: int = 7):
        super().__init__(daemon=True)
        self.directory, self.bad_every = directory, bad_every
        self.stop = threading.Event()
        self.published: dict[int, np.ndarray] = {}
        self.bad: dict[int, RejectReason] = {}
        self.results: dict[int, tuple[PlanResult, RejectReason]] = {}

    def _status(self, rank: int):
        return read_status(status_path(self.directory, JOB, rank))

    def run(self) -> None:
        rng = np.random.default_rng(0)
        while (st := self._status(0)) is None and not self.stop.is_set():
            time.sleep(0.01)
        writer = ControlWriter.create(self.directory, JOB, LAYERS, E, WORLD * K, WORLD)
        version = 0
        while not self.stop.is_set():
            version += 1
            p2l = random_plan(rng)
            if version % self.bad_every == 0:
                p2l[1][p2l[1] == 3] = 4          # expert 3 loses every replica in layer 1
                self.bad[version] = RejectReason.MISSING_EXPERT
            self.published[version] = p2l
            writer.publish(ControlPlan(version=version, generation=st.generation, phys_to_log=p2l))
            while not self.stop.is_set():
                st = self._status(0)
                if st is not None and st.result_version == version and st.result in (
                        PlanResult.APPLIED, PlanResult.REJECTED):
                    self.results[version] = (st.result, st.reason)
                    break
                time.sleep(0.005)
        writer.close()


def test_twenty_plus_plans_applied_in_sequence_outputs_exact(tmp_path):
    writer = PlanWriter(tmp_path)
    writer.start()
    try:
        results = run_world(serve, WORLD, str(tmp_path), STEPS, timeout=240)
    finally:
        writer.stop.set()
        writer.join(5)
    applied = [v for v, (res, _) in writer.results.items() if res == PlanResult.APPLIED]
    assert len(applied) >= 20, writer.results
    for r in results:
        assert r["worst"] < 1e-5
        assert r["during"] > 0                     # steps served while a migration was in flight
        assert r["versions"] == results[0]["versions"]  # every rank switched at the same step
    final = results[0]["versions"][-1]
    assert np.array_equal(results[0]["host"], writer.published[final])
    for version, reason in writer.bad.items():
        if version in writer.results:
            assert writer.results[version] == (PlanResult.REJECTED, reason)
    assert final not in writer.bad
