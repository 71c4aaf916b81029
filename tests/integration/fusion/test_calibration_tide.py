"""Fusion with Tide on a real broker: a subject's first good windows become a baseline written to
calibration/<subject>/<modality>, later windows carry it with their delta, and a baseline already in Tide is used
from a subject's first window."""

from __future__ import annotations

import statistics
from collections import defaultdict

import pytest

from clisonix.fusion.v1 import fusion_pb2
from clisonix.signal.v1 import signal_pb2
from services.common.chunks import to_chunk
from services.common.kafka import kafka_producer
from services.common.settings import ServiceSettings
from services.fusion.calibration import Baseline, good_window, scalar_features
from services.ingest.sources import SyntheticSource
from services.tide.client import JSON, TideCache, TideClient, calibration_key, decode_json, encode_json
from tests.helpers import wait_for
from tests.integration.fusion.helpers import fused_windows

# The Tide fixtures (borrowed, not moved: wherever tests/ keeps them, this module sees them).

pytestmark = pytest.mark.integration

WINDOWS = 5
SUBJECT_A = "ps-calibration-subject-a"
SUBJECT_B = "ps-calibration-subject-b"


def subject_chunks(session: str, subject: str, seconds: float, seed: int) -> list[signal_pb2.SignalChunk]:
    """A synthetic ECG + PPG session of `subject`, as ingest writes it (pseudonyms, sequences from 0 per stream)."""
    source = SyntheticSource(modalities=("ecg", "ppg"), duration_s=seconds, start_time_s=0.0, seed=seed)
    sequences: dict[str, int] = defaultdict(int)
    chunks = []
    for block in source.blocks():
        chunks.append(to_chunk(block, session, sequences[block.spec.stream_id], subject))
        sequences[block.spec.stream_id] += 1
    return chunks


def ecg_of(window: fusion_pb2.FusedWindow) -> fusion_pb2.StreamWindow:
    return next(s for s in window.streams if s.modality == signal_pb2.MODALITY_ECG)


async def test_baselines_are_seeded_in_tide_and_carried_by_later_windows(
    broker,
    fusion_service,
    tide_replica,  # noqa: F811
) -> None:
    replica, _ = await tide_replica()
    target = f"127.0.0.1:{replica.grpc_port}"
    client = TideClient(target)
    seeded = Baseline({"heart_rate_bpm": 50.0}, {"heart_rate_bpm": 7}, 7)
    await client.compare_and_set(
        calibration_key(SUBJECT_B, "ecg"), encode_json(seeded.to_json()), JSON, expect_absent=True
    )
    fusion = await fusion_service(tide_targets=target, calibration_windows=WINDOWS, idle_flush_seconds=30.0)
    assert fusion.calibration is not None
    settings = fusion.settings
    chunks_a = subject_chunks("ps-calibration-session-a", SUBJECT_A, 22.0, seed=3)
    first_part = [c for c in chunks_a if c.first_sample_time_s < 12.0]
    key_ecg, key_ppg = calibration_key(SUBJECT_A, "ecg"), calibration_key(SUBJECT_A, "ppg")

    async with (
        kafka_producer(ServiceSettings(kafka_bootstrap_servers=broker.bootstrap_servers)) as events,
        TideCache(TideClient(target), "calibration/") as watched,
    ):
        for chunk in first_part:
            await events.send(settings.topic_raw, chunk.session_id, chunk)
        await events.producer.flush()
        # The baselines of subject A reach Tide, then fusion's own cache.
        await wait_for(lambda: watched.get(key_ecg) is not None and watched.get(key_ppg) is not None, 20.0)
        await wait_for(lambda: all(fusion.calibration.cache.get(k) is not None for k in (key_ecg, key_ppg)), 10.0)
        for chunk in [
            *chunks_a[len(first_part) :],
            *subject_chunks("ps-calibration-session-b", SUBJECT_B, 8.0, seed=4),
        ]:
            await events.send(settings.topic_raw, chunk.session_id, chunk)
        await events.producer.flush()
        await watched.client.close()

    windows_a = await fused_windows(
        broker.bootstrap_servers, settings.topic_fused, "ps-calibration-session-a", 21.0, timeout_s=20.0
    )
    stored = Baseline.from_json(decode_json(await client.get(key_ecg)))
    assert stored is not None and stored.windows == WINDOWS
    # The baseline is the median over the first good windows fusion produced for the subject.
    good = [ecg_of(w) for w in windows_a if good_window(ecg_of(w), settings.calibration_min_coverage)]
    good = [s for s in good if scalar_features(s.features)][:WINDOWS]
    rates = [s.features.ecg.heart_rate_bpm for s in good]
    assert stored.medians["heart_rate_bpm"] == pytest.approx(statistics.median(rates))
    assert stored.counts["heart_rate_bpm"] == WINDOWS
    assert not ecg_of(windows_a[0]).HasField("calibration"), "no baseline existed yet"
    later = [w for w in windows_a if w.start_s >= 12.0]
    assert later
    for window in later:
        for stream in window.streams:
            calibration = stream.calibration
            assert calibration.subject_id == SUBJECT_A
            assert calibration.baseline_windows == WINDOWS
        ecg = ecg_of(window)
        assert dict(ecg.calibration.baseline) == pytest.approx(dict(stored.medians))
        if ecg.features.ecg.HasField("heart_rate_bpm"):
            assert ecg.calibration.delta["heart_rate_bpm"] == pytest.approx(
                ecg.features.ecg.heart_rate_bpm - stored.medians["heart_rate_bpm"]
            )
    assert any("heart_rate_bpm" in ecg_of(w).calibration.delta for w in later)

    # Subject B: the baseline already in Tide is used from the first window, and not written again.
    windows_b = await fused_windows(
        broker.bootstrap_servers, settings.topic_fused, "ps-calibration-session-b", 7.0, timeout_s=20.0
    )
    for window in windows_b:
        ecg = ecg_of(window)
        assert ecg.calibration.subject_id == SUBJECT_B
        assert dict(ecg.calibration.baseline) == {"heart_rate_bpm": 50.0}
        assert ecg.calibration.baseline_windows == 7
        if ecg.features.ecg.HasField("heart_rate_bpm"):
            assert ecg.calibration.delta["heart_rate_bpm"] == pytest.approx(ecg.features.ecg.heart_rate_bpm - 50.0)
    assert Baseline.from_json(decode_json(await client.get(calibration_key(SUBJECT_B, "ecg")))) == seeded
    registry = fusion.runtime.metrics.registry
    assert registry.get_sample_value("clisonix_fusion_calibration_writes_total", {"outcome": "applied"}) >= 2
    assert registry.get_sample_value("clisonix_fusion_calibrated_streams_total") > 0
    await client.close()
