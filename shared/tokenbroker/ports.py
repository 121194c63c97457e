"""The ports: every outside system the broker talks to, as a small protocol.

Each port has one contract test suite (``tests/contract``) that every adapter must pass:
in-memory, embedded (SQLite), and the cloud adapters. Store methods are synchronous (the
cloud client libraries and SQLite are); the refresher calls them from a worker thread.

The issuer's outside systems are ports too (:class:`CallerVerifier`, :class:`Impersonator`,
:class:`RelayTransport`), typed with kernel values only, so the type checker follows the
security path from the caller's header to the token handed out.
"""

from __future__ import annotations

import builtins
import enum
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol, runtime_checkable

from tokenbroker.kernel.errors import CorruptCredential, TokenBrokerError, VersionConflict
from tokenbroker.kernel.http import HttpResponse, OutboundRequest
from tokenbroker.kernel.metrics import Snapshot
from tokenbroker.kernel.model import (
    Caller,
    Claim,
    Connection,
    ConnectionEvent,
    ConnectionRecord,
    ConnectionStatus,
    Credential,
    Intent,
    Lease,
    MintedToken,
    RefreshState,
    Shard,
    StoredCredential,
)
from tokenbroker.kernel.secret import Secret

__all__ = [
    "MAX_BUDGET_KEY_LENGTH",
    "MAX_BUDGET_LIMIT",
    "MAX_BUDGET_WINDOW",
    "AuthorizationSession",
    "AuthorizationSessions",
    "BudgetDecision",
    "CallerVerifier",
    "ClaimBatch",
    "CommitOutcome",
    "Completion",
    "EventBus",
    "Impersonator",
    "Promotion",
    "RefreshCommitter",
    "RelayTransport",
    "RequestQuota",
    "SecretStore",
    "SecretWrite",
    "StateStore",
    "TokenEndpoint",
    "VersionPointers",
]


@dataclass(frozen=True)
class SecretWrite:
    """One compare-and-set write: succeeds only if the current version is ``expected_version``
    (``None``: the connection has no credential yet). ``attempt`` names the refresh attempt a
    staged write answers (see :meth:`SecretStore.stage`)."""

    connection_id: str
    credential: Credential
    expected_version: int | None
    attempt: str | None = None


@dataclass(frozen=True)
class Promotion:
    """Make a staged ``version`` current, only if ``parent`` (the version it was staged on)
    still is."""

    connection_id: str
    version: int
    parent: int | None


@dataclass(frozen=True)
class WriteBudget:
    """At most ``limit`` new versions of one connection's secret per sliding ``window``: a
    store's own quota (AWS Secrets Manager's version quota), spent through
    :meth:`StateStore.take_budget` under ``key`` before a refresh token is presented, so
    that a write the store would refuse never follows a consumed token."""

    key: str
    limit: int
    window: timedelta


@dataclass(frozen=True)
class RequestQuota:
    """A store's request-rate quota, shared by every process that uses the same project
    (Secret Manager: 600 read and 600 write requests per minute per project by default,
    https://cloud.google.com/secret-manager/quotas), with what one refresh costs of each.

    The refresher spends it in refreshes (:attr:`refreshes_per_window` of them per
    ``window``) through :meth:`StateStore.take_budget` under ``key`` before it reads or
    writes anything for them, so that no refresh whose writes the store would refuse is ever
    started; what does not fit stays due for a later tick, earliest first."""

    key: str
    reads_per_window: int
    writes_per_window: int
    reads_per_refresh: int
    writes_per_refresh: int
    window: timedelta = timedelta(minutes=1)

    @property
    def refreshes_per_window(self) -> int:
        """Refreshes that fit both quotas in one window (at least one: a quota smaller than
        one refresh's cost still lets one through per window rather than none ever). A quota
        a refresh does not use (Secret Manager's pointer protocol reads nothing but its access,
        which has a quota of its own) does not limit it."""
        limits = [
            available // cost
            for available, cost in (
                (self.reads_per_window, self.reads_per_refresh),
                (self.writes_per_window, self.writes_per_refresh),
            )
            if cost > 0
        ]
        fits = min(limits) if limits else MAX_BUDGET_LIMIT
        return max(1, min(fits, MAX_BUDGET_LIMIT))


