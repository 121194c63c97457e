"""Failure isolation and "status is law" (issue 8, items 1 and 5).

Whatever happens to one connection -- a bug that raises anything, a credential that does not
decrypt -- stays with that connection: it gets its own failure class, its lease back and one
event, and the tick commits everything else. disabled and needs_reauth connections are never
refreshed by any path, and an operator's action during a refresh is never undone by the
refresh's commit.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from tests.unit.refresh.test_tick import World
from tokenbroker.adapters.embedded import EmbeddedDatabase, EmbeddedSecretStore, EmbeddedStateStore
from tokenbroker.adapters.fake_provider import FakeTokenServer
from tokenbroker.adapters.memory import MemoryEventBus
from tokenbroker.kernel.errors import CorruptCredential
from tokenbroker.kernel.http import HttpResponse
from tokenbroker.kernel.log import capture_logs
from tokenbroker.kernel.model import ConnectionStatus, EventType, GrantType
from tokenbroker.oauth.profiles import ProviderProfile
from tokenbroker.refresh.registry import ConnectionRegistry


class Bugged:
    """A token endpoint in front of the fake server: for the refresh tokens in ``faults``, it
    runs the fault instead (raise anything, or act as an operator mid-flight) before or
    instead of the real answer."""

    def __init__(self, server: FakeTokenServer) -> None:
        self.server = server
        self.faults: dict[str, Callable[[], HttpResponse | None]] = {}

    async def post_form(
        self, url: str, form: Mapping[str, str], *, headers: Mapping[str, str]
    ) -> HttpResponse:
        fault = self.faults.pop(form.get("refresh_token", ""), None)
        if fault is not None:
            answer = fault()
            if answer is not None:
                return answer
        return await self.server.post_form(url, form, headers=headers)


def _raise(error: BaseException) -> Callable[[], HttpResponse | None]:
    def run() -> HttpResponse | None:
        raise error

    return run


def _tick(world: World, endpoint: Bugged, **kw: object):  # type: ignore[no-untyped-def]
    return asyncio.run(world.refresher(**kw).tick(endpoint))  # type: ignore[arg-type]


# --- failure isolation ---------------------------------------------------------------------


@pytest.mark.parametrize("bug", [ValueError("bad"), OverflowError("big"), KeyError("k")])
def test_a_bug_in_one_refresh_is_contained_to_that_connection(world: World, bug: Exception) -> None:
    tokens = {f"c{n}": world.add(f"c{n}") for n in range(5)}
    endpoint = Bugged(world.server)
    endpoint.faults[tokens["c2"]] = _raise(bug)
    with capture_logs() as logs:
        summary = _tick(world, endpoint)
    assert summary.refreshed == 4
    assert summary.failed["internal"] == 1
    assert summary.needs_reauth == 0
    assert not summary.ok  # a bug is never a quiet success
    for cid in ("c0", "c1", "c3", "c4"):
        assert world.secrets.get(cid).version == 2
    state = world.state.get("c2").state
    assert state.status is ConnectionStatus.ACTIVE  # never needs_reauth for our own bug
    assert state.last_error == "internal_error"
    assert state.consecutive_failures == 1
    assert state.next_refresh_at is not None and state.next_refresh_at > world.clock.now()
    assert world.secrets.get("c2").version == 1
    # Its lease was given back: another holder may take it at once.
    assert len(world.state.claim(["c2"], world.clock.now(), holder="x", ttl=timedelta(1)).claims)
    failures = [e for e in world.events.events if e.connection_id == "c2"]
    assert [(e.type, e.failure_class, e.error_code) for e in failures] == [
        (EventType.REFRESH_FAILED, "internal", "internal_error")
    ]
    # Alerted: an error line with the traceback, naming the connection.
    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    alerts = [
        line for line in lines if line["severity"] == "ERROR" and line.get("connection_id") == "c2"
    ]
    assert alerts
    assert any(type(bug).__name__ in line.get("exception", "") for line in alerts)


def test_an_internal_error_is_retried_with_backoff_on_later_ticks(world: World) -> None:
    rt = world.add("c1")
    endpoint = Bugged(world.server)
    endpoint.faults[rt] = _raise(RuntimeError("bug"))
    _tick(world, endpoint)
    first = world.state.get("c1").state
    assert first.next_refresh_at is not None
    assert _tick(world, endpoint).due == 0  # backing off, not hammering
    world.clock.advance((first.next_refresh_at - world.clock.now()).total_seconds() + 1)
    summary = _tick(world, endpoint)  # the bug is gone: the same refresh token still works
    assert summary.refreshed == 1
    assert summary.recovered == 1
    assert world.secrets.get("c1").version == 2


def test_an_overflowing_lifetime_is_contained(world: World) -> None:
    """A provider answer whose lifetime overflows the datetime arithmetic (a profile's huge
    default lifetime, an answer without ``expires_in``) fails that connection only."""
    world.profiles = {
        **world.profiles,
        "huge": ProviderProfile(
            name="huge", grants=(GrantType.REFRESH_TOKEN,), default_lifetime_seconds=10**12
        ),
    }
    world.registry.profiles = world.profiles
    world.add("ok")
    bad = world.add("bad")
    record = world.state.get("bad")
    world.state.delete("bad")
    world.state.create(replace(record.connection, profile="huge"), record.state)
    endpoint = Bugged(world.server)
    endpoint.faults[bad] = lambda: HttpResponse(
        200, json.dumps({"access_token": "at-x", "token_type": "Bearer"}).encode()
    )
    summary = _tick(world, endpoint)
    assert summary.refreshed == 1
    assert summary.failed["internal"] == 1
    assert world.secrets.get("ok").version == 2
    assert world.state.get("bad").state.last_error == "internal_error"


class EmbeddedWorld(World):
    """The same world on the embedded stores (SQLite + AES-GCM): a real undecryptable row."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.db = EmbeddedDatabase(directory)
        self.secrets = EmbeddedSecretStore(self.db)  # type: ignore[assignment]
        self.state = EmbeddedStateStore(self.db)  # type: ignore[assignment]
        self.events = MemoryEventBus()
        self.registry = ConnectionRegistry(
            secrets=self.secrets, state=self.state, profiles=self.profiles, clock=self.clock
        )


