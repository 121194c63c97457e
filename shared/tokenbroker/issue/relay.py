"""The relay: for credentials that cannot be scoped (static API keys such as Omie's
``app_key``/``app_secret`` in the body, SIGE's header token, full-scope OAuth tokens), the broker
injects the credential itself and forwards the caller's request to the provider.

``{METHOD} /relay/{connection}/{path}`` goes to the policy route's ``base_url`` + ``path`` only
for the methods and path prefixes the policy allows. It is never an open proxy:

* the connection's status is read on every request: a disabled or removed connection, or one
  that needs re-authorisation, is not relayed from the next request on, and a credential is
  served from the cache only for the version the state names (a rotation is seen at once);
* the target host is fixed by the policy; the caller's path cannot change it (checked again
  after joining), and a path that is not in the one form the relay sends as it is (dot
  segments, ``;`` parameters, encoded separators, controls...: :func:`check_target`) is a 400;
* the method is the route's: another is a 405 with ``Allow``, and method-override parameters
  (``_method``) in the query or a POST body are a 400;
* only an allow-list of the caller's headers is forwarded (content negotiation, conditional
  requests, a request id: ``_FORWARD_REQUEST``); hop-by-hop headers (RFC 9110 §7.6.1),
  ``Host``, cookies, ``Forwarded``/``X-Forwarded-*``, method and path overrides, the caller's
  own ``Authorization`` or ``X-Serverless-Authorization`` and any header the route sets from
  the credential never are, so a caller can neither forward its ID token, nor re-route the
  request, nor pre-empt the injected value;
* ``Accept-Encoding`` is the transport's: the answer must arrive in an encoding it decodes,
  or the injected secret could not be scrubbed from it;
* redirects are never followed (a 3xx goes back to the caller as is);
* request and response sizes and the time are bounded;
* only an allow-list of the provider's headers comes back (``_FORWARD_RESPONSE``), and an
  echo of the injected secret in them or in the body, raw or in a common encoding
  (:class:`EchoRedactor`), is replaced by ``[REDACTED]``.

Values in, values out (the sans-I/O shape of h11): :meth:`Relay.authorize` decides who may call
which route from plain strings, :meth:`Relay.forward` builds the
:class:`~tokenbroker.kernel.http.OutboundRequest`, sends it through the
:class:`~tokenbroker.ports.RelayTransport` port and returns the scrubbed answer as an
:class:`~tokenbroker.kernel.http.HttpResponse`. Reading the request and writing the answer are
the HTTP edge's job (``entrypoints/issuer.py``); the two steps let it read the body only after
the caller is authenticated and authorised, with the route's own size limit.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import threading
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from urllib.parse import parse_qsl, quote, unquote_to_bytes

from tokenbroker.issue.live import LiveRecords, outcome_of, read_credential
from tokenbroker.issue.policy import (
    MAX_RELAY_PATH_CHARS,
    RELAY_DENIED,
    Inject,
    IssuePolicy,
    RelayRoute,
)
from tokenbroker.kernel.clock import Clock, SystemClock
from tokenbroker.kernel.errors import (
    BadRequest,
    CredentialUnavailable,
    MethodNotAllowed,
    NotFound,
    PolicyDenied,
    TokenBrokerError,
    TransportError,
)
from tokenbroker.kernel.fields import ascii_lower
from tokenbroker.kernel.http import DEFAULT_MAX_RESPONSE_BYTES, HttpResponse, OutboundRequest
from tokenbroker.kernel.log import get_logger
from tokenbroker.kernel.model import (
    Caller,
    Connection,
    ConnectionRecord,
    Credential,
)
from tokenbroker.kernel.redact import MIN_KNOWN_VALUE_CHARS
from tokenbroker.ports import CallerVerifier, RelayTransport, SecretStore, StateStore

MAX_RESPONSE_BYTES = DEFAULT_MAX_RESPONSE_BYTES
CACHE_SECONDS = 30.0
REDACTED = b"[REDACTED]"
#: What a route may inject. Refresh tokens are never sent anywhere but the token endpoint.
INJECTABLE = frozenset({"access_token", "client_secret", "client_id"})

_DROP_REQUEST = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailer", "transfer-encoding", "upgrade", "host", "authorization", "cookie",
        "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
        "content-length", "x-cloud-trace-context", "traceparent", "accept-encoding",
    }
)  # fmt: skip
#: The only caller headers forwarded upstream (issue 9: a deny-list let method and path
#: override headers -- ``X-HTTP-Method-Override``, ``X-Original-URL`` -- and the caller's
#: ``X-Serverless-Authorization`` reach the provider). Content negotiation, conditional
#: requests and a request id; everything else the route decides.
_FORWARD_REQUEST = frozenset(
    {
        "accept", "accept-language", "content-type", "user-agent", "if-match",
        "if-none-match", "if-modified-since", "if-unmodified-since", "prefer", "x-request-id",
        "idempotency-key",
    }
)  # fmt: skip
#: The only provider headers passed back to the caller (issue 9): what describes the answer
#: (type, language, caching, validators, ranges), where to go next (``Location``, ``Link``),
#: when to come back (``Retry-After``, rate-limit counters) and a request id. Every value is
#: scrubbed too. Anything else is dropped, because a scrub finds only what the relay itself
#: injected: a ``Set-Cookie`` or ``X-Session-Token`` the provider opened *for* that credential
#: is a credential of its own, usable at the provider without the policy, and unrecognisable;
#: hop-by-hop headers (RFC 9110 §7.6.1) and framing (``Content-Length``, ``Content-Encoding``:
#: the body is decoded and rewritten here) belong to the provider's connection, not the
#: caller's; ``WWW-Authenticate`` speaks about the injected credential, and a caller reading it
#: would take it as a refusal of its own ID token (the status still says 401).
_FORWARD_RESPONSE = frozenset(
    {
        "content-type", "content-language", "content-disposition", "content-range",
        "content-location", "accept-ranges", "cache-control", "expires", "last-modified",
        "etag", "vary", "age", "location", "link", "retry-after", "preference-applied",
        "deprecation", "sunset", "x-request-id", "request-id", "x-correlation-id",
        "x-total-count",
    }
)  # fmt: skip
#: The ``Content-Encoding`` values whose answers reach the relay decoded: the transport
#: undoes one gzip, deflate, br or zstd coding (aiohttp's ``auto_decompress``, which raises when
#: it lacks the library for one) and leaves anything else -- two codings, an unknown one --
#: as it came, so a secret inside it could not be scrubbed.
_DECODED_BY_TRANSPORT = frozenset({"", "identity", "gzip", "deflate", "br", "zstd"})
#: Charsets that write ASCII with NUL bytes beside it (a secret in them is not found by a byte
#: search), declared or announced by a byte order mark (RFC 8259 §8.1 asks for UTF-8 without one).
_WIDE_CHARSET = re.compile(r"""charset\s*=\s*["']?\s*(?:utf-?(?:16|32)|ucs-?[24]|unicode)""", re.I)
_WIDE_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")
#: Rate-limit families (draft-ietf-httpapi-ratelimit-headers and the ``X-`` forms in use).
_FORWARD_RESPONSE_PREFIXES = ("ratelimit", "x-ratelimit-", "x-rate-limit-")


