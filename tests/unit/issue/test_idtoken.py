"""Caller ID token verification (RFC 7515, RFC 7519 §7.2, RFC 8725; Google's ID token rules).

Keys are generated in-process and served through a fake ``fetch``; time is a FakeClock. The
same checks run end to end against oidc-provider in tests/system/test_idtoken_oidc.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http.server
import json
import threading
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.oidc import rsa_private_jwk, rsa_public_jwk, sign_rs256
from tokenbroker.issue.idtoken import (
    GOOGLE_ISSUERS,
    SIGNATURE_REMOVED,
    Caller,
    IdentityMode,
    IdTokenVerifier,
    JwksDocument,
    KeysDocumentError,
    KeySet,
    parse_jwks,
    parse_max_age,
    urllib_fetch,
)
from tokenbroker.kernel.clock import FakeClock
from tokenbroker.kernel.errors import ConfigError, CredentialUnavailable, InvalidCallerToken

AUDIENCE = "https://europe-west1-proj.cloudfunctions.net/tokenbroker-issuer"
ISSUER = "https://accounts.google.com"
CERTS_URL = "https://www.googleapis.com/oauth2/v3/certs"
CALLER = "Reporting-Job@proj.iam.gserviceaccount.com"

KEY_A = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KEY_B = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KEY_EVIL = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


class FakeKeysEndpoint:
    """Stands in for Google's certs URL: the JWK set it serves can change and it can fail."""

    def __init__(self, *keys: tuple[rsa.RSAPrivateKey, str], max_age: float | None = 3600) -> None:
        self.jwks: list[dict[str, Any]] = [rsa_public_jwk(k, kid) for k, kid in keys]
        self.max_age = max_age
        self.fail = False
        self.urls: list[str] = []

    def __call__(self, url: str) -> JwksDocument:
        self.urls.append(url)
        if self.fail:
            raise OSError("connection refused")
        return JwksDocument(json.dumps({"keys": self.jwks}).encode(), self.max_age)

    @property
    def calls(self) -> int:
        return len(self.urls)

    def publish(self, key: rsa.RSAPrivateKey, kid: str) -> None:
        self.jwks.append(rsa_public_jwk(key, kid))

    def withdraw(self, kid: str) -> None:
        self.jwks = [jwk for jwk in self.jwks if jwk["kid"] != kid]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2026, 3, 1, 9, 0, tzinfo=UTC))


@pytest.fixture
def endpoint() -> FakeKeysEndpoint:
    return FakeKeysEndpoint((KEY_A, "key-a"))


@pytest.fixture
def keys(endpoint: FakeKeysEndpoint, clock: FakeClock) -> KeySet:
    return KeySet(CERTS_URL, fetch=endpoint, clock=clock)


@pytest.fixture
def verifier(keys: KeySet, clock: FakeClock) -> IdTokenVerifier:
    return IdTokenVerifier(audience=AUDIENCE, keys=keys, clock=clock)


def claims_at(clock: FakeClock, **overrides: Any) -> dict[str, Any]:
    """Claims shaped like a Google service-account ID token (``format=full``)."""
    now = int(clock.now().timestamp())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "azp": "109876543210987654321",
        "sub": "109876543210987654321",
        "email": CALLER,
        "email_verified": True,
        "iat": now,
        "exp": now + 3600,
    }
    for name, value in overrides.items():
        if value is _DROP:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


_DROP = object()


def token_for(
    claims: Mapping[str, Any],
    key: rsa.RSAPrivateKey = KEY_A,
    kid: str | None = "key-a",
    header: Mapping[str, Any] | None = None,
) -> str:
    return sign_rs256(claims, key, kid=kid, header=header)


def unsigned(header: Mapping[str, Any], claims: Mapping[str, Any], signature: bytes = b"") -> str:
    return f"{b64json(header)}.{b64json(claims)}.{b64url(signature)}"


def signed_raw(header: Mapping[str, Any], claims: Mapping[str, Any]) -> str:
    """An RS256 signature by KEY_A over exactly this header (``sign_rs256`` always adds alg)."""
    signing_input = f"{b64json(header)}.{b64json(claims)}"
    signature = KEY_A.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


def reject(verifier: IdTokenVerifier, token: str, match: str) -> InvalidCallerToken:
    with pytest.raises(InvalidCallerToken, match=match) as info:
        verifier.verify(token)
    error = info.value
    assert error.code == "invalid_token" and error.http_status == 401
    assert not error.retryable
    # Never the token, nor any piece of it, in what could be logged or answered.
    for text in (str(error), repr(error), error.message):
        assert token not in text
        for segment in token.split("."):
            if len(segment) >= 8:
                assert segment not in text
    return error


# --- the happy path ------------------------------------------------------------------------------


def test_google_shaped_token_yields_the_caller(verifier: IdTokenVerifier, clock: FakeClock) -> None:
    caller = verifier.verify(token_for(claims_at(clock)))
    assert caller == Caller(
        email=CALLER.lower(),
        subject="109876543210987654321",
        issuer=ISSUER,
        expires_at=clock.now() + timedelta(hours=1),
    )


def test_both_google_issuer_spellings_are_accepted(
    verifier: IdTokenVerifier, clock: FakeClock
) -> None:
    assert set(GOOGLE_ISSUERS) == {"https://accounts.google.com", "accounts.google.com"}
    for issuer in GOOGLE_ISSUERS:
        assert verifier.verify(token_for(claims_at(clock, iss=issuer))).issuer == issuer


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_authorization_header_scheme_is_case_insensitive(
    verifier: IdTokenVerifier, clock: FakeClock, scheme: str
) -> None:
    token = token_for(claims_at(clock))
    assert verifier.verify_authorization(f"{scheme} {token}").email == CALLER.lower()


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Bearer   ", "Basic dXNlcjpwYXNz", "Token abc.def.ghi", "abc"]
)
def test_authorization_header_without_a_bearer_token(
    verifier: IdTokenVerifier, header: str | None
) -> None:
    with pytest.raises(InvalidCallerToken, match=r"^missing bearer token$"):
        verifier.verify_authorization(header)


def test_aud_list_containing_the_audience(verifier: IdTokenVerifier, clock: FakeClock) -> None:
    token = token_for(claims_at(clock, aud=["https://other.example", AUDIENCE]))
    assert verifier.verify(token).email == CALLER.lower()


def test_email_verified_as_the_string_true(verifier: IdTokenVerifier, clock: FakeClock) -> None:
    assert verifier.verify(token_for(claims_at(clock, email_verified="true"))).subject


def test_typ_jwt_or_absent_is_accepted(verifier: IdTokenVerifier, clock: FakeClock) -> None:
    for header in ({"typ": "JWT"}, {"typ": "jwt"}):
        assert verifier.verify(token_for(claims_at(clock), header=header)).email
    assert verifier.verify(signed_raw({"alg": "RS256", "kid": "key-a"}, claims_at(clock))).email


# --- algorithm and header attacks (RFC 8725 §2.1, §3.1, §3.10) -----------------------------------


