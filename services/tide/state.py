"""The Tide apply function: replicated key-value state built by applying the command log in order.

Pure logic (no gRPC, no Kafka): every replica feeds each partition's records of clisonix.tide.log.v1 to
`TideState.apply` in log order, so replicas that applied the same offsets hold the same state and gave the same
outcome for every command. A key's version is the position of the record that last wrote it,
`Version(partition, offset)`.

Compare-and-set: `Cas(expected=Version(...))` applies only if the key exists with exactly that version at that
point of the log; "expected absent" is spelled `Cas(expect_absent=True)` and applies only if the key does not
exist (never written, or deleted). A missing key has no version, so no `expected` version ever matches it.

Idempotent retries: the first record with a given command id in a partition is applied; a later record with
the same id (a client retry) changes nothing and answers the first record's result. The table of seen ids is
part of the state (bounded, oldest evicted first, so eviction is deterministic too).

Digests: each partition keeps the sum (mod 2^256) of its entries' SHA-256 fingerprints, updated on every change,
so its digest costs O(1) at any offset, and remembers the sums at its last `digest_history` offsets, so a
replica can tell what its digest was at an offset another replica reports. A `DigestReport` record carries one
replica's digest at an offset; applying it changes no key (the replica compares it with its own).
"""

from __future__ import annotations

import builtins
import enum
import hashlib
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import NamedTuple, cast

from services.common.errors import FailedPrecondition, InvalidArgument

DEFAULT_MAX_KEY_BYTES = 1024
DEFAULT_MAX_VALUE_BYTES = 1_048_576
DEFAULT_MAX_CONTENT_TYPE_BYTES = 256
DEFAULT_FEED_LENGTH = 10_000
DEFAULT_DEDUPE_LENGTH = 100_000
DEFAULT_DIGEST_HISTORY = 20_000
DIGEST_DOMAIN = b"clisonix.tide.digest.v2"
_FINGERPRINT_MODULUS = 1 << 256


class Version(NamedTuple):
    """Where a record sits in the command log."""

    partition: int
    offset: int


class Outcome(enum.IntEnum):
    """What a command did; the numbers are those of clisonix.tide.v1.Outcome."""

    APPLIED = 1
    CAS_CONFLICT = 2
    NOT_FOUND = 3


# The objects built for every applied record are slotted and not frozen (a frozen dataclass costs twice as much to
# build, on the apply path); nothing changes them after construction.


@dataclass(slots=True)
class Put:
    value: bytes
    content_type: str = ""


@dataclass(slots=True)
class Cas:
    """Compare-and-set: exactly one of `expected` and `expect_absent` states the expectation."""

    value: bytes
    content_type: str = ""
    expected: Version | None = None
    expect_absent: bool = False


@dataclass(slots=True)
class Delete:
    pass


@dataclass(slots=True)
class DigestReport:
    """One replica's digest of a partition at an applied offset (the record's own partition); changes no key."""

    replica: str
    applied: int
    sha256: str


Op = Put | Cas | Delete | DigestReport


@dataclass(slots=True)
class Command:
    command_id: str
    key: str
    op: Op


@dataclass(slots=True)
class Entry:
    key: str
    value: bytes
    content_type: str
    version: Version
    # SHA-256 of the fields above as an integer (set when the entry is stored): its share of the digest.
    fingerprint: int = 0


# An entry's fingerprint input starts with the lengths of its key, content type and value and its version.
_FINGERPRINT_HEADER = struct.Struct(">QQQiq")
_VERSION = struct.Struct(">iq")


def fingerprint(entry: Entry) -> int:
    """SHA-256 over the lengths of the entry's key, content type and value, its version, then the three themselves,
    as an integer. On the apply path: one struct pack and three updates (a third of the cost of one per field)."""
    key, content_type, value, version = (
        entry.key.encode("utf-8"),
        entry.content_type.encode("utf-8"),
        entry.value,
        entry.version,
    )
    h = hashlib.sha256(
        _FINGERPRINT_HEADER.pack(len(key), len(content_type), len(value), version.partition, version.offset)
    )
    h.update(key)
    h.update(content_type)
    h.update(value)
    return int.from_bytes(h.digest(), "big")


def digest_of(partition: int, applied: int, entries_sum: int) -> str:
    """The digest (SHA-256, hex) of a partition whose entries' fingerprints sum to `entries_sum` (mod 2^256) at
    `applied`."""
    h = hashlib.sha256(DIGEST_DOMAIN)
    h.update(_VERSION.pack(partition, applied))
    h.update((entries_sum % _FINGERPRINT_MODULUS).to_bytes(32, "big"))
    return h.hexdigest()


@dataclass(slots=True)
class Result:
    """The answer to one command.

    version: where the command's record sits in the log (for a retried command id, the first record's).
    key_version: the key's version after the command; None when the key does not exist.
    """

    outcome: Outcome
    version: Version
    key_version: Version | None


