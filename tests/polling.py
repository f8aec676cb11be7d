"""Waiting for a condition in tests that drive real processes: one helper for every suite."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(predicate: Callable[[], Any], timeout: float, what: str = "the condition", *,
               poll_s: float = 0.02, ignore: tuple[type[BaseException], ...] = (),
               check: Callable[[], None] | None = None) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that; TimeoutError at the
    deadline. Exceptions of the ``ignore`` types count as "not yet" (a server still starting); ``check``
    runs before every poll and may raise (a process that died meanwhile fails the wait at once)."""
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        try:
            value = predicate()
        except ignore:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll_s)