def test_one_undecryptable_credential_fails_only_its_connection(tmp_path: Path) -> None:
    world = EmbeddedWorld(tmp_path)
    try:
        for n in range(20):
            world.add(f"c{n:02d}")
        with sqlite3.connect(tmp_path / "tokenbroker.db") as raw:
            (sealed,) = raw.execute(
                "SELECT sealed FROM secret_versions WHERE connection_id = 'c07'"
            ).fetchone()
            raw.execute(
                "UPDATE secret_versions SET sealed = ? WHERE connection_id = 'c07'",
                (sealed[:-1] + bytes([sealed[-1] ^ 1]),),
            )
        read = world.secrets.get_many([f"c{n:02d}" for n in range(20)])
        assert isinstance(read["c07"], CorruptCredential)
        summary = world.tick()
        assert summary.refreshed == 19
        assert summary.failed["permanent"] == 1
        state = world.state.get("c07").state
        assert state.status is ConnectionStatus.NEEDS_REAUTH
        assert state.last_error == "corrupt_credential"
        assert world.server.requests["refresh_token"] == 19  # nothing sent for the bad one
    finally:
        world.db.close()


# --- status is law -------------------------------------------------------------------------


@pytest.mark.parametrize("status", [ConnectionStatus.DISABLED, ConnectionStatus.NEEDS_REAUTH])
def test_a_named_refresh_never_touches_an_inactive_connection(
    world: World, status: ConnectionStatus
) -> None:
    world.add("c1")
    world.add("c2")
    record = world.state.get("c1")
    world.state.put_state("c1", replace(record.state, status=status))
    events_before = list(world.events.events)
    summary = world.tick(connection_ids=["c1", "c2"])
    assert summary.refreshed == 1
    assert summary.inactive == {"c1": status.value}
    assert world.server.requests["refresh_token"] == 1  # only c2's
    assert world.state.get("c1").state.status is status
    assert world.secrets.get("c1").version == 1
    assert [e.connection_id for e in world.events.events[len(events_before) :]] == ["c2"]


