"""The relay: for credentials that cannot be scoped (static API keys such as Omie's
``app_key``/``app_secret`` in the body, SIGE's header token, full-scope OAuth tokens), the broker
injects the credential itself and forwards the caller's request to the provider.

``{METHOD} /relay/{connection}/{path}`` goes to the policy route's ``base_url`` + ``path`` only
for the methods and path prefixes the policy allows. It is never an open proxy:

* the target host is fixed by the policy; the caller's path cannot change it (checked again
  after joining);
* hop-by-hop headers (RFC 9110 §7.6.1), ``Host``, cookies, ``Forwarded``/``X-Forwarded-*`` and
  the caller's own ``Authorization`` are dropped;
* redirects are never followed (a 3xx goes back to the caller as is);
* request and response sizes and the time are bounded;
* a provider that echoes the injected secret back gets it replaced by ``[REDACTED]``.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from tokenbroker.kernel.clock import Clock, SystemClock
from tokenbroker.kernel.errors import BadRequest, CredentialUnavailable, NotFound, TokenBrokerError
from tokenbroker.kernel.log import get_logger
from tokenbroker.kernel.model import Credential
from tokenbroker.ports import SecretStore

MAX_RESPONSE_BYTES = 10 * 1024 * 1024
CACHE_SECONDS = 30.0
#: What a route may inject. Refresh tokens are never sent anywhere but the token endpoint.
INJECTABLE = frozenset({"access_token", "client_secret", "client_id"})

_DROP_REQUEST = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailer", "transfer-encoding", "upgrade", "host", "authorization", "cookie",
        "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
        "content-length", "x-cloud-trace-context", "traceparent",
    }
)  # fmt: skip
_DROP_RESPONSE = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "transfer-encoding", "upgrade",
        "trailer", "set-cookie", "content-length", "content-encoding",
    }
)  # fmt: skip


class Relay:
    def __init__(
        self,
        *,
        verifier: Any,
        policy: Any,
        secrets: SecretStore,
        clock: Clock | None = None,
        client_ids: Mapping[str, str] | None = None,
        state: Any = None,
    ) -> None:
        self.verifier = verifier
        self.policy = policy
        self.secrets = secrets
        self.state = state
        self.clock = clock or SystemClock()
        self._client_ids = dict(client_ids or {})
        self._cache: dict[str, tuple[Credential, datetime]] = {}
        self._lock = threading.Lock()
        self._session: Any = None
        self.secret_reads = 0
        self.log = get_logger(component="relay")

    async def _credential(self, connection_id: str) -> Credential:
        now = self.clock.now()
        with self._lock:
            cached = self._cache.get(connection_id)
        if cached is not None and now - cached[1] < timedelta(seconds=CACHE_SECONDS):
            return cached[0]
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
            self._cache[connection_id] = (stored.credential, now)
        return stored.credential

    async def _client_id(self, connection_id: str) -> str | None:
        if connection_id not in self._client_ids and self.state is not None:
            record = await asyncio.to_thread(self.state.get, connection_id)
            self._client_ids[connection_id] = record.connection.client_id or ""
        return self._client_ids.get(connection_id) or None

    async def _value(self, route: Any, attribute: str, credential: Credential) -> str:
        if attribute not in INJECTABLE:
            raise CredentialUnavailable(f"relay {route.name!r} may not inject {attribute!r}")
        if attribute == "client_id":
            value = await self._client_id(route.connection)
        else:
            secret = getattr(credential, attribute)
            value = secret.reveal() if secret is not None else None
        if not value:
            raise CredentialUnavailable(f"connection {route.connection!r} has no {attribute}")
        return value

    async def handle(self, request: Any) -> Any:
        from starlette.responses import Response  # noqa: PLC0415

        from tokenbroker.entrypoints.issuer import read_body  # noqa: PLC0415

        caller = self.verifier.verify_authorization(request.headers.get("authorization"))
        # The raw (still percent-encoded) path: the policy refuses encoded tricks itself.
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        rest = raw_path.decode("latin-1").removeprefix("/relay/")
        connection_id, _, path = rest.partition("/")
        route = self.policy.relay(caller.email, connection_id, request.method, path)
        body = await read_body(request, route.max_body_bytes)
        credential = await self._credential(route.connection)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
        injected: list[str] = []
        if route.inject == "bearer":
            token = await self._value(route, "access_token", credential)
            headers["Authorization"] = f"Bearer {token}"
            injected.append(token)
        elif route.inject == "header":
            value = await self._value(route, route.header_value or "access_token", credential)
            headers[route.header] = value
            injected.append(value)
        elif route.inject == "body":
            try:
                payload = json.loads(body or b"{}")
            except ValueError:
                raise BadRequest("relay body must be a JSON object") from None
            if not isinstance(payload, dict):
                raise BadRequest("relay body must be a JSON object")
            for field, attribute in route.body_fields.items():
                value = await self._value(route, attribute, credential)
                payload[field] = value
                injected.append(value)
            body = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        url = route.url_for(path, query=request.url.query or None)
        status, response_headers, content = await self._forward(
            request.method, url, headers, body, route.timeout_seconds
        )
        for value in injected:
            content = content.replace(value.encode(), b"[REDACTED]")
        self.log.info(
            "relayed",
            caller=caller.email,
            route=route.name,
            connection=route.connection,
            method=request.method,
            status=status,
        )
        return Response(content, status_code=status, headers=response_headers)

    async def _forward(
        self, method: str, url: str, headers: dict[str, str], body: bytes, seconds: float
    ) -> tuple[int, dict[str, str], bytes]:
        import aiohttp  # noqa: PLC0415

        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=True)
        try:
            async with self._session.request(
                method,
                url,
                headers=headers,
                data=body or None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=seconds),
            ) as response:
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_chunked(64 * 1024):
                    size += len(chunk)
                    if size > MAX_RESPONSE_BYTES:
                        raise CredentialUnavailable("provider response too large")
                    chunks.append(chunk)
                kept = {
                    k: v for k, v in response.headers.items() if k.lower() not in _DROP_RESPONSE
                }
                return response.status, kept, b"".join(chunks)
        except TimeoutError:
            raise CredentialUnavailable("provider timed out", retry_after=5) from None
        except aiohttp.ClientError as exc:
            raise CredentialUnavailable(
                f"provider unreachable: {type(exc).__name__}", retry_after=5
            ) from None
