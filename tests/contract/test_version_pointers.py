"""The VersionPointers contract (tokenbroker.ports.VersionPointers): the current-version pointer
Secret Manager's pointer protocol keeps in the state record (docs/gcp.md), for every state
store that holds one, and for the standalone book the secret-store suite uses.

What the protocol leans on: a compare-and-set that lets exactly one of many racing writers
through, that never moves a pointer it did not accept, and that leaves the rest of the record
-- the lease above all -- as it was."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta

import pytest

from tokenbroker.adapters.memory import MemoryVersionPointers
from tokenbroker.kernel.model import ConnectionStatus, RefreshState
from tokenbroker.ports import Completion, StateStore, VersionPointers

from .builders import T0, connection, due_state
from .racing import race
from .registry import STATE_STORES, Workspace

TTL = timedelta(seconds=60)


@dataclass
class Book:
    """A VersionPointers under test, and how to give a connection a record (``None``: the
    book needs none -- every id has a pointer, ``None`` until its first move)."""

    pointers: VersionPointers
    add: Callable[[str, int | None], None] | None
    state: StateStore | None = None

    def record(self, cid: str, version: int | None) -> None:
        if self.add is not None:
            self.add(cid, version)
        elif version is not None:
            assert self.pointers.move_pointer(cid, accepted=None, version=version)


def _state_book(name: str) -> Callable[[Workspace], Book]:
    def open_(ws: Workspace) -> Book:
        state = STATE_STORES[name].open(ws)
        assert isinstance(state, VersionPointers), name

        def add(cid: str, version: int | None) -> None:
            fresh = RefreshState(status=ConnectionStatus.ACTIVE, current_version=version)
            state.create(connection(cid), fresh)

        return Book(state, add, state)

    return open_


BOOKS: dict[str, Callable[[Workspace], Book]] = {
    "memory-state": _state_book("memory"),
    "firestore-state": _state_book("firestore"),
    "standalone": lambda ws: Book(ws.once("pointers", MemoryVersionPointers), None),
}


@pytest.fixture(params=list(BOOKS))
def book(request: pytest.FixtureRequest, workspace: Workspace) -> Book:
    return BOOKS[request.param](workspace)


def test_the_pointer_is_read_for_every_connection_with_a_record(book: Book) -> None:
    book.record("a", 3)
    book.record("b", None)
    seen = book.pointers.current_versions(["a", "b", "a"])
    assert seen == {"a": 3, "b": None}
    assert book.pointers.current_versions([]) == {}


def test_connections_without_a_record_are_left_out_and_cannot_be_pointed(book: Book) -> None:
    if book.add is None:
        pytest.skip("the standalone book has a pointer for every id (None until moved)")
    assert book.pointers.current_versions(["ghost"]) == {}
    assert book.pointers.move_pointer("ghost", accepted=None, version=1) is False
    assert book.pointers.move_pointer("ghost", accepted=frozenset({None}), version=1) is False
    assert book.pointers.current_versions(["ghost"]) == {}


def test_a_move_from_an_accepted_pointer_lands(book: Book) -> None:
    book.record("c1", 2)
    assert book.pointers.move_pointer("c1", accepted=frozenset({2, 3}), version=4) is True
    assert book.pointers.current_versions(["c1"]) == {"c1": 4}
    book.record("c2", None)
    assert book.pointers.move_pointer("c2", accepted=frozenset({None}), version=1) is True
    assert book.pointers.current_versions(["c2"]) == {"c2": 1}


def test_a_move_from_a_pointer_not_accepted_changes_nothing(book: Book) -> None:
    book.record("c1", 5)
    assert book.pointers.move_pointer("c1", accepted=frozenset({4}), version=6) is False
    assert book.pointers.move_pointer("c1", accepted=frozenset({None}), version=6) is False
    assert book.pointers.current_versions(["c1"]) == {"c1": 5}


def test_an_unconditional_move_lands_whatever_the_pointer_and_may_clear_it(book: Book) -> None:
    book.record("c1", 5)
    assert book.pointers.move_pointer("c1", accepted=None, version=9) is True
    assert book.pointers.current_versions(["c1"]) == {"c1": 9}
    assert book.pointers.move_pointer("c1", accepted=None, version=None) is True
    assert book.pointers.current_versions(["c1"]) == {"c1": None}


def test_of_racing_writers_from_one_pointer_exactly_one_lands(book: Book) -> None:
    """Eight writers each staged on version 1 and move the pointer to their own version:
    one wins, the others are refused, and the pointer is the winner's."""
    book.record("c1", 1)
    results = race(
        [
            lambda n=n: book.pointers.move_pointer("c1", accepted=frozenset({1}), version=n)
            for n in range(2, 10)
        ]
    )
    assert all(isinstance(r, bool) for r in results), results
    winners = [n for n, won in zip(range(2, 10), results, strict=True) if won is True]
    assert len(winners) == 1, results
    assert book.pointers.current_versions(["c1"]) == {"c1": winners[0]}


def test_a_move_leaves_the_rest_of_the_record_and_its_lease_alone(book: Book) -> None:
    """An operator's write moves the pointer while a refresher holds the lease: the record is
    otherwise unchanged, the lease still holds, and the holder's commit is refused only if it
    requires the pointer it started from."""
    if book.state is None:
        pytest.skip("the standalone book holds nothing but pointers")
    state = book.state
    state.create(connection("c1"), due_state(T0 - timedelta(seconds=10), current_version=1))
    (claim,) = state.claim_due(T0, holder="h", ttl=TTL, limit=10).claims
    before = state.get("c1")
    assert book.pointers.move_pointer("c1", accepted=frozenset({1}), version=2) is True
    after = state.get("c1")
    assert after.connection == before.connection
    assert after.state == replace(before.state, current_version=2)
    # Still leased: nobody else can take it.
    assert state.claim(["c1"], T0, holder="other", ttl=TTL).leased_elsewhere == 1
    refreshed = replace(before.state, current_version=3, next_refresh_at=T0 + timedelta(hours=1))
    fenced = Completion(claim.lease, refreshed, pointer_from=frozenset({1}))
    assert state.complete([fenced]) == [False]
    assert state.get("c1").state.current_version == 2
    accepted = Completion(claim.lease, refreshed, pointer_from=frozenset({1, 2}))
    assert state.complete([accepted]) == [True]
    assert state.get("c1").state == refreshed
