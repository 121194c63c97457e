"""In-memory adapters: the reference implementation of each port, for unit tests and demos.

They keep exactly the semantics the contract suites demand, so a test that passes on them
says something about the embedded and cloud adapters too.
"""

from __future__ import annotations

import builtins
import threading
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta

from tokenbroker.kernel.errors import AlreadyExists, NotFound, VersionConflict
from tokenbroker.kernel.model import (
    Claim,
    Connection,
    ConnectionEvent,
    ConnectionRecord,
    ConnectionStatus,
    Credential,
    Lease,
    RefreshState,
    StoredCredential,
)
from tokenbroker.ports import ClaimBatch, SecretWrite

DEFAULT_RETAINED_VERSIONS = 3


class MemorySecretStore:
    def __init__(self, retained_versions: int = DEFAULT_RETAINED_VERSIONS) -> None:
        self._lock = threading.Lock()
        self._versions: dict[str, dict[int, StoredCredential]] = {}
        self._latest: dict[str, int] = {}
        self.retained_versions = retained_versions

    def get(self, connection_id: str) -> StoredCredential:
        with self._lock:
            if connection_id not in self._latest:
                raise NotFound(f"no credential for connection {connection_id!r}")
            return self._versions[connection_id][self._latest[connection_id]]

    def get_version(self, connection_id: str, version: int) -> StoredCredential:
        with self._lock:
            found = self._versions.get(connection_id, {}).get(version)
            if found is None:
                raise NotFound(f"connection {connection_id!r} has no version {version}")
            return found

    def get_many(self, connection_ids: Sequence[str]) -> dict[str, StoredCredential]:
        with self._lock:
            return {
                cid: self._versions[cid][self._latest[cid]]
                for cid in connection_ids
                if cid in self._latest
            }

    def _put_locked(self, write: SecretWrite) -> int:
        current = self._latest.get(write.connection_id)
        if current != write.expected_version:
            raise VersionConflict(
                f"connection {write.connection_id!r}: current version is {current}, "
                f"expected {write.expected_version}"
            )
        version = (current or 0) + 1
        versions = self._versions.setdefault(write.connection_id, {})
        versions[version] = StoredCredential(write.connection_id, version, write.credential)
        self._latest[write.connection_id] = version
        for old in [v for v in versions if v <= version - self.retained_versions]:
            del versions[old]
        return version

    def put(
        self, connection_id: str, credential: Credential, *, expected_version: int | None
    ) -> int:
        with self._lock:
            return self._put_locked(SecretWrite(connection_id, credential, expected_version))

    def put_many(self, writes: Sequence[SecretWrite]) -> builtins.list[int | VersionConflict]:
        results: builtins.list[int | VersionConflict] = []
        with self._lock:
            for write in writes:
                try:
                    results.append(self._put_locked(write))
                except VersionConflict as conflict:
                    results.append(conflict)
        return results

    def versions(self, connection_id: str) -> builtins.list[int]:
        with self._lock:
            return sorted(self._versions.get(connection_id, {}))

    def delete(self, connection_id: str) -> None:
        with self._lock:
            if connection_id not in self._latest:
                raise NotFound(f"no credential for connection {connection_id!r}")
            del self._latest[connection_id]
            del self._versions[connection_id]


class MemoryStateStore:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, ConnectionRecord] = {}
        self._leases: dict[str, Lease] = {}
        self._fencing: dict[str, int] = {}
        self._parked: dict[str, ConnectionEvent] = {}

    def create(self, connection: Connection, state: RefreshState) -> None:
        with self._lock:
            if connection.id in self._records:
                raise AlreadyExists(f"connection {connection.id!r} already exists")
            self._records[connection.id] = ConnectionRecord(connection, state)

    def get(self, connection_id: str) -> ConnectionRecord:
        with self._lock:
            return self._get_locked(connection_id)

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

    def put_state(self, connection_id: str, state: RefreshState) -> None:
        with self._lock:
            record = self._get_locked(connection_id)
            self._records[connection_id] = replace(record, state=state)

    def _lease_free(self, connection_id: str, now: datetime) -> bool:
        lease = self._leases.get(connection_id)
        return lease is None or lease.expires_at <= now

    def _grant(self, connection_id: str, now: datetime, holder: str, ttl: timedelta) -> Claim:
        token = self._fencing.get(connection_id, 0) + 1
        self._fencing[connection_id] = token
        lease = Lease(connection_id, holder, token, now + ttl)
        self._leases[connection_id] = lease
        return Claim(lease, self._records[connection_id])

    def claim_due(self, now: datetime, *, holder: str, ttl: timedelta, limit: int) -> ClaimBatch:
        with self._lock:
            due = sorted(
                (
                    r
                    for r in self._records.values()
                    if r.state.status is ConnectionStatus.ACTIVE
                    and r.state.next_refresh_at is not None
                    and r.state.next_refresh_at <= now
                ),
                key=lambda r: (r.state.next_refresh_at, r.connection.id),
            )
            free = [r for r in due if self._lease_free(r.connection.id, now)]
            claims = [self._grant(r.connection.id, now, holder, ttl) for r in free[:limit]]
            return ClaimBatch(claims, leased_elsewhere=len(due) - len(free))

    def claim(
        self, connection_ids: Sequence[str], now: datetime, *, holder: str, ttl: timedelta
    ) -> ClaimBatch:
        with self._lock:
            wanted = list(dict.fromkeys(connection_ids))
            missing = [cid for cid in wanted if cid not in self._records]
            present = [cid for cid in wanted if cid in self._records]
            free = [cid for cid in present if self._lease_free(cid, now)]
            claims = [self._grant(cid, now, holder, ttl) for cid in free]
            return ClaimBatch(claims, leased_elsewhere=len(present) - len(free), missing=missing)

    def complete(self, outcomes: Sequence[tuple[Lease, RefreshState]]) -> builtins.list[bool]:
        results = []
        with self._lock:
            for lease, state in outcomes:
                cid = lease.connection_id
                if cid not in self._records or self._fencing.get(cid) != lease.token:
                    results.append(False)
                    continue
                self._records[cid] = replace(self._records[cid], state=state)
                self._leases.pop(cid, None)
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


class MemoryEventBus:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: builtins.list[ConnectionEvent] = []

    def publish(self, events: Sequence[ConnectionEvent]) -> None:
        with self._lock:
            self.events.extend(events)
