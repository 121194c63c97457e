"""Short-lived Google service-account tokens through the IAM Credentials API.

The issuer hands a caller a token for a service-account connection with *exactly* the scopes the
caller asked for and a *bounded* lifetime, minted by keyless impersonation
(``projects.serviceAccounts.generateAccessToken``), never the broker's own token. The broker
authenticates with its own token (Application Default Credentials by default) and must hold
``roles/iam.serviceAccountTokenCreator`` on each target service account.

**The wire protocol is Google's client library**, ``google-cloud-iam``
(``google.cloud.iam_credentials_v1.IAMCredentialsClient``, ``transport="rest"``,
https://cloud.google.com/python/docs/reference/iamcredentials/latest): it builds the request
(``POST /v1/projects/-/serviceAccounts/{email}:generateAccessToken``, body ``{"scope",
"lifetime": "900s", "delegates"}``, with ``delegates`` left out when empty), parses the answer
(``accessToken``, ``expireTime`` as an aware UTC datetime) and turns every HTTP error into a
``google.api_core.exceptions.GoogleAPICallError`` that keeps the response. It is pointed at
another endpoint, plain-HTTP ones included (the local test server), with
``client_options={"api_endpoint": URL}``: the REST transport keeps a URL's ``http://`` scheme.
Its library retry is switched off (``retry=None``): our :mod:`~tokenbroker.kernel.retry` policy
bounds the attempts, honouring ``Retry-After``. There is no asyncio REST transport for this
API (``IAMCredentialsAsyncClient`` speaks gRPC only), so the sync client runs in a small thread
pool of this adapter's own (ten threads, the ``requests`` connection pool's default size, so no
connection is thrown away); the event loop never blocks, not even on the first import.

What stays hand-written here, and why:

* **The broker's own token** (:class:`ApplicationDefaultAuthorizer`, or any async callable,
  e.g. the static ``TOKENBROKER_IAM_ACCESS_TOKEN``): google-auth refreshes credentials in
  whichever thread needs them, with no lock, and would do ``google.auth.default()`` (which may
  probe the metadata server) inside the client's constructor. The authorizer loads and refreshes
  off the loop, once for all concurrent callers, and classifies its failures. It is fetched on
  the loop before each call and handed to the worker thread; ``_PerCallBearer`` (a
  ``google.auth.credentials.Credentials``, the documented way to give a client a token source)
  puts it on the request. On a 401 google-auth's ``AuthorizedSession`` asks the credentials to
  refresh and would retry up to twice with whatever they hold; ours refuse instead, so the 401
  comes back here, the authorizer is told to drop its token (``invalidate()``, when it can) and
  the call is tried once more -- once, never a loop, and never with a token known to be refused.
* **Checks before anything is sent** ([REF] below): lifetime 1..max (default 3600) s, scopes a
  non-empty sequence of whitespace-free strings (never a bare ``str``), service-account and
  delegate emails of the form ``name@domain.gserviceaccount.com`` (which also keeps ``/``,
  ``?``, ``#`` and ``:`` out of the URL path). The library checks none of these.
* **Error classification** into the tokenbroker errors the issuer understands (below): the
  library's exception classes follow the HTTP status alone, while Google's ``status`` string,
  ``Retry-After`` and ``google.rpc.RetryInfo`` decide here; the response they need is the one
  the library's exception carries (``GoogleAPICallError.response``).
* **Log hygiene**: with ``GOOGLE_SDK_PYTHON_LOGGING_SCOPE`` set, the client library logs each
  response at DEBUG with a ``payload`` meant to be the response message -- here, the access
  token (2.27 logs ``null`` only because it serialises the wrong object). :class:`_NoTokenPayloads`
  drops those records from its transport's logger.

Protocol rules, from the REST reference [REF]
(https://cloud.google.com/iam/docs/reference/credentials/rest/v1/projects.serviceAccounts/generateAccessToken):

* ``name`` is ``projects/-/serviceAccounts/{ACCOUNT_EMAIL_OR_UNIQUEID}``: "The ``-`` wildcard
  character is required; replacing it with a project ID is invalid." Delegates use the same form.
* ``scope`` is required, "At least one value required". ``delegates`` is "required for delegated
  requests. For direct requests, which are more common, do not specify this field".
* ``lifetime``: "By default, the maximum allowed value is 1 hour. To set a lifetime of up to 12
  hours, you can add the service account as an allowed value in an Organization Policy that
  enforces the ``constraints/iam.allowServiceAccountCredentialLifetimeExtension`` constraint."
  Hence 1..3600 s here unless the deployment says its org policy allows more
  (``max_lifetime_seconds``, up to 43200).

Errors come as ``google.rpc.Status`` JSON, ``{"error": {"code", "message", "status",
"details"}}`` (https://cloud.google.com/apis/design/errors). The mapping (429 and 5xx are
transient whatever status they carry, as in ``oauth/token_response.py``; otherwise the
``status`` string wins over the HTTP code, and the HTTP code decides when there is no JSON body):

* 400 INVALID_ARGUMENT, OUT_OF_RANGE -> :class:`ImpersonationRequestInvalid`
  (a ``BadRequest``: HTTP 400 ``invalid_request``, permanent);
* 401 UNAUTHENTICATED, after one refresh -> :class:`BrokerUnauthenticated`
  (a ``ConfigError``: HTTP 500 ``invalid_config``, permanent);
* 403 PERMISSION_DENIED -> :class:`ImpersonationDenied` (a ``ConfigError``: 500, permanent);
* 404 NOT_FOUND -> :class:`ServiceAccountGone` (a ``NeedsReauth``: 409 ``needs_reauth``,
  permanent);
* 408, 429, 5xx, UNAVAILABLE, RESOURCE_EXHAUSTED, INTERNAL, DEADLINE_EXCEEDED, ABORTED,
  UNKNOWN; timeouts, refused or reset connections; malformed 200s -> :class:`IamUnavailable`
  (a ``CredentialUnavailable``: 503 ``temporarily_unavailable``, retryable, ``retry_after``
  from ``Retry-After`` or a ``google.rpc.RetryInfo`` detail);
* any other 4xx (FAILED_PRECONDITION, ...) -> :class:`ImpersonationMisconfigured`
  (a ``ConfigError``: 500, permanent).

Why these:

* **403** means the broker's identity lacks ``iam.serviceAccounts.getAccessToken`` on the target
  ([REF], "Authorization requires the following IAM permission"): an operator must grant
  ``roles/iam.serviceAccountTokenCreator``. Retrying cannot help and it is not the caller's
  fault, so it is a configuration error (HTTP 500 to the caller). The real API's 403 text is
  "Permission 'iam.serviceAccounts.getAccessToken' denied on resource (or it may not exist)."
  (e.g. https://github.com/google-github-actions/auth/issues/340): a missing account can
  surface as 403 too, so the message keeps the server's text for the operator.
* **404** means the service account itself is gone (deleted). The broker is fine and every other
  connection still works; *this* connection can never mint a token again until a human acts
  (undeletes the account or re-points the connection) -- the same situation as a revoked grant.
  So it is :class:`~.errors.NeedsReauth` (HTTP 409 ``needs_reauth``), not retryable.
* **401** means the broker's own token was refused. google-auth refreshes and retries on 401
  (``google.auth.transport.DEFAULT_REFRESH_STATUS_CODES``); so does this client, once, when its
  authorizer can be told to drop its token. A second 401 is a broker configuration problem:
  never the caller's (their ID token was already verified), so never ``invalid_token``.
* **400** after the client-side checks means the request the caller asked for (a scope name, a
  lifetime above the org policy) cannot be granted: ``invalid_request``.
* **UNAVAILABLE** and **RESOURCE_EXHAUSTED** are the ones the API design guide lets clients
  retry (with backoff, and after a delay); INTERNAL, DEADLINE_EXCEEDED, ABORTED, UNKNOWN and any
  5xx are treated as transient too, as ``gcp/errors.py`` and ``oauth/token_response.py`` do,
  with the retry policy bounding the attempts. ``Retry-After`` (RFC 9110 §10.2.3) or else a
  ``google.rpc.RetryInfo`` detail ("Clients should wait at least this long between retrying the
  same request", https://github.com/googleapis/googleapis/blob/master/google/rpc/error_details.proto)
  becomes ``retry_after``.

Token values never reach a message or a log line: answers are wrapped in
:class:`~.secret.Secret` at once, the library's own exceptions (whose text is the request URL
and the server's message) are replaced at this boundary, and messages are built from status
codes, the service-account email and the (scrubbed) server message.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import re
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any

from tokenbroker.kernel.clock import Clock, SystemClock, isoformat
from tokenbroker.kernel.errors import (
    BadRequest,
    ConfigError,
    CredentialUnavailable,
    NeedsReauth,
    TokenBrokerError,
)
from tokenbroker.kernel.http import parse_retry_after
from tokenbroker.kernel.log import get_logger
from tokenbroker.kernel.model import MintedToken
from tokenbroker.kernel.redact import scrub
from tokenbroker.kernel.secret import Secret

if TYPE_CHECKING:
    from google.cloud.iam_credentials_v1 import IAMCredentialsClient

IAM_CREDENTIALS_ENDPOINT = "https://iamcredentials.googleapis.com"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
#: [REF] lifetime: "By default, the maximum allowed value is 1 hour."
DEFAULT_MAX_LIFETIME_SECONDS = 3600
#: [REF] lifetime: "up to 12 hours" with an org policy
#: (``constraints/iam.allowServiceAccountCredentialLifetimeExtension``).
EXTENDED_MAX_LIFETIME_SECONDS = 43200
#: Worker threads for the sync client: ``requests``' default connection pool size per host.
DEFAULT_MAX_WORKERS = 10

Authorizer = Callable[[], Awaitable[str]]

# Google service-account emails: user-managed ``name@project.iam.gserviceaccount.com``, the
# Compute default ``123-compute@developer.gserviceaccount.com``, App Engine's
# ``project@appspot.gserviceaccount.com`` and service agents ``service-1@gcp-sa-x.iam...``.
_SA_EMAIL = re.compile(
    r"[a-z0-9](?:[a-z0-9._-]{0,98}[a-z0-9])?@(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+"
    r"gserviceaccount\.com",
    re.IGNORECASE,
)
_RESOURCE_PREFIX = "projects/-/serviceAccounts/"
# google.protobuf.Duration in JSON: seconds with up to 9 fractional digits and an "s" suffix.
_DURATION = re.compile(r"(\d+)(?:\.(\d{1,9}))?s")
# Transient google.rpc codes (https://cloud.google.com/apis/design/errors; as gcp/errors.py).
_RETRYABLE_RPC = frozenset(
    {"UNAVAILABLE", "RESOURCE_EXHAUSTED", "INTERNAL", "DEADLINE_EXCEEDED", "ABORTED", "UNKNOWN"}
)
# The broker's token for the call a worker thread is making (set and reset around that call).
_BEARER: contextvars.ContextVar[str] = contextvars.ContextVar("iam_credentials_bearer")


# --- errors ------------------------------------------------------------------------------------


class IamCredentialsError(TokenBrokerError):
    """Root of this adapter's errors; each concrete one also derives from the tokenbroker error
    the issuer understands (its ``code``, ``http_status`` and ``retryable`` come from there)."""

    def __init__(
        self,
        message: str,
        *,
        rpc_status: str | None = None,
        upstream_status: int | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, retryable=retryable, retry_after=retry_after)
        #: The ``google.rpc`` status name IAM answered with (``PERMISSION_DENIED``...), if any.
        self.rpc_status = rpc_status
        #: The HTTP status IAM answered with (``None`` when no answer came).
        self.upstream_status = upstream_status


class ImpersonationRequestInvalid(IamCredentialsError, BadRequest):
    """Scopes or lifetime that cannot be granted: refused here, or 400 INVALID_ARGUMENT."""


class ImpersonationDenied(IamCredentialsError, ConfigError):
    """403: the broker lacks ``roles/iam.serviceAccountTokenCreator`` on the account."""


class BrokerUnauthenticated(IamCredentialsError, ConfigError):
    """401 (twice), or the broker's own Google credentials could not be loaded."""


