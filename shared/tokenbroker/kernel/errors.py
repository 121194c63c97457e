"""One root error for the whole library.

Every failure the broker can meet is a :class:`TokenBrokerError`. Each carries:

* ``code`` -- a stable wire code. Provider failures keep their RFC 6749 §5.2 names
  (``invalid_grant``, ``invalid_client``, ...), so logs, events and HTTP answers speak the same
  language as the OAuth servers behind them.
* ``retryable`` -- whether trying the same thing again later can succeed. This single flag
  decides retries everywhere: nothing else inspects exception types to decide.
* ``http_status`` -- how the error maps to an HTTP answer, in the one place that renders them.
* ``ambiguous`` -- whether the other side may have *acted* on the request although no usable
  answer came back (a timeout after sending, a 200 that is not a token response). For a
  rotating refresh token this is the difference between "try again" and "the token may be
  spent": retrying with the same token may be reuse, which such providers punish by revoking
  the grant (RFC 9700 §4.14.2). ``retryable`` still says whether trying again can work at all.

Messages never contain credential material: they are built from codes, ids and counts only.
(Modelled on google-auth's ``GoogleAuthError(retryable=...)`` and authlib's per-error classes.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from tokenbroker.kernel.secret import Secret


class TokenBrokerError(Exception):
    """Root of every error raised by tokenbroker."""

    code: ClassVar[str] = "server_error"
    http_status: ClassVar[int] = 500
    default_retryable: ClassVar[bool] = False
    default_ambiguous: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        retryable: bool | None = None,
        retry_after: float | None = None,
        ambiguous: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = self.default_retryable if retryable is None else retryable
        #: The other side may have acted on the request (see the module docstring).
        self.ambiguous = self.default_ambiguous if ambiguous is None else ambiguous
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


class PermissionDenied(ConfigError):
    """The deployment's identity may not do this (an IAM refusal): fixed by a role, never by
    retrying. The message names the operation."""


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
    """A backing store could not be reached, or cannot take the work right now (busy, locked
    by another process, disk full). Worth retrying."""

    code = "store_unavailable"
    http_status = 503
    default_retryable = True


class StoreFault(StoreUnavailable):
    """A backing store answered, but cannot do the work until someone acts on it: its file is
    read-only or corrupt, permission is denied, its schema is damaged.

    Not retryable: the same call fails the same way until an operator fixes the store. A kind
    of :class:`StoreUnavailable` (as the cloud adapters' non-retryable store errors are), so
    whatever stops work on an unavailable store -- nothing whose answer must be stored, such as
    a rotating refresh token, may be presented -- stops it here too.
    """

    code = "store_fault"
    http_status = 500
    default_retryable = False


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


class ScopeNotHeld(TokenBrokerError):
    """A scope asked for that the connection does not hold (HTTP 400 ``invalid_scope``, RFC
    6749 §5.2: "exceeds the scope granted by the resource owner"): the caller's error, found
    before anything is sent, or said by the provider of a narrowing refresh."""

    code = "invalid_scope"
    http_status = 400


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


# --- connecting an account: the authorization-code flow (RFC 6749 §4.1) ----------------------


class InvalidAuthorizationState(TokenBrokerError):
    """A callback whose ``state`` is unknown, already used, expired, or bound to another
    connection or operator (RFC 6749 §10.12, RFC 9700 §4.7): refused before anything is sent
    to the provider. ``reason`` is one of ``unknown`` (never issued, or already used: a
    session is taken out on first presentation), ``expired``, ``other_connection``,
    ``other_operator``, ``malformed``."""

    code = "invalid_state"
    http_status = 400

    def __init__(self, message: str, *, reason: str = "unknown") -> None:
        super().__init__(message)
        self.reason = reason


class AuthorizationTimedOut(TokenBrokerError):
    """No callback came back before the flow's deadline (the account holder did not finish,
    or the browser could not reach the loopback address). Nothing was stored."""

    code = "authorization_timeout"
    http_status = 504


class InsufficientGrant(TokenBrokerError):
    """The provider granted fewer scopes than the connection declares (a user unticked one
    on a granular consent screen). Refused unless the operator accepts the narrower grant:
    a connection that silently lacks a scope fails later, at the API, far from the cause."""

    code = "insufficient_scope"  # RFC 6750 §3.1's name for "needs more scope"
    http_status = 403

    def __init__(self, message: str, *, missing: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.missing = missing


# --- provider (token endpoint) failures, RFC 6749 §5.2 ------------------------------------------


class ProviderError(TokenBrokerError):
    """The token endpoint refused or failed a grant.

    ``refresh_token`` is set when an unusable answer nevertheless carried a new refresh token
    (a 200 without an access token, with ``expires_in: 0``, with an error body...). A rotating
    provider has then probably retired the old one (RFC 6749 §6), so the new one is the only
    copy of the grant: the caller should keep it even though the answer failed.
    """

    code = "provider_error"
    http_status = 502

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
        ambiguous: bool | None = None,
        refresh_token: Secret | None = None,
    ) -> None:
        super().__init__(message, retryable=retryable, retry_after=retry_after, ambiguous=ambiguous)
        #: HTTP status the provider answered with (``None`` when no answer came).
        self.status = status
        #: A new refresh token the failed answer carried (never printed: it is a ``Secret``).
        self.refresh_token = refresh_token


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

    Ambiguous unless the transport knows the request never left (refused connection, DNS
    failure: it passes ``ambiguous=False``): a timeout or a reset after sending may have been
    processed by the provider.
    """

    code = "transport_error"
    default_retryable = True
    default_ambiguous = True


class MalformedResponse(ProviderError):
    """A 200 that is not a usable token response (not JSON, no ``access_token``,
    ``expires_in: 0``, an unusable ``refresh_token``...).

    Retryable: it is most often a proxy or maintenance page. It is never stored. Ambiguous: a
    success status says the request was processed, so a rotating refresh token may be spent
    (a new one it carried is on ``refresh_token``).
    """

    code = "malformed_response"
    default_retryable = True
    default_ambiguous = True


# --- the device authorization grant's polling answers (RFC 8628 §3.5) -------------------------


class AuthorizationPending(ProviderError):
    """RFC 8628 §3.5 ``authorization_pending``: the user has not finished yet; poll again
    after the interval. Only the device-code grant reads this code."""

    code = "authorization_pending"
    default_retryable = True


class SlowDown(ProviderError):
    """RFC 8628 §3.5 ``slow_down``: still pending, and the interval grows by 5 s."""

    code = "slow_down"
    default_retryable = True


class ExpiredToken(ProviderError):
    """RFC 8628 §3.5 ``expired_token``: the device code expired before the user finished;
    start again."""

    code = "expired_token"


#: Codes only the device-code grant's answers carry (elsewhere they are unknown codes).
DEVICE_GRANT_ERRORS: dict[str, type[ProviderError]] = {
    cls.code: cls for cls in (AuthorizationPending, SlowDown, ExpiredToken)
}


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
