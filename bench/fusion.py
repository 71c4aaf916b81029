"""Fusion benchmark: window emit latency and CPU of the real fusion worker under a real-time load, side by side
with a pass-through consumer that reads the same records and re-produces them unchanged.

Every leg gets fresh topics and three processes besides this one: the broker, a load generator writing
SignalChunk records as ingest writes them at real-time pace, and the leg's worker (the real FusionService, or
the pass-through). Legs alternate (passthrough, fusion, passthrough, fusion, ...) so the ratios hold on a shared,
noisy machine even where the absolute figures do not. See bench/README.md.

    clisonix bench fusion [--sessions N | --sweep 25,50,100] [--seconds S] [--repeats R] [--json PATH] ...
    python -m bench.fusion [options]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import fmt_ratio, run_and_report

TARGET_P99_MS = 10.0
DEFAULT_SESSIONS = 100
# One worker process per core of the 2-core machine the target is set for; the design scales by partitions.
DEFAULT_WORKERS = 2
PSEUDONYM_KEY = "bench-pseudonym-key-0123456789"
REPO_ROOT = Path(__file__).resolve().parents[1]
LEGS = ("passthrough", "fusion")
LEG_LABELS = {"passthrough": "pass-through", "fusion": "fusion"}
UNITS = {"passthrough": "record", "fusion": "window"}
# Every session's streams: synthetic modality, channels (EEG: --eeg-channels) and rate in Hz.
STREAMS = (("eeg", 32, 256.0), ("ecg", 1, 360.0), ("ppg", 1, 125.0))
# Seconds between the go signal and the first session's start: both children have read it by then.
START_LEAD_S = 1.0
DRAIN_TIMEOUT_S = 60.0
# Other work on the machine above this share of one core over a leg gets a warning beside the leg's figures.
OTHER_CPU_WARNING = 0.1
# A child's result line carries every latency of its leg (tens of thousands of numbers).
MAX_LINE_BYTES = 1 << 28

ENERGY_NOTES = {
    "estimate": "estimate = the worker process's CPU time x {watts:g} W per busy core; not a measurement, "
    "and neither the broker nor the load generator is in it",
    "rapl": "rapl = measured CPU package energy of the whole machine over the leg (broker, load generator "
    "and anything else running included)",
    "nvml": "nvml = measured GPU energy only; the CPU work of this benchmark is not in it",
}


@dataclass
class LegResult:
    """One measured leg: the worker's figures (pass-through: per record; fusion: per window)."""

    leg: str  # "passthrough" or "fusion"
    sessions: int
    run: int
    topic: str
    records_in: int  # raw records the load generator wrote
    load_records_per_s: float  # the load's nominal rate
    outputs: int  # records re-produced or windows emitted over the whole leg
    steady_outputs: int  # those after the warm-up (the ones in the percentiles)
    steady_seconds: float
    seconds: float  # the worker's measured span: go to drained
    latencies_s: list[float] = field(repr=False)  # after the warm-up
    cpu_seconds: float  # the worker process over the span
    joules: float
    energy_source: str
    lag_at_end: int  # raw records not yet handled when the load generator had written its last one
    max_lag: int  # the largest lag seen, sampled once a second
    drain_seconds: float | None  # from then until the worker had handled everything (None: not within the limit)
    load_slip_p99_ms: float  # how late the load generator sent, against its real-time schedule
    load_slip_max_ms: float
    load_cpu_seconds: float
    broker_cpu_seconds: float | None
    # CPU the machine spent on anything but this benchmark's processes (worker, load generator, broker, this one)
    # during the leg: other work on a small machine disturbs every figure; None where /proc/stat is unreadable.
    other_cpu_seconds: float | None = None
    workers: int = 1  # worker processes of the leg, in one consumer group; CPU and counts are their sums

    @property
    def unit(self) -> str:
        return UNITS[self.leg]

    @property
    def outputs_per_s(self) -> float:
        return self.steady_outputs / self.steady_seconds if self.steady_seconds > 0 else 0.0

    @property
    def cpu_core_share(self) -> float:
        """The workers' CPU time over the span, as a share of one core (two busy workers: up to 2.0)."""
        return self.cpu_seconds / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_ms_per_output(self) -> float:
        return self.cpu_seconds * 1000 / self.outputs if self.outputs else 0.0

    @property
    def joules_per_output(self) -> float:
        return self.joules / self.outputs if self.outputs else 0.0

    @property
    def keeps_up(self) -> bool:
        """The worker drained, and was at most one second of load behind when the load ended."""
        return self.drain_seconds is not None and self.lag_at_end <= self.load_records_per_s

    def percentiles_ms(self) -> dict[str, float]:
        return percentiles_ms(self.latencies_s)

    def summary(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "latencies_s"}
        data.update(
            unit=self.unit,
            outputs_per_s=self.outputs_per_s,
            cpu_core_share=self.cpu_core_share,
            cpu_ms_per_output=self.cpu_ms_per_output,
            joules_per_output=self.joules_per_output,
            keeps_up=self.keeps_up,
            **{f"latency_{name}_ms": value for name, value in self.percentiles_ms().items()},
        )
        return data


def percentiles_ms(latencies_s: Sequence[float]) -> dict[str, float]:
    """p50, p95, p99 and max in milliseconds (zeros for none)."""
    if not latencies_s:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}
    values = np.asarray(latencies_s) * 1000
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(values.max())}


# --- options ------------------------------------------------------------------------------------------------


