"""Caller ID tokens end to end against a real OpenID Provider (oidc-provider) standing in for
Google: real ID tokens, the real ``/jwks`` endpoint over HTTP, and forged tokens built with the
server's own signing key (``signing_jwks()``, the same ``kid`` it publishes).

oidc-provider's test account carries only ``sub`` (``findAccount`` in
tests/oidc_server/server.mjs), so its real ID tokens have no ``email``: they must pass every
check up to the identity claims and fail exactly there. Google-shaped claims (``email``,
``email_verified``) are covered by tokens this test signs with the server's key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from joserfc.jwk import RSAKey

from tests.support.oidc import (
    RT_BASIC_ID,
    RT_POST_ID,
    RT_POST_SECRET,
    OidcServer,
    jwt_claims,
    rsa_public_jwk,
    sign_rs256,
    signing_jwks,
)
from tokenbroker.issue.idtoken import Caller, IdTokenVerifier, KeySet
from tokenbroker.kernel.errors import InvalidCallerToken

pytestmark = pytest.mark.system

CALLER = "Nightly-Report@tokenbroker-test.iam.gserviceaccount.com"
AUDIENCE = "https://europe-west1-tokenbroker-test.cloudfunctions.net/issuer"
SERVER_CHANGE_FOR_EMAIL = (
    "oidc-provider's test account has no email claim. To issue Google-shaped ID tokens, "
    "tests/oidc_server/server.mjs would need: findAccount claims() returning "
    "{sub, email: '<sa>@<project>.iam.gserviceaccount.com', email_verified: true}; "
    "`claims: {openid: ['sub'], email: ['email', 'email_verified']}` in the Provider "
    "configuration; and the test requests scope 'openid email ...' (already does)."
)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def server_private_key() -> tuple[rsa.RSAPrivateKey, str]:
    """The private key oidc-provider signs with, and the kid its /jwks publishes for it."""
    jwk = signing_jwks()["keys"][0]
    key = RSAKey.import_key(jwk).raw_value
    assert isinstance(key, rsa.RSAPrivateKey)
    return key, jwk["kid"]


@pytest.fixture
def keys(oidc: OidcServer) -> KeySet:
    return KeySet(oidc.jwks_url)


def verifier_for(oidc: OidcServer, keys: KeySet, audience: str, **kwargs: Any) -> IdTokenVerifier:
    return IdTokenVerifier(audience=audience, issuers=(oidc.issuer,), keys=keys, **kwargs)


def google_shaped(oidc: OidcServer, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": oidc.issuer,
        "aud": AUDIENCE,
        "azp": "104857600000000000001",
        "sub": "104857600000000000001",
        "email": CALLER,
        "email_verified": True,
        "iat": now,
        "exp": now + 3600,
    }
    claims.update(overrides)
    return claims


def server_signed(
    oidc: OidcServer,
    claims: Mapping[str, Any] | None = None,
    *,
    header: Mapping[str, Any] | None = None,
    kid: str | None = None,
) -> str:
    key, server_kid = server_private_key()
    return sign_rs256(
        claims if claims is not None else google_shaped(oidc),
        key,
        kid=server_kid if kid is None else kid,
        header=header,
    )


def rejected(verifier: IdTokenVerifier, token: str, match: str) -> None:
    with pytest.raises(InvalidCallerToken, match=match) as info:
        verifier.verify(token)
    assert token not in str(info.value)
    assert info.value.http_status == 401 and info.value.code == "invalid_token"


# --- real tokens from oidc-provider --------------------------------------------------------------


def test_real_id_token_passes_signature_issuer_audience_and_time_checks(
    oidc: OidcServer, keys: KeySet
) -> None:
    id_token = oidc.obtain_refresh_token(scope="openid email offline_access api:read")["id_token"]
    claims = jwt_claims(id_token)
    assert claims["aud"] == RT_BASIC_ID and claims["iss"] == oidc.issuer
    verifier = verifier_for(oidc, keys, RT_BASIC_ID)
    if "email" in claims:  # the server was given an email claim (see SERVER_CHANGE_FOR_EMAIL)
        caller = verifier.verify(id_token)
        assert caller.subject == claims["sub"] and caller.issuer == oidc.issuer
        return
    # Every check before the identity claims passed: the real RS256 signature against the real
    # /jwks, iss, aud, exp/iat and lifetime. It fails on the first claim Google adds.
    rejected(verifier, id_token, "^token has no email claim$")
    assert keys.fetches == 1 and keys.kids == {server_private_key()[1]}


def test_real_id_token_with_email_claims(oidc: OidcServer, keys: KeySet) -> None:
    id_token = oidc.obtain_refresh_token(scope="openid email offline_access api:read")["id_token"]
    if "email" not in jwt_claims(id_token):
        pytest.skip(SERVER_CHANGE_FOR_EMAIL)
    caller = verifier_for(oidc, keys, RT_BASIC_ID).verify(id_token)
    assert "@" in caller.email and caller.email == caller.email.lower()


def test_real_id_token_for_another_client_is_rejected(oidc: OidcServer, keys: KeySet) -> None:
    id_token = oidc.obtain_refresh_token(RT_POST_ID, RT_POST_SECRET)["id_token"]
    rejected(
        verifier_for(oidc, keys, RT_BASIC_ID),
        id_token,
        "^token aud does not match this service's audience$",
    )


def test_real_id_token_from_an_untrusted_issuer_is_rejected(oidc: OidcServer, keys: KeySet) -> None:
    """Signed by keys we fetched ourselves, but the verifier trusts only Google's issuers."""
    id_token = oidc.obtain_refresh_token()["id_token"]
    verifier = IdTokenVerifier(audience=RT_BASIC_ID, keys=keys)
    rejected(verifier, id_token, "^token iss is not a trusted issuer$")


