"""`balancerd demo`: the closed loop on CPU processes — imbalance found, planned, migrated, fixed."""

from __future__ import annotations

import argparse
import json

from balancerd.commands import UsageError


def register(parser: argparse.ArgumentParser) -> None:
    from balancerd.demo import POLICIES, DemoOptions

    d = DemoOptions()
    parser.add_argument("--ranks", type=int, default=d.ranks, help="CPU ranks in the gloo group")
    parser.add_argument("--layers", type=int, default=d.layers, help="MoE layers")
    parser.add_argument("--experts", type=int, default=d.experts, help="logical experts per layer")
    parser.add_argument("--slots-per-rank", type=int, default=d.slots_per_rank,
                        help="physical expert slots on each rank (extra slots hold replicas)")
    parser.add_argument("--steps", type=int, default=d.steps, help="forward steps each rank serves")
    parser.add_argument("--skew", type=float, default=d.skew,
                        help="Zipf exponent of the router's expert preference (random order per layer)")
    parser.add_argument("--policy", choices=POLICIES, default=d.policy, help="the daemon's remedy")
    parser.add_argument("--tokens", type=int, default=d.tokens, help="tokens per rank per step")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--tui", action="store_true",
                        help="follow the demo's daemon in the on-call console (q quits; the report follows)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from balancerd.demo import DemoOptions, format_report, run_demo

    try:
        opts = DemoOptions(ranks=args.ranks, layers=args.layers, experts=args.experts,
                           slots_per_rank=args.slots_per_rank, steps=args.steps, skew=args.skew,
                           policy=args.policy, tokens=args.tokens, seed=args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.tui and args.json:
        raise UsageError("--tui and --json do not go together")
    if not args.json:
        print(f"starting a daemon and {opts.ranks} CPU ranks ({opts.steps} steps each)...", flush=True)
    report = _with_console(opts) if args.tui else run_demo(opts, progress=not args.json)
    print(json.dumps(report) if args.json else format_report(report))
    return 0 if report["reference_match"] else 1


def _with_console(opts) -> dict:
    """Run the demo in a thread and the console in the foreground, attached to the demo's daemon."""
    import queue
    import threading

    from balancerd.api import ApiClient
    from balancerd.demo import run_demo
    from balancerd.tui.app import ConsoleApp

    ready: queue.Queue = queue.Queue()
    outcome: dict = {}

    def demo() -> None:
        try:
            outcome["report"] = run_demo(opts, progress=False, on_ready=ready.put)
        except BaseException as exc:  # re-raised in the foreground once the console is closed
            outcome["error"] = exc
        finally:
            ready.put(None)

    thread = threading.Thread(target=demo, name="balancerd-demo", daemon=True)
    thread.start()
    socket = ready.get()
    if socket is not None:
        ConsoleApp(ApiClient(socket, timeout=3.0), interval=0.5).run()
        print("console closed; waiting for the ranks to finish...", flush=True)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["report"]