def test_needs_reauth_is_announced_once_however_often_it_is_named(world: World) -> None:
    rt = world.add()
    world.server.revoke(rt)
    world.tick()
    for _ in range(3):
        summary = world.tick(connection_ids=["c1"])
        assert summary.inactive == {"c1": "needs_reauth"}
    assert world.server.requests["refresh_token"] == 1  # the dead token was sent once
    assert [e.type for e in world.events.events] == [EventType.NEEDS_REAUTH]
    assert world.state.get("c1").state.consecutive_failures == 1


def test_disable_during_a_refresh_is_not_undone_by_its_commit(world: World) -> None:
    rt = world.add("c1")
    endpoint = Bugged(world.server)

    def operator_disables() -> None:
        world.registry.set_enabled("c1", False)

    endpoint.faults[rt] = operator_disables  # type: ignore[assignment]
    summary = _tick(world, endpoint)
    assert world.state.get("c1").state.status is ConnectionStatus.DISABLED
    assert summary.lease_lost == 1
    assert summary.refreshed == 0
    # The provider's answer is not thrown away: the rotated refresh token is kept.
    stored = world.secrets.get("c1").credential
    assert stored.refresh_token is not None
    assert world.server.grant_alive(stored.refresh_token.reveal())
    world.registry.set_enabled("c1", True)
    assert world.tick().refreshed == 1  # and it works once enabled again


def test_reauth_during_a_refresh_wins_over_the_refresh(world: World) -> None:
    from tokenbroker.kernel.secret import Secret

    rt = world.add("c1")
    fresh = world.server.seed_refresh_token()
    endpoint = Bugged(world.server)

    def operator_reauthorises() -> None:
        world.registry.reauthorize("c1", refresh_token=Secret(fresh))

    endpoint.faults[rt] = operator_reauthorises  # type: ignore[assignment]
    _tick(world, endpoint)
    stored = world.secrets.get("c1")
    assert stored.credential.refresh_token == Secret(fresh)
    assert world.state.get("c1").state.current_version == stored.version
    assert world.state.get("c1").state.status is ConnectionStatus.ACTIVE


def test_remove_during_a_refresh_is_not_undone(world: World) -> None:
    rt = world.add("c1")
    endpoint = Bugged(world.server)

    def operator_removes() -> None:
        world.registry.remove("c1")

    endpoint.faults[rt] = operator_removes  # type: ignore[assignment]
    _tick(world, endpoint)
    assert world.state.list() == []
    assert world.secrets.versions("c1") == []


def test_a_version_the_store_refuses_fails_that_connection_only(world: World) -> None:
    """AWS refuses a burnt version id, or its version quota is exhausted, after the provider
    consumed the token (issue 8: one such error failed the whole batch). It is that
    connection's failure, announced; the others are committed."""
    from tokenbroker.kernel.errors import CorruptCredential as Refused

    for n in range(4):
        world.add(f"c{n}")
    inner = world.secrets

    class Refusing:
        def __getattr__(self, name: str) -> object:
            return getattr(inner, name)

        def stage(self, writes: list) -> list:  # type: ignore[type-arg]
            keep = [w for w in writes if w.connection_id != "c2"]
            done = iter(inner.stage(keep))
            return [
                Refused("version refused") if w.connection_id == "c2" else next(done)
                for w in writes
            ]

    world.secrets = Refusing()  # type: ignore[assignment]
    summary = world.tick()
    assert summary.refreshed == 3
    assert summary.failed["permanent"] == 1
    assert world.state.get("c2").state.last_error == "corrupt_credential"
    assert [e.type for e in world.events.events if e.connection_id == "c2"] == [
        EventType.NEEDS_REAUTH
    ]
