"""The refresh tick: lease what is due, refresh it concurrently, commit as results arrive.

Guarantees, in order of importance:

1. **No connection is lost.** A refresh token is only sent while we hold the connection's
   lease with at least ``lease_guard`` of it left, checked by a fenced renewal before every
   attempt -- retries included -- and kept alive by a heartbeat while the request is in
   flight (:mod:`.leases`); lease time is the state store's clock, never ours. So two
   refreshers never present the same rotating refresh token. A failed refresh never writes a
   credential, except to keep a refresh token the provider sent in an answer we reject (it is
   the only one left alive). A successful one is written as a new version by compare-and-set
   on the version it started from.
2. **An ambiguous answer is never retried with the same token.** For a provider that rotates
   refresh tokens, a request that may have been answered (a timeout or reset after it was
   sent, a 200 we reject) may have consumed the token: presenting it again would look like
   theft and revoke the grant. Such an attempt ends the tick for that connection.
3. **A refresh counts as done only once committed**: the secret version, then the state (with
   the fencing token), then the events. Results are committed in batches as they arrive; at
   most ``max_at_risk`` presented refreshes are ever waiting for their commit, and while a
   store call is retrying no new refresh token is sent, so a slow or failing store pauses
   presenting instead of piling up answers it cannot keep.
4. **Failures are classified, never swallowed.** Transient ones get bounded jittered retries
   (:mod:`~.kernel.retry`), then a backoff until the next tick; permanent ones get none and
   move the connection to ``needs_reauth`` with exactly one event.
5. **One connection's trouble is its own.** Any exception while refreshing one connection --
   a bug, a provider value no rule foresaw, a stored record that does not decrypt -- becomes
   that connection's failure (an unexpected exception is an ``internal_error``: logged with
   its traceback, retried with backoff, never ``needs_reauth``), with its lease given back and
   one event; the tick carries on and commits everything else.
6. **Status is law.** Only active connections are leased, by any path; a disabled or
   needs_reauth connection named explicitly is reported as ``inactive`` and left alone. An
   operator's write during a refresh retires the refresh's lease, so its commit cannot undo it.

This module is the orchestration only: leases, concurrent token requests, batched commits,
events and parked events. What an outcome does to a connection's state and which events
announce it are pure rules in :mod:`.transitions`, called once per committed outcome.
"""

from __future__ import annotations

import asyncio
import enum
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
    MalformedResponse,
    ProviderError,
    TokenBrokerError,
    TransportError,
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
    GrantType,
    Lease,
    StoredCredential,
)
from tokenbroker.kernel.retry import RetryPolicy, call_with_retries
from tokenbroker.kernel.schedule import RefreshPolicy
from tokenbroker.oauth.acquire import next_credential, request_token
from tokenbroker.oauth.profiles import ProviderProfile
from tokenbroker.ports import EventBus, SecretStore, SecretWrite, StateStore, TokenEndpoint
from tokenbroker.refresh.leases import LeaseKeeper
from tokenbroker.refresh.transitions import Outcome, Succeeded, Transition, failed, transition

T = TypeVar("T")

#: Leases are short so that a crashed holder's connections come free within seconds; a live
#: holder keeps the ones it uses alive by heartbeat (every ``ttl / 3``).
DEFAULT_LEASE_TTL = timedelta(seconds=30)
#: Never present a refresh token with less lease than this left: the request (bounded by the
#: HTTP timeout, 10 s by default) must end before anyone else could take the lease over, even
#: if every heartbeat after it failed.
DEFAULT_LEASE_GUARD = timedelta(seconds=15)

#: The jitter source of the dry run that checks a credential can be scheduled.
_PROBE = random.Random(0)  # noqa: S311 - jitter, not cryptography


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
    #: Leases taken over (or retired by an operator's write) before the outcome was committed.
    lease_lost: int = 0
    #: Renewals the state store could not answer: presenting stopped (an outage, alertable).
    lease_unavailable: int = 0
    #: Results (refreshed or failed) that could not be committed: the tick then raised.
    uncommitted: int = 0
    #: Attempts whose outcome is unknown (the answer may have consumed a rotating token).
    unknown_outcome: int = 0
    #: Refresh tokens kept from answers that were otherwise rejected.
    salvaged: int = 0
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
            self.failed
            or self.missing
            or self.lease_lost
            or self.lease_unavailable
            or self.uncommitted
            or self.events_lost
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
            "lease_unavailable": self.lease_unavailable,
            "uncommitted": self.uncommitted,
            "unknown_outcome": self.unknown_outcome,
            "salvaged": self.salvaged,
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


