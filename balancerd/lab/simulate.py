"""What-if replay of a count trace: detection, the planner and the push policy as the daemon runs them,
on a cluster of any size, with the step time of every interval predicted by the cost model.

Policies:
* static: the initial placement throughout.
* placement: the daemon's loop. A sliding window of `window.intervals` intervals is shown to
  `balancerd.detect.detect`; when it asks for a plan, `balancerd.planner.plan` plans from the window
  starting at the placement in force, `balancerd.policy.decide_push` weighs the predicted gain against
  the migration, and a pushed plan serves from the next interval on. Its migration (moves x expert bytes
  at `policy.migration_bandwidth_gbps`) is counted as serving time lost.
* drop: the static placement with the drop policy: a slot takes at most `capacity_factor` times the
  mean slot load; the rest is dropped (and reported).
* oracle: each interval planned from scratch from its own counts, migrations free: the lower bound.

The whole cluster is one EP replica (EP = GPUs, no TP). Each interval's step time comes from the
per-layer GPU loads: every layer's busiest GPU over the mean scales its expert time (cost model
`imbalance`), for a decode step and for a prefill of the workload.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from balancerd import detect
from balancerd.config import DaemonConfig
from balancerd.lab.calibration import Calibration
from balancerd.lab.costmodel import LayerTime, Parallelism, PhaseTime, Workload, decode_step, prefill
from balancerd.lab.models import ModelSpec
from balancerd.lab.trace import Trace
from balancerd.placement import Topology, balancedness, gpu_loads, initial_placement, slot_loads, sum_per_gpu
from balancerd.planner import plan
from balancerd.policy import decide_push

POLICIES = ("static", "placement", "drop", "oracle")


@dataclass(frozen=True)
class Cluster:
    gpus: int
    slots: int
    nodes: int = 1

    def __post_init__(self) -> None:
        Topology(gpus=self.gpus, slots=self.slots, nodes=self.nodes)  # raises PlacementError when invalid

    @property
    def topology(self) -> Topology:
        return Topology(gpus=self.gpus, slots=self.slots, nodes=self.nodes)


@dataclass
class PolicyRun:
    """One policy over the trace: per-interval predictions and what the policy did."""

    policy: str
    decode_ms: np.ndarray       # [T] predicted decode step
    prefill_ms: np.ndarray      # [T] predicted prefill of the workload
    balancedness: np.ndarray    # [T] mean over layers of GPU max/mean
    plans: int = 0
    moves: int = 0
    migration_s: float = 0.0
    dropped_share: float = 0.0
    events: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> dict[str, float | int | str]:
        return {"policy": self.policy, "decode_ms_mean": float(self.decode_ms.mean()),
                "decode_ms_p99": float(np.percentile(self.decode_ms, 99)),
                "prefill_ms_mean": float(self.prefill_ms.mean()),
                "prefill_ms_last": float(self.prefill_ms[-1]),
                "balancedness_mean": float(self.balancedness.mean()), "plans": self.plans,
                "moves": self.moves, "migration_s": self.migration_s, "dropped_share": self.dropped_share}


class StepModel:
    """Step time as a function of per-layer imbalance, memoised on the imbalance rounded to 1e-3."""

    def __init__(self, spec: ModelSpec, cluster: Cluster, work: Workload, cal: Calibration):
        self.spec, self.work = spec, work
        self.par = Parallelism(ep=cluster.gpus)
        self.cal = dataclasses.replace(cal, gpus_per_node=cluster.gpus // cluster.nodes)
        self.slots = -(-cluster.slots // cluster.gpus)
        self._layer: dict[tuple[str, float], LayerTime] = {}
        self.decode, self.prefill = self._phase("decode", 1.0), self._phase("prefill", 1.0)

    def _phase(self, phase: str, imbalance: float) -> PhaseTime:
        work = dataclasses.replace(self.work, imbalance=imbalance, slots_per_rank=self.slots)
        fn = decode_step if phase == "decode" else prefill
        return fn(self.spec, self.par, work, self.cal, [])

    def layer(self, phase: str, imbalance: float) -> LayerTime:
        key = (phase, round(max(float(imbalance), 1.0), 3))
        if key not in self._layer:
            self._layer[key] = self._phase(phase, key[1]).layer
        return self._layer[key]

    def step_ms(self, bal: np.ndarray) -> tuple[float, float, float]:
        """(decode step ms, prefill ms, share of the decode step in dispatch, experts and combine) for
        per-layer balancedness `bal` [L]."""
        layers = [self.layer("decode", b) for b in bal]
        decode = sum(x.total for x in layers) + self.decode.step_extra_us
        moe = sum(x.a2a + x.expert for x in layers)
        pre = self.prefill
        lm_head = pre.total_us - pre.forwards * (pre.layers * pre.layer.total + pre.step_extra_us)
        chunk = sum(self.layer("prefill", b).total for b in bal) + pre.step_extra_us
        return decode / 1e3, (pre.forwards * chunk + lm_head) / 1e3, moe / decode


def _gpu_loads_capped(counts: np.ndarray, p2l: np.ndarray, topo: Topology,
                      factor: float) -> tuple[np.ndarray, float]:
    """[L, G] loads with each slot capped at `factor` x the layer's mean slot load; the share dropped."""
    per_slot = slot_loads(counts, p2l)
    cap = factor * per_slot.mean(axis=1, keepdims=True)
    kept = np.minimum(per_slot, cap)
    total = per_slot.sum()
    return sum_per_gpu(kept, topo), float((per_slot - kept).sum() / total) if total > 0 else 0.0


