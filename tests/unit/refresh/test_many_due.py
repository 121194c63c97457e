"""More due than one commit batch, or than the workers (issue 8: "with more than 500 due the
tick hangs for ever (cancelling hangs too)" -- the results queue was bounded at
``max(commit_batch, concurrency)`` and the committer could wait on a worker that waited on it).
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.unit.refresh.test_tick import World
from tokenbroker.adapters.memory import MemorySecretStore, MemoryStateStore
from tokenbroker.kernel.errors import InternalError, StoreFault, StoreUnavailable
from tokenbroker.kernel.retry import RetryPolicy
from tokenbroker.refresh.registry import ConnectionRegistry

DUE = 1_200  # more than twice the default commit batch (500)


def _many(world: World, count: int) -> list[str]:
    ids = [f"c{n:04d}" for n in range(count)]
    for cid in ids:
        world.add(cid)
    return ids


def test_a_tick_with_more_due_than_a_commit_batch_finishes_and_commits_them_all(
    world: World,
) -> None:
    _many(world, DUE)
    refresher = world.refresher(concurrency=64, commit_batch=100)

    async def run() -> int:
        summary = await asyncio.wait_for(refresher.tick(world.server), timeout=120)  # type: ignore[arg-type]
        return summary.refreshed

    assert asyncio.run(run()) == DUE
    assert {r.state.current_version for r in world.state.list()} == {2}
    assert world.tick().due == 0  # every lease given back with its state


def test_cancelling_a_big_tick_ends_it_promptly_and_loses_nothing(world: World) -> None:
    """A cancelled tick (a function timeout, a shutdown) ends within seconds; what it had
    committed stays; the rest is refreshed by the next tick once the leases run out."""
    _many(world, DUE)
    world.server.latency = 0.01
    refresher = world.refresher(concurrency=32, commit_batch=50)

    async def run() -> None:
        task = asyncio.create_task(refresher.tick(world.server))  # type: ignore[arg-type]
        while world.server.requests["refresh_token"] < 200:  # noqa: ASYNC110 - a fake's counter
            await asyncio.sleep(0.01)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=15)
        assert done, "the cancelled tick did not end"

    asyncio.run(run())
    committed = [r for r in world.state.list() if r.state.current_version == 2]
    assert committed, "nothing committed before the cancel"
    for record in committed:
        assert world.secrets.get(record.connection.id).version == 2
    world.server.latency = 0.0
    world.clock.advance(refresher.lease_ttl.total_seconds() + 1)
    world.tick()
    # A cancel is a kill for what the tick held in memory: at most the refreshes in flight
    # (answered, not yet staged) can be lost; every other connection's token still works.
    dead = []
    for record in world.state.list():
        token = world.secrets.get(record.connection.id).credential.refresh_token
        if token is None or not world.server.grant_alive(token.reveal()):
            dead.append(record.connection.id)
    assert len(dead) <= refresher.concurrency


class CommitFails(MemoryStateStore):
    """The state store takes claims but no commit: a disk that filled up mid-tick (a store
    error), or an error no adapter translated (SQLite's own, before they all were)."""

    error: Exception = StoreFault("disk full")

    def complete(self, *_: object, **__: object) -> list[bool]:
        raise self.error


@pytest.mark.parametrize(
    "error", [StoreFault("disk full"), RuntimeError("database or disk is full")], ids=repr
)
def test_a_commit_that_fails_for_good_ends_a_big_tick_and_stops_presenting(
    world: World, error: Exception
) -> None:
    """The hang itself: once committing failed, the committer stopped taking results and the
    workers waited for ever on the bounded queue, the tick (and its cancellation) with them."""
    world.state = CommitFails(world.clock)
    world.state.error = error
    world.registry = ConnectionRegistry(
        secrets=world.secrets, state=world.state, profiles=world.profiles, clock=world.clock
    )
    _many(world, 600)
    refresher = world.refresher(concurrency=8, commit_batch=20)

    async def run() -> None:
        await asyncio.wait_for(refresher.tick(world.server), timeout=60)  # type: ignore[arg-type]

    with pytest.raises(StoreUnavailable if isinstance(error, StoreFault) else InternalError):
        asyncio.run(run())
    # Presenting stopped soon after the first failed commit, far short of all 600.
    assert world.server.requests["refresh_token"] < 100


class StageDown(MemorySecretStore):
    """Secret writes fail (retryably) until ``up_at`` on the world's clock: a Secret Manager
    outage, a full disk that is cleared, a write lock held by a backup."""

    def __init__(self, world: World, seconds: float) -> None:
        super().__init__()
        self.clock = world.clock
        self.up_at = world.clock.monotonic() + seconds
        self.refused = 0

    def stage(self, writes):  # type: ignore[no-untyped-def]
        if self.clock.monotonic() < self.up_at:
            self.refused += 1
            raise StoreUnavailable("secret store unavailable")
        return super().stage(writes)


def test_answers_in_hand_outlast_a_store_outage_of_half_a_minute(world: World) -> None:
    """The fault suite's Secret Manager stop and full disk lost the answers that arrived after
    the store failed: their staging gave up after the store's five attempts (~3 s) and the
    tick ended with the provider's new refresh tokens in memory. Staging an answer in hand
    now outlasts an outage of about a minute; presenting is paused meanwhile."""
    for n in range(8):
        world.add(f"c{n}")
    world.tick()  # all registered, refreshed once: now cut the store and refresh them again
    down = StageDown(world, 30.0)
    for record in world.state.list():
        stored = world.secrets.get(record.connection.id)
        down.put(record.connection.id, stored.credential, expected_version=None)
        down.put(record.connection.id, stored.credential, expected_version=1)
    world.secrets = down
    refresher = world.refresher(concurrency=4)
    summary = world.tick(refresher, connection_ids=[f"c{n}" for n in range(8)])
    assert down.refused > 0
    assert summary.refreshed == 8 and summary.ok
    for n in range(8):
        token = world.secrets.get(f"c{n}").credential.refresh_token
        assert token is not None and world.server.grant_alive(token.reveal())
    # Presenting paused while the store was down: at most the workers' first requests.
    assert world.server.requests["refresh_token"] == 16


class CommitFailsThenRenewalsFalter(CommitFails):
    """A commit fails for good (the tick halts), and the lease renewals in flight at that
    moment fail once, retryably, before they go through: the fault suite's SQLite I/O error,
    where every write failed together for a while."""

    def __init__(self, clock: object) -> None:
        super().__init__(clock)  # type: ignore[arg-type]
        self.failed_commit = False
        self.faltered = 0

    def complete(self, *args: object, **kwargs: object) -> list[bool]:
        self.failed_commit = True
        return super().complete(*args, **kwargs)

    def renew(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.failed_commit and self.faltered < 3:
            self.faltered += 1
            raise StoreUnavailable("database is locked")
        return super().renew(*args, **kwargs)


def test_a_store_call_retrying_after_the_halt_does_not_leave_the_workers_paused(
    world: World,
) -> None:
    """The fault suite's ``store_outages`` hung a refresher for good: a store call that began
    retrying after the tick had halted paused the workers (cleared the pause flag) and, the
    tick being halted, never released them. The tick must end, with the commit's error."""
    world.state = CommitFailsThenRenewalsFalter(world.clock)
    world.registry = ConnectionRegistry(
        secrets=world.secrets, state=world.state, profiles=world.profiles, clock=world.clock
    )
    _many(world, 200)
    world.server.latency = 0.005
    refresher = world.refresher(concurrency=8, commit_batch=5)

    async def run() -> None:
        await asyncio.wait_for(refresher.tick(world.server), timeout=30)  # type: ignore[arg-type]

    with pytest.raises(StoreUnavailable):
        asyncio.run(run())
    assert world.state.faltered > 0  # the renewals did falter after the halt


def test_one_info_line_per_rotation_and_only_once_it_is_committed(world: World) -> None:
    """Issue 11: one line per refresh outcome. A rotation is announced once durable; one whose
    commit failed is reported by the failure line, never as rotated."""
    from tokenbroker.kernel.log import capture_logs

    ids = _many(world, 5)
    with capture_logs("info") as log:
        world.tick()
    rotated = [json.loads(line) for line in log.getvalue().splitlines()
               if '"credential rotated"' in line]  # fmt: skip
    assert sorted(line["connection_id"] for line in rotated) == ids
    assert all(line["severity"] == "INFO" and line["version"] == 2 for line in rotated)

    world.state = CommitFails(world.clock)
    world.registry = ConnectionRegistry(
        secrets=world.secrets, state=world.state, profiles=world.profiles, clock=world.clock
    )
    _many(world, 3)
    with capture_logs("info") as log, pytest.raises(StoreUnavailable):
        asyncio.run(world.refresher().tick(world.server))  # type: ignore[arg-type]
    assert '"credential rotated"' not in log.getvalue()
    assert "refresh results not committed" in log.getvalue()


# --- the pipelined tick (issue 13): chunked credential reads, several commit loops ----------


@pytest.mark.parametrize(("committers", "read_chunk"), [(3, 7), (8, 1), (2, 5000)])
def test_several_commit_loops_and_chunked_reads_commit_each_connection_exactly_once(
    world: World, committers: int, read_chunk: int
) -> None:
    """Every connection refreshed once and committed once, whatever the number of commit
    loops and the read chunk; the tick ends (each loop takes exactly one end marker: a loop
    that took two left another waiting for ever)."""
    ids = _many(world, 300)
    reads: list[int] = []
    real = world.secrets.get_many

    def counting(connection_ids, **kw):  # type: ignore[no-untyped-def]
        reads.append(len(connection_ids))
        return real(connection_ids, **kw)

    world.secrets.get_many = counting  # type: ignore[method-assign]
    refresher = world.refresher(
        concurrency=16, commit_batch=20, committers=committers, read_chunk=read_chunk
    )

    async def run():  # type: ignore[no-untyped-def]
        return await asyncio.wait_for(refresher.tick(world.server), timeout=60)  # type: ignore[arg-type]

    summary = asyncio.run(run())
    assert summary.refreshed == len(ids) and summary.ok
    assert world.server.requests["refresh_token"] == len(ids)
    assert {r.state.current_version for r in world.state.list()} == {2}
    # Claimed ``claim_chunk`` at a time; each claimed chunk read ``read_chunk`` at a time.
    step = refresher.claim_chunk
    chunks = [min(step, len(ids) - i) for i in range(0, len(ids), step)]
    assert sorted(reads) == sorted(
        min(read_chunk, chunk - i) for chunk in chunks for i in range(0, chunk, read_chunk)
    )
    rotated = [e.connection_id for e in world.events.events]
    assert sorted(rotated) == sorted(ids)  # one event each, none lost or doubled
    assert world.tick().due == 0


def test_a_chunk_whose_read_fails_for_good_presents_nothing_of_it_and_halts(
    world: World,
) -> None:
    """Reads run while earlier chunks refresh: a chunk the store cannot read halts the tick
    (StoreUnavailable, as a failed commit does) -- its connections are given back unrefreshed,
    what was already refreshed is committed, and nothing is lost."""
    ids = _many(world, 40)
    real = world.secrets.get_many
    calls = 0

    def failing_second(connection_ids, **kw):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls >= 2:
            raise StoreUnavailable("secret store down")
        return real(connection_ids, **kw)

    world.secrets.get_many = failing_second  # type: ignore[method-assign]
    refresher = world.refresher(concurrency=4, read_chunk=10, store_retry=RetryPolicy(attempts=1))
    with pytest.raises(StoreUnavailable):
        world.tick(refresher)
    world.secrets.get_many = real  # type: ignore[method-assign]
    records = {r.connection.id: r.state for r in world.state.list()}
    refreshed = {cid for cid, state in records.items() if state.current_version == 2}
    assert 0 < len(refreshed) <= 10  # only the first chunk could be presented
    assert world.server.requests["refresh_token"] == len(refreshed)
    for cid in ids:  # every grant alive: nothing presented without its answer stored
        stored = world.secrets.get(cid).credential.refresh_token
        assert stored is not None and world.server.grant_alive(stored.reveal()), cid
    # The rest were given back: the next tick refreshes them at once.
    summary = world.tick()
    assert summary.refreshed == len(ids) - len(refreshed)
