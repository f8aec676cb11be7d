"""`balancerd status`: ranks, windows, per-layer imbalance, the last plan, from the running daemon."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from balancerd.api import ApiClient, DaemonUnavailable
from balancerd.commands import UsageError
from balancerd.config import ConfigError, load_config, resolve_socket
from balancerd.protocol import runtime_dir
from balancerd.tui.model import fmt_dur

MAX_LAYERS_SHOWN = 10


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the daemon's state snapshot as JSON")
    parser.add_argument("--socket", metavar="PATH", type=Path,
                        help="the daemon's API socket (default: from --config, else "
                             "<runtime dir>/balancerd.sock)")
    parser.add_argument("--config", metavar="FILE", type=Path, help="read api.socket / runtime_dir from it")
    parser.add_argument("--all-layers", action="store_true", help="list every layer, not only the worst")
    parser.set_defaults(func=run)


def socket_path(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return args.socket
    if args.config is not None:
        try:
            return resolve_socket(load_config(args.config))
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
    return runtime_dir(create=False) / "balancerd.sock"


def run(args: argparse.Namespace) -> int:
    path = socket_path(args)
    try:
        response = ApiClient(path).request({"op": "status"})
    except DaemonUnavailable:
        print(f"balancerd is not running (nothing answers on {path})")
        return 1
    except PermissionError:
        print(f"permission denied on {path}: run as the daemon's user or a member of its api.group")
        return 1
    except TimeoutError:
        print(f"balancerd on {path} did not answer in time")
        return 1
    except ConnectionError as exc:
        print(f"lost the connection to balancerd on {path}: {exc}")
        return 1
    if not response.get("ok"):
        print(f"balancerd refused the request: {response.get('error')}")
        return 1
    state = response["state"]
    if args.json:
        print(json.dumps(state, indent=2, sort_keys=True))
    else:
        print(render(state, all_layers=args.all_layers))
    return 0


def render(state: dict, all_layers: bool = False) -> str:
    """The snapshot as text for a terminal."""
    d = state["daemon"]
    lines = [f"balancerd pid {d['pid']}, up {fmt_dur(d['uptime_s'])}, runtime dir {d['runtime_dir']}"]
    if d["bad_segments"]:
        lines.append(f"  {d['bad_segments']} unusable segment files seen (see the log)")
    if not state["jobs"]:
        lines.append("no jobs: no telemetry rings in the runtime directory")
    for name, job in state["jobs"].items():
        lines += [""] + _job_lines(name, job, all_layers)
    return "\n".join(lines)


def _job_lines(name: str, j: dict, all_layers: bool) -> list[str]:
    p, w = j["policy"], j["window"]
    role = "leader (plans)" if j["leader"] else "observer (rank 0 is on another node)"
    out = [
        f"job {name}: generation {j['generation']}, world {j['world']}, {j['layers']} layers x "
        f"{j['experts']} experts on {j['slots']} slots, {role}",
        f"  policy {p['kind']} ({p['mode']}), serving placement version {j['served_version']}",
        f"  window {w['intervals']}/{w['capacity']} intervals, {w['assignments']} assignments per layer, "
        f"decay half-life {w['decay_half_life_s']:g} s",
        "  rank  age      accepted  dropped  invalid  step_us   plan status",
    ]
    for r in j["ranks"]:
        st = r["status"]
        plan = "-" if st is None else f"v{st['applied_version']} {st['result']}"
        if st is not None and st["result"] == "rejected":
            plan += f" ({st['reason']})"
        age = fmt_dur(r["age_s"]) + (" STALE" if r["stale"] else "") + ("" if r["current"] else " old-gen")
        step = f"{r['step_us']:.0f}" if "step_us" in r else "-"
        out.append(f"  {r['rank']:<5} {age:<8} {r['accepted']:<9} {r['dropped']:<8} "
                   f"{r['invalid'] + r['rejected']:<8} {step:<9} {plan}")
    layers = sorted(j["per_layer"], key=lambda x: -x["max_min"])
    if layers:
        shown = layers if all_layers else layers[:MAX_LAYERS_SHOWN]
        title = "all layers" if len(shown) == len(layers) else f"worst {len(shown)} of {len(layers)} layers"
        out.append(f"  {title} (GPU load max/min, max/mean):")
        for x in shown:
            ratio = ">1e6" if x["max_min"] > 1e6 else f"{x['max_min']:.2f}"
            out.append(f"    layer {x['layer']:<4} {ratio:>8}  {x['balancedness']:.3f}"
                       f"{'  FLAGGED' if x['flagged'] else ''}")
    if j["detection"] is not None:
        out.append(f"  detector: {j['detection']['reason']}")
    for s in j["stragglers"]:
        out.append(f"  straggler: rank {s['rank']} late {s['late_us']:.0f} us per step, "
                   f"waited on by ranks {', '.join(map(str, s['waiting_ranks']))}")
    plan = j["last_plan"]
    if plan is None:
        out.append("  last plan: none")
    else:
        acks = ", ".join(f"{r}:{a}" for r, a in plan["acks"].items()) or "none yet"
        out.append(f"  last plan: v{plan['version']} {plan['policy']} ({plan['source']}), "
                   f"{fmt_dur(plan['age_s'])} ago: {plan['state']}; acks {acks}")
        if plan["rejection"]:
            r = plan["rejection"]
            out.append(f"    rejected by rank {r['rank']}: {r['reason']} {r['detail']}".rstrip())
        if "moves" in plan:
            out.append(f"    {plan['moves']} moves, balancedness {plan['balancedness_before']['mean']} -> "
                       f"{plan['balancedness_after']['mean']}, gain {plan['predicted_gain_s']} s vs "
                       f"migration {plan['migration_cost_s']} s")
    backoff = j.get("plan_backoff") or {}
    if backoff.get("failed_plans"):
        out.append(f"  backing off: {backoff['failed_plans']} failed plan(s) in a row; next automatic plan "
                   f"in {fmt_dur(backoff['left_s'])} at the earliest")
    return out

