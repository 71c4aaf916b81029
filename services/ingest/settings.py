"""Settings of the ingest service (CLISONIX_* environment variables)."""

from __future__ import annotations

from pydantic import Field, SecretStr

from services.common.settings import ServiceSettings


class IngestSettings(ServiceSettings):
    """Ingest: gRPC streams in, clisonix.signals.raw.v1 out."""

    service_name: str = "ingest"
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    metrics_port: int = Field(default=9101, ge=0, le=65535)

    # Key of the HMAC that replaces subject and session ids; required, no default (a deployment secret).
    pseudonym_key: SecretStr = Field(min_length=16)
    topic_raw: str = "clisonix.signals.raw.v1"

    # Limits on every input.
    max_chunk_bytes: int = Field(default=1_048_576, gt=0)
    max_channels: int = Field(default=1024, gt=0)
    max_chunks_per_second: float = Field(default=1000.0, gt=0)
    max_chunk_burst: int = Field(default=200, gt=0)
    # Backpressure: a stream's client waits once this many of its chunks are unacknowledged.
    max_unacked_per_stream: int = Field(default=32, gt=0)
    # Duplicate detection memory: sequences remembered per stream, and streams remembered per process.
    dedupe_window: int = Field(default=1024, gt=0)
    max_tracked_streams: int = Field(default=4096, gt=0)
