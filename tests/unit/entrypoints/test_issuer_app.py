"""The issuer function in process: ``functions/issuer/main.py`` as functions-framework serves it
with ``--asgi`` (``create_app`` returns the Starlette app for an ``@aio`` target), called
through ``httpx.ASGITransport``.

Everything below the HTTP edge is real and built the way a cold start builds it, from the
environment: the embedded backend, the policy file, ID tokens checked against a JWK set served
on 127.0.0.1, narrowing refreshes sent by the aiohttp token endpoint and relay calls by the
aiohttp relay transport, both to a provider on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import functions_framework
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.logs import ROUTES, json_lines, trace_fields
from tests.support.oidc import rsa_public_jwk, sign_rs256
from tests.support.provider_api import ProviderApi
from tokenbroker.adapters.embedded import new_key_text
from tokenbroker.adapters.fake_provider import FakeTokenServer
from tokenbroker.entrypoints import issuer as issuer_entry
from tokenbroker.entrypoints.compose import build_runtime
from tokenbroker.entrypoints.settings import Settings
from tokenbroker.kernel.model import Connection, ConnectionStatus, Credential, GrantType
from tokenbroker.kernel.secret import Secret
from tokenbroker.refresh.registry import ConnectionRegistry

SOURCE = Path(__file__).resolve().parents[3] / "functions" / "issuer" / "main.py"
AUDIENCE = "https://issuer.tokenbroker.test"
ID_ISSUER = "https://accounts.tokenbroker.test"
KID = "test-key-1"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
FORGER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
WORKER = "crm-sync@tb-test.iam.gserviceaccount.com"
BILLING = "billing@tb-test.iam.gserviceaccount.com"
STRANGER = "stranger@tb-test.iam.gserviceaccount.com"
CRM_TOKEN = "AT-crm-current-7d41"
OMIE_KEY = "omie-app-key-123"
OMIE_SECRET = "omie-app-secret-XYZ987"


class _Keys(BaseHTTPRequestHandler):
    body = json.dumps({"keys": [rsa_public_jwk(KEY, KID)]}).encode()

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "public, max-age=3600")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture(scope="module")
def keys_url() -> Iterator[str]:
    """The JWK set on 127.0.0.1, from a thread: the issuer fetches it with blocking urllib."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Keys)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/certs"
    server.shutdown()


def id_token(email: str = WORKER, key: rsa.RSAPrivateKey = KEY, **overrides: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": ID_ISSUER, "aud": AUDIENCE, "sub": f"sub-{email}", "email": email,
        "email_verified": True, "iat": now, "exp": now + 3600, **overrides,
    }  # fmt: skip
    return sign_rs256(claims, key, kid=KID)