def test_alg_none_unsigned_is_rejected(verifier: IdTokenVerifier, clock: FakeClock) -> None:
    token = unsigned({"alg": "none", "typ": "JWT"}, claims_at(clock))
    reject(verifier, token, r"^token alg 'none' not allowed: only RS256 is accepted$")
    assert verifier.keys.fetches == 0  # refused before any key was looked up


@pytest.mark.parametrize("alg", ["None", "NONE", "nOnE"])
def test_alg_none_in_other_cases_is_rejected(
    verifier: IdTokenVerifier, clock: FakeClock, alg: str
) -> None:
    token = unsigned({"alg": alg, "kid": "key-a"}, claims_at(clock), b"x" * 256)
    reject(verifier, token, r"^token alg not allowed: only RS256 is accepted$")


def test_hs256_signed_with_the_public_key_is_rejected(
    verifier: IdTokenVerifier, clock: FakeClock
) -> None:
    """The classic confusion: an HMAC keyed with the RSA public key a naive library would use."""
    pem = KEY_A.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for secret in (pem, pem.strip(), json.dumps(rsa_public_jwk(KEY_A, "key-a")).encode()):
        signing_input = f"{b64json({'alg': 'HS256', 'typ': 'JWT', 'kid': 'key-a'})}." + b64json(
            claims_at(clock)
        )
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        reject(verifier, f"{signing_input}.{b64url(mac)}", r"^token alg 'HS256' not allowed")


def test_rs512_is_rejected_even_with_the_right_key(
    verifier: IdTokenVerifier, clock: FakeClock
) -> None:
    header = b64json({"alg": "RS512", "typ": "JWT", "kid": "key-a"})
    signing_input = f"{header}.{b64json(claims_at(clock))}"
    signature = KEY_A.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA512())
    reject(verifier, f"{signing_input}.{b64url(signature)}", r"^token alg 'RS512' not allowed")


def test_es256_is_rejected(verifier: IdTokenVerifier, clock: FakeClock) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    header = b64json({"alg": "ES256", "typ": "JWT", "kid": "key-a"})
    signing_input = f"{header}.{b64json(claims_at(clock))}"
    signature = ec_key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    reject(verifier, f"{signing_input}.{b64url(signature)}", r"^token alg 'ES256' not allowed")


@pytest.mark.parametrize("alg", [None, "", "rs256", "RS256 ", ["RS256"], {"RS256": 1}, 256])
def test_missing_or_odd_alg_is_rejected(
    verifier: IdTokenVerifier, clock: FakeClock, alg: Any
) -> None:
    header: dict[str, Any] = {"typ": "JWT", "kid": "key-a"}
    if alg is not None:
        header["alg"] = alg
    reject(verifier, signed_raw(header, claims_at(clock)), r"^token alg not allowed")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("jku", "https://attacker.example/jwks.json"),
        ("x5u", "https://attacker.example/cert.pem"),
        ("jwk", {"kty": "RSA", "n": "AQAB", "e": "AQAB"}),
        ("x5c", ["MIIB..."]),
        ("crit", ["exp"]),
        ("b64", False),
        ("zip", "DEF"),
    ],
)
def test_key_carrying_and_critical_headers_are_refused(
    verifier: IdTokenVerifier,
    endpoint: FakeKeysEndpoint,
    clock: FakeClock,
    name: str,
    value: Any,
) -> None:
    # Signed with the genuine key: the header alone must get it refused.
    evil_jwk = rsa_public_jwk(KEY_EVIL, "key-a")
    value = evil_jwk if name == "jwk" else value
    token = token_for(claims_at(clock), header={name: value})
    reject(verifier, token, rf"^token header parameter '{name}' is not accepted$")
    assert endpoint.urls == []  # nothing fetched, least of all the token's URL


def test_access_token_typ_is_refused(verifier: IdTokenVerifier, clock: FakeClock) -> None:
    """RFC 8725 §3.11: an ``at+jwt`` access token from the same issuer is not an ID token."""
    reject(
        verifier, token_for(claims_at(clock), header={"typ": "at+jwt"}), "^token typ is not JWT$"
    )


@pytest.mark.parametrize("kid", [None, "", 7, "k" * 257])
def test_missing_or_unusable_kid(verifier: IdTokenVerifier, clock: FakeClock, kid: Any) -> None:
    header = {"alg": "RS256", "typ": "JWT"} | ({} if kid is None else {"kid": kid})
    token = unsigned(header, claims_at(clock), b"\x00" * 256)
    reject(verifier, token, "^token header has no usable kid$")


def test_signature_of_another_key_with_the_same_kid(
    verifier: IdTokenVerifier, clock: FakeClock
) -> None:
    token = token_for(claims_at(clock), key=KEY_EVIL, kid="key-a")
    reject(verifier, token, "^token signature does not verify$")


def test_payload_changed_after_signing(verifier: IdTokenVerifier, clock: FakeClock) -> None:
    header, _, signature = token_for(claims_at(clock)).split(".")
    forged = f"{header}.{b64json(claims_at(clock, email='admin@proj.iam.gserviceaccount.com'))}"
    reject(verifier, f"{forged}.{signature}", "^token signature does not verify$")


@pytest.mark.parametrize("signature", [b"", b"\x01", b"\x00" * 255, b"\x00" * 257])
def test_rs256_with_empty_or_wrong_length_signature(
    verifier: IdTokenVerifier, clock: FakeClock, signature: bytes
) -> None:
    header = {"alg": "RS256", "typ": "JWT", "kid": "key-a"}
    reject(verifier, unsigned(header, claims_at(clock), signature), "^token signature does not")


# --- shape and size ------------------------------------------------------------------------------


def test_oversized_token_is_refused_before_parsing(
    verifier: IdTokenVerifier, endpoint: FakeKeysEndpoint, clock: FakeClock
) -> None:
    big = token_for(claims_at(clock, padding="x" * 4000))
    assert len(big) > 4096
    reject(verifier, big, "^token larger than 4096 bytes$")
    reject(verifier, "!" * 5000, "^token larger than 4096 bytes$")  # not even looked at
    assert endpoint.calls == 0


def test_oversized_header_is_refused(verifier: IdTokenVerifier, clock: FakeClock) -> None:
    token = token_for(claims_at(clock), header={"pad": "x" * 1100})
    assert len(token) <= 4096
    reject(verifier, token, "^token header larger than 1024 bytes$")


def test_max_token_bytes_is_configurable(keys: KeySet, clock: FakeClock) -> None:
    strict = IdTokenVerifier(audience=AUDIENCE, keys=keys, clock=clock, max_token_bytes=512)
    token = token_for(claims_at(clock))
    assert 512 < len(token) <= 4096
    reject(strict, token, "^token larger than 512 bytes$")


@pytest.mark.parametrize("count", [1, 2, 4, 5])
def test_segment_count_must_be_three(
    verifier: IdTokenVerifier, clock: FakeClock, count: int
) -> None:
    parts = token_for(claims_at(clock)).split(".")
    parts = (parts * 2)[:count]
    reject(verifier, ".".join(parts), "^malformed token: expected three dot-separated segments$")


