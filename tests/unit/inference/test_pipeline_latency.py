"""The pipeline latency the inference worker exports: ingest receiving the chunk that completed a window to its
prediction (the window's record timestamp when its chunks carried no ingest time)."""

from __future__ import annotations

import pytest

from clisonix.fusion.v1 import fusion_pb2
from services.inference.handlers import pipeline_latency_s, pipeline_start_s


def window(*ingest_ns: int) -> fusion_pb2.FusedWindow:
    message = fusion_pb2.FusedWindow()
    for ns in ingest_ns:
        stream = message.streams.add()
        if ns:
            stream.chunks.last_ingest_time.FromNanoseconds(ns)
    return message


def test_the_pipeline_starts_at_the_newest_ingest_time_of_the_window() -> None:
    start = pipeline_start_s(window(1_700_000_000_000_000_000, 1_700_000_000_020_000_000, 0), 1_700_000_001_000)
    assert start == pytest.approx(1_700_000_000.020)
    assert pipeline_latency_s(start, 1_700_000_000.045) == pytest.approx(0.025, abs=1e-6)


def test_without_ingest_times_the_record_timestamp_and_without_either_none() -> None:
    assert pipeline_start_s(window(0), 1_700_000_000_500) == pytest.approx(1_700_000_000.5)
    assert pipeline_start_s(window(), None) is None
    assert pipeline_latency_s(None, 1_700_000_000.0) is None
    # Another machine's clock ahead of ours: 0, not a negative latency.
    assert pipeline_latency_s(1_700_000_000.5, 1_700_000_000.0) == 0.0
