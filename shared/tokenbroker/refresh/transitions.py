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

A failure never changes ``expires_at``, nor ``current_version`` -- unless the rejected answer
carried a new refresh token, which is kept as a new version (``salvaged``) holding the same
access token: a rotating provider has already retired the one we sent.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from datetime import datetime
from typing import ClassVar, NamedTuple, assert_never

from tokenbroker.kernel.errors import InternalError, TokenBrokerError
from tokenbroker.kernel.model import (
    Claim,
    ConnectionEvent,
    ConnectionStatus,
    EventType,
    RefreshState,
)
from tokenbroker.kernel.schedule import RefreshPolicy

__all__ = [
    "Failed",
    "FailedInternal",
    "FailedPermanent",
    "FailedTransient",
    "Outcome",
    "Succeeded",
    "Transition",
    "failed",
    "transition",
]


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


@dataclass(frozen=True)
class FailedPermanent:
    """A failure no retry can fix: the grant or client is refused (RFC 6749 §5.2), or the
    connection is misconfigured."""

    failure_class: ClassVar[str] = "permanent"

    error_code: str
    attempted_at: datetime
    #: The version the attempt started from (``None``: no credential was stored).
    version: int | None


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


Failed = FailedTransient | FailedInternal | FailedPermanent
Outcome = Succeeded | FailedTransient | FailedInternal | FailedPermanent


def failed(
    error: TokenBrokerError,
    *,
    attempted_at: datetime,
    version: int | None,
    salvaged: int | None = None,
) -> Failed:
    """Classify a final error by its ``retryable`` flag, the one flag that decides retries
    everywhere (:mod:`tokenbroker.kernel.errors`); our own bugs are their own class.
    ``salvaged``: the version that keeps a refresh token the failed answer carried (only a
    retryable failure can carry one)."""
    if isinstance(error, InternalError):
        return FailedInternal(error.code, attempted_at, version, salvaged=salvaged)
    if error.retryable:
        return FailedTransient(error.code, attempted_at, version, error.retry_after, salvaged)
    return FailedPermanent(error.code, attempted_at, version)


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
    if previous.consecutive_failures or previous.status is ConnectionStatus.NEEDS_REAUTH:
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
    if isinstance(outcome, FailedTransient | FailedInternal):
        status = previous.status
        next_refresh_at = policy.retry_at(now, failures, outcome.retry_after, rng)
        event_type = EventType.REFRESH_FAILED
        announce = True
        if outcome.salvaged is not None:
            # The answer was rejected but its refresh token was kept as a new version (the
            # same access token): that version is the one in force now.
            current_version = version = outcome.salvaged
    else:
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
    )
