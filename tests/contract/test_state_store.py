"""The StateStore contract (tokenbroker.ports.StateStore), for every adapter in the registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from functools import partial

import pytest

from tokenbroker.kernel.errors import AlreadyExists, ConfigError, NotFound, StoreUnavailable
from tokenbroker.kernel.model import (
    Claim,
    ConnectionRecord,
    ConnectionStatus,
    EventType,
    Intent,
    Lease,
    RefreshState,
    Shard,
)
from tokenbroker.ports import (
    MAX_BUDGET_LIMIT,
    MAX_BUDGET_WINDOW,
    BudgetDecision,
    ClaimBatch,
    Completion,
    StateStore,
)

from .builders import T0, ManualClock, connection, due_state, event
from .racing import race

OpenStateStore = Callable[[], StateStore]
TTL = timedelta(seconds=60)
S = timedelta(seconds=1)


def _ids(batch: ClaimBatch) -> list[str]:
    return [c.lease.connection_id for c in batch.claims]


def _lease(batch: ClaimBatch, cid: str) -> Lease:
    (lease,) = [c.lease for c in batch.claims if c.lease.connection_id == cid]
    return lease


def _add(store: StateStore, cid: str, state: RefreshState | None = None) -> ConnectionRecord:
    conn = connection(cid)
    state = state or due_state(T0 - 10 * S)
    store.create(conn, state)
    return ConnectionRecord(conn, state)


def _written(n: int) -> RefreshState:
    """A state a refresh might write: not due again for an hour."""
    return RefreshState(
        status=ConnectionStatus.ACTIVE,
        expires_at=T0 + timedelta(hours=2, microseconds=n),
        next_refresh_at=T0 + timedelta(hours=1, microseconds=n),
        last_refresh_at=T0 + timedelta(microseconds=n),
        last_attempt_at=T0 + timedelta(microseconds=n),
        consecutive_failures=0,
        current_version=n + 1,
        last_error=None,
    )


# --- the registry --------------------------------------------------------------------------


def test_create_then_get_round_trips_connection_and_state(state_store: StateStore) -> None:
    conn = connection("c1")
    state = RefreshState(
        status=ConnectionStatus.NEEDS_REAUTH,
        expires_at=T0 + timedelta(microseconds=7),
        next_refresh_at=None,
        last_refresh_at=T0 - timedelta(days=3, microseconds=1),
        last_attempt_at=T0,
        consecutive_failures=4,
        current_version=12,
        last_error="invalid_grant",
    )
    state_store.create(conn, state)
    record = state_store.get("c1")
    assert record == ConnectionRecord(conn, state)
    assert record.state.expires_at is not None and record.state.expires_at.tzinfo is not None


def test_create_twice_is_already_exists_and_keeps_the_first(state_store: StateStore) -> None:
    first = _add(state_store, "c1")
    with pytest.raises(AlreadyExists):
        state_store.create(connection("c1", profile="other"), RefreshState())
    assert state_store.get("c1") == first


def test_unknown_connections_are_not_found(state_store: StateStore) -> None:
    with pytest.raises(NotFound):
        state_store.get("nope")
    with pytest.raises(NotFound):
        state_store.delete("nope")
    with pytest.raises(NotFound):
        state_store.put_state("nope", RefreshState())
    assert state_store.list() == []  # put_state did not create it


def test_list_is_ordered_by_id(state_store: StateStore) -> None:
    assert state_store.list() == []
    records = {cid: _add(state_store, cid) for cid in ["m", "b", "z-9", "a", "b0", "a_1"]}
    listed = state_store.list()
    assert [r.connection.id for r in listed] == sorted(records)
    assert listed == [records[cid] for cid in sorted(records)]


def test_delete_removes_only_that_connection(state_store: StateStore) -> None:
    _add(state_store, "a")
    b = _add(state_store, "b")
    state_store.delete("a")
    with pytest.raises(NotFound):
        state_store.get("a")
    with pytest.raises(NotFound):
        state_store.delete("a")
    assert state_store.list() == [b]
    again = _add(state_store, "a", RefreshState(status=ConnectionStatus.DISABLED))
    assert state_store.get("a") == again


def test_put_state_overwrites_the_state_and_keeps_the_connection(state_store: StateStore) -> None:
    before = _add(state_store, "c1")
    new = _written(3)
    state_store.put_state("c1", new)
    assert state_store.get("c1") == ConnectionRecord(before.connection, new)


def test_writes_are_visible_through_another_handle(open_state_store: OpenStateStore) -> None:
    writer, reader = open_state_store(), open_state_store()
    record = _add(writer, "c1")
    assert reader.get("c1") == record
    assert reader.list() == [record]
    batch = reader.claim_due(T0, holder="r", ttl=TTL, limit=10)
    assert _ids(batch) == ["c1"]
    assert writer.claim_due(T0, holder="w", ttl=TTL, limit=10).claims == []


def test_the_change_marker_moves_with_every_change_through_any_handle(
    open_state_store: OpenStateStore,
) -> None:
    """The issuer trusts an unchanged marker to mean an unchanged record (status is live,
    issue 9): every kind of change, through this handle or another, moves it."""
    writer, reader = open_state_store(), open_state_store()
    record = _add(writer, "c1")
    changes = [
        lambda: writer.put_state("c1", _written(2)),
        lambda: writer.put_state("c1", replace(_written(2), status=ConnectionStatus.DISABLED)),
        lambda: _add(writer, "c2"),
        lambda: writer.delete("c2"),
        lambda: reader.put_state("c1", record.state),
    ]
    for n, change in enumerate(changes):
        marks = (reader.change_marker(), writer.change_marker())
        change()
        assert reader.change_marker() != marks[0], n
        assert writer.change_marker() != marks[1], n


# --- claim_due -----------------------------------------------------------------------------


def test_claim_due_takes_only_active_connections_that_are_due(state_store: StateStore) -> None:
    _add(state_store, "past", due_state(T0 - timedelta(hours=1)))
    _add(state_store, "exactly-now", due_state(T0))
    _add(state_store, "future", due_state(T0 + timedelta(microseconds=1)))
    _add(state_store, "never", due_state(T0, next_refresh_at=None))
    _add(state_store, "reauth", due_state(T0 - S, status=ConnectionStatus.NEEDS_REAUTH))
    _add(state_store, "disabled", due_state(T0 - S, status=ConnectionStatus.DISABLED))
    batch = state_store.claim_due(T0, holder="h", ttl=TTL, limit=100)
    assert sorted(_ids(batch)) == ["exactly-now", "past"]
    assert batch.leased_elsewhere == 0
    assert batch.missing == []


def test_claim_due_on_an_empty_store(state_store: StateStore) -> None:
    batch = state_store.claim_due(T0, holder="h", ttl=TTL, limit=10)
    assert (batch.claims, batch.leased_elsewhere, batch.missing) == ([], 0, [])


def test_claim_due_is_earliest_first_and_respects_limit(state_store: StateStore) -> None:
    offsets = {"c": 5, "a": 30, "e": 1, "b": 20, "d": 10}  # seconds before T0
    for cid, before in offsets.items():
        _add(state_store, cid, due_state(T0 - before * S))
    first = state_store.claim_due(T0, holder="h", ttl=TTL, limit=2)
    assert _ids(first) == ["a", "b"]
    assert first.leased_elsewhere == 0  # skipped for the limit, not leased
    rest = state_store.claim_due(T0, holder="h", ttl=TTL, limit=10)
    assert _ids(rest) == ["d", "c", "e"]
    assert rest.leased_elsewhere == 2


def test_claim_due_with_limit_zero_claims_nothing(state_store: StateStore) -> None:
    _add(state_store, "c1")
    assert state_store.claim_due(T0, holder="h", ttl=TTL, limit=0).claims == []
    assert _ids(state_store.claim_due(T0, holder="h", ttl=TTL, limit=1)) == ["c1"]


def test_a_claim_carries_the_lease_and_the_record(state_store: StateStore) -> None:
    record = _add(state_store, "c1")
    batch = state_store.claim_due(T0, holder="worker-7", ttl=TTL, limit=10)
    (claim,) = batch.claims
    assert isinstance(claim, Claim)
    assert claim.record == record
    assert claim.lease.connection_id == "c1"
    assert claim.lease.holder == "worker-7"
    assert claim.lease.expires_at == T0 + TTL
    assert isinstance(claim.lease.token, int)
    assert state_store.get("c1") == record  # claiming does not change the record


def test_claim_due_skips_live_leases_and_counts_them(
    state_store: StateStore, lease_clock: ManualClock
) -> None:
    for cid in ("a", "b", "c"):
        _add(state_store, cid)
    _add(state_store, "not-due", due_state(T0 + timedelta(hours=1)))
    state_store.claim(["a", "not-due"], T0, holder="other", ttl=TTL)
    batch = state_store.claim_due(lease_clock.set(T0 + TTL - S), holder="me", ttl=TTL, limit=10)
    assert sorted(_ids(batch)) == ["b", "c"]
    assert batch.leased_elsewhere == 1  # "not-due" is leased but not due: not counted
    again = state_store.claim_due(lease_clock.set(T0 + TTL - S), holder="third", ttl=TTL, limit=10)
    assert again.claims == []
    assert again.leased_elsewhere == 3


def test_claim_due_takes_over_expired_leases_with_a_higher_token(
    state_store: StateStore, lease_clock: ManualClock
) -> None:
    _add(state_store, "c1")
    old = _lease(state_store.claim_due(T0, holder="stalled", ttl=TTL, limit=10), "c1")
    # A lease whose expiry is exactly now has expired.
    batch = state_store.claim_due(lease_clock.set(T0 + TTL), holder="new", ttl=TTL, limit=10)
    new = _lease(batch, "c1")
    assert batch.leased_elsewhere == 0
    assert new.holder == "new"
    assert new.token > old.token
    assert new.expires_at == T0 + 2 * TTL


# --- sharded claim_due ---------------------------------------------------------------------


def _held(shard: Shard, cids: list[str]) -> list[str]:
    return [cid for cid in cids if shard.holds(cid)]


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_shards_of_one_count_partition_the_due_connections(
    state_store: StateStore, lease_clock: ManualClock, count: int
) -> None:
    """Each shard's claim takes exactly the due connections it holds, earliest first; the
    shards together take every one, and none twice."""
    cids = [f"c{n:02d}" for n in range(24)]
    for n, cid in enumerate(cids):
        _add(state_store, cid, due_state(T0 - (100 - n) * S))
    _add(state_store, "later", due_state(T0 + S))
    taken: list[str] = []
    for index in range(count):
        shard = Shard(index, count)
        batch = state_store.claim_due(T0, holder=f"w{index}", ttl=TTL, limit=100, shard=shard)
        assert _ids(batch) == _held(shard, cids)  # the order of cids is earliest first
        assert batch.leased_elsewhere == 0  # the other shards' leases are not counted
        taken += _ids(batch)
    assert sorted(taken) == cids


def test_a_sharded_claim_counts_only_its_own_shards_live_leases(
    state_store: StateStore, lease_clock: ManualClock
) -> None:
    cids = [f"c{n:02d}" for n in range(16)]
    for cid in cids:
        _add(state_store, cid)
    shards = [Shard(0, 2), Shard(1, 2)]
    assert all(_held(s, cids) for s in shards), "the fixture needs both shards non-empty"
    state_store.claim(cids, T0, holder="other", ttl=TTL)
    for shard in shards:
        batch = state_store.claim_due(T0, holder="me", ttl=TTL, limit=100, shard=shard)
        assert batch.claims == []
        assert batch.leased_elsewhere == len(_held(shard, cids))
    # Once those leases expire, each shard takes its own back, with a higher token.
    later = lease_clock.set(T0 + TTL)
    for shard in shards:
        batch = state_store.claim_due(later, holder="me", ttl=TTL, limit=100, shard=shard)
        assert sorted(_ids(batch)) == _held(shard, cids)


def test_a_sharded_claim_respects_limit_and_leaves_the_rest_due(
    state_store: StateStore, lease_clock: ManualClock
) -> None:
    cids = [f"c{n:02d}" for n in range(20)]
    for n, cid in enumerate(cids):
        _add(state_store, cid, due_state(T0 - (100 - n) * S))
    shard = Shard(1, 2)
    mine = _held(shard, cids)
    first = state_store.claim_due(T0, holder="h", ttl=TTL, limit=2, shard=shard)
    assert _ids(first) == mine[:2]
    rest = state_store.claim_due(T0, holder="h", ttl=TTL, limit=100, shard=shard)
    assert _ids(rest) == mine[2:]
    assert rest.leased_elsewhere == 2
    # The unsharded claim still sees the whole fleet: the other shard's are all free.
    whole = state_store.claim_due(T0, holder="h", ttl=TTL, limit=100)
    assert sorted(_ids(whole)) == sorted(set(cids) - set(mine))
    assert whole.leased_elsewhere == len(mine)


def test_prepare_shards_changes_nothing_the_registry_wrote(state_store: StateStore) -> None:
    for n in range(5):
        _add(state_store, f"c{n}")
    before = state_store.list()
    assert state_store.prepare_shards() == 0
    assert state_store.prepare_shards() == 0
    assert state_store.list() == before
    batch = state_store.claim_due(T0, holder="h", ttl=TTL, limit=100, shard=Shard(0, 1))
    assert sorted(_ids(batch)) == [f"c{n}" for n in range(5)]


# --- claim(ids) ----------------------------------------------------------------------------


def test_claim_ignores_due_ness(state_store: StateStore) -> None:
    records = {
        "future": _add(state_store, "future", due_state(T0 + timedelta(days=1))),
        "never": _add(state_store, "never", due_state(T0, next_refresh_at=None)),
        "failing": _add(state_store, "failing", due_state(T0, consecutive_failures=3)),
    }
    batch = state_store.claim(list(records), T0, holder="op", ttl=TTL)
    assert sorted(_ids(batch)) == sorted(records)
    assert (batch.leased_elsewhere, batch.missing, batch.inactive) == (0, [], {})
    for claim in batch.claims:
        assert claim.record == records[claim.lease.connection_id]
        assert claim.lease.holder == "op"
        assert claim.lease.expires_at == T0 + TTL


def test_claim_never_leases_an_inactive_connection_and_says_why(
    state_store: StateStore, lease_clock: ManualClock
) -> None:
    """Status is law: a disabled or needs_reauth connection is refreshed by no path, named
    or not (issue 8: ``refresh --all`` re-enabled disabled connections)."""
    _add(state_store, "reauth", due_state(T0, status=ConnectionStatus.NEEDS_REAUTH))
    _add(state_store, "disabled", due_state(T0, status=ConnectionStatus.DISABLED))
    _add(state_store, "active")
    before = state_store.list()
    batch = state_store.claim(["reauth", "disabled", "active", "ghost"], T0, holder="op", ttl=TTL)
    assert _ids(batch) == ["active"]
    assert batch.inactive == {
        "reauth": ConnectionStatus.NEEDS_REAUTH,
        "disabled": ConnectionStatus.DISABLED,
    }
    assert (batch.missing, batch.leased_elsewhere) == (["ghost"], 0)
    assert state_store.list() == before  # nothing leased, nothing written
    again = state_store.claim(
        ["reauth", "disabled"], lease_clock.set(T0 + S), holder="other", ttl=TTL
    )
    assert (again.claims, again.leased_elsewhere) == ([], 0)


def test_put_state_retires_a_live_lease(state_store: StateStore, lease_clock: ManualClock) -> None:
    """An operator's write wins over a refresh in flight: the refresh's lease can no longer
    complete, and the connection can be claimed again at once."""
    record = _add(state_store, "c1")
    lease = _lease(state_store.claim(["c1"], T0, holder="refresher", ttl=TTL), "c1")
    disabled = replace(record.state, status=ConnectionStatus.DISABLED)
    state_store.put_state("c1", disabled)
    assert state_store.complete([(lease, _written(1))]) == [False]
    assert state_store.get("c1").state == disabled
    state_store.put_state("c1", record.state)  # enabled again
    new = _lease(state_store.claim(["c1"], lease_clock.set(T0 + S), holder="next", ttl=TTL), "c1")
    assert new.token > lease.token
    state_store.release(lease)  # the retired lease frees nothing
    assert (
        state_store.claim(["c1"], lease_clock.set(T0 + 2 * S), holder="x", ttl=TTL).leased_elsewhere
        == 1
    )


def test_claim_reports_missing_ids_and_leased_ones(
    state_store: StateStore, lease_clock: ManualClock
) -> None:
    for cid in ("a", "b", "c"):
        _add(state_store, cid)
    held = _lease(state_store.claim(["b"], T0, holder="other", ttl=TTL), "b")
    batch = state_store.claim(
        ["a", "ghost", "b", "c", "a"], lease_clock.set(T0 + S), holder="me", ttl=TTL
    )
    assert sorted(_ids(batch)) == ["a", "c"]  # each once, though "a" was named twice
    assert batch.missing == ["ghost"]
    assert batch.leased_elsewhere == 1
    # "b" is still held by "other": its lease was not touched.
    assert state_store.complete([(held, _written(1))]) == [True]


def test_claim_of_nothing(state_store: StateStore) -> None:
    batch = state_store.claim([], T0, holder="h", ttl=TTL)
    assert (batch.claims, batch.leased_elsewhere, batch.missing) == ([], 0, [])


def test_claim_takes_over_an_expired_lease(
    state_store: StateStore, lease_clock: ManualClock
) -> None:
    _add(state_store, "c1")
    old = _lease(state_store.claim(["c1"], T0, holder="a", ttl=TTL), "c1")
    assert (
        state_store.claim(
            ["c1"], lease_clock.set(T0 + TTL - S), holder="b", ttl=TTL
        ).leased_elsewhere
        == 1
    )
    new = _lease(state_store.claim(["c1"], lease_clock.set(T0 + TTL), holder="b", ttl=TTL), "c1")
    assert new.token > old.token


# --- complete / release --------------------------------------------------------------------


def test_complete_with_the_newest_token_writes_and_releases(
    state_store: StateStore, lease_clock: ManualClock
) -> None:
    record = _add(state_store, "c1")
    lease = _lease(state_store.claim_due(T0, holder="h", ttl=TTL, limit=10), "c1")
    new = _written(1)
    assert state_store.complete([(lease, new)]) == [True]
    assert state_store.get("c1") == ConnectionRecord(record.connection, new)
    # Released: someone else can take it at once, well before the old lease would expire.
    batch = state_store.claim(["c1"], lease_clock.set(T0 + S), holder="other", ttl=TTL)
    assert _ids(batch) == ["c1"]
    assert batch.leased_elsewhere == 0


def test_complete_releases_for_claim_due_too(
    state_store: StateStore, lease_clock: ManualClock
) -> None:
    _add(state_store, "c1")
    lease = _lease(state_store.claim_due(T0, holder="h", ttl=TTL, limit=10), "c1")
    still_due = due_state(T0 - S, consecutive_failures=1, last_error="temporarily_unavailable")
    assert state_store.complete([(lease, still_due)]) == [True]
    batch = state_store.claim_due(lease_clock.set(T0 + S), holder="other", ttl=TTL, limit=10)
    assert _ids(batch) == ["c1"]
    assert batch.claims[0].record.state == still_due


def test_complete_with_a_stale_token_returns_false_and_writes_nothing(
    state_store: StateStore,
    lease_clock: ManualClock,
) -> None:
    _add(state_store, "c1")
    stale = _lease(state_store.claim_due(T0, holder="stalled", ttl=TTL, limit=10), "c1")
    current = _lease(
        state_store.claim_due(lease_clock.set(T0 + TTL), holder="new", ttl=TTL, limit=10), "c1"
    )
    before = state_store.get("c1")
    assert state_store.complete([(stale, _written(1))]) == [False]
    assert state_store.get("c1") == before
    # ... and the stale completion did not release the current holder's lease.
    assert (
        state_store.claim(
            ["c1"], lease_clock.set(T0 + TTL + S), holder="x", ttl=TTL
        ).leased_elsewhere
        == 1
    )
    assert state_store.complete([(current, _written(2))]) == [True]
    assert state_store.get("c1").state == _written(2)


def test_complete_reports_each_outcome_in_order(
    state_store: StateStore, lease_clock: ManualClock
) -> None:
    for cid in ("a", "b", "c"):
        _add(state_store, cid)
    first = state_store.claim_due(T0, holder="h1", ttl=TTL, limit=10)
    second = state_store.claim(
        ["b"], lease_clock.set(T0 + TTL), holder="h2", ttl=TTL
    )  # takes b over
    results = state_store.complete(
        [
            (_lease(first, "a"), _written(1)),
            (_lease(first, "b"), _written(2)),  # lost to h2
            (_lease(first, "c"), _written(3)),
            (_lease(second, "b"), _written(4)),
        ]
    )
    assert results == [True, False, True, True]
    assert [r.state for r in state_store.list()] == [_written(1), _written(4), _written(3)]


def test_complete_of_nothing(state_store: StateStore) -> None:
    assert state_store.complete([]) == []


def test_complete_on_a_deleted_connection_returns_false(state_store: StateStore) -> None:
    _add(state_store, "c1")
    lease = _lease(state_store.claim_due(T0, holder="h", ttl=TTL, limit=10), "c1")
    state_store.delete("c1")
    assert state_store.complete([(lease, _written(1))]) == [False]
    with pytest.raises(NotFound):
        state_store.get("c1")


def test_complete_with_pointer_from_lands_only_while_the_pointer_is_one_of_them(
    state_store: StateStore,
) -> None:
    """Secret Manager's pointer protocol moves the pointer inside the fenced commit: a
    completion is a compare-and-set of ``current_version`` as well as of the lease."""
    _add(state_store, "c1", due_state(T0 - 10 * S, current_version=3))
    _add(state_store, "c2", due_state(T0 - 10 * S, current_version=None))
    batch = state_store.claim_due(T0, holder="h", ttl=TTL, limit=10)
    moved, stale = _written(3), _written(8)  # current_version 4 and 9
    results = state_store.complete(
        [
            Completion(_lease(batch, "c1"), moved, pointer_from=frozenset({2, 3})),
            Completion(_lease(batch, "c2"), stale, pointer_from=frozenset({1})),
        ]
    )
    assert results == [True, False]
    assert state_store.get("c1").state == moved
    assert state_store.get("c2").state.current_version is None  # nothing written


def test_complete_refused_by_pointer_from_writes_no_events_and_keeps_the_lease(
    state_store: StateStore, lease_clock: ManualClock
) -> None:
    """Refused for the pointer is refused entirely: no state, no parked event; the lease is
    the holder's to release (it has not lost it to anyone)."""
    _add(state_store, "c1", due_state(T0 - 10 * S, current_version=5))
    lease = _lease(state_store.claim_due(T0, holder="h", ttl=TTL, limit=10), "c1")
    before = state_store.get("c1")
    refused = Completion(
        lease, _written(1), (event("c1", EventType.ROTATED),), pointer_from=frozenset({4})
    )
    assert state_store.complete([refused]) == [False]
    assert state_store.get("c1") == before
    assert state_store.parked_events(10) == []
    # None accepts a first version only: a record already pointed at one refuses it.
    first = Completion(lease, _written(0), pointer_from=frozenset({None}))
    assert state_store.complete([first]) == [False]
    assert state_store.complete([Completion(lease, _written(1))]) == [True]
    assert state_store.get("c1").state == _written(1)


