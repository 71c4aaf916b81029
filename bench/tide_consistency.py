"""Tide consistency scenario: concurrent compare-and-set counters through three replica processes, checked for
exact counts, equal digests at equal offsets and a linearizable history; optionally with a replica killed with
SIGKILL mid-run and restarted from its snapshot.

Each run: the embedded broker (or --bootstrap-servers), a fresh command log, three replicas each as its own
process (`python -m services.tide`, own ports, snapshot files; every `--snapshot-interval` seconds). `--clients`
concurrent clients in this process each increment a random counter of `--keys` `--increments` times: `Get` from a
random replica, `CompareAndSet` (the entry's version, or expect-absent for the first write) of value + 1 with a
fresh command id on a random replica; on a conflict, read again and retry; a call that fails (the replica is
down) is re-sent with the same command id, to a random replica, until it is answered.

With `--kill`, once half of the increments are acknowledged, one replica is killed with SIGKILL and started again
with the same snapshot file and ports while the clients go on.

A run passes when, after the clients finished and every replica reached the same applied offsets:
- every replica reads every counter as the number of increments acknowledged to the clients;
- every replica reports the same digest per partition (equal offsets, equal digests), and none reports a
  divergence (health SERVING, no digest mismatch with its peers);
- the history of compare-and-set calls (invoke, response, outcome; calls that never answered have an unknown
  outcome) is linearizable per key (services.tide.linearizability). Gets without a minimum version may be stale
  by design (a replica answers from what it has applied), so they are not part of the checked history.

The exit code is 1 when any run failed: this is a correctness check, not a performance figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import bootstrap_or_embedded, delete_topics, run_and_report
from services.common.broker import free_port

REPLICAS = 3
# Failed calls are re-sent after this pause (a killed replica's port refuses at once).
RETRY_PAUSE_S = 0.05


@dataclass(frozen=True)
class ScenarioConfig:
    """One run's shape. increments: per client; call_timeout_s: one gRPC call; answer_timeout_s: how long a
    call may be re-sent before the run fails."""

    clients: int = 6
    keys: int = 4
    increments: int = 200
    partitions: int = 3
    kill: bool = False
    snapshot_interval_s: float = 1.0
    call_timeout_s: float = 15.0
    answer_timeout_s: float = 90.0
    converge_timeout_s: float = 30.0
    seed: int = 0


@dataclass
class RunResult:
    passed: bool
    problems: list[str]
    seconds: float
    cas_calls: int
    conflicts: int
    resent_calls: int
    acknowledged: dict[str, int]
    values: list[dict[str, int]]
    applied: list[dict[int, int]]
    digests_equal: bool
    linearizable: bool
    killed_replica: int | None = None
    restarted_from_snapshot: bool | None = None
    gaps: dict[str, float] = field(default_factory=dict)
    digest_checks: dict[str, float] = field(default_factory=dict)


def replica_environment(bootstrap: str, topic: str, config: ScenarioConfig, folder: Path, index: int) -> dict[str, str]:
    return {
        "CLISONIX_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "CLISONIX_TOPIC_LOG": topic,
        "CLISONIX_KAFKA_TOPIC_PARTITIONS": str(config.partitions),
        "CLISONIX_SNAPSHOT_PATH": str(folder / f"replica-{index}.snapshot"),
        "CLISONIX_SNAPSHOT_INTERVAL_SECONDS": str(config.snapshot_interval_s),
        "CLISONIX_GRPC_HOST": "127.0.0.1",
        "CLISONIX_METRICS_HOST": "127.0.0.1",
        "CLISONIX_LOG_FORMAT": "text",
        "CLISONIX_ENERGY_SOURCE": "estimate",
    }


def scrape_counter(metrics_port: int, name: str) -> dict[str, float]:
    """A replica's counter `name` (a `result` label) by result; empty when the page cannot be read."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    found: dict[str, float] = {}
    for match in re.finditer(rf'^{name}\{{result="(\w+)"\}} ([0-9.e+]+)$', text, re.M):
        found[match.group(1)] = float(match.group(2))
    return found


