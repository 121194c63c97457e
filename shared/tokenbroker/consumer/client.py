"""The consumer client: how a function or service gets a token from the issuer.

It obtains the caller's Google ID token, calls ``POST {base_url}/token``, caches the answer
until its ``refresh_after`` hint, and keeps serving the last good token until its hard expiry
while the broker is unavailable. The layers are kept apart as google-auth keeps credentials,
refresh and transport apart:

* :class:`BrokerToken` -- what the issuer handed out; the value is a :class:`Secret`.
* ID-token sources -- :func:`google_id_token_source` (metadata server or a service-account
  key, through google-auth) and :func:`static_id_token_source` for local runs.
* :class:`CircuitBreaker` -- closed / open / half-open, shared by all keys of one client.
* ``_Core`` -- everything that decides (freshness, fallback, errors, back-off), without I/O.
* :class:`BrokerClient` (threads) and :class:`AsyncBrokerClient` (asyncio) -- the I/O loops
  over the core, on httpx.

Freshness follows google-auth's ``TokenState``: *fresh* (before ``refresh_after`` and at least
``min_ttl_seconds`` from expiry) is served with no request; *stale* (past ``refresh_after``,
still before ``expires_at - expiry_margin_seconds``) triggers a refresh, and is served when the
refresh fails for a reason worth retrying; *invalid* is never served.

Two decisions worth knowing (see docs/client.md):

* A refusal from the broker (400/401/403/409) is final: it is raised at once, never retried,
  and it **evicts** the cached token for that key, so a revoked permission takes effect at the
  next refresh even if the broker then goes down. Only unavailability (timeouts, refused
  connections, 5xx, 429) falls back to the cached token.
* The breaker tracks the health of the broker service, not of one connection: a JSON
  ``503 temporarily_unavailable`` (the issuer's deliberate answer that *one* credential
  cannot be served right now) is retried and honoured (``Retry-After``) but does not open the
  breaker for the other connections.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

from tokenbroker.kernel.clock import Clock, SystemClock, isoformat, parse_iso
from tokenbroker.kernel.errors import (
    BadRequest,
    ConfigError,
    InvalidCallerToken,
    NeedsReauth,
    PolicyDenied,
    TokenBrokerError,
)
from tokenbroker.kernel.http import parse_retry_after
from tokenbroker.kernel.log import get_logger
from tokenbroker.kernel.redact import scrub
from tokenbroker.kernel.retry import RetryPolicy
from tokenbroker.kernel.secret import Secret

if TYPE_CHECKING:
    import httpx

ENV_ID_TOKEN = "TOKENBROKER_ID_TOKEN"  # noqa: S105 - a variable name
"""A Google ID token to present to the broker (local runs; it expires after one hour)."""
ENV_ID_TOKEN_FILE = "TOKENBROKER_ID_TOKEN_FILE"  # noqa: S105 - a variable name
"""A file holding the ID token, re-read on every broker request (local runs)."""

#: Retries for a caller that is waiting: short, because the caller is usually serving a request.
DEFAULT_RETRY = RetryPolicy(attempts=3, base_delay=0.2, max_delay=2.0, max_retry_after=5.0)
MAX_RESPONSE_BYTES = 64 * 1024  # a token answer is well under 10 KB
USER_AGENT = "tokenbroker-client"
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


# --- errors ---------------------------------------------------------------------------------


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
    the HTTP status. The subclasses below are also the library's own error types, so
    ``except PolicyDenied`` or ``except NeedsReauth`` catch them.
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


# --- the token ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerToken:
    """A token the broker issued. Times are in this process's clock (see ``_decode_token``).

    ``repr()`` shows the token's fingerprint, never its value.
    """

    access_token: Secret
    token_type: str
    expires_at: datetime
    refresh_after: datetime
    scope: tuple[str, ...]
    connection: str

    def header(self) -> dict[str, str]:
        """``{"Authorization": "Bearer ..."}`` (RFC 6750 §2.1): the one place the value is
        revealed."""
        return {"Authorization": f"{self.token_type} {self.access_token.reveal()}"}

    def expires_in(self, now: datetime) -> float:
        return (self.expires_at - now).total_seconds()


# --- the caller's identity: Google ID tokens ------------------------------------------------


class IdTokenSource(Protocol):
    """Returns a Google-signed ID token whose ``aud`` is ``audience``.

    Called once per broker request (a few per hour per key): implementations cache.
    """

    def __call__(self, audience: str, /) -> str: ...


@runtime_checkable
class RefreshableIdTokenSource(Protocol):
    """A source with a cache that can be dropped, after the broker rejected its token."""

    def __call__(self, audience: str, /) -> str: ...

    def invalidate(self, audience: str) -> None: ...


class GoogleIdTokenSource:
    """ID tokens from google-auth, per audience, cached until ``refresh_margin_seconds``
    before they expire.

    ``google.oauth2.id_token.fetch_id_token_credentials`` looks, in order, at a
    service-account key named by ``GOOGLE_APPLICATION_CREDENTIALS`` (or an impersonated
    service account) and at the metadata server (Cloud Run, Cloud Functions, GCE), as
    https://google.aip.dev/auth/4110 prescribes. User credentials from ``gcloud auth
    application-default login`` cannot mint ID tokens for an arbitrary audience: use
    :func:`static_id_token_source` locally.

    google-auth (with its ``requests`` transport) is imported on first use, not at import.
    Calls are serialised by a lock, so concurrent callers trigger one fetch.
    """

    def __init__(
        self, *, clock: Clock | None = None, refresh_margin_seconds: float = 300.0
    ) -> None:
        self._clock = clock or SystemClock()
        self._margin = timedelta(seconds=refresh_margin_seconds)
        self._lock = threading.Lock()
        self._credentials: dict[str, Any] = {}
        self._request: Any = None

    def __call__(self, audience: str, /) -> str:
        with self._lock:
            credentials = self._credentials.get(audience)
            if credentials is not None and self._still_good(credentials):
                return str(credentials.token)
            try:
                import google.auth.transport.requests  # noqa: PLC0415 - heavy, lazily
                from google.auth import exceptions  # noqa: PLC0415
                from google.oauth2 import id_token  # noqa: PLC0415
            except ImportError:
                raise IdTokenError(
                    "google-auth with its requests transport is needed for Google ID tokens "
                    "(pip install 'google-auth[requests]'), or set " + ENV_ID_TOKEN
                ) from None
            try:
                if self._request is None:
                    self._request = google.auth.transport.requests.Request()
                if credentials is None:
                    credentials = id_token.fetch_id_token_credentials(  # type: ignore[no-untyped-call]  # untyped in google-auth
                        audience, request=self._request
                    )
                    self._credentials[audience] = credentials
                credentials.refresh(self._request)
            except exceptions.GoogleAuthError as exc:
                raise _google_auth_error(exc) from None
            if not credentials.token:
                raise IdTokenError("google-auth returned no ID token", retryable=True)
            return str(credentials.token)

    def invalidate(self, audience: str) -> None:
        with self._lock:
            self._credentials.pop(audience, None)

    def _still_good(self, credentials: Any) -> bool:
        expiry = credentials.expiry  # google-auth keeps naive UTC datetimes
        if not credentials.token or expiry is None:
            return False
        if expiry.tzinfo is None:
            expiry = expiry.replace(tzinfo=UTC)
        return bool(self._clock.now() < expiry - self._margin)


def _google_auth_error(exc: Exception) -> IdTokenError:
    """google-auth's failures as an :class:`IdTokenError` with the right ``retryable``.

    The metadata server's network failures arrive as ``TransportError`` or as a
    ``RefreshError`` wrapping one (``compute_engine.credentials``); missing credentials as
    ``DefaultCredentialsError``, which no retry can fix.
    """
    from google.auth import exceptions  # noqa: PLC0415

    if isinstance(exc, exceptions.DefaultCredentialsError):
        retryable = False
    elif isinstance(exc, exceptions.TransportError):
        retryable = True
    else:
        causes = [*exc.args, exc.__cause__]
        retryable = bool(getattr(exc, "retryable", False)) or any(
            isinstance(cause, exceptions.TransportError) for cause in causes
        )
    detail = scrub(str(exc))[:300]
    return IdTokenError(
        f"could not obtain a Google ID token ({type(exc).__name__}): {detail}",
        retryable=retryable,
    )


class StaticIdTokenSource:
    """A fixed ID token, or one read from a file on every call, for local runs.

    Get one with ``gcloud auth print-identity-token --audiences=URL
    --impersonate-service-account=SA`` (the audience must be the broker's URL). An expired
    token (when it is a readable JWT) is refused here with a message that says so, instead of
    a 401 from the broker.
    """

    def __init__(
        self,
        token: str | Secret | None = None,
        *,
        path: str | Path | None = None,
        clock: Clock | None = None,
    ) -> None:
        if (token is None) == (path is None):
            raise ConfigError("static_id_token_source: give exactly one of token or path")
        self._token = Secret(token) if isinstance(token, str) else token
        self._path = Path(path) if path is not None else None
        self._clock = clock or SystemClock()

    def __call__(self, audience: str, /) -> str:  # noqa: ARG002 - the token names its audience
        if self._path is not None:
            try:
                value = self._path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise IdTokenError(
                    f"cannot read the ID token file {self._path}: {type(exc).__name__}"
                ) from None
        else:
            assert self._token is not None  # noqa: S101 - guaranteed by __init__
            value = self._token.reveal().strip()
        if not value:
            raise IdTokenError("the static ID token is empty")
        expiry = jwt_expiry(value)
        if expiry is not None and self._clock.now() >= expiry:
            raise IdTokenError(
                f"the static ID token expired at {isoformat(expiry)}; get a new one "
                "(gcloud auth print-identity-token)"
            )
        return value

    def __repr__(self) -> str:
        where = f"path={str(self._path)!r}" if self._path is not None else f"token={self._token!r}"
        return f"StaticIdTokenSource({where})"


def jwt_expiry(token: str) -> datetime | None:
    """The ``exp`` claim of a compact JWT (RFC 7519 §4.1.4), *unverified*: only used to
    decide when to fetch a new one. ``None`` when the value is not a readable JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        exp = payload["exp"]
    except (ValueError, TypeError, KeyError):
        return None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return datetime.fromtimestamp(exp, UTC)


def google_id_token_source(
    *, clock: Clock | None = None, refresh_margin_seconds: float = 300.0
) -> GoogleIdTokenSource:
    """ID tokens from the metadata server (in the cloud) or a service-account key (ADC)."""
    return GoogleIdTokenSource(clock=clock, refresh_margin_seconds=refresh_margin_seconds)


def static_id_token_source(
    token: str | Secret | None = None, *, path: str | Path | None = None
) -> StaticIdTokenSource:
    """A fixed ID token, or a file re-read on every call (refresh it from a shell loop)."""
    return StaticIdTokenSource(token, path=path)


def default_id_token_source(
    environ: Mapping[str, str] | None = None, *, clock: Clock | None = None
) -> IdTokenSource:
    """``TOKENBROKER_ID_TOKEN``, then ``TOKENBROKER_ID_TOKEN_FILE``, then google-auth.

    Called once, when a client is built (cold start), never at import.
    """
    env = os.environ if environ is None else environ
    if env.get(ENV_ID_TOKEN):
        return StaticIdTokenSource(env[ENV_ID_TOKEN], clock=clock)
    if env.get(ENV_ID_TOKEN_FILE):
        return StaticIdTokenSource(path=env[ENV_ID_TOKEN_FILE], clock=clock)
    return GoogleIdTokenSource(clock=clock)


# --- circuit breaker ------------------------------------------------------------------------


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Stops calling a broker that keeps failing (Nygard, *Release It!*, "Circuit Breaker").

    Closed: requests flow; ``threshold`` consecutive broker faults open it. Open: no request
    is sent for ``reset_seconds``. Half-open: exactly one trial request; success closes the
    breaker, a fault opens it again. Any answer that is not a broker fault (a token, a
    refusal, a per-connection 503) counts as success: the service is up.

    Thread-safe; the critical sections never block, so asyncio code uses it directly.
    """

    def __init__(
        self,
        threshold: int,
        reset_seconds: float,
        clock: Clock,
        on_change: Callable[[BreakerState, BreakerState, int], None] | None = None,
    ) -> None:
        self.threshold = threshold
        self.reset_seconds = reset_seconds
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial = False

    @property
    def state(self) -> BreakerState:
        return self._state

    def allow(self) -> bool:
        """Whether a request may be sent now. A ``True`` must be followed by exactly one of
        :meth:`succeeded`, :meth:`failed` or :meth:`abandoned`."""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return True
            if self._state is BreakerState.OPEN:
                if self._clock.monotonic() - self._opened_at < self.reset_seconds:
                    return False
                self._move(BreakerState.HALF_OPEN)
            if self._trial:
                return False
            self._trial = True
            return True

    def retry_in(self) -> float:
        """Seconds until the open breaker lets a trial through (0 when not open)."""
        with self._lock:
            if self._state is not BreakerState.OPEN:
                return 0.0
            elapsed = self._clock.monotonic() - self._opened_at
            return max(0.0, self.reset_seconds - elapsed)

    def succeeded(self) -> None:
        with self._lock:
            self._failures = 0
            self._trial = False
            if self._state is not BreakerState.CLOSED:
                self._move(BreakerState.CLOSED)

    def failed(self) -> None:
        with self._lock:
            self._failures += 1
            self._trial = False
            if self._state is BreakerState.HALF_OPEN or (
                self._state is BreakerState.CLOSED and self._failures >= self.threshold
            ):
                self._opened_at = self._clock.monotonic()
                self._move(BreakerState.OPEN)

    def abandoned(self) -> None:
        """The admitted request ended without an outcome (cancelled, or a local bug)."""
        with self._lock:
            self._trial = False

    def _move(self, state: BreakerState) -> None:
        previous, self._state = self._state, state
        if self._on_change is not None:
            self._on_change(previous, state, self._failures)


# --- the core: decisions without I/O --------------------------------------------------------


@dataclass(frozen=True)
class _Key:
    connection: str
    scopes: tuple[str, ...]


class _Outage(StrEnum):
    NONE = "none"
    SERVING_CACHED = "serving_cached"
    NOTHING_VALID = "nothing_valid"


@dataclass
class _Slot:
    """What the client knows about one (connection, scopes). Mutated under its key's lock."""

    token: BrokerToken | None = None
    failures: int = 0  # consecutive failed refreshes
    retry_at: float = 0.0  # monotonic; while serving the cached token, no attempt before this
    outage: _Outage = _Outage.NONE
    fetches: int = 0  # completed fetches, so a waiter knows one finished while it waited
    last_failure: BrokerUnavailable | None = None  # how the last fetch failed, if it did
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes
    retry_after: str | None = None


def _check_base_url(base_url: str) -> str:
    """``https://...``, or ``http://`` to a loopback address only: the request carries the
    caller's ID token, a bearer credential (RFC 6750 §5.3: always TLS)."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(f"base_url must be an http(s) URL, got {base_url!r}")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ConfigError("base_url must use https (http is allowed for loopback hosts only)")
    if parts.query or parts.fragment:
        raise ConfigError("base_url must not have a query or fragment")
    return base_url.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _malformed(detail: str, status: int = 200) -> BrokerUnavailable:
    return BrokerUnavailable(
        f"the broker's answer is not a token response: {detail}",
        reason=Unavailability.MALFORMED,
        status=status,
    )


class _Core:
    """Configuration, cache, breaker and every decision; the clients add the I/O."""

    def __init__(
        self,
        base_url: str,
        *,
        audience: str | None,
        id_token_source: IdTokenSource | None,
        clock: Clock | None,
        timeout: float,
        deadline_seconds: float,
        retry: RetryPolicy | None,
        breaker_threshold: int,
        breaker_reset_seconds: float,
        min_ttl_seconds: int,
        expiry_margin_seconds: float,
        rng: random.Random | None,
    ) -> None:
        base = _check_base_url(base_url)
        if timeout <= 0 or deadline_seconds <= 0:
            raise ConfigError("timeout and deadline_seconds must be positive")
        if breaker_threshold < 1 or breaker_reset_seconds <= 0:
            raise ConfigError("breaker_threshold must be >= 1, breaker_reset_seconds > 0")
        if not 0 <= min_ttl_seconds <= 43_200:
            raise ConfigError("min_ttl_seconds must be between 0 and 43200")
        if expiry_margin_seconds < 0:
            raise ConfigError("expiry_margin_seconds must not be negative")
        self.url = base + "/token"
        # Cloud Run checks that ``aud`` is the service URL; by default that is base_url.
        self.audience = audience or base
        self.clock: Clock = clock or SystemClock()
        self.source = id_token_source or default_id_token_source(clock=self.clock)
        self.timeout = timeout
        self.deadline_seconds = deadline_seconds
        self.retry = retry or DEFAULT_RETRY
        self.min_ttl = timedelta(seconds=min_ttl_seconds)
        self.min_ttl_seconds = min_ttl_seconds
        self.margin = timedelta(seconds=expiry_margin_seconds)
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self.log = get_logger(component="broker-client")
        self.breaker = CircuitBreaker(
            breaker_threshold, breaker_reset_seconds, self.clock, on_change=self._breaker_moved
        )
        self._slots: dict[_Key, _Slot] = {}
        self._slots_lock = threading.Lock()

    # -- keys and cache ------------------------------------------------------------------------

    def key(self, connection: str, scopes: Sequence[str]) -> _Key:
        if not isinstance(connection, str) or not connection:
            raise ValueError("connection must be a non-empty string")
        if isinstance(scopes, str):
            raise TypeError("scopes must be a sequence of scope strings, not one string")
        return _Key(connection, tuple(sorted(set(scopes))))

    def slot(self, key: _Key) -> _Slot:
        with self._slots_lock:
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = _Slot()
            return slot

    def fresh(self, slot: _Slot) -> BrokerToken | None:
        """The cached token if it may be served without asking the broker."""
        token = slot.token
        if token is None:
            return None
        now = self.clock.now()
        if now < token.refresh_after and now < token.expires_at - self.min_ttl:
            return token
        return None

    def usable(self, slot: _Slot) -> BrokerToken | None:
        """The cached token if it is still valid (with the safety margin), fresh or not."""
        token = slot.token
        if token is not None and self.clock.now() < token.expires_at - self.margin:
            return token
        return None

    def plan(
        self, slot: _Slot, waited_for: int | None = None
    ) -> tuple[BrokerToken | None, BrokerToken | None]:
        """Under the key's lock: ``(answer, None)`` to answer without a request, or
        ``(None, fallback)`` to fetch, where ``fallback`` is served if the fetch is
        unavailable.

        ``waited_for`` is ``slot.fetches`` as a caller saw it before it waited for the lock:
        if the fetch it waited for failed, that failure is its answer too (single flight for
        failures as for tokens: ten waiters do not retry an unavailable broker ten times).
        """
        fresh = self.fresh(slot)
        if fresh is not None:
            return fresh, None
        fallback = self.usable(slot)
        if fallback is not None and self.clock.monotonic() < slot.retry_at:
            return fallback, None  # backing off after a failed refresh: no request
        failure = slot.last_failure
        if waited_for is not None and slot.fetches != waited_for and failure is not None:
            raise BrokerUnavailable(
                f"the refresh this call waited for failed: {failure.message}",
                reason=failure.reason,
                status=failure.status,
                retry_after=failure.retry_after,
            )
        return None, fallback

    def succeeded(self, key: _Key, slot: _Slot, token: BrokerToken, attempts: int) -> None:
        if slot.outage is not _Outage.NONE:
            self.log.info(
                "broker available again; token refreshed",
                connection=key.connection,
                scopes=list(key.scopes),
                failed_refreshes=slot.failures,
            )
        slot.token = token
        slot.failures = 0
        slot.retry_at = 0.0
        slot.outage = _Outage.NONE
        slot.fetches += 1
        slot.last_failure = None
        self.log.debug(
            "token fetched from the broker",
            connection=key.connection,
            scopes=list(key.scopes),
            expires_at=isoformat(token.expires_at),
            refresh_after=isoformat(token.refresh_after),
            attempts=attempts,
        )

    def failed(self, key: _Key, slot: _Slot, error: TokenBrokerError) -> BrokerToken:
        """Settle a failed fetch: the cached token to serve (if it is still valid now, after
        the attempts), or the error to raise."""
        slot.fetches += 1
        slot.last_failure = None
        if not error.retryable and not isinstance(error, BrokerRequestError):
            raise error  # our own configuration (the ID token): say so, change nothing
        if not error.retryable:
            # A refusal is the broker's word on this key: evict, so that an outage right after
            # a revoked permission cannot bring the old token back.
            slot.token = None
            slot.failures = 0
            slot.retry_at = 0.0
            slot.outage = _Outage.NONE
            self.log.info(
                "broker refused the token request",
                connection=key.connection,
                scopes=list(key.scopes),
                error=error.code,
                status=getattr(error, "status", None),
            )
            raise error
        slot.failures += 1
        fallback = self.usable(slot)
        reason = error.reason.value if isinstance(error, BrokerUnavailable) else error.code
        if fallback is not None:
            slot.retry_at = self.clock.monotonic() + self._cooldown(slot.failures, error)
            if slot.outage is not _Outage.SERVING_CACHED:
                slot.outage = _Outage.SERVING_CACHED
                self.log.warning(
                    "broker unavailable; serving the cached token until it expires",
                    connection=key.connection,
                    scopes=list(key.scopes),
                    reason=reason,
                    expires_at=isoformat(fallback.expires_at),
                )
            return fallback
        if slot.outage is not _Outage.NOTHING_VALID:
            self.log.warning(
                "broker unavailable and no valid cached token",
                connection=key.connection,
                scopes=list(key.scopes),
                reason=reason,
                cached_expired=slot.token is not None,
            )
            slot.outage = _Outage.NOTHING_VALID
        slot.token = None
        if not isinstance(error, BrokerUnavailable):
            error = BrokerUnavailable(f"no token: {error.message}", reason=Unavailability.ID_TOKEN)
        slot.last_failure = error
        raise error

    def _cooldown(self, failures: int, error: TokenBrokerError) -> float:
        """How long to keep serving the cached token before the next attempt for this key:
        jittered exponential back-off, at least what the broker or the breaker asked for."""
        policy = self.retry
        backoff = min(policy.max_delay, policy.base_delay * 2.0 ** min(failures - 1, 16))
        wait = backoff * self.rng.uniform(0.5, 1.0)
        return max(wait, error.retry_after or 0.0)

    # -- one attempt ---------------------------------------------------------------------------

    def id_token(self, *, refresh: bool) -> str:
        if refresh and isinstance(self.source, RefreshableIdTokenSource):
            self.source.invalidate(self.audience)
        try:
            return self.source(self.audience)
        except IdTokenError as error:
            if not error.retryable:
                raise
            raise BrokerUnavailable(
                f"ID token unavailable: {error.message}", reason=Unavailability.ID_TOKEN
            ) from error

    def budget(self, deadline: float) -> float:
        """This attempt's HTTP timeout: the configured one, cut to what the deadline leaves."""
        remaining = deadline - self.clock.monotonic()
        if remaining <= 0:
            raise BrokerUnavailable("per-call deadline exceeded", reason=Unavailability.DEADLINE)
        return min(self.timeout, remaining)

    def admit(self) -> None:
        if not self.breaker.allow():
            wait = self.breaker.retry_in()
            raise BrokerUnavailable(
                f"circuit breaker open; next trial in {wait:.1f}s",
                reason=Unavailability.CIRCUIT_OPEN,
                retry_after=wait or None,
            )

    def settle(self, error: BaseException | None) -> None:
        """Tell the breaker how an admitted request ended."""
        if error is None:
            self.breaker.succeeded()
        elif isinstance(error, BrokerUnavailable):
            if error.broker_fault:
                self.breaker.failed()
            else:
                self.breaker.succeeded()
        elif isinstance(error, TokenBrokerError):
            self.breaker.succeeded()  # a refusal: the service is up
        else:
            self.breaker.abandoned()

    def body(self, key: _Key) -> bytes:
        payload: dict[str, Any] = {"connection": key.connection}
        if key.scopes:
            payload["scopes"] = list(key.scopes)
        payload["min_ttl_seconds"] = self.min_ttl_seconds
        return json.dumps(payload).encode()

    def headers(self, id_token: str) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {id_token}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }

    def decode(self, reply: _Reply, key: _Key) -> BrokerToken:
        """The broker's answer as a token, or the typed error it stands for."""
        if reply.status == 200:
            return _decode_token(reply.body, key, self.clock.now())
        raise _error_for(reply)

    def next_wait(self, attempt: int, error: TokenBrokerError, deadline: float) -> float | None:
        """Seconds to wait before another attempt, or ``None`` to give up now."""
        if isinstance(error, BrokerUnavailable) and error.reason in (
            Unavailability.CIRCUIT_OPEN,
            Unavailability.DEADLINE,
        ):
            return None
        wait = self.retry.delay(attempt, error, self.rng)
        if wait is None or self.clock.monotonic() + wait >= deadline:
            return None
        return wait

    def retrying(self, key: _Key, attempt: int, error: TokenBrokerError, wait: float) -> None:
        self.log.debug(
            "broker request failed; retrying",
            connection=key.connection,
            attempt=attempt,
            reason=error.reason.value if isinstance(error, BrokerUnavailable) else error.code,
            wait_seconds=round(wait, 3),
        )

    def _breaker_moved(self, previous: BreakerState, state: BreakerState, failures: int) -> None:
        # One warning per outage: a failed half-open trial re-opens the breaker quietly.
        if state is BreakerState.OPEN and previous is BreakerState.CLOSED:
            self.log.warning(
                "circuit breaker open: no requests to the broker for a while",
                previous=previous.value,
                consecutive_failures=failures,
                reset_seconds=self.breaker.reset_seconds,
            )
        elif state is BreakerState.CLOSED:
            self.log.info("circuit breaker closed: the broker answers again")
        else:
            self.log.debug("circuit breaker moved", state=state.value, failures=failures)


