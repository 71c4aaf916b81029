"""Keyed pseudonyms: deterministic, key-dependent, kind-separated, idempotent and irreversible in shape."""

from __future__ import annotations

import hashlib
import hmac
import re

import pytest

from services.ingest.pseudonyms import PREFIX, Pseudonymiser, is_pseudonym

KEY = b"k" * 16
SHAPE = re.compile(r"^ps-[0-9a-f]{32}$")


def test_deterministic_and_shaped() -> None:
    first = Pseudonymiser(KEY).pseudonym("subject", "alice")
    assert first == Pseudonymiser(KEY).pseudonym("subject", "alice")
    assert SHAPE.match(first)
    assert is_pseudonym(first)
    expected = hmac.new(KEY, b"subject:alice", hashlib.sha256).hexdigest()[:32]
    assert first == PREFIX + expected


def test_different_ids_differ() -> None:
    p = Pseudonymiser(KEY)
    assert p.pseudonym("subject", "alice") != p.pseudonym("subject", "bob")


def test_key_dependent() -> None:
    assert Pseudonymiser(KEY).pseudonym("subject", "alice") != Pseudonymiser(b"j" * 16).pseudonym("subject", "alice")


def test_kinds_are_separated() -> None:
    p = Pseudonymiser(KEY)
    assert p.pseudonym("subject", "id-1") != p.pseudonym("session", "id-1")


def test_empty_stays_empty() -> None:
    assert Pseudonymiser(KEY).pseudonym("subject", "") == ""


def test_already_pseudonym_is_kept() -> None:
    p = Pseudonymiser(KEY)
    once = p.pseudonym("session", "session-42")
    assert p.pseudonym("session", once) == once
    # Under another key too: re-ingesting a recording does not pseudonymise twice.
    assert Pseudonymiser(b"j" * 16).pseudonym("session", once) == once


@pytest.mark.parametrize(
    "lookalike",
    ["ps-", "ps-" + "0" * 31, "ps-" + "0" * 33, "ps-" + "A" * 32, "ps-" + "g" * 32, "xs-" + "0" * 32, "0" * 32],
)
def test_lookalikes_are_pseudonymised(lookalike: str) -> None:
    assert not is_pseudonym(lookalike)
    result = Pseudonymiser(KEY).pseudonym("subject", lookalike)
    assert result != lookalike
    assert is_pseudonym(result)


@pytest.mark.parametrize("key", [b"", b"short", b"x" * 15])
def test_short_key_rejected(key: bytes) -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        Pseudonymiser(key)


@pytest.mark.parametrize(
    "identifier", ["alice", "deadbeef", "0123456789abcdef", "MRN-000123", "subject-a", "ps-alice", "Alice Smith"]
)
def test_no_raw_id_in_output(identifier: str) -> None:
    p = Pseudonymiser(KEY)
    for kind in ("subject", "session"):
        out = p.pseudonym(kind, identifier)
        assert SHAPE.match(out)
        assert identifier not in out
        assert identifier.lower() not in out
