"""Wires the inference service: model server (models + batchers), KServe v2 gRPC API with health and
reflection, metrics, energy, and the Kafka worker when it is enabled.
"""

from __future__ import annotations

import logging
from typing import Any

from services.common.rpc import GrpcServer
from services.common.runtime import ServiceRuntime
from services.inference.api import SERVICE_NAME, InferenceServicer, register
from services.inference.handlers import start_worker
from services.inference.metrics import InferenceMetrics
from services.inference.serving import ModelServer, model_server
from services.inference.settings import InferenceSettings

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
        if settings.kafka_worker:
            # Before serving: health turns SERVING once the worker is in its consumer group.
            self.worker = await start_worker(settings, runtime, self.models, self.metrics)
        servicer = InferenceServicer(self.models, self.metrics)
        self.grpc = GrpcServer(settings, [SERVICE_NAME], register(servicer))
        await runtime.serve_grpc(self.grpc)
        log.info(
            "inference ready",
            extra={
                "fields": {
                    "grpc_port": self.grpc.port,
                    "models": sorted(self.models.models),
                    "kafka_worker": self.worker is not None,
                }
            },
        )

    async def stop(self) -> None:
        self.runtime.lifecycle.stop.set()
        await self.runtime.lifecycle.shutdown()