def _error_for(reply: _Reply) -> TokenBrokerError:
    """An error answer as an exception (RFC 6749 §5.2 body, RFC 6750 §3.1 for 401)."""
    status = reply.status
    data = _json_object(reply.body) or {}
    error = data.get("error") if isinstance(data.get("error"), str) else None
    raw_description = data.get("error_description")
    description = scrub(raw_description)[:300] if isinstance(raw_description, str) else ""
    retry_after = parse_retry_after(reply.retry_after)
    said = f"{error}: {description}" if error else f"HTTP {status}"
    if status == 503 and error == "temporarily_unavailable":
        return BrokerUnavailable(
            f"broker: {said}",
            reason=Unavailability.TEMPORARILY_UNAVAILABLE,
            status=status,
            retry_after=retry_after,
        )
    if status == 429:
        return BrokerUnavailable(
            f"broker rate limit: {said}",
            reason=Unavailability.RATE_LIMITED,
            status=status,
            retry_after=retry_after,
        )
    if status >= 500 or status == 408:
        return BrokerUnavailable(
            f"broker failed: {said}",
            reason=Unavailability.SERVER_ERROR,
            status=status,
            retry_after=retry_after,
        )
    refusal: type[BrokerRequestError] = {
        400: BrokerBadRequest,
        401: BrokerInvalidToken,
        403: BrokerAccessDenied,
        409: BrokerNeedsReauth,
    }.get(status, BrokerRequestError)
    return refusal(
        f"broker refused (HTTP {status}) {said}",
        status=status,
        error=error or ("unexpected_status" if refusal is BrokerRequestError else refusal.code),
        description=description,
    )


