"""Tide benchmark: acknowledged writes/s and write latency through three replica processes, time until a write is
visible on all three, catch-up rate of a fresh replica, beside a bare aiokafka producer as the pass-through floor.

Write leg: the embedded broker (or --bootstrap-servers), one fresh command log, three replicas each as its own
process (`python -m services.tide`, distinct ports, snapshot files in a temporary folder). This process keeps
`--in-flight` BatchWrite calls of `--batch` writes open over gRPC (`--batch 1`: single Put calls), spread
round-robin over the replicas, for `--writes` writes of small values on `--keys` keys. A batch's records are
queued together, so the replica's producer sends them in few requests. Per write: latency = call -> answer (the
replica answers once it applied every record of the call locally); visible everywhere = call -> the write's
version arrived on the WatchBatches streams of all three replicas, measured on every `--probe-every`th write
(those go under a prefix the streams follow, so the streams carry a tenth of the log; streams opened before the
first write, read in this process: their stamps include this process's own delay).

Catch-up leg: a fourth replica in this process (no gRPC: the apply loop of services.tide.replica alone, so
neither process start nor the other replicas' work is in the figure) starts with no snapshot and applies the
whole log; records/s until it reaches the log's end offsets. Its digests must equal the three replicas'.

Baseline: a bare aiokafka producer with the replicas' producer settings sends the same Command records (same
headers) to a separate topic, `--batch` records queued at once by each of `--in-flight` senders: acknowledged
sends/s and ack latency (nobody applies them).

Targets (issue 5): >= 10,000 writes/s with batching; visible on all replicas p99 <= 50 ms; catch-up >= 100,000
records/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ProcessCpu, delete_topics, fmt_ratio, run_and_report
from services.common.broker import free_port

TARGET_WRITES_PER_S = 10_000.0
TARGET_VISIBLE_P99_MS = 50.0
TARGET_CATCH_UP_PER_S = 100_000.0
PREFIX = "bench/"
PROBE_PREFIX = "bench/probe/"
REPLICAS = 3


def percentiles_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    array = np.asarray(values) * 1e3
    return {
        "p50": float(np.percentile(array, 50)),
        "p99": float(np.percentile(array, 99)),
        "max": float(array.max()),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clisonix bench tide",
        description="Tide: acknowledged writes/s and latency through 3 replica processes, time until visible on "
        "all 3, catch-up rate of a fresh replica; a bare aiokafka producer beside it as the floor.",
    )
    parser.add_argument("--bootstrap-servers", help="use this Kafka instead of starting the embedded broker")
    parser.add_argument("--writes", type=int, default=60_000, help="writes measured (default 60000)")
    parser.add_argument("--warmup-writes", type=int, default=2000, help="writes before measuring (default 2000)")
    parser.add_argument("--batch", type=int, default=100, help="writes per BatchWrite call; 1: single Put calls (100)")
    parser.add_argument("--in-flight", type=int, default=3, help="write calls kept open at once (default 3)")
    parser.add_argument("--keys", type=int, default=1000, help="distinct keys written (default 1000)")
    parser.add_argument("--value-bytes", type=int, default=64, help="bytes per value (default 64)")
    parser.add_argument(
        "--probe-every",
        type=int,
        default=10,
        help="every Nth write goes to a key the Watch streams follow: its time until visible on all is measured (10)",
    )
    parser.add_argument("--partitions", type=int, default=3, help="partitions of the command log (default 3)")
    parser.add_argument(
        "--visible-timeout",
        type=float,
        default=20.0,
        help="seconds to wait, after the last acknowledgement, for every write to be visible everywhere (20)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser


def _settings(bootstrap: str, topic: str, partitions: int) -> Any:
    from services.tide.settings import TideSettings

    return TideSettings(
        kafka_bootstrap_servers=bootstrap,
        topic_log=topic,
        kafka_topic_partitions=partitions,
        grpc_host="127.0.0.1",
        grpc_port=0,
        metrics_host="127.0.0.1",
        metrics_port=0,
        log_format="text",
        energy_source="estimate",
    )


async def start_replicas(args: argparse.Namespace, bootstrap: str, topic: str, folder: Path) -> list[Any]:
    from services.processes import ServiceProcess

    processes = [
        ServiceProcess(
            "tide",
            free_port(),
            free_port(),
            env={
                "CLISONIX_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                "CLISONIX_TOPIC_LOG": topic,
                "CLISONIX_KAFKA_TOPIC_PARTITIONS": str(args.partitions),
                "CLISONIX_SNAPSHOT_PATH": str(folder / f"replica-{i}.snapshot"),
                "CLISONIX_GRPC_HOST": "127.0.0.1",
                "CLISONIX_METRICS_HOST": "127.0.0.1",
                "CLISONIX_LOG_FORMAT": "text",
                "CLISONIX_ENERGY_SOURCE": "estimate",
            },
            log_path=folder / f"replica-{i}.log",
        )
        for i in range(REPLICAS)
    ]
    try:
        await asyncio.gather(*(asyncio.to_thread(p.start, 60.0) for p in processes))
    except BaseException:
        for process in processes:
            await asyncio.to_thread(process.stop)
        raise
    return processes


def print_replica_logs(folder: Path, console: Any, lines: int = 8) -> None:
    """The last warnings and errors of each replica's log, when a leg failed."""
    for index in range(REPLICAS):
        path = folder / f"replica-{index}.log"
        if not path.exists():
            continue
        worrying = [line for line in path.read_text().splitlines() if " WARNING " in line or " ERROR " in line]
        console.print(f"  replica {index}: {len(worrying)} warnings and errors; the last ones:", markup=False)
        for line in worrying[-lines:]:
            console.print(f"    {line}", markup=False)


