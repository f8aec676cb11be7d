"""Write dashboards/balancerd.json, the Grafana dashboard, from balancerd's metric definitions.

Every PromQL name comes from ``balancerd.metrics.METRICS``, the table the daemon builds its
instruments from. ``python dashboards/generate.py`` writes the file; ``--check`` writes nothing and
exits 1 when the committed file differs from what would be written, when it or dashboards/alerts.yml
names a metric balancerd does not define, or when a panel lacks a unit or a description.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from balancerd.metrics import BY_NAME, METRICS

HERE = Path(__file__).resolve().parent
DASHBOARD = HERE / "balancerd.json"
ALERTS = HERE / "alerts.yml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'instance=~"$instance", moe_job=~"$moe_job"'
NODE = 'instance=~"$instance"'
RATIO = "suffix:×"  # max/min and max/mean load ratios
NAME_RE = re.compile(r"\bbalancerd_[a-z0-9_]+")


def metric(name: str, kind: str = "") -> str:
    """The Prometheus name of the OpenTelemetry metric ``name`` (a KeyError when it is not defined),
    with ``kind`` ("bucket", "total", ...) when a scrape shows it as one of several samples."""
    d = BY_NAME[name]
    sample = f"{d.prometheus}_{kind}" if kind else d.prometheus
    if sample not in d.samples:
        raise KeyError(f"{name} has no sample {sample}; it has {', '.join(d.samples)}")
    return sample


def quantile(q: float, name: str, by: str = "") -> str:
    return (f"histogram_quantile({q}, sum by (le{', ' + by if by else ''}) "
            f"(rate({metric(name, 'bucket')}{{{SEL}}}[$__rate_interval])))")


def increase(name: str, by: str = "moe_job") -> str:
    return f"sum by ({by}) (increase({metric(name, 'total')}{{{SEL}}}[$__rate_interval]))"


def per_second(name: str, by: str) -> str:
    return f"sum by ({by}) (rate({metric(name, 'total')}{{{SEL}}}[$__rate_interval]))"


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    """One panel; ``core`` panels must return data against the CPU demo (tests/integration)."""

    title: str
    unit: str
    description: str
    targets: tuple[Target, ...]
    kind: str = "timeseries"       # timeseries | heatmap
    core: bool = False
    width: int = 12
    threshold: float | None = None
    bars: bool = False


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


ROWS: tuple[Row, ...] = (
    Row("Balance", (
        Panel("Per-layer imbalance (GPU max/min)", RATIO,
              "GPU max/min load of every MoE layer over the daemon's sliding window; one row per layer. "
              "Rebalancing pays above 3.",
              (Target(f'max by (layer) ({metric("balancerd.layer.imbalance")}{{{SEL}}})', "{{layer}}"),),
              kind="heatmap", core=True),
        Panel("Worst layer", RATIO,
              "The most imbalanced layer's GPU max/min and max/mean load (balancedness), per job. The "
              "line marks 3, where the detector's default threshold sits.",
              (Target(f'max by (instance, moe_job) ({metric("balancerd.layer.imbalance")}{{{SEL}}})',
                      "max/min {{moe_job}} {{instance}}"),
               Target(f'max by (instance, moe_job) ({metric("balancerd.layer.balancedness")}{{{SEL}}})',
                      "max/mean {{moe_job}} {{instance}}")),
              core=True, threshold=3.0),
        Panel("Load share per rank", "percentunit",
              "Share of the job's (token, expert) assignments each rank's GPU processes over the window, "
              "under the served placement. Even is 1/world.",
              (Target(f'{metric("balancerd.rank.load.share")}{{{SEL}}}', "rank {{rank}} {{moe_job}}"),),
              core=True, width=24),
    )),
    Row("All-to-all", (
        Panel("Dispatch latency", "s",
              "Dispatch all-to-all time per MoE layer and step: 50th, 90th and 99th percentiles over every "
              "rank and layer.",
              tuple(Target(quantile(q, "balancerd.rank.dispatch.duration"), f"p{round(q * 100)}")
                    for q in (0.5, 0.9, 0.99)), core=True, width=8),
        Panel("Combine latency", "s",
              "Combine all-to-all time per MoE layer and step: 50th, 90th and 99th percentiles over every "
              "rank and layer.",
              tuple(Target(quantile(q, "balancerd.rank.combine.duration"), f"p{round(q * 100)}")
                    for q in (0.5, 0.9, 0.99)), core=True, width=8),
        Panel("Dispatch p99 per rank", "s",
              "99th percentile of the dispatch time per layer and step, per rank: a rank whose peers wait "
              "on it shows here first.",
              (Target(quantile(0.99, "balancerd.rank.dispatch.duration", "rank"), "rank {{rank}}"),),
              core=True, width=8),
        Panel("All-to-all share of step time", "percentunit",
              "Share of each rank's step spent in the dispatch and combine all-to-alls, over the window.",
              (Target(f'{metric("balancerd.rank.alltoall.share")}{{{SEL}}}', "rank {{rank}} {{moe_job}}"),),
              core=True),
        Panel("Step time", "s", "Mean step time of each rank over the window.",
              (Target(f'{metric("balancerd.rank.step.duration")}{{{SEL}}}', "rank {{rank}} {{moe_job}}"),),
              core=True),
    )),
    Row("Plans and migrations", (
        Panel("Plans", "short",
              "Plans published, applied by every rank, not acknowledged in time, and rejected by a rank "
              "(by reason), per interval.",
              (Target(increase("balancerd.plans.proposed"), "proposed {{moe_job}}"),
               Target(increase("balancerd.plans.applied"), "applied {{moe_job}}"),
               Target(increase("balancerd.plans.unacknowledged"), "unacknowledged {{moe_job}}"),
               Target(increase("balancerd.plans.rejected", "moe_job, reason"),
                      "rejected: {{reason}} {{moe_job}}")),
              core=True, width=8, bars=True),
        Panel("Predicted and realised gain", "percentunit",
              "Share of MoE layer time the last applied placement plan was predicted to save, and the "
              "share measured with it serving (the window's loads under the served placement).",
              (Target(f'{metric("balancerd.plan.predicted_gain")}{{{SEL}}}', "predicted {{moe_job}}"),
               Target(f'{metric("balancerd.plan.realised_gain")}{{{SEL}}}', "realised {{moe_job}}")),
              core=True, width=8),
        Panel("Migration", "bytes",
              "Expert weight bytes received by the ranks applying placement plans, per interval.",
              (Target(increase("balancerd.migration.transferred"), "{{moe_job}}"),), width=4, bars=True),
        Panel("Migration time", "s",
              "Mean wall time of a placement plan's migration (slowest rank), per interval with one.",
              (Target(f'sum by (moe_job) (increase({metric("balancerd.migration.duration", "sum")}{{{SEL}}}'
                      f'[$__rate_interval])) / sum by (moe_job) (increase('
                      f'{metric("balancerd.migration.duration", "count")}{{{SEL}}}[$__rate_interval]))',
                      "{{moe_job}}"),), width=4),
    )),
    Row("Telemetry", (
        Panel("Records per second", "suffix: records/s",
              "Telemetry records the daemon read, found overwritten (dropped) and rejected (invalid), per "
              "rank.",
              tuple(Target(per_second(f"balancerd.telemetry.records.{k}", "moe_job, rank"),
                           f"{k} rank {{{{rank}}}}") for k in ("read", "dropped", "invalid")),
              core=True, width=8),
        Panel("Record age", "s",
              "Seconds since each rank's newest telemetry record; it grows when a rank stops publishing.",
              (Target(f'{metric("balancerd.rank.record.age")}{{{SEL}}}', "rank {{rank}} {{moe_job}}"),),
              core=True, width=8),
        Panel("Daemon heartbeat age", "s",
              "Seconds since the daemon's last loop step, as of the query (a stalled loop grows it).",
              (Target(f'time() - {metric("balancerd.daemon.heartbeat")}{{{NODE}}}', "{{instance}}"),),
              core=True, width=8),
    )),
    Row("GPUs (NVML)", (
        Panel("GPU utilization", "percentunit",
              "Share of the sample period a kernel ran, per GPU (NVML; absent without a driver).",
              (Target(f'{metric("balancerd.gpu.utilization")}{{{NODE}}}', "GPU {{gpu}} {{instance}}"),),
              width=6),
        Panel("GPU memory", "bytes", "GPU memory in use and installed, per GPU (NVML).",
              (Target(f'{metric("balancerd.gpu.memory.used")}{{{NODE}}}', "used GPU {{gpu}} {{instance}}"),
               Target(f'{metric("balancerd.gpu.memory.total")}{{{NODE}}}',
                      "total GPU {{gpu}} {{instance}}")), width=6),
        Panel("GPU power", "watt", "Power draw per GPU (NVML).",
              (Target(f'{metric("balancerd.gpu.power")}{{{NODE}}}', "GPU {{gpu}} {{instance}}"),), width=6),
        Panel("NVLink throughput", "Bps",
              "NVLink data bytes per second over all links, per GPU and direction (NVML).",
              (Target(f'rate({metric("balancerd.gpu.nvlink.transferred", "total")}{{{NODE}}}'
                      '[$__rate_interval])', "GPU {{gpu}} {{direction}} {{instance}}"),), width=6),
    )),
    Row("Experts (opt-in: metrics.expert_top_n, metrics.expert_layers)", (
        Panel("Hottest experts", "percentunit",
              "Share of each layer's assignments taken by its hottest experts (metrics.expert_top_n); the "
              "expert ids are in balancerd_expert_hot_id.",
              (Target(f'{metric("balancerd.expert.hot.load.share")}{{{SEL}}}',
                      "layer {{layer}} #{{position}}"),)),
        Panel("Experts of chosen layers", "percentunit",
              "Share of the layer's assignments per expert, for the layers in metrics.expert_layers.",
              (Target(f'{metric("balancerd.expert.load.share")}{{{SEL}}}',
                      "layer {{layer}} expert {{expert}}"),),
              kind="heatmap"),
    )),
)

ANNOTATIONS = (
    ("Plans published", "orange", "balancerd.plans.proposed", "plan published"),
    ("Plans applied (migrations)", "green", "balancerd.plans.applied", "plan applied"),
)


def _panel(p: Panel, pid: int, x: int, y: int) -> dict:
    defaults: dict = {"unit": p.unit}
    if p.kind == "timeseries":
        defaults["custom"] = {"drawStyle": "bars" if p.bars else "line", "fillOpacity": 60 if p.bars else 10,
                              "thresholdsStyle": {"mode": "line" if p.threshold is not None else "off"}}
    steps = [{"color": "green", "value": None}]
    if p.threshold is not None:
        steps.append({"color": "red", "value": p.threshold})
    defaults["thresholds"] = {"mode": "absolute", "steps": steps}
    if p.kind == "heatmap":
        options = {"calculate": False, "cellGap": 1, "cellValues": {"unit": p.unit},
                   "color": {"mode": "scheme", "scheme": "Oranges", "scale": "exponential", "exponent": 0.5},
                   "rowsFrame": {"layout": "auto"}, "yAxis": {"axisPlacement": "left"},
                   "tooltip": {"mode": "single", "showColorScale": True}, "legend": {"show": True}}
    else:
        options = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                   "tooltip": {"mode": "multi", "sort": "desc"}}
    return {
        "id": pid, "type": p.kind, "title": p.title, "description": p.description, "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": p.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []}, "options": options,
        "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": t.expr,
                     "legendFormat": t.legend, "range": True, "instant": False}
                    for i, t in enumerate(p.targets)],
    }


def _variable(name: str, label: str, query: str) -> dict:
    return {"name": name, "label": label, "type": "query", "datasource": DATASOURCE,
            "query": {"query": query, "refId": f"{name}-variable"}, "definition": query, "refresh": 2,
            "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "options": [], "sort": 1,
            "hide": 0, "regex": ""}


def _annotation(name: str, color: str, counter: str, title: str) -> dict:
    """Marks each minute ``counter`` grew in, including the minute a job's series first appeared
    already counting (its first increment, which increase() cannot see)."""
    c = f"{metric(counter, 'total')}{{{SEL}}}"
    expr = (f"sum by (instance, moe_job) (increase({c}[1m])) > 0 "
            f"or sum by (instance, moe_job) ({c} unless {c} offset 1m) > 0")
    return {"name": name, "datasource": DATASOURCE, "enable": True, "hide": False, "iconColor": color,
            "expr": expr,
            "step": "1m", "titleFormat": title, "textFormat": "{{moe_job}} on {{instance}}",
            "tagKeys": "moe_job,instance", "useValueForTime": False}


def dashboard() -> dict:
    """The dashboard as Grafana's classic JSON model."""
    panels, pid, y = [], 1, 0
    for row in ROWS:
        panels.append({"id": pid, "type": "row", "title": row.title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y, x = pid + 1, y + 1, 0
        for p in row.panels:
            if x + p.width > 24:
                x, y = 0, y + 8
            panels.append(_panel(p, pid, x, y))
            pid, x = pid + 1, x + p.width
        y += 8
    builtin = {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
               "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts",
               "type": "dashboard"}
    heartbeat = metric("balancerd.daemon.heartbeat")
    return {
        "uid": "balancerd", "title": "balancerd: expert load balancing", "tags": ["balancerd", "moe"],
        "description": "Expert-parallel MoE load, all-to-all latency, plans and GPUs, from balancerd. "
                       "Generated by dashboards/generate.py: edit that, not this file.",
        "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 1, "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"}, "timepicker": {}, "timezone": "", "liveNow": False,
        "annotations": {"list": [builtin, *(_annotation(*a) for a in ANNOTATIONS)]},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "options": [], "refresh": 1, "regex": ""},
            _variable("instance", "Instance", f"label_values({heartbeat}, instance)"),
            _variable("moe_job", "Job", f'label_values({metric("balancerd.layer.imbalance")}'
                                        '{instance=~"$instance"}, moe_job)'),
        ]},
        "panels": panels,
        "links": [],
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def known_names() -> set[str]:
    """Every sample name a balancerd scrape can show."""
    return {s for d in METRICS for s in d.samples}