def _decode_token(body: bytes, key: _Key, received: datetime) -> BrokerToken:
    """A 200 answer as a :class:`BrokerToken`; anything unusable is a retryable
    ``malformed_response`` (most often a proxy or maintenance page), never cached."""
    data = _json_object(body)
    if data is None:
        raise _malformed("not a JSON object")
    access_token = data.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise _malformed("no access_token")
    token_type = data.get("token_type", "Bearer")
    if not isinstance(token_type, str) or not token_type:
        raise _malformed("bad token_type")
    if token_type.lower() == "bearer":
        token_type = "Bearer"  # noqa: S105 - RFC 6750 §4: case-insensitive on the wire
    if data.get("connection", key.connection) != key.connection:
        raise _malformed("the token is for another connection")
    expires_at, refresh_after = _token_times(data, received)
    scope = data.get("scope")
    return BrokerToken(
        access_token=Secret(access_token),
        token_type=token_type,
        expires_at=expires_at,
        refresh_after=refresh_after,
        scope=tuple(scope.split()) if isinstance(scope, str) else key.scopes,
        connection=key.connection,
    )


def _token_times(data: Mapping[str, Any], received: datetime) -> tuple[datetime, datetime]:
    """``(expires_at, refresh_after)`` in this process's clock.

    ``expires_in`` is relative (RFC 6749 §5.1), ``expires_at`` absolute. If the broker's clock
    runs ahead of ours, ``received + expires_in`` is the earlier of the two and is kept, and
    ``refresh_after`` moves back by the same amount: a token is never believed to live longer
    than either figure says.
    """
    stated_at, stated_in = data.get("expires_at"), data.get("expires_in")
    try:
        stated = parse_iso(stated_at) if isinstance(stated_at, str) else None
        relative = (
            received + timedelta(seconds=stated_in)
            if isinstance(stated_in, int | float) and not isinstance(stated_in, bool)
            else None
        )
        expiries = [t for t in (stated, relative) if t is not None]
        if not expiries:
            raise _malformed("no expires_at or expires_in")
        expires_at = min(expiries)
        hint = data.get("refresh_after")
        if isinstance(hint, str):
            refresh_after = parse_iso(hint) - ((stated or expires_at) - expires_at)
        else:
            refresh_after = received + (expires_at - received) / 2
    except (ValueError, OverflowError):
        raise _malformed("unreadable expires_at, expires_in or refresh_after") from None
    if expires_at <= received:
        raise _malformed("the token has already expired")
    return expires_at, min(refresh_after, expires_at)


