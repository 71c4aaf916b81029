"""What every service's __main__ wires the same way: logging, metrics server, energy export, lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from services.common.energy import EnergyMeter
from services.common.lifecycle import Lifecycle
from services.common.logs import configure_logging
from services.common.metrics import EnergyExporter, ServiceMetrics, start_metrics_server
from services.common.operating import OperatingReporter
from services.common.rpc import GrpcServer
from services.common.settings import ServiceSettings

log = logging.getLogger(__name__)

ENERGY_EXPORT_INTERVAL_S = 1.0


class ServiceRuntime:
    """A service's shared plumbing; build one in __main__ (or a test), then `await start()`.

    settings: the service's settings. metrics: its ServiceMetrics (a private registry by default).
    """

    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or ServiceMetrics.create(settings.service_name)
        self.lifecycle = Lifecycle(settings.drain_seconds)
        self.energy = EnergyMeter(
            settings.energy_source,
            powercap_root=settings.powercap_root,
            watts_per_core=settings.energy_watts_per_core,
        )
        self.energy_exporter = EnergyExporter(
            self.energy, self.metrics, settings.service_name, settings.grid_intensity_g_per_kwh
        )
        self.metrics_port: int | None = None

    async def start(self) -> None:
        """Starts the /metrics server and the energy export; both close with the lifecycle's exit stack."""
        server = start_metrics_server(self.settings.metrics_port, self.metrics.registry, self.settings.metrics_host)
        self.metrics_port = server.port
        self.lifecycle.stack.callback(server.close)
        self.lifecycle.stack.callback(self.energy.close)
        task = asyncio.create_task(self.energy_exporter.run(ENERGY_EXPORT_INTERVAL_S, self.lifecycle.stop))

        async def stop_energy_export() -> None:
            self.lifecycle.stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        self.lifecycle.stack.push_async_callback(stop_energy_export)
        self.operating = OperatingReporter(self.settings, self.metrics.registry, self.energy.source)
        self.run_task(self.operating.run, "operating-metrics")
        log.info(
            "service starting",
            extra={"fields": {"metrics_port": server.port, "energy_source": self.energy.source}},
        )

    async def wait_joined(self, joined: asyncio.Event, worker: asyncio.Task[None], name: str) -> None:
        """Waits until `joined` is set (the worker's consumer has joined its group, with partitions or none) or
        the worker ended, at most twice the Kafka session timeout: a service turns SERVING only after this, so
        that records sent once health says SERVING are not met by a join-long backlog. A slow join is logged
        and the service serves anyway."""
        timeout_s = 2 * self.settings.kafka_session_timeout_ms / 1000
        waiting = asyncio.create_task(joined.wait())
        await asyncio.wait({waiting, worker}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done():
            waiting.cancel()
            if not worker.done():
                log.warning("%s not in its consumer group after %.0f s; serving anyway", name, timeout_s)

    def run_task(self, run: Callable[[asyncio.Event], Coroutine[Any, Any, None]], name: str) -> asyncio.Task[None]:
        """Runs `run(stop)` (a worker loop) as a task for the service's life: on shutdown `stop` is set and the task
        awaited, in the lifecycle's reverse order (so what was entered before it, e.g. its consumer, closes after
        it). A task that fails stops the service: a dead worker must not look healthy."""
        stop = asyncio.Event()
        task = asyncio.create_task(run(stop), name=name)

        def ended(done: asyncio.Task[None]) -> None:
            if not done.cancelled() and done.exception() is not None:
                log.error("task failed", exc_info=done.exception(), extra={"fields": {"task": name}})
                self.lifecycle.stop.set()

        task.add_done_callback(ended)

        async def stop_task() -> None:
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        self.lifecycle.stack.push_async_callback(stop_task)
        return task

    async def serve_grpc(self, server: GrpcServer, grace_s: float = 1.0) -> None:
        """Starts `server`; on stop it turns NOT_SERVING first and closes after the drain steps."""
        await server.start()
        self.lifecycle.on_not_serving(lambda: server.set_serving(False))
        self.lifecycle.stack.push_async_callback(server.stop, grace_s)


def configure_service_logging(settings: ServiceSettings) -> None:
    """Logging as the settings ask, for a service's __main__."""
    configure_logging(settings.service_name, settings.log_level, settings.log_format)
