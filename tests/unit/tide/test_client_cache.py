"""TideClient retries and remembered versions, and TideCache's apply rules, without a replica."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from clisonix.tide.v1 import tide_pb2
from services.common.errors import ClisonixError, DeadlineExceeded, InvalidArgument, Unavailable
from services.tide.client import TideCache, TideClient, calibration_key, domain_error, session_key
from services.tide.state import Change, Version


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, details="test")


class FakeStub:
    """Answers Put with the given errors first, then an applied WriteResponse; records every request."""

    def __init__(self, failures: list[grpc.StatusCode]) -> None:
        self.failures = list(failures)
        self.requests: list[tide_pb2.PutRequest] = []
        self.Put = self._put

    async def _put(self, request: tide_pb2.PutRequest, **_: Any) -> tide_pb2.WriteResponse:
        self.requests.append(request)
        if self.failures:
            raise rpc_error(self.failures.pop(0))
        version = tide_pb2.Version(partition=1, offset=41)
        return tide_pb2.WriteResponse(
            outcome=tide_pb2.OUTCOME_APPLIED,
            version=version,
            key_version=version,
            applied=tide_pb2.AppliedOffset(partition=1, offset=45),
            command_id=request.command_id,
        )


def client_with(stub: FakeStub, attempts: int = 3) -> TideClient:
    client = TideClient("127.0.0.1:1", attempts=attempts, backoff_s=0.0)
    client._stub = stub  # type: ignore[assignment]
    return client


async def test_a_write_is_retried_with_the_same_command_id_and_remembers_versions() -> None:
    stub = FakeStub([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
    result = await client_with(stub).put("k", b"v")
    assert result.applied and result.version == Version(1, 41)
    ids = {r.command_id for r in stub.requests}
    assert len(stub.requests) == 3 and len(ids) == 1 and ids != {""}
    client = client_with(FakeStub([]))
    await client.put("k", b"v")
    assert client.versions == [Version(1, 44)]  # the replica had applied up to offset 44


async def test_retries_are_bounded_and_other_errors_are_not_retried() -> None:
    stub = FakeStub([grpc.StatusCode.UNAVAILABLE] * 5)
    with pytest.raises(Unavailable) as gave_up:
        await client_with(stub, attempts=2).put("k", b"v")
    assert len(stub.requests) == 2 and isinstance(gave_up.value.__cause__, grpc.aio.AioRpcError)
    stub = FakeStub([grpc.StatusCode.INVALID_ARGUMENT])
    with pytest.raises(InvalidArgument):
        await client_with(stub).put("k", b"v")
    assert len(stub.requests) == 1


def test_status_codes_map_to_domain_errors() -> None:
    assert isinstance(domain_error(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED)), DeadlineExceeded)
    other = domain_error(rpc_error(grpc.StatusCode.PERMISSION_DENIED))
    assert type(other) is ClisonixError and "PERMISSION_DENIED" in str(other)


def test_helper_keys_follow_the_layout_and_refuse_slashes() -> None:
    assert session_key("ps-1") == "sessions/ps-1"
    assert calibration_key("ps-2", "EEG") == "calibration/ps-2/EEG"
    with pytest.raises(InvalidArgument):
        calibration_key("ps-2/x", "EEG")
    with pytest.raises(InvalidArgument):
        session_key("")


async def test_cache_applies_each_position_once_and_wakes_waiters() -> None:
    seen: list[Change] = []
    cache = TideCache(TideClient("127.0.0.1:1"), "p/", on_change=seen.append)
    cache._cursor = {0: 5}

    def change(key: str, offset: int, deleted: bool = False) -> tide_pb2.Change:
        return tide_pb2.Change(
            key=key,
            deleted=deleted,
            value=b"" if deleted else b"x",
            version=tide_pb2.Version(partition=0, offset=offset),
        )

    await cache._apply(change("p/old", 4))  # before the cursor: already applied
    await cache._apply(change("p/a", 5))
    await cache._apply(change("p/a", 5))  # a replay of the same position
    await cache._apply(change("p/b", 7))
    await cache._apply(change("p/a", 8, deleted=True))
    assert [(c.key, c.version.offset) for c in seen] == [("p/a", 5), ("p/b", 7), ("p/a", 8)]
    assert [k for k, _ in cache.items()] == ["p/b"] and cache.get("p/a") is None
    await cache.wait_for_version(Version(0, 8), timeout_s=0.1)
    with pytest.raises(DeadlineExceeded):
        await cache.wait_for_version(Version(0, 9), timeout_s=0.05)
    await cache.close()
