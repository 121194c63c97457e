"""The embedded store's encryption key: creation, checks, refusals, and what lands on disk."""

from __future__ import annotations

import base64
import os
import sqlite3
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tokenbroker.adapters.embedded import (
    DB_NAME,
    KEY_FILE_NAME,
    EmbeddedDatabase,
    EmbeddedSecretStore,
    EmbeddedStateStore,
)
from tokenbroker.kernel.errors import ConfigError, CorruptCredential
from tokenbroker.kernel.model import Connection, Credential, GrantType, RefreshState
from tokenbroker.kernel.secret import Secret

ENV_NAME = "TOKENBROKER_ENCRYPTION_KEY"
KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))

OpenDb = Callable[..., EmbeddedDatabase]


def _text(raw: bytes, *, urlsafe: bool = True) -> str:
    return (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(raw).decode()


def _key_material(raw: bytes) -> list[str]:
    """Every spelling of a key that must never appear in a message."""
    spellings = [_text(raw), _text(raw, urlsafe=False), raw.hex(), raw.hex().upper()]
    spellings += [s.rstrip("=") for s in spellings]
    # Long enough fragments that a partial leak is caught too.
    spellings += [s[i : i + 12] for s in spellings[:2] for i in range(0, len(s) - 12, 6)]
    return spellings


def _assert_no_key_material(message: str, *keys: bytes) -> None:
    for raw in keys:
        for spelling in _key_material(raw):
            assert spelling not in message, f"key material {spelling!r} in {message!r}"
    assert repr(KEY_A) not in message and repr(KEY_B) not in message


@pytest.fixture
def open_db() -> Iterator[OpenDb]:
    opened: list[EmbeddedDatabase] = []

    def open_(state_dir: Path, **kwargs: object) -> EmbeddedDatabase:
        db = EmbeddedDatabase(state_dir, **kwargs)  # type: ignore[arg-type]
        opened.append(db)
        return db

    yield open_
    for db in opened:
        db.close()


def _store_secret(db: EmbeddedDatabase, cid: str = "c1", refresh: str = "rt-value") -> Credential:
    cred = Credential(
        access_token=Secret(f"at-{cid}-{refresh}"),
        refresh_token=Secret(refresh),
        client_secret=Secret(f"cs-{cid}"),
    )
    store = EmbeddedSecretStore(db)
    expected = store.get(cid).version if store.versions(cid) else None
    store.put(cid, cred, expected_version=expected)
    return cred


def _has_data(state_dir: Path) -> int:
    with sqlite3.connect(state_dir / DB_NAME) as raw:
        return raw.execute("SELECT count(*) FROM secret_versions").fetchone()[0]  # type: ignore[no-any-return]


# --- the key file --------------------------------------------------------------------------


def test_first_run_creates_a_key_file_with_mode_0600(tmp_path: Path, open_db: OpenDb) -> None:
    db = open_db(tmp_path)
    key_file = tmp_path / KEY_FILE_NAME
    assert key_file.is_file()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(base64.urlsafe_b64decode(key_file.read_text().strip())) == 32
    assert "created" in db.key_source


def test_the_key_file_is_0600_whatever_the_umask(tmp_path: Path, open_db: OpenDb) -> None:
    old = os.umask(0)
    try:
        open_db(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / KEY_FILE_NAME).stat().st_mode) == 0o600


def test_reopening_uses_the_same_key_and_reads_the_data(tmp_path: Path, open_db: OpenDb) -> None:
    first = open_db(tmp_path)
    cred = _store_secret(first)
    key_text = (tmp_path / KEY_FILE_NAME).read_text()
    first.close()
    again = open_db(tmp_path)
    assert "created" not in again.key_source
    assert EmbeddedSecretStore(again).get("c1").credential == cred
    assert (tmp_path / KEY_FILE_NAME).read_text() == key_text


def test_an_explicit_key_file_path_is_used(tmp_path: Path, open_db: OpenDb) -> None:
    key_file = tmp_path / "keys" / "tb.key"
    db = open_db(tmp_path / "state", key_file=key_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert not (tmp_path / "state" / KEY_FILE_NAME).exists()
    cred = _store_secret(db)
    db.close()
    assert (
        EmbeddedSecretStore(open_db(tmp_path / "state", key_file=key_file)).get("c1").credential
        == cred
    )


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o620, 0o602, 0o610, 0o601])
def test_a_key_file_others_can_access_is_refused(
    tmp_path: Path, open_db: OpenDb, mode: int
) -> None:
    open_db(tmp_path).close()
    key_file = tmp_path / KEY_FILE_NAME
    key_raw = base64.urlsafe_b64decode(key_file.read_text().strip())
    key_file.chmod(mode)
    with pytest.raises(ConfigError) as caught:
        open_db(tmp_path)
    message = str(caught.value)
    assert str(key_file) in message
    assert "chmod 600" in message
    _assert_no_key_material(message, key_raw)
    assert stat.S_IMODE(key_file.stat().st_mode) == mode  # not "fixed" behind our back


