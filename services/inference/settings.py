"""Settings of the inference service (CLISONIX_* environment variables)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from services.common.settings import ServiceSettings


class InferenceSettings(ServiceSettings):
    """Inference: the KServe v2 gRPC API over a model repository, and a Kafka worker from
    clisonix.signals.fused.v1 to clisonix.inference.results.v1; both share each model's dynamic batcher.
    """

    service_name: str = "inference"
    # 8001 is where Triton / KServe gRPC clients look by default.
    grpc_port: int = Field(default=8001, ge=0, le=65535)
    metrics_port: int = Field(default=9103, ge=0, le=65535)

    # The model repository: <model_repository>/<name>/<version>/{metadata.json, model file}.
    model_repository: Path = Path("models")
    # Which models to serve (all their versions); empty: every model in the repository. In the environment a
    # comma-separated list or a JSON array: CLISONIX_MODELS=ecg-beat-pruned,ecg-beat-student
    models: Annotated[tuple[str, ...], NoDecode] = ()

    # Dynamic batching, per model version: at most this many rows (segments) per forward pass ...
    max_batch_size: int = Field(default=32, gt=0)
    # ... and, when the model is idle, how long the first queued request waits for others to join it. 0 runs
    # at once (requests still batch up while a forward pass runs), which keeps ModelInfer at batch 1 fast.
    max_queue_delay_ms: float = Field(default=0.0, ge=0)

    # The Kafka worker (services.inference.handlers): fused windows in, predictions out.
    kafka_worker: bool = True
    topic_fused: str = "clisonix.signals.fused.v1"
    topic_results: str = "clisonix.inference.results.v1"
    consumer_group: str = "clisonix-inference"
    # The model (and version; empty: the newest) the worker runs on each window's ECG.
    worker_model: str = "ecg-beat-pruned"
    worker_model_version: str = ""
    # The task the worker serves. With tide_targets set, Tide's record models/active/<task> names the model version
    # to serve instead of worker_model (services.inference.activation); without Tide it is not used.
    task: str = Field(default="ecg-beat", pattern=r"^[^/]+$")

    @field_validator("models", mode="before")
    @classmethod
    def _model_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return tuple(json.loads(text))
            return tuple(name.strip() for name in text.split(",") if name.strip())
        return value

    @property
    def max_queue_delay_s(self) -> float:
        """max_queue_delay_ms in seconds."""
        return self.max_queue_delay_ms / 1000.0
