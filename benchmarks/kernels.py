"""GPU benchmark of the fused routing kernel (kernels.route) against the torch reference.

Run from the repository root on a CUDA machine (torch >= 2.11, triton >= 3.6):

    python -m benchmarks.kernels --out out/kernels            # both presets, all token counts
    python -m benchmarks.kernels --out out/kernels --sweep programs  # also programs a multiprocessor
    python -m benchmarks.kernels --out out/kernels --sweep launch    # also block_t x num_warps (slow)

For each preset and token count it first checks the kernel against the reference on the GPU, then
times (median us, CUDA events): the reference (eager, CUDA graph), the Triton route (eager, graph,
graph of 16 calls / 16), counting off / on / recording switched off, the selection bias, and the
whole router (bf16 GEMM + route) against the GEMM alone. Logits rotate over enough buffers that
large token counts read from HBM, not L2. Rows go to DIR/route.csv as they are measured (one failure
costs only its own row) and a table to DIR/route.md.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

if not __package__:  # run as a file: `kernels` must be the package, not this script
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
import triton  # noqa: E402

from kernels.route import RoutingSpec, route, route_reference  # noqa: E402
from kernels.route_triton import LaunchConfig, default_launch, route_triton  # noqa: E402

PEAK_BYTES_PER_S = 4.24e12  # measured H200 device copy bandwidth (read + write), shared/ANCHORS.md
TOKENS = (1, 16, 64, 256, 4096, 65536)
CALLS_PER_GRAPH = 16


@dataclass(frozen=True)
class Preset:
    name: str
    hidden: int
    spec: RoutingSpec
    correction_bias: bool


PRESETS = {
    "deepseek-v3": Preset("deepseek-v3", 7168, RoutingSpec("sigmoid_grouped", 256, 8, groups=8, topk_groups=4,
                                                           scale=2.5), True),
    "qwen3-235b": Preset("qwen3-235b", 4096, RoutingSpec("softmax", 128, 8), False),
}


@dataclass
class Row:
    preset: str
    tokens: int
    case: str
    mode: str
    us: float = math.nan
    gbps: float = math.nan
    pct_peak: float = math.nan
    note: str = ""


def route_bytes(tokens: int, spec: RoutingSpec) -> int:
    """Bytes the route must move: bf16 logits in, int64 ids and float32 weights out."""
    return tokens * (spec.experts * 2 + spec.top_k * (8 + 4))


class Workload:
    """Static device tensors for one preset and token count (static, so CUDA graphs can replay)."""

    def __init__(self, preset: Preset, tokens: int, gen: torch.Generator) -> None:
        spec, dev = preset.spec, "cuda"
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
        want = math.ceil(3 * l2 / (tokens * spec.experts * 2))
        self.buffers = min(8, 1 << max(0, math.ceil(math.log2(want))))
        self.logits = [(torch.randn(tokens, spec.experts, generator=gen, device=dev) * 2).bfloat16()
                       for _ in range(self.buffers)]
        self.hidden = torch.randn(tokens, preset.hidden, generator=gen, device=dev).bfloat16()
        self.router = (torch.randn(spec.experts, preset.hidden, generator=gen, device=dev)
                       / math.sqrt(preset.hidden)).bfloat16()
        self.correction = (torch.randn(spec.experts, generator=gen, device=dev) * 0.1
                           if preset.correction_bias else None)
        self.selection = torch.randn(spec.experts, generator=gen, device=dev) * 1e-3
        self.counts = torch.zeros(spec.experts, dtype=torch.int32, device=dev)
        self.on = torch.ones((), dtype=torch.int32, device=dev)
        self.off = torch.zeros((), dtype=torch.int32, device=dev)


def cases(preset: Preset, w: Workload, sweep: str) -> dict[str, Callable[[int], object]]:
    """Named calls of one buffer index each."""
    spec, cb = preset.spec, w.correction

    def gemm(_: int) -> torch.Tensor:  # the hidden states stay put: large ones exceed L2 anyway
        return torch.nn.functional.linear(w.hidden, w.router)

    out = {
        "reference": lambda i: route_reference(w.logits[i], spec, correction_bias=cb, counts=w.counts),
        "triton": lambda i: route(w.logits[i], spec, correction_bias=cb, counts=w.counts, record=w.on),
        "triton-no-counts": lambda i: route(w.logits[i], spec, correction_bias=cb),
        "triton-record-off": lambda i: route(w.logits[i], spec, correction_bias=cb, counts=w.counts,
                                             record=w.off),
        "triton-selection-bias": lambda i: route(w.logits[i], spec, correction_bias=cb,
                                                 selection_bias=w.selection, counts=w.counts, record=w.on),
        "triton-block-a-program": lambda i: route_triton(  # one block a program: no grid-stride loop
            w.logits[i], spec, correction_bias=cb, counts=w.counts, record=w.on,
            launch=replace(default_launch(w.logits[i].shape[0], spec), programs=1 << 30)),
        "gemm": gemm,
        "gemm+triton": lambda i: route(gemm(i), spec, correction_bias=cb, counts=w.counts, record=w.on),
        "gemm+reference": lambda i: route_reference(gemm(i), spec, correction_bias=cb, counts=w.counts),
    }
    if sweep in ("programs", "all"):
        sms = torch.cuda.get_device_properties(w.counts.device).multi_processor_count
        for per_sm in (1, 2, 4, 8, 16, None):  # None: one block a program
            programs = 1 << 30 if per_sm is None else per_sm * sms
            for counted in (True, False):
                out[f"triton[programs/SM={per_sm or 'all'}{'' if counted else ',no counts'}]"] = (
                    lambda i, programs=programs, counted=counted: route_triton(
                        w.logits[i], spec, correction_bias=cb, counts=w.counts if counted else None,
                        record=w.on if counted else None,
                        launch=replace(default_launch(w.logits[i].shape[0], spec), programs=programs)))
    if sweep in ("launch", "all"):
        for block_t in (1, 2, 4, 8, 16, 32, 64):
            for warps in (1, 2, 4, 8):
                launch = LaunchConfig(block_t, warps)
                out[f"triton[bt={block_t},w={warps}]"] = (
                    lambda i, launch=launch: route_triton(w.logits[i], spec, correction_bias=cb,
                                                          counts=w.counts, record=w.on, launch=launch))
    return out


def modes_for(case: str) -> tuple[str, ...]:
    if case.startswith("triton[") or case in ("gemm+reference", "triton-block-a-program"):
        return ("graph-x16",)
    return ("eager", "graph", "graph-x16")


def _median_us(starts: list, ends: list) -> float:
    torch.cuda.synchronize()
    return 1000 * statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def time_call(fn: Callable[[int], object], buffers: int, mode: str, iters: int) -> float:
    """Median us of one call: eager launches, one call per graph replay, or 16 calls per replay / 16."""
    for i in range(3):
        fn(i % buffers)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    if mode == "eager":
        for n in range(iters):
            starts[n].record()
            fn(n % buffers)
            ends[n].record()
        return _median_us(starts, ends)
    per_graph = CALLS_PER_GRAPH if mode == "graph-x16" else 1
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(per_graph):
            fn(i % buffers)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        for i in range(per_graph):
            fn(i % buffers)
    graph.replay()
    for n in range(iters):
        starts[n].record()
        graph.replay()
        ends[n].record()
    us = _median_us(starts, ends) / per_graph
    del graph
    return us


def check(preset: Preset, w: Workload) -> str:
    """The kernel against the reference on the GPU; raises with the reason when they disagree.

    Rows may differ only at float32 near-ties (last-ulp exp/sigmoid differences): at most 1 in 1000.
    """
    spec, cb, logits = preset.spec, w.correction, w.logits[0]
    counts = torch.zeros_like(w.counts)
    got = route(logits, spec, correction_bias=cb, selection_bias=w.selection, counts=counts, record=w.on)
    want = route_reference(logits, spec, correction_bias=cb, selection_bias=w.selection)
    same = (got.ids == want.ids).all(dim=1)
    differing = int((~same).sum())
    if differing > max(1, logits.shape[0] // 1000):
        raise AssertionError(f"{differing} of {logits.shape[0]} rows choose different experts")
    torch.testing.assert_close(got.weights[same], want.weights[same], rtol=2e-5, atol=1e-6)
    expected = torch.bincount(got.ids.flatten(), minlength=spec.experts).int()
    if not torch.equal(counts, expected):
        raise AssertionError("counts differ from the histogram of the returned ids")
    gap = abs(int(got.changed) - int(want.changed))
    if gap > differing * spec.top_k:
        raise AssertionError(f"changed {int(got.changed)} vs reference {int(want.changed)}")
    return f"ok ({differing} near-tie rows)"


class Recorder:
    """Appends rows to DIR/route.csv as they come, so a crash keeps what was measured."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "route.csv"
        self.rows: list[Row] = []
        with self.path.open("w", newline="") as f:
            csv.writer(f).writerow([f.name for f in fields(Row)])

    def add(self, row: Row) -> None:
        self.rows.append(row)
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow(asdict(row).values())
        value = f"{row.us:9.2f} us" if math.isfinite(row.us) else " " * 12
        rate = f"{row.gbps:8.1f} GB/s" if math.isfinite(row.gbps) else ""
        print(f"{row.preset:12} {row.tokens:6} {row.case:28} {row.mode:9} {value} {rate} {row.note}",
              flush=True)