@pytest.mark.parametrize(
    "token",
    [
        "eyJh+GciOi.eyJzdWIi.c2ln",  # standard base64 alphabet
        "eyJhbGciOi=.eyJzdWIi.c2ln",  # padding
        "eyJhbGci Oi.eyJzdWIi.c2ln",  # whitespace
        ".eyJzdWIi.c2ln",  # empty header
        "eyJhbGciOi..c2ln",  # empty payload
        "eyJhbGciOi.eyJzdWIi.c2l\u00e9",  # not ASCII
        "\udcff.a.b",  # not even encodable
    ],
)
def test_segments_must_be_base64url(verifier: IdTokenVerifier, token: str) -> None:
    reject(verifier, token, "^malformed token: not base64url$")


@pytest.mark.parametrize(
    "header_segment",
    [
        "abcde",  # a base64 length that cannot be
        b64url(b"not json"),
        b64url(b"\xff\xfe{}"),  # not UTF-8
        b64json(["RS256"]),  # JSON, not an object
        b64url(b'{"alg":"RS256","alg":"RS256","kid":"key-a"}'),  # duplicate member
        b64url(b'{"alg":"RS256","kid":"key-a","x":NaN}'),
    ],
)
def test_header_must_be_a_json_object(
    verifier: IdTokenVerifier, clock: FakeClock, header_segment: str
) -> None:
    _, payload, signature = token_for(claims_at(clock)).split(".")
    reject(verifier, f"{header_segment}.{payload}.{signature}", "^malformed token header$")


def _sign_payload(payload: bytes) -> str:
    signing_input = f"{b64json({'alg': 'RS256', 'typ': 'JWT', 'kid': 'key-a'})}.{b64url(payload)}"
    signature = KEY_A.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


@pytest.mark.parametrize("payload", [b"[]", b"not json", b"\xff{}", b'{"exp":NaN}'])
def test_signed_payload_must_be_a_json_object(verifier: IdTokenVerifier, payload: bytes) -> None:
    reject(verifier, _sign_payload(payload), "^malformed token payload$")


def test_duplicate_claims_resolve_to_the_last(verifier: IdTokenVerifier, clock: FakeClock) -> None:
    """RFC 7519 §4: reject duplicates or use the lexically last one; we use the last."""
    claims = json.dumps(claims_at(clock), separators=(",", ":")).encode()
    payload = claims[:-1] + b',"email":"Second@proj.iam.gserviceaccount.com"}'
    assert verifier.verify(_sign_payload(payload)).email == "second@proj.iam.gserviceaccount.com"


def test_accepted_headers_are_remembered_rejected_ones_are_not(
    verifier: IdTokenVerifier, clock: FakeClock
) -> None:
    for i in range(5):
        verifier.verify(token_for(claims_at(clock, sub=f"s{i}")))
    assert len(verifier._headers) == 1
    forged = token_for(claims_at(clock, sub="forged"), key=KEY_EVIL)  # same header bytes
    reject(verifier, forged, "^token signature does not verify$")
    none = unsigned({"alg": "none", "kid": "key-a"}, claims_at(clock))
    for _ in range(2):
        reject(verifier, none, "^token alg 'none' not allowed")
    assert len(verifier._headers) == 1


# --- claims (RFC 7519 §4.1, Google's rules) ------------------------------------------------------


@pytest.mark.parametrize(
    "iss",
    ["https://evil.example", "https://accounts.google.com/", "HTTPS://ACCOUNTS.GOOGLE.COM"],
)
def test_wrong_issuer(verifier: IdTokenVerifier, clock: FakeClock, iss: str) -> None:
    reject(verifier, token_for(claims_at(clock, iss=iss)), "^token iss is not a trusted issuer$")


@pytest.mark.parametrize(
    "aud", [AUDIENCE + "/", "https://other.example", ["https://other.example"], "32555940559.apps"]
)
def test_wrong_audience(verifier: IdTokenVerifier, clock: FakeClock, aud: Any) -> None:
    token = token_for(claims_at(clock, aud=aud))
    reject(verifier, token, "^token aud does not match this service's audience$")


@pytest.mark.parametrize("aud", [7, {"aud": AUDIENCE}, [AUDIENCE, 7]])
def test_malformed_audience(verifier: IdTokenVerifier, clock: FakeClock, aud: Any) -> None:
    reject(verifier, token_for(claims_at(clock, aud=aud)), "^token aud claim is malformed$")


@pytest.mark.parametrize(
    ("claim", "message"),
    [
        ("iss", "^token has no iss claim$"),
        ("aud", "^token has no aud claim$"),
        ("exp", "^token has no numeric exp claim$"),
        ("iat", "^token has no numeric iat claim$"),
        ("sub", "^token has no sub claim$"),
        ("email", "^token has no email claim$"),
        ("email_verified", "^token email is not verified$"),
    ],
)
def test_missing_claims(
    verifier: IdTokenVerifier, clock: FakeClock, claim: str, message: str
) -> None:
    reject(verifier, token_for(claims_at(clock, **{claim: _DROP})), message)


@pytest.mark.parametrize(
    ("claim", "value", "message"),
    [
        ("sub", "", "^token has no sub claim$"),
        ("sub", 12345, "^token has no sub claim$"),
        ("email", "", "^token has no email claim$"),
        ("email", "not-an-address", "^token has no email claim$"),
        ("email", ["a@b.c"], "^token has no email claim$"),
        ("aud", "", "^token has no aud claim$"),
        ("aud", [], "^token has no aud claim$"),
        ("iss", 1, "^token has no iss claim$"),
    ],
)
def test_empty_or_mistyped_identity_claims(
    verifier: IdTokenVerifier, clock: FakeClock, claim: str, value: Any, message: str
) -> None:
    reject(verifier, token_for(claims_at(clock, **{claim: value})), message)


@pytest.mark.parametrize("value", [False, "false", "True", 1, None])
def test_email_verified_must_be_true(
    verifier: IdTokenVerifier, clock: FakeClock, value: Any
) -> None:
    reject(verifier, token_for(claims_at(clock, email_verified=value)), "^token email is not ver")


def test_email_verified_check_can_be_switched_off(keys: KeySet, clock: FakeClock) -> None:
    lax = IdTokenVerifier(audience=AUDIENCE, keys=keys, clock=clock, require_email_verified=False)
    assert lax.verify(token_for(claims_at(clock, email_verified=False))).email
    reject(lax, token_for(claims_at(clock, email=_DROP)), "^token has no email claim$")


def test_expired_beyond_leeway(verifier: IdTokenVerifier, clock: FakeClock) -> None:
    token = token_for(claims_at(clock))
    clock.advance(3600 + 60)  # exp + leeway: RFC 7519 §4.1.4 "on or after" is expired
    reject(verifier, token, "^token expired$")


def test_expired_within_leeway_is_accepted(verifier: IdTokenVerifier, clock: FakeClock) -> None:
    token = token_for(claims_at(clock))
    clock.advance(3600 + 59)
    assert verifier.verify(token).email == CALLER.lower()


def test_iat_in_the_future(verifier: IdTokenVerifier, clock: FakeClock) -> None:
    now = int(clock.now().timestamp())
    token = token_for(claims_at(clock, iat=now + 61, exp=now + 3600))
    reject(verifier, token, r"^token issued in the future \(iat\)$")
    ok = token_for(claims_at(clock, iat=now + 60, exp=now + 3600))
    assert verifier.verify(ok).email


