"""Issuer: scoped, short-lived tokens for IAM-authenticated callers. A thin adapter over
tokenbroker; serve with ``functions-framework --asgi --target=issue``."""

from typing import Any

from functions_framework import aio

from tokenbroker.entrypoints import issuer


@aio.http
async def issue(request: Any) -> Any:
    return await issuer.handle(request)
