"""One line per event on stderr, with journald priority prefixes when run under systemd.

Lines read ``<time> <level> <message> key=value ...``; under journald (``JOURNAL_STREAM`` set) they
read ``<N><message> key=value ...`` instead, because journald adds its own time and maps ``<N>`` to a
priority. Expected conditions are logged as one line, never with a traceback.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TextIO

LEVELS = {"error": 3, "warning": 4, "info": 6, "debug": 7}


def _value(v: object) -> str:
    text = str(v)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class Log:
    """A leveled line logger; ``once`` suppresses repeats of the same condition until ``forget``."""

    def __init__(self, level: str = "info", stream: TextIO | None = None, journal: bool | None = None):
        self._stream = stream if stream is not None else sys.stderr
        self._journal = bool(os.environ.get("JOURNAL_STREAM")) if journal is None else journal
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self.set_level(level)

    def set_level(self, level: str) -> None:
        if level not in LEVELS:
            raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
        self._max = LEVELS[level]

    def format(self, level: str, message: str, fields: dict[str, object]) -> str:
        tail = "".join(f" {k}={_value(v)}" for k, v in fields.items())
        if self._journal:
            return f"<{LEVELS[level]}>{message}{tail}"
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())
        return f"{stamp} {level} {message}{tail}"

    def emit(self, level: str, message: str, **fields: object) -> None:
        if LEVELS[level] > self._max:
            return
        line = self.format(level, message, fields)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()

    def error(self, message: str, **fields: object) -> None:
        self.emit("error", message, **fields)

    def warning(self, message: str, **fields: object) -> None:
        self.emit("warning", message, **fields)

    def info(self, message: str, **fields: object) -> None:
        self.emit("info", message, **fields)

    def debug(self, message: str, **fields: object) -> None:
        self.emit("debug", message, **fields)

    def once(self, key: str, level: str, message: str, **fields: object) -> bool:
        """Log only the first occurrence of ``key``; returns whether it logged."""
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
        self.emit(level, message, **fields)
        return True

    def forget(self, key: str) -> bool:
        """Let ``once(key, ...)`` log again (the condition cleared); returns whether it had logged."""
        with self._lock:
            seen = key in self._seen
            self._seen.discard(key)
        return seen
