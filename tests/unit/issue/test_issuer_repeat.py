"""The issuer's answer to a request it has seen before (``TokenIssuer._again``): the same
credential header and body are answered from what was decided for them, re-checking
everything that can change. Each test repeats one request, changes one thing between two
turns of the event loop (as between two HTTP requests), and asserts the repeat sees it.

The caller's ID token is checked by the real verifier (RS256, a key set that can change),
time is a FakeClock, the stores are in memory."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.oidc import rsa_public_jwk, sign_rs256
from tokenbroker.adapters.fake_provider import FakeTokenServer
from tokenbroker.adapters.memory import MemorySecretStore, MemoryStateStore
from tokenbroker.issue.idtoken import IdTokenVerifier, JwksDocument, KeySet
from tokenbroker.issue.issuer import IssuedToken, TokenIssuer
from tokenbroker.issue.policy_file import parse_policy_text
from tokenbroker.kernel.clock import FakeClock
from tokenbroker.kernel.errors import (
    CredentialUnavailable,
    InvalidCallerToken,
    NeedsReauth,
    PolicyDenied,
)
from tokenbroker.kernel.log import capture_logs
from tokenbroker.kernel.model import Connection, ConnectionStatus, Credential, GrantType
from tokenbroker.kernel.secret import Secret
from tokenbroker.oauth.profiles import load_profiles
from tokenbroker.refresh.registry import ConnectionRegistry

AUDIENCE = "https://europe-west1-proj.cloudfunctions.net/tokenbroker-issuer"
ISSUER = "https://accounts.google.com"
CALLER = "worker@proj.iam.gserviceaccount.com"
KEY_A = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KEY_B = rsa.generate_private_key(public_exponent=65537, key_size=2048)
BODY = b'{"connection":"crm"}'
POLICY = f"""
version = 1
[[grants]]
callers = ["{CALLER}"]
connections = ["crm", "crm2"]
scopes = ["*"]
max_lifetime_seconds = 1800
"""


class Keys:
    """The certs URL: a JWK set that can change."""

    def __init__(self) -> None:
        self.jwks = [rsa_public_jwk(KEY_A, "key-a")]
        self.fetches = 0

    def __call__(self, url: str) -> JwksDocument:  # noqa: ARG002 - one URL
        self.fetches += 1
        return JwksDocument(json.dumps({"keys": self.jwks}).encode(), 60)


class World:
    def __init__(self) -> None:
        self.clock = FakeClock(datetime(2026, 3, 1, 9, 0, tzinfo=UTC))
        self.keys = Keys()
        self.verifier = IdTokenVerifier(
            audience=AUDIENCE, keys=KeySet("https://certs.test", fetch=self.keys, clock=self.clock),
            clock=self.clock,
        )  # fmt: skip
        self.secrets = MemorySecretStore()
        self.state = MemoryStateStore()
        self.profiles = load_profiles()
        self.registry = ConnectionRegistry(
            secrets=self.secrets, state=self.state, profiles=self.profiles, clock=self.clock
        )
        self.register("AT-1")
        self.issuer = TokenIssuer(
            verifier=self.verifier, policy=parse_policy_text(POLICY), state=self.state,
            secrets=self.secrets, profiles=self.profiles, endpoint=FakeTokenServer(),
            clock=self.clock, rng=random.Random(1),
        )  # fmt: skip
        self.header = "Bearer " + self.id_token()

    def id_token(self, key: rsa.RSAPrivateKey = KEY_A, kid: str = "key-a", ttl: int = 3600) -> str:
        now = int(self.clock.now().timestamp())
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "1" * 21, "email": CALLER,
                  "email_verified": True, "iat": now, "exp": now + ttl}  # fmt: skip
        return sign_rs256(claims, key, kid=kid)

    def register(self, access_token: str, connection_id: str = "crm") -> None:
        now = self.clock.now()
        self.registry.register(
            Connection(id=connection_id, profile="generic", grant=GrantType.REFRESH_TOKEN,
                       client_id="client", token_url="https://idp.test/token"),
            Credential(refresh_token=Secret("RT"), client_secret=Secret("secret"),
                       access_token=Secret(access_token), obtained_at=now,
                       expires_at=now + timedelta(hours=1), scope=("all",)),
        )  # fmt: skip

    async def ask(self, header: str | None = None, body: bytes = BODY) -> IssuedToken:
        await asyncio.sleep(0)  # another HTTP request: another turn of the event loop
        return await self.issuer.issue(self.header if header is None else header, body)

    def set_status(self, status: ConnectionStatus) -> None:
        record = self.state.get("crm")
        self.state.put_state("crm", replace(record.state, status=status))


def run(scenario: Callable[[World], Awaitable[Any]]) -> Any:
    return asyncio.run(scenario(World()))


def test_a_repeated_request_is_answered_without_verifying_again_and_audited_each_time() -> None:
    async def scenario(world: World) -> tuple[list[str], int]:
        with capture_logs("info") as logs:
            for _ in range(20):
                assert (await world.ask()).access_token == Secret("AT-1")
            hits = world.verifier.cache_hits
        outcomes = [
            json.loads(line)["outcome"]
            for line in logs.getvalue().splitlines()
            if json.loads(line)["message"] == "token decision"
        ]
        return outcomes, hits

    outcomes, hits = run(scenario)
    assert outcomes == ["issued", "cache_hit"] + ["cache_hit"] * 18
    assert hits == 0  # verified once, on the first request; every repeat reuses the decision


def test_an_expired_caller_token_is_refused_on_the_repeat() -> None:
    async def scenario(world: World) -> None:
        world.header = "Bearer " + world.id_token(ttl=120)
        await world.ask()
        await world.ask()
        world.clock.advance(120 + world.verifier.leeway + 1)
        with pytest.raises(InvalidCallerToken):
            await world.ask()

    run(scenario)


def test_a_withdrawn_signing_key_is_noticed_on_the_repeat() -> None:
    async def scenario(world: World) -> None:
        await world.ask()
        await world.ask()
        # Google rotates: key-a is withdrawn, key-b published; the next fetch brings it.
        world.keys.jwks = [rsa_public_jwk(KEY_B, "key-b")]
        world.clock.advance(61)  # past the key set's max-age
        other = "Bearer " + world.id_token(KEY_B, "key-b")
        assert (await world.ask(other)).access_token == Secret("AT-1")  # fetches the new set
        with pytest.raises(InvalidCallerToken):  # signed by a key no longer published
            await world.ask()

    run(scenario)


@pytest.mark.parametrize("status", [ConnectionStatus.DISABLED, ConnectionStatus.NEEDS_REAUTH])
def test_a_stopped_connection_is_refused_on_the_repeat(status: ConnectionStatus) -> None:
    async def scenario(world: World) -> None:
        await world.ask()
        await world.ask()
        world.set_status(status)
        with pytest.raises(NeedsReauth):
            await world.ask()
        world.set_status(ConnectionStatus.ACTIVE)
        assert (await world.ask()).access_token == Secret("AT-1")

    run(scenario)


def test_a_removed_connection_is_refused_and_a_new_registration_is_not_served_the_old_token() -> (
    None
):
    async def scenario(world: World) -> None:
        await world.ask()
        await world.ask()
        world.registry.remove("crm")
        with pytest.raises(PolicyDenied):
            await world.ask()
        world.register("AT-NEW")
        assert (await world.ask()).access_token == Secret("AT-NEW")

    run(scenario)


def test_a_token_past_its_refresh_point_or_too_short_for_the_request_is_not_reused() -> None:
    async def scenario(world: World) -> None:
        first = await world.ask()
        await world.ask()
        # The cached answer's refresh point passes: decided afresh, a new answer capped at
        # the grant's 1,800 s from now (the stored token lasts an hour from registration).
        world.clock.advance((first.refresh_after - world.clock.now()).total_seconds() + 1)
        again = await world.ask()
        assert again.refresh_after > first.refresh_after
        assert again.expires_at == world.clock.now() + timedelta(seconds=1800)
        long = b'{"connection":"crm","min_ttl_seconds":1700}'
        assert (await world.ask(body=long)).expires_at == again.expires_at  # it lasts 1,800 s
        await world.ask(body=long)
        world.clock.advance(200)  # the cached answer now has 1,600 s left: a new one
        fresh = await world.ask(body=long)
        assert fresh.expires_at - world.clock.now() >= timedelta(seconds=1700)
        assert (await world.ask()).expires_at == fresh.expires_at  # the plain request too
        world.clock.advance(1000)  # the stored token itself (until 10:00) has < 1,700 s left
        with pytest.raises(CredentialUnavailable):
            await world.ask(body=long)
        with pytest.raises(CredentialUnavailable):  # and asking again does not change that
            await world.ask(body=long)

    run(scenario)


def test_an_answer_reflects_the_seconds_left_at_each_request() -> None:
    async def scenario(world: World) -> list[int]:
        seen = []
        for _ in range(3):
            token = await world.ask()
            seen.append(json.loads(token.render(world.clock.now()))["expires_in"])
            world.clock.advance(10)
        return seen

    assert run(scenario) == [1800, 1790, 1780]


def test_an_answer_evicted_from_the_cache_is_not_served_from_a_remembered_request() -> None:
    async def scenario(world: World) -> None:
        world.issuer.cache_size = 1
        world.register("AT-CRM2", "crm2")
        other = b'{"connection":"crm2"}'
        first = await world.ask()
        assert (await world.ask()).refresh_after == first.refresh_after  # remembered
        assert (await world.ask(body=other)).access_token == Secret("AT-CRM2")  # evicts crm's
        world.clock.advance(5)
        again = await world.ask()  # decided afresh: a new entry, five seconds later
        assert again.access_token == Secret("AT-1")
        assert again.refresh_after > first.refresh_after

    run(scenario)


def test_what_is_remembered_holds_no_caller_token() -> None:
    """As the verifier's cache (SHA-256 of the token, never the token): a process dump finds
    no caller's ID token in what the issuer remembers of past requests."""

    async def scenario(world: World) -> list[Any]:
        await world.ask()
        await world.ask()
        return [world.issuer._tickets]

    (tickets,) = run(scenario)
    assert tickets and all(isinstance(k, bytes) and len(k) == 32 for k in tickets)
    for ticket in tickets.values():
        assert "eyJ" not in repr(vars(ticket))  # every JWS starts so: base64url of '{"'
