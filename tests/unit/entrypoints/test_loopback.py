"""The loopback callback of ``tokenbroker authorize``: one callback ends the flow, the page is
strict and carries nothing secret, a slow provider ends in a timeout."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import httpx
import pytest

from tokenbroker.entrypoints.loopback import (
    CONTENT_SECURITY_POLICY,
    bind_loopback,
    redirect_uri_for,
    serve_one_callback,
)
from tokenbroker.kernel.errors import AccessDenied, AuthorizationTimedOut
from tokenbroker.refresh.authorize import Connected


async def _serve(
    complete_error: Exception | None, requests: Sequence[str], wait: float = 5
) -> tuple[list[httpx.Response], BaseException | Connected]:
    sock = bind_loopback()
    redirect = redirect_uri_for(sock)
    seen: list[list[tuple[str, str]]] = []

    async def complete(params: Sequence[tuple[str, str]]) -> Connected:
        seen.append(list(params))
        assert complete_error is not None
        raise complete_error

    server = asyncio.create_task(serve_one_callback(sock, complete, wait_seconds=wait))
    async with httpx.AsyncClient(timeout=5) as browser:
        responses = [await browser.get(redirect.replace("/callback", path)) for path in requests]
    try:
        outcome: BaseException | Connected = await server
    except BaseException as error:  # noqa: BLE001 - the outcome under test
        outcome = error
    finally:
        sock.close()
    assert len(seen) == 1
    return responses, outcome


def test_the_first_callback_ends_the_flow_with_a_strict_page() -> None:
    error = AccessDenied("the account holder denied the request (access_denied: <b>no</b>)")
    responses, outcome = asyncio.run(
        _serve(error, ["/favicon.ico", "/callback?code=SECRETCODE&state=STATE"])
    )
    favicon, page = responses
    assert favicon.status_code == 404
    assert page.status_code == 403
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert page.headers["referrer-policy"] == "no-referrer"
    assert page.headers["cache-control"] == "no-store"
    assert "SECRETCODE" not in page.text and "STATE" not in page.text
    assert "<b>" not in page.text and "&lt;b&gt;" in page.text  # escaped
    assert outcome is error


def test_redirect_uri_is_the_loopback_ip_literal_on_an_ephemeral_port() -> None:
    sock = bind_loopback()
    try:
        uri = redirect_uri_for(sock)
    finally:
        sock.close()
    assert uri.startswith("http://127.0.0.1:") and uri.endswith("/callback")
    assert int(uri.split(":")[2].split("/")[0]) > 0


def test_no_callback_in_time_is_a_timeout() -> None:
    async def run() -> None:
        sock = bind_loopback()

        async def complete(params: Sequence[tuple[str, str]]) -> Connected:
            raise AssertionError("never called")

        try:
            await serve_one_callback(sock, complete, wait_seconds=0.1)
        finally:
            sock.close()

    with pytest.raises(AuthorizationTimedOut):
        asyncio.run(run())
