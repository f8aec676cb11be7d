"""Help on `?`: the keys, what each view shows and what the colours mean."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP = """\
# balancerd console

Everything here comes from the daemon's state API (its Unix socket); actions go through the same
API, which checks your permission and logs your uid.

| key | does |
|---|---|
| `1` `2` `3` `4` | overview, heatmap, stragglers, plans |
| `p` / `r` | pause / resume automatic rebalancing (asks first) |
| `n` | plan now: a dry run with the diff and the predicted gain, then publish on `y` |
| `s` | switch policy: placement, token or drop |
| `j` | next job, when the daemon follows several |
| arrows, `w` | heatmap: move the cursor, jump to the worst cell |
| `enter`, `x`, `[` `]` | heatmap: a layer's experts, GPUs/experts, other layers |
| `?` / `q` | this help / quit |

**Overview.** Layers worst first by GPU load max/min: red at or above the detection threshold,
amber above the clear threshold, green below; ⚑ the detector flagged it. The history has one bar
per interval the daemon measured, half height at the threshold. Ranks: time per step; *wait* is
a rank's all-to-all time beyond the fastest rank's (time spent waiting for the late one).

**Heatmap.** Each cell is a GPU's (or an expert's) load divided by the layer's mean: blue idles,
green is even, red sets the step time.

**Stragglers.** A rank busy much longer than the others' median; the others wait for it inside
the all-to-alls. Expert compute explains the part that rebalancing can fix.

**Plans.** Predicted against measured balancedness, migration progress (ranks that applied the
plan), and rejected plans with the rank's reason.

*Not reported by this daemon* means the daemon's API does not serve that data (see docs/tui.md).
"""


class HelpScreen(ModalScreen[None]):
    """The help text; any of escape, ? or q closes it."""

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll {
        width: 96;
        max-width: 100%;
        height: auto;
        max-height: 100%;
        border: thick $primary;
        background: $surface;
    }
    HelpScreen Markdown { margin: 0 1; }
    """

    BINDINGS = [
        Binding("escape", "dismiss", "close"),
        Binding("question_mark", "dismiss", "close", show=False),
        Binding("q", "dismiss", "close", show=False),
    ]

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Markdown(HELP)
