"""Wires a Tide replica: snapshot, command-log consumer (no group) and producer, gRPC, health, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaConsumer
from grpc_health.v1 import health_pb2

from services.common.kafka import consumer_options, ensure_topics, kafka_producer
from services.common.rpc import GrpcServer
from services.common.runtime import ServiceRuntime
from services.tide import snapshots
from services.tide.api import SERVICE_NAME, TideServicer, register
from services.tide.replica import SOURCE, Replica, TideMetrics
from services.tide.settings import TideSettings
from services.tide.state import TideState

log = logging.getLogger(__name__)


class TideService:
    """The running replica. `await start()`, then `await runtime.lifecycle.run_until_stopped()`.

    With settings.auth_token set, every TideService method (reads too: the state may hold health data) needs it.
    """

    def __init__(self, settings: TideSettings, runtime: ServiceRuntime | None = None) -> None:
        self.settings = settings
        self.runtime = runtime or ServiceRuntime(settings)
        self.grpc: GrpcServer | None = None
        self.replica: Replica | None = None

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
            await ensure_topics(settings, [settings.topic_log])
        state = TideState(settings.limits(), settings.feed_length, settings.dedupe_length, settings.digest_history)
        restored = None
        if settings.snapshot_path is not None:
            restored = snapshots.load(settings.snapshot_path, settings.topic_log, state)
        log.info("tide state", extra={"fields": {"from_snapshot": restored is not None}})
        producer = await stack.enter_async_context(kafka_producer(settings, SOURCE))
        # No group and no silent reset: a position past the log's end means the log lost what the state holds.
        consumer = AIOKafkaConsumer(**{**consumer_options(settings, None), "auto_offset_reset": "none"})
        await consumer.start()
        stack.push_async_callback(consumer.stop)
        replica = self.replica = Replica(settings, consumer, producer, TideMetrics.create(runtime.metrics), state)
        await replica.assign()

        def final_snapshot() -> None:
            try:
                replica.save_snapshot()
            except OSError:
                log.exception("final snapshot failed")

        # Runs after both tasks below have stopped (the stack closes in reverse order). A replica that stopped
        # applying must not look healthy: a failed task stops the service.
        stack.callback(final_snapshot)
        runtime.run_task(replica.run, "tide-apply")
        runtime.run_task(replica.run_periodic, "tide-periodic")
        self.grpc = GrpcServer(settings, [SERVICE_NAME], register(TideServicer(replica)))
        await runtime.serve_grpc(self.grpc)
        report = asyncio.create_task(self._follow_health(), name="tide-health")

        async def stop_report() -> None:
            report.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await report

        stack.push_async_callback(stop_report)
        fields = {"grpc_port": self.grpc.port, "topic": settings.topic_log, "partitions": replica.partitions}
        log.info("tide ready", extra={"fields": fields})

    async def _follow_health(self) -> None:
        """Health for TideService: NOT_SERVING once the log is found younger than the state, and while the state
        disagrees with the other replicas' (SERVING again once they agree)."""
        replica, grpc_server = self.replica, self.grpc
        assert replica is not None and grpc_server is not None
        serving = True
        while True:
            wanted = replica.diverged is None and not replica.in_minority
            if wanted != serving:
                serving = wanted
                status = (
                    health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
                )
                await grpc_server.health.set(SERVICE_NAME, status)
            if replica.diverged is not None:
                return  # for good: the replica stopped applying
            changed = asyncio.ensure_future(replica.health_changed.wait())
            diverged = asyncio.ensure_future(replica.diverged_event.wait())
            try:
                await asyncio.wait([changed, diverged], return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
                diverged.cancel()
            replica.health_changed.clear()

    async def stop(self) -> None:
        self.runtime.lifecycle.stop.set()
        await self.runtime.lifecycle.shutdown()
