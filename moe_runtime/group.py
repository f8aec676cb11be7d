"""The expert-parallel group: rank, world, device and the all-to-all the layers use."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

# The backend each device type needs for all_to_all_single.
BACKENDS = {"cuda": "nccl", "cpu": "gloo"}


@dataclass(frozen=True)
class EPGroup:
    """An EP group. `group` is None only for a single rank without torch.distributed."""

    rank: int
    world: int
    device: torch.device
    group: dist.ProcessGroup | None = None

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

    def all_to_all_start(self, x: torch.Tensor, out_splits: list[int] | None = None,
                         in_splits: list[int] | None = None, after: torch.cuda.Event | None = None,
                         out: torch.Tensor | None = None) -> tuple[torch.Tensor, dist.Work | None]:
        """`all_to_all` without waiting: `out` is valid once `work` (None at world 1) is waited for.

        Under NCCL, waiting makes the current stream wait for the collective's; the host goes on. A
        collective normally starts after everything issued on the current stream so far; with `after`
        (an event recorded once x and `out` were allocated and x written) it waits for that event
        alone, so it can run beside compute issued since. `out` must then be given: a buffer
        allocated now could be memory that compute issued since still uses.
        """
        if after is not None and out is None:
            raise ValueError("all_to_all_start: `after` needs an `out` allocated before the event")
        if self.world == 1:
            return x, None
        rows = x.shape[0] if out_splits is None else sum(out_splits)
        if out is None:
            out = x.new_empty((rows, *x.shape[1:]))
        elif out.shape != (rows, *x.shape[1:]) or out.dtype != x.dtype:
            raise ValueError(f"all_to_all_start: out is {list(out.shape)} {out.dtype}, "
                             f"need {[rows, *x.shape[1:]]} {x.dtype}")
        x = x.contiguous()
        if after is None or not x.is_cuda:
            return out, dist.all_to_all_single(out, x, out_splits, in_splits, group=self.group, async_op=True)
        side = _side_stream(x.device)
        side.wait_event(after)
        with torch.cuda.stream(side):
            work = dist.all_to_all_single(out, x, out_splits, in_splits, group=self.group, async_op=True)
        return out, work


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One stream per device from which collectives are issued that must not wait for the compute
    stream's latest work (NCCL's own stream waits for the issuing stream)."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def ep_group(group: dist.ProcessGroup | None = None, device: torch.device | str | None = None) -> EPGroup:
    """Wrap an initialised process group (default: the world group) as the EP group.

    Without torch.distributed initialised this is a single-rank group. The device defaults to the
    current CUDA device under NCCL and to the CPU otherwise; a backend that cannot run
    all_to_all_single on that device is refused here, before any collective.
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
    return EPGroup(dist.get_rank(group), dist.get_world_size(group), device, group)
