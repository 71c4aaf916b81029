"""LIAM records, reports and hypervectors between clisonix.liam.v1 messages and the domain."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
from google.protobuf import struct_pb2

from clisonix.liam.v1 import liam_pb2
from services.common.errors import InvalidArgument
from services.liam.binary import WORD_BITS, Words
from services.liam.errors import InvalidMetrics
from services.liam.monitor import Anomaly, check_metrics

# A stream names a series of records ("service/fusion"); it keys Kafka records, so it stays short.
MAX_STREAM_BYTES = 256


def invalid(exc: InvalidMetrics) -> InvalidArgument:
    """The domain error for bad LIAM input: INVALID_ARGUMENT with the error's reason (not_a_number, ...)."""
    return InvalidArgument(str(exc), reason=exc.reason)


def _python(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return value.number_value
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "null_value" or kind is None:
        return None
    return value  # a struct or list: check_metrics names it as not a number


def record_metrics(record: liam_pb2.MetricRecord) -> dict[str, float]:
    """The record's metrics as finite floats; InvalidArgument naming the stream problem or the bad metric."""
    stream_bytes = len(record.stream.encode("utf-8"))
    if not stream_bytes:
        raise InvalidArgument("record has no stream", reason="empty_stream")
    if stream_bytes > MAX_STREAM_BYTES:
        raise InvalidArgument(f"stream name is {stream_bytes} bytes, over {MAX_STREAM_BYTES}", reason="bad_stream")
    try:
        return check_metrics({name: _python(value) for name, value in record.metrics.items()})
    except InvalidMetrics as exc:
        raise invalid(exc) from exc


def record_time(record: liam_pb2.MetricRecord) -> float:
    return record.time.seconds + record.time.nanos / 1e9 if record.HasField("time") else 0.0


def anomaly_to_proto(anomaly: Anomaly) -> liam_pb2.Anomaly:
    message = liam_pb2.Anomaly(
        record_id=anomaly.record_id,
        metric=anomaly.metric,
        value=anomaly.value,
        mean=anomaly.mean,
        z_score=anomaly.z_score,
        distance=anomaly.distance,
        threshold=anomaly.threshold,
    )
    if anomaly.time_s:
        message.time.FromNanoseconds(int(anomaly.time_s * 1e9))
    return message


def report_to_proto(
    stream: str,
    report: dict[str, Any],
    kind: int,
    anomalies: list[Anomaly] = (),  # type: ignore[assignment]
) -> liam_pb2.PatternReport:
    """A PatternReport from StreamMonitor.report(), with a fresh id, stamped now."""
    message = liam_pb2.PatternReport(
        stream=stream,
        report_id=uuid.uuid4().hex,
        kind=kind,  # type: ignore[arg-type]
        records=report["records"],
        metrics=report["metrics"],
        rank=report["rank"],
        rank_tolerance=report["rank_tolerance"],
        condition_number=report["condition_number"],
        singular_values=report["singular_values"].tolist(),
        explained_variance=report["explained_variance"].tolist(),
        components=np.asarray(report["components"]).ravel().tolist(),
        mean=report["mean"].tolist(),
        std=report["std"].tolist(),
        constant_metrics=report["constant_metrics"],
        method=report["method"],
        anomalies=[anomaly_to_proto(a) for a in anomalies],
    )
    message.time.GetCurrentTime()
    return message


def vectors_from_proto(message: liam_pb2.BinaryVectors, name: str) -> Words:
    """(count, words) uint64 from a BinaryVectors message; InvalidArgument when its sizes disagree."""
    words = -(-message.bits // WORD_BITS) if message.bits else 0
    if not message.bits or message.words != words or not message.count:
        raise InvalidArgument(
            f"{name}: bits {message.bits}, words {message.words}, count {message.count} do not describe vectors "
            f"({words} words for {message.bits} bits)",
            reason="bad_vectors",
        )
    if len(message.data) != message.count * words * 8:
        raise InvalidArgument(
            f"{name}: {len(message.data)} bytes, expected count x words x 8 = {message.count * words * 8}",
            reason="bad_vectors",
        )
    return np.frombuffer(message.data, dtype="<u8").astype(np.uint64).reshape(message.count, words)


def vectors_to_proto(vectors: Words, bits: int) -> liam_pb2.BinaryVectors:
    array = np.ascontiguousarray(np.atleast_2d(vectors), dtype="<u8")
    return liam_pb2.BinaryVectors(data=array.tobytes(), bits=bits, words=array.shape[1], count=array.shape[0])
