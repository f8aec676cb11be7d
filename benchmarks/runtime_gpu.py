"""moe_runtime on the GPUs: EP equals the dense reference over NCCL, host syncs, telemetry overhead.

Launch one process per GPU from the repository root:

    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node 4 benchmarks/runtime_gpu.py --out out/runtime
    torchrun --standalone --nproc-per-node 2 benchmarks/runtime_gpu.py --device cpu --tiny   # gloo, CPU

Sections (--sections, default all):

* equivalence: EPMoEStack against moe_runtime.reference.dense_stack (each rank computes the reference
  over every rank's tokens with the same weights) for both routings (Qwen3 softmax, DeepSeek-V3
  sigmoid_grouped with groups), both dispatch modes, each whole, pipelined in two micro-batches
  (NCCL's stream beside the compute stream) and in two ranges interleaved through the stack (a
  stream each), and a random placement with replicas (S > E), float32.
  Reports the max relative error, the same on every rank (all-reduced).
* sync: host syncs per forward counted with torch.cuda.set_sync_debug_mode("warn") (capacity mode:
  0 expected; exact mode: one per layer, for the split sizes; the same pipelined; one per layer and
  range interleaved), and the capacity-mode forward run under set_sync_debug_mode("error"). CUDA only.
* overhead: step time with counters + telemetry (a PlanController publishing every 16 steps into a
  temp runtime dir) on against off (counters=None, no controller), same stack, on/off segments
  interleaved in ABBA order to cancel drift; Qwen3-235B and DeepSeek-V3 shapes with the layers
  reduced, bf16, 64 and 4096 tokens per rank; eager exact dispatch, and (--overhead-dispatch graph)
  capacity dispatch replayed from one CUDA graph per mode. Each segment starts with a barrier and is
  timed whole (the max over ranks of its wall time); the overhead is the mean over adjacent on/off
  segment pairs of their difference in mean step, with a 95% confidence interval from the spread of
  those differences. Per-step times (the max over ranks) give the median and the publish columns.

Results: DIR/<section>.csv, .json and .md (rewritten after every row, so a failure keeps the rows
before it), DIR defaulting to $OUT, else ./out. Timing: synchronize before every host clock read,
warm-up first. benchmarks/README.md explains every column.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from datetime import timedelta
from functools import partial
from pathlib import Path
from unittest import mock

if not __package__:  # run as a file: the repo root must come first (benchmarks/kernels.py is no package)
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.profiler import record_function  # noqa: E402

from moe_runtime import (  # noqa: E402
    Counters,
    DispatchConfig,
    EPGroup,
    EPMoEStack,
    LogicalWeights,
    MoEConfig,
    RuntimePlacement,
    dense_stack,
    ep_group,
)
from moe_runtime.bench_ep import capture  # noqa: E402
from moe_runtime.controller import PlanController  # noqa: E402
from moe_runtime.synthetic import device_weights, load_layers  # noqa: E402
from moe_runtime.telemetry import WRITE_FROM, TelemetryConfig  # noqa: E402

MODELS = ("qwen3-235b-a22b", "deepseek-v3")
SECTIONS = ("equivalence", "sync", "overhead")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# ---------------------------------------------------------------------------------------------------
# Shared with benchmarks/loop_gpu.py


def default_out() -> Path:
    return Path(os.environ.get("OUT") or "out")


def pin_to_cpus(local_rank: int, local_world: int) -> list[int]:
    """Bind this process to its own contiguous share of the CPUs it may run on (rank r: share r), as
    serving engines do per GPU: unpinned, launch-bound ranks share and trade cores, and eager steps
    swing between regimes up to 1.5x apart. Returns the CPUs bound (all of them if too few to share)."""
    cpus = sorted(os.sched_getaffinity(0))
    share = len(cpus) // max(local_world, 1)
    if share < 1:
        return cpus
    mine = cpus[local_rank * share:(local_rank + 1) * share]
    os.sched_setaffinity(0, mine)
    return mine


def add_copy_engine_option(p: argparse.ArgumentParser) -> None:
    """--copy-engine-gb, for init_distributed's copy_engine_gb."""
    p.add_argument("--copy-engine-gb", type=float, default=0.0,
                   help="exact dispatch by copy engines through a symmetric workspace of this many GB a rank "
                        "(CUDA; 0: NCCL)")


