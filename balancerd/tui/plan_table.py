"""The plan history, newest first: predicted against measured gain, state, and why."""

from __future__ import annotations

from rich.text import Text

from balancerd.tui.live_table import LiveTable
from balancerd.tui.model import NOT_REPORTED, ConsoleState, fmt_dur, fmt_num, plan_rows
from balancerd.tui.plan_status import STATE_STYLES


class PlanTable(LiveTable):
    """One row per plan; ``n/r``: the daemon does not report the balancedness measured after it."""

    DEFAULT_CSS = """
    PlanTable {
        height: auto;
        max-height: 50%;
    }
    """

    COLUMNS = tuple((label, label) for label in ("ver", "age", "state", "policy", "source", "moves", "gain s",
                                                  "migr s", "balancedness", "measured", "why"))

    def watch_shown(self, shown: ConsoleState | None) -> None:
        if shown is None or shown.job is None:
            return
        rows = plan_rows(shown)
        reported = any(r.realised is not None for r in rows)
        self.border_title = "Plans, newest first" + ("" if reported or not rows else
                                                     f" (measured: n/r = {NOT_REPORTED})")
        right = {"justify": "right"}
        self.show_rows([(f"v{r.version}", [
            Text(f"v{r.version}"), Text("-" if r.age_s is None else fmt_dur(r.age_s), **right),
            Text(r.state, STATE_STYLES.get(r.state, "")), r.policy, r.source, Text(fmt_num(r.moves), **right),
            Text(fmt_num(r.predicted_gain_s), **right), Text(fmt_num(r.migration_cost_s), **right),
            "-" if r.before is None else f"{r.before:.3f} → {r.after:.3f}",
            Text("n/r" if r.realised is None else f"{r.realised:.3f}", **right),
            Text(r.why, "red" if r.entry.get("rejection") else "")]) for r in rows])
