"""Service lifecycle: SIGTERM/SIGINT set a stop flag; then health turns NOT_SERVING, work drains, and
everything entered into the exit stack closes in reverse order (gRPC server, consumer, producer, metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

log = logging.getLogger(__name__)


class Lifecycle:
    """Owns a service's stop flag, its shutdown steps and its exit stack.

    drain_s: the most time the drain steps get before closing goes on regardless.
    """

    def __init__(self, drain_s: float) -> None:
        self.drain_s = drain_s
        self.stop = asyncio.Event()
        self.stack = AsyncExitStack()
        self._not_serving: list[Callable[[], Awaitable[None]]] = []
        self._drains: list[Callable[[], Awaitable[None]]] = []

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT set the stop flag instead of killing the process."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)

    def on_not_serving(self, step: Callable[[], Awaitable[None]]) -> None:
        """A step run first on stop, e.g. health NOT_SERVING so load balancers stop routing here."""
        self._not_serving.append(step)

    def on_drain(self, step: Callable[[], Awaitable[None]]) -> None:
        """A step run after NOT_SERVING, bounded by drain_s, e.g. waiting for unacknowledged work."""
        self._drains.append(step)

    async def shutdown(self) -> None:
        """Runs the stop sequence: NOT_SERVING, drain (bounded), reverse-order close."""
        for step in self._not_serving:
            await step()
        if self._drains:
            try:
                await asyncio.wait_for(asyncio.gather(*(step() for step in self._drains)), self.drain_s)
            except TimeoutError:
                log.warning("drain timed out", extra={"fields": {"drain_s": self.drain_s}})
        await self.stack.aclose()

    async def run_until_stopped(self) -> None:
        """Waits for the stop flag, then shuts down."""
        try:
            await self.stop.wait()
        finally:
            log.info("stopping")
            with contextlib.suppress(asyncio.CancelledError):
                await self.shutdown()
            log.info("stopped")