class ImpersonationMisconfigured(IamCredentialsError, ConfigError):
    """A malformed service-account or delegate name, a 4xx with no better meaning, or no
    ``google-cloud-iam`` installed."""


class ServiceAccountGone(IamCredentialsError, NeedsReauth):
    """404: the service account no longer exists; the connection needs a human."""


class IamUnavailable(IamCredentialsError, CredentialUnavailable):
    """IAM Credentials could not answer usefully right now; worth retrying."""


# --- the broker's own token ----------------------------------------------------------------------


class ApplicationDefaultAuthorizer:
    """The broker's own access token from Application Default Credentials.

    ``google.auth.default()`` may probe the metadata server and ``refresh()`` does blocking HTTP,
    so both run in a worker thread; a lock makes concurrent callers share one refresh. The token
    is refreshed when google-auth says it is not ``valid`` (absent, or within its
    ``REFRESH_THRESHOLD`` of expiry) or after :meth:`invalidate`. google-auth is imported on first
    use only (cold start).
    """

    def __init__(
        self,
        scopes: Sequence[str] = (CLOUD_PLATFORM_SCOPE,),
        *,
        credentials: Any = None,
    ) -> None:
        self.scopes = tuple(scopes)
        self._credentials: Any = credentials
        self._request: Any = None
        self._stale = False
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None

    def _loop_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    def invalidate(self) -> None:
        """Drop the current token: the next call refreshes (after a 401)."""
        self._stale = True

    async def __call__(self) -> str:
        async with self._loop_lock():
            if self._credentials is None:
                self._credentials = await asyncio.to_thread(self._load)
            credentials = self._credentials
            if self._stale or not credentials.valid:
                await asyncio.to_thread(self._refresh, credentials)
                self._stale = False
            token = credentials.token
        if not isinstance(token, str) or not token:
            raise BrokerUnauthenticated("the broker's own Google credentials yielded no token")
        return token

    def _load(self) -> Any:
        import google.auth  # noqa: PLC0415 - heavy; only impersonation needs it
        import google.auth.exceptions  # noqa: PLC0415

        try:
            credentials, _project = google.auth.default(scopes=list(self.scopes))
        except google.auth.exceptions.DefaultCredentialsError as exc:
            raise BrokerUnauthenticated(
                f"no Application Default Credentials for the broker: {type(exc).__name__}"
            ) from None
        return credentials

    def _refresh(self, credentials: Any) -> None:
        import google.auth.exceptions  # noqa: PLC0415

        if self._request is None:
            from google.auth.transport.requests import Request  # noqa: PLC0415

            self._request = Request()
        try:
            credentials.refresh(self._request)
        except google.auth.exceptions.RefreshError as exc:
            detail = scrub(str(exc))[:200]
            if exc.retryable:
                raise IamUnavailable(
                    f"refreshing the broker's own Google credentials failed: {detail}"
                ) from None
            raise BrokerUnauthenticated(
                f"the broker's own Google credentials cannot be refreshed: {detail}"
            ) from None
        except google.auth.exceptions.TransportError as exc:
            raise IamUnavailable(
                f"refreshing the broker's own Google credentials failed: {type(exc).__name__}"
            ) from None


