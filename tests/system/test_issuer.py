"""The issuer as deployed: a real ``functions-framework --asgi`` process over the embedded
backend, callers authenticated by ID tokens checked against oidc-provider's real JWKS, OAuth
connections at oidc-provider, service accounts minted through the IAM Credentials test server,
and a relay to a local provider API."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import httpx
import pytest

from tests.support.iamcredentials_server import IamCredentialsTestServer
from tests.support.leaks import b64, recoverable
from tests.support.oidc import (
    CC_POST_ID,
    CC_POST_SECRET,
    RT_BASIC_ID,
    RT_BASIC_SECRET,
    OidcServer,
    signing_jwks,
)
from tests.system.helpers import (
    add_refresh_connection,
    caller_id_token,
    embedded_runtime,
    registry,
    request_token,
    schemathesis_run,
    tick,
)
from tests.system.processes import BIN, REPO, functions_framework
from tokenbroker.adapters.embedded import new_key_text
from tokenbroker.entrypoints.compose import Runtime
from tokenbroker.kernel.model import ClientAuthMethod, Connection, Credential, GrantType
from tokenbroker.kernel.secret import Secret
from tokenbroker.refresh.registry import ConnectionRegistry

pytestmark = pytest.mark.system

SOURCE = REPO / "functions" / "issuer" / "main.py"
AUDIENCE = "https://issuer.tokenbroker.test"
WORKER = "crm-sync@tb-test.iam.gserviceaccount.com"
OTHER = "stranger@tb-test.iam.gserviceaccount.com"
BILLING = "billing@tb-test.iam.gserviceaccount.com"
REPORT_SA = "reports@tb-test.iam.gserviceaccount.com"
BROKER_TOKEN = "broker-own-access-token-for-iam"
OMIE_KEY = "omie-app-key-123"
OMIE_SECRET = "omie-app-secret-XYZ987"


class ProviderApi(BaseHTTPRequestHandler):
    """A provider API behind the relay: records what arrives, echoes it back."""

    received: list[dict[str, Any]] = []  # noqa: RUF012 - shared by the handler instances

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        ProviderApi.received.append(
            {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
        )
        if self.path.startswith("/api/v1/redirect"):
            self.send_response(302)
            self.send_header("Location", "https://evil.example/steal")
            self.end_headers()
            return
        if "/leak" in self.path:
            self._leak(json.loads(body or b"{}").get("app_secret", ""))
            return
        payload = json.dumps({"ok": True, "echo": body.decode(errors="replace")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Set-Cookie", "session=abc")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _leak(self, secret: str) -> None:
        """Echo the injected secret in every header and encoding a careless provider might."""
        basic = "Basic " + b64("user:" + secret)
        echo = {
            "raw": secret,
            "basic": basic,
            "b64url": b64(secret, url=True, pad=False),
            "hex": secret.encode().hex(),
            "percent": quote(secret, safe=""),
            "nested": json.dumps({"token": secret}),
        }
        payload = json.dumps(echo).encode()
        self.send_response(401)
        for name, value in (
            ("Content-Type", "application/json"),
            ("X-Debug-Token", secret),
            ("Set-Cookie", f"session={secret}"),
            ("WWW-Authenticate", f'Bearer error="invalid_token", token="{secret}"'),
            ("Location", f"https://api.provider.test/cb?token={quote_plus(secret)}"),
            ("Link", f"<https://api.provider.test/p?auth={quote(basic, safe='')}>; rel=next"),
            ("Authorization", basic),
            ("Content-Length", str(len(payload))),
        ):
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _answer  # noqa: N815 - http.server naming

    def log_message(self, *_: Any) -> None:
        pass


@dataclass
class Deployment:
    url: str
    oidc: OidcServer
    iam: IamCredentialsTestServer
    provider_url: str
    state_dir: Path
    encryption_key: str

    def runtime(self) -> Runtime:
        """The deployment's stores, opened from this process (as the CLI opens them)."""
        return embedded_runtime(self.state_dir, encryption_key=Secret(self.encryption_key))

    def id_token(self, email: str = WORKER, **overrides: Any) -> str:
        return caller_id_token(self.oidc, AUDIENCE, email, **overrides)

    def token(self, body: Any, *, email: str = WORKER, token: str | None = None) -> httpx.Response:
        return request_token(self.url, body, token if token is not None else self.id_token(email))


