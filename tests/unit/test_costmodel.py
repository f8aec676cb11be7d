"""The lab's cost model, calibration fits and advisor: shapes, traffic, fits, predictions, recommendation."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch

from balancerd.cli import main
from balancerd.lab.advise import advise, layouts, to_json
from balancerd.lab.calibration import (
    Calibration,
    CalibrationError,
    Link,
    fit_floor,
    fit_line,
    fit_link,
    fit_net_rate,
    from_samples,
    load,
    save,
)
from balancerd.lab.costmodel import (
    Parallelism,
    Workload,
    decode_step,
    memory_per_gpu,
    predict,
    prefill,
    remote_ranks,
    row_bytes,
    touched_fraction,
    with_layers,
)
from balancerd.lab.models import MODELS, model_spec
from balancerd.lab.report import check_line, enrich
from kernels.permute import row_layout
from moe_runtime.config import PRESETS

QWEN = MODELS["qwen3-235b-a22b"]
WORK = Workload(batch=64, prompt=1024, output=256)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shapes_match_the_runtime_presets_and_the_published_size(name):
    spec, cfg = MODELS[name], PRESETS[name]
    assert (spec.hidden, spec.intermediate, spec.experts, spec.top_k, spec.moe_layers) == (
        cfg.hidden, cfg.intermediate, cfg.experts, cfg.top_k, cfg.layers)
    assert spec.shared_intermediate == cfg.shared_intermediate
    assert spec.total_params == pytest.approx(spec.published_params, rel=0.005)
    assert spec.tiny().standin_attn_params == spec.tiny().attn_params


@pytest.mark.parametrize("hidden,top_k", [(4096, 8), (7168, 8), (64, 4), (100, 3)])
def test_row_bytes_is_the_runtime_row_layout(hidden, top_k):
    assert row_bytes(hidden, top_k) == row_layout(hidden, top_k, torch.bfloat16).width * 2


def test_remote_ranks_matches_sampling():
    rng = np.random.default_rng(0)
    experts, ep, k = 16, 4, 4
    picks = np.argsort(rng.random((20000, experts)), axis=1)[:, :k]  # distinct uniform experts per token
    ranks = picks // (experts // ep)
    distinct = np.array([len(set(r)) for r in ranks])
    other = distinct - np.array([0 in r for r in ranks])  # token lives on rank 0
    assert remote_ranks(experts, ep, k) == pytest.approx(other.mean(), rel=0.02)
    assert remote_ranks(experts, 1, k) == 0.0
    assert remote_ranks(8, 8, 2) == pytest.approx(7 * 2 / 8)  # one expert a rank: each holds a pick w.p. k/E


def test_touched_fraction():
    assert touched_fraction(128, 8, 1) == pytest.approx(8 / 128)
    assert touched_fraction(128, 8, 64) == pytest.approx(1 - (120 / 128) ** 64)


# ---------------------------------------------------------------------------------------------------
# Fits and the calibration file


def test_fit_link_recovers_latency_and_bandwidth():
    truth = Link(40.0, 300.0)
    points = [(b, truth.alpha_us + b / (truth.beta_gbps * 1e3)) for b in (3e4, 3e5, 3e6, 3e7, 3e8)]
    link = fit_link(points)
    assert link.alpha_us == pytest.approx(40.0, rel=1e-6)
    assert link.beta_gbps == pytest.approx(300.0, rel=1e-6)


def test_fit_line_through_the_origin_when_points_cannot_separate_the_terms():
    assert fit_line([(100.0, 4.0)]) == (0.0, pytest.approx(0.04))
    with pytest.raises(ValueError):
        fit_line([(0.0, 1.0)])


def test_fit_floor():
    per_layer, per_step = fit_floor([(1, 130.0), (3, 330.0)])
    assert (per_layer, per_step) == (pytest.approx(100.0), pytest.approx(30.0))
    with pytest.raises(ValueError):
        fit_floor([(2, 10.0), (2, 11.0)])


def raw_samples() -> dict:
    link = Link(20.0, 200.0)
    return {
        "a2a": {"2": [[b, link.alpha_us + b / 2e5] for b in (1e4, 1e6, 1e8)]},
        "a2a_graph": {"2": [[b, 10.0 + b / 2e5] for b in (1e4, 1e6, 1e8)]},
        "dense_read": [[1e9, 300.0], [2e9, 550.0]],      # 4 GB/s slope
        "expert_read": [[1e9, 500.0]],
        "dense_flops": [[7e11, 1000.0]], "expert_flops": [[5e11, 1000.0]], "sdpa_flops": [[4e11, 1000.0]],
        "floor": {"graph": [[1, 60.0], [3, 140.0]], "prefill": [[1, 500.0], [3, 1300.0]]},
    }


def test_from_samples_fits_what_was_measured_and_keeps_the_rest():
    cal = from_samples(raw_samples(), "test")
    assert cal.a2a[2].alpha_us == pytest.approx(20.0) and cal.a2a[2].beta_gbps == pytest.approx(200.0)
    assert cal.a2a[4] == Calibration().a2a[4]  # not measured: the ANCHORS default stays
    assert cal.link(2, graph=True)[0].alpha_us == pytest.approx(10.0)
    assert cal.dense_read_gbps == pytest.approx(4000.0)
    assert cal.expert_read_gbps == pytest.approx(2000.0)
    assert (cal.dense_tflops, cal.expert_tflops, cal.sdpa_tflops) == pytest.approx((700.0, 500.0, 400.0))
    assert cal.floor_us_per_layer["graph"] == pytest.approx(40.0)
    assert cal.floor_us_per_step["graph"] == pytest.approx(20.0)
    assert cal.floor_us_per_layer["eager"] == Calibration().floor_us_per_layer["eager"]
    assert cal.source == "test"
    assert any("measured" in n and "2 GPUs" in n for n in cal.notes)


def test_expert_reads_net_of_the_fixed_cost_of_the_call():
    # a call that costs 40 us with nothing to read, then 1 GB per 500 us at 8 slots (few tiles, a slow
    # start) and 2 GB per 800 us at 16: each point's own rate, not the slope (which would drop the
    # slow start with the intercept)
    raw = {"expert_read": [[1e9, 540.0], [2e9, 840.0]], "expert_read_base_us": 40.0,
           "expert_read_mode": "graph"}
    cal = from_samples(raw, "test")
    rates = np.array([2000.0, 2500.0])
    assert cal.expert_read_gbps == pytest.approx(np.sum(rates ** 2) / np.sum(rates))
    assert not any("expert reads timed" in n for n in cal.notes)
    assert fit_net_rate([[1e9, 30.0]], 40.0) is None
    # eager (or an older pass without the fixed-cost point): the old slope, and a note that says so
    old = from_samples({"expert_read": [[1e9, 540.0], [2e9, 840.0]]}, "test")
    assert old.expert_read_gbps == pytest.approx(1e9 / 300.0 * 1e-3)
    assert any("expert reads timed eager" in n for n in old.notes)


def test_calibration_file_round_trip(tmp_path):
    cal = from_samples(raw_samples(), "test")
    save(cal, tmp_path / "c.json")
    assert load(tmp_path / "c.json") == cal
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CalibrationError, match="bad.json"):
        load(tmp_path / "bad.json")
    with pytest.raises(CalibrationError, match="cannot read"):
        load(tmp_path / "missing.json")


def test_unmeasured_gpu_counts_borrow_the_nearest_smaller_link():
    cal = Calibration()
    link, note = cal.link(8)
    assert link == cal.a2a[4] and "8 GPUs uses the 4-GPU" in note
    assert cal.link(4) == (cal.a2a[4], None)


# ---------------------------------------------------------------------------------------------------
# Predictions


def test_decode_terms_by_hand():
    cal = Calibration()
    spec, par = QWEN, Parallelism(ep=4)
    layer = decode_step(spec, par, WORK, cal, []).layer
    rows = 3 * 16  # capacity mode: each of 16 tokens to each of the 3 other ranks
    assert layer.a2a_latency == pytest.approx(2 * cal.a2a[4].alpha_us)
    assert layer.a2a_bandwidth == pytest.approx(rows * (row_bytes(4096, 8) + 8192) / (335.0 * 1e3))
    read = 32 * touched_fraction(128, 8, 64) * spec.expert_bytes
    assert layer.expert_read == pytest.approx(read / (cal.expert_read_gbps * 1e3))
    assert layer.kv_read == pytest.approx(16 * (1024 + 128) * 2048 / (cal.dense_read_gbps * 1e3))
    one = decode_step(spec, Parallelism(ep=1), WORK, cal, []).layer
    assert one.a2a == 0.0 and one.tp_comm == 0.0
    measured = dataclasses.replace(WORK, touched=0.25)
    assert decode_step(spec, par, measured, cal, []).layer.expert_read == pytest.approx(
        32 * 0.25 * spec.expert_bytes / (cal.expert_read_gbps * 1e3))


def test_graph_decode_uses_the_graph_link_when_measured():
    cal = dataclasses.replace(Calibration(), a2a_graph={4: Link(5.0, 335.0)})
    graph = decode_step(QWEN, Parallelism(ep=4), WORK, cal, []).layer
    eager_work = dataclasses.replace(WORK, decode_mode="eager")
    eager = decode_step(QWEN, Parallelism(ep=4), eager_work, cal, []).layer
    assert graph.a2a_latency == pytest.approx(10.0)
    assert eager.a2a_latency == pytest.approx(2 * cal.a2a[4].alpha_us)
    assert eager.floor == cal.floor_us_per_layer["eager"] > graph.floor


def test_prefill_is_compute_bound_and_scales_with_imbalance():
    cal = Calibration()
    par = Parallelism(ep=4)
    balanced = prefill(QWEN, par, WORK, cal, [])
    skewed = prefill(QWEN, par, dataclasses.replace(WORK, imbalance=2.0), cal, [])
    assert balanced.forwards == 1  # 16 sequences x 1024 tokens fit one 16k chunk
    assert skewed.layer.expert == pytest.approx(2 * balanced.layer.expert)
    assert skewed.layer.a2a_bandwidth == pytest.approx(2 * balanced.layer.a2a_bandwidth)
    chunked = prefill(QWEN, par, dataclasses.replace(WORK, prefill_chunk=4096), cal, [])
    assert chunked.forwards == 4
    flops = 16 * 1024 * 8 * QWEN.expert_params * 2
    assert balanced.layer.expert == pytest.approx(flops / (cal.expert_tflops * 1e6))


def test_tensor_parallel_splits_weights_and_adds_all_reduces():
    cal = Calibration()
    ep4 = decode_step(QWEN, Parallelism(ep=4), WORK, cal, []).layer
    tp2 = decode_step(QWEN, Parallelism(ep=2, tp=2), WORK, cal, []).layer
    assert tp2.tp_comm > 0 and ep4.tp_comm == 0
    # 64 experts a group over 2 TP lanes: each GPU reads as many expert bytes as an EP4 GPU
    assert tp2.expert_read == pytest.approx(ep4.expert_read)


def test_memory_and_fit():
    cal = Calibration()
    ep8 = predict(QWEN, Parallelism(ep=8), WORK, cal)
    ep4 = predict(QWEN, Parallelism(ep=4), WORK, cal)
    assert ep8.fits and not ep4.fits
    weights = (QWEN.moe_layers * 16 * QWEN.expert_params
               + (QWEN.total_params - QWEN.moe_layers * 128 * QWEN.expert_params)) * 2
    kv = 8 * 1280 * 94 * 2048
    assert memory_per_gpu(QWEN, Parallelism(ep=8), WORK) == pytest.approx(weights + kv)


def test_internode_all_to_all_is_slower():
    cal = Calibration()
    inside = decode_step(QWEN, Parallelism(ep=8), WORK, cal, []).layer
    across = decode_step(QWEN, Parallelism(ep=16), WORK, cal, []).layer
    assert across.a2a_latency == pytest.approx(2 * cal.internode.alpha_us)
    per_row = row_bytes(4096, 8) + 8192
    assert inside.a2a_bandwidth == pytest.approx(7 * 8 * per_row / 335e3)
    # 15 x 4 padded rows leave a GPU of EP16, 8 of the 15 peers on the other node, at 50 GB/s
    assert across.a2a_bandwidth == pytest.approx(15 * 4 * per_row * 8 / 15 / 50e3)
    # TP2 x EP8 spans two nodes too: 4 of a lane's 8 EP ranks share a node
    lanes = decode_step(QWEN, Parallelism(ep=8, tp=2), WORK, cal, []).layer
    assert lanes.a2a_latency == pytest.approx(2 * cal.internode.alpha_us)
    assert lanes.a2a_bandwidth == pytest.approx(7 * 4 * per_row * 4 / 7 / 50e3)


def test_with_layers_keeps_dense_layers():
    ds = model_spec("deepseek-v3")
    four = with_layers(ds, 4)
    assert (four.moe_layers, four.layers) == (4, 7)
    assert predict(four, Parallelism(ep=8), WORK, Calibration()).tpot_ms < predict(
        ds, Parallelism(ep=8), WORK, Calibration()).tpot_ms


# ---------------------------------------------------------------------------------------------------
# The advisor


def test_layouts_cover_every_divisor():
    got = {(p.tp, p.ep) for p in layouts(QWEN, 8, 8)}
    want = {(tp, ep) for tp, ep in itertools.product((1, 2, 4, 8), range(1, 9)) if 8 % (tp * ep) == 0}
    assert got == want


def test_advice_recommends_a_fitting_layout():
    advice = advise(QWEN, 8, WORK, Calibration())
    doc = to_json(advice)
    assert doc["recommended"] is not None and doc["recommended"]["fits"]
    keys = {"ep", "tp", "a2a_us_per_layer", "weight_read_us_per_layer", "tpot_ms"}
    assert all(keys <= set(p) for p in doc["predictions"])
    assert all(p["fits"] for p in doc["predictions"])
    best = max(doc["predictions"], key=lambda p: p["decode_tok_s_per_gpu"])
    assert (doc["recommended"]["ep"], doc["recommended"]["tp"]) == (best["ep"], best["tp"])
    assert {(r["ep"], r["tp"]) for r in doc["rejected"]} >= {(1, 1), (2, 1), (4, 1)}


def test_advice_with_a_tpot_target():
    fastest = min(advise(QWEN, 8, WORK, Calibration()).predictions, key=lambda p: p.tpot_ms)
    advice = advise(QWEN, 8, WORK, Calibration(), tpot_slo_ms=fastest.tpot_ms)
    assert advice.recommended.parallelism == fastest.parallelism
    impossible = advise(QWEN, 8, WORK, Calibration(), tpot_slo_ms=0.001)
    assert "no layout meets" in impossible.reason


def test_nothing_fits_says_so():
    advice = advise(QWEN, 2, WORK, Calibration())
    assert advice.recommended is None and advice.predictions == []
    assert "nothing fits" in advice.reason and "at least 4 GPUs" in advice.reason


def test_advise_cli_json(capsys, tmp_path):
    save(from_samples(raw_samples(), "unit test"), tmp_path / "cal.json")
    rc = main(["advise", "--model", "qwen3-235b-a22b", "--gpus", "8", "--batch", "64", "--calibration",
               str(tmp_path / "cal.json"), "--json"])
    out, _ = capsys.readouterr()
    assert rc == 0
    doc = json.loads(out)
    assert doc["calibration"]["source"] == "unit test"
    assert doc["recommended"]["tpot_ms"] > 0 and doc["predictions"]
    assert main(["advise", "--model", "qwen3-235b-a22b", "--gpus", "2", "--batch", "64"]) == 0
    assert "nothing fits" in capsys.readouterr().out
    assert main(["advise", "--model", "qwen3-235b-a22b", "--gpus", "8", "--batch", "64",
                 "--calibration", str(tmp_path / "none.json")]) == 2


# ---------------------------------------------------------------------------------------------------
# The bench's comparison


def test_enrich_scales_and_compares():
    spec = QWEN.standin()
    row = {"ep": 4, "placement": "static", "phase": "decode", "mode": "graph", "layers": 8,
           "full_layers": 94, "batch": 64, "prompt": 1024, "output": 256, "slots_per_rank": 34,
           "step_ms": 4.0, "lm_head_ms": 0.4,
           "balancedness": 1.3, "touched_slots": 0.5, "a2a_share_graph": 0.2, "a2a_share_eager": 0.5}
    out = enrich(row, spec, Calibration())
    assert out["full_model_ms"] == pytest.approx(3.6 / 8 * 94 + 0.4)
    assert out["tok_s_per_gpu_full"] == pytest.approx(64 / out["full_model_ms"] * 1e3 / 4)
    assert out["a2a_share"] == 0.2
    work = Workload(64, 1024, 256, imbalance=1.3, slots_per_rank=34, touched=0.5)
    want = predict(with_layers(spec, 8), Parallelism(ep=4), work, Calibration()).tpot_ms
    assert out["predicted_ms"] == pytest.approx(want)
    assert out["predicted_over_measured"] == pytest.approx(want / 4.0)
    assert "predicted_ms" not in enrich({**row, "error": "boom"}, spec, Calibration())
    line = check_line([{**out, "predicted_over_measured": 1.1}, {**out, "predicted_over_measured": 0.6}])
    assert "1 of 2 runs within 25%" in line and "0.60" in line
