"""Running mean and covariance of a stream of metric vectors, and the principal patterns they imply.

State per stream: the count n, the mean, M2 (the d x d sum of outer products of centred rows) and R, the upper
triangular factor of the centred rows (R^T R = M2). Batches are folded in with Chan, Golub and LeVeque's pairwise
update, the numerically safe generalisation of Welford's method. Each block of rows is centred before its Gram
matrix is formed (on the mean of a sample of its first rows, or for a small block of a running stream on the
stream's mean so far, then corrected exactly by the block's residual mean; re-centred on its own mean where it
drifted far), so data with a large offset (mean 1e8, variance 1e-6) loses nothing to
cancellation, as a running sum of squares would. Means are held relative to the first row seen (the "shifted
data" method), so the means that the merges subtract are small numbers, not offsets whose last-place rounding
would leak into M2.

Cost: O(b d^2) per batch of b rows, O(d^3) per block merge and per report, so a tall matrix (n in the millions)
costs one pass and never an SVD of n x d. The pass goes in steps of about STEP_BYTES: each step's rows are read
from memory once, by the Gram product (which numpy hands to BLAS as a symmetric rank-k update, half the flops of
a general product), and the column sums (and, where the rows are centred, the subtraction) find them in cache.

Why R as well as M2: the eigenvalues of M2 carry an absolute error of about d * eps * lambda_max, so when the
spectrum is ill-conditioned (lambda_max / lambda_min above `max_condition`, 1e7 by default) the small
eigenvalues and their directions are rounding noise. R is kept exactly as M2 is, with the same merge rule
applied as a QR factorisation of stacked rows, and its SVD gives the small singular values to about eps * s_max,
the accuracy of an SVD of the data itself. The report says which route it took ("covariance" or "qr-fallback").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np
from numpy.typing import ArrayLike, NDArray

from services.liam.errors import InvalidMetrics, NonNumericMetric

MAX_CONDITION = 1e7
BLOCK_ROWS = 65_536
# Below this share of a column's sum of squares about the centre, its variance is recomputed about the block's own
# mean: G - n e e^T then loses at most one bit to cancellation, so the Cholesky route keeps its accuracy.
DRIFT_FRACTION = 0.5
# Bytes of rows per step of the moment pass: the Gram product of each step reads its rows from memory, and the
# column sums (and, on the centred route, the subtraction before them) then find them in cache, so a block costs
# one read from memory instead of two or three. At least MIN_STEP_ROWS rows, to keep the d x d additions small.
STEP_BYTES = 1024 * 1024
MIN_STEP_ROWS = 256
# Rows whose mean and variance decide whether a block is near enough to zero for the Gram of the raw rows.
RAW_SAMPLE_ROWS = 256
# A column whose standard deviation is below a few rounding units of its own magnitude holds no variation that
# float64 can represent: treat it as constant rather than divide by rounding noise.
ZERO_VARIANCE_RELATIVE = 16 * np.finfo(np.float64).eps

Matrix = NDArray[np.float64]


def as_metric_matrix(
    data: ArrayLike, *, name: str = "matrix", columns: int | None = None, check_finite: bool = True
) -> Matrix:
    """Validates `data` as a finite real 2-D array (a 1-D array counts as one row) and returns it as float64.

    Raises NonNumericMetric for non-numeric or boolean dtypes, InvalidMetrics for the wrong number of dimensions
    or columns, for an empty array and (unless `check_finite` is False: the caller checks) for NaN or infinity,
    naming the first offending row and column.
    """
    try:
        array = np.asarray(data)
    except (ValueError, TypeError) as exc:  # ragged nested sequences
        raise InvalidMetrics(f"{name} is not a rectangular array: {exc}", field=name) from exc
    if array.dtype == np.bool_ or array.dtype.kind not in "iuf":
        raise NonNumericMetric(f"{name} must hold real numbers, not {array.dtype}", field=name)
    if array.ndim == 1:
        array = array[np.newaxis, :]
    if array.ndim != 2:
        raise InvalidMetrics(f"{name} must be 1-D or 2-D, got {array.ndim} dimensions", field=name)
    if columns is not None and array.shape[1] != columns:
        raise InvalidMetrics(f"{name} has {array.shape[1]} columns, expected {columns}", field=name)
    if array.size == 0:
        raise InvalidMetrics(f"{name} is empty (shape {array.shape})", field=name)
    array = np.ascontiguousarray(array, dtype=np.float64)
    # A sum is finite only if every term is (NaN and inf propagate): one read-only pass, no n x d temporary.
    # Where it is not (an overflow among finite values, or a bad value), the exact check says which.
    if check_finite and not np.isfinite(array.sum()):
        raise_non_finite(array, name)
    return array


def raise_non_finite(array: Matrix, name: str, row_offset: int = 0) -> None:
    """Raises InvalidMetrics naming the first NaN or infinity of `array` (rows numbered from `row_offset`);
    returns quietly if there is none."""
    finite = np.isfinite(array)
    if not finite.all():
        row, column = (int(i) for i in np.argwhere(~finite)[0])
        where = f"{name}[{row + row_offset}, {column}]"
        raise InvalidMetrics(f"{where} is not finite ({array[row, column]})", field=where)


def r_factor(rows: Matrix) -> Matrix:
    """The R of a Householder QR of `rows`: shape (min(m, d), d), R^T R = rows^T rows."""
    # numpy's stubs type every mode as QRResult; mode "r" returns R alone.
    return cast(Matrix, np.linalg.qr(rows, mode="r"))


def _moments(rows: Matrix, centre: Matrix | None = None, out: Matrix | None = None) -> tuple[Matrix, Matrix]:
    """(column means, Gram matrix) of `rows`, or of `rows - centre` written into `out` (same shape) when
    `centre` is given, in steps of about STEP_BYTES so that each row is read from memory once."""
    count, d = rows.shape
    step = max(MIN_STEP_ROWS, STEP_BYTES // (8 * d))
    # Column sums as a BLAS product with a vector of ones: numpy's sum down the rows of a C-ordered array runs
    # one short inner loop per row (about 4 ms per 1e5 x 64), the product about a third of that.
    ones = np.ones(min(step, count))
    sums = np.zeros(d)
    gram = np.zeros((d, d))
    for first in range(0, count, step):
        part = rows[first : first + step]
        if centre is not None and out is not None:
            part = np.subtract(part, centre, out=out[first : first + step])
        gram += part.T @ part
        sums += ones[: part.shape[0]] @ part
    return sums / count, gram


def _sign_fixed(components: Matrix) -> Matrix:
    """Flips each row so that its largest-magnitude entry is positive: SVD and eigh signs are arbitrary."""
    pivots = np.argmax(np.abs(components), axis=1)
    signs = np.where(components[np.arange(components.shape[0]), pivots] < 0, -1.0, 1.0)
    return components * signs[:, np.newaxis]


class PatternStream:
    """Running mean, covariance and R factor of d-dimensional metric vectors; see the module docstring.

    `max_condition` is the largest lambda_max / lambda_min of the covariance spectrum that `patterns` trusts to an
    eigen-decomposition of the covariance; above it the report comes from the SVD of R. It is also the largest
    condition of a batch's own centred Gram matrix that `update` trusts to a Cholesky factorisation for that
    batch's R; above it the batch is factorised by Householder QR.
    """

    def __init__(self, dimensions: int, *, max_condition: float = MAX_CONDITION) -> None:
        if dimensions < 1:
            raise InvalidMetrics(f"dimensions must be >= 1, got {dimensions}", field="dimensions")
        self.dimensions = dimensions
        self.max_condition = max_condition
        self.count = 0
        self._mean = np.zeros(dimensions)  # of the shifted rows (rows - _shift)
        self._shift: Matrix | None = None
        self._m2 = np.zeros((dimensions, dimensions))
        self._r = np.zeros((0, dimensions))
        self.block_routes = {"gram": 0, "qr": 0}

    @property
    def mean(self) -> Matrix:
        """The running mean (a copy), zeros before any data."""
        return self._mean.copy() if self._shift is None else self._shift + self._mean

    @property
    def m2(self) -> Matrix:
        """The sum of outer products of centred rows (a copy): covariance times (n - 1)."""
        return self._m2.copy()

    @property
    def r_factor(self) -> Matrix:
        """The upper triangular factor of the centred rows seen so far (a copy): R^T R = M2 up to rounding."""
        return self._r.copy()

    def covariance(self, ddof: int = 1) -> Matrix:
        """The covariance matrix M2 / (n - ddof); raises InvalidMetrics when n <= ddof."""
        if self.count <= ddof:
            raise InvalidMetrics(f"covariance with ddof={ddof} needs more than {ddof} rows, have {self.count}")
        return self._m2 / (self.count - ddof)

    def update(self, batch: ArrayLike) -> PatternStream:
        """Folds a batch (b x d, or one d-vector) into the running state; returns self. An empty batch is a no-op."""
        try:
            rows = np.asarray(batch)
        except (ValueError, TypeError) as exc:  # ragged nested sequences
            raise InvalidMetrics(f"batch is not a rectangular array: {exc}", field="batch") from exc
        if rows.size == 0 and rows.ndim == 2 and rows.shape[1] == self.dimensions:
            return self
        rows = as_metric_matrix(rows, name="batch", columns=self.dimensions, check_finite=False)
        # Shifted data: moments of rows minus the first row the stream saw. Means near the data's offset (1e8,
        # say) would carry rounding of a whole unit in the last place of the offset into every merge; means of
        # shifted rows are small numbers held to full relative precision.
        shift = rows[0].copy() if self._shift is None else self._shift
        # The stream's mean so far (the first row, for a new stream): the centre of small blocks that are not
        # near zero (larger ones are centred on a sample of their own rows; see _block_state).
        centre = shift + self._mean
        # One buffer per call, reused by every block: fresh n x d temporaries cost page faults, not just copies.
        buffer = np.empty((min(BLOCK_ROWS, rows.shape[0]), self.dimensions))
        # NaN and inf are found through the block means and reported with their place; numpy's own warning
        # about inf - inf on the way there would only repeat it.
        with np.errstate(invalid="ignore"):
            states = [
                self._block_state(rows[start : start + BLOCK_ROWS], start, centre, shift, buffer)
                for start in range(0, rows.shape[0], BLOCK_ROWS)
            ]
        # Only a batch that is wholly valid changes the state.
        self._shift = shift
        for route, count, mean, m2, r in states:
            self.block_routes[route] += 1
            self._combine(count, mean, m2, r)
        return self

    def merge(self, other: PatternStream) -> PatternStream:
        """Folds another stream's state into this one (Chan et al.'s pairwise rule); returns self."""
        if other.dimensions != self.dimensions:
            raise InvalidMetrics(f"cannot merge a {other.dimensions}-d stream into a {self.dimensions}-d one")
        if other.count and other._shift is not None:
            if self._shift is None:
                self._shift = other._shift.copy()
            self._combine(other.count, (other._shift - self._shift) + other._mean, other._m2, other._r)
            for route, blocks in other.block_routes.items():
                self.block_routes[route] += blocks
        return self

    def _block_state(
        self, block: Matrix, start: int, centre: Matrix, shift: Matrix, buffer: Matrix
    ) -> tuple[str, int, Matrix, Matrix, Matrix]:
        """(route, n, mean relative to `shift`, M2, R) of one block of rows (rows `start`... of the batch).

        M2 = G - n e e^T, with G the Gram matrix of the rows about some centre and e their mean about it, is
        exact algebra; it loses digits only where n e^2 is most of G, i.e. where the centre is far from the
        block's mean in units of its spread. So: where a sample says every column's mean is within one spread of
        zero, G is that of the raw rows (no copy); otherwise of the rows minus a centre (the mean of that sample,
        or `centre`, the stream's mean so far, for a small block of a running stream), written into `buffer`; if
        either leaves a column with less than DRIFT_FRACTION of G as variance, the rows are re-centred on their
        own mean. NaN and inf reach the means, which replaces a separate check.
        route: "gram" (R by Cholesky of M2) or "qr" (R by Householder QR of the centred rows).
        """
        count = block.shape[0]
        sample = block[:RAW_SAMPLE_ROWS]
        sample_mean = sample.mean(axis=0)
        if np.all(sample_mean**2 <= sample.var(axis=0)):
            mean, gram = _moments(block)
            self._check_finite(mean, block, start)
            m2 = gram - count * np.outer(mean, mean)
            if np.all(np.diag(m2) >= DRIFT_FRACTION * np.diag(gram)):
                return self._factor(count, mean - shift, m2, lambda: np.subtract(block, mean, out=buffer[:count]))
        if (self.count == 0 or count >= RAW_SAMPLE_ROWS) and np.isfinite(sample_mean).all():
            # A sample of the block's own rows puts the centre within a fraction of a spread of its mean, so the
            # drift re-centring below (a second pass) is rare; the stream's mean so far serves small blocks, and
            # any block whose sample sums overflow (values near the float64 limit) or hold NaN or inf.
            centre = sample_mean
        centred = buffer[:count]
        residual, gram = _moments(block, centre, centred)
        self._check_finite(residual, block, start)
        offset = centre - shift
        m2 = gram - count * np.outer(residual, residual)
        if np.any(np.diag(m2) < DRIFT_FRACTION * np.diag(gram)):
            offset = offset + residual
            np.subtract(centred, residual, out=centred)
            residual, gram = _moments(centred)
            m2 = gram - count * np.outer(residual, residual)
        exact = residual  # the closure must see the final residual
        return self._factor(count, offset + residual, m2, lambda: np.subtract(centred, exact, out=centred))

    @staticmethod
    def _check_finite(mean: Matrix, block: Matrix, start: int) -> None:
        if not np.isfinite(mean).all():
            raise_non_finite(block, "batch", start)
            raise InvalidMetrics("batch values overflow float64 when combined", field="batch")

    def _factor(
        self, count: int, mean: Matrix, m2: Matrix, centred_rows: Callable[[], Matrix]
    ) -> tuple[str, int, Matrix, Matrix, Matrix]:
        """Adds the block's R to its moments: by Cholesky of M2 where that is well-conditioned, else by QR of
        the exactly centred rows (`centred_rows()` makes them)."""
        if count > self.dimensions:
            # A well-conditioned Gram matrix gives R by Cholesky as accurately (relative to the block's own
            # spectrum) as QR would, at a fraction of the cost: this is the fast route for ordinary data.
            eigenvalues = np.linalg.eigvalsh(m2)
            if eigenvalues[0] > 0 and eigenvalues[-1] <= eigenvalues[0] * self.max_condition:
                try:
                    r = cast(Matrix, np.linalg.cholesky(m2).T)
                except np.linalg.LinAlgError:
                    pass
                else:
                    return "gram", count, mean, m2, r
        return "qr", count, mean, m2, r_factor(centred_rows())

    def _combine(self, count: int, mean: Matrix, m2: Matrix, r: Matrix) -> None:
        if self.count == 0:
            self.count, self._mean, self._m2, self._r = count, mean.copy(), m2.copy(), r.copy()
            return
        total = self.count + count
        delta = mean - self._mean
        weight = self.count * count / total
        self._mean = self._mean + delta * (count / total)
        self._m2 = self._m2 + m2 + np.outer(delta, delta) * weight
        # The same rule for R: the centred union is the two centred parts plus one rank-one correction row.
        self._r = r_factor(np.vstack([self._r, r, np.sqrt(weight) * delta[np.newaxis, :]]))
        self.count = total

    def zero_variance_columns(self) -> list[int]:
        """Columns whose values never varied (beyond rounding of their own magnitude)."""
        std = np.sqrt(np.maximum(np.diag(self._m2), 0.0) / max(self.count - 1, 1))
        return [int(j) for j in np.flatnonzero(std <= ZERO_VARIANCE_RELATIVE * np.abs(self.mean))]

    def patterns(self, *, standardise: bool = False) -> dict[str, Any]:
        """Principal patterns of the data so far: a PCA of the covariance (or, with `standardise`, of the
        correlation: each column divided by its standard deviation first).

        Zero-variance columns are left out of the decomposition (never divided by zero); they come last, as unit
        directions with eigenvalue 0. Returns a dict:
          count, mean (d,), std (d,), zero_variance_columns (list of column indices), standardised (bool),
          eigenvalues (d,): variance along each component (ddof=1), descending,
          explained_variance (d,): eigenvalues / their sum (zeros when there is no variance at all),
          components (d, d): principal directions as rows, each signed so its largest entry is positive,
          covariance_condition: lambda_max / lambda_min over the varying columns (inf when singular),
          method: "covariance" (eigh of the d x d covariance) or "qr-fallback" (SVD of R, when
          covariance_condition > max_condition).
        """
        if self.count == 0:
            raise InvalidMetrics("no data: update the stream with at least one row first")
        d = self.dimensions
        denominator = max(self.count - 1, 1)
        std = np.sqrt(np.maximum(np.diag(self._m2), 0.0) / denominator)
        constant = self.zero_variance_columns()
        active = np.setdiff1d(np.arange(d), constant)
        # Active columns have std > 0 by construction, so the division is safe.
        scale = 1.0 / std[active] if standardise else np.ones(active.size)
        eigenvalues = np.zeros(d)
        components = np.zeros((d, d))
        condition = float("inf")
        method = "covariance"
        if active.size:
            covariance = self._m2[np.ix_(active, active)] * np.outer(scale, scale) / denominator
            values, vectors = np.linalg.eigh(covariance)
            values, vectors = values[::-1], vectors[:, ::-1]
            condition = float(values[0] / values[-1]) if values[-1] > 0 else float("inf")
            if condition <= self.max_condition:
                active_values, active_vectors = np.maximum(values, 0.0), vectors.T
            else:
                method = "qr-fallback"
                _, singular, vt = np.linalg.svd(self._r[:, active] * scale, full_matrices=True)
                active_values = np.zeros(active.size)
                active_values[: singular.size] = singular**2 / denominator
                active_vectors = vt
            eigenvalues[: active.size] = active_values
            components[: active.size, active] = _sign_fixed(active_vectors)
        components[active.size :, constant] = np.eye(len(constant))
        total = eigenvalues.sum()
        explained = eigenvalues / total if total > 0 else np.zeros(d)
        return {
            "count": self.count,
            "mean": self.mean,
            "std": std,
            "zero_variance_columns": constant,
            "standardised": standardise,
            "eigenvalues": eigenvalues,
            "explained_variance": explained,
            "components": components,
            "covariance_condition": condition,
            "method": method,
        }
