"""The pure refresh rules: one outcome in, the connection's next state and its events out.

First one test per transition, with exact expectations; then property-style tests that run
many seeded-random states and outcomes (and random runs of outcomes) through the rules and
check what must hold for every one of them.
"""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import jsonschema
import pytest

from tests.unit.kernel.test_event_schema import SCHEMA
from tokenbroker.kernel.errors import (
    ConfigError,
    InvalidGrant,
    MalformedResponse,
    ProviderServerError,
    StoreUnavailable,
    TemporarilyUnavailable,
    TransportError,
)
from tokenbroker.kernel.model import (
    Claim,
    Connection,
    ConnectionEvent,
    ConnectionRecord,
    ConnectionStatus,
    EventType,
    GrantType,
    Intent,
    Lease,
    RefreshState,
)
from tokenbroker.kernel.schedule import RefreshPolicy
from tokenbroker.refresh.transitions import (
    AtRisk,
    FailedPermanent,
    FailedTransient,
    Outcome,
    Succeeded,
    Transition,
    failed,
    transition,
)

#: The validator of tests/unit/kernel/test_event_schema.py, built once for thousands of events.
VALIDATOR = jsonschema.Draft202012Validator(
    SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
)
validate = VALIDATOR.validate

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
POLICY = RefreshPolicy()
CID = "crm-eu"

#: A connection that refreshed once and is in good standing.
HEALTHY = RefreshState(
    status=ConnectionStatus.ACTIVE,
    expires_at=NOW + timedelta(minutes=20),
    next_refresh_at=NOW - timedelta(minutes=1),
    last_refresh_at=NOW - timedelta(minutes=40),
    last_attempt_at=NOW - timedelta(minutes=40),
    consecutive_failures=0,
    current_version=4,
    last_error=None,
)


def claim_on(state: RefreshState, *, token: int = 9, cid: str = CID) -> Claim:
    connection = Connection(id=cid, profile="generic", grant=GrantType.REFRESH_TOKEN)
    lease = Lease(cid, "refresher-a", token, NOW + timedelta(minutes=5))
    return Claim(lease, ConnectionRecord(connection, state))


def success(version: int = 5, lifetime: timedelta = timedelta(hours=1)) -> Succeeded:
    obtained = NOW - timedelta(seconds=2)
    return Succeeded(
        version=version,
        obtained_at=obtained,
        expires_at=obtained + lifetime,
        attempted_at=obtained - timedelta(seconds=1),
    )


def run(claim: Claim, outcome: Outcome, seed: int = 1, now: datetime = NOW) -> Transition:
    return transition(claim, outcome, now, POLICY, random.Random(seed))


def comparable(event: ConnectionEvent) -> dict[str, object]:
    """An event without its ``event_id`` (a fresh UUID per event object)."""
    body = event.to_json()
    del body["event_id"]
    return body


# --- one test per transition ---------------------------------------------------------------


def test_success_commits_the_new_version_and_schedules_the_next_refresh_ahead_of_expiry() -> None:
    outcome = success(version=5)
    state, events = run(claim_on(HEALTHY), outcome, seed=3)
    expected_due = POLICY.next_refresh_at(outcome.obtained_at, outcome.expires_at, random.Random(3))
    assert state == RefreshState(
        status=ConnectionStatus.ACTIVE,
        expires_at=outcome.expires_at,
        next_refresh_at=expected_due,
        last_refresh_at=NOW,
        last_attempt_at=outcome.attempted_at,
        consecutive_failures=0,
        current_version=5,
        last_error=None,
    )
    assert outcome.obtained_at < expected_due < outcome.expires_at
    assert [comparable(e) for e in events] == [
        {
            "schema_version": 1,
            "idempotency_key": ConnectionEvent.key_for(EventType.ROTATED, CID, "v5"),
            "type": "credential.rotated",
            "connection_id": CID,
            "version": 5,
            "expires_at": "2026-03-01T12:59:58Z",
            "occurred_at": "2026-03-01T12:00:00Z",
            "error_code": None,
            "failure_class": None,
            "consecutive_failures": 0,
            "next_step": None,
        }
    ]


