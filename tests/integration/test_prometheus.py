"""A real Prometheus scraping a real daemon fed by the CPU demo's ranks.

The demo (`balancerd.demo.run_demo`: a `balancerd run` process and four CPU ranks over gloo) runs
with its daemon's metrics on a known port; Prometheus scrapes it every second and loads
dashboards/alerts.yml. Then every dashboard query (panels, annotations, variables) and every alert
expression is evaluated through Prometheus's HTTP API: each must parse, and the core panels must
return data. Skipped only where the binaries are missing outside CI (.ci/run installs them).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from functools import partial
from pathlib import Path

import pytest

from balancerd.demo import DemoOptions, run_demo
from tests import polling

pytestmark = pytest.mark.slow
wait_until = partial(polling.wait_until, poll_s=0.2)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "dashboards"
SUBSTITUTIONS = {"$__rate_interval": "10s", "$__interval": "2s", "$instance": ".*", "$moe_job": ".*"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need_binaries() -> None:
    missing = [b for b in ("prometheus", "promtool") if shutil.which(b) is None]
    if missing and os.environ.get("CI"):
        pytest.fail(f"{', '.join(missing)} missing in CI (.ci/run installs Debian's prometheus package)")
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt install prometheus); CI runs this test")


def get(url: str) -> dict | str | None:
    """JSON (or text) from ``url``; None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
    except urllib.error.HTTPError as exc:  # a bad query gets 400 or 422 and a JSON error; not ready, 503
        text = exc.read().decode()
        return json.loads(text) if text.startswith("{") else None
    except OSError:
        return None
    return json.loads(text) if text.startswith("{") else text


class Prometheus:
    """`prometheus` on a temp config and TSDB, scraping ``target`` every second, with the alert rules."""

    def __init__(self, work: Path, target: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = work / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(DASHBOARDS / "alerts.yml")],
            "scrape_configs": [{"job_name": "balancerd", "static_configs": [{"targets": [target]}]}],
        }))
        self.log = open(work / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=self.log)

    def __enter__(self) -> Prometheus:
        wait_until(lambda: self.proc.poll() is not None or get(f"{self.url}/-/ready"), 60, "Prometheus")
        assert self.proc.poll() is None, Path(self.log.name).read_text()[-2000:]
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def api(self, path: str, **params) -> dict:
        return get(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}")


def load_generator():
    spec = importlib.util.spec_from_file_location("dashboards_generate", DASHBOARDS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def substitute(expr: str) -> str:
    for var, value in SUBSTITUTIONS.items():
        expr = expr.replace(var, value)
    return expr


def test_dashboard_and_alerts_against_prometheus_scraping_the_demo(tmp_path):
    need_binaries()
    metrics_port = free_port()
    demo: dict = {}

    def run() -> None:
        try:
            demo["report"] = run_demo(DemoOptions(metrics_port=metrics_port, timeout_s=120), io.StringIO(),
                                      progress=False)
        except Exception as exc:  # reported by the assertion below
            demo["error"] = exc

    with Prometheus(tmp_path, f"127.0.0.1:{metrics_port}") as prom:
        start = time.time()
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        # While the ranks run, the daemon's own scrape passes `promtool check metrics`.
        def histograms() -> str | None:
            assert "error" not in demo, demo["error"]
            text = get(f"http://127.0.0.1:{metrics_port}/metrics")
            return text if text and "_dispatch_duration_seconds_bucket" in text else None

        text = wait_until(histograms, 90, "the daemon's latency histograms")
        check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                               timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        thread.join(150)
        assert "report" in demo, demo.get("error", "the demo did not finish")
        assert demo["report"]["plans_applied"] >= 1 and demo["report"]["reference_match"]
        end = time.time()

        generator = load_generator()
        dashboard = json.loads((DASHBOARDS / "balancerd.json").read_text())
        core = {p.title for row in generator.ROWS for p in row.panels if p.core}
        assert core, "no core panels"
        empty = []
        for panel in dashboard["panels"]:
            for target in panel.get("targets", ()):
                r = prom.api("query_range", query=substitute(target["expr"]), start=start, end=end, step=1)
                assert r["status"] == "success", (panel["title"], target["expr"], r)
                if panel["title"] in core and not r["data"]["result"]:
                    empty.append(f"{panel['title']}: {target['expr']}")
        assert not empty, "core panels without data:\n" + "\n".join(empty)
        for note in dashboard["annotations"]["list"]:
            if "expr" in note:
                r = prom.api("query_range", query=substitute(note["expr"]), start=start, end=end, step=1)
                assert r["status"] == "success", (note["name"], r)
                assert r["data"]["result"], f"annotation {note['name']!r} found no event"
        # Template variables: Grafana's label_values(metric, label) is the label values API.
        for var in dashboard["templating"]["list"]:
            if var["type"] == "query":
                metric, label = re.fullmatch(r"label_values\((.+), (\w+)\)", var["definition"]).groups()
                r = prom.api(f"label/{label}/values", **{"match[]": substitute(metric), "start": start,
                                                         "end": end})
                assert r["status"] == "success" and r["data"], (var["name"], r)

        # The alert rules loaded and evaluate cleanly; each expression also runs as a query.
        names = {line.split(": ")[1] for line in (DASHBOARDS / "alerts.yml").read_text().splitlines()
                 if line.strip().startswith("- alert: ")}

        def evaluated() -> list[dict] | None:
            rules = [r for g in prom.api("rules")["data"]["groups"] for r in g["rules"]]
            return rules if rules and all(r["health"] != "unknown" for r in rules) else None

        rules = wait_until(evaluated, 30, "every rule to be evaluated")
        assert {r["name"] for r in rules} == names
        for rule in rules:
            assert rule["health"] == "ok", rule
            r = prom.api("query", query=rule["query"], time=(start + end) / 2)
            assert r["status"] == "success", (rule["name"], r)