# --- the client library, built on first use in a worker thread ---------------------------------


class _BearerRefused(Exception):
    """IAM answered 401 to the broker's token: raised from the credentials' ``refresh()``, it
    ends google-auth's own refresh-and-retry so this adapter decides what happens next."""


class _NoTokenPayloads(logging.Filter):
    """Drops the client library's DEBUG records of responses (``httpResponse``): for this API
    the response message *is* the minted access token."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not hasattr(record, "httpResponse")


def _new_library_client(endpoint: str) -> IAMCredentialsClient:
    """``IAMCredentialsClient`` on the REST transport at ``endpoint``, authorised per call.

    Imported here, in a worker thread, on the first impersonation: a cold start that never
    impersonates never imports the client, and the first one does not stall the event loop.
    """
    import google.auth.credentials  # noqa: PLC0415 - heavy; only impersonation needs it
    from google.api_core.client_options import ClientOptions  # noqa: PLC0415
    from google.cloud.iam_credentials_v1 import IAMCredentialsClient  # noqa: PLC0415
    from google.cloud.iam_credentials_v1.services.iam_credentials.transports import (  # noqa: PLC0415
        rest,
    )

    class _PerCallBearer(google.auth.credentials.Credentials):
        """The broker's token for the call this thread is making (``_BEARER``), fetched on the
        event loop by the authorizer; never refreshed here (see the module docstring)."""

        def __init__(self) -> None:
            # google-auth's __init__ is untyped; untyped_calls_exclude does not cover super().
            super().__init__()  # type: ignore[no-untyped-call]

        # The signatures are google-auth's; the request, method and URL are not needed here.
        def before_request(self, request: Any, method: str, url: str, headers: Any) -> None:  # noqa: ARG002
            headers["authorization"] = f"Bearer {_BEARER.get()}"

        def refresh(self, request: Any) -> None:  # noqa: ARG002
            raise _BearerRefused

    transport_log = logging.getLogger(rest.__name__)
    if not any(isinstance(f, _NoTokenPayloads) for f in transport_log.filters):
        transport_log.addFilter(_NoTokenPayloads())
    return IAMCredentialsClient(
        credentials=_PerCallBearer(),
        transport="rest",
        client_options=ClientOptions(api_endpoint=endpoint),
    )


# --- the adapter -------------------------------------------------------------------------------


class IamCredentials:
    """The :class:`~tokenbroker.ports.Impersonator` port on IAM Credentials
    ``generateAccessToken`` through Google's client library (construct it anywhere, from any
    event loop; ``aclose()`` releases its connections and threads).

    ``authorizer`` returns the broker's own bearer token (default:
    :class:`ApplicationDefaultAuthorizer`); if it also has ``invalidate()``, a 401 makes the
    client call it and try once more. ``endpoint``: where IAM Credentials answers (``http://``
    for a local server). ``max_lifetime_seconds``: raise above 3600 (to at most 43200) only
    where an organization policy allows it for the target accounts. ``timeout`` bounds the
    connection and each read of an exchange with IAM (``requests`` semantics), not the
    authorizer. ``max_workers``: threads running the sync client.
    """

    def __init__(
        self,
        *,
        endpoint: str = IAM_CREDENTIALS_ENDPOINT,
        authorizer: Authorizer | None = None,
        timeout: float = 10.0,
        max_lifetime_seconds: int = DEFAULT_MAX_LIFETIME_SECONDS,
        clock: Clock | None = None,
        max_workers: int = DEFAULT_MAX_WORKERS,
    ) -> None:
        if not 1 <= max_lifetime_seconds <= EXTENDED_MAX_LIFETIME_SECONDS:
            raise ValueError("max_lifetime_seconds must be within 1..43200")
        self.endpoint = endpoint.rstrip("/")
        self.timeout = timeout
        self.max_lifetime_seconds = max_lifetime_seconds
        self.max_workers = max_workers
        self.clock: Clock = clock or SystemClock()
        self._authorizer: Authorizer = authorizer or ApplicationDefaultAuthorizer()
        # Held while the library client is built (an import of ~0.3-0.8 s): only worker threads
        # ever wait on it, never the event loop.
        self._build_lock = threading.Lock()
        self._client: IAMCredentialsClient | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.log = get_logger(component="iam-credentials")

    async def __aenter__(self) -> IamCredentials:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the library client's connections and stop the worker threads (a later call
        starts afresh)."""
        client, self._client = self._client, None
        executor, self._executor = self._executor, None
        if client is not None:
            transport: Any = client.transport  # untyped in the library
            transport.close()
        if executor is not None:
            executor.shutdown(wait=False)

    # -- the call ---------------------------------------------------------------------------------

    async def generate_access_token(
        self,
        service_account: str,
        scopes: Sequence[str],
        lifetime_seconds: int,
        delegates: Sequence[str] = (),
    ) -> MintedToken:
        """A token for ``service_account`` with exactly ``scopes``, valid ``lifetime_seconds``."""
        scope_list = _checked_scopes(scopes)
        lifetime = self._checked_lifetime(lifetime_seconds)
        email = _checked_email(service_account, "service account")
        delegate_names = [_delegate_name(d) for d in _sequence(delegates, "delegates")]
        request = {
            "name": _RESOURCE_PREFIX + email,
            "scope": scope_list,
            "lifetime": {"seconds": lifetime},
            "delegates": delegate_names,  # empty: left out of the JSON body by the library
        }
        invalidate = getattr(self._authorizer, "invalidate", None)
        attempts = 2 if callable(invalidate) else 1
        try:
            for attempt in range(1, attempts + 1):
                bearer = await self._authorizer()
                loop = asyncio.get_running_loop()
                answer = await loop.run_in_executor(
                    self._workers(), self._mint_blocking, bearer, request, email
                )
                if answer is not None:
                    break
                if attempt < attempts and callable(invalidate):
                    invalidate()  # as google-auth on a 401: drop the token, try once more
            else:
                raise _error_for(401, "UNAUTHENTICATED", email, "")
            token = self._token(*answer, email, lifetime)
        except IamCredentialsError as error:
            self.log.warning(
                "impersonation failed",
                service_account=email,
                error=error.code,
                rpc_status=error.rpc_status,
                http_status=error.upstream_status,
                retryable=error.retryable,
            )
            raise
        self.log.debug(
            "impersonated token minted",
            service_account=email,
            scopes=scope_list,
            delegates=len(delegate_names),
            lifetime_seconds=lifetime,
            expires_at=isoformat(token.expires_at),
            access_token=token.access_token,
        )
        return token

    def _checked_lifetime(self, lifetime_seconds: int) -> int:
        if isinstance(lifetime_seconds, bool) or not isinstance(lifetime_seconds, int):
            raise ImpersonationRequestInvalid("lifetime_seconds must be a whole number of seconds")
        if not 1 <= lifetime_seconds <= self.max_lifetime_seconds:
            raise ImpersonationRequestInvalid(
                f"lifetime {lifetime_seconds}s is outside 1..{self.max_lifetime_seconds}s "
                "(IAM Credentials allows at most 3600s unless an organization policy extends it)"
            )
        return lifetime_seconds

    def _workers(self) -> ThreadPoolExecutor:
        if self._executor is None:  # on the event loop: no thread races here
            self._executor = ThreadPoolExecutor(
                max_workers=self.max_workers, thread_name_prefix="iam-credentials"
            )
        return self._executor

    def _library_client(self) -> IAMCredentialsClient:
        with self._build_lock:
            if self._client is None:
                try:
                    self._client = _new_library_client(self.endpoint)
                except ImportError:
                    raise ImpersonationMisconfigured(
                        "impersonation needs Google's IAM Credentials client (google-cloud-iam): "
                        "pip install 'tokenbroker[gcp]'"
                    ) from None
            return self._client

    def _mint_blocking(
        self, bearer: str, request: Mapping[str, Any], email: str
    ) -> tuple[str, Any] | None:
        """In a worker thread: one ``generateAccessToken`` call, its failures already mapped to
        this adapter's errors; ``None`` when IAM refused the broker's token (401)."""
        client = self._library_client()
        import google.auth.exceptions  # noqa: PLC0415 - loaded by the client above
        import requests  # noqa: PLC0415
        from google.api_core import exceptions as api_exceptions  # noqa: PLC0415
        from google.protobuf import json_format  # noqa: PLC0415

        bound = _BEARER.set(bearer)
        try:
            answer = client.generate_access_token(
                request=dict(request), retry=None, timeout=self.timeout
            )
        except _BearerRefused:
            return None
        except api_exceptions.GoogleAPICallError as exc:
            raise _api_error(exc, email) from None
        except json_format.ParseError:
            raise IamUnavailable(
                f"IAM Credentials answered without a JSON object (GenerateAccessTokenResponse) "
                f"for {email}"
            ) from None
        except requests.exceptions.Timeout:
            raise IamUnavailable(
                f"IAM Credentials timed out after {self.timeout}s minting a token for {email}"
            ) from None
        except (requests.exceptions.RequestException, google.auth.exceptions.TransportError) as exc:
            raise IamUnavailable(
                f"IAM Credentials unreachable minting a token for {email}: {type(exc).__name__}"
            ) from None
        finally:
            _BEARER.reset(bound)
        return answer.access_token, answer.expire_time

    def _token(self, access_token: str, expire_time: Any, email: str, lifetime: int) -> MintedToken:
        what = f"IAM Credentials answered for {email}"
        if not isinstance(access_token, str) or not access_token:
            raise IamUnavailable(f"{what} without an accessToken")
        if not isinstance(expire_time, datetime) or expire_time.tzinfo is None:
            raise IamUnavailable(f"{what} without an expireTime")
        # The library's DatetimeWithNanoseconds, as a plain aware datetime.
        expires_at = datetime.fromtimestamp(expire_time.timestamp(), tz=expire_time.tzinfo)
        now = self.clock.now()
        if expires_at <= now:
            raise IamUnavailable(f"{what} with a token already expired")
        if expires_at > now + timedelta(seconds=lifetime + 300):
            # IAM honours the requested lifetime; a much later expiry means clock skew or a
            # proxy. The token is still handed out with the expiry IAM stated.
            self.log.warning(
                "impersonated token outlives the requested lifetime",
                service_account=email,
                lifetime_seconds=lifetime,
                expires_at=isoformat(expires_at),
            )
        return MintedToken(access_token=Secret(access_token), expires_at=expires_at)


