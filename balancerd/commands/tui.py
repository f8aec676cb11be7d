"""`balancerd tui`: the on-call console over the daemon's state API; `--once` prints it as text."""

from __future__ import annotations

import argparse
from pathlib import Path

from balancerd.api import ApiClient
from balancerd.commands import UsageError
from balancerd.commands.status import socket_path


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", metavar="PATH", type=Path,
                        help="the daemon's API socket (default: from --config, else "
                             "<runtime dir>/balancerd.sock)")
    parser.add_argument("--config", metavar="FILE", type=Path, help="read api.socket / runtime_dir from it")
    parser.add_argument("--once", action="store_true",
                        help="print every view of every job (or of --job) as plain text and exit (1 when "
                             "the daemon does not answer)")
    parser.add_argument("--job", metavar="NAME", help="the job to show (default: the first one; j switches)")
    parser.add_argument("--interval", metavar="SECONDS", type=float, default=1.0,
                        help="how often the console polls the daemon (default: 1)")
    parser.add_argument("--timeout", metavar="SECONDS", type=float, default=3.0,
                        help="how long a request may take before the daemon counts as not answering "
                             "(default: 3)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name in ("interval", "timeout"):
        if not getattr(args, name) > 0:
            raise UsageError(f"--{name} must be a positive number of seconds, got {getattr(args, name)}")
    client = ApiClient(socket_path(args), timeout=args.timeout)
    if args.once:
        from balancerd.tui.model import ConsoleState, RatioHistory, console_state, read
        from balancerd.tui.text import render

        reading, empty = read(client), ConsoleState(str(client.path))
        first = console_state(empty, reading, RatioHistory(), args.job)
        names = [first.job_name] if args.job is not None else list(first.jobs)
        print(render([console_state(empty, reading, RatioHistory(), n) for n in names] or [first]))
        return 0 if first.connected else 1
    from balancerd.tui.app import ConsoleApp  # Textual is imported here only

    ConsoleApp(client, interval=args.interval, job=args.job).run()
    return 0
