"""Session recordings: one session's chunks from clisonix.signals.raw.v1 in an Apache Parquet file (zstd), one
row per SignalChunk, the packed sample bytes stored as they came, so a replay sends them back bit for bit.

The file half (chunk <-> row conversion, writing, reading, chunk -> SampleBlock) is pure and needs no broker;
`record_session` is the Kafka half behind `clisonix record`. Rows are sorted by (stream_id, sequence); the
kafka_partition and kafka_offset columns keep the arrival order. subject_id is never written: one person's
recordings must not be linkable by a column, and replay does not need it (the session pseudonym is in the file
metadata).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from clisonix.signal.v1 import signal_pb2
from services.common.chunks import SampleBlock, StreamSpec, modality_name, unpack_samples
from services.common.events import UndecodableEvent, decode_event

if TYPE_CHECKING:
    from services.common.settings import ServiceSettings

log = logging.getLogger(__name__)

FORMAT_NAME = "clisonix.recording"
FORMAT_VERSION = "1"
RAW_TOPIC = "clisonix.signals.raw.v1"
# Row groups hold about this many bytes of samples, so pyarrow's 2 GiB binary arrays are never reached and
# readers can work through a long session a row group at a time.
ROW_GROUP_BYTES = 64 * 1024 * 1024
# Level 9: 5% smaller than zstd's default 3 on MIT-BIH record 100, at a few milliseconds per MB written.
ZSTD_LEVEL = 9

SCHEMA = pa.schema(
    [
        pa.field("stream_id", pa.string(), nullable=False),
        pa.field("modality", pa.int32(), nullable=False),
        pa.field("modality_name", pa.string(), nullable=False),
        pa.field("channel_names", pa.list_(pa.string()), nullable=False),
        pa.field("channel_units", pa.list_(pa.string()), nullable=False),
        pa.field("nominal_rate_hz", pa.float64(), nullable=False),
        pa.field("sequence", pa.uint64(), nullable=False),
        pa.field("first_sample_time_s", pa.float64(), nullable=False),
        pa.field("clock_offset_s", pa.float64(), nullable=False),
        pa.field("sample_format", pa.string(), nullable=False),
        pa.field("sample_count", pa.uint32(), nullable=False),
        pa.field("samples", pa.binary(), nullable=False),
        pa.field("channel_gain", pa.list_(pa.float64()), nullable=False),
        pa.field("channel_offset", pa.list_(pa.float64()), nullable=False),
        pa.field("ingest_time", pa.timestamp("ns", tz="UTC")),
        pa.field("kafka_partition", pa.int32(), nullable=False),
        pa.field("kafka_offset", pa.int64(), nullable=False),
    ]
)
# Columns whose values repeat from row to row; the samples (and times) would only fill a dictionary page.
_DICTIONARY_COLUMNS = [
    "stream_id",
    "modality",
    "modality_name",
    "channel_names.list.element",
    "channel_units.list.element",
    "nominal_rate_hz",
    "sample_format",
    "sample_count",
    "channel_gain.list.element",
    "channel_offset.list.element",
    "kafka_partition",
]


class RecordedChunk(NamedTuple):
    """A chunk as read from the raw topic, and where it was."""

    chunk: signal_pb2.SignalChunk
    partition: int
    offset: int


@dataclass(frozen=True)
class Recording:
    """A recording file read back: its session pseudonym, the topic it came from, and its chunks in file order
    (session_id set from the file metadata, subject_id empty).
    """

    session: str
    topic: str
    chunks: list[RecordedChunk]


def sample_format_name(sample_format: int) -> str:
    """The name of a SampleFormat value: "float32" or "int16"."""
    return signal_pb2.SampleFormat.Name(sample_format).removeprefix("SAMPLE_FORMAT_").lower()  # type: ignore[arg-type]


def sample_format_value(name: str) -> int:
    """The SampleFormat value of "float32" or "int16"; ValueError for other names."""
    value = signal_pb2.SampleFormat.Value("SAMPLE_FORMAT_" + name.upper())
    if value == signal_pb2.SAMPLE_FORMAT_UNSPECIFIED:
        raise ValueError(f"unknown sample format {name!r}")
    return int(value)


def table_of(recorded: Sequence[RecordedChunk], session: str, topic: str = RAW_TOPIC) -> pa.Table:
    """The Parquet table of `recorded`, in the given order, with the file metadata (format, session, topic).

    Session and subject ids of the chunks are not stored: the session is file metadata, the subject is left out.
    """
    chunks = [r.chunk for r in recorded]
    columns: dict[str, list[Any]] = {
        "stream_id": [c.stream_id for c in chunks],
        "modality": [int(c.modality) for c in chunks],
        "modality_name": [modality_name(c.modality) for c in chunks],
        "channel_names": [list(c.channel_names) for c in chunks],
        "channel_units": [list(c.channel_units) for c in chunks],
        "nominal_rate_hz": [c.nominal_rate_hz for c in chunks],
        "sequence": [c.sequence for c in chunks],
        "first_sample_time_s": [c.first_sample_time_s for c in chunks],
        "clock_offset_s": [c.clock_offset_s for c in chunks],
        "sample_format": [sample_format_name(c.sample_format) for c in chunks],
        "sample_count": [c.sample_count for c in chunks],
        "samples": [c.samples for c in chunks],
        "channel_gain": [list(c.channel_gain) for c in chunks],
        "channel_offset": [list(c.channel_offset) for c in chunks],
        "ingest_time": [c.ingest_time.ToNanoseconds() if c.HasField("ingest_time") else None for c in chunks],
        "kafka_partition": [r.partition for r in recorded],
        "kafka_offset": [r.offset for r in recorded],
    }
    metadata = {
        "clisonix.format": FORMAT_NAME,
        "clisonix.format_version": FORMAT_VERSION,
        "clisonix.message_type": signal_pb2.SignalChunk.DESCRIPTOR.full_name,
        "clisonix.session": session,
        "clisonix.topic": topic,
    }
    return pa.table(columns, schema=SCHEMA.with_metadata(metadata))


def _row_groups(recorded: Sequence[RecordedChunk], max_bytes: int) -> Iterable[Sequence[RecordedChunk]]:
    """Consecutive slices of `recorded` holding about `max_bytes` of samples each (at least one chunk)."""
    start, size = 0, 0
    for i, item in enumerate(recorded):
        if i > start and size + len(item.chunk.samples) > max_bytes:
            yield recorded[start:i]
            start, size = i, 0
        size += len(item.chunk.samples)
    if start < len(recorded) or not recorded:
        yield recorded[start:]


def write_recording(
    path: str | Path,
    recorded: Sequence[RecordedChunk],
    session: str,
    topic: str = RAW_TOPIC,
    row_group_bytes: int = ROW_GROUP_BYTES,
) -> int:
    """Writes `recorded` (in the given order) to a zstd-compressed Parquet file; returns the file's size in bytes.

    The file appears complete or not at all: it is written beside `path` and renamed into place.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        writer: pq.ParquetWriter | None = None
        for group in _row_groups(recorded, row_group_bytes):
            table = table_of(group, session, topic)
            if writer is None:
                writer = pq.ParquetWriter(
                    partial,
                    table.schema,
                    compression="zstd",
                    compression_level=ZSTD_LEVEL,
                    use_dictionary=_DICTIONARY_COLUMNS,
                )
            writer.write_table(table, row_group_size=max(len(group), 1))
        assert writer is not None  # _row_groups yields at least once
        writer.close()
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path.stat().st_size


