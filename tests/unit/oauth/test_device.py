"""The device authorization grant (RFC 8628): the provider's answers checked, the polling
rules (§3.4, §3.5) on a fake clock, nothing secret in a repr, an error or a log line."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import pytest

from tokenbroker.kernel.clock import FakeClock
from tokenbroker.kernel.errors import (
    AccessDenied,
    AuthorizationPending,
    ExpiredToken,
    InvalidClient,
    InvalidGrant,
    MalformedResponse,
    ProviderServerError,
    SlowDown,
    TemporarilyUnavailable,
    UnknownProviderError,
)
from tokenbroker.kernel.http import HttpResponse
from tokenbroker.kernel.log import capture_logs
from tokenbroker.kernel.model import ClientAuthMethod
from tokenbroker.kernel.secret import Secret
from tokenbroker.oauth.device import (
    DEFAULT_INTERVAL_SECONDS,
    DEVICE_CODE_GRANT,
    MAX_TRANSIENT_FAILURES,
    DeviceAuthorization,
    device_code_grant,
    parse_device_authorization,
    poll_device_token,
    request_device_authorization,
)
from tokenbroker.oauth.grants import refresh_grant
from tokenbroker.oauth.profiles import load_profiles
from tokenbroker.oauth.token_response import AnswerRules

DEVICE_CODE = "GmRhmhcxhwAzkoEqiMEg_DnyEysNkuNhszIySk9eS"
ANSWER: dict[str, Any] = {
    "device_code": DEVICE_CODE,
    "user_code": "WDJB-MJHT",
    "verification_uri": "https://example.com/device",
    "verification_uri_complete": "https://example.com/device?user_code=WDJB-MJHT",
    "expires_in": 1800,
    "interval": 5,
}
TOKEN = {"access_token": "at-device-1", "refresh_token": "rt-device-1", "expires_in": 3600}


def reply(status: int, body: object, headers: Mapping[str, str] | None = None) -> HttpResponse:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return HttpResponse(status, raw, dict(headers or {}))


def pending() -> HttpResponse:
    return reply(400, {"error": "authorization_pending"})


class Scripted:
    """The provider's answers in order, and what was sent (the wire, as the port sees it)."""

    def __init__(self, *answers: HttpResponse) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, dict[str, str], dict[str, str]]] = []

    async def post_form(
        self, url: str, form: Mapping[str, str], *, headers: Mapping[str, str]
    ) -> HttpResponse:
        self.calls.append((url, dict(form), dict(headers)))
        return self.answers.pop(0)


def authorization(**changes: Any) -> DeviceAuthorization:
    return parse_device_authorization({**ANSWER, **changes})


def poll(
    endpoint: Scripted, clock: FakeClock, auth: DeviceAuthorization | None = None, **kw: Any
) -> Any:
    return asyncio.run(
        poll_device_token(
            endpoint,
            "https://example.com/token",
            auth or authorization(),
            client_id="cid",
            client_secret=Secret("client-secret-value"),
            auth_method=ClientAuthMethod.BASIC,
            clock=clock,
            **kw,
        )
    )


# -- the device authorization answer (§3.2) ----------------------------------------------------


def test_a_complete_answer_is_read() -> None:
    parsed = authorization()
    assert parsed.device_code.reveal() == DEVICE_CODE
    assert (parsed.user_code, parsed.expires_in, parsed.interval) == ("WDJB-MJHT", 1800, 5)
    assert parsed.verification_uri == "https://example.com/device"
    assert parsed.verification_uri_complete == ANSWER["verification_uri_complete"]


def test_interval_defaults_to_five_seconds_and_googles_verification_url_is_read() -> None:
    google = {k: v for k, v in ANSWER.items() if k not in ("interval", "verification_uri")}
    google["verification_url"] = "https://www.google.com/device"
    parsed = parse_device_authorization(google)
    assert parsed.interval == DEFAULT_INTERVAL_SECONDS == 5
    assert parsed.verification_uri == "https://www.google.com/device"