def test_nbf_is_honoured_when_present(verifier: IdTokenVerifier, clock: FakeClock) -> None:
    now = int(clock.now().timestamp())
    reject(verifier, token_for(claims_at(clock, nbf=now + 120)), r"^token not valid yet \(nbf\)$")
    reject(verifier, token_for(claims_at(clock, nbf="soon")), "^token nbf claim is not a number$")
    assert verifier.verify(token_for(claims_at(clock, nbf=now))).email


def test_implausibly_long_lifetime(verifier: IdTokenVerifier, clock: FakeClock) -> None:
    now = int(clock.now().timestamp())
    token = token_for(claims_at(clock, exp=now + 2 * 3600 + 1))
    reject(verifier, token, r"^token lifetime exceeds 7200 seconds \(exp - iat\)$")


@pytest.mark.parametrize("exp", ["1893456000", True, None, [1893456000]])
def test_exp_must_be_a_number(verifier: IdTokenVerifier, clock: FakeClock, exp: Any) -> None:
    reject(verifier, token_for(claims_at(clock, exp=exp)), "^token has no numeric exp claim$")


@pytest.mark.parametrize("literal", [b"Infinity", b"NaN", b"1e400"])
def test_exp_must_be_finite(verifier: IdTokenVerifier, clock: FakeClock, literal: bytes) -> None:
    """Python's json accepts ``Infinity`` and turns ``1e400`` into inf: neither may pass."""
    claims = claims_at(clock, exp=0)
    payload = (
        json.dumps(claims, separators=(",", ":")).encode().replace(b'"exp":0', b'"exp":' + literal)
    )
    token = _sign_payload(payload)
    expected = "^malformed token payload$" if literal != b"1e400" else "^token has no numeric exp"
    reject(verifier, token, expected)


# --- the key set: fetching, rotation, failures ---------------------------------------------------


def test_keys_are_fetched_once_and_reused(
    verifier: IdTokenVerifier, endpoint: FakeKeysEndpoint, clock: FakeClock
) -> None:
    for i in range(50):
        verifier.verify(token_for(claims_at(clock, sub=f"caller-{i}")))
    assert endpoint.urls == [CERTS_URL]


def test_unknown_kid_refetches_once_then_rejects(
    verifier: IdTokenVerifier, endpoint: FakeKeysEndpoint, clock: FakeClock
) -> None:
    verifier.verify(token_for(claims_at(clock)))
    assert endpoint.calls == 1
    reject(verifier, token_for(claims_at(clock), kid="no-such-key"), r"^token signed with an unk")
    assert endpoint.calls == 2  # one refetch, in case the issuer rotated keys since
    reject(verifier, token_for(claims_at(clock), kid="no-such-key"), r"unknown key \(kid\)$")
    reject(verifier, token_for(claims_at(clock), kid="another-one"), r"unknown key \(kid\)$")
    assert endpoint.calls == 2  # a second unknown kid within the interval does not refetch
    clock.advance(300)
    reject(verifier, token_for(claims_at(clock), kid="another-one"), r"unknown key \(kid\)$")
    assert endpoint.calls == 3  # the interval passed: one more refetch is allowed


def test_rotation_new_key_is_picked_up_by_refetch(
    verifier: IdTokenVerifier, endpoint: FakeKeysEndpoint, clock: FakeClock
) -> None:
    verifier.verify(token_for(claims_at(clock)))
    endpoint.publish(KEY_B, "key-b")
    caller = verifier.verify(token_for(claims_at(clock), key=KEY_B, kid="key-b"))
    assert caller.email == CALLER.lower()
    assert endpoint.calls == 2
    assert verifier.keys.kids == {"key-a", "key-b"}
    verifier.verify(token_for(claims_at(clock, sub="again")))  # the old key still works
    assert endpoint.calls == 2


def test_keys_are_refreshed_after_cache_control_max_age(
    endpoint: FakeKeysEndpoint, clock: FakeClock
) -> None:
    endpoint.max_age = 600
    keys = KeySet(CERTS_URL, fetch=endpoint, clock=clock)
    verifier = IdTokenVerifier(audience=AUDIENCE, keys=keys, clock=clock, cache_size=0)
    verifier.verify(token_for(claims_at(clock)))
    clock.advance(599)
    verifier.verify(token_for(claims_at(clock)))
    assert endpoint.calls == 1
    clock.advance(1)
    verifier.verify(token_for(claims_at(clock)))
    assert endpoint.calls == 2


def test_default_max_age_without_cache_control(clock: FakeClock) -> None:
    endpoint = FakeKeysEndpoint((KEY_A, "key-a"), max_age=None)
    keys = KeySet(CERTS_URL, fetch=endpoint, clock=clock)
    keys.key_for("key-a")
    clock.advance(3599)
    keys.key_for("key-a")
    assert endpoint.calls == 1
    clock.advance(1)
    keys.key_for("key-a")
    assert endpoint.calls == 2


def test_failed_fetch_keeps_serving_the_old_keys(
    verifier: IdTokenVerifier, endpoint: FakeKeysEndpoint, clock: FakeClock
) -> None:
    verifier.verify(token_for(claims_at(clock)))
    clock.advance(3600)  # stale
    endpoint.fail = True
    assert verifier.verify(token_for(claims_at(clock))).email == CALLER.lower()
    assert (verifier.keys.fetches, verifier.keys.failures) == (2, 1)
    for _ in range(20):  # backing off: no fetch per request while the keys URL is down
        verifier.verify(token_for(claims_at(clock, sub="more")))
    assert endpoint.calls == 2
    clock.advance(10)
    endpoint.fail = False
    verifier.verify(token_for(claims_at(clock, sub="later")))
    assert (endpoint.calls, verifier.keys.failures) == (3, 1)


def test_failed_refetch_for_unknown_kid_keeps_the_old_keys(
    verifier: IdTokenVerifier, endpoint: FakeKeysEndpoint, clock: FakeClock
) -> None:
    verifier.verify(token_for(claims_at(clock)))
    endpoint.fail = True
    reject(verifier, token_for(claims_at(clock), kid="key-b"), r"unknown key \(kid\)$")
    assert verifier.keys.kids == {"key-a"}
    assert verifier.verify(token_for(claims_at(clock, sub="other"))).email


def test_no_keys_at_all_is_unavailable_not_invalid(
    verifier: IdTokenVerifier, endpoint: FakeKeysEndpoint, clock: FakeClock
) -> None:
    endpoint.fail = True
    token = token_for(claims_at(clock))
    with pytest.raises(CredentialUnavailable) as info:
        verifier.verify(token)
    assert info.value.retryable and info.value.http_status == 503
    assert info.value.retry_after is not None and info.value.retry_after >= 1
    assert token not in str(info.value)
    with pytest.raises(CredentialUnavailable):  # within the backoff: no new fetch
        verifier.verify(token)
    assert endpoint.calls == 1
    clock.advance(10)
    endpoint.fail = False
    assert verifier.verify(token).email == CALLER.lower()
    assert endpoint.calls == 2


