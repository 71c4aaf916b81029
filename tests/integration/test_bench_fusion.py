"""A quick smoke run of the fusion benchmark against the session broker: both legs run and report figures."""

from __future__ import annotations

import asyncio
import json

import pytest

from bench import fusion as fusion_bench

pytestmark = pytest.mark.integration


async def test_bench_fusion_runs_both_legs_and_reports_percentiles(broker, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = [
        "--bootstrap-servers",
        broker.bootstrap_servers,
        "--sessions",
        "2",
        "--seconds",
        "4",
        "--warmup-seconds",
        "0",
        "--eeg-channels",
        "4",
        "--workers",
        "2",
        "--energy-source",
        "estimate",
        "--json",
        str(out),
    ]
    # main() runs its own event loop (asyncio.run), so it runs in a worker thread beside the test's loop.
    code = await asyncio.wait_for(asyncio.to_thread(fusion_bench.main, argv), timeout=120)
    printed = capsys.readouterr().out
    assert code == 0, printed

    results = json.loads(out.read_text())
    assert [run["leg"] for run in results["runs"]] == ["passthrough", "fusion"]
    passthrough, fusion = results["runs"]
    # 2 sessions x 3 streams x 16 chunks of 0.25 s, every one re-produced by the pass-through.
    assert passthrough["records_in"] == fusion["records_in"] == 2 * 3 * 16
    assert passthrough["outputs"] == passthrough["records_in"] and passthrough["unit"] == "record"
    assert fusion["outputs"] >= 2 and fusion["unit"] == "window"  # the first 2 s windows of both sessions
    for run in results["runs"]:
        assert run["latency_p99_ms"] >= run["latency_p50_ms"] > 0
        assert run["latency_max_ms"] >= run["latency_p99_ms"]
        assert run["cpu_seconds"] > 0 and run["drain_seconds"] is not None and run["keeps_up"]
        assert run["other_cpu_seconds"] is None or run["other_cpu_seconds"] >= 0
    entry = results["by_sessions"]["2"]
    assert set(entry["legs"]) == {"passthrough", "fusion"}
    assert entry["ratios"]["latency_p99"] > 0 and entry["ratios"]["cpu_seconds"] > 0
    assert entry["verdict"] in ("PASS", "BELOW TARGET")
    assert results["target_p99_ms"] == 10.0
    # Two workers in one group, each given its share of the 4 partitions before the load starts.
    assert results["workers"] == 2 and results["config"]["partitions"] == 4
    assert results["sessions_meeting_target"] in (None, 2)
    assert results["sessions_per_worker"] in (None, 1)
    assert results["energy"]["source"] == "estimate"
    assert "target p99 window emit latency <= 10 ms at 2 sessions" in printed and "estimate" in printed


def test_bench_fusion_rejects_bad_options(capsys):
    assert fusion_bench.main(["--sessions", "0"]) == 2
    assert "--sessions must be positive" in capsys.readouterr().err
    assert fusion_bench.main(["--sweep", "25,x"]) == 2
    assert "not a comma-separated list" in capsys.readouterr().err
    assert fusion_bench.main(["--seconds", "4", "--warmup-seconds", "4"]) == 2
    assert "--warmup-seconds" in capsys.readouterr().err