@pytest.mark.parametrize("field", ["device_code", "user_code", "verification_uri", "expires_in"])
def test_a_missing_required_field_is_named(field: str) -> None:
    with pytest.raises(MalformedResponse, match=field):
        parse_device_authorization({k: v for k, v in ANSWER.items() if k != field})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("expires_in", 0),
        ("expires_in", -5),
        ("expires_in", 10**12),
        ("expires_in", "1800"),
        ("expires_in", True),
        ("expires_in", float("nan")),
        ("expires_in", float("inf")),
        ("expires_in", 2.5),
        ("expires_in", None),
        ("interval", 0),
        ("interval", -1),
        ("interval", 86400),
        ("interval", "5"),
        ("interval", [5]),
        ("user_code", ""),
        ("user_code", "A" * 65),
        ("user_code", "WDJB\nMJHT"),
        ("user_code", " WDJB"),
        ("user_code", 1234),
        ("device_code", "x" * 5000),
        ("device_code", "bad\x00code"),
        ("verification_uri", "http://example.com/device"),
        ("verification_uri", "javascript:alert(1)"),
        ("verification_uri", "https://user:pw@example.com/device"),
        ("verification_uri", "https://example.com/device#x"),
        ("verification_uri_complete", "http://evil.example/device"),
        ("verification_uri_complete", 7),
    ],
)
def test_an_absurd_value_is_a_malformed_answer_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(MalformedResponse, match=field) as caught:
        parse_device_authorization({**ANSWER, field: value})
    assert DEVICE_CODE not in str(caught.value)


def test_loopback_http_is_accepted_for_a_local_provider() -> None:
    parsed = authorization(verification_uri="http://127.0.0.1:8080/device")
    assert parsed.verification_uri == "http://127.0.0.1:8080/device"


def test_neither_code_is_in_a_repr() -> None:
    parsed = authorization()
    text = repr(parsed) + str(parsed)
    assert DEVICE_CODE not in text and "WDJB-MJHT" not in text
    assert "example.com/device" in text


def test_the_request_authenticates_the_client_and_asks_for_the_scopes() -> None:
    endpoint = Scripted(reply(200, ANSWER))
    parsed = asyncio.run(
        request_device_authorization(
            endpoint,
            "https://example.com/device/code",
            client_id="cid",
            client_secret=Secret("client-secret-value"),
            auth_method=ClientAuthMethod.POST,
            scopes=("api:read", "openid"),
        )
    )
    assert parsed.user_code == "WDJB-MJHT"
    url, form, _ = endpoint.calls[0]
    assert url == "https://example.com/device/code"
    assert form == {"client_id": "cid", "client_secret": "client-secret-value",
                    "scope": "api:read openid"}  # fmt: skip


def test_a_refused_request_is_its_classified_error_with_no_secret_in_it() -> None:
    echoed = {"error": "invalid_client", "error_description": "bad secret client-secret-value"}
    with pytest.raises(InvalidClient) as caught:
        asyncio.run(
            request_device_authorization(
                Scripted(reply(401, echoed)),
                "https://example.com/device/code",
                client_id="cid",
                client_secret=Secret("client-secret-value"),
                auth_method=ClientAuthMethod.BASIC,
                scopes=("api:read",),
            )
        )
    assert "client-secret-value" not in str(caught.value)


def test_an_http_device_endpoint_is_refused_before_anything_is_sent() -> None:
    endpoint = Scripted()
    with pytest.raises(Exception, match="https"):
        asyncio.run(
            request_device_authorization(
                endpoint,
                "http://example.com/device/code",
                client_id="cid",
                client_secret=None,
                auth_method=ClientAuthMethod.NONE,
                scopes=(),
            )
        )
    assert endpoint.calls == []


# -- polling (§3.4, §3.5) ----------------------------------------------------------------------


def test_a_poll_sends_the_device_code_grant() -> None:
    endpoint = Scripted(reply(200, TOKEN))
    answer = asyncio.run(
        device_code_grant(
            endpoint,
            "https://example.com/token",
            device_code=Secret(DEVICE_CODE),
            client_id="cid",
            client_secret=None,
            auth_method=ClientAuthMethod.NONE,
        )
    )
    assert answer.refresh_token is not None and answer.refresh_token.reveal() == "rt-device-1"
    _, form, _ = endpoint.calls[0]
    assert form == {"client_id": "cid", "grant_type": DEVICE_CODE_GRANT, "device_code": DEVICE_CODE}


