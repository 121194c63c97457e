"""The tick claims as it goes (issue 13, "a pipelined tick": refreshing starts after the first
claimed chunk): the due set is claimed ``claim_chunk`` at a time, the next chunk while the
current one is refreshed, so no refresh waits for the whole claim and no lease waits long for
its worker. What must still hold: each connection refreshed once, the limit and the quota
kept, a store that fails mid-claim halts the tick without losing anything, and a connection
claimed a second time in one tick is never presented twice."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import datetime
from typing import Any

import pytest

from tests.unit.refresh.test_tick import World
from tokenbroker.kernel.errors import InternalError, StoreUnavailable
from tokenbroker.kernel.model import Claim
from tokenbroker.kernel.retry import RetryPolicy
from tokenbroker.ports import ClaimBatch, RequestQuota
from tokenbroker.refresh.leases import LeaseKeeper
from tokenbroker.refresh.tick import Refresher, TickSummary, _ClaimStream


def _many(world: World, count: int) -> list[str]:
    ids = [f"c{n:04d}" for n in range(count)]
    for cid in ids:
        world.add(cid)
    return ids


class Recorded:
    """Wraps the world's state store: each ``claim_due`` call's limit and how many refresh
    tokens the provider had been sent when it was made; ``fail_on`` makes that call (1-based)
    and every later one raise StoreUnavailable."""

    def __init__(self, world: World, fail_on: int | None = None) -> None:
        self.calls: list[tuple[int, int]] = []
        real = world.state.claim_due

        def claim_due(now: datetime, **kwargs: Any) -> ClaimBatch:
            self.calls.append((kwargs["limit"], world.server.requests["refresh_token"]))
            if fail_on is not None and len(self.calls) >= fail_on:
                raise StoreUnavailable("the state store went away")
            return real(now, **kwargs)

        world.state.claim_due = claim_due  # type: ignore[method-assign]


def test_refreshing_starts_after_the_first_claimed_chunk(world: World) -> None:
    ids = _many(world, 600)
    recorded = Recorded(world)
    refresher = world.refresher(concurrency=16, claim_chunk=100, read_chunk=50)
    summary = world.tick(refresher)
    assert summary.refreshed == summary.claimed == summary.due == len(ids)
    # Six full chunks, then one that finds nothing more.
    assert [limit for limit, _ in recorded.calls] == [100] * 7
    sent_before = [sent for _, sent in recorded.calls]
    assert sent_before[0] == 0
    # The feed runs at most a read chunk ahead of the workers, and claims one chunk ahead of
    # the feed: by the last claim most of the fleet had been sent (with one claim of it all,
    # nothing is sent before the whole claim).
    assert sent_before[-1] >= 600 - 100 - 50 - 16 - 50
    assert sent_before == sorted(sent_before)
    assert {r.state.current_version for r in world.state.list()} == {2}
    assert world.tick().due == 0


def test_a_tick_claims_in_chunks_no_further_than_its_limit(world: World) -> None:
    _many(world, 250)
    recorded = Recorded(world)
    refresher = world.refresher(claim_chunk=50)
    summary = world.tick(refresher, limit=120)
    assert [limit for limit, _ in recorded.calls] == [50, 50, 20]
    assert summary.refreshed == summary.claimed == 120
    assert world.tick().due == 130  # the rest still due, untouched


def test_a_later_chunk_the_store_cannot_claim_fails_the_tick_after_what_it_holds(
    world: World,
) -> None:
    ids = _many(world, 90)
    Recorded(world, fail_on=2)
    refresher = world.refresher(claim_chunk=30, store_retry=RetryPolicy(attempts=1))
    with pytest.raises(StoreUnavailable):
        world.tick(refresher)
    refreshed = [r.connection.id for r in world.state.list() if r.state.current_version == 2]
    assert sorted(refreshed) == ids[:30]  # the first chunk, refreshed and committed
    for cid in ids:
        token = world.secrets.get(cid).credential.refresh_token
        assert token is not None and world.server.grant_alive(token.reveal()), cid
    # The store is back (a fresh world view of the same stores): the rest is refreshed.
    del world.state.claim_due
    assert world.tick().refreshed == 60
    assert {r.state.current_version for r in world.state.list()} == {2}


def _stream(world: World, refresher: Refresher, summary: TickSummary) -> _ClaimStream:
    return _ClaimStream(
        refresher, world.clock.now(), named=None, cap=1000, shard=None, quota=None,
        summary=summary,
    )  # fmt: skip


def _keeper(world: World, refresher: Refresher, claims: list[Claim]) -> LeaseKeeper:
    return LeaseKeeper(
        claims,
        renew=refresher._renew,
        ttl=refresher.lease_ttl,
        clock=world.clock,
        asked_at=world.clock.monotonic(),
        log=refresher.log,
    )


@pytest.mark.parametrize("changed", [False, True], ids=["unchanged", "operator-wrote-meanwhile"])
def test_a_connection_claimed_again_in_one_tick_is_never_handed_out_twice(
    world: World, changed: bool
) -> None:
    """A pause longer than the lease while renewals could not get through: the first chunk's
    leases expire before their workers reach them, and the next claim (earliest due first)
    takes the same connections again. They are never handed out a second time. Unchanged
    since the first claim, the one attempt goes on under the newer lease; written meanwhile
    (an operator's state), the first claim is superseded -- its renewal fails, so it is
    presented under neither lease and the operator's write stands."""
    _many(world, 20)
    refresher = world.refresher(claim_chunk=10)
    summary = TickSummary()
    first_ten = [f"c{n:04d}" for n in range(10)]

    async def run() -> None:
        stream = _stream(world, refresher, summary)
        first = await stream.first()
        assert [c.lease.connection_id for c in first] == first_ten
        keeper = _keeper(world, refresher, first)
        world.clock.advance(refresher.lease_ttl.total_seconds() + 1)  # the pause
        if changed:
            record = world.state.get("c0000")
            world.state.put_state("c0000", replace(record.state, consecutive_failures=3))
            world.clock.advance(1)  # still due, free again: the operator's write freed it
        # Renewing before the claim (the tick's own) fails like the heartbeat did.
        keeper.renew_expiring = _nothing  # type: ignore[method-assign]
        second = await stream.more(keeper)
        assert [c.lease.connection_id for c in second] == [f"c{n:04d}" for n in range(10, 20)]
        renewed = await keeper.renew("c0000")
        if changed:
            assert renewed is None  # superseded: it will not be presented
            assert world.state.get("c0000").state.consecutive_failures == 3
        else:
            assert renewed is not None and renewed.token > first[0].lease.token
        for cid in first_ten[1:]:  # unchanged: adopted, held under the newer lease
            assert await keeper.renew(cid) is not None, cid
        assert await stream.more(keeper) == []  # nothing claimed a third time

    asyncio.run(run())
    assert summary.claimed == 20
    assert world.server.requests["refresh_token"] == 0


async def _nothing(*_: object) -> None:
    return None


def test_a_slow_tick_keeps_the_leases_of_what_it_claimed_ahead(world: World) -> None:
    """Claims wait for their workers longer than a lease when refreshing is slow (a slow
    provider, Retry-After waits): the tick must not lose them to its own next claim. Here every
    token request costs a second of the store's clock, at 4 in flight: ~75 s for the tick
    against a 30 s lease."""
    ids = _many(world, 300)

    class Slow:
        async def post_form(self, url: str, form: Any, *, headers: Any) -> Any:
            await asyncio.sleep(0)
            world.clock.advance(1.0)
            return await world.server.post_form(url, form, headers=headers)

    refresher = world.refresher(claim_chunk=100, read_chunk=20, concurrency=4)
    summary = asyncio.run(refresher.tick(Slow()))  # type: ignore[arg-type]
    assert (summary.refreshed, summary.lease_lost, summary.ok) == (len(ids), 0, True)
    assert world.server.requests["refresh_token"] == len(ids)


def _tasks_left() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]