@dataclass(slots=True)
class Change:
    """One state change, for Watch: `deleted` is True when the change removed the key (then `value` is empty)."""

    key: str
    deleted: bool
    value: bytes
    content_type: str
    version: Version


@dataclass(frozen=True)
class Limits:
    max_key_bytes: int = DEFAULT_MAX_KEY_BYTES
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    max_content_type_bytes: int = DEFAULT_MAX_CONTENT_TYPE_BYTES


def check_command(command: Command, limits: Limits) -> None:
    """Raises InvalidArgument when `command` is malformed or over `limits`; used before appending and applying."""
    if isinstance(command.op, DigestReport):
        report = command.op
        if not command.command_id or not report.replica or report.applied < 0 or len(report.sha256) != 64:
            raise InvalidArgument("malformed digest report", reason="bad_digest_report")
        return
    key_bytes = len(command.key.encode("utf-8"))
    if key_bytes == 0:
        raise InvalidArgument("key is empty", reason="empty_key")
    if key_bytes > limits.max_key_bytes:
        raise InvalidArgument(f"key is {key_bytes} bytes, over {limits.max_key_bytes}", reason="key_too_large")
    if not command.command_id:
        raise InvalidArgument("command_id is empty", reason="empty_command_id")
    op = command.op
    if isinstance(op, Put | Cas):
        if len(op.value) > limits.max_value_bytes:
            raise InvalidArgument(
                f"value is {len(op.value)} bytes, over {limits.max_value_bytes}", reason="value_too_large"
            )
        if len(op.content_type.encode("utf-8")) > limits.max_content_type_bytes:
            raise InvalidArgument("content type too long", reason="content_type_too_large")
    if isinstance(op, Cas) and (op.expected is None) == (not op.expect_absent):
        raise InvalidArgument("a compare-and-set needs exactly one of expected and expect_absent", reason="bad_cas")


@dataclass
class PartitionState:
    """One partition's keys, its applied offset (the next offset to apply), its bounded change feed, and the sums
    of its entries' fingerprints at its last applied offsets (for digests at those offsets)."""

    partition: int
    applied: int = 0
    entries: dict[str, Entry] = field(default_factory=dict)
    # command id -> the result of its first record, oldest first.
    seen: OrderedDict[str, Result] = field(default_factory=OrderedDict)
    feed: deque[Change] = field(default_factory=deque)
    # Changes at offsets >= feed_floor are all in `feed` (a feed restored from a snapshot starts empty).
    feed_floor: int = 0
    entries_sum: int = 0
    # (applied offset, entries_sum) after each record, oldest first; bounded by the state's digest_history.
    history: deque[tuple[int, int]] = field(default_factory=deque)

    def store(self, entry: Entry) -> None:
        """Sets `entry` (replacing any entry of its key) and keeps the fingerprint sum."""
        entry.fingerprint = fingerprint(entry)
        previous = self.entries.get(entry.key)
        # Reduced mod 2^256 only in digest_of: the exact sum grows by a bit per doubling of the commands applied.
        self.entries_sum += entry.fingerprint - (previous.fingerprint if previous is not None else 0)
        self.entries[entry.key] = entry

    def remove(self, key: str) -> None:
        """Removes the entry of `key` (which exists) and keeps the fingerprint sum."""
        self.entries_sum -= self.entries.pop(key).fingerprint

    def advance(self, offset: int) -> None:
        """Marks the record at `offset` applied and remembers the fingerprint sum there."""
        self.applied = offset + 1
        self.history.append((self.applied, self.entries_sum))

    def digest(self) -> str:
        """SHA-256 (hex) over the partition, its applied offset and its entries; equal across processes."""
        return digest_of(self.partition, self.applied, self.entries_sum)

    def digest_at(self, applied: int) -> str | None:
        """The digest when the applied offset was `applied`; None when that is not among the remembered ones."""
        if applied == self.applied:
            return self.digest()
        for at, entries_sum in reversed(self.history):
            if at == applied:
                return digest_of(self.partition, applied, entries_sum)
            if at < applied:
                break
        return None


