"""The tick spends token-endpoint budgets through the state store (issue 8, item 8).

Before this, ``refresh/budget.py`` decided keys and deferrals but the tick never called
``StateStore.take_budget``: a Zoho connection was refreshed as often as anything made it due,
past the documented ten per ten minutes per refresh token.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from tests.unit.refresh.test_tick import World
from tokenbroker.adapters.memory import MemoryStateStore
from tokenbroker.kernel.errors import StoreUnavailable, TransportError
from tokenbroker.kernel.log import capture_logs
from tokenbroker.kernel.model import ConnectionStatus, EventType
from tokenbroker.kernel.retry import RetryPolicy
from tokenbroker.oauth.profiles import BudgetScope, TokenEndpointBudget
from tokenbroker.ports import BudgetDecision


def budgeted(world: World, requests: int, per_seconds: int, scope: BudgetScope) -> None:
    """Give the ``generic`` profile (the world's connections use it) a budget."""
    profiles = dict(world.profiles)
    profiles["generic"] = replace(
        profiles["generic"],
        budget=TokenEndpointBudget(requests=requests, per_seconds=per_seconds, scope=scope),
    )
    world.profiles = profiles


def test_a_spent_budget_defers_the_rest_sending_nothing_and_failing_nothing(
    world: World,
) -> None:
    budgeted(world, 2, 600, BudgetScope.TOKEN_ENDPOINT)
    for n in range(5):
        world.add(f"c{n}")
    sent_before = world.server.requests["refresh_token"]
    summary = world.tick()
    assert world.server.requests["refresh_token"] - sent_before == 2
    assert summary.refreshed == 2
    assert (summary.deferred, summary.over_budget, summary.over_budget_at_risk) == (3, 3, 0)
    assert sum(summary.failed.values()) == 0
    assert summary.ok
    deferred = [r for r in world.state.list() if r.state.current_version == 1]
    assert len(deferred) == 3
    now = world.clock.now()
    for record in deferred:
        # Not failed: active, no error, no failure counted; due when the slot frees.
        assert record.state.status is ConnectionStatus.ACTIVE
        assert (record.state.consecutive_failures, record.state.last_error) == (0, None)
        assert record.state.next_refresh_at is not None
        assert now + timedelta(seconds=590) <= record.state.next_refresh_at
        assert record.state.next_refresh_at <= now + timedelta(seconds=601)
    # Their leases were given back with the state.
    assert world.tick().due == 0
    assert not [e for e in world.events.events if e.type is not EventType.ROTATED]
    # Once the window slides on, the deferred ones go through.
    world.clock.advance(601)
    later = world.tick()
    assert later.refreshed == 2 and later.over_budget == 1


def test_refreshers_on_one_store_share_the_budget(world: World) -> None:
    """Two refreshers (two processes, two function instances) on one state store: the budget
    is the store's, so together they send no more than it allows."""
    budgeted(world, 3, 600, BudgetScope.TOKEN_ENDPOINT)
    for n in range(6):
        world.add(f"c{n}")
    before = world.server.requests["refresh_token"]
    one, two = world.refresher(holder="one"), world.refresher(holder="two")
    first = world.tick(one, connection_ids=["c0", "c1", "c2", "c3"])
    second = world.tick(two, connection_ids=["c4", "c5"])
    assert world.server.requests["refresh_token"] - before == 3
    assert (first.refreshed, first.over_budget) == (3, 1)
    assert (second.refreshed, second.over_budget) == (0, 2)


def test_every_request_sent_counts_retries_included(world: World) -> None:
    """A retried request is another request to the provider: it takes another slot."""
    budgeted(world, 2, 600, BudgetScope.TOKEN_ENDPOINT)
    world.add("c0")
    world.server.script = [TransportError("connection refused", ambiguous=False)]
    summary = world.tick(world.refresher(retry=RetryPolicy(attempts=3, base_delay=0)))
    # Attempt 1: refused; attempt 2: succeeds. Two slots spent; a third would be denied.
    assert summary.refreshed == 1
    assert summary.retries == 1
    decision = world.state.take_budget(
        _only_key(world), limit=2, window=timedelta(seconds=600), now=world.clock.now()
    )
    assert not decision.granted


def _only_key(world: World) -> str:
    keys = list(world.state._budgets)
    assert len(keys) == 1
    return keys[0]


def test_a_slot_that_frees_only_after_the_last_safe_moment_is_at_risk_and_alerted(
    world: World,
) -> None:
    world.add("c0")
    world.add("c1")
    assert world.tick().refreshed == 2  # no budget yet: both tokens now last an hour
    budgeted(world, 1, 86_400, BudgetScope.TOKEN_ENDPOINT)
    with capture_logs(level="info") as logs:
        summary = world.tick(connection_ids=["c0", "c1"])
    assert summary.over_budget == 1 and summary.over_budget_at_risk == 1
    assert not summary.failed
    lines = [line for line in logs.getvalue().splitlines() if "last safe moment" in line]
    assert len(lines) == 1 and '"severity": "ERROR"' in lines[0]
    record = next(r for r in world.state.list() if r.state.current_version == 2)
    assert record.state.expires_at is not None and record.state.next_refresh_at is not None
    # Tried again at the last safe moment, not a day later.
    assert record.state.next_refresh_at <= record.state.expires_at - timedelta(minutes=2)


class NoBudget(MemoryStateStore):
    def take_budget(self, *_: object, **__: object) -> BudgetDecision:
        raise StoreUnavailable("budget store down", retryable=False)


def test_a_budget_that_cannot_be_read_sends_nothing_and_halts(world: World) -> None:
    """Not knowing the budget is never a grant: nothing is presented, the tick fails loudly,
    and the connections are left as they were for the next tick."""
    world.state = NoBudget(world.clock)
    world.registry = replace_registry(world)
    budgeted(world, 5, 600, BudgetScope.TOKEN_ENDPOINT)
    world.add("c0")
    world.clock.advance(3600)  # due
    before = world.server.requests["refresh_token"]
    with pytest.raises(StoreUnavailable):
        world.tick()
    assert world.server.requests["refresh_token"] == before
    record = world.state.get("c0")
    assert record.state.status is ConnectionStatus.ACTIVE
    assert record.state.intent is None  # nothing presented, so no unknown outcome either


def replace_registry(world: World):  # type: ignore[no-untyped-def]
    from tokenbroker.refresh.registry import ConnectionRegistry

    return ConnectionRegistry(
        secrets=world.secrets, state=world.state, profiles=world.profiles, clock=world.clock
    )


def test_the_budget_key_is_taken_per_refresh_token(world: World) -> None:
    """Zoho's limit is per refresh token: two connections with their own tokens do not share
    a budget of one."""
    budgeted(world, 1, 600, BudgetScope.REFRESH_TOKEN)
    world.add("c0")
    world.add("c1")
    summary = world.tick(connection_ids=["c0", "c1"])
    assert (summary.refreshed, summary.over_budget) == (2, 0)
    again = world.tick(connection_ids=["c0", "c1"])  # new tokens: new keys, fresh budgets
    assert (again.refreshed, again.over_budget) == (2, 0)