def _settle() -> None:
    """Let queued work finish after a failure; a sticky CUDA error surfaces in later rows."""
    try:
        torch.cuda.synchronize()
    except Exception:
        traceback.print_exc()


def measure(preset: Preset, tokens: int, rec: Recorder, sweep: str, gen: torch.Generator) -> None:
    try:
        w = Workload(preset, tokens, gen)
    except Exception as exc:
        rec.add(Row(preset.name, tokens, "setup", "-", note=f"FAILED: {exc!r}"[:300]))
        _settle()
        return
    try:
        rec.add(Row(preset.name, tokens, "check", "-", note=check(preset, w)))
    except Exception as exc:  # keep going: the timings still say something
        rec.add(Row(preset.name, tokens, "check", "-", note=f"FAILED: {exc!r}"[:300]))
        _settle()
    moved = route_bytes(tokens, preset.spec)
    for case, fn in cases(preset, w, sweep).items():
        iters = 30 if tokens >= 4096 and "reference" in case else 200
        for mode in modes_for(case):
            row = Row(preset.name, tokens, case, mode)
            try:
                row.us = time_call(fn, w.buffers, mode, iters)
                if case.startswith("triton") or case == "reference":
                    row.gbps = moved / row.us / 1e3
                    row.pct_peak = 100 * moved / (row.us * 1e-6) / PEAK_BYTES_PER_S
            except Exception as exc:
                row.note = f"FAILED: {exc!r}"[:300]
                _settle()
            rec.add(row)


