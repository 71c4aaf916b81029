"""The pure window engine: alignment of multi-rate streams, watermark, de-duplication, order, silence, resets,
idle flush, and windows identical when re-computed from a later point of the log."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from clisonix.fusion.v1 import fusion_pb2
from clisonix.signal.v1 import signal_pb2
from services.fusion.streams import RawChunk
from services.fusion.windows import SessionWindows, WindowConfig, grid_phase, window_id

CONFIG = WindowConfig(output_rates_hz={"ppg": 100.0, "respiration": 25.0, "other": 50.0, "ecg": 256.0}, stagger=False)


def _truth(t: np.ndarray, freq: float) -> np.ndarray:
    return np.sin(2 * np.pi * freq * t)


def stream_chunks(
    stream_id: str,
    modality: int,
    rate: float,
    seconds: float,
    chunk_seconds: float = 0.2,
    freq: float = 1.3,
    offset_s: float = 0.0,
    drift_ppm: float = 0.0,
    start_s: float = 100.0,
    jitter_s: float = 0.0,
    seed: int = 0,
) -> list[signal_pb2.SignalChunk]:
    """Chunks of a sine of `freq` Hz whose true session time is known; the source clock is offset and drifts."""
    rng = np.random.default_rng(seed)
    true_rate = rate * (1 + drift_ppm * 1e-6)
    per_chunk = round(rate * chunk_seconds)
    chunks = []
    for seq in range(int(seconds / chunk_seconds)):
        n = seq * per_chunk + np.arange(per_chunk)
        t_true = start_s + n / true_rate
        stamp = t_true[0] - offset_s + (rng.normal(0, jitter_s) if jitter_s else 0.0)
        chunks.append(
            signal_pb2.SignalChunk(
                session_id="ps-test",
                stream_id=stream_id,
                modality=modality,  # type: ignore[arg-type]
                channel_names=["c0"],
                channel_units=["a.u."],
                nominal_rate_hz=rate,
                sequence=seq,
                first_sample_time_s=stamp,
                clock_offset_s=offset_s,
                sample_format=signal_pb2.SAMPLE_FORMAT_FLOAT32,
                samples=_truth(t_true, freq).astype("<f4").tobytes(),
                sample_count=per_chunk,
            )
        )
    return chunks


def interleave(*streams: list[signal_pb2.SignalChunk]) -> list[signal_pb2.SignalChunk]:
    """Chunks of several streams in time order, as a log would hold them."""
    merged = [c for s in streams for c in s]
    merged.sort(key=lambda c: (c.first_sample_time_s + c.clock_offset_s, c.stream_id))
    return merged


def run(chunks: list[signal_pb2.SignalChunk], config: WindowConfig = CONFIG, flush: bool = True):
    session = SessionWindows("ps-test", config)
    windows: list[fusion_pb2.FusedWindow] = []
    for offset, chunk in enumerate(chunks):
        session.add(RawChunk(chunk, 0, offset))
        windows.extend(e.window for e in session.take_ready())
    if flush:
        windows.extend(e.window for e in session.take_ready(flushing=True))
    return windows, session


def block(window: fusion_pb2.FusedWindow, stream_id: str) -> fusion_pb2.StreamWindow:
    return next(s for s in window.streams if s.stream_id == stream_id)


def values(stream: fusion_pb2.StreamWindow) -> np.ndarray:
    return np.frombuffer(stream.samples, dtype="<f4").reshape(len(stream.channel_names), stream.sample_count)


def test_multi_rate_streams_with_offsets_and_drift_land_on_one_grid() -> None:
    ppg = stream_chunks("ppg", signal_pb2.MODALITY_PPG, 125.0, 40, offset_s=-5.0, drift_ppm=3000, jitter_s=0.003)
    resp = stream_chunks(
        "resp", signal_pb2.MODALITY_RESPIRATION, 62.5, 40, chunk_seconds=0.4, offset_s=7.25, freq=0.4, seed=2
    )
    other = stream_chunks("abp", signal_pb2.MODALITY_OTHER, 249.9, 40, chunk_seconds=0.1, freq=2.1, seed=3)
    windows, _ = run(interleave(ppg, resp, other))
    assert len(windows) >= 30
    for window in windows[12:-3]:  # after the clock fits have their horizon
        assert window.end_s - window.start_s == pytest.approx(2.0)
        for stream_id, freq, rate in (("ppg", 1.3, 100.0), ("resp", 0.4, 25.0), ("abp", 2.1, 50.0)):
            s = block(window, stream_id)
            assert s.sample_rate_hz == rate and s.sample_count == round(2.0 * rate)
            grid = window.start_s + np.arange(s.sample_count) / rate
            error = values(s)[0] - _truth(grid, freq)
            assert np.max(np.abs(error)) < 0.03, (stream_id, window.window_index)
            assert s.coverage == 1.0 and not s.quality.gap and not s.quality.missing
    assert block(windows[20], "ppg").effective_rate_hz == pytest.approx(125.0 * 1.003, rel=3e-4)


def test_window_ids_are_deterministic_and_consecutive() -> None:
    chunks = stream_chunks("ppg", signal_pb2.MODALITY_PPG, 125.0, 12)
    windows, _ = run(chunks)
    indices = [w.window_index for w in windows]
    assert indices == list(range(indices[0], indices[0] + len(indices)))
    assert windows[0].start_s >= 100.0
    assert all(w.window_id == window_id("ps-test", w.start_s) for w in windows)
    assert len({w.window_id for w in windows}) == len(windows)


def test_sessions_on_one_clock_get_staggered_window_grids() -> None:
    staggered = WindowConfig(output_rates_hz=CONFIG.output_rates_hz, stagger=True)
    phases = set()
    for name in ("ps-a", "ps-b", "ps-c", "ps-d"):
        session = SessionWindows(name, staggered)
        for offset, chunk in enumerate(stream_chunks("ppg", signal_pb2.MODALITY_PPG, 125.0, 6)):
            session.add(RawChunk(chunk, 0, offset))
        windows = [e.window for e in session.take_ready(flushing=True)]
        assert windows and all(w.start_s >= 100.0 for w in windows)
        phase = round(windows[0].start_s % 1.0, 6)
        assert all(round(w.start_s % 1.0, 6) == phase for w in windows)
        assert phase == pytest.approx(grid_phase(name, 1.0))
        phases.add(phase)
    assert len(phases) == 4


def test_out_of_order_and_duplicate_chunks_give_the_same_windows() -> None:
    a = stream_chunks("ppg", signal_pb2.MODALITY_PPG, 125.0, 20)
    b = stream_chunks("resp", signal_pb2.MODALITY_RESPIRATION, 62.5, 20, seed=4)
    ordered = interleave(a, b)
    shuffled = list(ordered)
    rng = np.random.default_rng(5)
    for i in range(0, len(shuffled) - 3, 7):  # swap neighbours: late by one or two chunks
        j = i + int(rng.integers(1, 3))
        shuffled[i], shuffled[j] = shuffled[j], shuffled[i]
    shuffled[10:10] = [ordered[3], ordered[9]]  # duplicates, arriving late
    shuffled.append(ordered[-1])
    expected, _ = run(ordered)
    got, session = run(shuffled)
    for window in (*expected, *got):  # where the chunks sit in the log differs; nothing else may
        for stream in window.streams:
            stream.chunks.ClearField("first_offset")
            stream.chunks.ClearField("last_offset")
    assert [w.SerializeToString() for w in got] == [w.SerializeToString() for w in expected]
    assert session.events["duplicate"] == 3


def test_a_lost_chunk_is_a_gap_after_the_lateness() -> None:
    chunks = stream_chunks("ppg", signal_pb2.MODALITY_PPG, 125.0, 20)
    del chunks[30]  # 6.0-6.2 s after the start
    windows, session = run(chunks)
    assert session.events["gap"] == 1
    gapped = [w for w in windows if block(w, "ppg").quality.gap]
    # The last window (emitted by the flush) is only partly covered: a gap too.
    assert [w.start_s for w in gapped] == [105.0, 106.0, 119.0]
    assert all(0.85 < block(w, "ppg").coverage < 1.0 for w in gapped[:2])
    nan_points = np.isnan(values(block(gapped[0], "ppg"))).sum()
    assert nan_points == pytest.approx(0.2 * 100, abs=2)


def test_a_stream_that_stops_is_marked_missing_and_does_not_hold_windows_back() -> None:
    long = stream_chunks("ppg", signal_pb2.MODALITY_PPG, 125.0, 60)
    short = stream_chunks("resp", signal_pb2.MODALITY_RESPIRATION, 62.5, 10, seed=4)
    windows, session = run(interleave(long, short), flush=False)
    # Windows keep coming while only ppg streams, up to its end (no flush needed).
    assert windows[-1].end_s == pytest.approx(160.0)
    after_stop = [w for w in windows if w.start_s >= 110.0]
    listed = [w for w in after_stop if any(s.stream_id == "resp" for s in w.streams)]
    assert listed, "the silent stream is reported as missing before it is dropped"
    assert all(block(w, "resp").quality.missing for w in listed)
    assert all(w.start_s <= 110.0 + CONFIG.lateness_seconds for w in listed)
    assert "resp" not in session.streams  # forgotten once nothing can need it (retain_seconds later)


def test_a_restarted_stream_is_flagged_and_no_window_mixes_its_runs() -> None:
    first = stream_chunks("ppg", signal_pb2.MODALITY_PPG, 125.0, 10)
    second = stream_chunks("ppg", signal_pb2.MODALITY_PPG, 125.0, 10, start_s=110.6, freq=0.7)  # seq from 0
    windows, session = run(first + second)
    assert session.events["restart"] == 1 and session.events["reset"] == 1
    flagged = [w for w in windows if block(w, "ppg").quality.reset]
    assert flagged
    for window in windows:
        s = block(window, "ppg")
        # One run only: sequence ranges never span the restart (the runs' sequences overlap from 0).
        first_run = s.chunks.last_offset < len(first)
        second_run = s.chunks.first_offset >= len(first)
        assert first_run or second_run


def test_a_clock_jump_far_ahead_skips_empty_windows_quickly() -> None:
    a = stream_chunks("ppg", signal_pb2.MODALITY_PPG, 125.0, 6)
    b = stream_chunks("ppg", signal_pb2.MODALITY_PPG, 125.0, 6, start_s=1e6)
    for chunk in b:
        chunk.sequence += len(a)
    windows, session = run(a + b)
    assert session.events["reset"] == 1
    starts = [w.start_s for w in windows]
    assert min(s for s in starts if s > 1000) >= 1e6 - 2
    assert len(windows) < 20


def test_windows_recomputed_from_a_later_offset_are_identical() -> None:
    """What a worker that takes over mid-log produces: no window that lacks history, the rest bit-identical."""
    a = stream_chunks("ppg", signal_pb2.MODALITY_PPG, 125.0, 80, jitter_s=0.002, drift_ppm=500)
    b = stream_chunks("ecg", signal_pb2.MODALITY_ECG, 360.0, 80, seed=9, jitter_s=0.001)
    log = interleave(a, b)
    full, _ = run(log)
    start = 100
    session = SessionWindows("ps-test", CONFIG)
    later: list[fusion_pb2.FusedWindow] = []
    for offset, chunk in enumerate(log[start:], start=start):
        session.add(RawChunk(chunk, 0, offset))
        later.extend(e.window for e in session.take_ready())
    later.extend(e.window for e in session.take_ready(flushing=True))
    by_id = {w.window_id: w.SerializeToString() for w in full}
    assert later, "the later reader emits the windows whose history it has"
    first_time = log[start].first_sample_time_s + log[start].clock_offset_s
    assert later[0].start_s >= first_time + CONFIG.retain_seconds - CONFIG.hop_seconds
    for window in later:
        assert by_id[window.window_id] == window.SerializeToString()
    assert later[-1].window_id == full[-1].window_id


def test_commit_offset_never_passes_what_the_next_window_needs() -> None:
    log = stream_chunks("ppg", signal_pb2.MODALITY_PPG, 125.0, 60)
    session = SessionWindows("ps-test", CONFIG)
    for offset, chunk in enumerate(log):
        session.add(RawChunk(chunk, 0, offset))
        session.take_ready()
        needed = session.needed_offset()
        assert needed is not None and needed <= offset
        if session.next_index is not None:
            next_start = session.next_index * CONFIG.hop_seconds
            oldest_needed_time = log[needed].first_sample_time_s
            assert oldest_needed_time <= max(next_start - CONFIG.retain_seconds, log[0].first_sample_time_s) + 0.25


def test_empty_session_has_no_windows() -> None:
    session = SessionWindows("ps-test", CONFIG)
    assert session.take_ready(flushing=True) == []
    assert session.needed_offset() is None and math.isinf(session.warm_from_s)


def test_events_counter_is_shared() -> None:
    events: Counter[str] = Counter()
    session = SessionWindows("ps-test", CONFIG, events)
    chunk = stream_chunks("ppg", signal_pb2.MODALITY_PPG, 125.0, 1)[0]
    session.add(RawChunk(chunk, 0, 0))
    session.add(RawChunk(chunk, 0, 1))
    assert events["duplicate"] == 1


def test_a_stream_changing_layout_or_one_too_many_is_invalid() -> None:
    from services.common.errors import InvalidArgument

    session = SessionWindows("ps-test", WindowConfig(max_streams=1, stagger=False))
    first = stream_chunks("ppg", signal_pb2.MODALITY_PPG, 125.0, 1)[0]
    session.add(RawChunk(first, 0, 0))
    changed = signal_pb2.SignalChunk()
    changed.CopyFrom(first)
    changed.sequence = 1
    changed.nominal_rate_hz = 250.0
    with pytest.raises(InvalidArgument) as layout:
        session.add(RawChunk(changed, 0, 1))
    assert layout.value.reason == "stream_layout_changed"
    other = stream_chunks("resp", signal_pb2.MODALITY_RESPIRATION, 62.5, 1)[0]
    with pytest.raises(InvalidArgument) as many:
        session.add(RawChunk(other, 0, 2))
    assert many.value.reason == "too_many_streams"


def test_causal_cascade_equals_the_filters_one_after_another() -> None:
    from scipy import signal

    from services.fusion.filters import apply_causal, filter_plan

    plan = filter_plan(256.0, (0.5, 45.0), 4, 50.0, 30.0)
    assert len(plan.sections) == 2
    x = np.random.default_rng(3).standard_normal((4, 1536)) + 5.0
    expected = x
    for sos in plan.sections:
        zi = signal.sosfilt_zi(sos)[:, None, :] * expected[None, :, 0:1]
        expected, _ = signal.sosfilt(sos, expected, axis=1, zi=zi)
    np.testing.assert_allclose(apply_causal(plan, x), expected, atol=1e-9)
