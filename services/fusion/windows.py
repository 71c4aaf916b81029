"""The windows of one session: watermark, rendering of each stream onto the window's grid, features.

Pure: numpy, scipy and protobuf only (no Kafka, no gRPC), so it is tested and benchmarked on its own.

A window [k * hop, k * hop + length) on the session clock is emitted once every live stream has covered its end,
or once the furthest stream is `lateness` past it (a stream that stayed behind is then silent: marked missing or
gapped). Its content depends only on the raw chunks within a bounded span before its end (the filter run's
epoch and warm-up, feature context, clock-fit horizon), never on wall-clock time, so re-computing it from the log
gives the same id and the same bytes.
"""

from __future__ import annotations

import hashlib
import math
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from clisonix.fusion.v1 import fusion_pb2
from clisonix.signal.v1 import signal_pb2
from services.common.chunks import modality_name
from services.common.errors import InvalidArgument
from services.fusion.clocks import Continuity
from services.fusion.features import CONTEXT_SECONDS, FeatureInput, stream_features
from services.fusion.filters import FilterPlan, filter_plan, resample_to_grid
from services.fusion.streams import PlacedChunk, RawChunk, StreamState

WINDOW_ID_NAMESPACE = uuid.UUID("6f1c5e0a-2b7d-5c3e-9a41-0c1a5f3e7b21")
# Samples of unfiltered streams before the window's context, so resampling starts settled.
_RESAMPLE_MARGIN_S = 0.25
# Consecutive samples at a channel's extreme that count as clipping (a flat top).
_CLIP_RUN = 4


@dataclass(frozen=True)
class WindowConfig:
    """What shapes every window (from FusionSettings)."""

    window_seconds: float = 2.0
    hop_seconds: float = 1.0
    filter_warmup_seconds: float = 4.0
    # Filters restart from rest at multiples of this on the session clock (see buffers.py).
    filter_epoch_seconds: float = 8.0
    peak_latency_seconds: float = 0.3
    clock_fit_seconds: float = 10.0
    clock_reset_seconds: float = 0.5
    max_gap_seconds: float = 30.0
    lateness_seconds: float = 2.0
    mains_hz: float = 50.0
    eeg_band_hz: tuple[float, float] = (0.5, 45.0)
    ecg_band_hz: tuple[float, float] = (0.5, 40.0)
    filter_order: int = 4
    notch_quality: float = 30.0
    output_rates_hz: Mapping[str, float] | None = None
    max_streams: int = 64
    # Shift each session's window grid by a fraction of the hop taken from its id, so sessions on one shared
    # clock do not all come due at the same instant.
    stagger: bool = True

    def output_rate(self, modality: int) -> float:
        rates = self.output_rates_hz or {}
        return float(rates.get(modality_name(modality), rates.get("other", 128.0)))

    def filters(self, modality: int, rate_hz: float) -> FilterPlan | None:
        if modality == signal_pb2.MODALITY_EEG:
            band = self.eeg_band_hz
        elif modality == signal_pb2.MODALITY_ECG:
            band = self.ecg_band_hz
        else:
            return None
        return filter_plan(rate_hz, band, self.filter_order, self.mains_hz, self.notch_quality)

    def context_seconds(self, modality: int) -> float:
        return CONTEXT_SECONDS.get(modality, 0.0)

    def filter_epoch(self, modality: int, window_start_s: float) -> int:
        """The filter epoch whose run a window starting at `window_start_s` uses: the newest that starts at
        least the filters' lead (warm-up, or the feature context where that is longer) before the window."""
        lead = max(self.context_seconds(modality), self.filter_warmup_seconds)
        return math.floor((window_start_s - lead) / self.filter_epoch_seconds + 1e-9)

    def stream_history_seconds(self, modality: int) -> float:
        """How far before a window's start its content may look for a stream of `modality`."""
        return self.context_seconds(modality) + max(self.filter_warmup_seconds, _RESAMPLE_MARGIN_S)

    # Cached: asked for on every chunk (the config is frozen, so computed once).
    @cached_property
    def history_seconds(self) -> float:
        """How far before a window's start its content may depend on the log: the longest context and the
        filters' lead, plus an epoch for the filter run it uses, which started up to an epoch earlier."""
        longest_context = max([0.0, *CONTEXT_SECONDS.values()])
        return longest_context + max(self.filter_warmup_seconds, _RESAMPLE_MARGIN_S) + self.filter_epoch_seconds

    @cached_property
    def retain_seconds(self) -> float:
        """How far before the next window the raw log must stay readable: history plus the clock fit's horizon,
        plus a hop of slack for streams that interleave unevenly in the log.
        """
        return self.history_seconds + self.clock_fit_seconds + self.hop_seconds


