"""Provider profiles carry their quirks as data, parsed strictly (``profiles.toml``)."""

from __future__ import annotations

import asyncio
import json
import tomllib
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from tokenbroker.kernel import errors
from tokenbroker.kernel.errors import ConfigError, TokenBrokerError
from tokenbroker.kernel.http import HttpResponse
from tokenbroker.kernel.log import capture_logs
from tokenbroker.kernel.model import Connection, Credential, GrantType
from tokenbroker.kernel.secret import Secret
from tokenbroker.oauth.acquire import acquire
from tokenbroker.oauth.profiles import (
    BudgetScope,
    ProviderProfile,
    load_profiles,
    parse_profile,
)
from tokenbroker.oauth.token_response import DEFAULT_LIFETIME_SECONDS, parse_token_response
from tokenbroker.refresh.transitions import FailedTransient, failed

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
PROFILES = load_profiles()
ZOHO = PROFILES["zoho"]

# Zoho's answer once the 10-minute token limit is reached (status 200, sometimes 400), as
# client libraries record it, and its localised variant (accounts.zoho.com.cn).
ZOHO_THROTTLED = {
    "error_description": "You have made too many requests continuously. Please try again "
    "after some time.",
    "error": "Access Denied",
    "status": "failure",
}
ZOHO_THROTTLED_CN = {
    "error_description": "\u60a8\u5df2\u8fde\u7eed\u63d0\u51fa\u8fc7\u591a\u8bf7\u6c42",
    "error": "\u62d2\u7edd\u8bbf\u95ee",
    "status": "failure",
}


def _resp(status: int, body: object) -> HttpResponse:
    return HttpResponse(status, json.dumps(body).encode(), {})


class Answering:
    """A token endpoint that gives one fixed answer and records what it was sent."""

    def __init__(self, response: HttpResponse) -> None:
        self.response = response
        self.sent: list[tuple[str, dict[str, str], dict[str, str]]] = []

    async def post_form(
        self, url: str, form: Mapping[str, str], *, headers: Mapping[str, str]
    ) -> HttpResponse:
        self.sent.append((url, dict(form), dict(headers)))
        return self.response


# --- the built-in profiles ----------------------------------------------------------------------


def test_zoho_documents_its_limits_and_does_not_rotate() -> None:
    assert ZOHO.rotates_refresh_tokens is False
    assert ZOHO.refresh_token_reuse_grace_seconds == 0
    assert ZOHO.default_lifetime_seconds == 3600  # "Each access token is valid for one hour."
    assert ZOHO.limits.access_tokens_per_refresh_token == 10
    assert ZOHO.limits.access_tokens_window_seconds == 600
    assert ZOHO.limits.active_access_tokens_per_refresh_token == 15
    assert ZOHO.limits.refresh_tokens_per_user == 20
    budget = ZOHO.budget
    assert budget is not None
    assert budget.scope is BudgetScope.REFRESH_TOKEN
    assert budget.per_seconds == 600
    assert 1 <= budget.requests <= 10  # within the documented limit


def test_every_profile_is_conservative_where_nothing_is_documented() -> None:
    generic = PROFILES["generic"]
    assert generic.rotates_refresh_tokens is True  # assume the worst
    assert generic.refresh_token_reuse_grace_seconds == 0
    assert generic.default_lifetime_seconds == DEFAULT_LIFETIME_SECONDS <= 900
    assert generic.budget is None
    for profile in PROFILES.values():
        assert 60 <= profile.default_lifetime_seconds <= 3600
        if profile.refresh_token_reuse_grace_seconds:
            assert profile.rotates_refresh_tokens


def test_okta_rotates_with_its_documented_grace_window() -> None:
    okta = PROFILES["okta"]
    assert okta.rotates_refresh_tokens is True
    assert okta.refresh_token_reuse_grace_seconds == 30
    connection = Connection(
        id="o", profile="okta", grant=GrantType.REFRESH_TOKEN, params={"domain": "acme.okta.com"}
    )
    assert okta.token_url_for(connection) == "https://acme.okta.com/oauth2/default/v1/token"


