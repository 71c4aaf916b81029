"""Wires the LIAM service: metrics consumer group, producer, dead letters, worker, LiamService, health, metrics."""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaConsumer

from services.common.kafka import DeadLetters, consumer_options, ensure_topics, kafka_producer
from services.common.rpc import GrpcServer
from services.common.runtime import ServiceRuntime
from services.liam.api import SERVICE_NAME, LiamServicer, register
from services.liam.handlers import SOURCE, LiamMetrics, LiamWorker
from services.liam.monitor import MonitorBook
from services.liam.settings import LiamSettings

log = logging.getLogger(__name__)


class LiamService:
    """The running LIAM member. `await start()`, then `await runtime.lifecycle.run_until_stopped()`."""

    def __init__(self, settings: LiamSettings, runtime: ServiceRuntime | None = None) -> None:
        self.settings = settings
        self.runtime = runtime or ServiceRuntime(settings)
        self.grpc: GrpcServer | None = None
        self.worker: LiamWorker | None = None
        self.book = MonitorBook(
            settings.max_streams,
            warmup=settings.warmup_records,
            z_threshold=settings.z_threshold,
            max_metrics=settings.max_metrics,
        )

    @property
    def grpc_port(self) -> int:
        assert self.grpc is not None, "not started"
        return self.grpc.port

    async def start(self) -> None:
        settings = self.settings
        runtime = self.runtime
        stack = runtime.lifecycle.stack
        await runtime.start()
        if settings.create_topics:
            topics = [settings.topic_liam_metrics, settings.topic_patterns, settings.topic_deadletter]
            await ensure_topics(settings, topics)
        producer = await stack.enter_async_context(kafka_producer(settings, SOURCE))
        dead_letters = DeadLetters(
            producer.producer,
            settings.topic_deadletter,
            settings.consumer_group,
            lambda reason: runtime.metrics.deadlettered_total.labels(settings.service_name, reason).inc(),
        )
        consumer = AIOKafkaConsumer(**consumer_options(settings, settings.consumer_group))
        worker = self.worker = LiamWorker(
            settings, consumer, producer, dead_letters, runtime.metrics, LiamMetrics.create(runtime.metrics), self.book
        )
        consumer.subscribe([settings.topic_liam_metrics], listener=worker.listener())
        await consumer.start()
        stack.push_async_callback(consumer.stop)
        task = runtime.run_task(worker.run, "liam-worker")
        runtime.run_task(worker.run_reports, "liam-reports")
        await runtime.wait_joined(worker.joined, task, "liam worker")
        self.grpc = GrpcServer(settings, [SERVICE_NAME], register(LiamServicer(settings, producer, self.book)))
        await runtime.serve_grpc(self.grpc)
        log.info(
            "liam ready",
            extra={"fields": {"grpc_port": self.grpc.port, "topic_in": settings.topic_liam_metrics}},
        )

    async def stop(self) -> None:
        self.runtime.lifecycle.stop.set()
        await self.runtime.lifecycle.shutdown()
