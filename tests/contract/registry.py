"""Which adapters the contract suites run against: one entry per adapter and port.

Adding an adapter (Secret Manager, Firestore, Pub/Sub, AWS Secrets Manager, ...) is one entry
in the matching dict below; every test of that port's suite then runs against it too.

An entry's ``open`` gets a :class:`Workspace` (a private directory, a place to register
clean-up, a per-test memo) and returns a *handle* on the port. Each call of ``open`` with the
same workspace must return a handle on the **same** underlying storage: for a networked or
file-backed adapter a new, independent client (a second "process"); for the in-memory adapters,
which have no storage outside the object, the same object again. The suites use this to check
that writes are visible to other handles and that races between handles are safe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tokenbroker.adapters.embedded import (
    EmbeddedDatabase,
    EmbeddedOutbox,
    EmbeddedSecretStore,
    EmbeddedStateStore,
)
from tokenbroker.adapters.memory import MemoryEventBus, MemorySecretStore, MemoryStateStore
from tokenbroker.model import ConnectionEvent
from tokenbroker.ports import EventBus, SecretStore, StateStore

from .endpoint_rigs import AiohttpServerRig, EndpointRig, FakeTokenServerRig

T = TypeVar("T")


class Workspace:
    """Per-test resources for adapter factories."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._stack = ExitStack()
        self._memo: dict[str, Any] = {}

    def on_close(self, callback: Callable[[], object]) -> None:
        self._stack.callback(callback)

    def once(self, key: str, make: Callable[[], T]) -> T:
        """``make()`` the first time ``key`` is asked for in this workspace, then the same."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]  # type: ignore[no-any-return]

    def close(self) -> None:
        self._stack.close()


# --- shared helpers for the embedded adapter -----------------------------------------------


def _embedded_db(ws: Workspace) -> EmbeddedDatabase:
    """A new EmbeddedDatabase (own SQLite connection) on the workspace's state directory."""
    db = EmbeddedDatabase(ws.directory / "embedded-state")
    ws.on_close(db.close)
    return db


# --- SecretStore ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SecretStoreAdapter:
    #: ``open(ws, retained_versions)``; ``None`` means "the adapter's default" (3).
    open: Callable[[Workspace, int | None], SecretStore]


def _memory_secrets(ws: Workspace, retained: int | None) -> SecretStore:
    kwargs = {} if retained is None else {"retained_versions": retained}
    return ws.once("memory-secrets", lambda: MemorySecretStore(**kwargs))


def _embedded_secrets(ws: Workspace, retained: int | None) -> SecretStore:
    kwargs = {} if retained is None else {"retained_versions": retained}
    return EmbeddedSecretStore(_embedded_db(ws), **kwargs)


SECRET_STORES: dict[str, SecretStoreAdapter] = {
    "memory": SecretStoreAdapter(open=_memory_secrets),
    "embedded": SecretStoreAdapter(open=_embedded_secrets),
}


# --- StateStore ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StateStoreAdapter:
    open: Callable[[Workspace], StateStore]


STATE_STORES: dict[str, StateStoreAdapter] = {
    "memory": StateStoreAdapter(open=lambda ws: ws.once("memory-state", MemoryStateStore)),
    "embedded": StateStoreAdapter(open=lambda ws: EmbeddedStateStore(_embedded_db(ws))),
}


# --- EventBus ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EventBusAdapter:
    open: Callable[[Workspace], EventBus]
    #: Every event accepted so far, in publish order, as a subscriber would observe it.
    read: Callable[[EventBus], Sequence[ConnectionEvent]]
    #: Whether publishing an event whose ``event_id`` was already accepted is a no-op.
    #: Delivery is at-least-once either way (subscribers de-duplicate on idempotency_key);
    #: adapters that cannot de-duplicate (memory keeps every copy) say False.
    dedupes_event_ids: bool


def _read_memory(bus: EventBus) -> Sequence[ConnectionEvent]:
    assert isinstance(bus, MemoryEventBus)
    return list(bus.events)


def _read_outbox(bus: EventBus) -> Sequence[ConnectionEvent]:
    assert isinstance(bus, EmbeddedOutbox)
    return [event for _, event in bus.read(limit=1_000_000)]


EVENT_BUSES: dict[str, EventBusAdapter] = {
    "memory": EventBusAdapter(
        open=lambda ws: ws.once("memory-events", MemoryEventBus),
        read=_read_memory,
        dedupes_event_ids=False,
    ),
    "embedded": EventBusAdapter(
        open=lambda ws: EmbeddedOutbox(_embedded_db(ws)),
        read=_read_outbox,
        dedupes_event_ids=True,
    ),
}


# --- TokenEndpoint -------------------------------------------------------------------------

#: Each rig is a TokenEndpoint under test plus a scripted server it talks to.
TOKEN_ENDPOINTS: dict[str, Callable[[], EndpointRig]] = {
    "fake": FakeTokenServerRig,
    "aiohttp": AiohttpServerRig,
}
