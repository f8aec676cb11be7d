"""The first view: policy, layers worst first, ranks; side by side on wide terminals."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Container, Vertical
from textual.reactive import reactive

from balancerd.tui.layer_table import LayerTable
from balancerd.tui.model import ConsoleState
from balancerd.tui.policy_panel import PolicyPanel
from balancerd.tui.rank_table import RankTable


class Overview(Vertical):
    """Policy panel on top; the layer and rank tables stacked, or side by side from 120 columns."""

    SCOPED_CSS = False  # the layout follows the screen's width class
    DEFAULT_CSS = """
    Overview #overview-tables { layout: vertical; }
    Screen.-wide Overview #overview-tables { layout: horizontal; }
    Screen.-wide Overview RankTable { width: 1fr; max-height: 100%; height: 1fr; }
    Screen.-wide Overview LayerTable { width: 1fr; }
    """

    shown: reactive[ConsoleState | None] = reactive(None)

    def compose(self) -> ComposeResult:
        yield PolicyPanel().data_bind(Overview.shown)
        with Container(id="overview-tables"):
            yield LayerTable().data_bind(Overview.shown)
            yield RankTable().data_bind(Overview.shown)
