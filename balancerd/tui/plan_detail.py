"""The plan chosen in the table: why it was made or rejected, and its worst layers before and after."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from balancerd.tui.model import ConsoleState, plan_rows, plan_why


class PlanDetail(Widget):
    """Reason, rejection and per-layer predicted balancedness of one plan."""

    DEFAULT_CSS = """
    PlanDetail {
        height: auto;
        padding: 0 1;
    }
    """

    shown: reactive[ConsoleState | None] = reactive(None, layout=True)
    version: reactive[int | None] = reactive(None, layout=True)

    def render(self) -> Text:
        rows = plan_rows(self.shown) if self.shown is not None else []
        e = next((r.entry for r in rows if r.version == self.version), None)
        if e is None:
            return Text("")
        text = Text()
        text.append(f"v{e['version']}: ", style="bold")
        text.append(e.get("reason", ""))
        if e.get("rejection"):
            text.append("\nrejected: " + plan_why(e), style="red")
        worst = e.get("worst_layers") or []
        if worst:
            text.append("\npredicted max/mean per layer: ")
            text.append(", ".join(f"L{w['layer']} {w['before']:.2f}→{w['after']:.2f} ({w['moves']} moves)"
                                  for w in worst))
        return text
