"""The inference worker: fused windows from the consumer group in, one Prediction per window out.

For each window the worker reads the first channel of the first ECG stream, slides the model over it and sends
all the window's segments as one request to the model's shared DynamicBatcher, so the windows a fetch returns
(and KServe calls arriving meanwhile) share forward passes as far as its max_batch_size lets them. It finds the
beats in the beat probabilities, maps them onto the session clock and derives the heart rate.

Every fused window gets exactly one Prediction: a window without usable ECG (no ECG stream, the stream missing,
another rate or unit than the model reads, no segment without a gap) gets one with `skipped_reason` set, since
such a window is not bad input. A record that is not a fused window, or whose samples do not match their
declared layout, goes to the dead-letter topic with the reason.

Idempotent by window id: a prediction's id is a UUIDv5 of the window id, model name and version, and is the
record's ce_id, so a window re-delivered after a rebalance or a crash is predicted under the same id and
downstream de-duplicates it; a bounded set of recently predicted window ids keeps one worker from predicting a
re-delivered window twice. Offsets are committed once every prediction before them is acknowledged by Kafka
(acks=all, at-least-once).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord
from aiokafka.errors import KafkaError
from aiokafka.structs import RecordMetadata, TopicPartition
from prometheus_client import Counter, Histogram

from clisonix.fusion.v1 import fusion_pb2
from clisonix.inference.v1 import inference_pb2
from clisonix.signal.v1 import signal_pb2
from services.common.errors import ClisonixError, InvalidArgument
from services.common.events import UndecodableEvent, decode_event
from services.common.kafka import DeadLetters, EventProducer, consumer_options, ensure_topics, kafka_producer
from services.common.metrics import LATENCY_BUCKETS, ServiceMetrics, observe_seconds
from services.common.runtime import ServiceRuntime
from services.inference.beats import detect_beats, sliding_segments
from services.inference.metrics import InferenceMetrics
from services.inference.repository import ArtifactMetadata, ModelArtifact
from services.inference.settings import InferenceSettings

if TYPE_CHECKING:  # the runtimes behind them load torch and onnxruntime; the types alone need neither
    from services.inference.batching import BatchResult, DynamicBatcher
    from services.inference.serving import ModelServer, ServedModel

log = logging.getLogger(__name__)

SOURCE = "//clisonix/inference"
# Prediction ids: UUIDv5 of "<window id>/<model name>/<model version>" in this namespace.
PREDICTION_ID_NAMESPACE = uuid.UUID("c96acfc3-8097-451a-93b2-5f235991d043")

# What the beat decoding falls back to where a model's metadata (preprocessing) does not say: the figures the
# models are evaluated with (services.inference.evaluation).
DEFAULT_STRIDE_SAMPLES = 4
DEFAULT_THRESHOLD = 0.5
DEFAULT_REFRACTORY_MS = 200.0
# Windows handled at once (one fetch): their requests are what the batcher can batch together.
DEFAULT_MAX_IN_FLIGHT = 64
# Window ids remembered to drop re-deliveries (a few minutes of windows of a few hundred sessions).
DEFAULT_RECENT_WINDOWS = 100_000
DEFAULT_COMMIT_INTERVAL_S = 1.0

# Sample units an ECG may come in, as a factor to millivolts (the models read what MIT-BIH stores: mV).
UNIT_TO_MV = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "v": 1e3}

# Why a window was not predicted: the bounded set of `skipped_reason` values (and metric labels).
NO_ECG_STREAM = "no_ecg_stream"
ECG_MISSING = "ecg_missing"
SAMPLE_RATE_MISMATCH = "sample_rate_mismatch"
UNKNOWN_UNIT = "unknown_unit"
NO_COMPLETE_SEGMENT = "no_complete_segment"
SKIPPED_REASONS = (NO_ECG_STREAM, ECG_MISSING, SAMPLE_RATE_MISMATCH, UNKNOWN_UNIT, NO_COMPLETE_SEGMENT)


def prediction_id(window_id: str, model_name: str, model_version: str) -> str:
    """The prediction's id: the same for the same window and model version, however often it is predicted."""
    return str(uuid.uuid5(PREDICTION_ID_NAMESPACE, f"{window_id}/{model_name}/{model_version}"))


