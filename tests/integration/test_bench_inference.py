"""A quick smoke run of the inference benchmark on the shipped models: both legs run and report their figures."""

from __future__ import annotations

import json

import pytest

from bench import inference as inference_bench

pytestmark = pytest.mark.integration


def test_bench_inference_compares_variants_and_calls_model_infer(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = [
        "--rounds",
        "1",
        "--windows",
        "32",
        "--score-stride",
        "64",
        "--infer-calls",
        "50",
        "--energy-source",
        "estimate",
        "--json",
        str(out),
    ]
    code = inference_bench.main(argv)
    printed = capsys.readouterr().out
    assert code == 0, printed

    results = json.loads(out.read_text())
    variants = {row["model"]: row for row in results["variants"]}
    assert list(variants)[0] == inference_bench.TEACHER and set(variants) == set(inference_bench.DEFAULT_MODELS)
    for row in variants.values():
        assert row["energy_source"] == "estimate"
        assert row["joules_per_window_b1"] > 0 and row["joules_per_window_b32"] > 0
        assert row["latency_b1_ms"]["p99"] >= row["latency_b1_ms"]["p50"] > 0
        assert 0.5 < row["macro_f1"] <= 1.0
    # The teacher is its own baseline; every other variant is compared with it.
    assert variants[inference_bench.TEACHER]["energy_ratio_b1"] == pytest.approx(1.0)
    assert set(results["targets"]) == set(inference_bench.DEFAULT_MODELS) - {inference_bench.TEACHER}
    for name in (inference_bench.SERVED, inference_bench.TEACHER):
        figures = results["model_infer"][name]
        assert figures["calls"] == 50 and figures["p99_ms"] >= figures["p50_ms"] > 0
    # The empty call on the same channel is measured beside them, as the floor of any gRPC call.
    assert results["model_infer"][inference_bench.EMPTY_CALL]["calls"] == 50
    assert "ModelInfer ecg-beat-pruned at batch 1" in printed and "over the empty call" in printed