# --- validation ----------------------------------------------------------------------------------


def _sequence(value: Sequence[str], what: str) -> list[str]:
    if isinstance(value, str | bytes):
        raise ImpersonationRequestInvalid(f"{what} must be a sequence of strings, not one string")
    return list(value)


def _checked_scopes(scopes: Sequence[str]) -> list[str]:
    scope_list = _sequence(scopes, "scopes")
    if not scope_list:
        raise ImpersonationRequestInvalid("scopes: at least one scope is required")
    for scope in scope_list:
        if not isinstance(scope, str) or not scope or any(c.isspace() for c in scope):
            raise ImpersonationRequestInvalid(
                "scopes: each scope must be a non-empty string without spaces"
            )
    return scope_list


def _checked_email(value: str, what: str) -> str:
    if not isinstance(value, str) or not _SA_EMAIL.fullmatch(value):
        shown = scrub(value)[:80] if isinstance(value, str) else type(value).__name__
        raise ImpersonationMisconfigured(
            f"{what} {shown!r} is not a service-account email (name@....gserviceaccount.com)"
        )
    return value


def _delegate_name(value: str) -> str:
    """``projects/-/serviceAccounts/EMAIL`` ([REF] delegates format) from an email or a name."""
    if isinstance(value, str) and value.startswith(_RESOURCE_PREFIX):
        value = value[len(_RESOURCE_PREFIX) :]
    return _RESOURCE_PREFIX + _checked_email(value, "delegate")


