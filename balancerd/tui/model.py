"""What the console shows, computed from the daemon's state API.

Plain Python, no Textual: ``balancerd tui --once`` prints from it, and the widgets render from it. The
console reads the daemon only through a client with ``request(dict) -> dict`` (an
:class:`~balancerd.api.ApiClient`, or a recording in tests); it never touches shared memory.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from balancerd.api import DaemonUnavailable

NOT_REPORTED = "not reported by this daemon"
NO_JOB = "no job reported by the daemon"
SPARK = "▁▂▃▄▅▆▇█"
HISTORY_POINTS = 60
# Load relative to the layer's mean, binned for the heatmaps: upper bounds of each bin but the last.
HEAT_BINS = (0.5, 0.8, 1.2, 1.5, 2.0)
HEAT_LABELS = ("<0.5", "0.5-0.8", "0.8-1.2", "1.2-1.5", "1.5-2", "≥2")


class Client(Protocol):
    """What the console needs from a daemon connection."""

    path: Path

    def request(self, request: dict) -> dict: ...


@dataclass(frozen=True)
class Reading:
    """One poll of the daemon: its state, or why there is none, and the expert loads asked for.

    ``experts`` is the answer to the ``expert_load`` op for the range asked (None when none was
    asked); it holds ``missing`` when the daemon does not serve that op.
    """

    state: dict | None
    error: str | None = None
    experts: dict | None = None


def call(client: Client, request: dict) -> tuple[dict | None, str | None]:
    """``(response, None)`` when the daemon answered ok, else ``(None, why)``; never raises."""
    try:
        response = client.request(request)
    except DaemonUnavailable as exc:
        return None, str(exc)
    except PermissionError:
        return None, (f"permission denied on {client.path}: run as the daemon's user or a member of "
                      "its api.group")
    except TimeoutError:
        return None, f"balancerd on {client.path} did not answer in time"
    except ConnectionError as exc:
        return None, f"lost the connection to balancerd on {client.path}: {exc}"
    except (OSError, ValueError) as exc:
        return None, f"cannot talk to balancerd on {client.path}: {exc}"
    if not isinstance(response, dict) or not response.get("ok"):
        error = response.get("error") if isinstance(response, dict) else None
        return None, f"refused: {error or 'malformed answer'}"
    return response, None


def read(client: Client, experts: tuple[str, int, int] | None = None) -> Reading:
    """Poll the state, and the loads of ``experts = (job, first layer, count)`` when asked."""
    response, error = call(client, {"op": "status"})
    if response is None:
        return Reading(None, error)
    if not isinstance(response.get("state"), dict):
        return Reading(None, "malformed answer: no state")
    answer = None
    if experts is not None:
        job, first, count = experts
        got, why = call(client, {"op": "expert_load", "job": job, "first": first, "count": count})
        answer = got if got is not None else {"missing": "unknown op" in why, "error": why}
    return Reading(response["state"], None, answer)


class RatioHistory:
    """Per-layer max/min ratio of each job, one point per interval the daemon added, newest last.

    A poll that finds the same window (same generation, same ``added``) adds nothing, so the points
    follow the daemon's intervals, not the poll rate. A new generation starts over.
    """

    def __init__(self, points: int = HISTORY_POINTS):
        self.points = points
        self._jobs: dict[str, tuple[tuple[str, int], list[deque[float]]]] = {}  # (generation, added)

    def observe(self, state: dict) -> None:
        for name, job in state.get("jobs", {}).items():
            layers, key = job["per_layer"], (job["generation"], job["window"]["added"])
            if not layers:
                continue
            seen, series = self._jobs.get(name, ((None, None), []))
            if seen[0] != key[0] or len(series) != len(layers):
                series = [deque(maxlen=self.points) for _ in layers]
            elif seen[1] == key[1]:
                continue
            for s, x in zip(series, layers, strict=True):
                s.append(x["max_min"])
            self._jobs[name] = (key, series)

    def series(self, name: str, job: dict) -> tuple[tuple[float, ...], ...]:
        """Per layer, oldest first: the daemon's own history when it reports one, else ours."""
        if job["per_layer"] and all("max_min_history" in x for x in job["per_layer"]):
            return tuple(tuple(x["max_min_history"]) for x in job["per_layer"])
        entry = self._jobs.get(name)
        if entry is None or entry[0][0] != job["generation"]:
            return tuple(() for _ in job["per_layer"])
        return tuple(tuple(s) for s in entry[1])


