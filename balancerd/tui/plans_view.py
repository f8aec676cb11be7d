"""The plans view: the last plan's progress, the history, and the chosen plan's detail."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.reactive import reactive
from textual.widgets import DataTable

from balancerd.tui.model import ConsoleState
from balancerd.tui.plan_detail import PlanDetail
from balancerd.tui.plan_status import PlanStatus
from balancerd.tui.plan_table import PlanTable


class PlansView(VerticalScroll, can_focus=False):
    """Last plan on top, history below; the highlighted history row is detailed underneath."""

    shown: reactive[ConsoleState | None] = reactive(None)

    def compose(self) -> ComposeResult:
        yield PlanStatus().data_bind(PlansView.shown)
        yield PlanTable().data_bind(PlansView.shown)
        yield PlanDetail().data_bind(PlansView.shown)

    @on(DataTable.RowHighlighted)
    def _detail(self, event: DataTable.RowHighlighted) -> None:
        self.query_one(PlanDetail).version = int(event.row_key.value.removeprefix("v"))
