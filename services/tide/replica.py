"""A Tide replica: applies every partition of the command log in order and answers writes and reads.

No consumer group: the replica assigns itself every partition and keeps its own positions (its applied
offsets, snapshotted to local disk). A write appends a Command and returns once this replica applied it
(matched by command id), so the answer is the outcome every replica computes for that record.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.errors import OffsetOutOfRangeError
from aiokafka.partitioner import murmur2
from aiokafka.structs import RecordMetadata, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from clisonix.tide.v1 import tide_pb2
from services.common.errors import ClisonixError, DeadlineExceeded, FailedPrecondition, InvalidArgument, Unavailable
from services.common.events import UndecodableEvent, event_headers, parse_event
from services.common.kafka import EventProducer
from services.common.metrics import LATENCY_BUCKETS, PREFIX, ServiceMetrics
from services.tide import snapshots
from services.tide.agreement import Check, PeerAgreement
from services.tide.codec import command_from_proto, command_to_proto
from services.tide.gaps import OffsetGaps
from services.tide.settings import TideSettings
from services.tide.state import (
    Change,
    Command,
    DigestReport,
    Outcome,
    Result,
    TideState,
    Version,
    check_command,
)

log = logging.getLogger(__name__)

SOURCE = "//clisonix/tide"
OUTCOME_LABELS = {outcome: outcome.name.lower() for outcome in Outcome}
# Pause before reading a partition again from a hole in its offsets.
GAP_RETRY_SECONDS = 0.002


@dataclass(frozen=True)
class TideMetrics:
    """Tide's own metrics. The `partition` label is bounded: the command log has a fixed, small partition count.

    applied_offset{partition}: the next offset to apply. digest_prefix{partition}: the first 48 bits of the
    partition's state digest (equal offsets must show equal values across replicas). log_behind_snapshot: 1
    when the log is younger than this replica's state (broker restarted empty, topic recreated).
    commands_total{outcome}: commands applied, by outcome (applied, cas_conflict, not_found, invalid, duplicate).
    lag_records{partition}: records in the log (fetch highwater) not applied here yet.
    apply_seconds: applying one fetched batch of records. write_latency_seconds: a write appended -> applied here.
    snapshot_age_seconds, snapshot_bytes: since the last snapshot was written, and its size.
    log_gaps_total{result}: holes in a partition's offsets found while reading (a record not readable yet):
    filled (read once it arrived) or skipped (a hole in the log itself). log_gap_seconds: how long one waited.
    digest_checks_total{result}: other replicas' digest reports compared with this replica's digest at the same
    offset: agree, disagree, or unknown (the offset is no longer, or not, in this replica's history).
    peers_disagreeing: replicas whose latest reports disagree with this one. in_minority: 1 while this replica
    disagrees with at least as many replicas as agree with it (it then serves nothing).
    """

    applied_offset: Gauge
    digest_prefix: Gauge
    log_behind_snapshot: Gauge
    commands_total: Counter
    snapshots_total: Counter
    lag_records: Gauge
    apply_seconds: Histogram
    write_latency_seconds: Histogram
    snapshot_age_seconds: Gauge
    snapshot_bytes: Gauge
    log_gaps_total: Counter
    log_gap_seconds: Histogram
    digest_checks_total: Counter
    peers_disagreeing: Gauge
    in_minority: Gauge

    @classmethod
    def create(cls, metrics: ServiceMetrics) -> TideMetrics:
        created = cls._build(metrics.registry)
        for result in ("filled", "skipped"):  # shown as 0 before the first hole
            created.log_gaps_total.labels(result)
        for result in ("agree", "disagree", "unknown"):
            created.digest_checks_total.labels(result)
        return created

    @classmethod
    def _build(cls, registry: CollectorRegistry) -> TideMetrics:
        return cls(
            applied_offset=Gauge(
                f"{PREFIX}_tide_applied_offset", "Next command-log offset to apply", ["partition"], registry=registry
            ),
            digest_prefix=Gauge(
                f"{PREFIX}_tide_digest_prefix", "First 48 bits of the state digest", ["partition"], registry=registry
            ),
            log_behind_snapshot=Gauge(
                f"{PREFIX}_tide_log_behind_snapshot", "1 when the log is younger than the state", registry=registry
            ),
            commands_total=Counter(
                f"{PREFIX}_tide_commands", "Commands applied by outcome", ["outcome"], registry=registry
            ),
            snapshots_total=Counter(f"{PREFIX}_tide_snapshots", "Snapshots written", registry=registry),
            lag_records=Gauge(
                f"{PREFIX}_tide_lag_records", "Log records not applied here yet", ["partition"], registry=registry
            ),
            apply_seconds=Histogram(
                f"{PREFIX}_tide_apply_seconds", "Applying one fetched batch", buckets=LATENCY_BUCKETS, registry=registry
            ),
            write_latency_seconds=Histogram(
                f"{PREFIX}_tide_write_latency_seconds",
                "A write appended to the log -> applied by this replica",
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            snapshot_age_seconds=Gauge(
                f"{PREFIX}_tide_snapshot_age_seconds", "Seconds since the last snapshot was written", registry=registry
            ),
            snapshot_bytes=Gauge(f"{PREFIX}_tide_snapshot_bytes", "Size of the last snapshot", registry=registry),
            log_gaps_total=Counter(
                f"{PREFIX}_tide_log_gaps",
                "Holes found in a partition's offsets, by result",
                ["result"],
                registry=registry,
            ),
            log_gap_seconds=Histogram(
                f"{PREFIX}_tide_log_gap_seconds",
                "A hole found in the offsets -> the missing record read",
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            digest_checks_total=Counter(
                f"{PREFIX}_tide_digest_checks",
                "Other replicas' digest reports compared with this replica's digest at the same offset, by result",
                ["result"],
                registry=registry,
            ),
            peers_disagreeing=Gauge(
                f"{PREFIX}_tide_peers_disagreeing",
                "Replicas whose latest digest reports disagree with this replica's state",
                registry=registry,
            ),
            in_minority=Gauge(
                f"{PREFIX}_tide_in_minority",
                "1 while this replica's state disagrees with at least as many replicas as agree with it",
                registry=registry,
            ),
        )


class PendingWrites:
    """One write call's commands waiting to be applied here: `done` resolves with their results, in order, once
    the last one was applied (one future per call, not per command: a batch may hold a thousand)."""

    def __init__(self, count: int) -> None:
        self.results: list[Result | None] = [None] * count
        self.missing = count
        self.done: asyncio.Future[list[Result]] = asyncio.get_running_loop().create_future()

    def resolve(self, index: int, result: Result) -> None:
        if self.results[index] is None:
            self.results[index] = result
            self.missing -= 1
            if self.missing == 0 and not self.done.done():
                self.done.set_result(cast(list[Result], self.results))


class Replica:
    """The state, the consumer that feeds it, and the producer that appends commands.

    consumer: a started AIOKafkaConsumer with no group and auto_offset_reset="none" (an out-of-range position
    must be noticed, never silently reset). producer: appends commands.
    """

    def __init__(
        self,
        settings: TideSettings,
        consumer: AIOKafkaConsumer,
        producer: EventProducer,
        metrics: TideMetrics,
        state: TideState | None = None,
    ) -> None:
        self.settings = settings
        self.consumer = consumer
        self.producer = producer
        self.metrics = metrics
        self.state = state or TideState(
            settings.limits(), settings.feed_length, settings.dedupe_length, settings.digest_history
        )
        self.replica_id = settings.resolved_replica_id()
        self.partitions: list[int] = []
        # command id -> the pending write calls (and the command's place in each) waiting for its record here.
        self._waiters: dict[str, list[tuple[PendingWrites, int]]] = {}
        self._applied = asyncio.Condition()
        # Set when the log is behind the state: the replica stops applying and reports it.
        self.diverged: str | None = None
        self.diverged_event = asyncio.Event()
        self.ready = asyncio.Event()
        self._snapshot_at: float | None = None  # monotonic time of the last snapshot written
        # Partitions whose log provably reaches this replica's position: nothing was applied before this run, or
        # this run has read records from the log there. Only the others are checked against the highwater.
        self._log_reaches: set[int] = set()
        self._gaps = OffsetGaps(settings.log_gap_wait_seconds)
        # Agreement with the other replicas' digest reports; set `health_changed` when in_minority flips.
        self.agreement = PeerAgreement()
        self.in_minority = False
        self.health_changed = asyncio.Event()
        # partition -> commands (not digest reports) applied since this replica last reported its digest there
        self._unreported: dict[int, int] = {}
        self._disagreeing: set[tuple[str, int]] = set()  # (peer, partition) whose latest report disagreed

    async def assign(self, timeout_s: float = 30.0) -> None:
        """Assigns every partition of the log and seeks each to the state's applied offset."""
        topic = self.settings.topic_log
        deadline = time.monotonic() + timeout_s
        while True:
            await self.consumer.topics()  # refreshes metadata
            found = self.consumer.partitions_for_topic(topic)
            if found:
                break
            if time.monotonic() > deadline:
                raise Unavailable(f"topic {topic} has no partitions", reason="no_topic")
            await asyncio.sleep(0.1)
        self.partitions = sorted(found)
        tps = [TopicPartition(topic, p) for p in self.partitions]
        self.consumer.assign(tps)
        for tp in tps:
            self.consumer.seek(tp, self.state.partition(tp.partition).applied)
        self._log_reaches = {p for p in self.partitions if self.state.applied(p) == 0}
        self.ready.set()

    def partition_for(self, key: str) -> int:
        """The partition of `key`: Kafka's default partitioner (murmur2), which the producer is told explicitly."""
        if not self.partitions:
            raise Unavailable("replica not ready", reason="not_ready")
        return self.partitions[(murmur2(key.encode("utf-8")) & 0x7FFFFFFF) % len(self.partitions)]

    async def run(self, stop: asyncio.Event) -> None:
        """Applies records until `stop` is set."""
        while not stop.is_set():
            if self.diverged is not None:
                await stop.wait()
                return
            try:
                batches = await self.consumer.getmany(timeout_ms=100, max_records=1000)
            except OffsetOutOfRangeError as exc:
                self._diverge(f"applied offsets are past the log's end: {exc}")
                continue
            started = time.perf_counter()
            outcomes: collections.Counter[str] = collections.Counter()
            waiting_for_gap = False
            for tp, records in sorted(batches.items(), key=lambda item: item[0].partition):
                contiguous = self._contiguous(tp, records)
                waiting_for_gap |= len(contiguous) < len(records)
                for record in contiguous:
                    outcomes[self._apply(record)] += 1
                if contiguous:
                    self._log_reaches.add(tp.partition)
                self.metrics.applied_offset.labels(str(tp.partition)).set(self.state.applied(tp.partition))
            if waiting_for_gap:
                # The missing record is usually written within a millisecond: re-read soon, not in a hot loop.
                await asyncio.sleep(GAP_RETRY_SECONDS)
            if batches:
                # Counted per batch: a labelled counter costs more than applying a record.
                for outcome, count in outcomes.items():
                    self.metrics.commands_total.labels(outcome).inc(count)
                self.metrics.apply_seconds.observe(time.perf_counter() - started)
                async with self._applied:
                    self._applied.notify_all()
            self._check_highwater()

    def _contiguous(self, tp: TopicPartition, records: list[ConsumerRecord]) -> list[ConsumerRecord]:
        """The records to apply now: those before the first hole in the offsets (services.tide.gaps); the
        partition is then read again from the hole."""
        p = tp.partition
        decision = self._gaps.decide(p, self.state.applied(p), [r.offset for r in records], time.monotonic())
        if decision.filled_after_s is not None:
            self.metrics.log_gaps_total.labels("filled").inc()
            self.metrics.log_gap_seconds.observe(decision.filled_after_s)
        if decision.skipped is not None:
            self.metrics.log_gaps_total.labels("skipped").inc()
            first, last = decision.skipped
            log.error(
                "command log has a hole that did not fill: offsets skipped",
                extra={"fields": {"partition": p, "first": first, "last": last}},
            )
        if decision.reread_from is not None:
            self.consumer.seek(tp, decision.reread_from)  # drops what was fetched past the hole
        return records[: decision.apply]

    def _check_highwater(self) -> None:
        for p in self.partitions:
            highwater = self.consumer.highwater(TopicPartition(self.settings.topic_log, p))
            if highwater is not None:
                self.metrics.lag_records.labels(str(p)).set(max(0, highwater - self.state.applied(p)))
            # The embedded broker can report a highwater a few records short after multi-record batches: once this
            # run has read records from the log at its position, a short highwater is not a younger log (a log
            # recreated under a running replica shows as OffsetOutOfRange on the next fetch instead).
            if highwater is not None and highwater < self.state.applied(p) and p not in self._log_reaches:
                self._diverge(f"partition {p} ends at {highwater}, before the applied offset {self.state.applied(p)}")

    def _diverge(self, why: str) -> None:
        if self.diverged is None:
            self.diverged = why
            self.diverged_event.set()
            self.metrics.log_behind_snapshot.set(1)
            log.error("command log is younger than the replica's state", extra={"fields": {"detail": why}})

    def _apply(self, record: ConsumerRecord) -> str:
        """Applies one record; returns its outcome label for commands_total."""
        p, offset = record.partition, record.offset
        if offset < self.state.applied(p):
            self._diverge(f"record at offset {offset} of partition {p} was already applied")
            return "out_of_order"
        try:
            message = parse_event(tide_pb2.Command, record.value, record.headers)
            command = command_from_proto(message)
            result = self.state.apply(p, offset, command)
        except (UndecodableEvent, ClisonixError) as exc:
            self.state.skip(p, offset)
            self._unreported[p] = self._unreported.get(p, 0) + 1  # a skip changes the state's offset too
            log.warning("command skipped", extra={"fields": {"partition": p, "offset": offset, "error": str(exc)}})
            return "invalid"
        if isinstance(command.op, DigestReport):
            self._compare(p, command.op)
            return "digest_report"
        self._unreported[p] = self._unreported.get(p, 0) + 1
        waiting = self._waiters.pop(command.command_id, None)
        if waiting is not None:
            for pending, index in waiting:
                pending.resolve(index, result)
        if result.version.offset != offset or result.version.partition != p:
            return "duplicate"
        return OUTCOME_LABELS[result.outcome]

    def _compare(self, partition: int, report: DigestReport) -> None:
        """Compares another replica's reported digest with this replica's own at the same applied offset."""
        if report.replica == self.replica_id:
            return
        own = self.state.partition(partition).digest_at(report.applied)
        if own is None:
            self.metrics.digest_checks_total.labels("unknown").inc()
            return
        agrees = own == report.sha256
        self.metrics.digest_checks_total.labels("agree" if agrees else "disagree").inc()
        key = (report.replica, partition)
        if not agrees and key not in self._disagreeing:
            log.error(
                "replica states differ at equal offsets: this replica's digest is not the other replica's",
                extra={
                    "fields": {
                        "peer": report.replica,
                        "partition": partition,
                        "offset": report.applied,
                        "digest": own[:12],
                        "peer_digest": report.sha256[:12],
                    }
                },
            )
        if agrees:
            self._disagreeing.discard(key)
        else:
            self._disagreeing.add(key)
        self.agreement.record(Check(report.replica, partition, report.applied, agrees, time.monotonic()))
        self.evaluate_agreement()

    def evaluate_agreement(self) -> None:
        """Updates the agreement gauges and in_minority (logged, and signalled through health_changed)."""
        verdict = self.agreement.verdict()
        self.metrics.peers_disagreeing.set(len(verdict.disagreeing))
        if verdict.in_minority == self.in_minority:
            return
        self.in_minority = verdict.in_minority
        self.metrics.in_minority.set(int(verdict.in_minority))
        self.health_changed.set()
        fields = {"agreeing": list(verdict.agreeing), "disagreeing": list(verdict.disagreeing)}
        if verdict.in_minority:
            log.error(
                "this replica's state disagrees with the other replicas': NOT_SERVING until they agree again "
                "(restart it without its snapshot to rebuild its state from the log)",
                extra={"fields": fields},
            )
        else:
            log.warning("this replica's state agrees with the other replicas' again: serving", extra={"fields": fields})

    def ensure_serving(self) -> None:
        """Raises Unavailable while this replica's state disagrees with the other replicas'."""
        if self.in_minority:
            raise Unavailable("this replica's state disagrees with the other replicas'", reason="state_disagrees")

    async def write(self, command: Command) -> Result:
        """Appends `command` and returns its result once this replica applied it.

        Raises DeadlineExceeded after settings.write_timeout_seconds (the outcome is then unknown: retry with the
        same command id, which answers the first record's result).
        """
        return (await self.write_many([command]))[0]

    async def write_many(self, commands: list[Command]) -> list[Result]:
        """Appends every command (one record each, sent together so the producer batches them) and returns their
        results, in order, once this replica applied them all.

        Raises InvalidArgument naming the first malformed command before anything is appended, and
        DeadlineExceeded as `write` does (some commands may then have been applied: retry with the same ids).
        """
        if self.diverged is not None:
            raise Unavailable("replica's state is ahead of the log", reason="log_behind_snapshot")
        self.ensure_serving()
        if len(commands) > self.settings.max_batch_commands:
            raise InvalidArgument(
                f"{len(commands)} commands in one batch, over {self.settings.max_batch_commands}",
                reason="batch_too_large",
            )
        for index, command in enumerate(commands):
            try:
                check_command(command, self.state.limits)
            except InvalidArgument as exc:
                detail = f"command {index}: {exc}" if len(commands) > 1 else str(exc)
                raise InvalidArgument(detail, reason=exc.reason) from exc
        pending = PendingWrites(len(commands))
        for index, command in enumerate(commands):
            self._waiters.setdefault(command.command_id, []).append((pending, index))
        try:
            async with asyncio.timeout(self.settings.write_timeout_seconds):
                appended = time.perf_counter()
                deliveries = await self._append(commands)
                await asyncio.gather(*deliveries)
                results = await pending.done
                latency = time.perf_counter() - appended
                for _ in results:
                    self.metrics.write_latency_seconds.observe(latency)
                return results
        except TimeoutError as exc:
            raise DeadlineExceeded(
                "write not applied in time; retry with the same command_id", reason="write_timeout"
            ) from exc
        finally:
            for index, command in enumerate(commands):
                waiting = self._waiters.get(command.command_id)
                if waiting is not None and (pending, index) in waiting:
                    waiting.remove((pending, index))
                    if not waiting:
                        del self._waiters[command.command_id]

    async def _append(self, commands: list[Command]) -> list[asyncio.Future[RecordMetadata]]:
        """Queues the commands' records, one producer batch per partition (split where a batch is full), so a
        write call costs one produce request per partition rather than one per command; the futures resolve
        once the log acknowledged each batch. Commands keep their order within a partition."""
        by_partition: dict[int, list[Command]] = {}
        for command in commands:
            by_partition.setdefault(self.partition_for(command.key), []).append(command)
        deliveries = []
        for partition, queued in by_partition.items():
            deliveries.extend(await self._append_to(partition, queued))
        return deliveries

    async def _append_to(self, partition: int, queued: list[Command]) -> list[asyncio.Future[RecordMetadata]]:
        """Queues the commands' records to `partition` in as few producer batches as fit."""
        producer = self.producer.producer
        topic = self.settings.topic_log
        deliveries = []
        if queued:
            batch = producer.create_batch()
            for command in queued:
                message = command_to_proto(command)
                record = {
                    "key": command.key.encode("utf-8") or None,
                    "value": message.SerializeToString(),
                    "timestamp": None,
                    "headers": event_headers(message, SOURCE, event_id=command.command_id),
                }
                if batch.append(**record) is None:  # full: send it, start the next (which takes any one record)
                    deliveries.append(await producer.send_batch(batch, topic, partition=partition))
                    batch = producer.create_batch()
                    batch.append(**record)
            deliveries.append(await producer.send_batch(batch, topic, partition=partition))
        return deliveries

    async def wait_applied(self, versions: list[Version]) -> None:
        """Waits until every version's record is applied here; DeadlineExceeded after read_wait_seconds."""

        def reached() -> bool:
            return all(self.state.applied(v.partition) > v.offset for v in versions)

        unknown = {v.partition for v in versions} - set(self.partitions)
        if unknown:
            raise InvalidArgument(f"no partitions {sorted(unknown)} in the log", reason="bad_partition")
        if reached():
            return
        if self.diverged is not None:
            raise Unavailable("replica's state is ahead of the log", reason="log_behind_snapshot")
        try:
            async with asyncio.timeout(self.settings.read_wait_seconds), self._applied:
                await self._applied.wait_for(reached)
        except TimeoutError as exc:
            raise DeadlineExceeded("replica has not applied the requested version yet", reason="min_version") from exc

    async def watch(self, prefix: str, from_versions: list[Version]) -> AsyncIterator[list[Change]]:
        """Changes under `prefix` from the given positions (other partitions: from now), in log order per
        partition, as lists of the changes that became visible together (never empty)."""
        start = {v.partition: v.offset for v in from_versions}
        unknown = set(start) - set(self.partitions)
        if unknown:
            raise FailedPrecondition(f"no partitions {sorted(unknown)} in the log", reason="bad_partition")
        cursor = {p: start.get(p, self.state.applied(p)) for p in self.partitions}
        while True:
            batch: list[Change] = []
            for p in self.partitions:
                batch.extend(self.state.changes(p, cursor[p], prefix))
                cursor[p] = max(cursor[p], self.state.applied(p))
            if batch:
                yield batch
            async with self._applied:
                await self._applied.wait_for(lambda: any(self.state.applied(p) > cursor[p] for p in self.partitions))

    def save_snapshot(self) -> None:
        """Writes the snapshot now, if the settings name a file and the state is trustworthy."""
        path = self.settings.snapshot_path
        if path is None or self.diverged is not None or self.in_minority:
            return
        snapshots.save(self.state, path, self.settings.topic_log)
        self._snapshot_written(path)

    async def save_snapshot_in_background(self) -> None:
        """Like save_snapshot, but only the copy of the state runs on the event loop; the file is written in a
        worker thread, so requests keep being served meanwhile."""
        path = self.settings.snapshot_path
        if path is None or self.diverged is not None or self.in_minority:  # never persist a state others dispute
            return
        rows = snapshots.capture(self.state)
        await asyncio.to_thread(snapshots.write, rows, path, self.settings.topic_log)
        self._snapshot_written(path)

    def _snapshot_written(self, path: Path) -> None:
        self._snapshot_at = time.monotonic()
        self.metrics.snapshots_total.inc()
        with contextlib.suppress(OSError):
            self.metrics.snapshot_bytes.set(path.stat().st_size)

    def refresh_metrics(self) -> None:
        if self._snapshot_at is not None:
            self.metrics.snapshot_age_seconds.set(time.monotonic() - self._snapshot_at)
        for p, (applied, digest) in self.state.digests().items():
            self.metrics.applied_offset.labels(str(p)).set(applied)
            self.metrics.digest_prefix.labels(str(p)).set(int(digest[:12], 16))

    async def report_digests(self) -> int:
        """Appends a DigestReport (this replica's digest at its applied offset) to every partition where it applied
        commands since its last report there; returns how many it appended. An idle log gets no reports."""
        if self.diverged is not None:
            return 0
        deliveries = []
        for p in self.partitions:
            if not self._unreported.get(p):
                continue
            self._unreported[p] = 0
            ps = self.state.partition(p)
            report = DigestReport(self.replica_id, ps.applied, ps.digest())
            deliveries.extend(await self._append_to(p, [Command(new_command_id(), "", report)]))
        results = await asyncio.gather(*deliveries, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            log.warning("digest report not appended", extra={"fields": {"error": repr(failed[0])}})
        return len(results) - len(failed)

    async def run_periodic(self, stop: asyncio.Event) -> None:
        """Refreshes the digest gauges, reports this replica's digests and rewrites the snapshot, each at its
        interval, until `stop` is set."""
        last_snapshot = last_report = time.monotonic()
        interval = min(self.settings.metrics_interval_seconds, self.settings.digest_report_interval_seconds)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            self.refresh_metrics()
            if time.monotonic() - last_report >= self.settings.digest_report_interval_seconds:
                last_report = time.monotonic()
                try:
                    async with asyncio.timeout(self.settings.write_timeout_seconds):
                        await self.report_digests()
                except (TimeoutError, ClisonixError):
                    log.warning("digest reports not appended in time")
            if time.monotonic() - last_snapshot >= self.settings.snapshot_interval_seconds:
                last_snapshot = time.monotonic()
                try:
                    await self.save_snapshot_in_background()
                except OSError:
                    log.exception("snapshot failed")


def new_command_id() -> str:
    """A fresh command id for a request that brought none."""
    return uuid.uuid4().hex
