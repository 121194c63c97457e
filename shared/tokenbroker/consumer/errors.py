"""What can go wrong when asking the broker for a token, as the library's own error types.

Two families, because the client treats them in opposite ways (docs/client.md, *Behaviour*):

* :class:`BrokerUnavailable` -- no answer worth keeping (timeouts, refused connections, 5xx,
  429, a malformed 200, an open breaker). Retryable; a still-valid cached token is served
  instead. Its ``reason`` says which, and :data:`BROKER_FAULTS` says which of those mean the
  broker *service* is unhealthy (only those trip the circuit breaker).
* :class:`BrokerRequestError` -- the broker answered and refused (RFC 6749 §5.2, RFC 6750
  §3.1). Never retried, never answered from the cache. The subclasses are also the kernel's
  error types, so ``except PolicyDenied`` or ``except NeedsReauth`` catch them.

:class:`IdTokenError` is the caller's own identity failing, before the broker is asked.
"""

from __future__ import annotations

from enum import StrEnum

from tokenbroker.kernel.errors import (
    BadRequest,
    InvalidCallerToken,
    NeedsReauth,
    PolicyDenied,
    TokenBrokerError,
)


class Unavailability(StrEnum):
    """Why the broker could not give an answer (``BrokerUnavailable.reason``)."""

    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"
    SERVER_ERROR = "server_error"  # 5xx (other than the contract's JSON 503), 408
    RATE_LIMITED = "rate_limited"  # 429
    MALFORMED = "malformed_response"  # a 200 that is not a token answer (proxy page...)
    TEMPORARILY_UNAVAILABLE = "temporarily_unavailable"  # the contract's JSON 503
    CIRCUIT_OPEN = "circuit_open"
    DEADLINE = "deadline_exceeded"
    REFRESH_IN_FLIGHT = "refresh_in_flight"  # waited too long for another caller's refresh
    ID_TOKEN = "id_token_unavailable"  # noqa: S105 - the caller's identity is unavailable


#: Failures that say the broker *service* is unhealthy; these, and only these, trip the breaker.
BROKER_FAULTS = frozenset(
    {
        Unavailability.TIMEOUT,
        Unavailability.UNREACHABLE,
        Unavailability.SERVER_ERROR,
        Unavailability.RATE_LIMITED,
        Unavailability.MALFORMED,
    }
)


class BrokerUnavailable(TokenBrokerError):
    """No token could be obtained for a reason worth retrying later, and no cached token was
    still valid. ``reason`` says why; ``retry_after`` is set when the broker (or the open
    breaker) said how long to wait."""

    code = "broker_unavailable"
    http_status = 503
    default_retryable = True

    def __init__(
        self,
        message: str,
        *,
        reason: Unavailability,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, retryable=True, retry_after=retry_after)
        self.reason = reason
        #: The HTTP status the broker answered with (``None`` when no answer came).
        self.status = status

    @property
    def broker_fault(self) -> bool:
        return self.reason in BROKER_FAULTS

    def __repr__(self) -> str:
        return f"BrokerUnavailable(reason={self.reason.value!r}, status={self.status})"


class BrokerRequestError(TokenBrokerError):
    """The broker answered and refused. Never retried; never answered from the cache.

    ``error`` is the OAuth error code on the wire (RFC 6749 §5.2 / RFC 6750 §3.1), ``status``
    the HTTP status, ``description`` the broker's ``error_description``, scrubbed.
    """

    code = "broker_refused"
    http_status = 502  # to this process's own callers, an upstream refusal is a bad gateway

    def __init__(self, message: str, *, status: int, error: str, description: str = "") -> None:
        super().__init__(message, retryable=False)
        self.status = status
        self.error = error
        self.description = description

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, error={self.error!r})"


class BrokerBadRequest(BadRequest, BrokerRequestError):
    """400 ``invalid_request``: the request is malformed (a bug on the caller's side)."""


class BrokerInvalidToken(InvalidCallerToken, BrokerRequestError):
    """401 ``invalid_token``: the broker rejected the caller's ID token (even a fresh one)."""


class BrokerAccessDenied(PolicyDenied, BrokerRequestError):
    """403 ``access_denied``: the policy does not grant this caller the connection or scopes."""


class BrokerNeedsReauth(NeedsReauth, BrokerRequestError):
    """409 ``needs_reauth``: a human must re-authorise the connection."""


class IdTokenError(TokenBrokerError):
    """The caller's own Google ID token could not be obtained. ``retryable`` when the cause
    is transient (metadata server unreachable); not when it is configuration (no credentials,
    unreadable file, expired static token)."""

    code = "id_token_unavailable"
    http_status = 500
