"""A small async client of the Tide Engine, a local read cache fed by Watch, and typed helpers.

`TideClient` talks to one replica at a time over a grpc.aio channel (targets: one or more replica addresses,
tried in turn when one is unavailable). It remembers, per partition, the highest version it wrote or read
(including how far the answering replica had applied) and sends it as `min_version` / `min_versions` with every
later read, so reads see the client's own writes and never go back in time, even after it moved to another
replica (the replica waits, bounded, until it has applied that far).

Writes carry a client-made command id; on UNAVAILABLE or DEADLINE_EXCEEDED the same request (same command id)
is sent again, at most `attempts` times in all: the replica's command-id dedupe makes the retry answer the first
record's result instead of applying twice.

Errors: a failed call raises the services.common.errors type of its status code (InvalidArgument, NotFound,
FailedPrecondition, ResourceExhausted, Unauthenticated, Unavailable, DeadlineExceeded, ...; other codes raise
the base ClisonixError), with the grpc.aio.AioRpcError chained as `__cause__`. A compare-and-set conflict or a
delete of a missing key is not an error: it is the `outcome` of the returned WriteResult.

`TideCache` keeps every key under a prefix in memory: it loads with List, then Watches from the listed applied
offsets, applies each change in log order (per partition), and after a stream break resumes from the last
position it saw, so no change is lost or applied twice. When the replica no longer holds the changes since
that position (its bounded feed moved on: FAILED_PRECONDITION), the cache reloads with List instead.

Key layout of the helpers (values are JSON, content type "application/json"; every id is a pseudonym made by
ingest, never a raw id, and no id may contain "/"):

    sessions/<session pseudonym>                -> {"subject": <subject pseudonym>, "streams": [<layout>, ...]}
    models/active/<task>                        -> {"model": <name>, "version": <version>}
    calibration/<subject pseudonym>/<modality>  -> <baseline dict>
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import grpc
from aiokafka.partitioner import murmur2

from clisonix.tide.v1 import tide_pb2, tide_pb2_grpc
from services.common import errors
from services.common.settings import ServiceSettings
from services.tide.codec import command_to_proto
from services.tide.state import Change, Command, Entry, Outcome, Version

if TYPE_CHECKING:
    from clisonix.tide.v1.tide_pb2_grpc import TideServiceAsyncStub

log = logging.getLogger(__name__)

JSON = "application/json"
# The one replica `clisonix up` starts (ARCHITECTURE.md default ports).
DEFAULT_TARGET = "127.0.0.1:50054"
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# A prefix no key is expected to have: List with it answers only the replica's applied offsets.
_PROBE_PREFIX = "\x00tide-client-probe\x00"

_ERRORS: dict[grpc.StatusCode, type[errors.ClisonixError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
}

T = TypeVar("T")
Entries = list[Entry]


def domain_error(exc: grpc.aio.AioRpcError) -> errors.ClisonixError:
    """The domain error for a failed call (the base ClisonixError for codes without their own type)."""
    code = exc.code()
    kind = _ERRORS.get(code, errors.ClisonixError)
    return kind(f"tide {code.name}: {exc.details()}", reason=f"tide_{code.name.lower()}")


@dataclass(frozen=True)
class WriteResult:
    """The answer to a put, compare-and-set or delete.

    version: where the command sits in the log. key_version: the key's version after it (None when the key does
    not exist: after a delete, or a conflict on a missing key).
    """

    outcome: Outcome
    version: Version
    key_version: Version | None
    command_id: str

    @property
    def applied(self) -> bool:
        return self.outcome == Outcome.APPLIED


def _version(message: tide_pb2.Version) -> Version:
    return Version(message.partition, message.offset)


def _entry(message: tide_pb2.Entry) -> Entry:
    return Entry(message.key, message.value, message.content_type, _version(message.version))


class TideClient:
    """An async TideService client with remembered versions and idempotent write retries.

    targets: replica addresses ("host:port"); the client uses one and moves to the next after UNAVAILABLE.
    token: bearer token sent as `authorization: Bearer <token>` (the replicas' auth_token).
    versions: versions to start from (e.g. another client's `versions`), so its reads are at least that new.
    attempts: sends of one request in all (>= 1) on UNAVAILABLE / DEADLINE_EXCEEDED; timeout_s: per send.
    """

    def __init__(
        self,
        targets: str | Sequence[str],
        *,
        token: str | None = None,
        versions: Sequence[Version] = (),
        attempts: int = 3,
        timeout_s: float = 10.0,
        backoff_s: float = 0.05,
    ) -> None:
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        if not self.targets:
            raise ValueError("at least one target is needed")
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self.attempts = attempts
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self._seen: dict[int, int] = {}
        for version in versions:
            self.remember(version)
        self._target = 0
        self._channel: grpc.aio.Channel | None = None
        self._stub: TideServiceAsyncStub | None = None
        self._partitions: list[int] | None = None

    # -- connection ---------------------------------------------------------------------------------------------

    @property
    def target(self) -> str:
        """The address in use."""
        return self.targets[self._target]

    @property
    def stub(self) -> TideServiceAsyncStub:
        """The stub of the current channel (opened on first use)."""
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self.target)
            self._stub = cast("TideServiceAsyncStub", tide_pb2_grpc.TideServiceStub(self._channel))
        return self._stub

    async def connect(self, target: str | None = None) -> None:
        """Closes the channel and uses `target` (default: the next of `targets`); remembered versions stay."""
        await self._close_channel()
        if target is None:
            self._target = (self._target + 1) % len(self.targets)
        else:
            if target not in self.targets:
                self.targets.append(target)
            self._target = self.targets.index(target)

    async def _close_channel(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        await self._close_channel()

    async def __aenter__(self) -> TideClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- remembered versions ------------------------------------------------------------------------------------

    @property
    def versions(self) -> list[Version]:
        """The highest version seen per partition (what reads wait for)."""
        return [Version(p, offset) for p, offset in sorted(self._seen.items())]

    def remember(self, version: Version) -> None:
        if version.offset >= 0 and version.offset > self._seen.get(version.partition, -1):
            self._seen[version.partition] = version.offset

    def _remember_applied(self, applied: tide_pb2.AppliedOffset) -> None:
        if applied.offset > 0:  # the next offset to apply: the replica had applied everything before it
            self.remember(Version(applied.partition, applied.offset - 1))

    # -- calls --------------------------------------------------------------------------------------------------

    async def _call(self, send: Callable[[TideServiceAsyncStub], Awaitable[T]]) -> T:
        for attempt in range(1, self.attempts + 1):
            try:
                return await send(self.stub)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE or attempt == self.attempts:
                    raise domain_error(exc) from exc
                if exc.code() == grpc.StatusCode.UNAVAILABLE and len(self.targets) > 1:
                    await self.connect()
                log.info("tide call retried", extra={"fields": {"code": exc.code().name, "attempt": attempt}})
                await asyncio.sleep(self.backoff_s * attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _partition_ids(self) -> list[int]:
        """The log's partitions, sorted, learnt from the first List answer (a probe List when none came yet)."""
        if self._partitions is None:
            response = await self._call(
                lambda s: s.List(
                    tide_pb2.ListRequest(prefix=_PROBE_PREFIX), metadata=self.metadata, timeout=self.timeout_s
                )
            )
            self._partitions = sorted(a.partition for a in response.applied)
            for applied in response.applied:
                self._remember_applied(applied)
        return self._partitions

    async def _partition_of(self, key: str) -> int:
        """The key's partition, computed as the replicas do (Replica.partition_for: murmur2 over the partitions)."""
        partitions = await self._partition_ids()
        return partitions[(murmur2(key.encode("utf-8")) & 0x7FFFFFFF) % len(partitions)]

    async def get(self, key: str) -> Entry | None:
        """The key's entry, or None; at least as new as anything this client wrote or read on its partition."""
        request = tide_pb2.GetRequest(key=key)
        partition = await self._partition_of(key)
        seen = self._seen.get(partition)
        if seen is not None:
            request.min_version.CopyFrom(tide_pb2.Version(partition=partition, offset=seen))
        response = await self._call(lambda s: s.Get(request, metadata=self.metadata, timeout=self.timeout_s))
        self._remember_applied(response.applied)
        if response.outcome != tide_pb2.OUTCOME_APPLIED:
            return None
        entry = _entry(response.entry)
        self.remember(entry.version)
        return entry

    async def list(self, prefix: str = "") -> Entries:
        """Every entry under `prefix`, sorted by key, at least as new as this client's remembered versions."""
        entries, _ = await self.list_with_applied(prefix)
        return entries

    async def list_with_applied(self, prefix: str = "") -> tuple[Entries, dict[int, int]]:
        """list() and the replica's applied offset per partition (next offset to apply) when it answered."""
        request = tide_pb2.ListRequest(
            prefix=prefix,
            min_versions=[tide_pb2.Version(partition=v.partition, offset=v.offset) for v in self.versions],
        )
        response = await self._call(lambda s: s.List(request, metadata=self.metadata, timeout=self.timeout_s))
        self._partitions = sorted(a.partition for a in response.applied)
        for applied in response.applied:
            self._remember_applied(applied)
        return [_entry(e) for e in response.entries], {a.partition: a.offset for a in response.applied}

    async def _write(self, send: Callable[[TideServiceAsyncStub], Awaitable[Any]]) -> WriteResult:
        return self._result(await self._call(send))

    def _result(self, response: tide_pb2.WriteResponse) -> WriteResult:
        version = _version(response.version)
        key_version = _version(response.key_version) if response.HasField("key_version") else None
        self.remember(version)
        self._remember_applied(response.applied)
        return WriteResult(Outcome(response.outcome), version, key_version, response.command_id)

    async def put(
        self, key: str, value: bytes, content_type: str = "", *, command_id: str | None = None
    ) -> WriteResult:
        request = tide_pb2.PutRequest(
            key=key, value=value, content_type=content_type, command_id=command_id or uuid.uuid4().hex
        )
        return await self._write(lambda s: s.Put(request, metadata=self.metadata, timeout=self.timeout_s))

    async def compare_and_set(
        self,
        key: str,
        value: bytes,
        content_type: str = "",
        *,
        expected: Version | None = None,
        expect_absent: bool = False,
        command_id: str | None = None,
    ) -> WriteResult:
        """Writes only if the key's version is `expected` (or, with expect_absent, the key does not exist).

        A conflict is the result's outcome (Outcome.CAS_CONFLICT, key_version: the key's actual version).
        """
        if (expected is None) == (not expect_absent):
            raise errors.InvalidArgument("give exactly one of expected and expect_absent", reason="bad_cas")
        request = tide_pb2.CompareAndSetRequest(
            key=key,
            value=value,
            content_type=content_type,
            expect_absent=expect_absent,
            command_id=command_id or uuid.uuid4().hex,
        )
        if expected is not None:
            request.expected.CopyFrom(tide_pb2.Version(partition=expected.partition, offset=expected.offset))
        return await self._write(lambda s: s.CompareAndSet(request, metadata=self.metadata, timeout=self.timeout_s))

    async def delete(self, key: str, *, command_id: str | None = None) -> WriteResult:
        """Removes the key; Outcome.NOT_FOUND when it did not exist."""
        request = tide_pb2.DeleteRequest(key=key, command_id=command_id or uuid.uuid4().hex)
        return await self._write(lambda s: s.Delete(request, metadata=self.metadata, timeout=self.timeout_s))

    async def batch_write(self, commands: Sequence[Command]) -> builtins.list[WriteResult]:
        """Several writes in one call (services.tide.state commands: Put, Cas or Delete ops), each applied on its
        own, answered in order. A retry resends the same command ids, so a command is applied at most once."""
        request = tide_pb2.BatchWriteRequest(
            commands=[command_to_proto(Command(c.command_id or uuid.uuid4().hex, c.key, c.op)) for c in commands]
        )
        response = await self._call(lambda s: s.BatchWrite(request, metadata=self.metadata, timeout=self.timeout_s))
        return [self._result(result) for result in response.results]

    def watch(
        self, prefix: str, from_versions: Sequence[Version] = ()
    ) -> grpc.aio.UnaryStreamCall[tide_pb2.WatchRequest, tide_pb2.Change]:
        """The raw Watch call (iterate it for tide_pb2.Change; cancel it when done). TideCache handles breaks."""
        request = tide_pb2.WatchRequest(
            prefix=prefix,
            from_versions=[tide_pb2.Version(partition=v.partition, offset=v.offset) for v in from_versions],
        )
        return self.stub.Watch(request, metadata=self.metadata)


class TideCache:
    """Every key under `prefix`, kept current by Watch. `await start()` (or `async with`), then read locally.

    on_change: called with every change applied to the cache, in log order per partition, exactly once
    (not for the entries of a (re)load with List).
    """

    def __init__(
        self,
        client: TideClient,
        prefix: str,
        *,
        on_change: Callable[[Change], None] | None = None,
        retry_delay_s: float = 0.1,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.on_change = on_change
        self.retry_delay_s = retry_delay_s
        self._entries: dict[str, Entry] = {}
        # Per partition: the next offset whose change this cache has not applied yet.
        self._cursor: dict[int, int] = {}
        self._advanced = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._call: grpc.aio.UnaryStreamCall[tide_pb2.WatchRequest, tide_pb2.Change] | None = None
        self._closing = False
        self.reconnects = 0
        self.reloads = 0

    def get(self, key: str) -> Entry | None:
        return self._entries.get(key)

    def items(self) -> list[tuple[str, Entry]]:
        """The cached entries sorted by key."""
        return sorted(self._entries.items())

    def position(self) -> list[Version]:
        """Per partition, the next offset the cache will apply."""
        return [Version(p, offset) for p, offset in sorted(self._cursor.items())]

    def reached(self, version: Version) -> bool:
        return self._cursor.get(version.partition, 0) > version.offset

    async def wait_for_version(self, version: Version, timeout_s: float = 5.0) -> None:
        """Waits until the cache has applied `version` (e.g. a WriteResult.version of an applied write under the
        prefix); raises DeadlineExceeded after `timeout_s`. A version that makes no change under the prefix
        (another prefix, a conflict) is reached only once a later change of that partition arrives."""
        try:
            async with asyncio.timeout(timeout_s), self._advanced:
                await self._advanced.wait_for(lambda: self.reached(version))
        except TimeoutError as exc:
            raise errors.DeadlineExceeded(f"cache has not reached {version}", reason="cache_version") from exc

    async def start(self) -> None:
        """Loads the prefix and starts following changes."""
        await self._load()
        self._task = asyncio.create_task(self._follow(), name=f"tide-cache:{self.prefix}")

    async def _load(self) -> None:
        entries, applied = await self.client.list_with_applied(self.prefix)
        self._entries = {e.key: e for e in entries}
        async with self._advanced:
            self._cursor = {p: max(offset, self._cursor.get(p, 0)) for p, offset in applied.items()}
            self._advanced.notify_all()

    async def _follow(self) -> None:
        while not self._closing:
            try:
                self._call = self.client.watch(self.prefix, self.position())
                async for message in self._call:
                    await self._apply(message)
                # The server ended the stream (it is shutting down): resume elsewhere.
                await self.client.connect()
            except grpc.aio.AioRpcError as exc:
                if self._closing:
                    return
                self.reconnects += 1
                log.info("tide watch broke", extra={"fields": {"code": exc.code().name, "prefix": self.prefix}})
                try:
                    if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                        self.reloads += 1
                        await self._load()  # the replica's feed no longer holds our position
                        continue
                    if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                        await self.client.connect()
                except errors.ClisonixError as reload_error:
                    log.info("tide cache reload failed", extra={"fields": {"error": str(reload_error)}})
                await asyncio.sleep(self.retry_delay_s)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._closing or (task is not None and task.cancelling()):
                    raise
                # Only the Watch call was cancelled (break_stream): resume from the position on the same target.
                self.reconnects += 1

    async def _apply(self, message: tide_pb2.Change) -> None:
        version = _version(message.version)
        if version.offset < self._cursor.get(version.partition, 0):
            return  # already applied (never expected: Watch starts at our cursor)
        change = Change(message.key, message.deleted, message.value, message.content_type, version)
        if change.deleted:
            self._entries.pop(change.key, None)
        else:
            self._entries[change.key] = Entry(change.key, change.value, change.content_type, version)
        self.client.remember(version)
        async with self._advanced:
            self._cursor[version.partition] = version.offset + 1
            self._advanced.notify_all()
        if self.on_change is not None:
            try:
                self.on_change(change)
            except Exception:  # a faulty callback must not stop the cache from following
                log.exception("tide cache on_change failed")

    def break_stream(self) -> None:
        """Cancels the current Watch call (it resumes from the cache's position); for tests and operators."""
        if self._call is not None:
            self._call.cancel()

    async def close(self) -> None:
        self._closing = True
        if self._call is not None:
            self._call.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def __aenter__(self) -> TideCache:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def client_from_settings(settings: ServiceSettings, **options: Any) -> TideClient | None:
    """A client of the replicas in settings.tide_targets, or None when the service runs without Tide."""
    targets = [t.strip() for t in settings.tide_targets.split(",") if t.strip()]
    if not targets:
        return None
    token = settings.tide_token.get_secret_value() if settings.tide_token is not None else None
    return TideClient(targets, token=token, **options)


def targets_from_env() -> tuple[list[str], str | None]:
    """For command-line tools: the replicas (CLISONIX_TIDE_TARGETS, else the default local one) and the token
    (CLISONIX_TIDE_TOKEN)."""
    settings = ServiceSettings()
    targets = [t.strip() for t in settings.tide_targets.split(",") if t.strip()] or [DEFAULT_TARGET]
    token = settings.tide_token.get_secret_value() if settings.tide_token is not None else None
    return targets, token


# -- typed helpers --------------------------------------------------------------------------------------------


def _segment(name: str, value: str) -> str:
    if not value or "/" in value:
        raise errors.InvalidArgument(f"{name} must be non-empty and contain no '/'", reason=f"bad_{name}")
    return value


def encode_json(value: Any) -> bytes:
    """The JSON bytes the typed helpers store (content type JSON): sorted keys, no spaces, so equal values give
    equal bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")


def decode_json(entry: Entry | None) -> Any:
    """The value of a JSON entry (None for no entry); FailedPrecondition when the entry holds something else."""
    if entry is None:
        return None
    if entry.content_type != JSON:
        raise errors.FailedPrecondition(f"{entry.key} holds {entry.content_type!r}, not JSON", reason="not_json")
    return json.loads(entry.value)


def session_key(session: str) -> str:
    return f"sessions/{_segment('session', session)}"


def active_model_key(task: str) -> str:
    return f"models/active/{_segment('task', task)}"


def calibration_key(subject: str, modality: str) -> str:
    return f"calibration/{_segment('subject', subject)}/{_segment('modality', modality)}"


@dataclass(frozen=True)
class SessionRecord:
    subject: str
    streams: list[dict[str, Any]]


@dataclass(frozen=True)
class ActiveModel:
    model: str
    version: str


async def put_session(client: TideClient, session: str, subject: str, streams: list[dict[str, Any]]) -> WriteResult:
    """Registers a session (pseudonyms only) with its stream layouts."""
    return await client.put(session_key(session), encode_json({"subject": subject, "streams": streams}), JSON)


async def add_session_streams(
    client: TideClient, session: str, subject: str, streams: Sequence[dict[str, Any]], *, attempts: int = 10
) -> WriteResult | None:
    """Adds `streams` (layouts with a "stream_id") to the session's record, keeping the streams other writers
    registered: read, merge, compare-and-set on the version read, again on a conflict. Returns the applied write,
    or None when every stream was already there. Raises Aborted after `attempts` conflicts in a row."""
    key = session_key(session)
    for _ in range(attempts):
        entry = await client.get(key)
        record = decode_json(entry) or {"subject": subject, "streams": []}
        known = {s["stream_id"] for s in record["streams"]}
        added = [s for s in streams if s["stream_id"] not in known]
        if not added:
            return None
        record["streams"] = sorted([*record["streams"], *added], key=lambda s: str(s["stream_id"]))
        record["subject"] = record.get("subject") or subject
        if entry is None:
            result = await client.compare_and_set(key, encode_json(record), JSON, expect_absent=True)
        else:
            result = await client.compare_and_set(key, encode_json(record), JSON, expected=entry.version)
        if result.applied:
            return result
    raise errors.Aborted(f"session record kept changing over {attempts} attempts", reason="cas_contention")


async def get_session(client: TideClient, session: str) -> SessionRecord | None:
    data = decode_json(await client.get(session_key(session)))
    return None if data is None else SessionRecord(data["subject"], data["streams"])


async def set_active_model(client: TideClient, task: str, model: str, version: str) -> WriteResult:
    return await client.put(active_model_key(task), encode_json({"model": model, "version": version}), JSON)


async def get_active_model(client: TideClient, task: str) -> ActiveModel | None:
    data = decode_json(await client.get(active_model_key(task)))
    return None if data is None else ActiveModel(data["model"], str(data["version"]))


async def put_calibration(client: TideClient, subject: str, modality: str, baseline: dict[str, Any]) -> WriteResult:
    return await client.put(calibration_key(subject, modality), encode_json(baseline), JSON)


async def get_calibration(client: TideClient, subject: str, modality: str) -> dict[str, Any] | None:
    data = decode_json(await client.get(calibration_key(subject, modality)))
    return None if data is None else dict(data)
