"""The embedded default: everything in one SQLite file, credentials encrypted with AES-GCM.

For running tokenbroker with no cloud account. One state directory holds ``tokenbroker.db``
and, unless a key is given in the environment, ``encryption.key`` (created on first run with
mode 0600). The database keeps a key check value: a key that cannot decrypt it is refused at
start, before anything is read or written, so a wrong key can never shadow or corrupt data.

Durability: WAL journal with ``synchronous=FULL``; a write returns only after it is on disk.
Several processes may share the file: claims and writes run in ``BEGIN IMMEDIATE``
transactions, so two refreshers can never lease the same connection.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import hashlib
import json
import os
import secrets as _random
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tokenbroker.adapters.secret_store import (
    DEFAULT_RETAINED_VERSIONS,
    ReadResult,
    TransactionalSecretStore,
)
from tokenbroker.kernel.clock import from_epoch, to_epoch
from tokenbroker.kernel.errors import (
    AlreadyExists,
    ConfigError,
    CorruptCredential,
    NotFound,
    StoreUnavailable,
    VersionConflict,
)
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
    StoredCredential,
)
from tokenbroker.ports import ClaimBatch, CommitOutcome, Completion, Promotion, SecretWrite

DB_NAME = "tokenbroker.db"
KEY_FILE_NAME = "encryption.key"
KEY_BYTES = 32  # AES-256-GCM
NONCE_BYTES = 12  # NIST SP 800-38D recommends 96-bit nonces
_KEY_CHECK_PLAINTEXT = b"tokenbroker key check v1"
_CHUNK = 500  # stays under SQLite's host-parameter limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS connections (
    id TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    status TEXT NOT NULL,
    expires_at REAL,
    next_refresh_at REAL,
    last_refresh_at REAL,
    last_attempt_at REAL,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    current_version INTEGER,
    last_error TEXT,
    lease_holder TEXT,
    lease_token INTEGER NOT NULL DEFAULT 0,
    lease_expires_at REAL
);
CREATE INDEX IF NOT EXISTS connections_due ON connections (status, next_refresh_at);
CREATE TABLE IF NOT EXISTS secrets (
    connection_id TEXT PRIMARY KEY,
    current_version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS secret_versions (
    connection_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_at REAL NOT NULL,
    sealed BLOB NOT NULL,
    PRIMARY KEY (connection_id, version)
);
-- Answers staged before they are current (SecretStore.stage): every read settles them.
CREATE TABLE IF NOT EXISTS pending_versions (
    connection_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    parent INTEGER,
    attempt TEXT,
    created_at REAL NOT NULL,
    sealed BLOB NOT NULL,
    PRIMARY KEY (connection_id, version)
);
-- Fencing tokens outlive a deleted connection, so a lease taken before a delete can never
-- match a lease on the re-created connection.
CREATE TABLE IF NOT EXISTS retired_fencing (
    connection_id TEXT PRIMARY KEY,
    lease_token INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS parked_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    connection_id TEXT NOT NULL,
    type TEXT NOT NULL,
    body TEXT NOT NULL
);
"""


#: Columns added after the first release: (table, column, declaration). Added to a database
#: created before them, once, at open.
_ADDED_COLUMNS = (
    # The lease clock's epoch (HostLeaseClock: the boot id) of ``lease_expires_at``.
    ("connections", "lease_epoch", "TEXT"),
    # A refresh presenting a rotating refresh token whose outcome is not known yet (JSON).
    ("connections", "intent", "TEXT"),
    ("connections", "at_risk", "INTEGER NOT NULL DEFAULT 0"),
)


def _migrate(conn: sqlite3.Connection) -> None:
    for table, column, declaration in _ADDED_COLUMNS:
        present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")


def key_fingerprint(key: bytes) -> str:
    return "sha256:" + hashlib.sha256(key).hexdigest()[:12]


