"""The `clisonix` command: run the platform on one machine, stream sources into it, benchmark it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from services.common.logs import configure_logging

if TYPE_CHECKING:
    from services.common.broker import EmbeddedBroker
    from services.processes import ServiceProcess

REPO = Path(__file__).resolve().parents[1]


def _stream_kinds() -> str:
    return (
        "synthetic[:eeg=32@1000,ecg@500,ppg,resp,audio] (modality=channels@rate), wfdb:PATH, edf:PATH (EDF+/BDF), "
        "xdf:PATH, lsl:NAME (or lsl:type=EEG), brainflow[:BOARD], recording:FILE.parquet (from clisonix record)"
    )


def cmd_broker(args: argparse.Namespace) -> int:
    """Runs the embedded broker in the foreground until Ctrl-C."""
    from services.common.broker import EmbeddedBroker

    with EmbeddedBroker(port=args.port, host=args.host) as broker:
        print(f"embedded Kafka-protocol broker on {broker.bootstrap_servers} (memory only); Ctrl-C stops it")
        with contextlib.suppress(KeyboardInterrupt):
            while broker.process is not None and broker.process.poll() is None:
                time.sleep(0.5)
    return 0


class Platform:
    """The embedded broker (unless an external one is given) and the services, started in order."""

    def __init__(self, bootstrap_servers: str | None, services: list[str], log_dir: Path, port_offset: int = 0) -> None:
        self.external_bootstrap = bootstrap_servers
        self.port_offset = port_offset
        self.services = services
        self.log_dir = log_dir
        self.broker: EmbeddedBroker | None = None
        self.processes: list[ServiceProcess] = []

    def start(self) -> Platform:
        from services.common.broker import EmbeddedBroker
        from services.processes import DEFAULT_PORTS, ServiceProcess, local_environment

        bootstrap = self.external_bootstrap
        if bootstrap is None:
            self.broker = EmbeddedBroker(port=9092 + self.port_offset, log_path=self.log_dir / "broker.log").start()
            bootstrap = self.broker.bootstrap_servers
        env = local_environment(bootstrap)
        # Tide first: the others keep shared state in it (session registry, active models, calibration baselines).
        ordered = sorted(self.services, key=lambda name: name != "tide")
        if "tide" in ordered and "CLISONIX_TIDE_TARGETS" not in os.environ:
            env["CLISONIX_TIDE_TARGETS"] = f"127.0.0.1:{DEFAULT_PORTS['tide'][0] + self.port_offset}"
        for name in ordered:
            grpc_port, metrics_port = (port + self.port_offset for port in DEFAULT_PORTS[name])
            process = ServiceProcess(name, grpc_port, metrics_port, env, self.log_dir / f"{name}.log")
            self.processes.append(process)
            process.start()
        self.bootstrap_servers = bootstrap
        return self

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        if self.broker is not None:
            self.broker.stop()

    def describe(self) -> str:
        lines = [f"  kafka      {self.bootstrap_servers}" + (" (embedded, memory only)" if self.broker else "")]
        for process in self.processes:
            lines.append(
                f"  {process.name:<10} grpc 127.0.0.1:{process.grpc_port}  "
                f"metrics http://127.0.0.1:{process.metrics_port}/metrics"
            )
        lines.append(f"  logs       {self.log_dir}")
        return "\n".join(lines)


def cmd_up(args: argparse.Namespace) -> int:
    """Starts broker and services on the default ports and keeps them up until Ctrl-C."""
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="clisonix-"))
    platform = Platform(args.bootstrap_servers, args.services, log_dir, args.port_offset)
    try:
        platform.start()
        print("clisonix is up:\n" + platform.describe() + "\nCtrl-C stops everything.", flush=True)
        while all(p.running for p in platform.processes):
            time.sleep(0.5)
        print("a service exited; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        platform.stop()


def _format_progress(progress, label: str) -> str:
    p50, p99 = progress.latency_percentiles_ms()
    return (
        f"{label}: {progress.chunks_acked} chunks acked ({progress.duplicates} duplicate), "
        f"{progress.samples_per_second():,.0f} samples/s, ack latency p50 {p50:.1f} ms p99 {p99:.1f} ms, "
        f"{progress.rejected} rejected, {progress.reconnects} reconnects"
    )


async def stream_source(args: argparse.Namespace, label: str) -> int:
    """Streams one source to ingest with a live progress line; returns an exit code."""
    from rich.console import Console
    from rich.live import Live

    from services.ingest.client import StreamClient
    from services.ingest.sources import open_source

    options = {}
    if args.duration is not None:
        options["duration_s"] = args.duration
    if getattr(args, "block_seconds", None) is not None:
        options["block_seconds"] = args.block_seconds
    source = open_source(args.source, **options)
    root_certificates = await asyncio.to_thread(Path(args.tls_ca).read_bytes) if args.tls_ca else None
    client = StreamClient(
        args.to,
        session_id=args.session or f"session-{uuid.uuid4().hex[:12]}",
        subject_id=args.subject or "",
        speed=None if args.speed <= 0 else args.speed,
        token=args.token or os.environ.get("CLISONIX_AUTH_TOKEN") or None,
        root_certificates=root_certificates,
    )
    console = Console(stderr=False)
    try:
        blocks = source.blocks()
        if console.is_terminal:
            with Live(console=console, refresh_per_second=4) as live:
                progress = await client.run(blocks, lambda p: live.update(_format_progress(p, label)), live=source.live)
        else:
            last = [0.0]

            def every_second(p) -> None:
                if time.monotonic() - last[0] >= 1.0:
                    last[0] = time.monotonic()
                    print(_format_progress(p, label), flush=True)

            progress = await client.run(blocks, every_second, live=source.live)
    finally:
        source.close()
    print(_format_progress(progress, label + " done"), flush=True)
    if progress.last_session_id:
        print(f"pseudonymised session id: {progress.last_session_id}")
    return 0 if progress.rejected == 0 else 3


def cmd_stream(args: argparse.Namespace) -> int:
    """Streams a source to an ingest server."""
    return asyncio.run(stream_source(args, args.source))


def _format_recording(progress, session: str) -> str:
    return (
        f"recording {session}: {progress.chunks} chunks, {progress.signal_seconds:.1f} s of signal, "
        f"{len(progress.seconds_by_stream)} streams, {progress.duplicates} duplicates dropped"
    )


async def record_to_file(args: argparse.Namespace, session: str) -> int:
    """Records one session from the raw topic into a Parquet file, with progress on stderr; returns an exit code.

    SIGINT and SIGTERM end reading (the way out of --follow); what was read is still written.
    """
    from aiokafka.errors import KafkaError

    from services.common.settings import ServiceSettings
    from services.recording import record_session

    overrides = {"kafka_bootstrap_servers": args.bootstrap_servers} if args.bootstrap_servers else {}
    settings = ServiceSettings(service_name="recorder", **overrides)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    last = [0.0]

    def every_second(progress) -> None:
        if time.monotonic() - last[0] >= 1.0:
            last[0] = time.monotonic()
            print(_format_recording(progress, session), file=sys.stderr, flush=True)

    try:
        summary = await record_session(
            settings,
            session,
            args.out,
            topic=args.topic,
            idle_seconds=args.idle_seconds,
            follow=args.follow,
            stop=stop,
            on_progress=every_second,
        )
    except (LookupError, KafkaError) as exc:
        print(f"clisonix record: {exc}", file=sys.stderr)
        return 1
    print(
        f"recorded {summary.session}: {summary.streams} streams, {summary.chunks} chunks "
        f"({summary.duplicates} duplicates dropped), {summary.signal_seconds:.1f} s of signal -> {summary.path} "
        f"({summary.file_bytes / 1e6:.2f} MB; compression ratio {summary.compression_ratio:.1f} against "
        f"{summary.record_bytes / 1e6:.2f} MB of Kafka records)",
        flush=True,
    )
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    """Records one session from the raw topic into a Parquet file that `clisonix stream` replays."""
    from services.ingest.pseudonyms import Pseudonymiser, is_pseudonym

    if not Path(args.out).resolve().parent.is_dir():
        print(f"clisonix record: the folder of {args.out} does not exist", file=sys.stderr)
        return 2
    if args.pseudonym is not None:
        if not is_pseudonym(args.pseudonym):
            print(f"clisonix record: {args.pseudonym!r} is not a pseudonym (ps- and 32 hex digits)", file=sys.stderr)
            return 2
        session = args.pseudonym
    else:
        key = os.environ.get("CLISONIX_PSEUDONYM_KEY", "")
        try:
            # What ingest does to the id, so it gives the pseudonym the session's records are keyed by.
            session = Pseudonymiser(key.encode()).pseudonym("session", args.session)
        except ValueError:
            print(
                "clisonix record: --session needs CLISONIX_PSEUDONYM_KEY (the key ingest ran with); "
                "or give --pseudonym",
                file=sys.stderr,
            )
            return 2
    try:
        return asyncio.run(record_to_file(args, session))
    except KeyboardInterrupt:  # before the signal handlers were in place
        return 130


def cmd_demo(args: argparse.Namespace) -> int:
    """Brings the platform up, replays real recordings through ingest, fusion and inference, shows the fused
    windows and the predictions."""
    from services.demo import run_demo

    log_dir = Path(tempfile.mkdtemp(prefix="clisonix-demo-"))
    platform = Platform(None, ["tide", "ingest", "fusion", "inference", "liam"], log_dir, args.port_offset)
    print("starting the embedded broker and the services ...", flush=True)
    platform.start()
    try:
        print("clisonix is up:\n" + platform.describe(), flush=True)
        print(
            f"replaying two recordings at {args.speed:g}x real time for {args.duration:g} s of recording each; "
            "fused windows (2 s, every 1 s) as fusion produces them, and the inference worker's prediction for each:",
            flush=True,
        )
        ingest = next(p for p in platform.processes if p.name == "ingest")
        tide = next(p for p in platform.processes if p.name == "tide")
        liam = next(p for p in platform.processes if p.name == "liam")
        return asyncio.run(
            run_demo(
                ingest.target,
                platform.bootstrap_servers,
                "clisonix.signals.fused.v1",
                args.speed,
                args.duration,
                topic_results="clisonix.inference.results.v1",
                tide_target=tide.target,
                liam_target=liam.target,
            )
        )
    finally:
        platform.stop()


def cmd_service(args: argparse.Namespace) -> int:
    """Runs one service in the foreground (as `python -m services.<name>`)."""
    import runpy

    sys.argv = [f"services.{args.name}"]
    runpy.run_module(f"services.{args.name}", run_name="__main__")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Runs a benchmark and prints its figures and ratios."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if args.name == "fusion":
        from bench import fusion as fusion_bench

        return fusion_bench.main(args.bench_args)
    if args.name == "inference":
        from bench import inference as inference_bench

        return inference_bench.main(args.bench_args)
    if args.name == "liam":
        from bench import liam as liam_bench

        return liam_bench.main(args.bench_args)
    if args.name == "tide":
        from bench import tide as tide_bench

        return tide_bench.main(args.bench_args)
    if args.name == "tide-consistency":
        from bench import tide_consistency

        return tide_consistency.main(args.bench_args)
    from bench import ingest as ingest_bench

    return ingest_bench.main(args.bench_args)


def cmd_tide_reseed(args: argparse.Namespace) -> int:
    """Re-seeds the Tide command log from a snapshot, showing progress."""
    from rich.console import Console

    from services.common.errors import ClisonixError
    from services.tide.admin import reseed
    from services.tide.settings import TideSettings

    console = Console(highlight=False)
    settings = TideSettings()

    def progress(done: int, total: int) -> None:
        console.print(f"  {done:,} / {total:,} keys appended")

    try:
        report = asyncio.run(reseed(settings, args.snapshot, force=args.force, progress=progress))
    except ClisonixError as exc:
        console.print(f"not re-seeded: {exc}", markup=False)
        return 1
    behind = sorted(p for p, reached in report.log_reached.items() if not reached)
    console.print(
        f"{report.keys:,} keys appended to {settings.topic_log} in {report.seconds:.1f} s "
        f"(partitions behind the snapshot: {behind or 'none, forced'}). Restart the replicas with their snapshot "
        "files removed; clients must drop remembered versions.",
        markup=False,
    )
    return 0


def cmd_tide_check(args: argparse.Namespace) -> int:
    """Compares the Tide replicas' digests at equal offsets; 0 when they agree, 1 when not, 2 when incomplete."""
    from rich.console import Console
    from rich.table import Table

    from services.tide.admin import check_replicas
    from services.tide.client import targets_from_env

    console = Console(highlight=False)
    targets, token = targets_from_env()
    if args.targets:
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    report = asyncio.run(check_replicas(targets, token, timeout_s=args.timeout))
    table = Table(title="Tide replicas: digests at equal offsets")
    table.add_column("replica")
    for partition, offset in sorted(report.offsets.items()):
        table.add_column(f"partition {partition} @ {offset}")
    table.add_column("its peers that disagree")
    for replica in report.replicas:
        name = f"{replica.replica or '?'} ({replica.target})"
        if replica.digests is None:
            table.add_row(name, *["-" for _ in report.offsets], replica.error or "")
            continue
        cells = [replica.digests.get(p, "forgotten")[:12] for p in sorted(report.offsets)]
        view = ", ".join(replica.peers_disagreeing) or "none"
        table.add_row(name, *cells, view + (" (in the minority: NOT_SERVING)" if replica.in_minority else ""))
    console.print(table)
    if report.agree:
        console.print(f"{len(report.replicas)} replicas agree on every partition at equal offsets")
        return 0
    if report.disagreeing or any(r.in_minority for r in report.replicas):
        where = ", ".join(str(p) for p in report.disagreeing) or "none at these offsets"
        console.print(f"[bold red]replicas DISAGREE[/bold red]: partitions {where}")
        return 1
    console.print("[yellow]not every replica could be compared[/yellow] (see the table); run again")
    return 2


