"""Real recordings streamed through ingest and fusion (real gRPC, real broker): alignment, R-peaks against the
cardiologists' annotations, heart rates from two sensors, and a real clock reset."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest

from clisonix.fusion.v1 import fusion_pb2
from clisonix.signal.v1 import signal_pb2
from services.ingest.sources import WfdbSource, XdfSource
from tests.conftest import DATA
from tests.integration.fusion.helpers import fused_windows, stream_blocks

pytestmark = pytest.mark.integration

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import wfdb

BEAT_SYMBOLS = set("NLRBAaJSVrFejnE/fQ?")


def stream_of(window: fusion_pb2.FusedWindow, modality: int) -> list[fusion_pb2.StreamWindow]:
    return [s for s in window.streams if s.modality == modality]


def samples_of(stream: fusion_pb2.StreamWindow) -> np.ndarray:
    return np.frombuffer(stream.samples, dtype="<f4").reshape(len(stream.channel_names), stream.sample_count)


def match_beats(reference: np.ndarray, detected: np.ndarray, tolerance_s: float) -> int:
    """One-to-one matches of detected beats to reference beats within the tolerance (greedy, in time order)."""
    matched = 0
    j = 0
    for t in reference:
        while j < len(detected) and detected[j] < t - tolerance_s:
            j += 1
        if j < len(detected) and abs(detected[j] - t) <= tolerance_s:
            matched += 1
            j += 1
    return matched


async def test_mixedsignals_streams_arrive_aligned_with_the_file_times(broker, ingest_service, fusion_service) -> None:
    fusion = await fusion_service()
    ingest = await ingest_service(topic_raw=fusion.settings.topic_raw)
    record_path = DATA / "wfdb" / "mixedsignals"
    session = await stream_blocks(ingest.grpc_port, "mixed", WfdbSource(record_path, duration_s=60).blocks())
    windows = await fused_windows(broker.bootstrap_servers, fusion.settings.topic_fused, session, 59.0)
    # Each stream window says when ingest received its newest chunk (the pipeline latency starts there), no later
    # than the window left fusion.
    for window in windows:
        for stream in window.streams:
            if stream.chunks.chunk_count:
                assert 0 < stream.chunks.last_ingest_time.ToNanoseconds() <= time.time_ns()

    record = wfdb.rdrecord(str(record_path), smooth_frames=False)
    frame_rate = float(record.fs)
    truth = {}
    for name, signal, per_frame in zip(record.sig_name, record.e_p_signal, record.samps_per_frame, strict=True):
        rate = frame_rate * per_frame
        truth[name] = (np.arange(len(signal)) / rate, np.asarray(signal, dtype=np.float64))

    checked = 0
    for window in windows[5:-2]:
        for stream in window.streams:
            grid = window.start_s + np.arange(stream.sample_count) / stream.sample_rate_hz
            for channel, values in zip(stream.channel_names, samples_of(stream), strict=True):
                times, signal = truth[channel]
                expected = np.interp(grid, times, signal)
                if stream.filters:  # ECG: band-passed causally, so compare timing only (cross-correlation lag)
                    a = values - values.mean()
                    b = expected - expected.mean()
                    lags = np.arange(-10, 11)
                    scores = [np.dot(a[10:-10], np.roll(b, lag)[10:-10]) for lag in lags]
                    lag_s = lags[int(np.argmax(scores))] / stream.sample_rate_hz
                    assert abs(lag_s) <= 0.02, (channel, window.window_index, lag_s)
                else:
                    # Resampled, not filtered: the values themselves, at the file's own sample times.
                    spread = np.nanmax(signal) - np.nanmin(signal)
                    error = np.abs(values - expected)
                    assert np.nanmax(error) < 0.05 * spread, (channel, window.window_index)
                checked += 1
        assert {s.modality for s in window.streams} >= {
            signal_pb2.MODALITY_ECG,
            signal_pb2.MODALITY_PPG,
            signal_pb2.MODALITY_RESPIRATION,
        }
    assert checked > 200


async def test_mitbih_100_r_peaks_match_the_annotations(broker, ingest_service, fusion_service) -> None:
    fusion = await fusion_service()
    ingest = await ingest_service(topic_raw=fusion.settings.topic_raw)
    record_path = DATA / "wfdb" / "100"
    session = await stream_blocks(ingest.grpc_port, "mitbih-100", WfdbSource(record_path).blocks())
    windows = await fused_windows(broker.bootstrap_servers, fusion.settings.topic_fused, session, 1800.0, 240.0)

    annotation = wfdb.rdann(str(record_path), "atr")
    beats = np.array(
        [s / annotation.fs for s, sym in zip(annotation.sample, annotation.symbol, strict=True) if sym in BEAT_SYMBOLS]
    )
    detected = np.array(
        sorted(t for w in windows for s in stream_of(w, signal_pb2.MODALITY_ECG) for t in s.features.ecg.r_peak_times_s)
    )
    # Every beat is reported by one window only.
    assert np.all(np.diff(detected) > 0.2)
    first, last = windows[0].start_s, detected[-1]
    reference = beats[(beats >= first + 1.0) & (beats <= last)]
    found = detected[(detected >= first + 1.0)]
    matched = match_beats(reference, found, 0.15)
    sensitivity = matched / len(reference)
    predictivity = matched / len(found)
    print(f"MIT-BIH 100: {len(reference)} beats, Se {sensitivity:.4%}, +P {predictivity:.4%}")
    assert len(reference) > 2200
    assert sensitivity >= 0.995, sensitivity
    assert predictivity >= 0.995, predictivity


async def test_v102s_ecg_and_ppg_heart_rates_agree(broker, ingest_service, fusion_service) -> None:
    fusion = await fusion_service()
    ingest = await ingest_service(topic_raw=fusion.settings.topic_raw)
    session = await stream_blocks(ingest.grpc_port, "v102s", WfdbSource(DATA / "wfdb" / "v102s").blocks())
    windows = await fused_windows(broker.bootstrap_servers, fusion.settings.topic_fused, session, 299.0)
    differences = []
    for window in windows:
        ecg = stream_of(window, signal_pb2.MODALITY_ECG)[0].features.ecg
        ppg = stream_of(window, signal_pb2.MODALITY_PPG)[0].features.ppg
        if ecg.HasField("heart_rate_bpm") and ppg.HasField("pulse_rate_bpm"):
            differences.append(abs(ecg.heart_rate_bpm - ppg.pulse_rate_bpm))
    assert len(differences) > 0.8 * len(windows)
    assert float(np.median(differences)) <= 2.0


async def test_clock_reset_in_xdf_is_detected_and_never_mixed(broker, ingest_service, fusion_service) -> None:
    fusion = await fusion_service()
    ingest = await ingest_service(topic_raw=fusion.settings.topic_raw)
    path = DATA / "xdf" / "clock_resets.xdf"
    blocks = list(XdfSource(path).blocks())
    eeg_blocks = [b for b in blocks if b.spec.modality == signal_pb2.MODALITY_EEG]
    stamps = [b.first_sample_time_s for b in eeg_blocks]
    reset_sequence = next(i for i in range(1, len(stamps)) if stamps[i] < stamps[i - 1])
    ends = [b.first_sample_time_s + b.clock_offset_s + b.duration_s for b in eeg_blocks]
    session = await stream_blocks(ingest.grpc_port, "resets", blocks)
    windows = await fused_windows(broker.bootstrap_servers, fusion.settings.topic_fused, session, ends[-1] - 2.0)

    eeg = [(w, stream_of(w, signal_pb2.MODALITY_EEG)[0]) for w in windows]
    for window, stream in eeg:
        before = stream.chunks.last_sequence < reset_sequence
        after = stream.chunks.first_sequence >= reset_sequence
        assert before or after, (window.window_index, stream.chunks)
    assert any(stream.quality.reset for _, stream in eeg)
    # Both clock segments produced windows; the effective rate shows the source's slow clock (~93 Hz of 100).
    assert any(s.chunks.last_sequence < reset_sequence for _, s in eeg)
    assert any(s.chunks.first_sequence >= reset_sequence for _, s in eeg)
    assert 90.0 < eeg[len(eeg) // 2][1].effective_rate_hz < 96.0
    resets = fusion.runtime.metrics.registry.get_sample_value("clisonix_fusion_chunk_events_total", {"event": "reset"})
    assert resets is not None and resets >= 1