def auth(email: str = WORKER, **overrides: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {id_token(email, **overrides)}"}


POLICY = """
version = 1

[[grants]]
callers = ["{worker}"]
connections = ["crm", "fresh", "stuck"]
scopes = ["*"]
max_lifetime_seconds = 900

[[grants]]
callers = ["{worker}"]
connections = ["gmail"]
scopes = ["read", "send"]

[[relays]]
name = "omie-clients"
callers = ["{billing}"]
connection = "omie"
base_url = "{api}/api/v1/"
methods = ["POST"]
path_prefixes = ["geral/clientes"]
inject = "body"
body_fields = {{ app_key = "client_id", app_secret = "client_secret" }}
max_body_bytes = 1024

[[relays]]
name = "crm-api"
callers = ["{worker}"]
connection = "crm"
base_url = "{api}/crm/"
methods = ["GET"]
path_prefixes = ["v2/", "redirect"]
inject = "bearer"
"""


@dataclass
class Deployment:
    client: httpx.AsyncClient
    api: ProviderApi
    token_server: FakeTokenServer
    gmail_refresh_token: str

    async def token(self, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
        return await self.client.post(
            "/token", json=body, headers=auth() if headers is None else headers
        )


def _seed(state_dir: Path, key: str, api_url: str, token_server: FakeTokenServer) -> str:
    runtime = build_runtime(
        Settings(backend="embedded", state_dir=state_dir, encryption_key=Secret(key))
    )
    try:
        registry = ConnectionRegistry(
            secrets=runtime.secrets, state=runtime.state, profiles=runtime.profiles,
            clock=runtime.clock,
        )  # fmt: skip
        now = datetime.now(UTC)
        registry.register(
            Connection(id="crm", profile="generic", grant=GrantType.REFRESH_TOKEN,
                       client_id="client", token_url=f"{api_url}/oauth/token"),
            Credential(refresh_token=Secret("rt-crm"), client_secret=Secret("client-secret"),
                       access_token=Secret(CRM_TOKEN), obtained_at=now,
                       expires_at=now + timedelta(hours=2)),
        )  # fmt: skip
        registry.register(
            Connection(id="fresh", profile="generic", grant=GrantType.REFRESH_TOKEN,
                       client_id="client", token_url=f"{api_url}/oauth/token"),
            Credential(refresh_token=Secret("rt-fresh"), client_secret=Secret("client-secret")),
        )  # fmt: skip
        record = registry.register(
            Connection(id="stuck", profile="generic", grant=GrantType.REFRESH_TOKEN,
                       client_id="client", token_url=f"{api_url}/oauth/token"),
            Credential(refresh_token=Secret("rt-stuck"), client_secret=Secret("client-secret")),
        )  # fmt: skip
        runtime.state.put_state(
            "stuck", replace(record.state, status=ConnectionStatus.NEEDS_REAUTH)
        )
        gmail_refresh_token = token_server.seed_refresh_token(scope="read send admin")
        registry.register(
            Connection(id="gmail", profile="google", grant=GrantType.REFRESH_TOKEN,
                       client_id="client", scopes=("read", "send", "admin"),
                       token_url=f"{api_url}/oauth/token"),
            Credential(refresh_token=Secret(gmail_refresh_token),
                       client_secret=Secret("client-secret")),
        )  # fmt: skip
        registry.register(
            Connection(id="omie", profile="generic", grant=GrantType.STATIC, client_id=OMIE_KEY),
            Credential(client_secret=Secret(OMIE_SECRET)),
        )
    finally:
        runtime.close()
    return gmail_refresh_token


Scenario = Callable[[Deployment], Awaitable[None]]


@pytest.fixture
def serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keys_url: str) -> Callable[..., None]:
    """``serve(scenario, **env)``: run ``scenario`` against a freshly built issuer app, in one
    event loop (the app's HTTP sessions belong to it), and shut the instance down after."""

    @asynccontextmanager
    async def deployed(env: dict[str, str | None]) -> AsyncIterator[Deployment]:
        token_server = FakeTokenServer(rotate=False)
        async with ProviderApi(token_server=token_server).running() as api:
            key = new_key_text()
            state_dir = tmp_path / "state"
            gmail_refresh_token = _seed(state_dir, key, api.url, token_server)
            policy = tmp_path / "policy.toml"
            policy.write_text(POLICY.format(worker=WORKER, billing=BILLING, api=api.url))
            settings: dict[str, str | None] = {
                "TOKENBROKER_BACKEND": "embedded",
                "TOKENBROKER_STATE_DIR": str(state_dir),
                "TOKENBROKER_ENCRYPTION_KEY": key,
                "TOKENBROKER_POLICY_FILE": str(policy),
                "TOKENBROKER_ISSUER_AUDIENCE": AUDIENCE,
                "TOKENBROKER_ID_TOKEN_ISSUERS": ID_ISSUER,
                "TOKENBROKER_ID_TOKEN_KEYS_URL": keys_url,
                "TOKENBROKER_HTTP_TIMEOUT_SECONDS": "5",
                **env,
            }
            for name, value in settings.items():
                if value is None:
                    monkeypatch.delenv(name, raising=False)
                else:
                    monkeypatch.setenv(name, value)
            app = functions_framework.create_app("issue", str(SOURCE))
            transport = httpx.ASGITransport(app=app)
            try:
                async with httpx.AsyncClient(
                    transport=transport, base_url="http://issuer.test"
                ) as client:
                    yield Deployment(client, api, token_server, gmail_refresh_token)
            finally:
                await issuer_entry.shutdown()

    def run(scenario: Scenario, **env: str | None) -> None:
        async def main() -> None:
            async with deployed(env) as deployment:
                await scenario(deployment)

        asyncio.run(main())

    return run


def error_of(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error", "error_description"}, body
    assert response.headers["cache-control"] == "no-store"
    assert "Traceback" not in response.text
    return str(body["error"])


# --- routes --------------------------------------------------------------------------------------


def test_healthz_and_unknown_routes_and_methods(serve: Callable[..., None]) -> None:
    async def scenario(d: Deployment) -> None:
        health = await d.client.get("/healthz")
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        assert (await d.client.head("/healthz")).status_code == 200
        wrong = await d.client.post("/healthz")
        assert (wrong.status_code, wrong.headers["allow"]) == (405, "GET, HEAD")
        assert wrong.json()["error"] == "invalid_request"
        get_token = await d.client.get("/token", headers=auth())
        assert (get_token.status_code, get_token.headers["allow"]) == (405, "POST")
        assert get_token.json()["error"] == "invalid_request"
        for path in ("/", "/nope", "/token/extra", "/relay"):
            missing = await d.client.get(path)
            assert missing.status_code == 404, path
            assert missing.json()["error"] == "not_found"

    serve(scenario)


# --- POST /token -------------------------------------------------------------------------------


def test_a_granted_caller_gets_the_current_token_bounded_and_cached(
    serve: Callable[..., None],
) -> None:
    async def scenario(d: Deployment) -> None:
        first = await d.token({"connection": "crm"})
        assert first.status_code == 200, first.text
        assert first.headers["content-type"] == "application/json"
        assert (first.headers["cache-control"], first.headers["pragma"]) == ("no-store", "no-cache")
        body = first.json()
        assert body["access_token"] == CRM_TOKEN
        assert (body["connection"], body["token_type"]) == ("crm", "Bearer")
        assert 890 <= body["expires_in"] <= 900  # the policy's lifetime, not the token's 2 h
        assert body["refresh_after"] < body["expires_at"]
        for _ in range(20):
            again = await d.token({"connection": "crm"})
            assert again.json()["access_token"] == CRM_TOKEN
        issuer, _ = await issuer_entry.build()
        assert issuer.secret_reads == 1  # served from the instance cache

    serve(scenario)


def test_a_narrowed_token_comes_from_a_refresh_through_the_held_token_endpoint(
    serve: Callable[..., None],
) -> None:
    """The issuer holds its AiohttpTokenEndpoint for the instance's life (it never enters it
    with ``async with``); the endpoint opens on first use, so narrowing works when deployed."""

    async def scenario(d: Deployment) -> None:
        response = await d.token({"connection": "gmail", "scopes": ["read"]})
        assert response.status_code == 200, response.text
        assert response.json()["scope"] == "read"
        (refresh,) = [r for r in d.api.received if r.raw_path == "/oauth/token"]
        form = {k: v[0] for k, v in parse_qs(refresh.body.decode()).items()}
        assert (form["grant_type"], form["scope"]) == ("refresh_token", "read")
        assert d.token_server.grant_alive(d.gmail_refresh_token)

    serve(scenario)


def test_request_and_policy_errors_are_rendered_oauth_style(serve: Callable[..., None]) -> None:
    async def scenario(d: Deployment) -> None:
        cases: list[tuple[Any, dict[str, str], int, str]] = [
            ({"connection": "crm"}, {}, 401, "invalid_token"),
            ({"connection": "crm"}, {"Authorization": "Basic dXNlcjpwdw=="}, 401, "invalid_token"),
            ({"connection": "crm"}, {"Authorization": f"Bearer {id_token(key=FORGER)}"}, 401,
             "invalid_token"),
            ({"connection": "crm"}, auth(aud="https://other.test"), 401, "invalid_token"),
            ({"connection": "crm"}, auth(STRANGER), 403, "access_denied"),
            ({"connection": "omie"}, auth(), 403, "access_denied"),  # exists, not granted
            ({"connection": "ghost"}, auth(), 403, "access_denied"),  # does not exist
            ({"connection": "gmail", "scopes": ["admin"]}, auth(), 403, "access_denied"),
            ({"connection": "crm", "min_ttl_seconds": 3000}, auth(), 403, "access_denied"),
            ({"connection": "crm", "extra": 1}, auth(), 400, "invalid_request"),
            ([1, 2], auth(), 400, "invalid_request"),
            ({"connection": "fresh"}, auth(), 503, "temporarily_unavailable"),
            ({"connection": "stuck"}, auth(), 409, "needs_reauth"),
        ]  # fmt: skip
        answers = {}
        for body, headers, status, error in cases:
            response = await d.token(body, headers)
            assert response.status_code == status, (body, response.text)
            assert error_of(response) == error
            answers[json.dumps(body)] = response.json()
            if status == 401:
                assert response.headers["www-authenticate"].startswith('Bearer realm="tokenbroker"')
            if status == 503:
                assert response.headers["retry-after"] == "30"
        # A connection that exists but is not granted looks like one that does not exist.
        assert answers['{"connection": "omie"}'] == answers['{"connection": "ghost"}']

    serve(scenario)


def test_bodies_are_limited_and_must_be_json(serve: Callable[..., None]) -> None:
    async def scenario(d: Deployment) -> None:
        big = json.dumps({"connection": "crm", "pad": "x" * 17000}).encode()

        async def streamed() -> AsyncIterator[bytes]:  # chunked: no Content-Length to trust
            for start in range(0, len(big), 4096):
                yield big[start : start + 4096]

        for content, headers in (
            (big, {"Content-Type": "application/json"}),
            (streamed(), {"Content-Type": "application/json"}),
            (b"connection=crm", {"Content-Type": "application/x-www-form-urlencoded"}),
            (b"{not json", {"Content-Type": "application/json"}),
            (b"", {"Content-Type": "application/json"}),
        ):
            response = await d.client.post("/token", content=content, headers={**auth(), **headers})
            assert response.status_code == 400, response.text
            assert error_of(response) == "invalid_request"
        too_big = await d.client.post("/token", content=big, headers=auth())
        assert "larger than 16384 bytes" in too_big.json()["error_description"]

    serve(scenario)


def test_a_trickled_body_is_refused_after_the_read_timeout(
    serve: Callable[..., None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 9, item 6: a client sending the body slowly (or never finishing it) held the
    request for ever. Past the read timeout it gets a 400, OAuth-style."""
    monkeypatch.setattr(issuer_entry, "BODY_READ_SECONDS", 0.3)

    async def scenario(d: Deployment) -> None:
        async def trickle() -> AsyncIterator[bytes]:
            yield b'{"connection": '
            await asyncio.sleep(30)
            yield b'"crm"}'

        started = time.monotonic()
        response = await d.client.post(
            "/token", content=trickle(), headers={**auth(), "Content-Type": "application/json"}
        )
        assert time.monotonic() - started < 5
        assert response.status_code == 400, response.text
        assert error_of(response) == "invalid_request"
        assert "not received within" in response.json()["error_description"]

    serve(scenario)


def test_configuration_errors_are_a_bare_500_and_not_remembered(
    serve: Callable[..., None], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    async def scenario(d: Deployment) -> None:
        broken = await d.token({"connection": "crm"})
        assert broken.status_code == 500
        assert broken.json() == {"error": "server_error", "error_description": "internal error"}
        assert "TOKENBROKER" not in broken.text  # a public surface: the variable stays in the log
        assert (await d.client.get("/healthz")).status_code == 503  # not ready
        monkeypatch.setenv("TOKENBROKER_POLICY_FILE", str(tmp_path / "policy.toml"))
        fixed = await d.token({"connection": "crm"})
        assert fixed.status_code == 200, fixed.text  # the failed cold start was not kept

    serve(scenario, TOKENBROKER_POLICY_FILE=None)


# --- /relay --------------------------------------------------------------------------------------


def test_the_relay_injects_forwards_and_scrubs(serve: Callable[..., None]) -> None:
    async def scenario(d: Deployment) -> None:
        headers = {**auth(BILLING), "Cookie": "a=b", "X-Forwarded-For": "1.2.3.4"}
        ok = await d.client.post(
            "/relay/omie/geral/clientes/?page=2", json={"call": "ListarClientes"},
            headers=headers,
        )  # fmt: skip
        assert ok.status_code == 200, ok.text
        (arrived,) = d.api.received
        assert (arrived.raw_path, arrived.query) == ("/api/v1/geral/clientes/", "page=2")
        assert json.loads(arrived.body) == {
            "call": "ListarClientes", "app_key": OMIE_KEY, "app_secret": OMIE_SECRET,
        }  # fmt: skip
        assert arrived.header("authorization") == []  # the caller's ID token stays here
        assert arrived.header("cookie") == arrived.header("x-forwarded-for") == []
        assert OMIE_SECRET not in ok.text and OMIE_KEY not in ok.text
        assert "set-cookie" not in ok.headers
        bearer = await d.client.get("/relay/crm-api/v2/contacts", headers=auth())
        assert bearer.status_code == 200, bearer.text
        assert d.api.received[-1].header("authorization") == [f"Bearer {CRM_TOKEN}"]
        # The provider's echo header is not on the allow-list of answer headers (issue 9).
        assert "x-echo-authorization" not in bearer.headers
        assert CRM_TOKEN not in bearer.text and CRM_TOKEN not in str(bearer.headers)
        redirect = await d.client.get("/relay/crm-api/redirect", headers=auth())
        assert (redirect.status_code, redirect.headers["location"]) == (302, "/stolen")
        assert "/stolen" not in d.api.paths()

    serve(scenario)


def test_the_relay_refuses_before_reading_or_sending(serve: Callable[..., None]) -> None:
    async def scenario(d: Deployment) -> None:
        async def relay(method: str, path: str, headers: dict[str, str], **kw: Any) -> int:
            response = await d.client.request(method, f"/relay/{path}", headers=headers, **kw)
            error_of(response)
            return response.status_code

        billing = auth(BILLING)
        large = b"{" + b" " * 2048 + b"}"  # over the route's max_body_bytes (1024)
        assert await relay("POST", "omie/geral/clientes/", {}, content=large) == 401
        assert await relay("POST", "omie/geral/clientes/", auth(STRANGER), content=large) == 403
        assert await relay("POST", "omie/geral/clientes/", billing, content=large) == 400
        assert await relay("GET", "omie/geral/clientes/", billing) == 405  # the route's method
        wrong = await d.client.put("/relay/omie/geral/clientes/", headers=billing, json={})
        assert (wrong.status_code, wrong.headers["allow"]) == (405, "POST")
        assert await relay("PUT", "omie/geral/clientes/", auth(STRANGER), json={}) == 403
        assert await relay("POST", "omie/financas/", billing, json={}) == 403  # prefix
        for trick in (
            "%2e%2e/%2e%2e/admin", "..%2f..%2fadmin", "..;/admin", "x;jsessionid=1",
            "a%00b", "a%5cb", "%ef%bc%8e%ef%bc%8e/admin",
        ):  # fmt: skip
            assert await relay("POST", f"omie/geral/clientes/{trick}", billing, json={}) == 400
        assert await relay("POST", "omie/geral/clientes/?_method=DELETE", billing, json={}) == 400
        assert await relay("POST", "nope/geral/clientes/", billing, json={}) == 403
        assert await relay("POST", "omie/geral/clientes/", billing, content=b"[]") == 400
        assert d.api.received == []  # nothing refused reached the provider

    serve(scenario)


# --- readiness ------------------------------------------------------------------------------


def test_a_misconfigured_issuer_is_not_ready_and_says_why_once_in_the_log(
    serve: Callable[..., None], tmp_path: Path
) -> None:
    """Found: a misconfigured issuer answered 500 with an empty log while /healthz said ok."""
    from tokenbroker.kernel.log import flush

    log = tmp_path / "issuer.log"  # the issuer configures its own logging when it starts

    async def scenario(d: Deployment) -> None:
        health = await d.client.get("/healthz")
        assert health.status_code == 503
        assert health.json() == {"status": "unready", "error": "invalid_config"}
        assert health.headers["retry-after"] == "5"
        for _ in range(3):
            token = await d.token({"connection": "crm"})
            assert token.status_code == 500
            assert error_of(token) == "server_error"  # the detail is for the log only
        assert (await d.client.get("/healthz")).status_code == 503
        flush()
        lines = [json.loads(line) for line in log.read_text().splitlines()]
        reasons = [line for line in lines if line["message"] == "issuer not ready: cannot start"]
        assert len(reasons) == 1  # once, not once per request
        assert reasons[0]["severity"] == "ERROR"
        assert "TOKENBROKER_POLICY_FILE" in reasons[0]["error"]
        assert reasons[0]["retryable"] is False

    serve(scenario, TOKENBROKER_POLICY_FILE=None, TOKENBROKER_LOG_FILE=str(log))


def test_a_start_that_failed_for_a_passing_reason_is_tried_again(
    serve: Callable[..., None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store or key server down at start: /healthz is 503 until the retry finds it up."""
    from tokenbroker.entrypoints import compose
    from tokenbroker.kernel.errors import StoreUnavailable

    real = compose.build_issuer
    failing = [True]

    def build_issuer(*args: Any, **kwargs: Any) -> Any:
        if failing[0]:
            raise StoreUnavailable("state store unavailable")
        return real(*args, **kwargs)

    monkeypatch.setattr(compose, "build_issuer", build_issuer)
    monkeypatch.setattr(issuer_entry, "RETRY_BUILD_SECONDS", 0.2)

    async def scenario(d: Deployment) -> None:
        first = await d.client.get("/healthz")
        assert (first.status_code, first.json()["error"]) == (503, "store_unavailable")
        failing[0] = False
        assert (await d.client.get("/healthz")).status_code == 503  # within the wait
        await asyncio.sleep(0.25)
        assert (await d.client.get("/healthz")).json() == {"status": "ok"}
        assert (await d.token({"connection": "crm"})).status_code == 200

    serve(scenario)


def test_the_issuers_decisions_reach_cloud_monitoring_never_per_request(
    serve: Callable[..., None],
) -> None:
    """Counted per request in memory, written per interval (and at shutdown) in one request
    per batch of series: the caller's answer never waits for the Monitoring API."""
    from tests.support.monitoring_server import MonitoringTestServer
    from tokenbroker.kernel.metrics import PREFIX

    with MonitoringTestServer() as server:

        async def scenario(d: Deployment) -> None:
            for _ in range(3):
                assert (await d.token({"connection": "crm"})).status_code == 200
            assert (
                await d.token({"connection": "crm"}, auth("stranger@x.example"))
            ).status_code == 403
            assert server.calls["CreateTimeSeries"] == 0  # nothing written on the request path

        serve(scenario, TOKENBROKER_METRICS="cloud-monitoring", TOKENBROKER_GCP_PROJECT="p-iss",
              TOKENBROKER_MONITORING_ENDPOINT=server.address)  # fmt: skip
        decisions = {s.metric_labels["outcome"]: [p.value for p in s.points]
                     for s in server.series("p-iss", PREFIX + "issuer/decisions")}  # fmt: skip
        assert decisions == {"issued": [1], "cache_hit": [2], "denied": [1]}
        latency = {s.metric_labels["outcome"]: s.points[-1].value.count
                   for s in server.series("p-iss", PREFIX + "issuer/latency")}  # fmt: skip
        assert latency == {"issued": 1, "cache_hit": 2, "denied": 1}
        (series, *_) = server.series("p-iss", PREFIX + "issuer/decisions")
        assert series.resource_labels["job"] == "issuer"


# --- logs: the request's trace on every line ------------------------------------------------


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_every_line_of_a_traced_request_carries_its_trace_and_no_line_after_it(
    serve: Callable[..., None], tmp_path: Path, route: str
) -> None:
    """Cloud Run passes the caller's trace in ``traceparent`` and ``X-Cloud-Trace-Context``:
    every line the request causes -- the cold start's, the audit line of an issue, of a
    remembered request and of a denial -- names it (``projects/PROJECT/traces/ID``, the span in
    hex), and lines of a request without one (or with a malformed one) name none."""
    from tests.conftest import restore_session_logging
    from tokenbroker.kernel.log import flush

    log = tmp_path / "issuer.log"
    seen = 0
    trace_id, other = "4bf92f3577b34da6a3ce929d0e0e4736", "0af7651916cd43dd8448eb211c80319c"

    def new_lines() -> list[dict[str, Any]]:
        nonlocal seen
        flush()
        lines = json_lines(log.read_text())
        fresh, seen = lines[seen:], len(lines)
        assert fresh, "the request logged nothing"
        return fresh

    def traced(*, span: str, sampled: bool) -> dict[str, Any]:
        return {
            "logging.googleapis.com/trace": f"projects/tb-proj/traces/{trace_id}",
            "logging.googleapis.com/spanId": span,
            "logging.googleapis.com/trace_sampled": sampled,
        }

    async def scenario(d: Deployment) -> None:
        caller = auth()
        traceparent = f"00-{trace_id}-00f067aa0ba902b7-01"
        first = await d.token({"connection": "crm"}, {**caller, "traceparent": traceparent})
        assert first.status_code == 200, first.text
        lines = new_lines()
        assert [line["message"] for line in lines].count("token decision") == 1
        for line in lines:
            assert trace_fields(line) == traced(span="00f067aa0ba902b7", sampled=True), line
            assert line["logging.googleapis.com/labels"]["function"] == "tokenbroker-issuer"
        # The same request again, traced the legacy way: the remembered decision's line.
        legacy = {**caller, "X-Cloud-Trace-Context": f"{trace_id}/74;o=0"}
        again = await d.token({"connection": "crm"}, legacy)
        assert again.status_code == 200
        (line,) = new_lines()
        assert (line["outcome"], line["logging.googleapis.com/labels"]["component"]) == (
            "cache_hit", "issuer",
        )  # fmt: skip
        assert trace_fields(line) == traced(span="000000000000004a", sampled=False)
        # Both headers: traceparent wins.
        both = {**caller, "traceparent": f"00-{trace_id}-00000000000000aa-00",
                "X-Cloud-Trace-Context": f"{other}/1;o=1"}  # fmt: skip
        assert (await d.token({"connection": "crm"}, both)).status_code == 200
        (line,) = new_lines()
        assert trace_fields(line) == traced(span="00000000000000aa", sampled=False)
        # A denial's line (through Logger.warning, not the template).
        denied = await d.token({"connection": "payroll"}, {**caller, "traceparent": traceparent})
        assert denied.status_code == 403
        (line,) = new_lines()
        assert line["severity"] == "WARNING"
        assert trace_fields(line) == traced(span="00f067aa0ba902b7", sampled=True)
        # No header, or one that is not a trace: no trace fields, and the value never logged.
        bad = "00-" + "Z" * 32 + "-00f067aa0ba902b7-01"
        for headers in (caller, {**caller, "traceparent": bad, "X-Cloud-Trace-Context": bad}):
            assert (await d.token({"connection": "crm"}, headers)).status_code == 200
            (line,) = new_lines()
            assert trace_fields(line) == {}
        assert "Z" * 32 not in log.read_text()

    try:
        with ROUTES[route]():
            serve(scenario, TOKENBROKER_LOG_FILE=str(log), TOKENBROKER_LOG_LEVEL="info",
                  TOKENBROKER_GCP_PROJECT="tb-proj", K_SERVICE="tokenbroker-issuer")  # fmt: skip
    finally:
        restore_session_logging()
