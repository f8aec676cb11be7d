"""The cost model's constants: defaults from shared/ANCHORS.md, fits from `bench ep`'s measurements or
from live telemetry, and the JSON file that carries them (`balancerd.calibration/1`).

An all-to-all call costs alpha + bytes / beta, where bytes are those leaving each GPU (to the other
ranks) and beta is in GB/s (10^9 bytes/s): the convention of ANCHORS.md's NCCL table. Rates are
fitted by minimising relative error, so 16 KiB and 16 MiB points weigh alike.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "balancerd.calibration/1"
FLOOR_MODES = ("graph", "eager", "prefill")


class CalibrationError(ValueError):
    """A calibration file that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class Link:
    """One collective call: alpha_us + bytes leaving each GPU / beta_gbps."""

    alpha_us: float
    beta_gbps: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.alpha_us) and self.alpha_us >= 0 and self.beta_gbps > 0):
            raise ValueError(f"a link needs alpha_us >= 0 and beta_gbps > 0, got {self}")

    def terms_us(self, bytes_out: float, calls: int) -> tuple[float, float]:
        """(latency, bandwidth) microseconds of `calls` calls moving `bytes_out` bytes in all."""
        return calls * self.alpha_us, bytes_out / (self.beta_gbps * 1e3)


# shared/ANCHORS.md: NCCL all_to_all_single on H200s, even splits. Latency: the flat part of the table
# (1 KiB - 1 MiB per peer); bandwidth: the 256 MiB row.
ANCHOR_A2A = {2: Link(47.0, 291.0), 4: Link(38.0, 335.0)}
DEFAULT_NOTES = (
    "all-to-all: shared/ANCHORS.md NCCL all_to_all_single (2 GPUs 47 us + bytes / 291 GB/s, 4 GPUs 38 us "
    "+ bytes / 335 GB/s); other GPU counts in a node use the nearest of these",
    "read bandwidth: ANCHORS.md device copy bandwidth 4.24 TB/s; bf16 matmul 790 TFLOP/s; grouped experts "
    "500 TFLOP/s and attention 400 TFLOP/s are assumptions",
    "fixed costs per layer (graph 50 us, eager 300 us, prefill 300 us) and per step are assumptions",
    "between nodes: one 400 Gb/s NIC per GPU assumed (50 GB/s, 60 us a call), 8 GPUs a node",
)


@dataclass(frozen=True)
class Calibration:
    a2a: Mapping[int, Link] = field(default_factory=lambda: dict(ANCHOR_A2A))
    a2a_graph: Mapping[int, Link] = field(default_factory=dict)  # calls replayed from a CUDA graph
    internode: Link = Link(60.0, 50.0)
    gpus_per_node: int = 8
    dense_read_gbps: float = 4240.0
    expert_read_gbps: float = 4240.0
    dense_tflops: float = 790.0
    expert_tflops: float = 500.0
    sdpa_tflops: float = 400.0
    floor_us_per_layer: Mapping[str, float] = field(
        default_factory=lambda: {"graph": 50.0, "eager": 300.0, "prefill": 300.0})
    floor_us_per_step: Mapping[str, float] = field(
        default_factory=lambda: {"graph": 20.0, "eager": 100.0, "prefill": 100.0})
    gpu_memory_gb: float = 141.0
    memory_fraction: float = 0.9
    source: str = "defaults (shared/ANCHORS.md)"
    notes: tuple[str, ...] = DEFAULT_NOTES

    def link(self, world: int, graph: bool = False) -> tuple[Link, str | None]:
        """The intra-node link for an all-to-all over `world` GPUs (launched from a CUDA graph when
        `graph` and measured so), and a note when it is borrowed from another GPU count."""
        table = self.a2a_graph if graph and self.a2a_graph else self.a2a
        if world in table:
            return table[world], None
        known = sorted(table)
        below = [w for w in known if w <= world]
        use = below[-1] if below else known[0]
        return table[use], f"all-to-all over {world} GPUs uses the {use}-GPU calibration"

    def to_json(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        for key in ("a2a", "a2a_graph"):
            doc[key] = {str(w): dataclasses.asdict(link) for w, link in sorted(getattr(self, key).items())}
        doc["notes"] = list(self.notes)
        return {"format": FORMAT, **doc}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Calibration:
        if doc.get("format") != FORMAT:
            raise ValueError(f'"format" is {doc.get("format")!r}, expected {FORMAT!r}')
        body = {k: v for k, v in doc.items() if k != "format"}
        unknown = set(body) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)}")
        for key in ("a2a", "a2a_graph"):
            if key in body:
                body[key] = {int(w): Link(**v) for w, v in body[key].items()}
        if "internode" in body:
            body["internode"] = Link(**body["internode"])
        if "notes" in body:
            body["notes"] = tuple(body["notes"])
        cal = cls(**body)
        if not cal.a2a:
            raise ValueError('"a2a" is empty')
        return cal


def load(path: str | os.PathLike) -> Calibration:
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return Calibration.from_json(doc)
    except OSError as exc:
        raise CalibrationError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (ValueError, TypeError, AttributeError) as exc:
        raise CalibrationError(f"{path}: not a calibration file: {exc}") from None


