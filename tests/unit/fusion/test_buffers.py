"""Segment buffers: filters run once per sample, restarting at fixed epochs, and give the numbers a batch
filter from the same start gives."""

from __future__ import annotations

import numpy as np
from scipy import signal

from services.fusion.buffers import SegmentSignal
from services.fusion.clocks import ClockLine
from services.fusion.filters import apply_causal, filter_plan, sosfilt_rows

RATE = 256.0
PLAN = filter_plan(RATE, (0.5, 45.0), 4, 50.0, 30.0)


def _line(rate: float = RATE, t0: float = 100.0) -> ClockLine:
    return ClockLine(index=0, time_s=t0, slope_s=1.0 / rate, jitter_s=0.0)


def test_sosfilt_rows_equals_scipy_sosfilt_and_carries_state():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 500))
    sos = PLAN.cascade
    zi = rng.standard_normal((sos.shape[0], 3, 2))
    expected, final = signal.sosfilt(sos, x, axis=1, zi=zi)
    state = np.ascontiguousarray(np.moveaxis(zi, 1, 0))
    first = sosfilt_rows(sos, x[:, :200], state)
    second = sosfilt_rows(sos, x[:, 200:], state)
    np.testing.assert_array_equal(np.concatenate([first, second], axis=1), expected)
    np.testing.assert_array_equal(state, np.moveaxis(final, 1, 0))


def test_filter_runs_restart_at_epochs_and_match_a_batch_filter_from_their_start():
    rng = np.random.default_rng(2)
    epoch_s = 2.0
    total = int(9 * RATE)
    x = rng.standard_normal((2, total)).cumsum(axis=1)
    segment = SegmentSignal(2, 0, PLAN, epoch_s)
    line = _line()  # sample i at 100 + i / 256 s: epochs every 512 samples
    for first in range(0, total, 64):
        segment.append(first, x[:, first : first + 64], line)
    starts = [run.start for run in segment.runs]
    assert starts == [0, 512, 1024, 1536, 2048]  # the first with the segment, then one per epoch boundary
    assert [run.epoch for run in segment.runs] == [50, 51, 52, 53, 54]
    for run in segment.runs:
        expected = apply_causal(PLAN, x[:, run.start :])
        np.testing.assert_array_equal(run.output.view(run.start, total), expected)
    np.testing.assert_array_equal(segment.raw.view(0, total), x)
    assert segment.run_for(52) is segment.runs[2] and segment.run_for(10) is segment.runs[0]


def test_a_run_restarting_mid_chunk_starts_at_the_first_sample_past_the_boundary():
    segment = SegmentSignal(1, 0, PLAN, 1.0)
    line = ClockLine(index=0, time_s=0.6, slope_s=0.1, jitter_s=0.0)  # samples at 0.6, 0.7, ...
    segment.append(0, np.ones((1, 10)), line)
    assert [(run.epoch, run.start) for run in segment.runs] == [(0, 0), (1, 4)]  # 1.0 s is sample 4


def test_holes_hold_the_last_value_marked_invalid_and_forgetting_drops_old_runs():
    segment = SegmentSignal(1, 0, PLAN, 1.0)
    line = _line()
    segment.append(0, np.full((1, 256), 2.0), line)
    segment.append(300, np.full((1, 256), 3.0), line)  # samples 256..299 lost
    raw = segment.raw.view(0, 556)[0]
    valid = segment.valid.view(0, 556)[0]
    assert (raw[256:300] == 2.0).all() and not valid[256:300].any() and valid[:256].all() and valid[300:].all()
    assert segment.end == 556 and len(segment.runs) == 3
    segment.forget_before(300, epoch=101)
    assert segment.start == 300 and [run.epoch for run in segment.runs] == [101, 102]
    assert segment.runs[0].output.start == 300


def test_unfiltered_segments_keep_raw_samples_only():
    segment = SegmentSignal(1, 10, None, 1.0)
    segment.append(10, np.arange(5.0)[None, :], _line())
    assert segment.runs == [] and segment.start == 10 and segment.end == 15
    np.testing.assert_array_equal(segment.raw.view(12, 15)[0], [2.0, 3.0, 4.0])


def test_sosfilt_rows_is_the_same_without_the_compiled_kernel(monkeypatch):
    from services.fusion import filters

    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 300))
    sos = PLAN.cascade
    state = rng.standard_normal((2, sos.shape[0], 2))
    kernel_state = state.copy()
    kernel = sosfilt_rows(sos, x, kernel_state)
    monkeypatch.setattr(filters, "_sosfilt_kernel", None)
    public_state = state.copy()
    np.testing.assert_array_equal(sosfilt_rows(sos, x, public_state), kernel)
    np.testing.assert_array_equal(public_state, kernel_state)
