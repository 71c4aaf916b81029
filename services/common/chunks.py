"""Blocks of samples as sources produce them, and their packing into SignalChunk messages.

Pure: no network. Samples travel packed little-endian and channel-major (ARCHITECTURE.md, Events).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from clisonix.signal.v1 import signal_pb2


def modality_name(modality: int) -> str:
    """The short lower-case name of a Modality value ("ecg" for MODALITY_ECG); "unknown" for other numbers,
    so it is safe as a bounded metric label.
    """
    try:
        return signal_pb2.Modality.Name(modality).removeprefix("MODALITY_").lower()  # type: ignore[arg-type]
    except ValueError:
        return "unknown"


@dataclass(frozen=True)
class StreamSpec:
    """What one stream is: its id within the session, modality, channel layout and nominal rate."""

    stream_id: str
    modality: int  # a signal_pb2.Modality value
    channel_names: tuple[str, ...]
    channel_units: tuple[str, ...]
    nominal_rate_hz: float

    @property
    def channel_count(self) -> int:
        return len(self.channel_names)


@dataclass(frozen=True)
class SampleBlock:
    """Consecutive samples of one stream, shape (channels, samples).

    `samples` is float32 in physical units, or int16 digital values with per-channel `gain` and `offset`
    (physical = raw * gain + offset), as EDF and WFDB store them.
    """

    spec: StreamSpec
    first_sample_time_s: float
    samples: np.ndarray
    clock_offset_s: float = 0.0
    gain: tuple[float, ...] = field(default=())
    offset: tuple[float, ...] = field(default=())

    @property
    def sample_count(self) -> int:
        return int(self.samples.shape[1])

    @property
    def duration_s(self) -> float:
        return self.sample_count / self.spec.nominal_rate_hz

    def physical(self) -> np.ndarray:
        """The samples in physical units as float64, shape (channels, samples)."""
        if self.samples.dtype == np.int16:
            gain = np.asarray(self.gain, dtype=np.float64)[:, None]
            offset = np.asarray(self.offset, dtype=np.float64)[:, None]
            return self.samples.astype(np.float64) * gain + offset
        return self.samples.astype(np.float64)


def to_chunk(block: SampleBlock, session_id: str, sequence: int, subject_id: str = "") -> signal_pb2.SignalChunk:
    """Packs a block into a SignalChunk with the given per-stream sequence number."""
    spec = block.spec
    chunk = signal_pb2.SignalChunk(
        session_id=session_id,
        stream_id=spec.stream_id,
        modality=spec.modality,  # type: ignore[arg-type]
        channel_names=list(spec.channel_names),
        channel_units=list(spec.channel_units),
        nominal_rate_hz=spec.nominal_rate_hz,
        sequence=sequence,
        first_sample_time_s=block.first_sample_time_s,
        clock_offset_s=block.clock_offset_s,
        sample_count=block.sample_count,
        subject_id=subject_id,
    )
    if block.samples.dtype == np.int16:
        chunk.sample_format = signal_pb2.SAMPLE_FORMAT_INT16
        chunk.samples = np.ascontiguousarray(block.samples, dtype="<i2").tobytes()
        chunk.channel_gain.extend(block.gain)
        chunk.channel_offset.extend(block.offset)
    else:
        chunk.sample_format = signal_pb2.SAMPLE_FORMAT_FLOAT32
        chunk.samples = np.ascontiguousarray(block.samples, dtype="<f4").tobytes()
    return chunk


def unpack_samples(chunk: signal_pb2.SignalChunk) -> np.ndarray:
    """The raw packed samples of a chunk, shape (channels, sample_count), in their stored dtype.

    Raises ValueError when the byte count does not match channels x sample_count.
    """
    dtype = np.dtype("<i2") if chunk.sample_format == signal_pb2.SAMPLE_FORMAT_INT16 else np.dtype("<f4")
    channels = len(chunk.channel_names)
    expected = channels * chunk.sample_count * dtype.itemsize
    if len(chunk.samples) != expected:
        raise ValueError(
            f"samples hold {len(chunk.samples)} bytes, expected {expected} "
            f"({channels} channels x {chunk.sample_count} samples x {dtype.itemsize} bytes)"
        )
    return np.frombuffer(chunk.samples, dtype=dtype).reshape(channels, chunk.sample_count)


def physical_samples(chunk: signal_pb2.SignalChunk) -> np.ndarray:
    """The samples of a chunk in physical units as float64, shape (channels, sample_count)."""
    raw = unpack_samples(chunk)
    if chunk.sample_format == signal_pb2.SAMPLE_FORMAT_INT16:
        gain = np.asarray(chunk.channel_gain, dtype=np.float64)[:, None]
        offset = np.asarray(chunk.channel_offset, dtype=np.float64)[:, None]
        return raw.astype(np.float64) * gain + offset
    return raw.astype(np.float64)