# --- answers -------------------------------------------------------------------------------------


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _retry_delay(details: Any) -> float | None:
    """``google.rpc.RetryInfo.retryDelay`` (a JSON Duration such as ``"30s"``), if present."""
    if not isinstance(details, list):
        return None
    for detail in details:
        if not isinstance(detail, dict):
            continue
        if str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            match = _DURATION.fullmatch(str(detail.get("retryDelay", "")))
            if match:
                return float(f"{match.group(1)}.{match.group(2) or 0}")
    return None


def _api_error(exc: Any, email: str) -> IamCredentialsError:
    """The library's ``GoogleAPICallError`` as this adapter's error: its class follows the HTTP
    status only, so the ``google.rpc`` body and headers of the response it keeps decide."""
    response = getattr(exc, "response", None)
    status = exc.code if isinstance(exc.code, int) else 0
    headers: Mapping[str, str] = getattr(response, "headers", None) or {}
    data = _json_object(getattr(response, "content", None) or b"")
    body = data.get("error") if data is not None else None
    body = body if isinstance(body, dict) else {}
    rpc_status = body.get("status") if isinstance(body.get("status"), str) else None
    retry_after = parse_retry_after(headers.get("retry-after")) or _retry_delay(body.get("details"))
    return _error_for(status, rpc_status, email, body.get("message"), retry_after)


