"""A replica whose state differs from the others' at the same offset finds out within seconds, on its own: the
replicas' digest reports disagree with it, it turns NOT_SERVING, refuses reads and writes, says so in an error log
and a metric; the others go on and name it. `clisonix tide-check` shows the same from outside."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clisonix.tide.v1 import tide_pb2
from services.common.broker import free_port
from services.tide.admin import check_replicas
from services.tide.api import SERVICE_NAME
from tests.conftest import REPO
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

FAST_REPORTS = {"digest_report_interval_seconds": 0.2, "metrics_interval_seconds": 0.1}


async def health(service) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        return reply.status


async def wait_health(service, status: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while await health(service) != status:
        assert time.monotonic() < deadline, f"health never became {status}"
        await asyncio.sleep(0.05)


def sample(service, name: str, labels: dict[str, str] | None = None) -> float:
    return service.runtime.metrics.registry.get_sample_value(name, labels or {}) or 0.0


async def test_a_replica_that_applied_the_log_differently_stops_serving_and_the_others_name_it(
    tide_replica, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    good = [await tide_replica(replica_id=f"good-{i}", **FAST_REPORTS) for i in range(2)]
    # A misconfigured replica: its value limit differs, so it skips a command the others apply.
    odd_service, odd = await tide_replica(replica_id="odd", max_value_bytes=16, **FAST_REPORTS)
    services = [s for s, _ in good] + [odd_service]
    targets = [f"127.0.0.1:{s.grpc_port}" for s in services]
    writer = good[0][1]

    for n in range(5):
        await writer.Put(tide_pb2.PutRequest(key=f"k/{n}", value=b"small"))
    await wait_for(lambda: sample(odd_service, "clisonix_tide_digest_checks_total", {"result": "agree"}) >= 2)
    assert (await check_replicas(targets)).agree

    written = time.monotonic()
    big = await writer.Put(tide_pb2.PutRequest(key="big", value=b"x" * 100))
    assert big.outcome == tide_pb2.OUTCOME_APPLIED
    await wait_for(lambda: odd_service.replica.in_minority, timeout_s=15)
    detected_s = time.monotonic() - written
    print(f"odd replica in the minority {detected_s:.2f} s after the write it applied differently")
    assert detected_s < 10, f"found after {detected_s:.1f} s"

    await wait_health(odd_service, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert sample(odd_service, "clisonix_tide_in_minority") == 1
    assert sample(odd_service, "clisonix_tide_peers_disagreeing") == 2
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await odd.Get(tide_pb2.GetRequest(key="k/0"))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError) as refused_write:
        await odd.Put(tide_pb2.PutRequest(key="k/9", value=b"v"))
    assert refused_write.value.code() == grpc.StatusCode.UNAVAILABLE

    # The two others go on serving, each naming the odd one.
    await wait_for(lambda: all(sample(s, "clisonix_tide_peers_disagreeing") == 1 for s, _ in good), timeout_s=15)
    for service, stub in good:
        assert await health(service) == health_pb2.HealthCheckResponse.SERVING
        assert not service.replica.in_minority
        assert (await stub.Get(tide_pb2.GetRequest(key="big", min_version=big.version))).entry.value == b"x" * 100
        digest = await stub.Digest(tide_pb2.DigestRequest())
        assert {c.replica for c in digest.peers if not c.agrees} == {"odd"}
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("replica states differ at equal offsets" in m for m in errors)
    assert any("disagrees with the other replicas'" in m for m in errors)

    report = await check_replicas(targets)
    assert not report.agree and report.disagreeing == [big.version.partition]
    assert [r.in_minority for r in report.replicas] == [False, False, True]

    env = {**os.environ, "CLISONIX_TIDE_TARGETS": ",".join(targets)}
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.cli", "tide-check"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "DISAGREE" in result.stdout and "odd" in result.stdout


async def test_tide_check_says_the_replicas_agree_and_names_one_it_cannot_reach(tide_replica) -> None:
    replicas = [await tide_replica(replica_id=f"r{i}", **FAST_REPORTS) for i in range(2)]
    targets = [f"127.0.0.1:{s.grpc_port}" for s, _ in replicas]
    for n in range(6):
        await replicas[n % 2][1].Put(tide_pb2.PutRequest(key=f"k/{n}", value=b"v"))
    report = await check_replicas(targets)
    assert report.agree and report.offsets and all(r.digests is not None for r in report.replicas)
    assert len({tuple(sorted(r.digests.items())) for r in report.replicas if r.digests}) == 1

    closed = free_port()
    report = await check_replicas([*targets, f"127.0.0.1:{closed}"], timeout_s=2)
    assert not report.agree and not report.disagreeing
    assert report.replicas[-1].error is not None and "UNAVAILABLE" in report.replicas[-1].error


async def test_clients_cannot_write_digest_reports(tide_replica) -> None:
    _, stub = await tide_replica()
    forged = tide_pb2.Command(command_id="c1")
    forged.digest_report.replica, forged.digest_report.applied, forged.digest_report.sha256 = "me", 0, "0" * 64
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.BatchWrite(tide_pb2.BatchWriteRequest(commands=[forged]))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "written by replicas" in (refused.value.details() or "")
