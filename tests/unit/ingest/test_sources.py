"""Sources: synthetic signals, WFDB / EDF / BDF / XDF replay, a live LSL outlet and the BrainFlow synthetic board."""

from __future__ import annotations

import math
import threading
import time
import uuid
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clisonix.signal.v1 import signal_pb2
from services.common.chunks import SampleBlock, to_chunk
from services.ingest.sources import (
    SOURCE_KINDS,
    BrainFlowSource,
    EdfSource,
    LslSource,
    SyntheticSource,
    WfdbSource,
    XdfSource,
    modality_from_label,
    open_source,
)

DATA = Path(__file__).resolve().parents[3] / "data"
WFDB = DATA / "wfdb"
XDF = DATA / "xdf"
XDF_FLAGS = {"synchronize_clocks": False, "dejitter_timestamps": False, "handle_clock_resets": False}


def import_wfdb() -> Any:
    """wfdb, without the pandas deprecation warning its import raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import wfdb
    return wfdb


def by_stream(blocks: list[SampleBlock]) -> dict[str, list[SampleBlock]]:
    """Blocks grouped by stream id, each list in yield order."""
    out: dict[str, list[SampleBlock]] = defaultdict(list)
    for block in blocks:
        out[block.spec.stream_id].append(block)
    return out


def joined(blocks: list[SampleBlock]) -> np.ndarray:
    """The physical samples of consecutive blocks of one stream, shape (channels, samples)."""
    return np.concatenate([b.physical() for b in blocks], axis=1)


# --- synthetic ---------------------------------------------------------------------------------------------


def test_synthetic_shapes_rates_and_contiguous_timestamps() -> None:
    src = SyntheticSource(
        channels={"eeg": 4, "ecg": ["I", "II", "III"]},
        rates={"eeg": 200.0, "audio": 16000.0},
        duration_s=3.0,
        seed=7,
        start_time_s=100.0,
    )
    specs = {s.stream_id: s for s in src.specs()}
    assert specs["synthetic-eeg"].channel_count == 4
    assert specs["synthetic-eeg"].nominal_rate_hz == 200.0
    assert specs["synthetic-ecg"].channel_names == ("I", "II", "III")
    assert specs["synthetic-audio"].nominal_rate_hz == 16000.0
    assert specs["synthetic-eeg"].modality == signal_pb2.MODALITY_EEG
    assert specs["synthetic-resp"].modality == signal_pb2.MODALITY_RESPIRATION

    blocks = list(src.blocks())
    starts = [b.first_sample_time_s for b in blocks]
    assert starts == sorted(starts)
    for sid, stream_blocks in by_stream(blocks).items():
        spec = specs[sid]
        total = 0
        for block in stream_blocks:
            assert block.samples.dtype == np.float32
            assert block.samples.shape[0] == spec.channel_count
            assert block.first_sample_time_s == 100.0 + total / spec.nominal_rate_hz
            total += block.sample_count
            # about block_seconds (0.25 s) of samples each
            assert abs(block.duration_s - 0.25) <= 1.0 / spec.nominal_rate_hz
        assert total == round(3.0 * spec.nominal_rate_hz)


def test_synthetic_is_deterministic_for_a_seed() -> None:
    def run(seed: int) -> list[np.ndarray]:
        return [b.samples for b in SyntheticSource(duration_s=2.0, seed=seed).blocks()]

    first, again, other = run(3), run(3), run(4)
    assert len(first) == len(again)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_synthetic_eeg_has_an_alpha_peak() -> None:
    from scipy import signal

    src = SyntheticSource(modalities=("eeg",), duration_s=40.0, seed=11)
    eeg = joined(list(src.blocks()))
    rate = src.specs()[0].nominal_rate_hz
    freqs, psd = signal.welch(eeg, fs=rate, nperseg=int(4 * rate), axis=1)
    psd = psd.mean(axis=0)

    def band(lo: float, hi: float) -> float:
        return float(psd[(freqs >= lo) & (freqs <= hi)].mean())

    alpha = band(8.0, 12.0)
    assert alpha > 2.0 * band(4.0, 7.0)
    assert alpha > 2.0 * band(13.0, 20.0)
    # the background is in microvolts, tens of them
    assert 2.0 < float(np.std(eeg)) < 100.0


def test_synthetic_ecg_heart_rate_is_plausible_and_ppg_follows_it() -> None:
    from scipy import signal

    src = SyntheticSource(modalities=("ecg", "ppg"), duration_s=30.0, seed=5)
    streams = by_stream(list(src.blocks()))
    ecg = joined(streams["synthetic-ecg"])[0]
    ppg = joined(streams["synthetic-ppg"])[0]
    rate_ecg = src.specs()[0].nominal_rate_hz
    rate_ppg = src.specs()[1].nominal_rate_hz

    r_peaks, _ = signal.find_peaks(ecg, height=0.6, distance=int(0.3 * rate_ecg))
    rr = np.diff(r_peaks) / rate_ecg
    hr = 60.0 / rr.mean()
    assert 55.0 <= hr <= 90.0
    assert 0.0 < rr.std() < 0.15  # some variability, but no chaos
    pulses, _ = signal.find_peaks(ppg, prominence=0.5, distance=int(0.3 * rate_ppg))
    assert abs(len(pulses) - len(r_peaks)) <= 1


def test_synthetic_endless_and_bad_arguments() -> None:
    src = SyntheticSource(modalities=("resp",), duration_s=None)
    it = src.blocks()
    blocks = [next(it) for _ in range(400)]  # 100 s worth, and it has not ended
    assert blocks[-1].first_sample_time_s == pytest.approx(99.75, abs=1 / 25)  # edges fall on whole samples
    src.close()
    assert next(it, None) is None
    with pytest.raises(ValueError, match="unknown synthetic modality"):
        SyntheticSource(modalities=("eeg", "xray"))
    with pytest.raises(ValueError, match="rate must be positive"):
        SyntheticSource(rates={"eeg": 0})


# --- WFDB --------------------------------------------------------------------------------------------------


def test_wfdb_100_reconstructs_wfdb_physical_values() -> None:
    wfdb = import_wfdb()
    src = WfdbSource(WFDB / "100")
    (spec,) = src.specs()
    assert spec.modality == signal_pb2.MODALITY_ECG
    assert spec.channel_names == ("MLII", "V5")
    assert spec.channel_units == ("mV", "mV")
    assert spec.nominal_rate_hz == 360.0
    blocks = list(src.blocks())
    assert all(b.samples.dtype == np.int16 for b in blocks)
    assert sum(b.sample_count for b in blocks) == 650000
    assert blocks[1].first_sample_time_s == blocks[0].sample_count / 360.0
    # the packed chunk keeps the scaling
    chunk = to_chunk(blocks[0], "s", 0)
    assert list(chunk.channel_gain) == [1 / 200.0, 1 / 200.0]

    expected = wfdb.rdrecord(str(WFDB / "100"), physical=True).p_signal.T
    np.testing.assert_allclose(joined(blocks), expected, rtol=0, atol=1e-9)


def placed(blocks: list[SampleBlock], total: int) -> np.ndarray:
    """The blocks' physical samples put back at their timestamps' sample index; NaN where nothing was sent."""
    rate = blocks[0].spec.nominal_rate_hz
    out = np.full((blocks[0].spec.channel_count, total), np.nan)
    for block in blocks:
        start = round(block.first_sample_time_s * rate)
        out[:, start : start + block.sample_count] = block.physical()
    return out


def expected_with_gaps(want: np.ndarray) -> np.ndarray:
    """What a replay sends: a frame missing in any channel of the stream is left out for all its channels."""
    out = want.copy()
    out[:, np.isnan(want).any(axis=0)] = np.nan
    return out


def test_wfdb_v102s_maps_modalities_and_leaves_missing_samples_out() -> None:
    wfdb = import_wfdb()
    src = WfdbSource(str(WFDB / "v102s") + ".hea")
    specs = {s.modality: s for s in src.specs()}
    assert set(specs) == {signal_pb2.MODALITY_ECG, signal_pb2.MODALITY_PPG, signal_pb2.MODALITY_RESPIRATION}
    assert specs[signal_pb2.MODALITY_ECG].channel_names == ("II", "V")
    assert specs[signal_pb2.MODALITY_PPG].channel_units == ("NU",)
    streams = by_stream(list(src.blocks()))
    record = wfdb.rdrecord(str(WFDB / "v102s"), physical=True)
    for spec in specs.values():
        cols = [record.sig_name.index(n) for n in spec.channel_names]
        want = expected_with_gaps(record.p_signal[:, cols].T)
        got = placed(streams[spec.stream_id], want.shape[1])
        # wfdb's missing samples are not sent (a gap in the timestamps, never NaN); the rest match
        assert not any(np.isnan(b.physical()).any() for b in streams[spec.stream_id])
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        ok = ~np.isnan(want)
        np.testing.assert_allclose(got[ok], want[ok], rtol=1e-6, atol=1e-6)
    assert np.isnan(placed(streams["v102s-ppg"], record.sig_len)).any()


def test_wfdb_mixedsignals_gives_one_stream_per_rate() -> None:
    wfdb = import_wfdb()
    src = WfdbSource(WFDB / "mixedsignals")
    specs = src.specs()
    frame_rate = 62.4725
    rates = {round(s.nominal_rate_hz, 4) for s in specs}
    assert rates == {round(4 * frame_rate, 4), round(2 * frame_rate, 4), round(frame_rate, 4)}
    streams = by_stream(list(src.blocks()))
    ecg = next(s for s in specs if s.modality == signal_pb2.MODALITY_ECG)
    assert ecg.channel_names == ("II", "III", "V")

    record = wfdb.rdrecord(str(WFDB / "mixedsignals"), physical=True, smooth_frames=False)
    for spec in specs:
        total = round(14400 * spec.nominal_rate_hz / frame_rate)
        assert placed(streams[spec.stream_id], total).shape[1] == total
    want = expected_with_gaps(np.stack([record.e_p_signal[i] for i in range(3)]))
    got = placed(streams[ecg.stream_id], want.shape[1])
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-6, atol=1e-6)
    # streams interleave by time, not one file section after another
    times = [b.first_sample_time_s for b in src.blocks()]
    assert times == sorted(times)


# --- EDF / BDF ---------------------------------------------------------------------------------------------


def write_test_edf(path: Path, bdf: bool = False, seconds: int = 10) -> None:
    """Writes EEG Fz, EEG Cz at 256 Hz and ECG at 128 Hz into an EDF+ (or BDF+) file."""
    import pyedflib
    from pyedflib import highlevel

    rng = np.random.default_rng(0)
    t256 = np.arange(256 * seconds) / 256
    t128 = np.arange(128 * seconds) / 128
    signals = [
        40 * np.sin(2 * np.pi * 10 * t256) + rng.normal(0, 5, t256.size),
        30 * np.sin(2 * np.pi * 6 * t256) + rng.normal(0, 5, t256.size),
        np.sin(2 * np.pi * 1.2 * t128) ** 21,
    ]
    digital = (-8388608, 8388607) if bdf else (-32768, 32767)
    headers = [
        highlevel.make_signal_header("EEG Fz", "uV", 256, -200, 200, *digital),
        highlevel.make_signal_header("EEG Cz", "uV", 256, -200, 200, *digital),
        highlevel.make_signal_header("ECG", "mV", 128, -2, 2, *digital),
    ]
    file_type = pyedflib.FILETYPE_BDFPLUS if bdf else pyedflib.FILETYPE_EDFPLUS
    assert highlevel.write_edf(str(path), signals, headers, file_type=file_type)


def edf_readback(path: Path) -> dict[str, np.ndarray]:
    """Physical values per label as pyedflib reads them."""
    import pyedflib

    with pyedflib.EdfReader(str(path)) as reader:
        return {reader.getLabel(i): reader.readSignal(i) for i in range(reader.signals_in_file)}


@pytest.mark.parametrize("bdf", [False, True], ids=["edf", "bdf"])
def test_edf_and_bdf_replay(tmp_path: Path, bdf: bool) -> None:
    path = tmp_path / ("rec.bdf" if bdf else "rec.edf")
    write_test_edf(path, bdf=bdf)
    expected = edf_readback(path)
    with open_source(f"{'bdf' if bdf else 'edf'}:{path}") as src:
        assert isinstance(src, EdfSource)
        specs = {s.modality: s for s in src.specs()}
        assert set(specs) == {signal_pb2.MODALITY_EEG, signal_pb2.MODALITY_ECG}
        assert specs[signal_pb2.MODALITY_EEG].channel_names == ("EEG Fz", "EEG Cz")
        assert specs[signal_pb2.MODALITY_EEG].nominal_rate_hz == 256.0
        assert specs[signal_pb2.MODALITY_ECG].nominal_rate_hz == 128.0
        assert specs[signal_pb2.MODALITY_ECG].channel_units == ("mV",)
        blocks = list(src.blocks())
    with open_source(f"{'bdf' if bdf else 'edf'}:{path}", duration_s=1.5) as short:
        assert sum(b.sample_count for b in short.blocks()) == round(1.5 * 256) + round(1.5 * 128)
    starts = [b.first_sample_time_s for b in blocks]
    assert starts == sorted(starts)
    want_dtype = np.float32 if bdf else np.int16
    assert all(b.samples.dtype == want_dtype for b in blocks)
    streams = by_stream(blocks)
    for spec in specs.values():
        got = joined(streams[spec.stream_id])
        want = np.stack([expected[n] for n in spec.channel_names])
        assert got.shape == want.shape
        if bdf:
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9)


# --- XDF ---------------------------------------------------------------------------------------------------


def test_xdf_clock_resets_keeps_raw_timestamps_and_skips_markers() -> None:
    import pyxdf

    streams, _ = pyxdf.load_xdf(str(XDF / "clock_resets.xdf"), **XDF_FLAGS)
    eeg = next(s for s in streams if s["info"]["type"][0] == "EEG")
    stamps, series = eeg["time_stamps"], eeg["time_series"]

    src = XdfSource(XDF / "clock_resets.xdf")
    (spec,) = src.specs()  # the marker stream is skipped
    assert spec.modality == signal_pb2.MODALITY_EEG
    assert spec.channel_count == 8
    assert spec.nominal_rate_hz == 100.0
    blocks = list(src.blocks())
    assert all(b.spec.stream_id == spec.stream_id for b in blocks)
    assert sum(b.sample_count for b in blocks) == len(stamps) == 27815

    index = 0
    for block in blocks:
        assert block.first_sample_time_s == stamps[index]
        np.testing.assert_array_equal(block.samples, series[index : index + block.sample_count].T)
        assert math.isfinite(block.clock_offset_s) and block.clock_offset_s != 0.0
        index += block.sample_count
    # a block starts right at the clock reset, so no block straddles it
    reset = int(np.flatnonzero(np.diff(stamps) < 0)[0]) + 1
    assert reset in np.cumsum([0] + [b.sample_count for b in blocks])
    # offsets come from the recorded clock measurements on the same side of the reset as the block
    times, values = np.asarray(eeg["clock_times"]), np.asarray(eeg["clock_values"])
    cut = int(np.flatnonzero(np.diff(times) < 0)[0]) + 1
    before, after = blocks[0], blocks[-1]
    assert before.clock_offset_s == np.interp(before.first_sample_time_s, times[:cut], values[:cut])
    assert after.clock_offset_s == np.interp(after.first_sample_time_s, times[cut:], values[cut:])
    assert before.clock_offset_s == pytest.approx(-652340.28, abs=0.01)
    assert after.clock_offset_s == pytest.approx(1121.17, abs=0.01)


def test_xdf_minimal_and_empty_streams_do_not_crash() -> None:
    minimal = XdfSource(XDF / "minimal.xdf")
    (spec,) = minimal.specs()  # the string stream is skipped
    blocks = list(minimal.blocks())
    assert sum(b.sample_count for b in blocks) == 9
    assert blocks[0].samples.dtype == np.int16
    assert blocks[0].first_sample_time_s == pytest.approx(5.1)

    empty = XdfSource(XDF / "empty_streams.xdf")
    blocks = list(empty.blocks())
    # only the one numeric stream with samples remains
    assert [s.channel_names for s in empty.specs()] == [("ch:00",)]
    assert sum(b.sample_count for b in blocks) == 10


# --- LSL ---------------------------------------------------------------------------------------------------

_LSL_CONFIG = """
[ports]
IPv6 = disable
[multicast]
ResolveScope = machine
[lab]
KnownPeers = {127.0.0.1}
[log]
level = -2
"""


@pytest.fixture(scope="module")
def lsl() -> Any:
    """pylsl, restricted to this machine (only effective if liblsl was not used earlier in the process)."""
    import pylsl

    try:
        pylsl.set_config_content(_LSL_CONFIG)
    except NotImplementedError:  # older liblsl: defaults resolve on loopback too
        pass
    return pylsl


def test_lsl_receives_pushed_samples_in_order(lsl: Any) -> None:
    name = f"clisonix-test-{uuid.uuid4().hex}"
    info = lsl.StreamInfo(name, "EEG", 3, 100.0, lsl.cf_float32, name)
    info.set_channel_labels(["Fz", "Cz", "Pz"])
    info.set_channel_units(["uV", "uV", "uV"])
    outlet = lsl.StreamOutlet(info)
    n = 300
    pushed = (np.arange(n * 3, dtype=np.float32).reshape(n, 3) * 0.5) - 100.0
    stamps = 1000.0 + np.arange(n) / 100.0
    errors: list[BaseException] = []

    def push() -> None:
        try:
            assert outlet.wait_for_consumers(5.0), "the inlet never connected"
            for row, ts in zip(pushed, stamps, strict=True):
                outlet.push_sample(row.tolist(), float(ts))
        except BaseException as exc:  # surfaced in the test thread
            errors.append(exc)

    src = open_source(f"lsl:name={name}", timeout_s=5.0, duration_s=10.0, block_seconds=0.1)
    assert isinstance(src, LslSource)
    (spec,) = src.specs()
    assert spec.channel_names == ("Fz", "Cz", "Pz")
    assert spec.channel_units == ("uV", "uV", "uV")
    assert spec.modality == signal_pb2.MODALITY_EEG
    pusher = threading.Thread(target=push, daemon=True)
    pusher.start()
    got: list[SampleBlock] = []
    try:
        for block in src.blocks():  # duration_s bounds the wait should samples never come
            got.append(block)
            if sum(b.sample_count for b in got) >= n:
                break
    finally:
        src.close()
        pusher.join(timeout=5.0)
    assert not errors, errors
    received = np.concatenate([b.samples for b in got], axis=1)
    np.testing.assert_array_equal(received, pushed.T)
    index = 0
    for block in got:
        assert block.first_sample_time_s == stamps[index]
        assert math.isfinite(block.clock_offset_s)
        index += block.sample_count


def test_lsl_errors_for_missing_and_irregular_streams(lsl: Any) -> None:
    with pytest.raises(LookupError, match="no LSL stream"):
        LslSource(name=f"missing-{uuid.uuid4().hex}", timeout_s=0.3)
    name = f"clisonix-markers-{uuid.uuid4().hex}"
    outlet = lsl.StreamOutlet(lsl.StreamInfo(name, "Markers", 1, lsl.IRREGULAR_RATE, lsl.cf_float32, name))
    with pytest.raises(ValueError, match="irregular rate"):
        LslSource(name=name, timeout_s=5.0)
    del outlet


def test_lsl_close_from_another_thread_ends_blocks(lsl: Any) -> None:
    name = f"clisonix-idle-{uuid.uuid4().hex}"
    outlet = lsl.StreamOutlet(lsl.StreamInfo(name, "ECG", 1, 250.0, lsl.cf_float32, name))
    src = LslSource(name=name, timeout_s=5.0, duration_s=20.0)  # nothing is pushed: blocks() waits
    closer = threading.Timer(0.3, src.close)
    closer.start()
    began = time.monotonic()
    assert list(src.blocks()) == []
    # ended by close(), long before duration_s
    assert time.monotonic() - began < 5.0
    closer.join(timeout=5.0)
    del outlet


# --- BrainFlow ---------------------------------------------------------------------------------------------


def test_brainflow_synthetic_board_streams_and_releases() -> None:
    src = open_source("brainflow:synthetic", duration_s=10.0, block_seconds=0.1)
    assert isinstance(src, BrainFlowSource)
    specs = {s.stream_id: s for s in src.specs()}
    eeg = specs["brainflow-eeg"]
    assert eeg.modality == signal_pb2.MODALITY_EEG
    assert eeg.channel_count == 16 and eeg.nominal_rate_hz == 250.0
    # the synthetic board lists its EXG rows as ECG too; they go to EEG only
    assert "brainflow-ecg" not in specs
    assert {s.modality for s in specs.values()} >= {signal_pb2.MODALITY_PPG, signal_pb2.MODALITY_EDA}

    counts: dict[str, int] = defaultdict(int)
    eeg_starts: list[float] = []
    try:
        for block in src.blocks():
            assert np.isfinite(block.samples).all()
            counts[block.spec.stream_id] += block.sample_count
            if block.spec is eeg:
                eeg_starts.append(block.first_sample_time_s)
            if all(counts[sid] >= 100 for sid in specs):
                break
    finally:
        src.close()
    assert all(counts[sid] >= 100 for sid in specs), dict(counts)
    assert eeg_starts == sorted(eeg_starts) and eeg_starts[0] > 1e9  # unix time from the timestamp row

    # the session was released: the same board opens again
    again = BrainFlowSource(duration_s=5.0, block_seconds=0.1)
    try:
        assert next(iter(again.blocks())).sample_count > 0
    finally:
        again.close()


# --- factory and labels ------------------------------------------------------------------------------------


def test_open_source_parses_kinds() -> None:
    src = open_source("synthetic:eeg,ecg", duration_s=1.0)
    assert isinstance(src, SyntheticSource)
    assert [s.stream_id for s in src.specs()] == ["synthetic-eeg", "synthetic-ecg"]
    assert isinstance(open_source("synthetic"), SyntheticSource)
    assert isinstance(open_source(f"wfdb:{WFDB / '100'}"), WfdbSource)
    assert isinstance(open_source(f"wfdb:{WFDB / '100.hea'}"), WfdbSource)
    assert isinstance(open_source(f"xdf:{XDF / 'minimal.xdf'}"), XdfSource)
    assert isinstance(open_source(f"XDF:{XDF / 'minimal.xdf'}"), XdfSource)
    # every kind takes duration_s (the CLI passes it whatever the source)
    for spec in (f"wfdb:{WFDB / 'v102s'}", f"xdf:{XDF / 'clock_resets.xdf'}"):
        src = open_source(spec, duration_s=2.0)
        counts = {k: sum(b.sample_count for b in v) for k, v in by_stream(list(src.blocks())).items()}
        assert counts == {s.stream_id: round(2.0 * s.nominal_rate_hz) for s in src.specs()}
    with pytest.raises(ValueError, match="unknown source kind 'camera'; kinds: synthetic, wfdb, edf"):
        open_source("camera:/dev/video0")
    with pytest.raises(ValueError, match="needs a path"):
        open_source("wfdb")
    with pytest.raises(ValueError, match="unknown BrainFlow board"):
        open_source("brainflow:no-such-board")
    assert set(SOURCE_KINDS) == {"synthetic", "wfdb", "edf", "bdf", "xdf", "lsl", "brainflow", "recording"}


@pytest.mark.parametrize(
    ("label", "modality"),
    [
        ("MLII", signal_pb2.MODALITY_ECG),
        ("V5", signal_pb2.MODALITY_ECG),
        ("aVF", signal_pb2.MODALITY_ECG),
        ("ECG II", signal_pb2.MODALITY_ECG),
        ("EKG", signal_pb2.MODALITY_ECG),
        ("PLETH", signal_pb2.MODALITY_PPG),
        ("RESP", signal_pb2.MODALITY_RESPIRATION),
        ("ABP", signal_pb2.MODALITY_OTHER),
        ("EEG Fpz-Cz", signal_pb2.MODALITY_EEG),
        ("GSR", signal_pb2.MODALITY_EDA),
        ("Accelerometer", signal_pb2.MODALITY_MOTION),
        ("Audio", signal_pb2.MODALITY_AUDIO),
        ("Markers", signal_pb2.MODALITY_OTHER),
    ],
)
def test_modality_from_label(label: str, modality: int) -> None:
    assert modality_from_label(label) == modality


def test_synthetic_spec_sets_channels_and_rates() -> None:
    from services.ingest.sources import parse_synthetic

    assert parse_synthetic("eeg=32@1000, ecg@500,ppg") == (
        ("eeg", "ecg", "ppg"),
        {"eeg": 32},
        {"eeg": 1000.0, "ecg": 500.0},
    )
    with open_source("synthetic:eeg=8@512,audio@16000", duration_s=1.0, block_seconds=0.5) as source:
        specs = {spec.modality: spec for spec in source.specs()}
        blocks = list(source.blocks())
    assert specs[signal_pb2.MODALITY_EEG].channel_count == 8
    assert specs[signal_pb2.MODALITY_EEG].nominal_rate_hz == 512.0
    assert specs[signal_pb2.MODALITY_AUDIO].nominal_rate_hz == 16000.0
    assert {b.sample_count for b in blocks if b.spec.modality == signal_pb2.MODALITY_EEG} == {256}
    for bad in ("synthetic:eeg=x", "synthetic:eeg@fast", "synthetic:eeg=0"):
        with pytest.raises(ValueError, match="synthetic stream"):
            open_source(bad)
