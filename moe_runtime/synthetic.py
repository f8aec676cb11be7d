"""Random weights made directly on a device, for benchmarks: GBs of experts without a host round trip."""

from __future__ import annotations

from collections.abc import Callable

import torch

from moe_runtime.config import MoEConfig
from moe_runtime.layer import EPMoEStack
from moe_runtime.reference import LogicalWeights


def device_weights(cfg: MoEConfig, layer: int, seed: int, device: torch.device, dtype: torch.dtype,
                   router_bias: torch.Tensor | None = None) -> LogicalWeights:
    """One layer's full logical weights generated on `device` from (seed, layer): every rank of one
    machine type draws the same values, so replicas are identical; no host round trip for GBs."""
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + layer)
    h, i, e, si = cfg.hidden, cfg.intermediate, cfg.experts, cfg.shared_intermediate

    def normal(*shape: int, fan_in: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(fan_in ** -0.5)

    correction = None
    if cfg.routing == "sigmoid_grouped":
        correction = torch.randn(e, generator=gen, device=device).mul_(0.1)
    shared = (normal(2 * si, h, fan_in=h), normal(h, si, fan_in=si)) if si else (None, None)
    bias = None if router_bias is None else router_bias.to(device=device, dtype=dtype)
    return LogicalWeights(normal(e, h, fan_in=h), correction, normal(e, 2 * i, h, fan_in=h),
                          normal(e, h, i, fan_in=i), *shared, router_bias=bias)


def load_layers(stack: EPMoEStack, make: Callable[[int], LogicalWeights], keep: bool) -> list[LogicalWeights]:
    """Fill every layer from make(layer), one layer's full weights alive at a time unless `keep`."""
    kept = []
    for layer, module in enumerate(stack.layers):
        w = make(layer)
        module.load_weights(w)
        if keep:
            kept.append(w)
        del w
    if stack.layers[0].router.is_cuda:
        torch.cuda.empty_cache()
    return kept
