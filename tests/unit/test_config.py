"""MoEConfig presets, overrides and validation; DispatchConfig validation and capacity."""

import pytest

from kernels.route import RoutingSpec
from moe_runtime import PRESETS, DispatchConfig, MoEConfig


def test_deepseek_v3_preset_carries_the_real_shape_and_routing() -> None:
    cfg = MoEConfig.preset("deepseek-v3")
    assert (cfg.hidden, cfg.intermediate, cfg.experts, cfg.shared_experts, cfg.top_k, cfg.layers) == \
        (7168, 2048, 256, 1, 8, 58)
    assert cfg.routing_spec() == RoutingSpec("sigmoid_grouped", experts=256, top_k=8, groups=8, topk_groups=4,
                                             renormalize=True, scale=2.5)
    assert cfg.shared_intermediate == 2048


def test_qwen3_and_mixtral_presets() -> None:
    qwen = MoEConfig.preset("qwen3-235b-a22b")
    assert (qwen.hidden, qwen.intermediate, qwen.experts, qwen.top_k, qwen.layers, qwen.shared_experts) == \
        (4096, 1536, 128, 8, 94, 0)
    assert qwen.routing_spec() == RoutingSpec("softmax", experts=128, top_k=8, renormalize=True)
    mixtral = MoEConfig.preset("mixtral-8x7b")
    assert (mixtral.hidden, mixtral.intermediate, mixtral.experts, mixtral.top_k) == (4096, 14336, 8, 2)
    assert mixtral.routing_spec() == RoutingSpec("softmax", experts=8, top_k=2, renormalize=True)


def test_overrides_scale_a_preset_down_and_keep_its_routing() -> None:
    cfg = MoEConfig.preset("deepseek-v3", layers=2, hidden=64, intermediate=32)
    assert (cfg.layers, cfg.hidden, cfg.intermediate) == (2, 64, 32)
    assert cfg.routing_spec() == PRESETS["deepseek-v3"].routing_spec()
    assert cfg.shared_intermediate == 32


@pytest.mark.parametrize("name, overrides, match", [
    ("gpt-5", {}, "unknown preset 'gpt-5'; known: deepseek-v3"),
    ("qwen3-235b-a22b", {"hiddn": 8}, r"unknown MoEConfig field\(s\) \['hiddn'\]"),
    ("qwen3-235b-a22b", {"hidden": 0}, "MoEConfig.hidden must be >= 1, got 0"),
    ("qwen3-235b-a22b", {"layers": -1}, "MoEConfig.layers must be >= 1"),
    ("deepseek-v3", {"shared_experts": -1}, "shared_experts must be >= 0"),
    ("mixtral-8x7b", {"top_k": 9}, "'mixtral-8x7b' routing: top_k must be in"),
    ("mixtral-8x7b", {"groups": 2}, "'mixtral-8x7b' routing: softmax routing has no groups"),
    ("deepseek-v3", {"experts": 100}, "routing: groups must divide experts=100"),
    ("deepseek-v3", {"routing": "relu"}, "routing: kind must be one of"),
])
def test_bad_configs_are_refused_with_the_reason(name: str, overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MoEConfig.preset(name, **overrides)


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "padded"}, "mode must be one of"),
    ({"capacity_factor": 1.0}, "capacity_factor needs mode='capacity'"),
    ({"mode": "capacity", "capacity_factor": 0.0}, "capacity_factor must be > 0"),
    ({"micro_batches": 0}, "micro_batches must be >= 1"),
])
def test_bad_dispatch_configs_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DispatchConfig(**kwargs)


def test_capacity_without_a_factor_takes_every_token_and_with_one_rounds_up() -> None:
    assert DispatchConfig("capacity").capacity(tokens=37, top_k=8, slots=4) == 37
    assert DispatchConfig("capacity", 1.0).capacity(tokens=10, top_k=2, slots=4) == 5
    assert DispatchConfig("capacity", 1.1).capacity(tokens=10, top_k=2, slots=4) == 6
    assert DispatchConfig("capacity", 4.0).capacity(tokens=10, top_k=8, slots=2) == 10


@pytest.mark.parametrize("tokens, n, sizes",
                         [(10, 1, [10]), (10, 3, [3, 3, 4]), (2, 3, [0, 1, 1]), (0, 2, [0, 0])])
def test_token_ranges_cover_the_batch_in_order_with_as_many_ranges_on_every_rank(tokens, n, sizes) -> None:
    ranges = DispatchConfig(micro_batches=n).token_ranges(tokens)
    assert [r.stop - r.start for r in ranges] == sizes
    assert ranges[0].start == 0 and ranges[-1].stop == tokens
    assert all(a.stop == b.start for a, b in zip(ranges, ranges[1:], strict=False))