def init_distributed(device: str, timeout_s: float, pin_cpus: bool = True,
                     nccl_high_priority: bool = False, copy_engine_gb: float = 0.0) -> EPGroup:
    """One process per rank from torchrun's environment (or a world of one without it): NCCL on the
    local GPU, gloo on CPU. With `pin_cpus`, a CUDA rank is bound to its share of the CPUs
    (`pin_to_cpus`); with `nccl_high_priority`, NCCL's streams get the GPU's high priority, so its
    blocks are scheduled ahead of the compute stream's when both have work. Returns the world as the
    EP group; with `copy_engine_gb` > 0 its exact dispatch moves rows by the copy engines, through a
    symmetric workspace of that many GB a rank (CUDA)."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517")):
        os.environ.setdefault(key, value)
    timeout = timedelta(seconds=timeout_s)
    if device == "cuda":
        if pin_cpus:
            pin_to_cpus(int(os.environ["LOCAL_RANK"]), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        local = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(local)
        options = dist.ProcessGroupNCCL.Options()
        options.is_high_priority_stream = nccl_high_priority
        dist.init_process_group("nccl", timeout=timeout, device_id=local, pg_options=options)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
        dist.init_process_group("gloo", timeout=timeout)
    return ep_group(copy_engine_bytes=int(copy_engine_gb * 2**30))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def log(group: EPGroup, *parts: object) -> None:
    if group.rank == 0:
        print(*parts, flush=True)


def max_over_ranks(values: list[float], group: EPGroup) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=group.device)
    if group.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def sum_over_ranks(value: int, group: EPGroup) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=group.device)
    if group.world > 1:
        dist.all_reduce(t)
    return int(t.item())


class Results:
    """Rows of one table, rewritten to DIR/NAME.csv, .json and .md after every row (rank 0 writes)."""

    def __init__(self, out: Path, name: str, columns: list[str], enabled: bool):
        self.out, self.name, self.columns, self.enabled = out, name, columns, enabled
        self.rows: list[dict] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        with open(self.out / f"{self.name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, keys)
            writer.writeheader()
            writer.writerows(self.rows)
        (self.out / f"{self.name}.json").write_text(json.dumps(self.rows, indent=1, default=str))
        (self.out / f"{self.name}.md").write_text(self.markdown() + "\n")

    def markdown(self) -> str:
        cols = [c for c in self.columns if any(c in r for r in self.rows)] + ["error"]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.rows:
            lines.append("| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |")
        return "\n".join(lines)


def _cell(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e5 else f"{v:.4g}"
    return str(v)


def record(results: Results, group: EPGroup, key: dict, body: Callable[[], dict]) -> None:
    """Run one case; an exception becomes the row's error and the next case still runs. A case may also
    return its own "error" beside partial results."""
    try:
        row = {**key, **body()}
        row.setdefault("error", "")
    except Exception as exc:  # one failing case must not lose the other rows
        print(f"[rank {group.rank}] case {key} failed:\n{traceback.format_exc()}", file=sys.stderr,
              flush=True)
        row = {**key, "error": f"{type(exc).__name__}: {exc}"[:300]}
        if group.device.type == "cuda":
            torch.cuda.empty_cache()
    results.add(row)
    log(group, "  " + ", ".join(f"{k}={_cell(v)}" for k, v in row.items() if v != ""))


# ---------------------------------------------------------------------------------------------------
# Sections


def small_config(model: str, layers: int = 2) -> MoEConfig:
    """The moderate float32 shape of the equivalence and sync sections, each preset's routing."""
    return MoEConfig.preset(model, layers=layers, hidden=256, intermediate=128, experts=32, top_k=8)


def random_placement(cfg: MoEConfig, world: int, slots_per_rank: int, seed: int) -> np.ndarray:
    """[L, S]: every expert once plus random replicas, shuffled (the same on every rank)."""
    rng = np.random.default_rng(seed)
    extra = world * slots_per_rank - cfg.experts
    rows = [np.concatenate([np.arange(cfg.experts), rng.integers(0, cfg.experts, extra)])
            for _ in range(cfg.layers)]
    return np.stack([rng.permutation(row) for row in rows]).astype(np.int32)


def _to(w: LogicalWeights, device: torch.device) -> LogicalWeights:
    return dataclasses.replace(w, **{f.name: getattr(w, f.name).to(device) for f in dataclasses.fields(w)
                                     if getattr(w, f.name) is not None})


