"""Re-predict a recorded `balancerd bench ep` run with another run's single-GPU calibration samples.

The lab's cost model is calibrated from samples taken in the same run: all-to-all latency and bandwidth
per EP size (a property of the run's GPUs and links) and single-GPU terms (weight-read bandwidth,
matmul rates, per-layer floors). When the single-GPU calibration pass itself changes (as when expert
reads moved from eager timing to CUDA-graph replays), the measured rows of an earlier run stay valid;
this rebuilds that run's report with its own all-to-all samples and the single-GPU samples of a newer
run on the same GPU model:

    python3 benchmarks/lab_repredict.py --measured benchmarks/results/lab/qwen3-ep421-4gpu-machine.raw.json \\
        --single-gpu benchmarks/results/lab/qwen3-ep21-2gpu-machine.raw.json --out /tmp/repredict

DIR gets the same files as `bench ep` (summary.md, ep_bench.csv, calibration.json, plots). CPU only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:  # run as a file: balancerd comes from this checkout
    sys.path.insert(0, ROOT)

from balancerd.lab.report import build_report  # noqa: E402

LINK_SAMPLES = ("a2a", "a2a_graph")  # what belongs to the measured run's GPUs and links


def merged_raw(measured: dict, single_gpu: dict) -> dict:
    """The measured run with every calibration sample but the all-to-all ones taken from single_gpu."""
    gpus = measured["meta"].get("gpu"), single_gpu["meta"].get("gpu")
    if gpus[0] != gpus[1]:
        raise ValueError(f"GPU models differ: {gpus[0]} vs {gpus[1]}")
    calibration = {k: v for k, v in single_gpu["calibration"].items() if k not in LINK_SAMPLES}
    calibration.update({k: measured["calibration"][k] for k in LINK_SAMPLES if k in measured["calibration"]})
    return {**measured, "calibration": calibration}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--measured", type=Path, required=True,
                   help="raw.json of the run whose rows are predicted")
    p.add_argument("--single-gpu", type=Path, required=True, help="raw.json giving the single-GPU samples")
    p.add_argument("--out", type=Path, required=True, help="directory for the rebuilt report")
    args = p.parse_args(argv)
    raw = merged_raw(json.loads(args.measured.read_text()), json.loads(args.single_gpu.read_text()))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "raw.json").write_text(json.dumps(raw, indent=1))
    report = build_report(args.out)
    print(report["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
