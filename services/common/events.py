"""CloudEvents Kafka binding, binary mode: the event's attributes travel as `ce_*` record headers and the
protobuf message is the record value, so any consumer can tell what a record is without guessing.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from google.protobuf.message import DecodeError as ProtobufDecodeError
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)

SPEC_VERSION = "1.0"
CONTENT_TYPE = "application/protobuf"
CONTENT_TYPE_BYTES = CONTENT_TYPE.encode()

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True)
class EventAttributes:
    """The CloudEvents attributes of one record, as read back from its headers."""

    id: str
    source: str
    type: str
    time: str
    content_type: str
    traceparent: str | None = None


def event_headers(
    message: Message,
    source: str,
    event_id: str | None = None,
    time: datetime | None = None,
    traceparent: str | None = None,
) -> Headers:
    """Binary-mode CloudEvents headers for `message`.

    source: the producing service as a URI reference, e.g. "//clisonix/ingest".
    event_id: unique per event; give a deterministic one where re-sending must be recognisable.
    """
    when = (time or datetime.now(UTC)).isoformat(timespec="microseconds").replace("+00:00", "Z")
    headers: Headers = [
        ("ce_specversion", SPEC_VERSION.encode()),
        ("ce_id", (event_id or str(uuid.uuid4())).encode()),
        ("ce_source", source.encode()),
        ("ce_type", message.DESCRIPTOR.full_name.encode()),
        ("ce_time", when.encode()),
        ("content-type", CONTENT_TYPE.encode()),
    ]
    if traceparent:
        headers.append(("traceparent", traceparent.encode()))
    return headers


def header_value(headers: Sequence[tuple[str, bytes]] | None, name: str) -> str | None:
    """The first header called `name`, decoded as UTF-8, or None."""
    for key, value in headers or ():
        if key == name:
            return value.decode("utf-8", errors="replace") if value is not None else None
    return None


class UndecodableEvent(Exception):
    """A record that is not the event its topic carries; `reason` is a short label for metrics and headers."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def read_attributes(headers: Sequence[tuple[str, bytes]] | None) -> EventAttributes:
    """The CloudEvents attributes in `headers`; raises UndecodableEvent when a required one is missing."""
    # One pass over the headers (the first of each name counts): this runs for every record consumed.
    found: dict[str, bytes | None] = {}
    for key, raw in headers or ():
        found.setdefault(key, raw)

    def text(name: str) -> str | None:
        raw = found.get(name)
        return raw.decode("utf-8", errors="replace") if raw is not None else None

    values = {name: text(name) for name in ("ce_specversion", "ce_id", "ce_source", "ce_type")}
    missing = [name for name, value in values.items() if not value]
    if missing:
        raise UndecodableEvent("missing_header", f"missing CloudEvents headers: {', '.join(missing)}")
    if values["ce_specversion"] != SPEC_VERSION:
        raise UndecodableEvent("bad_specversion", f"ce_specversion {values['ce_specversion']!r} is not 1.0")
    return EventAttributes(
        id=values["ce_id"] or "",
        source=values["ce_source"] or "",
        type=values["ce_type"] or "",
        time=text("ce_time") or "",
        content_type=text("content-type") or "",
        traceparent=text("traceparent"),
    )


def parse_event(message_type: type[M], value: bytes | None, headers: Sequence[tuple[str, bytes]] | None) -> M:
    """Like decode_event, for hot paths that need only the message: checks the type and content type headers,
    parses the value, builds no EventAttributes. Raises UndecodableEvent as decode_event does."""
    expected = message_type.DESCRIPTOR.full_name
    event_type = content_type = None
    for key, raw in headers or ():
        if key == "ce_type" and event_type is None:
            event_type = raw
        elif key == "content-type" and content_type is None:
            content_type = raw
    if not event_type:
        raise UndecodableEvent("missing_header", "missing CloudEvents headers: ce_type")
    if event_type != expected.encode():
        found = event_type.decode("utf-8", "replace")
        raise UndecodableEvent("wrong_type", f"ce_type {found!r}, expected {expected!r}")
    if content_type and content_type != CONTENT_TYPE_BYTES:
        raise UndecodableEvent("wrong_content_type", f"content-type {content_type.decode('utf-8', 'replace')!r}")
    message = message_type()
    try:
        message.ParseFromString(value or b"")
    except ProtobufDecodeError as exc:
        raise UndecodableEvent("bad_protobuf", f"value does not parse as {expected}: {exc}") from exc
    return message


def decode_event(
    message_type: type[M], value: bytes | None, headers: Sequence[tuple[str, bytes]] | None
) -> tuple[M, EventAttributes]:
    """Parses a record into `message_type`, checking its headers say it is that type.

    Raises UndecodableEvent with reason missing_header, wrong_type, wrong_content_type or bad_protobuf.
    """
    attributes = read_attributes(headers)
    return parse_event(message_type, value, headers), attributes