def test_a_credential_that_arrives_expired_is_due_at_its_expiry_not_later() -> None:
    state, _ = run(claim_on(HEALTHY), success(lifetime=-timedelta(minutes=5)))
    assert state.next_refresh_at == state.expires_at


def test_success_after_failures_resets_them_and_announces_the_recovery() -> None:
    failing = replace(HEALTHY, consecutive_failures=3, last_error="server_error")
    state, events = run(claim_on(failing), success(version=5))
    assert (state.consecutive_failures, state.last_error) == (0, None)
    assert [e.type for e in events] == [EventType.ROTATED, EventType.RECOVERED]
    recovered = events[1]
    assert recovered.consecutive_failures == 3  # how many preceded the recovery
    assert (recovered.version, recovered.expires_at) == (5, state.expires_at)
    assert recovered.idempotency_key == ConnectionEvent.key_for(EventType.RECOVERED, CID, "v5")
    assert recovered.idempotency_key != events[0].idempotency_key


def test_success_after_reauthorisation_is_a_recovery_even_without_failures() -> None:
    needs_reauth = replace(HEALTHY, status=ConnectionStatus.NEEDS_REAUTH, next_refresh_at=None)
    state, events = run(claim_on(needs_reauth), success())
    assert state.status is ConnectionStatus.ACTIVE
    assert [(e.type, e.consecutive_failures) for e in events] == [
        (EventType.ROTATED, 0),
        (EventType.RECOVERED, 0),
    ]


def test_transient_failure_backs_off_counts_and_reports_once() -> None:
    previous = replace(HEALTHY, consecutive_failures=2, last_error="transport_error")
    outcome = FailedTransient("server_error", attempted_at=NOW - timedelta(seconds=3), version=4)
    state, events = run(claim_on(previous, token=9), outcome)
    # The third failure in a row: 30 s * 2**2, jittered into its upper half.
    assert NOW + timedelta(seconds=60) <= state.next_refresh_at <= NOW + timedelta(seconds=120)  # type: ignore[operator]
    assert state == replace(
        previous,
        next_refresh_at=state.next_refresh_at,
        last_attempt_at=outcome.attempted_at,
        consecutive_failures=3,
        last_error="server_error",
    )
    assert [comparable(e) for e in events] == [
        {
            "schema_version": 1,
            "idempotency_key": ConnectionEvent.key_for(EventType.REFRESH_FAILED, CID, "lease9"),
            "type": "refresh.failed",
            "connection_id": CID,
            "version": 4,
            "expires_at": "2026-03-01T12:20:00Z",  # the version still in force
            "occurred_at": "2026-03-01T12:00:00Z",
            "error_code": "server_error",
            "failure_class": "transient",
            "consecutive_failures": 3,
            "next_step": None,
        }
    ]


def test_transient_failure_waits_at_least_as_long_as_the_provider_asked() -> None:
    outcome = FailedTransient("temporarily_unavailable", NOW, version=4, retry_after=900.0)
    state, _ = run(claim_on(HEALTHY), outcome)
    assert state.next_refresh_at is not None
    assert state.next_refresh_at >= NOW + timedelta(seconds=900)


def test_backoff_is_capped_however_long_the_failures_last() -> None:
    previous = replace(HEALTHY, consecutive_failures=40)
    state, _ = run(claim_on(previous), FailedTransient("server_error", NOW, version=4))
    assert state.next_refresh_at is not None
    assert state.next_refresh_at <= NOW + POLICY.failure_backoff_max
    assert state.consecutive_failures == 41


def test_permanent_failure_needs_reauth_with_exactly_one_event() -> None:
    outcome = FailedPermanent("invalid_grant", attempted_at=NOW, version=4)
    state, events = run(claim_on(HEALTHY, token=12), outcome)
    assert state == replace(
        HEALTHY,
        status=ConnectionStatus.NEEDS_REAUTH,
        next_refresh_at=None,  # nothing schedules it until a re-authorisation
        last_attempt_at=NOW,
        consecutive_failures=1,
        last_error="invalid_grant",
    )
    assert len(events) == 1
    event = events[0]
    assert (event.type, event.error_code, event.failure_class) == (
        EventType.NEEDS_REAUTH,
        "invalid_grant",
        "permanent",
    )
    assert (event.version, event.expires_at, event.consecutive_failures) == (
        4,
        HEALTHY.expires_at,
        1,
    )
    assert event.idempotency_key == ConnectionEvent.key_for(EventType.NEEDS_REAUTH, CID, "lease12")
    assert event.next_step == f"tokenbroker authorize {CID}"  # back in one step (issue 12)


