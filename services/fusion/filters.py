"""Causal filters and resampling of one stream's samples onto a window's grid (scipy.signal).

Pure: numpy and scipy only. Filters start from rest at the first sample they are given (scaled to its value to
avoid a step); buffers.py decides where, so that a window's content depends only on a bounded history.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property, lru_cache

import numpy as np
from scipy import signal

# The compiled loop behind signal.sosfilt. Its public wrapper checks, converts and copies its arguments on every
# call, several times the cost of filtering a chunk or a window-length signal. Same kernel, same numbers (tests
# check it against the public function); the public function where a scipy release lays it out differently.
try:
    from scipy.signal._sosfilt import _sosfilt as _sosfilt_kernel
except ImportError:  # pragma: no cover - depends on the scipy release
    _sosfilt_kernel = None

# resample_poly's up/down factors stay small; the exact remainder of the rate ratio is taken up by
# interpolating onto the window's grid from the dejittered sample times.
_MAX_RATIO_DENOMINATOR = 32


@dataclass(frozen=True)
class FilterPlan:
    """The causal filters for one (modality, rate): second-order sections applied in order, and their names."""

    sections: tuple[np.ndarray, ...]
    names: tuple[str, ...]

    @cached_property
    def cascade(self) -> np.ndarray:
        """All the filters as one cascade of second-order sections: one sosfilt call runs them all, at half the
        cost of a call per filter on 32-channel EEG, with the same result."""
        sos = self.sections[0] if len(self.sections) == 1 else np.concatenate(self.sections)
        return np.ascontiguousarray(sos, dtype=np.float64)


@lru_cache(maxsize=256)
def filter_plan(
    rate_hz: float, band_hz: tuple[float, float] | None, order: int, mains_hz: float | None, notch_quality: float
) -> FilterPlan:
    """Designs a Butterworth band-pass (high edge capped below Nyquist) and a mains notch where they fit."""
    nyquist = rate_hz / 2.0
    sections: list[np.ndarray] = []
    names: list[str] = []
    if band_hz is not None:
        low, high = band_hz
        high = min(high, 0.9 * nyquist)
        if 0 < low < high:
            sections.append(signal.butter(order, [low, high], btype="bandpass", fs=rate_hz, output="sos"))
            names.append(f"butterworth bandpass {low:g}-{high:g} Hz order {order} (causal)")
    if mains_hz is not None and mains_hz < 0.95 * nyquist:
        b, a = signal.iirnotch(mains_hz, notch_quality, fs=rate_hz)
        sections.append(signal.tf2sos(b, a))
        names.append(f"notch {mains_hz:g} Hz Q {notch_quality:g} (causal)")
    return FilterPlan(tuple(sections), tuple(names))


def steady_state(sos: np.ndarray) -> np.ndarray:
    """sosfilt_zi of a filter (its state after a unit step), computed once per filter: solving for it is most of
    the cost of filtering a window-length signal."""
    return _steady_state(sos.tobytes(), sos.shape)


@lru_cache(maxsize=256)
def _steady_state(sos_bytes: bytes, shape: tuple[int, ...]) -> np.ndarray:
    zi = signal.sosfilt_zi(np.frombuffer(sos_bytes).reshape(shape))
    zi.flags.writeable = False
    return zi


def sosfilt_in_place(sos: np.ndarray, rows: np.ndarray, state: np.ndarray) -> None:
    """Filters each row of the C-contiguous float64 (rows, n) array in place by the cascade `sos` (C-contiguous
    float64), continuing from `state` (rows, sections, 2), which it updates: signal.sosfilt along axis 1 with
    zi = state moved to (sections, rows, 2)."""
    if _sosfilt_kernel is None:  # pragma: no cover - depends on the scipy release
        filtered, final = signal.sosfilt(sos, rows, axis=1, zi=np.moveaxis(state, 0, 1))
        rows[...] = filtered
        state[...] = np.moveaxis(final, 1, 0)
        return
    _sosfilt_kernel(sos, rows, state)


def sosfilt_rows(sos: np.ndarray, samples: np.ndarray, state: np.ndarray) -> np.ndarray:
    """sosfilt_in_place on a copy of (rows, n) `samples`: returns the output; `state` is updated."""
    out = np.array(samples, dtype=np.float64, order="C")
    sosfilt_in_place(sos, out, state)
    return out


def apply_causal(plan: FilterPlan, samples: np.ndarray) -> np.ndarray:
    """Filters (channels, n) samples causally, each filter starting in steady state at the first sample."""
    if not plan.sections:
        return samples
    sos = plan.cascade
    zi = steady_state(sos)
    out, _ = signal.sosfilt(sos, samples, axis=1, zi=zi[:, None, :] * samples[None, :, 0:1])
    return out


@lru_cache(maxsize=64)
def _polyphase_fir(up: int, down: int) -> np.ndarray:
    """resample_poly's own default anti-aliasing FIR (Kaiser, beta 5), designed once per ratio, not per call."""
    max_rate = max(up, down)
    fir = signal.firwin(2 * 10 * max_rate + 1, 1.0 / max_rate, window=("kaiser", 5.0))
    fir.setflags(write=False)
    return fir


