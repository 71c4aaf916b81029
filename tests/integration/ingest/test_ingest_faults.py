"""Faults for real: the broker stopping mid-stream, and the ingest process killed with SIGKILL mid-stream."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest

from clisonix.signal.v1 import signal_pb2
from services.common.broker import EmbeddedBroker, free_port
from services.common.chunks import unpack_samples
from services.common.events import decode_event
from services.ingest.client import StreamClient
from services.processes import ServiceProcess
from tests.conftest import TEST_PSEUDONYM_KEY
from tests.helpers import ECG, EEG, block_samples, make_blocks, read_all, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class RecordingClient(StreamClient):
    """A StreamClient that remembers every ack it got and when."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.acks: list[tuple[float, signal_pb2.IngestAck]] = []

    def _on_ack(self, ack: signal_pb2.IngestAck) -> None:
        self.acks.append((time.monotonic(), ack))
        super()._on_ack(ack)


async def test_no_ack_without_a_durable_write_and_resume_after_the_broker_returns(ingest_settings, tmp_path):
    """The broker is stopped (SIGSTOP: alive but answering nothing, as a hung or partitioned broker) mid-stream.

    A stopped-and-restarted embedded broker would come back empty (memory only), so freezing it is what lets
    the test check every ack, before and after the outage, against what the broker really holds.
    """
    broker = EmbeddedBroker(port=0, log_path=tmp_path / "broker.log").start()
    try:
        from services.ingest.service import IngestService

        settings = ingest_settings(kafka_bootstrap_servers=broker.bootstrap_servers, kafka_request_timeout_ms=2000)
        service = IngestService(settings)
        await service.start()
        total = 150
        client = RecordingClient(
            f"127.0.0.1:{service.grpc_port}",
            "session-outage",
            speed=25.0,
            reconnect_delay_s=0.2,
            max_reconnect_delay_s=0.5,
        )
        run = asyncio.create_task(client.run(make_blocks(total)))

        await wait_for(lambda: len(client.acks) >= 20, timeout_s=30)
        broker.process.send_signal(signal.SIGSTOP)
        try:
            # Ingest ends the call with UNAVAILABLE once Kafka cannot take the writes; the client reconnects.
            await wait_for(lambda: client.progress.reconnects >= 1, timeout_s=30)
            acks_at_outage = len(client.acks)
            await wait_for(lambda: client.progress.reconnects >= 3, timeout_s=30)
            assert len(client.acks) == acks_at_outage, "an ack arrived while the broker was stopped"
        finally:
            broker.process.send_signal(signal.SIGCONT)
        progress = await asyncio.wait_for(run, timeout=120)
        assert progress.rejected == 0 and progress.chunks_acked == total

        records = await read_all(broker.bootstrap_servers, settings.topic_raw)
        held = {}
        for record in records:
            chunk, _ = decode_event(signal_pb2.SignalChunk, record.value, record.headers)
            held[(record.partition, record.offset)] = chunk.sequence
        # Every ack names a record that is really there and holds that chunk; every chunk was acked.
        for _, ack in client.acks:
            if ack.status == signal_pb2.ACK_STATUS_ACCEPTED:
                assert held.get((ack.partition, ack.offset)) == ack.sequence
        assert set(held.values()) == set(range(total))
        await service.stop()
    finally:
        broker.stop()


async def test_kill_9_ingest_mid_stream_loses_no_acknowledged_chunk(broker, topic_name, tmp_path):
    grpc_port = free_port()
    env = {
        "CLISONIX_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "CLISONIX_PSEUDONYM_KEY": TEST_PSEUDONYM_KEY,
        "CLISONIX_TOPIC_RAW": topic_name("raw"),
        "CLISONIX_GRPC_HOST": "127.0.0.1",
        "CLISONIX_METRICS_HOST": "127.0.0.1",
        "CLISONIX_LOG_FORMAT": "text",
    }
    first = ServiceProcess("ingest", grpc_port, free_port(), env, tmp_path / "ingest-1.log").start()
    total = 200
    client = RecordingClient(
        f"127.0.0.1:{grpc_port}", "session-kill", speed=40.0, reconnect_delay_s=0.2, max_reconnect_delay_s=0.5
    )
    run = asyncio.create_task(client.run(make_blocks(total, specs=(EEG, ECG))))
    second = None
    try:
        await wait_for(lambda: len(client.acks) >= 60, timeout_s=60)
        os.kill(first.process.pid, signal.SIGKILL)
        await asyncio.to_thread(first.process.wait, 10)
        second = ServiceProcess("ingest", grpc_port, free_port(), env, tmp_path / "ingest-2.log")
        await asyncio.to_thread(second.start)
        progress = await asyncio.wait_for(run, timeout=120)
    finally:
        run.cancel()
    assert progress.reconnects >= 1 and progress.rejected == 0

    records = await read_all(broker.bootstrap_servers, env["CLISONIX_TOPIC_RAW"])
    unique = {}
    for record in records:
        chunk, _ = decode_event(signal_pb2.SignalChunk, record.value, record.headers)
        unique.setdefault((chunk.stream_id, chunk.sequence), chunk)
    acked = {(a.stream_id, a.sequence) for _, a in client.acks}
    assert acked <= set(unique), "an acknowledged chunk is missing from Kafka"
    # De-duplicated by (stream, sequence), a consumer sees every sample of the source exactly once.
    expected = {(spec.stream_id, i) for spec in (EEG, ECG) for i in range(total)}
    assert set(unique) == expected
    for (stream_id, sequence), chunk in unique.items():
        spec = EEG if stream_id == EEG.stream_id else ECG
        np.testing.assert_array_equal(unpack_samples(chunk), block_samples(spec, sequence))

    # A graceful stop drains and exits cleanly.
    assert await asyncio.to_thread(second.stop) == 0