def test_a_connection_already_needing_reauth_is_not_announced_again() -> None:
    first, _ = run(claim_on(HEALTHY, token=1), FailedPermanent("invalid_grant", NOW, version=4))
    later = NOW + timedelta(hours=1)
    again = FailedPermanent("invalid_grant", later, version=4)
    state, events = run(claim_on(first, token=2), again, now=later)
    assert events == ()
    # The attempt is still recorded.
    assert state == replace(first, last_attempt_at=later, consecutive_failures=2)


def test_failure_without_a_stored_credential_reports_no_version() -> None:
    fresh = RefreshState(next_refresh_at=NOW)
    outcome = failed(ConfigError("no stored credential"), attempted_at=NOW, version=None)
    state, events = run(claim_on(fresh), outcome)
    assert state.status is ConnectionStatus.NEEDS_REAUTH
    assert [(e.error_code, e.version, e.expires_at) for e in events] == [
        ("invalid_config", None, None)
    ]
    validate(events[0].to_json())


def test_each_lease_is_one_attempt_and_each_version_one_rotation() -> None:
    failure = FailedTransient("transport_error", NOW, version=4)
    same_lease = [run(claim_on(HEALTHY, token=7), failure, seed=s).events[0] for s in (1, 2)]
    other_lease = run(claim_on(HEALTHY, token=8), failure).events[0]
    # A redelivery of one attempt shares its key; another attempt does not.
    assert same_lease[0].idempotency_key == same_lease[1].idempotency_key
    assert other_lease.idempotency_key != same_lease[0].idempotency_key
    # A rotation is keyed by its version, whichever lease committed it.
    rotations = [run(claim_on(HEALTHY, token=t), success(version=5)).events[0] for t in (7, 8)]
    assert rotations[0].idempotency_key == rotations[1].idempotency_key


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (InvalidGrant("revoked", status=400), FailedPermanent("invalid_grant", NOW, 4)),
        (ConfigError("unknown profile"), FailedPermanent("invalid_config", NOW, 4)),
        (TransportError("timeout"), FailedTransient("transport_error", NOW, 4)),
        (MalformedResponse("<html>", status=200), FailedTransient("malformed_response", NOW, 4)),
        (StoreUnavailable("down"), FailedTransient("store_unavailable", NOW, 4)),
        (
            TemporarilyUnavailable("slow down", status=429, retry_after=30.0),
            FailedTransient("temporarily_unavailable", NOW, 4, retry_after=30.0),
        ),
        (
            ProviderServerError("oops", status=500, retryable=False),
            FailedPermanent("server_error", NOW, 4),
        ),
    ],
)
def test_errors_are_classified_by_their_retryable_flag(error: Exception, expected: Outcome) -> None:
    assert failed(error, attempted_at=NOW, version=4) == expected  # type: ignore[arg-type]


def test_the_same_inputs_give_the_same_transition() -> None:
    claim = claim_on(replace(HEALTHY, consecutive_failures=1))
    for outcome in (
        success(),
        FailedTransient("server_error", NOW, 4),
        FailedPermanent("x", NOW, 4),
    ):
        first, second = run(claim, outcome, seed=5), run(claim, outcome, seed=5)
        assert first.state == second.state
        assert [comparable(e) for e in first.events] == [comparable(e) for e in second.events]


# --- properties over many seeded-random states and outcomes ----------------------------------

CASES = 3000
ERROR_CODES = ("invalid_grant", "invalid_client", "server_error", "transport_error", "x_y")


def random_time(rng: random.Random, spread: timedelta = timedelta(days=30)) -> datetime:
    return NOW + spread * rng.uniform(-1, 1)


def maybe(rng: random.Random, value: object) -> object:
    return value if rng.random() < 0.8 else None


