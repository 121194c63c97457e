"""Caller identity behind Cloud Run IAM, in its two modes (issue 9, item 5).

Tokens are shaped exactly as Cloud Run delivers them: a Google-signed ID token whose signature
segment the IAM front end replaced with ``SIGNATURE_REMOVED_BY_GOOGLE``
(https://cloud.google.com/run/docs/authenticating/service-to-service#acquire-token). Cloud Run
checks ``X-Serverless-Authorization`` when present, else ``Authorization``, and strips only the
one it checked; the other reaches the container as the caller sent it.
"""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given
from hypothesis import strategies as st

from tests.support.oidc import rsa_public_jwk, sign_rs256
from tokenbroker.issue.idtoken import (
    SIGNATURE_REMOVED,
    IdentityMode,
    IdTokenVerifier,
    JwksDocument,
    KeySet,
    credential_header,
)
from tokenbroker.kernel.clock import FakeClock
from tokenbroker.kernel.errors import ConfigError, InvalidCallerToken

FUNCTIONS_URL = "https://europe-west1-proj.cloudfunctions.net/tokenbroker-issuer"
RUN_URL = "https://tokenbroker-issuer-abc123xyz-ew.a.run.app"
AUDIENCES = (FUNCTIONS_URL, RUN_URL)
ISSUER = "https://accounts.google.com"
CALLER = "reporting-job@proj.iam.gserviceaccount.com"
ADMIN = "admin-job@proj.iam.gserviceaccount.com"
GOOGLE = rsa.generate_private_key(public_exponent=65537, key_size=2048)
FORGER = rsa.generate_private_key(public_exponent=65537, key_size=2048)


class CountingKeys:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, _url: str) -> JwksDocument:
        self.calls += 1
        return JwksDocument(json.dumps({"keys": [rsa_public_jwk(GOOGLE, "g1")]}).encode(), 3600)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2026, 3, 1, 9, 0, tzinfo=UTC))


@pytest.fixture
def fetch() -> CountingKeys:
    return CountingKeys()


def verifier_for(mode: IdentityMode, clock: FakeClock, fetch: CountingKeys) -> IdTokenVerifier:
    keys = KeySet("https://www.googleapis.com/oauth2/v3/certs", fetch=fetch, clock=clock)
    return IdTokenVerifier(audience=AUDIENCES, mode=mode, keys=keys, clock=clock)


@pytest.fixture
def platform(clock: FakeClock, fetch: CountingKeys) -> IdTokenVerifier:
    return verifier_for(IdentityMode.PLATFORM, clock, fetch)


@pytest.fixture
def verify(clock: FakeClock, fetch: CountingKeys) -> IdTokenVerifier:
    return verifier_for(IdentityMode.VERIFY, clock, fetch)


def b64(value: Any) -> str:
    raw = value if isinstance(value, bytes) else json.dumps(value, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def claims(clock: FakeClock, **overrides: Any) -> dict[str, Any]:
    now = int(clock.now().timestamp())
    values: dict[str, Any] = {
        "aud": FUNCTIONS_URL, "azp": "1098", "email": CALLER, "email_verified": True,
        "exp": now + 3600, "iat": now, "iss": ISSUER, "sub": "1098",
    }  # fmt: skip
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}


def signed(clock: FakeClock, key: rsa.RSAPrivateKey = GOOGLE, **overrides: Any) -> str:
    return sign_rs256(claims(clock, **overrides), key, kid="g1")


def as_delivered(token: str) -> str:
    """What the container receives for the token Cloud Run checked."""
    header, payload, _signature = token.split(".")
    return f"{header}.{payload}.{SIGNATURE_REMOVED}"


def delivered(clock: FakeClock, **overrides: Any) -> str:
    return as_delivered(signed(clock, **overrides))


def forged(clock: FakeClock, header: dict[str, Any] | None = None, **overrides: Any) -> str:
    """An unsigned token made up by the caller, dressed as a delivered one."""
    head = header if header is not None else {"alg": "RS256", "kid": "g1", "typ": "JWT"}
    return f"{b64(head)}.{b64(claims(clock, **overrides))}.{SIGNATURE_REMOVED}"


