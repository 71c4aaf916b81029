"""Prometheus metrics of a service: a factory over an injectable registry, an energy exporter, the server.

Names are in base units; counters are declared without `_total` and prometheus_client exposes them with it
(`clisonix_energy_joules_total`). Labels are bounded sets only (service, stage, topic, reason, source): never
session, subject or partition ids, whose cardinality grows without limit.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from services.common.energy import DEFAULT_PROC_STAT, EnergyMeter, co2_grams, cpu_share, machine_busy_cpu_seconds

log = logging.getLogger(__name__)

PREFIX = "clisonix"
# Per-stage latencies of the streaming path, from 0.5 ms to 1 s.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass(frozen=True)
class ServiceMetrics:
    """The metrics every service exposes, all registered in `registry`.

    Every metric carries a `service` label; the other labels are:
    energy_joules_total{source}, stage_latency_seconds{stage}, records_in_total{topic},
    records_out_total{topic}, records_rejected_total{reason}, deadlettered_total{reason},
    consumer_lag_records{topic}. `reason` must come from a fixed set (e.g. ClisonixError.reason).
    """

    service: str
    registry: CollectorRegistry
    energy_joules_total: Counter
    co2_grams_total: Counter
    stage_latency_seconds: Histogram
    records_in_total: Counter
    records_out_total: Counter
    records_rejected_total: Counter
    deadlettered_total: Counter
    consumer_lag_records: Gauge

    @classmethod
    def create(cls, service: str, registry: CollectorRegistry | None = None) -> ServiceMetrics:
        """Creates and registers the metrics of `service`.

        service: the service name, the value of every metric's `service` label.
        registry: where to register; None gives a new private registry (never the global default), so
            factories may be created repeatedly, e.g. in tests. Creating twice in one registry raises
            ValueError (duplicated timeseries).
        """
        if not service:
            raise ValueError("service name must not be empty")
        reg = registry if registry is not None else CollectorRegistry(auto_describe=True)
        return cls(
            service=service,
            registry=reg,
            energy_joules_total=Counter(
                f"{PREFIX}_energy_joules",
                "Energy used, in joules (rapl and nvml: machine-wide; estimate: from process CPU time)",
                ["service", "source"],
                registry=reg,
            ),
            co2_grams_total=Counter(
                f"{PREFIX}_co2_grams", "CO2 emitted for the energy used, in grams", ["service"], registry=reg
            ),
            stage_latency_seconds=Histogram(
                f"{PREFIX}_stage_latency_seconds",
                "Latency of one processing stage, in seconds",
                ["service", "stage"],
                buckets=LATENCY_BUCKETS,
                registry=reg,
            ),
            records_in_total=Counter(f"{PREFIX}_records_in", "Records consumed", ["service", "topic"], registry=reg),
            records_out_total=Counter(f"{PREFIX}_records_out", "Records produced", ["service", "topic"], registry=reg),
            records_rejected_total=Counter(
                f"{PREFIX}_records_rejected", "Records rejected", ["service", "reason"], registry=reg
            ),
            deadlettered_total=Counter(
                f"{PREFIX}_deadlettered",
                "Records sent to the dead-letter topic",
                ["service", "reason"],
                registry=reg,
            ),
            consumer_lag_records=Gauge(
                f"{PREFIX}_consumer_lag_records",
                "Records between the committed offset and the end of the log",
                ["service", "topic"],
                registry=reg,
            ),
        )


@contextmanager
def observe_seconds(histogram: Any) -> Iterator[None]:
    """Observes the seconds spent in a `with` block on `histogram` (a labelled child), even when it raises."""
    start = time.perf_counter()
    try:
        yield
    finally:
        histogram.observe(time.perf_counter() - start)


class EnergyExporter:
    """Adds the energy a meter has counted, and its CO2, to the energy and CO2 counters.

    meter: the energy meter; the counters start from the meter's creation, not the exporter's.
    metrics: the service's metrics.
    service: value of the `service` label.
    grid_intensity_g_per_kwh: grams of CO2 per kWh of the local grid.
    proc_stat: the kernel's CPU accounting. With the rapl source, which measures whole CPU packages, each
        interval's package energy is attributed to this service by its share of the machine's busy CPU time,
        so services sharing a machine do not each count all of it (None: no attribution).
    """

    def __init__(
        self,
        meter: EnergyMeter,
        metrics: ServiceMetrics,
        service: str,
        grid_intensity_g_per_kwh: float,
        proc_stat: Path | None = DEFAULT_PROC_STAT,
    ) -> None:
        if grid_intensity_g_per_kwh < 0:
            raise ValueError(f"grid intensity must be >= 0, got {grid_intensity_g_per_kwh}")
        self._meter = meter
        self._intensity = grid_intensity_g_per_kwh
        self._energy = metrics.energy_joules_total.labels(service=service, source=meter.source)
        self._co2 = metrics.co2_grams_total.labels(service=service)
        self._last = meter.read()
        self._proc_stat = proc_stat if meter.source == "rapl" else None
        self._last_busy = machine_busy_cpu_seconds(self._proc_stat) if self._proc_stat is not None else 0.0
        # update() may run from the asyncio task and from a scrape or test thread at once.
        self._lock = threading.Lock()

    def update(self) -> float:
        """Reads the meter and adds the joules (and CO2) since the last update; returns the joules added."""
        with self._lock:
            reading = self._meter.read()
            delta = reading.joules - self._last.joules
            # Counters only go up; a smaller reading (float noise) is skipped, not subtracted.
            if delta <= 0:
                return 0.0
            if self._proc_stat is not None:
                busy = machine_busy_cpu_seconds(self._proc_stat)
                delta *= cpu_share(reading.cpu_seconds - self._last.cpu_seconds, busy - self._last_busy)
                self._last_busy = busy
            self._last = reading
            self._energy.inc(delta)
            self._co2.inc(co2_grams(delta, self._intensity))
            return delta

    async def run(self, interval_s: float, stop: asyncio.Event) -> None:
        """Calls update() every `interval_s` seconds until `stop` is set, then once more."""
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        while True:
            try:
                self.update()
            except (OSError, ValueError):
                # An unreadable counter must not stop the service; the next tick tries again.
                log.warning("energy meter read failed", exc_info=True)
            if stop.is_set():
                return
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval_s)
            except TimeoutError:
                pass


class MetricsServer:
    """A running /metrics HTTP server; `port` is the bound port (the real one when 0 was asked)."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.host: str = server.server_address[0]
        self.port: int = server.server_address[1]

    def close(self) -> None:
        """Stops serving, closes the socket and waits for the server thread."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(port: int, registry: CollectorRegistry, host: str = "0.0.0.0") -> MetricsServer:
    """Serves `registry` in the Prometheus text format on host:port in a daemon thread.

    port: the TCP port; 0 picks a free one, read back from the returned server's `port`.
    registry: the registry to expose (normally ServiceMetrics.registry).
    host: the address to bind.
    """
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread)
