"""The fusion worker: raw chunks from the consumer group in, fused windows out, offsets committed safely.

Per-session state is rebuilt from the raw topic itself (no changelog): the worker commits, per partition, the
lowest offset any open window or clock fit of a session in that partition still needs, and only once the
windows produced before it are acknowledged by Kafka. After a rebalance or a crash the new owner re-reads from
there, skips the windows whose history starts before what it read (they were produced already), and
re-produces the others with the same ids and bytes: consumers see identical duplicates at most.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord
from aiokafka.errors import KafkaError
from aiokafka.structs import RecordMetadata, TopicPartition
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge, Histogram

from clisonix.signal.v1 import signal_pb2
from services.common.errors import ClisonixError, InvalidArgument
from services.common.events import UndecodableEvent, decode_event
from services.common.kafka import DeadLetters, EventProducer
from services.common.metrics import LATENCY_BUCKETS, ServiceMetrics, observe_seconds
from services.common.validation import validate_chunk
from services.fusion.settings import FusionSettings
from services.fusion.streams import RawChunk
from services.fusion.windows import Emitted, SessionWindows, WindowConfig

if TYPE_CHECKING:
    from services.fusion.baselines import CalibrationStore

log = logging.getLogger(__name__)

SOURCE = "//clisonix/fusion"
CHUNK_EVENTS = ("duplicate", "late", "gap", "reset", "restart")


@dataclass(frozen=True)
class FusionMetrics:
    """Fusion's own metrics, beside the common ServiceMetrics, in the same registry."""

    window_emit_latency_seconds: Histogram
    windows_total: PromCounter
    chunk_events_total: PromCounter
    sessions: Gauge
    calibration_writes_total: PromCounter
    calibrated_streams_total: PromCounter

    @classmethod
    def create(cls, metrics: ServiceMetrics) -> FusionMetrics:
        registry = metrics.registry
        return cls(
            window_emit_latency_seconds=Histogram(
                "clisonix_fusion_window_emit_latency_seconds",
                "Last contributing chunk received to window handed to the Kafka producer",
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            windows_total=PromCounter(
                "clisonix_fusion_windows", "Fused windows produced", ["trigger"], registry=registry
            ),
            chunk_events_total=PromCounter(
                "clisonix_fusion_chunk_events",
                "Chunks that were duplicates or late, and gaps, clock resets and restarts seen",
                ["event"],
                registry=registry,
            ),
            sessions=Gauge("clisonix_fusion_sessions", "Sessions held by this worker", registry=registry),
            calibration_writes_total=PromCounter(
                "clisonix_fusion_calibration_writes",
                "Calibration baseline writes to Tide by outcome (applied, conflict, failed), and stored values "
                "that were not baselines (invalid)",
                ["outcome"],
                registry=registry,
            ),
            calibrated_streams_total=PromCounter(
                "clisonix_fusion_calibrated_streams",
                "Stream windows produced with a calibration baseline and delta",
                registry=registry,
            ),
        )


def window_config(settings: FusionSettings) -> WindowConfig:
    """The window settings the pure engine needs."""
    return WindowConfig(
        window_seconds=settings.window_seconds,
        hop_seconds=settings.hop_seconds,
        filter_warmup_seconds=settings.filter_warmup_seconds,
        filter_epoch_seconds=settings.filter_epoch_seconds,
        peak_latency_seconds=settings.peak_latency_seconds,
        clock_fit_seconds=settings.clock_fit_seconds,
        clock_reset_seconds=settings.clock_reset_seconds,
        max_gap_seconds=settings.max_gap_seconds,
        lateness_seconds=settings.lateness_seconds,
        mains_hz=settings.mains_hz,
        eeg_band_hz=settings.eeg_band_hz,
        ecg_band_hz=settings.ecg_band_hz,
        filter_order=settings.filter_order,
        notch_quality=settings.notch_quality,
        output_rates_hz=dict(settings.output_rates_hz),
        max_streams=settings.max_streams_per_session,
        stagger=settings.stagger_windows,
    )


class _Partition:
    """The sessions of one assigned partition and how far it was read."""

    def __init__(self) -> None:
        self.sessions: dict[str, SessionWindows] = {}
        self.last_record_at: dict[str, float] = {}
        self.subjects: dict[str, str] = {}  # session -> subject pseudonym, for calibration
        self.position: int | None = None  # offset after the last record handled


class FusionWorker:
    """Consumes raw chunks as a member of the fusion consumer group and produces fused windows."""

    def __init__(
        self,
        settings: FusionSettings,
        consumer: AIOKafkaConsumer,
        producer: EventProducer,
        dead_letters: DeadLetters,
        metrics: ServiceMetrics,
        fusion_metrics: FusionMetrics,
        on_window_emitted: Callable[[float], None] | None = None,
        calibration: CalibrationStore | None = None,
    ) -> None:
        """on_window_emitted: called with each window's emit latency in seconds (what the histogram observes),
        for callers that need exact figures (the benchmark); may also be set on the attribute after construction.
        calibration: fills each window's per-subject calibration from Tide (None: fusion runs without Tide).
        """
        self.settings = settings
        self.config = window_config(settings)
        self.consumer = consumer
        self.producer = producer
        self.dead_letters = dead_letters
        self.metrics = metrics
        self.fusion_metrics = fusion_metrics
        self.on_window_emitted = on_window_emitted
        self.calibration = calibration
        self.partitions: dict[TopicPartition, _Partition] = {}
        self._in_flight: list[asyncio.Future[RecordMetadata]] = []
        self._events: Counter[str] = Counter()
        self._last_commit = time.monotonic()
        service = settings.service_name
        self._stage = {
            stage: metrics.stage_latency_seconds.labels(service, stage)
            for stage in (
                "decode",
                "place",
                "assemble",
                "filter",
                "resample",
                "features",
                "calibrate",
                "produce",
                "commit",
            )
        }
        self._records_in = metrics.records_in_total.labels(service, settings.topic_raw)
        self._records_out = metrics.records_out_total.labels(service, settings.topic_fused)
        self._lag = metrics.consumer_lag_records.labels(service, settings.topic_raw)

    def listener(self) -> ConsumerRebalanceListener:
        """The rebalance listener to subscribe with: commits what is safe and drops revoked partitions' state."""
        worker = self

        class Listener(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
                await worker.commit(force=True)
                for tp in revoked:
                    worker.partitions.pop(tp, None)
                worker.fusion_metrics.sessions.set(worker.session_count)

            async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
                for tp in assigned:
                    worker.partitions.setdefault(tp, _Partition())

        return Listener()

    @property
    def session_count(self) -> int:
        return sum(len(p.sessions) for p in self.partitions.values())

    async def run(self, stop: asyncio.Event) -> None:
        """Handles batches until `stop` is set; commits at the end."""
        while not stop.is_set():
            batches = await self.consumer.getmany(timeout_ms=100, max_records=500)
            received = time.monotonic()
            for tp, records in batches.items():
                for record in records:
                    await self.handle(tp, record, received)
            await self.flush_idle()
            self._lag.set(self.lag_records())
            if time.monotonic() - self._last_commit >= self.settings.commit_interval_seconds:
                await self.commit()
        await self.commit(force=True)

    async def handle(self, tp: TopicPartition, record: ConsumerRecord, received: float) -> None:
        """Decodes one raw record, adds it to its session and produces the windows it completes."""
        state = self.partitions.setdefault(tp, _Partition())
        self._records_in.inc()
        subject = ""
        try:
            with self._timed("decode"):
                chunk, _ = decode_event(signal_pb2.SignalChunk, record.value, record.headers)
                validate_chunk(chunk, max_channels=self.settings.max_channels)
            session = state.sessions.get(chunk.session_id)
            if session is None:
                if self.session_count >= self.settings.max_sessions:
                    raise InvalidArgument("this worker holds max_sessions sessions", reason="too_many_sessions")
                session = SessionWindows(chunk.session_id, self.config, self._events)
                state.sessions[chunk.session_id] = session
                self.fusion_metrics.sessions.set(self.session_count)
            with self._timed("place"):
                session.add(RawChunk(chunk, record.partition, record.offset))
            state.last_record_at[chunk.session_id] = time.monotonic()
            if chunk.subject_id:
                state.subjects[chunk.session_id] = chunk.subject_id
            subject = state.subjects.get(chunk.session_id, "")
            emitted = session.take_ready()
        except UndecodableEvent as exc:
            await self.dead_letters.publish(record, exc.reason, exc.detail)
            emitted = []
        except ClisonixError as exc:
            await self.dead_letters.publish(record, exc.reason, str(exc))
            emitted = []
        state.position = record.offset + 1
        await self._produce(emitted, received, "watermark", subject)
        self._export_events()

    async def flush_idle(self) -> None:
        """Emits the last windows of sessions that have been quiet for idle_flush_seconds, then forgets them."""
        now = time.monotonic()
        for tp, state in list(self.partitions.items()):
            highwater = self.consumer.highwater(tp)
            if highwater is None or state.position is None or state.position < highwater:
                # Behind on this partition (catching up, or the fetch stalled): quiet here says nothing about
                # the session, and flushing would emit windows that the records still to come belong to.
                continue
            for session_id, last in list(state.last_record_at.items()):
                if now - last < self.settings.idle_flush_seconds:
                    continue
                session = state.sessions[session_id]
                subject = state.subjects.pop(session_id, "")
                await self._produce(session.take_ready(flushing=True), now, "idle", subject)
                del state.sessions[session_id]
                del state.last_record_at[session_id]
        self.fusion_metrics.sessions.set(self.session_count)

    async def _produce(self, emitted: list[Emitted], received: float, trigger: str, subject: str = "") -> None:
        """Sends the windows (subject: the session's subject pseudonym, for calibration; "" for none)."""
        for item in emitted:
            window = item.window
            if self.calibration is not None and subject:
                with self._timed("calibrate"):
                    self.calibration.annotate(subject, window)
            with self._timed("produce"):
                future = await self.producer.send(
                    self.settings.topic_fused, window.session_id, window, event_id=window.window_id
                )
            self._in_flight.append(future)
            latency = time.monotonic() - received
            self.fusion_metrics.window_emit_latency_seconds.observe(latency)
            if self.on_window_emitted is not None:
                self.on_window_emitted(latency)
            self.fusion_metrics.windows_total.labels(trigger).inc()
            self._records_out.inc()
            for stage, seconds in item.stage_seconds.items():
                self._stage[stage].observe(seconds)

    def _export_events(self) -> None:
        if self._events:
            for event, count in self._events.items():
                self.fusion_metrics.chunk_events_total.labels(event).inc(count)
            self._events.clear()

    def lag_records(self) -> int:
        """Records between what this worker has read and the end of its partitions (fetch highwater)."""
        lag = 0
        for tp, state in self.partitions.items():
            highwater = self.consumer.highwater(tp)
            if highwater is not None and state.position is not None:
                lag += max(0, highwater - state.position)
        return lag

    def safe_offsets(self) -> dict[TopicPartition, int]:
        """Per partition: the lowest offset a session still needs, else the position after the last record."""
        offsets: dict[TopicPartition, int] = {}
        for tp, state in self.partitions.items():
            needed = [o for o in (s.needed_offset() for s in state.sessions.values()) if o is not None]
            if needed:
                offsets[tp] = min(needed)
            elif state.position is not None:
                offsets[tp] = state.position
        return offsets

    async def commit(self, force: bool = False) -> None:
        """Commits the safe offsets once every window produced so far is acknowledged (at-least-once)."""
        with self._timed("commit"):
            if self._in_flight:
                in_flight, self._in_flight = self._in_flight, []
                await asyncio.gather(*in_flight)
            offsets = self.safe_offsets()
            if offsets:
                try:
                    await self.consumer.commit(offsets)
                except KafkaError as exc:  # a rebalance in progress: the next owner re-reads a little more
                    log.warning("commit failed", extra={"fields": {"error": type(exc).__name__}})
        self._last_commit = time.monotonic()

    def _timed(self, stage: str) -> AbstractContextManager[None]:
        return observe_seconds(self._stage[stage])
