"""RFC 6749 §5.1/§5.2 answers become tokens or classified errors."""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import pytest

from tokenbroker.kernel import errors
from tokenbroker.kernel.http import HttpResponse, parse_retry_after
from tokenbroker.kernel.schedule import RefreshPolicy
from tokenbroker.kernel.secret import Secret
from tokenbroker.oauth.token_response import (
    DEFAULT_LIFETIME_SECONDS,
    MAX_LIFETIME_SECONDS,
    AnswerRules,
    LifetimeSource,
    parse_token_response,
)

MAX_LIFETIME = MAX_LIFETIME_SECONDS


def _resp(status: int, body: object, **headers: str) -> HttpResponse:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return HttpResponse(status, raw, headers)


def test_success_parses_every_field() -> None:
    token = parse_token_response(
        _resp(
            200,
            {
                "access_token": "AT-VALUE-XYZ",
                "token_type": "bearer",
                "expires_in": "3600",
                "refresh_token": "rt2",
                "scope": "a b",
                "api_domain": "https://www.zohoapis.eu",
            },
        )
    )
    assert token.access_token.reveal() == "AT-VALUE-XYZ"
    assert token.expires_in == 3600
    assert token.refresh_token is not None
    assert token.refresh_token.reveal() == "rt2"
    assert token.scope == ("a", "b")
    assert token.extras == {"api_domain": "https://www.zohoapis.eu"}
    assert "AT-VALUE-XYZ" not in repr(token)
    assert "rt2" not in repr(token)


@pytest.mark.parametrize(
    ("response", "error", "retryable"),
    [
        (_resp(400, {"error": "invalid_grant"}), errors.InvalidGrant, False),
        (_resp(401, {"error": "invalid_client"}), errors.InvalidClient, False),
        (_resp(400, {"error": "unauthorized_client"}), errors.UnauthorizedClient, False),
        (_resp(400, {"error": "invalid_scope"}), errors.InvalidScope, False),
        (_resp(400, {"error": "temporarily_unavailable"}), errors.TemporarilyUnavailable, True),
        (_resp(400, {"error": "something_new"}), errors.UnknownProviderError, False),
        (_resp(500, b"<html>oops</html>"), errors.ProviderServerError, True),
        (_resp(502, b""), errors.ProviderServerError, True),
        (_resp(503, b"", **{"retry-after": "7"}), errors.TemporarilyUnavailable, True),
        (_resp(429, {"error": "rate_limited"}), errors.TemporarilyUnavailable, True),
        (_resp(500, {"error": "invalid_grant"}), errors.ProviderServerError, True),
        (_resp(401, b""), errors.InvalidClient, False),
        (_resp(404, b"not here"), errors.UnknownProviderError, False),
        (_resp(302, b""), errors.UnknownProviderError, False),
        (_resp(200, {"error": "invalid_grant"}), errors.InvalidGrant, False),
        (_resp(200, b"<html>maintenance</html>"), errors.MalformedResponse, True),
        (_resp(200, ["not", "an", "object"]), errors.MalformedResponse, True),
        (_resp(200, {"token_type": "Bearer"}), errors.MalformedResponse, True),
        (_resp(200, {"access_token": "", "token_type": "Bearer"}), errors.MalformedResponse, True),
        (_resp(200, {"access_token": "a", "expires_in": "soon"}), errors.MalformedResponse, True),
        (_resp(200, {"access_token": "a", "expires_in": -5}), errors.MalformedResponse, True),
        (_resp(200, {"access_token": "a", "refresh_token": 5}), errors.MalformedResponse, True),
    ],
)
def test_errors_are_classified(
    response: HttpResponse, error: type[errors.ProviderError], retryable: bool
) -> None:
    with pytest.raises(error) as caught:
        parse_token_response(response)
    assert type(caught.value) is error
    assert caught.value.retryable is retryable
    assert caught.value.failure_class == ("transient" if retryable else "permanent")


def test_retry_after_is_carried() -> None:
    with pytest.raises(errors.TemporarilyUnavailable) as caught:
        parse_token_response(_resp(503, b"", **{"retry-after": "7"}))
    assert caught.value.retry_after == 7


def test_provider_error_aliases() -> None:
    with pytest.raises(errors.InvalidGrant):
        parse_token_response(
            _resp(200, {"error": "invalid_code"}), error_aliases={"invalid_code": "invalid_grant"}
        )


