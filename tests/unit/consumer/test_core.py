"""The core alone: no shell, no httpx, no threads, no event loop. The test answers each effect
the core yields, on a FakeClock that moves only when the core asks to sleep."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from tests.unit.consumer.fakes import LIFETIME, REFRESH_AFTER, URL
from tokenbroker.consumer import (
    BreakerState,
    BrokerAccessDenied,
    BrokerInvalidToken,
    BrokerToken,
    BrokerUnavailable,
    Unavailability,
)
from tokenbroker.consumer.core import ClientCore
from tokenbroker.consumer.effects import Claim, Effect, Flow, GetIdToken, Post, Sleep
from tokenbroker.consumer.wire import NoReply, Reply
from tokenbroker.kernel.clock import FakeClock, isoformat


def token_reply(clock: FakeClock, connection: str = "c", value: str = "v") -> Reply:
    now = clock.now()
    body = {
        "access_token": value,
        "token_type": "Bearer",
        "expires_at": isoformat(now + timedelta(seconds=LIFETIME)),
        "expires_in": LIFETIME,
        "refresh_after": isoformat(now + timedelta(seconds=REFRESH_AFTER)),
        "connection": connection,
    }
    return Reply(200, json.dumps(body).encode())


def error_reply(status: int, error: str, retry_after: str | None = None) -> Reply:
    return Reply(status, json.dumps({"error": error}).encode(), retry_after)


class Script:
    """Plays every shell's part: answers claims, ID tokens and sleeps like a real one, posts
    from ``posts`` (a token when it runs out), and records what the core asked for."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.posts: list[Reply | NoReply | BaseException] = []
        self.effects: list[Effect[object]] = []
        self.held = 0  # keys claimed and not yet let go
        self.busy = False  # another call holds every key
        self.interrupt: BaseException | None = None  # raised by the next post instead

    def answer(self, effect: Effect[object]) -> object:
        self.effects.append(effect)
        if isinstance(effect, Claim):
            if self.busy:
                return None
            self.held += 1
            return self.release
        if isinstance(effect, GetIdToken):
            return f"id-{effect.refresh}"
        if isinstance(effect, Sleep):
            self.clock.advance(effect.seconds)
            return None
        assert isinstance(effect, Post)
        connection = json.loads(effect.body)["connection"]
        step = self.posts.pop(0) if self.posts else token_reply(self.clock, connection)
        if isinstance(step, BaseException):
            raise step
        return step

    def release(self) -> None:
        self.held -= 1

    def run(self, flow: Flow[BrokerToken]) -> BrokerToken:
        while (effect := flow.effect) is not None:
            try:
                answer = self.answer(effect)
            except BaseException as error:  # noqa: BLE001 - the shells' contract: throw it in
                flow.fail(error)
            else:
                flow.resolve(answer)
        return flow.result

    def kinds(self) -> list[str]:
        return [type(effect).__name__ for effect in self.effects]

    def sleeps(self) -> list[float]:
        return [effect.seconds for effect in self.effects if isinstance(effect, Sleep)]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def script(clock: FakeClock) -> Script:
    return Script(clock)


@pytest.fixture
def core(clock: FakeClock) -> Callable[..., ClientCore]:
    def build(**options: Any) -> ClientCore:
        options.setdefault("id_token_source", lambda _audience: "unused: the script answers")
        return ClientCore(URL, clock=clock, rng=random.Random(7), **options)

    return build


