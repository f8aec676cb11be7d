"""balancerd.plans.read_acks: a published plan's outcome from the ranks' status blocks."""

from __future__ import annotations

import pytest

from balancerd.plans import RETRY_BACKOFF_MAX_S, PlanRecord, read_acks, retry_wait_s
from balancerd.protocol import PlanResult, RejectReason, StatusRecord

TIMEOUT_S = 30.0


def plan(version: int = 5, state: str = "pending") -> PlanRecord:
    return PlanRecord(version, 0xABC, "placement", "auto", published_s=100.0, reason="test", summary={},
                      state=state)


def status(rank: int, **fields) -> StatusRecord:
    return StatusRecord(generation=0xABC, rank=rank, world=2, **fields)


def test_applied_once_every_rank_serves_it() -> None:
    p = plan()
    assert read_acks(p, {0: status(0, applied_version=5, step=40), 1: status(1, pending_version=5, step=41)},
                     101.0, TIMEOUT_S) is None
    assert p.acks == {0: "applied", 1: "pending"}
    serving = {0: status(0, applied_version=5, step=48), 1: status(1, applied_version=5, step=50)}
    outcome = read_acks(p, serving, 102.0, TIMEOUT_S)
    assert outcome is not None and outcome.state == "applied" and outcome.start_step == 50


def test_one_rejection_rejects_with_its_reason() -> None:
    p = plan()
    statuses = {0: status(0, result=PlanResult.REJECTED, result_version=5, reason=RejectReason.PEER,
                          detail="another rank rejected the plan"),
                1: status(1, result=PlanResult.REJECTED, result_version=5, reason=RejectReason.MISSING_EXPERT,
                          detail="expert 3 has no replica")}
    outcome = read_acks(p, statuses, 101.0, TIMEOUT_S)
    assert outcome is not None and outcome.state == "rejected"
    assert p.rejection == {"rank": 0, "result": "rejected", "reason": "peer",
                           "detail": "another rank rejected the plan"}
    assert p.acks == {0: "rejected", 1: "rejected"}


def test_a_rank_serving_a_newer_version_supersedes_it() -> None:
    outcome = read_acks(plan(), {0: status(0, applied_version=6)}, 101.0, TIMEOUT_S)
    assert outcome is not None and outcome.state == "superseded" and "version 6" in outcome.why


@pytest.mark.parametrize("now, state, expected", [(129.0, "pending", None),
                                                  (131.0, "pending", "unacknowledged"),
                                                  (131.0, "unacknowledged", None)])
def test_silence_turns_unacknowledged_once(now: float, state: str, expected: str | None) -> None:
    outcome = read_acks(plan(state=state), {0: status(0), 1: status(1)}, now, TIMEOUT_S)
    assert (outcome.state if outcome else None) == expected


def test_no_status_blocks_yet_is_not_an_outcome() -> None:
    assert read_acks(plan(), {}, 101.0, TIMEOUT_S) is None


def test_retry_wait_doubles_from_the_ack_timeout_and_is_capped() -> None:
    assert retry_wait_s(0, 30.0) == 0.0
    assert [retry_wait_s(n, 30.0) for n in (1, 2, 3, 4)] == [30.0, 60.0, 120.0, 240.0]
    assert retry_wait_s(5, 30.0) == retry_wait_s(500, 30.0) == RETRY_BACKOFF_MAX_S
