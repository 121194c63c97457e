"""``tokenbroker serve``: the refresh loop on a schedule plus the functions' HTTP endpoints,
in one local process (what Cloud Scheduler + Cloud Functions do in the cloud).

Liveness (see :mod:`.health`): ``GET /healthz`` is ``200`` only while the last successful tick
is younger than ``max_tick_age`` (three intervals by default), else ``503`` with that age and
the last error's code, so an orchestrator restarts a process whose loop hangs or keeps failing.
A tick that raises is logged (a bug with its traceback), counted, and the loop goes on; if the
loop itself ever ends, ``serve`` raises and the process exits non-zero instead of serving
HTTP over a loop that no longer refreshes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import math
import signal
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tokenbroker.entrypoints.answers import http_answer
from tokenbroker.entrypoints.compose import Runtime
from tokenbroker.entrypoints.health import LoopHealth, observed_tick
from tokenbroker.kernel import trace
from tokenbroker.kernel.clock import isoformat
from tokenbroker.kernel.errors import ConfigError, TokenBrokerError
from tokenbroker.kernel.log import get_logger

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from aiohttp import web

    _Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class LoopDied(TokenBrokerError):
    """The refresh loop ended while the process was serving: a bug (exit status 1)."""

    code = "internal_error"


def _json(data: Any, status: int = 200) -> web.Response:
    from aiohttp import web  # noqa: PLC0415

    return web.Response(
        text=json.dumps(data),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def build_app(runtime: Runtime, tick_lock: asyncio.Lock, health: LoopHealth) -> web.Application:
    from aiohttp import web  # noqa: PLC0415

    async def healthz(_: web.Request) -> web.Response:
        healthy, body = health.report(runtime.clock.monotonic())
        return _json(body, 200 if healthy else 503)

    async def refresh(_: web.Request) -> web.Response:
        async with tick_lock:
            result = await observed_tick(runtime, trigger="http", health=health)
        if isinstance(result, TokenBrokerError):
            answer = http_answer(result, public=False)
            return web.Response(
                text=answer.json(),
                status=answer.status,
                headers=answer.headers,
                content_type="application/json",
            )
        return _json(result.to_json())

    async def connections(_: web.Request) -> web.Response:
        try:
            records = await asyncio.to_thread(runtime.state.list)
        except TokenBrokerError as error:
            answer = http_answer(error, public=False)
            return web.Response(
                text=answer.json(),
                status=answer.status,
                headers=answer.headers,
                content_type="application/json",
            )
        return _json(
            [
                {"id": r.connection.id, "profile": r.connection.profile, **r.state.to_json()}
                for r in records
            ]
        )

    @web.middleware
    async def traced(request: web.Request, handler: _Handler) -> web.StreamResponse:
        """Each request's log lines carry its trace (:mod:`tokenbroker.kernel.trace`)."""
        token = trace.enter(trace.from_header_map(request.headers))
        try:
            return await handler(request)
        finally:
            trace.leave(token)

    app = web.Application(middlewares=[traced])
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/refresh", refresh)
    app.router.add_get("/connections", connections)
    return app


async def _tick_loop(
    runtime: Runtime, interval: float, tick_lock: asyncio.Lock, health: LoopHealth
) -> None:
    """Tick, then sleep ``interval``, for ever. A failed tick is logged and recorded by
    :func:`observed_tick` and never ends the loop."""
    while True:
        async with tick_lock:
            await observed_tick(runtime, trigger="schedule", health=health)
        await runtime.clock.sleep(interval)


def _listen_error(error: OSError, host: str, port: int) -> ConfigError:
    """Binding failed: name the option to change (the host for a name or an address this
    machine does not have, else the port)."""
    unknown_host = isinstance(error, socket.gaierror) or error.errno == errno.EADDRNOTAVAIL
    field = f"--host {host}" if unknown_host else f"--port {port}"
    reason = error.strerror or str(error)
    return ConfigError(f"{field}: cannot listen on {host}:{port}: {reason}")


async def serve(
    runtime: Runtime,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    interval: float = 60.0,
    duration: float | None = None,
    max_tick_age: float | None = None,
    on_ready: Callable[[tuple[str, int]], None] | None = None,
) -> None:
    """Run until SIGINT/SIGTERM (or ``duration`` seconds, for demos and tests).

    Raises :class:`ConfigError` when the address cannot be bound (nothing has run yet) and
    :class:`LoopDied` when the refresh loop ends by itself."""
    from aiohttp import web  # noqa: PLC0415

    if not (math.isfinite(interval) and interval > 0):
        raise ConfigError("interval: must be a positive, finite number of seconds")
    log = get_logger(component="serve")
    tick_lock = asyncio.Lock()
    health = LoopHealth.start(interval, runtime.clock.monotonic(), max_tick_age)
    runner = web.AppRunner(build_app(runtime, tick_lock, health), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as error:
            raise _listen_error(error, host, port) from None
        bound = runner.addresses[0] if runner.addresses else (host, port)
        log.info(
            "serving",
            address=f"http://{bound[0]}:{bound[1]}",
            tick_interval=interval,
            max_tick_age=health.max_age,
        )
        if on_ready is not None:
            on_ready((str(bound[0]), int(bound[1])))
        await _run_loop(runtime, interval, tick_lock, health, duration)
    finally:
        await runner.cleanup()
        log.info("stopped", at=isoformat(runtime.clock.now()))


async def _run_loop(
    runtime: Runtime,
    interval: float,
    tick_lock: asyncio.Lock,
    health: LoopHealth,
    duration: float | None,
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    ticker = asyncio.create_task(_tick_loop(runtime, interval, tick_lock, health))
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({ticker, stopper}, timeout=duration, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        died = ticker.done()
        if not died:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
    if died:
        _loop_died(ticker)


def _loop_died(ticker: asyncio.Task[None]) -> None:
    """The loop never returns by itself: whatever ended it is a bug, and the process must not
    go on answering HTTP as if it refreshed."""
    log = get_logger(component="serve")
    try:
        ticker.result()
    except BaseException as death:
        log.exception("the refresh loop died; exiting", exception_type=type(death).__name__)
        raise LoopDied(
            f"the refresh loop stopped ({type(death).__name__}); the traceback is in the log"
        ) from None
    raise LoopDied("the refresh loop stopped")
