"""The errors LIAM raises on bad input."""

from __future__ import annotations


class InvalidMetrics(ValueError):
    """A metric record, vector or matrix that LIAM cannot use: empty, non-finite, the wrong shape.

    `field` names the offending metric (or argument) where there is one; `reason` is a short label for
    metrics, dead-letter headers and rejected-record lists.
    """

    reason_default = "invalid_metrics"

    def __init__(self, message: str, field: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.reason = reason or self.reason_default


class NonNumericMetric(InvalidMetrics, TypeError):
    """A metric whose value is not a real number (a string, None, a bool, a complex number...).

    Both a ValueError (through InvalidMetrics) and a TypeError, so either `except` catches it.
    """

    reason_default = "not_a_number"


class InvalidHypervector(InvalidMetrics):
    """A binary hypervector array of the wrong dtype, shape, layout, or with padding bits set."""

    reason_default = "bad_vectors"
