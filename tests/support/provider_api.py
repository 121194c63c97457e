"""A provider on 127.0.0.1 for in-process tests: an API behind the relay and a token endpoint.

A real aiohttp web server on a free port (the wire is real: headers, chunked bodies,
compression, redirects, slow answers), run either in the test's own event loop
(``async with api.running():``) or in a thread with its own loop (``with api.in_thread():``,
for code that runs its own loop, such as the refresher function).

Routes, under any prefix (so a policy's ``base_url`` can carry a path):

* ``.../redirect`` -- 302 to ``/stolen`` (a follower would arrive there; nothing should);
* ``.../big?bytes=N`` -- ``N`` bytes in 64 KiB chunks;
* ``.../slow?seconds=S`` -- waits, then answers;
* ``.../gzip`` -- the echo, gzip-encoded;
* ``.../token`` -- the :class:`~tokenbroker.adapters.fake_provider.FakeTokenServer` given,
  as an OAuth token endpoint;
* anything else -- 200 with a JSON echo of the request (method, path, query, headers, body),
  a ``Set-Cookie`` and an ``X-Echo-Authorization`` header repeating what arrived.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from aiohttp import web

from tokenbroker.adapters.fake_provider import FakeTokenServer


@dataclass(frozen=True)
class Received:
    method: str
    #: The path exactly as it came on the request line (still percent-encoded), no query.
    raw_path: str
    query: str
    #: Every header as sent, names lower-cased, in order (duplicates kept).
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]


@dataclass
class ProviderApi:
    token_server: FakeTokenServer | None = None
    received: list[Received] = field(default_factory=list)
    url: str = ""

    def paths(self) -> list[str]:
        return [r.raw_path for r in self.received]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        raw_path = request.raw_path.partition("?")[0]
        self.received.append(
            Received(
                method=request.method,
                raw_path=raw_path,
                query=request.query_string,
                headers=[(k.lower(), v) for k, v in request.headers.items()],
                body=body,
            )
        )
        last = raw_path.rstrip("/").rsplit("/", 1)[-1]
        if last == "redirect":
            raise web.HTTPFound(location="/stolen")
        if last == "big":
            size = int(request.query.get("bytes", "0"))
            response = web.StreamResponse(status=200, headers={"Content-Type": "text/plain"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            chunk = b"x" * 65536
            sent = 0
            while sent < size:
                await response.write(chunk[: min(len(chunk), size - sent)])
                sent += len(chunk)
            await response.write_eof()
            return response
        if last == "slow":
            await asyncio.sleep(float(request.query.get("seconds", "5")))
        if last == "token" and self.token_server is not None:
            form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
            answer = await self.token_server.post_form(
                str(request.url), form, headers=dict(request.headers)
            )
            return web.Response(status=answer.status, body=answer.body, headers=answer.headers)
        echo = json.dumps(
            {
                "method": request.method,
                "path": raw_path,
                "query": request.query_string,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "body": body.decode(errors="replace"),
            }
        ).encode()
        headers = {
            "Content-Type": "application/json",
            "Set-Cookie": "session=abc",
            "X-Echo-Authorization": request.headers.get("Authorization", ""),
        }
        if last == "gzip":
            return web.Response(
                status=200,
                body=gzip.compress(echo),
                headers={**headers, "Content-Encoding": "gzip"},
            )
        return web.Response(status=200, body=echo, headers=headers)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[ProviderApi]:
        """Serve in the current event loop until the block ends."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, shutdown_timeout=0.2, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            yield self
        finally:
            await runner.cleanup()

    @contextmanager
    def in_thread(self) -> Iterator[ProviderApi]:
        """Serve from a thread with its own event loop until the block ends."""
        loop = asyncio.new_event_loop()
        started = threading.Event()
        stop: asyncio.Event | None = None

        async def main() -> None:
            nonlocal stop
            stop = asyncio.Event()
            async with self.running():
                started.set()
                await stop.wait()

        thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
        thread.start()
        if not started.wait(10):
            raise RuntimeError("the provider API did not start")
        try:
            yield self
        finally:
            assert stop is not None
            loop.call_soon_threadsafe(stop.set)
            thread.join(10)
            loop.close()
