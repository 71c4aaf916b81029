"""consume_events and DeadLetters against the real embedded broker: bad records go to the dead-letter topic
with their reason, good ones reach the handler in order, and the group's offsets move past all of them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import pytest
from aiokafka import ConsumerRecord
from aiokafka.structs import TopicPartition

from clisonix.signal.v1 import signal_pb2
from services.common.broker import EmbeddedBroker
from services.common.errors import InvalidArgument
from services.common.events import EventAttributes, event_headers, header_value
from services.common.kafka import DeadLetters, consume_events, ensure_topics, kafka_consumer, kafka_producer
from services.common.metrics import ServiceMetrics
from services.common.settings import ServiceSettings
from tests.helpers import make_chunk, read_all

pytestmark = pytest.mark.integration

CONSUMER = "test-consumer"
TIMEOUT_S = 60.0


def settings_for(broker: EmbeddedBroker, deadletter: str) -> ServiceSettings:
    return ServiceSettings(
        service_name="dltest",
        kafka_bootstrap_servers=broker.bootstrap_servers,
        kafka_session_timeout_ms=6000,
        kafka_heartbeat_interval_ms=1000,
        topic_deadletter=deadletter,
    )


class Collector:
    """A handler collecting the messages it got; sets `stop` after `until` of them."""

    def __init__(self, until: int, poison: str | None = None) -> None:
        self.until = until
        self.poison = poison
        self.stop = asyncio.Event()
        self.handled: list[tuple[signal_pb2.SignalChunk, EventAttributes, ConsumerRecord]] = []

    async def __call__(self, message: signal_pb2.SignalChunk, attributes: EventAttributes, record: ConsumerRecord):
        if message.stream_id == self.poison:
            raise InvalidArgument("the handler refuses this chunk", reason="poisoned")
        self.handled.append((message, attributes, record))
        if len(self.handled) >= self.until:
            self.stop.set()


async def consume(
    settings: ServiceSettings, topic: str, group: str, handler: Collector, metrics: ServiceMetrics
) -> int | None:
    """Runs consume_events until the handler stops it; returns the group's committed offset of partition 0."""
    deadlettered = metrics.deadlettered_total

    def on_dead(reason: str) -> None:
        deadlettered.labels(service=metrics.service, reason=reason).inc()

    async with (
        kafka_consumer(settings, [topic], group) as consumer,
        kafka_producer(settings) as producer,
    ):
        dead = DeadLetters(producer.producer, settings.topic_deadletter, CONSUMER, on_dead)
        await asyncio.wait_for(consume_events(consumer, signal_pb2.SignalChunk, handler, dead, handler.stop), TIMEOUT_S)
        return await consumer.committed(TopicPartition(topic, 0))


def deadlettered(metrics: ServiceMetrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "clisonix_deadlettered_total", {"service": metrics.service, "reason": reason}
    )
    return value or 0.0


async def test_bad_records_are_deadlettered_and_good_ones_handled_in_order(
    broker: EmbeddedBroker, topic_name: Callable[[str], str]
) -> None:
    topic, dlq = topic_name("events"), topic_name("deadletter")
    settings = settings_for(broker, dlq)
    await ensure_topics(settings, [topic, dlq], partitions=1)

    good_first, good_last = make_chunk(0), make_chunk(1)
    garbage = b"\xff\xff\xff\xff not a protobuf"
    ack = signal_pb2.IngestAck(stream_id="eeg-0", sequence=9)
    async with kafka_producer(settings, source="//clisonix/test") as producer:
        first = await producer.send_and_wait(topic, "session-a", good_first, event_id="good-0")
        raw = producer.producer
        await raw.send_and_wait(topic, garbage, key=b"k1", headers=event_headers(good_first, "//clisonix/test"))
        await raw.send_and_wait(
            topic, good_first.SerializeToString(), key=b"k2", headers=[("content-type", b"application/protobuf")]
        )
        await raw.send_and_wait(topic, ack.SerializeToString(), key=b"k3", headers=event_headers(ack, "//x"))
        last = await producer.send_and_wait(topic, "session-a", good_last, event_id="good-1")
    assert (first.partition, first.offset, last.offset) == (0, 0, 4)

    metrics = ServiceMetrics.create("dltest")
    handler = Collector(until=2)
    committed = await consume(settings, topic, f"group-{uuid.uuid4().hex[:8]}", handler, metrics)

    assert [m for m, _, _ in handler.handled] == [good_first, good_last]
    assert [a.id for _, a, _ in handler.handled] == ["good-0", "good-1"]
    assert [r.offset for _, _, r in handler.handled] == [0, 4]
    assert handler.handled[0][1].source == "//clisonix/test"
    assert committed == 5

    records = await read_all(broker.bootstrap_servers, dlq)
    assert len(records) == 3
    by_reason = {header_value(r.headers, "deadletter_reason"): r for r in records}
    assert list(by_reason) == ["bad_protobuf", "missing_header", "wrong_type"]
    for offset, (reason, record) in enumerate(by_reason.items(), start=1):
        assert header_value(record.headers, "deadletter_topic") == topic
        assert header_value(record.headers, "deadletter_partition") == "0"
        assert header_value(record.headers, "deadletter_offset") == str(offset)
        assert header_value(record.headers, "deadletter_consumer") == CONSUMER
        assert header_value(record.headers, "deadletter_detail")
        assert deadlettered(metrics, reason) == 1.0
    # Key, value and original headers are copied unchanged.
    assert by_reason["bad_protobuf"].value == garbage
    assert by_reason["bad_protobuf"].key == b"k1"
    assert header_value(by_reason["bad_protobuf"].headers, "ce_type") == "clisonix.signal.v1.SignalChunk"
    assert by_reason["missing_header"].value == good_first.SerializeToString()
    assert header_value(by_reason["missing_header"].headers, "content-type") == "application/protobuf"
    assert header_value(by_reason["wrong_type"].headers, "ce_type") == "clisonix.signal.v1.IngestAck"
    assert by_reason["wrong_type"].key == b"k3"
    assert sum(deadlettered(metrics, r) for r in ("bad_protobuf", "missing_header", "wrong_type", "poisoned")) == 3


