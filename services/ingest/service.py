"""Wires the ingest service: Kafka producer, pipeline, gRPC server, metrics, lifecycle."""

from __future__ import annotations

import logging

from services.common.kafka import ensure_topics, kafka_producer
from services.common.rpc import GrpcServer
from services.common.runtime import ServiceRuntime
from services.ingest.api import SERVICE_NAME, WRITE_METHODS, IngestServicer, register
from services.ingest.pipeline import SOURCE, IngestPipeline
from services.ingest.sessions import RegistryMetrics, SessionRegistry
from services.ingest.settings import IngestSettings
from services.tide.client import client_from_settings

log = logging.getLogger(__name__)


class IngestService:
    """The running ingest service. `await start()`, then `await runtime.lifecycle.run_until_stopped()`."""

    def __init__(self, settings: IngestSettings, runtime: ServiceRuntime | None = None) -> None:
        self.settings = settings
        self.runtime = runtime or ServiceRuntime(settings)
        self.grpc: GrpcServer | None = None
        self.pipeline: IngestPipeline | None = None
        self.sessions: SessionRegistry | None = None

    @property
    def grpc_port(self) -> int:
        assert self.grpc is not None, "not started"
        return self.grpc.port

    async def start(self) -> None:
        settings = self.settings
        runtime = self.runtime
        await runtime.start()
        if settings.create_topics:
            await ensure_topics(settings, [settings.topic_raw, settings.topic_deadletter])
        producer = await runtime.lifecycle.stack.enter_async_context(kafka_producer(settings, SOURCE))
        tide = client_from_settings(settings)
        self.sessions = None
        if tide is not None:
            runtime.lifecycle.stack.push_async_callback(tide.close)
            self.sessions = SessionRegistry(tide, RegistryMetrics.create(runtime.metrics))
            runtime.run_task(self.sessions.run, "session-registry")
        self.pipeline = IngestPipeline(settings, producer, runtime.metrics, sessions=self.sessions)
        servicer = IngestServicer(self.pipeline, settings.max_unacked_per_stream)
        self.grpc = GrpcServer(settings, [SERVICE_NAME], register(servicer), auth_methods=WRITE_METHODS)
        await runtime.serve_grpc(self.grpc)
        runtime.lifecycle.on_drain(servicer.drain)
        log.info("ingest ready", extra={"fields": {"grpc_port": self.grpc.port, "topic": settings.topic_raw}})

    async def stop(self) -> None:
        self.runtime.lifecycle.stop.set()
        await self.runtime.lifecycle.shutdown()
