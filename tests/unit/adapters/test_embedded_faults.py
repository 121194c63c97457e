"""SQLite faults, made for real, come out of the embedded store translated.

Disk full is ``PRAGMA max_page_count`` at the current size; read-only is ``PRAGMA query_only``
(the tests run as root, whom file modes do not stop; ``test_embedded_files`` also opens as
another user); corruption is a garbled or truncated file; a held write lock is a second process
in ``BEGIN EXCLUSIVE``. At open every failure is a ``ConfigError`` naming the path (a lock held
elsewhere: ``StoreUnavailable``); during operation a retryable ``StoreUnavailable`` or a
non-retryable ``StoreFault`` -- never a raw ``sqlite3.Error``, never a hang.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tokenbroker.adapters.embedded import (
    DB_NAME,
    EmbeddedDatabase,
    EmbeddedOutbox,
    EmbeddedSecretStore,
    EmbeddedStateStore,
)
from tokenbroker.kernel.errors import (
    ConfigError,
    StoreFault,
    StoreUnavailable,
    TokenBrokerError,
)
from tokenbroker.kernel.model import (
    Connection,
    ConnectionEvent,
    Credential,
    EventType,
    GrantType,
    RefreshState,
)
from tokenbroker.kernel.secret import Secret

KEY_TEXT = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
LOCK_TIMEOUT = 0.5

OpenDb = Callable[..., EmbeddedDatabase]


@pytest.fixture
def open_db() -> Iterator[OpenDb]:
    opened: list[EmbeddedDatabase] = []

    def open_(state_dir: Path, **kwargs: object) -> EmbeddedDatabase:
        kwargs.setdefault("key", KEY_TEXT)
        db = EmbeddedDatabase(state_dir, **kwargs)  # type: ignore[arg-type]
        opened.append(db)
        return db

    yield open_
    for db in opened:
        db.close()


def _credential(refresh: str, size: int = 0) -> Credential:
    return Credential(access_token=Secret("a" * size or "at"), refresh_token=Secret(refresh))


def _connection(cid: str, padding: int = 0) -> Connection:
    return Connection(
        id=cid,
        profile="generic",
        grant=GrantType.REFRESH_TOKEN,
        client_id="cid",
        token_url="https://idp.example/token",
        params={"pad": "p" * padding} if padding else {},
    )


def _event(n: int) -> ConnectionEvent:
    return ConnectionEvent(
        type=EventType.ROTATED,
        connection_id="c1",
        occurred_at=datetime(2030, 1, 1, tzinfo=UTC),
        idempotency_key=f"k{n}" * 40,
    )


# --- disk full ----------------------------------------------------------------------------


def _fill_disk(db: EmbeddedDatabase) -> None:
    """No page beyond the ones the file has now (SQLite answers SQLITE_FULL)."""
    conn = db._conn  # the fault is made on the store's own connection
    (pages,) = conn.execute("PRAGMA page_count").fetchone()
    conn.execute(f"PRAGMA max_page_count = {pages}")


def _free_disk(db: EmbeddedDatabase) -> None:
    db._conn.execute("PRAGMA max_page_count = 1073741823")


WRITES: dict[str, Callable[[EmbeddedDatabase], object]] = {
    "secret put": lambda db: EmbeddedSecretStore(db).put(
        "c2", _credential("rt-2", size=200_000), expected_version=None
    ),
    "state create": lambda db: EmbeddedStateStore(db).create(
        _connection("c2", padding=200_000), RefreshState()
    ),
    "outbox publish": lambda db: EmbeddedOutbox(db).publish([_event(n) for n in range(500)]),
    "park events": lambda db: EmbeddedStateStore(db).park_events([_event(n) for n in range(500)]),
}


@pytest.mark.parametrize("write", list(WRITES), ids=list(WRITES))
def test_disk_full_is_a_retryable_store_error_and_loses_nothing(
    tmp_path: Path, open_db: OpenDb, write: str
) -> None:
    db = open_db(tmp_path)
    secrets = EmbeddedSecretStore(db)
    kept = _credential("rt-1")
    secrets.put("c1", kept, expected_version=None)
    _fill_disk(db)
    with pytest.raises(StoreUnavailable) as caught:
        WRITES[write](db)
    assert caught.value.retryable
    assert str(tmp_path / DB_NAME) in str(caught.value)
    assert "full" in str(caught.value)
    assert not db._conn.in_transaction  # rolled back, not left open
    assert secrets.get("c1").credential == kept
    # Space comes back: the same write goes through (nothing half-written is in its way).
    _free_disk(db)
    WRITES[write](db)


def test_disk_full_at_commit_of_a_batch_keeps_every_earlier_version(
    tmp_path: Path, open_db: OpenDb
) -> None:
    from tokenbroker.ports import SecretWrite

    db = open_db(tmp_path)
    secrets = EmbeddedSecretStore(db)
    for n in range(5):
        secrets.put(f"c{n}", _credential(f"rt-{n}"), expected_version=None)
    _fill_disk(db)
    writes = [SecretWrite(f"c{n}", _credential(f"new-{n}", 50_000), 1) for n in range(5)]
    with pytest.raises(StoreUnavailable):
        secrets.put_many(writes)
    assert {secrets.get(f"c{n}").version for n in range(5)} == {1}


# --- read-only ------------------------------------------------------------------------------


def test_a_read_only_database_is_a_non_retryable_store_fault(
    tmp_path: Path, open_db: OpenDb
) -> None:
    db = open_db(tmp_path)
    secrets = EmbeddedSecretStore(db)
    kept = _credential("rt-1")
    secrets.put("c1", kept, expected_version=None)
    db._conn.execute("PRAGMA query_only = ON")  # writes now fail SQLITE_READONLY
    with pytest.raises(StoreFault) as caught:
        secrets.put("c1", _credential("rt-2"), expected_version=1)
    assert not caught.value.retryable
    assert "read-only" in str(caught.value)
    assert str(tmp_path / DB_NAME) in str(caught.value)
    with pytest.raises(StoreFault):
        EmbeddedStateStore(db).create(_connection("c1"), RefreshState())
    assert secrets.get("c1").credential == kept  # reads still work


# --- corruption -----------------------------------------------------------------------------


def _populated(state_dir: Path) -> None:
    db = EmbeddedDatabase(state_dir, key=KEY_TEXT)
    secrets, state = EmbeddedSecretStore(db), EmbeddedStateStore(db)
    for n in range(40):
        state.create(_connection(f"c{n}", padding=2000), RefreshState())
        secrets.put(f"c{n}", _credential(f"rt-{n}", size=3000), expected_version=None)
    db.close()


@pytest.mark.parametrize(
    "garble",
    ["header", "whole-file", "text-file"],
)
def test_a_database_that_is_not_one_is_refused_at_open(
    tmp_path: Path, open_db: OpenDb, garble: str
) -> None:
    path = tmp_path / DB_NAME
    if garble == "text-file":
        path.write_text("these are my notes, not a database\n" * 100)
        path.chmod(0o600)
    else:
        _populated(tmp_path)
        data = bytearray(path.read_bytes())
        end = 100 if garble == "header" else len(data)
        data[:end] = bytes((i * 7 + 13) % 256 for i in range(end))
        path.write_bytes(bytes(data))
    before = path.read_bytes()
    with pytest.raises(ConfigError) as caught:
        open_db(tmp_path)
    assert str(path) in str(caught.value)
    assert "not a tokenbroker database" in str(caught.value)
    assert path.read_bytes() == before  # never "repaired" or overwritten


def _overwrite_page(path: Path, table: str) -> None:
    with closing(sqlite3.connect(path)) as raw:
        (page_size,) = raw.execute("PRAGMA page_size").fetchone()
        (root,) = raw.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)
        ).fetchone()
    with path.open("r+b") as handle:
        handle.seek((root - 1) * page_size)
        handle.write(b"\xa5" * page_size)


def test_a_garbled_table_is_a_non_retryable_store_fault(tmp_path: Path, open_db: OpenDb) -> None:
    _populated(tmp_path)
    _overwrite_page(tmp_path / DB_NAME, "secret_versions")
    db = open_db(tmp_path)
    with pytest.raises(StoreFault) as caught:
        EmbeddedSecretStore(db).get("c1")
    assert not caught.value.retryable
    assert "corrupt" in str(caught.value)
    with pytest.raises(StoreFault):
        EmbeddedSecretStore(db).put("c1", _credential("rt-x"), expected_version=1)


def test_a_truncated_database_never_escapes_raw(tmp_path: Path, open_db: OpenDb) -> None:
    """Cut at several points: each open or use fails with one of our errors, or works."""
    _populated(tmp_path)
    whole = (tmp_path / DB_NAME).read_bytes()
    outcomes: set[str] = set()
    for fraction in (0.9, 0.6, 0.3, 0.05):
        state_dir = tmp_path / f"cut-{fraction}"
        state_dir.mkdir()
        cut = state_dir / DB_NAME
        cut.write_bytes(whole[: int(len(whole) * fraction)])
        cut.chmod(0o600)
        outcomes.add(_use(open_db, state_dir))
    assert outcomes - {"worked"}, "truncation was never noticed"
    assert not {o for o in outcomes if o.endswith("retryable")}, outcomes


def _use(open_db: OpenDb, state_dir: Path) -> str:
    """Open and use a database; what happened, as a word (raw SQLite errors propagate)."""
    try:
        db = open_db(state_dir)
        EmbeddedStateStore(db).list()
        EmbeddedSecretStore(db).get_many([f"c{n}" for n in range(40)])
        EmbeddedSecretStore(db).put("new", _credential("rt"), expected_version=None)
    except (ConfigError, StoreFault) as exc:
        return type(exc).__name__ + (" retryable" if exc.retryable else "")
    return "worked"


# --- a write lock held elsewhere ------------------------------------------------------------

_HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""


@contextmanager
def _write_lock_held(path: Path) -> Iterator[None]:
    """Another process holds ``BEGIN EXCLUSIVE`` on the database until the block ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        holder.wait(timeout=30)


