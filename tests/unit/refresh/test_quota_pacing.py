"""Pacing the tick by the credential store's request quota (issue 13: Secret Manager's 600
reads and 600 writes per minute per project): never more refreshes started per window than
the quota carries, shared by every refresher on the store, earliest due first, the rest left
due -- deferred, never failed."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta

import pytest

from tokenbroker.adapters.fake_provider import FakeTokenServer
from tokenbroker.adapters.memory import MemoryEventBus, MemorySecretStore, MemoryStateStore
from tokenbroker.entrypoints.settings import Settings
from tokenbroker.kernel.clock import FakeClock
from tokenbroker.kernel.errors import ConfigError
from tokenbroker.kernel.metrics import REFRESH_OUTCOMES, Recorder
from tokenbroker.kernel.model import Connection, ConnectionStatus, Credential, GrantType
from tokenbroker.kernel.secret import Secret
from tokenbroker.oauth.profiles import load_profiles
from tokenbroker.ports import RequestQuota
from tokenbroker.refresh.fleet import record_tick
from tokenbroker.refresh.registry import ConnectionRegistry
from tokenbroker.refresh.tick import Refresher

#: 40 reads at 2 per refresh, 40 writes at 4: ten refreshes per minute.
QUOTA = RequestQuota(
    key="test-quota", reads_per_window=40, writes_per_window=40, reads_per_refresh=2,
    writes_per_refresh=4,
)  # fmt: skip


class QuotaSecretStore(MemorySecretStore):
    """The in-memory store, declaring a request quota as Secret Manager's adapter does."""

    def __init__(self, quota: RequestQuota) -> None:
        super().__init__()
        self.quota = quota

    def request_quota(self) -> RequestQuota:
        return self.quota


class World:
    def __init__(self, quota: RequestQuota = QUOTA) -> None:
        self.clock = FakeClock()
        self.secrets = QuotaSecretStore(quota)
        self.state = MemoryStateStore(self.clock)
        self.events = MemoryEventBus()
        self.profiles = load_profiles()
        self.server = FakeTokenServer()
        self.registry = ConnectionRegistry(
            secrets=self.secrets, state=self.state, profiles=self.profiles, clock=self.clock
        )
        self.order: list[str] = []

    def refresher(self, holder: str = "r1") -> Refresher:
        return Refresher(
            secrets=self.secrets, state=self.state, events=self.events, profiles=self.profiles,
            clock=self.clock, rng=random.Random(7), holder=holder,
        )  # fmt: skip

    def add(self, n: int) -> None:
        """``n`` connections, due one second apart (the first registered is due first)."""
        for _ in range(n):
            cid = f"c{len(self.order):03d}"
            self.registry.register(
                Connection(
                    id=cid, profile="generic", grant=GrantType.REFRESH_TOKEN,
                    client_id="client", token_url="https://idp.test/token",
                ),
                Credential(
                    refresh_token=Secret(self.server.seed_refresh_token()),
                    client_secret=Secret("client-secret"),
                ),
            )  # fmt: skip
            self.order.append(cid)
            self.clock.advance(1)

    def refreshed(self) -> list[str]:
        return [cid for cid in self.order if self.secrets.get(cid).version > 1]

    def tick(self, refresher: Refresher | None = None, **kw: object):  # type: ignore[no-untyped-def]
        return asyncio.run((refresher or self.refresher()).tick(self.server, **kw))  # type: ignore[arg-type]


@pytest.fixture
def world() -> World:
    return World()


def test_a_tick_starts_no_more_refreshes_than_the_quota_carries_earliest_due_first(
    world: World,
) -> None:
    world.add(25)
    summary = world.tick()
    assert summary.refreshed == 10 and summary.claimed == 10
    assert summary.quota_limited is True and summary.ok
    assert world.refreshed() == world.order[:10]
    assert sum(world.server.requests.values()) == 10
    for cid in world.order[10:]:  # deferred, not failed: still due, untouched
        state = world.state.get(cid).state
        assert state.status is ConnectionStatus.ACTIVE
        assert state.consecutive_failures == 0 and state.last_error is None
        assert state.next_refresh_at <= world.clock.now()


def test_the_window_spent_a_second_tick_starts_nothing_until_it_frees(world: World) -> None:
    world.add(25)
    world.tick()
    again = world.tick()
    assert again.refreshed == 0 and again.quota_deferred == 10 and again.ok
    assert sum(world.server.requests.values()) == 10
    world.clock.advance(61)
    later = world.tick()
    assert later.refreshed == 10
    assert world.refreshed() == world.order[:20]
    world.clock.advance(61)
    assert world.tick().refreshed == 5
    assert world.refreshed() == world.order


def test_refreshers_on_one_store_share_one_quota(world: World) -> None:
    """Two instances (two holders) in the same minute: ten refreshes between them, and the
    one that found the quota spent gave its leases back (claimable again at once)."""
    world.add(30)
    first = world.tick(world.refresher("instance-a"))
    second = world.tick(world.refresher("instance-b"))
    assert first.refreshed + second.refreshed == 10
    assert second.quota_deferred == 10
    released = [cid for cid in world.order if cid not in world.refreshed()]
    batch = world.state.claim(released, world.clock.now(), holder="x", ttl=timedelta(seconds=30))
    assert len(batch.claims) == len(released)  # no lease left held by instance-b


