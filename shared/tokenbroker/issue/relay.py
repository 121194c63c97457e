"""The relay: for credentials that cannot be scoped (static API keys such as Omie's
``app_key``/``app_secret`` in the body, SIGE's header token, full-scope OAuth tokens), the broker
injects the credential itself and forwards the caller's request to the provider.

``{METHOD} /relay/{connection}/{path}`` goes to the policy route's ``base_url`` + ``path`` only
for the methods and path prefixes the policy allows. It is never an open proxy:

* the target host is fixed by the policy; the caller's path cannot change it (checked again
  after joining);
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
* a provider that echoes the injected secret back (in the body or a header, raw, JSON-escaped
  or percent-encoded) gets it replaced by ``[REDACTED]``.

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
import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import quote

from tokenbroker.issue.policy import RELAY_DENIED, IssuePolicy, RelayRoute
from tokenbroker.kernel.clock import Clock, SystemClock
from tokenbroker.kernel.errors import (
    BadRequest,
    CredentialUnavailable,
    NeedsReauth,
    NotFound,
    PolicyDenied,
    TokenBrokerError,
    TransportError,
)
from tokenbroker.kernel.http import DEFAULT_MAX_RESPONSE_BYTES, HttpResponse, OutboundRequest
from tokenbroker.kernel.log import get_logger
from tokenbroker.kernel.model import Caller, ConnectionRecord, ConnectionStatus, Credential
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
_DROP_RESPONSE = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "transfer-encoding", "upgrade",
        "trailer", "set-cookie", "content-length", "content-encoding",
    }
)  # fmt: skip


@dataclass(frozen=True)
class _CachedCredential:
    credential: Credential
    #: The state's ``current_version`` when this was read: served only while it is still so.
    state_version: int | None
    read_at: datetime


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
    deployed, a recording one in tests). Every relayed request reads the connection's record
    from ``state`` (its status, its current version, its client id); the credential is read
    from ``secrets`` once per version, and at least every :data:`CACHE_SECONDS`."""

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
        self._lock = threading.Lock()
        self.secret_reads = 0
        self.log = get_logger(component="relay")

    # -- deciding --------------------------------------------------------------------------------

    def authorize(self, authorization: str | None, method: str, target: str) -> RelayPermit:
        """Who is calling and which route serves ``method`` on ``target``, or the refusal.

        ``target`` is the raw (percent-encoded) request path below ``/relay/``:
        ``{relay name or connection}/{path}``, without the query. The policy refuses encoded
        tricks itself; the raw form is what it must see.
        """
        caller = self.verifier.verify_authorization(authorization)
        name, _, path = target.partition("/")
        route = self.policy.relay(caller.email, name, method, path)
        return RelayPermit(caller=caller, route=route, method=method, path=path)

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
        permit = self.authorize(authorization, method, target)
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
        query string (no ``?``). The answer keeps the provider's status (a 3xx included) and
        its end-to-end headers.
        """
        route = permit.route
        if len(body) > route.max_body_bytes:
            raise BadRequest(f"request body larger than {route.max_body_bytes} bytes")
        record = await self._record(route.connection)
        credential = await self._credential(record)
        outbound, injected = self._outbound(
            permit, query=query, headers=headers, body=body, record=record, credential=credential
        )
        try:
            answer = await self.transport.send(outbound)
        except TransportError as error:
            self.log.warning(
                "relay got no answer",
                caller=permit.caller.email,
                route=route.name,
                connection=route.connection,
                error=error.message,
            )
            raise CredentialUnavailable(f"provider {error.message}", retry_after=5) from None
        scrubbed = _scrubbed(answer, injected)
        self.log.info(
            "relayed",
            caller=permit.caller.email,
            route=route.name,
            connection=route.connection,
            method=permit.method,
            status=answer.status,
        )
        return scrubbed

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

    # -- the credential ----------------------------------------------------------------------------

    async def _record(self, connection_id: str) -> ConnectionRecord:
        """The connection's record, read on every relayed request (a state read, not a secret
        read): status is law, within one request (issue 9, item 2). A removed connection is
        refused as an unknown relay is, as the issuer refuses it for ``/token``; a disabled
        one, or one that needs re-authorisation, is a 409 ``needs_reauth`` as there."""
        try:
            record = await asyncio.to_thread(self.state.get, connection_id)
        except NotFound:
            raise PolicyDenied(RELAY_DENIED) from None
        except TokenBrokerError as error:
            if error.retryable:
                raise CredentialUnavailable("state store unavailable", retry_after=5) from None
            raise
        if record.state.status is ConnectionStatus.NEEDS_REAUTH:
            raise NeedsReauth(f"connection {connection_id!r} needs re-authorisation")
        if record.state.status is ConnectionStatus.DISABLED:
            raise NeedsReauth(f"connection {connection_id!r} is disabled")
        return record

    async def _credential(self, record: ConnectionRecord) -> Credential:
        """The current credential: from the cache only while the state still names the version
        it was read for (a rotation is served at once) and for at most :data:`CACHE_SECONDS`
        (a backstop for writes that bypass the state)."""
        connection_id = record.connection.id
        version = record.state.current_version
        now = self.clock.now()
        with self._lock:
            cached = self._cache.get(connection_id)
        if (
            cached is not None
            and cached.state_version == version
            and now - cached.read_at < timedelta(seconds=CACHE_SECONDS)
        ):
            return cached.credential
        try:
            stored = await asyncio.to_thread(self.secrets.get, connection_id)
        except NotFound:
            raise CredentialUnavailable(f"connection {connection_id!r} has no credential") from None
        except TokenBrokerError as error:
            if error.retryable:
                raise CredentialUnavailable("credential store unavailable", retry_after=5) from None
            raise
        self.secret_reads += 1
        with self._lock:
            self._cache[connection_id] = _CachedCredential(stored.credential, version, now)
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


def _scrubbed(answer: HttpResponse, injected: Iterable[str]) -> HttpResponse:
    """The answer without hop-by-hop and cookie headers, every injected value replaced by
    ``[REDACTED]`` in the body and the header values, in each form an echo may take: as sent,
    JSON-escaped once (a JSON answer quoting a value) or twice (quoting the JSON request body
    as a string), and percent-encoded (a URL or a form)."""
    forms: set[str] = set()
    for value in injected:
        once = json.dumps(value)[1:-1]
        forms.update((value, once, json.dumps(once)[1:-1], quote(value, safe="")))
    ordered = sorted((f for f in forms if f), key=len, reverse=True)
    body = answer.body
    for form in ordered:
        body = body.replace(form.encode(), REDACTED)
    headers: dict[str, str] = {}
    for name, value in answer.headers.items():
        if name.lower() in _DROP_RESPONSE:
            continue
        kept = value
        for form in ordered:
            kept = kept.replace(form, REDACTED.decode())
        headers[name] = kept
    return HttpResponse(status=answer.status, body=body, headers=headers)
