"""Issuer: scoped, short-lived tokens for IAM-authenticated callers. A thin adapter over
tokenbroker. ``functions-framework --target=issue`` serves it as ASGI (uvicorn) with or without
``--asgi``: ``create_app`` hands an ``@aio`` target to its ASGI app (functions-framework 3.9+).

functions-framework imports this module in gunicorn's arbiter, which then forks the worker that
serves: the worker builds the instance (stores, verifier, the cloud client libraries) in a
background thread as it starts, so that it is ready, or under way, when the first request
arrives (``issuer.warm_up_in_workers``)."""

from typing import Any

from functions_framework import aio

from tokenbroker.entrypoints import issuer

issuer.warm_up_in_workers()


@aio.http
async def issue(request: Any) -> Any:
    return await issuer.handle(request)
