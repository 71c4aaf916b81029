"""Tests of the metrics factory, the energy exporter and the /metrics server."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from services.common.energy import EnergyMeter, EnergyReading, co2_grams
from services.common.metrics import (
    LATENCY_BUCKETS,
    EnergyExporter,
    ServiceMetrics,
    observe_seconds,
    start_metrics_server,
)
from tests.helpers import wait_for


class FakeMeter(EnergyMeter):
    """An estimate meter whose cumulative joules the test sets."""

    def __init__(self) -> None:
        super().__init__("estimate")
        self.joules = 0.0

    def read(self) -> EnergyReading:
        return EnergyReading(self.joules, "estimate", super().read().cpu_seconds)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    """The value of one sample of `registry`, None when it has not been set."""
    return registry.get_sample_value(f"clisonix_{name}", labels)


def test_factory_exposes_expected_names_after_update() -> None:
    metrics = ServiceMetrics.create("x")
    EnergyExporter(EnergyMeter("estimate"), metrics, "x", 400.0).update()
    text = generate_latest(metrics.registry).decode()
    assert 'clisonix_energy_joules_total{service="x",source="estimate"}' in text
    assert 'clisonix_co2_grams_total{service="x"}' in text
    for name in (
        "clisonix_stage_latency_seconds",
        "clisonix_records_in_total",
        "clisonix_records_out_total",
        "clisonix_records_rejected_total",
        "clisonix_deadlettered_total",
        "clisonix_consumer_lag_records",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text
    assert "clisonix_energy_joules_total_total" not in text


def test_labelled_metrics_render_with_bounded_labels() -> None:
    metrics = ServiceMetrics.create("ingest")
    metrics.records_in_total.labels(service="ingest", topic="raw").inc(3)
    metrics.records_out_total.labels(service="ingest", topic="frames").inc(2)
    metrics.records_rejected_total.labels(service="ingest", reason="invalid_argument").inc()
    metrics.deadlettered_total.labels(service="ingest", reason="invalid_argument").inc()
    metrics.consumer_lag_records.labels(service="ingest", topic="raw").set(7)
    with observe_seconds(metrics.stage_latency_seconds.labels(service="ingest", stage="decode")):
        pass
    reg = metrics.registry
    assert sample(reg, "records_in_total", service="ingest", topic="raw") == 3
    assert sample(reg, "records_out_total", service="ingest", topic="frames") == 2
    assert sample(reg, "records_rejected_total", service="ingest", reason="invalid_argument") == 1
    assert sample(reg, "deadlettered_total", service="ingest", reason="invalid_argument") == 1
    assert sample(reg, "consumer_lag_records", service="ingest", topic="raw") == 7
    assert sample(reg, "stage_latency_seconds_count", service="ingest", stage="decode") == 1
    text = generate_latest(reg).decode()
    assert 'le="0.0005"' in text and 'le="1.0"' in text
    assert LATENCY_BUCKETS[0] == 0.0005 and LATENCY_BUCKETS[-1] == 1.0


def test_observe_seconds_records_even_when_block_raises() -> None:
    metrics = ServiceMetrics.create("x")
    child = metrics.stage_latency_seconds.labels(service="x", stage="fail")
    with pytest.raises(RuntimeError), observe_seconds(child):
        raise RuntimeError("boom")
    assert sample(metrics.registry, "stage_latency_seconds_count", service="x", stage="fail") == 1


def test_separate_registries_do_not_collide() -> None:
    a = ServiceMetrics.create("x")
    b = ServiceMetrics.create("x")
    own = CollectorRegistry()
    c = ServiceMetrics.create("x", registry=own)
    assert len({id(a.registry), id(b.registry), id(c.registry)}) == 3
    assert c.registry is own
    a.records_in_total.labels(service="x", topic="t").inc()
    assert sample(b.registry, "records_in_total", service="x", topic="t") is None
    # The same registry twice is a programming error that prometheus_client reports.
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        ServiceMetrics.create("x", registry=own)


def test_exporter_increments_by_deltas() -> None:
    metrics = ServiceMetrics.create("x")
    meter = FakeMeter()
    exporter = EnergyExporter(meter, metrics, "x", grid_intensity_g_per_kwh=360.0)
    labels = {"service": "x", "source": "estimate"}
    meter.joules = 100.0
    assert exporter.update() == pytest.approx(100.0)
    meter.joules = 150.0
    assert exporter.update() == pytest.approx(50.0)
    assert exporter.update() == 0.0
    assert sample(metrics.registry, "energy_joules_total", **labels) == pytest.approx(150.0)
    meter.joules = 140.0  # a smaller reading never makes the counter go down
    assert exporter.update() == 0.0
    assert sample(metrics.registry, "energy_joules_total", **labels) == pytest.approx(150.0)
    meter.joules = 160.0
    exporter.update()
    assert sample(metrics.registry, "energy_joules_total", **labels) == pytest.approx(160.0)
    assert sample(metrics.registry, "co2_grams_total", service="x") == pytest.approx(co2_grams(160.0, 360.0))


def test_exporter_labels_rapl_source(tmp_path: Path) -> None:
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "name").write_text("package-0\n")
    (zone / "max_energy_range_uj").write_text("262143328850\n")
    (zone / "energy_uj").write_text("1000000\n")
    meter = EnergyMeter("rapl", powercap_root=tmp_path)
    metrics = ServiceMetrics.create("x")
    exporter = EnergyExporter(meter, metrics, "x", 100.0, proc_stat=None)  # no attribution: all of it
    (zone / "energy_uj").write_text("4000000\n")
    assert exporter.update() == pytest.approx(3.0)
    assert sample(metrics.registry, "energy_joules_total", service="x", source="rapl") == 3.0


def write_proc_stat(path: Path, busy_ticks: int, idle_ticks: int = 10_000) -> None:
    """A /proc/stat whose aggregate line has `busy_ticks` of user time (plus some of nothing else)."""
    path.write_text(f"cpu  {busy_ticks} 0 0 {idle_ticks} 0 0 0 0 0 0\ncpu0 {busy_ticks} 0 0 {idle_ticks} 0 0 0 0 0 0\n")


def test_rapl_energy_is_attributed_by_the_process_share_of_busy_cpu(tmp_path: Path) -> None:
    import os

    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "name").write_text("package-0\n")
    (zone / "max_energy_range_uj").write_text("262143328850\n")
    (zone / "energy_uj").write_text("0\n")
    proc_stat = tmp_path / "stat"
    write_proc_stat(proc_stat, busy_ticks=1_000)
    meter = EnergyMeter("rapl", powercap_root=tmp_path)
    exporter = EnergyExporter(meter, ServiceMetrics.create("x"), "x", 100.0, proc_stat=proc_stat)

    before = meter.read().cpu_seconds
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:  # this process uses about 0.2 s of CPU
        pass
    used = meter.read().cpu_seconds - before
    # Meanwhile the machine was busy for 10x that, and its packages used 100 J.
    ticks = os.sysconf("SC_CLK_TCK")
    write_proc_stat(proc_stat, busy_ticks=1_000 + round(10 * used * ticks))
    (zone / "energy_uj").write_text("100000000\n")
    assert exporter.update() == pytest.approx(10.0, rel=0.1)


def test_cpu_share_and_busy_seconds(tmp_path: Path) -> None:
    import os

    from services.common.energy import cpu_share, machine_busy_cpu_seconds

    assert cpu_share(1.0, 4.0) == 0.25
    assert cpu_share(5.0, 4.0) == 1.0 and cpu_share(1.0, 0.0) == 0.0 and cpu_share(-1.0, 4.0) == 0.0
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal: idle, iowait and steal are not busy
    stat.write_text("cpu  100 20 30 4000 500 6 7 800 0 0\n")
    assert machine_busy_cpu_seconds(stat) == pytest.approx(163 / os.sysconf("SC_CLK_TCK"))
    stat.write_text("intr 1 2 3\n")
    with pytest.raises(ValueError):
        machine_busy_cpu_seconds(stat)


async def test_exporter_run_updates_until_stopped() -> None:
    metrics = ServiceMetrics.create("x")
    meter = FakeMeter()
    exporter = EnergyExporter(meter, metrics, "x", 100.0)
    stop = asyncio.Event()
    meter.joules = 10.0
    task = asyncio.create_task(exporter.run(0.01, stop))
    # Wait for the running exporter to pick up the first reading, then change it.
    await wait_for(lambda: sample(metrics.registry, "energy_joules_total", service="x", source="estimate") == 10.0)
    meter.joules = 25.0
    stop.set()
    await asyncio.wait_for(task, timeout=2)
    # The final update after stop picks up the last reading.
    assert sample(metrics.registry, "energy_joules_total", service="x", source="estimate") == 25.0


def test_metrics_server_on_port_zero_serves_and_closes() -> None:
    metrics = ServiceMetrics.create("x")
    metrics.records_in_total.labels(service="x", topic="raw").inc(5)
    server = start_metrics_server(0, metrics.registry, host="127.0.0.1")
    try:
        assert server.port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
        assert 'clisonix_records_in_total{service="x",topic="raw"} 5.0' in body
    finally:
        server.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=2)
