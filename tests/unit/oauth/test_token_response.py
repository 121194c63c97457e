"""RFC 6749 §5.1/§5.2 answers become tokens or classified errors."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from tokenbroker.kernel import errors
from tokenbroker.kernel.http import HttpResponse, parse_retry_after
from tokenbroker.oauth.token_response import parse_token_response


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
