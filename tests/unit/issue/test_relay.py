"""The relay in process: its decisions on a recording in-memory RelayTransport, and the real
aiohttp transport against a provider API on 127.0.0.1.

What is proved: each injection kind puts the credential where the route says and nowhere
else; the caller's ID token, cookies, hop-by-hop and forwarding headers (and any header the
route sets itself) never reach the provider; redirects are handed back, not followed;
oversize and slow answers are refused; the injected secret never comes back to the caller;
policy denials and path tricks send nothing at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import html
import json
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.support.leaks import b64, recoverable
from tests.support.provider_api import ProviderApi
from tests.unit.issue.fakes import FakeVerifier, RecordingTransport
from tokenbroker.adapters.http import AiohttpRelayTransport
from tokenbroker.adapters.memory import MemorySecretStore, MemoryStateStore
from tokenbroker.entrypoints.answers import http_answer
from tokenbroker.issue.policy import (
    RELAY_DENIED,
    CredentialField,
    HttpMethod,
    Inject,
    IssuePolicy,
    RelayRoute,
)
from tokenbroker.issue.relay import EchoRedactor, Relay
from tokenbroker.kernel.clock import FakeClock
from tokenbroker.kernel.errors import (
    BadRequest,
    CredentialUnavailable,
    InvalidCallerToken,
    MethodNotAllowed,
    NeedsReauth,
    PolicyDenied,
    StoreUnavailable,
    TokenBrokerError,
    TransportError,
)
from tokenbroker.kernel.http import HttpResponse, OutboundRequest
from tokenbroker.kernel.log import capture_logs
from tokenbroker.kernel.model import Connection, ConnectionStatus, Credential, GrantType
from tokenbroker.kernel.secret import Secret
from tokenbroker.oauth.profiles import load_profiles
from tokenbroker.ports import RelayTransport
from tokenbroker.refresh.registry import ConnectionRegistry

T = TypeVar("T")

BILLING = "billing@p.iam.gserviceaccount.com"
WORKER = "crm-sync@p.iam.gserviceaccount.com"
STRANGER = "someone@elsewhere.iam.gserviceaccount.com"
OMIE_KEY = "omie-app-key-123"
OMIE_SECRET = "omie-app-secret\\XYZ+987/"  # '\\', '+' and '/' change under JSON or URL escaping
SIGE_TOKEN = "sige-header-token-Q1w2E3"
CRM_TOKEN = "AT-crm-live-4f9a"
RECORDED_BASE = "https://api.provider.test/api/"


def bearer(email: str) -> str:
    return f"Bearer {email}"


def routes(base_url: str) -> tuple[RelayRoute, ...]:
    return (
        RelayRoute(
            name="omie-clients",
            connection="omie",
            callers=(BILLING,),
            base_url=base_url,
            methods=frozenset({HttpMethod.POST}),
            path_prefixes=("geral/clientes",),
            inject=Inject.BODY,
            body_fields={
                "app_key": CredentialField.CLIENT_ID,
                "app_secret": CredentialField.CLIENT_SECRET,
            },
            max_body_bytes=4096,
        ),
        RelayRoute(
            name="sige",
            connection="sige",
            callers=(BILLING,),
            base_url=base_url,
            methods=frozenset({HttpMethod.GET, HttpMethod.POST}),
            path_prefixes=("pedidos", "gzip", "big", "slow"),
            inject=Inject.HEADER,
            header="X-Api-Token",
            header_value=CredentialField.CLIENT_SECRET,
            timeout_seconds=1,
        ),
        RelayRoute(
            name="crm-api",
            connection="crm",
            callers=("*@p.iam.gserviceaccount.com",),
            base_url=base_url,
            methods=frozenset({HttpMethod.GET}),
            path_prefixes=("v2/", "redirect"),
            inject=Inject.BEARER,
        ),
    )


class World:
    """Three connections (a body-injected API key pair, a header token, an OAuth access
    token), their relays, and a Relay over the given transport."""

    def __init__(
        self, transport: RelayTransport, base_url: str = RECORDED_BASE, **options: Any
    ) -> None:
        self.clock = FakeClock()
        self.secrets = MemorySecretStore()
        self.state = MemoryStateStore()
        self.transport = transport
        self.registry = registry = ConnectionRegistry(
            secrets=self.secrets, state=self.state, profiles=load_profiles(), clock=self.clock
        )
        now = self.clock.now()
        registry.register(
            Connection(id="omie", profile="generic", grant=GrantType.STATIC, client_id=OMIE_KEY),
            Credential(client_secret=Secret(OMIE_SECRET)),
        )
        registry.register(
            Connection(id="sige", profile="generic", grant=GrantType.STATIC),
            Credential(client_secret=Secret(SIGE_TOKEN)),
        )
        registry.register(
            Connection(id="crm", profile="generic", grant=GrantType.REFRESH_TOKEN,
                       client_id="client", token_url="https://idp.test/token"),
            Credential(refresh_token=Secret("rt-crm"), client_secret=Secret("cs-crm"),
                       access_token=Secret(CRM_TOKEN), expires_at=now + timedelta(hours=1)),
        )  # fmt: skip
        self.relay = Relay(
            verifier=FakeVerifier(),
            policy=IssuePolicy(relays=routes(base_url)),
            secrets=self.secrets,
            transport=transport,
            state=self.state,
            clock=self.clock,
            **options,
        )


def run(coroutine: Awaitable[T]) -> T:
    async def main() -> T:
        return await coroutine

    return asyncio.run(main())


@pytest.fixture
def recorded() -> tuple[World, RecordingTransport]:
    transport = RecordingTransport()
    return World(transport), transport


def relay(world: World, method: str, target: str, **options: Any) -> HttpResponse:
    authorization = options.pop("authorization", bearer(BILLING))
    return run(world.relay.relay(authorization, method, target, **options))


def whole(answer: HttpResponse) -> str:
    """Status, headers and body of an answer, as one text to search."""
    lines = [str(answer.status)] + [f"{k}: {v}" for k, v in answer.headers.items()]
    return "\n".join(lines) + "\n\n" + answer.body.decode("utf-8", "replace")


# --- decisions, on the recording transport --------------------------------------------------


def test_body_injection_merges_the_credential_into_the_callers_json(
    recorded: tuple[World, RecordingTransport],
) -> None:
    world, transport = recorded
    answer = relay(
        world, "POST", "omie/geral/clientes/",
        headers=[("content-type", "application/json; charset=utf-8"), ("accept", "*/*")],
        body=b'{"call": "ListarClientes", "app_secret": "caller-guess"}',
    )  # fmt: skip
    assert answer.status == 200
    (sent,) = transport.sent
    assert sent.method == "POST"
    assert sent.url == RECORDED_BASE + "geral/clientes/"
    assert json.loads(sent.body) == {
        "call": "ListarClientes", "app_key": OMIE_KEY, "app_secret": OMIE_SECRET,
    }  # fmt: skip
    content_types = [v for k, v in sent.headers.items() if k.lower() == "content-type"]
    assert content_types == ["application/json"]  # one, the relay's
    assert sent.headers["accept"] == "*/*"
    assert sent.timeout_seconds == 30
    # The echo carried both values; the caller gets neither.
    assert OMIE_SECRET.encode() not in answer.body
    assert OMIE_KEY.encode() not in answer.body
    assert b"[REDACTED]" in answer.body


def test_body_injection_needs_a_json_object(recorded: tuple[World, RecordingTransport]) -> None:
    world, transport = recorded
    for body in (b"not json", b"[1, 2]", b'"text"', b"\xff\xfe"):
        with pytest.raises(BadRequest):
            relay(world, "POST", "omie/geral/clientes/", body=body)
    assert transport.sent == []


def test_header_injection_replaces_whatever_the_caller_sent_under_that_name(
    recorded: tuple[World, RecordingTransport],
) -> None:
    world, transport = recorded
    relay(
        world, "GET", "sige/pedidos/42", query="page=2&size=10",
        headers=[("x-api-token", "caller-forged"), ("X-API-TOKEN", "again"), ("accept", "json")],
    )  # fmt: skip
    (sent,) = transport.sent
    tokens = [v for k, v in sent.headers.items() if k.lower() == "x-api-token"]
    assert tokens == [SIGE_TOKEN]
    assert sent.url == RECORDED_BASE + "pedidos/42?page=2&size=10"
    assert sent.body == b""
    assert sent.timeout_seconds == 1


def test_bearer_injection_replaces_the_callers_id_token(
    recorded: tuple[World, RecordingTransport],
) -> None:
    world, transport = recorded
    answer = relay(
        world, "GET", "crm/v2/contacts", authorization=bearer(WORKER),
        headers=[("authorization", bearer(WORKER))],
    )  # fmt: skip
    (sent,) = transport.sent
    authorizations = [v for k, v in sent.headers.items() if k.lower() == "authorization"]
    assert authorizations == [f"Bearer {CRM_TOKEN}"]
    assert CRM_TOKEN.encode() not in answer.body


def test_hop_by_hop_cookie_forwarding_and_tracing_headers_are_dropped(
    recorded: tuple[World, RecordingTransport],
) -> None:
    world, transport = recorded
    dropped = [
        ("connection", "keep-alive, x-secret-hop"), ("keep-alive", "timeout=5"), ("te", "trailers"),
        ("trailer", "x-checksum"), ("transfer-encoding", "chunked"), ("upgrade", "h2c"),
        ("proxy-authorization", "Basic abc"), ("proxy-authenticate", "Basic"),
        ("host", "evil.example"), ("cookie", "session=caller"), ("forwarded", "for=1.2.3.4"),
        ("x-forwarded-for", "1.2.3.4"), ("x-forwarded-host", "evil.example"),
        ("x-forwarded-proto", "http"), ("content-length", "999"),
        ("x-cloud-trace-context", "abc/1"), ("traceparent", "00-abc-def-01"),
        ("accept-encoding", "br, zstd"), ("authorization", bearer(BILLING)),
    ]  # fmt: skip
    kept = [("accept", "application/json"), ("user-agent", "worker/1.0"), ("x-request-id", "r1")]
    relay(world, "GET", "sige/pedidos/", headers=dropped + kept)
    (sent,) = transport.sent
    names = {k.lower() for k in sent.headers}
    assert names == {"accept", "user-agent", "x-request-id", "x-api-token"}


def test_only_allow_listed_caller_headers_reach_the_upstream(
    recorded: tuple[World, RecordingTransport],
) -> None:
    """Issue 9: a deny-list let method and path override headers and the caller's own
    ``X-Serverless-Authorization`` (its invoker token) through to the provider."""
    world, transport = recorded
    smuggled = [
        ("x-http-method-override", "DELETE"), ("x-http-method", "DELETE"),
        ("x-method-override", "PUT"), ("x-original-url", "/admin/"),
        ("x-rewrite-url", "/admin/"), ("x-original-method", "DELETE"),
        ("x-serverless-authorization", bearer(BILLING)), ("x-forwarded-prefix", "/admin"),
        ("x-real-ip", "10.0.0.1"), ("x-custom", "anything"), ("origin", "https://evil.example"),
    ]  # fmt: skip
    relay(world, "GET", "sige/pedidos/", headers=[*smuggled, ("if-none-match", '"v1"')])
    (sent,) = transport.sent
    assert {k.lower() for k in sent.headers} == {"if-none-match", "x-api-token"}
    assert sent.method == "GET"


def test_the_answer_loses_hop_by_hop_and_cookie_headers_and_every_echo_of_the_secret(
    recorded: tuple[World, RecordingTransport],
) -> None:
    world, transport = recorded
    once = json.dumps(OMIE_SECRET)[1:-1]
    echoes = [OMIE_SECRET, once, json.dumps(once)[1:-1], quote(OMIE_SECRET, safe="")]
    assert len(set(echoes)) == 4  # the forms differ for this secret
    body = b" ".join(b"echo=" + form.encode() for form in [*echoes, OMIE_KEY])
    transport.script.append(
        HttpResponse(
            201,
            body,
            {
                "content-type": "text/plain", "set-cookie": "s=1", "connection": "close",
                "content-length": "12", "content-encoding": "gzip", "transfer-encoding": "chunked",
                "location": f"https://api.provider.test/x?app_secret={echoes[3]}",
                "x-request-id": "r1",
            },
        )
    )  # fmt: skip
    answer = relay(world, "POST", "omie/geral/clientes/", body=b"{}")
    assert answer.status == 201
    assert set(answer.headers) == {"content-type", "location", "x-request-id"}
    assert answer.headers["location"] == "https://api.provider.test/x?app_secret=[REDACTED]"
    assert answer.body == b" ".join([b"echo=[REDACTED]"] * 5)


# --- echoes of the secret in the answer (issue 9, item 4) ---------------------------------------


def _u_escape(char: str) -> str:
    """``char`` as JSON's ``\\uXXXX`` escape: a surrogate pair beyond the BMP (RFC 8259 §7)."""
    units = char.encode("utf-16-be")
    return "".join(f"\\u{int.from_bytes(units[i : i + 2]):04x}" for i in range(0, len(units), 2))


