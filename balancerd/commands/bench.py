"""`balancerd bench ep`: measure EP serving on this host's GPUs and write CSV, plots and a summary."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from balancerd.commands import UsageError


def _sizes(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return tuple(dict.fromkeys(values))  # measured in this order


def register(parser: argparse.ArgumentParser) -> None:
    from balancerd.lab.models import MODELS

    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    ep = sub.add_parser("ep", help="EP serving on this host's GPUs: throughput, TPOT, all-to-all share",
                        description="Launch one process per GPU (torch.distributed; NCCL on GPUs, gloo with "
                                    "--device cpu), serve a stack of MoE layers with the model's real shapes "
                                    "and random weights at each EP size (prefill, then decode), and write "
                                    "DIR/summary.md, ep_bench.csv, calibration.json and PNG plots.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ep.add_argument("--model", choices=sorted(MODELS), default="qwen3-235b-a22b")
    ep.add_argument("--ep", type=_sizes, default="1,2,4", metavar="SIZES",
                    help="EP sizes, comma-separated, measured in this order; each uses GPUs 0..ep-1")
    ep.add_argument("--batch", type=int, default=64, help="sequences per replica (batch / EP a GPU)")
    ep.add_argument("--prompt", type=int, default=1024, help="prompt tokens per sequence")
    ep.add_argument("--output", type=int, default=256, help="tokens decoded per sequence")
    ep.add_argument("--layers", type=int, default=8,
                    help="MoE layers run; figures are scaled to the model's full layer count")
    ep.add_argument("--skew", type=float, default=1.1, help="Zipf exponent of the router bias (0: none)")
    ep.add_argument("--rebalance", action="store_true",
                    help="also measure after rebalancing (planned from the static prefill's counts)")
    ep.add_argument("--out", type=Path, default=Path("out/bench-ep"), help="output directory")
    ep.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: gloo processes")
    ep.add_argument("--tiny", action="store_true", help="toy shapes, the same routing (CPU checks)")
    ep.add_argument("--prefill-chunk", type=int, default=16384,
                    help="most prompt tokens a GPU passes per prefill forward (whole sequences)")
    ep.add_argument("--decode-steps", type=int, default=0, help="timed decode steps (0: --output)")
    ep.add_argument("--no-graph", dest="graph", action="store_false",
                    help="decode eager, not in a CUDA graph")
    ep.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                    help="skip the calibration pass (the cost model then uses defaults)")
    ep.add_argument("--seed", type=int, default=0)
    ep.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole run")
    ep.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from balancerd.lab.launch import launch
    from balancerd.lab.report import build_report, check_line

    for name in ("batch", "prompt", "output", "layers", "prefill_chunk"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.skew < 0 or args.decode_steps < 0 or not args.timeout > 0:
        raise UsageError("--skew and --decode-steps must be >= 0 and --timeout > 0")
    uneven = [e for e in args.ep if args.batch % e]
    if uneven:
        raise UsageError(f"--batch {args.batch} does not split over EP {uneven}")
    bench_args = {"model": args.model, "eps": list(args.ep), "batch": args.batch, "prompt": args.prompt,
                  "output": args.output, "layers": args.layers, "out_dir": str(args.out.resolve()),
                  "device": args.device, "tiny": args.tiny, "skew": args.skew, "rebalance": args.rebalance,
                  "prefill_chunk": args.prefill_chunk, "decode_steps": args.decode_steps, "graph": args.graph,
                  "calibrate": args.calibrate, "seed": args.seed, "timeout_s": args.timeout}
    world = max(args.ep)
    print(f"bench ep: {world} processes ({args.device}), EP {','.join(map(str, args.ep))}, "
          f"{args.layers} layers of {args.model}{' (toy shapes)' if args.tiny else ''}, out {args.out}",
          file=sys.stderr, flush=True)
    rc = launch(bench_args, world, args.out, args.timeout, sys.stderr)
    if not (args.out / "raw.json").exists():
        print(f"bench ep: the ranks wrote nothing (exit {rc}); see {args.out}/rank*.log", file=sys.stderr)
        return rc or 1
    report = build_report(args.out)
    print(check_line(report["rows"]))
    print(f"wrote {args.out}/summary.md, ep_bench.csv, calibration.json")
    errors = [r for r in report["rows"] if r.get("error")]
    for r in errors:
        print(f"bench ep: EP {r.get('ep')} {r.get('placement', '')} {r.get('phase', '')}: {r['error']}",
              file=sys.stderr)
    return rc or (1 if errors else 0)
