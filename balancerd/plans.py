"""Plan records and proposals, and the pure checks made on a plan before and after it is published."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from balancerd.ingest import JobFeed
from balancerd.placement import PlacementError, Topology, validate_placement
from balancerd.protocol import PlanResult, StatusRecord
from balancerd.state import JobState

PLAN_STATES_FINAL = ("applied", "rejected", "superseded")
DIFF_LIMIT = 256          # placement diff entries in a plan answer; the rest are counted
RETRY_BACKOFF_MAX_S = 300.0  # longest wait before an automatic plan after failed ones


@dataclass
class PlanRecord:
    """A published plan and what the ranks said about it."""

    version: int
    generation: int
    policy: str
    source: str                  # "auto" or "api uid=N"
    published_s: float
    reason: str
    summary: dict
    state: str = "pending"       # pending | applied | rejected | unacknowledged | superseded
    acks: dict[int, str] = field(default_factory=dict)
    rejection: dict | None = None
    realised: dict | None = None  # {"mean", "worst"} over the first full window served at this version

    def to_dict(self, now: float) -> dict:
        return {"version": self.version, "generation": f"{self.generation:x}", "policy": self.policy,
                "source": self.source, "published": self.published_s,
                "age_s": round(max(0.0, now - self.published_s), 3), "reason": self.reason,
                "state": self.state, "acks": {str(r): a for r, a in sorted(self.acks.items())},
                "rejection": self.rejection, "realised_balancedness": self.realised, **self.summary}


@dataclass
class Realising:
    """An applied plan waiting for a sliding window made only of intervals served at its version:
    those that start at or after ``start_step``, a step the ranks had reached once serving it."""

    plan: PlanRecord
    start_step: int
    intervals: int = 0


@dataclass
class Proposal:
    """A plan made from the current window, not yet published."""

    job: str
    generation: int
    policy: str
    phys_to_log: np.ndarray
    push: bool
    reason: str
    summary: dict
    selection_bias: np.ndarray | None = None
    capacity_factor: float = 0.0


@dataclass(frozen=True)
class AckOutcome:
    """Where a published plan stands once the ranks' status blocks decide it."""

    state: str           # applied | rejected | superseded | unacknowledged
    why: str
    start_step: int = 0  # applied: a step every rank had reached while serving it


def read_acks(plan: PlanRecord, statuses: dict[int, StatusRecord], now: float,
              ack_timeout_s: float) -> AckOutcome | None:
    """Record each rank's answer to ``plan`` in ``plan.acks`` (and the first rejection), and return the
    outcome once there is one: a rank serving a newer version supersedes it, any rejection or
    rollback rejects it, every rank applying it applies it, and a plan still pending after
    ``ack_timeout_s`` is unacknowledged (it may still be applied later)."""
    for rank, st in statuses.items():
        if st.applied_version > plan.version:
            return AckOutcome("superseded", f"rank {rank} serves version {st.applied_version}")
        if st.applied_version == plan.version:
            plan.acks[rank] = "applied"
        elif st.result_version == plan.version and st.result is not PlanResult.NONE:
            plan.acks[rank] = st.result.name.lower()
            if st.result in (PlanResult.REJECTED, PlanResult.ROLLED_BACK) and plan.rejection is None:
                plan.rejection = {"rank": rank, "result": st.result.name.lower(),
                                  "reason": st.reason.name.lower(), "detail": st.detail}
        elif st.pending_version == plan.version:
            plan.acks[rank] = "pending"
    if plan.rejection is not None:
        r = plan.rejection
        return AckOutcome("rejected", f"rank {r['rank']} {r['result']}: {r['reason']} {r['detail']}")
    if statuses and all(plan.acks.get(r) == "applied" for r in statuses):
        return AckOutcome("applied", f"applied by ranks {sorted(statuses)}",
                          max(st.step for st in statuses.values()))
    if plan.state == "pending" and now - plan.published_s > ack_timeout_s:
        return AckOutcome("unacknowledged", f"no outcome in {ack_timeout_s:g} s")
    return None


def retry_wait_s(failures: int, ack_timeout_s: float) -> float:
    """Seconds before the next automatic plan after ``failures`` rejected or unacknowledged plans in
    a row: ack_timeout_s, doubling with each further failure, at most RETRY_BACKOFF_MAX_S."""
    if failures < 1:
        return 0.0
    return min(RETRY_BACKOFF_MAX_S, ack_timeout_s * 2.0 ** min(failures - 1, 30))


def unresolved_plan(saved: JobState) -> PlanRecord | None:
    """The last plan of a previous daemon run that was never resolved, so that a restarted daemon
    follows it to an outcome instead of showing it pending forever."""
    if not saved.history or saved.history[-1].get("state") in PLAN_STATES_FINAL:
        return None
    e = saved.history[-1]
    return PlanRecord(int(e["version"]), int(e["generation"], 16), e["policy"], e["source"],
                      float(e["published"]), e["reason"], {}, state=e["state"])


def check_plan(proposal: Proposal, feed: JobFeed) -> None:
    """The daemon's half of "plans are validated twice": raise PlacementError before writing."""
    validate_placement(proposal.phys_to_log, feed.shape.experts, Topology(gpus=feed.world, slots=feed.slots),
                       feed.shape.layers)
    bias = proposal.selection_bias
    if bias is not None and (not np.isfinite(bias).all() or bias.max(initial=0.0) > 0):
        raise PlacementError("selection bias must be finite and <= 0")
    if proposal.capacity_factor != 0.0 and not proposal.capacity_factor > 1.0:
        raise PlacementError(f"capacity factor {proposal.capacity_factor} must be 0 (off) or > 1")


def placement_diff(old: np.ndarray, new: np.ndarray, topo: Topology) -> tuple[list[dict], int]:
    """The first DIFF_LIMIT slots whose expert changes from ``old`` to ``new`` [L, S] (by layer, then
    slot) as ``{"layer", "slot", "gpu", "from", "to"}``, and how many more there are."""
    changed = np.argwhere(old != new)
    diff = [{"layer": int(layer), "slot": int(slot), "gpu": int(topo.gpu_of_slot[slot]),
             "from": int(old[layer, slot]), "to": int(new[layer, slot])}
            for layer, slot in changed[:DIFF_LIMIT]]
    return diff, len(changed) - len(diff)
