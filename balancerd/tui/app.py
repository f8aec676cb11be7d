"""The console app: polls the daemon's state API from a worker and shows it in four views.

Every request runs in a thread worker, one poll at a time; the UI thread only applies answers. A
daemon that stops answering leaves the console usable: the top line says so and polling goes on,
so a restarted daemon is picked up by the next poll. Actions go through the same API.
"""

from __future__ import annotations

import time

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Footer, TabbedContent, TabPane

from balancerd.tui.confirm_screen import ConfirmScreen
from balancerd.tui.connection_bar import ConnectionBar
from balancerd.tui.heatmap_view import HeatmapView
from balancerd.tui.help_screen import HelpScreen
from balancerd.tui.model import Client, ConsoleState, RatioHistory, Reading, call, console_state, read
from balancerd.tui.overview import Overview
from balancerd.tui.plan_screen import PlanScreen
from balancerd.tui.plans_view import PlansView
from balancerd.tui.policy_screen import PolicyScreen
from balancerd.tui.straggler_view import StragglerView

ACTIONS = ("pause", "resume", "plan_now", "policy")


class Polled(Message):
    """A poll's reading, posted from the worker thread."""

    def __init__(self, reading: Reading) -> None:
        super().__init__()
        self.reading = reading


class Acted(Message):
    """An action's answer (or why there is none), posted from the worker thread."""

    def __init__(self, request: dict, response: dict | None, error: str | None) -> None:
        super().__init__()
        self.request, self.response, self.error = request, response, error


