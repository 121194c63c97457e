"""An in-process broker that speaks the issuer's ``POST /token`` contract, an ID-token source
the client can invalidate, and small helpers shared by the consumer's unit tests."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from datetime import datetime, timedelta
from typing import Any

import httpx

from tokenbroker.consumer import AsyncBrokerClient, BreakerState, BrokerClient
from tokenbroker.kernel.clock import FakeClock, isoformat

URL = "https://broker.example.run.app"
LIFETIME = 3600
REFRESH_AFTER = 1800
MARGIN = 10  # the client's default expiry_margin_seconds


class FakeBroker:
    """The issuer's ``POST /token`` contract. ``script`` answers (responses or exceptions)
    are used first, one per request; ``down`` refuses connections like a stopped server."""

    def __init__(self, clock: FakeClock, *, lifetime: int = LIFETIME, hint: int = REFRESH_AFTER):
        self.clock = clock
        self.lifetime = lifetime
        self.hint = hint
        self.down = False
        self.script: list[httpx.Response | Exception] = []
        self.requests: list[httpx.Request] = []
        self.issued: list[str] = []
        self.gate: threading.Event | None = None  # when set, requests wait for it (real time)
        self.latency = 0.0  # real seconds

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.latency:
            time.sleep(self.latency)
        if self.script:
            step = self.script.pop(0)
            if isinstance(step, Exception):
                raise step
            return step
        if self.down:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        return self.issue(json.loads(request.content))

    def issue(self, body: dict[str, Any]) -> httpx.Response:
        value = f"access-value-{len(self.issued):04d}-lowercase-only"  # not redacted by shape
        self.issued.append(value)
        now = self.clock.now()
        return httpx.Response(
            200,
            json={
                "access_token": value,
                "token_type": "Bearer",
                "expires_at": isoformat(now + timedelta(seconds=self.lifetime)),
                "expires_in": self.lifetime,
                "refresh_after": isoformat(now + timedelta(seconds=self.hint)),
                "scope": " ".join(body.get("scopes") or ["default.read"]),
                "connection": body["connection"],
            },
            headers={"Cache-Control": "no-store"},
        )

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests]

    def auth_headers(self) -> list[str]:
        return [r.headers["authorization"] for r in self.requests]


def refusal(status: int, error: str, retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    if status == 401:
        headers["WWW-Authenticate"] = f'Bearer realm="tokenbroker", error="{error}"'
    return httpx.Response(
        status, json={"error": error, "error_description": f"fake: {error}"}, headers=headers
    )


class IdTokens:
    """An ID-token source with a cache that the client can invalidate (as google-auth's)."""

    def __init__(self) -> None:
        self.generation = 0
        self.calls: list[str] = []
        self.invalidated = 0
        self.failure: Exception | None = None

    def __call__(self, audience: str, /) -> str:
        self.calls.append(audience)
        if self.failure is not None:
            raise self.failure
        return f"id-token-generation-{self.generation}"

    def invalidate(self, audience: str) -> None:  # noqa: ARG002 - one audience in these tests
        self.invalidated += 1
        self.generation += 1


def messages(stream: io.StringIO) -> list[str]:
    return [json.loads(line)["message"] for line in stream.getvalue().splitlines()]


def state_of(client: BrokerClient | AsyncBrokerClient) -> BreakerState:
    return client.breaker_state


def move_to(clock: FakeClock, when: datetime) -> None:
    clock.advance((when - clock.now()).total_seconds())


def jwt(claims: dict[str, Any]) -> str:
    """An unsigned compact JWT with ``claims`` (only its ``exp`` is ever read)."""

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2lnbmF0dXJl"
