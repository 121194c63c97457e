"""Caller identity behind Cloud Run IAM, against the live ``functions-framework --asgi``
process (issue 9, items 5 and 6).

Cloud Run's IAM front end is not here, so the tests send what it delivers: the caller's ID
token with its signature replaced by ``SIGNATURE_REMOVED_BY_GOOGLE``, in the header Cloud Run
checked (``X-Serverless-Authorization`` when present, else ``Authorization``), the other header
as the caller sent it
(https://cloud.google.com/run/docs/authenticating/service-to-service#acquire-token).

The callers' keys are served by a real JWK set server on 127.0.0.1 that can be made slow,
for the event-loop test (a refetch for an unknown ``kid`` must not stall other requests).
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import RSAKey

from tests.support.jwks_server import JwksServer
from tests.support.oidc import rsa_public_jwk, sign_rs256
from tests.system.processes import REPO, functions_framework
from tokenbroker.adapters.embedded import new_key_text
from tokenbroker.consumer import BrokerClient, BrokerInvalidToken
from tokenbroker.entrypoints.compose import build_runtime
from tokenbroker.entrypoints.settings import Settings
from tokenbroker.kernel.model import Connection, Credential, GrantType
from tokenbroker.kernel.secret import Secret

pytestmark = pytest.mark.system

SOURCE = REPO / "functions" / "issuer" / "main.py"
FUNCTIONS_URL = "https://europe-west1-tb-test.cloudfunctions.net/tokenbroker-issuer"
RUN_URL = "https://tokenbroker-issuer-4f7kq2xyza-ew.a.run.app"
ID_ISSUER = "https://accounts.google.com"
KID = "google-key-1"
GOOGLE = rsa.generate_private_key(public_exponent=65537, key_size=2048)
FORGER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
WORKER = "crm-sync@tb-test.iam.gserviceaccount.com"
ADMIN = "payroll-admin@tb-test.iam.gserviceaccount.com"
CRM_TOKEN = "AT-crm-current-identity-51c9"
PAYROLL_TOKEN = "AT-payroll-current-identity-e07a"
SLOW_SECONDS = 2.0
REMOVED = "SIGNATURE_REMOVED_BY_GOOGLE"


@pytest.fixture(scope="module")
def keys() -> Iterator[JwksServer]:
    """Google's certs URL stand-in; a test sets ``delay`` to make every answer wait first."""
    with JwksServer({"keys": [rsa_public_jwk(GOOGLE, KID)]}) as server:
        yield server


@pytest.fixture(scope="module")
def keys_url(keys: JwksServer) -> str:
    return keys.url


