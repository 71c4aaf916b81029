"""The inference service's own metrics, declared once, beside the common ServiceMetrics in the same registry.

Labels are bounded: `model` and `variant` come from the loaded repository (never from a request's text), `path`
is "grpc" or "kafka", `source` is the energy source.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Gauge, Histogram

from services.common.metrics import LATENCY_BUCKETS, PREFIX, ServiceMetrics

PATHS = ("grpc", "kafka")
# Batches and their parts are shorter than a stage: start at 50 microseconds.
FAST_BUCKETS = (0.00005, 0.0001, 0.00025, *LATENCY_BUCKETS)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# One small model's inference is in the millijoules.
JOULE_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


@dataclass(frozen=True)
class InferenceMetrics:
    """request_latency_seconds{model,path}: a request (ModelInfer call, or one window in the Kafka worker) from
        arrival to answer; queue_delay_seconds{model}: a request's wait in its model's batcher;
    batch_size{model}: rows per forward pass; compute_seconds{model}: wall time of each forward pass;
    energy_joules{model,variant,source}: each request's share of its batch's energy ("estimate" is never a
        measurement: the label says so);
    active_model_info{task,model,version,source}: 1 for the model version serving the task (source "tide" or
        "default"; only with Tide, and only served model versions are ever labels, never a record's text).
    """

    request_latency_seconds: Histogram
    queue_delay_seconds: Histogram
    batch_size: Histogram
    compute_seconds: Histogram
    energy_joules: Histogram
    active_model_info: Gauge

    @classmethod
    def create(cls, metrics: ServiceMetrics) -> InferenceMetrics:
        """Registers the metrics in `metrics.registry` (once per registry)."""
        registry = metrics.registry
        return cls(
            request_latency_seconds=Histogram(
                f"{PREFIX}_inference_request_latency_seconds",
                "Inference request latency, arrival to answer, by model and path (grpc, kafka)",
                ["model", "path"],
                buckets=FAST_BUCKETS,
                registry=registry,
            ),
            queue_delay_seconds=Histogram(
                f"{PREFIX}_inference_queue_delay_seconds",
                "Time a request waited in the dynamic batcher before its forward pass started",
                ["model"],
                buckets=FAST_BUCKETS,
                registry=registry,
            ),
            batch_size=Histogram(
                f"{PREFIX}_inference_batch_size",
                "Rows in each forward pass",
                ["model"],
                buckets=BATCH_BUCKETS,
                registry=registry,
            ),
            compute_seconds=Histogram(
                f"{PREFIX}_inference_compute_seconds",
                "Wall time of each forward pass",
                ["model"],
                buckets=FAST_BUCKETS,
                registry=registry,
            ),
            energy_joules=Histogram(
                f"{PREFIX}_inference_energy_joules",
                "Energy per inference request: its rows' share of the batch's energy, attributed by the forward "
                "pass's CPU time (rapl, nvml: measured machine energy; estimate: CPU time x watts per core)",
                ["model", "variant", "source"],
                buckets=JOULE_BUCKETS,
                registry=registry,
            ),
            active_model_info=Gauge(
                f"{PREFIX}_inference_active_model_info",
                "1 for the model version the Kafka worker serves its task with (source: tide or default)",
                ["task", "model", "version", "source"],
                registry=registry,
            ),
        )

    def observe_request(self, model: str, path: str, seconds: float) -> None:
        """Records one request's latency; `path` is "grpc" or "kafka"."""
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        self.request_latency_seconds.labels(model=model, path=path).observe(seconds)
