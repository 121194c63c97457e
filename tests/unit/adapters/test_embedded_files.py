"""What the embedded store accepts and creates on disk: the key file, the state directory and
the database files. Refusals are ``ConfigError`` naming the path; nothing is created, followed
or changed on the way to a refusal."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tokenbroker.adapters.embedded import (
    DB_NAME,
    KEY_FILE_NAME,
    EmbeddedDatabase,
    EmbeddedSecretStore,
)
from tokenbroker.kernel.errors import ConfigError
from tokenbroker.kernel.model import Credential
from tokenbroker.kernel.secret import Secret

OpenDb = Callable[..., EmbeddedDatabase]
NOBODY = 65534
IS_ROOT = os.geteuid() == 0


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


def _tree(root: Path) -> dict[str, tuple[int, bytes | str]]:
    """Everything under ``root`` (links not followed): mode and content, to compare."""
    found: dict[str, tuple[int, bytes | str]] = {}
    for path in [root, *sorted(root.rglob("*"))] if os.path.lexists(root) else []:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            content: bytes | str = os.readlink(path)
        elif stat.S_ISREG(info.st_mode):
            content = path.read_bytes()
        else:
            content = b""
        found[str(path.relative_to(root))] = (info.st_mode, content)
    return found


def _put(db: EmbeddedDatabase) -> Credential:
    cred = Credential(access_token=Secret("at-1"), refresh_token=Secret("rt-1"))
    EmbeddedSecretStore(db).put("c1", cred, expected_version=None)
    return cred


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# --- the key file --------------------------------------------------------------------------


def test_a_key_file_that_is_a_symlink_is_refused(tmp_path: Path, open_db: OpenDb) -> None:
    """Even to a good key: whoever can swap the link decides which key is used."""
    real = tmp_path / "real"
    open_db(real).close()
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / KEY_FILE_NAME).symlink_to(real / KEY_FILE_NAME)
    with pytest.raises(ConfigError) as caught:
        open_db(state)
    assert "symbolic link" in str(caught.value)
    assert str(state / KEY_FILE_NAME) in str(caught.value)
    assert sorted(p.name for p in state.iterdir()) == [KEY_FILE_NAME]


def test_a_dangling_key_symlink_is_refused_not_followed(tmp_path: Path, open_db: OpenDb) -> None:
    """A new key must never be written through a link to wherever it points."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    target = tmp_path / "elsewhere" / "stolen.key"
    target.parent.mkdir()
    (state / KEY_FILE_NAME).symlink_to(target)
    with pytest.raises(ConfigError) as caught:
        open_db(state)
    assert "symbolic link" in str(caught.value)
    assert not target.exists()


def test_an_explicit_key_file_that_is_a_symlink_is_refused(tmp_path: Path, open_db: OpenDb) -> None:
    open_db(tmp_path / "real").close()
    link = tmp_path / "tb.key"
    link.symlink_to(tmp_path / "real" / KEY_FILE_NAME)
    with pytest.raises(ConfigError) as caught:
        open_db(tmp_path / "state", key_file=link)
    assert "symbolic link" in str(caught.value)


@pytest.mark.skipif(not IS_ROOT, reason="giving a file to another user needs root")
def test_a_key_file_owned_by_another_user_is_refused(tmp_path: Path, open_db: OpenDb) -> None:
    open_db(tmp_path).close()
    key_file = tmp_path / KEY_FILE_NAME
    os.chown(key_file, NOBODY, NOBODY)
    with pytest.raises(ConfigError) as caught:
        open_db(tmp_path)
    message = str(caught.value)
    assert str(key_file) in message
    assert "owned by" in message
    assert key_file.stat().st_uid == NOBODY  # not "fixed" behind the operator's back


