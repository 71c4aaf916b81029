"""Test helpers: deterministic sample blocks, waiting on conditions, reading topics back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import numpy as np
from aiokafka import AIOKafkaConsumer, ConsumerRecord

from clisonix.signal.v1 import signal_pb2
from services.common.chunks import SampleBlock, StreamSpec, to_chunk

EEG = StreamSpec("eeg-0", signal_pb2.MODALITY_EEG, ("C3", "C4"), ("uV", "uV"), 250.0)
ECG = StreamSpec("ecg-0", signal_pb2.MODALITY_ECG, ("II",), ("mV",), 500.0)


def block_samples(spec: StreamSpec, index: int, samples: int = 50) -> np.ndarray:
    """Deterministic samples of block `index` of a stream (seeded by stream and index)."""
    seed = sum(spec.stream_id.encode()) * 1_000_003 + index
    return np.random.default_rng(seed).standard_normal((spec.channel_count, samples)).astype(np.float32)


def make_blocks(count: int, specs: tuple[StreamSpec, ...] = (EEG,), samples: int = 50) -> Iterator[SampleBlock]:
    """`count` blocks per stream, interleaved across streams, with contiguous timestamps."""
    for index in range(count):
        for spec in specs:
            yield SampleBlock(spec, index * samples / spec.nominal_rate_hz, block_samples(spec, index, samples))


def make_chunk(
    sequence: int = 0, spec: StreamSpec = EEG, session: str = "session-a", subject: str = "subject-a", samples: int = 50
) -> signal_pb2.SignalChunk:
    """A valid chunk of `spec` with deterministic samples."""
    block = SampleBlock(spec, sequence * samples / spec.nominal_rate_hz, block_samples(spec, sequence, samples))
    return to_chunk(block, session, sequence, subject)


async def wait_for(condition: Callable[[], bool], timeout_s: float = 20.0, interval_s: float = 0.02) -> None:
    """Waits until `condition()` is true; fails the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(interval_s)


@asynccontextmanager
async def plain_consumer(bootstrap_servers: str, topic: str) -> AsyncIterator[AIOKafkaConsumer]:
    """A plain aiokafka consumer of `topic` from the beginning, outside any group: what any Kafka user has."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=5,
        group_id=None,
    )
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


async def read_topic(
    bootstrap_servers: str,
    topic: str,
    done: Callable[[list[ConsumerRecord]], bool],
    timeout_s: float = 30.0,
) -> list[ConsumerRecord]:
    """Reads `topic` from the beginning with a plain aiokafka consumer until `done(records)` holds."""
    records: list[ConsumerRecord] = []
    async with plain_consumer(bootstrap_servers, topic) as consumer:
        deadline = time.monotonic() + timeout_s
        while not done(records):
            if time.monotonic() > deadline:
                raise AssertionError(f"read {len(records)} records from {topic}; condition not met in {timeout_s} s")
            batches = await consumer.getmany(timeout_ms=200)
            for batch in batches.values():
                records.extend(batch)
    return records


async def read_all(bootstrap_servers: str, topic: str, timeout_s: float = 30.0) -> list[ConsumerRecord]:
    """Every record of `topic` now: reads until each partition's position reaches its fetch highwater
    (the embedded broker's ListOffsets answer is wrong after multi-record batches, the fetch highwater is not).
    """
    records: list[ConsumerRecord] = []
    async with plain_consumer(bootstrap_servers, topic) as consumer:
        deadline = time.monotonic() + timeout_s
        while True:
            batches = await consumer.getmany(timeout_ms=200)
            for batch in batches.values():
                records.extend(batch)
            partitions = consumer.assignment()
            caught_up = bool(partitions)
            for tp in partitions:
                highwater = consumer.highwater(tp)
                caught_up = caught_up and highwater is not None and await consumer.position(tp) >= highwater
            if caught_up:
                return records
            if time.monotonic() > deadline:
                raise AssertionError(f"{topic}: did not reach the highwater of every partition in {timeout_s} s")


def free_port_offset() -> int:
    """An offset under which the default ports (the broker's, every service's gRPC and metrics) are all free on
    loopback now, for `clisonix up --port-offset` in tests."""
    import random
    import socket

    from services.processes import DEFAULT_PORTS

    ports = [9092, *(port for pair in DEFAULT_PORTS.values() for port in pair)]
    for _ in range(100):
        offset = random.randint(2000, 6000)
        try:
            for port in ports:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return offset
    raise AssertionError("no free port offset found")