def test_error_description_is_scrubbed() -> None:
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJlLXZhbHVl"
    with pytest.raises(errors.InvalidGrant) as caught:
        parse_token_response(
            _resp(400, {"error": "invalid_grant", "error_description": f"bad {jwt}"})
        )
    assert jwt not in str(caught.value)


def test_retry_after_forms() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after("120") == 120
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now) == 30
    assert parse_retry_after("garbage") is None
    assert parse_retry_after(None) is None


# --- bounds: expires_in (RFC 6749 §5.1) -------------------------------------------------------

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
RULES = AnswerRules(default_lifetime_seconds=900)


def _ok(expires_in: object = None, **fields: object) -> HttpResponse:
    body = {"access_token": "at-new", "token_type": "Bearer", **fields}
    if expires_in is not None:
        body["expires_in"] = expires_in
    return _resp(200, body)


def _raw_ok(expires_in_literal: str) -> HttpResponse:
    body = '{"access_token": "at-new", "refresh_token": "rt-new", "expires_in": %s}'
    return HttpResponse(200, (body % expires_in_literal).encode(), {})


@pytest.mark.parametrize(
    ("stated", "lifetime"),
    [
        (3600, 3600),
        ("3600", 3600),
        (" 60 ", 60),
        (3599.7, 3599),
        (1, 1),
        (MAX_LIFETIME, MAX_LIFETIME),
    ],
)
def test_expires_in_within_bounds_is_the_lifetime(stated: object, lifetime: int) -> None:
    token = parse_token_response(_ok(stated), rules=RULES, now=NOW)
    assert token.expires_in == lifetime
    assert token.lifetime_seconds == lifetime
    assert token.lifetime_source is LifetimeSource.EXPIRES_IN


@pytest.mark.parametrize("literal", ["Infinity", "1e15", "1e12", "1e400", "1" + "0" * 400])
def test_absurdly_long_expires_in_is_not_believed(literal: str) -> None:
    """No overflow, no exception: a lifetime beyond the bound is "not stated" and the
    conservative fallback applies (here the profile default)."""
    token = parse_token_response(_raw_ok(literal), rules=RULES, now=NOW)
    assert token.expires_in is None
    assert token.lifetime_seconds == 900
    assert token.lifetime_source is LifetimeSource.PROFILE_DEFAULT
    assert token.refresh_token == Secret("rt-new")
    assert any("expires_in" in warning for warning in token.warnings)


@pytest.mark.parametrize(
    "literal",
    [
        "NaN",
        "-Infinity",
        "0",
        "0.5",
        "-1",
        "-1e12",
        "true",
        "false",
        '"soon"',
        '"1e3"',
        '""',
        '"-5"',
        '"\\u0663"',
        "[]",
        "{}",
        '"3600 s"',
    ],
)
def test_expires_in_out_of_bounds_is_an_ambiguous_malformed_answer(literal: str) -> None:
    """Zero, negative, not-a-number: the answer cannot be used, but the provider may have
    rotated the refresh token while sending it -- the new one is kept on the error."""
    with pytest.raises(errors.MalformedResponse) as caught:
        parse_token_response(_raw_ok(literal), rules=RULES, now=NOW)
    assert caught.value.retryable is True
    assert caught.value.ambiguous is True
    assert caught.value.refresh_token == Secret("rt-new")
    assert "rt-new" not in str(caught.value)
    assert "rt-new" not in repr(caught.value)


def test_expires_in_of_1e12_does_not_overflow_anywhere() -> None:
    """The defect: ``now + timedelta(seconds=1e12)`` overflowed and crashed the tick."""
    token = parse_token_response(_raw_ok("1e12"), rules=RULES, now=NOW)
    expires_at = NOW + timedelta(seconds=token.lifetime_seconds)
    due = RefreshPolicy().next_refresh_at(NOW, expires_at)
    assert NOW < due < expires_at <= NOW + timedelta(seconds=900)


def _jwt(claims: Mapping[str, object]) -> str:
    def part(value: object) -> str:
        raw = json.dumps(value).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256', 'typ': 'at+jwt'})}.{part(claims)}.c2lnbmF0dXJl"