def decode_key(value: str, where: str) -> bytes:
    """A base64 (standard or URL-safe) 32-byte key."""
    try:
        text = value.strip().replace("+", "-").replace("/", "_")
        raw = base64.b64decode(text, altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{where}: not valid base64") from None
    if len(raw) != KEY_BYTES:
        raise ConfigError(f"{where}: must decode to {KEY_BYTES} bytes (got {len(raw)})")
    return raw


def new_key_text() -> str:
    return base64.urlsafe_b64encode(_random.token_bytes(KEY_BYTES)).decode()


def _read_key_file(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"key file {path} is readable by other users (mode {stat.S_IMODE(mode):o}); "
            f"run: chmod 600 {path}"
        )
    return decode_key(path.read_text(), f"key file {path}")


def _create_key_file(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = new_key_text()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return decode_key(text, f"key file {path}")


class EmbeddedDatabase:
    """The shared SQLite connection, its lock and the cipher."""

    def __init__(
        self, state_dir: Path, *, key: str | None = None, key_file: Path | None = None
    ) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = self.state_dir / DB_NAME
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            self.path, timeout=30, isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA busy_timeout=30000")
        self._conn.executescript(_SCHEMA)
        _migrate(self._conn)
        try:
            self._key, self.key_source = self._resolve_key(key, key_file)
            self._aead = AESGCM(self._key)
            self._verify_or_record_key()
        except BaseException:
            self._conn.close()
            raise

    # -- key handling ----------------------------------------------------------------------

    def _has_key_check(self) -> bool:
        row = self._conn.execute("SELECT 1 FROM meta WHERE key = 'key_check'").fetchone()
        return row is not None

    def _resolve_key(self, key: str | None, key_file: Path | None) -> tuple[bytes, str]:
        if key is not None:
            return decode_key(key, "TOKENBROKER_ENCRYPTION_KEY"), "TOKENBROKER_ENCRYPTION_KEY"
        path = key_file or self.state_dir / KEY_FILE_NAME
        if path.exists():
            return _read_key_file(path), f"key file {path}"
        if self._has_key_check():
            raise ConfigError(
                f"the state in {self.state_dir} is encrypted, but key file {path} is missing and"
                " TOKENBROKER_ENCRYPTION_KEY is not set; restore the key (nothing was changed)"
            )
        return _create_key_file(path), f"key file {path} (created)"

    def _verify_or_record_key(self) -> None:
        with self.transaction() as cur:
            row = cur.execute("SELECT value FROM meta WHERE key = 'key_check'").fetchone()
            if row is None:
                sealed = self.seal(_KEY_CHECK_PLAINTEXT, "key-check")
                cur.execute("INSERT INTO meta (key, value) VALUES ('key_check', ?)", (sealed,))
                return
        try:
            matches = self.open(row[0], "key-check") == _KEY_CHECK_PLAINTEXT
        except InvalidTag:
            matches = False
        if not matches:
            raise ConfigError(
                f"the encryption key from {self.key_source} ({key_fingerprint(self._key)}) does "
                f"not decrypt the existing state in {self.state_dir}; refusing to start. Use the "
                "key this state was created with (nothing was changed)"
            )

    def seal(self, plaintext: bytes, context: str) -> bytes:
        nonce = _random.token_bytes(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, context.encode())

    def open(self, sealed: bytes, context: str) -> bytes:
        return self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], context.encode())

    # -- transactions ----------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        """A write transaction (``BEGIN IMMEDIATE``): serialised across processes."""
        with self._lock:
            cur = self._conn.cursor()
            try:
                cur.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"embedded database is busy: {exc}") from None
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")
            finally:
                cur.close()

    def read(self, sql: str, params: Sequence[Any] = ()) -> builtins.list[Any]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _dt(value: float | None) -> datetime | None:
    return from_epoch(value)


