"""The `clisonix` command end to end: real recordings streamed by `clisonix stream` through ingest into Kafka,
`clisonix up` serving on its ports, and `clisonix demo` running the main job.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clisonix.signal.v1 import signal_pb2
from services.common.chunks import SampleBlock, physical_samples
from services.common.events import decode_event
from services.ingest.sources import open_source
from services.processes import DEFAULT_PORTS
from tests.conftest import DATA, REPO
from tests.helpers import free_port_offset, read_all

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def run_cli(*args: str, timeout_s: float = 120.0) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    finally:
        if process.returncode is None:  # timed out: leave nothing running behind the test
            process.kill()
            await process.wait()
    return process.returncode, output.decode()


def by_stream(records) -> dict[str, list[signal_pb2.SignalChunk]]:
    streams: dict[str, dict[int, signal_pb2.SignalChunk]] = {}
    for record in records:
        chunk, _ = decode_event(signal_pb2.SignalChunk, record.value, record.headers)
        streams.setdefault(chunk.stream_id, {})[chunk.sequence] = chunk
    return {stream: [chunks[s] for s in sorted(chunks)] for stream, chunks in streams.items()}


def source_blocks(spec: str, **options) -> dict[str, list[SampleBlock]]:
    blocks: dict[str, list[SampleBlock]] = {}
    with open_source(spec, **options) as source:
        for block in source.blocks():
            blocks.setdefault(block.spec.stream_id, []).append(block)
    return blocks


@pytest.mark.parametrize(
    "source,options",
    [
        (f"wfdb:{DATA / 'wfdb' / 'v102s'}", {"duration_s": 20.0}),
        (f"xdf:{DATA / 'xdf' / 'clock_resets.xdf'}", {}),
    ],
    ids=["wfdb-v102s", "xdf-clock-resets"],
)
async def test_clisonix_stream_replays_a_recording_sample_for_sample(ingest_service, broker, source, options):
    service = await ingest_service()
    args = [
        "stream",
        "--source",
        source,
        "--to",
        f"127.0.0.1:{service.grpc_port}",
        "--speed",
        "0",
        "--session",
        "replay",
        "--subject",
        "subject-7",
    ]
    if "duration_s" in options:
        args += ["--duration", str(options["duration_s"])]
    code, output = await run_cli(*args)
    assert code == 0, output
    assert "done" in output and "subject-7" not in output

    expected = source_blocks(source, **options)
    written = by_stream(await read_all(broker.bootstrap_servers, service.settings.topic_raw))
    assert set(written) == set(expected) and expected
    for stream_id, blocks in expected.items():
        chunks = written[stream_id]
        assert [c.sequence for c in chunks] == list(range(len(blocks)))
        for block, chunk in zip(blocks, chunks, strict=True):
            assert chunk.first_sample_time_s == block.first_sample_time_s
            assert chunk.clock_offset_s == block.clock_offset_s
            np.testing.assert_array_equal(physical_samples(chunk), block.physical())


async def test_clisonix_stream_synthetic_multimodal(ingest_service, broker):
    service = await ingest_service()
    code, output = await run_cli(
        "stream", "--source", "synthetic", "--to", f"127.0.0.1:{service.grpc_port}", "--speed", "0", "--duration", "3"
    )
    assert code == 0, output
    written = by_stream(await read_all(broker.bootstrap_servers, service.settings.topic_raw))
    modalities = {chunks[0].modality for chunks in written.values()}
    assert {signal_pb2.MODALITY_EEG, signal_pb2.MODALITY_ECG, signal_pb2.MODALITY_PPG} <= modalities


async def test_clisonix_stream_reports_a_wrong_token(ingest_service):
    service = await ingest_service(auth_token="right-token")
    code, output = await run_cli(
        "stream",
        "--source",
        "synthetic",
        "--to",
        f"127.0.0.1:{service.grpc_port}",
        "--speed",
        "0",
        "--duration",
        "1",
        "--token",
        "wrong-token",
    )
    assert code != 0
    assert "UNAUTHENTICATED" in output


async def test_clisonix_up_serves_health_on_its_ports_and_stops_on_sigint(tmp_path):
    offset = free_port_offset()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        "up",
        "--port-offset",
        str(offset),
        "--log-dir",
        str(tmp_path),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "CLISONIX_PSEUDONYM_KEY": "a-test-key-of-enough-length"},
    )
    try:
        line = b""
        while b"Ctrl-C" not in line:
            try:
                line = await asyncio.wait_for(process.stdout.readline(), 90)
            except TimeoutError:
                logs = {p.name: p.read_text()[-2000:] for p in tmp_path.iterdir()}
                raise AssertionError(f"clisonix up was not up in time; logs: {logs}") from None
            assert line, "clisonix up exited before it was up"
        for name, (port, _) in DEFAULT_PORTS.items():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port + offset}") as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
    finally:
        process.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(process.wait(), 60)
    assert code == 0


async def test_clisonix_demo_runs_the_main_job():
    code, output = await run_cli("demo", "--duration", "20", "--speed", "40", "--port-offset", str(free_port_offset()))
    assert code == 0, output
    assert "cardio 241 chunks acked" in output  # 20 s of v102s: 80 blocks per stream, one split by a gap
    assert "0 rejected" in output
    summary = output[output.index("fused windows: ") :]
    cardio, eeg = (int(summary.split(f"{label} ")[1].split(",")[0].split(";")[0]) for label in ("cardio", "eeg"))
    assert cardio >= 17 and eeg >= 17  # 20 s of each recording in 2 s windows every 1 s
    assert "HR " in output and "band power" in output
    # Every window got a prediction: the cardio ones from the ECG (the last, flushed with what was there, may hold
    # too little of it), the EEG ones (no ECG) skipped with the reason.
    predictions = output[output.index("predictions: ") :]
    cardio_skipped = int(predictions.split(f"cardio {cardio} (")[1].split(" skipped")[0])
    assert cardio_skipped <= 1 and f"eeg {eeg} ({eeg} skipped)" in predictions
    assert "median latency" in predictions and " mJ (" in predictions
    assert "skipped: no ecg stream" in output
    # Ingest registered both sessions' streams in Tide, which the demo runs too.
    assert "cardio session registered with ecg, ppg, respiration streams" in output, output[-600:]
    assert "eeg session registered with eeg streams" in output
    # LIAM ran beside them and answered for the services' operating metrics.
    assert "liam (operating metrics each 10 s): ingest " in output


async def test_clisonix_broker_answers_kafka_and_stops_cleanly_on_sigterm():
    from services.common.broker import free_port, metadata_answers

    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        "broker",
        "--port",
        str(port),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert f"127.0.0.1:{port}".encode() in line
        assert await asyncio.to_thread(metadata_answers, "127.0.0.1", port)
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 30)
    assert code == 0
    assert not await asyncio.to_thread(metadata_answers, "127.0.0.1", port)
