"""The refresh tick on in-memory adapters and the strict fake provider."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import timedelta

import pytest

from tokenbroker.adapters.fake_provider import FakeTokenServer
from tokenbroker.adapters.memory import MemoryEventBus, MemorySecretStore, MemoryStateStore
from tokenbroker.kernel.clock import FakeClock
from tokenbroker.kernel.errors import StoreUnavailable, TransportError
from tokenbroker.kernel.http import HttpResponse
from tokenbroker.kernel.model import (
    Connection,
    ConnectionStatus,
    Credential,
    EventType,
    GrantType,
)
from tokenbroker.kernel.retry import RetryPolicy
from tokenbroker.kernel.secret import Secret
from tokenbroker.oauth.profiles import load_profiles
from tokenbroker.refresh.registry import ConnectionRegistry
from tokenbroker.refresh.tick import Refresher


class World:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.secrets = MemorySecretStore()
        self.state = MemoryStateStore(self.clock)  # the store's lease clock: the fake one
        self.events = MemoryEventBus()
        self.profiles = load_profiles()
        self.server = FakeTokenServer()
        self.registry = ConnectionRegistry(
            secrets=self.secrets, state=self.state, profiles=self.profiles, clock=self.clock
        )

    def refresher(self, **kw: object) -> Refresher:
        return Refresher(
            secrets=self.secrets,
            state=self.state,
            events=self.events,
            profiles=self.profiles,
            clock=self.clock,
            rng=random.Random(7),
            **kw,  # type: ignore[arg-type]
        )

    def add(self, cid: str = "c1") -> str:
        rt = self.server.seed_refresh_token()
        self.registry.register(
            Connection(
                id=cid,
                profile="generic",
                grant=GrantType.REFRESH_TOKEN,
                client_id="client",
                token_url="https://idp.test/token",
            ),
            Credential(refresh_token=Secret(rt), client_secret=Secret("client-secret")),
        )
        return rt

    def tick(self, refresher: Refresher | None = None, **kw: object):  # type: ignore[no-untyped-def]
        return asyncio.run((refresher or self.refresher()).tick(self.server, **kw))  # type: ignore[arg-type]


@pytest.fixture
def world() -> World:
    return World()


def test_rotation_stores_new_refresh_token_and_never_reuses_old(world: World) -> None:
    old = world.add()
    summary = world.tick()
    assert summary.refreshed == 1
    assert summary.ok
    stored = world.secrets.get("c1")
    assert stored.version == 2
    assert stored.credential.refresh_token is not None
    new = stored.credential.refresh_token.reveal()
    assert new != old
    assert world.server.grant_alive(new)
    # A forced second refresh uses the new token; the grant survives (no reuse detected).
    summary = world.tick(connection_ids=["c1"])
    assert summary.refreshed == 1
    assert world.server.requests["refresh_token"] == 2
    assert world.server.grant_alive(world.secrets.get("c1").credential.refresh_token.reveal())  # type: ignore[union-attr]


def test_not_due_connections_are_left_alone(world: World) -> None:
    world.add()
    world.tick()
    summary = world.tick()
    assert summary.due == 0
    assert world.server.requests["refresh_token"] == 1
    record = world.state.get("c1")
    assert record.state.next_refresh_at is not None
    # Due once the clock passes next_refresh_at, ahead of expiry.
    assert record.state.expires_at is not None
    assert record.state.next_refresh_at < record.state.expires_at
    world.clock.advance((record.state.next_refresh_at - world.clock.now()).total_seconds() + 1)
    assert world.tick().refreshed == 1


def test_response_without_refresh_token_keeps_the_old_one(world: World) -> None:
    world.server.rotate = False
    old = world.add()
    world.tick()
    stored = world.secrets.get("c1").credential
    assert stored.refresh_token == Secret(old)
    assert stored.access_token is not None


def test_revoked_grant_needs_reauth_with_one_event_and_no_retries(world: World) -> None:
    rt = world.add()
    world.server.revoke(rt)
    summary = world.tick()
    assert summary.needs_reauth == 1
    assert summary.failed["permanent"] == 1
    assert summary.retries == 0
    assert world.server.requests["refresh_token"] == 1
    record = world.state.get("c1")
    assert record.state.status is ConnectionStatus.NEEDS_REAUTH
    assert record.state.last_error == "invalid_grant"
    assert [e.type for e in world.events.events] == [EventType.NEEDS_REAUTH]
    # The stored credential is untouched and no further tick tries it.
    assert world.secrets.get("c1").version == 1
    world.clock.advance(3600)
    assert world.tick().due == 0


def test_the_needs_reauth_line_names_the_command_that_recovers_it(world: World) -> None:
    """Issue 12: back from needs_reauth in one step -- the line says how."""
    import json

    from tokenbroker.kernel.log import capture_logs

    world.server.revoke(world.add())
    with capture_logs("info") as log:
        world.tick()
    lines = [json.loads(x) for x in log.getvalue().splitlines()]
    (line,) = [x for x in lines if x["message"].startswith("refresh failed (permanent)")]
    assert line["next_step"] == "tokenbroker authorize c1"
    assert line["severity"] == "ERROR"


def test_forcing_a_connection_that_needs_reauth_sends_nothing_and_announces_nothing(
    world: World,
) -> None:
    """Status is law (issue 8): the dead refresh token is never presented again; only a
    re-authorisation makes the connection refreshable."""
    rt = world.add()
    world.server.revoke(rt)
    world.tick()
    summary = world.tick(connection_ids=["c1"])
    assert world.server.requests["refresh_token"] == 1
    assert summary.inactive == {"c1": "needs_reauth"}
    assert summary.needs_reauth == 0
    record = world.state.get("c1")
    assert record.state.status is ConnectionStatus.NEEDS_REAUTH
    assert record.state.consecutive_failures == 1
    assert [e.type for e in world.events.events] == [EventType.NEEDS_REAUTH]


def test_transient_failures_retry_with_backoff_then_report(world: World) -> None:
    world.add()
    world.server.script = [
        HttpResponse(503, b"", {"retry-after": "2"}),
        # Never delivered, so safe to retry even with a rotating refresh token (a timeout
        # after sending is not: see test_lease_discipline.py).
        TransportError("connection refused", ambiguous=False),
        HttpResponse(500, b"oops"),
    ]
    summary = world.tick(world.refresher(retry=RetryPolicy(attempts=3)))
    assert summary.failed["transient"] == 1
    assert summary.retries == 2
    assert world.server.requests["refresh_token"] == 3
    assert world.clock.sleeps[0] >= 2  # Retry-After honoured
    record = world.state.get("c1")
    assert record.state.status is ConnectionStatus.ACTIVE
    assert record.state.consecutive_failures == 1
    assert world.secrets.get("c1").version == 1
    assert [e.type for e in world.events.events] == [EventType.REFRESH_FAILED]
    # Next tick after the backoff succeeds and announces the recovery.
    world.clock.advance(3600)
    summary = world.tick()
    assert summary.refreshed == 1
    assert summary.recovered == 1
    assert world.state.get("c1").state.consecutive_failures == 0
    assert [e.type for e in world.events.events][-2:] == [EventType.ROTATED, EventType.RECOVERED]


def test_consecutive_failures_are_counted(world: World) -> None:
    world.add()
    for expected in (1, 2, 3):
        world.server.script = [HttpResponse(502, b"")] * 3
        world.tick(world.refresher(retry=RetryPolicy(attempts=3)))
        assert world.state.get("c1").state.consecutive_failures == expected
        world.clock.advance(3600)


def test_error_carrying_200_is_not_stored(world: World) -> None:
    world.add()
    world.server.script = [HttpResponse(200, json.dumps({"error": "invalid_grant"}).encode())]
    summary = world.tick()
    assert summary.needs_reauth == 1
    assert world.secrets.get("c1").version == 1


def test_malformed_200_is_not_stored_and_is_transient(world: World) -> None:
    world.add()
    world.server.script = [HttpResponse(200, b"<html>maintenance</html>")]
    summary = world.tick(world.refresher(retry=RetryPolicy(attempts=1)))
    assert summary.failed["transient"] == 1
    assert world.secrets.get("c1").version == 1
    assert world.state.get("c1").state.last_error == "malformed_response"


def test_leased_connections_are_skipped(world: World) -> None:
    world.add()
    other = world.state.claim(["c1"], world.clock.now(), holder="other", ttl=timedelta(minutes=5))
    assert len(other.claims) == 1
    summary = world.tick()
    assert summary.skipped_leased == 1
    assert summary.claimed == 0
    assert world.server.requests["refresh_token"] == 0


def test_stale_holder_cannot_commit(world: World) -> None:
    world.add()
    now = world.clock.now()
    first = world.state.claim(["c1"], now, holder="a", ttl=timedelta(minutes=1)).claims[0]
    world.clock.advance(120)  # the store's clock: the first lease has expired
    later = world.clock.now()
    second = world.state.claim(["c1"], later, holder="b", ttl=timedelta(minutes=1)).claims[0]
    assert second.lease.token > first.lease.token
    record = world.state.get("c1")
    assert world.state.complete([(first.lease, record.state)]) == [False]
    assert world.state.complete([(second.lease, record.state)]) == [True]


def test_summary_and_events_carry_no_token_material(world: World) -> None:
    world.add()
    world.tick()
    rendered = json.dumps([e.to_json() for e in world.events.events])
    for token in world.server.issued:
        assert token not in rendered


def test_many_connections_in_one_tick(world: World) -> None:
    for i in range(300):
        world.add(f"c{i}")
    summary = world.tick(world.refresher(concurrency=32, commit_batch=50))
    assert summary.refreshed == 300
    assert len([e for e in world.events.events if e.type is EventType.ROTATED]) == 300
    assert {world.secrets.get(f"c{i}").version for i in range(300)} == {2}


class FlakyStore:
    """Wraps a store; its named methods fail ``failures`` times with a retryable error."""

    def __init__(self, inner: object, methods: set[str], failures: int) -> None:
        self._inner = inner
        self._methods = methods
        self.failures = failures

    def __getattr__(self, name: str) -> object:
        attr = getattr(self._inner, name)
        if name not in self._methods:
            return attr

        def flaky(*args: object, **kwargs: object) -> object:
            if self.failures:
                self.failures -= 1
                raise StoreUnavailable(f"{name} down")
            return attr(*args, **kwargs)

        return flaky


def test_store_hiccups_are_retried_and_nothing_is_lost(world: World) -> None:
    for i in range(5):
        world.add(f"c{i}")
    world.secrets = FlakyStore(world.secrets, {"stage", "promote"}, failures=2)  # type: ignore[assignment]
    summary = world.tick(world.refresher(commit_batch=1))
    assert summary.refreshed == 5
    assert summary.ok
    assert {world.secrets.get(f"c{i}").version for i in range(5)} == {2}


def test_when_commits_fail_for_good_no_more_refresh_tokens_are_sent(world: World) -> None:
    for i in range(20):
        world.add(f"c{i}")
    world.secrets = FlakyStore(world.secrets, {"stage", "promote"}, failures=10**6)  # type: ignore[assignment]
    world.server.latency = 0.002  # a real network round trip lets the committer run
    refresher = world.refresher(concurrency=2, commit_batch=1)
    with pytest.raises(StoreUnavailable):
        world.tick(refresher)
    # Only what was already in flight when the first commit failed was sent, not all 20.
    assert world.server.requests["refresh_token"] <= 6
    # Nothing half-written: every stored credential is still the registered one.
    assert {world.secrets.get(f"c{i}").version for i in range(20)} == {1}


def test_unpublished_events_are_parked_and_relayed_next_tick(world: World) -> None:
    world.add("c1")
    world.events = FlakyStore(world.events, {"publish"}, failures=10**6)  # type: ignore[assignment]
    summary = world.tick()
    assert summary.refreshed == 1
    assert summary.events_parked == 1
    assert world.secrets.get("c1").version == 2  # the credential is committed regardless
    assert [e.type for e in world.state.parked_events(10)] == [EventType.ROTATED]
    world.events.failures = 0  # type: ignore[attr-defined]
    summary = world.tick()
    assert summary.events_relayed == 1
    assert world.state.parked_events(10) == []
    assert [e.type for e in world.events._inner.events] == [EventType.ROTATED]  # type: ignore[attr-defined]


def test_the_needs_reauth_event_carries_the_command_and_no_other_event_does(world: World) -> None:
    """Issue 12 item 5: a subscriber (or a person paged by one) learns how to recover."""
    from tokenbroker.kernel.model import ConnectionEvent

    world.tick()  # nothing yet
    rt = world.add()
    world.add("c2")
    world.tick()
    world.server.revoke(world.secrets.get("c1").credential.refresh_token.reveal())
    world.clock.advance(3600)
    world.tick()
    by_type = {e.type: e for e in world.events.events}
    assert by_type[EventType.NEEDS_REAUTH].next_step == "tokenbroker authorize c1"
    assert by_type[EventType.NEEDS_REAUTH].to_json()["next_step"] == "tokenbroker authorize c1"
    assert (
        ConnectionEvent.from_json(by_type[EventType.NEEDS_REAUTH].to_json())
        == (by_type[EventType.NEEDS_REAUTH])
    )
    others = [e for e in world.events.events if e.type is not EventType.NEEDS_REAUTH]
    assert others and all(e.next_step is None for e in others)
    assert rt  # the first refresh token was rotated away before the revocation


@pytest.mark.parametrize(
    ("grant", "command"),
    [
        (GrantType.REFRESH_TOKEN, "tokenbroker authorize x1"),
        (GrantType.CLIENT_CREDENTIALS, "tokenbroker reauth x1 --client-secret-file FILE"),
        (GrantType.JWT_BEARER, "tokenbroker reauth x1 --service-account-key-file FILE"),
        (GrantType.IMPERSONATION, "tokenbroker show x1"),
        (GrantType.STATIC, "tokenbroker show x1"),
    ],
)
def test_every_grant_has_a_recovery_step_that_the_cli_knows(grant: GrantType, command: str) -> None:
    from tokenbroker.entrypoints.cli import main
    from tokenbroker.kernel.model import recovery_step

    assert recovery_step("x1", grant) == command
    words = command.split()
    assert main.commands[words[1]] is not None  # the command exists
    options = {o for p in main.commands[words[1]].params for o in getattr(p, "opts", [])}
    assert all(w in options for w in words[3:] if w.startswith("--"))
