"""The ingest pipeline: check a chunk, pseudonymise it, admit it against its stream's history, produce it
to clisonix.signals.raw.v1 keyed by session, and answer once Kafka acknowledged the write (acks=all).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from aiokafka.errors import KafkaError
from aiokafka.structs import RecordMetadata
from prometheus_client import Counter, Histogram

from clisonix.signal.v1 import signal_pb2
from services.common.chunks import modality_name
from services.common.errors import ClisonixError, ResourceExhausted, Unavailable
from services.common.kafka import EventProducer
from services.common.metrics import LATENCY_BUCKETS, ServiceMetrics
from services.common.validation import check_size, layout_of, validate_chunk
from services.ingest.pseudonyms import Pseudonymiser
from services.ingest.sequencing import Admission, StreamBook, TokenBucket
from services.ingest.sessions import SessionRegistry
from services.ingest.settings import IngestSettings

log = logging.getLogger(__name__)

SOURCE = "//clisonix/ingest"


@dataclass(frozen=True)
class IngestMetrics:
    """Ingest's own metrics, beside the common ServiceMetrics, in the same registry."""

    samples_in_total: Counter
    chunks_in_total: Counter
    gaps_total: Counter
    duplicates_total: Counter
    ack_latency_seconds: Histogram

    @classmethod
    def create(cls, metrics: ServiceMetrics) -> IngestMetrics:
        registry = metrics.registry
        return cls(
            samples_in_total=Counter(
                "clisonix_ingest_samples", "Samples written, per channel", ["modality"], registry=registry
            ),
            chunks_in_total=Counter("clisonix_ingest_chunks", "Chunks written", ["modality"], registry=registry),
            gaps_total=Counter(
                "clisonix_ingest_sequence_gaps",
                "Chunks skipped by a stream's sequence",
                ["modality"],
                registry=registry,
            ),
            duplicates_total=Counter(
                "clisonix_ingest_duplicates", "Chunks dropped as duplicates", ["modality"], registry=registry
            ),
            ack_latency_seconds=Histogram(
                "clisonix_ingest_ack_latency_seconds",
                "Chunk received to ack sent, Kafka write included",
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
        )


@dataclass(frozen=True)
class ModalityCounters:
    """The per-modality counters' labelled children."""

    chunks: Any
    samples: Any
    gaps: Any
    duplicates: Any


class IngestPipeline:
    """Turns chunks into durable Kafka records and acks. One per process, shared by every gRPC call."""

    def __init__(
        self,
        settings: IngestSettings,
        producer: EventProducer,
        metrics: ServiceMetrics,
        ingest_metrics: IngestMetrics | None = None,
        sessions: SessionRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.producer = producer
        self.metrics = metrics
        self.ingest_metrics = ingest_metrics or IngestMetrics.create(metrics)
        # Records each session's streams in Tide, when the service runs with Tide.
        self.sessions = sessions
        self.pseudonyms = Pseudonymiser(settings.pseudonym_key.get_secret_value().encode())
        self.book = StreamBook(settings.dedupe_window, settings.max_tracked_streams)
        # Writes in flight per (session, stream, sequence), so a duplicate of one can wait for its answer.
        self.in_flight: dict[tuple[str, str, int], asyncio.Future[signal_pb2.IngestAck]] = {}
        self._service = metrics.service
        # Labelled children looked up once: .labels() per chunk costs more than the checks themselves.
        self._validate_seconds = metrics.stage_latency_seconds.labels(service=self._service, stage="validate")
        self._produce_seconds = metrics.stage_latency_seconds.labels(service=self._service, stage="produce")
        self._records_out = metrics.records_out_total.labels(service=self._service, topic=settings.topic_raw)
        self._by_modality: dict[int, ModalityCounters] = {}

    def _counters(self, modality: int) -> ModalityCounters:
        counters = self._by_modality.get(modality)
        if counters is None:
            label = modality_name(modality)
            metrics = self.ingest_metrics
            counters = ModalityCounters(
                chunks=metrics.chunks_in_total.labels(modality=label),
                samples=metrics.samples_in_total.labels(modality=label),
                gaps=metrics.gaps_total.labels(modality=label),
                duplicates=metrics.duplicates_total.labels(modality=label),
            )
            self._by_modality[modality] = counters
        return counters

    def new_rate_limit(self) -> TokenBucket:
        """The rate limit of one client (one Stream call)."""
        return TokenBucket(self.settings.max_chunks_per_second, self.settings.max_chunk_burst)

    def reject(self, chunk: signal_pb2.SignalChunk, error: ClisonixError) -> None:
        """Counts and logs a rejected chunk (no values, no ids beyond the stream's own)."""
        self.metrics.records_rejected_total.labels(service=self._service, reason=error.reason).inc()
        log.info(
            "chunk rejected",
            extra={"fields": {"reason": error.reason, "stream": chunk.stream_id, "sequence": chunk.sequence}},
        )

    async def submit(
        self, chunk: signal_pb2.SignalChunk, rate_limit: TokenBucket | None = None
    ) -> Awaitable[signal_pb2.IngestAck]:
        """Checks and queues `chunk` for Kafka; returns an awaitable of its ack.

        Raises ClisonixError (INVALID_ARGUMENT, RESOURCE_EXHAUSTED) for a chunk that is not written. The
        awaitable raises Unavailable when Kafka did not take the record; the chunk may then be sent again.
        """
        received = time.perf_counter()
        try:
            check_size(chunk, self.settings.max_chunk_bytes)
            validate_chunk(chunk, self.settings.max_channels)
        except ClisonixError as exc:
            self.reject(chunk, exc)
            raise
        self._validate_seconds.observe(time.perf_counter() - received)

        chunk.session_id = self.pseudonyms.pseudonym("session", chunk.session_id)
        chunk.subject_id = self.pseudonyms.pseudonym("subject", chunk.subject_id)
        key = (chunk.session_id, chunk.stream_id)
        try:
            verdict = self.book.admit(key, chunk.sequence, layout_of(chunk))
        except ClisonixError as exc:
            self.reject(chunk, exc)
            raise
        counters = self._counters(chunk.modality)
        flight_key = (chunk.session_id, chunk.stream_id, chunk.sequence)
        if verdict.admission is not Admission.NEW:
            counters.duplicates.inc()
            return self._duplicate_ack(chunk, verdict.location, flight_key)
        if verdict.gap:
            counters.gaps.inc(verdict.gap)  # counted where the stream's state counts it, throttled or not
        if rate_limit is not None and not rate_limit.take():
            self.book.failed(key, chunk.sequence)
            error = ResourceExhausted(
                f"client over its rate of {self.settings.max_chunks_per_second:g} chunks/s",
                reason="over_rate",
                retry_after_s=rate_limit.wait_s(),
            )
            self.reject(chunk, error)
            raise error

        chunk.ingest_time.FromNanoseconds(time.time_ns())
        value = chunk.SerializeToString()
        try:
            delivery = await self.producer.send(
                self.settings.topic_raw,
                chunk.session_id,
                chunk,
                value=value,
                event_id=f"{chunk.session_id}/{chunk.stream_id}/{chunk.sequence}",
            )
        except asyncio.CancelledError:
            self.book.failed(key, chunk.sequence)  # the call ended while Kafka was busy: not written
            raise
        except KafkaError as exc:
            self.book.failed(key, chunk.sequence)
            raise Unavailable(
                f"Kafka did not take the chunk: {type(exc).__name__}", reason="kafka_unavailable"
            ) from exc
        ack_future: asyncio.Future[signal_pb2.IngestAck] = asyncio.get_running_loop().create_future()
        self.in_flight[flight_key] = ack_future
        sent = time.perf_counter()

        # A callback, not a coroutine: the write is accounted for even when the call that sent it is gone.
        def acknowledge(delivered: asyncio.Future[RecordMetadata]) -> None:
            self.in_flight.pop(flight_key, None)
            error = None if delivered.cancelled() else delivered.exception()
            if delivered.cancelled() or error is not None:
                self.book.failed(key, chunk.sequence)
                name = "cancelled" if error is None else type(error).__name__
                if not ack_future.done():
                    ack_future.set_exception(
                        Unavailable(f"Kafka did not acknowledge the chunk: {name}", reason="kafka_unavailable")
                    )
                    ack_future.exception()  # marks it retrieved: nobody may be waiting any more
                return
            metadata = delivered.result()
            done = time.perf_counter()
            self.book.written(key, chunk.sequence, metadata.partition, metadata.offset)
            self._produce_seconds.observe(done - sent)
            self.ingest_metrics.ack_latency_seconds.observe(done - received)
            counters.chunks.inc()
            counters.samples.inc(chunk.sample_count)
            self._records_out.inc()
            if self.sessions is not None:
                self.sessions.note(chunk)
            state = self.book.state(key)
            if ack_future.done():  # nobody is waiting for it any more; the write is accounted for above
                return
            ack_future.set_result(
                signal_pb2.IngestAck(
                    stream_id=chunk.stream_id,
                    sequence=chunk.sequence,
                    status=signal_pb2.ACK_STATUS_ACCEPTED,
                    partition=metadata.partition,
                    offset=metadata.offset,
                    session_id=chunk.session_id,
                    gaps_total=state.gaps_total if state else 0,
                )
            )

        delivery.add_done_callback(acknowledge)
        return ack_future

    def _duplicate_ack(
        self,
        chunk: signal_pb2.SignalChunk,
        location: tuple[int, int] | None,
        flight_key: tuple[str, str, int],
    ) -> Awaitable[signal_pb2.IngestAck]:
        earlier = self.in_flight.get(flight_key)

        async def answer() -> signal_pb2.IngestAck:
            where = location
            if where is None and earlier is None:
                # Admitted by a call that has not handed it to Kafka yet: not written, so no ack.
                raise Unavailable("an earlier copy of this chunk is still being written", reason="write_pending")
            if where is None and earlier is not None:
                first = await asyncio.shield(earlier)
                where = (first.partition, first.offset)
            ack = signal_pb2.IngestAck(
                stream_id=chunk.stream_id,
                sequence=chunk.sequence,
                status=signal_pb2.ACK_STATUS_DUPLICATE,
                session_id=chunk.session_id,
            )
            if where is not None:
                ack.partition, ack.offset = where
            return ack

        return answer()
