"""Dynamic batching of one model version, shared by the KServe gRPC API and the Kafka worker.

Requests (each one or more rows, batch on axis 0) queue in arrival order. When the model is idle, what is queued
runs at once, unless `max_queue_delay_s` > 0 asks the first request to wait up to that long for more rows (or
until `max_batch_size` rows are queued). While a forward pass runs, new requests queue and form the next batch,
so under load batches grow by themselves and an idle model adds no delay.

A batch takes queued requests from the front, in order, while their rows fit in `max_batch_size` and their
shapes beyond axis 0 match the first one's (so they concatenate). A request with more rows than
`max_batch_size` is neither split nor refused: it runs alone, as a batch of its own size, so callers (e.g. the
Kafka worker with all of a window's segments) need not know the limit.

The forward pass runs in one dedicated thread per model version: the event loop stays free, the runtime uses
that one thread, and the pass's CPU time is that thread's (time.thread_time around the pass), from which its
energy is attributed (services.common.energy.CpuTimeAttribution) and shared out by rows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.common.energy import CpuTimeAttribution, EnergyMeter
from services.common.errors import ClisonixError, Unavailable
from services.inference.backends import Backend
from services.inference.metrics import InferenceMetrics
from services.inference.tensors import check_inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchResult:
    """What one request got from the batch it ran in.

    outputs: every output of the model, this request's rows only (in its order), batch on axis 0.
    batch_size: rows in the whole batch (the forward pass) this request ran in.
    queue_s: seconds from the request entering the queue to its forward pass starting.
    compute_s: wall-clock seconds of the forward pass (the whole batch's).
    cpu_s: this request's share of the forward pass's CPU time (the pass's CPU seconds x its rows / batch_size).
    joules: this request's share of the forward pass's energy, by the same rows / batch_size.
    energy_source: where `joules` comes from: "rapl" or "nvml" (measured machine energy, attributed by CPU time)
        or "estimate" (CPU time x watts per core; never a measurement).
    """

    outputs: dict[str, np.ndarray]
    batch_size: int
    queue_s: float
    compute_s: float
    cpu_s: float
    joules: float
    energy_source: str


@dataclass
class _Request:
    inputs: Mapping[str, np.ndarray]
    rows: int
    # Names, dtypes and shapes beyond axis 0: requests batch together only when these are equal.
    layout: tuple[tuple[str, str, tuple[int, ...]], ...]
    future: asyncio.Future[BatchResult]
    enqueued: float


@dataclass(frozen=True)
class _Instruments:
    """The labelled metric children of one model (looked up once, not per request)."""

    batch_size: Any
    compute_seconds: Any
    queue_delay_seconds: Any
    energy_joules: Any


@dataclass(frozen=True)
class _Pass:
    outputs: dict[str, np.ndarray]
    started: float
    compute_s: float
    cpu_s: float
    joules: float


class DynamicBatcher:
    """Batches concurrent requests to one loaded model version; see the module's docstring for the policy.

    backend: the loaded model (its artifact's metadata gives the inputs checked and the outputs returned).
    max_batch_size: the most rows one forward pass takes (a single larger request runs alone).
    max_queue_delay_s: how long the first request of a batch may wait for more rows when the model is idle
        (0: run at once).
    meter: the service's energy meter, or a CpuTimeAttribution over it to share one between batchers.
    metrics: where batch sizes, queue delays, compute seconds and energy are recorded (None: nowhere).
    executor: where forward passes run; it must run one task at a time (None: a dedicated single thread, owned
        and shut down by this batcher).

    Use from one event loop: `result = await batcher.infer({"ecg": x})`, and `await batcher.close()` at the end.
    """

    def __init__(
        self,
        backend: Backend,
        max_batch_size: int,
        max_queue_delay_s: float,
        meter: EnergyMeter | CpuTimeAttribution,
        metrics: InferenceMetrics | None = None,
        executor: Executor | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue_delay_s < 0:
            raise ValueError(f"max_queue_delay_s must be >= 0, got {max_queue_delay_s}")
        self.backend = backend
        self.artifact = backend.artifact
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.energy = meter if isinstance(meter, CpuTimeAttribution) else CpuTimeAttribution(meter)
        meta = backend.artifact.metadata
        self._owns_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"infer-{meta.name}-{meta.version}"
        )
        self._queue: deque[_Request] = deque()
        self._queued_rows = 0
        self._running = False  # a forward pass is on the thread
        self._closing = False
        self._timer: asyncio.TimerHandle | None = None  # an idle model's queue delay running out
        self._idle = asyncio.Event()  # nothing queued, nothing running
        self._idle.set()
        self._metrics: _Instruments | None = None
        if metrics is not None:
            self._metrics = _Instruments(
                batch_size=metrics.batch_size.labels(model=meta.name),
                compute_seconds=metrics.compute_seconds.labels(model=meta.name),
                queue_delay_seconds=metrics.queue_delay_seconds.labels(model=meta.name),
                energy_joules=metrics.energy_joules.labels(
                    model=meta.name, variant=meta.variant, source=self.energy.source
                ),
            )

    @property
    def queued_rows(self) -> int:
        """Rows waiting for a forward pass (not counting the one running)."""
        return self._queued_rows

    async def infer(self, inputs: Mapping[str, np.ndarray]) -> BatchResult:
        """Runs one request in the next batch that has room for it and returns its share of the results.

        inputs: every input the model reads, by name, with the datatype and shape its metadata gives and the same
            number of rows n >= 1 on axis 0.
        Raises InvalidArgument for inputs that do not fit the model, Unavailable once close() has begun, and
        ClisonixError (INTERNAL) when the forward pass fails (every request of that batch gets it).
        """
        if self._closing:
            raise Unavailable(f"model {self.artifact.metadata.name} is shutting down", reason="closing")
        rows = check_inputs(self.artifact.metadata.inputs, inputs)
        loop = asyncio.get_running_loop()
        layout = tuple((name, str(a.dtype), tuple(a.shape[1:])) for name, a in sorted(inputs.items()))
        request = _Request(dict(inputs), rows, layout, loop.create_future(), time.perf_counter())
        self._queue.append(request)
        self._queued_rows += rows
        self._idle.clear()
        self._dispatch()
        return await request.future

    async def close(self) -> None:
        """Refuses new requests, finishes every queued one, then stops the forward-pass thread."""
        self._closing = True
        self._dispatch()  # a batch waiting out its queue delay runs now
        await self._idle.wait()
        if self._owns_executor:
            self._executor.shutdown(wait=True)

    # Scheduling happens in event-loop callbacks rather than a task: an idle model hands a request to its thread
    # at once, and the callback that delivers a pass's results starts the next batch.

    def _dispatch(self) -> None:
        """Starts the next batch on the thread when the model is idle and the batch is due (on the event loop)."""
        if self._running or not self._queue:
            return
        loop = asyncio.get_running_loop()
        if self.max_queue_delay_s > 0 and self._queued_rows < self.max_batch_size and not self._closing:
            due_in = self._queue[0].enqueued + self.max_queue_delay_s - time.perf_counter()
            if due_in > 0:
                if self._timer is None:
                    self._timer = loop.call_later(due_in, self._delay_over)
                return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = self._take()
        if not batch:
            self._check_idle()
            return
        self._running = True
        running = self._executor.submit(self._forward, [request.inputs for request in batch])
        running.add_done_callback(lambda done: loop.call_soon_threadsafe(self._finish, batch, done))

    def _delay_over(self) -> None:
        self._timer = None
        self._dispatch()

    def _check_idle(self) -> None:
        if not self._running and not self._queue:
            self._idle.set()

    def _take(self) -> list[_Request]:
        """The next batch from the front of the queue (requests whose callers went away are dropped)."""
        batch: list[_Request] = []
        rows = 0
        while self._queue:
            request = self._queue[0]
            if request.future.done():  # cancelled while queued
                self._queue.popleft()
                self._queued_rows -= request.rows
                continue
            if batch and (rows + request.rows > self.max_batch_size or request.layout != batch[0].layout):
                break
            self._queue.popleft()
            self._queued_rows -= request.rows
            batch.append(request)
            rows += request.rows
            if rows >= self.max_batch_size:
                break
        return batch

    def _forward(self, inputs: list[Mapping[str, np.ndarray]]) -> _Pass:
        """One forward pass, on the batcher's thread: concatenate, run, measure."""
        if len(inputs) == 1:
            stacked = inputs[0]
        else:
            stacked = {name: np.concatenate([one[name] for one in inputs]) for name in inputs[0]}
        cpu0 = time.thread_time()
        started = time.perf_counter()
        outputs = self.backend.run(stacked)
        compute_s = time.perf_counter() - started
        cpu_s = time.thread_time() - cpu0
        return _Pass(outputs, started, compute_s, cpu_s, self.energy.joules(cpu_s))

    def _finish(self, batch: list[_Request], done: Future[_Pass]) -> None:
        """Delivers a finished pass's results (on the event loop) and starts the next batch."""
        self._running = False
        try:
            self._deliver(batch, done)
        finally:
            self._dispatch()
            self._check_idle()

    def _deliver(self, batch: list[_Request], done: Future[_Pass]) -> None:
        meta = self.artifact.metadata
        rows = sum(request.rows for request in batch)
        try:
            forward = done.result()
            short = [name for name, array in forward.outputs.items() if array.shape[:1] != (rows,)]
            if short:
                raise ValueError(f"outputs {short} do not have the batch's {rows} rows on axis 0")
        except Exception as exc:
            log.error(
                "forward pass failed",
                exc_info=exc,
                extra={"fields": {"model": meta.name, "version": meta.version, "rows": rows}},
            )
            error = ClisonixError(
                f"model {meta.name} version {meta.version} failed on a batch of {rows}: {exc}", reason="backend"
            )
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(error)
            return
        instruments = self._metrics
        if instruments is not None:
            instruments.batch_size.observe(rows)
            instruments.compute_seconds.observe(forward.compute_s)
        offset = 0
        for request in batch:
            share = request.rows / rows
            result = BatchResult(
                outputs={name: array[offset : offset + request.rows] for name, array in forward.outputs.items()},
                batch_size=rows,
                queue_s=max(0.0, forward.started - request.enqueued),
                compute_s=forward.compute_s,
                cpu_s=forward.cpu_s * share,
                joules=forward.joules * share,
                energy_source=self.energy.source,
            )
            offset += request.rows
            if instruments is not None:
                instruments.queue_delay_seconds.observe(result.queue_s)
                instruments.energy_joules.observe(result.joules)
            if not request.future.done():
                request.future.set_result(result)