@dataclass(frozen=True)
class BeatDecoding:
    """How a beat model is run over a window and its output turned into beats (from the model's metadata).

    stride: samples between consecutive segments. threshold: beat probability at which a run of segments is a
    beat. refractory_s: of two beats closer than this, the less probable is dropped. beat_column: column of the
    beat class in "probabilities". unit: the unit the model reads (samples in another known unit are scaled).
    """

    input_name: str
    sample_rate_hz: float
    window_samples: int
    stride: int
    threshold: float
    refractory_s: float
    beat_column: int
    unit: str = "mV"

    @classmethod
    def from_metadata(cls, metadata: ArtifactMetadata) -> BeatDecoding:
        """From metadata.preprocessing's stride_samples, threshold, refractory_ms and unit (defaults where
        absent), the input's name, the rate, the segment length and the position of "beat" among the labels."""
        pre = metadata.preprocessing
        labels = list(metadata.labels)
        return cls(
            input_name=metadata.inputs[0].name if metadata.inputs else "ecg",
            sample_rate_hz=float(metadata.sample_rate_hz),
            window_samples=int(metadata.window_samples),
            stride=int(pre.get("stride_samples", DEFAULT_STRIDE_SAMPLES)),
            threshold=float(pre.get("threshold", DEFAULT_THRESHOLD)),
            refractory_s=float(pre.get("refractory_ms", DEFAULT_REFRACTORY_MS)) / 1000.0,
            beat_column=labels.index("beat") if "beat" in labels else len(labels) - 1,
            unit=str(pre.get("unit", "mV")),
        )

    @property
    def refractory_samples(self) -> int:
        return round(self.refractory_s * self.sample_rate_hz)


@dataclass(frozen=True)
class EcgSegments:
    """The model's input cut from one window's ECG.

    segments: (n, 1, window_samples) float32, those without a gap (n >= 1). rows: their positions among all the
    segment positions of the window (`positions` of them, every `stride` samples). centres: the sample index of
    each position's centre within the window.
    """

    stream: fusion_pb2.StreamWindow
    segments: np.ndarray
    rows: np.ndarray
    positions: int
    centres: np.ndarray


def stream_samples(stream: fusion_pb2.StreamWindow) -> np.ndarray:
    """A stream window's samples, (channels, sample_count) float32; InvalidArgument when the bytes do not match
    its channels and sample count (float32 little-endian, channel-major, as fusion writes them)."""
    channels = len(stream.channel_names)
    if channels == 0:
        raise InvalidArgument(f"stream {stream.stream_id!r} has no channels", reason="no_channels")
    expected = channels * stream.sample_count * 4
    if len(stream.samples) != expected:
        raise InvalidArgument(
            f"stream {stream.stream_id!r}: {len(stream.samples)} sample bytes, expected {expected}",
            reason="sample_size_mismatch",
        )
    return np.frombuffer(stream.samples, dtype="<f4").reshape(channels, stream.sample_count)


def unit_scale(unit: str, model_unit: str) -> float | None:
    """The factor from samples in `unit` to the unit the model reads; None when either is not a known unit of
    voltage (an empty unit is taken to be the model's)."""
    unit, model_unit = unit.strip().lower(), model_unit.strip().lower()
    if not unit or unit == model_unit:
        return 1.0
    if unit not in UNIT_TO_MV or model_unit not in UNIT_TO_MV:
        return None
    return UNIT_TO_MV[unit] / UNIT_TO_MV[model_unit]


def ecg_segments(window: fusion_pb2.FusedWindow, decoding: BeatDecoding) -> EcgSegments | str:
    """The model input from the first channel of the window's first ECG stream, or the reason there is none
    (one of SKIPPED_REASONS). Segments holding a gap (NaN samples) are left out."""
    stream = next((s for s in window.streams if s.modality == signal_pb2.MODALITY_ECG), None)
    if stream is None:
        return NO_ECG_STREAM
    samples = stream_samples(stream)
    if stream.quality.missing or stream.sample_count == 0:
        return ECG_MISSING
    if not math.isclose(stream.sample_rate_hz, decoding.sample_rate_hz, rel_tol=1e-9):
        return SAMPLE_RATE_MISMATCH
    scale = unit_scale(stream.channel_units[0] if stream.channel_units else "", decoding.unit)
    if scale is None:
        return UNKNOWN_UNIT
    signal = samples[0] if scale == 1.0 else samples[0] * np.float32(scale)
    segments, centres = sliding_segments(signal, decoding.window_samples, decoding.stride)
    complete = np.isfinite(segments).all(axis=(1, 2))
    if not complete.any():
        return ECG_MISSING if not np.isfinite(signal).any() else NO_COMPLETE_SEGMENT
    rows = np.flatnonzero(complete)
    return EcgSegments(stream, np.ascontiguousarray(segments[rows]), rows, segments.shape[0], centres)


