"""Google API errors translated into tokenbroker's, at the adapter boundary.

https://cloud.google.com/apis/design/errors#handling_errors: UNAVAILABLE, DEADLINE_EXCEEDED,
INTERNAL and RESOURCE_EXHAUSTED are worth retrying (with backoff); the rest are not.
"""

from __future__ import annotations

from tokenbroker.kernel.errors import (
    AlreadyExists,
    ConfigError,
    NotFound,
    PermissionDenied,
    StoreUnavailable,
    TokenBrokerError,
    VersionConflict,
)

_RETRYABLE = frozenset(
    {
        "ServiceUnavailable",
        "DeadlineExceeded",
        "InternalServerError",
        "TooManyRequests",
        "ResourceExhausted",
        "Unknown",
        "RetryError",
        "GatewayTimeout",
        "BadGateway",
        # CANCELLED: our clients never cancel their own calls, so it is the other end (or a
        # proxy) cutting the call off -- a server stopping mid-call answers "Channel closed!",
        # possibly after the write landed. Retried like any outage; the protocols absorb a
        # write that landed twice. (Found by the fault suite: a rotated refresh token was
        # dropped as a permanent failure when Secret Manager stopped during its stage.)
        "Cancelled",
    }
)


def translate(exc: BaseException, what: str) -> TokenBrokerError:  # noqa: PLR0911 - a table
    """A tokenbroker error for a ``google.api_core`` exception raised while doing ``what``.

    The message names the operation and the status, never a payload.
    """
    name = type(exc).__name__
    code = getattr(exc, "code", None)
    status = getattr(code, "name", None) or name
    message = f"{what}: {status}"
    if name == "NotFound":
        return NotFound(message)
    if name == "AlreadyExists":
        return AlreadyExists(message)
    if name in ("Aborted", "FailedPrecondition", "Conflict"):
        return VersionConflict(message)
    if name in ("PermissionDenied", "Forbidden"):
        return PermissionDenied(
            f"{what}: permission denied (check the function's service account roles)"
        )
    if name in ("Unauthenticated", "Unauthorized"):
        return ConfigError(f"{message} (check the function's service account roles)")
    if name in _RETRYABLE:
        return StoreUnavailable(message)
    return StoreUnavailable(message, retryable=False)
