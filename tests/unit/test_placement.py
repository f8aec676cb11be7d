"""balancerd.placement: topology, validation, replica counts, load metrics, the static placement."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancerd.placement import (
    PlacementError,
    Topology,
    balancedness,
    contiguous_gpu_loads,
    count_moves,
    gpu_loads,
    imbalance_ratio,
    initial_placement,
    replica_counts,
    separate_copies,
    validate_placement,
)


@st.composite
def shapes(draw, max_gpus: int = 12, max_experts: int = 24) -> tuple[Topology, int]:
    gpus = draw(st.integers(1, max_gpus))
    nodes = draw(st.sampled_from([d for d in range(1, gpus + 1) if gpus % d == 0]))
    experts = draw(st.integers(1, max_experts))
    slots = draw(st.integers(experts, 3 * experts + gpus))
    return Topology(gpus, slots, nodes), experts


@st.composite
def placed(draw) -> tuple[Topology, int, np.ndarray, np.ndarray]:
    """A topology, expert count, random valid placement [L, S] and loads [L, E]."""
    topo, experts = draw(shapes())
    layers = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    extra = [rng.integers(0, experts, topo.slots - experts) for _ in range(layers)]
    rows = [rng.permutation(np.concatenate([np.arange(experts), x])) for x in extra]
    loads = rng.integers(0, 1000, (layers, experts)).astype(np.float64)
    return topo, experts, np.stack(rows), loads


# --- Topology -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gpus": 0, "slots": 8}, "gpus must be >= 1"),
        ({"gpus": 2, "slots": 0}, "slots must be >= 1"),
        ({"gpus": 6, "slots": 12, "nodes": 4}, "divide gpus=6"),
        ({"gpus": 2, "slots": 8, "nodes": 0}, "nodes must be >= 1"),
        ({"gpus": 2.0, "slots": 8}, "gpus must be an int"),
        ({"gpus": True, "slots": 8}, "gpus must be an int"),
    ],
)
def test_topology_rejects_bad_values(kwargs, message):
    with pytest.raises(PlacementError, match=message):
        Topology(**kwargs)


def test_topology_uneven_slots_go_to_the_first_gpus():
    topo = Topology(gpus=64, slots=288, nodes=8)
    assert topo.slots_per_gpu.tolist() == [5] * 32 + [4] * 32
    assert topo.first_slot[:3].tolist() == [0, 5, 10]
    assert topo.first_slot[32] == 160
    assert topo.gpu_of_slot[159] == 31 and topo.gpu_of_slot[160] == 32
    assert topo.node_of_gpu.tolist() == np.repeat(np.arange(8), 8).tolist()


@given(shapes())
def test_topology_arrays_agree(shape):
    topo, _ = shape
    assert topo.slots_per_gpu.sum() == topo.slots
    assert np.ptp(topo.slots_per_gpu) <= 1
    assert np.array_equal(np.bincount(topo.gpu_of_slot, minlength=topo.gpus), topo.slots_per_gpu)
    assert np.all(np.diff(topo.gpu_of_slot) >= 0)
    assert np.array_equal(topo.gpu_of_slot[topo.first_slot[topo.slots_per_gpu > 0]],
                          np.flatnonzero(topo.slots_per_gpu > 0))
    assert np.bincount(topo.node_of_gpu).tolist() == [topo.gpus // topo.nodes] * topo.nodes


def test_topology_arrays_are_read_only():
    with pytest.raises(ValueError):
        Topology(4, 8).gpu_of_slot[0] = 3


# --- validate_placement -------------------------------------------------------------------


def test_validate_accepts_a_valid_placement():
    topo = Topology(4, 12)
    validate_placement(initial_placement(3, 10, topo), 10, topo, layers=3)


@pytest.mark.parametrize(
    ("placement", "message"),
    [
        (np.zeros((2, 7), dtype=np.int32), r"shape \(2, 7\) is not \[layers, 8 slots\]"),
        (np.zeros(8, dtype=np.int32), "shape"),
        (np.tile(np.arange(8.0), (2, 1)), "dtype float64 is not integral"),
        (np.array([[0, 1, 2, 3, 4, 5, 6, 9]] * 2), "layer 0 slot 7 holds expert 9, outside"),
        (np.array([[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, -1]]), "layer 1 slot 7 holds expert -1"),
        (np.array([[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, 6]]), "layer 1: expert 7 has no replica"),
    ],
)
def test_validate_names_the_problem(placement, message):
    with pytest.raises(PlacementError, match=message):
        validate_placement(placement, 8, Topology(2, 8))


def test_validate_checks_the_layer_count():
    with pytest.raises(PlacementError, match="has 2 layers, expected 3"):
        validate_placement(initial_placement(2, 4, Topology(2, 8)), 4, Topology(2, 8), layers=3)


# --- replica counts and loads -------------------------------------------------------------


@given(placed())
def test_replica_counts_match_a_loop(case):
    _, experts, p, _ = case
    expected = np.array([[np.sum(row == e) for e in range(experts)] for row in p])
    assert np.array_equal(replica_counts(p, experts), expected)


@given(placed())
def test_gpu_loads_match_a_loop(case):
    topo, experts, p, w = case
    expected = np.zeros((p.shape[0], topo.gpus))
    for layer, row in enumerate(p):
        for slot, e in enumerate(row):
            expected[layer, topo.gpu_of_slot[slot]] += w[layer, e] / np.sum(row == e)
    got = gpu_loads(w, p, topo)
    assert np.allclose(got, expected)
    assert np.allclose(got.sum(axis=1), w.sum(axis=1))


@given(placed())
def test_contiguous_loads_put_expert_e_on_gpu_e_g_over_e(case):
    topo, experts, _, w = case
    expected = np.zeros((w.shape[0], topo.gpus))
    for e in range(experts):
        expected[:, e * topo.gpus // experts] += w[:, e]
    assert np.allclose(contiguous_gpu_loads(w, topo.gpus), expected)


def test_balancedness_and_imbalance_ratio():
    g = np.array([[1.0, 1.0, 1.0, 1.0], [4.0, 2.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 1.0, 0.0]])
    assert np.allclose(balancedness(g), [1.0, 2.0, 1.0, 3.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ratio = imbalance_ratio(g)
    assert np.allclose(ratio[:3], [1.0, 4.0, 1.0])
    assert np.isfinite(ratio[3]) and ratio[3] >= 1e8


def test_count_moves_counts_changed_slots_and_checks_shapes():
    old = np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
    new = np.array([[0, 1, 3, 2], [0, 1, 2, 3]])
    assert count_moves(old, new).tolist() == [2, 0]
    with pytest.raises(PlacementError, match="shapes"):
        count_moves(old, new[:, :3])


# --- initial_placement --------------------------------------------------------------------


@settings(max_examples=150)
@given(shapes(max_gpus=16, max_experts=40))
def test_initial_placement_is_valid_even_and_spread(shape):
    topo, experts = shape
    p = initial_placement(2, experts, topo)
    assert p.dtype == np.int32 and p.shape == (2, topo.slots)
    validate_placement(p, experts, topo, layers=2)
    assert np.array_equal(p[0], p[1])
    counts = replica_counts(p, experts)[0]
    assert counts.max() - counts.min() <= 1
    if topo.gpus > 1 and topo.slots <= experts * topo.gpus:
        held = topo.gpu_of_slot * experts + p[0]
        assert np.unique(held).size == topo.slots, "two copies of an expert on one GPU"


def test_initial_placement_without_spare_slots_is_the_contiguous_layout():
    topo = Topology(8, 64)
    p = initial_placement(1, 64, topo)[0]
    assert np.array_equal(topo.gpu_of_slot[np.argsort(p)], np.arange(64) * 8 // 64)


def test_initial_placement_needs_room_for_every_expert():
    with pytest.raises(PlacementError, match="8 slots cannot hold 9 experts"):
        initial_placement(1, 9, Topology(2, 8))


def test_separate_copies_resolves_a_chain_of_repeats():
    topo = Topology(5, 11)
    # Expert 2 twice on GPU 0 and expert 0 twice on GPU 4: no single swap fixes both.
    row = np.array([2, 0, 2, 1, 2, 1, 2, 1, 2, 0, 0])
    before = np.sort(row.copy())
    separate_copies(row, topo, 3)
    assert np.array_equal(np.sort(row), before)
    assert np.unique(topo.gpu_of_slot * 3 + row).size == topo.slots
