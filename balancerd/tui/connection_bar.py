"""The top line: connected or not, to which daemon, and whether a poll is taking long."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from balancerd.tui.model import ConsoleState, fmt_dur

SLOW_AFTER_S = 2.0


class ConnectionBar(Widget):
    """Says whether the daemon answers; red while it does not, amber while a poll is slow."""

    DEFAULT_CSS = """
    ConnectionBar {
        dock: top;
        height: 1;
        padding: 0 1;
        background: $success-muted;
        color: $foreground;
        text-wrap: nowrap;
        text-overflow: ellipsis;
    }
    ConnectionBar.-connecting { background: $panel; }
    ConnectionBar.-slow { background: $warning-muted; }
    ConnectionBar.-disconnected { background: $error; text-style: bold; }
    """

    shown: reactive[ConsoleState | None] = reactive(None)
    waiting_s: reactive[float] = reactive(0.0)

    def render(self) -> Text:
        s = self.shown
        if s is None or (s.daemon is None and s.error is None):
            return Text(f"connecting to {s.socket if s else 'balancerd'}…")
        if not s.connected:
            tail = "; showing the last state received" if s.daemon is not None else ""
            return Text(f"✕ DISCONNECTED: {s.error}; retrying{tail}")
        d = s.daemon
        job = "no jobs"
        if s.job_name is not None:
            job = f"job {s.job_name} ({s.jobs.index(s.job_name) + 1} of {len(s.jobs)})"
        line = f"● balancerd pid {d['pid']}, up {fmt_dur(d['uptime_s'])} · {job} · {s.socket}"
        if self.waiting_s >= SLOW_AFTER_S:
            line = f"… no answer for {self.waiting_s:.0f} s · {line}"
        return Text(line)

    def watch_shown(self) -> None:
        self._restyle()

    def watch_waiting_s(self) -> None:
        self._restyle()

    def _restyle(self) -> None:
        s = self.shown
        connecting = s is None or (s.daemon is None and s.error is None)
        self.set_class(connecting, "-connecting")
        self.set_class(s is not None and not connecting and not s.connected, "-disconnected")
        self.set_class(self.waiting_s >= SLOW_AFTER_S, "-slow")