_STATE_COLUMNS = (
    "status, expires_at, next_refresh_at, last_refresh_at, last_attempt_at, "
    "consecutive_failures, current_version, last_error, intent, at_risk"
)
#: ``UPDATE connections SET`` clause writing every state column.
_STATE_SET = ", ".join(f"{name.strip()}=?" for name in _STATE_COLUMNS.split(","))


def _state_params(state: RefreshState) -> tuple[Any, ...]:
    return (
        state.status.value,
        to_epoch(state.expires_at),
        to_epoch(state.next_refresh_at),
        to_epoch(state.last_refresh_at),
        to_epoch(state.last_attempt_at),
        state.consecutive_failures,
        state.current_version,
        state.last_error,
        json.dumps(state.intent.to_json()) if state.intent is not None else None,
        int(state.at_risk),
    )


def _record(row: Sequence[Any]) -> ConnectionRecord:
    body, status, expires, next_at, last_ok, last_try, failures, version, error, intent, risk = row
    return ConnectionRecord(
        Connection.from_json(json.loads(body)),
        RefreshState(
            status=ConnectionStatus(status),
            expires_at=_dt(expires),
            next_refresh_at=_dt(next_at),
            last_refresh_at=_dt(last_ok),
            last_attempt_at=_dt(last_try),
            consecutive_failures=failures,
            current_version=version,
            last_error=error,
            intent=Intent.from_json(json.loads(intent)) if intent else None,
            at_risk=bool(risk),
        ),
    )


_RECORD_SELECT = f"SELECT body, {_STATE_COLUMNS} FROM connections"  # noqa: S608 - constants


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _park(cur: sqlite3.Cursor, events: Sequence[ConnectionEvent]) -> None:
    cur.executemany(
        "INSERT OR IGNORE INTO parked_events (event_id, body) VALUES (?, ?)",
        [(e.event_id, json.dumps(e.to_json())) for e in events],
    )


class HostLeaseClock:
    """The embedded store's lease clock: the host's boot clock (``CLOCK_BOOTTIME``).

    Every process sharing a SQLite file runs on one host (SQLite's locking does not work over
    network file systems, https://www.sqlite.org/useovernet.html), so one host clock serves
    them all. Not the wall clock: an NTP or manual step of it would make live leases look
    expired (another refresher takes over while the holder still presents) or stretch dead
    ones. The boot clock never steps and counts suspended time; ``epoch`` (the kernel's boot
    id) tells its readings from those of a previous boot, when every holder died anyway.
    Off Linux it falls back to ``CLOCK_MONOTONIC`` and an epoch derived from the boot time.
    """

    def __init__(self) -> None:
        self._clock = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)
        try:
            self.epoch = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            booted = time.time() - time.clock_gettime(self._clock)
            self.epoch = f"boot@{round(booted, -1):.0f}"  # stable to ~10 s across processes

    def now(self) -> datetime:
        """Seconds since boot, as a UTC datetime (1970 plus the uptime): only ever compared
        with other readings of the same epoch."""
        return datetime.fromtimestamp(time.clock_gettime(self._clock), UTC)


class LeaseClock(Protocol):
    """What the embedded store reads lease time from (tests give it a manual one)."""

    @property
    def epoch(self) -> str: ...

    def now(self) -> datetime: ...


#: A lease is free: none held, held under another boot's clock, or expired by this one.
_LEASE_FREE = "(lease_expires_at IS NULL OR lease_epoch IS NOT ? OR lease_expires_at <= ?)"
_LEASE_LIVE = "(lease_expires_at > ? AND lease_epoch IS ?)"