async def write_leg(
    args: argparse.Namespace, targets: list[str], console: Any, acked: Callable[[], None]
) -> dict[str, Any]:
    """Warm-up, then the measured writes with WatchBatches streams open on every replica; `acked` is called once
    the last measured write was acknowledged (before waiting for every write to be visible)."""
    import grpc

    from clisonix.tide.v1 import tide_pb2, tide_pb2_grpc

    channels = [grpc.aio.insecure_channel(t) for t in targets]
    stubs = [tide_pb2_grpc.TideServiceStub(c) for c in channels]
    value = os.urandom(args.value_bytes)
    digest = await stubs[0].Digest(tide_pb2.DigestRequest(), timeout=10)
    partitions = [d.partition for d in digest.partitions]
    seen: list[dict[tuple[int, int], float]] = [{} for _ in stubs]

    async def watch(index: int) -> None:
        request = tide_pb2.WatchRequest(
            prefix=PROBE_PREFIX, from_versions=[tide_pb2.Version(partition=p, offset=0) for p in partitions]
        )
        arrivals = seen[index]
        async for batch in stubs[index].WatchBatches(request):
            now = time.perf_counter()
            for change in batch.changes:
                arrivals[(change.version.partition, change.version.offset)] = now

    def key(i: int) -> str:
        return f"{PROBE_PREFIX if i % args.probe_every == 0 else PREFIX}{i % args.keys}"

    async def put_many(count: int, record: dict[tuple[int, int], float] | None, latencies: list[float]) -> None:
        counter = itertools.count()

        async def write(stub: Any, first: int, size: int) -> list[Any]:
            if args.batch == 1:
                return [await stub.Put(tide_pb2.PutRequest(key=key(first), value=value), timeout=30)]
            commands = [
                tide_pb2.Command(key=key(i), put=tide_pb2.Command.Put(value=value)) for i in range(first, first + size)
            ]
            reply = await stub.BatchWrite(tide_pb2.BatchWriteRequest(commands=commands), timeout=30)
            return list(reply.results)

        async def writer(w: int) -> None:
            stub = stubs[w % len(stubs)]
            while (first := next(counter) * args.batch) < count:
                size = min(args.batch, count - first)
                t0 = time.perf_counter()
                results = await write(stub, first, size)
                latency = time.perf_counter() - t0
                for i, result in enumerate(results, start=first):
                    latencies.append(latency)
                    if result.outcome != tide_pb2.OUTCOME_APPLIED:
                        raise RuntimeError(f"write answered outcome {result.outcome}")
                    if record is not None and i % args.probe_every == 0:
                        record[(result.version.partition, result.version.offset)] = t0

        await asyncio.gather(*(writer(w) for w in range(args.in_flight)))

    watchers = [asyncio.create_task(watch(i)) for i in range(len(stubs))]
    try:
        await put_many(args.warmup_writes, None, [])
        started: dict[tuple[int, int], float] = {}
        latencies: list[float] = []
        t0 = time.perf_counter()
        await put_many(args.writes, started, latencies)
        elapsed = time.perf_counter() - t0
        acked()
        console.print(f"  {args.writes} writes acknowledged in {elapsed:.2f} s")
        # Wait (bounded) until every measured write arrived on every replica's Watch stream. A write still
        # missing at the deadline counts with the time waited so far (a lower bound), and is reported.
        deadline = time.monotonic() + args.visible_timeout
        while not all(all(v in s for v in started) for s in seen) and time.monotonic() < deadline:
            for w in watchers:
                if w.done():
                    w.result()  # a stream that ended raises its error here
                    raise RuntimeError("a Watch stream ended")
            await asyncio.sleep(0.05)
        waited = time.perf_counter()
        visible = [max(s.get(v, waited) for s in seen) - t for v, t in started.items()]
        missing = [sum(v not in s for v in started) for s in seen]
        if any(missing):
            console.print(
                f"  [red]writes not yet visible after {args.visible_timeout:g} s, per replica: {missing}[/red] "
                "(counted with the time waited: a lower bound)"
            )
        # Digests at equal offsets: the furthest any replica applied (the replicas' own digest reports keep landing
        # for a moment after the last write, so "now" differs between replicas).
        now = [await stub.Digest(tide_pb2.DigestRequest(), timeout=10) for stub in stubs]
        ends: dict[int, int] = {}
        for reply in now:
            for d in reply.partitions:
                ends[d.partition] = max(ends.get(d.partition, 0), d.applied.offset)
        at = [tide_pb2.AppliedOffset(partition=p, offset=o) for p, o in sorted(ends.items())]
        digests = [await stub.Digest(tide_pb2.DigestRequest(at=at), timeout=10) for stub in stubs]
    finally:
        for w in watchers:
            w.cancel()
        for w in watchers:
            with contextlib.suppress(BaseException):
                await w
        for channel in channels:
            await channel.close()
    return {
        "writes": args.writes,
        "seconds": elapsed,
        "writes_per_second": args.writes / elapsed,
        "latency_ms": percentiles_ms(latencies),
        "visible_all_ms": percentiles_ms(visible),
        "not_visible_per_replica": missing,
        # Probe writes whose time until visible on all was measured (distinct versions: two writes never share one).
        "probes": len(started),
        "digests": [{d.partition: (d.applied.offset, d.sha256) for d in reply.partitions} for reply in digests],
    }


