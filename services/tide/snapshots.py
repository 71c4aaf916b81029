"""SQLite snapshots of the Tide state: every partition's entries, remembered command ids and applied offset.

A snapshot is written whole into a temporary file beside the target and moved over it with os.replace, so a
crash leaves the old snapshot or the new one, never half of one. It carries a SHA-256 checksum over its rows;
`load` returns None for a missing, corrupt, foreign (another topic) or other-format snapshot, and the replica
then replays the whole log: never wrong state.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import struct
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

from services.tide.state import Entry, Outcome, PartitionState, Result, TideState, Version

FORMAT = "clisonix.tide.snapshot.v1"

SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE partitions (partition INTEGER PRIMARY KEY, applied INTEGER NOT NULL);
CREATE TABLE entries (
  partition INTEGER NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, content_type TEXT NOT NULL,
  version_partition INTEGER NOT NULL, version_offset INTEGER NOT NULL, PRIMARY KEY (partition, key));
CREATE TABLE seen (
  partition INTEGER NOT NULL, seq INTEGER NOT NULL, command_id TEXT NOT NULL, outcome INTEGER NOT NULL,
  version_partition INTEGER NOT NULL, version_offset INTEGER NOT NULL,
  key_version_partition INTEGER, key_version_offset INTEGER, PRIMARY KEY (partition, seq));
"""

Row = tuple[object, ...]


def _checksum(topic: str, partitions: Iterable[Row], entries: Iterable[Row], seen: Iterable[Row]) -> str:
    """SHA-256 over the rows in primary-key order, each field length-prefixed."""
    h = hashlib.sha256(FORMAT.encode())
    for table, rows in (("topic", [(topic,)]), ("partitions", partitions), ("entries", entries), ("seen", seen)):
        h.update(table.encode())
        for row in rows:
            for value in row:
                data = value if isinstance(value, bytes) else repr(value).encode("utf-8")
                h.update(struct.pack(">Q", len(data)))
                h.update(data)
    return h.hexdigest()


Rows = tuple[list[Row], list[Row], list[Row]]


def capture(state: TideState) -> Rows:
    """A copy of `state` as snapshot rows (partitions, entries, seen ids): cheap, so the caller can write it from
    another thread while the state moves on."""
    partitions: list[Row] = []
    entries: list[Row] = []
    seen: list[Row] = []
    for p, ps in sorted(state.partitions.items()):
        partitions.append((p, ps.applied))
        for key in sorted(ps.entries):
            e = ps.entries[key]
            entries.append((p, key, e.value, e.content_type, e.version.partition, e.version.offset))
        for seq, (command_id, r) in enumerate(ps.seen.items()):
            kv = r.key_version
            seen.append(
                (p, seq, command_id, int(r.outcome), r.version.partition, r.version.offset)
                + ((kv.partition, kv.offset) if kv else (None, None))
            )
    return partitions, entries, seen


def save(state: TideState, path: Path, topic: str) -> None:
    """Writes `state` (read from `topic`) to the snapshot at `path`, atomically replacing any older one."""
    write(capture(state), path, topic)


def write(rows: Rows, path: Path, topic: str) -> None:
    """Writes captured rows to the snapshot at `path` (safe to run in a worker thread)."""
    partitions, entries, seen = rows
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        with contextlib.closing(sqlite3.connect(tmp)) as db:
            db.executescript(SCHEMA)
            with db:
                db.executemany("INSERT INTO partitions VALUES (?, ?)", partitions)
                db.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?)", entries)
                db.executemany("INSERT INTO seen VALUES (?, ?, ?, ?, ?, ?, ?, ?)", seen)
                meta = {"format": FORMAT, "topic": topic, "checksum": _checksum(topic, partitions, entries, seen)}
                db.executemany("INSERT INTO meta VALUES (?, ?)", sorted(meta.items()))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path, topic: str, state: TideState) -> TideState | None:
    """Fills the empty `state` from the snapshot at `path` and returns it; None (state untouched) when the snapshot
    is missing, unreadable, fails its checksum, has another format, or was taken from another topic.

    Restored partitions keep no change history: Watch can start from their applied offset onwards.
    """
    if not path.is_file():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            meta = dict(db.execute("SELECT name, value FROM meta").fetchall())
            partitions = db.execute("SELECT * FROM partitions ORDER BY partition").fetchall()
            entries = db.execute("SELECT * FROM entries ORDER BY partition, key").fetchall()
            seen = db.execute("SELECT * FROM seen ORDER BY partition, seq").fetchall()
    except sqlite3.Error:
        return None
    if meta.get("format") != FORMAT or meta.get("topic") != topic:
        return None
    if meta.get("checksum") != _checksum(topic, partitions, entries, seen):
        return None
    restored: dict[int, PartitionState] = {}
    for p, applied in partitions:
        ps = state.partition(p)
        ps.applied = ps.feed_floor = applied
        restored[p] = ps
    try:
        for p, key, value, content_type, vp, vo in entries:
            restored[p].store(Entry(key, bytes(value), content_type, Version(vp, vo)))
        for p, _seq, command_id, outcome, vp, vo, kvp, kvo in seen:
            kv = Version(kvp, kvo) if kvp is not None else None
            seen_ids: OrderedDict[str, Result] = restored[p].seen
            seen_ids[command_id] = Result(Outcome(outcome), Version(vp, vo), kv)
    except (KeyError, ValueError):
        state.partitions.clear()
        return None
    for ps in restored.values():
        ps.history.append((ps.applied, ps.entries_sum))
    return state