def b64(value: Any) -> str:
    raw = json.dumps(value, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def signed(email: str = WORKER, key: rsa.RSAPrivateKey = GOOGLE, **overrides: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": ID_ISSUER, "aud": FUNCTIONS_URL, "azp": "1098", "sub": f"sub-{email}",
        "email": email, "email_verified": True, "iat": now, "exp": now + 3600, **overrides,
    }  # fmt: skip
    return sign_rs256({k: v for k, v in claims.items() if v is not None}, key, kid=KID)


def delivered(email: str = WORKER, **overrides: Any) -> str:
    """The token as the container receives it from Cloud Run's IAM front end."""
    header, payload, _ = signed(email, **overrides).split(".")
    return f"{header}.{payload}.{REMOVED}"


def forged(email: str = ADMIN, header: dict[str, Any] | None = None, **overrides: Any) -> str:
    """An unsigned token the caller made up, dressed as a delivered one."""
    head = header if header is not None else {"alg": "RS256", "kid": KID, "typ": "JWT"}
    _, payload, _ = signed(email, **overrides).split(".")
    return f"{b64(head)}.{payload}.{REMOVED}"


@dataclass
class Issuer:
    url: str
    log: Path

    def token(
        self, connection: str, headers: list[tuple[str, str]] | dict[str, str]
    ) -> httpx.Response:
        pairs = list(headers.items()) if isinstance(headers, dict) else headers
        return httpx.post(
            f"{self.url}/token",
            content=json.dumps({"connection": connection}).encode(),
            headers=[("content-type", "application/json"), *pairs],
            timeout=30,
        )


def _seed(state_dir: Path, key: str) -> None:
    runtime = build_runtime(
        Settings(backend="embedded", state_dir=state_dir, encryption_key=Secret(key))
    )
    try:
        registry = runtime.registry()
        now = datetime.now(UTC)
        for cid, access in (("crm", CRM_TOKEN), ("payroll", PAYROLL_TOKEN)):
            registry.register(
                Connection(id=cid, profile="generic", grant=GrantType.REFRESH_TOKEN,
                           client_id="client", token_url="https://idp.invalid/token"),
                Credential(refresh_token=Secret(f"rt-{cid}"), client_secret=Secret("cs"),
                           access_token=Secret(access), obtained_at=now,
                           expires_at=now + timedelta(hours=2)),
            )  # fmt: skip
    finally:
        runtime.close()


POLICY = f"""
version = 1

[[grants]]
callers = ["{WORKER}"]
connections = ["crm"]
scopes = ["*"]

[[grants]]
callers = ["{ADMIN}"]
connections = ["payroll"]
scopes = ["*"]
"""


def _deploy(tmp: Path, keys_url: str, mode: str) -> Iterator[Issuer]:
    key = new_key_text()
    state_dir = tmp / "state"
    _seed(state_dir, key)
    policy = tmp / "policy.toml"
    policy.write_text(POLICY)
    name = f"issuer-identity-{mode}"
    env = {
        "TOKENBROKER_STATE_DIR": str(state_dir),
        "TOKENBROKER_ENCRYPTION_KEY": key,
        "TOKENBROKER_POLICY_FILE": str(policy),
        "TOKENBROKER_ISSUER_AUDIENCE": f"{FUNCTIONS_URL},{RUN_URL}",
        "TOKENBROKER_ID_TOKEN_ISSUERS": ID_ISSUER,
        "TOKENBROKER_ID_TOKEN_KEYS_URL": keys_url,
        "TOKENBROKER_CALLER_IDENTITY": mode,
        "WORKERS": "1",  # one event loop: what a stall would stall
        # Where the process's output goes (the session's capture directory, leak-scanned).
        "TOKENBROKER_TEST_CAPTURE_DIR": os.environ["TOKENBROKER_TEST_CAPTURE_DIR"],
    }
    with functions_framework("issue", SOURCE, env, name=name, asgi=True) as url:
        yield Issuer(url, Path(os.environ["TOKENBROKER_TEST_CAPTURE_DIR"]) / f"{name}.process.out")


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, keys_url: str) -> Iterator[Issuer]:
    yield from _deploy(tmp_path_factory.mktemp("platform"), keys_url, "platform")


@pytest.fixture(scope="module")
def verify(tmp_path_factory: pytest.TempPathFactory, keys_url: str) -> Iterator[Issuer]:
    yield from _deploy(tmp_path_factory.mktemp("verify"), keys_url, "verify")


def granted(response: httpx.Response, access_token: str) -> None:
    assert response.status_code == 200, response.text
    assert response.json()["access_token"] == access_token


def unauthenticated(response: httpx.Response, *tokens: str) -> None:
    assert response.status_code == 401, response.text
    body = response.json()
    assert set(body) == {"error", "error_description"}
    assert body["error"] == "invalid_token"
    assert response.headers["www-authenticate"].startswith("Bearer ")
    assert "Traceback" not in response.text
    for token in tokens:
        for segment in token.split("."):
            if len(segment) >= 8 and segment != REMOVED:
                assert segment not in response.text


def bearer(token: str) -> str:
    return f"Bearer {token}"


# --- platform mode: the service requires IAM invoker; Cloud Run verified the token --------------


def test_platform_a_token_as_cloud_run_delivers_it_in_authorization(platform: Issuer) -> None:
    """Before issue 9 the issuer re-verified the stripped signature: 401 for every caller."""
    granted(platform.token("crm", {"Authorization": bearer(delivered())}), CRM_TOKEN)