def test_release_with_the_matching_token_frees_the_lease(
    state_store: StateStore, lease_clock: ManualClock
) -> None:
    record = _add(state_store, "c1")
    lease = _lease(state_store.claim_due(T0, holder="h", ttl=TTL, limit=10), "c1")
    state_store.release(lease)
    assert state_store.get("c1") == record  # state unchanged
    batch = state_store.claim_due(lease_clock.set(T0 + S), holder="other", ttl=TTL, limit=10)
    assert _ids(batch) == ["c1"]


def test_release_with_a_stale_token_does_nothing(
    state_store: StateStore, lease_clock: ManualClock
) -> None:
    _add(state_store, "c1")
    stale = _lease(state_store.claim(["c1"], T0, holder="stalled", ttl=TTL), "c1")
    _lease(state_store.claim(["c1"], lease_clock.set(T0 + TTL), holder="new", ttl=TTL), "c1")
    state_store.release(stale)  # no error, and the new holder keeps its lease
    blocked = state_store.claim_due(
        lease_clock.set(T0 + TTL + S), holder="third", ttl=TTL, limit=10
    )
    assert blocked.claims == []
    assert blocked.leased_elsewhere == 1


def test_release_of_a_lease_on_a_deleted_connection_is_a_no_op(state_store: StateStore) -> None:
    _add(state_store, "c1")
    lease = _lease(state_store.claim_due(T0, holder="h", ttl=TTL, limit=10), "c1")
    state_store.delete("c1")
    state_store.release(lease)
    assert state_store.list() == []


