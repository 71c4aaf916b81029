"""Snapshots: a round trip restores the same digests and retry answers; anything doubtful loads as None."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from services.tide import snapshots
from services.tide.state import Cas, Command, Outcome, Put, TideState, Version
from tests.unit.tide.helpers import random_log

TOPIC = "clisonix.tide.log.v1"


def _state() -> TideState:
    state = TideState()
    state.apply(0, 0, Command("c1", "a", Put(b"\x00\x01", "application/octet-stream")))
    state.apply(0, 1, Command("c2", "a", Cas(b"2", "text/plain", expected=Version(0, 0))))
    state.apply(1, 0, Command("c3", "b", Cas(b"3", expect_absent=True)))
    state.apply(1, 4, Command("c4", "b", Cas(b"4", expect_absent=True)))  # conflict, remembered for retries
    state.skip(2, 0)
    return state


def test_round_trip_restores_state_offsets_digests_and_retry_answers(tmp_path: Path):
    path = tmp_path / "tide.sqlite"
    original = _state()
    snapshots.save(original, path, TOPIC)
    restored = snapshots.load(path, TOPIC, TideState())
    assert restored is not None
    assert restored.digests() == original.digests()
    assert restored.list() == original.list()
    # A retry of a command applied before the snapshot answers its first result after it, as on the original.
    retry = Command("c4", "b", Cas(b"4", expect_absent=True))
    assert restored.apply(1, 5, retry) == original.apply(1, 5, retry)
    assert restored.apply(1, 6, retry).outcome is original.apply(1, 6, retry).outcome is Outcome.CAS_CONFLICT
    # Replaying the tail on both keeps them equal.
    tail = Command("c5", "a", Put(b"5"))
    assert restored.apply(0, 2, tail) == original.apply(0, 2, tail)
    assert restored.digests() == original.digests()
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_saving_again_replaces_the_snapshot(tmp_path: Path):
    path = tmp_path / "tide.sqlite"
    state = _state()
    snapshots.save(state, path, TOPIC)
    state.apply(0, 2, Command("c9", "z", Put(b"9")))
    snapshots.save(state, path, TOPIC)
    restored = snapshots.load(path, TOPIC, TideState())
    assert restored is not None and restored.digests() == state.digests()


def test_missing_snapshot_loads_as_none(tmp_path: Path):
    assert snapshots.load(tmp_path / "none.sqlite", TOPIC, TideState()) is None


def test_garbage_file_loads_as_none(tmp_path: Path):
    path = tmp_path / "tide.sqlite"
    path.write_bytes(b"not a database at all" * 100)
    assert snapshots.load(path, TOPIC, TideState()) is None


def test_truncated_file_loads_as_none(tmp_path: Path):
    path = tmp_path / "tide.sqlite"
    snapshots.save(_state(), path, TOPIC)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert snapshots.load(path, TOPIC, TideState()) is None


def test_a_changed_row_fails_the_checksum_and_leaves_the_state_empty(tmp_path: Path):
    path = tmp_path / "tide.sqlite"
    snapshots.save(_state(), path, TOPIC)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE entries SET value = ? WHERE key = 'a'", (b"tampered",))
    db.close()
    target = TideState()
    assert snapshots.load(path, TOPIC, target) is None
    assert target.partitions == {}


def test_a_snapshot_of_another_topic_loads_as_none(tmp_path: Path):
    path = tmp_path / "tide.sqlite"
    snapshots.save(_state(), path, TOPIC)
    assert snapshots.load(path, "other.topic", TideState()) is None


def test_snapshot_at_any_cut_then_the_tail_equals_a_full_replay(tmp_path: Path):
    log = random_log(3, length=120)
    full = TideState()
    results = [full.apply(*record) for record in log]
    for cut in (0, 1, 37, 119, 120):
        before = TideState()
        for record in log[:cut]:
            before.apply(*record)
        path = tmp_path / f"cut-{cut}.sqlite"
        snapshots.save(before, path, TOPIC)
        resumed = snapshots.load(path, TOPIC, TideState())
        assert resumed is not None
        assert [resumed.apply(*record) for record in log[cut:]] == results[cut:]
        assert resumed.digests() == full.digests()
