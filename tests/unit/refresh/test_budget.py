"""Token-endpoint budgets, the pure half: which budget a refresh spends, and what a denial
does to the connection. Exact cases first, then seeded-random states and denials checked
against what must hold for every one of them; last, the rules over a real store's decisions."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from tokenbroker.adapters.memory import MemoryStateStore
from tokenbroker.kernel.log import capture_logs, get_logger
from tokenbroker.kernel.model import (
    Connection,
    ConnectionStatus,
    Credential,
    GrantType,
    RefreshState,
)
from tokenbroker.kernel.secret import Secret
from tokenbroker.oauth.profiles import (
    BudgetScope,
    ProviderProfile,
    TokenEndpointBudget,
    load_profiles,
)
from tokenbroker.ports import BudgetDecision
from tokenbroker.refresh.budget import (
    DEFAULT_LAST_SAFE_LEAD,
    DEFAULT_RETRY_FLOOR,
    BudgetDeferral,
    BudgetRequest,
    DeferralKind,
    budget_request,
    defer,
    report,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
PROFILES = load_profiles()
ZOHO = PROFILES["zoho"]
RT = "1000.86a03ca5dbfccb7445b1889b8215efb0.cad9e1ae4989a1196fe05aa729fcb4e1"


def _zoho(cid: str = "crm-eu", data_centre: str = "eu", client_id: str = "1000.ABC") -> Connection:
    return Connection(
        id=cid,
        profile="zoho",
        grant=GrantType.REFRESH_TOKEN,
        client_id=client_id,
        params={"data_centre": data_centre},
    )


def _credential(refresh_token: str | None = RT) -> Credential:
    return Credential(
        refresh_token=None if refresh_token is None else Secret(refresh_token),
        client_secret=Secret("client-secret"),
    )


def _per(scope: BudgetScope, limit: int = 10) -> ProviderProfile:
    return replace(ZOHO, budget=TokenEndpointBudget(limit, 600, scope))


def _key(connection: Connection, scope: BudgetScope, refresh_token: str | None = RT) -> str:
    request = budget_request(connection, _per(scope), _credential(refresh_token))
    assert request is not None
    return request.key


EXPIRES = NOW + timedelta(minutes=40)
HEALTHY = RefreshState(
    status=ConnectionStatus.ACTIVE,
    expires_at=EXPIRES,
    next_refresh_at=NOW,
    last_refresh_at=NOW - timedelta(minutes=20),
    last_attempt_at=NOW - timedelta(minutes=20),
    consecutive_failures=0,
    current_version=4,
    last_error=None,
)
REQUEST = BudgetRequest(
    key="refresh_token:x", scope=BudgetScope.REFRESH_TOKEN, limit=10, window=timedelta(minutes=10)
)


def _denied(frees_at: datetime) -> BudgetDecision:
    return BudgetDecision(granted=False, used=10, frees_at=frees_at)


# --- which budget a refresh spends ---------------------------------------------------------


def test_zoho_spends_one_slot_of_its_refresh_tokens_budget_within_ten_per_ten_minutes() -> None:
    """Zoho documents 10 access tokens per refresh token per 10 minutes; the profile keeps
    headroom below it (8), so a request spent on an answer lost in transit still fits."""
    request = budget_request(_zoho(), ZOHO, _credential())
    assert request is not None
    assert (request.scope, request.window, request.cost) == (
        BudgetScope.REFRESH_TOKEN,
        timedelta(minutes=10),
        1,
    )
    assert 1 <= request.limit <= 10


def test_a_profile_without_a_budget_spends_none() -> None:
    generic = Connection(
        id="g", profile="generic", grant=GrantType.REFRESH_TOKEN, token_url="https://idp/t"
    )
    assert budget_request(generic, PROFILES["generic"], _credential()) is None


def test_the_refresh_token_key_follows_the_token_not_the_connection() -> None:
    """Zoho counts per refresh token: two connections registered with one token share its
    budget, and a re-authorisation (a new token) starts a fresh one."""
    a, b = _zoho("a"), _zoho("b", client_id="other")
    assert _key(a, BudgetScope.REFRESH_TOKEN) == _key(b, BudgetScope.REFRESH_TOKEN)
    assert _key(a, BudgetScope.REFRESH_TOKEN) != _key(a, BudgetScope.REFRESH_TOKEN, RT + "x")


def test_the_key_never_carries_the_refresh_token_or_its_fingerprint() -> None:
    key = _key(_zoho(), BudgetScope.REFRESH_TOKEN)
    fingerprint = Secret(RT).fingerprint.removeprefix("sha256:")
    for fragment in [RT, *RT.split("."), fingerprint]:
        assert fragment not in key


def test_a_refresh_token_budget_without_a_refresh_token_is_the_connections() -> None:
    assert _key(_zoho("a"), BudgetScope.REFRESH_TOKEN, None) != _key(
        _zoho("b"), BudgetScope.REFRESH_TOKEN, None
    )
    assert _key(_zoho("a"), BudgetScope.REFRESH_TOKEN, None) == _key(
        _zoho("a"), BudgetScope.REFRESH_TOKEN, None
    )


def test_the_client_key_is_per_client_and_per_data_centre() -> None:
    key = _key(_zoho("a", "eu", "1000.ABC"), BudgetScope.CLIENT, "rt-1")
    assert key == _key(_zoho("b", "eu", "1000.ABC"), BudgetScope.CLIENT, "rt-2")
    assert key != _key(_zoho("a", "eu", "1000.XYZ"), BudgetScope.CLIENT)
    assert key != _key(_zoho("a", "us", "1000.ABC"), BudgetScope.CLIENT)


def test_the_endpoint_key_is_one_per_data_centre_whoever_calls() -> None:
    key = _key(_zoho("a", "eu", "1000.ABC"), BudgetScope.TOKEN_ENDPOINT, "rt-1")
    assert key == _key(_zoho("b", "eu", "1000.XYZ"), BudgetScope.TOKEN_ENDPOINT, "rt-2")
    assert key != _key(_zoho("a", "in"), BudgetScope.TOKEN_ENDPOINT)
    # The same endpoint spelled with another case in its host is the same endpoint.
    shouting = replace(_zoho("c"), token_url="HTTPS://ACCOUNTS.ZOHO.EU/oauth/v2/token")
    assert _key(shouting, BudgetScope.TOKEN_ENDPOINT) == key


def test_scopes_never_share_a_key() -> None:
    keys = {_key(_zoho(), scope) for scope in BudgetScope}
    assert len(keys) == len(BudgetScope)


def test_keys_fit_every_store() -> None:
    long_id = replace(_zoho(), client_id="c" * 5000)
    for scope in BudgetScope:
        assert len(_key(long_id, scope, "r" * 100_000)) <= 64


# --- what a denial does ----------------------------------------------------------------


def test_a_denial_defers_the_refresh_to_when_the_slot_frees() -> None:
    frees_at = NOW + timedelta(minutes=7)
    deferral = defer(HEALTHY, REQUEST, _denied(frees_at), NOW)
    assert deferral.kind is DeferralKind.DEFERRED
    assert deferral.state == replace(HEALTHY, next_refresh_at=frees_at)
    assert deferral.frees_at == frees_at
    assert deferral.last_safe_at == EXPIRES - DEFAULT_LAST_SAFE_LEAD


def test_a_deferral_is_never_a_failure() -> None:
    """Nothing was sent: no failure is counted, no error recorded, the status stays."""
    troubled = replace(HEALTHY, consecutive_failures=3, last_error="temporarily_unavailable")
    deferral = defer(troubled, REQUEST, _denied(NOW + timedelta(minutes=1)), NOW)
    assert deferral.state.status is ConnectionStatus.ACTIVE
    assert deferral.state.consecutive_failures == 3
    assert deferral.state.last_error == "temporarily_unavailable"
    assert deferral.state.last_attempt_at == troubled.last_attempt_at


def test_a_slot_freeing_exactly_at_the_last_safe_moment_is_in_time() -> None:
    last_safe = EXPIRES - DEFAULT_LAST_SAFE_LEAD
    assert defer(HEALTHY, REQUEST, _denied(last_safe), NOW).kind is DeferralKind.DEFERRED
    late = defer(HEALTHY, REQUEST, _denied(last_safe + timedelta(microseconds=1)), NOW)
    assert late.kind is DeferralKind.AT_RISK


def test_a_budget_past_the_last_safe_moment_is_at_risk_and_keeps_the_last_safe_moment() -> None:
    """Never later than the last safe moment: the refresh is tried again then (a slot may
    have been freed by raising the limit), and said loudly until it succeeds."""
    frees_at = EXPIRES + timedelta(minutes=5)
    deferral = defer(HEALTHY, REQUEST, _denied(frees_at), NOW)
    assert deferral.kind is DeferralKind.AT_RISK
    assert deferral.state.next_refresh_at == deferral.last_safe_at
    assert deferral.state.status is ConnectionStatus.ACTIVE


def test_past_the_last_safe_moment_it_retries_at_a_bounded_pace_not_every_tick() -> None:
    expired_soon = replace(HEALTHY, expires_at=NOW + timedelta(seconds=30))
    deferral = defer(expired_soon, REQUEST, _denied(NOW + timedelta(minutes=9)), NOW)
    assert deferral.kind is DeferralKind.AT_RISK
    assert deferral.state.next_refresh_at == NOW + DEFAULT_RETRY_FLOOR
    # ... but never later than the slot itself frees.
    soon = defer(expired_soon, REQUEST, _denied(NOW + timedelta(seconds=40)), NOW)
    assert soon.state.next_refresh_at == NOW + timedelta(seconds=40)


def test_an_unknown_expiry_has_no_last_safe_moment() -> None:
    unknown = replace(HEALTHY, expires_at=None)
    deferral = defer(unknown, REQUEST, _denied(NOW + timedelta(days=3)), NOW)
    assert (deferral.kind, deferral.last_safe_at) == (DeferralKind.DEFERRED, None)
    assert deferral.state.next_refresh_at == NOW + timedelta(days=3)


def test_a_store_answer_in_the_past_cannot_make_a_busy_loop() -> None:
    deferral = defer(HEALTHY, REQUEST, _denied(NOW - timedelta(hours=1)), NOW)
    assert deferral.state.next_refresh_at is not None
    assert deferral.state.next_refresh_at > NOW


@pytest.mark.parametrize(
    "decision",
    [BudgetDecision(granted=True, used=1), BudgetDecision(granted=False, used=10, frees_at=None)],
)
def test_only_a_denial_with_a_time_can_be_deferred(decision: BudgetDecision) -> None:
    with pytest.raises(ValueError, match="denial"):
        defer(HEALTHY, REQUEST, decision, NOW)


def test_random_states_and_denials_keep_the_rules() -> None:
    rng = random.Random(8)
    for _ in range(5000):
        expires = None if rng.random() < 0.1 else NOW + timedelta(seconds=rng.uniform(-3600, 7200))
        state = replace(
            HEALTHY,
            expires_at=expires,
            consecutive_failures=rng.randrange(5),
            last_error=rng.choice([None, "temporarily_unavailable"]),
        )
        frees_at = NOW + timedelta(seconds=rng.uniform(-60, 4 * 3600))
        lead = timedelta(seconds=rng.uniform(0, 600))
        deferral = defer(state, REQUEST, _denied(frees_at), NOW, last_safe_lead=lead)
        nxt = deferral.state.next_refresh_at
        assert nxt is not None and nxt > NOW  # never due again at once
        assert nxt <= max(deferral.frees_at, NOW + timedelta(seconds=1))
        assert replace(deferral.state, next_refresh_at=state.next_refresh_at) == state
        if deferral.kind is DeferralKind.DEFERRED:
            assert nxt == deferral.frees_at
            assert deferral.last_safe_at is None or deferral.frees_at <= deferral.last_safe_at
        else:
            assert deferral.last_safe_at is not None
            assert deferral.frees_at > deferral.last_safe_at
            assert nxt <= max(deferral.last_safe_at, NOW + DEFAULT_RETRY_FLOOR)


# --- saying it --------------------------------------------------------------------------


def _logged(deferral: BudgetDeferral) -> dict[str, object]:
    with capture_logs("debug") as out:
        report(deferral, "crm-eu", get_logger(component="test"))
    (line,) = out.getvalue().splitlines()
    entry: dict[str, object] = json.loads(line)
    return entry


def test_a_deferral_in_time_is_reported_quietly() -> None:
    entry = _logged(defer(HEALTHY, REQUEST, _denied(NOW + timedelta(minutes=3)), NOW))
    assert entry["severity"] == "INFO"
    assert entry["connection_id"] == "crm-eu"
    assert entry["outcome"] == "deferred"
    assert entry["budget_scope"] == "refresh_token"
    assert entry["next_refresh_at"] == "2026-03-01T12:03:00Z"


def test_a_budget_past_the_last_safe_moment_is_reported_as_an_error() -> None:
    frees_at = EXPIRES + timedelta(minutes=5)
    entry = _logged(defer(HEALTHY, REQUEST, _denied(frees_at), NOW))
    assert entry["severity"] == "ERROR"
    assert entry["outcome"] == "at_risk"
    assert entry["connection_id"] == "crm-eu"
    assert entry["frees_at"] == "2026-03-01T12:45:00Z"
    assert entry["expires_at"] == "2026-03-01T12:40:00Z"
    assert entry["next_refresh_at"] == "2026-03-01T12:38:00Z"  # the last safe moment
    assert REQUEST.key not in json.dumps(entry)


# --- the rules over a real store ----------------------------------------------------------


def test_zoho_refreshes_past_the_budget_in_ten_minutes_defer_to_the_first_ones_end() -> None:
    store = MemoryStateStore()
    request = budget_request(_zoho(), ZOHO, _credential())
    assert request is not None
    decisions = [
        store.take_budget(
            request.key,
            limit=request.limit,
            window=request.window,
            now=NOW + timedelta(seconds=n),
            cost=request.cost,
        )
        for n in range(request.limit + 1)
    ]
    assert [d.granted for d in decisions] == [True] * request.limit + [False]
    deferral = defer(HEALTHY, request, decisions[-1], NOW + timedelta(seconds=request.limit))
    assert deferral.kind is DeferralKind.DEFERRED
    assert deferral.state.next_refresh_at == NOW + timedelta(minutes=10)
