"""The GPU benchmark scripts on CPU (`--device cpu --tiny`, two gloo ranks under torchrun): they run to
the end and write the rows and files that docs/benchmarks.md quotes, so a GPU session never spends its
minutes on a script that broke in between. CPU timings mean nothing and are not checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def torchrun(script: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           f"benchmarks/{script}", "--device", "cpu", "--tiny", "--out", str(out), *args]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def test_loop_gpu_applies_a_plan_and_reports_phases_and_profiles(tmp_path: Path) -> None:
    torchrun("loop_gpu.py", tmp_path, "--profile-steps", "2", "--planner-tolerance", "0.01",
             "--micro-batches", "2")
    (row,) = json.loads((tmp_path / "loop.json").read_text())
    assert not row["error"], row
    assert row["micro_batches"] == "2" and row["transport"] == "nccl"
    assert row["plan_state"] == "applied" and row["max_rel_err"] < 1e-4
    assert row["balancedness_after"] < row["balancedness_before"]
    for phase in ("dispatch", "expert", "combine"):
        for when in ("before", "after"):
            assert 0 < row[f"{phase}_ms_min_{when}"] <= row[f"{phase}_ms_max_{when}"]
    for when in ("static", "rebalanced"):
        for rank in (0, 1):
            assert (tmp_path / f"profile-t64-m2-{when}-rank{rank}.txt").stat().st_size > 0
    assert (tmp_path / "steps.csv").exists()


def test_loop_gpu_interleaved_ranges_apply_a_plan_with_outputs_unchanged(tmp_path: Path) -> None:
    torchrun("loop_gpu.py", tmp_path, "--planner-tolerance", "0.01", "--micro-batches", "2i", "--reference")
    (row,) = json.loads((tmp_path / "loop.json").read_text())
    assert not row["error"], row
    assert row["micro_batches"] == "2i"
    assert row["planner"] == "daemon (automatic)", "the daemon pushes on its own: it sees the MoE time"
    assert row["plan_state"] == "applied" and row["max_rel_err"] < 1e-4
    assert row["expert_ms_max_after"] > 0 and row["dispatch_ms_max_after"] == 0
    assert row["balancedness_after"] < row["balancedness_before"]


def test_runtime_gpu_overhead_ablation_and_write_from(tmp_path: Path) -> None:
    torchrun("runtime_gpu.py", tmp_path, "--sections", "overhead", "--models", "qwen3-235b-a22b",
             "--tokens", "16", "--on-parts", "counters", "--write-from", "step", "--segment-steps", "16")
    (row,) = json.loads((tmp_path / "overhead.json").read_text())
    assert not row["error"], row
    assert row["model"] == "qwen3-235b-a22b" and row["publishes"] == 0  # no controller: nothing published
    assert row["steps_per_mode"] == 4 * 16


def test_runtime_gpu_equivalence_whole_and_pipelined(tmp_path: Path) -> None:
    torchrun("runtime_gpu.py", tmp_path, "--sections", "equivalence", "--eq-tokens", "24")
    rows = json.loads((tmp_path / "equivalence.json").read_text())
    assert {r["mode"] for r in rows} == {"exact", "capacity", "exact-pipelined", "capacity-pipelined",
                                         "exact-interleaved", "capacity-interleaved"}
    assert all(r["ok"] and not r["error"] for r in rows), rows


def test_telemetry_probe_times_three_modes_and_writes_its_profiles(tmp_path: Path) -> None:
    torchrun("telemetry_probe.py", tmp_path, "--rounds", "2", "--profile-blocks", "1", "--device-steps", "2",
             "--tokens", "8")
    for rank in (0, 1):
        lines = (tmp_path / f"times-rank{rank}.txt").read_text().splitlines()
        assert [line.split(":")[0] for line in lines] == ["off", "count", "on"]
        assert all("32 steps" in line for line in lines)
    for mode in ("off", "count", "on"):
        assert "function calls" in (tmp_path / f"host-{mode}.txt").read_text()
    assert (tmp_path / "device-count.txt").stat().st_size > 0
