"""The issuer function's HTTP layer (ASGI, Starlette requests): routes, body limits, and the
one place errors become HTTP answers. Everything else lives in :mod:`tokenbroker.issue.issuer`.

Served by ``functions-framework --asgi`` (uvicorn): measured ~4x the default gthread mode for
this workload on one core, and the issuer's hot path is async end to end.

Routes: ``POST /token``, ``GET /healthz``, ``/relay/{connection}/{path}``. Anything else: 404.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from tokenbroker.entrypoints.answers import bug_answer, http_answer
from tokenbroker.issue.issuer import MAX_BODY_BYTES, TokenIssuer
from tokenbroker.kernel.errors import BadRequest, ConfigError, TokenBrokerError
from tokenbroker.kernel.log import get_logger

ENV_IAM_ACCESS_TOKEN = "TOKENBROKER_IAM_ACCESS_TOKEN"  # noqa: S105 - a variable name
_issuer: TokenIssuer | None = None
_relay: Any = None
_lock = asyncio.Lock()
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


async def build() -> tuple[TokenIssuer, Any]:
    """The instance's issuer, built on the first request (cold start) and reused."""
    global _issuer, _relay
    if _issuer is None:
        async with _lock:
            if _issuer is None:
                _issuer, _relay = await asyncio.to_thread(_assemble)
    assert _issuer is not None  # noqa: S101 - assigned just above
    return _issuer, _relay


def _assemble() -> tuple[TokenIssuer, Any]:
    from tokenbroker.adapters.http import AiohttpTokenEndpoint  # noqa: PLC0415
    from tokenbroker.entrypoints.compose import build_runtime, start_logging  # noqa: PLC0415
    from tokenbroker.entrypoints.settings import Settings  # noqa: PLC0415
    from tokenbroker.issue.idtoken import IdTokenVerifier, KeySet  # noqa: PLC0415
    from tokenbroker.issue.policy_file import load_policy  # noqa: PLC0415
    from tokenbroker.issue.relay import Relay  # noqa: PLC0415

    start_logging()
    settings = Settings.from_env()
    if not settings.issuer_audience:
        raise ConfigError("TOKENBROKER_ISSUER_AUDIENCE (the function's URL) is required")
    if settings.policy_file is None:
        raise ConfigError("TOKENBROKER_POLICY_FILE is required (deny-by-default policy)")
    runtime = build_runtime(settings)
    policy = load_policy(settings.policy_file)
    verifier = IdTokenVerifier(
        audience=settings.issuer_audience,
        issuers=settings.id_token_issuers,
        keys=KeySet(settings.id_token_keys_url, clock=runtime.clock),
        clock=runtime.clock,
    )
    verifier.keys.refresh()  # fetch the keys now, in this thread, not on the event loop
    impersonator = _iam(settings)
    issuer = TokenIssuer(
        verifier=verifier,
        policy=policy,
        state=runtime.state,
        secrets=runtime.secrets,
        profiles=runtime.profiles,
        impersonator=impersonator,
        endpoint=AiohttpTokenEndpoint(timeout=settings.http_timeout),
        clock=runtime.clock,
    )
    relay = Relay(
        verifier=verifier,
        policy=policy,
        secrets=runtime.secrets,
        state=runtime.state,
        clock=runtime.clock,
    )
    return issuer, relay


def _iam(settings: Any) -> Any:
    """IAM Credentials, authorised as the broker: Application Default Credentials, or (local
    runs and tests) the access token in ``TOKENBROKER_IAM_ACCESS_TOKEN``."""
    from tokenbroker.adapters.gcp.iam_credentials import IamCredentials  # noqa: PLC0415

    static = os.environ.get(ENV_IAM_ACCESS_TOKEN)
    if not static:
        return IamCredentials(endpoint=settings.iam_credentials_endpoint)

    async def authorizer() -> str:
        return static

    return IamCredentials(endpoint=settings.iam_credentials_endpoint, authorizer=authorizer)


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import Response  # noqa: PLC0415

    return Response(
        json.dumps(body, separators=(",", ":")),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def error_response(error: TokenBrokerError) -> Any:
    answer = http_answer(error, public=True)
    return _json(answer.body, answer.status, answer.headers)


async def read_body(request: Any, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refused past ``limit`` bytes. Read from the ASGI channel directly:
    a token request arrives in one message, and Starlette's stream wrapper costs more than the
    rest of the cached path."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise BadRequest(f"request body larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await request.receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"request body larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _healthz(_: Any) -> Any:
    return _json({"status": "ok"})


async def _token(request: Any) -> Any:
    from starlette.responses import Response  # noqa: PLC0415

    content_type = request.headers.get("content-type", "")
    if content_type and not content_type.startswith("application/json"):
        raise BadRequest("Content-Type must be application/json")
    issuer, _ = await build()
    body = await read_body(request)
    token = await issuer.issue(request.headers.get("authorization"), body)
    return Response(token.render(issuer.clock.now()), 200, _NO_STORE, media_type="application/json")


async def _relay_route(request: Any) -> Any:
    _, relay = await build()
    return await relay.handle(request)


_ROUTES = {"/healthz": (("GET", "HEAD"), _healthz), "/token": (("POST",), _token)}


async def handle(request: Any) -> Any:
    """Every request to the issuer function."""
    path = request.scope["path"]
    try:
        if path.startswith("/relay/"):
            return await _relay_route(request)
        route = _ROUTES.get(path)
        if route is None:
            return _json({"error": "not_found", "error_description": "no such route"}, 404)
        methods, endpoint = route
        if request.method not in methods:
            body = {"error": "invalid_request", "error_description": f"use {methods[0]}"}
            return _json(body, 405, {"Allow": ", ".join(methods)})
        return await endpoint(request)
    except TokenBrokerError as error:
        return error_response(error)
    except Exception:  # noqa: BLE001 - last line: log the bug, never leak a trace to the caller
        get_logger(component="issuer-http").exception("unhandled error", path=path)
        answer = bug_answer()
        return _json(answer.body, answer.status, answer.headers)