def test_a_missing_key_file_with_existing_data_is_refused_and_not_recreated(
    tmp_path: Path, open_db: OpenDb
) -> None:
    db = open_db(tmp_path)
    cred = _store_secret(db)
    db.close()
    key_file = tmp_path / KEY_FILE_NAME
    saved = key_file.read_text()
    key_file.unlink()
    with pytest.raises(ConfigError) as caught:
        open_db(tmp_path)
    assert "missing" in str(caught.value)
    assert ENV_NAME in str(caught.value)
    assert not key_file.exists()
    # Nothing was changed: with the key restored, the data is there.
    key_file.write_text(saved)
    key_file.chmod(0o600)
    assert EmbeddedSecretStore(open_db(tmp_path)).get("c1").credential == cred


# --- a key from the environment ------------------------------------------------------------


def test_a_key_given_directly_never_writes_a_key_file(tmp_path: Path, open_db: OpenDb) -> None:
    db = open_db(tmp_path, key=_text(KEY_A))
    cred = _store_secret(db)
    db.close()
    assert not (tmp_path / KEY_FILE_NAME).exists()
    assert db.key_source == ENV_NAME
    again = open_db(tmp_path, key=_text(KEY_A, urlsafe=False))  # standard alphabet: same key
    assert EmbeddedSecretStore(again).get("c1").credential == cred


def test_a_wrong_key_is_refused_without_revealing_either_key(
    tmp_path: Path, open_db: OpenDb
) -> None:
    db = open_db(tmp_path, key=_text(KEY_A))
    cred = _store_secret(db)
    db.close()
    before = (tmp_path / DB_NAME).read_bytes()
    with pytest.raises(ConfigError) as caught:
        open_db(tmp_path, key=_text(KEY_B))
    message = str(caught.value)
    assert "does not decrypt" in message
    assert ENV_NAME in message
    _assert_no_key_material(message, KEY_A, KEY_B)
    assert "rt-value" not in message
    assert not (tmp_path / KEY_FILE_NAME).exists()
    assert (tmp_path / DB_NAME).read_bytes() == before
    assert EmbeddedSecretStore(open_db(tmp_path, key=_text(KEY_A))).get("c1").credential == cred


def test_a_key_file_that_does_not_match_the_state_is_refused(
    tmp_path: Path, open_db: OpenDb
) -> None:
    open_db(tmp_path).close()
    key_file = tmp_path / KEY_FILE_NAME
    old = base64.urlsafe_b64decode(key_file.read_text().strip())
    key_file.write_text(_text(KEY_B))
    with pytest.raises(ConfigError) as caught:
        open_db(tmp_path)
    message = str(caught.value)
    assert "does not decrypt" in message
    assert str(key_file) in message
    _assert_no_key_material(message, old, KEY_B)


