"""Applying the daemon's plans on every rank at the same step, without the forward ever waiting on it.

The protocol, one publish interval at a time (N steps: ``interval_steps``, or agreed from
``interval_ms``; see moe_runtime.telemetry):

* every step, the leader (EP rank 0) looks at its control block; the read never blocks, and only
  copies a plan when the block's head moved;
* at a publish step P the leader announces a new plan version in two extra words of the telemetry
  all-reduce (the other ranks add zeros), so the announcement costs no extra collective;
* at the next publish step P + N every rank has that all-reduce's host copy (it completed N steps
  ago), so all of them see the same announcement at the same step: rank 0 broadcasts the plan, every
  rank validates it, and an all-reduce of the rejection codes makes the decision unanimous — if any
  rank rejects, none applies, and each writes the reason into its status block;
* an accepted plan switches the token bias and capacity policy at once, and migrates changed layers
  ``layers_per_step`` at a time, each layer switching only when its weights have arrived.

A dead daemon changes nothing here: no new plans arrive and the last good placement keeps serving.
A migration in flight needs nothing from the daemon, so it always completes on every rank.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from balancerd.placement import PlacementError
from balancerd.protocol import (
    ControlPlan,
    ControlReader,
    Mode,
    PlanResult,
    Policy,
    RejectReason,
    SegmentError,
    StatusRecord,
    StatusWriter,
    control_path,
    runtime_dir,
)
from moe_runtime.counters import Counters
from moe_runtime.group import EPGroup
from moe_runtime.migrate import chunk_layers, migrate_chunk, schedule
from moe_runtime.placement import RuntimePlacement
from moe_runtime.telemetry import TelemetryConfig, TelemetryPublisher

ANNOUNCE_WORDS = 2  # a plan version as (high, low) int32 halves riding on the counts all-reduce
_HEADER = 8         # int64 words: version, generation, policy, mode, reroute, capacity, 2 reserved


@dataclass(frozen=True)
class ControllerConfig:
    layers_per_step: int = 1     # layers migrated per step: bounds the stall of any one step
    reopen_steps: int = 64       # how often the leader retries a missing control block

    def __post_init__(self) -> None:
        if self.layers_per_step < 1:
            raise ValueError(f"ControllerConfig.layers_per_step must be >= 1, got {self.layers_per_step}")
        if self.reopen_steps < 1:
            raise ValueError(f"ControllerConfig.reopen_steps must be >= 1, got {self.reopen_steps}")


def _encode(plan: ControlPlan, layers: int, experts: int) -> torch.Tensor:
    header = np.array([plan.version, plan.generation, int(plan.policy), int(plan.mode), 0, 0, 0, 0], np.int64)
    floats = np.array([plan.max_reroute_fraction, plan.capacity_factor], np.float64)
    header[4:6] = floats.view(np.int64)
    bias = np.zeros((layers, experts), np.float32) if plan.selection_bias is None else plan.selection_bias
    parts = [header.view(np.int32), np.asarray(plan.phys_to_log, np.int32).reshape(-1),
             np.ascontiguousarray(bias, np.float32).reshape(-1).view(np.int32)]
    return torch.from_numpy(np.concatenate(parts))


def _decode(buf: np.ndarray, layers: int, experts: int, slots: int) -> ControlPlan:
    header = buf[: 2 * _HEADER].view(np.int64)
    floats = header[4:6].view(np.float64)
    p2l = buf[2 * _HEADER: 2 * _HEADER + layers * slots].reshape(layers, slots)
    bias = buf[2 * _HEADER + layers * slots:].view(np.float32).reshape(layers, experts)
    return ControlPlan(version=int(header[0]), generation=int(header[1]), phys_to_log=p2l,
                       policy=Policy(int(header[2])), mode=Mode(int(header[3])), selection_bias=bias,
                       max_reroute_fraction=float(floats[0]), capacity_factor=float(floats[1]))


def validate_plan(plan: ControlPlan, placement: RuntimePlacement, generation: int,
                  applied_version: int) -> tuple[RejectReason, str]:
    """Everything a rank checks before agreeing to a plan; (OK, "") when it may be applied."""
    if plan.generation != generation:
        return RejectReason.GENERATION, f"plan for generation {plan.generation:x}, runtime is {generation:x}"
    if plan.version <= applied_version:
        return RejectReason.STALE, f"version {plan.version} is not newer than {applied_version}"
    p2l = np.asarray(plan.phys_to_log)
    if p2l.shape != (placement.layers, placement.slots):
        want = (placement.layers, placement.slots)
        return RejectReason.SHAPE, f"phys_to_log {p2l.shape}, runtime serves {want}"
    if p2l.min() < 0 or p2l.max() >= placement.experts:
        span = f"[{p2l.min()}, {p2l.max()}]"
        return RejectReason.ID_RANGE, f"expert ids span {span}, need [0, {placement.experts})"
    try:
        placement.check(p2l)
    except PlacementError as exc:
        missing = "no replica" in str(exc) or "missing" in str(exc)
        return (RejectReason.MISSING_EXPERT if missing else RejectReason.SLOTS), str(exc)
    bias = plan.selection_bias
    if bias is not None and not np.isfinite(bias).all():
        return RejectReason.VALUES, "selection_bias holds NaN or infinity"
    if not (np.isfinite(plan.capacity_factor) and (plan.capacity_factor == 0 or plan.capacity_factor >= 1.0)):
        return RejectReason.VALUES, f"capacity_factor {plan.capacity_factor} (0 = off, else >= 1)"
    if not 0.0 <= plan.max_reroute_fraction <= 1.0:
        return RejectReason.VALUES, f"max_reroute_fraction {plan.max_reroute_fraction} outside [0, 1]"
    return RejectReason.OK, ""


class PlanController:
    """Drives one rank: telemetry publishing, plan agreement, migration and status.

    Construction is a collective (the ranks agree on a generation id). The engine then calls
    :meth:`after_step` once after every forward step, on every rank, and :meth:`close` at shutdown.
    """

    def __init__(self, stack, placement: RuntimePlacement, group: EPGroup, counters: Counters, *,
                 telemetry: TelemetryConfig, selection_bias: torch.Tensor | None = None,
                 config: ControllerConfig = ControllerConfig()):
        self.stack, self.placement, self.group = stack, placement, group
        self.publisher = TelemetryPublisher(counters, group, telemetry, extra_words=ANNOUNCE_WORDS)
        self.config, self.job = config, telemetry.job
        self.selection_bias = selection_bias
        self.base_dispatch = stack.layers[0].dispatch_config
        self.directory = Path(telemetry.directory) if telemetry.directory else runtime_dir()
        self.generation = self.publisher.generation
        self.is_leader = group.rank == 0
        self._control: ControlReader | None = None
        self._plan: ControlPlan | None = None     # the newest plan in the control block (leader)
        self._offered: ControlPlan | None = None  # the plan announced at the last publish (leader)
        self._handled_version = 0
        self._pending_announce = None      # (host words, done) from the last publish step
        self._migration: list[list[int]] | None = None
        self._moves = None
        self._target: ControlPlan | None = None
        self._started = 0.0
        self._bytes = 0
        self.migrated_bytes = 0            # received by this rank, over all plans
        self.rejected_control = 0
        self.status = StatusRecord(generation=self.generation, rank=group.rank, world=group.world,
                                   phys_to_log=placement.host)
        self._status = StatusWriter.create(self.directory, self.job, group.rank, group.world, self.generation,
                                           placement.layers, placement.experts, placement.slots)
        self._status.write(self.status)

    @property
    def migrating(self) -> bool:
        return self._migration is not None

    def after_step(self, step: int, tokens: int) -> None:
        if self._migration:
            self._migrate_next(step)
        if self.is_leader:
            self._poll_control(step)
        if not self.publisher.is_publish_step(step):
            self.publisher.step(step, tokens, self.placement.version)
            return
        announced = self._take_announcement()
        if announced and not self.migrating:
            self._agree(announced, step)
        offer = self._offer()
        words = (offer >> 31, offer & 0x7FFFFFFF) if offer else ()
        host = self.publisher.step(step, tokens, self.placement.version, extra=words)
        self._pending_announce = (host, self.publisher.last_done())
        self.status.step = step
        self.status.heartbeat_ns = 0
        self._status.write(self.status)

    # -- leader side ---------------------------------------------------------------------------------

    def _poll_control(self, step: int) -> None:
        if self._control is None:
            if step % self.config.reopen_steps:
                return
            path = control_path(self.directory, self.job)
            if not path.exists():
                return
            try:
                self._control = ControlReader.open(path, self.placement.layers, self.placement.experts,
                                                   self.placement.slots)
            except SegmentError:
                self.rejected_control += 1
                return
        elif step % self.config.reopen_steps == 0 and self._control.replaced():  # a stat: not every step
            self._control.close()
            self._control = None
            return
        plan = self._control.read()
        if plan is not None:
            self._plan = plan

    def _offer(self) -> int:
        """The version the leader announces at this publish step (0: none). The plan itself is kept,
        so a newer plan arriving before the agreement step cannot replace what was announced."""
        plan = self._plan
        self._offered = None
        if not self.is_leader or plan is None or self.migrating or plan.mode == Mode.PAUSED:
            return 0
        if plan.version <= self._handled_version or plan.generation != self.generation:
            return 0
        self._offered = plan
        return plan.version

    # -- every rank ----------------------------------------------------------------------------------

    def _take_announcement(self) -> int:
        if self._pending_announce is None:
            return 0
        host, done = self._pending_announce
        self._pending_announce = None
        if not done.query():
            done.synchronize()  # issued N steps ago: in practice already complete
        hi, lo = host[:ANNOUNCE_WORDS].tolist()  # one call: iterating a tensor costs ~20 us
        return (hi << 31) | lo

    def _agree(self, version: int, step: int) -> None:
        """Broadcast the announced plan, validate it everywhere, and start applying it unless any rank
        rejects it. Runs on every rank at the same step (off the forward path)."""
        pl = self.placement
        numel = 2 * _HEADER + pl.layers * pl.slots + pl.layers * pl.experts
        held = self._offered if self.is_leader else None
        plan = held if held is not None and held.version == version else None
        buf = _encode(plan, pl.layers, pl.experts) if plan else torch.zeros(numel, dtype=torch.int32)
        buf = buf.to(self.group.device)
        if self.group.world > 1:
            dist.broadcast(buf, dist.get_global_rank(self.group.group, 0), group=self.group.group)
        raw = buf.cpu().numpy()
        try:
            plan = _decode(raw, pl.layers, pl.experts, pl.slots)
            reason, detail = validate_plan(plan, pl, self.generation, self.status.applied_version)
            if plan.version != version:
                reason, detail = RejectReason.STALE, f"leader no longer holds version {version}"
        except ValueError as exc:
            plan, reason, detail = None, RejectReason.VALUES, str(exc)
        verdict = torch.tensor([int(reason)], dtype=torch.int32, device=self.group.device)
        if self.group.world > 1:
            dist.all_reduce(verdict, op=dist.ReduceOp.MAX, group=self.group.group)
        worst = int(verdict.item())
        self._handled_version = max(self._handled_version, version)
        if worst != RejectReason.OK:
            if reason == RejectReason.OK:
                reason, detail = RejectReason.PEER, "another rank rejected the plan"
            self.status.result, self.status.result_version = PlanResult.REJECTED, version
            self.status.reason, self.status.detail = reason, detail
            return
        self._apply_policies(plan)
        self._target, self._started, self._bytes = plan, time.perf_counter(), 0
        self._moves = schedule(pl.host, np.asarray(plan.phys_to_log, np.int32), pl.slots_per_rank)
        self._migration = chunk_layers(self._moves, self.config.layers_per_step)
        self.status.pending_version = version
        self.status.result, self.status.result_version = PlanResult.IN_PROGRESS, version
        self.status.reason, self.status.detail = RejectReason.OK, ""
        if not self._migration:
            self._finish(step)

    def _apply_policies(self, plan: ControlPlan) -> None:
        if self.selection_bias is not None:
            bias = plan.selection_bias if plan.policy == Policy.TOKEN else np.zeros_like(plan.selection_bias)
            self.selection_bias.copy_(torch.from_numpy(np.ascontiguousarray(bias)))
        if plan.policy == Policy.DROP and plan.capacity_factor > 0:
            dispatch = dataclasses.replace(self.base_dispatch, mode="capacity",
                                           capacity_factor=plan.capacity_factor)
        else:
            dispatch = self.base_dispatch
        for layer in self.stack.layers:
            layer.dispatch_config = dispatch

    def _migrate_next(self, step: int) -> None:
        layers = self._migration.pop(0)
        result = migrate_chunk(self.stack, self._moves, layers, self.group)
        target = np.asarray(self._target.phys_to_log, np.int32)
        self.placement.update_layers(layers, target[layers])
        self._bytes += result.bytes_received
        self.migrated_bytes += result.bytes_received
        if not self._migration:
            self._finish(step)

    def _finish(self, step: int) -> None:
        plan = self._target
        self.placement.version = plan.version
        self.status.applied_version, self.status.applied_step = plan.version, step
        self.status.pending_version = 0
        self.status.result, self.status.result_version = PlanResult.APPLIED, plan.version
        self.status.migration_bytes = self._bytes
        self.status.migration_seconds = time.perf_counter() - self._started
        self.status.phys_to_log = self.placement.host
        self._migration = self._moves = self._target = None
        self._status.write(self.status)

    def close(self) -> None:
        """Flush telemetry and close the ring, control and status segments (the files stay)."""
        self.publisher.close()
        if self._control is not None:
            self._control.close()
        self._status.close()

