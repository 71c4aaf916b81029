"""Wires the fusion service: consumer group, producer, dead letters, worker, health/reflection, metrics."""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaConsumer

from services.common.kafka import DeadLetters, consumer_options, ensure_topics, kafka_producer
from services.common.rpc import GrpcServer
from services.common.runtime import ServiceRuntime
from services.fusion.baselines import CalibrationStore
from services.fusion.handlers import SOURCE, FusionMetrics, FusionWorker
from services.fusion.settings import FusionSettings
from services.tide.client import client_from_settings

log = logging.getLogger(__name__)


class FusionService:
    """The running fusion worker. `await start()`, then `await runtime.lifecycle.run_until_stopped()`."""

    def __init__(self, settings: FusionSettings, runtime: ServiceRuntime | None = None) -> None:
        self.settings = settings
        self.runtime = runtime or ServiceRuntime(settings)
        self.grpc: GrpcServer | None = None
        self.worker: FusionWorker | None = None
        self.calibration: CalibrationStore | None = None

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
            await ensure_topics(settings, [settings.topic_raw, settings.topic_fused, settings.topic_deadletter])
        producer = await stack.enter_async_context(kafka_producer(settings, SOURCE))
        dead_letters = DeadLetters(
            producer.producer,
            settings.topic_deadletter,
            settings.consumer_group,
            lambda reason: runtime.metrics.deadlettered_total.labels(settings.service_name, reason).inc(),
        )
        fusion_metrics = FusionMetrics.create(runtime.metrics)
        tide = client_from_settings(settings)
        if tide is not None:
            # Closed after the worker stops (the stack unwinds in reverse), so no window annotates a closed cache.
            self.calibration = CalibrationStore(tide, settings, fusion_metrics)
            stack.push_async_callback(self.calibration.close)
            await self.calibration.start()
        consumer = AIOKafkaConsumer(**consumer_options(settings, settings.consumer_group))
        self.worker = FusionWorker(
            settings,
            consumer,
            producer,
            dead_letters,
            runtime.metrics,
            fusion_metrics,
            calibration=self.calibration,
        )
        consumer.subscribe([settings.topic_raw], listener=self.worker.listener())
        await consumer.start()
        # Stopped after the worker: leaving the group moves the partitions on at once.
        stack.push_async_callback(consumer.stop)
        runtime.run_task(self.worker.run, "fusion-worker")
        self.grpc = GrpcServer(settings, [], lambda server: None)
        await runtime.serve_grpc(self.grpc)
        log.info(
            "fusion ready",
            extra={
                "fields": {
                    "grpc_port": self.grpc.port,
                    "topic_in": settings.topic_raw,
                    "topic_out": settings.topic_fused,
                    "calibration": self.calibration is not None,
                }
            },
        )

    async def stop(self) -> None:
        self.runtime.lifecycle.stop.set()
        await self.runtime.lifecycle.shutdown()
