"""Keyed pseudonyms for subject and session ids: HMAC-SHA256, so the same id always maps to the same
pseudonym under one key (longitudinal studies keep working) and nobody without the key can reverse it.
"""

from __future__ import annotations

import hashlib
import hmac

PREFIX = "ps-"
RECENT_LIMIT = 65_536


class Pseudonymiser:
    """Replaces identifiers by `ps-` + 32 hex digits of HMAC-SHA256(key, kind + ":" + id)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the pseudonym key must be at least 16 bytes")
        self._key = key
        # Every chunk of a session carries the same ids: remember recent answers instead of re-hashing.
        self._recent: dict[tuple[str, str], str] = {}

    def pseudonym(self, kind: str, identifier: str) -> str:
        """The pseudonym of `identifier`; `kind` ("subject", "session") keeps the two id spaces apart.

        Empty ids stay empty, and ids that already are pseudonyms are kept, so re-ingesting a recorded
        session does not pseudonymise twice.
        """
        known = self._recent.get((kind, identifier))
        if known is not None:
            return known
        if not identifier or is_pseudonym(identifier):
            return identifier
        digest = hmac.new(self._key, f"{kind}:{identifier}".encode(), hashlib.sha256).hexdigest()
        if len(self._recent) >= RECENT_LIMIT:
            self._recent.clear()
        self._recent[(kind, identifier)] = PREFIX + digest[:32]
        return PREFIX + digest[:32]


def is_pseudonym(identifier: str) -> bool:
    """True when `identifier` has the shape of a pseudonym made here."""
    rest = identifier.removeprefix(PREFIX)
    return identifier.startswith(PREFIX) and len(rest) == 32 and all(c in "0123456789abcdef" for c in rest)
