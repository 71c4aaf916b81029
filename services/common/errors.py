"""Domain errors: raised by pure logic, mapped to gRPC status codes in one place (services.common.rpc).

Each error names its status code as a string so this module needs no gRPC import.
"""

from __future__ import annotations


class ClisonixError(Exception):
    """Base of every domain error; `code` is the name of a grpc.StatusCode member."""

    code = "INTERNAL"

    def __init__(self, message: str, *, reason: str = "", retry_after_s: float | None = None) -> None:
        super().__init__(message)
        # A short, bounded label for metrics and dead-letter headers (never data values).
        self.reason = reason or self.code.lower()
        # Set when the same request may succeed if sent again after this many seconds (rate limits).
        self.retry_after_s = retry_after_s


class InvalidArgument(ClisonixError):
    code = "INVALID_ARGUMENT"


class NotFound(ClisonixError):
    code = "NOT_FOUND"


class AlreadyExists(ClisonixError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(ClisonixError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(ClisonixError):
    code = "RESOURCE_EXHAUSTED"


class Unauthenticated(ClisonixError):
    code = "UNAUTHENTICATED"


class Unavailable(ClisonixError):
    code = "UNAVAILABLE"


class DeadlineExceeded(ClisonixError):
    code = "DEADLINE_EXCEEDED"


class Aborted(ClisonixError):
    """A concurrency conflict that outlasted its retries (e.g. a compare-and-set that kept losing)."""

    code = "ABORTED"
