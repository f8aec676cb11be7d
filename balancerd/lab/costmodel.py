"""Step time of an EP (or TP x EP) MoE deployment from its shapes and a Calibration: pure functions.

A replica is tp x ep GPUs. Attention is tensor-parallel over tp and data-parallel over the ep groups
(each group holds batch / ep sequences); experts are split over ep (E / ep slots a group) and each
expert over tp. Per MoE layer, on the busiest GPU:

    floor + all-to-all (calls x alpha + bytes / beta) + TP all-reduces (tp > 1)
          + experts: max(weights read / expert read bandwidth, flops / expert TFLOP/s)
          + attention and router: max(weights read / read bandwidth, flops / TFLOP/s) + KV cache read

and a step adds the dense layers, the LM head and a per-step floor. Decode dispatches in capacity mode
(padded rows to every rank, two calls; "graph": captured in a CUDA graph, "eager": launched op by op);
prefill in exact mode (a count exchange and two variable calls) in chunks of whole sequences. The
busiest GPU's expert load is `imbalance` times the mean (max / mean, 1.0 balanced); at decode every
local expert that any token of the replica picks is read once (uniform routing unless `touched`,
the measured share of slots a step reads, is given).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from balancerd.lab.calibration import Calibration
from balancerd.lab.models import BYTES, ModelSpec

ROW_ALIGN = 32  # kernels.permute.ROW_ALIGN: a dispatched row is the hidden vector + k slot ids + k weights


def row_bytes(hidden: int, top_k: int) -> int:
    """Bytes of one dispatched row (kernels.permute.row_layout in bf16)."""
    up = lambda n: -(-n // ROW_ALIGN) * ROW_ALIGN
    return up(hidden * BYTES) + up(8 * top_k)


def remote_ranks(experts: int, ep: int, top_k: int) -> float:
    """Expected other EP ranks a token's top-k (distinct, uniform) experts reach, E / ep per rank."""
    if ep <= 1:
        return 0.0
    per_rank = experts // ep
    miss = math.comb(experts - per_rank, top_k) / math.comb(experts, top_k)
    return (ep - 1) * (1.0 - miss)


def touched_fraction(experts: int, top_k: int, tokens: float) -> float:
    """Share of experts that at least one of `tokens` tokens picks (uniform routing)."""
    return 1.0 - (1.0 - top_k / experts) ** tokens


@dataclass(frozen=True)
class Parallelism:
    ep: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        if self.ep < 1 or self.tp < 1:
            raise ValueError(f"ep and tp must be >= 1, got ep={self.ep} tp={self.tp}")

    @property
    def gpus(self) -> int:
        return self.ep * self.tp

    @property
    def label(self) -> str:
        return f"EP{self.ep}" if self.tp == 1 else f"TP{self.tp}xEP{self.ep}"


@dataclass(frozen=True)
class Workload:
    batch: int                       # sequences per replica, decoded together
    prompt: int
    output: int
    imbalance: float = 1.0           # busiest GPU's expert load / mean
    slots_per_rank: int | None = None  # local expert slots of an EP rank (default E / ep)
    decode_mode: str = "graph"       # graph | eager
    prefill_chunk: int | None = None  # tokens an EP rank passes per prefill forward (whole sequences)
    touched: float | None = None     # share of local slots a decode step reads (default: uniform routing)

    def __post_init__(self) -> None:
        if min(self.batch, self.prompt, self.output) < 1 or not self.imbalance >= 1.0:
            raise ValueError(f"batch, prompt and output must be >= 1 and imbalance >= 1; got batch "
                             f"{self.batch}, prompt {self.prompt}, output {self.output}, "
                             f"imbalance {self.imbalance}")
        if self.decode_mode not in ("graph", "eager"):
            raise ValueError(f"decode_mode must be graph or eager, got {self.decode_mode!r}")

    @property
    def decode_context(self) -> int:
        """The mean context length over the decode."""
        return self.prompt + self.output // 2


@dataclass(frozen=True)
class LayerTime:
    """Microseconds of one MoE layer (one chunk, for prefill) on the busiest GPU."""

    floor: float
    a2a_latency: float
    a2a_bandwidth: float
    tp_comm: float
    expert: float        # max(read, compute)
    expert_read: float
    dense: float         # attention + router: max(read, compute), plus attention compute at prefill
    kv_read: float

    @property
    def a2a(self) -> float:
        return self.a2a_latency + self.a2a_bandwidth

    @property
    def total(self) -> float:
        return self.floor + self.a2a + self.tp_comm + self.expert + self.dense + self.kv_read


@dataclass(frozen=True)
class PhaseTime:
    layer: LayerTime
    layers: int
    forwards: int        # decode: 1 step; prefill: the chunks
    step_extra_us: float  # per forward: floor + dense layers; plus the LM head once
    total_us: float