# --- lease time and renewal ----------------------------------------------------------------


def test_leases_run_on_the_stores_clock_not_the_callers(
    state_store: StateStore, lease_clock: ManualClock
) -> None:
    """A refresher whose clock is ahead (or behind) by minutes can neither take a live lease
    nor stretch its own: the store's clock decides (issue 8: a +120 s step lost 10/10)."""
    _add(state_store, "c1")
    ahead = T0 + timedelta(days=1)  # the caller's idea of now
    lease = _lease(state_store.claim_due(ahead, holder="fast", ttl=TTL, limit=10), "c1")
    assert lease.expires_at == T0 + TTL  # the store's now, not the caller's
    for skewed in (ahead + 2 * TTL, T0 - timedelta(minutes=2)):
        assert state_store.claim(["c1"], skewed, holder="x", ttl=TTL).leased_elsewhere == 1
        stolen = state_store.claim_due(skewed + timedelta(days=2), holder="x", ttl=TTL, limit=10)
        assert (stolen.claims, stolen.leased_elsewhere) == ([], 1)
    lease_clock.set(T0 + TTL)  # only the store's time expires it
    taken = state_store.claim(["c1"], T0 - timedelta(days=1), holder="x", ttl=TTL)
    assert _ids(taken) == ["c1"]