def test_real_access_token_is_not_accepted_as_an_id_token(oidc: OidcServer, keys: KeySet) -> None:
    """Same issuer, same key, RS256 -- but ``typ: at+jwt`` (RFC 9068), so RFC 8725 §3.11."""
    access_token = oidc.obtain_refresh_token()["access_token"]
    rejected(
        verifier_for(oidc, keys, "urn:tokenbroker:api", require_email_verified=False),
        access_token,
        "^token typ is not JWT$",
    )


# --- tokens signed with the server's key, verified against its real /jwks -------------------------


def test_google_shaped_token_verifies_against_the_real_jwks(oidc: OidcServer, keys: KeySet) -> None:
    verifier = verifier_for(oidc, keys, AUDIENCE)
    token = server_signed(oidc)
    caller = verifier.verify_authorization(f"Bearer {token}")
    assert isinstance(caller, Caller)
    assert caller.email == CALLER.lower()
    assert caller.subject == "104857600000000000001"
    assert caller.issuer == oidc.issuer
    for i in range(30):
        verifier.verify(server_signed(oidc, google_shaped(oidc, sub=f"caller-{i}")))
    verifier.verify(token)
    assert keys.fetches == 1  # one GET of /jwks for all of them
    assert verifier.cache_hits == 1


def _attacker_jwks_server() -> tuple[http.server.ThreadingHTTPServer, list[str]]:
    evil = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    body = json.dumps({"keys": [rsa_public_jwk(evil, server_private_key()[1])]}).encode()
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.evil_key = evil  # type: ignore[attr-defined]
    return server, hits


@pytest.fixture
def attacker() -> Iterator[tuple[http.server.ThreadingHTTPServer, list[str]]]:
    server, hits = _attacker_jwks_server()
    yield server, hits
    server.shutdown()
    server.server_close()


def test_header_supplied_keys_are_never_fetched(
    oidc: OidcServer,
    keys: KeySet,
    attacker: tuple[http.server.ThreadingHTTPServer, list[str]],
) -> None:
    """RFC 8725 §3.10: a token naming its own key set (signed with that set's key) is refused
    and the named URL is never contacted."""
    server, hits = attacker
    evil_key: rsa.RSAPrivateKey = server.evil_key  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{server.server_address[1]}/jwks"
    verifier = verifier_for(oidc, keys, AUDIENCE)
    kid = server_private_key()[1]
    for name, value in (
        ("jku", url),
        ("x5u", url),
        ("jwk", rsa_public_jwk(evil_key, kid)),
    ):
        token = sign_rs256(google_shaped(oidc), evil_key, kid=kid, header={name: value})
        rejected(verifier, token, rf"^token header parameter '{name}' is not accepted$")
    # Without the header, the attacker's key is simply not the server's key.
    rejected(
        verifier,
        sign_rs256(google_shaped(oidc), evil_key, kid=kid),
        "^token signature does not verify$",
    )
    assert hits == []


def _with_alg(alg: str, oidc: OidcServer, sign: Callable[[bytes], bytes]) -> str:
    header = {"alg": alg, "typ": "JWT", "kid": server_private_key()[1]}
    signing_input = f"{b64json(header)}.{b64json(google_shaped(oidc))}"
    return f"{signing_input}.{b64url(sign(signing_input.encode()))}"


def _alg_none(oidc: OidcServer, _: KeySet) -> str:
    return f"{b64json({'alg': 'none', 'typ': 'JWT'})}.{b64json(google_shaped(oidc))}."