class EmbeddedStateStore:
    """``lease_clock``: where lease time comes from (default :class:`HostLeaseClock`)."""

    def __init__(self, db: EmbeddedDatabase, *, lease_clock: LeaseClock | None = None) -> None:
        self._db = db
        self._clock: LeaseClock = lease_clock or HostLeaseClock()

    @property
    def db(self) -> EmbeddedDatabase:
        return self._db

    def _lease_now(self) -> tuple[datetime, str]:
        return self._clock.now(), self._clock.epoch

    def create(self, connection: Connection, state: RefreshState) -> None:
        try:
            with self._db.transaction() as cur:
                cur.execute(
                    f"INSERT INTO connections (id, body, {_STATE_COLUMNS}, lease_token) "  # noqa: S608
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, COALESCE((SELECT lease_token FROM "
                    "retired_fencing WHERE connection_id = ?), 0))",
                    (
                        connection.id,
                        json.dumps(connection.to_json()),
                        *_state_params(state),
                        connection.id,
                    ),
                )
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"connection {connection.id!r} already exists") from None

    def get(self, connection_id: str) -> ConnectionRecord:
        rows = self._db.read(f"{_RECORD_SELECT} WHERE id = ?", (connection_id,))
        if not rows:
            raise NotFound(f"connection {connection_id!r} not found")
        return _record(rows[0])

    def list(self) -> builtins.list[ConnectionRecord]:
        return [_record(r) for r in self._db.read(f"{_RECORD_SELECT} ORDER BY id")]

    def delete(self, connection_id: str) -> None:
        with self._db.transaction() as cur:
            cur.execute(
                "INSERT OR REPLACE INTO retired_fencing (connection_id, lease_token) "
                "SELECT id, lease_token + 1 FROM connections WHERE id = ?",
                (connection_id,),
            )
            cur.execute("DELETE FROM connections WHERE id = ?", (connection_id,))
            if cur.rowcount == 0:
                raise NotFound(f"connection {connection_id!r} not found")

    def put_state(self, connection_id: str, state: RefreshState) -> None:
        # The operator's write wins: the fencing token grows and the lease is freed, so a
        # refresh in flight can no longer commit or renew.
        with self._db.transaction() as cur:
            cur.execute(
                f"UPDATE connections SET {_STATE_SET}, lease_token=lease_token+1, "  # noqa: S608
                "lease_holder=NULL, lease_expires_at=NULL WHERE id = ?",
                (*_state_params(state), connection_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"connection {connection_id!r} not found")

    def _grant(
        self, cur: sqlite3.Cursor, ids: Sequence[str], holder: str, ttl: timedelta
    ) -> builtins.list[Claim]:
        now, epoch = self._lease_now()
        expires = now + ttl
        cur.executemany(
            "UPDATE connections SET lease_holder=?, lease_token=lease_token+1, "
            "lease_expires_at=?, lease_epoch=? WHERE id=?",
            [(holder, expires.timestamp(), epoch, cid) for cid in ids],
        )
        claims: builtins.list[Claim] = []
        for chunk in _chunks(ids):
            marks = ",".join("?" * len(chunk))
            rows = cur.execute(
                f"SELECT id, lease_token, body, {_STATE_COLUMNS} FROM connections "  # noqa: S608
                f"WHERE id IN ({marks})",
                tuple(chunk),
            ).fetchall()
            for row in rows:
                lease = Lease(row[0], holder, row[1], expires)
                claims.append(Claim(lease, _record(row[2:])))
        order = {cid: i for i, cid in enumerate(ids)}
        claims.sort(key=lambda c: order[c.lease.connection_id])
        return claims

    def claim_due(self, now: datetime, *, holder: str, ttl: timedelta, limit: int) -> ClaimBatch:
        due = now.timestamp()
        with self._db.transaction() as cur:
            lease_now, epoch = self._lease_now()
            at = lease_now.timestamp()
            ids = [
                r[0]
                for r in cur.execute(
                    "SELECT id FROM connections WHERE status = 'active' AND next_refresh_at <= ?"  # noqa: S608 - constants
                    f" AND {_LEASE_FREE} ORDER BY next_refresh_at, id LIMIT ?",
                    (due, epoch, at, limit),
                )
            ]
            leased = cur.execute(
                "SELECT count(*) FROM connections WHERE status = 'active' AND "  # noqa: S608 - constants
                f"next_refresh_at <= ? AND {_LEASE_LIVE}",
                (due, at, epoch),
            ).fetchone()[0]
            return ClaimBatch(self._grant(cur, ids, holder, ttl), leased_elsewhere=leased)

    def claim(
        self,
        connection_ids: Sequence[str],
        now: datetime,  # noqa: ARG002 - the port's signature: a named claim ignores due-ness
        *,
        holder: str,
        ttl: timedelta,
    ) -> ClaimBatch:
        wanted = list(dict.fromkeys(connection_ids))
        with self._db.transaction() as cur:
            lease_now, epoch = self._lease_now()
            at = lease_now.timestamp()
            found: dict[str, tuple[str, bool]] = {}
            for chunk in _chunks(wanted):
                marks = ",".join("?" * len(chunk))
                for cid, status, live in cur.execute(
                    f"SELECT id, status, {_LEASE_LIVE} FROM connections WHERE id IN ({marks})",  # noqa: S608
                    (at, epoch, *chunk),
                ):
                    found[cid] = (status, bool(live))
            inactive = {
                cid: ConnectionStatus(status)
                for cid, (status, _) in found.items()
                if status != ConnectionStatus.ACTIVE.value
            }
            present = [cid for cid in wanted if cid in found and cid not in inactive]
            free = [cid for cid in present if not found[cid][1]]
            return ClaimBatch(
                self._grant(cur, free, holder, ttl),
                leased_elsewhere=len(present) - len(free),
                missing=[cid for cid in wanted if cid not in found],
                inactive={cid: inactive[cid] for cid in wanted if cid in inactive},
            )

    def renew(
        self,
        leases: Sequence[Lease],
        *,
        ttl: timedelta,
        intents: Sequence[Intent | None] | None = None,
    ) -> builtins.list[Lease | None]:
        results: builtins.list[Lease | None] = []
        if not leases:
            return results
        with self._db.transaction() as cur:
            now, epoch = self._lease_now()
            expires = now + ttl
            for lease, intent in zip(leases, intents or [None] * len(leases), strict=True):
                recorded = json.dumps(replace(intent, at=now).to_json()) if intent else None
                cur.execute(
                    "UPDATE connections SET lease_expires_at=?, lease_epoch=?, "
                    "intent=COALESCE(?, intent) "
                    "WHERE id = ? AND lease_token = ? AND lease_holder IS NOT NULL",
                    (expires.timestamp(), epoch, recorded, lease.connection_id, lease.token),
                )
                results.append(replace(lease, expires_at=expires) if cur.rowcount == 1 else None)
        return results

    def complete(
        self, outcomes: Sequence[Completion | tuple[Lease, RefreshState]]
    ) -> builtins.list[bool]:
        with self._db.transaction() as cur:
            return self.complete_in(cur, outcomes)

    def complete_in(
        self, cur: sqlite3.Cursor, outcomes: Sequence[Completion | tuple[Lease, RefreshState]]
    ) -> builtins.list[bool]:
        """``complete`` inside the caller's transaction (the atomic refresh commit)."""
        results = []
        for outcome in outcomes:
            done = outcome if isinstance(outcome, Completion) else Completion(*outcome)
            cur.execute(
                f"UPDATE connections SET {_STATE_SET}, lease_holder=NULL, "  # noqa: S608
                "lease_expires_at=NULL WHERE id = ? AND lease_token = ?",
                (*_state_params(done.state), done.lease.connection_id, done.lease.token),
            )
            accepted = cur.rowcount == 1
            if accepted and done.events:
                _park(cur, done.events)
            results.append(accepted)
        return results

    def release(self, lease: Lease) -> None:
        with self._db.transaction() as cur:
            cur.execute(
                "UPDATE connections SET lease_holder=NULL, lease_expires_at=NULL "
                "WHERE id = ? AND lease_token = ?",
                (lease.connection_id, lease.token),
            )

    def park_events(self, events: Sequence[ConnectionEvent]) -> None:
        with self._db.transaction() as cur:
            _park(cur, events)

    def parked_events(self, limit: int) -> builtins.list[ConnectionEvent]:
        rows = self._db.read("SELECT body FROM parked_events ORDER BY seq LIMIT ?", (limit,))
        return [ConnectionEvent.from_json(json.loads(body)) for (body,) in rows]

    def unpark_events(self, event_ids: Sequence[str]) -> None:
        with self._db.transaction() as cur:
            cur.executemany(
                "DELETE FROM parked_events WHERE event_id = ?", [(i,) for i in event_ids]
            )


class EmbeddedSecretStore(TransactionalSecretStore[sqlite3.Cursor]):
    """Versions sealed with AES-GCM; the associated data binds each blob to its connection
    and version, so a blob copied to another row does not decrypt. A ``BEGIN IMMEDIATE``
    transaction is the compare-and-set's transaction, serialised across processes."""

    def __init__(
        self, db: EmbeddedDatabase, retained_versions: int = DEFAULT_RETAINED_VERSIONS
    ) -> None:
        super().__init__(retained_versions)
        self._db = db

    @property
    def db(self) -> EmbeddedDatabase:
        return self._db

    def promote_in(self, cur: sqlite3.Cursor, promotion: Promotion) -> int:
        """A promotion inside the caller's transaction (the atomic refresh commit)."""
        return self._promote_in(cur, promotion)

    @staticmethod
    def _context(connection_id: str, version: int) -> str:
        return f"tokenbroker:credential:v1:{connection_id}:{version}"

    def _unseal(
        self, connection_id: str, version: int, created: float, sealed: bytes
    ) -> StoredCredential:
        try:
            plaintext = self._db.open(sealed, self._context(connection_id, version))
        except InvalidTag:
            # The key itself was verified at start (the key check value), so a row that does
            # not decrypt was damaged, tampered with or moved: a corrupt record.
            raise CorruptCredential(
                f"credential {connection_id!r} v{version} does not decrypt with the configured key"
            ) from None
        return StoredCredential(
            connection_id, version, Credential.from_plaintext(plaintext), from_epoch(created)
        )

    # -- reads -----------------------------------------------------------------------------

    def _read_current(self, connection_id: str) -> StoredCredential:
        found = self._read_current_many([connection_id])
        if connection_id not in found:
            raise self._missing(connection_id)
        value = found[connection_id]
        if isinstance(value, CorruptCredential):
            raise value
        return value

    def _read_current_many(self, connection_ids: builtins.list[str]) -> dict[str, ReadResult]:
        found: dict[str, ReadResult] = {}
        for chunk in _chunks(connection_ids):
            marks = ",".join("?" * len(chunk))
            rows = self._db.read(
                "SELECT v.connection_id, v.version, v.created_at, v.sealed FROM secrets s "  # noqa: S608 - only "?" placeholders are interpolated
                "JOIN secret_versions v ON v.connection_id = s.connection_id "
                f"AND v.version = s.current_version WHERE s.connection_id IN ({marks})",
                tuple(chunk),
            )
            for cid, version, created, sealed in rows:
                value = self._read_value(cid, partial(self._unseal, cid, version, created, sealed))
                if value is not None:
                    found[cid] = value
        return found

    def versions(self, connection_id: str) -> builtins.list[int]:
        rows = self._db.read(
            "SELECT version FROM secret_versions WHERE connection_id = ? ORDER BY version",
            (connection_id,),
        )
        return [r[0] for r in rows]

    # -- the transaction's primitives --------------------------------------------------------

    def _transaction(self) -> AbstractContextManager[sqlite3.Cursor]:
        return self._db.transaction()

    def _current_version(self, tx: sqlite3.Cursor, connection_id: str) -> int | None:
        row = tx.execute(
            "SELECT current_version FROM secrets WHERE connection_id = ?", (connection_id,)
        ).fetchone()
        return row[0] if row else None

    def _add_version(
        self, tx: sqlite3.Cursor, connection_id: str, version: int, credential: Credential
    ) -> None:
        sealed = self._db.seal(credential.to_plaintext(), self._context(connection_id, version))
        tx.execute(
            "INSERT INTO secret_versions (connection_id, version, created_at, sealed) "
            "VALUES (?, ?, ?, ?)",
            (connection_id, version, time.time(), sealed),
        )
        tx.execute(
            "INSERT INTO secrets (connection_id, current_version) VALUES (?, ?) "
            "ON CONFLICT (connection_id) DO UPDATE SET current_version = excluded.current_version",
            (connection_id, version),
        )

    def _destroy_through(self, tx: sqlite3.Cursor, connection_id: str, floor: int) -> None:
        tx.execute(
            "DELETE FROM secret_versions WHERE connection_id = ? AND version <= ?",
            (connection_id, floor),
        )

    # -- pending versions: sealed bound to their parent and attempt too ---------------------

    @staticmethod
    def _pending_context(
        connection_id: str, version: int, parent: int | None, attempt: str | None
    ) -> str:
        return f"tokenbroker:pending:v1:{connection_id}:{version}:{parent}:{attempt}"

    def _add_pending(
        self, tx: sqlite3.Cursor, write: SecretWrite, version: int, parent: int | None
    ) -> None:
        cid, attempt = write.connection_id, write.attempt
        sealed = self._db.seal(
            write.credential.to_plaintext(), self._pending_context(cid, version, parent, attempt)
        )
        tx.execute(
            "INSERT INTO pending_versions (connection_id, version, parent, attempt, created_at,"
            " sealed) VALUES (?, ?, ?, ?, ?, ?)",
            (cid, version, parent, attempt, time.time(), sealed),
        )

    def _pending(
        self, tx: sqlite3.Cursor, connection_id: str
    ) -> builtins.list[tuple[int, int | None, str | None]]:
        rows = tx.execute(
            "SELECT version, parent, attempt FROM pending_versions WHERE connection_id = ?"
            " ORDER BY version",
            (connection_id,),
        ).fetchall()
        return [(version, parent, attempt) for version, parent, attempt in rows]

    def _pending_credential(
        self, tx: sqlite3.Cursor, connection_id: str, version: int
    ) -> Credential:
        parent, attempt, sealed = tx.execute(
            "SELECT parent, attempt, sealed FROM pending_versions"
            " WHERE connection_id = ? AND version = ?",
            (connection_id, version),
        ).fetchone()
        context = self._pending_context(connection_id, version, parent, attempt)
        try:
            return Credential.from_plaintext(self._db.open(sealed, context))
        except InvalidTag:
            raise CorruptCredential(
                f"staged credential {connection_id!r} v{version} does not decrypt"
            ) from None

    def _drop_pending(self, tx: sqlite3.Cursor, connection_id: str, version: int) -> None:
        tx.execute(
            "DELETE FROM pending_versions WHERE connection_id = ? AND version = ?",
            (connection_id, version),
        )

    def _with_pending(self, connection_ids: builtins.list[str]) -> builtins.list[str]:
        found: set[str] = set()
        for chunk in _chunks(connection_ids):
            marks = ",".join("?" * len(chunk))
            found.update(
                cid
                for (cid,) in self._db.read(
                    "SELECT DISTINCT connection_id FROM pending_versions"  # noqa: S608 - only "?" placeholders
                    f" WHERE connection_id IN ({marks})",
                    tuple(chunk),
                )
            )
        return [cid for cid in connection_ids if cid in found]

    def delete(self, connection_id: str) -> None:
        with self._db.transaction() as cur:
            cur.execute("DELETE FROM pending_versions WHERE connection_id = ?", (connection_id,))
            staged = cur.rowcount
            cur.execute("DELETE FROM secrets WHERE connection_id = ?", (connection_id,))
            if cur.rowcount == 0:
                if staged:
                    return  # only a staged first version: gone now
                raise self._missing(connection_id)
            cur.execute("DELETE FROM secret_versions WHERE connection_id = ?", (connection_id,))


class EmbeddedRefreshCommitter:
    """The refresh commit in one SQLite transaction per batch (:class:`RefreshCommitter`):
    for each outcome, the fencing token is checked, the staged version promoted, the state
    written and the events parked -- all of it, or (lease lost) none of it. A staged version
    left behind by a lost lease is settled by the next read, so the answer is not lost."""

    def __init__(self, secrets: EmbeddedSecretStore, state: EmbeddedStateStore) -> None:
        if secrets.db is not state.db:
            raise ConfigError("the atomic refresh commit needs both stores on one database")
        self._secrets = secrets
        self._state = state
        self._db = state.db

    def commit(
        self, items: Sequence[tuple[Completion, Promotion | None]]
    ) -> builtins.list[CommitOutcome]:
        outcomes: builtins.list[CommitOutcome] = []
        if not items:
            return outcomes
        with self._db.transaction() as cur:
            for completion, promotion in items:
                lease = completion.lease
                row = cur.execute(
                    "SELECT lease_token FROM connections WHERE id = ?", (lease.connection_id,)
                ).fetchone()
                if row is None or row[0] != lease.token:
                    outcomes.append(CommitOutcome.LEASE_LOST)
                    continue
                if promotion is not None:
                    try:
                        self._secrets.promote_in(cur, promotion)
                    except (VersionConflict, CorruptCredential):
                        cur.execute(
                            "UPDATE connections SET lease_holder=NULL, lease_expires_at=NULL "
                            "WHERE id = ? AND lease_token = ?",
                            (lease.connection_id, lease.token),
                        )
                        outcomes.append(CommitOutcome.SUPERSEDED)
                        continue
                (accepted,) = self._state.complete_in(cur, [completion])
                outcomes.append(CommitOutcome.COMMITTED if accepted else CommitOutcome.LEASE_LOST)
        return outcomes


def refresh_committer(secrets: object, state: object) -> EmbeddedRefreshCommitter | None:
    """The atomic committer when both stores are embedded on one database, else ``None``."""
    if (
        isinstance(secrets, EmbeddedSecretStore)
        and isinstance(state, EmbeddedStateStore)
        and secrets.db is state.db
    ):
        return EmbeddedRefreshCommitter(secrets, state)
    return None


class EmbeddedOutbox:
    """Events appended to the ``outbox`` table, in order; duplicates (same event id) ignored."""

    def __init__(self, db: EmbeddedDatabase) -> None:
        self._db = db

    def publish(self, events: Sequence[ConnectionEvent]) -> None:
        with self._db.transaction() as cur:
            cur.executemany(
                "INSERT OR IGNORE INTO outbox (event_id, connection_id, type, body) "
                "VALUES (?, ?, ?, ?)",
                [
                    (e.event_id, e.connection_id, e.type.value, json.dumps(e.to_json()))
                    for e in events
                ],
            )

    def read(
        self, *, after: int = 0, limit: int = 1000, connection_id: str | None = None
    ) -> builtins.list[tuple[int, ConnectionEvent]]:
        sql = "SELECT seq, body FROM outbox WHERE seq > ?"
        params: builtins.list[Any] = [after]
        if connection_id is not None:
            sql += " AND connection_id = ?"
            params.append(connection_id)
        sql += " ORDER BY seq LIMIT ?"
        params.append(limit)
        return [
            (seq, ConnectionEvent.from_json(json.loads(body)))
            for seq, body in self._db.read(sql, params)
        ]