class Clients:
    """The concurrent counter clients and the history they record."""

    def __init__(self, config: ScenarioConfig, targets: list[str]) -> None:
        import grpc

        from clisonix.tide.v1 import tide_pb2_grpc

        self.config = config
        self.channels = [grpc.aio.insecure_channel(t) for t in targets]
        self.stubs = [tide_pb2_grpc.TideServiceStub(c) for c in self.channels]
        self.keys = [f"counter/{k}" for k in range(config.keys)]
        self.acknowledged = dict.fromkeys(self.keys, 0)
        self.history: list[Any] = []
        self.cas_calls = self.conflicts = self.resent = 0
        self.started = time.monotonic()
        # Set once half of all increments are acknowledged (when --kill strikes).
        self.halfway = asyncio.Event()
        self._half = config.clients * config.increments // 2

    def now(self) -> float:
        return time.monotonic() - self.started

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()

    async def answered(self, rng: random.Random, call: Any) -> Any:
        """`call(stub)` on a random replica until one answers; re-sends go to a random replica too."""
        import grpc

        deadline = time.monotonic() + self.config.answer_timeout_s
        while True:
            stub = rng.choice(self.stubs)
            try:
                return await call(stub)
            except grpc.aio.AioRpcError as exc:
                retriable = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
                if exc.code() not in retriable or time.monotonic() > deadline:
                    raise
                self.resent += 1
                await asyncio.sleep(RETRY_PAUSE_S)

    async def client(self, index: int) -> None:
        from clisonix.tide.v1 import tide_pb2
        from services.tide.linearizability import Operation

        rng = random.Random(self.config.seed * 1000 + index)
        timeout = self.config.call_timeout_s
        for _ in range(self.config.increments):
            key = rng.choice(self.keys)
            while True:
                got = await self.answered(rng, lambda s, k=key: s.Get(tide_pb2.GetRequest(key=k), timeout=timeout))
                command_id = uuid.uuid4().hex
                if got.outcome == tide_pb2.OUTCOME_APPLIED:
                    expected: tuple[int, int] | None = (got.entry.version.partition, got.entry.version.offset)
                    value = str(int(got.entry.value) + 1).encode()
                    request = tide_pb2.CompareAndSetRequest(
                        key=key, expected=got.entry.version, value=value, command_id=command_id
                    )
                else:
                    expected, value = None, b"1"
                    request = tide_pb2.CompareAndSetRequest(
                        key=key, expect_absent=True, value=value, command_id=command_id
                    )
                invoked = self.now()
                self.cas_calls += 1
                reply = await self.answered(rng, lambda s, r=request: s.CompareAndSet(r, timeout=timeout))
                applied = reply.outcome == tide_pb2.OUTCOME_APPLIED
                self.history.append(
                    Operation(
                        f"c{index}",
                        key,
                        "cas",
                        invoked,
                        self.now(),
                        value=value,
                        version=(reply.version.partition, reply.version.offset),
                        expected=expected,
                        applied=applied,
                    )
                )
                if applied:
                    self.acknowledged[key] += 1
                    if self.total_acknowledged() >= self._half:
                        self.halfway.set()
                    break
                self.conflicts += 1

    def total_acknowledged(self) -> int:
        return sum(self.acknowledged.values())


async def converge(stubs: list[Any], timeout_s: float) -> list[dict[int, tuple[int, str]]]:
    """Polls Digest until every replica reports the same applied offsets twice in a row; returns the last answers."""
    from clisonix.tide.v1 import tide_pb2

    deadline = time.monotonic() + timeout_s
    previous: list[dict[int, int]] | None = None
    while True:
        answers = [await stub.Digest(tide_pb2.DigestRequest(), timeout=5) for stub in stubs]
        seen = [{d.partition: (d.applied.offset, d.sha256) for d in a.partitions} for a in answers]
        offsets = [{p: o for p, (o, _) in s.items()} for s in seen]
        if all(o == offsets[0] for o in offsets) and offsets == previous:
            return seen
        if time.monotonic() > deadline:
            return seen
        previous = offsets
        await asyncio.sleep(0.2)


async def kill_and_restart(
    replicas: list[Any], clients: Clients, rng: random.Random, stopped: asyncio.Event
) -> tuple[int, float]:
    """Once half of all increments are acknowledged: SIGKILL one replica, start it again (same snapshot, ports).
    Returns the replica's index and the seconds it was down."""
    halfway = asyncio.create_task(clients.halfway.wait())
    ended = asyncio.create_task(stopped.wait())
    await asyncio.wait([halfway, ended], return_when=asyncio.FIRST_COMPLETED)
    halfway.cancel()
    ended.cancel()
    victim = rng.randrange(len(replicas))
    process = replicas[victim]
    assert process.process is not None
    down = time.monotonic()
    process.process.send_signal(signal.SIGKILL)
    await asyncio.to_thread(process.process.wait)
    await asyncio.to_thread(process.start, 60.0)
    return victim, time.monotonic() - down


