"""Shared fixtures: one real embedded broker per test session, unique topics per test, ingest servers."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from services.common.broker import EmbeddedBroker

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
TEST_PSEUDONYM_KEY = "test-pseudonym-key-0123456789"


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """The embedded Kafka-protocol broker on a free loopback port, for the whole test session."""
    log_path = tmp_path_factory.mktemp("broker") / "broker.log"
    with EmbeddedBroker(port=0, log_path=log_path) as running:
        yield running


@pytest.fixture
def topic_name(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """Makes topic names unique to this test: topic_name("raw") -> "test.<test>.raw.<random>"."""
    test = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40]

    def make(purpose: str) -> str:
        return f"test.{test}.{purpose}.{uuid.uuid4().hex[:8]}"

    return make


@pytest.fixture
def ingest_settings(broker: EmbeddedBroker, topic_name: Callable[[str], str]) -> Callable[..., object]:
    """Builds IngestSettings for a test: loopback, port 0, unique topics; keyword arguments override."""
    from services.ingest.settings import IngestSettings

    def make(**overrides: object) -> IngestSettings:
        values: dict[str, object] = {
            "kafka_bootstrap_servers": broker.bootstrap_servers,
            "grpc_host": "127.0.0.1",
            "grpc_port": 0,
            "metrics_host": "127.0.0.1",
            "metrics_port": 0,
            "pseudonym_key": TEST_PSEUDONYM_KEY,
            "topic_raw": topic_name("raw"),
            "topic_deadletter": topic_name("deadletter"),
            "kafka_request_timeout_ms": 5000,
            "kafka_session_timeout_ms": 6000,
            "drain_seconds": 2.0,
            "log_format": "text",
        }
        values.update(overrides)
        return IngestSettings(**values)  # type: ignore[arg-type]

    return make


@pytest.fixture
async def ingest_service(ingest_settings: Callable[..., object]) -> AsyncIterator[Callable[..., object]]:
    """Starts in-process ingest services (real gRPC, real broker); stops them after the test."""
    from services.ingest.service import IngestService

    started: list[IngestService] = []

    async def start(**overrides: object) -> IngestService:
        service = IngestService(ingest_settings(**overrides))  # type: ignore[arg-type]
        await service.start()
        started.append(service)
        return service

    yield start
    for service in reversed(started):
        await service.stop()


@pytest.fixture
def fusion_settings(broker: EmbeddedBroker, topic_name: Callable[[str], str]) -> Callable[..., object]:
    """Builds FusionSettings for a test: loopback, port 0, unique topics and group; keyword arguments override."""
    from services.fusion.settings import FusionSettings

    group = topic_name("fusion-group")

    def make(**overrides: object) -> FusionSettings:
        values: dict[str, object] = {
            "kafka_bootstrap_servers": broker.bootstrap_servers,
            "grpc_host": "127.0.0.1",
            "grpc_port": 0,
            "metrics_host": "127.0.0.1",
            "metrics_port": 0,
            "topic_raw": topic_name("raw"),
            "topic_fused": topic_name("fused"),
            "topic_deadletter": topic_name("deadletter"),
            "consumer_group": group,
            "kafka_request_timeout_ms": 5000,
            "kafka_session_timeout_ms": 6000,
            "idle_flush_seconds": 2.0,
            "drain_seconds": 0.5,
            "log_format": "text",
        }
        values.update(overrides)
        return FusionSettings(**values)  # type: ignore[arg-type]

    return make


@pytest.fixture
async def fusion_service(fusion_settings: Callable[..., object]) -> AsyncIterator[Callable[..., object]]:
    """Starts in-process fusion workers (real consumer group, real broker); stops them after the test."""
    from services.fusion.service import FusionService

    started: list[FusionService] = []

    async def start(**overrides: object) -> FusionService:
        service = FusionService(fusion_settings(**overrides))  # type: ignore[arg-type]
        await service.start()
        started.append(service)
        return service

    yield start
    for service in reversed(started):
        await service.stop()
