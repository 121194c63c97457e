"""Test helpers shipped beside the code (as ``httpx.MockTransport`` and
structlog's ``testing`` module are): an in-memory OAuth token server that behaves like a strict real
one, for fast unit tests of anything that takes a :class:`TokenEndpoint`.

It rotates refresh tokens on every use and, like oidc-provider, treats re-use of a consumed
refresh token as theft: the whole grant is revoked. System tests use the real oidc-provider.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from tokenbroker.adapters.http import MAX_RESPONSE_BYTES
from tokenbroker.kernel.errors import TransportError
from tokenbroker.kernel.http import HttpResponse


@dataclass
class _Grant:
    client_id: str
    scope: str
    alive: bool = True


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    challenge: str
    scope: str
    used: bool = False
    #: Refresh tokens issued for this code: revoked if the code comes back (RFC 6749 §10.5).
    issued: list[str] = field(default_factory=list)


@dataclass
class FakeTokenServer:
    """A :class:`~tokenbroker.kernel.http.TokenEndpoint` with a strict provider inside."""

    clients: dict[str, str] = field(default_factory=lambda: {"client": "client-secret"})
    lifetime: int = 3600
    rotate: bool = True
    latency: float = 0.0
    #: Scripted answers consumed one per request before the real logic runs: an
    #: ``HttpResponse`` to return, or an exception (e.g. ``TransportError``) to raise.
    script: list[HttpResponse | Exception] = field(default_factory=list)
    requests: Counter[str] = field(default_factory=Counter)
    issued: list[str] = field(default_factory=list)
    _refresh: dict[str, _Grant] = field(default_factory=dict)
    _consumed: dict[str, _Grant] = field(default_factory=dict)
    _codes: dict[str, _Code] = field(default_factory=dict)

    def authorize(self, url: str, *, grant_scope: str | None = None) -> str:
        """What a consenting user's browser ends in: the authorization request at ``url``
        (RFC 6749 §4.1.1, PKCE S256 required) answered with a fresh code. ``grant_scope``:
        what the user consented to (default: everything asked)."""
        from urllib.parse import parse_qs, urlsplit  # noqa: PLC0415

        query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
        if query.get("response_type") != "code" or query.get("code_challenge_method") != "S256":
            raise ValueError("not an authorization-code request with PKCE S256")
        code = "code-" + secrets.token_urlsafe(24)
        self._codes[code] = _Code(
            client_id=query["client_id"],
            redirect_uri=query["redirect_uri"],
            challenge=query["code_challenge"],
            scope=query.get("scope", "") if grant_scope is None else grant_scope,
        )
        self.issued.append(code)
        return code

    def seed_refresh_token(self, client_id: str = "client", scope: str = "read") -> str:
        token = "rt-" + secrets.token_urlsafe(24)
        self._refresh[token] = _Grant(client_id, scope)
        self.issued.append(token)
        return token

    def grant_alive(self, refresh_token: str) -> bool:
        grant = self._refresh.get(refresh_token)
        return grant is not None and grant.alive

    def revoke(self, refresh_token: str) -> None:
        self._refresh[refresh_token].alive = False

    def _json(self, status: int, body: Mapping[str, object], **headers: str) -> HttpResponse:
        return HttpResponse(
            status, json.dumps(body).encode(), {k.lower(): v for k, v in headers.items()}
        )

    def _error(self, code: str, status: int = 400) -> HttpResponse:
        return self._json(status, {"error": code, "error_description": f"fake: {code}"})

    async def post_form(  # noqa: PLR0911 - one answer per grant and failure, as a server's
        self,
        url: str,  # noqa: ARG002 - one fake server answers for every URL
        form: Mapping[str, str],
        *,
        headers: Mapping[str, str],
    ) -> HttpResponse:
        if self.latency:
            await asyncio.sleep(self.latency)
        grant_type = form.get("grant_type", "")
        self.requests[grant_type] += 1
        if self.script:
            step = self.script.pop(0)
            if isinstance(step, Exception):
                raise step
            if len(step.body) > MAX_RESPONSE_BYTES:  # as the real adapter refuses them
                raise TransportError("token endpoint response exceeds 1 MiB", status=step.status)
            return step
        client_id = form.get("client_id")
        secret = form.get("client_secret")
        auth = headers.get("Authorization", "")
        if auth.startswith("Basic "):
            import base64  # noqa: PLC0415
            from urllib.parse import unquote  # noqa: PLC0415

            raw_id, _, raw_secret = base64.b64decode(auth[6:]).decode().partition(":")
            client_id, secret = unquote(raw_id), unquote(raw_secret)
        if grant_type == "refresh_token":
            if self.clients.get(client_id or "") != secret:
                return self._error("invalid_client", 401)
            return self._refresh_grant(form["refresh_token"], client_id or "", form.get("scope"))
        if grant_type == "authorization_code":
            if self.clients.get(client_id or "") != secret:
                return self._error("invalid_client", 401)
            return self._code_grant(form, client_id or "")
        if grant_type == "client_credentials":
            if self.clients.get(client_id or "") != secret:
                return self._error("invalid_client", 401)
            return self._token(form.get("scope", ""), refresh=None)
        return self._error("unsupported_grant_type")

    def _token(self, scope: str, refresh: str | None) -> HttpResponse:
        access = "at-" + secrets.token_urlsafe(24)
        self.issued.append(access)
        body: dict[str, object] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": self.lifetime,
            "scope": scope,
        }
        if refresh:
            body["refresh_token"] = refresh
        return self._json(200, body)

    def _code_grant(self, form: Mapping[str, str], client_id: str) -> HttpResponse:
        """RFC 6749 §4.1.3 with RFC 7636 §4.6: one use per code; a second use revokes what
        the first issued (§10.5)."""
        import base64  # noqa: PLC0415
        import hashlib  # noqa: PLC0415

        code = self._codes.get(form.get("code", ""))
        if code is None or code.client_id != client_id:
            return self._error("invalid_grant")
        if code.used:
            for token in code.issued:
                if token in self._refresh:
                    self._refresh[token].alive = False
            return self._error("invalid_grant")
        code.used = True
        verifier = form.get("code_verifier", "")
        digest = hashlib.sha256(verifier.encode()).digest()
        if (
            form.get("redirect_uri") != code.redirect_uri
            or base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != code.challenge
        ):
            return self._error("invalid_grant")
        refresh = "rt-" + secrets.token_urlsafe(24)
        self.issued.append(refresh)
        self._refresh[refresh] = _Grant(client_id, code.scope)
        code.issued.append(refresh)
        return self._token(code.scope, refresh=refresh)

    def _refresh_grant(self, token: str, client_id: str, scope: str | None) -> HttpResponse:
        if token in self._consumed:
            self._consumed[token].alive = False  # re-use detected: revoke the grant
            return self._error("invalid_grant")
        grant = self._refresh.get(token)
        if grant is None or not grant.alive or grant.client_id != client_id:
            return self._error("invalid_grant")
        # RFC 6749 §6: a refresh may ask for a subset of the granted scope, never more.
        if scope is not None and not set(scope.split()) <= set(grant.scope.split()):
            return self._error("invalid_scope")
        if not self.rotate:
            return self._token(scope or grant.scope, refresh=None)
        new = "rt-" + secrets.token_urlsafe(24)
        self.issued.append(new)
        del self._refresh[token]
        self._consumed[token] = grant
        self._refresh[new] = grant
        return self._token(scope or grant.scope, refresh=new)


def unreachable() -> TransportError:
    return TransportError("token endpoint unreachable: ClientConnectorError", ambiguous=False)