def test_renew_extends_a_held_lease_from_the_stores_now(
    state_store: StateStore, lease_clock: ManualClock
) -> None:
    _add(state_store, "c1")
    lease = _lease(state_store.claim(["c1"], T0, holder="h", ttl=TTL), "c1")
    lease_clock.set(T0 + 50 * S)
    (renewed,) = state_store.renew([lease], ttl=TTL)
    assert renewed is not None
    assert (renewed.connection_id, renewed.holder, renewed.token) == ("c1", "h", lease.token)
    assert renewed.expires_at == T0 + 50 * S + TTL
    lease_clock.set(T0 + TTL + 10 * S)  # past the first expiry, within the renewal
    assert state_store.claim(["c1"], T0, holder="x", ttl=TTL).leased_elsewhere == 1
    assert state_store.complete([(renewed, _written(1))]) == [True]  # still the holder


def test_renew_of_an_expired_lease_nobody_took_keeps_it(
    state_store: StateStore, lease_clock: ManualClock
) -> None:
    _add(state_store, "c1")
    lease = _lease(state_store.claim(["c1"], T0, holder="h", ttl=TTL), "c1")
    lease_clock.set(T0 + 2 * TTL)
    (renewed,) = state_store.renew([lease], ttl=TTL)
    assert renewed is not None and renewed.token == lease.token
    assert renewed.expires_at == T0 + 3 * TTL
    assert state_store.claim(["c1"], T0, holder="x", ttl=TTL).leased_elsewhere == 1