#: How a provider may echo a value back: each a function of the value, each one "common".
ECHOES: dict[str, Callable[[str], str]] = {
    "raw": lambda v: v,
    "upper-cased": str.upper,  # a provider normalising what it quotes in an error
    "lower-cased": str.lower,
    "json": lambda v: json.dumps(v)[1:-1],
    "json-twice": lambda v: json.dumps(json.dumps(v))[1:-1],
    "json-php-slashes": lambda v: json.dumps(v)[1:-1].replace("/", "\\/"),
    "json-all-u-escapes-for-punctuation": lambda v: "".join(
        c if c.isalnum() else _u_escape(c) for c in v
    ),
    "json-upper-u-escapes": lambda v: "".join(
        c if c.isalnum() else _u_escape(c).upper().replace("\\U", "\\u") for c in v
    ),
    "percent": lambda v: quote(v, safe=""),
    "percent-keeping-slash": quote,
    "percent-lower-hex": lambda v: re.sub(
        r"%[0-9A-F]{2}", lambda m: m[0].lower(), quote(v, safe="")
    ),
    "form": quote_plus,
    "percent-twice": lambda v: quote(quote(v, safe=""), safe=""),
    "html": html.escape,
    "html-numeric": lambda v: "".join(c if c.isalnum() else f"&#{ord(c)};" for c in v),
    "html-hex": lambda v: "".join(c if c.isalnum() else f"&#x{ord(c):x};" for c in v),
    "base64": b64,
    "base64-unpadded": lambda v: b64(v, pad=False),
    "base64url": lambda v: b64(v, url=True),
    "base64url-unpadded": lambda v: b64(v, url=True, pad=False),
    "basic-auth-aligned-0": lambda v: "Basic " + b64("ab:" + v),
    "basic-auth-aligned-1": lambda v: "Basic " + b64("usr:" + v),
    "basic-auth-aligned-2": lambda v: "Basic " + b64("user:" + v),
    "base64-of-json": lambda v: b64(json.dumps({"token": v})),
    "base64url-of-json-unpadded": lambda v: b64(json.dumps({"k": v}), url=True, pad=False),
    "percent-encoded-base64": lambda v: quote(b64("user:" + v), safe=""),
    "hex": lambda v: v.encode().hex(),
    "hex-upper": lambda v: v.encode().hex().upper(),
    "hex-embedded": lambda v: ("x:" + v).encode().hex(),
}


