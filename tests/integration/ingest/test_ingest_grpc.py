"""Ingest over real gRPC into the real embedded broker: round trip, validation, duplicates, limits, auth."""

from __future__ import annotations

import asyncio
import math
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clisonix.signal.v1 import signal_pb2, signal_pb2_grpc
from services.common.chunks import physical_samples
from services.common.events import decode_event, header_value
from services.ingest.client import StreamClient
from tests.conftest import TEST_PSEUDONYM_KEY
from tests.helpers import ECG, EEG, make_blocks, make_chunk, read_all, read_topic, wait_for

pytestmark = pytest.mark.integration


def stub_for(service, token: str | None = None):
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}")
    return channel, signal_pb2_grpc.IngestServiceStub(channel)


async def stream_all(stub, chunks, metadata=()):
    async def requests():
        for chunk in chunks:
            yield chunk

    return [ack async for ack in stub.Stream(requests(), metadata=metadata)]


async def test_chunk_round_trip_to_a_plain_kafka_consumer(ingest_service, broker):
    service = await ingest_service()
    channel, stub = stub_for(service)
    async with channel:
        chunk = make_chunk(0, session="session-rt", subject="patient-0042")
        ack = await stub.Append(chunk)
    assert ack.status == signal_pb2.ACK_STATUS_ACCEPTED
    assert ack.session_id.startswith("ps-") and ack.session_id != "session-rt"

    records = await read_topic(broker.bootstrap_servers, service.settings.topic_raw, lambda r: len(r) >= 1)
    record = records[0]
    assert (record.partition, record.offset) == (ack.partition, ack.offset)
    assert record.key == ack.session_id.encode()
    assert header_value(record.headers, "ce_specversion") == "1.0"
    assert header_value(record.headers, "ce_type") == "clisonix.signal.v1.SignalChunk"
    assert header_value(record.headers, "ce_source") == "//clisonix/ingest"
    assert header_value(record.headers, "content-type") == "application/protobuf"
    assert header_value(record.headers, "ce_id") == f"{ack.session_id}/{EEG.stream_id}/0"
    assert header_value(record.headers, "ce_time").endswith("Z")
    written, _ = decode_event(signal_pb2.SignalChunk, record.value, record.headers)
    # The subject id never leaves ingest in the clear; the samples arrive unchanged.
    assert written.subject_id.startswith("ps-") and "0042" not in written.subject_id
    assert written.session_id == ack.session_id
    assert written.ingest_time.seconds > 0
    np.testing.assert_array_equal(physical_samples(written), physical_samples(chunk))


async def test_pseudonyms_are_stable_under_one_key_and_differ_under_another(ingest_service):
    first = await ingest_service()
    second = await ingest_service(pseudonym_key=TEST_PSEUDONYM_KEY + "-other")
    acks = []
    for service in (first, first, second):
        channel, stub = stub_for(service)
        async with channel:
            acks.append(await stub.Append(make_chunk(len(acks), session="same-session")))
    assert acks[0].session_id == acks[1].session_id != acks[2].session_id


def bad_chunks() -> list[tuple[str, signal_pb2.SignalChunk, grpc.StatusCode]]:
    cases = []

    def case(name, code=grpc.StatusCode.INVALID_ARGUMENT, **change):
        chunk = make_chunk(0)
        for field, value in change.items():
            if field in ("channel_units", "channel_gain", "channel_offset", "channel_names"):
                del getattr(chunk, field)[:]
                getattr(chunk, field).extend(value)
            else:
                setattr(chunk, field, value)
        cases.append((name, chunk, code))

    case("units count differs from channels", channel_units=["uV"])
    case("no channels", channel_names=[])
    case("zero rate", nominal_rate_hz=0.0)
    case("negative rate", nominal_rate_hz=-250.0)
    case("NaN rate", nominal_rate_hz=math.nan)
    nan = make_chunk(0).samples
    case("NaN sample", samples=np.float32([np.nan]).tobytes() + nan[4:])
    case("Inf sample", samples=nan[:-4] + np.float32([np.inf]).tobytes())
    case("samples do not match channels x count", sample_count=49)
    case("truncated samples", samples=nan[:-2])
    case("missing session", session_id="")
    case("float32 with gains", channel_gain=[1.0, 1.0], channel_offset=[0.0, 0.0])
    case("unspecified format", sample_format=signal_pb2.SAMPLE_FORMAT_UNSPECIFIED)
    case(
        "chunk over the size limit",
        code=grpc.StatusCode.RESOURCE_EXHAUSTED,
        samples=b"\0" * 8 * 40_000,
        sample_count=40_000,
    )
    return cases


@pytest.mark.parametrize("name,chunk,code", bad_chunks(), ids=[c[0] for c in bad_chunks()])
async def test_append_rejects_bad_chunks_with_clear_status(ingest_service, name, chunk, code):
    service = await ingest_service(max_chunk_bytes=200_000)
    channel, stub = stub_for(service)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Append(chunk)
    assert raised.value.code() == code
    assert raised.value.details()


