"""Model shapes and routing semantics (MoEConfig, with presets) and the dispatch mode (DispatchConfig)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from kernels.route import RoutingSpec

NORM_EPS = 1e-6  # the parameter-free RMSNorm before each layer of a stack
DISPATCH_MODES = ("exact", "capacity")


@dataclass(frozen=True)
class MoEConfig:
    """One model's MoE block: sizes, routing and layer count.

    `shared_experts` shared experts are computed as one SwiGLU of intermediate size
    `shared_experts * intermediate`, as DeepSeek-V3 does.
    """

    name: str
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    layers: int
    routing: str = "softmax"
    shared_experts: int = 0
    groups: int = 1
    topk_groups: int = 1
    renormalize: bool = True
    scale: float = 1.0

    def __post_init__(self) -> None:
        for field in ("hidden", "intermediate", "layers"):
            if getattr(self, field) < 1:
                raise ValueError(f"MoEConfig.{field} must be >= 1, got {getattr(self, field)}")
        if self.shared_experts < 0:
            raise ValueError(f"MoEConfig.shared_experts must be >= 0, got {self.shared_experts}")
        try:
            self.routing_spec()
        except ValueError as e:
            raise ValueError(f"MoEConfig {self.name!r} routing: {e}") from None

    @property
    def shared_intermediate(self) -> int:
        return self.shared_experts * self.intermediate

    def routing_spec(self) -> RoutingSpec:
        return RoutingSpec(kind=self.routing, experts=self.experts, top_k=self.top_k, groups=self.groups,
                           topk_groups=self.topk_groups, renormalize=self.renormalize, scale=self.scale)

    @classmethod
    def preset(cls, name: str, **overrides) -> MoEConfig:
        """A named model, optionally scaled down (`layers`, `hidden`, `intermediate`, `experts`, ...)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown MoEConfig field(s) {sorted(unknown)}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS = {
    "deepseek-v3": MoEConfig("deepseek-v3", hidden=7168, intermediate=2048, experts=256, top_k=8, layers=58,
                             routing="sigmoid_grouped", shared_experts=1, groups=8, topk_groups=4, scale=2.5),
    "qwen3-235b-a22b": MoEConfig("qwen3-235b-a22b", hidden=4096, intermediate=1536, experts=128, top_k=8,
                                 layers=94),
    "mixtral-8x7b": MoEConfig("mixtral-8x7b", hidden=4096, intermediate=14336, experts=8, top_k=2, layers=32),
}


@dataclass(frozen=True)
class DispatchConfig:
    """How tokens travel to their experts' ranks.

    exact: a count exchange, then variable all-to-alls (one host sync for the split sizes).
    capacity: fixed-size padded all-to-alls, no host sync (CUDA-graph capturable): every source rank
    sends every destination rank one row per token, padding where a token has nothing there. With
    `capacity_factor` set, the drop policy applies: each source rank sends each physical slot at most
    ceil(capacity_factor * tokens * top_k / slots) assignments (the slot's mean load times the factor),
    keeps those with the largest routing weight (ties: lower token first) and drops and counts the rest.

    micro_batches > 1 splits each batch after routing into that many contiguous token ranges (empty
    ones where a rank has fewer tokens) and pipelines them: one range's all-to-all runs while another's
    experts compute (on a GPU, NCCL's stream beside the compute stream). Outputs, counts and drops are
    those of the whole batch; exact mode still syncs once a layer (one count exchange for all ranges).
    Every rank issues one all-to-all pair per range, so every rank must use the same value; it is read
    on every forward, so an engine can switch it per step (on all ranks alike), e.g. on for prefill
    batches, where the all-to-alls take milliseconds, and off for decode.

    interleave (with micro_batches > 1) runs the ranges through the whole stack side by side instead
    (two-batch overlap): each range has its own count exchange (a host sync per range and layer), and
    the ranges take turns, each splitting its experts at the down projection around the next
    range's routing, so that every all-to-all travels while another range's experts compute (all in
    one stream; the all-to-alls beside it: with a copy-engine transport, which leaves every SM to the
    experts; it pays for large batches over 4+ GPUs, see docs/runtime.md). Each range is routed on
    its own, so an expert's replicas share out each range's assignments evenly (not the whole
    batch's). `EPMoEStack` reads it from its first layer; the phases overlap, so a timed step
    records the stack's whole time as expert time, shared evenly by the layers.
    """

    mode: str = "exact"
    capacity_factor: float | None = None
    micro_batches: int = 1
    interleave: bool = False

    def __post_init__(self) -> None:
        if self.mode not in DISPATCH_MODES:
            raise ValueError(f"DispatchConfig.mode must be one of {DISPATCH_MODES}, got {self.mode!r}")
        if self.capacity_factor is not None:
            if self.mode != "capacity":
                raise ValueError("DispatchConfig.capacity_factor needs mode='capacity'")
            if not self.capacity_factor > 0:
                raise ValueError(f"DispatchConfig.capacity_factor must be > 0, got {self.capacity_factor}")
        if self.micro_batches < 1:
            raise ValueError(f"DispatchConfig.micro_batches must be >= 1, got {self.micro_batches}")

    def token_ranges(self, tokens: int) -> list[slice]:
        """The micro-batches of a batch of `tokens`: `micro_batches` contiguous ranges, as even as can be."""
        n = self.micro_batches
        bounds = [tokens * i // n for i in range(n + 1)]
        return [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]

    def capacity(self, tokens: int, top_k: int, slots: int) -> int:
        """Assignments a source rank may send each physical slot; `tokens` (no drops) without a factor.

        A token sends a slot at most one assignment, so a capacity of `tokens` never drops.
        """
        if self.capacity_factor is None:
            return tokens
        return min(tokens, math.ceil(self.capacity_factor * tokens * top_k / slots))