def test_renew_of_a_lost_lease_is_none_and_touches_nothing(
    state_store: StateStore, lease_clock: ManualClock
) -> None:
    """Lost: taken over, completed, released, retired by an operator's write, deleted."""
    for cid in ("taken", "completed", "released", "retired", "deleted"):
        _add(state_store, cid)
    first = state_store.claim(
        ["taken", "completed", "released", "retired", "deleted"], T0, holder="h", ttl=TTL
    )
    lease_clock.set(T0 + TTL)
    new = _lease(state_store.claim(["taken"], T0, holder="new", ttl=TTL), "taken")
    assert state_store.complete([(_lease(first, "completed"), _written(1))]) == [True]
    state_store.release(_lease(first, "released"))
    state_store.put_state("retired", due_state(T0, status=ConnectionStatus.DISABLED))
    state_store.delete("deleted")
    before = state_store.list()
    lease_clock.set(T0 + TTL + S)
    leases = [_lease(first, cid) for cid in ("taken", "completed", "released", "retired")]
    assert state_store.renew([*leases, _lease(first, "deleted")], ttl=TTL) == [None] * 5
    assert state_store.list() == before
    # The new holder's lease was not moved by the stale renewal.
    assert state_store.renew([new], ttl=TTL)[0] is not None
    assert state_store.claim(["completed"], T0, holder="x", ttl=TTL).claims  # free, not held


def test_renew_answers_each_lease_in_order(
    state_store: StateStore, lease_clock: ManualClock
) -> None:
    for cid in ("a", "b", "c"):
        _add(state_store, cid)
    batch = state_store.claim(["a", "b", "c"], T0, holder="h", ttl=TTL)
    state_store.release(_lease(batch, "b"))
    lease_clock.set(T0 + 10 * S)
    renewed = state_store.renew([_lease(batch, c) for c in ("c", "b", "a")], ttl=2 * TTL)
    assert [r.connection_id if r else None for r in renewed] == ["c", None, "a"]
    assert all(r.expires_at == T0 + 10 * S + 2 * TTL for r in renewed if r)
    assert state_store.renew([], ttl=TTL) == []


