"""The session registry: ingest records every session's streams in Tide, at sessions/<session pseudonym>, with the
subject's pseudonym and each stream's layout, so any node can learn what a session carries.

Off the ack path: `note` (called once a chunk is acknowledged) is a set lookup; new streams wait in a bounded
queue and one worker writes them with a read-merge-compare-and-set, so ingest replicas writing the same session
never lose each other's streams. Only pseudonyms and layouts are stored: no raw ids, no signal values.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge

from clisonix.signal.v1 import signal_pb2
from services.common.chunks import modality_name
from services.common.errors import ClisonixError
from services.common.metrics import PREFIX, ServiceMetrics
from services.tide.client import TideClient, add_session_streams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistryMetrics:
    streams_registered_total: Counter
    registry_failures_total: Counter
    registry_pending: Gauge

    @classmethod
    def create(cls, metrics: ServiceMetrics) -> RegistryMetrics:
        registry = metrics.registry
        return cls(
            streams_registered_total=Counter(
                f"{PREFIX}_ingest_session_streams_registered", "Streams recorded in Tide's session registry",
                registry=registry,
            ),
            registry_failures_total=Counter(
                f"{PREFIX}_ingest_session_registry_failures", "Session registry writes that failed (retried later)",
                registry=registry,
            ),
            registry_pending=Gauge(
                f"{PREFIX}_ingest_session_registry_pending", "Streams waiting to be recorded in Tide",
                registry=registry,
            ),
        )  # fmt: skip


def stream_layout(chunk: signal_pb2.SignalChunk) -> dict[str, Any]:
    """What the registry records of a stream: its id and the layout that may not change within it."""
    return {
        "stream_id": chunk.stream_id,
        "modality": modality_name(chunk.modality),
        "nominal_rate_hz": chunk.nominal_rate_hz,
        "sample_format": signal_pb2.SampleFormat.Name(chunk.sample_format),
        "channel_names": list(chunk.channel_names),
        "channel_units": list(chunk.channel_units),
    }


class SessionRegistry:
    """Streams noted by this ingest process and not yet in Tide, and the worker that writes them.

    max_pending: streams waiting at most (more are noted again with their next chunk); max_known: streams
    remembered as registered (the oldest are forgotten first; registering one again changes nothing).
    """

    def __init__(
        self,
        client: TideClient,
        metrics: RegistryMetrics,
        *,
        max_pending: int = 10_000,
        max_known: int = 100_000,
        retry_delay_s: float = 1.0,
    ) -> None:
        self.client = client
        self.metrics = metrics
        self.max_pending = max_pending
        self.max_known = max_known
        self.retry_delay_s = retry_delay_s
        # (session, stream) -> (subject, layout), in arrival order.
        self._pending: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
        self._known: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._wake = asyncio.Event()

    def note(self, chunk: signal_pb2.SignalChunk) -> None:
        """Queues the chunk's stream for the registry unless it is known or queued (chunk ids are pseudonyms)."""
        key = (chunk.session_id, chunk.stream_id)
        if key in self._known or key in self._pending or len(self._pending) >= self.max_pending:
            return
        self._pending[key] = (chunk.subject_id, stream_layout(chunk))
        self.metrics.registry_pending.set(len(self._pending))
        self._wake.set()

    def registered(self, session: str, stream: str) -> bool:
        return (session, stream) in self._known

    async def run(self, stop: asyncio.Event) -> None:
        """Writes queued streams, one session at a time, until `stop` is set."""
        while not stop.is_set():
            if not self._pending:
                self._wake.clear()
                stopping = asyncio.create_task(stop.wait())
                waking = asyncio.create_task(self._wake.wait())
                await asyncio.wait([stopping, waking], return_when=asyncio.FIRST_COMPLETED)
                for task in (stopping, waking):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                continue
            session = next(iter(self._pending))[0]
            batch = {k: v for k, v in self._pending.items() if k[0] == session}
            subject = next(iter(batch.values()))[0]
            try:
                await add_session_streams(self.client, session, subject, [layout for _, layout in batch.values()])
            except ClisonixError as exc:
                self.metrics.registry_failures_total.inc()
                log.warning("session registry write failed; retrying", extra={"fields": {"reason": exc.reason}})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.retry_delay_s)
                continue
            for key in batch:
                self._pending.pop(key, None)
                self._known[key] = None
            while len(self._known) > self.max_known:
                self._known.popitem(last=False)
            self.metrics.streams_registered_total.inc(len(batch))
            self.metrics.registry_pending.set(len(self._pending))
