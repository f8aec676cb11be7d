"""The base of the text panels about the shown job: a dim line while the daemon reports none."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from balancerd.tui.model import NO_JOB, ConsoleState


class JobPanel(Widget):
    """Renders ``render_job(shown)`` once the shown state has a job, else one dim line."""

    DEFAULT_CSS = """
    JobPanel {
        height: auto;
        padding: 0 1;
    }
    """

    shown: reactive[ConsoleState | None] = reactive(None, layout=True)

    def render(self) -> Text:
        if self.shown is None or self.shown.job is None:
            return Text(NO_JOB, style="dim")
        return self.render_job(self.shown)

    def render_job(self, shown: ConsoleState) -> Text:
        """The panel for ``shown``, whose ``job`` is not None."""
        raise NotImplementedError
