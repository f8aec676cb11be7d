"""balancerd.policy: migration cost, predicted gain, the push decision, the token bias control law."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from balancerd.config import PolicyConfig
from balancerd.policy import (
    capacity_factor_for,
    control_policy,
    decide_push,
    migration_cost_s,
    moe_share,
    predicted_gain_s,
    token_bias,
)
from balancerd.protocol import Mode, Policy

EXPERT = 3 * 7168 * 2048 * 2


def test_migration_cost():
    assert migration_cost_s(0, EXPERT, 40.0) == 0.0
    assert migration_cost_s(10, EXPERT, 40.0) == pytest.approx(10 * EXPERT / 40e9)
    with pytest.raises(ValueError):
        migration_cost_s(1, EXPERT, 0.0)
    with pytest.raises(ValueError):
        migration_cost_s(-1, EXPERT, 40.0)


def test_predicted_gain():
    before, after = np.array([2.0, 4.0]), np.array([1.0, 1.0])
    # MoE half of a step; layers save 1/2 and 3/4 of their time: 5/8 of the MoE part
    assert predicted_gain_s(before, after, 1000.0, 0.5, 100.0) == pytest.approx(0.5 * 0.625 * 100)
    assert predicted_gain_s(before, before, 1000.0, 0.5, 100.0) == 0.0
    assert predicted_gain_s(after, before, 1000.0, 0.5, 100.0) < 0
    assert predicted_gain_s(before, after, 0.0, 0.5, 100.0) == 0.0
    with pytest.raises(ValueError, match="must be one"):
        predicted_gain_s(before, after[:1], 1000.0, 0.5, 100.0)
    with pytest.raises(ValueError, match="finite"):
        predicted_gain_s(np.array([np.nan, 1.0]), after, 1000.0, 0.5, 100.0)
    with pytest.raises(ValueError, match="moe_share"):
        predicted_gain_s(before, after, 1000.0, 1.5, 100.0)


def test_moe_share():
    d = np.full((2, 3), 10.0)
    e = np.full((2, 3), 20.0)
    # 120 us of MoE per step on each rank
    assert moe_share(d, d, e, np.array([200.0, 400.0])) == pytest.approx((0.6 + 0.3) / 2)
    assert moe_share(d, d, e, np.array([0.0, 240.0])) == pytest.approx(0.5)   # an idle rank is left out
    assert moe_share(d, d, e, np.array([100.0, 100.0])) == 1.0                # clipped
    assert moe_share(d, d, e, np.zeros(2)) == 0.0


def test_decide_push():
    cfg = PolicyConfig(gain_horizon_s=600.0, migration_bandwidth_gbps=40.0)
    before, after = np.full(58, 2.0), np.full(58, 1.05)
    yes = decide_push(before, after, 500, 30_000.0, 0.6, cfg)
    assert yes.push and yes.predicted_gain_s > yes.migration_cost_s > 0
    assert "beats migration" in yes.reason
    # a tiny improvement does not pay for moving every expert
    no = decide_push(before, np.full(58, 1.999), 58 * 288, 30_000.0, 0.6, cfg)
    assert not no.push and "does not beat" in no.reason
    assert not decide_push(before, after, 0, 30_000.0, 0.6, cfg).push
    paused = decide_push(before, after, 500, 30_000.0, 0.6, PolicyConfig(mode="paused"))
    assert not paused.push and paused.reason == "mode is paused"


def test_capacity_factor_and_protocol_values():
    assert capacity_factor_for(PolicyConfig(kind="drop", capacity_factor=1.5)) == 1.5
    assert capacity_factor_for(PolicyConfig(kind="placement")) == 0.0
    assert control_policy(PolicyConfig(kind="token", mode="paused")) == (Policy.TOKEN, Mode.PAUSED)
    assert control_policy(PolicyConfig()) == (Policy.PLACEMENT, Mode.AUTOMATIC)


def test_token_bias_first_step():
    loads = np.array([[600.0, 300.0, 100.0, 100.0, 100.0, 100.0]])
    b = token_bias(loads, np.zeros_like(loads), None, 0.02, step=0.002, limit=0.05)
    assert b.dtype == np.float32
    assert b[0, 0] == pytest.approx(-0.002)               # the hottest moves a full step
    assert -0.002 < b[0, 1] < 0                           # a lesser hot expert less
    assert (b[0, 2:] == 0).all()                          # experts below the mean stay at zero


def test_token_bias_backs_off_over_the_maximum():
    loads = np.array([[600.0, 100.0, 100.0, 100.0]])
    current = np.array([[-0.04, 0.0, 0.0, 0.0]])
    b = token_bias(loads, current, np.array([0.08]), 0.02)
    assert b[0, 0] == pytest.approx(-0.01)


def test_token_bias_relaxes_when_cool():
    loads = np.array([[50.0, 100.0, 100.0, 150.0]])
    current = np.array([[-0.01, 0.0, 0.0, 0.0]])
    b = token_bias(loads, current, np.array([0.005]), 0.02, step=0.002)
    assert -0.01 < b[0, 0] < 0 and b[0, 3] < 0


@pytest.mark.parametrize("sensitivity", [1.0, 4.0, 60.0, 600.0])
def test_token_bias_closed_loop_stays_under_the_maximum(sensitivity):
    """A toy router: an expert biased by b loses min(1, -b * sensitivity) of its assignments, spread
    evenly over all experts. Whatever the sensitivity, the loop settles at or below the maximum."""
    unbiased = np.full(16, 100.0)
    unbiased[:2] = (600.0, 300.0)
    bias, measured, history = np.zeros((1, 16)), None, []
    for _ in range(200):
        moved = unbiased * np.clip(-bias[0] * sensitivity, 0.0, 1.0)
        loads = unbiased - moved + moved.sum() / 16
        share = moved.sum() / unbiased.sum()
        history.append(share)
        bias = token_bias(loads[None], bias, None if measured is None else np.array([measured]), 0.02)
        measured = share
        assert (bias <= 0).all() and (bias >= -0.05).all()
    assert max(history[50:]) <= 0.02 * 1.001
    assert history[-1] >= 0.019 or bias.min() == np.float32(-0.05)   # uses the budget, or the limit
    assert loads.max() < unbiased.max()


@settings(max_examples=80, deadline=None)
@given(
    arrays(np.float64, (3, 5), elements=st.floats(0, 1e7)),
    arrays(np.float64, (3, 5), elements=st.floats(-1.0, 1.0)),
    st.none() | arrays(np.float64, (3,), elements=st.floats(0, 1.0)),
    st.floats(1e-4, 0.5),
)
def test_token_bias_is_always_finite_and_bounded(loads, current, measured, max_fraction):
    b = token_bias(loads, current, measured, max_fraction, step=0.01, limit=0.1)
    assert b.shape == loads.shape and np.isfinite(b).all()
    assert (b <= 0).all() and (b >= np.float32(-0.1)).all()


def test_token_bias_rejects_bad_input():
    loads = np.ones((2, 4))
    with pytest.raises(ValueError, match="both be"):
        token_bias(loads, np.zeros((2, 3)), None, 0.02)
    with pytest.raises(ValueError, match="non-negative"):
        token_bias(-loads, np.zeros((2, 4)), None, 0.02)
    with pytest.raises(ValueError, match="finite"):
        token_bias(loads, np.full((2, 4), np.nan), None, 0.02)
    with pytest.raises(ValueError, match="measured"):
        token_bias(loads, np.zeros((2, 4)), np.array([0.1, np.nan]), 0.02)
    with pytest.raises(ValueError, match="max_reroute_fraction"):
        token_bias(loads, np.zeros((2, 4)), None, 0.0)
