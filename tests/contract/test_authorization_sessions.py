"""The AuthorizationSessions contract (tokenbroker.ports.AuthorizationSessions), per adapter.

The single-use rule lives here: ``take`` removes and returns in one step, across handles, so
of any number of racing callbacks with one state exactly one gets the session.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from tokenbroker.kernel.errors import AlreadyExists, NotFound
from tokenbroker.kernel.model import Connection, GrantType
from tokenbroker.kernel.secret import Secret
from tokenbroker.ports import AuthorizationSession, AuthorizationSessions

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def session(key: str = "k1", *, cid: str = "crm", minutes: int = 10) -> AuthorizationSession:
    return AuthorizationSession(
        key=key,
        connection=Connection(
            id=cid,
            profile="zoho",
            grant=GrantType.REFRESH_TOKEN,
            client_id="1000.ABC",
            scopes=("ZohoCRM.modules.ALL",),
            params={"data_centre": "eu"},
        ),
        operator="local:alice",
        redirect_uri="http://127.0.0.1:5555/callback",
        code_verifier=Secret("verifier-" + key + "-" + "x" * 40),
        created_at=NOW,
        expires_at=NOW + timedelta(minutes=minutes),
        new=True,
    )


def test_take_returns_what_was_put_and_only_once(sessions: AuthorizationSessions) -> None:
    stored = session()
    sessions.put(stored)
    taken = sessions.take("k1")
    assert taken == stored
    assert taken.code_verifier.reveal() == stored.code_verifier.reveal()
    with pytest.raises(NotFound):
        sessions.take("k1")


def test_unknown_key_is_not_found(sessions: AuthorizationSessions) -> None:
    with pytest.raises(NotFound):
        sessions.take("never-issued")


def test_a_key_is_stored_once(sessions: AuthorizationSessions) -> None:
    sessions.put(session())
    with pytest.raises(AlreadyExists):
        sessions.put(session())


def test_sessions_are_independent(sessions: AuthorizationSessions) -> None:
    sessions.put(session("a", cid="one"))
    sessions.put(session("b", cid="two"))
    assert sessions.take("b").connection.id == "two"
    assert sessions.take("a").connection.id == "one"


def test_another_handle_sees_the_session_and_its_take(
    open_sessions: Callable[[], AuthorizationSessions],
) -> None:
    first, second = open_sessions(), open_sessions()
    first.put(session())
    assert second.take("k1").connection.id == "crm"
    with pytest.raises(NotFound):
        first.take("k1")


def test_racing_takes_give_the_session_to_exactly_one(
    open_sessions: Callable[[], AuthorizationSessions],
) -> None:
    open_sessions().put(session())
    handles = [open_sessions() for _ in range(8)]
    won: list[AuthorizationSession] = []
    barrier = threading.Barrier(len(handles))

    def race(handle: AuthorizationSessions) -> None:
        barrier.wait()
        with contextlib.suppress(NotFound):
            won.append(handle.take("k1"))

    threads = [threading.Thread(target=race, args=(h,)) for h in handles]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1


def test_purge_forgets_only_expired_sessions(sessions: AuthorizationSessions) -> None:
    sessions.put(session("old", minutes=1))
    sessions.put(session("new", minutes=30))
    assert sessions.purge(NOW + timedelta(minutes=5)) == 1
    with pytest.raises(NotFound):
        sessions.take("old")
    assert sessions.take("new").key == "new"


def test_an_expired_session_is_still_taken_for_the_caller_to_refuse(
    sessions: AuthorizationSessions,
) -> None:
    """Expiry is the flow's check (with its clock): the store hands the session out, and
    the presentation consumes it."""
    sessions.put(session(minutes=1))
    assert sessions.take("k1").expires_at == NOW + timedelta(minutes=1)


def test_the_verifier_never_prints(sessions: AuthorizationSessions) -> None:
    stored = session()
    sessions.put(stored)
    taken = sessions.take("k1")
    assert stored.code_verifier.reveal() not in repr(taken)
    assert stored.code_verifier.reveal() not in str(taken)