# The equivalence and sync sections' dispatch configurations, by the name their rows carry.
DISPATCH = {
    "exact": DispatchConfig("exact"),
    "capacity": DispatchConfig("capacity"),
    "exact-pipelined": DispatchConfig("exact", micro_batches=2),
    "capacity-pipelined": DispatchConfig("capacity", micro_batches=2),
    "exact-interleaved": DispatchConfig("exact", micro_batches=2, interleave=True),
    "capacity-interleaved": DispatchConfig("capacity", micro_batches=2, interleave=True),
}


def random_stack(group: EPGroup, model: str, mode: str,
                 seed: int) -> tuple[MoEConfig, RuntimePlacement, EPMoEStack, list[LogicalWeights]]:
    """The small ``model`` over a random placement with replicas (2 slots per rank beyond E / world),
    counters on, random float32 weights loaded."""
    cfg = small_config(model)
    k = cfg.experts // group.world + 2
    placement = RuntimePlacement(random_placement(cfg, group.world, k, seed), cfg.experts, k, group.device)
    counters = Counters(cfg.layers, cfg.experts, k, group.device)
    stack = EPMoEStack(cfg, group, placement, dispatch=DISPATCH[mode], counters=counters)
    weights = [_to(LogicalWeights.random(cfg, layer, seed), group.device) for layer in range(cfg.layers)]
    stack.load_weights(weights)
    return cfg, placement, stack, weights


def equivalence_case(group: EPGroup, model: str, mode: str, tokens: int, seed: int) -> dict:
    cfg, placement, stack, weights = random_stack(group, model, mode, seed)
    gen = torch.Generator().manual_seed(seed)
    x_all = torch.randn(group.world * tokens, cfg.hidden, generator=gen).to(group.device)
    mine = slice(group.rank * tokens, (group.rank + 1) * tokens)
    with torch.no_grad():
        out = stack(x_all[mine])
        ref = dense_stack(x_all, weights, cfg)[mine]
    err = float((out - ref).abs().max() / ref.abs().max())
    err = max_over_ranks([err], group)[0]
    return {"slots": placement.slots, "replicas_max": int(placement.replicas.max()), "max_rel_err": err,
            "ok": err < 1e-4}


def count_syncs(fn: Callable[[], object]) -> int:
    """Host syncs fn() makes: those set_sync_debug_mode("warn") reports, and waits on CUDA events
    (which it does not report)."""
    always = torch.is_warn_always_enabled()
    event_waits = 0
    wait = torch.cuda.Event.synchronize

    def counted_wait(event: torch.cuda.Event) -> None:
        nonlocal event_waits
        event_waits += 1
        wait(event)

    with warnings.catch_warnings(record=True) as caught, mock.patch.object(torch.cuda.Event, "synchronize",
                                                                           counted_wait):
        warnings.simplefilter("always")
        torch.set_warn_always(True)  # a warning torch raises only once would hide repeated syncs
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            torch.set_warn_always(always)
    return event_waits + sum("called a synchronizing" in str(w.message) for w in caught)


def sync_case(group: EPGroup, model: str, mode: str, tokens: int, seed: int) -> dict:
    cfg, _, stack, _ = random_stack(group, model, mode, seed)
    x = torch.randn(tokens, cfg.hidden, device=group.device)
    with torch.no_grad():
        for _ in range(3):  # warm-up: allocator, NCCL communicators, Triton compilation
            stack(x)
        sync(group.device)
        syncs = count_syncs(lambda: stack(x))
        # Decide on the error-mode run together, so no rank raises while the others are in a collective.
        most = int(max_over_ranks([syncs], group)[0])
        config = DISPATCH[mode]
        capacity = config.mode == "capacity"
        expected = 0 if capacity else cfg.layers * (config.micro_batches if config.interleave else 1)
        row = {"layers": cfg.layers, "syncs_per_forward": most, "expected": expected}
        if capacity and most == 0:
            torch.cuda.set_sync_debug_mode("error")
            try:
                stack(x)
                row["error_mode"] = "ran clean"
            except RuntimeError as exc:
                row["error_mode"] = f"raised: {str(exc)[:120]}"
            finally:
                torch.cuda.set_sync_debug_mode("default")
            sync(group.device)
    row["ok"] = most == expected and row.get("error_mode", "ran clean") == "ran clean"
    return row


OVERHEAD_DISPATCH = ("exact", "graph")