def refused(verifier: IdTokenVerifier, token: str, match: str) -> None:
    for attempt in (
        lambda: verifier.verify_authorization(f"Bearer {token}"),
        lambda: asyncio.run(verifier.averify_authorization(f"Bearer {token}")),
    ):
        with pytest.raises(InvalidCallerToken, match=match) as info:
            attempt()
        error = info.value
        assert (error.http_status, error.code) == (401, "invalid_token")
        for text in (str(error), repr(error)):
            for segment in token.split("."):
                if len(segment) >= 8 and segment != SIGNATURE_REMOVED:
                    assert segment not in text


# --- platform mode: the token Cloud Run checked ---------------------------------------------------


def test_platform_accepts_the_token_as_cloud_run_delivers_it(
    platform: IdTokenVerifier, clock: FakeClock, fetch: CountingKeys
) -> None:
    token = delivered(clock)
    assert token.endswith(".SIGNATURE_REMOVED_BY_GOOGLE")
    caller = platform.verify_authorization(f"Bearer {token}")
    assert (caller.email, caller.issuer, caller.subject) == (CALLER, ISSUER, "1098")
    assert asyncio.run(platform.averify_authorization(f"Bearer {token}")) == caller
    assert fetch.calls == 0  # platform mode never needs Google's keys


@pytest.mark.parametrize("aud", [FUNCTIONS_URL, RUN_URL, [RUN_URL], ["other", FUNCTIONS_URL]])
def test_every_url_of_the_function_is_an_accepted_audience(
    platform: IdTokenVerifier, verify: IdTokenVerifier, clock: FakeClock, aud: Any
) -> None:
    assert platform.verify(delivered(clock, aud=aud)).email == CALLER
    assert verify.verify(signed(clock, aud=aud)).email == CALLER


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"aud": "https://other-fn-abc-ew.a.run.app"}, "aud does not match"),
        ({"aud": FUNCTIONS_URL + "/"}, "aud does not match"),
        ({"iss": "https://accounts.evil.example"}, "iss is not a trusted issuer"),
        ({"exp": 1, "iat": 0}, "expired"),
        ({"iat": 1_900_000_000, "exp": 1_900_003_600}, "issued in the future"),
        ({"nbf": 1_900_000_000}, "not valid yet"),
        ({"email_verified": False}, "email is not verified"),
        ({"email_verified": None}, "email is not verified"),
        ({"email": None}, "no email claim"),
        ({"sub": None}, "no sub claim"),
    ],
)
def test_platform_still_checks_every_claim(
    platform: IdTokenVerifier, clock: FakeClock, overrides: dict[str, Any], match: str
) -> None:
    refused(platform, delivered(clock, **overrides), match)


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "none", "kid": "g1", "typ": "JWT"},
        {"alg": "HS256", "kid": "g1"},
        {"alg": "RS256", "kid": "g1", "jku": "https://evil.example/keys"},
        {"alg": "RS256", "kid": "g1", "typ": "at+jwt"},
    ],
)
def test_platform_still_checks_the_header(
    platform: IdTokenVerifier, clock: FakeClock, header: dict[str, Any]
) -> None:
    refused(platform, forged(clock, header=header), "alg|not accepted|typ")


@pytest.mark.parametrize(
    "signature",
    [
        "",  # alg none style
        "SIGNATURE_REMOVED_BY_GOOGLE_",
        "signature_removed_by_google",
        "SIGNATURE_REMOVED",
        "c2lnbmF0dXJl",
    ],
)
def test_platform_accepts_no_other_signature_placeholder(
    platform: IdTokenVerifier, clock: FakeClock, signature: str
) -> None:
    header, payload, _ = signed(clock).split(".")
    refused(platform, f"{header}.{payload}.{signature}", "not verified by the platform")


def test_platform_refuses_a_token_that_kept_its_signature(
    platform: IdTokenVerifier, clock: FakeClock, fetch: CountingKeys
) -> None:
    """Decision (docs/issuer.md): a signed token in the header the platform should have
    checked means the IAM front end did not check it -- the service is invocable without IAM,
    where forged unsigned tokens would pass too. Refused, even with a good Google signature,
    so the misdeployment fails loudly rather than running open."""
    refused(platform, signed(clock), "not verified by the platform")
    refused(platform, signed(clock, key=FORGER), "not verified by the platform")
    assert fetch.calls == 0