@dataclass(frozen=True)
class ConsoleState:
    """Everything the widgets show: connection, the chosen job, its ratio history, expert loads."""

    socket: str
    connected: bool = False
    error: str | None = None
    daemon: dict | None = None
    jobs: tuple[str, ...] = ()
    job_name: str | None = None
    job: dict | None = None
    history: tuple[tuple[float, ...], ...] = ()
    experts: dict | None = None

    @property
    def threshold(self) -> float:
        return self.detect.get("threshold", 3.0)

    @property
    def clear_threshold(self) -> float:
        return self.detect.get("clear_threshold", self.threshold)

    @property
    def straggler_threshold(self) -> float:
        return self.detect.get("straggler_threshold", 1.5)

    @property
    def detect(self) -> dict:
        return (self.daemon or {}).get("config", {}).get("detect", {})

    @property
    def now(self) -> float | None:
        """The daemon's clock at the snapshot (its start plus its uptime)."""
        d = self.daemon
        return None if d is None else d["started"] + d["uptime_s"]


def console_state(previous: ConsoleState, reading: Reading, history: RatioHistory,
                  job_name: str | None) -> ConsoleState:
    """The state after ``reading``; a failed poll keeps the last data and marks it disconnected."""
    if reading.state is None:
        return dataclasses.replace(previous, connected=False, error=reading.error)
    history.observe(reading.state)
    jobs = tuple(reading.state["jobs"])
    name = job_name if job_name in jobs else (jobs[0] if jobs else None)
    job = reading.state["jobs"].get(name) if name is not None else None
    experts = reading.experts if reading.experts is not None else previous.experts
    return ConsoleState(previous.socket, True, None, reading.state["daemon"], jobs, name, job,
                        history.series(name, job) if job is not None else (), experts)


# -- formatting -------------------------------------------------------------------------------------


def fmt_ratio(x: float) -> str:
    """A max/min ratio: "inf" when a GPU had no load (the daemon sends 1e300)."""
    if x >= 1e299:
        return "inf"
    return ">999" if x > 999 else f"{x:.2f}"


def fmt_dur(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def fmt_num(x: float | None) -> str:
    """A measured quantity in 4 significant digits, "-" when missing."""
    if x is None:
        return "-"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-2):
        return f"{x:.2g}"
    return f"{x:.4g}"


def fmt_count(x: float | None) -> str:
    """A token count: 950, 48k, 1.2M; "-" when missing."""
    if x is None:
        return "-"
    if x < 1e4:
        return f"{x:.0f}"
    return f"{x / 1e3:.0f}k" if x < 1e6 else f"{x / 1e6:.1f}M"


def level(ratio: float, threshold: float, clear: float) -> str:
    """"over" at or above the detection threshold, "near" at or above the clear threshold, else "ok"."""
    if ratio >= threshold:
        return "over"
    return "near" if ratio >= clear else "ok"


def spark(values: tuple[float, ...], top: float, width: int) -> str:
    """The last ``width`` values as bars from 1.0 (the floor of a max/min ratio) to ``top``."""
    out = []
    for v in values[-width:]:
        frac = 0.0 if top <= 1.0 else (min(v, top) - 1.0) / (top - 1.0)
        out.append(SPARK[max(0, min(len(SPARK) - 1, round(frac * (len(SPARK) - 1))))])
    return "".join(out)


def heat_bin(rel: float) -> int:
    """The heatmap bin of a load relative to its layer's mean."""
    return sum(rel >= b for b in HEAT_BINS)


# -- rows the views show ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerRow:
    layer: int
    max_min: float
    balancedness: float
    flagged: bool
    history: tuple[float, ...]


def layer_rows(state: ConsoleState) -> list[LayerRow]:
    """Layers worst first (highest max/min; ties by layer)."""
    job = state.job or {}
    history = state.history or tuple(() for _ in job.get("per_layer", ()))
    rows = [LayerRow(x["layer"], x["max_min"], x["balancedness"], x["flagged"], h)
            for x, h in zip(job.get("per_layer", ()), history, strict=True)]
    return sorted(rows, key=lambda r: (-r.max_min, r.layer))


@dataclass(frozen=True)
class RankRow:
    """One rank's timings per step (us) and, when reported, its share of the tokens."""

    rank: int
    step_us: float | None
    expert_us: float | None
    a2a_us: float | None
    wait_us: float | None
    tokens: float | None
    share: float | None      # tokens / mean tokens per GPU
    role: str                # "late", "waits", "stale", "no data" or ""
    applied_version: int | None


