"""GPU readings from NVML (nvidia-ml-py): utilization, memory, power and NVLink bytes per GPU.

Without NVML (no driver, no GPU, a broken stack) :meth:`Gpus.open` logs one line and returns None;
the GPU metrics are then absent and nothing else changes. A reading one GPU does not support is None.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from balancerd.log import Log

_ALL_LINKS = 0xFFFFFFFF  # NVML field scope: summed over every NVLink of the GPU
_KIB = 1024


@dataclass(frozen=True)
class GpuSample:
    """One GPU's readings; None where NVML had no answer."""

    index: int
    utilization: float | None         # share of the last sample period a kernel ran, 0..1
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    power_watts: float | None
    nvlink_tx_bytes: int | None        # data bytes sent over all links since the driver loaded
    nvlink_rx_bytes: int | None


class Gpus:
    """The node's GPUs through NVML. Thread-safe (NVML is); call :meth:`close` when done."""

    def __init__(self, nvml: Any, handles: list[Any]):
        self._nvml = nvml
        self._handles = handles

    @classmethod
    def open(cls, log: Log) -> Gpus | None:
        """Initialise NVML and list the GPUs; None (with one log line) when there is nothing to read."""
        try:
            import pynvml
        except ImportError:
            log.info("nvidia-ml-py is not installed; GPU metrics are off")
            return None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            log.info("NVML not available; GPU metrics are off", reason=exc)
            return None
        try:
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except pynvml.NVMLError as exc:
            pynvml.nvmlShutdown()
            log.info("NVML cannot list the GPUs; GPU metrics are off", reason=exc)
            return None
        if not handles:
            pynvml.nvmlShutdown()
            log.info("NVML finds no GPU; GPU metrics are off")
            return None
        log.info("GPU metrics from NVML", gpus=len(handles))
        return cls(pynvml, handles)

    @property
    def count(self) -> int:
        return len(self._handles)

    def sample(self) -> list[GpuSample]:
        """Read every GPU now."""
        return [self._sample(i, h) for i, h in enumerate(self._handles)]

    def _sample(self, index: int, handle: Any) -> GpuSample:
        n = self._nvml
        util = self._read(n.nvmlDeviceGetUtilizationRates, handle)
        memory = self._read(n.nvmlDeviceGetMemoryInfo, handle)
        power_mw = self._read(n.nvmlDeviceGetPowerUsage, handle)
        tx, rx = self._nvlink(handle)
        return GpuSample(
            index=index, utilization=None if util is None else util.gpu / 100.0,
            memory_used_bytes=None if memory is None else int(memory.used),
            memory_total_bytes=None if memory is None else int(memory.total),
            power_watts=None if power_mw is None else power_mw / 1000.0,
            nvlink_tx_bytes=tx, nvlink_rx_bytes=rx)

    def _nvlink(self, handle: Any) -> tuple[int | None, int | None]:
        n = self._nvml
        fields = [(n.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, _ALL_LINKS),
                  (n.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, _ALL_LINKS)]
        values = self._read(n.nvmlDeviceGetFieldValues, handle, fields)
        if values is None:
            return None, None
        tx, rx = (int(v.value.ullVal) * _KIB if v.nvmlReturn == n.NVML_SUCCESS else None for v in values)
        return tx, rx

    def _read(self, fn: Callable, *args: Any) -> Any:
        try:
            return fn(*args)
        except self._nvml.NVMLError:
            return None

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError:
            pass
