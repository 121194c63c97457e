"""One root error for the whole library.

Every failure the broker can meet is a :class:`TokenBrokerError`. Each carries:

* ``code`` -- a stable wire code. Provider failures keep their RFC 6749 §5.2 names
  (``invalid_grant``, ``invalid_client``, ...), so logs, events and HTTP answers speak the same
  language as the OAuth servers behind them.
* ``retryable`` -- whether trying the same thing again later can succeed. This single flag
  decides retries everywhere: nothing else inspects exception types to decide.
* ``http_status`` -- how the error maps to an HTTP answer, in the one place that renders them.

Messages never contain credential material: they are built from codes, ids and counts only.
(Modelled on google-auth's ``GoogleAuthError(retryable=...)`` and authlib's per-error classes.)
"""

from __future__ import annotations

from typing import ClassVar

from tokenbroker.kernel.secret import Secret


class TokenBrokerError(Exception):
    """Root of every error raised by tokenbroker."""

    code: ClassVar[str] = "server_error"
    http_status: ClassVar[int] = 500
    default_retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        retryable: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = self.default_retryable if retryable is None else retryable
        #: Seconds the other side asked us to wait (``Retry-After``), when it said so.
        self.retry_after = retry_after
        #: How many attempts were made before this error was final (set by the retry loop).
        self.attempts = 1

    @property
    def failure_class(self) -> str:
        """``transient`` or ``permanent``: the two classes every failure falls into."""
        return "transient" if self.retryable else "permanent"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, retryable={self.retryable})"


# --- configuration and storage -------------------------------------------------------------


class ConfigError(TokenBrokerError):
    """Configuration is missing or malformed. The message names the field or variable."""

    code = "invalid_config"
    http_status = 500


class NotFound(TokenBrokerError):
    code = "not_found"
    http_status = 404


class AlreadyExists(TokenBrokerError):
    code = "already_exists"
    http_status = 409


class VersionConflict(TokenBrokerError):
    """A compare-and-set write lost: someone else wrote a newer version first."""

    code = "version_conflict"
    http_status = 409


class CorruptCredential(TokenBrokerError):
    """A stored credential whose checksum, envelope or version number does not verify.

    Never used and never silently replaced: an operator must look (and re-authorise).
    """

    code = "corrupt_credential"
    http_status = 500


class StoreUnavailable(TokenBrokerError):
    """A backing store could not be reached. Worth retrying."""

    code = "store_unavailable"
    http_status = 503
    default_retryable = True


class InternalError(TokenBrokerError):
    """An unexpected exception (a bug, or a value no rule here foresaw) while refreshing one
    connection, turned into a value so that it stays with that connection.

    Its own failure class, ``internal``: alerted (logged with its traceback), retried with
    backoff on later ticks (the same refresh token may well work once the bug is fixed), and
    never a reason for ``needs_reauth`` -- the provider did not refuse anything.
    """

    code = "internal_error"
    http_status = 500
    default_retryable = True

    @property
    def failure_class(self) -> str:
        return "internal"


# --- the issuer's answers to callers (RFC 6749 §5.2 / RFC 6750 §3.1 names) ----------------------


class BadRequest(TokenBrokerError):
    """The caller's request is malformed (HTTP 400 ``invalid_request``)."""

    code = "invalid_request"
    http_status = 400


class MethodNotAllowed(TokenBrokerError):
    """The route exists but not for this HTTP method (HTTP 405 with ``Allow``)."""

    code = "invalid_request"
    http_status = 405

    def __init__(self, allowed: tuple[str, ...]) -> None:
        super().__init__(f"use {allowed[0]}")
        self.allowed = allowed


class InvalidCallerToken(TokenBrokerError):
    """The caller's ID token is missing, malformed, forged, expired or for another audience.

    HTTP 401 with ``WWW-Authenticate: Bearer error="invalid_token"`` (RFC 6750 §3.1). The
    message says which check failed, never the token.
    """

    code = "invalid_token"
    http_status = 401


class PolicyDenied(TokenBrokerError):
    """The policy does not allow this caller this connection, scope, lifetime or route.

    HTTP 403. Unknown connections are denied the same way, so callers cannot enumerate them.
    """

    code = "access_denied"
    http_status = 403


class NeedsReauth(TokenBrokerError):
    """The connection needs a human to re-authorise it (HTTP 409 ``needs_reauth``)."""

    code = "needs_reauth"
    http_status = 409


class CredentialUnavailable(TokenBrokerError):
    """The credential cannot be served right now; try again (HTTP 503 with Retry-After)."""

    code = "temporarily_unavailable"
    http_status = 503
    default_retryable = True


# --- provider (token endpoint) failures, RFC 6749 §5.2 ------------------------------------------


class ProviderError(TokenBrokerError):
    """The token endpoint refused or failed a grant."""

    code = "provider_error"
    http_status = 502

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, retryable=retryable, retry_after=retry_after)
        #: HTTP status the provider answered with (``None`` when no answer came).
        self.status = status


class InvalidRequest(ProviderError):
    code = "invalid_request"


class InvalidClient(ProviderError):
    code = "invalid_client"


class InvalidGrant(ProviderError):
    """The refresh token or assertion is invalid, expired or revoked (RFC 6749 §5.2)."""

    code = "invalid_grant"


class UnauthorizedClient(ProviderError):
    code = "unauthorized_client"


class UnsupportedGrantType(ProviderError):
    code = "unsupported_grant_type"


class InvalidScope(ProviderError):
    code = "invalid_scope"


class AccessDenied(ProviderError):
    code = "access_denied"


class UnknownProviderError(ProviderError):
    """An error code the RFC does not define. Treated as permanent: a human should look."""

    code = "unknown_provider_error"


class TemporarilyUnavailable(ProviderError):
    """RFC 6749 §4.1.2.1 ``temporarily_unavailable``, HTTP 503 or 429."""

    code = "temporarily_unavailable"
    default_retryable = True


class ProviderServerError(ProviderError):
    """A 5xx answer or RFC 6749 ``server_error``."""

    code = "server_error"
    default_retryable = True


class TransportError(ProviderError):
    """No answer: timeout, refused or reset connection, DNS failure.

    ``request_sent`` says whether the request may have reached the server: ``False`` only
    when it certainly did not (the connection was never established). A request that may
    have arrived may also have been answered -- and for a provider that rotates refresh
    tokens, have consumed the token sent -- so its outcome is unknown, never a plain retry.
    """

    code = "transport_error"
    default_retryable = True

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
        request_sent: bool = True,
    ) -> None:
        super().__init__(message, status=status, retryable=retryable, retry_after=retry_after)
        self.request_sent = request_sent


class MalformedResponse(ProviderError):
    """A 200 that is not a usable token response (not JSON, no ``access_token``...).

    Retryable: it is most often a proxy or maintenance page. It is never stored as a token
    response -- but when it carries a ``refresh_token`` (a provider that rotated and then
    answered something we reject), that token is the only one left alive and the refresher
    keeps it (``refresh_token``).
    """

    code = "malformed_response"
    default_retryable = True

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
        refresh_token: Secret | None = None,
    ) -> None:
        super().__init__(message, status=status, retryable=retryable, retry_after=retry_after)
        #: A refresh token that came in the rejected answer, to be salvaged.
        self.refresh_token = refresh_token


OAUTH_ERRORS: dict[str, type[ProviderError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        InvalidClient,
        InvalidGrant,
        UnauthorizedClient,
        UnsupportedGrantType,
        InvalidScope,
        AccessDenied,
        TemporarilyUnavailable,
        ProviderServerError,
    )
}
