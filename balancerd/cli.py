"""The `balancerd` command: one subcommand per module in balancerd/commands/."""

from __future__ import annotations

import argparse
import importlib
import sys

from balancerd.commands import UsageError

# Each module has register(parser), which adds its arguments and sets func. Modules import only the
# standard library and numpy at top level; heavier imports (torch for `demo`) happen inside func.
COMMANDS = {
    "run": "balancerd.commands.run",
    "status": "balancerd.commands.status",
    "plan": "balancerd.commands.plan",
    "check-config": "balancerd.commands.check_config",
    "demo": "balancerd.commands.demo",
    "tui": "balancerd.commands.tui",
    "bench": "balancerd.commands.bench",
    "advise": "balancerd.commands.advise",
    "simulate": "balancerd.commands.simulate",
    "record": "balancerd.commands.record",
}

SUMMARIES = {
    "run": "run the daemon (what systemd starts)",
    "status": "show ranks, windows, per-layer imbalance and the last plan, from the running daemon",
    "plan": "plan expert placement for a load file (offline; JSON or SGLang output)",
    "check-config": "validate a configuration file (exit 2 naming the bad key)",
    "demo": "the closed loop on CPU processes: imbalance found, planned and fixed",
    "tui": "the on-call console: live imbalance, heatmaps, stragglers, plans and actions (--once: text)",
    "bench": "measure EP serving on this host's GPUs (bench ep): throughput, TPOT, all-to-all share",
    "advise": "predict TPOT of every EP / TP x EP layout that fits on G GPUs and recommend one",
    "simulate": "replay a count trace through detection and the planner on a cluster of any size",
    "record": "record a count trace from the live telemetry rings (for simulate)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="balancerd",
        description="Watch and fix expert load imbalance in expert-parallel MoE inference.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        importlib.import_module(module).register(sub.add_parser(name, help=SUMMARIES[name],
                                                                description=SUMMARIES[name]))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"balancerd {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