def rank_rows(job: dict) -> list[RankRow]:
    """Per rank: step, expert compute, all-to-all time and the part of it spent waiting (its time
    inside the all-to-alls minus the smallest rank's: the late rank waits for nobody)."""
    ranks = job.get("ranks", [])
    a2a = {r["rank"]: r["dispatch_us"] + r["combine_us"] for r in ranks if "dispatch_us" in r}
    floor = min(a2a.values(), default=0.0)
    tokens = gpu_tokens(job)
    mean = sum(tokens) / len(tokens) if tokens else 0.0
    late = {s["rank"] for s in job.get("stragglers", [])}
    waiting = {w for s in job.get("stragglers", []) for w in s["waiting_ranks"]}
    rows = []
    for r in ranks:
        n = r["rank"]
        role = ("stale" if r["stale"] else "late" if n in late else "waits" if n in waiting
                else "" if n in a2a else "no data")
        t = tokens[n] if tokens and n < len(tokens) else None
        status = r.get("status") or {}
        rows.append(RankRow(n, r.get("step_us"), r.get("expert_us"), a2a.get(n),
                            a2a[n] - floor if n in a2a else None, t,
                            t / mean if t is not None and mean > 0 else None, role,
                            status.get("applied_version")))
    return rows


def gpu_tokens(job: dict) -> list[float]:
    """Tokens each GPU processed in the window, summed over layers; [] when not reported."""
    load = job.get("gpu_load")
    if not load:
        return []
    return [sum(row[g] for row in load) for g in range(len(load[0]))]


@dataclass(frozen=True)
class HeatGrid:
    """A heatmap: ``values[row][col]`` with each value's ratio to its row's mean."""

    title: str
    row_labels: tuple[str, ...]
    col_labels: tuple[str, ...]
    values: tuple[tuple[float, ...], ...]
    rel: tuple[tuple[float, ...], ...]
    col_name: str
    first_row: int = 0
    replicas: tuple[tuple[int, ...], ...] | None = None


def _relative(values: list[list[float]]) -> tuple[tuple[float, ...], ...]:
    out = []
    for row in values:
        mean = sum(row) / len(row) if row else 0.0
        out.append(tuple(v / mean if mean > 0 else 0.0 for v in row))
    return tuple(out)


def gpu_grid(job: dict) -> HeatGrid | None:
    """Layers x GPUs from the job's ``gpu_load``; None when the daemon does not report it."""
    load = job.get("gpu_load")
    if not load:
        return None
    return HeatGrid("layers × GPUs", tuple(f"L{i}" for i in range(len(load))),
                    tuple(f"gpu{g}" for g in range(len(load[0]))), tuple(tuple(r) for r in load),
                    _relative(load), "GPU")


def expert_grid(answer: dict) -> HeatGrid:
    """Layers x experts from an ``expert_load`` answer."""
    first, load = answer["first"], answer["load"]
    replicas = answer.get("replicas")
    return HeatGrid(f"layers {first}-{first + len(load) - 1} × experts",
                    tuple(f"L{first + i}" for i in range(len(load))),
                    tuple(str(e) for e in range(len(load[0]) if load else 0)), tuple(tuple(r) for r in load),
                    _relative(load), "expert", first,
                    None if replicas is None else tuple(tuple(r) for r in replicas))


@dataclass(frozen=True)
class PlanRow:
    version: int
    age_s: float | None
    policy: str
    source: str
    state: str
    moves: int | None
    predicted_gain_s: float | None
    migration_cost_s: float | None
    before: float | None
    after: float | None
    realised: float | None
    why: str
    entry: dict


def plan_rows(state: ConsoleState) -> list[PlanRow]:
    """The job's plan history, newest first, with the live state of the last plan."""
    job = state.job or {}
    last = job.get("last_plan")
    entries = list(job.get("history", []))
    if last is not None:
        entries = [last if e["version"] == last["version"] else e for e in entries]
        if not any(e["version"] == last["version"] for e in entries):
            entries.append(last)
    now = state.now
    rows = []
    for e in sorted(entries, key=lambda e: -e["version"]):
        before, after = e.get("balancedness_before"), e.get("balancedness_after")
        realised = e.get("realised_balancedness")
        rows.append(PlanRow(
            e["version"], None if now is None else max(0.0, now - e["published"]), e["policy"], e["source"],
            e["state"], e.get("moves"), e.get("predicted_gain_s"), e.get("migration_cost_s"),
            before["mean"] if before else None, after["mean"] if after else None,
            realised["mean"] if realised else None, plan_why(e), e))
    return rows


