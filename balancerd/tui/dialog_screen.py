"""The base of the dialogs that act on the daemon: a centred box in a warning frame, buttons bottom right."""

from __future__ import annotations

from typing import TypeVar

from textual.screen import ModalScreen

Result = TypeVar("Result")


class DialogScreen(ModalScreen[Result]):
    """A modal screen whose ``Vertical`` is the dialog box; a subclass sets its width."""

    DEFAULT_CSS = """
    DialogScreen { align: center middle; }
    DialogScreen > Vertical {
        max-width: 100%;
        height: auto;
        max-height: 100%;
        border: thick $warning;
        background: $surface;
        padding: 0 1;
    }
    DialogScreen Horizontal { height: auto; align-horizontal: right; }
    DialogScreen Button { margin-left: 2; }
    """
