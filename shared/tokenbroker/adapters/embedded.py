"""The embedded default: everything in one SQLite file, credentials encrypted with AES-GCM.

For running tokenbroker with no cloud account. One state directory (created 0700) holds
``tokenbroker.db`` (created 0600, and so are SQLite's ``-wal`` and ``-shm`` beside it) and,
unless a key is given in the environment, ``encryption.key`` (created on first run with mode
0600). The database keeps a key check value: a key that cannot decrypt it is refused at start,
before anything is read or written, so a wrong key can never shadow or corrupt data.

Durability: WAL journal with ``synchronous=FULL``; a write returns only after it is on disk.
Several processes may share the file: claims and writes run in ``BEGIN IMMEDIATE``
transactions, so two refreshers can never lease the same connection.

Files
-----
Refused at open, with a ``ConfigError`` naming the path (nothing is created, followed or
changed on the way): a state directory, database or key file that is a symbolic link (whoever
can change the link decides which state or which key is used); a key file that is not a
regular file, is not owned by the user running tokenbroker, or that other users can access; a
state directory that is a file or that this user cannot use. ``create=False`` (opening for a
read: ``status``, ``profiles``) never creates a directory, a database or a key: missing state
is ``ConfigError("no tokenbroker state at PATH ...")``. A database left readable by others
by an older release is made 0600 on open.

Integrity: threat model
-----------------------
The adversary can read and write the database file (a copied backup, a shared volume, a loose
permission) but does not hold the key, and cannot run code as the broker's user. AES-GCM keeps
every credential confidential and detects any change to a blob; its associated data binds the
blob to its connection, its version and its *incarnation* (a random id given to each new
secret, so a secret deleted and created again never accepts the old one's blobs). What decides
behaviour is authenticated too, with HMAC-SHA256 under a key derived from the data key (HKDF,
RFC 5869, with its own label, so the two uses of the key never mix):

* the current-version pointer, over (connection, incarnation, owner, version): a pointer moved
  back to an older retained version, or an old pointer row pasted back, is refused -- and so is
  any version stored above the pointer (the rollback leaves the newer blob behind);
* the connection's configuration (the whole registered record: ``token_url``, ``client_id``,
  scopes, auth method, params, profile, grant), over (connection id, the registration's
  incarnation, the stored text): an edited, swapped or replayed record is refused;
* which registration a credential belongs to (its *owner*: the connection's incarnation when
  its first version was written): the whole secret of an earlier registration of the same id,
  restored after the connection was removed and added again, is refused.

A refusal is :class:`CorruptCredential` for that connection alone: never a silent use of the
edited value, never a failure of the others. Every read that hands a credential out checks the
pointer, the blob and -- when the connection is registered here -- its configuration and
ownership, so a credential is never handed out for use with an edited ``token_url``; ``get``
of a connection checks its configuration. Listings (``list``, claims) return rows as stored:
they decide nothing on their own, the credential read that follows refuses. A write never
builds on a pointer that does not verify. ``delete`` checks nothing, so an operator can always
remove a corrupt connection and add it again.

Not protected: availability (rows or the file can be deleted); the refresh state, schedule,
leases and fencing counters, and the events (plain columns: editing them can make the broker
refresh early, late or not at all, never send a credential elsewhere); and a *consistent*
rollback of every row of a connection, or of the whole file, to an earlier genuine copy --
nothing inside the file can tell an old genuine copy from the current one, so keep backups as
safe as the key. A listing can race with an edit: a record read by a claim, edited back before
the credential read, is not caught (the window is one tick's claim-to-read time).

Databases written before integrity (schema 1) are migrated on the first open with the key:
every row is authenticated as it is then (tampering done before the upgrade is adopted), and
the blobs are sealed again under the new binding, all in one transaction. A marker (sealed
with the key) records that the database is authenticated; a database whose rows are
authenticated but whose marker is missing refuses to open instead of migrating again. Stop
older brokers sharing the file before upgrading: what they write afterwards is refused.

SQLite errors
-------------
Every ``sqlite3.Error`` is translated where it leaves :class:`EmbeddedDatabase`. At open (the
CLI exits 2): ``ConfigError`` naming the path and what is wrong -- except a lock held
elsewhere, ``StoreUnavailable``. During operation, by primary result code
(https://www.sqlite.org/rescode.html):

==================================================  ==========================================
``BUSY``, ``LOCKED`` (a lock held past the bound)    ``StoreUnavailable``, retryable
``FULL`` (disk or size limit), ``IOERR``, ``NOMEM``  ``StoreUnavailable``, retryable: it may
``INTERRUPT``, ``PROTOCOL``, ``SCHEMA``              clear without anyone changing the store
``READONLY``, ``PERM``, ``AUTH``, ``CANTOPEN``       ``StoreFault``, not retryable: an operator
``CORRUPT``, ``NOTADB``, ``FORMAT``                  must act (permissions, a restore)
anything else (``CONSTRAINT``, ``MISUSE``, ...)      ``StoreFault``, not retryable
==================================================  ==========================================

Waiting is bounded: a write lock held by another process ends, after ``lock_timeout`` seconds
(SQLite's busy timeout), in ``StoreUnavailable``; the in-process lock that serialises this
database's threads is taken with the same bound, so queued threads never wait one timeout each.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import errno
import hashlib
import hmac
import json
import math
import os
import secrets as _random
import sqlite3
import stat
import threading
import time
from collections.abc import Hashable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tokenbroker.adapters import budget_log
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
    StoreFault,
    StoreUnavailable,
    TokenBrokerError,
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
    Shard,
    StoredCredential,
    slot_of,
)
from tokenbroker.kernel.secret import Secret
from tokenbroker.ports import (
    AuthorizationSession,
    BudgetDecision,
    ClaimBatch,
    CommitOutcome,
    Completion,
    Promotion,
    SecretWrite,
)

DB_NAME = "tokenbroker.db"
KEY_FILE_NAME = "encryption.key"
KEY_BYTES = 32  # AES-256-GCM
NONCE_BYTES = 12  # NIST SP 800-38D recommends 96-bit nonces
TAG_BYTES = 16  # AES-GCM's authentication tag
_KEY_CHECK_PLAINTEXT = b"tokenbroker key check v1"
#: Sealed into ``meta`` once every row is authenticated (see "Integrity" above).
_INTEGRITY_MARKER = b"tokenbroker integrity v1"
_INTEGRITY_KDF_INFO = b"tokenbroker:embedded:integrity:v1"
INCARNATION_BYTES = 16
#: A key file is 44 characters of base64; anything much larger is not one (and is not read).
MAX_KEY_FILE_BYTES = 1024
#: Seconds a write waits for a lock held elsewhere before it fails (retryably).
DEFAULT_LOCK_TIMEOUT = 30.0
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
-- Token-endpoint budgets (StateStore.take_budget): one row per key, its takes still in the
-- window as JSON [[at_us, cost], ...]; expires_at_us: when the last of them ages out.
CREATE TABLE IF NOT EXISTS budgets (
    key TEXT PRIMARY KEY,
    takes TEXT NOT NULL,
    expires_at_us INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS budgets_expiry ON budgets (expires_at_us);
-- Authorization requests in flight (AuthorizationSessions): key = SHA-256 of the state; the
-- PKCE verifier sealed with AES-GCM, bound to the key, connection and operator.
CREATE TABLE IF NOT EXISTS authorization_sessions (
    key TEXT PRIMARY KEY,
    connection_id TEXT NOT NULL,
    operator TEXT NOT NULL,
    body TEXT NOT NULL,
    sealed_verifier BLOB NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
"""


