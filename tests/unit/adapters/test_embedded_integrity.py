"""The embedded store authenticates what decides behaviour, not only the ciphertexts.

Each test edits the database file the way someone who can write it, but holds no key, would:
rolls the current-version pointer back, replays an old blob or a whole old secret after a
delete and re-create, edits ``token_url`` (and every other field of a connection's
configuration). Every edit must be detected as :class:`CorruptCredential` for that connection
alone -- never a silent use of the edited value, never a failure of the other connections.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tokenbroker.adapters.embedded import (
    DB_NAME,
    EmbeddedDatabase,
    EmbeddedSecretStore,
    EmbeddedStateStore,
)
from tokenbroker.kernel.errors import ConfigError, CorruptCredential, NotFound
from tokenbroker.kernel.model import (
    ClientAuthMethod,
    Connection,
    Credential,
    GrantType,
    RefreshState,
)
from tokenbroker.kernel.secret import Secret

KEY = bytes(range(32))
KEY_TEXT = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
OTHER_KEY_TEXT = "ZGlmZmVyZW50LWtleS1kaWZmZXJlbnQta2V5LWRpZmY="
TOKEN_URL = "https://idp.example/oauth/token"

OpenDb = Callable[[Path], EmbeddedDatabase]


@pytest.fixture
def open_db() -> Iterator[OpenDb]:
    opened: list[EmbeddedDatabase] = []

    def open_(state_dir: Path) -> EmbeddedDatabase:
        db = EmbeddedDatabase(state_dir, key=KEY_TEXT)
        opened.append(db)
        return db

    yield open_
    for db in opened:
        db.close()


def _connection(cid: str) -> Connection:
    return Connection(
        id=cid,
        profile="generic",
        grant=GrantType.REFRESH_TOKEN,
        client_id=f"client-{cid}",
        scopes=("read", "write"),
        token_url=TOKEN_URL,
        auth_method=ClientAuthMethod.BASIC,
        params={"audience": "api"},
    )


def _credential(refresh: str) -> Credential:
    return Credential(access_token=Secret(f"at-{refresh}"), refresh_token=Secret(refresh))


def _register(db: EmbeddedDatabase, cid: str, refresh: str) -> Credential:
    """As the registry does: the record first, then the first credential version."""
    EmbeddedStateStore(db).create(_connection(cid), RefreshState())
    cred = _credential(refresh)
    EmbeddedSecretStore(db).put(cid, cred, expected_version=None)
    return cred


def _rotate(db: EmbeddedDatabase, cid: str, refresh: str) -> Credential:
    store = EmbeddedSecretStore(db)
    cred = _credential(refresh)
    store.put(cid, cred, expected_version=store.get(cid).version)
    return cred


def _raw(state_dir: Path) -> closing[sqlite3.Connection]:
    return closing(sqlite3.connect(state_dir / DB_NAME, isolation_level=None))


def _row(state_dir: Path, table: str, where: str, *params: Any) -> dict[str, Any]:
    with _raw(state_dir) as raw:
        raw.row_factory = sqlite3.Row
        row = raw.execute(f"SELECT * FROM {table} WHERE {where}", params).fetchone()  # noqa: S608
    assert row is not None
    return dict(row)


def _rows(state_dir: Path, table: str, where: str, *params: Any) -> list[dict[str, Any]]:
    with _raw(state_dir) as raw:
        raw.row_factory = sqlite3.Row
        rows = raw.execute(f"SELECT * FROM {table} WHERE {where}", params).fetchall()  # noqa: S608
    return [dict(r) for r in rows]


def _put_rows(state_dir: Path, table: str, rows: list[dict[str, Any]]) -> None:
    """Write whole rows back exactly as they were captured (a replay)."""
    with _raw(state_dir) as raw:
        for row in rows:
            names = ", ".join(row)
            marks = ", ".join("?" * len(row))
            raw.execute(
                f"INSERT OR REPLACE INTO {table} ({names}) VALUES ({marks})",  # noqa: S608
                tuple(row.values()),
            )


def _sql(state_dir: Path, sql: str, *params: Any) -> int:
    with _raw(state_dir) as raw:
        return raw.execute(sql, params).rowcount


def _assert_corrupt_alone(
    db: EmbeddedDatabase, bad: str, good: str, good_cred: Credential, *secrets_: str
) -> str:
    """``bad`` is refused with CorruptCredential on every read that hands it out; ``good``
    reads as before. Returns the message, checked for secret material."""
    store = EmbeddedSecretStore(db)
    with pytest.raises(CorruptCredential) as caught:
        store.get(bad)
    message = str(caught.value)
    assert repr(bad) in message
    for value in secrets_:
        assert value not in message
    assert store.get(good).credential == good_cred
    assert store.get_many([good])[good].credential == good_cred
    return message


# --- the current-version pointer ------------------------------------------------------------


def test_rolling_the_pointer_back_is_detected(tmp_path: Path, open_db: OpenDb) -> None:
    """v2 is still retained and decrypts: only the pointer says which is current."""
    db = open_db(tmp_path)
    _register(db, "a", "rt-a1")
    _rotate(db, "a", "rt-a2")
    _rotate(db, "a", "rt-a3")
    b = _register(db, "b", "rt-b1")
    assert _sql(tmp_path, "UPDATE secrets SET current_version = 2 WHERE connection_id = 'a'") == 1
    _assert_corrupt_alone(db, "a", "b", b, "rt-a2", "rt-a3")


def test_replaying_an_old_pointer_row_is_detected(tmp_path: Path, open_db: OpenDb) -> None:
    """The whole pointer row as it was when v2 was current (with whatever authenticated it
    then), pasted back while v3 exists."""
    db = open_db(tmp_path)
    _register(db, "a", "rt-a1")
    _rotate(db, "a", "rt-a2")
    old_pointer = _row(tmp_path, "secrets", "connection_id = ?", "a")
    _rotate(db, "a", "rt-a3")
    b = _register(db, "b", "rt-b1")
    _put_rows(tmp_path, "secrets", [old_pointer])
    _assert_corrupt_alone(db, "a", "b", b, "rt-a2", "rt-a3")


def test_a_pointer_to_a_missing_version_is_corrupt_not_absent(
    tmp_path: Path, open_db: OpenDb
) -> None:
    """Deleting the current blob must not read as "no credential" (which invites a fresh
    registration over it), nor fall back to an older version."""
    db = open_db(tmp_path)
    _register(db, "a", "rt-a1")
    _rotate(db, "a", "rt-a2")
    b = _register(db, "b", "rt-b1")
    _sql(tmp_path, "DELETE FROM secret_versions WHERE connection_id = 'a' AND version = 2")
    _assert_corrupt_alone(db, "a", "b", b, "rt-a1")


def test_a_write_never_builds_on_a_rolled_back_pointer(tmp_path: Path, open_db: OpenDb) -> None:
    db = open_db(tmp_path)
    _register(db, "a", "rt-a1")
    _rotate(db, "a", "rt-a2")
    _rotate(db, "a", "rt-a3")
    _sql(tmp_path, "UPDATE secrets SET current_version = 2 WHERE connection_id = 'a'")
    before = _rows(tmp_path, "secret_versions", "connection_id = 'a'")
    with pytest.raises(CorruptCredential):
        EmbeddedSecretStore(db).put("a", _credential("rt-a4"), expected_version=2)
    assert _rows(tmp_path, "secret_versions", "connection_id = 'a'") == before


# --- replay after delete and re-create ------------------------------------------------------


def test_an_old_blob_replayed_after_delete_and_recreate_is_detected(
    tmp_path: Path, open_db: OpenDb
) -> None:
    """Same connection id, same version number: only the registration differs."""
    db = open_db(tmp_path)
    store = EmbeddedSecretStore(db)
    store.put("a", _credential("rt-old"), expected_version=None)
    old_blob = _row(tmp_path, "secret_versions", "connection_id = 'a' AND version = 1")
    store.delete("a")
    store.put("a", _credential("rt-new"), expected_version=None)
    b = _credential("rt-b1")
    store.put("b", b, expected_version=None)
    _put_rows(tmp_path, "secret_versions", [old_blob])
    _assert_corrupt_alone(db, "a", "b", b, "rt-old", "rt-new")


def test_a_whole_old_secret_replayed_after_re_registration_is_detected(
    tmp_path: Path, open_db: OpenDb
) -> None:
    """Pointer and versions of the previous registration of the same id, restored together
    after the connection was removed and added again."""
    db = open_db(tmp_path)
    _register(db, "a", "rt-old")
    old_pointer = _rows(tmp_path, "secrets", "connection_id = 'a'")
    old_versions = _rows(tmp_path, "secret_versions", "connection_id = 'a'")
    EmbeddedSecretStore(db).delete("a")
    EmbeddedStateStore(db).delete("a")
    _register(db, "a", "rt-new")
    b = _register(db, "b", "rt-b1")
    _sql(tmp_path, "DELETE FROM secret_versions WHERE connection_id = 'a'")
    _put_rows(tmp_path, "secrets", old_pointer)
    _put_rows(tmp_path, "secret_versions", old_versions)
    _assert_corrupt_alone(db, "a", "b", b, "rt-old", "rt-new")


# --- the connection's configuration ---------------------------------------------------------


def _edit_body(state_dir: Path, cid: str, **changes: Any) -> None:
    with _raw(state_dir) as raw:
        (body,) = raw.execute("SELECT body FROM connections WHERE id = ?", (cid,)).fetchone()
        data = json.loads(body)
        data.update(changes)
        raw.execute("UPDATE connections SET body = ? WHERE id = ?", (json.dumps(data), cid))


@pytest.mark.parametrize(
    "changes",
    [
        {"token_url": "https://attacker.example/collect"},
        {"token_url": None},  # would fall back to the profile's default URL
        {"client_id": "someone-else"},
        {"scopes": ["read", "write", "admin"]},
        {"auth_method": "client_secret_post"},
        {"params": {"audience": "other-api"}},
        {"profile": "zoho"},
        {"grant": "client_credentials"},
        {"id": "b"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_an_edited_connection_config_is_detected(
    tmp_path: Path, open_db: OpenDb, changes: dict[str, Any]
) -> None:
    db = open_db(tmp_path)
    _register(db, "a", "rt-a1")
    b = _register(db, "b", "rt-b1")
    _edit_body(tmp_path, "a", **changes)
    state = EmbeddedStateStore(db)
    with pytest.raises(CorruptCredential) as caught:
        state.get("a")
    assert "'a'" in str(caught.value)
    assert "attacker" not in str(caught.value)
    # A credential is never handed out for use with an edited configuration ...
    _assert_corrupt_alone(db, "a", "b", b, "rt-a1")
    # ... and the other connection's record is untouched.
    assert state.get("b").connection == _connection("b")


def test_connection_bodies_swapped_between_rows_are_detected(
    tmp_path: Path, open_db: OpenDb
) -> None:
    db = open_db(tmp_path)
    _register(db, "a", "rt-a1")
    _register(db, "b", "rt-b1")
    c = _register(db, "c", "rt-c1")
    a_row = _row(tmp_path, "connections", "id = 'a'")
    b_row = _row(tmp_path, "connections", "id = 'b'")
    # Every column but the id: the body and whatever authenticates it.
    swapped = {**b_row, "id": "a"}
    _put_rows(tmp_path, "connections", [swapped, {**a_row, "id": "b"}])
    for cid in ("a", "b"):
        with pytest.raises(CorruptCredential):
            EmbeddedStateStore(db).get(cid)
        _assert_corrupt_alone(db, cid, "c", c)


def test_an_old_connection_row_replayed_after_re_registration_is_detected(
    tmp_path: Path, open_db: OpenDb
) -> None:
    """The previous registration's row (another token URL, genuinely authenticated then)
    pasted over the new one: the current credential belongs to the new registration."""
    db = open_db(tmp_path)
    state = EmbeddedStateStore(db)
    state.create(_connection("a"), RefreshState())
    old_row = _row(tmp_path, "connections", "id = 'a'")
    state.delete("a")
    _register(db, "a", "rt-new")
    b = _register(db, "b", "rt-b1")
    _put_rows(tmp_path, "connections", [old_row])
    _assert_corrupt_alone(db, "a", "b", b, "rt-new")


def test_lists_and_status_changes_still_work_beside_a_corrupt_row(
    tmp_path: Path, open_db: OpenDb
) -> None:
    """One bad record must not fail the listing or the other connections' writes."""
    db = open_db(tmp_path)
    _register(db, "a", "rt-a1")
    _register(db, "b", "rt-b1")
    _edit_body(tmp_path, "a", token_url="https://attacker.example/collect")
    state = EmbeddedStateStore(db)
    assert [r.connection.id for r in state.list()] == ["a", "b"]
    state.put_state("b", RefreshState(consecutive_failures=1))
    assert state.get("b").state.consecutive_failures == 1


