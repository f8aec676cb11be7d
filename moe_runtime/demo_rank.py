"""One rank of `balancerd demo`: a small EP MoE stack served on CPU over gloo, with a skewed router.

Run as ``python -m moe_runtime.demo_rank ARGS.json RANK``. The router carries a per-expert logit
bias ``skew * log(p_e)`` with p a Zipf law over a random expert order per layer, so a few experts
per layer draw most tokens, as in real traffic. The rank publishes telemetry, follows the daemon's
plans through PlanController, and compares its output with the dense single-process reference at
checkpoints: the first step, every step of a migration, and the step after each applied plan.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from kernels.permute import drop_overflow
from moe_runtime.config import DispatchConfig, MoEConfig
from moe_runtime.controller import ControllerConfig, PlanController
from moe_runtime.counters import Counters
from moe_runtime.group import ep_group
from moe_runtime.layer import EPMoEStack
from moe_runtime.placement import RuntimePlacement, choose_replicas
from moe_runtime.reference import LogicalWeights, dense_stack
from moe_runtime.telemetry import TelemetryConfig


@dataclass(frozen=True)
class DemoRankArgs:
    world: int
    init_method: str
    job: str
    runtime_dir: str
    out_dir: str
    preset: str = "qwen3-235b-a22b"
    layers: int = 4
    experts: int = 16
    slots_per_rank: int = 6
    hidden: int = 64
    intermediate: int = 32
    top_k: int = 4
    steps: int = 240
    tokens: int = 64
    skew: float = 1.2
    seed: int = 0
    interval_steps: int = 4
    layers_per_step: int = 1

    def config(self) -> MoEConfig:
        extra = {"groups": 4, "topk_groups": 2} if self.preset == "deepseek-v3" else {}
        return MoEConfig.preset(self.preset, layers=self.layers, experts=self.experts, hidden=self.hidden,
                                intermediate=self.intermediate, top_k=self.top_k, **extra)


def zipf_router_bias(layers: int, experts: int, skew: float, seed: int) -> torch.Tensor:
    """[L, E] logit bias: log of a Zipf(skew) law over a random expert order per layer."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, experts + 1, dtype=np.float64)
    bias = np.empty((layers, experts), np.float32)
    for layer in range(layers):
        p = ranks ** -skew
        bias[layer, rng.permutation(experts)] = np.log(p / p.sum()) * 2.0
    return torch.from_numpy(bias)


@dataclass
class SkewedRank:
    """One rank's EP stack over the skewed router, following the daemon's plans through its controller.
    ``bias`` is the selection bias the controller updates in place (the dense reference takes it too);
    ``gen`` draws this rank's inputs."""

    cfg: MoEConfig
    weights: list[LogicalWeights]
    placement: RuntimePlacement
    counters: Counters
    bias: torch.Tensor
    stack: EPMoEStack
    controller: PlanController
    gen: torch.Generator


def build_skewed_rank(cfg: MoEConfig, rank: int, world: int, slots_per_rank: int, skew: float, seed: int,
                      telemetry: TelemetryConfig, controller: ControllerConfig) -> SkewedRank:
    """Random weights (``seed``) with a Zipf(``skew``) router bias, the initial placement, counters, a zero
    selection bias, the EPMoEStack over the EP group and its PlanController. Call inside the process group."""
    group = ep_group()
    weights = [LogicalWeights.random(cfg, layer, seed) for layer in range(cfg.layers)]
    router_bias = zipf_router_bias(cfg.layers, cfg.experts, skew, seed + 1)
    for layer, w in enumerate(weights):
        w.router_bias = router_bias[layer]
    placement = RuntimePlacement.initial(cfg.layers, cfg.experts, world, slots_per_rank)
    counters = Counters(cfg.layers, cfg.experts, slots_per_rank)
    bias = torch.zeros(cfg.layers, cfg.experts)
    stack = EPMoEStack(cfg, group, placement, dispatch=DispatchConfig(), counters=counters,
                       selection_bias=bias)
    stack.load_weights(weights)
    plan_controller = PlanController(stack, placement, group, counters, telemetry=telemetry,
                                     selection_bias=bias, config=controller)
    gen = torch.Generator().manual_seed(seed * 7919 + rank)
    return SkewedRank(cfg, weights, placement, counters, bias, stack, plan_controller, gen)


@contextmanager
def gloo_rank(init_method: str, rank: int, world: int, seed: int, timeout_s: float):
    """Seed torch, one CPU thread, and this rank's gloo process group for the body; destroyed after."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()


def run(args: DemoRankArgs, rank: int) -> dict:
    with gloo_rank(args.init_method, rank, args.world, args.seed, timeout_s=120):
        return _serve(args, rank)


def _serve(args: DemoRankArgs, rank: int) -> dict:
    telemetry = TelemetryConfig(job=args.job, interval_steps=args.interval_steps, directory=args.runtime_dir)
    r = build_skewed_rank(args.config(), rank, args.world, args.slots_per_rank, args.skew, args.seed,
                          telemetry, ControllerConfig(layers_per_step=args.layers_per_step))
    cfg, stack, placement, controller = r.cfg, r.stack, r.placement, r.controller
    step_ms, versions, max_err, checks = [], [], 0.0, 0
    check_next = True
    try:
        for step in range(args.steps):
            x = torch.randn(args.tokens, cfg.hidden, generator=r.gen)
            start = time.perf_counter()
            with torch.no_grad():
                out = stack(x)
            if check_next or controller.migrating:
                with torch.no_grad():
                    ref = dense_stack(x, r.weights, cfg, selection_bias=r.bias,
                                      keep=_drop_rule(stack, placement, rank, args.tokens, cfg.top_k))
                max_err = max(max_err, float((out - ref).abs().max() / ref.abs().max()))
                checks += 1
            before = placement.version
            controller.after_step(step, args.tokens)
            step_ms.append((time.perf_counter() - start) * 1e3)
            versions.append(placement.version)
            check_next = placement.version != before
    finally:
        controller.close()
    return {"rank": rank, "step_ms": step_ms, "versions": versions, "max_rel_err": max_err, "checks": checks,
            "migrated_bytes": controller.migrated_bytes, "args": asdict(args)}


def _drop_rule(stack: EPMoEStack, placement: RuntimePlacement, rank: int, tokens: int, top_k: int):
    """What the drop policy keeps, for the reference: the same replica choice and per-slot capacity the
    dispatch applies (None while no capacity factor is in force)."""
    dispatch = stack.layers[0].dispatch_config
    if dispatch.capacity_factor is None:
        return None
    capacity = dispatch.capacity(tokens, top_k, placement.slots)

    def keep(layer: int, r) -> torch.Tensor:
        phys = choose_replicas(r.ids, placement.log_to_phys[layer], placement.replicas[layer], offset=rank)
        return drop_overflow(phys, r.weights, capacity)[0]

    return keep


def main(argv: list[str]) -> int:
    path, rank = argv[0], int(argv[1])
    with open(path) as f:
        args = DemoRankArgs(**json.load(f))
    result = run(args, rank)
    out = os.path.join(args.out_dir, f"rank{rank}.json")
    with open(out + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(out + ".tmp", out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
