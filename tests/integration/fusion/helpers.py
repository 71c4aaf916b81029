"""Streaming recordings through ingest and fusion, and reading the fused windows back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from clisonix.fusion.v1 import fusion_pb2
from services.common.chunks import SampleBlock
from services.ingest.client import StreamClient
from tests.helpers import read_all


async def stream_blocks(ingest_port: int, session: str, blocks: Iterable[SampleBlock]) -> str:
    """Streams blocks through ingest as fast as it takes them; returns the pseudonymised session id."""
    progress = await StreamClient(f"127.0.0.1:{ingest_port}", session, speed=None).run(iter(blocks))
    assert progress.rejected == 0
    assert progress.last_session_id
    return progress.last_session_id


async def fused_windows(
    bootstrap_servers: str, topic: str, session: str, until_end_s: float, timeout_s: float = 120.0
) -> list[fusion_pb2.FusedWindow]:
    """The session's fused windows, read until one ends at or after `until_end_s` (the idle flush emits the last
    ones), de-duplicated by window id and sorted by start."""
    deadline = time.monotonic() + timeout_s
    while True:
        windows: dict[str, fusion_pb2.FusedWindow] = {}
        for record in await read_all(bootstrap_servers, topic):
            if record.key == session.encode():
                window = fusion_pb2.FusedWindow()
                window.ParseFromString(record.value)
                windows[window.window_id] = window
        if windows and max(w.end_s for w in windows.values()) >= until_end_s:
            return sorted(windows.values(), key=lambda w: w.start_s)
        if time.monotonic() > deadline:
            latest = max((w.end_s for w in windows.values()), default=None)
            raise AssertionError(f"{len(windows)} windows, the latest ending at {latest}; wanted {until_end_s}")
        await asyncio.sleep(0.5)