@pytest.mark.parametrize("kind", ["directory", "fifo", "socket"])
def test_a_key_file_that_is_not_a_regular_file_is_refused_without_hanging(
    tmp_path: Path, open_db: OpenDb, kind: str
) -> None:
    # Short path: a unix socket's path is limited to ~100 bytes.
    short = Path(tempfile.mkdtemp(prefix="tbk"))
    try:
        key_file = short / "k"
        if kind == "directory":
            key_file.mkdir(mode=0o700)
        elif kind == "fifo":
            os.mkfifo(key_file, 0o600)  # opening it for reading would block for ever
        else:
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(str(key_file))
            sock.close()
            key_file.chmod(0o600)
        with pytest.raises(ConfigError) as caught:
            open_db(tmp_path, key_file=key_file)
        assert "not a regular file" in str(caught.value)
    finally:
        shutil.rmtree(short)


def test_a_huge_key_file_is_refused_without_reading_it_all(tmp_path: Path, open_db: OpenDb) -> None:
    key_file = tmp_path / KEY_FILE_NAME
    with key_file.open("wb") as handle:
        handle.truncate(1 << 30)  # sparse: 1 GiB of zeros
    key_file.chmod(0o600)
    with pytest.raises(ConfigError) as caught:
        open_db(tmp_path)
    assert str(key_file) in str(caught.value)


# --- the state directory --------------------------------------------------------------------


def test_a_state_directory_that_is_a_symlink_is_refused(tmp_path: Path, open_db: OpenDb) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "state"
    link.symlink_to(real)
    with pytest.raises(ConfigError) as caught:
        open_db(link)
    assert "symbolic link" in str(caught.value)
    assert str(link) in str(caught.value)
    assert list(real.iterdir()) == []  # nothing created behind the link


def test_a_state_directory_that_is_a_file_is_refused(tmp_path: Path, open_db: OpenDb) -> None:
    state = tmp_path / "state"
    state.write_text("not a directory")
    with pytest.raises(ConfigError) as caught:
        open_db(state)
    assert str(state) in str(caught.value)
    assert "not a directory" in str(caught.value)
    assert state.read_text() == "not a directory"


def test_a_state_directory_below_a_file_is_refused(tmp_path: Path, open_db: OpenDb) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError) as caught:
        open_db(tmp_path / "file" / "state")
    assert str(tmp_path / "file" / "state") in str(caught.value)


def test_a_database_file_that_is_a_symlink_is_refused(tmp_path: Path, open_db: OpenDb) -> None:
    open_db(tmp_path / "real").close()
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / DB_NAME).symlink_to(tmp_path / "real" / DB_NAME)
    with pytest.raises(ConfigError) as caught:
        open_db(state)
    assert "symbolic link" in str(caught.value)


# --- what is created, and with which modes ----------------------------------------------------


