"""The tick claims as it goes (issue 13, "a pipelined tick": refreshing starts after the first
claimed chunk): the due set is claimed ``claim_chunk`` at a time, the next chunk while the
current one is refreshed, so no refresh waits for the whole claim and no lease waits long for
its worker. What must still hold: each connection refreshed once, the limit and the quota
kept, a store that fails mid-claim halts the tick without losing anything, and a connection
claimed a second time in one tick is never presented twice."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import pytest

from tests.unit.refresh.test_tick import World
from tokenbroker.kernel.errors import StoreUnavailable
from tokenbroker.kernel.retry import RetryPolicy
from tokenbroker.ports import ClaimBatch
from tokenbroker.refresh.leases import LeaseKeeper
from tokenbroker.refresh.tick import TickSummary, _ClaimStream


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


def test_a_connection_claimed_again_in_one_tick_is_never_handed_out_twice(world: World) -> None:
    """A pause longer than the lease: the first chunk's leases expire before their workers
    reach them, and the next claim (earliest due first) takes the same connections again.
    They are not handed out a second time; the first claims can no longer renew (superseded),
    so none of them is presented under either lease; and the second leases are kept, so no
    later chunk takes them a third time."""
    _many(world, 20)
    refresher = world.refresher(claim_chunk=10)
    summary = TickSummary()

    async def run() -> None:
        now = world.clock.now()
        stream = _ClaimStream(
            refresher, now, named=None, cap=1000, shard=None, quota=None, summary=summary
        )
        first = await stream.first()
        assert [c.lease.connection_id for c in first] == [f"c{n:04d}" for n in range(10)]
        keeper = LeaseKeeper(
            first,
            renew=refresher._renew,
            ttl=refresher.lease_ttl,
            clock=world.clock,
            asked_at=world.clock.monotonic(),
            log=refresher.log,
        )
        world.clock.advance(refresher.lease_ttl.total_seconds() + 1)  # the pause
        second = await stream.more(keeper)
        assert [c.lease.connection_id for c in second] == [f"c{n:04d}" for n in range(10, 20)]
        assert await keeper.renew("c0000") is None  # superseded: it will not be presented
        assert await stream.more(keeper) == []  # nothing claimed a third time
        other = world.state.claim_due(now, holder="other", ttl=timedelta(seconds=30), limit=99)
        assert other.claims == []  # the kept leases are live: nobody else takes them either

    asyncio.run(run())
    assert summary.claimed == 20
    assert world.server.requests["refresh_token"] == 0