def session_counts(text: str) -> list[int]:
    """ "25,50,100" -> [25, 50, 100] (sorted, distinct, each positive)."""
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of session counts: {text!r}") from None
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError("session counts must be positive")
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clisonix bench fusion",
        description="Window emit latency (p50/p95/p99/max), CPU and energy of the fusion worker under a real-time "
        "load of sessions (32 ch EEG 256 Hz + ECG 360 Hz + PPG 125 Hz each), side by side with a pass-through "
        "consumer re-producing the same records unchanged with the same Kafka options.",
    )
    count = parser.add_mutually_exclusive_group()
    count.add_argument(
        "--sessions", type=int, default=DEFAULT_SESSIONS, help=f"concurrent sessions (default {DEFAULT_SESSIONS})"
    )
    count.add_argument(
        "--sweep",
        type=session_counts,
        metavar="N,N,...",
        help="run the legs at each of these session counts and report the largest meeting the target "
        "(sessions per worker)",
    )
    parser.add_argument(
        "--seconds", type=float, default=30.0, help="seconds of signal per session and leg, sent in real time (30)"
    )
    parser.add_argument(
        "--warmup-seconds",
        type=float,
        default=5.0,
        help="leave out of the percentiles what the worker emits in a leg's first seconds (default 5)",
    )
    parser.add_argument("--block-seconds", type=float, default=0.25, help="seconds of signal per chunk (0.25)")
    parser.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        help=f"worker processes per leg, in one consumer group (default {DEFAULT_WORKERS}: one per core here)",
    )
    parser.add_argument(
        "--partitions", type=int, help="partitions of the raw topic (default: twice the workers, so they split evenly)"
    )
    parser.add_argument("--eeg-channels", type=int, default=32, help="EEG channels per session (default 32)")
    parser.add_argument("--repeats", type=int, default=1, help="pass-through/fusion pairs per session count (1)")
    parser.add_argument(
        "--target-p99-ms",
        type=float,
        default=TARGET_P99_MS,
        help=f"the p99 window emit latency target in ms (default {TARGET_P99_MS:g})",
    )
    parser.add_argument("--bootstrap-servers", help="use this Kafka instead of starting the embedded broker")
    parser.add_argument(
        "--energy-source",
        choices=["auto", "rapl", "nvml", "estimate"],
        default="auto",
        help="energy source (default auto: rapl where readable, else the CPU-time estimate)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    # Internal: a child process of a leg (load generator or worker), its spec as JSON.
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    positive = {
        "--sessions": args.sessions,
        "--seconds": args.seconds,
        "--block-seconds": args.block_seconds,
        "--eeg-channels": args.eeg_channels,
        "--repeats": args.repeats,
        "--target-p99-ms": args.target_p99_ms,
        "--workers": args.workers,
    }
    for name, value in positive.items():
        if not value > 0:
            parser.error(f"{name} must be positive")
    if args.partitions is None:
        args.partitions = 2 * args.workers
    if args.partitions < args.workers:
        parser.error("--partitions must be at least --workers (a worker without a partition idles)")
    if args.block_seconds > args.seconds:
        parser.error("--block-seconds must not exceed --seconds")
    if not 0 <= args.warmup_seconds < args.seconds:
        parser.error("--warmup-seconds must be at least 0 and less than --seconds")


# --- child processes: the load generator and the leg's worker ------------------------------------------------


def _say(kind: str, payload: Any = None) -> None:
    """One protocol line to the benchmark's process (stdout is the channel; logs go to stderr)."""
    print(f"@{kind} {json.dumps(payload)}", flush=True)


async def _read_command() -> list[str]:
    """The next command line from the benchmark's process, split into words."""
    line = await asyncio.to_thread(sys.stdin.readline)
    if not line:
        raise RuntimeError("the benchmark's process went away")
    return line.split(maxsplit=1)


def session_content(seconds: float, block_seconds: float, eeg_channels: int) -> list[list[Any]]:
    """Per stream (EEG, ECG, PPG), the SampleBlocks of `seconds` of synthetic signal from time 0.

    Generated once and shared by every session: the cost of fusing a window does not depend on which
    session's signal it is.
    """
    from services.ingest.sources import SyntheticSource

    channels = {name: (eeg_channels if name == "eeg" else count) for name, count, _ in STREAMS}
    source = SyntheticSource(
        [name for name, _, _ in STREAMS],
        channels=channels,
        rates={name: rate for name, _, rate in STREAMS},
        duration_s=seconds,
        block_seconds=block_seconds,
    )
    per_stream: dict[str, list[Any]] = {spec.stream_id: [] for spec in source.specs()}
    for block in source.blocks():
        per_stream[block.spec.stream_id].append(block)
    blocks = list(per_stream.values())
    count = min(len(stream) for stream in blocks)
    return [stream[:count] for stream in blocks]


async def load_child(spec: dict[str, Any]) -> int:
    """Writes every session's chunks to the raw topic, each when its last sample would exist in real time.

    Sessions start staggered uniformly over the first second after `go`; the session clock is the wall clock
    (first_sample_time_s from time.time(), clock offset 0). Records are what ingest writes: pseudonymised session
    id as key and in the chunk, ingest time set, CloudEvents headers, ingest's producer options.
    """
    from services.common.chunks import SampleBlock, to_chunk
    from services.common.kafka import kafka_producer
    from services.common.settings import ServiceSettings
    from services.ingest.pipeline import SOURCE
    from services.ingest.pseudonyms import Pseudonymiser

    topic = spec["topic_raw"]
    count = spec["sessions"]
    blocks = session_content(spec["seconds"], spec["block_seconds"], spec["eeg_channels"])
    pseudonyms = Pseudonymiser(PSEUDONYM_KEY.encode())
    sessions = [pseudonyms.pseudonym("session", f"bench-{spec['run_id']}-{i}") for i in range(count)]
    settings = ServiceSettings(service_name="bench-load", kafka_bootstrap_servers=spec["bootstrap_servers"])
    end_offsets: dict[int, int] = {}
    errors: list[BaseException] = []
    pending: set[asyncio.Future[Any]] = set()

    def delivered(future: asyncio.Future[Any]) -> None:
        pending.discard(future)
        error = None if future.cancelled() else future.exception()
        if future.cancelled() or error is not None:
            errors.append(error or asyncio.CancelledError())
            return
        metadata = future.result()
        end_offsets[metadata.partition] = max(end_offsets.get(metadata.partition, 0), metadata.offset + 1)

    async with kafka_producer(settings, SOURCE) as producer:
        await producer.producer.partitions_for(topic)  # topic metadata before the clock starts
        _say("ready")
        go = float((await _read_command())[1])
        starts = [go + i / count for i in range(count)]
        # (due time, session, stream, block index): a chunk is due when its last sample would have been taken.
        schedule = sorted(
            (starts[i] + block.first_sample_time_s + block.duration_s, i, s, k)
            for i in range(count)
            for s, stream in enumerate(blocks)
            for k, block in enumerate(stream)
        )
        cpu0 = time.process_time()
        slips: list[float] = []
        sent = sent_bytes = 0
        next_progress = go + 1.0
        last_slip = 0.0
        for due, i, s, k in schedule:
            delay = due - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.time()
            slip = max(0.0, now - due)
            slips.append(slip)
            last_slip = max(last_slip, slip)
            block = blocks[s][k]
            placed = SampleBlock(block.spec, starts[i] + block.first_sample_time_s, block.samples)
            chunk = to_chunk(placed, sessions[i], k)
            chunk.ingest_time.FromNanoseconds(time.time_ns())
            value = chunk.SerializeToString()
            future = await producer.send(
                topic, sessions[i], chunk, value=value, event_id=f"{sessions[i]}/{chunk.stream_id}/{k}"
            )
            pending.add(future)
            future.add_done_callback(delivered)
            sent += 1
            sent_bytes += len(value)
            if now >= next_progress:
                _say("progress", {"sent": sent, "slip_max_ms": last_slip * 1000})
                next_progress = now + 1.0
                last_slip = 0.0
        await asyncio.gather(*list(pending), return_exceptions=True)
        cpu = time.process_time() - cpu0
    if errors:
        raise RuntimeError(f"{len(errors)} of {sent} records were not written: {errors[0]!r}")
    slip_ms = np.asarray(slips) * 1000
    _say(
        "done",
        {
            "records": sent,
            "record_bytes": sent_bytes,
            "end_offsets": {str(p): o for p, o in end_offsets.items()},
            "slip_p99_ms": float(np.percentile(slip_ms, 99)),
            "slip_max_ms": float(slip_ms.max()),
            "cpu_seconds": cpu,
        },
    )
    return 0


def leg_settings(spec: dict[str, Any]) -> Any:
    """The worker's settings: the fusion defaults (and any CLISONIX_* variables set), on the leg's topics."""
    from services.fusion.settings import FusionSettings

    return FusionSettings(
        kafka_bootstrap_servers=spec["bootstrap_servers"],
        grpc_host="127.0.0.1",
        grpc_port=0,
        metrics_host="127.0.0.1",
        metrics_port=0,
        topic_raw=spec["topic_raw"],
        topic_fused=spec["topic_out"],
        topic_deadletter=spec["topic_deadletter"],
        consumer_group=spec["group"],
        create_topics=False,
        drain_seconds=0.5,
        log_format="text",
    )


class Passthrough:
    """Reads the raw topic as a consumer group member and re-produces every record unchanged (key, value,
    headers) to the output topic, with the fusion worker's consumer and producer options, batch size and commit
    discipline (every commit interval, once what it produced is acknowledged).

    on_record: called with each record's latency in seconds (getmany returned to producer.send returned).
    """

    def __init__(self, settings: Any, on_record: Callable[[float], None]) -> None:
        self.settings = settings
        self.on_record = on_record
        self.positions: dict[Any, int] = {}  # partition -> offset after the last record handled
        self._in_flight: list[asyncio.Future[Any]] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

        from services.common.kafka import consumer_options, producer_options

        self.producer = AIOKafkaProducer(**producer_options(self.settings))
        await self.producer.start()
        self.consumer = AIOKafkaConsumer(**consumer_options(self.settings, self.settings.consumer_group))
        self.consumer.subscribe([self.settings.topic_raw])
        await self.consumer.start()
        self._last_commit = time.monotonic()
        self._task = asyncio.create_task(self.run(), name="passthrough")

    async def run(self) -> None:
        while not self._stop.is_set():
            batches = await self.consumer.getmany(timeout_ms=100, max_records=500)
            received = time.monotonic()
            for tp, records in batches.items():
                for record in records:
                    future = await self.producer.send(
                        self.settings.topic_fused, record.value, key=record.key, headers=list(record.headers)
                    )
                    self.on_record(time.monotonic() - received)
                    self._in_flight.append(future)
                    self.positions[tp] = record.offset + 1
            if time.monotonic() - self._last_commit >= self.settings.commit_interval_seconds:
                await self.commit()
        await self.commit()

    async def commit(self) -> None:
        if self._in_flight:
            in_flight, self._in_flight = self._in_flight, []
            await asyncio.gather(*in_flight)
        if self.positions:
            await self.consumer.commit(dict(self.positions))
        self._last_commit = time.monotonic()

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        await self.consumer.stop()
        await self.producer.stop()


async def leg_child(spec: dict[str, Any]) -> int:
    """Runs the leg's worker (FusionService or Passthrough) until the load has ended and it has drained.

    Latencies are taken exactly, one per window or record, with the emit time; CPU and energy are this
    process's from `go` until drained.
    """
    from bench.common import open_meter

    settings = leg_settings(spec)
    emitted: list[tuple[float, float]] = []  # (wall time, latency in seconds)

    def record(latency: float) -> None:
        emitted.append((time.time(), latency))

    stack = contextlib.AsyncExitStack()
    async with stack:
        if spec["role"] == "fusion":
            from services.fusion.service import FusionService

            service = FusionService(settings)
            await service.start()
            stack.push_async_callback(service.stop)
            worker = service.worker
            assert worker is not None
            worker.on_window_emitted = record
            consumer = worker.consumer

            def handled() -> dict[Any, int]:
                return {tp: state.position or 0 for tp, state in worker.partitions.items()}

        else:
            passthrough = Passthrough(settings, record)
            await passthrough.start()
            stack.push_async_callback(passthrough.stop)
            consumer = passthrough.consumer

            def handled() -> dict[Any, int]:
                return dict(passthrough.positions)

        # Ready once the group has settled: every worker holds its share, so no rebalance falls inside the leg.
        share = spec["partitions_per_worker"]
        deadline = time.monotonic() + 60
        while not 0 < len(consumer.assignment()) <= share:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the worker did not get its share of {share} partitions within 60 s")
            await asyncio.sleep(0.05)

        def lag() -> int:
            positions = handled()
            total = 0
            for tp in consumer.assignment():
                highwater = consumer.highwater(tp)
                if highwater is not None:
                    total += max(0, highwater - positions.get(tp, 0))
            return total

        def lag_to(end_offsets: dict[int, int]) -> int:
            positions = {tp.partition: offset for tp, offset in handled().items()}
            mine = {tp.partition for tp in consumer.assignment()}
            return sum(
                max(0, end - positions.get(partition, 0)) for partition, end in end_offsets.items() if partition in mine
            )

        meter = open_meter(spec["energy_source"])
        _say("ready")
        go = float((await _read_command())[1])
        max_lag = 0

        async def progress() -> None:
            nonlocal max_lag
            while True:
                await asyncio.sleep(1.0)
                now = time.time()
                recent = [latency for at, latency in emitted[-20_000:] if at >= now - 1.0]
                current = lag()
                max_lag = max(max_lag, current)
                _say(
                    "progress",
                    {
                        "outputs": len(emitted),
                        "p99_ms": percentiles_ms(recent)["p99"] if recent else None,
                        "lag": current,
                    },
                )

        with meter.measure() as energy:
            reporter = asyncio.create_task(progress())
            try:
                command = await _read_command()  # "end {partition: end offset}" once the load has been written
                end_offsets = {int(p): o for p, o in json.loads(command[1]).items()}
                lag_at_end = lag_to(end_offsets)
                ended = time.monotonic()
                drain_seconds: float | None = None
                while time.monotonic() - ended < DRAIN_TIMEOUT_S:
                    if lag_to(end_offsets) == 0:
                        drain_seconds = time.monotonic() - ended
                        break
                    await asyncio.sleep(0.01)
                finished = time.time()
            finally:
                reporter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reporter
        steady_from = go + spec["warmup_seconds"]
        steady = [latency for at, latency in emitted if steady_from <= at <= finished]
        _say(
            "result",
            {
                "outputs": sum(1 for at, _ in emitted if at <= finished),
                "steady_outputs": len(steady),
                "steady_seconds": max(0.0, finished - steady_from),
                "seconds": finished - go,
                "latencies_s": steady,
                "cpu_seconds": energy.cpu_seconds,
                "joules": energy.joules,
                "energy_source": energy.source,
                "lag_at_end": lag_at_end,
                "max_lag": max(max_lag, lag_at_end),
                "drain_seconds": drain_seconds,
            },
        )
        meter.close()
    return 0


def child_main(spec: dict[str, Any]) -> int:
    """A child process of a leg: "load", "passthrough" or "fusion"."""
    if spec["role"] == "load":
        return asyncio.run(load_child(spec))
    return asyncio.run(leg_child(spec))


# --- the benchmark's process --------------------------------------------------------------------------------


class Child:
    """A child process of a leg, speaking '@kind json' lines on its stdout and reading commands on its stdin."""

    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.process = process
        self.progress: dict[str, Any] = {}
        self._messages: dict[str, asyncio.Future[Any]] = {}
        self._reader = asyncio.create_task(self._read(), name=f"bench-{name}-reader")

    @classmethod
    async def start(cls, name: str, spec: dict[str, Any]) -> Child:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.fusion", "--child", json.dumps(spec),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            cwd=REPO_ROOT, limit=MAX_LINE_BYTES,
        )  # fmt: skip
        return cls(name, process)

    @property
    def pid(self) -> int:
        return self.process.pid

    def message(self, kind: str) -> asyncio.Future[Any]:
        """The future of the child's first `kind` message."""
        if kind not in self._messages:
            self._messages[kind] = asyncio.get_running_loop().create_future()
        return self._messages[kind]

    async def expect(self, kind: str, timeout_s: float) -> Any:
        return await asyncio.wait_for(asyncio.shield(self.message(kind)), timeout_s)

    async def _read(self) -> None:
        assert self.process.stdout is not None
        failure: BaseException | None = None
        try:
            async for raw in self.process.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                if not line.startswith("@"):
                    continue  # not protocol: ignore (logs go to stderr)
                kind, _, payload = line[1:].partition(" ")
                data = json.loads(payload) if payload else None
                if kind == "progress":
                    self.progress = data or {}
                elif not self.message(kind).done():
                    self.message(kind).set_result(data)
            failure = RuntimeError(f"{self.name} process exited with code {await self.process.wait()}")
        except Exception as exc:  # a line over the limit, or not JSON: the child is of no more use
            failure = RuntimeError(f"reading from the {self.name} process failed: {exc!r}")
            self.process.kill()
        finally:
            for kind in ("ready", "done", "result"):
                self.message(kind)  # so that whoever waits on one later is told too
            for future in self._messages.values():
                if not future.done():
                    future.set_exception(failure or RuntimeError(f"{self.name}: reader cancelled"))

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command.encode() + b"\n")

    async def close(self, timeout_s: float = 15.0) -> None:
        """Waits for the child to exit (it does once its work is done); kills it after `timeout_s`."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), timeout_s)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        for future in self._messages.values():
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: a failure was reported through expect() already


@dataclass
class Context:
    """What every leg of one benchmark run shares."""

    args: argparse.Namespace
    run_id: str
    bootstrap_servers: str
    broker_pid: int | None
    console: Any


async def run_leg(ctx: Context, leg: str, sessions: int, run: int, index: int, total: int) -> LegResult:
    """One leg on fresh topics: start the worker and the load generator, run, drain, delete the topics."""
    from bench.common import ProcessCpu, delete_topics
    from services.common.kafka import ensure_topics
    from services.common.settings import ServiceSettings

    args = ctx.args
    prefix = f"bench.fusion.{ctx.run_id}.{leg}.{sessions}.{run}"
    topics = {"topic_raw": f"{prefix}.raw", "topic_out": f"{prefix}.out", "topic_deadletter": f"{prefix}.deadletter"}
    admin_settings = ServiceSettings(kafka_bootstrap_servers=ctx.bootstrap_servers)
    await ensure_topics(admin_settings, topics.values(), partitions=args.partitions)
    common = {
        "bootstrap_servers": ctx.bootstrap_servers,
        "run_id": f"{ctx.run_id}-{leg}-{sessions}-{run}",
        "sessions": sessions,
        "seconds": args.seconds,
        "block_seconds": args.block_seconds,
        "eeg_channels": args.eeg_channels,
        "warmup_seconds": args.warmup_seconds,
        "energy_source": args.energy_source,
        "partitions_per_worker": -(-args.partitions // args.workers),
        **topics,
    }
    load_rate = sessions * len(STREAMS) / args.block_seconds
    label = f"[{index}/{total}] {LEG_LABELS[leg]} {sessions} sessions run {run}"
    console = ctx.console
    console.print(f"{label}: starting ...")
    children: list[Child] = []
    try:
        workers = []
        for number in range(1, args.workers + 1):
            name = f"{leg} worker {number}" if args.workers > 1 else leg
            workers.append(await Child.start(name, {**common, "role": leg, "group": f"{prefix}.group"}))
            children.append(workers[-1])
        load = await Child.start("load generator", {**common, "role": "load"})
        children.append(load)
        broker_cpu = ProcessCpu(ctx.broker_pid)
        workers_cpu = WorkersCpu([worker.pid for worker in workers])
        await asyncio.gather(*(child.expect("ready", 120) for child in children))
        broker_before = broker_cpu.seconds()
        others = OtherCpu([*(worker.pid for worker in workers), load.pid, ctx.broker_pid])
        go = time.time() + START_LEAD_S
        for child in children:
            child.send(f"go {go!r}")
        done = load.message("done")
        results_in = [worker.message("result") for worker in workers]
        while not done.done():
            await asyncio.wait([done, *results_in], timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            for worker, result_in in zip(workers, results_in, strict=True):
                if result_in.done():
                    result_in.result()  # raises where the worker died
                    raise RuntimeError(f"{worker.name} stopped before the load ended")
            share = workers_cpu.share()
            if time.time() >= go and not done.done():
                console.print(progress_line(leg, go, load.progress, merged_progress(workers), share, load_rate))
        outcome = done.result()
        for worker in workers:
            worker.send("end " + json.dumps(outcome["end_offsets"]))
        data = merged_results(await asyncio.gather(*(w.expect("result", DRAIN_TIMEOUT_S + 60) for w in workers)))
        broker_after = broker_cpu.seconds()
        other_cpu_seconds = others.seconds()
    finally:
        await asyncio.gather(*(child.close() for child in children))
        # Also after a failure: the broker keeps everything in memory, and a Kafka given by address keeps it.
        if not await delete_topics(admin_settings, list(topics.values())):
            console.print(f"could not delete the topics of {prefix}; the broker still holds them")
    result = LegResult(
        leg=leg,
        sessions=sessions,
        run=run,
        topic=topics["topic_raw"],
        records_in=outcome["records"],
        load_records_per_s=load_rate,
        outputs=data["outputs"],
        steady_outputs=data["steady_outputs"],
        steady_seconds=data["steady_seconds"],
        seconds=data["seconds"],
        latencies_s=data["latencies_s"],
        cpu_seconds=data["cpu_seconds"],
        joules=data["joules"],
        energy_source=data["energy_source"],
        lag_at_end=data["lag_at_end"],
        max_lag=data["max_lag"],
        drain_seconds=data["drain_seconds"],
        load_slip_p99_ms=outcome["slip_p99_ms"],
        load_slip_max_ms=outcome["slip_max_ms"],
        load_cpu_seconds=outcome["cpu_seconds"],
        broker_cpu_seconds=None if broker_before is None or broker_after is None else broker_after - broker_before,
        other_cpu_seconds=other_cpu_seconds,
        workers=args.workers,
    )
    p = result.percentiles_ms()
    console.print(
        f"{label}: {result.outputs:,} {result.unit}s, {result.outputs_per_s:,.1f}/s; p50 {p['p50']:.2f} ms, "
        f"p99 {p['p99']:.2f} ms, max {p['max']:.1f} ms; CPU of {result.workers} worker(s) {result.cpu_seconds:.1f} s "
        f"({result.cpu_core_share:.0%} of a core); lag at end {result.lag_at_end} records, "
        + ("drained in " + f"{result.drain_seconds:.2f} s" if result.drain_seconds is not None else "did NOT drain")
    )
    if result.other_cpu_seconds is not None and result.other_cpu_seconds > OTHER_CPU_WARNING * result.seconds:
        console.print(
            f"{label}: [yellow]other processes used {result.other_cpu_seconds:.1f} CPU s of this machine during the "
            f"leg ({result.other_cpu_seconds / result.seconds:.0%} of a core): its figures are disturbed[/yellow]"
        )
    return result


def merged_progress(workers: Sequence[Child]) -> dict[str, Any]:
    """One progress report for a leg's workers: outputs and lag summed, the worst p99."""
    reports = [worker.progress for worker in workers]
    p99s = [r["p99_ms"] for r in reports if r.get("p99_ms") is not None]
    return {
        "outputs": sum(r.get("outputs", 0) for r in reports),
        "lag": sum(r.get("lag", 0) for r in reports),
        "p99_ms": max(p99s) if p99s else None,
    }


