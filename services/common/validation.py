"""Checks a SignalChunk: ingest before anything is written, fusion on every record it reads. Pure: raises
domain errors, touches no network.

Every rule names a bounded `reason` for the rejected-chunks metric.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from clisonix.signal.v1 import signal_pb2
from services.common.errors import InvalidArgument, ResourceExhausted

MAX_ID_LENGTH = 128
_FORMATS: dict[int, np.dtype[Any]] = {
    signal_pb2.SAMPLE_FORMAT_FLOAT32: np.dtype("<f4"),
    signal_pb2.SAMPLE_FORMAT_INT16: np.dtype("<i2"),
}


def check_size(chunk: signal_pb2.SignalChunk, max_chunk_bytes: int) -> None:
    """RESOURCE_EXHAUSTED when the chunk's samples exceed the size limit."""
    if len(chunk.samples) > max_chunk_bytes:
        raise ResourceExhausted(
            f"chunk holds {len(chunk.samples)} sample bytes, over the limit of {max_chunk_bytes}",
            reason="chunk_too_large",
        )


def validate_chunk(chunk: signal_pb2.SignalChunk, max_channels: int) -> None:
    """INVALID_ARGUMENT for any inconsistency within one chunk: ids, channel counts, rate, sample bytes, NaN/Inf."""
    for field, value in (("session_id", chunk.session_id), ("stream_id", chunk.stream_id)):
        if not value:
            raise InvalidArgument(f"{field} is empty", reason="missing_id")
        if len(value) > MAX_ID_LENGTH:
            raise InvalidArgument(f"{field} is longer than {MAX_ID_LENGTH} characters", reason="id_too_long")
    channels = len(chunk.channel_names)
    if channels == 0:
        raise InvalidArgument("chunk names no channels", reason="no_channels")
    if channels > max_channels:
        raise InvalidArgument(f"{channels} channels, over the limit of {max_channels}", reason="too_many_channels")
    if chunk.channel_units and len(chunk.channel_units) != channels:
        raise InvalidArgument(
            f"{len(chunk.channel_units)} channel units for {channels} channels",
            reason="channel_count_mismatch",
        )
    if not math.isfinite(chunk.nominal_rate_hz) or chunk.nominal_rate_hz <= 0:
        raise InvalidArgument("nominal_rate_hz must be positive and finite", reason="bad_rate")
    if not (math.isfinite(chunk.first_sample_time_s) and math.isfinite(chunk.clock_offset_s)):
        raise InvalidArgument("timestamps must be finite", reason="bad_timestamp")
    dtype = _FORMATS.get(chunk.sample_format)
    if dtype is None:
        raise InvalidArgument("sample_format must be FLOAT32 or INT16", reason="bad_sample_format")
    if chunk.sample_count == 0:
        raise InvalidArgument("sample_count is 0", reason="empty_chunk")
    expected = channels * chunk.sample_count * dtype.itemsize
    if len(chunk.samples) != expected:
        raise InvalidArgument(
            f"samples hold {len(chunk.samples)} bytes; {channels} channels x {chunk.sample_count} samples "
            f"x {dtype.itemsize} bytes = {expected}",
            reason="sample_size_mismatch",
        )
    if chunk.sample_format == signal_pb2.SAMPLE_FORMAT_INT16:
        if len(chunk.channel_gain) != channels or len(chunk.channel_offset) != channels:
            raise InvalidArgument(
                f"int16 samples need one gain and one offset per channel ({channels}), got "
                f"{len(chunk.channel_gain)} and {len(chunk.channel_offset)}",
                reason="channel_count_mismatch",
            )
        scale = np.asarray([*chunk.channel_gain, *chunk.channel_offset])
        if not np.isfinite(scale).all() or not all(chunk.channel_gain):
            raise InvalidArgument("gains must be finite and non-zero, offsets finite", reason="bad_scaling")
    else:
        if chunk.channel_gain or chunk.channel_offset:
            raise InvalidArgument("float32 samples carry no gain or offset", reason="bad_scaling")
        if not np.isfinite(np.frombuffer(chunk.samples, dtype=dtype)).all():
            raise InvalidArgument("samples contain NaN or Inf", reason="non_finite_samples")


def layout_of(chunk: signal_pb2.SignalChunk) -> str:
    """What may not change within one stream (modality, channels, units, rate, sample format), as one string."""
    # One joined string compares faster than tuples of every channel name, on every chunk.
    return "\x1f".join(
        (str(chunk.modality), repr(chunk.nominal_rate_hz), str(chunk.sample_format), str(len(chunk.channel_names)),
         *chunk.channel_names, *chunk.channel_units)
    )  # fmt: skip