@pytest.mark.parametrize(
    "body",
    [
        b"<html>maintenance</html>",
        b'{"keys": "nope"}',
        b'{"keys": []}',
        json.dumps({"keys": [rsa_public_jwk(KEY_A, "key-a") | {"use": "enc"}]}).encode(),
    ],
)
def test_unusable_keys_document_counts_as_a_failed_fetch(clock: FakeClock, body: bytes) -> None:
    keys = KeySet(CERTS_URL, fetch=lambda _: JwksDocument(body), clock=clock)
    with pytest.raises(CredentialUnavailable):
        keys.key_for("key-a")
    assert keys.failures == 1


def test_jwks_parsing_keeps_only_rs256_signing_keys() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - refused
    jwk_a = rsa_public_jwk(KEY_A, "a")
    entries: list[Any] = [
        jwk_a,
        {
            k: v
            for k, v in rsa_public_jwk(KEY_B, "no-use-no-alg").items()
            if k not in ("use", "alg")
        },
        rsa_public_jwk(KEY_B, "enc") | {"use": "enc"},
        rsa_public_jwk(KEY_B, "rs512") | {"alg": "RS512"},
        rsa_public_jwk(KEY_B, "ops") | {"key_ops": ["encrypt"]},
        rsa_public_jwk(KEY_B, "ops-ok") | {"key_ops": ["verify"]},
        rsa_public_jwk(small, "small"),
        {"kty": "EC", "kid": "ec", "crv": "P-256", "x": "AA", "y": "AA"},
        {"kty": "RSA", "kid": "broken", "n": "!!!", "e": "AQAB"},
        {k: v for k, v in rsa_public_jwk(KEY_B, "x").items() if k != "kid"},
        rsa_public_jwk(KEY_EVIL, "a"),  # duplicate kid: the first wins
        "not a key",
    ]
    keys = parse_jwks(json.dumps({"keys": entries}).encode())
    assert set(keys) == {"a", "no-use-no-alg", "ops-ok"}
    # parse_jwks now returns joserfc keys; the cryptography key is their public_key.
    assert keys["a"].public_key.public_numbers() == KEY_A.public_key().public_numbers()
    with pytest.raises(KeysDocumentError):
        parse_jwks(json.dumps({"keys": [rsa_public_jwk(small, "small")]}).encode())


def test_jwks_parsing_reuses_unchanged_key_objects() -> None:
    body = json.dumps({"keys": [rsa_public_jwk(KEY_A, "a"), rsa_public_jwk(KEY_B, "b")]}).encode()
    first = parse_jwks(body)
    replaced = json.dumps({"keys": [rsa_public_jwk(KEY_A, "a"), rsa_public_jwk(KEY_EVIL, "b")]})
    second = parse_jwks(replaced.encode(), previous=first)
    assert second["a"] is first["a"]
    assert second["b"] is not first["b"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("public, max-age=19967, must-revalidate, no-transform", 19967.0),
        ("max-age=60", 60.0),
        ('MAX-AGE="300"', 300.0),
        ("public, s-maxage=100", None),
        ("no-store", 0.0),
        ("no-cache, max-age=300", 0.0),
        ("", None),
        (None, None),
    ],
)
def test_parse_max_age(value: str | None, expected: float | None) -> None:
    assert parse_max_age(value) == expected


def test_max_age_is_clamped(clock: FakeClock) -> None:
    endpoint = FakeKeysEndpoint((KEY_A, "key-a"), max_age=0)
    keys = KeySet(CERTS_URL, fetch=endpoint, clock=clock)
    keys.key_for("key-a")
    clock.advance(59)
    keys.key_for("key-a")
    assert endpoint.calls == 1  # max-age 0 would refetch per request; held for a minute


@pytest.mark.parametrize(
    "url",
    ["http://www.googleapis.com/oauth2/v3/certs", "file:///etc/passwd", "ftp://x/y", "certs", ""],
)
def test_keys_url_must_be_https(url: str) -> None:
    with pytest.raises(ConfigError, match="https"):
        KeySet(url)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9000/jwks", "http://localhost:9000/jwks", "http://[::1]:9/jwks"]
)
def test_plain_http_keys_url_only_on_loopback(url: str) -> None:
    assert KeySet(url).url == url


def test_concurrent_verifications_share_one_fetch(
    endpoint: FakeKeysEndpoint, clock: FakeClock
) -> None:
    keys = KeySet(CERTS_URL, fetch=endpoint, clock=clock)
    verifier = IdTokenVerifier(audience=AUDIENCE, keys=keys, clock=clock, cache_size=64)
    tokens = [token_for(claims_at(clock, sub=f"s{i}")) for i in range(40)]
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for token in tokens * 5:
                verifier.verify(token)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert endpoint.calls == 1
    assert len(verifier._cache) <= 64


# --- the verified-token cache -------------------------------------------------------------------


def test_repeated_token_is_served_from_the_cache(
    verifier: IdTokenVerifier, clock: FakeClock
) -> None:
    token = token_for(claims_at(clock))
    first = verifier.verify(token)
    assert verifier.cache_hits == 0
    assert verifier.verify(token) == first
    assert verifier.verify_authorization(f"Bearer {token}") == first
    assert verifier.cache_hits == 2


def test_cache_does_not_outlive_exp(verifier: IdTokenVerifier, clock: FakeClock) -> None:
    token = token_for(claims_at(clock))
    verifier.verify(token)
    clock.advance(3600 + 59)
    assert verifier.verify(token).email  # still within leeway: a hit
    assert verifier.cache_hits == 1
    clock.advance(1)
    reject(verifier, token, "^token expired$")
    reject(verifier, token, "^token expired$")  # and again, now on the uncached path
    assert verifier.cache_hits == 1


def test_cache_entry_dies_with_its_key(
    verifier: IdTokenVerifier, endpoint: FakeKeysEndpoint, clock: FakeClock
) -> None:
    token = token_for(claims_at(clock))
    verifier.verify(token)
    endpoint.withdraw("key-a")
    endpoint.publish(KEY_B, "key-b")
    clock.advance(3600)
    verifier.keys.key_for("key-b")  # the hourly refresh drops key-a
    reject(verifier, token, r"unknown key \(kid\)$")


def test_cache_is_bounded(keys: KeySet, clock: FakeClock) -> None:
    verifier = IdTokenVerifier(audience=AUDIENCE, keys=keys, clock=clock, cache_size=2)
    tokens = [token_for(claims_at(clock, sub=f"s{i}")) for i in range(3)]
    for token in tokens:
        verifier.verify(token)
    assert len(verifier._cache) == 2
    verifier.verify(tokens[0])  # evicted, verified again
    assert verifier.cache_hits == 0
    verifier.verify(tokens[2])
    assert verifier.cache_hits == 1


def test_cache_keys_are_digests_not_tokens(verifier: IdTokenVerifier, clock: FakeClock) -> None:
    token = token_for(claims_at(clock))
    verifier.verify(token)
    assert list(verifier._cache) == [hashlib.sha256(token.encode()).digest()]