async def catch_up_leg(settings: Any, ends: dict[int, int], console: Any) -> dict[str, Any]:
    """A fresh replica (no snapshot) in this process applies the whole log: records/s until it reaches `ends`
    (per partition, the applied offsets the replicas' Digest reported once every write was visible)."""
    from aiokafka import AIOKafkaConsumer

    from services.common.kafka import consumer_options, kafka_producer
    from services.common.metrics import ServiceMetrics
    from services.tide.replica import SOURCE, Replica, TideMetrics

    metrics = TideMetrics.create(ServiceMetrics.create("tide-bench"))  # a private registry
    consumer = AIOKafkaConsumer(**{**consumer_options(settings, None), "auto_offset_reset": "none"})
    await consumer.start()
    try:
        async with kafka_producer(settings, SOURCE) as producer:
            replica = Replica(settings, consumer, producer, metrics)
            await replica.assign()
            records = sum(ends.values())
            stop = asyncio.Event()
            t0 = time.perf_counter()
            task = asyncio.create_task(replica.run(stop))
            while any(replica.state.applied(p) < end for p, end in ends.items()):
                if task.done():
                    task.result()
                    raise RuntimeError("the catch-up replica stopped applying")
                await asyncio.sleep(0.002)
            elapsed = time.perf_counter() - t0
            stop.set()
            await task
            # At the replicas' offsets, which this replica may have passed within its last fetch.
            digests = {p: (end, replica.state.partition(p).digest_at(end)) for p, end in ends.items()}
    finally:
        await consumer.stop()
    console.print(f"  catch-up: {records} records applied in {elapsed:.3f} s")
    return {"records": records, "seconds": elapsed, "records_per_second": records / elapsed, "digests": digests}


