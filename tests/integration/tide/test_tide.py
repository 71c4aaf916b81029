"""Tide replicas on the real broker with real gRPC: write semantics, read-your-writes across replicas, equal
digests at equal offsets after concurrent writers, a linearizable history, Watch, and restart from a snapshot."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clisonix.tide.v1 import tide_pb2, tide_pb2_grpc
from services.tide import snapshots
from services.tide.api import SERVICE_NAME
from services.tide.linearizability import Operation, check
from services.tide.state import Command, Put, TideState
from tests.helpers import wait_for

pytestmark = pytest.mark.integration


async def digests(stub: tide_pb2_grpc.TideServiceStub) -> dict[int, tuple[int, str]]:
    response = await stub.Digest(tide_pb2.DigestRequest())
    return {d.partition: (d.applied.offset, d.sha256) for d in response.partitions}


def vt(version: tide_pb2.Version) -> tuple[int, int]:
    return (version.partition, version.offset)


async def converged(stubs: list[tide_pb2_grpc.TideServiceStub], timeout_s: float = 20.0) -> dict[int, tuple[int, str]]:
    """Polls until every replica reports the same (applied offset, digest) per partition; returns them."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = [await digests(stub) for stub in stubs]
        if all(s == seen[0] for s in seen):
            return seen[0]
        assert time.monotonic() < deadline, f"replicas did not converge: {seen}"
        await asyncio.sleep(0.05)


async def test_put_get_cas_delete_list_on_one_replica(tide_replica) -> None:
    _, stub = await tide_replica()
    put = await stub.Put(tide_pb2.PutRequest(key="dev/a", value=b"1", content_type="text/plain"))
    assert put.outcome == tide_pb2.OUTCOME_APPLIED and put.key_version == put.version
    assert put.applied.offset > put.version.offset
    got = await stub.Get(tide_pb2.GetRequest(key="dev/a", min_version=put.version))
    assert got.outcome == tide_pb2.OUTCOME_APPLIED and got.entry.value == b"1" and got.entry.version == put.version

    stale = tide_pb2.Version(partition=put.version.partition, offset=put.version.offset + 1000)
    conflict = await stub.CompareAndSet(tide_pb2.CompareAndSetRequest(key="dev/a", expected=stale, value=b"x"))
    assert conflict.outcome == tide_pb2.OUTCOME_CAS_CONFLICT and conflict.key_version == put.version
    ok = await stub.CompareAndSet(tide_pb2.CompareAndSetRequest(key="dev/a", expected=put.version, value=b"2"))
    assert ok.outcome == tide_pb2.OUTCOME_APPLIED
    created = await stub.CompareAndSet(tide_pb2.CompareAndSetRequest(key="dev/b", expect_absent=True, value=b"3"))
    assert created.outcome == tide_pb2.OUTCOME_APPLIED

    listed = await stub.List(tide_pb2.ListRequest(prefix="dev/", min_versions=[created.version]))
    assert [(e.key, e.value) for e in listed.entries] == [("dev/a", b"2"), ("dev/b", b"3")]

    gone = await stub.Delete(tide_pb2.DeleteRequest(key="dev/a"))
    assert gone.outcome == tide_pb2.OUTCOME_APPLIED and not gone.HasField("key_version")
    again = await stub.Delete(tide_pb2.DeleteRequest(key="dev/a"))
    assert again.outcome == tide_pb2.OUTCOME_NOT_FOUND
    missing = await stub.Get(tide_pb2.GetRequest(key="dev/a", min_version=again.version))
    assert missing.outcome == tide_pb2.OUTCOME_NOT_FOUND


async def test_retried_command_id_answers_the_first_result(tide_replica) -> None:
    _, stub = await tide_replica()
    request = tide_pb2.CompareAndSetRequest(key="k", expect_absent=True, value=b"1", command_id="retry-1")
    first = await stub.CompareAndSet(request)
    second = await stub.CompareAndSet(request)
    assert first.outcome == second.outcome == tide_pb2.OUTCOME_APPLIED
    assert first.version == second.version


