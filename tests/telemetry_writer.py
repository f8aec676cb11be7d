"""A real writer process for a fake EP job: telemetry rings, status blocks and a leader that applies plans.

Run as ``python tests/telemetry_writer.py SPEC_JSON``; tests use :class:`TelemetryProcess`, which starts
it and collects what it reports. The process publishes one record per rank every ``interval_s`` into
real rings (synthetic loads from :class:`WriterSpec.load`), writes every rank's status block, and, as
the leader rank, reads the job's control block and applies (or ignores, or rejects) each new plan to
the placement it reports. It reads commands from stdin (one JSON object a line, same as scripted
``events``) and reports on stdout (one JSON object a line: ready, interval, plan, restarted, exit).

Load specs: ``{"kind": "uniform"}`` or ``{"kind": "zipf", "s": 1.5}`` (a random expert order per layer,
fixed by the seed), optionally with ``"zero_rank": r`` (the experts with a slot on rank r in the
initial placement get no tokens, so that rank idles) and ``"layers": [..]`` (skew only these layers;
the others stay uniform).

Events (scripted as ``{"at": interval, ...}`` or sent with :meth:`TelemetryProcess.command`):
``{"event": "load", "load": {...}}``, ``{"event": "restart"}`` (new generation, initial placement),
``{"event": "stop_rank", "rank": r}``, ``{"event": "resume_rank", "rank": r}``,
``{"event": "plans", "action": "apply" | "ignore" | "reject"}``, ``{"event": "exit"}``.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from balancerd.placement import PlacementError, Topology, initial_placement, validate_placement
from balancerd.protocol import (
    ControlReader,
    PlanResult,
    Policy,
    RejectReason,
    RingShape,
    SegmentError,
    StatusRecord,
    StatusWriter,
    TelemetryWriter,
    control_path,
    new_generation,
)


@dataclass
class WriterSpec:
    """The fake job. ``ranks``: the ranks whose segments this process writes (None: all of them)."""

    job: str = "fake"
    layers: int = 4
    experts: int = 16
    world: int = 4
    slots_per_rank: int = 5
    tokens: int = 512            # tokens per rank per interval
    top_k: int = 4
    steps: int = 4               # steps per interval
    interval_s: float = 0.05
    global_routed: bool = True
    leader: bool = True          # act on the control block (as rank 0 would)
    plans: str = "apply"         # apply | ignore | reject
    load: dict = field(default_factory=lambda: {"kind": "uniform"})
    events: list[dict] = field(default_factory=list)
    ranks: list[int] | None = None
    capacity: int = 64
    seed: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))


# ---------------------------------------------------------------------------------------------------
# The writer process


def expert_probabilities(load: dict, layers: int, experts: int, initial_row: np.ndarray,
                         slots_per_rank: int, rng_seed: int) -> np.ndarray:
    """[L, E] routing probabilities of a load spec."""
    p = np.ones((layers, experts))
    if load["kind"] == "zipf":
        order = np.random.default_rng(rng_seed).permuted(np.tile(np.arange(experts), (layers, 1)), axis=1)
        skew = 1.0 / (order + 1.0) ** float(load.get("s", 1.0))
        chosen = load.get("layers", list(range(layers)))
        p[chosen] = skew[chosen]
    elif load["kind"] != "uniform":
        raise ValueError(f"unknown load kind {load['kind']!r}")
    if "zero_rank" in load:
        r = int(load["zero_rank"])
        p[:, initial_row[r * slots_per_rank:(r + 1) * slots_per_rank]] = 0.0
    return p / p.sum(axis=1, keepdims=True)


class FakeJob:
    """The state of the simulated job: generation, placement, segments, plan handling."""

    def __init__(self, spec: WriterSpec, directory: Path, emit):
        self.spec, self.directory, self.emit = spec, directory, emit
        self.shape = RingShape(spec.layers, spec.experts, spec.slots_per_rank)
        self.slots = spec.world * spec.slots_per_rank
        self.topo = Topology(gpus=spec.world, slots=self.slots)
        self.initial_row = initial_placement(1, spec.experts, self.topo)[0]
        self.local = spec.ranks if spec.ranks is not None else list(range(spec.world))
        self.rng = np.random.default_rng(spec.seed)
        self.plans = spec.plans
        self.stopped: set[int] = set()
        self.set_load(spec.load)
        self.rings: dict[int, TelemetryWriter] = {}
        self.statuses: dict[int, StatusWriter] = {}
        self.control: ControlReader | None = None
        self.start_generation()

    def set_load(self, load: dict) -> None:
        self.p = expert_probabilities(load, self.spec.layers, self.spec.experts, self.initial_row,
                                      self.spec.slots_per_rank, self.spec.seed + 1)

    def start_generation(self) -> None:
        for w in [*self.rings.values(), *self.statuses.values()]:
            w.close()
        s = self.spec
        self.generation = new_generation()
        self.placement = initial_placement(s.layers, s.experts, self.topo)
        self.applied_version = 0
        self.result, self.result_version, self.reason = PlanResult.NONE, 0, RejectReason.OK
        self.interval = 0
        self.rings = {r: TelemetryWriter.create(self.directory, s.job, r, s.world, self.generation,
                                                self.shape, capacity=s.capacity) for r in self.local}
        self.statuses = {r: StatusWriter.create(self.directory, s.job, r, s.world, self.generation, s.layers,
                                                s.experts, self.slots) for r in self.local}
        self.write_statuses()

    def publish_interval(self) -> None:
        s = self.spec
        L, E, K = s.layers, s.experts, s.slots_per_rank
        routed = np.stack([[self.rng.multinomial(s.tokens * s.top_k, self.p[layer]) for layer in range(L)]
                           for _ in range(s.world)]).astype(np.int32)  # [R, L, E]
        total = routed.sum(axis=0)
        replicas = np.zeros((L, E))
        np.add.at(replicas, (np.arange(L)[:, None], self.placement), 1)
        per_slot = np.take_along_axis(total / replicas, self.placement, axis=1)  # [L, S]
        received = per_slot.reshape(L, s.world, K).transpose(1, 0, 2).round().astype(np.int32)  # [R, L, K]
        expert_us = received.sum(axis=2) * 0.01 + 5.0  # [R, L]
        wait_us = expert_us.max(axis=0) - expert_us
        first = self.interval * s.steps
        for r in self.local:
            if r in self.stopped:
                continue
            self.rings[r].write(
                first_step=first, last_step=first + s.steps - 1, tokens=s.tokens,
                placement_version=self.applied_version, routed=routed[r], received=received[r],
                dispatch_us=(20.0 + wait_us[r]).astype(np.float32), combine_us=np.full(L, 15.0, np.float32),
                expert_us=expert_us[r].astype(np.float32),
                step_us=float((35.0 + wait_us[r] + expert_us[r]).sum()),
                global_routed=total.astype(np.int32) if s.global_routed else None,
            )
        self.interval += 1
        self.emit({"type": "interval", "n": self.interval, "generation": self.generation})

    def handle_plan(self) -> None:
        """Act on a new plan in the control block, as the leader rank would."""
        if not self.spec.leader:
            return
        path = control_path(self.directory, self.spec.job)
        if self.control is not None and self.control.replaced():
            self.control.close()
            self.control = None
        if self.control is None:
            try:
                self.control = ControlReader.open(path, self.spec.layers, self.spec.experts, self.slots)
            except SegmentError:
                return
        plan = self.control.read()
        if plan is None or plan.version <= max(self.applied_version, self.result_version):
            return
        if self.plans == "ignore":
            return
        reason = self.check(plan)
        self.result_version = plan.version
        if reason is RejectReason.OK:
            self.placement = np.array(plan.phys_to_log, dtype=np.int32)
            self.applied_version = plan.version
            self.result, self.reason = PlanResult.APPLIED, RejectReason.OK
        else:
            self.result, self.reason = PlanResult.REJECTED, reason
        self.emit({"type": "plan", "version": plan.version, "generation": plan.generation,
                   "policy": Policy(plan.policy).name.lower(), "result": self.result.name.lower(),
                   "reason": self.reason.name.lower(), "capacity_factor": plan.capacity_factor,
                   "bias_max": float(np.abs(plan.selection_bias).max())})

    def check(self, plan) -> RejectReason:
        if self.plans == "reject":
            return RejectReason.VALUES
        if plan.generation != self.generation:
            return RejectReason.GENERATION
        try:
            validate_placement(plan.phys_to_log, self.spec.experts, self.topo, self.spec.layers)
        except PlacementError:
            return RejectReason.MISSING_EXPERT
        return RejectReason.OK

    def write_statuses(self) -> None:
        for r, w in self.statuses.items():
            if r in self.stopped:
                continue
            w.write(StatusRecord(
                generation=self.generation, rank=r, world=self.spec.world, phys_to_log=self.placement,
                applied_version=self.applied_version, step=self.interval * self.spec.steps,
                result=self.result, result_version=self.result_version, reason=self.reason,
                detail="rejected by the fake job" if self.result is PlanResult.REJECTED else ""))

    def apply_event(self, event: dict) -> bool:
        """Apply one event; False means exit."""
        kind = event["event"]
        if kind == "load":
            self.set_load(event["load"])
        elif kind == "restart":
            self.start_generation()
            self.emit({"type": "restarted", "generation": self.generation})
        elif kind == "stop_rank":
            self.stopped.add(int(event["rank"]))
        elif kind == "resume_rank":
            self.stopped.discard(int(event["rank"]))
        elif kind == "plans":
            self.plans = event["action"]
        elif kind == "exit":
            return False
        else:
            raise ValueError(f"unknown event {kind!r}")
        return True

    def close(self) -> None:
        for w in [*self.rings.values(), *self.statuses.values()]:
            w.close()
        if self.control is not None:
            self.control.close()


def writer_main(spec: WriterSpec, directory: Path) -> None:
    lock = threading.Lock()

    def emit(obj: dict) -> None:
        with lock:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()

    commands: queue.Queue[dict | None] = queue.Queue()
    wake = threading.Event()

    def read_stdin() -> None:
        for line in sys.stdin:
            if line.strip():
                commands.put(json.loads(line))
                wake.set()
        commands.put(None)  # stdin closed: the test is gone
        wake.set()

    threading.Thread(target=read_stdin, daemon=True).start()
    job = FakeJob(spec, directory, emit)
    scripted = sorted(spec.events, key=lambda e: e["at"])
    emit({"type": "ready", "generation": job.generation, "pid": os.getpid()})
    ticks = 0
    deadline = time.monotonic()
    running = True
    while running:
        while scripted and scripted[0]["at"] <= ticks:
            running = job.apply_event(scripted.pop(0)) and running
        while True:
            try:
                cmd = commands.get_nowait()
            except queue.Empty:
                break
            running = cmd is not None and job.apply_event(cmd) and running
        if not running:
            break
        job.publish_interval()
        job.handle_plan()
        job.write_statuses()
        ticks += 1
        deadline += spec.interval_s
        wake.wait(max(0.0, deadline - time.monotonic()))  # pacing; a command cuts it short
        wake.clear()
    job.close()
    emit({"type": "exit"})


# ---------------------------------------------------------------------------------------------------
# The test side


class TelemetryProcess:
    """Starts the writer process and collects its reports; use as a context manager."""

    def __init__(self, directory: Path, spec: WriterSpec):
        self.directory, self.spec = Path(directory), spec
        self.reports: list[dict] = []
        self._cond = threading.Condition()
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 20.0) -> dict:
        """Start the process; returns its ready report (with the first generation)."""
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), str(self.directory), self.spec.to_json()],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()
        return self.wait_for(lambda r: r["type"] == "ready", timeout)

    def _collect(self) -> None:
        for line in self._proc.stdout:
            with self._cond:
                self.reports.append(json.loads(line))
                self._cond.notify_all()
        with self._cond:
            self.reports.append({"type": "eof"})
            self._cond.notify_all()

    def wait_for(self, predicate, timeout: float) -> dict:
        """The first report (old or new) matching ``predicate``; raises TimeoutError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for r in self.reports:
                    if predicate(r):
                        return r
                if self.reports and self.reports[-1]["type"] == "eof":
                    raise RuntimeError(f"the writer exited (rc {self._proc.wait()}) before the condition")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching report in {timeout} s; last: {self.reports[-3:]}")
                self._cond.wait(left)

    def matching(self, predicate) -> list[dict]:
        with self._cond:
            return [r for r in self.reports if predicate(r)]

    def intervals(self) -> int:
        """Intervals written so far in the current generation."""
        got = self.matching(lambda r: r["type"] == "interval")
        return got[-1]["n"] if got else 0

    def command(self, event: dict) -> None:
        self._proc.stdin.write(json.dumps(event) + "\n")
        self._proc.stdin.flush()

    def stop(self, timeout: float = 10.0) -> int:
        """Ask the process to exit and wait for it; returns its exit status."""
        if self._proc is None:
            return 0
        if self._proc.poll() is None:
            try:
                self.command({"event": "exit"})
                self._proc.stdin.close()
            except (BrokenPipeError, ValueError):
                pass
        try:
            rc = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            rc = self._proc.wait()
        self._reader.join(timeout)
        self._proc.stdout.close()
        self._proc = None
        return rc

    def __enter__(self) -> TelemetryProcess:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    writer_main(WriterSpec(**json.loads(sys.argv[2])), Path(sys.argv[1]))
