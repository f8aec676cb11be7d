"""`balancerd check-config FILE`: validate a configuration file without starting anything."""

from __future__ import annotations

import argparse

from balancerd.commands import UsageError
from balancerd.config import ConfigError, DaemonConfig, load_config


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="TOML configuration file")
    parser.set_defaults(func=run)


def summary(cfg: DaemonConfig) -> str:
    """One line describing what the daemon would do with ``cfg``."""
    d, p = cfg.detect, cfg.policy
    moves = cfg.planner.max_moves_per_layer
    return (
        f"policy {p.kind} ({p.mode}); flag a layer at GPU max/min > {d.threshold:g} for {d.sustain} "
        f"windows of {cfg.window.intervals} intervals (clear < {d.clear_threshold:g}, cooldown "
        f"{d.cooldown_s:g} s); moves per layer {moves if moves else 'unlimited'}; poll "
        f"{cfg.poll_interval_s:g} s; job {cfg.job or 'all'}; metrics on {cfg.metrics.prometheus_address}"
    )


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.file)
    except ConfigError as exc:
        raise UsageError(f"{args.file}: {exc}" if exc.key else str(exc)) from None
    print(f"{args.file}: ok: {summary(cfg)}")
    return 0
