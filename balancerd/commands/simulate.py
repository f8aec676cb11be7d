"""`balancerd simulate`: replay a count trace through detection and the planner on any cluster size."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from balancerd.commands import UsageError


def register(parser: argparse.ArgumentParser) -> None:
    from balancerd.lab.models import MODELS
    from balancerd.lab.simulate import POLICIES

    parser.add_argument("--loads", required=True, metavar="TRACE",
                        help="a trace (.npz from `balancerd record`, or [T, L, E] .npy), or any load file "
                             "`balancerd plan` reads (one interval)")
    parser.add_argument("--gpus", required=True, type=int, metavar="G", help="GPUs of the simulated replica")
    parser.add_argument("--slots", required=True, type=int, metavar="S", help="physical expert slots a layer")
    parser.add_argument("--nodes", type=int, default=1, metavar="N", help="nodes the GPUs span (default 1)")
    parser.add_argument("--policy", default=",".join(POLICIES),
                        help=f"comma-separated, of {', '.join(POLICIES)} (default: all)")
    parser.add_argument("--model", choices=sorted(MODELS),
                        help="shapes for the cost model (default: the preset with the trace's layers and "
                             "experts, else qwen3-235b-a22b resized to the trace)")
    parser.add_argument("--batch", type=int,
                        help="tokens per decode step of the replica (default: the trace's, else 64)")
    parser.add_argument("--prompt", type=int, default=1024, help="prompt tokens a sequence, for prefill")
    parser.add_argument("--output", type=int, default=256, help="output tokens a sequence")
    parser.add_argument("--calibration", metavar="FILE", help="calibration.json from `balancerd bench ep`")
    parser.add_argument("--config", metavar="FILE",
                        help="the daemon's TOML: detect, window, planner and policy settings "
                             "(default: the defaults)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def _model(name: str | None, layers: int, experts: int):
    from balancerd.lab.models import MODELS

    if name is not None:
        spec = MODELS[name]
    else:
        matching = [m for m in MODELS.values() if (m.moe_layers, m.experts) == (layers, experts)]
        spec = matching[0] if matching else MODELS["qwen3-235b-a22b"]
    if (spec.moe_layers, spec.experts) == (layers, experts):
        return spec, None
    resized = dataclasses.replace(spec, moe_layers=layers, layers=spec.layers - spec.moe_layers + layers,
                                  experts=experts, top_k=min(spec.top_k, experts))
    return resized, f"{spec.name} resized to the trace's {layers} layers x {experts} experts"


def run(args: argparse.Namespace) -> int:
    from balancerd.commands.advise import load_calibration
    from balancerd.config import ConfigError, DaemonConfig, load_config
    from balancerd.lab.costmodel import Workload
    from balancerd.lab.simulate import Cluster, simulate
    from balancerd.lab.trace import read_trace
    from balancerd.loads_io import LoadsError
    from balancerd.placement import PlacementError

    try:
        trace = read_trace(args.loads)
    except LoadsError as exc:
        raise UsageError(str(exc)) from None
    spec, note = _model(args.model, trace.layers, trace.experts)
    try:
        config = load_config(args.config) if args.config else DaemonConfig()
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    cal = load_calibration(args.calibration, None, spec)
    batch = args.batch or round(trace.tokens_per_step(spec.top_k) or 64)
    policies = tuple(p for p in args.policy.split(",") if p)
    try:
        cluster = Cluster(args.gpus, args.slots, args.nodes)
        if args.slots < trace.experts:
            raise ValueError(f"--slots {args.slots} cannot hold {trace.experts} experts")
        work = Workload(max(1, batch), args.prompt, args.output)
        progress = None if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
        runs = simulate(trace, spec, cluster, work, cal, config, policies, progress)
    except (ValueError, PlacementError) as exc:
        raise UsageError(str(exc).replace("Topology.", "--")) from None
    doc = {"trace": {"intervals": trace.intervals, "layers": trace.layers, "experts": trace.experts,
                     "job": trace.job},
           "model": spec.name, "gpus": args.gpus, "slots": args.slots, "nodes": args.nodes,
           "batch": work.batch,
           "calibration": cal.source, "notes": [n for n in (note,) if n],
           "policies": [r.summary() for r in runs]}
    if args.json:
        print(json.dumps(doc))
        return 0
    print(format_text(doc, runs))
    return 0


def format_text(doc: dict, runs) -> str:
    t = doc["trace"]
    lines = [f"{t['intervals']} intervals of {t['layers']} layers x {t['experts']} experts on "
             f"{doc['gpus']} GPUs, {doc['slots']} slots, {doc['nodes']} node(s); {doc['model']}, "
             f"{doc['batch']} tokens a decode step",
             f"calibration: {doc['calibration']}", *[f"note: {n}" for n in doc["notes"]], "",
             "| policy | decode ms (mean / p99) | prefill ms (mean / last) | balancedness | plans | moves "
             "| migration s | dropped |", "|---|---|---|---|---|---|---|---|"]
    for s in doc["policies"]:
        lines.append(f"| {s['policy']} | {s['decode_ms_mean']:.2f} / {s['decode_ms_p99']:.2f} | "
                     f"{s['prefill_ms_mean']:.0f} / {s['prefill_ms_last']:.0f} | "
                     f"{s['balancedness_mean']:.3f} | {s['plans']} | {s['moves']} | {s['migration_s']:.2f} | "
                     f"{s['dropped_share']:.1%} |")
    for r in runs:
        lines += [f"{r.policy}: {e}" for e in r.events]
    return "\n".join(lines)
