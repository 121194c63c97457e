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
3. **Durable as soon as answered.** Before a rotating refresh token is presented, an
   :class:`~.model.Intent` is recorded with the lease renewal (one fenced write); the moment
   the provider answers, the new credential is *staged* -- a pending version, durable, that
   every later read settles even if this process dies (:meth:`.SecretStore.stage`); stages
   and renewals of the workers released together are grouped into one store call. The
   commit then promotes the version, writes the state under the lease and puts the events in
   the state store's outbox in the same commit (:class:`~.ports.RefreshCommitter`), and the
   events are relayed from there. At most ``max_at_risk`` presented refreshes are ever
   waiting for their commit, and while a store call is retrying no new refresh token is sent,
   so a slow or failing store pauses presenting instead of piling up answers it cannot keep.
   A connection found with an intent and no outcome is never presented again blindly: see
   :func:`.transitions.unknown_outcome` (retry within the provider's reuse-grace window, or
   serve the access token and present once more just before it expires).
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
import contextlib
import enum
import os
import random
import socket
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

from tokenbroker.kernel.clock import Clock, SystemClock, isoformat
from tokenbroker.kernel.errors import (
    ConfigError,
    CorruptCredential,
    InternalError,
    ProviderError,
    TokenBrokerError,
    VersionConflict,
)
from tokenbroker.kernel.failpoints import failpoint
from tokenbroker.kernel.log import get_logger
from tokenbroker.kernel.metrics import Recorder
from tokenbroker.kernel.model import (
    UNREFRESHED_GRANTS,
    Claim,
    Connection,
    ConnectionEvent,
    Credential,
    EventType,
    GrantType,
    Intent,
    Lease,
    Shard,
    StoredCredential,
    recovery_step,
)
from tokenbroker.kernel.retry import RetryPolicy, call_with_retries
from tokenbroker.kernel.schedule import RefreshPolicy
from tokenbroker.oauth.acquire import next_credential, request_token
from tokenbroker.oauth.budget import BudgetRequest, budget_request, store_budget
from tokenbroker.oauth.profiles import ProviderProfile
from tokenbroker.oauth.token_response import TokenResponse
from tokenbroker.ports import (
    ClaimBatch,
    CommitOutcome,
    Completion,
    EventBus,
    Promotion,
    RefreshCommitter,
    RequestQuota,
    SecretStore,
    SecretWrite,
    StateStore,
    TokenEndpoint,
)
from tokenbroker.refresh.budget import BudgetDeferral, DeferralKind, defer, report
from tokenbroker.refresh.commit import committer_for
from tokenbroker.refresh.leases import GroupCall, LeaseKeeper
from tokenbroker.refresh.transitions import (
    AtRisk,
    Deferred,
    Outcome,
    Plan,
    Succeeded,
    Transition,
    failed,
    transition,
    unknown_outcome,
)

T = TypeVar("T")
#: A chunk's credentials as the secret store read them.
Reading = Mapping[str, StoredCredential | CorruptCredential]
#: Claims handed to the workers, each with its chunk's read; ``None`` ends the feed.
_Ready = asyncio.Queue[tuple[Claim, "asyncio.Future[Reading]"] | None]

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
    #: Connections left at risk: an unknown outcome, the access token served meanwhile.
    at_risk: int = 0
    #: Answers of earlier attempts found staged (a crashed refresher's) and committed.
    settled: int = 0
    #: Refresh tokens kept from answers that were otherwise rejected.
    salvaged: int = 0
    #: Deferred because a token-endpoint budget was spent (counted in ``deferred`` too), and
    #: of those, the ones whose slot frees only after the last safe moment (alerted).
    over_budget: int = 0
    over_budget_at_risk: int = 0
    #: Claimed, then given back because the store's request quota (Secret Manager's per
    #: project) was spent by others: left due for a later tick. ``quota_limited``: the claim
    #: was capped at one quota window's worth of refreshes (more may be due).
    quota_deferred: int = 0
    quota_limited: bool = False
    events_parked: int = 0
    events_relayed: int = 0
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
            or self.events_parked
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
            "over_budget": self.over_budget,
            "over_budget_at_risk": self.over_budget_at_risk,
            "quota_deferred": self.quota_deferred,
            "quota_limited": self.quota_limited,
            "lease_lost": self.lease_lost,
            "lease_unavailable": self.lease_unavailable,
            "uncommitted": self.uncommitted,
            "unknown_outcome": self.unknown_outcome,
            "at_risk": self.at_risk,
            "settled": self.settled,
            "salvaged": self.salvaged,
            "events_parked": self.events_parked,
            "events_relayed": self.events_relayed,
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
    #: The answer lost to a newer version (an operator's re-authorisation): given back.
    SUPERSEDED = "superseded"


@dataclass(frozen=True)
class _Settled:
    """An earlier attempt's answer was staged and is current now (its writer died, or its
    commit lost the lease): commit the state it belongs to, present nothing."""


@dataclass(frozen=True)
class _Wait:
    """The outcome of ``intent`` is unknown: present nothing until ``until``."""

    intent: Intent
    until: datetime


@dataclass(frozen=True)
class _Attempt:
    """What a worker did with one claim, waiting to be committed."""

    claim: Claim
    #: The credential the attempt started from (``None``: none is stored, or it is corrupt).
    stored: StoredCredential | None
    #: The refreshed credential, the final error, or what else there is to commit.
    result: Credential | TokenBrokerError | _Skip | _Settled | _Wait | BudgetDeferral
    attempted_at: datetime
    #: A credential to store although the attempt failed: the stored one with the refresh
    #: token a rejected answer carried (the provider already swapped the old one for it).
    salvage: Credential | None = None
    #: The pending version the answer (or the salvage) was staged as; ``None``: not yet.
    staged: int | None = None
    #: The intent recorded before presenting, when the outcome is still unknown after it.
    intent: Intent | None = None
    #: Whether this attempt holds one of the ``max_at_risk`` permits (released once committed).
    permit: bool = False

    @property
    def version(self) -> int | None:
        """The version the attempt started from, as far as anyone knows."""
        if self.stored is not None:
            return self.stored.version
        return self.claim.record.state.current_version

    @property
    def keeps(self) -> Credential | None:
        """The credential to make current: the answer, or the salvage."""
        return self.result if isinstance(self.result, Credential) else self.salvage


