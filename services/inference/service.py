"""Wires the inference service: model server (models + batchers), KServe v2 gRPC API with health and
reflection, metrics, energy, the Kafka worker when it is enabled, and, with tide_targets set, the follower of
Tide's active model for the worker's task.
"""

from __future__ import annotations

import logging
from typing import Any

from services.common.errors import NotFound
from services.common.rpc import GrpcServer
from services.common.runtime import ServiceRuntime
from services.inference.activation import ActiveModelFollower, ActiveModelSelector
from services.inference.api import SERVICE_NAME, InferenceServicer, register
from services.inference.handlers import start_worker
from services.inference.metrics import InferenceMetrics
from services.inference.serving import ModelServer, model_server
from services.inference.settings import InferenceSettings
from services.tide.client import client_from_settings

log = logging.getLogger(__name__)


class InferenceService:
    """The running inference service. `await start()`, then `await runtime.lifecycle.run_until_stopped()`.

    On stop: health and ServerReady turn NOT_SERVING / false, the gRPC server lets running calls finish (grace),
    the worker stops, then every batcher finishes what is queued, then metrics and energy export close.
    """

    def __init__(self, settings: InferenceSettings, runtime: ServiceRuntime | None = None) -> None:
        self.settings = settings
        self.runtime = runtime or ServiceRuntime(settings)
        self.metrics: InferenceMetrics | None = None
        self.models: ModelServer | None = None
        self.grpc: GrpcServer | None = None
        self.worker: Any = None
        self.selector: ActiveModelSelector | None = None
        self.follower: ActiveModelFollower | None = None

    @property
    def grpc_port(self) -> int:
        assert self.grpc is not None, "not started"
        return self.grpc.port

    async def start(self) -> None:
        settings = self.settings
        runtime = self.runtime
        await runtime.start()
        self.metrics = InferenceMetrics.create(runtime.metrics)
        self.models = model_server(settings, runtime.energy, self.metrics)
        # Entered before the gRPC server, so it closes after it: calls in their grace period still get answers.
        runtime.lifecycle.stack.push_async_callback(self.models.close)
        await self.models.load()
        runtime.lifecycle.on_not_serving(self.models.set_not_ready)
        await self._follow_tide()
        selector = self.selector
        if settings.kafka_worker:
            # Before serving: health turns SERVING once the worker is in its consumer group.
            self.worker = await start_worker(
                settings,
                runtime,
                self.models,
                self.metrics,
                active=(lambda: selector.served) if selector is not None else None,
            )
        servicer = InferenceServicer(
            self.models, self.metrics, active=(lambda: selector.choice) if selector is not None else None
        )
        self.grpc = GrpcServer(settings, [SERVICE_NAME], register(servicer))
        await runtime.serve_grpc(self.grpc)
        log.info(
            "inference ready",
            extra={
                "fields": {
                    "grpc_port": self.grpc.port,
                    "models": sorted(self.models.models),
                    "kafka_worker": self.worker is not None,
                    "active_model": (
                        f"{choice.model}/{choice.version} ({choice.source})"
                        if self.selector is not None and (choice := self.selector.choice) is not None
                        else None
                    ),
                }
            },
        )

    async def _follow_tide(self) -> None:
        """With tide_targets set: follows Tide's active model for settings.task (loaded once before the worker
        starts, so its first window already runs on it). Without: nothing (the worker runs worker_model)."""
        settings = self.settings
        client = client_from_settings(settings)
        if client is None:
            return
        assert self.models is not None
        try:
            default = self.models.get(settings.worker_model, settings.worker_model_version)
        except NotFound:
            if settings.kafka_worker:
                raise
            default = None  # no worker: the selection only steers ModelInfer
        self.selector = ActiveModelSelector(self.models, settings.task, default, self.metrics)
        self.follower = ActiveModelFollower(client, self.selector)
        # Entered after the model server, so closed before it; the follower's task stops first.
        self.runtime.lifecycle.stack.push_async_callback(self.follower.close)
        await self.follower.start()
        self.runtime.run_task(self.follower.run, "inference-active-model")

    async def stop(self) -> None:
        self.runtime.lifecycle.stop.set()
        await self.runtime.lifecycle.shutdown()
