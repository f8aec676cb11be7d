"""The expert-parallel MoE layer (EPMoELayer) and a residual stack of them (EPMoEStack)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kernels.route import RouteOutput, route
from moe_runtime.config import NORM_EPS, DispatchConfig, MoEConfig
from moe_runtime.copy_engine import Transfer
from moe_runtime.counters import Counters
from moe_runtime.dispatch import (
    InFlight,
    Packed,
    Received,
    arrival_buffer,
    combine_returned,
    dispatch,
    pack_ranges,
    prepare,
    read_counts,
    receive,
    send,
    send_back,
)
from moe_runtime.experts import ExpertsHalfway, finish_experts, start_experts, swiglu
from moe_runtime.group import EPGroup
from moe_runtime.placement import RuntimePlacement, choose_replicas
from moe_runtime.reference import LogicalWeights
from moe_runtime.streams import current_stream


def _check(cfg: MoEConfig, layer: int, group: EPGroup, placement: RuntimePlacement, counters: Counters | None,
           selection_bias: torch.Tensor | None) -> None:
    """Refuse mismatched pieces at construction, so no rank enters a collective it cannot finish."""
    if placement.world != group.world:
        raise ValueError(f"the placement is for {placement.world} ranks ({placement.slots} slots, "
                         f"{placement.slots_per_rank} a rank) but the EP group has {group.world}")
    if placement.experts != cfg.experts:
        raise ValueError(f"the placement places {placement.experts} experts, {cfg.name} has {cfg.experts}")
    if not 0 <= layer < placement.layers:
        raise ValueError(f"layer {layer} outside the placement's {placement.layers} layers")
    if placement.phys_to_log.device != group.device:
        raise ValueError(f"the placement lives on {placement.phys_to_log.device}, "
                         f"the group on {group.device}")
    if counters is not None:
        want = (placement.layers, cfg.experts, placement.slots_per_rank)
        got = (*counters.routed.shape, counters.received.shape[1])
        if got != want or counters.device != group.device:
            raise ValueError(f"counters are [layers, experts, slots a rank] = {got} on {counters.device}, "
                             f"need {want} on {group.device}")
    bias = selection_bias
    if bias is not None and (bias.shape != (cfg.experts,) or bias.dtype != torch.float32
                             or bias.device != group.device):
        raise ValueError(f"selection_bias must be [{cfg.experts}] float32 on {group.device}, "
                         f"got {list(bias.shape)} {bias.dtype} on {bias.device}")


class _LayerCounters(NamedTuple):
    """One layer's rows of the counters, sliced once: the forward is launch-bound at small batches."""

    counters: Counters
    routed: torch.Tensor
    received: torch.Tensor
    dropped: torch.Tensor
    bias_changed: torch.Tensor
    record: torch.Tensor


class Started(NamedTuple):
    """One batch routed and packed, its counts on their way (`EPMoELayer.begin`)."""

    packed: Packed
    ready: torch.cuda.Event | None  # recorded once the rows are packed (on a GPU)
    changed: torch.Tensor           # 0-d int64: assignments the selection bias changed


class Sent(NamedTuple):
    """One batch on its way to its experts (`EPMoELayer.send_rows`)."""

    flight: InFlight
    changed: torch.Tensor
    dropped: torch.Tensor | None    # 0-d int64 assignments dropped at the source; None where none can be


