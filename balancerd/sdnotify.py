"""The sd_notify protocol: tell the service manager (systemd) about start-up, reloads, health and stop.

A notification is one datagram of newline-separated ``KEY=VALUE`` lines sent to the AF_UNIX socket
named by ``$NOTIFY_SOCKET``: a filesystem path, or an abstract-namespace name when it starts with
``@``. Without ``$NOTIFY_SOCKET`` (started by hand, or under a unit whose Type= is not notify) every
call does nothing. Sending never blocks: a datagram the receiver cannot take now is dropped, as
sd_notify(3) drops one it cannot deliver. The service manager's watchdog interval comes from
``$WATCHDOG_USEC`` and ``$WATCHDOG_PID`` (:func:`watchdog_interval`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class Notifier:
    """Sends notifications to one socket address, or nowhere when ``address`` is None."""

    def __init__(self, address: str | None):
        if address is not None and not address.startswith(("/", "@")):
            raise ValueError(f"NOTIFY_SOCKET={address!r} is neither an absolute path nor an abstract "
                             "name starting with '@'")
        self.address = address
        self._target = None if address is None else ("\0" + address[1:] if address[0] == "@" else address)
        self._sock: socket.socket | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """The notifier ``$NOTIFY_SOCKET`` names; ValueError when it names an unsupported address."""
        return cls(environ.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return self._target is not None

    def notify(self, **fields: object) -> bool:
        """Send ``KEY=VALUE`` lines in the order given (``notify(READY=1, STATUS="...")``); returns
        whether the datagram left. Newlines inside a value are replaced by spaces."""
        if self._target is None:
            return False
        text = "".join(f"{key}={str(value).replace(chr(10), ' ')}\n" for key, value in fields.items())
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.sendto(text.encode(), socket.MSG_DONTWAIT, self._target)
        except OSError:  # no listener (any more), or its queue is full: as sd_notify, carry on
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: Mapping[str, str] = os.environ, pid: int | None = None) -> float | None:
    """The watchdog timeout in seconds the service manager expects pings within, or None when there is
    none for this process (``$WATCHDOG_USEC`` unset, not a positive integer, or ``$WATCHDOG_PID``
    naming another process)."""
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and (not owner.isdigit() or int(owner) != (os.getpid() if pid is None else pid)):
        return None
    return int(usec) / 1e6
