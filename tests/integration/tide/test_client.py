"""TideClient, TideCache and the typed helpers against real replicas on the embedded broker."""

from __future__ import annotations

import asyncio

import pytest

from services.common.errors import DeadlineExceeded, InvalidArgument, Unauthenticated
from services.tide import client as tide_client
from services.tide.client import TideCache, TideClient
from services.tide.state import Change, Outcome, Version
from tests.helpers import wait_for

pytestmark = pytest.mark.integration


def address(service) -> str:
    return f"127.0.0.1:{service.grpc_port}"


async def test_client_round_trip_cas_conflict_and_delete(tide_replica) -> None:
    service, _ = await tide_replica()
    async with TideClient(address(service)) as client:
        put = await client.put("c/a", b"1", "text/plain")
        assert put.applied and put.key_version == put.version
        got = await client.get("c/a")
        assert got is not None and (got.value, got.content_type, got.version) == (b"1", "text/plain", put.version)
        assert await client.get("c/missing") is None
        # The client finds a key's partition as the replicas do (it needs it for min_version).
        assert await client._partition_of("c/a") == put.version.partition
        for n in range(6):
            assert await client._partition_of(f"p/{n}") == (await client.put(f"p/{n}", b"")).version.partition

        conflict = await client.compare_and_set("c/a", b"x", expected=Version(put.version.partition, 10**6))
        assert conflict.outcome == Outcome.CAS_CONFLICT and conflict.key_version == put.version
        ok = await client.compare_and_set("c/a", b"2", expected=put.version)
        assert ok.applied
        created = await client.compare_and_set("c/b", b"3", expect_absent=True)
        assert created.applied
        again = await client.compare_and_set("c/b", b"4", expect_absent=True)
        assert again.outcome == Outcome.CAS_CONFLICT and again.key_version == created.version
        with pytest.raises(InvalidArgument):
            await client.compare_and_set("c/b", b"5")

        assert [(e.key, e.value) for e in await client.list("c/")] == [("c/a", b"2"), ("c/b", b"3")]
        assert (await client.delete("c/a")).applied
        assert (await client.delete("c/a")).outcome == Outcome.NOT_FOUND
        assert await client.get("c/a") is None

        # A retried command id answers the first result instead of writing twice.
        first = await client.put("c/r", b"r", command_id="same-id")
        retried = await client.put("c/r", b"other", command_id="same-id")
        assert retried.version == first.version
        assert (await client.get("c/r")).value == b"r"  # type: ignore[union-attr]


async def test_read_your_writes_and_monotonic_reads_across_replicas(tide_replica) -> None:
    a, _ = await tide_replica()
    b, _ = await tide_replica(read_wait_seconds=0.5)
    async with TideClient([address(a), address(b)]) as client:
        for n in range(4):
            assert client.target == address(a)
            written = await client.put(f"ryw/{n}", str(n).encode())
            await client.connect(address(b))  # moved to the other replica: remembered versions go along
            got = await client.get(f"ryw/{n}")
            assert got is not None and got.value == str(n).encode() and got.version == written.version
            assert [e.key for e in await client.list("ryw/")] == [f"ryw/{i}" for i in range(n + 1)]
            await client.connect(address(a))
        assert any(
            v.partition == written.version.partition and v.offset >= written.version.offset for v in client.versions
        )

    # The remembered version really is sent: a version no replica has reached makes the read wait, then fail.
    key_partition = written.version.partition
    ahead = Version(key_partition, written.version.offset + 1000)
    async with TideClient(address(b), versions=[ahead], attempts=1) as stale:
        with pytest.raises(DeadlineExceeded):
            await stale.get("ryw/3")


async def test_bearer_token_is_sent(tide_replica) -> None:
    service, _ = await tide_replica(auth_token="s3cret")
    async with TideClient(address(service), token="s3cret") as client:
        assert (await client.put("t/a", b"1")).applied
    async with TideClient(address(service), token="wrong") as client:
        with pytest.raises(Unauthenticated):
            await client.get("t/a")