def merged_results(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result for a leg's workers: counts, CPU and latencies pooled; the slowest drain; measured energy
    (the whole machine's, read by every worker over the same span) taken once, estimates summed."""
    drains = [r["drain_seconds"] for r in results]
    source = results[0]["energy_source"]
    joules = [r["joules"] for r in results]
    return {
        "outputs": sum(r["outputs"] for r in results),
        "steady_outputs": sum(r["steady_outputs"] for r in results),
        "steady_seconds": max(r["steady_seconds"] for r in results),
        "seconds": max(r["seconds"] for r in results),
        "latencies_s": [latency for r in results for latency in r["latencies_s"]],
        "cpu_seconds": sum(r["cpu_seconds"] for r in results),
        "joules": sum(joules) if source == "estimate" else max(joules),
        "energy_source": source,
        "lag_at_end": sum(r["lag_at_end"] for r in results),
        "max_lag": sum(r["max_lag"] for r in results),
        "drain_seconds": None if None in drains else max(drains),
    }


class WorkersCpu:
    """The CPU share of a leg's worker processes together since the last call (one core = 1.0)."""

    def __init__(self, pids: Sequence[int]) -> None:
        from bench.common import ProcessCpu

        self.processes = [ProcessCpu(pid) for pid in pids]
        self.last = self._read(), time.monotonic()

    def _read(self) -> float | None:
        readings = [process.seconds() for process in self.processes]
        return None if None in readings else sum(r for r in readings if r is not None)

    def share(self) -> float | None:
        (last_cpu, last_at), cpu, at = self.last, self._read(), time.monotonic()
        self.last = cpu, at
        return None if cpu is None or last_cpu is None or at <= last_at else (cpu - last_cpu) / (at - last_at)


class OtherCpu:
    """CPU seconds the whole machine spent busy since creation, less what `pids` and this process used."""

    def __init__(self, pids: Sequence[int | None]) -> None:
        from bench.common import ProcessCpu

        self.processes = [ProcessCpu(pid) for pid in pids if pid is not None]
        self.start = self._read()

    def _read(self) -> tuple[float, float] | None:
        from services.common.energy import machine_busy_cpu_seconds

        try:
            machine = machine_busy_cpu_seconds()
        except (OSError, ValueError):
            return None
        ours = [process.seconds() for process in self.processes]
        return machine, time.process_time() + sum(seconds or 0.0 for seconds in ours)

    def seconds(self) -> float | None:
        end = self._read()
        if self.start is None or end is None:
            return None
        return max(0.0, (end[0] - self.start[0]) - (end[1] - self.start[1]))


def progress_line(
    leg: str, go: float, load: dict[str, Any], worker: dict[str, Any], cpu_share: float | None, load_rate: float
) -> str:
    """The once-a-second line of a running leg."""
    p99 = worker.get("p99_ms")
    return (
        f"  {time.time() - go:5.1f} s  load {load.get('sent', 0):,} records (sent up to "
        f"{load.get('slip_max_ms', 0.0):.0f} ms late; {load_rate:,.0f}/s due)  "
        f"{worker.get('outputs', 0):,} {UNITS[leg]}s, p99 last s "
        + ("-" if p99 is None else f"{p99:.2f} ms")
        + f", lag {worker.get('lag', 0):,}, worker CPU "
        + ("n/a" if cpu_share is None else f"{cpu_share:.0%}")
    )


def summarise(results: list[LegResult], counts: list[int], target_ms: float, workers: int) -> dict[str, Any]:
    """Per session count and leg: pooled latency percentiles and median figures; fusion/pass-through ratios;
    the verdict against the target; the largest session count meeting it, in all and per worker."""
    by_sessions: dict[str, Any] = {}
    for count in counts:
        legs: dict[str, Any] = {}
        for name in LEGS:
            runs = [r for r in results if r.leg == name and r.sessions == count]
            if not runs:
                continue
            legs[name] = {
                "runs": len(runs),
                "unit": UNITS[name],
                "outputs": statistics.median(r.outputs for r in runs),
                "outputs_per_s": statistics.median(r.outputs_per_s for r in runs),
                "latency_ms": percentiles_ms([latency for r in runs for latency in r.latencies_s]),
                "cpu_seconds": statistics.median(r.cpu_seconds for r in runs),
                "cpu_core_share": statistics.median(r.cpu_core_share for r in runs),
                "cpu_ms_per_output": statistics.median(r.cpu_ms_per_output for r in runs),
                "joules_per_output": statistics.median(r.joules_per_output for r in runs),
                "max_lag_at_end": max(r.lag_at_end for r in runs),
                "keeps_up": all(r.keeps_up for r in runs),
            }
        entry: dict[str, Any] = {"legs": legs}
        if "passthrough" in legs and "fusion" in legs:
            bare, fused = legs["passthrough"], legs["fusion"]

            def ratio(a: float, b: float) -> float | None:
                return a / b if b else None

            entry["ratios"] = {
                "latency_p50": ratio(fused["latency_ms"]["p50"], bare["latency_ms"]["p50"]),
                "latency_p99": ratio(fused["latency_ms"]["p99"], bare["latency_ms"]["p99"]),
                "cpu_seconds": ratio(fused["cpu_seconds"], bare["cpu_seconds"]),
            }
            # Both legs read the same records on the same schedule: the difference is what fusing them costs
            # beyond reading and re-producing them (the idle fetch polling of both legs cancels out).
            entry["extra_cpu_ms_per_window"] = (
                (fused["cpu_seconds"] - bare["cpu_seconds"]) * 1000 / fused["outputs"] if fused["outputs"] else None
            )
        if "fusion" in legs:
            fused = legs["fusion"]
            passed = fused["latency_ms"]["p99"] <= target_ms and fused["keeps_up"]
            entry["verdict"] = "PASS" if passed else "BELOW TARGET"
        by_sessions[str(count)] = entry
    passing = [count for count in counts if by_sessions[str(count)].get("verdict") == "PASS"]
    return {
        "by_sessions": by_sessions,
        "target_p99_ms": target_ms,
        "workers": workers,
        "sessions_meeting_target": max(passing) if passing else None,
        "sessions_per_worker": max(passing) / workers if passing else None,
    }


def report(console: Any, results: list[LegResult], summary: dict[str, Any], source: str, args: Any) -> None:
    from rich import box
    from rich.table import Table

    from services.common.energy import DEFAULT_WATTS_PER_CORE

    table = Table(
        title=f"per leg (latency percentiles leave out the first {args.warmup_seconds:g} s of each leg; J: {source})",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    columns = ["leg", "sess", "run", "out", "out/s", "p50 ms", "p95 ms", "p99 ms", "max ms", "CPU s", "core"]
    columns += ["ms/out", "lag", "drain s", "late ms", "broker s", "others s", "J"]
    for column in columns:
        table.add_column(column, justify="left" if column == "leg" else "right")
    for r in results:
        p = r.percentiles_ms()
        table.add_row(
            LEG_LABELS[r.leg],
            str(r.sessions),
            str(r.run),
            f"{r.outputs:,} {r.unit[0]}",
            f"{r.outputs_per_s:,.1f}",
            f"{p['p50']:.2f}",
            f"{p['p95']:.2f}",
            f"{p['p99']:.2f}",
            f"{p['max']:.1f}",
            f"{r.cpu_seconds:.1f}",
            f"{r.cpu_core_share:.0%}",
            f"{r.cpu_ms_per_output:.3f}",
            str(r.lag_at_end),
            "-" if r.drain_seconds is None else f"{r.drain_seconds:.2f}",
            f"{r.load_slip_max_ms:.0f}",
            "n/a" if r.broker_cpu_seconds is None else f"{r.broker_cpu_seconds:.1f}",
            "n/a" if r.other_cpu_seconds is None else f"{r.other_cpu_seconds:.1f}",
            f"{r.joules:.0f}",
        )
    console.print(table)
    console.print(
        "out: r = records re-produced (pass-through), w = windows emitted (fusion); core: the workers' CPU as a "
        "share of one core; ms/out: worker CPU per record or window; lag: raw records not yet handled when the load "
        "ended; late ms: the load generator's worst lateness against its real-time schedule; broker s: broker CPU "
        "seconds; others s: CPU seconds of everything else on the machine (should be near 0)"
    )

    target = summary["target_p99_ms"]
    for count, entry in summary["by_sessions"].items():
        legs = entry["legs"]
        if "fusion" not in legs or "passthrough" not in legs:
            continue
        bare, fused, ratios = legs["passthrough"], legs["fusion"], entry["ratios"]
        console.print(
            f"[bold]{count} sessions[/bold] (latency pooled over runs, the rest medians of runs): "
            f"fusion window emit latency p50 {fused['latency_ms']['p50']:.2f} / p95 {fused['latency_ms']['p95']:.2f} / "
            f"p99 {fused['latency_ms']['p99']:.2f} / max {fused['latency_ms']['max']:.1f} ms vs pass-through "
            f"record latency p50 {bare['latency_ms']['p50']:.2f} / p99 {bare['latency_ms']['p99']:.2f} ms: "
            f"p99 fusion/pass-through {fmt_ratio(ratios['latency_p99'])}"
        )
        console.print(
            f"  workers' CPU fusion vs pass-through: {fused['cpu_seconds']:.1f} vs {bare['cpu_seconds']:.1f} s "
            f"({fmt_ratio(ratios['cpu_seconds'])}); {fused['cpu_core_share']:.0%} vs {bare['cpu_core_share']:.0%} "
            f"of one core; {fused['cpu_ms_per_output']:.2f} ms per window, {bare['cpu_ms_per_output']:.3f} ms per "
            f"record; fusion's CPU beyond the pass-through's: "
            + ("n/a" if entry["extra_cpu_ms_per_window"] is None else f"{entry['extra_cpu_ms_per_window']:.2f}")
            + f" ms per window; energy {fused['joules_per_output']:.3f} J per window vs "
            f"{bare['joules_per_output']:.4f} J per record"
        )
        verdict = entry["verdict"]
        style = "green" if verdict == "PASS" else "yellow"
        behind = "" if fused["keeps_up"] else "; the worker did NOT keep up with the load (lag grew)"
        console.print(
            f"  target p99 window emit latency <= {target:g} ms at {count} sessions: "
            f"[bold {style}]{verdict}[/bold {style}] (p99 {fused['latency_ms']['p99']:.2f} ms{behind})"
        )
    if len(summary["by_sessions"]) > 1:
        best = summary["sessions_meeting_target"]
        tried = ", ".join(summary["by_sessions"])
        console.print(
            f"sessions at p99 <= {target:g} ms with {summary['workers']} worker(s) (of the counts tried: {tried}): "
            + (
                f"[bold]{best}[/bold], {summary['sessions_per_worker']:g} per worker"
                if best is not None
                else "[bold yellow]none[/bold yellow]"
            )
        )
    console.print("energy: " + ENERGY_NOTES[source].format(watts=DEFAULT_WATTS_PER_CORE))


async def run(args: argparse.Namespace, console: Any) -> dict[str, Any]:
    from services.common.broker import EmbeddedBroker

    counts = args.sweep or [args.sessions]
    plan = [(count, run, leg) for count in counts for run in range(1, args.repeats + 1) for leg in LEGS]
    eeg_channels = args.eeg_channels
    console.print(
        f"fusion benchmark: sessions of {eeg_channels} ch EEG 256 Hz + ECG 360 Hz + PPG 125 Hz in "
        f"{args.block_seconds:g} s chunks, sent in real time ({len(STREAMS) / args.block_seconds:g} records/s per "
        f"session), starts staggered over the first second; {args.seconds:g} s of signal per leg; "
        f"{args.workers} worker process(es) per leg in one consumer group on {args.partitions} partitions; "
        f"sessions: {', '.join(map(str, counts))}; {len(plan)} legs, alternating pass-through and fusion, "
        f"each on fresh topics; the first {args.warmup_seconds:g} s of each leg are left out of the percentiles"
    )
    broker = None
    bootstrap = args.bootstrap_servers
    if bootstrap is None:
        broker = await asyncio.to_thread(EmbeddedBroker(port=0).start)
        bootstrap = broker.bootstrap_servers
        console.print(f"embedded broker on {bootstrap}")
    ctx = Context(
        args=args,
        run_id=uuid.uuid4().hex[:8],
        bootstrap_servers=bootstrap,
        broker_pid=broker.process.pid if broker is not None and broker.process is not None else None,
        console=console,
    )
    results: list[LegResult] = []
    try:
        for index, (count, run_number, leg) in enumerate(plan, start=1):
            results.append(await run_leg(ctx, leg, count, run_number, index, len(plan)))
    finally:
        if broker is not None:
            await asyncio.to_thread(broker.stop)

    source = results[0].energy_source if results else "estimate"
    summary = summarise(results, counts, args.target_p99_ms, args.workers)
    report(console, results, summary, source, args)
    from services.common.energy import DEFAULT_WATTS_PER_CORE

    return {
        "config": {
            key: (str(value) if isinstance(value, Path) else value)
            for key, value in vars(args).items()
            if key not in ("json", "child")
        },
        "workload": {
            "streams": [
                {"modality": name, "channels": eeg_channels if name == "eeg" else channels, "rate_hz": rate}
                for name, channels, rate in STREAMS
            ],
            "records_per_s_per_session": len(STREAMS) / args.block_seconds,
        },
        "latency_definition": "getmany() returned to producer.send() returned: per window (fusion, the worker's "
        "clisonix_fusion_window_emit_latency_seconds, taken exactly) or per record (pass-through)",
        "warmup_seconds_excluded": args.warmup_seconds,
        "energy": {"source": source, "note": ENERGY_NOTES[source].format(watts=DEFAULT_WATTS_PER_CORE)},
        "runs": [r.summary() for r in results],
        **summary,
    }


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark; returns 0 when it ran (whatever the verdict), 1 when something failed."""

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        check_args(parser, args)
    except SystemExit as exc:  # --help, or bad options (argparse has printed why)
        return exc.code if isinstance(exc.code, int) else 2
    if args.child:
        return child_main(json.loads(args.child))
    return run_and_report(run, args, width=180)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