@pytest.mark.parametrize(
    ("code", "error"),
    [("authorization_pending", AuthorizationPending), ("slow_down", SlowDown),
     ("expired_token", ExpiredToken), ("access_denied", AccessDenied)],
)  # fmt: skip
def test_each_polling_answer_is_its_own_error(code: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        asyncio.run(
            device_code_grant(
                Scripted(reply(400, {"error": code})),
                "https://example.com/token",
                device_code=Secret(DEVICE_CODE),
                client_id="cid",
                client_secret=None,
                auth_method=ClientAuthMethod.NONE,
            )
        )


def test_the_device_codes_are_unknown_to_every_other_grant() -> None:
    """``authorization_pending`` from a refresh is no reason to wait: an unknown code, as
    before the device grant existed (permanent, a human looks)."""
    with pytest.raises(UnknownProviderError):
        asyncio.run(
            refresh_grant(
                Scripted(reply(400, {"error": "authorization_pending"})),
                "https://example.com/token",
                refresh_token=Secret("rt"),
                client_id="cid",
                client_secret=None,
                auth_method=ClientAuthMethod.NONE,
            )
        )


def test_pending_waits_the_interval_each_time() -> None:
    clock = FakeClock()
    endpoint = Scripted(pending(), pending(), reply(200, TOKEN))
    answer = poll(endpoint, clock)
    assert answer.access_token.reveal() == "at-device-1"
    assert clock.sleeps == [5, 5, 5]
    assert all(form["device_code"] == DEVICE_CODE for _, form, _ in endpoint.calls)


def test_slow_down_adds_five_seconds_for_good() -> None:
    clock = FakeClock()
    endpoint = Scripted(
        reply(400, {"error": "slow_down"}), pending(), reply(400, {"error": "slow_down"}),
        pending(), reply(200, TOKEN),
    )  # fmt: skip
    poll(endpoint, clock)
    assert clock.sleeps == [5, 10, 10, 15, 15]


def test_denied_ends_the_wait_at_once() -> None:
    clock = FakeClock()
    with pytest.raises(AccessDenied):
        poll(Scripted(pending(), reply(400, {"error": "access_denied"})), clock)
    assert clock.sleeps == [5, 5]


@pytest.mark.parametrize(
    "refusal",
    [reply(400, {"error": "expired_token"}), reply(400, {"error": "invalid_grant"}),
     reply(401, {"error": "invalid_client"})],
)  # fmt: skip
def test_a_refusal_ends_the_wait(refusal: HttpResponse) -> None:
    with pytest.raises((ExpiredToken, InvalidGrant, InvalidClient)):
        poll(Scripted(refusal), FakeClock())


def test_the_wait_never_outlives_the_device_code() -> None:
    clock = FakeClock()
    endpoint = Scripted(*[pending() for _ in range(100)])
    with pytest.raises(ExpiredToken, match="no answer"):
        poll(endpoint, clock, authorization(expires_in=30, interval=5))
    assert clock.monotonic() <= 30
    assert len(endpoint.calls) == 6  # at 5, 10, ... 25 s, and the last one at 29 s


@pytest.mark.parametrize(("expires_in", "interval"), [(5, 5), (60, 120)])
def test_an_interval_as_long_as_the_code_still_polls_once(expires_in: int, interval: int) -> None:
    clock = FakeClock()
    answer = poll(
        Scripted(reply(200, TOKEN)), clock, authorization(expires_in=expires_in, interval=interval)
    )
    assert answer.refresh_token is not None
    assert clock.monotonic() <= expires_in


def test_a_provider_failing_at_the_deadline_is_its_error_not_the_account_holders() -> None:
    clock = FakeClock()
    failing = [reply(503, b"") for _ in range(4)]
    with pytest.raises(TemporarilyUnavailable):
        poll(Scripted(*failing), clock, authorization(expires_in=60, interval=5))
    assert clock.monotonic() <= 60


def test_a_shorter_wait_asked_for_ends_it_sooner() -> None:
    clock = FakeClock()
    with pytest.raises(ExpiredToken):
        poll(Scripted(*[pending() for _ in range(100)]), clock, wait_seconds=12)
    assert clock.monotonic() <= 12


def test_transient_failures_back_off_then_the_poll_goes_on() -> None:
    clock = FakeClock()
    endpoint = Scripted(
        reply(503, b"", {"retry-after": "40"}), reply(500, {"error": "server_error"}),
        pending(), reply(200, TOKEN),
    )  # fmt: skip
    poll(endpoint, clock)
    # 5 s, then max(5 * 2, Retry-After 40), then 5 * 2**2 (second failure in a row), then
    # the interval again after a pending answer.
    assert clock.sleeps == [5, 40, 20, 5]


def test_too_many_transient_failures_in_a_row_give_up() -> None:
    clock = FakeClock()
    failures = [reply(502, b"<html>bad gateway</html>") for _ in range(MAX_TRANSIENT_FAILURES)]
    with pytest.raises(ProviderServerError):
        poll(Scripted(*failures), clock, authorization(expires_in=86400))
    assert len(clock.sleeps) == MAX_TRANSIENT_FAILURES


def test_a_throttled_poll_is_transient_too() -> None:
    clock = FakeClock()
    answer = poll(Scripted(reply(429, b""), reply(200, TOKEN)), clock)
    assert answer.refresh_token is not None
    assert clock.sleeps == [5, 10]
    assert issubclass(TemporarilyUnavailable, Exception)


def test_an_unusable_success_ends_the_wait_with_its_cause() -> None:
    """A 2xx the parser rejects most likely spent the device code: polling again would only
    answer ``invalid_grant`` and hide why."""
    absurd = reply(200, {"access_token": 7, "expires_in": "soon"})
    endpoint = Scripted(absurd, reply(400, {"error": "invalid_grant"}))
    with pytest.raises(MalformedResponse):
        poll(endpoint, FakeClock())
    assert len(endpoint.calls) == 1
    # A gateway's page with an error status is transient: polled again.
    gateway = reply(502, b"<html>bad gateway</html>")
    assert poll(Scripted(gateway, reply(200, TOKEN)), FakeClock()).refresh_token is not None


@pytest.mark.parametrize(
    "uri",
    [
        "https://example.com/\x1b[2J\x1b[1;1HOPEN https://evil.example/",
        "https://example.com/\nEnter the code EVIL-CODE",
        "https://example.com/\u202edevice",
        "https://example.com/" + "a" * 3000,
        "https://example.com/ device",
    ],
)
def test_a_verification_uri_that_could_redraw_the_terminal_is_refused(uri: str) -> None:
    for field in ("verification_uri", "verification_uri_complete"):
        with pytest.raises(MalformedResponse, match=field):
            parse_device_authorization({**ANSWER, field: uri})


def test_polling_codes_mean_nothing_at_the_device_endpoint() -> None:
    with pytest.raises(UnknownProviderError):
        asyncio.run(
            request_device_authorization(
                Scripted(reply(400, {"error": "authorization_pending"})),
                "https://example.com/device/code",
                client_id="cid",
                client_secret=None,
                auth_method=ClientAuthMethod.NONE,
                scopes=(),
            )
        )


def test_control_characters_in_a_providers_description_never_reach_a_message() -> None:
    echo = {"error": "access_denied", "error_description": "no\x1b]0;pwned\x07\nFAKE LINE\u202e"}
    with pytest.raises(AccessDenied) as caught:
        poll(Scripted(reply(400, echo)), FakeClock())
    message = str(caught.value)
    assert "FAKE LINE" in message
    assert not any(ch in message for ch in "\x1b\x07\n\u202e")


def test_nothing_secret_reaches_the_log_or_the_error() -> None:
    echo = {"error": "access_denied", "error_description": f"denied {DEVICE_CODE}"}
    with capture_logs() as lines, pytest.raises(AccessDenied) as caught:
        poll(Scripted(pending(), reply(400, echo)), FakeClock())
    text = str(caught.value) + repr(caught.value) + json.dumps(lines, default=str)
    assert DEVICE_CODE not in text and "client-secret-value" not in text


# -- profiles ----------------------------------------------------------------------------------


def test_profiles_name_their_device_endpoint_or_refuse_the_flow() -> None:
    from tokenbroker.kernel.errors import ConfigError
    from tokenbroker.kernel.model import Connection, GrantType

    profiles = load_profiles()

    def connection(profile: str, **params: str) -> Connection:
        return Connection(
            id="c", profile=profile, grant=GrantType.REFRESH_TOKEN, client_id="cid",
            params=params, token_url="https://example.com/token",
        )  # fmt: skip

    google = profiles["google"].device_authorization_url_for(connection("google"))
    assert google == "https://oauth2.googleapis.com/device/code"
    generic = profiles["generic"]
    with pytest.raises(ConfigError, match=r"params\.device_authorization_url"):
        generic.device_authorization_url_for(connection("generic"))
    url = "https://idp.example/device"
    given = generic.device_authorization_url_for(
        connection("generic", device_authorization_url=url)
    )
    assert given == url
    with pytest.raises(ConfigError, match="RFC 8628"):
        profiles["zoho"].device_authorization_url_for(connection("zoho"))


def test_answer_rules_keep_the_device_codes_out_of_other_grants() -> None:
    assert dict(AnswerRules().grant_errors) == {}


def test_a_device_code_in_a_log_field_is_redacted() -> None:
    from tokenbroker.kernel.log import get_logger
    from tokenbroker.kernel.redact import is_sensitive_key

    assert is_sensitive_key("device_code") and not is_sensitive_key("user_code")
    with capture_logs() as lines:
        get_logger(component="test").info("polling", device_code=DEVICE_CODE)
    assert DEVICE_CODE not in json.dumps(lines, default=str)
