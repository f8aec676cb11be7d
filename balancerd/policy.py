"""What to do about an imbalance: whether a placement is worth pushing, the token-policy bias, the drop
policy's capacity factor. Pure functions, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from balancerd.config import PolicyConfig
from balancerd.protocol import Mode, Policy

__all__ = [
    "PushDecision", "capacity_factor_for", "control_policy", "decide_push", "migration_cost_s",
    "moe_share", "predicted_gain_s", "token_bias",
]


def migration_cost_s(moves_total: int, expert_bytes: int, bandwidth_gbps: float) -> float:
    """Seconds to copy ``moves_total`` experts' weights at ``bandwidth_gbps`` GB/s (10^9 bytes/s), all
    moves together; counted as serving time lost, which overstates it when copies overlap serving."""
    if moves_total < 0 or expert_bytes < 1 or not bandwidth_gbps > 0:
        raise ValueError(f"need moves >= 0, expert_bytes >= 1, bandwidth > 0; got {moves_total}, "
                         f"{expert_bytes}, {bandwidth_gbps}")
    return moves_total * expert_bytes / (bandwidth_gbps * 1e9)


def moe_share(dispatch_us: np.ndarray, combine_us: np.ndarray, expert_us: np.ndarray,
              step_us: np.ndarray) -> float:
    """Share of the step spent in the MoE layers (dispatch, experts, combine), mean over ranks whose
    step time is positive, in [0, 1]; 0 when no rank stepped."""
    moe = (np.asarray(dispatch_us, np.float64) + np.asarray(combine_us, np.float64)
           + np.asarray(expert_us, np.float64)).sum(axis=-1)
    step = np.asarray(step_us, np.float64)
    stepped = np.isfinite(step) & (step > 0) & np.isfinite(moe)
    if not stepped.any():
        return 0.0
    return float(np.clip(moe[stepped] / step[stepped], 0.0, 1.0).mean())


def predicted_gain_s(balancedness_before: np.ndarray, balancedness_after: np.ndarray, step_us: float,
                     moe_share: float, horizon_s: float) -> float:
    """Serving seconds a new placement saves over ``horizon_s`` of wall time at the current speed.

    Each MoE layer takes as long as its busiest GPU, so its time scales with its balancedness (max
    GPU load over mean); the MoE layers together take ``moe_share`` of a ``step_us`` step, split
    evenly over the layers. Time saved per step = step x share x mean over layers of
    (1 - after / before); steps in the horizon = horizon / step. Negative when the placement is
    worse; 0 when nothing is stepping (``step_us`` 0).
    """
    before = np.asarray(balancedness_before, np.float64)
    after = np.asarray(balancedness_after, np.float64)
    if before.shape != after.shape or before.ndim != 1 or before.size == 0:
        raise ValueError(f"balancedness before {before.shape} and after {after.shape} must be one [L]")
    if not (np.isfinite(before).all() and np.isfinite(after).all() and (before > 0).all()
            and (after > 0).all()):
        raise ValueError("balancedness must be finite and positive")
    if not 0.0 <= moe_share <= 1.0 or not step_us >= 0.0 or not horizon_s >= 0.0:
        raise ValueError(f"need 0 <= moe_share <= 1, step_us >= 0, horizon_s >= 0; got {moe_share}, "
                         f"{step_us}, {horizon_s}")
    if step_us == 0.0:
        return 0.0
    saved_us_per_step = step_us * moe_share * float(np.mean(1.0 - after / before))
    steps = horizon_s * 1e6 / step_us
    return saved_us_per_step * steps * 1e-6


@dataclass(frozen=True)
class PushDecision:
    push: bool
    predicted_gain_s: float
    migration_cost_s: float
    reason: str


def decide_push(balancedness_before: np.ndarray, balancedness_after: np.ndarray, moves_total: int,
                step_us: float, moe_share: float, cfg: PolicyConfig) -> PushDecision:
    """Push a placement only when the serving time it saves over ``cfg.gain_horizon_s`` beats the
    time its migration costs, and only in automatic mode."""
    gain = predicted_gain_s(balancedness_before, balancedness_after, step_us, moe_share, cfg.gain_horizon_s)
    cost = migration_cost_s(moves_total, cfg.expert_bytes, cfg.migration_bandwidth_gbps)
    versus = f"gain {gain:.3g} s over {cfg.gain_horizon_s:g} s"
    if cfg.mode == "paused":
        push, reason = False, "mode is paused"
    elif moves_total == 0:
        push, reason = False, "the plan moves no expert"
    elif gain <= cost:
        push, reason = False, f"{versus} does not beat migration {cost:.3g} s"
    else:
        push, reason = True, f"{versus} beats migration {cost:.3g} s"
    return PushDecision(push=push, predicted_gain_s=gain, migration_cost_s=cost, reason=reason)


def token_bias(loads: np.ndarray, current_bias: np.ndarray, measured_reroute_fraction: np.ndarray | None,
               max_reroute_fraction: float, step: float = 0.002, limit: float = 0.05) -> np.ndarray:
    """[L, E] float32 selection bias for the token policy, added to the router's scores before top-k
    (the weights keep the unbiased scores). Always finite and within [-limit, 0].

    ``loads`` and ``measured_reroute_fraction`` (bias_changed / assignments, per layer) must have been
    measured while ``current_bias`` was in force; None means nothing was measured yet.

    Control law, per layer. Let r_e = load_e / mean - 1 and x_e = r_e / max(1, max_e r_e), in
    [-1, 1]; let m be the measured rerouted share, M the maximum, and a = max_e(-b_e) the bias
    amplitude.

    * m > M: b <- b * M / m. For small biases the rerouted share grows about linearly with the bias,
      so this brings the share back to M in one update.
    * otherwise, an integral step b_e <- b_e - k * x_e with rate k = min(step, (M - m) a / (2 m)).
      The second term uses the sensitivity last measured (m / a, share per unit of bias) so that
      one step closes at most half of the remaining gap to M: the share approaches M from below
      whatever the router's score scale. With nothing to estimate from (m or a zero), k = step.

    Then b is clipped to [-limit, 0]. Hot experts (x > 0) are pushed down; experts below the mean
    relax back towards 0, so an expert never above the mean keeps a zero bias. Because the loads
    are measured under the bias, the integral stops where a hot expert has been brought to the
    mean (x = 0) and holds the bias there rather than releasing it.
    """
    w = np.asarray(loads, np.float64)
    b = np.asarray(current_bias, np.float64)
    if w.ndim != 2 or b.shape != w.shape:
        raise ValueError(f"loads {w.shape} and current bias {b.shape} must both be [L, E]")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("loads must be finite and non-negative")
    if not np.isfinite(b).all():
        raise ValueError("current bias must be finite")
    if not 0.0 < max_reroute_fraction < 1.0 or not step > 0 or not limit > 0:
        raise ValueError(f"need 0 < max_reroute_fraction < 1, step > 0, limit > 0; got "
                         f"{max_reroute_fraction}, {step}, {limit}")
    layers = w.shape[0]
    if measured_reroute_fraction is None:
        m = np.zeros(layers)
    else:
        m = np.asarray(measured_reroute_fraction, np.float64)
        if m.shape != (layers,) or not np.isfinite(m).all() or (m < 0).any():
            raise ValueError(f"measured reroute fraction must be [{layers}] finite and >= 0, got {m.shape}")
    b = np.clip(b, -limit, 0.0)
    mean = w.mean(axis=1, keepdims=True)
    excess = np.divide(w, mean, out=np.ones_like(w), where=mean > 0) - 1.0
    x = excess / np.maximum(1.0, excess.max(axis=1, keepdims=True))
    amplitude = -b.min(axis=1)
    measured = (m > 0) & (amplitude > 0)
    half_gap = 0.5 * np.maximum(max_reroute_fraction - m, 0.0) * amplitude
    # k = min(step, half_gap / m), written so that a tiny m cannot overflow
    rate = np.divide(half_gap, np.maximum(m, half_gap / step), out=np.full(layers, step), where=measured)
    rate = rate[:, None]
    over = (m > max_reroute_fraction)[:, None]
    shrink = max_reroute_fraction / np.maximum(m, max_reroute_fraction)
    new = np.where(over, b * shrink[:, None], b - rate * x)
    return np.clip(new, -limit, 0.0).astype(np.float32)


def capacity_factor_for(cfg: PolicyConfig) -> float:
    """The capacity factor to publish: the configured one under the drop policy, else 0 (no drops)."""
    return cfg.capacity_factor if cfg.kind == "drop" else 0.0


def control_policy(cfg: PolicyConfig) -> tuple[Policy, Mode]:
    """The protocol's policy and mode values for the configured ``kind`` and ``mode``."""
    return Policy[cfg.kind.upper()], Mode[cfg.mode.upper()]
