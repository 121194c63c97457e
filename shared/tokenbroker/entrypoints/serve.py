"""``tokenbroker serve``: the refresh loop on a schedule plus the functions' HTTP endpoints,
in one local process (what Cloud Scheduler + Cloud Functions do in the cloud)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from typing import TYPE_CHECKING, Any

from tokenbroker.entrypoints.answers import http_answer
from tokenbroker.entrypoints.compose import Runtime
from tokenbroker.kernel.clock import isoformat
from tokenbroker.kernel.errors import TokenBrokerError
from tokenbroker.kernel.log import get_logger

if TYPE_CHECKING:
    from aiohttp import web


def _json(data: Any, status: int = 200) -> web.Response:
    from aiohttp import web  # noqa: PLC0415

    return web.Response(text=json.dumps(data), status=status, content_type="application/json")


def build_app(runtime: Runtime, tick_lock: asyncio.Lock) -> web.Application:
    from aiohttp import web  # noqa: PLC0415

    async def healthz(_: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def refresh(_: web.Request) -> web.Response:
        async with tick_lock:
            try:
                summary = await runtime.tick()
            except TokenBrokerError as error:
                answer = http_answer(error, public=False)
                return web.Response(
                    text=answer.json(),
                    status=answer.status,
                    headers=answer.headers,
                    content_type="application/json",
                )
        return _json(summary.to_json())

    async def connections(_: web.Request) -> web.Response:
        records = await asyncio.to_thread(runtime.state.list)
        return _json(
            [
                {"id": r.connection.id, "profile": r.connection.profile, **r.state.to_json()}
                for r in records
            ]
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/refresh", refresh)
    app.router.add_get("/connections", connections)
    return app


async def _tick_loop(runtime: Runtime, interval: float, tick_lock: asyncio.Lock) -> None:
    log = get_logger(component="serve")
    while True:
        async with tick_lock:
            try:
                await runtime.tick()
            except TokenBrokerError as error:
                # Expected failure (a store is down): one line with the code, no traceback.
                log.error("scheduled tick failed", error_code=error.code, error=error.message)
        await asyncio.sleep(interval)


async def serve(
    runtime: Runtime,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    interval: float = 60.0,
    duration: float | None = None,
    on_ready: Any = None,
) -> None:
    """Run until SIGINT/SIGTERM (or ``duration`` seconds, for demos and tests)."""
    from aiohttp import web  # noqa: PLC0415

    log = get_logger(component="serve")
    tick_lock = asyncio.Lock()
    runner = web.AppRunner(build_app(runtime, tick_lock), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0] if runner.addresses else (host, port)
    log.info("serving", address=f"http://{bound[0]}:{bound[1]}", tick_interval=interval)
    if on_ready is not None:
        on_ready(bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    ticker = asyncio.create_task(_tick_loop(runtime, interval, tick_lock))
    try:
        if duration is None:
            await stop.wait()
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), duration)
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        await runner.cleanup()
        log.info("stopped", at=isoformat(runtime.clock.now()))
