"""Commands and results between the domain (services.tide.state) and clisonix.tide.v1 messages."""

from __future__ import annotations

from clisonix.tide.v1 import tide_pb2
from services.common.errors import InvalidArgument
from services.tide.state import Cas, Change, Command, Delete, DigestReport, Entry, Op, Put, Version


def version_to_proto(version: Version | None) -> tide_pb2.Version | None:
    return None if version is None else tide_pb2.Version(partition=version.partition, offset=version.offset)


def version_from_proto(message: tide_pb2.Version) -> Version:
    """A version from a request or command; InvalidArgument when it cannot be a log position."""
    if message.partition < 0 or message.offset < 0:
        raise InvalidArgument(
            f"malformed version ({message.partition}, {message.offset}): partition and offset are >= 0",
            reason="bad_version",
        )
    return Version(message.partition, message.offset)


def command_to_proto(command: Command) -> tide_pb2.Command:
    message = tide_pb2.Command(command_id=command.command_id, key=command.key)
    op = command.op
    if isinstance(op, Put):
        message.put.value, message.put.content_type = op.value, op.content_type
    elif isinstance(op, Cas):
        message.cas.value, message.cas.content_type = op.value, op.content_type
        message.cas.expect_absent = op.expect_absent
        if op.expected is not None:
            message.cas.expected.CopyFrom(tide_pb2.Version(partition=op.expected.partition, offset=op.expected.offset))
    elif isinstance(op, DigestReport):
        report = message.digest_report
        report.replica, report.applied, report.sha256 = op.replica, op.applied, op.sha256
    else:
        message.delete.SetInParent()
    return message


def command_from_proto(message: tide_pb2.Command) -> Command:
    """The domain command; raises InvalidArgument when no operation is set."""
    kind = message.WhichOneof("op")
    op: Op
    if kind == "put":
        op = Put(message.put.value, message.put.content_type)
    elif kind == "cas":
        cas = message.cas
        expected = version_from_proto(cas.expected) if cas.HasField("expected") else None
        op = Cas(cas.value, cas.content_type, expected=expected, expect_absent=cas.expect_absent)
    elif kind == "delete":
        op = Delete()
    elif kind == "digest_report":
        report = message.digest_report
        op = DigestReport(report.replica, report.applied, report.sha256)
    else:
        raise InvalidArgument("command has no operation", reason="no_operation")
    return Command(message.command_id, message.key, op)


def entry_to_proto(entry: Entry) -> tide_pb2.Entry:
    return tide_pb2.Entry(
        key=entry.key, value=entry.value, content_type=entry.content_type, version=version_to_proto(entry.version)
    )


def change_to_proto(change: Change) -> tide_pb2.Change:
    return tide_pb2.Change(
        key=change.key,
        outcome=tide_pb2.OUTCOME_APPLIED,
        deleted=change.deleted,
        value=change.value,
        content_type=change.content_type,
        version=version_to_proto(change.version),
    )
