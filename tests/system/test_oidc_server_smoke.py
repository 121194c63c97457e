"""The OAuth test server behaves as the broker's system tests assume.

Plain httpx against ``tests/oidc_server`` (oidc-provider), not the tokenbroker library: if one
of these fails, every broker test built on that behaviour would be testing a fiction.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

try:  # `tests` is a package only when the repository root is on sys.path
    from tests.support import oidc
except ImportError:  # pragma: no cover - pytest's rootdir-less import mode
    from support import oidc  # type: ignore[no-redef]

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(not oidc.node_available(), reason=oidc.NODE_INSTALL_HINT),
]

SA_EMAIL = "broker-test@tokenbroker-test.iam.gserviceaccount.com"


@pytest.fixture(scope="module")
def service_account() -> tuple[dict[str, Any], dict[str, str]]:
    return oidc.make_service_account(SA_EMAIL)


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
    service_account: tuple[dict[str, Any], dict[str, str]],
) -> Iterator[oidc.OidcServer]:
    srv = oidc.start_oidc_server(tmp_path_factory, service_accounts=[service_account])
    yield srv
    srv.stop()


@pytest.fixture
def sa_key(
    server: oidc.OidcServer, service_account: tuple[dict[str, Any], dict[str, str]]
) -> dict[str, Any]:
    """The module's service account key JSON, with token_uri pointing at this server."""
    return {**service_account[0], "token_uri": server.token_url}


@pytest.fixture(autouse=True)
def _clean_faults(server: oidc.OidcServer) -> Iterator[None]:
    server.clear_faults()
    server.reset_stats()
    yield
    server.clear_faults()


def _verify_rs256(token: str, jwks: dict[str, Any]) -> dict[str, Any]:
    """Check a JWT's RS256 signature against the server's published JWKS."""
    header_b64, payload_b64, sig_b64 = token.split(".")
    header = json.loads(oidc.b64url_decode(header_b64))
    assert header["alg"] == "RS256"
    jwk = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    public_key = rsa.RSAPublicNumbers(
        int.from_bytes(oidc.b64url_decode(jwk["e"]), "big"),
        int.from_bytes(oidc.b64url_decode(jwk["n"]), "big"),
    ).public_key()
    public_key.verify(
        oidc.b64url_decode(sig_b64),
        f"{header_b64}.{payload_b64}".encode(),
        padding.PKCS1v15(),
        hashes.SHA256(),
    )
    return oidc.jwt_claims(token)


def _error(resp: httpx.Response) -> str | None:
    try:
        return resp.json().get("error")
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# client_credentials (RFC 6749 section 4.4) -> RFC 9068 JWT access tokens
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_id", "secret", "auth_method"),
    [
        (oidc.CC_BASIC_ID, oidc.CC_BASIC_SECRET, "basic"),
        (oidc.CC_POST_ID, oidc.CC_POST_SECRET, "post"),
    ],
)
def test_client_credentials_returns_signed_jwt(
    server: oidc.OidcServer, client_id: str, secret: str, auth_method: str
) -> None:
    resp = server.client_credentials(client_id, secret, scope="api:read", auth_method=auth_method)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 300
    assert body["scope"] == "api:read"
    assert len(body["access_token"].split(".")) == 3

    jwks = httpx.get(server.jwks_url).json()
    assert jwks == oidc.public_jwks()  # fixed keys, stable across restarts
    claims = _verify_rs256(body["access_token"], jwks)
    assert claims["iss"] == server.issuer
    assert claims["aud"] == oidc.API_RESOURCE
    assert claims["client_id"] == client_id
    assert claims["exp"] - claims["iat"] == 300


def test_client_credentials_wrong_secret_or_method_is_invalid_client(
    server: oidc.OidcServer,
) -> None:
    resp = server.client_credentials(oidc.CC_BASIC_ID, "wrong", auth_method="basic")
    assert resp.status_code == 401
    assert _error(resp) == "invalid_client"
    # A client registered for client_secret_basic may not authenticate with client_secret_post.
    resp = server.client_credentials(oidc.CC_BASIC_ID, oidc.CC_BASIC_SECRET, auth_method="post")
    assert resp.status_code == 401
    assert _error(resp) == "invalid_client"