@pytest.mark.parametrize("where", ["claim", "read"])
def test_a_bug_in_claiming_or_reading_ends_the_tick_and_leaves_no_task_behind(
    world: World, where: str
) -> None:
    """An exception nothing translated (an adapter's bug) in a later claim or in a read: the
    tick fails with an InternalError after what it holds; nothing is presented once it has
    returned, and none of its tasks outlives it. Nothing is lost: the next tick refreshes the
    rest."""
    ids = _many(world, 30)
    real_claim, real_read = world.state.claim_due, world.secrets.get_many
    calls = {"claim": 0, "read": 0}

    def claim_due(now: datetime, **kwargs: Any) -> ClaimBatch:
        calls["claim"] += 1
        if where == "claim" and calls["claim"] == 2:
            raise RuntimeError("a bug in the adapter")
        return real_claim(now, **kwargs)

    def get_many(connection_ids: Any, **kwargs: Any) -> Any:
        calls["read"] += 1
        if where == "read" and calls["read"] == 2:
            raise RuntimeError("a bug in the adapter")
        return real_read(connection_ids, **kwargs)

    world.state.claim_due = claim_due  # type: ignore[method-assign]
    world.secrets.get_many = get_many  # type: ignore[method-assign]
    refresher = world.refresher(claim_chunk=10, read_chunk=5, concurrency=2)

    async def run() -> None:
        with pytest.raises(InternalError):
            await asyncio.wait_for(refresher.tick(world.server), timeout=30)  # type: ignore[arg-type]
        sent = world.server.requests["refresh_token"]
        assert _tasks_left() == []
        await asyncio.sleep(0.05)
        assert world.server.requests["refresh_token"] == sent

    asyncio.run(run())
    del world.state.claim_due, world.secrets.get_many
    world.clock.advance(refresher.lease_ttl.total_seconds() + 1)
    world.tick()
    for cid in ids:
        token = world.secrets.get(cid).credential.refresh_token
        assert token is not None and world.server.grant_alive(token.reveal()), cid
    assert {r.state.current_version for r in world.state.list()} == {2}


