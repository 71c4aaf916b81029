"""Recording a session from the raw topic and replaying the file through ingest: every chunk comes back the same,
bit for bit, in-process and through `clisonix record` / `clisonix stream --source recording:FILE`.
"""

from __future__ import annotations

import asyncio
import os
import sys

import pyarrow.parquet as pq
import pytest
from aiokafka import AIOKafkaProducer

from clisonix.signal.v1 import signal_pb2
from services.common.events import decode_event
from services.common.settings import ServiceSettings
from services.ingest.client import StreamClient
from services.ingest.pseudonyms import Pseudonymiser
from services.ingest.sources import open_source
from services.recording import record_session
from tests.conftest import DATA, REPO, TEST_PSEUDONYM_KEY
from tests.helpers import ECG, EEG, make_blocks, read_all, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# What replay must reproduce exactly (session_id too: the recorded pseudonym is sent and ingest keeps it).
FIELDS = (
    "session_id",
    "stream_id",
    "modality",
    "channel_names",
    "channel_units",
    "nominal_rate_hz",
    "sequence",
    "first_sample_time_s",
    "clock_offset_s",
    "sample_format",
    "sample_count",
    "samples",
    "channel_gain",
    "channel_offset",
)


async def chunks_of(bootstrap_servers: str, topic: str, session: str) -> dict[tuple[str, int], signal_pb2.SignalChunk]:
    """The session's chunks on `topic` by (stream_id, sequence), first copy of each."""
    chunks: dict[tuple[str, int], signal_pb2.SignalChunk] = {}
    for record in await read_all(bootstrap_servers, topic):
        if record.key == session.encode():
            chunk, _ = decode_event(signal_pb2.SignalChunk, record.value, record.headers)
            chunks.setdefault((chunk.stream_id, chunk.sequence), chunk)
    return chunks


def assert_same_chunks(
    replayed: dict[tuple[str, int], signal_pb2.SignalChunk], original: dict[tuple[str, int], signal_pb2.SignalChunk]
) -> None:
    assert replayed.keys() == original.keys() and original
    for key, chunk in original.items():
        for name in FIELDS:
            assert getattr(replayed[key], name) == getattr(chunk, name), (key, name)


async def test_recorded_session_replays_through_ingest_bit_for_bit(ingest_service, broker, topic_name, tmp_path):
    first = await ingest_service()
    topic = first.settings.topic_raw
    target = f"127.0.0.1:{first.grpc_port}"
    with open_source(f"wfdb:{DATA / 'wfdb' / 'v102s'}", duration_s=20.0) as source:
        blocks = list(source.blocks())
    # 3 streams of 80 blocks of 0.25 s, one of them split where the record has a missing sample.
    count = len(blocks)
    assert count >= 240 and len({b.spec.stream_id for b in blocks}) == 3
    progress = await StreamClient(target, "session-rec", subject_id="subject-9", speed=None).run(iter(blocks))
    assert progress.chunks_acked == count and progress.rejected == 0
    session = progress.last_session_id
    # Another session on the same topic, which the recording leaves out.
    await StreamClient(target, "session-other", speed=None).run(make_blocks(10, (EEG,)))
    # At-least-once delivery can write a chunk twice: copy one record of the session.
    records = [r for r in await read_all(broker.bootstrap_servers, topic) if r.key == session.encode()]
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers)
    await producer.start()
    try:
        await producer.send_and_wait(topic, records[7].value, key=records[7].key, headers=list(records[7].headers))
    finally:
        await producer.stop()

    out = tmp_path / "v102s.parquet"
    settings = ServiceSettings(service_name="recorder", kafka_bootstrap_servers=broker.bootstrap_servers)
    summary = await asyncio.wait_for(record_session(settings, session, out, topic=topic, idle_seconds=0.5), 60)
    assert (summary.streams, summary.chunks, summary.duplicates) == (3, count, 1)
    assert summary.signal_seconds == pytest.approx(20.0, abs=0.01)
    assert 0 < summary.file_bytes < summary.record_bytes
    assert pq.ParquetFile(out).metadata.num_rows == count

    second = await ingest_service(topic_raw=topic_name("replay"))
    with open_source(f"recording:{out}") as replay:
        # The recorded pseudonym as session id: ingest keeps ids that already are pseudonyms.
        client = StreamClient(f"127.0.0.1:{second.grpc_port}", session, speed=None)
        replayed_progress = await client.run(replay.blocks())
    assert replayed_progress.chunks_acked == count and replayed_progress.rejected == 0

    original = await chunks_of(broker.bootstrap_servers, topic, session)
    replayed = await chunks_of(broker.bootstrap_servers, second.settings.topic_raw, session)
    assert_same_chunks(replayed, original)
    # The subject pseudonym was not recorded, so it is not replayed either.
    assert all(c.subject_id.startswith("ps-") for c in original.values())
    assert not any(c.subject_id for c in replayed.values())