def _blocking_sleep(clock: Clock, seconds: float) -> None:
    """:class:`Clock` only has an async ``sleep``. The system clock sleeps the thread; any
    other clock (``FakeClock`` in tests) has its coroutine run to completion on a private loop,
    so tests move time instead of waiting."""
    if isinstance(clock, SystemClock):
        time.sleep(seconds)
    else:
        asyncio.run(clock.sleep(seconds))


# --- the clients ----------------------------------------------------------------------------


class BrokerClient:
    """Tokens from the broker, for threaded code. Build one per process (at module scope:
    warm instances reuse its cache and connection pool) and share it between threads.

    Per (connection, scopes), one caller at a time fetches; the others get the cached token
    while it is still valid, or wait for that fetch.
    """

    def __init__(
        self,
        base_url: str,
        *,
        audience: str | None = None,
        id_token_source: IdTokenSource | None = None,
        clock: Clock | None = None,
        timeout: float = 5.0,
        deadline_seconds: float = 10.0,
        retry: RetryPolicy | None = None,
        breaker_threshold: int = 5,
        breaker_reset_seconds: float = 30.0,
        min_ttl_seconds: int = 60,
        expiry_margin_seconds: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        import httpx  # noqa: PLC0415 - only a process that talks to the broker needs it

        self._core = _Core(
            base_url,
            audience=audience,
            id_token_source=id_token_source,
            clock=clock,
            timeout=timeout,
            deadline_seconds=deadline_seconds,
            retry=retry,
            breaker_threshold=breaker_threshold,
            breaker_reset_seconds=breaker_reset_seconds,
            min_ttl_seconds=min_ttl_seconds,
            expiry_margin_seconds=expiry_margin_seconds,
            rng=rng,
        )
        self._http = httpx.Client(transport=transport, follow_redirects=False, timeout=timeout)

    @property
    def breaker_state(self) -> BreakerState:
        return self._core.breaker.state

    def token(self, connection: str, scopes: Sequence[str] = ()) -> BrokerToken:
        """A token for ``connection`` with ``scopes`` (empty: what the policy grants).

        Raises :class:`BrokerUnavailable` (retryable) when no valid token can be had now,
        :class:`BrokerRequestError` subclasses when the broker refuses, :class:`IdTokenError`
        when the caller's identity is misconfigured.
        """
        core = self._core
        key = core.key(connection, scopes)
        slot = core.slot(key)
        cached = core.fresh(slot)
        if cached is not None:
            return cached
        waited_for = None
        if not slot.lock.acquire(blocking=False):
            # Someone is refreshing this key: serve the still-valid token, or wait for theirs.
            cached = core.usable(slot)
            if cached is not None:
                return cached
            waited_for = slot.fetches
            if not slot.lock.acquire(timeout=core.deadline_seconds):
                raise BrokerUnavailable(
                    "timed out waiting for another refresh of this token",
                    reason=Unavailability.REFRESH_IN_FLIGHT,
                )
        try:
            answer, fallback = core.plan(slot, waited_for)
            if answer is not None:
                return answer
            try:
                token, attempts = self._fetch(key, retries=fallback is None)
            except TokenBrokerError as error:
                return core.failed(key, slot, error)
            core.succeeded(key, slot, token, attempts)
            return token
        finally:
            slot.lock.release()

    def _fetch(self, key: _Key, *, retries: bool) -> tuple[BrokerToken, int]:
        """Attempts until a token, a refusal, or the retry policy / deadline says stop.

        With a valid cached token in hand (``retries=False``) one attempt is made: the caller
        is served the cached token at once, and the key backs off before the next attempt.
        """
        core = self._core
        deadline = core.clock.monotonic() + core.deadline_seconds
        attempt = 1
        refresh_id_token = id_token_refreshed = False
        while True:
            try:
                return self._attempt(key, deadline, refresh_id_token=refresh_id_token), attempt
            except BrokerInvalidToken:
                if id_token_refreshed:
                    raise
                # The ID token may have expired in flight: one fresh one, one more try.
                refresh_id_token = id_token_refreshed = True
            except TokenBrokerError as error:
                refresh_id_token = False
                wait = core.next_wait(attempt, error, deadline) if retries else None
                if wait is None:
                    error.attempts = attempt
                    raise
                core.retrying(key, attempt, error, wait)
                _blocking_sleep(core.clock, wait)
                attempt += 1

    def _attempt(self, key: _Key, deadline: float, *, refresh_id_token: bool) -> BrokerToken:
        core = self._core
        id_token = core.id_token(refresh=refresh_id_token)
        timeout = core.budget(deadline)
        core.admit()
        try:
            token = core.decode(self._post(core.body(key), id_token, timeout), key)
        except BaseException as error:
            core.settle(error)
            raise
        core.settle(None)
        return token

    def _post(self, body: bytes, id_token: str, timeout: float) -> _Reply:
        import httpx  # noqa: PLC0415

        try:
            with self._http.stream(
                "POST",
                self._core.url,
                content=body,
                headers=self._core.headers(id_token),
                timeout=timeout,
            ) as response:
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) > MAX_RESPONSE_BYTES:
                        raise _malformed("answer larger than 64 KiB", response.status_code)
                return _Reply(
                    response.status_code, bytes(data), response.headers.get("retry-after")
                )
        except httpx.TimeoutException:
            raise BrokerUnavailable(
                f"broker timed out after {timeout:.1f}s", reason=Unavailability.TIMEOUT
            ) from None
        except httpx.TransportError as exc:
            raise BrokerUnavailable(
                f"broker unreachable: {type(exc).__name__}", reason=Unavailability.UNREACHABLE
            ) from None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncBrokerClient:
    """The same client for asyncio code: the same cache, breaker and decisions, with an
    ``asyncio.Lock`` per key and ``httpx.AsyncClient``. The ID-token source (blocking: it may
    call the metadata server) runs in a worker thread.

    Use it from one event loop at a time. If the loop changes (a sync Cloud Function that calls
    ``asyncio.run`` per request), the client notices, keeps its cache and breaker, and builds
    new locks and a new connection pool for the new loop.
    """

    def __init__(
        self,
        base_url: str,
        *,
        audience: str | None = None,
        id_token_source: IdTokenSource | None = None,
        clock: Clock | None = None,
        timeout: float = 5.0,
        deadline_seconds: float = 10.0,
        retry: RetryPolicy | None = None,
        breaker_threshold: int = 5,
        breaker_reset_seconds: float = 30.0,
        min_ttl_seconds: int = 60,
        expiry_margin_seconds: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._core = _Core(
            base_url,
            audience=audience,
            id_token_source=id_token_source,
            clock=clock,
            timeout=timeout,
            deadline_seconds=deadline_seconds,
            retry=retry,
            breaker_threshold=breaker_threshold,
            breaker_reset_seconds=breaker_reset_seconds,
            min_ttl_seconds=min_ttl_seconds,
            expiry_margin_seconds=expiry_margin_seconds,
            rng=rng,
        )
        self._transport = transport
        self._loop: asyncio.AbstractEventLoop | None = None
        self._locks: dict[_Key, asyncio.Lock] = {}
        self._http: httpx.AsyncClient | None = None

    @property
    def breaker_state(self) -> BreakerState:
        return self._core.breaker.state

    async def token(self, connection: str, scopes: Sequence[str] = ()) -> BrokerToken:
        """As :meth:`BrokerClient.token`."""
        core = self._core
        key = core.key(connection, scopes)
        slot = core.slot(key)
        cached = core.fresh(slot)
        if cached is not None:
            return cached
        http = self._bind_loop()
        lock = self._locks.setdefault(key, asyncio.Lock())
        waited_for = None
        if lock.locked():
            cached = core.usable(slot)
            if cached is not None:
                return cached
            waited_for = slot.fetches
        try:
            async with asyncio.timeout(core.deadline_seconds):
                await lock.acquire()
        except TimeoutError:
            raise BrokerUnavailable(
                "timed out waiting for another refresh of this token",
                reason=Unavailability.REFRESH_IN_FLIGHT,
            ) from None
        try:
            answer, fallback = core.plan(slot, waited_for)
            if answer is not None:
                return answer
            try:
                token, attempts = await self._fetch(http, key, retries=fallback is None)
            except TokenBrokerError as error:
                return core.failed(key, slot, error)
            core.succeeded(key, slot, token, attempts)
            return token
        finally:
            lock.release()

    def _bind_loop(self) -> httpx.AsyncClient:
        import httpx  # noqa: PLC0415 - only a process that talks to the broker needs it

        loop = asyncio.get_running_loop()
        if loop is not self._loop or self._http is None:
            # Locks and pooled connections belong to one loop; the old loop's are dropped.
            self._loop = loop
            self._locks = {}
            self._http = httpx.AsyncClient(
                transport=self._transport, follow_redirects=False, timeout=self._core.timeout
            )
        return self._http

    async def _fetch(
        self, http: httpx.AsyncClient, key: _Key, *, retries: bool
    ) -> tuple[BrokerToken, int]:
        core = self._core
        deadline = core.clock.monotonic() + core.deadline_seconds
        attempt = 1
        refresh_id_token = id_token_refreshed = False
        while True:
            try:
                token = await self._attempt(http, key, deadline, refresh_id_token=refresh_id_token)
            except BrokerInvalidToken:
                if id_token_refreshed:
                    raise
                refresh_id_token = id_token_refreshed = True
            except TokenBrokerError as error:
                refresh_id_token = False
                wait = core.next_wait(attempt, error, deadline) if retries else None
                if wait is None:
                    error.attempts = attempt
                    raise
                core.retrying(key, attempt, error, wait)
                await core.clock.sleep(wait)
                attempt += 1
            else:
                return token, attempt

    async def _attempt(
        self, http: httpx.AsyncClient, key: _Key, deadline: float, *, refresh_id_token: bool
    ) -> BrokerToken:
        core = self._core
        id_token = await asyncio.to_thread(core.id_token, refresh=refresh_id_token)
        budget = core.budget(deadline)
        core.admit()
        try:
            reply = await self._post(http, core.body(key), id_token, budget)
            token = core.decode(reply, key)
        except BaseException as error:
            core.settle(error)
            raise
        core.settle(None)
        return token

    async def _post(
        self, http: httpx.AsyncClient, body: bytes, id_token: str, budget: float
    ) -> _Reply:
        import httpx  # noqa: PLC0415

        try:
            async with http.stream(
                "POST",
                self._core.url,
                content=body,
                headers=self._core.headers(id_token),
                timeout=budget,
            ) as response:
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > MAX_RESPONSE_BYTES:
                        raise _malformed("answer larger than 64 KiB", response.status_code)
                return _Reply(
                    response.status_code, bytes(data), response.headers.get("retry-after")
                )
        except httpx.TimeoutException:
            raise BrokerUnavailable(
                f"broker timed out after {budget:.1f}s", reason=Unavailability.TIMEOUT
            ) from None
        except httpx.TransportError as exc:
            raise BrokerUnavailable(
                f"broker unreachable: {type(exc).__name__}", reason=Unavailability.UNREACHABLE
            ) from None

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def __aenter__(self) -> AsyncBrokerClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
