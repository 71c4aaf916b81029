"""Stream features: R-peaks against the MIT-BIH annotations, heart rate against pulse rate, synthetic signals with
known features, degenerate inputs, determinism and cost per call.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import signal

from clisonix.fusion.v1 import fusion_pb2
from clisonix.signal.v1 import signal_pb2
from services.fusion.features import CONTEXT_SECONDS, FeatureInput, stream_features

WFDB = Path(__file__).resolve().parents[3] / "data" / "wfdb"
# MIT-BIH beat annotation symbols; the others ("+", "~", "|", '"', ...) mark rhythm changes, noise and comments.
BEAT_SYMBOLS = "NLRBAaJSVrFejnE/fQ?"
LENGTH_S = 2.0
HOP_S = 1.0
LATENCY_S = 0.3
MODALITIES = (
    signal_pb2.MODALITY_EEG,
    signal_pb2.MODALITY_ECG,
    signal_pb2.MODALITY_PPG,
    signal_pb2.MODALITY_RESPIRATION,
    signal_pb2.MODALITY_EDA,
    signal_pb2.MODALITY_AUDIO,
    signal_pb2.MODALITY_MOTION,
)


def import_wfdb() -> Any:
    """wfdb, without the pandas deprecation warning its import raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import wfdb
    return wfdb


def fusion_ecg(x: np.ndarray, rate: float, up: int, down: int) -> np.ndarray:
    """An ECG as fusion hands it over: band-pass 0.5-40 Hz (Butterworth order 4) and a 60 Hz notch, both
    causal, then resampled by up / down.
    """
    bandpass = signal.butter(4, [0.5, 40.0], btype="bandpass", fs=rate, output="sos")
    b, a = signal.iirnotch(60.0, 30.0, fs=rate)
    return np.asarray(signal.resample_poly(signal.lfilter(b, a, signal.sosfilt(bandpass, x)), up, down))


def resampled_with_gaps(x: np.ndarray, rate: float, up: int, down: int, *, ecg: bool = False) -> np.ndarray:
    """x resampled by up / down (as fusion_ecg first when `ecg`), NaN again wherever x had missing samples."""
    missing = np.isnan(x)
    index = np.arange(x.size)
    bridged = np.interp(index, index[~missing], x[~missing])
    out = fusion_ecg(bridged, rate, up, down) if ecg else np.asarray(signal.resample_poly(bridged, up, down))
    new_rate = rate * up / down
    for i in np.flatnonzero(missing):
        out[int(np.floor(i / rate * new_rate)) : int(np.ceil((i + 1) / rate * new_rate))] = np.nan
    return out


def windows(x: np.ndarray, rate: float, modality: int) -> Iterator[FeatureInput]:
    """The windows fusion cuts from a stream starting at time 0: 2 s long, 1 s apart, with the modality's
    context before each (NaN before the stream starts), reporting beats in [end - 1.3, end - 0.3).
    """
    samples = np.atleast_2d(x)
    context = CONTEXT_SECONDS.get(modality, 0.0)
    window_start = 0.0
    while round((window_start + LENGTH_S) * rate) <= samples.shape[1]:
        end = window_start + LENGTH_S
        start = window_start - context
        first, last = round(start * rate), round(end * rate)
        span = np.full((samples.shape[0], last - first), np.nan)
        span[:, max(0, -first) :] = samples[:, max(0, first) : last]
        names = tuple(f"ch{i}" for i in range(samples.shape[0]))
        yield FeatureInput(
            modality, names, span, rate, start, window_start, end, end - LATENCY_S - HOP_S, end - LATENCY_S
        )
        window_start += HOP_S


def matched(detections: np.ndarray, reference: np.ndarray, tolerance_s: float) -> np.ndarray:
    """Offsets (detection - reference) of one-to-one matches, each reference taking its nearest free detection."""
    taken = np.zeros(detections.size, dtype=bool)
    offsets = []
    for ref in reference:
        near = np.flatnonzero((np.abs(detections - ref) <= tolerance_s) & ~taken)
        if near.size:
            best = near[np.argmin(np.abs(detections[near] - ref))]
            taken[best] = True
            offsets.append(detections[best] - ref)
    return np.asarray(offsets)


