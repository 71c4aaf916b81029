"""Streams of metric records watched for patterns and anomalies: what the LIAM service keeps per stream.

Pure logic (no Kafka, no gRPC). A stream's metrics are named; the first record fixes them and their order (the
coordinates of every vector, direction and mean the stream reports). A later record missing one of them counts
it at the stream's running mean (it adds no variance); names the first record did not have are counted as
ignored, not folded in, so one odd record cannot reshape the stream.

Anomalies: once a stream has `warmup` records, each new record is compared with the distribution of the records
before it: each metric's distance from its running mean in standard deviations (z), and the record's
Mahalanobis distance over all metrics together. A record whose largest |z| exceeds `z_threshold` is an anomaly,
attributed to that metric; a metric that never varied and now moves has an infinite z. The record is then folded
in like any other, so a lasting shift becomes the new normal instead of an alarm that never ends.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.liam.errors import InvalidMetrics, NonNumericMetric
from services.liam.streaming import PatternStream

DEFAULT_WARMUP = 30
DEFAULT_Z_THRESHOLD = 6.0
DEFAULT_MAX_METRICS = 64
DEFAULT_DEDUPE = 10_000
# Directions whose variance is below this fraction of the largest carry rounding noise, not data.
EIGEN_FLOOR = 1e-12


def check_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The record's metrics as finite floats; raises InvalidMetrics (empty record, non-finite value) or
    NonNumericMetric (a string, bool, None or other non-number), naming the metric."""
    if not metrics:
        raise InvalidMetrics("empty record: at least one metric is needed", field="metrics", reason="empty_record")
    checked: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name:
            raise InvalidMetrics(f"metric names must be non-empty strings, got {name!r}", field="metrics")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise NonNumericMetric(f"metric {name!r} is a {type(value).__name__}, not a number", field=name)
        number = float(value)
        if not math.isfinite(number):
            raise InvalidMetrics(f"metric {name!r} is not finite ({number})", field=name, reason="non_finite")
        checked[name] = number
    return checked


@dataclass(frozen=True)
class Anomaly:
    record_id: str
    time_s: float
    metric: str
    value: float
    mean: float
    z_score: float
    distance: float
    threshold: float


