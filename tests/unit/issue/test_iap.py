"""IAP's signed header (issue/iap.py): every rule of Google's "Securing your app with signed
headers", on assertions signed with a real P-256 key."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pytest
from joserfc.jwk import RSAKey

from tests.support.iap import AUDIENCE, IapKeys
from tokenbroker.issue.iap import IapVerifier
from tokenbroker.issue.idtoken import JwksDocument
from tokenbroker.kernel.errors import ConfigError, CredentialUnavailable, InvalidCallerToken

KEYS = IapKeys()


class Published:
    """The keys URL: answers ``document`` and counts the fetches."""

    def __init__(self, *documents: dict[str, object]) -> None:
        self.documents = list(documents)
        self.fetches = 0

    def __call__(self, url: str) -> JwksDocument:
        assert url == "https://www.gstatic.com/iap/verify/public_key-jwk"
        self.fetches += 1
        document = self.documents[min(self.fetches, len(self.documents)) - 1]
        return JwksDocument(json.dumps(document).encode(), 3600)


def verifier(published: Published | None = None) -> IapVerifier:
    return IapVerifier(audience=[AUDIENCE], fetch=published or Published(KEYS.jwks()))


def test_a_good_assertion_names_the_operator() -> None:
    caller = verifier().verify(KEYS.assertion("Alice@Example.com"))
    assert caller.email == "alice@example.com"
    assert caller.issuer == "https://cloud.google.com/iap"


def test_the_header_is_read_case_insensitively_from_a_mapping() -> None:
    from werkzeug.datastructures import Headers

    headers = Headers({"X-Goog-IAP-JWT-Assertion": KEYS.assertion("alice@example.com")})
    assert verifier().verify_headers(headers).email == "alice@example.com"


@dataclass(frozen=True)
class _Ago:
    """A time this many seconds before the test runs (negative: after)."""

    seconds: int


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"aud": "/projects/1/global/backendServices/other"}, "aud does not match"),
        ({"iss": "https://accounts.google.com"}, "iss is not IAP"),
        ({"exp": _Ago(60)}, "expired"),
        ({"iat": _Ago(-120), "exp": _Ago(-600)}, "in the future"),
        ({"iat": _Ago(10), "exp": _Ago(-3600)}, "lifetime"),
        ({"email": None}, "no email"),
        ({"sub": None}, "no sub"),
        ({"exp": "soon"}, "numeric exp"),
    ],
)
def test_claims_outside_the_rules_are_refused(claims: dict[str, object], message: str) -> None:
    now = int(time.time())  # at the test's run, not at collection (the suite may take minutes)
    timed = {k: now - v.seconds if isinstance(v, _Ago) else v for k, v in claims.items()}
    with pytest.raises(InvalidCallerToken, match=message):
        verifier().verify(KEYS.assertion("alice@example.com", **timed))


def test_a_missing_or_malformed_assertion_is_refused() -> None:
    for bad in (None, "", "a.b", "a.b.c.d", "x" * 5000):
        with pytest.raises(InvalidCallerToken):
            verifier().verify(bad)


def test_only_es256_and_no_key_carrying_headers() -> None:
    good = KEYS.assertion("alice@example.com")
    with pytest.raises(InvalidCallerToken, match="only ES256"):
        verifier().verify(KEYS.assertion("a@example.com", header={"alg": "none", "kid": KEYS.kid}))
    rsa = RSAKey.generate_key(2048)
    from joserfc import jws

    claims = json.dumps({"email": "alice@example.com"}).encode()
    with pytest.raises(InvalidCallerToken, match="only ES256"):
        verifier().verify(jws.serialize_compact({"alg": "RS256", "kid": KEYS.kid}, claims, rsa))
    assert verifier().verify(good).email == "alice@example.com"
    embedded = {"alg": "ES256", "kid": KEYS.kid, "jwk": KEYS.jwks()["keys"][0]}
    with pytest.raises(InvalidCallerToken, match="not accepted"):
        verifier().verify(KEYS.assertion("alice@example.com", header=embedded))


def test_a_signature_by_another_key_or_an_unknown_kid_is_refused() -> None:
    other = IapKeys(kid=KEYS.kid)  # same kid, another key: a forgery
    with pytest.raises(InvalidCallerToken, match="does not verify"):
        verifier().verify(other.assertion("alice@example.com"))
    published = Published(KEYS.jwks())
    check = verifier(published)
    with pytest.raises(InvalidCallerToken, match="not a published IAP key"):
        check.verify(IapKeys(kid="rotated-in").assertion("alice@example.com"))
    # An unknown kid refetches at most every 30 s, not on every request.
    with pytest.raises(InvalidCallerToken):
        check.verify(IapKeys(kid="rotated-in").assertion("alice@example.com"))
    assert published.fetches == 1


def test_a_key_rotated_in_is_found_by_a_refetch() -> None:
    new = IapKeys(kid="iap-test-2")
    published = Published(KEYS.jwks(), {"keys": KEYS.jwks()["keys"] + new.jwks()["keys"]})
    check = verifier(published)
    assert check.verify(KEYS.assertion("a@example.com")).email == "a@example.com"
    check._fetched_at -= 31  # the refetch interval for unknown kids has passed
    assert check.verify(new.assertion("b@example.com")).email == "b@example.com"
    assert published.fetches == 2


def test_no_keys_is_unavailable_not_forged() -> None:
    def down(url: str) -> JwksDocument:
        raise OSError("unreachable")

    with pytest.raises(CredentialUnavailable):
        IapVerifier(audience=[AUDIENCE], fetch=down).verify(KEYS.assertion("a@example.com"))


def test_an_audience_and_an_https_keys_url_are_required() -> None:
    with pytest.raises(ConfigError, match="audience"):
        IapVerifier(audience=[])
    with pytest.raises(ConfigError, match="https"):
        IapVerifier(audience=[AUDIENCE], keys_url="http://keys.example/jwk")
