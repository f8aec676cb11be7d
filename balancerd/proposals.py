"""What a job's policy would publish now, made from the job's window: one proposal maker per policy."""

from __future__ import annotations

import numpy as np

from balancerd import planner
from balancerd.config import PlannerConfig, PolicyConfig
from balancerd.ingest import JobFeed
from balancerd.jobrun import JobRun
from balancerd.log import Log
from balancerd.numbers import fmt
from balancerd.placement import Topology
from balancerd.plans import Proposal
from balancerd.policy import capacity_factor_for, decide_push, moe_share, token_bias


def propose(job: str, run: JobRun, feed: JobFeed, pcfg: PolicyConfig, planner_cfg: PlannerConfig,
            log: Log) -> Proposal:
    """What the job's policy ``pcfg`` would publish now; ``push`` says whether it would on its own."""
    version, served = feed.served_placement(log)
    if pcfg.kind == "placement":
        return propose_placement(job, run, feed, served, pcfg, planner_cfg)
    if pcfg.kind == "token":
        proposal = propose_token(job, run, feed, served, pcfg)
    else:
        factor = capacity_factor_for(pcfg)
        changed = factor != run.capacity_factor
        reason = f"capacity factor {factor:g}" if changed else "capacity factor already published"
        proposal = Proposal(job, feed.generation, "drop", served, changed, reason,
                            {"capacity_factor": factor}, capacity_factor=factor)
    proposal.summary["served_version"] = version
    if pcfg.mode == "paused" and proposal.push:
        proposal.push, proposal.reason = False, "mode is paused"
    return proposal


def propose_token(job: str, run: JobRun, feed: JobFeed, served: np.ndarray, pcfg: PolicyConfig) -> Proposal:
    ranks = list(feed.current_ranks().values())
    routed = sum((f.routed.sum().sum(axis=1) for f in ranks), np.zeros(feed.shape.layers))
    rerouted = sum((f.rerouted.sum() for f in ranks), np.zeros(feed.shape.layers))
    measured = np.divide(rerouted, routed, out=np.zeros_like(routed), where=routed > 0)
    # the counts measured while the current bias was applied, as token_bias expects
    bias = token_bias(run.window.sliding.sum(), run.bias, measured, pcfg.max_reroute_fraction,
                      pcfg.bias_step, pcfg.bias_limit)
    changed = not np.array_equal(bias, run.bias)
    summary = {"bias_min": float(bias.min()), "biased_experts": int((bias < 0).sum()),
               "measured_reroute_fraction": float(measured.max(initial=0.0))}
    return Proposal(job, feed.generation, "token", served, changed,
                    "bias updated" if changed else "bias unchanged", summary, selection_bias=bias)


def propose_placement(job: str, run: JobRun, feed: JobFeed, served: np.ndarray, pcfg: PolicyConfig,
                      c: PlannerConfig) -> Proposal:
    topo = Topology(gpus=feed.world, slots=feed.slots, nodes=c.nodes)
    loads = run.window.decayed.value()
    result = planner.plan(loads, topo, current=served, max_moves=c.max_moves_per_layer,
                          expert_groups=c.expert_groups, tolerance=c.tolerance)
    moves = result.moves
    step_us, share = timing(feed)
    decision = decide_push(result.balancedness_before, result.balancedness_after, int(moves.sum()),
                           step_us, share, pcfg)
    before, after = result.balancedness_before, result.balancedness_after
    summary = {
        "moves": int(moves.sum()), "layers_changed": int((moves > 0).sum()),
        "balancedness_before": {"mean": fmt(before.mean()), "worst": fmt(before.max())},
        "balancedness_after": {"mean": fmt(after.mean()), "worst": fmt(after.max())},
        "predicted_gain_s": fmt(decision.predicted_gain_s),
        "migration_cost_s": fmt(decision.migration_cost_s),
        "worst_layers": [{"layer": int(i), "before": fmt(before[i]), "after": fmt(after[i]),
                          "moves": int(moves[i])} for i in np.argsort(-before, kind="stable")[:8]],
    }
    return Proposal(job, feed.generation, "placement", result.phys_to_log.astype(np.int32), decision.push,
                    decision.reason, summary)


def timing(feed: JobFeed) -> tuple[float, float]:
    """(mean step us, MoE share of the step) over the ranks with records in the window."""
    means = [f.mean_times() for f in feed.current_ranks().values() if len(f.times)]
    if not means:
        return 0.0, 0.0
    step = np.array([m["step_us"] for m in means])
    phases = (np.stack([m[k] for m in means]) for k in ("dispatch_us", "combine_us", "expert_us"))
    share = moe_share(*phases, step)
    return float(step.mean()), share
