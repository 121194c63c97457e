"""Lease discipline for one tick: renew before every attempt, heartbeat while in flight.

A refresh token may only be presented by the holder of the connection's lease, with at least
the guard left, so that no other refresher can take the lease over -- and present the same
rotating refresh token -- while the request is on the wire. Three rules make that hold:

* **Lease time is the store's.** Grants and renewals run on the state store's clock
  (:class:`~tokenbroker.ports.StateStore`); this process only measures how much of a lease
  is left on its own *monotonic* clock, from the moment it asked: the store starts ``ttl`` no
  earlier than the request, so ``asked + ttl`` is a deadline that can only be early. A step of
  anyone's wall clock changes neither.
* **Renew before every attempt**, retries included: a retry that waited out a
  ``Retry-After`` must not find that someone else took the lease meanwhile. The renewal is
  fenced (the store answers ``None`` once the lease was taken over, completed, or retired by an
  operator), and "lost" is never confused with "the store cannot answer" (an exception, which
  halts presenting: that is an outage to alert on, not a connection to skip).
* **Heartbeat while in flight.** Leases are short (seconds, not minutes) so that a crashed
  holder's leases come free quickly; a holder keeps the ones it is using alive by renewing them
  every ``ttl / 3`` until their outcome is committed.

Renewals of many workers released at once are grouped into one store call (one transaction),
as a database groups commits: :class:`GroupCall`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Generic, TypeVar

from tokenbroker.kernel.clock import Clock
from tokenbroker.kernel.errors import TokenBrokerError
from tokenbroker.kernel.log import Logger
from tokenbroker.kernel.model import Claim, ConnectionRecord, Intent, Lease

__all__ = ["GroupCall", "LeaseKeeper"]

I = TypeVar("I")  # noqa: E741 - the item type, as in the typing docs
R = TypeVar("R")


class GroupCall(Generic[I, R]):
    """Many callers' items, one call: whoever submits while a call runs waits for the next
    one, which takes everything that queued up meanwhile (group commit). ``call`` returns one
    result per item, in order; its exception is every waiting caller's."""

    def __init__(self, call: Callable[[list[I]], Awaitable[list[R]]], *, limit: int = 500) -> None:
        self._call = call
        self._limit = limit
        self._queue: list[tuple[I, asyncio.Future[R]]] = []
        self._runner: asyncio.Task[None] | None = None

    async def submit(self, item: I) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        await asyncio.sleep(0)  # let the callers released at the same moment join this call
        while self._queue:
            batch, self._queue = self._queue[: self._limit], self._queue[self._limit :]
            try:
                results = await self._call([item for item, _ in batch])
            except asyncio.CancelledError:
                for _, future in batch:
                    future.cancel()
                raise
            except BaseException as error:  # handed to every caller waiting on it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                if not isinstance(error, Exception):
                    raise  # the process is going down: let it
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)


