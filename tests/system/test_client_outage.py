"""The real client against a real HTTP broker on 127.0.0.1, through a real outage.

``ContractBroker`` is a small aiohttp server that speaks the issuer's ``POST /token`` contract
with short lifetimes (6 s, ``refresh_after`` 2 s). The tests stop it (connections are refused,
as when the broker's instances are gone), check that the client keeps serving the last good
token until its hard expiry and then raises, and start it again on the same port.

To run the same scenario against the real issuer process, give a fixture with the same
surface: ``url``, ``id_token``, ``start()``, ``stop()``, ``requests`` and ``issued``.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.support.oidc import free_port
from tokenbroker.consumer import (
    AsyncBrokerClient,
    BreakerState,
    BrokerClient,
    BrokerInvalidToken,
    BrokerToken,
    BrokerUnavailable,
    static_id_token_source,
)
from tokenbroker.kernel.clock import isoformat
from tokenbroker.kernel.errors import PolicyDenied

pytestmark = pytest.mark.system

LIFETIME = 6
HINT = 2
MARGIN = 1


class ContractBroker:
    """``POST /token`` per the issuer's contract, on its own event loop in a thread."""

    def __init__(self, *, lifetime: int = LIFETIME, hint: int = HINT) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.id_token = "sys-id-" + secrets.token_hex(16)
        self.lifetime = lifetime
        self.hint = hint
        self.requests = 0
        self.issued: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    async def _token(self, request: web.Request) -> web.Response:
        self.requests += 1
        if request.headers.get("Authorization") != f"Bearer {self.id_token}":
            return web.json_response(
                {"error": "invalid_token", "error_description": "bad ID token"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="test", error="invalid_token"'},
            )
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("connection"), str):
            return web.json_response(
                {"error": "invalid_request", "error_description": "connection"}, status=400
            )
        if body["connection"] == "denied":
            return web.json_response(
                {"error": "access_denied", "error_description": "not granted"}, status=403
            )
        value = "sys-access-" + secrets.token_hex(16)  # lower-case hex: the logger's scrubber
        self.issued.append(value)  # would not catch it, so the leak check tests the client
        now = datetime.now(UTC)
        return web.json_response(
            {
                "access_token": value,
                "token_type": "Bearer",
                "expires_at": isoformat(now + timedelta(seconds=self.lifetime)),
                "expires_in": self.lifetime,
                "refresh_after": isoformat(now + timedelta(seconds=self.hint)),
                "scope": " ".join(body.get("scopes") or ["default"]),
                "connection": body["connection"],
            },
            headers={"Cache-Control": "no-store"},
        )

    def start(self) -> None:
        started = threading.Event()

        async def serve() -> None:
            app = web.Application()
            app.router.add_post("/token", self._token)
            self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
            started.set()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            loop.run_until_complete(serve())
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert started.wait(10), "the contract broker did not start"

    @property
    def running(self) -> bool:
        return self._thread is not None

    def stop(self) -> None:
        """Close the listener and every connection: from now on, connections are refused."""
        assert self._loop is not None and self._thread is not None and self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = self._thread = self._runner = None


@pytest.fixture
def contract_broker() -> Iterator[ContractBroker]:
    server = ContractBroker()
    server.start()
    yield server
    if server.running:
        server.stop()


def client_options(server: ContractBroker) -> dict[str, Any]:
    return {
        "id_token_source": static_id_token_source(server.id_token),
        "timeout": 1.0,
        "deadline_seconds": 3.0,
        "breaker_threshold": 3,
        "breaker_reset_seconds": 1.0,
        "min_ttl_seconds": 1,
        "expiry_margin_seconds": MARGIN,
    }


def sleep_until(when: datetime) -> None:
    time.sleep(max(0.0, (when - datetime.now(UTC)).total_seconds()))


def assert_nothing_leaked(server: ContractBroker, capture_dir: Path) -> None:
    log = (capture_dir / "library-log.jsonl").read_text()
    assert "broker unavailable; serving the cached token until it expires" in log
    leaked = [v[:14] for v in [*server.issued, server.id_token] if v in log]
    assert leaked == []