@dataclass(frozen=True)
class Prediction:
    parallelism: Parallelism
    decode: PhaseTime
    prefill: PhaseTime
    memory_gb_per_gpu: float
    fits: bool
    notes: tuple[str, ...]

    @property
    def tpot_ms(self) -> float:
        return self.decode.total_us / 1e3

    @property
    def ttft_ms(self) -> float:
        return self.prefill.total_us / 1e3

    def throughput(self, batch: int, prompt: int) -> dict[str, float]:
        """Tokens/s of the replica and per GPU, decode and prefill."""
        g = self.parallelism.gpus
        decode = batch / (self.decode.total_us * 1e-6)
        prefill = batch * prompt / (self.prefill.total_us * 1e-6)
        return {"decode_tok_s": decode, "decode_tok_s_per_gpu": decode / g,
                "prefill_tok_s": prefill, "prefill_tok_s_per_gpu": prefill / g}


def _a2a(cal: Calibration, par: Parallelism, bytes_out: float, calls: int, notes: list[str],
         graph: bool = False) -> tuple[float, float]:
    """(latency, bandwidth) us of the EP all-to-all: each TP lane exchanges with the same lane of the
    other ep - 1 groups, TP groups packed into nodes, so gpus_per_node / tp of the ep ranks share a node."""
    ep = par.ep
    if ep <= 1:
        return 0.0, 0.0
    per_node = max(1, min(ep, cal.gpus_per_node // par.tp))
    if per_node == ep:
        link, note = cal.link(ep, graph)
        if note:
            notes.append(note)
        return link.terms_us(bytes_out, calls)
    off_node = (ep - per_node) / (ep - 1)
    bandwidth = cal.internode.terms_us(bytes_out * off_node, 0)[1]
    latency = calls * cal.internode.alpha_us
    if per_node > 1:
        intra, note = cal.link(per_node, graph)
        if note:
            notes.append(note)
        latency = calls * max(intra.alpha_us, cal.internode.alpha_us)
        bandwidth = max(bandwidth, intra.terms_us(bytes_out * (1 - off_node), 0)[1])
    return latency, bandwidth


def _allreduce(cal: Calibration, tp: int, nbytes: float, notes: list[str]) -> float:
    """Two all-reduces a layer (attention out, experts out) over the tp GPUs, ring cost."""
    if tp <= 1:
        return 0.0
    link, note = cal.link(tp)
    notes.append(f"TP all-reduces use the all-to-all link of {tp} GPUs" + (f" ({note})" if note else ""))
    return 2 * (link.alpha_us + 2 * (tp - 1) / tp * nbytes / (link.beta_gbps * 1e3))


def _rate_us(read_bytes: float, gbps: float, flops: float, tflops: float) -> float:
    return max(read_bytes / (gbps * 1e3), flops / (tflops * 1e6))


def _slots(spec: ModelSpec, par: Parallelism, work: Workload) -> int:
    return work.slots_per_rank or -(-spec.experts // par.ep)


def decode_step(spec: ModelSpec, par: Parallelism, work: Workload, cal: Calibration,
                notes: list[str]) -> PhaseTime:
    """One decode step of the replica: every sequence emits one token."""
    ep, tp, h = par.ep, par.tp, spec.hidden
    b = work.batch / ep  # tokens per EP group
    mode = work.decode_mode
    rows = (ep - 1) * (b / tp)  # capacity mode: every token to every other rank, split over the TP lanes
    lat, bw = _a2a(cal, par, rows * (row_bytes(h, spec.top_k) + h * BYTES), 2, notes, mode == "graph")
    touched = work.touched if work.touched is not None else touched_fraction(spec.experts, spec.top_k,
                                                                               work.batch)
    expert_read = (_slots(spec, par, work) * touched * spec.expert_bytes
                   + 3 * h * spec.shared_intermediate * BYTES) / tp
    assignments = work.batch * spec.top_k / ep * work.imbalance
    expert_flops = (assignments * spec.expert_params + b * 3 * h * spec.shared_intermediate) * 2 / tp
    dense_params = spec.attn_params + spec.experts * h
    ctx = work.decode_context
    layer = LayerTime(
        floor=cal.floor_us_per_layer[mode], a2a_latency=lat, a2a_bandwidth=bw,
        tp_comm=_allreduce(cal, tp, b * h * BYTES, notes),
        expert=_rate_us(expert_read, cal.expert_read_gbps, expert_flops, cal.expert_tflops),
        expert_read=expert_read / (cal.expert_read_gbps * 1e3),
        dense=_rate_us(dense_params * BYTES / tp, cal.dense_read_gbps, 2 * b * dense_params / tp,
                       cal.dense_tflops),
        kv_read=b * ctx * spec.kv_bytes_per_token / min(tp, spec.kv_shards) / (cal.dense_read_gbps * 1e3))
    dense_layers = spec.layers - spec.moe_layers
    extra = (cal.floor_us_per_step[mode]
             + _rate_us(spec.step_params * BYTES / tp, cal.dense_read_gbps, 2 * b * spec.step_params / tp,
                        cal.dense_tflops)
             + dense_layers * (layer.kv_read + layer.tp_comm))
    return PhaseTime(layer, spec.moe_layers, 1, extra, spec.moe_layers * layer.total + extra)


def prefill(spec: ModelSpec, par: Parallelism, work: Workload, cal: Calibration,
            notes: list[str]) -> PhaseTime:
    """The prompts of the whole batch, in chunks of whole sequences per EP group."""
    ep, tp, h = par.ep, par.tp, spec.hidden
    seqs = -(-work.batch // ep)
    chunk = work.prefill_chunk or seqs * work.prompt
    per_chunk = max(1, min(seqs, chunk // work.prompt))
    chunks = -(-seqs // per_chunk)
    t = per_chunk * work.prompt  # tokens per chunk per EP group
    lat, bw = _a2a(cal, par, t / tp * remote_ranks(spec.experts, ep, spec.top_k) * work.imbalance
                   * (row_bytes(h, spec.top_k) + h * BYTES), 3, notes)
    shared_bytes = 3 * h * spec.shared_intermediate * BYTES
    expert_read = (_slots(spec, par, work) * spec.expert_bytes + shared_bytes) / tp
    expert_flops = (t * spec.top_k * work.imbalance * spec.expert_params
                    + t * 3 * h * spec.shared_intermediate) * 2 / tp
    dense_params = spec.attn_params + spec.experts * h
    attention_flops = per_chunk * 2 * work.prompt ** 2 * spec.q_heads * spec.head_dim / tp  # causal
    layer = LayerTime(
        floor=cal.floor_us_per_layer["prefill"], a2a_latency=lat, a2a_bandwidth=bw,
        tp_comm=_allreduce(cal, tp, t * h * BYTES, notes),
        expert=_rate_us(expert_read, cal.expert_read_gbps, expert_flops, cal.expert_tflops),
        expert_read=expert_read / (cal.expert_read_gbps * 1e3),
        dense=(_rate_us(dense_params * BYTES / tp, cal.dense_read_gbps, 2 * t * dense_params / tp,
                        cal.dense_tflops) + attention_flops / (cal.sdpa_tflops * 1e6)),
        kv_read=0.0)
    dense_layers = spec.layers - spec.moe_layers
    body = spec.step_params - spec.vocab * h  # the dense layers
    per_forward = (cal.floor_us_per_step["prefill"]
                   + 2 * t * body / tp / (cal.dense_tflops * 1e6)
                   + dense_layers * (layer.tp_comm + attention_flops / (cal.sdpa_tflops * 1e6)))
    lm_head = _rate_us(spec.vocab * h * BYTES / tp, cal.dense_read_gbps, 2 * seqs * spec.vocab * h / tp,
                       cal.dense_tflops)
    total = chunks * (spec.moe_layers * layer.total + per_forward) + lm_head
    return PhaseTime(layer, spec.moe_layers, chunks, per_forward, total)


def memory_per_gpu(spec: ModelSpec, par: Parallelism, work: Workload) -> float:
    """Bytes one GPU holds: its experts and its share of every other weight, and its KV cache."""
    experts = spec.moe_layers * _slots(spec, par, work) * spec.expert_params
    rest = spec.total_params - spec.moe_layers * spec.experts * spec.expert_params
    kv = (-(-work.batch // par.ep) * (work.prompt + work.output) * spec.layers * spec.kv_bytes_per_token
          / min(par.tp, spec.kv_shards))
    return (experts + rest) * BYTES / par.tp + kv


def predict(spec: ModelSpec, par: Parallelism, work: Workload, cal: Calibration) -> Prediction:
    """Decode step (TPOT) and prefill time of one replica, and whether it fits in GPU memory."""
    if spec.experts % par.ep:
        raise ValueError(f"{spec.experts} experts do not split over EP {par.ep}")
    notes: list[str] = []
    decode = decode_step(spec, par, work, cal, notes)
    pre = prefill(spec, par, work, cal, notes)
    memory = memory_per_gpu(spec, par, work)
    fits = memory <= cal.memory_fraction * cal.gpu_memory_gb * 1e9
    return Prediction(par, decode, pre, memory / 1e9, fits, tuple(dict.fromkeys(notes)))


def with_layers(spec: ModelSpec, moe_layers: int) -> ModelSpec:
    """The same model with `moe_layers` MoE layers and its dense layers kept (what a reduced bench runs)."""
    return dataclasses.replace(spec, moe_layers=moe_layers, layers=spec.layers - spec.moe_layers + moe_layers)
