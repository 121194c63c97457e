"""Test doubles for the issue wing's ports, shared by its unit tests."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from tokenbroker.kernel.errors import InvalidCallerToken
from tokenbroker.kernel.http import HttpResponse, OutboundRequest
from tokenbroker.kernel.model import Caller


class FakeVerifier:
    """A CallerVerifier whose bearer token is the caller's email."""

    def verify_authorization(self, header: str | None) -> Caller:
        if not header or not header.startswith("Bearer "):
            raise InvalidCallerToken("missing bearer token")
        email = header.removeprefix("Bearer ")
        return Caller(
            email, f"sub-{email}", "https://issuer.test", datetime(2099, 1, 1, tzinfo=UTC)
        )

    async def averify_authorization(self, header: str | None) -> Caller:
        return self.verify_authorization(header)

    def select_authorization(self, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
        return next((v.decode() for k, v in headers if k.lower() == b"authorization"), None)

    def receipt(self, header: str | None) -> object | None:
        return (header, self.verify_authorization(header))

    def still_holds(self, receipt: object, now: float) -> bool:  # noqa: ARG002 - no expiry
        """Verifies afresh: a test that changes what the fake accepts sees it at once."""
        header, caller = receipt  # type: ignore[misc]
        try:
            return bool(self.verify_authorization(header) == caller)
        except InvalidCallerToken:
            return False


@dataclass
class RecordingTransport:
    """A RelayTransport in memory: records every request and answers from ``script`` (an
    ``HttpResponse`` to return or an exception to raise, one per request), else with 200 and
    a JSON echo of what it was sent."""

    script: list[HttpResponse | Exception] = field(default_factory=list)
    sent: list[OutboundRequest] = field(default_factory=list)

    async def send(self, request: OutboundRequest) -> HttpResponse:
        self.sent.append(request)
        if self.script:
            step = self.script.pop(0)
            if isinstance(step, Exception):
                raise step
            return step
        echo = {
            "method": request.method,
            "url": request.url,
            "headers": dict(request.headers),
            "body": request.body.decode(errors="replace"),
        }
        return HttpResponse(200, json.dumps(echo).encode(), {"content-type": "application/json"})
