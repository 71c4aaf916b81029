"""Re-seeding a command log that lost records from a replica's snapshot (clisonix tide-reseed)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka.partitioner import murmur2

from clisonix.tide.v1 import tide_pb2
from services.common.errors import FailedPrecondition
from services.tide import snapshots
from services.tide.admin import reseed
from services.tide.state import Command, Delete, Put, TideState
from tests.helpers import wait_for

pytestmark = pytest.mark.integration


def far_ahead_snapshot(path: Path, topic: str) -> TideState:
    """A snapshot that applied far more than the fresh log holds (as after the broker restarted empty)."""
    state = TideState()
    offsets = {0: 30, 1: 50, 2: 70}

    def apply(command: Command) -> None:
        partition = (murmur2(command.key.encode()) & 0x7FFFFFFF) % 3  # where the replicas put the key
        offsets[partition] += 1
        state.apply(partition, offsets[partition], command)

    for i in range(12):
        apply(Command(f"c{i}", f"k/{i % 5}", Put(f"v{i}".encode(), "text/plain")))
    apply(Command("gone", "k/4", Delete()))
    snapshots.save(state, path, topic)
    return state


async def test_reseed_restores_the_snapshot_keys_and_a_second_run_changes_nothing(
    tide_settings, tide_replica, tmp_path: Path
) -> None:
    snapshot = tmp_path / "tide.sqlite"
    settings = tide_settings()
    expected = {e.key: (e.value, e.content_type) for e in far_ahead_snapshot(snapshot, settings.topic_log).list()}
    assert sorted(expected) == ["k/0", "k/1", "k/2", "k/3"]

    progress: list[tuple[int, int]] = []
    report = await reseed(settings, snapshot, progress=lambda done, total: progress.append((done, total)))
    assert report.keys == 4 and progress[-1] == (4, 4)
    assert not any(report.log_reached.values())

    # A replica replaying the re-seeded log from its start (no snapshot) holds the snapshot's keys and values.
    service, stub = await tide_replica()
    assert service.replica is not None
    registry = service.runtime.metrics.registry

    def commands(outcome: str) -> float | None:
        return registry.get_sample_value("clisonix_tide_commands_total", {"outcome": outcome})

    # A Get without a minimum version answers from what the replica has applied: wait for the four records.
    await wait_for(lambda: commands("applied") == 4)
    found = {}
    for key in expected:
        reply = await stub.Get(tide_pb2.GetRequest(key=key))
        found[key] = (reply.entry.value, reply.entry.content_type)
    assert found == expected
    before = await stub.Digest(tide_pb2.DigestRequest())

    # The same re-seed again appends the same command ids: every replica skips them as duplicates.
    again = await reseed(settings, snapshot)
    assert again.keys == 4
    await wait_for(lambda: commands("duplicate") == 4)
    after = await stub.Digest(tide_pb2.DigestRequest())
    assert [p.sha256 for p in after.partitions] != [] and [p.keys for p in after.partitions] == [
        p.keys for p in before.partitions
    ]
    for key, (value, _) in expected.items():
        assert (await stub.Get(tide_pb2.GetRequest(key=key))).entry.value == value
    assert commands("applied") == 4


async def test_reseed_refuses_a_log_that_still_holds_the_snapshot(tide_settings, tide_replica, tmp_path: Path) -> None:
    snapshot = tmp_path / "tide.sqlite"
    service, stub = await tide_replica(snapshot_path=snapshot)
    for i in range(6):
        await stub.Put(tide_pb2.PutRequest(key=f"k/{i}", value=b"v"))
    assert service.replica is not None
    service.replica.save_snapshot()
    with pytest.raises(FailedPrecondition, match="nothing to re-seed"):
        await reseed(service.settings, snapshot)

    # The command line says so too, with settings from the environment.
    env = {
        **os.environ,
        "CLISONIX_KAFKA_BOOTSTRAP_SERVERS": service.settings.kafka_bootstrap_servers,
        "CLISONIX_TOPIC_LOG": service.settings.topic_log,
        "CLISONIX_KAFKA_TOPIC_PARTITIONS": "3",
    }
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.cli", "tide-reseed", "--snapshot", str(snapshot)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    said = " ".join(result.stdout.split())
    assert "not re-seeded" in said and "nothing to re-seed" in said
