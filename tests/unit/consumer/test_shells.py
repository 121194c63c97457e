"""The same scenario through both shells: identical outcomes.

Each scenario runs twice, on a fresh world (FakeClock, in-process broker, same seed): once with
:class:`BrokerClient` (threads) and once with :class:`AsyncBrokerClient` (asyncio, one loop for
the whole scenario). Its steps assert the documented behaviour, and it returns a trace -- every
call's outcome, each request the broker saw, every back-off the clock was asked for, the
breaker's state -- that must be equal for the two shells, down to the jittered delays.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
import pytest

from tests.unit.consumer.fakes import MARGIN, REFRESH_AFTER, URL, FakeBroker, IdTokens, refusal
from tokenbroker.consumer import (
    AsyncBrokerClient,
    BreakerState,
    BrokerClient,
    BrokerRequestError,
    BrokerToken,
    BrokerUnavailable,
)
from tokenbroker.kernel.clock import FakeClock
from tokenbroker.kernel.errors import TokenBrokerError


@dataclass
class World:
    """One shell, its broker and its clock; ``call`` records each outcome in ``trace``."""

    shell: str
    clock: FakeClock = field(default_factory=FakeClock)
    ids: IdTokens = field(default_factory=IdTokens)
    trace: list[tuple[Any, ...]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.broker = FakeBroker(self.clock)
        self.runner = asyncio.Runner()
        self._client: BrokerClient | AsyncBrokerClient | None = None

    def build(self, **options: Any) -> None:
        common: dict[str, Any] = {
            "clock": self.clock,
            "id_token_source": self.ids,
            "rng": random.Random(7),
            "transport": httpx.MockTransport(self.broker),
        }
        kind = BrokerClient if self.shell == "sync" else AsyncBrokerClient
        self._client = kind(URL, **{**common, **options})

    @property
    def client(self) -> BrokerClient | AsyncBrokerClient:
        if self._client is None:
            self.build()
        assert self._client is not None
        return self._client

    def call(self, connection: str = "c") -> BrokerToken | TokenBrokerError:
        """``token(connection)`` through this world's shell; the token or the error."""
        client = self.client
        try:
            if isinstance(client, BrokerClient):
                token = client.token(connection)
            else:
                token = self.runner.run(client.token(connection))
        except TokenBrokerError as error:
            self.trace.append(_outcome(error))
            return error
        self.trace.append(("token", self.broker.issued.index(token.access_token.reveal())))
        return token

    def summary(self) -> tuple[Any, ...]:
        """Everything both shells must agree on, beyond each call's outcome."""
        return (
            tuple(self.trace),
            tuple(tuple(sorted(body.items())) for body in _bodies(self.broker)),
            tuple(self.broker.auth_headers()),
            tuple(self.clock.sleeps),
            self.client.breaker_state,
        )

    def close(self) -> None:
        client = self.client
        if isinstance(client, BrokerClient):
            client.close()
        else:
            self.runner.run(client.aclose())
        self.runner.close()


def _outcome(error: TokenBrokerError) -> tuple[Any, ...]:
    if isinstance(error, BrokerUnavailable):
        return ("unavailable", error.reason.value, error.status, error.retry_after)
    if isinstance(error, BrokerRequestError):
        return (type(error).__name__, error.status, error.error)
    return (type(error).__name__,)


def _bodies(broker: FakeBroker) -> list[dict[str, Any]]:
    return [{k: str(v) for k, v in body.items()} for body in broker.bodies()]


def fresh_hit(world: World) -> None:
    first = world.call()
    world.clock.advance(REFRESH_AFTER - 1)
    assert world.call() is first
    assert len(world.broker.requests) == 1


def stale_served_during_an_outage(world: World) -> None:
    first = world.call()
    world.clock.advance(REFRESH_AFTER + 1)
    world.broker.down = True
    for _ in range(20):
        assert world.call() is first  # at once: one attempt, then the back-off holds
        world.clock.advance(7)
    assert world.clock.sleeps == []
    assert 2 <= len(world.broker.requests) < 10


def refused_after_hard_expiry(world: World) -> None:
    first = world.call()
    assert isinstance(first, BrokerToken)
    world.clock.advance(REFRESH_AFTER + 1)
    world.broker.down = True
    assert world.call() is first
    world.clock.advance((first.expires_at - world.clock.now()).total_seconds() - MARGIN - 1)
    assert world.call() is first  # one second before the margin: still served
    world.clock.advance(1)
    error = world.call()
    assert isinstance(error, BrokerUnavailable)
    world.broker.down = False
    world.clock.advance(31)
    assert world.call() is not first  # recovers


def refusal_evicts(world: World) -> None:
    world.call()
    world.clock.advance(REFRESH_AFTER + 1)
    world.broker.script = [refusal(403, "access_denied")]
    assert isinstance(world.call(), BrokerRequestError)
    world.broker.down = True
    assert isinstance(world.call(), BrokerUnavailable)  # not the evicted token