class EPMoELayer(nn.Module):
    """One MoE layer: route, dispatch to the slots' ranks, local SwiGLU experts, combine, shared experts.

    Weights are stored per local slot (w_gate_up [K, 2I, H], w_down [K, H, I]) so a slot can be
    refilled when its expert moves. `selection_bias` is this layer's row of a device [L, E] buffer,
    read on every forward; `counters=None` turns all counting and timing off.
    """

    def __init__(self, cfg: MoEConfig, layer: int, group: EPGroup, placement: RuntimePlacement, *,
                 dispatch: DispatchConfig | None = None, counters: Counters | None = None,
                 selection_bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        _check(cfg, layer, group, placement, counters, selection_bias)
        self.cfg, self.layer, self.group, self.placement = cfg, layer, group, placement
        self.dispatch_config = dispatch or DispatchConfig()
        self.counters, self.selection_bias = counters, selection_bias
        self.spec = cfg.routing_spec()
        h, i, si, k = cfg.hidden, cfg.intermediate, cfg.shared_intermediate, placement.slots_per_rank

        def weight(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(shape, dtype=dtype, device=group.device), requires_grad=False)

        self.router = weight(cfg.experts, h)
        self.register_buffer("router_bias", torch.zeros(cfg.experts, dtype=dtype, device=group.device))
        self.w_gate_up = weight(k, 2 * i, h)
        self.w_down = weight(k, h, i)
        self.register_parameter("shared_gate_up", weight(2 * si, h) if si else None)
        self.register_parameter("shared_down", weight(h, si) if si else None)
        bias = torch.zeros(cfg.experts, device=group.device) if cfg.routing == "sigmoid_grouped" else None
        self.register_buffer("correction_bias", bias)

    @torch.no_grad()
    def load_weights(self, w: LogicalWeights) -> None:
        """Fill the router, shared experts and every local slot from the layer's logical weights."""
        experts = torch.from_numpy(self.placement.local_experts(self.layer, self.group.rank)).long()
        self.router.copy_(w.router)
        if w.router_bias is None:
            self.router_bias.zero_()
        else:
            self.router_bias.copy_(w.router_bias)
        self.w_gate_up.copy_(w.w_gate_up[experts])
        self.w_down.copy_(w.w_down[experts])
        if self.correction_bias is not None:
            self.correction_bias.copy_(w.correction_bias)
        if self.shared_gate_up is not None:
            self.shared_gate_up.copy_(w.shared_gate_up)
            self.shared_down.copy_(w.shared_down)

    @property
    def counters(self) -> Counters | None:
        return None if self._rows is None else self._rows.counters

    @counters.setter
    def counters(self, counters: Counters | None) -> None:
        """Attach (or with None detach) counters; read on every forward."""
        i = self.layer
        self._rows = None if counters is None else _LayerCounters(
            counters, counters.routed[i], counters.received[i], counters.dropped[i], counters.bias_changed[i],
            counters.record)

    def _timed(self, phase: str):
        c = self.counters
        return c.timed(phase, self.layer) if c is not None and c.timing else nullcontext()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.cfg.hidden:
            raise ValueError(f"EPMoELayer takes [tokens, {self.cfg.hidden}], got {list(x.shape)}")
        r, phys = self._route(x)
        ranges = self.dispatch_config.token_ranges(x.shape[0])
        if len(ranges) == 1:
            out, dropped = self._whole(x, phys, r.weights)
        else:
            out, dropped = self._pipelined(x, phys, r.weights, ranges)
        self.account(r.changed, dropped)
        return out

    def _route(self, x: torch.Tensor) -> tuple[RouteOutput, torch.Tensor]:
        """The routing of x and the physical slot of each assignment."""
        c, layer, pl = self._rows, self.layer, self.placement
        r = route(F.linear(x, self.router, self.router_bias), self.spec, correction_bias=self.correction_bias,
                  selection_bias=self.selection_bias, counts=None if c is None else c.routed,
                  record=None if c is None else c.record)
        return r, choose_replicas(r.ids, pl.log_to_phys[layer], pl.replicas[layer], offset=self.group.rank)

    def account(self, changed: torch.Tensor, dropped: torch.Tensor | None) -> None:
        """Add a forward's bias-changed and dropped assignments to the counters (gated by the device flag)."""
        c = self._rows
        if c is None:
            return
        if self.selection_bias is not None:
            c.bias_changed.addcmul_(changed, c.record)
        if dropped is not None:
            c.dropped.addcmul_(dropped, c.record)

    # The steps of one batch, in order, for a caller that interleaves batches (EPMoEStack): every rank
    # must take the same steps in the same order.

    def begin(self, x: torch.Tensor, lane: int = 0, lanes: int = 1) -> Started:
        """Route x [T, H] (normed), pack its rows and start its count exchange (no host sync); with a
        copy-engine transport its rows will travel in lane `lane` of `lanes`."""
        r, phys = self._route(x)
        packed = pack_ranges(x, phys, r.weights, self.group, self.placement.slots_per_rank,
                             self.dispatch_config, [slice(0, x.shape[0])], lane, lanes)
        ready = None
        if x.is_cuda:
            ready = torch.cuda.Event()
            ready.record(current_stream(x.device))
        return Started(packed, ready, r.changed)

    def send_rows(self, started: Started) -> Sent:
        """Read the counts (exact mode: the host sync) and start the dispatch, which waits for the rows
        to be packed but not for compute issued since `begin`."""
        (outgoing,) = read_counts(started.packed, self.group)
        return Sent(send(outgoing, self.group, after=started.ready), started.changed, started.packed.dropped)

    def start_experts(self, sent: Sent) -> ExpertsHalfway:
        """Wait for the dispatch and run the local experts up to their down projection."""
        return self._start_experts(receive(sent.flight, self.cfg.hidden, self.cfg.top_k))

    def finish_experts(self, half: ExpertsHalfway) -> torch.Tensor:
        """The rest of the local experts: [R, H], one result a received row."""
        return finish_experts(half)

    def return_results(self, y: torch.Tensor, sent: Sent) -> tuple[torch.Tensor, dist.Work | Transfer | None]:
        """Start sending the results back to their source ranks."""
        return send_back(y, sent.flight.outgoing.path, self.group)

    def end(self, x: torch.Tensor, returning: tuple[torch.Tensor, dist.Work | Transfer | None],
            sent: Sent) -> torch.Tensor:
        """The layer's output for x: the shared experts (while the results travel) plus the results."""
        return combine_returned(*returning, sent.flight.outgoing.path, add=self._shared(x), dtype=x.dtype)

    def _experts(self, recv: Received) -> torch.Tensor:
        return finish_experts(self._start_experts(recv))

    def _start_experts(self, recv: Received) -> ExpertsHalfway:
        c = self._rows  # received per slot is counted inside the expert path
        return start_experts(recv.x, recv.slots, recv.weights, self.w_gate_up, self.w_down, recv.slot_sizes,
                             count=None if c is None else (c.received, c.record))

    def _shared(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.shared_gate_up is None:
            return None
        return swiglu(x, self.shared_gate_up, self.shared_down)

    def _whole(self, x: torch.Tensor, phys: torch.Tensor,
               weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        with self._timed("dispatch"):
            recv, path = dispatch(x, phys, weights, self.group, self.placement.slots_per_rank,
                                  self.dispatch_config)
        with self._timed("expert"):
            y = self._experts(recv)
        with self._timed("combine"):
            back, work = send_back(y, path, self.group)
            shared = self._shared(x)  # its GEMMs run while the results travel back
            out = combine_returned(back, work, path, add=shared, dtype=x.dtype)
        return out, recv.dropped

    def _pipelined(self, x: torch.Tensor, phys: torch.Tensor, weights: torch.Tensor,
                   ranges: list[slice]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Micro-batches: range i + 1's dispatch and range i - 1's combine overlap range i's experts.

        On NCCL's one stream the order is d0, d1, c0, d2, c1, ...: range i + 1 is sent once range i's
        experts are issued (so its host cost hides behind them), from a side stream that waits only
        for the packed buffers, and range i's results once its experts are. Timed phases are what the
        compute stream waits for: dispatch until range 0 has arrived (the shared experts run
        meanwhile), expert the ranges' experts with any wait for later ranges, combine the wait for
        the last results and the sums.
        """
        group, hidden, top_k = self.group, x.shape[1], phys.shape[1]
        with self._timed("dispatch"):
            outgoing, dropped = prepare(x, phys, weights, group, self.placement.slots_per_rank,
                                        self.dispatch_config, ranges)
            packed, arrivals = None, [None] * len(outgoing)
            if x.is_cuda and group.world > 1:  # later ranges land in buffers allocated before the event
                # (or in the copy engines' workspace, when they carry the range)
                arrivals = [None] + [None if o.layout is not None and group.copy_engine is not None
                                     else arrival_buffer(o) for o in outgoing[1:]]
                packed = torch.cuda.Event()
                packed.record(current_stream(x.device))
            flights = [send(outgoing[0], group)]
            shared = self._shared(x)
            recv = receive(flights[0], hidden, top_k)
        with self._timed("expert"):
            returning = []
            for i, range_out in enumerate(outgoing):
                if i:
                    recv = receive(flights[i], hidden, top_k)
                y = self._experts(recv)
                if i + 1 < len(outgoing):
                    flights.append(send(outgoing[i + 1], group, after=packed, out=arrivals[i + 1]))
                returning.append(send_back(y, range_out.path, group))
        with self._timed("combine"):
            out = torch.empty_like(x)
            for r, (back, work), range_out in zip(ranges, returning, outgoing, strict=True):
                add = None if shared is None else shared[r]
                combine_returned(back, work, range_out.path, out=out[r], add=add, dtype=x.dtype)
        return out, dropped


class EPMoEStack(nn.Module):
    """cfg.layers EP MoE layers with residuals: x = x + moe_l(rms_norm(x))."""

    def __init__(self, cfg: MoEConfig, group: EPGroup, placement: RuntimePlacement, *,
                 dispatch: DispatchConfig | None = None, counters: Counters | None = None,
                 selection_bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if placement.layers != cfg.layers:
            raise ValueError(f"the placement has {placement.layers} layers, {cfg.name} has {cfg.layers}")
        if selection_bias is not None and selection_bias.shape != (cfg.layers, cfg.experts):
            raise ValueError(f"selection_bias must be [{cfg.layers}, {cfg.experts}], "
                             f"got {list(selection_bias.shape)}")
        self.layers = nn.ModuleList(
            EPMoELayer(cfg, layer, group, placement, dispatch=dispatch, counters=counters, dtype=dtype,
                       selection_bias=None if selection_bias is None else selection_bias[layer])
            for layer in range(cfg.layers))

    def load_weights(self, weights: Sequence[LogicalWeights]) -> None:
        if len(weights) != len(self.layers):
            raise ValueError(f"got weights for {len(weights)} layers, the stack has {len(self.layers)}")
        for layer, w in zip(self.layers, weights, strict=True):
            layer.load_weights(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        config = self.layers[0].dispatch_config
        ranges = config.token_ranges(x.shape[0])
        if config.interleave and len(ranges) > 1:
            return self._interleaved(x, ranges)
        for layer in self.layers:
            x = x + layer(_norm(x))
        return x

    def _interleaved(self, x: torch.Tensor, ranges: list[slice]) -> torch.Tensor:
        """The token ranges side by side through the layers (DispatchConfig.interleave), in one stream.

        The ranges take turns, range 0 of layer 0 first, then range 1, ..., then range 0 of layer 1. A
        turn splits its range's experts at the down projection and issues between the halves the next
        turn's routing and packing (after the end of that range's previous layer, whose results have
        travelled meanwhile); once the second half is issued, the host waits for the next range's
        counts and starts its dispatch, then starts returning this range's results. For ranges A and
        B, each all-to-all travels while the other range's experts run: B's results and then B's rows
        behind A's two halves, A's results and then A's next rows behind B's. The host waits for a
        range's counts while the GPU still has a second half to run, so it issues ahead of the GPU.
        A dispatch waits only for its rows to be packed, and transfers are issued in the order the
        compute stream produces their inputs, so none queues behind experts it does not need. The
        phases overlap, so a timed step records the whole stack's time as expert time, shared
        evenly by the layers (what the daemon needs for the MoE layers' share of the step).
        """
        counters = self.layers[0].counters
        timed = counters is not None and counters.timing
        with counters.timed("expert", slice(None)) if timed else nullcontext():
            return self._run_interleaved(x, ranges)

    def _run_interleaved(self, x: torch.Tensor, ranges: list[slice]) -> torch.Tensor:
        n, layers = len(ranges), self.layers
        xs = [x[r] for r in ranges]
        normed: list[torch.Tensor | None] = [None] * n
        started: list[Started | None] = [None] * n
        sent: list[Sent | None] = [None] * n
        back: list[tuple | None] = [None] * n
        per_layer: list[list[Sent]] = [[] for _ in layers]

        def step_to(i: int, layer: int) -> None:
            """Range i: end layer - 1 (if any), begin `layer` (if any)."""
            if layer > 0:
                xs[i] = xs[i] + layers[layer - 1].end(normed[i], back[i], sent[i])
            if layer < len(layers):
                normed[i] = _norm(xs[i])
                started[i] = layers[layer].begin(normed[i], i, n)

        def send_rows(i: int, layer: int) -> None:
            sent[i] = layers[layer].send_rows(started[i])
            per_layer[layer].append(sent[i])

        step_to(0, 0)
        send_rows(0, 0)
        for turn in range(n * len(layers)):
            index, i = divmod(turn, n)
            next_index, j = divmod(turn + 1, n)
            layer = layers[index]
            half = layer.start_experts(sent[i])
            step_to(j, next_index)
            y = layer.finish_experts(half)
            if next_index < len(layers):
                send_rows(j, next_index)
            back[i] = layer.return_results(y, sent[i])
        for i in range(1, n):
            step_to(i, len(layers))
        for layer, sents in zip(layers, per_layer, strict=True):
            dropped = [s.dropped for s in sents if s.dropped is not None]
            layer.account(sum(s.changed for s in sents), sum(dropped) if dropped else None)
        return torch.cat(xs)


def _norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[1],), eps=NORM_EPS)
