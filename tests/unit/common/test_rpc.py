"""The common grpc.aio server: error mapping, bearer tokens, health, reflection, TLS and mTLS, for real on loopback."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from clisonix.signal.v1 import signal_pb2, signal_pb2_grpc
from services.common.errors import (
    AlreadyExists,
    ClisonixError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from services.common.rpc import GrpcServer, status_code
from services.common.settings import ServiceSettings

SERVICE = "clisonix.signal.v1.IngestService"
APPEND = f"/{SERVICE}/Append"
TOKEN = "s3cret-token"
TIMEOUT = 10.0

ERRORS: dict[str, tuple[type[ClisonixError], grpc.StatusCode]] = {
    "invalid": (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    "notfound": (NotFound, grpc.StatusCode.NOT_FOUND),
    "exhausted": (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    "exists": (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    "precondition": (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    "unauthenticated": (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    "unavailable": (Unavailable, grpc.StatusCode.UNAVAILABLE),
    "deadline": (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    "base": (ClisonixError, grpc.StatusCode.INTERNAL),
}


def raise_for(stream_id: str) -> None:
    if stream_id in ERRORS:
        raise ERRORS[stream_id][0](f"fake {stream_id} error", reason=stream_id)
    if stream_id == "crash":
        raise RuntimeError("not a domain error")


class FakeIngest(signal_pb2_grpc.IngestServiceServicer):
    """Append answers or raises by stream_id; Stream acks each chunk until one names an error."""

    def __init__(self) -> None:
        self.calls = 0

    async def Append(self, request: signal_pb2.SignalChunk, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        self.calls += 1
        raise_for(request.stream_id)
        return signal_pb2.IngestAck(stream_id=request.stream_id, sequence=request.sequence)

    async def Stream(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        self.calls += 1
        async for request in request_iterator:
            raise_for(request.stream_id)
            yield signal_pb2.IngestAck(stream_id=request.stream_id, sequence=request.sequence)


@dataclass
class Running:
    server: GrpcServer
    servicer: FakeIngest
    target: str = field(init=False)

    def __post_init__(self) -> None:
        self.target = f"127.0.0.1:{self.server.port}"


StartServer = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    started: list[GrpcServer] = []

    async def start(auth_methods: Any = None, **overrides: Any) -> Running:
        settings = ServiceSettings(grpc_host="127.0.0.1", grpc_port=0, **overrides)
        servicer = FakeIngest()
        server = GrpcServer(
            settings,
            [SERVICE],
            lambda s: signal_pb2_grpc.add_IngestServiceServicer_to_server(servicer, s),
            auth_methods=auth_methods,
        )
        await server.start()
        started.append(server)
        assert server.port > 0
        return Running(server, servicer)

    yield start
    for server in started:
        await server.stop(0)


async def stream_calls(
    stub: signal_pb2_grpc.IngestServiceStub, stream_ids: list[str], metadata: Any = ()
) -> tuple[list[signal_pb2.IngestAck], grpc.aio.AioRpcError | None]:
    async def requests() -> AsyncIterator[signal_pb2.SignalChunk]:
        for sequence, stream_id in enumerate(stream_ids):
            yield signal_pb2.SignalChunk(stream_id=stream_id, sequence=sequence)

    acks: list[signal_pb2.IngestAck] = []
    try:
        async for ack in stub.Stream(requests(), metadata=metadata, timeout=TIMEOUT):
            acks.append(ack)
    except grpc.aio.AioRpcError as exc:
        return acks, exc
    return acks, None


def test_status_code_of_every_domain_error() -> None:
    for error_type, code in ERRORS.values():
        assert status_code(error_type("x")) == code


# --- error mapping --------------------------------------------------------------------------------------------


async def test_unary_domain_errors_map_to_status_codes(start_server: StartServer) -> None:
    running = await start_server()
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = signal_pb2_grpc.IngestServiceStub(channel)
        ok = await stub.Append(signal_pb2.SignalChunk(stream_id="fine", sequence=4), timeout=TIMEOUT)
        assert (ok.stream_id, ok.sequence) == ("fine", 4)
        for stream_id, (_, code) in ERRORS.items():
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Append(signal_pb2.SignalChunk(stream_id=stream_id), timeout=TIMEOUT)
            assert info.value.code() == code, stream_id
            assert info.value.details() == f"fake {stream_id} error"
        # Anything that is not a domain error stays UNKNOWN, without leaking its message.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Append(signal_pb2.SignalChunk(stream_id="crash"), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.UNKNOWN


@pytest.mark.parametrize("stream_id", ["invalid", "notfound", "exhausted"])
async def test_streaming_domain_errors_map_to_status_codes(start_server: StartServer, stream_id: str) -> None:
    running = await start_server()
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = signal_pb2_grpc.IngestServiceStub(channel)
        acks, error = await stream_calls(stub, ["a", "b", stream_id, "never"])
    assert [ack.stream_id for ack in acks] == ["a", "b"]
    assert error is not None
    assert error.code() == ERRORS[stream_id][1]
    assert error.details() == f"fake {stream_id} error"


async def test_streaming_without_error_completes(start_server: StartServer) -> None:
    running = await start_server()
    async with grpc.aio.insecure_channel(running.target) as channel:
        acks, error = await stream_calls(signal_pb2_grpc.IngestServiceStub(channel), ["a", "b", "c"])
    assert error is None
    assert [(a.stream_id, a.sequence) for a in acks] == [("a", 0), ("b", 1), ("c", 2)]


async def test_unknown_method_is_unimplemented(start_server: StartServer) -> None:
    running = await start_server()
    async with grpc.aio.insecure_channel(running.target) as channel:
        call = channel.unary_unary(f"/{SERVICE}/Nope")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(b"", timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


# --- bearer token ---------------------------------------------------------------------------------------------


async def test_bearer_token_required(start_server: StartServer) -> None:
    running = await start_server(auth_token=TOKEN)
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = signal_pb2_grpc.IngestServiceStub(channel)
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Append(signal_pb2.SignalChunk(stream_id="fine"), metadata=metadata, timeout=TIMEOUT)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            acks, error = await stream_calls(stub, ["a"], metadata=metadata)
            assert acks == []
            assert error is not None and error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert running.servicer.calls == 0  # denied before the servicer ran

        good = (("authorization", f"Bearer {TOKEN}"),)
        ack = await stub.Append(signal_pb2.SignalChunk(stream_id="fine"), metadata=good, timeout=TIMEOUT)
        assert ack.stream_id == "fine"
        acks, error = await stream_calls(stub, ["a", "b"], metadata=good)
        assert error is None and len(acks) == 2
        # Authenticated calls still get their domain errors mapped.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Append(signal_pb2.SignalChunk(stream_id="notfound"), metadata=good, timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_bearer_token_only_on_listed_methods(start_server: StartServer) -> None:
    running = await start_server(auth_token=TOKEN, auth_methods=[APPEND])
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = signal_pb2_grpc.IngestServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Append(signal_pb2.SignalChunk(stream_id="fine"), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        acks, error = await stream_calls(stub, ["a"])
        assert error is None and len(acks) == 1


async def list_services(channel: grpc.aio.Channel, metadata: Any = ()) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names: set[str] = set()
    async for response in stub.ServerReflectionInfo(requests(), metadata=metadata, timeout=TIMEOUT):
        names.update(s.name for s in response.list_services_response.service)
    return names


async def test_health_and_reflection_need_no_token(start_server: StartServer) -> None:
    running = await start_server(auth_token=TOKEN)
    async with grpc.aio.insecure_channel(running.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        names = await list_services(channel)
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


async def test_health_flips_to_not_serving(start_server: StartServer) -> None:
    running = await start_server()
    async with grpc.aio.insecure_channel(running.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        await running.server.set_serving(False)
        for service in ("", SERVICE):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await running.server.set_serving(True)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_bind_failure_raises() -> None:
    # A port held by a plain listening socket (no SO_REUSEPORT) cannot be bound by gRPC.
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        settings = ServiceSettings(grpc_host="127.0.0.1", grpc_port=held.getsockname()[1])
        with pytest.raises(OSError, match="could not bind"):
            GrpcServer(settings, [SERVICE], lambda s: None)


# --- TLS ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate for IP 127.0.0.1 and a client certificate, all signed by the CA."""
    d = tmp_path_factory.mktemp("pki")
    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=clisonix test CA", cwd=d,
    )  # fmt: skip
    for name, extensions in (
        ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        (d / f"{name}.ext").write_text(extensions)
        openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN=clisonix test {name}", cwd=d,
        )  # fmt: skip
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d,
        )  # fmt: skip
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key")