def test_a_bug_in_the_feed_halts_the_tick_and_leaves_no_task_behind(world: World) -> None:
    """The backstop: should the feed itself raise, nothing more is presented or claimed, the
    workers finish (deferring what they still hold), and the bug is raised."""
    _many(world, 40)
    refresher = world.refresher(claim_chunk=10, read_chunk=5, concurrency=2)
    real = refresher._read
    reads = 0

    def read(claims: Any) -> Any:
        nonlocal reads
        reads += 1
        if reads == 3:
            raise RuntimeError("a bug in the feed")
        return real(claims)

    refresher._read = read  # type: ignore[method-assign]

    async def run() -> None:
        with pytest.raises(RuntimeError, match="a bug in the feed"):
            await asyncio.wait_for(refresher.tick(world.server), timeout=30)  # type: ignore[arg-type]
        sent = world.server.requests["refresh_token"]
        assert _tasks_left() == []
        await asyncio.sleep(0.05)
        assert world.server.requests["refresh_token"] == sent
        assert sent <= 10

    asyncio.run(run())


def test_a_later_chunk_the_quota_cannot_admit_fails_the_tick_after_what_it_holds(
    world: World,
) -> None:
    """The shared budget's document unreachable at a later chunk: like a failed claim, the
    chunk is given back and what is held is seen through; the tick then fails."""
    ids = _many(world, 60)
    quota = RequestQuota("test-quota", 1000, 1000, 0, 1)
    world.secrets.request_quota = lambda: quota  # type: ignore[method-assign]
    real = world.state.take_budget
    takes = 0

    def take_budget(key: str, **kwargs: Any) -> Any:
        nonlocal takes
        if key.startswith("test-quota"):
            takes += 1
            if takes >= 2:
                raise StoreUnavailable("the budget's document is unreachable")
        return real(key, **kwargs)

    world.state.take_budget = take_budget  # type: ignore[method-assign]
    refresher = world.refresher(claim_chunk=20, store_retry=RetryPolicy(attempts=1))
    with pytest.raises(StoreUnavailable):
        world.tick(refresher)
    refreshed = sorted(r.connection.id for r in world.state.list() if r.state.current_version == 2)
    assert refreshed == ids[:20]
    del world.state.take_budget
    assert world.tick(refresher).refreshed == 40  # given back: due, free, refreshed next
