"""Issue 9: the JWKS refetch ran blocking I/O on the event loop -- one token with an unknown
``kid`` stalled every request (even ``/healthz``) for the keys server's full response time.

The keys come from a real HTTP server on 127.0.0.1 that sleeps before answering a refetch; the
issuer is the real :class:`TokenIssuer` over in-memory stores with the real verifier.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.jwks_server import JwksServer
from tests.support.oidc import rsa_public_jwk, sign_rs256
from tokenbroker.adapters.memory import MemorySecretStore, MemoryStateStore
from tokenbroker.issue.idtoken import IdTokenVerifier, JwksDocument, KeySet
from tokenbroker.issue.issuer import TokenIssuer
from tokenbroker.issue.policy_file import parse_policy_text
from tokenbroker.kernel.clock import FakeClock, SystemClock
from tokenbroker.kernel.errors import InvalidCallerToken
from tokenbroker.kernel.model import Connection, Credential, GrantType
from tokenbroker.kernel.secret import Secret
from tokenbroker.oauth.profiles import load_profiles
from tokenbroker.refresh.registry import ConnectionRegistry

AUDIENCE = "https://europe-west1-proj.cloudfunctions.net/tokenbroker-issuer"
ISSUER = "https://accounts.google.com"
WORKER = "worker@proj.iam.gserviceaccount.com"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
SLOW_SECONDS = 1.5


@pytest.fixture
def slow_keys() -> Iterator[JwksServer]:
    """The first GET answers at once (the cold-start fetch); later ones sleep first."""
    jwks = {"keys": [rsa_public_jwk(KEY, "key-1")]}
    with JwksServer(jwks, delay=SLOW_SECONDS, prompt=1) as server:
        yield server


def _token(kid: str = "key-1", email: str = WORKER) -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER, "aud": AUDIENCE, "sub": f"sub-{email}", "email": email,
        "email_verified": True, "iat": now, "exp": now + 3600,
    }  # fmt: skip
    return sign_rs256(claims, KEY, kid=kid)


def _issuer(keys_url: str) -> TokenIssuer:
    clock = SystemClock()
    secrets, state = MemorySecretStore(), MemoryStateStore()
    profiles = load_profiles()
    now = clock.now()
    ConnectionRegistry(secrets=secrets, state=state, profiles=profiles, clock=clock).register(
        Connection(id="crm", profile="generic", grant=GrantType.REFRESH_TOKEN,
                   client_id="client", token_url="https://idp.test/token"),
        Credential(refresh_token=Secret("rt"), client_secret=Secret("cs"),
                   access_token=Secret("AT-crm"), obtained_at=now,
                   expires_at=now + timedelta(hours=1)),
    )  # fmt: skip
    keys = KeySet(keys_url, clock=clock, refetch_interval=300)
    assert keys.refresh()  # the cold-start fetch, answered at once
    policy = f"""