async def test_bad_chunk_in_a_stream_ends_nothing_else(ingest_service, broker):
    service = await ingest_service(max_chunk_bytes=200_000)
    cases = bad_chunks()
    chunks = [make_chunk(0)]
    for _, bad, _ in cases:
        bad.sequence = 1
        chunks.append(bad)
    chunks.append(make_chunk(1))
    channel, stub = stub_for(service)
    async with channel:
        acks = await stream_all(stub, chunks)
    assert len(acks) == len(chunks)
    assert acks[0].status == acks[-1].status == signal_pb2.ACK_STATUS_ACCEPTED
    for ack, (name, _, code) in zip(acks[1:-1], cases, strict=True):
        assert ack.status == signal_pb2.ACK_STATUS_REJECTED, name
        assert ack.code == code.value[0], name
        assert ack.message, name
    records = await read_topic(broker.bootstrap_servers, service.settings.topic_raw, lambda r: len(r) >= 2)
    assert sorted(r.offset for r in records if r.partition == acks[0].partition) == [acks[0].offset, acks[-1].offset]


async def test_layout_change_and_backwards_sequence_are_rejected(ingest_service):
    service = await ingest_service()
    changed = make_chunk(1)
    changed.nominal_rate_hz = 256.0
    channel, stub = stub_for(service)
    async with channel:
        acks = await stream_all(stub, [make_chunk(0), make_chunk(1), changed, make_chunk(3), make_chunk(2)])
    statuses = [(a.sequence, a.status, a.code) for a in acks]
    assert statuses[0][1] == statuses[1][1] == signal_pb2.ACK_STATUS_ACCEPTED
    assert statuses[2] == (1, signal_pb2.ACK_STATUS_REJECTED, grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert "layout" in acks[2].message
    assert statuses[3][1] == signal_pb2.ACK_STATUS_ACCEPTED and acks[3].gaps_total == 1
    assert statuses[4] == (2, signal_pb2.ACK_STATUS_REJECTED, grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert "backwards" in acks[4].message


async def test_duplicates_are_dropped_and_answered_with_the_first_write(ingest_service, broker):
    service = await ingest_service()
    channel, stub = stub_for(service)
    async with channel:
        acks = await stream_all(stub, [make_chunk(0), make_chunk(1), make_chunk(1), make_chunk(0), make_chunk(2)])
    assert [a.status for a in acks] == [
        signal_pb2.ACK_STATUS_ACCEPTED,
        signal_pb2.ACK_STATUS_ACCEPTED,
        signal_pb2.ACK_STATUS_DUPLICATE,
        signal_pb2.ACK_STATUS_DUPLICATE,
        signal_pb2.ACK_STATUS_ACCEPTED,
    ]
    assert (acks[2].partition, acks[2].offset) == (acks[1].partition, acks[1].offset)
    assert (acks[3].partition, acks[3].offset) == (acks[0].partition, acks[0].offset)
    records = await read_all(broker.bootstrap_servers, service.settings.topic_raw)
    assert len(records) == 3


async def test_client_over_its_rate_gets_resource_exhausted(ingest_service):
    service = await ingest_service(max_chunks_per_second=1.0, max_chunk_burst=3)
    channel, stub = stub_for(service)
    async with channel:
        acks = await stream_all(stub, [make_chunk(i) for i in range(6)])
    accepted = [a for a in acks if a.status == signal_pb2.ACK_STATUS_ACCEPTED]
    limited = [a for a in acks if a.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]]
    assert len(accepted) == 3 and len(limited) == 3
    assert all(a.retry_after_ms > 0 for a in limited)


@pytest.mark.parametrize("run", range(3))
async def test_throttled_client_resends_and_every_chunk_arrives(ingest_service, broker, run):
    # Throttling ends calls while earlier writes are still in flight: their acks must survive the call.
    service = await ingest_service(max_chunks_per_second=400.0, max_chunk_burst=40)
    client = StreamClient(f"127.0.0.1:{service.grpc_port}", "session-throttled", speed=None, ack_timeout_s=10)
    progress = await asyncio.wait_for(client.run(make_blocks(300)), 60)
    assert progress.throttled >= 1 and progress.rejected == 0 and progress.chunks_acked == 300
    assert progress.reconnects == 0  # never had to give up on a call that owed acks
    records = await read_all(broker.bootstrap_servers, service.settings.topic_raw)
    sequences = {decode_event(signal_pb2.SignalChunk, r.value, r.headers)[0].sequence for r in records}
    assert sequences == set(range(300))


async def test_client_drops_a_call_that_owes_acks_and_resends_on_a_new_one(ingest_service, broker):
    """A server that takes chunks but never answers: the client gives up on the call after ack_timeout_s."""
    service = await ingest_service()
    calls = []

    class Silent(signal_pb2_grpc.IngestServiceServicer):
        async def Stream(self, request_iterator, context):
            calls.append(1)
            async for _ in request_iterator:
                if len(calls) > 1:
                    break
            if len(calls) > 1:
                return
            await asyncio.Event().wait()
            yield  # pragma: no cover

    server = grpc.aio.server()
    signal_pb2_grpc.add_IngestServiceServicer_to_server(Silent(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    target = {"value": f"127.0.0.1:{port}"}

    class Redirecting(StreamClient):
        def _channel(self):
            return grpc.aio.insecure_channel(target["value"])

    client = Redirecting("unused", "session-silent", speed=None, ack_timeout_s=1.0, reconnect_delay_s=0.05)
    run = asyncio.create_task(client.run(make_blocks(5)))
    await wait_for(lambda: client.progress.reconnects >= 1, timeout_s=20)
    target["value"] = f"127.0.0.1:{service.grpc_port}"
    progress = await asyncio.wait_for(run, 30)
    await server.stop(0)
    assert progress.chunks_acked == 5 and progress.rejected == 0


async def test_bearer_token_guards_writes_but_not_health(ingest_service):
    service = await ingest_service(auth_token="s3cret-token")
    channel, stub = stub_for(service)
    async with channel:
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Append(make_chunk(0), metadata=metadata)
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stream_all(stub, [make_chunk(0)], metadata=metadata)
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ack = await stub.Append(make_chunk(0), metadata=(("authorization", "Bearer s3cret-token"),))
        assert ack.status == signal_pb2.ACK_STATUS_ACCEPTED
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_backpressure_bounds_unacked_chunks_per_stream(ingest_service):
    service = await ingest_service(max_unacked_per_stream=4)
    pipeline = service.pipeline
    most_in_flight = 0
    original = pipeline.submit

    async def watching_submit(chunk, rate_limit=None):
        nonlocal most_in_flight
        answer = await original(chunk, rate_limit)
        most_in_flight = max(most_in_flight, len(pipeline.in_flight))
        return answer

    pipeline.submit = watching_submit
    client = StreamClient(f"127.0.0.1:{service.grpc_port}", "session-bp", speed=None, max_unacked=64)
    progress = await client.run(make_blocks(200))
    assert progress.chunks_acked == 200
    assert 1 <= most_in_flight <= 4


async def test_metrics_count_chunks_samples_gaps_rejections_and_energy(ingest_service):
    service = await ingest_service()
    channel, stub = stub_for(service)
    bad = make_chunk(3)
    bad.nominal_rate_hz = 0
    async with channel:
        await stream_all(stub, [make_chunk(0), make_chunk(2), bad, make_chunk(0, spec=ECG)])
    service.runtime.energy_exporter.update()
    url = f"http://127.0.0.1:{service.runtime.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    assert 'clisonix_ingest_chunks_total{modality="eeg"} 2.0' in text
    assert 'clisonix_ingest_chunks_total{modality="ecg"} 1.0' in text
    assert 'clisonix_ingest_samples_total{modality="eeg"} 100.0' in text
    assert 'clisonix_ingest_sequence_gaps_total{modality="eeg"} 1.0' in text
    assert 'clisonix_records_rejected_total{reason="bad_rate",service="ingest"} 1.0' in text
    assert "clisonix_ingest_ack_latency_seconds_count 3.0" in text
    assert f'clisonix_energy_joules_total{{service="ingest",source="{service.runtime.energy.source}"}}' in text
    assert 'clisonix_stage_latency_seconds_bucket{le="0.0005",service="ingest",stage="validate"}' in text


async def test_client_streams_several_streams_with_every_sample_on_kafka(ingest_service, broker):
    service = await ingest_service()
    client = StreamClient(f"127.0.0.1:{service.grpc_port}", "session-multi", speed=None)
    progress = await client.run(make_blocks(40, specs=(EEG, ECG)))
    assert progress.chunks_acked == 80 and progress.rejected == 0
    records = await read_topic(broker.bootstrap_servers, service.settings.topic_raw, lambda r: len(r) >= 80)
    seen = {}
    for record in records:
        chunk, _ = decode_event(signal_pb2.SignalChunk, record.value, record.headers)
        seen[(chunk.stream_id, chunk.sequence)] = chunk
    assert len(seen) == 80
    # One session, one key, one partition: per-stream order on Kafka is the send order.
    assert len({r.partition for r in records}) == 1
    for spec in (EEG, ECG):
        sequences = [
            c.sequence
            for r in records
            for c in [decode_event(signal_pb2.SignalChunk, r.value, r.headers)[0]]
            if c.stream_id == spec.stream_id
        ]
        assert sequences == sorted(sequences)
