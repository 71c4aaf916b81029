"""LaborIntelligenceEngine: hashing of names, validation, stacking, and patterns checked against numpy."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from services.liam import InvalidMetrics, LaborIntelligenceEngine, NonNumericMetric

RECORD = {"productivity": 85.5, "efficiency": 92.3, "quality": 88.7, "throughput": 120.0}


def expected_coordinate(name: str, dimensions: int) -> tuple[int, float]:
    h = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8, person=b"liam-fh1").digest(), "little")
    return (h >> 1) % dimensions, (-1.0 if h & 1 else 1.0)


def test_ingest_is_feature_hashing_with_documented_scheme() -> None:
    engine = LaborIntelligenceEngine(dimensions=64)
    vector = engine.ingest_labor_data(RECORD)
    assert isinstance(vector, np.ndarray) and vector.dtype == np.float64 and vector.shape == (64,)
    expected = np.zeros(64)
    for name, value in RECORD.items():
        index, sign = expected_coordinate(name, 64)
        expected[index] += sign * value
    np.testing.assert_array_equal(vector, expected)


def test_ingest_is_deterministic_across_processes() -> None:
    code = (
        "from services.liam import LaborIntelligenceEngine as E; "
        f"print(E(dimensions=97).ingest_labor_data({RECORD!r}).tolist())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    here = LaborIntelligenceEngine(dimensions=97).ingest_labor_data(RECORD).tolist()
    assert eval(other.stdout) == here  # noqa: S307 - our own subprocess's list literal


def test_colliding_names_add_with_their_signs() -> None:
    engine = LaborIntelligenceEngine(dimensions=1)
    signs = [engine.coordinate(name)[1] for name in ("a", "b")]
    assert engine.ingest_labor_data({"a": 2.0, "b": 3.0})[0] == signs[0] * 2.0 + signs[1] * 3.0


def test_layout_pins_names() -> None:
    engine = LaborIntelligenceEngine(dimensions=8, layout={"quality": 3, "speed": 0})
    vector = engine.ingest_labor_data({"quality": 1.5, "speed": -2.0})
    assert vector[3] == 1.5 and vector[0] == -2.0 and np.count_nonzero(vector) == 2
    with pytest.raises(InvalidMetrics, match="quality"):
        LaborIntelligenceEngine(dimensions=8, layout={"quality": 8})


def test_ingest_accepts_ints_and_numpy_scalars() -> None:
    engine = LaborIntelligenceEngine(dimensions=16)
    a = engine.ingest_labor_data({"x": 3, "y": np.float32(1.5), "z": np.int64(-2)})
    b = engine.ingest_labor_data({"x": 3.0, "y": 1.5, "z": -2.0})
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("record", "error", "mentions"),
    [
        ({"quality": float("nan")}, InvalidMetrics, "quality"),
        ({"quality": float("inf")}, InvalidMetrics, "quality"),
        ({"quality": -np.inf}, InvalidMetrics, "quality"),
        ({"quality": "88.7"}, NonNumericMetric, "quality"),
        ({"quality": None}, NonNumericMetric, "quality"),
        ({"quality": True}, NonNumericMetric, "quality"),
        ({"quality": 1 + 2j}, NonNumericMetric, "quality"),
        ({"quality": [1.0]}, NonNumericMetric, "quality"),
        ({"quality": 10**400}, InvalidMetrics, "quality"),
        ({3: 1.0}, NonNumericMetric, "names"),
        ({}, InvalidMetrics, "empty"),
    ],
)
def test_ingest_rejects_bad_records(record: dict[Any, Any], error: type[Exception], mentions: str) -> None:
    with pytest.raises(error, match=mentions):
        LaborIntelligenceEngine(dimensions=8).ingest_labor_data(record)


def test_non_numeric_is_both_type_and_value_error() -> None:
    engine = LaborIntelligenceEngine(dimensions=8)
    with pytest.raises(TypeError):
        engine.ingest_labor_data({"q": "x"})
    with pytest.raises(ValueError):
        engine.ingest_labor_data({"q": "x"})
    with pytest.raises(NonNumericMetric):
        engine.ingest_labor_data([("q", 1.0)])  # type: ignore[arg-type]


def test_bad_dimensions() -> None:
    for dimensions in (0, -1, 2.5, True):
        with pytest.raises(InvalidMetrics):
            LaborIntelligenceEngine(dimensions=dimensions)  # type: ignore[arg-type]


def test_compute_labor_matrix_stacks_and_normalises() -> None:
    engine = LaborIntelligenceEngine(dimensions=4)
    rows = [np.array([1.0, 2.0, 0.0, 5.0]), np.array([3.0, 2.0, 0.0, 1.0]), np.array([5.0, 2.0, 0.0, 3.0])]
    matrix = engine.compute_labor_matrix(rows)
    np.testing.assert_array_equal(matrix, np.vstack(rows))
    np.testing.assert_array_equal(engine.compute_labor_matrix(np.vstack(rows)), matrix)
    z = engine.compute_labor_matrix(rows, normalise="zscore")
    np.testing.assert_allclose(z[:, [0, 3]].mean(axis=0), 0.0, atol=1e-15)
    np.testing.assert_allclose(z[:, [0, 3]].std(axis=0), 1.0)
    np.testing.assert_array_equal(z[:, [1, 2]], 0.0)  # zero-variance columns: centred, not divided by zero
    rows.append(np.zeros(4))
    unit = engine.compute_labor_matrix(rows, normalise="l2")
    np.testing.assert_allclose(np.linalg.norm(unit[:3], axis=1), 1.0)
    np.testing.assert_array_equal(unit[3], 0.0)


@pytest.mark.parametrize(
    ("vectors", "error", "mentions"),
    [
        ([], InvalidMetrics, "no vectors"),
        (np.empty((0, 4)), InvalidMetrics, "no vectors"),
        ([np.ones(3)], InvalidMetrics, "columns"),
        ([np.ones(4), np.array([1.0, np.nan, 0.0, 0.0])], InvalidMetrics, r"vectors\[1\]"),
        ([np.ones(4), ["a", "b", "c", "d"]], NonNumericMetric, r"vectors\[1\]"),
        ([np.ones(4), [1.0, None, 2.0, 3.0]], NonNumericMetric, r"vectors\[1\]"),
        ([np.ones(4), np.ones(4, dtype=bool)], NonNumericMetric, r"vectors\[1\]"),
        ([np.ones((2, 4))], InvalidMetrics, "1-D"),
    ],
)
def test_compute_labor_matrix_rejects(vectors: Any, error: type[Exception], mentions: str) -> None:
    with pytest.raises(error, match=mentions):
        LaborIntelligenceEngine(dimensions=4).compute_labor_matrix(vectors)


def test_compute_labor_matrix_rejects_unknown_normalisation() -> None:
    with pytest.raises(InvalidMetrics, match="normalise"):
        LaborIntelligenceEngine(dimensions=2).compute_labor_matrix([[1.0, 2.0]], normalise="max")  # type: ignore[arg-type]


def low_rank(rng: np.random.Generator, n: int, d: int, rank: int) -> np.ndarray:
    return rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d))


@pytest.mark.parametrize(
    ("n", "d", "rank", "method"),
    [(1, 64, 1, "svd"), (5, 64, 5, "svd"), (64, 64, 64, "svd"), (300, 16, 16, "gram"), (300, 16, 4, "qr")],
)
def test_rank_and_condition_match_numpy(n: int, d: int, rank: int, method: str) -> None:
    rng = np.random.default_rng(n * d + rank)
    matrix = low_rank(rng, n, d, rank) if rank < min(n, d) else rng.standard_normal((n, d))
    result = LaborIntelligenceEngine(dimensions=d).analyze_intelligence_patterns(matrix)
    singular = np.linalg.svd(matrix, compute_uv=False)
    assert result["method"] == method
    assert result["rank"] == np.linalg.matrix_rank(matrix) == rank
    assert result["tolerance"] == pytest.approx(singular.max() * max(n, d) * np.finfo(float).eps, rel=1e-9)
    np.testing.assert_allclose(result["singular_values"][:rank], singular[:rank], rtol=1e-10)
    assert result["condition_number"] == pytest.approx(singular[0] / singular[rank - 1], rel=1e-9)
    assert result["underdetermined"] == (n < d)
    assert result["rank_deficient"] == (rank < min(n, d))
    if rank == min(n, d):
        assert result["condition_number_full"] == pytest.approx(np.linalg.cond(matrix), rel=1e-9)
    else:
        assert result["condition_number_full"] == math.inf


def test_one_row_gives_rank_one_condition_one() -> None:
    result = LaborIntelligenceEngine(dimensions=64).analyze_intelligence_patterns(np.arange(64.0))
    assert result["rank"] == 1 and result["condition_number"] == 1.0 and result["condition_number_full"] == 1.0
    assert result["underdetermined"] and result["zero_variance_columns"] == list(range(64))
    np.testing.assert_array_equal(result["explained_variance"], 0.0)
    np.testing.assert_array_equal(result["anomaly_scores"], 0.0)


def test_zero_matrix() -> None:
    result = LaborIntelligenceEngine(dimensions=3).analyze_intelligence_patterns(np.zeros((10, 3)))
    assert result["rank"] == 0 and result["condition_number"] == math.inf
    assert result["condition_number_full"] == math.inf


def test_explicit_tolerance() -> None:
    matrix = np.diag([10.0, 1.0, 1e-3])
    engine = LaborIntelligenceEngine(dimensions=3)
    assert engine.analyze_intelligence_patterns(matrix)["rank"] == 3
    result = engine.analyze_intelligence_patterns(matrix, tol=1e-2)
    assert result["rank"] == 2 and result["tolerance"] == 1e-2 and result["condition_number"] == pytest.approx(10.0)


def test_ill_conditioned_tall_matrix_takes_qr_and_stays_exact() -> None:
    rng = np.random.default_rng(7)
    matrix = rng.standard_normal((2000, 8)) * np.logspace(0, -9, 8)  # condition ~1e9: Gram would square it
    result = LaborIntelligenceEngine(dimensions=8).analyze_intelligence_patterns(matrix)
    singular = np.linalg.svd(matrix, compute_uv=False)
    assert result["method"] == "qr" and result["rank"] == 8
    np.testing.assert_allclose(result["singular_values"], singular, rtol=1e-7)
    assert result["condition_number"] == pytest.approx(np.linalg.cond(matrix), rel=1e-7)


def test_pca_of_zscored_columns_matches_svd() -> None:
    rng = np.random.default_rng(3)
    matrix = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6)) + 50.0
    matrix[:, 4] = 7.0  # a constant column: flagged, never divided by
    result = LaborIntelligenceEngine(dimensions=6).analyze_intelligence_patterns(matrix)
    assert result["zero_variance_columns"] == [4]
    active = [0, 1, 2, 3, 5]
    z = (matrix[:, active] - matrix[:, active].mean(axis=0)) / matrix[:, active].std(axis=0, ddof=1)
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    np.testing.assert_allclose(result["component_variance"][:5], s**2 / 499, rtol=1e-9)
    np.testing.assert_allclose(result["explained_variance"][:5], s**2 / (s**2).sum(), rtol=1e-9)
    assert result["explained_variance"][5] == 0.0
    for row, expected in zip(result["components"][:5], vt, strict=True):
        assert abs(abs(row[active] @ expected) - 1.0) < 1e-9 and row[4] == 0.0
    # Mahalanobis distance in z-scored space, straight from the definition.
    inverse = np.linalg.inv(np.cov(z, rowvar=False))
    expected_scores = np.sqrt(np.einsum("ij,jk,ik->i", z, inverse, z))
    np.testing.assert_allclose(result["anomaly_scores"], expected_scores, rtol=1e-8)
    assert np.all(np.isfinite(result["anomaly_scores"]))


def test_anomaly_scores_pick_out_an_outlier() -> None:
    rng = np.random.default_rng(11)
    base = rng.standard_normal((400, 2))
    matrix = np.column_stack([base[:, 0], base[:, 0] + 0.01 * base[:, 1], base[:, 1]])
    matrix[123] = [1.0, -1.0, 0.0]  # breaks the strong correlation of the first two columns
    scores = LaborIntelligenceEngine(dimensions=3).analyze_intelligence_patterns(matrix)["anomaly_scores"]
    assert int(np.argmax(scores)) == 123


@pytest.mark.parametrize(
    ("matrix", "error"),
    [
        (np.array([[1.0, np.nan]]), InvalidMetrics),
        (np.array([["a", "b"]]), NonNumericMetric),
        (np.empty((0, 2)), InvalidMetrics),
        (np.ones((2, 3)), InvalidMetrics),
        (np.ones((2, 2, 2)), InvalidMetrics),
    ],
)
def test_analyze_rejects(matrix: np.ndarray, error: type[Exception]) -> None:
    with pytest.raises(error):
        LaborIntelligenceEngine(dimensions=2).analyze_intelligence_patterns(matrix)
