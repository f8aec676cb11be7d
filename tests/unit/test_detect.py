"""balancerd.detect: GPU loads, ratios, cross-check, the hysteresis detector, straggler attribution."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from balancerd.config import DetectConfig
from balancerd.detect import (
    DetectorState,
    WindowView,
    attribute_stragglers,
    cross_check,
    detect,
    layer_loads,
    note_plan,
    ratios,
)
from balancerd.placement import Topology

TOPO = Topology(gpus=2, slots=4)           # slots 0,1 on GPU 0; 2,3 on GPU 1
CFG = DetectConfig(threshold=3.0, clear_threshold=2.5, sustain=3, min_tokens=100, cooldown_s=30.0)


def test_layer_loads_split_replicas():
    counts = np.array([[10, 20, 30], [60, 10, 30]], np.int32)
    p2l = np.array([[0, 2, 1, 2], [0, 1, 0, 2]], np.int32)
    # a replica carries half its expert's count: expert 2 of layer 0, expert 0 of layer 1
    np.testing.assert_allclose(layer_loads(counts, p2l, TOPO), [[10 + 15, 20 + 15], [30 + 10, 30 + 30]])
    with pytest.raises(ValueError, match="not"):
        layer_loads(counts[:1], p2l, TOPO)


def test_ratios_idle_gpu_is_large_and_silent():
    loads = np.array([[4.0, 2.0], [5.0, 0.0], [0.0, 0.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        max_min, bal = ratios(loads)
    assert max_min[0] == 2.0 and bal[0] == pytest.approx(4 / 3)
    assert np.isfinite(max_min[1]) and max_min[1] >= 1e6
    assert bal[1] == 2.0
    assert max_min[2] == 1.0 and bal[2] == 1.0


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, (3, 4), elements=st.floats(0, 1e6)))
def test_ratios_are_finite_and_ordered(loads):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        max_min, bal = ratios(loads)
    assert np.isfinite(max_min).all() and np.isfinite(bal).all()
    assert (bal >= 1 - 1e-12).all() and (max_min >= bal - 1e-9).all()


def test_cross_check():
    pred = np.array([[10.0, 30.0], [10.0, 30.0], [0.0, 0.0], [5.0, 5.0]])
    assert cross_check(pred, pred).tolist() == [0.0, 0.0, 0.0, 0.0]
    # the same split at half the volume (drops, a missed interval) is no mismatch
    assert cross_check(pred, pred / 2) == pytest.approx([0, 0, 0, 0])
    recv = np.array([[30.0, 10.0], [10.0, 30.0], [1.0, 0.0], [0.0, 0.0]])
    assert cross_check(pred, recv) == pytest.approx([0.5, 0.0, 1.0, 1.0])
    with pytest.raises(ValueError):
        cross_check(pred, recv[:, :1])


def window(ratio: float, assignments: int = 1000) -> WindowView:
    """Two layers on two GPUs (experts 0,1 on GPU 0; 2,3 on GPU 1): layer 0 at GPU max/min
    ``ratio``, layer 1 balanced."""
    counts = np.array([[ratio * 50, ratio * 50, 50, 50], [50, 50, 50, 50]], np.float64)
    return WindowView(counts=counts, assignments=assignments, phys_to_log=np.tile(np.arange(4), (2, 1)),
                      topo=TOPO)


def run(ratios_: list[float], state: DetectorState | None = None, start: float = 0.0,
        assignments: int = 1000):
    state = state or DetectorState()
    out = []
    for i, r in enumerate(ratios_):
        state, d = detect(state, window(r, assignments), start + i, CFG)
        out.append(d)
    return state, out


def test_flags_only_after_sustained_counted_windows():
    state, ds = run([4.0, 4.0, 4.0])
    assert [d.flagged for d in ds] == [(), (), (0,)]
    assert [d.should_plan for d in ds] == [False, False, True]
    assert ds[2].newly_flagged == (0,) and ds[2].max_min[0] == pytest.approx(4.0)
    assert "layer 0" in ds[2].reason
    # a dip below threshold resets the streak
    _, ds = run([4.0, 4.0, 2.9, 4.0, 4.0])
    assert all(d.flagged == () for d in ds)


def test_low_traffic_windows_neither_count_nor_reset():
    state, _ = run([4.0, 4.0])
    state, ds = run([1.0, 9.0], state, start=2, assignments=99)
    assert all(not d.counted and not d.should_plan for d in ds)
    assert "below 100" in ds[0].reason
    assert state.streak == (2, 0)
    state, ds = run([4.0], state, start=4)
    assert ds[0].flagged == (0,)
    # a flagged layer is not cleared by a low-traffic window either
    _, ds = run([1.0], state, start=5, assignments=0)
    assert ds[0].flagged == (0,) and not ds[0].should_plan


def test_hysteresis():
    state, _ = run([4.0, 4.0, 4.0])
    state, ds = run([2.8, 2.6, 2.5], state, start=3)
    assert all(d.flagged == (0,) for d in ds)      # between clear_threshold and threshold: held
    state, ds = run([2.4], state, start=6)
    assert ds[0].flagged == () and ds[0].cleared == (0,)
    assert ds[0].reason == "no layer imbalanced"


def test_cooldown_after_a_plan():
    state, ds = run([4.0, 4.0, 4.0])
    assert ds[-1].should_plan
    state = note_plan(state, now=2.0)
    assert state.flagged == frozenset({0})
    state, ds = run([4.0] * 3, state, start=3.0)
    assert not any(d.should_plan for d in ds) and ds[0].cooldown_left_s == pytest.approx(29.0)
    assert "cooling down" in ds[0].reason
    _, ds = run([4.0], state, start=32.0)
    assert ds[0].should_plan and ds[0].cooldown_left_s == 0.0


def test_a_new_layer_count_starts_afresh():
    state, _ = run([4.0, 4.0, 4.0])
    counts = np.full((3, 4), 50.0)
    view = WindowView(counts=counts, assignments=1000, phys_to_log=np.tile(np.arange(4), (3, 1)), topo=TOPO)
    state, d = detect(state, view, 10.0, CFG)
    assert state.streak == (0, 0, 0) and d.flagged == ()


def test_idle_gpu_reads_as_imbalanced():
    counts = np.array([[100.0, 100.0, 0.0, 0.0]])
    view = WindowView(counts=counts, assignments=1000, phys_to_log=np.arange(4)[None], topo=TOPO)
    state = DetectorState()
    for t in range(3):
        state, d = detect(state, view, float(t), CFG)
    assert d.flagged == (0,) and d.should_plan


# ---------------------------------------------------------------------------------------------------
# Stragglers: a lockstep simulation of dispatch / experts / combine per layer.


def simulate(other_us: np.ndarray, expert_us: np.ndarray, transfer_us: float = 20.0):
    """Per-rank timings as ranks in lockstep would measure them. Before dispatch each rank works
    ``other_us`` (attention etc.), between dispatch and combine ``expert_us``; an all-to-all ends for
    everyone ``transfer_us`` after the last rank joins it."""
    ranks, layers = expert_us.shape
    dispatch, combine = np.zeros((ranks, layers)), np.zeros((ranks, layers))
    t = 0.0
    for layer in range(layers):
        arrive = t + other_us[:, layer]
        leave = arrive.max() + transfer_us
        dispatch[:, layer] = leave - arrive
        arrive = leave + expert_us[:, layer]
        t = arrive.max() + transfer_us
        combine[:, layer] = t - arrive
    return dispatch, combine, expert_us, np.full(ranks, t)


def test_no_straggler_among_equal_ranks():
    rng = np.random.default_rng(0)
    other = 100 + rng.uniform(0, 5, (4, 6))
    expert = 200 + rng.uniform(0, 10, (4, 6))
    assert attribute_stragglers(*simulate(other, expert), threshold=1.5) == []


def test_one_slow_rank_in_its_experts():
    other, expert = np.full((4, 6), 100.0), np.full((4, 6), 200.0)
    expert[2] *= 3
    d, c, e, step = simulate(other, expert)
    assert d[2].sum() + c[2].sum() < d[0].sum() + c[0].sum()  # the late rank waits least
    [s] = attribute_stragglers(d, c, e, step, threshold=1.5)
    assert s.rank == 2 and s.waiting_ranks == (0, 1, 3)
    assert s.late_us == pytest.approx(6 * 400)
    assert s.expert_excess_us == pytest.approx(6 * 400)


def test_one_slow_rank_outside_its_experts():
    other, expert = np.full((4, 6), 100.0), np.full((4, 6), 200.0)
    other[1] += 600
    [s] = attribute_stragglers(*simulate(other, expert), threshold=1.5)
    assert s.rank == 1 and s.late_us == pytest.approx(6 * 600)
    assert s.expert_excess_us == pytest.approx(0.0)


def test_two_slow_ranks():
    other, expert = np.full((5, 4), 100.0), np.full((5, 4), 200.0)
    expert[1] += 600     # busy 900 per layer: the last to arrive
    expert[3] += 300     # busy 600 per layer: waits for rank 1, the fast ranks wait for it
    found = attribute_stragglers(*simulate(other, expert), threshold=1.5)
    assert [s.rank for s in found] == [1, 3]
    assert found[0].waiting_ranks == (0, 2, 3, 4)
    assert found[1].waiting_ranks == (0, 2, 4)
    assert found[0].late_us == pytest.approx(4 * 600) and found[1].late_us == pytest.approx(4 * 300)


def test_threshold_and_degenerate_inputs():
    other, expert = np.full((4, 2), 100.0), np.full((4, 2), 200.0)
    expert[0] += 100   # busy 400 vs 300: 1.33x
    timings = simulate(other, expert)
    assert attribute_stragglers(*timings, threshold=1.5) == []
    assert [s.rank for s in attribute_stragglers(*timings, threshold=1.2)] == [0]
    one = simulate(other[:1], expert[:1])
    assert attribute_stragglers(*one, threshold=1.5) == []
    with pytest.raises(ValueError, match="shape|must be"):
        attribute_stragglers(timings[0], timings[1][:, :1], timings[2], timings[3], 1.5)
    bad = [np.array(a, copy=True) for a in timings]
    bad[3][0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        attribute_stragglers(*bad, threshold=1.5)


def test_subnormal_load_reads_as_an_idle_gpu_without_a_warning():
    """Found by hypothesis on a fresh CI run: top * 1e-9 underflowed to 0 for a subnormal load."""
    loads = np.array([[5e-324, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        max_min, bal = ratios(loads)
    assert max_min == pytest.approx([1e9, 1.0])
    assert np.isfinite(bal).all()
