"""`balancerd advise`: predict TPOT for every EP and TP x EP layout that fits, and recommend one."""

from __future__ import annotations

import argparse
import json

from balancerd.commands import UsageError


def register(parser: argparse.ArgumentParser) -> None:
    from balancerd.lab.models import MODELS

    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--gpus", required=True, type=int, metavar="G", help="GPUs to deploy on")
    parser.add_argument("--batch", required=True, type=int, metavar="B", help="sequences decoded per replica")
    parser.add_argument("--prompt", type=int, default=1024, help="prompt tokens per sequence (default 1024)")
    parser.add_argument("--output", type=int, default=256, help="output tokens per sequence (default 256)")
    parser.add_argument("--calibration", metavar="FILE",
                        help="calibration.json written by `balancerd bench ep` (default: the "
                             "ANCHORS.md constants)")
    parser.add_argument("--telemetry", metavar="TRACE",
                        help="a trace recorded from live rings (`balancerd record`): fits the all-to-all "
                             "latency and bandwidth of its GPU count from the runtime's own timers")
    parser.add_argument("--imbalance", type=float, default=1.0,
                        help="busiest GPU's expert load over the mean (default 1.0: balanced)")
    parser.add_argument("--tpot-slo", type=float, metavar="MS",
                        help="recommend only layouts at or under this TPOT")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs a node (default: the calibration's, 8)")
    parser.add_argument("--gpu-memory-gb", type=float,
                        help="memory of one GPU, GB (default: the calibration's, 141 for an H200)")
    parser.add_argument("--json", action="store_true",
                        help='print {"recommended": {...}, "predictions": [...], ...} instead of a table')
    parser.set_defaults(func=run)


def load_calibration(path: str | None, telemetry: str | None, model):
    """The calibration to predict with: a file, defaults, and optionally a live-telemetry a2a fit."""
    from balancerd.lab.calibration import Calibration, CalibrationError, load
    from balancerd.lab.trace import calibrate_from_trace, read_trace
    from balancerd.loads_io import LoadsError

    try:
        cal = load(path) if path else Calibration()
    except CalibrationError as exc:
        raise UsageError(str(exc)) from None
    if telemetry:
        try:
            cal = calibrate_from_trace(read_trace(telemetry), model, cal)
        except (LoadsError, ValueError) as exc:
            raise UsageError(f"{telemetry}: {exc}") from None
    return cal


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from balancerd.lab.advise import advise, format_text, to_json
    from balancerd.lab.costmodel import Workload
    from balancerd.lab.models import model_spec

    spec = model_spec(args.model)
    cal = load_calibration(args.calibration, args.telemetry, spec)
    if args.gpus_per_node is not None:
        if args.gpus_per_node < 1:
            raise UsageError(f"--gpus-per-node must be >= 1, got {args.gpus_per_node}")
        cal = dataclasses.replace(cal, gpus_per_node=args.gpus_per_node)
    if args.gpu_memory_gb is not None:
        if not args.gpu_memory_gb > 0:
            raise UsageError(f"--gpu-memory-gb must be > 0, got {args.gpu_memory_gb}")
        cal = dataclasses.replace(cal, gpu_memory_gb=args.gpu_memory_gb)
    try:
        work = Workload(args.batch, args.prompt, args.output, imbalance=args.imbalance)
        advice = advise(spec, args.gpus, work, cal, args.tpot_slo)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(json.dumps(to_json(advice)) if args.json else format_text(advice))
    return 0
