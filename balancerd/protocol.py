"""The shared-memory protocol between inference ranks (moe_runtime) and the balancerd daemon.

Three kinds of segment live as files in the runtime directory (see :func:`runtime_dir`):

* telemetry ring ``<job>.rank<r>.ring``, one per rank: the rank writes, the daemon reads. Lossy: the
  writer never waits and overwrites the oldest slot; the reader counts what it missed.
* control block ``<job>.control``, one per job: the daemon writes plans, the leader rank reads.
* status block ``<job>.rank<r>.status``, one per rank: the rank writes what it applied, the daemon reads.

Blocks are double-buffered rings of two records: a reader takes the newest of the two that validates,
so it never returns half of one plan and half of another. Everything imports numpy only.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import numpy as np

from balancerd.segment import Segment, SegmentError, SegmentInfo, record_dtype

__all__ = [
    "ControlPlan", "ControlReader", "ControlWriter", "Mode", "Policy", "PlanResult", "RejectReason",
    "RingShape", "SegmentError", "StatusReader", "StatusRecord", "StatusWriter", "TelemetryReader",
    "TelemetryRecord", "TelemetryWriter", "control_path", "discover", "new_generation", "read_status",
    "ring_path", "runtime_dir", "status_path",
]

RING_MAGIC = b"BLDRING1"
CONTROL_MAGIC = b"BLDCTRL1"
STATUS_MAGIC = b"BLDSTAT1"
_JOB_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


class Policy(IntEnum):
    PLACEMENT = 0
    TOKEN = 1
    DROP = 2


class Mode(IntEnum):
    AUTOMATIC = 0
    PAUSED = 1


class PlanResult(IntEnum):
    NONE = 0
    APPLIED = 1
    REJECTED = 2
    IN_PROGRESS = 3
    ROLLED_BACK = 4


class RejectReason(IntEnum):
    OK = 0
    GENERATION = 1       # made for another runtime generation
    SHAPE = 2            # layers / experts / slots do not match the model
    MISSING_EXPERT = 3   # a logical expert has no replica
    ID_RANGE = 4         # an expert id out of range
    SLOTS = 5            # slots per rank not respected
    VALUES = 6           # NaN or out-of-range bias / capacity factor
    PEER = 7             # another rank rejected it
    STALE = 8            # version not newer than the one applied


def runtime_dir(create: bool = True) -> Path:
    """$BALANCERD_RUNTIME_DIR, else /run/balancerd when writable, else $XDG_RUNTIME_DIR/balancerd,
    else /tmp/balancerd-<uid>."""
    env = os.environ.get("BALANCERD_RUNTIME_DIR")
    if env:
        path = Path(env)
    elif os.access("/run/balancerd", os.W_OK):
        path = Path("/run/balancerd")
    elif os.environ.get("XDG_RUNTIME_DIR") and os.access(os.environ["XDG_RUNTIME_DIR"], os.W_OK):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "balancerd"
    else:
        path = Path(tempfile.gettempdir()) / f"balancerd-{os.getuid()}"
    if create:
        path.mkdir(mode=0o770, parents=True, exist_ok=True)
    return path


def _check_job(job: str) -> str:
    if not _JOB_RE.fullmatch(job):
        raise ValueError(f"job id {job!r} must be 1-32 characters of letters, digits, '_', '.', '-'")
    return job


def ring_path(directory: Path, job: str, rank: int) -> Path:
    return Path(directory) / f"{_check_job(job)}.rank{rank}.ring"


def status_path(directory: Path, job: str, rank: int) -> Path:
    return Path(directory) / f"{_check_job(job)}.rank{rank}.status"


def control_path(directory: Path, job: str) -> Path:
    return Path(directory) / f"{_check_job(job)}.control"


_NAME_RE = re.compile(
    r"^(?P<job>[A-Za-z0-9_.-]{1,32})\.(?:rank(?P<rank>\d+)\.(?P<kind>ring|status)|(?P<ctl>control))$"
)


def discover(directory: Path) -> list[tuple[str, str, int, Path]]:
    """(kind, job, rank, path) for every segment file in ``directory``; rank is -1 for control blocks."""
    found = []
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    for name in names:
        m = _NAME_RE.fullmatch(name)
        if m is None:
            continue
        if m["ctl"]:
            found.append(("control", m["job"], -1, Path(directory) / name))
        else:
            found.append((m["kind"], m["job"], int(m["rank"]), Path(directory) / name))
    return found


def new_generation() -> int:
    """A fresh non-zero 63-bit generation id for a runtime start."""
    return int.from_bytes(os.urandom(8), "little") >> 1 or 1


# ---------------------------------------------------------------------------------------------------
# Telemetry ring


@dataclass(frozen=True)
class RingShape:
    layers: int
    experts: int
    slots_per_rank: int

    def __post_init__(self):
        for name in ("layers", "experts", "slots_per_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"RingShape.{name} must be >= 1, got {getattr(self, name)}")


def _ring_dtype(shape: RingShape) -> np.dtype:
    L, E, K = shape.layers, shape.experts, shape.slots_per_rank
    return record_dtype([
        ("generation", "<u8"), ("first_step", "<u8"), ("last_step", "<u8"), ("wall_ns", "<u8"),
        ("placement_version", "<u8"), ("tokens", "<u8"), ("rank", "<u4"), ("world", "<u4"),
        ("has_global", "<u4"), ("step_us", "<f4"), ("job", "S32"),
        ("routed", "<i4", (L, E)), ("global_routed", "<i4", (L, E)), ("received", "<i4", (L, K)),
        ("dispatch_us", "<f4", (L,)), ("combine_us", "<f4", (L,)), ("expert_us", "<f4", (L,)),
        ("dropped", "<i8", (L,)), ("bias_changed", "<i8", (L,)),
    ])


@dataclass
class TelemetryRecord:
    """One publish interval of one rank. Per-layer timings are means per step, in microseconds."""

    job: str
    rank: int
    world: int
    generation: int
    seq: int
    first_step: int
    last_step: int
    wall_ns: int
    placement_version: int
    tokens: int
    step_us: float
    routed: np.ndarray                  # [L, E] int32, this rank's router
    global_routed: np.ndarray | None    # [L, E] int32, all-reduced over the EP group
    received: np.ndarray                # [L, slots_per_rank] int32, tokens this rank's slots processed
    dispatch_us: np.ndarray             # [L] float32
    combine_us: np.ndarray
    expert_us: np.ndarray
    dropped: np.ndarray                 # [L] int64, assignments dropped by the capacity policy
    bias_changed: np.ndarray            # [L] int64, assignments the selection bias rerouted


class TelemetryWriter:
    """The rank side of a ring. ``write`` never blocks and never fails because of the reader."""

    def __init__(self, segment: Segment, job: str, rank: int, world: int):
        self._seg = segment
        self._job, self._rank, self._world = job, rank, world
        self.shape = RingShape(segment.info.layers, segment.info.experts, segment.info.slots_per_rank)

    @classmethod
    def create(cls, directory: Path, job: str, rank: int, world: int, generation: int, shape: RingShape,
               capacity: int = 64) -> TelemetryWriter:
        seg = Segment.create(ring_path(directory, job, rank), RING_MAGIC, _ring_dtype(shape), capacity,
                             layers=shape.layers, experts=shape.experts, slots=shape.slots_per_rank * world,
                             slots_per_rank=shape.slots_per_rank, world=world, rank=rank,
                             generation=generation, job=job)
        return cls(seg, job, rank, world)

    @property
    def path(self) -> Path:
        return self._seg.path

    @property
    def written(self) -> int:
        return self._seg.head

    def write(self, *, first_step: int, last_step: int, tokens: int, placement_version: int,
              routed: np.ndarray, received: np.ndarray, dispatch_us: np.ndarray, combine_us: np.ndarray,
              expert_us: np.ndarray, step_us: float, global_routed: np.ndarray | None = None,
              dropped: np.ndarray | None = None, bias_changed: np.ndarray | None = None,
              wall_ns: int | None = None) -> int:
        """Append one record, overwriting the oldest; returns its sequence number."""

        def fill(r):
            r["generation"] = self._seg.info.generation
            r["first_step"], r["last_step"] = first_step, last_step
            r["wall_ns"] = time.time_ns() if wall_ns is None else wall_ns
            r["placement_version"], r["tokens"] = placement_version, tokens
            r["rank"], r["world"], r["job"] = self._rank, self._world, self._job.encode()
            r["step_us"] = step_us
            r["routed"] = routed
            r["received"] = received
            r["dispatch_us"], r["combine_us"], r["expert_us"] = dispatch_us, combine_us, expert_us
            if global_routed is not None:
                r["has_global"] = 1
                r["global_routed"] = global_routed
            if dropped is not None:
                r["dropped"] = dropped
            if bias_changed is not None:
                r["bias_changed"] = bias_changed

        return self._seg.write(fill)

    def close(self) -> None:
        self._seg.close()


@dataclass
class ReadStats:
    accepted: int = 0
    dropped: int = 0     # overwritten before they could be read
    invalid: int = 0     # failed validation although not overwritten


class TelemetryReader:
    """The daemon side of a ring: returns every record that validates, counts the rest."""

    def __init__(self, segment: Segment, start_at_oldest: bool = True):
        self._seg = segment
        info = segment.info
        self.shape = RingShape(info.layers, info.experts, info.slots_per_rank)
        self.stats = ReadStats()
        head = segment.head
        self._next = max(0, head - info.capacity) if start_at_oldest else head

    @classmethod
    def open(cls, path: Path, start_at_oldest: bool = True) -> TelemetryReader:
        def make(info: SegmentInfo) -> np.dtype:
            return _ring_dtype(RingShape(info.layers, info.experts, info.slots_per_rank))

        return cls(Segment.open(path, RING_MAGIC, make), start_at_oldest)

    @property
    def info(self) -> SegmentInfo:
        return self._seg.info

    @property
    def path(self) -> Path:
        return self._seg.path

    def replaced(self) -> bool:
        """The writer restarted (new file) or went away: reopen to follow the new generation."""
        return self._seg.replaced()

    def poll(self, max_records: int | None = None) -> list[TelemetryRecord]:
        """Every validated record written since the last poll, oldest first."""
        cap = self._seg.info.capacity
        head = self._seg.head
        if head < self._next:  # impossible for a well-behaved writer: treat as a corrupt head
            self.stats.invalid += 1
            self._next = head
            return []
        if head - self._next > cap:
            self.stats.dropped += head - cap - self._next
            self._next = head - cap
        out = []
        while self._next < head and (max_records is None or len(out) < max_records):
            seq = self._next
            rec = None
            for _ in range(3):
                rec = self._seg.read(seq, seq % cap)
                if rec is not None or self._seg.started - seq > cap:
                    break
            self._next += 1
            if rec is not None:
                out.append(self._decode(rec[0], seq))
                self.stats.accepted += 1
            elif self._seg.started - seq > cap:  # the writer has begun overwriting it
                self.stats.dropped += 1
            else:
                self.stats.invalid += 1
        return out

    def _decode(self, r: np.void, seq: int) -> TelemetryRecord:
        return TelemetryRecord(
            job=bytes(r["job"]).rstrip(b"\0").decode(errors="replace"), rank=int(r["rank"]),
            world=int(r["world"]), generation=int(r["generation"]), seq=seq,
            first_step=int(r["first_step"]), last_step=int(r["last_step"]), wall_ns=int(r["wall_ns"]),
            placement_version=int(r["placement_version"]), tokens=int(r["tokens"]),
            step_us=float(r["step_us"]), routed=r["routed"],
            global_routed=r["global_routed"] if int(r["has_global"]) else None,
            received=r["received"], dispatch_us=r["dispatch_us"], combine_us=r["combine_us"],
            expert_us=r["expert_us"], dropped=r["dropped"], bias_changed=r["bias_changed"],
        )

    def close(self) -> None:
        self._seg.close()


# ---------------------------------------------------------------------------------------------------
# Double-buffered blocks


def _read_latest(seg: Segment) -> tuple[np.ndarray | None, int]:
    """Newest validating record of a two-record block, and how many copies failed validation.

    A copy that fails while the writer rewrites it is expected and not counted; one that fails in a pass
    during which no write began is corrupt and counted. A pass that found only a copy older than the
    newest complete one was lapped (the writer rewrote the copy read first, then began on the other);
    returning it would let versions go backwards, so the pass is retried.
    """
    for _ in range(4):
        head = seg.head
        if head == 0:
            return None, 0
        best, failed = None, 0
        for i in range(seg.info.capacity):
            rec = seg.read(None, i)
            if rec is None:
                failed += i < head  # a slot never written is not a failure
            elif best is None or int(rec["seq"][0]) > int(best["seq"][0]):
                best = rec
        quiet = seg.started == head
        if best is not None and (quiet or int(best["seq"][0]) + 1 >= head):
            return best, failed if quiet else 0
    return None, 1


def _control_dtype(layers: int, experts: int, slots: int) -> np.dtype:
    return record_dtype([
        ("version", "<u8"), ("generation", "<u8"), ("created_ns", "<u8"), ("policy", "<u4"),
        ("mode", "<u4"), ("max_reroute_fraction", "<f4"), ("capacity_factor", "<f4"),
        ("phys_to_log", "<i4", (layers, slots)), ("selection_bias", "<f4", (layers, experts)),
    ])


@dataclass
class ControlPlan:
    """What the daemon asks the runtime to serve with. ``capacity_factor`` 0 means no drop policy."""

    version: int
    generation: int
    phys_to_log: np.ndarray                     # [L, S] int32
    policy: Policy = Policy.PLACEMENT
    mode: Mode = Mode.AUTOMATIC
    selection_bias: np.ndarray | None = None    # [L, E] float32; zeros when None
    max_reroute_fraction: float = 0.02
    capacity_factor: float = 0.0
    created_ns: int = field(default_factory=time.time_ns)


def _block_shape(info: SegmentInfo) -> tuple[int, int, int]:
    return info.layers, info.experts, info.slots


class ControlWriter:
    """The daemon side of a job's control block."""

    def __init__(self, segment: Segment):
        self._seg = segment
        self.layers, self.experts, self.slots = _block_shape(segment.info)

    @classmethod
    def create(cls, directory: Path, job: str, layers: int, experts: int, slots: int, world: int,
               generation: int = 0) -> ControlWriter:
        seg = Segment.create(control_path(directory, job), CONTROL_MAGIC,
                             _control_dtype(layers, experts, slots), 2, layers=layers, experts=experts,
                             slots=slots, slots_per_rank=slots // max(world, 1), world=world, rank=-1,
                             generation=generation, job=job)
        return cls(seg)

    @classmethod
    def open(cls, path: Path) -> ControlWriter:
        """Reattach to an existing block (a restarted daemon keeps the file the leader has mapped)."""
        return cls(Segment.open(path, CONTROL_MAGIC, lambda i: _control_dtype(*_block_shape(i)),
                                writable=True))

    @property
    def path(self) -> Path:
        return self._seg.path

    def publish(self, plan: ControlPlan) -> None:
        p2l = np.asarray(plan.phys_to_log)
        if p2l.shape != (self.layers, self.slots):
            raise ValueError(f"phys_to_log shape {p2l.shape} does not match the block "
                             f"({self.layers}, {self.slots})")
        bias = plan.selection_bias
        if bias is not None and np.asarray(bias).shape != (self.layers, self.experts):
            raise ValueError(f"selection_bias shape {np.asarray(bias).shape} does not match "
                             f"({self.layers}, {self.experts})")

        def fill(r):
            r["version"], r["generation"], r["created_ns"] = plan.version, plan.generation, plan.created_ns
            r["policy"], r["mode"] = int(plan.policy), int(plan.mode)
            r["max_reroute_fraction"], r["capacity_factor"] = plan.max_reroute_fraction, plan.capacity_factor
            r["phys_to_log"] = p2l
            if bias is not None:
                r["selection_bias"] = bias

        self._seg.write(fill)

    def close(self) -> None:
        self._seg.close()