def _hs256_with_public_key(oidc: OidcServer, keys: KeySet) -> str:
    """HMAC keyed with the server's public key as its /jwks publishes it (as a PEM)."""
    # key_for answers joserfc keys; public_key is the cryptography object inside.
    pem = keys.key_for(server_private_key()[1]).public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return _with_alg("HS256", oidc, lambda data: hmac.new(pem, data, hashlib.sha256).digest())


def _rs512(oidc: OidcServer, _: KeySet) -> str:
    key = server_private_key()[0]
    return _with_alg(
        "RS512", oidc, lambda data: key.sign(data, padding.PKCS1v15(), hashes.SHA512())
    )


def _other_key_same_kid(oidc: OidcServer, _: KeySet) -> str:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return sign_rs256(google_shaped(oidc), other, kid=server_private_key()[1])


def _tampered_email(oidc: OidcServer, _: KeySet) -> str:
    header, _payload, signature = server_signed(oidc).split(".")
    tampered = google_shaped(oidc, email="admin@tokenbroker-test.iam.gserviceaccount.com")
    return f"{header}.{b64json(tampered)}.{signature}"


def _claims(**overrides: Any) -> Callable[[OidcServer, KeySet], str]:
    def build(oidc: OidcServer, _: KeySet) -> str:
        now = int(time.time())
        values = {k: (v(now) if callable(v) else v) for k, v in overrides.items()}
        claims = {k: v for k, v in google_shaped(oidc, **values).items() if v is not _DROP}
        return server_signed(oidc, claims)

    return build


_DROP = object()

Forgery = Callable[[OidcServer, KeySet], str]
FORGERIES: dict[str, tuple[Forgery, str]] = {
    "alg-none": (_alg_none, r"^token alg 'none' not allowed"),
    "hs256-public-key": (_hs256_with_public_key, r"^token alg 'HS256' not allowed"),
    "rs512": (_rs512, r"^token alg 'RS512' not allowed"),
    "other-key-same-kid": (_other_key_same_kid, r"^token signature does not verify$"),
    "tampered-email": (_tampered_email, r"^token signature does not verify$"),
    "unknown-kid": (
        lambda oidc, _: server_signed(oidc, kid="not-published"),
        r"^token signed with an unknown key \(kid\)$",
    ),
    "wrong-iss": (_claims(iss="https://accounts.google.com"), r"^token iss is not a trusted"),
    "wrong-aud": (_claims(aud=RT_BASIC_ID), r"^token aud does not match this service's audience$"),
    "expired": (
        _claims(iat=lambda now: now - 3700, exp=lambda now: now - 100),
        r"^token expired$",
    ),
    "iat-future": (
        _claims(iat=lambda now: now + 600, exp=lambda now: now + 3600),
        r"^token issued in the future \(iat\)$",
    ),
    "email-unverified": (_claims(email_verified=False), r"^token email is not verified$"),
    "no-email": (_claims(email=_DROP), r"^token has no email claim$"),
    "no-iat": (_claims(iat=_DROP), r"^token has no numeric iat claim$"),
    "crit": (
        lambda oidc, _: server_signed(oidc, header={"crit": ["exp"]}),
        r"^token header parameter 'crit' is not accepted$",
    ),
    "oversized": (_claims(padding="x" * 4096), r"^token larger than 4096 bytes$"),
    "two-segments": (
        lambda oidc, _: server_signed(oidc).rsplit(".", 1)[0],
        r"^malformed token: expected three dot-separated segments$",
    ),
}


@pytest.mark.parametrize("kind", sorted(FORGERIES))
def test_forged_tokens_are_rejected_end_to_end(oidc: OidcServer, keys: KeySet, kind: str) -> None:
    verifier = verifier_for(oidc, keys, AUDIENCE)
    verifier.verify(server_signed(oidc))  # the genuine article passes with the same set-up
    build, message = FORGERIES[kind]
    rejected(verifier, build(oidc, keys), message)
    # At most the one fetch plus one unknown-kid refetch of the real /jwks.
    assert keys.fetches == (2 if kind == "unknown-kid" else 1)
    assert keys.failures == 0


def test_unknown_kid_refetch_is_rate_limited(oidc: OidcServer, keys: KeySet) -> None:
    verifier = verifier_for(oidc, keys, AUDIENCE)
    verifier.verify(server_signed(oidc))
    for i in range(10):
        rejected(verifier, server_signed(oidc, kid=f"made-up-{i}"), r"unknown key \(kid\)$")
    assert keys.fetches == 2