@dataclass(frozen=True)
class Completion:
    """One refresh outcome for :meth:`StateStore.complete`: the state to write under the
    lease, and the events announcing it, written to the store's outbox in the same commit
    (a transactional outbox: no crash point commits a state without its events)."""

    lease: Lease
    state: RefreshState
    events: tuple[ConnectionEvent, ...] = ()
    #: The compare-and-set of a secret store whose current-version pointer lives in the
    #: state record (:class:`VersionPointers`): the completion is accepted only while the
    #: record's ``current_version`` is one of these. ``None``: no such condition.
    pointer_from: frozenset[int | None] | None = None


@runtime_checkable
class SecretStore(Protocol):
    """Versioned, encrypted-at-rest credential storage, one secret per connection.

    Versions count up from 1 and only grow (sequential writes add one each; a store may
    leave gaps where a racing writer lost). "Current" is the version the last successful
    compare-and-set wrote, and the only one the port reads; older versions are kept (and
    listed by ``versions``) for at least ``retained_versions - 1`` rotations, so a consumer
    still holding an older credential keeps working through the overlap.
    """

    def get(self, connection_id: str) -> StoredCredential:
        """The current version. Raises NotFound."""
        ...

    def get_many(
        self,
        connection_ids: Sequence[str],
        *,
        pointers: Mapping[str, int | None] | None = None,
    ) -> dict[str, StoredCredential | CorruptCredential]:
        """Current versions of many connections; absent ones are left out.

        One bad record never fails the batch: a credential that does not verify or decrypt is
        that connection's value, a :class:`CorruptCredential`. Only a store that cannot answer
        at all raises (``StoreUnavailable``).

        ``pointers``: the current versions the caller read from the state store moments ago
        (the refresher's claims, the issuer's live records). A store whose pointer lives there
        (:class:`VersionPointers`) uses them instead of reading it again; any other store
        ignores them."""
        ...

    def put(
        self, connection_id: str, credential: Credential, *, expected_version: int | None
    ) -> int:
        """Add a version if the current one is ``expected_version``; returns the new version.
        Raises VersionConflict otherwise."""
        ...

    def put_many(self, writes: Sequence[SecretWrite]) -> builtins.list[int | VersionConflict]:
        """Many compare-and-set writes, each independent; one result per write, in order."""
        ...

    def stage(self, writes: Sequence[SecretWrite]) -> builtins.list[int | TokenBrokerError]:
        """Make each credential durable at once as a *pending* version on top of
        ``expected_version`` (compare-and-set, as ``put``); one result per write: the pending
        version's number, or the conflict. A pending version is not current until promoted
        -- but it is never lost: every read **settles** a pending version whose parent is
        still current (promotes it, as AWS's staged labels are settled), so an answer staged
        by a refresher that then died is current for whoever reads next. Staging the same
        ``attempt`` again is harmless (a remote store may add an identical second version;
        the read settles one). An error that is one connection's own -- the conflict, a corrupt
        record, a version the store refuses (AWS's version quota, a burnt version id) -- is that
        write's result; only a store that cannot answer raises.

        This is the refresher's durability point for a provider's answer: a rotating provider
        has already retired the refresh token sent, so the answer must be kept before anything
        else happens."""
        ...

    def promote(self, promotions: Sequence[Promotion]) -> builtins.list[int | TokenBrokerError]:
        """Make each staged version current if its parent still is (already current: the same
        answer); retention applies as for ``put``. One result per promotion: the version, or
        the conflict (the connection moved on: someone wrote a newer version)."""
        ...

    def versions(self, connection_id: str) -> builtins.list[int]:
        """Readable versions, oldest first. Empty when the connection has none."""
        ...

    def write_budget(self, connection_id: str) -> WriteBudget | None:
        """How many versions the store can take for this connection per window, when it
        limits that; ``None`` when it does not. No I/O."""
        ...

    def request_quota(self) -> RequestQuota | None:
        """The store's request-rate quota across every connection, when it has one the
        refresher must pace itself by; ``None`` when it has none. No I/O."""
        ...

    def delete(self, connection_id: str) -> None:
        """Destroy every version. Raises NotFound."""
        ...


