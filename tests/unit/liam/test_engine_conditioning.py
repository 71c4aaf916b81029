"""Rank and condition numbers of offset, badly scaled and ill-conditioned matrices against numpy.linalg, on
the tall (no n x d SVD) and wide paths."""

from __future__ import annotations

import numpy as np
import pytest

from liam_core import LaborIntelligenceEngine


def offset(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    return 1e6 + rng.standard_normal((n, d))


def badly_scaled(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    return rng.standard_normal((n, d)) * np.logspace(-6, 6, d)


def ill_conditioned(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    k = min(n, d)
    u, _ = np.linalg.qr(rng.standard_normal((n, k)))
    v, _ = np.linalg.qr(rng.standard_normal((d, k)))
    return (u * np.logspace(0, -9, k)) @ v.T


@pytest.mark.parametrize("make", [offset, badly_scaled, ill_conditioned])
@pytest.mark.parametrize(("n", "d"), [(400, 8), (6, 8)])
def test_rank_and_condition_agree_with_numpy(make, n: int, d: int) -> None:
    matrix = make(np.random.default_rng(n + d), n, d)
    result = LaborIntelligenceEngine(dimensions=d).analyze_intelligence_patterns(matrix)
    singular = np.linalg.svd(matrix, compute_uv=False)
    rank = np.linalg.matrix_rank(matrix)
    assert result["rank"] == rank
    # Relative accuracy of the small singular values is bounded by the largest: compare on that scale.
    np.testing.assert_allclose(result["singular_values"], singular, rtol=0, atol=singular[0] * 1e-12)
    if rank == min(n, d):
        assert result["condition_number"] == pytest.approx(np.linalg.cond(matrix), rel=1e-3)
        assert result["condition_number_full"] == pytest.approx(np.linalg.cond(matrix), rel=1e-3)
