"""Placement planner benchmark on the DeepSeek EPLB cases of /work/shared/ANCHORS.md, plus churn.

58 layers x 256 experts, 65,536 assignments a layer drawn multinomially from Zipf(s) loads with a
random expert order per layer. Balancedness is max GPU load / mean GPU load per layer, mean over
layers (worst layer in brackets); "before" is experts placed contiguously without replicas.
Churn: plan window 1 from scratch, then re-plan incrementally on window 2 of the same
distribution and count the slots whose expert changed (beside a from-scratch plan of window 2).

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/planner.py --markdown
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from balancerd.placement import Topology, count_moves  # noqa: E402
from balancerd.planner import PlanResult, plan  # noqa: E402

LAYERS, EXPERTS, TOKENS, GROUPS = 58, 256, 65_536, 8


@dataclass(frozen=True)
class Case:
    gpus: int
    slots: int
    nodes: int
    eplb_policy: str
    eplb_ms: str
    eplb: dict[float, str]  # Zipf exponent -> EPLB "before -> after (worst)"


CASES = (
    Case(8, 288, 1, "global", "229-249", {1.0: "2.15 -> 1.000", 1.5: "3.89 -> 1.000"}),
    Case(32, 288, 1, "global", "468-596", {1.0: "6.05 -> 1.003 (1.015)", 1.5: "13.3 -> 1.181 (1.233)"}),
    Case(32, 288, 4, "hierarchical", "221-235", {1.0: "6.05 -> 1.42 (1.89)", 1.5: "13.3 -> 2.96 (3.40)"}),
    Case(32, 288, 8, "hierarchical", "165-171", {1.0: "6.05 -> 2.38 (3.16)", 1.5: "13.3 -> 5.24 (5.73)"}),
    Case(64, 320, 1, "global", "901-1089", {1.0: "11.1 -> 1.019", 1.5: "26.1 -> 1.269 (1.312)"}),
    Case(64, 288, 1, "any", "refuses", {1.0: "refuses (uneven slots)", 1.5: "refuses (uneven slots)"}),
)
EPLB_CHURN = "63-90%"


def zipf_probs(layers: int, experts: int, s: float, rng: np.random.Generator) -> np.ndarray:
    p = 1.0 / np.arange(1, experts + 1) ** s
    p /= p.sum()
    return np.stack([p[rng.permutation(experts)] for _ in range(layers)])


def window(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.stack([rng.multinomial(TOKENS, p) for p in probs]).astype(np.float64)


def timed(repeat: int, fn) -> tuple[PlanResult, str]:
    """The result and "CPU ms median (min) / wall ms median" of ``repeat`` calls. The planner is
    single-threaded, so its CPU time is its time on one core even when the core is shared."""
    cpu, wall = [], []
    for _ in range(repeat):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        result = fn()
        cpu.append((time.process_time() - start_cpu) * 1e3)
        wall.append((time.perf_counter() - start_wall) * 1e3)
    return result, f"{np.median(cpu):.1f} ({np.min(cpu):.1f}) / {np.median(wall):.1f}"


def bal(before: np.ndarray, after: np.ndarray) -> str:
    return f"{before.mean():.2f} -> {after.mean():.3f} ({after.max():.3f})"


def run(repeat: int) -> tuple[list[list[str]], list[list[str]]]:
    plans, churn = [], []
    for s in (1.0, 1.5):
        rng = np.random.default_rng(int(s * 10))
        probs = zipf_probs(LAYERS, EXPERTS, s, rng)
        first, second = window(probs, rng), window(probs, rng)
        for case in CASES:
            topo = Topology(case.gpus, case.slots, case.nodes)
            groups = GROUPS if case.nodes > 1 else 1
            result, ms = timed(repeat, partial(plan, first, topo, expert_groups=groups))
            nodes = "global" if case.nodes == 1 else f"{case.nodes} nodes, {groups} groups"
            span = f"{result.group_node_span.mean():.2f} of {case.nodes}" if case.nodes > 1 else ""
            plans.append([
                f"Zipf {s}", f"{case.gpus}, {case.slots}", nodes, case.eplb[s], case.eplb_ms,
                bal(result.balancedness_before, result.balancedness_after),
                f"{result.balancedness_floor.mean():.3f}", span, ms,
            ])
            if case.nodes > 1:
                continue
            again, ms = timed(repeat, partial(plan, second, topo, current=result.phys_to_log))
            fresh = count_moves(result.phys_to_log, plan(second, topo).phys_to_log)
            churn.append([
                f"Zipf {s}", f"{case.gpus}, {case.slots}",
                bal(again.balancedness_before, again.balancedness_after),
                f"{100 * again.moved_fraction:.1f}%", f"{again.moves.max()}",
                f"{100 * fresh.sum() / result.phys_to_log.size:.0f}%", EPLB_CHURN, ms,
            ])
    return plans, churn


PLAN_HEAD = ["loads", "GPUs, slots", "nodes", "EPLB before -> after", "EPLB ms", "ours before -> after",
             "floor", "group span", "CPU ms median (min) / wall"]
CHURN_HEAD = ["loads", "GPUs, slots", "window 2: current -> after", "slots moved", "max/layer",
              "from scratch moved", "EPLB moved", "CPU ms median (min) / wall"]


def render(head: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)) for r in [head, *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per case (default 5)")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    plans, churn = run(args.repeat)
    print(f"{LAYERS} layers x {EXPERTS} experts, {TOKENS:,} assignments a layer; numpy {np.__version__}, "
          f"{args.repeat} runs a case\n")
    print(render(PLAN_HEAD, plans, args.markdown))
    print("\nChurn: re-plan on a second window of the same distribution, starting from the first plan\n")
    print(render(CHURN_HEAD, churn, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