#: Columns added after the first release, (table, column, declaration), added to the tables
#: above with ALTER TABLE so an older database gains them in place: those that authenticate
#: rows (module docstring, "Integrity"), then the refresh protocol's.
_ADDED_COLUMNS = (
    ("connections", "incarnation", "TEXT"),
    ("connections", "config_mac", "BLOB"),
    ("secrets", "incarnation", "TEXT"),
    ("secrets", "owner", "TEXT"),
    ("secrets", "pointer_mac", "BLOB"),
    # The lease clock's epoch (HostLeaseClock: the boot id) of ``lease_expires_at``.
    ("connections", "lease_epoch", "TEXT"),
    # A refresh presenting a rotating refresh token whose outcome is not known yet (JSON).
    ("connections", "intent", "TEXT"),
    ("connections", "at_risk", "INTEGER NOT NULL DEFAULT 0"),
)

#: SQLite primary result code -> (what is wrong, retryable). The module docstring's table.
_RESULT_CODES: dict[int, tuple[str, bool]] = {
    sqlite3.SQLITE_BUSY: ("locked by another process", True),
    sqlite3.SQLITE_LOCKED: ("locked by another connection", True),
    sqlite3.SQLITE_FULL: ("the disk (or the database's size limit) is full", True),
    sqlite3.SQLITE_IOERR: ("an I/O error", True),
    sqlite3.SQLITE_NOMEM: ("out of memory", True),
    sqlite3.SQLITE_INTERRUPT: ("interrupted", True),
    sqlite3.SQLITE_PROTOCOL: ("a file-locking protocol error", True),
    sqlite3.SQLITE_SCHEMA: ("the schema changed under a statement", True),
    sqlite3.SQLITE_READONLY: ("the database file or its directory is read-only", False),
    sqlite3.SQLITE_PERM: ("permission denied", False),
    sqlite3.SQLITE_AUTH: ("access denied", False),
    sqlite3.SQLITE_CANTOPEN: ("the file cannot be opened", False),
    sqlite3.SQLITE_CORRUPT: ("the database file is corrupt", False),
    sqlite3.SQLITE_NOTADB: ("the file is not a database", False),
    sqlite3.SQLITE_FORMAT: ("the database format is not understood", False),
    sqlite3.SQLITE_CONSTRAINT: ("a constraint failed", False),
}
_DAMAGED = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_FORMAT})
_LOCKED = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


def _result_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


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


def new_incarnation() -> str:
    """A random id for one registration (or one secret): rows of an earlier one never match."""
    return _random.token_hex(INCARNATION_BYTES)


def _refuse_link(path: Path, what: str, hint: str) -> ConfigError:
    return ConfigError(
        f"{what} {path} is a symbolic link; refusing it (whoever can change the link decides"
        f" what is used): {hint}"
    )


_KEY_LINK_HINT = "point to the file itself, or set TOKENBROKER_ENCRYPTION_KEY"


def _read_key_file(path: Path) -> bytes:
    """The key in ``path``, which must be a regular file of this user's that nobody else can
    access. Opened without following links and without blocking (a FIFO), read bounded."""
    try:
        before = os.lstat(path)
        if stat.S_ISLNK(before.st_mode):
            raise _refuse_link(path, "key file", _KEY_LINK_HINT)
        if not stat.S_ISREG(before.st_mode):
            raise ConfigError(f"key file {path} is not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refuse_link(path, "key file", _KEY_LINK_HINT) from None
        raise ConfigError(f"key file {path}: cannot read it ({exc.strerror})") from None
    try:
        info = os.fstat(fd)  # the file opened, not whatever the path names by now
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"key file {path} is not a regular file")
        user = os.geteuid()
        if info.st_uid != user:
            raise ConfigError(
                f"key file {path} is owned by uid {info.st_uid}, not by the user running"
                f" tokenbroker (uid {user}); run: chown {user} {path}"
            )
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"key file {path} is readable by other users (mode "
                f"{stat.S_IMODE(info.st_mode):o}); run: chmod 600 {path}"
            )
        raw = os.read(fd, MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"key file {path}: cannot read it ({exc.strerror})") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_KEY_FILE_BYTES:
        raise ConfigError(f"key file {path} is too large to be a key ({info.st_size} bytes)")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(f"key file {path}: not valid base64") from None
    return decode_key(text, f"key file {path}")