def save(cal: Calibration, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(cal.to_json(), indent=1) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------
# Fits


def fit_line(points: Iterable[tuple[float, float]]) -> tuple[float, float]:
    """(intercept >= 0, slope > 0) of time = intercept + slope * amount, by relative least squares.

    One point, or points that do not separate the two, give a line through the origin."""
    p = np.asarray(list(points), dtype=np.float64).reshape(-1, 2)
    if len(p) == 0 or (p <= 0).any():
        raise ValueError(f"need positive (amount, time) points, got {p.tolist()}")
    x, t = p[:, 0], p[:, 1]
    if len(p) >= 2 and x.max() > 1.5 * x.min():
        (a, b), *_ = np.linalg.lstsq(np.stack([1 / t, x / t], axis=1), np.ones_like(t), rcond=None)
        if a >= 0 and b > 0:
            return float(a), float(b)
    slope = float(np.sum(x / t) / np.sum((x / t) ** 2))  # relative least squares through the origin
    return 0.0, slope


def fit_link(points: Iterable[tuple[float, float]]) -> Link:
    """A link from (bytes leaving each GPU, us per call) points."""
    alpha, slope = fit_line(points)
    return Link(alpha, 1e-3 / slope)


def fit_rate(points: Iterable[tuple[float, float]]) -> float:
    """Amount per microsecond from (amount, us) points: the slope, fixed costs left to the floors."""
    return 1.0 / fit_line(points)[1]


def fit_net_rate(points: Iterable[tuple[float, float]], base_us: float) -> float | None:
    """Amount per microsecond from (amount, us) points of a call whose cost with nothing to do is
    `base_us` (a cost the floors already hold): the relative least-squares rate through the origin of
    the net times, so the rate at each measured amount is its own (a slope would drop the extra time
    of few slots filling the GPU badly with the intercept). None when no net time is positive."""
    p = np.asarray(list(points), dtype=np.float64).reshape(-1, 2)
    x, t = p[:, 0], p[:, 1] - base_us
    keep = (x > 0) & (t > 0)
    if not keep.any():
        return None
    r = x[keep] / t[keep]  # each point's own rate; the fit minimises sum (r_i / rate - 1)^2
    return float(np.sum(r ** 2) / np.sum(r))


def fit_floor(points: Iterable[tuple[float, float]]) -> tuple[float, float]:
    """(us per layer, us per step) from (layers, us per step) points of a launch-bound toy model."""
    p = np.asarray(list(points), dtype=np.float64).reshape(-1, 2)
    if len(np.unique(p[:, 0])) < 2:
        raise ValueError("the floor fit needs step times at two layer counts at least")
    slope, intercept = np.polyfit(p[:, 0], p[:, 1], 1)
    return float(max(slope, 0.0)), float(max(intercept, 0.0))


def from_samples(raw: Mapping[str, Any], source: str, base: Calibration = Calibration()) -> Calibration:
    """A calibration from `bench ep`'s calibration pass, named `source`; what it did not measure keeps
    `base` (and with nothing measured, so does the source)."""
    notes: list[str] = []
    changes: dict[str, Any] = {}
    measured: list[str] = []
    for key in ("a2a", "a2a_graph"):
        fitted = {int(w): fit_link(points) for w, points in raw.get(key, {}).items() if points}
        changes[key] = {**getattr(base, key), **fitted}
        if fitted:
            measured.append(f"all-to-all{' in CUDA graphs' if key == 'a2a_graph' else ''} over "
                            f"{', '.join(str(w) for w in sorted(fitted))} GPUs")
    scale = {"dense_read": 1e-3, "expert_read": 1e-3, "dense_flops": 1e-6, "expert_flops": 1e-6,
             "sdpa_flops": 1e-6}  # bytes/us -> GB/s; flops/us -> TFLOP/s
    names = {"dense_read": "dense_read_gbps", "expert_read": "expert_read_gbps",
             "dense_flops": "dense_tflops", "expert_flops": "expert_tflops", "sdpa_flops": "sdpa_tflops"}
    for key, name in names.items():
        if raw.get(key):
            rate = None
            if key == "expert_read" and raw.get("expert_read_base_us") is not None:
                rate = fit_net_rate(raw[key], float(raw["expert_read_base_us"]))
            changes[name] = (rate or fit_rate(raw[key])) * scale[key]
            measured.append(name)
    read_mode = raw.get("expert_read_mode") or ("eager, an older calibration pass"
                                                if "expert_read_base_us" not in raw else "graph")
    read_note = (f"expert reads timed {read_mode}: bound by the host's launches where it is slow, "
                 "so expert_read_gbps may be far below the GPU's" if raw.get("expert_read")
                 and read_mode != "graph" else None)
    floors = raw.get("floor", {})
    per_layer, per_step = dict(base.floor_us_per_layer), dict(base.floor_us_per_step)
    for mode in FLOOR_MODES:
        if floors.get(mode):
            per_layer[mode], per_step[mode] = fit_floor(floors[mode])
            measured.append(f"{mode} floor")
    changes.update(floor_us_per_layer=per_layer, floor_us_per_step=per_step)
    if not measured:
        notes.extend(base.notes)
        source = base.source  # nothing was measured: the defaults, as they say
    else:
        notes.append("measured: " + "; ".join(measured) + "; anything else keeps its default")
        if read_note:
            notes.append(read_note)
        if not any(raw.get(key) for key in ("a2a", "a2a_graph")):
            notes.append("no all-to-all was measured: the all-to-all terms keep their defaults")
        notes.extend(n for n in base.notes if n.startswith("between nodes"))
    if raw.get("note"):
        notes.append(str(raw["note"]))
    return dataclasses.replace(base, source=source, notes=tuple(notes), **changes)