@dataclass(frozen=True)
class _CachedCredential:
    credential: Credential
    #: The registration it was read for (``created_at`` included) and the state's
    #: ``current_version`` then: served only while both are still so. The version alone is not
    #: enough: a connection removed and registered again starts again at version 1.
    connection: Connection
    state_version: int | None
    read_at: datetime


@dataclass
class _RelayAudit:
    """What one relay decision found out, filled in as it goes."""

    #: Until the decision ends: a request cancelled (the caller went away) stays so.
    outcome: str = "cancelled"
    caller: str | None = None
    relay: str | None = None
    connection: str | None = None
    method: str = ""
    path: str = ""
    status: int | None = None
    reason: str | None = None
    detail: str | None = None

    def failed(self, error: Exception) -> None:
        if isinstance(error, MethodNotAllowed):
            self.outcome, self.reason = "method_not_allowed", error.code
        elif isinstance(error, TokenBrokerError):
            self.outcome, self.reason = outcome_of(error), error.code
        else:
            self.outcome, self.reason = "error", "internal_error"
        if isinstance(error, TokenBrokerError):
            self.detail = error.message


@dataclass(frozen=True)
class RelayPermit:
    """A relay call the policy allows: who asked, the route chosen, and the request line.

    Issued by :meth:`Relay.authorize` before the request body is read, so a body is only
    ever buffered for an authenticated, authorised caller and only up to its route's
    ``max_body_bytes``.
    """

    caller: Caller
    route: RelayRoute
    method: str
    #: The raw (still percent-encoded) path below the route, without the query.
    path: str

    @property
    def max_body_bytes(self) -> int:
        return self.route.max_body_bytes