async def test_invalid_requests_and_unreached_versions_map_to_status_codes(tide_replica) -> None:
    _, stub = await tide_replica(max_value_bytes=8, read_wait_seconds=0.3)
    with pytest.raises(grpc.aio.AioRpcError) as big:
        await stub.Put(tide_pb2.PutRequest(key="k", value=b"x" * 9))
    assert big.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as bad_cas:
        await stub.CompareAndSet(tide_pb2.CompareAndSetRequest(key="k", value=b"x"))
    assert bad_cas.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    put = await stub.Put(tide_pb2.PutRequest(key="k", value=b"x"))
    future = tide_pb2.Version(partition=put.version.partition, offset=put.version.offset + 100)
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await stub.Get(tide_pb2.GetRequest(key="k", min_version=future))
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Malformed versions: a negative offset, a partition the log does not have.
    for bad in (tide_pb2.Version(partition=0, offset=-1), tide_pb2.Version(partition=99, offset=0)):
        with pytest.raises(grpc.aio.AioRpcError) as malformed:
            await stub.Get(tide_pb2.GetRequest(key="k", min_version=bad))
        assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
    with pytest.raises(grpc.aio.AioRpcError) as malformed_cas:
        bad_expected = tide_pb2.Version(partition=0, offset=-5)
        await stub.CompareAndSet(tide_pb2.CompareAndSetRequest(key="k", expected=bad_expected, value=b"y"))
    assert malformed_cas.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A CAS on a key that does not exist, expecting a version: a conflict, and the key stays absent.
    unknown = await stub.CompareAndSet(tide_pb2.CompareAndSetRequest(key="nokey", expected=put.version, value=b"z"))
    assert unknown.outcome == tide_pb2.OUTCOME_CAS_CONFLICT and not unknown.HasField("key_version")
    assert (await stub.Get(tide_pb2.GetRequest(key="nokey", min_version=unknown.version))).outcome == (
        tide_pb2.OUTCOME_NOT_FOUND
    )


async def test_read_your_writes_across_replicas_with_the_version_token(tide_replica) -> None:
    _, a = await tide_replica()
    _, b = await tide_replica()
    for n in range(5):
        written = await a.Put(tide_pb2.PutRequest(key=f"ryw/{n}", value=str(n).encode()))
        # B may lag A, but a read with the version waits for it.
        read = await b.Get(tide_pb2.GetRequest(key=f"ryw/{n}", min_version=written.version))
        assert read.outcome == tide_pb2.OUTCOME_APPLIED and read.entry.value == str(n).encode()
        assert read.entry.version == written.version
        assert read.applied.offset > written.version.offset


async def test_concurrent_writers_leave_equal_digests_at_equal_offsets_and_a_linearizable_history(
    tide_replica,
) -> None:
    replicas = [await tide_replica() for _ in range(3)]
    stubs = [stub for _, stub in replicas]
    keys = [f"counter/{i}" for i in range(3)]
    history: list[Operation] = []
    t0 = time.monotonic()

    def now() -> float:
        return time.monotonic() - t0

    async def client(name: str, stub: tide_pb2_grpc.TideServiceStub, seed: int) -> None:
        rng = random.Random(seed)
        for step in range(8):
            key = rng.choice(keys)
            start = now()
            got = await stub.Get(tide_pb2.GetRequest(key=key))
            if got.outcome == tide_pb2.OUTCOME_APPLIED:
                history.append(
                    Operation(name, key, "get", start, now(), value=got.entry.value, version=vt(got.entry.version))
                )
            else:
                history.append(Operation(name, key, "get", start, now(), value=None))
            value = f"{name}-{step}".encode()
            start = now()
            if got.outcome == tide_pb2.OUTCOME_APPLIED:
                expected = vt(got.entry.version)
                request = tide_pb2.CompareAndSetRequest(key=key, expected=got.entry.version, value=value)
            else:
                expected = None
                request = tide_pb2.CompareAndSetRequest(key=key, expect_absent=True, value=value)
            written = await stub.CompareAndSet(request)
            history.append(
                Operation(
                    name,
                    key,
                    "cas",
                    start,
                    now(),
                    value=value,
                    version=vt(written.version),
                    expected=expected,
                    applied=written.outcome == tide_pb2.OUTCOME_APPLIED,
                )
            )

    await asyncio.gather(*(client(f"c{i}", stubs[i % 3], i) for i in range(6)))
    # Gets without a minimum version answer from the replica's applied state and may be stale by design, so the
    # linearizable history is the writes'; a read may only show what some write wrote.
    writes = [op for op in history if op.kind == "cas"]
    assert check(writes), "the recorded compare-and-set history has no linearization"
    written = {(op.value, op.version) for op in writes if op.applied}
    assert all((op.value, op.version) in written for op in history if op.kind == "get" and op.value is not None)

    await converged(stubs)
    # Every replica applied exactly the clients' compare-and-sets (beside the replicas' own digest reports).
    cas = sum(1 for op in history if op.kind == "cas")
    for service, _ in replicas:
        registry = service.runtime.metrics.registry
        outcomes = ("applied", "cas_conflict", "duplicate")
        applied = sum(registry.get_sample_value("clisonix_tide_commands_total", {"outcome": o}) or 0 for o in outcomes)
        assert applied == cas


