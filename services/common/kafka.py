"""aiokafka producers and consumers as async context managers, speaking protobuf CloudEvents.

Producers use acks=all and at-least-once delivery (no idempotent or transactional producer: the embedded
broker does not support them); consumers commit manually after the handler succeeded and de-duplicate by
event ids where it matters. A record that does not decode goes to the dead-letter topic with the reason in
its headers, and the consumer keeps going.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.structs import RecordMetadata, TopicPartition
from google.protobuf.message import Message

from services.common.errors import ClisonixError
from services.common.events import EventAttributes, UndecodableEvent, decode_event, event_headers
from services.common.settings import ServiceSettings

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

DEADLETTER_TOPIC = "clisonix.deadletter.v1"


@dataclass(frozen=True)
class Topic(Generic[M]):
    """A topic bound to the protobuf message its records carry and what their key is."""

    name: str
    message_type: type[M]
    key: str = "session id"


def _security_options(settings: ServiceSettings) -> dict[str, Any]:
    options: dict[str, Any] = {"security_protocol": settings.kafka_security_protocol}
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = ssl.create_default_context(
            cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
        )
    if settings.kafka_security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism or "PLAIN"
        options["sasl_plain_username"] = settings.kafka_sasl_username
        if settings.kafka_sasl_password is not None:
            options["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    return options


def producer_options(settings: ServiceSettings) -> dict[str, Any]:
    """AIOKafkaProducer keyword arguments from settings: acks=all, batched, compressed."""
    return {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "client_id": f"clisonix-{settings.service_name}",
        "acks": "all",
        "enable_idempotence": False,
        "compression_type": None if settings.kafka_compression == "none" else settings.kafka_compression,
        "linger_ms": settings.kafka_linger_ms,
        "max_batch_size": settings.kafka_max_batch_bytes,
        "max_request_size": settings.kafka_max_request_bytes,
        "request_timeout_ms": settings.kafka_request_timeout_ms,
        **_security_options(settings),
    }


def consumer_options(settings: ServiceSettings, group_id: str | None) -> dict[str, Any]:
    """AIOKafkaConsumer keyword arguments from settings: manual commits, short fetch waits."""
    return {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "client_id": f"clisonix-{settings.service_name}",
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "fetch_max_wait_ms": settings.kafka_fetch_max_wait_ms,
        "session_timeout_ms": settings.kafka_session_timeout_ms,
        "heartbeat_interval_ms": settings.kafka_heartbeat_interval_ms,
        "request_timeout_ms": max(settings.kafka_request_timeout_ms, settings.kafka_session_timeout_ms + 5000),
        **_security_options(settings),
    }


class EventProducer:
    """Sends protobuf messages as CloudEvents records; the returned futures resolve once Kafka acknowledged."""

    def __init__(self, producer: AIOKafkaProducer, source: str) -> None:
        self.producer = producer
        self.source = source

    async def send(
        self,
        topic: str,
        key: str | bytes | None,
        message: Message,
        *,
        event_id: str | None = None,
        extra_headers: Iterable[tuple[str, bytes]] = (),
        traceparent: str | None = None,
        value: bytes | None = None,
    ) -> asyncio.Future[RecordMetadata]:
        """Queues `message` for `topic` and returns the delivery future (RecordMetadata on success).

        value: the already serialised message, when the caller has it (saves a second serialisation).
        """
        headers = event_headers(message, self.source, event_id=event_id, traceparent=traceparent)
        headers.extend(extra_headers)
        key_bytes = key.encode() if isinstance(key, str) else key
        payload = value if value is not None else message.SerializeToString()
        return await self.producer.send(topic, payload, key=key_bytes, headers=headers)

    async def send_and_wait(self, topic: str, key: str | bytes | None, message: Message, **kw: Any) -> RecordMetadata:
        """Sends and waits for Kafka's acknowledgement."""
        return await (await self.send(topic, key, message, **kw))


@asynccontextmanager
async def kafka_producer(settings: ServiceSettings, source: str | None = None) -> AsyncIterator[EventProducer]:
    """An EventProducer for the service; flushes and closes on exit."""
    producer = AIOKafkaProducer(**producer_options(settings))
    await producer.start()
    try:
        yield EventProducer(producer, source or f"//clisonix/{settings.service_name}")
    finally:
        await producer.stop()


@asynccontextmanager
async def kafka_consumer(
    settings: ServiceSettings, topics: Iterable[str], group_id: str | None
) -> AsyncIterator[AIOKafkaConsumer]:
    """A started AIOKafkaConsumer subscribed to `topics`; stops (leaving the group) on exit."""
    consumer = AIOKafkaConsumer(*topics, **consumer_options(settings, group_id))
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


class DeadLetters:
    """Publishes records that cannot be processed to the dead-letter topic, reason in the headers."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, consumer_name: str, on_dead: Callable[[str], None]):
        self.producer = producer
        self.topic = topic
        self.consumer_name = consumer_name
        self.on_dead = on_dead

    async def publish(self, record: ConsumerRecord, reason: str, detail: str) -> RecordMetadata:
        """Copies `record` (key, value, headers) to the dead-letter topic and waits for the write."""
        headers = list(record.headers or ())
        headers += [
            ("deadletter_reason", reason.encode()),
            ("deadletter_detail", detail[:1000].encode()),
            ("deadletter_topic", record.topic.encode()),
            ("deadletter_partition", str(record.partition).encode()),
            ("deadletter_offset", str(record.offset).encode()),
            ("deadletter_consumer", self.consumer_name.encode()),
        ]
        metadata = await self.producer.send_and_wait(self.topic, record.value, key=record.key, headers=headers)
        self.on_dead(reason)
        log.warning(
            "record dead-lettered",
            extra={"fields": {"reason": reason, "topic": record.topic, "offset": record.offset}},
        )
        return metadata


Handler = Callable[[M, EventAttributes, ConsumerRecord], Awaitable[None]]


async def consume_events(
    consumer: AIOKafkaConsumer,
    message_type: type[M],
    handler: Handler[M],
    dead_letters: DeadLetters,
    stop: asyncio.Event,
    max_records: int = 500,
) -> None:
    """Decodes and handles records until `stop` is set, committing after each handled batch.

    Undecodable records and records whose handler raises a domain error (ClisonixError) are dead-lettered
    and the consumer keeps going; any other handler error propagates (nothing is committed past it, so the
    record is re-read after a restart: at-least-once).
    """
    while not stop.is_set():
        batches = await consumer.getmany(timeout_ms=100, max_records=max_records)
        if not batches:
            continue
        offsets: dict[TopicPartition, int] = {}
        for partition, records in batches.items():
            for record in records:
                try:
                    message, attributes = decode_event(message_type, record.value, record.headers)
                    await handler(message, attributes, record)
                except UndecodableEvent as exc:
                    await dead_letters.publish(record, exc.reason, exc.detail)
                except ClisonixError as exc:
                    await dead_letters.publish(record, exc.reason, str(exc))
                offsets[partition] = record.offset + 1
        await consumer.commit(offsets)


async def ensure_topics(settings: ServiceSettings, names: Iterable[str], partitions: int | None = None) -> None:
    """Creates the topics that do not exist yet (idempotent)."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        request_timeout_ms=settings.kafka_request_timeout_ms,
        **_security_options(settings),
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(name, partitions or settings.kafka_topic_partitions, settings.kafka_replication_factor)
            for name in dict.fromkeys(names)
            if name not in existing
        ]
        if missing:
            try:
                await admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass  # created concurrently by another replica
    finally:
        await admin.close()
