"""ServiceRuntime.run_task: a worker loop runs for the service's life, stops on shutdown, and a failure stops the
service."""

from __future__ import annotations

import asyncio

import pytest

from services.common.runtime import ServiceRuntime
from services.common.settings import ServiceSettings
from tests.helpers import wait_for


def runtime() -> ServiceRuntime:
    return ServiceRuntime(ServiceSettings(energy_source="estimate", drain_seconds=0))


async def test_task_runs_until_shutdown_then_stops_before_what_was_entered_earlier() -> None:
    service = runtime()
    order: list[str] = []
    service.lifecycle.stack.callback(order.append, "entered before")

    async def worker(stop: asyncio.Event) -> None:
        order.append("started")
        await stop.wait()
        order.append("stopped")

    task = service.run_task(worker, "worker")
    await wait_for(lambda: "started" in order)
    assert not task.done()
    await service.lifecycle.shutdown()
    assert task.done() and order == ["started", "stopped", "entered before"]


async def test_a_failed_task_stops_the_service() -> None:
    service = runtime()

    async def worker(stop: asyncio.Event) -> None:
        raise RuntimeError("boom")

    service.run_task(worker, "worker")
    await wait_for(service.lifecycle.stop.is_set, timeout_s=5)
    # Shutdown still runs, and the failure surfaces there too (the process exits non-zero).
    with pytest.raises(RuntimeError, match="boom"):
        await service.lifecycle.shutdown()