# --- the intent record and the outbox --------------------------------------------------------


def test_renew_records_an_intent_stamped_with_the_stores_clock(
    state_store: StateStore, lease_clock: ManualClock
) -> None:
    """Before a rotating refresh token is presented, the intent is durable, in the same
    fenced write as the renewal; ``None`` keeps what is recorded."""
    _add(state_store, "a")
    _add(state_store, "b")
    batch = state_store.claim(["a", "b"], T0, holder="h", ttl=TTL)
    lease_clock.set(T0 + 5 * S)
    intent = Intent(attempt="att-1", from_version=1, token=_lease(batch, "a").token)
    renewed = state_store.renew(
        [_lease(batch, "a"), _lease(batch, "b")], ttl=TTL, intents=[intent, None]
    )
    assert all(renewed)
    assert state_store.get("a").state.intent == replace(intent, at=T0 + 5 * S)
    assert state_store.get("b").state.intent is None
    lease_clock.set(T0 + 6 * S)
    state_store.renew([_lease(batch, "a")], ttl=TTL)  # a heartbeat keeps the intent
    assert state_store.get("a").state.intent == replace(intent, at=T0 + 5 * S)


def test_a_lost_lease_records_no_intent(state_store: StateStore, lease_clock: ManualClock) -> None:
    _add(state_store, "c1")
    stale = _lease(state_store.claim(["c1"], T0, holder="old", ttl=TTL), "c1")
    lease_clock.set(T0 + TTL)
    _lease(state_store.claim(["c1"], T0, holder="new", ttl=TTL), "c1")
    intent = Intent(attempt="late", from_version=1, token=stale.token)
    assert state_store.renew([stale], ttl=TTL, intents=[intent]) == [None]
    assert state_store.get("c1").state.intent is None


def test_intent_and_at_risk_round_trip(state_store: StateStore) -> None:
    intent = Intent(attempt="att-9", from_version=4, token=12, at=T0 - S)
    state = due_state(T0, intent=intent, at_risk=True, last_error="transport_error")
    record = _add(state_store, "c1", state)
    assert state_store.get("c1") == record
    lease = _lease(state_store.claim(["c1"], T0, holder="h", ttl=TTL), "c1")
    cleared = _written(1)
    assert (cleared.intent, cleared.at_risk) == (None, False)
    assert state_store.complete([(lease, cleared)]) == [True]
    assert state_store.get("c1").state == cleared


def test_complete_writes_the_events_with_the_state_and_only_with_it(
    state_store: StateStore, lease_clock: ManualClock
) -> None:
    """A transactional outbox: the events of an accepted completion are parked in the same
    commit (and relayed later); a completion whose lease was lost writes neither."""
    for cid in ("a", "b"):
        _add(state_store, cid)
    batch = state_store.claim(["a", "b"], T0, holder="h", ttl=TTL)
    lease_clock.set(T0 + TTL)
    _lease(state_store.claim(["b"], T0, holder="other", ttl=TTL), "b")  # b is lost
    rotated, recovered = event("a", n=1), event("a", EventType.RECOVERED, n=2)
    lost = event("b", n=3)
    results = state_store.complete(
        [
            Completion(_lease(batch, "a"), _written(1), (rotated, recovered)),
            Completion(_lease(batch, "b"), _written(2), (lost,)),
        ]
    )
    assert results == [True, False]
    assert state_store.get("a").state == _written(1)
    assert state_store.parked_events(10) == [rotated, recovered]
    state_store.unpark_events([rotated.event_id, recovered.event_id])
    assert state_store.parked_events(10) == []


# --- fencing -------------------------------------------------------------------------------


def test_fencing_tokens_strictly_increase_across_grants(
    state_store: StateStore, lease_clock: ManualClock
) -> None:
    _add(state_store, "c1")
    tokens = []
    now = T0
    lease = _lease(state_store.claim_due(now, holder="a", ttl=TTL, limit=1), "c1")
    tokens.append(lease.token)
    assert state_store.complete([(lease, due_state(now))]) == [True]  # due again at once

    lease = _lease(state_store.claim(["c1"], now, holder="b", ttl=TTL), "c1")
    tokens.append(lease.token)
    state_store.release(lease)

    lease = _lease(state_store.claim_due(now, holder="c", ttl=TTL, limit=1), "c1")
    tokens.append(lease.token)
    now = lease_clock.set(now + TTL)  # expires without being given back

    lease = _lease(state_store.claim(["c1"], now, holder="d", ttl=TTL), "c1")
    tokens.append(lease.token)
    now = lease_clock.set(now + TTL)

    lease = _lease(state_store.claim_due(now, holder="e", ttl=TTL, limit=1), "c1")
    tokens.append(lease.token)
    assert tokens == sorted(set(tokens)), tokens  # strictly increasing


def test_tokens_of_other_connections_do_not_fence_each_other(
    state_store: StateStore, lease_clock: ManualClock
) -> None:
    _add(state_store, "a")
    _add(state_store, "b")
    batch = state_store.claim_due(T0, holder="h", ttl=TTL, limit=10)
    state_store.release(_lease(batch, "b"))
    for n in range(3):  # b is granted again and again; a's lease stays the newest for a
        state_store.release(
            _lease(state_store.claim(["b"], lease_clock.set(T0 + n * S), holder="x", ttl=TTL), "b")
        )
    assert state_store.complete([(_lease(batch, "a"), _written(1))]) == [True]


def test_a_lease_taken_before_delete_cannot_complete_on_the_recreated_connection(
    state_store: StateStore,
) -> None:
    """Delete and re-register under the same id while a refresher still holds a lease: that
    refresher must not be able to write over the new connection's state."""
    _add(state_store, "c1")
    stalled = _lease(state_store.claim_due(T0, holder="stalled", ttl=TTL, limit=10), "c1")
    state_store.delete("c1")
    fresh = _add(state_store, "c1", due_state(T0 - S, current_version=1))
    assert state_store.complete([(stalled, _written(9))]) == [False]
    assert state_store.get("c1") == fresh


