"""In-memory adapters: the reference implementation of each port, for unit tests and demos.

They keep exactly the semantics the contract suites demand, so a test that passes on them
says something about the embedded and cloud adapters too.
"""

from __future__ import annotations

import builtins
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from tokenbroker.adapters import budget_log
from tokenbroker.adapters.secret_store import (
    DEFAULT_RETAINED_VERSIONS,
    ReadResult,
    TransactionalSecretStore,
)
from tokenbroker.kernel.clock import SystemClock, WallClock
from tokenbroker.kernel.errors import AlreadyExists, NotFound, TokenBrokerError
from tokenbroker.kernel.metrics import Snapshot
from tokenbroker.kernel.model import (
    Claim,
    Connection,
    ConnectionEvent,
    ConnectionRecord,
    ConnectionStatus,
    Credential,
    Intent,
    Lease,
    RefreshState,
    Shard,
    StoredCredential,
)
from tokenbroker.ports import (
    AuthorizationSession,
    BudgetDecision,
    ClaimBatch,
    Completion,
    SecretWrite,
)


@dataclass
class _SecretVault:
    """Everything a MemorySecretStore holds; its lock hands it to one writer at a time."""

    versions: dict[str, dict[int, StoredCredential]] = field(default_factory=dict)
    latest: dict[str, int] = field(default_factory=dict)
    #: Staged versions: connection -> version -> (parent, attempt, credential).
    pending: dict[str, dict[int, tuple[int | None, str | None, Credential]]] = field(
        default_factory=dict
    )


class MemorySecretStore(TransactionalSecretStore[_SecretVault]):
    """Versions in dicts; the transaction is the lock around them."""

    def __init__(self, retained_versions: int = DEFAULT_RETAINED_VERSIONS) -> None:
        super().__init__(retained_versions)
        self._lock = threading.Lock()
        self._vault = _SecretVault()

    def _read_current(self, connection_id: str) -> StoredCredential:
        with self._transaction() as vault:
            if connection_id not in vault.latest:
                raise self._missing(connection_id)
            return vault.versions[connection_id][vault.latest[connection_id]]

    def _read_current_many(self, connection_ids: builtins.list[str]) -> dict[str, ReadResult]:
        with self._transaction() as vault:
            return {
                cid: vault.versions[cid][vault.latest[cid]]
                for cid in connection_ids
                if cid in vault.latest
            }

    @contextmanager
    def _transaction(self) -> Iterator[_SecretVault]:
        with self._lock:
            yield self._vault

    def _current_version(self, tx: _SecretVault, connection_id: str) -> int | None:
        return tx.latest.get(connection_id)

    def _add_version(
        self, tx: _SecretVault, connection_id: str, version: int, credential: Credential
    ) -> None:
        versions = tx.versions.setdefault(connection_id, {})
        versions[version] = StoredCredential(connection_id, version, credential)
        tx.latest[connection_id] = version

    def _destroy_through(self, tx: _SecretVault, connection_id: str, floor: int) -> None:
        versions = tx.versions[connection_id]
        for old in [v for v in versions if v <= floor]:
            del versions[old]

    def _add_pending(
        self, tx: _SecretVault, write: SecretWrite, version: int, parent: int | None
    ) -> None:
        staged = tx.pending.setdefault(write.connection_id, {})
        staged[version] = (parent, write.attempt, write.credential)

    def _pending(
        self, tx: _SecretVault, connection_id: str
    ) -> builtins.list[tuple[int, int | None, str | None]]:
        staged = tx.pending.get(connection_id, {})
        return [(v, parent, attempt) for v, (parent, attempt, _) in sorted(staged.items())]

    def _pending_credential(self, tx: _SecretVault, connection_id: str, version: int) -> Credential:
        return tx.pending[connection_id][version][2]

    def _drop_pending(self, tx: _SecretVault, connection_id: str, version: int) -> None:
        staged = tx.pending.get(connection_id, {})
        staged.pop(version, None)
        if not staged:
            tx.pending.pop(connection_id, None)

    def _with_pending(self, connection_ids: builtins.list[str]) -> builtins.list[str]:
        with self._transaction() as vault:
            return [cid for cid in connection_ids if vault.pending.get(cid)]

    def versions(self, connection_id: str) -> builtins.list[int]:
        with self._transaction() as vault:
            return sorted(vault.versions.get(connection_id, {}))

    def delete(self, connection_id: str) -> None:
        with self._transaction() as vault:
            staged = vault.pending.pop(connection_id, None)
            if connection_id not in vault.latest:
                if staged:
                    return  # only a staged first version: gone now
                raise self._missing(connection_id)
            del vault.latest[connection_id]
            del vault.versions[connection_id]


