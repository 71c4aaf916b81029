"""The LIAM service on a real broker with real gRPC: records in (gRPC and Kafka), bad ones refused or
dead-lettered with the reason, patterns and anomalies out, hypervector encode and search, and the platform's
own operating metrics as streams."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2

from clisonix.liam.v1 import liam_pb2, liam_pb2_grpc
from services.common.events import decode_event, header_value
from services.common.kafka import kafka_producer
from services.liam.binary import BinaryAlgebra
from tests.helpers import read_topic

pytestmark = pytest.mark.integration


def record(stream: str, record_id: str = "", **metrics: object) -> liam_pb2.MetricRecord:
    message = liam_pb2.MetricRecord(stream=stream, record_id=record_id)
    for name, value in metrics.items():
        if isinstance(value, str):
            message.metrics[name].string_value = value
        elif value is None:
            message.metrics[name].null_value = struct_pb2.NULL_VALUE
        else:
            message.metrics[name].number_value = float(value)  # type: ignore[arg-type]
    return message


async def ingest(stub: liam_pb2_grpc.LiamServiceStub, records: list[liam_pb2.MetricRecord]):
    async def stream():
        for r in records:
            yield r

    return await stub.IngestMetrics(stream())


async def analyzed(stub: liam_pb2_grpc.LiamServiceStub, stream: str, records: int, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            report = await stub.Analyze(liam_pb2.AnalyzeRequest(stream=stream))
            if report.records >= records:
                return report
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
        assert time.monotonic() < deadline, f"stream {stream} never reached {records} records"
        await asyncio.sleep(0.05)


async def test_records_patterns_anomalies_and_bad_input(liam_service, broker) -> None:
    service = await liam_service(warmup_records=20, operating_metrics_interval_seconds=0)
    settings = service.settings
    rng = np.random.default_rng(1)
    good = [
        record("svc/a", f"r{i}", latency=0.010 + 0.001 * rng.standard_normal(), power=20 + rng.standard_normal())
        for i in range(60)
    ]
    bad = [
        record("svc/a", "nan", latency=float("nan")),
        record("svc/a", "text", latency="12 ms"),
        record("svc/a", "none", latency=None),
        record("svc/a", "empty"),
        record("", "nostream", latency=1.0),
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = liam_pb2_grpc.LiamServiceStub(channel)
        reply = await ingest(stub, good[:30] + bad + good[30:])
        assert reply.accepted == 60
        assert [(r.index, r.record_id, r.reason) for r in reply.rejected] == [
            (30, "nan", "non_finite"),
            (31, "text", "not_a_number"),
            (32, "none", "not_a_number"),
            (33, "empty", "empty_record"),
            (34, "nostream", "empty_stream"),
        ]
        assert "latency" in reply.rejected[0].detail and "latency" in reply.rejected[1].detail

        report = await analyzed(stub, "svc/a", 60)
        assert list(report.metrics) == ["latency", "power"] and report.rank == 2
        assert report.method == "covariance" and report.condition_number >= 1.0
        assert len(report.components) == 4 and sum(report.explained_variance) == pytest.approx(1.0)

        # A spike becomes an anomaly report on the patterns topic, naming the metric.
        await ingest(stub, [record("svc/a", "spike", latency=0.010, power=60.0)])

        def anomaly_reports(records) -> list[liam_pb2.PatternReport]:
            decoded = [decode_event(liam_pb2.PatternReport, r.value, r.headers)[0] for r in records]
            return [m for m in decoded if m.kind == liam_pb2.REPORT_KIND_ANOMALY]

        reports = await read_topic(
            broker.bootstrap_servers, settings.topic_patterns, lambda got: bool(anomaly_reports(got))
        )
        anomalies = anomaly_reports(reports)
        assert anomalies and anomalies[0].anomalies[0].metric == "power"
        assert anomalies[0].anomalies[0].record_id == "spike" and anomalies[0].anomalies[0].z_score > 6
        assert service.runtime.metrics.registry.get_sample_value("clisonix_liam_anomalies_total") == 1

        # Unknown streams are NOT_FOUND.
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.Analyze(liam_pb2.AnalyzeRequest(stream="svc/none"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    # A bad record written straight to Kafka is dead-lettered with the reason; the stream goes on.
    async with kafka_producer(settings, "//test") as producer:
        await (await producer.send(settings.topic_liam_metrics, "svc/a", record("svc/a", "k-nan", power=float("nan"))))
    dead = await read_topic(broker.bootstrap_servers, settings.topic_deadletter, lambda got: len(got) >= 1)
    assert header_value(dead[0].headers, "deadletter_reason") == "non_finite"
    assert "power" in (header_value(dead[0].headers, "deadletter_detail") or "")


async def test_encode_and_search_match_brute_force(liam_service) -> None:
    service = await liam_service(hypervector_bits=256, operating_metrics_interval_seconds=0)
    rng = np.random.default_rng(7)
    stored_real = rng.standard_normal((300, 8))
    queries_real = stored_real[[5, 100]] + 0.01 * rng.standard_normal((2, 8))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = liam_pb2_grpc.LiamServiceStub(channel)
        stored = await stub.Encode(liam_pb2.EncodeRequest(values=stored_real.ravel().tolist(), dimensions=8))
        queries = await stub.Encode(liam_pb2.EncodeRequest(values=queries_real.ravel().tolist(), dimensions=8))
        assert (stored.bits, stored.words, stored.count) == (256, 4, 300)
        found = await stub.Search(liam_pb2.SearchRequest(store="s", vectors=stored, queries=queries, k=3))
        again = await stub.Search(liam_pb2.SearchRequest(store="s", queries=queries, k=3))  # the kept store
        # Brute force over the unpacked bits.
        algebra = BinaryAlgebra(256, 0)
        bits_stored = algebra.unpack(np.frombuffer(stored.data, "<u8").astype(np.uint64).reshape(300, 4))
        bits_queries = algebra.unpack(np.frombuffer(queries.data, "<u8").astype(np.uint64).reshape(2, 4))
        distances = (bits_queries[:, None, :] != bits_stored[None, :, :]).sum(axis=2)
        for q, result in enumerate(found.results):
            expected = sorted(range(300), key=lambda i: (distances[q, i], i))[:3]
            assert [h.index for h in result.hits] == expected
            assert [h.distance for h in result.hits] == [distances[q, i] for i in expected]
        assert [h.index for h in found.results[0].hits][0] == 5 and found.results[1].hits[0].index == 100
        assert again.results == found.results

        cases = [
            (liam_pb2.EncodeRequest(values=[1.0, 2.0, 3.0], dimensions=2), "Encode", grpc.StatusCode.INVALID_ARGUMENT),
            (liam_pb2.SearchRequest(store="nope", queries=queries, k=1), "Search", grpc.StatusCode.NOT_FOUND),
            (liam_pb2.SearchRequest(store="s", queries=queries, k=0), "Search", grpc.StatusCode.INVALID_ARGUMENT),
            (
                liam_pb2.SearchRequest(
                    vectors=liam_pb2.BinaryVectors(data=b"\x00" * 8, bits=256, words=4, count=1), queries=queries, k=1
                ),
                "Search",
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
        ]
        for request, method, code in cases:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await getattr(stub, method)(request)
            assert caught.value.code() == code, caught.value.details()


async def test_services_publish_their_operating_metrics_as_streams(liam_service, tide_replica) -> None:
    service = await liam_service(operating_metrics_interval_seconds=0.3)
    # A Tide replica publishes to the same topic: LIAM watches it beside itself.
    await tide_replica(topic_liam_metrics=service.settings.topic_liam_metrics, operating_metrics_interval_seconds=0.3)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = liam_pb2_grpc.LiamServiceStub(channel)
        liam = await analyzed(stub, "service/liam", 3)
        tide = await analyzed(stub, "service/tide", 3)
    for report in (liam, tide):
        assert {"power_watts", "cpu_cores", "records_in_per_second", "consumer_lag_records"} <= set(report.metrics)
    assert service.runtime.operating.published >= 3
