"""The beat-detection data: fusion's ECG preprocessing, labels against the annotations, the time split."""

from __future__ import annotations

import numpy as np
import pytest
import wfdb

from clisonix.signal.v1 import signal_pb2
from services.fusion.windows import WindowConfig
from services.inference.dataset import (
    DEFAULT_RECORD,
    IGNORE,
    EcgRecord,
    Split,
    describe,
    label_centres,
    load_record,
    segments_in,
)
from services.inference.training import TrainingPool

SECONDS = 120.0


@pytest.fixture(scope="module")
def record() -> EcgRecord:
    return load_record(seconds=SECONDS)


def test_record_is_fusions_ecg_at_256_hz_in_mv(record: EcgRecord) -> None:
    assert record.rate_hz == 256.0 and record.native_rate_hz == 360.0
    assert record.unit == "mV" and record.channel == "MLII"
    assert record.signal.dtype == np.float32
    assert abs(record.signal.size - SECONDS * 256) <= 1
    assert np.isfinite(record.signal).all()
    # The same filters as fusion's windows apply to a 360 Hz ECG stream with its default settings.
    plan = WindowConfig().filters(signal_pb2.MODALITY_ECG, 360.0)
    assert plan is not None and record.filters == plan.names
    assert any("bandpass 0.5-40 Hz order 4" in name for name in record.filters)
    assert any("notch 50 Hz Q 30" in name for name in record.filters)


def test_beats_are_the_annotated_beats_mapped_to_256_hz(record: EcgRecord) -> None:
    annotations = wfdb.rdann(str(DEFAULT_RECORD), "atr", sampto=round(SECONDS * 360))
    beat = np.array([s != "+" for s in annotations.symbol])
    assert not beat.all(), "record 100 starts with a '+' rhythm annotation, which is no beat"
    np.testing.assert_allclose(record.beats, annotations.sample[beat] * 256 / 360)
    assert set(record.symbols) <= set("NAV")
    # Each mapped beat sits on its QRS complex in the filtered signal: the largest deflection nearby is within
    # a few samples (the causal filters delay it slightly).
    offsets = []
    for position in record.beats[1:-1]:
        lo = int(position) - 25
        peak = lo + int(np.argmax(np.abs(record.signal[lo : lo + 51])))
        offsets.append(peak - position)
    assert np.median(np.abs(offsets)) <= 6, offsets


def test_labels_follow_the_distance_to_the_nearest_beat() -> None:
    rate = 256.0  # 50 ms = 12.8 samples, 100 ms = 25.6 samples
    beats = np.array([100.0, 300.0])
    centres = np.array([100, 112, 88, 113, 125, 126, 200, 287, 300, 0, 400])
    labels = label_centres(centres, beats, rate)
    assert labels.tolist() == [1, 1, 1, IGNORE, IGNORE, 0, 0, IGNORE, 1, 0, 0]
    assert label_centres(centres, np.array([]), rate).tolist() == [0] * centres.size


def test_split_is_in_time_and_held_out_segments_never_reach_training(record: EcgRecord) -> None:
    split = Split.of(record.signal.size)
    n = record.signal.size
    assert split.train[0] == 0 and split.train[1] == split.validation[0]
    assert split.validation[1] == split.held_out[0] and split.held_out[1] == n
    assert split.held_out[0] == round(0.8 * n)
    assert split.validation[1] - split.validation[0] == pytest.approx((split.held_out[0]) / 8, abs=1)
    half = 64
    for name in ("train", "validation", "held_out"):
        lo, hi = split.part(name)
        segments = segments_in(record, (lo, hi), 1)
        assert segments.centres.min() - half >= lo and segments.centres.max() + half <= hi
        np.testing.assert_array_equal(segments.labels, label_centres(segments.centres, record.beats, 256.0))
        i = len(segments) // 2
        start = segments.centres[i] - half
        np.testing.assert_array_equal(segments.x[i, 0], record.signal[start : start + 128])
    pool = TrainingPool(record, split.train, 128)
    assert pool.centres.max() + half <= split.train[1] < split.held_out[0]
    assert (pool.labels != IGNORE).all()
    np.testing.assert_array_equal(
        pool.cut(np.array([0, 5]))[:, 0, :], segments_in(record, split.train, 1).labelled().x[[0, 5], 0]
    )


def test_balanced_sampling_draws_both_classes_equally(record: EcgRecord) -> None:
    pool = TrainingPool(record, Split.of(record.signal.size).train, 128)
    index = pool.balanced(1000, np.random.default_rng(0))
    assert np.bincount(pool.labels[index]).tolist() == [500, 500]
    assert (pool.labels == 0).sum() > 4 * (pool.labels == 1).sum()  # the pool itself is imbalanced


def test_description_states_the_task_split_and_counts(record: EcgRecord) -> None:
    info = describe(record, Split.of(record.signal.size), 4)
    assert "within 50 ms" in info["task"] and "more than 100 ms" in info["task"]
    assert "first 80%" in info["split"] and "last 20% held out" in info["split"]
    assert "last 12.5% as validation" in info["split"]
    parts = info["parts"]
    assert sum(p["annotated_beats"] for p in parts.values()) == record.beats.size
    assert parts["held_out"]["segments_beat"] > 0 and parts["held_out"]["segments_no_beat"] > 0