@dataclass
class _Run:
    """What one tick's workers and committer share."""

    endpoint: TokenEndpoint
    leases: LeaseKeeper
    #: Permits to present: at most ``max_at_risk`` refreshes wait for their commit.
    at_risk: asyncio.Semaphore
    summary: TickSummary
    #: Answers staged as they arrive, grouped into one store call.
    stager: GroupCall[SecretWrite, int | TokenBrokerError]
    #: Refreshes committed so far, by every committer (for ``progress``).
    committed: int = 0
    #: Claims handed to the workers so far (it grows as the tick claims chunk by chunk).
    total: int = 0


class _ClaimStream:
    """A tick's claims, taken as it goes: the due set ``claim_chunk`` connections at a time,
    the next chunk claimed while the workers refresh the current one (so refreshing starts
    after the first chunk, and no lease waits long for its worker), or the named connections
    at once. Each chunk passes the store's request quota (:meth:`Refresher._admit`) before any
    of it is handed out; the first whose admission falls short is the last."""

    def __init__(
        self,
        refresher: Refresher,
        now: datetime,
        *,
        named: Sequence[str] | None,
        cap: int,
        shard: Shard | None,
        quota: RequestQuota | None,
        summary: TickSummary,
    ) -> None:
        self.refresher = refresher
        self.now = now
        self.named = named
        self.cap = cap
        self.shard = shard
        self.quota = quota
        self.summary = summary
        #: Claims taken so far, before the quota's admission (the cap counts these).
        self.taken = 0
        self.done = False
        #: Why a later chunk could not be claimed (the tick fails with it once it is done).
        self.failed: TokenBrokerError | None = None

    @property
    def expected(self) -> int:
        """The most claims this tick can hand out (how many workers are worth starting)."""
        return len(self.named) if self.named is not None else self.cap

    async def first(self) -> list[Claim]:
        """The first chunk (or every named connection); raises what the store raised."""
        r, summary = self.refresher, self.summary
        if self.named is not None:
            batch = await r._store(
                "claim", r.state.claim, self.named, self.now, holder=r.holder,
                ttl=r.lease_ttl,
            )  # fmt: skip
            self.done = True
        else:
            batch = await self._claim_due()
        if batch.claims:
            failpoint("lease.claimed")
        # Counted once, before this tick holds anything: later chunks' counts include its own.
        summary.due = summary.skipped_leased = batch.leased_elsewhere
        summary.missing = list(batch.missing)
        summary.inactive = {cid: status.value for cid, status in batch.inactive.items()}
        for cid, status in batch.inactive.items():
            r.log.warning(
                "not refreshed: the connection is not active", connection_id=cid, status=status
            )
        return await self._admitted(list(batch.claims), self.now)

    async def more(self, leases: LeaseKeeper) -> list[Claim]:
        """The next chunk, its leases added to ``leases``; ``[]`` once there is no more (all
        claimed, the cap or the quota reached, the tick halted, or the claim failed:
        ``failed``)."""
        r = self.refresher
        while not self.done and not r._halt:
            # Our own claim must not take back a lease of ours that is about to run out.
            await leases.renew_expiring(r.lease_ttl.total_seconds() / 2)
            asked = r.clock.monotonic()
            try:
                batch = await self._claim_due()
            except Exception as error:  # noqa: BLE001 - a store error or a bug: claiming ends
                # What is held is still seen through (renewing and committing are their own
                # calls, and halt the tick if they fail too); the tick then fails with this.
                self._stop(error)
                return []
            # A connection this tick took already comes back only if its lease expired while
            # the heartbeat could not renew it (a store that failed for a while), or if its
            # attempt gave the lease back still due (a deferral). It is never handed out
            # again: its one attempt goes on under the newer lease if nothing was written
            # since (``LeaseKeeper.adopt``); if something was, the first lease is superseded
            # and its renewal fails, so it is presented under neither.
            again = [c for c in batch.claims if leases.holds(c.lease.connection_id)]
            adopted = [c.lease.connection_id for c in again if leases.adopt(c, asked_at=asked)]
            if len(adopted) < len(again):
                r.log.warning(
                    "claimed again in the same tick, changed meanwhile: not refreshed twice",
                    connections=[c.lease.connection_id for c in again
                                 if c.lease.connection_id not in adopted],
                )  # fmt: skip
            got = [c for c in batch.claims if not leases.holds(c.lease.connection_id)]
            if r._halt:  # the tick halted while this chunk was claimed: none of it is used
                await self._give_back(got)
                return []
            if not got:
                continue  # a chunk of nothing but those: the next one may hold more
            try:
                claims = await self._admitted(got, r.clock.now())
            except Exception as error:  # noqa: BLE001 - as a failed claim
                await self._give_back(got)
                self._stop(error)
                return []
            leases.add(claims, asked_at=asked)
            return claims
        return []

    def _stop(self, error: Exception) -> None:
        """Claim nothing more; the tick fails with ``error`` once what it holds is done."""
        if not isinstance(error, TokenBrokerError):
            self.refresher.log.exception(  # noqa: LOG004 - only called from except blocks
                "claiming failed (internal error): a bug or an unforeseen value",
                error_type=type(error).__name__,
            )
            error = InternalError(f"claiming raised {type(error).__name__}")
        self.failed = error
        self.done = True

    async def _claim_due(self) -> ClaimBatch:
        r = self.refresher
        want = min(r.claim_chunk, self.cap - self.taken)
        batch = await r._store(
            "claim", r.state.claim_due, self.now, holder=r.holder, ttl=r.lease_ttl,
            limit=want, shard=self.shard,
        )  # fmt: skip
        self.taken += len(batch.claims)
        if len(batch.claims) < want or self.taken >= self.cap:
            self.done = True
        self.summary.quota_limited = self.quota is not None and self.taken >= self.cap
        return batch

    async def _admitted(self, claims: list[Claim], now: datetime) -> list[Claim]:
        """The claims the store's request quota admits (spent from the shared budget at
        ``now``), the rest given back; counted only once admitted, so claims handed back
        after a failure count nowhere (they stay due)."""
        r, summary = self.refresher, self.summary
        claimed = len(claims)
        if self.quota is not None and claims:
            admitted = await r._admit(self.quota, len(claims), now)
            if admitted < len(claims):
                claims = await r._release_unadmitted(claims, admitted, summary)
                self.done = True
        summary.due += claimed
        summary.claimed += len(claims)
        return claims

    async def _give_back(self, claims: Sequence[Claim]) -> None:
        """Release leases this tick will not use (a store that cannot answer: they expire)."""
        state = self.refresher.state

        def release() -> None:
            for claim in claims:
                state.release(claim.lease)

        with contextlib.suppress(TokenBrokerError):
            await self.refresher._store("release leases", release)


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
        answer_retry: RetryPolicy | None = None,
        holder: str | None = None,
        lease_ttl: timedelta = DEFAULT_LEASE_TTL,
        lease_guard: timedelta = DEFAULT_LEASE_GUARD,
        concurrency: int = 256,
        max_at_risk: int | None = None,
        commit_batch: int = 500,
        committers: int = 1,
        read_chunk: int = 100,
        claim_chunk: int = 250,
        committer: RefreshCommitter | None = None,
        rng: random.Random | None = None,
        metrics: Recorder | None = None,
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
        #: Staging an answer in hand gets the most: nothing else holds its refresh token, and
        #: presenting is paused meanwhile (about three minutes of a retryable outage -- longer
        #: than a lease, at most ``max_at_risk`` answers held).
        self.answer_retry = answer_retry or RetryPolicy(attempts=90, base_delay=0.5, max_delay=4.0)
        self.holder = holder or default_holder()
        self.lease_ttl = lease_ttl
        self.lease_guard = lease_guard
        self.concurrency = concurrency
        #: At most this many presented refreshes wait for their commit at any time.
        self.max_at_risk = max_at_risk or concurrency
        self.commit_batch = commit_batch
        #: Commit loops running at once, each on its own batches (disjoint connections: a
        #: connection is in one batch per tick, and keeps secret -> state -> events order in
        #: it). One where a single database serialises commits anyway (embedded); several
        #: where every commit waits on network round trips (docs/gcp.md, "The tick").
        self.committers = max(1, committers)
        #: Credentials are read this many claims at a time, the next chunk while the workers
        #: refresh the current one: refreshing starts after the first chunk's read.
        self.read_chunk = max(1, read_chunk)
        #: Due connections are claimed this many at a time, the next chunk while the current
        #: one is refreshed (:class:`_ClaimStream`).
        self.claim_chunk = max(1, claim_chunk)
        #: Promotes staged versions and writes states with their events (atomically where
        #: one store holds both: the composition root passes the embedded one).
        self.committer = committer or committer_for(secrets, state)
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        #: Where token requests' latencies are counted (``refresh/acquisition_latency``).
        self.metrics = metrics
        self._committing: asyncio.Event | None = None
        #: Store calls retrying now (the workers pause while there is one).
        self._retrying = 0
        self._halt: list[TokenBrokerError] = []
        #: Publishes of committed batches still running (awaited before the tick returns).
        self._publishing: list[asyncio.Future[None]] | None = None
        self.log = get_logger(component="refresher")

    async def tick(
        self,
        endpoint: TokenEndpoint,
        *,
        connection_ids: Sequence[str] | None = None,
        limit: int = 10_000,
        progress: Callable[[int, int], None] | None = None,
        shard: Shard | None = None,
    ) -> TickSummary:
        """Refresh what is due (or exactly ``connection_ids``, due or not, if active); with
        ``shard`` (a fan-out worker), only the due connections of that shard.

        Raises :class:`StoreUnavailable` (after committing what it could) when results cannot
        be committed or leases cannot be renewed; no refresh token is sent after that point.
        """
        started = self.clock.monotonic()
        now = self.clock.now()
        summary = TickSummary()
        self._halt = []
        self._retrying = 0
        await self._relay_parked_events(summary)
        # The store's request quota (Secret Manager's per project): never claim more than one
        # window of it can carry; what is left stays due for the next tick, earliest first.
        quota = self.secrets.request_quota()
        cap = limit if quota is None else min(limit, quota.refreshes_per_window)
        claiming = _ClaimStream(
            self, now, named=connection_ids, cap=cap, shard=shard, quota=quota, summary=summary
        )
        asked = self.clock.monotonic()
        claims = await claiming.first()
        if claims:
            leases = LeaseKeeper(
                claims,
                renew=self._renew,
                ttl=self.lease_ttl,
                clock=self.clock,
                asked_at=asked,
                log=self.log,
            )
            run = _Run(
                endpoint,
                leases,
                asyncio.Semaphore(self.max_at_risk),
                summary,
                GroupCall(self._stage),
            )
            async with leases.beating(self.lease_ttl.total_seconds() / 3):
                await self._run(run, claims, progress, claiming)
        summary.seconds = self.clock.monotonic() - started
        if self._halt:
            self.log.error(
                "refresh tick halted: results could not be committed or leases renewed",
                holder=self.holder,
                error_code=self._halt[0].code,
                **summary.to_json(),
            )
            raise self._halt[0]
        if claiming.failed is not None:
            self.log.error(
                "refresh tick cut short: the next chunk could not be claimed",
                holder=self.holder,
                error_code=claiming.failed.code,
                **summary.to_json(),
            )
            raise claiming.failed
        self.log.info("refresh tick finished", holder=self.holder, **summary.to_json())
        return summary

    async def _admit(self, quota: RequestQuota, wanted: int, now: datetime) -> int:
        """How many of ``wanted`` claimed refreshes the store's request quota lets start now,
        spent at once from the budget every refresher on the project shares (one state-store
        write per tick, not one per refresh). Another refresher may spend between a denial
        and the next take: a few tries, each asking for what the last denial left."""
        limit = quota.refreshes_per_window
        asked = min(wanted, limit)
        for _ in range(3):
            decision = await self._store(
                "take request quota", self.state.take_budget, f"{quota.key}:refreshes",
                limit=limit, window=quota.window, now=now, cost=asked,
            )  # fmt: skip
            if decision.granted:
                return asked
            asked = min(asked, limit - decision.used)
            if asked <= 0:
                break
        return 0

    async def _release_unadmitted(
        self, claims: list[Claim], admitted: int, summary: TickSummary
    ) -> list[Claim]:
        """Give back the leases of the claims the quota did not admit (the latest due: claims
        come earliest first); they stay due, untouched, for a later tick."""
        kept, excess = claims[:admitted], claims[admitted:]
        summary.quota_deferred += len(excess)

        def release() -> None:
            for claim in excess:
                self.state.release(claim.lease)

        await self._store("release leases", release)
        self.log.warning(
            "the store's request quota is spent: refreshes left due for a later tick",
            admitted=admitted,
            deferred=len(excess),
        )
        return kept

    async def _store(
        self,
        what: str,
        fn: Callable[..., T],
        *args: Any,
        retry_policy: RetryPolicy | None = None,
        **kwargs: Any,
    ) -> T:
        """A store call in a worker thread, retried with backoff while it is retryable
        (``retry_policy``, default ``store_retry``).

        While any store call is retrying, ``self._committing`` is cleared so workers pause:
        refresh tokens sent now would produce results that may not be storable. It is set
        again when the last retrying call ends, and whenever the tick halts (the workers then
        see the halt and stop): a call that starts retrying after the halt never pauses them.
        """
        retrying = False

        def on_retry(attempt: int, error: TokenBrokerError, _wait: float) -> None:
            nonlocal retrying
            if not retrying:
                retrying = True
                self._retrying += 1
            self._pause_if_retrying()
            self.log.warning(
                "store call retrying", operation=what, attempt=attempt, error_code=error.code
            )

        try:
            result, _ = await call_with_retries(
                lambda: asyncio.to_thread(fn, *args, **kwargs),
                retry_policy or self.store_retry,
                self.clock,
                self.rng,
                on_retry,
            )
        finally:
            if retrying:
                self._retrying -= 1
            self._pause_if_retrying()
        return result

    def _pause_if_retrying(self) -> None:
        """Workers pause while a store call retries, unless the tick has halted."""
        if self._committing is None:
            return
        if self._retrying > 0 and not self._halt:
            self._committing.clear()
        else:
            self._committing.set()

    async def _renew(self, items: list[tuple[Lease, Intent | None]]) -> list[Lease | None]:
        intents = [intent for _, intent in items]
        return await self._store(
            "renew leases",
            self.state.renew,
            [lease for lease, _ in items],
            ttl=self.lease_ttl,
            intents=intents if any(intents) else None,
        )

    async def _stage(self, writes: list[SecretWrite]) -> list[int | TokenBrokerError]:
        return await self._store(
            "stage answers", self.secrets.stage, writes, retry_policy=self.answer_retry
        )

    def _halting(self, error: TokenBrokerError) -> None:
        """Stop presenting refresh tokens for the rest of the tick."""
        if not self._halt:
            self._halt.append(error)
        if self._committing is not None:
            self._committing.set()  # release paused workers: they see the halt and stop

    def _read(self, claims: Sequence[Claim]) -> asyncio.Future[Reading]:
        """Start reading these claims' credentials (one store call). Reading settles any answer
        a crashed refresher staged (see SecretStore.stage)."""
        ids = [c.lease.connection_id for c in claims]
        pointers = {c.lease.connection_id: c.record.state.current_version for c in claims}
        return asyncio.ensure_future(
            self._store("read credentials", self.secrets.get_many, ids, pointers=pointers)
        )

    async def _run(
        self,
        run: _Run,
        claims: list[Claim],
        progress: Callable[[int, int], None] | None,
        claiming: _ClaimStream,
    ) -> None:
        """Refresh concurrently while committing results as they arrive, claiming the next
        chunk while the current one is refreshed. If committing (or renewing) fails for good,
        stop sending refresh tokens at once. A chunk whose read fails for good halts the tick
        like a failed commit: its connections are released unrefreshed, and nothing more is
        presented.

        The feed hands claims to the workers ``read_chunk`` at a time with their chunk's read
        already started, and stays at most ``read_chunk`` claims ahead of them: so the next
        read overlaps the current refreshes, and neither reads nor leases run far ahead."""
        queue: asyncio.Queue[_Attempt | None] = asyncio.Queue()
        ready: _Ready = asyncio.Queue()
        room = asyncio.Semaphore(self.read_chunk)
        committing = self._committing = asyncio.Event()
        committing.set()
        publishing = self._publishing = []
        run.total = len(claims)
        expected = max(len(claims), claiming.expected)
        committers = [
            asyncio.create_task(self._commit_loop(run, queue, progress))
            for _ in range(min(self.committers, expected))
        ]
        feed = asyncio.create_task(self._feed(run, claims, claiming, ready, room))
        workers = [
            asyncio.create_task(self._work(run, ready, room, queue))
            for _ in range(min(self.concurrency, expected))
        ]
        try:
            await self._until_done(feed, workers)
        finally:
            for _ in committers:
                await queue.put(None)
            await asyncio.gather(*committers)
            self._committing = None
            self._publishing = None
            for failed in await asyncio.gather(*publishing, return_exceptions=True):
                if isinstance(failed, BaseException) and not isinstance(failed, Exception):
                    raise failed  # the process is going down (a signal, a cancellation)
                if failed is not None:  # a bug: the events stay parked, relayed next tick
                    self.log.error(
                        "events not published (internal error); parked for the next tick",
                        error_type=type(failed).__name__,
                    )

    async def _until_done(
        self, feed: asyncio.Task[None], workers: list[asyncio.Task[None]]
    ) -> None:
        """Wait for the feed and the workers. Should one raise (a bug: everything expected is
        contained in an attempt), nothing more is presented or claimed -- the tick halts, the
        feed is stopped -- and the other workers are waited for (they defer what they still
        get), so no task of this tick outlives it; then the bug is raised. Cancelled, the
        tick cancels them all."""
        tasks = [feed, *workers]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = next(
                (t.exception() for t in done if not t.cancelled() and t.exception()), None
            )
            if failed is None:
                return
            self.log.error(
                "refresh tick crashed: an unexpected exception in its feed or a worker",
                exception_type=type(failed).__name__,
            )
            self._halting(InternalError(f"the tick raised {type(failed).__name__}"))
            feed.cancel()
            await asyncio.wait(tasks)
            raise failed
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _feed(
        self,
        run: _Run,
        claims: list[Claim],
        claiming: _ClaimStream,
        ready: _Ready,
        room: asyncio.Semaphore,
    ) -> None:
        """Hand the claims to the workers, chunk after chunk as ``claiming`` takes them, each
        ``read_chunk`` with its read started; ``room`` keeps the feed that far ahead."""
        chunk = claims
        try:
            while chunk:
                ahead = asyncio.ensure_future(claiming.more(run.leases))
                try:
                    for at in range(0, len(chunk), self.read_chunk):
                        piece = chunk[at : at + self.read_chunk]
                        reading = self._read(piece)
                        for claim in piece:
                            await room.acquire()
                            ready.put_nowait((claim, reading))
                except BaseException:
                    ahead.cancel()
                    raise
                chunk = await ahead
                run.total += len(chunk)
        finally:
            ready.put_nowait(None)  # the end: each worker passes it on to the next

    async def _work(
        self,
        run: _Run,
        ready: _Ready,
        room: asyncio.Semaphore,
        queue: asyncio.Queue[_Attempt | None],
    ) -> None:
        """One worker: refresh what the feed hands out, queueing each attempt to commit."""
        while (item := await ready.get()) is not None:
            room.release()
            claim, reading = item
            try:
                stored = await asyncio.shield(reading)
            except Exception as failed:  # noqa: BLE001 - a store error, or a bug: the same
                # Nothing presented: the connection stays due, its lease given back
                # (or left to expire if the state store is failing too).
                error = (
                    failed
                    if isinstance(failed, TokenBrokerError)
                    else InternalError(f"reading credentials raised {type(failed).__name__}")
                )
                self._halting(error)
                run.leases.in_flight.discard(claim.lease.connection_id)
                run.leases.pending.discard(claim.lease.connection_id)
                run.summary.deferred += 1
                with contextlib.suppress(TokenBrokerError):
                    lease = run.leases.lease(claim.lease.connection_id)
                    await self._store("release lease", self.state.release, lease)
                continue
            attempt = await self._refresh_one(run, claim, stored.get(claim.lease.connection_id))
            await queue.put(attempt)
        ready.put_nowait(None)

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
            known = self._known_outcome(claim, stored, now)
            if known is not None:
                return known
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

    def _known_outcome(
        self, claim: Claim, stored: StoredCredential, now: datetime
    ) -> _Attempt | None:
        """For a connection whose last presentation has no recorded outcome (its intent is
        still there): the answer was staged and is current now (commit it), or nobody knows
        (present only if the plan says so). ``None``: present as usual."""
        intent = claim.record.state.intent
        if intent is None:
            return None
        cid = claim.lease.connection_id
        if stored.version != intent.from_version:
            credential = stored.credential
            if credential.obtained_at is None or credential.expires_at is None:
                return None  # not an answer (new material stored meanwhile): present as usual
            self.log.info(
                "found the answer of an earlier attempt, staged: committing it",
                connection_id=cid,
                attempt=intent.attempt,
                version=stored.version,
            )
            return _Attempt(claim, stored, _Settled(), now)
        profile = self.profiles[claim.record.connection.profile]
        plan, until = unknown_outcome(
            intent,
            store_now=claim.lease.expires_at - self.lease_ttl,  # granted at the store's now
            now=now,
            access_expires_at=stored.credential.expires_at,
            reuse_grace=timedelta(seconds=profile.refresh_token_reuse_grace_seconds),
        )
        if plan is Plan.WAIT and until is not None:
            self.log.warning(
                "refresh outcome unknown: serving the access token, presenting again at the"
                " last chance",
                connection_id=cid,
                attempt=intent.attempt,
                present_at=isoformat(until),
            )
            return _Attempt(claim, stored, _Wait(intent, until), now)
        self.log.warning(
            "presenting a refresh token whose last outcome is unknown (reuse grace, or the"
            " last step before the access token expires)",
            connection_id=cid,
            attempt=intent.attempt,
        )
        return None

    async def _attempts(self, run: _Run, claim: Claim, stored: StoredCredential) -> _Attempt:
        """Present the refresh token until an outcome: each attempt renews the lease first
        (recording the intent, for a rotating token) and needs the guard left; the answer is
        staged at once; an ambiguous answer for a rotating token ends it."""
        connection = claim.record.connection
        cid = connection.id
        profile = self.profiles[connection.profile]
        rotating = profile.rotates_refresh_tokens and connection.grant is GrantType.REFRESH_TOKEN
        leases, at_risk, summary = run.leases, run.at_risk, run.summary
        try:
            budget = budget_request(connection, profile, stored.credential)
        except TokenBrokerError as error:  # its token URL cannot be resolved
            return _Attempt(claim, stored, error, self.clock.now())
        # The store's version quota: one new version per refresh, whatever the retries.
        versions = store_budget(self.secrets.write_budget(cid))
        number = 1
        while True:
            await at_risk.acquire()
            # Before the intent: a denied request is never sent, so nothing is unknown.
            for request in (versions if number == 1 else None, budget):
                denied = None if request is None else await self._spend(claim, stored, request)
                if denied is not None:
                    at_risk.release()
                    return denied
            intent = None
            if rotating:
                intent = Intent(uuid.uuid4().hex, stored.version, leases.lease(cid).token)
            ready = await self._ready(claim, stored, leases, summary, intent)
            if ready is not None:
                at_risk.release()
                return ready
            if intent is not None:
                # As the store stamped it: granted ``ttl`` from the store's now.
                lease = leases.lease(cid)
                intent = replace(intent, at=lease.expires_at - self.lease_ttl)
                failpoint("intent.durable")
            attempted_at = self.clock.now()
            leases.in_flight.add(cid)
            sent = self.clock.monotonic()
            try:
                response = await request_token(
                    run.endpoint, connection, profile, stored.credential, attempted_at
                )
            except TokenBrokerError as error:
                self._acquired(connection, sent)
                ended = self._after_error(
                    _Attempt(claim, stored, error, attempted_at, intent=intent, permit=True),
                    number,
                    rotating=rotating,
                    summary=summary,
                )
                if isinstance(ended, _Attempt):
                    return await self._staged(run, ended)
                wait = ended
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
            self._acquired(connection, sent)
            attempt = self._answered(claim, stored, response, attempted_at)
            return await self._staged(run, attempt, intent)

    def _acquired(self, connection: Connection, sent: float) -> None:
        """Count one token request's latency, answered or not (a timeout counts as long as it
        lasted), by the connection's provider profile and grant."""
        if self.metrics is not None:
            elapsed_ms = (self.clock.monotonic() - sent) * 1000
            self.metrics.observe(
                "refresh/acquisition_latency",
                elapsed_ms,
                connection.profile,
                connection.grant.value,
            )

    def _after_error(
        self, attempt: _Attempt, number: int, *, rotating: bool, summary: TickSummary
    ) -> _Attempt | float:
        """What an attempt that got an error ends as, or the seconds to wait before the next:
        an ambiguous answer for a rotating token ends it (keeping its intent); a rejected
        answer that carried a refresh token ends it (keeping the token)."""
        error = attempt.result
        assert isinstance(error, TokenBrokerError)  # noqa: S101 - the caller's exception
        assert attempt.stored is not None  # noqa: S101
        salvage = self._salvage(attempt.stored, error)
        if rotating and error.ambiguous:
            summary.unknown_outcome += 1
            self.log.warning(
                "refresh outcome unknown: not retried with the same refresh token",
                connection_id=attempt.claim.lease.connection_id,
                error_code=error.code,
            )
            return replace(attempt, salvage=salvage)
        wait = self.retry.delay(number, error, self.rng)
        if wait is None or salvage is not None:
            error.attempts = number
            return replace(attempt, salvage=salvage, intent=None)
        return wait

    def _answered(
        self, claim: Claim, stored: StoredCredential, response: TokenResponse, at: datetime
    ) -> _Attempt:
        """The attempt for a provider's answer: the credential to store, or -- when building
        it fails (a bug, a value no rule foresaw) -- an internal error that still keeps the
        answer's refresh token."""
        connection = claim.record.connection
        try:
            credential = next_credential(connection, stored.credential, response, at)
            self._check_storable(credential)
        except Exception as exc:  # the provider's answer is in hand: keep its token
            cid = connection.id
            self.log.exception(
                "refresh failed (internal error) after the provider answered",
                connection_id=cid,
                error_type=type(exc).__name__,
            )
            internal = InternalError(f"connection {cid!r}: unexpected {type(exc).__name__}")
            salvage = None
            if response.refresh_token is not None:
                salvage = stored.credential.with_token(refresh_token=response.refresh_token)
            return _Attempt(claim, stored, internal, at, salvage, permit=True)
        return _Attempt(claim, stored, credential, at, permit=True)

    async def _staged(self, run: _Run, attempt: _Attempt, intent: Intent | None = None) -> _Attempt:
        """The attempt with its answer (or salvaged token) staged: durable now. A stage the
        store cannot take halts presenting; the commit tries again."""
        keeps, stored = attempt.keeps, attempt.stored
        if keeps is None or stored is None:
            return attempt
        cid = attempt.claim.lease.connection_id
        write = SecretWrite(cid, keeps, stored.version, (intent or attempt.intent or _NO).attempt)
        try:
            staged = await run.stager.submit(write)
        except TokenBrokerError as error:
            self.log.error(
                "answer not staged: presenting stopped", connection_id=cid, error_code=error.code
            )
            self._halting(error)
            return attempt
        if isinstance(staged, TokenBrokerError):
            return self._not_staged(attempt, staged)
        failpoint("secret.written")
        if attempt.permit:  # durable now: no longer at risk
            run.at_risk.release()
        return replace(attempt, staged=staged, permit=False)

    def _not_staged(self, attempt: _Attempt, error: TokenBrokerError) -> _Attempt:
        """An answer the secret store refused for this connection: a newer version won (an
        operator's re-authorisation), or the store will not take this version (a corrupt
        record, AWS's version quota or a burnt version id) -- that connection's failure,
        loudly: the provider's new refresh token could not be kept."""
        cid = attempt.claim.lease.connection_id
        if isinstance(error, VersionConflict):
            self.log.warning("refresh discarded: newer version exists", connection_id=cid)
            if isinstance(attempt.result, Credential):
                return replace(attempt, result=_Skip.SUPERSEDED)
            return replace(attempt, salvage=None)
        self.log.error(
            "the secret store refused the new credential: the connection needs an operator",
            connection_id=cid,
            error_code=error.code,
        )
        return replace(attempt, result=error, salvage=None, intent=None)

    async def _ready(
        self,
        claim: Claim,
        stored: StoredCredential,
        leases: LeaseKeeper,
        summary: TickSummary,
        intent: Intent | None,
    ) -> _Attempt | None:
        """Whether a refresh token may be presented now: ``None`` if so, else the attempt
        that ends here. Waits while a store call is retrying; renews the lease, recording
        ``intent`` in the same write."""
        cid = claim.lease.connection_id
        now = self.clock.now()
        if self._committing is not None:
            await self._committing.wait()  # paused while a store call is retrying
        if self._halt:
            return _Attempt(claim, stored, _Skip.DEFERRED, now)
        try:
            lease = await leases.renew(cid, intent)
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

    async def _spend(
        self, claim: Claim, stored: StoredCredential, request: BudgetRequest
    ) -> _Attempt | None:
        """Take one slot of the connection's token-endpoint budget before one request
        (:mod:`.budget`): ``None`` when granted, else the attempt that ends here -- deferred
        to when the slot frees, or, when the budget cannot be read, nothing sent and
        presenting stopped (an unreadable budget is a store failure, never a grant)."""
        cid = claim.lease.connection_id
        if self._committing is not None:
            await self._committing.wait()
        now = self.clock.now()
        if self._halt:
            return _Attempt(claim, stored, _Skip.DEFERRED, now)
        try:
            decision = await self._store(
                "take budget", self.state.take_budget, request.key, limit=request.limit,
                window=request.window, now=now, cost=request.cost,
            )  # fmt: skip
        except TokenBrokerError as error:
            self.log.error(
                "token-endpoint budget unavailable: presenting stopped",
                connection_id=cid,
                error_code=error.code,
            )
            self._halting(error)
            return _Attempt(claim, stored, _Skip.DEFERRED, now)
        if decision.granted:
            return None
        deferral = defer(claim.record.state, request, decision, now)
        report(deferral, cid, self.log)
        return _Attempt(claim, stored, deferral, now)

    @staticmethod
    def _salvage(stored: StoredCredential, error: TokenBrokerError) -> Credential | None:
        """The credential to keep from a rejected answer that carried a new refresh token (a
        200 the parser rejected, or one that carried an ``error`` beside its tokens)."""
        token = error.refresh_token if isinstance(error, ProviderError) else None
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
    ) -> None:
        summary = run.summary
        done = False
        while not done:
            first = await queue.get()
            batch: list[_Attempt] = []
            if first is None:
                done = True
            else:
                batch.append(first)
            # Each commit loop takes exactly one end marker (``None``): one that got its
            # marker first drains nothing more, or it would take another loop's.
            while not done and len(batch) < self.commit_batch and not queue.empty():
                item = queue.get_nowait()
                if item is None:
                    done = True
                    break
                batch.append(item)
            if not batch:
                continue
            try:
                await self._commit_translated(batch, run.leases, summary)
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
                run.committed += len(batch)
                if progress is not None:
                    progress(run.committed, run.total)
            finally:
                for attempt in batch:
                    run.leases.in_flight.discard(attempt.claim.lease.connection_id)
                    run.leases.pending.discard(attempt.claim.lease.connection_id)
                    if attempt.permit:
                        run.at_risk.release()

    async def _commit_translated(
        self, batch: list[_Attempt], leases: LeaseKeeper, summary: TickSummary
    ) -> None:
        """:meth:`_commit`, anything unexpected (a bug, an error no adapter translated) an
        :class:`InternalError`: the committer never dies and leaves the workers presenting
        answers nobody commits -- it halts presenting like any failed commit."""
        try:
            await self._commit(batch, leases, summary)
        except TokenBrokerError:
            raise
        except Exception as exc:
            self.log.exception(
                "refresh results not committed: unexpected error", error_type=type(exc).__name__
            )
            raise InternalError(
                f"committing refresh results failed: unexpected {type(exc).__name__}"
            ) from None

    async def _commit(
        self, batch: list[_Attempt], leases: LeaseKeeper, summary: TickSummary
    ) -> None:
        """Stage what is not staged yet, then one commit: promotions, states (fenced) and
        their events into the outbox; then relay those events. Each step is retried while
        retryable; a step that fails for good raises."""
        batch = await self._stage_leftovers(batch)
        now = self.clock.now()
        releases = [
            leases.lease(a.claim.lease.connection_id)
            for a in batch
            if a.result in (_Skip.DEFERRED, _Skip.SUPERSEDED)
        ]
        summary.deferred += sum(1 for a in batch if a.result is _Skip.DEFERRED)
        summary.lease_lost += sum(1 for a in batch if a.result in (_Skip.LOST, _Skip.SUPERSEDED))
        for lease in releases:
            await self._store("release lease", self.state.release, lease)
        changes = self._transitions(batch, leases, now)
        if not changes:
            return
        items = [
            (Completion(lease, change.state, change.events), promotion)
            for _, lease, _, change, promotion in changes
        ]
        results = await self._store("commit outcomes", self.committer.commit, items)
        failpoint("state.committed")
        for _, lease, _, _, _ in changes:  # released by the commit: nothing left to renew
            leases.in_flight.discard(lease.connection_id)
            leases.pending.discard(lease.connection_id)
        to_publish: list[ConnectionEvent] = []
        for (attempt, lease, outcome, change, _), result in zip(changes, results, strict=True):
            if result is not CommitOutcome.COMMITTED:
                summary.lease_lost += 1
                self.log.warning(
                    "refresh state not committed: lease lost"
                    if result is CommitOutcome.LEASE_LOST
                    else "refresh discarded: newer version exists",
                    connection_id=lease.connection_id,
                )
                continue
            to_publish.extend(change.events)
            _count(summary, outcome, change.events)
            if isinstance(outcome, Succeeded):  # one line per refresh, once it is durable
                self.log.info(
                    "credential rotated",
                    connection_id=lease.connection_id,
                    version=outcome.version,
                    expires_at=isoformat(outcome.expires_at),
                    settled=isinstance(attempt.result, _Settled),
                )
            if isinstance(attempt.result, _Settled):
                summary.settled += 1
        if to_publish:
            # Off the commit path: the events are durable in the outbox already, and the next
            # batch's commit need not wait for this one's round trips to the bus. Each
            # connection is in one batch a tick, so its events keep their order.
            publishing = self._publishing
            if publishing is None:
                await self._publish(to_publish, summary)
            else:
                publishing.append(asyncio.ensure_future(self._publish(to_publish, summary)))

    async def _stage_leftovers(self, batch: list[_Attempt]) -> list[_Attempt]:
        """Stage the answers a worker could not (the store was failing then)."""
        waiting = [
            (n, a)
            for n, a in enumerate(batch)
            if a.staged is None and a.keeps is not None and a.stored is not None
        ]
        if not waiting:
            return batch
        writes = [
            SecretWrite(a.claim.lease.connection_id, a.keeps, a.stored.version)  # type: ignore[arg-type,union-attr]
            for _, a in waiting
        ]
        # Their workers already waited ``answer_retry`` for the store: one more ordinary try.
        results = await self._store("stage answers", self.secrets.stage, writes)
        batch = list(batch)
        for (n, attempt), result in zip(waiting, results, strict=True):
            if isinstance(result, TokenBrokerError):
                batch[n] = self._not_staged(attempt, result)
            else:
                batch[n] = replace(attempt, staged=result)
        return batch

    def _transitions(
        self, batch: list[_Attempt], leases: LeaseKeeper, now: datetime
    ) -> list[tuple[_Attempt, Lease, Outcome, Transition, Promotion | None]]:
        """Each outcome's transition and the promotion that goes with it (the order the
        scheduling jitter is drawn from ``self.rng`` is the batch's)."""
        changes: list[tuple[_Attempt, Lease, Outcome, Transition, Promotion | None]] = []
        for attempt in batch:
            claim = attempt.claim
            cid = claim.lease.connection_id
            lease = leases.lease(cid)
            promotion = None
            if attempt.staged is not None:
                promotion = Promotion(cid, attempt.staged, attempt.version)
            outcome = self._outcome(attempt, now)
            if outcome is None:
                continue
            change = transition(claim, outcome, now, self.policy, self.rng)
            if isinstance(attempt.result, TokenBrokerError):
                self._log_failure(claim, attempt.result, change)
            changes.append((attempt, lease, outcome, change, promotion))
        return changes

    def _outcome(self, attempt: _Attempt, now: datetime) -> Outcome | None:
        """What the attempt's state transition is made of (``None``: nothing to commit)."""
        result = attempt.result
        if isinstance(result, Credential):
            if attempt.staged is None:
                return None  # not durable: nothing may point at it (presenting has halted)
            return _succeeded(result, attempt.staged, attempt.attempted_at)
        if isinstance(result, _Settled) and attempt.stored is not None:
            return _succeeded(attempt.stored.credential, attempt.stored.version, now)
        if isinstance(result, _Wait | BudgetDeferral):
            return _not_presented(attempt, result)
        if not isinstance(result, TokenBrokerError):
            return None
        return self._failure(attempt, result, now)

    def _failure(self, attempt: _Attempt, result: TokenBrokerError, now: datetime) -> Outcome:
        """A failed attempt's outcome; an ambiguous one keeps its intent (see ``_outcome``)."""
        previous = attempt.claim.record.state
        if attempt.intent is None:
            # The failure answered the question: this presentation consumed nothing. An
            # earlier unknown outcome (the claim's intent) is still unknown.
            return failed(
                result,
                attempted_at=attempt.attempted_at,
                version=attempt.version,
                salvaged=attempt.staged,
                intent=previous.intent if attempt.staged is None else None,
            )
        # An ambiguous answer: the token may be spent. Retry within the reuse-grace window;
        # otherwise serve the access token until the last chance.
        profile = self.profiles[attempt.claim.record.connection.profile]
        grace = timedelta(seconds=profile.refresh_token_reuse_grace_seconds)
        expires_at = attempt.stored.credential.expires_at if attempt.stored else None
        if attempt.staged is None and not grace:
            plan, until = unknown_outcome(
                attempt.intent,
                store_now=attempt.intent.at or now,
                now=now,
                access_expires_at=expires_at,
                reuse_grace=grace,
            )
            if plan is Plan.WAIT and until is not None:
                return AtRisk(
                    attempt.intent,
                    until,
                    attempt.attempted_at,
                    attempt.version,
                    error_code=result.code,
                    failed_now=True,
                )
        retry_at = now + min(grace / 2, timedelta(seconds=30)) if grace else None
        return failed(
            result,
            attempted_at=attempt.attempted_at,
            version=attempt.version,
            salvaged=attempt.staged,
            intent=attempt.intent if attempt.staged is None else None,
            retry_at=retry_at,
        )

    async def _publish(self, events: list[ConnectionEvent], summary: TickSummary) -> None:
        """Relay the events just committed to the outbox: publish, then unpark. If the bus
        cannot take them they stay parked, and the next tick relays them."""
        try:
            await self._store("publish events", self.events.publish, events)
        except TokenBrokerError as error:
            summary.events_parked += len(events)
            self.log.error(
                "events not published; parked for the next tick",
                error_code=error.code,
                count=len(events),
            )
            return
        failpoint("events.published")
        try:
            await self._store(
                "unpark events", self.state.unpark_events, [e.event_id for e in events]
            )
        except TokenBrokerError as error:  # published: a later relay sends them again
            self.log.warning("published events not unparked yet", error_code=error.code)

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

    def _log_failure(self, claim: Claim, error: TokenBrokerError, change: Transition) -> None:
        cid = claim.lease.connection_id
        fields = {
            "connection_id": cid,
            "error_code": error.code,
            "attempts": error.attempts,
            "error": error.message,
        }
        if change.state.at_risk:
            self.log.error(
                "refresh outcome unknown: connection at risk, its access token served until"
                " the last chance",
                **fields,
                present_at=isoformat(change.state.next_refresh_at),
            )
        elif isinstance(error, InternalError):
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
                "refresh failed (permanent): connection needs re-authorisation",
                **fields,
                next_step=recovery_step(cid, claim.record.connection.grant),
            )


