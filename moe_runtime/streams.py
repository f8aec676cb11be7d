"""The current CUDA stream as a `torch.cuda.Stream`, built only when the current stream changed.

`torch.cuda.current_stream()` (and `Event.record()` without a stream, which calls it) builds a new
Stream object each call: 12-30 us of host time on the H200 machines, where the eager forward path
is launch-bound and asks for the stream several times a layer.
"""

from __future__ import annotations

import torch

_BUILT: dict[int, tuple[tuple, torch.cuda.Stream]] = {}  # device index -> (stream ids, Stream)


def current_stream(device: torch.device) -> torch.cuda.Stream:
    """The current stream of CUDA `device` (its index, or the current device's)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = torch._C._cuda_getCurrentStream(index)
    built = _BUILT.get(index)
    if built is None or built[0] != key:
        built = _BUILT[index] = (key, torch.cuda.current_stream(index))
    return built[1]