def one(modality: int, samples: np.ndarray, rate: float, context_s: float = 0.0) -> FeatureInput:
    """A single window of `samples` starting at 100 s, its first context_s seconds being context."""
    samples = np.atleast_2d(samples)
    end = 100.0 + samples.shape[1] / rate
    names = tuple(f"ch{i}" for i in range(samples.shape[0]))
    return FeatureInput(modality, names, samples, rate, 100.0, 100.0 + context_s, end, end - 1.3, end - 0.3)


@pytest.fixture(scope="module")
def mitbih_100() -> tuple[np.ndarray, np.ndarray]:
    """Record 100, MLII, as fusion hands it over at 256 Hz; and its beat annotation times in seconds."""
    wfdb = import_wfdb()
    record = wfdb.rdrecord(str(WFDB / "100"), channels=[0])
    annotation = wfdb.rdann(str(WFDB / "100"), "atr")
    beats = np.isin(np.asarray(annotation.symbol), list(BEAT_SYMBOLS))
    ecg = fusion_ecg(record.p_signal[:, 0], record.fs, 32, 45)
    return ecg, annotation.sample[beats] / record.fs


# --- ECG against MIT-BIH -----------------------------------------------------------------------------------


def test_mitbih_100_r_peaks_match_the_annotations_once_each(mitbih_100: tuple[np.ndarray, np.ndarray]) -> None:
    ecg, annotated = mitbih_100
    reported: list[float] = []
    last_window = None
    for window in windows(ecg, 256.0, signal_pb2.MODALITY_ECG):
        features = stream_features(window)
        assert features.WhichOneof("kind") == "ecg"
        reported.extend(features.ecg.r_peak_times_s)
        last_window = window
    assert last_window is not None
    detections = np.asarray(reported)

    # Every beat once: reported times increase and no two are closer than a refractory period.
    assert np.all(np.diff(detections) > 0.2)
    # Compare where both cover: after the edge effects of the first seconds, up to what the last window reported.
    covered_from, covered_to = 3.0, last_window.report_to_s
    reference = annotated[(annotated >= covered_from) & (annotated < covered_to)]
    detections = detections[(detections >= covered_from) & (detections < covered_to)]
    offsets = matched(detections, reference, tolerance_s=0.15)
    sensitivity = offsets.size / reference.size
    positive_predictivity = offsets.size / detections.size
    print(
        f"MIT-BIH 100: {reference.size} beats, Se {sensitivity:.4%}, +P {positive_predictivity:.4%}, "
        f"median offset {1e3 * np.median(offsets):.1f} ms, 99th percentile |offset| "
        f"{1e3 * np.percentile(np.abs(offsets), 99):.1f} ms"
    )
    assert sensitivity >= 0.995
    assert positive_predictivity >= 0.995
    # The causal filters delay the R wave by about 11 ms; the annotations sit on the R wave.
    assert abs(np.median(offsets)) < 0.03


def test_r_peaks_of_an_inverted_ecg_are_the_same_beats(mitbih_100: tuple[np.ndarray, np.ndarray]) -> None:
    ecg = mitbih_100[0][256 * 60 : 256 * 66]
    upright = stream_features(one(signal_pb2.MODALITY_ECG, ecg, 256.0, context_s=4.0)).ecg
    inverted = stream_features(one(signal_pb2.MODALITY_ECG, -ecg, 256.0, context_s=4.0)).ecg
    assert len(upright.r_peak_times_s) >= 1
    assert list(inverted.r_peak_times_s) == list(upright.r_peak_times_s)
    assert inverted.heart_rate_bpm == pytest.approx(upright.heart_rate_bpm)
    assert 60.0 < upright.heart_rate_bpm < 90.0


def test_no_r_peaks_in_a_gap_and_no_interval_across_it(mitbih_100: tuple[np.ndarray, np.ndarray]) -> None:
    ecg = mitbih_100[0][256 * 120 : 256 * 126].copy()
    ecg[256 * 4 : 256 * 5] = np.nan  # the window's first second is missing
    features = stream_features(one(signal_pb2.MODALITY_ECG, ecg, 256.0, context_s=4.0)).ecg
    gap_from, gap_to = 104.0, 105.0
    assert all(not (gap_from - 0.05 <= t < gap_to + 0.05) for t in features.r_peak_times_s)
    # Beats come every 0.7-1 s in record 100: an interval spanning the gap would be about twice that.
    assert len(features.rr_intervals_s) >= 2
    assert max(features.rr_intervals_s) < 1.3
    assert 60.0 < features.heart_rate_bpm < 90.0