def breaker_opens_and_half_opens(world: World) -> None:
    world.build(breaker_threshold=3, breaker_reset_seconds=30)
    world.broker.down = True
    world.call("a")  # three faults: open
    assert world.client.breaker_state is BreakerState.OPEN
    sent = len(world.broker.requests)
    error = world.call("b")
    assert isinstance(error, BrokerUnavailable) and error.reason.value == "circuit_open"
    assert len(world.broker.requests) == sent
    world.clock.advance(30)
    world.call("b")  # the half-open trial fails: open again
    assert len(world.broker.requests) == sent + 1
    assert world.client.breaker_state is BreakerState.OPEN
    world.clock.advance(30)
    world.broker.down = False
    assert isinstance(world.call("b"), BrokerToken)  # the trial succeeds
    assert world.client.breaker_state is BreakerState.CLOSED


def retry_after_honoured(world: World) -> None:
    world.broker.script = [
        refusal(503, "temporarily_unavailable", retry_after="2"),
        refusal(429, "slow_down", retry_after="1"),
    ]
    first = world.call()
    assert world.clock.sleeps == [2.0, 1.0]
    world.clock.advance(REFRESH_AFTER + 1)
    world.broker.script = [refusal(503, "temporarily_unavailable", retry_after="60")]
    assert world.call() is first
    world.clock.advance(59)
    assert world.call() is first
    assert len(world.broker.requests) == 4  # nothing sent during the 60 s asked for
    world.clock.advance(2)
    assert world.call() is not first


def oversized_answer_is_malformed(world: World) -> None:
    world.broker.script = [httpx.Response(200, content=b"x" * (65 * 1024))] * 3
    error = world.call()
    assert isinstance(error, BrokerUnavailable) and error.reason.value == "malformed_response"
    assert len(world.broker.requests) == 3


def id_token_refreshed_once_after_401(world: World) -> None:
    world.broker.script = [refusal(401, "invalid_token")]
    assert isinstance(world.call(), BrokerToken)
    assert world.ids.invalidated == 1


SCENARIOS: list[Callable[[World], None]] = [
    fresh_hit,
    stale_served_during_an_outage,
    refused_after_hard_expiry,
    refusal_evicts,
    breaker_opens_and_half_opens,
    retry_after_honoured,
    oversized_answer_is_malformed,
    id_token_refreshed_once_after_401,
]


@pytest.fixture
def worlds() -> Iterator[Callable[[str], World]]:
    made: list[World] = []

    def make(shell: str) -> World:
        made.append(World(shell))
        return made[-1]

    yield make
    for world in made:
        world.close()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda scenario: scenario.__name__)
def test_both_shells_give_identical_outcomes(
    scenario: Callable[[World], None], worlds: Callable[[str], World]
) -> None:
    summaries = {}
    for shell in ("sync", "async"):
        world = worlds(shell)
        scenario(world)
        summaries[shell] = world.summary()
    assert summaries["sync"] == summaries["async"]
    assert summaries["sync"][0]  # the scenario made calls


def test_the_trace_tells_the_shells_apart_when_they_differ(
    worlds: Callable[[str], World],
) -> None:
    """The comparison above can fail: a world whose broker behaved differently has another
    summary."""
    calm, stormy = worlds("sync"), worlds("async")
    calm.call()
    stormy.broker.script = [httpx.Response(502)]
    stormy.call()
    assert calm.summary() != stormy.summary()
    assert calm.summary()[0] == stormy.summary()[0]  # same outcome, but a retry and a sleep
    assert timedelta(seconds=0) < timedelta(seconds=sum(stormy.clock.sleeps))


def test_a_busy_key_is_answered_at_once_with_the_valid_token_sync() -> None:
    """While one call refreshes a key, another gets the still-valid token without waiting for
    the key (the refresh here would hold it for the whole 30 s deadline)."""
    world = World("sync")
    world.build(deadline_seconds=30)
    client = world.client
    assert isinstance(client, BrokerClient)
    first = client.token("c")
    world.clock.advance(REFRESH_AFTER + 1)
    world.broker.gate = threading.Event()
    refresh = threading.Thread(target=client.token, args=("c",))
    refresh.start()
    try:
        deadline = time.monotonic() + 5
        while len(world.broker.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(world.broker.requests) == 2  # the refresh is in flight, holding the key
        started = time.monotonic()
        assert client.token("c") is first
        assert time.monotonic() - started < 2
    finally:
        world.broker.gate.set()
        refresh.join(10)
        world.close()


def test_a_busy_key_is_answered_at_once_with_the_valid_token_async() -> None:
    """The same on one event loop: the second task does not queue behind the refresh."""
    world = World("async")
    gate, in_flight = asyncio.Event(), asyncio.Event()

    async def gated(request: httpx.Request) -> httpx.Response:
        if not world.broker.issued:
            return world.broker(request)
        world.broker.requests.append(request)
        in_flight.set()
        await gate.wait()
        return world.broker.issue(json.loads(request.content))

    world.build(deadline_seconds=30, transport=httpx.MockTransport(gated))
    client = world.client
    assert isinstance(client, AsyncBrokerClient)

    async def scenario() -> float:
        first = await client.token("c")
        world.clock.advance(REFRESH_AFTER + 1)
        refresh = asyncio.create_task(client.token("c"))
        await in_flight.wait()
        started = time.monotonic()
        try:
            assert await client.token("c") is first
            return time.monotonic() - started
        finally:
            gate.set()
            await refresh

    assert world.runner.run(scenario()) < 2
    world.close()
