"""The pipeline latency the inference worker exports: a fused window's Kafka timestamp to its prediction."""

from __future__ import annotations

import pytest

from services.inference.handlers import pipeline_latency_s


def test_pipeline_latency_is_seconds_since_the_record_timestamp() -> None:
    assert pipeline_latency_s(1_700_000_000_000, 1_700_000_000.025) == pytest.approx(0.025, abs=1e-6)


def test_pipeline_latency_without_a_timestamp_is_none_and_never_negative() -> None:
    assert pipeline_latency_s(None, 1_700_000_000.0) is None
    assert pipeline_latency_s(-1, 1_700_000_000.0) is None
    # Another machine's clock ahead of ours: 0, not a negative latency.
    assert pipeline_latency_s(1_700_000_000_500, 1_700_000_000.0) == 0.0
