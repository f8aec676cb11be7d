"""`balancerd tui --once`: the console's views as plain text, for scripts and tickets (no Textual)."""

from __future__ import annotations

from balancerd.tui.model import (
    HEAT_LABELS,
    NOT_REPORTED,
    ConsoleState,
    gpu_grid,
    heat_bin,
    last_plan_lines,
    layer_rows,
    level,
    no_straggler_line,
    plan_rows,
    policy_lines,
    rank_rows,
    spark,
    straggler_lines,
)
from balancerd.tui.model import fmt_count as count
from balancerd.tui.model import fmt_dur as dur
from balancerd.tui.model import fmt_num as num
from balancerd.tui.model import fmt_ratio as ratio

HEAT_MARKS = " .:-=#"  # one character per heat bin, lightest to heaviest


def render(states: list[ConsoleState]) -> str:
    """The daemon, then every view of each job: one state per job, as :func:`console_state` makes."""
    state = states[0]
    if not state.connected:
        return f"balancerd console: DISCONNECTED: {state.error}"
    d = state.daemon
    lines = [f"balancerd console: {state.socket}, daemon pid {d['pid']}, up {dur(d['uptime_s'])}, "
             f"{d['steps']} steps"]
    if not state.jobs:
        lines.append("no jobs: no telemetry rings in the daemon's runtime directory")
    for s in states:
        if s.job is not None:
            lines += [""] + job_text(s)
    return "\n".join(lines)


def job_text(state: ConsoleState) -> list[str]:
    j = state.job
    role = "leader" if j["leader"] else "observer"
    out = [f"job {state.job_name}: generation {j['generation']}, world {j['world']}, {j['layers']} layers x "
           f"{j['experts']} experts on {j['slots']} slots, {role}"]
    out += policy_lines(j)
    thr, clear = state.threshold, state.clear_threshold
    out += ["", f"LAYERS, worst first (GPU load max/min; imbalanced at {thr:g}, clears below {clear:g})",
            f"  {'layer':<6}{'max/min':>8}{'max/mean':>10}  {'state':<8}history"]
    for r in layer_rows(state):
        state_word = {"over": "OVER", "near": "near", "ok": "ok"}[level(r.max_min, thr, clear)]
        flag = state_word + ("*" if r.flagged else "")
        out.append(f"  {r.layer:<6}{ratio(r.max_min):>8}{r.balancedness:>10.3f}  {flag:<8}"
                   f"{spark(r.history, 2 * thr, 30) if r.history else '-'}")
    out.append("  (* flagged by the detector; history: one bar per interval, half height = threshold)")
    out += ["", "RANKS (us per step; wait: all-to-all time beyond the fastest rank's)",
            f"  {'rank':<6}{'step':>8}{'expert':>8}{'a2a':>8}{'wait':>8}{'tokens':>10}{'share':>7}  role"]
    for r in rank_rows(j):
        share = "-" if r.share is None else f"{r.share:.2f}x"
        out.append(f"  {r.rank:<6}{num(r.step_us):>8}{num(r.expert_us):>8}{num(r.a2a_us):>8}"
                   f"{num(r.wait_us):>8}{count(r.tokens):>10}{share:>7}  {r.role}")
    if "gpu_load" not in j:
        out.append(f"  tokens per GPU: {NOT_REPORTED}")
    out += ["", "STRAGGLERS (from the all-to-all timings)"]
    found = straggler_lines(j)
    out += [f"  {line}" if i == 0 else f"    {line}" for s in found for i, line in enumerate(s)]
    if not found:
        out.append(f"  {no_straggler_line(state.straggler_threshold)}")
    out += ["", "PLANS"] + [f"  last plan: {x}" if i == 0 else f"    {x}"
                            for i, x in enumerate(last_plan_lines(j, state.now))]
    rows = plan_rows(state)
    if rows:
        out.append(f"  {'ver':<5}{'age':>7}  {'policy':<10}{'source':<12}{'state':<15}{'moves':>6}"
                   f"{'gain s':>9}{'migr s':>9}  {'bal before→after':<18}{'measured':>9}  why")
    for p in rows:
        age = "-" if p.age_s is None else dur(p.age_s)
        bal = "-" if p.before is None else f"{p.before:.3f} → {p.after:.3f}"
        measured = "n/r" if p.realised is None else f"{p.realised:.3f}"
        out.append(f"  v{p.version:<4}{age:>7}  {p.policy:<10}{p.source:<12}{p.state:<15}"
                   f"{num(p.moves):>6}{num(p.predicted_gain_s):>9}{num(p.migration_cost_s):>9}  {bal:<18}"
                   f"{measured:>9}  {p.why}")
    if rows and all(p.realised is None for p in rows):
        out.append("  measured: balancedness over the first full window after a plan is applied "
                   "(n/r until then, or from a daemon that does not report it)")
    out += ["", "HEATMAP layers x GPUs (load / layer mean: "
            + ", ".join(f"'{m}' {label}" for m, label in zip(HEAT_MARKS, HEAT_LABELS, strict=True)) + ")"]
    grid = gpu_grid(j)
    if grid is None:
        out.append(f"  {NOT_REPORTED}")
    else:
        out.append("  " + " " * 6 + "".join(f"{c:>7}" for c in grid.col_labels))
        for label, row in zip(grid.row_labels, grid.rel, strict=True):
            out.append(f"  {label:<6}" + "".join(f"{v:>6.2f}{HEAT_MARKS[heat_bin(v)]}" for v in row))
    return out
