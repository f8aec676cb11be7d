"""The heatmaps' colour key: load relative to the layer's mean, bin by bin."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual.widget import Widget

from balancerd.tui.heatmap import CURSOR_MARK, INK, PALETTE
from balancerd.tui.model import HEAT_LABELS


class HeatLegend(Widget):
    """One line: a swatch per bin with its range, and the cursor's mark."""

    DEFAULT_CSS = """
    HeatLegend {
        height: 1;
        padding: 0 1;
    }
    """

    def render(self) -> Text:
        text = Text("load ÷ layer mean ")
        for label, bg, ink in zip(HEAT_LABELS, PALETTE, INK, strict=True):
            text.append(f" {label} ", Style(color=ink, bgcolor=bg))
        text.append(f"  {CURSOR_MARK} cursor", Style(dim=True))
        return text