async def test_watch_streams_changes_in_order_from_a_version(tide_replica) -> None:
    _, stub = await tide_replica()
    first = await stub.Put(tide_pb2.PutRequest(key="w/a", value=b"1"))
    call = stub.Watch(tide_pb2.WatchRequest(prefix="w/", from_versions=[first.version]))
    await stub.Put(tide_pb2.PutRequest(key="other", value=b"ignored"))
    second = await stub.Put(tide_pb2.PutRequest(key="w/a", value=b"2"))
    await stub.Delete(tide_pb2.DeleteRequest(key="w/a"))
    seen: list[tide_pb2.Change] = []
    async for change in call:
        seen.append(change)
        if len(seen) == 3:
            break
    call.cancel()
    assert [(c.key, c.value, c.deleted) for c in seen] == [
        ("w/a", b"1", False),
        ("w/a", b"2", False),
        ("w/a", b"", True),
    ]
    assert seen[0].version == first.version and seen[1].version == second.version


async def test_restart_from_a_snapshot_replays_only_the_tail_and_keeps_the_digest(tide_replica, tmp_path: Path) -> None:
    snapshot = tmp_path / "tide.sqlite"
    service, stub = await tide_replica(snapshot_path=snapshot)
    for n in range(6):
        await stub.Put(tide_pb2.PutRequest(key=f"s/{n}", value=bytes([n])))
    before = await digests(stub)
    await service.stop()  # writes the snapshot on the way out
    assert snapshot.is_file()
    _, writer = await tide_replica()
    tail = await writer.Put(tide_pb2.PutRequest(key="s/tail", value=b"t"))
    restarted, again = await tide_replica(snapshot_path=snapshot)
    assert restarted.replica is not None
    for p, (offset, _) in before.items():
        assert restarted.replica.state.partition(p).applied >= offset
    got = await again.Get(tide_pb2.GetRequest(key="s/tail", min_version=tail.version))
    assert got.entry.value == b"t"
    await converged([writer, again])


