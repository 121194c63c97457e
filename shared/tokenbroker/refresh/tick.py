"""The refresh tick: lease what is due, refresh it concurrently, commit as results arrive.

Guarantees, in order of importance:

1. **No connection is lost.** A refresh token is only sent while we hold the connection's
   lease (checked just before sending), so two refreshers never present the same rotating
   refresh token. A failed refresh never writes a credential. A successful one is written as
   a new version by compare-and-set on the version it started from.
2. **A refresh counts as done only once committed**: the secret version, then the state (with
   the fencing token), then the events. Results are committed in batches as they arrive, so
   a crash loses at most one batch in flight, never the whole tick.
3. **Failures are classified, never swallowed.** Transient ones get bounded jittered retries
   (:mod:`~.kernel.retry`), then a backoff until the next tick; permanent ones get none and
   move the connection to ``needs_reauth`` with exactly one event.
4. **One connection's trouble is its own.** Any exception while refreshing one connection --
   a bug, a provider value no rule foresaw, a stored record that does not decrypt -- becomes
   that connection's failure (an unexpected exception is an ``internal_error``: logged with
   its traceback, retried with backoff, never ``needs_reauth``), with its lease given back and
   one event; the tick carries on and commits everything else.
5. **Status is law.** Only active connections are leased, by any path; a disabled or
   needs_reauth connection named explicitly is reported as ``inactive`` and left alone. An
   operator's write during a refresh retires the refresh's lease, so its commit cannot undo it.

This module is the orchestration only: leases, concurrent token requests, batched commits,
events and parked events. What an outcome does to a connection's state and which events
announce it are pure rules in :mod:`.transitions`, called once per committed outcome.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from tokenbroker.kernel.clock import Clock, SystemClock, isoformat
from tokenbroker.kernel.errors import (
    ConfigError,
    CorruptCredential,
    InternalError,
    TokenBrokerError,
    VersionConflict,
)
from tokenbroker.kernel.failpoints import failpoint
from tokenbroker.kernel.log import get_logger
from tokenbroker.kernel.model import (
    UNREFRESHED_GRANTS,
    Claim,
    ConnectionEvent,
    Credential,
    EventType,
    Lease,
    StoredCredential,
)
from tokenbroker.kernel.retry import RetryPolicy, call_with_retries
from tokenbroker.kernel.schedule import RefreshPolicy
from tokenbroker.oauth.acquire import acquire
from tokenbroker.oauth.profiles import ProviderProfile
from tokenbroker.ports import EventBus, SecretStore, SecretWrite, StateStore, TokenEndpoint
from tokenbroker.refresh.transitions import Outcome, Succeeded, Transition, failed, transition

T = TypeVar("T")

#: The jitter source of the dry run that checks a credential can be scheduled.
_PROBE = random.Random(0)  # noqa: S311 - jitter, not cryptography

# Do not start a refresh with less lease time left than this: the request plus retries plus
# commit must fit, or another refresher could take over and present the same refresh token.
LEASE_SAFETY_MARGIN = timedelta(seconds=30)


def default_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class TickSummary:
    """What one tick did. ``due`` counts what was selected plus what others held leases on."""

    due: int = 0
    claimed: int = 0
    refreshed: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    skipped_leased: int = 0
    #: Claimed, but the lease had too little time left to send a refresh token safely.
    deferred: int = 0
    lease_lost: int = 0
    #: Results (refreshed or failed) that could not be committed: the tick then raised.
    uncommitted: int = 0
    events_parked: int = 0
    events_relayed: int = 0
    events_lost: int = 0
    #: Connections this tick moved to needs_reauth (a failure of one already there is only
    #: counted in ``failed``).
    needs_reauth: int = 0
    recovered: int = 0
    retries: int = 0
    missing: list[str] = field(default_factory=list)
    #: Named connections left alone because they are not active: id -> status.
    inactive: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (
            self.failed or self.missing or self.lease_lost or self.uncommitted or self.events_lost
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "due": self.due,
            "claimed": self.claimed,
            "refreshed": self.refreshed,
            "failed": {
                "transient": self.failed["transient"],
                "permanent": self.failed["permanent"],
                "internal": self.failed["internal"],
            },
            "skipped_leased": self.skipped_leased,
            "deferred": self.deferred,
            "lease_lost": self.lease_lost,
            "uncommitted": self.uncommitted,
            "events_parked": self.events_parked,
            "events_relayed": self.events_relayed,
            "events_lost": self.events_lost,
            "needs_reauth": self.needs_reauth,
            "recovered": self.recovered,
            "retries": self.retries,
            "missing": list(self.missing),
            "inactive": dict(self.inactive),
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class _Attempt:
    """What a worker did with one claim, waiting to be committed."""

    claim: Claim
    #: The credential the attempt started from (``None``: none is stored, or it is corrupt).
    stored: StoredCredential | None
    #: The refreshed credential, the final error, or ``None``: deferred, nothing was sent.
    result: Credential | TokenBrokerError | None
    attempted_at: datetime

    @property
    def version(self) -> int | None:
        """The version the attempt started from, as far as anyone knows."""
        if self.stored is not None:
            return self.stored.version
        return self.claim.record.state.current_version


class Refresher:
    def __init__(
        self,
        *,
        secrets: SecretStore,
        state: StateStore,
        events: EventBus,
        profiles: Mapping[str, ProviderProfile],
        clock: Clock | None = None,
        policy: RefreshPolicy | None = None,
        retry: RetryPolicy | None = None,
        store_retry: RetryPolicy | None = None,
        holder: str | None = None,
        lease_ttl: timedelta = timedelta(minutes=5),
        concurrency: int = 256,
        commit_batch: int = 500,
        rng: random.Random | None = None,
    ) -> None:
        self.secrets = secrets
        self.state = state
        self.events = events
        self.profiles = profiles
        self.clock = clock or SystemClock()
        self.policy = policy or RefreshPolicy()
        self.retry = retry or RetryPolicy()
        #: Store calls get more patience than token requests: their results are irreplaceable.
        self.store_retry = store_retry or RetryPolicy(attempts=5, base_delay=0.2, max_delay=4.0)
        self.holder = holder or default_holder()
        self.lease_ttl = lease_ttl
        self.concurrency = concurrency
        self.commit_batch = commit_batch
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._committing: asyncio.Event | None = None
        self.log = get_logger(component="refresher")

    async def tick(
        self,
        endpoint: TokenEndpoint,
        *,
        connection_ids: Sequence[str] | None = None,
        limit: int = 10_000,
        progress: Callable[[int, int], None] | None = None,
    ) -> TickSummary:
        """Refresh what is due (or exactly ``connection_ids``, due or not).

        Raises :class:`StoreUnavailable` (after committing what it could) when results cannot
        be committed; no refresh token is sent after that point.
        """
        started = self.clock.monotonic()
        now = self.clock.now()
        summary = TickSummary()
        await self._relay_parked_events(summary)
        if connection_ids is None:
            batch = await self._store(
                "claim", self.state.claim_due, now, holder=self.holder, ttl=self.lease_ttl,
                limit=limit,
            )  # fmt: skip
        else:
            batch = await self._store(
                "claim", self.state.claim, connection_ids, now, holder=self.holder,
                ttl=self.lease_ttl,
            )  # fmt: skip
        if batch.claims:
            failpoint("lease.claimed")
        summary.due = len(batch.claims) + batch.leased_elsewhere
        summary.claimed = len(batch.claims)
        summary.skipped_leased = batch.leased_elsewhere
        summary.missing = list(batch.missing)
        summary.inactive = {cid: status.value for cid, status in batch.inactive.items()}
        for cid, status in batch.inactive.items():
            self.log.warning(
                "not refreshed: the connection is not active", connection_id=cid, status=status
            )
        halted: TokenBrokerError | None = None
        if batch.claims:
            stored = await self._store(
                "read credentials", self.secrets.get_many,
                [c.lease.connection_id for c in batch.claims],
            )  # fmt: skip
            halted = await self._run(endpoint, batch.claims, stored, summary, progress)
        summary.seconds = self.clock.monotonic() - started
        if halted is not None:
            self.log.error(
                "refresh tick halted: results could not be committed",
                holder=self.holder,
                error_code=halted.code,
                **summary.to_json(),
            )
            raise halted
        self.log.info("refresh tick finished", holder=self.holder, **summary.to_json())
        return summary

    async def _store(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A store call in a worker thread, retried with backoff while it is retryable.

        While a commit step is retrying, ``self._committing`` is cleared so workers pause:
        refresh tokens sent now would produce results that may not be storable.
        """

        def on_retry(attempt: int, error: TokenBrokerError, _wait: float) -> None:
            if self._committing is not None:
                self._committing.clear()
            self.log.warning(
                "store call retrying", operation=what, attempt=attempt, error_code=error.code
            )

        result, _ = await call_with_retries(
            lambda: asyncio.to_thread(fn, *args, **kwargs),
            self.store_retry,
            self.clock,
            self.rng,
            on_retry,
        )
        return result

    async def _run(
        self,
        endpoint: TokenEndpoint,
        claims: list[Claim],
        stored: Mapping[str, StoredCredential | CorruptCredential],
        summary: TickSummary,
        progress: Callable[[int, int], None] | None,
    ) -> TokenBrokerError | None:
        """Refresh concurrently while committing results as they arrive. If committing fails
        for good, stop sending refresh tokens at once and return the error."""
        # Bounded: when commits stall, workers block instead of piling up unstored results.
        queue: asyncio.Queue[_Attempt | None] = asyncio.Queue(
            maxsize=max(self.commit_batch, self.concurrency)
        )
        pending = iter(claims)
        halt: list[TokenBrokerError] = []
        committing = self._committing = asyncio.Event()
        committing.set()

        async def worker() -> None:
            for claim in pending:
                await committing.wait()  # paused while a commit is retrying
                if halt:
                    return  # nothing could be stored: sending refresh tokens would lose them
                cid = claim.lease.connection_id
                attempt = await self._refresh_one(endpoint, claim, stored.get(cid), summary)
                await queue.put(attempt)

        committer = asyncio.create_task(
            self._commit_loop(
                queue, summary, progress, len(claims), halt=halt, committing=committing
            )
        )
        try:
            workers = [
                asyncio.create_task(worker()) for _ in range(min(self.concurrency, len(claims)))
            ]
            await asyncio.gather(*workers)
        finally:
            await queue.put(None)
            await committer
        return halt[0] if halt else None

    async def _refresh_one(
        self,
        endpoint: TokenEndpoint,
        claim: Claim,
        stored: StoredCredential | CorruptCredential | None,
        summary: TickSummary,
    ) -> _Attempt:
        """One connection's refresh, whatever happens a value: an unexpected exception is
        that connection's :class:`InternalError`, never the tick's."""
        now = self.clock.now()
        try:
            return await self._attempt(endpoint, claim, stored, summary, now)
        except Exception as exc:  # contained to this connection, alerted with its traceback
            self.log.exception(
                "refresh failed (internal error): a bug or an unforeseen value",
                connection_id=claim.lease.connection_id,
                error_type=type(exc).__name__,
            )
            readable = stored if isinstance(stored, StoredCredential) else None
            internal = InternalError(
                f"connection {claim.lease.connection_id!r}: unexpected {type(exc).__name__}"
            )
            return _Attempt(claim, readable, internal, now)

    async def _attempt(
        self,
        endpoint: TokenEndpoint,
        claim: Claim,
        stored: StoredCredential | CorruptCredential | None,
        summary: TickSummary,
        now: datetime,
    ) -> _Attempt:
        connection = claim.record.connection
        refusal = self._refusal(claim, stored, now)
        if refusal is not None:
            return refusal
        assert isinstance(stored, StoredCredential)  # noqa: S101 - _refusal checked it
        profile = self.profiles[connection.profile]

        def on_retry(attempt: int, error: TokenBrokerError, wait: float) -> None:
            summary.retries += 1
            self.log.info(
                "refresh retrying",
                connection_id=connection.id,
                attempt=attempt,
                error_code=error.code,
                wait_seconds=round(wait, 3),
            )

        try:
            credential, _ = await call_with_retries(
                lambda: acquire(endpoint, connection, profile, stored.credential, self.clock.now()),
                self.retry,
                self.clock,
                self.rng,
                on_retry,
            )
        except TokenBrokerError as error:
            return _Attempt(claim, stored, error, now)
        failpoint("answer.received")
        self._check_storable(credential)
        return _Attempt(claim, stored, credential, now)

    def _refusal(
        self, claim: Claim, stored: StoredCredential | CorruptCredential | None, now: datetime
    ) -> _Attempt | None:
        """Why nothing may be sent for this claim, as its attempt (``None``: go ahead)."""
        connection = claim.record.connection
        if isinstance(stored, CorruptCredential):
            return _Attempt(claim, None, stored, now)  # nothing is sent from a bad record
        if connection.grant in UNREFRESHED_GRANTS:
            return _Attempt(claim, stored, None, now)  # nothing expires: leave it
        if claim.lease.expires_at - now < LEASE_SAFETY_MARGIN:
            # Too late to send a refresh token safely; leave it for the next tick.
            return _Attempt(claim, stored, None, now)
        if stored is None:
            missing = ConfigError(f"connection {connection.id!r} has no stored credential")
            return _Attempt(claim, None, missing, now)
        if connection.profile not in self.profiles:
            unknown = ConfigError(f"connection {connection.id!r}: unknown profile")
            return _Attempt(claim, stored, unknown, now)
        return None

    def _check_storable(self, credential: Credential) -> None:
        """Run now what committing the credential will run (serialising it, scheduling its
        next refresh), so that a value that breaks either fails here, as this connection's
        error, before anything is written."""
        assert credential.obtained_at is not None  # noqa: S101 - acquire() stamps both
        assert credential.expires_at is not None  # noqa: S101
        self.policy.next_refresh_at(credential.obtained_at, credential.expires_at, _PROBE)
        credential.to_plaintext()

    async def _commit_loop(
        self,
        queue: asyncio.Queue[_Attempt | None],
        summary: TickSummary,
        progress: Callable[[int, int], None] | None,
        total: int,
        *,
        halt: list[TokenBrokerError],
        committing: asyncio.Event,
    ) -> None:
        done = False
        committed = 0
        while not done:
            first = await queue.get()
            batch: list[_Attempt] = []
            if first is None:
                done = True
            else:
                batch.append(first)
            while len(batch) < self.commit_batch and not queue.empty():
                item = queue.get_nowait()
                if item is None:
                    done = True
                    break
                batch.append(item)
            if not batch:
                continue
            try:
                await self._commit(batch, summary)
            except TokenBrokerError as error:
                committing.set()  # release the workers: they see the halt and stop
                # Keep trying later batches (in-flight refreshes hold rotated tokens that are
                # nowhere else), but start no new refresh.
                halt.append(error)
                summary.uncommitted += len(batch)
                self.log.error(
                    "refresh results not committed",
                    error_code=error.code,
                    connections=[o.claim.lease.connection_id for o in batch],
                )
                continue
            committing.set()
            committed += len(batch)
            if progress is not None:
                progress(committed, total)

    async def _commit(self, batch: list[_Attempt], summary: TickSummary) -> None:
        """Secret versions first, then states (fenced), then events. Each step is retried
        while retryable; a step that fails for good raises."""
        now = self.clock.now()
        releases = [a.claim.lease for a in batch if a.result is None]
        summary.deferred += len(releases)
        written, discarded = await self._write_credentials(batch, summary)
        changes = self._transitions(batch, written, now)
        for lease in releases + discarded:
            await self._store("release lease", self.state.release, lease)

        updates = [(lease, change.state) for lease, _, change in changes]
        accepted = (
            await self._store("write states", self.state.complete, updates) if updates else []
        )
        if updates:
            failpoint("state.committed")
        to_publish: list[ConnectionEvent] = []
        for (lease, outcome, change), ok in zip(changes, accepted, strict=True):
            if not ok:
                summary.lease_lost += 1
                self.log.warning(
                    "refresh state not committed: lease lost", connection_id=lease.connection_id
                )
                continue
            to_publish.extend(change.events)
            _count(summary, outcome, change.events)
        if to_publish:
            await self._publish(to_publish, summary)

    async def _write_credentials(
        self, batch: list[_Attempt], summary: TickSummary
    ) -> tuple[list[tuple[Claim, Succeeded]], list[Lease]]:
        """Write each refreshed credential by compare-and-set on the version it started from.
        Returns the successes as committed, and the leases of those a newer version beat."""
        refreshed = [
            (a.claim, a.result, a.stored, a.attempted_at)
            for a in batch
            if isinstance(a.result, Credential) and a.stored is not None
        ]
        if not refreshed:
            return [], []
        writes = [
            SecretWrite(claim.lease.connection_id, credential, stored.version)
            for claim, credential, stored, _ in refreshed
        ]
        results = await self._store("write credentials", self.secrets.put_many, writes)
        failpoint("secret.written")
        written: list[tuple[Claim, Succeeded]] = []
        discarded: list[Lease] = []
        for (claim, credential, _, attempted_at), result in zip(refreshed, results, strict=True):
            if isinstance(result, VersionConflict):
                # Someone re-authorised the connection meanwhile: their version wins.
                summary.lease_lost += 1
                self.log.warning(
                    "refresh discarded: newer version exists",
                    connection_id=claim.lease.connection_id,
                )
                discarded.append(claim.lease)
                continue
            written.append((claim, _succeeded(credential, result, attempted_at)))
        return written, discarded

    def _transitions(
        self, batch: list[_Attempt], written: list[tuple[Claim, Succeeded]], now: datetime
    ) -> list[tuple[Lease, Outcome, Transition]]:
        """Each committed success's and each failure's transition, in that order (the order
        the scheduling jitter is drawn from ``self.rng``)."""
        changes: list[tuple[Lease, Outcome, Transition]] = []
        for claim, success in written:
            change = transition(claim, success, now, self.policy, self.rng)
            self.log.debug(
                "credential rotated",
                connection_id=claim.lease.connection_id,
                version=success.version,
                expires_at=isoformat(success.expires_at),
            )
            changes.append((claim.lease, success, change))
        for attempt in batch:
            if isinstance(error := attempt.result, TokenBrokerError):
                failure = failed(error, attempted_at=attempt.attempted_at, version=attempt.version)
                change = transition(attempt.claim, failure, now, self.policy, self.rng)
                self._log_failure(attempt.claim.lease.connection_id, error, change)
                changes.append((attempt.claim.lease, failure, change))
        return changes

    async def _publish(self, events: list[ConnectionEvent], summary: TickSummary) -> None:
        """Publish, or park the events in the state store for a later tick to relay: the
        credentials are committed already, and their announcements must not be lost."""
        try:
            await self._store("publish events", self.events.publish, events)
        except TokenBrokerError as error:
            self.log.error(
                "events not published; parking them", error_code=error.code, count=len(events)
            )
        else:
            failpoint("events.published")
            return
        try:
            await self._store("park events", self.state.park_events, events)
            summary.events_parked += len(events)
        except TokenBrokerError as error:
            summary.events_lost += len(events)
            self.log.error(
                "events lost: neither published nor parked",
                error_code=error.code,
                idempotency_keys=[e.idempotency_key for e in events],
            )

    async def _relay_parked_events(self, summary: TickSummary) -> None:
        try:
            parked = await self._store("read parked events", self.state.parked_events, 1000)
            if not parked:
                return
            await self._store("publish events", self.events.publish, parked)
            await self._store(
                "unpark events", self.state.unpark_events, [e.event_id for e in parked]
            )
        except TokenBrokerError as error:
            self.log.warning("parked events not relayed yet", error_code=error.code)
            return
        summary.events_relayed += len(parked)
        self.log.info("parked events relayed", count=len(parked))

    def _log_failure(self, cid: str, error: TokenBrokerError, change: Transition) -> None:
        fields = {
            "connection_id": cid,
            "error_code": error.code,
            "attempts": error.attempts,
            "error": error.message,
        }
        if isinstance(error, InternalError):
            self.log.error(
                "refresh failed (internal): retried with backoff",
                **fields,
                consecutive_failures=change.state.consecutive_failures,
                next_refresh_at=isoformat(change.state.next_refresh_at),
            )
        elif error.retryable:
            self.log.warning(
                "refresh failed (transient)",
                **fields,
                consecutive_failures=change.state.consecutive_failures,
                next_refresh_at=isoformat(change.state.next_refresh_at),
            )
        else:
            self.log.error(
                "refresh failed (permanent): connection needs re-authorisation", **fields
            )


def _succeeded(credential: Credential, version: int, attempted_at: datetime) -> Succeeded:
    # acquire() stamps both times on every credential it returns.
    assert credential.obtained_at is not None  # noqa: S101
    assert credential.expires_at is not None  # noqa: S101
    return Succeeded(version, credential.obtained_at, credential.expires_at, attempted_at)


def _count(summary: TickSummary, outcome: Outcome, events: Sequence[ConnectionEvent]) -> None:
    if isinstance(outcome, Succeeded):
        summary.refreshed += 1
    else:
        summary.failed[outcome.failure_class] += 1
    for event in events:
        if event.type is EventType.RECOVERED:
            summary.recovered += 1
        elif event.type is EventType.NEEDS_REAUTH:
            summary.needs_reauth += 1
