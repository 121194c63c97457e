"""The one error -> HTTP / exit-code mapping, as every entry point uses it."""

from __future__ import annotations

import pytest

from tokenbroker.entrypoints.answers import (
    EXIT_FAILURE,
    EXIT_USAGE,
    bug_answer,
    exit_code,
    http_answer,
)
from tokenbroker.kernel import errors
from tokenbroker.kernel.errors import TokenBrokerError

EVERY_ERROR = [
    cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, TokenBrokerError)
]


@pytest.mark.parametrize("cls", EVERY_ERROR, ids=lambda c: c.__name__)
@pytest.mark.parametrize("public", [True, False])
def test_every_error_gets_an_oauth_style_answer(cls: type[TokenBrokerError], public: bool) -> None:
    error = cls("connection 'crm': /etc/tokenbroker/key does not decrypt")
    answer = http_answer(error, public=public)
    assert 400 <= answer.status < 600
    assert set(answer.body) == {"error", "error_description"}
    assert answer.headers["Cache-Control"] == "no-store"
    if error.retryable:
        assert answer.status == 503
        assert int(answer.headers["Retry-After"]) >= 1
    if public and answer.status >= 500 and answer.status != 503:
        assert answer.body == {"error": "server_error", "error_description": "internal error"}
        assert "/etc" not in answer.json()
    if not public:
        assert answer.body["error"] == error.code


def test_operator_surfaces_keep_the_message_that_names_the_field() -> None:
    answer = http_answer(errors.ConfigError("TOKENBROKER_POLICY_FILE is required"), public=False)
    assert answer.status == 500
    assert answer.body == {
        "error": "invalid_config",
        "error_description": "TOKENBROKER_POLICY_FILE is required",
    }


def test_public_surfaces_hide_internal_failures() -> None:
    answer = http_answer(errors.ConfigError("/etc/secret path broke"), public=True)
    assert answer.status == 500
    assert answer.body == {"error": "server_error", "error_description": "internal error"}


def test_401_says_bearer_invalid_token_and_quotes_safely() -> None:
    answer = http_answer(errors.InvalidCallerToken('audience "x" is wrong'), public=True)
    assert answer.status == 401
    challenge = answer.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="tokenbroker", error="invalid_token"')
    assert challenge.count('"') == 6


@pytest.mark.parametrize(
    ("retry_after", "header"), [(None, "5"), (0.2, "1"), (42.9, "42"), (1e12, "3600")]
)
def test_retryable_errors_are_503_with_a_bounded_retry_after(
    retry_after: float | None, header: str
) -> None:
    error = errors.TransportError("provider timed out", retry_after=retry_after)
    answer = http_answer(error, public=True)
    assert (answer.status, answer.headers["Retry-After"]) == (503, header)


def test_an_error_with_an_impossible_status_is_a_500() -> None:
    class Odd(TokenBrokerError):
        http_status = 200

    assert http_answer(Odd("odd"), public=False).status == 500


def test_bugs_say_nothing() -> None:
    answer = bug_answer()
    assert answer.status == 500
    assert answer.body == {"error": "server_error", "error_description": "internal error"}


def test_exit_codes() -> None:
    assert exit_code(errors.ConfigError("x")) == EXIT_USAGE
    assert exit_code(errors.BadRequest("x")) == EXIT_USAGE
    assert exit_code(errors.NotFound("x")) == EXIT_FAILURE
    assert exit_code(errors.StoreUnavailable("x")) == EXIT_FAILURE


def test_405_names_the_allowed_methods() -> None:
    answer = http_answer(errors.MethodNotAllowed(("GET", "HEAD")), public=True)
    assert answer.status == 405
    assert answer.headers["Allow"] == "GET, HEAD"
    assert answer.body == {"error": "invalid_request", "error_description": "use GET"}