def _register_omie(reg: ConnectionRegistry) -> None:
    """The static connection the omie relay injects: its key and secret go in the body."""
    reg.register(
        Connection(id="omie", profile="generic", grant=GrantType.STATIC, client_id=OMIE_KEY),
        Credential(client_secret=Secret(OMIE_SECRET)),
    )


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, oidc_server: OidcServer
) -> Iterator[Deployment]:
    work = tmp_path_factory.mktemp("issuer")
    key = new_key_text()
    state_dir = work / "state"
    runtime = embedded_runtime(state_dir, encryption_key=Secret(key))
    add_refresh_connection(
        runtime, oidc_server, "crm", client_id=RT_BASIC_ID, client_secret=RT_BASIC_SECRET,
        auth_method=ClientAuthMethod.BASIC,
    )  # fmt: skip
    reg = registry(runtime)
    reg.register(
        Connection(
            id="svc", profile="generic", grant=GrantType.CLIENT_CREDENTIALS, client_id=CC_POST_ID,
            scopes=("api:read", "api:write"), token_url=oidc_server.token_url,
            auth_method=ClientAuthMethod.POST, params={"resource": "urn:tokenbroker:api"},
        ),
        Credential(client_secret=Secret(CC_POST_SECRET)),
    )  # fmt: skip
    _register_omie(reg)
    summary = tick(runtime)
    assert summary.refreshed == 2, summary.to_json()  # crm and svc; omie has nothing to refresh
    runtime.close()

    iam = IamCredentialsTestServer(work / "iamcredentials-token-ledger.txt").start()
    iam.add_service_account(REPORT_SA)
    iam.allow(BROKER_TOKEN, REPORT_SA)
    # A keyless service-account connection: the broker impersonates it through IAM.
    runtime = embedded_runtime(state_dir, encryption_key=Secret(key))
    registry(runtime).register(
        Connection(
            id="reports", profile="google", grant=GrantType.IMPERSONATION,
            scopes=("https://www.googleapis.com/auth/drive.readonly",),
            params={"service_account": REPORT_SA},
        ),
        Credential(),
    )  # fmt: skip
    runtime.close()

    provider = ThreadingHTTPServer(("127.0.0.1", 0), ProviderApi)
    threading.Thread(target=provider.serve_forever, daemon=True).start()
    provider_url = f"http://127.0.0.1:{provider.server_address[1]}/api/v1/"

    policy = work / "policy.toml"
    policy.write_text(
        f"""
version = 1

[[grants]]
callers = ["{WORKER}"]
connections = ["crm"]
scopes = ["*"]
max_lifetime_seconds = 900

[[grants]]
callers = ["{WORKER}"]
connections = ["svc"]
scopes = ["api:read"]

[[grants]]
callers = ["{WORKER}"]
connections = ["reports"]
scopes = ["https://www.googleapis.com/auth/drive.readonly"]
max_lifetime_seconds = 600

[[relays]]
name = "omie-clients"
callers = ["{BILLING}"]
connection = "omie"
base_url = "{provider_url}"
methods = ["POST"]
path_prefixes = ["geral/clientes"]
inject = "body"
body_fields = {{ app_key = "client_id", app_secret = "client_secret" }}
"""
    )
    env = {
        "TOKENBROKER_STATE_DIR": str(state_dir),
        "TOKENBROKER_ENCRYPTION_KEY": key,
        "TOKENBROKER_POLICY_FILE": str(policy),
        "TOKENBROKER_ISSUER_AUDIENCE": AUDIENCE,
        "TOKENBROKER_ID_TOKEN_ISSUERS": oidc_server.issuer,
        "TOKENBROKER_ID_TOKEN_KEYS_URL": oidc_server.jwks_url,
        "TOKENBROKER_IAM_CREDENTIALS_ENDPOINT": iam.url,
        "TOKENBROKER_IAM_ACCESS_TOKEN": BROKER_TOKEN,
    }
    try:
        with functions_framework("issue", SOURCE, env, name="issuer", asgi=True) as url:
            yield Deployment(url, oidc_server, iam, provider_url, state_dir, key)
    finally:
        provider.shutdown()
        iam.stop()


