"""A quick smoke run of the ingest benchmark against the session broker: both legs run and report figures."""

from __future__ import annotations

import asyncio
import json

import pytest

from bench import ingest as ingest_bench

pytestmark = pytest.mark.integration


async def test_bench_ingest_runs_both_legs_and_reports_a_ratio(broker, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = [
        "--bootstrap-servers",
        broker.bootstrap_servers,
        "--chunks",
        "5",
        "--channels",
        "4",
        "--streams",
        "2",
        "--max-unacked",
        "4",
        "--repeats",
        "1",
        "--energy-source",
        "estimate",
        "--json",
        str(out),
    ]
    # main() runs its own event loop (asyncio.run), so it runs in a worker thread beside the test's loop.
    code = await asyncio.wait_for(asyncio.to_thread(ingest_bench.main, argv), timeout=120)
    printed = capsys.readouterr().out
    assert code == 0, printed

    results = json.loads(out.read_text())
    assert [run["leg"] for run in results["runs"]] == ["bare", "ingest"]
    for name in ("bare", "ingest"):
        leg = results["legs"][name]
        assert leg["samples_per_s"] > 0 and leg["mb_per_s"] > 0
        assert leg["latency_p99_ms"] >= leg["latency_p50_ms"] > 0
    for run in results["runs"]:
        assert run["chunks"] == 2 * 5 and run["samples"] == 2 * 5 * 250  # 0.25 s chunks at 1000 Hz
    assert results["ratios"]["throughput"] > 0
    assert results["verdict"] in ("PASS", "BELOW TARGET")
    assert results["energy"]["source"] == "estimate"
    assert "throughput ingest/bare" in printed and "estimate" in printed


def test_bench_ingest_rejects_bad_options(capsys):
    assert ingest_bench.main(["--streams", "0"]) == 2
    assert "--streams must be positive" in capsys.readouterr().err