async def test_cache_loads_follows_and_resumes_without_loss_or_duplicates(tide_replica) -> None:
    a, _ = await tide_replica()
    b, _ = await tide_replica()
    writer = TideClient(address(b))
    await writer.put("cache/a", b"0")
    await writer.put("other/x", b"ignored")
    seen: list[Change] = []
    reader = TideClient([address(a), address(b)])
    cache = TideCache(reader, "cache/", on_change=seen.append, retry_delay_s=0.05)
    try:
        await cache.start()
        assert [(k, e.value) for k, e in cache.items()] == [("cache/a", b"0")]  # initial load, no change events
        expected: list[tuple[str, bytes, bool]] = []

        async def write(key: str, value: bytes | None) -> Version:
            if value is None:
                result = await writer.delete(key)
                expected.append((key, b"", True))
            else:
                result = await writer.put(key, value)
                expected.append((key, value, False))
            return result.version

        for n in range(3):
            await write(f"cache/k{n}", b"v%d" % n)
        last = await write("cache/a", None)
        await cache.wait_for_version(last)
        assert cache.get("cache/a") is None and cache.get("cache/k2").value == b"v2"  # type: ignore[union-attr]

        # Break the stream on the same replica, writing meanwhile.
        cache.break_stream()
        for n in range(3, 6):
            last = await write(f"cache/k{n}", b"v%d" % n)
        await cache.wait_for_version(last)
        assert cache.reconnects >= 1

        # Stop the replica the cache watches: it resumes on the other one from its last position.
        assert reader.target == address(a)
        await a.stop()
        for n in range(6, 9):
            last = await write(f"cache/k{n}", b"v%d" % n)
        last = await write("cache/k0", b"again")
        await cache.wait_for_version(last, timeout_s=10.0)
        assert reader.target == address(b)

        # Every change exactly once, in log order per key and per partition.
        by_key: dict[str, list[tuple[bytes, bool]]] = {}
        for key, value, deleted in expected:
            by_key.setdefault(key, []).append((value, deleted))
        seen_by_key: dict[str, list[tuple[bytes, bool]]] = {}
        for c in seen:
            seen_by_key.setdefault(c.key, []).append((c.value, c.deleted))
        assert seen_by_key == by_key
        assert len({c.version for c in seen}) == len(seen) == len(expected)
        for partition in {c.version.partition for c in seen}:
            offsets = [c.version.offset for c in seen if c.version.partition == partition]
            assert offsets == sorted(offsets)
        assert dict(cache.items()).keys() == {f"cache/k{n}" for n in range(9)}
        assert cache.get("cache/k0").value == b"again"  # type: ignore[union-attr]
    finally:
        await cache.close()
        await reader.close()
        await writer.close()


async def test_cache_read_your_writes_through_wait_for_version(tide_replica) -> None:
    service, _ = await tide_replica()
    async with TideClient(address(service)) as client, TideCache(client, "ryw/") as cache:
        written = await client.put("ryw/x", b"1")
        await cache.wait_for_version(written.version)
        assert cache.get("ryw/x").value == b"1"  # type: ignore[union-attr]
        with pytest.raises(DeadlineExceeded):
            await cache.wait_for_version(Version(written.version.partition, written.version.offset + 50), 0.2)
    await wait_for(lambda: cache._task is None)


async def test_typed_helpers_round_trip(tide_replica) -> None:
    service, _ = await tide_replica()
    session, subject = "ps-" + "a" * 32, "ps-" + "b" * 32
    streams = [{"stream_id": "eeg-0", "modality": "EEG", "channels": ["C3", "C4"], "rate_hz": 250.0}]
    async with TideClient(address(service)) as client:
        assert await tide_client.get_session(client, session) is None
        await tide_client.put_session(client, session, subject, streams)
        record = await tide_client.get_session(client, session)
        assert record == tide_client.SessionRecord(subject, streams)
        raw = await client.get(f"sessions/{session}")
        assert raw is not None and raw.content_type == "application/json"

        await tide_client.set_active_model(client, "sleep-staging", "stager", "3")
        assert await tide_client.get_active_model(client, "sleep-staging") == tide_client.ActiveModel("stager", "3")
        assert await client.get("models/active/sleep-staging") is not None

        baseline = {"alpha_power": 1.5, "channels": ["C3"]}
        await tide_client.put_calibration(client, subject, "EEG", baseline)
        assert await tide_client.get_calibration(client, subject, "EEG") == baseline
        assert await client.get(f"calibration/{subject}/EEG") is not None
        assert await tide_client.get_calibration(client, subject, "ECG") is None

        with pytest.raises(InvalidArgument):
            await tide_client.put_calibration(client, "a/b", "EEG", baseline)


async def test_cache_reloads_when_the_replica_feed_no_longer_holds_its_position(tide_replica) -> None:
    service, _ = await tide_replica(feed_length=2, kafka_topic_partitions=1)
    async with TideClient(address(service)) as client:
        await client.put("f/a", b"0")
        cache = TideCache(client, "f/", retry_delay_s=0.05)
        await cache._load()  # loaded, but not following yet
        for n in range(4):
            last = await client.put(f"f/k{n}", b"%d" % n)
        await client.delete("f/a")
        last = (await client.put("f/k0", b"new")).version
        # Follow from the loaded position: Watch fails (the feed was truncated past it) and the cache reloads.
        cache._task = asyncio.create_task(cache._follow())
        try:
            await cache.wait_for_version(last)
            assert cache.reloads == 1 and cache.get("f/a") is None
            assert [(k, e.value) for k, e in cache.items()] == [
                ("f/k0", b"new"),
                ("f/k1", b"1"),
                ("f/k2", b"2"),
                ("f/k3", b"3"),
            ]
        finally:
            await cache.close()