def test_healthz(deployment: Deployment) -> None:
    assert httpx.get(f"{deployment.url}/healthz").json() == {"status": "ok"}


def test_full_scope_token_for_a_granted_caller(deployment: Deployment) -> None:
    response = deployment.token({"connection": "crm"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {
        "access_token", "token_type", "expires_at", "expires_in", "refresh_after", "scope",
        "connection",
    }  # fmt: skip
    assert body["connection"] == "crm"
    assert body["token_type"] == "Bearer"
    assert 0 < body["expires_in"] <= 900  # the policy's max lifetime bounds the answer
    assert body["refresh_after"] < body["expires_at"]
    assert response.headers["cache-control"] == "no-store"
    # It is the connection's current access token, served from the instance cache next time.
    again = deployment.token({"connection": "crm"}).json()
    assert again["access_token"] == body["access_token"]


def test_service_account_tokens_are_minted_with_exact_scopes_and_bounded_lifetime(
    deployment: Deployment,
) -> None:
    response = deployment.token({"connection": "reports"})
    assert response.status_code == 200, response.text
    body = response.json()
    minted = deployment.iam.issued[-1]
    assert minted.service_account == REPORT_SA
    assert minted.caller_token == BROKER_TOKEN  # the broker impersonates; no master credential
    assert list(minted.scopes) == ["https://www.googleapis.com/auth/drive.readonly"]
    assert minted.lifetime_seconds <= 600
    assert body["scope"] == "https://www.googleapis.com/auth/drive.readonly"
    assert body["expires_in"] <= 600


@pytest.mark.parametrize(
    ("body", "email", "status", "error"),
    [
        ({"connection": "crm"}, OTHER, 403, "access_denied"),  # not granted
        ({"connection": "nope"}, WORKER, 403, "access_denied"),  # unknown: same answer
        ({"connection": "svc", "scopes": ["api:write"]}, WORKER, 403, "access_denied"),
        ({"connection": "svc"}, WORKER, 403, "access_denied"),  # narrowing impossible here
        ({"connection": "reports", "scopes": ["https://www.googleapis.com/auth/cloud-platform"]},
         WORKER, 403, "access_denied"),  # escalation
        ({"connection": "crm", "min_ttl_seconds": 3000}, WORKER, 403, "access_denied"),
        ({"connection": 5}, WORKER, 400, "invalid_request"),
        ({"connection": "crm", "extra": 1}, WORKER, 400, "invalid_request"),
        ([1, 2], WORKER, 400, "invalid_request"),
    ],
)  # fmt: skip
def test_policy_and_request_errors(
    deployment: Deployment, body: Any, email: str, status: int, error: str
) -> None:
    response = deployment.token(body, email=email)
    assert response.status_code == status, response.text
    assert response.json()["error"] == error
    assert "Traceback" not in response.text


def test_unknown_and_ungranted_connections_look_the_same(deployment: Deployment) -> None:
    unknown = deployment.token({"connection": "does-not-exist"}).json()
    ungranted = deployment.token({"connection": "omie"}).json()
    assert unknown == ungranted


@pytest.mark.parametrize(
    "forge",
    [
        "missing", "not-a-jwt", "expired", "wrong-audience", "wrong-issuer", "unverified-email",
        "no-email", "alg-none", "hs256-with-public-key", "unknown-kid", "oversized",
    ],
)  # fmt: skip
def test_forged_caller_tokens_are_rejected_with_401(deployment: Deployment, forge: str) -> None:
    import base64

    def b64(data: Any) -> str:
        raw = data if isinstance(data, bytes) else json.dumps(data).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    now = int(time.time())
    good_claims = json.loads(base64.urlsafe_b64decode(deployment.id_token().split(".")[1] + "=="))
    tokens = {
        "missing": "",
        "not-a-jwt": "hello",
        "expired": deployment.id_token(iat=now - 7200, exp=now - 3600),
        "wrong-audience": deployment.id_token(aud="https://other.example"),
        "wrong-issuer": deployment.id_token(iss="https://accounts.evil.example"),
        "unverified-email": deployment.id_token(email_verified=False),
        "no-email": deployment.id_token(email=None),
        "alg-none": f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(good_claims)}.",
        "unknown-kid": None,
        "oversized": deployment.id_token(padding="x" * 20000),
    }
    import hashlib
    import hmac

    jwk = signing_jwks()["keys"][0]
    public_json = json.dumps({k: jwk[k] for k in ("kty", "n", "e")}).encode()
    signing_input = f"{b64({'alg': 'HS256', 'kid': jwk['kid']})}.{b64(good_claims)}"
    mac = hmac.new(public_json, signing_input.encode(), hashlib.sha256).digest()
    tokens["hs256-with-public-key"] = f"{signing_input}.{b64(mac)}"
    _header, payload, signature = deployment.id_token().split(".")
    tokens["unknown-kid"] = f"{b64({'alg': 'RS256', 'kid': 'not-a-key'})}.{payload}.{signature}"
    response = httpx.post(
        f"{deployment.url}/token",
        json={"connection": "crm"},
        headers={"Authorization": f"Bearer {tokens[forge]}"} if tokens[forge] else {},
        timeout=30,
    )
    assert response.status_code == 401, (forge, response.text)
    assert response.json()["error"] == "invalid_token"
    assert response.headers["www-authenticate"].startswith("Bearer ")


def test_relay_injects_the_credential_and_refuses_what_the_policy_does_not_list(
    deployment: Deployment,
) -> None:
    bearer = {"Authorization": f"Bearer {deployment.id_token(BILLING)}", "Cookie": "a=b"}
    ProviderApi.received.clear()
    ok = httpx.post(
        f"{deployment.url}/relay/omie/geral/clientes/", json={"call": "ListarClientes"},
        headers=bearer, timeout=30,
    )  # fmt: skip
    assert ok.status_code == 200, ok.text
    arrived = ProviderApi.received[-1]
    sent = json.loads(arrived["body"])
    assert sent == {
        "call": "ListarClientes", "app_key": "omie-app-key-123",
        "app_secret": "omie-app-secret-XYZ987",
    }  # fmt: skip
    lowered = {k.lower() for k in arrived["headers"]}
    assert "authorization" not in lowered  # the caller's ID token is not forwarded
    assert "cookie" not in lowered
    # The provider echoed the secret: the caller gets it redacted. Cookies are not passed back.
    assert "omie-app-secret-XYZ987" not in ok.text
    assert "set-cookie" not in ok.headers

    def relay(method: str, path: str, headers: dict[str, str] = bearer) -> int:
        return httpx.request(
            method, f"{deployment.url}/relay/{path}", json={}, headers=headers, timeout=30
        ).status_code

    assert relay("GET", "omie/geral/clientes/") == 405  # method not listed: the route's
    assert relay("POST", "omie/financas/contas/") == 403  # path prefix not listed
    assert relay("POST", "omie/geral/clientes/%2e%2e/%2e%2e/admin") == 400  # a trick
    assert relay("POST", "omie/geral/clientes/..%2f..%2fadmin") == 400
    assert relay("POST", "nope/geral/clientes/") == 403
    worker = {"Authorization": f"Bearer {deployment.id_token(WORKER)}"}
    assert relay("POST", "omie/geral/clientes/", worker) == 403  # caller not on the route
    assert relay("POST", "omie/geral/clientes/", {}) == 401


def _whole(response: httpx.Response) -> str:
    """Everything the caller receives: status line, every header, the body."""
    lines = [f"{response.http_version} {response.status_code} {response.reason_phrase}"]
    lines += [f"{k}: {v}" for k, v in response.headers.multi_items()]
    return "\n".join(lines) + "\n\n" + response.text


def _raw_request(url: str, method: str, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """One request with ``target`` on the request line byte for byte (httpx would normalise
    dot segments), and the answer's status and body."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        for name, value in {**headers, "Content-Type": "application/json"}.items():
            connection.putheader(name, value)
        connection.putheader("Content-Length", "2")
        connection.endheaders(b"{}")
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_relay_answers_never_carry_the_injected_secret(deployment: Deployment) -> None:
    """Issue 9: an echo of the injected credential in a response header, or encoded, reached
    the caller. Through the deployed function: nothing of it in status, headers or body."""
    response = httpx.post(
        f"{deployment.url}/relay/omie/geral/clientes/leak", json={"call": "x"},
        headers={"Authorization": f"Bearer {deployment.id_token(BILLING)}"}, timeout=30,
    )  # fmt: skip
    assert response.status_code == 401  # the provider's status, as it was
    assert json.loads(ProviderApi.received[-1]["body"])["app_secret"] == OMIE_SECRET
    whole = _whole(response)
    assert not recoverable(whole, OMIE_SECRET), whole
    assert "omie-app-key-123" not in whole
    names = {k.lower() for k, _ in response.headers.multi_items()}
    assert not names & {"x-debug-token", "set-cookie", "www-authenticate", "authorization"}
    assert response.headers["location"] == "https://api.provider.test/cb?token=[REDACTED]"
    assert response.json()["raw"] == "[REDACTED]"


@pytest.mark.parametrize(
    "trick",
    [
        "..;/admin", "x;jsessionid=abc", "%2e%2e/%2e%2e/admin", ".%2e/admin", "..%2fadmin",
        "a%5cb", "a%00b", "a%09b", "%252e%252e/admin", "%ef%bc%8e%ef%bc%8e/admin",
        "%c0%ae%c0%ae/admin", "../../admin", "./x", "a//b", "a%3bb",
    ],
)  # fmt: skip
def test_relay_path_tricks_are_a_400_on_the_live_server(deployment: Deployment, trick: str) -> None:
    before = len(ProviderApi.received)
    status, body = _raw_request(
        deployment.url, "POST", f"/relay/omie/geral/clientes/{trick}",
        {"Authorization": f"Bearer {deployment.id_token(BILLING)}"},
    )  # fmt: skip
    assert status == 400, (trick, body)
    error = json.loads(body)
    assert error["error"] == "invalid_request"
    assert set(error) == {"error", "error_description"}
    assert len(ProviderApi.received) == before  # nothing reached the provider


def test_a_relay_path_with_an_encoded_line_break_goes_nowhere(deployment: Deployment) -> None:
    """functions-framework's own router does not match a path whose decoded form holds a line
    break and answers a plain 404 before the issuer sees it: not OAuth-style, but nothing is
    relayed either."""
    before = len(ProviderApi.received)
    status, _ = _raw_request(
        deployment.url, "POST", "/relay/omie/geral/clientes/a%0d%0aX:%20y",
        {"Authorization": f"Bearer {deployment.id_token(BILLING)}"},
    )  # fmt: skip
    assert status in {400, 404}
    assert len(ProviderApi.received) == before


def test_relay_method_is_the_routes(deployment: Deployment) -> None:
    bearer = {"Authorization": f"Bearer {deployment.id_token(BILLING)}"}
    before = len(ProviderApi.received)
    for method in ("GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"):
        response = httpx.request(
            method, f"{deployment.url}/relay/omie/geral/clientes/", headers=bearer, timeout=30
        )
        assert (response.status_code, response.headers["allow"]) == (405, "POST"), method
    override = httpx.post(
        f"{deployment.url}/relay/omie/geral/clientes/?_method=DELETE", json={}, headers=bearer,
        timeout=30,
    )  # fmt: skip
    assert override.status_code == 400
    assert len(ProviderApi.received) == before


def test_relay_status_is_live(deployment: Deployment) -> None:
    """Issue 9: ``tokenbroker disable`` did not stop the relay (its credential cache never looked
    at the status). With the real CLI against the deployment's state: disabling, needing
    re-authorisation, removal and rotation each take effect on the very next request."""
    import os
    import subprocess

    from tokenbroker.kernel.model import ConnectionStatus

    env = {
        **os.environ, "TOKENBROKER_STATE_DIR": str(deployment.state_dir),
        "TOKENBROKER_ENCRYPTION_KEY": deployment.encryption_key,
    }  # fmt: skip

    def cli(*args: str, **extra: str) -> None:
        result = subprocess.run(
            [str(BIN / "tokenbroker"), *args], env={**env, **extra}, capture_output=True,
            text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert OMIE_SECRET not in result.stdout + result.stderr

    def relay() -> httpx.Response:
        return httpx.post(
            f"{deployment.url}/relay/omie/geral/clientes/", json={"call": "x"},
            headers={"Authorization": f"Bearer {deployment.id_token(BILLING)}"}, timeout=30,
        )  # fmt: skip

    def sent_secret() -> str:
        return str(json.loads(ProviderApi.received[-1]["body"])["app_secret"])

    assert relay().status_code == 200  # the credential is cached now
    try:
        cli("disable", "omie")
        refused = relay()
        assert (refused.status_code, refused.json()["error"]) == (409, "needs_reauth")
        cli("enable", "omie")
        assert relay().status_code == 200

        runtime = embedded_runtime(
            deployment.state_dir, encryption_key=Secret(deployment.encryption_key)
        )
        try:
            record = runtime.state.get("omie")
            runtime.state.put_state(
                "omie", replace(record.state, status=ConnectionStatus.NEEDS_REAUTH)
            )
            assert relay().status_code == 409
            runtime.state.put_state("omie", record.state)
        finally:
            runtime.close()
        assert relay().status_code == 200

        cli("reauth", "omie", "--client-secret-env", "S", S="omie-rotated-secret-42")
        assert relay().status_code == 200
        assert sent_secret() == "omie-rotated-secret-42"  # no cache period to wait out

        cli("remove", "omie", "--yes")
        gone = relay()
        assert (gone.status_code, gone.json()["error"]) == (403, "access_denied")
    finally:
        runtime = embedded_runtime(
            deployment.state_dir, encryption_key=Secret(deployment.encryption_key)
        )
        try:
            reg = registry(runtime)
            with contextlib.suppress(Exception):
                reg.remove("omie")
            _register_omie(reg)
        finally:
            runtime.close()
    assert relay().status_code == 200
    assert sent_secret() == OMIE_SECRET


@pytest.mark.parametrize(
    ("caller", "operations"),
    [(WORKER, "^/(token|healthz)"), (BILLING, "^/relay/")],
)
def test_schemathesis_finds_no_server_errors(
    deployment: Deployment, tmp_path: Path, caller: str, operations: str
) -> None:
    """Property-based requests generated from docs/issuer.openapi.yaml with this
    deployment's real connection names, scopes and relay paths (and some unknown ones), sent
    to the live process as a granted caller: no 5xx, and answers match the documented
    schemas."""
    generated, passed, output = schemathesis_run(
        deployment.url,
        tmp_path,
        token=deployment.id_token(caller),
        operations=operations,
        connections=["crm", "svc", "reports", "omie", "omie-clients", "ghost"],
        scopes=["api:read", "api:write", "https://www.googleapis.com/auth/drive.readonly", "x"],
        relay_paths=["geral/clientes/", "geral/clientes/ListarClientes", "elsewhere/x"],
    )
    assert generated == passed > 50, output[-3000:]