@runtime_checkable
class VersionPointers(Protocol):
    """Where a secret store that keeps versions but no pointer of its own keeps which version
    is current: the state store's record, which every refresh reads and writes anyway
    (``RefreshState.current_version``; Secret Manager's pointer protocol, docs/gcp.md). The
    refresher moves it in the fenced ``complete`` (:attr:`Completion.pointer_from`), every
    other writer through :meth:`move_pointer`."""

    def current_versions(self, connection_ids: Sequence[str]) -> dict[str, int | None]:
        """The pointer of each connection that has a record (``None``: no version yet);
        connections without one are left out."""
        ...

    def move_pointer(
        self, connection_id: str, *, accepted: frozenset[int | None] | None, version: int | None
    ) -> bool:
        """Set the pointer to ``version`` if it is one of ``accepted`` now (``None``: whatever
        it is); ``False`` when it is not, or the connection has no record."""
        ...


@dataclass(frozen=True)
class ClaimBatch:
    claims: builtins.list[Claim] = field(default_factory=list)
    #: Due (or named) connections skipped because another holder's lease is live.
    leased_elsewhere: int = 0
    #: Named connections that do not exist (``claim`` only).
    missing: builtins.list[str] = field(default_factory=list)
    #: Named connections not leased because they are not active (``claim`` only): status is
    #: law -- only ``enable`` or ``reauth`` make a disabled or needs_reauth connection
    #: refreshable again.
    inactive: dict[str, ConnectionStatus] = field(default_factory=dict)