def test_a_key_for_a_fresh_state_then_no_key_is_refused(tmp_path: Path, open_db: OpenDb) -> None:
    """State created with an environment key; started later without it: refuse, do not
    generate a key file that would then fail to decrypt (or worse, shadow) the data."""
    _store_secret(open_db(tmp_path, key=_text(KEY_A)))
    with pytest.raises(ConfigError):
        open_db(tmp_path)
    assert not (tmp_path / KEY_FILE_NAME).exists()


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("abc", "base64"),  # bad padding
        ("!!!!", ""),  # no base64 characters at all: decodes (leniently) to nothing
        (_text(bytes(16)), "32 bytes"),
        (_text(bytes(33)), "32 bytes"),
        (_text(bytes(31)), "32 bytes"),
        ("", "32 bytes"),
    ],
    ids=["padding", "not-base64", "16-bytes", "33-bytes", "31-bytes", "empty"],
)
def test_a_malformed_key_names_its_source(
    tmp_path: Path, open_db: OpenDb, value: str, says: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        open_db(tmp_path, key=value)
    message = str(caught.value)
    assert ENV_NAME in message
    assert says in message
    if len(value) > 4:
        assert value not in message and value.rstrip("=") not in message


@pytest.mark.parametrize("content", ["abc", _text(bytes(16)), "not a key at all\n"])
def test_a_malformed_key_file_names_the_file(tmp_path: Path, open_db: OpenDb, content: str) -> None:
    key_file = tmp_path / KEY_FILE_NAME
    key_file.write_text(content)
    key_file.chmod(0o600)
    with pytest.raises(ConfigError) as caught:
        open_db(tmp_path)
    assert str(key_file) in str(caught.value)
    assert content.strip() not in str(caught.value)


# --- what is on disk -----------------------------------------------------------------------


def _disk_bytes(state_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(state_dir.glob(f"{DB_NAME}*")))


def test_secrets_are_not_on_disk_in_the_clear(tmp_path: Path, open_db: OpenDb) -> None:
    db = open_db(tmp_path)
    refresh = "rt-PLAINTEXT-CANARY-8c1d2f6a9b"
    cred = _store_secret(db, refresh=refresh)
    EmbeddedStateStore(db).create(
        Connection(id="c1", profile="generic", grant=GrantType.REFRESH_TOKEN, client_id="cid"),
        RefreshState(),
    )
    for _ in range(4):  # several versions: old ones are deleted, not left readable
        cred = _store_secret(db, refresh=refresh)
    values = [v.encode() for v in cred.secret_values()]
    assert refresh.encode() in values
    assert _disk_bytes(tmp_path)  # the files (db, WAL) exist and are being searched
    for value in values:
        assert value not in _disk_bytes(tmp_path), "plaintext secret in the database or WAL"
    db.close()  # checkpoints the WAL into the main file
    for value in values:
        assert value not in _disk_bytes(tmp_path)
    assert b"cid" in (tmp_path / DB_NAME).read_bytes()  # the search does see plain data


def _copy_sealed(state_dir: Path, src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    """Paste ``src``'s sealed blob over ``dst``'s; returns the blob ``dst`` had."""
    with sqlite3.connect(state_dir / DB_NAME) as raw:
        query = "SELECT sealed FROM secret_versions WHERE connection_id=? AND version=?"
        (sealed,) = raw.execute(query, src).fetchone()
        (replaced,) = raw.execute(query, dst).fetchone()
        changed = raw.execute(
            "UPDATE secret_versions SET sealed=? WHERE connection_id=? AND version=?",
            (sealed, *dst),
        ).rowcount
        assert changed == 1
    return replaced  # type: ignore[no-any-return]


def test_a_blob_copied_to_another_connection_does_not_decrypt(
    tmp_path: Path, open_db: OpenDb
) -> None:
    db = open_db(tmp_path)
    store = EmbeddedSecretStore(db)
    a = _store_secret(db, "a", refresh="rt-of-a")
    _store_secret(db, "b", refresh="rt-of-b")
    _copy_sealed(tmp_path, ("a", 1), ("b", 1))
    with pytest.raises(CorruptCredential) as caught:
        store.get("b")
    assert "does not decrypt" in str(caught.value)
    assert "rt-of-a" not in str(caught.value)
    # One bad record is that connection's value, never the batch's failure.
    many = store.get_many(["b", "a"])
    assert isinstance(many["b"], CorruptCredential)
    assert many["a"] == store.get("a")
    assert store.get("a").credential == a  # the original is untouched


def test_a_blob_copied_to_another_version_does_not_decrypt(tmp_path: Path, open_db: OpenDb) -> None:
    """Rolling a connection back by pasting an old version's blob over the current one fails."""
    db = open_db(tmp_path)
    store = EmbeddedSecretStore(db)
    _store_secret(db, "a", refresh="rt-1")
    second = _store_secret(db, "a", refresh="rt-2")
    genuine = _copy_sealed(tmp_path, ("a", 1), ("a", 2))
    with pytest.raises(CorruptCredential):
        store.get("a")
    assert isinstance(store.get_many(["a"])["a"], CorruptCredential)
    # The pasted blob alone is refused: with the current version's own blob back, it reads.
    with sqlite3.connect(tmp_path / DB_NAME) as raw:
        raw.execute("UPDATE secret_versions SET sealed=? WHERE version=2", (genuine,))
    assert store.get("a").credential == second


def test_a_tampered_blob_does_not_decrypt(tmp_path: Path, open_db: OpenDb) -> None:
    db = open_db(tmp_path)
    _store_secret(db, "a")
    with sqlite3.connect(tmp_path / DB_NAME) as raw:
        (sealed,) = raw.execute("SELECT sealed FROM secret_versions").fetchone()
        flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
        raw.execute("UPDATE secret_versions SET sealed=?", (flipped,))
    with pytest.raises(CorruptCredential):
        EmbeddedSecretStore(db).get("a")
    assert _has_data(tmp_path) == 1