def test_missing_expires_in_uses_a_jwt_access_tokens_exp() -> None:
    """The defect: a 60 s token without expires_in was stored as lasting 1 h."""
    exp = int(NOW.timestamp()) + 60
    token = parse_token_response(
        _resp(200, {"access_token": _jwt({"exp": exp, "sub": "x"})}), rules=RULES, now=NOW
    )
    assert token.expires_in is None
    assert token.lifetime_seconds == 60
    assert token.lifetime_source is LifetimeSource.JWT_EXP


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": int(NOW.timestamp()) - 5},  # already expired (or our clock is ahead)
        {"exp": int(NOW.timestamp())},
        {"exp": 1e15},
        {"exp": 10**400},  # an int too large for a float
        {"exp": -(10**400)},
        {"exp": float("inf")},
        {"exp": True},
        {"exp": "1777777777"},
        {"exp": None},
        {"sub": "no exp"},
        ["not", "an", "object"],
    ],
)
def test_a_jwt_exp_out_of_bounds_falls_back_to_the_default(claims: object) -> None:
    access = _jwt(claims) if isinstance(claims, dict) else _jwt({"x": claims})
    if not isinstance(claims, dict):
        header = access.split(".")[0]
        access = header + "." + base64.urlsafe_b64encode(b"[1]").decode().rstrip("=") + ".sig"
    token = parse_token_response(_resp(200, {"access_token": access}), rules=RULES, now=NOW)
    assert token.lifetime_seconds == 900
    assert token.lifetime_source is LifetimeSource.PROFILE_DEFAULT


@pytest.mark.parametrize(
    "access", ["opaque-token-value", "a.b.c", "eyJ.eyJ.x", "x.!!!.y", "....", "x.e30"]
)
def test_opaque_or_broken_tokens_use_the_default(access: str) -> None:
    token = parse_token_response(_resp(200, {"access_token": access}), rules=RULES, now=NOW)
    assert token.lifetime_seconds == 900
    assert token.lifetime_source is LifetimeSource.PROFILE_DEFAULT


def test_an_access_token_too_long_to_store_is_malformed() -> None:
    big = "x." + "A" * 70000 + ".y"
    with pytest.raises(errors.MalformedResponse):
        parse_token_response(_resp(200, {"access_token": big}), rules=RULES, now=NOW)


def test_a_stated_expires_in_wins_over_the_jwt() -> None:
    exp = int(NOW.timestamp()) + 60
    token = parse_token_response(
        _resp(200, {"access_token": _jwt({"exp": exp}), "expires_in": 30}), rules=RULES, now=NOW
    )
    assert token.lifetime_seconds == 30


def test_without_rules_the_default_lifetime_is_conservative() -> None:
    token = parse_token_response(_ok(), now=NOW)
    assert token.lifetime_seconds == DEFAULT_LIFETIME_SECONDS <= 900


# --- classification: ambiguous answers ----------------------------------------------------------


@pytest.mark.parametrize(
    "response",
    [
        _resp(200, b"<html>maintenance</html>"),
        _resp(200, {"error": "server_error"}),
        _resp(200, {"error": "invalid_grant", "refresh_token": "rt-new"}),
        _resp(200, {"token_type": "Bearer", "refresh_token": "rt-new"}),
        _resp(200, {"access_token": "at", "expires_in": 0, "refresh_token": "rt-new"}),
        _resp(204, b""),
        _resp(500, b"<html>oops</html>"),
        _resp(502, b""),
        _resp(504, b"gateway timeout"),
    ],
)
def test_answers_that_may_have_consumed_the_grant_are_ambiguous(response: HttpResponse) -> None:
    with pytest.raises(errors.ProviderError) as caught:
        parse_token_response(response, rules=RULES, now=NOW)
    assert caught.value.ambiguous is True


@pytest.mark.parametrize(
    "response",
    [
        _resp(400, {"error": "invalid_grant"}),
        _resp(401, b""),
        _resp(400, {"error": "temporarily_unavailable"}),
        _resp(429, b""),
        _resp(503, b"", **{"retry-after": "7"}),
        _resp(500, {"error": "server_error"}),
        _resp(404, b"not here"),
        _resp(408, b""),
    ],
)
def test_answers_that_refused_the_request_are_not_ambiguous(response: HttpResponse) -> None:
    with pytest.raises(errors.ProviderError) as caught:
        parse_token_response(response, rules=RULES, now=NOW)
    assert caught.value.ambiguous is False
    assert caught.value.refresh_token is None


def test_no_answer_is_ambiguous_unless_the_request_never_left() -> None:
    assert errors.TransportError("timed out after 10s").ambiguous is True
    assert errors.TransportError("refused", ambiguous=False).ambiguous is False
    assert errors.StoreUnavailable("down").ambiguous is False