@pytest.mark.parametrize("echo", sorted(ECHOES))
def test_every_common_encoding_of_the_secret_is_redacted_in_body_and_headers(
    recorded: tuple[World, RecordingTransport], echo: str
) -> None:
    world, transport = recorded
    for secret in (OMIE_SECRET, "Pä55 wörd: with space & <tags>/+= \U0001f511", CRM_TOKEN):
        world.registry.reauthorize("omie", client_secret=Secret(secret))
        encoded = ECHOES[echo](secret)
        assert recoverable(encoded, secret), "the oracle must see the echo"
        transport.script.append(
            HttpResponse(
                200,
                f'{{"echo": "{encoded}", "after": 1}}'.encode(),
                {
                    "content-type": "application/json",
                    "location": f"https://api.provider.test/next?cursor={encoded}&page=2",
                    "link": f'<https://api.provider.test/p?t={encoded}>; rel="next"',
                    "x-request-id": f"req-{encoded}",
                },
            )
        )
        answer = relay(world, "POST", "omie/geral/clientes/", body=b"{}")
        assert not recoverable(whole(answer), secret), (echo, whole(answer))
        assert answer.body.startswith(b'{"echo": "') and answer.body.endswith(b'", "after": 1}')
        assert b"[REDACTED]" in answer.body
        if all(ord(c) < 256 for c in encoded):
            assert answer.headers["location"].startswith("https://api.provider.test/next?cursor=")
            assert answer.headers["location"].endswith("&page=2")
        else:  # not Latin-1: the edge could not send that header, so it is dropped
            assert "location" not in answer.headers


def test_a_secret_echoed_in_any_response_header_never_reaches_the_caller(
    recorded: tuple[World, RecordingTransport],
) -> None:
    """Issue 9: only the body was scrubbed. An allow-list of response headers, each value
    scrubbed: an unknown header may carry what no scrub recognises (a session the provider
    opened for the injected credential), so it is dropped."""
    world, transport = recorded
    token = CRM_TOKEN
    transport.script.append(
        HttpResponse(
            200,
            b"{}",
            {
                "content-type": "application/json",
                "x-debug-token": token,
                "set-cookie": f"session={token}; HttpOnly",
                "www-authenticate": f'Bearer error="invalid_token", token="{token}"',
                "x-session-token": "derived-session-77c1",  # unknowable: dropped
                "authorization": f"Bearer {token}",
                "proxy-authenticate": "Basic",
                "location": f"https://api.provider.test/cb?access_token={quote_plus(token)}",
                "etag": f'"{token}"',
                "x-ratelimit-remaining": "42",
                "retry-after": "7",
                "cache-control": "private, max-age=5",
                "content-disposition": f'attachment; filename="{token}.json"',
                "strict-transport-security": "max-age=1",
                "server": "provider/1.0",
                "x-powered-by": "php",
                "content-security-policy": f"report-uri https://x/?t={token}",
                "alt-svc": 'h3=":443"',
            },
        )
    )
    answer = relay(world, "GET", "crm/v2/contacts", authorization=bearer(WORKER))
    assert set(answer.headers) == {
        "content-type", "location", "etag", "x-ratelimit-remaining", "retry-after",
        "cache-control", "content-disposition",
    }  # fmt: skip
    assert answer.headers["location"] == "https://api.provider.test/cb?access_token=[REDACTED]"
    assert answer.headers["etag"] == '"[REDACTED]"'
    assert (answer.headers["x-ratelimit-remaining"], answer.headers["retry-after"]) == ("42", "7")
    assert not recoverable(whole(answer), token)


def test_the_connections_other_secrets_are_redacted_too(
    recorded: tuple[World, RecordingTransport],
) -> None:
    """A provider may echo more than it was sent: the refresh token and client secret behind
    the injected access token are the connection's secrets all the same."""
    world, transport = recorded
    body = b'{"refresh_token": "rt-crm", "client_secret": "cs-crm", "hint": "cs-crm"}'
    transport.script.append(HttpResponse(200, body, {"content-type": "application/json"}))
    answer = relay(world, "GET", "crm/v2/contacts", authorization=bearer(WORKER))
    assert json.loads(answer.body) == {
        "refresh_token": "[REDACTED]", "client_secret": "[REDACTED]", "hint": "[REDACTED]",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json; charset=utf-16", json.dumps({"t": CRM_TOKEN}).encode("utf-16")),
        ("text/plain; charset=UTF-16LE", CRM_TOKEN.encode("utf-16-le")),
        ('text/plain; charset="utf-32"', CRM_TOKEN.encode("utf-32")),
        ("application/json", json.dumps({"t": CRM_TOKEN}).encode("utf-16")),  # a BOM says so
        ("application/json", b"\x00\x00\xfe\xff" + CRM_TOKEN.encode("utf-32-be")),
    ],
    ids=["utf-16", "utf-16le", "utf-32-quoted", "utf-16-bom", "utf-32be-bom"],
)
def test_an_answer_in_a_wide_charset_is_refused(
    recorded: tuple[World, RecordingTransport], content_type: str, body: bytes
) -> None:
    """UTF-16 and UTF-32 write every ASCII character with NUL bytes beside it: the secret in
    such a body is not found by a byte search, so the answer is refused, not passed on."""
    world, transport = recorded
    transport.script.append(HttpResponse(200, body, {"content-type": content_type}))
    with pytest.raises(CredentialUnavailable) as caught:
        relay(world, "GET", "crm/v2/contacts", authorization=bearer(WORKER))
    assert "charset" in caught.value.message


def test_an_answer_in_an_ascii_compatible_charset_passes(
    recorded: tuple[World, RecordingTransport],
) -> None:
    world, transport = recorded
    for content_type in ("text/plain; charset=iso-8859-1", "text/html; charset=utf-8", "x/y"):
        transport.script.append(
            HttpResponse(200, CRM_TOKEN.encode(), {"content-type": content_type})
        )
        answer = relay(world, "GET", "crm/v2/contacts", authorization=bearer(WORKER))
        assert answer.body == b"[REDACTED]"


def test_header_values_that_cannot_go_on_the_wire_are_dropped(
    recorded: tuple[World, RecordingTransport],
) -> None:
    world, transport = recorded
    transport.script.append(
        HttpResponse(
            200,
            b"{}",
            {
                "content-type": "application/json",
                "location": "https://x.test/\r\nset-cookie: a=b",
                "link": "<https://x.test/\u2603>",  # not latin-1: the edge could not encode it
                "etag": '"\x00"',
            },
        )
    )
    answer = relay(world, "GET", "crm/v2/contacts", authorization=bearer(WORKER))
    assert set(answer.headers) == {"content-type"}


def test_a_redirect_is_handed_back_as_it_is(recorded: tuple[World, RecordingTransport]) -> None:
    world, transport = recorded
    transport.script.append(HttpResponse(302, b"", {"location": "https://evil.example/steal"}))
    answer = relay(world, "GET", "crm/v2/contacts", authorization=bearer(WORKER))
    assert (answer.status, answer.headers["location"]) == (302, "https://evil.example/steal")
    assert len(transport.sent) == 1


@pytest.mark.parametrize(
    ("method", "target", "caller"),
    [
        ("POST", "nope/geral/clientes/", BILLING),  # no such relay or connection
        ("POST", "omie/geral/clientes/", STRANGER),  # caller not on the route
        ("POST", "omie/geral/clientes/", WORKER),  # same domain, but the route lists one email
        ("GET", "omie/geral/clientes/", STRANGER),  # a stranger learns no methods either
        ("POST", "omie/financas/contas/", BILLING),  # prefix not listed
        ("POST", "omie/geral/clientesX", BILLING),  # prefixes match whole segments
        ("POST", "omie/geral", BILLING),
        ("POST", "omie/", BILLING),
        ("POST", "omie", BILLING),
        ("POST", "%6fmie/geral/clientes/", BILLING),  # names are matched as sent
        ("POST", "omie/GERAL/clientes/", BILLING),  # paths are case-sensitive
        ("POST", "omie/geral/clientes%2f", BILLING),
    ],
)
def test_policy_denials_send_nothing(
    recorded: tuple[World, RecordingTransport], method: str, target: str, caller: str
) -> None:
    world, transport = recorded
    with pytest.raises((PolicyDenied, BadRequest)) as caught:
        relay(world, method, target, authorization=bearer(caller), body=b"{}")
    if target.endswith("%2f"):
        assert isinstance(caught.value, BadRequest)  # an encoded slash is a trick, not a miss
    else:
        assert isinstance(caught.value, PolicyDenied)
        assert http_answer(caught.value, public=True).status == 403
    assert transport.sent == []


