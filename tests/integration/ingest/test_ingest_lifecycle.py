"""Shutdown: health turns NOT_SERVING first, open streams get the acks they are owed and then UNAVAILABLE,
so a client resends the rest to another replica; nothing acknowledged is lost.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clisonix.signal.v1 import signal_pb2
from services.common.events import decode_event
from services.ingest.client import StreamClient
from tests.helpers import make_blocks, read_all, wait_for

pytestmark = pytest.mark.integration


async def test_stop_turns_not_serving_then_drains_open_streams(ingest_service, broker):
    first = await ingest_service()
    second = await ingest_service(topic_raw=first.settings.topic_raw)
    target = {"port": first.grpc_port}

    class FailoverClient(StreamClient):
        def _channel(self) -> grpc.aio.Channel:
            return grpc.aio.insecure_channel(f"127.0.0.1:{target['port']}")

    client = FailoverClient("unused", "session-drain", speed=20.0, reconnect_delay_s=0.1)
    run = asyncio.create_task(client.run(make_blocks(60)))
    await wait_for(lambda: client.progress.chunks_acked >= 10)

    seen: list[int] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{first.grpc_port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        seen.append((await watch.read()).status)
        stopping = asyncio.create_task(first.stop())
        seen.append((await watch.read()).status)
        watch.cancel()
    assert seen == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING]
    target["port"] = second.grpc_port  # the load balancer's next replica
    await asyncio.wait_for(stopping, 30)

    progress = await asyncio.wait_for(run, 60)
    assert progress.reconnects >= 1 and progress.chunks_acked == 60 and progress.rejected == 0
    records = await read_all(broker.bootstrap_servers, first.settings.topic_raw)
    assert {decode_event(signal_pb2.SignalChunk, r.value, r.headers)[0].sequence for r in records} == set(range(60))
