"""Count traces: expert loads over time, [T intervals, L layers, E experts], for `balancerd simulate`.

`.npz` (what `balancerd record` writes): counts [T, L, E]; wall_s, first_step, last_step [T]; scalars
gpus, slots, slots_per_rank, job; when the rings carried them, per-interval timings dispatch_us,
combine_us, expert_us [T, L] (mean over ranks, us per step), step_us [T] and tokens [T] (tokens per
step per rank). A `.npy` of shape [T, L, E] is a trace without metadata; any other load file that
`balancerd plan` reads is a trace of one interval.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from balancerd.lab.calibration import Calibration, fit_link
from balancerd.lab.costmodel import remote_ranks, row_bytes
from balancerd.lab.models import BYTES, ModelSpec
from balancerd.loads_io import LoadsError, read_loads

TIMINGS = ("dispatch_us", "combine_us", "expert_us")


@dataclass(frozen=True)
class Trace:
    counts: np.ndarray                 # [T, L, E] int64 assignments per interval
    wall_s: np.ndarray                 # [T] end of each interval, seconds
    steps: np.ndarray                  # [T] forward steps per interval; 0 where unknown
    gpus: int = 0                      # 0: unknown
    slots: int = 0
    job: str = ""
    tokens: np.ndarray | None = None   # [T] tokens per step per rank
    dispatch_us: np.ndarray | None = None  # [T, L]
    combine_us: np.ndarray | None = None
    expert_us: np.ndarray | None = None
    step_us: np.ndarray | None = None  # [T]

    def __post_init__(self) -> None:
        if self.counts.ndim != 3 or min(self.counts.shape) < 1:
            raise ValueError(f"counts must be [T, L, E] with T, L, E >= 1, got {self.counts.shape}")
        t = self.counts.shape[0]
        if self.wall_s.shape != (t,) or self.steps.shape != (t,):
            raise ValueError("wall_s and steps must have one entry per interval")
        if (self.counts < 0).any() or not np.isfinite(self.counts).all():
            raise ValueError("counts must be finite and >= 0")

    @property
    def intervals(self) -> int:
        return self.counts.shape[0]

    @property
    def layers(self) -> int:
        return self.counts.shape[1]

    @property
    def experts(self) -> int:
        return self.counts.shape[2]

    def tokens_per_step(self, top_k: int) -> float | None:
        """Tokens one forward step carried over all ranks (the replica's batch), when steps are known."""
        known = self.steps > 0
        if not known.any():
            return None
        per_step = self.counts[known].sum(axis=2).mean(axis=1) / self.steps[known] / top_k
        return float(np.median(per_step))


def read_trace(path: str | os.PathLike) -> Trace:
    """A trace from `.npz`, a [T, L, E] `.npy`, or any load file `balancerd plan` reads (one interval)."""
    path = Path(path)
    if path.suffix.lower() == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                doc = {k: z[k] for k in z.files}
        except (OSError, ValueError) as exc:
            raise LoadsError(f"{path}: cannot read as .npz: {exc}") from None
        if "counts" not in doc:
            raise LoadsError(f'{path}: no "counts" array')
        counts = doc["counts"]
        t = counts.shape[0] if counts.ndim == 3 else 0
        first, last = doc.get("first_step"), doc.get("last_step")
        steps = (last - first + 1) if first is not None and last is not None else np.zeros(t, np.int64)
        opt = {k: doc[k].astype(np.float64) for k in (*TIMINGS, "step_us", "tokens") if k in doc}
        try:
            return Trace(counts.astype(np.int64), doc.get("wall_s", np.arange(t, dtype=np.float64)),
                         steps.astype(np.int64), gpus=int(doc.get("gpus", 0)), slots=int(doc.get("slots", 0)),
                         job=str(doc.get("job", "")), **opt)
        except ValueError as exc:
            raise LoadsError(f"{path}: {exc}") from None
    if path.suffix.lower() == ".npy":
        try:
            raw = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise LoadsError(f"{path}: cannot read as .npy: {exc}") from None
        if raw.ndim == 3:
            if raw.dtype.kind not in "iuf" or not np.isfinite(raw).all() or (raw < 0).any() or 0 in raw.shape:
                raise LoadsError(f"{path}: a [T, L, E] trace must hold finite counts >= 0")
            t = raw.shape[0]
            return Trace(raw.astype(np.int64), np.arange(t, dtype=np.float64), np.zeros(t, np.int64))
    loads = read_loads(path)
    return Trace(loads[None].astype(np.int64), np.zeros(1), np.zeros(1, np.int64))


def write_trace(path: str | os.PathLike, trace: Trace) -> None:
    """Write `trace` as `.npz` (first_step/last_step rebuilt as consecutive ranges from steps)."""
    last = np.cumsum(np.maximum(trace.steps, 1)) - 1
    per_rank = trace.slots // trace.gpus if trace.gpus else 0
    arrays = {"counts": trace.counts, "wall_s": trace.wall_s, "last_step": last,
              "first_step": last - np.maximum(trace.steps, 1) + 1, "gpus": np.int64(trace.gpus),
              "slots": np.int64(trace.slots), "slots_per_rank": np.int64(per_rank), "job": np.str_(trace.job)}
    for name in (*TIMINGS, "step_us", "tokens"):
        value = getattr(trace, name)
        if value is not None:
            arrays[name] = value
    tmp = Path(f"{path}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def calibrate_from_trace(trace: Trace, spec: ModelSpec, base: Calibration) -> Calibration:
    """`base` with the all-to-all link of the trace's GPU count fitted from live telemetry.

    Per interval, the dispatch + combine time per layer against the bytes an exact-mode dispatch and
    combine move off a GPU for the interval's tokens per step (uniform routing). Three calls a layer
    (count exchange, rows, results). When the token counts do not vary enough to separate latency from
    bandwidth, only the latency is fitted and the bandwidth kept."""
    if trace.dispatch_us is None or trace.combine_us is None or trace.tokens is None or trace.gpus < 2:
        raise ValueError("the trace carries no all-to-all timings over 2 or more GPUs (record it from live "
                         "rings with dispatch/combine timers)")
    g = trace.gpus
    per_token = remote_ranks(spec.experts, g, spec.top_k) * (row_bytes(spec.hidden, spec.top_k)
                                                             + spec.hidden * BYTES)
    us = (trace.dispatch_us + trace.combine_us).mean(axis=1) / 3  # per call
    keep = (trace.tokens > 0) & (us > 0)
    if not keep.any():
        raise ValueError("the trace has no interval with tokens and all-to-all time")
    nbytes, us = trace.tokens[keep] * per_token / 3, us[keep]
    old, _ = base.link(g)
    if nbytes.max() > 2 * nbytes.min():
        link = fit_link(zip(nbytes, us, strict=True))
    else:
        alpha = float(max(np.median(us - nbytes / (old.beta_gbps * 1e3)), 0.0))
        link = dataclasses.replace(old, alpha_us=alpha)
    note = (f"all-to-all over {g} GPUs from live telemetry ({trace.job or 'trace'}, {int(keep.sum())} "
            f"intervals): {link.alpha_us:.1f} us + bytes / {link.beta_gbps:.0f} GB/s per call")
    return dataclasses.replace(base, a2a={**base.a2a, g: link}, source=f"{base.source} + telemetry",
                               notes=(*base.notes, note))
