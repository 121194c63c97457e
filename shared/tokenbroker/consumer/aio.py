"""The consumer client for asyncio code: the core driven with ``httpx.AsyncClient``.

:class:`AsyncBrokerClient` only performs the effects the core asks for
(:mod:`tokenbroker.consumer.effects`); every decision is in :mod:`tokenbroker.consumer.core`,
shared with :class:`~tokenbroker.consumer.sync.BrokerClient`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Unpack

from tokenbroker.consumer.breaker import BreakerState
from tokenbroker.consumer.core import ClientCore, ClientOptions
from tokenbroker.consumer.effects import Claim, GetIdToken, Post, Release, Sleep
from tokenbroker.consumer.token import BrokerToken, TokenKey
from tokenbroker.consumer.transport import http_options, no_reply
from tokenbroker.consumer.wire import NoReply, Reply, ReplyBody
from tokenbroker.kernel.clock import Clock

if TYPE_CHECKING:
    import httpx


class AsyncBrokerClient:
    """The same client for asyncio code: the same core (cache, breaker, decisions), with an
    ``asyncio.Lock`` per key and ``httpx.AsyncClient``. The ID-token source (blocking: it may
    call the metadata server) runs in a worker thread.

    Use it from one event loop at a time. If the loop changes (a sync Cloud Function that calls
    ``asyncio.run`` per request), the client notices, keeps its cache and breaker, and builds
    new locks and a new connection pool for the new loop.
    """

    def __init__(
        self,
        base_url: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Unpack[ClientOptions],
    ) -> None:
        self._core = ClientCore(base_url, **options)
        self._io = _LoopIO(self._core.clock, transport, self._core.timeout)

    @property
    def breaker_state(self) -> BreakerState:
        return self._core.breaker.state

    async def token(self, connection: str, scopes: Sequence[str] = ()) -> BrokerToken:
        """As :meth:`BrokerClient.token <tokenbroker.consumer.sync.BrokerClient.token>`."""
        flow = self._core.token(connection, scopes)
        while (effect := flow.effect) is not None:
            try:
                answer = await effect.perform(self._io)
            except BaseException as error:  # noqa: BLE001 - thrown into the core, which re-raises
                flow.fail(error)
            else:
                flow.resolve(answer)
        return flow.result

    async def aclose(self) -> None:
        await self._io.aclose()

    async def __aenter__(self) -> AsyncBrokerClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class _LoopIO:
    """The effects, performed on the running event loop. Locks and pooled connections belong
    to one loop: on a new loop the old ones are dropped (the core's cache is kept)."""

    def __init__(
        self, clock: Clock, transport: httpx.AsyncBaseTransport | None, timeout: float
    ) -> None:
        self._clock = clock
        self._transport = transport
        self._timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._locks: dict[TokenKey, asyncio.Lock] = {}
        self._http: httpx.AsyncClient | None = None

    def _bound(self) -> httpx.AsyncClient:
        import httpx  # noqa: PLC0415 - only a process that talks to the broker needs it

        loop = asyncio.get_running_loop()
        if loop is not self._loop or self._http is None:
            self._loop = loop
            self._locks = {}
            self._http = httpx.AsyncClient(transport=self._transport, **http_options(self._timeout))
        return self._http

    async def claim(self, effect: Claim) -> Release | None:
        self._bound()
        lock = self._locks.setdefault(effect.key, asyncio.Lock())
        if not effect.wait and lock.locked():
            return None
        try:
            async with asyncio.timeout(effect.timeout):
                await lock.acquire()
        except TimeoutError:
            return None
        return lock.release

    async def id_token(self, effect: GetIdToken) -> str:
        return await asyncio.to_thread(effect.obtain)

    async def sleep(self, effect: Sleep) -> None:
        await self._clock.sleep(effect.seconds)

    async def post(self, effect: Post) -> Reply | NoReply:
        import httpx  # noqa: PLC0415 - loaded by _bound()

        request = self._bound().stream(
            "POST", effect.url, content=effect.body, headers=effect.headers, timeout=effect.timeout
        )
        try:
            async with request as response:
                body = ReplyBody(response.status_code, response.headers.get("retry-after"))
                async for chunk in response.aiter_bytes():
                    if not body.take(chunk):
                        break
                return body.reply()
        except httpx.TransportError as error:
            return no_reply(error)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