def test_a_cached_signature_does_not_vouch_for_another_payload(
    verifier: IdTokenVerifier, clock: FakeClock
) -> None:
    header, _, signature = token_for(claims_at(clock)).split(".")
    verifier.verify(f"{header}.{b64json(claims_at(clock))}.{signature}")
    forged = f"{header}.{b64json(claims_at(clock, email='root@proj.iam.gserviceaccount.com'))}"
    reject(verifier, f"{forged}.{signature}", "^token signature does not verify$")


def test_rejections_are_not_cached(verifier: IdTokenVerifier, clock: FakeClock) -> None:
    token = token_for(claims_at(clock, aud="https://other.example"))
    for _ in range(2):
        reject(verifier, token, "^token aud does not match")
    assert len(verifier._cache) == 0


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"audience": ""},
        {"audience": "   "},
        {"audience": AUDIENCE, "issuers": ()},
        {"audience": AUDIENCE, "issuers": ("",)},
        {"audience": AUDIENCE, "leeway": -1},
        {"audience": AUDIENCE, "leeway": 3600},
        {"audience": AUDIENCE, "max_token_bytes": 10},
        {"audience": AUDIENCE, "cache_size": -1},
    ],
)
def test_bad_configuration(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        IdTokenVerifier(**kwargs)


def test_a_single_issuer_string_is_one_issuer(keys: KeySet, clock: FakeClock) -> None:
    verifier = IdTokenVerifier(audience=AUDIENCE, issuers=ISSUER, keys=keys, clock=clock)
    assert verifier.issuers == {ISSUER}


def test_default_key_set_is_googles(clock: FakeClock) -> None:
    verifier = IdTokenVerifier(audience=AUDIENCE, clock=clock)
    assert verifier.keys.url == "https://www.googleapis.com/oauth2/v3/certs"
    assert verifier.issuers == {"https://accounts.google.com", "accounts.google.com"}


# --- urllib_fetch against a local HTTP server ----------------------------------------------------


class _KeysHandler(http.server.BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[int, dict[str, str], bytes]]] = {}

    def do_GET(self) -> None:
        status, headers, body = self.routes.get(self.path, (404, {}, b"{}"))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        return


@pytest.fixture
def keys_server() -> Iterator[str]:
    jwks = json.dumps({"keys": [rsa_public_jwk(KEY_A, "key-a")]}).encode()
    _KeysHandler.routes = {
        "/certs": (200, {"Cache-Control": "public, max-age=19967"}, jwks),
        "/big": (200, {}, b"{" + b" " * 300_000 + b"}"),
        "/moved": (302, {"Location": "/certs"}, b""),
        "/down": (503, {}, b"{}"),
    }
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _KeysHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_urllib_fetch_reads_body_and_max_age(keys_server: str) -> None:
    document = urllib_fetch(f"{keys_server}/certs")
    assert document.max_age == 19967
    assert set(parse_jwks(document.body)) == {"key-a"}


def test_urllib_fetch_refuses_big_bodies_redirects_and_errors(keys_server: str) -> None:
    with pytest.raises(KeysDocumentError, match="larger than"):
        urllib_fetch(f"{keys_server}/big")
    with pytest.raises(OSError, match="302"):
        urllib_fetch(f"{keys_server}/moved")
    with pytest.raises(OSError, match="503"):
        urllib_fetch(f"{keys_server}/down")


def test_key_set_over_real_http(keys_server: str, clock: FakeClock) -> None:
    keys = KeySet(f"{keys_server}/certs", clock=clock)
    verifier = IdTokenVerifier(audience=AUDIENCE, keys=keys, clock=clock)
    assert verifier.verify(token_for(claims_at(clock))).email == CALLER.lower()
    down = KeySet(f"{keys_server}/down", clock=clock)
    with pytest.raises(CredentialUnavailable):
        down.key_for("key-a")


@pytest.mark.parametrize("segment", ["header", "payload"])
def test_a_deeply_nested_token_segment_is_a_401_not_a_recursion_error(
    verifier: IdTokenVerifier, segment: str
) -> None:
    """Issue 9: an unauthenticated request whose JWT header nested arrays a few hundred deep
    raised RecursionError -- a 500 with a 3 KB traceback in the log."""
    deep = b64url(b"[" * 500 + b"]" * 500)  # 1,000 bytes: within the header bound
    normal = b64url(b'{"alg":"RS256","kid":"key-a","typ":"JWT"}')
    token = f"{deep}.{normal}.c2ln" if segment == "header" else f"{normal}.{deep}.c2ln"

    def nested(depth: int) -> None:  # call from deep in a stack, as a server's handler is
        if depth:
            nested(depth - 1)
            return
        with pytest.raises(InvalidCallerToken):
            verifier.verify_authorization(f"Bearer {token}")

    nested(700)


# --- where joserfc parses and verifies: what it does differently, and what we still decide --------
#
# joserfc reads the JWK set and the compact JWS and checks the RS256 signature; our pre-checks,
# header rules and claim checks run around it. These pin the places where joserfc alone would
# answer differently, and that every joserfc error still comes out as a fixed-message 401.

_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def noncanonical(segment: str) -> str:
    """The same bytes under a lenient decoder, but the unused low bits of the last character set:
    RFC 4648 §3.5 canonical encodings leave them zero (joserfc's decoder insists)."""
    assert len(segment) % 4 in (2, 3)
    return segment[:-1] + _B64URL[_B64URL.index(segment[-1]) + 1]


def misaligned(value: dict[str, Any], pad: str) -> dict[str, Any]:
    """``value`` with a filler member making its base64url length not a multiple of four."""
    for n in range(4):
        candidate = value | {pad: "x" * n}
        if len(b64json(candidate)) % 4:
            return candidate
    raise AssertionError("unreachable")


def sign_input(signing_input: str, key: rsa.RSAPrivateKey = KEY_A) -> str:
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


HEADER_A = {"alg": "RS256", "typ": "JWT", "kid": "key-a"}


def platform_verifier(keys: KeySet, clock: FakeClock) -> IdTokenVerifier:
    return IdTokenVerifier(audience=AUDIENCE, mode=IdentityMode.PLATFORM, keys=keys, clock=clock)


def test_a_non_canonical_signature_encoding_is_refused(
    verifier: IdTokenVerifier, clock: FakeClock
) -> None:
    """The hand-written decoder took ``...x`` and ``...y`` as the same signature bytes, so one
    token had several spellings; joserfc's strict base64url refuses all but the canonical."""
    token = token_for(claims_at(clock))
    signing_input, _, signature = token.rpartition(".")
    reject(verifier, f"{signing_input}.{noncanonical(signature)}", "^token signature does not ")
    assert verifier.verify(token).email == CALLER.lower()


def test_a_non_canonical_payload_encoding_is_refused_even_when_signed(
    verifier: IdTokenVerifier, clock: FakeClock
) -> None:
    payload = noncanonical(b64json(misaligned(claims_at(clock), "pad")))
    token = sign_input(f"{b64json(HEADER_A)}.{payload}")  # the signature covers these bytes
    reject(verifier, token, "^malformed token payload$")


def test_a_non_canonical_header_encoding_is_refused_even_when_signed(
    verifier: IdTokenVerifier, clock: FakeClock
) -> None:
    header = noncanonical(b64json(misaligned(HEADER_A, "x-pad")))
    reject(
        verifier, sign_input(f"{header}.{b64json(claims_at(clock))}"), "^malformed token header$"
    )


