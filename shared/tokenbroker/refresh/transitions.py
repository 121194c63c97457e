"""What one refresh outcome does to a connection: its next state and the events announcing it.

Values in, values out: no store, no network, no logging, no clock (``now`` is an argument and
the scheduling jitter comes from the ``rng`` passed in). The refresh tick (:mod:`.tick`) does
the I/O around these rules -- leases, token requests, compare-and-set writes, publishing -- and
calls :func:`transition` once for each outcome it commits. Keeping the rules apart (the
sans-I/O shape of h11 and wsproto) lets them be read in one place and tested over many states
without a store or a token server.

The rules, as documented for subscribers in docs/events.md:

* **Success** -> ``active`` with the new version and its expiry, the next refresh scheduled
  ahead of expiry (:class:`~tokenbroker.kernel.schedule.RefreshPolicy`), failures reset; one
  ``credential.rotated``, plus ``connection.recovered`` when failures or a ``needs_reauth``
  preceded it.
* **Transient failure** (the provider or the network may answer later) -> a backoff before the
  next attempt, one more consecutive failure, one ``refresh.failed``.
* **Internal failure** (an unexpected exception: a bug, or a provider value no rule foresaw) ->
  treated like a transient one -- backoff, one more failure, one ``refresh.failed`` -- but with
  its own ``failure_class`` (``internal``) so that it is alerted and counted apart, and never
  ``needs_reauth``: the provider refused nothing.
* **Permanent failure** (RFC 6749 §5.2 ``invalid_grant``, ``invalid_client``, ...; retrying the
  same refresh token cannot help) -> ``needs_reauth`` and no scheduled refresh, announced by
  exactly one ``connection.needs_reauth``. A connection that already needs re-authorisation is
  not announced again: a human has been told, and only a re-authorisation changes anything.

* **Unknown outcome** (a rotating refresh token was presented and the answer never arrived:
  a timeout after sending, a reset, a gateway error, a crash -- the :class:`~.model.Intent`
  recorded before presenting is all that is left) -> the token may be spent, so it is never
  presented again straight away (:func:`unknown_outcome`): within the provider's reuse-grace
  window a retry may recover; otherwise the connection is **at risk** -- its access token is
  served until shortly before it expires, when the old refresh token is presented once more as
  the last step -- announced once by ``refresh.at_risk``.

A failure never changes ``expires_at``, nor ``current_version`` -- unless the rejected answer
carried a new refresh token, which is kept as a new version (``salvaged``) holding the same
access token: a rotating provider has already retired the one we sent.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import ClassVar, NamedTuple, assert_never

from tokenbroker.kernel.errors import InternalError, TokenBrokerError
from tokenbroker.kernel.model import (
    Claim,
    ConnectionEvent,
    ConnectionStatus,
    EventType,
    Intent,
    RefreshState,
    recovery_step,
)
from tokenbroker.kernel.schedule import RefreshPolicy

__all__ = [
    "LAST_CHANCE",
    "AtRisk",
    "Deferred",
    "Failed",
    "FailedInternal",
    "FailedPermanent",
    "FailedTransient",
    "Outcome",
    "Plan",
    "Succeeded",
    "Transition",
    "failed",
    "transition",
    "unknown_outcome",
]

#: How long before an at-risk connection's access token expires the old refresh token is
#: presented as the last step (shorter than a tick interval would be wrong: keep ticks at a
#: minute or less).
LAST_CHANCE = timedelta(minutes=2)


@dataclass(frozen=True)
class Succeeded:
    """A refresh whose new credential is committed as ``version``."""

    version: int
    obtained_at: datetime
    expires_at: datetime
    #: When the refresh token was sent.
    attempted_at: datetime


@dataclass(frozen=True)
class FailedTransient:
    """A failure worth trying again later (network, 5xx, 429, a malformed body) that outlasted
    the tick's own retries."""

    failure_class: ClassVar[str] = "transient"

    error_code: str
    attempted_at: datetime
    #: The version the attempt started from (``None``: no credential was stored).
    version: int | None
    #: Seconds the provider asked us to wait (``Retry-After``, RFC 9110 §10.2.3), if it said.
    retry_after: float | None = None
    #: The version committed to keep a refresh token the rejected answer carried, if any.
    salvaged: int | None = None
    #: The intent whose outcome is still unknown after this failure (kept in the state), or
    #: ``None``: the failure answered the question (the token was not consumed).
    intent: Intent | None = None
    #: When to try again, if not by the backoff (a retry within a reuse-grace window).
    retry_at: datetime | None = None


@dataclass(frozen=True)
class FailedPermanent:
    """A failure no retry can fix: the grant or client is refused (RFC 6749 §5.2), or the
    connection is misconfigured."""

    failure_class: ClassVar[str] = "permanent"

    error_code: str
    attempted_at: datetime
    #: The version the attempt started from (``None``: no credential was stored).
    version: int | None
    #: The version committed to keep a refresh token the refusal carried (a 200 with tokens
    #: and an ``error``): the operator's ``enable`` then resumes from it.
    salvaged: int | None = None


