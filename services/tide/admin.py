"""Operator commands on a Tide deployment: re-seeding a command log that is younger than a replica's snapshot.

A log can lose what replicas applied (the memory-only embedded broker restarted empty, a topic deleted and
recreated). Replicas notice and stop serving (health NOT_SERVING, clisonix_tide_log_behind_snapshot 1); they do
not guess. `reseed` is the explicit repair: it appends one Put per key of a snapshot, so replicas that replay the
log from its start (with their snapshot files removed) rebuild the snapshot's keys and values. Versions are new
log positions: clients must drop remembered versions and caches must reload (they do on FAILED_PRECONDITION).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import OffsetOutOfRangeError
from aiokafka.structs import TopicPartition

from services.common.errors import FailedPrecondition
from services.common.kafka import consumer_options, ensure_topics, kafka_producer
from services.tide import snapshots
from services.tide.codec import command_to_proto
from services.tide.replica import SOURCE
from services.tide.settings import TideSettings
from services.tide.state import Command, Put, TideState

log = logging.getLogger(__name__)

# Namespace of the re-seed command ids: one id per (snapshot, key), so running the same re-seed twice over the
# same log appends duplicates that every replica skips, not new versions.
RESEED_NAMESPACE = uuid.UUID("5b0d4f8e-2a61-4c3e-9a57-0c1f6b7e2d90")


@dataclass(frozen=True)
class ReseedReport:
    keys: int
    # Per partition: the snapshot's applied offset and where the log ended before the re-seed.
    snapshot_applied: dict[int, int]
    log_reached: dict[int, bool]
    seconds: float


async def log_reaches(settings: TideSettings, applied: dict[int, int], timeout_s: float = 5.0) -> dict[int, bool]:
    """Per partition: whether the log holds the record just before `applied` (the snapshot's last applied record).

    Read with a fetch, not from the broker's end offsets (some brokers report those short after batches).
    """
    reached: dict[int, bool] = {}
    consumer = AIOKafkaConsumer(**{**consumer_options(settings, None), "auto_offset_reset": "none"})
    await consumer.start()
    try:
        for partition, offset in sorted(applied.items()):
            reached[partition] = offset == 0 or await _holds(
                consumer, settings.topic_log, partition, offset - 1, timeout_s
            )
    finally:
        await consumer.stop()
    return reached


async def _holds(consumer: AIOKafkaConsumer, topic: str, partition: int, offset: int, timeout_s: float) -> bool:
    tp = TopicPartition(topic, partition)
    consumer.assign([tp])
    consumer.seek(tp, offset)
    deadline = time.monotonic() + timeout_s
    empty_polls = 0
    while time.monotonic() < deadline:
        try:
            batches = await consumer.getmany(tp, timeout_ms=200, max_records=1)
        except OffsetOutOfRangeError:
            return False  # the partition ends before the offset
        records = batches.get(tp, [])
        if any(record.offset == offset for record in records):
            return True
        # Some brokers answer a fetch past the end with no records rather than OFFSET_OUT_OF_RANGE: a few empty
        # polls with the fetch's highwater at or before the offset settle it.
        highwater = consumer.highwater(tp)
        empty_polls = empty_polls + 1 if not records and highwater is not None and highwater <= offset else 0
        if empty_polls >= 3:
            return False
    return False


async def reseed(
    settings: TideSettings,
    snapshot: Path,
    *,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ReseedReport:
    """Appends one Put per key of `snapshot` to settings.topic_log; returns what was done.

    Raises FailedPrecondition when the snapshot cannot be read, or when the log still reaches the snapshot's
    position on every partition (nothing was lost: re-seeding would only add versions) unless `force`.
    progress: called with (keys appended, keys in all) as acknowledgements arrive.
    """
    started = time.monotonic()
    state = TideState(settings.limits(), settings.feed_length, settings.dedupe_length)
    if snapshots.load(snapshot, settings.topic_log, state) is None:
        raise FailedPrecondition(
            f"no usable snapshot of {settings.topic_log} at {snapshot.name}", reason="snapshot_unusable"
        )
    applied = {p: s.applied for p, s in state.partitions.items()}
    if settings.create_topics:
        await ensure_topics(settings, [settings.topic_log])
    reached = await log_reaches(settings, applied)
    if all(reached.values()) and not force:
        raise FailedPrecondition(
            "the log still holds every record the snapshot applied; nothing to re-seed", reason="log_not_behind"
        )
    entries = state.list()
    digest = "".join(sha for _, (_, sha) in sorted(state.digests().items()))
    done = 0
    async with kafka_producer(settings, SOURCE) as producer:
        deliveries = []
        for entry in entries:
            command_id = str(uuid.uuid5(RESEED_NAMESPACE, f"{digest}/{entry.key}"))
            command = Command(command_id, entry.key, Put(entry.value, entry.content_type))
            message = command_to_proto(command)
            delivery = await producer.send(settings.topic_log, entry.key, message, event_id=command_id)
            deliveries.append(delivery)
        for delivery in asyncio.as_completed(deliveries):
            await delivery
            done += 1
            if progress is not None and (done % 1000 == 0 or done == len(entries)):
                progress(done, len(entries))
    log.info("log re-seeded from a snapshot", extra={"fields": {"keys": len(entries), "topic": settings.topic_log}})
    return ReseedReport(len(entries), applied, reached, time.monotonic() - started)


@dataclass(frozen=True)
class ReplicaDigests:
    """One replica's answer to tide-check: its digests at the compared offsets, and its own view of its peers.

    digests: partition -> SHA-256 at the compared offset (a partition whose digest there the replica no longer
    remembers is missing). error: why the replica could not be compared (unreachable, too far behind).
    """

    target: str
    replica: str = ""
    digests: dict[int, str] | None = None
    peers_disagreeing: tuple[str, ...] = ()
    in_minority: bool = False
    error: str | None = None


@dataclass(frozen=True)
class CheckReport:
    """offsets: partition -> the applied offset every replica's digest was taken at. disagreeing: partitions whose
    replicas gave more than one digest there."""

    offsets: dict[int, int]
    replicas: list[ReplicaDigests]
    disagreeing: list[int]

    @property
    def complete(self) -> bool:
        """Every replica answered with a digest for every partition."""
        return all(
            r.error is None and r.digests is not None and set(r.digests) >= set(self.offsets) for r in self.replicas
        )

    @property
    def agree(self) -> bool:
        return self.complete and not self.disagreeing and not any(r.in_minority for r in self.replicas)


async def check_replicas(targets: list[str], token: str | None = None, timeout_s: float = 10.0) -> CheckReport:
    """Compares the replicas' digests at equal offsets: per partition, the furthest offset any replica applied;
    every replica answers its digest there (waiting to reach it, or from its recent history)."""
    import grpc

    from clisonix.tide.v1 import tide_pb2, tide_pb2_grpc

    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    channels = [grpc.aio.insecure_channel(t) for t in targets]
    stubs = [tide_pb2_grpc.TideServiceStub(c) for c in channels]
    errors: dict[str, str] = {}

    async def digest(index: int, request: tide_pb2.DigestRequest) -> tide_pb2.DigestResponse | None:
        try:
            return await stubs[index].Digest(request, metadata=metadata, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            errors[targets[index]] = f"{exc.code().name}: {exc.details()}"
            return None

    try:
        now = await asyncio.gather(*(digest(i, tide_pb2.DigestRequest()) for i in range(len(targets))))
        offsets: dict[int, int] = {}
        for answer in now:
            for d in answer.partitions if answer is not None else ():
                offsets[d.partition] = max(offsets.get(d.partition, 0), d.applied.offset)
        at = [tide_pb2.AppliedOffset(partition=p, offset=o) for p, o in sorted(offsets.items())]
        answers = await asyncio.gather(
            *(digest(i, tide_pb2.DigestRequest(at=at)) for i in range(len(targets)) if now[i] is not None)
        )
    finally:
        for channel in channels:
            await channel.close()
    reached = iter(answers)
    replicas = []
    for target, first in zip(targets, now, strict=True):
        answer = next(reached) if first is not None else None
        if answer is None:
            replicas.append(ReplicaDigests(target, error=errors.get(target, "no answer")))
            continue
        disagreeing = tuple(sorted({c.replica for c in answer.peers if not c.agrees}))
        replicas.append(
            ReplicaDigests(
                target,
                answer.replica,
                {d.partition: d.sha256 for d in answer.partitions},
                disagreeing,
                answer.in_minority,
            )
        )
    disagreeing_partitions = [
        p
        for p in sorted(offsets)
        if len({r.digests[p] for r in replicas if r.digests is not None and p in r.digests}) > 1
    ]
    return CheckReport(offsets, replicas, disagreeing_partitions)
