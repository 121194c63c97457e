"""The loopback callback of ``tokenbroker authorize`` (RFC 8252 §7.3).

A one-shot HTTP server on ``http://127.0.0.1:PORT/callback``, PORT chosen by the system
(RFC 8252 §7.3: "any port"; §8.3: the loopback IP literal, not ``localhost``, which may
resolve elsewhere). The first request to ``/callback`` ends the flow, whatever it carries:
it is answered by :meth:`~tokenbroker.refresh.authorize.AuthorizationFlow.complete` and a
minimal page saying what happened; the server then closes. Other paths are 404 and do not end
the flow (a browser asks for ``/favicon.ico``).

The page (:mod:`tokenbroker.entrypoints.pages`, shared with the connect function) has no
script, no third-party asset and a strict Content-Security-Policy; it never carries the code,
the verifier or a token (only fixed text and the error's message, which is built from codes
and ids, HTML-escaped).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from tokenbroker.entrypoints.pages import CONTENT_SECURITY_POLICY, PAGE_HEADERS, page
from tokenbroker.kernel.errors import AccessDenied, AuthorizationTimedOut, TokenBrokerError
from tokenbroker.kernel.log import get_logger

if TYPE_CHECKING:
    from aiohttp import web

    from tokenbroker.refresh.authorize import Connected

CALLBACK_PATH = "/callback"
LOOPBACK_HOST = "127.0.0.1"
Complete = Callable[[Sequence[tuple[str, str]]], Awaitable["Connected"]]


def success_page(connected: Connected) -> str:
    cid = connected.record.connection.id
    narrower = (
        f" The provider did not grant: {' '.join(connected.missing_scopes)}."
        if connected.missing_scopes
        else ""
    )
    return page(
        "Account connected",
        f"The connection {cid} is authorised and active.{narrower}",
        ok=True,
        next_step="You can close this window and return to the terminal.",
    )


def failure_page(error: TokenBrokerError) -> str:
    return page(
        "Not connected",
        f"{error.message} ({error.code})",
        ok=False,
        next_step="Nothing was stored. Close this window; the terminal says what to do next.",
    )


def bind_loopback() -> socket.socket:
    """A listening socket on the loopback address, on a port the system picks."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((LOOPBACK_HOST, 0))
        sock.listen(8)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def redirect_uri_for(sock: socket.socket) -> str:
    port = sock.getsockname()[1]
    return f"http://{LOOPBACK_HOST}:{port}{CALLBACK_PATH}"


async def serve_one_callback(
    sock: socket.socket, complete: Complete, *, wait_seconds: float
) -> Connected:
    """Serve ``sock`` until the first ``/callback`` request has been answered (or ``wait_seconds``
    seconds passed: :class:`AuthorizationTimedOut`). Returns what ``complete`` stored, or
    raises what it raised -- after the page saying so was sent."""
    from aiohttp import web  # noqa: PLC0415 - the broker's extra, only on this path

    log = get_logger(component="authorize")
    outcome: asyncio.Future[Connected] = asyncio.get_running_loop().create_future()

    async def callback(request: web.Request) -> web.Response:
        if outcome.done():
            return _html(
                page(
                    "Already answered",
                    "This authorization was already answered; this request changed nothing.",
                    ok=False,
                    next_step="Close this window.",
                ),
                409,
            )
        try:
            connected = await complete(list(request.query.items()))
        except TokenBrokerError as error:
            if not outcome.done():
                outcome.set_exception(error)
            return _html(failure_page(error), page_status(error))
        except Exception as bug:  # a bug ends the flow with a page, not a hang
            if not outcome.done():
                outcome.set_exception(bug)
            log.exception("authorization callback failed", exception_type=type(bug).__name__)
            return _html(
                page(
                    "Not connected",
                    "tokenbroker failed unexpectedly (a bug); nothing was stored.",
                    ok=False,
                    next_step="Close this window; the terminal says more.",
                ),
                500,
            )
        if not outcome.done():
            outcome.set_result(connected)
        return _html(success_page(connected), 200)

    async def other(_: web.Request) -> web.Response:
        return _html(
            page("Not found", "Nothing here.", ok=False, next_step="Close this window."), 404
        )

    app = web.Application()
    app.router.add_get(CALLBACK_PATH, callback)
    app.router.add_route("*", "/{tail:.*}", other)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        try:
            return await asyncio.wait_for(asyncio.shield(outcome), wait_seconds)
        except TimeoutError:
            raise AuthorizationTimedOut(
                f"no answer from the provider within {wait_seconds:g} s; nothing was stored "
                "(run authorize again)"
            ) from None
    finally:
        # Let the page that ended the flow be written before the server closes.
        await asyncio.sleep(0.05)
        with contextlib.suppress(Exception):
            await runner.cleanup()
        if not outcome.done():
            outcome.cancel()
        elif not outcome.cancelled():
            outcome.exception()  # retrieved: no "never retrieved" warning


def page_status(error: TokenBrokerError) -> int:
    """The failure page's status: 403 for a refusal by the account holder, the error's own
    4xx, else 502 (the provider failed)."""
    if isinstance(error, AccessDenied):
        return 403
    return error.http_status if 400 <= error.http_status < 500 else 502


def _html(body: str, status: int) -> web.Response:
    from aiohttp import web  # noqa: PLC0415

    return web.Response(
        text=body, status=status, content_type="text/html", charset="utf-8", headers=PAGE_HEADERS
    )


__all__ = [
    "CALLBACK_PATH",
    "CONTENT_SECURITY_POLICY",
    "PAGE_HEADERS",
    "bind_loopback",
    "failure_page",
    "page",
    "page_status",
    "redirect_uri_for",
    "serve_one_callback",
    "success_page",
]
