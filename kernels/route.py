"""Routing contract: router logits -> top-k expert ids, combine weights and per-expert counts.

`route_reference` is plain torch and is the ground truth; `route` dispatches CUDA tensors to the
fused Triton kernel (kernels/route_triton.py) and CPU tensors to the reference. Neither syncs
with the host.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

KINDS = ("softmax", "sigmoid_grouped")
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class RoutingSpec:
    """How a router turns logits into expert choices.

    softmax: weights and selection from softmax(logits).
    sigmoid_grouped (DeepSeek-V3): sigmoid scores, selection restricted to the best
    `topk_groups` of `groups` contiguous expert groups, ranked by the sum of their top-2 scores.
    `scale` multiplies the final weights (routed_scaling_factor).
    """

    kind: str
    experts: int
    top_k: int
    groups: int = 1
    topk_groups: int = 1
    renormalize: bool = True
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.experts < 1:
            raise ValueError(f"experts must be >= 1, got {self.experts}")
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"top_k must be in [1, experts={self.experts}], got {self.top_k}")
        if not 1 <= self.groups <= self.experts or self.experts % self.groups:
            raise ValueError(f"groups must divide experts={self.experts}, got {self.groups}")
        if not 1 <= self.topk_groups <= self.groups:
            raise ValueError(f"topk_groups must be in [1, groups={self.groups}], got {self.topk_groups}")
        if self.kind == "softmax" and (self.groups, self.topk_groups) != (1, 1):
            raise ValueError("softmax routing has no groups: leave groups and topk_groups at 1")
        if self.groups > 1 and self.group_size < 2:
            raise ValueError(f"groups are ranked by their top-2 scores: need >= 2 experts a group, "
                             f"got {self.experts} experts in {self.groups} groups")
        eligible = self.topk_groups * self.group_size
        if self.top_k > eligible:
            raise ValueError(f"top_k={self.top_k} exceeds the {eligible} experts in the "
                             f"{self.topk_groups} eligible groups")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be finite and > 0, got {self.scale}")

    @property
    def group_size(self) -> int:
        return self.experts // self.groups


class RouteOutput(NamedTuple):
    ids: torch.Tensor      # [T, k] int64, in descending order of selection score
    weights: torch.Tensor  # [T, k] float32, from the unbiased scores
    changed: torch.Tensor  # 0-d int64: assignments the selection_bias changed


def validate_route_inputs(logits: torch.Tensor, spec: RoutingSpec, correction_bias: torch.Tensor | None,
                          selection_bias: torch.Tensor | None, counts: torch.Tensor | None,
                          record: torch.Tensor | None) -> None:
    """Check shapes, dtypes and devices (metadata only: no host sync)."""
    if logits.dim() != 2 or logits.shape[1] != spec.experts:
        raise ValueError(f"logits must be [T, {spec.experts}], got {list(logits.shape)}")
    if logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"logits dtype must be one of {LOGIT_DTYPES}, got {logits.dtype}")
    vectors = {"correction_bias": (correction_bias, torch.float32),
               "selection_bias": (selection_bias, torch.float32),
               "counts": (counts, torch.int32)}
    for name, (t, dtype) in vectors.items():
        if t is None:
            continue
        if t.shape != (spec.experts,) or t.dtype != dtype:
            raise ValueError(f"{name} must be [{spec.experts}] {dtype}, got {list(t.shape)} {t.dtype}")
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device}, logits on {logits.device}")
    if record is not None:
        if counts is None:
            raise ValueError("record switches counting: it needs counts")
        if record.shape != () or record.dtype != torch.int32 or record.device != logits.device:
            raise ValueError(f"record must be a 0-d int32 tensor on {logits.device}, "
                             f"got {list(record.shape)} {record.dtype} on {record.device}")
    if counts is not None and not counts.is_contiguous():
        raise ValueError("counts must be contiguous (it is updated in place)")


def _stable_top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values along the last dim, descending, equal values lower index first."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


def _select(sel: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """Top-k expert ids of each row of `sel`, within the best groups when the spec has groups."""
    if spec.groups > 1:
        tokens = sel.shape[0]
        grouped = sel.view(tokens, spec.groups, spec.group_size)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        keep = torch.zeros(tokens, spec.groups, dtype=torch.bool, device=sel.device)
        keep.scatter_(1, _stable_top(group_scores, spec.topk_groups), True)
        sel = grouped.masked_fill(~keep.unsqueeze(-1), -math.inf).view(tokens, spec.experts)
    return _stable_top(sel, spec.top_k)


def route_reference(logits: torch.Tensor, spec: RoutingSpec, *, correction_bias: torch.Tensor | None = None,
                    selection_bias: torch.Tensor | None = None, counts: torch.Tensor | None = None,
                    record: torch.Tensor | None = None) -> RouteOutput:
    """Plain torch routing, the ground truth for the Triton kernel.

    The selection score is scores + correction_bias (+ selection_bias); weights come from the
    unbiased scores. `counts[e]` gains the assignments to e (times `record` when given).
    """
    validate_route_inputs(logits, spec, correction_bias, selection_bias, counts, record)
    x = logits.float()
    scores = torch.softmax(x, dim=-1) if spec.kind == "softmax" else torch.sigmoid(x)
    sel = scores if correction_bias is None else scores + correction_bias
    ids = _select(sel, spec)
    changed = torch.zeros((), dtype=torch.int64, device=logits.device)
    if selection_bias is not None:
        unbiased = ids
        ids = _select(sel + selection_bias, spec)
        kept = (ids.unsqueeze(-1) == unbiased.unsqueeze(-2)).any(dim=-1).sum()
        changed = ids.numel() - kept
    weights = scores.gather(1, ids)
    if spec.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights * spec.scale
    if counts is not None:
        ones = torch.ones((), dtype=torch.int32, device=counts.device) if record is None else record
        counts.scatter_add_(0, ids.flatten(), ones.expand(ids.numel()))
    return RouteOutput(ids, weights, changed)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def route(logits: torch.Tensor, spec: RoutingSpec, *, correction_bias: torch.Tensor | None = None,
          selection_bias: torch.Tensor | None = None, counts: torch.Tensor | None = None,
          record: torch.Tensor | None = None, force_triton: bool = False) -> RouteOutput:
    """Route with the fused Triton kernel on CUDA, with `route_reference` on CPU.

    `force_triton` runs the kernel on CPU tensors under the Triton interpreter
    (TRITON_INTERPRET=1 set before the first call), for tests.
    """
    if not (logits.is_cuda or force_triton):
        return route_reference(logits, spec, correction_bias=correction_bias,
                               selection_bias=selection_bias, counts=counts, record=record)
    if not logits.is_cuda and not _interpreting():
        raise RuntimeError("force_triton on CPU tensors needs TRITON_INTERPRET=1 set before the first call")
    from kernels.route_triton import route_triton

    return route_triton(logits, spec, correction_bias=correction_bias, selection_bias=selection_bias,
                        counts=counts, record=record)
