"""Per-rank load and all-to-all wait; the straggler and the ranks waiting for it stand out."""

from __future__ import annotations

from rich.text import Text

from balancerd.tui.live_table import LiveTable
from balancerd.tui.model import NOT_REPORTED, ConsoleState, fmt_count, fmt_num, rank_rows

STYLES = {"late": "bold red", "waits": "yellow", "stale": "dim", "no data": "dim", "": ""}


class RankTable(LiveTable):
    """One row per rank: step, expert compute, all-to-all and wait times (us), tokens, role."""

    DEFAULT_CSS = """
    RankTable {
        height: auto;
        max-height: 45%;
    }
    """

    COLUMNS = (("rank", "rank"), ("step µs", "step"), ("expert µs", "expert"), ("a2a µs", "a2a"),
               ("wait µs", "wait"), ("tokens", "tokens"), ("share", "share"), ("", "role"))

    def watch_shown(self, shown: ConsoleState | None) -> None:
        if shown is None or shown.job is None:
            return
        reported = "gpu_load" in shown.job
        self.border_title = "Ranks: per step; wait = a2a beyond the fastest rank" + (
            "" if reported else f" (tokens {NOT_REPORTED})")
        rows = []
        for r in rank_rows(shown.job):
            style = STYLES[r.role]
            cells = [str(r.rank), *map(fmt_num, (r.step_us, r.expert_us, r.a2a_us, r.wait_us)),
                     fmt_count(r.tokens), "-" if r.share is None else f"{r.share:.2f}x"]
            rows.append((str(r.rank), [*(Text(c, style, justify="right") for c in cells),
                                       Text(r.role.upper(), style)]))
        self.show_rows(rows)