def grid_phase(session_id: str, hop_seconds: float) -> float:
    """Where a session's windows start within the hop: a fixed fraction of it, from a hash of the session id."""
    digest = hashlib.blake2b(session_id.encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") % 1000) / 1000 * hop_seconds


def window_id(session_id: str, start_s: float) -> str:
    """The window's id: a UUIDv5 of the session and the window start (in microseconds)."""
    return str(uuid.uuid5(WINDOW_ID_NAMESPACE, f"{session_id}/{round(start_s * 1e6)}"))


@dataclass(frozen=True)
class Emitted:
    """A window ready to produce, with what the worker measures about it."""

    window: fusion_pb2.FusedWindow
    stage_seconds: Mapping[str, float]


class SessionWindows:
    """The fusion state of one session: its streams and the next window to emit."""

    def __init__(self, session_id: str, config: WindowConfig, events: Counter[str] | None = None) -> None:
        self.session_id = session_id
        self.config = config
        self.events: Counter[str] = events if events is not None else Counter()
        self.streams: dict[str, StreamState] = {}
        self.next_index: int | None = None
        # Windows before this were emitted by whoever read the log before this worker (see add()).
        self.warm_from_s = -math.inf
        self.emitted_any = False
        self._forgot_for: int | None = None  # the next window index _forget() last ran for
        self.phase_s = grid_phase(session_id, config.hop_seconds) if config.stagger else 0.0

    # --- input ------------------------------------------------------------------------------------------

    def add(self, raw: RawChunk) -> None:
        """Takes one raw chunk (already validated). Raises InvalidArgument for one stream too many, or a stream
        that changed its layout."""
        chunk = raw.chunk
        stream = self.streams.get(chunk.stream_id)
        if stream is None:
            if len(self.streams) >= self.config.max_streams:
                raise InvalidArgument(
                    f"session has more than {self.config.max_streams} streams", reason="too_many_streams"
                )
            stream = StreamState(
                chunk,
                self.config.clock_fit_seconds,
                self.config.clock_reset_seconds,
                self.config.lateness_seconds,
                self.events,
                self.config.max_gap_seconds,
                self.config.filters(chunk.modality, chunk.nominal_rate_hz),
                self.config.filter_epoch_seconds,
            )
            self.streams[chunk.stream_id] = stream
        elif not stream.matches(chunk):
            raise InvalidArgument(
                "stream changed its channels, rate or modality mid-session", reason="stream_layout_changed"
            )
        placed = stream.add(raw)
        if not self.emitted_any and math.isfinite(stream.known_from_s):
            # This worker started reading mid-stream (after a rebalance or crash): windows whose history
            # reaches before what it read were produced before, from the full history; skip them.
            self.warm_from_s = max(self.warm_from_s, stream.known_from_s + self.config.retain_seconds)
        if placed and self.next_index is None:
            self.next_index = self._first_index_from(placed[0].start_s)

    def _first_index_from(self, time_s: float) -> int:
        """The first window starting at or after `time_s` (and after the warm-up of a mid-log start)."""
        return math.ceil((max(time_s, self.warm_from_s) - self.phase_s) / self.config.hop_seconds - 1e-9)

    # --- watermark --------------------------------------------------------------------------------------

    def _bounds(self, index: int) -> tuple[float, float]:
        start = index * self.config.hop_seconds + self.phase_s
        return start, start + self.config.window_seconds

    def _lead_s(self) -> float:
        return max((s.covered_to_s for s in self.streams.values()), default=-math.inf)

    def _ready(self, index: int, flushing: bool) -> bool:
        start, end = self._bounds(index)
        lead = self._lead_s()
        # Sample times come from a fitted line: allow for rounding at the very end.
        end -= 1e-6
        if lead < end:
            return flushing and lead > start
        for stream in self.streams.values():
            if stream.first_time_s >= end or stream.covered_to_s >= end:
                continue
            if stream.covered_to_s >= lead - self.config.lateness_seconds and not flushing:
                return False  # a live stream has not covered the window yet
        return True

    def _skip_empty(self) -> None:
        """Jumps over windows no stream has samples in (a clock reset that jumps ahead, a long pause)."""
        assert self.next_index is not None
        start, _ = self._bounds(self.next_index)
        after = [p.start_s for s in self.streams.values() for p in s.placed if p.end_s > start]
        if not after:
            return
        first_overlapping = (
            math.floor((min(after) - self.config.window_seconds - self.phase_s) / self.config.hop_seconds) + 1
        )
        self.next_index = max(self.next_index, first_overlapping)

    def take_ready(self, flushing: bool = False) -> list[Emitted]:
        """Renders and returns every window that is ready, in order; `flushing` emits what the streams have
        (the session went idle)."""
        if flushing:
            for stream in self.streams.values():
                stream.flush()
        out: list[Emitted] = []
        if self.next_index is None:
            return out
        if math.isfinite(self.warm_from_s):
            self.next_index = max(self.next_index, self._first_index_from(self.warm_from_s))
        while self._ready(self.next_index, flushing):
            emitted = self.render(self.next_index)
            self.next_index += 1
            if emitted is None:
                self._skip_empty()
            else:
                out.append(emitted)
                self.emitted_any = True
        self._forget()
        return out

    def _forget(self) -> None:
        # What may be forgotten depends only on the next window: nothing new until it moves on.
        if self.next_index is None or self.next_index == self._forgot_for:
            return
        self._forgot_for = self.next_index
        start, _ = self._bounds(self.next_index)
        for stream in self.streams.values():
            samples_from = start - self.config.stream_history_seconds(stream.modality)
            stream.forget_before(
                samples_from, start - self.config.retain_seconds, self.config.filter_epoch(stream.modality, start)
            )
        # A stream silent for longer than the retained history is gone; if it comes back, it starts afresh.
        for stream_id in [
            sid
            for sid, s in self.streams.items()
            if s.covered_to_s < start - self.config.retain_seconds and not s.waiting
        ]:
            del self.streams[stream_id]

    def needed_offset(self) -> int | None:
        """The lowest raw-topic offset any future window of this session (or its clock fits) may need."""
        offsets = [o for o in (s.needed_offset() for s in self.streams.values()) if o is not None]
        return min(offsets) if offsets else None

    # --- rendering --------------------------------------------------------------------------------------

    def render(self, index: int) -> Emitted | None:
        """The window `index` from what the streams hold; None when no stream has a sample in it."""
        start, end = self._bounds(index)
        window = fusion_pb2.FusedWindow(
            session_id=self.session_id,
            window_id=window_id(self.session_id, start),
            start_s=start,
            end_s=end,
            window_index=index,
        )
        timings: defaultdict[str, float] = defaultdict(float)
        any_samples = False
        for stream_id in sorted(self.streams):
            stream = self.streams[stream_id]
            if stream.first_time_s >= end or stream.covered_to_s < start - self.config.lateness_seconds:
                continue
            block = self._render_stream(stream, start, end, timings)
            any_samples = any_samples or block.coverage > 0
            window.streams.append(block)
        if not any_samples:
            return None
        return Emitted(window, dict(timings))

    def _render_stream(
        self, stream: StreamState, start: float, end: float, timings: defaultdict[str, float]
    ) -> fusion_pb2.StreamWindow:
        config = self.config
        rate = config.output_rate(stream.modality)
        window_count = round((end - start) * rate)
        context = config.context_seconds(stream.modality)
        plan = config.filters(stream.modality, stream.nominal_rate_hz)
        # Grid points before the window, in whole grid steps: the feature context and a margin in which
        # resampling settles. The filters settled before that, in their run (see buffers.py).
        context_count = round(context * rate)
        lead_count = context_count + round(_RESAMPLE_MARGIN_S * rate)
        grid_start = start - lead_count / rate
        block = fusion_pb2.StreamWindow(
            stream_id=stream.stream_id,
            modality=stream.modality,  # type: ignore[arg-type]
            channel_names=stream.channel_names,
            channel_units=stream.channel_units,
            sample_rate_hz=rate,
            sample_count=window_count,
            nominal_rate_hz=stream.nominal_rate_hz,
        )
        chunks = _segment_chunks(stream, grid_start, start, end)
        channels = len(stream.channel_names)
        if not chunks:
            block.samples = np.full((channels, window_count), np.nan, dtype="<f4").tobytes()
            block.quality.missing = True
            block.features.CopyFrom(fusion_pb2.StreamFeatures())
            return block

        t0 = time.perf_counter()
        line = chunks[-1].line
        segment = stream.signals[chunks[0].segment]
        # The samples from the grid start (less two sampling periods, for interpolation) to the window end.
        slope = line.slope_s
        first = max(chunks[0].index, segment.start, line.index + math.floor((grid_start - line.time_s) / slope) - 2)
        stop = min(
            chunks[-1].index + chunks[-1].count, segment.end, line.index + math.ceil((end - line.time_s) / slope) + 3
        )
        # Unfiltered streams have no filter runs.
        run = segment.run_for(config.filter_epoch(stream.modality, start))
        if run is not None:
            first = max(first, run.start)
        stop = max(first, stop)
        times = line.time_of(np.arange(first, stop))
        keep = (times >= grid_start - 2 * slope) & (times <= end + 2 * slope)
        lo = int(np.argmax(keep)) if keep.any() else 0
        hi = lo + int(np.count_nonzero(keep))
        first, stop, times = first + lo, first + hi, times[lo:hi]
        unfiltered = segment.raw.view(first, stop)
        valid = segment.valid.view(first, stop)[0]
        t1 = time.perf_counter()
        samples = unfiltered
        if run is not None and segment.plan is not None:
            samples = run.output.view(first, stop)
            block.filters.extend(segment.plan.names)
        t2 = time.perf_counter()
        grid_count = lead_count + window_count
        # The band-pass already keeps ECG and EEG far below the new Nyquist frequency: no anti-aliasing needed.
        band_limited = plan is not None and _band_edge(stream.modality, config) < 0.4 * rate
        on_grid = resample_to_grid(samples, times, valid, grid_start, grid_count, rate, antialias=not band_limited)
        t3 = time.perf_counter()

        window_part = on_grid[:, -window_count:] if window_count else on_grid[:, :0]
        block.samples = np.ascontiguousarray(window_part, dtype="<f4").tobytes()
        valid_points = ~np.isnan(window_part).any(axis=0) if channels else np.zeros(window_count, dtype=bool)
        block.coverage = float(valid_points.mean()) if window_count else 0.0
        in_window = (times >= start) & (times < end)
        raw_window = unfiltered[:, in_window & valid]
        lost_inside = any(c.continuity is Continuity.GAP and start < c.start_s <= end for c in chunks)
        block.quality.missing = block.coverage == 0.0
        block.quality.gap = (0.0 < block.coverage < 1.0) or lost_inside
        flat, clipped = _flat_and_clipped(raw_window)
        block.quality.flat = flat
        block.quality.clipped = clipped or any(
            c.at_digital_limit for c in chunks if c.end_s > start and c.start_s < end
        )
        segment_start = chunks[0].start_s if chunks[0].continuity is Continuity.RESET else -math.inf
        block.quality.reset = grid_start <= segment_start < end
        block.effective_rate_hz = line.effective_rate_hz
        first_chunk = chunks[0]
        block.clock_offset_s = line.at(first_chunk.index) - first_chunk.source_time_s
        block.jitter_s = line.jitter_s
        sequences = [c.sequence for c in chunks]
        offsets = [c.offset for c in chunks]
        block.chunks.first_sequence = min(sequences)
        block.chunks.last_sequence = max(sequences)
        block.chunks.chunk_count = len(chunks)
        block.chunks.partition = first_chunk.partition
        block.chunks.first_offset = min(offsets)
        block.chunks.last_offset = max(offsets)
        ingested = max(c.ingest_time_ns for c in chunks)
        if ingested:
            block.chunks.last_ingest_time.FromNanoseconds(ingested)

        report_to = end - config.peak_latency_seconds
        report_from = report_to - config.hop_seconds
        stream_start = chunks[0].start_s if chunks[0].continuity in (Continuity.FIRST, Continuity.RESET) else -math.inf
        if stream_start > start - config.hop_seconds:
            # The first window of a stream (or of a clock segment) also reports what precedes its usual span.
            report_from = min(report_from, max(stream_start, start))
        feature_part = on_grid[:, lead_count - context_count :]
        features = stream_features(
            FeatureInput(
                modality=stream.modality,
                channel_names=stream.channel_names,
                samples=feature_part,
                rate_hz=rate,
                start_s=start - context_count / rate,
                window_start_s=start,
                window_end_s=end,
                report_from_s=report_from,
                report_to_s=report_to,
            )
        )
        block.features.CopyFrom(features)
        t4 = time.perf_counter()
        timings["assemble"] += t1 - t0
        timings["filter"] += t2 - t1
        timings["resample"] += t3 - t2
        timings["features"] += t4 - t3
        return block


def _band_edge(modality: int, config: WindowConfig) -> float:
    band = config.eeg_band_hz if modality == signal_pb2.MODALITY_EEG else config.ecg_band_hz
    return band[1]


def _segment_chunks(stream: StreamState, grid_start: float, start: float, end: float) -> list[PlacedChunk]:
    """The stream's chunks feeding a window: one clock segment only (the one covering most of the window),
    from the grid start to the window end, in sample order."""
    overlap: defaultdict[int, float] = defaultdict(float)
    for chunk in stream.placed:
        covered = min(chunk.end_s, end) - max(chunk.start_s, start)
        if covered > 0:
            overlap[chunk.segment] += covered
    if not overlap:
        return []
    best = max(overlap.values())
    segment = min(s for s, v in overlap.items() if v == best)  # ties: the older segment
    chunks = [c for c in stream.placed if c.segment == segment and c.end_s > grid_start and c.start_s < end]
    chunks.sort(key=lambda c: c.index)
    return chunks


def _flat_and_clipped(samples: np.ndarray) -> tuple[bool, bool]:
    """Whether a channel does not change at all over the window (flat), and whether a channel that does change
    sits at its window maximum or minimum for several consecutive samples (clipped: a flat top)."""
    if samples.shape[1] < 2:
        return False, False
    high = samples.max(axis=1, keepdims=True)
    low = samples.min(axis=1, keepdims=True)
    varies = (high > low)[:, 0]
    flat = not varies.all()
    if samples.shape[1] < _CLIP_RUN:
        return flat, False
    for extreme in (high, low):
        at = samples == extreme
        # A run needs that many samples at the extreme; most windows have one, so count before looking for runs.
        candidates = varies & (np.count_nonzero(at, axis=1) >= _CLIP_RUN)
        if not candidates.any():
            continue
        at = at[candidates]
        run = at[:, : 1 - _CLIP_RUN].copy()
        for k in range(1, _CLIP_RUN):
            run &= at[:, k : at.shape[1] - _CLIP_RUN + 1 + k]
        if run.any():
            return flat, True
    return flat, False
