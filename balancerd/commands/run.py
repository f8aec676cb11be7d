"""`balancerd run`: the daemon. SIGTERM/SIGINT stop it; SIGHUP reloads the configuration.

Under systemd (Type=notify) it reports READY=1 after its first step, RELOADING=1 and READY=1 around
a reload, WATCHDOG=1 while ingest is healthy (balancerd.watchdog) and STOPPING=1 when it stops.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import os
import signal
import time
from pathlib import Path

from balancerd.commands import UsageError
from balancerd.config import ConfigError, DaemonConfig, load_config

DEFAULT_CONFIG = Path("/etc/balancerd/balancerd.toml")


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", type=Path,
                        help=f"TOML configuration (default: {DEFAULT_CONFIG} when it exists, else built-in "
                             "defaults)")
    parser.add_argument("--runtime-dir", metavar="DIR", type=Path,
                        help="directory of the shared-memory segments (overrides runtime_dir)")
    parser.set_defaults(func=run)


def read_config(args: argparse.Namespace) -> DaemonConfig:
    """The configuration named on the command line; ConfigError when it cannot be used."""
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    cfg = load_config(path) if path is not None else DaemonConfig()
    if args.runtime_dir is not None:
        cfg = dataclasses.replace(cfg, runtime_dir=os.path.abspath(args.runtime_dir))
    return cfg


def run(args: argparse.Namespace) -> int:
    try:
        cfg = read_config(args)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    from balancerd.daemon import Daemon  # after validation: a bad config fails fast
    from balancerd.log import Log
    from balancerd.sdnotify import Notifier, watchdog_interval
    from balancerd.watchdog import Watchdog

    log = Log(cfg.log_level)
    faulthandler.enable()  # a watchdog abort (SIGABRT) leaves every thread's stack in the journal
    try:
        daemon = Daemon(cfg, log)
    except OSError as exc:
        log.error("cannot start", reason=exc)
        return 1
    try:
        notifier = Notifier.from_environment()
    except ValueError as exc:
        log.warning("not notifying the service manager", reason=exc)
        notifier = Notifier(None)
    timeout_s = watchdog_interval()
    watchdog = Watchdog(notifier, timeout_s, log) if notifier.enabled and timeout_s else None
    reload_requested = False
    ready = False

    # Handlers only set flags and write to the daemon's wake-up pipe: they may interrupt the main
    # thread anywhere, even while it holds the log's lock.
    def on_stop(_signum, _frame) -> None:
        daemon.stop()

    def on_hup(_signum, _frame) -> None:
        nonlocal reload_requested
        reload_requested = True
        daemon.wake()

    def on_tick() -> None:
        nonlocal reload_requested, ready
        if not ready:  # the API socket is bound and the first step is done
            notifier.notify(READY=1, STATUS="running")
            ready = True
        if reload_requested:
            reload_requested = False
            notifier.notify(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)
            try:
                daemon.reload(read_config(args))
            except ConfigError as exc:
                log.error("reload failed; keeping the running configuration", reason=exc)
            notifier.notify(READY=1)
        if watchdog is not None:
            watchdog.tick(lambda: daemon.snapshot(time.time()))

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    try:
        daemon.run_forever(on_tick)
    except OSError as exc:  # the API socket could not be bound, typically
        log.error("cannot run", reason=exc)
        return 1
    finally:
        notifier.notify(STOPPING=1)
        daemon.close()
        notifier.close()
    return 0