def random_state(rng: random.Random) -> RefreshState:
    return RefreshState(
        status=rng.choice(list(ConnectionStatus)),
        expires_at=maybe(rng, random_time(rng)),  # type: ignore[arg-type]
        next_refresh_at=maybe(rng, random_time(rng)),  # type: ignore[arg-type]
        last_refresh_at=maybe(rng, random_time(rng)),  # type: ignore[arg-type]
        last_attempt_at=maybe(rng, random_time(rng)),  # type: ignore[arg-type]
        consecutive_failures=rng.choice([0, 0, 1, 2, 3, rng.randint(4, 200)]),
        current_version=maybe(rng, rng.randint(1, 10_000)),  # type: ignore[arg-type]
        last_error=maybe(rng, rng.choice(ERROR_CODES)),  # type: ignore[arg-type]
    )


def random_outcome(rng: random.Random, state: RefreshState) -> Outcome:
    attempted = NOW - timedelta(seconds=rng.uniform(0, 600))
    version = maybe(rng, state.current_version or rng.randint(1, 10_000))
    kind = rng.randrange(4)
    if kind == 0:
        # From one second to a year; now and then zero, or already expired on arrival.
        seconds = rng.choice([0, 1, -rng.uniform(1, 3600), rng.uniform(1, 86_400 * 365)])
        lifetime = timedelta(seconds=seconds)
        obtained = attempted + timedelta(seconds=rng.uniform(0, 30))
        return Succeeded(
            version=(state.current_version or 0) + rng.randint(1, 3),
            obtained_at=obtained,
            expires_at=obtained + lifetime,
            attempted_at=attempted,
        )
    code = rng.choice(ERROR_CODES)
    if kind == 1:
        retry_after = rng.choice([None, None, rng.uniform(0, 7200)])
        return FailedTransient(code, attempted, version, retry_after)  # type: ignore[arg-type]
    if kind == 2:
        # A presentation whose answer never came: at risk until the last chance.
        intent = Intent(f"att-{rng.randrange(10**6)}", version, rng.randint(1, 10**6), attempted)  # type: ignore[arg-type]
        until = NOW + timedelta(seconds=rng.uniform(0, 7200))
        return AtRisk(intent, until, attempted, version, error_code=code, failed_now=True)  # type: ignore[arg-type]
    return FailedPermanent(code, attempted, version)  # type: ignore[arg-type]


def random_cases(seed: int) -> list[tuple[Claim, Outcome, Transition]]:
    rng = random.Random(seed)
    cases = []
    for i in range(CASES):
        claim = claim_on(random_state(rng), token=rng.randint(1, 10**9), cid=f"c-{i}")
        outcome = random_outcome(rng, claim.record.state)
        now = NOW + timedelta(seconds=rng.uniform(0, 60))
        cases.append((claim, outcome, transition(claim, outcome, now, POLICY, rng)))
    return cases


@pytest.fixture(scope="module")
def cases() -> list[tuple[Claim, Outcome, Transition]]:
    generated = random_cases(seed=20260301)
    kinds = {type(outcome) for _, outcome, _ in generated}
    assert kinds == {Succeeded, FailedTransient, FailedPermanent, AtRisk}
    return generated


def test_property_a_failure_never_changes_the_version_or_expiry(
    cases: list[tuple[Claim, Outcome, Transition]],
) -> None:
    failures = [(c, t) for c, o, t in cases if not isinstance(o, Succeeded)]
    assert len(failures) > CASES // 2
    for claim, (state, _) in failures:
        previous = claim.record.state
        assert (state.current_version, state.expires_at) == (
            previous.current_version,
            previous.expires_at,
        )
        assert state.last_refresh_at == previous.last_refresh_at
        assert state.consecutive_failures == previous.consecutive_failures + 1


def test_property_a_permanent_failure_needs_reauth_and_is_announced_exactly_once(
    cases: list[tuple[Claim, Outcome, Transition]],
) -> None:
    permanent = [(c, o, t) for c, o, t in cases if isinstance(o, FailedPermanent)]
    assert any(c.record.state.status is ConnectionStatus.NEEDS_REAUTH for c, _, _ in permanent)
    for claim, outcome, (state, events) in permanent:
        assert state.status is ConnectionStatus.NEEDS_REAUTH
        assert state.next_refresh_at is None
        if claim.record.state.status is ConnectionStatus.NEEDS_REAUTH:
            assert events == ()
        else:
            assert [e.type for e in events] == [EventType.NEEDS_REAUTH]
        # A second permanent failure, on the state the first one left, announces nothing.
        again = claim_on(state, token=claim.lease.token + 1, cid=claim.lease.connection_id)
        second = transition(again, outcome, NOW, POLICY, random.Random(0))
        assert second.events == ()
        assert second.state.status is ConnectionStatus.NEEDS_REAUTH


