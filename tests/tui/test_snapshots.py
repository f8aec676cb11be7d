"""SVG snapshots of every view at 80x24 (and the overview wide), from a recorded daemon.

The recording (``recorded_state.json``, made by ``record_state.py`` from a real daemon) is served
through the client interface; the console polls it once (the interval is long), so each picture is
deterministic. ``--snapshot-update`` rewrites the SVGs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from textual.pilot import Pilot

from balancerd.tui.app import ConsoleApp
from balancerd.tui.heatmap import Heatmap
from balancerd.tui.plan_screen import PlanScreen
from tests.tui.conftest import until
from tests.tui.recorded import NoDaemon, RecordedDaemon

SIZE = (80, 24)


def console(daemon: RecordedDaemon | NoDaemon | None = None) -> ConsoleApp:
    """The console on the recorded daemon; it polls when it starts (and when a view asks) only."""
    return ConsoleApp(daemon or RecordedDaemon(), interval=600)


def settled(app: ConsoleApp, *keys: str,
            then: Callable[[], object] | None = None) -> Callable[[Pilot], Awaitable[None]]:
    """Wait until the console has shown the recorded state, press ``keys``, wait for ``then``."""

    async def run_before(pilot: Pilot) -> None:
        await until(pilot, lambda: app.shown.job is not None, "the recorded state")
        for key in keys:
            await pilot.press(key)
            await pilot.pause()
        if then is not None:
            await until(pilot, then, "the view to settle")
        await pilot.pause()

    return run_before


def test_overview(snap_compare):
    app = console()
    assert snap_compare(app, terminal_size=SIZE, run_before=settled(app))


def test_overview_wide_terminal(snap_compare):
    app = console()
    assert snap_compare(app, terminal_size=(140, 36), run_before=settled(app))


def test_heatmap_layers_by_gpus(snap_compare):
    app = console()
    assert snap_compare(app, terminal_size=SIZE, run_before=settled(app, "2", "w"))


def test_heatmap_layers_by_experts(snap_compare):
    app = console()

    def loaded() -> bool:
        return app.query_one(Heatmap).grid is not None and app.query_one(Heatmap).values_shown is False

    assert snap_compare(app, terminal_size=SIZE,
                        run_before=settled(app, "2", "down", "down", "down", "enter", "right",
                                                then=loaded))


def test_heatmap_not_reported_by_todays_daemon(snap_compare):
    app = console(RecordedDaemon(proposed=False))
    assert snap_compare(app, terminal_size=SIZE, run_before=settled(app, "2"))


def test_heatmap_experts_not_reported_by_todays_daemon(snap_compare):
    app = console(RecordedDaemon(proposed=False))
    assert snap_compare(app, terminal_size=SIZE,
                        run_before=settled(app, "2", "x",
                                                then=lambda: "expert_load" in app.query_one(Heatmap).message))


def test_stragglers(snap_compare):
    app = console()
    assert snap_compare(app, terminal_size=SIZE, run_before=settled(app, "3"))


def test_plans(snap_compare):
    app = console()
    assert snap_compare(app, terminal_size=SIZE, run_before=settled(app, "4"))


def test_plan_now_preview(snap_compare):
    app = console()
    ready = settled(app, "n",
                         then=lambda: isinstance(app.screen, PlanScreen) and app.screen.preview is not None)
    assert snap_compare(app, terminal_size=SIZE, run_before=ready)


def test_resume_confirmation(snap_compare):
    app = console()
    assert snap_compare(app, terminal_size=SIZE, run_before=settled(app, "r"))


def test_policy_switch(snap_compare):
    app = console()
    assert snap_compare(app, terminal_size=SIZE, run_before=settled(app, "s"))


def test_help(snap_compare):
    app = console()
    assert snap_compare(app, terminal_size=SIZE, run_before=settled(app, "question_mark"))


def test_disconnected(snap_compare):
    app = console(NoDaemon())

    async def run_before(pilot: Pilot) -> None:
        await until(pilot, lambda: app.shown.error is not None, "the first failed poll")

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)
