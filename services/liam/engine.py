"""LaborIntelligenceEngine: named metric records -> vectors -> matrices -> patterns (rank, conditioning, PCA).

Names to coordinates (feature hashing): a metric named `name` goes to coordinate
`(h >> 1) % dimensions` with sign `+1` if `h & 1 == 0` else `-1`, where `h` is the first 8 bytes (little endian)
of BLAKE2b over the UTF-8 name with personalisation b"liam-fh1". This is the same on every process and machine
(Python's `hash()` is salted per process, so it is never used). Two names that land on the same coordinate
add; their signs are independent, so in expectation the collision cancels rather than biases the coordinate
(the usual signed feature-hashing argument). With `dimensions` d and m distinct names, about m^2 / (2 d) pairs
collide; pass `layout` to pin names to coordinates of your choosing (sign +1, never hashed).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

from services.liam.errors import InvalidMetrics, NonNumericMetric
from services.liam.streaming import BLOCK_ROWS, Matrix, PatternStream, as_metric_matrix, r_factor

Normalisation = Literal["zscore", "l2"]
HASH_PERSON = b"liam-fh1"
# Directions whose variance is below this fraction of the largest are rounding noise; dividing by them (in the
# Mahalanobis anomaly score) would turn noise into anomalies.
ANOMALY_EIGEN_FLOOR = 1e-12


class LaborIntelligenceEngine:
    """Turns records of named metrics into `dimensions`-long float64 numpy vectors and analyses stacks of them.

    `layout` optionally fixes name -> coordinate for some names (sign +1); every other name is hashed as the
    module docstring describes (and may then share a coordinate with a pinned name).
    """

    def __init__(self, dimensions: int = 64, *, layout: Mapping[str, int] | None = None) -> None:
        if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1:
            raise InvalidMetrics(f"dimensions must be a positive int, got {dimensions!r}", field="dimensions")
        self.dimensions = dimensions
        self._coordinates: dict[str, tuple[int, float]] = {}
        for name, index in (layout or {}).items():
            if not isinstance(name, str):
                raise NonNumericMetric(f"layout names must be strings, got {type(name).__name__}", field="layout")
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < dimensions:
                raise InvalidMetrics(f"layout[{name!r}] = {index!r} is not in [0, {dimensions})", field=name)
            self._coordinates[name] = (index, 1.0)

    def coordinate(self, name: str) -> tuple[int, float]:
        """(index, sign) of the coordinate the metric `name` adds to."""
        cached = self._coordinates.get(name)
        if cached is None:
            digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8, person=HASH_PERSON).digest()
            h = int.from_bytes(digest, "little")
            cached = ((h >> 1) % self.dimensions, -1.0 if h & 1 else 1.0)
            self._coordinates[name] = cached
        return cached

    def ingest_labor_data(self, record: Mapping[str, Any]) -> Matrix:
        """One record {metric name: number} -> a float64 numpy array of shape (dimensions,).

        Values must be real numbers (int, float or numpy scalars; not bool, str, None or complex) and finite.
        Raises NonNumericMetric (a TypeError and a ValueError) or InvalidMetrics (a ValueError), naming the
        offending field; an empty record is refused too.
        """
        if not isinstance(record, Mapping):
            raise NonNumericMetric(f"a record maps metric names to numbers, got {type(record).__name__}")
        if not record:
            raise InvalidMetrics("empty record: at least one metric is needed")
        vector = np.zeros(self.dimensions)
        for name, value in record.items():
            if not isinstance(name, str):
                raise NonNumericMetric(f"metric names must be strings, got {name!r}", field=repr(name))
            number = _real(name, value)
            index, sign = self.coordinate(name)
            vector[index] += sign * number
        return vector

    def compute_labor_matrix(
        self, vectors: Sequence[ArrayLike] | ArrayLike, normalise: Normalisation | None = None
    ) -> Matrix:
        """Stacks n vectors of length `dimensions` into an n x dimensions float64 matrix.

        normalise: None keeps the values; "zscore" centres each column on its mean and divides it by its
        (population) standard deviation, leaving zero-variance columns at 0 rather than dividing by zero;
        "l2" divides each row by its Euclidean norm, leaving all-zero rows at 0.
        """
        if isinstance(vectors, np.ndarray):
            if vectors.size == 0:
                raise InvalidMetrics("no vectors to stack", field="vectors")
            matrix = as_metric_matrix(vectors, name="vectors", columns=self.dimensions)
        else:
            rows = list(vectors)  # type: ignore[arg-type]
            if not rows:
                raise InvalidMetrics("no vectors to stack", field="vectors")
            checked = []
            for i, row in enumerate(rows):
                name = f"vectors[{i}]"
                try:
                    array = np.asarray(row)
                except (ValueError, TypeError) as exc:
                    raise InvalidMetrics(f"{name} is not a flat array of numbers: {exc}", field=name) from exc
                if array.dtype == np.bool_ or array.dtype.kind not in "iuf":
                    raise NonNumericMetric(f"{name} must hold real numbers, not {array.dtype}", field=name)
                if array.ndim != 1:
                    raise InvalidMetrics(f"{name} must be 1-D, got shape {array.shape}", field=name)
                checked.append(as_metric_matrix(array, name=name, columns=self.dimensions))
            matrix = np.vstack(checked)
        if normalise is None:
            return matrix
        if normalise == "zscore":
            centred = matrix - matrix.mean(axis=0)
            std = centred.std(axis=0)
            return np.divide(centred, std, out=np.zeros_like(centred), where=std > 0)
        if normalise == "l2":
            norms = np.linalg.norm(matrix, axis=1, keepdims=True)
            return np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)
        raise InvalidMetrics(f"normalise must be None, 'zscore' or 'l2', got {normalise!r}", field="normalise")

    def analyze_intelligence_patterns(self, matrix: ArrayLike, *, tol: float | None = None) -> dict[str, Any]:
        """Rank, conditioning and principal patterns of an n x dimensions matrix, in one pass over its rows.

        Rank and condition numbers are those of the matrix as given. Returns a dict:
          shape (n, d); underdetermined: n < d; method: how the singular values were found: "svd" (n <= d, an
            SVD of the matrix itself), "gram" (n > d; each block's Gram matrix was well-conditioned and gave its
            R factor by Cholesky), or "qr" (n > d; some block needed Householder QR). Neither of the last two
            forms an SVD of n x d: singular values come from a d x d triangular factor.
          singular_values (min(n, d),), descending;
          tolerance: the cut-off for "non-zero", default numpy.linalg.matrix_rank's S.max() * max(n, d) * eps;
          rank: how many singular values exceed it; rank_deficient: rank < min(n, d);
          condition_number: largest / smallest non-zero singular value (those above tolerance), so a singular
            matrix reports the conditioning of its non-null part, one row gives 1.0, a zero matrix gives inf;
          condition_number_full: largest / smallest of all min(n, d) singular values, numpy.linalg.cond's
            2-norm definition, except that it is inf whenever rank < min(n, d);
          PCA of the z-scored columns (see PatternStream.patterns): column_mean, column_std,
            zero_variance_columns, component_variance, explained_variance, components, pca_method;
          anomaly_scores (n,): each row's Mahalanobis distance from the column means in z-scored space, over
            the components whose variance is above ANOMALY_EIGEN_FLOOR times the largest (0 when none).
        """
        data = as_metric_matrix(matrix, name="matrix", columns=self.dimensions)
        n, d = data.shape
        stream = PatternStream(d).update(data)
        if n <= d:
            singular = np.linalg.svd(data, compute_uv=False)
            method = "svd"
        else:
            # Uncentred = centred + n * mean mean^T, so R of the matrix itself is one more QR away.
            r = r_factor(np.vstack([stream.r_factor, math.sqrt(n) * stream.mean[np.newaxis, :]]))
            singular = np.linalg.svd(r, compute_uv=False)
            method = "qr" if stream.block_routes["qr"] else "gram"
        largest = float(singular[0])
        tolerance = largest * max(n, d) * np.finfo(np.float64).eps if tol is None else float(tol)
        rank = int(np.count_nonzero(singular > tolerance))
        condition = largest / float(singular[rank - 1]) if rank else math.inf
        condition_full = largest / float(singular[-1]) if rank == min(n, d) else math.inf
        pca = stream.patterns(standardise=True)
        return {
            "shape": (n, d),
            "underdetermined": n < d,
            "method": method,
            "singular_values": singular,
            "tolerance": tolerance,
            "rank": rank,
            "rank_deficient": rank < min(n, d),
            "condition_number": condition,
            "condition_number_full": condition_full,
            "column_mean": pca["mean"],
            "column_std": pca["std"],
            "zero_variance_columns": pca["zero_variance_columns"],
            "component_variance": pca["eigenvalues"],
            "explained_variance": pca["explained_variance"],
            "components": pca["components"],
            "pca_method": pca["method"],
            "anomaly_scores": _anomaly_scores(data, pca),
        }


def _real(name: str, value: Any) -> float:
    """The value of metric `name` as a finite float, or the reason it is not one."""
    if isinstance(value, bool | np.bool_):
        raise NonNumericMetric(f"metric {name!r} is a bool ({value}); give a number", field=name)
    if not isinstance(value, int | float | np.integer | np.floating):
        raise NonNumericMetric(
            f"metric {name!r} must be a real number, got {type(value).__name__} {value!r}", field=name
        )
    try:
        number = float(value)
    except OverflowError as exc:
        raise InvalidMetrics(f"metric {name!r} = {value} does not fit a float64", field=name) from exc
    if not math.isfinite(number):
        raise InvalidMetrics(f"metric {name!r} is not finite ({number})", field=name)
    return number


def _anomaly_scores(data: Matrix, pca: dict[str, Any]) -> Matrix:
    variance = pca["eigenvalues"]
    keep = variance > variance[0] * ANOMALY_EIGEN_FLOOR if variance[0] > 0 else np.zeros(variance.size, bool)
    scores = np.zeros(data.shape[0])
    if not keep.any():
        return scores
    std = pca["std"]
    scale = np.zeros(std.size)
    varying = np.setdiff1d(np.arange(std.size), pca["zero_variance_columns"])
    scale[varying] = 1.0 / std[varying]
    # Whitened projection: dividing each component by its standard deviation once, not per row.
    projection = (pca["components"][keep] / np.sqrt(variance[keep])[:, np.newaxis] * scale).T
    for start in range(0, data.shape[0], BLOCK_ROWS):
        block = (data[start : start + BLOCK_ROWS] - pca["mean"]) @ projection
        scores[start : start + BLOCK_ROWS] = np.sqrt(np.einsum("ij,ij->i", block, block))
    return scores