@dataclass(frozen=True)
class FailedInternal:
    """An unexpected exception while refreshing (:class:`~.errors.InternalError`): retried
    with backoff like a transient failure, counted and alerted as its own class."""

    failure_class: ClassVar[str] = "internal"

    error_code: str
    attempted_at: datetime
    #: The version the attempt started from (``None``: no credential was stored).
    version: int | None
    retry_after: float | None = None
    #: The version committed to keep a refresh token the provider had sent, if any.
    salvaged: int | None = None
    intent: Intent | None = None
    retry_at: datetime | None = None


@dataclass(frozen=True)
class AtRisk:
    """The outcome of ``intent`` is unknown and the refresh token may be spent: keep serving
    the access token and present the refresh token only at ``until``, as the last step."""

    failure_class: ClassVar[str] = "at_risk"

    intent: Intent
    until: datetime
    attempted_at: datetime
    #: The version in force.
    version: int | None
    error_code: str = "unknown_outcome"
    #: This tick's own presentation failed ambiguously (counted as a failure), rather than
    #: an earlier one found without an outcome.
    failed_now: bool = False


@dataclass(frozen=True)
class Deferred:
    """Nothing was sent: a token-endpoint budget was spent (:mod:`.budget`). Only when the
    next refresh is due changes -- no failure is counted, no error recorded, no event."""

    next_refresh_at: datetime
    #: The slot frees only after the last safe moment before expiry (alerted).
    at_risk: bool = False


Failed = FailedTransient | FailedInternal | FailedPermanent
Outcome = Succeeded | FailedTransient | FailedInternal | FailedPermanent | AtRisk | Deferred


class Plan(enum.Enum):
    """What to do with a connection whose last presentation's outcome is unknown."""

    #: Present now: within the provider's reuse-grace window (the previous token is still
    #: accepted for a while after rotation), or as the last step before the access token
    #: expires.
    PRESENT = "present"
    #: Do not present: serve the access token; present at the returned time.
    WAIT = "wait"


def unknown_outcome(
    intent: Intent,
    *,
    store_now: datetime,
    now: datetime,
    access_expires_at: datetime | None,
    reuse_grace: timedelta,
) -> tuple[Plan, datetime | None]:
    """The plan for a connection found with ``intent`` and no outcome.

    ``store_now`` is the state store's clock (``intent.at`` is on it); ``now`` and
    ``access_expires_at`` are wall-clock times. An intent whose age is unknown (no ``at``, or
    from another clock epoch) is treated as outside any grace window.
    """
    age = store_now - intent.at if intent.at is not None else None
    if reuse_grace > timedelta(0) and age is not None and timedelta(0) <= age <= reuse_grace:
        return Plan.PRESENT, None
    if access_expires_at is None:
        return Plan.PRESENT, None  # nothing to keep serving: the last step is now
    last_chance = access_expires_at - LAST_CHANCE
    if now >= last_chance:
        return Plan.PRESENT, None
    return Plan.WAIT, last_chance


def failed(
    error: TokenBrokerError,
    *,
    attempted_at: datetime,
    version: int | None,
    salvaged: int | None = None,
    intent: Intent | None = None,
    retry_at: datetime | None = None,
) -> Failed:
    """Classify a final error by its ``retryable`` flag, the one flag that decides retries
    everywhere (:mod:`tokenbroker.kernel.errors`); our own bugs are their own class.
    ``salvaged``: the version that keeps a refresh token the failed answer carried (only a
    retryable failure can carry one). ``intent``: the presentation whose outcome is still
    unknown after this failure; ``retry_at``: an earlier retry than the backoff."""
    if isinstance(error, InternalError):
        return FailedInternal(
            error.code, attempted_at, version, salvaged=salvaged, intent=intent, retry_at=retry_at
        )
    if error.retryable:
        return FailedTransient(
            error.code, attempted_at, version, error.retry_after, salvaged, intent, retry_at
        )
    return FailedPermanent(error.code, attempted_at, version, salvaged)


class Transition(NamedTuple):
    """The state to commit for a connection and the events to publish once it is committed."""

    state: RefreshState
    events: tuple[ConnectionEvent, ...]


def transition(
    claim: Claim, outcome: Outcome, now: datetime, policy: RefreshPolicy, rng: random.Random
) -> Transition:
    """The connection's next state and events after ``outcome``, committed at ``now``.

    ``claim`` is the lease and record the refresh was made under: the record's state is the
    one being replaced, and the lease's fencing token tells one attempt's failure events from
    another's. ``rng`` draws the scheduling jitter.
    """
    match outcome:
        case Succeeded():
            return _succeeded(claim, outcome, now, policy, rng)
        case FailedTransient() | FailedInternal() | FailedPermanent():
            return _failed(claim, outcome, now, policy, rng)
        case AtRisk():
            return _at_risk(claim, outcome, now)
        case Deferred():
            state = replace(claim.record.state, next_refresh_at=outcome.next_refresh_at)
            return Transition(state, ())
        case _:
            assert_never(outcome)