class _Records(dict[str, ConnectionRecord]):
    """The records, counting every change (the store's change marker)."""

    generation = 0

    def __setitem__(self, key: str, value: ConnectionRecord) -> None:
        super().__setitem__(key, value)
        self.generation += 1

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self.generation += 1


class MemoryVersionPointers:
    """:class:`~tokenbroker.ports.VersionPointers` on its own, for a secret store tried
    without a state store (its contract suite): a connection has a pointer from its first
    move, ``None`` until then."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pointers: dict[str, int | None] = {}

    def current_versions(self, connection_ids: Sequence[str]) -> dict[str, int | None]:
        with self._lock:
            return {cid: self._pointers.get(cid) for cid in connection_ids}

    def move_pointer(
        self, connection_id: str, *, accepted: frozenset[int | None] | None, version: int | None
    ) -> bool:
        with self._lock:
            if accepted is not None and self._pointers.get(connection_id) not in accepted:
                return False
            self._pointers[connection_id] = version
            return True


class MemoryStateStore:
    """``clock`` is the store's lease clock (the port's rule: leases run on the store's time,
    never a refresher's); tests share a fake clock with the refresher or give it its own."""

    def __init__(self, clock: WallClock | None = None) -> None:
        self._clock: WallClock = clock or SystemClock()
        self._lock = threading.Lock()
        self._records: _Records = _Records()
        self._leases: dict[str, Lease] = {}
        self._fencing: dict[str, int] = {}
        self._parked: dict[str, ConnectionEvent] = {}
        self._budgets: dict[str, builtins.list[budget_log.Take]] = {}
        self._budget_expiry: dict[str, int] = {}
        self._budgets_after_sweep = 64

    def create(self, connection: Connection, state: RefreshState) -> None:
        with self._lock:
            if connection.id in self._records:
                raise AlreadyExists(f"connection {connection.id!r} already exists")
            self._records[connection.id] = ConnectionRecord(connection, state)

    def get(self, connection_id: str) -> ConnectionRecord:
        with self._lock:
            return self._get_locked(connection_id)

    # -- the current-version pointer (VersionPointers) -------------------------------------

    def current_versions(self, connection_ids: Sequence[str]) -> dict[str, int | None]:
        with self._lock:
            return {
                cid: self._records[cid].state.current_version
                for cid in connection_ids
                if cid in self._records
            }

    def move_pointer(
        self, connection_id: str, *, accepted: frozenset[int | None] | None, version: int | None
    ) -> bool:
        with self._lock:
            record = self._records.get(connection_id)
            if record is None:
                return False
            if accepted is not None and record.state.current_version not in accepted:
                return False
            state = replace(record.state, current_version=version)
            self._records[connection_id] = replace(record, state=state)
            return True

    def _get_locked(self, connection_id: str) -> ConnectionRecord:
        try:
            return self._records[connection_id]
        except KeyError:
            raise NotFound(f"connection {connection_id!r} not found") from None

    def list(self) -> builtins.list[ConnectionRecord]:
        with self._lock:
            return [self._records[k] for k in sorted(self._records)]

    def delete(self, connection_id: str) -> None:
        with self._lock:
            self._get_locked(connection_id)
            del self._records[connection_id]
            self._leases.pop(connection_id, None)
            # Retire the fencing token: a lease from before the delete must never match later.
            self._fencing[connection_id] = self._fencing.get(connection_id, 0) + 1

    def change_marker(self) -> int:
        return self._records.generation

    def put_state(self, connection_id: str, state: RefreshState) -> None:
        with self._lock:
            record = self._get_locked(connection_id)
            self._records[connection_id] = replace(record, state=state)
            # The operator's write wins: a refresh in flight can no longer commit or renew.
            self._fencing[connection_id] = self._fencing.get(connection_id, 0) + 1
            self._leases.pop(connection_id, None)

    def _lease_free(self, connection_id: str, now: datetime) -> bool:
        lease = self._leases.get(connection_id)
        return lease is None or lease.expires_at <= now

    def _grant(self, connection_id: str, now: datetime, holder: str, ttl: timedelta) -> Claim:
        token = self._fencing.get(connection_id, 0) + 1
        self._fencing[connection_id] = token
        lease = Lease(connection_id, holder, token, now + ttl)
        self._leases[connection_id] = lease
        return Claim(lease, self._records[connection_id])

    def claim_due(
        self,
        now: datetime,
        *,
        holder: str,
        ttl: timedelta,
        limit: int,
        shard: Shard | None = None,
    ) -> ClaimBatch:
        with self._lock:
            at = self._clock.now()
            due = sorted(
                (
                    r
                    for r in self._records.values()
                    if r.state.status is ConnectionStatus.ACTIVE
                    and r.state.next_refresh_at is not None
                    and r.state.next_refresh_at <= now
                    and (shard is None or shard.holds(r.connection.id))
                ),
                key=lambda r: (r.state.next_refresh_at, r.connection.id),
            )
            free = [r for r in due if self._lease_free(r.connection.id, at)]
            claims = [self._grant(r.connection.id, at, holder, ttl) for r in free[:limit]]
            return ClaimBatch(claims, leased_elsewhere=len(due) - len(free))

    def prepare_shards(self) -> int:
        """Nothing to prepare: the slot is computed from the id."""
        return 0

    def claim(
        self,
        connection_ids: Sequence[str],
        now: datetime,  # noqa: ARG002 - the port's signature: a named claim ignores due-ness
        *,
        holder: str,
        ttl: timedelta,
    ) -> ClaimBatch:
        with self._lock:
            at = self._clock.now()
            wanted = list(dict.fromkeys(connection_ids))
            missing = [cid for cid in wanted if cid not in self._records]
            inactive = {
                cid: self._records[cid].state.status
                for cid in wanted
                if cid in self._records
                and self._records[cid].state.status is not ConnectionStatus.ACTIVE
            }
            present = [cid for cid in wanted if cid in self._records and cid not in inactive]
            free = [cid for cid in present if self._lease_free(cid, at)]
            claims = [self._grant(cid, at, holder, ttl) for cid in free]
            return ClaimBatch(
                claims,
                leased_elsewhere=len(present) - len(free),
                missing=missing,
                inactive=inactive,
            )

    def renew(
        self,
        leases: Sequence[Lease],
        *,
        ttl: timedelta,
        intents: Sequence[Intent | None] | None = None,
    ) -> builtins.list[Lease | None]:
        results: builtins.list[Lease | None] = []
        with self._lock:
            at = self._clock.now()
            for lease, intent in zip(leases, intents or [None] * len(leases), strict=True):
                held = self._leases.get(lease.connection_id)
                if held is None or held.token != lease.token:
                    results.append(None)
                    continue
                renewed = replace(held, expires_at=at + ttl)
                self._leases[lease.connection_id] = renewed
                if intent is not None:
                    record = self._records[lease.connection_id]
                    stamped = replace(intent, at=at)
                    self._records[lease.connection_id] = replace(
                        record, state=replace(record.state, intent=stamped)
                    )
                results.append(renewed)
        return results

    def complete(
        self, outcomes: Sequence[Completion | tuple[Lease, RefreshState]]
    ) -> builtins.list[bool]:
        results = []
        with self._lock:
            for outcome in outcomes:
                done = outcome if isinstance(outcome, Completion) else Completion(*outcome)
                cid = done.lease.connection_id
                if cid not in self._records or self._fencing.get(cid) != done.lease.token:
                    results.append(False)
                    continue
                pointer = self._records[cid].state.current_version
                if done.pointer_from is not None and pointer not in done.pointer_from:
                    results.append(False)
                    continue
                self._records[cid] = replace(self._records[cid], state=done.state)
                self._leases.pop(cid, None)
                for event in done.events:
                    self._parked.setdefault(event.event_id, event)
                results.append(True)
        return results

    def release(self, lease: Lease) -> None:
        with self._lock:
            held = self._leases.get(lease.connection_id)
            if held is not None and held.token == lease.token:
                del self._leases[lease.connection_id]

    def park_events(self, events: Sequence[ConnectionEvent]) -> None:
        with self._lock:
            for event in events:
                self._parked.setdefault(event.event_id, event)

    def parked_events(self, limit: int) -> builtins.list[ConnectionEvent]:
        with self._lock:
            return list(self._parked.values())[:limit]

    def unpark_events(self, event_ids: Sequence[str]) -> None:
        with self._lock:
            for event_id in event_ids:
                self._parked.pop(event_id, None)

    def take_budget(
        self, key: str, *, limit: int, window: timedelta, now: datetime, cost: int = 1
    ) -> BudgetDecision:
        """The sliding-window log of the key's takes; the lock makes each take atomic."""
        budget_log.check_arguments(key, limit=limit, window=window, now=now, cost=cost)
        with self._lock:
            result = budget_log.take(
                self._budgets.get(key, []), limit=limit, window=window, now=now, cost=cost
            )
            if result.must_write:
                self._budgets[key] = result.takes
                self._budget_expiry[key] = result.expires_at
                if len(self._budgets) >= 2 * self._budgets_after_sweep:
                    self._sweep_budgets(budget_log.micros(now))
            return result.decision

    def _sweep_budgets(self, now_us: int) -> None:
        """Forget budgets whose every take aged out a grace period ago (keys of refresh tokens
        long rotated away). Run when the number of keys has doubled since the last sweep, so
        its cost is spread over the takes that grew it."""
        cutoff = now_us - budget_log.GC_GRACE_MICROS
        for key in [k for k, expiry in self._budget_expiry.items() if expiry <= cutoff]:
            del self._budgets[key], self._budget_expiry[key]
        self._budgets_after_sweep = max(len(self._budgets), 64)


