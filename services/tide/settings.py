"""Settings of the Tide Engine replica (CLISONIX_* environment variables)."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

from pydantic import Field

from services.common.settings import ServiceSettings
from services.tide import state


class TideSettings(ServiceSettings):
    """One Tide replica: reads every partition of the command log, serves TideService.

    Every replica of one deployment must use the same limits, feed and dedupe lengths: they are part of the
    deterministic apply function.
    """

    service_name: str = "tide"
    grpc_port: int = Field(default=50054, ge=0, le=65535)
    metrics_port: int = Field(default=9104, ge=0, le=65535)
    # A write waits for its own record to come back through the log: send it at once.
    kafka_linger_ms: int = Field(default=0, ge=0)

    topic_log: str = "clisonix.tide.log.v1"

    max_key_bytes: int = Field(default=state.DEFAULT_MAX_KEY_BYTES, gt=0)
    max_value_bytes: int = Field(default=state.DEFAULT_MAX_VALUE_BYTES, gt=0)
    # Commands one BatchWrite may carry.
    max_batch_commands: int = Field(default=1000, gt=0)
    feed_length: int = Field(default=state.DEFAULT_FEED_LENGTH, gt=0)
    dedupe_length: int = Field(default=state.DEFAULT_DEDUPE_LENGTH, gt=0)

    # How long a write waits for this replica to apply it before answering DEADLINE_EXCEEDED (outcome unknown:
    # retry with the same command id), and how long a read waits for its minimum version.
    write_timeout_seconds: float = Field(default=10.0, gt=0)
    read_wait_seconds: float = Field(default=5.0, gt=0)
    # The snapshot file (None: no snapshots, a full replay on every start) and how often it is rewritten.
    snapshot_path: Path | None = None
    snapshot_interval_seconds: float = Field(default=30.0, gt=0)
    # How long a hole in a partition's offsets (a record a fetch skipped because it was not readable yet) is read
    # again before it is taken for a hole in the log itself and skipped.
    log_gap_wait_seconds: float = Field(default=10.0, gt=0)
    # This replica's name in the digest reports it appends (empty: host name and gRPC port). Unique per replica.
    replica_id: str = ""
    # How often a replica appends its digest at its applied offset to each partition it applied commands on
    # (the others compare it with theirs).
    digest_report_interval_seconds: float = Field(default=1.0, gt=0)
    # Applied offsets per partition whose digest each replica remembers, to compare with reports that arrive later.
    digest_history: int = Field(default=state.DEFAULT_DIGEST_HISTORY, gt=0)
    # How often the digest and applied-offset gauges are refreshed.
    metrics_interval_seconds: float = Field(default=1.0, gt=0)

    def resolved_replica_id(self) -> str:
        """replica_id, or host name and gRPC port (a StatefulSet pod's host name is its stable name); with port 0
        (chosen at bind time) a random suffix instead of the port."""
        if self.replica_id:
            return self.replica_id
        return f"{socket.gethostname()}:{self.grpc_port or uuid.uuid4().hex[:8]}"

    def limits(self) -> state.Limits:
        """The apply function's size limits."""
        return state.Limits(max_key_bytes=self.max_key_bytes, max_value_bytes=self.max_value_bytes)