#: Paths that could address something else once a server, a proxy or a framework in front of
#: the provider decodes, normalises or strips them. Each is refused, whoever asks.
PATH_TRICKS = {
    "dot-dot": "geral/clientes/../../admin",
    "dot-dot-at-end": "geral/clientes/..",
    "dot": "geral/./clientes/",
    "dot-at-end": "geral/clientes/.",
    "encoded-dot-dot": "geral/clientes/%2e%2e/%2e%2e/admin",
    "upper-encoded-dot-dot": "geral/clientes/%2E%2E/admin",
    "half-encoded-dot-dot": "geral/clientes/.%2e/admin",
    "only-dots": "geral/clientes/.../admin",
    "dot-dot-space": "geral/clientes/..%20/admin",  # Windows strips trailing spaces and dots
    "dot-dot-nbsp": "geral/clientes/..%c2%a0/admin",  # NFKC: a no-break space is a space
    "encoded-slash": "geral/clientes/..%2f..%2fadmin",
    "encoded-slash-alone": "geral/clientes/a%2fb",
    "encoded-backslash": "geral/clientes/a%5cb",
    "backslash": "geral/clientes/a\\b",
    "backslash-dot-dot": "geral/clientes/..\\admin",
    "double-encoding": "geral/clientes/%252e%252e/admin",
    "tomcat-dot-dot-semicolon": "geral/clientes/..;/admin",
    "semicolon-parameter": "geral/clientes;x=y/",
    "semicolon-session": "geral/clientes/;jsessionid=abc",
    "encoded-semicolon": "geral/clientes/a%3bb",
    "double-slash": "geral//clientes/",
    "trailing-double-slash": "geral/clientes//",
    "network-path": "/evil.example/geral/clientes/",
    "scheme": "https:%2f%2fevil.example/geral/clientes/",
    "nul": "geral/clientes/a\x00b",
    "encoded-nul": "geral/clientes/a%00b",
    "encoded-nul-after-dots": "geral/clientes/..%00/admin",
    "tab": "geral/clientes/a\tb",
    "encoded-newline": "geral/clientes/a%0d%0aHost:%20evil",
    "encoded-del": "geral/clientes/a%7fb",
    "raw-space": "geral/clientes/a b",
    "raw-non-ascii": "geral/clientes/caf\u00e9",
    "bad-percent": "geral/clientes/a%zz",
    "truncated-percent": "geral/clientes/a%2",
    "iis-unicode-percent": "geral/clientes/%u002e%u002e/admin",
    "overlong-utf8-dot": "geral/clientes/%c0%ae%c0%ae/admin",
    "overlong-utf8-slash": "geral/clientes/..%c0%afadmin",
    "invalid-utf8": "geral/clientes/%ff",
    "fullwidth-dot-dot": "geral/clientes/%ef%bc%8e%ef%bc%8e/admin",
    "two-dot-leader": "geral/clientes/%e2%80%a5/admin",
    "fullwidth-solidus": "geral/clientes/..%ef%bc%8fadmin",
    "fullwidth-backslash": "geral/clientes/..%ef%bc%bcadmin",
    "fragment": "geral/clientes/#x",
    "too-long": "geral/clientes/" + "a" * 5000,
}


@pytest.mark.parametrize("trick", sorted(PATH_TRICKS))
def test_path_tricks_are_a_400_and_send_nothing(
    recorded: tuple[World, RecordingTransport], trick: str
) -> None:
    """Issue 9: ``..;/`` (Tomcat and Spring read ``;...`` as a path parameter, then resolve the
    dot segment) and ``;``-parameters reached the provider. Refused, not repaired: the relay
    never sends a path other than the one the policy checked."""
    world, transport = recorded
    with pytest.raises(BadRequest) as caught:
        relay(world, "POST", "omie/" + PATH_TRICKS[trick], body=b"{}")
    answer = http_answer(caught.value, public=True)
    assert (answer.status, answer.body["error"]) == (400, "invalid_request")
    assert PATH_TRICKS[trick][:40] not in answer.body["error_description"]  # not echoed
    assert transport.sent == []


def test_path_tricks_are_refused_before_the_policy_is_asked(
    recorded: tuple[World, RecordingTransport],
) -> None:
    """The 400 depends on the path only: the same for strangers and unknown relays, so it tells
    nothing about the policy. The caller is still authenticated first."""
    world, _ = recorded
    for target, caller in (("nope/..;/x", BILLING), ("omie/..;/x", STRANGER)):
        with pytest.raises(BadRequest):
            relay(world, "POST", target, authorization=bearer(caller))
    with pytest.raises(InvalidCallerToken):
        relay(world, "POST", "omie/..;/x", authorization=None)


@pytest.mark.parametrize(
    ("method", "target", "caller", "allowed"),
    [
        ("GET", "omie/geral/clientes/", BILLING, ("POST",)),
        ("DELETE", "crm/v2/contacts", WORKER, ("GET",)),
        ("HEAD", "crm/v2/contacts", WORKER, ("GET",)),
        ("OPTIONS", "sige/pedidos/", BILLING, ("GET", "POST")),
        ("TRACE", "sige/pedidos/", BILLING, ("GET", "POST")),
        ("CONNECT", "sige/pedidos/", BILLING, ("GET", "POST")),
        ("get", "crm/v2/contacts", WORKER, ("GET",)),  # methods are case-sensitive (RFC 9110 §9.1)
        ("PUT", "omie/financas/", BILLING, ("POST",)),  # the method is judged before the path
    ],
)
def test_a_method_the_route_does_not_allow_is_a_405_with_allow(
    recorded: tuple[World, RecordingTransport],
    method: str,
    target: str,
    caller: str,
    allowed: tuple[str, ...],
) -> None:
    world, transport = recorded
    with pytest.raises(MethodNotAllowed) as caught:
        relay(world, method, target, authorization=bearer(caller))
    answer = http_answer(caught.value, public=True)
    assert (answer.status, answer.headers["Allow"]) == (405, ", ".join(allowed))
    assert transport.sent == []


@pytest.mark.parametrize(
    ("query", "body", "content_type"),
    [
        ("_method=DELETE", b"{}", "application/json"),
        ("a=1&_METHOD=PUT", b"{}", "application/json"),
        ("x-http-method-override=DELETE", b"{}", "application/json"),
        ("%5Fmethod=DELETE", b"{}", "application/json"),
        ("a=1;_method=DELETE", b"{}", "application/json"),  # Rack and PHP may split on ';'
        ("%20_method=DELETE", b"{}", "application/json"),  # PHP drops leading spaces...
        (".method=DELETE", b"{}", "application/json"),  # ...and reads '.' and ' ' as '_'
        ("_method[]=DELETE", b"{}", "application/json"),
        (None, b'{"_method": "DELETE"}', "application/json"),
        (None, b"_method=DELETE&a=1", "application/x-www-form-urlencoded"),
        # Body routes send JSON whatever the caller says its body is.
        (None, b'{"_method": "DELETE"}', "text/plain"),
    ],
)
def test_method_override_parameters_are_refused(
    recorded: tuple[World, RecordingTransport],
    query: str | None,
    body: bytes,
    content_type: str,
) -> None:
    """The method is the route's: frameworks that read ``_method`` from the query or the body
    of a POST (Laravel, Symfony, Rails, Express's method-override) would turn it into another."""
    world, transport = recorded
    targets = ["omie/geral/clientes/"]
    if content_type != "text/plain":
        targets.append("sige/pedidos/")  # a header route sends the body as the caller typed it
    for target in targets:
        with pytest.raises(BadRequest) as caught:
            relay(
                world, "POST", target, query=query, body=body,
                headers=[("content-type", content_type)],
            )  # fmt: skip
        assert http_answer(caught.value, public=True).status == 400
    assert transport.sent == []


def test_ordinary_paths_and_queries_still_pass(
    recorded: tuple[World, RecordingTransport],
) -> None:
    world, transport = recorded
    relay(world, "GET", "sige/pedidos/a%20b~c/caf%C3%A9/x.json", query="method=card&q=a%2Fb")
    relay(world, "POST", "sige/pedidos/", body=b'{"method": "POST", "x": {"_method": 1}}')
    relay(world, "GET", "sige/pedidos/v1.2/..a/a..b/.well-known")
    assert [r.url for r in transport.sent] == [
        RECORDED_BASE + "pedidos/a%20b~c/caf%C3%A9/x.json?method=card&q=a%2Fb",
        RECORDED_BASE + "pedidos/",
        RECORDED_BASE + "pedidos/v1.2/..a/a..b/.well-known",
    ]


