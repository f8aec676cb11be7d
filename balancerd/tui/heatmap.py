"""A keyboard-driven heatmap: rows are layers, columns GPUs or experts, colour is load over the row mean."""

from __future__ import annotations

import textwrap

from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.reactive import reactive
from textual.strip import Strip
from textual.widget import Widget

from balancerd.tui.model import HeatGrid, heat_bin

# One colour per heat bin (load / row mean: <0.5, 0.5-0.8, 0.8-1.2, 1.2-1.5, 1.5-2, >=2): blues for
# idle GPUs, green around the mean, then amber to red for the ones that set the step time.
PALETTE = ("#1d4e89", "#4f86c6", "#2e7d32", "#c9a227", "#e07020", "#c62828")
INK = ("#ffffff", "#000000", "#ffffff", "#000000", "#000000", "#ffffff")
LABEL_STYLE = Style(bold=True)
CURSOR_MARK = "◆"


class Heatmap(Widget, can_focus=True):
    """Draws a :class:`HeatGrid` line by line; a header row and the row labels stay in place while
    the cells scroll to follow the cursor. Cells are wide enough for the value when ``values_shown``.
    Without a grid it shows ``message`` (why there is none) and keeps the focus for the view's keys."""

    DEFAULT_CSS = """
    Heatmap {
        height: 1fr;
        min-height: 4;
    }
    """

    BINDINGS = [
        Binding("up", "move(-1, 0)", "up", show=False),
        Binding("down", "move(1, 0)", "down", show=False),
        Binding("left", "move(0, -1)", "left", show=False),
        Binding("right", "move(0, 1)", "right", show=False),
        Binding("pageup", "move(-10, 0)", show=False),
        Binding("pagedown", "move(10, 0)", show=False),
        Binding("home", "move(-100000, -100000)", show=False),
        Binding("end", "move(100000, 100000)", show=False),
        Binding("w", "worst", "worst cell"),
        Binding("enter", "select", "layer's experts", show=False),
    ]

    grid: reactive[HeatGrid | None] = reactive(None)
    cursor: reactive[tuple[int, int]] = reactive((0, 0))
    values_shown: reactive[bool] = reactive(True)
    message: reactive[str] = reactive("")

    class Moved(Message):
        """The cursor is on another cell."""

        def __init__(self, heatmap: Heatmap) -> None:
            super().__init__()
            self.heatmap = heatmap

    class Selected(Message):
        """Enter was pressed on the cursor's row."""

        def __init__(self, heatmap: Heatmap, row: int) -> None:
            super().__init__()
            self.heatmap = heatmap
            self.row = row

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._top = 0   # first row shown
        self._left = 0  # first column shown

    @property
    def cell_width(self) -> int:
        return 6 if self.values_shown else 3

    @property
    def label_width(self) -> int:
        g = self.grid
        return 1 + max((len(x) for x in g.row_labels), default=0) if g is not None else 0

    def _fit(self) -> tuple[int, int]:
        """(rows, columns) of cells that fit in the widget."""
        return (max(1, self.size.height - 1),
                max(1, (self.size.width - self.label_width) // self.cell_width))

    def watch_grid(self, old: HeatGrid | None, new: HeatGrid | None) -> None:
        if new is None or not new.values:
            return
        if old is None or (len(old.values), len(old.col_labels)) != (len(new.values), len(new.col_labels)):
            self.cursor = (min(self.cursor[0], len(new.values) - 1),
                           min(self.cursor[1], len(new.col_labels) - 1))
        self._follow()
        self.refresh()
        self.post_message(self.Moved(self))

    def watch_cursor(self) -> None:
        self._follow()
        self.refresh()
        self.post_message(self.Moved(self))

    def on_resize(self) -> None:
        self._follow()

    def _follow(self) -> None:
        """Scroll so the cursor's cell is in view."""
        rows, cols = self._fit()
        r, c = self.cursor
        self._top = min(max(self._top, r - rows + 1), r)
        self._left = min(max(self._left, c - cols + 1), c)

    def action_move(self, rows: int, cols: int) -> None:
        g = self.grid
        if g is None or not g.values:
            return
        r, c = self.cursor
        self.cursor = (max(0, min(len(g.values) - 1, r + rows)),
                       max(0, min(len(g.col_labels) - 1, c + cols)))

    def action_worst(self) -> None:
        """Jump to the cell with the highest load relative to its row's mean."""
        g = self.grid
        if g is not None and g.values:
            self.cursor = max(((r, c) for r in range(len(g.rel)) for c in range(len(g.rel[r]))),
                              key=lambda rc: g.rel[rc[0]][rc[1]])

    def action_select(self) -> None:
        if self.grid is not None:
            self.post_message(self.Selected(self, self.cursor[0]))

    def on_click(self, event: events.Click) -> None:
        g = self.grid
        if g is None or event.y < 1 or event.x < self.label_width:
            return
        row = self._top + event.y - 1
        col = self._left + (event.x - self.label_width) // self.cell_width
        if row < len(g.values) and col < len(g.col_labels):
            self.cursor = (row, col)

    def on_mouse_scroll_down(self) -> None:
        self.action_move(1, 0)

    def on_mouse_scroll_up(self) -> None:
        self.action_move(-1, 0)

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        g = self.grid
        if g is None:
            lines = textwrap.wrap(self.message, max(10, width - 2))
            text = f" {lines[y - 1]}" if 1 <= y <= len(lines) else ""
            return Strip([Segment(text, Style(color="yellow"))]).adjust_cell_length(width)
        _, cols = self._fit()
        shown = range(self._left, min(len(g.col_labels), self._left + cols))
        lw, cw = self.label_width, self.cell_width
        if y == 0:
            return Strip([Segment(" " * lw), *self._header(g, shown, cw)]).adjust_cell_length(width)
        row = self._top + y - 1
        if row >= len(g.values):
            return Strip.blank(width)
        segments = [Segment(f"{g.row_labels[row]:<{lw}}", LABEL_STYLE if row == self.cursor[0] else None)]
        for col in shown:
            rel = g.rel[row][col]
            b = heat_bin(rel)
            style = Style(color=INK[b], bgcolor=PALETTE[b])
            if self.values_shown:  # a gap, then the value: neighbours of one colour stay apart
                segments.append(Segment(" "))
                text = f"{rel:>{cw - 2}.2f} "
            else:
                text = " " * cw
            if (row, col) == self.cursor:
                text = f"{CURSOR_MARK:^{cw}}" if not self.values_shown else text
                style += Style(reverse=self.values_shown, bold=True, color=INK[b])
            segments.append(Segment(text, style))
        return Strip(segments).adjust_cell_length(width)

    def _header(self, g: HeatGrid, shown: range, cw: int) -> list[Segment]:
        """Column labels; labels wider than a cell are written every few columns."""
        widest = max((len(g.col_labels[c]) for c in shown), default=1)
        every = max(1, -(-(widest + 1) // cw))
        out, pending = [], ""
        for c in shown:
            if c % every == 0:
                pending = g.col_labels[c]
            piece = (pending[:cw]).rjust(cw) if self.values_shown else pending[:cw].ljust(cw)
            pending = "" if self.values_shown else pending[cw:]
            style = LABEL_STYLE if c == self.cursor[1] else Style(dim=True)
            out.append(Segment(piece, style))
        return out
