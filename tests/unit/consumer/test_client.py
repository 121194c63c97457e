"""The consumer client (both shells) against an in-process broker (``httpx.MockTransport``)
on a FakeClock."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.unit.consumer.fakes import (
    LIFETIME,
    MARGIN,
    REFRESH_AFTER,
    URL,
    FakeBroker,
    IdTokens,
    messages,
    move_to,
    refusal,
    state_of,
)
from tokenbroker.consumer import (
    AsyncBrokerClient,
    BreakerState,
    BrokerAccessDenied,
    BrokerBadRequest,
    BrokerClient,
    BrokerInvalidToken,
    BrokerNeedsReauth,
    BrokerRequestError,
    BrokerToken,
    BrokerUnavailable,
    IdTokenError,
    Unavailability,
)
from tokenbroker.kernel.clock import FakeClock, isoformat
from tokenbroker.kernel.errors import (
    BadRequest,
    ConfigError,
    InvalidCallerToken,
    NeedsReauth,
    PolicyDenied,
    TokenBrokerError,
)
from tokenbroker.kernel.retry import RetryPolicy

# --- caching ------------------------------------------------------------------------------


def test_fresh_token_is_served_from_cache_without_a_request(
    make: Callable[..., BrokerClient], broker: FakeBroker, clock: FakeClock
) -> None:
    client = make()
    first = client.token("zoho-eu", ["b", "a"])
    clock.advance(REFRESH_AFTER - 1)
    assert client.token("zoho-eu", ("a", "b", "a")) is first  # same key: sorted, de-duplicated
    assert len(broker.requests) == 1
    assert first.connection == "zoho-eu"
    assert first.scope == ("a", "b")
    assert first.token_type == "Bearer"
    assert first.expires_at == datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=LIFETIME)


def test_refetches_after_refresh_after(
    make: Callable[..., BrokerClient], broker: FakeBroker, clock: FakeClock
) -> None:
    client = make()
    first = client.token("zoho-eu")
    clock.advance(REFRESH_AFTER)
    second = client.token("zoho-eu")
    assert second is not first
    assert second.access_token.reveal() == broker.issued[1]
    assert len(broker.requests) == 2


def test_keys_are_separate_per_connection_and_scopes(
    make: Callable[..., BrokerClient], broker: FakeBroker
) -> None:
    client = make()
    client.token("zoho-eu")
    client.token("zoho-eu", ["a"])
    client.token("google", ["a"])
    client.token("google", ["a"])
    assert len(broker.requests) == 3


def test_request_carries_id_token_audience_and_contract_body(
    make: Callable[..., BrokerClient], broker: FakeBroker, ids: IdTokens
) -> None:
    client = make(min_ttl_seconds=300)
    client.token("zoho-eu", ["b", "a"])
    client.token("other")
    request = broker.requests[0]
    assert request.method == "POST"
    assert str(request.url) == URL + "/token"
    assert request.headers["authorization"] == "Bearer id-token-generation-0"
    assert request.headers["content-type"] == "application/json"
    assert broker.bodies() == [
        {"connection": "zoho-eu", "scopes": ["a", "b"], "min_ttl_seconds": 300},
        {"connection": "other", "min_ttl_seconds": 300},  # no scopes: what the policy grants
    ]
    assert ids.calls == [URL, URL]  # audience defaults to the base URL


def test_audience_and_trailing_slash(clock: FakeClock, broker: FakeBroker, ids: IdTokens) -> None:
    client = BrokerClient(
        URL + "/",
        audience="https://custom-audience",
        id_token_source=ids,
        clock=clock,
        transport=httpx.MockTransport(broker),
    )
    client.token("c")
    assert str(broker.requests[0].url) == URL + "/token"
    assert ids.calls == ["https://custom-audience"]


def test_fresh_also_means_min_ttl_left(clock: FakeClock, ids: IdTokens) -> None:
    short = FakeBroker(clock, lifetime=100, hint=90)
    transport = httpx.MockTransport(short)
    client = BrokerClient(
        URL, id_token_source=ids, clock=clock, transport=transport, min_ttl_seconds=60
    )
    first = client.token("c")
    clock.advance(39)
    assert client.token("c") is first
    clock.advance(2)  # 59 s left < min_ttl, although refresh_after (90 s) is still ahead
    assert client.token("c") is not first


def test_broker_clock_ahead_is_not_believed(
    make: Callable[..., BrokerClient], broker: FakeBroker, clock: FakeClock
) -> None:
    now = clock.now()
    ahead = timedelta(seconds=120)
    broker.script = [
        httpx.Response(
            200,
            json={
                "access_token": "v",
                "token_type": "bearer",
                "expires_at": isoformat(now + ahead + timedelta(seconds=3600)),
                "expires_in": 3600,
                "refresh_after": isoformat(now + ahead + timedelta(seconds=1800)),
                "scope": "a",
                "connection": "c",
            },
        )
    ]
    token = make().token("c")
    assert token.expires_at == now + timedelta(seconds=3600)
    assert token.refresh_after == now + timedelta(seconds=1800)
    assert token.token_type == "Bearer"


def test_token_repr_hides_the_value_and_header_reveals_it(
    make: Callable[..., BrokerClient], broker: FakeBroker
) -> None:
    token = make().token("c")
    value = broker.issued[0]
    assert value not in repr(token)
    assert value not in str(token)
    assert "Secret(sha256:" in repr(token)
    assert token.header() == {"Authorization": f"Bearer {value}"}


# --- outage: serve the last good token until its hard expiry --------------------------------


def test_outage_serves_cached_token_until_hard_expiry_then_raises_then_recovers(
    log: io.StringIO, make: Callable[..., BrokerClient], broker: FakeBroker, clock: FakeClock
) -> None:
    client = make()
    first = client.token("zoho-eu")
    clock.advance(REFRESH_AFTER + 1)
    broker.down = True

    assert client.token("zoho-eu") is first  # one attempt, then the cached token at once
    assert len(broker.requests) == 2
    assert clock.sleeps == []  # with a valid token in hand the caller never waits

    # Keep calling through the outage: always the cached token, and few requests.
    usable_until = first.expires_at - timedelta(seconds=MARGIN)
    calls = 0
    while clock.now() + timedelta(seconds=7) < usable_until:
        clock.advance(7)
        assert client.token("zoho-eu") is first
        calls += 1
    outage_requests = len(broker.requests) - 1
    assert calls > 200
    assert outage_requests < calls / 3  # the breaker and the per-key back-off hold off

    move_to(clock, usable_until)
    with pytest.raises(BrokerUnavailable) as raised:
        client.token("zoho-eu")
    assert raised.value.retryable

    broker.down = False
    clock.advance(31)  # past the breaker's reset
    recovered = client.token("zoho-eu")
    assert recovered is not first
    assert recovered.access_token.reveal() == broker.issued[-1]
    assert state_of(client) is BreakerState.CLOSED

    said = messages(log)
    assert said.count("broker unavailable; serving the cached token until it expires") == 1
    assert said.count("broker unavailable and no valid cached token") == 1
    assert said.count("broker available again; token refreshed") == 1
    assert said.count("circuit breaker open: no requests to the broker for a while") >= 1


def test_no_cached_token_during_outage_raises_after_retries(
    make: Callable[..., BrokerClient], broker: FakeBroker, clock: FakeClock
) -> None:
    broker.down = True
    with pytest.raises(BrokerUnavailable) as raised:
        make().token("c")
    assert raised.value.reason is Unavailability.UNREACHABLE
    assert raised.value.attempts == 3
    assert len(broker.requests) == 3
    assert len(clock.sleeps) == 2
    assert all(0 <= s <= 2.0 for s in clock.sleeps)


def test_timeouts_are_retried(make: Callable[..., BrokerClient], broker: FakeBroker) -> None:
    broker.script = [httpx.ReadTimeout("slow"), httpx.ConnectTimeout("slow")]
    token = make().token("c")
    assert token.access_token.reveal() == broker.issued[0]
    assert len(broker.requests) == 3


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (httpx.Response(500, json={"error": "server_error"}), Unavailability.SERVER_ERROR),
        (httpx.Response(502, text="<html>Bad Gateway</html>"), Unavailability.SERVER_ERROR),
        (httpx.Response(503, text="Service Unavailable"), Unavailability.SERVER_ERROR),
        (refusal(429, "rate_limited"), Unavailability.RATE_LIMITED),
        (refusal(503, "temporarily_unavailable"), Unavailability.TEMPORARILY_UNAVAILABLE),
        (httpx.Response(200, text="<html>maintenance</html>"), Unavailability.MALFORMED),
    ],
)
def test_retryable_answers_are_retried(
    make: Callable[..., BrokerClient],
    broker: FakeBroker,
    answer: httpx.Response,
    reason: Unavailability,
) -> None:
    broker.script = [answer, answer, answer]
    with pytest.raises(BrokerUnavailable) as raised:
        make().token("c")
    assert raised.value.reason is reason
    assert len(broker.requests) == 3
    broker.script = [answer]
    assert make().token("c").access_token.reveal() == broker.issued[0]


@pytest.mark.parametrize(
    "case",
    [
        (400, "invalid_request", BrokerBadRequest, BadRequest),
        (403, "access_denied", BrokerAccessDenied, PolicyDenied),
        (409, "needs_reauth", BrokerNeedsReauth, NeedsReauth),
        (404, "not_found", BrokerRequestError, BrokerRequestError),
    ],
)
def test_refusals_are_raised_at_once_and_never_retried(
    make: Callable[..., BrokerClient],
    broker: FakeBroker,
    clock: FakeClock,
    case: tuple[int, str, type[BrokerRequestError], type[TokenBrokerError]],
) -> None:
    status, code, raised_type, library_type = case
    broker.script = [refusal(status, code)]
    with pytest.raises(raised_type) as raised:
        make().token("c")
    error = raised.value
    assert isinstance(error, library_type)
    assert isinstance(error, BrokerRequestError)
    assert error.status == status
    assert error.error == code
    assert not error.retryable
    assert len(broker.requests) == 1
    assert clock.sleeps == []


def test_refusal_does_not_fall_back_and_evicts_the_cached_token(
    make: Callable[..., BrokerClient], broker: FakeBroker, clock: FakeClock
) -> None:
    """A revoked permission must take effect: no stale token after a 403, even if the broker
    goes down right after."""
    client = make()
    client.token("zoho-eu")
    clock.advance(REFRESH_AFTER + 1)
    broker.script = [refusal(403, "access_denied")]
    with pytest.raises(PolicyDenied):
        client.token("zoho-eu")
    broker.down = True
    with pytest.raises(BrokerUnavailable):
        client.token("zoho-eu")


def test_401_refreshes_the_id_token_once_and_retries_once(
    make: Callable[..., BrokerClient], broker: FakeBroker, ids: IdTokens, clock: FakeClock
) -> None:
    client = make()
    broker.script = [refusal(401, "invalid_token")]
    token = client.token("c")
    assert token.access_token.reveal() == broker.issued[0]
    assert ids.invalidated == 1
    assert broker.auth_headers() == ["Bearer id-token-generation-0", "Bearer id-token-generation-1"]

    clock.advance(REFRESH_AFTER + 1)
    broker.script = [refusal(401, "invalid_token"), refusal(401, "invalid_token")]
    with pytest.raises(BrokerInvalidToken) as raised:
        client.token("c")
    assert isinstance(raised.value, InvalidCallerToken)
    assert ids.invalidated == 2
    assert len(broker.requests) == 4
    assert clock.sleeps == []


def test_401_with_a_plain_callable_source_asks_it_again(
    clock: FakeClock, broker: FakeBroker
) -> None:
    calls: list[str] = []

    def source(audience: str) -> str:
        calls.append(audience)
        return f"plain-{len(calls)}"

    client = BrokerClient(
        URL, id_token_source=source, clock=clock, transport=httpx.MockTransport(broker)
    )
    broker.script = [refusal(401, "invalid_token")]
    client.token("c")
    assert broker.auth_headers() == ["Bearer plain-1", "Bearer plain-2"]


# --- Retry-After and the deadline ---------------------------------------------------------


def test_retry_after_is_honoured(
    make: Callable[..., BrokerClient], broker: FakeBroker, clock: FakeClock
) -> None:
    broker.script = [
        refusal(503, "temporarily_unavailable", retry_after="2"),
        refusal(429, "slow_down", retry_after="1"),
    ]
    make().token("c")
    assert clock.sleeps == [2.0, 1.0]
    assert len(broker.requests) == 3


def test_retry_after_beyond_the_cap_ends_the_call_and_is_reported(
    make: Callable[..., BrokerClient], broker: FakeBroker, clock: FakeClock
) -> None:
    broker.script = [refusal(503, "temporarily_unavailable", retry_after="30")]
    with pytest.raises(BrokerUnavailable) as raised:
        make().token("c")
    assert raised.value.retry_after == 30
    assert raised.value.status == 503
    assert len(broker.requests) == 1
    assert clock.sleeps == []


def test_retry_after_holds_off_refreshes_while_the_cached_token_is_served(
    make: Callable[..., BrokerClient], broker: FakeBroker, clock: FakeClock
) -> None:
    client = make()
    first = client.token("c")
    clock.advance(REFRESH_AFTER + 1)
    broker.script = [refusal(503, "temporarily_unavailable", retry_after="60")]
    assert client.token("c") is first
    clock.advance(59)
    assert client.token("c") is first
    assert len(broker.requests) == 2  # nothing sent during the 60 s asked for
    clock.advance(2)
    assert client.token("c") is not first


def test_per_call_deadline_bounds_the_attempts(
    make: Callable[..., BrokerClient], broker: FakeBroker, clock: FakeClock
) -> None:
    broker.script = [refusal(503, "temporarily_unavailable", retry_after="3")] * 3
    with pytest.raises(BrokerUnavailable):
        make(deadline_seconds=2.5).token("c")
    assert len(broker.requests) == 1
    assert clock.sleeps == []


def test_timeout_and_policy_are_passed_through(
    make: Callable[..., BrokerClient], broker: FakeBroker
) -> None:
    broker.down = True
    with pytest.raises(BrokerUnavailable) as raised:
        make(retry=RetryPolicy(attempts=5, base_delay=0.01, max_delay=0.01)).token("c")
    assert raised.value.attempts == 5
    assert len(broker.requests) == 5


# --- circuit breaker ------------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_and_sends_nothing_while_open(
    log: io.StringIO, make: Callable[..., BrokerClient], broker: FakeBroker, clock: FakeClock
) -> None:
    client = make(breaker_threshold=3, breaker_reset_seconds=30)
    broker.down = True
    with pytest.raises(BrokerUnavailable):
        client.token("a")  # 3 attempts, 3 failures
    assert state_of(client) is BreakerState.OPEN
    sent = len(broker.requests)
    for connection in ("a", "b", "c"):
        with pytest.raises(BrokerUnavailable) as raised:
            client.token(connection)
        assert raised.value.reason is Unavailability.CIRCUIT_OPEN
        assert raised.value.retry_after is not None and 0 < raised.value.retry_after <= 30
    assert len(broker.requests) == sent
    assert messages(log).count("circuit breaker open: no requests to the broker for a while") == 1


def test_half_open_trial_failure_reopens_and_success_closes(
    make: Callable[..., BrokerClient], broker: FakeBroker, clock: FakeClock
) -> None:
    client = make(breaker_threshold=3, breaker_reset_seconds=30)
    broker.down = True
    with pytest.raises(BrokerUnavailable):
        client.token("a")
    sent = len(broker.requests)

    clock.advance(30)
    with pytest.raises(BrokerUnavailable):
        client.token("a")  # the trial fails: open again, no second attempt
    assert len(broker.requests) == sent + 1
    assert state_of(client) is BreakerState.OPEN

    clock.advance(30)
    broker.down = False
    token = client.token("a")  # the trial succeeds
    assert token.access_token.reveal() == broker.issued[0]
    assert state_of(client) is BreakerState.CLOSED
    client.token("b")
    assert len(broker.requests) == sent + 3


def test_breaker_serves_cached_tokens_while_open(
    make: Callable[..., BrokerClient], broker: FakeBroker, clock: FakeClock
) -> None:
    client = make(breaker_threshold=2)
    cached = client.token("a")
    clock.advance(REFRESH_AFTER + 1)
    broker.down = True
    with pytest.raises(BrokerUnavailable):
        client.token("b")  # opens the breaker
    assert state_of(client) is BreakerState.OPEN
    sent = len(broker.requests)
    assert client.token("a") is cached
    assert len(broker.requests) == sent


def test_per_connection_503_does_not_open_the_breaker(
    make: Callable[..., BrokerClient], broker: FakeBroker
) -> None:
    client = make(breaker_threshold=2)
    broker.script = [refusal(503, "temporarily_unavailable", retry_after="1")] * 3
    with pytest.raises(BrokerUnavailable):
        client.token("zoho-eu")
    assert state_of(client) is BreakerState.CLOSED
    client.token("google")  # the other connections are not blocked
    assert len(broker.requests) == 4


def test_refusals_count_as_a_live_broker(
    make: Callable[..., BrokerClient], broker: FakeBroker
) -> None:
    client = make(breaker_threshold=2, retry=RetryPolicy(attempts=1))
    broker.script = [httpx.Response(500), refusal(403, "access_denied"), httpx.Response(500)]
    for _ in range(3):
        with pytest.raises(TokenBrokerError):
            client.token("c")
    assert state_of(client) is BreakerState.CLOSED


# --- concurrency ----------------------------------------------------------------------------


def test_one_request_per_key_under_threads(
    make: Callable[..., BrokerClient], broker: FakeBroker
) -> None:
    client = make()
    broker.latency = 0.2
    barrier = threading.Barrier(10)
    results: list[BrokerToken] = []
    errors: list[BaseException] = []

    def worker() -> None:
        barrier.wait()
        try:
            results.append(client.token("zoho-eu", ["a", "b"]))
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert errors == []
    assert len(results) == 10
    assert len({id(token) for token in results}) == 1
    assert len(broker.requests) == 1


def test_callers_waiting_for_a_failed_fetch_share_its_failure(
    make: Callable[..., BrokerClient], broker: FakeBroker
) -> None:
    """Ten callers with no token during an outage: one retry sequence, not ten."""
    client = make()
    broker.down = True
    broker.latency = 0.05
    barrier = threading.Barrier(10)
    outcomes: list[BaseException] = []

    def worker() -> None:
        barrier.wait()
        try:
            client.token("c")
        except BrokerUnavailable as error:
            outcomes.append(error)

    threads = [threading.Thread(target=worker) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(outcomes) == 10
    assert len(broker.requests) == 3
    assert all(isinstance(e, BrokerUnavailable) and e.retryable for e in outcomes)


def test_others_get_the_valid_cached_token_while_one_refreshes(
    make: Callable[..., BrokerClient], broker: FakeBroker, clock: FakeClock
) -> None:
    client = make()
    first = client.token("c")
    clock.advance(REFRESH_AFTER + 1)
    broker.gate = threading.Event()
    refreshed: list[BrokerToken] = []
    thread = threading.Thread(target=lambda: refreshed.append(client.token("c")))
    thread.start()
    deadline = time.monotonic() + 5
    while len(broker.requests) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(broker.requests) == 2  # the refresh is in flight
    assert client.token("c") is first  # not blocked behind it
    broker.gate.set()
    thread.join(5)
    assert refreshed and refreshed[0] is not first
    assert client.token("c") is refreshed[0]
    assert len(broker.requests) == 2


# --- the caller's ID token ------------------------------------------------------------------


def test_retryable_id_token_failure_serves_the_cached_token(
    make: Callable[..., BrokerClient], broker: FakeBroker, ids: IdTokens, clock: FakeClock
) -> None:
    client = make()
    first = client.token("c")
    clock.advance(REFRESH_AFTER + 1)
    ids.failure = IdTokenError("metadata server unreachable", retryable=True)
    assert client.token("c") is first
    with pytest.raises(BrokerUnavailable) as raised:
        client.token("other")
    assert raised.value.reason is Unavailability.ID_TOKEN
    assert len(broker.requests) == 1
    assert state_of(client) is BreakerState.CLOSED  # not the broker's fault


def test_misconfigured_identity_is_raised(
    make: Callable[..., BrokerClient], broker: FakeBroker, ids: IdTokens, clock: FakeClock
) -> None:
    client = make()
    client.token("c")
    clock.advance(REFRESH_AFTER + 1)
    ids.failure = IdTokenError("no credentials")
    with pytest.raises(IdTokenError):
        client.token("c")
    ids.failure = None  # fixed: the cached token was not thrown away
    broker.down = True
    assert client.token("c").access_token.reveal() == broker.issued[0]


# --- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "base_url", ["http://broker.example.com", "ftp://x", "https://x/?q=1", "not a url"]
)
def test_base_url_must_be_https_except_loopback(base_url: str, ids: IdTokens) -> None:
    with pytest.raises(ConfigError):
        BrokerClient(base_url, id_token_source=ids)


@pytest.mark.parametrize(
    "base_url", ["http://127.0.0.1:8080", "http://localhost:1", "http://[::1]"]
)
def test_loopback_http_is_allowed(base_url: str, ids: IdTokens) -> None:
    BrokerClient(base_url, id_token_source=ids).close()


def test_scopes_must_be_a_sequence_not_one_string(make: Callable[..., BrokerClient]) -> None:
    with pytest.raises(TypeError):
        make().token("c", "a b")


def test_broker_answer_for_another_connection_is_not_cached(
    make: Callable[..., BrokerClient], broker: FakeBroker
) -> None:
    wrong = broker.issue({"connection": "someone-else"})
    broker.script = [wrong, wrong, wrong]
    with pytest.raises(BrokerUnavailable) as raised:
        make().token("c")
    assert raised.value.reason is Unavailability.MALFORMED


# --- logs ---------------------------------------------------------------------------------


def test_no_token_value_in_logs_or_errors(
    log: io.StringIO,
    make: Callable[..., BrokerClient],
    broker: FakeBroker,
    ids: IdTokens,
    clock: FakeClock,
) -> None:
    client = make(breaker_threshold=2)
    seen: list[str] = []
    token = client.token("zoho-eu", ["a"])
    clock.advance(REFRESH_AFTER + 1)
    broker.script = [refusal(401, "invalid_token")]  # an ID-token refresh
    client.token("zoho-eu", ["a"])
    clock.advance(REFRESH_AFTER + 1)
    broker.down = True
    for _ in range(5):
        client.token("zoho-eu", ["a"])  # outage: cached token, breaker opens
        clock.advance(40)
    for connection, scopes in (("x", []), ("zoho-eu", ["b"])):
        try:
            client.token(connection, scopes)
        except TokenBrokerError as error:
            seen += [str(error), repr(error)]
    broker.down = False
    clock.advance(3600)
    client.token("zoho-eu", ["a"])
    clock.advance(REFRESH_AFTER + 1)
    broker.script = [refusal(403, "access_denied")]
    with pytest.raises(PolicyDenied) as denied:
        client.token("zoho-eu", ["a"])
    seen += [str(denied.value), repr(denied.value), repr(token)]

    output = log.getvalue() + "\n".join(seen)
    assert "broker unavailable; serving the cached token until it expires" in output
    assert "token fetched from the broker" in output  # debug lines were captured
    secrets = broker.issued + [f"id-token-generation-{n}" for n in range(ids.generation + 1)]
    assert len(broker.issued) >= 3
    leaked = [value for value in secrets if value in output]
    assert leaked == []


# --- the asyncio client ---------------------------------------------------------------------


def run(coroutine: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coroutine

    return asyncio.run(main())


def test_async_cache_refetch_and_request_shape(
    make_async: Callable[..., AsyncBrokerClient], broker: FakeBroker, clock: FakeClock
) -> None:
    async def scenario() -> None:
        async with make_async() as client:
            first = await client.token("zoho-eu", ["b", "a"])
            assert await client.token("zoho-eu", ["a", "b"]) is first
            clock.advance(REFRESH_AFTER)
            assert await client.token("zoho-eu", ["a", "b"]) is not first

    run(scenario())
    assert len(broker.requests) == 2
    assert broker.bodies()[0] == {
        "connection": "zoho-eu",
        "scopes": ["a", "b"],
        "min_ttl_seconds": 60,
    }
    assert broker.requests[0].headers["authorization"] == "Bearer id-token-generation-0"


def test_async_outage_serves_cached_until_expiry_then_raises_then_recovers(
    make_async: Callable[..., AsyncBrokerClient], broker: FakeBroker, clock: FakeClock
) -> None:
    async def scenario() -> None:
        client = make_async()
        first = await client.token("c")
        clock.advance(REFRESH_AFTER + 1)
        broker.down = True
        assert await client.token("c") is first
        move_to(clock, first.expires_at - timedelta(seconds=MARGIN + 1))
        assert await client.token("c") is first
        clock.advance(1)
        with pytest.raises(BrokerUnavailable):
            await client.token("c")
        broker.down = False
        clock.advance(31)
        assert (await client.token("c")).access_token.reveal() == broker.issued[-1]
        await client.aclose()

    run(scenario())


def test_async_retries_only_retryable_and_honours_retry_after(
    make_async: Callable[..., AsyncBrokerClient], broker: FakeBroker, clock: FakeClock
) -> None:
    async def scenario() -> None:
        client = make_async()
        broker.script = [
            refusal(503, "temporarily_unavailable", retry_after="2"),
            httpx.Response(502),
        ]
        await client.token("a")
        assert clock.sleeps[0] == 2.0
        assert len(broker.requests) == 3
        broker.script = [refusal(403, "access_denied")]
        with pytest.raises(BrokerAccessDenied):
            await client.token("b")
        assert len(broker.requests) == 4
        broker.script = [refusal(409, "needs_reauth")]
        with pytest.raises(NeedsReauth):
            await client.token("c")
        assert len(broker.requests) == 5

    run(scenario())


def test_async_401_refreshes_the_id_token_once(
    make_async: Callable[..., AsyncBrokerClient], broker: FakeBroker, ids: IdTokens
) -> None:
    broker.script = [refusal(401, "invalid_token"), refusal(401, "invalid_token")]
    with pytest.raises(BrokerInvalidToken):
        run(make_async().token("c"))
    assert ids.invalidated == 1
    assert len(broker.requests) == 2


def test_async_breaker_opens_and_half_open_trial_closes(
    make_async: Callable[..., AsyncBrokerClient], broker: FakeBroker, clock: FakeClock
) -> None:
    async def scenario() -> None:
        client = make_async(breaker_threshold=3, breaker_reset_seconds=30)
        broker.down = True
        with pytest.raises(BrokerUnavailable):
            await client.token("a")
        sent = len(broker.requests)
        with pytest.raises(BrokerUnavailable) as raised:
            await client.token("b")
        assert raised.value.reason is Unavailability.CIRCUIT_OPEN
        assert len(broker.requests) == sent
        clock.advance(30)
        broker.down = False
        await client.token("b")
        assert state_of(client) is BreakerState.CLOSED
        assert len(broker.requests) == sent + 1

    run(scenario())


def test_async_one_request_per_key_under_tasks(
    make_async: Callable[..., AsyncBrokerClient], broker: FakeBroker
) -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.05)
        return broker(request)

    async def scenario() -> list[BrokerToken]:
        client = make_async(slow)
        return list(await asyncio.gather(*(client.token("c", ["x"]) for _ in range(10))))

    tokens = run(scenario())
    assert len({id(t) for t in tokens}) == 1
    assert len(broker.requests) == 1


def test_async_others_get_the_valid_cached_token_while_one_refreshes(
    make_async: Callable[..., AsyncBrokerClient], broker: FakeBroker, clock: FakeClock
) -> None:
    async def scenario() -> None:
        gate, in_flight = asyncio.Event(), asyncio.Event()

        async def gated(request: httpx.Request) -> httpx.Response:
            if broker.issued:
                broker.requests.append(request)
                in_flight.set()
                await gate.wait()
                return broker.issue(json.loads(request.content))
            return broker(request)

        client = make_async(gated)
        first = await client.token("c")
        clock.advance(REFRESH_AFTER + 1)
        refresh = asyncio.create_task(client.token("c"))
        await in_flight.wait()
        assert await client.token("c") is first  # not blocked behind the refresh
        gate.set()
        refreshed = await refresh
        assert refreshed is not first
        assert await client.token("c") is refreshed
        assert len(broker.requests) == 2

    run(scenario())


def test_async_client_survives_a_new_event_loop_per_call(
    make_async: Callable[..., AsyncBrokerClient], broker: FakeBroker, clock: FakeClock
) -> None:
    """A sync Cloud Function calling ``asyncio.run`` per request with a module-scope client."""
    client = make_async()
    first = asyncio.run(client.token("c"))
    clock.advance(REFRESH_AFTER + 1)
    second = asyncio.run(client.token("c"))
    assert second is not first
    assert asyncio.run(client.token("c")) is second
    assert len(broker.requests) == 2