def _succeeded(
    claim: Claim, outcome: Succeeded, now: datetime, policy: RefreshPolicy, rng: random.Random
) -> Transition:
    previous = claim.record.state
    due = policy.next_refresh_at(outcome.obtained_at, outcome.expires_at, rng)
    state = RefreshState(
        status=ConnectionStatus.ACTIVE,
        expires_at=outcome.expires_at,
        # Never after expiry, even for a credential that arrived already expired.
        next_refresh_at=min(due, outcome.expires_at),
        last_refresh_at=now,
        last_attempt_at=outcome.attempted_at,
        consecutive_failures=0,
        current_version=outcome.version,
        last_error=None,
    )
    # Keyed by the new version: a version is committed once, so redeliveries share the key.
    key = f"v{outcome.version}"
    version, expires_at = outcome.version, outcome.expires_at
    events = [_event(EventType.ROTATED, claim, now, key, version=version, expires_at=expires_at)]
    if (
        previous.consecutive_failures
        or previous.at_risk
        or previous.status is ConnectionStatus.NEEDS_REAUTH
    ):
        recovered = _event(
            EventType.RECOVERED,
            claim,
            now,
            key,
            version=version,
            expires_at=expires_at,
            # How many failures preceded the recovery (docs/events.md).
            consecutive_failures=previous.consecutive_failures,
        )
        events.append(recovered)
    return Transition(state, tuple(events))


def _failed(
    claim: Claim, outcome: Failed, now: datetime, policy: RefreshPolicy, rng: random.Random
) -> Transition:
    previous = claim.record.state
    failures = previous.consecutive_failures + 1
    current_version = previous.current_version
    version = outcome.version
    intent: Intent | None = None
    if isinstance(outcome, FailedTransient | FailedInternal):
        status = previous.status
        next_refresh_at = outcome.retry_at or policy.retry_at(
            now, failures, outcome.retry_after, rng
        )
        event_type = EventType.REFRESH_FAILED
        announce = True
        intent = outcome.intent
        if outcome.salvaged is not None:
            # The answer was rejected but its refresh token was kept as a new version (the
            # same access token): that version is the one in force now.
            current_version = version = outcome.salvaged
            intent = None  # the question is answered: the kept token is the live one
    else:
        if outcome.salvaged is not None:
            current_version = version = outcome.salvaged  # kept, though the grant was refused
        status = ConnectionStatus.NEEDS_REAUTH
        next_refresh_at = None  # only a re-authorisation schedules it again
        event_type = EventType.NEEDS_REAUTH
        announce = previous.status is not ConnectionStatus.NEEDS_REAUTH
    state = replace(
        previous,
        status=status,
        next_refresh_at=next_refresh_at,
        last_attempt_at=outcome.attempted_at,
        consecutive_failures=failures,
        current_version=current_version,
        last_error=outcome.error_code,
        intent=intent,
        # Still at risk while an unknown outcome is outstanding; no longer once answered.
        at_risk=previous.at_risk and intent is not None,
    )
    if not announce:
        return Transition(state, ())
    # Keyed by the lease's fencing token: each lease is one attempt, announced once.
    event = _event(
        event_type,
        claim,
        now,
        f"lease{claim.lease.token}",
        version=version,
        expires_at=previous.expires_at,
        error_code=outcome.error_code,
        failure_class=outcome.failure_class,
        consecutive_failures=failures,
        next_step=(
            recovery_step(claim.lease.connection_id, claim.record.connection.grant)
            if event_type is EventType.NEEDS_REAUTH
            else None
        ),
    )
    return Transition(state, (event,))


def _at_risk(claim: Claim, outcome: AtRisk, now: datetime) -> Transition:
    previous = claim.record.state
    failures = previous.consecutive_failures + (1 if outcome.failed_now else 0)
    state = replace(
        previous,
        next_refresh_at=outcome.until,
        last_attempt_at=outcome.attempted_at,
        consecutive_failures=failures,
        last_error=outcome.error_code
        if outcome.failed_now
        else previous.last_error or outcome.error_code,
        intent=outcome.intent,
        at_risk=True,
    )
    if previous.at_risk:
        return Transition(state, ())  # announced when it became at risk
    # Keyed by the attempt whose outcome is unknown: that is the happening announced.
    event = _event(
        EventType.AT_RISK,
        claim,
        now,
        f"attempt{outcome.intent.attempt}",
        version=outcome.version,
        expires_at=previous.expires_at,
        error_code=state.last_error,
        consecutive_failures=failures,
    )
    return Transition(state, (event,))


def _event(
    event_type: EventType,
    claim: Claim,
    now: datetime,
    discriminator: str,
    *,
    version: int | None,
    expires_at: datetime | None,
    error_code: str | None = None,
    failure_class: str | None = None,
    consecutive_failures: int = 0,
    next_step: str | None = None,
) -> ConnectionEvent:
    cid = claim.lease.connection_id
    return ConnectionEvent(
        type=event_type,
        connection_id=cid,
        occurred_at=now,
        idempotency_key=ConnectionEvent.key_for(event_type, cid, discriminator),
        version=version,
        expires_at=expires_at,
        error_code=error_code,
        failure_class=failure_class,
        consecutive_failures=consecutive_failures,
        next_step=next_step,
    )
