"""EP dispatch + combine against the naive path, and the grouped expert FFN against its alternatives.

Run from the repository root, one process per GPU (NCCL), or on CPU with gloo for a tiny smoke test:

    torchrun --nproc-per-node 4 benchmarks/dispatch_gpu.py --out out/dispatch
    torchrun --nproc-per-node 2 benchmarks/dispatch_gpu.py --out out/dispatch-cpu --device cpu --tiny

Sections (rows go to DIR/rows.rank<r>.jsonl as they are measured, so one failure costs only its own
row; rank 0 then writes DIR/dispatch.csv, DIR/ffn.csv and DIR/summary.md):

* check: on the GPU, capacity mode's dispatch -> experts (Triton, torch._grouped_mm) -> combine runs
  under torch.cuda.set_sync_debug_mode("error") (no host sync), and matches exact mode with the
  loop; the drop policy keeps what the CPU computes from the same inputs.
* dispatch: hidden 7168 bf16, top-8 of 256 experts (64 slots a rank on 4 ranks, one per expert),
  uniformly random distinct experts per token. naive = count exchange with all_to_all_single,
  .tolist(), variable all-to-all of every (token, expert) copy, and back with a weighted sum; ours =
  moe_runtime.dispatch in exact and capacity mode (no drops); with --copy-engine also exact mode
  with its rows moved by the copy engines ("exact-ce", `ep_group(copy_engine_bytes=...)`). Median
  us over iterations (CUDA events, a barrier before each), the slowest rank's median reported. wire
  GB/s: bytes that leave a GPU (both directions) per second; effective GB/s: the bytes the naive
  path moves off the GPU ((token, expert) copies) over this path's time.
* ffn: one GPU per case (the ranks split the cases), DeepSeek-V3 experts (H 7168, I 2048) on 8-40
  local slots, rows each carrying 2 local assignments of 8; run_experts with each backend.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if not __package__:  # run as a file: the repository's packages must come first
    sys.path[0] = str(Path(__file__).resolve().parents[1])
sys.path.append(str(Path(__file__).resolve().parent))  # runtime_gpu as a file, not benchmarks.runtime_gpu
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from runtime_gpu import pin_to_cpus  # noqa: E402

from kernels.expert_ffn import grouped_mm_available  # noqa: E402
from kernels.permute import drop_overflow, row_layout  # noqa: E402
from moe_runtime.config import DispatchConfig  # noqa: E402
from moe_runtime.copy_engine import workspace_bytes  # noqa: E402
from moe_runtime.dispatch import combine, dispatch  # noqa: E402
from moe_runtime.experts import run_experts  # noqa: E402
from moe_runtime.group import EPGroup, ep_group  # noqa: E402

NCCL_BIG_GBPS = 335.0  # 4 GPUs, 256 MiB per peer, shared/ANCHORS.md
NAIVE_US = {64: 182.0, 4096: 1307.0, 16384: 4333.0}  # naive dispatch, 4 H200s, shared/ANCHORS.md
ASSIGNED_PER_ROW = 2  # ffn rows: 8 slot fields, 2 of them local (top-8 over 4 ranks)


@dataclass(frozen=True)
class Shape:
    hidden: int
    experts: int
    top_k: int
    inter: int


DEEPSEEK_V3 = Shape(hidden=7168, experts=256, top_k=8, inter=2048)
TINY = Shape(hidden=64, experts=16, top_k=4, inter=32)


# ---------------------------------------------------------------- timing and output


def now(device: torch.device):
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def elapsed_us(a, b) -> float:
    return a.elapsed_time(b) * 1e3 if isinstance(a, torch.cuda.Event) else (b - a) * 1e6


def time_phases(phases: list[Callable], device: torch.device, iters: int, warmup: int,
                collective: bool) -> list[float]:
    """Median us of each phase; each phase takes the previous one's result; a barrier before each run."""
    samples: list[list[float]] = [[] for _ in phases]
    for i in range(warmup + iters):
        if collective:
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        marks, value = [now(device)], None
        for phase in phases:
            value = phase(value)
            marks.append(now(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            for j in range(len(phases)):
                samples[j].append(elapsed_us(marks[j], marks[j + 1]))
    return [statistics.median(s) for s in samples]


def slowest(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def mean_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


class Sink:
    """Append rows to DIR/rows.rank<r>.jsonl as they come."""

    def __init__(self, out: Path, rank: int):
        self.path = out / f"rows.rank{rank}.jsonl"
        self.path.write_text("")

    def add(self, **row) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def guarded(sink: Sink, section: str, case: dict, fn: Callable[[], dict]) -> None:
    try:
        sink.add(section=section, **case, **fn())
    except Exception as e:  # one failing case must not lose the others
        traceback.print_exc()
        sink.add(section=section, **case, error=f"{type(e).__name__}: {e}"[:300])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- workloads


def routing(tokens: int, shape: Shape, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """phys [T, k] distinct uniformly random experts (slot = expert), weights [T, k] summing to 1."""
    g = torch.Generator(device=device).manual_seed(seed)
    phys = torch.rand(tokens, shape.experts, generator=g, device=device).argsort(dim=1)[:, :shape.top_k]
    weights = torch.rand(tokens, shape.top_k, generator=g, device=device) + 0.1
    return phys, weights / weights.sum(1, keepdim=True)


def experts(slots: int, hidden: int, inter: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 w_gate_up [K, 2I, H] and w_down [K, H, I] with O(1) outputs."""
    gate_up = torch.randn(slots, 2 * inter, hidden, generator=g, device=g.device) / hidden ** 0.5
    down = torch.randn(slots, hidden, inter, generator=g, device=g.device) / inter ** 0.5
    return gate_up.bfloat16(), down.bfloat16()


def scale_rows(recv) -> torch.Tensor:
    """A stand-in expert: each row times its local weights' sum, so the output must be x * sum(weights)."""
    return (recv.x.float() * recv.weights.sum(1, keepdim=True)).to(recv.x.dtype)


def naive_dispatch(x: torch.Tensor, dest: torch.Tensor, group: EPGroup):
    world, k = group.world, dest.shape[1]
    order = torch.argsort(dest.reshape(-1), stable=True)
    send = torch.zeros(world, dtype=torch.int64, device=x.device)
    send.index_add_(0, dest.reshape(-1), torch.ones(dest.numel(), dtype=torch.int64, device=x.device))
    recv = group.all_to_all(send)
    counts = torch.cat([send, recv]).tolist()
    rows = group.all_to_all(x[order // k], counts[world:], counts[:world])
    return rows, order, counts[:world], counts[world:]


def naive_combine(y: torch.Tensor, state, weights: torch.Tensor, group: EPGroup) -> torch.Tensor:
    _, order, send, recv = state
    back = group.all_to_all(y, send, recv)
    out = torch.zeros((weights.shape[0], y.shape[1]), dtype=torch.float32, device=y.device)
    weighted = back.float() * weights.reshape(-1)[order].unsqueeze(1)
    return out.index_add_(0, order // weights.shape[1], weighted)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-30)).item()


def bench_dispatch(group: EPGroup, shape: Shape, tokens: int, method: str, args,
                   copy_engine: EPGroup | None = None) -> dict:
    if method == "exact-ce":  # exact mode with the rows on the copy engines (same world, CE transport)
        group, method = copy_engine, "exact"
    device, world = group.device, group.world
    per_rank = shape.experts // world
    phys, weights = routing(tokens, shape, device, seed=1000 + group.rank)
    x = torch.randn(tokens, shape.hidden, device=device, dtype=torch.bfloat16)
    want = x.float() * weights.sum(1, keepdim=True)
    dest = phys // per_rank
    remote_copies = (dest != group.rank).sum().item()
    graph = None
    if method == "naive":
        phases = [lambda _: naive_dispatch(x, dest, group), lambda s: (s, s[0]),
                  lambda s: naive_combine(s[1], s[0], weights, group)]
        wire_rows = (remote_copies, remote_copies)
        width = shape.hidden
    else:
        config = DispatchConfig(method.removesuffix("-graph"))
        phases = [lambda _: dispatch(x, phys, weights, group, per_rank, config),
                  lambda s: (s, scale_rows(s[0])), lambda s: combine(s[1], s[0][1], group, tokens)]
        on_rank = (dest.unsqueeze(0) == torch.arange(world, device=device).view(world, 1, 1)).any(-1)
        remote_rows = (on_rank.sum() - on_rank[group.rank].sum()).item()
        if config.mode == "capacity":
            remote_rows = (world - 1) * tokens
        wire_rows = (remote_rows, remote_rows)
        width = row_layout(shape.hidden, shape.top_k, x.dtype).width
    if method == "capacity-graph":
        graph, value = capture(phases, device)
        phases = [lambda _: graph.replay()]
    else:
        value = None
        for phase in phases:
            value = phase(value)
    (err,) = slowest([rel_err(value, want)], device)
    times = slowest(time_phases(phases, device, args.iters, args.warmup, collective=True), device)
    d_us, c_us, total = (None, None, times[0]) if graph else (times[0], times[2], times[0] + times[2])
    wire = mean_over_ranks(2 * (wire_rows[0] * width + wire_rows[1] * shape.hidden), device)
    logical = mean_over_ranks(2 * 2 * remote_copies * shape.hidden, device)
    naive = NAIVE_US.get(tokens) if world == 4 and device.type == "cuda" and not args.tiny else None
    return dict(dispatch_us=None if graph else round(d_us, 1), combine_us=None if graph else round(c_us, 1),
                total_us=round(total, 1), wire_GBps=round(wire / total / 1e3, 1),
                effective_GBps=round(logical / total / 1e3, 1),
                vs_anchor_naive_dispatch=None if naive is None else round(naive / total, 2), rel_err=err)


def capture(phases: list[Callable], device: torch.device) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """One CUDA graph of the phases (every rank captures the same collectives); its output tensor."""
    def run() -> torch.Tensor:
        value = None
        for phase in phases:
            value = phase(value)
        return value

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    graph.replay()
    return graph, out


def check_gpu_path(group: EPGroup, shape: Shape, tokens: int) -> dict:
    """Capacity mode with the grouped backends under sync debug 'error', against exact mode with the loop."""
    device, world = group.device, group.world
    per_rank = shape.experts // world
    phys, weights = routing(tokens, shape, device, seed=7 + group.rank)
    x = torch.randn(tokens, shape.hidden, device=device, dtype=torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(99 + group.rank)
    inter = 128  # the check needs real experts, not DeepSeek-sized ones
    w_gate_up, w_down = experts(per_rank, shape.hidden, inter, g)

    def forward(mode: str, backend: str) -> torch.Tensor:
        recv, path = dispatch(x, phys, weights, group, per_rank, DispatchConfig(mode))
        y = run_experts(recv.x, recv.slots, recv.weights, w_gate_up, w_down, recv.slot_sizes, backend=backend)
        return combine(y, path, group, tokens)

    want = forward("exact", "loop")
    out = {}
    backends = (["triton"] if device.type == "cuda" else []) + (
        ["grouped_mm"] if grouped_mm_available(x, shape.hidden, inter) else [])
    for backend in backends:
        try:
            forward("capacity", backend)  # compile outside the sync check
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                got = forward("capacity", backend)
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode(0)
            (out[f"{backend}_rel_err"],) = slowest([rel_err(got, want)], device)
        except Exception as e:  # the same on every rank, so the collectives stay matched
            traceback.print_exc()
            out[f"{backend}_error"] = f"{type(e).__name__}: {e}"[:200]
    capacity = math.ceil(tokens * shape.top_k / shape.experts)  # factor 1: a slot's mean load
    keep, dropped = drop_overflow(phys, weights, capacity)
    keep_cpu, dropped_cpu = drop_overflow(phys.cpu(), weights.cpu(), capacity)
    out["drop_matches_cpu"] = bool(torch.equal(keep.cpu(), keep_cpu)) and dropped.item() == dropped_cpu.item()
    out["dropped"] = dropped.item()
    out["sync_checked"] = device.type == "cuda"  # the capacity forwards above ran under sync debug "error"
    return out


def bench_ffn(device: torch.device, shape: Shape, slots: int, rows_per_slot: int, args) -> list[dict]:
    """run_experts per backend on `slots` local slots with about rows_per_slot assignments each."""
    rows = max(1, slots * rows_per_slot // ASSIGNED_PER_ROW)
    g = torch.Generator(device=device).manual_seed(slots * 7919 + rows_per_slot)
    x = torch.randn(rows, shape.hidden, generator=g, device=device).bfloat16()
    picks = torch.rand(rows, slots, generator=g, device=device).argsort(1)[:, :ASSIGNED_PER_ROW]
    ids = torch.full((rows, shape.top_k), -1, dtype=torch.int32, device=device)
    ids[:, :picks.shape[1]] = picks.int()
    weights = torch.rand(rows, shape.top_k, generator=g, device=device)
    w_gate_up, w_down = experts(slots, shape.hidden, shape.inter, g)
    sizes = torch.bincount(ids[ids >= 0].long(), minlength=slots).tolist()
    assignments = sum(sizes)
    flops = 2 * assignments * shape.hidden * 3 * shape.inter
    weight_bytes = slots * 3 * shape.inter * shape.hidden * 2
    want = run_experts(x, ids, weights, w_gate_up, w_down, sizes, backend="loop")
    backends = [("loop", sizes)]
    if device.type == "cuda":
        backends += [("triton", None), ("triton", sizes)]
    if grouped_mm_available(x, shape.hidden, shape.inter):
        backends += [("grouped_mm", None), ("grouped_mm", sizes)]
    out = []
    for backend, host_sizes in backends:
        case = dict(slots=slots, rows_per_slot=rows_per_slot, assignments=assignments, backend=backend,
                    host_sizes=host_sizes is not None)
        try:
            step = [lambda _, b=backend, s=host_sizes: run_experts(x, ids, weights, w_gate_up, w_down, s,
                                                                   backend=b)]
            got = step[0](None)
            (us,) = time_phases(step, device, args.ffn_iters, args.warmup, collective=False)
            out.append(dict(case, us=round(us, 1), TFLOPs=round(flops / us / 1e6, 1),
                            weight_GBps=round(weight_bytes / us / 1e3, 1), rel_err=rel_err(got, want)))
        except Exception as e:  # one failing backend must not lose the others
            traceback.print_exc()
            out.append(dict(case, error=f"{type(e).__name__}: {e}"[:300]))
    return out


# ---------------------------------------------------------------- report


def report(out: Path, world: int) -> None:
    rows = []
    for r in range(world):
        path = out / f"rows.rank{r}.jsonl"
        if path.exists():
            rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    timed = [r for r in rows if r["section"] == "dispatch" and "total_us" in r and r.get("rank", 0) == 0]
    naive = {r["tokens"]: r for r in timed if r["method"] == "naive"}
    for r in timed:
        if r["method"] != "naive" and r["tokens"] in naive:
            base = naive[r["tokens"]]
            r["x_vs_naive_dispatch"] = round(base["dispatch_us"] / r["total_us"], 2)
            r["x_vs_naive_total"] = round(base["total_us"] / r["total_us"], 2)
    lines = [f"# dispatch_gpu ({world} ranks)", ""]
    for section in ("check", "dispatch", "ffn"):
        picked = [r for r in rows if r["section"] == section and (section == "ffn" or r.get("rank", 0) == 0)]
        if not picked:
            continue
        keys = list(dict.fromkeys(k for r in picked for k in r if k not in ("section", "rank")))
        with (out / f"{section}.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows({k: r.get(k) for k in keys} for r in picked)
        lines += [f"## {section}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        cells = [["" if r.get(k) is None else str(r[k]) for k in keys] for r in picked]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        lines.append("")
    ffn = [r for r in rows if r["section"] == "ffn" and "us" in r]
    if ffn:
        lines += ["## fastest ffn backend by slots and rows per slot", "",
                  "| slots | rows per slot | backend | us |", "|---|---|---|---|"]
        for key in sorted({(r["slots"], r["rows_per_slot"]) for r in ffn}):
            best = min((r for r in ffn if (r["slots"], r["rows_per_slot"]) == key), key=lambda r: r["us"])
            lines.append(f"| {key[0]} | {key[1]} | {best['backend']}{' (host sizes)' * best['host_sizes']} "
                         f"| {best['us']} |")
        lines.append("")
    lines.append(f"NCCL even all-to-all at 256 MiB per peer, 4 GPUs: {NCCL_BIG_GBPS} GB/s; naive dispatch "
                 f"anchors (us): {NAIVE_US}.")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke test)")
    ap.add_argument("--tokens", default="64,256,4096,16384")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--ffn-iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--ffn-slots", default="8,16,32,40")
    ap.add_argument("--ffn-rows", default="8,32,128,512,2048", help="assignments per slot")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: check,dispatch,ffn")
    ap.add_argument("--copy-engine", action="store_true",
                    help="also time exact mode with the rows moved by the copy engines (method exact-ce)")
    ap.add_argument("--report-only", type=int, metavar="WORLD", help="rebuild the tables from DIR's rows")
    args = ap.parse_args()
    if args.report_only:
        report(args.out, args.report_only)
        return
    if args.tiny:
        args.tokens, args.ffn_slots, args.ffn_rows = "4,16", "2,3", "4,16"
        args.iters, args.ffn_iters, args.warmup = min(args.iters, 5), min(args.ffn_iters, 3), 1
    skip = set(filter(None, args.skip.split(",")))

    timeout = datetime.timedelta(seconds=180)  # a rank stuck in a collective fails instead of hanging
    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        pin_to_cpus(local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # as the other GPU benches
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo", timeout=timeout)
    group = ep_group()
    shape = TINY if args.tiny else DEEPSEEK_V3
    tokens = [int(t) for t in args.tokens.split(",")]
    copy_engine = None
    if args.copy_engine and group.device.type == "cuda":
        size = workspace_bytes(max(tokens), group.world, shape.hidden, shape.top_k, torch.bfloat16)
        copy_engine = ep_group(copy_engine_bytes=size)
    args.out.mkdir(parents=True, exist_ok=True)
    sink = Sink(args.out, group.rank)
    base = dict(rank=group.rank, world=group.world, hidden=shape.hidden, top_k=shape.top_k)

    if "check" not in skip:
        guarded(sink, "check", dict(base, tokens=tokens[min(1, len(tokens) - 1)]),
                lambda: check_gpu_path(group, shape, tokens[min(1, len(tokens) - 1)]))
    if "dispatch" not in skip:
        # graph capture last: a capture that fails can leave the communicator unusable
        names = ("naive", "exact", "capacity") + (("exact-ce",) if copy_engine else ())
        methods = [(t, m) for m in names for t in tokens]
        if group.device.type == "cuda":
            methods += [(t, "capacity-graph") for t in tokens]
        for t, method in methods:
            guarded(sink, "dispatch", dict(base, tokens=t, method=method),
                    lambda t=t, m=method: bench_dispatch(group, shape, t, m, args, copy_engine))
    if "ffn" not in skip:
        slot_counts, row_counts = (list(map(int, a.split(","))) for a in (args.ffn_slots, args.ffn_rows))
        cases = [(s, m) for s in slot_counts for m in row_counts]
        for slots, rows_per_slot in cases[group.rank::group.world]:
            try:
                for row in bench_ffn(group.device, shape, slots, rows_per_slot, args):
                    sink.add(section="ffn", rank=group.rank, **row)
            except Exception as e:  # e.g. out of memory setting up one case
                traceback.print_exc()
                sink.add(section="ffn", rank=group.rank, slots=slots, rows_per_slot=rows_per_slot,
                         error=f"{type(e).__name__}: {e}"[:300])
    dist.barrier()
    if group.rank == 0:
        report(args.out, group.world)
        print((args.out / "summary.md").read_text())
    if copy_engine is not None:
        copy_engine.copy_engine.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
