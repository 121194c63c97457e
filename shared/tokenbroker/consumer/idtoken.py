"""The caller's identity: sources of Google ID tokens for the broker's ``Authorization``.

The broker authenticates callers by a Google-signed ID token whose ``aud`` is the broker's
URL (https://cloud.google.com/run/docs/authenticating/service-to-service). A source is any
callable ``audience -> ID token``; the client asks it for every broker request (a few per hour
per key), so sources cache. After a ``401`` the client drops a source's cache, when it has one
(:class:`RefreshableIdTokenSource`), and asks again.

* :class:`GoogleIdTokenSource` -- google-auth: a service-account key or the metadata server.
* :class:`StaticIdTokenSource` -- a fixed token or a file, for local runs.
* :func:`default_id_token_source` -- the one the settings name (:class:`ClientSettings`).

google-auth (and its ``requests`` transport) is imported on first use, never at import time.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tokenbroker.consumer.errors import IdTokenError
from tokenbroker.consumer.settings import ENV_ID_TOKEN, ClientSettings
from tokenbroker.kernel.clock import Clock, SystemClock, isoformat
from tokenbroker.kernel.errors import ConfigError
from tokenbroker.kernel.redact import scrub
from tokenbroker.kernel.secret import Secret


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


def obtain_id_token(source: IdTokenSource, audience: str, *, refresh: bool) -> str:
    """The source's token for ``audience``; with ``refresh``, after dropping its cache (a plain
    callable is simply asked again). Blocking: it may call the metadata server."""
    if refresh and isinstance(source, RefreshableIdTokenSource):
        source.invalidate(audience)
    return source(audience)


class GoogleIdTokenSource:
    """ID tokens from google-auth, per audience, cached until ``refresh_margin_seconds``
    before they expire.

    ``google.oauth2.id_token.fetch_id_token_credentials`` looks, in order, at a
    service-account key named by ``GOOGLE_APPLICATION_CREDENTIALS`` (or an impersonated
    service account) and at the metadata server (Cloud Run, Cloud Functions, GCE), as
    https://google.aip.dev/auth/4110 prescribes. User credentials from ``gcloud auth
    application-default login`` cannot mint ID tokens for an arbitrary audience: use
    :class:`StaticIdTokenSource` locally.

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


def static_id_token_source(
    token: str | Secret | None = None, *, path: str | Path | None = None
) -> StaticIdTokenSource:
    """A fixed ID token, or a file re-read on every call (refresh it from a shell loop)."""
    return StaticIdTokenSource(token, path=path)


def default_id_token_source(
    environ: Mapping[str, str] | None = None,
    *,
    clock: Clock | None = None,
    settings: ClientSettings | None = None,
) -> IdTokenSource:
    """The source ``settings`` name (by default :meth:`ClientSettings.resolve` over
    ``environ``, itself ``os.environ`` by default): ``TOKENBROKER_ID_TOKEN``, then
    ``TOKENBROKER_ID_TOKEN_FILE``, then google-auth.

    Called once, when a client is built (cold start), never at import.
    """
    chosen = settings or ClientSettings.resolve(environ=environ)
    if chosen.id_token is not None:
        return StaticIdTokenSource(chosen.id_token, clock=clock)
    if chosen.id_token_file is not None:
        return StaticIdTokenSource(path=chosen.id_token_file, clock=clock)
    return GoogleIdTokenSource(clock=clock)
