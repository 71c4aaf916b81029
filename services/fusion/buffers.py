"""The samples of one stream's clock segment on consecutive sample indices, raw and causally filtered.

Pure: numpy and scipy only. Chunks are appended in sample order as they are placed; a window takes slices.

Filtering runs once per sample as chunks arrive, instead of again for every overlapping window, and yet a
window's content still depends only on a bounded history: the filters restart from rest at fixed epochs of the
session clock (every `epoch_seconds`), each restart a separate run, and a window uses the newest run that
started at least its lead (warm-up or feature context) before it. Which samples a run starts at follows from
the placed chunks alone (their own clock lines), so a worker re-reading the log from a committed offset
restarts them at the same samples and renders the same bytes. Each sample is filtered by about
(epoch + lead + window) / epoch runs instead of (lead + window) / hop windows.
"""

from __future__ import annotations

import math

import numpy as np

from services.fusion.clocks import ClockLine
from services.fusion.filters import FilterPlan, sosfilt_rows, steady_state


class _Growing:
    """A (rows, n) float64 array over sample indices [start, start + n), appended to at the end and dropped
    from the front, amortised O(1) per sample."""

    def __init__(self, rows: int, start: int, dtype: type = np.float64) -> None:
        self.start = start
        self._data: np.ndarray = np.empty((rows, 256), dtype=dtype)
        self._lo = 0  # column of sample `start`
        self._hi = 0  # column after the last sample

    @property
    def end(self) -> int:
        return self.start + self._hi - self._lo

    def append(self, values: np.ndarray) -> None:
        n = values.shape[1]
        if self._hi + n > self._data.shape[1]:
            kept = self._hi - self._lo
            if kept + n > self._data.shape[1] // 2:
                grown = np.empty((self._data.shape[0], 2 * (kept + n)), dtype=self._data.dtype)
            else:
                grown = self._data
            grown[:, :kept] = self._data[:, self._lo : self._hi]
            self._data, self._lo, self._hi = grown, 0, kept
        self._data[:, self._hi : self._hi + n] = values
        self._hi += n

    def view(self, first: int, stop: int) -> np.ndarray:
        """Samples [first, stop) (clamped to what is held); a view, not a copy."""
        lo = self._lo + max(0, first - self.start)
        hi = self._lo + max(0, min(stop, self.end) - self.start)
        return self._data[:, lo : max(lo, hi)]

    def last(self) -> np.ndarray:
        return self._data[:, self._hi - 1 : self._hi]

    def drop_before(self, index: int) -> None:
        drop = min(max(0, index - self.start), self._hi - self._lo)
        self._lo += drop
        self.start += drop


class _FilterRun:
    """The filters run from rest at sample `start` (scaled to its value, to avoid a step), and their output."""

    def __init__(self, epoch: int, start: int, channels: int, sos: np.ndarray) -> None:
        self.epoch = epoch
        self.start = start
        self.output = _Growing(channels, start)
        self._sos = sos
        self._state: np.ndarray | None = None  # (channels, sections, 2)

    def feed(self, first: int, values: np.ndarray) -> None:
        """Filters `values`, samples [first, first + n); only the part from this run's start on is used."""
        skip = self.start - first
        if skip >= values.shape[1]:
            return
        if skip > 0:
            values = values[:, skip:]
        if self._state is None:
            self._state = np.ascontiguousarray(steady_state(self._sos)[None, :, :] * values[:, 0:1, None])
        self.output.append(sosfilt_rows(self._sos, values, self._state))


class SegmentSignal:
    """One clock segment of one stream: raw samples with a validity mask, and the filter runs over them.

    Sample holes between chunks (lost chunks) are bridged by holding the last value, marked invalid, so
    filters run on through them as they did on the device's signal.
    """

    def __init__(self, channels: int, first_index: int, plan: FilterPlan | None, epoch_seconds: float) -> None:
        self.channels = channels
        self.raw = _Growing(channels, first_index)
        self.valid = _Growing(1, first_index, dtype=np.bool_)
        self.plan = plan if plan is not None and plan.sections else None
        self.epoch_seconds = epoch_seconds
        self.runs: list[_FilterRun] = []  # oldest first

    @property
    def start(self) -> int:
        return self.raw.start

    @property
    def end(self) -> int:
        return self.raw.end

    def append(self, index: int, samples: np.ndarray, line: ClockLine) -> None:
        """Adds a chunk's samples, its first at sample `index` (at or after the end: indices only go up within a
        segment); `line` is the chunk's own clock line, which decides where filter runs restart."""
        first = self.end
        if self.raw.end == self.raw.start:  # nothing held: the samples start with this chunk
            self.raw.start = self.valid.start = first = index
        hole = index - first
        assert hole >= 0, "sample indices only go up within a clock segment"
        if hole > 0:
            held = np.repeat(self.raw.last(), hole, axis=1)
            values = np.concatenate([held, samples], axis=1)
            valid = np.concatenate([np.zeros(hole, dtype=bool), np.ones(samples.shape[1], dtype=bool)])
        else:
            values = samples
            valid = np.ones(samples.shape[1], dtype=bool)
        self.raw.append(values)
        self.valid.append(valid[None, :])
        if self.plan is not None:
            self._filter(first, values, line)

    def _filter(self, first: int, values: np.ndarray, line: ClockLine) -> None:
        assert self.plan is not None
        stop = first + values.shape[1]
        sos = self.plan.cascade
        if not self.runs:
            epoch = math.floor(line.at(first) / self.epoch_seconds)
            self.runs.append(_FilterRun(epoch, first, self.channels, sos))
        # A new run at every epoch boundary this chunk crosses, from the first sample at or after it.
        newest = self.runs[-1].epoch
        last_epoch = math.floor(line.at(stop - 1) / self.epoch_seconds)
        for epoch in range(newest + 1, last_epoch + 1):
            at = first + max(0, math.ceil((epoch * self.epoch_seconds - line.at(first)) / line.slope_s - 1e-9))
            if at < stop:
                self.runs.append(_FilterRun(epoch, at, self.channels, sos))
        for run in self.runs:
            run.feed(first, values)

    def run_for(self, epoch: int) -> _FilterRun | None:
        """The newest filter run that started at or before `epoch`; else the segment's first (a window near the
        segment's start, whose filters start with the segment)."""
        chosen = None
        for run in self.runs:
            if run.epoch <= epoch or chosen is None:
                chosen = run
        return chosen

    def forget_before(self, index: int, epoch: int) -> None:
        """Drops samples before `index` and the filter runs that windows from filter epoch `epoch` on no longer
        use."""
        self.raw.drop_before(index)
        self.valid.drop_before(index)
        keep = self.run_for(epoch)
        if keep is not None:
            self.runs = [run for run in self.runs if run.epoch >= keep.epoch]
            for run in self.runs:
                run.output.drop_before(index)