def test_unknown_relays_and_strangers_are_refused_alike(
    recorded: tuple[World, RecordingTransport],
) -> None:
    world, _ = recorded
    messages = set()
    for target, caller in (("nope/geral/clientes/", BILLING), ("omie/geral/clientes/", STRANGER)):
        with pytest.raises(PolicyDenied) as caught:
            asyncio.run(world.relay.authorize(bearer(caller), "POST", target))
        messages.add(caught.value.message)
    assert messages == {RELAY_DENIED}


def test_a_query_with_tricks_is_refused(recorded: tuple[World, RecordingTransport]) -> None:
    world, transport = recorded
    for query in ("a=1#frag", "a=%zz", "a=b\\c", "a=\x00", "a=%00", "a=b c", "a=%0d%0a"):
        with pytest.raises(BadRequest):
            relay(world, "GET", "sige/pedidos/", query=query)
    assert transport.sent == []


def test_the_caller_is_verified_before_anything_else(
    recorded: tuple[World, RecordingTransport],
) -> None:
    world, transport = recorded
    for authorization in (None, "", "Basic dXNlcjpwdw=="):
        with pytest.raises(InvalidCallerToken):
            relay(world, "POST", "nope/anything", authorization=authorization)
    assert transport.sent == []


def test_a_body_over_the_routes_limit_is_refused_before_sending(
    recorded: tuple[World, RecordingTransport],
) -> None:
    world, transport = recorded
    permit = asyncio.run(world.relay.authorize(bearer(BILLING), "POST", "omie/geral/clientes/"))
    assert permit.max_body_bytes == 4096
    with pytest.raises(BadRequest):
        run(world.relay.forward(permit, body=b"{" + b" " * 4096 + b"}"))
    assert transport.sent == []


def test_no_answer_is_a_503_with_retry_after(recorded: tuple[World, RecordingTransport]) -> None:
    world, transport = recorded
    transport.script.append(TransportError("unreachable: ClientConnectorError"))
    with pytest.raises(CredentialUnavailable) as caught:
        relay(world, "GET", "sige/pedidos/")
    answer = http_answer(caught.value, public=True)
    assert (answer.status, answer.headers["Retry-After"]) == (503, "5")
    assert "unreachable" in answer.body["error_description"]


def test_a_missing_credential_is_a_503_and_nothing_is_sent(
    recorded: tuple[World, RecordingTransport],
) -> None:
    world, transport = recorded
    world.secrets.delete("sige")
    with pytest.raises(CredentialUnavailable):
        relay(world, "GET", "sige/pedidos/")
    assert transport.sent == []


def test_the_credential_is_read_once_per_cache_period(
    recorded: tuple[World, RecordingTransport],
) -> None:
    world, _ = recorded
    for _ in range(5):
        relay(world, "GET", "sige/pedidos/")
    assert world.relay.secret_reads == 1
    world.clock.advance(31)
    relay(world, "GET", "sige/pedidos/")
    assert world.relay.secret_reads == 2


# --- status is live (issue 9, item 2) -------------------------------------------------------


def test_disabling_a_connection_stops_the_very_next_relay_and_enabling_restores_it(
    recorded: tuple[World, RecordingTransport],
) -> None:
    """Issue 9: the relay cached the credential for CACHE_SECONDS and never looked at the
    connection's status, so ``tokenbroker disable`` did not stop it."""
    world, transport = recorded
    assert relay(world, "GET", "sige/pedidos/").status == 200
    world.registry.set_enabled("sige", False)
    with pytest.raises(NeedsReauth) as caught:
        relay(world, "GET", "sige/pedidos/")
    answer = http_answer(caught.value, public=True)
    assert (answer.status, answer.body["error"]) == (409, "needs_reauth")
    assert "disabled" in answer.body["error_description"]
    assert len(transport.sent) == 1  # nothing went out for the refused one
    world.registry.set_enabled("sige", True)
    assert relay(world, "GET", "sige/pedidos/").status == 200
    assert len(transport.sent) == 2


def test_a_connection_that_needs_reauth_is_not_relayed(
    recorded: tuple[World, RecordingTransport],
) -> None:
    world, transport = recorded
    assert relay(world, "GET", "crm/v2/contacts", authorization=bearer(WORKER)).status == 200
    record = world.state.get("crm")
    world.state.put_state("crm", replace(record.state, status=ConnectionStatus.NEEDS_REAUTH))
    with pytest.raises(NeedsReauth) as caught:
        relay(world, "GET", "crm/v2/contacts", authorization=bearer(WORKER))
    assert http_answer(caught.value, public=True).status == 409
    assert "re-authorisation" in caught.value.message
    assert len(transport.sent) == 1


def test_a_removed_connection_is_refused_like_an_unknown_relay(
    recorded: tuple[World, RecordingTransport],
) -> None:
    world, transport = recorded
    assert relay(world, "GET", "sige/pedidos/").status == 200
    world.registry.remove("sige")
    with pytest.raises(PolicyDenied) as caught:
        relay(world, "GET", "sige/pedidos/")
    # What the issuer answers for /token on a removed connection, and what an unknown relay
    # gets: nobody learns that the connection existed.
    assert caught.value.message == RELAY_DENIED
    assert http_answer(caught.value, public=True).status == 403
    assert len(transport.sent) == 1


def test_a_connection_removed_and_registered_again_is_served_its_new_credential(
    recorded: tuple[World, RecordingTransport],
) -> None:
    """Versions start again at 1 for a new registration: the cache must not take the new
    version 1 for the old one."""
    world, transport = recorded
    relay(world, "GET", "sige/pedidos/")
    connection = replace(world.state.get("sige").connection, created_at=None)
    world.registry.remove("sige")
    world.clock.advance(1)
    world.registry.register(connection, Credential(client_secret=Secret("sige-second-life-77")))
    assert world.state.get("sige").state.current_version == 1  # as the first one was
    relay(world, "GET", "sige/pedidos/")
    assert transport.sent[-1].headers["X-Api-Token"] == "sige-second-life-77"


def test_a_rotated_credential_is_served_at_once(
    recorded: tuple[World, RecordingTransport],
) -> None:
    world, transport = recorded
    relay(world, "GET", "sige/pedidos/")
    world.registry.reauthorize("sige", client_secret=Secret("sige-rotated-token"))
    relay(world, "GET", "sige/pedidos/")
    first, second = transport.sent
    assert first.headers["X-Api-Token"] == SIGE_TOKEN
    assert second.headers["X-Api-Token"] == "sige-rotated-token"  # no TTL to wait out
    assert world.relay.secret_reads == 2


def test_the_state_is_read_again_only_when_the_store_changed(
    recorded: tuple[World, RecordingTransport],
) -> None:
    """The status is checked on every request, at the cost of a state read only when the
    store's change marker moved (as the issuer does); the secret once per version."""
    world, _ = recorded
    for _ in range(5):
        relay(world, "GET", "sige/pedidos/")
    assert (world.relay.state_reads, world.relay.secret_reads) == (1, 1)
    world.registry.set_enabled("omie", True)  # any write moves the marker
    relay(world, "GET", "sige/pedidos/")
    assert (world.relay.state_reads, world.relay.secret_reads) == (2, 1)


def test_a_store_without_a_cheap_marker_is_read_on_every_request(
    recorded: tuple[World, RecordingTransport],
) -> None:
    world, _ = recorded
    world.state.change_marker = object  # type: ignore[assignment, method-assign]  # Firestore's
    for _ in range(5):
        relay(world, "GET", "sige/pedidos/")
    assert (world.relay.state_reads, world.relay.secret_reads) == (5, 1)


