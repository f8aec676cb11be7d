"""Stragglers: which rank is late, what explains it, which ranks wait for it; a bar per rank."""

from __future__ import annotations

from rich.text import Text

from balancerd.tui.job_panel import JobPanel
from balancerd.tui.model import ConsoleState, no_straggler_line, rank_rows, straggler_lines

ROLE_STYLES = {"late": "bold red", "waits": "yellow"}


class StragglerView(JobPanel):
    """The daemon's straggler verdicts, then each rank's step split into busy time (its own work)
    and time inside the all-to-alls (transfer plus waiting for the last rank to join)."""

    def render_job(self, s: ConsoleState) -> Text:
        text = Text()
        text.append("Stragglers, from the all-to-all timings of the window\n", style="bold")
        found = straggler_lines(s.job)
        for lines in found:
            text.append("● " + lines[0] + "\n", style="bold red")
            for line in lines[1:]:
                text.append("  " + line + "\n")
        if not found:
            text.append(no_straggler_line(s.straggler_threshold) + "\n", style="green")
        rows = [r for r in rank_rows(s.job) if r.step_us is not None]
        if not rows:
            return text.append("\nno rank has timings in the window", style="dim")
        text.append("\nEach rank's step: ")
        text.append("█ busy (own work)", style="bold")
        text.append("  ░ in the all-to-alls (transfer + waiting)\n")
        bar = max(10, self.size.width - 2 - 13 - 27)
        text.append(f"{'rank':<13}{'':<{bar}}{'busy':>9}{'a2a':>9}{'wait':>9}\n", style="dim")
        longest = max(r.step_us for r in rows) or 1.0
        for r in rows:
            busy = max(0.0, r.step_us - r.a2a_us)
            full = round(bar * r.step_us / longest)
            solid = round(bar * busy / longest)
            style = ROLE_STYLES.get(r.role, "")
            text.append(f"{r.rank:<5}{r.role.upper():<8}", style=style)
            text.append("█" * solid, style=style or "cyan")
            text.append("░" * (full - solid) + " " * (bar - full), style="dim")
            text.append(f"{busy:>9.0f}{r.a2a_us:>9.0f}{r.wait_us:>9.0f}\n")
        text.append("times in µs per step", style="dim")
        return text