def test_what_others_spent_is_left_to_them_and_the_rest_admitted(world: World) -> None:
    world.add(10)
    world.state.take_budget(
        "test-quota:refreshes", limit=10, window=timedelta(minutes=1), now=world.clock.now(),
        cost=6,
    )  # fmt: skip
    summary = world.tick()
    assert summary.refreshed == 4 and summary.quota_deferred == 6
    assert world.refreshed() == world.order[:4]


def test_over_a_simulated_hour_no_window_carries_more_than_the_quota(world: World) -> None:
    """Twice the work the quota allows arrives over an hour; ticks every minute. In every
    minute at most ten refreshes start; none fails; the backlog is served in due order."""
    rng = random.Random(13)
    per_tick: list[int] = []
    served: list[str] = []
    for _ in range(60):
        world.add(rng.randint(10, 30))  # 20 a minute on average: twice the quota
        before = set(world.refreshed())
        summary = world.tick()
        per_tick.append(summary.refreshed)
        assert not summary.failed and summary.ok
        new = set(world.refreshed()) - before
        served += [cid for cid in world.order if cid in new]
        world.clock.advance(60)
    assert max(per_tick) <= 10 and sum(per_tick) >= 590  # the quota kept full, never beyond
    assert served == world.order[: len(served)]  # earliest due first, nothing jumped the queue


def test_naming_connections_spends_the_quota_too(world: World) -> None:
    world.add(12)
    summary = world.tick(connection_ids=world.order)
    assert summary.refreshed == 10 and summary.quota_deferred == 2


def test_a_store_without_a_quota_is_not_paced() -> None:
    world = World()
    world.secrets = MemorySecretStore()  # the port's default: no request quota
    world.registry = ConnectionRegistry(
        secrets=world.secrets, state=world.state, profiles=world.profiles, clock=world.clock
    )
    world.add(40)
    summary = world.tick()
    assert summary.refreshed == 40 and summary.quota_deferred == 0
    assert summary.quota_limited is False


def test_the_metrics_count_quota_deferrals(world: World) -> None:
    assert "quota_deferred" in REFRESH_OUTCOMES
    world.add(20)
    world.tick()
    summary = world.tick()
    recorder = Recorder(world.clock.now())
    record_tick(recorder, summary, ok=summary.ok)
    counted = {s.labels: s.value for s in recorder.snapshot(world.clock.now()).samples
               if s.metric.name == "refresh/outcomes"}  # fmt: skip
    assert counted[("quota_deferred",)] == 10
    assert summary.to_json()["quota_deferred"] == 10


def test_a_quota_smaller_than_one_refresh_still_lets_one_through_per_window() -> None:
    tiny = RequestQuota("k", reads_per_window=1, writes_per_window=3, reads_per_refresh=2,
                        writes_per_refresh=4)  # fmt: skip
    assert tiny.refreshes_per_window == 1
    huge = RequestQuota("k", 10**9, 10**9, 1, 1)
    assert huge.refreshes_per_window == 10_000  # what one budget can count


def test_secret_managers_default_quota_is_the_documented_one() -> None:
    from tokenbroker.adapters.gcp.secret_manager import SecretManagerSecretStore

    quota = SecretManagerSecretStore(object(), project="p").request_quota()
    assert (quota.reads_per_window, quota.writes_per_window) == (600, 600)
    assert quota.window == timedelta(minutes=1)
    assert quota.refreshes_per_window == 150  # 600 writes / 4 per refresh
    assert quota.key.endswith("projects/p")  # one count per project, whatever the prefix


def test_a_quota_a_refresh_does_not_use_does_not_limit_it() -> None:
    """The pointer protocol sends no read request: a small read quota must not cap it (it
    did, as if each refresh cost one read: min(reads, writes / 2))."""
    from tokenbroker.adapters.gcp.secret_manager_pointed import PointedSecretManagerStore
    from tokenbroker.adapters.memory import MemoryVersionPointers

    no_reads = RequestQuota("k", reads_per_window=5, writes_per_window=600, reads_per_refresh=0,
                            writes_per_refresh=2)  # fmt: skip
    assert no_reads.refreshes_per_window == 300
    pointed = PointedSecretManagerStore(
        object(), project="p", pointers=MemoryVersionPointers(), reads_per_minute=100,
        writes_per_minute=3000,
    )  # fmt: skip
    assert pointed.request_quota().refreshes_per_window == 1500  # 3000 writes / 2
    nothing = RequestQuota("k", 600, 600, 0, 0)
    assert nothing.refreshes_per_window == 10_000  # no limit but what one budget can count


@pytest.mark.parametrize("value", ["0", "-5", "1e9", "nan", "many", "100001"])
def test_a_bad_quota_setting_names_its_variable(value: str) -> None:
    variable = "TOKENBROKER_SECRET_MANAGER_WRITES_PER_MINUTE"
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({variable: value})


def test_quota_settings_reach_the_adapter() -> None:
    settings = Settings.from_env(
        {
            "TOKENBROKER_SECRET_MANAGER_READS_PER_MINUTE": "1200",
            "TOKENBROKER_SECRET_MANAGER_WRITES_PER_MINUTE": "2000",
        }
    )
    assert settings.secret_manager_reads_per_minute == 1200
    assert settings.secret_manager_writes_per_minute == 2000
