"""The state API: newline-delimited JSON over a Unix stream socket, served from threads.

Each request is one JSON object on one line with an ``op`` key; each response is one JSON object on
one line with ``ok`` true (and the op's fields) or ``ok`` false and ``error``. Peers are checked with
SO_PEERCRED: root, the daemon's own uid and members of the configured group are allowed.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import socket
import socketserver
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from balancerd.log import Log

MAX_REQUEST_BYTES = 64 * 1024
_IDLE_TIMEOUT_S = 60.0  # a connected client silent this long is dropped


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


class RequestError(Exception):
    """A request that cannot be served; its message is sent back as the error."""


Handler = Callable[[dict, Peer], dict]


class DaemonUnavailable(Exception):
    """No daemon answers on the socket."""


def peer_of(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", raw))


def group_gid(group: str) -> int:
    """The gid of a group name (or a numeric gid); raises KeyError when there is no such group."""
    return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid


def allowed(peer: Peer, group: str | None) -> bool:
    """Root, our own uid, or (with a group configured) its members, by primary or supplementary gid."""
    if peer.uid in (0, os.getuid()):
        return True
    if group is None:
        return False
    try:
        gid = group_gid(group)
        if peer.gid == gid:
            return True
        name = pwd.getpwuid(peer.uid).pw_name
        return name in grp.getgrgid(gid).gr_mem or pwd.getpwuid(peer.uid).pw_gid == gid
    except KeyError:
        return False


class _Connection(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        self.connection.settimeout(_IDLE_TIMEOUT_S)
        peer = peer_of(self.connection)
        api = self.server.api
        if not allowed(peer, api.group):
            api.log.warning("api: refused peer", uid=peer.uid, gid=peer.gid, pid=peer.pid)
            try:  # read the request first: closing with it unread would reset the connection
                self.rfile.readline(MAX_REQUEST_BYTES + 1)
            except OSError:
                return
            self._send({"ok": False, "error": "permission denied: not the daemon's user or group"})
            return
        while True:
            try:
                line = self.rfile.readline(MAX_REQUEST_BYTES + 1)
            except OSError:  # the idle timeout included
                return
            if not line:
                return
            if len(line) > MAX_REQUEST_BYTES:
                self._send({"ok": False, "error": f"request longer than {MAX_REQUEST_BYTES} bytes"})
                return
            if line.strip() and not self._send(api.answer(line, peer)):
                return

    def _send(self, response: dict) -> bool:
        try:
            self.wfile.write(json.dumps(response, separators=(",", ":")).encode() + b"\n")
            self.wfile.flush()
            return True
        except OSError:
            return False


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    api: ApiServer


class ApiServer:
    """Serves ``handler(request, peer)`` on ``path`` until :meth:`stop`."""

    def __init__(self, path: Path, handler: Handler, log: Log, group: str | None = None):
        self.path = Path(path)
        self.handler = handler
        self.log = log
        self.group = group
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind (mode 0660, group-owned when configured) and serve from a thread.

        A socket file left by a dead daemon is replaced; one a live daemon answers on is an error.
        """
        if self.path.exists() or self.path.is_symlink():
            if _answers(self.path):
                raise OSError(f"{self.path}: another balancerd is serving on this socket")
            self.path.unlink()
        try:
            gid = group_gid(self.group) if self.group is not None else -1
        except KeyError:
            raise OSError(f"api.group {self.group!r}: no such group") from None
        old = os.umask(0o117)
        try:
            server = _Server(str(self.path), _Connection, bind_and_activate=True)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o660)
        if gid >= 0:
            os.chown(self.path, -1, gid)
        server.api = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="balancerd-api", daemon=True)
        self._thread.start()

    def answer(self, line: bytes, peer: Peer) -> dict:
        """The response to one request line; never raises."""
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            return {"ok": False, "error": f"bad request: not JSON ({exc})"}
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return {"ok": False, "error": "bad request: expected an object with a string 'op'"}
        try:
            return {"ok": True, **self.handler(request, peer)}
        except RequestError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug in one request must not take the server down
            self.log.error("api: request failed", op=request["op"], uid=peer.uid,
                           error=f"{type(exc).__name__}: {exc}")
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server = None
        self.path.unlink(missing_ok=True)


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


class ApiClient:
    """A blocking client: one connection per request."""

    def __init__(self, path: Path, timeout: float = 5.0):
        self.path = Path(path)
        self.timeout = timeout

    def request(self, request: dict) -> dict:
        """Send one request and return the response. Raises DaemonUnavailable when nobody listens,
        PermissionError when the socket refuses us, TimeoutError when the daemon does not answer."""
        return self.request_raw(json.dumps(request).encode() + b"\n")

    def request_raw(self, line: bytes) -> dict:
        """Send bytes as they are (one request line) and decode the one-line response."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout)
            try:
                s.connect(str(self.path))
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise DaemonUnavailable(f"no balancerd on {self.path}: {exc.strerror}") from None
            s.sendall(line)
            return json.loads(_read_line(s))


def _read_line(s: socket.socket) -> bytes:
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = s.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the daemon closed the connection without a full response")
        buf += chunk
    return bytes(buf)
