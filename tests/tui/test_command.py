"""`balancerd tui` as a command: --once without a daemon, and Textual imported by the TUI only."""

from __future__ import annotations

import subprocess
import sys

NOT_TEXTUAL = """
import sys
from balancerd.cli import build_parser
build_parser().parse_args(["tui", "--once"])
import balancerd.tui.text
loaded = sorted(m for m in sys.modules if m == "textual" or m.startswith("textual."))
assert not loaded, loaded
"""


def test_textual_is_imported_by_the_console_only():
    r = subprocess.run([sys.executable, "-c", NOT_TEXTUAL], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_once_without_a_daemon_says_disconnected_and_exits_1():
    command = ["balancerd.cli", "tui", "--once", "--socket", "/nonexistent/balancerd.sock"]
    r = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stdout.startswith("balancerd console: DISCONNECTED: no balancerd on /nonexistent/balancerd.sock")
