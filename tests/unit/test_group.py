"""EPGroup's checks that need no process group."""

import numpy as np
import pytest
import torch

from moe_runtime import EPGroup


def test_a_group_refuses_a_rank_outside_it_and_a_world_without_a_process_group() -> None:
    with pytest.raises(ValueError, match="rank 2 outside a world of 2"):
        EPGroup(2, 2, torch.device("cpu"), None)
    with pytest.raises(ValueError, match="a world of 2 needs a process group"):
        EPGroup(0, 2, torch.device("cpu"))


def test_all_to_all_start_at_world_one_is_the_input() -> None:
    group = EPGroup(0, 1, torch.device("cpu"))
    x = torch.arange(6.0).view(3, 2)
    out, work = group.all_to_all_start(x)
    assert out is x and work is None


def test_peer_layouts_match_all_to_all_single_order() -> None:
    """Each rank's rows land after the lower ranks' at every destination, and each destination's
    results land back where its source sent them from: checked against an explicit all-to-all."""
    from moe_runtime.dispatch import peer_layouts

    world = 4
    rows = np.random.default_rng(5).integers(0, 6, (world, world), dtype=np.int32)
    rows[1, 2] = 0  # an empty pair
    for me in range(world):
        there, back = peer_layouts(rows, me)
        for p in range(world):
            received_before_me = [int(rows[q, p]) for q in range(me)]
            assert there.dst_offsets[p] == sum(received_before_me)
            sent_before_p = [int(rows[p, d]) for d in range(me)]  # what p sent to ranks below me
            assert back.dst_offsets[p] == sum(sent_before_p)
            assert all(type(v) is int for v in there.dst_offsets + back.dst_offsets)
        assert there.region_rows == max(int(rows[:, p].sum()) for p in range(world))
        assert back.region_rows == max(int(rows[q].sum()) for q in range(world))


def test_a_copy_engine_transport_needs_cuda() -> None:
    from moe_runtime.copy_engine import CopyEngineTransport

    with pytest.raises(ValueError, match="needs CUDA devices"):
        CopyEngineTransport(None, torch.device("cpu"), 1 << 20)


def test_the_copy_engine_workspace_bound_covers_a_layer() -> None:
    from kernels.permute import row_layout
    from moe_runtime.copy_engine import workspace_bytes

    need = workspace_bytes(16384, 4, 4096, 8, torch.bfloat16)
    rows_in = 4 * 16384 * row_layout(4096, 8, torch.bfloat16).width * 2
    assert need == rows_in + 16384 * 4 * 4096 * 2  # both already 256-byte multiples
    assert 1.0e9 < need < 1.2e9