# --- heart rate, pulse rate and respiration on v102s ---------------------------------------------------------


def test_v102s_heart_rate_agrees_with_pulse_rate_and_respiration_is_plausible() -> None:
    wfdb = import_wfdb()
    record = wfdb.rdrecord(str(WFDB / "v102s"))
    assert list(record.sig_name) == ["II", "V", "PLETH", "RESP"]
    rate = float(record.fs)
    # wfdb's missing samples become NaN on fusion's grid, as gaps in the stream would.
    ecg = resampled_with_gaps(record.p_signal[:, 0], rate, 128, 125, ecg=True)  # 256 Hz
    ppg = resampled_with_gaps(record.p_signal[:, 2], rate, 64, 125)  # 128 Hz, not filtered by fusion
    resp = resampled_with_gaps(record.p_signal[:, 3], rate, 16, 125)  # 32 Hz

    heart = [stream_features(w).ecg for w in windows(ecg, 256.0, signal_pb2.MODALITY_ECG)]
    pulse = [stream_features(w).ppg for w in windows(ppg, 128.0, signal_pb2.MODALITY_PPG)]
    breathing = [stream_features(w).respiration for w in windows(resp, 32.0, signal_pb2.MODALITY_RESPIRATION)]
    assert len(heart) == len(pulse) == len(breathing) == 299

    # Every beat and every pulse once, one pulse per beat.
    r_peaks = np.concatenate([h.r_peak_times_s for h in heart])
    pulse_peaks = np.concatenate([p.pulse_peak_times_s for p in pulse])
    assert np.all(np.diff(r_peaks) > 0.2)
    assert np.all(np.diff(pulse_peaks) > 0.2)
    assert abs(r_peaks.size - pulse_peaks.size) <= 0.02 * r_peaks.size

    both = [
        (h.heart_rate_bpm, p.pulse_rate_bpm)
        for h, p in zip(heart, pulse, strict=True)
        if h.HasField("heart_rate_bpm") and p.HasField("pulse_rate_bpm")
    ]
    differences = np.abs(np.diff(np.asarray(both), axis=1))
    print(
        f"v102s: {len(both)} of {len(heart)} windows with both rates, median |HR - PR| "
        f"{np.median(differences):.2f} bpm, 90th percentile {np.percentile(differences, 90):.2f} bpm"
    )
    assert len(both) >= 0.95 * len(heart)
    assert np.median(differences) <= 2.0
    # A ventricular tachycardia false alarm: the rhythm is about 100 per minute throughout.
    assert 95.0 < np.median(np.asarray(both)) < 110.0

    rates = np.asarray([b.respiration_rate_bpm for b in breathing if b.HasField("respiration_rate_bpm")])
    plausible = np.count_nonzero((rates >= 5.0) & (rates <= 40.0))
    print(f"v102s: respiration rate in 5-40 per minute in {plausible} of {len(breathing)} windows")
    assert plausible >= 0.85 * len(breathing)


# --- synthetic signals ---------------------------------------------------------------------------------------


def test_eeg_alpha_sine_puts_its_power_in_alpha() -> None:
    rate = 256.0
    t = np.arange(512) / rate
    rng = np.random.default_rng(1)
    eeg = 20.0 * np.sin(2 * np.pi * 10.0 * t + rng.uniform(0, 2 * np.pi, (4, 1))) + rng.normal(0, 1.0, (4, 512))
    eeg[2, 100:150] = np.nan  # a short gap is bridged
    eeg[3] = np.nan  # a missing channel is left out
    features = stream_features(one(signal_pb2.MODALITY_EEG, eeg, rate))
    channels = features.eeg.channels
    assert [c.channel for c in channels] == ["ch0", "ch1", "ch2"]
    for channel in channels:
        bands = {"delta": channel.delta, "theta": channel.theta, "beta": channel.beta, "gamma": channel.gamma}
        assert channel.alpha > 10.0 * max(bands.values())
    # A sine of amplitude A carries A^2 / 2 (µV^2 here), nearly all of it in the alpha band.
    assert channels[0].alpha == pytest.approx(200.0, rel=0.1)