def test_platform_cache_rechecks_expiry(platform: IdTokenVerifier, clock: FakeClock) -> None:
    token = delivered(clock)
    platform.verify(token)
    platform.verify(token)
    assert platform.cache_hits == 1
    clock.advance(3600 + 61)
    refused(platform, token, "expired")


# --- verify mode: the issuer checks the signature -------------------------------------------------


def test_verify_refuses_unsigned_tokens(verify: IdTokenVerifier, clock: FakeClock) -> None:
    refused(verify, delivered(clock), "signature was removed")
    refused(verify, forged(clock), "signature was removed")
    refused(verify, signed(clock, key=FORGER), "does not verify")
    assert verify.verify(signed(clock)).email == CALLER


# --- which header: Cloud Run checks X-Serverless-Authorization when present, else Authorization --


def headers(**values: str | list[str]) -> list[tuple[bytes, bytes]]:
    """ASGI-style header pairs; ``x_serverless_authorization`` for the dashed name, and a
    list for a repeated header."""
    pairs: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]
    for name, value in values.items():
        wire = name.replace("_", "-").encode()
        values_ = value if isinstance(value, list) else [value]
        pairs.extend((wire, one.encode()) for one in values_)
    return pairs


def caller_in(verifier: IdTokenVerifier, pairs: list[tuple[bytes, bytes]]) -> str:
    return verifier.verify_authorization(verifier.select_authorization(pairs)).email


def test_platform_takes_the_serverless_header_and_ignores_a_forged_authorization(
    platform: IdTokenVerifier, clock: FakeClock
) -> None:
    """The attack: the caller may invoke the function (its real invoker token goes in
    X-Serverless-Authorization, which Cloud Run checks and strips) and puts a made-up unsigned
    token naming a more privileged account in Authorization, which Cloud Run leaves alone."""
    real = delivered(clock, email=CALLER)
    fake = forged(clock, email=ADMIN)
    pairs = headers(authorization=f"Bearer {fake}", x_serverless_authorization=f"Bearer {real}")
    assert caller_in(platform, pairs) == CALLER
    # Whatever sits in Authorization, signed or not, is never read when the other is there.
    pairs = headers(
        authorization=f"Bearer {signed(clock, email=ADMIN)}",
        x_serverless_authorization=f"Bearer {real}",
    )
    assert caller_in(platform, pairs) == CALLER


def test_platform_takes_authorization_when_it_is_the_only_header(
    platform: IdTokenVerifier, clock: FakeClock
) -> None:
    assert caller_in(platform, headers(authorization=f"Bearer {delivered(clock)}")) == CALLER


def test_platform_never_falls_back_from_an_empty_serverless_header(
    platform: IdTokenVerifier, clock: FakeClock
) -> None:
    pairs = headers(authorization=f"Bearer {forged(clock)}", x_serverless_authorization="")
    with pytest.raises(InvalidCallerToken, match="missing bearer token"):
        caller_in(platform, pairs)


def test_both_headers_unsigned(
    platform: IdTokenVerifier, verify: IdTokenVerifier, clock: FakeClock
) -> None:
    pairs = headers(
        authorization=f"Bearer {forged(clock, email=ADMIN)}",
        x_serverless_authorization=f"Bearer {delivered(clock)}",
    )
    assert caller_in(platform, pairs) == CALLER  # the one the platform checked
    with pytest.raises(InvalidCallerToken, match="signature was removed"):
        caller_in(verify, pairs)  # verify mode trusts neither


def test_verify_takes_authorization_and_ignores_the_serverless_header(
    verify: IdTokenVerifier, clock: FakeClock
) -> None:
    """Verify mode behind IAM: the invoker token in X-Serverless-Authorization (checked and
    stripped by Cloud Run), the caller's signed token in Authorization (left as sent)."""
    pairs = headers(
        authorization=f"Bearer {signed(clock)}",
        x_serverless_authorization=f"Bearer {delivered(clock, email=ADMIN)}",
    )
    assert caller_in(verify, pairs) == CALLER
    only_serverless = headers(x_serverless_authorization=f"Bearer {signed(clock)}")
    with pytest.raises(InvalidCallerToken, match="missing bearer token"):
        caller_in(verify, only_serverless)


