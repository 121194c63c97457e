"""Quota pacing over a simulated hour: twice the work Secret Manager's quota allows.

The refresher (the real ``Refresher`` tick, once a minute on an injected clock) runs over the
in-memory stores; the secret store declares a request quota like Secret Manager's adapter
(``--writes-per-minute``, 4 writes and 2 reads per refresh) and *enforces* it as the API does:
a stage beyond the writes a sliding minute allows is refused with ``RESOURCE_EXHAUSTED``
(counted). Connections arrive through the hour at twice the rate the quota carries (their
one-hour tokens come due again at half-life, adding to the load); the provider is the strict
fake (rotating refresh tokens, reuse revokes the grant).

Figures: refreshes, the quota's capacity over the hour (the floor this run is measured
against: ``ratio`` = refreshes / capacity), ``resource_exhausted`` (goal 0), connections whose
access token expired while the minute before had unspent quota (``expired_savable``, goal 0:
the budget could have saved them), refreshes that jumped the queue (``order_inversions``: a
connection refreshed in a tick while one due earlier waited; goal 0), and the largest number
of refreshes started in any minute (never above the quota). Exit 1 when a goal is missed.

``--no-pacing`` runs the same hour with the quota enforced but not declared (today's tick
before pacing): ``RESOURCE_EXHAUSTED`` answers and halted ticks, the failure this guards
against (with rotating refresh tokens, connections lost to ``needs_reauth``:
``connections_lost``). ``ticks_halted``, ``refreshes_failed`` and ``connections_lost`` must
be 0 too.

Usage: ``.venv/bin/python bench/quota_pacing.py [--writes-per-minute 40] [--minutes 60]
[--no-pacing]`` (about a second).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from collections import deque
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shared"))

from tokenbroker.adapters.fake_provider import FakeTokenServer
from tokenbroker.adapters.memory import (
    MemoryEventBus,
    MemorySecretStore,
    MemoryStateStore,
)
from tokenbroker.entrypoints.compose import start_logging
from tokenbroker.kernel.clock import FakeClock
from tokenbroker.kernel.errors import StoreUnavailable
from tokenbroker.kernel.model import Connection, ConnectionStatus, Credential, GrantType
from tokenbroker.kernel.retry import RetryPolicy
from tokenbroker.kernel.secret import Secret
from tokenbroker.oauth.profiles import load_profiles
from tokenbroker.ports import RequestQuota, SecretWrite
from tokenbroker.refresh.registry import ConnectionRegistry
from tokenbroker.refresh.tick import Refresher

WRITES_PER_REFRESH = 4
READS_PER_REFRESH = 2


class QuotaEnforcingStore(MemorySecretStore):
    """The in-memory store with Secret Manager's quota, declared and enforced: each stage
    (one refresh's writes) beyond what a sliding minute allows is refused, as the API refuses
    with RESOURCE_EXHAUSTED."""

    def __init__(self, clock: FakeClock, writes_per_minute: int, *, paced: bool = True) -> None:
        super().__init__()
        self.paced = paced
        self.clock = clock
        self.writes_per_minute = writes_per_minute
        self.spent: deque[tuple[datetime, int]] = deque()
        self.exhausted = 0

    def request_quota(self) -> RequestQuota | None:  # type: ignore[override]
        if not self.paced:  # --no-pacing: the quota enforced, not declared
            return None
        return RequestQuota(
            key="bench-project",
            reads_per_window=self.writes_per_minute,
            writes_per_window=self.writes_per_minute,
            reads_per_refresh=READS_PER_REFRESH,
            writes_per_refresh=WRITES_PER_REFRESH,
        )

    def stage(self, writes: Sequence[SecretWrite]) -> list[int | StoreUnavailable]:  # type: ignore[override]
        now = self.clock.now()
        while self.spent and self.spent[0][0] <= now - timedelta(minutes=1):
            self.spent.popleft()
        used = sum(n for _, n in self.spent)
        if used + WRITES_PER_REFRESH * len(writes) > self.writes_per_minute:
            self.exhausted += 1
            raise StoreUnavailable("add secret version: RESOURCE_EXHAUSTED")
        self.spent.append((now, WRITES_PER_REFRESH * len(writes)))
        return super().stage(writes)  # type: ignore[return-value]


def run(args: argparse.Namespace) -> dict[str, object]:
    clock = FakeClock()
    secrets = QuotaEnforcingStore(clock, args.writes_per_minute, paced=args.pacing)
    state = MemoryStateStore(clock)
    server = FakeTokenServer(lifetime=3600)
    profiles = load_profiles()
    registry = ConnectionRegistry(secrets=secrets, state=state, profiles=profiles, clock=clock)
    refresher = Refresher(
        secrets=secrets, state=state, events=MemoryEventBus(), profiles=profiles, clock=clock,
        rng=random.Random(5), store_retry=RetryPolicy(attempts=1),
        answer_retry=RetryPolicy(attempts=1),
    )  # fmt: skip
    per_minute = RequestQuota(
        "k", args.writes_per_minute, args.writes_per_minute, READS_PER_REFRESH, WRITES_PER_REFRESH
    ).refreshes_per_window
    rng = random.Random(args.seed)
    count = 0
    max_started = inversions = expired_savable = refreshed = failed = halted = 0
    started_at = clock.now()
    for _ in range(args.minutes):
        # New connections at twice the quota's rate on average.
        for _ in range(rng.randint(per_minute, 3 * per_minute)):
            registry.register(
                Connection(
                    id=f"c{count:05d}", profile="generic", grant=GrantType.REFRESH_TOKEN,
                    client_id="client", token_url="https://idp.bench/token",  # noqa: S106
                ),
                Credential(
                    refresh_token=Secret(server.seed_refresh_token()),
                    client_secret=Secret("client-secret"),
                    access_token=Secret("initial"),
                    expires_at=clock.now() + timedelta(minutes=rng.randint(20, 60)),
                ),
            )  # fmt: skip
            count += 1
        now = clock.now()
        before = {r.connection.id: r.state for r in state.list()}
        try:
            summary = asyncio.run(refresher.tick(server))
            failed += sum(summary.failed.values())
        except StoreUnavailable:  # the tick halted: results it could not store
            halted += 1
        after = {r.connection.id: r.state for r in state.list()}
        done = [cid for cid in before if after[cid].last_refresh_at != before[cid].last_refresh_at]
        refreshed += len(done)
        max_started = max(max_started, len(done))
        waiting = [
            s.next_refresh_at
            for s in after.values()
            if s.next_refresh_at is not None and s.next_refresh_at <= now
        ]
        latest_done = max((before[c].next_refresh_at for c in done), default=None)
        if latest_done is not None:
            inversions += sum(1 for due in waiting if due < latest_done)
        spare = len(done) < per_minute
        expired_savable += sum(
            1
            for c, s in after.items()
            if spare and s.expires_at is not None and s.expires_at <= now and c not in done
        )
        clock.advance(60)
    capacity = per_minute * args.minutes
    return {
        "minutes": args.minutes,
        "connections": count,
        "writes_per_minute": args.writes_per_minute,
        "refreshes_per_minute_allowed": per_minute,
        "refreshes": refreshed,
        "capacity_floor": capacity,
        "ratio": round(refreshed / capacity, 3),
        "max_started_in_a_minute": max_started,
        "resource_exhausted": secrets.exhausted,
        "ticks_halted": halted,
        "refreshes_failed": failed,
        "paced": args.pacing,
        "expired_savable": expired_savable,
        "order_inversions": inversions,
        "connections_lost": sum(
            r.state.status is ConnectionStatus.NEEDS_REAUTH for r in state.list()
        ),
        "simulated_seconds": (clock.now() - started_at).total_seconds(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes-per-minute", type=int, default=40)
    parser.add_argument("--minutes", type=int, default=60)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument(
        "--no-pacing",
        dest="pacing",
        action="store_false",
        help="the store does not declare its quota (the bench then shows what pacing prevents)",
    )
    args = parser.parse_args()
    start_logging(level="critical")
    figures = run(args)
    goals = (
        figures["resource_exhausted"] == 0
        and figures["ticks_halted"] == 0
        and figures["refreshes_failed"] == 0
        and figures["connections_lost"] == 0
        and figures["expired_savable"] == 0
        and figures["order_inversions"] == 0
        and figures["max_started_in_a_minute"] <= figures["refreshes_per_minute_allowed"]  # type: ignore[operator]
    )
    figures["goals_met"] = goals
    print(json.dumps(figures))
    return 0 if goals else 1


if __name__ == "__main__":
    raise SystemExit(main())