def _error_for(
    status: int,
    rpc_status: str | None,
    email: str,
    message: Any,
    retry_after: float | None = None,
) -> IamCredentialsError:
    detail = f": {scrub(str(message))[:200]}" if message else ""
    text = f"IAM Credentials answered HTTP {status} {rpc_status or ''}".rstrip()
    text = f"{text} for {email}{detail}"
    kind = _error_class(status, rpc_status)
    hint = _HINTS.get(kind, "").format(email=email)
    return kind(
        f"{text}{hint}",
        rpc_status=rpc_status,
        upstream_status=status,
        retry_after=retry_after if kind is IamUnavailable else None,
    )


_BY_RPC_STATUS: dict[str, type[IamCredentialsError]] = {
    **dict.fromkeys(_RETRYABLE_RPC, IamUnavailable),
    "INVALID_ARGUMENT": ImpersonationRequestInvalid,
    "OUT_OF_RANGE": ImpersonationRequestInvalid,
    "UNAUTHENTICATED": BrokerUnauthenticated,
    "PERMISSION_DENIED": ImpersonationDenied,
    "NOT_FOUND": ServiceAccountGone,
}
_BY_HTTP_STATUS: dict[int, type[IamCredentialsError]] = {
    400: ImpersonationRequestInvalid,
    401: BrokerUnauthenticated,
    403: ImpersonationDenied,
    404: ServiceAccountGone,
    408: IamUnavailable,
}
_HINTS: dict[type[IamCredentialsError], str] = {
    BrokerUnauthenticated: " (the broker's own Google credentials were refused)",
    ImpersonationDenied: " (grant the broker roles/iam.serviceAccountTokenCreator on {email})",
    ServiceAccountGone: " (the account no longer exists: undelete it or re-point the connection)",
}


def _error_class(status: int, rpc_status: str | None) -> type[IamCredentialsError]:
    if status == 429 or status >= 500:
        return IamUnavailable
    if rpc_status is not None and rpc_status in _BY_RPC_STATUS:
        return _BY_RPC_STATUS[rpc_status]
    if rpc_status is None and status in _BY_HTTP_STATUS:
        return _BY_HTTP_STATUS[status]
    return ImpersonationMisconfigured