def test_the_answer_rules_come_from_the_profile() -> None:
    rules = ZOHO.answer_rules
    assert rules.rotates_refresh_tokens is False
    assert rules.default_lifetime_seconds == 3600
    assert rules.error_aliases["invalid_code"] == "invalid_grant"
    assert rules.throttle is not None


# --- Zoho's throttling is transient, never needs_reauth ----------------------------------------


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, ZOHO_THROTTLED),
        (400, ZOHO_THROTTLED),
        (200, ZOHO_THROTTLED_CN),
        (200, {"error": "access_denied"}),
        (200, {"error": "Access Denied"}),
        (400, {"error": "invalid_request", "error_description": "Too Many Requests"}),
    ],
)
def test_zoho_throttling_is_transient(status: int, body: Mapping[str, str]) -> None:
    with pytest.raises(errors.TemporarilyUnavailable) as caught:
        parse_token_response(_resp(status, body), rules=ZOHO.answer_rules, now=NOW)
    error = caught.value
    assert error.retryable is True
    assert error.ambiguous is False  # a refusal: nothing was issued or spent
    # No Retry-After from Zoho: wait out its 10-minute window rather than hammer it.
    assert error.retry_after == 600
    outcome = failed(error, attempted_at=NOW, version=1)
    assert isinstance(outcome, FailedTransient)


def test_zoho_throttling_through_a_refresh_is_not_needs_reauth() -> None:
    """The defect: Zoho's HTTP 200 "Access Denied" moved a connection to needs_reauth."""

    connection = Connection(id="z", profile="zoho", grant=GrantType.REFRESH_TOKEN, client_id="c")
    credential = Credential(refresh_token=Secret("1000.rt"), client_secret=Secret("cs"))
    with pytest.raises(TokenBrokerError) as caught:
        asyncio.run(
            acquire(Answering(_resp(200, ZOHO_THROTTLED)), connection, ZOHO, credential, NOW)
        )
    assert isinstance(failed(caught.value, attempted_at=NOW, version=1), FailedTransient)


def test_a_revoked_zoho_refresh_token_still_needs_reauth() -> None:
    with pytest.raises(errors.InvalidGrant) as caught:
        parse_token_response(_resp(200, {"error": "invalid_code"}), rules=ZOHO.answer_rules)
    assert caught.value.retryable is False


def test_access_denied_elsewhere_keeps_its_rfc_meaning() -> None:
    for body in ({"error": "access_denied"}, ZOHO_THROTTLED):
        with pytest.raises(errors.ProviderError) as caught:
            parse_token_response(_resp(400, body), rules=PROFILES["generic"].answer_rules)
        assert caught.value.retryable is False


def test_a_missing_expires_in_uses_the_profiles_lifetime() -> None:
    connection = Connection(
        id="c",
        profile="generic",
        grant=GrantType.REFRESH_TOKEN,
        client_id="c",
        token_url="https://idp/token",
    )
    credential = Credential(refresh_token=Secret("rt"), client_secret=Secret("cs"))
    result = asyncio.run(
        acquire(
            Answering(_resp(200, {"access_token": "at-new"})),
            connection,
            PROFILES["generic"],
            credential,
            NOW,
        )
    )
    assert result.expires_at == NOW + timedelta(seconds=DEFAULT_LIFETIME_SECONDS)


def test_an_absurd_expires_in_through_a_refresh_does_not_overflow() -> None:
    connection = Connection(id="z", profile="zoho", grant=GrantType.REFRESH_TOKEN, client_id="c")
    credential = Credential(refresh_token=Secret("1000.rt"), client_secret=Secret("cs"))
    result = asyncio.run(
        acquire(
            Answering(HttpResponse(200, b'{"access_token": "at", "expires_in": 1e12}', {})),
            connection,
            ZOHO,
            credential,
            NOW,
        )
    )
    assert result.expires_at == NOW + timedelta(hours=1)


