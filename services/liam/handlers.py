"""LIAM's Kafka worker: metric records in (clisonix.liam.metrics.v1), anomalies and periodic pattern reports out
(clisonix.liam.patterns.v1)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.abc import ConsumerRebalanceListener
from prometheus_client import Counter, Gauge

from clisonix.liam.v1 import liam_pb2
from services.common.events import EventAttributes
from services.common.kafka import DeadLetters, EventProducer, consume_events
from services.common.metrics import PREFIX, ServiceMetrics
from services.liam.codec import invalid, record_metrics, record_time, report_to_proto
from services.liam.errors import InvalidMetrics
from services.liam.monitor import MonitorBook
from services.liam.settings import LiamSettings

log = logging.getLogger(__name__)

SOURCE = "//clisonix/liam"


@dataclass(frozen=True)
class LiamMetrics:
    """LIAM's own metrics (no stream or metric labels: those names come from clients and are unbounded).

    anomalies_total: records found far from their stream's running distribution. reports_total{kind}:
    pattern reports published (patterns, anomaly). streams: streams watched by this member.
    """

    anomalies_total: Counter
    reports_total: Counter
    streams: Gauge

    @classmethod
    def create(cls, metrics: ServiceMetrics) -> LiamMetrics:
        registry = metrics.registry
        return cls(
            anomalies_total=Counter(f"{PREFIX}_liam_anomalies", "Anomalous metric records", registry=registry),
            reports_total=Counter(f"{PREFIX}_liam_reports", "Pattern reports published", ["kind"], registry=registry),
            streams=Gauge(f"{PREFIX}_liam_streams", "Metric streams watched", registry=registry),
        )


class LiamWorker:
    """Folds every consumed record into its stream's monitor; publishes an anomaly report at once and each
    stream's patterns every settings.report_interval_seconds (only streams with new records)."""

    def __init__(
        self,
        settings: LiamSettings,
        consumer: AIOKafkaConsumer,
        producer: EventProducer,
        dead_letters: DeadLetters,
        metrics: ServiceMetrics,
        liam_metrics: LiamMetrics,
        book: MonitorBook,
    ) -> None:
        self.settings = settings
        self.consumer = consumer
        self.producer = producer
        self.dead_letters = dead_letters
        self.metrics = metrics
        self.liam_metrics = liam_metrics
        self.book = book
        self.changed: set[str] = set()
        # Set at the first assignment (even an empty one): this member has joined its consumer group.
        self.joined = asyncio.Event()
        self._records_in = metrics.records_in_total.labels(settings.service_name, settings.topic_liam_metrics)
        self._observe_seconds = metrics.stage_latency_seconds.labels(settings.service_name, "observe")

    def listener(self) -> ConsumerRebalanceListener:
        worker = self

        class Joined(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked: object) -> None:
                pass

            async def on_partitions_assigned(self, assigned: object) -> None:
                worker.joined.set()

        return Joined()

    async def on_metric_record(
        self, message: liam_pb2.MetricRecord, attributes: EventAttributes, record: ConsumerRecord
    ) -> None:
        started = time.perf_counter()
        metrics = record_metrics(message)
        try:
            monitor = self.book.monitor(message.stream)
            anomaly = monitor.observe(message.record_id or attributes.id, record_time(message), metrics)
        except InvalidMetrics as exc:
            raise invalid(exc) from exc
        self._records_in.inc()
        self.liam_metrics.streams.set(len(self.book.streams))
        self.changed.add(message.stream)
        self._observe_seconds.observe(time.perf_counter() - started)
        if anomaly is not None:
            self.liam_metrics.anomalies_total.inc()
            report = report_to_proto(message.stream, monitor.report(), liam_pb2.REPORT_KIND_ANOMALY, [anomaly])
            await self._publish(report, "anomaly")
            log.info(
                "anomaly",
                extra={"fields": {"stream": message.stream, "metric": anomaly.metric, "z": round(anomaly.z_score, 1)}},
            )

    async def _publish(self, report: liam_pb2.PatternReport, kind: str) -> None:
        # Awaited before the record's offset is committed: an acknowledged metric never loses its report.
        delivery = await self.producer.send(
            self.settings.topic_patterns, report.stream, report, event_id=report.report_id
        )
        await delivery
        self.liam_metrics.reports_total.labels(kind).inc()

    async def run(self, stop: asyncio.Event) -> None:
        """Consumes metric records until `stop` is set (bad records are dead-lettered with the reason)."""
        await consume_events(self.consumer, liam_pb2.MetricRecord, self.on_metric_record, self.dead_letters, stop)

    async def run_reports(self, stop: asyncio.Event) -> None:
        """Publishes each changed stream's patterns every report interval until `stop` is set."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.report_interval_seconds)
            changed, self.changed = self.changed, set()
            for stream in sorted(changed):
                monitor = self.book.streams.get(stream)
                if monitor is None or monitor.records == 0:
                    continue
                await self._publish(
                    report_to_proto(stream, monitor.report(), liam_pb2.REPORT_KIND_PATTERNS), "patterns"
                )
