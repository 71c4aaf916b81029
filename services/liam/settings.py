"""Settings of the LIAM analytics service (CLISONIX_* environment variables)."""

from __future__ import annotations

from pydantic import Field

from services.common.settings import ServiceSettings
from services.liam import monitor


class LiamSettings(ServiceSettings):
    """LIAM: topic_liam_metrics in (one consumer group), clisonix.liam.patterns.v1 out, LiamService."""

    service_name: str = "liam"
    grpc_port: int = Field(default=50055, ge=0, le=65535)
    metrics_port: int = Field(default=9105, ge=0, le=65535)

    topic_patterns: str = "clisonix.liam.patterns.v1"
    consumer_group: str = "clisonix-liam"

    # Anomalies: records a stream needs before they are checked, and how many standard deviations from its
    # running mean a metric must be.
    warmup_records: int = Field(default=monitor.DEFAULT_WARMUP, ge=2)
    z_threshold: float = Field(default=monitor.DEFAULT_Z_THRESHOLD, gt=0)
    max_metrics: int = Field(default=monitor.DEFAULT_MAX_METRICS, gt=0)
    max_streams: int = Field(default=1000, gt=0)
    # How often each stream with new records gets a patterns report on the patterns topic.
    report_interval_seconds: float = Field(default=60.0, gt=0)

    # Binary hypervectors (Encode, Search): bits per vector, projection seed, and the in-memory stores' limits.
    hypervector_bits: int = Field(default=10_000, gt=0)
    hypervector_seed: int = 0
    max_search_stores: int = Field(default=16, gt=0)
    max_store_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
