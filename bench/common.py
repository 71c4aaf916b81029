"""What the benchmarks share: running one with its exit codes and JSON, CPU and energy meters, topic clean-up."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from services.common.energy import EnergyMeter, EnergySourceUnavailable


def run_and_report(
    run: Callable[[argparse.Namespace, Any], Coroutine[Any, Any, dict[str, Any]]], args: argparse.Namespace, width: int
) -> int:
    """Runs a benchmark's `run(args, console)`, writes its results to args.json; returns the exit code
    (0 done, 1 the benchmark failed, 130 interrupted)."""
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=width)  # piped or captured: do not squeeze the tables into 80
    try:
        results = asyncio.run(run(args, console))
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    except Exception as exc:
        console.print(f"benchmark failed: {type(exc).__name__}: {exc}", markup=False)
        return 1
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"results written to {args.json}")
    return 0


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def open_meter(source: str) -> EnergyMeter:
    """The energy meter: "auto" here means rapl where readable, else the estimate (this benchmark is CPU work)."""
    if source != "auto":
        return EnergyMeter(source)
    try:
        return EnergyMeter("rapl")
    except EnergySourceUnavailable:
        return EnergyMeter("estimate")


async def delete_topics(settings: Any, names: Sequence[str]) -> bool:
    """Deletes the benchmark's topics, so that the broker (memory only) holds one leg's records at a time.

    Best effort: returns False where the broker refuses or does not answer (the records then stay).
    """
    from aiokafka.admin import AIOKafkaAdminClient

    from services.common.kafka import _security_options

    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap_servers, request_timeout_ms=10_000, **_security_options(settings)
    )
    try:
        await admin.start()
        await asyncio.wait_for(admin.delete_topics(list(names)), timeout=15)
        return True
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


@contextlib.asynccontextmanager
async def bootstrap_or_embedded(bootstrap_servers: str | None, console: Any) -> AsyncIterator[str]:
    """Yields `bootstrap_servers`, or, when None, those of an embedded broker started on a free loopback port
    for the benchmark and stopped after it."""
    from services.common.broker import EmbeddedBroker

    if bootstrap_servers is not None:
        yield bootstrap_servers
        return
    broker = await asyncio.to_thread(EmbeddedBroker(port=0).start)
    console.print(f"embedded broker on {broker.bootstrap_servers}")
    try:
        yield broker.bootstrap_servers
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(broker.stop)


class ProcessCpu:
    """CPU seconds (user + system) of another process, from /proc; None where unreadable."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def seconds(self) -> float | None:
        if self.pid is None:
            return None
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self.tick