def read_recording(path: str | Path) -> Recording:
    """Reads a recording file; raises ValueError when it is not a recording of a format version this reads."""
    table = pq.read_table(path)
    metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if metadata.get("clisonix.format") != FORMAT_NAME:
        raise ValueError(f"{path}: not a Clisonix recording (no {FORMAT_NAME!r} format in its metadata)")
    if metadata.get("clisonix.format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: recording format version {metadata.get('clisonix.format_version')!r}, "
            f"this version reads {FORMAT_VERSION!r}"
        )
    missing = [name for name in SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(f"{path}: recording lacks the columns {', '.join(missing)}")
    session = metadata.get("clisonix.session", "")
    # Timestamps as integer nanoseconds: converting them to Python datetimes would drop the nanoseconds.
    ingest_ns = table.column("ingest_time").cast(pa.int64()).to_pylist()
    columns = {name: table.column(name).to_pylist() for name in SCHEMA.names if name != "ingest_time"}
    chunks = []
    for i in range(table.num_rows):
        chunk = signal_pb2.SignalChunk(
            session_id=session,
            stream_id=columns["stream_id"][i],
            modality=columns["modality"][i],
            channel_names=columns["channel_names"][i],
            channel_units=columns["channel_units"][i],
            nominal_rate_hz=columns["nominal_rate_hz"][i],
            sequence=columns["sequence"][i],
            first_sample_time_s=columns["first_sample_time_s"][i],
            clock_offset_s=columns["clock_offset_s"][i],
            sample_format=sample_format_value(columns["sample_format"][i]),  # type: ignore[arg-type]
            samples=columns["samples"][i],
            sample_count=columns["sample_count"][i],
            channel_gain=columns["channel_gain"][i],
            channel_offset=columns["channel_offset"][i],
        )
        if ingest_ns[i] is not None:
            chunk.ingest_time.FromNanoseconds(ingest_ns[i])
        chunks.append(RecordedChunk(chunk, columns["kafka_partition"][i], columns["kafka_offset"][i]))
    return Recording(session=session, topic=metadata.get("clisonix.topic", ""), chunks=chunks)


def spec_of(chunk: signal_pb2.SignalChunk) -> StreamSpec:
    """The StreamSpec a chunk belongs to."""
    return StreamSpec(
        stream_id=chunk.stream_id,
        modality=int(chunk.modality),
        channel_names=tuple(chunk.channel_names),
        channel_units=tuple(chunk.channel_units),
        nominal_rate_hz=chunk.nominal_rate_hz,
    )


def block_of(chunk: signal_pb2.SignalChunk, spec: StreamSpec | None = None) -> SampleBlock:
    """The SampleBlock that `to_chunk` packs back into `chunk`'s fields and sample bytes, exactly.

    spec: the chunk's stream, when the caller already has it (saves building one per chunk).
    """
    samples = unpack_samples(chunk)  # the stored bytes, viewed; int16 or float32 as recorded
    if chunk.sample_format == signal_pb2.SAMPLE_FORMAT_INT16:
        gain, offset = tuple(chunk.channel_gain), tuple(chunk.channel_offset)
    else:
        gain, offset = (), ()
    return SampleBlock(
        spec=spec or spec_of(chunk),
        first_sample_time_s=chunk.first_sample_time_s,
        samples=samples,
        clock_offset_s=chunk.clock_offset_s,
        gain=gain,
        offset=offset,
    )


@dataclass
class RecordingProgress:
    """What a recording run has read so far."""

    chunks: int = 0
    duplicates: int = 0
    undecodable: int = 0
    record_bytes: int = 0  # serialised SignalChunk bytes of the kept chunks, as they sit on the topic
    seconds_by_stream: dict[str, float] = field(default_factory=dict)

    @property
    def signal_seconds(self) -> float:
        """Seconds of signal of the longest stream."""
        return max(self.seconds_by_stream.values(), default=0.0)


class SessionChunks:
    """One session's chunks as they are read, de-duplicated by (stream_id, sequence): the first copy is kept
    (at-least-once delivery may write a chunk twice).
    """

    def __init__(self) -> None:
        self._chunks: dict[tuple[str, int], RecordedChunk] = {}
        self.progress = RecordingProgress()

    def __len__(self) -> int:
        return len(self._chunks)

    def add(self, chunk: signal_pb2.SignalChunk, partition: int, offset: int, record_bytes: int = 0) -> bool:
        """Keeps `chunk` (its subject_id cleared) unless its stream and sequence were seen before; True when kept."""
        key = (chunk.stream_id, chunk.sequence)
        progress = self.progress
        if key in self._chunks:
            progress.duplicates += 1
            return False
        chunk.ClearField("subject_id")  # never written; no need to hold it
        self._chunks[key] = RecordedChunk(chunk, partition, offset)
        progress.chunks += 1
        progress.record_bytes += record_bytes
        if chunk.nominal_rate_hz > 0:
            seconds = progress.seconds_by_stream.get(chunk.stream_id, 0.0)
            progress.seconds_by_stream[chunk.stream_id] = seconds + chunk.sample_count / chunk.nominal_rate_hz
        return True

    def ordered(self) -> list[RecordedChunk]:
        """The kept chunks sorted by (stream_id, sequence)."""
        return [self._chunks[key] for key in sorted(self._chunks)]


@dataclass(frozen=True)
class RecordingSummary:
    """What `record_session` wrote."""

    path: Path
    session: str
    streams: int
    chunks: int
    duplicates: int
    undecodable: int
    signal_seconds: float
    file_bytes: int
    record_bytes: int

    @property
    def compression_ratio(self) -> float:
        """Bytes of the session's records on the topic (uncompressed protobuf) per byte of file."""
        return self.record_bytes / self.file_bytes if self.file_bytes else 0.0


async def record_session(
    settings: ServiceSettings,
    session: str,
    out: str | Path,
    topic: str = RAW_TOPIC,
    idle_seconds: float = 2.0,
    follow: bool = False,
    stop: asyncio.Event | None = None,
    on_progress: Callable[[RecordingProgress], None] | None = None,
) -> RecordingSummary:
    """Reads every chunk of one session from `topic` and writes them to the recording file `out`.

    session: the session's pseudonym (the records' key). Every partition is read from its beginning, outside
    any consumer group (nothing is committed). Without `follow`, reading ends once every partition's position
    reached its fetch highwater and no chunk of the session came for `idle_seconds`; with it, reading goes on
    until `stop` is set. Setting `stop` earlier ends reading too; what was read is written. Raises LookupError
    when the topic does not exist or no chunk of the session was read (no file is written then).
    """
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    from services.common.kafka import consumer_options

    stop = stop or asyncio.Event()
    key = session.encode()
    chunks = SessionChunks()
    consumer = AIOKafkaConsumer(**consumer_options(settings, group_id=None))
    await consumer.start()
    try:
        if topic not in await consumer.topics():
            raise LookupError(f"topic {topic!r} does not exist on {settings.kafka_bootstrap_servers}")
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        last_news = time.monotonic()
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    if record.key != key:
                        continue
                    last_news = time.monotonic()
                    try:
                        chunk, _ = decode_event(signal_pb2.SignalChunk, record.value, record.headers)
                    except UndecodableEvent as exc:
                        chunks.progress.undecodable += 1
                        log.warning("record skipped", extra={"fields": {"reason": exc.reason, "offset": record.offset}})
                        continue
                    chunks.add(chunk, record.partition, record.offset, len(record.value or b""))
            if on_progress is not None:
                on_progress(chunks.progress)
            if follow or time.monotonic() - last_news < idle_seconds:
                continue
            # The fetch highwater, not end_offsets(): the embedded broker's ListOffsets answer is wrong after
            # multi-record batches.
            highwaters = [consumer.highwater(tp) for tp in partitions]
            positions = [await consumer.position(tp) for tp in partitions]
            if all(hw is not None and pos >= hw for hw, pos in zip(highwaters, positions, strict=True)):
                break
    finally:
        await consumer.stop()
    if not chunks:
        raise LookupError(f"no chunks of session {session} on {topic}")
    path = Path(out)
    ordered = chunks.ordered()
    file_bytes = await asyncio.to_thread(write_recording, path, ordered, session, topic)
    progress = chunks.progress
    return RecordingSummary(
        path=path,
        session=session,
        streams=len(progress.seconds_by_stream),
        chunks=progress.chunks,
        duplicates=progress.duplicates,
        undecodable=progress.undecodable,
        signal_seconds=progress.signal_seconds,
        file_bytes=file_bytes,
        record_bytes=progress.record_bytes,
    )


def stream_chunks(recording: Recording) -> list[list[signal_pb2.SignalChunk]]:
    """Each stream's chunks in sequence order; streams in the order their first chunk was written to Kafka."""
    streams: dict[str, list[RecordedChunk]] = {}
    for item in recording.chunks:
        streams.setdefault(item.chunk.stream_id, []).append(item)
    first_written = {sid: min((r.partition, r.offset) for r in items) for sid, items in streams.items()}
    return [
        [r.chunk for r in sorted(streams[sid], key=lambda r: r.chunk.sequence)]
        for sid in sorted(streams, key=lambda s: first_written[s])
    ]
