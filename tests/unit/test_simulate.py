"""Traces (read, write, record from live rings, telemetry fit) and the what-if simulator on a synthetic
trace: balanced traffic, then a skewed phase the daemon's loop must detect and fix."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from balancerd.cli import main
from balancerd.config import DaemonConfig, DetectConfig
from balancerd.lab.calibration import Calibration, Link
from balancerd.lab.costmodel import Workload, remote_ranks, row_bytes
from balancerd.lab.models import MODELS
from balancerd.lab.simulate import Cluster, simulate
from balancerd.lab.trace import Trace, calibrate_from_trace, read_trace, write_trace
from balancerd.protocol import RingShape, TelemetryWriter, new_generation

LAYERS, EXPERTS, GPUS, SLOTS, TOP_K = 4, 16, 4, 20, 4
SPEC = dataclasses.replace(MODELS["qwen3-235b-a22b"], moe_layers=LAYERS, layers=LAYERS, experts=EXPERTS,
                           top_k=TOP_K)


def synthetic_trace(intervals: int = 24, skewed_from: int = 6, seed: int = 0) -> Trace:
    """Uniform loads, then Zipf(1.5) ones with a random hot set per layer; 16 steps of 64 tokens each."""
    rng = np.random.default_rng(seed)
    zipf = 1 / np.arange(1, EXPERTS + 1) ** 1.5
    hot = np.stack([rng.permutation(zipf) for _ in range(LAYERS)])
    hot /= hot.sum(axis=1, keepdims=True)
    flat = np.full((LAYERS, EXPERTS), 1 / EXPERTS)
    per_interval = 16 * 64 * TOP_K
    counts = np.stack([np.stack([rng.multinomial(per_interval, (hot if t >= skewed_from else flat)[layer])
                                 for layer in range(LAYERS)]) for t in range(intervals)])
    return Trace(counts, np.arange(intervals) * 2.0, np.full(intervals, 16), gpus=GPUS, slots=SLOTS)


@pytest.fixture(scope="module")
def runs():
    config = DaemonConfig(detect=DetectConfig(threshold=2.0, clear_threshold=1.5, sustain=2, min_tokens=1000,
                                              cooldown_s=10.0))
    trace = synthetic_trace()
    return trace, {r.policy: r for r in simulate(trace, SPEC, Cluster(GPUS, SLOTS), Workload(64, 512, 64),
                                                 Calibration(), config)}


def test_static_never_plans_and_suffers_the_skew(runs):
    trace, by = runs
    static = by["static"]
    assert static.plans == 0 and static.migration_s == 0
    assert static.balancedness[:6].max() < 1.2 < static.balancedness[8:].min()
    assert static.prefill_ms[8:].mean() > 1.2 * static.prefill_ms[:6].mean()


def test_placement_detects_plans_and_fixes(runs):
    trace, by = runs
    placement, static = by["placement"], by["static"]
    assert placement.plans >= 1 and placement.moves > 0 and placement.migration_s > 0
    assert any("imbalanced" in e for e in placement.events)
    assert np.allclose(placement.balancedness[:6], static.balancedness[:6])  # nothing to do before the skew
    assert placement.balancedness[-6:].mean() < 0.8 * static.balancedness[-6:].mean()
    assert placement.prefill_ms[-6:].mean() < static.prefill_ms[-6:].mean()


def test_oracle_bounds_and_drop_drops(runs):
    _, by = runs
    assert by["oracle"].balancedness.mean() <= by["placement"].balancedness.mean() + 1e-9
    assert by["oracle"].prefill_ms.mean() <= by["static"].prefill_ms.mean()
    drop = by["drop"]
    assert 0 < drop.dropped_share < 0.5
    assert drop.balancedness.mean() < by["static"].balancedness.mean()
    summary = drop.summary()
    assert summary["dropped_share"] == drop.dropped_share and summary["plans"] == 0


def test_shape_mismatch_and_unknown_policy():
    with pytest.raises(ValueError, match="layers"):
        simulate(synthetic_trace(), MODELS["qwen3-235b-a22b"], Cluster(GPUS, SLOTS), Workload(64, 512, 64),
                 Calibration())
    with pytest.raises(ValueError, match="unknown policies"):
        simulate(synthetic_trace(), SPEC, Cluster(GPUS, SLOTS), Workload(64, 512, 64), Calibration(),
                 policies=("magic",))


# ---------------------------------------------------------------------------------------------------
# Traces


def test_trace_round_trip_and_other_formats(tmp_path):
    trace = dataclasses.replace(synthetic_trace(4, 0), tokens=np.full(4, 64.0),
                                dispatch_us=np.ones((4, LAYERS)), combine_us=np.ones((4, LAYERS)),
                                expert_us=np.ones((4, LAYERS)), step_us=np.ones(4), job="j")
    write_trace(tmp_path / "t.npz", trace)
    back = read_trace(tmp_path / "t.npz")
    assert np.array_equal(back.counts, trace.counts) and np.array_equal(back.steps, trace.steps)
    assert (back.gpus, back.slots, back.job) == (GPUS, SLOTS, "j")
    assert np.array_equal(back.dispatch_us, trace.dispatch_us)
    assert back.tokens_per_step(TOP_K) == pytest.approx(64.0)
    np.save(tmp_path / "t.npy", trace.counts)
    assert read_trace(tmp_path / "t.npy").intervals == 4
    (tmp_path / "l.json").write_text(json.dumps({"logical_count": trace.counts[0].tolist()}))
    one = read_trace(tmp_path / "l.json")
    assert one.intervals == 1 and one.tokens_per_step(TOP_K) is None


def test_calibrate_from_telemetry_recovers_the_link():
    truth = Link(25.0, 150.0)
    tokens = np.array([16.0, 64.0, 256.0, 1024.0, 4096.0])
    per_token = remote_ranks(SPEC.experts, GPUS, TOP_K) * (row_bytes(SPEC.hidden, TOP_K) + 2 * SPEC.hidden)
    per_layer = 3 * truth.alpha_us + tokens * per_token / (truth.beta_gbps * 1e3)  # dispatch + combine
    t = len(tokens)
    trace = Trace(np.ones((t, LAYERS, EXPERTS), np.int64), np.arange(t, dtype=float), np.full(t, 4),
                  gpus=GPUS, tokens=tokens, dispatch_us=np.repeat(per_layer[:, None] * 0.6, LAYERS, 1),
                  combine_us=np.repeat(per_layer[:, None] * 0.4, LAYERS, 1))
    cal = calibrate_from_trace(trace, SPEC, Calibration())
    assert cal.a2a[GPUS].alpha_us == pytest.approx(25.0, rel=1e-6)
    assert cal.a2a[GPUS].beta_gbps == pytest.approx(150.0, rel=1e-6)
    with pytest.raises(ValueError, match="timings"):
        calibrate_from_trace(dataclasses.replace(trace, dispatch_us=None), SPEC, Calibration())


def test_record_reads_live_rings(tmp_path):
    shape, gen = RingShape(LAYERS, EXPERTS, SLOTS // GPUS), new_generation()
    rings = [TelemetryWriter.create(tmp_path, "job1", r, GPUS, gen, shape) for r in range(GPUS)]
    trace = synthetic_trace(5, 0)
    for i, counts in enumerate(trace.counts):
        for r, ring in enumerate(rings):
            ring.write(first_step=16 * i, last_step=16 * i + 15, tokens=16 * 64 // GPUS, placement_version=0,
                       routed=counts // GPUS, global_routed=counts, received=np.zeros((LAYERS, 5), np.int32),
                       dispatch_us=np.full(LAYERS, 10.0 + r), combine_us=np.full(LAYERS, 5.0),
                       expert_us=np.full(LAYERS, 20.0), step_us=500.0)
    out = tmp_path / "rec.npz"
    assert main(["record", "--out", str(out), "--seconds", "0.2", "--runtime-dir", str(tmp_path)]) == 0
    for ring in rings:
        ring.close()
    got = read_trace(out)
    assert np.array_equal(got.counts, trace.counts)
    assert (got.gpus, got.slots, got.job) == (GPUS, SLOTS, "job1")
    assert np.array_equal(got.steps, np.full(5, 16))
    assert got.dispatch_us == pytest.approx(np.full((5, LAYERS), 11.5))  # mean over the ranks
    assert got.step_us == pytest.approx(np.full(5, 500.0)) and got.tokens == pytest.approx(np.full(5, 16.0))


def test_record_without_rings_is_a_usage_error(tmp_path, capsys):
    assert main(["record", "--out", str(tmp_path / "x.npz"), "--seconds", "0", "--runtime-dir",
                 str(tmp_path)]) == 2
    assert "no telemetry intervals" in capsys.readouterr().err


def test_simulate_cli(tmp_path, capsys):
    write_trace(tmp_path / "t.npz", synthetic_trace(8, 2))
    rc = main(["simulate", "--loads", str(tmp_path / "t.npz"), "--gpus", "8", "--slots", "24", "--nodes", "2",
               "--policy", "static,oracle", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and [p["policy"] for p in doc["policies"]] == ["static", "oracle"]
    # 64 tokens x top-4 assignments a step, read as top-8 tokens: the resized preset keeps Qwen3's top-8
    assert doc["batch"] == 32 and "resized" in doc["notes"][0]
    assert doc["policies"][1]["prefill_ms_mean"] < doc["policies"][0]["prefill_ms_mean"]
    assert main(["simulate", "--loads", str(tmp_path / "t.npz"), "--gpus", "8", "--slots", "8"]) == 2
    assert "cannot hold" in capsys.readouterr().err
    assert main(["simulate", "--loads", str(tmp_path / "t.npz"), "--gpus", "8", "--slots", "24", "--nodes",
                 "3"]) == 2