version = 1
[[grants]]
callers = ["{WORKER}"]
connections = ["crm"]
scopes = ["*"]
"""
    return TokenIssuer(
        verifier=IdTokenVerifier(audience=AUDIENCE, keys=keys, clock=clock),
        policy=parse_policy_text(policy),
        state=state,
        secrets=secrets,
        profiles=profiles,
        clock=clock,
        rng=random.Random(1),
    )


def _unknown_kid_token() -> str:
    header = base64.urlsafe_b64encode(
        json.dumps({"alg": "RS256", "kid": "rotated-in", "typ": "JWT"}).encode()
    ).rstrip(b"=")
    _, payload, signature = _token().split(".")
    return f"{header.decode()}.{payload}.{signature}"


def test_an_unknown_kid_refetch_does_not_stall_other_requests(slow_keys: JwksServer) -> None:
    issuer = _issuer(slow_keys.url)
    body = json.dumps({"connection": "crm"}).encode()
    known = f"Bearer {_token()}"

    async def main() -> tuple[float, float, float]:
        await issuer.issue(known, body)  # warm: the known kid is cached, the token too
        started = time.monotonic()
        stalled = asyncio.ensure_future(issuer.issue(f"Bearer {_unknown_kid_token()}", body))
        await asyncio.sleep(0.05)  # what /healthz needs: the loop to run, not wait for keys
        loop_free = time.monotonic() - started
        assert not stalled.done()  # the unknown-kid request is still waiting for the keys
        other = time.monotonic()
        token = await issuer.issue(f"Bearer {_token(email=WORKER)}", body)  # a known kid
        assert token.connection == "crm"
        known_took = time.monotonic() - other
        with pytest.raises(InvalidCallerToken, match="unknown key"):
            await stalled
        return loop_free, known_took, time.monotonic() - started

    loop_free, known_took, total = asyncio.run(main())
    assert total >= SLOW_SECONDS * 0.9  # the refetch really was slow ...
    assert loop_free < 0.3, loop_free  # ... and the loop kept running meanwhile
    assert known_took < 0.3, known_took
    assert slow_keys.requests == 2  # one refetch, as the rate limit allows


def test_many_unknown_kids_during_a_slow_refetch_are_refused_at_once(
    slow_keys: JwksServer,
) -> None:
    """The rate limit holds off the loop too: a burst of made-up kids while the refetch is in
    flight costs one fetch, and the others are refused without waiting for it."""
    issuer = _issuer(slow_keys.url)
    body = json.dumps({"connection": "crm"}).encode()

    async def main() -> float:
        started = time.monotonic()
        first = asyncio.ensure_future(issuer.issue(f"Bearer {_unknown_kid_token()}", body))
        await asyncio.sleep(0.05)
        for _ in range(20):
            with pytest.raises(InvalidCallerToken, match="unknown key"):
                await issuer.issue(f"Bearer {_unknown_kid_token()}", body)
        took = time.monotonic() - started
        with pytest.raises(InvalidCallerToken):
            await first
        return took

    assert asyncio.run(main()) < 0.3
    assert slow_keys.requests == 2


def test_a_stale_key_set_is_refreshed_off_the_loop_while_others_use_the_keys_held() -> None:
    """Keys past their max-age: the request that notices waits for the refresh in a thread;
    a request meanwhile verifies with the keys held (as threads do), without a thread."""
    clock = FakeClock()
    gate = threading.Event()
    fetches: list[float] = []

    def fetch(_url: str) -> JwksDocument:
        fetches.append(time.monotonic())
        if len(fetches) > 1:
            assert gate.wait(10)  # a keys server that takes its time
        return JwksDocument(json.dumps({"keys": [rsa_public_jwk(KEY, "key-1")]}).encode(), 600)

    keys = KeySet("https://www.googleapis.com/oauth2/v3/certs", fetch=fetch, clock=clock)
    assert keys.refresh()
    verifier = IdTokenVerifier(audience=AUDIENCE, keys=keys, clock=clock, cache_size=0)
    clock.advance(601)  # stale

    def token(email: str) -> str:
        now = int(clock.now().timestamp())
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": email, "email": email,
                  "email_verified": True, "iat": now, "exp": now + 3600}  # fmt: skip
        return sign_rs256(claims, KEY, kid="key-1")

    async def main() -> float:
        first = asyncio.ensure_future(verifier.averify(token("a@p.iam.gserviceaccount.com")))
        await asyncio.sleep(0.05)
        assert not first.done()  # waiting for the refresh, in a thread
        started = time.monotonic()
        other = await verifier.averify(token("b@p.iam.gserviceaccount.com"))
        took = time.monotonic() - started
        assert other.email == "b@p.iam.gserviceaccount.com"
        gate.set()
        assert (await first).email == "a@p.iam.gserviceaccount.com"
        return took

    assert asyncio.run(main()) < 0.2
    assert len(fetches) == 2