#: The attempt id of an answer whose presentation recorded no intent.
_NO = Intent("", None, 0)


def _not_presented(attempt: _Attempt, result: _Wait | BudgetDeferral) -> Outcome:
    """The outcome of an attempt that presented nothing: waiting for an unknown outcome's
    last chance, or deferred by a spent token-endpoint budget."""
    if isinstance(result, _Wait):
        return AtRisk(result.intent, result.until, attempt.attempted_at, attempt.version)
    assert result.state.next_refresh_at is not None  # noqa: S101 - defer() sets it
    return Deferred(result.state.next_refresh_at, at_risk=result.kind is DeferralKind.AT_RISK)


def _succeeded(credential: Credential, version: int, attempted_at: datetime) -> Succeeded:
    # next_credential() stamps both times on every credential it returns.
    assert credential.obtained_at is not None  # noqa: S101
    assert credential.expires_at is not None  # noqa: S101
    return Succeeded(version, credential.obtained_at, credential.expires_at, attempted_at)


def _count(summary: TickSummary, outcome: Outcome, events: Sequence[ConnectionEvent]) -> None:
    if isinstance(outcome, Succeeded):
        summary.refreshed += 1
    elif isinstance(outcome, AtRisk):
        summary.at_risk += 1
    elif isinstance(outcome, Deferred):
        summary.deferred += 1
        summary.over_budget += 1
        if outcome.at_risk:
            summary.over_budget_at_risk += 1
    else:
        summary.failed[outcome.failure_class] += 1
        if outcome.salvaged is not None:
            summary.salvaged += 1
    for event in events:
        if event.type is EventType.RECOVERED:
            summary.recovered += 1
        elif event.type is EventType.NEEDS_REAUTH:
            summary.needs_reauth += 1