def simulate(trace: Trace, spec: ModelSpec, cluster: Cluster, work: Workload, cal: Calibration,
             config: DaemonConfig | None = None, policies: tuple[str, ...] = POLICIES,
             progress: Callable[[str], None] | None = None) -> list[PolicyRun]:
    """Replay `trace` under each policy (daemon settings from `config`, default DaemonConfig());
    pure apart from `progress` lines."""
    config = config or DaemonConfig()
    unknown = set(policies) - set(POLICIES)
    if unknown:
        raise ValueError(f"unknown policies {sorted(unknown)}; known: {', '.join(POLICIES)}")
    if (trace.layers, trace.experts) != (spec.moe_layers, spec.experts):
        raise ValueError(f"the trace is [{trace.layers} layers, {trace.experts} experts], the model "
                         f"[{spec.moe_layers}, {spec.experts}]")
    topo = cluster.topology
    model = StepModel(spec, cluster, work, cal)
    runs = []
    for name in policies:
        if progress:
            progress(f"simulating policy {name} over {trace.intervals} intervals")
        runs.append(_run(name, trace, spec, topo, model, config))
    return runs


def _run(name: str, trace: Trace, spec: ModelSpec, topo: Topology, model: StepModel,
         config: DaemonConfig) -> PolicyRun:
    t_count = trace.intervals
    current = initial_placement(trace.layers, trace.experts, topo)
    run = PolicyRun(name, np.zeros(t_count), np.zeros(t_count), np.zeros(t_count))
    state, pending = detect.DetectorState(), None
    policy_cfg = dataclasses.replace(config.policy, expert_bytes=spec.expert_bytes)
    dropped = total = 0.0
    for t in range(t_count):
        counts = trace.counts[t].astype(np.float64)
        if pending is not None:
            current, pending = pending, None
        if name == "oracle":
            current = plan(counts, topo).phys_to_log
        if name == "drop":
            loads, share = _gpu_loads_capped(counts, current, topo, config.policy.capacity_factor)
            dropped += share * counts.sum()
            total += counts.sum()
        else:
            loads = gpu_loads(counts, current, topo)
        bal = balancedness(loads)
        run.balancedness[t] = bal.mean()
        run.decode_ms[t], run.prefill_ms[t], _ = model.step_ms(bal)
        if name == "placement":
            state, pending = _daemon_step(trace, t, topo, current, state, config, policy_cfg, model, run)
    run.dropped_share = float(dropped / total) if total else 0.0
    return run


def _daemon_step(trace: Trace, t: int, topo: Topology, current: np.ndarray, state: detect.DetectorState,
                 config: DaemonConfig, policy_cfg, model: StepModel, run: PolicyRun):
    """Detection over the window ending at t; a plan to serve from t + 1 when one is pushed."""
    first = max(0, t - config.window.intervals + 1)
    window = trace.counts[first:t + 1].sum(axis=0).astype(np.float64)
    view = detect.WindowView(window, int(round(float(window.sum(axis=1).mean()))), current, topo)
    now = float(trace.wall_s[t])
    state, verdict = detect.detect(state, view, now, config.detect)
    if not verdict.should_plan:
        return state, None
    result = plan(window, topo, current=current, max_moves=config.planner.max_moves_per_layer or None,
                  expert_groups=config.planner.expert_groups, tolerance=config.planner.tolerance)
    moves = int(result.moves.sum())
    step_ms, _, share = model.step_ms(result.balancedness_before)
    decision = decide_push(result.balancedness_before, result.balancedness_after, moves, step_ms * 1e3,
                           share, policy_cfg)
    run.events.append(f"interval {t}: {verdict.reason}; {decision.reason}")
    state = detect.note_plan(state, now)
    if not decision.push:
        return state, None
    run.plans += 1
    run.moves += moves
    run.migration_s += decision.migration_cost_s
    return state, result.phys_to_log
