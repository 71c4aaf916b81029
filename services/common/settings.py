"""Settings read once from CLISONIX_* environment variables into one frozen object per service.

Each service extends `ServiceSettings`; tests build settings with keyword arguments instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """What every service shares: Kafka, gRPC, metrics, security, logging and energy accounting."""

    model_config = SettingsConfigDict(env_prefix="CLISONIX_", frozen=True, extra="ignore")

    service_name: str = "clisonix"

    # Kafka. Defaults suit the embedded broker; Apache Kafka deployments set these from the environment.
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_compression: Literal["lz4", "zstd", "gzip", "none"] = "lz4"
    # Batching: the embedded broker degrades under unbatched sends, and batches are cheaper on Kafka too.
    kafka_linger_ms: int = Field(default=20, ge=0)
    kafka_max_batch_bytes: int = Field(default=262_144, gt=0)
    kafka_max_request_bytes: int = Field(default=4_194_304, gt=0)
    kafka_request_timeout_ms: int = Field(default=30_000, gt=0)
    # A waiting fetch on the embedded broker is not woken by new data, so keep the wait short locally.
    kafka_fetch_max_wait_ms: int = Field(default=5, ge=0)
    kafka_session_timeout_ms: int = Field(default=10_000, gt=0)
    kafka_heartbeat_interval_ms: int = Field(default=1_000, gt=0)
    kafka_topic_partitions: int = Field(default=3, gt=0)
    kafka_replication_factor: int = Field(default=1, gt=0)
    topic_deadletter: str = "clisonix.deadletter.v1"
    # Create the topics the service uses if they are missing (off where an operator manages topics).
    create_topics: bool = True
    # Every service publishes its own operating metrics (latency, throughput, power, lag, CPU) to LIAM's
    # metrics topic each interval, as stream "service/<name>"; 0 turns it off.
    topic_liam_metrics: str = "clisonix.liam.metrics.v1"
    operating_metrics_interval_seconds: float = Field(default=10.0, ge=0)

    # gRPC.
    grpc_host: str = "0.0.0.0"
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    grpc_max_message_bytes: int = Field(default=8_388_608, gt=0)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # With a client CA, clients must present a certificate signed by it (mTLS).
    tls_client_ca_file: Path | None = None
    auth_token: SecretStr | None = None

    # The Tide replicas this service reads and writes shared state through ("host:port", comma-separated; the
    # client moves to the next when one is unavailable). Empty: the service runs without Tide.
    tide_targets: str = ""
    tide_token: SecretStr | None = None

    # Metrics, logs, shutdown.
    metrics_host: str = "0.0.0.0"
    metrics_port: int = Field(default=9101, ge=0, le=65535)
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    drain_seconds: float = Field(default=5.0, ge=0)

    # Energy accounting where no RAPL/NVML counter can be read: CPU seconds x watts per busy core.
    energy_source: Literal["auto", "rapl", "nvml", "estimate"] = "auto"
    energy_watts_per_core: float = Field(default=10.0, gt=0)
    powercap_root: Path = Path("/sys/class/powercap")
    grid_intensity_g_per_kwh: float = Field(default=400.0, ge=0)

    @model_validator(mode="after")
    def _tls_pair(self) -> ServiceSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file")
        return self