def test_sync_client_serves_last_token_through_a_real_outage_and_recovers(
    contract_broker: ContractBroker, capture_dir: Path
) -> None:
    server = contract_broker
    with BrokerClient(server.url, **client_options(server)) as client:
        # Normal operation: cached until refresh_after, then fetched again.
        first = client.token("zoho-eu", ["b", "a"])
        assert first.scope == ("a", "b")
        assert client.token("zoho-eu", ["a", "b"]) is first
        assert server.requests == 1
        sleep_until(first.refresh_after + timedelta(milliseconds=50))
        last_good = client.token("zoho-eu", ["a", "b"])
        assert last_good is not first
        assert server.requests == 2

        # A real outage: the listener is gone, connections are refused.
        sleep_until(last_good.refresh_after + timedelta(milliseconds=50))
        server.stop()
        served, raised_at = _call_through_outage(client.token, last_good)
        assert served >= 10
        usable_until = last_good.expires_at - timedelta(seconds=MARGIN)
        assert usable_until <= raised_at < last_good.expires_at

        # Back on the same port: the client recovers once the breaker lets a trial through.
        server.start()
        recovered = _poll(lambda: client.token("zoho-eu", ["a", "b"]))
        assert recovered.access_token.reveal() == server.issued[-1]
        assert client.breaker_state is BreakerState.CLOSED

        # Refusals come through as typed errors, never as the cached token.
        with pytest.raises(PolicyDenied):
            client.token("denied")
    assert_nothing_leaked(server, capture_dir)


def test_wrong_id_token_is_refreshed_once_then_raised(contract_broker: ContractBroker) -> None:
    server = contract_broker
    options = {**client_options(server), "id_token_source": static_id_token_source("wrong")}
    with BrokerClient(server.url, **options) as client, pytest.raises(BrokerInvalidToken):
        client.token("zoho-eu")
    assert server.requests == 2


def test_async_client_serves_last_token_through_a_real_outage_and_recovers(
    contract_broker: ContractBroker, capture_dir: Path
) -> None:
    server = contract_broker

    async def scenario() -> None:
        async with AsyncBrokerClient(server.url, **client_options(server)) as client:
            first = await client.token("zoho-eu")
            assert await client.token("zoho-eu") is first
            await asyncio.sleep(_seconds_until(first.refresh_after) + 0.05)
            last_good = await client.token("zoho-eu")
            assert last_good is not first
            await asyncio.sleep(_seconds_until(last_good.refresh_after) + 0.05)
            await asyncio.to_thread(server.stop)

            served = 0
            while True:
                now = datetime.now(UTC)
                try:
                    token = await client.token("zoho-eu")
                except BrokerUnavailable:
                    break
                assert token is last_good
                assert now < last_good.expires_at - timedelta(seconds=MARGIN)
                served += 1
                await asyncio.sleep(0.1)
            assert served >= 10
            assert now >= last_good.expires_at - timedelta(seconds=MARGIN)

            await asyncio.to_thread(server.start)
            deadline = time.monotonic() + 10
            while True:
                try:
                    recovered = await client.token("zoho-eu")
                    break
                except BrokerUnavailable:
                    assert time.monotonic() < deadline, "no recovery after the restart"
                    await asyncio.sleep(0.2)
            assert recovered.access_token.reveal() == server.issued[-1]

    asyncio.run(scenario())
    assert_nothing_leaked(server, capture_dir)


def _seconds_until(when: datetime) -> float:
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _call_through_outage(
    token: Any, last_good: BrokerToken, *, connection: str = "zoho-eu"
) -> tuple[int, datetime]:
    """Call every 100 ms until the client raises: every answer before that must be the last
    good token, still valid. Returns (answers served, when it raised)."""
    served = 0
    while True:
        now = datetime.now(UTC)
        try:
            answer = token(connection, ["a", "b"])
        except BrokerUnavailable:
            return served, now
        assert answer is last_good
        assert now < last_good.expires_at - timedelta(seconds=MARGIN)
        served += 1
        time.sleep(0.1)


def _poll(call: Any, seconds: float = 10.0) -> BrokerToken:
    deadline = time.monotonic() + seconds
    while True:
        try:
            result: BrokerToken = call()
        except BrokerUnavailable:
            assert time.monotonic() < deadline, "no recovery after the restart"
            time.sleep(0.2)
        else:
            return result
