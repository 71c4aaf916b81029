"""Calibration baselines in Tide: read from a local cache of calibration/, gathered and written when missing.

With CLISONIX_TIDE_TARGETS set, fusion keeps a TideCache of every key under "calibration/" (List, then Watch).
For each stream window of a subject: when calibration/<subject>/<modality> is cached, the window gets the baseline
and its delta; otherwise the window feeds the CalibrationBook, and once the book has a baseline it is written with
an expect-absent compare-and-set, so concurrent workers agree on exactly one (a conflict means another worker won:
its baseline is used once the cache has it).

The write never holds up a window: it runs as a background task, at most one per (subject, modality) and
MAX_WRITES_IN_FLIGHT in all; a failure is logged (error type only: no subject, no value) and tried again on a later
window after calibration_retry_seconds. Deleting a key in Tide makes fusion gather that baseline afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from clisonix.fusion.v1 import fusion_pb2
from services.common.chunks import modality_name
from services.common.errors import ClisonixError
from services.fusion.calibration import Baseline, CalibrationBook, scalar_features
from services.fusion.handlers import FusionMetrics
from services.fusion.settings import FusionSettings
from services.tide.client import JSON, TideCache, TideClient, calibration_key, decode_json, encode_json
from services.tide.state import Change, Outcome, Version

log = logging.getLogger(__name__)

PREFIX = "calibration/"
MAX_WRITES_IN_FLIGHT = 64
# Modalities a baseline is kept for (the others have no meaningful features).
_SKIPPED_MODALITIES = frozenset({"unspecified", "unknown"})
# How long to wait before loading the cache again when Tide was unreachable at start.
_RELOAD_DELAY_S = 2.0


def _key_parts(key: str) -> tuple[str, str] | None:
    parts = key.removeprefix(PREFIX).split("/")
    return (parts[0], parts[1]) if key.startswith(PREFIX) and len(parts) == 2 else None


class CalibrationStore:
    """Fills StreamWindow.calibration from Tide and seeds missing baselines. `await start()`, `annotate()` each
    window before it is produced, `await close()` at shutdown (closes the client too)."""

    def __init__(self, client: TideClient, settings: FusionSettings, metrics: FusionMetrics) -> None:
        self.client = client
        self.retry_seconds = settings.calibration_retry_seconds
        self.book = CalibrationBook(
            settings.calibration_windows, settings.calibration_min_coverage, settings.calibration_max_pending
        )
        self.cache = TideCache(client, PREFIX, on_change=self._changed)
        self.loaded = False
        self._used = metrics.calibrated_streams_total
        self._writes_total = metrics.calibration_writes_total
        # Decoded cache entries by key, with the version they were decoded at (None: not a baseline).
        self._decoded: dict[str, tuple[Version, Baseline | None]] = {}
        self._writes: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._next_try: dict[tuple[str, str], float] = {}
        self._loader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Loads the cache and follows it; when Tide does not answer, keeps trying in the background (windows go
        out without calibration meanwhile, and baselines are still gathered and written)."""
        try:
            await self.cache.start()
            self.loaded = True
        except ClisonixError as exc:
            log.warning("tide unavailable, calibration cache loads later", extra={"fields": {"reason": exc.reason}})
            self._loader = asyncio.create_task(self._load_later(), name="calibration-cache-load")

    async def _load_later(self) -> None:
        while not self.loaded:
            await asyncio.sleep(_RELOAD_DELAY_S)
            try:
                await self.cache.start()
                self.loaded = True
                log.info("calibration cache loaded")
            except ClisonixError:
                continue

    async def close(self) -> None:
        tasks = [t for t in (self._loader, *self._writes.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.cache.close()
        await self.client.close()

    @property
    def writes_in_flight(self) -> int:
        return len(self._writes)

    def baseline(self, subject: str, modality: str) -> tuple[bool, Baseline | None]:
        """Whether the cache holds calibration/<subject>/<modality>, and its baseline (None when the value is
        not a baseline this version reads)."""
        key = f"{PREFIX}{subject}/{modality}"
        entry = self.cache.get(key)
        if entry is None:
            return False, None
        known = self._decoded.get(key)
        if known is not None and known[0] == entry.version:
            return True, known[1]
        try:
            baseline = Baseline.from_json(decode_json(entry))
        except (ClisonixError, ValueError):
            baseline = None
        if baseline is None:
            self._writes_total.labels("invalid").inc()
            log.warning("calibration value in tide is not a baseline; left alone")
        self._decoded[key] = (entry.version, baseline)
        return True, baseline

    def annotate(self, subject: str, window: fusion_pb2.FusedWindow) -> None:
        """Fills each stream's calibration from the cached baseline of `subject` (a pseudonym; "" skips the
        window), or feeds the book and starts a baseline write when one is complete."""
        if not subject or "/" in subject:
            return
        for stream in window.streams:
            modality = modality_name(stream.modality)
            if modality in _SKIPPED_MODALITIES:
                continue
            cached, baseline = self.baseline(subject, modality)
            if cached:
                self.book.forget(subject, modality)
                self._next_try.pop((subject, modality), None)
                if baseline is not None:
                    stream.calibration.CopyFrom(baseline.to_proto(subject, scalar_features(stream.features)))
                    self._used.inc()
                continue
            gathered = self.book.add(subject, modality, stream)
            if gathered is not None:
                self._write_later(subject, modality, gathered)

    def _write_later(self, subject: str, modality: str, baseline: Baseline) -> None:
        key = (subject, modality)
        if key in self._writes or len(self._writes) >= MAX_WRITES_IN_FLIGHT:
            return
        if time.monotonic() < self._next_try.get(key, 0.0):
            return
        task = asyncio.create_task(self._write(subject, modality, baseline), name="calibration-write")
        self._writes[key] = task
        task.add_done_callback(lambda _: self._writes.pop(key, None))

    async def _write(self, subject: str, modality: str, baseline: Baseline) -> None:
        try:
            result = await self.client.compare_and_set(
                calibration_key(subject, modality), encode_json(baseline.to_json()), JSON, expect_absent=True
            )
            self._writes_total.labels("applied" if result.outcome == Outcome.APPLIED else "conflict").inc()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure: logged without ids or values, tried again later
            self._writes_total.labels("failed").inc()
            log.warning("calibration baseline write failed", extra={"fields": {"error": type(exc).__name__}})
        finally:
            # Applied or lost to another worker: the cache shows the winner soon. If it does not by then (the key
            # was deleted meanwhile, the write failed), a later window tries again.
            self._next_try[(subject, modality)] = time.monotonic() + self.retry_seconds

    def _changed(self, change: Change) -> None:
        if not change.deleted:
            return
        self._decoded.pop(change.key, None)
        parts = _key_parts(change.key)
        if parts is not None:
            # Removed in Tide (a recalibration): gather afresh from the subject's next good windows.
            self.book.forget(*parts)
            self._next_try.pop(parts, None)