class ConsoleApp(App[None]):
    """The on-call console for one balancerd, reached through ``client``."""

    TITLE = "balancerd"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]
    BINDINGS = [
        Binding("question_mark", "help", "help"),
        Binding("1", "view('overview')", "overview", show=False),
        Binding("2", "view('heatmap')", "heatmap", show=False),
        Binding("3", "view('stragglers')", "stragglers", show=False),
        Binding("4", "view('plans')", "plans", show=False),
        Binding("p", "pause", "pause"),
        Binding("r", "resume", "resume"),
        Binding("n", "plan_now", "plan now"),
        Binding("s", "policy", "policy"),
        Binding("j", "next_job", "next job", show=False),
        Binding("q", "quit", "quit"),
    ]

    shown: reactive[ConsoleState] = reactive(ConsoleState(""))
    waiting_s: reactive[float] = reactive(0.0)

    def __init__(self, client: Client, interval: float = 1.0, job: str | None = None) -> None:
        super().__init__()
        self.client = client
        self.interval = interval
        self.job_name = job
        self.history = RatioHistory()
        self._asked_at: float | None = None  # monotonic time of the poll in flight
        self._last: Reading | None = None
        self.set_reactive(ConsoleApp.shown, ConsoleState(str(client.path)))

    def compose(self) -> ComposeResult:
        yield ConnectionBar().data_bind(ConsoleApp.shown, ConsoleApp.waiting_s)
        with TabbedContent(initial="overview"):
            with TabPane("1 Overview", id="overview"):
                yield Overview().data_bind(ConsoleApp.shown)
            with TabPane("2 Heatmap", id="heatmap"):
                yield HeatmapView().data_bind(ConsoleApp.shown)
            with TabPane("3 Stragglers", id="stragglers"):
                with VerticalScroll():
                    yield StragglerView().data_bind(ConsoleApp.shown)
            with TabPane("4 Plans", id="plans"):
                yield PlansView().data_bind(ConsoleApp.shown)
        yield Footer()

    # -- polling ------------------------------------------------------------------------------------

    def on_mount(self) -> None:
        self.set_interval(self.interval, self.poll)
        self.poll()

    def poll(self) -> None:
        """Start a poll unless one is in flight (then only note how long it has been waiting)."""
        if not self.is_running:  # shutting down: the views are gone
            return
        if self._asked_at is not None:
            self.waiting_s = time.monotonic() - self._asked_at
            return
        self._asked_at = time.monotonic()
        heatmap = self.query_one(HeatmapView)
        wanted = heatmap.wanted() if self.query_one(TabbedContent).active == "heatmap" else None
        self.fetch(wanted)

    @work(thread=True, group="poll")
    def fetch(self, experts: tuple[str, int, int] | None) -> None:
        self.post_message(Polled(read(self.client, experts)))

    @on(Polled)
    def _polled(self, message: Polled) -> None:
        if not self.is_running:  # a poll that ended while the app shut down
            return
        self._asked_at = None
        self.waiting_s = 0.0
        self._last = message.reading
        self._show()

    def _show(self) -> None:
        was = _actionable(self.shown)
        self.shown = console_state(self.shown, self._last, self.history, self.job_name)
        if _actionable(self.shown) != was:
            self.refresh_bindings()

    @on(HeatmapView.RangeChanged)
    def _poll_now(self) -> None:
        self.poll()

    @on(TabbedContent.TabActivated)
    def _view_shown(self, event: TabbedContent.TabActivated) -> None:
        """A view came up (by key, click or the tabs): focus its table or map, fetch what it needs."""
        if self.focused is None or event.pane not in self.focused.ancestors:
            self._focus_in(event.pane)
        self.poll()

    def _focus_in(self, pane: TabPane) -> None:
        target = next((w for w in pane.query("*") if w.focusable), None)
        if target is not None:
            target.focus()

    # -- views and help -----------------------------------------------------------------------------

    def action_view(self, tab: str) -> None:
        tabs = self.query_one(TabbedContent)
        self.set_focus(None)  # a focused widget in the pane left behind would pull its tab back
        tabs.active = tab
        self._focus_in(tabs.get_pane(tab))

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_next_job(self) -> None:
        jobs = self.shown.jobs
        if len(jobs) > 1 and self._last is not None:
            self.job_name = jobs[(jobs.index(self.shown.job_name) + 1) % len(jobs)]
            self._show()

    # -- actions through the API --------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Actions need a connected daemon and a job; pause and resume only when they change something."""
        if action not in ACTIONS:
            return True
        s = self.shown
        if not s.connected or s.job is None:
            return None
        mode = s.job["policy"]["mode"]
        if (action, mode) in (("pause", "paused"), ("resume", "automatic")):
            return None
        return True

    def action_pause(self) -> None:
        job = self.shown.job_name
        self._confirm({"op": "pause", "job": job}, f"Pause automatic rebalancing of job {job}?",
                      "The daemon goes on measuring and planning but pushes no plan until resumed. "
                      "It logs the request with your uid.", "Pause")

    def action_resume(self) -> None:
        job = self.shown.job_name
        self._confirm({"op": "resume", "job": job}, f"Resume automatic rebalancing of job {job}?",
                      "The daemon may push a plan as soon as a layer stays imbalanced, which migrates "
                      "expert weights while serving. It logs the request with your uid.",
                      "Resume")

    def _confirm(self, request: dict, heading: str, body: str, yes: str) -> None:
        def answered(ok: bool | None) -> None:
            if ok:
                self.send(request)

        self.push_screen(ConfirmScreen(heading, body, yes), answered)

    def action_plan_now(self) -> None:
        job = self.shown.job_name

        def answered(publish: bool | None) -> None:
            if publish:
                self.send({"op": "plan", "job": job, "dry_run": False})

        self.push_screen(PlanScreen(self.client, job), answered)

    def action_policy(self) -> None:
        job = self.shown.job_name

        def answered(kind: str | None) -> None:
            if kind is not None:
                self.send({"op": "set_policy", "job": job, "policy": kind})

        self.push_screen(PolicyScreen(job, self.shown.job["policy"]["kind"]), answered)

    @work(thread=True, group="actions")
    def send(self, request: dict) -> None:
        self.post_message(Acted(request, *call(self.client, request)))

    @on(Acted)
    def _acted(self, message: Acted) -> None:
        if not self.is_running:
            return
        op, r = message.request["op"], message.response
        if r is None:
            self.notify(message.error, title=f"{op} failed", severity="error", timeout=10)
        elif op == "plan":
            self.notify(f"plan v{r['published_version']} published for job {r['job']}", title="plan now")
        elif op == "set_policy":
            self.notify(f"policy {r['policy']} for job {', '.join(r['jobs'])}", title="policy switched")
        else:
            self.notify(f"job {', '.join(r['jobs'])}: mode {r['mode']}", title=op)
        self.poll()


def _actionable(s: ConsoleState) -> tuple:
    """What decides which actions are enabled (see ConsoleApp.check_action)."""
    return s.connected, s.job_name, (s.job or {}).get("policy", {}).get("mode")