class LeaseKeeper:
    """The leases one tick holds: each one's deadline on this process's monotonic clock,
    fenced renewals (grouped), and the heartbeat of those in flight."""

    def __init__(
        self,
        claims: Sequence[Claim],
        *,
        renew: Callable[[list[tuple[Lease, Intent | None]]], Awaitable[list[Lease | None]]],
        ttl: timedelta,
        clock: Clock,
        asked_at: float,
        log: Logger,
    ) -> None:
        self._renew = renew
        self._ttl = ttl.total_seconds()
        self._clock = clock
        self._log = log
        self._held: dict[str, Lease] = {c.lease.connection_id: c.lease for c in claims}
        #: The record each lease was claimed with (``adopt`` compares against it).
        self._records: dict[str, ConnectionRecord] = {
            c.lease.connection_id: c.record for c in claims
        }
        self._deadline: dict[str, float] = dict.fromkeys(self._held, asked_at + self._ttl)
        self._lost: set[str] = set()
        #: Connections whose request is on the wire or whose outcome is not committed yet.
        self.in_flight: set[str] = set()
        #: Connections claimed by this tick whose outcome is not committed yet (a superset of
        #: ``in_flight``): the heartbeat keeps them all alive, so a claim waiting for its
        #: worker (the tick claims a chunk ahead) does not expire and get taken meanwhile.
        self.pending: set[str] = set(self._held)
        self._group: GroupCall[tuple[Lease, Intent | None], Lease | None] = GroupCall(self._renew)

    def holds(self, connection_id: str) -> bool:
        """Whether this tick took the connection's lease already (held or lost since)."""
        return connection_id in self._held

    def add(self, claims: Sequence[Claim], *, asked_at: float) -> None:
        """Hold the leases of a later claim too (a tick claims in chunks as it goes), each one's
        deadline measured from when that claim was asked for. A connection this tick took
        already is refused: replacing its lease would let its first claim present under the
        new one (see :meth:`holds`)."""
        again = [c.lease.connection_id for c in claims if c.lease.connection_id in self._held]
        if again:
            raise ValueError(f"leases taken twice in one tick: {again}")
        for claim in claims:
            self._held[claim.lease.connection_id] = claim.lease
            self._records[claim.lease.connection_id] = claim.record
            self._deadline[claim.lease.connection_id] = asked_at + self._ttl
            self.pending.add(claim.lease.connection_id)

    def adopt(self, claim: Claim, *, asked_at: float) -> bool:
        """Take a later claim of a connection this tick holds as that connection's lease, if
        its outcome is not committed yet and its record is exactly the one first claimed
        (nothing was written since: no operator's state, no intent, no other holder's
        commit). Its first lease expired -- a claim that waited past it while renewals could
        not get through -- and this tick's own claim took it back: the one attempt goes on
        under the newer lease. Otherwise (``False``) the first claim keeps its superseded
        lease, whose renewal fails: it is presented under neither."""
        cid = claim.lease.connection_id
        if cid not in self.pending or self._records.get(cid) != claim.record:
            return False
        self._held[cid] = claim.lease
        self._deadline[cid] = asked_at + self._ttl
        self._lost.discard(cid)
        return True

    def lease(self, connection_id: str) -> Lease:
        """The newest lease held on the connection (the claim's, or its latest renewal)."""
        return self._held[connection_id]

    def left(self, connection_id: str) -> float:
        """Seconds of the lease surely left (never more than the store would say)."""
        if connection_id in self._lost:
            return 0.0
        return self._deadline[connection_id] - self._clock.monotonic()

    def lost(self, connection_id: str) -> bool:
        return connection_id in self._lost

    async def renew(self, connection_id: str, intent: Intent | None = None) -> Lease | None:
        """Renew the connection's lease now (grouped with the other workers' renewals),
        recording ``intent`` in the same fenced write when given. ``None``: it was lost.
        Raises what the store raised when it could not answer."""
        if connection_id in self._lost:
            return None
        asked = self._clock.monotonic()
        lease = await self._group.submit((self._held[connection_id], intent))
        self._record(connection_id, lease, asked)
        return lease

    def _record(self, connection_id: str, lease: Lease | None, asked: float) -> None:
        if lease is None:
            self._lost.add(connection_id)
            return
        self._held[connection_id] = lease
        self._deadline[connection_id] = max(self._deadline[connection_id], asked + self._ttl)

    async def heartbeat(self, every: float) -> None:
        """Renew the leases in flight or pending every ``every`` seconds of real time, until
        cancelled.
        A failed renewal is logged and left: the deadline stays where it was, so the guard
        before the next attempt sees the time really left."""
        while True:
            await asyncio.sleep(every)
            await self._renew_held(self.in_flight | self.pending, why="lease heartbeat failed")

    async def renew_expiring(self, within: float) -> None:
        """Renew now the pending leases with less than ``within`` seconds left (one grouped
        call; none when none is): what the tick does before it claims its next chunk, so its
        own claim never takes back a lease of its own that is about to expire."""
        await self._renew_held(
            {c for c in self.pending if self.left(c) < within}, why="lease renewal failed"
        )

    async def _renew_held(self, connection_ids: set[str], *, why: str) -> None:
        cids = sorted(c for c in connection_ids if c not in self._lost)
        if not cids:
            return
        asked = self._clock.monotonic()
        try:
            renewed = await self._renew([(self._held[c], None) for c in cids])
        except TokenBrokerError as error:
            self._log.warning(why, error_code=error.code, leases=len(cids))
            return
        for cid, lease in zip(cids, renewed, strict=True):
            # Committed meanwhile (the commit released the lease): not a loss.
            if lease is None and cid not in self._lost and cid in self.in_flight:
                self._log.warning("lease lost while in flight", connection_id=cid)
            self._record(cid, lease, asked)

    @contextlib.asynccontextmanager
    async def beating(self, every: float) -> AsyncIterator[LeaseKeeper]:
        """The heartbeat as a background task for the duration of the block."""
        task = asyncio.create_task(self.heartbeat(every))
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
