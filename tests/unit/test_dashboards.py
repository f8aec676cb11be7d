"""dashboards/: the generator's --check, the alert rules under promtool, provisioning and docs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from balancerd.metrics import METRICS

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "dashboards"
GENERATE = DASHBOARDS / "generate.py"


def generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GENERATE), *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


def promtool(*args: str) -> subprocess.CompletedProcess:
    """Run promtool (skipped without it, outside CI: .ci/run installs Debian's prometheus package)."""
    if shutil.which("promtool") is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing in CI (.ci/run installs Debian's prometheus package)")
        pytest.skip("promtool not installed (apt install prometheus); CI runs this test")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_committed_dashboard_is_current_and_queries_only_defined_metrics():
    r = generate("--check")
    assert r.returncode == 0, r.stderr


def test_check_fails_on_a_stale_dashboard(tmp_path):
    stale = tmp_path / "balancerd.json"
    data = json.loads((DASHBOARDS / "balancerd.json").read_text())
    data["title"] = "edited by hand"
    stale.write_text(json.dumps(data, indent=2) + "\n")
    r = generate("--check", "--dashboard", str(stale))
    assert r.returncode == 1 and "is stale" in r.stderr


def test_check_fails_on_an_undefined_metric(tmp_path):
    dashboard = tmp_path / "balancerd.json"
    text = (DASHBOARDS / "balancerd.json").read_text()
    dashboard.write_text(text.replace("balancerd_rank_step_duration_seconds", "balancerd_rank_step_seconds"))
    alerts = tmp_path / "alerts.yml"
    alerts.write_text((DASHBOARDS / "alerts.yml").read_text().replace(
        "balancerd_rank_record_age_seconds", "balancerd_rank_record_age"))
    r = generate("--check", "--dashboard", str(dashboard), "--alerts", str(alerts))
    assert r.returncode == 1
    assert "queries balancerd_rank_step_seconds, which balancerd does not define" in r.stderr
    assert "queries balancerd_rank_record_age, which balancerd does not define" in r.stderr


def test_dashboard_shape():
    data = json.loads((DASHBOARDS / "balancerd.json").read_text())
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    assert variables["instance"]["type"] == "query"
    panels = [p for p in data["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in data["panels"]}) == len(data["panels"])
    for p in panels:
        assert p["description"] and p["fieldConfig"]["defaults"]["unit"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
        assert all('instance=~"$instance"' in t["expr"] for t in p["targets"]), p["title"]
    kinds = {p["title"]: p["type"] for p in panels}
    assert kinds["Per-layer imbalance (GPU max/min)"] == "heatmap"
    assert {"Dispatch latency", "All-to-all share of step time", "Load share per rank", "GPU power",
            "NVLink throughput"} <= kinds.keys()
    annotations = [a["name"] for a in data["annotations"]["list"] if "expr" in a]
    assert annotations == ["Plans published", "Plans applied (migrations)"]


def test_alert_rules_pass_promtool_check_and_their_unit_tests():
    r = promtool("check", "rules", "dashboards/alerts.yml")
    assert r.returncode == 0 and "SUCCESS: 6 rules found" in r.stdout, r.stdout + r.stderr
    r = promtool("test", "rules", "dashboards/alerts_test.yml")
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_every_alert_has_a_unit_test():
    rules = set(re.findall(r"- alert: (\w+)", (DASHBOARDS / "alerts.yml").read_text()))
    tested = set(re.findall(r"alertname: (\w+)", (DASHBOARDS / "alerts_test.yml").read_text()))
    assert rules and rules == tested


def test_provisioning_points_grafana_at_the_dashboard_files():
    text = (DASHBOARDS / "provisioning" / "dashboards.yml").read_text()
    assert "apiVersion: 1" in text and "type: file" in text and re.search(r"path: /\S+", text)


def test_docs_name_every_metric():
    docs = (ROOT / "docs" / "metrics.md").read_text()
    for d in METRICS:
        assert f"`{d.name}`" in docs and f"`{d.prometheus}" in docs, d.name
