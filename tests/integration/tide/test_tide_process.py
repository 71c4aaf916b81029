"""A replica process killed with SIGKILL comes back from its snapshot plus the log's tail: every acknowledged
write is there and its digest equals another replica's at the same offsets."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import IO, Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clisonix.tide.v1 import tide_pb2, tide_pb2_grpc
from services.tide.api import SERVICE_NAME
from tests.conftest import REPO
from tests.helpers import wait_for
from tests.integration.tide.test_tide import converged

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_replica(env: dict[str, str], log: IO[bytes]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.tide", cwd=REPO, env=env, stdout=log, stderr=log
    )


@pytest.fixture
def replica_log(tmp_path: Path) -> Iterator[IO[bytes]]:
    """Where the replica processes write their logs (read back by the test)."""
    with open(tmp_path / "replica.log", "w+b") as log:
        yield log


async def wait_serving(port: int, process: asyncio.subprocess.Process, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            assert process.returncode is None, "replica process exited"
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            assert time.monotonic() < deadline, "replica never became SERVING"
            await asyncio.sleep(0.1)


@pytest.fixture
async def processes() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    started: list[asyncio.subprocess.Process] = []
    yield started
    for process in started:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_sigkilled_replica_restarts_from_its_snapshot_without_losing_acknowledged_writes(
    tide_settings: Callable[..., Any], tide_replica, processes, replica_log: IO[bytes], tmp_path: Path
) -> None:
    settings = tide_settings()
    port = free_port()
    snapshot = tmp_path / "tide.sqlite"
    env = {
        **os.environ,
        "CLISONIX_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "CLISONIX_TOPIC_LOG": settings.topic_log,
        "CLISONIX_KAFKA_TOPIC_PARTITIONS": "3",
        "CLISONIX_GRPC_HOST": "127.0.0.1",
        "CLISONIX_GRPC_PORT": str(port),
        "CLISONIX_METRICS_HOST": "127.0.0.1",
        "CLISONIX_METRICS_PORT": "0",
        "CLISONIX_SNAPSHOT_PATH": str(snapshot),
        "CLISONIX_SNAPSHOT_INTERVAL_SECONDS": "0.2",
        "CLISONIX_METRICS_INTERVAL_SECONDS": "0.1",
        "CLISONIX_LOG_FORMAT": "text",
        "CLISONIX_ENERGY_SOURCE": "estimate",
    }
    processes.append(await start_replica(env, replica_log))
    await wait_serving(port, processes[-1])
    _, reference = await tide_replica()
    acknowledged: dict[str, tuple[bytes, tide_pb2.Version]] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = tide_pb2_grpc.TideServiceStub(channel)
        for n in range(10):
            reply = await stub.Put(tide_pb2.PutRequest(key=f"k/{n}", value=bytes([n])))
            acknowledged[f"k/{n}"] = (bytes([n]), reply.version)
    await wait_for(snapshot.is_file)
    # Written while the replica is down: only the log's tail has them.
    for n in range(10, 15):
        reply = await reference.Put(tide_pb2.PutRequest(key=f"k/{n}", value=bytes([n])))
        acknowledged[f"k/{n}"] = (bytes([n]), reply.version)
    processes[-1].send_signal(signal.SIGKILL)
    await processes[-1].wait()

    processes.append(await start_replica(env, replica_log))
    await wait_serving(port, processes[-1])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = tide_pb2_grpc.TideServiceStub(channel)
        for key, (value, version) in acknowledged.items():
            got = await stub.Get(tide_pb2.GetRequest(key=key, min_version=version))
            assert got.outcome == tide_pb2.OUTCOME_APPLIED and got.entry.value == value, key
        await converged([stub, reference])
    replica_log.flush()
    replica_log.seek(0)
    assert b"from_snapshot=True" in replica_log.read()  # the restart did not replay the whole log