def resample_to_grid(
    samples: np.ndarray,
    times_s: np.ndarray,
    valid: np.ndarray,
    grid_start_s: float,
    grid_count: int,
    rate_hz: float,
    antialias: bool = True,
) -> np.ndarray:
    """Resamples (channels, n) samples taken at dejittered `times_s` onto grid_start_s + i / rate_hz.

    `valid` marks real samples (False: a held value bridging a gap). resample_poly first brings the stream to
    about the grid rate (anti-aliasing when it goes down), then linear interpolation on the true sample times
    takes up the remaining ratio, drift and the grid's phase. Interpolation alone suffices when going up in
    rate, or when `antialias` is False (the samples are already band-limited well below the grid's Nyquist
    frequency). Grid points outside the samples, or nearest to a bridged gap, are NaN.
    """
    channels, count = samples.shape
    grid = grid_start_s + np.arange(grid_count) / rate_hz
    out = np.full((channels, grid_count), np.nan)
    if count < 2:
        return out
    slope = (times_s[-1] - times_s[0]) / (count - 1)
    resampled, step = samples, slope
    if antialias and count >= 8 and rate_hz * slope < 1:  # going down in rate
        ratio = Fraction(rate_hz * slope).limit_denominator(_MAX_RATIO_DENOMINATOR)
        if 0 < ratio < 1:
            up, down = ratio.numerator, ratio.denominator
            fir = _polyphase_fir(up, down)
            resampled = signal.resample_poly(samples, up, down, axis=1, window=fir, padtype="line")
            step = slope * down / up
    # A sample stands for the sampling period after it: the last one covers the grid up to one period on.
    first = max(0, math.ceil((times_s[0] - grid_start_s) * rate_hz - 1e-9))
    stop = min(grid_count, math.ceil((times_s[-1] + slope - grid_start_s) * rate_hz - 1e-9))
    if first >= stop:
        return out
    g = grid[first:stop]
    # Linear interpolation on the (uniform, dejittered) sample times, every channel in one step.
    position = (g - times_s[0]) / step
    last = resampled.shape[1] - 1
    left = np.minimum(np.maximum(position.astype(np.int64), 0), max(last - 1, 0))
    right = np.minimum(left + 1, last)
    weight = np.minimum(np.maximum(position - left, 0.0), 1.0)
    block = out[:, first:stop]
    np.multiply(resampled[:, left], 1.0 - weight, out=block)
    block += resampled[:, right] * weight
    if not valid.all():
        # A grid point is missing when the source sample nearest to it is a bridged gap.
        nearest = np.clip(np.rint((g - times_s[0]) / slope).astype(np.int64), 0, count - 1)
        block[:, ~valid[nearest]] = np.nan
    return out
