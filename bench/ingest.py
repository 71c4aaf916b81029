"""Ingest benchmark: the real gRPC ingest path against a bare Kafka producer writing the same records.

Both legs run in one process, side by side, in alternating order (bare, ingest, bare, ingest, ...), each
against a fresh topic of the same broker, so the ratios hold on a shared, noisy machine even where the
absolute figures do not. See bench/README.md.

    clisonix bench ingest [--seconds-of-signal S] [--streams N] [--repeats R] [--json PATH] ...
    python -m bench.ingest [options]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ProcessCpu, delete_topics, fmt_ratio, open_meter, run_and_report
from clisonix.signal.v1 import signal_pb2
from services.common.chunks import SampleBlock, StreamSpec, to_chunk
from services.common.energy import DEFAULT_WATTS_PER_CORE, EnergyMeter

TARGET_RATIO = 0.7
PSEUDONYM_KEY = "bench-pseudonym-key-0123456789"
MB = 1e6  # figures are in decimal megabytes of sample bytes

ENERGY_NOTES = {
    "estimate": "estimate = this process's CPU time x {watts:g} W per busy core; not a measurement, "
    "and the broker process is not in it",
    "rapl": "rapl = measured CPU package energy of the whole machine (broker and anything else running included)",
    "nvml": "nvml = measured GPU energy only; the CPU work of this benchmark is not in it",
}


REPO_ROOT = Path(__file__).resolve().parents[1]
# The chunk duration every `clisonix stream` source sends by default.
DEFAULT_BLOCK_SECONDS = 0.25


@dataclass
class Workload:
    """The blocks each stream sends and the records a bare producer writes for them (serialised once)."""

    sessions: list[str]
    blocks: list[list[SampleBlock]]  # per stream
    records: list[list[tuple[bytes, bytes, list[tuple[str, bytes]]]]]  # per stream: key, value, headers
    samples: int  # sample frames over all streams (what the ingest client counts as samples)
    payload_bytes: int  # sample bytes over all streams
    record_bytes: int  # serialised SignalChunk bytes over all streams

    @property
    def chunks(self) -> int:
        return sum(len(blocks) for blocks in self.blocks)


@dataclass
class LegResult:
    """One measured leg."""

    leg: str  # "bare" or "ingest"
    run: int
    topic: str
    chunks: int
    samples: int
    payload_bytes: int
    seconds: float
    latencies_s: list[float] = field(repr=False)
    cpu_seconds: float
    joules: float
    energy_source: str
    broker_cpu_seconds: float | None

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.payload_bytes / MB / self.seconds

    @property
    def joules_per_mb(self) -> float:
        return self.joules / (self.payload_bytes / MB)

    def percentiles_ms(self) -> tuple[float, float]:
        return percentiles_ms(self.latencies_s)

    def summary(self) -> dict[str, Any]:
        p50, p99 = self.percentiles_ms()
        data = {k: v for k, v in asdict(self).items() if k != "latencies_s"}
        data.update(
            samples_per_s=self.samples_per_s,
            mb_per_s=self.mb_per_s,
            latency_p50_ms=p50,
            latency_p99_ms=p99,
            joules_per_mb=self.joules_per_mb,
        )
        return data


def percentiles_ms(latencies_s: Sequence[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds (0, 0 for none)."""
    if not latencies_s:
        return 0.0, 0.0
    p50, p99 = np.percentile(np.asarray(latencies_s), [50, 99]) * 1000
    return float(p50), float(p99)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clisonix bench ingest",
        description="Throughput, latency and energy of the gRPC ingest path, side by side with a bare aiokafka "
        "producer writing the same SignalChunk records with the same producer options.",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--seconds-of-signal", type=float, default=15.0, help="seconds of signal per stream and leg (default 15)"
    )
    size.add_argument("--chunks", type=int, help="chunks per stream and leg (instead of --seconds-of-signal)")
    parser.add_argument("--channels", type=int, default=32, help="EEG channels per stream (default 32)")
    parser.add_argument("--rate", type=float, default=1000.0, help="sample rate in Hz (default 1000)")
    parser.add_argument(
        "--block-seconds",
        type=float,
        default=DEFAULT_BLOCK_SECONDS,
        help=f"seconds of signal per chunk (default {DEFAULT_BLOCK_SECONDS:g}, as `clisonix stream` sends: "
        "32 KB chunks at 32 ch x 1000 Hz)",
    )
    parser.add_argument("--streams", type=int, default=4, help="concurrent streams, one session each (default 4)")
    parser.add_argument(
        "--max-unacked",
        type=int,
        default=32,
        help="chunks in flight per stream, for the ingest client and the bare producer alike (default 32)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="bare/ingest pairs, run alternately (default 5)")
    parser.add_argument("--bootstrap-servers", help="use this Kafka instead of starting the embedded broker")
    parser.add_argument(
        "--energy-source",
        choices=["auto", "rapl", "nvml", "estimate"],
        default="auto",
        help="energy source (default auto: rapl where readable, else the CPU-time estimate)",
    )
    parser.add_argument(
        "--clients",
        choices=["process", "same"],
        default="process",
        help="where the gRPC clients run: in their own process, as devices would (default), or in the "
        "benchmark's process beside the ingest server",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    # Internal: the client process of the ingest leg.
    parser.add_argument("--client-worker", metavar="TARGET", help=argparse.SUPPRESS)
    parser.add_argument("--run-id", help=argparse.SUPPRESS)
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    positive = {
        "--channels": args.channels,
        "--rate": args.rate,
        "--block-seconds": args.block_seconds,
        "--streams": args.streams,
        "--max-unacked": args.max_unacked,
        "--repeats": args.repeats,
        "--seconds-of-signal": args.seconds_of_signal,
    }
    if args.chunks is not None:
        positive["--chunks"] = args.chunks
    for name, value in positive.items():
        if not value > 0:
            parser.error(f"{name} must be positive")
    if round(args.rate * args.block_seconds) < 1:
        parser.error("--rate x --block-seconds must be at least one sample per chunk")


def build_workload(args: argparse.Namespace, run_id: str) -> Workload:
    """Deterministic EEG-like blocks per stream, and the exact records ingest would write for them."""
    from services.common.events import event_headers
    from services.ingest.pipeline import SOURCE
    from services.ingest.pseudonyms import Pseudonymiser

    samples_per_block = round(args.rate * args.block_seconds)
    blocks_per_stream = args.chunks or max(1, round(args.seconds_of_signal / (samples_per_block / args.rate)))
    spec = StreamSpec(
        "eeg-0",
        signal_pb2.MODALITY_EEG,
        tuple(f"EEG{i:03d}" for i in range(args.channels)),
        ("uV",) * args.channels,
        args.rate,
    )
    pseudonyms = Pseudonymiser(PSEUDONYM_KEY.encode())
    sessions = [f"bench-{run_id}-{i}" for i in range(args.streams)]
    blocks: list[list[SampleBlock]] = []
    records: list[list[tuple[bytes, bytes, list[tuple[str, bytes]]]]] = []
    record_bytes = 0
    for stream, session in enumerate(sessions):
        rng = np.random.default_rng(stream)
        stream_blocks = [
            SampleBlock(
                spec,
                index * samples_per_block / args.rate,
                (rng.standard_normal((args.channels, samples_per_block)) * 20.0).astype(np.float32),
            )
            for index in range(blocks_per_stream)
        ]
        blocks.append(stream_blocks)
        # What ingest writes: pseudonymised ids, ingest time set, CloudEvents headers, keyed by session.
        pseudonym = pseudonyms.pseudonym("session", session)
        stream_records = []
        for sequence, block in enumerate(stream_blocks):
            chunk = to_chunk(block, pseudonym, sequence)
            chunk.ingest_time.GetCurrentTime()
            value = chunk.SerializeToString()
            headers = event_headers(chunk, SOURCE, event_id=f"{pseudonym}/{chunk.stream_id}/{sequence}")
            stream_records.append((pseudonym.encode(), value, headers))
            record_bytes += len(value)
        records.append(stream_records)
    chunks = args.streams * blocks_per_stream
    return Workload(
        sessions=sessions,
        blocks=blocks,
        records=records,
        samples=chunks * samples_per_block,
        payload_bytes=chunks * samples_per_block * args.channels * 4,
        record_bytes=record_bytes,
    )


def ingest_settings(bootstrap_servers: str, topic: str, deadletter: str, max_unacked: int) -> Any:
    """Ingest settings for one leg: loopback, free ports, its own topic, no rate limit in the way."""
    from services.ingest.settings import IngestSettings

    return IngestSettings(
        kafka_bootstrap_servers=bootstrap_servers,
        grpc_host="127.0.0.1",
        grpc_port=0,
        metrics_host="127.0.0.1",
        metrics_port=0,
        pseudonym_key=PSEUDONYM_KEY,
        topic_raw=topic,
        topic_deadletter=deadletter,
        # The benchmark measures capacity: the per-client rate limit would cap it, not the path.
        max_chunks_per_second=1e9,
        max_chunk_burst=1_000_000,
        max_unacked_per_stream=max_unacked,
        drain_seconds=1.0,
        log_format="text",
    )


async def bare_leg(
    run: int,
    topic: str,
    settings: Any,
    workload: Workload,
    max_unacked: int,
    meter: EnergyMeter,
    broker_cpu: ProcessCpu,
) -> LegResult:
    """The pre-serialised records through one AIOKafkaProducer, `max_unacked` in flight per stream."""
    from aiokafka import AIOKafkaProducer

    from services.common.kafka import ensure_topics, producer_options

    await ensure_topics(settings, [topic])
    producer = AIOKafkaProducer(**producer_options(settings))
    await producer.start()
    try:
        key, value, headers = workload.records[0][0]
        await (await producer.send(topic, value, key=key, headers=headers))  # warm-up: topic metadata
        latencies: list[float] = []

        async def one_stream(records: list[tuple[bytes, bytes, list[tuple[str, bytes]]]]) -> None:
            window = asyncio.Semaphore(max_unacked)
            deliveries = []
            for key, value, headers in records:
                await window.acquire()
                sent = time.perf_counter()
                delivery = await producer.send(topic, value, key=key, headers=headers)

                def delivered(_: asyncio.Future[Any], sent: float = sent) -> None:
                    latencies.append(time.perf_counter() - sent)
                    window.release()

                delivery.add_done_callback(delivered)
                deliveries.append(delivery)
            await asyncio.gather(*deliveries)

        broker_before = broker_cpu.seconds()
        with meter.measure() as energy:
            started = time.perf_counter()
            await asyncio.gather(*(one_stream(records) for records in workload.records))
            seconds = time.perf_counter() - started
        broker_after = broker_cpu.seconds()
    finally:
        await producer.stop()
    return LegResult(
        leg="bare",
        run=run,
        topic=topic,
        chunks=workload.chunks,
        samples=workload.samples,
        payload_bytes=workload.payload_bytes,
        seconds=seconds,
        latencies_s=latencies,
        cpu_seconds=energy.cpu_seconds,
        joules=energy.joules,
        energy_source=energy.source,
        broker_cpu_seconds=None if broker_before is None or broker_after is None else broker_after - broker_before,
    )


async def ingest_leg(
    run: int,
    topic: str,
    settings: Any,
    workload: Workload,
    max_unacked: int,
    meter: EnergyMeter,
    broker_cpu: ProcessCpu,
    worker_argv: list[str] | None = None,
) -> LegResult:
    """The blocks through an in-process IngestService (real gRPC server, real Kafka), one StreamClient each.

    worker_argv: run the clients in a child process started with these arguments (None: in this process).
    The energy and CPU figures are then the ingest server's alone, as the bare leg's are the producer's.
    """
    from services.ingest.client import StreamClient
    from services.ingest.service import IngestService

    service = IngestService(settings)
    await service.start()
    try:
        target = f"127.0.0.1:{service.grpc_port}"
        # Warm-up: one chunk of another session (gRPC channel set-up, topic metadata), as the bare leg does.
        warm = await StreamClient(target, f"{workload.sessions[0]}-warmup", speed=None, max_unacked=max_unacked).run(
            iter(workload.blocks[0][:1])
        )
        if warm.chunks_acked != 1:
            raise RuntimeError(f"ingest warm-up failed: {warm.rejections or 'no ack'}")
        broker_before = broker_cpu.seconds()
        with meter.measure() as energy:
            if worker_argv is None:
                progresses, seconds = await run_clients(target, workload, max_unacked)
                acked = sum(progress.chunks_acked for progress in progresses)
                rejected = sum(progress.rejected for progress in progresses)
                samples = sum(progress.samples_acked for progress in progresses)
                latencies = [latency for progress in progresses for latency in progress.ack_latencies_s]
            else:
                outcome = await run_client_process(worker_argv + ["--client-worker", target])
                acked, rejected, samples = outcome["acked"], outcome["rejected"], outcome["samples"]
                seconds, latencies = outcome["seconds"], outcome["latencies_s"]
        broker_after = broker_cpu.seconds()
    finally:
        await service.stop()
    if acked != workload.chunks or rejected:
        raise RuntimeError(f"ingest acked {acked} of {workload.chunks} chunks, rejected {rejected}")
    return LegResult(
        leg="ingest",
        run=run,
        topic=topic,
        chunks=acked,
        samples=samples,
        payload_bytes=workload.payload_bytes,
        seconds=seconds,
        latencies_s=latencies,
        cpu_seconds=energy.cpu_seconds,
        joules=energy.joules,
        energy_source=energy.source,
        broker_cpu_seconds=None if broker_before is None or broker_after is None else broker_after - broker_before,
    )


async def run_clients(target: str, workload: Workload, max_unacked: int) -> tuple[list[Any], float]:
    """One StreamClient per stream, all at once, as fast as acks allow; returns their progress and the seconds."""
    from services.ingest.client import StreamClient

    clients = [StreamClient(target, session, speed=None, max_unacked=max_unacked) for session in workload.sessions]
    started = time.perf_counter()
    progresses = await asyncio.gather(
        *(client.run(iter(blocks)) for client, blocks in zip(clients, workload.blocks, strict=True))
    )
    return list(progresses), time.perf_counter() - started


async def run_client_process(argv: list[str]) -> dict[str, Any]:
    """Starts the client worker, lets it build its blocks, then times its run; returns its JSON outcome."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.ingest", *argv,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )  # fmt: skip
    assert process.stdin is not None and process.stdout is not None
    ready = await asyncio.wait_for(process.stdout.readline(), 120)
    if ready.strip() != b"ready":
        raise RuntimeError(f"client worker did not start: {ready!r}")
    process.stdin.write(b"go\n")
    await process.stdin.drain()
    output = await asyncio.wait_for(process.stdout.read(), 600)
    if await process.wait() != 0:
        raise RuntimeError(f"client worker exited with {process.returncode}")
    return json.loads(output)


def client_worker(args: argparse.Namespace) -> int:
    """The client side of the ingest leg in its own process: build the same blocks, wait for go, stream them."""
    workload = build_workload(args, args.run_id)
    print("ready", flush=True)
    sys.stdin.readline()
    progresses, seconds = asyncio.run(run_clients(args.client_worker, workload, args.max_unacked))
    outcome = {
        "acked": sum(p.chunks_acked for p in progresses),
        "rejected": sum(p.rejected for p in progresses),
        "samples": sum(p.samples_acked for p in progresses),
        "seconds": seconds,
        "latencies_s": [latency for p in progresses for latency in p.ack_latencies_s],
    }
    print(json.dumps(outcome), flush=True)
    return 0


def summarise(results: list[LegResult]) -> dict[str, Any]:
    """Per-leg medians (throughput, energy) and pooled latency percentiles, and the ingest/bare ratios."""
    legs: dict[str, Any] = {}
    for name in ("bare", "ingest"):
        runs = [r for r in results if r.leg == name]
        p50, p99 = percentiles_ms([latency for r in runs for latency in r.latencies_s])
        legs[name] = {
            "runs": len(runs),
            "samples_per_s": statistics.median(r.samples_per_s for r in runs),
            "mb_per_s": statistics.median(r.mb_per_s for r in runs),
            "latency_p50_ms": p50,
            "latency_p99_ms": p99,
            "cpu_seconds_per_mb": statistics.median(r.cpu_seconds / (r.payload_bytes / MB) for r in runs),
            "joules_per_mb": statistics.median(r.joules_per_mb for r in runs),
        }
    bare, ingest = legs["bare"], legs["ingest"]
    pairs = [
        i.samples_per_s / b.samples_per_s
        for b, i in zip([r for r in results if r.leg == "bare"], [r for r in results if r.leg == "ingest"], strict=True)
    ]
    # Side by side: each ingest leg against the bare leg just before it; the median of those pairs.
    throughput_ratio = statistics.median(pairs)
    ratios = {
        "throughput": throughput_ratio,
        "throughput_per_pair": pairs,
        "latency_p50": ingest["latency_p50_ms"] / bare["latency_p50_ms"] if bare["latency_p50_ms"] else None,
        "latency_p99": ingest["latency_p99_ms"] / bare["latency_p99_ms"] if bare["latency_p99_ms"] else None,
        "joules_per_mb": ingest["joules_per_mb"] / bare["joules_per_mb"] if bare["joules_per_mb"] else None,
    }
    return {
        "legs": legs,
        "ratios": ratios,
        "target_throughput_ratio": TARGET_RATIO,
        "verdict": "PASS" if throughput_ratio >= TARGET_RATIO else "BELOW TARGET",
    }


def report(
    console: Any, results: list[LegResult], summary: dict[str, Any], source: str, watts: float, args: Any
) -> None:
    from rich import box
    from rich.table import Table

    table = Table(title="per leg", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("leg", "run", "s", "samples/s", "MB/s", "p50 ms", "p99 ms", "CPU s", "broker CPU s"):
        table.add_column(column, justify="left" if column == "leg" else "right")
    table.add_column(f"J ({source})", justify="right")
    table.add_column("J/MB", justify="right")
    for r in results:
        p50, p99 = r.percentiles_ms()
        table.add_row(
            r.leg,
            str(r.run),
            f"{r.seconds:.2f}",
            f"{r.samples_per_s:,.0f}",
            f"{r.mb_per_s:.2f}",
            f"{p50:.1f}",
            f"{p99:.1f}",
            f"{r.cpu_seconds:.2f}",
            "n/a" if r.broker_cpu_seconds is None else f"{r.broker_cpu_seconds:.2f}",
            f"{r.joules:.1f}",
            f"{r.joules_per_mb:.2f}",
        )
    console.print(table)

    legs, ratios = summary["legs"], summary["ratios"]
    totals = Table(
        title="summary (throughput, CPU and J/MB: median of runs; latency: pooled over runs; "
        "throughput ratio: median of the per-pair ratios)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    for column in ("leg", "samples/s", "MB/s", "p50 ms", "p99 ms", "CPU s/MB", f"J/MB ({source})"):
        totals.add_column(column, justify="left" if column == "leg" else "right")
    for name, label in (("bare", "bare producer"), ("ingest", "ingest (gRPC)")):
        leg = legs[name]
        totals.add_row(
            label,
            f"{leg['samples_per_s']:,.0f}",
            f"{leg['mb_per_s']:.2f}",
            f"{leg['latency_p50_ms']:.1f}",
            f"{leg['latency_p99_ms']:.1f}",
            f"{leg['cpu_seconds_per_mb']:.3f}",
            f"{leg['joules_per_mb']:.2f}",
        )
    totals.add_row(
        "ingest / bare",
        fmt_ratio(ratios["throughput"]),
        fmt_ratio(ratios["throughput"]),
        fmt_ratio(ratios["latency_p50"]),
        fmt_ratio(ratios["latency_p99"]),
        fmt_ratio(legs["ingest"]["cpu_seconds_per_mb"] / legs["bare"]["cpu_seconds_per_mb"])
        if legs["bare"]["cpu_seconds_per_mb"]
        else "n/a",
        fmt_ratio(ratios["joules_per_mb"]),
    )
    console.print(totals)

    pairs = ", ".join(f"{p:.2f}x" for p in ratios["throughput_per_pair"])
    verdict = summary["verdict"]
    style = "green" if verdict == "PASS" else "yellow"
    console.print(
        f"throughput ingest/bare: [bold]{ratios['throughput']:.2f}x[/bold] (median of the per-pair ratios {pairs}); "
        f"target >= {TARGET_RATIO:.2f}x: [bold {style}]{verdict}[/bold {style}] (informational)"
    )
    console.print(
        f"ack latency ingest vs bare delivery: p50 {legs['ingest']['latency_p50_ms']:.1f} vs "
        f"{legs['bare']['latency_p50_ms']:.1f} ms ({fmt_ratio(ratios['latency_p50'])}), "
        f"p99 {legs['ingest']['latency_p99_ms']:.1f} vs {legs['bare']['latency_p99_ms']:.1f} ms "
        f"({fmt_ratio(ratios['latency_p99'])}); window {args.max_unacked} in flight per stream x {args.streams}"
    )
    console.print(
        f"energy per MB: ingest {legs['ingest']['joules_per_mb']:.2f} J/MB vs bare "
        f"{legs['bare']['joules_per_mb']:.2f} J/MB ({fmt_ratio(ratios['joules_per_mb'])}); "
        + ENERGY_NOTES[source].format(watts=watts)
    )


async def run(args: argparse.Namespace, console: Any) -> dict[str, Any]:
    from services.common.broker import EmbeddedBroker

    run_id = uuid.uuid4().hex[:8]
    workload = build_workload(args, run_id)
    worker_argv = None
    if args.clients == "process":
        worker_argv = [
            "--channels", str(args.channels), "--rate", str(args.rate), "--block-seconds", str(args.block_seconds),
            "--streams", str(args.streams), "--max-unacked", str(args.max_unacked), "--run-id", run_id,
            *(["--chunks", str(args.chunks)] if args.chunks else ["--seconds-of-signal", str(args.seconds_of_signal)]),
        ]  # fmt: skip
    legs = [name for _ in range(args.repeats) for name in ("bare", "ingest")]
    console.print(
        f"ingest benchmark: {args.streams} streams x {len(workload.blocks[0])} chunks of "
        f"{args.channels} ch x {round(args.rate * args.block_seconds)} samples "
        f"({workload.payload_bytes / workload.chunks / 1000:.1f} KB of samples each), "
        f"{workload.payload_bytes / MB:.1f} MB per leg, {len(legs)} legs; each leg's topic is deleted after it"
    )
    broker = None
    bootstrap = args.bootstrap_servers
    if bootstrap is None:
        broker = await asyncio.to_thread(EmbeddedBroker(port=0).start)
        bootstrap = broker.bootstrap_servers
        console.print(f"embedded broker on {bootstrap}")
    broker_cpu = ProcessCpu(broker.process.pid if broker is not None and broker.process is not None else None)
    meter = open_meter(args.energy_source)
    watts = DEFAULT_WATTS_PER_CORE
    results: list[LegResult] = []
    undeleted: list[str] = []
    try:
        deadletter = f"bench.ingest.{run_id}.deadletter"
        for index, name in enumerate(legs):
            run_number = index // 2 + 1
            topic = f"bench.ingest.{run_id}.{name}{run_number}"
            settings = ingest_settings(bootstrap, topic, deadletter, args.max_unacked)
            label = "bare producer" if name == "bare" else "ingest (gRPC)"
            console.print(f"[{index + 1}/{len(legs)}] {label:<14} run {run_number} ...", end=" ")
            gc.collect()
            if name == "bare":
                result = await bare_leg(run_number, topic, settings, workload, args.max_unacked, meter, broker_cpu)
            else:
                result = await ingest_leg(
                    run_number, topic, settings, workload, args.max_unacked, meter, broker_cpu, worker_argv
                )
            p50, p99 = result.percentiles_ms()
            console.print(
                f"{result.seconds:.2f} s, {result.samples_per_s:,.0f} samples/s, {result.mb_per_s:.2f} MB/s, "
                f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"
            )
            results.append(result)
            if not await delete_topics(settings, [topic]):
                undeleted.append(topic)
        if results and not await delete_topics(settings, [deadletter]):
            undeleted.append(deadletter)
    finally:
        source = meter.source
        meter.close()
        if broker is not None:
            await asyncio.to_thread(broker.stop)

    summary = summarise(results)
    report(console, results, summary, source, watts, args)
    if undeleted:
        console.print(f"could not delete {len(undeleted)} benchmark topics; the broker still holds them: {undeleted}")
    return {
        "config": {
            key: (str(value) if isinstance(value, Path) else value)
            for key, value in vars(args).items()
            if key != "json"
        },
        "workload": {
            "chunks_per_leg": workload.chunks,
            "samples_per_leg": workload.samples,
            "payload_bytes_per_leg": workload.payload_bytes,
            "record_bytes_per_leg": workload.record_bytes,
        },
        "undeleted_topics": undeleted,
        "energy": {"source": source, "note": ENERGY_NOTES[source].format(watts=watts)},
        "runs": [r.summary() for r in results],
        **summary,
    }


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark; returns 0 when it ran (whatever the ratio), 1 when something failed."""

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        check_args(parser, args)
    except SystemExit as exc:  # --help, or bad options (argparse has printed why)
        return exc.code if isinstance(exc.code, int) else 2
    if args.client_worker:
        return client_worker(args)
    return run_and_report(run, args, width=120)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