def overhead_case(group: EPGroup, model: str, tokens: int, how: str, args: argparse.Namespace) -> dict:
    """Step time with counters + PlanController publishing (on) against counters=None (off).

    how "exact": eager forward, exact dispatch. "graph": capacity dispatch, one CUDA graph per mode
    replayed each step (how engines run decode); the publisher runs outside the graph, as it would.
    """
    layers = args.overhead_layers
    cfg = small_config(model, layers) if args.tiny else MoEConfig.preset(model, layers=layers)
    dtype = DTYPES[args.dtype]
    graphed = how == "graph"
    if graphed and group.device.type != "cuda":
        return {"error": "skipped: CUDA graphs need CUDA"}
    k = cfg.experts // group.world + args.extra_slots
    placement = RuntimePlacement.initial(cfg.layers, cfg.experts, group.world, k, group.device)
    counters = Counters(cfg.layers, cfg.experts, k, group.device)
    stack = EPMoEStack(cfg, group, placement, dispatch=DispatchConfig("capacity" if graphed else "exact"),
                       counters=counters, dtype=dtype)
    load_layers(stack, lambda layer: device_weights(cfg, layer, args.seed, group.device, dtype), keep=False)
    gen = torch.Generator(device=group.device).manual_seed(args.seed + group.rank)
    inputs = [torch.randn(tokens, cfg.hidden, generator=gen, device=group.device, dtype=dtype)
              for _ in range(4)]

    def attach(mode: str) -> None:
        for layer in stack.layers:
            layer.counters = counters if mode == "on" and "counters" in args.on_parts else None

    if "controller" not in args.on_parts:
        counters.set_timing(False)  # no publisher samples the timers
    if graphed:
        static = inputs[0].clone()
        graphs = {}
        with torch.no_grad():
            for mode in ("off", "on"):
                attach(mode)
                graphs[mode] = capture(lambda: stack(static), group.device)
        counters.reset()

        def forward(mode: str, i: int) -> None:
            static.copy_(inputs[i % len(inputs)])
            graphs[mode].replay()
    else:
        def forward(mode: str, i: int) -> None:
            stack(inputs[i % len(inputs)])

    seg = args.segment_steps
    with tempfile.TemporaryDirectory(prefix="balancerd-bench-") as runtime:
        telemetry = TelemetryConfig(job=f"ovh{group.rank}", interval_steps=args.interval,
                                    interval_ms=args.interval_ms, timing_every=args.timing_every,
                                    write_from=args.write_from, directory=runtime)
        controller = PlanController(stack, placement, group, counters, telemetry=telemetry)
        times: dict[str, list[float]] = {"off": [], "on": []}   # per step, this rank
        walls: dict[str, list[float]] = {"off": [], "on": []}   # per kept segment, this rank
        on_step = 0

        published: list[bool] = []  # per kept on step: whether it published

        def segment(mode: str, steps: int, keep: bool, marked: bool = False) -> None:
            nonlocal on_step
            if not graphed:
                attach(mode)  # outside the timed steps
            if keep:  # every rank starts the segment together, so its wall time counts a rank's delay once
                if group.world > 1:
                    dist.barrier()
                sync(group.device)
                began = time.perf_counter()
            for i in range(steps):
                sync(group.device)
                start = time.perf_counter()
                with record_function(f"step-{mode}") if marked else nullcontext():  # profiles' step marker
                    forward(mode, i)
                    if mode == "on" and "controller" in args.on_parts:
                        if keep:
                            published.append(controller.publisher.is_publish_step(on_step))
                        controller.after_step(on_step, tokens)
                        on_step += 1
                    elif mode == "on" and keep:
                        published.append(False)
                    sync(group.device)
                if keep:
                    times[mode].append(time.perf_counter() - start)
            if keep:
                walls[mode].append(time.perf_counter() - began)

        try:
            with torch.no_grad():
                for mode in ("on", "off"):
                    segment(mode, args.warmup, keep=False)
                for pair in range(args.segments):
                    for mode in (("off", "on") if pair % 2 == 0 else ("on", "off")):
                        segment(mode, seg, keep=True)
                if args.profile_steps:
                    for mode in ("off", "on"):
                        profile(lambda mode=mode: segment(mode, args.profile_steps, keep=False, marked=True),
                                group, args.out / f"profile-{model}-{how}-{tokens}-{mode}")
        finally:
            controller.close()
    n, segs = len(times["off"]), len(walls["off"])
    step_max = max_over_ranks(times["off"] + times["on"], group)  # the slowest rank sets each step
    steps = {"off": step_max[:n], "on": step_max[n:]}
    wall_max = max_over_ranks(walls["off"] + walls["on"], group)
    # Per segment the mean step from its wall time (publish steps at their share; a max over ranks per
    # step would count a rank's delay twice: in its own step and in the others' wait at the next
    # collective). Segments of a pair are adjacent (ABBA), so their difference cancels drift, and the
    # spread of the differences gives the uncertainty.
    means = {"off": [w / seg for w in wall_max[:segs]], "on": [w / seg for w in wall_max[segs:]]}
    off = statistics.fmean(means["off"])
    diffs = [(a - b) / off for a, b in zip(means["on"], means["off"], strict=True)]
    overhead = statistics.fmean(diffs)
    ci95 = 1.96 * statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("inf")
    target = 0.005
    met = "yes" if overhead + ci95 <= target else "no" if overhead - ci95 > target else "unresolved"
    on_kinds = _publish_positions(published)
    by_kind = {kind: [t for t, kd in zip(steps["on"], on_kinds, strict=True) if kd == kind]
               for kind in ("publish", "after_publish", "plain")}
    kind_ms = {kind: statistics.fmean(t) * 1e3 if t else math.nan for kind, t in by_kind.items()}
    return {"slots_per_rank": k, "steps_per_mode": n, "off_ms": off * 1e3,
            "on_ms": statistics.fmean(means["on"]) * 1e3, "overhead_pct": overhead * 100,
            "ci95_pct": ci95 * 100, "target_met": met,
            "median_step_overhead_pct": (statistics.median(steps["on"]) / statistics.median(steps["off"]) - 1)
            * 100, "publishes": sum(published),
            **{f"on_{kind}_step_ms": ms for kind, ms in kind_ms.items()}}


