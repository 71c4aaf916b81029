"""The gRPC client of IngestService behind `clisonix stream`: paces a source's blocks, streams them as chunks,
keeps every unacked chunk, and after a broken connection or an ingest restart resends them in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np

from clisonix.signal.v1 import signal_pb2, signal_pb2_grpc
from services.common.chunks import SampleBlock, to_chunk

log = logging.getLogger(__name__)

# Status codes after which reconnecting and resending can succeed.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)


@dataclass
class StreamProgress:
    """What a streaming run has done so far; `ack_latencies_s` keeps the most recent acks' latencies."""

    started: float = field(default_factory=time.monotonic)
    chunks_sent: int = 0
    chunks_acked: int = 0
    samples_acked: int = 0
    duplicates: int = 0
    rejected: int = 0
    reconnects: int = 0
    throttled: int = 0
    rejections: dict[str, int] = field(default_factory=dict)
    ack_latencies_s: list[float] = field(default_factory=list)
    last_session_id: str = ""

    def latency_percentiles_ms(self) -> tuple[float, float]:
        """p50 and p99 ack latency in milliseconds over the kept acks (0, 0 before any ack)."""
        if not self.ack_latencies_s:
            return 0.0, 0.0
        p50, p99 = np.percentile(np.asarray(self.ack_latencies_s), [50, 99]) * 1000
        return float(p50), float(p99)

    def samples_per_second(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.samples_acked / elapsed if elapsed > 0 else 0.0


class _ResendLater(Exception):
    """Ingest asked for chunks to be sent again later (the client was over its rate)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(f"resend after {delay_s:.3f} s")
        self.delay_s = delay_s


class _AckTimeout(Exception):
    """Chunks were owed acks and none came for a while: the call is presumed dead."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"no ack for {timeout_s:g} s while chunks were unacknowledged")


class ReplayPacer:
    """When each block of a replay is due, in source seconds from the start of the replay.

    A block exists once its last sample does, so it is due at its end. Each stream keeps its own replay
    clock, advanced by its blocks' durations plus the gaps between them, so a clock reset in the recording
    (timestamps jumping back) or a long pause does not stall or rush the replay; gaps count up to max_gap_s.
    """

    def __init__(self, max_gap_s: float = 5.0) -> None:
        self.max_gap_s = max_gap_s
        self.first_time: float | None = None
        self.streams: dict[str, tuple[float, float]] = {}  # stream -> (due of its last block, its end time)

    def due_s(self, block: SampleBlock) -> float:
        start = block.first_sample_time_s
        if self.first_time is None:
            self.first_time = start
        previous = self.streams.get(block.spec.stream_id)
        if previous is None:
            due_before, end_before = 0.0, self.first_time
        else:
            due_before, end_before = previous
        gap = min(max(start - end_before, 0.0), self.max_gap_s)
        due = due_before + gap + block.duration_s
        self.streams[block.spec.stream_id] = (due, start + block.duration_s)
        return due


class StreamClient:
    """Streams blocks to an ingest server and returns once every chunk is acknowledged or rejected.

    target: "host:port". session_id / subject_id: sent as they are; ingest pseudonymises them.
    speed: replay pace relative to real time (1.0 real time, 10.0 ten times faster); None sends as fast as
    acks allow (live sources pace themselves). max_unacked: chunks in flight before waiting for acks.
    token: bearer token, when ingest requires one. root_certificates: PEM of the CA for TLS (None: plaintext).
    ack_timeout_s: with chunks unacknowledged and no ack for this long, the call is dropped and they are resent.
    """

    def __init__(
        self,
        target: str,
        session_id: str,
        subject_id: str = "",
        speed: float | None = 1.0,
        max_unacked: int = 32,
        token: str | None = None,
        root_certificates: bytes | None = None,
        reconnect_delay_s: float = 0.2,
        max_reconnect_delay_s: float = 5.0,
        give_up_after_s: float = 120.0,
        ack_timeout_s: float = 30.0,
        keep_latencies: int = 100_000,
    ) -> None:
        self.target = target
        self.session_id = session_id
        self.subject_id = subject_id
        self.speed = speed
        self.max_unacked = max_unacked
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.root_certificates = root_certificates
        self.reconnect_delay_s = reconnect_delay_s
        self.max_reconnect_delay_s = max_reconnect_delay_s
        self.give_up_after_s = give_up_after_s
        self.ack_timeout_s = ack_timeout_s
        self.keep_latencies = keep_latencies
        self.progress = StreamProgress()
        # Sent but not acknowledged, in send order: resent after a reconnect.
        self.unacked: OrderedDict[tuple[str, int], tuple[signal_pb2.SignalChunk, float]] = OrderedDict()
        self._sequences: dict[str, int] = {}
        self._changed = asyncio.Condition()
        self._source_done = False

    def _channel(self) -> grpc.aio.Channel:
        if self.root_certificates is None:
            return grpc.aio.insecure_channel(self.target)
        return grpc.aio.secure_channel(self.target, grpc.ssl_channel_credentials(self.root_certificates))

    def chunk_of(self, block: SampleBlock) -> signal_pb2.SignalChunk:
        """The next chunk of the block's stream (sequence numbers per stream, from 0)."""
        stream_id = block.spec.stream_id
        sequence = self._sequences.get(stream_id, 0)
        self._sequences[stream_id] = sequence + 1
        return to_chunk(block, self.session_id, sequence, self.subject_id)

    async def _paced_chunks(self, blocks: Iterator[SampleBlock], queue: asyncio.Queue[object], live: bool) -> None:
        """Reads blocks (a live source's in a thread, as device reads block) and queues chunks when due."""
        pacer = ReplayPacer()
        wall_start = time.monotonic()
        try:
            while True:
                block = await asyncio.to_thread(next, blocks, None) if live else next(blocks, None)
                if block is None:
                    break
                if self.speed is not None:
                    delay = wall_start + pacer.due_s(block) / self.speed - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await queue.put(self.chunk_of(block))
        finally:
            await queue.put(None)

    async def run(
        self,
        blocks: Iterator[SampleBlock],
        on_progress: Callable[[StreamProgress], None] | None = None,
        live: bool = False,
    ) -> StreamProgress:
        """Streams every block; returns the final progress. Raises grpc.aio.AioRpcError on non-retryable
        errors (e.g. UNAUTHENTICATED) or when no connection succeeds for `give_up_after_s`.

        live: the blocks come from a device, so reading the next one may block (it is read in a thread);
        recordings and synthetic data are read on the event loop.
        """
        queue: asyncio.Queue[object] = asyncio.Queue(maxsize=self.max_unacked)
        reader = asyncio.create_task(self._paced_chunks(blocks, queue, live))
        feeder = asyncio.create_task(self._feed(queue))
        delay = self.reconnect_delay_s
        failing_since: float | None = None
        try:
            while not (self._source_done and not self.unacked):
                try:
                    await self._one_call(on_progress)
                    failing_since = None
                except _AckTimeout as exc:
                    self.progress.reconnects += 1
                    log.warning(
                        "no acks; reconnecting", extra={"fields": {"unacked": len(self.unacked), "why": str(exc)}}
                    )
                    continue
                except _ResendLater as later:
                    # Throttled: not a failure; the chunks are still unacked and go again in order.
                    self.progress.throttled += 1
                    await asyncio.sleep(later.delay_s)
                    continue
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in RETRYABLE:
                        raise
                    now = time.monotonic()
                    failing_since = failing_since or now
                    if now - failing_since > self.give_up_after_s:
                        raise
                    self.progress.reconnects += 1
                    log.warning(
                        "ingest call ended; reconnecting",
                        extra={"fields": {"code": exc.code().name, "unacked": len(self.unacked)}},
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.max_reconnect_delay_s)
                    continue
                delay = self.reconnect_delay_s
        finally:
            for task in (feeder, reader):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        return self.progress

    async def _feed(self, queue: asyncio.Queue[object]) -> None:
        """Moves due chunks into `unacked` while fewer than max_unacked are waiting for their acks."""
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.unacked) < self.max_unacked)
            item = await queue.get()
            async with self._changed:
                if item is None:
                    self._source_done = True
                else:
                    assert isinstance(item, signal_pb2.SignalChunk)
                    self.unacked[(item.stream_id, item.sequence)] = (item, time.monotonic())
                    self.progress.chunks_sent += 1
                self._changed.notify_all()
            if item is None:
                return

    async def _requests(self) -> AsyncIterator[signal_pb2.SignalChunk]:
        """One call's requests: every unacked chunk this call has not sent yet, in order, as it appears.

        Chunks left unacked by an earlier call come first; the call half-closes once the source is done
        and everything is answered, so it stays open for the last acks.
        """
        sent: set[tuple[str, int]] = set()
        while True:
            async with self._changed:
                await self._changed.wait_for(
                    lambda: any(key not in sent for key in self.unacked) or (self._source_done and not self.unacked)
                )
                due = [(key, chunk) for key, (chunk, _) in self.unacked.items() if key not in sent]
            if not due:
                return
            for key, chunk in due:
                sent.add(key)
                yield chunk

    async def _one_call(self, on_progress: Callable[[StreamProgress], None] | None) -> None:
        async with self._channel() as channel:
            stub = signal_pb2_grpc.IngestServiceStub(channel)
            call = stub.Stream(self._requests(), metadata=self.metadata)
            while True:
                try:
                    ack = await asyncio.wait_for(call.read(), self.ack_timeout_s)
                except TimeoutError:
                    if not self.unacked:
                        continue  # nothing owed: the source is just slow
                    # Chunks are owed but nothing came: give up on this call and resend on a new one.
                    call.cancel()
                    raise _AckTimeout(self.ack_timeout_s) from None
                if ack is grpc.aio.EOF:
                    return
                assert isinstance(ack, signal_pb2.IngestAck)
                self._on_ack(ack)
                async with self._changed:
                    self._changed.notify_all()
                if on_progress is not None:
                    on_progress(self.progress)

    def _on_ack(self, ack: signal_pb2.IngestAck) -> None:
        key = (ack.stream_id, ack.sequence)
        if ack.status == signal_pb2.ACK_STATUS_REJECTED and ack.retry_after_ms and key in self.unacked:
            raise _ResendLater(ack.retry_after_ms / 1000)
        entry = self.unacked.pop(key, None)
        if entry is None:
            return
        chunk, sent_at = entry
        progress = self.progress
        if ack.status == signal_pb2.ACK_STATUS_REJECTED:
            progress.rejected += 1
            name = grpc.StatusCode.UNKNOWN.name
            for code in grpc.StatusCode:
                if code.value[0] == ack.code:
                    name = code.name
            progress.rejections[name] = progress.rejections.get(name, 0) + 1
            log.warning("chunk rejected", extra={"fields": {"stream": ack.stream_id, "code": name}})
            return
        if ack.status == signal_pb2.ACK_STATUS_DUPLICATE:
            progress.duplicates += 1
        progress.chunks_acked += 1
        progress.samples_acked += chunk.sample_count
        progress.last_session_id = ack.session_id or progress.last_session_id
        progress.ack_latencies_s.append(time.monotonic() - sent_at)
        if len(progress.ack_latencies_s) > self.keep_latencies:
            del progress.ack_latencies_s[: self.keep_latencies // 2]