MD_COLUMNS = [("reference", "eager"), ("reference", "graph"), ("triton", "eager"), ("triton", "graph"),
              ("triton", "graph-x16"), ("triton-no-counts", "graph-x16"), ("triton-record-off", "graph-x16"),
              ("triton-selection-bias", "graph-x16"), ("triton-block-a-program", "graph-x16"),
              ("gemm", "graph"), ("gemm+triton", "graph"),
              ("gemm+reference", "graph-x16")]


def _table_line(lookup: dict, preset: str, tokens: int) -> str:
    def us(case: str, mode: str) -> float:
        r = lookup.get((preset, tokens, case, mode))
        return r.us if r else math.nan

    fused = lookup.get((preset, tokens, "triton", "graph-x16"))
    checked = lookup.get((preset, tokens, "check", "-"))
    cells = [preset, str(tokens)] + [f"{us(c, m):.1f}" for c, m in MD_COLUMNS] + [
        f"{fused.gbps:.0f}" if fused else "nan", f"{fused.pct_peak:.1f}" if fused else "nan",
        f"{us('triton', 'graph-x16') / us('triton-no-counts', 'graph-x16'):.3f}",
        checked.note if checked else "not run"]
    return "| " + " | ".join(cells) + " |"


def markdown(rows: list[Row]) -> str:
    """One line per preset and token count (median us); then the fastest launch configurations."""
    head = ["preset", "tokens"] + [f"{c} {m}" for c, m in MD_COLUMNS] + [
        "GB/s", "% of 4.24 TB/s", "counting on/off", "check"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lookup = {(r.preset, r.tokens, r.case, r.mode): r for r in rows}
    for preset, tokens in sorted({(r.preset, r.tokens) for r in rows}):
        lines.append(_table_line(lookup, preset, tokens))
    best = best_launches(rows)
    if best:
        lines += ["", "Fastest launch configuration (graph of 16 calls / 16):", ""]
        lines += [f"- {p} {t} tokens: {case} {us:.2f} us" for (p, t), (case, us) in sorted(best.items())]
    return "\n".join(lines) + "\n"


def best_launches(rows: list[Row]) -> dict[tuple[str, int], tuple[str, float]]:
    best: dict[tuple[str, int], tuple[str, float]] = {}
    for r in rows:
        if r.case.startswith("triton[") and "no counts" not in r.case and math.isfinite(r.us):
            key = (r.preset, r.tokens)
            if key not in best or r.us < best[key][1]:
                best[key] = (r.case, r.us)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for route.csv and route.md")
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=sorted(PRESETS))
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    parser.add_argument("--sweep", choices=("none", "programs", "launch", "all"), default="none",
                        help="also time programs a multiprocessor, or block_t x num_warps (minutes), or both")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    print(f"{torch.cuda.get_device_name(0)}; {versions}", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    rec = Recorder(args.out)
    for name in args.presets:
        for tokens in args.tokens:
            measure(PRESETS[name], tokens, rec, args.sweep, gen)
    table = markdown(rec.rows)
    (args.out / "route.md").write_text(table)
    print("\n" + table)
    failed = [r for r in rec.rows if r.note.startswith("FAILED")]
    print(f"{len(rec.rows)} rows, {len(failed)} failed; {rec.path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