def test_property_a_transient_failure_reports_once_and_keeps_the_status(
    cases: list[tuple[Claim, Outcome, Transition]],
) -> None:
    for claim, outcome, (state, events) in cases:
        if isinstance(outcome, FailedTransient):
            assert state.status is claim.record.state.status
            assert [e.type for e in events] == [EventType.REFRESH_FAILED]
            assert state.next_refresh_at is not None
            assert state.next_refresh_at > events[0].occurred_at
            if outcome.retry_after is not None:
                assert state.next_refresh_at >= events[0].occurred_at + timedelta(
                    seconds=outcome.retry_after
                )


def test_property_after_a_success_the_next_refresh_is_never_after_expiry(
    cases: list[tuple[Claim, Outcome, Transition]],
) -> None:
    successes = [(c, o, t) for c, o, t in cases if isinstance(o, Succeeded)]
    assert any(o.expires_at == o.obtained_at for _, o, _ in successes)
    assert any(o.expires_at < o.obtained_at for _, o, _ in successes)
    for claim, outcome, (state, events) in successes:
        assert state.next_refresh_at is not None
        assert state.next_refresh_at <= outcome.expires_at
        if outcome.expires_at >= outcome.obtained_at:
            assert state.next_refresh_at >= outcome.obtained_at
        assert (state.status, state.consecutive_failures, state.last_error) == (
            ConnectionStatus.ACTIVE,
            0,
            None,
        )
        assert (state.current_version, state.expires_at) == (outcome.version, outcome.expires_at)
        previous = claim.record.state
        recovering = previous.consecutive_failures > 0 or (
            previous.status is ConnectionStatus.NEEDS_REAUTH
        )
        expected = [EventType.ROTATED] + ([EventType.RECOVERED] if recovering else [])
        assert [e.type for e in events] == expected


def test_property_every_event_matches_the_schema_and_its_connection(
    cases: list[tuple[Claim, Outcome, Transition]],
) -> None:
    seen: set[EventType] = set()
    for claim, outcome, (_, events) in cases:
        for event in events:
            validate(event.to_json())
            seen.add(event.type)
            assert event.connection_id == claim.lease.connection_id
            if isinstance(outcome, Succeeded):
                assert (event.version, event.failure_class) == (outcome.version, None)
            else:
                expected_class = None if isinstance(outcome, AtRisk) else outcome.failure_class
                assert (event.error_code, event.failure_class) == (
                    outcome.error_code,
                    expected_class,
                )
    # connection.connected comes from the authorization flow, not from a refresh outcome
    # (tests/unit/refresh/test_authorize.py).
    assert seen == set(EventType) - {EventType.CONNECTED}


def test_property_over_random_runs_counters_and_announcements_add_up() -> None:
    """Thread one connection's state through a random run of outcomes: the failure counter
    is the run of failures since the last success, and each entry into needs_reauth, and only
    an entry, is announced."""
    rng = random.Random(7)
    for run_number in range(200):
        state = random_state(rng)
        since_success = state.consecutive_failures
        for step in range(rng.randint(1, 30)):
            previous = state
            claim = claim_on(previous, token=step + 1, cid=f"run-{run_number}")
            outcome = random_outcome(rng, previous)
            state, events = transition(claim, outcome, NOW, POLICY, rng)
            since_success = 0 if isinstance(outcome, Succeeded) else since_success + 1
            assert state.consecutive_failures == since_success
            entered = (
                state.status is ConnectionStatus.NEEDS_REAUTH
                and previous.status is not ConnectionStatus.NEEDS_REAUTH
            )
            announced = [e for e in events if e.type is EventType.NEEDS_REAUTH]
            assert len(announced) == (1 if entered else 0)
            for event in events:
                validate(event.to_json())
