"""Online clock mapping of one stream onto the session clock: offset, drift, dejitter, resets and gaps.

Each chunk contributes one point: its first sample's index within the current clock segment and its timestamp
on the session clock (source timestamp plus the source's clock offset). A robust straight-line fit over the
points of the last `fit_seconds` (as LSL's dejitter does, but over a bounded horizon) gives every sample a
dejittered time and the stream's effective rate. The fit depends only on the chunks inside that horizon, never
on how long the worker has been running, so a worker that re-reads the raw log from a committed offset maps the
same samples to the same times.

Pure: numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np

# Below this span of samples a fitted slope is mostly jitter: use the nominal rate instead.
_MIN_FIT_SPAN_S = 2.0
# Residuals beyond this many RMS residuals (and beyond _MIN_OUTLIER_S) are dropped from the fit.
_OUTLIER_SIGMAS = 3.0
_MIN_OUTLIER_S = 0.002


class Continuity(Enum):
    """How a chunk follows the previous one of its stream."""

    FIRST = "first"  # the first chunk of the stream this worker has seen
    NEXT = "next"  # the next sequence number, at the time the fit predicts
    GAP = "gap"  # sequence numbers were lost in between; its sample index was estimated from its timestamp
    RESET = "reset"  # the source clock jumped, or the stream restarted at sequence 0: a new clock segment


@dataclass(frozen=True)
class ClockLine:
    """Session time of sample index n: `time_s + slope_s * (n - index)`."""

    index: int
    time_s: float
    slope_s: float  # seconds per sample on the session clock (1 / effective rate)
    jitter_s: float  # RMS residual of the points around the line

    def time_of(self, n: np.ndarray) -> np.ndarray:
        """Session times of the sample indices `n`."""
        return self.time_s + self.slope_s * (n - self.index)

    def at(self, n: int) -> float:
        """Session time of sample index `n`."""
        return self.time_s + self.slope_s * (n - self.index)

    @property
    def effective_rate_hz(self) -> float:
        return 1.0 / self.slope_s


@dataclass(frozen=True)
class Placement:
    """Where one chunk goes: its clock segment, first sample index within it, and the line after it."""

    continuity: Continuity
    segment: int
    index: int
    line: ClockLine


class StreamClock:
    """Places the chunks of one stream, in sequence order, on the session clock.

    nominal_rate_hz: the rate the source declares. fit_seconds: horizon of the fit. reset_seconds: how far a
    timestamp may fall behind the fit's prediction (or run ahead without a gap) before it counts as a clock
    reset. max_gap_seconds: a timestamp further ahead than this is a reset, not a gap.
    """

    def __init__(
        self, nominal_rate_hz: float, fit_seconds: float, reset_seconds: float, max_gap_seconds: float = 30.0
    ) -> None:
        self.nominal_rate_hz = nominal_rate_hz
        self.fit_seconds = fit_seconds
        self.reset_seconds = reset_seconds
        self.max_gap_seconds = max(max_gap_seconds, reset_seconds)
        self.segment = -1
        # Sample index and session time of the first sample of each recent chunk, oldest first.
        self._indices = np.empty(0, dtype=np.int64)
        self._times = np.empty(0, dtype=np.float64)
        self._line: ClockLine | None = None
        self._last_sequence = -1
        self._last_source_time = -np.inf
        self._next_index = 0  # index of the sample after the last placed chunk

    @property
    def line(self) -> ClockLine | None:
        return self._line

    def place(self, sequence: int, source_time_s: float, offset_s: float, sample_count: int) -> Placement:
        """Places the next chunk (sequence numbers increasing; holes mean lost chunks).

        source_time_s: its first sample's timestamp on the source clock; offset_s: source-to-session offset.
        """
        session_time = source_time_s + offset_s
        line = self._line
        if line is None:
            continuity = Continuity.FIRST
        elif sequence == 0 or source_time_s < self._last_source_time:
            continuity = Continuity.RESET  # restart, or a source clock that went backwards
        else:
            ahead = session_time - line.at(self._next_index)
            if ahead < -self.reset_seconds or ahead > self.max_gap_seconds:
                continuity = Continuity.RESET  # the clock jumped back, or so far ahead that no gap explains it
            elif sequence == self._last_sequence + 1 and ahead <= self.reset_seconds:
                continuity = Continuity.NEXT
            else:
                # Lost chunks, or samples the source skipped (timestamps moved on, sequence numbers did not).
                continuity = Continuity.GAP

        if continuity in (Continuity.FIRST, Continuity.RESET):
            self.segment += 1
            self._indices, self._times = self._indices[:0], self._times[:0]
            index = 0
        elif continuity is Continuity.GAP:
            assert line is not None
            skipped = max(0, round((session_time - line.at(self._next_index)) / line.slope_s))
            index = self._next_index + skipped
        else:
            index = self._next_index

        self._indices = np.append(self._indices, index)
        self._times = np.append(self._times, session_time)
        # Points older than the horizon leave from the front (the newest one never does).
        below = self._times < session_time - self.fit_seconds
        if below[0]:
            expired = int(np.argmin(below))
            self._indices, self._times = self._indices[expired:], self._times[expired:]
        self._line = self._fit(index, session_time)
        self._last_sequence = sequence
        self._last_source_time = source_time_s
        self._next_index = index + sample_count
        return Placement(continuity, self.segment, index, self._line)

    def _fit(self, last_index: int, last_time: float) -> ClockLine:
        """A robust line through the recent points, relative to the newest one (so only differences matter)."""
        x = (self._indices - last_index).astype(np.float64)
        y = self._times - last_time
        nominal_slope = 1.0 / self.nominal_rate_hz
        if len(x) < 3 or (x[-1] - x[0]) * nominal_slope < _MIN_FIT_SPAN_S:
            intercept = float(np.median(y - x * nominal_slope))
            return ClockLine(last_index, last_time + intercept, nominal_slope, _rms(x, y, nominal_slope, intercept))
        slope, intercept = _least_squares(x, y)
        residuals = y - (intercept + slope * x)
        rms = math.sqrt(float(np.dot(residuals, residuals)) / len(x))
        kept = np.abs(residuals) <= max(_OUTLIER_SIGMAS * rms, _MIN_OUTLIER_S)
        dropped = len(x) - int(np.count_nonzero(kept))
        if len(x) - 3 >= dropped > 0:
            # A timestamp far off the line (a delayed chunk) would tilt it: fit again without it.
            x, y = x[kept], y[kept]
            slope, intercept = _least_squares(x, y)
            rms = _rms(x, y, slope, intercept)
        if slope <= 0:  # timestamps that do not advance: fall back on the nominal rate
            slope = nominal_slope
        return ClockLine(last_index, last_time + intercept, slope, rms)


def _least_squares(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    x_mean = float(x.mean())
    y_mean = float(y.mean())
    dx = x - x_mean
    sxx = float(np.dot(dx, dx))
    if sxx == 0.0:
        return 0.0, y_mean
    slope = float(np.dot(dx, y - y_mean)) / sxx
    return slope, y_mean - slope * x_mean


def _rms(x: np.ndarray, y: np.ndarray, slope: float, intercept: float) -> float:
    if not len(x):
        return 0.0
    residuals = y - intercept - slope * x
    return math.sqrt(float(np.dot(residuals, residuals)) / len(x))
