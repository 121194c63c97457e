"""Connecting an account through the authorization-code flow: the state's rules, the
callback's errors, the one code exchange, what is stored and announced."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest

from tokenbroker.adapters.fake_provider import FakeTokenServer
from tokenbroker.adapters.memory import (
    MemoryAuthorizationSessions,
    MemoryEventBus,
    MemorySecretStore,
    MemoryStateStore,
)
from tokenbroker.kernel.clock import FakeClock
from tokenbroker.kernel.errors import (
    AccessDenied,
    AlreadyExists,
    InsufficientGrant,
    InvalidAuthorizationState,
    InvalidGrant,
    StoreUnavailable,
)
from tokenbroker.kernel.log import capture_logs
from tokenbroker.kernel.model import (
    Connection,
    ConnectionEvent,
    ConnectionStatus,
    Credential,
    EventType,
    GrantType,
)
from tokenbroker.kernel.secret import Secret
from tokenbroker.oauth.profiles import load_profiles
from tokenbroker.refresh.authorize import AuthorizationFlow, AuthorizationStart, Connected
from tokenbroker.refresh.registry import ConnectionRegistry
from tokenbroker.refresh.tick import Refresher

REDIRECT = "http://127.0.0.1:49152/callback"
OPERATOR = "local:alice"


class Rig:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.secrets = MemorySecretStore()
        self.state = MemoryStateStore(self.clock)
        self.events = MemoryEventBus()
        self.sessions = MemoryAuthorizationSessions()
        self.server = FakeTokenServer()
        self.registry = ConnectionRegistry(
            secrets=self.secrets, state=self.state, profiles=load_profiles(), clock=self.clock
        )
        self.flow = AuthorizationFlow(
            sessions=self.sessions, registry=self.registry, events=self.events, clock=self.clock
        )

    @staticmethod
    def connection(cid: str = "crm", **changes: object) -> Connection:
        base = Connection(
            id=cid,
            profile="generic",
            grant=GrantType.REFRESH_TOKEN,
            client_id="client",
            scopes=("read", "write"),
            token_url="https://idp.test/token",
            params={"authorization_url": "https://idp.test/authorize"},
        )
        return replace(base, **changes)  # type: ignore[arg-type]

    def start_new(self, cid: str = "crm", **changes: object) -> AuthorizationStart:
        return self.flow.start_new(
            self.connection(cid, **changes), operator=OPERATOR, redirect_uri=REDIRECT
        )

    def consent(
        self, start: AuthorizationStart, grant_scope: str | None = None
    ) -> list[tuple[str, str]]:
        """The callback's query after the user consents (the provider's redirect)."""
        code = self.server.authorize(start.url, grant_scope=grant_scope)
        state = parse_qs(urlsplit(start.url).query)["state"][0]
        return [("code", code), ("state", state)]

    def complete(
        self,
        params: list[tuple[str, str]],
        *,
        cid: str = "crm",
        operator: str = OPERATOR,
        **kw: object,
    ) -> Connected:
        return asyncio.run(
            self.flow.complete(
                self.server,
                params,
                connection_id=cid,
                operator=operator,
                client_secret=Secret("client-secret"),
                **kw,  # type: ignore[arg-type]
            )
        )

    def code_exchanges(self) -> int:
        return self.server.requests["authorization_code"]


@pytest.fixture
def rig() -> Rig:
    return Rig()


def test_a_new_connection_is_registered_active_with_its_first_tokens(rig: Rig) -> None:
    start = rig.start_new()
    done = rig.complete(rig.consent(start))
    record = rig.state.get("crm")
    assert record.state.status is ConnectionStatus.ACTIVE
    assert done.new and done.granted_scopes == ("read", "write") and not done.missing_scopes
    stored = rig.secrets.get("crm").credential
    assert stored.refresh_token is not None and stored.access_token is not None
    assert stored.client_secret == Secret("client-secret")
    assert stored.scope == ("read", "write")
    assert stored.expires_at == rig.clock.now() + timedelta(seconds=3600)
    assert [e.type for e in rig.events.events] == [EventType.CONNECTED]
    assert rig.events.events[0].version == record.state.current_version
    assert rig.state.parked_events(10) == []  # published, unparked
    assert rig.code_exchanges() == 1


def test_the_connected_connection_then_refreshes_normally(rig: Rig) -> None:
    rig.complete(rig.consent(rig.start_new()))
    before = rig.secrets.get("crm").credential.refresh_token
    refresher = Refresher(
        secrets=rig.secrets,
        state=rig.state,
        events=rig.events,
        profiles=rig.registry.profiles,
        clock=rig.clock,
    )
    summary = asyncio.run(refresher.tick(rig.server, connection_ids=["crm"]))
    assert summary.ok and summary.refreshed == 1
    assert rig.secrets.get("crm").credential.refresh_token != before


def test_a_replayed_callback_never_reaches_the_provider_twice(rig: Rig) -> None:
    params = rig.consent(rig.start_new())
    rig.complete(params)
    with pytest.raises(InvalidAuthorizationState) as caught:
        rig.complete(params)
    assert caught.value.reason == "unknown"
    assert rig.code_exchanges() == 1


def test_racing_callbacks_exchange_the_code_once(rig: Rig) -> None:
    params = rig.consent(rig.start_new())

    async def both() -> list[object]:
        return await asyncio.gather(
            *(
                rig.flow.complete(
                    rig.server,
                    params,
                    connection_id="crm",
                    operator=OPERATOR,
                    client_secret=Secret("client-secret"),
                )
                for _ in range(2)
            ),
            return_exceptions=True,
        )

    results = asyncio.run(both())
    assert sum(isinstance(r, Connected) for r in results) == 1
    assert sum(isinstance(r, InvalidAuthorizationState) for r in results) == 1
    assert rig.code_exchanges() == 1


def test_an_unknown_state_is_refused_before_the_provider(rig: Rig) -> None:
    rig.start_new()
    with pytest.raises(InvalidAuthorizationState) as caught:
        rig.complete([("code", "stolen"), ("state", "forged")])
    assert caught.value.reason == "unknown"
    assert rig.code_exchanges() == 0


def test_an_expired_state_is_refused_and_consumed(rig: Rig) -> None:
    start = rig.start_new()
    params = rig.consent(start)
    rig.clock.advance(600)  # the default 10 minutes, exactly
    with pytest.raises(InvalidAuthorizationState) as caught:
        rig.complete(params)
    assert caught.value.reason == "expired"
    with pytest.raises(InvalidAuthorizationState) as again:
        rig.complete(params)
    assert again.value.reason == "unknown"
    assert rig.code_exchanges() == 0
    with pytest.raises(Exception, match="not found"):
        rig.state.get("crm")


def test_just_before_expiry_is_still_accepted(rig: Rig) -> None:
    params = rig.consent(rig.start_new())
    rig.clock.advance(599)
    assert rig.complete(params).new


def test_a_state_for_another_connection_is_refused(rig: Rig) -> None:
    params = rig.consent(rig.start_new("crm"))
    with pytest.raises(InvalidAuthorizationState) as caught:
        rig.complete(params, cid="billing")
    assert caught.value.reason == "other_connection"
    assert rig.code_exchanges() == 0


def test_a_state_for_another_operator_is_refused(rig: Rig) -> None:
    params = rig.consent(rig.start_new())
    with pytest.raises(InvalidAuthorizationState) as caught:
        rig.complete(params, operator="local:mallory")
    assert caught.value.reason == "other_operator"
    assert rig.code_exchanges() == 0


def test_consent_denied_is_access_denied_and_stores_nothing(rig: Rig) -> None:
    start = rig.start_new()
    state = parse_qs(urlsplit(start.url).query)["state"][0]
    with pytest.raises(AccessDenied) as caught:
        rig.complete([("error", "access_denied"), ("error_description", "no"), ("state", state)])
    assert "denied" in caught.value.message
    assert rig.code_exchanges() == 0
    assert rig.state.list() == [] and rig.events.events == []


def test_an_error_with_a_forged_state_is_refused_as_a_forgery(rig: Rig) -> None:
    rig.start_new()
    with pytest.raises(InvalidAuthorizationState):
        rig.complete([("error", "access_denied"), ("state", "forged")])


def test_a_refused_code_exchange_stores_nothing(rig: Rig) -> None:
    params = rig.consent(rig.start_new())
    code = params[0][1]
    rig.server._codes[code].used = True  # e.g. the code expired or was used elsewhere
    with pytest.raises(InvalidGrant):
        rig.complete(params)
    assert rig.state.list() == []
    assert rig.code_exchanges() == 1


def test_a_narrower_grant_is_refused_unless_accepted(rig: Rig) -> None:
    params = rig.consent(rig.start_new(), grant_scope="read")
    with capture_logs() as logs, pytest.raises(InsufficientGrant) as caught:
        rig.complete(params)
    assert caught.value.missing == ("write",)
    assert rig.state.list() == []
    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    assert any(line.get("missing") == ["write"] for line in lines)

    params = rig.consent(rig.start_new(), grant_scope="read")
    done = rig.complete(params, accept_narrower=True)
    assert done.missing_scopes == ("write",)
    assert rig.secrets.get("crm").credential.scope == ("read",)


def test_a_new_connection_that_exists_is_refused_at_start(rig: Rig) -> None:
    rig.complete(rig.consent(rig.start_new()))
    with pytest.raises(AlreadyExists):
        rig.start_new()


def test_a_needs_reauth_connection_recovers_with_the_recovery_event(rig: Rig) -> None:
    rig.complete(rig.consent(rig.start_new()))
    record = rig.state.get("crm")
    rig.state.put_state(
        "crm",
        replace(
            record.state,
            status=ConnectionStatus.NEEDS_REAUTH,
            consecutive_failures=3,
            last_error="invalid_grant",
        ),
    )
    old = rig.secrets.get("crm")
    start = rig.flow.start_existing("crm", operator=OPERATOR, redirect_uri=REDIRECT)
    done = rig.complete(rig.consent(start))
    after = rig.state.get("crm")
    assert not done.new
    assert after.state.status is ConnectionStatus.ACTIVE
    assert (after.state.consecutive_failures, after.state.last_error) == (0, None)
    assert after.state.current_version == old.version + 1
    stored = rig.secrets.get("crm").credential
    assert stored.refresh_token != old.credential.refresh_token
    assert stored.client_secret == old.credential.client_secret  # the stored one, kept
    recovered = rig.events.events[-1]
    assert recovered.type is EventType.RECOVERED
    assert recovered.consecutive_failures == 3
    assert recovered.version == after.state.current_version


def test_a_healthy_connection_authorised_again_is_announced_as_connected(rig: Rig) -> None:
    rig.complete(rig.consent(rig.start_new()))
    start = rig.flow.start_existing("crm", operator=OPERATOR, redirect_uri=REDIRECT)
    rig.complete(rig.consent(start))
    assert [e.type for e in rig.events.events] == [EventType.CONNECTED, EventType.CONNECTED]
    assert len({e.idempotency_key for e in rig.events.events}) == 2


def test_events_stay_parked_when_the_bus_fails(rig: Rig) -> None:
    class DownBus:
        def publish(self, events: object) -> None:  # noqa: ARG002 - the port's signature
            raise StoreUnavailable("bus down")

    rig.flow.events = DownBus()  # type: ignore[assignment]
    rig.complete(rig.consent(rig.start_new()))
    parked = rig.state.parked_events(10)
    assert [e.type for e in parked] == [EventType.CONNECTED]


def test_nothing_secret_reaches_logs_errors_or_reprs(rig: Rig) -> None:
    start = rig.start_new()
    session = next(iter(rig.sessions._sessions.values()))
    verifier = session.code_verifier.reveal()
    params = rig.consent(start)
    with capture_logs() as logs:
        done = rig.complete(params)
        with pytest.raises(InvalidAuthorizationState) as replay:
            rig.complete(params)
    stored = rig.secrets.get("crm").credential
    secrets = [verifier, params[0][1], *stored.secret_values()]
    texts = [
        logs.getvalue(),
        repr(done),
        repr(done.to_json()),
        str(replay.value),
        repr(session),
        repr(start),
        repr([e.to_json() for e in rig.events.events]),
    ]
    for secret in secrets:
        for text in texts:
            assert secret not in text
    assert verifier not in start.url


def test_zoho_callback_sets_the_accounts_data_centre(rig: Rig) -> None:
    connection = Connection(
        id="zoho-crm",
        profile="zoho",
        grant=GrantType.REFRESH_TOKEN,
        client_id="client",
        scopes=("ZohoCRM.modules.ALL",),
    )
    start = rig.flow.start_new(connection, operator=OPERATOR, redirect_uri=REDIRECT)
    assert urlsplit(start.url).hostname == "accounts.zoho.com"  # the default, us
    params = [
        *rig.consent(start),
        ("accounts-server", "https://accounts.zoho.eu"),
        ("location", "eu"),
    ]
    rig.complete(params, cid="zoho-crm")
    assert rig.state.get("zoho-crm").connection.params["data_centre"] == "eu"


def test_zoho_callback_naming_a_foreign_server_sends_nothing(rig: Rig) -> None:
    connection = Connection(
        id="zoho-crm", profile="zoho", grant=GrantType.REFRESH_TOKEN, client_id="client"
    )
    start = rig.flow.start_new(connection, operator=OPERATOR, redirect_uri=REDIRECT)
    params = [*rig.consent(start), ("accounts-server", "https://accounts.evil.example")]
    with pytest.raises(InvalidAuthorizationState):
        rig.complete(params, cid="zoho-crm")
    assert rig.code_exchanges() == 0


def test_only_refresh_token_connections_are_connected(rig: Rig) -> None:
    with pytest.raises(Exception, match="refresh_token"):
        rig.start_new(grant=GrantType.CLIENT_CREDENTIALS)
    rig.registry.register(
        replace(rig.connection("svc"), grant=GrantType.CLIENT_CREDENTIALS),
        Credential(client_secret=Secret("client-secret")),
    )
    with pytest.raises(Exception, match="only refresh_token"):
        rig.flow.start_existing("svc", operator=OPERATOR, redirect_uri=REDIRECT)


def connected_event(rig: Rig) -> ConnectionEvent:
    """For the event schema test: one connection.connected."""
    rig.complete(rig.consent(rig.start_new()))
    return rig.events.events[-1]
