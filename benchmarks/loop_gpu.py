"""The closed loop on the GPUs: static placement against the rebalanced one, in one run, under Zipf skew.

Launch one process per GPU from the repository root:

    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node 4 benchmarks/loop_gpu.py --out out/loop4
    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node 2 benchmarks/loop_gpu.py --out out/loop2
    torchrun --standalone --nproc-per-node 2 benchmarks/loop_gpu.py --device cpu --tiny    # gloo, CPU

The model is Qwen3-235B-A22B-shaped (hidden 4096, expert intermediate 1536, 128 experts, top-8) with
--layers layers, bf16, exact dispatch, 128 / world + --extra-slots slots a rank, and a router skewed by
moe_runtime.demo_rank.zipf_router_bias (LogicalWeights.router_bias). Each token count and
--micro-batches value (2: the all-to-alls pipelined with the experts in two token ranges of each layer;
2i: two ranges interleaved through the whole stack, DispatchConfig.interleave) is one case:

    warm-up -> static (--static-steps) -> plan requested -> waiting -> migration -> rebalanced

Every step is timed (synchronize, host clock; the max over ranks) and labelled with its phase. The
runtime side is the production path: PlanController publishes telemetry, reads the control block,
announces, broadcasts, validates, migrates --layers-per-step layers a step and switches. The plan comes
from the real daemon (`python -m balancerd.cli run`, started by rank 0, paused until the static phase
ends, then resumed; if it has not pushed a plan on its own within --force-after seconds, rank 0 asks
for one through its API). With --planner inprocess, or when the daemon does not start (auto), rank 0
plans with balancerd.planner.plan from the all-reduced counts in its own telemetry ring and writes the
plan into the same control block with ControlWriter.

Reported per case: median step ms static vs rebalanced and the throughput ratio (tokens/s); every
migration step against the static median (flagged above 2x); bytes migrated; GPU max/min and max/mean
load before and after, from the ranks' telemetry rings (the received counters); with --reference (on
in --tiny), the max relative error against the dense reference at the first static step, every
migration step and the step after the switch; per phase (dispatch, expert, combine) the ms a step
each rank spent before and after, from the same rings; with --profile-steps, torch.profiler tables and
traces of static and rebalanced steps on every rank. Results: DIR/loop.{csv,json,md} and
DIR/steps.csv, DIR defaulting to $OUT, else ./out; DIR/daemon.log when the daemon ran.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if not __package__:  # run as a file: the repo root must come first (benchmarks/kernels.py is no package)
    sys.path[0] = str(Path(__file__).resolve().parents[1])
sys.path.append(str(Path(__file__).resolve().parent))  # runtime_gpu as a file, not benchmarks.runtime_gpu

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from runtime_gpu import (  # noqa: E402
    DTYPES,
    Profiler,
    Results,
    add_copy_engine_option,
    default_out,
    init_distributed,
    log,
    max_over_ranks,
    record,
    sum_over_ranks,
    sync,
)

from balancerd.api import ApiClient, DaemonUnavailable  # noqa: E402
from balancerd.config import PlannerConfig  # noqa: E402
from balancerd.placement import Topology, balancedness, imbalance_ratio  # noqa: E402
from balancerd.planner import plan  # noqa: E402
from balancerd.protocol import ControlPlan, ControlWriter, PlanResult, TelemetryReader, ring_path  # noqa: E402
from moe_runtime import Counters, DispatchConfig, EPGroup, EPMoEStack, MoEConfig, RuntimePlacement  # noqa: E402
from moe_runtime.controller import ControllerConfig, PlanController  # noqa: E402
from moe_runtime.demo_rank import zipf_router_bias  # noqa: E402
from moe_runtime.reference import dense_stack  # noqa: E402
from moe_runtime.synthetic import device_weights, load_layers  # noqa: E402
from moe_runtime.telemetry import TelemetryConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROFILE_SETTLE_STEPS = 4  # rebalanced steps before the profiled ones
COLUMNS = ["world", "tokens", "micro_batches", "transport", "layers", "slots_per_rank", "planner",
           "static_ms", "rebalanced_ms", "speedup", "speedup_ge_1.3", "migration_steps", "migration_max_ms",
           "migration_max_over_median",
           "steps_over_2x", "waiting_steps", "migrated_MB", "gpu_max_min_before", "gpu_max_min_after",
           "balancedness_before", "balancedness_after", "dispatch_ms_max_before", "dispatch_ms_max_after",
           "expert_ms_max_before", "expert_ms_max_after", "combine_ms_max_before", "combine_ms_max_after",
           "max_rel_err"]


# ---------------------------------------------------------------------------------------------------
# Where the plan comes from (rank 0 only). request() and poll() run inside the step loop on rank 0
# alone, so they never raise: a failure is reported and retried, and the loop's --max-wait ends it.


class DaemonPlanner:
    """The real daemon in a subprocess, started paused so the static phase stays static."""

    name = "daemon"

    def __init__(self, runtime: Path, work: Path, expert_bytes: int, args: argparse.Namespace):
        self.socket, self.force_after = runtime / "balancerd.sock", args.force_after
        self.log_path = work / "daemon.log"
        config = work / "balancerd.toml"
        config.write_text(_daemon_config(runtime, work / "state", expert_bytes, args.threshold,
                                         args.planner_tolerance))
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path}
        command = [sys.executable, "-m", "balancerd.cli", "run", "--config", str(config)]
        with open(self.log_path, "wb") as err:
            self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.api(op="status")
                return
            except (DaemonUnavailable, OSError, RuntimeError, ValueError) as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    tail = self.log_path.read_text(errors="replace").strip()[-400:]
                    raise RuntimeError(f"the daemon did not come up ({exc}): {tail}") from None
                time.sleep(0.1)

    def api(self, **request) -> dict:
        answer = ApiClient(self.socket, timeout=10.0).request(request)
        if not answer.get("ok"):
            raise RuntimeError(answer.get("error", "request failed"))
        return answer

    def begin(self, job: str, controller: PlanController, first_step: int) -> None:
        self.job, self.requested, self.resumed, self.forced, self.last_try = job, None, False, None, 0.0
        self.last_error = ""

    def request(self) -> None:
        self.requested = time.monotonic()
        self.poll()

    def poll(self) -> None:
        """Resume the job (retried until the daemon knows it); after force_after s without a pushed plan,
        ask for one. Never blocks the loop for long: the API answers in milliseconds."""
        now = time.monotonic()
        if self.requested is None or self.forced is not None or now - self.last_try < 0.1:
            return
        self.last_try = now
        try:
            if not self.resumed:
                self.api(op="resume", job=self.job)
                self.resumed = True
            elif now - self.requested >= self.force_after:
                if self._last_plan() is None:
                    self.forced = self.api(op="plan", job=self.job, dry_run=False)
                else:
                    self.forced = {}
        except Exception as exc:  # never raise here (see above)
            self.last_error = _report_once(f"daemon request failed, will retry: {exc}", self.last_error)

    def _last_plan(self) -> dict | None:
        return self.api(op="status")["state"]["jobs"][self.job]["last_plan"]

    def end(self) -> dict:
        try:
            self.api(op="pause", job=self.job)
            last = self._last_plan()
        except (DaemonUnavailable, OSError, RuntimeError, KeyError) as exc:
            return {"planner": "daemon", "plan_note": f"status unavailable: {exc}"}
        if last is None:
            return {"planner": "daemon", "plan_note": "no plan published"}
        how = "api request" if self.forced else "automatic"
        return {"planner": f"daemon ({how})", "plan_version": last.get("version"),
                "plan_state": last.get("state"), "plan_reason": last.get("reason"),
                "plan_moves": last.get("moves"),
                "predicted_balancedness": f"{last.get('balancedness_before', {}).get('mean')} -> "
                                          f"{last.get('balancedness_after', {}).get('mean')}"}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _daemon_config(runtime: Path, state: Path, expert_bytes: int, threshold: float, tolerance: float) -> str:
    with socket.socket() as s:  # the daemon's Prometheus endpoint must not collide with anything
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"""\
runtime_dir = "{runtime}"
state_dir = "{state}"
poll_interval_s = 0.05