@runtime_checkable
class StateStore(Protocol):
    """The connection registry, refresh state, and per-connection leases.

    **Lease time is the store's own clock** (Firestore: the server's time; SQLite: the one
    host's boot clock; memory: the clock it was given), never a refresher's: a lease is free
    when it has expired by the store's clock, and a grant or renewal lasts ``ttl`` from the
    store's now. A refresher whose wall clock is stepped or skewed can therefore neither take
    a live lease nor stretch its own. The ``now`` the claims take only selects what is due
    (``next_refresh_at <= now``): a skewed refresher at worst refreshes early or late.
    ``Lease.expires_at`` is on the store's clock, for information; a holder measures the time
    it has left on its own monotonic clock from the moment it asked (see ``renew``).
    """

    def create(self, connection: Connection, state: RefreshState) -> None:
        """Register a connection. Raises AlreadyExists."""
        ...

    def get(self, connection_id: str) -> ConnectionRecord:
        """Raises NotFound."""
        ...

    def list(self) -> builtins.list[ConnectionRecord]:
        """Every connection, ordered by id."""
        ...

    def delete(self, connection_id: str) -> None:
        """Raises NotFound."""
        ...

    def put_state(self, connection_id: str, state: RefreshState) -> None:
        """Overwrite a connection's state outside any lease (operator actions). NotFound.

        The operator's write wins over any refresh in flight: it retires the live lease (the
        fencing token grows and the lease is free), so that refresh can neither present its
        refresh token again nor commit a state over this one."""
        ...

    def claim_due(
        self,
        now: datetime,
        *,
        holder: str,
        ttl: timedelta,
        limit: int,
        shard: Shard | None = None,
    ) -> ClaimBatch:
        """Lease up to ``limit`` active connections whose ``next_refresh_at <= now`` and whose
        lease is free or expired (by the store's clock), earliest first, atomically.

        With ``shard``, only connections the shard holds (:meth:`Shard.holds`), and
        ``leased_elsewhere`` counts only those: claims on different shards of one count never
        meet. A store that needs it is told to :meth:`prepare_shards` first."""
        ...

    def prepare_shards(self) -> int:
        """Make every connection findable by a sharded :meth:`claim_due` (a store that keeps
        the slot in the record writes it where a record predates it); how many records it
        changed. Idempotent, safe to run alongside anything; cheap when nothing is missing."""
        ...

    def claim(
        self, connection_ids: Sequence[str], now: datetime, *, holder: str, ttl: timedelta
    ) -> ClaimBatch:
        """Lease the named active connections (due or not) whose lease is free. Named
        connections that are not active are reported in ``inactive`` and not leased."""
        ...

    def renew(
        self,
        leases: Sequence[Lease],
        *,
        ttl: timedelta,
        intents: Sequence[Intent | None] | None = None,
    ) -> builtins.list[Lease | None]:
        """Extend each lease to ``ttl`` from the store's now, only if it is still held with
        the newest fencing token (an expired lease nobody took since is still ours); one
        answer per lease: the renewed lease, or ``None`` when it was lost (taken over,
        completed, released, retired by an operator's write, or the connection deleted).

        ``intents`` (aligned with ``leases``; ``None`` entries keep what is recorded) records
        in the same fenced write the :class:`~.model.Intent` of a refresh about to present a
        rotating refresh token, stamped with the store's clock (``at``): durable before the
        request is sent, so a crash leaves a record of what was in flight.

        A holder renews before every attempt to present a refresh token, and keeps renewing
        while one is in flight. Because the store starts ``ttl`` no earlier than the call,
        the holder's own monotonic time at the call plus ``ttl`` is a safe deadline. A store
        that cannot answer raises ``StoreUnavailable``: "lost" and "cannot tell" are never
        confused."""
        ...

    def complete(
        self, outcomes: Sequence[Completion | tuple[Lease, RefreshState]]
    ) -> builtins.list[bool]:
        """Write each new state and release its lease, only if the lease's fencing token is
        still the newest; one boolean per outcome (False: the lease was lost). A
        :class:`Completion`'s events are parked in the same commit (see ``park_events``), so
        a state is never committed without its announcements; a lost lease writes neither.
        A completion with :attr:`~Completion.pointer_from` is also refused (False) when the
        record's ``current_version`` is not one of those: the pointer moved under it."""
        ...

    def release(self, lease: Lease) -> None:
        """Give a lease back without changing state (no-op if it was lost)."""
        ...

    # The outbox: events committed with their state (``complete``) or that the bus could not
    # take are parked here, durably, and relayed (published, then unparked): delivery stays
    # at-least-once across a crash at any point and across an event-bus outage.

    def park_events(self, events: Sequence[ConnectionEvent]) -> None:
        """Keep events for a later publish (idempotent per ``event_id``)."""
        ...

    def parked_events(self, limit: int) -> builtins.list[ConnectionEvent]:
        """Parked events, oldest first."""
        ...

    def unpark_events(self, event_ids: Sequence[str]) -> None:
        """Forget parked events once published (unknown ids are ignored)."""
        ...

    def change_marker(self) -> Hashable:
        """A value, cheap to get (no network round trip, never blocking), that differs from
        every earlier one once anything in the store has changed -- through this handle or
        any other, in any process. Equal markers promise nothing changed in between; a store
        that cannot tell returns a new value every call (its callers then read). Take the
        marker *before* a read, so a change during the read shows in the next marker."""
        ...

    # Token-endpoint budgets: how many requests a provider lets one refresh token (or client,
    # or endpoint) make in a window, counted here so every refresher on this store, in every
    # process and instance, spends the same budget (refresh/budget.py decides the key).

    def take_budget(
        self, key: str, *, limit: int, window: timedelta, now: datetime, cost: int = 1
    ) -> BudgetDecision:
        """Spend ``cost`` of the budget ``key`` if that keeps what was spent in the sliding
        window ``(now - window, now]`` at or under ``limit``, atomically across every handle on
        this store; otherwise spend nothing and say when enough will have aged out.

        A take occupies ``[now, now + window)`` (one ending exactly at ``now`` has aged out).
        Takes stamped later than ``now`` (a host whose clock runs ahead) count until they age
        out. Calls for one key should pass the same ``window``: a shorter one forgets older
        takes. Raises ConfigError for an argument out of bounds (``limit`` outside
        ``1..MAX_BUDGET_LIMIT``, ``window`` outside ``(0, MAX_BUDGET_WINDOW]``, ``cost``
        outside ``1..limit``, a naive or out-of-range ``now``, an empty key or one longer than
        ``MAX_BUDGET_KEY_LENGTH``); nothing is spent then."""
        ...


#: Bounds of :meth:`StateStore.take_budget`'s arguments. A budget keeps one entry per take
#: still in its window, so ``limit`` bounds what one key stores (one Firestore document).
MAX_BUDGET_LIMIT = 10_000
MAX_BUDGET_WINDOW = timedelta(days=31)
MAX_BUDGET_KEY_LENGTH = 1024