def _publish_positions(published: list[bool]) -> list[str]:
    """Each on step: a publish step, the step after one, or plain."""
    return ["publish" if p else "after_publish" if i and published[i - 1] else "plain"
            for i, p in enumerate(published)]


class Profiler:
    """torch.profiler between start() and stop(): every rank r then writes PATH-rank{r}.txt (ops by self
    device time, then by host time) and a Chrome trace PATH-rank{r}.json (a slow rank shows up as the
    others' waits)."""

    def __init__(self, group: EPGroup, path: Path):
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if group.device.type == "cuda" else [])
        self.group, self.path = group, path.with_name(f"{path.name}-rank{group.rank}")
        self._prof = torch_profile(activities=activities)

    def start(self) -> None:
        self._prof.start()

    def stop(self) -> None:
        self._prof.stop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        averages = self._prof.key_averages()
        device_key = "self_cuda_time_total" if self.group.device.type == "cuda" else "self_cpu_time_total"
        tables = [averages.table(sort_by=key, row_limit=30) for key in (device_key, "self_cpu_time_total")]
        self.path.with_suffix(".txt").write_text("\n".join(tables))
        self._prof.export_chrome_trace(str(self.path.with_suffix(".json")))


def profile(body: Callable[[], None], group: EPGroup, path: Path) -> None:
    """`Profiler` around body()."""
    profiler = Profiler(group, path)
    profiler.start()
    try:
        body()
    finally:
        profiler.stop()


COLUMNS = {
    "equivalence": ["model", "mode", "world", "slots", "replicas_max", "max_rel_err", "ok"],
    "sync": ["model", "mode", "layers", "syncs_per_forward", "expected", "error_mode", "ok"],
    "overhead": ["model", "dispatch", "layers", "tokens", "slots_per_rank", "steps_per_mode", "off_ms",
                 "on_ms", "overhead_pct", "ci95_pct", "target_met", "median_step_overhead_pct",
                 "on_publish_step_ms", "on_after_publish_step_ms", "on_plain_step_ms"],
}


