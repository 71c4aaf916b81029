"""IngestService servicer: proto in, pipeline call, proto out; nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from clisonix.signal.v1 import signal_pb2, signal_pb2_grpc
from services.common.errors import ClisonixError, Unavailable
from services.common.rpc import status_code
from services.ingest.pipeline import IngestPipeline

SERVICE_NAME = signal_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name
WRITE_METHODS = (f"/{SERVICE_NAME}/Stream", f"/{SERVICE_NAME}/Append")

_END = object()


def rejected_ack(chunk: signal_pb2.SignalChunk, error: ClisonixError) -> signal_pb2.IngestAck:
    """The REJECTED ack for a chunk that was not written, carrying the status code number of the error."""
    retry_ms = max(1, math.ceil(error.retry_after_s * 1000)) if error.retry_after_s is not None else 0
    return signal_pb2.IngestAck(
        stream_id=chunk.stream_id,
        sequence=chunk.sequence,
        status=signal_pb2.ACK_STATUS_REJECTED,
        code=status_code(error).value[0],
        message=str(error),
        retry_after_ms=retry_ms,
    )


async def settle(answer: Awaitable[signal_pb2.IngestAck]) -> signal_pb2.IngestAck:
    """Waits for a chunk's ack. A write's answer is shielded: duplicates of the chunk wait on it too, so a
    call that ends (its client went away) must not cancel it.
    """
    if isinstance(answer, asyncio.Future):
        return await asyncio.shield(answer)
    return await answer


class IngestServicer(signal_pb2_grpc.IngestServiceServicer):
    """Streams and single chunks into the pipeline. Each Stream call reads at most `max_unacked` chunks
    ahead of its acks, so a fast client waits (gRPC flow control) instead of the server growing.
    """

    def __init__(self, pipeline: IngestPipeline, max_unacked: int) -> None:
        self.pipeline = pipeline
        self.max_unacked = max_unacked
        self.draining = asyncio.Event()
        self._calls: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    async def Append(self, request: signal_pb2.SignalChunk, context: grpc.aio.ServicerContext) -> signal_pb2.IngestAck:
        if self.draining.is_set():
            raise Unavailable("ingest is shutting down; send to another replica", reason="draining")
        return await settle(await self.pipeline.submit(request))

    async def Stream(
        self, request_iterator: AsyncIterator[signal_pb2.SignalChunk], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[signal_pb2.IngestAck]:
        if self.draining.is_set():
            raise Unavailable("ingest is shutting down; send to another replica", reason="draining")
        rate_limit = self.pipeline.new_rate_limit()
        window = asyncio.Semaphore(self.max_unacked)
        answers: asyncio.Queue[object] = asyncio.Queue()

        async def read() -> None:
            try:
                async for chunk in request_iterator:
                    await window.acquire()
                    try:
                        answers.put_nowait(await self.pipeline.submit(chunk, rate_limit))
                    except Unavailable as exc:
                        answers.put_nowait(exc)
                        return
                    except ClisonixError as exc:
                        answers.put_nowait(rejected_ack(chunk, exc))
            finally:
                answers.put_nowait(_END)

        reader = asyncio.create_task(read())
        self._calls.add(reader)
        self._idle.clear()
        try:
            while True:
                answer = await answers.get()
                if answer is _END:
                    if self.draining.is_set():
                        raise Unavailable("ingest is shutting down; resend unacked chunks", reason="draining")
                    return
                if isinstance(answer, ClisonixError):
                    raise answer
                if isinstance(answer, signal_pb2.IngestAck):
                    ack = answer
                else:
                    ack = await settle(answer)  # type: ignore[arg-type]
                window.release()
                yield ack
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            # Answers nobody will send: the client resends those chunks and gets them from the book.
            while not answers.empty():
                left = answers.get_nowait()
                if inspect.iscoroutine(left):
                    left.close()
            self._calls.discard(reader)
            if not self._calls:
                self._idle.set()

    async def drain(self) -> None:
        """Stops reading new chunks, lets every call send the acks it owes, and waits for the calls to end."""
        self.draining.set()
        for reader in list(self._calls):
            reader.cancel()
        await self._idle.wait()


def register(servicer: IngestServicer) -> Callable[[grpc.aio.Server], None]:
    """A GrpcServer `register` callback adding the servicer."""

    def add(server: grpc.aio.Server) -> None:
        signal_pb2_grpc.add_IngestServiceServicer_to_server(servicer, server)

    return add