class Relay:
    """The relay's decisions for one policy. ``transport`` sends (the aiohttp adapter when
    deployed, a recording one in tests). Every relayed request checks the connection's record
    (its status, its current version, its client id), read from ``state`` again whenever the
    store's change marker moved; the credential is read from ``secrets`` once per
    registration and version, and at least every :data:`CACHE_SECONDS`."""

    def __init__(
        self,
        *,
        verifier: CallerVerifier,
        policy: IssuePolicy,
        secrets: SecretStore,
        transport: RelayTransport,
        state: StateStore,
        clock: Clock | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self.verifier = verifier
        self.policy = policy
        self.secrets = secrets
        self.transport = transport
        self.state = state
        self.clock = clock or SystemClock()
        self.max_response_bytes = max_response_bytes
        self._cache: dict[str, _CachedCredential] = {}
        by_name: dict[str, tuple[RelayRoute, ...]] = {}
        by_connection: dict[str, tuple[RelayRoute, ...]] = {}
        for route in policy.relays:
            by_name[route.name] = (*by_name.get(route.name, ()), route)
            by_connection[route.connection] = (*by_connection.get(route.connection, ()), route)
        self._by_name = by_name
        self._by_connection = by_connection
        #: Each connection's record as the store has it now (bounded by the policy: only the
        #: connections its relays name are looked up).
        self._records = LiveRecords(state, denied=RELAY_DENIED)
        self._lock = threading.Lock()
        self.secret_reads = 0
        #: Decisions by audit outcome (relayed, denied, ...), for the metrics.
        self.decisions: Counter[str] = Counter()
        self.log = get_logger(component="relay")

    # -- deciding --------------------------------------------------------------------------------

    async def authorize(self, authorization: str | None, method: str, target: str) -> RelayPermit:
        """Who is calling and which route serves ``method`` on ``target``, or the refusal.

        ``target`` is the raw (percent-encoded) request path below ``/relay/``:
        ``{relay name or connection}/{path}``, without the query. In order: the caller is
        authenticated (401); the path must be in the one form the relay sends as it is
        (:func:`check_target`, 400: it depends on the path alone, so it says nothing about the
        policy); the caller must have a route by that name (403, the same for relays that do
        not exist); the method must be one its routes allow (405 with ``Allow``: the method is
        the route's, RFC 9110 §15.5.6); and the policy must allow the path (403). A refusal
        leaves its audit line (:meth:`_audit`); a permit's line is left by :meth:`forward`.
        """
        started = time.perf_counter()
        name, _, path = target.partition("/")
        audit = _RelayAudit(relay=name[:64], method=method, path=path)
        try:
            caller = await self.verifier.averify_authorization(authorization)  # keys off-loop
            audit.caller = caller.email
            return self._authorize(caller, method, target)
        except Exception as error:
            audit.failed(error)
            self._audit(audit, started)
            raise

    def _authorize(self, caller: Caller, method: str, target: str) -> RelayPermit:
        check_target(target)
        name, _, path = target.partition("/")
        routes = self._routes_for(caller.email, name)
        if not routes:
            raise PolicyDenied(RELAY_DENIED)
        methods = {str(m) for r in routes for m in r.methods}
        if method not in methods:
            raise MethodNotAllowed(tuple(sorted(methods)))
        route = self.policy.relay(caller.email, name, method, path)
        return RelayPermit(caller=caller, route=route, method=method, path=path)

    def _routes_for(self, email: str, name: str) -> list[RelayRoute]:
        """The caller's routes for ``name``: the relay of that name, else the connection's
        relays (as :meth:`IssuePolicy.relay` chooses)."""
        candidates = self._by_name.get(name) or self._by_connection.get(name, ())
        return [r for r in candidates if r.allows_caller(email)]

    async def relay(
        self,
        authorization: str | None,
        method: str,
        target: str,
        *,
        query: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> HttpResponse:
        """:meth:`authorize` then :meth:`forward`, for a request whose body is already read."""
        permit = await self.authorize(authorization, method, target)
        return await self.forward(permit, query=query, headers=headers, body=body)

    async def forward(
        self,
        permit: RelayPermit,
        *,
        query: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> HttpResponse:
        """Inject the credential, send, and return the provider's answer, scrubbed.

        ``headers`` are the caller's, as (name, value) pairs in any case; ``query`` the raw
        query string (no ``?``). Before anything is read from a store: the query's form and
        method overrides (400). Then the connection's status (409, or 403 once removed), the
        credential, the request as sent. The answer keeps the provider's status (a 3xx
        included) and its allow-listed headers, scrubbed. One audit line either way.
        """
        started = time.perf_counter()
        audit = _RelayAudit(
            caller=permit.caller.email, relay=permit.route.name,
            connection=permit.route.connection, method=permit.method, path=permit.path,
        )  # fmt: skip
        try:
            answer = await self._forward(permit, query=query, headers=headers, body=body)
        except Exception as error:
            audit.failed(error)
            raise
        else:
            audit.outcome, audit.status = "relayed", answer.status
        finally:
            self._audit(audit, started)
        return answer

    async def _forward(
        self,
        permit: RelayPermit,
        *,
        query: str | None,
        headers: Iterable[tuple[str, str]],
        body: bytes,
    ) -> HttpResponse:
        route = permit.route
        if len(body) > route.max_body_bytes:
            raise BadRequest(f"request body larger than {route.max_body_bytes} bytes")
        headers = list(headers)
        check_query(query)
        if permit.method == "POST":
            # A body route sends JSON whatever the caller says its body is.
            as_json = route.inject is Inject.BODY
            _check_no_override_in_body(headers, body, as_json=as_json)
        record = await self._record(route.connection)
        credential = await self._credential(record)
        outbound, injected = self._outbound(
            permit, query=query, headers=headers, body=body, record=record, credential=credential
        )
        try:
            answer = await self.transport.send(outbound)
        except TransportError as error:
            raise CredentialUnavailable(f"provider {error.message}", retry_after=5) from None
        unscannable = _unscannable(answer)
        if unscannable is not None:
            raise CredentialUnavailable(
                f"provider answered in {unscannable} the relay cannot scrub", retry_after=5
            )
        # What was injected, and the connection's other secrets too: a provider may know (and
        # echo) more than it was sent, such as the refresh token behind an access token.
        known = [
            secret.reveal()
            for secret in (credential.access_token, credential.refresh_token,
                           credential.client_secret)
            if secret is not None
        ]  # fmt: skip
        return _scrubbed(answer, [*injected, *known])

    def _audit(self, audit: _RelayAudit, started: float) -> None:
        """The decision's line, as ``/token``'s (docs/issuer.md, "Audit"): who asked, which
        relay, connection, method and path, the outcome and its reason, the provider's status,
        and how long it took -- never credential material (error messages are built from
        codes and ids). Counted in ``decisions`` for the metrics."""
        self.decisions[audit.outcome] += 1
        fields: dict[str, object] = {
            "outcome": audit.outcome,
            "caller": audit.caller,
            "relay": audit.relay,
            "connection": audit.connection,
            "method": audit.method[:16],
            "path": audit.path[:200],
            "status": audit.status,
            "reason": audit.reason,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        }
        if audit.detail is not None:
            fields["detail"] = audit.detail[:300]
        if audit.outcome == "relayed":
            self.log.info("relay decision", **fields)
        elif audit.outcome == "error":
            self.log.error("relay decision", **fields)
        else:
            self.log.warning("relay decision", **fields)

    def _outbound(
        self,
        permit: RelayPermit,
        *,
        query: str | None,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        record: ConnectionRecord,
        credential: Credential,
    ) -> tuple[OutboundRequest, list[str]]:
        """The request as it goes on the wire, and the credential values put into it."""
        route = permit.route
        dropped = _DROP_REQUEST | route.credential_headers
        sent = {k: v for k, v in headers if k.lower() in _FORWARD_REQUEST - dropped}
        injected: list[str] = []
        if route.inject == "bearer":
            token = self._value(route, "access_token", record, credential)
            sent["Authorization"] = f"Bearer {token}"
            injected.append(token)
        elif route.inject == "header":
            if route.header is None:  # the policy requires one; refuse rather than send bare
                raise CredentialUnavailable(f"relay {route.name!r} names no header")
            value = self._value(route, route.header_value or "access_token", record, credential)
            sent[route.header] = value
            injected.append(value)
        elif route.inject == "body":
            try:
                payload = json.loads(body or b"{}")
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise BadRequest("relay body must be a JSON object") from None
            if not isinstance(payload, dict):
                raise BadRequest("relay body must be a JSON object")
            for field, attribute in route.body_fields.items():
                value = self._value(route, attribute, record, credential)
                payload[field] = value
                injected.append(value)
            body = json.dumps(payload).encode()
            sent = {k: v for k, v in sent.items() if k.lower() != "content-type"}
            sent["Content-Type"] = "application/json"
        request = OutboundRequest(
            method=permit.method,
            url=route.url_for(permit.path, query=query or None),
            headers=sent,
            body=body,
            timeout_seconds=float(route.timeout_seconds),
            max_response_bytes=self.max_response_bytes,
        )
        return request, injected

    @property
    def state_reads(self) -> int:
        """State reads so far (a record read again only when the store changed)."""
        return self._records.reads

    # -- the credential ----------------------------------------------------------------------------

    async def _record(self, connection_id: str) -> ConnectionRecord:
        """The connection's record as it is now: status is law, within one request (issue 9,
        item 2), as for ``/token`` (:class:`~tokenbroker.issue.live.LiveRecords`). A removed
        connection is refused as an unknown relay is."""
        return await self._records.get(connection_id)

    async def _credential(self, record: ConnectionRecord) -> Credential:
        """The current credential: from the cache only while the state still names the
        registration and version it was read for (a rotation, or a removal and registration
        again, is served at once) and for at most :data:`CACHE_SECONDS`: the backstop for
        writes that bypass the state, and for a registration indistinguishable from the one
        before (the same ``created_at``, which the registry stamps unless it is given one, and
        the same version number)."""
        connection_id = record.connection.id
        version = record.state.current_version
        now = self.clock.now()
        with self._lock:
            cached = self._cache.get(connection_id)
        if (
            cached is not None
            and cached.state_version == version
            and cached.connection == record.connection
            and now - cached.read_at < timedelta(seconds=CACHE_SECONDS)
        ):
            return cached.credential
        try:
            stored = await asyncio.to_thread(read_credential, self.secrets, connection_id, version)
        except NotFound:
            raise CredentialUnavailable(f"connection {connection_id!r} has no credential") from None
        except TokenBrokerError as error:
            if error.retryable:
                raise CredentialUnavailable("credential store unavailable", retry_after=5) from None
            raise
        self.secret_reads += 1
        with self._lock:
            self._cache[connection_id] = _CachedCredential(
                stored.credential, record.connection, version, now
            )
        return stored.credential

    def _value(
        self, route: RelayRoute, attribute: str, record: ConnectionRecord, credential: Credential
    ) -> str:
        if attribute not in INJECTABLE:
            raise CredentialUnavailable(f"relay {route.name!r} may not inject {attribute!r}")
        if attribute == "client_id":
            value = record.connection.client_id
        else:
            secret = getattr(credential, attribute)
            value = secret.reveal() if secret is not None else None
        if not value:
            raise CredentialUnavailable(f"connection {route.connection!r} has no {attribute}")
        return value


# -- request hygiene (issue 9, item 4) -----------------------------------------------------------

_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
#: Characters a decoded path segment may not hold, in itself or once NFKC-folded (U+FF0E, the
#: fullwidth full stop, is a ``.`` to a server that normalises Unicode): separators, escapes
#: and path parameters.
_SEGMENT_FORBIDDEN = frozenset("/\\;%?#")
#: Unicode categories never in a path: controls, format characters (zero-width, bidi
#: overrides), line and paragraph separators, surrogates, private use, unassigned.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})
#: Parameters that some frameworks read as the request's method (Laravel and Symfony's
#: ``_method``, Express's method-override, ``X-HTTP-Method-Override`` as a parameter).
_OVERRIDE_PARAMETERS = frozenset(
    {"_method", "x-http-method-override", "x-http-method", "x-method-override"}
)
_FORM = "application/x-www-form-urlencoded"


def _path_refused(reason: str) -> BadRequest:
    # The reason only: the path itself is the caller's input, and not echoed.
    return BadRequest(f"relay path not allowed: {reason}")


def check_target(target: str) -> None:
    """Refuse (400) a relay target not in the one form the relay sends on as it is.

    Refused, never repaired, because every server, proxy and framework between here and the
    provider repairs differently: dot segments (RFC 3986 §5.2.4), raw or encoded, in whole or
    in part (``.%2e``), or any segment of dots only; ``/``, ``\\``, ``%`` (double encoding),
    ``?`` or ``#`` once a segment is decoded; ``;`` anywhere (Tomcat and Spring strip path
    parameters, so ``..;/`` is a dot segment to them, and ``/admin;x=y`` is ``/admin``); empty
    segments (``//``, and a leading ``/`` that would make a network-path reference, §4.2);
    control and format characters, raw or encoded; raw spaces and non-ASCII (percent-encode
    them); malformed percent-encoding (``%zz``, IIS's ``%u002e``); bytes that are not UTF-8
    (overlong forms such as ``%c0%ae``); and anything that folds into one of those under
    Unicode NFKC (``%ef%bc%8e`` is a fullwidth ``.``).
    """
    if len(target) > MAX_RELAY_PATH_CHARS:
        raise _path_refused(f"longer than {MAX_RELAY_PATH_CHARS} characters")
    if any(not ("!" <= ch <= "~") for ch in target):
        raise _path_refused("a space, control or non-ASCII character (percent-encode it)")
    if _BAD_PERCENT.search(target):
        raise _path_refused("a malformed percent-encoding")
    segments = target.split("/")
    for index, segment in enumerate(segments):
        if not segment and index != len(segments) - 1:
            raise _path_refused("an empty segment ('//')")
        try:
            text = unquote_to_bytes(segment).decode("utf-8")
        except UnicodeDecodeError:
            raise _path_refused("percent-encoded bytes that are not UTF-8") from None
        for form in {text, unicodedata.normalize("NFKC", text)}:
            # Windows servers strip trailing dots and spaces: ".. " is ".." to them.
            if form and not form.strip(". "):
                raise _path_refused("a dot segment")
            if any(ch in _SEGMENT_FORBIDDEN for ch in form):
                raise _path_refused("a separator, parameter or escape inside a segment")
            if any(unicodedata.category(ch) in _FORBIDDEN_CATEGORIES for ch in form):
                raise _path_refused("a control or format character")


def check_query(query: str | None) -> None:
    """Refuse (400) a query that is not in the one form the relay sends on, or that names a
    method-override parameter: the method is the route's."""
    if not query:
        return
    if any(not ("!" <= ch <= "~") or ch in "#\\" for ch in query) or _BAD_PERCENT.search(query):
        raise BadRequest("relay query not allowed: a character to percent-encode")
    try:
        # Split on ';' as well: Rack (before 3) and PHP (arg_separator.input) may.
        pairs = parse_qsl(query.replace(";", "&"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise BadRequest(
            "relay query not allowed: percent-encoded bytes that are not UTF-8"
        ) from None
    if any(_is_override(name) for name, _ in pairs):
        raise BadRequest("relay query not allowed: a method-override parameter")
    if any(
        unicodedata.category(ch) in _FORBIDDEN_CATEGORIES for pair in pairs for ch in "".join(pair)
    ):
        raise BadRequest("relay query not allowed: a control or format character")


def _is_override(name: str) -> bool:
    """Whether a parameter named ``name`` would reach a framework as a method override, read
    as PHP reads names: leading spaces dropped, ``.`` and `` `` turned into ``_``, and
    ``name[...]`` taken for ``name``."""
    folded = ascii_lower(name).lstrip(" ").partition("[")[0]
    return re.sub(r"[ .]", "_", folded).strip() in _OVERRIDE_PARAMETERS


def _check_no_override_in_body(
    headers: Iterable[tuple[str, str]], body: bytes, *, as_json: bool
) -> None:
    """Refuse (400) a POST body whose top level names a method-override parameter: JSON
    (Laravel reads its input from a JSON body too; ``as_json`` when the relay sends it as JSON
    whatever its declared type) or an HTML form. Other bodies are the provider's business."""
    content_type = next((v for k, v in headers if k.lower() == "content-type"), "")
    media = "application/json" if as_json else ascii_lower(content_type.partition(";")[0].strip())
    names: Iterable[str] = ()
    if media == _FORM:
        try:
            names = (n for n, _ in parse_qsl(body.decode("utf-8"), keep_blank_values=True))
        except (UnicodeDecodeError, ValueError):
            return
    elif media == "application/json" or media.endswith("+json"):
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return  # not JSON: no framework reads a method from it
        if isinstance(payload, dict):
            names = (n for n in payload if isinstance(n, str))
    if any(_is_override(n) for n in names):
        raise BadRequest("relay body not allowed: a method-override parameter")


def _unscannable(answer: HttpResponse) -> str | None:
    """Why a secret in ``answer`` could not be found by a byte search, or ``None``: a body
    the transport left encoded (:data:`_DECODED_BY_TRANSPORT`), or text in a charset that
    writes ASCII with NUL bytes beside it (:data:`_WIDE_CHARSET`, :data:`_WIDE_BOMS`)."""
    coding = ascii_lower(answer.headers.get("content-encoding", "").strip())
    if coding not in _DECODED_BY_TRANSPORT:
        return "a content encoding"
    if _WIDE_CHARSET.search(answer.headers.get("content-type", "")):
        return "a UTF-16 or UTF-32 charset"
    if answer.body.startswith(_WIDE_BOMS):
        return "a UTF-16 or UTF-32 charset (byte order mark)"
    return None


def _scrubbed(answer: HttpResponse, injected: Iterable[str]) -> HttpResponse:
    """The answer as the caller may see it: only :data:`_FORWARD_RESPONSE` headers, whose
    values go on the wire as they are (visible Latin-1, no control characters), and every
    echo of an injected value (:class:`EchoRedactor`) replaced by ``[REDACTED]`` in the body
    and in those values."""
    redactor = EchoRedactor(injected)
    headers: dict[str, str] = {}
    for name, value in answer.headers.items():
        lowered = name.lower()
        if lowered not in _FORWARD_RESPONSE and not lowered.startswith(_FORWARD_RESPONSE_PREFIXES):
            continue
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            continue  # the edge could not put it on the wire
        if _UNSENDABLE.search(value):
            continue  # CR, LF, NUL...: never in a field value (RFC 9110 §5.5)
        # Scanned as the text it is (the transport decoded UTF-8), so an echo of a non-ASCII
        # value matches; the result is as sendable as the value was.
        text = value.encode("utf-8", "surrogateescape")
        headers[lowered] = redactor.redact(text).decode("utf-8", "surrogateescape")
    return HttpResponse(status=answer.status, body=redactor.redact(answer.body), headers=headers)


#: Injected values shorter than this are not looked for in answers: they would shred ordinary
#: text (the same floor as the log scrubber's).
MIN_REDACTED_CHARS = MIN_KNOWN_VALUE_CHARS
#: An encoded core (base64, hex) shorter than this could match ordinary text by chance.
_MIN_CORE_CHARS = 8
_UNSENDABLE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_HTML_NAMED = {"&": b"&amp;", "<": b"&lt;", ">": b"&gt;", '"': b"&quot;", "'": b"&(?:apos|#39);"}


def _hex_pattern(value: int, digits: int) -> bytes:
    """``value`` as ``digits`` hex digits, either case."""
    return b"".join(
        b"[" + c.lower() + c.upper() + b"]" if c.isalpha() else c
        for c in (bytes([d]) for d in f"{value:0{digits}x}".encode())
    )


def _char_pattern(char: str) -> bytes:
    """A regex for one character of a value as an echo may write it.

    ASCII letters and digits stand for themselves: no common encoder rewrites them (RFC 3986
    §2.3 says unreserved characters should not be percent-encoded; JSON and HTML escape only
    syntax). Everything else may also appear percent-encoded (RFC 3986 §2.1, either hex case,
    once or twice), as ``+`` for a space (HTML form encoding), JSON-escaped once or twice
    (RFC 8259 §7: ``\\"``, ``\\\\``, ``\\/``, ``\\uXXXX``) or as an HTML character
    reference (numeric, or named for the five characters ``html.escape`` rewrites).
    """
    raw = char.encode()
    if char.isascii() and char.isalnum():
        return re.escape(raw)
    forms = [re.escape(raw), b"".join(b"%(?:25)?" + _hex_pattern(b, 2) for b in raw)]
    if char == " ":
        forms.append(rb"\+")
    # UTF-16 code units: one, or a surrogate pair beyond the BMP (RFC 8259 §7).
    utf16 = char.encode("utf-16-be")
    code_units = [int.from_bytes(utf16[i : i + 2]) for i in range(0, len(utf16), 2)]
    forms.append(b"".join(rb"\\{1,3}u" + _hex_pattern(u, 4) for u in code_units))
    if char in '"\\/':
        forms.append(rb"\\{1,3}" + re.escape(raw))
    forms.append(b"&#0*" + str(ord(char)).encode() + b";")
    forms.append(b"&#[xX]0*" + _hex_pattern(ord(char), len(f"{ord(char):x}")) + b";")
    if char in _HTML_NAMED:
        forms.append(_HTML_NAMED[char])
    return b"(?:" + b"|".join(forms) + b")"


def _plain_forms(value: str) -> set[str]:
    """``value`` (as is, upper- or lower-cased) and the texts that stand for it once encoded:
    base64 (RFC 4648 §4 and the URL-safe alphabet of §5, padded or not) and hex (either case).

    Base64 writes 3 bytes as 4 characters, so a value inside a longer encoded string (``Basic
    base64(user:token)``, a base64 JSON document) is written differently depending on its offset
    modulo 3. For each of the three alignments, the characters that encode only the value's
    bytes -- its stable core -- are the same wherever it sits: those are searched for, and at
    most the two bytes at either end (in the groups it shares with its neighbours) are left.
    """
    forms = {value, value.upper(), value.lower()}  # quoted as is, or case-normalised
    # What gets base64- or hex-encoded may itself be the value quoted in JSON (a base64 JSON
    # document) or percent-encoded (a base64 URL).
    for text in {value, json.dumps(value)[1:-1], quote(value, safe="")}:
        data = text.encode()
        encoded: set[str] = set()
        for skip in range(3):
            core = data[skip : skip + (len(data) - skip) // 3 * 3]
            encoded.add(base64.b64encode(core).decode())
        full = base64.b64encode(data).decode()
        encoded |= {full, full.rstrip("=")}
        encoded |= {e.replace("+", "-").replace("/", "_") for e in encoded}
        forms |= {e for e in encoded if len(e.rstrip("=")) >= _MIN_CORE_CHARS}
        forms |= {data.hex(), data.hex().upper()}
    return forms


@lru_cache(maxsize=256)
def _echo_pattern(values: frozenset[str]) -> re.Pattern[bytes] | None:
    forms = {f for v in values if len(v) >= MIN_REDACTED_CHARS for f in _plain_forms(v)}
    if not forms:
        return None
    ordered = sorted(forms, key=len, reverse=True)  # the longest echo wins where two overlap
    return re.compile(b"|".join(b"".join(_char_pattern(c) for c in form) for form in ordered))


class EchoRedactor:
    """Finds the connection's secrets (those injected into one relayed request, and the
    others it holds) in the provider's answer.

    "Common encodings" are those of :func:`_plain_forms` (raw, upper- or lower-cased; base64
    of either alphabet, padded or not, at any alignment; hex) each written character by
    character as :func:`_char_pattern` allows (percent-encoding, form ``+``, JSON escapes once
    or twice, HTML references), in any mix. Not found: an encoder that rewrites letters and
    digits (``\\u0041`` for ``A``), base64 split across lines (MIME), encryption or
    compression (the transport undoes one gzip, deflate, br or zstd coding first, and an
    answer still encoded, or declared UTF-16 or UTF-32, is refused), undeclared UTF-16, and a
    value shorter than :data:`MIN_REDACTED_CHARS`. The pattern holds the values: it is never
    printed.
    """

    __slots__ = ("_pattern",)

    def __init__(self, values: Iterable[str]) -> None:
        self._pattern = _echo_pattern(frozenset(values))

    def redact(self, data: bytes) -> bytes:
        return data if self._pattern is None else self._pattern.sub(REDACTED, data)

    def __repr__(self) -> str:
        return "EchoRedactor(...)"
