"""The job's policy, its mode, the detector's verdict and the last plan, in a few lines."""

from __future__ import annotations

from rich.text import Text

from balancerd.tui.job_panel import JobPanel
from balancerd.tui.model import ConsoleState, acks_progress, fmt_dur, policy_lines


class PolicyPanel(JobPanel):
    """Policy and mode (PAUSED stands out), detector verdict, last plan."""

    DEFAULT_CSS = """
    PolicyPanel {
        border-top: solid $primary;
        border-title-color: $text-primary;
    }
    """
    BORDER_TITLE = "Policy"

    def render_job(self, shown: ConsoleState) -> Text:
        job = shown.job
        lines = policy_lines(job) + [_last_plan(job)]
        text = Text("\n".join(lines))
        text.highlight_words(["mode paused"], "bold black on yellow")
        text.highlight_words(["mode automatic"], "bold green")
        text.highlight_words([": rejected", ": unacknowledged"], "bold red")
        text.highlight_words([": pending"], "bold yellow")
        return text


def _last_plan(job: dict) -> str:
    plan = job.get("last_plan")
    if plan is None:
        return "last plan: none"
    applied, world, _ = acks_progress(job)
    return (f"last plan: v{plan['version']} {plan['policy']} ({plan['source']}): {plan['state']}, "
            f"{applied}/{world} ranks applied, {fmt_dur(plan['age_s'])} ago")
