"""Online clock mapping: drift, jitter, offsets, gaps, resets, and determinism after a cold start."""

from __future__ import annotations

import numpy as np
import pytest

from services.fusion.clocks import Continuity, StreamClock

RATE = 250.0
CHUNK = 50  # samples per chunk: 0.2 s


def _chunks(count: int, drift_ppm: float = 0.0, jitter_s: float = 0.0, offset_s: float = 0.0, seed: int = 1):
    """(sequence, source time, offset, true session time) of consecutive chunks of a drifting, jittery clock."""
    rng = np.random.default_rng(seed)
    true_rate = RATE * (1 + drift_ppm * 1e-6)
    for seq in range(count):
        true_time = 1000.0 + seq * CHUNK / true_rate
        stamp = true_time - offset_s + rng.normal(0, jitter_s) if jitter_s else true_time - offset_s
        yield seq, stamp, offset_s, true_time


def test_fit_recovers_drift_and_removes_jitter() -> None:
    clock = StreamClock(RATE, fit_seconds=30.0, reset_seconds=0.5)
    errors = []
    for seq, stamp, offset, truth in _chunks(300, drift_ppm=1000.0, jitter_s=0.004, offset_s=-3.0):
        placement = clock.place(seq, stamp, offset, CHUNK)
        assert placement.continuity is (Continuity.FIRST if seq == 0 else Continuity.NEXT)
        if seq > 100:
            errors.append(float(placement.line.time_of(placement.index)) - truth)
    line = clock.line
    assert line is not None
    assert line.effective_rate_hz == pytest.approx(RATE * (1 + 1000e-6), rel=1e-4)
    # The dejittered times are far closer to the truth than the 4 ms jitter of the raw stamps.
    assert np.sqrt(np.mean(np.square(errors))) < 0.0015
    assert 0.002 < line.jitter_s < 0.006


def test_lost_chunks_are_a_gap_with_the_right_sample_index() -> None:
    clock = StreamClock(RATE, fit_seconds=10.0, reset_seconds=0.5)
    for seq, stamp, offset, _ in _chunks(40):
        if 20 <= seq < 23:
            continue  # three chunks lost
        placement = clock.place(seq, stamp, offset, CHUNK)
        if seq == 23:
            assert placement.continuity is Continuity.GAP
            assert placement.index == 23 * CHUNK
            assert placement.segment == 0


def test_timestamps_ahead_with_consecutive_sequences_are_skipped_samples() -> None:
    clock = StreamClock(RATE, fit_seconds=10.0, reset_seconds=0.5)
    for seq, stamp, offset, _ in _chunks(30):
        placement = clock.place(seq, stamp + (4.0 if seq >= 15 else 0.0), offset, CHUNK)
        if seq == 15:
            assert placement.continuity is Continuity.GAP
            assert placement.segment == 0 and placement.index == 15 * CHUNK + round(4.0 * RATE)
        elif seq > 15:
            assert placement.continuity is Continuity.NEXT


@pytest.mark.parametrize("jump_s", [-5.0, -0.8, 100.0])
def test_clock_jump_back_or_far_ahead_is_a_reset(jump_s: float) -> None:
    clock = StreamClock(RATE, fit_seconds=10.0, reset_seconds=0.5, max_gap_seconds=30.0)
    for seq, stamp, offset, _ in _chunks(30):
        placement = clock.place(seq, stamp + (jump_s if seq >= 15 else 0.0), offset, CHUNK)
        if seq == 15:
            assert placement.continuity is Continuity.RESET
            assert placement.segment == 1 and placement.index == 0
        elif seq > 15:
            assert placement.continuity is Continuity.NEXT


def test_sequence_zero_again_is_a_restart() -> None:
    clock = StreamClock(RATE, fit_seconds=10.0, reset_seconds=0.5)
    for seq, stamp, offset, _ in _chunks(10):
        clock.place(seq, stamp, offset, CHUNK)
    assert clock.place(0, 2000.0, 0.0, CHUNK).continuity is Continuity.RESET


def test_mapping_depends_only_on_the_fit_horizon() -> None:
    """A worker that starts reading later maps chunks to bit-identical times once the horizon is behind it."""
    chunks = list(_chunks(200, drift_ppm=-150.0, jitter_s=0.003, offset_s=12.5, seed=7))
    full = StreamClock(RATE, fit_seconds=5.0, reset_seconds=0.5)
    late = StreamClock(RATE, fit_seconds=5.0, reset_seconds=0.5)
    full_times, late_times = {}, {}
    for seq, stamp, offset, _ in chunks:
        p = full.place(seq, stamp, offset, CHUNK)
        full_times[seq] = float(p.line.time_of(p.index + 7))
        if seq >= 60:
            q = late.place(seq, stamp, offset, CHUNK)
            late_times[seq] = float(q.line.time_of(q.index + 7))
    horizon_chunks = int(5.0 * RATE / CHUNK) + 2
    for seq in range(60 + horizon_chunks, 200):
        assert late_times[seq] == full_times[seq]