def test_a_miss_asks_for_the_key_the_id_token_and_one_request_in_that_order(
    core: Callable[..., ClientCore], script: Script
) -> None:
    client = core(min_ttl_seconds=120, deadline_seconds=4.0)
    token = script.run(client.token("zoho-eu", ["b", "a"]))
    assert script.kinds() == ["Claim", "GetIdToken", "Post"]
    claim, id_token, post = script.effects
    assert isinstance(claim, Claim) and not claim.wait and claim.timeout == 4.0
    assert claim.key.connection == "zoho-eu" and claim.key.scopes == ("a", "b")
    assert isinstance(id_token, GetIdToken) and id_token.audience == URL and not id_token.refresh
    assert isinstance(post, Post)
    assert post.url == URL + "/token"
    assert post.timeout == 4.0  # the 5 s default, cut to what the deadline leaves
    assert json.loads(post.body) == {
        "connection": "zoho-eu",
        "scopes": ["a", "b"],
        "min_ttl_seconds": 120,
    }
    assert post.headers["Authorization"] == "Bearer id-False"
    assert token.access_token.reveal() == "v"
    assert script.held == 0  # the key was let go


def test_a_fresh_token_is_a_finished_flow(
    core: Callable[..., ClientCore], script: Script, clock: FakeClock
) -> None:
    client = core()
    first = script.run(client.token("c"))
    clock.advance(REFRESH_AFTER - 1)
    flow = client.token("c")
    assert flow.effect is None  # nothing to perform: not even a claim
    assert flow.result is first


def test_retries_are_sleeps_the_core_asks_for_and_no_real_time_passes(
    core: Callable[..., ClientCore], script: Script, clock: FakeClock
) -> None:
    client = core()
    script.posts = [NoReply(timed_out=True), NoReply(timed_out=False, detail="ConnectError")]
    token = script.run(client.token("c"))
    assert token.access_token.reveal() == "v"
    assert script.kinds() == ["Claim"] + ["GetIdToken", "Post", "Sleep"] * 2 + [
        "GetIdToken",
        "Post",
    ]
    waits = script.sleeps()
    assert all(0 <= wait <= 0.4 for wait in waits)  # full jitter under 0.2 s, then 0.4 s
    assert clock.monotonic() == pytest.approx(sum(waits))  # time moved only by those sleeps
    assert clock.sleeps == []  # the clock itself was never asked to sleep


def test_retry_after_becomes_the_sleep(core: Callable[..., ClientCore], script: Script) -> None:
    client = core()
    script.posts = [
        error_reply(503, "temporarily_unavailable", retry_after="2"),
        error_reply(429, "slow_down", retry_after="1"),
    ]
    script.run(client.token("c"))
    assert script.sleeps() == [2.0, 1.0]


def test_retry_after_beyond_the_cap_ends_the_call_without_sleeping(
    core: Callable[..., ClientCore], script: Script
) -> None:
    client = core()
    script.posts = [error_reply(503, "temporarily_unavailable", retry_after="30")]
    with pytest.raises(BrokerUnavailable) as raised:
        script.run(client.token("c"))
    assert raised.value.retry_after == 30
    assert script.sleeps() == []
    assert client.breaker.state is BreakerState.CLOSED  # one connection's 503 is no fault


def test_a_401_asks_for_a_refreshed_id_token_once_without_sleeping(
    core: Callable[..., ClientCore], script: Script
) -> None:
    client = core()
    script.posts = [error_reply(401, "invalid_token"), error_reply(401, "invalid_token")]
    with pytest.raises(BrokerInvalidToken):
        script.run(client.token("c"))
    refreshes = [e.refresh for e in script.effects if isinstance(e, GetIdToken)]
    assert refreshes == [False, True]
    assert script.sleeps() == []


def test_stale_token_in_an_outage_one_attempt_then_served_during_the_back_off(
    core: Callable[..., ClientCore], script: Script, clock: FakeClock
) -> None:
    client = core()
    first = script.run(client.token("c"))
    clock.advance(REFRESH_AFTER + 1)
    script.effects.clear()
    script.posts = [NoReply(timed_out=False, detail="ConnectError")]
    assert script.run(client.token("c")) is first
    assert script.kinds() == ["Claim", "GetIdToken", "Post"]  # no retry, no sleep
    script.effects.clear()
    assert script.run(client.token("c")) is first  # backing off: answered under the key
    assert script.kinds() == ["Claim"]


