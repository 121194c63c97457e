"""A caller never receives a token with a scope or a lifetime outside its grants, on any path
(issue 9, "Done when"): random policies, random request sequences, time passing, status
changes and rotations between requests, against an oracle that reads the raw grants -- not
the policy's own merged view of them.

Paths covered: a fresh pass-through token, a cached one, a narrowed refresh (fresh and
cached), a minted service-account token (impersonation), and the refusals. The relay has its
own tests (tests/unit/issue/test_relay.py): it never hands a token out.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.issue.fakes import FakeVerifier
from tokenbroker.adapters.fake_provider import FakeTokenServer
from tokenbroker.adapters.memory import MemorySecretStore, MemoryStateStore
from tokenbroker.issue.issuer import TokenIssuer
from tokenbroker.issue.policy_file import parse_policy_text
from tokenbroker.kernel.clock import FakeClock
from tokenbroker.kernel.errors import TokenBrokerError
from tokenbroker.kernel.model import (
    Connection,
    ConnectionStatus,
    Credential,
    GrantType,
    MintedToken,
)
from tokenbroker.kernel.secret import Secret
from tokenbroker.oauth.profiles import load_profiles
from tokenbroker.refresh.registry import ConnectionRegistry

CALLERS = ("a@p.iam.gserviceaccount.com", "b@p.iam.gserviceaccount.com")
SCOPES = ("read", "send", "admin")
LIFETIMES = (60, 300, 1800, 3600)
#: crm: pass-through only (its provider rotates, so no narrowing); gmail: narrowing;
#: reports: a service account, minted through IAM Credentials.
CONNECTIONS = ("crm", "gmail", "reports")


@dataclass(frozen=True)
class Grant:
    callers: tuple[str, ...]
    connections: tuple[str, ...]
    scopes: tuple[str, ...]  # ("*",) for the full scope
    max_lifetime: int

    def toml(self) -> str:
        return (
            "[[grants]]\n"
            f"callers = {json.dumps(list(self.callers))}\n"
            f"connections = {json.dumps(list(self.connections))}\n"
            f"scopes = {json.dumps(list(self.scopes))}\n"
            f"max_lifetime_seconds = {self.max_lifetime}\n"
        )


class Minter:
    """An Impersonator that mints a token with exactly the lifetime asked."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.count = 0
        #: Minted token value -> the service account it was minted for.
        self.minted_for: dict[str, str] = {}

    async def generate_access_token(
        self,
        service_account: str,
        scopes: Any,  # noqa: ARG002 - the issuer's to choose; the oracle checks them
        lifetime_seconds: int,
    ) -> MintedToken:
        self.count += 1
        value = f"minted-{self.count}"
        self.minted_for[value] = service_account
        return MintedToken(Secret(value), self.clock.now() + timedelta(seconds=lifetime_seconds))


def register(
    registry: ConnectionRegistry, server: FakeTokenServer, clock: FakeClock, cid: str, n: int
) -> None:
    """Registration ``n`` of connection ``cid`` (each with its own token or service account)."""
    now = clock.now()
    if cid == "crm":
        registry.register(
            Connection(id="crm", profile="generic", grant=GrantType.REFRESH_TOKEN,
                       client_id="client", token_url="https://idp.test/token"),
            Credential(refresh_token=Secret(server.seed_refresh_token()),
                       client_secret=Secret("client-secret"), access_token=Secret(f"AT-CRM-{n}"),
                       obtained_at=now, expires_at=now + timedelta(hours=8), scope=("all",)),
        )  # fmt: skip
    elif cid == "gmail":
        registry.register(
            Connection(id="gmail", profile="google", grant=GrantType.REFRESH_TOKEN,
                       client_id="client", scopes=SCOPES, token_url="https://google.test/token"),
            Credential(refresh_token=Secret(server.seed_refresh_token(scope=" ".join(SCOPES))),
                       client_secret=Secret("client-secret"),
                       access_token=Secret(f"AT-GMAIL-{n}"), obtained_at=now,
                       expires_at=now + timedelta(hours=8), scope=SCOPES),
        )  # fmt: skip
    else:
        registry.register(
            Connection(id="reports", profile="google", grant=GrantType.IMPERSONATION,
                       scopes=SCOPES,
                       params={"service_account": f"r{n}@p.iam.gserviceaccount.com"}),
            Credential(),
        )  # fmt: skip


