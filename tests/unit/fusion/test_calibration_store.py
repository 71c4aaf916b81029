"""CalibrationStore without a network: cached baselines fill windows, a complete baseline is written in the
background (one write per subject and modality at a time, never holding up the window), failures are retried
later, conflicts and foreign values are left to the winner, and a deleted baseline is gathered afresh."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import CollectorRegistry

from clisonix.fusion.v1 import fusion_pb2
from clisonix.signal.v1 import signal_pb2
from services.common.errors import Unavailable
from services.common.metrics import ServiceMetrics
from services.fusion.baselines import CalibrationStore
from services.fusion.calibration import Baseline
from services.fusion.handlers import FusionMetrics
from services.fusion.settings import FusionSettings
from services.tide.client import JSON, WriteResult, decode_json, encode_json
from services.tide.state import Change, Entry, Outcome, Version

SUBJECT = "ps-subject"
KEY = f"calibration/{SUBJECT}/ecg"


class FakeTide:
    """compare_and_set that waits for `release` and then answers `outcome` (or raises `error`)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.release = asyncio.Event()
        self.outcome = Outcome.APPLIED
        self.error: Exception | None = None

    async def compare_and_set(self, key: str, value: bytes, content_type: str, **options: Any) -> WriteResult:
        assert options == {"expect_absent": True} and content_type == JSON
        self.calls.append((key, value))
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return WriteResult(self.outcome, Version(0, len(self.calls)), None, "c")

    async def close(self) -> None:
        pass


def make_store(**overrides: Any) -> tuple[CalibrationStore, FakeTide, CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = FusionMetrics.create(ServiceMetrics.create("fusion", registry))
    settings = FusionSettings(calibration_windows=3, **overrides)
    tide = FakeTide()
    return CalibrationStore(tide, settings, metrics), tide, registry  # type: ignore[arg-type]


def cache_holds(store: CalibrationStore, key: str, value: bytes, offset: int = 1) -> None:
    """Puts an entry in the store's cache as a Watch change would (the cache's entries, set directly)."""
    store.cache._entries[key] = Entry(key, value, JSON, Version(0, offset))


def window(heart_rate: float) -> fusion_pb2.FusedWindow:
    ecg = fusion_pb2.StreamWindow(
        stream_id="ecg-0",
        modality=signal_pb2.MODALITY_ECG,
        coverage=1.0,
        features=fusion_pb2.StreamFeatures(ecg=fusion_pb2.EcgFeatures(heart_rate_bpm=heart_rate)),
    )
    return fusion_pb2.FusedWindow(session_id="ps-session", streams=[ecg])


def writes(registry: CollectorRegistry, outcome: str) -> float:
    return registry.get_sample_value("clisonix_fusion_calibration_writes_total", {"outcome": outcome}) or 0.0


async def test_a_complete_baseline_is_written_once_in_the_background_then_used_from_the_cache() -> None:
    store, tide, registry = make_store()
    for rate in (60.0, 70.0, 65.0):
        store.annotate(SUBJECT, window(rate))  # returns at once: the write waits for `release`
    await asyncio.sleep(0)
    assert store.writes_in_flight == 1 and len(tide.calls) == 1
    key, value = tide.calls[0]
    assert key == KEY
    assert (
        decode_json(Entry(key, value, JSON, Version(0, 0)))
        == Baseline({"heart_rate_bpm": 65.0}, {"heart_rate_bpm": 3}, 3).to_json()
    )
    for _ in range(3):
        store.annotate(SUBJECT, window(80.0))  # no second write while one is in flight
    await asyncio.sleep(0)
    assert len(tide.calls) == 1
    tide.release.set()
    await asyncio.sleep(0.01)
    assert store.writes_in_flight == 0 and writes(registry, "applied") == 1

    cache_holds(store, KEY, value)
    annotated = window(72.0)
    store.annotate(SUBJECT, annotated)
    calibration = annotated.streams[0].calibration
    assert calibration.subject_id == SUBJECT
    assert dict(calibration.baseline) == {"heart_rate_bpm": 65.0} and dict(calibration.delta) == {"heart_rate_bpm": 7.0}
    assert calibration.baseline_windows == 3 and dict(calibration.baseline_counts) == {"heart_rate_bpm": 3}
    assert len(store.book) == 0  # what was gathered is no longer needed
    assert registry.get_sample_value("clisonix_fusion_calibrated_streams_total") == 1
    await store.close()


async def test_a_failed_write_is_retried_after_the_retry_interval() -> None:
    store, tide, registry = make_store(calibration_retry_seconds=0.05)
    tide.error = Unavailable("tide down", reason="tide_unavailable")
    tide.release.set()
    for rate in (60.0, 61.0, 62.0):
        store.annotate(SUBJECT, window(rate))
    await asyncio.sleep(0.01)
    assert writes(registry, "failed") == 1
    store.annotate(SUBJECT, window(63.0))  # too soon
    await asyncio.sleep(0)
    assert len(tide.calls) == 1
    await asyncio.sleep(0.06)
    tide.error = None
    store.annotate(SUBJECT, window(63.0))
    await asyncio.sleep(0.01)
    assert len(tide.calls) == 2 and tide.calls[0][1] == tide.calls[1][1]  # the same baseline
    assert writes(registry, "applied") == 1
    await store.close()


async def test_a_conflict_leaves_the_winners_baseline_and_windows_without_one_until_it_is_cached() -> None:
    store, tide, registry = make_store()
    tide.outcome = Outcome.CAS_CONFLICT
    tide.release.set()
    for rate in (60.0, 61.0, 62.0):
        store.annotate(SUBJECT, window(rate))
    await asyncio.sleep(0.01)
    assert writes(registry, "conflict") == 1
    pending = window(70.0)
    store.annotate(SUBJECT, pending)
    assert not pending.streams[0].HasField("calibration")
    theirs = Baseline({"heart_rate_bpm": 55.0}, {"heart_rate_bpm": 3}, 3)
    cache_holds(store, KEY, encode_json(theirs.to_json()))
    store.annotate(SUBJECT, pending)
    assert dict(pending.streams[0].calibration.delta) == {"heart_rate_bpm": 15.0}
    await store.close()


async def test_foreign_values_are_left_alone_and_deleted_baselines_gathered_afresh() -> None:
    store, tide, registry = make_store()
    tide.release.set()
    cache_holds(store, KEY, b"not json at all")
    for rate in (60.0, 61.0, 62.0, 63.0):
        plain = window(rate)
        store.annotate(SUBJECT, plain)
        assert not plain.streams[0].HasField("calibration")
    await asyncio.sleep(0)
    assert tide.calls == [] and writes(registry, "invalid") == 1  # reported once per stored version

    del store.cache._entries[KEY]
    store._changed(Change(KEY, True, b"", "", Version(0, 2)))
    for rate in (80.0, 81.0, 82.0):
        store.annotate(SUBJECT, window(rate))
    await asyncio.sleep(0.01)
    assert len(tide.calls) == 1
    assert (
        decode_json(Entry(KEY, tide.calls[0][1], JSON, Version(0, 0)))["features"]["heart_rate_bpm"]["median"] == 81.0
    )
    await store.close()


async def test_windows_without_a_subject_are_left_as_they_are() -> None:
    store, tide, _ = make_store()
    for subject in ("", "ps-a/b"):
        for rate in (60.0, 61.0, 62.0):
            store.annotate(subject, window(rate))
    await asyncio.sleep(0)
    assert tide.calls == [] and len(store.book) == 0
    await store.close()