def test_a_held_write_lock_ends_in_a_bounded_retryable_error(
    tmp_path: Path, open_db: OpenDb
) -> None:
    db = open_db(tmp_path, lock_timeout=LOCK_TIMEOUT)
    secrets = EmbeddedSecretStore(db)
    kept = _credential("rt-1")
    secrets.put("c1", kept, expected_version=None)
    with _write_lock_held(tmp_path / DB_NAME):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            secrets.put("c1", _credential("rt-2"), expected_version=1)
        assert time.monotonic() - started < LOCK_TIMEOUT * 2 + 2
        assert caught.value.retryable
        assert "locked" in str(caught.value)
        assert secrets.get("c1").credential == kept  # WAL: readers are not blocked
    secrets.put("c1", _credential("rt-2"), expected_version=1)  # and afterwards it works


def test_opening_while_a_write_lock_is_held_is_bounded_and_retryable(
    tmp_path: Path, open_db: OpenDb
) -> None:
    open_db(tmp_path).close()
    with _write_lock_held(tmp_path / DB_NAME):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            open_db(tmp_path, lock_timeout=LOCK_TIMEOUT)
        assert time.monotonic() - started < LOCK_TIMEOUT * 2 + 2


def test_threads_queued_behind_a_held_lock_each_wait_a_bounded_time(
    tmp_path: Path, open_db: OpenDb
) -> None:
    """The in-process lock is bounded too: eight writers do not wait eight timeouts."""
    timeout = 1.0
    db = open_db(tmp_path, lock_timeout=timeout)
    secrets = EmbeddedSecretStore(db)
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            secrets.put(f"c{n}", _credential("rt"), expected_version=None)
        except BaseException as exc:  # noqa: BLE001 - collected and checked below
            errors.append(exc)

    with _write_lock_held(tmp_path / DB_NAME):
        started = time.monotonic()
        threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        elapsed = time.monotonic() - started
    assert len(errors) == 8
    assert all(isinstance(e, StoreUnavailable) for e in errors), errors
    assert elapsed < timeout * 2 + 2.5, elapsed


# --- nothing raw, anywhere ------------------------------------------------------------------


def test_a_closed_database_is_a_store_fault_not_a_raw_error(
    tmp_path: Path, open_db: OpenDb
) -> None:
    db = open_db(tmp_path)
    db.close()
    for call in (
        lambda: EmbeddedSecretStore(db).get("c1"),
        lambda: EmbeddedStateStore(db).list(),
        lambda: EmbeddedOutbox(db).publish([_event(1)]),
    ):
        with pytest.raises(TokenBrokerError) as caught:
            call()
        assert isinstance(caught.value, StoreFault)
        assert not isinstance(caught.value, sqlite3.Error)