def test_segments_of_an_impossible_base64_length(
    verifier: IdTokenVerifier, clock: FakeClock
) -> None:
    """A length of 4k+1 cannot come from any bytes: header, payload and signature alike."""
    header, payload = b64json(HEADER_A), b64json(claims_at(clock))
    reject(verifier, sign_input(f"{header}.abcde"), "^malformed token payload$")
    reject(verifier, f"{header}.{payload}.c2lnX", "^token signature does not verify$")
    reject(verifier, f"abcdefghi.{payload}.c2ln", "^malformed token header$")


@pytest.mark.parametrize(
    "header",
    [
        b'{"alg":"none","alg":"RS256","kid":"key-a"}',  # joserfc alone would take the last
        b'{"alg":"RS256","kid":"key-b","kid":"key-a"}',
        '{"alg":"RS256","kid":"key-a"}'.encode("utf-16"),  # json.loads(bytes) would decode it
        b'\xef\xbb\xbf{"alg":"RS256","kid":"key-a"}',  # a UTF-8 BOM, likewise
        b'{"alg":"RS256","kid":"key-a","x":Infinity}',
    ],
)
def test_headers_joserfc_would_read_are_refused_before_it_sees_them(
    verifier: IdTokenVerifier, clock: FakeClock, header: bytes
) -> None:
    token = sign_input(f"{b64url(header)}.{b64json(claims_at(clock))}")
    reject(verifier, token, "^malformed token header$")


def test_unknown_header_members_are_ignored_as_rfc_7515_says(
    verifier: IdTokenVerifier, clock: FakeClock
) -> None:
    """RFC 7515 §4: parameters not understood are ignored unless listed in ``crit``. joserfc's
    default registry refuses them; ours is built not to."""
    for extra in ({"x-extra": 1}, {"foo": {"bar": []}}, {"cty": "JWT", "x5t": "abc"}):
        assert verifier.verify(token_for(claims_at(clock), header=extra)).email == CALLER.lower()


@pytest.mark.parametrize(
    "extra", [{"cty": 5}, {"x5t": 7}, {"x5t#S256": ["a"]}, {"cty": None}, {"x5t": {"a": 1}}]
)
def test_registered_header_members_of_the_wrong_type_are_refused(
    verifier: IdTokenVerifier, clock: FakeClock, extra: dict[str, Any]
) -> None:
    """joserfc's header registry checks the types of registered parameters (RFC 7515 §4.1)."""
    reject(verifier, token_for(claims_at(clock), header=extra), "^malformed token header$")


def test_an_rfc_7797_unencoded_payload_is_refused_by_name(
    verifier: IdTokenVerifier, clock: FakeClock
) -> None:
    """``b64: false`` listed in ``crit`` is a valid RFC 7797 JWS joserfc would verify over the
    raw payload; we implement no extension and say which parameter stopped it."""
    header = b64json(HEADER_A | {"b64": False, "crit": ["b64"]})
    raw_payload = json.dumps(claims_at(clock), separators=(",", ":"))
    signed = sign_input(f"{header}.{raw_payload}")
    token = f"{header}.{b64url(raw_payload.encode())}.{signed.rpartition('.')[2]}"
    reject(verifier, token, "^token header parameter 'crit' is not accepted$")


def test_platform_mode_parses_the_unsigned_token_as_strictly(
    keys: KeySet, clock: FakeClock, endpoint: FakeKeysEndpoint
) -> None:
    platform = platform_verifier(keys, clock)
    header, payload = b64json(HEADER_A), b64json(misaligned(claims_at(clock), "pad"))
    duplicate = b64url(b'{"alg":"RS256","alg":"RS256","kid":"k"}')
    assert platform.verify(f"{header}.{payload}.{SIGNATURE_REMOVED}").email == CALLER.lower()
    for token, match in [
        (f"{header}.{noncanonical(payload)}.{SIGNATURE_REMOVED}", "^malformed token payload$"),
        (f"{header}.abcde.{SIGNATURE_REMOVED}", "^malformed token payload$"),
        (f"{b64url(b'{}')}.{payload}.{SIGNATURE_REMOVED}", "^token alg not allowed"),
        (f"{duplicate}.{payload}.{SIGNATURE_REMOVED}", "^malformed token header$"),
    ]:
        reject(platform, token, match)
    assert endpoint.calls == 0  # platform mode never needs the keys


# --- the JWK set, read by joserfc -----------------------------------------------------------------


def ec_public_jwk(kid: str) -> dict[str, Any]:
    numbers = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
    return {
        "kty": "EC",
        "kid": kid,
        "use": "sig",
        "alg": "ES256",
        "crv": "P-256",
        "x": b64url(numbers.x.to_bytes(32, "big")),
        "y": b64url(numbers.y.to_bytes(32, "big")),
    }


def test_a_key_set_with_ec_and_symmetric_keys_beside_the_rsa_one(clock: FakeClock) -> None:
    """joserfc's ``KeySet.import_key_set`` would take every key type; we keep RSA signing keys
    and skip the rest one by one, and a token naming an EC kid is an unknown kid."""
    document = {
        "keys": [
            ec_public_jwk("ec-1"),
            {"kty": "oct", "kid": "oct-1", "k": b64url(b"s" * 32)},
            {"kty": "OKP", "kid": "okp-1", "crv": "Ed25519", "x": b64url(b"\x00" * 32)},
            rsa_public_jwk(KEY_A, "key-a"),
        ]
    }
    assert set(parse_jwks(json.dumps(document).encode())) == {"key-a"}
    keys = KeySet(
        CERTS_URL, fetch=lambda _: JwksDocument(json.dumps(document).encode()), clock=clock
    )
    verifier = IdTokenVerifier(audience=AUDIENCE, keys=keys, clock=clock)
    assert verifier.verify(token_for(claims_at(clock))).email == CALLER.lower()
    reject(verifier, token_for(claims_at(clock), kid="ec-1"), r"^token signed with an unknown key")
    reject(verifier, token_for(claims_at(clock), kid="oct-1"), r"^token signed with an unknown key")


@pytest.mark.parametrize(
    "restriction",
    [{"alg": "RS512"}, {"use": "enc"}, {"key_ops": ["encrypt"]}, {"alg": "PS256"}, {"use": "SIG"}],
)
def test_a_token_naming_a_key_not_meant_for_rs256_signatures(
    clock: FakeClock, restriction: dict[str, Any]
) -> None:
    """The genuine key, signing genuinely, but published for another use: not a verification
    key for us, so its kid is unknown (and joserfc would refuse it at verification too)."""
    endpoint = FakeKeysEndpoint((KEY_A, "key-a"))
    endpoint.jwks.append(rsa_public_jwk(KEY_B, "key-b") | restriction)
    keys = KeySet(CERTS_URL, fetch=endpoint, clock=clock)
    verifier = IdTokenVerifier(audience=AUDIENCE, keys=keys, clock=clock)
    reject(verifier, token_for(claims_at(clock), KEY_B, "key-b"), "^token signed with an unknown")
    assert keys.kids == {"key-a"}


