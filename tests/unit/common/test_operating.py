"""Operating metrics from a service's registry: counters become rates, latency a mean over the interval."""

from __future__ import annotations

import pytest

from services.common.metrics import ServiceMetrics
from services.common.operating import operating_metrics, read_totals


def test_counters_become_rates_and_latency_a_mean_over_the_interval() -> None:
    metrics = ServiceMetrics.create("fusion")
    metrics.records_in_total.labels("fusion", "raw").inc(100)
    before = read_totals(metrics.registry)
    metrics.records_in_total.labels("fusion", "raw").inc(50)
    metrics.records_in_total.labels("fusion", "other").inc(50)
    metrics.energy_joules_total.labels("fusion", "estimate").inc(20.0)
    metrics.stage_latency_seconds.labels("fusion", "window").observe(0.010)
    metrics.stage_latency_seconds.labels("fusion", "emit").observe(0.030)
    metrics.consumer_lag_records.labels("fusion", "raw").set(7)
    figures = operating_metrics(before, read_totals(metrics.registry), seconds=2.0, cpu=0.5)
    assert figures["records_in_per_second"] == pytest.approx(50.0)
    assert figures["power_watts"] == pytest.approx(10.0)
    assert figures["latency_mean_seconds"] == pytest.approx(0.020)
    assert figures["consumer_lag_records"] == 7 and figures["cpu_cores"] == pytest.approx(0.25)
    assert figures["records_rejected_per_second"] == 0.0


def test_an_interval_with_nothing_timed_has_no_latency() -> None:
    metrics = ServiceMetrics.create("tide")
    reading = read_totals(metrics.registry)
    figures = operating_metrics(reading, reading, seconds=1.0, cpu=0.0)
    assert "latency_mean_seconds" not in figures and figures["power_watts"] == 0.0
