"""`clisonix bench liam` runs end to end on tiny sizes and writes the documented JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.liam import main


def test_bench_liam_smoke(tmp_path: Path) -> None:
    out = tmp_path / "liam.json"
    argv = ["--rows-1024", "3000", "--rows-10000", "300", "--queries", "3", "--k", "4"]
    argv += ["--pattern-rows", "2000", "--pattern-dims", "8", "--repeats", "1", "--json", str(out)]
    assert main(argv) == 0
    results = json.loads(out.read_text())
    assert {"config", "machine", "hamming", "patterns", "targets", "torchhd"} <= results.keys()
    assert [leg["bits"] for leg in results["hamming"]] == [1024, 10_000]
    for leg in results["hamming"]:
        assert {"read_bytes_per_second", "vs_faiss", "vs_bandwidth", "legs", "numpy_equals_faiss"} <= leg.keys()
        assert {"numpy_batch", "numpy_one"} <= leg["legs"].keys()
        assert leg["numpy_equals_faiss"] in (True, None)  # None: faiss not installed
    patterns = results["patterns"]
    assert {"stream_seconds", "svd_seconds", "analyze_seconds", "vs_svd"} <= patterns.keys()
    assert patterns["max_relative_eigenvalue_error"] < 1e-8
    assert {"patterns_vs_svd", "3000x1024_vs_faiss", "300x10000_vs_bandwidth"} <= results["targets"].keys()


def test_bench_liam_rejects_bad_sizes() -> None:
    with pytest.raises(SystemExit):
        main(["--queries", "0"])