def cmd_model(args: argparse.Namespace) -> int:
    """Runs a step of the model pipeline (services.inference.pipeline)."""
    from services.inference.pipeline import main as model_main

    return model_main(args)


def cmd_model_activate(args: argparse.Namespace) -> int:
    """Writes Tide's active model record of a task (services.inference.activation)."""
    from services.inference.activation import activate_command

    return activate_command(args.task, args.model, args.version, args.tide, args.repository)


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every `clisonix model` step takes; left out, the pipeline's defaults (the shipped models')."""
    parser.add_argument("--work", help="work folder (default build/models)")
    parser.add_argument("--repository", help="model repository folder (default models)")
    parser.add_argument("--record", help="WFDB record with .atr beat annotations (default data/wfdb/100)")
    parser.add_argument("--seconds", type=float, help="use only the record's first seconds (default: all of it)")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument("--threads", type=int, help="torch threads while training")
    parser.add_argument("--teacher-epochs", type=int, help="teacher epochs")
    parser.add_argument("--samples-per-epoch", type=int, help="segments per teacher epoch")
    parser.add_argument("--student-epochs", type=int, help="distillation epochs of the student")
    parser.add_argument("--finetune-epochs", type=int, help="distillation epochs after pruning")
    parser.add_argument("--student-samples-per-epoch", type=int, help="segments per distillation epoch")
    parser.add_argument("--prune-ratio", type=float, help="fraction of each layer's channels pruning removes")
    parser.add_argument("--temperature", type=float, help="distillation temperature")
    parser.add_argument("--alpha", type=float, help="weight of the teacher's soft targets in the distillation loss")
    parser.add_argument("--teacher-widths", help="teacher conv widths, e.g. 64,128,128,256")
    parser.add_argument("--student-widths", help="student conv widths, e.g. 8,16,16,32")
    parser.add_argument("--bench-rounds", type=int, help="report: interleaved timing rounds")
    parser.add_argument("--bench-calls", type=int, help="report: calls per model, batch size and round")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clisonix",
        description="Clisonix: real-time, energy-efficient biosignal AI. Streams EEG, ECG, PPG, audio and "
        "other biosignals through gRPC ingestion into Kafka, with measured latency and energy.",
    )
    parser.add_argument("--log-level", default="WARNING", help="log level of this command (default WARNING)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    broker = sub.add_parser(
        "broker",
        help="run the embedded Kafka-protocol broker (memory only)",
        description="Runs the embedded Kafka-protocol broker on loopback until Ctrl-C.",
    )
    broker.add_argument("--port", type=int, default=9092, help="Kafka port (default 9092)")
    broker.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    broker.set_defaults(func=cmd_broker)

    from services.processes import SERVICES

    up = sub.add_parser(
        "up",
        help="start the broker and every service on the default ports",
        description="Starts the embedded broker and the services on their default ports (gRPC, metrics: ingest "
        "50051, 9101; fusion 50052, 9102; inference 8001 (KServe v2), 9103; tide 50054, 9104; liam 50055, 9105) "
        "and keeps them up until Ctrl-C.",
    )
    up.add_argument("--bootstrap-servers", help="use this Kafka instead of starting the embedded broker")
    up.add_argument("--services", nargs="+", default=list(SERVICES), choices=SERVICES, help="services to start")
    up.add_argument("--log-dir", help="where service logs go (default: a new temporary folder)")
    up.add_argument("--port-offset", type=int, default=0, help="add this to every default port (side-by-side runs)")
    up.set_defaults(func=cmd_up)

    stream = sub.add_parser(
        "stream",
        help="stream a device or recording to ingest",
        description=f"Streams a source to an ingest server. Sources: {_stream_kinds()}.",
    )
    stream.add_argument("--source", required=True, metavar="KIND[:PATH]", help=_stream_kinds())
    stream.add_argument("--to", default="127.0.0.1:50051", metavar="HOST:PORT", help="ingest address")
    stream.add_argument("--session", help="session id (pseudonymised by ingest; default: a random one)")
    stream.add_argument("--subject", help="subject id (pseudonymised by ingest before anything is stored)")
    stream.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="replay speed for files and synthetic data; 0 sends as fast as acks allow",
    )
    stream.add_argument("--duration", type=float, help="stop after this many seconds of signal")
    stream.add_argument("--block-seconds", type=float, help="seconds of signal per chunk (default 0.25)")
    stream.add_argument("--token", help="bearer token (default: $CLISONIX_AUTH_TOKEN)")
    stream.add_argument("--tls-ca", help="PEM file of the CA that signed the server certificate (enables TLS)")
    stream.set_defaults(func=cmd_stream)

    record = sub.add_parser(
        "record",
        help="record a session from the raw topic into a Parquet file",
        description="Reads one session's chunks from the raw topic (every partition from its beginning, no "
        "consumer group), drops duplicates and writes them to a zstd-compressed Parquet file, one row per chunk "
        "with the sample bytes as received. `clisonix stream --source recording:FILE` replays it bit for bit.",
    )
    record.add_argument("--out", required=True, metavar="FILE", help="the Parquet file to write (e.g. session.parquet)")
    which = record.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--session", metavar="ID", help="the raw session id (pseudonymised with $CLISONIX_PSEUDONYM_KEY)"
    )
    which.add_argument("--pseudonym", metavar="PS", help="the session pseudonym (ps-...), as ingest acks carry it")
    record.add_argument(
        "--bootstrap-servers",
        metavar="HOST:PORT",
        help="Kafka (default $CLISONIX_KAFKA_BOOTSTRAP_SERVERS or 127.0.0.1:9092)",
    )
    record.add_argument(
        "--topic", default="clisonix.signals.raw.v1", help="raw topic (default clisonix.signals.raw.v1)"
    )
    record.add_argument(
        "--idle-seconds",
        type=float,
        default=2.0,
        help="stop once caught up and no chunk of the session came for this long (default 2)",
    )
    record.add_argument("--follow", action="store_true", help="keep recording new chunks until Ctrl-C")
    record.set_defaults(func=cmd_record)

    demo = sub.add_parser(
        "demo",
        help="bring everything up and replay a real recording through it",
        description="Starts the broker, ingest, fusion and inference, replays an ICU recording (ECG, PPG, "
        "respiration) and an EEG recording through them, and shows the fused windows live (heart rate, pulse rate, "
        "breathing rate, EEG band powers) with the beat model's prediction for each: beats, heart rate, latency "
        "and energy. Then stops.",
    )
    demo.add_argument("--speed", type=float, default=20.0, help="replay speed (default 20x real time)")
    demo.add_argument("--duration", type=float, default=300.0, help="seconds of recording to replay (default 300)")
    demo.add_argument("--port-offset", type=int, default=0, help="add this to every default port")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser(
        "bench",
        help="run a benchmark (ingest, fusion, inference, tide, liam) or the tide-consistency check",
        description="Benchmarks, printing figures and ratios measured side by side in one run.",
    )
    bench.add_argument(
        "name", choices=["ingest", "fusion", "inference", "tide", "tide-consistency", "liam"], help="which benchmark"
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="options passed to the benchmark")
    bench.set_defaults(func=cmd_bench)

    model = sub.add_parser(
        "model",
        help="train, distill, prune, export, evaluate and report the ECG beat models",
        description="The model pipeline on MIT-BIH record 100: train the teacher, distill the student, prune it, "
        "export to ONNX (and int8), score every variant on the held-out 20 % of the record, and report size, "
        "latency and energy per window. Each step reads and writes a work folder; export and evaluate write the "
        "artifacts into the model repository, report writes REPORT.md and pareto.png beside them.",
    )
    steps = model.add_subparsers(dest="step", required=True, metavar="STEP")
    for step, text in (
        ("train", "train the teacher on the labels"),
        ("distill", "train the student by knowledge distillation from the teacher"),
        ("prune", "prune the student's channels (structured) and fine-tune it by distillation"),
        ("export", "export ONNX models (checked against torch), quantise to int8, write the artifacts"),
        ("evaluate", "score every variant on the held-out data; write the scores into the artifacts"),
        ("report", "time every variant side by side; write REPORT.md, pareto.png and report.json"),
        ("all", "run train, distill, prune, export, evaluate and report in order"),
    ):
        step_parser = steps.add_parser(step, help=text, description=text[0].upper() + text[1:] + ".")
        _model_arguments(step_parser)
        step_parser.set_defaults(func=cmd_model)
    activate = steps.add_parser(
        "activate",
        help="make a model version the active one of a task in Tide (models/active/<task>)",
        description="Checks that the model version is in the local repository and made for the task, then writes "
        "Tide's models/active/<task> record (inference services with CLISONIX_TIDE_TARGETS switch to it) and "
        "prints the Tide version it was written at.",
    )
    activate.add_argument("--task", required=True, help="the task, e.g. ecg-beat")
    activate.add_argument("--model", required=True, help="the model name, e.g. ecg-beat-pruned")
    activate.add_argument("--version", required=True, help="the model version, e.g. 1")
    activate.add_argument(
        "--tide", metavar="HOST:PORT", help="Tide replica(s) (default $CLISONIX_TIDE_TARGETS or 127.0.0.1:50054)"
    )
    activate.add_argument("--repository", help="model repository folder (default models)")
    activate.set_defaults(func=cmd_model_activate)

    reseed = sub.add_parser(
        "tide-reseed",
        help="re-seed Tide's command log from a replica's snapshot after the log lost records",
        description="When the command log is younger than a replica's snapshot (the replica reports "
        "log_behind_snapshot and stops serving), appends one Put per key of the snapshot to the log. Then restart "
        "the replicas with their snapshot files removed: they replay the log and hold the snapshot's keys and "
        "values again, at new versions. Refuses when the log still holds the snapshot's position (--force to "
        "re-seed anyway). Kafka and the topic come from the CLISONIX_* settings, as for the tide service.",
    )
    reseed.add_argument("--snapshot", required=True, type=Path, help="the replica's snapshot file")
    reseed.add_argument("--force", action="store_true", help="re-seed even if the log is not behind")
    reseed.set_defaults(func=cmd_tide_reseed)

    tide_check = sub.add_parser(
        "tide-check",
        help="compare the Tide replicas' digests at equal offsets",
        description="Asks every replica for its digest of every partition at the furthest offset any replica "
        "applied (each waits to reach it, or answers from its recent history), and shows what each replica found "
        "comparing the other replicas' digest reports with its own. Exit code 0: the replicas agree; 1: they "
        "disagree; 2: a replica could not be compared. Replicas: --targets, else CLISONIX_TIDE_TARGETS, else the "
        "local default; token: CLISONIX_TIDE_TOKEN.",
    )
    tide_check.add_argument("--targets", help="comma-separated host:port of every replica")
    tide_check.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    tide_check.set_defaults(func=cmd_tide_check)

    for name in SERVICES:
        service = sub.add_parser(
            name,
            help=f"run the {name} service in the foreground",
            description=f"Runs the {name} service, configured from CLISONIX_* variables.",
        )
        service.set_defaults(func=cmd_service, name=name)
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Ctrl-C and SIGTERM both stop a command cleanly, also where SIGINT was ignored when this process
    # started (background jobs of a non-interactive shell inherit it ignored).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    configure_logging("cli", args.log_level, "text")
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
