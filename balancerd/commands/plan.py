"""`balancerd plan`: plan expert placement for a load file, offline.

Other tools call this: its arguments, the plan file formats, the --json object and the exit status
(0, or 2 with one line on stderr for any bad input) are a contract.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from balancerd.commands import UsageError
from balancerd.loads_io import LoadsError, plan_document, read_loads, read_plan, sglang_document, write_json
from balancerd.placement import (
    PlacementError,
    Topology,
    balancedness,
    contiguous_gpu_loads,
    count_moves,
    gpu_loads,
    imbalance_ratio,
    initial_placement,
    validate_placement,
)

FORMATS = ("balancerd", "sglang")


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loads", required=True, metavar="FILE",
                        help='expert loads: .npy ([L, E] or [E]), .json with a "logical_count" array, or an '
                             "SGLang expert-distribution .pt dump")
    parser.add_argument("--gpus", required=True, type=int, metavar="G", help="GPUs (EP ranks)")
    parser.add_argument("--slots", required=True, type=int, metavar="S",
                        help="physical expert slots per layer, over all GPUs (>= experts)")
    parser.add_argument("--nodes", type=int, default=1, metavar="N", help="nodes the GPUs span (default 1)")
    parser.add_argument("--expert-groups", type=int, default=1, metavar="K",
                        help="expert groups of the router (DeepSeek-V3: 8; default 1)")
    parser.add_argument("--current", metavar="PLAN.json",
                        help="the placement served now (balancerd or SGLang format): the baseline for "
                             "'before' and for moves")
    parser.add_argument("--max-moves", type=int, metavar="K",
                        help="most slots changed per layer, counted from --current or else from the "
                             "static placement (0 or absent: unlimited)")
    parser.add_argument("--out", metavar="PLAN.json", help="write the plan here")
    parser.add_argument("--format", choices=FORMATS, default="balancerd",
                        help="plan file format: balancerd.placement/1 (default) or SGLang's "
                             "--init-expert-location JSON")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    parser.set_defaults(func=run)


def _topology(args: argparse.Namespace) -> Topology:
    for name in ("gpus", "slots", "nodes", "expert_groups"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_moves is not None and args.max_moves < 0:
        raise UsageError(f"--max-moves must be >= 0, got {args.max_moves}")
    try:
        return Topology(gpus=args.gpus, slots=args.slots, nodes=args.nodes)
    except PlacementError as exc:
        raise UsageError(str(exc).replace("Topology.", "--")) from None


def _current(path: str, layers: int, experts: int, topo: Topology) -> np.ndarray:
    try:
        plan = read_plan(path)
    except LoadsError as exc:
        raise UsageError(str(exc)) from None
    shape = (layers, topo.slots)
    if plan.experts is not None and plan.experts != experts:
        raise UsageError(f"{path}: plan is for {plan.experts} experts, the loads have {experts}")
    if plan.gpus is not None and plan.gpus != topo.gpus:
        raise UsageError(f"{path}: plan is for {plan.gpus} GPUs, --gpus is {topo.gpus}")
    if plan.phys_to_log.shape != shape:
        raise UsageError(f"{path}: plan is [{plan.phys_to_log.shape[0]} layers, {plan.phys_to_log.shape[1]} "
                         f"slots], expected [{layers}, {topo.slots}] for these loads and --slots")
    try:
        validate_placement(plan.phys_to_log, experts, topo, layers)
    except PlacementError as exc:
        raise UsageError(f"{path}: {exc}") from None
    return plan.phys_to_log


def run(args: argparse.Namespace) -> int:
    from balancerd import planner  # the planning code loads only for this command

    topo = _topology(args)
    try:
        loads = read_loads(args.loads)
    except LoadsError as exc:
        raise UsageError(str(exc)) from None
    layers, experts = loads.shape
    if topo.slots < experts:
        raise UsageError(f"--slots {topo.slots} cannot hold {experts} experts (need slots >= experts)")
    if args.format == "sglang" and topo.slots % topo.gpus:
        raise UsageError(f"--format sglang needs the same slots on every GPU: {topo.slots} slots do not "
                         f"divide over {topo.gpus} GPUs")
    current = None if args.current is None else _current(args.current, layers, experts, topo)

    # Moves are counted from the current placement, else from the static one the runtime starts
    # with; a move limit applies to the same baseline, so without --current the plan starts there.
    baseline = initial_placement(layers, experts, topo) if current is None else current
    max_moves = args.max_moves or None
    started = time.perf_counter()
    try:
        result = planner.plan(loads, topo, current=baseline if current is not None or max_moves else None,
                              max_moves=max_moves, expert_groups=args.expert_groups)
    except PlacementError as exc:
        raise UsageError(str(exc)) from None
    plan_ms = (time.perf_counter() - started) * 1e3
    new = result.phys_to_log

    before = contiguous_gpu_loads(loads, topo.gpus) if current is None else gpu_loads(loads, current, topo)
    after = gpu_loads(loads, new, topo)
    moves = int(count_moves(baseline, new).sum())
    bal_before, bal_after = balancedness(before), balancedness(after)

    if args.out is not None:
        doc = plan_document(new, experts, topo) if args.format == "balancerd" else sglang_document(new)
        try:
            write_json(args.out, doc)
        except LoadsError as exc:
            raise UsageError(str(exc)) from None

    summary = {
        "layers": layers, "experts": experts, "gpus": topo.gpus, "slots": topo.slots,
        "balancedness_before": float(bal_before.mean()), "balancedness_after": float(bal_after.mean()),
        "worst_layer_after": float(bal_after.max()), "max_min_after": float(imbalance_ratio(after).max()),
        "moves": moves, "plan_ms": round(plan_ms, 3),
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    s = summary
    print(f"{layers} layers x {experts} experts on {topo.gpus} GPUs, {topo.slots} slots: "
          f"planned in {plan_ms:.1f} ms")
    print(f"balancedness {s['balancedness_before']:.3f} -> {s['balancedness_after']:.3f} "
          f"(worst layer {s['worst_layer_after']:.3f}); worst max/min after {s['max_min_after']:.2f}")
    print(f"{moves} slot moves from the {'static' if current is None else 'current'} placement")
    if args.out is not None:
        print(f"wrote {args.out} ({'balancerd.placement/1' if args.format == 'balancerd' else 'SGLang'})")
    return 0