async def health_statuses(targets: list[str]) -> list[str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.tide.api import SERVICE_NAME

    statuses = []
    for target in targets:
        async with grpc.aio.insecure_channel(target) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5
            )
            statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return statuses


async def run_once(bootstrap: str, config: ScenarioConfig, folder: Path) -> RunResult:
    """One run of the scenario on a fresh command log; the topic is deleted afterwards."""
    from clisonix.tide.v1 import tide_pb2
    from services.common.kafka import ensure_topics
    from services.processes import ServiceProcess
    from services.tide.linearizability import check
    from services.tide.settings import TideSettings

    topic = f"tide.consistency.{uuid.uuid4().hex[:8]}"
    settings = TideSettings(
        kafka_bootstrap_servers=bootstrap, topic_log=topic, kafka_topic_partitions=config.partitions
    )
    await ensure_topics(settings, [topic], config.partitions)
    replicas = [
        ServiceProcess(
            "tide",
            free_port(),
            free_port(),
            env=replica_environment(bootstrap, topic, config, folder, i),
            log_path=folder / f"replica-{i}.log",
        )
        for i in range(REPLICAS)
    ]
    problems: list[str] = []
    rng = random.Random(config.seed)
    started = time.monotonic()
    clients: Clients | None = None
    try:
        await asyncio.gather(*(asyncio.to_thread(p.start, 60.0) for p in replicas))
        clients = Clients(config, [p.target for p in replicas])
        stopped = asyncio.Event()
        killer = asyncio.create_task(kill_and_restart(replicas, clients, rng, stopped)) if config.kill else None
        try:
            await asyncio.gather(*(clients.client(i) for i in range(config.clients)))
        finally:
            stopped.set()
        killed = await killer if killer is not None else None
        seconds = time.monotonic() - started
        seen = await converge(clients.stubs, config.converge_timeout_s)
        applied = [{p: o for p, (o, _) in s.items()} for s in seen]
        if any(a != applied[0] for a in applied):
            problems.append(f"replicas did not reach equal applied offsets: {applied}")
        digests_equal = all(s == seen[0] for s in seen)
        if not digests_equal:
            problems.append("digests differ at equal offsets")
        values: list[dict[str, int]] = []
        for stub in clients.stubs:
            read: dict[str, int] = {}
            for key in clients.keys:
                got = await stub.Get(tide_pb2.GetRequest(key=key), timeout=5)
                read[key] = int(got.entry.value) if got.outcome == tide_pb2.OUTCOME_APPLIED else 0
            values.append(read)
        if any(v != clients.acknowledged for v in values):
            problems.append(f"counters {values} differ from the acknowledged increments {clients.acknowledged}")
        linearizable = check(clients.history)
        if not linearizable:
            problems.append("the compare-and-set history is not linearizable")
        statuses = await health_statuses([p.target for p in replicas])
        if any(s != "SERVING" for s in statuses):
            problems.append(f"replica health {statuses}")
        gaps: dict[str, float] = {}
        checks: dict[str, float] = {}
        for process in replicas:
            for result, count in scrape_counter(process.metrics_port, "clisonix_tide_log_gaps_total").items():
                gaps[result] = gaps.get(result, 0.0) + count
            for result, count in scrape_counter(process.metrics_port, "clisonix_tide_digest_checks_total").items():
                checks[result] = checks.get(result, 0.0) + count
        if checks.get("disagree"):
            problems.append(f"replicas found digests that disagree: {checks}")
        restarted = None
        if killed is not None:
            log = (folder / f"replica-{killed[0]}.log").read_text(errors="replace")
            restarted = log.count("from_snapshot=True") >= 1
            if not restarted:
                problems.append("the killed replica did not restart from its snapshot")
        return RunResult(
            passed=not problems,
            problems=problems,
            seconds=seconds,
            cas_calls=clients.cas_calls,
            conflicts=clients.conflicts,
            resent_calls=clients.resent,
            acknowledged=dict(clients.acknowledged),
            values=values,
            applied=applied,
            digests_equal=digests_equal,
            linearizable=linearizable,
            killed_replica=None if killed is None else killed[0],
            restarted_from_snapshot=restarted,
            gaps=gaps,
            digest_checks=checks,
        )
    finally:
        if clients is not None:
            await clients.close()
        await asyncio.gather(*(asyncio.to_thread(p.stop) for p in replicas))
        await delete_topics(settings, [topic])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clisonix bench tide-consistency",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=10, help="runs, each on a fresh log with fresh replicas")
    parser.add_argument("--clients", type=int, default=ScenarioConfig.clients)
    parser.add_argument("--keys", type=int, default=ScenarioConfig.keys, help="counter keys")
    parser.add_argument("--increments", type=int, default=ScenarioConfig.increments, help="per client and run")
    parser.add_argument("--partitions", type=int, default=ScenarioConfig.partitions)
    parser.add_argument("--kill", action="store_true", help="SIGKILL one replica mid-run and restart it")
    parser.add_argument("--snapshot-interval", type=float, default=ScenarioConfig.snapshot_interval_s)
    parser.add_argument("--seed", type=int, default=0, help="first run's seed (run i uses seed + i)")
    parser.add_argument("--bootstrap-servers", help="an existing broker (default: start the embedded one)")
    parser.add_argument("--keep-logs", type=Path, help="copy every failed run's replica logs into this folder")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser


def describe(index: int, runs: int, result: RunResult) -> str:
    verdict = "PASS" if result.passed else "FAIL"
    kill = ""
    if result.killed_replica is not None:
        kill = f"; replica {result.killed_replica} killed and restarted"
    gaps = ", ".join(f"{int(v)} {k}" for k, v in sorted(result.gaps.items())) or "none"
    checks = ", ".join(f"{int(v)} {k}" for k, v in sorted(result.digest_checks.items())) or "none"
    line = (
        f"run {index + 1}/{runs}: {verdict} {result.cas_calls:,} compare-and-sets "
        f"({result.conflicts:,} conflicts, {result.resent_calls} re-sent) in {result.seconds:.1f} s; "
        f"counters {sorted(result.acknowledged.values())}; gaps in the offsets: {gaps}; "
        f"digest checks between replicas: {checks}{kill}"
    )
    for problem in result.problems:
        line += f"\n    {problem}"
    return line


async def run(args: argparse.Namespace, console: Any) -> dict[str, Any]:
    results: list[RunResult] = []
    async with bootstrap_or_embedded(args.bootstrap_servers, console) as bootstrap:
        for index in range(args.runs):
            config = ScenarioConfig(
                clients=args.clients,
                keys=args.keys,
                increments=args.increments,
                partitions=args.partitions,
                kill=args.kill,
                snapshot_interval_s=args.snapshot_interval,
                seed=args.seed + index,
            )
            with tempfile.TemporaryDirectory() as tmp:
                result = await run_once(bootstrap, config, Path(tmp))
                if not result.passed and args.keep_logs is not None:
                    target = args.keep_logs / f"run-{index + 1}"
                    await asyncio.to_thread(shutil.copytree, tmp, target, ignore=shutil.ignore_patterns("*.snapshot"))
            results.append(result)
            console.print(describe(index, args.runs, result), markup=False)
    passed = sum(r.passed for r in results)
    gaps = sum(r.gaps.get("filled", 0.0) for r in results)
    console.print(
        f"passed {passed}/{len(results)} runs"
        + (" with a replica killed and restarted in each" if args.kill else " without faults")
        + f"; gaps in the offsets read again until filled: {int(gaps)}"
    )
    summary: dict[str, Any] = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "passed": passed,
        "runs": [asdict(r) for r in results],
    }
    if passed < len(results):
        if args.json is not None:  # the figures of a failed check matter most
            args.json.write_text(json.dumps(summary, indent=2) + "\n")
        raise RuntimeError(f"{len(results) - passed} of {len(results)} runs failed")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.runs, args.clients, args.keys, args.increments, args.partitions) < 1 or args.snapshot_interval <= 0:
        parser.error("--runs, --clients, --keys, --increments and --partitions >= 1; --snapshot-interval > 0")
    return run_and_report(run, args, width=160)


if __name__ == "__main__":
    sys.exit(main())