async def clisonix(*args: str, timeout_s: float = 120.0) -> tuple[int, str]:
    """Runs the `clisonix` command with CLISONIX_PSEUDONYM_KEY set to the test key; exit code and output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "CLISONIX_PSEUDONYM_KEY": TEST_PSEUDONYM_KEY},
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    finally:
        if process.returncode is None:  # timed out: leave nothing running behind the test
            process.kill()
            await process.wait()
    return process.returncode, output.decode()


async def test_clisonix_record_then_stream_the_recording(ingest_service, broker, topic_name, tmp_path):
    first = await ingest_service()
    progress = await StreamClient(f"127.0.0.1:{first.grpc_port}", "session-cli", speed=None).run(
        make_blocks(20, (EEG, ECG))
    )
    session = Pseudonymiser(TEST_PSEUDONYM_KEY.encode()).pseudonym("session", "session-cli")
    assert progress.last_session_id == session
    out = tmp_path / "cli.parquet"
    kafka = ["--bootstrap-servers", broker.bootstrap_servers, "--topic", first.settings.topic_raw]

    code, output = await clisonix(
        "record", "--out", str(out), "--session", "session-cli", *kafka, "--idle-seconds", "0.5"
    )
    assert code == 0, output
    assert f"recorded {session}: 2 streams, 40 chunks" in output and "session-cli" not in output

    second = await ingest_service(topic_raw=topic_name("replay"))
    code, output = await clisonix(
        "stream",
        "--source",
        f"recording:{out}",
        "--to",
        f"127.0.0.1:{second.grpc_port}",
        "--speed",
        "0",
        "--session",
        session,
    )
    assert code == 0, output
    original = await chunks_of(broker.bootstrap_servers, first.settings.topic_raw, session)
    replayed = await chunks_of(broker.bootstrap_servers, second.settings.topic_raw, session)
    assert_same_chunks(replayed, original)

    code, output = await clisonix(
        "record",
        "--out",
        str(tmp_path / "none.parquet"),
        "--pseudonym",
        "ps-" + "0" * 32,
        *kafka,
        "--idle-seconds",
        "0.2",
    )
    assert code == 1 and "no chunks of session" in output
    assert not (tmp_path / "none.parquet").exists()


async def test_follow_records_what_arrives_until_stopped(ingest_service, broker, tmp_path):
    service = await ingest_service()
    target = f"127.0.0.1:{service.grpc_port}"
    progress = await StreamClient(target, "session-live", speed=None).run(make_blocks(10, (EEG,)))
    session = progress.last_session_id
    settings = ServiceSettings(service_name="recorder", kafka_bootstrap_servers=broker.bootstrap_servers)
    seen = [0]
    stop = asyncio.Event()
    out = tmp_path / "live.parquet"
    recording = asyncio.create_task(
        record_session(
            settings,
            session,
            out,
            topic=service.settings.topic_raw,
            idle_seconds=0.1,
            follow=True,
            stop=stop,
            on_progress=lambda p: seen.__setitem__(0, p.chunks),
        )
    )
    try:
        await wait_for(lambda: seen[0] == 10)
        # Caught up and idle for longer than idle_seconds, but following: what comes later is recorded too.
        await asyncio.sleep(0.5)
        assert not recording.done()
        await StreamClient(target, "session-live", speed=None).run(make_blocks(10, (ECG,)))
        await wait_for(lambda: seen[0] == 20)
    finally:
        stop.set()
    summary = await asyncio.wait_for(recording, 30)
    assert (summary.streams, summary.chunks) == (2, 20) and pq.ParquetFile(out).metadata.num_rows == 20
