"""The last plan: what it is, how far its migration got (ranks that applied it), why it failed."""

from __future__ import annotations

from rich.text import Text

from balancerd.tui.job_panel import JobPanel
from balancerd.tui.model import ConsoleState, acks_progress, last_plan_lines

BAR = 20
STATE_STYLES = {"applied": "bold green", "pending": "bold yellow", "rejected": "bold red",
                "unacknowledged": "bold red", "superseded": "dim"}


class PlanStatus(JobPanel):
    """A progress bar of the ranks that applied the last plan, then its summary lines."""

    DEFAULT_CSS = """
    PlanStatus {
        border-top: solid $primary;
        border-title-color: $text-primary;
    }
    """
    BORDER_TITLE = "Last plan"

    def render_job(self, s: ConsoleState) -> Text:
        lines = last_plan_lines(s.job, s.now)
        plan = s.job.get("last_plan")
        if plan is None:
            return Text(lines[0], style="dim")
        applied, world, _ = acks_progress(s.job)
        style = STATE_STYLES.get(plan["state"], "")
        done = round(BAR * applied / world) if world else 0
        text = Text("migration ")
        text.append("█" * done, style="green")
        text.append("░" * (BAR - done), style="dim")
        text.append(f" {applied}/{world} ranks applied · ")
        text.append(plan["state"].upper(), style=style)
        for line in lines:
            text.append("\n" + line)
        return text