@dataclass
class StreamMonitor:
    """One stream: its metric names, running patterns, anomaly check and the record ids already counted."""

    stream: str
    warmup: int = DEFAULT_WARMUP
    z_threshold: float = DEFAULT_Z_THRESHOLD
    max_metrics: int = DEFAULT_MAX_METRICS
    dedupe: int = DEFAULT_DEDUPE
    metrics: tuple[str, ...] = ()
    patterns: PatternStream | None = None
    ignored: int = 0
    duplicates: int = 0
    anomalies: int = 0
    _seen: OrderedDict[str, None] = field(default_factory=OrderedDict)

    @property
    def records(self) -> int:
        return self.patterns.count if self.patterns is not None else 0

    def observe(self, record_id: str, time_s: float, metrics: Mapping[str, float]) -> Anomaly | None:
        """Folds one checked record in; returns the anomaly it is, if it is one. A record id seen before is
        counted as a duplicate and changes nothing."""
        if record_id and record_id in self._seen:
            self.duplicates += 1
            return None
        if self.patterns is None:
            names = sorted(metrics)
            if len(names) > self.max_metrics:
                raise InvalidMetrics(f"{len(names)} metrics in one record, over {self.max_metrics}", field="metrics")
            self.metrics = tuple(names)
            self.patterns = PatternStream(len(names))
        self.ignored += sum(1 for name in metrics if name not in self.metrics)
        if not any(name in metrics for name in self.metrics):
            return None  # nothing of this stream's metrics: folding in means only would shrink its variance
        mean = self.patterns.mean
        row = np.array([metrics.get(name, mean[i]) for i, name in enumerate(self.metrics)])
        anomaly = self._check(record_id, time_s, row) if self.patterns.count >= self.warmup else None
        self.patterns.update(row)
        if record_id:  # remembered once folded in: a record refused above may come again, corrected
            self._seen[record_id] = None
            while len(self._seen) > self.dedupe:
                self._seen.popitem(last=False)
        if anomaly is not None:
            self.anomalies += 1
        return anomaly

    def _check(self, record_id: str, time_s: float, row: np.ndarray) -> Anomaly | None:
        assert self.patterns is not None
        mean = self.patterns.mean
        covariance = self.patterns.covariance()
        std = np.sqrt(np.maximum(np.diag(covariance), 0.0))
        deviation = row - mean
        # A metric that never varied (beyond rounding of its own size) and now moves is infinitely far.
        steady = std <= 1e-12 * np.maximum(np.abs(mean), 1.0)
        moved = np.abs(deviation) > 1e-9 * np.maximum(np.abs(mean), 1.0)
        z = np.zeros(row.size)
        np.divide(deviation, std, out=z, where=~steady)
        z[steady & moved] = np.inf * np.sign(deviation[steady & moved])
        worst = int(np.argmax(np.abs(z)))
        if not abs(z[worst]) > self.z_threshold:
            return None
        return Anomaly(
            record_id=record_id,
            time_s=time_s,
            metric=self.metrics[worst],
            value=float(row[worst]),
            mean=float(mean[worst]),
            z_score=float(z[worst]),
            distance=mahalanobis(deviation, covariance, ~steady),
            threshold=self.z_threshold,
        )

    def report(self) -> dict[str, Any]:
        """The stream's patterns so far, on its z-scored data: records, metrics (coordinate order), rank with its
        tolerance, condition number (largest / smallest non-zero singular value; inf only with no variance at
        all), singular values, explained variance, principal directions (rows), mean, std, constant metrics and
        the method the decomposition took ("covariance" or "qr-fallback")."""
        if self.patterns is None or self.patterns.count == 0:
            raise InvalidMetrics(f"stream {self.stream!r} has no records", field="stream")
        found = self.patterns.patterns(standardise=True)
        n, d = self.patterns.count, len(self.metrics)
        # Singular values of the centred, scaled n x d data: sqrt of the eigenvalues times (n - 1).
        singular = np.sqrt(np.maximum(found["eigenvalues"], 0.0) * max(n - 1, 1))
        largest = float(singular[0]) if singular.size else 0.0
        tolerance = largest * max(n, d) * np.finfo(np.float64).eps
        rank = int(np.count_nonzero(singular > tolerance))
        condition = largest / float(singular[rank - 1]) if rank else math.inf
        return {
            "records": n,
            "metrics": list(self.metrics),
            "rank": rank,
            "rank_tolerance": tolerance,
            "condition_number": condition,
            "singular_values": singular,
            "explained_variance": found["explained_variance"],
            "components": found["components"],
            "mean": found["mean"],
            "std": found["std"],
            "constant_metrics": [self.metrics[i] for i in found["zero_variance_columns"]],
            "method": found["method"],
        }


def mahalanobis(deviation: np.ndarray, covariance: np.ndarray, varying: np.ndarray) -> float:
    """sqrt(dev^T C^+ dev) over the varying metrics, leaving out directions of negligible variance."""
    if not varying.any():
        return 0.0
    values, vectors = np.linalg.eigh(covariance[np.ix_(varying, varying)])
    keep = values > values.max() * EIGEN_FLOOR if values.max() > 0 else np.zeros(values.size, bool)
    if not keep.any():
        return 0.0
    projected = vectors[:, keep].T @ deviation[varying]
    return float(np.sqrt(np.sum(projected**2 / values[keep])))


class MonitorBook:
    """Every stream's monitor, created on first record; at most `max_streams` (a new one beyond is refused)."""

    def __init__(self, max_streams: int = 1000, **options: Any) -> None:
        self.max_streams = max_streams
        self.options = options
        self.streams: dict[str, StreamMonitor] = {}

    def monitor(self, stream: str) -> StreamMonitor:
        found = self.streams.get(stream)
        if found is None:
            if len(self.streams) >= self.max_streams:
                raise InvalidMetrics(f"already watching {self.max_streams} streams", field="stream")
            found = self.streams[stream] = StreamMonitor(stream, **self.options)
        return found