@dataclass
class PropertyWorld:
    issuer: TokenIssuer
    clock: FakeClock
    state: MemoryStateStore
    secrets: MemorySecretStore
    registry: ConnectionRegistry
    server: FakeTokenServer
    minter: Minter


def _world(grants: list[Grant]) -> PropertyWorld:
    clock = FakeClock()
    secrets, state = MemorySecretStore(), MemoryStateStore()
    server = FakeTokenServer(rotate=False)
    profiles = load_profiles()
    registry = ConnectionRegistry(secrets=secrets, state=state, profiles=profiles, clock=clock)
    for cid in CONNECTIONS:
        register(registry, server, clock, cid, 0)
    minter = Minter(clock)
    text = "version = 1\n" + "\n".join(g.toml() for g in grants)
    issuer = TokenIssuer(
        verifier=FakeVerifier(),
        policy=parse_policy_text(text),
        state=state,
        secrets=secrets,
        profiles=profiles,
        impersonator=minter,
        endpoint=server,
        clock=clock,
        rng=random.Random(1),
    )
    return PropertyWorld(issuer, clock, state, secrets, registry, server, minter)


def _covering(grants: list[Grant], caller: str, connection: str, scope: str) -> list[int]:
    """Lifetimes of the grants that give ``caller`` ``scope`` on ``connection``."""
    return [
        g.max_lifetime
        for g in grants
        if caller in g.callers
        and connection in g.connections
        and (scope in g.scopes or "*" in g.scopes)
    ]


def _full(grants: list[Grant], caller: str, connection: str) -> list[int]:
    return [
        g.max_lifetime
        for g in grants
        if caller in g.callers and connection in g.connections and "*" in g.scopes
    ]


