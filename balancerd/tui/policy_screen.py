"""Choose the job's policy: placement, token or drop."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, RadioButton, RadioSet, Static

from balancerd.config import POLICY_KINDS
from balancerd.tui.dialog_screen import DialogScreen

DESCRIPTIONS = {
    "placement": "replicate and move experts (migrates weights)",
    "token": "steer a bounded share of tokens off hot experts",
    "drop": "cap slot load at the capacity factor, drop overflow",
}


class PolicyScreen(DialogScreen[str | None]):
    """Dismisses with the chosen policy, or None when cancelled or unchanged."""

    DEFAULT_CSS = """
    PolicyScreen > Vertical { width: 76; }
    PolicyScreen #policy-heading { text-style: bold; margin-bottom: 1; }
    PolicyScreen RadioSet { width: 100%; }
    PolicyScreen Horizontal { margin-top: 1; }
    """

    BINDINGS = [Binding("escape", "cancel", "cancel")]

    def __init__(self, job: str, current: str) -> None:
        super().__init__()
        self.job, self.current = job, current

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(f"Switch the policy of job {self.job} (now {self.current})", id="policy-heading",
                         markup=False)
            with RadioSet():
                for kind in POLICY_KINDS:
                    yield RadioButton(f"{kind}: {DESCRIPTIONS[kind]}", value=kind == self.current, name=kind)
            yield Static("The daemon logs the switch with your uid.")
            with Horizontal():
                yield Button("Switch", variant="warning", id="switch")
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        self.query_one(RadioSet).focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "cancel":
            self.dismiss(None)
            return
        chosen = self.query_one(RadioSet).pressed_button
        kind = chosen.name if chosen is not None else None
        self.dismiss(kind if kind != self.current else None)

    def action_cancel(self) -> None:
        self.dismiss(None)
