"""AuthorizationFlow's device grant (RFC 8628) over the in-memory stores: what it stores, and
that a connection changed while the account holder answered is never written over."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping

import pytest

from tokenbroker.adapters.memory import (
    MemoryAuthorizationSessions,
    MemoryEventBus,
    MemorySecretStore,
    MemoryStateStore,
)
from tokenbroker.kernel.clock import FakeClock
from tokenbroker.kernel.errors import AlreadyExists, ConfigError, NotFound
from tokenbroker.kernel.http import HttpResponse
from tokenbroker.kernel.model import (
    Connection,
    ConnectionStatus,
    Credential,
    EventType,
    GrantType,
)
from tokenbroker.kernel.secret import Secret
from tokenbroker.oauth.profiles import load_profiles
from tokenbroker.refresh.authorize import AuthorizationFlow, DeviceStart
from tokenbroker.refresh.registry import ConnectionRegistry

DEVICE_URL = "https://idp.test/device/code"
TOKEN_URL = "https://idp.test/token"


class Provider:
    """A device endpoint and a token endpoint: pending once, then the tokens."""

    def __init__(self) -> None:
        self.polls = 0

    async def post_form(
        self,
        url: str,
        form: Mapping[str, str],  # noqa: ARG002 - the port's signature
        *,
        headers: Mapping[str, str],  # noqa: ARG002
    ) -> HttpResponse:
        if url == DEVICE_URL:
            body = {"device_code": "dc-1", "user_code": "ABCD-EFGH", "expires_in": 600,
                    "verification_uri": "https://idp.test/device", "interval": 1}  # fmt: skip
            return HttpResponse(200, json.dumps(body).encode(), {})
        self.polls += 1
        if self.polls == 1:
            return HttpResponse(400, b'{"error":"authorization_pending"}', {})
        body = {"access_token": f"at-{self.polls}", "refresh_token": f"rt-{self.polls}",
                "expires_in": 3600, "scope": "read"}  # fmt: skip
        return HttpResponse(200, json.dumps(body).encode(), {})


class Rig:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.secrets = MemorySecretStore()
        self.state = MemoryStateStore(self.clock)
        self.events = MemoryEventBus()
        self.registry = ConnectionRegistry(
            secrets=self.secrets, state=self.state, profiles=load_profiles(), clock=self.clock
        )
        self.flow = AuthorizationFlow(
            sessions=MemoryAuthorizationSessions(), registry=self.registry, events=self.events,
            clock=self.clock,
        )  # fmt: skip
        self.provider = Provider()

    @staticmethod
    def connection(client_id: str = "client") -> Connection:
        return Connection(
            id="crm", profile="generic", grant=GrantType.REFRESH_TOKEN, client_id=client_id,
            scopes=("read",), token_url=TOKEN_URL, params={"device_authorization_url": DEVICE_URL},
        )  # fmt: skip

    def register(self, secret: str = "s1", client_id: str = "client") -> None:  # noqa: S107
        self.registry.register(
            self.connection(client_id),
            Credential(refresh_token=Secret("rt-0"), client_secret=Secret(secret)),
        )

    def start(self, *, new: bool = False) -> DeviceStart:
        return asyncio.run(
            self.flow.start_device(
                self.provider, connection_id="crm", operator="local:alice",
                connection=self.connection() if new else None,
                client_secret=Secret("s1") if new else None,
            )
        )  # fmt: skip

    def complete(self, start: DeviceStart):  # type: ignore[no-untyped-def]
        return asyncio.run(self.flow.complete_device(self.provider, start))


def test_a_new_connection_is_stored_after_the_poll() -> None:
    rig = Rig()
    start = rig.start(new=True)
    assert "ABCD-EFGH" not in repr(start)
    done = rig.complete(start)
    assert done.new and done.event.type is EventType.CONNECTED
    stored = rig.secrets.get("crm").credential
    assert stored.refresh_token is not None and stored.refresh_token.reveal() == "rt-2"
    assert rig.provider.polls == 2


def test_one_registered_meanwhile_is_not_overwritten() -> None:
    rig = Rig()
    start = rig.start(new=True)
    rig.register(secret="someone-elses")
    with pytest.raises(AlreadyExists):
        rig.complete(start)
    stored = rig.secrets.get("crm").credential
    assert stored.client_secret is not None and stored.client_secret.reveal() == "someone-elses"


def test_a_secret_replaced_while_waiting_is_kept() -> None:
    rig = Rig()
    rig.register(secret="s1")
    start = rig.start()
    rig.registry.reauthorize("crm", client_secret=Secret("s2"))
    rig.complete(start)
    stored = rig.secrets.get("crm").credential
    assert stored.client_secret is not None and stored.client_secret.reveal() == "s2"
    assert stored.refresh_token is not None and stored.refresh_token.reveal() == "rt-2"


def test_a_connection_removed_and_added_again_for_another_client_gets_nothing() -> None:
    rig = Rig()
    rig.register(secret="s1")
    start = rig.start()
    rig.registry.remove("crm")
    rig.clock.advance(1)
    rig.register(secret="other-secret", client_id="other-client")
    with pytest.raises(ConfigError, match="nothing was stored"):
        rig.complete(start)
    stored = rig.secrets.get("crm").credential
    assert stored.refresh_token is not None and stored.refresh_token.reveal() == "rt-0"
    assert stored.client_secret is not None and stored.client_secret.reveal() == "other-secret"


def test_a_connection_removed_meanwhile_stores_nothing() -> None:
    rig = Rig()
    rig.register()
    start = rig.start()
    rig.registry.remove("crm")
    with pytest.raises(NotFound, match="nothing was stored"):
        rig.complete(start)
    with pytest.raises(NotFound):
        rig.secrets.get("crm")


def test_a_needs_reauth_connection_recovers() -> None:
    rig = Rig()
    rig.register()
    record = rig.state.get("crm")
    from dataclasses import replace

    rig.state.put_state(
        "crm",
        replace(record.state, status=ConnectionStatus.NEEDS_REAUTH, consecutive_failures=3),
    )
    done = rig.complete(rig.start())
    assert done.event.type is EventType.RECOVERED
    assert rig.state.get("crm").state.status is ConnectionStatus.ACTIVE