@pytest.mark.parametrize(
    "body",
    [
        {"access_token": "at", "refresh_token": "rt-new", "expires_in": 0},
        {"refresh_token": "rt-new"},
        {"access_token": "at\r\nX-Injected: 1", "refresh_token": "rt-new"},
        {"access_token": "at", "token_type": "Bearer x", "refresh_token": "rt-new"},
        {"error": "invalid_request", "refresh_token": "rt-new"},
    ],
)
def test_a_refresh_token_in_an_unusable_answer_is_kept_on_the_error(body: object) -> None:
    """The defect: a refresh token received in a rejected 200 was discarded (and with a
    rotating provider the connection with it)."""
    with pytest.raises(errors.ProviderError) as caught:
        parse_token_response(_resp(200, body), rules=RULES, now=NOW)
    assert caught.value.ambiguous is True
    assert caught.value.refresh_token == Secret("rt-new")
    assert "rt-new" not in str(caught.value)


@pytest.mark.parametrize(
    "value", ["", " ", "\t\n", "rt\n", "rt\x00x", "r\u00e9t", 5, True, [], "x" * 20000]
)
def test_an_unusable_refresh_token_from_a_rotating_provider_is_an_ambiguous_failure(
    value: object,
) -> None:
    """RFC 6749 §6: a refresh_token in the answer means "discard the old one"; one that is
    not ``1*VSCHAR`` (Appendix A.17) cannot replace it, and the old one may be revoked
    already. Neither is stored: the outcome is unknown (the tick's recovery path)."""
    rules = AnswerRules(rotates_refresh_tokens=True)
    with pytest.raises(errors.MalformedResponse) as caught:
        parse_token_response(_ok(3600, refresh_token=value), rules=rules, now=NOW)
    assert caught.value.ambiguous is True
    assert caught.value.refresh_token is None


@pytest.mark.parametrize("value", ["", "   ", "rt\n"])
def test_an_unusable_refresh_token_from_a_non_rotating_provider_keeps_the_old_one(
    value: str,
) -> None:
    """The provider's refresh tokens stay valid after use (its profile says so), so the
    stored one still works: the answer is used, with a warning, and no refresh token."""
    rules = AnswerRules(rotates_refresh_tokens=False)
    token = parse_token_response(_ok(3600, refresh_token=value), rules=rules, now=NOW)
    assert token.refresh_token is None
    assert any("refresh_token" in warning for warning in token.warnings)


def test_a_refresh_token_is_stored_exactly_as_issued() -> None:
    token = parse_token_response(_ok(3600, refresh_token=" rt with spaces "), now=NOW)
    assert token.refresh_token == Secret(" rt with spaces ")


def test_absent_or_null_refresh_token_means_none_was_issued() -> None:
    assert parse_token_response(_ok(3600), now=NOW).refresh_token is None
    assert parse_token_response(_ok(3600, refresh_token=None), now=NOW).refresh_token is None


# --- never anything but a classified error ------------------------------------------------------


def _bodies(rng: random.Random) -> Iterator[bytes]:
    yield b"[" * 200_000
    yield b'{"a":' * 100_000
    yield b'{"expires_in": 1' + b"0" * 5000 + b', "access_token": "x"}'
    yield b"\xff\xfe\x00garbage"
    yield b'{"access_token": "x", "expires_in": 1e999999}'
    yield json.dumps({"error": {"nested": ["x"] * 10}}).encode()
    yield json.dumps({"error": None, "access_token": None}).encode()
    yield json.dumps({"error": 0, "access_token": "x", "scope": 5, "api_domain": ["x"]}).encode()
    values: list[object] = [
        None,
        True,
        False,
        0,
        -1,
        1.5,
        1e308,
        "",
        " ",
        "x",
        "\u0000",
        "\ud7ff",
        [],
        {},
        [1],
        {"a": 1},
        "eyJhbGciOiJub25lIn0.eyJleHAiOjF9.",
        "9" * 30,
        "Infinity",
        10**400,
        -(10**30),
        *(
            _jwt({"exp": exp})
            for exp in (10**400, -1, 1e308, "x", None, int(NOW.timestamp()) + 120)
        ),
    ]
    names = [
        "access_token",
        "token_type",
        "expires_in",
        "refresh_token",
        "scope",
        "error",
        "error_description",
        "api_domain",
        "id_token",
    ]
    for _ in range(3000):
        body = {name: rng.choice(values) for name in rng.sample(names, rng.randint(0, len(names)))}
        yield json.dumps(body).encode()