def cases(section: str, group: EPGroup, args: argparse.Namespace) -> list[tuple[dict, Callable[[], dict]]]:
    """(row key, case) for every case of a section, in order."""
    if section == "equivalence":
        return [({"model": m, "mode": mode, "world": group.world},
                 partial(equivalence_case, group, m, mode, args.eq_tokens, args.seed))
                for m in MODELS for mode in DISPATCH]
    if section == "sync":
        return [({"model": m, "mode": mode}, partial(sync_case, group, m, mode, args.eq_tokens, args.seed))
                for m in MODELS for mode in DISPATCH]
    return [({"model": m, "dispatch": how, "layers": args.overhead_layers, "tokens": t},
             partial(overhead_case, group, m, t, how, args))
            for how in args.overhead_dispatch for m in args.models for t in args.tokens]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=default_out(), help="results directory ($OUT, else ./out)")
    p.add_argument("--device", choices=("cuda", "cpu"),
                   default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda: NCCL, one GPU a rank; cpu: gloo")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--tiny", action="store_true", help="small overhead shapes and few steps (CPU check)")
    p.add_argument("--eq-tokens", type=int, default=128, help="tokens per rank, equivalence and sync")
    p.add_argument("--tokens", default="64,4096", help="tokens per rank, overhead section")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated presets, overhead section")
    p.add_argument("--overhead-dispatch", default="exact",
                   help=f"comma-separated subset of {OVERHEAD_DISPATCH}: exact (eager) and graph (capacity "
                        "dispatch replayed from a CUDA graph), overhead section")
    p.add_argument("--overhead-layers", type=int, default=2, help="MoE layers, overhead section")
    p.add_argument("--extra-slots", type=int, default=2, help="slots per rank beyond experts / world")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="overhead section")
    p.add_argument("--interval", type=int, default=16, help="telemetry publish interval, steps")
    p.add_argument("--timing-every", type=int, default=TelemetryConfig.timing_every,
                   help="time the phases of one step in this many (TelemetryConfig.timing_every)")
    p.add_argument("--write-from", choices=WRITE_FROM, default=TelemetryConfig.write_from,
                   help="where records are written (TelemetryConfig.write_from)")
    p.add_argument("--interval-ms", type=float, default=None,
                   help="publish about this often instead (TelemetryConfig.interval_ms)")
    p.add_argument("--warmup", type=int, default=8, help="warm-up steps per mode")
    p.add_argument("--segments", type=int, default=16, help="timed segments per mode (ABBA order)")
    p.add_argument("--segment-steps", type=int, default=32, help="steps per segment")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="overhead section: after timing, profile this many steps of each mode "
                        "(torch.profiler)")
    p.add_argument("--on-parts", default="counters,controller",
                   help="what 'on' adds, for finding what costs: counters (counting in the forward), "
                        "controller (PlanController.after_step: publishing, plan checks)")
    add_copy_engine_option(p)
    p.add_argument("--seed", type=int, default=0, help="weights, placements and inputs")
    p.add_argument("--timeout", type=float, default=300, help="collective timeout, seconds")
    p.add_argument("--no-pin-cpus", dest="pin_cpus", action="store_false",
                   help="leave CUDA ranks unbound (default: each on its own share of the CPUs)")
    if p.parse_args(argv).tiny:  # --tiny changes the defaults; explicit options still win
        p.set_defaults(tokens="16,64", segments=4, segment_steps=8, warmup=2)
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    if unknown := set(args.sections) - set(SECTIONS):
        p.error(f"unknown section(s) {sorted(unknown)}")
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.models = [m for m in args.models.split(",") if m]
    args.on_parts = {part for part in args.on_parts.split(",") if part}
    if unknown := args.on_parts - {"counters", "controller"}:
        p.error(f"unknown --on-parts {sorted(unknown)}")
    if unknown := set(args.models) - set(MODELS):
        p.error(f"unknown --models {sorted(unknown)}")
    args.overhead_dispatch = [h for h in args.overhead_dispatch.split(",") if h]
    if unknown := set(args.overhead_dispatch) - set(OVERHEAD_DISPATCH):
        p.error(f"unknown --overhead-dispatch {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    group = init_distributed(args.device, args.timeout, args.pin_cpus, copy_engine_gb=args.copy_engine_gb)
    try:
        log(group, f"runtime_gpu: world {group.world} on {group.device.type}, torch {torch.__version__}, "
                   f"out {args.out}")
        tables = []
        for name in args.sections:
            log(group, f"== {name}")
            started = time.perf_counter()
            res = Results(args.out, name, COLUMNS[name], group.rank == 0)
            if name == "sync" and group.device.type != "cuda":
                res.add({"model": "-", "mode": "-", "error": "skipped: set_sync_debug_mode needs CUDA"})
            else:
                for key, case in cases(name, group, args):
                    record(res, group, key, case)
            log(group, f"   {name}: {time.perf_counter() - started:.1f} s")
            tables.append((name, res))
        for name, res in tables:
            log(group, f"\n### {name}\n\n{res.markdown()}")
    finally:
        if group.copy_engine is not None:
            group.copy_engine.destroy()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