def test_an_unreachable_state_store_is_a_503_and_nothing_is_sent(
    recorded: tuple[World, RecordingTransport],
) -> None:
    """No status, no relay: the credential cached a moment ago is not served blind."""
    world, transport = recorded
    relay(world, "GET", "sige/pedidos/")

    def unavailable(connection_id: str) -> Any:
        raise StoreUnavailable(f"state store down for {connection_id}")

    world.state.get = unavailable  # type: ignore[method-assign]
    world.state.change_marker = object  # type: ignore[assignment, method-assign]
    with pytest.raises(CredentialUnavailable) as caught:
        relay(world, "GET", "sige/pedidos/")
    answer = http_answer(caught.value, public=True)
    assert (answer.status, answer.headers["Retry-After"]) == (503, "5")
    assert len(transport.sent) == 1


_RELAY_CALLS = {
    "sige": ("GET", "sige/pedidos/", BILLING),
    "crm": ("GET", "crm/v2/contacts", WORKER),
    "omie": ("POST", "omie/geral/clientes/", BILLING),
}
_OPERATIONS = ("relay", "relay", "relay", "disable", "enable", "needs_reauth", "rotate",
               "remove", "add", "wait")  # fmt: skip


def _sent_value(connection_id: str, sent: OutboundRequest) -> str:
    if connection_id == "sige":
        return sent.headers["X-Api-Token"]
    if connection_id == "crm":
        return sent.headers["Authorization"].removeprefix("Bearer ")
    return str(json.loads(sent.body)["app_secret"])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# The sequences that broke it once: a cached credential outliving its registration (versions
# start again at 1), a rotation, and disable/enable within the cache period.
@example([("relay", "sige"), ("remove", "sige"), ("add", "sige"), ("relay", "sige")])
@example([("relay", "crm"), ("rotate", "crm"), ("relay", "crm")])
@example([("relay", "omie"), ("disable", "omie"), ("relay", "omie"), ("enable", "omie"),
          ("relay", "omie"), ("needs_reauth", "omie"), ("relay", "omie")])  # fmt: skip
@given(
    st.lists(
        # Mostly one connection, so that sequences on it are long enough to matter.
        st.tuples(st.sampled_from(_OPERATIONS), st.sampled_from(["sige"] * 4 + ["crm", "omie"])),
        min_size=4,
        max_size=40,
    )
)
def test_every_relay_request_follows_the_connections_state_at_that_moment(
    steps: list[tuple[str, str]],
) -> None:
    """Property: whatever sequence of disable, enable, needs_reauth, rotation, removal,
    re-registration and waiting, each relay request is refused exactly when the connection is
    not active (409) or gone (403), sends nothing then, and otherwise injects the credential
    the state names *now*, never a cached older one; no answer carries it back."""
    transport = RecordingTransport()
    world = World(transport)
    # As ``tokenbroker add`` registers: the registry stamps created_at.
    definitions = {
        r.connection.id: replace(r.connection, created_at=None) for r in world.state.list()
    }
    attribute = {"sige": "client_secret", "omie": "client_secret", "crm": "access_token"}
    model: dict[str, tuple[str, str] | None] = {
        "sige": ("active", SIGE_TOKEN), "omie": ("active", OMIE_SECRET),
        "crm": ("active", CRM_TOKEN),
    }  # fmt: skip
    for index, (operation, cid) in enumerate(steps):
        current = model[cid]
        fresh = f"{cid}-v{index}-Zq9xK2"
        if operation == "relay":
            method, target, caller = _RELAY_CALLS[cid]
            before = len(transport.sent)
            if current is None:
                with pytest.raises(PolicyDenied):
                    relay(world, method, target, authorization=bearer(caller), body=b"{}")
            elif current[0] != "active":
                with pytest.raises(NeedsReauth):
                    relay(world, method, target, authorization=bearer(caller), body=b"{}")
            else:
                answer = relay(world, method, target, authorization=bearer(caller), body=b"{}")
                assert _sent_value(cid, transport.sent[-1]) == current[1]
                assert not recoverable(whole(answer), current[1], window=10)
                continue
            assert len(transport.sent) == before
        elif operation in {"disable", "enable"} and current is not None:
            world.registry.set_enabled(cid, operation == "enable")
            model[cid] = ("active" if operation == "enable" else "disabled", current[1])
        elif operation == "needs_reauth" and current is not None:
            record = world.state.get(cid)
            world.state.put_state(cid, replace(record.state, status=ConnectionStatus.NEEDS_REAUTH))
            model[cid] = ("needs_reauth", current[1])
        elif operation == "rotate" and current is not None:  # as the refresher commits one
            stored = world.secrets.get(cid)
            changed = replace(stored.credential, **{attribute[cid]: Secret(fresh)})
            version = world.secrets.put(cid, changed, expected_version=stored.version)
            record = world.state.get(cid)
            world.state.put_state(cid, replace(record.state, current_version=version))
            model[cid] = (current[0], fresh)
        elif operation == "remove" and current is not None:
            world.registry.remove(cid)
            model[cid] = None
        elif operation == "add" and current is None:
            credential = Credential(**{attribute[cid]: Secret(fresh)})
            if cid == "crm":
                credential = replace(
                    credential, refresh_token=Secret("rt-crm"), client_secret=Secret("cs-crm"),
                    expires_at=world.clock.now() + timedelta(hours=1),
                )  # fmt: skip
            world.clock.advance(0.001)  # a registration of its own: its created_at differs
            world.registry.register(definitions[cid], credential)
            model[cid] = ("active", fresh)
        elif operation == "wait":
            world.clock.advance(17)


def test_nothing_the_relay_holds_prints_a_secret(
    recorded: tuple[World, RecordingTransport],
) -> None:
    world, _ = recorded
    with capture_logs() as logs:
        relay(world, "GET", "sige/pedidos/")
        relay(world, "POST", "omie/geral/clientes/", body=b"{}")
        world.registry.set_enabled("sige", False)
        with pytest.raises(NeedsReauth) as caught:
            relay(world, "GET", "sige/pedidos/")
    printed = [
        logs.getvalue(), repr(world.relay.__dict__), repr(EchoRedactor([SIGE_TOKEN])),
        str(EchoRedactor([SIGE_TOKEN])), repr(caught.value), caught.value.message,
        http_answer(caught.value, public=True).json(),
    ]  # fmt: skip
    for text in printed:
        for secret in (SIGE_TOKEN, OMIE_SECRET, CRM_TOKEN):
            # Ten characters: the test secrets hold words ("header") that reprs hold too.
            assert not recoverable(text, secret, window=10), text


def test_every_relay_decision_leaves_one_audit_line(
    recorded: tuple[World, RecordingTransport],
) -> None:
    """Issue 9: refusals left no trace. One ``relay decision`` line per request, as ``/token``
    has, whatever the outcome; never credential material."""
    world, transport = recorded
    transport.script.append(HttpResponse(404, b"{}", {"content-type": "application/json"}))
    transport.script.append(TransportError("unreachable: ClientConnectorError"))
    calls: list[tuple[str, str, str | None, str]] = [
        ("GET", "sige/pedidos/", bearer(BILLING), "relayed"),  # the provider's 404 is relayed
        ("GET", "sige/pedidos/", None, "unauthenticated"),
        ("GET", "sige/pedidos/", bearer(STRANGER), "denied"),
        ("GET", "sige/..;/admin", bearer(BILLING), "bad_request"),
        ("DELETE", "sige/pedidos/", bearer(BILLING), "method_not_allowed"),
        ("GET", "sige/pedidos/", bearer(BILLING), "unavailable"),
    ]
    with capture_logs() as logs:
        for method, target, authorization, _ in calls:
            with contextlib.suppress(TokenBrokerError):
                relay(world, method, target, authorization=authorization)
        world.registry.set_enabled("sige", False)
        with contextlib.suppress(TokenBrokerError):
            relay(world, "GET", "sige/pedidos/")
    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    decisions = [line for line in lines if line["message"] == "relay decision"]
    assert [d["outcome"] for d in decisions] == [c[3] for c in calls] + ["refused"]
    relayed, unauthenticated, denied, bad, not_allowed, unavailable, refused = decisions
    assert (relayed["caller"], relayed["relay"], relayed["connection"]) == (BILLING, "sige", "sige")
    assert (relayed["status"], relayed["severity"], relayed["reason"]) == (404, "INFO", None)
    assert relayed["latency_ms"] >= 0 and relayed["path"] == "pedidos/"
    assert unauthenticated["caller"] is None and unauthenticated["reason"] == "invalid_token"
    assert (denied["caller"], denied["reason"]) == (STRANGER, "access_denied")
    assert bad["reason"] == "invalid_request" and "path not allowed" in bad["detail"]
    assert (bad["relay"], bad["path"]) == ("sige", "..;/admin")
    assert not_allowed["method"] == "DELETE"
    assert "unreachable" in unavailable["detail"]
    assert refused["reason"] == "needs_reauth" and "disabled" in refused["detail"]
    assert all(d["severity"] == "WARNING" for d in decisions[1:])
    assert world.relay.decisions == {
        "relayed": 1, "unauthenticated": 1, "denied": 1, "bad_request": 1,
        "method_not_allowed": 1, "unavailable": 1, "refused": 1,
    }  # fmt: skip
    for secret in (SIGE_TOKEN, OMIE_SECRET, CRM_TOKEN):
        assert not recoverable(logs.getvalue(), secret, window=10)


