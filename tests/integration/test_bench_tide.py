"""A quick smoke run of the Tide benchmark against the session broker: every leg runs and reports its figures."""

from __future__ import annotations

import asyncio
import json

import pytest

from bench import tide as tide_bench

pytestmark = pytest.mark.integration


async def test_bench_tide_reports_writes_visibility_and_catch_up(broker, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = [
        "--bootstrap-servers",
        broker.bootstrap_servers,
        "--writes",
        "200",
        "--warmup-writes",
        "20",
        "--in-flight",
        "8",
        "--keys",
        "50",
        "--json",
        str(out),
    ]
    # main() runs its own event loop (asyncio.run), so it runs in a worker thread beside the test's loop.
    code = await asyncio.wait_for(asyncio.to_thread(tide_bench.main, argv), timeout=120)
    printed = capsys.readouterr().out
    assert code == 0, printed

    results = json.loads(out.read_text())
    write = results["write"]
    assert write["writes"] == 200 and write["writes_per_second"] > 0
    assert write["latency_ms"]["max"] >= write["latency_ms"]["p99"] >= write["latency_ms"]["p50"] > 0
    # Visible on every replica no earlier than the acknowledging replica answered the median write.
    assert write["visible_all_ms"]["p99"] >= write["visible_all_ms"]["p50"] > 0
    # Every 10th write is a probe the Watch streams follow; all of them reached all three replicas.
    assert write["probes"] == 20 and write["not_visible_per_replica"] == [0, 0, 0]
    assert results["baseline"]["writes"] == 200 and results["baseline"]["writes_per_second"] > 0
    catch = results["catch_up"]
    # The fresh replica replayed warm-up and measured writes, and reached the replicas' exact state.
    # (220 writes, and the replicas' digest reports: one per partition and replica after the last write)
    assert 220 <= catch["records"] <= 220 + 3 * 3 * 8 and catch["records_per_second"] > 0
    assert catch["digests_match"] is True
    assert set(results["targets"]) == {"writes_per_second", "visible_all_p99_ms", "catch_up_records_per_second"}
    assert results["replicas"]["count"] == 3 and len(results["cpu_seconds"]["replicas"]) == 3
    assert "PASS" in printed or "BELOW TARGET" in printed