def problems(dashboard_path: Path, alerts_path: Path) -> list[str]:
    """Why the committed files do not pass ``--check`` (empty when they do)."""
    if not dashboard_path.exists():
        return [f"{dashboard_path} is missing: run python dashboards/generate.py"]
    found = []
    text = dashboard_path.read_text()
    if text != render():
        found.append(f"{dashboard_path} is stale: run python dashboards/generate.py")
    data = json.loads(text)
    exprs = [t["expr"] for p in data["panels"] for t in p.get("targets", ())]
    exprs += [a["expr"] for a in data["annotations"]["list"] if "expr" in a]
    exprs += [v["definition"] for v in data["templating"]["list"] if "definition" in v]
    for where, source in ((dashboard_path, "\n".join(exprs)), (alerts_path, alerts_path.read_text())):
        for name in sorted(set(NAME_RE.findall(source)) - known_names()):
            found.append(f"{where} queries {name}, which balancerd does not define")
    for p in data["panels"]:
        if p["type"] != "row" and not (p.get("description") and p["fieldConfig"]["defaults"].get("unit")):
            found.append(f"{dashboard_path}: panel {p['title']!r} needs a unit and a description")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify instead of writing")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD, help=f"default: {DASHBOARD}")
    parser.add_argument("--alerts", type=Path, default=ALERTS, help=f"default: {ALERTS}")
    args = parser.parse_args(argv)
    if not args.check:
        args.dashboard.write_text(render())
        return 0
    found = problems(args.dashboard, args.alerts)
    for line in found:
        print(line, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