# ---------------------------------------------------------------------------------------------
# authorization_code + PKCE, refresh rotation and reuse detection (RFC 9700 section 4.14.2)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_id", "secret"),
    [(oidc.RT_BASIC_ID, oidc.RT_BASIC_SECRET), (oidc.RT_POST_ID, oidc.RT_POST_SECRET)],
)
def test_refresh_rotates_and_reuse_revokes_the_grant(
    server: oidc.OidcServer, client_id: str, secret: str
) -> None:
    first = server.obtain_refresh_token(client_id, secret)
    assert first["refresh_token"]
    assert first["id_token"]
    assert first["expires_in"] == 300
    assert oidc.jwt_claims(first["access_token"])["sub"] == oidc.TEST_ACCOUNT

    rotated = server.refresh(first["refresh_token"], client_id, secret)
    assert rotated.status_code == 200, rotated.text
    second = rotated.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert len(second["access_token"].split(".")) == 3

    # Replaying the consumed refresh token: invalid_grant, and the whole grant is revoked.
    replay = server.refresh(first["refresh_token"], client_id, secret)
    assert replay.status_code == 400
    assert _error(replay) == "invalid_grant"
    dead = server.refresh(second["refresh_token"], client_id, secret)
    assert dead.status_code == 400
    assert _error(dead) == "invalid_grant"
    assert server.stats()["invalid_grant"] == 2


def test_refresh_token_of_another_client_is_invalid_grant(server: oidc.OidcServer) -> None:
    tokens = server.obtain_refresh_token(oidc.RT_BASIC_ID, oidc.RT_BASIC_SECRET)
    resp = server.refresh(tokens["refresh_token"], oidc.RT_POST_ID, oidc.RT_POST_SECRET)
    assert resp.status_code == 400
    assert _error(resp) == "invalid_grant"


def test_revoked_refresh_token_is_invalid_grant(server: oidc.OidcServer) -> None:
    tokens = server.obtain_refresh_token()
    server.revoke(tokens["refresh_token"], token_type_hint="refresh_token")
    resp = server.refresh(tokens["refresh_token"])
    assert resp.status_code == 400
    assert _error(resp) == "invalid_grant"
    assert server.introspect(tokens["refresh_token"])["active"] is False


# ---------------------------------------------------------------------------------------------
# JWT bearer grant (RFC 7523), Google service-account style: no client authentication
# ---------------------------------------------------------------------------------------------


def test_jwt_bearer_valid_assertion_gets_a_token(
    server: oidc.OidcServer, sa_key: dict[str, Any]
) -> None:
    assertion = oidc.make_jwt_bearer_assertion(sa_key, scope="api:read api:write")
    resp = server.jwt_bearer(assertion)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 300
    claims = _verify_rs256(body["access_token"], httpx.get(server.jwks_url).json())
    assert claims["sub"] == SA_EMAIL
    assert claims["scope"] == "api:read api:write"
    assert claims["aud"] == oidc.API_RESOURCE


def test_jwt_bearer_runtime_registered_service_account(server: oidc.OidcServer) -> None:
    key_json = server.add_service_account("late@tokenbroker-test.iam.gserviceaccount.com")
    assert key_json["token_uri"] == server.token_url
    assert key_json["private_key"].startswith("-----BEGIN PRIVATE KEY-----")
    resp = server.jwt_bearer(oidc.make_jwt_bearer_assertion(key_json))
    assert resp.status_code == 200, resp.text


def _bad_assertions(sa_key: dict[str, Any]) -> dict[str, str]:
    other_key, _ = oidc.make_service_account(SA_EMAIL)  # same email, unregistered key
    now = int(time.time())
    return {
        "wrong audience": oidc.make_jwt_bearer_assertion(
            sa_key, audience="https://oauth2.googleapis.com/token"
        ),
        "expired": oidc.make_jwt_bearer_assertion(sa_key, iat=now - 7200, lifetime=3600),
        "wrong key": oidc.make_jwt_bearer_assertion(
            {
                **other_key,
                "private_key_id": sa_key["private_key_id"],
                "token_uri": sa_key["token_uri"],
            }
        ),
        "lifetime over an hour": oidc.make_jwt_bearer_assertion(sa_key, lifetime=7200),
        "no scope": oidc.make_jwt_bearer_assertion(sa_key, scope=""),
        "unknown issuer": oidc.make_jwt_bearer_assertion(
            {**sa_key, "client_email": "nobody@example.iam.gserviceaccount.com"}
        ),
        "not a jwt": "not-a-jwt",
    }


def test_jwt_bearer_bad_assertions_are_invalid_grant(
    server: oidc.OidcServer, sa_key: dict[str, Any]
) -> None:
    for label, assertion in _bad_assertions(sa_key).items():
        resp = server.jwt_bearer(assertion)
        assert resp.status_code == 400, (label, resp.text)
        assert _error(resp) == "invalid_grant", (label, resp.text)
        assert resp.json()["error_description"], label


# ---------------------------------------------------------------------------------------------
# Fault injection and counters
# ---------------------------------------------------------------------------------------------