[detect]
threshold = {threshold}
clear_threshold = {min(threshold, 1.1)}
sustain = 2
min_tokens = 1000
cooldown_s = 3600.0

[window]
intervals = 4

[planner]
tolerance = {tolerance}

[policy]
kind = "placement"
mode = "paused"
expert_bytes = {expert_bytes}
migration_bandwidth_gbps = 100.0
ack_timeout_s = 300.0

[metrics]
prometheus_address = "127.0.0.1:{port}"
"""


class InProcessPlanner:
    """balancerd.planner.plan on rank 0 from the all-reduced counts of the static phase (rank 0's ring),
    written into the job's control block: what the daemon would do, without the process."""

    name = "in-process"

    def __init__(self, runtime: Path, why: str, tolerance: float):
        self.runtime, self.why, self.tolerance = runtime, why, tolerance

    def begin(self, job: str, controller: PlanController, first_step: int) -> None:
        pl = controller.placement
        self.controller, self.first_step, self.summary, self.wanted, self.last_error = (
            controller, first_step, {}, False, "")
        self.writer = ControlWriter.create(self.runtime, job, pl.layers, pl.experts, pl.slots, pl.world,
                                           controller.generation)
        self.reader = TelemetryReader.open(ring_path(self.runtime, job, 0))
        self.records = []

    def request(self) -> None:
        self.wanted = True
        self.poll()

    def poll(self) -> None:
        """Plan from the static phase's records once there are any, and publish (once)."""
        if not self.wanted or self.summary:
            return
        try:
            pl = self.controller.placement
            self.records += [r for r in self.reader.poll() if r.first_step >= self.first_step]
            if not self.records:
                return
            loads = sum(r.global_routed.astype(np.float64) for r in self.records)
            result = plan(loads, Topology(gpus=pl.world, slots=pl.slots), current=pl.host,
                          tolerance=self.tolerance)
            self.writer.publish(ControlPlan(version=1, generation=self.controller.generation,
                                            phys_to_log=result.phys_to_log))
            self.summary = {"plan_moves": int(result.moves.sum()),
                            "predicted_balancedness": f"{result.balancedness_before.mean():.3f} -> "
                                                      f"{result.balancedness_after.mean():.3f}"}
        except Exception as exc:  # never raise here (see above)
            self.last_error = _report_once(f"in-process planning failed, will retry: {exc}", self.last_error)

    def end(self) -> dict:
        self.writer.close()
        self.reader.close()
        return {"planner": "in-process", "plan_note": self.why, **self.summary}

    def close(self) -> None:
        pass


def _report_once(message: str, last: str) -> str:
    if message != last:
        print(message, file=sys.stderr, flush=True)
    return message


def start_planner(kind: str, runtime: Path, work: Path, expert_bytes: int, args: argparse.Namespace):
    if kind == "inprocess":
        return InProcessPlanner(runtime, "--planner inprocess", args.planner_tolerance)
    try:
        return DaemonPlanner(runtime, work, expert_bytes, args)
    except (OSError, RuntimeError) as exc:
        if kind == "daemon":
            raise
        print(f"falling back to the in-process planner: {exc}", file=sys.stderr, flush=True)
        return InProcessPlanner(runtime, f"daemon did not start: {exc}"[:200], args.planner_tolerance)


# ---------------------------------------------------------------------------------------------------
# One case


def model_config(args: argparse.Namespace) -> MoEConfig:
    if args.tiny:
        return MoEConfig.preset("qwen3-235b-a22b", layers=args.layers, hidden=64, intermediate=32, experts=16,
                                top_k=4)
    return MoEConfig.preset("qwen3-235b-a22b", layers=args.layers)


def ring_window(runtime: Path, job: str, world: int, first: int, last: int) -> tuple[np.ndarray, dict] | None:
    """From the ranks' rings, the publish intervals inside [first, last]: [L, G] assignments each rank's
    slots processed, and per phase (dispatch, expert, combine) the ms a step spends in it over all
    layers, per rank [G] (means of the timed steps; dispatch includes the wait for the slowest rank)."""
    loads, phases = [], {"dispatch": [], "expert": [], "combine": []}
    for rank in range(world):
        reader = TelemetryReader.open(ring_path(runtime, job, rank))
        recs = [r for r in reader.poll() if r.first_step >= first and r.last_step <= last]
        reader.close()
        if not recs:
            return None
        loads.append(sum(r.received.sum(axis=1).astype(np.float64) for r in recs))
        for phase, per_rank in phases.items():
            per_rank.append(float(np.mean([getattr(r, f"{phase}_us").sum() for r in recs])) / 1e3)
    return np.stack(loads, axis=1), {phase: np.array(v) for phase, v in phases.items()}


def load_ratios(window: tuple[np.ndarray, dict] | None) -> tuple[float, float]:
    """(GPU max/min, max/mean), each the mean over layers."""
    if window is None:
        return float("nan"), float("nan")
    loads = window[0]
    return float(imbalance_ratio(loads).mean()), float(balancedness(loads).mean())


def phase_columns(window: tuple[np.ndarray, dict] | None, when: str) -> dict:
    """Per phase the slowest and the fastest rank's ms a step, e.g. expert_ms_max_before."""
    if window is None:
        return {}
    return {f"{phase}_ms_{how}_{when}": float(fn(ms)) for phase, ms in window[1].items()
            for how, fn in (("max", np.max), ("min", np.min))}


def give_up(group: EPGroup, rank0_says: bool) -> bool:
    """Rank 0's wall-clock verdict, broadcast so every rank leaves the loop at the same step."""
    flag = torch.tensor([int(rank0_says)], device=group.device)
    dist.broadcast(flag, 0)
    return bool(flag.item())


@dataclass
class Trace:
    """What one serving run did, step by step (the same phases and step count on every rank)."""

    seconds: list[float] = field(default_factory=list)   # this rank's time per step
    phases: list[str] = field(default_factory=list)      # warmup | static | waiting | migration | rebalanced
    applied_at: int | None = None                        # the step at which the last layer switched
    failure: str = ""
    max_rel_err: float = 0.0
    reference_checks: int = 0


def serve(group: EPGroup, args: argparse.Namespace, stack: EPMoEStack, controller: PlanController, planner,
          inputs: list[torch.Tensor], weights: list) -> Trace:
    """Warm-up, static phase, plan request, waiting, migration, rebalanced phase; every step timed."""
    cfg, placement, device = stack.layers[0].cfg, controller.placement, group.device
    static_end = args.warmup + args.static_steps
    trace, check_next, requested, step = Trace(), False, 0.0, 0
    tokens = inputs[0].shape[0]
    config = stack.layers[0].dispatch_config
    micro = f"{config.micro_batches}{'i' * config.interleave}"
    profiled = {when: Profiler(group, args.out / f"profile-t{tokens}-m{micro}-{when}")
                for when in ("static", "rebalanced")} if args.profile_steps else {}
    rebalanced_profile = None  # the steps [first, last) profiled after the switch
    while True:
        if profiled and step == static_end - args.profile_steps:
            profiled["static"].start()
        if profiled and step == static_end:
            profiled["static"].stop()
        if profiled and rebalanced_profile and step == rebalanced_profile[0]:
            profiled["rebalanced"].start()
        if profiled and rebalanced_profile and step == rebalanced_profile[1]:
            profiled["rebalanced"].stop()
        if step == static_end:
            requested = time.monotonic()
            if planner is not None:
                planner.request()
        elif planner is not None and step > static_end and trace.applied_at is None:
            planner.poll()
        x = inputs[step % len(inputs)]
        migrating, version = controller.migrating, placement.version
        sync(device)
        start = time.perf_counter()
        out = stack(x)
        controller.after_step(step, x.shape[0])
        sync(device)
        trace.seconds.append(time.perf_counter() - start)
        switched = placement.version != version
        if args.reference and step >= args.warmup and (check_next or migrating):
            ref = dense_stack(x, weights, cfg)
            trace.max_rel_err = max(trace.max_rel_err, float((out - ref).abs().max() / ref.abs().max()))
            trace.reference_checks += 1
        check_next = switched or step + 1 == args.warmup  # the first static step, the one after a switch
        if step < args.warmup:
            trace.phases.append("warmup")
        elif step < static_end:
            trace.phases.append("static")
        elif trace.applied_at is not None:
            trace.phases.append("rebalanced")
        else:
            trace.phases.append("migration" if migrating or controller.migrating or switched else "waiting")
        if trace.applied_at is None and switched:
            trace.applied_at = step
            settle = PROFILE_SETTLE_STEPS
            rebalanced_profile = (step + 1 + settle, step + 1 + settle + args.profile_steps)
        step += 1
        if trace.applied_at is not None:
            if step > trace.applied_at + args.rebalanced_steps:
                return trace
        elif step > static_end and not controller.migrating:
            if controller.status.result == PlanResult.REJECTED:  # the same verdict on every rank
                trace.failure = f"plan rejected: {controller.status.reason.name} {controller.status.detail}"
                return trace
            if give_up(group, time.monotonic() - requested > args.max_wait):
                trace.failure = f"no plan applied within {args.max_wait:g} s after the static phase"
                return trace


def run_case(group: EPGroup, args: argparse.Namespace, tokens: int, micro: str, planner,
             runtime: Path, steps_out: list[dict]) -> dict:
    cfg, dtype, device = model_config(args), DTYPES[args.dtype], group.device
    k = cfg.experts // group.world + args.extra_slots
    job = f"loop-w{group.world}-t{tokens}-m{micro}"
    skew = zipf_router_bias(cfg.layers, cfg.experts, args.skew, args.seed + 1)
    placement = RuntimePlacement.initial(cfg.layers, cfg.experts, group.world, k, device)
    counters = Counters(cfg.layers, cfg.experts, k, device)
    dispatch = DispatchConfig(args.dispatch, micro_batches=int(micro.rstrip("i")),
                              interleave=micro.endswith("i"))
    stack = EPMoEStack(cfg, group, placement, dispatch=dispatch, counters=counters, dtype=dtype)
    weights = load_layers(stack, lambda i: device_weights(cfg, i, args.seed, device, dtype, skew[i]),
                          keep=args.reference)
    telemetry = TelemetryConfig(job=job, interval_steps=args.interval, ring_capacity=256,
                                directory=str(runtime))
    controller = PlanController(stack, placement, group, counters, telemetry=telemetry,
                                config=ControllerConfig(layers_per_step=args.layers_per_step,
                                                        reopen_steps=args.interval))
    if planner is not None:
        planner.begin(job, controller, args.warmup)
    gen = torch.Generator(device=device).manual_seed(args.seed * 7919 + group.rank)
    inputs = [torch.randn(tokens, cfg.hidden, generator=gen, device=device, dtype=dtype) for _ in range(8)]
    try:
        with torch.no_grad():
            trace = serve(group, args, stack, controller, planner, inputs, weights)
    finally:
        controller.close()
    step_ms = [t * 1e3 for t in max_over_ranks(trace.seconds, group)]  # the slowest rank sets each step
    migrated = sum_over_ranks(controller.migrated_bytes, group)
    err = max_over_ranks([trace.max_rel_err], group)[0]
    dist.barrier()  # every ring is flushed and closed
    steps_out.extend({"world": group.world, "tokens": tokens, "micro_batches": micro, "step": i,
                      "phase": p, "ms": round(ms, 4)}
                     for i, (p, ms) in enumerate(zip(trace.phases, step_ms, strict=True)))
    by_phase = {p: [ms for ms, q in zip(step_ms, trace.phases, strict=True) if q == p]
                for p in ("static", "waiting", "migration", "rebalanced")}
    static = statistics.median(by_phase["static"])
    row = {"slots_per_rank": k, "static_ms": static, "static_tok_s": tokens * group.world / static * 1e3,
           "waiting_steps": len(by_phase["waiting"]), "migration_steps": len(by_phase["migration"])}
    if planner is not None:
        row.update(planner.end())
    if trace.applied_at is None:
        return {**row, "error": trace.failure}
    rebalanced = statistics.median(by_phase["rebalanced"])
    worst = max(by_phase["migration"])
    static_end = args.warmup + args.static_steps
    window_before = ring_window(runtime, job, group.world, args.warmup, static_end - 1)
    window_after = ring_window(runtime, job, group.world, trace.applied_at + 1, len(step_ms))
    before, after = load_ratios(window_before), load_ratios(window_after)
    row.update({
        "rebalanced_ms": rebalanced, "rebalanced_tok_s": tokens * group.world / rebalanced * 1e3,
        "speedup": static / rebalanced, "speedup_ge_1.3": static / rebalanced >= 1.3,
        "migration_max_ms": worst, "migration_max_over_median": worst / static,
        "migration_max_over_rebalanced_median": worst / rebalanced,
        "steps_over_2x": sum(ms > 2 * static for ms in by_phase["migration"]),
        "waiting_max_ms": max(by_phase["waiting"], default=0.0), "migrated_MB": migrated / 1e6,
        "gpu_max_min_before": before[0], "gpu_max_min_after": after[0],
        "balancedness_before": before[1], "balancedness_after": after[1],
        **phase_columns(window_before, "before"), **phase_columns(window_after, "after"),
    })
    if args.reference:
        row["max_rel_err"], row["reference_checks"] = err, trace.reference_checks
    return row


# ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=default_out(), help="results directory ($OUT, else ./out)")
    p.add_argument("--device", choices=("cuda", "cpu"),
                   default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda: NCCL, one GPU a rank; cpu: gloo")
    p.add_argument("--tiny", action="store_true",
                   help="small model, float32, reference checks, short phases (CPU check)")
    p.add_argument("--tokens", default="8192,2048,256", help="tokens per rank, one case each")
    p.add_argument("--layers", type=int, default=8, help="MoE layers (Qwen3-235B has 94)")
    p.add_argument("--extra-slots", type=int, default=2, help="slots per rank beyond experts / world")
    p.add_argument("--skew", type=float, default=1.1, help="Zipf exponent of the router bias")
    p.add_argument("--dispatch", choices=("exact", "capacity"), default="exact",
                   help="exact: variable all-to-all (one sync a layer); capacity: padded, no sync")
    p.add_argument("--micro-batches", default="1",
                   help="DispatchConfig.micro_batches, comma-separated: one case per tokens x value "
                        "(2+: all-to-alls pipelined with the experts in each layer; with a trailing i, "
                        "e.g. 2i, the ranges interleaved through the stack: DispatchConfig.interleave)")
    add_copy_engine_option(p)
    p.add_argument("--nccl-high-priority", action="store_true",
                   help="NCCL on high-priority streams (its all-to-alls ahead of the pipelined experts)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="weights and activations")
    p.add_argument("--warmup", type=int, default=16, help="steps")
    p.add_argument("--static-steps", type=int, default=64, help="timed steps on the initial placement")
    p.add_argument("--rebalanced-steps", type=int, default=64, help="timed steps after the switch")
    p.add_argument("--max-wait", type=float, default=60.0,
                   help="seconds after the static phase within which a plan must have been applied")
    p.add_argument("--interval", type=int, default=16, help="telemetry publish interval, steps")
    p.add_argument("--layers-per-step", type=int, default=1, help="layers migrated per step")
    p.add_argument("--planner", choices=("auto", "daemon", "inprocess"), default="auto",
                   help="auto: the daemon, or the in-process planner when the daemon does not start")
    p.add_argument("--threshold", type=float, default=1.2, help="daemon detect.threshold (GPU max/min)")
    p.add_argument("--planner-tolerance", type=float, default=PlannerConfig.tolerance,
                   help="planner.tolerance: leave a layer whose peak is within this of the best achievable "
                        "(smaller: better balance, more moves)")
    p.add_argument("--force-after", type=float, default=5.0,
                   help="seconds after resuming before rank 0 asks the daemon for a plan itself")
    p.add_argument("--reference", action="store_true",
                   help="check against the dense reference (on in --tiny)")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="profile this many static steps (the last ones) and rebalanced steps (after "
                        f"{PROFILE_SETTLE_STEPS} more): "
                        "DIR/profile-tTOKENS-mMICRO-static|rebalanced-rankR.txt and .json")
    p.add_argument("--seed", type=int, default=0, help="weights, skew and inputs")
    p.add_argument("--timeout", type=float, default=300, help="collective timeout, seconds")
    if p.parse_args(argv).tiny:  # --tiny changes the defaults; explicit options still win
        p.set_defaults(tokens="64", layers=4, dtype="fp32", reference=True, warmup=8, static_steps=32,
                       rebalanced_steps=32, interval=4)
    args = p.parse_args(argv)
    if args.profile_steps and (args.profile_steps > args.static_steps
                               or PROFILE_SETTLE_STEPS + args.profile_steps >= args.rebalanced_steps):
        p.error(f"--profile-steps must fit in --static-steps and, after {PROFILE_SETTLE_STEPS} steps, "
                "in --rebalanced-steps")
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.micro_batches = args.micro_batches.split(",")
    if not all(re.fullmatch(r"[1-9][0-9]*i?", m) for m in args.micro_batches):
        p.error(f"--micro-batches: every value must be a count >= 1, with an optional trailing i, "
                f"got {','.join(args.micro_batches)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    group = init_distributed(args.device, args.timeout, nccl_high_priority=args.nccl_high_priority,
                             copy_engine_gb=args.copy_engine_gb)
    cfg, planner, work = model_config(args), None, None
    if group.rank == 0:  # a SIGTERM (timeout, torchrun) still stops the daemon through the finally below
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        work = Path(tempfile.mkdtemp(prefix="balancerd-loop-"))
    try:
        setup = [str(work), ""]  # the runtime directory and rank 0's planner error, for every rank
        if group.rank == 0:
            (work / "run").mkdir(mode=0o770)
            expert_bytes = 3 * cfg.hidden * cfg.intermediate * DTYPES[args.dtype].itemsize
            try:
                planner = start_planner(args.planner, work / "run", work, expert_bytes, args)
            except (OSError, RuntimeError) as exc:
                setup[1] = f"no planner: {exc}"
        dist.broadcast_object_list(setup, src=0)
        if setup[1]:
            log(group, setup[1])
            return 1
        runtime = Path(setup[0]) / "run"
        log(group, f"loop_gpu: world {group.world} on {group.device.type}, {cfg.layers} layers of "
                   f"{cfg.name} (hidden {cfg.hidden}, {cfg.experts} experts), skew {args.skew}, "
                   f"{args.dispatch} dispatch, "
                   f"planner {planner.name if planner else ''}, out {args.out}")
        results = Results(args.out, "loop", COLUMNS, group.rank == 0)
        transport = "copy engines" if group.copy_engine is not None and args.dispatch == "exact" else "nccl"
        steps: list[dict] = []
        for tokens, micro in [(t, m) for t in args.tokens for m in args.micro_batches]:
            log(group, f"== {tokens} tokens per rank, {micro} micro-batch(es)")
            started = time.perf_counter()
            key = {"world": group.world, "tokens": tokens, "micro_batches": micro, "transport": transport,
                   "layers": cfg.layers}
            record(results, group, key, lambda tokens=tokens, micro=micro: run_case(
                group, args, tokens, micro, planner, runtime, steps))
            if group.rank == 0:
                write_steps(args.out / "steps.csv", steps)
                if isinstance(planner, DaemonPlanner):
                    shutil.copy(planner.log_path, args.out / "daemon.log")
            if group.device.type == "cuda":
                torch.cuda.empty_cache()
            log(group, f"   {time.perf_counter() - started:.1f} s")
        log(group, f"\n{results.markdown()}")
    finally:
        if planner is not None:
            planner.close()
            if isinstance(planner, DaemonPlanner):
                args.out.mkdir(parents=True, exist_ok=True)
                shutil.copy(planner.log_path, args.out / "daemon.log")
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        if group.copy_engine is not None:
            group.copy_engine.destroy()
        dist.destroy_process_group()
    return 0


def write_steps(path: Path, steps: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["world", "tokens", "micro_batches", "step", "phase", "ms"])
        writer.writeheader()
        writer.writerows(steps)


if __name__ == "__main__":
    sys.exit(main())
