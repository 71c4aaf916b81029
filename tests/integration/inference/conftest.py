"""Inference worker fixtures: services with the Kafka worker on unique topics, and MIT-BIH record 100."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from services.inference.dataset import EcgRecord, load_record
from tests.conftest import TINY_TORCH


@pytest.fixture(scope="module")
def record() -> EcgRecord:
    """MIT-BIH record 100, lead MLII, filtered as fusion filters ECG, on the 256 Hz grid, with its beats."""
    return load_record()


@pytest.fixture
def worker(broker, topic_name, inference_service) -> Callable[..., object]:
    """Starts inference services with the Kafka worker on unique topics (shared by the services a test starts,
    unless overridden) over the tiny torch model."""
    topics = {
        "kafka_bootstrap_servers": broker.bootstrap_servers,
        "topic_fused": topic_name("fused"),
        "topic_results": topic_name("results"),
        "topic_deadletter": topic_name("deadletter"),
        "consumer_group": topic_name("inference-group"),
        "kafka_request_timeout_ms": 5000,
        "kafka_session_timeout_ms": 6000,
    }

    async def start(**overrides: object):
        values = {
            **topics,
            "kafka_worker": True,
            "models": (TINY_TORCH,),
            "worker_model": TINY_TORCH,
            "max_batch_size": 1024,
            **overrides,
        }
        return await inference_service(**values)

    start.topics = topics  # type: ignore[attr-defined]
    return start
