"""moe_runtime: the expert-parallel MoE runtime that runs inside each inference rank (torch)."""

from moe_runtime.config import PRESETS, DispatchConfig, MoEConfig
from moe_runtime.counters import PHASES, Counters, CounterSnapshot
from moe_runtime.group import EPGroup, ep_group
from moe_runtime.layer import EPMoELayer, EPMoEStack
from moe_runtime.placement import RuntimePlacement, choose_replicas
from moe_runtime.reference import LogicalWeights, dense_moe, dense_stack

__all__ = [
    "PHASES", "PRESETS", "CounterSnapshot", "Counters", "DispatchConfig", "EPGroup", "EPMoELayer",
    "EPMoEStack", "LogicalWeights", "MoEConfig", "RuntimePlacement", "choose_replicas", "dense_moe",
    "dense_stack", "ep_group",
]