# --- strict parsing -----------------------------------------------------------------------------

BASE: dict[str, Any] = {"grants": ["refresh_token"], "token_url": "https://idp/token"}


def _parse(**fields: Any) -> ProviderProfile:
    return parse_profile("p", {**BASE, **fields}, "profiles.p")


def test_a_full_profile_parses() -> None:
    profile = _parse(
        rotates_refresh_tokens=True,
        refresh_token_reuse_grace_seconds=60,
        default_lifetime_seconds=300,
        throttle={"errors": ["Busy"], "descriptions": ["slow down"], "retry_after_seconds": 30},
        limits={"access_tokens_per_refresh_token": 5, "access_tokens_window_seconds": 60},
        budget={"requests": 4, "per_seconds": 60, "scope": "refresh_token"},
    )
    assert profile.refresh_token_reuse_grace_seconds == 60
    assert profile.budget is not None
    assert profile.budget.requests == 4
    assert profile.answer_rules.throttle is not None
    assert profile.answer_rules.throttle.matches("busy", "")
    assert profile.answer_rules.throttle.matches("x", "Please SLOW DOWN now")
    assert not profile.answer_rules.throttle.matches("invalid_grant", "expired")


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"default_lifetime_seconds": 0}, "default_lifetime_seconds"),
        ({"default_lifetime_seconds": 10}, "default_lifetime_seconds"),
        ({"default_lifetime_seconds": 2**63}, "default_lifetime_seconds"),
        ({"default_lifetime_seconds": 3600.0}, "default_lifetime_seconds"),
        ({"refresh_token_reuse_grace_seconds": -1}, "refresh_token_reuse_grace_seconds"),
        ({"refresh_token_reuse_grace_seconds": 86400}, "refresh_token_reuse_grace_seconds"),
        (
            {"rotates_refresh_tokens": False, "refresh_token_reuse_grace_seconds": 30},
            "refresh_token_reuse_grace_seconds",
        ),
        ({"rotates_refresh_tokens": "yes"}, "rotates_refresh_tokens"),
        ({"throttle": {"errors": "Access Denied"}}, "throttle.errors"),
        ({"throttle": {"errors": ["ok", 5]}}, "throttle.errors[1]"),
        ({"throttle": {"errors": [""]}}, "throttle.errors[0]"),
        ({"throttle": {"descriptions": ["x"], "retry_after_seconds": 0}}, "retry_after_seconds"),
        ({"throttle": {"errors": ["x"], "retry_after_seconds": 99999}}, "retry_after_seconds"),
        ({"throttle": {}}, "throttle"),
        ({"throttle": {"errors": ["x"], "eror": 1}}, "throttle.eror"),
        ({"budget": {"requests": 0, "per_seconds": 600, "scope": "client"}}, "budget.requests"),
        ({"budget": {"requests": 1, "per_seconds": 0, "scope": "client"}}, "budget.per_seconds"),
        (
            {"budget": {"requests": 1, "per_seconds": 10**9, "scope": "client"}},
            "budget.per_seconds",
        ),
        ({"budget": {"requests": 1, "per_seconds": 60, "scope": "user"}}, "budget.scope"),
        ({"budget": {"requests": 1, "per_seconds": 60}}, "budget.scope"),
        ({"budget": {"requests": 1, "per_seconds": 60, "scope": "client", "x": 1}}, "budget.x"),
        ({"budget": 10}, "budget"),
        ({"limits": {"refresh_tokens_per_user": 0}}, "limits.refresh_tokens_per_user"),
        ({"limits": {"access_tokens_per_refresh_token": 10}}, "access_tokens_window_seconds"),
        ({"limits": {"tokens": 1}}, "limits.tokens"),
        (
            {
                "limits": {
                    "access_tokens_per_refresh_token": 10,
                    "access_tokens_window_seconds": 600,
                },
                "budget": {"requests": 11, "per_seconds": 600, "scope": "refresh_token"},
            },
            "budget",
        ),
        (
            {
                "limits": {
                    "access_tokens_per_refresh_token": 10,
                    "access_tokens_window_seconds": 600,
                },
                "budget": {"requests": 5, "per_seconds": 60, "scope": "refresh_token"},
            },
            "budget",
        ),
    ],
)
def test_bad_quirks_are_refused_naming_the_field(fields: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _parse(**fields)
    assert named in str(caught.value)


def test_a_budget_within_the_documented_limit_is_accepted() -> None:
    profile = _parse(
        limits={"access_tokens_per_refresh_token": 10, "access_tokens_window_seconds": 600},
        budget={"requests": 1, "per_seconds": 60, "scope": "refresh_token"},
    )
    assert profile.budget is not None
    assert profile.budget.per_seconds == 60


def test_an_overlay_file_can_set_a_grace_window(tmp_path: Path) -> None:
    extra = tmp_path / "profiles.toml"
    extra.write_text(
        "[myidp]\n"
        'grants = ["refresh_token"]\n'
        "rotates_refresh_tokens = true\n"
        "refresh_token_reuse_grace_seconds = 15\n"
        "[myidp.budget]\n"
        'requests = 100\nper_seconds = 60\nscope = "token_endpoint"\n'
    )
    profile = load_profiles(extra)["myidp"]
    assert profile.refresh_token_reuse_grace_seconds == 15
    assert profile.budget is not None
    assert profile.budget.scope is BudgetScope.TOKEN_ENDPOINT


def test_the_builtin_file_has_no_unknown_fields_and_cites_its_sources() -> None:
    raw = resources.files("tokenbroker.oauth").joinpath("profiles.toml").read_text()
    data = tomllib.loads(raw)
    assert set(data) >= {"generic", "google", "zoho", "okta"}
    for name in ("google", "zoho", "okta"):
        assert "https://" in str(data[name].get("description"))
    assert "zoho.com/crm/developer/docs/api/v8/token-validity" in raw


def test_a_blank_refresh_token_from_zoho_keeps_the_stored_one_with_a_warning() -> None:
    """Zoho does not rotate (its profile says so): a blank ``refresh_token`` in an otherwise
    good answer leaves the stored one in force, and the oddity is logged -- not silent."""
    connection = Connection(id="z", profile="zoho", grant=GrantType.REFRESH_TOKEN, client_id="c")
    credential = Credential(refresh_token=Secret("1000.rt"), client_secret=Secret("cs"))
    answer = _resp(200, {"access_token": "at-new", "expires_in": 3600, "refresh_token": "  "})
    with capture_logs("warning") as logs:
        result = asyncio.run(acquire(Answering(answer), connection, ZOHO, credential, NOW))
    assert result.refresh_token == Secret("1000.rt")
    assert result.access_token == Secret("at-new")
    line = json.loads(logs.getvalue().splitlines()[0])
    assert line["severity"] == "WARNING"
    assert line["connection_id"] == "z"
    assert "refresh_token" in line["warning"]


def test_a_blank_refresh_token_from_a_rotating_provider_is_an_ambiguous_failure() -> None:
    connection = Connection(
        id="o",
        profile="okta",
        grant=GrantType.REFRESH_TOKEN,
        client_id="c",
        params={"domain": "acme.okta.com"},
    )
    credential = Credential(refresh_token=Secret("rt-old"), client_secret=Secret("cs"))
    answer = _resp(200, {"access_token": "at-new", "expires_in": 3600, "refresh_token": ""})
    with pytest.raises(errors.MalformedResponse) as caught:
        asyncio.run(acquire(Answering(answer), connection, PROFILES["okta"], credential, NOW))
    assert caught.value.ambiguous is True
    assert caught.value.refresh_token is None