def _create_key_file(path: Path) -> bytes:
    """A new key, written 0600 whatever the umask, never through a link (``O_EXCL`` with
    ``O_NOFOLLOW``: a link already there is an error, not a place to write)."""
    text = new_key_text()
    try:
        if not path.parent.exists():
            path.parent.mkdir(parents=True, mode=0o700)
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        with os.fdopen(fd, "w") as handle:
            os.fchmod(fd, 0o600)
            handle.write(text + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise ConfigError(f"key file {path}: cannot create it ({exc.strerror})") from None
    return decode_key(text, f"key file {path}")


def _no_state(state_dir: Path) -> ConfigError:
    return ConfigError(
        f"no tokenbroker state at {state_dir} (nothing was created): check the state directory"
        " (--state-dir / TOKENBROKER_STATE_DIR), or register a connection first"
    )


def _prepare_state_dir(state_dir: Path, *, create: bool) -> None:
    """The state directory exists, is a real directory (not a link), or is created 0700."""
    try:
        try:
            info = os.lstat(state_dir)
        except FileNotFoundError:
            if not create:
                raise _no_state(state_dir) from None
            with suppress(FileExistsError):  # another process made it meanwhile
                state_dir.mkdir(parents=True, mode=0o700)
                os.chmod(state_dir, 0o700)  # exactly, whatever the umask
            info = os.lstat(state_dir)
    except OSError as exc:
        raise ConfigError(f"state directory {state_dir}: cannot use it ({exc.strerror})") from None
    if stat.S_ISLNK(info.st_mode):
        raise _refuse_link(
            state_dir, "state directory", "point the state directory at the real one"
        )
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"state directory {state_dir} is not a directory")


_FILES_HINT = "the state directory must hold the files themselves"