def test_a_corrupt_connection_can_be_removed_and_registered_afresh(
    tmp_path: Path, open_db: OpenDb
) -> None:
    """The operator's way out: remove (never verified, never blocked) and add again."""
    db = open_db(tmp_path)
    _register(db, "a", "rt-a1")
    _rotate(db, "a", "rt-a2")
    _edit_body(tmp_path, "a", token_url="https://attacker.example/collect")
    _sql(tmp_path, "UPDATE secrets SET current_version = 1 WHERE connection_id = 'a'")
    EmbeddedStateStore(db).delete("a")
    EmbeddedSecretStore(db).delete("a")
    fresh = _register(db, "a", "rt-fresh")
    assert EmbeddedSecretStore(db).get("a").credential == fresh
    assert EmbeddedStateStore(db).get("a").connection == _connection("a")


def test_a_secret_without_a_connection_still_works(tmp_path: Path, open_db: OpenDb) -> None:
    """The secret store stands alone (the contract suites use it so): no record, no binding."""
    db = open_db(tmp_path)
    store = EmbeddedSecretStore(db)
    cred = _credential("rt-1")
    store.put("solo", cred, expected_version=None)
    assert store.get("solo").credential == cred
    nxt = _credential("rt-2")
    store.put("solo", nxt, expected_version=1)
    assert store.get_many(["solo"])["solo"].credential == nxt


