"""CloudEvents binary-mode headers and decoding of protobuf records."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest

from clisonix.signal.v1 import signal_pb2
from services.common.events import (
    CONTENT_TYPE,
    UndecodableEvent,
    decode_event,
    event_headers,
    header_value,
    read_attributes,
)
from tests.helpers import make_chunk

SOURCE = "//clisonix/test"
RFC3339_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")


def test_headers_have_exact_names_and_values() -> None:
    chunk = make_chunk()
    when = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    headers = event_headers(chunk, SOURCE, event_id="id-1", time=when)
    assert [name for name, _ in headers] == [
        "ce_specversion",
        "ce_id",
        "ce_source",
        "ce_type",
        "ce_time",
        "content-type",
    ]
    values = dict(headers)
    assert all(isinstance(v, bytes) for v in values.values())
    assert values["ce_specversion"] == b"1.0"
    assert values["ce_id"] == b"id-1"
    assert values["ce_source"] == SOURCE.encode()
    assert values["ce_type"] == b"clisonix.signal.v1.SignalChunk"
    assert values["ce_type"].decode() == signal_pb2.SignalChunk.DESCRIPTOR.full_name
    assert values["ce_time"] == b"2024-05-06T07:08:09.123456Z"
    assert values["content-type"] == b"application/protobuf"
    assert "traceparent" not in values


def test_default_id_is_unique_and_time_is_now_rfc3339_utc() -> None:
    before = datetime.now(UTC)
    first = dict(event_headers(make_chunk(), SOURCE))
    second = dict(event_headers(make_chunk(), SOURCE))
    after = datetime.now(UTC)
    assert first["ce_id"] and first["ce_id"] != second["ce_id"]
    text = first["ce_time"].decode()
    assert RFC3339_Z.match(text), text
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert before - timedelta(seconds=1) <= parsed <= after + timedelta(seconds=1)


def test_non_utc_time_is_not_written_with_z() -> None:
    # A time with another offset keeps its offset (only +00:00 becomes Z), so it is never mislabelled as UTC.
    when = datetime(2024, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    text = dict(event_headers(make_chunk(), SOURCE, time=when))["ce_time"].decode()
    assert datetime.fromisoformat(text.replace("Z", "+00:00")) == when


def test_type_follows_the_message() -> None:
    ack = signal_pb2.IngestAck()
    assert dict(event_headers(ack, SOURCE))["ce_type"] == b"clisonix.signal.v1.IngestAck"


def test_traceparent_is_optional() -> None:
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    headers = event_headers(make_chunk(), SOURCE, traceparent=trace)
    assert headers[-1] == ("traceparent", trace.encode())
    _, attributes = decode_event(signal_pb2.SignalChunk, make_chunk().SerializeToString(), headers)
    assert attributes.traceparent == trace


def test_round_trip() -> None:
    chunk = make_chunk(sequence=3)
    headers = event_headers(chunk, SOURCE, event_id="e-3")
    message, attributes = decode_event(signal_pb2.SignalChunk, chunk.SerializeToString(), headers)
    assert message == chunk
    assert attributes.id == "e-3"
    assert attributes.source == SOURCE
    assert attributes.type == "clisonix.signal.v1.SignalChunk"
    assert attributes.content_type == CONTENT_TYPE
    assert RFC3339_Z.match(attributes.time)
    assert attributes.traceparent is None


def test_empty_value_decodes_as_default_message() -> None:
    message, _ = decode_event(signal_pb2.SignalChunk, None, event_headers(signal_pb2.SignalChunk(), SOURCE))
    assert message == signal_pb2.SignalChunk()


@pytest.mark.parametrize("missing", ["ce_specversion", "ce_id", "ce_source", "ce_type"])
def test_missing_header(missing: str) -> None:
    chunk = make_chunk()
    headers = [(k, v) for k, v in event_headers(chunk, SOURCE) if k != missing]
    with pytest.raises(UndecodableEvent) as info:
        decode_event(signal_pb2.SignalChunk, chunk.SerializeToString(), headers)
    assert info.value.reason == "missing_header"
    assert missing in info.value.detail


@pytest.mark.parametrize("headers", [None, []])
def test_no_headers_at_all(headers: list[tuple[str, bytes]] | None) -> None:
    with pytest.raises(UndecodableEvent) as info:
        decode_event(signal_pb2.SignalChunk, make_chunk().SerializeToString(), headers)
    assert info.value.reason == "missing_header"


def test_empty_header_counts_as_missing() -> None:
    headers = [(k, b"" if k == "ce_id" else v) for k, v in event_headers(make_chunk(), SOURCE)]
    with pytest.raises(UndecodableEvent) as info:
        read_attributes(headers)
    assert info.value.reason == "missing_header"


def test_bad_specversion() -> None:
    headers = [(k, b"0.3" if k == "ce_specversion" else v) for k, v in event_headers(make_chunk(), SOURCE)]
    with pytest.raises(UndecodableEvent) as info:
        read_attributes(headers)
    assert info.value.reason == "bad_specversion"


def test_wrong_type() -> None:
    ack = signal_pb2.IngestAck(stream_id="x")
    with pytest.raises(UndecodableEvent) as info:
        decode_event(signal_pb2.SignalChunk, ack.SerializeToString(), event_headers(ack, SOURCE))
    assert info.value.reason == "wrong_type"
    assert "IngestAck" in str(info.value)


def test_wrong_content_type() -> None:
    chunk = make_chunk()
    headers = [(k, b"application/json" if k == "content-type" else v) for k, v in event_headers(chunk, SOURCE)]
    with pytest.raises(UndecodableEvent) as info:
        decode_event(signal_pb2.SignalChunk, chunk.SerializeToString(), headers)
    assert info.value.reason == "wrong_content_type"


def test_absent_content_type_is_accepted() -> None:
    chunk = make_chunk()
    headers = [(k, v) for k, v in event_headers(chunk, SOURCE) if k != "content-type"]
    message, attributes = decode_event(signal_pb2.SignalChunk, chunk.SerializeToString(), headers)
    assert message == chunk
    assert attributes.content_type == ""


@pytest.mark.parametrize("value", [b"\xff\xff\xff\xff", b"\x0a\x05ab", b"garbage that is not protobuf \x80"])
def test_bad_protobuf(value: bytes) -> None:
    with pytest.raises(UndecodableEvent) as info:
        decode_event(signal_pb2.SignalChunk, value, event_headers(make_chunk(), SOURCE))
    assert info.value.reason == "bad_protobuf"
    assert isinstance(info.value, Exception)


def test_header_value() -> None:
    headers = [("a", b"1"), ("b", b"\xff"), ("a", b"2")]
    assert header_value(headers, "a") == "1"
    assert header_value(headers, "b") == "\ufffd"
    assert header_value(headers, "c") is None
    assert header_value(None, "a") is None
