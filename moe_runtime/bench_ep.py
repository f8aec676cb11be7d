"""One rank of `balancerd bench ep`: an EP MoE model served at several EP sizes, measured.

Run as ``python -m moe_runtime.bench_ep ARGS.json`` with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT set (balancerd/lab/launch.py does this, one process per GPU). Every EP size uses ranks
0..ep-1 (the others wait); rank 0 writes DIR/raw.json after every measurement, and the launcher turns it
into tables, plots and the calibration file.

The model: `--layers` layers of [attention stand-in, EPMoELayer] with the preset's real MoE shapes and
random bf16 weights (fp32 on CPU), the router skewed by a Zipf law (moe_runtime.demo_rank), then the LM
head. The attention stand-in has the real projection weights and KV-cache shapes: decode reads a random
cache of the mean context (prompt + output / 2) and appends nothing; prefill runs causal attention over
each prompt. Each EP rank holds batch / ep sequences.

* prefill: exact dispatch (split sizes on the host), whole sequences in chunks of up to
  `prefill_chunk` tokens a rank; eager.
* decode: capacity dispatch (padded, no host sync) captured in one CUDA graph per step on GPUs (eager
  when capture fails, and on CPU). A short eager pass gives the per-phase breakdown (CUDA events).
* calibration (separate from the serving runs): all-to-all sweeps on each EP group (eager, and in a
  CUDA graph), and on rank 0 alone read bandwidth and matmul rates of the expert kernel
  (moe_runtime.experts.run_experts; the reads as a capacity-mode decode runs it, in a CUDA graph, and
  with no slot touched for its fixed cost), dense projections and attention, and the fixed cost per
  layer and per step of the same model at toy sizes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from balancerd.lab.models import ModelSpec, model_spec
from balancerd.placement import Topology, balancedness, imbalance_ratio
from balancerd.planner import plan
from moe_runtime.config import NORM_EPS, DispatchConfig, MoEConfig
from moe_runtime.counters import Counters
from moe_runtime.demo_rank import zipf_router_bias
from moe_runtime.dispatch import combine, dispatch
from moe_runtime.experts import run_experts
from moe_runtime.group import EPGroup, ep_group
from moe_runtime.layer import EPMoEStack
from moe_runtime.placement import RuntimePlacement
from moe_runtime.synthetic import device_weights, load_layers


@dataclass(frozen=True)
class BenchArgs:
    model: str
    eps: tuple[int, ...]
    batch: int
    prompt: int
    output: int
    layers: int
    out_dir: str
    device: str = "cuda"
    tiny: bool = False
    skew: float = 1.1
    rebalance: bool = False
    extra_slots: int = 2
    prefill_chunk: int = 16384
    prefill_iters: int = 2
    decode_steps: int = 0        # 0: --output
    eager_steps: int = 8
    warmup: int = 2
    graph: bool = True
    calibrate: bool = True
    seed: int = 0
    timeout_s: float = 600.0

    def config(self, layers: int | None = None) -> MoEConfig:
        """The runtime's config; with --tiny the toy shapes of the lab's spec (DeepSeek-V3: 4 groups)."""
        extra = {}
        if self.tiny:
            s = self.spec()
            extra = {"hidden": s.hidden, "intermediate": s.intermediate, "experts": s.experts,
                     "top_k": s.top_k}
            if self.model == "deepseek-v3":
                extra.update(groups=4, topk_groups=2)
        return MoEConfig.preset(self.model, layers=layers or self.layers, **extra)

    def spec(self) -> ModelSpec:
        s = model_spec(self.model)
        return s.tiny() if self.tiny else s.standin()


# ---------------------------------------------------------------------------------------------------
# The model


class AttentionStandIn:
    """Fused QKV projection, attention, output projection, with the model's heads and weights."""

    def __init__(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype, gen: torch.Generator):
        h, self.hq, self.hkv, self.hd = spec.hidden, spec.q_heads, spec.kv_heads, spec.head_dim
        self.split = [self.hq * self.hd, self.hkv * self.hd, self.hkv * self.hd]
        self.qkv = torch.randn(sum(self.split), h, generator=gen, device=device, dtype=dtype) * h ** -0.5
        self.o = torch.randn(h, self.hq * self.hd, generator=gen, device=device, dtype=dtype) * (
            self.hq * self.hd) ** -0.5

    def decode(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x [b, H], one token per sequence, over caches [b, hkv, ctx, hd]: each KV head's query heads
        attend as rows of one query block (grouped-query decode without expanding the cache)."""
        b = x.shape[0]
        q = F.linear(x, self.qkv).split(self.split, -1)[0].view(b, self.hkv, self.hq // self.hkv, self.hd)
        out = F.scaled_dot_product_attention(q, k, v)
        return F.linear(out.reshape(b, self.hq * self.hd), self.o)

    def prefill(self, x: torch.Tensor, seqs: int) -> torch.Tensor:
        """x [seqs * p, H]: causal attention within each sequence."""
        p = x.shape[0] // seqs
        q, k, v = (t.reshape(seqs, p, -1, self.hd).transpose(1, 2)
                   for t in F.linear(x, self.qkv).split(self.split, -1))
        group = self.hq // self.hkv
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                             is_causal=True)
        return F.linear(out.transpose(1, 2).reshape(seqs * p, self.hq * self.hd), self.o)


class StandInModel:
    """[attention stand-in, EP MoE layer] x L with residuals and RMSNorm, then the LM head (argmax)."""

    def __init__(self, stack: EPMoEStack, spec: ModelSpec, seqs: int, context: int, device: torch.device,
                 dtype: torch.dtype, seed: int):
        gen = torch.Generator(device=device).manual_seed(seed + 17)
        self.stack, self.spec = stack, spec
        self.attn = [AttentionStandIn(spec, device, dtype, gen) for _ in stack.layers]
        cache = (seqs, spec.kv_heads, context, spec.head_dim)
        self.cache = [(torch.randn(cache, generator=gen, device=device, dtype=dtype),
                       torch.randn(cache, generator=gen, device=device, dtype=dtype)) for _ in stack.layers]
        self.lm_head = torch.randn(spec.vocab, spec.hidden, generator=gen, device=device, dtype=dtype) * (
            spec.hidden ** -0.5)

    def set_dispatch(self, mode: str) -> None:
        for layer in self.stack.layers:
            layer.dispatch_config = DispatchConfig(mode)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[1],), eps=NORM_EPS)

    def _layers(self, x: torch.Tensor, attend: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        for i, moe in enumerate(self.stack.layers):
            x = x + attend(i, self._norm(x))
            x = x + moe(self._norm(x))
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._norm(x), self.lm_head).argmax(-1)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._layers(x, lambda i, h: self.attn[i].decode(h, *self.cache[i])))

    def prefill(self, x: torch.Tensor, seqs: int) -> torch.Tensor:
        y = self._layers(x, lambda i, h: self.attn[i].prefill(h, seqs))
        return self.head(y.view(seqs, -1, y.shape[1])[:, -1])


def router_skew(args: BenchArgs, cfg: MoEConfig) -> torch.Tensor | None:
    return zipf_router_bias(cfg.layers, cfg.experts, args.skew, args.seed + 1) if args.skew > 0 else None


def build(args: BenchArgs, cfg: MoEConfig, spec: ModelSpec, group: EPGroup, slots_per_rank: int,
          seqs: int, dtype: torch.dtype, bias: torch.Tensor | None
          ) -> tuple[StandInModel, RuntimePlacement, Counters]:
    device = group.device
    placement = RuntimePlacement.initial(cfg.layers, cfg.experts, group.world, slots_per_rank, device)
    counters = Counters(cfg.layers, cfg.experts, slots_per_rank, device)
    stack = EPMoEStack(cfg, group, placement, dispatch=DispatchConfig("exact"), counters=counters,
                       dtype=dtype)
    load_weights(stack, cfg, args.seed, dtype, bias)
    context = args.prompt + args.output // 2
    return StandInModel(stack, spec, seqs, context, device, dtype, args.seed), placement, counters


def load_weights(stack: EPMoEStack, cfg: MoEConfig, seed: int, dtype: torch.dtype,
                 bias: torch.Tensor | None) -> None:
    device = stack.layers[0].router.device
    load_layers(stack, lambda i: device_weights(cfg, i, seed, device, dtype,
                                                None if bias is None else bias[i]), keep=False)


# ---------------------------------------------------------------------------------------------------
# Timing and reductions


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], iters: int, warmup: int, device: torch.device) -> float:
    """Microseconds per call of fn() run back to back (one sync at each end), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters * 1e6


def host_max(values: list[float], group: dist.ProcessGroup) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def agree(ok: bool, group: dist.ProcessGroup) -> bool:
    """True when every rank of the group says ok (so all take the same branch after a local failure)."""
    return host_max([0.0 if ok else 1.0], group)[0] == 0.0


def capture(fn: Callable[[], object], device: torch.device) -> torch.cuda.CUDAGraph:
    """One CUDA graph of fn(): three warm-up calls on a side stream (Triton compiles, NCCL is set up),
    everything finished, then the capture; only this thread's CUDA calls are checked during it, so the
    NCCL watchdog's event queries cannot invalidate it."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        fn()
    torch.cuda.synchronize(device)
    return graph


def try_capture(fn: Callable[[], object], device: torch.device,
                group: dist.ProcessGroup) -> tuple[torch.cuda.CUDAGraph | None, str]:
    """A CUDA graph of fn() on every rank of the group, or None on every rank with the reason."""
    graph, why = None, ""
    if device.type == "cuda":
        try:
            graph = capture(fn, device)
        except Exception as exc:  # decided together below, so no rank replays alone
            why = f"{type(exc).__name__}: {exc}"[:200]
            print(f"[rank {dist.get_rank()}] CUDA graph capture failed: {why}", file=sys.stderr, flush=True)
            graph = None
    else:
        why = "no CUDA graphs on CPU"
    if not agree(graph is not None, group):
        return None, why or "capture failed on another rank"
    return graph, ""


# ---------------------------------------------------------------------------------------------------
# Calibration


def a2a_sweep(group: EPGroup, host: dist.ProcessGroup, graph: bool) -> list[list[float]]:
    """(bytes leaving each GPU, us per call) of all_to_all_single with even splits, the slowest rank."""
    cuda = group.device.type == "cuda"
    width, calls = 1024, 8  # elements a row; calls captured in one graph
    sizes = [16 << 10, 128 << 10, 1 << 20, 8 << 20, 64 << 20] if cuda else [1 << 10, 16 << 10, 128 << 10]
    points = []
    for per_peer in sizes:
        rows = max(1, per_peer // (width * 2))
        x = torch.randn(group.world * rows, width, device=group.device,
                        dtype=torch.bfloat16 if cuda else torch.float32)
        if graph:
            burst = lambda x=x: [group.all_to_all(x) for _ in range(calls)][-1]
            g, _ = try_capture(burst, group.device, host)
            if g is None:
                return []
            us = time_calls(g.replay, 5, 2, group.device) / calls
        else:
            us = time_calls(lambda x=x: group.all_to_all(x), 10, 3, group.device)
        (us,) = host_max([us], host)
        points.append([(group.world - 1) * rows * width * x.element_size(), us])
        del x
    return points


def device_calibration(args: BenchArgs, device: torch.device, dtype: torch.dtype,
                       progress: Callable[[str], None]) -> dict:
    """Rates of this GPU (rank 0 alone): reads, matmuls, attention, fixed costs of the toy model."""
    gen = torch.Generator(device=device).manual_seed(5)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)

    out = {"dense_read": dense_reads(args, rand, device), **expert_rates(args, rand, gen, device),
           **matmul_rates(args, rand, device)}
    progress("calibration: reads and matmul rates done; fixed costs of the toy model")
    out["floor"] = toy_floors(args, device, dtype)
    return out


def dense_reads(args: BenchArgs, rand: Callable[..., torch.Tensor], device: torch.device) -> list:
    """(bytes, us): a decode-sized batch through 1/4, 1/2 and all of a 1 GiB weight (4 MiB on CPU)."""
    h = args.config().hidden
    n = max(64, (1 << 30 if device.type == "cuda" else 4 << 20) // (h * 2))
    w, x = rand(n, h), rand(max(1, min(args.batch, 64)), h)
    return [[m * h * w.element_size(), time_calls(lambda m=m: F.linear(x, w[:m]), 10, 2, device)]
            for m in (n // 4, n // 2, n)]


def expert_rates(args: BenchArgs, rand: Callable[..., torch.Tensor], gen: torch.Generator,
                 device: torch.device) -> dict:
    """run_experts with the model's expert shapes. Reads: as a capacity-mode decode step runs it, on a
    padded receive buffer of `batch` rows (every rank's tokens) x top-k slot fields, unused ones -1, so
    the assignment bound, the backend `select_backend` picks and the tile sizes are the decode's; 8, 16
    and 32 of the 32 slots touched (uniform routing's assignments per slot), and none touched: the fixed
    cost of the call (sorting, tile table, launches), which the floors already hold. Replayed from a
    CUDA graph, as the decode runs, where the decode would use one: timed eagerly, a call is bound by
    the host's launches (0.8-1.3 ms on the H200 host, whatever it reads), not by the reads. Matmul
    rate at prefill sizes (host sizes, as in exact mode), eager: there the kernels are long."""
    cfg, cuda = args.config(), device.type == "cuda"
    h, inter, k = cfg.hidden, cfg.intermediate, cfg.top_k
    slots = min(cfg.experts, 32 if cuda else 8)
    w_gate_up, w_down = rand(slots, 2 * inter, h), rand(slots, h, inter)

    def call(used: int, rows: int, host_sizes: bool) -> Callable[[], torch.Tensor]:
        ids = torch.rand(rows, used, generator=gen, device=device).argsort(1)[:, :min(k, used)].int()
        wts = torch.rand(ids.shape, generator=gen, device=device)
        xs = rand(rows, h)
        sizes = torch.bincount(ids.reshape(-1).long(), minlength=used).tolist() if host_sizes else None
        return lambda: run_experts(xs, ids, wts, w_gate_up[:used], w_down[:used], sizes)

    rows = max(1, args.batch)  # capacity mode: world x tokens a rank = the batch, at every EP size
    per_slot = max(1, round(args.batch * k / cfg.experts))

    def decode_call(used: int) -> Callable[[], torch.Tensor]:
        """`used` slots touched, per_slot assignments each, at random fields of the padded buffer."""
        n = min(used * per_slot, rows * k)
        ids = torch.full((rows * k,), -1, dtype=torch.int32, device=device)
        where = torch.randperm(rows * k, generator=gen, device=device)[:n]
        ids[where] = (torch.arange(n, device=device) % max(used, 1)).int()
        ids = ids.view(rows, k)
        wts = torch.rand(ids.shape, generator=gen, device=device)
        xs = rand(rows, h)
        return lambda: run_experts(xs, ids, wts, w_gate_up, w_down, None)

    graph = cuda and args.graph
    burst = 4  # calls captured back to back in one graph

    def time_read(fn: Callable[[], torch.Tensor]) -> float:
        if graph:
            g = capture(lambda: [fn() for _ in range(burst)][-1], device)
            return time_calls(g.replay, 5, 2, device) / burst
        return time_calls(fn, 10, 2, device)

    mode = "graph" if graph else "eager"
    try:
        base = time_read(decode_call(0))
    except Exception:  # rank 0 alone: eager timing then, and the calibration says so
        traceback.print_exc()
        graph, mode = False, "eager (graph capture failed)"
        base = time_read(decode_call(0))
    reads = [[used * 3 * h * inter * w_gate_up.element_size(), time_read(decode_call(used))]
             for used in sorted({max(1, slots // 4), max(1, slots // 2), slots})]
    big = 8192 if cuda else 64
    flops = [[rows * min(k, slots) * 6 * h * inter, time_calls(call(slots, rows, True), 5, 2, device)]
             for rows in (big // 2, big)]
    return {"expert_read": reads, "expert_read_base_us": base, "expert_read_mode": mode,
            "expert_flops": flops}


def matmul_rates(args: BenchArgs, rand: Callable[..., torch.Tensor], device: torch.device) -> dict:
    """A dense projection at prefill sizes, and causal attention of whole prompts as the stand-in runs it
    (the KV heads expanded to the query heads)."""
    spec, cuda = args.spec(), device.type == "cuda"
    big, h = (8192 if cuda else 64), spec.hidden
    w, x = rand(spec.q_heads * spec.head_dim, h), rand(big, h)
    dense = [[2 * t * w.shape[0] * h, time_calls(lambda t=t: F.linear(x[:t], w), 5, 2, device)]
             for t in (big // 2, big)]
    p, group = (args.prompt if cuda else min(args.prompt, 32)), spec.q_heads // spec.kv_heads
    sdpa = []
    for seqs in ((2, 4) if cuda else (1, 2)):
        q, kv = rand(seqs, spec.q_heads, p, spec.head_dim), rand(seqs, spec.kv_heads, p, spec.head_dim)
        us = time_calls(lambda q=q, kv=kv: F.scaled_dot_product_attention(
            q, kv.repeat_interleave(group, 1), kv.repeat_interleave(group, 1), is_causal=True), 5, 2, device)
        sdpa.append([2 * seqs * p * p * spec.q_heads * spec.head_dim, us])
    return {"dense_flops": dense, "sdpa_flops": sdpa}


def toy_floors(args: BenchArgs, device: torch.device, dtype: torch.dtype) -> dict:
    """(layers, us per step) of the same model at toy sizes on one GPU: what a step costs beyond its bytes
    and flops (launches, small kernels, the exact mode's host sync)."""
    toy = dataclasses.replace(args, tiny=True)
    spec = toy.spec()
    group = EPGroup(0, 1, device)
    seqs, prompt = 8, 16
    floors: dict[str, list] = {"graph": [], "eager": [], "prefill": []}
    for layers in (1, 3):
        cfg = toy.config(layers)
        model, _, _ = build(toy, cfg, spec, group, cfg.experts, seqs, dtype, None)
        x = torch.randn(seqs, spec.hidden, device=device, dtype=dtype)
        xp = torch.randn(seqs * prompt, spec.hidden, device=device, dtype=dtype)
        decode = lambda m=model, x=x: m.decode(x)
        with torch.no_grad():
            model.set_dispatch("exact")
            floors["prefill"].append([layers, time_calls(lambda m=model, x=xp: m.prefill(x, seqs), 20, 3,
                                                         device)])
            model.set_dispatch("capacity")
            floors["eager"].append([layers, time_calls(decode, 20, 3, device)])
            if device.type == "cuda" and args.graph:
                try:
                    g = capture(decode, device)
                    floors["graph"].append([layers, time_calls(g.replay, 50, 5, device)])
                except Exception:  # rank 0 alone: the decode runs eager then, and says so
                    traceback.print_exc()
    return {k: v for k, v in floors.items() if len(v) == 2}


# ---------------------------------------------------------------------------------------------------
# Serving measurements


@dataclass
class EPContext:
    args: BenchArgs
    group: EPGroup
    host: dist.ProcessGroup        # gloo group of the same ranks
    model: StandInModel
    placement: RuntimePlacement
    counters: Counters
    seqs: int                      # sequences this rank holds
    dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        return self.group.device

    def per_rank(self, values: torch.Tensor) -> np.ndarray:
        """[L, ep]: every rank's [L] values side by side."""
        mine = values.double().cpu()
        parts = [torch.zeros_like(mine) for _ in range(self.group.world)]
        dist.all_gather(parts, mine, group=self.host)
        return torch.stack(parts, dim=1).numpy()

    def loads(self) -> np.ndarray:
        """[L, ep] assignments each rank's slots processed since the last counters.reset()."""
        return self.per_rank(self.counters.received.sum(dim=1))

    def phase_times(self, forwards: int) -> dict[str, float]:
        """us per forward and layer of dispatch, expert and combine since the last drain: mean over ranks."""
        t = self.counters.drain_timings()
        mine = [float(t[p].sum()) / forwards / len(t[p]) for p in ("dispatch", "expert", "combine")]
        sums = torch.tensor(mine, dtype=torch.float64)
        dist.all_reduce(sums, group=self.host)
        return dict(zip(("dispatch_us", "expert_us", "combine_us"), (sums / self.group.world).tolist(),
                        strict=True))


def load_stats(loads: np.ndarray) -> dict[str, float]:
    return {"balancedness": float(balancedness(loads).mean()),
            "gpu_max_min": float(imbalance_ratio(loads).mean())}


def measure_prefill(ctx: EPContext) -> tuple[dict, np.ndarray]:
    """The whole batch's prompts, in chunks; returns the row and the routed counts summed over the group."""
    a, model, dev = ctx.args, ctx.model, ctx.device
    per_chunk = max(1, min(ctx.seqs, a.prefill_chunk // a.prompt))
    chunks = [min(per_chunk, ctx.seqs - s) for s in range(0, ctx.seqs, per_chunk)]
    x = torch.randn(per_chunk * a.prompt, model.spec.hidden, device=dev, dtype=ctx.dtype)
    model.set_dispatch("exact")

    def run() -> None:
        for n in chunks:
            model.prefill(x[:n * a.prompt], n)

    with torch.no_grad():
        run()
        sync(dev)
        ctx.counters.reset()
        ctx.counters.drain_timings()
        us = time_calls(run, a.prefill_iters, 0, dev)
    (us,) = host_max([us], ctx.host)
    phases = ctx.phase_times(a.prefill_iters * len(chunks))
    loads = ctx.loads()
    routed = ctx.counters.routed.to(torch.int64)
    if ctx.group.world > 1:
        dist.all_reduce(routed, group=ctx.group.group)
    row = {"phase": "prefill", "dispatch": "exact", "mode": "eager", "tokens_per_rank": ctx.seqs * a.prompt,
           "chunks": len(chunks), "chunk_tokens": per_chunk * a.prompt, "step_ms": us / 1e3, **phases,
           **load_stats(loads)}
    return row, routed.cpu().numpy()


def measure_decode(ctx: EPContext) -> dict:
    a, model, dev = ctx.args, ctx.model, ctx.device
    x = torch.randn(ctx.seqs, model.spec.hidden, device=dev, dtype=ctx.dtype)
    model.set_dispatch("capacity")
    steps = a.decode_steps or a.output
    with torch.no_grad():
        for _ in range(a.warmup):
            model.decode(x)
        sync(dev)
        ctx.counters.drain_timings()
        ctx.counters.reset()
        eager_us = time_calls(lambda: model.decode(x), a.eager_steps, 0, dev)
        (eager_us,) = host_max([eager_us], ctx.host)
        phases = ctx.phase_times(a.eager_steps)
        # the same tokens every step read the same slots: per layer the busiest rank's share, mean over layers
        touched = float(ctx.per_rank((ctx.counters.received > 0).float().mean(dim=1)).max(axis=1).mean())
        loads = ctx.loads()
        graph, why = try_capture(lambda: model.decode(x), dev, ctx.host) if a.graph else (None, "--no-graph")
        if graph is not None:
            us = time_calls(graph.replay, steps, 2, dev)
            a2a_graph = isolated_a2a_us(ctx)
        else:
            us = time_calls(lambda: model.decode(x), steps, 0, dev)
            a2a_graph = None
        lm = time_calls(lambda: model.head(x), 20, 3, dev)
    us, lm = host_max([us, lm], ctx.host)
    a2a_eager = (phases["dispatch_us"] + phases["combine_us"]) * len(model.stack.layers)
    row = {"phase": "decode", "dispatch": "capacity", "mode": "graph" if graph is not None else "eager",
           "tokens_per_rank": ctx.seqs, "context": a.prompt + a.output // 2, "steps": steps,
           "step_ms": us / 1e3, "eager_step_ms": eager_us / 1e3, "lm_head_ms": lm / 1e3, **phases,
           "a2a_share_eager": a2a_eager / eager_us, "touched_slots": touched, **load_stats(loads)}
    if a2a_graph is not None and math.isfinite(a2a_graph):
        row["a2a_graph_us_per_layer"] = a2a_graph
        row["a2a_share_graph"] = a2a_graph * len(model.stack.layers) / us
    if why and a.graph:
        row["graph_note"] = why
    return row


def isolated_a2a_us(ctx: EPContext) -> float:
    """us per layer of the decode's dispatch + combine alone, in a CUDA graph. Capacity mode pads every
    (source, destination) pair to the same rows, so its traffic does not depend on the routing."""
    if ctx.group.world == 1:
        return 0.0
    k, top_k = ctx.placement.slots_per_rank, ctx.model.stack.layers[0].cfg.top_k
    gen = torch.Generator(device=ctx.device).manual_seed(3)
    phys = torch.rand(ctx.seqs, ctx.placement.slots, generator=gen, device=ctx.device).argsort(1)[:, :top_k]
    weights = torch.rand(ctx.seqs, top_k, generator=gen, device=ctx.device)
    x = torch.randn(ctx.seqs, ctx.model.spec.hidden, device=ctx.device, dtype=ctx.dtype)
    layers = len(ctx.model.stack.layers)

    def a2a() -> torch.Tensor:
        out = x
        for _ in range(layers):
            recv, path = dispatch(x, phys, weights, ctx.group, k, DispatchConfig("capacity"))
            out = combine(recv.x, path, ctx.group, ctx.seqs)
        return out

    graph, _ = try_capture(a2a, ctx.device, ctx.host)
    if graph is None:
        return float("nan")
    us = time_calls(graph.replay, 20, 2, ctx.device) / layers
    return host_max([us], ctx.host)[0]


def rebalance(ctx: EPContext, routed: np.ndarray, cfg: MoEConfig, bias: torch.Tensor | None) -> dict:
    """Plan from the static prefill's counts (rank 0), switch every rank and reload the weights."""
    pl = ctx.placement
    doc = [None]
    if ctx.group.rank == 0:
        result = plan(routed.astype(np.float64), Topology(gpus=pl.world, slots=pl.slots), current=pl.host)
        before, after = result.balancedness_before.mean(), result.balancedness_after.mean()
        doc = [{"p2l": result.phys_to_log.tolist(), "moves": int(result.moves.sum()),
                "predicted": f"{before:.3f} -> {after:.3f}"}]
    dist.broadcast_object_list(doc, src=0, group=ctx.host)
    pl.update(np.asarray(doc[0]["p2l"], dtype=np.int32), pl.version + 1)
    load_weights(ctx.model.stack, cfg, ctx.args.seed, ctx.dtype, bias)
    return {"plan_moves": doc[0]["moves"], "plan_balancedness": doc[0]["predicted"]}


def run_ep(args: BenchArgs, ep: int, group: EPGroup, host: dist.ProcessGroup, emit: Callable[[dict], None],
           progress: Callable[[str], None]) -> None:
    dtype = torch.bfloat16 if group.device.type == "cuda" else torch.float32
    cfg, spec = args.config(), args.spec()
    base = {"ep": ep, "layers": cfg.layers, "full_layers": spec.moe_layers, "batch": args.batch,
            "prompt": args.prompt, "output": args.output, "skew": args.skew}
    if args.batch % ep:
        emit({**base, "error": f"batch {args.batch} does not split over EP {ep}"})
        return
    k = cfg.experts // ep + (args.extra_slots if ep > 1 else 0)
    seqs = args.batch // ep
    if args.calibrate and ep > 1:
        progress(f"ep {ep}: all-to-all sweep (eager{', CUDA graph' if group.device.type == 'cuda' else ''})")
        sweep = {"a2a": a2a_sweep(group, host, graph=False)}
        if group.device.type == "cuda" and args.graph:
            sweep["a2a_graph"] = a2a_sweep(group, host, graph=True)
        emit({"calibration_a2a": {"world": ep, **sweep}})
    progress(f"ep {ep}: building {cfg.layers} layers of {cfg.name} (hidden {cfg.hidden}, {cfg.experts} "
             f"experts, {k} slots a rank), {seqs} sequences a rank")
    bias = router_skew(args, cfg)
    model, placement, counters = build(args, cfg, spec, group, k, seqs, dtype, bias)
    ctx = EPContext(args, group, host, model, placement, counters, seqs, dtype)
    cases = ["static"] + (["rebalanced"] if args.rebalance and ep > 1 else [])
    extra: dict = {}
    for case in cases:
        key = {**base, "placement": case, "slots_per_rank": k, **extra}
        routed = None
        for phase in ("prefill", "decode"):
            started = time.perf_counter()
            try:
                if phase == "prefill":
                    row, routed = measure_prefill(ctx)
                else:
                    row = measure_decode(ctx)
                row = {**key, **row}
            except Exception as exc:  # the same failure on every rank keeps the collectives matched
                traceback.print_exc()
                row = {**key, "phase": phase, "error": f"{type(exc).__name__}: {exc}"[:300]}
            emit(row)
            progress(f"ep {ep} {case} {phase}: " + (f"{row['step_ms']:.2f} ms" if "step_ms" in row else
                                                   f"error {row.get('error')}")
                     + f" ({time.perf_counter() - started:.1f} s)")
        if case == "static" and "rebalanced" in cases:
            if routed is None:
                progress(f"ep {ep}: no counts from the static prefill, not rebalancing")
                break
            extra = rebalance(ctx, routed, cfg, bias)
            progress(f"ep {ep}: rebalanced, {extra['plan_moves']} slot moves, predicted balancedness "
                     f"{extra['plan_balancedness']}")
    del ctx, model
    if group.device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------


class RawResults:
    """Everything measured, rewritten to DIR/raw.json after each addition (rank 0)."""

    def __init__(self, out: Path, meta: dict, enabled: bool):
        self.path, self.enabled = out / "raw.json", enabled
        self.doc = {"meta": meta, "calibration": {"a2a": {}, "a2a_graph": {}}, "rows": []}
        self.write()

    def add(self, item: dict) -> None:
        if "calibration_a2a" in item:
            c = item["calibration_a2a"]
            for key in ("a2a", "a2a_graph"):
                if c.get(key):
                    self.doc["calibration"][key][str(c["world"])] = c[key]
        elif "calibration" in item:
            self.doc["calibration"].update(item["calibration"])
        else:
            self.doc["rows"].append(item)
        self.write()

    def write(self) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str))
        os.replace(tmp, self.path)


def init(args: BenchArgs, rank: int, world: int) -> torch.device:
    """The world group from the launcher's environment: NCCL, one GPU a rank; or gloo on CPU."""
    timeout = timedelta(seconds=args.timeout_s)
    if args.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group("gloo", timeout=timeout)
        return torch.device("cpu")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl", timeout=timeout)
    return torch.device("cuda", torch.cuda.current_device())


def main(argv: list[str]) -> int:
    with open(argv[0]) as f:
        doc = json.load(f)
    args = BenchArgs(**{**doc, "eps": tuple(doc["eps"])})
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = init(args, rank, world)
    cpu = dist.new_group(backend="gloo")
    subgroups = {ep: (dist.new_group(list(range(ep))), dist.new_group(list(range(ep)), backend="gloo"))
                 for ep in args.eps}
    started = time.perf_counter()

    def progress(message: str) -> None:
        if rank == 0:
            print(f"[bench ep {time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    meta = {"args": dataclasses.asdict(args), "world": world, "torch": torch.__version__,
            "python": platform.python_version(), "device": args.device,
            "gpu": torch.cuda.get_device_name(device) if args.device == "cuda" else platform.processor()}
    results = RawResults(Path(args.out_dir), meta, rank == 0)
    try:
        if args.calibrate:
            if rank == 0:
                progress("calibration: this GPU's read and matmul rates")
                dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
                try:
                    with torch.no_grad():
                        results.add({"calibration": device_calibration(args, device, dtype, progress)})
                except Exception as exc:
                    traceback.print_exc()
                    results.add({"calibration": {"note": f"device calibration failed: {exc}"[:300]}})
                if args.device == "cuda":
                    torch.cuda.empty_cache()
            dist.barrier(group=cpu)
        for ep in args.eps:
            if rank < ep:
                nccl, gloo = subgroups[ep]
                try:
                    run_ep(args, ep, ep_group(nccl, device), gloo, results.add, progress)
                except Exception as exc:  # keep the other EP sizes; a rank stuck alone ends at the timeout
                    traceback.print_exc()
                    results.add({"ep": ep, "error": f"{type(exc).__name__}: {exc}"[:300]})
                    progress(f"ep {ep} failed: {exc}")
            dist.barrier(group=cpu)
        progress("done")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
