"""Issuer: scoped, short-lived tokens for IAM-authenticated callers. A thin adapter over
tokenbroker. ``functions-framework --target=issue`` serves it as ASGI (uvicorn) with or without
``--asgi``: ``create_app`` hands an ``@aio`` target to its ASGI app (functions-framework 3.9+)."""

from typing import Any

from functions_framework import aio

from tokenbroker.entrypoints import issuer


@aio.http
async def issue(request: Any) -> Any:
    return await issuer.handle(request)
