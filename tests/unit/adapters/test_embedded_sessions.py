"""The embedded authorization sessions keep the PKCE verifier sealed, bound to its row."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.contract.test_authorization_sessions import session
from tokenbroker.adapters.embedded import EmbeddedAuthorizationSessions, EmbeddedDatabase
from tokenbroker.kernel.errors import CorruptCredential, NotFound


def test_the_verifier_is_not_stored_in_the_clear(tmp_path: Path) -> None:
    db = EmbeddedDatabase(tmp_path / "state")
    try:
        stored = session()
        EmbeddedAuthorizationSessions(db).put(stored)
        raw = b"".join(p.read_bytes() for p in (tmp_path / "state").iterdir() if p.is_file())
        assert stored.code_verifier.reveal().encode() not in raw
        assert b"k1" in raw  # the row is there (keyed by the state's hash, not the state)
    finally:
        db.close()


def test_a_verifier_moved_to_another_session_does_not_open(tmp_path: Path) -> None:
    db = EmbeddedDatabase(tmp_path / "state")
    try:
        sessions = EmbeddedAuthorizationSessions(db)
        sessions.put(session("a", cid="one"))
        sessions.put(session("b", cid="two"))
        with db.transaction() as cur:
            cur.execute(
                "UPDATE authorization_sessions SET sealed_verifier ="
                " (SELECT sealed_verifier FROM authorization_sessions WHERE key = 'a')"
                " WHERE key = 'b'"
            )
        with pytest.raises(CorruptCredential):
            sessions.take("b")
        with pytest.raises(NotFound):  # consumed all the same: single use
            sessions.take("b")
        assert sessions.take("a").connection.id == "one"
    finally:
        db.close()