def test_a_missing_credential_is_still_not_found(tmp_path: Path, open_db: OpenDb) -> None:
    db = open_db(tmp_path)
    EmbeddedStateStore(db).create(_connection("a"), RefreshState())
    with pytest.raises(NotFound):
        EmbeddedSecretStore(db).get("a")
    assert EmbeddedSecretStore(db).get_many(["a"]) == {}


# --- databases written before integrity (schema 1) -------------------------------------------

_V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE connections (
    id TEXT PRIMARY KEY, body TEXT NOT NULL, status TEXT NOT NULL, expires_at REAL,
    next_refresh_at REAL, last_refresh_at REAL, last_attempt_at REAL,
    consecutive_failures INTEGER NOT NULL DEFAULT 0, current_version INTEGER, last_error TEXT,
    lease_holder TEXT, lease_token INTEGER NOT NULL DEFAULT 0, lease_expires_at REAL
);
CREATE TABLE secrets (connection_id TEXT PRIMARY KEY, current_version INTEGER NOT NULL);
CREATE TABLE secret_versions (
    connection_id TEXT NOT NULL, version INTEGER NOT NULL, created_at REAL NOT NULL,
    sealed BLOB NOT NULL, PRIMARY KEY (connection_id, version)
);
"""


def _v1_seal(plaintext: bytes, context: str) -> bytes:
    nonce = bytes(12)  # fixed: a test fixture, never reused with this key elsewhere
    return nonce + AESGCM(KEY).encrypt(nonce, plaintext, context.encode())


def _write_v1_database(state_dir: Path) -> dict[str, Credential]:
    """A database as the previous release wrote it: blobs bound to (connection, version)
    only, no incarnations, nothing authenticating the pointer or the configuration."""
    state_dir.mkdir(exist_ok=True)
    creds = {cid: _credential(f"rt-{cid}-2") for cid in ("a", "b")}
    with _raw(state_dir) as raw:
        raw.executescript(_V1_SCHEMA)
        raw.execute(
            "INSERT INTO meta VALUES ('key_check', ?)",
            (_v1_seal(b"tokenbroker key check v1", "key-check"),),
        )
        for cid, cred in creds.items():
            raw.execute(
                "INSERT INTO connections (id, body, status, current_version) "
                "VALUES (?, ?, 'active', 2)",
                (cid, json.dumps(_connection(cid).to_json())),
            )
            raw.execute("INSERT INTO secrets VALUES (?, 2)", (cid,))
            for version, value in ((1, _credential(f"rt-{cid}-1")), (2, cred)):
                context = f"tokenbroker:credential:v1:{cid}:{version}"
                sealed = _v1_seal(value.to_plaintext(), context)
                raw.execute(
                    "INSERT INTO secret_versions VALUES (?, ?, 0, ?)", (cid, version, sealed)
                )
    return creds


def test_a_schema_1_database_is_migrated_on_open_with_the_key(
    tmp_path: Path, open_db: OpenDb
) -> None:
    creds = _write_v1_database(tmp_path)
    db = open_db(tmp_path)
    store = EmbeddedSecretStore(db)
    for cid, cred in creds.items():
        assert store.get(cid).credential == cred
        assert store.get(cid).version == 2
        assert EmbeddedStateStore(db).get(cid).connection == _connection(cid)
    assert store.versions("a") == [1, 2]
    # From now on it is authenticated like a new database: edits are detected.
    _sql(tmp_path, "UPDATE secrets SET current_version = 1 WHERE connection_id = 'a'")
    _assert_corrupt_alone(db, "a", "b", creds["b"])
    _edit_body(tmp_path, "b", token_url="https://attacker.example/collect")
    with pytest.raises(CorruptCredential):
        store.get("b")
    # The old format is gone: no blob decrypts under the schema-1 binding any more.
    with _raw(tmp_path) as raw:
        blobs = raw.execute("SELECT connection_id, version, sealed FROM secret_versions")
        for cid, version, sealed in blobs:
            context = f"tokenbroker:credential:v1:{cid}:{version}".encode()
            with pytest.raises(InvalidTag):
                AESGCM(KEY).decrypt(sealed[:12], sealed[12:], context)


def test_migration_happens_once_and_cannot_be_requested_again(
    tmp_path: Path, open_db: OpenDb
) -> None:
    """Deleting the marker that says "authenticated" (to have edited rows adopted by a second
    migration) makes the database refuse to open instead."""
    _write_v1_database(tmp_path)
    open_db(tmp_path).close()
    rows = _rows(tmp_path, "meta", "key != 'key_check'")
    assert rows, "the migration leaves a marker beside the key check"
    _edit_body(tmp_path, "a", token_url="https://attacker.example/collect")
    _sql(tmp_path, "DELETE FROM meta WHERE key != 'key_check'")
    with pytest.raises(ConfigError) as caught:
        open_db(tmp_path)
    assert str(tmp_path) in str(caught.value)


def test_a_key_check_deleted_from_a_database_with_data_is_refused(
    tmp_path: Path, open_db: OpenDb
) -> None:
    """Without its key check a database would accept any key (and record it): refuse."""
    db = open_db(tmp_path)
    _register(db, "a", "rt-a1")
    db.close()
    _sql(tmp_path, "DELETE FROM meta")
    with pytest.raises(ConfigError) as caught:
        EmbeddedDatabase(tmp_path, key=OTHER_KEY_TEXT)
    assert str(tmp_path) in str(caught.value)
    assert _rows(tmp_path, "meta", "1") == []  # nothing recorded with the other key
