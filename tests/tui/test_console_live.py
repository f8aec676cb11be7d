"""The console driven by a pilot against a real daemon process fed by a real telemetry writer.

Every action is checked where it lands: in the daemon's state (read through its API by the test,
not by the console) and in the daemon's log, with the operator's uid.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
from textual.widgets import TabbedContent

from balancerd.api import ApiClient
from balancerd.tui.app import ConsoleApp
from balancerd.tui.confirm_screen import ConfirmScreen
from balancerd.tui.connection_bar import ConnectionBar
from balancerd.tui.heatmap import Heatmap
from balancerd.tui.help_screen import HelpScreen
from balancerd.tui.layer_table import LayerTable
from balancerd.tui.model import NOT_REPORTED
from balancerd.tui.plan_screen import PlanScreen
from balancerd.tui.plan_table import PlanTable
from balancerd.tui.policy_screen import PolicyScreen
from balancerd.tui.rank_table import RankTable
from balancerd.tui.straggler_view import StragglerView
from tests.tui.conftest import Live, until

pytestmark = pytest.mark.slow

SIZE = (100, 30)
UID = os.getuid()


def console(live: Live, timeout: float = 3.0) -> ConsoleApp:
    return ConsoleApp(ApiClient(live.daemon.socket, timeout=timeout), interval=0.1)


def connected(app: ConsoleApp) -> bool:
    return app.shown.connected and app.shown.job is not None


def bar_text(app: ConsoleApp) -> str:
    return app.query_one(ConnectionBar).render().plain


def test_views_show_the_daemons_state(live):
    async def scenario() -> None:
        app = console(live)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: connected(app), "the first state")
            assert f"balancerd pid {live.daemon.proc.pid}" in bar_text(app)
            job = app.shown.job
            layers = app.query_one(LayerTable)
            assert layers.row_count == job["layers"] == 4
            worst = max(job["per_layer"], key=lambda x: (x["max_min"], -x["layer"]))["layer"]
            assert layers.coordinate_to_cell_key((0, 0)).row_key.value == str(worst)
            assert app.query_one(RankTable).row_count == job["world"] == 4
            if not all("max_min_history" in x for x in job["per_layer"]):  # the console keeps its own
                await until(pilot, lambda: min(map(len, app.shown.history)) >= 3, "three history points")
                assert len(layers.get_cell_at((0, 4)).plain) >= 3  # the sparkline

            await pilot.press("2")
            heat = app.query_one(Heatmap)
            await until(pilot, lambda: app.focused is heat, "the heatmap to take the focus")
            if "gpu_load" in job:
                assert heat.grid is not None and len(heat.grid.values) == 4
            else:
                assert heat.grid is None and NOT_REPORTED in heat.message and "gpu_load" in heat.message
            await pilot.press("x")  # layers x experts: fetched with the expert_load op
            await until(pilot, lambda: "loading" not in heat.message, "the expert loads' answer")
            assert heat.grid is not None or (NOT_REPORTED in heat.message and "expert_load" in heat.message)

            await pilot.press("3")
            lines = app.query_one(StragglerView).render().plain.splitlines()
            assert [line.split()[0] for line in lines if line[:1].isdigit()] == ["0", "1", "2", "3"]
            late = [s["rank"] for s in app.shown.job["stragglers"]]
            assert [int(line.split()[1]) for line in lines if line.startswith("● rank")] == late

            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("escape")
            assert not isinstance(app.screen, HelpScreen)

    asyncio.run(scenario())


def test_pause_resume_and_policy_switch_reach_the_daemon_with_the_uid(live):
    async def scenario() -> None:
        app = console(live)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: connected(app), "the first state")
            assert live.job()["policy"]["mode"] == "paused"
            await pilot.press("p")  # already paused: the binding is disabled
            assert not isinstance(app.screen, ConfirmScreen)

            await pilot.press("r")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("n")  # cancelled: nothing sent
            await pilot.pause(0.3)
            assert live.job()["policy"]["mode"] == "paused" and "api: resume" not in live.daemon.log()

            await pilot.press("r", "y")
            await until(pilot, lambda: live.job()["policy"]["mode"] == "automatic", "the daemon to resume")
            assert f"api: resume uid={UID} job=fake" in live.daemon.log()
            await until(pilot, lambda: app.shown.job["policy"]["mode"] == "automatic", "the console")

            await pilot.press("p", "y")
            await until(pilot, lambda: live.job()["policy"]["mode"] == "paused", "the daemon to pause")
            assert f"api: pause uid={UID} job=fake" in live.daemon.log()

            await pilot.press("s")
            assert isinstance(app.screen, PolicyScreen)
            await pilot.press("down", "enter")  # placement -> token
            await pilot.click("#switch")
            await until(pilot, lambda: live.job()["policy"]["kind"] == "token", "the daemon to switch policy")
            assert f"api: set_policy uid={UID} job=fake policy=token" in live.daemon.log()
            await until(pilot, lambda: app.shown.job["policy"]["kind"] == "token", "the console")

    asyncio.run(scenario())


def test_plan_now_previews_a_dry_run_and_publishes_only_when_confirmed(live):
    async def scenario() -> None:
        app = console(live)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: connected(app), "the first state")
            await pilot.press("n")
            screen = app.screen
            assert isinstance(screen, PlanScreen)
            await until(pilot, lambda: screen.preview is not None, "the dry run")
            preview = screen.preview
            assert preview["dry_run"] and preview["moves"] > 0 and preview["published_version"] is None
            summary = screen.query_one("#plan-summary").render().plain
            assert f"{preview['moves']} slot moves" in summary and "predicted gain" in summary
            await pilot.press("escape")
            await pilot.pause(0.3)
            assert live.job()["last_version"] == 0  # previewed and cancelled: nothing published

            await pilot.press("n")
            screen = app.screen
            await until(pilot, lambda: screen.preview is not None, "the second dry run")
            await pilot.press("y")
            await until(pilot, lambda: (live.job()["last_plan"] or {}).get("version") == 1, "plan v1")
            assert live.job()["last_plan"]["source"] == f"api uid={UID}"
            assert f"api: plan uid={UID} job=fake dry_run=False" in live.daemon.log()
            live.writer.wait_for(lambda r: r["type"] == "plan" and r["version"] == 1, 15)

            await pilot.press("4")
            table = app.query_one(PlanTable)
            await until(pilot, lambda: (app.shown.job["last_plan"] or {}).get("state") == "applied",
                        "the console to see v1 applied")
            await until(pilot, lambda: table.row_count == 1, "the plan's row")
            assert table.coordinate_to_cell_key((0, 0)).row_key.value == "v1"

    asyncio.run(scenario())


def test_shows_disconnected_and_reconnects_when_the_daemon_restarts(live):
    async def scenario() -> None:
        app = console(live)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: connected(app), "the first state")
            first_pid = live.daemon.proc.pid
            live.daemon.proc.terminate()
            live.daemon.proc.wait(10)
            await until(pilot, lambda: not app.shown.connected, "the console to notice")
            assert "DISCONNECTED" in bar_text(app) and app.query_one(ConnectionBar).has_class("-disconnected")
            await pilot.press("n")  # no daemon: actions are disabled
            assert not isinstance(app.screen, PlanScreen)

            await asyncio.to_thread(live.daemon.start)
            await until(pilot, lambda: connected(app) and app.shown.daemon["pid"] == live.daemon.proc.pid,
                        "the console to reconnect")
            assert live.daemon.proc.pid != first_pid and "DISCONNECTED" not in bar_text(app)

    asyncio.run(scenario())


def test_a_stuck_daemon_does_not_freeze_the_console(live):
    """SIGSTOP: the daemon's socket still accepts connections, but nothing answers for 5 s; a console
    that waited on the UI thread would take seconds over each key."""
    async def scenario() -> None:
        app = console(live, timeout=5.0)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: connected(app), "the first state")
            os.kill(live.daemon.proc.pid, signal.SIGSTOP)
            try:
                await until(pilot, lambda: app.waiting_s > 0.5, "a poll to hang")
                for key, check in (("question_mark", lambda: isinstance(app.screen, HelpScreen)),
                                   ("escape", lambda: not isinstance(app.screen, HelpScreen)),
                                   ("4", lambda: app.query_one(TabbedContent).active == "plans"),
                                   ("1", lambda: app.query_one(TabbedContent).active == "overview")):
                    started = time.monotonic()
                    await pilot.press(key)
                    await until(pilot, check, f"the console to handle {key}", timeout=1.5)
                    assert time.monotonic() - started < 1.5, f"{key} took {time.monotonic() - started:.2f} s"
                await until(pilot, lambda: "no answer for" in bar_text(app), "the console to say it waits")
                assert app.query_one(ConnectionBar).has_class("-slow")
                await until(pilot, lambda: not app.shown.connected, "the request to time out")
                assert "did not answer in time" in bar_text(app)
            finally:
                os.kill(live.daemon.proc.pid, signal.SIGCONT)
            await until(pilot, lambda: connected(app), "the console to recover")

    asyncio.run(scenario())


def test_once_prints_every_view_as_text(live):
    command = ["balancerd.cli", "tui", "--once", "--socket", str(live.daemon.socket)]
    r = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    for heading in ("job fake:", "LAYERS, worst first", "RANKS", "STRAGGLERS", "PLANS", "HEATMAP"):
        assert heading in r.stdout
    assert f"daemon pid {live.daemon.proc.pid}" in r.stdout