async def append_over(channel: grpc.aio.Channel, deadline_s: float = TIMEOUT) -> signal_pb2.IngestAck:
    stub = signal_pb2_grpc.IngestServiceStub(channel)
    return await stub.Append(signal_pb2.SignalChunk(stream_id="fine", sequence=1), timeout=deadline_s)


async def test_tls(start_server: StartServer, pki: Pki) -> None:
    running = await start_server(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key)
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    async with grpc.aio.secure_channel(running.target, credentials) as channel:
        assert (await append_over(channel)).stream_id == "fine"
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    async with grpc.aio.insecure_channel(running.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await append_over(channel, deadline_s=5)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    # A client that does not trust the server's CA is refused too.
    other = grpc.ssl_channel_credentials(root_certificates=pki.client_cert.read_bytes())
    async with grpc.aio.secure_channel(running.target, other) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await append_over(channel, deadline_s=5)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


async def test_mtls(start_server: StartServer, pki: Pki) -> None:
    running = await start_server(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tls_client_ca_file=pki.ca)
    without_cert = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    async with grpc.aio.secure_channel(running.target, without_cert) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await append_over(channel, deadline_s=5)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert running.servicer.calls == 0
    with_cert = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=pki.client_key.read_bytes(),
        certificate_chain=pki.client_cert.read_bytes(),
    )
    async with grpc.aio.secure_channel(running.target, with_cert) as channel:
        assert (await append_over(channel)).stream_id == "fine"
    assert running.servicer.calls == 1


async def test_mtls_with_token(start_server: StartServer, pki: Pki) -> None:
    running = await start_server(
        tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tls_client_ca_file=pki.ca, auth_token=TOKEN
    )
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=pki.client_key.read_bytes(),
        certificate_chain=pki.client_cert.read_bytes(),
    )
    async with grpc.aio.secure_channel(running.target, credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await append_over(channel)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stub = signal_pb2_grpc.IngestServiceStub(channel)
        ack = await stub.Append(
            signal_pb2.SignalChunk(stream_id="fine"), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=TIMEOUT
        )
        assert ack.stream_id == "fine"
