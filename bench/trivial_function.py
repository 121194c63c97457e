"""The floor for the issuer benchmarks: a hello-world function on the same server mode."""

from typing import Any

from functions_framework import aio


@aio.http
async def hello(request: Any) -> Any:  # noqa: ARG001 - the framework passes it
    return {"status": "ok"}