def test_new_state_is_private_in_a_world_readable_parent(tmp_path: Path, open_db: OpenDb) -> None:
    """The parent exists with 0755 (as /var/lib does); the umask is the usual 022."""
    parent = tmp_path / "lib"
    parent.mkdir(mode=0o755)
    parent.chmod(0o755)
    old = os.umask(0o022)
    try:
        db = open_db(parent / "tokenbroker")
        _put(db)  # a write: the WAL and its index exist now
    finally:
        os.umask(old)
    state = parent / "tokenbroker"
    assert _mode(state) == 0o700
    names = {p.name for p in state.iterdir()}
    assert {DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", KEY_FILE_NAME} <= names
    for name in names:
        assert _mode(state / name) == 0o600, name
    assert _mode(parent) == 0o755  # the operator's directory is left as it was


def test_new_state_is_private_in_a_pre_existing_open_directory(
    tmp_path: Path, open_db: OpenDb
) -> None:
    """The state directory itself pre-exists with 0755: the files are still 0600, even with
    a umask of 0."""
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    old = os.umask(0)
    try:
        _put(open_db(state))
    finally:
        os.umask(old)
    for path in state.iterdir():
        assert _mode(path) == 0o600, path.name


def test_a_loose_existing_database_is_made_private(tmp_path: Path, open_db: OpenDb) -> None:
    """A database an older release left 0644 is tightened on the next open."""
    cred = _put(open_db(tmp_path))
    for path in tmp_path.glob(f"{DB_NAME}*"):
        path.chmod(0o644)
    db = open_db(tmp_path)
    assert EmbeddedSecretStore(db).get("c1").credential == cred
    for path in tmp_path.glob(f"{DB_NAME}*"):
        assert _mode(path) == 0o600, path.name


# --- opening for a read never creates anything -------------------------------------------------


def test_create_false_on_a_missing_directory_creates_nothing(
    tmp_path: Path, open_db: OpenDb
) -> None:
    state = tmp_path / "typo" / "state"
    with pytest.raises(ConfigError) as caught:
        open_db(state, create=False)
    assert str(caught.value).startswith(f"no tokenbroker state at {state}")
    assert not (tmp_path / "typo").exists()


def test_create_false_on_an_empty_directory_creates_nothing(
    tmp_path: Path, open_db: OpenDb
) -> None:
    with pytest.raises(ConfigError) as caught:
        open_db(tmp_path, create=False)
    assert str(caught.value).startswith(f"no tokenbroker state at {tmp_path}")
    assert list(tmp_path.iterdir()) == []


def test_create_false_never_creates_a_key(tmp_path: Path, open_db: OpenDb) -> None:
    """A database with no data yet and no key file: a read must not mint a key."""
    open_db(tmp_path, key="AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").close()
    before = _tree(tmp_path)
    with pytest.raises(ConfigError):
        open_db(tmp_path, create=False)
    assert not (tmp_path / KEY_FILE_NAME).exists()
    assert {k: v[0] for k, v in _tree(tmp_path).items()} == {k: v[0] for k, v in before.items()}


def test_create_false_opens_existing_state(tmp_path: Path, open_db: OpenDb) -> None:
    cred = _put(open_db(tmp_path))
    assert EmbeddedSecretStore(open_db(tmp_path, create=False)).get("c1").credential == cred


# --- as a user the files do not stop (root ignores file modes) -----------------------------------

_AS_NOBODY = """
import os, sys
from tokenbroker.adapters.embedded import EmbeddedDatabase
from tokenbroker.kernel.errors import ConfigError, TokenBrokerError
os.setgroups([]); os.setgid({uid}); os.setuid({uid})
try:
    EmbeddedDatabase(sys.argv[1], key=sys.argv[2]).close()
except ConfigError as exc:
    print("ConfigError:", exc); sys.exit(2)
except TokenBrokerError as exc:
    print(type(exc).__name__ + ":", exc); sys.exit(3)
print("opened")
"""


def _open_as_nobody(state: Path, key: str) -> subprocess.CompletedProcess[str]:
    """Open the state in a child process that drops root before it touches the files (the
    interpreter and the library are loaded as root: they live where nobody cannot read)."""
    return subprocess.run(
        [sys.executable, "-c", _AS_NOBODY.format(uid=NOBODY), str(state), key],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


KEY_TEXT = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory another user can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="tb-files-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run a child as another user")
@pytest.mark.parametrize(
    "setup",
    [
        "unreadable-directory",
        "read-only-directory",
        "read-only-database",
        "writable-database-in-a-read-only-directory",  # no room for its -wal and -shm
    ],
)
def test_state_this_user_cannot_use_is_a_clear_config_error(
    shared_tmp: Path, open_db: OpenDb, setup: str
) -> None:
    state = shared_tmp / "state"
    if setup == "read-only-directory":
        # No database yet, and the directory is not writable by this user: nothing can be
        # created in it.
        state.mkdir(mode=0o755)
        state.chmod(0o755)
    else:
        db = open_db(state, key=KEY_TEXT)
        _put(db)
        db.close()
        os.chown(state, NOBODY, NOBODY)
        for path in state.iterdir():
            os.chown(path, NOBODY, NOBODY)
        if setup == "unreadable-directory":
            state.chmod(0o000)
        elif setup == "read-only-database":
            for path in state.iterdir():
                path.chmod(0o400)
        else:
            os.chown(state, 0, 0)
            state.chmod(0o755)
    before = _tree(state)
    done = _open_as_nobody(state, KEY_TEXT)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.startswith("ConfigError: ")
    assert str(state) in done.stdout
    assert _tree(state) == before
