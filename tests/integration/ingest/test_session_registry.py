"""Ingest records each session's streams in Tide (sessions/<session pseudonym>): layouts and the subject's
pseudonym, merged across ingest replicas, never a raw id."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from clisonix.signal.v1 import signal_pb2
from services.common.chunks import StreamSpec
from services.tide.client import TideClient, get_session, session_key
from tests.helpers import ECG, EEG, make_chunk

pytestmark = pytest.mark.integration

PPG = StreamSpec("ppg-0", signal_pb2.MODALITY_PPG, ("green",), ("a.u.",), 64.0)


async def test_two_ingest_replicas_register_every_stream_of_a_session(ingest_service, tide_replica) -> None:
    replica, _ = await tide_replica()
    target = f"127.0.0.1:{replica.grpc_port}"
    first = await ingest_service(tide_targets=target)
    second = await ingest_service(tide_targets=target)
    acks = []
    for service, spec in ((first, EEG), (second, ECG), (first, PPG)):
        for sequence in range(3):
            chunk = make_chunk(sequence, spec, session="session-reg", subject="patient-0042")
            acks.append(await service.pipeline.submit(chunk))
    session = (await acks[0]).session_id
    assert session.startswith("ps-")

    async with TideClient(target) as client:
        deadline = time.monotonic() + 20
        while (record := await get_session(client, session)) is None or len(record.streams) < 3:
            assert time.monotonic() < deadline, f"streams registered: {record}"
            await asyncio.sleep(0.05)
        entry = await client.get(session_key(session))
    assert record is not None and entry is not None
    assert [s["stream_id"] for s in record.streams] == ["ecg-0", "eeg-0", "ppg-0"]
    eeg = record.streams[1]
    assert eeg["modality"] == "eeg" and eeg["nominal_rate_hz"] == 250.0
    assert eeg["channel_names"] == ["C3", "C4"] and eeg["channel_units"] == ["uV", "uV"]
    assert record.subject.startswith("ps-")
    # Pseudonyms only: the raw session and subject ids appear nowhere in the stored record.
    raw = entry.value.decode()
    assert "patient-0042" not in raw and "session-reg" not in raw
    assert json.loads(raw)["subject"] == record.subject
    # Every stream is registered once: later chunks of known streams write nothing more.
    assert first.sessions is not None and first.sessions.registered(session, "eeg-0")
    version = entry.version
    await (await first.pipeline.submit(make_chunk(3, EEG, session="session-reg", subject="patient-0042")))
    async with TideClient(target) as client:
        assert (await client.get(session_key(session))).version == version


async def test_ingest_keeps_acknowledging_while_tide_is_down(ingest_service) -> None:
    # Nothing listens on this port: registry writes fail and are retried; chunks are still written and acked.
    service = await ingest_service(tide_targets="127.0.0.1:9")
    for sequence in range(3):
        ack = await (await service.pipeline.submit(make_chunk(sequence, EEG, session="s-down")))
        assert ack.status == signal_pb2.ACK_STATUS_ACCEPTED
    assert service.sessions is not None and not service.sessions.registered(ack.session_id, "eeg-0")
