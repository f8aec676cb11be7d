"""Persisted state: round trip, bounded history, atomic replacement, unusable files."""

from __future__ import annotations

import json
import os

import pytest

from balancerd.state import STATE_FILE, JobState, StateError, StateStore


def test_round_trip(tmp_path):
    store = StateStore(tmp_path / "state")
    assert store.load() == {}
    jobs = {"a": JobState(last_version=7, generation=0xABC, mode="paused", policy="token",
                          history=[{"version": 7, "state": "applied"}]),
            "b": JobState()}
    store.save(jobs)
    assert store.load() == jobs
    assert oct(os.stat(store.path).st_mode & 0o777) == oct(0o640)


def test_history_is_bounded_newest_kept(tmp_path):
    store = StateStore(tmp_path, history_limit=3)
    s = JobState()
    for v in range(1, 6):
        s.record({"version": v}, store.history_limit)
    assert [e["version"] for e in s.history] == [3, 4, 5]
    long = JobState(history=[{"version": v} for v in range(10)])
    store.save({"j": long})
    assert [e["version"] for e in store.load()["j"].history] == [7, 8, 9]


def test_save_replaces_atomically_and_leaves_no_temp_file(tmp_path):
    store = StateStore(tmp_path)
    store.save({"j": JobState(last_version=1)})
    inode = os.stat(store.path).st_ino
    store.save({"j": JobState(last_version=2)})
    assert os.stat(store.path).st_ino != inode  # renamed into place, not rewritten in place
    assert sorted(os.listdir(tmp_path)) == [STATE_FILE]
    assert store.load()["j"].last_version == 2


@pytest.mark.parametrize("content, match", [
    ("{not json", "not a balancerd state file"),
    (json.dumps({"format": 99, "jobs": {}}), "format 99"),
    (json.dumps({"format": 1, "jobs": {"j": {"generation": 1}}}), "not a balancerd state file"),
    (json.dumps({"format": 1, "jobs": {"j": {"last_version": -1, "generation": 0}}}), "negative"),
    (json.dumps([1, 2]), "not a balancerd state file"),
])
def test_unusable_files_raise_state_error_naming_the_file(tmp_path, content, match):
    (tmp_path / STATE_FILE).write_text(content)
    with pytest.raises(StateError, match=match) as info:
        StateStore(tmp_path).load()
    assert str(tmp_path / STATE_FILE) in str(info.value)
