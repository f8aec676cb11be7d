"""What the daemon keeps across restarts, per job, in ``<state_dir>/state.json``.

Plan versions must only grow, so the last version published is saved after every publish; the
daemon also reads the version in the control block when it re-attaches (a crash between publishing
and saving loses nothing). Writes are atomic: temp file, fsync, rename, fsync of the directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_FILE = "state.json"
FORMAT = 1


class StateError(Exception):
    """The state file exists but cannot be used; the message names the file and the reason."""


@dataclass
class JobState:
    """Persisted facts about one job. ``mode``/``policy`` are API overrides (None: use the config)."""

    last_version: int = 0
    generation: int = 0
    mode: str | None = None
    policy: str | None = None
    history: list[dict] = field(default_factory=list)

    def record(self, entry: dict, limit: int) -> None:
        """Append a plan to the history, keeping the newest ``limit`` entries."""
        self.history.append(entry)
        del self.history[:-limit]


class StateStore:
    """Loads and atomically saves every job's :class:`JobState`."""

    def __init__(self, directory: Path, history_limit: int = 50):
        self.directory = Path(directory)
        self.path = self.directory / STATE_FILE
        self.history_limit = history_limit

    def load(self) -> dict[str, JobState]:
        """The saved jobs; empty when there is no state file yet. Raises StateError when unreadable."""
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StateError(f"{self.path}: cannot read: {exc.strerror}") from None
        try:
            doc = json.loads(raw)
            if doc.get("format") != FORMAT:
                raise StateError(f"{self.path}: format {doc.get('format')!r}, this build reads {FORMAT}")
            return {job: _job_from_dict(d, self.history_limit) for job, d in doc["jobs"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StateError(f"{self.path}: not a balancerd state file ({exc})") from None

    def save(self, jobs: dict[str, JobState]) -> None:
        self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        doc = {"format": FORMAT, "jobs": {job: asdict(s) for job, s in jobs.items()}}
        data = json.dumps(doc, indent=1, sort_keys=True).encode()
        tmp = self.path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.path)
        dfd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _job_from_dict(d: dict, history_limit: int) -> JobState:
    state = JobState(
        last_version=int(d["last_version"]), generation=int(d["generation"]),
        mode=d.get("mode"), policy=d.get("policy"), history=list(d.get("history", [])),
    )
    if state.last_version < 0:
        raise ValueError(f"negative plan version {state.last_version}")
    del state.history[:-history_limit]
    return state