class ControlReader:
    """The leader rank's side: a non-blocking read of the newest valid plan."""

    def __init__(self, segment: Segment):
        self._seg = segment
        self.invalid = 0
        self._seen_head = -1
        self._cached: ControlPlan | None = None

    @classmethod
    def open(cls, path: Path, layers: int, experts: int, slots: int) -> ControlReader:
        def make(info: SegmentInfo) -> np.dtype:
            if _block_shape(info) != (layers, experts, slots):
                raise SegmentError(path, f"shape (layers, experts, slots) {_block_shape(info)} does not "
                                         f"match the model's {(layers, experts, slots)}")
            return _control_dtype(layers, experts, slots)

        return cls(Segment.open(path, CONTROL_MAGIC, make))

    @property
    def path(self) -> Path:
        return self._seg.path

    def replaced(self) -> bool:
        return self._seg.replaced()

    def read(self) -> ControlPlan | None:
        """The newest plan that validates; None when there is none (or both copies are being rewritten).

        Cheap when nothing changed: the plan is only copied and checked again once the head moved.
        """
        head = self._seg.head
        if head == self._seen_head:
            return self._cached
        rec, failed = _read_latest(self._seg)
        self.invalid += failed
        if rec is None:
            return None
        r = rec[0]
        try:
            policy, mode = Policy(int(r["policy"])), Mode(int(r["mode"]))
        except ValueError:
            self.invalid += 1
            self._seen_head, self._cached = head, None
            return None
        self._seen_head = head
        self._cached = ControlPlan(
            version=int(r["version"]), generation=int(r["generation"]), phys_to_log=r["phys_to_log"],
            policy=policy, mode=mode, selection_bias=r["selection_bias"],
            max_reroute_fraction=float(r["max_reroute_fraction"]),
            capacity_factor=float(r["capacity_factor"]), created_ns=int(r["created_ns"]),
        )
        return self._cached

    def close(self) -> None:
        self._seg.close()


