"""`balancerd plan`: every input format, both output formats, --current, --max-moves, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from balancerd.cli import main
from balancerd.loads_io import PLAN_FORMAT
from balancerd.placement import (
    Topology,
    balancedness,
    contiguous_gpu_loads,
    count_moves,
    initial_placement,
    validate_placement,
)

LAYERS, EXPERTS, GPUS, SLOTS = 4, 16, 4, 20
KEYS = {"layers", "experts", "gpus", "slots", "balancedness_before", "balancedness_after",
        "worst_layer_after", "max_min_after", "moves", "plan_ms"}


def zipf_loads(layers: int = LAYERS, experts: int = EXPERTS, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, experts + 1) ** 1.2
    return np.stack([rng.permutation(weights) * 65536 for _ in range(layers)]).round()


@pytest.fixture
def loads() -> np.ndarray:
    return zipf_loads()


@pytest.fixture
def npy(tmp_path, loads) -> Path:
    path = tmp_path / "loads.npy"
    np.save(path, loads)
    return path


def plan(capsys, *args: str, gpus: int = GPUS, slots: int = SLOTS) -> dict:
    """Run `balancerd plan ... --json` in-process and return its object."""
    rc = main(["plan", "--gpus", str(gpus), "--slots", str(slots), "--json", *map(str, args)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    doc = json.loads(out)
    assert set(doc) == KEYS
    return doc


def test_npy_plan_improves_balance(capsys, npy, loads, tmp_path):
    out = tmp_path / "plan.json"
    doc = plan(capsys, "--loads", npy, "--out", out)
    assert (doc["layers"], doc["experts"], doc["gpus"], doc["slots"]) == (LAYERS, EXPERTS, GPUS, SLOTS)
    # "before" is expert e alone on GPU e * G // E
    assert doc["balancedness_before"] == pytest.approx(balancedness(contiguous_gpu_loads(loads, GPUS)).mean())
    assert doc["balancedness_after"] < doc["balancedness_before"]
    assert doc["worst_layer_after"] >= doc["balancedness_after"] >= 1.0
    assert doc["max_min_after"] >= doc["worst_layer_after"]
    assert doc["plan_ms"] >= 0
    written = json.loads(out.read_text())
    assert written["format"] == PLAN_FORMAT
    assert (written["experts"], written["gpus"], written["slots"]) == (EXPERTS, GPUS, SLOTS)
    assert written["slots_per_gpu"] == [5, 5, 5, 5]
    p2l = np.array(written["physical_to_logical"])
    validate_placement(p2l, EXPERTS, Topology(GPUS, SLOTS), LAYERS)
    static = initial_placement(LAYERS, EXPERTS, Topology(GPUS, SLOTS))
    assert doc["moves"] == int(count_moves(static, p2l).sum())


def test_one_dimensional_npy_is_one_layer(capsys, tmp_path, loads):
    path = tmp_path / "one.npy"
    np.save(path, loads[0])
    assert plan(capsys, "--loads", path)["layers"] == 1


def test_json_and_npy_agree(capsys, tmp_path, npy, loads):
    path = tmp_path / "loads.json"
    path.write_text(json.dumps({"logical_count": loads.astype(int).tolist()}))
    a, b = plan(capsys, "--loads", path), plan(capsys, "--loads", npy)
    for key in KEYS - {"plan_ms"}:
        assert a[key] == pytest.approx(b[key]), key


def test_sglang_pt_dump(capsys, tmp_path, npy, loads):
    torch = pytest.importorskip("torch")
    steps = np.stack([np.floor(loads / 2), np.ceil(loads / 2)]).astype(np.int32)   # [N, L, E]
    path = tmp_path / "expert_distribution_recorder_1.pt"
    torch.save({"rank": 0, "logical_count": torch.from_numpy(steps),
                "average_utilization_rate_over_window": None}, path)
    a, b = plan(capsys, "--loads", path), plan(capsys, "--loads", npy)
    assert a["balancedness_before"] == pytest.approx(b["balancedness_before"])


def test_pt_without_torch_is_a_clear_error(capsys, tmp_path, monkeypatch):
    path = tmp_path / "dump.pt"
    path.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)
    assert main(["plan", "--loads", str(path), "--gpus", "4", "--slots", "20"]) == 2
    assert "needs torch, which is not installed" in capsys.readouterr().err


def test_human_summary(capsys, npy, tmp_path):
    out = tmp_path / "p.json"
    assert main(["plan", "--loads", str(npy), "--gpus", "4", "--slots", "20", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "4 layers x 16 experts on 4 GPUs, 20 slots" in text
    assert "balancedness" in text and "slot moves from the static placement" in text
    assert f"wrote {out} (balancerd.placement/1)" in text


def test_current_round_trip(capsys, npy, tmp_path):
    first_out, second_out = tmp_path / "first.json", tmp_path / "second.json"
    first = plan(capsys, "--loads", npy, "--out", first_out)
    second = plan(capsys, "--loads", npy, "--current", first_out, "--out", second_out)
    # "before" is now the current plan, which is already balanced for these loads
    assert second["balancedness_before"] == pytest.approx(first["balancedness_after"])
    assert second["balancedness_after"] <= second["balancedness_before"] + 1e-9
    assert second["moves"] <= 0.1 * LAYERS * SLOTS
    a = np.array(json.loads(first_out.read_text())["physical_to_logical"])
    b = np.array(json.loads(second_out.read_text())["physical_to_logical"])
    assert second["moves"] == int(count_moves(a, b).sum())


def test_max_moves_is_respected(capsys, npy, tmp_path):
    current = tmp_path / "static.json"
    static = initial_placement(LAYERS, EXPERTS, Topology(GPUS, SLOTS))
    current.write_text(json.dumps({"format": PLAN_FORMAT, "experts": EXPERTS, "gpus": GPUS, "slots": SLOTS,
                                   "slots_per_gpu": [5] * 4, "physical_to_logical": static.tolist()}))
    unlimited = plan(capsys, "--loads", npy, "--current", current)
    assert unlimited["moves"] > 2 * LAYERS
    out = tmp_path / "limited.json"
    limited = plan(capsys, "--loads", npy, "--current", current, "--max-moves", 2, "--out", out)
    new = np.array(json.loads(out.read_text())["physical_to_logical"])
    assert (count_moves(static, new) <= 2).all()
    assert limited["moves"] <= 2 * LAYERS
    assert limited["balancedness_after"] <= limited["balancedness_before"]


def test_max_moves_without_current_counts_from_the_static_placement(capsys, npy, tmp_path):
    out = tmp_path / "limited.json"
    limited = plan(capsys, "--loads", npy, "--max-moves", 3, "--out", out)
    new = np.array(json.loads(out.read_text())["physical_to_logical"])
    assert (count_moves(STATIC, new) <= 3).all() and limited["moves"] <= 3 * LAYERS
    assert limited["balancedness_after"] < limited["balancedness_before"]


def test_sglang_format(capsys, npy, tmp_path):
    out = tmp_path / "sglang.json"
    plan(capsys, "--loads", npy, "--format", "sglang", "--out", out)
    doc = json.loads(out.read_text())
    assert list(doc) == ["physical_to_logical_map"]
    p2l = np.array(doc["physical_to_logical_map"])
    validate_placement(p2l, EXPERTS, Topology(GPUS, SLOTS), LAYERS)
    # an SGLang file serves as --current too
    again = plan(capsys, "--loads", npy, "--current", out)
    assert again["moves"] <= 0.1 * LAYERS * SLOTS


def test_console_script(npy, tmp_path):
    script = Path(sys.executable).parent / "balancerd"
    ok = subprocess.run([str(script), "plan", "--loads", str(npy), "--gpus", "4", "--slots", "20", "--json"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert set(json.loads(ok.stdout)) == KEYS
    bad = subprocess.run([str(script), "plan", "--loads", str(tmp_path / "missing.npy"), "--gpus", "4",
                          "--slots", "20"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.startswith("balancerd plan: ") and bad.stderr.count("\n") == 1
    assert "Traceback" not in bad.stderr


def write(tmp_path: Path, name: str, content) -> Path:
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


GOOD = zipf_loads()
STATIC = initial_placement(LAYERS, EXPERTS, Topology(GPUS, SLOTS))


def plan_doc(p2l: np.ndarray, experts: int = EXPERTS, gpus: int = GPUS, slots: int = SLOTS) -> dict:
    return {"format": PLAN_FORMAT, "experts": experts, "gpus": gpus, "slots": slots,
            "slots_per_gpu": Topology(gpus, slots).slots_per_gpu.tolist(),
            "physical_to_logical": p2l.tolist()}


def edited(**changes) -> np.ndarray:
    """GOOD with some entries replaced: edited(at=(1, 3), value=-5)."""
    a = GOOD.copy()
    a[changes["at"]] = changes["value"]
    return a


def missing_expert() -> np.ndarray:
    a = STATIC.copy()
    a[0, a[0] == 7] = 8
    return a


def with_current(doc: dict) -> dict:
    return {"loads.npy": GOOD, "cur.json": doc}


CURRENT = {"--current": "cur.json"}
BAD = {
    "negative load": ({"loads.npy": edited(at=(1, 3), value=-5)}, {},
                      "load of layer 1 expert 3 is negative (-5)"),
    "nan load": ({"loads.npy": edited(at=(2, 0), value=np.nan)}, {}, "load of layer 2 expert 0 is nan"),
    "4-d loads": ({"loads.npy": GOOD[None, None]}, {}, "must be [E], [L, E] or [N, L, E]"),
    "empty loads": ({"loads.npy": np.zeros((2, 0))}, {}, "loads are empty"),
    "string loads": ({"loads.json": {"logical_count": [["a", "b"]]}}, {}, "loads must be numbers"),
    "ragged json": ({"loads.json": {"logical_count": [[1, 2], [3]]}}, {}, "not a rectangular array"),
    "json without key": ({"loads.json": {"counts": [1, 2]}}, {}, 'a "logical_count" array'),
    "broken json": ({"loads.json": "{"}, {}, "not valid JSON"),
    "broken npy": ({"loads.npy": b"\x93NUMPY garbage"}, {}, "cannot read as .npy"),
    "unknown suffix": ({"loads.csv": "1,2,3"}, {}, "unknown load file type '.csv'"),
    "missing file": ({}, {}, "loads.npy: cannot read as .npy"),
    "fewer slots than experts": ({"loads.npy": GOOD}, {"--slots": "12"}, "--slots 12 cannot hold 16 experts"),
    "no gpus": ({"loads.npy": GOOD}, {"--gpus": "0"}, "--gpus must be >= 1, got 0"),
    "nodes do not divide": ({"loads.npy": GOOD}, {"--nodes": "3"}, "--nodes must be >= 1 and divide gpus=4"),
    "negative max moves": ({"loads.npy": GOOD}, {"--max-moves": "-1"}, "--max-moves must be >= 0"),
    "sglang uneven slots": ({"loads.npy": GOOD}, {"--slots": "18", "--format": "sglang"},
                            "18 slots do not divide over 4 GPUs"),
    "current for other layers": (with_current(plan_doc(STATIC[:2])), CURRENT,
                                 "plan is [2 layers, 20 slots], expected [4, 20]"),
    "current for other experts": (with_current(plan_doc(STATIC, experts=17)), CURRENT,
                                  "plan is for 17 experts, the loads have 16"),
    "current for other gpus": (with_current(plan_doc(STATIC, gpus=2)), CURRENT,
                               "plan is for 2 GPUs, --gpus is 4"),
    "current with other slots": (with_current({"physical_to_logical_map": STATIC[:, :16].tolist()}), CURRENT,
                                 "plan is [4 layers, 16 slots], expected [4, 20]"),
    "current missing an expert": (with_current(plan_doc(missing_expert())), CURRENT,
                                  "layer 0: expert 7 has no replica"),
    "current of unknown format": (with_current({"format": "other/1"}), CURRENT,
                                  "expected 'balancerd.placement/1'"),
    "current with wrong slots_per_gpu": (with_current({**plan_doc(STATIC), "slots_per_gpu": [20]}), CURRENT,
                                         '"slots_per_gpu" is [20], expected [5, 5, 5, 5]'),
    "current with float ids": (with_current({"physical_to_logical_map": [[0.5] * 20] * 4}), CURRENT,
                               "array of integers"),
    "current missing": ({"loads.npy": GOOD}, {"--current": "nope.json"}, "nope.json: cannot read"),
    "unwritable out": ({"loads.npy": GOOD}, {"--out": "no/such/dir/plan.json"}, "cannot write"),
}


@pytest.mark.parametrize("files, extra, message", BAD.values(), ids=BAD.keys())
def test_bad_input_exits_2(capsys, tmp_path, monkeypatch, files, extra, message):
    monkeypatch.chdir(tmp_path)
    for name, content in files.items():
        write(tmp_path, name, content)
    args = {"--loads": next(iter(files), "loads.npy"), "--gpus": "4", "--slots": "20", **extra}
    assert main(["plan", *[x for kv in args.items() for x in kv]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("balancerd plan: ") and err.count("\n") == 1
    assert message in err, err


def test_pt_without_logical_count(capsys, tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "x.pt"
    torch.save({"physical_count": torch.zeros(2, 3)}, path)
    assert main(["plan", "--loads", str(path), "--gpus", "4", "--slots", "20"]) == 2
    assert 'expected a dict with a "logical_count" tensor' in capsys.readouterr().err
    path.write_bytes(b"garbage")
    assert main(["plan", "--loads", str(path), "--gpus", "4", "--slots", "20"]) == 2
    assert "cannot load as a torch file" in capsys.readouterr().err
