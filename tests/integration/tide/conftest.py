"""Tide fixtures (tide_settings, tide_replica) live in tests/conftest.py, beside the other services' fixtures,
so fusion, inference and ingest tests can start replicas too."""

from tests.conftest import tide_replica, tide_settings

__all__ = ["tide_replica", "tide_settings"]