@pytest.mark.parametrize(
    "names",
    [
        (b"Authorization", b"X-Serverless-Authorization"),
        (b"AUTHORIZATION", b"X-SERVERLESS-AUTHORIZATION"),
        (b"authorization", b"x-SeRvErLeSs-AuThOrIzAtIoN"),
    ],
)
def test_header_names_are_case_insensitive(
    platform: IdTokenVerifier, verify: IdTokenVerifier, clock: FakeClock, names: tuple[bytes, ...]
) -> None:
    auth_name, serverless_name = names
    fake = forged(clock, email=ADMIN)
    pairs = [
        (auth_name, f"Bearer {fake}".encode()),
        (serverless_name, f"Bearer {delivered(clock)}".encode()),
    ]
    assert caller_in(platform, pairs) == CALLER
    pairs = [
        (auth_name, f"Bearer {signed(clock)}".encode()),
        (serverless_name, f"Bearer {fake}".encode()),
    ]
    assert caller_in(verify, pairs) == CALLER


@pytest.mark.parametrize("mode", list(IdentityMode))
def test_a_repeated_credential_header_is_refused(mode: IdentityMode, clock: FakeClock) -> None:
    one, other = delivered(clock), delivered(clock, email=ADMIN)
    name = "x_serverless_authorization" if mode is IdentityMode.PLATFORM else "authorization"
    pairs = headers(**{name: [f"Bearer {one}", f"Bearer {other}"]})
    with pytest.raises(InvalidCallerToken, match="more than one"):
        credential_header(mode, pairs)


@pytest.mark.parametrize(
    "value",
    [
        "Bearer {a}, Bearer {b}",
        "Bearer {a},Bearer {b}",
        "Bearer {a} {b}",
        "Bearer {a}{b}",
        "Bearer {a}.{b}",
    ],
)
def test_a_header_with_two_tokens_is_refused(
    platform: IdTokenVerifier, clock: FakeClock, value: str
) -> None:
    a, b = delivered(clock), delivered(clock, email=ADMIN)
    pairs = headers(x_serverless_authorization=value.format(a=a, b=b))
    with pytest.raises(InvalidCallerToken, match="malformed"):
        caller_in(platform, pairs)


def test_no_credential_header_at_all(platform: IdTokenVerifier) -> None:
    assert platform.select_authorization(headers()) is None
    with pytest.raises(InvalidCallerToken, match="missing bearer token"):
        caller_in(platform, headers())


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize("audience", [(), ("",), ("  ",), [FUNCTIONS_URL, ""]])
def test_audiences_are_required(audience: Any, clock: FakeClock, fetch: CountingKeys) -> None:
    keys = KeySet("https://keys.example/certs", fetch=fetch, clock=clock)
    with pytest.raises(ConfigError, match="audience"):
        IdTokenVerifier(audience=audience, keys=keys, clock=clock)


def test_unknown_mode_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="trust-me"):
        IdentityMode("trust-me")


_NAMES = st.sampled_from(
    [b"authorization", b"Authorization", b"AUTHORIZATION", b"x-serverless-authorization",
     b"X-Serverless-Authorization", b"X-SERVERLESS-AUTHORIZATION", b"x-forwarded-authorization",
     b"proxy-authorization", b"content-type"]
)  # fmt: skip


@given(st.lists(st.tuples(_NAMES, st.sampled_from([b"A", b"S", b"O"])), max_size=6))
def test_the_header_rule_holds_for_any_mix_of_headers(pairs: list[tuple[bytes, bytes]]) -> None:
    """Values say where they sit: ``S`` only ever in X-Serverless-Authorization, ``A`` only in
    Authorization, ``O`` elsewhere. Platform mode never reads Authorization while an
    X-Serverless-Authorization is there; verify mode never reads X-Serverless-Authorization;
    no mode reads another header; a repeated header read is refused."""
    labelled = [
        (name, b"S" if name.lower() == b"x-serverless-authorization"
         else b"A" if name.lower() == b"authorization" else b"O")
        for name, _ in pairs
    ]  # fmt: skip
    values = [value for _, value in labelled]
    for mode in IdentityMode:
        expected = b"S" if mode is IdentityMode.PLATFORM and b"S" in values else b"A"
        count = values.count(expected)
        if count > 1:
            with pytest.raises(InvalidCallerToken):
                credential_header(mode, labelled)
            continue
        chosen = credential_header(mode, labelled)
        assert chosen == (expected.decode() if count else None)