def test_platform_a_token_as_cloud_run_delivers_it_in_x_serverless_authorization(
    platform: Issuer,
) -> None:
    granted(platform.token("crm", {"X-Serverless-Authorization": bearer(delivered())}), CRM_TOKEN)


@pytest.mark.parametrize("aud", [FUNCTIONS_URL, RUN_URL])
def test_platform_both_urls_of_the_function_are_audiences(platform: Issuer, aud: str) -> None:
    granted(platform.token("crm", {"Authorization": bearer(delivered(aud=aud))}), CRM_TOKEN)


def test_platform_the_control_the_admin_really_gets_payroll(platform: Issuer) -> None:
    """So that a 403 below means "taken for the worker", not "payroll is broken"."""
    granted(platform.token("payroll", {"Authorization": bearer(delivered(ADMIN))}), PAYROLL_TOKEN)


def test_platform_a_forged_authorization_next_to_a_real_serverless_header_is_never_trusted(
    platform: Issuer,
) -> None:
    """The worker may invoke the function; it forges an unsigned token naming the admin in
    Authorization (Cloud Run leaves that header alone when X-Serverless-Authorization is
    there) hoping the issuer reads it."""
    fake = forged(ADMIN)
    headers = {"Authorization": bearer(fake), "X-Serverless-Authorization": bearer(delivered())}
    denied = platform.token("payroll", headers)
    assert denied.status_code == 403, denied.text  # taken for the worker, who has no payroll
    granted(platform.token("crm", headers), CRM_TOKEN)  # ... and the worker it is
    # A signed admin token in Authorization is no better: that header was not the one checked.
    headers["Authorization"] = bearer(signed(ADMIN))
    assert platform.token("payroll", headers).status_code == 403


@pytest.mark.parametrize(
    ("name", "token"),
    [
        ("expired", lambda: delivered(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)),
        ("wrong-audience", lambda: delivered(aud="https://other-fn-4f7kq2xyza-ew.a.run.app")),
        ("wrong-issuer", lambda: delivered(iss="https://accounts.evil.example")),
        ("email-not-verified", lambda: delivered(email_verified=False)),
        ("no-email", lambda: delivered(email=None)),
        ("alg-none", lambda: forged(WORKER, header={"alg": "none", "typ": "JWT"})),
        ("alg-none-empty-signature", lambda: forged(WORKER, {"alg": "none"})[: -len(REMOVED)]),
        ("kept-its-signature", signed),
        ("forged-signature", lambda: signed(key=FORGER)),
        ("other-placeholder", lambda: delivered()[: -len(REMOVED)] + "SIGNATURE_REMOVED"),
    ],
)
def test_platform_refuses_what_the_front_end_did_not_vouch_for(
    platform: Issuer, name: str, token: Any
) -> None:
    value = token()
    for header in ("Authorization", "X-Serverless-Authorization"):
        unauthenticated(platform.token("crm", {header: bearer(value)}), value)


def test_platform_two_serverless_headers_are_refused(platform: Issuer) -> None:
    response = platform.token(
        "payroll",
        [
            ("X-Serverless-Authorization", bearer(delivered())),
            ("X-Serverless-Authorization", bearer(forged(ADMIN))),
        ],
    )
    unauthenticated(response)


@pytest.mark.parametrize("joiner", [", Bearer ", ",", " "])
def test_platform_a_header_with_two_tokens_is_refused(platform: Issuer, joiner: str) -> None:
    value = f"Bearer {delivered()}{joiner}{forged(ADMIN)}"
    unauthenticated(platform.token("payroll", {"X-Serverless-Authorization": value}))


@pytest.mark.parametrize(
    ("auth_name", "serverless_name"),
    [
        ("authorization", "x-serverless-authorization"),
        ("AUTHORIZATION", "X-SERVERLESS-AUTHORIZATION"),
        ("AuThOrIzAtIoN", "x-SeRvErLeSs-AuThOrIzAtIoN"),
    ],
)
def test_platform_header_names_in_any_case(
    platform: Issuer, auth_name: str, serverless_name: str
) -> None:
    headers = [(auth_name, bearer(forged(ADMIN))), (serverless_name, bearer(delivered()))]
    assert platform.token("payroll", headers).status_code == 403
    granted(platform.token("crm", headers), CRM_TOKEN)


