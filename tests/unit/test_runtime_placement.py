"""The runtime placement: derived tables, replica choice, in-place updates and validation."""

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from balancerd.placement import PlacementError
from moe_runtime import RuntimePlacement, choose_replicas
from moe_runtime.placement import derive

ROW = np.array([[2, 0, 1, 0, 2, 2]])  # expert 0 in slots 1, 3; expert 1 in 2; expert 2 in 0, 4, 5


def test_derive_lists_each_experts_slots_in_order_padded_with_minus_one() -> None:
    log_to_phys, replicas = derive(ROW, experts=3, max_replicas=4)
    assert replicas.tolist() == [[2, 1, 3]]
    assert log_to_phys.tolist() == [[[1, 3, -1, -1], [2, -1, -1, -1], [0, 4, 5, -1]]]


def test_derive_refuses_more_replicas_than_allocated() -> None:
    with pytest.raises(PlacementError, match="an expert has 3 replicas.*at most 2"):
        derive(ROW, experts=3, max_replicas=2)


def test_choose_replicas_rotates_each_experts_assignments_over_its_replicas() -> None:
    placement = RuntimePlacement(ROW, experts=3, slots_per_rank=3)
    ids = torch.tensor([[0, 1], [0, 2], [2, 0], [0, 2]])
    phys = choose_replicas(ids, placement.log_to_phys[0], placement.replicas[0], offset=1)
    assert phys.tolist() == [[3, 2], [1, 4], [5, 3], [1, 0]]
    assert phys.dtype == torch.int64


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_choose_replicas_spreads_evenly_and_only_onto_the_expert(data: st.DataObject) -> None:
    experts = data.draw(st.integers(1, 6))
    extra = data.draw(st.lists(st.integers(0, experts - 1), max_size=8))
    row = np.array([data.draw(st.permutations(list(range(experts)) + extra))])
    tokens, k = data.draw(st.integers(0, 30)), data.draw(st.integers(1, 3))
    ids = torch.tensor(data.draw(st.lists(st.integers(0, experts - 1), min_size=tokens * k,
                                          max_size=tokens * k)), dtype=torch.int64).view(tokens, k)
    offset = data.draw(st.integers(0, 7))
    placement = RuntimePlacement(row, experts, slots_per_rank=row.shape[1])
    phys = choose_replicas(ids, placement.log_to_phys[0], placement.replicas[0], offset).numpy()
    assert np.array_equal(row[0][phys], ids.numpy())
    for e in range(experts):
        use = Counter(phys[ids.numpy() == e].tolist())
        loads = [use[s] for s in np.flatnonzero(row[0] == e)]
        assert max(loads) - min(loads) <= 1


def test_placement_tables_ranks_and_local_experts() -> None:
    table = np.array([[2, 0, 1, 0, 2, 2], [0, 1, 2, 0, 1, 2]])
    placement = RuntimePlacement(table, experts=3, slots_per_rank=2)
    assert (placement.layers, placement.slots, placement.world, placement.version) == (2, 6, 3, 0)
    assert placement.max_replicas == 4
    assert placement.replicas.tolist() == [[2, 1, 3], [2, 2, 2]]
    assert placement.log_to_phys[1, :, :2].tolist() == [[0, 3], [1, 4], [2, 5]]
    assert placement.phys_to_log.dtype == placement.log_to_phys.dtype == torch.int32
    assert placement.local_experts(0, 1).tolist() == [1, 0]


def test_update_copies_in_place_and_bumps_the_version() -> None:
    placement = RuntimePlacement(ROW, experts=3, slots_per_rank=3)
    tensors = (placement.phys_to_log, placement.log_to_phys, placement.replicas)
    pointers = [t.data_ptr() for t in tensors]
    placement.update(np.array([[0, 1, 2, 1, 1, 0]]), version=7)
    assert [t.data_ptr() for t in tensors] == pointers
    assert placement.version == 7
    assert placement.phys_to_log.tolist() == [[0, 1, 2, 1, 1, 0]]
    assert placement.replicas.tolist() == [[2, 3, 1]]
    assert placement.log_to_phys[0, 1, :3].tolist() == [1, 3, 4]


def test_update_layers_switches_only_those_layers() -> None:
    table = np.array([[2, 0, 1, 0, 2, 2], [0, 1, 2, 0, 1, 2], [0, 1, 2, 2, 1, 0]])
    placement = RuntimePlacement(table, experts=3, slots_per_rank=3, version=4)
    placement.update_layers([2, 0], np.array([[1, 1, 0, 2, 0, 0], [0, 1, 2, 1, 1, 1]]))
    assert placement.phys_to_log.tolist() == [[0, 1, 2, 1, 1, 1], table[1].tolist(), [1, 1, 0, 2, 0, 0]]
    assert placement.replicas.tolist() == [[1, 4, 1], [2, 2, 2], [3, 2, 1]]
    assert placement.log_to_phys[2, 0, :3].tolist() == [2, 4, 5]
    assert placement.host.tolist() == placement.phys_to_log.tolist()
    assert placement.version == 4
    with pytest.raises(PlacementError, match="layer 1: expert 2 has no replica"):
        placement.update_layers([1], np.array([[0, 1, 1, 0, 1, 0]]))
    assert placement.phys_to_log[1].tolist() == table[1].tolist()


def test_check_validates_without_applying() -> None:
    placement = RuntimePlacement(ROW, experts=3, slots_per_rank=3)
    checked = placement.check(np.array([[0, 1, 2, 0, 1, 2]], dtype=np.int64))
    assert checked.dtype == np.int32
    assert placement.phys_to_log.tolist() == ROW.tolist()


@pytest.mark.parametrize("table, match", [
    (np.array([[0, 0, 1, 0, 1, 1]]), "layer 0: expert 2 has no replica"),
    (np.array([[0, 1, 2, 3, 1, 1]]), "layer 0 slot 3 holds expert 3, outside"),
    (np.array([[0, 1, 2, -1, 1, 1]]), "slot 3 holds expert -1, outside"),
    (np.array([[0, 1, 2, 0, 1]]), r"phys_to_log has shape \(1, 5\), this runtime serves 1 layers x 6 slots"),
    (np.array([[0.0, 1, 2, 0, 1, 2]]), "must hold integers"),
])
def test_a_bad_update_is_refused_and_leaves_the_placement_as_it_was(table: np.ndarray, match: str) -> None:
    placement = RuntimePlacement(ROW, experts=3, slots_per_rank=3)
    with pytest.raises(PlacementError, match=match):
        placement.update(table, version=1)
    assert placement.version == 0
    assert placement.phys_to_log.tolist() == ROW.tolist()
    assert placement.replicas.tolist() == [[2, 1, 3]]


def test_construction_refuses_uneven_ranks_and_excess_replicas() -> None:
    with pytest.raises(PlacementError, match="6 slots do not divide into ranks of 4 slots"):
        RuntimePlacement(ROW, experts=3, slots_per_rank=4)
    with pytest.raises(PlacementError, match="3 replicas"):
        RuntimePlacement(ROW, experts=3, slots_per_rank=3, max_replicas=2)
    with pytest.raises(PlacementError, match=r"must be \[layers, slots\]"):
        RuntimePlacement(ROW[0], experts=3, slots_per_rank=3)


def test_initial_placement_holds_every_expert_on_every_layer() -> None:
    placement = RuntimePlacement.initial(layers=3, experts=8, world=4, slots_per_rank=3)
    assert placement.phys_to_log.shape == (3, 12)
    assert (placement.replicas >= 1).all()
    assert placement.replicas.sum(1).tolist() == [12, 12, 12]