_STATUS_DTYPE_FIELDS = [
    ("generation", "<u8"), ("applied_version", "<u8"), ("applied_step", "<u8"), ("pending_version", "<u8"),
    ("heartbeat_ns", "<u8"), ("step", "<u8"), ("migration_bytes", "<u8"), ("migration_seconds", "<f8"),
    ("result", "<u4"), ("reason", "<u4"), ("rank", "<u4"), ("world", "<u4"),
    ("result_version", "<u8"), ("detail", "S96"),
]


def _status_dtype(layers: int, slots: int) -> np.dtype:
    return record_dtype(_STATUS_DTYPE_FIELDS + [("phys_to_log", "<i4", (layers, slots))])


@dataclass
class StatusRecord:
    """What a rank last did with a plan, plus a heartbeat. ``result_version`` is the plan ``result``
    refers to (applied or rejected); ``applied_version`` and ``phys_to_log`` are the placement the rank
    serves with now."""

    generation: int
    rank: int
    world: int
    phys_to_log: np.ndarray | None = None
    applied_version: int = 0
    applied_step: int = 0
    pending_version: int = 0
    step: int = 0
    result: PlanResult = PlanResult.NONE
    result_version: int = 0
    reason: RejectReason = RejectReason.OK
    detail: str = ""
    migration_bytes: int = 0
    migration_seconds: float = 0.0
    heartbeat_ns: int = 0


