"""Triton kernels interpreted on CPU, in a worker process of their own.

The interpreter (TRITON_INTERPRET=1) must be on before triton is first imported, and it must stay out of
every other test in this process (which imports triton to compile for the H200), hence a process of its
own: a spawned worker, started with the variable set. In the worker the kernel modules allocate their
outputs poisoned (NaN / -77-filled), so anything a kernel should write and does not shows up.
"""

from __future__ import annotations

import importlib
import math
import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager

import pytest
import torch


class PoisonedTorch:
    """torch, except that `empty` returns NaN / -77-filled tensors."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def empty(*size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        out = torch.empty(*size, dtype=dtype, device=device)
        return out.fill_(math.nan if dtype.is_floating_point else -77)


def _start_worker(kernels: tuple[tuple[str, str], ...]) -> None:
    import triton

    for name, kernel in kernels:
        module = importlib.import_module(name)
        assert not isinstance(getattr(module, kernel), triton.runtime.JITFunction), "not interpreted"
        module.torch = PoisonedTorch()


@contextmanager
def interpreter_worker(*kernels: tuple[str, str], timeout: float = 300) -> Iterator[Callable]:
    """A worker process started with TRITON_INTERPRET=1; ``kernels`` are (module, kernel) pairs whose
    kernel must run interpreted there and whose module gets PoisonedTorch. Yields ``call(fn, *args,
    **kwargs)``, which runs ``fn`` (a module-level function, pickled by name) in the worker."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        pool.submit(_start_worker, kernels).result(timeout=120)

    def call(fn: Callable, *args, **kwargs):
        return pool.submit(fn, *args, **kwargs).result(timeout=timeout)

    try:
        yield call
    finally:
        pool.shutdown()
