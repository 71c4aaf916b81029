"""Chunk validation: every rule raises the right domain error with its documented `reason`."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from clisonix.signal.v1 import signal_pb2
from services.common.chunks import SampleBlock, StreamSpec, to_chunk
from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.validation import MAX_ID_LENGTH, check_size, layout_of, validate_chunk
from tests.helpers import EEG, make_chunk

MAX_CHANNELS = 8


def int16_chunk() -> signal_pb2.SignalChunk:
    samples = np.arange(-5, 5, dtype=np.int16).reshape(2, 5)
    return to_chunk(SampleBlock(EEG, 0.0, samples, gain=(0.5, 0.25), offset=(1.0, -1.0)), "session-a", 0)


def rejected(chunk: signal_pb2.SignalChunk) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        validate_chunk(chunk, MAX_CHANNELS)
    assert info.value.code == "INVALID_ARGUMENT"
    return info.value


def test_valid_float32_chunk_passes() -> None:
    validate_chunk(make_chunk(), MAX_CHANNELS)


def test_valid_int16_chunk_passes() -> None:
    chunk = int16_chunk()
    assert chunk.sample_format == signal_pb2.SAMPLE_FORMAT_INT16
    validate_chunk(chunk, MAX_CHANNELS)


@pytest.mark.parametrize("field", ["session_id", "stream_id"])
def test_empty_id_is_missing_id(field: str) -> None:
    chunk = make_chunk()
    setattr(chunk, field, "")
    error = rejected(chunk)
    assert error.reason == "missing_id"
    assert field in str(error)


@pytest.mark.parametrize("field", ["session_id", "stream_id"])
def test_too_long_id(field: str) -> None:
    chunk = make_chunk()
    setattr(chunk, field, "x" * MAX_ID_LENGTH)
    validate_chunk(chunk, MAX_CHANNELS)  # exactly at the limit is fine
    setattr(chunk, field, "x" * (MAX_ID_LENGTH + 1))
    assert rejected(chunk).reason == "id_too_long"


def test_no_channels() -> None:
    chunk = make_chunk()
    del chunk.channel_names[:]
    assert rejected(chunk).reason == "no_channels"


def test_too_many_channels() -> None:
    chunk = make_chunk()  # 2 channels
    validate_chunk(chunk, 2)
    with pytest.raises(InvalidArgument) as info:
        validate_chunk(chunk, 1)
    assert info.value.reason == "too_many_channels"


def test_units_count_mismatch() -> None:
    chunk = make_chunk()
    chunk.channel_units.append("uV")
    assert rejected(chunk).reason == "channel_count_mismatch"


def test_no_units_at_all_is_allowed() -> None:
    chunk = make_chunk()
    del chunk.channel_units[:]
    validate_chunk(chunk, MAX_CHANNELS)


@pytest.mark.parametrize("rate", [0.0, -250.0, math.nan, math.inf, -math.inf])
def test_bad_rate(rate: float) -> None:
    chunk = make_chunk()
    chunk.nominal_rate_hz = rate
    assert rejected(chunk).reason == "bad_rate"


@pytest.mark.parametrize("field", ["first_sample_time_s", "clock_offset_s"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_timestamps(field: str, value: float) -> None:
    chunk = make_chunk()
    setattr(chunk, field, value)
    assert rejected(chunk).reason == "bad_timestamp"


def test_unspecified_format() -> None:
    chunk = make_chunk()
    chunk.sample_format = signal_pb2.SAMPLE_FORMAT_UNSPECIFIED
    assert rejected(chunk).reason == "bad_sample_format"


def test_zero_sample_count() -> None:
    chunk = make_chunk()
    chunk.sample_count = 0
    chunk.samples = b""
    assert rejected(chunk).reason == "empty_chunk"


@pytest.mark.parametrize("delta", [-4, -1, 1, 4])
def test_byte_size_mismatch(delta: int) -> None:
    chunk = make_chunk()
    chunk.samples = chunk.samples[:delta] if delta < 0 else chunk.samples + b"\0" * delta
    assert rejected(chunk).reason == "sample_size_mismatch"


def test_int16_size_uses_two_bytes_per_sample() -> None:
    chunk = int16_chunk()
    chunk.samples = chunk.samples + chunk.samples  # the byte count of float32 samples
    assert rejected(chunk).reason == "sample_size_mismatch"


@pytest.mark.parametrize("field", ["channel_gain", "channel_offset"])
def test_int16_needs_gain_and_offset_per_channel(field: str) -> None:
    chunk = int16_chunk()
    getattr(chunk, field).pop()
    assert rejected(chunk).reason == "channel_count_mismatch"
    chunk = int16_chunk()
    del getattr(chunk, field)[:]
    assert rejected(chunk).reason == "channel_count_mismatch"


@pytest.mark.parametrize(
    ("gain", "offset"),
    [
        ((0.5, 0.0), (0.0, 0.0)),
        ((0.5, math.nan), (0.0, 0.0)),
        ((math.inf, 0.5), (0.0, 0.0)),
        ((0.5, 0.5), (math.nan, 0.0)),
        ((0.5, 0.5), (0.0, -math.inf)),
    ],
)
def test_int16_gains_finite_non_zero_offsets_finite(gain: tuple[float, ...], offset: tuple[float, ...]) -> None:
    chunk = int16_chunk()
    chunk.channel_gain[:] = gain
    chunk.channel_offset[:] = offset
    assert rejected(chunk).reason == "bad_scaling"


@pytest.mark.parametrize("field", ["channel_gain", "channel_offset"])
def test_float32_must_not_carry_scaling(field: str) -> None:
    chunk = make_chunk()
    getattr(chunk, field).extend([1.0, 1.0])
    assert rejected(chunk).reason == "bad_scaling"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples(bad: float) -> None:
    samples = np.zeros((2, 5), dtype=np.float32)
    samples[1, 3] = bad
    chunk = to_chunk(SampleBlock(EEG, 0.0, samples), "session-a", 0)
    assert rejected(chunk).reason == "non_finite_samples"


def test_check_size() -> None:
    chunk = make_chunk()  # 2 x 50 float32 = 400 bytes
    check_size(chunk, 400)
    with pytest.raises(ResourceExhausted) as info:
        check_size(chunk, 399)
    assert info.value.reason == "chunk_too_large"
    assert info.value.code == "RESOURCE_EXHAUSTED"


def test_layout_of_covers_what_may_not_change() -> None:
    base = layout_of(make_chunk(0))
    assert layout_of(make_chunk(7)) == base  # sequence, samples and time do not count
    for change in (
        lambda c: setattr(c, "modality", signal_pb2.MODALITY_ECG),
        lambda c: c.channel_names.append("Cz"),
        lambda c: c.channel_units.__setitem__(0, "mV"),
        lambda c: setattr(c, "nominal_rate_hz", 256.0),
        lambda c: setattr(c, "sample_format", signal_pb2.SAMPLE_FORMAT_INT16),
    ):
        chunk = make_chunk(0)
        change(chunk)
        assert layout_of(chunk) != base


@st.composite
def finite_blocks(draw: st.DrawFn) -> SampleBlock:
    channels = draw(st.integers(1, MAX_CHANNELS))
    count = draw(st.integers(1, 40))
    samples = draw(
        hnp.arrays(
            np.float32,
            (channels, count),
            elements=st.floats(allow_nan=False, allow_infinity=False, width=32),
        )
    )
    spec = StreamSpec("s", signal_pb2.MODALITY_EEG, tuple(f"ch{i}" for i in range(channels)), ("uV",) * channels, 250.0)
    return SampleBlock(spec, draw(st.floats(-1e9, 1e9)), samples)


@settings(max_examples=200, deadline=None)
@given(finite_blocks())
def test_any_finite_float32_block_of_consistent_shape_passes(block: SampleBlock) -> None:
    validate_chunk(to_chunk(block, "session-a", 0), MAX_CHANNELS)
