"""Replay pacing: blocks are due at their end on a per-stream replay clock that survives clock resets."""

from __future__ import annotations

import numpy as np
import pytest

from services.common.chunks import SampleBlock
from services.ingest.client import ReplayPacer
from tests.helpers import ECG, EEG


def block(spec, start: float, samples: int) -> SampleBlock:
    return SampleBlock(spec, start, np.zeros((spec.channel_count, samples), dtype=np.float32))


def test_contiguous_blocks_are_due_at_their_end():
    pacer = ReplayPacer()
    dues = [pacer.due_s(block(EEG, 100.0 + i * 0.2, 50)) for i in range(5)]
    assert dues == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


def test_streams_keep_their_offsets_and_own_clocks():
    pacer = ReplayPacer()
    assert pacer.due_s(block(EEG, 10.0, 250)) == pytest.approx(1.0)
    assert pacer.due_s(block(ECG, 10.5, 250)) == pytest.approx(1.0)  # starts 0.5 s later, 0.5 s long
    assert pacer.due_s(block(EEG, 11.0, 250)) == pytest.approx(2.0)


def test_clock_reset_does_not_stall_or_rush_the_replay():
    pacer = ReplayPacer()
    pacer.due_s(block(EEG, 5000.0, 250))
    after_reset = pacer.due_s(block(EEG, 3.0, 250))  # timestamps jumped back by ~5000 s
    assert after_reset == pytest.approx(2.0)


def test_long_gaps_are_capped():
    pacer = ReplayPacer(max_gap_s=5.0)
    pacer.due_s(block(EEG, 0.0, 250))
    assert pacer.due_s(block(EEG, 3600.0, 250)) == pytest.approx(1.0 + 5.0 + 1.0)
