"""A DataTable refilled from live data without losing the operator's place."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import DataTable

from balancerd.tui.model import ConsoleState


class LiveTable(DataTable):
    """Rows are ``(key, cells)`` with the key shown in the first column. When the same rows come
    back, cells are updated in place and the rows re-ordered, so scrolling is kept. A cursor on the
    first row stays there (the worst, the newest); one the operator moved stays on its row's key.

    A subclass names its ``COLUMNS`` (label, key[, width]) and fills the rows in ``watch_shown``;
    the table has a row cursor, zebra stripes and a titled rule on top."""

    DEFAULT_CSS = """
    LiveTable {
        border-top: solid $primary;
        border-title-color: $text-primary;
    }
    """

    COLUMNS: ClassVar[tuple[tuple, ...]] = ()

    shown: reactive[ConsoleState | None] = reactive(None)

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        for label, key, *width in self.COLUMNS:
            self.add_column(label, key=key, width=width[0] if width else None)

    def show_rows(self, rows: list[tuple[str, list]]) -> None:
        on = self._cursor_key() if self.cursor_row > 0 else None
        columns = list(self.columns)
        if {key for key, _ in rows} == {k.value for k in self.rows} and len(rows) == self.row_count:
            for key, cells in rows:
                for column, cell in zip(columns, cells, strict=True):
                    self.update_cell(key, column, cell, update_width=True)
            order = {key: i for i, (key, _) in enumerate(rows)}
            self.sort(columns[0], key=lambda cell: order[cell.plain if isinstance(cell, Text) else str(cell)])
        else:
            self.clear()
            for key, cells in rows:
                self.add_row(*cells, key=key)
        if on is not None and on in {key for key, _ in rows}:
            self.move_cursor(row=self.get_row_index(on), animate=False, scroll=False)

    def _cursor_key(self) -> str | None:
        if not self.row_count:
            return None
        return self.coordinate_to_cell_key((self.cursor_row, 0)).row_key.value
