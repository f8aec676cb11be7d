"""benchmarks/lab_repredict.py: the measured run keeps its rows and all-to-all samples, every other
calibration sample comes from the other run; the recorded runs in benchmarks/results rebuild."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "lab"


def _module():
    spec = importlib.util.spec_from_file_location("lab_repredict", ROOT / "benchmarks" / "lab_repredict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_merge_takes_links_from_the_measured_run_and_the_rest_from_the_other() -> None:
    lab = _module()
    measured = {"meta": {"gpu": "H200"}, "rows": [1],
                "calibration": {"a2a": "m", "a2a_graph": "mg", "floor": "old"}}
    other = {"meta": {"gpu": "H200"}, "rows": [2],
             "calibration": {"a2a": "o", "floor": "new", "expert_read": "r"}}
    merged = lab.merged_raw(measured, other)
    assert merged["rows"] == [1]
    assert merged["calibration"] == {"a2a": "m", "a2a_graph": "mg", "floor": "new", "expert_read": "r"}
    with pytest.raises(ValueError, match="GPU models differ"):
        lab.merged_raw(measured, {**other, "meta": {"gpu": "H100"}})


def test_recorded_four_gpu_run_rebuilds_within_the_advisor_tolerance(tmp_path: Path) -> None:
    lab = _module()
    assert lab.main(["--measured", str(RESULTS / "qwen3-ep421-4gpu-machine.raw.json"),
                     "--single-gpu", str(RESULTS / "qwen3-ep21-2gpu-machine.raw.json"),
                     "--out", str(tmp_path)]) == 0
    with open(tmp_path / "ep_bench.csv") as f:
        rows = list(csv.DictReader(f))
    ratios = {(r["ep"], r["placement"], r["phase"]): float(r["predicted_over_measured"]) for r in rows}
    assert len(ratios) == 10 and {ep for ep, _, _ in ratios} == {"1", "2", "4"}
    assert all(0.75 <= v <= 1.25 for v in ratios.values()), ratios
    summary = (tmp_path / "summary.md").read_text()
    assert "10 of 10 runs within 25%" in summary
    if importlib.util.find_spec("matplotlib") is None:  # an optional extra: balancerd[lab]
        assert "No plots: matplotlib is not installed" in summary
    else:
        assert (tmp_path / "predicted_vs_measured.png").stat().st_size > 0