def test_status_fault_has_retry_after_and_does_not_consume_the_refresh_token(
    server: oidc.OidcServer,
) -> None:
    tokens = server.obtain_refresh_token()
    server.reset_stats()
    server.set_faults([{"kind": "status", "status": 503, "retry_after": "2"}])

    faulted = server.refresh(tokens["refresh_token"])
    assert faulted.status_code == 503
    assert faulted.headers["retry-after"] == "2"
    assert _error(faulted) == "temporarily_unavailable"

    ok = server.refresh(tokens["refresh_token"])  # the same refresh token still works
    assert ok.status_code == 200, ok.text

    stats = server.stats()
    assert stats["token_requests"] == 2
    assert stats["token_requests_by_grant_type"] == {"refresh_token": 2}
    assert stats["responses_by_status"] == {"503": 1, "200": 1}
    assert stats["faults_served"] == 1
    assert stats["faults_queued"] == 0
    assert stats["invalid_grant"] == 0


def test_200_faults_and_hang(server: oidc.OidcServer) -> None:
    server.set_faults(
        [
            {"kind": "error_200", "body": {"error": "invalid_code"}},
            {"kind": "malformed_200"},
            {"kind": "malformed_200", "variant": "json"},
            {"kind": "status", "status": 429, "body": {"error": "rate_limit_exceeded"}},
            {"kind": "pass"},
            {"kind": "hang", "seconds": 0.3},
        ]
    )
    resp = server.client_credentials()
    assert (resp.status_code, resp.json()) == (200, {"error": "invalid_code"})
    resp = server.client_credentials()
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    resp = server.client_credentials()
    assert resp.status_code == 200
    assert "access_token" not in resp.json()
    resp = server.client_credentials()
    assert (resp.status_code, _error(resp)) == (429, "rate_limit_exceeded")
    resp = server.client_credentials()  # "pass": served by the provider
    assert resp.status_code == 200
    assert "access_token" in resp.json()
    started = time.monotonic()
    resp = server.client_credentials()
    assert resp.status_code == 504
    assert time.monotonic() - started >= 0.3
    assert server.client_credentials().status_code == 200  # queue drained
    assert server.stats()["faults_served"] == 6


def test_hang_fault_client_timeout_and_close(server: oidc.OidcServer) -> None:
    server.set_faults([{"kind": "hang", "seconds": 1, "close": True}])
    with pytest.raises(httpx.TimeoutException), httpx.Client(timeout=0.3) as http:
        http.post(
            server.token_url,
            data={"grant_type": "client_credentials"},
            auth=(oidc.CC_BASIC_ID, oidc.CC_BASIC_SECRET),
        )
    time.sleep(0.8)  # let the server finish the hang and drop the connection
    assert server.stats()["responses_by_status"].get("dropped") == 1


def test_lost_response_consumes_the_refresh_token(server: oidc.OidcServer) -> None:
    """The crash-after-commit case: the provider rotated, the client never saw the new token."""
    tokens = server.obtain_refresh_token()
    server.set_faults([{"kind": "lost_response", "status": 502}])
    lost = server.refresh(tokens["refresh_token"])
    assert lost.status_code == 502
    retry = server.refresh(tokens["refresh_token"])
    assert retry.status_code == 400
    assert _error(retry) == "invalid_grant"


def test_latency_delays_token_responses(server: oidc.OidcServer) -> None:
    server.set_latency(200)
    try:
        started = time.monotonic()
        assert server.client_credentials().status_code == 200
        assert time.monotonic() - started >= 0.2
        assert server.stats()["latency_ms"] == 200
    finally:
        server.set_latency(0)


# ---------------------------------------------------------------------------------------------
# Ledger and restart
# ---------------------------------------------------------------------------------------------


def test_ledger_holds_every_issued_token(server: oidc.OidcServer, sa_key: dict[str, Any]) -> None:
    seen: list[str] = []
    first = server.obtain_refresh_token(oidc.RT_POST_ID, oidc.RT_POST_SECRET)
    seen += [first["access_token"], first["refresh_token"], first["id_token"]]
    second = server.refresh(first["refresh_token"], oidc.RT_POST_ID, oidc.RT_POST_SECRET).json()
    seen += [second["access_token"], second["refresh_token"]]
    seen.append(
        server.client_credentials(oidc.CC_POST_ID, oidc.CC_POST_SECRET).json()["access_token"]
    )
    seen.append(server.jwt_bearer(oidc.make_jwt_bearer_assertion(sa_key)).json()["access_token"])

    ledger = server.ledger_tokens()
    missing = [t[:12] for t in seen if t not in ledger]
    assert not missing
    # The server's own logs never carry a token value.
    logs = Path(server.stdout_path).read_text() + Path(server.stderr_path).read_text()
    assert not [t[:12] for t in ledger if t in logs]


def test_restart_keeps_signing_keys_and_loses_tokens(server: oidc.OidcServer) -> None:
    tokens = server.obtain_refresh_token()
    jwks_before = httpx.get(server.jwks_url).json()
    server.restart()
    assert httpx.get(server.jwks_url).json() == jwks_before
    resp = server.refresh(tokens["refresh_token"])
    assert resp.status_code == 400
    assert _error(resp) == "invalid_grant"