def test_platform_never_logs_caller_tokens(platform: Issuer) -> None:
    token = delivered()
    granted(platform.token("crm", {"Authorization": bearer(token)}), CRM_TOKEN)
    unauthenticated(platform.token("crm", {"Authorization": bearer(signed())}))
    time.sleep(0.2)
    log = platform.log.read_text(errors="replace")
    _header, payload, _ = token.split(".")
    assert payload not in log
    assert "signature in platform mode" in log  # the misdeployment is said, once


# --- verify mode: the issuer verifies signatures ------------------------------------------------


def test_verify_a_signed_token_in_authorization(verify: Issuer) -> None:
    granted(verify.token("crm", {"Authorization": bearer(signed())}), CRM_TOKEN)


def test_verify_behind_iam_with_the_invoker_token_in_x_serverless_authorization(
    verify: Issuer,
) -> None:
    """Cloud Run checked X-Serverless-Authorization and stripped it; Authorization arrives
    signed and is what the issuer verifies. A stripped admin token there counts for nothing."""
    headers = {
        "Authorization": bearer(signed()),
        "X-Serverless-Authorization": bearer(delivered(ADMIN)),
    }
    granted(verify.token("crm", headers), CRM_TOKEN)
    assert verify.token("payroll", headers).status_code == 403


@pytest.mark.parametrize(
    "headers",
    [
        lambda: {"Authorization": bearer(delivered())},  # unsigned: stripped by the front end
        lambda: {"Authorization": bearer(forged(WORKER))},
        lambda: {"X-Serverless-Authorization": bearer(signed())},  # not our header
        lambda: {  # both unsigned
            "Authorization": bearer(forged(WORKER)),
            "X-Serverless-Authorization": bearer(delivered()),
        },
        lambda: {"Authorization": bearer(signed(key=FORGER))},
        lambda: {"Authorization": bearer(signed(aud="https://elsewhere.example"))},
        lambda: {"Authorization": bearer(signed(email_verified=False))},
        lambda: {"Authorization": bearer(forged(WORKER, {"alg": "none"})[: -len(REMOVED)])},
    ],
)
def test_verify_refuses_unsigned_and_bad_tokens(verify: Issuer, headers: Any) -> None:
    unauthenticated(verify.token("crm", headers()))


def test_verify_two_authorization_headers_are_refused(verify: Issuer) -> None:
    response = verify.token(
        "crm", [("Authorization", bearer(signed())), ("Authorization", bearer(signed(ADMIN)))]
    )
    unauthenticated(response)


def test_verify_an_unknown_kid_refetch_does_not_stall_the_function(
    verify: Issuer, keys: JwksServer
) -> None:
    """Issue 9: the JWKS refetch ran blocking I/O on the event loop, so one token with an
    unknown kid stalled every request -- /healthz too -- for the keys server's response time."""
    known = {"Authorization": bearer(signed())}
    granted(verify.token("crm", known), CRM_TOKEN)  # cold start done, keys cached
    _header, payload, signature = signed().split(".")
    unknown = f"{b64({'alg': 'RS256', 'kid': 'rotated-in', 'typ': 'JWT'})}.{payload}.{signature}"
    answered = keys.answered
    keys.delay = SLOW_SECONDS
    try:
        with ThreadPoolExecutor(1) as pool:
            stalled = pool.submit(verify.token, "crm", {"Authorization": bearer(unknown)})
            time.sleep(0.3)  # the refetch is under way
            started = time.monotonic()
            health = httpx.get(f"{verify.url}/healthz", timeout=30)
            health_took = time.monotonic() - started
            started = time.monotonic()
            other = verify.token("crm", {"Authorization": bearer(signed())})  # a new token
            known_took = time.monotonic() - started
            refused = stalled.result(timeout=30)
    finally:
        keys.delay = 0.0
    assert health.status_code == 200
    granted(other, CRM_TOKEN)
    assert health_took < 0.5, health_took
    assert known_took < 0.5, known_took
    unauthenticated(refused)
    assert keys.answered == answered + 1  # one refetch


