"""Registering and removing a connection touch two stores (secret, then state, or the reverse).

A failure between the two writes must be compensated, and a crash between them (nothing runs
after it) must leave something ``add`` or ``remove`` can clear: never a secret that no command can
reach. Each write is faulted in turn, with an ordinary error and with a crash.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest

from tokenbroker.adapters.memory import MemorySecretStore, MemoryStateStore
from tokenbroker.kernel.clock import FakeClock
from tokenbroker.kernel.errors import AlreadyExists, NotFound, StoreUnavailable
from tokenbroker.kernel.model import (
    ClientAuthMethod,
    Connection,
    ConnectionStatus,
    Credential,
    GrantType,
)
from tokenbroker.kernel.secret import Secret
from tokenbroker.oauth.profiles import load_profiles
from tokenbroker.refresh.registry import ConnectionRegistry

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Crash(BaseException):
    """Stands for SIGKILL: nothing after it runs, no ``except Exception`` sees it."""


@dataclass
class Faults:
    """Fails the n-th call of a named store method, once."""

    plan: dict[str, BaseException] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)

    def check(self, name: str) -> None:
        self.calls.append(name)
        error = self.plan.pop(name, None)
        if error is not None:
            raise error


class FaultySecrets(MemorySecretStore):
    def __init__(self, faults: Faults) -> None:
        super().__init__(3)
        self.faults = faults

    def put(self, connection_id: str, credential: Credential, **kw: Any) -> int:
        self.faults.check("secrets.put")
        return super().put(connection_id, credential, **kw)

    def delete(self, connection_id: str) -> None:
        self.faults.check("secrets.delete")
        super().delete(connection_id)


class FaultyState(MemoryStateStore):
    def __init__(self, faults: Faults) -> None:
        super().__init__()
        self.faults = faults

    def create(self, *args: Any) -> None:
        self.faults.check("state.create")
        super().create(*args)

    def put_state(self, *args: Any) -> None:
        self.faults.check("state.put_state")
        super().put_state(*args)

    def delete(self, connection_id: str) -> None:
        self.faults.check("state.delete")
        super().delete(connection_id)


@dataclass
class World:
    faults: Faults
    secrets: FaultySecrets
    state: FaultyState
    registry: ConnectionRegistry

    def add(self, connection_id: str = "crm") -> None:
        self.registry.register(
            Connection(
                id=connection_id,
                profile="generic",
                grant=GrantType.REFRESH_TOKEN,
                client_id="client",
                token_url="https://idp.example/token",
                auth_method=ClientAuthMethod.BASIC,
            ),
            Credential(
                refresh_token=Secret("rt-1"),
                client_secret=Secret("cs"),
            ),
        )

    def leftovers(self, connection_id: str = "crm") -> tuple[bool, bool]:
        """(state record present, secret present)."""
        try:
            self.state.get(connection_id)
            has_state = True
        except NotFound:
            has_state = False
        return has_state, bool(self.secrets.versions(connection_id))


@pytest.fixture
def world() -> World:
    faults = Faults()
    secrets = FaultySecrets(faults)
    state = FaultyState(faults)
    registry = ConnectionRegistry(
        secrets=secrets, state=state, profiles=load_profiles(), clock=FakeClock(T0)
    )
    return World(faults, secrets, state, registry)


REGISTER_WRITES = ["state.create", "secrets.put", "state.put_state"]


def _fault_each(writes: Sequence[str]) -> Callable[[Any], Any]:
    return pytest.mark.parametrize("write", writes)


@_fault_each(REGISTER_WRITES)
def test_a_failed_add_leaves_nothing_and_can_be_repeated(world: World, write: str) -> None:
    world.faults.plan[write] = StoreUnavailable("store down")
    with pytest.raises(StoreUnavailable):
        world.add()
    assert world.leftovers() == (False, False), f"{write} failed and left data behind"
    world.add()
    record = world.state.get("crm")
    assert record.state.status is ConnectionStatus.ACTIVE
    assert record.state.current_version == world.secrets.get("crm").version


@_fault_each(REGISTER_WRITES)
def test_a_crash_during_add_leaves_what_remove_clears(world: World, write: str) -> None:
    world.faults.plan[write] = Crash()
    with pytest.raises(Crash):
        world.add()
    if world.leftovers() != (False, False):
        world.registry.remove("crm")
    assert world.leftovers() == (False, False)
    world.add()
    assert world.state.get("crm").state.current_version == world.secrets.get("crm").version


def test_a_half_registered_connection_is_visible_and_not_due(world: World) -> None:
    world.faults.plan["secrets.put"] = Crash()
    with pytest.raises(Crash):
        world.add()
    record = world.state.get("crm")
    assert record.state.next_refresh_at is None
    assert record.state.current_version is None
    assert record.state.last_error is not None and "incomplete" in record.state.last_error
    with pytest.raises(AlreadyExists, match="remove"):
        world.add()


def test_an_orphaned_secret_from_an_older_broker_does_not_block_add(world: World) -> None:
    """Earlier versions wrote the secret first: a crash after it left a secret with no record."""
    world.secrets.put("crm", Credential(refresh_token=Secret("old")), expected_version=None)
    world.add()
    assert world.secrets.get("crm").credential.refresh_token == Secret("rt-1")
    assert world.state.get("crm").state.current_version == world.secrets.get("crm").version


def test_remove_clears_an_orphaned_secret(world: World) -> None:
    world.secrets.put("crm", Credential(refresh_token=Secret("old")), expected_version=None)
    world.registry.remove("crm")
    assert world.leftovers() == (False, False)
    with pytest.raises(NotFound):
        world.registry.remove("crm")


@_fault_each(["state.delete", "secrets.delete"])
def test_a_failed_or_crashed_remove_can_be_repeated(world: World, write: str) -> None:
    world.add()
    for error in (StoreUnavailable("down"), Crash()):
        world.faults.plan[write] = error
        with pytest.raises(type(error)):
            world.registry.remove("crm")
        assert world.leftovers() != (False, False)
    world.registry.remove("crm")
    assert world.leftovers() == (False, False)


def test_add_of_an_existing_connection_changes_nothing(world: World) -> None:
    world.add()
    before = world.secrets.versions("crm")
    with pytest.raises(AlreadyExists):
        world.add()
    assert world.secrets.versions("crm") == before
    assert world.state.get("crm").state.current_version == before[-1]