def heart_rate_bpm(beat_times_s: np.ndarray) -> float | None:
    """60 / the median interval between consecutive beats; None with fewer than two beats."""
    if beat_times_s.size < 2:
        return None
    return float(60.0 / np.median(np.diff(beat_times_s)))


def base_prediction(window: fusion_pb2.FusedWindow, model: ArtifactMetadata) -> inference_pb2.Prediction:
    """A Prediction with the window's and the model's identity filled in."""
    return inference_pb2.Prediction(
        prediction_id=prediction_id(window.window_id, model.name, model.version),
        window_id=window.window_id,
        session_id=window.session_id,
        window_start_s=window.start_s,
        window_end_s=window.end_s,
        model_name=model.name,
        model_version=model.version,
        variant=model.variant,
    )


def fill_prediction(
    prediction: inference_pb2.Prediction,
    window: fusion_pb2.FusedWindow,
    ecg: EcgSegments,
    result: BatchResult,
    decoding: BeatDecoding,
) -> None:
    """Adds the model's outputs (rows of segments with a gap are NaN) and the beats and heart rate to
    `prediction`, with the batch's figures for this request."""
    prediction.stream_id = ecg.stream.stream_id
    for name, rows in result.outputs.items():
        values = np.asarray(rows, dtype=np.float64)
        full = np.full((ecg.positions, *values.shape[1:]), np.nan)
        full[ecg.rows] = values
        prediction.outputs.append(inference_pb2.OutputTensor(name=name, shape=full.shape, values=full.ravel()))
    probabilities = np.full(ecg.positions, np.nan)
    probabilities[ecg.rows] = np.asarray(result.outputs["probabilities"])[:, decoding.beat_column]
    at, beat_p = detect_beats(ecg.centres, probabilities, decoding.threshold, decoding.refractory_samples)
    times = window.start_s + at / ecg.stream.sample_rate_hz
    prediction.beats.extend(
        inference_pb2.DetectedBeat(time_s=float(t), probability=float(p)) for t, p in zip(times, beat_p, strict=True)
    )
    rate = heart_rate_bpm(times)
    if rate is not None:
        prediction.heart_rate_bpm = rate
    prediction.compute_s = result.compute_s
    prediction.queue_s = result.queue_s
    prediction.joules = result.joules
    prediction.energy_source = result.energy_source
    prediction.batch_size = result.batch_size


