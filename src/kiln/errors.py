"""The one error hierarchy of kiln.

Every error a user can cause is a :class:`KilnError`. Each subclass maps to one
HTTP status (for the server) and one process exit code (for the CLI), so the
edges translate errors mechanically and never show a traceback for bad input.
``field`` names the spec key, column or item that is wrong, when there is one.
"""

from __future__ import annotations


class KilnError(Exception):
    """Base of all errors kiln raises on purpose."""

    code = "kiln_error"
    http_status = 500
    exit_code = 1
    retry_after: int | None = None
    """Whole seconds after which the same request may succeed (the HTTP ``Retry-After``
    header); None for an error that waiting does not cure."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, str | None]:
        """The JSON error shape shared by the CLI (``--json``) and the API."""
        return {"code": self.code, "message": self.message, "field": self.field}


class SpecError(KilnError):
    """The spec (YAML/JSON or Python object) is malformed or inconsistent."""

    code = "invalid_spec"
    http_status = 422
    exit_code = 3


class DataError(KilnError):
    """Input data cannot be read or does not fit the spec or the model's schema."""

    code = "invalid_data"
    http_status = 422
    exit_code = 4


class BundleError(KilnError):
    """A bundle directory is missing, incomplete, corrupt or of an unknown format."""

    code = "invalid_bundle"
    http_status = 422
    exit_code = 5


class NotFoundError(KilnError):
    """A named file, directory or resource does not exist."""

    code = "not_found"
    http_status = 404
    exit_code = 6


class TrainingError(KilnError):
    """Training could not proceed (diverged to NaN, nothing to resume, ...)."""

    code = "training_failed"
    http_status = 500
    exit_code = 7


class Interrupted(KilnError):  # noqa: N818 - reads as a state, like KeyboardInterrupt
    """The user stopped a long run; the last checkpoint is kept for ``--resume``."""

    code = "interrupted"
    http_status = 499
    exit_code = 130


class ExportError(KilnError):
    """A model could not be exported (ONNX), or the export disagrees with torch."""

    code = "export_failed"
    http_status = 500
    exit_code = 8


class ToleranceError(KilnError):
    """No variant of a compression step stayed within the accuracy tolerance.

    ``kiln.compress`` raises its subclass ``CompressToleranceError``, which carries
    the variants that fitted (``partial``) and the failing step's attempts.
    """

    code = "tolerance_not_met"
    http_status = 422
    exit_code = 9


class AuthError(KilnError):
    """No API key, or one that is unknown, malformed or revoked."""

    code = "unauthorized"
    http_status = 401
    exit_code = 10


class ForbiddenError(KilnError):
    """The API key is valid but lacks the scope the action needs."""

    code = "forbidden"
    http_status = 403
    exit_code = 11


class ConflictError(KilnError):
    """The request clashes with the current state (a name taken, a job already finished)."""

    code = "conflict"
    http_status = 409
    exit_code = 12


class TooLargeError(KilnError):
    """A request body or upload is over the configured limit."""

    code = "too_large"
    http_status = 413
    exit_code = 13


class QuotaError(KilnError):
    """The project used up a quota (compute seconds, predictions, storage) for the period."""

    code = "quota_exceeded"
    http_status = 429
    exit_code = 15


class RateLimitError(KilnError):
    """Too many requests for a rate limit (per API key or per project) in its window.

    ``retry_after`` is the whole seconds until the limit's window lets a request through
    again (the HTTP ``Retry-After`` header).
    """

    code = "rate_limited"
    http_status = 429
    exit_code = 16
    retry_after: int

    def __init__(self, message: str, *, field: str | None = None, retry_after: int = 1) -> None:
        super().__init__(message, field=field)
        self.retry_after = retry_after


class ServiceError(KilnError):
    """The server could not be reached or answered with an unexpected failure."""

    code = "service_error"
    http_status = 502
    exit_code = 14


class QueueFull(ServiceError):  # noqa: N818 - reads as the deployment's condition
    """A deployment's queue holds ``max_queue`` requests already: the request was refused
    before it was queued, so nothing was computed, and a retry shortly may succeed."""

    code = "overloaded"
    http_status = 503
    exit_code = 18
    retry_after: int

    def __init__(
        self,
        message: str = "the deployment's queue is full; retry shortly",
        *,
        field: str | None = None,
        retry_after: int = 1,
    ) -> None:
        super().__init__(message, field=field)
        self.retry_after = retry_after


class DeadlineExceeded(ServiceError):  # noqa: N818 - reads as the request's condition
    """A request waited in a deployment's queue past its ``timeout_ms``; it was dropped
    uncomputed."""

    code = "timeout"
    http_status = 504
    exit_code = 19

    def __init__(
        self,
        message: str = "the request waited past the deployment's timeout_ms",
        *,
        field: str | None = None,
    ) -> None:
        super().__init__(message, field=field)


class EncryptionError(KilnError):
    """The master key is missing or wrong, or a stored object failed its integrity check."""

    code = "encryption_error"
    http_status = 500
    exit_code = 17


ERRORS_BY_CODE: dict[str, type[KilnError]] = {
    cls.code: cls
    for cls in (
        KilnError,
        SpecError,
        DataError,
        BundleError,
        NotFoundError,
        TrainingError,
        Interrupted,
        ExportError,
        ToleranceError,
        AuthError,
        ForbiddenError,
        ConflictError,
        TooLargeError,
        QuotaError,
        RateLimitError,
        ServiceError,
        QueueFull,
        DeadlineExceeded,
        EncryptionError,
    )
}
"""Error classes by their ``code``: the client turns an API error back into its class."""


class ResourcesUnavailableError(ServiceError):
    """A job asked for more than its cluster could give in time (Ray workers: CPUs,
    GPUs); the message names what was asked and what the cluster has."""

    code = "resources_unavailable"
    http_status = 503
    exit_code = 20
