"""Commands survive the trip through clisonix.tide.v1.Command unchanged."""

from __future__ import annotations

import pytest

from clisonix.tide.v1 import tide_pb2
from services.common.errors import InvalidArgument
from services.tide.codec import command_from_proto, command_to_proto
from services.tide.state import Cas, Command, Delete, DigestReport, Put, Version


@pytest.mark.parametrize(
    "command",
    [
        Command("c1", "k", Put(b"\x00v", "application/octet-stream")),
        Command("c2", "k", Cas(b"v", "text/plain", expected=Version(2, 7))),
        Command("c3", "k", Cas(b"", expect_absent=True)),
        Command("c4", "k", Delete()),
        Command("c5", "", DigestReport("tide-0", 42, "ab" * 32)),
    ],
)
def test_command_round_trip(command: Command):
    wire = command_to_proto(command).SerializeToString()
    assert command_from_proto(tide_pb2.Command.FromString(wire)) == command


def test_a_command_without_an_operation_is_invalid():
    with pytest.raises(InvalidArgument):
        command_from_proto(tide_pb2.Command(command_id="c", key="k"))