class MemoryAuthorizationSessions:
    """Authorization sessions in a dict; the lock makes ``take`` atomic. Enough wherever the
    flow starts and ends in one process (``tokenbroker authorize``'s loopback callback)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, AuthorizationSession] = {}

    def put(self, session: AuthorizationSession) -> None:
        with self._lock:
            if session.key in self._sessions:
                raise AlreadyExists("authorization session already exists")
            self._sessions[session.key] = session

    def take(self, key: str) -> AuthorizationSession:
        with self._lock:
            try:
                return self._sessions.pop(key)
            except KeyError:
                raise NotFound("no such authorization session") from None

    def purge(self, now: datetime) -> int:
        with self._lock:
            gone = [k for k, s in self._sessions.items() if s.expires_at < now]
            for key in gone:
                del self._sessions[key]
            return len(gone)


class MemoryEventBus:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: builtins.list[ConnectionEvent] = []

    def publish(self, events: Sequence[ConnectionEvent]) -> None:
        with self._lock:
            self.events.extend(events)


class MemoryMetricsExporter:
    """Keeps every snapshot written (tests, and ``tokenbroker serve`` without a backend);
    ``fail_with`` makes the next writes raise it (a destination that refuses)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.snapshots: builtins.list[Snapshot] = []
        self.fail_with: TokenBrokerError | None = None
        self.closed = False

    def write(self, snapshot: Snapshot) -> None:
        with self._lock:
            if self.fail_with is not None:
                raise self.fail_with
            self.snapshots.append(snapshot)

    def close(self) -> None:
        self.closed = True