def test_an_outbound_request_does_not_print_what_it_carries() -> None:
    request = OutboundRequest(
        "POST", "https://api.test/x", headers={"X-Api-Token": SIGE_TOKEN}, body=OMIE_SECRET.encode()
    )
    assert SIGE_TOKEN not in repr(request)
    assert OMIE_SECRET not in repr(request)


# --- the real aiohttp transport, against a provider API on 127.0.0.1 -----------------------------


def on_the_wire(test: Callable[[World, ProviderApi], Awaitable[None]], **options: Any) -> None:
    """Run ``test`` with a World whose relays point at a live provider API."""

    async def main() -> None:
        async with ProviderApi().running() as api:
            transport = AiohttpRelayTransport()
            try:
                await test(World(transport, f"{api.url}/api/", **options), api)
            finally:
                await transport.aclose()

    asyncio.run(main())


def test_on_the_wire_injection_and_dropped_headers() -> None:
    async def test(world: World, api: ProviderApi) -> None:
        caller_headers = [
            ("authorization", bearer(BILLING)), ("cookie", "a=b"), ("x-forwarded-for", "1.2.3.4"),
            ("x-api-token", "forged"), ("accept-encoding", "br"), ("x-request-id", "r1"),
        ]  # fmt: skip
        body = await world.relay.relay(
            bearer(BILLING), "POST", "omie/geral/clientes/", headers=caller_headers,
            body=b'{"call": "ListarClientes"}',
        )  # fmt: skip
        header = await world.relay.relay(
            bearer(BILLING), "GET", "sige/pedidos/a%20b~c", query="q=1", headers=caller_headers
        )
        bearer_answer = await world.relay.relay(
            bearer(WORKER), "GET", "crm/v2/contacts", headers=caller_headers
        )
        omie, sige, crm = api.received
        assert omie.raw_path == "/api/geral/clientes/"
        assert json.loads(omie.body) == {
            "call": "ListarClientes", "app_key": OMIE_KEY, "app_secret": OMIE_SECRET,
        }  # fmt: skip
        # The provider echoed the request body inside its JSON: scrubbed, however escaped.
        assert json.loads(json.loads(body.body)["body"]) == {
            "call": "ListarClientes", "app_key": "[REDACTED]", "app_secret": "[REDACTED]",
        }  # fmt: skip
        assert omie.header("content-type") == ["application/json"]
        assert sige.raw_path == "/api/pedidos/a%20b~c"  # as the policy built it, not requoted
        assert sige.query == "q=1"
        assert sige.header("x-api-token") == [SIGE_TOKEN]
        assert crm.header("authorization") == [f"Bearer {CRM_TOKEN}"]
        for received in (omie, sige, crm):
            assert received.header("cookie") == []
            assert received.header("x-forwarded-for") == []
            assert received.header("accept-encoding") != ["br"]  # the transport's own
            assert received.header("x-request-id") == ["r1"]
        assert omie.header("authorization") == sige.header("authorization") == []
        for answer, secret in (
            (body, OMIE_SECRET),
            (header, SIGE_TOKEN),
            (bearer_answer, CRM_TOKEN),
        ):
            assert answer.status == 200
            assert secret.encode() not in answer.body
            assert "set-cookie" not in answer.headers
            assert secret not in json.dumps(dict(answer.headers))
        # The provider's own headers are not passed back (an allow-list), echo or not.
        assert "x-echo-authorization" not in bearer_answer.headers

    on_the_wire(test)


def test_on_the_wire_smuggling_headers_never_reach_the_provider() -> None:
    """Issue 9: method and path overrides, forwarding headers and the caller's own credentials
    (its ID token, its invoker token, cookies, proxy credentials) reached the provider."""
    smuggled = [
        ("X-HTTP-Method-Override", "DELETE"), ("X-HTTP-Method", "DELETE"),
        ("X-Method-Override", "DELETE"), ("X-Original-URL", "/admin/delete-all"),
        ("X-Rewrite-URL", "/admin/delete-all"), ("X-Original-Method", "DELETE"),
        ("X-Forwarded-For", "127.0.0.1"), ("X-Forwarded-Host", "admin.internal"),
        ("X-Forwarded-Proto", "https"), ("X-Forwarded-Prefix", "/admin"),
        ("X-Forwarded-Port", "8443"), ("X-Forwarded-Server", "admin.internal"),
        ("X-Forwarded-Uri", "/admin"), ("X-Real-IP", "127.0.0.1"), ("Forwarded", "for=1.2.3.4"),
        ("X-Serverless-Authorization", bearer(WORKER)), ("Authorization", bearer(WORKER)),
        ("Cookie", "session=caller"), ("Proxy-Authorization", "Basic dXNlcjpwdw=="),
        ("X-Api-Token", "forged"), ("Host", "admin.internal"),
    ]  # fmt: skip

    async def test(world: World, api: ProviderApi) -> None:
        for method, target, caller in (
            ("GET", "crm/v2/contacts", WORKER),
            ("POST", "sige/pedidos/", BILLING),
            ("POST", "omie/geral/clientes/", BILLING),
        ):
            await world.relay.relay(
                bearer(caller), method, target, headers=[*smuggled, ("Accept", "*/*")],
                body=b"{}" if method == "POST" else b"",
            )  # fmt: skip
        for received, route_header in zip(
            api.received, ("authorization", "x-api-token", None), strict=True
        ):
            names = {name for name, _ in received.headers}
            for name, _ in smuggled:
                if name.lower() != route_header and name.lower() != "host":
                    assert name.lower() not in names, (received.raw_path, name)
            assert received.header("host") == [api.url.removeprefix("http://")]
            assert received.header("accept") == ["*/*"]
            assert "forged" not in str(received.headers)
            assert bearer(WORKER) not in str(received.headers)
        assert [r.method for r in api.received] == ["GET", "POST", "POST"]
        assert api.paths() == ["/api/v2/contacts", "/api/pedidos/", "/api/geral/clientes/"]

    on_the_wire(test)


