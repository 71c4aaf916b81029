"""Packing SampleBlocks into SignalChunks and back: float32, int16 with gain/offset, the byte layout."""

from __future__ import annotations

import numpy as np
import pytest

from clisonix.signal.v1 import signal_pb2
from services.common.chunks import SampleBlock, StreamSpec, physical_samples, to_chunk, unpack_samples

SPEC = StreamSpec("eeg-0", signal_pb2.MODALITY_EEG, ("C3", "C4"), ("uV", "uV"), 250.0)


def test_float32_round_trip_and_fields() -> None:
    samples = np.random.default_rng(1).standard_normal((2, 17)).astype(np.float32)
    block = SampleBlock(SPEC, 12.5, samples, clock_offset_s=-0.25)
    chunk = to_chunk(block, "session-a", 7, subject_id="subject-a")
    assert chunk.sample_format == signal_pb2.SAMPLE_FORMAT_FLOAT32
    assert (chunk.session_id, chunk.stream_id, chunk.sequence, chunk.subject_id) == (
        "session-a",
        "eeg-0",
        7,
        "subject-a",
    )
    assert chunk.modality == signal_pb2.MODALITY_EEG
    assert list(chunk.channel_names) == ["C3", "C4"]
    assert list(chunk.channel_units) == ["uV", "uV"]
    assert chunk.nominal_rate_hz == 250.0
    assert chunk.first_sample_time_s == 12.5
    assert chunk.clock_offset_s == -0.25
    assert chunk.sample_count == 17
    assert len(chunk.channel_gain) == 0 and len(chunk.channel_offset) == 0
    # Survives the wire.
    parsed = signal_pb2.SignalChunk.FromString(chunk.SerializeToString())
    raw = unpack_samples(parsed)
    assert raw.dtype == np.dtype("<f4")
    assert raw.shape == (2, 17)
    np.testing.assert_array_equal(raw, samples)
    np.testing.assert_array_equal(physical_samples(parsed), samples.astype(np.float64))
    np.testing.assert_array_equal(block.physical(), physical_samples(parsed))


def test_float64_input_is_packed_as_float32() -> None:
    samples = np.array([[1.5, -2.25]], dtype=np.float64)
    spec = StreamSpec("x", signal_pb2.MODALITY_ECG, ("II",), ("mV",), 500.0)
    chunk = to_chunk(SampleBlock(spec, 0.0, samples), "s", 0)
    assert chunk.sample_format == signal_pb2.SAMPLE_FORMAT_FLOAT32
    assert len(chunk.samples) == 8
    np.testing.assert_array_equal(unpack_samples(chunk), samples.astype(np.float32))


def test_int16_round_trip_with_gain_and_offset() -> None:
    samples = np.array([[-32768, -1, 0, 1, 32767], [100, 200, 300, 400, 500]], dtype=np.int16)
    gain, offset = (0.5, 0.001), (10.0, -3.0)
    block = SampleBlock(SPEC, 0.0, samples, gain=gain, offset=offset)
    chunk = signal_pb2.SignalChunk.FromString(to_chunk(block, "s", 0).SerializeToString())
    assert chunk.sample_format == signal_pb2.SAMPLE_FORMAT_INT16
    assert list(chunk.channel_gain) == list(gain)
    assert list(chunk.channel_offset) == list(offset)
    assert len(chunk.samples) == 2 * 5 * 2
    raw = unpack_samples(chunk)
    assert raw.dtype == np.dtype("<i2")
    np.testing.assert_array_equal(raw, samples)
    physical = physical_samples(chunk)
    expected = np.array(
        [
            [-32768 * 0.5 + 10, -0.5 + 10, 10.0, 0.5 + 10, 32767 * 0.5 + 10],
            [0.1 - 3, 0.2 - 3, 0.3 - 3, 0.4 - 3, 0.5 - 3],
        ]
    )
    np.testing.assert_allclose(physical, expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(block.physical(), physical)


def test_channel_major_little_endian_float32_bytes() -> None:
    samples = np.array([[1.0, 2.0], [3.0, -1.0]], dtype=np.float32)
    chunk = to_chunk(SampleBlock(SPEC, 0.0, samples), "s", 0)
    # 1.0 = 0x3f800000, 2.0 = 0x40000000, 3.0 = 0x40400000, -1.0 = 0xbf800000; little-endian, channel 0 first.
    assert chunk.samples == bytes.fromhex("0000803f0000004000004040000080bf")


def test_channel_major_little_endian_int16_bytes() -> None:
    samples = np.array([[1, 2, 3], [258, -2, 0]], dtype=np.int16)
    chunk = to_chunk(SampleBlock(SPEC, 0.0, samples, gain=(1.0, 1.0), offset=(0.0, 0.0)), "s", 0)
    assert chunk.samples == bytes.fromhex("0100020003000201feff0000")


def test_non_contiguous_and_big_endian_input_is_normalised() -> None:
    base = np.arange(8, dtype=">f4").reshape(4, 2)
    samples = base.T  # (2, 4), Fortran order and big-endian
    chunk = to_chunk(SampleBlock(SPEC, 0.0, samples), "s", 0)
    assert chunk.samples == np.array([[0, 2, 4, 6], [1, 3, 5, 7]], dtype="<f4").tobytes()
    np.testing.assert_array_equal(unpack_samples(chunk), samples)


@pytest.mark.parametrize("fmt", [signal_pb2.SAMPLE_FORMAT_FLOAT32, signal_pb2.SAMPLE_FORMAT_INT16])
@pytest.mark.parametrize("delta", [-1, 1])
def test_size_mismatch_raises_value_error(fmt: int, delta: int) -> None:
    samples = np.zeros((2, 4), dtype=np.int16 if fmt == signal_pb2.SAMPLE_FORMAT_INT16 else np.float32)
    chunk = to_chunk(SampleBlock(SPEC, 0.0, samples, gain=(1.0, 1.0), offset=(0.0, 0.0)), "s", 0)
    assert chunk.sample_format == fmt
    chunk.samples = chunk.samples[:-1] if delta < 0 else chunk.samples + b"\0"
    with pytest.raises(ValueError, match="bytes"):
        unpack_samples(chunk)
    with pytest.raises(ValueError):
        physical_samples(chunk)


def test_block_properties() -> None:
    block = SampleBlock(SPEC, 0.0, np.zeros((2, 125), dtype=np.float32))
    assert block.sample_count == 125
    assert block.duration_s == 0.5
    assert SPEC.channel_count == 2
