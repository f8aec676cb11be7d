"""EPGroup's checks that need no process group."""

import pytest
import torch

from moe_runtime import EPGroup


def test_a_group_refuses_a_rank_outside_it_and_a_world_without_a_process_group() -> None:
    with pytest.raises(ValueError, match="rank 2 outside a world of 2"):
        EPGroup(2, 2, torch.device("cpu"), None)
    with pytest.raises(ValueError, match="a world of 2 needs a process group"):
        EPGroup(0, 2, torch.device("cpu"))


def test_all_to_all_start_at_world_one_is_the_input_and_after_needs_a_preallocated_out() -> None:
    group = EPGroup(0, 1, torch.device("cpu"))
    x = torch.arange(6.0).view(3, 2)
    out, work = group.all_to_all_start(x)
    assert out is x and work is None
    with pytest.raises(ValueError, match="`after` needs an `out` allocated before the event"):
        group.all_to_all_start(x, after=object())
