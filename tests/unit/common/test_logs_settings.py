"""JSON logs that redact health-data fields, and settings read from CLISONIX_* variables."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.common.logs import REDACTED, REDACTED_FIELDS, JsonFormatter, TextFormatter, configure_logging, redact
from services.common.settings import ServiceSettings
from services.ingest.settings import IngestSettings

KEY = "a-pseudonym-key-of-enough-length"


def record(message: str = "chunk rejected", fields: object = None, **kw: object) -> logging.LogRecord:
    rec = logging.LogRecord("clisonix.test", logging.WARNING, __file__, 1, message, (), None)
    if fields is not None:
        rec.fields = fields  # type: ignore[attr-defined]
    for k, v in kw.items():
        setattr(rec, k, v)
    return rec


def test_json_formatter_redacts_and_keeps_other_fields() -> None:
    fields = {
        "subject_id": "alice",
        "samples": [1.5, 2.5],
        "values": "0.123",
        "Patient_ID": "MRN-1",
        "payload": b"raw",
        "reason": "nan",
        "stream": "eeg-0",
        "count": 3,
    }
    line = JsonFormatter("ingest").format(record(fields=fields))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "chunk rejected"
    assert entry["level"] == "warning"
    assert entry["logger"] == "clisonix.test"
    assert entry["service"] == "ingest"
    assert entry["time"].endswith("Z")
    for name in ("subject_id", "samples", "values", "Patient_ID", "payload"):
        assert entry[name] == REDACTED
    assert entry["reason"] == "nan"
    assert entry["stream"] == "eeg-0"
    assert entry["count"] == 3
    # The timestamp may hold any digits ("...:01.5..."): look for the secrets everywhere else.
    rest = json.dumps({key: value for key, value in entry.items() if key != "time"})
    for secret in ("alice", "1.5", "0.123", "MRN-1"):
        assert secret not in rest


def test_every_listed_field_is_redacted() -> None:
    fields = {name: f"secret-{name}" for name in REDACTED_FIELDS}
    line = JsonFormatter("x").format(record(fields=fields))
    assert "secret-" not in line
    assert redact({"subject": 1, "other": 2}) == {"subject": REDACTED, "other": 2}


def test_json_formatter_one_line_with_multiline_message_and_exception() -> None:
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        exc_info = sys.exc_info()
    rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "two\nlines", (), exc_info)
    line = JsonFormatter("x").format(rec)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "two\nlines"
    assert "RuntimeError: boom" in entry["error"]


def test_json_formatter_serialises_odd_values() -> None:
    line = JsonFormatter("x").format(record(fields={"path": Path("/tmp/a"), "ids": ("a", "b"), "none": None}))
    entry = json.loads(line, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert entry["path"] == "/tmp/a"
    assert entry["ids"] == ["a", "b"]
    assert entry["none"] is None


def test_json_formatter_ignores_non_dict_fields() -> None:
    entry = json.loads(JsonFormatter("x").format(record(fields="subject alice")))
    assert "subject alice" not in json.dumps(entry)


def test_text_formatter_redacts() -> None:
    line = TextFormatter().format(record(fields={"subject_id": "alice", "reason": "nan"}))
    assert "alice" not in line
    assert f"subject_id={REDACTED}" in line
    assert "reason=nan" in line


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    aiokafka_level = logging.getLogger("aiokafka").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("aiokafka").setLevel(aiokafka_level)


def test_configure_logging_json(restore_root_logger: None, monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("ingest", "debug", "json")
    root = logging.getLogger()
    assert root.level == logging.DEBUG
    assert len(root.handlers) == 1
    assert isinstance(root.handlers[0].formatter, JsonFormatter)
    assert logging.getLogger("aiokafka").level == logging.WARNING
    logging.getLogger("clisonix.x").info("hello", extra={"fields": {"subject_id": "alice", "stream": "s"}})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert (entry["message"], entry["service"], entry["subject_id"], entry["stream"]) == (
        "hello",
        "ingest",
        REDACTED,
        "s",
    )


def test_configure_logging_text(restore_root_logger: None, monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("cli", "WARNING", "text")
    assert isinstance(logging.getLogger().handlers[0].formatter, TextFormatter)
    logging.getLogger("clisonix.x").info("hidden")
    logging.getLogger("clisonix.x").warning("shown")
    assert "hidden" not in stream.getvalue()
    assert "shown" in stream.getvalue()


# --- settings ---------------------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for name in list(os.environ):
        if name.upper().startswith("CLISONIX_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_service_settings_from_env(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CLISONIX_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
    clean_env.setenv("CLISONIX_GRPC_PORT", "6001")
    clean_env.setenv("CLISONIX_LOG_FORMAT", "text")
    clean_env.setenv("CLISONIX_AUTH_TOKEN", "tok-123")
    clean_env.setenv("CLISONIX_UNRELATED_THING", "ignored")
    settings = ServiceSettings()
    assert settings.kafka_bootstrap_servers == "127.0.0.1:19092"
    assert settings.grpc_port == 6001
    assert settings.log_format == "text"
    assert settings.auth_token is not None and settings.auth_token.get_secret_value() == "tok-123"


def test_service_settings_env_values_are_validated(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CLISONIX_GRPC_PORT", "70000")
    with pytest.raises(ValidationError, match="grpc_port"):
        ServiceSettings()


def test_keyword_arguments_and_defaults(clean_env: pytest.MonkeyPatch) -> None:
    settings = ServiceSettings(grpc_port=0)
    assert settings.grpc_port == 0
    assert settings.kafka_bootstrap_servers == "127.0.0.1:9092"
    assert settings.auth_token is None


def test_ingest_settings_from_env(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CLISONIX_PSEUDONYM_KEY", KEY)
    clean_env.setenv("CLISONIX_MAX_CHANNELS", "64")
    clean_env.setenv("CLISONIX_TOPIC_RAW", "raw.x")
    clean_env.setenv("CLISONIX_CREATE_TOPICS", "false")
    settings = IngestSettings()
    assert settings.pseudonym_key.get_secret_value() == KEY
    assert settings.max_channels == 64
    assert settings.topic_raw == "raw.x"
    assert settings.create_topics is False
    assert settings.service_name == "ingest"


def test_settings_are_frozen(clean_env: pytest.MonkeyPatch) -> None:
    settings = IngestSettings(pseudonym_key=KEY)
    with pytest.raises(ValidationError):
        settings.grpc_port = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        settings.max_channels = 2  # type: ignore[misc]
    assert settings.grpc_port == 50051


def test_ingest_settings_need_a_pseudonym_key(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError) as info:
        IngestSettings()
    assert "pseudonym_key" in str(info.value)
    assert info.value.errors()[0]["type"] == "missing"


def test_ingest_settings_reject_a_short_pseudonym_key(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="pseudonym_key"):
        IngestSettings(pseudonym_key="short")


def test_tls_cert_without_key_fails(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="tls_cert_file and tls_key_file"):
        ServiceSettings(tls_cert_file=tmp_path / "cert.pem")
    with pytest.raises(ValidationError, match="tls_cert_file and tls_key_file"):
        ServiceSettings(tls_key_file=tmp_path / "key.pem")
    pair = ServiceSettings(tls_cert_file=tmp_path / "cert.pem", tls_key_file=tmp_path / "key.pem")
    assert pair.tls_cert_file == tmp_path / "cert.pem"


def test_mtls_ca_without_cert_fails(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="mTLS"):
        ServiceSettings(tls_client_ca_file=tmp_path / "ca.pem")
    ServiceSettings(
        tls_cert_file=tmp_path / "c.pem", tls_key_file=tmp_path / "k.pem", tls_client_ca_file=tmp_path / "ca.pem"
    )


def test_secrets_not_shown(clean_env: pytest.MonkeyPatch) -> None:
    settings = IngestSettings(pseudonym_key=KEY, auth_token="token-xyz", kafka_sasl_password="sasl-pw")
    for text in (repr(settings), str(settings), str(settings.model_dump()), repr(settings.pseudonym_key)):
        assert KEY not in text
        assert "token-xyz" not in text
        assert "sasl-pw" not in text
    assert settings.auth_token is not None and settings.auth_token.get_secret_value() == "token-xyz"
