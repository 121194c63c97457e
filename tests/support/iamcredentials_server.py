"""A local IAM Service Account Credentials API for tests: ``generateAccessToken`` over REST.

Google ships no emulator for IAM Credentials, so this server speaks the method's REST wire
protocol on 127.0.0.1 and the production adapter (``tokenbroker.adapters.gcp.iam_credentials``,
which drives Google's ``google-cloud-iam`` client over its REST transport) talks to it unchanged
through its ``endpoint`` (the client's ``client_options.api_endpoint``; an ``http://`` URL keeps
its scheme). It is a stdlib ``ThreadingHTTPServer`` (HTTP/1.1, keep-alive, as Google's front
ends) in a background thread; all state is in memory under one lock. What that client sends and
this server accepts as Google does: the resource name percent-encoded in the path
(``reports%40acme...``, decoded before routing), the system parameters
``$alt=json;enum-encoding=int`` in the query
(https://cloud.google.com/apis/docs/system-parameters; ignored here, answers are always JSON),
and empty repeated fields left out of the body.

Each rule cites where it comes from:

* [REF] https://cloud.google.com/iam/docs/reference/credentials/rest/v1/projects.serviceAccounts/generateAccessToken
  -- ``POST /v1/{name=projects/*/serviceAccounts/*}:generateAccessToken``; ``name`` is
  ``projects/-/serviceAccounts/{ACCOUNT_EMAIL_OR_UNIQUEID}`` and "The ``-`` wildcard character is
  required; replacing it with a project ID is invalid" (delegates likewise); ``scope`` is
  "Required ... At least one value required"; ``lifetime``: "By default, the maximum allowed
  value is 1 hour" and "If a value is not specified, the token's lifetime will be set to a
  default value of 1 hour"; each delegate "must be granted the
  roles/iam.serviceAccountTokenCreator role on its next service account in the chain" and the
  last one on the target; response ``{"accessToken", "expireTime"}``.
* [ERRORS] https://cloud.google.com/apis/design/errors -- the ``google.rpc.Status`` JSON shape
  ``{"error": {"code", "message", "status", "details"}}`` and the code-to-HTTP mapping
  (INVALID_ARGUMENT 400, UNAUTHENTICATED 401, PERMISSION_DENIED 403, NOT_FOUND 404,
  RESOURCE_EXHAUSTED 429, INTERNAL 500, UNAVAILABLE 503, DEADLINE_EXCEEDED 504).
* Texts seen from the real service: 403 "Permission 'iam.serviceAccounts.getAccessToken' denied
  on resource (or it may not exist)." with an ``ErrorInfo`` reason ``IAM_PERMISSION_DENIED``
  (https://github.com/google-github-actions/auth/issues/340); 401 "Request is missing required
  authentication credential. Expected OAuth 2 access token, login cookie or other valid
  authentication credential. ..." / ``CREDENTIALS_MISSING`` for IAM Credentials
  (https://github.com/firebase/firebase-admin-dart/issues/74) and "Request had invalid
  authentication credentials. ..." for a bad token
  (https://github.com/googleapis/nodejs-speech/issues/243); 'Invalid JSON payload received.
  Unknown name "..."' for unknown body fields (Google's JSON transcoding).

Choices of this server where the real service's exact answer is not documented (tests must not
rely on more than the status): an unknown target or delegate account answers 404 NOT_FOUND
(the real service may answer 403 "(or it may not exist)" instead); wrong paths and methods
answer a JSON 404; the order of checks is auth (401), request shape (400), account existence
(404), permission chain (403). Access is modelled as grants ``principal -> accounts`` where a
principal is a caller's bearer token or a service-account email (for delegation chains).

Not modelled: unique-ID account names, ``generateIdToken``/``signBlob``/``signJwt``, org-policy
lifetimes per account (one ``max_lifetime_seconds`` for the server), quotas.

Test hooks: ``issued`` (every token minted, with its account, scopes, lifetime and expiry),
``requests`` (every request with its bearer token and body), ``faults([...])`` (the next requests
answer an injected status, ``Retry-After``, delay or non-JSON body), and a ledger file with one
issued token value per line for the end-of-session log-leak scan.
"""

from __future__ import annotations

import collections
import contextlib
import http.server
import json
import re
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

DEFAULT_LIFETIME_SECONDS = 3600  # [REF] "default value of 1 hour"
DEFAULT_MAX_LIFETIME_SECONDS = 3600  # [REF] "By default, the maximum allowed value is 1 hour."
PERMISSION = "iam.serviceAccounts.getAccessToken"
SA_PREFIX = "projects/-/serviceAccounts/"