def test_a_busy_key_serves_the_valid_token_without_waiting(
    core: Callable[..., ClientCore], script: Script, clock: FakeClock
) -> None:
    client = core()
    first = script.run(client.token("c"))
    clock.advance(REFRESH_AFTER + 1)
    script.effects.clear()
    script.busy = True
    assert script.run(client.token("c")) is first
    assert script.kinds() == ["Claim"]


def test_a_busy_key_with_nothing_valid_waits_and_gives_up_at_the_deadline(
    core: Callable[..., ClientCore], script: Script
) -> None:
    client = core(deadline_seconds=3.0)
    script.busy = True
    with pytest.raises(BrokerUnavailable) as raised:
        script.run(client.token("c"))
    assert raised.value.reason is Unavailability.REFRESH_IN_FLIGHT
    claims = [e for e in script.effects if isinstance(e, Claim)]
    assert [(c.wait, c.timeout) for c in claims] == [(False, 3.0), (True, 3.0)]


def test_a_refusal_evicts_so_an_outage_right_after_cannot_bring_the_token_back(
    core: Callable[..., ClientCore], script: Script, clock: FakeClock
) -> None:
    client = core()
    script.run(client.token("c"))
    clock.advance(REFRESH_AFTER + 1)
    script.posts = [error_reply(403, "access_denied")]
    with pytest.raises(BrokerAccessDenied):
        script.run(client.token("c"))
    script.posts = [NoReply(timed_out=False, detail="ConnectError")] * 3
    with pytest.raises(BrokerUnavailable):
        script.run(client.token("c"))


def test_the_breaker_opens_and_then_no_request_is_even_asked_for(
    core: Callable[..., ClientCore], script: Script, clock: FakeClock
) -> None:
    client = core(breaker_threshold=2, breaker_reset_seconds=30)
    script.posts = [NoReply(timed_out=True)] * 3
    with pytest.raises(BrokerUnavailable):
        script.run(client.token("a"))  # 2 faults open it; the 3rd attempt is refused
    assert client.breaker.state is BreakerState.OPEN
    script.effects.clear()
    with pytest.raises(BrokerUnavailable) as raised:
        script.run(client.token("b"))
    assert raised.value.reason is Unavailability.CIRCUIT_OPEN
    assert "Post" not in script.kinds()
    clock.advance(30)
    script.posts = []
    assert script.run(client.token("b")).access_token.reveal() == "v"  # the trial
    assert client.breaker.state is BreakerState.CLOSED


@pytest.mark.parametrize("interruption", [asyncio.CancelledError(), KeyboardInterrupt()])
def test_a_request_cut_short_frees_the_key_and_the_breaker_trial(
    core: Callable[..., ClientCore],
    script: Script,
    clock: FakeClock,
    interruption: BaseException,
) -> None:
    client = core(breaker_threshold=1, breaker_reset_seconds=30)
    script.posts = [NoReply(timed_out=True)]
    with pytest.raises(BrokerUnavailable):
        script.run(client.token("c"))
    clock.advance(30)  # half-open: one trial may go
    script.posts = [interruption]
    with pytest.raises(type(interruption)):
        script.run(client.token("c"))
    assert script.held == 0
    assert client.breaker.state is BreakerState.HALF_OPEN
    assert script.run(client.token("c")).access_token.reveal() == "v"  # the next trial goes


def test_an_abandoned_flow_still_lets_go_of_the_key(
    core: Callable[..., ClientCore], script: Script
) -> None:
    client = core()
    flow = client.token("c")
    while not isinstance(flow.effect, Post):
        assert flow.effect is not None
        flow.resolve(script.answer(flow.effect))
    assert script.held == 1
    del flow  # a shell that dropped the call (its task was destroyed)
    assert script.held == 0


def test_a_flow_says_when_it_is_misused(core: Callable[..., ClientCore], script: Script) -> None:
    flow = core().token("c")
    with pytest.raises(RuntimeError):
        _ = flow.result  # still waiting for its claim
    script.run(flow)
    with pytest.raises(RuntimeError):
        flow.resolve(None)