def test_fencing_tokens_keep_increasing_across_delete_and_recreate(
    state_store: StateStore,
    lease_clock: ManualClock,
) -> None:
    _add(state_store, "c1")
    stalled = _lease(state_store.claim_due(T0, holder="stalled", ttl=TTL, limit=10), "c1")
    state_store.delete("c1")
    fresh = _add(state_store, "c1", due_state(T0 - S))
    current = _lease(
        state_store.claim_due(lease_clock.set(T0 + S), holder="new", ttl=TTL, limit=10), "c1"
    )
    assert current.token > stalled.token
    assert state_store.complete([(stalled, _written(9))]) == [False]
    assert state_store.get("c1") == fresh
    state_store.release(stalled)  # must not free the new holder's lease
    assert (
        state_store.claim(["c1"], lease_clock.set(T0 + 2 * S), holder="x", ttl=TTL).leased_elsewhere
        == 1
    )


# --- races ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sharded", [False, True], ids=["unsharded", "two-racers-a-shard"])
@pytest.mark.parametrize("handles", ["one-handle", "a-handle-each"])
def test_racing_claim_due_never_grants_a_connection_twice(
    open_state_store: OpenStateStore, handles: str, lease_clock: ManualClock, sharded: bool
) -> None:
    """Threads claim the same due set at the same instant. With "a-handle-each" every thread
    has its own client (for embedded: its own EmbeddedDatabase on the same directory, as two
    processes would). "two-racers-a-shard": racers 0 and 2 on shard 0 of 2, 1 and 3 on shard 1
    (a redelivered shard message beside the first)."""
    racers, due, rounds = 4, 40, 3
    setup = open_state_store()
    for n in range(due):
        _add(setup, f"c{n:03d}", due_state(T0 - n * S))
    stores = [setup if handles == "one-handle" else open_state_store() for _ in range(racers)]
    for round_ in range(rounds):
        now = lease_clock.set(T0 + round_ * 2 * TTL)  # every earlier lease has expired
        batches = race(
            [
                partial(
                    stores[n].claim_due,
                    now,
                    holder=f"h{n}",
                    ttl=TTL,
                    limit=due,
                    shard=Shard(n % 2, 2) if sharded else None,
                )
                for n in range(racers)
            ]
        )
        assert all(isinstance(b, ClaimBatch) for b in batches), batches
        claimed = [cid for b in batches for cid in _ids(b)]  # type: ignore[arg-type]
        assert len(claimed) == len(set(claimed)), "a connection was granted twice"
        assert sorted(claimed) == [f"c{n:03d}" for n in range(due)]
        for n, batch in enumerate(batches):
            assert all(c.lease.holder == f"h{n}" for c in batch.claims)  # type: ignore[union-attr]
            if sharded:
                assert all(Shard(n % 2, 2).holds(cid) for cid in _ids(batch))  # type: ignore[arg-type]
        leases = [c.lease for b in batches for c in b.claims]  # type: ignore[union-attr]
        assert setup.complete([(lease, due_state(now)) for lease in leases]) == [True] * due


# --- token-endpoint budgets ----------------------------------------------------------------

WINDOW = timedelta(minutes=10)
US = timedelta(microseconds=1)


def _take(
    store: StateStore, key: str, now: datetime, *, limit: int = 3, cost: int = 1
) -> BudgetDecision:
    return store.take_budget(key, limit=limit, window=WINDOW, now=now, cost=cost)


def test_a_budget_grants_up_to_its_limit_then_says_when_a_slot_frees(
    state_store: StateStore,
) -> None:
    granted = [_take(state_store, "zoho:rt:a", T0 + n * S) for n in range(3)]
    assert [(d.granted, d.used, d.frees_at) for d in granted] == [
        (True, 1, None),
        (True, 2, None),
        (True, 3, None),
    ]
    denied = _take(state_store, "zoho:rt:a", T0 + 5 * S)
    assert denied == BudgetDecision(granted=False, used=3, frees_at=T0 + WINDOW)


def test_a_denial_spends_nothing(state_store: StateStore) -> None:
    for n in range(3):
        _take(state_store, "k", T0 + n * S)
    for n in range(20):  # a refresher asking again and again does not push the slot back
        assert _take(state_store, "k", T0 + (10 + n) * S).frees_at == T0 + WINDOW
    # Exactly when the first take ages out, one slot is free -- and only one.
    assert _take(state_store, "k", T0 + WINDOW).granted
    assert _take(state_store, "k", T0 + WINDOW).frees_at == T0 + S + WINDOW


def test_the_window_slides_to_the_microsecond(state_store: StateStore) -> None:
    """A take occupies [at, at + window): one microsecond before that ends it still counts
    (as a lease expiring exactly at ``now`` has expired)."""
    assert _take(state_store, "k", T0, limit=1).granted
    assert _take(state_store, "k", T0 + WINDOW - US, limit=1) == BudgetDecision(
        granted=False, used=1, frees_at=T0 + WINDOW
    )
    assert _take(state_store, "k", T0 + WINDOW, limit=1).granted
    assert not _take(state_store, "k", T0 + 2 * WINDOW - US, limit=1).granted


def test_budgets_of_different_keys_are_independent(state_store: StateStore) -> None:
    for n in range(3):
        assert _take(state_store, "zoho:rt:a", T0 + n * S).granted
    assert not _take(state_store, "zoho:rt:a", T0 + 3 * S).granted
    assert _take(state_store, "zoho:rt:b", T0 + 3 * S).granted
    assert _take(state_store, "zoho:rt:a2", T0 + 3 * S).granted  # not a prefix match