grants_strategy = st.lists(
    st.builds(
        Grant,
        callers=st.lists(st.sampled_from(CALLERS), min_size=1, max_size=2, unique=True).map(tuple),
        connections=st.lists(st.sampled_from(CONNECTIONS), min_size=1, max_size=3, unique=True).map(
            tuple
        ),
        scopes=st.one_of(
            st.just(("*",)),
            st.lists(st.sampled_from(SCOPES), min_size=1, max_size=3, unique=True).map(tuple),
        ),
        max_lifetime=st.sampled_from(LIFETIMES),
    ),
    min_size=1,
    max_size=4,
)
ask = st.tuples(
    st.just("ask"),
    st.sampled_from(CALLERS),
    st.sampled_from(CONNECTIONS),
    st.one_of(st.none(), st.lists(st.sampled_from(SCOPES), min_size=1, max_size=3)),
    st.one_of(st.none(), st.sampled_from((0, 30, 120, 900))),
)
#: Mostly requests (the same ones again, for cache hits), some time passing, and now and
#: then a status change (mostly back to active, so issuing goes on).
step_strategy = st.one_of(
    ask,
    ask,
    ask,
    st.tuples(st.just("wait"), st.integers(1, 2000)),
    st.tuples(
        st.just("status"),
        st.sampled_from(CONNECTIONS),
        st.sampled_from((ConnectionStatus.ACTIVE,) * 3 + tuple(ConnectionStatus)),
    ),
    st.tuples(st.just("register again"), st.sampled_from(CONNECTIONS)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grants=grants_strategy, steps=st.lists(step_strategy, min_size=1, max_size=30))
def test_no_token_ever_exceeds_the_callers_grants(
    grants: list[Grant], steps: list[tuple[Any, ...]]
) -> None:
    world = _world(grants)
    issuer, clock, state = world.issuer, world.clock, world.state
    registrations = dict.fromkeys(CONNECTIONS, 0)
    for step in steps:
        if step[0] == "wait":
            clock.advance(step[1])
            continue
        if step[0] == "status":
            record = state.get(step[1])
            state.put_state(step[1], replace(record.state, status=step[2]))
            continue
        if step[0] == "register again":  # versions start again at 1
            world.registry.remove(step[1])
            # A registration is stamped with its time (created_at); an operator's remove and
            # add are two moments, never one microsecond on a real clock.
            clock.advance(1)
            registrations[step[1]] += 1
            register(world.registry, world.server, clock, step[1], registrations[step[1]])
            continue
        _, caller, connection, scopes, min_ttl = step
        body: dict[str, Any] = {"connection": connection}
        if scopes is not None:
            body["scopes"] = scopes
        if min_ttl is not None:
            body["min_ttl_seconds"] = min_ttl
        try:
            token = asyncio.run(issuer.issue(f"Bearer {caller}", json.dumps(body).encode()))
        except TokenBrokerError:
            continue  # a refusal is always within the grants
        now = clock.now()
        lifetime = (token.expires_at - now).total_seconds()
        assert state.get(connection).state.status is ConnectionStatus.ACTIVE
        # Always the current registration's: its own token, or one minted for its account.
        current = state.get(connection).connection
        value = token.access_token.reveal()
        if connection == "reports":
            assert world.minter.minted_for[value] == current.params["service_account"], step
        elif value.startswith("AT-"):
            assert value == world.secrets.get(connection).credential.access_token.reveal(), step
        full = _full(grants, caller, connection)
        if scopes is None and full:
            # The connection's own scope: only for a caller granted "*", and for no longer
            # than one such grant allows.
            assert lifetime <= max(full), (grants, step, lifetime)
            continue
        asked = set(scopes) if scopes is not None else None
        assert token.scope, step
        for scope in token.scope:
            allowed = _covering(grants, caller, connection, scope)
            assert allowed, (grants, step, token.scope)
            assert lifetime <= max(allowed), (grants, step, scope, lifetime)
            if asked is not None:
                assert scope in asked, (step, token.scope)


def test_the_union_of_two_grants_never_lends_one_grants_lifetime_to_the_others_scopes() -> None:
    """Found by the property above: a caller granted ``read`` for 60 s and ``send`` for an
    hour got a ``read`` token for an hour -- the policy merged the grants' lifetimes."""
    caller = CALLERS[0]
    world = _world(
        [
            Grant((caller,), ("gmail",), ("read",), 60),
            Grant((caller,), ("gmail",), ("send",), 3600),
        ]
    )
    issuer, clock = world.issuer, world.clock
    read = asyncio.run(
        issuer.issue(f"Bearer {caller}", b'{"connection": "gmail", "scopes": ["read"]}')
    )
    assert (read.expires_at - clock.now()).total_seconds() <= 60
    both = asyncio.run(issuer.issue(f"Bearer {caller}", b'{"connection": "gmail"}'))
    assert set(both.scope) == {"read", "send"}
    assert (both.expires_at - clock.now()).total_seconds() <= 60
    send = asyncio.run(
        issuer.issue(f"Bearer {caller}", b'{"connection": "gmail", "scopes": ["send"]}')
    )
    assert (send.expires_at - clock.now()).total_seconds() > 60


@pytest.mark.parametrize("connection", ["crm", "gmail"])
def test_a_short_full_scope_grant_beside_a_long_scoped_one_keeps_its_own_lifetime(
    connection: str,
) -> None:
    caller = CALLERS[0]
    world = _world(
        [
            Grant((caller,), (connection,), ("*",), 60),
            Grant((caller,), (connection,), ("read",), 3600),
        ]
    )
    issuer, clock = world.issuer, world.clock
    token = asyncio.run(
        issuer.issue(f"Bearer {caller}", json.dumps({"connection": connection}).encode())
    )
    assert (token.expires_at - clock.now()).total_seconds() <= 60