def test_joserfc_parameter_rules_apply_on_top_of_ours() -> None:
    """``key_ops`` must agree with ``use`` and name registered operations (RFC 7517 §4.3);
    the hand-written parser kept such keys as long as ``verify`` was listed."""
    entries = [
        rsa_public_jwk(KEY_A, "ok") | {"key_ops": ["verify"]},
        rsa_public_jwk(KEY_B, "mixed") | {"key_ops": ["verify", "encrypt"]},
        rsa_public_jwk(KEY_B, "odd-op") | {"key_ops": ["verify", "frobnicate"]},
        rsa_public_jwk(KEY_B, "e-number") | {"e": 65537},
    ]
    assert set(parse_jwks(json.dumps({"keys": entries}).encode())) == {"ok"}


def test_a_published_private_key_is_read_as_its_public_half() -> None:
    keys = parse_jwks(json.dumps({"keys": [rsa_private_jwk(KEY_A, "leaked")]}).encode())
    assert not keys["leaked"].is_private
    assert keys["leaked"].public_key.public_numbers() == KEY_A.public_key().public_numbers()


def test_a_1024_bit_key_is_skipped_and_its_tokens_refused(clock: FakeClock) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - refused
    endpoint = FakeKeysEndpoint((KEY_A, "key-a"), (small, "small"))
    verifier = IdTokenVerifier(
        audience=AUDIENCE, keys=KeySet(CERTS_URL, fetch=endpoint, clock=clock), clock=clock
    )
    reject(verifier, token_for(claims_at(clock), small, "small"), "^token signed with an unknown")


def test_the_jwk_set_document_is_bounded_whoever_fetches_it(clock: FakeClock) -> None:
    body = json.dumps({"keys": [rsa_public_jwk(KEY_A, "key-a")]}).encode()
    with pytest.raises(KeysDocumentError, match="larger than 100 bytes"):
        parse_jwks(body, max_bytes=100)
    keys = KeySet(
        CERTS_URL, fetch=lambda _: JwksDocument(body), clock=clock, max_body_bytes=len(body) - 1
    )
    with pytest.raises(CredentialUnavailable):
        keys.key_for("key-a")
    assert keys.failures == 1


def test_a_deeply_nested_jwk_set_is_a_bad_document_not_a_recursion_error() -> None:
    with pytest.raises(KeysDocumentError, match="not JSON"):
        parse_jwks(b"[" * 200_000 + b"]" * 200_000, max_bytes=1_000_000)


# --- garbage for joserfc: always a 401 with a fixed message ---------------------------------------

_FUZZ_CLOCK = FakeClock(datetime(2026, 3, 1, 9, 0, tzinfo=UTC))
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
_header_names = st.sampled_from(
    ["alg", "kid", "typ", "cty", "x5t", "x5t#S256", "crit", "b64", "jku", "enc", "zip", "p2s", "x"]
)


def _fuzz_verifiers() -> list[IdTokenVerifier]:
    endpoint = FakeKeysEndpoint((KEY_A, "key-a"))
    return [
        IdTokenVerifier(
            audience=AUDIENCE,
            mode=mode,
            keys=KeySet(CERTS_URL, fetch=endpoint, clock=_FUZZ_CLOCK),
            clock=_FUZZ_CLOCK,
        )
        for mode in IdentityMode
    ]


def only_401(verifier: IdTokenVerifier, token: str) -> None:
    """Refused with a 401 that repeats nothing of the token, by both entry points; any other
    exception fails."""
    for attempt in (lambda: verifier.verify(token), lambda: asyncio.run(verifier.averify(token))):
        with pytest.raises(InvalidCallerToken) as info:
            attempt()
        assert (info.value.http_status, info.value.code) == (401, "invalid_token")
        for segment in token.split("."):
            if len(segment) >= 8 and segment != SIGNATURE_REMOVED:
                assert segment not in str(info.value)


@settings(max_examples=150, deadline=None)
@given(
    header=st.dictionaries(_header_names, _json_values, max_size=5),
    keep_alg=st.booleans(),
    payload=st.one_of(_json_values, st.binary(max_size=40)),
    signature=st.sampled_from(["rsa", "removed", "empty", "garbage"]),
)
def test_signed_garbage_headers_and_payloads_are_401s(
    header: dict[str, Any], keep_alg: bool, payload: Any, signature: str
) -> None:
    if keep_alg:
        header = header | {"alg": "RS256", "kid": "key-a"}
    header_b64 = b64url(json.dumps(header).encode())
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{header_b64}.{b64url(body)}"
    token = {
        "rsa": lambda: sign_input(signing_input),
        "removed": lambda: f"{signing_input}.{SIGNATURE_REMOVED}",
        "empty": lambda: f"{signing_input}.",
        "garbage": lambda: f"{signing_input}.{b64url(b'x' * 256)}",
    }[signature]()
    for verifier in _fuzz_verifiers():
        only_401(verifier, token)


@settings(max_examples=200, deadline=None)
@given(
    segments=st.lists(st.text(alphabet=_B64URL + ".=+/ ", max_size=60), min_size=1, max_size=6),
)
def test_raw_garbage_is_a_401(segments: list[str]) -> None:
    for verifier in _fuzz_verifiers():
        only_401(verifier, ".".join(segments))


def test_averify_loads_joserfc_off_the_event_loop(keys: KeySet, clock: FakeClock) -> None:
    """Its first import takes tens of milliseconds: not on the loop, which serves everyone."""
    verifier = IdTokenVerifier(audience=AUDIENCE, keys=keys, clock=clock)
    loaded_in: list[str] = []
    load = verifier._load_jose

    def spy() -> Any:
        loaded_in.append(threading.current_thread().name)
        return load()

    verifier._load_jose = spy  # type: ignore[method-assign]
    token = token_for(claims_at(clock))
    assert asyncio.run(verifier.averify(token)).email == CALLER.lower()
    assert asyncio.run(verifier.averify(token)).email == CALLER.lower()  # a cache hit
    assert len(loaded_in) == 1
    assert loaded_in[0] != threading.main_thread().name


class _NoJose:
    """Stands in for joserfc where it must not be used: any use fails the test."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"joserfc used ({name})")


def test_a_cache_hit_does_not_touch_joserfc(verifier: IdTokenVerifier, clock: FakeClock) -> None:
    token = token_for(claims_at(clock))
    first = verifier.verify(token)
    verifier._jose = _NoJose()  # type: ignore[assignment]
    assert verifier.verify(token) == first
    assert asyncio.run(verifier.averify(token)) == first
    assert verifier.cache_hits == 2


def test_the_cheap_checks_refuse_before_joserfc_is_even_loaded(
    verifier: IdTokenVerifier, clock: FakeClock
) -> None:
    good = token_for(claims_at(clock))
    for token, match in [
        ("x" * 5000, "^token larger than"),
        ("a.b", "^malformed token: expected three"),
        ("a.b.c.d.e", "^malformed token: expected three"),  # a JWE's shape
        (good.replace(".", "=.", 1), "^malformed token: not base64url$"),
        (f"{b64url(b'{}' + b' ' * 1100)}.e30.c2ln", "^token header larger than 1024 bytes$"),
    ]:
        reject(verifier, token, match)
    assert verifier._jose is None