class TideState:
    """The state of every partition of the command log, changed only by `apply` and `skip` in log order.

    limits: checked on every command (a malformed record is skipped the same way on every replica).
    feed_length: changes kept per partition for Watch.
    dedupe_length: command ids remembered per partition for idempotent retries.
    digest_history: applied offsets per partition whose digest stays known (digest_at).
    """

    def __init__(
        self,
        limits: Limits | None = None,
        feed_length: int = DEFAULT_FEED_LENGTH,
        dedupe_length: int = DEFAULT_DEDUPE_LENGTH,
        digest_history: int = DEFAULT_DIGEST_HISTORY,
    ) -> None:
        if feed_length < 1 or dedupe_length < 1 or digest_history < 1:
            raise ValueError("feed_length, dedupe_length and digest_history must be at least 1")
        self.limits = limits or Limits()
        self.feed_length = feed_length
        self.dedupe_length = dedupe_length
        self.digest_history = digest_history
        self.partitions: dict[int, PartitionState] = {}

    def partition(self, partition: int) -> PartitionState:
        """The state of `partition`, created empty (applied offset 0) on first use."""
        state = self.partitions.get(partition)
        if state is None:
            state = self.partitions[partition] = PartitionState(
                partition, feed=deque(maxlen=self.feed_length), history=deque(maxlen=self.digest_history)
            )
        return state

    def applied(self, partition: int) -> int:
        """The next offset to apply on `partition` (0 before anything was applied)."""
        state = self.partitions.get(partition)
        return state.applied if state is not None else 0

    def _advance(self, partition: int, offset: int) -> PartitionState:
        state = self.partition(partition)
        if offset < state.applied:
            raise FailedPrecondition(
                f"offset {offset} of partition {partition} is before the applied offset {state.applied}",
                reason="out_of_order",
            )
        return state

    def skip(self, partition: int, offset: int) -> None:
        """Marks a record that is not a valid command as applied without changing any key."""
        self._advance(partition, offset).advance(offset)

    def apply(self, partition: int, offset: int, command: Command) -> Result:
        """Applies the command at (partition, offset); offsets must increase per partition.

        Raises FailedPrecondition for an offset already applied and InvalidArgument for a malformed command
        (state unchanged in both cases: the caller `skip`s an invalid record).
        """
        state = self._advance(partition, offset)
        check_command(command, self.limits)
        version = Version(partition, offset)
        if type(command.op) is DigestReport:  # read by the replica; not a write, so no retry to remember
            state.advance(offset)
            return Result(Outcome.APPLIED, version, None)
        previous = state.seen.get(command.command_id)
        if previous is not None:
            state.advance(offset)
            current = state.entries.get(command.key)
            return Result(previous.outcome, previous.version, current.version if current else None)
        result = self._execute(state, command, version)
        state.advance(offset)
        state.seen[command.command_id] = result
        while len(state.seen) > self.dedupe_length:
            state.seen.popitem(last=False)
        return result

    def _execute(self, state: PartitionState, command: Command, version: Version) -> Result:
        key, op = command.key, command.op
        current = state.entries.get(key)
        if isinstance(op, Delete):
            if current is None:
                return Result(Outcome.NOT_FOUND, version, None)
            state.remove(key)
            self._record(state, Change(key, True, b"", "", version))
            return Result(Outcome.APPLIED, version, None)
        if isinstance(op, Cas):
            holds = current is None if op.expect_absent else current is not None and current.version == op.expected
            if not holds:
                return Result(Outcome.CAS_CONFLICT, version, current.version if current else None)
        put = cast(Put | Cas, op)  # apply answered digest reports before
        entry = Entry(key, put.value, put.content_type, version)
        entry.fingerprint = fingerprint(entry)
        # PartitionState.store, inlined: this is the apply path.
        state.entries_sum += entry.fingerprint - (current.fingerprint if current is not None else 0)
        state.entries[key] = entry
        self._record(state, Change(key, False, entry.value, entry.content_type, version))
        return Result(Outcome.APPLIED, version, version)

    def _record(self, state: PartitionState, change: Change) -> None:
        if state.feed.maxlen is not None and len(state.feed) == state.feed.maxlen:
            # The oldest change falls out: Watch can no longer start before the next one.
            state.feed_floor = state.feed[0].version.offset + 1
        state.feed.append(change)

    def get(self, key: str, partition: int) -> Entry | None:
        """The entry of `key` (which lives in `partition`), or None."""
        state = self.partitions.get(partition)
        return state.entries.get(key) if state is not None else None

    def list(self, prefix: str = "") -> list[Entry]:
        """Every entry whose key starts with `prefix`, over all partitions, sorted by key."""
        found = [e for s in self.partitions.values() for k, e in s.entries.items() if k.startswith(prefix)]
        return sorted(found, key=lambda e: e.key)

    def changes(self, partition: int, from_offset: int, prefix: str = "") -> builtins.list[Change]:
        """Changes on `partition` at offsets >= `from_offset` under `prefix`, in log order.

        Costs O(changes returned): the feed is read from its newest end, so a Watch that keeps up pays only for
        what is new. Raises FailedPrecondition when changes from `from_offset` are no longer (or not) in the
        bounded feed.
        """
        state = self.partition(partition)
        if from_offset < state.feed_floor:
            raise FailedPrecondition(
                f"changes before offset {state.feed_floor} of partition {partition} are gone", reason="feed_truncated"
            )
        found: builtins.list[Change] = []
        for change in reversed(state.feed):
            if change.version.offset < from_offset:
                break
            if change.key.startswith(prefix):
                found.append(change)
        found.reverse()
        return found

    def digests(self) -> dict[int, tuple[int, str]]:
        """Per partition: (applied offset, SHA-256 hex digest of its state at that offset)."""
        return {p: (s.applied, s.digest()) for p, s in sorted(self.partitions.items())}
