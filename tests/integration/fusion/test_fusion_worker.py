"""The fusion worker on a real broker: bad records dead-lettered, and a worker killed with SIGKILL mid-stream
while another in its group takes over: every window is produced, and the only duplicates are identical ones."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import defaultdict

import pytest
from aiokafka import AIOKafkaProducer

from clisonix.fusion.v1 import fusion_pb2
from clisonix.signal.v1 import signal_pb2
from services.common.broker import free_port
from services.common.chunks import to_chunk
from services.common.events import decode_event
from services.common.kafka import ensure_topics, kafka_producer
from services.common.settings import ServiceSettings
from services.fusion.handlers import window_config
from services.fusion.settings import FusionSettings
from services.fusion.streams import RawChunk
from services.fusion.windows import SessionWindows
from services.ingest.sources import SyntheticSource
from services.processes import ServiceProcess
from tests.helpers import read_all

pytestmark = pytest.mark.integration


def session_chunks(session: str, seconds: float, start_s: float) -> list[signal_pb2.SignalChunk]:
    """A synthetic ECG + PPG session as ingest would have written it (sequence numbers from 0 per stream)."""
    source = SyntheticSource(modalities=("ecg", "ppg"), duration_s=seconds, start_time_s=start_s, seed=len(session))
    sequences: dict[str, int] = defaultdict(int)
    chunks = []
    for block in source.blocks():
        chunks.append(to_chunk(block, session, sequences[block.spec.stream_id]))
        sequences[block.spec.stream_id] += 1
    return chunks


def reference_windows(records, settings: FusionSettings) -> dict[str, bytes]:
    """What one worker reading the whole raw log without interruption produces: window id -> value bytes."""
    sessions: dict[str, SessionWindows] = {}
    windows: dict[str, bytes] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        chunk, _ = decode_event(signal_pb2.SignalChunk, record.value, record.headers)
        session = sessions.setdefault(chunk.session_id, SessionWindows(chunk.session_id, window_config(settings)))
        session.add(RawChunk(chunk, record.partition, record.offset))
        windows.update((e.window.window_id, e.window.SerializeToString()) for e in session.take_ready())
    for session in sessions.values():
        windows.update((e.window.window_id, e.window.SerializeToString()) for e in session.take_ready(flushing=True))
    return windows


async def test_bad_records_are_dead_lettered_and_the_rest_fused(broker, fusion_service) -> None:
    fusion = await fusion_service()
    settings = fusion.settings
    chunks = session_chunks("ps-dead", 8.0, 50.0)
    broken = signal_pb2.SignalChunk()
    broken.CopyFrom(chunks[3])
    broken.samples = broken.samples[:-4]  # one sample short
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers)
    await producer.start()
    try:
        await producer.send_and_wait(settings.topic_raw, b"not a chunk", key=b"ps-dead")  # no CloudEvents headers
    finally:
        await producer.stop()
    async with kafka_producer(ServiceSettings(kafka_bootstrap_servers=broker.bootstrap_servers)) as events:
        for chunk in [*chunks[:3], broken, *chunks[3:]]:
            await events.send_and_wait(settings.topic_raw, chunk.session_id, chunk)

    dead = await _wait_records(broker.bootstrap_servers, settings.topic_deadletter, 2)
    reasons = sorted(dict(r.headers)["deadletter_reason"].decode() for r in dead)
    assert reasons == ["missing_header", "sample_size_mismatch"]
    fused = await _wait_records(broker.bootstrap_servers, settings.topic_fused, 5)
    window = fusion_pb2.FusedWindow()
    window.ParseFromString(fused[0].value)
    assert window.session_id == "ps-dead" and {s.modality for s in window.streams} == {
        signal_pb2.MODALITY_ECG,
        signal_pb2.MODALITY_PPG,
    }
    assert dict(fused[0].headers)["ce_id"].decode() == window.window_id
    registry = fusion.runtime.metrics.registry
    assert registry.get_sample_value("clisonix_deadlettered_total", {"service": "fusion", "reason": "missing_header"})


async def _wait_records(bootstrap: str, topic: str, count: int, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while True:
        records = await read_all(bootstrap, topic)
        if len(records) >= count:
            return records
        assert time.monotonic() < deadline, f"{topic}: {len(records)} of {count} records"
        await asyncio.sleep(0.2)


def _worker(settings: FusionSettings, log_path) -> ServiceProcess:
    env = {
        "CLISONIX_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "CLISONIX_TOPIC_RAW": settings.topic_raw,
        "CLISONIX_TOPIC_FUSED": settings.topic_fused,
        "CLISONIX_TOPIC_DEADLETTER": settings.topic_deadletter,
        "CLISONIX_CONSUMER_GROUP": settings.consumer_group,
        "CLISONIX_IDLE_FLUSH_SECONDS": str(settings.idle_flush_seconds),
        "CLISONIX_COMMIT_INTERVAL_SECONDS": str(settings.commit_interval_seconds),
        "CLISONIX_KAFKA_SESSION_TIMEOUT_MS": str(settings.kafka_session_timeout_ms),
        "CLISONIX_GRPC_HOST": "127.0.0.1",
        "CLISONIX_METRICS_HOST": "127.0.0.1",
        "CLISONIX_LOG_FORMAT": "text",
        "CLISONIX_ENERGY_SOURCE": "estimate",
    }
    return ServiceProcess("fusion", free_port(), free_port(), env, log_path).start()


@pytest.mark.slow
async def test_kill_9_one_of_two_workers_every_window_produced_duplicates_identical(
    broker, fusion_settings, tmp_path
) -> None:
    settings = fusion_settings(idle_flush_seconds=3.0, commit_interval_seconds=0.5)
    await ensure_topics(settings, [settings.topic_raw, settings.topic_fused, settings.topic_deadletter], partitions=4)
    workers = [_worker(settings, tmp_path / f"fusion-{i}.log") for i in range(2)]
    try:
        sessions = [f"ps-failover-{i}" for i in range(8)]
        chunks = [c for i, s in enumerate(sessions) for c in session_chunks(s, 90.0, 1000.0 + 0.37 * i)]
        chunks.sort(key=lambda c: c.first_sample_time_s)
        speed = 4.0
        killed = False
        async with kafka_producer(ServiceSettings(kafka_bootstrap_servers=broker.bootstrap_servers)) as events:
            started = time.monotonic()
            first_time = chunks[0].first_sample_time_s
            for chunk in chunks:
                due = started + (chunk.first_sample_time_s - first_time) / speed
                if (delay := due - time.monotonic()) > 0:
                    await asyncio.sleep(delay)
                await events.send(settings.topic_raw, chunk.session_id, chunk)
                if not killed and time.monotonic() - started > 9.0:
                    fused_so_far = await read_all(broker.bootstrap_servers, settings.topic_fused)
                    assert fused_so_far, "both workers were running and producing before the kill"
                    os.kill(workers[0].process.pid, signal.SIGKILL)  # type: ignore[union-attr]
                    killed = True
            await events.producer.flush()
        assert killed

        raw = await read_all(broker.bootstrap_servers, settings.topic_raw)
        expected = reference_windows(raw, settings)
        assert len(expected) > 8 * 80

        async def produced() -> dict[str, list[bytes]]:
            by_id: dict[str, list[bytes]] = defaultdict(list)
            for record in await read_all(broker.bootstrap_servers, settings.topic_fused):
                window = fusion_pb2.FusedWindow()
                window.ParseFromString(record.value)
                by_id[window.window_id].append(record.value)
            return by_id

        deadline = time.monotonic() + 90
        while True:
            by_id = await produced()
            missing = set(expected) - set(by_id)
            if not missing or time.monotonic() > deadline:
                break
            await asyncio.sleep(1.0)
        assert not missing, f"{len(missing)} of {len(expected)} windows never produced"
        duplicates = {wid: values for wid, values in by_id.items() if len(values) > 1}
        for wid, values in by_id.items():
            assert wid in expected, "a window no uninterrupted worker would produce"
            assert all(v == expected[wid] for v in values), "a window produced with content other than the reference"
        assert workers[1].running
        # The survivor re-read the dead worker's partitions from their committed offsets: some windows twice.
        assert duplicates, "the takeover re-produced nothing: the test did not exercise a failover"
    finally:
        for worker in workers:
            worker.stop()
