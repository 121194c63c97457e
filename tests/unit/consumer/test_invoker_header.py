"""The client's ID token in both headers Cloud Run knows (issue 9, item 5): the issuer then
works in either identity mode, and the invoker header never goes anywhere but the broker."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import httpx
import pytest

from tests.unit.consumer.fakes import URL, FakeBroker, IdTokens
from tokenbroker.consumer import AsyncBrokerClient, BrokerClient, BrokerRequestError
from tokenbroker.consumer.wire import request_headers
from tokenbroker.kernel.clock import FakeClock


def test_by_default_the_token_goes_in_both_headers(
    make: Callable[..., BrokerClient], broker: FakeBroker
) -> None:
    make().token("crm")
    sent = broker.requests[0].headers
    assert sent["authorization"] == "Bearer id-token-generation-0"
    assert sent["x-serverless-authorization"] == "Bearer id-token-generation-0"


def test_authorization_only_when_asked(
    make: Callable[..., BrokerClient], make_async: Callable[..., AsyncBrokerClient],
    broker: FakeBroker,
) -> None:  # fmt: skip
    make(serverless_authorization=False).token("crm")

    async def fetch() -> None:
        async with make_async(serverless_authorization=False) as client:
            await client.token("other")

    asyncio.run(fetch())
    for request in broker.requests:
        assert "x-serverless-authorization" not in request.headers
        assert request.headers["authorization"].startswith("Bearer id-token-generation-")


def test_the_header_builder() -> None:
    both = request_headers("tok")
    assert both["Authorization"] == both["X-Serverless-Authorization"] == "Bearer tok"
    assert "X-Serverless-Authorization" not in request_headers(
        "tok", serverless_authorization=False
    )


def test_a_redirect_is_not_followed_so_the_headers_go_nowhere_else(
    clock: FakeClock, ids: IdTokens
) -> None:
    """A broker URL answering 307 to another host: the client does not follow, so neither the
    ID token nor its invoker copy reaches that host."""
    seen: list[httpx.Request] = []

    def moved(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(307, headers={"Location": "https://collector.evil.example/token"})

    client = BrokerClient(
        URL, clock=clock, transport=httpx.MockTransport(moved), rng=random.Random(7),
        id_token_source=ids, deadline_seconds=1,
    )  # fmt: skip
    with client, pytest.raises(BrokerRequestError):
        client.token("crm")
    assert {r.url.host for r in seen} == {httpx.URL(URL).host}