async def baseline_leg(args: argparse.Namespace, settings: Any) -> dict[str, Any]:
    """The same Command records through a bare producer (the replicas' settings), same in-flight; nobody applies."""
    from clisonix.tide.v1 import tide_pb2
    from services.common.events import event_headers
    from services.common.kafka import ensure_topics, kafka_producer
    from services.tide.replica import SOURCE

    await ensure_topics(settings, [settings.topic_log], args.partitions)
    value = os.urandom(args.value_bytes)
    latencies: list[float] = []
    async with kafka_producer(settings, SOURCE) as events:
        producer = events.producer

        async def send_many(count: int, measured: list[float]) -> None:
            counter = itertools.count()

            async def sender() -> None:
                # Like a BatchWrite: `--batch` records queued together, then all their acknowledgements awaited.
                while (first := next(counter) * args.batch) < count:
                    t0 = time.perf_counter()
                    deliveries = []
                    for i in range(first, min(first + args.batch, count)):
                        key = f"{PREFIX}{i % args.keys}"
                        command_id = uuid.uuid4().hex
                        message = tide_pb2.Command(
                            command_id=command_id, key=key, put=tide_pb2.Command.Put(value=value)
                        )
                        deliveries.append(
                            await producer.send(
                                settings.topic_log,
                                message.SerializeToString(),
                                key=key.encode(),
                                partition=i % args.partitions,
                                headers=event_headers(message, SOURCE, event_id=command_id),
                            )
                        )
                    await asyncio.gather(*deliveries)
                    measured.extend([time.perf_counter() - t0] * len(deliveries))

            await asyncio.gather(*(sender() for _ in range(args.in_flight)))

        await send_many(args.warmup_writes, [])
        t0 = time.perf_counter()
        await send_many(args.writes, latencies)
        elapsed = time.perf_counter() - t0
    return {
        "writes": args.writes,
        "seconds": elapsed,
        "writes_per_second": args.writes / elapsed,
        "latency_ms": percentiles_ms(latencies),
    }


def report(results: dict[str, Any], console: Any) -> dict[str, Any]:
    from rich.table import Table

    write, base, catch = results["write"], results["baseline"], results["catch_up"]
    calls = "single Put calls" if results["batch"] == 1 else f"BatchWrite calls of {results['batch']}"
    table = Table(
        title=f"tide: {REPLICAS} replica processes, {write['writes']} writes as {calls}, "
        f"{results['in_flight']} in flight"
    )
    for column in ("path", "acked writes/s", "ack latency p50 / p99 / max ms", "visible on all p50 / p99 / max ms"):
        table.add_column(column)
    vis = write["visible_all_ms"]
    table.add_row(
        "Tide write (gRPC -> log -> applied)",
        f"{write['writes_per_second']:,.0f}",
        "{p50:.1f} / {p99:.1f} / {max:.1f}".format(**write["latency_ms"]),
        f"{vis['p50']:.1f} / {vis['p99']:.1f} / {vis['max']:.1f}",
    )
    table.add_row(
        "bare aiokafka producer (floor)",
        f"{base['writes_per_second']:,.0f}",
        "{p50:.1f} / {p99:.1f} / {max:.1f}".format(**base["latency_ms"]),
        "n/a",
    )
    console.print(table)
    ratio = write["writes_per_second"] / base["writes_per_second"]
    console.print(f"  Tide / bare producer writes/s: {fmt_ratio(ratio)}")
    console.print(
        f"  catch-up (fresh replica, no snapshot, in this process): {catch['records']} records in "
        f"{catch['seconds']:.3f} s = {catch['records_per_second']:,.0f} records/s; digests equal to the replicas': "
        f"{catch['digests_match']}"
    )
    cpu = results["cpu_seconds"]
    console.print(
        "  CPU s during the write leg: replicas "
        + " / ".join("n/a" if c is None else f"{c:.1f}" for c in cpu["replicas"])
        + (f", broker {cpu['broker']:.1f}" if cpu["broker"] is not None else "")
        + f", this process (gRPC client and Watch streams) {cpu['bench_client']:.1f}; "
        f"{sum(c for c in [*cpu['replicas'], cpu['broker'], cpu['bench_client']] if c is not None):.1f} in all over "
        f"{write['seconds']:.1f} s on {os.cpu_count()} CPUs"
    )
    checks = {
        "writes_per_second": (write["writes_per_second"], TARGET_WRITES_PER_S, ">=", "acknowledged writes/s"),
        "visible_all_p99_ms": (vis["p99"], TARGET_VISIBLE_P99_MS, "<=", "visible on all replicas p99 ms"),
        "catch_up_records_per_second": (catch["records_per_second"], TARGET_CATCH_UP_PER_S, ">=", "catch-up records/s"),
    }
    verdicts: dict[str, Any] = {}
    for name, (value, target, op, label) in checks.items():
        passed = value >= target if op == ">=" else value <= target
        verdicts[name] = {"value": value, "target": target, "passed": passed}
        style = "green" if passed else "red"
        console.print(
            f"  {label}: {value:,.1f} (target {op} {target:,.0f}): "
            f"[bold {style}]{'PASS' if passed else 'BELOW TARGET'}[/bold {style}]"
        )
    return {"targets": verdicts, "ratio_writes_vs_bare_producer": ratio}