async def test_a_log_younger_than_the_snapshot_is_reported_not_papered_over(tide_replica, tmp_path: Path) -> None:
    snapshot = tmp_path / "tide.sqlite"
    service, stub = await tide_replica(snapshot_path=snapshot)
    topic = service.settings.topic_log
    # A state that has applied far more than the (fresh) log holds: as after the broker restarted empty.
    state = TideState()
    state.apply(0, 40, Command("c1", "old", Put(b"1")))
    snapshots.save(state, snapshot, topic)
    restarted, stale = await tide_replica(snapshot_path=snapshot)
    assert restarted.replica is not None
    await wait_for(lambda: restarted.replica is not None and restarted.replica.diverged is not None)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{restarted.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        await wait_for_serving(health, SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stale.Put(tide_pb2.PutRequest(key="new", value=b"x"))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    gauge = restarted.runtime.metrics.registry.get_sample_value("clisonix_tide_log_behind_snapshot")
    assert gauge == 1
    # The healthy replica of the same log is unaffected.
    assert (await stub.Put(tide_pb2.PutRequest(key="new", value=b"x"))).outcome == tide_pb2.OUTCOME_APPLIED


async def wait_for_serving(health: health_pb2_grpc.HealthStub, service: str, status: int, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while (await health.Check(health_pb2.HealthCheckRequest(service=service))).status != status:
        assert time.monotonic() < deadline, f"health of {service} never became {status}"
        await asyncio.sleep(0.05)


async def test_metrics_show_write_latency_lag_and_snapshot_size(tide_replica, tmp_path: Path) -> None:
    snapshot = tmp_path / "tide.sqlite"
    service, stub = await tide_replica(snapshot_path=snapshot)
    registry = service.runtime.metrics.registry
    for n in range(5):
        await stub.Put(tide_pb2.PutRequest(key=f"m/{n}", value=b"v"))

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels or None)

    # Every acknowledged write was appended and then applied here, and its latency observed.
    assert sample("clisonix_tide_write_latency_seconds_count") == 5
    assert (sample("clisonix_tide_apply_seconds_count") or 0) >= 1
    assert service.replica is not None
    lags = [sample("clisonix_tide_lag_records", partition=str(p)) for p in service.replica.partitions]
    await wait_for(
        lambda: all(
            sample("clisonix_tide_lag_records", partition=str(p)) == 0
            for p in service.replica.partitions  # type: ignore[union-attr]
        )
    )
    assert all(lag is None or lag >= 0 for lag in lags)
    await service.replica.save_snapshot_in_background()
    service.replica.refresh_metrics()
    assert sample("clisonix_tide_snapshot_bytes") == snapshot.stat().st_size > 0
    assert 0 <= (sample("clisonix_tide_snapshot_age_seconds") or -1) < 60


async def test_batch_write_answers_each_command_in_order_and_rejects_a_bad_batch_whole(tide_replica) -> None:
    service, stub = await tide_replica(max_batch_commands=8)
    created = await stub.Put(tide_pb2.PutRequest(key="b/x", value=b"0"))
    commands = [
        tide_pb2.Command(command_id="c1", key="b/x", put=tide_pb2.Command.Put(value=b"1")),
        # Expects the version b/x had before the batch: c1 moved it, so this conflicts.
        tide_pb2.Command(key="b/x", cas=tide_pb2.Command.CompareAndSet(expected=created.version, value=b"2")),
        tide_pb2.Command(key="b/y", cas=tide_pb2.Command.CompareAndSet(expect_absent=True, value=b"3")),
        tide_pb2.Command(key="b/missing", delete=tide_pb2.Command.Delete()),
        tide_pb2.Command(command_id="c1", key="b/x", put=tide_pb2.Command.Put(value=b"again")),  # a retry of c1
    ]
    reply = await stub.BatchWrite(tide_pb2.BatchWriteRequest(commands=commands))
    outcomes = [r.outcome for r in reply.results]
    assert outcomes == [
        tide_pb2.OUTCOME_APPLIED,
        tide_pb2.OUTCOME_CAS_CONFLICT,
        tide_pb2.OUTCOME_APPLIED,
        tide_pb2.OUTCOME_NOT_FOUND,
        tide_pb2.OUTCOME_APPLIED,
    ]
    assert reply.results[0].command_id == "c1" and all(r.command_id for r in reply.results)
    assert reply.results[4].version == reply.results[0].version  # the retry answers the first record's result
    got = await stub.Get(tide_pb2.GetRequest(key="b/x", min_version=reply.results[4].version))
    assert got.entry.value == b"1" and got.entry.version == reply.results[0].version

    before = await digests(stub)
    bad_batches = {
        "at least one": [],
        "over 8": [tide_pb2.Command(key=f"b/{i}", put=tide_pb2.Command.Put(value=b"v")) for i in range(9)],
        "command 1": [
            tide_pb2.Command(key="b/ok", put=tide_pb2.Command.Put(value=b"v")),
            tide_pb2.Command(key="b/nothing"),  # no operation
        ],
        "value is": [
            tide_pb2.Command(key="b/ok", put=tide_pb2.Command.Put(value=b"v")),
            tide_pb2.Command(
                key="b/big", put=tide_pb2.Command.Put(value=b"x" * (service.settings.max_value_bytes + 1))
            ),
        ],
    }
    for expected_detail, batch in bad_batches.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.BatchWrite(tide_pb2.BatchWriteRequest(commands=batch))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert expected_detail in (caught.value.details() or ""), caught.value.details()
    # Nothing of a rejected batch was appended: a marker write lands right after the good batch's records.
    marker = await stub.Put(tide_pb2.PutRequest(key="b/x", value=b"marker"))
    partition = marker.version.partition
    assert marker.version.offset == before[partition][0]


async def test_watch_batches_delivers_every_change_once_in_log_order(tide_replica) -> None:
    _, stub = await tide_replica()
    start = await stub.Put(tide_pb2.PutRequest(key="wb/start", value=b"s"))
    call = stub.WatchBatches(
        tide_pb2.WatchRequest(prefix="wb/", from_versions=[tide_pb2.Version(partition=p, offset=0) for p in range(3)])
    )
    commands = [tide_pb2.Command(key=f"wb/{i % 7}", put=tide_pb2.Command.Put(value=str(i).encode())) for i in range(60)]
    reply = await stub.BatchWrite(tide_pb2.BatchWriteRequest(commands=commands))
    expected = {vt(start.version)} | {vt(r.version) for r in reply.results}
    seen: list[tide_pb2.Change] = []
    async with asyncio.timeout(20):
        async for batch in call:
            assert batch.changes, "a ChangeBatch is never empty"
            seen.extend(batch.changes)
            if {vt(c.version) for c in seen} >= expected:
                break
    call.cancel()
    assert len(seen) == len({vt(c.version) for c in seen}), "a change was delivered twice"
    for p in range(3):
        offsets = [c.version.offset for c in seen if c.version.partition == p]
        assert offsets == sorted(offsets)
    by_version = {vt(c.version): c.value for c in seen}
    assert [by_version[vt(r.version)] for r in reply.results] == [c.put.value for c in commands]
