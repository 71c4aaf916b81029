"""Tide fixtures: replicas of one command log on the shared embedded broker, and their gRPC stubs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from clisonix.tide.v1 import tide_pb2_grpc
from services.common.broker import EmbeddedBroker
from services.tide.service import TideService
from services.tide.settings import TideSettings


@pytest.fixture
def tide_settings(broker: EmbeddedBroker, topic_name: Callable[[str], str]) -> Callable[..., TideSettings]:
    """Builds TideSettings for a test: loopback, port 0, one unique command log per test."""
    topic = topic_name("tide-log")

    def make(**overrides: Any) -> TideSettings:
        values: dict[str, Any] = {
            "kafka_bootstrap_servers": broker.bootstrap_servers,
            "grpc_host": "127.0.0.1",
            "grpc_port": 0,
            "metrics_host": "127.0.0.1",
            "metrics_port": 0,
            "topic_log": topic,
            "kafka_topic_partitions": 3,
            "kafka_request_timeout_ms": 5000,
            "kafka_session_timeout_ms": 6000,
            "drain_seconds": 0.5,
            "log_format": "text",
            "energy_source": "estimate",
        }
        values.update(overrides)
        return TideSettings(**values)

    return make


@pytest.fixture
async def tide_replica(
    tide_settings: Callable[..., TideSettings],
) -> AsyncIterator[Callable[..., Any]]:
    """Starts in-process replicas and returns (service, stub); stops them (and closes channels) after the test."""
    started: list[tuple[TideService, grpc.aio.Channel]] = []

    async def start(**overrides: Any) -> tuple[TideService, tide_pb2_grpc.TideServiceStub]:
        service = TideService(tide_settings(**overrides))
        await service.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}")
        started.append((service, channel))
        return service, tide_pb2_grpc.TideServiceStub(channel)

    yield start
    for service, channel in reversed(started):
        await channel.close()
        if not service.runtime.lifecycle.stop.is_set():  # a test may have stopped it already
            await service.stop()
