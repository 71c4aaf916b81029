"""PatternStream: running mean/covariance/R agree with batch SVD, merge like one pass, survive offsets."""

from __future__ import annotations

import numpy as np
import pytest

from services.liam import InvalidMetrics, NonNumericMetric, PatternStream


def exact_patterns(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ddof=1) and components of the centred data, by SVD of the data itself."""
    centred = data - data.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    return s**2 / (data.shape[0] - 1), vt


def assert_same_directions(actual: np.ndarray, expected: np.ndarray, atol: float) -> None:
    for row, reference in zip(actual, expected, strict=True):
        assert abs(abs(row @ reference) - 1.0) < atol


def feed(stream: PatternStream, data: np.ndarray, sizes: list[int]) -> PatternStream:
    start = 0
    for size in sizes:
        stream.update(data[start : start + size])
        start += size
    stream.update(data[start:])
    return stream


# Offset 0: blocks take the Gram of the raw rows; offset 3: of the rows minus the running mean.
@pytest.mark.parametrize("offset", [0.0, 3.0])
def test_agrees_with_svd_on_well_conditioned_data(offset: float) -> None:
    rng = np.random.default_rng(0)
    data = rng.standard_normal((3000, 8)) @ np.diag([5.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5]) + offset
    patterns = feed(PatternStream(8), data, [1, 2, 500, 997]).patterns()
    eigenvalues, components = exact_patterns(data)
    assert patterns["method"] == "covariance" and patterns["count"] == 3000
    np.testing.assert_allclose(patterns["eigenvalues"], eigenvalues, rtol=1e-10)
    np.testing.assert_allclose(patterns["explained_variance"], eigenvalues / eigenvalues.sum(), rtol=1e-10)
    assert_same_directions(patterns["components"], components, 1e-8)
    np.testing.assert_allclose(patterns["mean"], data.mean(axis=0), rtol=1e-13)
    # Components are signed so that their largest entry is positive: the same on every run.
    rows = patterns["components"]
    assert np.all(rows[np.arange(8), np.argmax(np.abs(rows), axis=1)] > 0)


@pytest.mark.parametrize("offset", [0.0, 10.0])
def test_falls_back_on_ill_conditioned_data_and_stays_exact(offset: float) -> None:
    rng = np.random.default_rng(1)
    mixing = np.linalg.qr(rng.standard_normal((6, 6)))[0]
    scales = np.array([1.0, 0.5, 1e-2, 1e-3, 1e-5, 1e-6])  # covariance condition ~1e12
    data = (rng.standard_normal((4000, 6)) * scales) @ mixing + offset
    stream = feed(PatternStream(6), data, [3, 1000, 1500])
    patterns = stream.patterns()
    eigenvalues, components = exact_patterns(data)
    assert patterns["method"] == "qr-fallback"
    assert patterns["covariance_condition"] > 1e7
    np.testing.assert_allclose(patterns["eigenvalues"], eigenvalues, rtol=1e-7)
    assert_same_directions(patterns["components"], components, 1e-7)
    # The covariance route alone (no fallback) is what the fallback protects against: check the gap is real.
    raw = np.linalg.eigvalsh(stream.covariance())[::-1]
    assert abs(raw[-1] / eigenvalues[-1] - 1.0) > abs(patterns["eigenvalues"][-1] / eigenvalues[-1] - 1.0)


def test_merge_of_chunks_equals_one_pass() -> None:
    rng = np.random.default_rng(2)
    data = rng.standard_normal((1000, 5)) * [1.0, 2.0, 3.0, 4.0, 5.0] - 7.0
    whole = PatternStream(5).update(data)
    parts = [PatternStream(5).update(chunk) for chunk in np.array_split(data, [1, 3, 10, 400, 999])]
    merged = PatternStream(5)
    for part in parts:
        merged.merge(part)
    merged.merge(PatternStream(5))  # an empty stream changes nothing
    assert merged.count == whole.count == 1000
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-13)
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-11)
    np.testing.assert_allclose(merged.r_factor.T @ merged.r_factor, whole.m2, rtol=1e-10)
    a, b = merged.patterns(), whole.patterns()
    np.testing.assert_allclose(a["eigenvalues"], b["eigenvalues"], rtol=1e-10)
    assert_same_directions(a["components"], b["components"], 1e-9)


def test_offset_data_stays_accurate() -> None:
    rng = np.random.default_rng(3)
    data = 1e8 + rng.standard_normal((5000, 3)) * [1e-3, 2e-3, 5e-4]
    stream = PatternStream(3)
    for chunk in np.array_split(data, 700):  # many small batches: many merges
        stream.update(chunk)
    small = data - 1e8  # exact (Sterbenz): the reference loses nothing to the offset
    reference = np.cov(small, rowvar=False)
    np.testing.assert_allclose(stream.covariance(), reference, rtol=1e-6, atol=1e-6 * reference.max())
    # The mean is a float64 near 1e8 (spacing 1.5e-8): one rounding of it, not 700 merges' worth.
    np.testing.assert_allclose(stream.mean - 1e8, small.mean(axis=0), atol=1.5e-8)
    # The naive one-pass formula (sum of squares minus n mean^2) has nothing left at this offset.
    naive = (data.T @ data - 5000 * np.outer(data.mean(axis=0), data.mean(axis=0))) / 4999
    assert np.max(np.abs(naive - reference)) > 1e3 * np.max(np.abs(stream.covariance() - reference))
    eigenvalues, _ = exact_patterns(small)
    np.testing.assert_allclose(stream.patterns()["eigenvalues"], eigenvalues, rtol=1e-9)


def test_standardised_patterns_flag_constant_columns() -> None:
    rng = np.random.default_rng(4)
    data = rng.standard_normal((200, 4))
    data[:, 2] = 1e6  # constant, and large: its mean may not be exact, yet it must count as constant
    patterns = PatternStream(4).update(data).patterns(standardise=True)
    assert patterns["zero_variance_columns"] == [2] and patterns["method"] == "covariance"
    assert np.all(np.isfinite(patterns["components"])) and patterns["eigenvalues"][-1] == 0.0
    np.testing.assert_array_equal(patterns["components"][-1], [0.0, 0.0, 1.0, 0.0])
    assert patterns["eigenvalues"].sum() == pytest.approx(3.0)  # a correlation matrix of 3 varying columns


def test_bad_input() -> None:
    stream = PatternStream(3)
    with pytest.raises(InvalidMetrics, match="no data"):
        stream.patterns()
    with pytest.raises(InvalidMetrics, match=r"batch\[1, 2\]"):
        stream.update([[1.0, 2.0, 3.0], [1.0, 2.0, np.nan]])
    with pytest.raises(NonNumericMetric):
        stream.update([["a", "b", "c"]])
    with pytest.raises(InvalidMetrics, match="rectangular"):
        stream.update([[1.0, 2.0, 3.0], [1.0]])
    with pytest.raises(InvalidMetrics, match="columns"):
        stream.update(np.ones((2, 4)))
    with pytest.raises(InvalidMetrics):
        stream.merge(PatternStream(4))
    with pytest.raises(InvalidMetrics):
        PatternStream(0)
    assert stream.update(np.empty((0, 3))).count == 0
    stream.update([1.0, 2.0, 3.0])
    with pytest.raises(InvalidMetrics, match="ddof"):
        stream.covariance()


def test_a_rejected_batch_changes_nothing() -> None:
    from services.liam.streaming import BLOCK_ROWS

    stream = PatternStream(2).update(np.arange(10.0).reshape(5, 2))
    before = (stream.count, stream.mean, stream.m2, stream.r_factor, dict(stream.block_routes))
    batch = np.ones((BLOCK_ROWS + 10, 2))
    batch[BLOCK_ROWS + 3, 1] = np.inf  # in the second block: the first one must not be folded in either
    with pytest.raises(InvalidMetrics, match=rf"batch\[{BLOCK_ROWS + 3}, 1\]"):
        stream.update(batch)
    after = (stream.count, stream.mean, stream.m2, stream.r_factor, dict(stream.block_routes))
    assert before[0] == after[0] and before[4] == after[4]
    for a, b in zip(before[1:4], after[1:4], strict=True):
        np.testing.assert_array_equal(a, b)
    fresh = PatternStream(2)
    with pytest.raises(InvalidMetrics):
        fresh.update([[np.nan, 1.0]])
    fresh.update([[1.0, 2.0], [3.0, 5.0]])  # the rejected row did not become the shift
    np.testing.assert_array_equal(fresh.mean, [2.0, 3.5])


def test_drifting_mean_stays_accurate() -> None:
    rng = np.random.default_rng(5)
    # Each batch sits far (in units of its spread) from the running mean: the re-centring route must kick in.
    batches = [rng.standard_normal((300, 3)) * 1e-2 + level for level in (0.0, 1e6, -3e5, 1e6 + 1.0)]
    stream = PatternStream(3)
    for batch in batches:
        stream.update(batch)
    data = np.vstack(batches)
    centred = data - data.mean(axis=0)
    reference = centred.T @ centred
    np.testing.assert_allclose(stream.m2, reference, rtol=1e-9)
    np.testing.assert_allclose(np.diag(stream.r_factor.T @ stream.r_factor), np.diag(reference), rtol=1e-9)


@pytest.mark.parametrize("offset", [0.0, 3.0, 1e8])
def test_moments_in_many_steps_match_one_pass(offset: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps of 50 rows (raw and centred routes, sums and Gram products added step by step) change nothing."""
    from services.liam import streaming

    rng = np.random.default_rng(11)
    spread = rng.standard_normal((1234, 5)) @ rng.standard_normal((5, 5))
    data = offset + spread
    spread = data - offset  # exact (Sterbenz): the reference loses nothing to the offset
    monkeypatch.setattr(streaming, "MIN_STEP_ROWS", 1)
    monkeypatch.setattr(streaming, "STEP_BYTES", 50 * 5 * 8)
    stream = PatternStream(5).update(data)
    np.testing.assert_allclose(stream.mean - offset, spread.mean(axis=0), atol=max(4 * np.spacing(offset), 1e-13))
    np.testing.assert_allclose(stream.covariance(), np.cov(spread, rowvar=False), rtol=1e-9)
    np.testing.assert_allclose(stream.r_factor.T @ stream.r_factor, stream.m2, rtol=1e-9)
    eigenvalues, _ = exact_patterns(spread)
    np.testing.assert_allclose(stream.patterns()["eigenvalues"], eigenvalues, rtol=1e-9)


def test_large_block_of_a_running_stream_is_centred_on_its_own_sample() -> None:
    """A block far from the stream's mean (a level shift) is centred on a sample of its rows: still exact."""
    rng = np.random.default_rng(12)
    first = 1e6 + rng.standard_normal((500, 4))
    second = 1e6 + 1e3 + rng.standard_normal((70_000, 4)) * [1.0, 2.0, 0.5, 3.0]
    stream = PatternStream(4).update(first).update(second)
    both = np.vstack([first, second]) - 1e6  # exact (Sterbenz)
    np.testing.assert_allclose(stream.covariance(), np.cov(both, rowvar=False), rtol=1e-9)
    np.testing.assert_allclose(stream.mean - 1e6, both.mean(axis=0), atol=1e-9)