@dataclass(frozen=True)
class BudgetDecision:
    """What :meth:`StateStore.take_budget` decided."""

    granted: bool
    #: Spent in the window ending at ``now``: this take included when granted; when denied,
    #: what stood in the way.
    used: int
    #: Denied: the earliest moment the same take would be granted if nobody takes meanwhile
    #: (always after ``now``). ``None`` when granted.
    frees_at: datetime | None = None


class CommitOutcome(enum.Enum):
    """What :meth:`RefreshCommitter.commit` did with one outcome."""

    #: The staged version (if any) is current, the state written, the events in the outbox.
    COMMITTED = "committed"
    #: The lease was lost: the state was not written (a staged version stays for the next
    #: read to settle, or was promoted already -- either way it is not lost).
    LEASE_LOST = "lease_lost"
    #: The staged version lost to a newer one (an operator's re-authorisation): nothing was
    #: written and the lease was given back.
    SUPERSEDED = "superseded"


@runtime_checkable
class RefreshCommitter(Protocol):
    """The commit of refresh outcomes: each staged version promoted (``Promotion``, if any),
    then its state and events written under its lease (``Completion``).

    On one store with transactions (embedded) this is one transaction per batch: the fencing
    token is checked in the same commit as the credential write. Across separate stores
    (Secret Manager + Firestore, AWS + Firestore) it is the promotion, then the fenced state
    write with its events (``refresh.commit.StoreCommitter``); a crash between the two leaves
    a current version whose state the next holder catches up from the recorded intent.
    """

    def commit(
        self, items: Sequence[tuple[Completion, Promotion | None]]
    ) -> builtins.list[CommitOutcome]: ...


@runtime_checkable
class EventBus(Protocol):
    """Where connection events go. ``publish`` returns once the events are durably accepted."""

    def publish(self, events: Sequence[ConnectionEvent]) -> None: ...


@runtime_checkable
class MetricsExporter(Protocol):
    """Where metrics go (:mod:`tokenbroker.kernel.metrics`): Cloud Monitoring, or memory.

    ``write`` sends one point per sample of ``snapshot`` (a gauge's value at ``snapshot.at``; a
    cumulative one from ``snapshot.start``), creating what the destination needs first (metric
    descriptors) once per exporter; it raises :class:`~.errors.TokenBrokerError` when the
    destination refused or could not be reached (callers log it and go on: a metrics failure
    never fails a refresh or an issue). Synchronous, like the stores: called from a worker
    thread, never per request."""

    def write(self, snapshot: Snapshot) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class TokenEndpoint(Protocol):
    """Sends ``application/x-www-form-urlencoded`` POSTs to token endpoints.

    Implementations raise :class:`~.errors.TransportError` when no HTTP answer came
    (timeout, refused, reset) -- with ``ambiguous=False`` only when the request certainly
    never left (refused, DNS failure, no connection) -- and return every HTTP answer,
    whatever its status, unchanged. They never follow redirects.
    """

    async def post_form(
        self, url: str, form: Mapping[str, str], *, headers: Mapping[str, str]
    ) -> HttpResponse: ...


# --- connecting accounts: the authorization-code flow ------------------------------------------


@dataclass(frozen=True)
class AuthorizationSession:
    """One authorization request in flight: what its callback is checked against.

    Stored under ``key``, the SHA-256 of its ``state`` (never the state itself), so a store
    that leaks cannot be replayed into the callback. ``code_verifier`` is secret (RFC 7636
    §4.1: it is what makes a stolen code useless): stores keep it encrypted at rest.
    ``connection`` is the connection as it will be registered (a new one), or as it was when
    the flow started (an existing one: ``new`` is false)."""

    key: str
    connection: Connection
    operator: str
    redirect_uri: str
    code_verifier: Secret
    created_at: datetime
    expires_at: datetime
    #: True: the callback registers ``connection``; false: it re-authorises the existing one.
    new: bool = False

    def __repr__(self) -> str:
        return (
            f"AuthorizationSession(connection={self.connection.id!r}, operator={self.operator!r},"
            f" new={self.new}, expires_at={self.expires_at.isoformat()})"
        )


