"""Single-process dense MoE reference over the full logical weights, for equivalence tests."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.route import RouteOutput, route_reference
from moe_runtime.config import NORM_EPS, MoEConfig


@dataclass
class LogicalWeights:
    """One layer's weights by logical expert: w_gate_up [E, 2I, H] (gate rows first), w_down [E, H, I]."""

    router: torch.Tensor                  # [E, H]
    correction_bias: torch.Tensor | None  # [E] float32, sigmoid_grouped routing only
    w_gate_up: torch.Tensor
    w_down: torch.Tensor
    shared_gate_up: torch.Tensor | None   # [2 * shared_intermediate, H]
    shared_down: torch.Tensor | None      # [H, shared_intermediate]
    router_bias: torch.Tensor | None = None  # [E] added to the router logits (skews selection and weights)

    @classmethod
    def random(cls, cfg: MoEConfig, layer: int, seed: int,
               dtype: torch.dtype = torch.float32) -> LogicalWeights:
        """Deterministic weights for (seed, layer): every rank builds the same ones on the CPU."""
        gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
        h, i, e, si = cfg.hidden, cfg.intermediate, cfg.experts, cfg.shared_intermediate

        def normal(*shape: int, fan_in: int) -> torch.Tensor:
            return (torch.randn(shape, generator=gen) / fan_in ** 0.5).to(dtype)

        bias = torch.randn(e, generator=gen) * 0.1 if cfg.routing == "sigmoid_grouped" else None
        shared = (normal(2 * si, h, fan_in=h), normal(h, si, fan_in=si)) if si else (None, None)
        return cls(normal(e, h, fan_in=h), bias, normal(e, 2 * i, h, fan_in=h), normal(e, h, i, fan_in=i),
                   *shared)


def _swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up[: gate_up.shape[0] // 2], gate_up[gate_up.shape[0] // 2:]
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def dense_moe(x: torch.Tensor, w: LogicalWeights, cfg: MoEConfig,
              selection_bias: torch.Tensor | None = None,
              keep: Callable[[RouteOutput], torch.Tensor] | None = None) -> tuple[torch.Tensor, RouteOutput]:
    """The MoE block on x [T, H] with every expert local; returns the output and the routing.

    ``keep(route) -> [T, k] bool`` leaves out the assignments a drop policy dropped.
    """
    logits = F.linear(x, w.router, w.router_bias)
    r = route_reference(logits, cfg.routing_spec(), correction_bias=w.correction_bias,
                        selection_bias=selection_bias)
    ids = r.ids if keep is None else torch.where(keep(r), r.ids, -1)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(cfg.experts):
        token, j = (ids == e).nonzero(as_tuple=True)
        y = _swiglu(x[token], w.w_gate_up[e], w.w_down[e]).float()
        out.index_add_(0, token, y * r.weights[token, j].unsqueeze(1))
    if w.shared_gate_up is not None:
        out += _swiglu(x, w.shared_gate_up, w.shared_down).float()
    return out.to(x.dtype), r


def dense_stack(x: torch.Tensor, weights: list[LogicalWeights], cfg: MoEConfig,
                selection_bias: torch.Tensor | None = None,
                keep: Callable[[int, RouteOutput], torch.Tensor] | None = None) -> torch.Tensor:
    """x + moe_l(rms_norm(x)) for each layer l, as EPMoEStack computes it; ``keep(layer, route)`` as in
    :func:`dense_moe`."""
    for layer, w in enumerate(weights):
        bias = None if selection_bias is None else selection_bias[layer]
        keep_l = None if keep is None else functools.partial(keep, layer)
        x = x + dense_moe(F.rms_norm(x, (x.shape[1],), eps=NORM_EPS), w, cfg, bias, keep_l)[0]
    return x
