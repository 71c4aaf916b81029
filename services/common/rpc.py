"""The grpc.aio server every service runs: health (the library's servicer), reflection, one interceptor
mapping domain errors to status codes, optional bearer-token auth, optional TLS / mTLS.
"""

from __future__ import annotations

import hmac
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.errors import ClisonixError
from services.common.settings import ServiceSettings

log = logging.getLogger(__name__)

# Probes and tools reach these without a token, as Kubernetes gRPC probes cannot send one.
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def status_code(error: ClisonixError) -> grpc.StatusCode:
    """The gRPC status code for a domain error."""
    return getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)


def _wrap_handler(
    handler: grpc.RpcMethodHandler,
    wrap_unary: Callable[[Callable[..., Any]], Callable[..., Any]],
    wrap_streaming: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` whose behaviour is wrapped."""
    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary), **codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap_unary(handler.stream_unary), **codec)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap_streaming(handler.unary_stream), **codec)
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(wrap_streaming(handler.stream_stream), **codec)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps ClisonixError raised by any servicer to its status code, in one place instead of per RPC."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None

        def wrap_unary(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await behaviour(request, context)
                except ClisonixError as exc:
                    await context.abort(status_code(exc), str(exc))

            return call

        def wrap_streaming(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    result = behaviour(request, context)
                    if inspect.isasyncgen(result):
                        async for response in result:
                            yield response
                    else:
                        await result  # a servicer writing through context.write
                except ClisonixError as exc:
                    await context.abort(status_code(exc), str(exc))

            return call

        return _wrap_handler(handler, wrap_unary, wrap_streaming)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <token>` with UNAUTHENTICATED (health and reflection exempt).

    methods: full method names ("/pkg.Service/Method") to guard; None guards every non-exempt method.
    """

    def __init__(self, token: str, methods: Iterable[str] | None = None) -> None:
        self.expected = f"Bearer {token}".encode()
        self.methods = frozenset(methods) if methods is not None else None

    def _guarded(self, method: str) -> bool:
        if method.startswith(UNAUTHENTICATED_PREFIXES):
            return False
        return self.methods is None or method in self.methods

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or not self._guarded(handler_call_details.method):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        presented = metadata.get("authorization", "")
        presented_bytes = presented.encode() if isinstance(presented, str) else bytes(presented)
        if hmac.compare_digest(presented_bytes, self.expected):
            return handler

        def deny_unary(_: Callable[..., Any]) -> Callable[..., Any]:
            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

            return call

        def deny_streaming(_: Callable[..., Any]) -> Callable[..., Any]:
            async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
                yield  # pragma: no cover - makes this an async generator

            return call

        return _wrap_handler(handler, deny_unary, deny_streaming)


def server_credentials(settings: ServiceSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' cert paths; with a client CA, clients must present a certificate."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    pair = (settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())
    if settings.tls_client_ca_file is not None:
        return grpc.ssl_server_credentials(
            [pair], root_certificates=settings.tls_client_ca_file.read_bytes(), require_client_auth=True
        )
    return grpc.ssl_server_credentials([pair])


class GrpcServer:
    """A grpc.aio server with health, reflection and the common interceptors, bound from settings.

    service_names: full names of the servicers registered by `register` (for health and reflection).
    auth_methods: full method names that need the bearer token when settings.auth_token is set
    (None: every method but health and reflection).
    """

    def __init__(
        self,
        settings: ServiceSettings,
        service_names: Sequence[str],
        register: Callable[[grpc.aio.Server], None],
        auth_methods: Iterable[str] | None = None,
    ) -> None:
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if settings.auth_token is not None:
            interceptors.append(BearerTokenInterceptor(settings.auth_token.get_secret_value(), auth_methods))
        interceptors.append(ErrorInterceptor())
        limit = settings.grpc_max_message_bytes
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
        )
        register(self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = list(service_names)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        address = f"{settings.grpc_host}:{settings.grpc_port}"
        credentials = server_credentials(settings)
        try:
            if credentials is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, credentials)
        except RuntimeError as exc:  # grpcio raises RuntimeError, not a 0 port, when the bind fails
            raise OSError(f"could not bind gRPC server to {address}") from exc
        if self.port == 0:
            raise OSError(f"could not bind gRPC server to {address}")

    async def start(self) -> None:
        """Starts serving; health says SERVING for the server and every registered service."""
        await self.server.start()
        await self.set_serving(True)
        log.info("grpc server started", extra={"fields": {"port": self.port}})

    async def set_serving(self, serving: bool) -> None:
        """Health SERVING or NOT_SERVING for the server ("") and every registered service."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        """Refuses new calls and lets running ones finish for up to `grace_s` seconds."""
        await self.set_serving(False)
        await self.server.stop(grace_s)