@runtime_checkable
class AuthorizationSessions(Protocol):
    """Authorization requests in flight (the ``state`` of RFC 6749 §10.12), single use.

    ``take`` is the single-use rule: it removes the session and returns it in one atomic step
    (across every handle on the store), so of two callbacks presenting the same state at
    most one gets the session -- a replayed callback never reaches the provider. Expiry,
    connection and operator are the caller's checks, on what ``take`` returned: a session is
    consumed by any presentation, even one that is then refused."""

    def put(self, session: AuthorizationSession) -> None:
        """Store a new session. Raises AlreadyExists for a key already stored."""
        ...

    def take(self, key: str) -> AuthorizationSession:
        """Remove the session and return it. Raises NotFound when there is none (never
        issued, or taken already)."""
        ...

    def purge(self, now: datetime) -> int:
        """Forget sessions that expired before ``now``; how many were forgotten."""
        ...


# --- the issuer's outside systems ---------------------------------------------------------------


@runtime_checkable
class CallerVerifier(Protocol):
    """Who is calling the issuer, from the request's ``Authorization`` header.

    Returns the verified :class:`~.model.Caller`, or raises
    :class:`~.errors.InvalidCallerToken` (HTTP 401 ``invalid_token``, RFC 6750 §3.1) for a
    missing, malformed, forged or expired credential, and
    :class:`~.errors.CredentialUnavailable` (503, retryable) when it cannot decide right now
    (no verification keys): the caller's credential may be good.

    On an event loop call :meth:`averify_authorization`: on the hot path it is CPU work over
    cached keys, and when keys must be fetched the fetch runs off the loop (issue 9). The
    synchronous :meth:`verify_authorization` may block on that fetch (for threads).
    :meth:`select_authorization` picks, from the request's headers, the one header value the
    caller is taken from (which depends on who verified it: Cloud Run's IAM front end or us).
    :meth:`receipt` and :meth:`still_holds` let a caller that sends the same header again be
    re-checked without re-verifying (what a cache hit checks, no more and no less).
    """

    def verify_authorization(self, header: str | None) -> Caller: ...

    async def averify_authorization(self, header: str | None) -> Caller: ...

    def select_authorization(self, headers: Iterable[tuple[bytes, bytes]]) -> str | None: ...

    def receipt(self, header: str | None) -> object | None:
        """What this verifier holds of its verification of ``header`` (one it just made), or
        ``None``: the issuer's fast path for a caller that sends the same header again."""
        ...

    def still_holds(self, receipt: object, now: float) -> bool:
        """Whether a :meth:`receipt` still stands at ``now`` (epoch seconds): every check a
        cached verification gets (expiry, the signing key still published). ``False``:
        verify afresh."""
        ...


@runtime_checkable
class Impersonator(Protocol):
    """Mints short-lived access tokens for Google service accounts by keyless impersonation
    (IAM Credentials ``generateAccessToken``,
    https://cloud.google.com/iam/docs/reference/credentials/rest/v1/projects.serviceAccounts/generateAccessToken).

    The token carries exactly ``scopes`` and lives ``lifetime_seconds``. Raises a
    :class:`~.errors.BadRequest` for a request that cannot be granted, a
    :class:`~.errors.ConfigError` when the broker may not impersonate the account, a
    :class:`~.errors.NeedsReauth` when the account is gone, and a retryable
    :class:`~.errors.CredentialUnavailable` when the service cannot answer now.
    """

    async def generate_access_token(
        self, service_account: str, scopes: Sequence[str], lifetime_seconds: int
    ) -> MintedToken: ...


@runtime_checkable
class RelayTransport(Protocol):
    """Sends the issuer's relay requests to provider APIs, exactly as decided.

    Never follows redirects: a 3xx comes back as it is (following one would send the
    injected credential wherever the provider, or an attacker who controls it, points).
    Returns every HTTP answer, whatever its status, with header names lower-cased and the
    body decoded (``Content-Encoding`` undone, so the relay can scrub it). Raises
    :class:`~.errors.TransportError` when no complete answer came: refused, reset or timed out
    (``request.timeout_seconds`` bounds the whole exchange), or a body larger than
    ``request.max_response_bytes`` (never buffered beyond that).
    """

    async def send(self, request: OutboundRequest) -> HttpResponse: ...
