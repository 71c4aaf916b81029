"""Streams of metric records: checks, anomalies against the running distribution, reports."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.liam.errors import InvalidMetrics, NonNumericMetric
from services.liam.monitor import MonitorBook, StreamMonitor, check_metrics


@pytest.mark.parametrize(
    ("metrics", "error", "reason", "named"),
    [
        ({}, InvalidMetrics, "empty_record", "empty"),
        ({"latency": float("nan")}, InvalidMetrics, "non_finite", "latency"),
        ({"latency": float("inf")}, InvalidMetrics, "non_finite", "latency"),
        ({"latency": "12 ms"}, NonNumericMetric, "not_a_number", "latency"),
        ({"ok": 1.0, "flag": True}, NonNumericMetric, "not_a_number", "flag"),
        ({"missing": None}, NonNumericMetric, "not_a_number", "missing"),
    ],
)
def test_bad_records_are_refused_naming_the_metric(metrics, error, reason, named) -> None:
    with pytest.raises(error) as caught:
        check_metrics(metrics)
    assert caught.value.reason == reason and named in str(caught.value)


def normal_records(count: int, seed: int = 0) -> list[dict[str, float]]:
    rng = np.random.default_rng(seed)
    return [
        {"latency": 0.010 + 0.001 * rng.standard_normal(), "power": 20.0 + rng.standard_normal(), "errors": 0.0}
        for _ in range(count)
    ]


def test_a_spike_after_warmup_is_an_anomaly_attributed_to_its_metric() -> None:
    monitor = StreamMonitor("service/fusion", warmup=30, z_threshold=6.0)
    found = [monitor.observe(f"r{i}", float(i), record) for i, record in enumerate(normal_records(200))]
    assert not any(found), "ordinary noise raised an anomaly"
    spike = monitor.observe("spike", 200.0, {"latency": 0.010, "power": 40.0, "errors": 0.0})
    assert spike is not None and spike.metric == "power" and spike.z_score > 6
    assert spike.mean == pytest.approx(20.0, abs=0.5) and spike.distance > 6
    # A metric that never varied and now moves is infinitely far: the first errors after a clean run.
    errors = monitor.observe("errors", 201.0, {"latency": 0.010, "power": 20.0, "errors": 3.0})
    assert errors is not None and errors.metric == "errors" and math.isinf(errors.z_score)
    assert monitor.anomalies == 2


def test_no_anomaly_before_warmup_duplicates_count_once_and_missing_metrics_add_no_variance() -> None:
    monitor = StreamMonitor("s", warmup=30)
    assert monitor.observe("a", 0.0, {"x": 1.0, "y": 2.0}) is None
    assert monitor.observe("b", 1.0, {"x": 1000.0, "y": 2.0}) is None  # before warmup: never an anomaly
    assert monitor.observe("b", 1.0, {"x": 5.0, "y": 5.0}) is None
    assert monitor.records == 2 and monitor.duplicates == 1
    before = monitor.report()["std"].copy()
    monitor.observe("c", 2.0, {"x": float(monitor.report()["mean"][0]), "z": 9.0})  # y missing, z unknown
    assert monitor.ignored == 1 and monitor.records == 3
    assert monitor.report()["metrics"] == ["x", "y"]
    assert monitor.report()["std"][1] <= before[1]  # y imputed at its mean


def test_report_rank_and_condition_are_those_of_the_z_scored_data() -> None:
    rng = np.random.default_rng(3)
    base = rng.standard_normal((500, 2))
    # Four metrics, two of them combinations of the others: rank 2 of 4; one constant metric besides.
    rows = np.column_stack([base, base @ [1.0, 2.0], base @ [0.5, -1.0], np.full(500, 7.0)])
    names = ["a", "b", "c", "d", "e"]
    monitor = StreamMonitor("s", warmup=10_000)
    for i, row in enumerate(rows):
        monitor.observe(str(i), float(i), dict(zip(names, row, strict=True)))
    report = monitor.report()
    scaled = (rows[:, :4] - rows[:, :4].mean(axis=0)) / rows[:, :4].std(axis=0, ddof=1)
    singular = np.linalg.svd(scaled, compute_uv=False)
    assert report["rank"] == np.linalg.matrix_rank(scaled) == 2
    np.testing.assert_allclose(report["singular_values"][:2], singular[:2], rtol=1e-8)
    assert report["condition_number"] == pytest.approx(singular[0] / singular[1], rel=1e-8)
    assert report["constant_metrics"] == ["e"]
    assert report["explained_variance"][:2].sum() == pytest.approx(1.0)


def test_the_book_bounds_its_streams() -> None:
    book = MonitorBook(max_streams=2, warmup=5)
    book.monitor("a"), book.monitor("b")
    with pytest.raises(InvalidMetrics, match="already watching 2"):
        book.monitor("c")
    assert book.monitor("a") is book.streams["a"]
