"""Structured logging: one JSON object per line, with fields that can never carry signal values or subject ids.

Log with `log.info("chunk rejected", extra={"fields": {"reason": "nan", "stream": stream_id}})`. Field names
that would carry health data are replaced by "[redacted]" before formatting, whatever the caller passed.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

# Field names that could carry raw signal values or identifiers of a person.
REDACTED_FIELDS = frozenset(
    {
        "subject",
        "subject_id",
        "patient",
        "patient_id",
        "name",
        "samples",
        "values",
        "signal",
        "data",
        "payload",
    }
)
REDACTED = "[redacted]"


def redact(fields: dict[str, Any]) -> dict[str, Any]:
    """A copy of `fields` with every health-data field name's value replaced by "[redacted]"."""
    return {k: (REDACTED if k.lower() in REDACTED_FIELDS else v) for k, v in fields.items()}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line: time, level, logger, message, service and the redacted fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "service": self.service,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(redact(fields))
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines for local runs, with the same redaction."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} {record.name}: {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            line += " " + " ".join(f"{k}={v}" for k, v in redact(fields).items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(service: str, level: str = "INFO", fmt: str = "json") -> None:
    """Routes the root logger to stderr in the chosen format; call once from a service's __main__."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiokafka logs whole records at debug level; keep it at warning whatever the service level is.
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
