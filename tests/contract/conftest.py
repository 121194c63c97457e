"""Fixtures that run each port's contract suite once per adapter in ``registry``.

* ``secret_store`` / ``state_store`` / ``event_bus``: a handle on a fresh, empty store.
* ``open_secret_store`` / ``open_state_store`` / ``open_event_bus``: open further handles on
  the *same* storage (another client or "process"; memory adapters return the same object).
* ``event_bus_adapter``: the registry entry (to read events back, capability flags).
* ``endpoint_rig``: a TokenEndpoint with a scripted server behind it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tokenbroker.ports import AuthorizationSessions, EventBus, SecretStore, StateStore

from .builders import ManualClock
from .endpoint_rigs import EndpointRig
from .registry import (
    AUTHORIZATION_SESSIONS,
    EVENT_BUSES,
    SECRET_STORES,
    STATE_STORES,
    TOKEN_ENDPOINTS,
    EventBusAdapter,
    Workspace,
)


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[Workspace]:
    ws = Workspace(tmp_path)
    yield ws
    ws.close()


# --- SecretStore ---------------------------------------------------------------------------


@pytest.fixture(params=list(SECRET_STORES))
def open_secret_store(
    request: pytest.FixtureRequest, workspace: Workspace
) -> Callable[..., SecretStore]:
    adapter = SECRET_STORES[request.param]

    def open_(*, retained_versions: int | None = None) -> SecretStore:
        return adapter.open(workspace, retained_versions)

    return open_


@pytest.fixture
def secret_store(open_secret_store: Callable[..., SecretStore]) -> SecretStore:
    return open_secret_store()


@pytest.fixture
def corrupt_secret(
    request: pytest.FixtureRequest,
    open_secret_store: Callable[..., SecretStore],
    workspace: Workspace,
) -> Callable[[SecretStore, str], None]:
    """Damage a connection's current version behind the store's back (skips where the
    adapter keeps nothing that can rot)."""
    adapter = SECRET_STORES[request.node.callspec.params["open_secret_store"]]
    if adapter.corrupt is None:
        pytest.skip("this adapter keeps no encoded record that could be damaged")
    corrupt = adapter.corrupt
    return lambda store, cid: corrupt(workspace, store, cid)


# --- StateStore ----------------------------------------------------------------------------


@pytest.fixture(params=list(STATE_STORES))
def open_state_store(
    request: pytest.FixtureRequest, workspace: Workspace
) -> Callable[[], StateStore]:
    adapter = STATE_STORES[request.param]
    return lambda: adapter.open(workspace)


@pytest.fixture
def state_store(open_state_store: Callable[[], StateStore]) -> StateStore:
    return open_state_store()


@pytest.fixture
def lease_clock(workspace: Workspace) -> ManualClock:
    """The clock the state stores of this test keep their leases on."""
    return workspace.lease_clock


# --- EventBus ------------------------------------------------------------------------------


@pytest.fixture(params=list(EVENT_BUSES))
def event_bus_adapter(request: pytest.FixtureRequest) -> EventBusAdapter:
    return EVENT_BUSES[request.param]


@pytest.fixture
def open_event_bus(
    event_bus_adapter: EventBusAdapter, workspace: Workspace
) -> Callable[[], EventBus]:
    return lambda: event_bus_adapter.open(workspace)


@pytest.fixture
def event_bus(open_event_bus: Callable[[], EventBus]) -> EventBus:
    return open_event_bus()


# --- TokenEndpoint -------------------------------------------------------------------------


@pytest.fixture(params=list(TOKEN_ENDPOINTS))
def endpoint_rig(request: pytest.FixtureRequest) -> EndpointRig:
    return TOKEN_ENDPOINTS[request.param]()


# --- AuthorizationSessions -----------------------------------------------------------------


@pytest.fixture(params=list(AUTHORIZATION_SESSIONS))
def open_sessions(
    request: pytest.FixtureRequest, workspace: Workspace
) -> Callable[[], AuthorizationSessions]:
    adapter = AUTHORIZATION_SESSIONS[request.param]
    return lambda: adapter(workspace)


@pytest.fixture
def sessions(open_sessions: Callable[[], AuthorizationSessions]) -> AuthorizationSessions:
    return open_sessions()
