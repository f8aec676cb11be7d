"""The heatmap view: layers x GPUs, or layers x experts for a range of layers, with a legend."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Static

from balancerd.tui.heat_legend import HeatLegend
from balancerd.tui.heatmap import Heatmap
from balancerd.tui.model import (
    NO_JOB,
    NOT_REPORTED,
    ConsoleState,
    HeatGrid,
    expert_grid,
    fmt_count,
    fmt_ratio,
    gpu_grid,
)

RANGE = 16  # layers in the layers x experts map


class HeatmapView(Vertical):
    """Layers x GPUs from the state; enter on a layer (or x) shows layers x experts from that layer,
    fetched for that range only. Says so plainly when the daemon does not report the loads."""

    DEFAULT_CSS = """
    HeatmapView > #heat-title { height: 1; padding: 0 1; text-style: bold; }
    HeatmapView > #heat-detail { height: 1; padding: 0 1; text-wrap: nowrap; text-overflow: ellipsis; }
    """

    BINDINGS = [
        Binding("x", "toggle", "GPUs/experts"),
        Binding("left_square_bracket", "shift(-1)", "prev layers", show=False),
        Binding("right_square_bracket", "shift(1)", "next layers", show=False),
    ]

    shown: reactive[ConsoleState | None] = reactive(None)
    mode: reactive[str] = reactive("gpus")  # "gpus" or "experts"
    first: reactive[int] = reactive(0)      # first layer of the experts map

    class RangeChanged(Message):
        """The view needs other loads than the last poll brought: poll now."""

    def compose(self) -> ComposeResult:
        yield Static(id="heat-title")
        yield Heatmap()
        yield HeatLegend()
        yield Static(id="heat-detail")

    def wanted(self) -> tuple[str, int, int] | None:
        """``(job, first layer, count)`` of the expert loads to fetch; None in the GPU map."""
        s = self.shown
        if self.mode != "experts" or s is None or s.job is None:
            return None
        return s.job_name, self.first, self._count()

    def _count(self) -> int:
        return max(1, min(RANGE, self.shown.job["layers"] - self.first))

    def action_toggle(self) -> None:
        self.mode = "experts" if self.mode == "gpus" else "gpus"
        self.post_message(self.RangeChanged())

    def action_shift(self, step: int) -> None:
        s = self.shown
        if self.mode != "experts" or s is None or s.job is None:
            return
        self.first = max(0, min(s.job["layers"] - 1, self.first + step * RANGE))
        self.post_message(self.RangeChanged())

    @on(Heatmap.Selected)
    def _open_layer(self, event: Heatmap.Selected) -> None:
        if self.mode != "gpus" or self.shown is None or self.shown.job is None:
            return
        self.first = max(0, min(event.row, self.shown.job["layers"] - RANGE))
        self.mode = "experts"
        event.heatmap.cursor = (event.row - self.first, 0)
        self.post_message(self.RangeChanged())

    def watch_shown(self) -> None:
        self._show()

    def watch_mode(self) -> None:
        self._show()

    def watch_first(self) -> None:
        self._show()

    def _show(self) -> None:
        if not self.is_mounted:
            return
        grid, why, title = self._grid()
        heat = self.query_one(Heatmap)
        heat.values_shown = self.mode == "gpus"
        heat.message = why or ""
        heat.grid = grid
        self.query_one("#heat-title", Static).update(title)
        if grid is None:
            self.query_one("#heat-detail", Static).update("")

    def _grid(self) -> tuple[HeatGrid | None, str | None, str]:
        """The grid to draw, or why there is none; and the title line."""
        s = self.shown
        if s is None or s.job is None:
            return None, NO_JOB, "Heatmap"
        if self.mode == "gpus":
            grid = gpu_grid(s.job)
            title = "Layers × GPUs · enter: the layer's experts · x: experts · w: worst cell"
            why = (f"Layers × GPUs: {NOT_REPORTED}. The console needs each layer's load per GPU "
                   "(gpu_load in the status state); see docs/tui.md.")
            return grid, None if grid else why, title
        count = self._count()
        last = self.first + count - 1
        title = f"Layers {self.first}-{last} × experts · [ ]: other layers · x: GPUs · w: worst cell"
        answer = s.experts
        if answer is not None and answer.get("missing"):
            return None, (f"Layers × experts: {NOT_REPORTED}. The console needs the expert_load op "
                          "(window loads per expert for a range of layers); see docs/tui.md."), title
        if answer is not None and answer.get("error"):
            return None, f"Layers × experts: {answer['error']}", title
        if answer is None or answer.get("job") != s.job_name or (answer["first"], len(answer["load"])) != (
                self.first, count):
            return None, f"loading layers {self.first}-{last}…", title
        return expert_grid(answer), None, title

    @on(Heatmap.Moved)
    def _detail(self, event: Heatmap.Moved) -> None:
        g, (r, c) = event.heatmap.grid, event.heatmap.cursor
        if g is None or r >= len(g.values) or c >= len(g.col_labels):
            return
        layer = g.first_row + r
        line = (f"layer {layer} · {g.col_name} {c}: {fmt_count(g.values[r][c])} tokens, "
                f"{g.rel[r][c]:.2f}× the layer mean")
        if g.replicas is not None:
            n = g.replicas[r][c]
            line += f", {n} replica{'s' if n != 1 else ''}"
        per_layer = self.shown.job["per_layer"] if self.shown and self.shown.job else []
        if layer < len(per_layer):
            line += f" · layer max/min {fmt_ratio(per_layer[layer]['max_min'])}"
        self.query_one("#heat-detail", Static).update(line)
