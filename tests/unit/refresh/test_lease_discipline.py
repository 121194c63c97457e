"""Lease discipline (issue 8, item 4): a refresh token is presented only by the lease holder,
with the guard left, after a fenced renewal before every attempt; lease time is the store's;
an ambiguous answer for a rotating token is never retried with the same token; a refresh
token in a rejected answer is kept.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import pytest

from tests.unit.refresh.test_tick import World
from tokenbroker.adapters.fake_provider import FakeTokenServer
from tokenbroker.adapters.memory import MemoryEventBus, MemorySecretStore, MemoryStateStore
from tokenbroker.entrypoints.settings import Settings
from tokenbroker.kernel.clock import FakeClock
from tokenbroker.kernel.errors import (
    ConfigError,
    MalformedResponse,
    StoreUnavailable,
    TransportError,
)
from tokenbroker.kernel.http import HttpResponse
from tokenbroker.kernel.model import ConnectionStatus, GrantType, Lease
from tokenbroker.kernel.retry import RetryPolicy
from tokenbroker.kernel.secret import Secret
from tokenbroker.oauth.profiles import ProviderProfile, load_profiles
from tokenbroker.refresh.registry import ConnectionRegistry
from tokenbroker.refresh.tick import DEFAULT_LEASE_TTL, Refresher

TTL = timedelta(seconds=20)
GUARD = timedelta(seconds=5)


class Journal:
    """One ordered record of what the store and the provider saw."""

    def __init__(self) -> None:
        self.entries: list[str] = []


class JournaledState(MemoryStateStore):
    def __init__(self, clock: FakeClock, journal: Journal) -> None:
        super().__init__(clock)
        self.journal = journal
        self.on_renew: Callable[[], None] | None = None
        self.renew_fails = False

    def renew(
        self, leases: Sequence[Lease], *, ttl: timedelta, intents: Any = None
    ) -> list[Lease | None]:
        self.journal.entries.append("renew")
        if self.renew_fails:
            raise StoreUnavailable("state store down")
        if self.on_renew is not None:
            self.on_renew()
        return super().renew(leases, ttl=ttl, intents=intents)


class JournaledEndpoint:
    def __init__(self, server: FakeTokenServer, journal: Journal) -> None:
        self.server = server
        self.journal = journal

    async def post_form(
        self, url: str, form: Mapping[str, str], *, headers: Mapping[str, str]
    ) -> HttpResponse:
        self.journal.entries.append("request")
        return await self.server.post_form(url, form, headers=headers)


class HookedClock(FakeClock):
    """A fake clock that runs ``on_sleep`` after each sleep (another party acting while the
    refresher waits out a Retry-After)."""

    def __init__(self) -> None:
        super().__init__()
        self.on_sleep: Callable[[], None] | None = None

    async def sleep(self, seconds: float) -> None:
        await super().sleep(seconds)
        if self.on_sleep is not None:
            self.on_sleep()


class LeaseWorld(World):
    def __init__(self) -> None:
        super().__init__()
        self.clock = HookedClock()
        self.journal = Journal()
        self.state = JournaledState(self.clock, self.journal)  # type: ignore[assignment]
        self.registry = ConnectionRegistry(
            secrets=self.secrets, state=self.state, profiles=self.profiles, clock=self.clock
        )
        self.endpoint = JournaledEndpoint(self.server, self.journal)

    def refresher(self, **kw: Any) -> Refresher:
        kw.setdefault("lease_ttl", TTL)
        kw.setdefault("lease_guard", GUARD)
        return super().refresher(**kw)

    def run(self, refresher: Refresher | None = None, **kw: Any):  # type: ignore[no-untyped-def]
        return asyncio.run((refresher or self.refresher()).tick(self.endpoint, **kw))  # type: ignore[arg-type]


@pytest.fixture
def lw() -> LeaseWorld:
    return LeaseWorld()


# --- renew before every attempt ------------------------------------------------------------


def test_the_lease_is_renewed_before_every_attempt_retries_included(lw: LeaseWorld) -> None:
    lw.add()
    lw.server.script = [
        HttpResponse(429, b"", {"retry-after": "12"}),
        HttpResponse(503, b""),
    ]
    summary = lw.run(lw.refresher(retry=RetryPolicy(attempts=3)))
    assert summary.refreshed == 1
    requests = [n for n, e in enumerate(lw.journal.entries) if e == "request"]
    assert len(requests) == 3
    for n in requests:  # each request right after a renewal
        assert lw.journal.entries[n - 1] == "renew"


def test_a_retry_never_presents_after_the_lease_was_taken_over(lw: LeaseWorld) -> None:
    """The issue's case: a 429 with Retry-After longer than the lease; meanwhile another
    refresher took the (expired) lease and used the token. The first must not re-send."""
    lw.add()
    lw.server.script = [HttpResponse(429, b"", {"retry-after": "25"})]
    other: list[str] = []

    def another_refresher_takes_over() -> None:
        taken = lw.state.claim(["c1"], lw.clock.now(), holder="other", ttl=TTL)
        other.extend(c.lease.connection_id for c in taken.claims)

    lw.clock.on_sleep = another_refresher_takes_over
    summary = lw.run(lw.refresher(retry=RetryPolicy(attempts=3, max_retry_after=60)))
    assert other == ["c1"]  # the lease had expired by the store's clock: taken over
    assert lw.server.requests["refresh_token"] == 1  # and nothing was sent again
    assert summary.lease_lost == 1
    assert summary.refreshed == 0


def test_too_little_lease_left_defers_without_sending(lw: LeaseWorld) -> None:
    lw.add()
    # The renewal takes so long that less than the guard is surely left when it returns.
    lw.state.on_renew = lambda: lw.clock.advance((TTL - GUARD).total_seconds() + 1)
    summary = lw.run()
    assert lw.server.requests["refresh_token"] == 0
    assert summary.deferred == 1
    lw.state.on_renew = None
    assert lw.state.claim(["c1"], lw.clock.now(), holder="x", ttl=TTL).claims  # given back


def test_a_lease_store_outage_stops_presenting_and_is_not_a_skip(lw: LeaseWorld) -> None:
    for n in range(3):
        lw.add(f"c{n}")
    lw.state.renew_fails = True
    refresher = lw.refresher(store_retry=RetryPolicy(attempts=2, base_delay=0.01))
    with pytest.raises(StoreUnavailable):
        lw.run(refresher)
    assert lw.server.requests["refresh_token"] == 0
    assert {lw.secrets.get(f"c{n}").version for n in range(3)} == {1}


def test_the_guard_must_be_shorter_than_the_lease() -> None:
    world = World()
    with pytest.raises(ConfigError):
        world.refresher(lease_ttl=timedelta(seconds=10), lease_guard=timedelta(seconds=10))


# --- lease time is the store's -------------------------------------------------------------


class SkewedClock(FakeClock):
    """A refresher's own clock, ``offset`` seconds off the store's."""

    def __init__(self, store_clock: FakeClock, offset: float) -> None:
        super().__init__()
        self._store_clock = store_clock
        self._offset = timedelta(seconds=offset)

    def now(self) -> datetime:
        return self._store_clock.now() + self._offset


class GatedEndpoint:
    """Holds the first request on the wire until released."""

    def __init__(self, server: FakeTokenServer) -> None:
        self.server = server
        self.sent = asyncio.Event()
        self.go = asyncio.Event()

    async def post_form(
        self, url: str, form: Mapping[str, str], *, headers: Mapping[str, str]
    ) -> HttpResponse:
        self.sent.set()
        await self.go.wait()
        return await self.server.post_form(url, form, headers=headers)


@pytest.mark.parametrize("offset", [120, -120, 3600])
def test_a_refresher_with_a_stepped_clock_cannot_steal_a_live_lease(offset: float) -> None:
    world = World()
    world.add("c1")
    lease = timedelta(seconds=60)
    holder = world.refresher(lease_ttl=lease, holder="a")
    skewed = Refresher(
        secrets=world.secrets, state=world.state, events=world.events, profiles=world.profiles,
        clock=SkewedClock(world.clock, offset), lease_ttl=lease, holder="b",
    )  # fmt: skip

    async def scenario() -> tuple[Any, Any]:
        gated = GatedEndpoint(world.server)
        first = asyncio.create_task(holder.tick(gated))  # type: ignore[arg-type]
        await gated.sent.wait()  # the refresh token is on the wire
        try:
            return await skewed.tick(world.server), None
        finally:
            gated.go.set()
            await first

    summary, _ = asyncio.run(scenario())
    assert summary.claimed == 0
    assert world.server.requests["refresh_token"] == 1  # only the holder's
    stored = world.secrets.get("c1")
    assert stored.version == 2
    assert world.server.grant_alive(stored.credential.refresh_token.reveal())  # type: ignore[union-attr]


def test_a_crashed_holders_leases_come_free_in_seconds() -> None:
    """A holder that dies leaves leases that expire after the short TTL, by the store's clock
    (issue 8: they stayed leased for the 5-minute TTL)."""
    assert timedelta(0) < DEFAULT_LEASE_TTL <= timedelta(seconds=30)
    assert Settings().lease_ttl_seconds <= 30
    world = World()
    world.add("c1")
    crashed = world.state.claim(["c1"], world.clock.now(), holder="dead", ttl=DEFAULT_LEASE_TTL)
    assert crashed.claims
    world.clock.advance(DEFAULT_LEASE_TTL.total_seconds())
    assert world.tick().refreshed == 1


def test_the_heartbeat_keeps_a_slow_requests_lease() -> None:
    """Real time: a request slower than the whole lease keeps it, renewed by heartbeat, so
    nobody can take the connection over while the token is on the wire."""
    secrets, state, events = MemorySecretStore(), MemoryStateStore(), MemoryEventBus()
    server = FakeTokenServer(latency=2.5)
    profiles = load_profiles()
    from tokenbroker.kernel.clock import SystemClock

    registry = ConnectionRegistry(
        secrets=secrets, state=state, profiles=profiles, clock=SystemClock()
    )
    world = World()
    world.server = server
    world.secrets, world.state, world.registry = secrets, state, registry  # type: ignore[assignment]
    world.add("c1")
    refresher = Refresher(
        secrets=secrets, state=state, events=events, profiles=profiles,
        lease_ttl=timedelta(seconds=1.5), lease_guard=timedelta(seconds=0.5),
    )  # fmt: skip
    from tokenbroker.kernel.clock import SystemClock as Real

    async def scenario() -> tuple[int, Any]:
        tick = asyncio.create_task(refresher.tick(server))
        await asyncio.sleep(2.0)  # past the lease's first expiry, request still on the wire
        batch = await asyncio.to_thread(
            state.claim, ["c1"], Real().now(), holder="thief", ttl=timedelta(seconds=60)
        )
        return batch.leased_elsewhere, await tick

    leased_elsewhere, summary = asyncio.run(scenario())
    assert leased_elsewhere == 1
    assert summary.refreshed == 1
    assert summary.lease_lost == 0


# --- ambiguous answers and salvaged tokens -------------------------------------------------

AMBIGUOUS: dict[str, Callable[[], HttpResponse | Exception]] = {
    "timeout after sending": lambda: TransportError("read timed out"),
    "reset mid-answer": lambda: TransportError("ServerDisconnectedError"),
    "a gateway's 502": lambda: HttpResponse(502, b"<html>Bad Gateway</html>"),
    "a gateway's 504": lambda: HttpResponse(504, b""),
    "HTML 200": lambda: HttpResponse(200, b"<html>maintenance</html>"),
    "200 rejected": lambda: HttpResponse(
        200, json.dumps({"access_token": "at", "expires_in": 0}).encode()
    ),
}


@pytest.mark.parametrize("answer", list(AMBIGUOUS))
def test_an_ambiguous_answer_for_a_rotating_token_is_not_retried(world: World, answer: str) -> None:
    world.add()
    world.server.script = [AMBIGUOUS[answer]() for _ in range(3)]
    summary = world.tick(world.refresher(retry=RetryPolicy(attempts=3)))
    assert world.server.requests["refresh_token"] == 1
    assert summary.retries == 0
    assert summary.unknown_outcome == 1
    assert summary.failed["transient"] == 1
    assert world.secrets.get("c1").version == 1
    assert world.state.get("c1").state.status is ConnectionStatus.ACTIVE


def _google_connection(world: World) -> None:
    record = world.state.get("c1")
    world.state.delete("c1")
    world.state.create(replace(record.connection, profile="google"), record.state)


def test_ambiguous_answers_are_retried_when_the_provider_does_not_rotate(world: World) -> None:
    world.add()
    _google_connection(world)  # rotates_refresh_tokens = false
    world.server.script = [TransportError("read timed out"), HttpResponse(200, b"<html>")]
    summary = world.tick(world.refresher(retry=RetryPolicy(attempts=3)))
    assert world.server.requests["refresh_token"] == 3
    assert summary.refreshed == 1


def test_a_request_that_was_never_sent_is_retried_even_for_a_rotating_token(world: World) -> None:
    world.add()
    world.server.script = [TransportError("connection refused", ambiguous=False)]
    summary = world.tick(world.refresher(retry=RetryPolicy(attempts=3)))
    assert world.server.requests["refresh_token"] == 2
    assert summary.refreshed == 1
    assert summary.unknown_outcome == 0


class RejectingEndpoint:
    """The provider rotates (the token sent is consumed), but the answer is rejected with
    its new refresh token attached, as the token-response parser reports it."""

    def __init__(self, server: FakeTokenServer) -> None:
        self.server = server
        self.reject = True

    async def post_form(
        self, url: str, form: Mapping[str, str], *, headers: Mapping[str, str]
    ) -> HttpResponse:
        answer = await self.server.post_form(url, form, headers=headers)
        if not self.reject:
            return answer
        self.reject = False
        body = json.loads(answer.body)
        raise MalformedResponse(
            "token endpoint answered HTTP 200 with a value out of bounds",
            status=200,
            refresh_token=Secret(body["refresh_token"]),
        )


def test_a_refresh_token_in_a_rejected_200_is_kept(world: World) -> None:
    old = world.add()
    before = world.secrets.get("c1").credential
    endpoint = RejectingEndpoint(world.server)
    summary = asyncio.run(world.refresher().tick(endpoint))  # type: ignore[arg-type]
    assert summary.salvaged == 1
    assert summary.failed["transient"] == 1
    stored = world.secrets.get("c1")
    assert stored.version == 2
    assert stored.credential.refresh_token is not None
    assert stored.credential.refresh_token != Secret(old)
    assert world.server.grant_alive(stored.credential.refresh_token.reveal())
    assert stored.credential.access_token == before.access_token  # nothing new to serve
    state = world.state.get("c1").state
    assert (state.current_version, state.last_error) == (2, "malformed_response")
    # The next refresh presents the kept token: no reuse, the grant survives.
    world.clock.advance(3600)
    assert asyncio.run(world.refresher().tick(endpoint)).refreshed == 1  # type: ignore[arg-type]
    assert world.server.grant_alive(world.secrets.get("c1").credential.refresh_token.reveal())  # type: ignore[union-attr]


def test_a_rotated_token_survives_a_bug_after_the_answer(world: World) -> None:
    world.profiles = {
        **world.profiles,
        "huge": ProviderProfile(
            name="huge", grants=(GrantType.REFRESH_TOKEN,), default_lifetime_seconds=10**12
        ),
    }
    old = world.add()
    record = world.state.get("c1")
    world.state.delete("c1")
    world.state.create(replace(record.connection, profile="huge"), record.state)
    world.server.lifetime = None  # type: ignore[assignment]  # no expires_in: the huge default
    summary = world.tick()
    assert summary.failed["internal"] == 1
    stored = world.secrets.get("c1").credential.refresh_token
    assert stored is not None and stored != Secret(old)
    assert world.server.grant_alive(stored.reveal())


# --- a bounded number of answers at risk ---------------------------------------------------


def test_no_more_than_max_at_risk_refreshes_wait_for_a_slow_store(world: World) -> None:
    for n in range(8):
        world.add(f"c{n}")
    gate = threading.Event()
    seen: list[int] = []
    inner = world.secrets

    class SlowSecrets:
        def __getattr__(self, name: str) -> Any:
            return getattr(inner, name)

        def stage(self, writes: Any) -> Any:  # where an answer becomes durable
            seen.append(world.server.requests["refresh_token"])
            gate.wait(10)
            return inner.stage(writes)

    world.secrets = SlowSecrets()  # type: ignore[assignment]
    world.server.latency = 0.01
    refresher = world.refresher(concurrency=8, max_at_risk=2, commit_batch=1)

    async def scenario() -> Any:
        tick = asyncio.create_task(refresher.tick(world.server))
        await asyncio.sleep(0.3)
        presented = world.server.requests["refresh_token"]
        gate.set()
        return presented, await tick

    presented, summary = asyncio.run(scenario())
    assert presented == 2  # the store is stuck: presenting paused at the bound
    assert summary.refreshed == 8


class ErrorWithTokensEndpoint:
    """The provider rotates, and answers 200 with its tokens *and* an ``error`` member (the
    fault suite's ``error_200_with_tokens``): the real parser classifies it."""

    def __init__(self, server: FakeTokenServer, error: str) -> None:
        self.server = server
        self.error = error
        self.once = True

    async def post_form(
        self, url: str, form: Mapping[str, str], *, headers: Mapping[str, str]
    ) -> HttpResponse:
        answer = await self.server.post_form(url, form, headers=headers)
        if not self.once:
            return answer
        self.once = False
        body = {**json.loads(answer.body), "error": self.error}
        return HttpResponse(200, json.dumps(body).encode(), {"content-type": "application/json"})


@pytest.mark.parametrize("error", ["server_error", "temporarily_unavailable", "invalid_grant"])
def test_a_refresh_token_in_a_200_carrying_an_error_is_kept(world: World, error: str) -> None:
    """Found by the fault suite: the parser kept the rotated token on the error
    (``ProviderError.refresh_token``), but the tick salvaged only from a MalformedResponse, so
    the consumed token stayed stored and its next presentation revoked the grant."""
    old = world.add()
    endpoint = ErrorWithTokensEndpoint(world.server, error)
    summary = asyncio.run(world.refresher().tick(endpoint))  # type: ignore[arg-type]
    assert summary.salvaged == 1
    stored = world.secrets.get("c1")
    assert stored.version == 2
    assert stored.credential.refresh_token not in (None, Secret(old))
    assert stored.credential.refresh_token is not None
    assert world.server.grant_alive(stored.credential.refresh_token.reveal())
    assert world.state.get("c1").state.current_version == 2  # the state points at it too
    world.clock.advance(3600)
    world.state.put_state(
        "c1", replace(world.state.get("c1").state, status=ConnectionStatus.ACTIVE)
    )
    assert world.tick(connection_ids=["c1"]).refreshed == 1  # the kept token works