def test_eeg_band_powers_use_the_window_only() -> None:
    rate = 256.0
    t = np.arange(1024) / rate
    eeg = np.where(t < 2.0, 50.0 * np.sin(2 * np.pi * 20.0 * t), 10.0 * np.sin(2 * np.pi * 6.0 * t))[None, :]
    channel = stream_features(one(signal_pb2.MODALITY_EEG, eeg, rate, context_s=2.0)).eeg.channels[0]
    assert channel.theta == pytest.approx(50.0, rel=0.15)
    assert channel.beta < 0.01 * channel.theta


def test_pulse_peaks_of_a_synthetic_ppg_are_its_systolic_maxima() -> None:
    rate = 128.0
    t = np.arange(int(8 * rate)) / rate
    beats = np.arange(0.3, 8.0, 60.0 / 72.0)
    systolic = beats + 0.15
    # Systolic wave, a smaller diastolic wave after the dicrotic notch, breathing baseline, a little noise.
    pulses = sum(np.exp(-(((t - s) / 0.08) ** 2)) + 0.4 * np.exp(-(((t - s - 0.3) / 0.1) ** 2)) for s in systolic)
    ppg = pulses + 0.3 * np.sin(2 * np.pi * 0.25 * t) + np.random.default_rng(7).normal(0, 0.01, t.size)
    data = one(signal_pb2.MODALITY_PPG, 1000.0 * ppg, rate, context_s=6.0)
    features = stream_features(data).ppg
    expected = 100.0 + systolic[(100.0 + systolic >= data.report_from_s) & (100.0 + systolic < data.report_to_s)]
    assert expected.size == 1
    assert np.asarray(features.pulse_peak_times_s) == pytest.approx(expected, abs=0.01)
    assert features.pulse_rate_bpm == pytest.approx(72.0, abs=1.0)


def test_respiration_rate_of_a_sine() -> None:
    rate = 32.0
    t = np.arange(int(22 * rate)) / rate
    resp = np.sin(2 * np.pi * 0.25 * t) + np.random.default_rng(2).normal(0, 0.1, t.size)
    features = stream_features(one(signal_pb2.MODALITY_RESPIRATION, resp, rate, context_s=20.0))
    assert features.respiration.respiration_rate_bpm == pytest.approx(15.0, abs=0.5)


def test_audio_tone_rms_and_centroid() -> None:
    rate = 16000.0
    t = np.arange(32000) / rate
    tone = 0.5 * np.sin(2 * np.pi * 1000.0 * t)
    audio = stream_features(one(signal_pb2.MODALITY_AUDIO, np.stack([tone, tone]), rate)).audio
    assert audio.rms == pytest.approx(0.5 / np.sqrt(2), rel=1e-6)
    assert audio.spectral_centroid_hz == pytest.approx(1000.0, abs=10.0)


def test_motion_magnitude_rms_ignores_gravity() -> None:
    rate = 64.0
    t = np.arange(128) / rate
    still = np.stack([np.zeros_like(t), np.zeros_like(t), np.ones_like(t)])  # 1 g down the z axis
    walking = still + np.stack([np.zeros_like(t), np.zeros_like(t), 0.2 * np.sin(2 * np.pi * 2.0 * t)])
    assert stream_features(one(signal_pb2.MODALITY_MOTION, still, rate)).motion.magnitude_rms == pytest.approx(0.0)
    moving = stream_features(one(signal_pb2.MODALITY_MOTION, walking, rate)).motion
    assert moving.magnitude_rms == pytest.approx(0.2 / np.sqrt(2), rel=0.05)