# --- end to end: the consumer client through a front end that does what Cloud Run's does -------


class CloudRunFrontEnd(BaseHTTPRequestHandler):
    """Cloud Run's IAM check as documented
    (https://cloud.google.com/run/docs/authenticating/service-to-service#acquire-token): it
    checks ``X-Serverless-Authorization`` when present, else ``Authorization`` -- signature
    (Google's key), ``aud`` (a URL of the service), expiry -- answers 401 itself when that
    fails, and passes the request on with the checked token's signature replaced by
    ``SIGNATURE_REMOVED_BY_GOOGLE``, the other header untouched."""

    upstream: ClassVar[str] = ""

    def _check(self, value: str | None) -> str | None:
        if not value or not value.startswith("Bearer "):
            return None
        token = value.removeprefix("Bearer ")
        key = RSAKey.import_key(rsa_public_jwk(GOOGLE, KID))
        try:
            claims = jwt.decode(token, key, algorithms=["RS256"]).claims
        except (JoseError, ValueError):
            return None
        if claims.get("aud") not in (FUNCTIONS_URL, RUN_URL) or claims["exp"] < time.time():
            return None
        header, payload, _ = token.split(".")
        return f"Bearer {header}.{payload}.{REMOVED}"

    def do_POST(self) -> None:
        checked_name = (
            "X-Serverless-Authorization"
            if "X-Serverless-Authorization" in self.headers
            else "Authorization"
        )
        stripped = self._check(self.headers.get(checked_name))
        if stripped is None:
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        forwarded = [
            (name, stripped if name.lower() == checked_name.lower() else value)
            for name, value in self.headers.items()
            if name.lower() not in ("host", "content-length", "connection")
        ]
        answer = httpx.post(f"{self.upstream}{self.path}", content=body, headers=forwarded)
        self.send_response(answer.status_code)
        for name in ("content-type", "cache-control", "www-authenticate"):
            if name in answer.headers:
                self.send_header(name, answer.headers[name])
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)

    def log_message(self, *_: Any) -> None:
        return


def _front_end(upstream: str) -> Iterator[str]:
    handler = type("FrontEnd", (CloudRunFrontEnd,), {"upstream": upstream})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def platform_behind_iam(platform: Issuer) -> Iterator[str]:
    yield from _front_end(platform.url)


@pytest.fixture(scope="module")
def verify_behind_iam(verify: Issuer) -> Iterator[str]:
    yield from _front_end(verify.url)


def client_for(url: str, **options: Any) -> BrokerClient:
    return BrokerClient(
        url, audience=RUN_URL, id_token_source=lambda aud: signed(aud=aud), min_ttl_seconds=0,
        deadline_seconds=10, **options,
    )  # fmt: skip


@pytest.mark.parametrize("serverless_authorization", [True, False])
def test_the_client_through_cloud_run_iam_to_a_platform_mode_issuer(
    platform_behind_iam: str, serverless_authorization: bool
) -> None:
    with client_for(platform_behind_iam, serverless_authorization=serverless_authorization) as c:
        assert c.token("crm").access_token.reveal() == CRM_TOKEN


def test_the_client_through_cloud_run_iam_to_a_verify_mode_issuer(verify_behind_iam: str) -> None:
    """The default sends the token in both headers: Cloud Run checks and strips the invoker
    copy, the issuer verifies the signed one. With Authorization only, Cloud Run strips the
    one token there is and a verify-mode issuer rightly refuses it."""
    with client_for(verify_behind_iam) as client:
        assert client.token("crm").access_token.reveal() == CRM_TOKEN
    with (
        client_for(verify_behind_iam, serverless_authorization=False) as client,
        pytest.raises(BrokerInvalidToken),
    ):
        client.token("crm")


def test_the_front_end_itself_refuses_a_forged_invoker_token(platform_behind_iam: str) -> None:
    """What the platform mode leans on: an unsigned token never gets past Cloud Run."""
    response = httpx.post(
        f"{platform_behind_iam}/token",
        json={"connection": "payroll"},
        headers={"X-Serverless-Authorization": bearer(forged(ADMIN))},
    )
    assert response.status_code == 401
