"""The consumer client for threaded code: the core driven with threads and ``httpx.Client``.

:class:`BrokerClient` only performs the effects the core asks for
(:mod:`tokenbroker.consumer.effects`); every decision is in :mod:`tokenbroker.consumer.core`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Unpack

from tokenbroker.consumer.breaker import BreakerState
from tokenbroker.consumer.core import ClientCore, ClientOptions
from tokenbroker.consumer.effects import Claim, GetIdToken, Post, Release, Sleep
from tokenbroker.consumer.token import BrokerToken, TokenKey
from tokenbroker.consumer.transport import http_options, no_reply
from tokenbroker.consumer.wire import NoReply, Reply, ReplyBody
from tokenbroker.kernel.clock import Clock, SystemClock

if TYPE_CHECKING:
    import httpx


class BrokerClient:
    """Tokens from the broker, for threaded code. Build one per process (at module scope:
    warm instances reuse its cache and connection pool) and share it between threads.

    Per (connection, scopes), one caller at a time fetches; the others get the cached token
    while it is still valid, or wait for that fetch. Options: docs/client.md, *Configuration*.
    """

    def __init__(
        self,
        base_url: str,
        *,
        transport: httpx.BaseTransport | None = None,
        **options: Unpack[ClientOptions],
    ) -> None:
        import httpx  # noqa: PLC0415 - only a process that talks to the broker needs it

        self._core = ClientCore(base_url, **options)
        http = httpx.Client(transport=transport, **http_options(self._core.timeout))
        self._io = _ThreadIO(self._core.clock, http)

    @property
    def breaker_state(self) -> BreakerState:
        return self._core.breaker.state

    def token(self, connection: str, scopes: Sequence[str] = ()) -> BrokerToken:
        """A token for ``connection`` with ``scopes`` (empty: what the policy grants).

        Raises :class:`~tokenbroker.consumer.errors.BrokerUnavailable` (retryable) when no
        valid token can be had now, :class:`~tokenbroker.consumer.errors.BrokerRequestError`
        subclasses when the broker refuses, :class:`~tokenbroker.consumer.errors.IdTokenError`
        when the caller's identity is misconfigured.
        """
        flow = self._core.token(connection, scopes)
        while (effect := flow.effect) is not None:
            try:
                answer = effect.perform(self._io)
            except BaseException as error:  # noqa: BLE001 - thrown into the core, which re-raises
                flow.fail(error)
            else:
                flow.resolve(answer)
        return flow.result

    def close(self) -> None:
        self._io.http.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _ThreadIO:
    """The effects, performed in the calling thread."""

    def __init__(self, clock: Clock, http: httpx.Client) -> None:
        self.http = http
        self._clock = clock
        self._locks: dict[TokenKey, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def claim(self, effect: Claim) -> Release | None:
        with self._locks_guard:
            lock = self._locks.get(effect.key)
            if lock is None:
                lock = self._locks[effect.key] = threading.Lock()
        if effect.wait:
            taken = lock.acquire(timeout=effect.timeout)
        else:
            taken = lock.acquire(blocking=False)
        return lock.release if taken else None

    def id_token(self, effect: GetIdToken) -> str:
        return effect.obtain()

    def sleep(self, effect: Sleep) -> None:
        """:class:`Clock` only has an async ``sleep``. The system clock sleeps the thread; any
        other clock (``FakeClock`` in tests) has its coroutine run to completion on a private
        loop, so tests move time instead of waiting."""
        if isinstance(self._clock, SystemClock):
            time.sleep(effect.seconds)
        else:
            asyncio.run(self._clock.sleep(effect.seconds))

    def post(self, effect: Post) -> Reply | NoReply:
        import httpx  # noqa: PLC0415 - loaded by BrokerClient()

        request = self.http.stream(
            "POST", effect.url, content=effect.body, headers=effect.headers, timeout=effect.timeout
        )
        try:
            with request as response:
                body = ReplyBody(response.status_code, response.headers.get("retry-after"))
                for chunk in response.iter_bytes():
                    if not body.take(chunk):
                        break
                return body.reply()
        except httpx.TransportError as error:
            return no_reply(error)
