"""`balancerd bench ep` end to end on CPU: two gloo processes, EP 1 and 2 with rebalancing, one toy layer;
the CSV, summary, calibration file and progress lines it promises."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
from loop_harness import balancerd_cli

from balancerd.lab.calibration import load

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    r = subprocess.run([*balancerd_cli(), "bench", "ep", "--ep", "1,2", "--layers", "1", "--device", "cpu",
                        "--tiny", "--batch", "4", "--prompt", "8", "--output", "4", "--rebalance",
                        "--out", str(out), "--timeout", "120"],
                       cwd=REPO, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return out, r


def test_every_case_is_measured_and_predicted(bench):
    out, _ = bench
    with open(out / "ep_bench.csv") as f:
        rows = list(csv.DictReader(f))
    cases = {(r["ep"], r["placement"], r["phase"]) for r in rows}
    assert cases == {(ep, placement, phase) for ep, placement in (("1", "static"), ("2", "static"),
                                                                  ("2", "rebalanced"))
                     for phase in ("prefill", "decode")}
    for r in rows:
        assert not r.get("error"), r
        step, full = float(r["step_ms"]), float(r["full_model_ms"])
        assert step > 0 and full > 10 * step  # 1 measured layer, scaled to Qwen3's 94
        ratio = float(r["predicted_over_measured"])
        assert math.isfinite(ratio) and ratio > 0
        assert 0 <= float(r["a2a_share"]) <= 1
        assert r["dispatch"] == ("exact" if r["phase"] == "prefill" else "capacity")
        assert r["mode"] == "eager"  # no CUDA graphs on CPU
    assert all(float(r["a2a_share"]) > 0 for r in rows if r["ep"] == "2")
    assert all(int(r["plan_moves"]) > 0 for r in rows if r["placement"] == "rebalanced")


def test_summary_calibration_and_progress(bench):
    out, run = bench
    text = (out / "summary.md").read_text()
    for phrase in ("## Measured", "## Cost model against the measurements", "Cost model against measurement:",
                   "Attention is a stand-in", "scaled to 94 layers", "## Advisor"):
        assert phrase in text, phrase
    cal = load(out / "calibration.json")
    assert cal.source.startswith("bench ep calibration pass") and "not for sizing" in cal.source
    assert 2 in cal.a2a and any("all-to-all over 2 GPUs" in n for n in cal.notes)
    assert "[bench ep" in run.stderr and "ep 2 rebalanced decode" in run.stderr
    assert "runs within 25%" in run.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "No plots" in text
    else:
        assert (out / "step_breakdown.png").stat().st_size > 0 and "![throughput.png]" in text


def test_bad_batch_is_refused_before_launching(tmp_path):
    r = subprocess.run([sys.executable, "-m", "balancerd.cli", "bench", "ep", "--ep", "1,2", "--batch", "3",
                        "--device", "cpu", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "does not split over EP [2]" in r.stderr
    assert not (tmp_path / "raw.json").exists()
