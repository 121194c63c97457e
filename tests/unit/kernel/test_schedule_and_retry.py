"""When refreshes are due, and how retries back off."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta

import pytest

from tokenbroker.kernel.clock import FakeClock
from tokenbroker.kernel.errors import InvalidGrant, ProviderServerError, TemporarilyUnavailable
from tokenbroker.kernel.retry import RetryPolicy, call_with_retries
from tokenbroker.kernel.schedule import RefreshPolicy

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_one_hour_token_refreshes_around_half_life_with_jitter_earlier_only() -> None:
    policy = RefreshPolicy()
    rng = random.Random(1)
    times = [policy.next_refresh_at(T0, T0 + timedelta(hours=1), rng) for _ in range(500)]
    assert max(times) <= T0 + timedelta(minutes=30)
    assert min(times) >= T0 + timedelta(minutes=25)  # jitter capped at 5 minutes
    assert len(set(times)) > 400  # spread, not a stampede


def test_never_later_than_min_lead_before_expiry() -> None:
    policy = RefreshPolicy(overlap_fraction=0.1, min_lead=timedelta(minutes=10), jitter_fraction=0)
    due = policy.next_refresh_at(T0, T0 + timedelta(hours=1))
    assert due == T0 + timedelta(minutes=50)


def test_short_lived_tokens_do_not_refresh_in_a_loop() -> None:
    policy = RefreshPolicy(jitter_fraction=0)
    due = policy.next_refresh_at(T0, T0 + timedelta(seconds=60))
    assert T0 < due < T0 + timedelta(seconds=60)
    assert due >= T0 + timedelta(seconds=3)


def test_failure_backoff_grows_and_honours_retry_after() -> None:
    policy = RefreshPolicy()
    rng = random.Random(3)
    first = policy.retry_at(T0, 1, rng=rng) - T0
    fifth = policy.retry_at(T0, 5, rng=rng) - T0
    huge = policy.retry_at(T0, 50, rng=rng) - T0
    assert timedelta(seconds=15) <= first <= timedelta(seconds=30)
    assert fifth > first
    assert huge <= timedelta(minutes=15)
    assert policy.retry_at(T0, 1, retry_after=600, rng=rng) - T0 >= timedelta(seconds=600)


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="overlap"):
        RefreshPolicy(overlap_fraction=1.5)


def _flaky(errors: list[Exception]):  # type: ignore[no-untyped-def]
    calls = {"n": 0}

    async def op() -> str:
        calls["n"] += 1
        if errors:
            raise errors.pop(0)
        return "ok"

    return op, calls


def test_retries_transient_then_succeeds() -> None:
    clock = FakeClock()
    op, calls = _flaky([ProviderServerError("x"), ProviderServerError("y")])
    result, attempts = asyncio.run(
        call_with_retries(op, RetryPolicy(attempts=3), clock, random.Random(0))
    )
    assert (result, attempts, calls["n"]) == ("ok", 3, 3)
    assert len(clock.sleeps) == 2
    assert all(0 <= s <= 8 for s in clock.sleeps)


def test_permanent_errors_are_not_retried() -> None:
    clock = FakeClock()
    op, calls = _flaky([InvalidGrant("no")])
    with pytest.raises(InvalidGrant) as caught:
        asyncio.run(call_with_retries(op, RetryPolicy(attempts=5), clock, random.Random(0)))
    assert calls["n"] == 1
    assert caught.value.attempts == 1
    assert clock.sleeps == []


def test_bounded_attempts_and_retry_after() -> None:
    clock = FakeClock()
    op, calls = _flaky([TemporarilyUnavailable("busy", retry_after=4)] * 10)
    with pytest.raises(TemporarilyUnavailable) as caught:
        asyncio.run(call_with_retries(op, RetryPolicy(attempts=3), clock, random.Random(0)))
    assert calls["n"] == 3
    assert caught.value.attempts == 3
    assert clock.sleeps == [4, 4]


def test_retry_after_longer_than_cap_stops_now() -> None:
    clock = FakeClock()
    op, calls = _flaky([TemporarilyUnavailable("busy", retry_after=3600)])
    with pytest.raises(TemporarilyUnavailable):
        asyncio.run(call_with_retries(op, RetryPolicy(attempts=3), clock, random.Random(0)))
    assert calls["n"] == 1
