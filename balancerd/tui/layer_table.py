"""Per-layer imbalance, worst first, coloured against the detection threshold, with its history."""

from __future__ import annotations

from rich.text import Text

from balancerd.tui.live_table import LiveTable
from balancerd.tui.model import ConsoleState, fmt_ratio, layer_rows, level, spark

HISTORY_WIDTH = 20
STYLES = {"over": "bold red", "near": "yellow", "ok": "green"}
WORDS = {"over": "OVER", "near": "near", "ok": "ok"}


class LayerTable(LiveTable):
    """One row per MoE layer: GPU max/min, max/mean, state against the threshold, sparkline."""

    DEFAULT_CSS = """
    LayerTable {
        height: 1fr;
    }
    """

    COLUMNS = (("layer", "layer"), ("max/min", "max_min"), ("max/mean", "balancedness"), ("state", "state"),
               ("history", "history", HISTORY_WIDTH))

    def watch_shown(self, shown: ConsoleState | None) -> None:
        if shown is None:
            return
        thr, clear = shown.threshold, shown.clear_threshold
        self.border_title = f"Layers, worst first: GPU max/min (imbalanced ≥ {thr:g}, clears < {clear:g})"
        rows = []
        for r in layer_rows(shown):
            lvl = level(r.max_min, thr, clear)
            style = STYLES[lvl]
            rows.append((str(r.layer), [
                Text(str(r.layer), justify="right"), Text(fmt_ratio(r.max_min), style, justify="right"),
                Text(f"{r.balancedness:.3f}", justify="right"),
                Text(WORDS[lvl] + (" ⚑" if r.flagged else ""), style),
                Text(spark(r.history, 2 * thr, HISTORY_WIDTH) if r.history else "-", style)]))
        self.show_rows(rows)
