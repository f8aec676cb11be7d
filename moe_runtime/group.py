"""The expert-parallel group: rank, world, device and the collectives the layers use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from moe_runtime.copy_engine import CopyEngineTransport, Transfer
from moe_runtime.streams import current_stream

# The backend each device type needs for all_to_all_single.
BACKENDS = {"cuda": "nccl", "cpu": "gloo"}


class PeerLayout(NamedTuple):
    """Where one rank's rows land in every peer's receive region (what a copy-engine transfer needs
    beyond the split sizes): dst_offsets[p] rows into p's region, of region_rows rows on every rank,
    in the transport's lane `lane`."""

    dst_offsets: list[int]
    region_rows: int
    lane: int = 0


@dataclass(frozen=True)
class EPGroup:
    """An EP group. `group` is None only for a single rank without torch.distributed."""

    rank: int
    world: int
    device: torch.device
    group: dist.ProcessGroup | None = None
    copy_engine: CopyEngineTransport | None = None  # variable all-to-alls with a layout go through it

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"EPGroup: rank {self.rank} outside a world of {self.world}")
        if self.group is None and self.world != 1:
            raise ValueError(f"EPGroup: a world of {self.world} needs a process group")

    def all_to_all(self, x: torch.Tensor, out_splits: list[int] | None = None,
                   in_splits: list[int] | None = None) -> torch.Tensor:
        """all_to_all_single along dim 0: even splits when none are given; a copy-free no-op at world 1."""
        out, work = self.all_to_all_start(x, out_splits, in_splits)
        if work is not None:
            work.wait()
        return out

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[world, *x.shape]: every rank's x, in rank order."""
        if self.world == 1:
            return x.unsqueeze(0)
        out = x.new_empty((self.world * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=self.group)
        return out.view(self.world, *x.shape)

    def all_to_all_start(self, x: torch.Tensor, out_splits: list[int] | None = None,
                         in_splits: list[int] | None = None, after: torch.cuda.Event | None = None,
                         out: torch.Tensor | None = None, layout: PeerLayout | None = None,
                         ) -> tuple[torch.Tensor, dist.Work | Transfer | None]:
        """`all_to_all` without waiting: `out` is valid once `work` (None at world 1) is waited for.

        Under NCCL, waiting makes the current stream wait for the collective's; the host goes on. A
        collective normally starts after everything issued on the current stream so far; with `after`
        (an event recorded once x was written) it waits for that event alone, so it can run beside
        compute issued since. `out`, when given, must then have been allocated before the event;
        without it the buffer comes from the issuing side stream's pool (memory that compute issued
        since may still use never comes from there). With a copy-engine transport and a `layout`, the
        rows go by peer copies instead and land in its workspace (`out` is not used).
        """
        if self.world == 1:
            return x, None
        if self.copy_engine is not None and layout is not None:
            rows = sum(out_splits)
            return self.copy_engine.start(x, in_splits, layout.dst_offsets, rows, layout.region_rows, after,
                                          layout.lane)
        rows = x.shape[0] if out_splits is None else sum(out_splits)
        if out is not None and (out.shape != (rows, *x.shape[1:]) or out.dtype != x.dtype):
            raise ValueError(f"all_to_all_start: out is {list(out.shape)} {out.dtype}, "
                             f"need {[rows, *x.shape[1:]]} {x.dtype}")
        x = x.contiguous()
        if after is None or not x.is_cuda:
            if out is None:
                out = x.new_empty((rows, *x.shape[1:]))
            return out, dist.all_to_all_single(out, x, out_splits, in_splits, group=self.group, async_op=True)
        current, side = current_stream(x.device), _side_stream(x.device)
        side.wait_event(after)
        with torch.cuda.stream(side):
            if out is None:
                out = x.new_empty((rows, *x.shape[1:]))
                out.record_stream(current)  # read there once the work is waited for
            work = dist.all_to_all_single(out, x, out_splits, in_splits, group=self.group, async_op=True)
        return out, work


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One stream per device from which collectives are issued that must not wait for the compute
    stream's latest work (NCCL's own stream waits for the issuing stream)."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def ep_group(group: dist.ProcessGroup | None = None, device: torch.device | str | None = None,
             copy_engine_bytes: int = 0) -> EPGroup:
    """Wrap an initialised process group (default: the world group) as the EP group.

    Without torch.distributed initialised this is a single-rank group. The device defaults to the
    current CUDA device under NCCL and to the CPU otherwise; a backend that cannot run
    all_to_all_single on that device is refused here, before any collective. `copy_engine_bytes` > 0
    (CUDA, one node) builds a `CopyEngineTransport` with that workspace a rank (collective): exact
    dispatch then moves rows by the copy engines, leaving the SMs to the experts.
    """
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError("ep_group: a process group was given but torch.distributed is not initialised")
        return EPGroup(0, 1, torch.device(device or "cpu"))
    group = group or dist.group.WORLD
    backend = str(dist.get_backend(group))
    if device is None:
        device = f"cuda:{torch.cuda.current_device()}" if "nccl" in backend else "cpu"
    device = torch.device(device)
    need = BACKENDS.get(device.type)
    if need is None or need not in backend:
        raise ValueError(f"ep_group: device {device} needs the {need or 'a supported'} backend for "
                         f"all-to-all, the group uses {backend!r}")
    if copy_engine_bytes and device.type != "cuda":
        raise ValueError(f"ep_group: copy_engine_bytes needs a CUDA device, got {device}")
    engine = None
    if copy_engine_bytes:
        engine = CopyEngineTransport(group, device, copy_engine_bytes)
        # NCCL sets up its peer connections on first use; with the rows on the copy engines that could
        # be in a weight migration's first step (a 0.77 s step on 4 H200s without this): set them up now.
        probe = torch.zeros(dist.get_world_size(group), device=device)
        dist.all_to_all_single(torch.empty_like(probe), probe, group=group)
    return EPGroup(dist.get_rank(group), dist.get_world_size(group), device, group, engine)
