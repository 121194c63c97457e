"""Durable as soon as answered; unknown outcomes recovered, not re-presented blindly (issue 8,
items 2 and 3).

A crash is a ``Crash`` (a ``BaseException``, as ``tests/unit/refresh/test_registry.py`` does):
no ``except Exception`` sees it, so the refresher's own bookkeeping after the crash point never
runs for that connection. Whatever the stores hold at that point is what a SIGKILL leaves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.unit.refresh.test_isolation import EmbeddedWorld
from tests.unit.refresh.test_tick import World
from tokenbroker.adapters.embedded import EmbeddedRefreshCommitter, refresh_committer
from tokenbroker.adapters.fake_provider import FakeTokenServer
from tokenbroker.kernel.errors import TransportError
from tokenbroker.kernel.http import HttpResponse
from tokenbroker.kernel.model import ConnectionStatus, EventType, GrantType
from tokenbroker.oauth.profiles import ProviderProfile
from tokenbroker.refresh.tick import DEFAULT_LEASE_TTL
from tokenbroker.refresh.transitions import LAST_CHANCE


class Crash(BaseException):
    """Stands for SIGKILL: nothing after it runs, no ``except Exception`` sees it."""


class Dying:
    """A token endpoint in front of the fake server that dies at a chosen point."""

    def __init__(self, server: FakeTokenServer, *, after_provider: bool) -> None:
        self.server = server
        self.after_provider = after_provider  # the provider processed (rotated) before we died

    async def post_form(
        self, url: str, form: Mapping[str, str], *, headers: Mapping[str, str]
    ) -> HttpResponse:
        if self.after_provider:
            await self.server.post_form(url, form, headers=headers)  # the answer is lost
        raise Crash


def _crash(world: World, endpoint: Any) -> None:
    with pytest.raises(Crash):
        asyncio.run(world.refresher().tick(endpoint, connection_ids=["c1"]))


def _after_lease_expiry(world: World) -> None:
    world.clock.advance(DEFAULT_LEASE_TTL.total_seconds())  # the dead holder's lease frees


def _refreshed_once(world: World, cid: str = "c1") -> None:
    """Registered and refreshed once: an access token valid for an hour is being served."""
    world.add(cid)
    assert world.tick(connection_ids=[cid]).refreshed == 1


# --- the intent, and what the next holder does with it --------------------------------------


def test_an_intent_is_durable_before_a_rotating_token_is_presented(world: World) -> None:
    _refreshed_once(world)
    _crash(world, Dying(world.server, after_provider=False))
    intent = world.state.get("c1").state.intent
    assert intent is not None
    assert intent.from_version == 2
    assert intent.attempt and intent.at is not None


def test_no_intent_is_recorded_for_a_provider_that_does_not_rotate(world: World) -> None:
    world.add("c1")
    record = world.state.get("c1")
    world.state.delete("c1")
    world.state.create(replace(record.connection, profile="google"), record.state)
    _crash(world, Dying(world.server, after_provider=False))
    assert world.state.get("c1").state.intent is None


def test_after_a_crash_in_flight_the_token_is_not_presented_again_straight_away(
    world: World,
) -> None:
    """The answer may have rotated the token: the next holder serves the still-valid access
    token, marks the connection at risk (one event) and presents only at the last chance."""
    _refreshed_once(world)
    access = world.secrets.get("c1").credential
    _crash(world, Dying(world.server, after_provider=True))
    sent = world.server.requests["refresh_token"]
    _after_lease_expiry(world)
    summary = world.tick(connection_ids=["c1"])
    assert world.server.requests["refresh_token"] == sent  # nothing presented
    assert summary.at_risk == 1
    state = world.state.get("c1").state
    assert state.at_risk and state.status is ConnectionStatus.ACTIVE
    assert access.expires_at is not None
    assert state.next_refresh_at == access.expires_at - LAST_CHANCE
    assert world.secrets.get("c1").credential == access  # still served meanwhile
    at_risk = [e for e in world.events.events if e.type is EventType.AT_RISK]
    assert len(at_risk) == 1
    # Ticks before the last chance leave it alone and announce nothing more.
    world.clock.advance(600)
    assert world.tick().due == 0
    assert world.tick(connection_ids=["c1"]).at_risk == 1
    assert len([e for e in world.events.events if e.type is EventType.AT_RISK]) == 1
    assert world.server.requests["refresh_token"] == sent


def test_at_the_last_chance_a_token_that_was_never_consumed_recovers(world: World) -> None:
    _refreshed_once(world)
    _crash(world, Dying(world.server, after_provider=False))  # died before sending
    _after_lease_expiry(world)
    world.tick(connection_ids=["c1"])  # at risk
    due = world.state.get("c1").state.next_refresh_at
    assert due is not None
    world.clock.advance((due - world.clock.now()).total_seconds())
    summary = world.tick()
    assert summary.refreshed == 1
    assert summary.recovered == 1
    state = world.state.get("c1").state
    assert (state.at_risk, state.intent, state.status) == (False, None, ConnectionStatus.ACTIVE)


def test_at_the_last_chance_a_consumed_token_needs_reauth(world: World) -> None:
    """The one loss the protocol cannot avoid without a reuse-grace window: the answer was
    on the wire when the refresher died. Consumers kept working until the access token's
    last minutes; then the operator is told."""
    _refreshed_once(world)
    _crash(world, Dying(world.server, after_provider=True))
    _after_lease_expiry(world)
    world.tick(connection_ids=["c1"])
    due = world.state.get("c1").state.next_refresh_at
    assert due is not None
    world.clock.advance((due - world.clock.now()).total_seconds())
    summary = world.tick()
    assert summary.needs_reauth == 1
    assert world.state.get("c1").state.status is ConnectionStatus.NEEDS_REAUTH


def _grace_profile(world: World, seconds: int) -> None:
    world.profiles = {
        **world.profiles,
        "graceful": ProviderProfile(
            name="graceful",
            grants=(GrantType.REFRESH_TOKEN,),
            refresh_token_reuse_grace_seconds=seconds,
        ),
    }
    record = world.state.get("c1")
    world.state.delete("c1")
    world.state.create(replace(record.connection, profile="graceful"), record.state)


def test_within_a_reuse_grace_window_an_unknown_outcome_is_retried_to_recover(
    world: World,
) -> None:
    _refreshed_once(world)
    _grace_profile(world, 120)
    world.server.script = [TransportError("read timed out")]  # the answer never came
    summary = world.tick(connection_ids=["c1"])
    assert summary.unknown_outcome == 1
    state = world.state.get("c1").state
    assert state.intent is not None and not state.at_risk
    assert state.next_refresh_at is not None
    assert state.next_refresh_at - world.clock.now() <= timedelta(seconds=60)
    world.clock.advance((state.next_refresh_at - world.clock.now()).total_seconds())
    assert world.tick().refreshed == 1  # retried inside the window


def test_an_ambiguous_answer_without_grace_puts_the_connection_at_risk_at_once(
    world: World,
) -> None:
    _refreshed_once(world)
    world.server.script = [TransportError("read timed out")]
    summary = world.tick(connection_ids=["c1"])
    assert summary.unknown_outcome == 1
    assert summary.at_risk == 1
    state = world.state.get("c1").state
    assert state.at_risk and state.consecutive_failures == 1
    assert state.last_error == "transport_error"


# --- answers are durable the moment they arrive ----------------------------------------------


class DieOn:
    """Wraps a store; the named method dies (``Crash``) instead of running."""

    def __init__(self, inner: Any, method: str, *, after: bool = False) -> None:
        self._inner = inner
        self._method = method
        self._after = after  # run it first, then die (the call landed, nothing after it ran)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name != self._method:
            return attr

        def dying(*args: Any, **kwargs: Any) -> Any:
            if self._after:
                attr(*args, **kwargs)
            raise Crash

        return dying


def _die(world: World, store: str, method: str, *, after: bool = False) -> Callable[[], None]:
    inner = getattr(world, store)
    setattr(world, store, DieOn(inner, method, after=after))

    def restore() -> None:
        setattr(world, store, inner)

    return restore


def test_a_crash_after_the_answer_was_staged_loses_nothing(world: World) -> None:
    _refreshed_once(world)
    world.clock.advance(3600)
    restore = _die(world, "secrets", "promote")  # staged, then the process dies
    with pytest.raises(Crash):
        world.tick()
    restore()
    sent = world.server.requests["refresh_token"]
    _after_lease_expiry(world)
    summary = world.tick(connection_ids=["c1"])
    assert world.server.requests["refresh_token"] == sent  # nothing presented again
    assert summary.refreshed == 1  # the staged answer, committed
    assert summary.settled == 1
    stored = world.secrets.get("c1")
    assert stored.version == 3
    assert world.server.grant_alive(stored.credential.refresh_token.reveal())  # type: ignore[union-attr]
    state = world.state.get("c1").state
    assert (state.current_version, state.intent, state.at_risk) == (3, None, False)
    assert [e.version for e in world.events.events if e.type is EventType.ROTATED] == [2, 3]


def test_a_crash_between_the_commit_and_the_publish_loses_no_event(world: World) -> None:
    world.add("c1")
    restore = _die(world, "events", "publish")
    with pytest.raises(Crash):
        world.tick()
    restore()
    assert world.state.get("c1").state.current_version == 2  # committed
    assert world.events.events == []
    summary = world.tick()
    assert summary.events_relayed == 1
    assert [(e.type, e.version) for e in world.events.events] == [(EventType.ROTATED, 2)]


@pytest.mark.parametrize("point", ["stage", "promote"])
def test_every_crash_point_after_the_answer_keeps_the_grant(world: World, point: str) -> None:
    for n in range(5):
        world.add(f"c{n}")
    restore = _die(world, "secrets", point, after=True)
    with pytest.raises(Crash):
        world.tick()
    restore()
    _after_lease_expiry(world)
    world.tick()
    world.clock.advance(3600)
    world.tick()
    for n in range(5):
        stored = world.secrets.get(f"c{n}").credential.refresh_token
        assert stored is not None and world.server.grant_alive(stored.reveal()), f"c{n}"


# --- embedded: the fencing token in the same transaction as the credential write ------------


def test_the_embedded_stores_commit_in_one_transaction(tmp_path: Path) -> None:
    world = EmbeddedWorld(tmp_path)
    try:
        committer = refresh_committer(world.secrets, world.state)
        assert isinstance(committer, EmbeddedRefreshCommitter)
        rt = world.add("c1")

        class Disabling:
            """The operator disables the connection while its refresh is in flight."""

            async def post_form(self, url: str, form: Any, *, headers: Any) -> Any:
                answer = await world.server.post_form(url, form, headers=headers)
                world.registry.set_enabled("c1", False)
                return answer

        refresher = world.refresher(committer=committer)
        summary = asyncio.run(refresher.tick(Disabling()))  # type: ignore[arg-type]
        assert summary.lease_lost == 1
        assert world.state.get("c1").state.status is ConnectionStatus.DISABLED  # not undone
        # Fenced out, so not promoted in that commit -- but staged, and a read settles it:
        # the rotated token is never lost.
        stored = world.secrets.get("c1")
        assert stored.version == 2
        assert stored.credential.refresh_token is not None
        assert stored.credential.refresh_token.reveal() != rt
        assert world.server.grant_alive(stored.credential.refresh_token.reveal())
    finally:
        world.db.close()
