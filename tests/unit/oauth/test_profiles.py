"""Provider profiles as data: the token-endpoint budget a profile declares."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from tokenbroker.kernel.errors import ConfigError
from tokenbroker.kernel.model import GrantType
from tokenbroker.oauth.profiles import (
    BudgetScope,
    TokenBudget,
    load_profiles,
    parse_profile,
)
from tokenbroker.ports import MAX_BUDGET_LIMIT, MAX_BUDGET_WINDOW


def _profile(budget: object) -> dict[str, object]:
    return {"grants": ["refresh_token"], "budget": budget}


def test_zoho_declares_its_documented_access_token_limit_per_refresh_token() -> None:
    """ "Using a refresh token, your app can create up to ten access tokens in a span of ten
    minutes" (https://www.zoho.com/accounts/protocol/oauth/web-apps/access-token-expiry.html)."""
    zoho = load_profiles()["zoho"]
    assert zoho.budget == TokenBudget(
        per=BudgetScope.REFRESH_TOKEN, limit=10, window=timedelta(minutes=10)
    )


@pytest.mark.parametrize("name", ["generic", "google"])
def test_profiles_without_a_documented_limit_declare_no_budget(name: str) -> None:
    assert load_profiles()[name].budget is None


@pytest.mark.parametrize("per", list(BudgetScope))
def test_a_budget_table_is_parsed(per: BudgetScope) -> None:
    profile = parse_profile(
        "p", _profile({"per": per.value, "limit": 7, "window_seconds": 90}), "profiles.p"
    )
    assert profile.budget == TokenBudget(per=per, limit=7, window=timedelta(seconds=90))
    assert profile.grants == (GrantType.REFRESH_TOKEN,)


@pytest.mark.parametrize(
    ("budget", "field"),
    [
        ("10 per 10 minutes", "profiles.p.budget"),
        ({"per": "refresh_token", "limit": 10}, "profiles.p.budget.window_seconds"),
        ({"limit": 10, "window_seconds": 600}, "profiles.p.budget.per"),
        ({"per": "user", "limit": 10, "window_seconds": 600}, "profiles.p.budget.per"),
        ({"per": "client", "limit": 0, "window_seconds": 600}, "profiles.p.budget.limit"),
        ({"per": "client", "limit": -3, "window_seconds": 600}, "profiles.p.budget.limit"),
        ({"per": "client", "limit": 1.5, "window_seconds": 600}, "profiles.p.budget.limit"),
        ({"per": "client", "limit": True, "window_seconds": 600}, "profiles.p.budget.limit"),
        (
            {"per": "client", "limit": MAX_BUDGET_LIMIT + 1, "window_seconds": 600},
            "profiles.p.budget.limit",
        ),
        ({"per": "client", "limit": 10, "window_seconds": 0}, "profiles.p.budget.window_seconds"),
        (
            {
                "per": "client",
                "limit": 10,
                "window_seconds": int(MAX_BUDGET_WINDOW.total_seconds()) + 1,
            },
            "profiles.p.budget.window_seconds",
        ),
        (
            {"per": "client", "limit": 10, "window_seconds": float("inf")},
            "profiles.p.budget.window_seconds",
        ),
        (
            {"per": "client", "limit": 10, "window_seconds": 600, "burst": 2},
            "profiles.p.budget.burst",
        ),
    ],
)
def test_a_bad_budget_is_refused_naming_the_field(budget: object, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_profile("p", _profile(budget), "profiles.p")


def test_an_operator_profiles_file_can_set_or_change_a_budget(tmp_path: Path) -> None:
    extra = tmp_path / "profiles.toml"
    extra.write_text(
        '[acme]\ngrants = ["refresh_token"]\ntoken_url = "https://acme.example/token"\n'
        '[acme.budget]\nper = "endpoint"\nlimit = 100\nwindow_seconds = 60\n'
    )
    acme = load_profiles(extra)["acme"]
    assert acme.budget == TokenBudget(BudgetScope.ENDPOINT, 100, timedelta(minutes=1))