def test_any_answer_is_a_token_or_a_classified_error() -> None:
    """The defect: odd provider values raised tracebacks that abandoned a whole tick."""
    rng = random.Random(8)
    statuses = [200, 201, 204, 301, 400, 401, 403, 404, 408, 429, 500, 502, 503, 504, 599]
    retry_afters = ["", "5", "-1", "\u00b3", "Fri, 31 Dec 9999 23:59:59 GMT", "9" * 100]
    failures: list[errors.TokenBrokerError] = []
    lifetimes: list[int] = []
    for body in _bodies(rng):
        response = HttpResponse(
            rng.choice(statuses), body, {"retry-after": rng.choice(retry_afters)}
        )
        try:
            token = parse_token_response(response, rules=RULES, now=NOW)
        except errors.TokenBrokerError as error:
            failures.append(error)
        else:
            lifetimes.append(token.lifetime_seconds)
            NOW + timedelta(seconds=token.lifetime_seconds)  # never overflows
    assert failures and lifetimes  # both kinds were exercised
    assert all(e.retry_after is None or 0 <= e.retry_after <= 3600 for e in failures)
    assert all(1 <= lifetime <= MAX_LIFETIME for lifetime in lifetimes)


# --- redaction by value at the boundary ---------------------------------------------------------

# A refresh token no shape rule recognises (32 hex digits, like a UUID's hex).
HEX_RT = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"


@pytest.mark.parametrize(
    "echo",
    [HEX_RT, quote(HEX_RT + "/x", safe=""), json.dumps(HEX_RT + "/x")[1:-1].replace("/", "\\/")],
)
def test_a_known_secret_echoed_in_the_description_is_scrubbed(echo: str) -> None:
    known = [Secret(HEX_RT), Secret(HEX_RT + "/x")]
    body = {"error": "invalid_grant", "error_description": f"refresh token {echo} is revoked"}
    with pytest.raises(errors.InvalidGrant) as caught:
        parse_token_response(_resp(400, body), known_secrets=known, now=NOW)
    assert HEX_RT not in str(caught.value)
    assert "is revoked" in str(caught.value)


def test_a_known_secret_echoed_as_the_error_code_is_scrubbed() -> None:
    with pytest.raises(errors.UnknownProviderError) as caught:
        parse_token_response(
            _resp(400, {"error": f"bad_token:{HEX_RT}"}), known_secrets=[Secret(HEX_RT)]
        )
    assert HEX_RT not in str(caught.value)


def test_the_answers_own_tokens_are_scrubbed_from_its_text() -> None:
    """A rejected 200 whose description echoes the new refresh token it carries: the token is
    kept on the error, never in its message."""
    new_rt = "a1b2c3d4e5f60718293a4b5c6d7e8f90"
    body = {
        "error": "server_error",
        "error_description": f"issued {new_rt}",
        "refresh_token": new_rt,
    }
    with pytest.raises(errors.ProviderServerError) as caught:
        parse_token_response(_resp(200, body), now=NOW)
    assert caught.value.refresh_token == Secret(new_rt)
    assert new_rt not in str(caught.value)


def test_kept_extras_and_scope_never_hold_a_known_secret() -> None:
    at = "0123456789abcdef0123456789abcdef"
    token = parse_token_response(
        _resp(200, {"access_token": at, "api_domain": f"https://x/{at}", "scope": f"a {HEX_RT}"}),
        known_secrets=[Secret(HEX_RT)],
        now=NOW,
    )
    assert at not in json.dumps(dict(token.extras))
    assert HEX_RT not in " ".join(token.scope or ())


@pytest.mark.parametrize(
    ("body", "ambiguous"),
    [
        ({"error": "invalid_grant"}, False),  # a refusal: nothing was issued, nothing spent
        ({"error": "invalid_client"}, False),
        ({"error": "temporarily_unavailable"}, True),  # processed, outcome unknown
        ({"error": "invalid_grant", "access_token": "at", "refresh_token": "rt-new-0123"}, True),
    ],
)
def test_a_200_carrying_an_error_is_ambiguous_unless_it_refuses_and_brings_nothing(
    body: dict[str, str], ambiguous: bool
) -> None:
    """Found by the fault suite: a 200 ``{"error": "invalid_grant"}`` (Zoho's refusals are
    200s) was an unknown outcome, so a connection whose grant was refused sat at risk until
    its last chance instead of asking for re-authorisation at once."""
    response = HttpResponse(200, json.dumps(body).encode(), {"content-type": "application/json"})
    with pytest.raises(errors.ProviderError) as caught:
        parse_token_response(response)
    assert caught.value.ambiguous is ambiguous