@dataclass(frozen=True)
class InferenceWorkerMetrics:
    """The worker's own metrics, beside the common ServiceMetrics and InferenceMetrics (whose
    request_latency_seconds{path="kafka"} and energy_joules the worker's windows feed), in the same registry."""

    predictions_total: Counter
    skipped_total: Counter
    redelivered_total: Counter
    pipeline_latency_seconds: Histogram

    @classmethod
    def create(cls, metrics: ServiceMetrics) -> InferenceWorkerMetrics:
        registry = metrics.registry
        return cls(
            predictions_total=Counter(
                "clisonix_inference_predictions",
                "Predictions produced by the Kafka worker (outcome: predicted or skipped)",
                ["model", "outcome"],
                registry=registry,
            ),
            skipped_total=Counter(
                "clisonix_inference_windows_skipped",
                "Fused windows without usable ECG, by reason (each still gets a Prediction saying why)",
                ["reason"],
                registry=registry,
            ),
            redelivered_total=Counter(
                "clisonix_inference_windows_redelivered",
                "Fused windows this worker had predicted already (re-delivered or duplicated): not predicted again",
                registry=registry,
            ),
            # From ingest receiving the chunk that completed the window (the newest ingest time the window's
            # streams carry) to the prediction handed to this worker's producer; a window whose chunks carried no
            # ingest time is timed from its record's Kafka timestamp (fusion handed it to its producer).
            pipeline_latency_seconds=Histogram(
                "clisonix_pipeline_latency_seconds",
                "Chunk that completed a window received at ingest -> its prediction handed to the producer",
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
        )


def pipeline_start_s(window: fusion_pb2.FusedWindow, record_timestamp_ms: int | None) -> float | None:
    """When the window's pipeline started, in seconds since the epoch: the newest ingest time of its streams'
    chunks; without one, the record's Kafka timestamp; None without either."""
    ingested = max((s.chunks.last_ingest_time.ToNanoseconds() for s in window.streams), default=0)
    if ingested > 0:
        return ingested / 1e9
    if record_timestamp_ms is not None and record_timestamp_ms > 0:
        return record_timestamp_ms / 1000.0
    return None


def pipeline_latency_s(start_s: float | None, now_s: float) -> float | None:
    """Seconds from `start_s` to `now_s` (both since the epoch); None without a start. Clocks of different
    machines may disagree: a negative value becomes 0."""
    if start_s is None:
        return None
    return max(0.0, now_s - start_s)


@dataclass
class _Job:
    """One fetched record on its way: a window to predict (the model running in `task`, or skipped with the
    reason in `ecg`), a re-delivered window to drop (no window), or a dead letter."""

    tp: TopicPartition
    record: ConsumerRecord
    window: fusion_pb2.FusedWindow | None = None
    ecg: EcgSegments | str = ""
    task: asyncio.Task[BatchResult] | None = None
    dead: tuple[str, str] | None = None


class InferenceWorker:
    """Consumes fused windows as a member of the inference consumer group and produces Predictions.

    model: the served artifact the worker predicts with; batcher: its shared DynamicBatcher.
    inference_metrics: where each window's latency (path "kafka") is recorded (None: nowhere).
    max_in_flight: windows fetched and predicted at once (their requests batch together).
    recent_windows: how many predicted window ids are remembered to drop re-deliveries.
    active: when given, the served model version to predict with from the next fetch on (Tide's active model of
        the worker's task, services.inference.activation); `model` and `batcher` are the first one.
    """

    def __init__(
        self,
        settings: InferenceSettings,
        consumer: AIOKafkaConsumer,
        producer: EventProducer,
        dead_letters: DeadLetters,
        metrics: ServiceMetrics,
        worker_metrics: InferenceWorkerMetrics,
        model: ModelArtifact,
        batcher: DynamicBatcher,
        inference_metrics: InferenceMetrics | None = None,
        *,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        recent_windows: int = DEFAULT_RECENT_WINDOWS,
        commit_interval_s: float = DEFAULT_COMMIT_INTERVAL_S,
        active: Callable[[], ServedModel | None] | None = None,
    ) -> None:
        if max_in_flight < 1 or recent_windows < 1:
            raise ValueError("max_in_flight and recent_windows must be >= 1")
        self.settings = settings
        self.consumer = consumer
        self.producer = producer
        self.dead_letters = dead_letters
        self.metrics = metrics
        self.worker_metrics = worker_metrics
        self.inference_metrics = inference_metrics
        self.active = active
        self._use(model, batcher)
        self.max_in_flight = max_in_flight
        self.recent_windows = recent_windows
        self.commit_interval_s = commit_interval_s
        self.positions: dict[TopicPartition, int] = {}
        # Set at the first assignment (even an empty one): this member has joined its consumer group.
        self.joined = asyncio.Event()
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._in_flight: list[asyncio.Future[RecordMetadata]] = []
        self._last_commit = time.monotonic()
        service = settings.service_name
        self._stage = {
            stage: metrics.stage_latency_seconds.labels(service, stage)
            for stage in ("decode", "prepare", "infer", "produce", "commit")
        }
        self._records_in = metrics.records_in_total.labels(service, settings.topic_fused)
        self._records_out = metrics.records_out_total.labels(service, settings.topic_results)
        self._lag = metrics.consumer_lag_records.labels(service, settings.topic_fused)

    def _use(self, model: ModelArtifact, batcher: DynamicBatcher) -> None:
        """Predicts with `model` through `batcher` from the next fetch on."""
        self.artifact = model
        self.model = model.metadata
        self.batcher = batcher
        self.decoding = BeatDecoding.from_metadata(model.metadata)
        self._latency = (
            self.inference_metrics.request_latency_seconds.labels(model=self.model.name, path="kafka")
            if self.inference_metrics is not None
            else None
        )
        self._outcomes = {
            outcome: self.worker_metrics.predictions_total.labels(self.model.name, outcome)
            for outcome in ("predicted", "skipped")
        }

    def follow_active(self) -> None:
        """Switches to the model version `active` names when it changed (called between fetches only, so that
        every window of a fetch, and every row of its batches, runs on one model version)."""
        if self.active is None:
            return
        served = self.active()
        if served is None or (served.artifact is self.artifact and served.batcher is self.batcher):
            return
        log.info(
            "inference worker switches model",
            extra={
                "fields": {
                    "from_model": self.model.name,
                    "from_version": self.model.version,
                    "model": served.artifact.metadata.name,
                    "version": served.artifact.metadata.version,
                }
            },
        )
        self._use(served.artifact, served.batcher)

    def listener(self) -> ConsumerRebalanceListener:
        """The rebalance listener to subscribe with: commits what was handled and forgets revoked partitions."""
        worker = self

        class Listener(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
                await worker.commit()
                for tp in revoked:
                    worker.positions.pop(tp, None)

            async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
                worker.joined.set()

        return Listener()

    async def run(self, stop: asyncio.Event) -> None:
        """Handles fetched windows until `stop` is set; commits at the end."""
        while not stop.is_set():
            batches = await self.consumer.getmany(timeout_ms=100, max_records=self.max_in_flight)
            received = time.monotonic()
            self.follow_active()
            if batches:
                await self.handle(batches, received)
            self._lag.set(self.lag_records())
            if time.monotonic() - self._last_commit >= self.commit_interval_s:
                await self.commit()
        await self.commit()

    async def handle(self, batches: Mapping[TopicPartition, list[ConsumerRecord]], received: float) -> None:
        """Predicts the fetched windows concurrently (so their requests share batches) and produces the
        predictions in the records' order; dead-letters the records that are not fused windows."""
        jobs: list[_Job] = []
        try:
            for tp, records in batches.items():
                for record in records:
                    jobs.append(self._start(tp, record))
            for job in jobs:
                await self._finish(job, received)
        finally:
            for job in jobs:
                if job.task is not None and not job.task.done():
                    job.task.cancel()

    def _start(self, tp: TopicPartition, record: ConsumerRecord) -> _Job:
        """Decodes a record and cuts its ECG into the model's input, then sends that to the batcher without
        waiting; problems with the record itself make it a dead letter."""
        self._records_in.inc()
        job = _Job(tp, record)
        try:
            with observe_seconds(self._stage["decode"]):
                window, _ = decode_event(fusion_pb2.FusedWindow, record.value, record.headers)
                if not window.window_id:
                    raise InvalidArgument("fused window without a window id", reason="no_window_id")
            if window.window_id in self._recent:
                self._recent.move_to_end(window.window_id)
                self.worker_metrics.redelivered_total.inc()
                return job
            with observe_seconds(self._stage["prepare"]):
                ecg = ecg_segments(window, self.decoding)
        except UndecodableEvent as exc:
            job.dead = (exc.reason, exc.detail)
            return job
        except ClisonixError as exc:
            job.dead = (exc.reason, str(exc))
            return job
        self._recent[window.window_id] = None
        while len(self._recent) > self.recent_windows:
            self._recent.popitem(last=False)
        job.window, job.ecg = window, ecg
        if isinstance(ecg, EcgSegments):
            job.task = asyncio.create_task(self._infer(ecg))
        return job

    async def _infer(self, ecg: EcgSegments) -> BatchResult:
        # Errors here are the model's or the batcher's, not the record's: they end the worker (no dead letter),
        # and the window is read again after the restart.
        with observe_seconds(self._stage["infer"]):
            return await self.batcher.infer({self.decoding.input_name: ecg.segments})

    async def _finish(self, job: _Job, received: float) -> None:
        """Produces the job's prediction or dead letter, in the order the records were fetched."""
        if job.dead is not None:
            await self.dead_letters.publish(job.record, *job.dead)
        elif job.window is not None:
            prediction = base_prediction(job.window, self.model)
            if isinstance(job.ecg, EcgSegments):
                assert job.task is not None
                fill_prediction(prediction, job.window, job.ecg, await job.task, self.decoding)
            else:
                prediction.skipped_reason = job.ecg
                stream = next((s for s in job.window.streams if s.modality == signal_pb2.MODALITY_ECG), None)
                prediction.stream_id = stream.stream_id if stream is not None else ""
            await self._produce(prediction, received)
            pipeline = pipeline_latency_s(pipeline_start_s(job.window, job.record.timestamp), time.time())
            if pipeline is not None:
                self.worker_metrics.pipeline_latency_seconds.observe(pipeline)
        self.positions[job.tp] = job.record.offset + 1

    async def _produce(self, prediction: inference_pb2.Prediction, received: float) -> None:
        latency = time.monotonic() - received
        prediction.latency_s = latency
        with observe_seconds(self._stage["produce"]):
            future = await self.producer.send(
                self.settings.topic_results, prediction.session_id, prediction, event_id=prediction.prediction_id
            )
        self._in_flight.append(future)
        if self._latency is not None:
            self._latency.observe(latency)
        self._records_out.inc()
        if prediction.skipped_reason:
            self._outcomes["skipped"].inc()
            self.worker_metrics.skipped_total.labels(prediction.skipped_reason).inc()
        else:
            self._outcomes["predicted"].inc()

    def lag_records(self) -> int:
        """Records between what this worker has handled and the end of its partitions (fetch highwater)."""
        lag = 0
        for tp, position in self.positions.items():
            highwater = self.consumer.highwater(tp)
            if highwater is not None:
                lag += max(0, highwater - position)
        return lag

    async def commit(self) -> None:
        """Commits the handled offsets once every prediction produced so far is acknowledged (at-least-once)."""
        with observe_seconds(self._stage["commit"]):
            # Taken together: every prediction before these positions is among these futures.
            positions, in_flight, self._in_flight = dict(self.positions), self._in_flight, []
            if in_flight:
                await asyncio.gather(*in_flight)
            if positions:
                try:
                    await self.consumer.commit(positions)
                except KafkaError as exc:  # a rebalance in progress: the next owner re-reads a little more
                    log.warning("commit failed", extra={"fields": {"error": type(exc).__name__}})
        self._last_commit = time.monotonic()


async def start_worker(
    settings: InferenceSettings,
    runtime: ServiceRuntime,
    models: ModelServer,
    metrics: InferenceMetrics | None = None,
    active: Callable[[], ServedModel | None] | None = None,
) -> InferenceWorker:
    """Starts the Kafka worker on the runtime's lifecycle: producer, dead letters, consumer group member and the
    worker task, stopped in reverse order on shutdown (before the model server's batchers close, which were
    entered first). A worker that dies stops the service (a dead worker must not look healthy).

    models: the loaded model server; the worker runs settings.worker_model (worker_model_version, or the newest)
        through that version's shared batcher. NotFound when it is not served.
    metrics: the inference metrics the worker's per-window latency goes to.
    active: the model version to serve instead, read between fetches (Tide's active model for settings.task;
        None: always settings.worker_model).
    """
    current = active() if active is not None else None
    artifact, batcher = current or models.get(settings.worker_model, settings.worker_model_version)
    stack = runtime.lifecycle.stack
    if settings.create_topics:
        await ensure_topics(settings, [settings.topic_fused, settings.topic_results, settings.topic_deadletter])
    producer = await stack.enter_async_context(kafka_producer(settings, SOURCE))
    dead_letters = DeadLetters(
        producer.producer,
        settings.topic_deadletter,
        settings.consumer_group,
        lambda reason: runtime.metrics.deadlettered_total.labels(settings.service_name, reason).inc(),
    )
    consumer = AIOKafkaConsumer(**consumer_options(settings, settings.consumer_group))
    worker = InferenceWorker(
        settings,
        consumer,
        producer,
        dead_letters,
        runtime.metrics,
        InferenceWorkerMetrics.create(runtime.metrics),
        artifact,
        batcher,
        metrics,
        active=active,
    )
    consumer.subscribe([settings.topic_fused], listener=worker.listener())
    await consumer.start()
    # Stopped after the worker (and before the model server's batchers, entered first): leaving the group moves
    # the partitions on at once.
    stack.push_async_callback(consumer.stop)
    task = runtime.run_task(worker.run, "inference-worker")
    await runtime.wait_joined(worker.joined, task, "inference worker")
    log.info(
        "inference worker ready",
        extra={
            "fields": {
                "model": artifact.metadata.name,
                "version": artifact.metadata.version,
                "topic_in": settings.topic_fused,
                "topic_out": settings.topic_results,
            }
        },
    )
    return worker