def _existing_file(path: Path, what: str) -> bool:
    """Whether ``path`` exists; if it does, it must be a regular file and not a link."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ConfigError(f"cannot open the tokenbroker state at {path}: {exc.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        raise _refuse_link(path, what, _FILES_HINT)
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{what} {path} is not a regular file")
    return True


def _private_file(path: Path, *, create: bool, what: str) -> bool:
    """Make sure ``path`` is a regular file (never a link) readable by its owner only;
    create it 0600 when ``create``. False when it does not exist (and was not created)."""
    if not _existing_file(path, what) and not create:
        return False
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | (os.O_CREAT if create else 0), 0o600)
    except FileNotFoundError:
        return False  # removed meanwhile
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refuse_link(path, what, _FILES_HINT) from None
        raise ConfigError(
            f"cannot open the tokenbroker state at {path}: {exc.strerror} (the file or its"
            " directory is read-only, or not this user's)"
        ) from None
    try:
        info = os.fstat(fd)  # the file opened, not whatever the path names by now
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{what} {path} is not a regular file")
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            os.fchmod(fd, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot open the tokenbroker state at {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return True


class EmbeddedDatabase:
    """The shared SQLite connection, its lock, the cipher and the integrity key.

    ``create=False`` opens existing state only (for reads): no directory, database or key is
    ever created. ``lock_timeout`` bounds every wait for a lock, in this process or another.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        key: str | None = None,
        key_file: Path | None = None,
        create: bool = True,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        if not (math.isfinite(lock_timeout) and 0 < lock_timeout <= 3600):
            raise ConfigError(f"lock_timeout must be between 0 and 3600 s, got {lock_timeout}")
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / DB_NAME
        self.lock_timeout = lock_timeout
        self._lock = threading.RLock()
        self._commits = 0  # this handle's write transactions (the change marker)
        self._opening = True  # errors are ConfigError (the CLI's exit 2) until open
        # Key material that is there is checked before anything is created: a refused key
        # leaves no directory or database behind.
        if key is not None:
            decode_key(key, "TOKENBROKER_ENCRYPTION_KEY")
        elif os.path.lexists(given := key_file or self.state_dir / KEY_FILE_NAME):
            _read_key_file(given)
        _prepare_state_dir(self.state_dir, create=create)
        if not _private_file(self.path, create=create, what="database"):
            raise _no_state(self.state_dir)
        for suffix in ("-wal", "-shm"):  # left loose by an older release, or by hand
            _private_file(Path(f"{self.path}{suffix}"), create=False, what="database file")
        self._conn = self._connect()
        try:
            self._set_up(key, key_file, create=create)
        except BaseException:
            self._conn.close()
            raise
        self._opening = False

    def _connect(self) -> sqlite3.Connection:
        # mode=rw: SQLite never creates the file itself (it was created 0600 above; its -wal
        # and -shm take that mode from it).
        uri = f"{self.path.absolute().as_uri()}?mode=rw"
        try:
            conn = sqlite3.connect(
                uri,
                uri=True,
                timeout=self.lock_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise self._fault(exc) from None
        try:
            # A sharded claim filters on the slot, computed from the id (nothing stored).
            conn.create_function("tb_slot", 1, slot_of, deterministic=True)
            conn.execute(f"PRAGMA busy_timeout={int(self.lock_timeout * 1000)}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            conn.close()
            raise self._fault(exc) from None
        return conn

    # -- errors ----------------------------------------------------------------------------

    def _fault(self, exc: sqlite3.Error) -> TokenBrokerError:
        """The tokenbroker error for a SQLite one (the table in the module docstring)."""
        code = _result_code(exc)
        name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
        reason, retryable = (
            _RESULT_CODES.get(code, ("failed", False)) if code else ("failed", False)
        )
        if self._opening:
            if code in _LOCKED:
                return StoreUnavailable(
                    f"cannot open the tokenbroker state at {self.path}: {reason} for more than"
                    f" {self.lock_timeout:g} s ({name}); try again"
                )
            if code in _DAMAGED:
                return ConfigError(
                    f"{self.path} is not a tokenbroker database ({reason}, {name}): restore it"
                    " from a backup, or use another state directory (nothing was changed)"
                )
            return ConfigError(
                f"cannot open the tokenbroker state at {self.path}: {reason} ({name})"
            )
        message = f"embedded database {self.path}: {reason} ({name}: {exc})"
        return StoreUnavailable(message) if retryable else StoreFault(message)

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """This database's thread lock, waited for no longer than a SQLite lock would be."""
        if not self._lock.acquire(timeout=self.lock_timeout):
            raise StoreUnavailable(
                f"embedded database {self.path}: locked by another thread of this process for"
                f" more than {self.lock_timeout:g} s"
            )
        try:
            yield
        finally:
            self._lock.release()

    def _rollback(self) -> None:
        """Undo an open transaction, if SQLite has not already (it does after some errors).
        Never raises: the error that led here is the one to report."""
        with suppress(sqlite3.Error):
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")

    # -- key handling and integrity ----------------------------------------------------------

    def _set_up(self, key: str | None, key_file: Path | None, *, create: bool) -> None:
        """One transaction, so processes opening the same new state at once take turns: the
        integrity columns, the key (found or created), its check, and a schema-1 migration."""
        with self.transaction() as cur:
            for table, column, kind in _ADDED_COLUMNS:
                columns = {row[1] for row in cur.execute(f"PRAGMA table_info({table})")}
                if column not in columns:
                    cur.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            meta = dict(
                cur.execute("SELECT key, value FROM meta WHERE key IN ('key_check', 'integrity')")
            )
            holds_data = bool(
                cur.execute(
                    "SELECT EXISTS (SELECT 1 FROM connections) OR EXISTS (SELECT 1 FROM secrets)"
                    " OR EXISTS (SELECT 1 FROM secret_versions)"
                ).fetchone()[0]
            )
            raw_key, source = self._resolve_key(
                key, key_file, encrypted="key_check" in meta or holds_data, create=create
            )
            self._aead = AESGCM(raw_key)
            mac_key = HKDF(
                algorithm=SHA256(), length=32, salt=None, info=_INTEGRITY_KDF_INFO
            ).derive(raw_key)
            self._mac = hmac.new(mac_key, digestmod=hashlib.sha256)
            self._key, self.key_source = raw_key, source
            self._check_key_and_integrity(cur, meta, holds_data=holds_data)

    def _resolve_key(
        self, key: str | None, key_file: Path | None, *, encrypted: bool, create: bool
    ) -> tuple[bytes, str]:
        if key is not None:
            return decode_key(key, "TOKENBROKER_ENCRYPTION_KEY"), "TOKENBROKER_ENCRYPTION_KEY"
        path = key_file or self.state_dir / KEY_FILE_NAME
        if os.path.lexists(path):  # a dangling link too: refused, never written through
            return _read_key_file(path), f"key file {path}"
        if encrypted:
            raise ConfigError(
                f"the state in {self.state_dir} is encrypted, but key file {path} is missing and"
                " TOKENBROKER_ENCRYPTION_KEY is not set; restore the key (nothing was changed)"
            )
        if not create:
            raise ConfigError(
                f"no encryption key for the state in {self.state_dir}: key file {path} is missing"
                " and TOKENBROKER_ENCRYPTION_KEY is not set (nothing was created)"
            )
        return _create_key_file(path), f"key file {path} (created)"

    def _check_key_and_integrity(
        self, cur: sqlite3.Cursor, meta: dict[str, Any], *, holds_data: bool
    ) -> None:
        check = meta.get("key_check")
        if check is None:
            if holds_data:
                raise ConfigError(
                    f"the state in {self.state_dir} holds data but its key check is missing: the"
                    " database was tampered with or damaged; refusing to start (nothing was"
                    " changed)"
                )
            cur.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [
                    ("key_check", self.seal(_KEY_CHECK_PLAINTEXT, "key-check")),
                    ("integrity", self.seal(_INTEGRITY_MARKER, "integrity")),
                ],
            )
            return
        if not self._opens_to(check, "key-check", _KEY_CHECK_PLAINTEXT):
            raise ConfigError(
                f"the encryption key from {self.key_source} ({key_fingerprint(self._key)}) does "
                f"not decrypt the existing state in {self.state_dir}; refusing to start. Use the "
                "key this state was created with (nothing was changed)"
            )
        marker = meta.get("integrity")
        if marker is None:
            self._migrate_schema_1(cur)
            cur.execute(
                "INSERT INTO meta (key, value) VALUES ('integrity', ?)",
                (self.seal(_INTEGRITY_MARKER, "integrity"),),
            )
        elif not self._opens_to(marker, "integrity", _INTEGRITY_MARKER):
            raise ConfigError(
                f"the integrity marker in {self.path} does not verify: the database was tampered"
                " with; refusing to start (nothing was changed)"
            )

    def _opens_to(self, sealed: object, context: str, expected: bytes) -> bool:
        if not isinstance(sealed, bytes) or len(sealed) < NONCE_BYTES + TAG_BYTES:
            return False
        try:
            return self.open(sealed, context) == expected
        except InvalidTag:
            return False

    def _migrate_schema_1(self, cur: sqlite3.Cursor) -> None:
        """Authenticate a database written before integrity, in place (module docstring)."""
        (sealed_rows,) = cur.execute(
            "SELECT (SELECT count(*) FROM connections WHERE incarnation IS NOT NULL"
            " OR config_mac IS NOT NULL) + (SELECT count(*) FROM secrets WHERE incarnation IS"
            " NOT NULL OR owner IS NOT NULL OR pointer_mac IS NOT NULL)"
        ).fetchone()
        if sealed_rows:
            raise ConfigError(
                f"the integrity marker of {self.path} is missing, yet its rows are authenticated:"
                " the database was tampered with or partly restored; refusing to start (nothing"
                " was changed). Restore the whole file from one backup"
            )
        owners: dict[str, str] = {}
        for cid, body in cur.execute("SELECT id, body FROM connections").fetchall():
            owners[cid] = new_incarnation()
            cur.execute(
                "UPDATE connections SET incarnation = ?, config_mac = ? WHERE id = ?",
                (owners[cid], self.connection_tag(cid, owners[cid], body), cid),
            )
        pointers = cur.execute("SELECT connection_id, current_version FROM secrets").fetchall()
        for cid, current in pointers:
            incarnation, owner = new_incarnation(), owners.get(cid)
            versions = cur.execute(
                "SELECT version, sealed FROM secret_versions WHERE connection_id = ?", (cid,)
            ).fetchall()
            for version, sealed in versions:
                try:
                    plaintext = self.open(sealed, f"tokenbroker:credential:v1:{cid}:{version}")
                except (InvalidTag, ValueError, TypeError):
                    continue  # stays undecryptable: CorruptCredential when read, that one only
                cur.execute(
                    "UPDATE secret_versions SET sealed = ? WHERE connection_id = ? AND version = ?",
                    (
                        self.seal(plaintext, credential_context(cid, incarnation, version)),
                        cid,
                        version,
                    ),
                )
            cur.execute(
                "UPDATE secrets SET incarnation = ?, owner = ?, pointer_mac = ?"
                " WHERE connection_id = ?",
                (incarnation, owner, self.pointer_tag(cid, incarnation, owner, current), cid),
            )

    def seal(self, plaintext: bytes, context: str) -> bytes:
        nonce = _random.token_bytes(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, context.encode())

    def open(self, sealed: bytes, context: str) -> bytes:
        return self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], context.encode())

    def _tag(self, *fields: str | int | None) -> bytes:
        mac = self._mac.copy()  # keyed once at open; a copy per message
        mac.update(_encode_fields(fields))
        return mac.digest()

    def _verify(self, tag: object, *fields: object) -> bool:
        if not isinstance(tag, bytes) or not all(
            f is None or type(f) in (str, int) for f in fields
        ):
            return False  # a column edited to another type is an edit like any other
        return hmac.compare_digest(tag, self._tag(*fields))  # type: ignore[arg-type]

    def connection_tag(self, connection_id: str, incarnation: str, body: str) -> bytes:
        """Authenticates a connection's stored configuration for one registration."""
        return self._tag("connection", connection_id, incarnation, body)

    def pointer_tag(
        self, connection_id: str, incarnation: str, owner: str | None, version: int
    ) -> bytes:
        """Authenticates a secret's current-version pointer and which registration owns it."""
        return self._tag("secret-pointer", connection_id, incarnation, owner, version)

    def check_pointer(
        self,
        connection_id: str,
        *,
        version: object,
        incarnation: object,
        owner: object,
        tag: object,
        newest: object,
    ) -> int:
        """The pointer's version if the row verifies and nothing newer is stored; else
        CorruptCredential (a pointer moved back leaves the newer version behind)."""
        fields = ("secret-pointer", connection_id, incarnation, owner, version)
        if not (isinstance(version, int) and isinstance(incarnation, str)) or not self._verify(
            tag, *fields
        ):
            raise CorruptCredential(
                f"credential {connection_id!r}: its current-version pointer does not verify"
                " (edited, or rolled back); it is not used"
            )
        if newest is not None and (not isinstance(newest, int) or newest > version):
            raise CorruptCredential(
                f"credential {connection_id!r}: a version above the current one (v{version}) is"
                " stored: the pointer was rolled back; it is not used"
            )
        return version

    def check_connection(
        self, connection_id: str, incarnation: object, tag: object, body: object
    ) -> str:
        """The stored configuration text if it verifies for this id; else CorruptCredential."""
        if not (isinstance(incarnation, str) and isinstance(body, str)) or not self._verify(
            tag, "connection", connection_id, incarnation, body
        ):
            raise CorruptCredential(
                f"connection {connection_id!r}: its stored configuration does not verify"
                " (edited, swapped or replayed); it is not used. Remove the connection and add"
                " it again"
            )
        return body

    # -- transactions ----------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        """A write transaction (``BEGIN IMMEDIATE``): serialised across processes. A SQLite
        error inside it rolls it back and leaves translated (module docstring)."""
        with self._exclusive():
            try:
                cur = self._conn.cursor()
                cur.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                self._rollback()
                raise self._fault(exc) from None
            try:
                yield cur
                self._commits += 1  # before COMMIT: a marker taken after it differs
                cur.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise self._fault(exc) from None
            except BaseException:
                self._rollback()
                raise
            finally:
                with suppress(sqlite3.Error):
                    cur.close()

    def change_marker(self) -> Hashable:
        """``PRAGMA data_version`` -- "different if changes were committed to the database by
        any other connection in the interim" (https://sqlite.org/pragma.html#pragma_data_version)
        -- and this handle's own commits. Never waits: while another thread holds the
        database, a new value (the caller reads)."""
        if not self._lock.acquire(blocking=False):
            return object()
        try:
            version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        except sqlite3.Error:
            return object()
        finally:
            self._lock.release()
        return (version, self._commits)

    def read(self, sql: str, params: Sequence[Any] = ()) -> builtins.list[Any]:
        with self._exclusive():
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise self._fault(exc) from None

    def close(self) -> None:
        with self._lock:
            try:
                self._conn.close()
            except sqlite3.Error as exc:
                raise self._fault(exc) from None


def credential_context(connection_id: str, incarnation: str, version: int) -> str:
    """AES-GCM associated data of a credential blob: its connection, secret incarnation and
    version (a blob moved to another of any of the three does not decrypt)."""
    return _encode_fields(
        ("tokenbroker:credential:v2", connection_id, incarnation, version)
    ).decode()


def _encode_fields(fields: Sequence[str | int | None]) -> bytes:
    """An unambiguous encoding of a tuple of fields (each typed and length-prefixed), for what
    is authenticated: no two different tuples encode alike."""
    out = bytearray()
    for value in fields:
        if value is None:
            out += b"n;"
        elif isinstance(value, int):
            out += b"i%d;" % value
        else:
            raw = value.encode()
            out += b"s%d:%b;" % (len(raw), raw)
    return bytes(out)


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

    def change_marker(self) -> Hashable:
        return self._db.change_marker()

    def _lease_now(self) -> tuple[datetime, str]:
        return self._clock.now(), self._clock.epoch

    def create(self, connection: Connection, state: RefreshState) -> None:
        """A new registration: a new incarnation, and the stored configuration authenticated
        for it (module docstring, "Integrity")."""
        body = json.dumps(connection.to_json())
        incarnation = new_incarnation()
        tag = self._db.connection_tag(connection.id, incarnation, body)
        with self._db.transaction() as cur:
            try:
                cur.execute(
                    f"INSERT INTO connections (id, body, {_STATE_COLUMNS}, lease_token, "  # noqa: S608
                    "incarnation, config_mac) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, COALESCE((SELECT lease_token FROM "
                    "retired_fencing WHERE connection_id = ?), 0), ?, ?)",
                    (
                        connection.id,
                        body,
                        *_state_params(state),
                        connection.id,
                        incarnation,
                        tag,
                    ),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"connection {connection.id!r} already exists") from None

    def get(self, connection_id: str) -> ConnectionRecord:
        """The record, its configuration verified: CorruptCredential if it was edited."""
        rows = self._db.read(
            f"SELECT incarnation, config_mac, body, {_STATE_COLUMNS} FROM connections "  # noqa: S608
            "WHERE id = ?",
            (connection_id,),
        )
        if not rows:
            raise NotFound(f"connection {connection_id!r} not found")
        incarnation, tag, body = rows[0][:3]
        self._db.check_connection(connection_id, incarnation, tag, body)
        return _record(rows[0][2:])

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

    def claim_due(
        self,
        now: datetime,
        *,
        holder: str,
        ttl: timedelta,
        limit: int,
        shard: Shard | None = None,
    ) -> ClaimBatch:
        due = now.timestamp()
        # A shard's slots are a range, [first, last]: one BETWEEN on the id's slot.
        in_shard = "" if shard is None else " AND tb_slot(id) BETWEEN ? AND ?"
        slots: tuple[int, ...] = () if shard is None else (shard.slots[0], shard.slots[-1])
        with self._db.transaction() as cur:
            lease_now, epoch = self._lease_now()
            at = lease_now.timestamp()
            ids = [
                r[0]
                for r in cur.execute(
                    "SELECT id FROM connections WHERE status = 'active' AND next_refresh_at <= ?"  # noqa: S608 - constants
                    f" AND {_LEASE_FREE}{in_shard} ORDER BY next_refresh_at, id LIMIT ?",
                    (due, epoch, at, *slots, limit),
                )
            ]
            leased = cur.execute(
                "SELECT count(*) FROM connections WHERE status = 'active' AND "  # noqa: S608 - constants
                f"next_refresh_at <= ? AND {_LEASE_LIVE}{in_shard}",
                (due, at, epoch, *slots),
            ).fetchone()[0]
            return ClaimBatch(self._grant(cur, ids, holder, ttl), leased_elsewhere=leased)

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
            if done.pointer_from is not None:
                row = cur.execute(
                    "SELECT current_version FROM connections WHERE id = ?",
                    (done.lease.connection_id,),
                ).fetchone()
                if row is None or row[0] not in done.pointer_from:
                    results.append(False)
                    continue
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

    def take_budget(
        self, key: str, *, limit: int, window: timedelta, now: datetime, cost: int = 1
    ) -> BudgetDecision:
        """Read the key's takes, decide and write them back in one ``BEGIN IMMEDIATE``
        transaction: it holds the database's write lock from the read on, so racing takers in
        other processes on the same file are serialised and never both see the last slot.

        A grant also deletes the rows of budgets whose every take aged out more than
        ``budget_log.GC_GRACE`` ago (an index range scan), so keys of refresh tokens long
        rotated away do not accumulate.
        """
        budget_log.check_arguments(key, limit=limit, window=window, now=now, cost=cost)
        with self._db.transaction() as cur:
            row = cur.execute("SELECT takes FROM budgets WHERE key = ?", (key,)).fetchone()
            stored = budget_log.parse_takes_json(row[0], key) if row else []
            result = budget_log.take(stored, limit=limit, window=window, now=now, cost=cost)
            if result.must_write:
                cur.execute(
                    "INSERT INTO budgets (key, takes, expires_at_us) VALUES (?, ?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET takes = excluded.takes, "
                    "expires_at_us = excluded.expires_at_us",
                    (key, json.dumps(result.takes), result.expires_at),
                )
                cutoff = budget_log.micros(now) - budget_log.GC_GRACE_MICROS
                cur.execute("DELETE FROM budgets WHERE expires_at_us <= ?", (cutoff,))
            return result.decision


#: The current version of each secret, with everything needed to verify it: the pointer row,
#: the blob, the newest version stored, and the connection's record when it is registered here.
_CURRENT_SELECT = (
    "SELECT s.connection_id, s.current_version, s.incarnation, s.owner, s.pointer_mac,"
    " v.created_at, v.sealed,"
    " (SELECT max(m.version) FROM secret_versions m WHERE m.connection_id = s.connection_id),"
    " c.incarnation, c.config_mac, c.body"
    " FROM secrets s"
    " LEFT JOIN secret_versions v"
    " ON v.connection_id = s.connection_id AND v.version = s.current_version"
    " LEFT JOIN connections c ON c.id = s.connection_id"
)


class EmbeddedSecretStore(TransactionalSecretStore[sqlite3.Cursor]):
    """Versions sealed with AES-GCM; the associated data binds each blob to its connection,
    its secret's incarnation and its version, so a blob copied to another row, or kept from a
    deleted secret, does not decrypt. The pointer to the current version is authenticated, and
    bound to the registration that owns the secret (module docstring, "Integrity"). A
    ``BEGIN IMMEDIATE`` transaction is the compare-and-set's transaction, serialised across
    processes."""

    def __init__(
        self, db: EmbeddedDatabase, retained_versions: int = DEFAULT_RETAINED_VERSIONS
    ) -> None:
        super().__init__(retained_versions)
        self._db = db
        #: When each pending version being promoted in this transaction was staged.
        self._staged_at: dict[tuple[str, int], float] = {}

    @property
    def db(self) -> EmbeddedDatabase:
        return self._db

    def promote_in(self, cur: sqlite3.Cursor, promotion: Promotion) -> int:
        """A promotion inside the caller's transaction (the atomic refresh commit)."""
        return self._promote_in(cur, promotion)

    def _unseal(
        self, connection_id: str, incarnation: str, version: int, created: object, sealed: object
    ) -> StoredCredential:
        if sealed is None:
            raise CorruptCredential(
                f"credential {connection_id!r}: its current version v{version} is missing;"
                " it is not used"
            )
        context = credential_context(connection_id, incarnation, version)
        try:
            plaintext = self._db.open(sealed, context) if isinstance(sealed, bytes) else None
        except (InvalidTag, ValueError):  # ValueError: too short to hold a nonce
            plaintext = None
        if plaintext is None:
            raise CorruptCredential(
                f"credential {connection_id!r} v{version} does not decrypt with the configured"
                " key (tampered with, or moved from another connection, version or"
                " registration); it is not used"
            )
        created_at = from_epoch(created) if type(created) in (int, float) else None  # type: ignore[arg-type]
        return StoredCredential(
            connection_id, version, Credential.from_plaintext(plaintext), created_at
        )

    def _verified_current(self, row: Sequence[Any]) -> StoredCredential:
        """One row of :data:`_CURRENT_SELECT`, verified (module docstring, "Integrity")."""
        cid, version, incarnation, owner, tag, created, sealed, newest = row[:8]
        conn_incarnation, conn_tag, body = row[8:]
        version = self._db.check_pointer(
            cid, version=version, incarnation=incarnation, owner=owner, tag=tag, newest=newest
        )
        if body is not None or conn_incarnation is not None or conn_tag is not None:
            # Registered here: never hand the credential out beside an edited configuration,
            # nor one that a previous registration of the same id left (or had restored).
            self._db.check_connection(cid, conn_incarnation, conn_tag, body)
            if owner is not None and owner != conn_incarnation:
                raise CorruptCredential(
                    f"credential {cid!r} belongs to an earlier registration of the connection;"
                    " it is not used. Remove the connection and add it again"
                )
        return self._unseal(cid, incarnation, version, created, sealed)

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
                f"{_CURRENT_SELECT} WHERE s.connection_id IN ({marks})",
                tuple(chunk),
            )
            for row in rows:
                value = self._read_value(row[0], partial(self._verified_current, row))
                if value is not None:
                    found[row[0]] = value
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
        """The verified pointer: a write never builds on one that was edited or rolled back."""
        row = tx.execute(
            "SELECT current_version, incarnation, owner, pointer_mac, (SELECT max(version) FROM"
            " secret_versions WHERE connection_id = ?) FROM secrets WHERE connection_id = ?",
            (connection_id, connection_id),
        ).fetchone()
        if row is None:
            return None
        version, incarnation, owner, tag, newest = row
        return self._db.check_pointer(
            connection_id,
            version=version,
            incarnation=incarnation,
            owner=owner,
            tag=tag,
            newest=newest,
        )

    def _add_version(
        self, tx: sqlite3.Cursor, connection_id: str, version: int, credential: Credential
    ) -> None:
        row = tx.execute(
            "SELECT incarnation, owner FROM secrets WHERE connection_id = ?", (connection_id,)
        ).fetchone()
        if row is None:
            # A new secret: a new incarnation, owned by the registration it is written for.
            registered = tx.execute(
                "SELECT incarnation FROM connections WHERE id = ?", (connection_id,)
            ).fetchone()
            incarnation, owner = new_incarnation(), registered[0] if registered else None
        else:
            incarnation, owner = row  # verified by _current_version in this transaction
        context = credential_context(connection_id, incarnation, version)
        sealed = self._db.seal(credential.to_plaintext(), context)
        tx.execute(
            "INSERT INTO secret_versions (connection_id, version, created_at, sealed) "
            "VALUES (?, ?, ?, ?)",
            (
                connection_id,
                version,
                self._staged_at.pop((connection_id, version), time.time()),
                sealed,
            ),
        )
        tx.execute(
            "INSERT INTO secrets (connection_id, current_version, incarnation, owner, pointer_mac)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (connection_id) DO UPDATE SET"
            " current_version = excluded.current_version, pointer_mac = excluded.pointer_mac",
            (
                connection_id,
                version,
                incarnation,
                owner,
                self._db.pointer_tag(connection_id, incarnation, owner, version),
            ),
        )

    def _destroy_through(self, tx: sqlite3.Cursor, connection_id: str, floor: int) -> None:
        tx.execute(
            "DELETE FROM secret_versions WHERE connection_id = ? AND version <= ?",
            (connection_id, floor),
        )

    # -- pending versions: sealed bound to their parent, attempt and incarnation too ----------

    @staticmethod
    def _pending_context(
        tx: sqlite3.Cursor,
        connection_id: str,
        version: int,
        parent: int | None,
        attempt: str | None,
    ) -> str:
        """AES-GCM associated data of a pending blob: besides the connection, version, parent
        and attempt, the incarnation it was staged under -- the secret's (staged on a parent)
        or the registration's (a first version) -- so a staged row kept from before a delete
        and re-create, or copied from another row, does not decrypt."""
        if parent is not None:
            row = tx.execute(
                "SELECT incarnation FROM secrets WHERE connection_id = ?", (connection_id,)
            ).fetchone()
        else:
            row = tx.execute(
                "SELECT incarnation FROM connections WHERE id = ?", (connection_id,)
            ).fetchone()
        incarnation = row[0] if row else None
        fields = ("tokenbroker:pending:v2", connection_id, incarnation, version, parent, attempt)
        return _encode_fields(fields).decode()

    def _add_pending(
        self, tx: sqlite3.Cursor, write: SecretWrite, version: int, parent: int | None
    ) -> None:
        cid, attempt = write.connection_id, write.attempt
        context = self._pending_context(tx, cid, version, parent, attempt)
        sealed = self._db.seal(write.credential.to_plaintext(), context)
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
        parent, attempt, sealed, staged_at = tx.execute(
            "SELECT parent, attempt, sealed, created_at FROM pending_versions"
            " WHERE connection_id = ? AND version = ?",
            (connection_id, version),
        ).fetchone()
        context = self._pending_context(tx, connection_id, version, parent, attempt)
        try:
            credential = Credential.from_plaintext(self._db.open(sealed, context))
        except (InvalidTag, ValueError, TypeError):  # ValueError/TypeError: not a sealed blob
            raise CorruptCredential(
                f"staged credential {connection_id!r} v{version} does not decrypt"
            ) from None
        # Read only to promote it: the version keeps the time it was first durable (staged)
        # as its created_at (_add_version, in this same transaction).
        self._staged_at[(connection_id, version)] = staged_at
        return credential

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


