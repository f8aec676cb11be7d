"""A yes/no question before an action changes what the daemon does."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Static

from balancerd.tui.dialog_screen import DialogScreen


class ConfirmScreen(DialogScreen[bool]):
    """Asks ``heading`` with ``body``; dismisses with True on yes (y), False on no (n, escape)."""

    DEFAULT_CSS = """
    ConfirmScreen > Vertical { width: 72; }
    ConfirmScreen #confirm-heading { text-style: bold; margin-bottom: 1; }
    ConfirmScreen Horizontal { margin-top: 1; }
    """

    BINDINGS = [
        Binding("y", "answer(True)", "yes"),
        Binding("n", "answer(False)", "no"),
        Binding("escape", "answer(False)", "cancel"),
    ]

    def __init__(self, heading: str, body: str, yes: str = "Yes") -> None:
        super().__init__()
        self.heading, self.body, self.yes = heading, body, yes

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(self.heading, id="confirm-heading", markup=False)
            yield Static(self.body, markup=False)
            with Horizontal():
                yield Button(f"{self.yes} (y)", variant="warning", id="yes")
                yield Button("Cancel (n)", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)