async def run(args: argparse.Namespace, console: Any) -> dict[str, Any]:
    from services.common.broker import EmbeddedBroker
    from services.common.kafka import ensure_topics

    started = time.time()
    broker = None
    bootstrap = args.bootstrap_servers
    if bootstrap is None:
        broker = await asyncio.to_thread(EmbeddedBroker(port=0).start)
        bootstrap = broker.bootstrap_servers
        console.print(f"embedded broker on {bootstrap}")
    run_id = uuid.uuid4().hex[:8]
    topic, base_topic = f"bench.tide.{run_id}.log", f"bench.tide.{run_id}.bare"
    settings = _settings(bootstrap, topic, args.partitions)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            await ensure_topics(settings, [topic], args.partitions)
            replicas = await start_replicas(args, bootstrap, topic, Path(tmp))
            console.print(f"{REPLICAS} replicas up: " + ", ".join(p.target for p in replicas))
            meters = [ProcessCpu(p.process.pid if p.process else None) for p in replicas]
            broker_meter = ProcessCpu(broker.process.pid if broker is not None and broker.process else None)
            before = [m.seconds() for m in [*meters, broker_meter]]
            own_before = time.process_time()
            after: list[float | None] = []
            own = 0.0

            def acked() -> None:
                nonlocal after, own
                after = [m.seconds() for m in [*meters, broker_meter]]
                own = time.process_time() - own_before

            try:
                write = await write_leg(args, [p.target for p in replicas], console, acked)
            except Exception:
                print_replica_logs(Path(tmp), console)
                raise
            finally:
                for process in replicas:
                    await asyncio.to_thread(process.stop)
            cpu = [None if b is None or a is None else a - b for b, a in zip(before, after, strict=True)]
            reference = write.pop("digests")
            ends = {p: max(d[p][0] for d in reference) for p in reference[0]}
            catch = await catch_up_leg(settings, ends, console)
        catch["digests_match"] = all(
            {p: tuple(v) for p, v in d.items()} == catch["digests"] for d in reference
        ) and all(d == reference[0] for d in reference)
        catch["digests"] = {str(p): sha for p, (_, sha) in catch["digests"].items()}
        if not await delete_topics(settings, [topic]):
            console.print(f"could not delete {topic}; the broker still holds it")
        base_settings = settings.model_copy(update={"topic_log": base_topic})
        base = await baseline_leg(args, base_settings)
        await delete_topics(settings, [base_topic])
    finally:
        if broker is not None:
            await asyncio.to_thread(broker.stop)
    results: dict[str, Any] = {
        "write": write,
        "baseline": base,
        "catch_up": catch,
        "in_flight": args.in_flight,
        "batch": args.batch,
        "cpu_seconds": {"replicas": cpu[:REPLICAS], "broker": cpu[REPLICAS], "bench_client": own},
    }
    results.update(report(results, console))
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "seconds": time.time() - started,
        "replicas": {"count": REPLICAS, "mode": "separate processes (catch-up replica: in the bench process)"},
        **results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (
        args.writes < 1
        or args.warmup_writes < 0
        or args.in_flight < 1
        or args.batch < 1
        or args.keys < 1
        or args.partitions < 1
    ):
        parser.error(
            "--writes, --batch, --in-flight, --probe-every, --keys and --partitions >= 1, --warmup-writes >= 0"
        )
    return run_and_report(run, args, width=160)


if __name__ == "__main__":
    sys.exit(main())
