"""CalibrationBook: baselines from a subject's first good windows (median, count), poor windows and NaN features
skipped, delta against the baseline, and the JSON stored in Tide."""

from __future__ import annotations

import math

import pytest

from clisonix.fusion.v1 import fusion_pb2
from clisonix.signal.v1 import signal_pb2
from services.fusion.calibration import Baseline, CalibrationBook, delta, good_window, scalar_features


def ecg_window(heart_rate: float | None, coverage: float = 1.0, **flags: bool) -> fusion_pb2.StreamWindow:
    ecg = fusion_pb2.EcgFeatures(rr_intervals_s=[0.8, 0.9])
    if heart_rate is not None:
        ecg.heart_rate_bpm = heart_rate
    return fusion_pb2.StreamWindow(
        stream_id="ecg-0",
        modality=signal_pb2.MODALITY_ECG,
        coverage=coverage,
        quality=fusion_pb2.QualityFlags(**flags),
        features=fusion_pb2.StreamFeatures(ecg=ecg),
    )


def test_scalar_features_take_set_finite_scalars_and_eeg_bands() -> None:
    assert scalar_features(fusion_pb2.StreamFeatures()) == {}
    assert scalar_features(fusion_pb2.StreamFeatures(ecg=fusion_pb2.EcgFeatures(rr_intervals_s=[1.0]))) == {}
    assert scalar_features(fusion_pb2.StreamFeatures(ecg=fusion_pb2.EcgFeatures(heart_rate_bpm=61.0))) == {
        "heart_rate_bpm": 61.0
    }
    assert scalar_features(fusion_pb2.StreamFeatures(eda=fusion_pb2.EdaFeatures(tonic_level=math.nan))) == {}
    audio = fusion_pb2.StreamFeatures(audio=fusion_pb2.AudioFeatures(rms=0.5, spectral_centroid_hz=900.0))
    assert scalar_features(audio) == {"rms": 0.5, "spectral_centroid_hz": 900.0}
    eeg = fusion_pb2.EegFeatures(channels=[fusion_pb2.EegBandPower(channel="C3", alpha=2.0, beta=math.inf)])
    features = scalar_features(fusion_pb2.StreamFeatures(eeg=eeg))
    assert features["C3.alpha"] == 2.0 and "C3.beta" not in features and len(features) == 4


def test_baseline_is_the_median_of_the_first_n_windows_and_then_fixed() -> None:
    book = CalibrationBook(windows=5, min_coverage=0.9)
    rates = [60.0, 62.0, 100.0, 61.0, 59.0]  # one mis-detected window: the median ignores it
    results = [book.add("ps-a", "ecg", ecg_window(rate)) for rate in rates]
    assert results[:4] == [None] * 4
    baseline = results[4]
    assert baseline is not None
    assert baseline.medians == {"heart_rate_bpm": 61.0}
    assert baseline.counts == {"heart_rate_bpm": 5}
    assert baseline.windows == 5
    # Later windows do not move it; other subjects and modalities gather on their own.
    assert book.add("ps-a", "ecg", ecg_window(200.0)) is baseline
    assert book.add("ps-b", "ecg", ecg_window(70.0)) is None
    assert len(book) == 2


def test_poor_windows_and_windows_without_features_do_not_count() -> None:
    book = CalibrationBook(windows=2, min_coverage=0.9)
    for poor in (
        ecg_window(90.0, coverage=0.5, gap=True),
        ecg_window(90.0, missing=True),
        ecg_window(90.0, clipped=True),
        ecg_window(90.0, flat=True),
        ecg_window(90.0, reset=True),
        ecg_window(None),
        ecg_window(math.nan),
    ):
        assert book.add("ps-a", "ecg", poor) is None
    assert len(book) == 0
    # A gap the coverage rule accepts.
    assert book.add("ps-a", "ecg", ecg_window(60.0, coverage=0.95, gap=True)) is None
    baseline = book.add("ps-a", "ecg", ecg_window(70.0))
    assert baseline is not None and baseline.medians == {"heart_rate_bpm": 65.0}


def test_a_feature_missing_from_some_windows_has_its_own_count() -> None:
    book = CalibrationBook(windows=3)

    def eeg_window(*channels: tuple[str, float]) -> fusion_pb2.StreamWindow:
        bands = [fusion_pb2.EegBandPower(channel=name, alpha=alpha) for name, alpha in channels]
        features = fusion_pb2.StreamFeatures(eeg=fusion_pb2.EegFeatures(channels=bands))
        return fusion_pb2.StreamWindow(modality=signal_pb2.MODALITY_EEG, coverage=1.0, features=features)

    book.add("ps-a", "eeg", eeg_window(("C3", 1.0), ("C4", 5.0)))
    book.add("ps-a", "eeg", eeg_window(("C3", 3.0)))
    baseline = book.add("ps-a", "eeg", eeg_window(("C3", 2.0), ("C4", 7.0)))
    assert baseline is not None
    assert baseline.medians["C3.alpha"] == 2.0 and baseline.counts["C3.alpha"] == 3
    assert baseline.medians["C4.alpha"] == 6.0 and baseline.counts["C4.alpha"] == 2
    assert baseline.windows == 3


def test_delta_and_proto() -> None:
    baseline = Baseline({"heart_rate_bpm": 60.0, "rms": 1.0}, {"heart_rate_bpm": 30, "rms": 28}, 30)
    assert delta(baseline, {"heart_rate_bpm": 72.5, "other": 3.0, "rms": math.nan}) == {"heart_rate_bpm": 12.5}
    message = baseline.to_proto("ps-a", {"heart_rate_bpm": 55.0})
    assert message.subject_id == "ps-a"
    assert dict(message.baseline) == {"heart_rate_bpm": 60.0, "rms": 1.0}
    assert dict(message.delta) == {"heart_rate_bpm": -5.0}
    assert message.baseline_windows == 30
    assert dict(message.baseline_counts) == {"heart_rate_bpm": 30, "rms": 28}


def test_json_round_trip_and_foreign_values() -> None:
    baseline = Baseline({"heart_rate_bpm": 60.0}, {"heart_rate_bpm": 30}, 30)
    assert Baseline.from_json(baseline.to_json()) == baseline
    for foreign in (None, [], {"format": 2}, {"format": 1, "windows": 3}, {"format": 1, "windows": 3, "features": 5}):
        assert Baseline.from_json(foreign) is None


def test_forget_and_bounded_entries() -> None:
    book = CalibrationBook(windows=2, max_entries=2)
    for subject in ("ps-a", "ps-b", "ps-c"):
        book.add(subject, "ecg", ecg_window(60.0))
    assert len(book) == 2  # ps-a, fed least recently, was dropped
    assert book.add("ps-a", "ecg", ecg_window(60.0)) is None  # starts over
    book.forget("ps-c", "ecg")
    assert book.add("ps-c", "ecg", ecg_window(60.0)) is None


def test_good_window_rule() -> None:
    assert good_window(ecg_window(60.0), 0.95)
    assert not good_window(ecg_window(60.0, coverage=0.94), 0.95)


def test_book_needs_at_least_one_window() -> None:
    with pytest.raises(ValueError):
        CalibrationBook(windows=0)