def test_eda_tonic_level_sees_through_a_skin_conductance_response() -> None:
    rate = 32.0
    t = np.arange(int(10 * rate)) / rate
    onset = 8.5  # in the window, after 8 s of context
    after = np.clip(t - onset, 0.0, None)
    response = 0.8 * (1 - np.exp(-after / 0.5)) * np.exp(-after / 3.0)
    eda = 5.0 + 0.02 * t + response
    tonic = stream_features(one(signal_pb2.MODALITY_EDA, eda, rate, context_s=8.0)).eda.tonic_level
    window = eda[int(8 * rate) :]
    baseline = 5.0 + 0.02 * 9.0
    assert abs(tonic - baseline) < 0.5 * abs(float(np.median(window)) - baseline)
    flat = stream_features(one(signal_pb2.MODALITY_EDA, np.full(320, 2.5), rate, context_s=8.0)).eda
    assert flat.tonic_level == pytest.approx(2.5)


# --- degenerate inputs, unknown modalities, determinism ----------------------------------------------------


def degenerate_inputs(modality: int) -> dict[str, FeatureInput]:
    """Inputs a window can degenerate into, at a rate typical of the modality."""
    rates: dict[int, float] = {signal_pb2.MODALITY_AUDIO: 16000.0, signal_pb2.MODALITY_RESPIRATION: 32.0}
    rate = rates.get(modality, 256.0)
    n = round(6 * rate)
    context = 4.0
    noise = np.random.default_rng(3).normal(0, 1, (3, n))
    half_missing = noise.copy()
    half_missing[:, ::2] = np.nan
    infinite = noise.copy()
    infinite[:, 10:20] = np.inf
    one_channel_missing = noise.copy()
    one_channel_missing[0] = np.nan
    return {
        "all-nan": one(modality, np.full((3, n), np.nan), rate, context),
        "flat": one(modality, np.full((3, n), 1.5), rate, context),
        "zeros": one(modality, np.zeros((3, n)), rate, context),
        "one-sample": one(modality, np.ones((3, 1)), rate),
        "two-samples": one(modality, np.array([[1.0, 2.0]] * 3), rate),
        "empty": one(modality, np.empty((3, 0)), rate),
        "short": one(modality, noise[:, :5], rate),
        "one-valid": one(modality, np.where(np.arange(n) == n // 2, 1.0, np.nan)[None, :], rate, context),
        "alternate-nan": one(modality, half_missing, rate, context),
        "infinite": one(modality, infinite, rate, context),
        "one-channel-missing": one(modality, one_channel_missing, rate, context),
        "one-dimensional": one(modality, noise[0], rate, context),
        "no-channels": one(modality, np.empty((0, n)), rate, context),
        "zero-rate": FeatureInput(modality, ("ch0",), noise[:1], 0.0, 100.0, 100.0, 106.0, 104.7, 105.7),
    }


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("modality", MODALITIES, ids=lambda m: signal_pb2.Modality.Name(m))
def test_degenerate_inputs_do_not_raise_or_warn(modality: int) -> None:
    for case, data in degenerate_inputs(modality).items():
        features = stream_features(data)
        assert isinstance(features, fusion_pb2.StreamFeatures), case
        ecg, ppg = features.ecg, features.ppg
        if case in ("all-nan", "flat", "zeros", "one-sample", "empty", "one-valid"):
            assert not ecg.r_peak_times_s and not ecg.HasField("heart_rate_bpm"), case
            assert not ppg.pulse_peak_times_s and not ppg.HasField("pulse_rate_bpm"), case
            assert not features.respiration.HasField("respiration_rate_bpm"), case
        if case in ("all-nan", "empty", "one-valid"):
            assert not features.eeg.channels, case
            assert not features.eda.HasField("tonic_level"), case
            assert features.WhichOneof("kind") not in ("audio", "motion"), case


@pytest.mark.parametrize("modality", [signal_pb2.MODALITY_UNSPECIFIED, signal_pb2.MODALITY_OTHER, 99])
def test_modalities_without_features_give_an_empty_message(modality: int) -> None:
    features = stream_features(one(modality, np.random.default_rng(4).normal(0, 1, (2, 512)), 256.0))
    assert features.ByteSize() == 0


def test_context_is_declared_for_the_beat_and_slow_modalities() -> None:
    assert CONTEXT_SECONDS[signal_pb2.MODALITY_ECG] >= 3.0
    assert CONTEXT_SECONDS[signal_pb2.MODALITY_PPG] >= 4.0
    assert CONTEXT_SECONDS[signal_pb2.MODALITY_RESPIRATION] >= 15.0
    assert CONTEXT_SECONDS.get(signal_pb2.MODALITY_EEG, 0.0) == 0.0
    assert CONTEXT_SECONDS.get(signal_pb2.MODALITY_OTHER, 0.0) == 0.0


@pytest.mark.parametrize("modality", MODALITIES, ids=lambda m: signal_pb2.Modality.Name(m))
def test_same_input_gives_the_same_bytes(modality: int, mitbih_100: tuple[np.ndarray, np.ndarray]) -> None:
    rate = 16000.0 if modality == signal_pb2.MODALITY_AUDIO else 256.0
    context = CONTEXT_SECONDS.get(modality, 0.0)
    n = round((context + LENGTH_S) * rate)
    rng = np.random.default_rng(5)
    samples = mitbih_100[0][None, 256 * 300 : 256 * 300 + n] + rng.normal(0, 0.01, (3, n))
    samples[1, n // 3 : n // 2] = np.nan
    first = stream_features(one(modality, samples, rate, context)).SerializeToString()
    again = stream_features(one(modality, samples.copy(), rate, context)).SerializeToString()
    assert first == again
    assert len(first) > 0


# --- cost ----------------------------------------------------------------------------------------------------


def test_cpu_time_per_call(mitbih_100: tuple[np.ndarray, np.ndarray]) -> None:
    """Prints the mean CPU time per call (fusion's budget: ~100 windows/s on 2 cores for all streams)."""
    ecg = mitbih_100[0]
    rng = np.random.default_rng(6)
    t8 = np.arange(8 * 128) / 128.0
    t22 = np.arange(22 * 32) / 32.0
    cases = {
        "ECG 256 Hz, 6 s": one(signal_pb2.MODALITY_ECG, ecg[256 * 200 : 256 * 206], 256.0, 4.0),
        "PPG 128 Hz, 8 s": one(
            signal_pb2.MODALITY_PPG, np.sin(np.pi * 1.2 * t8) ** 8 + rng.normal(0, 0.02, t8.size), 128.0, 6.0
        ),
        "EEG 32 ch 256 Hz, 2 s": one(signal_pb2.MODALITY_EEG, rng.normal(0, 10, (32, 512)), 256.0),
        "RESP 32 Hz, 22 s": one(signal_pb2.MODALITY_RESPIRATION, np.sin(2 * np.pi * 0.25 * t22), 32.0, 20.0),
        "EDA 32 Hz, 10 s": one(signal_pb2.MODALITY_EDA, 5 + rng.normal(0, 0.01, 320), 32.0, 8.0),
        "AUDIO 16 kHz, 2 s": one(signal_pb2.MODALITY_AUDIO, rng.normal(0, 0.1, (1, 32000)), 16000.0),
        "MOTION 3 ch 64 Hz, 2 s": one(signal_pb2.MODALITY_MOTION, rng.normal(0, 0.1, (3, 128)), 64.0),
    }
    repeats = 200
    for name, data in cases.items():
        stream_features(data)
        started = time.process_time()
        for _ in range(repeats):
            stream_features(data)
        print(f"stream_features {name}: {1e3 * (time.process_time() - started) / repeats:.3f} ms CPU per call")


@pytest.mark.parametrize("size", [2, 5, 200, 1024])
def test_zero_phase_filter_equals_scipy_sosfiltfilt(size: int) -> None:
    from scipy import signal

    from services.fusion.features import _bandpass_sos, _zero_phase

    sos = _bandpass_sos(128.0, 0.5, 8.0)
    assert sos is not None
    x = np.random.default_rng(size).standard_normal(size)
    expected = signal.sosfiltfilt(sos, x, padlen=min(size - 1, 128))
    np.testing.assert_allclose(_zero_phase(x, sos, 128.0), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("channels", "size", "rate"), [(32, 512, 256.0), (3, 500, 250.0), (2, 257, 256.0), (1, 128, 64.0)]
)
def test_band_powers_equal_the_band_sums_of_scipy_welch(channels: int, size: int, rate: float) -> None:
    from scipy import signal

    from services.fusion.features import EEG_BANDS, _band_powers

    rng = np.random.default_rng(size)
    nperseg = min(size, round(rate))
    # Noise on a drift and a large offset, which the segment means must take out.
    x = rng.normal(0, 10, (channels, size)) + np.cumsum(rng.normal(0, 1, (channels, size)), axis=1) + 1e3
    freqs, psd = signal.welch(x, fs=rate, nperseg=nperseg, noverlap=nperseg // 2, axis=-1)
    bands = np.stack([(freqs >= low) & (freqs < high) for _, low, high in EEG_BANDS], axis=1)
    expected = psd @ bands * (freqs[1] - freqs[0])
    np.testing.assert_allclose(_band_powers(x, rate, nperseg), expected, rtol=1e-9)


def test_band_powers_of_flat_channels_are_zero() -> None:
    from services.fusion.features import _band_powers

    # Exactly 0 where the mean of the constant is exact (as scipy's), rounding noise otherwise.
    exact = np.array([[0.0] * 512, [1.5] * 512, [187500.0] * 512, [-2.25] * 512])
    assert np.all(_band_powers(exact, 256.0, 256) == 0.0)
    inexact = np.array([[3.7] * 512, [-0.1] * 512, [12345.678] * 512])
    assert np.all(_band_powers(inexact, 256.0, 256) < 1e-20 * inexact[:, :1] ** 2)


def test_stream_features_leaves_its_input_alone() -> None:
    rng = np.random.default_rng(8)
    for modality, context in ((signal_pb2.MODALITY_EEG, 0.0), (signal_pb2.MODALITY_ECG, 4.0)):
        samples = rng.normal(0, 1, (2, 1536))
        samples.flags.writeable = False
        features = stream_features(one(modality, samples, 256.0, context))
        assert (
            features.SerializeToString()
            == stream_features(one(modality, samples.copy(), 256.0, context)).SerializeToString()
        )


@pytest.mark.parametrize("size", [1, 2, 7, 26, 192])
def test_moving_average_equals_ndimage_uniform_filter1d(size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from scipy import ndimage

    from services.fusion import features

    x = np.random.default_rng(size).standard_normal(1536)
    expected = ndimage.uniform_filter1d(x, size, mode="nearest")
    assert np.array_equal(features._moving_average(x, size), expected)
    monkeypatch.setattr(features, "_uniform_filter1d_kernel", None)  # scipy without the compiled kernel's layout
    assert np.array_equal(features._moving_average(x, size), expected)


def test_zero_phase_is_the_same_without_the_compiled_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    from services import fusion
    from services.fusion.features import _bandpass_sos, _zero_phase

    sos = _bandpass_sos(128.0, 0.5, 8.0)
    assert sos is not None
    x = np.random.default_rng(9).standard_normal(1024)
    kernel = _zero_phase(x, sos, 128.0)
    monkeypatch.setattr(fusion.filters, "_sosfilt_kernel", None)  # scipy without the compiled kernel's layout
    assert np.array_equal(_zero_phase(x, sos, 128.0), kernel)


@pytest.mark.parametrize("size", [1, 2, 3, 8, 1535, 1536])
def test_medians_equal_numpy(size: int) -> None:
    from services.fusion.features import _median, _median_of

    x = np.random.default_rng(size).standard_normal(size)
    assert _median(x) == np.median(x)
    assert _median_of(x.tolist()) == np.median(x)


def test_runs_are_the_runs_inside_the_mask() -> None:
    from services.fusion.features import _runs

    rng = np.random.default_rng(10)
    for size in [0, 1, 2, 3, 10, 100]:
        for _ in range(50):
            mask = rng.random(size) < rng.random()
            begins, ends = _runs(mask)
            padded = np.concatenate(([False], mask, [False])).astype(np.int8)
            expected = [
                (b, e)
                for b, e in zip(
                    np.flatnonzero(np.diff(padded) == 1), np.flatnonzero(np.diff(padded) == -1), strict=True
                )
                if b > 0 and e < size
            ]
            assert list(zip(begins.tolist(), ends.tolist(), strict=True)) == expected