_PATH = re.compile(r"/v1/projects/(?P<project>[^/]+)/serviceAccounts/(?P<account>[^/]+)")
_METHOD_SUFFIX = ":generateAccessToken"
_DELEGATE = re.compile(r"projects/(?P<project>[^/]+)/serviceAccounts/(?P<account>[^/]+)")
# google.protobuf.Duration in JSON: "seconds with up to 9 fractional digits, suffixed with s".
_DURATION = re.compile(r"(?P<seconds>-?\d+)(?:\.(?P<nanos>\d{1,9}))?s")
_KNOWN_FIELDS = frozenset({"scope", "lifetime", "delegates"})

# [ERRORS] google.rpc.Code names by HTTP status, for injected faults.
_RPC_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_MISSING_CREDENTIALS = (
    "Request is missing required authentication credential. Expected OAuth 2 access token, "
    "login cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)
_INVALID_CREDENTIALS = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
    "cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)
_DENIED = f"Permission '{PERMISSION}' denied on resource (or it may not exist)."


@dataclass(frozen=True)
class Fault:
    """One injected answer, consumed by the next request that reaches the server.

    ``status=None`` answers normally (after ``delay``): with ``delay`` longer than the client's
    timeout, that is a timeout. ``body`` is the ``google.rpc`` error JSON, an HTML page (what a
    proxy or load balancer sends) or nothing.
    """

    status: int | None = 503
    retry_after: str | None = None
    delay: float = 0.0
    body: Literal["rpc", "html", "empty"] = "rpc"
    retry_delay: str | None = None  # a google.rpc.RetryInfo detail, e.g. "12s"


@dataclass(frozen=True)
class IssuedToken:
    access_token: str = field(repr=False)
    service_account: str
    scopes: tuple[str, ...]
    delegates: tuple[str, ...]
    lifetime_seconds: float
    issued_at: datetime
    expire_time: datetime
    caller_token: str = field(repr=False)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    bearer: str | None = field(repr=False)
    body: Any
    status: int


class RpcError(Exception):
    def __init__(
        self,
        http_status: int,
        status: str,
        message: str,
        *,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.status = status
        self.message = message
        self.details = details or []
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "code": self.http_status,
            "message": self.message,
            "status": self.status,
        }
        if self.details:
            error["details"] = self.details
        return {"error": error}


def _invalid(message: str) -> RpcError:
    return RpcError(400, "INVALID_ARGUMENT", message)


def _rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class IamCredentialsTestServer:
    """``IamCredentialsTestServer(ledger).start()``; ``.url`` is the client's ``endpoint``."""

    def __init__(
        self,
        ledger: Path | None = None,
        *,
        max_lifetime_seconds: int = DEFAULT_MAX_LIFETIME_SECONDS,
    ) -> None:
        self.ledger = ledger
        self.max_lifetime_seconds = max_lifetime_seconds
        self._lock = threading.Lock()
        self._accounts: set[str] = set()
        self._grants: dict[str, set[str]] = collections.defaultdict(set)
        self._faults: collections.deque[Fault] = collections.deque()
        self._issued: list[IssuedToken] = []
        self._requests: list[RecordedRequest] = []
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> IamCredentialsTestServer:
        if self.ledger is not None:
            self.ledger.parent.mkdir(parents=True, exist_ok=True)
            self.ledger.touch()
        self._httpd = _Server(("127.0.0.1", 0), _Handler, self)
        host, port = self._httpd.server_address[:2]
        self.url = f"http://{host!s}:{port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="iamcredentials-test-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> IamCredentialsTestServer:
        return self.start() if self._httpd is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- configuration --------------------------------------------------------------------------

    def add_service_account(self, email: str) -> IamCredentialsTestServer:
        with self._lock:
            self._accounts.add(email)
        return self

    def add_caller(self, caller_token: str) -> IamCredentialsTestServer:
        """A bearer token the server accepts (authenticates), with no grants yet."""
        with self._lock:
            self._grants.setdefault(caller_token, set())
        return self

    def delete_service_account(self, email: str) -> None:
        with self._lock:
            self._accounts.discard(email)

    def allow(self, principal: str, sa_email: str) -> IamCredentialsTestServer:
        """Grant ``principal`` (a caller's bearer token, or a service-account email for a
        delegation chain) roles/iam.serviceAccountTokenCreator on ``sa_email``; the account is
        created if unknown."""
        with self._lock:
            self._accounts.add(sa_email)
            self._grants[principal].add(sa_email)
        return self

    def revoke(self, principal: str, sa_email: str) -> None:
        with self._lock:
            self._grants.get(principal, set()).discard(sa_email)

    def faults(self, faults: Iterable[Fault | int]) -> None:
        """The next requests answer these, in order (an ``int`` is a status with a JSON body)."""
        with self._lock:
            self._faults.extend(f if isinstance(f, Fault) else Fault(status=f) for f in faults)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            self._issued.clear()
            self._requests.clear()

    # -- observations ---------------------------------------------------------------------------

    @property
    def issued(self) -> list[IssuedToken]:
        with self._lock:
            return list(self._issued)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._requests)

    @property
    def status_counts(self) -> collections.Counter[int]:
        with self._lock:
            return collections.Counter(r.status for r in self._requests)

    @property
    def pending_faults(self) -> int:
        with self._lock:
            return len(self._faults)

    # -- the method -----------------------------------------------------------------------------

    def _next_fault(self) -> Fault | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def generate_access_token(
        self, project: str, account: str, bearer: str | None, body: Any
    ) -> dict[str, Any]:
        """The method's semantics; raises :class:`RpcError`."""
        if bearer is None:
            raise RpcError(
                401,
                "UNAUTHENTICATED",
                _MISSING_CREDENTIALS,
                details=[_error_info("CREDENTIALS_MISSING", "googleapis.com")],
                headers={"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'},
            )
        with self._lock:
            known_caller = bearer in self._grants
        if not known_caller:
            raise RpcError(
                401,
                "UNAUTHENTICATED",
                _INVALID_CREDENTIALS,
                headers={
                    "WWW-Authenticate": (
                        'Bearer realm="https://accounts.google.com/", error="invalid_token"'
                    )
                },
            )
        scopes, lifetime, delegates = self._parse_body(body)
        if project != "-":
            # [REF] "The - wildcard character is required; replacing it with a project ID is
            # invalid."
            raise _invalid(
                f"Invalid resource name projects/{project}/serviceAccounts/{account}: the "
                "project must be the '-' wildcard."
            )
        with self._lock:
            missing = [a for a in (*delegates, account) if a not in self._accounts]
            if missing:
                raise RpcError(404, "NOT_FOUND", f"Not found; Unknown service account {missing[0]}")
            # [REF] caller -> delegates[0] -> ... -> delegates[-1] -> target, each link a grant.
            chain = [bearer, *delegates]
            targets = [*delegates, account]
            if any(
                target not in self._grants.get(p, ())
                for p, target in zip(chain, targets, strict=True)
            ):
                raise RpcError(
                    403,
                    "PERMISSION_DENIED",
                    _DENIED,
                    details=[
                        _error_info(
                            "IAM_PERMISSION_DENIED",
                            "iam.googleapis.com",
                            {"permission": PERMISSION},
                        )
                    ],
                )
            issued_at = datetime.now(UTC)
            expire_time = issued_at + timedelta(seconds=lifetime)
            token = IssuedToken(
                access_token="ya29." + secrets.token_urlsafe(96),
                service_account=account,
                scopes=tuple(scopes),
                delegates=tuple(delegates),
                lifetime_seconds=lifetime,
                issued_at=issued_at,
                expire_time=expire_time,
                caller_token=bearer,
            )
            self._issued.append(token)
            if self.ledger is not None:
                with self.ledger.open("a", encoding="utf-8") as handle:
                    handle.write(token.access_token + "\n")
        return {"accessToken": token.access_token, "expireTime": _rfc3339(expire_time)}

    def _parse_body(self, body: Any) -> tuple[list[str], float, list[str]]:
        if not isinstance(body, dict):
            raise _invalid("Invalid JSON payload received. Expected an object.")
        unknown = sorted(set(body) - _KNOWN_FIELDS)
        if unknown:
            raise _invalid(
                f'Invalid JSON payload received. Unknown name "{unknown[0]}": Cannot find field.'
            )
        scopes = body.get("scope")
        if scopes is None or scopes == []:
            raise _invalid("Scope required.")  # [REF] "At least one value required."
        if not isinstance(scopes, list) or not all(isinstance(s, str) and s for s in scopes):
            raise _invalid("Invalid value at 'scope' (TYPE_STRING): expected a list of strings.")
        raw_lifetime = body.get("lifetime")
        lifetime = float(DEFAULT_LIFETIME_SECONDS)
        if raw_lifetime is not None:
            match = _DURATION.fullmatch(raw_lifetime) if isinstance(raw_lifetime, str) else None
            if match is None:
                raise _invalid(
                    "Invalid value at 'lifetime' (type.googleapis.com/google.protobuf.Duration)"
                    f": {str(raw_lifetime)[:40]!r}"
                )
            lifetime = float(f"{match['seconds']}.{match['nanos'] or 0}")
            if not 1 <= lifetime <= self.max_lifetime_seconds:
                raise _invalid(
                    f"The lifetime must be between 1s and {self.max_lifetime_seconds}s "
                    f"(got {raw_lifetime})."
                )
        raw_delegates = body.get("delegates", [])
        if not isinstance(raw_delegates, list):
            raise _invalid("Invalid value at 'delegates' (TYPE_STRING): expected a list.")
        delegates: list[str] = []
        for name in raw_delegates:
            match = _DELEGATE.fullmatch(name) if isinstance(name, str) else None
            if match is None or match["project"] != "-":
                raise _invalid(
                    f"Invalid delegate {str(name)[:120]!r}: expected "
                    "projects/-/serviceAccounts/{ACCOUNT_EMAIL_OR_UNIQUEID}."
                )
            delegates.append(match["account"])
        return scopes, lifetime, delegates


def _error_info(reason: str, domain: str, metadata: dict[str, str] | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": reason,
        "domain": domain,
    }
    if metadata:
        info["metadata"] = metadata
    return info


# -- HTTP ----------------------------------------------------------------------------------------


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[http.server.BaseHTTPRequestHandler],
        app: IamCredentialsTestServer,
    ) -> None:
        self.app = app
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and hung up leaves a broken pipe behind: not a server bug.
        pass


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # One buffered write per answer (flushed by the base class) and no Nagle: headers and body
    # in separate segments would meet the client's delayed ACK and cost ~40 ms per request.
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no request lines on stderr (they would carry nothing secret, but add noise)

    def do_POST(self) -> None:
        self._serve("POST")

    def do_GET(self) -> None:
        self._serve("GET")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _bearer(self) -> str | None:
        value = self.headers.get("Authorization", "")
        scheme, _, token = value.partition(" ")
        return token.strip() or None if scheme.lower() == "bearer" else None

    def _serve(self, method: str) -> None:
        app = self.server.app
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        path = urlsplit(self.path).path
        bearer = self._bearer()
        body: Any = None
        fault = app._next_fault()
        if fault is not None and fault.delay:
            time.sleep(fault.delay)
        if fault is not None and fault.status is not None:
            self._fault(fault, method, path, bearer)
            return
        try:
            route = _PATH.fullmatch(unquote(path.removesuffix(_METHOD_SUFFIX)))
            if method != "POST" or not path.endswith(_METHOD_SUFFIX) or route is None:
                raise RpcError(404, "NOT_FOUND", f"Method not found: {method} {path[:200]}")
            try:
                body = json.loads(raw) if raw else {}
            except (ValueError, UnicodeDecodeError):
                raise _invalid("Invalid JSON payload received. Unexpected token.") from None
            answer = app.generate_access_token(route["project"], route["account"], bearer, body)
        except RpcError as error:
            app._record(RecordedRequest(method, path, bearer, body, error.http_status))
            self._send(error.http_status, error.body(), error.headers)
            return
        app._record(RecordedRequest(method, path, bearer, body, 200))
        self._send(200, answer, {})

    def _fault(self, fault: Fault, method: str, path: str, bearer: str | None) -> None:
        assert fault.status is not None
        app = self.server.app
        app._record(RecordedRequest(method, path, bearer, None, fault.status))
        headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
        if fault.body == "rpc":
            details = []
            if fault.retry_delay:
                details.append(
                    {
                        "@type": "type.googleapis.com/google.rpc.RetryInfo",
                        "retryDelay": fault.retry_delay,
                    }
                )
            error = RpcError(
                fault.status,
                _RPC_STATUS.get(fault.status, "UNKNOWN"),
                "The service is currently unavailable." if fault.status >= 500 else "Injected.",
                details=details,
            )
            self._send(fault.status, error.body(), headers)
        elif fault.body == "html":
            page = b"<html><body><h1>Error: Server Error</h1></body></html>"
            self._send_bytes(fault.status, page, "text/html; charset=UTF-8", headers)
        else:
            self._send_bytes(fault.status, b"", "text/plain", headers)

    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str]) -> None:
        data = json.dumps(payload, indent=2).encode()
        self._send_bytes(status, data, "application/json; charset=UTF-8", headers)

    def _send_bytes(
        self, status: int, data: bytes, content_type: str, headers: dict[str, str]
    ) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