def plan_why(entry: dict) -> str:
    """Why a plan ended as it did: the rejection when rejected, else the reason it was made."""
    r = entry.get("rejection")
    if r:
        detail = f" ({r['detail']})" if r.get("detail") else ""
        return f"rank {r['rank']} {r['result']}: {r['reason']}{detail}"
    return entry.get("reason", "")


def acks_progress(job: dict) -> tuple[int, int, dict[str, int]]:
    """(ranks that applied the last plan, world, count of each ack state)."""
    plan = job.get("last_plan") or {}
    counts: dict[str, int] = {}
    for ack in plan.get("acks", {}).values():
        counts[ack] = counts.get(ack, 0) + 1
    return counts.get("applied", 0), job.get("world", 0), counts


def mean_balancedness(job: dict) -> float | None:
    """The window's mean GPU max/mean over layers, as measured now."""
    layers = job.get("per_layer") or []
    return sum(x["balancedness"] for x in layers) / len(layers) if layers else None


# -- sentences shared by the views and --once ----------------------------------------------------------


def policy_lines(job: dict) -> list[str]:
    """The policy, its mode and where each comes from; the detector's verdict."""
    p = job["policy"]
    origin = {k: "set via API" if p["overrides"].get(k) else "configured" for k in ("kind", "mode")}
    role = f"leader, serving v{job['served_version']}" if job["leader"] else (
        f"observer (rank 0 is on another node), serving v{job['served_version']}")
    extra = ""
    if p["kind"] == "drop":
        extra = f", capacity factor {p['capacity_factor']:g}" if p["capacity_factor"] else ", capacity off"
    if p["kind"] == "token":
        extra = f", bias down to {p['bias_min']:.3g}"
    lines = [f"policy {p['kind']} ({origin['kind']}{extra}) · mode {p['mode']} ({origin['mode']}) · {role}"]
    d = job.get("detection")
    if d is not None:
        lines.append(f"detector: {d['reason']}")
    return lines


def straggler_lines(job: dict) -> list[list[str]]:
    """Per straggler: which rank is late and by how much, what explains it, who waits for it."""
    out = []
    for s in job.get("stragglers", []):
        late, expert = s["late_us"], s["expert_excess_us"]
        lines = [f"rank {s['rank']} is late by {late:.0f} µs per step"]
        if expert > 0:
            lines.append(f"expert compute explains {expert:.0f} µs: load imbalance, rebalancing fixes it")
        if late - expert > 0.1 * late:
            lines.append(f"{late - expert:.0f} µs lie outside the experts: attention, host, or a slow GPU")
        waiting = ", ".join(map(str, s["waiting_ranks"]))
        lines.append(f"waiting for it: ranks {waiting}" if waiting else "no rank waits for it")
        out.append(lines)
    return out


def no_straggler_line(threshold: float) -> str:
    return f"none: no rank is busy more than {threshold:g}x the median of the others"


def last_plan_lines(job: dict, now: float | None) -> list[str]:
    """The last plan: what it was, its state, how far the ranks got, and why it failed if it did."""
    plan = job.get("last_plan")
    if plan is None:
        return ["no plan published for this job yet"]
    applied, world, counts = acks_progress(job)
    acks = ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "none yet"
    lines = [f"v{plan['version']} {plan['policy']} ({plan['source']}), {fmt_dur(plan['age_s'])} ago: "
             f"{plan['state']}; {applied}/{world} ranks applied ({acks})"]
    if plan.get("rejection"):
        lines.append(f"rejected: {plan_why(plan)}")
    if "moves" in plan:
        gain, cost = fmt_num(plan["predicted_gain_s"]), fmt_num(plan["migration_cost_s"])
        lines.append(f"{plan['moves']} moves on {plan['layers_changed']} layers, predicted balancedness "
                     f"{plan['balancedness_before']['mean']} → {plan['balancedness_after']['mean']}, "
                     f"gain {gain} s vs migration {cost} s")
    now_mean = mean_balancedness(job)
    if plan["state"] == "applied" and now_mean is not None:
        lines.append(f"measured now: mean balancedness {now_mean:.3f}")
    backoff = job.get("plan_backoff") or {}
    if backoff.get("failed_plans"):
        lines.append(f"backing off: {backoff['failed_plans']} failed in a row; next automatic plan in "
                     f"{fmt_dur(backoff['left_s'])} at the earliest")
    return lines