class LeakyApi:
    """A provider on 127.0.0.1 that echoes whatever credential arrived (bearer, ``X-Api-Token``
    or the JSON body's ``app_secret``) in every place an answer has: many headers, and the
    body in many encodings."""

    def __init__(self) -> None:
        self.url = ""

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.read()
        secret = request.headers.get("X-Api-Token") or request.headers.get(
            "Authorization", ""
        ).removeprefix("Bearer ")
        if not secret and body:
            secret = json.loads(body).get("app_secret", "")
        basic = "Basic " + b64("user:" + secret)
        echo = {
            "raw": secret, "basic": basic, "b64url": b64(secret, url=True, pad=False),
            "hex": secret.encode().hex(), "percent": quote(secret, safe=""),
            "form": quote_plus(secret), "html": html.escape(secret),
            "nested": json.dumps({"token": secret}), "b64json": b64(json.dumps({"t": secret})),
        }  # fmt: skip
        headers = {
            "Content-Type": "application/json",
            "X-Debug-Token": secret,
            "Set-Cookie": f"session={quote(secret, safe='')}; HttpOnly",
            "WWW-Authenticate": f'Bearer realm="provider", error="invalid_token", t="{secret}"',
            "Location": f"https://api.provider.test/cb?access_token={quote_plus(secret)}&x=1",
            "Link": f'<https://api.provider.test/p?auth={quote(basic, safe="")}>; rel="next"',
            "X-Request-Id": b64(secret, url=True),
            "ETag": f'"{secret.encode().hex()}"',
            "Content-Disposition": f'attachment; filename="{quote(secret, safe="")}.json"',
            "X-RateLimit-Remaining": "41",
        }
        status = 401 if request.query.get("status") == "401" else 200
        payload = json.dumps(echo).encode()
        coding = request.query.get("coding")
        if coding:  # compressed in a way no client decodes on its own
            for _ in coding.split(","):
                payload = gzip.compress(payload)
            headers["Content-Encoding"] = coding
        return web.Response(status=status, body=payload, headers=headers)

    @contextlib.asynccontextmanager
    async def running(self) -> Any:
        from aiohttp import web

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, shutdown_timeout=0.2, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            yield self
        finally:
            await runner.cleanup()


def test_on_the_wire_a_provider_echoing_the_credential_everywhere_leaks_nothing() -> None:
    """Issue 9: an upstream echoing the injected credential in a response header handed it to
    the caller; encoded forms passed through. Against a real server, over the real transport:
    nothing of any injected value can be read back from the status, headers or body, and the
    log holds none of it either."""

    async def main() -> None:
        async with LeakyApi().running() as api, AiohttpRelayTransport() as transport:
            world = World(transport, f"{api.url}/api/")
            with capture_logs() as logs:
                answers = {
                    OMIE_SECRET: await world.relay.relay(
                        bearer(BILLING), "POST", "omie/geral/clientes/", body=b"{}"
                    ),
                    SIGE_TOKEN: await world.relay.relay(
                        bearer(BILLING), "GET", "sige/pedidos/", query="status=401"
                    ),
                    CRM_TOKEN: await world.relay.relay(bearer(WORKER), "GET", "crm/v2/contacts"),
                }
            for secret, answer in answers.items():
                assert not recoverable(whole(answer), secret), whole(answer)
                assert set(answer.headers) == {
                    "content-type", "location", "link", "x-request-id", "etag",
                    "content-disposition", "x-ratelimit-remaining",
                }  # fmt: skip
                assert answer.headers["x-ratelimit-remaining"] == "41"
                assert answer.headers["location"].endswith("access_token=[REDACTED]&x=1")
                assert json.loads(answer.body)["raw"] == "[REDACTED]"
                assert not recoverable(logs.getvalue(), secret)
            assert answers[SIGE_TOKEN].status == 401
            assert OMIE_KEY not in whole(answers[OMIE_SECRET])

    asyncio.run(main())


@pytest.mark.parametrize("coding", ["gzip, gzip", "gzip,gzip", "x-gzip", "compress", "GZIP, GZIP"])
def test_on_the_wire_an_answer_still_encoded_is_refused(coding: str) -> None:
    """The transport decodes one gzip, deflate, br or zstd coding. Any other
    ``Content-Encoding`` (two codings, an unknown one) leaves the body encoded, so the secret
    inside it could not be scrubbed: the answer is refused, not passed on."""

    async def main() -> None:
        async with LeakyApi().running() as api, AiohttpRelayTransport() as transport:
            world = World(transport, f"{api.url}/api/")
            with pytest.raises(CredentialUnavailable) as caught:
                await world.relay.relay(
                    bearer(BILLING), "GET", "sige/pedidos/", query=f"coding={quote(coding)}"
                )
            assert "encoding" in caught.value.message
            assert SIGE_TOKEN not in caught.value.message

    asyncio.run(main())


def test_on_the_wire_a_compressed_echo_is_decoded_and_scrubbed() -> None:
    async def test(world: World, api: ProviderApi) -> None:
        answer = await world.relay.relay(bearer(BILLING), "GET", "sige/gzip")
        assert api.received[-1].header("accept-encoding")  # the transport asked for what it reads
        assert "content-encoding" not in answer.headers
        echo = json.loads(answer.body)  # decoded, so it could be scrubbed
        assert echo["headers"]["x-api-token"] == "[REDACTED]"
        assert SIGE_TOKEN.encode() not in gzip.compress(answer.body) + answer.body

    on_the_wire(test)


def test_on_the_wire_redirects_are_not_followed() -> None:
    async def test(world: World, api: ProviderApi) -> None:
        answer = await world.relay.relay(bearer(WORKER), "GET", "crm/redirect")
        assert answer.status == 302
        assert answer.headers["location"] == "/stolen"
        assert api.paths() == ["/api/redirect"]  # nobody went to /stolen with the token

    on_the_wire(test)


def test_on_the_wire_an_oversize_answer_is_refused() -> None:
    async def test(world: World, api: ProviderApi) -> None:
        with pytest.raises(CredentialUnavailable) as caught:
            await world.relay.relay(bearer(BILLING), "GET", "sige/big", query="bytes=300000")
        assert "larger than 200000 bytes" in caught.value.message
        small = await world.relay.relay(bearer(BILLING), "GET", "sige/big", query="bytes=150000")
        assert len(small.body) == 150000

    on_the_wire(test, max_response_bytes=200_000)


def test_on_the_wire_a_slow_provider_times_out() -> None:
    async def test(world: World, api: ProviderApi) -> None:
        with pytest.raises(CredentialUnavailable) as caught:
            await world.relay.relay(bearer(BILLING), "GET", "sige/slow", query="seconds=5")
        assert "no answer within 1s" in caught.value.message  # the route's timeout_seconds

    on_the_wire(test)


def test_the_aiohttp_transport_alone_keeps_its_promises() -> None:
    """The RelayTransport port as aiohttp implements it: every status returned as is, no
    redirect followed, a bounded body, a bounded time, and TransportError for no answer."""

    async def main() -> None:
        async with ProviderApi().running() as api, AiohttpRelayTransport() as transport:
            assert isinstance(transport, RelayTransport)
            redirect = await transport.send(OutboundRequest("GET", f"{api.url}/redirect"))
            assert (redirect.status, redirect.headers["location"]) == (302, "/stolen")
            echo = await transport.send(
                OutboundRequest("PUT", f"{api.url}/x", {"X-A": "1"}, b"payload")
            )
            sent = json.loads(echo.body)
            assert (sent["method"], sent["body"], sent["headers"]["x-a"]) == (
                "PUT",
                "payload",
                "1",
            )
            with pytest.raises(TransportError, match="larger than 1000 bytes"):
                await transport.send(
                    OutboundRequest("GET", f"{api.url}/big?bytes=5000", max_response_bytes=1000)
                )
            with pytest.raises(TransportError, match=r"no answer within 0\.2s"):
                await transport.send(
                    OutboundRequest("GET", f"{api.url}/slow?seconds=3", timeout_seconds=0.2)
                )
            # Bound but never listening: connecting is refused, and no one else can take it.
            with socket.socket() as dead:
                dead.bind(("127.0.0.1", 0))
                url = f"http://127.0.0.1:{dead.getsockname()[1]}/x"
                with pytest.raises(TransportError, match="unreachable"):
                    await transport.send(OutboundRequest("GET", url, timeout_seconds=2))
            assert api.paths() == ["/redirect", "/x", "/big", "/slow"]

    asyncio.run(main())


def test_the_aiohttp_transport_belongs_to_one_event_loop() -> None:
    transport = AiohttpRelayTransport()

    async def use(api_url: str) -> int:
        return (await transport.send(OutboundRequest("GET", f"{api_url}/x"))).status

    async def first() -> None:
        async with ProviderApi().running() as api:
            assert await use(api.url) == 200
            with pytest.raises(RuntimeError, match="second event loop"):
                await asyncio.to_thread(asyncio.run, use(api.url))
            await transport.aclose()

    asyncio.run(first())
