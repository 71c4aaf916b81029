"""Session recordings without a broker: chunks -> Parquet rows -> file -> RecordingSource blocks -> the same chunks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clisonix.signal.v1 import signal_pb2
from services.common.chunks import SampleBlock, StreamSpec, to_chunk
from services.ingest.sources import SOURCE_KINDS, RecordingSource, open_source
from services.recording import (
    FORMAT_NAME,
    RecordedChunk,
    SessionChunks,
    read_recording,
    write_recording,
)
from tests.helpers import ECG, EEG, make_chunk

REPO = Path(__file__).resolve().parents[2]
SESSION = "ps-" + "0123456789abcdef" * 2
WFDB_LIKE = StreamSpec("v102s-ecg", signal_pb2.MODALITY_ECG, ("II", "V"), ("mV", "mV"), 250.0)


def int16_chunk(sequence: int, samples: int = 40) -> signal_pb2.SignalChunk:
    """An int16 chunk with per-channel gain and offset, as WFDB and EDF replays send them."""
    raw = np.random.default_rng(sequence).integers(-32768, 32768, (2, samples), dtype=np.int16)
    block = SampleBlock(WFDB_LIKE, 3.5 + sequence * samples / 250.0, raw, -0.125, (1 / 2281, 1 / 1856), (0.004, -0.18))
    return to_chunk(block, SESSION, sequence, "ps-" + "f" * 32)


def ingested(chunk: signal_pb2.SignalChunk, ns: int) -> signal_pb2.SignalChunk:
    """`chunk` as ingest writes it: session and subject pseudonymised, ingest time set."""
    chunk.session_id = SESSION
    chunk.subject_id = "ps-" + "e" * 32
    chunk.ingest_time.FromNanoseconds(ns)
    return chunk


def mixed_session() -> list[RecordedChunk]:
    """float32 EEG, float32 ECG and int16 chunks of one session, interleaved as Kafka would hold them."""
    chunks = []
    for sequence in range(6):
        for made in (make_chunk(sequence, EEG), make_chunk(sequence, ECG), int16_chunk(sequence)):
            chunks.append(ingested(made, 1_700_000_000_123_456_789 + len(chunks)))
    return [RecordedChunk(chunk, 2, offset) for offset, chunk in enumerate(chunks)]


def recorded_file(tmp_path: Path, recorded: list[RecordedChunk]) -> Path:
    session = SessionChunks()
    for item in recorded:
        session.add(item.chunk, item.partition, item.offset)
    path = tmp_path / "session.parquet"
    write_recording(path, session.ordered(), SESSION, "clisonix.signals.raw.v1")
    return path


def test_chunks_survive_the_file_and_the_replay_bit_for_bit(tmp_path: Path) -> None:
    recorded = mixed_session()
    path = recorded_file(tmp_path, recorded)

    with open_source(f"recording:{path}") as source:
        assert isinstance(source, RecordingSource)
        assert source.session == SESSION
        assert {s.stream_id for s in source.specs()} == {EEG.stream_id, ECG.stream_id, WFDB_LIKE.stream_id}
        blocks = list(source.blocks())
    assert len(blocks) == len(recorded)
    # Time order across streams; each stream in its recorded order, so sequences re-count from 0.
    times = [b.first_sample_time_s for b in blocks]
    assert times == sorted(times)
    sequences: dict[str, int] = {}
    originals = {(r.chunk.stream_id, r.chunk.sequence): r.chunk for r in recorded}
    for block in blocks:
        sequence = sequences.setdefault(block.spec.stream_id, 0)
        sequences[block.spec.stream_id] += 1
        replayed = to_chunk(block, SESSION, sequence)
        original = signal_pb2.SignalChunk()
        original.CopyFrom(originals[(block.spec.stream_id, sequence)])
        original.ClearField("subject_id")
        original.ClearField("ingest_time")
        assert replayed.SerializeToString() == original.SerializeToString()
        assert replayed.sample_format == original.sample_format


def test_file_reads_back_every_field_and_where_each_chunk_was(tmp_path: Path) -> None:
    recorded = mixed_session()
    path = recorded_file(tmp_path, recorded)
    back = read_recording(path)
    assert back.session == SESSION and back.topic == "clisonix.signals.raw.v1"
    # Sorted by (stream_id, sequence); partition and offset say where each was on Kafka.
    keys = [(r.chunk.stream_id, r.chunk.sequence) for r in back.chunks]
    assert keys == sorted(keys)
    by_key = {(r.chunk.stream_id, r.chunk.sequence): r for r in recorded}
    for item in back.chunks:
        original = by_key[(item.chunk.stream_id, item.chunk.sequence)]
        assert (item.partition, item.offset) == (original.partition, original.offset)
        expected = signal_pb2.SignalChunk()
        expected.CopyFrom(original.chunk)
        expected.ClearField("subject_id")
        assert item.chunk == expected  # ingest_time to the nanosecond
    int16 = [r.chunk for r in back.chunks if r.chunk.sample_format == signal_pb2.SAMPLE_FORMAT_INT16]
    assert int16 and list(int16[0].channel_gain) == [1 / 2281, 1 / 1856]


def test_duplicates_are_dropped_keeping_the_first_copy(tmp_path: Path) -> None:
    recorded = mixed_session()
    again = [RecordedChunk(r.chunk, r.partition, 1000 + i) for i, r in enumerate(recorded[:4])]
    session = SessionChunks()
    kept = [session.add(r.chunk, r.partition, r.offset) for r in recorded + again]
    assert kept == [True] * len(recorded) + [False] * len(again)
    assert session.progress.chunks == len(recorded) and session.progress.duplicates == len(again)
    path = tmp_path / "session.parquet"
    write_recording(path, session.ordered(), SESSION)
    offsets = [r.offset for r in read_recording(path).chunks]
    assert len(offsets) == len(recorded) and max(offsets) < 1000


def test_seconds_of_signal_are_the_longest_streams(tmp_path: Path) -> None:
    session = SessionChunks()
    for item in mixed_session():
        session.add(item.chunk, item.partition, item.offset)
    # 6 chunks of 50 samples at 250 Hz (EEG), at 500 Hz (ECG) and of 40 samples at 250 Hz (int16).
    assert session.progress.seconds_by_stream[EEG.stream_id] == pytest.approx(1.2)
    assert session.progress.signal_seconds == pytest.approx(1.2)


def test_file_is_zstd_compressed_parquet_with_the_session_in_its_metadata(tmp_path: Path) -> None:
    path = recorded_file(tmp_path, mixed_session())
    parquet = pq.ParquetFile(path)
    metadata = parquet.metadata
    assert metadata.metadata[b"clisonix.format"] == FORMAT_NAME.encode()
    assert metadata.metadata[b"clisonix.session"] == SESSION.encode()
    for group in range(metadata.num_row_groups):
        for column in range(metadata.num_columns):
            assert metadata.row_group(group).column(column).compression == "ZSTD"
    assert parquet.schema_arrow.field("samples").type == pa.binary()
    assert parquet.schema_arrow.field("ingest_time").type == pa.timestamp("ns", tz="UTC")


def test_subject_id_is_never_stored(tmp_path: Path) -> None:
    recorded = mixed_session()
    assert all(r.chunk.subject_id for r in recorded)
    path = tmp_path / "session.parquet"
    write_recording(path, recorded, SESSION)
    table = pq.read_table(path)
    assert not any("subject" in name for name in table.column_names)
    assert "ps-" + "e" * 32 not in str(table.to_pylist()) + str(table.schema.metadata)
    assert all(not r.chunk.subject_id for r in read_recording(path).chunks)


def test_row_groups_split_by_sample_bytes(tmp_path: Path) -> None:
    recorded = mixed_session()
    path = tmp_path / "small-groups.parquet"
    write_recording(path, recorded, SESSION, row_group_bytes=1000)
    assert pq.ParquetFile(path).metadata.num_row_groups > 1
    assert [r.offset for r in read_recording(path).chunks] == [r.offset for r in recorded]


def test_duration_keeps_whole_chunks_per_stream(tmp_path: Path) -> None:
    path = recorded_file(tmp_path, mixed_session())
    with RecordingSource(path, duration_s=0.3) as source:
        counts: dict[str, int] = {}
        for block in source.blocks():
            counts[block.spec.stream_id] = counts.get(block.spec.stream_id, 0) + 1
    # 0.2 s per EEG chunk, 0.1 s per ECG chunk, 0.16 s per int16 chunk: the chunk that crosses 0.3 s is kept.
    assert counts == {EEG.stream_id: 2, ECG.stream_id: 3, WFDB_LIKE.stream_id: 2}


def test_not_a_recording_and_block_seconds_are_errors(tmp_path: Path) -> None:
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [1]}), other)
    with pytest.raises(ValueError, match="not a Clisonix recording"):
        open_source(f"recording:{other}")
    path = recorded_file(tmp_path, mixed_session())
    with pytest.raises(ValueError, match="block_seconds does not apply"):
        open_source(f"recording:{path}", block_seconds=0.5)
    with pytest.raises(ValueError, match="needs a path"):
        open_source("recording")
    assert "recording" in SOURCE_KINDS


def test_record_help_and_stream_help_name_recordings() -> None:
    def clisonix(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=120
        )

    record = clisonix("record", "--help")
    assert record.returncode == 0, record.stderr
    assert "usage: clisonix record" in record.stdout and "--follow" in record.stdout
    assert "recording:FILE" in clisonix("stream", "--help").stdout
    missing = clisonix("record", "--out", "x.parquet")
    assert missing.returncode == 2 and "--session" in missing.stderr
    not_pseudonym = clisonix("record", "--out", "x.parquet", "--pseudonym", "session-1")
    assert not_pseudonym.returncode == 2 and "not a pseudonym" in not_pseudonym.stderr
