"""Rigs for the TokenEndpoint contract: an endpoint under test plus a scripted server.

A test scripts what the "server" does for each request it receives, as a server would do it
on the wire (:class:`Answer`, :class:`Refuse`, :class:`Hang`), posts through the endpoint
and inspects what came back and what the server received.

* :class:`AiohttpServerRig`: ``AiohttpTokenEndpoint`` against a real aiohttp web server on
  127.0.0.1 (a free port) that answers from the script.
* :class:`FakeTokenServerRig`: ``adapters.fake_provider.FakeTokenServer``, whose own script
  takes ``HttpResponse`` values and exceptions. It has no wire: a scripted :class:`Answer`
  becomes the ``HttpResponse`` it stands for (header names lower-cased, as ``HttpResponse``
  requires), :class:`Refuse` and :class:`Hang` become the ``TransportError`` a real transport
  raises for them.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol, TypeVar
from urllib.parse import parse_qs, urlsplit

from aiohttp import web

from tokenbroker.adapters.fake_provider import FakeTokenServer, unreachable
from tokenbroker.adapters.http import AiohttpTokenEndpoint
from tokenbroker.kernel.errors import TransportError
from tokenbroker.kernel.http import HttpResponse

T = TypeVar("T")

#: The client timeout the aiohttp rig configures; a Hang outlasts it.
CLIENT_TIMEOUT = 0.3


@dataclass(frozen=True)
class Answer:
    """An HTTP answer. ``headers`` as the server sends them (any case)."""

    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    #: Send the body in pieces of this many bytes with a pause between them (chunked
    #: transfer encoding), so the client sees it arrive over several reads.
    chunk_size: int | None = None


@dataclass(frozen=True)
class Refuse:
    """Nothing listens: the connection is refused."""


@dataclass(frozen=True)
class Hang:
    """The server accepts the request and never answers (until the rig shuts down)."""


Step = Answer | Refuse | Hang


@dataclass(frozen=True)
class Received:
    """A request as the server saw it."""

    method: str
    path: str
    #: The request's Content-Type; None for rigs without a wire (nothing to observe).
    content_type: str | None
    form: dict[str, str]
    #: Header names lower-cased.
    headers: dict[str, str]


Post = Callable[..., Awaitable[HttpResponse]]


def _parse_form(body: bytes) -> dict[str, str]:
    parsed = parse_qs(body.decode(), keep_blank_values=True, strict_parsing=bool(body))
    assert all(len(values) == 1 for values in parsed.values()), parsed
    return {name: values[0] for name, values in parsed.items()}


class EndpointRig(Protocol):
    #: Whether a real HTTP exchange happens (so the wire format can be observed).
    wire: bool
    received: list[Received]

    def script(self, *steps: Step) -> None: ...

    def session(self) -> AsyncIterator[Post]: ...


def run(rig: EndpointRig, scenario: Callable[[Post], Awaitable[T]]) -> T:
    """Run ``scenario(post)`` in a fresh event loop with the rig's server up.

    ``post(form, *, headers={}, path="/token")`` sends one form POST through the endpoint
    under test and returns its ``HttpResponse`` (or raises what the endpoint raised).
    """

    async def main() -> T:
        async with rig.session() as post:  # type: ignore[attr-defined]
            return await scenario(post)

    return asyncio.run(main())


def post_once(
    rig: EndpointRig,
    form: Mapping[str, str] | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    path: str = "/token",
) -> HttpResponse:
    return run(
        rig,
        lambda post: post(
            form or {"grant_type": "refresh_token"}, headers=headers or {}, path=path
        ),
    )


# --- the fake ------------------------------------------------------------------------------


class _RecordingFake(FakeTokenServer):
    """The FakeTokenServer, unchanged, noting each request it is given."""

    def __init__(self, sink: list[Received]) -> None:
        super().__init__()
        self._sink = sink

    async def post_form(
        self, url: str, form: Mapping[str, str], *, headers: Mapping[str, str]
    ) -> HttpResponse:
        self._sink.append(
            Received(
                method="POST",
                path=urlsplit(url).path,
                content_type=None,
                form=dict(form),
                headers={k.lower(): v for k, v in headers.items()},
            )
        )
        return await super().post_form(url, form, headers=headers)


class FakeTokenServerRig:
    wire = False

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.server = _RecordingFake(self.received)

    def script(self, *steps: Step) -> None:
        for step in steps:
            if isinstance(step, Answer):
                headers = {k.lower(): v for k, v in step.headers.items()}
                self.server.script.append(HttpResponse(step.status, step.body, headers))
            elif isinstance(step, Refuse):
                self.server.script.append(unreachable())
            else:
                self.server.script.append(TransportError("token endpoint timed out"))

    @asynccontextmanager
    async def session(self) -> AsyncIterator[Post]:
        async def post(
            form: Mapping[str, str], *, headers: Mapping[str, str], path: str = "/token"
        ) -> HttpResponse:
            return await self.server.post_form(f"https://idp.test{path}", form, headers=headers)

        yield post


# --- aiohttp against a real local server ---------------------------------------------------


class AiohttpServerRig:
    wire = True

    def __init__(self) -> None:
        self.received: list[Received] = []
        self._steps: list[Step] = []

    def script(self, *steps: Step) -> None:
        self._steps.extend(steps)

    async def _handle(self, request: web.Request, release: asyncio.Event) -> web.StreamResponse:
        body = await request.read()
        self.received.append(
            Received(
                method=request.method,
                path=request.path,
                content_type=request.headers.get("Content-Type"),
                form=_parse_form(body),
                headers={k.lower(): v for k, v in request.headers.items()},
            )
        )
        step = self._steps.pop(0) if self._steps else Answer(599, b"unscripted request")
        if isinstance(step, Hang):
            await release.wait()
            return web.Response(status=504)
        assert isinstance(step, Answer), step
        if step.chunk_size is None:
            return web.Response(status=step.status, body=step.body, headers=dict(step.headers))
        response = web.StreamResponse(status=step.status, headers=dict(step.headers))
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(step.body), step.chunk_size):
            await response.write(step.body[start : start + step.chunk_size])
            await asyncio.sleep(0.002)
        await response.write_eof()
        return response

    @asynccontextmanager
    async def session(self) -> AsyncIterator[Post]:
        release = asyncio.Event()
        app = web.Application()

        async def handler(request: web.Request) -> web.StreamResponse:
            return await self._handle(request, release)

        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        # Bound but never listening: connecting to it is refused, and no one else can take it.
        dead = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        dead.bind(("127.0.0.1", 0))
        dead_port = dead.getsockname()[1]
        try:
            async with AiohttpTokenEndpoint(timeout=CLIENT_TIMEOUT) as endpoint:

                async def post(
                    form: Mapping[str, str], *, headers: Mapping[str, str], path: str = "/token"
                ) -> HttpResponse:
                    target = port
                    if self._steps and isinstance(self._steps[0], Refuse):
                        self._steps.pop(0)
                        target = dead_port
                    url = f"http://127.0.0.1:{target}{path}"
                    return await endpoint.post_form(url, form, headers=headers)

                yield post
        finally:
            release.set()
            dead.close()
            await runner.cleanup()