class _Skip(enum.Enum):
    """Why an attempt has no outcome to commit."""

    #: Nothing was sent (too little lease left, an unrefreshed grant, presenting halted): the
    #: lease is given back.
    DEFERRED = "deferred"
    #: The lease was taken over or retired: it is not ours to give back.
    LOST = "lost"
    #: The state store could not renew the lease: nothing was sent, and the lease will expire
    #: by itself (giving it back would need the store that is down).
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class _Attempt:
    """What a worker did with one claim, waiting to be committed."""

    claim: Claim
    #: The credential the attempt started from (``None``: none is stored, or it is corrupt).
    stored: StoredCredential | None
    #: The refreshed credential, the final error, or why there is nothing to commit.
    result: Credential | TokenBrokerError | _Skip
    attempted_at: datetime
    #: A credential to store although the attempt failed: the stored one with the refresh
    #: token a rejected answer carried (the provider already swapped the old one for it).
    salvage: Credential | None = None
    #: Whether this attempt holds one of the ``max_at_risk`` permits (released once committed).
    permit: bool = False

    @property
    def version(self) -> int | None:
        """The version the attempt started from, as far as anyone knows."""
        if self.stored is not None:
            return self.stored.version
        return self.claim.record.state.current_version


@dataclass
class _Run:
    """What one tick's workers and committer share."""

    endpoint: TokenEndpoint
    leases: LeaseKeeper
    #: Permits to present: at most ``max_at_risk`` refreshes wait for their commit.
    at_risk: asyncio.Semaphore
    summary: TickSummary


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
        lease_ttl: timedelta = DEFAULT_LEASE_TTL,
        lease_guard: timedelta = DEFAULT_LEASE_GUARD,
        concurrency: int = 256,
        max_at_risk: int | None = None,
        commit_batch: int = 500,
        rng: random.Random | None = None,
    ) -> None:
        if lease_guard >= lease_ttl:
            raise ConfigError(
                f"the lease ({lease_ttl.total_seconds():g} s) must be longer than the guard"
                f" kept before presenting a refresh token ({lease_guard.total_seconds():g} s)"
            )
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
        self.lease_guard = lease_guard
        self.concurrency = concurrency
        #: At most this many presented refreshes wait for their commit at any time.
        self.max_at_risk = max_at_risk or concurrency
        self.commit_batch = commit_batch
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._committing: asyncio.Event | None = None
        self._halt: list[TokenBrokerError] = []
        self.log = get_logger(component="refresher")

    async def tick(
        self,
        endpoint: TokenEndpoint,
        *,
        connection_ids: Sequence[str] | None = None,
        limit: int = 10_000,
        progress: Callable[[int, int], None] | None = None,
    ) -> TickSummary:
        """Refresh what is due (or exactly ``connection_ids``, due or not, if active).

        Raises :class:`StoreUnavailable` (after committing what it could) when results cannot
        be committed or leases cannot be renewed; no refresh token is sent after that point.
        """
        started = self.clock.monotonic()
        now = self.clock.now()
        summary = TickSummary()
        self._halt = []
        await self._relay_parked_events(summary)
        asked = self.clock.monotonic()
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
        if batch.claims:
            stored = await self._store(
                "read credentials", self.secrets.get_many,
                [c.lease.connection_id for c in batch.claims],
            )  # fmt: skip
            leases = LeaseKeeper(
                batch.claims,
                renew=self._renew,
                ttl=self.lease_ttl,
                clock=self.clock,
                asked_at=asked,
                log=self.log,
            )
            run = _Run(endpoint, leases, asyncio.Semaphore(self.max_at_risk), summary)
            async with leases.beating(self.lease_ttl.total_seconds() / 3):
                await self._run(run, batch.claims, stored, progress)
        summary.seconds = self.clock.monotonic() - started
        if self._halt:
            self.log.error(
                "refresh tick halted: results could not be committed or leases renewed",
                holder=self.holder,
                error_code=self._halt[0].code,
                **summary.to_json(),
            )
            raise self._halt[0]
        self.log.info("refresh tick finished", holder=self.holder, **summary.to_json())
        return summary

    async def _store(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A store call in a worker thread, retried with backoff while it is retryable.

        While a store call is retrying, ``self._committing`` is cleared so workers pause:
        refresh tokens sent now would produce results that may not be storable.
        """

        def on_retry(attempt: int, error: TokenBrokerError, _wait: float) -> None:
            if self._committing is not None:
                self._committing.clear()
            self.log.warning(
                "store call retrying", operation=what, attempt=attempt, error_code=error.code
            )

        try:
            result, _ = await call_with_retries(
                lambda: asyncio.to_thread(fn, *args, **kwargs),
                self.store_retry,
                self.clock,
                self.rng,
                on_retry,
            )
        finally:
            if self._committing is not None and not self._halt:
                self._committing.set()
        return result

    async def _renew(self, leases: list[Lease]) -> list[Lease | None]:
        return await self._store("renew leases", self.state.renew, leases, ttl=self.lease_ttl)

    def _halting(self, error: TokenBrokerError) -> None:
        """Stop presenting refresh tokens for the rest of the tick."""
        if not self._halt:
            self._halt.append(error)
        if self._committing is not None:
            self._committing.set()  # release paused workers: they see the halt and stop

    async def _run(
        self,
        run: _Run,
        claims: list[Claim],
        stored: Mapping[str, StoredCredential | CorruptCredential],
        progress: Callable[[int, int], None] | None,
    ) -> None:
        """Refresh concurrently while committing results as they arrive. If committing (or
        renewing) fails for good, stop sending refresh tokens at once."""
        queue: asyncio.Queue[_Attempt | None] = asyncio.Queue()
        pending = iter(claims)
        committing = self._committing = asyncio.Event()
        committing.set()

        async def worker() -> None:
            for claim in pending:
                attempt = await self._refresh_one(run, claim, stored.get(claim.lease.connection_id))
                await queue.put(attempt)

        committer = asyncio.create_task(self._commit_loop(run, queue, progress, len(claims)))
        try:
            workers = [
                asyncio.create_task(worker()) for _ in range(min(self.concurrency, len(claims)))
            ]
            await asyncio.gather(*workers)
        finally:
            await queue.put(None)
            await committer
            self._committing = None

    async def _refresh_one(
        self, run: _Run, claim: Claim, stored: StoredCredential | CorruptCredential | None
    ) -> _Attempt:
        """One connection's refresh, whatever happens a value: an unexpected exception is
        that connection's :class:`InternalError`, never the tick's."""
        now = self.clock.now()
        try:
            refusal = self._refusal(claim, stored, now)
            if refusal is not None:
                return refusal
            assert isinstance(stored, StoredCredential)  # noqa: S101 - _refusal checked it
            return await self._attempts(run, claim, stored)
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

    def _refusal(
        self, claim: Claim, stored: StoredCredential | CorruptCredential | None, now: datetime
    ) -> _Attempt | None:
        """Why nothing may be sent for this claim, as its attempt (``None``: go ahead)."""
        connection = claim.record.connection
        if isinstance(stored, CorruptCredential):
            return _Attempt(claim, None, stored, now)  # nothing is sent from a bad record
        if connection.grant in UNREFRESHED_GRANTS:
            return _Attempt(claim, stored, _Skip.DEFERRED, now)  # nothing expires: leave it
        if stored is None:
            missing = ConfigError(f"connection {connection.id!r} has no stored credential")
            return _Attempt(claim, None, missing, now)
        if connection.profile not in self.profiles:
            unknown = ConfigError(f"connection {connection.id!r}: unknown profile")
            return _Attempt(claim, stored, unknown, now)
        return None

    async def _attempts(self, run: _Run, claim: Claim, stored: StoredCredential) -> _Attempt:
        """Present the refresh token until an outcome: each attempt renews the lease first
        and needs the guard left; an ambiguous answer for a rotating token ends it."""
        connection = claim.record.connection
        cid = connection.id
        profile = self.profiles[connection.profile]
        rotating = profile.rotates_refresh_tokens and connection.grant is GrantType.REFRESH_TOKEN
        leases, at_risk, summary = run.leases, run.at_risk, run.summary
        number = 1
        while True:
            await at_risk.acquire()
            ready = await self._ready(claim, stored, leases, summary)
            if ready is not None:
                at_risk.release()
                return ready
            attempted_at = self.clock.now()
            leases.in_flight.add(cid)
            try:
                response = await request_token(
                    run.endpoint, connection, profile, stored.credential, attempted_at
                )
            except TokenBrokerError as error:
                salvage = self._salvage(stored, error)
                if rotating and _ambiguous(error):
                    summary.unknown_outcome += 1
                    self.log.warning(
                        "refresh outcome unknown: not retried with the same refresh token",
                        connection_id=cid,
                        error_code=error.code,
                    )
                    return _Attempt(claim, stored, error, attempted_at, salvage, permit=True)
                wait = self.retry.delay(number, error, self.rng)
                if wait is None or salvage is not None:
                    error.attempts = number
                    return _Attempt(claim, stored, error, attempted_at, salvage, permit=True)
                leases.in_flight.discard(cid)
                at_risk.release()
                summary.retries += 1
                self.log.info(
                    "refresh retrying",
                    connection_id=cid,
                    attempt=number,
                    error_code=error.code,
                    wait_seconds=round(wait, 3),
                )
                await self.clock.sleep(wait)
                number += 1
                continue
            failpoint("answer.received")
            try:
                credential = next_credential(
                    connection, profile, stored.credential, response, attempted_at
                )
                self._check_storable(credential)
            except Exception as exc:  # the provider's answer is in hand: keep its token
                self.log.exception(
                    "refresh failed (internal error) after the provider answered",
                    connection_id=cid,
                    error_type=type(exc).__name__,
                )
                internal = InternalError(f"connection {cid!r}: unexpected {type(exc).__name__}")
                salvage = None
                if response.refresh_token is not None:
                    salvage = stored.credential.with_token(refresh_token=response.refresh_token)
                return _Attempt(claim, stored, internal, attempted_at, salvage, permit=True)
            return _Attempt(claim, stored, credential, attempted_at, permit=True)

    async def _ready(
        self, claim: Claim, stored: StoredCredential, leases: LeaseKeeper, summary: TickSummary
    ) -> _Attempt | None:
        """Whether a refresh token may be presented now: ``None`` if so, else the attempt
        that ends here. Waits while a store call is retrying."""
        cid = claim.lease.connection_id
        now = self.clock.now()
        if self._committing is not None:
            await self._committing.wait()  # paused while a store call is retrying
        if self._halt:
            return _Attempt(claim, stored, _Skip.DEFERRED, now)
        try:
            lease = await leases.renew(cid)
        except TokenBrokerError as error:
            summary.lease_unavailable += 1
            self.log.error(
                "lease store unavailable: presenting stopped",
                connection_id=cid,
                error_code=error.code,
            )
            self._halting(error)
            return _Attempt(claim, stored, _Skip.UNAVAILABLE, now)
        if lease is None:
            self.log.warning("lease lost before presenting: not refreshed", connection_id=cid)
            return _Attempt(claim, stored, _Skip.LOST, now)
        if leases.left(cid) < self.lease_guard.total_seconds():
            self.log.warning(
                "too little lease left to present a refresh token: deferred",
                connection_id=cid,
                seconds_left=round(leases.left(cid), 3),
            )
            return _Attempt(claim, stored, _Skip.DEFERRED, now)
        if self._halt:
            return _Attempt(claim, stored, _Skip.DEFERRED, now)
        return None

    @staticmethod
    def _salvage(stored: StoredCredential, error: TokenBrokerError) -> Credential | None:
        """The credential to keep from a rejected answer that carried a new refresh token."""
        token = error.refresh_token if isinstance(error, MalformedResponse) else None
        if token is None or token == stored.credential.refresh_token:
            return None
        return stored.credential.with_token(refresh_token=token)

    def _check_storable(self, credential: Credential) -> None:
        """Run now what committing the credential will run (serialising it, scheduling its
        next refresh), so that a value that breaks either fails here, as this connection's
        error, before anything is written."""
        assert credential.obtained_at is not None  # noqa: S101 - next_credential stamps both
        assert credential.expires_at is not None  # noqa: S101
        self.policy.next_refresh_at(credential.obtained_at, credential.expires_at, _PROBE)
        credential.to_plaintext()

    async def _commit_loop(
        self,
        run: _Run,
        queue: asyncio.Queue[_Attempt | None],
        progress: Callable[[int, int], None] | None,
        total: int,
    ) -> None:
        summary = run.summary
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
                await self._commit(batch, run.leases, summary)
            except TokenBrokerError as error:
                # Keep trying later batches (in-flight refreshes hold rotated tokens that are
                # nowhere else), but start no new refresh.
                self._halting(error)
                summary.uncommitted += len(batch)
                self.log.error(
                    "refresh results not committed",
                    error_code=error.code,
                    connections=[o.claim.lease.connection_id for o in batch],
                )
            else:
                committed += len(batch)
                if progress is not None:
                    progress(committed, total)
            finally:
                for attempt in batch:
                    run.leases.in_flight.discard(attempt.claim.lease.connection_id)
                    if attempt.permit:
                        run.at_risk.release()

    async def _commit(
        self, batch: list[_Attempt], leases: LeaseKeeper, summary: TickSummary
    ) -> None:
        """Secret versions first, then states (fenced), then events. Each step is retried
        while retryable; a step that fails for good raises."""
        now = self.clock.now()
        releases = [
            leases.lease(a.claim.lease.connection_id) for a in batch if a.result is _Skip.DEFERRED
        ]
        summary.deferred += len(releases)
        summary.lease_lost += sum(1 for a in batch if a.result is _Skip.LOST)
        written, salvaged, discarded = await self._write_credentials(batch, summary)
        changes = self._transitions(batch, written, salvaged, leases, now)
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
    ) -> tuple[list[tuple[_Attempt, Succeeded]], dict[int, int], list[Lease]]:
        """Write each refreshed (or salvaged) credential by compare-and-set on the version it
        started from. Returns the successes as committed, the salvaged versions (by the
        attempt's position in ``batch``), and the leases of refreshes a newer version beat."""
        writes: list[tuple[int, _Attempt, Credential]] = []
        for index, attempt in enumerate(batch):
            if attempt.stored is None:
                continue
            if isinstance(attempt.result, Credential):
                writes.append((index, attempt, attempt.result))
            elif attempt.salvage is not None:
                writes.append((index, attempt, attempt.salvage))
        if not writes:
            return [], {}, []
        results = await self._store(
            "write credentials",
            self.secrets.put_many,
            [
                SecretWrite(a.claim.lease.connection_id, credential, a.stored.version)  # type: ignore[union-attr]
                for _, a, credential in writes
            ],
        )
        failpoint("secret.written")
        written: list[tuple[_Attempt, Succeeded]] = []
        salvaged: dict[int, int] = {}
        discarded: list[Lease] = []
        for (index, attempt, credential), result in zip(writes, results, strict=True):
            cid = attempt.claim.lease.connection_id
            if isinstance(result, VersionConflict):
                # Someone re-authorised the connection meanwhile: their version wins.
                self.log.warning("refresh discarded: newer version exists", connection_id=cid)
                if isinstance(attempt.result, Credential):
                    summary.lease_lost += 1
                    discarded.append(attempt.claim.lease)
                continue
            if isinstance(attempt.result, Credential):
                written.append((attempt, _succeeded(credential, result, attempt.attempted_at)))
            else:
                salvaged[index] = result
                summary.salvaged += 1
                self.log.warning(
                    "kept the refresh token of a rejected answer", connection_id=cid, version=result
                )
        return written, salvaged, discarded

    def _transitions(
        self,
        batch: list[_Attempt],
        written: list[tuple[_Attempt, Succeeded]],
        salvaged: dict[int, int],
        leases: LeaseKeeper,
        now: datetime,
    ) -> list[tuple[Lease, Outcome, Transition]]:
        """Each committed success's and each failure's transition, in that order (the order
        the scheduling jitter is drawn from ``self.rng``)."""
        changes: list[tuple[Lease, Outcome, Transition]] = []
        for attempt, success in written:
            claim = attempt.claim
            change = transition(claim, success, now, self.policy, self.rng)
            self.log.debug(
                "credential rotated",
                connection_id=claim.lease.connection_id,
                version=success.version,
                expires_at=isoformat(success.expires_at),
            )
            changes.append((leases.lease(claim.lease.connection_id), success, change))
        for index, attempt in enumerate(batch):
            if isinstance(error := attempt.result, TokenBrokerError):
                failure = failed(
                    error,
                    attempted_at=attempt.attempted_at,
                    version=attempt.version,
                    salvaged=salvaged.get(index),
                )
                change = transition(attempt.claim, failure, now, self.policy, self.rng)
                self._log_failure(attempt.claim.lease.connection_id, error, change)
                changes.append((leases.lease(attempt.claim.lease.connection_id), failure, change))
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


#: Gateway answers (RFC 9110 §15.6.3, §15.6.5): a proxy in front of the provider speaks, and
#: whether the provider processed the request behind it is unknown.
_GATEWAY_STATUSES = frozenset({502, 504})


def _ambiguous(error: TokenBrokerError) -> bool:
    """Whether the provider may have acted on the request without our learning the result:
    it may have been delivered and answered (a timeout or reset once sent, a gateway's 502 or
    504), or it was answered with a 200 we reject. For a rotating refresh token any of these
    may mean the token is consumed."""
    if isinstance(error, TransportError):
        return error.request_sent
    if isinstance(error, MalformedResponse):
        return True
    return isinstance(error, ProviderError) and error.status in _GATEWAY_STATUSES


def _succeeded(credential: Credential, version: int, attempted_at: datetime) -> Succeeded:
    # next_credential() stamps both times on every credential it returns.
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