def _session_context(key: str, connection_id: str, operator: str) -> str:
    """AES-GCM associated data of a session's verifier: a blob moved to another session's
    row (another state, connection or operator) does not decrypt."""
    return "authorization-session|" + _encode_fields((key, connection_id, operator)).hex()


class EmbeddedAuthorizationSessions:
    """Sessions in the ``authorization_sessions`` table of the embedded database, the
    verifier sealed like credentials are. ``take`` reads and deletes in one ``BEGIN
    IMMEDIATE`` transaction, so two processes presenting one state cannot both get it."""

    def __init__(self, db: EmbeddedDatabase) -> None:
        self._db = db

    def put(self, session: AuthorizationSession) -> None:
        c = session.connection
        body = json.dumps(
            {
                "connection": c.to_json(),
                "redirect_uri": session.redirect_uri,
                "new": session.new,
            }
        )
        sealed = self._db.seal(
            session.code_verifier.reveal().encode(),
            _session_context(session.key, c.id, session.operator),
        )
        with self._db.transaction() as cur:
            if cur.execute(
                "SELECT 1 FROM authorization_sessions WHERE key = ?", (session.key,)
            ).fetchone():
                raise AlreadyExists("authorization session already exists")
            cur.execute(
                "INSERT INTO authorization_sessions (key, connection_id, operator, body,"
                " sealed_verifier, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    session.key,
                    c.id,
                    session.operator,
                    body,
                    sealed,
                    to_epoch(session.created_at),
                    to_epoch(session.expires_at),
                ),
            )

    def take(self, key: str) -> AuthorizationSession:
        with self._db.transaction() as cur:
            row = cur.execute(
                "SELECT connection_id, operator, body, sealed_verifier, created_at, expires_at"
                " FROM authorization_sessions WHERE key = ?",
                (key,),
            ).fetchone()
            if row is None:
                raise NotFound("no such authorization session")
            cur.execute("DELETE FROM authorization_sessions WHERE key = ?", (key,))
        connection_id, operator, body, sealed, created_at, expires_at = row
        try:
            verifier = self._db.open(sealed, _session_context(key, connection_id, operator))
            data = json.loads(body)
            connection = Connection.from_json(data["connection"])
        except (InvalidTag, ValueError, KeyError, TypeError):
            raise CorruptCredential(
                "authorization session: its stored row does not verify; start again"
            ) from None
        if connection.id != connection_id:
            raise CorruptCredential("authorization session: its stored row does not verify")
        return AuthorizationSession(
            key=key,
            connection=connection,
            operator=operator,
            redirect_uri=str(data["redirect_uri"]),
            code_verifier=Secret(verifier.decode()),
            created_at=from_epoch(created_at) or datetime.fromtimestamp(0, UTC),
            expires_at=from_epoch(expires_at) or datetime.fromtimestamp(0, UTC),
            new=bool(data.get("new")),
        )

    def purge(self, now: datetime) -> int:
        with self._db.transaction() as cur:
            cur.execute("DELETE FROM authorization_sessions WHERE expires_at < ?", (to_epoch(now),))
            return int(cur.rowcount)