async def test_domain_error_in_handler_is_deadlettered_and_consumption_continues(
    broker: EmbeddedBroker, topic_name: Callable[[str], str]
) -> None:
    topic, dlq = topic_name("events"), topic_name("deadletter")
    settings = settings_for(broker, dlq)
    await ensure_topics(settings, [topic, dlq], partitions=1)

    poison = make_chunk(1)
    poison.stream_id = "poison"
    chunks = [make_chunk(0), poison, make_chunk(2)]
    async with kafka_producer(settings) as producer:
        for index, chunk in enumerate(chunks):
            await producer.send_and_wait(topic, "session-a", chunk, event_id=f"e-{index}")

    metrics = ServiceMetrics.create("dltest")
    handler = Collector(until=2, poison="poison")
    committed = await consume(settings, topic, f"group-{uuid.uuid4().hex[:8]}", handler, metrics)

    assert [m for m, _, _ in handler.handled] == [chunks[0], chunks[2]]
    assert committed == 3
    records = await read_all(broker.bootstrap_servers, dlq)
    assert len(records) == 1
    record = records[0]
    assert header_value(record.headers, "deadletter_reason") == "poisoned"
    assert header_value(record.headers, "deadletter_detail") == "the handler refuses this chunk"
    assert header_value(record.headers, "deadletter_offset") == "1"
    assert header_value(record.headers, "ce_id") == "e-1"
    assert signal_pb2.SignalChunk.FromString(record.value) == poison
    assert deadlettered(metrics, "poisoned") == 1.0


async def test_other_handler_errors_propagate_without_commit(
    broker: EmbeddedBroker, topic_name: Callable[[str], str]
) -> None:
    topic, dlq = topic_name("events"), topic_name("deadletter")
    settings = settings_for(broker, dlq)
    await ensure_topics(settings, [topic, dlq], partitions=1)
    async with kafka_producer(settings) as producer:
        await producer.send_and_wait(topic, "session-a", make_chunk(0))

    async def crash(message: signal_pb2.SignalChunk, attributes: EventAttributes, record: ConsumerRecord) -> None:
        raise RuntimeError("bug in the handler")

    dead_reasons: list[str] = []
    group = f"group-{uuid.uuid4().hex[:8]}"
    async with (
        kafka_consumer(settings, [topic], group) as consumer,
        kafka_producer(settings) as producer,
    ):
        dead = DeadLetters(producer.producer, dlq, CONSUMER, dead_reasons.append)
        with pytest.raises(RuntimeError, match="bug in the handler"):
            await asyncio.wait_for(
                consume_events(consumer, signal_pb2.SignalChunk, crash, dead, asyncio.Event()), TIMEOUT_S
            )
        # Nothing committed: the record is read again after a restart (at-least-once), and not dead-lettered.
        assert await consumer.committed(TopicPartition(topic, 0)) is None
    assert dead_reasons == []