class StatusWriter:
    def __init__(self, segment: Segment):
        self._seg = segment

    @classmethod
    def create(cls, directory: Path, job: str, rank: int, world: int, generation: int, layers: int,
               experts: int, slots: int) -> StatusWriter:
        seg = Segment.create(status_path(directory, job, rank), STATUS_MAGIC, _status_dtype(layers, slots), 2,
                             layers=layers, experts=experts, slots=slots, slots_per_rank=slots // world,
                             world=world, rank=rank, generation=generation, job=job)
        return cls(seg)

    @property
    def path(self) -> Path:
        return self._seg.path

    def write(self, status: StatusRecord) -> None:
        def fill(r):
            for name in ("generation", "rank", "world", "applied_version", "applied_step", "pending_version",
                         "step", "result", "result_version", "reason", "migration_bytes"):
                r[name] = int(getattr(status, name))
            r["migration_seconds"] = status.migration_seconds
            r["heartbeat_ns"] = status.heartbeat_ns or time.time_ns()
            r["detail"] = status.detail.encode()[:96]
            if status.phys_to_log is not None:
                r["phys_to_log"] = status.phys_to_log

        self._seg.write(fill)

    def close(self) -> None:
        self._seg.close()


class StatusReader:
    def __init__(self, segment: Segment):
        self._seg = segment
        self.invalid = 0

    @classmethod
    def open(cls, path: Path) -> StatusReader:
        return cls(Segment.open(path, STATUS_MAGIC, lambda i: _status_dtype(i.layers, i.slots)))

    @property
    def info(self) -> SegmentInfo:
        return self._seg.info

    def replaced(self) -> bool:
        return self._seg.replaced()

    def read(self) -> StatusRecord | None:
        rec, failed = _read_latest(self._seg)
        self.invalid += failed
        if rec is None:
            return None
        r = rec[0]
        try:
            result, reason = PlanResult(int(r["result"])), RejectReason(int(r["reason"]))
        except ValueError:
            self.invalid += 1
            return None
        return StatusRecord(
            generation=int(r["generation"]), rank=int(r["rank"]), world=int(r["world"]),
            applied_version=int(r["applied_version"]), applied_step=int(r["applied_step"]),
            pending_version=int(r["pending_version"]), step=int(r["step"]), result=result,
            result_version=int(r["result_version"]), reason=reason,
            detail=bytes(r["detail"]).rstrip(b"\0").decode(errors="replace"),
            migration_bytes=int(r["migration_bytes"]), migration_seconds=float(r["migration_seconds"]),
            heartbeat_ns=int(r["heartbeat_ns"]), phys_to_log=r["phys_to_log"],
        )

    def close(self) -> None:
        self._seg.close()


def read_status(path: Path) -> StatusRecord | None:
    """The status block at ``path`` read once; None while it does not open or holds no valid record."""
    try:
        reader = StatusReader.open(path)
    except SegmentError:
        return None
    try:
        return reader.read()
    finally:
        reader.close()
