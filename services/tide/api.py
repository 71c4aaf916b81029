"""TideService servicer: proto in, replica call, proto out; nothing else (errors map in the interceptor)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import grpc

from clisonix.tide.v1 import tide_pb2, tide_pb2_grpc
from services.common.errors import InvalidArgument, Unavailable
from services.tide.codec import (
    change_to_proto,
    command_from_proto,
    entry_to_proto,
    version_from_proto,
    version_to_proto,
)
from services.tide.replica import Replica, new_command_id
from services.tide.state import Cas, Command, Delete, DigestReport, Op, Put, Result, Version

SERVICE_NAME = tide_pb2.DESCRIPTOR.services_by_name["TideService"].full_name


class TideServicer(tide_pb2_grpc.TideServiceServicer):
    """Serves one replica's state."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica

    def _applied(self, partition: int) -> tide_pb2.AppliedOffset:
        return tide_pb2.AppliedOffset(partition=partition, offset=self.replica.state.applied(partition))

    async def _write(self, key: str, command_id: str, op: Op) -> tide_pb2.WriteResponse:
        if not self.replica.ready.is_set():
            raise Unavailable("replica not ready", reason="not_ready")
        command = Command(command_id or new_command_id(), key, op)
        return self._response(command, await self.replica.write(command))

    def _response(self, command: Command, result: Result) -> tide_pb2.WriteResponse:
        return tide_pb2.WriteResponse(
            outcome=int(result.outcome),  # type: ignore[arg-type]
            version=version_to_proto(result.version),
            key_version=version_to_proto(result.key_version),
            applied=self._applied(result.version.partition),
            command_id=command.command_id,
        )

    async def Put(self, request: tide_pb2.PutRequest, context: grpc.aio.ServicerContext) -> tide_pb2.WriteResponse:
        return await self._write(request.key, request.command_id, Put(request.value, request.content_type))

    async def CompareAndSet(
        self, request: tide_pb2.CompareAndSetRequest, context: grpc.aio.ServicerContext
    ) -> tide_pb2.WriteResponse:
        expected = version_from_proto(request.expected) if request.HasField("expected") else None
        op = Cas(request.value, request.content_type, expected=expected, expect_absent=request.expect_absent)
        return await self._write(request.key, request.command_id, op)

    async def Delete(
        self, request: tide_pb2.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> tide_pb2.WriteResponse:
        return await self._write(request.key, request.command_id, Delete())

    async def Get(self, request: tide_pb2.GetRequest, context: grpc.aio.ServicerContext) -> tide_pb2.GetResponse:
        if not request.key:
            raise InvalidArgument("key is empty", reason="empty_key")
        self.replica.ensure_serving()
        partition = self.replica.partition_for(request.key)
        if request.HasField("min_version"):
            await self.replica.wait_applied([version_from_proto(request.min_version)])
        entry = self.replica.state.get(request.key, partition)
        if entry is None:
            return tide_pb2.GetResponse(outcome=tide_pb2.OUTCOME_NOT_FOUND, applied=self._applied(partition))
        return tide_pb2.GetResponse(
            outcome=tide_pb2.OUTCOME_APPLIED, entry=entry_to_proto(entry), applied=self._applied(partition)
        )

    async def List(self, request: tide_pb2.ListRequest, context: grpc.aio.ServicerContext) -> tide_pb2.ListResponse:
        if not self.replica.ready.is_set():
            raise Unavailable("replica not ready", reason="not_ready")
        self.replica.ensure_serving()
        await self.replica.wait_applied([version_from_proto(v) for v in request.min_versions])
        entries = self.replica.state.list(request.prefix)
        return tide_pb2.ListResponse(
            entries=[entry_to_proto(e) for e in entries],
            applied=[self._applied(p) for p in self.replica.partitions],
        )

    async def Watch(
        self, request: tide_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tide_pb2.Change]:
        if not self.replica.ready.is_set():
            raise Unavailable("replica not ready", reason="not_ready")
        self.replica.ensure_serving()
        starts = [Version(v.partition, v.offset) for v in request.from_versions]
        async for batch in self.replica.watch(request.prefix, starts):
            for change in batch:
                yield change_to_proto(change)

    async def WatchBatches(
        self, request: tide_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tide_pb2.ChangeBatch]:
        if not self.replica.ready.is_set():
            raise Unavailable("replica not ready", reason="not_ready")
        self.replica.ensure_serving()
        starts = [Version(v.partition, v.offset) for v in request.from_versions]
        async for batch in self.replica.watch(request.prefix, starts):
            yield tide_pb2.ChangeBatch(changes=[change_to_proto(change) for change in batch])

    async def BatchWrite(
        self, request: tide_pb2.BatchWriteRequest, context: grpc.aio.ServicerContext
    ) -> tide_pb2.BatchWriteResponse:
        if not self.replica.ready.is_set():
            raise Unavailable("replica not ready", reason="not_ready")
        if not request.commands:
            raise InvalidArgument("a batch needs at least one command", reason="empty_batch")
        commands = []
        for index, message in enumerate(request.commands):
            try:
                command = command_from_proto(message)
            except InvalidArgument as exc:
                raise InvalidArgument(f"command {index}: {exc}", reason=exc.reason) from exc
            if isinstance(command.op, DigestReport):
                raise InvalidArgument(f"command {index}: digest reports are written by replicas", reason="bad_op")
            commands.append(Command(command.command_id or new_command_id(), command.key, command.op))
        results = await self.replica.write_many(commands)
        return tide_pb2.BatchWriteResponse(
            results=[self._response(command, result) for command, result in zip(commands, results, strict=True)]
        )

    async def Digest(
        self, request: tide_pb2.DigestRequest, context: grpc.aio.ServicerContext
    ) -> tide_pb2.DigestResponse:
        replica = self.replica
        state = replica.state
        wanted = {a.partition: a.offset for a in request.at}
        if len(wanted) < len(request.at):
            raise InvalidArgument("at most one offset per partition", reason="bad_partition")
        if wanted:
            await replica.wait_applied([Version(p, offset - 1) for p, offset in wanted.items() if offset > 0])
        partitions = []
        for p, (applied, digest) in state.digests().items():
            if p in wanted:
                applied, found = wanted[p], state.partitions[p].digest_at(wanted[p])
                if found is None:
                    continue
                digest = found
            partitions.append(
                tide_pb2.PartitionDigest(
                    partition=p,
                    applied=tide_pb2.AppliedOffset(partition=p, offset=applied),
                    sha256=digest,
                    keys=len(state.partitions[p].entries),
                )
            )
        now = time.monotonic()
        peers = [
            tide_pb2.PeerCheck(
                replica=c.peer, partition=c.partition, offset=c.offset, agrees=c.agrees, age_seconds=now - c.at
            )
            for c in replica.agreement.checks()
        ]
        return tide_pb2.DigestResponse(
            partitions=partitions, replica=replica.replica_id, peers=peers, in_minority=replica.in_minority
        )


def register(servicer: TideServicer) -> Callable[[grpc.aio.Server], None]:
    """A GrpcServer `register` callback adding `servicer`."""

    def add(server: grpc.aio.Server) -> None:
        tide_pb2_grpc.add_TideServiceServicer_to_server(servicer, server)

    return add