def test_a_take_of_several_slots_is_all_or_nothing(state_store: StateStore) -> None:
    for n in range(4):
        assert _take(state_store, "k", T0 + n * S, limit=10, cost=2).granted  # 8 of 10
    # 3 more would make 11: denied until the oldest take (2 slots) ages out (6 + 3 <= 10).
    assert _take(state_store, "k", T0 + 10 * S, limit=10, cost=3) == BudgetDecision(
        granted=False, used=8, frees_at=T0 + WINDOW
    )
    assert _take(state_store, "k", T0 + 10 * S, limit=10, cost=2) == BudgetDecision(
        granted=True, used=10, frees_at=None
    )
    # Now 10 of 10: a take of 5 needs the three oldest takes (6 slots) gone.
    assert _take(state_store, "k", T0 + 11 * S, limit=10, cost=5) == BudgetDecision(
        granted=False, used=10, frees_at=T0 + 2 * S + WINDOW
    )
    assert _take(state_store, "k", T0 + 2 * S + WINDOW, limit=10, cost=5).granted


def test_a_take_from_a_clock_behind_the_others_still_counts_theirs(
    state_store: StateStore,
) -> None:
    """Two hosts whose clocks disagree share one budget: takes stamped "in the future" by the
    host that runs ahead still count for the host that runs behind, until they age out."""
    ahead = T0 + timedelta(minutes=2)
    for n in range(3):
        assert _take(state_store, "k", ahead + n * S).granted
    assert _take(state_store, "k", T0) == BudgetDecision(
        granted=False, used=3, frees_at=ahead + WINDOW
    )
    assert not _take(state_store, "k", ahead + WINDOW - US).granted
    assert _take(state_store, "k", ahead + WINDOW).granted


def test_a_budget_is_shared_by_every_handle(open_state_store: OpenStateStore) -> None:
    first, second = open_state_store(), open_state_store()
    assert _take(first, "k", T0).granted
    assert _take(second, "k", T0 + S).granted
    assert _take(first, "k", T0 + 2 * S).granted
    assert _take(second, "k", T0 + 3 * S) == BudgetDecision(
        granted=False, used=3, frees_at=T0 + WINDOW
    )


def test_awkward_keys_are_kept_apart(state_store: StateStore) -> None:
    keys = [
        "a/b",
        "a",
        "a\\b",
        "../..",
        "__name__",
        "' OR 1=1 --",
        "ü\u2603 \x00",
        "x" * 1000,
        "x" * 999,
    ]
    for key in keys:
        assert _take(state_store, key, T0, limit=1).granted, key
    for key in keys:
        assert not _take(state_store, key, T0 + S, limit=1).granted, key


def test_an_old_budget_starts_over_once_its_window_has_passed(state_store: StateStore) -> None:
    for n in range(3):
        _take(state_store, "k", T0 + n * S)
    later = T0 + timedelta(days=3)
    decisions = [_take(state_store, "k", later + n * S) for n in range(4)]
    assert [d.used for d in decisions] == [1, 2, 3, 3]
    assert decisions[-1].frees_at == later + WINDOW


@pytest.mark.parametrize(
    ("change", "names"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": -1}, "limit"),
        ({"limit": MAX_BUDGET_LIMIT + 1}, "limit"),
        ({"window": timedelta(0)}, "window"),
        ({"window": -WINDOW}, "window"),
        ({"window": MAX_BUDGET_WINDOW + US}, "window"),
        ({"cost": 0}, "cost"),
        ({"cost": -2}, "cost"),
        ({"cost": 4}, "cost"),  # more than the limit: it could never be granted
        ({"now": datetime(2026, 3, 1, 12, 0)}, "now"),  # naive: whose clock?
        ({"now": datetime.max.replace(tzinfo=T0.tzinfo)}, "now"),
        ({"key": ""}, "key"),
        ({"key": "k" * 2000}, "key"),
    ],
)
def test_absurd_budget_arguments_are_refused_and_spend_nothing(
    state_store: StateStore, change: dict[str, object], names: str
) -> None:
    args: dict[str, object] = {"key": "k", "limit": 3, "window": WINDOW, "now": T0, "cost": 1}
    args.update(change)
    key = args.pop("key")
    with pytest.raises(ConfigError, match=names):
        state_store.take_budget(key, **args)  # type: ignore[arg-type]
    assert [_take(state_store, "k", T0 + S).used for _ in range(3)] == [1, 2, 3]


@pytest.mark.parametrize("handles", ["one-handle", "a-handle-each"])
def test_racing_takers_never_exceed_the_limit(
    open_state_store: OpenStateStore, handles: str
) -> None:
    """Takers race for one budget at the same instant, each on its own handle with
    "a-handle-each" (for embedded its own SQLite connection, as a second process would have; for
    Firestore its own client, as a second instance would). Exactly ``limit`` are granted."""
    racers, per_racer, limit = 4, 4, 10
    setup = open_state_store()
    stores = [setup if handles == "one-handle" else open_state_store() for _ in range(racers)]

    def taker(store: StateStore) -> list[BudgetDecision | StoreUnavailable]:
        """Each take's decision; a take the store gave up on under contention (Firestore's
        transaction retries exhausted: a retryable ``StoreUnavailable``) is a take that spent
        nothing, which is allowed -- exceeding the limit is not."""
        taken: list[BudgetDecision | StoreUnavailable] = []
        for _ in range(per_racer):
            try:
                taken.append(_take(store, "shared", T0, limit=limit))
            except StoreUnavailable as error:
                taken.append(error)
        return taken

    results = race([partial(taker, store) for store in stores])
    assert all(isinstance(r, list) for r in results), results
    outcomes = [d for r in results for d in r]  # type: ignore[union-attr]
    decisions = [d for d in outcomes if isinstance(d, BudgetDecision)]
    given_up = len(outcomes) - len(decisions)
    assert all(o.retryable for o in outcomes if isinstance(o, StoreUnavailable))
    assert given_up <= racers * per_racer - limit, "contention must not starve the budget"
    granted = sum(d.granted for d in decisions)
    assert granted == limit or (given_up and granted < limit)
    if granted < limit:  # the store gave up on some takes: what is left is still takeable
        for _ in range(limit - granted):
            assert _take(setup, "shared", T0, limit=limit).granted
    assert all(d.used <= limit for d in decisions)
    assert all(d.frees_at == T0 + WINDOW for d in decisions if not d.granted)
    assert not _take(setup, "shared", T0 + WINDOW - US, limit=limit).granted
